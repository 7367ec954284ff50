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

/// The physical limit beside the benchmark (docs/BENCHMARKS.md): datagrams per second the
/// fast path turns around on loopback, one blocking sender thread and one receiver, 2 s.
/// `cargo test --release --lib kernel_turnaround -- --ignored --nocapture` (root).
#[test]
#[ignore = "a measurement, not a check"]
fn kernel_turnaround_rate() {
    in_netns(async {
        let r = rig(true, "").await;
        exchange(&r, 2, 1).await;
        let ra = r.ra;
        let pa = r.pa.into_std().unwrap();
        pa.set_nonblocking(false).unwrap();
        let pb = r.pb.into_std().unwrap();
        pb.set_nonblocking(false).unwrap();
        pb.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let secs = 2.0;
        let recv = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0u64;
            while pb.recv_from(&mut buf).is_ok() {
                n += 1;
            }
            n
        });
        let pkt = rtp(0, 1, &[0; 160]);
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            if pa.send_to(&pkt, ra).is_ok() {
                sent += 1;
            }
        }
        let got = recv.join().unwrap();
        let wall = start.elapsed().as_secs_f64() - 0.2;
        println!(
            "BENCH kernel turnaround: sent {:.0}/s, received {:.0}/s (160-byte RTP, one sender)",
            sent as f64 / secs,
            got as f64 / wall
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

/// Recorded directions through the kernel: the program forwards them and copies each into the
/// ring, the log writer thread drains the ring into the same store log the relay's own batches
/// go to. Every packet of the call is in its direction's log once, in order, byte for byte —
/// the latching packet from user space, the rest from the ring — and the kernel carried all
/// but the latching packets.
#[test]
fn recorded_directions_are_recorded_through_the_ring() {
    use crate::media::relay::{RecordCounters, RecordSinks};
    use crate::storage::log_thread::{LogThread, RecordSource};
    use crate::storage::segments::{pipeline, SegmentOptions, SegmentReader, SegmentWriter};
    in_netns(async {
        let r = rig(true, "").await;
        let ring = r.path.take_ring().expect("the ring, once");
        assert!(r.path.take_ring().is_none());
        let logs = LogThread::start(
            "test-kernel-logs",
            Duration::from_millis(50),
            Some(Box::new(ring) as Box<dyn RecordSource>),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut ingests = Vec::new();
        let mut ends = Vec::new();
        let mut ids = [0u32; 2];
        for (i, name) in ["a", "b"].iter().enumerate() {
            let w =
                SegmentWriter::create(&dir.path().join(name), SegmentOptions::default()).unwrap();
            let (ingest, task) = pipeline(w, Default::default());
            let adopted = logs.adopt(task).unwrap();
            ids[i] = adopted.kernel_id.expect("a kernel id with a ring");
            ends.push(adopted.end);
            ingests.push(ingest);
        }
        let (from_b, from_a) = (ingests.pop().unwrap(), ingests.pop().unwrap());
        let stored_before = crate::metrics::METRICS
            .rtp_packets_stored_kernel_total
            .get();
        let record_counters = Arc::new(RecordCounters::default());
        r.relay.record(
            RecordSinks {
                from_a: Some(from_a),
                from_b: Some(from_b),
                kernel_ids: ids,
            },
            record_counters.clone(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        exchange(&r, 100, 1).await;
        r.relay.stop().await;
        assert_eq!(r.counters.kernel_rtp_packets.load(Ordering::Relaxed), 198);
        for (i, end) in ends.into_iter().enumerate() {
            let tail = tokio::time::timeout(Duration::from_secs(5), end)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(tail.finished);
            assert_eq!(tail.records, 100, "direction {i}");
            let mut reader = SegmentReader::open(&dir.path().join(["a", "b"][i]), 0, None);
            let mut seq = 1u16;
            while let Some(rec) = reader.next().await.unwrap() {
                assert_eq!(rec.header.seq, seq, "direction {i} in order");
                let k = (seq - 1) as u8;
                let want = if i == 0 { vec![k; 160] } else { vec![!k; 172] };
                assert_eq!(rec.payload, want, "direction {i} packet {seq}");
                assert_eq!(rec.header.ssrc, 0x1234);
                seq += 1;
            }
            assert_eq!(seq, 101);
        }
        let via_ring = crate::metrics::METRICS
            .rtp_packets_stored_kernel_total
            .get()
            - stored_before;
        assert!(via_ring >= 198, "{via_ring} records came through the ring");
        assert_eq!(
            record_counters.backpressure_drops.load(Ordering::Relaxed),
            0
        );
    });
}
