//! Metrics of in-call storage (issue 3 item 8, PROTOCOL.md §5 "Listing and metrics") and the
//! adaptive threshold end to end (issue 3 item 6, §2.5 step 32), against a real `callvault
//! serve` per test with the in-process SIP test UA (tests/common/ua.rs) as A (1001, sender)
//! and B (1002, receiver).
//!
//! Also the latency benchmark of issue 3 (threshold and play start), as an ignored test:
//! `cargo test --release --test store_metrics -- --ignored --nocapture`.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callvault::sip::dialog::Dialog;
use callvault::sip::message::{HeaderAccess, Method, Request, Response};
use common::{metric_value, Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, RtpPkt, Ua, PCMU, T};

const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
const STORE_ACCEPTED: &str = "application/vnd.callvault.store-accepted+json";
const PROMPT: &str = "application/vnd.callvault.prompt+json";
const READY: &str = "application/vnd.callvault.ready+json";
/// The server's adaptive margin (`ThresholdLimits::default().adaptive_margin_bytes`).
const ADAPTIVE_MARGIN: u64 = 2000;
/// The test stream: 100 packets of 160 bytes of PCMU (2 s of audio at 8000 B/s).
const N: u32 = 100;
const DECLARED: u64 = N as u64 * 160;

// ---------------------------------------------------------------------------------------------
// Fixture (the minimal flow of tests/incall_storage.rs's full-flow test)

/// A server with accounts 1001 and 1002 (PIN 4321, 50 MiB).
fn server() -> Server {
    let mut s = Server::prepare(ServerConfig::new());
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    s.start();
    s
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// B asks for storage (direct mode); A answers the prompt. Returns the prompt's JSON and the
/// moment A received it.
fn request_store(c: &mut Call, body: &str) -> (Value, Instant) {
    let resp = c.b.in_dialog(
        &mut c.bd,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        body.as_bytes(),
    );
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(resp.content_type().unwrap_or_default(), STORE_ACCEPTED);
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    let at = Instant::now();
    c.a.respond(&p, 200, &[], b"");
    (json(&p.body), at)
}

/// A's store session to the prompt's URI (PCMU sendonly, `Callvault-Data-Size: size`):
/// the dialog and where to send RTP.
fn store_session(c: &mut Call, prompt: &Value, size: u64, rtp: &Rtp) -> (Dialog, SocketAddr) {
    let uri = prompt["store_uri"].as_str().unwrap();
    let size = size.to_string();
    let inv = c.a.invite_request(
        uri,
        &[("Callvault-Data-Size", size.as_str())],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (resp, d) = c.a.invite(&inv);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (to, dir) = sdp_audio(&resp.body);
    assert_eq!(dir, "recvonly");
    (d.unwrap(), to)
}

/// B's ready note: the request (answered 200), its JSON, when it arrived.
fn take_ready(b: &mut Ua, timeout: Duration) -> (Request, Value, Instant) {
    let r = b.expect_request(Method::Message, Some(READY), timeout);
    let at = Instant::now();
    b.respond(&r, 200, &[], b"");
    let v = json(&r.body);
    (r, v, at)
}

/// B's play session; returns the dialog and the moment the INVITE's ACK had been sent.
fn play(b: &mut Ua, ready: &Value, rtp: &Rtp) -> (Dialog, Instant) {
    let uri = ready["play_uri"].as_str().unwrap();
    let inv = b.invite_request(uri, &[], &sdp(rtp.port, PCMU, "recvonly"));
    let (resp, d) = b.invite(&inv);
    let acked = Instant::now();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(sdp_audio(&resp.body).1, "sendonly");
    (d.unwrap(), acked)
}

/// A's sender thread: packets 0..n of the test stream (PCMU, seq from 5000), packet `i` due
/// at `start + i * interval` (absolute deadlines, so the rate does not drift with sleep
/// overshoot). `sent` counts packets out; `first` is set to when packet 0 left.
struct Sender {
    sent: Arc<AtomicUsize>,
    first: Arc<std::sync::Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn start_sender(rtp: Rtp, to: SocketAddr, n: u32, interval: Duration) -> Sender {
    let sent = Arc::new(AtomicUsize::new(0));
    let first = Arc::new(std::sync::Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (sent, first, stop) = (sent.clone(), first.clone(), stop.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..n {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = start + interval * i;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                rtp.send(
                    to,
                    0,
                    i == 0,
                    5000u16.wrapping_add(i as u16),
                    160 * i,
                    0xA1A1_A1A1,
                    &payload(i),
                );
                if i == 0 {
                    *first.lock().unwrap() = Some(Instant::now());
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    Sender {
        sent,
        first,
        stop,
        thread,
    }
}

/// B receives the played stream: up to `n` packets, timestamped by a thread of its own (so
/// SIP work on the test thread, such as A's BYE transaction, cannot show up as a gap at B);
/// A's BYE goes out once the sender is done. Returns the packets with arrival times.
fn receive_play(
    c: &mut Call,
    b_rtp: &Rtp,
    sender: &Sender,
    sd: &mut Dialog,
    n: usize,
) -> Vec<RtpPkt> {
    let rx = Rtp {
        sock: b_rtp.sock.try_clone().unwrap(),
        port: b_rtp.port,
    };
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && Instant::now() < deadline {
            if let Some(p) = rx.recv(Duration::from_millis(100)) {
                got.push(p);
            }
        }
        got
    });
    while !sender.thread.is_finished() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let r: Response = c.a.bye(sd);
    assert_eq!(r.status, 200);
    receiver.join().unwrap()
}

fn metrics(server: &Server) -> String {
    server.metrics()
}

fn value(text: &str, name: &str) -> f64 {
    metric_value(text, name, &[]).unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

fn stores(text: &str, state: &str) -> f64 {
    metric_value(text, "callvault_stores", &[("state", state)])
        .unwrap_or_else(|| panic!("callvault_stores{{state={state:?}}} missing in\n{text}"))
}

/// Polls `/metrics` until `pred` holds (state changes trail the SIP answers), at most 5 s;
/// returns the last text either way.
fn metrics_when(server: &Server, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(server);
        if pred(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics of one store + play flow

#[test]
fn metrics_follow_one_store_and_play() {
    let server = server();
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");

    // Nothing yet: the family is there with zeros.
    let m = metrics(&server);
    for st in [
        "pending",
        "receiving",
        "complete",
        "truncated",
        "rejected",
        "expired",
    ] {
        assert_eq!(stores(&m, st), 0.0, "{st} before any store");
    }

    let asked = Instant::now();
    let (prompt, prompt_at) = request_store(&mut c, r#"{"pin":"4321"}"#);
    let m = metrics(&server);
    assert_eq!(stores(&m, "pending"), 1.0, "prompted store is pending");
    assert_eq!(value(&m, "callvault_store_sessions_active"), 0.0);

    let a_rtp = Rtp::bind();
    let (mut sd, to) = store_session(&mut c, &prompt, DECLARED, &a_rtp);
    let sender = start_sender(a_rtp, to, N, Duration::from_millis(20));

    // Default threshold (30%): ready while A is still sending.
    let (_, ready, ready_at) = take_ready(&mut c.b, Duration::from_secs(10));
    let first_sent = sender.first.lock().unwrap().expect("first packet sent");
    let m = metrics(&server);
    assert_eq!(stores(&m, "receiving"), 1.0, "{m}");
    assert_eq!(stores(&m, "pending"), 0.0);
    assert_eq!(value(&m, "callvault_store_sessions_active"), 1.0);
    assert_eq!(value(&m, "callvault_threshold_seconds_count"), 1.0);
    assert_eq!(
        value(&m, "callvault_prompt_to_first_packet_seconds_count"),
        1.0
    );

    let b_rtp = Rtp::bind();
    let (pd, _) = play(&mut c.b, &ready, &b_rtp);
    let m = metrics(&server);
    assert_eq!(value(&m, "callvault_play_sessions_active"), 1.0);
    assert_eq!(value(&m, "callvault_play_sessions_total"), 1.0);

    let got = receive_play(&mut c, &b_rtp, &sender, &mut sd, N as usize);
    assert_eq!(got.len(), N as usize, "played packets");
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.payload, payload(i as u32), "payload {i}");
    }
    c.b.expect_bye(&pd.id.call_id, Duration::from_secs(5));

    let m = metrics_when(&server, |m| {
        metric_value(m, "callvault_stores", &[("state", "complete")]) == Some(1.0)
            && metric_value(m, "callvault_store_sessions_active", &[]) == Some(0.0)
            && metric_value(m, "callvault_play_sessions_active", &[]) == Some(0.0)
    });
    assert_eq!(stores(&m, "complete"), 1.0, "{m}");
    for st in ["pending", "receiving", "truncated", "rejected", "expired"] {
        assert_eq!(stores(&m, st), 0.0, "{st} at the end");
    }
    assert_eq!(
        value(&m, "callvault_rtp_packets_stored_total"),
        f64::from(N)
    );
    assert_eq!(
        value(&m, "callvault_rtp_bytes_stored_total"),
        DECLARED as f64
    );
    assert_eq!(value(&m, "callvault_threshold_seconds_count"), 1.0);
    assert_eq!(value(&m, "callvault_play_start_seconds_count"), 1.0);
    assert_eq!(value(&m, "callvault_play_sessions_total"), 1.0);
    assert_eq!(value(&m, "callvault_play_sessions_active"), 0.0);
    assert_eq!(value(&m, "callvault_store_sessions_active"), 0.0);
    assert_eq!(
        value(&m, "callvault_prompt_to_first_packet_seconds_count"),
        1.0
    );

    // The times are the right spans, not just counted. Threshold 30% of 16000 = 4800 bytes =
    // 30 packets: at least 29 sending intervals after the first stored packet.
    let th = value(&m, "callvault_threshold_seconds_sum");
    assert!((0.5..10.0).contains(&th), "threshold after {th} s");
    // Prompt -> first stored packet lies between (prompt received by A -> first packet sent)
    // and (store request sent -> ready note received); created_at has ms resolution.
    let p2f = value(&m, "callvault_prompt_to_first_packet_seconds_sum");
    let lower = (first_sent - prompt_at).as_secs_f64() - 0.002;
    let upper = (ready_at - asked).as_secs_f64();
    assert!(
        (lower..=upper).contains(&p2f),
        "prompt to first packet {p2f} s, expected within [{lower}, {upper}]"
    );
    let ps = value(&m, "callvault_play_start_seconds_sum");
    assert!(ps < 0.5, "play start {ps} s");
}

// ---------------------------------------------------------------------------------------------
// 2. Adaptive threshold end to end

/// One adaptive store: A sends the 100-packet stream every `interval`; B plays right at the
/// ready note. Returns (ready's received_bytes, packets A had sent at the ready note, what B
/// received).
fn adaptive_run(interval: Duration) -> (u64, usize, Vec<RtpPkt>) {
    let server = server();
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let (prompt, _) = request_store(&mut c, r#"{"pin":"4321","threshold":{"adaptive":true}}"#);
    let a_rtp = Rtp::bind();
    let (mut sd, to) = store_session(&mut c, &prompt, DECLARED, &a_rtp);
    let sender = start_sender(a_rtp, to, N, interval);
    let (_, ready, _) = take_ready(&mut c.b, Duration::from_secs(10));
    let sent_at_ready = sender.sent.load(Ordering::SeqCst);
    let b_rtp = Rtp::bind();
    let (pd, _) = play(&mut c.b, &ready, &b_rtp);
    let got = receive_play(&mut c, &b_rtp, &sender, &mut sd, N as usize);
    c.b.expect_bye(&pd.id.call_id, Duration::from_secs(5));
    assert_eq!(ready["declared_bytes"], DECLARED);
    let received = ready["received_bytes"].as_u64().unwrap();
    (received, sent_at_ready, got)
}

/// Every payload arrived once, in order, byte for byte, and the play never stalled.
///
/// "Stalled" is judged against the stream's own timeline, the played RTP timestamps at 8000
/// Hz (what a receiver plays out at r_out): packet k must be at B by `at(0) + (ts(k) -
/// ts(0)) / 8000` within `tolerance`. A player that ran out of data sends late from then on
/// (it re-anchors its schedule), so a stall leaves every later packet late; a scheduling
/// hiccup on this shared machine (sender, player or the receiving thread descheduled) makes
/// a few packets late and is followed by a burst that is back on time. So: no run of more than
/// `MAX_LATE_RUN` late packets, and the last packet on time. The largest raw gap is printed.
fn assert_played_without_stall(got: &[RtpPkt], tolerance: Duration) {
    const MAX_LATE_RUN: usize = 3;
    assert_eq!(got.len(), N as usize, "played packets");
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.payload, payload(i as u32), "payload {i} byte for byte");
    }
    let lag = |p: &RtpPkt| {
        let due = f64::from(p.ts.wrapping_sub(got[0].ts)) / 8000.0;
        (p.at - got[0].at).as_secs_f64() - due
    };
    let lags: Vec<f64> = got.iter().map(lag).collect();
    let tol = tolerance.as_secs_f64();
    let mut run = 0;
    let mut longest = 0;
    for l in &lags {
        run = if *l > tol { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    let worst_gap = gaps.iter().max().copied().unwrap_or_default();
    let worst_lag = lags.iter().copied().fold(f64::MIN, f64::max);
    let span = got.last().unwrap().at - got[0].at;
    eprintln!(
        "play at B: {} packets over {span:?}, largest gap {worst_gap:?}, largest lag behind \
         the stream's timeline {:.1} ms, longest late run {longest}",
        got.len(),
        worst_lag * 1000.0
    );
    let ms: Vec<String> = lags.iter().map(|l| format!("{:.0}", l * 1000.0)).collect();
    assert!(
        longest <= MAX_LATE_RUN && lags[lags.len() - 1] <= tol,
        "the play stalled: {longest} packets in a row more than {tolerance:?} behind the \
         stream's timeline (lag per packet, ms: {})",
        ms.join(" ")
    );
}

#[test]
fn adaptive_threshold_fast_sender_starts_early_and_never_stalls() {
    // 2x real time: r_in = 16000 B/s >= r_out = 8000 B/s, so the rule asks for the margin
    // alone, once the rate is measured.
    let (received, sent_at_ready, got) = adaptive_run(Duration::from_millis(10));
    eprintln!("adaptive 2x: ready at {received} bytes, {sent_at_ready} packets sent");
    assert!(
        received >= ADAPTIVE_MARGIN,
        "ready at {received} bytes, before the margin"
    );
    assert!(
        received < DECLARED && sent_at_ready < N as usize,
        "ready only at {received} bytes / {sent_at_ready} packets: not before the whole stream"
    );
    assert_played_without_stall(&got, Duration::from_millis(60));
}

#[test]
fn adaptive_threshold_real_time_sender_starts_early_and_never_stalls() {
    // Real time: r_in = r_out, declared * (1 - 1) + margin = the margin; never less.
    let (received, sent_at_ready, got) = adaptive_run(Duration::from_millis(20));
    eprintln!("adaptive 1x: ready at {received} bytes, {sent_at_ready} packets sent");
    assert!(
        received >= ADAPTIVE_MARGIN,
        "ready at {received} bytes, before the margin"
    );
    assert!(
        received < DECLARED && sent_at_ready < N as usize,
        "ready only at {received} bytes / {sent_at_ready} packets: not early"
    );
    assert_played_without_stall(&got, Duration::from_millis(60));
}

#[test]
fn adaptive_threshold_slow_sender_waits_for_the_deficit() {
    // Half real time: r_in = 4000 B/s, r_out = 8000 B/s, so the rule asks for
    // 16000 * (1 - 1/2) + 2000 = 10000 bytes before playback may start.
    let (received, sent_at_ready, got) = adaptive_run(Duration::from_millis(40));
    eprintln!("adaptive 0.5x: ready at {received} bytes, {sent_at_ready} packets sent");
    assert!(
        (9000..DECLARED).contains(&received),
        "ready at {received} bytes; the rule asks for about 10000"
    );
    assert_eq!(got.len(), N as usize, "played packets");
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.payload, payload(i as u32), "payload {i} byte for byte");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Benchmark: threshold and play-start latency (issue 3 "Benchmark", docs/BENCHMARKS.md)

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    eprintln!(
        "BENCH {name}: n={} p50={:.2?} p99={:.2?} min={:.2?} max={:.2?} mean={:.2?}",
        v.len(),
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        v[0],
        v[v.len() - 1],
        mean
    );
}

/// Stores with threshold 0, one after the other in one call, each with a play session
/// started at its ready note. Client-side figures (what a terminal sees):
/// - threshold latency: A sends the first packet -> B has the ready note (so it includes the
///   ingest, the group commit with its fsync, the ready MESSAGE and loopback);
/// - play-start latency: B's ACK of the play INVITE sent -> first played packet at B.
///
/// Server-side means from the histograms are printed next to them.
#[test]
#[ignore = "benchmark: cargo test --release --test store_metrics -- --ignored --nocapture"]
fn bench_threshold_and_play_start_latency() {
    let runs: usize = std::env::var("CALLVAULT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let server = server();
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    c.keep_alive();
    let mut threshold = Vec::new();
    let mut play_start = Vec::new();
    for _ in 0..runs {
        let (prompt, _) = request_store(&mut c, r#"{"pin":"4321","threshold":{"bytes":0}}"#);
        let a_rtp = Rtp::bind();
        let (mut sd, to) = store_session(&mut c, &prompt, DECLARED, &a_rtp);
        let sender = start_sender(a_rtp, to, N, Duration::from_millis(20));
        let (_, ready, ready_at) = take_ready(&mut c.b, Duration::from_secs(5));
        let first = sender.first.lock().unwrap().expect("first packet sent");
        threshold.push(ready_at - first);
        let b_rtp = Rtp::bind();
        let (mut pd, acked) = play(&mut c.b, &ready, &b_rtp);
        let p = b_rtp
            .recv(Duration::from_secs(2))
            .expect("first played packet");
        play_start.push(p.at - acked);
        // Done with this store: B hangs up the play, A ends the store.
        assert_eq!(c.b.bye(&mut pd).status, 200);
        sender.stop.store(true, Ordering::Relaxed);
        while !sender.thread.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(c.a.bye(&mut sd).status, 200);
    }
    report(
        "threshold latency (A first packet sent -> ready at B)",
        threshold,
    );
    report(
        "play-start latency (play ACK sent -> first packet at B)",
        play_start,
    );
    let m = metrics_when(&server, |m| {
        metric_value(m, "callvault_store_sessions_active", &[]) == Some(0.0)
    });
    for h in [
        "callvault_threshold_seconds",
        "callvault_play_start_seconds",
        "callvault_prompt_to_first_packet_seconds",
    ] {
        let n = value(&m, &format!("{h}_count"));
        let sum = value(&m, &format!("{h}_sum"));
        eprintln!(
            "BENCH server {h}: count={n} mean={:.3} ms",
            1000.0 * sum / n.max(1.0)
        );
    }
    assert_eq!(stores(&m, "complete"), runs as f64, "{m}");
    // Every store and play counted, also when B hangs up right after the first packet.
    assert_eq!(value(&m, "callvault_threshold_seconds_count"), runs as f64);
    assert_eq!(value(&m, "callvault_play_start_seconds_count"), runs as f64);
    assert_eq!(value(&m, "callvault_play_sessions_total"), runs as f64);
}
