//! Attacks on a running callvault over loopback (issue 10, findings 9 and 10):
//!
//! - Identity: an authenticated caller naming another subscriber in `From` is refused (403,
//!   error body); otherwise the callee sees `P-Asserted-Identity` with the authenticated user,
//!   never one the caller forged (RFC 3325). A trusted peer's headers pass unchanged.
//! - Size: an INVITE that would go to the callee over UDP but is over 1300 bytes goes over
//!   TCP instead (RFC 3261 §18.1.1); a callee that does not take TCP gets the caller a quick
//!   `513 Message Too Large` instead of 32 s of silence.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use callvault::sip::message::{
    frame_stream, parse, Frame, HeaderAccess, Method, Request, Response, SipMessage,
};
use common::*;
use ua::{sdp, Ua};

const DOMAIN: &str = "example.com";

fn offer() -> String {
    sdp(40000, &[(0, "PCMU/8000")], "sendrecv")
}

/// REGISTER through the digest challenge; panics unless 200.
fn register_digest(ua: &mut Ua, password: &str) {
    let resp = ua.transact_with_digest(password, |ua, cseq, authz| {
        let aor = ua.aor();
        let mut req = Request::new(Method::Register, format!("sip:{DOMAIN}"));
        req.headers.push("Via", ua.new_via().to_string());
        req.headers.push("Max-Forwards", "70");
        req.headers.push("From", format!("<{aor}>;tag=r{cseq}"));
        req.headers.push("To", format!("<{aor}>"));
        req.headers.push("Call-ID", format!("reg-{}", ua.user));
        req.headers.push("CSeq", format!("{cseq} REGISTER"));
        req.headers.push("Contact", ua.contact().to_string());
        if let Some((n, v)) = authz {
            req.headers.push(n, v);
        }
        req
    });
    assert_eq!(resp.status, 200, "{resp:?}");
}

/// An INVITE from `a` to `callee` with `from` as its From and `extra` headers, already past
/// the digest challenge: the request with credentials, not sent yet.
fn digest_invite(
    a: &mut Ua,
    password: &str,
    callee: &str,
    from: &str,
    extra: &[(&str, &str)],
) -> Request {
    let ruri = format!("sip:{callee}@{DOMAIN}");
    let mut first = a.invite_request(&ruri, extra, &offer());
    first.headers.set("From", format!("<{from}>;tag=id1"));
    let resp = a.transact(&first);
    assert_eq!(resp.status, 407, "{resp:?}");
    let ch = resp.headers.get("Proxy-Authenticate").unwrap();
    let authz =
        callvault::sip::auth::respond(ch, &a.user, password, "INVITE", &ruri, "cn1", 1).unwrap();
    let mut second = a.invite_request(&ruri, extra, &offer());
    second.headers.set("From", format!("<{from}>;tag=id1"));
    second
        .headers
        .set("Call-ID", first.call_id().unwrap().to_string());
    second.headers.set("CSeq", "2 INVITE");
    second.headers.push("Proxy-Authorization", authz);
    second
}

fn error_code(resp: &Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
    v["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn authenticated_caller_cannot_pose_as_another_subscriber() {
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = false;
    let server = Server::prepare(cfg);
    server.account_add("1001", "pw1", "1111", "10MiB");
    server.account_add("1002", "pw2", "2222", "10MiB");
    server.account_add("1003", "pw3", "3333", "10MiB");
    let mut server = server;
    server.start();
    let mut a = Ua::new("1001", DOMAIN, server.sip_addr());
    let mut b = Ua::new("1002", DOMAIN, server.sip_addr());
    register_digest(&mut b, "pw2");

    // 1001 authenticates but writes 1003 in From: refused, the callee never rings.
    let forged = [("P-Asserted-Identity", "<sip:1003@example.com>")];
    let inv = digest_invite(&mut a, "pw1", "1002", "sip:1003@example.com", &forged);
    let resp = a.transact(&inv);
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(error_code(&resp), "forbidden", "{resp:?}");
    assert!(
        b.wait_request(Method::Invite, None, Duration::from_millis(300))
            .is_none(),
        "the callee rang for a forged From"
    );

    // Its own From and a forged assertion: the callee sees only the authenticated identity.
    let inv = digest_invite(&mut a, "pw1", "1002", "sip:1001@example.com", &forged);
    a.send(&inv);
    let got = b.expect_request(Method::Invite, None, ua::T);
    let pai: Vec<&str> = got.headers.get_all("P-Asserted-Identity").collect();
    assert_eq!(pai, ["<sip:1001@example.com>"], "{got:?}");
    b.respond(&got, 486, &[], b"");
    let (resp, _) = a.finish_invite(&inv);
    assert_eq!(resp.status, 486);

    // A From that is no subscriber (a number) passes; Privacy: id asks for no assertion.
    let extra = [("Privacy", "id")];
    let inv = digest_invite(&mut a, "pw1", "1002", "sip:+15551234@example.com", &extra);
    a.send(&inv);
    let got = b.expect_request(Method::Invite, None, ua::T);
    assert_eq!(
        got.from_hdr().unwrap().uri.user.as_deref(),
        Some("+15551234")
    );
    assert!(!got.headers.has("P-Asserted-Identity"), "{got:?}");
    b.respond(&got, 486, &[], b"");
    assert_eq!(a.finish_invite(&inv).0.status, 486);
}

#[test]
fn trusted_peer_identity_passes_unchanged() {
    let server = Server::spawn(ServerConfig::new());
    let mut gw = Ua::new("gw", DOMAIN, server.sip_addr());
    let mut b = Ua::new("1002", DOMAIN, server.sip_addr());
    b.register();
    let extra = [("P-Asserted-Identity", "<sip:+15550001@carrier.example.net>")];
    let mut inv = gw.invite_request("sip:1002@example.com", &extra, &offer());
    inv.headers.set("From", "<sip:1003@example.com>;tag=t1");
    gw.send(&inv);
    let got = b.expect_request(Method::Invite, None, ua::T);
    assert_eq!(got.from_hdr().unwrap().uri.user.as_deref(), Some("1003"));
    let pai: Vec<&str> = got.headers.get_all("P-Asserted-Identity").collect();
    assert_eq!(pai, ["<sip:+15550001@carrier.example.net>"]);
    b.respond(&got, 486, &[], b"");
    assert_eq!(gw.finish_invite(&inv).0.status, 486);
}

/// An INVITE whose leg-B copy is well over 1300 bytes (the pad is an end-to-end header).
fn big_invite(a: &mut Ua, callee: &str) -> Request {
    let pad = "x".repeat(1500);
    a.invite_request(
        &format!("sip:{callee}@{DOMAIN}"),
        &[("X-Pad", pad.as_str())],
        &offer(),
    )
}

#[test]
fn oversized_invite_to_a_udp_only_callee_gets_513_at_once() {
    let server = Server::spawn(ServerConfig::new());
    let mut a = Ua::new("1001", DOMAIN, server.sip_addr());
    let mut b = Ua::new("1002", DOMAIN, server.sip_addr());
    b.register(); // over UDP; nothing listens on TCP at its port
    let inv = big_invite(&mut a, "1002");
    let started = Instant::now();
    let (resp, _) = a.invite(&inv);
    assert_eq!(resp.status, 513, "{resp:?}");
    assert_eq!(error_code(&resp), "message-too-large", "{resp:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        b.wait_request(Method::Invite, None, Duration::from_millis(200))
            .is_none(),
        "the oversized INVITE went out over UDP"
    );
}

#[test]
fn oversized_invite_goes_over_tcp_when_the_callee_takes_it() {
    let server = Server::spawn(ServerConfig::new());
    let mut a = Ua::new("1001", DOMAIN, server.sip_addr());
    let mut b = Ua::new("1002", DOMAIN, server.sip_addr());
    // The callee also listens on TCP at its UDP port (a plain RFC 3261 UA does).
    let tcp = TcpListener::bind(b.addr).unwrap();
    b.register();
    let inv = big_invite(&mut a, "1002");
    a.send(&inv);

    tcp.set_nonblocking(false).unwrap();
    let (mut conn, _) = tcp.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let n = loop {
        let mut chunk = [0u8; 8192];
        let got = conn.read(&mut chunk).unwrap();
        assert!(got > 0, "connection closed before a whole INVITE");
        buf.extend_from_slice(&chunk[..got]);
        if let Ok(Frame::Message(n)) = frame_stream(&buf) {
            break n;
        }
    };
    assert!(n > 1300, "{n}");
    let Ok(SipMessage::Request(got)) = parse(&buf[..n]) else {
        panic!("not a request: {}", String::from_utf8_lossy(&buf[..n]));
    };
    assert_eq!(got.method, Method::Invite);
    assert_eq!(got.top_via().unwrap().transport, "TCP");
    assert!(got.headers.get("X-Pad").is_some_and(|p| p.len() == 1500));
    // Answer on the same connection (RFC 3261 §18.2.2); the caller gets it.
    let mut resp = got.response(486, None);
    resp.ensure_to_tag("tcpcallee");
    conn.write_all(&resp.to_bytes()).unwrap();
    let (resp, _) = a.finish_invite(&inv);
    assert_eq!(resp.status, 486);
    assert!(
        b.wait_request(Method::Invite, None, Duration::from_millis(200))
            .is_none(),
        "the oversized INVITE also went out over UDP"
    );
}
