//! A flood of INVITEs from other hosts against a running `callvault serve` (issue 10,
//! finding 8; PROTOCOL.md §7 "Overload") while a legitimate trunk places calls.
//!
//! The trunk is SIPp from 127.0.0.1 (a `[[trusted_peer]]`), calling a SIPp UAS through
//! callvault with 5 s of RTP each way. The flood comes from 127.0.0.2 and 127.0.0.3: an
//! account holder ("mallory") who answers every 407 with valid credentials and never ACKs
//! the 2xx, the pattern that held every RTP port before (each answered flood call kept its
//! ports until its timeout). The defended outcome: the trunk's calls complete (at most a few
//! percent lost), the flood is answered 503 + Retry-After, and callvault's RSS stays bounded.
//! The figures are printed (`--no-capture`) for docs/BENCHMARKS.md.

mod common;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use callvault::sip::message::{parse, HeaderAccess, SipMessage};
use common::*;

/// The trunk's clean call rate and call count (20 s of calls, 5.5 s each).
const CLEAN_RATE: f64 = 5.0;
const CLEAN_CALLS: u32 = 100;
/// Call attempts per second from each flooding host (2 hosts: 12x the clean rate).
const FLOOD_RATE: f64 = 30.0;

#[derive(Debug, Default)]
struct FloodStats {
    attempts: u64,
    invites: u64,
    challenged: u64,
    refused_503: u64,
    answered: u64,
    retry_after_missing: u64,
}

/// One flooding host: new calls at `rate`/s until `stop`, credentials on every 407, no ACK.
fn flooder(
    host: &'static str,
    server: SocketAddr,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<FloodStats> {
    std::thread::spawn(move || {
        let sock = UdpSocket::bind((host, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
        let local = sock.local_addr().unwrap();
        let mut st = FloodStats::default();
        let mut answered = HashSet::new();
        let mut buf = vec![0u8; 65536];
        let start = Instant::now();
        let every = Duration::from_secs_f64(1.0 / rate);
        while !stop.load(Ordering::Relaxed) {
            while start + every * st.attempts as u32 <= Instant::now() {
                let n = st.attempts;
                st.attempts += 1;
                st.invites += 1;
                let _ = sock.send_to(invite(local, host, n, 1, None).as_bytes(), server);
            }
            let Ok((len, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(SipMessage::Response(r)) = parse(&buf[..len]) else {
                continue;
            };
            let Some(cseq) = r.cseq() else { continue };
            let n: u64 = r
                .call_id()
                .and_then(|c| c.rsplit('-').next())
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            match r.status {
                407 if cseq.seq == 1 => {
                    st.challenged += 1;
                    let to = r.headers.get("To").unwrap_or_default().to_string();
                    let _ = sock.send_to(ack(local, host, n, &to).as_bytes(), server);
                    let ch = r.headers.get("Proxy-Authenticate").unwrap_or_default();
                    if let Ok(creds) = callvault::sip::auth::respond(
                        ch,
                        "mallory",
                        "mallory-pw",
                        "INVITE",
                        "sip:1002@example.com",
                        "cn",
                        1,
                    ) {
                        st.invites += 1;
                        let _ = sock
                            .send_to(invite(local, host, n, 2, Some(&creds)).as_bytes(), server);
                    }
                }
                503 => {
                    st.refused_503 += 1;
                    if r.headers.get("Retry-After").is_none() {
                        st.retry_after_missing += 1;
                    }
                }
                // Never ACKed: the 2xx keeps coming until callvault gives up on it.
                200..=299 if answered.insert(n) => st.answered += 1,
                _ => {}
            }
        }
        st
    })
}

fn invite(local: SocketAddr, host: &str, n: u64, cseq: u32, creds: Option<&str>) -> String {
    let sdp = format!(
        "v=0\r\no=m 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n\
         m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    );
    let auth = creds
        .map(|c| format!("Proxy-Authorization: {c}\r\n"))
        .unwrap_or_default();
    format!(
        "INVITE sip:1002@example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-{host}-{n}-{cseq};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:mallory@example.com>;tag=m{n}\r\n\
         To: <sip:1002@example.com>\r\n\
         Call-ID: flood-{host}-{n}\r\n\
         CSeq: {cseq} INVITE\r\n\
         Contact: <sip:mallory@{local}>\r\n\
         {auth}Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
}

/// The ACK of the 407 (same branch as the first INVITE).
fn ack(local: SocketAddr, host: &str, n: u64, to: &str) -> String {
    format!(
        "ACK sip:1002@example.com SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch=z9hG4bK-{host}-{n}-1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:mallory@example.com>;tag=m{n}\r\n\
         To: {to}\r\n\
         Call-ID: flood-{host}-{n}\r\n\
         CSeq: 1 ACK\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// VmRSS of a process in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Samples the peak RSS every 100 ms until `stop`.
fn rss_sampler(pid: u32, stop: Arc<AtomicBool>, peak: Arc<AtomicU64>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(kb) = rss_kb(pid) {
                peak.fetch_max(kb, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

struct Outcome {
    legit: SippResult,
    flood: Vec<FloodStats>,
    rss_before_kb: u64,
    rss_peak_kb: u64,
    elapsed: Duration,
}

/// The run; `protected: false` switches admission and the half-open cap off (the "before").
fn flood_run(protected: bool) -> Option<Outcome> {
    if !tool_available("sipp") {
        return None;
    }
    let ports = PortBlock::reserve(10);
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = false;
    cfg.extra = "[[trusted_peer]]\ncidr = \"127.0.0.1/32\"".into();
    cfg.rtp = PortBlock::reserve(400);
    cfg.route_to = Some((ports.port(0), Transport::Udp));
    let mut server = Server::prepare(cfg);
    server.account_add("mallory", "mallory-pw", "1234", "1MiB");
    let (rate, burst, half_open) = if protected {
        ("5", "10", "10")
    } else {
        ("0", "10", "0")
    };
    server.set_env("CALLVAULT_SIP_ADMISSION_RATE", rate);
    server.set_env("CALLVAULT_SIP_ADMISSION_BURST", burst);
    server.set_env("CALLVAULT_SIP_HALF_OPEN_CALLS_PER_SOURCE", half_open);
    server.start();
    let pid = server.pid().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss_before_kb = rss_kb(pid).unwrap_or(0);

    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(ports.port(2))
        .calls(100_000)
        .timeout(Duration::from_secs(80))
        .trace_messages(false)
        .spawn();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_before_kb));
    let sampler = rss_sampler(pid, stop.clone(), peak.clone());
    let started = Instant::now();
    let floods: Vec<_> = ["127.0.0.2", "127.0.0.3"]
        .into_iter()
        .map(|h| flooder(h, server.sip_addr(), FLOOD_RATE, stop.clone()))
        .collect();
    let legit = Sipp::uac("basic", server.sip_addr())
        .port(ports.port(1))
        .media_port(ports.port(6))
        .calls(CLEAN_CALLS)
        .rate(CLEAN_RATE)
        .timeout(Duration::from_secs(60))
        .trace_messages(false)
        .run();
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let flood = floods.into_iter().map(|f| f.join().unwrap()).collect();
    sampler.join().unwrap();
    drop(uas);
    Some(Outcome {
        legit,
        flood,
        rss_before_kb,
        rss_peak_kb: peak.load(Ordering::Relaxed),
        elapsed,
    })
}

fn report(label: &str, o: &Outcome) {
    let attempts: u64 = o.flood.iter().map(|f| f.attempts).sum();
    let secs = o.elapsed.as_secs_f64();
    let lost = u64::from(CLEAN_CALLS).saturating_sub(o.legit.successful);
    eprintln!(
        "FLOOD {label}: {:.0} flood call attempts/s ({:.0} INVITEs/s) from 2 hosts vs {CLEAN_RATE} \
         legitimate calls/s for {secs:.1} s; legitimate: {}/{CLEAN_CALLS} completed ({:.1}% lost); \
         flood: {} answered, {} refused 503; RSS {} kB before, {} kB peak; {:?}",
        attempts as f64 / secs,
        o.flood.iter().map(|f| f.invites).sum::<u64>() as f64 / secs,
        o.legit.successful,
        100.0 * lost as f64 / f64::from(CLEAN_CALLS),
        o.flood.iter().map(|f| f.answered).sum::<u64>(),
        o.flood.iter().map(|f| f.refused_503).sum::<u64>(),
        o.rss_before_kb,
        o.rss_peak_kb,
        o.flood,
    );
}

#[test]
fn flood_from_other_hosts_leaves_the_trunk_calling_with_bounded_memory() {
    let Some(o) = flood_run(true) else { return };
    report("protected", &o);
    // At most a few percent of the trunk's calls lost (here: 3 of 100).
    assert!(
        o.legit.successful >= u64::from(CLEAN_CALLS) - 3,
        "legitimate calls lost: {}",
        o.legit
    );
    let refused: u64 = o.flood.iter().map(|f| f.refused_503).sum();
    let attempts: u64 = o.flood.iter().map(|f| f.attempts).sum();
    assert!(
        refused > attempts / 2,
        "the flood was not shed: {:?}",
        o.flood
    );
    assert!(
        o.flood.iter().all(|f| f.retry_after_missing == 0),
        "503 without Retry-After"
    );
    // Answered flood calls per host are capped by the half-open limit at any time; over the
    // whole run they are bounded by the admitted rate.
    let answered: u64 = o.flood.iter().map(|f| f.answered).sum();
    assert!(answered < attempts / 4, "{:?}", o.flood);
    assert!(
        o.rss_peak_kb < 150 * 1024,
        "RSS {} kB -> peak {} kB",
        o.rss_before_kb,
        o.rss_peak_kb
    );
}

/// The same flood with admission and the half-open cap off, for the "before" figures in
/// docs/BENCHMARKS.md (`cargo nextest run --test flood --run-ignored only --no-capture`).
#[test]
#[ignore]
fn flood_without_admission_for_comparison() {
    let Some(o) = flood_run(false) else { return };
    report("unprotected", &o);
}
