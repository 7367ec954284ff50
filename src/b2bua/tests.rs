//! Engine tests: a fake caller "A" and a fake callee "B" exchange parsed SIP with the sans-IO
//! engine on a simulated clock. Everything the engine sends is re-parsed from its wire bytes, so
//! these tests see exactly what a peer would.

use crate::error_code::ErrorCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::engine::{AccountAuth, Engine, EngineConfig, EngineEvent, GuardConfig, RouteTarget};
use super::errors::ERROR_CONTENT_TYPE;
use super::media::{CallKey, FakeMedia, Side};
use crate::metrics::CallOutcome;
use crate::sdp::SessionDescription;
use crate::sip::auth::{self, Algorithm, NonceKey, Verifier};
use crate::sip::dialog::Dialog;
use crate::sip::message::{parse, HeaderAccess, Method, Request, Response, SipMessage};
use crate::sip::transaction::{build_ack, build_cancel, Peer, TimerConfig};
use crate::sip::transport::Transport;
use crate::sip::uri::{NameAddr, Via};

// ------------------------------------------------------------------------------------------
// Harness

/// The caller's phone.
const A: &str = "127.0.0.1:5061";
/// The callee's gateway, reached through the `[[route]]` with prefix "".
const B: &str = "127.0.0.1:5070";
/// Where A and B announce their RTP.
const A_MEDIA: (&str, u16) = ("127.0.0.2", 6000);
const B_MEDIA: (&str, u16) = ("127.0.0.3", 7000);
/// FakeMedia's first stream: A-facing and B-facing relay ports.
const PORT_A: u16 = 40000;
const PORT_B: u16 = 40002;
const A_TAG: &str = "a-tag-1";
const B_TAG: &str = "b-tag-1";
/// A starts its CSeq space far from ours so per-leg numbering is visible.
const A_CSEQ: u32 = 101;

fn peer(s: &str) -> Peer {
    Peer::new(Transport::Udp, s.parse().unwrap())
}

fn a() -> Peer {
    peer(A)
}

fn b() -> Peer {
    peer(B)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn config() -> EngineConfig {
    EngineConfig {
        domain: "example.com".into(),
        public_ip: "127.0.0.1".parse().unwrap(),
        udp_port: Some(5060),
        tcp_port: None,
        tls_port: None,
        digest_algorithms: vec![Algorithm::Md5],
        trusted: vec!["127.0.0.0/8".parse().unwrap()],
        routes: vec![RouteTarget {
            prefix: String::new(),
            peer: b(),
            host_port: B.into(),
        }],
        timers: TimerConfig::default(),
        registration_min_expires: 60,
        registration_max_expires: 3600,
        feature_code: "*7".into(),
        guard: GuardConfig::default(),
        srtp: crate::config::SrtpMode::Terminate,
    }
}

/// What the engine sent after one input, in order, re-parsed.
struct Sent(Vec<(Peer, SipMessage)>);

impl Sent {
    fn requests(&self, to: Peer) -> Vec<Request> {
        self.0
            .iter()
            .filter_map(|(p, m)| match m {
                SipMessage::Request(r) if *p == to => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn responses(&self, to: Peer) -> Vec<Response> {
        self.0
            .iter()
            .filter_map(|(p, m)| match m {
                SipMessage::Response(r) if *p == to => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn methods(&self, to: Peer) -> Vec<String> {
        self.requests(to)
            .iter()
            .map(|r| r.method.to_string())
            .collect()
    }

    fn statuses(&self, to: Peer) -> Vec<u16> {
        self.responses(to).iter().map(|r| r.status).collect()
    }

    /// The one request of `method` sent to `to`.
    fn request(&self, to: Peer, method: Method) -> Request {
        let mut v: Vec<Request> = self
            .requests(to)
            .into_iter()
            .filter(|r| r.method == method)
            .collect();
        assert_eq!(
            v.len(),
            1,
            "expected one {method} to {}, got {:?}",
            to.addr,
            self.methods(to)
        );
        v.remove(0)
    }

    /// The one response with `status` sent to `to`.
    fn response(&self, to: Peer, status: u16) -> Response {
        let mut v: Vec<Response> = self
            .responses(to)
            .into_iter()
            .filter(|r| r.status == status)
            .collect();
        assert_eq!(
            v.len(),
            1,
            "expected one {status} to {}, got {:?}",
            to.addr,
            self.statuses(to)
        );
        v.remove(0)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct Net {
    eng: Engine<FakeMedia>,
    now: Instant,
}

impl Net {
    fn new() -> Net {
        Net::with(config(), FakeMedia::new(16))
    }

    fn with(cfg: EngineConfig, media: FakeMedia) -> Net {
        let now = Instant::now();
        let verifier = Verifier::new(NonceKey::from_bytes([7; 32]), 300);
        Net {
            eng: Engine::new(cfg, media, verifier, (now, 1_800_000_000), 42),
            now,
        }
    }

    /// Delivers wire bytes from `from` and returns what the engine sent in reaction.
    fn send(&mut self, from: Peer, bytes: Vec<u8>) -> Sent {
        let msg = parse(&bytes).expect("test message parses");
        self.eng.handle_message(msg, from, self.now);
        self.drain()
    }

    fn req(&mut self, from: Peer, r: &Request) -> Sent {
        self.send(from, r.to_bytes())
    }

    fn resp(&mut self, from: Peer, r: &Response) -> Sent {
        self.send(from, r.to_bytes())
    }

    fn drain(&mut self) -> Sent {
        let mut v = Vec::new();
        while let Some(t) = self.eng.poll_transmit() {
            v.push((t.peer, parse(&t.data).expect("engine output parses")));
        }
        Sent(v)
    }

    fn events(&mut self) -> Vec<EngineEvent> {
        std::iter::from_fn(|| self.eng.poll_event()).collect()
    }

    /// Lets simulated time pass, firing every timer at its deadline in order.
    fn run_for(&mut self, d: Duration) -> Sent {
        let end = self.now + d;
        while let Some(t) = self.eng.poll_timeout() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.eng.handle_timeout(self.now);
        }
        self.now = end;
        self.eng.handle_timeout(end);
        self.drain()
    }

    fn media(&self) -> &FakeMedia {
        self.eng.media()
    }
}

static NEXT: AtomicU64 = AtomicU64::new(1);

fn via(addr: &str) -> Via {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Via::parse(&format!("SIP/2.0/UDP {addr};branch=z9hG4bKtest{n};rport")).unwrap()
}

fn a_contact() -> NameAddr {
    NameAddr::parse("<sip:1001@127.0.0.1:5061>").unwrap()
}

fn b_contact() -> NameAddr {
    NameAddr::parse("<sip:1002@127.0.0.1:5070>").unwrap()
}

fn sdp(media: (&str, u16), dir: &str, version: u32) -> String {
    let (ip, port) = media;
    format!(
        "v=0\r\no=- 100 {version} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n\
         m=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n\
         a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na={dir}\r\n"
    )
}

fn with_sdp<T: HeaderAccess>(m: &mut T, body: &str) -> Bytes {
    m.headers_mut().set("Content-Type", "application/sdp");
    Bytes::from(body.to_string())
}

/// An initial INVITE from A to `user`.
fn a_invite(call_id: &str, user: &str, body: Option<&str>) -> Request {
    let mut r = Request::new(Method::Invite, format!("sip:{user}@example.com"));
    r.headers.push("Via", via(A).to_string());
    r.headers.push("Max-Forwards", "70");
    r.headers.push(
        "From",
        format!("\"Alice\" <sip:1001@example.com>;tag={A_TAG}"),
    );
    r.headers.push("To", format!("<sip:{user}@example.com>"));
    r.headers.push("Call-ID", call_id);
    r.headers.push("CSeq", format!("{A_CSEQ} INVITE"));
    r.headers.push("Contact", a_contact().to_string());
    r.headers.push("X-Correlation", "abc 123; x=\"y, z\"");
    if let Some(body) = body {
        r.body = with_sdp(&mut r, body);
    }
    r
}

/// B's response to a request the engine sent it (initial INVITE: adds B's tag and Contact).
fn b_answer(req: &Request, status: u16, body: Option<&str>) -> Response {
    let mut r = req.response(status, None);
    if status > 100 {
        r.ensure_to_tag(B_TAG);
    }
    if (101..300).contains(&status) && req.method == Method::Invite {
        r.headers.push("Contact", b_contact().to_string());
    }
    if let Some(body) = body {
        r.body = with_sdp(&mut r, body);
    }
    r
}

/// A response of either party to an in-dialog request.
fn answer(req: &Request, status: u16, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut r = req.response(status, None);
    for (n, v) in headers {
        r.headers.push(*n, *v);
    }
    r.body = Bytes::copy_from_slice(body);
    r
}

/// The SDP points at our public address and `port`; apart from that (`o=`, `c=`, the `m=` port)
/// it is the original line for line: codecs and attributes untouched.
fn assert_anchored(body: &[u8], original: &str, port: u16) {
    let text = std::str::from_utf8(body).unwrap();
    let s = SessionDescription::parse(text).unwrap();
    assert_eq!(s.connection_for(0), Some(sa("127.0.0.1", port)), "{text}");
    assert!(text.contains("c=IN IP4 127.0.0.1\r\n"), "{text}");
    let strip = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("c=") && !l.starts_with("o="))
            .map(|l| {
                if l.starts_with("m=") {
                    let mut f: Vec<&str> = l.split(' ').collect();
                    f.remove(1);
                    f.join(" ")
                } else {
                    l.to_string()
                }
            })
            .collect()
    };
    assert_eq!(strip(text), strip(original));
}

fn cseq(m: &impl HeaderAccess) -> String {
    m.headers().get("CSeq").unwrap().to_string()
}

/// An established call and both parties' views of their dialogs.
struct Up {
    key: CallKey,
    a_invite: Request,
    /// A's side of leg A (A is its UAC).
    a_dialog: Dialog,
    /// The INVITE as B received it.
    b_invite: Request,
    /// B's side of leg B (B is its UAS).
    b_dialog: Dialog,
    /// The ACK the engine sent B.
    b_ack: Request,
}

/// INVITE, 180, 200, ACK; asserts only what every other test relies on.
fn call_up(net: &mut Net, call_id: &str) -> Up {
    let a_invite = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let out = net.req(a(), &a_invite);
    let b_invite = out.request(b(), Method::Invite);
    net.resp(b(), &b_answer(&b_invite, 180, None));
    let out = net.resp(
        b(),
        &b_answer(&b_invite, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
    );
    let ok = out.response(a(), 200);
    let key = net
        .events()
        .iter()
        .find_map(|e| match e {
            EngineEvent::CallAnswered(k) => Some(*k),
            _ => None,
        })
        .expect("CallAnswered");
    let a_dialog = Dialog::uac(&a_invite, &ok).unwrap();
    let out = net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));
    let b_ack = out.request(b(), Method::Ack);
    let b_dialog = Dialog::uas(&b_invite, B_TAG, &b_contact()).unwrap();
    Up {
        key,
        a_invite,
        a_dialog,
        b_invite,
        b_dialog,
        b_ack,
    }
}

/// An in-dialog request from A on leg A.
fn from_a(up: &mut Up, method: Method) -> Request {
    up.a_dialog.new_request(method, &a_contact(), via(A))
}

/// An in-dialog request from B on leg B.
fn from_b(up: &mut Up, method: Method) -> Request {
    up.b_dialog.new_request(method, &b_contact(), via(B))
}

fn error_code(resp: &Response) -> String {
    assert_eq!(resp.content_type().as_deref(), Some(ERROR_CONTENT_TYPE));
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let code = v["error"].as_str().unwrap().to_string();
    let warning = resp.headers.get("Warning").expect("Warning header");
    assert!(warning.starts_with("399 "), "{warning}");
    assert!(warning.ends_with(&format!("\"{code}\"")), "{warning}");
    code
}

// ------------------------------------------------------------------------------------------
// Basic call

#[test]
fn basic_call_end_to_end() {
    let mut net = Net::new();
    let offer = sdp(A_MEDIA, "sendrecv", 1);
    let inv = a_invite("call-basic@a", "1002", Some(&offer));

    // INVITE: 100 to A, a new INVITE on leg B.
    let out = net.req(a(), &inv);
    assert_eq!(out.statuses(a()), vec![100]);
    let b_inv = out.request(b(), Method::Invite);
    assert_eq!(b_inv.uri, "sip:1002@127.0.0.1:5070");
    assert_ne!(b_inv.call_id(), inv.call_id());
    assert!(b_inv.call_id().unwrap().len() >= 16);
    let b_from = b_inv.from_hdr().unwrap();
    assert_eq!(b_from.uri.to_string(), "sip:1001@example.com");
    assert!(b_from.tag().is_some_and(|t| t != A_TAG));
    assert_eq!(b_inv.to_tag(), None);
    assert_eq!(cseq(&b_inv), "1 INVITE");
    assert_eq!(b_inv.max_forwards(), Some(69));
    let vias = b_inv.vias();
    assert_eq!(vias.len(), 1, "A's Via must not leak onto leg B");
    assert_eq!(
        (vias[0].host.as_str(), vias[0].port),
        ("127.0.0.1", Some(5060))
    );
    assert!(vias[0].branch().unwrap().starts_with("z9hG4bK"));
    let contacts = b_inv.contacts();
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].uri.to_string(), "sip:callvault@127.0.0.1:5060");
    assert_eq!(
        b_inv.headers.get("X-Correlation"),
        Some("abc 123; x=\"y, z\"")
    );
    assert_anchored(&b_inv.body, &offer, PORT_B);
    assert_eq!(net.eng.active_calls(), 1);
    assert_eq!(
        net.media().remote(1, 0, Side::A),
        Some(sa(A_MEDIA.0, A_MEDIA.1))
    );

    // 180 relayed with A's own tag.
    let out = net.resp(b(), &b_answer(&b_inv, 180, None));
    let ringing = out.response(a(), 180);
    assert!(out.requests(b()).is_empty());
    let a_side_tag = ringing.to_tag().unwrap();
    assert_ne!(a_side_tag, B_TAG);
    assert_eq!(ringing.call_id(), inv.call_id());
    assert_eq!(cseq(&ringing), format!("{A_CSEQ} INVITE"));

    // 200 with the answer re-anchored towards A; media remotes from both SDPs, timeout armed.
    let answer_sdp = sdp(B_MEDIA, "sendrecv", 1);
    let out = net.resp(b(), &b_answer(&b_inv, 200, Some(&answer_sdp)));
    let ok = out.response(a(), 200);
    assert!(out.requests(b()).is_empty(), "leg B's ACK waits for A's");
    assert_eq!(ok.to_tag().as_deref(), Some(a_side_tag.as_str()));
    assert_eq!(
        ok.contacts()[0].uri.to_string(),
        "sip:callvault@127.0.0.1:5060"
    );
    assert_anchored(&ok.body, &answer_sdp, PORT_A);
    let key = 1;
    assert_eq!(
        net.media().remote(key, 0, Side::A),
        Some(sa(A_MEDIA.0, A_MEDIA.1))
    );
    assert_eq!(
        net.media().remote(key, 0, Side::B),
        Some(sa(B_MEDIA.0, B_MEDIA.1))
    );
    assert_eq!(net.media().armed, vec![key]);
    assert_eq!(net.events(), vec![EngineEvent::CallAnswered(key)]);

    // ACK from A -> ACK on leg B for CSeq 1.
    let mut a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let out = net.req(a(), &a_dialog.ack_for(A_CSEQ, via(A)));
    let ack = out.request(b(), Method::Ack);
    assert!(out.responses(a()).is_empty());
    assert_eq!(cseq(&ack), "1 ACK");
    assert_eq!(ack.uri, "sip:1002@127.0.0.1:5070");
    assert_eq!(ack.call_id(), b_inv.call_id());
    assert_eq!(ack.to_tag().as_deref(), Some(B_TAG));
    assert_eq!(ack.from_tag(), b_inv.from_tag());

    // BYE from A -> 200 to A and BYE on leg B; the call is gone.
    let mut b_dialog = Dialog::uas(&b_inv, B_TAG, &b_contact()).unwrap();
    let bye = a_dialog.new_request(Method::Bye, &a_contact(), via(A));
    let out = net.req(a(), &bye);
    assert_eq!(cseq(&out.response(a(), 200)), format!("{} BYE", A_CSEQ + 1));
    let b_bye = out.request(b(), Method::Bye);
    b_dialog.on_request(&b_bye).unwrap();
    assert_eq!(cseq(&b_bye), "2 BYE");
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty(), "media released");
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(key, CallOutcome::Answered)]
    );

    // B's 200 to that BYE ends it quietly.
    let out = net.resp(b(), &answer(&b_bye, 200, &[], b""));
    assert!(out.is_empty());
}

#[test]
fn bye_from_b_is_relayed_to_a() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-byeb@a");
    let bye = from_b(&mut up, Method::Bye);
    let out = net.req(b(), &bye);
    out.response(b(), 200);
    let a_bye = out.request(a(), Method::Bye);
    up.a_dialog.on_request(&a_bye).unwrap();
    assert_eq!(a_bye.uri, "sip:1001@127.0.0.1:5061");
    assert_eq!(cseq(&a_bye), "1 BYE");
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
}

// ------------------------------------------------------------------------------------------
// Mid-call requests

#[test]
fn reinvite_hold_is_reanchored_answered_and_acked() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-hold@a");
    let hold = sdp(A_MEDIA, "sendonly", 2);
    let mut reinv = from_a(&mut up, Method::Invite);
    reinv.body = with_sdp(&mut reinv, &hold);

    let out = net.req(a(), &reinv);
    assert_eq!(out.statuses(a()), vec![100]);
    let b_reinv = out.request(b(), Method::Invite);
    up.b_dialog.on_request(&b_reinv).unwrap();
    assert_eq!(cseq(&b_reinv), "2 INVITE");
    assert!(std::str::from_utf8(&b_reinv.body)
        .unwrap()
        .contains("a=sendonly"));
    assert_anchored(&b_reinv.body, &hold, PORT_B);

    let resume = sdp(B_MEDIA, "recvonly", 2);
    let out = net.resp(
        b(),
        &answer(
            &b_reinv,
            200,
            &[("Content-Type", "application/sdp")],
            resume.as_bytes(),
        ),
    );
    let ok = out.response(a(), 200);
    assert_eq!(cseq(&ok), format!("{} INVITE", A_CSEQ + 1));
    assert_anchored(&ok.body, &resume, PORT_A);
    assert_eq!(
        net.media().streams[&up.key].len(),
        1,
        "same relay, same ports"
    );

    let ack = up.a_dialog.ack_for(A_CSEQ + 1, via(A));
    let out = net.req(a(), &ack);
    let b_ack = out.request(b(), Method::Ack);
    assert_eq!(cseq(&b_ack), "2 ACK");
    assert_eq!(b_ack.to_tag().as_deref(), Some(B_TAG));
}

#[test]
fn update_is_relayed_with_sdp_reanchored() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-update@a");
    let offer = sdp(("127.0.0.2", 6010), "sendrecv", 2);
    let mut upd = from_a(&mut up, Method::Update);
    upd.body = with_sdp(&mut upd, &offer);

    let out = net.req(a(), &upd);
    let b_upd = out.request(b(), Method::Update);
    up.b_dialog.on_request(&b_upd).unwrap();
    assert_eq!(cseq(&b_upd), "2 UPDATE");
    assert_anchored(&b_upd.body, &offer, PORT_B);
    assert_eq!(
        net.media().remote(up.key, 0, Side::A),
        Some(sa("127.0.0.2", 6010))
    );

    let ans = sdp(("127.0.0.3", 7010), "sendrecv", 2);
    let out = net.resp(
        b(),
        &answer(
            &b_upd,
            200,
            &[("Content-Type", "application/sdp")],
            ans.as_bytes(),
        ),
    );
    let ok = out.response(a(), 200);
    assert_eq!(cseq(&ok), format!("{} UPDATE", A_CSEQ + 1));
    assert_anchored(&ok.body, &ans, PORT_A);
    assert_eq!(
        net.media().remote(up.key, 0, Side::B),
        Some(sa("127.0.0.3", 7010))
    );
}

/// Sends `req` from `from` and checks the copy on the other leg: method, headers and body
/// byte for byte, CSeq in the other leg's own space. Then relays `status` back the same way.
fn relay_round_trip(net: &mut Net, up: &mut Up, from_side: Side, req: Request, want_cseq: u32) {
    let (from, to) = match from_side {
        Side::A => (a(), b()),
        Side::B => (b(), a()),
    };
    let out = net.req(from, &req);
    let relayed = out.request(to, req.method.clone());
    match from_side {
        Side::A => up.b_dialog.on_request(&relayed).unwrap(),
        Side::B => up.a_dialog.on_request(&relayed).unwrap(),
    }
    assert_eq!(cseq(&relayed), format!("{want_cseq} {}", req.method));
    for name in ["X-Custom", "Content-Type"] {
        assert_eq!(relayed.headers.get(name), req.headers.get(name), "{name}");
    }
    assert_eq!(relayed.body, req.body);

    let reply_body: &[u8] = b"reply \x00\xfe bytes";
    let resp = answer(
        &relayed,
        200,
        &[
            ("X-Reply", "yes; it=\"worked\""),
            ("Content-Type", "application/x-reply"),
        ],
        reply_body,
    );
    let out = net.resp(to, &resp);
    let back = out.response(from, 200);
    assert_eq!(cseq(&back), cseq(&req));
    assert_eq!(back.headers.get("X-Reply"), Some("yes; it=\"worked\""));
    assert_eq!(
        back.headers.get("Content-Type"),
        Some("application/x-reply")
    );
    assert_eq!(&back.body[..], reply_body);
}

fn custom(mut r: Request, ct: &str, body: &[u8]) -> Request {
    r.headers.push("X-Custom", "v1, v2; p=\"q r\";lr");
    r.headers.push("Content-Type", ct);
    r.body = Bytes::copy_from_slice(body);
    r
}

#[test]
fn info_and_message_relayed_both_ways_with_per_leg_cseq() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-info@a");
    // B counts its own CSeq from 500 on, A from 101: leg numbers are independent.
    up.b_dialog.local_seq = 500;

    let r = custom(
        from_a(&mut up, Method::Info),
        "application/x-thing; charset=utf-8",
        b"line1\r\nline2 \xc3\xa9 \x00\xff",
    );
    assert_eq!(cseq(&r), "102 INFO");
    relay_round_trip(&mut net, &mut up, Side::A, r, 2);

    let r = custom(
        from_b(&mut up, Method::Message),
        "text/plain;charset=UTF-8",
        "hello A \u{1F600}".as_bytes(),
    );
    assert_eq!(cseq(&r), "501 MESSAGE");
    relay_round_trip(&mut net, &mut up, Side::B, r, 1);

    let r = custom(from_a(&mut up, Method::Message), "text/plain", b"hello B");
    relay_round_trip(&mut net, &mut up, Side::A, r, 3);

    let r = custom(
        from_b(&mut up, Method::Info),
        "application/dtmf-relay",
        b"Signal=5\r\nDuration=160\r\n",
    );
    relay_round_trip(&mut net, &mut up, Side::B, r, 2);
}

#[test]
fn options_in_dialog_is_relayed() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-options@a");
    let opt = from_a(&mut up, Method::Options);
    let out = net.req(a(), &opt);
    let b_opt = out.request(b(), Method::Options);
    up.b_dialog.on_request(&b_opt).unwrap();
    assert_eq!(cseq(&b_opt), "2 OPTIONS");
    let out = net.resp(
        b(),
        &answer(&b_opt, 200, &[("Allow", "INVITE, ACK, BYE, X-B-ONLY")], b""),
    );
    let ok = out.response(a(), 200);
    assert_eq!(ok.headers.get("Allow"), Some("INVITE, ACK, BYE, X-B-ONLY"));
    assert_eq!(cseq(&ok), format!("{} OPTIONS", A_CSEQ + 1));
}

// ------------------------------------------------------------------------------------------
// CANCEL

#[test]
fn cancel_after_provisional() {
    let mut net = Net::new();
    let inv = a_invite("call-cancel@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);
    net.resp(b(), &b_answer(&b_inv, 180, None))
        .response(a(), 180);

    let out = net.req(a(), &build_cancel(&inv));
    assert_eq!(out.statuses(a()), vec![200, 487]);
    let c487 = out.response(a(), 487);
    assert_eq!(cseq(&c487), format!("{A_CSEQ} INVITE"));
    let b_cancel = out.request(b(), Method::Cancel);
    assert_eq!(cseq(&b_cancel), "1 CANCEL");
    assert_eq!(b_cancel.call_id(), b_inv.call_id());
    assert_eq!(
        b_cancel.top_via().unwrap().branch(),
        b_inv.top_via().unwrap().branch()
    );
    assert!(net.media().streams.is_empty());
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(1, CallOutcome::Cancelled)]
    );

    // B: 200 to the CANCEL (absorbed), 487 to the INVITE (ACKed by us).
    assert!(net.resp(b(), &b_answer(&b_cancel, 200, None)).is_empty());
    let out = net.resp(b(), &b_answer(&b_inv, 487, None));
    let ack = out.request(b(), Method::Ack);
    assert_eq!(cseq(&ack), "1 ACK");
    assert_eq!(
        ack.top_via().unwrap().branch(),
        b_inv.top_via().unwrap().branch()
    );
    assert!(out.responses(a()).is_empty(), "A already has its 487");
    assert_eq!(net.eng.active_calls(), 0);

    // A ACKs its 487: absorbed.
    assert!(net.req(a(), &build_ack(&inv, &c487)).is_empty());
}

#[test]
fn cancel_before_provisional_waits_for_it() {
    let mut net = Net::new();
    let inv = a_invite("call-cancel-early@a", "1002", None);
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);

    let out = net.req(a(), &build_cancel(&inv));
    assert_eq!(out.statuses(a()), vec![200, 487]);
    assert!(
        out.requests(b()).is_empty(),
        "no CANCEL before a provisional (§9.1)"
    );

    let out = net.resp(b(), &b_answer(&b_inv, 180, None));
    out.request(b(), Method::Cancel);
    assert!(out.responses(a()).is_empty(), "no 180 after the 487");
    net.resp(b(), &b_answer(&b_inv, 487, None))
        .request(b(), Method::Ack);
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn late_2xx_after_cancel_gets_ack_and_bye() {
    let mut net = Net::new();
    let inv = a_invite("call-late@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);
    net.resp(
        b(),
        &b_answer(&b_inv, 183, Some(&sdp(B_MEDIA, "sendrecv", 1))),
    );
    let out = net.req(a(), &build_cancel(&inv));
    out.request(b(), Method::Cancel);

    // B had already answered: its 200 crosses our CANCEL.
    let out = net.resp(
        b(),
        &b_answer(&b_inv, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
    );
    assert!(out.responses(a()).is_empty());
    assert_eq!(out.methods(b()), vec!["ACK", "BYE"]);
    let ack = out.request(b(), Method::Ack);
    assert_eq!(cseq(&ack), "1 ACK");
    assert_eq!(ack.to_tag().as_deref(), Some(B_TAG));
    assert_eq!(ack.uri, "sip:1002@127.0.0.1:5070");
    let bye = out.request(b(), Method::Bye);
    let mut b_dialog = Dialog::uas(&b_inv, B_TAG, &b_contact()).unwrap();
    b_dialog.on_request(&bye).unwrap();
    assert_eq!(cseq(&bye), "2 BYE");
    assert_eq!(net.eng.active_calls(), 0);
}

// ------------------------------------------------------------------------------------------
// Failures on leg B

/// Sends a call towards B and returns A's INVITE and B's copy.
fn ringing(net: &mut Net, call_id: &str) -> (Request, Request) {
    let inv = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);
    (inv, b_inv)
}

#[test]
fn busy_486_is_relayed() {
    let mut net = Net::new();
    let (_, b_inv) = ringing(&mut net, "call-busy@a");
    let out = net.resp(b(), &b_answer(&b_inv, 486, None));
    let busy = out.response(a(), 486);
    assert!(busy.to_tag().is_some());
    assert_eq!(cseq(&busy), format!("{A_CSEQ} INVITE"));
    assert_eq!(cseq(&out.request(b(), Method::Ack)), "1 ACK");
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(1, CallOutcome::Failed)]
    );
}

#[test]
fn no_answer_times_out_with_408() {
    let mut net = Net::new();
    let (_, b_inv) = ringing(&mut net, "call-noanswer@a");
    let out = net.run_for(Duration::from_secs(31));
    assert!(out.responses(a()).is_empty());
    assert!(out
        .requests(b())
        .iter()
        .all(|r| r.method == Method::Invite && r.call_id() == b_inv.call_id()));
    assert!(out.requests(b()).len() >= 5, "Timer A retransmissions");
    // Timer B fires at 64*T1 = 32 s; stop before the 408 is retransmitted (Timer G).
    let out = net.run_for(Duration::from_millis(1100));
    let timeout = out.response(a(), 408);
    assert!(timeout.to_tag().is_some());
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
}

#[test]
fn unreachable_callee_gives_480() {
    let mut net = Net::new();
    ringing(&mut net, "call-unreach@a");
    net.eng.handle_unreachable(b(), net.now);
    let out = net.drain();
    out.response(a(), 480);
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn b_503_stays_503() {
    let mut net = Net::new();
    let (_, b_inv) = ringing(&mut net, "call-503@a");
    let mut resp = b_answer(&b_inv, 503, None);
    resp.headers.push("Retry-After", "30");
    let out = net.resp(b(), &resp);
    let r = out.response(a(), 503);
    assert_eq!(r.headers.get("Retry-After"), Some("30"));
}

#[test]
fn b_auth_challenges_become_403() {
    for status in [401, 407] {
        let mut net = Net::new();
        let (_, b_inv) = ringing(&mut net, "call-b-auth@a");
        let mut resp = b_answer(&b_inv, status, None);
        let hdr = if status == 401 {
            "WWW-Authenticate"
        } else {
            "Proxy-Authenticate"
        };
        resp.headers.push(hdr, "Digest realm=\"gw\", nonce=\"abc\"");
        let out = net.resp(b(), &resp);
        let r = out.response(a(), 403);
        assert!(
            !r.headers.has(hdr),
            "the far end's challenge is not the caller's business"
        );
        assert_eq!(net.eng.active_calls(), 0);
    }
}

// ------------------------------------------------------------------------------------------
// Errors callvault decides itself

#[test]
fn in_dialog_request_with_unknown_tags_gets_481() {
    let mut net = Net::new();
    let mut bye = Request::new(Method::Bye, "sip:callvault@127.0.0.1:5060");
    bye.headers.push("Via", via(A).to_string());
    bye.headers
        .push("From", "<sip:1001@example.com>;tag=nobody");
    bye.headers.push("To", "<sip:1002@example.com>;tag=nothing");
    bye.headers.push("Call-ID", "unknown@a");
    bye.headers.push("CSeq", "5 BYE");
    assert_eq!(net.req(a(), &bye).statuses(a()), vec![481]);

    // Right Call-ID and To tag, but a From tag that is not the dialog's.
    let mut up = call_up(&mut net, "call-481@a");
    let mut info = from_a(&mut up, Method::Info);
    info.headers
        .set("From", "<sip:1001@example.com>;tag=intruder");
    let out = net.req(a(), &info);
    assert_eq!(out.statuses(a()), vec![481]);
    assert!(out.requests(b()).is_empty());
}

#[test]
fn max_forwards_zero_gets_483() {
    let mut net = Net::new();
    let mut inv = a_invite("call-483@a", "1002", None);
    inv.headers.set("Max-Forwards", "0");
    let out = net.req(a(), &inv);
    assert_eq!(out.statuses(a()), vec![100, 483]);
    assert!(out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn our_own_b_leg_call_id_coming_back_gets_482() {
    let mut net = Net::new();
    let (_, b_inv) = ringing(&mut net, "call-loop@a");
    // The gateway routes our INVITE straight back to us.
    let out = net.req(b(), &b_inv);
    let r = out.response(b(), 482);
    assert_eq!(error_code(&r), "loop-detected");
    assert!(out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 1);
}

#[test]
fn no_route_no_registration_gets_404_with_error_body() {
    let mut cfg = config();
    cfg.routes.clear();
    let mut net = Net::with(cfg, FakeMedia::new(4));
    let out = net.req(
        a(),
        &a_invite("call-404@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1))),
    );
    let r = out.response(a(), 404);
    assert_eq!(error_code(&r), "not-found");
    assert!(r.to_tag().is_some());
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
}

#[test]
fn require_100rel_gets_420() {
    let mut net = Net::new();
    let mut inv = a_invite("call-420@a", "1002", None);
    inv.headers.push("Require", "100rel");
    let out = net.req(a(), &inv);
    let r = out.response(a(), 420);
    assert_eq!(r.headers.get("Unsupported"), Some("100rel"));
    assert!(out.requests(b()).is_empty());
}

#[test]
fn media_exhausted_gets_503_with_retry_after() {
    let mut net = Net::with(config(), FakeMedia::new(0));
    let out = net.req(
        a(),
        &a_invite("call-503@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1))),
    );
    let r = out.response(a(), 503);
    assert!(r.headers.has("Retry-After"));
    assert_eq!(error_code(&r), "overloaded");
    assert!(out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn bad_sdp_gets_400() {
    let mut net = Net::new();
    let out = net.req(
        a(),
        &a_invite("call-400@a", "1002", Some("this is not SDP\r\n")),
    );
    let r = out.response(a(), 400);
    assert_eq!(error_code(&r), "malformed-message");
    assert!(out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn unknown_method_gets_501() {
    let mut net = Net::new();
    let mut r = Request::new(Method::Other("FROBNICATE".into()), "sip:1002@example.com");
    r.headers.push("Via", via(A).to_string());
    r.headers.push("From", "<sip:1001@example.com>;tag=x");
    r.headers.push("To", "<sip:1002@example.com>");
    r.headers.push("Call-ID", "call-501@a");
    r.headers.push("CSeq", "1 FROBNICATE");
    assert_eq!(net.req(a(), &r).statuses(a()), vec![501]);
}

#[test]
fn out_of_dialog_bye_gets_481() {
    let mut net = Net::new();
    let mut r = Request::new(Method::Bye, "sip:1002@example.com");
    r.headers.push("Via", via(A).to_string());
    r.headers.push("From", "<sip:1001@example.com>;tag=x");
    r.headers.push("To", "<sip:1002@example.com>");
    r.headers.push("Call-ID", "call-bye481@a");
    r.headers.push("CSeq", "1 BYE");
    let out = net.req(a(), &r);
    assert_eq!(out.statuses(a()), vec![481]);
    assert!(out.requests(b()).is_empty());
}

// ------------------------------------------------------------------------------------------
// Digest authentication and registration

fn untrusted(algs: Vec<Algorithm>) -> Net {
    let mut cfg = config();
    cfg.trusted.clear();
    cfg.digest_algorithms = algs;
    let mut net = Net::with(cfg, FakeMedia::new(4));
    add_account(&mut net, "1001", "alice-pw");
    net
}

fn add_account(net: &mut Net, user: &str, pw: &str) {
    net.eng.set_account(
        user,
        Some(AccountAuth {
            ha1_md5: auth::ha1(Algorithm::Md5, user, "example.com", pw),
            ha1_sha256: auth::ha1(Algorithm::Sha256, user, "example.com", pw),
        }),
    );
}

fn challenges(r: &Response, name: &str) -> Vec<String> {
    r.headers.get_all(name).map(str::to_string).collect()
}

#[test]
fn invite_is_challenged_then_proceeds_with_right_credentials() {
    let mut net = untrusted(vec![Algorithm::Md5]);
    let inv = a_invite("call-auth@a", "1002", None);
    let out = net.req(a(), &inv);
    assert!(out.requests(b()).is_empty());
    let c407 = out.response(a(), 407);
    let ch = challenges(&c407, "Proxy-Authenticate");
    assert_eq!(ch.len(), 1);
    assert!(
        ch[0].contains("algorithm=MD5") && ch[0].contains("realm=\"example.com\""),
        "{}",
        ch[0]
    );
    assert!(ch[0].contains("qop=\"auth\""));
    assert!(net.req(a(), &build_ack(&inv, &c407)).is_empty());

    let mut again = a_invite("call-auth@a", "1002", None);
    again.headers.set("CSeq", format!("{} INVITE", A_CSEQ + 1));
    let creds = auth::respond(&ch[0], "1001", "alice-pw", "INVITE", &again.uri, "cn-1", 1).unwrap();
    again.headers.push("Proxy-Authorization", creds);
    let out = net.req(a(), &again);
    assert_eq!(out.statuses(a()), vec![100]);
    let b_inv = out.request(b(), Method::Invite);
    assert!(
        !b_inv.headers.has("Proxy-Authorization"),
        "credentials stay on leg A"
    );
    assert_eq!(net.eng.active_calls(), 1);
}

/// Issue 10: ten wrong digest answers lock the user for 60 s (503 + Retry-After, even with
/// the right password), with simulated time; then the right password proceeds again.
#[test]
fn digest_guessing_locks_the_user_out_for_a_while() {
    let mut net = untrusted(vec![Algorithm::Md5]);
    let inv = a_invite("call-guess@a", "1002", None);
    let c407 = net.req(a(), &inv).response(a(), 407);
    let ch = challenges(&c407, "Proxy-Authenticate");
    let attempt = |net: &mut Net, n: u32, pw: &str| {
        let mut again = a_invite(&format!("call-guess-{n}@a"), "1002", None);
        let creds = auth::respond(&ch[0], "1001", pw, "INVITE", &again.uri, "cn", n).unwrap();
        again.headers.push("Proxy-Authorization", creds);
        net.req(a(), &again)
    };
    for n in 1..=10 {
        let out = attempt(&mut net, n, "guess");
        assert_eq!(out.statuses(a()).last(), Some(&407), "guess {n}");
    }
    let r = attempt(&mut net, 11, "alice-pw").response(a(), 503);
    assert_eq!(r.headers.get("Retry-After"), Some("60"));
    assert_eq!(net.eng.active_calls(), 0);
    net.now += Duration::from_secs(61);
    let out = attempt(&mut net, 12, "alice-pw");
    assert_eq!(out.statuses(a()), vec![100]);
    assert_eq!(net.eng.active_calls(), 1);
}

#[test]
fn wrong_password_is_challenged_again() {
    let mut net = untrusted(vec![Algorithm::Md5]);
    let inv = a_invite("call-badpw@a", "1002", None);
    let c407 = net.req(a(), &inv).response(a(), 407);
    let ch = challenges(&c407, "Proxy-Authenticate");

    let mut again = a_invite("call-badpw@a", "1002", None);
    again.headers.set("CSeq", format!("{} INVITE", A_CSEQ + 1));
    let creds = auth::respond(
        &ch[0],
        "1001",
        "not-the-password",
        "INVITE",
        &again.uri,
        "cn",
        1,
    )
    .unwrap();
    again.headers.push("Proxy-Authorization", creds);
    let out = net.req(a(), &again);
    let r = out.response(a(), 407);
    assert_eq!(challenges(&r, "Proxy-Authenticate").len(), 1);
    assert!(out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn both_algorithms_offered_strongest_first() {
    // Whatever order the operator lists them in, SHA-256 is offered first (RFC 8760).
    for algs in [
        vec![Algorithm::Md5, Algorithm::Sha256],
        vec![Algorithm::Sha256, Algorithm::Md5],
    ] {
        let mut net = untrusted(algs);
        let c407 = net
            .req(a(), &a_invite("call-sha@a", "1002", None))
            .response(a(), 407);
        let ch = challenges(&c407, "Proxy-Authenticate");
        assert_eq!(ch.len(), 2, "{ch:?}");
        assert!(ch[0].contains("algorithm=SHA-256"), "{ch:?}");
        assert!(ch[1].contains("algorithm=MD5"), "{ch:?}");

        let mut again = a_invite("call-sha@a", "1002", None);
        again.headers.set("CSeq", format!("{} INVITE", A_CSEQ + 1));
        let creds =
            auth::respond(&ch[0], "1001", "alice-pw", "INVITE", &again.uri, "cn", 1).unwrap();
        assert!(creds.contains("algorithm=SHA-256"));
        again.headers.push("Proxy-Authorization", creds);
        net.req(a(), &again).request(b(), Method::Invite);
    }
}

/// The callee's phone, behind NAT: it registers from here...
const PHONE_SRC: &str = "127.0.0.2:5080";
/// ...with a Contact naming an address that cannot be reached from outside.
const PHONE_CONTACT: &str = "sip:1002@127.0.0.9:6090";

fn register(net: &mut Net, cseq: u32, expires: u32) -> Response {
    let build = |cseq: u32| {
        let mut r = Request::new(Method::Register, "sip:example.com");
        r.headers.push("Via", via(PHONE_SRC).to_string());
        r.headers.push("Max-Forwards", "70");
        r.headers.push("From", "<sip:1002@example.com>;tag=reg-1");
        r.headers.push("To", "<sip:1002@example.com>");
        r.headers.push("Call-ID", "reg-call@phone");
        r.headers.push("CSeq", format!("{cseq} REGISTER"));
        r.headers.push("Contact", format!("<{PHONE_CONTACT}>"));
        r.headers.push("Expires", expires.to_string());
        r
    };
    let phone = peer(PHONE_SRC);
    let out = net.req(phone, &build(cseq));
    let c401 = out.response(phone, 401);
    let ch = challenges(&c401, "WWW-Authenticate");
    assert_eq!(ch.len(), 1);
    let mut r = build(cseq + 1);
    let creds = auth::respond(
        &ch[0],
        "1002",
        "bob-pw",
        "REGISTER",
        "sip:example.com",
        "cn-r",
        1,
    )
    .unwrap();
    r.headers.push("Authorization", creds);
    net.req(phone, &r).response(phone, 200)
}

#[test]
fn register_then_call_reaches_the_registration_source() {
    let mut cfg = config();
    cfg.trusted = vec!["127.0.0.1/32".parse().unwrap()]; // A is trusted, the phone is not
    let mut net = Net::with(cfg, FakeMedia::new(4));
    add_account(&mut net, "1002", "bob-pw");

    let ok = register(&mut net, 1, 3600);
    let contacts = challenges(&ok, "Contact");
    assert_eq!(contacts.len(), 1);
    assert!(contacts[0].contains(PHONE_CONTACT), "{contacts:?}");
    assert!(contacts[0].contains("expires=3600"), "{contacts:?}");
    assert_eq!(net.eng.registrations(), 1);

    // The INVITE goes to where the REGISTER came from, not to the route and not to the
    // unreachable Contact address; the Request-URI is the registered Contact.
    let phone = peer(PHONE_SRC);
    let out = net.req(a(), &a_invite("call-reg@a", "1002", None));
    assert!(out.requests(b()).is_empty());
    let inv = out.request(phone, Method::Invite);
    assert_eq!(inv.uri, PHONE_CONTACT);

    // Unregister: the next call falls back to the route.
    let ok = register(&mut net, 3, 0);
    assert!(challenges(&ok, "Contact").is_empty());
    assert_eq!(net.eng.registrations(), 0);
    let out = net.req(a(), &a_invite("call-reg-2@a", "1002", None));
    assert!(out
        .requests(phone)
        .iter()
        .all(|r| r.call_id() == inv.call_id()));
    assert_eq!(
        out.request(b(), Method::Invite).uri,
        "sip:1002@127.0.0.1:5070"
    );
}

#[test]
fn cluster_mode_reports_bindings_and_reaches_other_nodes_phones_through_their_path() {
    use crate::sip::registrar::BindingRecord;
    let mut cfg = config();
    cfg.trusted = vec!["127.0.0.1/32".parse().unwrap()];
    let mut net = Net::with(cfg, FakeMedia::new(4));
    add_account(&mut net, "1002", "bob-pw");
    // Off (the single node): nothing to persist.
    register(&mut net, 1, 3600);
    assert!(!net
        .events()
        .iter()
        .any(|e| matches!(e, EngineEvent::BindingsChanged { .. })));
    net.eng.share_registrations(true);
    register(&mut net, 3, 3600);
    let changed: Vec<_> = net
        .events()
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::BindingsChanged {
                aor,
                changed,
                removed,
                all_removed,
            } => Some((aor, changed, removed, all_removed)),
            _ => None,
        })
        .collect();
    assert_eq!(changed.len(), 1);
    let (aor, recs, removed, all) = &changed[0];
    assert_eq!(aor, "1002@example.com");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].contact_uri, PHONE_CONTACT);
    assert_eq!(recs[0].source, PHONE_SRC.parse().unwrap());
    assert!(removed.is_empty() && !all);
    register(&mut net, 5, 0);
    let gone = net.events().into_iter().find_map(|e| match e {
        EngineEvent::BindingsChanged { removed, .. } => Some(removed),
        _ => None,
    });
    assert_eq!(gone, Some(vec![PHONE_CONTACT.to_string()]));

    // A phone that registered on another node through a proxy: the edge hands its record
    // over; a new INVITE is sent to the Path's first hop with the Path as Route.
    let rec = BindingRecord {
        contact: "<sip:1002@10.9.9.9:5060>".into(),
        contact_uri: "sip:1002@10.9.9.9:5060".into(),
        path: vec!["<sip:127.0.0.3:5060;lr>".into()],
        transport: Transport::Udp,
        source: "127.0.0.3:5060".parse().unwrap(),
        q: 1000,
        call_id: "elsewhere".into(),
        cseq: 1,
        user_agent: None,
        expires_in: Duration::from_secs(600),
    };
    let inv = a_invite("call-remote@a", "1002", None);
    assert_eq!(
        net.eng.lookup_aor(&inv).as_deref(),
        Some("1002@example.com")
    );
    let now = net.now;
    net.eng.set_remote_bindings("1002@example.com", &[rec], now);
    assert_eq!(net.eng.registrations(), 0, "not this node's registrations");
    let proxy = peer("127.0.0.3:5060");
    let out = net.req(a(), &inv);
    let sent = out.request(proxy, Method::Invite);
    assert_eq!(sent.uri, "sip:1002@10.9.9.9:5060");
    assert!(sent
        .headers
        .get("Route")
        .is_some_and(|r| r.contains("127.0.0.3:5060")));
}

// ------------------------------------------------------------------------------------------
// Timers, media timeout, shutdown

#[test]
fn unacked_2xx_ends_call_on_both_legs() {
    let mut net = Net::new();
    let (_, b_inv) = ringing(&mut net, "call-noack@a");
    net.resp(
        b(),
        &b_answer(&b_inv, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
    )
    .response(a(), 200);
    net.events();

    let out = net.run_for(Duration::from_secs(31));
    assert!(out.requests(a()).is_empty() && out.requests(b()).is_empty());
    assert!(
        out.statuses(a()).iter().all(|s| *s == 200),
        "2xx retransmitted to A"
    );
    assert!(out.responses(a()).len() >= 5);

    // Timer L fires at 64*T1 = 32 s; stop before the BYEs are retransmitted (Timer E).
    let out = net.run_for(Duration::from_millis(1100));
    let a_bye = out.request(a(), Method::Bye);
    assert_eq!(a_bye.to_tag().as_deref(), Some(A_TAG));
    // B's 200 is ACKed before it is hung up.
    assert_eq!(out.methods(b()), vec!["ACK", "BYE"]);
    assert_eq!(cseq(&out.request(b(), Method::Ack)), "1 ACK");
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(1, CallOutcome::Timeout)]
    );
}

#[test]
fn media_timeout_sends_bye_with_reason_on_both_legs() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-rtp@a");
    net.events();
    net.eng.handle_media_timeout(up.key, net.now);
    let out = net.drain();
    let a_bye = out.request(a(), Method::Bye);
    let b_bye = out.request(b(), Method::Bye);
    up.a_dialog.on_request(&a_bye).unwrap();
    up.b_dialog.on_request(&b_bye).unwrap();
    for bye in [&a_bye, &b_bye] {
        let reason = bye.headers.get("Reason").expect("Reason");
        assert!(
            reason.starts_with("SIP;") && reason.contains("rtp-timeout"),
            "{reason}"
        );
    }
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(up.key, CallOutcome::Timeout)]
    );
}

#[test]
fn shutdown_byes_up_calls_and_503s_ringing_callers() {
    let mut net = Net::new();
    let up = call_up(&mut net, "call-up@a");
    let (ring_inv, ring_b) = ringing(&mut net, "call-ringing@a");
    net.resp(b(), &b_answer(&ring_b, 180, None))
        .response(a(), 180);

    net.eng.shutdown(net.now);
    let out = net.drain();
    let a_bye = out.request(a(), Method::Bye);
    assert_eq!(a_bye.call_id(), up.a_invite.call_id());
    let r503 = out.response(a(), 503);
    assert_eq!(r503.call_id(), ring_inv.call_id());
    assert!(r503.headers.has("Retry-After"));
    let b_reqs = out.requests(b());
    assert_eq!(b_reqs.len(), 2, "{:?}", out.methods(b()));
    let b_bye = out.request(b(), Method::Bye);
    assert_eq!(b_bye.call_id(), up.b_invite.call_id());
    let cancel = out.request(b(), Method::Cancel);
    assert_eq!(cancel.call_id(), ring_b.call_id());
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
}

// ------------------------------------------------------------------------------------------
// Retransmissions

#[test]
fn retransmitted_invite_does_not_start_a_second_call() {
    let mut net = Net::new();
    let inv = a_invite("call-retx@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let bytes = inv.to_bytes();
    let first = net.send(a(), bytes.clone());
    first.request(b(), Method::Invite);
    let again = net.send(a(), bytes);
    assert_eq!(again.statuses(a()), vec![100]);
    assert!(again.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 1);
    assert_eq!(net.media().streams.len(), 1);
}

#[test]
fn b_retransmitted_200_gets_the_ack_again() {
    let mut net = Net::new();
    let up = call_up(&mut net, "call-re200@a");
    let ok = b_answer(&up.b_invite, 200, Some(&sdp(B_MEDIA, "sendrecv", 1)));
    let out = net.resp(b(), &ok);
    let ack = out.request(b(), Method::Ack);
    assert_eq!(ack, up.b_ack);
    assert!(out.responses(a()).is_empty(), "nothing new for A");
    assert_eq!(net.eng.active_calls(), 1);
}

#[test]
fn b_200_to_reinvite_retransmitted_before_a_acks_gets_no_stale_ack() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-stale@a");
    let mut reinv = from_a(&mut up, Method::Invite);
    reinv.body = with_sdp(&mut reinv, &sdp(A_MEDIA, "sendonly", 2));
    let b_reinv = net.req(a(), &reinv).request(b(), Method::Invite);
    let ok = answer(
        &b_reinv,
        200,
        &[("Content-Type", "application/sdp")],
        sdp(B_MEDIA, "recvonly", 2).as_bytes(),
    );
    net.resp(b(), &ok).response(a(), 200);

    // A has not ACKed yet: the ACK of the first INVITE (CSeq 1) must not answer this 200.
    let out = net.resp(b(), &ok);
    assert!(out.requests(b()).is_empty(), "{:?}", out.requests(b()));

    let b_ack = net
        .req(a(), &up.a_dialog.ack_for(A_CSEQ + 1, via(A)))
        .request(b(), Method::Ack);
    assert_eq!(cseq(&b_ack), "2 ACK");
    // Once ACKed, a retransmitted 200 gets that same ACK again.
    assert_eq!(net.resp(b(), &ok).request(b(), Method::Ack), b_ack);
}

#[test]
fn bye_before_ack_acks_leg_b_first() {
    let mut net = Net::new();
    let inv = a_invite(
        "call-byefirst@a",
        "1002",
        Some(&sdp(A_MEDIA, "sendrecv", 1)),
    );
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);
    let ok = net
        .resp(
            b(),
            &b_answer(&b_inv, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
        )
        .response(a(), 200);
    let mut a_dialog = Dialog::uac(&inv, &ok).unwrap();
    // A's ACK got lost; A hangs up at once.
    let out = net.req(
        a(),
        &a_dialog.new_request(Method::Bye, &a_contact(), via(A)),
    );
    out.response(a(), 200);
    assert_eq!(out.methods(b()), vec!["ACK", "BYE"]);
    assert_eq!(cseq(&out.request(b(), Method::Ack)), "1 ACK");
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn late_offer_answer_in_ack_is_anchored() {
    let mut net = Net::new();
    let inv = a_invite("call-lateoffer@a", "1002", None);
    let b_inv = net.req(a(), &inv).request(b(), Method::Invite);
    assert!(b_inv.body.is_empty());
    let offer = sdp(B_MEDIA, "sendrecv", 1);
    let ok = net
        .resp(b(), &b_answer(&b_inv, 200, Some(&offer)))
        .response(a(), 200);
    assert_anchored(&ok.body, &offer, PORT_A);

    let a_dialog = Dialog::uac(&inv, &ok).unwrap();
    let mut ack = a_dialog.ack_for(A_CSEQ, via(A));
    let ans = sdp(A_MEDIA, "sendrecv", 1);
    ack.body = with_sdp(&mut ack, &ans);
    let b_ack = net.req(a(), &ack).request(b(), Method::Ack);
    assert_eq!(b_ack.content_type().as_deref(), Some("application/sdp"));
    assert_anchored(&b_ack.body, &ans, PORT_B);
    assert_eq!(
        net.media().remote(1, 0, Side::A),
        Some(sa(A_MEDIA.0, A_MEDIA.1))
    );
    assert_eq!(
        net.media().remote(1, 0, Side::B),
        Some(sa(B_MEDIA.0, B_MEDIA.1))
    );
}

#[test]
fn each_media_section_gets_its_own_relay() {
    let mut net = Net::new();
    let offer = format!(
        "{}m=video 6002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n",
        sdp(A_MEDIA, "sendrecv", 1)
    );
    let b_inv = net
        .req(a(), &a_invite("call-video@a", "1002", Some(&offer)))
        .request(b(), Method::Invite);
    let s = SessionDescription::parse(std::str::from_utf8(&b_inv.body).unwrap()).unwrap();
    assert_eq!(s.media_count(), 2);
    assert_eq!(s.connection_for(0), Some(sa("127.0.0.1", PORT_B)));
    assert_eq!(s.connection_for(1), Some(sa("127.0.0.1", PORT_B + 4)));
    assert_eq!(s.codecs(1)[0].format_name(), "H264/90000");
    assert_eq!(net.media().remote(1, 1, Side::A), Some(sa(A_MEDIA.0, 6002)));
}

#[test]
fn in_dialog_cseq_going_backwards_gets_500() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-cseq@a");
    let mut info = from_a(&mut up, Method::Info);
    info.headers.set("CSeq", format!("{} INFO", A_CSEQ - 1));
    let out = net.req(a(), &info);
    assert_eq!(out.statuses(a()), vec![500]);
    assert!(out.requests(b()).is_empty());
}

#[test]
fn relayed_request_unanswered_by_the_other_side_gets_408() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-info408@a");
    let info = custom(from_a(&mut up, Method::Info), "text/plain", b"x");
    net.req(a(), &info).request(b(), Method::Info);
    let out = net.run_for(Duration::from_secs(33));
    assert_eq!(out.statuses(a()), vec![408]);
    assert_eq!(
        net.eng.active_calls(),
        1,
        "a lost INFO does not end the call"
    );
}

#[test]
fn reinvite_from_b_is_relayed_to_a() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "call-reinv-b@a");
    let offer = sdp(("127.0.0.3", 7020), "sendonly", 2);
    let mut reinv = from_b(&mut up, Method::Invite);
    reinv.body = with_sdp(&mut reinv, &offer);
    let a_reinv = net.req(b(), &reinv).request(a(), Method::Invite);
    up.a_dialog.on_request(&a_reinv).unwrap();
    assert_eq!(cseq(&a_reinv), "1 INVITE");
    assert_anchored(&a_reinv.body, &offer, PORT_A);

    let ans = sdp(A_MEDIA, "recvonly", 2);
    let ok = answer(
        &a_reinv,
        200,
        &[("Content-Type", "application/sdp")],
        ans.as_bytes(),
    );
    let b_ok = net.resp(a(), &ok).response(b(), 200);
    assert_anchored(&b_ok.body, &ans, PORT_B);
    let b_ack = up.b_dialog.ack_for(1, via(B));
    let a_ack = net.req(b(), &b_ack).request(a(), Method::Ack);
    assert_eq!(cseq(&a_ack), "1 ACK");
    assert_eq!(a_ack.to_tag(), ok.to_tag());
}

// ------------------------------------------------------------------------------------------
// Out-of-dialog MESSAGE (RFC 3428)

fn ood_message(call_id: &str) -> Request {
    let mut r = Request::new(Method::Message, "sip:1002@example.com");
    r.headers.push("Via", via(A).to_string());
    r.headers.push("From", "<sip:1001@example.com>;tag=m1");
    r.headers.push("To", "<sip:1002@example.com>");
    r.headers.push("Call-ID", call_id);
    r.headers.push("CSeq", "7 MESSAGE");
    r.headers.push("X-Keep", "exactly  this");
    r.headers.push("Content-Type", "text/plain");
    r.body = bytes::Bytes::from_static(b"hello \xc3\xa9");
    r
}

#[test]
fn out_of_dialog_message_relayed_and_answered() {
    let mut net = Net::new();
    let out = net.req(a(), &ood_message("msg-1@a"));
    let m = out.request(b(), Method::Message);
    assert_ne!(
        m.call_id(),
        Some("msg-1@a"),
        "own Call-ID towards the target"
    );
    assert_eq!(m.cseq().map(|c| c.seq), Some(1));
    assert_eq!(m.headers.get("X-Keep"), Some("exactly  this"));
    assert_eq!(&m.body[..], b"hello \xc3\xa9");
    let mut ok = m.response(202, None);
    ok.ensure_to_tag("bt");
    let back = net.resp(b(), &ok);
    let r = back.response(a(), 202);
    assert_eq!(r.call_id(), Some("msg-1@a"));
    assert_eq!(r.cseq().map(|c| c.seq), Some(7));
}

#[test]
fn out_of_dialog_message_to_nobody_gets_404_and_timeout_408() {
    let mut cfg = config();
    cfg.routes.clear();
    let mut net = Net::with(cfg, FakeMedia::new(4));
    let out = net.req(a(), &ood_message("msg-2@a"));
    assert_eq!(out.statuses(a()), vec![404]);

    let mut net = Net::new();
    net.req(a(), &ood_message("msg-3@a"));
    let later = net.run_for(Duration::from_secs(33));
    assert!(
        later.statuses(a()).contains(&408),
        "{:?}",
        later.statuses(a())
    );
}

// ------------------------------------------------------------------------------------------
// In-call storage hooks: store requests, DTMF feature code, local sessions

const STORE_CT: &str = "application/vnd.callvault.store-request+json";

fn store_request(up: &mut Up, method: Method, package: Option<&str>) -> Request {
    let mut r = from_b(up, method);
    r.headers.push("Content-Type", STORE_CT);
    if let Some(p) = package {
        r.headers.push("Info-Package", p);
    }
    r.body = bytes::Bytes::from_static(br#"{"pin":"4321"}"#);
    r
}

fn store_request_event(
    net: &mut Net,
) -> Option<(CallKey, Side, crate::sip::transaction::ServerTxId)> {
    net.events().into_iter().find_map(|e| match e {
        EngineEvent::StoreRequest { call, side, tx, .. } => Some((call, side, tx)),
        _ => None,
    })
}

#[test]
fn store_request_is_consumed_in_all_three_forms() {
    for (method, package) in [
        (Method::Message, None),
        (Method::Info, Some("callvault")),
        (Method::Info, None), // legacy INFO: content type alone
    ] {
        let mut net = Net::new();
        let mut up = call_up(&mut net, "store-req@a");
        let r = store_request(&mut up, method.clone(), package);
        let out = net.req(b(), &r);
        assert!(
            out.requests(a()).is_empty(),
            "{method} store request must not be relayed"
        );
        assert!(
            out.responses(b()).is_empty(),
            "answered by the layer above, not the engine"
        );
        let (call, side, tx) = store_request_event(&mut net).expect("StoreRequest event");
        assert_eq!((call, side), (up.key, Side::B));
        assert_eq!(
            net.eng.party(call, side).as_deref(),
            Some("1002@example.com")
        );
        assert_eq!(
            net.eng.party(call, Side::A).as_deref(),
            Some("1001@example.com")
        );
        let now = net.now;
        net.eng.respond_request(
            tx,
            200,
            Some("application/vnd.callvault.store-accepted+json"),
            bytes::Bytes::from_static(b"{}"),
            now,
        );
        let out = net.drain();
        assert_eq!(out.statuses(b()), vec![200]);
    }
}

#[test]
fn info_of_another_package_is_relayed() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "pkg@a");
    let r = store_request(&mut up, Method::Info, Some("other-package"));
    let out = net.req(b(), &r);
    assert_eq!(out.requests(a()).len(), 1);
    assert!(store_request_event(&mut net).is_none());
}

#[test]
fn reject_request_has_error_body() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "rej@a");
    net.req(b(), &store_request(&mut up, Method::Message, None));
    let (_, _, tx) = store_request_event(&mut net).unwrap();
    let now = net.now;
    net.eng
        .reject_request(tx, ErrorCode::BadPin, "wrong PIN", now);
    let out = net.drain();
    assert_eq!(error_code(&out.response(b(), 403)), "bad-pin");
}

fn dtmf_info(up: &mut Up, digit: char) -> Request {
    let mut r = from_b(up, Method::Info);
    r.headers.push("Content-Type", "application/dtmf-relay");
    r.body = bytes::Bytes::from(format!("Signal={digit}\r\nDuration=160\r\n"));
    r
}

#[test]
fn feature_code_digits_are_swallowed_and_reported() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "dtmf@a");
    // A digit outside a code is relayed.
    let out = net.req(b(), &dtmf_info(&mut up, '5'));
    assert_eq!(out.requests(a()).len(), 1);
    for d in "*74321#".chars() {
        let r = dtmf_info(&mut up, d);
        let out = net.req(b(), &r);
        assert_eq!(out.statuses(b()), vec![200], "digit {d} answered by us");
        assert!(out.requests(a()).is_empty(), "digit {d} must not reach A");
    }
    let pin = net.events().into_iter().find_map(|e| match e {
        EngineEvent::FeatureCode { side, pin, .. } => Some((side, pin)),
        _ => None,
    });
    assert_eq!(pin, Some((Side::B, "4321".to_string())));
}

#[test]
fn held_digits_released_in_order_on_mismatch_and_after_3s() {
    let mut net = Net::new();
    let mut up = call_up(&mut net, "dtmf2@a");
    net.req(b(), &dtmf_info(&mut up, '*'));
    let out = net.req(b(), &dtmf_info(&mut up, '9'));
    let sent: Vec<String> = out
        .requests(a())
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].starts_with("Signal=*") && sent[1].starts_with("Signal=9"),
        "{sent:?}"
    );
    for r in out.requests(a()) {
        net.resp(a(), &r.response(200, None));
    }

    // A lone '*' is released after 3 s.
    let out = net.req(b(), &dtmf_info(&mut up, '*'));
    assert!(out.requests(a()).is_empty());
    let out = net.run_for(Duration::from_millis(2900));
    assert!(out.requests(a()).is_empty());
    let out = net.run_for(Duration::from_millis(200));
    let infos = out.requests(a());
    assert_eq!(infos.len(), 1);
    assert!(String::from_utf8_lossy(&infos[0].body).starts_with("Signal=*"));
}

fn session_invite(user: &str, call_id: &str) -> Request {
    let mut r = a_invite(call_id, user, Some(&sdp(A_MEDIA, "sendonly", 1)));
    r.headers.push("Callvault-Data-Size", "160000");
    r
}

fn session_offer(net: &mut Net) -> Option<(u64, String)> {
    net.events().into_iter().find_map(|e| match e {
        EngineEvent::SessionOffer {
            session, identity, ..
        } => Some((session, identity)),
        _ => None,
    })
}

#[test]
fn store_uri_invite_is_a_local_session() {
    let mut net = Net::new();
    let inv = session_invite("st_abcdefghijklmnopqrst", "sess@a");
    let out = net.req(a(), &inv);
    assert_eq!(out.statuses(a()), vec![100]);
    assert!(out.requests(b()).is_empty(), "not routed to anybody");
    let (key, identity) = session_offer(&mut net).expect("SessionOffer");
    assert_eq!(identity, "1001@example.com");
    let now = net.now;
    assert!(net.eng.accept_session(
        key,
        bytes::Bytes::from(sdp(("127.0.0.1", 40100), "recvonly", 1)),
        now
    ));
    let out = net.drain();
    let ok = out.response(a(), 200);
    assert!(String::from_utf8_lossy(&ok.body).contains("a=recvonly"));
    assert!(ok.to_tag().is_some());
    let mut d = Dialog::uac(&inv, &ok).unwrap();
    net.req(a(), &d.ack_for(A_CSEQ, via(A)));
    assert!(net.events().contains(&EngineEvent::SessionAcked(key)));
    let bye = d.new_request(Method::Bye, &a_contact(), via(A));
    let out = net.req(a(), &bye);
    assert_eq!(out.statuses(a()), vec![200]);
    assert!(net.events().contains(&EngineEvent::SessionEnded {
        session: key,
        by_remote: true
    }));
    // The dialog is gone.
    let again = d.new_request(Method::Bye, &a_contact(), via(A));
    assert_eq!(net.req(a(), &again).statuses(a()), vec![481]);
}

#[test]
fn session_rejected_with_retry_after_and_ended_by_us() {
    let mut net = Net::new();
    net.req(a(), &session_invite("play-st_x", "sess2@a"));
    let (key, _) = session_offer(&mut net).unwrap();
    let now = net.now;
    net.eng.reject_session(
        key,
        ErrorCode::NotReady,
        "threshold not reached",
        Some(5),
        now,
    );
    let out = net.drain();
    let r = out.response(a(), 480);
    assert_eq!(r.headers.get("Retry-After"), Some("5"));
    assert_eq!(error_code(&r), "not-ready");

    let inv = session_invite("st_y", "sess3@a");
    net.req(a(), &inv);
    let (key, _) = session_offer(&mut net).unwrap();
    let now = net.now;
    net.eng.accept_session(
        key,
        bytes::Bytes::from(sdp(("127.0.0.1", 40100), "recvonly", 1)),
        now,
    );
    let ok = net.drain().response(a(), 200);
    let d = Dialog::uac(&inv, &ok).unwrap();
    net.req(a(), &d.ack_for(A_CSEQ, via(A)));
    let now = net.now;
    net.eng.end_session(key, Some(ErrorCode::SizeExceeded), now);
    let out = net.drain();
    let bye = out.request(a(), Method::Bye);
    assert!(bye.headers.get("Reason").unwrap().contains("size-exceeded"));
}

#[test]
fn cancelled_session_offer_reports_end() {
    let mut net = Net::new();
    let inv = session_invite("st_z", "sess4@a");
    net.req(a(), &inv);
    let (key, _) = session_offer(&mut net).unwrap();
    let cancel = crate::sip::transaction::build_cancel(&inv);
    let out = net.req(a(), &cancel);
    assert!(out.statuses(a()).contains(&487));
    assert!(net.events().contains(&EngineEvent::SessionEnded {
        session: key,
        by_remote: true
    }));
}

#[test]
fn send_in_dialog_and_to_user() {
    let mut net = Net::new();
    let up = call_up(&mut net, "own@a");
    let now = net.now;
    net.eng.send_in_dialog(
        up.key,
        Side::A,
        Method::Message,
        &[("Content-Type", "application/vnd.callvault.prompt+json")],
        bytes::Bytes::from_static(b"{\"store_id\":\"st_1\"}"),
        now,
    );
    let out = net.drain();
    let m = out.request(a(), Method::Message);
    assert_eq!(m.call_id(), up.a_invite.call_id());
    assert_eq!(&m.body[..], b"{\"store_id\":\"st_1\"}");
    // Nobody registered as 1005: nothing to send.
    let now = net.now;
    assert!(net
        .eng
        .send_to_user("1005", Method::Message, &[], bytes::Bytes::new(), now)
        .is_empty());
}

// ------------------------------------------------------------------------------------------
// Share requests (PROTOCOL §3 steps 2–3): handed up, relayed on request, offers sent

const SHARE_REQ_CT: &str = "application/vnd.callvault.share-request+json";
const SHARE_OFFER_CT: &str = "application/vnd.callvault.share-offer+json";

/// An out-of-dialog share request from A (1001) to `sharer`.
fn share_msg(call_id: &str, sharer: &str, body: &str) -> Request {
    let mut r = Request::new(Method::Message, format!("sip:{sharer}@example.com"));
    r.headers.push("Via", via(A).to_string());
    r.headers.push("Max-Forwards", "70");
    r.headers
        .push("From", "\"Bob\" <sip:1001@example.com>;tag=s1");
    r.headers.push("To", format!("<sip:{sharer}@example.com>"));
    r.headers.push("Call-ID", call_id);
    r.headers.push("CSeq", "3 MESSAGE");
    r.headers.push("Content-Type", SHARE_REQ_CT);
    r.body = Bytes::from(body.to_string());
    r
}

/// The one ShareRequest among the events: (tx, requester, sharer, registered, source).
fn share_event(
    net: &mut Net,
) -> (
    crate::sip::transaction::ServerTxId,
    Request,
    String,
    String,
    bool,
    Peer,
) {
    let evs = net.events();
    let found: Vec<_> = evs
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::ShareRequest {
                tx,
                request,
                requester,
                sharer,
                registered,
                source,
            } => Some((tx, request, requester, sharer, registered, source)),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "one ShareRequest event");
    found.into_iter().next().unwrap()
}

/// Every ShareRelayAnswered among the events: (tx, status, content type, body).
fn relay_answers(
    net: &mut Net,
) -> Vec<(
    crate::sip::transaction::ServerTxId,
    u16,
    Option<String>,
    Bytes,
)> {
    net.events()
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::ShareRelayAnswered {
                tx,
                status,
                content_type,
                body,
            } => Some((tx, status, content_type, body)),
            _ => None,
        })
        .collect()
}

/// A net where A (127.0.0.1) is trusted and the sharer 1002 registered from PHONE_SRC.
fn net_with_registered_sharer() -> Net {
    let mut cfg = config();
    cfg.trusted = vec!["127.0.0.1/32".parse().unwrap()];
    let mut net = Net::with(cfg, FakeMedia::new(4));
    add_account(&mut net, "1002", "bob-pw");
    register(&mut net, 1, 3600);
    net.events();
    net
}

#[test]
fn share_request_is_handed_up_not_relayed() {
    // The default config routes every user to B: a share request still is not relayed there.
    let mut net = Net::new();
    let out = net.req(
        a(),
        &share_msg("sh-1@a", "1002", r#"{"name":"holiday.mp4"}"#),
    );
    assert!(out.requests(b()).is_empty(), "{:?}", out.methods(b()));
    assert!(out.responses(a()).is_empty(), "{:?}", out.statuses(a()));
    let (tx, req, requester, sharer, registered, source) = share_event(&mut net);
    assert_eq!(requester, "1001@example.com");
    assert_eq!(sharer, "1002");
    assert!(!registered, "a route is not a registration");
    assert_eq!(source, a());
    assert_eq!(&req.body[..], br#"{"name":"holiday.mp4"}"#);
    // Not registered: nothing to relay to; the layer above answers itself.
    let now = net.now;
    assert!(!net.eng.relay_share_request(tx, now));
    net.eng
        .reject_request(tx, ErrorCode::UnknownShare, "no such share", now);
    let out = net.drain();
    let r = out.response(a(), 404);
    assert_eq!(error_code(&r), "unknown-share");
    assert!(r.to_tag().is_some());

    // Other MESSAGEs still go through the route as before.
    let out = net.req(a(), &ood_message("sh-plain@a"));
    out.request(b(), Method::Message);
    assert!(net.events().is_empty());
}

#[test]
fn share_requester_identity_digest_or_trusted_from() {
    // A trusted peer of another domain is known by its From URI, host included.
    let mut net = Net::new();
    let mut m = share_msg("sh-2@a", "1002", r#"{"list":true}"#);
    m.headers
        .set("From", "<sip:Carol@Elsewhere.ORG;user=phone>;tag=c1");
    net.req(a(), &m);
    let (_, _, requester, ..) = share_event(&mut net);
    assert_eq!(requester, "Carol@elsewhere.org");

    // An untrusted requester is challenged, then known by its digest user.
    let mut net = untrusted(vec![Algorithm::Md5]);
    let m = share_msg("sh-3@a", "1002", r#"{"list":true}"#);
    let c407 = net.req(a(), &m).response(a(), 407);
    assert!(net.events().is_empty());
    let ch = challenges(&c407, "Proxy-Authenticate");
    let mut again = share_msg("sh-3@a", "1002", r#"{"list":true}"#);
    again.headers.set("CSeq", "4 MESSAGE");
    // A From claiming someone else does not change who asks.
    again
        .headers
        .set("From", "<sip:mallory@example.com>;tag=s1");
    let creds = auth::respond(&ch[0], "1001", "alice-pw", "MESSAGE", &again.uri, "c", 1).unwrap();
    again.headers.push("Proxy-Authorization", creds);
    let out = net.req(a(), &again);
    assert!(out.responses(a()).is_empty());
    let (tx, _, requester, sharer, ..) = share_event(&mut net);
    assert_eq!(
        (requester.as_str(), sharer.as_str()),
        ("1001@example.com", "1002")
    );
    // The list answer: 200 with its JSON body and a To tag.
    let now = net.now;
    net.eng.respond_request(
        tx,
        200,
        Some("application/json"),
        Bytes::from_static(b"{\"shares\":[]}"),
        now,
    );
    let r = net.drain().response(a(), 200);
    assert_eq!(r.content_type().as_deref(), Some("application/json"));
    assert_eq!(&r.body[..], b"{\"shares\":[]}");
    assert!(r.to_tag().is_some());
}

#[test]
fn share_request_relayed_to_registered_sharer_forward_then_offer() {
    let mut net = net_with_registered_sharer();
    let phone = peer(PHONE_SRC);
    net.req(
        a(),
        &share_msg("sh-4@a", "1002", r#"{"name":"holiday.mp4"}"#),
    );
    let (tx, _, _, _, registered, source) = share_event(&mut net);
    assert!(registered);
    let now = net.now;
    assert!(net.eng.relay_share_request(tx, now));
    let out = net.drain();
    let m = out.request(phone, Method::Message);
    assert_eq!(m.uri, PHONE_CONTACT);
    assert_eq!(m.content_type().as_deref(), Some(SHARE_REQ_CT));
    assert_eq!(&m.body[..], br#"{"name":"holiday.mp4"}"#);
    assert_ne!(m.call_id(), Some("sh-4@a"));
    assert!(out.responses(a()).is_empty());

    // The sharer's terminal forwards: the answer goes up, not to the requester.
    let ok = answer(
        &m,
        200,
        &[("Content-Type", "application/json")],
        br#"{"forward":true}"#,
    );
    let out = net.resp(phone, &ok);
    assert!(out.responses(a()).is_empty(), "{:?}", out.statuses(a()));
    let answers = relay_answers(&mut net);
    assert_eq!(answers.len(), 1);
    let (atx, status, ct, body) = answers[0].clone();
    assert_eq!((atx, status), (tx, 200));
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert_eq!(&body[..], br#"{"forward":true}"#);
    // A retransmitted 200 is not a second answer.
    net.resp(phone, &ok);
    assert!(relay_answers(&mut net).is_empty());

    // Step 3: 200 to the requester, then the offer. 1001 has no registration: to its source.
    let now = net.now;
    net.eng.respond_request(tx, 200, None, Bytes::new(), now);
    assert!(net
        .eng
        .send_to_user(
            "1001",
            Method::Message,
            &[("Content-Type", SHARE_OFFER_CT)],
            Bytes::new(),
            now
        )
        .is_empty());
    let offer_tx = net.eng.send_to_peer(
        source,
        "sip:1001@example.com",
        Method::Message,
        &[("Content-Type", SHARE_OFFER_CT)],
        Bytes::from_static(b"{\"content_id\":\"ab\"}"),
        now,
    );
    let out = net.drain();
    let r = out.response(a(), 200);
    assert_eq!(r.call_id(), Some("sh-4@a"));
    assert!(r.to_tag().is_some());
    let offer = out.request(a(), Method::Message);
    assert_eq!(offer.uri, "sip:1001@example.com");
    assert_eq!(offer.content_type().as_deref(), Some(SHARE_OFFER_CT));
    assert_eq!(
        offer.to_hdr().unwrap().uri.to_string(),
        "sip:1001@example.com"
    );
    assert!(offer
        .from_hdr()
        .unwrap()
        .uri
        .to_string()
        .starts_with("sip:callvault@example.com"));
    assert_eq!(&offer.body[..], b"{\"content_id\":\"ab\"}");
    net.resp(a(), &answer(&offer, 200, &[], b""));
    assert_eq!(
        net.events(),
        vec![EngineEvent::OutOfDialogDone {
            tx: offer_tx,
            status: 200
        }]
    );
}

#[test]
fn share_refusal_and_other_answers_go_up_unchanged() {
    for status in [403, 486] {
        let mut net = net_with_registered_sharer();
        let phone = peer(PHONE_SRC);
        net.req(a(), &share_msg("sh-5@a", "1002", r#"{"name":"x"}"#));
        let (tx, ..) = share_event(&mut net);
        let now = net.now;
        assert!(net.eng.relay_share_request(tx, now));
        let m = net.drain().request(phone, Method::Message);
        let out = net.resp(phone, &answer(&m, status, &[], b""));
        assert!(out.responses(a()).is_empty());
        let answers = relay_answers(&mut net);
        assert_eq!(answers.len(), 1);
        assert_eq!((answers[0].0, answers[0].1), (tx, status));
    }
}

#[test]
fn share_relay_timeout_408_and_unreachable_480_go_up() {
    // Timer F on simulated time: the requester is not answered 408, the service decides.
    let mut net = net_with_registered_sharer();
    net.req(a(), &share_msg("sh-6@a", "1002", r#"{"name":"x"}"#));
    let (tx, ..) = share_event(&mut net);
    let now = net.now;
    assert!(net.eng.relay_share_request(tx, now));
    net.drain();
    let later = net.run_for(Duration::from_secs(20));
    assert!(relay_answers(&mut net).is_empty(), "not before Timer F");
    assert!(later.responses(a()).is_empty());
    let later = net.run_for(Duration::from_secs(13));
    assert!(later.responses(a()).is_empty(), "{:?}", later.statuses(a()));
    let answers = relay_answers(&mut net);
    assert_eq!(answers.len(), 1);
    assert_eq!((answers[0].0, answers[0].1), (tx, 408));
    // Answered on the sharer's behalf afterwards: the requester's transaction is still open.
    let now = net.now;
    net.eng
        .reject_request(tx, ErrorCode::ShareDenied, "policy", now);
    let r = net.drain().response(a(), 403);
    assert_eq!(error_code(&r), "share-denied");

    // A connection failure towards the sharer: 480 at once.
    let mut net = net_with_registered_sharer();
    net.req(a(), &share_msg("sh-7@a", "1002", r#"{"name":"x"}"#));
    let (tx, ..) = share_event(&mut net);
    let now = net.now;
    assert!(net.eng.relay_share_request(tx, now));
    net.drain();
    net.eng.handle_unreachable(peer(PHONE_SRC), now);
    assert!(net.drain().responses(a()).is_empty());
    let answers = relay_answers(&mut net);
    assert_eq!(answers.len(), 1);
    assert_eq!((answers[0].0, answers[0].1), (tx, 480));
}

#[test]
fn share_request_with_max_forwards_zero_gets_483() {
    let mut net = Net::new();
    let mut m = share_msg("sh-8@a", "1002", r#"{"name":"x"}"#);
    m.headers.set("Max-Forwards", "0");
    assert_eq!(net.req(a(), &m).statuses(a()), vec![483]);
    assert!(net.events().is_empty());
}

#[test]
fn call_facts_give_leg_a_call_id_and_answered_format() {
    let mut net = Net::new();
    let up = call_up(&mut net, "facts@a");
    let (call_id, format) = net.eng.call_facts(up.key).unwrap();
    assert_eq!(call_id, "facts@a");
    assert_eq!(format.map(|f| f.0), Some("PCMU/8000".to_string()));
}

// ------------------------------------------------------------------------------------------
// Requests too big for UDP (RFC 3261 §18.1.1, engine/msg_size.rs)

/// An INVITE whose leg-B copy is over 1300 bytes (the pad is an end-to-end header).
fn big_invite(call_id: &str) -> Request {
    let mut inv = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    inv.headers.push("X-Pad", "p".repeat(1400));
    inv
}

#[test]
fn oversized_invite_without_a_tcp_listener_is_answered_513() {
    let mut net = Net::new(); // tcp_port: None
    let out = net.req(a(), &big_invite("big-1@a"));
    assert!(out.requests(b()).is_empty(), "went out over UDP anyway");
    let resp = out.response(a(), 513);
    assert_eq!(error_code(&resp), "message-too-large");
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn oversized_invite_goes_over_tcp_and_a_refused_connection_gives_513() {
    let mut cfg = config();
    cfg.tcp_port = Some(5062);
    let mut net = Net::with(cfg, FakeMedia::new(16));
    let tcp_b = Peer::new(Transport::Tcp, b().addr);
    let out = net.req(a(), &big_invite("big-2@a"));
    assert!(out.requests(b()).is_empty(), "went out over UDP anyway");
    let inv = out.request(tcp_b, Method::Invite);
    let via = inv.top_via().unwrap();
    assert_eq!((via.transport.as_str(), via.port), ("TCP", Some(5062)));
    assert!(inv.to_bytes().len() > 1300);
    // The callee does not take TCP: the caller hears 513 at once, not 480 or Timer B.
    net.eng.handle_unreachable(tcp_b, net.now);
    let resp = net.drain().response(a(), 513);
    assert_eq!(error_code(&resp), "message-too-large");

    // A small INVITE still goes over UDP.
    let out = net.req(a(), &a_invite("small@a", "1002", None));
    out.request(b(), Method::Invite);
}

mod routing;
// ------------------------------------------------------------------------------------------
// Ring timeout and per-source admission (engine::guard)

fn guarded(guard: GuardConfig) -> Net {
    let mut cfg = config();
    cfg.trusted.clear();
    cfg.guard = guard;
    let mut net = Net::with(cfg, FakeMedia::new(16));
    add_account(&mut net, "1001", "alice-pw");
    net
}

/// An authenticated INVITE from A (challenge, ACK, INVITE with credentials); returns A's
/// INVITE and B's copy.
fn authed_call(net: &mut Net, call_id: &str) -> (Request, Request) {
    let inv = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    let c407 = net.req(a(), &inv).response(a(), 407);
    net.req(a(), &build_ack(&inv, &c407));
    let ch = challenges(&c407, "Proxy-Authenticate");
    let mut again = a_invite(call_id, "1002", Some(&sdp(A_MEDIA, "sendrecv", 1)));
    again.headers.set("CSeq", format!("{} INVITE", A_CSEQ + 1));
    let creds = auth::respond(&ch[0], "1001", "alice-pw", "INVITE", &again.uri, "cn-1", 1).unwrap();
    again.headers.push("Proxy-Authorization", creds);
    let b_inv = net.req(a(), &again).request(b(), Method::Invite);
    (again, b_inv)
}

fn assert_overloaded(resp: &Response, retry_after: &str) {
    assert_eq!(resp.headers.get("Retry-After"), Some(retry_after));
    assert!(resp.to_tag().is_some());
    assert_eq!(error_code(resp), "overloaded");
}

#[test]
fn ringing_call_is_cancelled_after_ring_timeout_with_408() {
    let mut cfg = config();
    cfg.guard.ring_timeout = Duration::from_secs(10);
    let mut net = Net::with(cfg, FakeMedia::new(16));
    let (inv, b_inv) = ringing(&mut net, "call-ring@a");
    net.resp(b(), &b_answer(&b_inv, 180, None))
        .response(a(), 180);
    assert_eq!(net.media().streams.len(), 1);
    // Ringing is no reason to give up before the timeout (no Timer B once 180 came).
    let out = net.run_for(Duration::from_millis(9900));
    assert!(out.is_empty(), "nothing before the ring timeout");
    let out = net.run_for(Duration::from_millis(200));
    let timeout = out.response(a(), 408);
    assert_eq!(error_code(&timeout), "timeout");
    assert_eq!(cseq(&timeout), format!("{A_CSEQ} INVITE"));
    let b_cancel = out.request(b(), Method::Cancel);
    assert_eq!(b_cancel.call_id(), b_inv.call_id());
    assert!(net.media().streams.is_empty(), "ports released at once");
    assert_eq!(
        net.events(),
        vec![EngineEvent::CallEnded(1, CallOutcome::Failed)]
    );
    assert_eq!(net.eng.unsettled_calls(), (0, 0));
    // B ends its INVITE with 487, which is ACKed; A ACKs its 408.
    assert!(net.resp(b(), &b_answer(&b_cancel, 200, None)).is_empty());
    let out = net.resp(b(), &b_answer(&b_inv, 487, None));
    out.request(b(), Method::Ack);
    assert!(out.responses(a()).is_empty());
    assert!(net.req(a(), &build_ack(&inv, &timeout)).is_empty());
    assert_eq!(net.eng.active_calls(), 0);
}

#[test]
fn answered_call_is_not_cut_by_the_ring_timeout() {
    let mut cfg = config();
    cfg.guard.ring_timeout = Duration::from_secs(10);
    let mut net = Net::with(cfg, FakeMedia::new(16));
    let mut up = call_up(&mut net, "call-ring-up@a");
    let out = net.run_for(Duration::from_secs(15));
    assert!(out.requests(a()).is_empty() && out.requests(b()).is_empty());
    assert_eq!(net.eng.active_calls(), 1);
    let bye = from_a(&mut up, Method::Bye);
    net.req(a(), &bye);
    assert_eq!(net.eng.unsettled_calls(), (0, 0));
}

#[test]
fn source_over_its_rate_gets_stateless_503_with_retry_after() {
    let mut net = guarded(GuardConfig {
        admission: crate::sip::admission::AdmissionConfig {
            rate: 1.0,
            burst: 2.0,
            max_sources: 16,
        },
        half_open_per_source: 0,
        ..GuardConfig::default()
    });
    let first = a_invite("flood-1@a", "1002", None);
    net.req(a(), &first).response(a(), 407);
    net.req(a(), &a_invite("flood-2@a", "1002", None))
        .response(a(), 407);
    let created = net.eng.tx_stats().server_created;
    let rejected = crate::metrics::METRICS.sip_admission_rejected_total.get();
    for i in 3..10 {
        let out = net.req(a(), &a_invite(&format!("flood-{i}@a"), "1002", None));
        assert_eq!(
            out.statuses(a()),
            vec![503],
            "no 100 Trying: no transaction"
        );
        assert_overloaded(&out.response(a(), 503), "1");
    }
    assert_eq!(net.eng.tx_stats().server_created, created, "no state kept");
    assert_eq!(net.eng.active_calls(), 0);
    assert!(net.media().streams.is_empty());
    assert!(crate::metrics::METRICS.sip_admission_rejected_total.get() >= rejected + 7);
    // A retransmission of an admitted INVITE is not charged: its transaction answers it.
    assert_eq!(net.req(a(), &first).statuses(a()), vec![407]);
    // REGISTER shares the bucket.
    let mut reg = Request::new(Method::Register, "sip:example.com");
    reg.headers.push("Via", via(A).to_string());
    reg.headers
        .push("From", format!("<sip:1001@example.com>;tag={A_TAG}"));
    reg.headers.push("To", "<sip:1001@example.com>");
    reg.headers.push("Call-ID", "reg-flood@a");
    reg.headers.push("CSeq", "1 REGISTER");
    reg.headers.push("Contact", a_contact().to_string());
    assert_overloaded(&net.req(a(), &reg).response(a(), 503), "1");
    // A second later the source has its share again.
    net.run_for(Duration::from_millis(1000));
    net.req(a(), &a_invite("flood-later@a", "1002", None))
        .response(a(), 407);
}

#[test]
fn half_open_calls_per_source_are_capped_until_acked() {
    let mut net = guarded(GuardConfig {
        admission: crate::sip::admission::AdmissionConfig {
            rate: 0.0,
            burst: 0.0,
            max_sources: 0,
        },
        half_open_per_source: 2,
        ..GuardConfig::default()
    });
    let (inv1, b_inv1) = authed_call(&mut net, "open-1@a");
    authed_call(&mut net, "open-2@a");
    assert_eq!(net.eng.unsettled_calls(), (2, 1));
    // A third call from the same source is refused before anything is created.
    let out = net.req(
        a(),
        &a_invite("open-3@a", "1002", Some(&sdp(A_MEDIA, "sendrecv", 1))),
    );
    assert_overloaded(&out.response(a(), 503), "5");
    assert_eq!(net.media().streams.len(), 2);
    // Answered but not ACKed still counts...
    let ok = net
        .resp(
            b(),
            &b_answer(&b_inv1, 200, Some(&sdp(B_MEDIA, "sendrecv", 1))),
        )
        .response(a(), 200);
    let out = net.req(a(), &a_invite("open-4@a", "1002", None));
    assert_overloaded(&out.response(a(), 503), "5");
    // ...the ACK settles it, and the source may call again.
    let ack = Dialog::uac(&inv1, &ok).unwrap().ack_for(A_CSEQ + 1, via(A));
    net.req(a(), &ack);
    assert_eq!(net.eng.unsettled_calls(), (1, 1));
    net.req(a(), &a_invite("open-5@a", "1002", None))
        .response(a(), 407);
}
