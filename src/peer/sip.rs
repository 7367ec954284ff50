//! `callvault peer serve` (PROTOCOL 3): registers the agent's UDP socket or TCP connection
//! (`--transport`) as the account's contact (digest on a 401, re-registering at half the
//! granted lifetime), answers share requests relayed by callvault with `{"forward":true}` (or
//! 403 with `--refuse`), and fetches every share offer it receives into the downloads folder,
//! printing one JSON line per fetch. On SIGTERM/SIGINT it removes its binding (REGISTER with
//! its Contact and `Expires: 0`, RFC 3261 10.2.2, through the digest challenge) before
//! exiting, so callvault answers share requests on the sharer's behalf at once instead of
//! relaying them to a contact that is gone until the binding expires.
//!
//! Over TCP the agent keeps one connection to callvault; callvault sends the requests for
//! this contact back over it (the registrar remembers the flow a REGISTER came on). A broken
//! connection is re-opened and the agent registers again.
//!
//! The message handling ([`answer`], [`register_request`], [`granted_expires`],
//! [`RegState::on_response`]) is pure; the loop in [`run_cli`] only moves bytes and timers.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use super::fetch::{advertised, fetch, random_peer_id, Announcer, FetchOptions, OfferBody};
use super::serve::PieceServer;
use super::IndexArg;
use super::{PeerError, ServeArgs, SipTransport};
use crate::sip::auth;
use crate::sip::message::{
    frame_stream, parse, Frame, HeaderAccess, Method, Request, Response, SipMessage,
};

pub(crate) const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
pub(crate) const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";

/// REGISTER is resent this often until answered (UDP loses datagrams).
const REG_RETRANSMIT: Duration = Duration::from_millis(500);
/// A REGISTER unanswered this long is abandoned and tried again after [`REG_RETRY`].
const REG_TIMEOUT: Duration = Duration::from_secs(16);
const REG_RETRY: Duration = Duration::from_secs(10);
/// How long shutdown waits for the un-REGISTER (and its challenge) to be answered.
const UNREGISTER_WAIT: Duration = Duration::from_secs(3);
/// Wait before re-opening a TCP connection that broke.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers kept for retransmitted requests.
const ANSWER_CACHE: usize = 256;

/// Who this agent is and where it is reached.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub user: String,
    pub domain: String,
    /// The local SIP socket (written into Via and Contact).
    pub local: SocketAddr,
    pub transport: SipTransport,
}

impl Identity {
    pub(crate) fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }
    pub(crate) fn registrar_uri(&self) -> String {
        format!("sip:{}", self.domain)
    }
    pub(crate) fn contact(&self) -> String {
        match self.transport {
            SipTransport::Udp => format!("<sip:{}@{}>", self.user, self.local),
            SipTransport::Tcp => format!("<sip:{}@{};transport=tcp>", self.user, self.local),
        }
    }
    fn via_transport(&self) -> &'static str {
        match self.transport {
            SipTransport::Udp => "UDP",
            SipTransport::Tcp => "TCP",
        }
    }
}

/// One REGISTER: the fields that change between sends.
#[derive(Debug, Clone)]
pub(crate) struct RegisterParams<'a> {
    pub call_id: &'a str,
    pub from_tag: &'a str,
    pub cseq: u32,
    pub branch: &'a str,
    pub expires: u32,
    pub authorization: Option<&'a str>,
}

/// The REGISTER of `id` (RFC 3261 10.2): same Call-ID and From tag for every refresh,
/// a new branch and CSeq per request.
pub(crate) fn register_request(id: &Identity, p: &RegisterParams<'_>) -> Request {
    let aor = id.aor();
    let mut req = Request::new(Method::Register, id.registrar_uri());
    req.headers.push(
        "Via",
        format!(
            "SIP/2.0/{} {};branch={};rport",
            id.via_transport(),
            id.local,
            p.branch
        ),
    );
    req.headers.push("Max-Forwards", "70");
    req.headers
        .push("From", format!("<{aor}>;tag={}", p.from_tag));
    req.headers.push("To", format!("<{aor}>"));
    req.headers.push("Call-ID", p.call_id.to_string());
    req.headers.push("CSeq", format!("{} REGISTER", p.cseq));
    req.headers.push("Contact", id.contact());
    req.headers.push("Expires", p.expires.to_string());
    if let Some(a) = p.authorization {
        req.headers.push("Authorization", a.to_string());
    }
    req.headers.push("User-Agent", "callvault-peer");
    req
}

/// The lifetime the registrar granted our contact: its `expires` param in the 200's Contact
/// list, else the Expires header, else what we asked for.
pub(crate) fn granted_expires(resp: &Response, id: &Identity, asked: u32) -> u32 {
    let ours = format!("{}", id.local);
    resp.contacts()
        .iter()
        .find(|c| c.uri.to_string().contains(&ours))
        .and_then(|c| c.to_string().split(';').find_map(expires_param))
        .or_else(|| resp.expires())
        .unwrap_or(asked)
}

fn expires_param(p: &str) -> Option<u32> {
    let (k, v) = p.trim().split_once('=')?;
    if k.trim().eq_ignore_ascii_case("expires") {
        v.trim().trim_matches('"').parse().ok()
    } else {
        None
    }
}

/// The `Authorization` for a 401/407 to a REGISTER: the first challenge we can answer
/// (callvault lists the strongest first).
pub(crate) fn answer_challenge(
    resp: &Response,
    user: &str,
    password: &str,
    uri: &str,
    cnonce: &str,
) -> Result<String, PeerError> {
    let mut last = String::from("no challenge in the 401");
    for v in resp
        .headers
        .get_all("WWW-Authenticate")
        .chain(resp.headers.get_all("Proxy-Authenticate"))
    {
        match auth::Challenge::parse(v) {
            Ok(_) => match auth::respond(v, user, password, "REGISTER", uri, cnonce, 1) {
                Ok(a) => return Ok(a),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(PeerError::Sip(last))
}

/// What an incoming request asks of the agent.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Answer and nothing else.
    Answered(Response),
    /// Answered 200; fetch this offer.
    Offer(Response, Box<OfferBody>),
    /// ACK: no answer.
    Ignore,
}

/// Answers an incoming request (`tag` is the To tag for out-of-dialog answers).
pub(crate) fn answer(req: &Request, refuse: bool, tag: &str) -> Inbound {
    let reply = |status: u16| {
        let mut r = req.response(status, None);
        r.ensure_to_tag(tag);
        r
    };
    match req.method {
        Method::Ack => Inbound::Ignore,
        Method::Message => match req.content_type().as_deref() {
            Some(SHARE_REQUEST) => {
                tracing::info!(
                    from = ?req.headers.get("From"),
                    body = %crate::secret::mask_tokens(&String::from_utf8_lossy(&req.body)),
                    refuse,
                    "share-request"
                );
                if refuse {
                    return Inbound::Answered(reply(403));
                }
                let mut r = reply(200);
                r.headers.push("Content-Type", "application/json");
                r.body = Bytes::from_static(br#"{"forward":true}"#);
                Inbound::Answered(r)
            }
            Some(SHARE_OFFER) => match serde_json::from_slice::<OfferBody>(&req.body) {
                Ok(o) => Inbound::Offer(reply(200), Box::new(o)),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable share offer");
                    Inbound::Answered(reply(400))
                }
            },
            // Other messages (prompts, ready notes, text) are acknowledged and logged.
            _ => {
                tracing::info!(
                    content_type = ?req.content_type(),
                    // Prompts and ready notes carry upload/download tokens.
                    body = %crate::secret::mask_tokens(&String::from_utf8_lossy(&req.body)),
                    "MESSAGE"
                );
                Inbound::Answered(reply(200))
            }
        },
        Method::Options => Inbound::Answered(reply(200)),
        _ => {
            let mut r = reply(405);
            r.headers.push("Allow", "MESSAGE, OPTIONS");
            Inbound::Answered(r)
        }
    }
}

/// The file an offer is written to: its name's last path component, else the content id.
pub(crate) fn download_path(dir: &Path, offer: &OfferBody) -> PathBuf {
    let name = offer
        .name
        .as_deref()
        .and_then(|n| n.rsplit(['/', '\\']).next())
        .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains('\0'))
        .unwrap_or(&offer.content_id);
    dir.join(name)
}

fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Registration progress (pure: [`RegState::request`] builds the next REGISTER,
/// [`RegState::on_response`] says what an answer means).
#[derive(Debug)]
pub(crate) struct RegState {
    call_id: String,
    from_tag: String,
    cseq: u32,
    /// The request in flight: branch, bytes, first sent, next resend.
    pending: Option<(String, Vec<u8>, Instant, Instant)>,
    /// Expires of the request in flight (0: un-REGISTER).
    pending_expires: u32,
    /// The challenge was answered once for this attempt (a second 401 is a bad password).
    authed: bool,
    next_register: Instant,
    /// A 2xx granted a binding that has not been removed since.
    registered: bool,
}

/// What an answer to our REGISTER asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RegStep {
    /// Not ours, or provisional.
    Ignore,
    /// Registered for this many seconds (0: the binding is removed).
    Done(u32),
    /// Send these bytes (the REGISTER again, with the digest answer).
    Send(Vec<u8>),
    /// Refused or unanswerable; retried later.
    Failed,
}

impl RegState {
    pub(crate) fn new(local: SocketAddr, now: Instant) -> RegState {
        RegState {
            call_id: format!("{}@{}", token(), local.ip()),
            from_tag: token(),
            cseq: 0,
            pending: None,
            pending_expires: 0,
            authed: false,
            next_register: now,
            registered: false,
        }
    }

    /// The next REGISTER (same Call-ID and From tag, CSeq + 1), recorded as in flight.
    /// Over a reliable transport it is never resent, only timed out.
    pub(crate) fn request(
        &mut self,
        id: &Identity,
        expires: u32,
        authorization: Option<&str>,
        now: Instant,
    ) -> Vec<u8> {
        self.cseq += 1;
        let branch = format!("z9hG4bK{}", token());
        let req = register_request(
            id,
            &RegisterParams {
                call_id: &self.call_id,
                from_tag: &self.from_tag,
                cseq: self.cseq,
                branch: &branch,
                expires,
                authorization,
            },
        );
        let bytes = req.to_bytes();
        let resend = match id.transport {
            SipTransport::Udp => REG_RETRANSMIT,
            SipTransport::Tcp => REG_TIMEOUT,
        };
        self.pending = Some((branch, bytes.clone(), now, now + resend));
        self.pending_expires = expires;
        bytes
    }

    /// Handles a response; `user`/`password` answer a challenge (once per attempt).
    pub(crate) fn on_response(
        &mut self,
        id: &Identity,
        user: &str,
        password: &str,
        resp: &Response,
        now: Instant,
    ) -> RegStep {
        let ours = match (&self.pending, resp.top_via()) {
            (Some((b, ..)), Some(v)) => v.branch() == Some(b.as_str()),
            _ => false,
        };
        if !ours || resp.is_provisional() {
            return RegStep::Ignore;
        }
        let asked = self.pending_expires;
        self.pending = None;
        match resp.status {
            200..=299 if asked == 0 => {
                self.registered = false;
                RegStep::Done(0)
            }
            200..=299 => {
                let granted = granted_expires(resp, id, asked).max(2);
                self.registered = true;
                // Refresh at half the lifetime, so a lost refresh still has time to be retried.
                self.next_register = now + Duration::from_secs(u64::from(granted / 2).max(1));
                RegStep::Done(granted)
            }
            401 | 407 if !self.authed => {
                match answer_challenge(resp, user, password, &id.registrar_uri(), &token()) {
                    Ok(authz) => {
                        self.authed = true;
                        RegStep::Send(self.request(id, asked, Some(&authz), now))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot answer the challenge");
                        self.next_register = now + REG_RETRY;
                        RegStep::Failed
                    }
                }
            }
            s => {
                tracing::warn!(status = s, reason = %resp.reason, "REGISTER refused");
                self.next_register = now + REG_RETRY;
                RegStep::Failed
            }
        }
    }
}

/// The SIP flow to callvault: a UDP socket, or a TCP connection with its framing buffer.
enum Link {
    /// The socket and a receive buffer kept across calls.
    Udp(UdpSocket, Vec<u8>),
    Tcp {
        stream: TcpStream,
        buf: BytesMut,
    },
}

impl Link {
    async fn open(t: SipTransport, bind: &str, target: SocketAddr) -> Result<Link, PeerError> {
        let listen = |e: std::io::Error| PeerError::Listen(format!("{bind}: {e}"));
        match t {
            SipTransport::Udp => Ok(Link::Udp(
                UdpSocket::bind(bind).await.map_err(listen)?,
                vec![0u8; 65536],
            )),
            SipTransport::Tcp => {
                let local = tokio::net::lookup_host(bind)
                    .await
                    .map_err(listen)?
                    .next()
                    .ok_or_else(|| PeerError::Usage(format!("--bind {bind}: no address")))?;
                let sock = if local.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(listen)?;
                // A fixed --bind port must be reusable right after a reconnect.
                sock.set_reuseaddr(true).map_err(listen)?;
                sock.bind(local).map_err(listen)?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(target))
                    .await
                    .map_err(|_| PeerError::Sip(format!("TCP connect to {target} timed out")))?
                    .map_err(|e| PeerError::Sip(format!("TCP connect to {target}: {e}")))?;
                let _ = stream.set_nodelay(true);
                Ok(Link::Tcp {
                    stream,
                    buf: BytesMut::with_capacity(8192),
                })
            }
        }
    }

    fn local(&self) -> std::io::Result<SocketAddr> {
        match self {
            Link::Udp(s, _) => s.local_addr(),
            Link::Tcp { stream, .. } => stream.local_addr(),
        }
    }

    /// Over TCP `to` is ignored: everything goes to callvault on the one connection.
    async fn send(&mut self, bytes: &[u8], to: SocketAddr) -> std::io::Result<()> {
        match self {
            Link::Udp(s, _) => s.send_to(bytes, to).await.map(|_| ()),
            Link::Tcp { stream, .. } => stream.write_all(bytes).await,
        }
    }

    /// The next message's bytes and sender. Cancel-safe (the TCP buffer keeps partial
    /// messages), so it can sit in a `select!`. A TCP error or EOF means the flow is gone.
    async fn recv(&mut self, target: SocketAddr) -> std::io::Result<(Vec<u8>, SocketAddr)> {
        match self {
            Link::Udp(s, buf) => {
                let (n, from) = s.recv_from(buf).await?;
                Ok((buf[..n].to_vec(), from))
            }
            Link::Tcp { stream, buf } => loop {
                match frame_stream(buf) {
                    Ok(Frame::Message(n)) => return Ok((buf.split_to(n).to_vec(), target)),
                    Ok(Frame::KeepAlive(n)) => {
                        let _ = buf.split_to(n);
                        continue;
                    }
                    Ok(Frame::Incomplete) => {}
                    Err(e) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("unframeable SIP stream: {e}"),
                        ))
                    }
                }
                if stream.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            },
        }
    }
}

/// `recv` on a link that may be down (then it never completes).
async fn recv_on(
    link: &mut Option<Link>,
    target: SocketAddr,
) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    match link {
        Some(l) => l.recv(target).await,
        None => std::future::pending().await,
    }
}

/// Sends on the link; a failure over TCP drops the link (it is re-opened), over UDP it is
/// only logged (the datagram is resent by the timers where that matters).
async fn send_on(link: &mut Option<Link>, bytes: &[u8], to: SocketAddr) {
    let Some(l) = link.as_mut() else {
        return;
    };
    if let Err(e) = l.send(bytes, to).await {
        match l {
            Link::Udp(..) => tracing::debug!(error = %e, %to, "send"),
            Link::Tcp { .. } => {
                tracing::warn!(error = %e, "SIP connection lost");
                *link = None;
            }
        }
    }
}

/// `callvault peer serve`.
pub(crate) async fn run_cli(a: ServeArgs) -> Result<(), PeerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let target = tokio::net::lookup_host(&a.sip)
        .await
        .map_err(|e| PeerError::Usage(format!("--sip {}: {e}", a.sip)))?
        .next()
        .ok_or_else(|| PeerError::Usage(format!("--sip {}: no address", a.sip)))?;
    let domain = a.domain.clone().unwrap_or_else(|| target.ip().to_string());
    // Before anything registers: a SIGTERM must always reach the un-REGISTER below.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let first = Link::open(a.transport, &a.bind, target).await?;
    let local = first.local()?;
    let mut link = Some(first);
    let mut id = Identity {
        user: a.user.clone(),
        domain,
        local,
        transport: a.transport,
    };
    std::fs::create_dir_all(&a.downloads)?;
    let pieces = PieceServer::new(false);
    let advertise = advertised(None, pieces.spawn(&a.listen).await?)?;
    let peer_id = random_peer_id();
    tracing::info!(aor = %id.aor(), sip = %local, transport = ?a.transport, pieces = %advertise, "peer serve");

    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Announcer>(16);
    // Announcers stay alive so fetched content keeps being served to other peers.
    let mut seeding: Vec<Announcer> = Vec::new();
    let mut answers: HashMap<String, Vec<u8>> = HashMap::new();
    let mut answer_order: VecDeque<String> = VecDeque::new();
    let mut reg = RegState::new(local, Instant::now());
    let mut reconnect_at = Instant::now();
    loop {
        let now = Instant::now();
        if link.is_none() && now >= reconnect_at {
            match Link::open(a.transport, &a.bind, target).await {
                Ok(l) => {
                    id.local = l.local()?;
                    tracing::info!(sip = %id.local, "SIP connection re-opened");
                    link = Some(l);
                    // A new flow (and contact): register it right away.
                    reg.pending = None;
                    reg.next_register = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "SIP connection");
                    reconnect_at = now + REG_RETRY;
                }
            }
        }
        if link.is_some() && reg.pending.is_none() && now >= reg.next_register {
            reg.authed = false;
            let bytes = reg.request(&id, a.expires, None, now);
            send_on(&mut link, &bytes, target).await;
        }
        let wake = match (&link, &reg.pending) {
            (None, _) => reconnect_at,
            (Some(_), Some((_, _, _, resend))) => *resend,
            (Some(_), None) => reg.next_register,
        };
        tokio::select! {
            r = recv_on(&mut link, target) => {
                let (bytes, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        if matches!(link, Some(Link::Tcp { .. })) {
                            tracing::warn!(error = %e, "SIP connection lost");
                            link = None;
                            reconnect_at = Instant::now() + RECONNECT_AFTER;
                        } else {
                            // ICMP errors from an earlier send surface here on some systems.
                            tracing::debug!(error = %e, "recv");
                        }
                        continue;
                    }
                };
                let msg = match parse(&bytes) {
                    Ok(m) => m,
                    Err(e) => { tracing::debug!(%from, error = %e, "unparsable message"); continue; }
                };
                match msg {
                    SipMessage::Response(resp) => {
                        match reg.on_response(&id, &a.user, &a.password, &resp, Instant::now()) {
                            RegStep::Send(b) => send_on(&mut link, &b, target).await,
                            RegStep::Done(granted) => {
                                tracing::info!(aor = %id.aor(), contact = %id.contact(), expires = granted, "registered");
                            }
                            RegStep::Ignore | RegStep::Failed => {}
                        }
                    }
                    SipMessage::Request(req) => {
                        let branch = req.top_via().and_then(|v| v.branch().map(str::to_string));
                        if let Some(bytes) = branch.as_ref().and_then(|b| answers.get(b)) {
                            let bytes = bytes.clone();
                            send_on(&mut link, &bytes, from).await;
                            continue;
                        }
                        let (resp, offer) = match answer(&req, a.refuse, &token()) {
                            Inbound::Ignore => continue,
                            Inbound::Answered(r) => (r, None),
                            Inbound::Offer(r, o) => (r, Some(o)),
                        };
                        let bytes = resp.to_bytes();
                        send_on(&mut link, &bytes, from).await;
                        if let Some(b) = branch {
                            if answer_order.len() >= ANSWER_CACHE {
                                if let Some(old) = answer_order.pop_front() {
                                    answers.remove(&old);
                                }
                            }
                            answer_order.push_back(b.clone());
                            answers.insert(b, bytes);
                        }
                        if let Some(offer) = offer {
                            start_fetch(&a, *offer, &pieces, &advertise, &peer_id, done_tx.clone());
                        }
                    }
                }
            }
            Some(ann) = done_rx.recv() => seeding.push(ann),
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                let resend = match &mut reg.pending {
                    Some((_, _, first, _)) if now.duration_since(*first) >= REG_TIMEOUT => {
                        tracing::warn!(registrar = %target, "REGISTER not answered");
                        reg.pending = None;
                        reg.next_register = now + REG_RETRY;
                        None
                    }
                    Some((_, bytes, _, resend)) if now >= *resend => {
                        *resend = now + REG_RETRANSMIT;
                        Some(bytes.clone())
                    }
                    _ => None,
                };
                if let Some(b) = resend {
                    send_on(&mut link, &b, target).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down");
    if reg.registered {
        unregister(&mut link, target, &id, &mut reg, &a).await;
    }
    drop(seeding);
    Ok(())
}

/// Removes this agent's binding: REGISTER with its Contact and `Expires: 0` (RFC 3261
/// 10.2.2; not `Contact: *`, which would also remove the account's other devices), answering
/// the digest challenge, waiting at most [`UNREGISTER_WAIT`].
async fn unregister(
    link: &mut Option<Link>,
    target: SocketAddr,
    id: &Identity,
    reg: &mut RegState,
    a: &ServeArgs,
) {
    let deadline = Instant::now() + UNREGISTER_WAIT;
    reg.authed = false;
    let bytes = reg.request(id, 0, None, Instant::now());
    send_on(link, &bytes, target).await;
    while link.is_some() {
        let resend = reg
            .pending
            .as_ref()
            .map_or(deadline, |(_, _, _, r)| *r)
            .min(deadline);
        tokio::select! {
            r = recv_on(link, target) => {
                let Ok((bytes, _)) = r else {
                    tracing::warn!("SIP connection lost before the un-REGISTER was answered");
                    return;
                };
                let Ok(SipMessage::Response(resp)) = parse(&bytes) else { continue };
                match reg.on_response(id, &a.user, &a.password, &resp, Instant::now()) {
                    RegStep::Send(b) => send_on(link, &b, target).await,
                    RegStep::Done(_) => {
                        tracing::info!(aor = %id.aor(), contact = %id.contact(), "unregistered");
                        return;
                    }
                    RegStep::Failed => return,
                    RegStep::Ignore => {}
                }
            }
            _ = tokio::time::sleep_until(resend) => {
                let now = Instant::now();
                if now >= deadline {
                    tracing::warn!("un-REGISTER not answered; the binding expires on its own");
                    return;
                }
                let again = match &mut reg.pending {
                    Some((_, bytes, _, r)) => {
                        *r = now + REG_RETRANSMIT;
                        Some(bytes.clone())
                    }
                    None => None,
                };
                if let Some(b) = again {
                    send_on(link, &b, target).await;
                }
            }
        }
    }
}

fn start_fetch(
    a: &ServeArgs,
    mut offer: OfferBody,
    pieces: &PieceServer,
    advertise: &str,
    peer_id: &str,
    done: tokio::sync::mpsc::Sender<Announcer>,
) {
    if let Some(s) = &a.server {
        offer.server_url = s.clone();
    }
    let out = download_path(&a.downloads, &offer);
    let mut o = FetchOptions::from_offer(&offer, out, peer_id);
    o.class = a.class;
    o.choose_index(&offer, a.index.map(IndexArg::as_str), &a.dht_bootstrap);
    let pieces = pieces.clone();
    let advertise = advertise.to_string();
    tokio::spawn(async move {
        tracing::info!(content = %o.content_id, out = %o.out.display(), "fetching offer");
        match fetch(&o, &pieces, &advertise).await {
            Ok((report, ann)) => {
                if let Ok(line) = serde_json::to_string(&report) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                let _ = done.send(ann).await;
            }
            Err(e) => tracing::warn!(content = %o.content_id, error = %e, "fetch failed"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            user: "1001".into(),
            domain: "example.com".into(),
            local: "127.0.0.1:40000".parse().unwrap(),
            transport: SipTransport::Udp,
        }
    }

    fn message(ct: &str, body: &str) -> Request {
        let raw = format!(
            "MESSAGE sip:1001@127.0.0.1:40000 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\n\
             From: <sip:1002@example.com>;tag=a\r\nTo: <sip:1001@example.com>\r\nCall-ID: c1\r\n\
             CSeq: 1 MESSAGE\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        match parse(raw.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    #[test]
    fn share_request_is_forwarded_or_refused() {
        let req = message(SHARE_REQUEST, r#"{"name":"a.bin"}"#);
        let Inbound::Answered(r) = answer(&req, false, "t1") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type().as_deref(), Some("application/json"));
        assert_eq!(&r.body[..], br#"{"forward":true}"#);
        assert_eq!(r.to_tag().as_deref(), Some("t1"));
        assert_eq!(r.call_id(), Some("c1"));
        let Inbound::Answered(r) = answer(&req, true, "t1") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 403);
    }

    #[test]
    fn offer_is_accepted_and_parsed_bad_offer_is_400() {
        let cid = "ab".repeat(32);
        let req = message(
            SHARE_OFFER,
            &format!(
                r#"{{"content_id":"{cid}","server_url":"http://127.0.0.1:1","name":"../x.bin","token":"t"}}"#
            ),
        );
        let Inbound::Offer(r, o) = answer(&req, false, "t") else {
            panic!("want an offer")
        };
        assert_eq!(r.status, 200);
        assert_eq!(o.content_id, cid);
        assert_eq!(download_path(Path::new("/d"), &o), Path::new("/d/x.bin"));
        let mut nameless = (*o).clone();
        nameless.name = Some("..".into());
        assert_eq!(
            download_path(Path::new("/d"), &nameless),
            Path::new("/d").join(&cid)
        );
        let Inbound::Answered(r) = answer(&message(SHARE_OFFER, "{"), false, "t") else {
            panic!("want an answer")
        };
        assert_eq!(r.status, 400);
    }

    #[test]
    fn register_answers_the_digest_challenge() {
        let id = id();
        let req = register_request(
            &id,
            &RegisterParams {
                call_id: "c",
                from_tag: "f",
                cseq: 1,
                branch: "z9hG4bKb",
                expires: 300,
                authorization: None,
            },
        );
        assert_eq!(req.uri, "sip:example.com");
        assert_eq!(
            req.headers.get("Contact"),
            Some("<sip:1001@127.0.0.1:40000>")
        );
        let mut r401 = req.response(401, None);
        r401.headers.push(
            "WWW-Authenticate",
            r#"Digest realm="example.com", nonce="n1", algorithm=MD5, qop="auth""#,
        );
        let authz = answer_challenge(&r401, "1001", "pw", "sip:example.com", "cn").unwrap();
        let c = auth::Credentials::parse(&authz).unwrap();
        assert_eq!((c.nc, c.qop.as_deref()), (Some(1), Some("auth")));
        let h1 = auth::ha1(auth::Algorithm::Md5, "1001", "example.com", "pw");
        let want = auth::compute_response(
            auth::Algorithm::Md5,
            &h1,
            "n1",
            1,
            "cn",
            "REGISTER",
            "sip:example.com",
        );
        assert_eq!(c.response, want);
        assert!(answer_challenge(&req.response(401, None), "1001", "pw", "u", "c").is_err());

        let mut ok = req.response(200, None);
        ok.headers
            .push("Contact", "<sip:1001@127.0.0.1:40000>;expires=120");
        assert_eq!(granted_expires(&ok, &id, 300), 120);
        let mut ok = req.response(200, None);
        ok.headers.push("Expires", "60");
        assert_eq!(granted_expires(&ok, &id, 300), 60);
        assert_eq!(granted_expires(&req.response(200, None), &id, 300), 300);
    }

    fn parse_request(bytes: &[u8]) -> Request {
        match parse(bytes).unwrap() {
            SipMessage::Request(r) => r,
            _ => panic!("not a request"),
        }
    }

    #[test]
    fn tcp_identity_says_tcp_in_via_and_contact() {
        let mut id = id();
        id.transport = SipTransport::Tcp;
        let mut reg = RegState::new(id.local, Instant::now());
        let req = parse_request(&reg.request(&id, 300, None, Instant::now()));
        assert!(req
            .headers
            .get("Via")
            .unwrap()
            .starts_with("SIP/2.0/TCP 127.0.0.1:40000;"));
        assert_eq!(
            req.headers.get("Contact"),
            Some("<sip:1001@127.0.0.1:40000;transport=tcp>")
        );
        // Reliable transport: no retransmission before the transaction timeout.
        let (_, _, first, resend) = reg.pending.clone().unwrap();
        assert_eq!(resend - first, REG_TIMEOUT);
    }

    /// Register (through the challenge), then un-REGISTER: same Call-ID, higher CSeq, our
    /// Contact with Expires 0, the challenge answered again.
    #[test]
    fn register_then_unregister_through_the_challenge() {
        let id = id();
        let t0 = Instant::now();
        let mut reg = RegState::new(id.local, t0);
        let challenge = |req: &Request| {
            let mut r = req.response(401, None);
            r.headers.push(
                "WWW-Authenticate",
                r#"Digest realm="example.com", nonce="n1", algorithm=MD5, qop="auth""#,
            );
            r
        };
        let first = parse_request(&reg.request(&id, 300, None, t0));
        let RegStep::Send(b) = reg.on_response(&id, "1001", "pw", &challenge(&first), t0) else {
            panic!("want the authenticated REGISTER")
        };
        let second = parse_request(&b);
        assert!(second.headers.get("Authorization").is_some());
        assert_eq!(second.headers.get("Expires"), Some("300"));
        let mut ok = second.response(200, None);
        ok.headers
            .push("Contact", "<sip:1001@127.0.0.1:40000>;expires=120");
        assert_eq!(
            reg.on_response(&id, "1001", "pw", &ok, t0),
            RegStep::Done(120)
        );
        assert!(reg.registered);
        assert_eq!(reg.next_register, t0 + Duration::from_secs(60));
        // A stray answer (other branch) is not ours.
        assert_eq!(reg.on_response(&id, "1001", "pw", &ok, t0), RegStep::Ignore);

        reg.authed = false;
        let un = parse_request(&reg.request(&id, 0, None, t0));
        assert_eq!(un.headers.get("Expires"), Some("0"));
        assert_eq!(
            un.headers.get("Contact"),
            Some("<sip:1001@127.0.0.1:40000>")
        );
        assert_eq!(un.call_id(), first.call_id());
        assert_eq!(un.headers.get("CSeq"), Some("3 REGISTER"));
        let RegStep::Send(b) = reg.on_response(&id, "1001", "pw", &challenge(&un), t0) else {
            panic!("want the authenticated un-REGISTER")
        };
        let un2 = parse_request(&b);
        assert_eq!(un2.headers.get("Expires"), Some("0"));
        assert!(un2.headers.get("Authorization").is_some());
        // A second challenge for the same attempt is a wrong password: give up.
        let mut reg2 = RegState::new(id.local, t0);
        reg2.authed = true;
        let r = parse_request(&reg2.request(&id, 0, None, t0));
        assert_eq!(
            reg2.on_response(&id, "1001", "pw", &challenge(&r), t0),
            RegStep::Failed
        );
        assert_eq!(
            reg.on_response(&id, "1001", "pw", &un2.response(200, None), t0),
            RegStep::Done(0)
        );
        assert!(!reg.registered);
    }
}
