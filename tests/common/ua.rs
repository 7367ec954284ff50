//! A small SIP user agent for integration tests, over a real UDP socket on 127.0.0.1, built on
//! the crate's own message, dialog and URI types.
//!
//! One receiver thread per UA parses what arrives and hands it to the test through a channel.
//! It also absorbs UDP retransmissions: a request whose (branch, method) was already answered
//! gets the stored answer again, one not yet answered is dropped, and a retransmitted 2xx to an
//! INVITE we ACKed gets the ACK again. The test side waits for messages matching a predicate
//! ([`Ua::wait_for`]); what does not match is kept in a backlog for later waits, so nothing that
//! arrives out of the order a test expects is lost.
//!
//! [`Rtp`] is a bare RTP socket: send packets with given header fields, receive with arrival
//! times. [`Call`] is an established PCMU call A -> B through the server under test.
#![allow(dead_code)] // each test uses a different subset

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callvault::sip::dialog::Dialog;
use callvault::sip::message::{parse, HeaderAccess, Method, Request, Response, SipMessage};
use callvault::sip::uri::{NameAddr, Uri, Via};

/// Default wait for one SIP answer.
pub const T: Duration = Duration::from_secs(5);

type Shared<T> = Arc<Mutex<T>>;

pub struct Ua {
    pub user: String,
    pub domain: String,
    pub addr: SocketAddr,
    pub server: SocketAddr,
    sock: UdpSocket,
    rx: mpsc::Receiver<SipMessage>,
    backlog: VecDeque<SipMessage>,
    /// (branch, method) -> our answer, for retransmissions.
    answered: Shared<HashMap<(String, String), Vec<u8>>>,
    /// (Call-ID, CSeq number) of INVITEs whose 2xx we ACKed -> the ACK.
    acks: Shared<HashMap<(String, u32), Vec<u8>>>,
    stop: Arc<AtomicBool>,
    counter: u64,
}

fn key_of(req: &Request) -> Option<(String, String)> {
    let branch = req.top_via()?.branch()?.to_string();
    let method = match req.method {
        // The ACK of a non-2xx shares the INVITE's branch; keep them apart.
        Method::Ack => "ACK".to_string(),
        _ => req.cseq()?.method.to_string(),
    };
    Some((branch, method))
}

impl Ua {
    /// A UA for `user@domain` on a fresh 127.0.0.1 port, talking to `server`.
    pub fn new(user: &str, domain: &str, server: SocketAddr) -> Ua {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, rx) = mpsc::channel();
        let answered: Shared<HashMap<(String, String), Vec<u8>>> = Default::default();
        let acks: Shared<HashMap<(String, u32), Vec<u8>>> = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let sock = sock.try_clone().unwrap();
            let answered = answered.clone();
            let acks = acks.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen: HashSet<(String, String)> = HashSet::new();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let Ok(msg) = parse(&buf[..n]) else {
                        eprintln!("ua {addr}: unparsable datagram");
                        continue;
                    };
                    match &msg {
                        SipMessage::Request(req) => {
                            if let Some(k) = key_of(req) {
                                if let Some(resp) = answered.lock().unwrap().get(&k) {
                                    let _ = sock.send_to(resp, from);
                                    continue;
                                }
                                if !seen.insert(k) {
                                    continue; // retransmission, not answered yet
                                }
                            }
                        }
                        SipMessage::Response(resp) => {
                            if let (Some(cid), Some(cseq)) = (resp.call_id(), resp.cseq()) {
                                if cseq.method == Method::Invite && resp.status >= 200 {
                                    let ack = acks
                                        .lock()
                                        .unwrap()
                                        .get(&(cid.to_string(), cseq.seq))
                                        .cloned();
                                    if let Some(ack) = ack {
                                        let _ = sock.send_to(&ack, from);
                                        continue;
                                    }
                                }
                            }
                        }
                    }
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            });
        }
        Ua {
            user: user.into(),
            domain: domain.into(),
            addr,
            server,
            sock,
            rx,
            backlog: VecDeque::new(),
            answered,
            acks,
            stop,
            counter: 0,
        }
    }

    pub fn aor(&self) -> String {
        format!("sip:{}@{}", self.user, self.domain)
    }

    pub fn contact(&self) -> NameAddr {
        NameAddr::new(Uri::sip(
            Some(&self.user),
            &self.addr.ip().to_string(),
            Some(self.addr.port()),
        ))
    }

    fn token(&mut self) -> String {
        self.counter += 1;
        format!("{:x}{:x}", rand::random::<u32>(), self.counter)
    }

    pub fn new_via(&mut self) -> Via {
        let b = self.token();
        Via::parse(&format!(
            "SIP/2.0/UDP {};branch=z9hG4bK{b};rport",
            self.addr
        ))
        .unwrap()
    }

    /// Sends raw bytes to the server.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.server).unwrap();
    }

    pub fn send(&self, req: &Request) {
        self.send_raw(&req.to_bytes());
    }

    /// The next message matching `pred` (backlog first), within `timeout`.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&SipMessage) -> bool,
    ) -> Option<SipMessage> {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // At least one look at the channel, even with a zero timeout.
            match self.rx.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(m) if pred(&m) => return Some(m),
                Ok(m) => self.backlog.push_back(m),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return None,
            }
        }
    }

    /// The next request of `method` (optionally with this content type), within `timeout`.
    pub fn wait_request(
        &mut self,
        method: Method,
        content_type: Option<&str>,
        timeout: Duration,
    ) -> Option<Request> {
        let ct = content_type.map(str::to_ascii_lowercase);
        match self.wait_for(timeout, |m| match m {
            SipMessage::Request(r) => {
                r.method == method
                    && ct
                        .as_deref()
                        .is_none_or(|c| r.content_type().as_deref() == Some(c))
            }
            _ => false,
        })? {
            SipMessage::Request(r) => Some(r),
            _ => None,
        }
    }

    /// Like [`wait_request`](Self::wait_request), panicking with the backlog on timeout.
    pub fn expect_request(
        &mut self,
        method: Method,
        content_type: Option<&str>,
        timeout: Duration,
    ) -> Request {
        match self.wait_request(method.clone(), content_type, timeout) {
            Some(r) => r,
            None => panic!(
                "{}: no {method} ({content_type:?}) within {timeout:?}; backlog: {:#?}",
                self.user,
                self.backlog_summary()
            ),
        }
    }

    pub fn backlog_summary(&self) -> Vec<String> {
        self.backlog
            .iter()
            .map(|m| match m {
                SipMessage::Request(r) => format!(
                    "{} {} ({:?})",
                    r.method,
                    r.uri,
                    r.content_type().unwrap_or_default()
                ),
                SipMessage::Response(r) => format!(
                    "{} {} ({:?})",
                    r.status,
                    r.reason,
                    r.cseq().map(|c| c.to_string())
                ),
            })
            .collect()
    }

    /// The final response to the request sent with `branch`, within `timeout`.
    pub fn final_response(&mut self, branch: &str, timeout: Duration) -> Option<Response> {
        let b = branch.to_string();
        match self.wait_for(timeout, |m| match m {
            SipMessage::Response(r) => {
                r.status >= 200
                    && r.top_via().and_then(|v| v.branch().map(str::to_string)) == Some(b.clone())
            }
            _ => false,
        })? {
            SipMessage::Response(r) => Some(r),
            _ => None,
        }
    }

    /// Where a request in dialog `d` goes (RFC 3261 §8.1.2): the first route of its route
    /// set, else its remote target, as an IP-literal address (the server when it is a name).
    pub fn hop(&self, d: &Dialog) -> SocketAddr {
        uri_addr(d.next_hop()).unwrap_or(self.server)
    }

    /// Sends `req` to the server and waits for its final response (panics on timeout).
    pub fn transact(&mut self, req: &Request) -> Response {
        self.transact_to(req, self.server)
    }

    /// Sends `req` to `dest` and waits for its final response (panics on timeout).
    pub fn transact_to(&mut self, req: &Request, dest: SocketAddr) -> Response {
        let branch = req
            .top_via()
            .and_then(|v| v.branch().map(str::to_string))
            .expect("request without branch");
        self.sock.send_to(&req.to_bytes(), dest).unwrap();
        self.final_response(&branch, T).unwrap_or_else(|| {
            panic!(
                "{}: no final response to {} {} within {T:?}; backlog: {:#?}",
                self.user,
                req.method,
                req.uri,
                self.backlog_summary()
            )
        })
    }

    /// Answers a received request; the answer is kept for its retransmissions.
    pub fn respond(&mut self, req: &Request, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut resp = req.response(status, None);
        if status > 100 && req.to_tag().is_none() {
            let tag = self.token();
            resp.ensure_to_tag(&tag);
        }
        for (n, v) in headers {
            resp.headers.push(n.to_string(), v.to_string());
        }
        resp.body = Bytes::copy_from_slice(body);
        self.send_response(req, &resp);
    }

    pub fn send_response(&mut self, req: &Request, resp: &Response) {
        let bytes = resp.to_bytes();
        if let Some(k) = key_of(req) {
            self.answered.lock().unwrap().insert(k, bytes.clone());
        }
        // Responses go where the top Via says (§18.2.2: `received`/`rport`, else sent-by):
        // the server, or the proxy that forwarded the request.
        let dest = req
            .top_via()
            .and_then(|v| via_addr(&v))
            .unwrap_or(self.server);
        self.sock.send_to(&bytes, dest).unwrap();
    }

    /// REGISTER (loopback is a trusted peer: not challenged). Panics unless 200.
    pub fn register(&mut self) {
        self.register_with(&[]);
    }

    /// REGISTER with `extra` headers; the 200 (panics on anything else).
    pub fn register_with(&mut self, extra: &[(&str, &str)]) -> Response {
        let ruri = format!("sip:{}", self.domain);
        self.register_to(&ruri, extra)
    }

    /// REGISTER with Request-URI `ruri` (e.g. naming one node of a cluster behind a proxy).
    pub fn register_to(&mut self, ruri: &str, extra: &[(&str, &str)]) -> Response {
        let aor = self.aor();
        let mut req = Request::new(Method::Register, ruri.to_string());
        let via = self.new_via();
        let tag = self.token();
        let cid = self.token();
        req.headers.push("Via", via.to_string());
        req.headers.push("Max-Forwards", "70");
        req.headers.push("From", format!("<{aor}>;tag={tag}"));
        req.headers.push("To", format!("<{aor}>"));
        req.headers.push("Call-ID", cid);
        req.headers.push("CSeq", "1 REGISTER");
        req.headers.push("Contact", self.contact().to_string());
        req.headers.push("Expires", "300");
        for (n, v) in extra {
            req.headers.push(n.to_string(), v.to_string());
        }
        let resp = self.transact(&req);
        assert_eq!(resp.status, 200, "REGISTER {}: {resp:?}", self.user);
        resp
    }

    /// An out-of-dialog INVITE to `ruri` (To = `ruri`) with `extra` headers and an SDP body.
    pub fn invite_request(&mut self, ruri: &str, extra: &[(&str, &str)], sdp: &str) -> Request {
        let mut req = Request::new(Method::Invite, ruri.to_string());
        let via = self.new_via();
        let tag = self.token();
        let cid = format!("{}@ua", self.token());
        req.headers.push("Via", via.to_string());
        req.headers.push("Max-Forwards", "70");
        req.headers
            .push("From", format!("<{}>;tag={tag}", self.aor()));
        req.headers.push("To", format!("<{ruri}>"));
        req.headers.push("Call-ID", cid);
        req.headers.push("CSeq", "1 INVITE");
        req.headers.push("Contact", self.contact().to_string());
        for (n, v) in extra {
            req.headers.push(n.to_string(), v.to_string());
        }
        req.headers.push("Content-Type", "application/sdp");
        req.body = Bytes::from(sdp.to_string());
        req
    }

    /// Sends an INVITE and waits for its final answer; a 2xx is ACKed and gives a dialog, any
    /// other final answer is ACKed per §17.1.1.3.
    pub fn invite(&mut self, req: &Request) -> (Response, Option<Dialog>) {
        self.send(req);
        self.finish_invite(req)
    }

    /// The second half of [`invite`](Self::invite): for an INVITE already sent.
    pub fn finish_invite(&mut self, req: &Request) -> (Response, Option<Dialog>) {
        let branch = req
            .top_via()
            .and_then(|v| v.branch().map(str::to_string))
            .unwrap();
        let resp = self
            .final_response(&branch, T)
            .unwrap_or_else(|| panic!("{}: no answer to INVITE {}", self.user, req.uri));
        if (200..300).contains(&resp.status) {
            let d = Dialog::uac(req, &resp).expect("dialog from 2xx");
            self.ack_2xx(&d, req.cseq().unwrap().seq);
            (resp, Some(d))
        } else {
            // ACK of a non-2xx: same branch, the response's To.
            let mut ack = Request::new(Method::Ack, req.uri.clone());
            ack.headers
                .push("Via", req.headers.get("Via").unwrap().to_string());
            ack.headers.push("Max-Forwards", "70");
            ack.headers
                .push("From", req.headers.get("From").unwrap().to_string());
            ack.headers
                .push("To", resp.headers.get("To").unwrap().to_string());
            ack.headers
                .push("Call-ID", req.call_id().unwrap().to_string());
            ack.headers
                .push("CSeq", format!("{} ACK", req.cseq().unwrap().seq));
            self.send(&ack);
            (resp, None)
        }
    }

    fn ack_2xx(&mut self, d: &Dialog, cseq: u32) {
        let via = self.new_via();
        let ack = d.ack_for(cseq, via);
        let bytes = ack.to_bytes();
        self.acks
            .lock()
            .unwrap()
            .insert((d.id.call_id.clone(), cseq), bytes.clone());
        self.sock.send_to(&bytes, self.hop(d)).unwrap();
    }

    /// Answers a received INVITE `200 OK` with `sdp`; returns our (confirmed) dialog. The
    /// ACK arrives later as a request (see [`wait_request`](Self::wait_request)).
    pub fn accept_invite(&mut self, inv: &Request, sdp: &str) -> Dialog {
        self.accept_invite_with(inv, sdp, &[])
    }

    /// [`accept_invite`](Self::accept_invite) with `extra` headers in the 200 (the INVITE's
    /// Record-Route is in it already: `Request::response` copies it, §12.1.1).
    pub fn accept_invite_with(
        &mut self,
        inv: &Request,
        sdp: &str,
        extra: &[(&str, &str)],
    ) -> Dialog {
        let tag = self.token();
        let contact = self.contact();
        let mut d = Dialog::uas(inv, &tag, &contact).expect("UAS dialog");
        d.confirm();
        let mut resp = inv.response(200, None);
        resp.ensure_to_tag(&tag);
        resp.headers.push("Contact", contact.to_string());
        for (n, v) in extra {
            resp.headers.push(n.to_string(), v.to_string());
        }
        resp.headers.push("Content-Type", "application/sdp");
        resp.body = Bytes::from(sdp.to_string());
        self.send_response(inv, &resp);
        d
    }

    /// An in-dialog request (not sent).
    pub fn in_dialog_request(
        &mut self,
        d: &mut Dialog,
        method: Method,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Request {
        let via = self.new_via();
        let contact = self.contact();
        let mut req = d.new_request(method, &contact, via);
        for (n, v) in headers {
            req.headers.push(n.to_string(), v.to_string());
        }
        req.body = Bytes::copy_from_slice(body);
        req
    }

    /// Sends a request of dialog `d` to the dialog's next hop without waiting.
    pub fn send_in_dialog(&self, d: &Dialog, req: &Request) {
        self.sock.send_to(&req.to_bytes(), self.hop(d)).unwrap();
    }

    /// Sends an in-dialog request to the dialog's next hop and waits for its final response.
    pub fn in_dialog(
        &mut self,
        d: &mut Dialog,
        method: Method,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let req = self.in_dialog_request(d, method, headers, body);
        let hop = self.hop(d);
        self.transact_to(&req, hop)
    }

    pub fn bye(&mut self, d: &mut Dialog) -> Response {
        self.in_dialog(d, Method::Bye, &[], b"")
    }

    /// Sends `make(self, 1, None)`; when the server challenges it (401/407), sends once more
    /// `make(self, 2, Some((header, value)))` with digest credentials for this UA's user and
    /// `password` (cnonce "cn1", nc 1). The final answer.
    pub fn transact_with_digest(
        &mut self,
        password: &str,
        mut make: impl FnMut(&mut Ua, u32, Option<(&'static str, String)>) -> Request,
    ) -> Response {
        let first = make(self, 1, None);
        let mut resp = self.transact(&first);
        if resp.status == 401 || resp.status == 407 {
            let (hdr, ans) = if resp.status == 401 {
                ("WWW-Authenticate", "Authorization")
            } else {
                ("Proxy-Authenticate", "Proxy-Authorization")
            };
            let ch = resp.headers.get(hdr).expect("challenge").to_string();
            let authz = callvault::sip::auth::respond(
                &ch,
                &self.user,
                password,
                first.method.as_str(),
                &first.uri,
                "cn1",
                1,
            )
            .unwrap();
            let second = make(self, 2, Some((ans, authz)));
            resp = self.transact(&second);
        }
        resp
    }

    /// The next BYE in the dialog with this Call-ID, answered 200.
    pub fn expect_bye(&mut self, call_id: &str, timeout: Duration) -> Request {
        let m = self.wait_for(timeout, |m| {
            matches!(m, SipMessage::Request(r) if r.method == Method::Bye && r.call_id() == Some(call_id))
        });
        let Some(SipMessage::Request(bye)) = m else {
            panic!("{}: no BYE for {call_id} within {timeout:?}", self.user);
        };
        self.respond(&bye, 200, &[], b"");
        bye
    }
}

/// The address of a URI with an IP-literal host (port 5060 when absent).
pub fn uri_addr(uri: &Uri) -> Option<SocketAddr> {
    Some(SocketAddr::new(uri.host_ip()?, uri.port.unwrap_or(5060)))
}

/// Where a response to a request with this top Via goes (§18.2.2, RFC 3581).
fn via_addr(via: &Via) -> Option<SocketAddr> {
    let ip = match via.received() {
        Some(r) => r.parse().ok()?,
        None => via
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()?,
    };
    let port = match via.rport() {
        Some(Some(p)) => p,
        _ => via.port.unwrap_or(5060),
    };
    Some(SocketAddr::new(ip, port))
}

impl Drop for Ua {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// SDP

/// An audio offer/answer: `codecs` as (payload type, rtpmap) pairs, e.g. `(0, "PCMU/8000")`.
pub fn sdp(port: u16, codecs: &[(u8, &str)], direction: &str) -> String {
    let pts: Vec<String> = codecs.iter().map(|(pt, _)| pt.to_string()).collect();
    let mut s = format!(
        "v=0\r\no=ua 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP {}\r\n",
        pts.join(" ")
    );
    for (pt, map) in codecs {
        s.push_str(&format!("a=rtpmap:{pt} {map}\r\n"));
    }
    s.push_str(&format!("a={direction}\r\n"));
    s
}

/// (RTP address, direction attribute) of the audio stream of an SDP body.
pub fn sdp_audio(body: &[u8]) -> (SocketAddr, String) {
    let text = std::str::from_utf8(body).expect("SDP is UTF-8");
    let sdp = callvault::sdp::SessionDescription::parse(text).expect("SDP parses");
    let idx = sdp.find_media("audio").expect("audio m-line");
    let addr = sdp.connection_for(idx).expect("audio address");
    (addr, sdp.direction(idx).to_string())
}

// ---------------------------------------------------------------------------------------------
// RTP

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpPkt {
    pub pt: u8,
    pub marker: bool,
    pub seq: u16,
    pub ts: u32,
    pub ssrc: u32,
    pub payload: Vec<u8>,
    pub from: SocketAddr,
    pub at: Instant,
}

pub struct Rtp {
    pub sock: UdpSocket,
    pub port: u16,
}

impl Rtp {
    pub fn bind() -> Rtp {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        Rtp { sock, port }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        to: SocketAddr,
        pt: u8,
        marker: bool,
        seq: u16,
        ts: u32,
        ssrc: u32,
        payload: &[u8],
    ) {
        let mut p = Vec::with_capacity(12 + payload.len());
        p.push(0x80);
        p.push(pt | if marker { 0x80 } else { 0 });
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(payload);
        self.sock.send_to(&p, to).unwrap();
    }

    /// The next RTP packet (RTCP and garbage skipped) within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<RtpPkt> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let at = Instant::now();
            let b = &buf[..n];
            if n < 12 || b[0] >> 6 != 2 || (72..=76).contains(&(b[1] & 0x7f)) {
                continue;
            }
            let cc = (b[0] & 0x0f) as usize;
            let start = 12 + 4 * cc;
            if n < start {
                continue;
            }
            return Some(RtpPkt {
                pt: b[1] & 0x7f,
                marker: b[1] & 0x80 != 0,
                seq: u16::from_be_bytes([b[2], b[3]]),
                ts: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                ssrc: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
                payload: b[start..].to_vec(),
                from,
                at,
            });
        }
    }
}

/// Payload `i` of a test stream: 160 bytes that differ per packet (so order and loss show).
pub fn payload(i: u32) -> Vec<u8> {
    (0..160u32)
        .map(|j| (i.wrapping_mul(31).wrapping_add(j.wrapping_mul(7)) % 251) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Calls

pub const PCMU: &[(u8, &str)] = &[(0, "PCMU/8000")];

/// The store request's and the prompt's content types (PROTOCOL.md 2.1, 2.3).
pub const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
pub const PROMPT: &str = "application/vnd.callvault.prompt+json";

/// Step 11 to 12: the receiver (`b`, in its call dialog `bd`) asks for storage with the JSON
/// `request`; the request must be accepted (200) and the sender `a` prompted, which answers
/// 200. The prompt's JSON.
pub fn ask_for_storage(
    a: &mut Ua,
    b: &mut Ua,
    bd: &mut Dialog,
    request: &str,
) -> serde_json::Value {
    let r = b.in_dialog(
        bd,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        request.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p = a.expect_request(Method::Message, Some(PROMPT), T);
    a.respond(&p, 200, &[], b"");
    serde_json::from_slice(&p.body)
        .unwrap_or_else(|e| panic!("prompt JSON: {e}: {}", String::from_utf8_lossy(&p.body)))
}

/// An established call A -> B through the server (PCMU, sendrecv); B is registered from its
/// UA socket. Dropping it stops [`Call::keep_alive`].
pub struct Call {
    pub a: Ua,
    pub b: Ua,
    pub ad: Dialog,
    pub bd: Dialog,
    /// Where the server expects A's call media (its anchored port facing A).
    pub a_media_to: SocketAddr,
    pub a_media: Rtp,
    /// Where the server expects B's call media (its anchored port facing B), and B's socket.
    pub b_media_to: SocketAddr,
    pub b_media: Rtp,
    keepalive_stop: Arc<AtomicBool>,
}

impl Call {
    /// `a_user` calls `b_user` through the server at `server` (its SIP address).
    pub fn establish(server: SocketAddr, a_user: &str, b_user: &str) -> Call {
        Call::establish_with(server, a_user, b_user, &[], &[])
    }

    /// [`establish`](Self::establish) with `a_extra` headers in A's INVITE and `b_extra` in
    /// B's 200 (e.g. `Recv-Info: callvault`). `server` may be a proxy in front of callvault:
    /// both UAs send their out-of-dialog requests there, in-dialog ones to their route set.
    pub fn establish_with(
        server: SocketAddr,
        a_user: &str,
        b_user: &str,
        a_extra: &[(&str, &str)],
        b_extra: &[(&str, &str)],
    ) -> Call {
        let mut b = Ua::new(b_user, "example.com", server);
        b.register();
        let mut a = Ua::new(a_user, "example.com", server);
        let a_media = Rtp::bind();
        let b_media = Rtp::bind();
        let inv = a.invite_request(
            &format!("sip:{b_user}@example.com"),
            a_extra,
            &sdp(a_media.port, PCMU, "sendrecv"),
        );
        a.send(&inv);
        let binv = b.expect_request(Method::Invite, None, T);
        let (b_media_to, _) = sdp_audio(&binv.body);
        let bd = b.accept_invite_with(&binv, &sdp(b_media.port, PCMU, "sendrecv"), b_extra);
        let (resp, ad) = a.finish_invite(&inv);
        assert_eq!(resp.status, 200, "call {a_user} -> {b_user}: {resp:?}");
        assert!(ad.is_some());
        b.expect_request(Method::Ack, None, T);
        let (a_media_to, _) = sdp_audio(&resp.body);
        Call {
            a,
            b,
            ad: ad.unwrap(),
            bd,
            a_media_to,
            a_media,
            b_media_to,
            b_media,
            keepalive_stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// [`ask_for_storage`] in this call: B asks, A is prompted. The prompt's JSON.
    pub fn ask_for_storage(&mut self, request: &str) -> serde_json::Value {
        ask_for_storage(&mut self.a, &mut self.b, &mut self.bd, request)
    }

    /// One packet from A on the call's own media every 300 ms, so the call outlives long runs
    /// (or a server's short `rtp_timeout`) without tripping the relay's RTP timeout.
    pub fn keep_alive(&self) {
        let sock = self.a_media.sock.try_clone().unwrap();
        let to = self.a_media_to;
        let stop = self.keepalive_stop.clone();
        std::thread::spawn(move || {
            let mut seq = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42];
                p[2..4].copy_from_slice(&seq.to_be_bytes());
                p.extend_from_slice(&[0xff; 160]);
                let _ = sock.send_to(&p, to);
                seq = seq.wrapping_add(1);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.keepalive_stop.store(true, Ordering::Relaxed);
    }
}
