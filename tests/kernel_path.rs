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

const ADMIN: &str = "kernel-admin-token";

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

/// 200 SIPp calls with 5 s of RTP each way, run through a server with the kernel path on in
/// this thread's private namespace (`record`: with whole-call recording): every call answered.
struct SippCalls {
    server: Server,
    /// The capture of both SIPp media ports, when this user may capture.
    capture: Option<RtpCapture>,
    /// The UAS's and the UAC's media ports.
    media: [u16; 2],
    /// Packets each SIPp sent.
    sent: u64,
    _ports: PortBlock,
}

fn sipp_calls_through_the_kernel(record: bool) -> Option<SippCalls> {
    let calls: u32 = 200;
    if !tool_available("sipp") {
        return None;
    }
    let ports = PortBlock::reserve(10);
    if !private_netns() {
        return None;
    }
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(900);
    cfg.kernel_forwarding = true;
    cfg.route_to = Some((ports.port(0), Transport::Udp));
    let mut server = Server::prepare(cfg);
    if record {
        server.set_env("CALLVAULT_MEDIA_RECORD_CALLS", "true");
    }
    server.set_env("CALLVAULT_HTTP_ADMIN_TOKEN", ADMIN);
    server.start();
    let log = server.log();
    assert!(log.contains("media=kernel"), "{log}");
    assert_eq!(
        metric(&server, "callvault_media_path", &[("path", "kernel")]),
        1.0
    );
    let media = [ports.port(2), ports.port(6)];
    let capture = RtpCapture::start(&media);
    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(media[0])
        .calls(calls)
        .timeout(Duration::from_secs(90))
        .spawn();
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(ports.port(1))
        .media_port(media[1])
        .calls(calls)
        .rate(20.0)
        .timeout(Duration::from_secs(90))
        .run();
    let uas = uas.wait();
    uac.assert_successful(u64::from(calls));
    uas.assert_successful(u64::from(calls));
    Some(SippCalls {
        server,
        capture,
        media,
        sent: u64::from(calls) * PACKETS_5S,
        _ports: ports,
    })
}

impl SippCalls {
    /// Once the relays have stopped (they publish their last kernel counts then): everything
    /// was relayed (within 1%), all but the latching packets by the kernel, and each SIPp got
    /// what the other sent (within 1%). The server's metrics text then.
    fn assert_relayed_by_the_kernel(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = self.server.metrics();
            let idle = metric_value(&text, "callvault_rtp_ports_in_use", &[]) == Some(0.0);
            if idle || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let get = |name: &str| metric_value(&text, name, &[]).unwrap_or(0.0) as u64;
        let relayed = get("callvault_rtp_packets_relayed_total");
        let kernel = get("callvault_rtp_packets_kernel_total");
        let sent = self.sent;
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
        if let Some(capture) = self.capture.take() {
            let counts = capture.stop();
            for port in self.media {
                let got = counts.to_port(port);
                assert!(
                    got * 100 >= sent * 99 && got <= sent,
                    "RTP to port {port}: got {got}, sent {sent} ({counts:?})"
                );
            }
        }
        text
    }
}

/// 200 SIPp calls with 5 s of RTP each way: all answered, each end gets what the other sent
/// (within 1%), and the kernel carried all but the latching packets.
#[test]
fn sipp_calls_are_relayed_by_the_kernel_within_one_percent() {
    if let Some(mut run) = sipp_calls_through_the_kernel(false) {
        run.assert_relayed_by_the_kernel();
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

/// The raw recording of each direction, by sender (A's audio first), once both are complete.
fn recordings_by_sender(server: &Server, calls: usize) -> Vec<(String, Vec<u8>)> {
    let recs = complete_recordings(server, ADMIN, 2 * calls);
    let mut out: Vec<(String, Vec<u8>)> = recs
        .iter()
        .map(|s| {
            let id = s["store_id"].as_str().unwrap();
            let path = format!("/v1/stores/{id}/media?format=raw");
            let (status, media) = admin_get(server.http_addr(), ADMIN, &path);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&media));
            assert_eq!(media.len() as u64, s["received_bytes"].as_u64().unwrap());
            (s["sender"].as_str().unwrap().to_string(), media)
        })
        .collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

/// A server recording every call, the kernel path on, accounts 1001 and 1002, in this thread's
/// private namespace; None when not root.
fn recording_kernel_server() -> Option<Server> {
    if !private_netns() {
        return None;
    }
    let mut cfg = ServerConfig::new();
    cfg.kernel_forwarding = true;
    let mut s = Server::prepare(cfg);
    s.set_env("CALLVAULT_MEDIA_RECORD_CALLS", "true");
    s.set_env("CALLVAULT_HTTP_ADMIN_TOKEN", ADMIN);
    for a in ["1001", "1002"] {
        s.account_add(a, "secret", "4321", "50MiB");
    }
    s.start();
    Some(s)
}

/// A recorded call is forwarded *and* recorded by the kernel: the program copies every
/// forwarded datagram into its ring, the log writer thread drains it into the store logs.
/// Each direction's recording is byte for byte what was relayed, and the counters say that
/// all but the latching packet of each direction came through the kernel and its ring.
#[test]
fn a_recorded_call_is_forwarded_and_recorded_by_the_kernel() {
    let Some(s) = recording_kernel_server() else {
        return;
    };
    let mut c = Call::establish(s.sip_addr(), "1001", "1002");
    // The recording starts shortly after the answer (its stores are made first).
    std::thread::sleep(Duration::from_millis(500));
    talk(&c, 0..50);
    let k = wait_kernel(&s, 98.0);
    assert!(k >= 98.0, "kernel carried {k} of 100");
    let bye = c.a.bye(&mut c.ad);
    assert_eq!(bye.status, 200);
    let audio: Vec<u8> = (0..50).flat_map(payload).collect();
    for (sender, media) in recordings_by_sender(&s, 1) {
        assert!(
            media == audio,
            "{sender}'s recording differs from what was relayed"
        );
    }
    let text = s.metrics();
    let via_ring = metric_value(&text, "callvault_rtp_packets_stored_kernel_total", &[]);
    assert!(
        via_ring >= Some(98.0),
        "recorded through the ring: {via_ring:?}"
    );
    assert_eq!(
        metric_value(&text, "callvault_recording_packets_refused_total", &[]),
        Some(0.0)
    );
}

/// 200 SIPp calls, recorded, with 5 s of RTP each way through the kernel path: every call
/// answered, each end gets what the other sent (within 1%), the kernel forwarded and recorded
/// all but the latching packets, and a sample of the recordings is byte for byte the audio
/// SIPp played from the moment the recording started (sip-scenarios/audio/speech-5s.ul is
/// pcmu-5s.pcap's payload).
#[test]
fn sipp_recorded_calls_go_through_the_kernel_and_its_ring() {
    let Some(mut run) = sipp_calls_through_the_kernel(true) else {
        return;
    };
    let recs = complete_recordings(&run.server, ADMIN, 2 * 200);
    let text = run.assert_relayed_by_the_kernel();
    let get = |name: &str| metric_value(&text, name, &[]).unwrap_or(0.0) as u64;
    let relayed = get("callvault_rtp_packets_relayed_total");
    let (stored, via_ring) = (
        get("callvault_rtp_packets_stored_total"),
        get("callvault_rtp_packets_stored_kernel_total"),
    );
    // The recording starts a moment after the answer: a call's first packets may be relayed
    // before it; what is recorded came through the ring but for the latching packets.
    assert!(
        stored * 100 >= relayed * 95,
        "stored {stored} of {relayed} relayed"
    );
    assert!(
        via_ring * 100 >= stored * 99,
        "ring carried {via_ring} of {stored}"
    );
    assert_eq!(get("callvault_recording_packets_refused_total"), 0);
    let server = &run.server;
    // A sample: each recording is the audio SIPp played from the moment the recording
    // started (it starts a few packets after the answer), to the end, byte for byte.
    let audio = std::fs::read(scenarios_dir().join("audio/speech-5s.ul")).unwrap();
    for s in recs.iter().step_by(recs.len() / 10) {
        let id = s["store_id"].as_str().unwrap();
        let path = format!("/v1/stores/{id}/media?format=raw");
        let (status, media) = admin_get(server.http_addr(), ADMIN, &path);
        assert_eq!(status, 200);
        assert!(
            media.len() % 160 == 0 && media.len() * 10 >= audio.len() * 9,
            "recording {id}: {} of {} bytes",
            media.len(),
            audio.len()
        );
        assert!(
            media[..] == audio[audio.len() - media.len()..],
            "recording {id} differs from the audio played"
        );
    }
}

/// Kill -9 mid-call with the kernel forwarding and recording: every record the writer
/// thread committed before the kill is there after the restart (stores `truncated`, read to
/// the last record), and the restarted server attaches the program again.
#[test]
fn a_kill_mid_recorded_call_keeps_every_committed_record() {
    let Some(mut s) = recording_kernel_server() else {
        return;
    };
    let c = Call::establish(s.sip_addr(), "1001", "1002");
    std::thread::sleep(Duration::from_millis(500));
    // 2 s of audio at 20 ms, then time for the writer thread to commit it (1 s batches of the
    // relay's own packets, ring drained every 20 ms, logs committed every 250 ms).
    for i in 0..100u32 {
        c.a_media
            .send(c.a_media_to, 0, false, i as u16, i * 160, 0xa, &payload(i));
        c.b_media
            .send(c.b_media_to, 0, false, i as u16, i * 160, 0xb, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let via_ring = metric(&s, "callvault_rtp_packets_stored_kernel_total", &[]);
    assert!(via_ring >= 190.0, "recorded through the ring: {via_ring}");
    s.kill_hard();
    s.start();
    assert!(s.log().contains("media=kernel"), "{}", s.log());
    let recs = recordings(&s, ADMIN);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let audio: Vec<u8> = (0..100).flat_map(payload).collect();
    for r in &recs {
        assert_eq!(r["state"], "truncated", "{r:#}");
        let id = r["store_id"].as_str().unwrap();
        let path = format!("/v1/stores/{id}/media?format=raw");
        let (status, media) = admin_get(s.http_addr(), ADMIN, &path);
        assert_eq!(status, 200);
        // Everything was committed 1.5 s before the kill: the whole 2 s, in order.
        assert!(
            media == audio,
            "{} of {} bytes after recovery",
            media.len(),
            audio.len()
        );
    }
}
