//! The kernel fast path (`[media] kernel_forwarding`, issue 14) end to end: a real callvault,
//! real SIPps and UAs, every test in a private network namespace of its own
//! ([`common::private_netns`]) so the tc program never touches the machine's loopback.
//! Root only: skipped otherwise, a failure with `CALLVAULT_REQUIRE_TOOLS=1`.
//!
//! Which path carried the packets is read from callvault's counters: the kernel's per-leg
//! map counters (`callvault_rtp_packets_kernel_total`) against everything relayed
//! (`callvault_rtp_packets_relayed_total`, both gears); the parties' own sockets say what
//! arrived.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::time::{Duration, Instant};

use callvault::sip::message::Method;
use common::*;
use ua::{payload, sdp, sdp_audio, Call, Rtp, PCMU, T};

/// 4.98 s of PCMU in 20 ms packets: sip-scenarios/audio/pcmu-5s.pcap.
const PACKETS_5S: u64 = 250;

fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&server.metrics(), name, labels).unwrap_or(-1.0)
}

/// A server with the kernel path on, in this thread's private namespace; None when not root.
fn kernel_server(rtp_ports: u16, accounts: &[&str]) -> Option<Server> {
    if !private_netns() {
        return None;
    }
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(rtp_ports);
    cfg.kernel_forwarding = true;
    Some(start(cfg, accounts))
}

fn start(cfg: ServerConfig, accounts: &[&str]) -> Server {
    let mut s = Server::prepare(cfg);
    for a in accounts {
        s.account_add(a, "secret", "4321", "50MiB");
    }
    s.start();
    s
}

/// `calls` SIPp calls with 5 s of RTP each way: all answered, each end gets what the other
/// sent (within 1%), and the kernel carried all but the latching packets.
#[test]
fn sipp_calls_are_relayed_by_the_kernel_within_one_percent() {
    if !tool_available("sipp") {
        return;
    }
    let calls: u32 = 200;
    let ports = PortBlock::reserve(10);
    if !private_netns() {
        return;
    }
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(900);
    cfg.kernel_forwarding = true;
    cfg.route_to = Some((ports.port(0), Transport::Udp));
    let server = start(cfg, &[]);
    let log = server.log();
    assert!(log.contains("media=kernel"), "{log}");
    assert_eq!(
        metric(&server, "callvault_media_path", &[("path", "kernel")]),
        1.0
    );
    let (uas_media, uac_media) = (ports.port(2), ports.port(6));
    let capture = RtpCapture::start(&[uac_media, uas_media]);
    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(uas_media)
        .calls(calls)
        .timeout(Duration::from_secs(90))
        .spawn();
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(ports.port(1))
        .media_port(uac_media)
        .calls(calls)
        .rate(20.0)
        .timeout(Duration::from_secs(90))
        .run();
    let uas = uas.wait();
    uac.assert_successful(u64::from(calls));
    uas.assert_successful(u64::from(calls));

    // The relays publish their last kernel counts as they stop, right after the BYEs.
    let sent = u64::from(calls) * PACKETS_5S;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut relayed, mut kernel);
    loop {
        let text = server.metrics();
        relayed = metric_value(&text, "callvault_rtp_packets_relayed_total", &[]).unwrap_or(0.0);
        kernel = metric_value(&text, "callvault_rtp_packets_kernel_total", &[]).unwrap_or(0.0);
        let idle = metric_value(&text, "callvault_rtp_ports_in_use", &[]) == Some(0.0);
        if idle || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (relayed, kernel) = (relayed as u64, kernel as u64);
    assert!(
        relayed * 100 >= 2 * sent * 99,
        "relayed {relayed} of {}",
        2 * sent
    );
    // User space saw only each leg's latching packet(s).
    assert!(
        kernel * 100 >= relayed * 99,
        "kernel carried {kernel} of {relayed}"
    );
    if let Some(capture) = capture {
        let counts = capture.stop();
        for port in [uas_media, uac_media] {
            let got = counts.to_port(port);
            assert!(
                got * 100 >= sent * 99 && got <= sent,
                "RTP to port {port}: got {got}, sent {sent} ({counts:?})"
            );
        }
    }
}

/// The same call with the kernel path off: user space carries every packet.
#[test]
fn with_kernel_forwarding_off_user_space_carries_everything() {
    if !private_netns() {
        return;
    }
    let server = start(ServerConfig::new(), &["1001", "1002"]);
    assert!(server.log().contains("media=user"), "{}", server.log());
    let c = Call::establish(server.sip_addr(), "1001", "1002");
    talk(&c, 0..50);
    let text = server.metrics();
    assert_eq!(
        metric_value(&text, "callvault_media_path", &[("path", "user")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&text, "callvault_rtp_packets_kernel_total", &[]),
        Some(0.0)
    );
}

/// Without CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN the program cannot be attached: callvault
/// says so and relays in user space.
#[test]
fn without_capabilities_it_falls_back_to_user_space() {
    if !private_netns() {
        return;
    }
    let mut cfg = ServerConfig::new();
    cfg.kernel_forwarding = true;
    let mut s = Server::prepare(cfg);
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.set_wrapper(&[
        "setpriv",
        "--inh-caps=-bpf,-net_admin,-sys_admin",
        "--bounding-set=-bpf,-net_admin,-sys_admin",
        "--",
    ]);
    s.start();
    let log = s.log();
    assert!(log.contains("media=user"), "{log}");
    assert!(log.contains("kernel fast path unavailable"), "{log}");
    let c = Call::establish(s.sip_addr(), "1001", "1002");
    talk(&c, 0..20);
}

/// Packets `range` from A to B and back, each checked on arrival (source, payload).
fn talk(c: &Call, range: std::ops::Range<u32>) {
    for i in range {
        c.a_media
            .send(c.a_media_to, 0, false, i as u16, i * 160, 0xa, &payload(i));
        let p = c.b_media.recv(T).expect("A to B");
        assert_eq!((p.from, p.payload), (c.b_media_to, payload(i)), "A->B {i}");
        c.b_media
            .send(c.b_media_to, 0, false, i as u16, i * 160, 0xb, &payload(i));
        let p = c.a_media.recv(T).expect("B to A");
        assert_eq!((p.from, p.payload), (c.a_media_to, payload(i)), "B->A {i}");
    }
}

/// Polls the kernel counter until it reaches `at_least` (the relays read it every 500 ms).
fn wait_kernel(server: &Server, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(server, "callvault_rtp_packets_kernel_total", &[]);
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// B moves its media to a new port with a re-INVITE mid-call: A's packets follow within one
/// packet, B's packets from the new port are relayed, and both stay in the kernel.
#[test]
fn reinvite_to_a_new_port_is_followed_within_one_packet() {
    let Some(server) = kernel_server(100, &["1001", "1002"]) else {
        return;
    };
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    talk(&c, 0..50);
    let k = wait_kernel(&server, 98.0);
    assert!(k >= 98.0, "kernel carried {k} of 100");

    // B's re-INVITE with a new media port; callvault asks A, A answers with its own SDP.
    let moved = Rtp::bind();
    let reinv = c.b.in_dialog_request(
        &mut c.bd,
        Method::Invite,
        &[("Content-Type", "application/sdp")],
        sdp(moved.port, PCMU, "sendrecv").as_bytes(),
    );
    c.b.send_in_dialog(&c.bd, &reinv);
    let ainv = c.a.expect_request(Method::Invite, None, T);
    let contact = c.a.contact().to_string();
    c.a.respond(
        &ainv,
        200,
        &[("Contact", &contact), ("Content-Type", "application/sdp")],
        sdp(c.a_media.port, PCMU, "sendrecv").as_bytes(),
    );
    let (resp, _) = c.b.finish_invite(&reinv);
    assert_eq!(resp.status, 200);
    let (to_b, _) = sdp_audio(&resp.body);
    assert_eq!(to_b, c.b_media_to, "B keeps its relay port");
    // Packets from A at 20 ms: at most the first may still reach the old port.
    let mut old = 0;
    for i in 100..150u32 {
        c.a_media
            .send(c.a_media_to, 0, false, i as u16, i * 160, 0xa, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
        while c.b_media.recv(Duration::from_millis(1)).is_some() {
            old += 1;
        }
    }
    let mut new = 0;
    while let Some(p) = moved.recv(Duration::from_millis(300)) {
        assert_eq!(p.from, c.b_media_to);
        new += 1;
    }
    assert!(
        old <= 1 && new + old == 50,
        "old port {old}, new port {new}"
    );
    // B now speaks from the new port: relayed to A.
    for i in 200..230u32 {
        moved.send(c.b_media_to, 0, false, i as u16, i * 160, 0xb, &payload(i));
        let p = c.a_media.recv(T).expect("B (moved) to A");
        assert_eq!(p.payload, payload(i));
    }
    let k2 = wait_kernel(&server, k + 50.0 + 29.0 - 1.0);
    assert!(
        k2 >= k + 78.0,
        "kernel carried {} of 80 after the move",
        k2 - k
    );
}

/// How many TCX programs are attached to the ingress of this namespace's `lo` (ifindex 1):
/// `BPF_PROG_QUERY` by hand (bpftool 7.1 predates TCX).
fn on_lo() -> u32 {
    #[repr(C)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    let mut q = Query {
        target_ifindex: 1,
        attach_type: BPF_TCX_INGRESS,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        prog_cnt: 0,
        pad: 0,
        prog_attach_flags: 0,
        link_ids: 0,
        link_attach_flags: 0,
        revision: 0,
    };
    // SAFETY: `q` is a BPF_PROG_QUERY attr with no id arrays: the kernel writes only counts.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut q as *mut Query,
            std::mem::size_of::<Query>(),
        )
    };
    assert_eq!(r, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
    q.prog_cnt
}

/// The program is attached while callvault runs and gone after it, whether it stops cleanly
/// (detached on the way out) or is killed with SIGKILL (the unpinned links go with it).
#[test]
fn the_program_goes_with_the_process_on_stop_and_on_kill_9() {
    let Some(mut s) = kernel_server(20, &[]) else {
        return;
    };
    assert_eq!(on_lo(), 1);
    s.stop();
    assert!(s.log().contains("kernel fast path detached"), "{}", s.log());
    assert_eq!(on_lo(), 0);
    s.start();
    assert_eq!(on_lo(), 1);
    s.kill_hard();
    // The links close with the process's descriptors, which the kernel releases at exit.
    let deadline = Instant::now() + Duration::from_secs(2);
    while on_lo() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(on_lo(), 0);
    // And the next start finds a clean interface and attaches once.
    s.start();
    assert_eq!(on_lo(), 1);
}

/// A recorded call needs every packet in user space (until the ring-buffer path exists): the
/// kernel path stays out of it. (tests/recording.rs checks the recordings themselves with the
/// kernel path on: scripts/test runs it with `CALLVAULT_TEST_KERNEL_FORWARDING=1`.)
#[test]
fn recorded_calls_stay_in_user_space() {
    if !private_netns() {
        return;
    }
    let mut cfg = ServerConfig::new();
    cfg.kernel_forwarding = true;
    let mut s = Server::prepare(cfg);
    s.set_env("CALLVAULT_MEDIA_RECORD_CALLS", "true");
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.start();
    let mut c = Call::establish(s.sip_addr(), "1001", "1002");
    // The recording starts shortly after the answer (its stores are made first).
    std::thread::sleep(Duration::from_millis(500));
    talk(&c, 0..30);
    // The relay publishes its counts at a packet 100 ms after its last publication; then any
    // SIP event has the core publish the totals.
    std::thread::sleep(Duration::from_millis(700));
    talk(&c, 30..31);
    c.b.register();
    let text = s.metrics();
    assert_eq!(
        metric_value(&text, "callvault_rtp_packets_kernel_total", &[]),
        Some(0.0),
        "{text}"
    );
    let relayed = metric_value(&text, "callvault_rtp_packets_relayed_total", &[]).unwrap_or(0.0);
    assert!(relayed >= 60.0, "relayed {relayed} of 60");
}
