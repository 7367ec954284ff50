//! Attacks on the media plane and on call state of a running `callvault serve` (issue 10,
//! findings 1, 2 and 7): real UDP on loopback, other hosts played by 127.0.0.2 / 127.0.0.3.
//!
//! - RTP bleed: a stranger's packets to the caller-facing port, before the caller speaks and
//!   after it pauses, get nothing and redirect nothing; the caller still hears the callee.
//! - Store injection: garbage first, then the real sender: only the sender's packets are
//!   stored; another port on the sender's host after a pause is not.
//! - Ringing calls free their ports at `ring_timeout_secs`; a 2xx never ACKed is ended with BYE
//!   after 64*T1 and its ports freed.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use callvault::sip::dialog::Dialog;
use callvault::sip::message::{HeaderAccess, Method, SipMessage};
use common::{metric_value, Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, Ua, PCMU, T};

/// A socket on another loopback "host".
fn stranger(host: &str) -> UdpSocket {
    let s = UdpSocket::bind((host, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s
}

fn rtp_bytes(seq: u16, ssrc: u32, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(body);
    p
}

/// Nothing arrives on `s` within its read timeout.
fn silent(s: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    s.recv_from(&mut buf).is_err()
}

/// Sends packets `range` of the test stream from `from` to `to`, 5 ms apart.
fn burst(from: &Rtp, to: SocketAddr, ssrc: u32, range: std::ops::Range<u32>) {
    for i in range {
        from.send(to, 0, false, i as u16, 160 * i, ssrc, &payload(i));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How many of the test stream's packets `range` arrive at `at` (in any order), waiting up to
/// 2 s; packets from elsewhere are an error.
fn heard(at: &Rtp, from: SocketAddr, range: std::ops::Range<u32>) -> usize {
    let mut n = 0;
    while n < range.len() {
        let Some(p) = at.recv(Duration::from_secs(2)) else {
            break;
        };
        assert_eq!(p.from, from, "a packet from an unexpected source");
        let i = u32::from(p.seq);
        assert!(range.contains(&i) && p.payload == payload(i), "{p:?}");
        n += 1;
    }
    n
}

fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&server.metrics(), name, labels).unwrap_or(-1.0)
}

/// Polls `/metrics` until `name` equals `want` (within `timeout`); the last value read.
fn wait_metric(server: &Server, name: &str, want: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(server, name, &[]);
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A call 1001 -> 1002 through `server` with RTP sockets at both ends, announced in the SDPs.
struct MediaCall {
    /// The parties' UAs and dialogs, kept for the call's lifetime.
    _uas: (Ua, Ua),
    a_rtp: Rtp,
    b_rtp: Rtp,
    /// The relay's port facing A (where A sends) and facing B.
    a_side: SocketAddr,
    b_side: SocketAddr,
    _dialogs: (Dialog, Dialog),
}

fn media_call(server: &Server) -> MediaCall {
    let mut b = Ua::new("1002", "example.com", server.sip_addr());
    b.register();
    let mut a = Ua::new("1001", "example.com", server.sip_addr());
    let (a_rtp, b_rtp) = (Rtp::bind(), Rtp::bind());
    let inv = a.invite_request(
        "sip:1002@example.com",
        &[],
        &sdp(a_rtp.port, PCMU, "sendrecv"),
    );
    a.send(&inv);
    let binv = b.expect_request(Method::Invite, None, T);
    let (b_side, _) = sdp_audio(&binv.body);
    let bd = b.accept_invite(&binv, &sdp(b_rtp.port, PCMU, "sendrecv"));
    let (resp, ad) = a.finish_invite(&inv);
    assert_eq!(resp.status, 200);
    b.expect_request(Method::Ack, None, T);
    let (a_side, _) = sdp_audio(&resp.body);
    MediaCall {
        _uas: (a, b),
        a_rtp,
        b_rtp,
        a_side,
        b_side,
        _dialogs: (ad.unwrap(), bd),
    }
}

// ---------------------------------------------------------------------------------------------
// Finding 1: RTP bleed

#[test]
fn eavesdropper_gets_nothing_and_the_caller_still_hears_the_callee() {
    let server = Server::spawn(ServerConfig::new());
    let c = media_call(&server);
    let (a_from_relay, b_from_relay) = (c.a_side, c.b_side);
    let evil = stranger("127.0.0.2");
    let rtcp = |a: SocketAddr| SocketAddr::new(a.ip(), a.port() + 1);
    let refused_before = metric(
        &server,
        "callvault_rtp_packets_refused_total",
        &[("reason", "foreign_source")],
    );

    // Before the caller says anything, the stranger sends valid RTP (the negotiated PCMU) and
    // RTCP to the caller-facing ports.
    for i in 0..5u16 {
        evil.send_to(&rtp_bytes(i, 0xbad, &[0xaa; 160]), c.a_side)
            .unwrap();
        evil.send_to(&[0x81, 201, 0, 1, 0, 0, 0x0b, 0xad], rtcp(c.a_side))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    // The callee talks: every packet reaches the caller, none the stranger.
    burst(&c.b_rtp, c.b_side, 7, 0..50);
    assert_eq!(heard(&c.a_rtp, a_from_relay, 0..50), 50, "the caller heard");
    assert!(silent(&evil), "the eavesdropper got a packet");
    assert!(
        c.b_rtp.recv(Duration::from_millis(100)).is_none(),
        "injected into B"
    );

    // The caller talks, then pauses 3 s; the stranger tries again.
    burst(&c.a_rtp, c.a_side, 9, 100..110);
    assert_eq!(heard(&c.b_rtp, b_from_relay, 100..110), 10);
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..5u16 {
        evil.send_to(&rtp_bytes(200 + i, 9, &[0xaa; 160]), c.a_side)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    burst(&c.b_rtp, c.b_side, 7, 50..100);
    assert_eq!(
        heard(&c.a_rtp, a_from_relay, 50..100),
        50,
        "after the pause"
    );
    assert!(
        silent(&evil),
        "the eavesdropper got a packet after the pause"
    );
    assert!(
        c.b_rtp.recv(Duration::from_millis(100)).is_none(),
        "injected into B"
    );

    let refused = metric(
        &server,
        "callvault_rtp_packets_refused_total",
        &[("reason", "foreign_source")],
    );
    assert!(
        refused >= refused_before + 15.0,
        "refused {refused_before} -> {refused}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 2: store injection

/// Every (seq, payload) of a store's segment log.
fn stored_records(server: &Server, id: &str) -> Vec<(u16, Vec<u8>)> {
    let dir = server.dir.path().join("data").join("stores").join(id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut r = callvault::storage::segments::SegmentReader::open(&dir, 0, None);
        let mut out = Vec::new();
        while let Ok(Some(rec)) = r.next().await {
            out.push((rec.header.seq, rec.payload.to_vec()));
        }
        out
    })
}

#[test]
fn injected_packets_are_not_stored_and_the_senders_are() {
    let mut s = Server::prepare(ServerConfig::new());
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.start();
    let mut c = Call::establish(s.sip_addr(), "1001", "1002");
    c.keep_alive();
    // B asks for storage; A is prompted and opens the store session.
    let prompt = c.ask_for_storage(r#"{"pin":"4321"}"#);
    let id = prompt["store_id"].as_str().unwrap().to_string();
    let sender = Rtp::bind();
    let inv = c.a.invite_request(
        prompt["store_uri"].as_str().unwrap(),
        &[("Callvault-Data-Size", "16000")],
        &sdp(sender.port, PCMU, "sendonly"),
    );
    let (r, sd) = c.a.invite(&inv);
    assert_eq!(r.status, 200);
    let mut sd = sd.unwrap();
    let (store_port, _) = sdp_audio(&r.body);

    // The injector speaks first: garbage, then RTP that looks right.
    let evil = stranger("127.0.0.2");
    evil.send_to(b"\x00\x01garbage", store_port).unwrap();
    for i in 0..5u16 {
        evil.send_to(&rtp_bytes(5000 + i, 0xbad, b"EVIL"), store_port)
            .unwrap();
    }
    burst(&sender, store_port, 11, 0..10);
    // The sender pauses; another port on its own host, and the injector again.
    std::thread::sleep(Duration::from_millis(2500));
    let same_host = Rtp::bind();
    for i in 0..5u32 {
        same_host.send(store_port, 0, false, 6000 + i as u16, 0, 11, b"SAME HOST");
        evil.send_to(&rtp_bytes(7000 + i as u16, 11, b"EVIL"), store_port)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    burst(&sender, store_port, 11, 10..20);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.a.bye(&mut sd).status, 200);

    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = stored_records(&s, &id);
    while got.len() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        got = stored_records(&s, &id);
    }
    let want: Vec<(u16, Vec<u8>)> = (0..20u32).map(|i| (i as u16, payload(i))).collect();
    assert_eq!(got, want, "exactly the sender's packets");
    let text = s.metrics();
    let refused = metric_value(
        &text,
        "callvault_rtp_packets_refused_total",
        &[("reason", "foreign_source")],
    )
    .unwrap_or(0.0);
    assert!(refused >= 15.0, "{refused}");
}

// ---------------------------------------------------------------------------------------------
// Finding 7: ringing and un-ACKed calls

#[test]
fn ringing_and_unacked_calls_free_their_ports() {
    let mut s = Server::prepare(ServerConfig::new());
    s.set_env("CALLVAULT_SIP_RING_TIMEOUT_SECS", "2");
    // No RTP flows in these calls: keep the RTP timeout (10 s) from ending the un-ACKed call
    // before Timer L does.
    s.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
    s.start();
    let mut b = Ua::new("1002", "example.com", s.sip_addr());
    b.register();
    let mut a = Ua::new("1001", "example.com", s.sip_addr());
    let branch =
        |r: &callvault::sip::message::Request| r.top_via().unwrap().branch().unwrap().to_string();

    // A call that only rings.
    let ring = a.invite_request("sip:1002@example.com", &[], &sdp(7000, PCMU, "sendrecv"));
    a.send(&ring);
    let b_ring = b.expect_request(Method::Invite, None, T);
    b.respond(&b_ring, 180, &[], b"");
    // A call answered whose 2xx A never ACKs.
    let noack = a.invite_request("sip:1002@example.com", &[], &sdp(7002, PCMU, "sendrecv"));
    a.send(&noack);
    let b_noack = b.expect_request(Method::Invite, None, T);
    b.accept_invite(&b_noack, &sdp(7004, PCMU, "sendrecv"));
    let ok = a.final_response(&branch(&noack), T).expect("200");
    assert_eq!(ok.status, 200);
    let answered_at = Instant::now();
    assert_eq!(
        wait_metric(&s, "callvault_rtp_ports_in_use", 8.0, T),
        8.0,
        "two calls, two port pairs each"
    );

    // The ring timeout: 408 to A, CANCEL to B, that call's ports back.
    let timeout = a.final_response(&branch(&ring), T).expect("final answer");
    assert_eq!(timeout.status, 408);
    let body: Value = serde_json::from_slice(&timeout.body).unwrap();
    assert_eq!(body["error"], "timeout");
    let cancel = b.expect_request(Method::Cancel, None, T);
    assert_eq!(cancel.call_id(), b_ring.call_id());
    b.respond(&cancel, 200, &[], b"");
    b.respond(&b_ring, 487, &[], b"");
    assert_eq!(
        wait_metric(
            &s,
            "callvault_rtp_ports_in_use",
            4.0,
            Duration::from_secs(2)
        ),
        4.0
    );

    // 64*T1 = 32 s after the 2xx: BYE to A; B's 2xx is ACKed, then BYE; all ports back.
    let call_id = noack.call_id().unwrap().to_string();
    a.expect_bye(&call_id, Duration::from_secs(40));
    let waited = answered_at.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(36),
        "BYE {waited:?} after the 2xx"
    );
    let b_call = b_noack.call_id().unwrap().to_string();
    let ack = b.wait_for(T, |m| {
        matches!(m, SipMessage::Request(r) if r.method == Method::Ack && r.call_id() == Some(&b_call))
    });
    assert!(ack.is_some(), "B's 2xx is ACKed before the BYE");
    b.expect_bye(&b_call, T);
    assert_eq!(
        wait_metric(
            &s,
            "callvault_rtp_ports_in_use",
            0.0,
            Duration::from_secs(2)
        ),
        0.0
    );
    assert_eq!(wait_metric(&s, "callvault_calls_active", 0.0, T), 0.0);
}
