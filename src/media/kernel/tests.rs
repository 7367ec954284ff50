//! The kernel path with a real relay on real sockets, each test in its own network namespace
//! (root only; see [`super::testns`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::maps::Mode;
use super::{testns, KernelPath};
use crate::media::ports::PortAllocator;
use crate::media::relay::{Relay, RelayConfig, RelayCounters, RelayEvent, RelayHandle, Side};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn rtp(pt: u8, seq: u16, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, pt, 0, 0, 0, 0, 0, 1, 0, 0, 0x12, 0x34];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(body);
    p
}

async fn recv(s: &UdpSocket, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
        _ => None,
    }
}

/// A relay between two parties on loopback, the kernel path attached.
struct Rig {
    path: Arc<KernelPath>,
    relay: RelayHandle,
    counters: Arc<RelayCounters>,
    /// The parties' sockets (A, B) and the relay's RTP addresses facing them.
    pa: UdpSocket,
    pb: UdpSocket,
    ra: SocketAddr,
    rb: SocketAddr,
    _ports: PortAllocator,
    /// Keeps the event channel open when the test does not read it.
    _events: Option<mpsc::Receiver<RelayEvent>>,
}

async fn rig(kernel: bool, feature_code: &str) -> Rig {
    let (mut r, events) =
        rig_on(LO, kernel, feature_code, RelayConfig::default().rtp_timeout).await;
    r._events = Some(events);
    r
}

/// [`rig`] with an RTP timeout, and the relay's event receiver.
async fn rig_with(
    kernel: bool,
    feature_code: &str,
    rtp_timeout: Duration,
) -> (Rig, mpsc::Receiver<RelayEvent>) {
    rig_on(LO, kernel, feature_code, rtp_timeout).await
}

/// [`rig_with`] with everything (relay and parties) on `ip`.
async fn rig_on(
    ip: IpAddr,
    kernel: bool,
    feature_code: &str,
    rtp_timeout: Duration,
) -> (Rig, mpsc::Receiver<RelayEvent>) {
    let path = KernelPath::start(ip).unwrap();
    assert_eq!(path.interfaces(), ["lo"]);
    let ports = PortAllocator::new(30000, 30011).unwrap();
    let a = ports.allocate(ip).unwrap();
    let b = ports.allocate(ip).unwrap();
    let (ra, rb) = (
        SocketAddr::new(ip, a.rtp_port),
        SocketAddr::new(ip, b.rtp_port),
    );
    let counters = Arc::new(RelayCounters::default());
    let (tx, rx) = mpsc::channel(8);
    let config = RelayConfig {
        kernel: kernel.then(|| path.clone()),
        feature_code: feature_code.into(),
        rtp_timeout,
        ..RelayConfig::default()
    };
    let relay = Relay::start(a, b, config, counters.clone(), tx);
    let pa = UdpSocket::bind((ip, 0)).await.unwrap();
    let pb = UdpSocket::bind((ip, 0)).await.unwrap();
    relay.set_remote(Side::A, Some(pa.local_addr().unwrap()));
    relay.set_remote(Side::B, Some(pb.local_addr().unwrap()));
    let rig = Rig {
        path,
        relay,
        counters,
        pa,
        pb,
        ra,
        rb,
        _ports: ports,
        _events: None,
    };
    (rig, rx)
}

/// `n` packets each way, one at a time: each arrives whole, from the relay's port.
async fn exchange(r: &Rig, n: u16, seq0: u16) {
    for i in 0..n {
        let seq = seq0.wrapping_add(i);
        let pkt = rtp(0, seq, &[i as u8; 160]);
        r.pa.send_to(&pkt, r.ra).await.unwrap();
        let (got, from) = recv(&r.pb, Duration::from_secs(2)).await.expect("A to B");
        assert_eq!((got, from), (pkt, r.rb), "A->B packet {i}");
        let pkt = rtp(0, seq, &[!(i as u8); 172]);
        r.pb.send_to(&pkt, r.rb).await.unwrap();
        let (got, from) = recv(&r.pa, Duration::from_secs(2)).await.expect("B to A");
        assert_eq!((got, from), (pkt, r.ra), "B->A packet {i}");
    }
}

fn in_netns(test: impl std::future::Future<Output = ()>) {
    if !testns::enter() {
        return;
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test);
}

#[test]
fn latched_legs_go_through_the_kernel_byte_for_byte() {
    in_netns(async {
        let r = rig(true, "").await;
        exchange(&r, 100, 1).await;
        r.relay.stop().await;
        let c = &r.counters;
        assert_eq!(c.rtp_packets_total(), 200);
        let bytes = c.a_to_b.rtp_bytes.load(Ordering::Relaxed);
        assert_eq!(bytes, 100 * 172);
        // Only the latching packet of each side went through user space.
        assert_eq!(c.kernel_rtp_packets.load(Ordering::Relaxed), 198);
    });
}

#[test]
fn without_the_kernel_path_the_same_exchange_stays_in_user_space() {
    in_netns(async {
        let r = rig(false, "").await;
        exchange(&r, 20, 1).await;
        r.relay.stop().await;
        assert_eq!(r.counters.rtp_packets_total(), 40);
        assert_eq!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed), 0);
    });
}

/// What works on `lo` (docs/ARCHITECTURE.md): rewriting and passing up the stack, and
/// redirecting to lo's egress, both deliver to the party's socket. (`bpf_redirect` to lo's
/// ingress, `BPF_F_INGRESS`, delivers nothing on 6.18: the datagram is lost after the
/// redirect, which is why the C source's MODE_REDIRECT_INGRESS is never used.)
#[test]
fn every_local_mode_delivers_on_loopback() {
    in_netns(async {
        for mode in [Mode::Pass, Mode::Redirect] {
            let r = rig(true, "").await;
            r.path.set_local_mode(mode);
            exchange(&r, 10, 1).await;
            r.relay.stop().await;
            let k = r.counters.kernel_rtp_packets.load(Ordering::Relaxed);
            assert_eq!(k, 18, "{mode:?}");
            r.path.shutdown();
        }
    });
}

/// A re-INVITE moving B to a new port: the very next packet from A goes there.
#[test]
fn a_new_target_is_followed_at_the_next_packet() {
    in_netns(async {
        let r = rig(true, "").await;
        exchange(&r, 5, 1).await;
        let moved = UdpSocket::bind((LO, 0)).await.unwrap();
        r.relay
            .set_remote(Side::B, Some(moved.local_addr().unwrap()));
        // The control reaches the relay task through its channel; let it run.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 0..20u16 {
            let pkt = rtp(0, 100 + i, &[7; 160]);
            r.pa.send_to(&pkt, r.ra).await.unwrap();
            let (got, from) = recv(&moved, Duration::from_secs(2))
                .await
                .expect("to the new port");
            assert_eq!((got, from), (pkt, r.rb));
        }
        assert!(recv(&r.pb, Duration::from_millis(100)).await.is_none());
        r.relay.stop().await;
        // A's direction stayed in the kernel across the change (its latch did not move).
        assert!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed) >= 8 + 20);
    });
}

/// With a feature code, telephone-events of the leg's type reach the relay's gate (which holds
/// `*`), while the audio around them stays in the kernel.
#[test]
fn telephone_events_go_to_the_feature_code_gate() {
    in_netns(async {
        let r = rig(true, "*7").await;
        r.relay.set_dtmf_pt(Side::A, Some(101));
        r.relay.set_dtmf_pt(Side::B, Some(101));
        exchange(&r, 5, 1).await;
        // `*` (event 10), start and more packets of it: held back from B.
        for i in 0..3u16 {
            let dur = (i + 1) * 160;
            let ev = [10, 0x0a, (dur >> 8) as u8, dur as u8];
            r.pa.send_to(&rtp(101, 50 + i, &ev), r.ra).await.unwrap();
        }
        let audio = rtp(0, 60, &[1; 160]);
        r.pa.send_to(&audio, r.ra).await.unwrap();
        let (got, _) = recv(&r.pb, Duration::from_secs(2)).await.unwrap();
        assert_eq!(got, audio, "the event packets must not reach B");
        r.relay.stop().await;
        let c = &r.counters;
        // 5 + 1 audio from A (1 latching in user space), 5 from B (1 latching).
        assert_eq!(c.kernel_rtp_packets.load(Ordering::Relaxed), 9);
    });
}

/// `threads` threads sending 160-byte RTP from `from` to `to` with `sendmmsg` (batches of
/// 64) for `secs`: datagrams sent per second.
fn blast(from: &std::net::UdpSocket, to: SocketAddr, threads: usize, secs: f64) -> f64 {
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only");
    };
    let sent = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let sock = from.try_clone().unwrap();
            let sent = &sent;
            scope.spawn(move || {
                let pkt = rtp(0, 1, &[0x55; 160]);
                // SAFETY: all-zero is a valid sockaddr_in; the fields are set below.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_port = to.port().to_be();
                sa.sin_addr.s_addr = u32::from(*to.ip()).to_be();
                let mut iov = libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                };
                // SAFETY: all-zero is a valid mmsghdr; each points at `sa` and `iov`, which
                // outlive every sendmmsg below.
                let mut msgs: Vec<libc::mmsghdr> = (0..64)
                    .map(|_| {
                        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                        m.msg_hdr.msg_name = &mut sa as *mut libc::sockaddr_in as *mut libc::c_void;
                        m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                        m.msg_hdr.msg_iov = &mut iov;
                        m.msg_hdr.msg_iovlen = 1;
                        m
                    })
                    .collect();
                let start = std::time::Instant::now();
                let mut n = 0u64;
                while start.elapsed().as_secs_f64() < secs {
                    // SAFETY: `msgs` holds 64 initialised headers (above).
                    let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), 64, 0) };
                    if r > 0 {
                        n += r as u64;
                    }
                }
                sent.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    sent.load(Ordering::Relaxed) as f64 / secs
}

/// The physical limit beside the benchmark (docs/BENCHMARKS.md): datagrams per second this
/// machine's kernel turns around on loopback, measured one after another in one run: through
/// the fast path, through the fast path with the direction recorded (copied into the ring and
/// drained into a store log by the writer thread), and plain loopback (one socket straight to
/// another, nothing of callvault's attached). One `sendmmsg` sender thread per CPU, 160-byte
/// RTP, 3 s each; nobody reads the receiving socket (its overflow comes after the
/// turn-around), so the figure is the kernel's send, tc program, redirect and delivery.
/// `cargo test --release --lib kernel_turnaround -- --ignored --nocapture` (root).
#[test]
#[ignore = "a measurement, not a check"]
fn kernel_turnaround_rate() {
    use crate::media::relay::{RecordCounters, RecordSinks};
    use crate::storage::log_thread::{LogThread, RecordSource};
    use crate::storage::segments::{pipeline, SegmentOptions, SegmentWriter};
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let secs = 3.0;
    in_netns(async move {
        let kernel = |c: &RelayCounters| c.kernel_rtp_packets.load(Ordering::Relaxed);
        // Recorded: A's direction into a store log through this program's ring.
        let r = rig(true, "").await;
        let logs = LogThread::start(
            "bench-kernel-logs",
            Duration::from_millis(250),
            Some(Box::new(r.path.take_ring().unwrap()) as Box<dyn RecordSource>),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let w = SegmentWriter::create(&dir.path().join("a"), SegmentOptions::default()).unwrap();
        let (ingest, task) = pipeline(w, Default::default());
        let adopted = logs.adopt(task).unwrap();
        r.relay.record(
            RecordSinks {
                from_a: Some(ingest),
                from_b: None,
                kernel_ids: [adopted.kernel_id.unwrap(), 0],
            },
            Arc::new(RecordCounters::default()),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        exchange(&r, 2, 1).await;
        let pa = r.pa.into_std().unwrap();
        pa.set_nonblocking(false).unwrap();
        let rec = blast(&pa, r.ra, threads, secs);
        r.relay.stop().await;
        let rec_forwarded = kernel(&r.counters) as f64 / secs;
        let tail = adopted.end.await.unwrap().unwrap();
        let recorded = tail.records as f64 / secs;
        r.path.shutdown();

        // Not recorded.
        let r = rig(true, "").await;
        exchange(&r, 2, 1).await;
        let pb_addr = r.pb.local_addr().unwrap();
        let pa = r.pa.into_std().unwrap();
        pa.set_nonblocking(false).unwrap();
        let fwd = blast(&pa, r.ra, threads, secs);
        r.relay.stop().await;
        let forwarded = kernel(&r.counters) as f64 / secs;
        r.path.shutdown();

        // Plain loopback: A straight to B's socket, no program attached.
        let plain = blast(&pa, pb_addr, threads, secs);
        println!(
            "BENCH kernel turnaround ({threads} sender threads, sendmmsg x64, 160-byte RTP, {secs} s each):\n\
             BENCH   fast path:            sent {fwd:.0}/s, forwarded {forwarded:.0}/s\n\
             BENCH   fast path, recorded:  sent {rec:.0}/s, forwarded {rec_forwarded:.0}/s, recorded {recorded:.0}/s\n\
             BENCH   plain loopback:       sent {plain:.0}/s (no program, no relay)"
        );
    });
}

/// Packets the kernel forwards are activity for the RTP timeout (read from its counters):
/// a call talking only through the kernel outlives the timeout, and times out once silent.
#[test]
fn kernel_counters_keep_the_rtp_timeout_away_until_silence() {
    in_netns(async {
        let (r, mut events) = rig_with(true, "", Duration::from_secs(1)).await;
        exchange(&r, 2, 1).await;
        // 2.5 s of A->B only, all through the kernel.
        for i in 0..50u16 {
            r.pa.send_to(&rtp(0, 10 + i, &[3; 160]), r.ra)
                .await
                .unwrap();
            assert!(recv(&r.pb, Duration::from_secs(1)).await.is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(events.try_recv().is_err(), "timed out while talking");
        assert!(!r.relay.is_finished());
        let ev = tokio::time::timeout(Duration::from_secs(3), events.recv()).await;
        assert!(matches!(ev, Ok(Some(RelayEvent::Timeout { .. }))), "{ev:?}");
        assert!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed) >= 50);
    });
}

/// IPv6: the same forwarding on `::1` (addresses, ports and the UDP checksum, which IPv6
/// makes mandatory, rewritten; payload untouched).
#[test]
fn ipv6_legs_go_through_the_kernel_too() {
    in_netns(async {
        let (r, _events) = rig_on(
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            true,
            "",
            Duration::from_secs(10),
        )
        .await;
        exchange(&r, 30, 1).await;
        r.relay.stop().await;
        assert_eq!(r.counters.rtp_packets_total(), 60);
        assert_eq!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed), 58);
    });
}

/// A [`rig`] whose two directions are recorded into store logs in `dir` by a log writer
/// thread that drains this program's ring: the rig, and the logs' ends (A's, B's).
async fn recorded_rig(
    dir: &tempfile::TempDir,
) -> (
    Rig,
    crate::storage::log_thread::LogThread,
    Vec<tokio::sync::oneshot::Receiver<crate::storage::log_thread::LogEnd>>,
) {
    use crate::media::relay::{RecordCounters, RecordSinks};
    use crate::storage::log_thread::{LogThread, RecordSource};
    use crate::storage::segments::{pipeline, SegmentOptions, SegmentWriter};
    let r = rig(true, "").await;
    let ring = r.path.take_ring().expect("the ring, once");
    assert!(r.path.take_ring().is_none());
    let logs = LogThread::start(
        "test-kernel-logs",
        Duration::from_millis(50),
        Some(Box::new(ring) as Box<dyn RecordSource>),
    )
    .unwrap();
    let mut ingests = Vec::new();
    let mut ends = Vec::new();
    let mut ids = [0u32; 2];
    for (i, name) in ["a", "b"].iter().enumerate() {
        let w = SegmentWriter::create(&dir.path().join(name), SegmentOptions::default()).unwrap();
        let (ingest, task) = pipeline(w, Default::default());
        let adopted = logs.adopt(task).unwrap();
        ids[i] = adopted.kernel_id.expect("a kernel id with a ring");
        ends.push(adopted.end);
        ingests.push(ingest);
    }
    let (from_b, from_a) = (ingests.pop().unwrap(), ingests.pop().unwrap());
    r.relay.record(
        RecordSinks {
            from_a: Some(from_a),
            from_b: Some(from_b),
            kernel_ids: ids,
        },
        Arc::new(RecordCounters::default()),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    (r, logs, ends)
}

/// The sequence numbers of a finished log (`dir`/`name`) with each record's payload checked
/// by `want(seq)`.
async fn log_seqs(
    dir: &tempfile::TempDir,
    name: &str,
    end: tokio::sync::oneshot::Receiver<crate::storage::log_thread::LogEnd>,
    want: impl Fn(u16) -> Vec<u8>,
) -> Vec<u16> {
    let tail = tokio::time::timeout(Duration::from_secs(5), end)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(tail.finished);
    let mut reader = crate::storage::segments::SegmentReader::open(&dir.path().join(name), 0, None);
    let mut seqs = Vec::new();
    while let Some(rec) = reader.next().await.unwrap() {
        assert_eq!(
            rec.payload,
            want(rec.header.seq),
            "{name}: packet {}",
            rec.header.seq
        );
        assert_eq!(rec.header.ssrc, 0x1234);
        seqs.push(rec.header.seq);
    }
    assert_eq!(seqs.len() as u64, tail.records);
    seqs
}

/// Recorded directions through the kernel: the program forwards them and copies each into the
/// ring, the log writer thread drains the ring into the same store log the relay's own batches
/// go to. Every packet of the call is in its direction's log once, in order, byte for byte —
/// the latching packet from user space, the rest from the ring — and the kernel carried all
/// but the latching packets.
#[test]
fn recorded_directions_are_recorded_through_the_ring() {
    in_netns(async {
        let dir = tempfile::tempdir().unwrap();
        let stored_before = crate::metrics::METRICS
            .rtp_packets_stored_kernel_total
            .get();
        let (r, _logs, mut ends) = recorded_rig(&dir).await;
        exchange(&r, 100, 1).await;
        r.relay.stop().await;
        assert_eq!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed), 198);
        let b = log_seqs(&dir, "b", ends.pop().unwrap(), |s| {
            vec![!((s - 1) as u8); 172]
        })
        .await;
        let a = log_seqs(&dir, "a", ends.pop().unwrap(), |s| vec![(s - 1) as u8; 160]).await;
        let all: Vec<u16> = (1..=100).collect();
        assert_eq!((a, b), (all.clone(), all));
        let via_ring = crate::metrics::METRICS
            .rtp_packets_stored_kernel_total
            .get()
            - stored_before;
        assert!(via_ring >= 198, "{via_ring} records came through the ring");
    });
}

/// A recorded direction changes gears twice: A moves to a new port (new signalling re-opens
/// its latch), so its first packet from there is relayed and recorded in user space, then the
/// kernel takes it again under a new gear epoch. The log holds every packet in order.
#[test]
fn a_recorded_direction_keeps_its_order_across_gear_changes() {
    in_netns(async {
        let dir = tempfile::tempdir().unwrap();
        let (r, _logs, mut ends) = recorded_rig(&dir).await;
        exchange(&r, 20, 1).await;
        let moved = UdpSocket::bind((LO, 0)).await.unwrap();
        r.relay
            .set_remote(Side::A, Some(moved.local_addr().unwrap()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 20..60u16 {
            let pkt = rtp(0, i + 1, &[i as u8; 160]);
            moved.send_to(&pkt, r.ra).await.unwrap();
            let (got, _) = recv(&r.pb, Duration::from_secs(2))
                .await
                .expect("A (moved) to B");
            assert_eq!(got, pkt);
        }
        r.relay.stop().await;
        // 19 + 39 packets of A's in the kernel: one latching packet per gear change.
        assert!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed) >= 19 + 39);
        drop(ends.pop());
        let a = log_seqs(&dir, "a", ends.pop().unwrap(), |s| vec![(s - 1) as u8; 160]).await;
        assert_eq!(a, (1..=60).collect::<Vec<u16>>());
    });
}
