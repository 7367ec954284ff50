//! Store ingest benchmark (issue 3): `cargo bench --bench ingest` (add `-- --quick` for a
//! short run). Prints markdown tables for docs/BENCHMARKS.md:
//!
//! 1. Storage pipeline alone: records/s through `Ingest` -> `WriterTask` (group commit with
//!    fsync), per wall second and per process CPU-second.
//! 2. Recorder end to end over UDP loopback: several store sessions at once, each fed by an
//!    in-process sender; stored packets per process CPU-second (the senders' CPU is included,
//!    so this is a lower bound for the recorder alone).
//! 3. Commit interval vs loss window: a paced stream (one packet per millisecond); the time
//!    from a packet's hand-over to the ingest until the writer reports it committed. That lag
//!    is what a crash can lose.
//!
//! CPU time is read from `/proc/self/stat` (utime + stime, in 1/100 s ticks).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use callvault::media::ports::PortAllocator;
use callvault::media::recorder::{Recorder, RecorderConfig};
use callvault::storage::segments::{
    pipeline, IngestError, PipelineOptions, RecordHeader, SegmentOptions, SegmentWriter,
};
use callvault::storage::threshold::{Resolved, ThresholdTracker};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PAYLOAD: usize = 160;

/// Process CPU time (user + system), from /proc; zero where unavailable.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn header(i: u64, arrival_us: u64) -> RecordHeader {
    RecordHeader {
        arrival_us,
        seq: i as u16,
        timestamp: (i as u32).wrapping_mul(160),
        ssrc: 0x1234_5678,
        payload_type: 0,
        marker: i == 0,
    }
}

/// 1. The storage pipeline alone.
async fn pipeline_rate(records: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let w =
        SegmentWriter::create(&dir.path().join("s"), SegmentOptions::default()).expect("create");
    let (mut ingest, task) = pipeline(w, PipelineOptions::default());
    let writer = tokio::spawn(task.run());
    let payload = [0x55u8; PAYLOAD];
    let (c0, t0) = (cpu_time(), Instant::now());
    let base = now_us();
    let mut refused = 0u64;
    for i in 0..records {
        // Arrival 20 us apart: batches are handed off by size, as under load.
        let h = header(i, base + i * 20);
        loop {
            match ingest.push(&h, &payload) {
                Ok(()) => break,
                Err(IngestError::Backpressure) => {
                    refused += 1;
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("ingest failed: {e}"),
            }
        }
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    ingest.close().await.expect("close");
    let st = writer.await.expect("join").expect("writer");
    let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
    assert_eq!(st.records, records);
    println!("| records | payload | wall s | CPU s | records/s | records per CPU-s | backpressure waits |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {records} | {PAYLOAD} B | {:.2} | {:.2} | {:.0} | {:.0} | {refused} |",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        records as f64 / wall.as_secs_f64(),
        records as f64 / cpu.as_secs_f64().max(0.01),
    );
}

/// 2. Recorders over UDP loopback.
async fn recorder_rate(sessions: usize, per_session: u64) {
    let ports = PortAllocator::new(46000, 46999).expect("port range");
    let dir = tempfile::tempdir().expect("temp dir");
    let (etx, mut erx) = mpsc::channel(1024);
    // Events are not the subject here; keep the channel drained.
    tokio::spawn(async move { while erx.recv().await.is_some() {} });
    let mut recs = Vec::new();
    let mut targets = Vec::new();
    for s in 0..sessions {
        let pair = ports.allocate(LO).expect("ports");
        targets.push(SocketAddr::new(LO, pair.rtp_port));
        let w = SegmentWriter::create(&dir.path().join(format!("s{s}")), SegmentOptions::default())
            .expect("create");
        let (ingest, task) = pipeline(w, PipelineOptions::default());
        let cfg = RecorderConfig::new(0, None, ThresholdTracker::new(Resolved::Fixed(0), None));
        recs.push(Recorder::start(pair, ingest, task, cfg, etx.clone()));
    }
    let (c0, t0) = (cpu_time(), Instant::now());
    let mut senders = Vec::new();
    for to in targets {
        senders.push(tokio::spawn(async move {
            let sock = UdpSocket::bind((LO, 0)).await.expect("bind");
            let mut pkt = [0u8; 12 + PAYLOAD];
            pkt[0] = 0x80;
            for i in 0..per_session {
                pkt[2..4].copy_from_slice(&(i as u16).to_be_bytes());
                let _ = sock.send_to(&pkt, to).await;
                // Bursts of 16 per millisecond: fast, but within the socket buffers.
                if i % 16 == 15 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut stored = 0;
    for r in recs {
        stored += r.finish().await.records;
    }
    let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
    let sent = sessions as u64 * per_session;
    println!("| sessions | sent | stored | wall s | CPU s | stored pkt/s | stored pkt per CPU-s |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {sessions} | {sent} | {stored} | {:.2} | {:.2} | {:.0} | {:.0} |",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        stored as f64 / wall.as_secs_f64(),
        stored as f64 / cpu.as_secs_f64().max(0.01),
    );
}

/// 3. Commit interval vs loss window.
async fn loss_window(commit_ms: u64, packets: u64) -> (Duration, Duration, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let w =
        SegmentWriter::create(&dir.path().join("s"), SegmentOptions::default()).expect("create");
    let interval = Duration::from_millis(commit_ms);
    let opts = PipelineOptions {
        commit_interval: interval,
        ..PipelineOptions::default()
    };
    let (mut ingest, task) = pipeline(w, opts);
    let mut tail = task.subscribe();
    let writer = tokio::spawn(task.run());
    // When each committed count was first seen.
    let watcher = tokio::spawn(async move {
        let mut seen = Vec::new();
        while tail.changed().await.is_ok() {
            let st = *tail.borrow_and_update();
            seen.push((st.records, Instant::now()));
            if st.finished {
                break;
            }
        }
        seen
    });
    let payload = [0x55u8; PAYLOAD];
    let mut pushed = Vec::with_capacity(packets as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut last_flush = Instant::now();
    for i in 0..packets {
        tick.tick().await;
        ingest.push(&header(i, now_us()), &payload).expect("push");
        pushed.push(Instant::now());
        // The recorder's timer flush, every commit interval.
        if last_flush.elapsed() >= interval {
            ingest.flush().expect("flush");
            last_flush = Instant::now();
        }
    }
    ingest.close().await.expect("close");
    writer.await.expect("join").expect("writer");
    let seen = watcher.await.expect("watcher");
    let mut lags: Vec<Duration> = Vec::with_capacity(pushed.len());
    let mut j = 0;
    for (k, at) in pushed.iter().enumerate() {
        while j < seen.len() && seen[j].0 <= k as u64 {
            j += 1;
        }
        if let Some((_, t)) = seen.get(j) {
            lags.push(t.saturating_duration_since(*at));
        }
    }
    lags.sort();
    let pick = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
    (pick(0.5), pick(0.99), *lags.last().expect("lags"))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("## Store ingest\n\n### Storage pipeline (Ingest -> WriterTask, fsync per group commit)\n");
        pipeline_rate(if quick { 50_000 } else { 500_000 }).await;
        println!("\n### Recorder over UDP loopback (senders in the same process)\n");
        recorder_rate(4, if quick { 5_000 } else { 40_000 }).await;
        println!("\n### Commit interval vs loss window (1 packet/ms; lag = hand-over to commit)\n");
        println!("| commit interval | p50 lag | p99 lag | max lag (loss window) |");
        println!("| ---: | ---: | ---: | ---: |");
        for ms in [5, 20, 100] {
            let (p50, p99, max) = loss_window(ms, if quick { 500 } else { 3000 }).await;
            println!(
                "| {ms} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            );
        }
    });
}
