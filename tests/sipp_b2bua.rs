//! SIPp UAC -> callvault -> SIPp UAS: the B2BUA with anchored media, driven by real SIPp.
//!
//! Every test starts its own callvault (fresh ports, temp data dir) and SIPp pair on
//! 127.0.0.1. RTP is counted from a loopback capture at both SIPp ends (SIPp does not count
//! what it receives). Tests skip with a SKIPPED line when SIPp is missing, unless
//! `CALLVAULT_REQUIRE_TOOLS=1` (set by scripts/test and CI) makes that a failure.

mod common;

use std::time::Duration;

use common::*;

/// 4.98 s of PCMU in 20 ms packets: sip-scenarios/audio/pcmu-5s.pcap.
const PACKETS_5S: u64 = 250;

struct Lab {
    server: Server,
    _ports: PortBlock,
    uas_sip: u16,
    uac_sip: u16,
    uas_media: u16,
    uac_media: u16,
}

/// A callvault routing every call to a UAS on a fresh port over `transport`.
fn lab(transport: Transport, rtp_ports: u16) -> Lab {
    let ports = PortBlock::reserve(10);
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(rtp_ports);
    cfg.route_to = Some((ports.port(0), transport));
    let server = Server::spawn(cfg);
    Lab {
        server,
        uas_sip: ports.port(0),
        uac_sip: ports.port(1),
        uas_media: ports.port(2),
        uac_media: ports.port(6),
        _ports: ports,
    }
}

impl Lab {
    fn uas(&self, scenario: &str, transport: Transport, calls: u32) -> SippRun {
        Sipp::uas(scenario)
            .port(self.uas_sip)
            .media_port(self.uas_media)
            .transport(transport)
            .calls(calls)
            .timeout(Duration::from_secs(90))
            .trace_messages(calls <= 10)
            .spawn()
    }

    fn uac(&self, scenario: &str, transport: Transport, calls: u32, rate: f64) -> Sipp {
        Sipp::uac(scenario, self.server.sip_addr())
            .port(self.uac_sip)
            .media_port(self.uac_media)
            .transport(transport)
            .calls(calls)
            .rate(rate)
            .timeout(Duration::from_secs(90))
            .trace_messages(calls <= 10)
    }

    /// After every call ended: nothing active, every RTP port back.
    fn assert_idle(&self) {
        // The relay tasks return their ports asynchronously right after the BYE.
        let mut text = String::new();
        for _ in 0..50 {
            text = self.server.metrics();
            let active = metric_value(&text, "callvault_calls_active", &[]);
            let ports = metric_value(&text, "callvault_rtp_ports_in_use", &[]);
            if active == Some(0.0) && ports == Some(0.0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("callvault not idle after the run:\n{text}");
    }
}

/// The acceptance run of the SIP foundation: `calls` calls at `rate`/s with 5 s of RTP each
/// way; all complete, no unexpected message, RTP counts at each end equal to what the other
/// end sent (within 1%).
fn load_run(transport: Transport, calls: u32, rate: f64) {
    if !tool_available("sipp") {
        return;
    }
    let lab = lab(transport, 900);
    let capture = RtpCapture::start(&[lab.uac_media, lab.uas_media]);
    let uas = lab.uas("basic", transport, calls);
    let uac = lab.uac("basic", transport, calls, rate).run();
    let uas = uas.wait();
    uac.assert_successful(u64::from(calls));
    uas.assert_successful(u64::from(calls));
    assert_eq!(uac.unexpected + uas.unexpected, 0, "unexpected messages");

    let text = lab.server.metrics();
    assert_eq!(
        metric_value(&text, "callvault_calls_total", &[("outcome", "answered")]),
        Some(f64::from(calls)),
        "{text}"
    );
    lab.assert_idle();

    let Some(capture) = capture else {
        eprintln!("RTP counts not checked: no capture");
        return;
    };
    let counts = capture.stop();
    let sent = u64::from(calls) * PACKETS_5S;
    for port in [lab.uas_media, lab.uac_media] {
        let got = counts.to_port(port);
        assert!(
            got * 100 >= sent * 99 && got <= sent,
            "RTP to port {port}: got {got}, sent {sent} ({counts:?})"
        );
    }
    let relayed = metric_value(&text, "callvault_rtp_packets_relayed_total", &[]).unwrap_or(0.0);
    assert!(
        relayed as u64 * 100 >= 2 * sent * 99,
        "relayed {relayed} of {}",
        2 * sent
    );
}

#[test]
fn two_hundred_calls_udp_with_rtp_both_ways() {
    load_run(Transport::Udp, 200, 20.0);
}

#[test]
fn two_hundred_calls_tcp_with_rtp_both_ways() {
    load_run(Transport::Tcp, 200, 20.0);
}

/// Each call-flow scenario pair passes through callvault on both transports.
fn scenario(name: &str, transport: Transport) {
    if !tool_available("sipp") {
        return;
    }
    let lab = lab(transport, 100);
    let uas = lab.uas(name, transport, 3);
    let uac = lab.uac(name, transport, 3, 5.0).run();
    let uas = uas.wait();
    uac.assert_successful(3);
    uas.assert_successful(3);
    assert_eq!(uac.unexpected + uas.unexpected, 0);
    lab.assert_idle();
}

#[test]
fn info_and_message_both_ways_bodies_intact_udp() {
    scenario("info_message", Transport::Udp);
}

#[test]
fn info_and_message_both_ways_bodies_intact_tcp() {
    scenario("info_message", Transport::Tcp);
}

#[test]
fn cancel_before_answer_udp() {
    scenario("cancel", Transport::Udp);
    // (the UAC asserts 200 to CANCEL and 487 to the INVITE)
}

#[test]
fn cancel_before_answer_tcp() {
    scenario("cancel", Transport::Tcp);
}

#[test]
fn bye_from_callee_udp() {
    scenario("callee_bye", Transport::Udp);
}

#[test]
fn bye_from_callee_tcp() {
    scenario("callee_bye", Transport::Tcp);
}

#[test]
fn reinvite_hold_resume_udp() {
    scenario("hold", Transport::Udp);
}

#[test]
fn reinvite_hold_resume_tcp() {
    scenario("hold", Transport::Tcp);
}

/// Broken header, bad Content-Length, truncated body: each gets a 400 naming the fault (the
/// scenario checks), the server keeps serving, and the next call succeeds.
#[test]
fn malformed_requests_get_400_and_next_call_succeeds() {
    if !tool_available("sipp") {
        return;
    }
    let lab = lab(Transport::Udp, 100);
    let bad = Sipp::uac("malformed", lab.server.sip_addr())
        .port(lab.uac_sip)
        .timeout(Duration::from_secs(30))
        .run();
    bad.assert_successful(1);
    let text = lab.server.metrics();
    assert!(
        metric_value(&text, "callvault_sip_malformed_total", &[]).unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    let uas = lab.uas("basic", Transport::Udp, 1);
    let uac = lab.uac("basic", Transport::Udp, 1, 1.0).run();
    uas.wait().assert_successful(1);
    uac.assert_successful(1);
}

/// REGISTER from an untrusted address: 401 with a digest challenge, then 200 with the
/// binding; unregister with Expires: 0.
#[test]
fn register_with_digest() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(2);
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = false;
    let mut server = Server::prepare(cfg);
    server.account_add("1001", "secret", "1234", "50MiB");
    server.start();
    let reg = Sipp::uac("register", server.sip_addr())
        .port(ports.port(0))
        .auth("1001", "secret")
        .timeout(Duration::from_secs(30))
        .run();
    reg.assert_successful(1);
    assert!(reg.messages.contains("SIP/2.0 401"), "{}", reg.messages);
    assert!(
        reg.messages.contains("WWW-Authenticate: Digest"),
        "{}",
        reg.messages
    );
    assert!(reg.messages.contains("qop=\"auth\""), "{}", reg.messages);

    let wrong = Sipp::uac("register", server.sip_addr())
        .port(ports.port(1))
        .auth("1001", "not-the-password")
        .timeout(Duration::from_secs(10))
        .run();
    assert_eq!(wrong.successful, 0, "a wrong password must not register");
}

/// A callee reached through its registration (not a route): it registers from the port it
/// then answers on, and the call goes to that source address.
#[test]
fn call_to_registered_user() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(10);
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(100);
    let mut server = Server::prepare(cfg);
    server.account_add("1002", "secret", "1234", "50MiB");
    server.start();
    // Registers 1002 from ports.port(0) (trusted loopback: no challenge), keeps the binding.
    let reg = Sipp::uac("register_keep", server.sip_addr())
        .port(ports.port(0))
        .service("1002")
        .auth("1002", "secret")
        .timeout(Duration::from_secs(10))
        .run();
    reg.assert_successful(1);
    let text = server.metrics();
    assert_eq!(
        metric_value(&text, "callvault_registrations_active", &[]),
        Some(1.0),
        "{text}"
    );

    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(ports.port(2))
        .timeout(Duration::from_secs(30))
        .spawn();
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(ports.port(1))
        .media_port(ports.port(6))
        .timeout(Duration::from_secs(30))
        .run();
    uac.assert_successful(1);
    uas.wait().assert_successful(1);
}

/// Nobody registered and no route: 404 with the JSON error body.
#[test]
fn unknown_callee_gets_404() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(2);
    let server = Server::spawn(ServerConfig::new());
    let r = Sipp::uac("unknown_callee", server.sip_addr())
        .port(ports.port(0))
        .timeout(Duration::from_secs(10))
        .run();
    r.assert_successful(1);
    assert!(
        r.messages.contains("application/vnd.callvault.error+json"),
        "{}",
        r.messages
    );
}
