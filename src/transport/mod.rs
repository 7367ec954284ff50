//! SIP transports (RFC 3261 §18): UDP sockets and TCP connections on every `listen` address.
//!
//! The only SIP code that touches tokio. Inbound bytes are framed and parsed here (so parsing
//! spreads over the runtime's threads) and handed to the core as [`TransportEvent`]s; a
//! message that cannot be parsed is answered `400` with the fault in the reason phrase right
//! here when a response can be built (§21.4.1), else dropped. Outbound [`Transmit`]s go out of
//! the UDP socket of the matching family, or the TCP connection to that peer (reused when the
//! peer connected to us, RFC 5923-style; opened on demand otherwise). TLS connections
//! ([`tls`]) are TCP connections with a handshake first and run the same framing loop.
//!
//! Inbound TCP and TLS are bounded ([`TcpLimits`], issue 10 finding 5): connections per
//! listener and per source ([`crate::guard::ConnGate`], over the cap closed at once), bytes
//! buffered for one message (more: `513`/`400` and close), time to complete a begun message,
//! and idle time.

pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use crate::config::{ListenAddr, Transport};
use crate::metrics::METRICS;
use crate::sip::message::{self, error_response_for, Frame, SipMessage};
use crate::sip::transaction::{Peer, Transmit};

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot bind {transport}:{addr}: {source}")]
    Bind {
        transport: Transport,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("tls:{0} needs [tls] cert_file and key_file")]
    NoTlsCertificate(SocketAddr),
}

/// What the transports tell the core.
#[derive(Debug)]
pub enum TransportEvent {
    Message {
        msg: SipMessage,
        peer: Peer,
        received_at: Instant,
    },
    /// A connection to `peer` could not be opened or broke while we had something to send.
    Unreachable(Peer),
}

type ConnMap = Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Bytes>>>>;

/// How long a closing connection's writer may take to send what is queued.
const WRITER_DRAIN: Duration = Duration::from_secs(1);

/// Bounds on inbound SIP TCP/TLS connections (`[limits]` and `sip.tcp_idle_secs`).
#[derive(Debug, Clone)]
pub struct TcpLimits {
    /// A connection with nothing to read this long is closed.
    pub idle: Duration,
    /// A message begun but not complete this long closes the connection.
    pub message_timeout: Duration,
    /// Bytes buffered for one incomplete message at most.
    pub max_message_bytes: usize,
    pub(crate) gate: Arc<crate::guard::ConnGate>,
}

/// Every bound SIP socket, cheap to clone.
#[derive(Clone)]
pub struct Transports {
    udp: Arc<Vec<(SocketAddr, Arc<UdpSocket>)>>,
    tcp_local: Arc<Vec<SocketAddr>>,
    tls_local: Arc<Vec<SocketAddr>>,
    /// None: no `[tls]` setup, TLS transmits fail as unreachable.
    tls: Option<Arc<tls::SipTls>>,
    conns: ConnMap,
    events: mpsc::Sender<TransportEvent>,
    tcp: Arc<TcpLimits>,
}

impl Transports {
    /// The TLS client and server setup, when `[tls]` is in use.
    pub(crate) fn tls(&self) -> Option<&tls::SipTls> {
        self.tls.as_deref()
    }

    /// Binds every listen address and starts the receive tasks (no TLS).
    pub async fn bind(
        listens: &[ListenAddr],
        events: mpsc::Sender<TransportEvent>,
        tcp: TcpLimits,
    ) -> Result<Transports, TransportError> {
        Self::bind_with_tls(listens, events, tcp, None).await
    }

    /// [`Transports::bind`] with TLS: `tls:` listeners accept with `tls`'s certificate and
    /// outbound TLS connects with its roots.
    pub async fn bind_with_tls(
        listens: &[ListenAddr],
        events: mpsc::Sender<TransportEvent>,
        tcp: TcpLimits,
        tls: Option<Arc<tls::SipTls>>,
    ) -> Result<Transports, TransportError> {
        let mut udp = Vec::new();
        let mut tcp_listeners = Vec::new();
        let mut tls_listeners = Vec::new();
        for l in listens {
            let bind_err = |source| TransportError::Bind {
                transport: l.transport,
                addr: l.addr,
                source,
            };
            match l.transport {
                Transport::Udp => {
                    let sock = UdpSocket::bind(l.addr).await.map_err(bind_err)?;
                    grow_buffers(&sock);
                    let local = sock.local_addr().map_err(bind_err)?;
                    udp.push((local, Arc::new(sock)));
                }
                Transport::Tcp => {
                    let lis = TcpListener::bind(l.addr).await.map_err(bind_err)?;
                    tcp_listeners.push(lis);
                }
                Transport::Tls => {
                    let acceptor = tls
                        .as_ref()
                        .and_then(|t| t.acceptor.clone())
                        .ok_or(TransportError::NoTlsCertificate(l.addr))?;
                    let lis = TcpListener::bind(l.addr).await.map_err(bind_err)?;
                    tls_listeners.push((lis, acceptor));
                }
            }
        }
        let tls_local = tls_listeners
            .iter()
            .filter_map(|(l, _)| l.local_addr().ok())
            .collect();
        let tcp_local = tcp_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let t = Transports {
            udp: Arc::new(udp),
            tcp_local: Arc::new(tcp_local),
            tls_local: Arc::new(tls_local),
            tls,
            conns: Arc::new(Mutex::new(HashMap::new())),
            events,
            tcp: Arc::new(tcp),
        };
        for (_, sock) in t.udp.iter() {
            tokio::spawn(udp_loop(sock.clone(), t.clone()));
        }
        for lis in tcp_listeners {
            tokio::spawn(accept_loop(lis, t.clone()));
        }
        for (lis, acceptor) in tls_listeners {
            tokio::spawn(tls_accept_loop(lis, acceptor, t.clone()));
        }
        Ok(t)
    }

    /// The locally bound address for a transport (first match), for Via/Contact ports.
    pub fn local_addr(&self, transport: Transport) -> Option<SocketAddr> {
        match transport {
            Transport::Udp => self.udp.first().map(|(a, _)| *a),
            Transport::Tcp => self.tcp_local.first().copied(),
            Transport::Tls => self.tls_local.first().copied(),
        }
    }

    /// Every bound address with its transport, for the `ready` line.
    pub fn bound(&self) -> Vec<(Transport, SocketAddr)> {
        let mut v: Vec<_> = self.udp.iter().map(|(a, _)| (Transport::Udp, *a)).collect();
        v.extend(self.tcp_local.iter().map(|a| (Transport::Tcp, *a)));
        v.extend(self.tls_local.iter().map(|a| (Transport::Tls, *a)));
        v
    }

    /// Sends without waiting: UDP is best effort (the transaction layer retransmits), TCP
    /// goes through the connection's writer task.
    pub fn send(&self, t: Transmit) {
        match t.peer.transport {
            Transport::Udp => {
                let sock = self
                    .udp
                    .iter()
                    .find(|(a, _)| a.is_ipv4() == t.peer.addr.is_ipv4())
                    .or_else(|| self.udp.first());
                if let Some((_, sock)) = sock {
                    if let Err(e) = sock.try_send_to(&t.data, t.peer.addr) {
                        tracing::debug!(peer = %t.peer.addr, error = %e, "udp send failed");
                    }
                }
            }
            Transport::Tcp | Transport::Tls => self.send_tcp(t),
        }
    }

    /// Sends on the connection to the peer, opening one (TCP, or TCP + TLS handshake) when
    /// there is none.
    fn send_tcp(&self, t: Transmit) {
        let existing = lock(&self.conns).get(&t.peer.addr).cloned();
        if let Some(tx) = existing {
            if tx.send(t.data.clone()).is_ok() {
                return;
            }
            lock(&self.conns).remove(&t.peer.addr);
        }
        // No connection: open one; queue the message on it.
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(t.data);
        lock(&self.conns).insert(t.peer.addr, tx);
        let this = self.clone();
        tokio::spawn(async move {
            let peer = t.peer;
            let connected = match (peer.transport, this.tls.clone()) {
                (Transport::Tls, Some(tls)) => {
                    match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, tls.connect(peer.addr)).await
                    {
                        Ok(Ok(stream)) => {
                            this.run_connection(stream, peer, rx, None).await;
                            true
                        }
                        Ok(Err(e)) => {
                            tracing::info!(peer = %peer.addr, error = %e, "TLS connection failed");
                            false
                        }
                        Err(_) => false,
                    }
                }
                (Transport::Tls, None) => false,
                _ => match tokio::time::timeout(
                    Duration::from_secs(5),
                    TcpStream::connect(peer.addr),
                )
                .await
                {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        this.run_connection(stream, peer, rx, None).await;
                        true
                    }
                    _ => false,
                },
            };
            if !connected {
                lock(&this.conns).remove(&peer.addr);
                let _ = this.events.send(TransportEvent::Unreachable(peer)).await;
            }
        });
    }

    /// Frames and delivers what arrives on a stream (TCP, or TLS after its handshake) and
    /// writes what is queued for it, until it closes or stays idle.
    async fn run_connection<S>(
        &self,
        stream: S,
        peer: Peer,
        mut outbound: mpsc::UnboundedReceiver<Bytes>,
        // The inbound connection's place under the caps, given back when it ends.
        _permit: Option<crate::guard::ConnPermit>,
    ) where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let remote = peer.addr;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            while let Some(data) = outbound.recv().await {
                if wr.write_all(&data).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
        });
        let mut buf = BytesMut::with_capacity(8192);
        let limits = Arc::clone(&self.tcp);
        // When the incomplete message in `buf` began.
        let mut begun: Option<Instant> = None;
        'conn: loop {
            let wait = match begun {
                Some(t) => limits.message_timeout.saturating_sub(t.elapsed()),
                None => limits.idle,
            };
            let read = tokio::time::timeout(wait, rd.read_buf(&mut buf)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
            loop {
                match message::frame_stream(&buf) {
                    Ok(Frame::Incomplete) => break,
                    Ok(Frame::KeepAlive(n)) => {
                        let _ = buf.split_to(n);
                    }
                    Ok(Frame::Message(n)) => {
                        begun = None;
                        let frame = buf.split_to(n);
                        if !self.deliver(&frame, peer).await {
                            break 'conn;
                        }
                    }
                    Err(e) => {
                        // The stream cannot be re-synchronised: answer if possible, then close.
                        self.reject(&buf, &e, peer);
                        break 'conn;
                    }
                }
            }
            if buf.is_empty() {
                begun = None;
            } else if buf.len() > limits.max_message_bytes {
                self.reject(&buf, &message::ParseError::TooLarge, peer);
                break 'conn;
            } else {
                begun.get_or_insert_with(Instant::now);
            }
        }
        lock(&self.conns).remove(&remote);
        // What is queued (the answer to a refused message) still goes out, briefly: the map
        // held the only sender, so the writer ends once it has drained its queue.
        let abort = writer.abort_handle();
        if tokio::time::timeout(WRITER_DRAIN, writer).await.is_err() {
            abort.abort();
        }
    }

    /// Parses one message and hands it to the core. False when the core is gone.
    async fn deliver(&self, data: &[u8], peer: Peer) -> bool {
        match message::parse(data) {
            Ok(msg) => {
                let ev = TransportEvent::Message {
                    msg,
                    peer,
                    received_at: Instant::now(),
                };
                match self.events.try_send(ev) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(TransportEvent::Message {
                        msg, ..
                    })) => {
                        self.overloaded(&msg, peer);
                        true
                    }
                    Err(_) => false,
                }
            }
            Err(e) => {
                self.reject(data, &e, peer);
                true
            }
        }
    }

    fn reject(&self, data: &[u8], err: &message::ParseError, peer: Peer) {
        METRICS.sip_malformed_total.inc();
        tracing::debug!(peer = %peer.addr, error = %err, "malformed SIP message");
        if let Some(resp) = error_response_for(data, err) {
            let resp = crate::b2bua::errors::with_error_body(
                resp,
                crate::error_code::ErrorCode::MalformedMessage,
                &err.to_string(),
            );
            self.send(Transmit {
                peer,
                data: Bytes::from(resp.to_bytes()),
            });
        }
    }

    /// Answers a datagram over [`MAX_UDP_MESSAGE`] with 513, built like a parse error's 400
    /// (from the request's Via, From, To, Call-ID and CSeq; nothing for responses and ACKs).
    fn too_large(&self, data: &[u8], peer: Peer) {
        METRICS.sip_malformed_total.inc();
        tracing::debug!(peer = %peer.addr, bytes = data.len(), "SIP datagram too large");
        if let Some(mut resp) = error_response_for(data, &message::ParseError::TooLarge) {
            resp.status = 513;
            resp.reason = message::default_reason(513).to_string();
            let detail = format!(
                "a datagram of {} bytes is over the {MAX_UDP_MESSAGE} bytes accepted; use TCP",
                data.len()
            );
            let resp = crate::b2bua::errors::with_error_body(
                resp,
                crate::error_code::ErrorCode::MessageTooLarge,
                &detail,
            );
            self.send(Transmit {
                peer,
                data: Bytes::from(resp.to_bytes()),
            });
        }
    }

    /// The core's queue is full: shed the request with 503 + Retry-After (PROTOCOL.md §5).
    fn overloaded(&self, msg: &SipMessage, peer: Peer) {
        METRICS.sip_overload_dropped_total.inc();
        if let SipMessage::Request(req) = msg {
            if req.method != message::Method::Ack {
                let mut resp = req.response(503, None);
                resp.headers.push("Retry-After", "2");
                let resp = crate::b2bua::errors::with_error_body(
                    resp,
                    crate::error_code::ErrorCode::Overloaded,
                    "server busy, retry later",
                );
                self.send(Transmit {
                    peer,
                    data: Bytes::from(resp.to_bytes()),
                });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means a task panicked mid-insert; the map itself is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Socket buffer asked for on each SIP UDP socket. The kernel's default (~208 KiB) holds about
/// 300 INVITEs: a few milliseconds of a 3,000 calls/s burst while the reader task waits for a
/// core, after which datagrams are dropped and come back as retransmissions
/// (docs/BENCHMARKS.md, issue 5). The kernel caps it at `net.core.rmem_max`/`wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn grow_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    // Best effort: a smaller buffer only means drops come sooner under a burst.
    if let Err(e) = s.set_recv_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SIP UDP receive buffer left at the default");
    }
    if let Err(e) = s.set_send_buffer_size(UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "SIP UDP send buffer left at the default");
    }
}

/// Largest SIP datagram accepted: the most an IPv4 UDP datagram can carry. IPv6 can carry 20
/// bytes more; such a datagram is answered `513 Message Too Large` (RFC 3261 §21.5.14) rather
/// than parsed, so a sender never waits for an answer that cannot come.
pub const MAX_UDP_MESSAGE: usize = 65_507;

/// Receive buffer: larger than any UDP payload, so an oversized datagram is seen, not cut.
const UDP_RECV_BUFFER: usize = 65_536;

async fn udp_loop(sock: Arc<UdpSocket>, t: Transports) {
    let mut buf = vec![0u8; UDP_RECV_BUFFER];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP port unreachable surfaces as an error on some platforms: keep serving.
            Err(_) => continue,
        };
        let data = &buf[..n];
        if data.iter().all(|b| b.is_ascii_whitespace()) {
            continue; // keep-alive
        }
        let peer = Peer {
            transport: Transport::Udp,
            addr: from,
        };
        if n > MAX_UDP_MESSAGE {
            t.too_large(data, peer);
            continue;
        }
        if !t.deliver(data, peer).await {
            return;
        }
    }
}

async fn accept_loop(lis: TcpListener, t: Transports) {
    loop {
        let (stream, remote) = match lis.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = t.tcp.gate.admit(remote.ip()) else {
            // Over a cap: closed at once, before any buffer exists.
            drop(stream);
            continue;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&t.conns).insert(remote, tx);
        let t2 = t.clone();
        let _ = stream.set_nodelay(true);
        let peer = Peer::new(Transport::Tcp, remote);
        tokio::spawn(async move { t2.run_connection(stream, peer, rx, Some(permit)).await });
    }
}

/// Accepts TLS connections: the handshake runs in the connection's own task (bounded by
/// [`tls::HANDSHAKE_TIMEOUT`]); the connection is usable for responses and requests to that
/// peer once it is done.
async fn tls_accept_loop(lis: TcpListener, acceptor: tokio_rustls::TlsAcceptor, t: Transports) {
    loop {
        let (stream, remote) = match lis.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tls accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // TLS connections share the SIP TCP caps: a handshake costs more than a TCP accept.
        let Some(permit) = t.tcp.gate.admit(remote.ip()) else {
            drop(stream);
            continue;
        };
        let t2 = t.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let stream =
                match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %remote, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %remote, "TLS handshake timed out");
                        return;
                    }
                };
            let (tx, rx) = mpsc::unbounded_channel();
            lock(&t2.conns).insert(remote, tx);
            t2.run_connection(stream, Peer::new(Transport::Tls, remote), rx, Some(permit))
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_limits() -> TcpLimits {
        TcpLimits {
            idle: Duration::from_secs(5),
            message_timeout: Duration::from_secs(5),
            max_message_bytes: 65536,
            gate: crate::guard::ConnGate::new(
                crate::metrics::Listener::SipTcp,
                16,
                16,
                crate::guard::FdBudget::new(64),
            ),
        }
    }

    /// IPv6 carries UDP payloads up to 65,527 bytes, 20 more than callvault accepts: such a
    /// datagram is answered 513 (with the error body), not dropped.
    #[tokio::test]
    async fn oversized_udp_datagram_is_answered_513() {
        let (events, _rx) = mpsc::channel(8);
        let listens = [ListenAddr {
            transport: Transport::Udp,
            addr: "[::1]:0".parse().unwrap(),
        }];
        let Ok(t) = Transports::bind(&listens, events, test_limits()).await else {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        };
        let server = t.local_addr(Transport::Udp).unwrap();
        let client = UdpSocket::bind("[::1]:0").await.unwrap();
        let port = client.local_addr().unwrap().port();
        let head = format!(
            "OPTIONS sip:x@[::1] SIP/2.0\r\nVia: SIP/2.0/UDP [::1]:{port};branch=z9hG4bKbig;rport\r\n\
             From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: big\r\nCSeq: 1 OPTIONS\r\nX-Pad: "
        );
        let tail = "\r\nContent-Length: 0\r\n\r\n";
        let size = MAX_UDP_MESSAGE + 13;
        let mut msg = head.into_bytes();
        msg.resize(size - tail.len(), b'p');
        msg.extend_from_slice(tail.as_bytes());
        client.send_to(&msg, server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf))
            .await
            .expect("an answer to the oversized datagram")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("SIP/2.0 513 Message Too Large\r\n"),
            "{text}"
        );
        assert!(text.contains("Call-ID: big\r\n"), "{text}");
        assert!(text.contains("message-too-large"), "{text}");
    }

    #[tokio::test]
    async fn sip_udp_sockets_get_a_large_receive_buffer() {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let before = socket2::SockRef::from(&sock).recv_buffer_size().unwrap();
        grow_buffers(&sock);
        let after = socket2::SockRef::from(&sock).recv_buffer_size().unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // Linux doubles the value asked for (bookkeeping) and caps it at rmem_max.
        if max > before {
            assert!(after > before, "{before} -> {after} (rmem_max {max})");
            assert!(after >= UDP_BUFFER_BYTES.min(max), "{after}");
        }
    }
}
