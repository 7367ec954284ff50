//! The play session of a store (PROTOCOL 2.5, step 333): one tokio task that reads the store's
//! records from the start and sends them as RTP to the receiver at their original pacing,
//! following the live tail while the store is still receiving.
//!
//! # What goes out
//!
//! Each record's payload, with callvault's own SSRC (never the stored one), contiguous
//! sequence numbers from a random start, and timestamps that start at a random value and
//! advance by the stored packets' timestamp deltas, so silence gaps (DTX) keep their timing.
//! Where the stored stream itself jumps (a new SSRC from the sender, or a timestamp jump larger
//! than `max_gap`), the output timestamp advances by the arrival-time gap instead, and the
//! marker bit flags the discontinuity. The marker is also set on the first packet and wherever
//! the stored packet had it (talkspurt starts, RFC 4733 event starts). The payload type is the
//! stored one; records of other payload types than the configured media and telephone-event
//! types are skipped.
//!
//! # Pacing
//!
//! "Original pacing" is the media's own timing: packet k is due `ts(k) - ts(k-1)` (our output
//! timestamps, in units of the clock rate) after packet k-1, with `due(0) = start`. For a live
//! sender that is the pacing it arrived with; a sender that pushed a file faster than real time
//! is still played at the codec's rate, which is what the adaptive threshold (`r_out`) assumes.
//! Where the timestamps say nothing (a zero or backwards step, e.g. RFC 4733 event packets that
//! share their event's timestamp, or a jump the timestamp map re-anchored), the arrival-time gap
//! is used instead, clamped to `[0, max_gap]`.
//!
//! When a record only becomes available after its due time (the player caught up with the live
//! tail and had to wait for the next commit) and it is later than `rebase_after`, it is sent at
//! once and the schedule is re-anchored there: the packets after it keep their spacing relative
//! to it. The alternative, catching up to the original schedule, would send every packet of a
//! late commit batch back to back: a burst that a receiver's jitter buffer may drop, at exactly
//! the moment the stream is thinnest. Re-anchoring costs a little extra delay per stall instead
//! (bounded by the commit interval plus an fsync each time the player touches the tail) and
//! never sends faster than the media's rate. Lateness up to `rebase_after` (timer and scheduling
//! jitter) is absorbed without re-anchoring so the playout does not drift.
//!
//! # Packet path
//!
//! One send buffer (header + largest payload) and one receive buffer for the whole session;
//! the record is copied from the reader's buffer straight into the send buffer behind a header
//! written in place. No allocation or lock per packet.
//!
//! Where packets go: the receiver's SDP address. Under the strict-source policy of
//! [`super::latch`] the target moves only when the SDP address is NAT-suspect (or
//! [`PlayerConfig::nat`]), to the first source sending valid RTP of the store's payload types,
//! and then never again without new SDP ([`PlayerHandle::set_target`]): a stranger's packet can
//! neither redirect the stream nor, after a pause, take it over. RTCP from the receiver is
//! drained.

use super::srtp::SrtpContext;

/// Bytes kept free behind a packet for an SRTP authentication tag (80 bits).
const SRTP_TAG_ROOM: usize = 10;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::latch::{Expect, Latch, PtSet, RefusedCounts};
use super::ports::PortPair;
use super::rtp::{RtpHeader, RTP_HEADER_LEN};
use crate::storage::segments::{RecordHeader, SegmentReader, MAX_PAYLOAD};

/// How one play session sends.
#[derive(Debug, Clone)]
pub(crate) struct PlayerConfig {
    /// Our SSRC; if it happens to equal the stored stream's, it is inverted.
    pub ssrc: u32,
    /// The store's media payload type (the play SDP offers the same number).
    pub payload_type: u8,
    /// The store's telephone-event payload type, replayed too when set.
    pub telephone_event_pt: Option<u8>,
    /// Clock rate of the media, for re-anchoring timestamps at discontinuities.
    pub clock_rate: u32,
    /// When the first packet is due (play ACK, or the threshold if later).
    pub start: StdInstant,
    pub first_seq: u16,
    pub first_timestamp: u32,
    /// A record later than this is sent at once and re-anchors the schedule (module doc).
    pub rebase_after: Duration,
    /// Largest arrival gap replayed; also the largest stored timestamp jump followed as is.
    pub max_gap: Duration,
    /// The receiver's SDP address may not be where it sends from (NAT): its first valid RTP
    /// moves the target (also assumed for private addresses, [`Expect::from_sdp`]).
    pub nat: bool,
    /// Callvault's SRTP key for the listener (an `RTP/SAVP` play session): every packet is
    /// protected in the send buffer before it leaves.
    pub srtp: Option<SrtpContext>,
}

impl PlayerConfig {
    /// Random SSRC, first sequence number and timestamp; starts now.
    pub(crate) fn new(payload_type: u8, clock_rate: u32) -> PlayerConfig {
        PlayerConfig {
            ssrc: rand::random(),
            payload_type,
            telephone_event_pt: None,
            clock_rate,
            start: StdInstant::now(),
            first_seq: rand::random(),
            first_timestamp: rand::random(),
            rebase_after: Duration::from_millis(10),
            max_gap: Duration::from_secs(10),
            nat: false,
            srtp: None,
        }
    }
}

/// Identifies a player in [`PlayerEvent`]s when several share one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PlayerId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlayerEvent {
    pub player: PlayerId,
    pub kind: PlayerEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PlayerEventKind {
    /// The first packet went out, this long after `start` (`callvault_play_start_seconds`).
    Started { first_packet_after: Duration },
    /// The store is finished and every record was sent: the caller sends BYE. `bytes` is
    /// payload bytes.
    Done { packets: u64, bytes: u64 },
    /// The store could not be read further (corruption, I/O); the session should end.
    Failed {
        error: String,
        packets: u64,
        bytes: u64,
    },
}

/// A session's outcome, returned by [`PlayerHandle::stop`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PlayerTotals {
    pub packets: u64,
    /// Payload bytes sent.
    pub bytes: u64,
    /// Sends that failed (e.g. ICMP unreachable surfacing on the socket).
    pub send_errors: u64,
    /// Records of other payload types, not sent.
    pub skipped: u64,
    /// Times the schedule was re-anchored because data came late.
    pub rebases: u64,
    /// Everything was sent (Done).
    pub done: bool,
    pub error: Option<String>,
}

enum Control {
    Stop,
}

/// Controls a running player. Dropping it stops the player.
#[derive(Debug)]
pub(crate) struct PlayerHandle {
    ctrl: mpsc::UnboundedSender<Control>,
    task: JoinHandle<PlayerTotals>,
}

impl PlayerHandle {
    /// Stops sending (BYE from the receiver, or after Done) and returns the totals once the
    /// task has ended and its ports are free.
    pub(crate) async fn stop(self) -> PlayerTotals {
        let _ = self.ctrl.send(Control::Stop);
        match self.task.await {
            Ok(t) => t,
            Err(e) => PlayerTotals {
                error: Some(format!("player task failed: {e}")),
                ..PlayerTotals::default()
            },
        }
    }
}

/// Entry point; see the module doc.
pub(crate) struct Player;

impl Player {
    /// Spawns the play task (inside a tokio runtime). `reader` starts at offset 0 with the
    /// store's live tail watch (or none for a store finished earlier).
    pub(crate) fn start(
        socket: PortPair,
        reader: SegmentReader,
        target: SocketAddr,
        config: PlayerConfig,
        events: mpsc::Sender<PlayerEvent>,
    ) -> PlayerHandle {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = PlayerId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(id, socket, reader, target, config, events, ctrl_rx));
        PlayerHandle { ctrl, task }
    }
}

/// Maps stored RTP timestamps onto ours; see the module doc.
#[derive(Debug)]
struct TsMap {
    /// `out = stored + offset` (wrapping) within one continuous stored stream.
    offset: u32,
    /// Previous record: stored SSRC, stored timestamp, arrival, and our timestamp for it.
    prev: Option<(u32, u32, u64, u32)>,
    first: u32,
    clock_rate: u32,
    max_jump: u32,
}

impl TsMap {
    fn new(first: u32, clock_rate: u32, max_gap: Duration) -> TsMap {
        let max_jump = (u128::from(clock_rate) * max_gap.as_micros() / 1_000_000)
            .min(u128::from(i32::MAX as u32)) as u32;
        TsMap {
            offset: 0,
            prev: None,
            first,
            clock_rate,
            max_jump,
        }
    }

    /// Our timestamp for a record, and whether the stored stream was discontinuous there.
    fn map(&mut self, h: &RecordHeader) -> (u32, bool) {
        let jump = match self.prev {
            None => {
                self.offset = self.first.wrapping_sub(h.timestamp);
                false
            }
            Some((ssrc, ts, arrival, out)) => {
                let d = h.timestamp.wrapping_sub(ts) as i32;
                if ssrc != h.ssrc || d.unsigned_abs() > self.max_jump {
                    // Follow wall-clock time across the discontinuity instead.
                    let gap_us = h.arrival_us.saturating_sub(arrival);
                    let ticks = (u128::from(gap_us) * u128::from(self.clock_rate) / 1_000_000)
                        .clamp(1, u128::from(self.max_jump.max(1)))
                        as u32;
                    self.offset = out.wrapping_add(ticks).wrapping_sub(h.timestamp);
                    true
                } else {
                    false
                }
            }
        };
        let out = h.timestamp.wrapping_add(self.offset);
        self.prev = Some((h.ssrc, h.timestamp, h.arrival_us, out));
        (out, jump)
    }
}

/// Where packets go: the SDP address, or the receiver's latched source (module doc).
struct Target {
    latch: Latch,
    /// Used while the latch has no address (an SDP without a usable one).
    fallback: SocketAddr,
    local: SocketAddr,
    nat: bool,
    pts: PtSet,
    refused: RefusedCounts,
}

impl Target {
    fn new(addr: SocketAddr, local: SocketAddr, cfg: &PlayerConfig) -> Target {
        let pts = PtSet::of([cfg.payload_type].into_iter().chain(cfg.telephone_event_pt));
        let mut t = Target {
            latch: Latch::new(Expect::strict(None, pts)),
            fallback: addr,
            local,
            nat: cfg.nat,
            pts,
            refused: RefusedCounts::default(),
        };
        t.set(addr);
        t
    }

    fn on_packet(&mut self, pkt: &[u8], src: SocketAddr) {
        if src == self.local {
            return;
        }
        if let crate::media::latch::Decision::Refuse(r) = self.latch.on_rtp(src, pkt) {
            self.refused.count(r);
            // Refusals are rare and come singly; published at once, not per accepted packet.
            self.refused.flush();
        }
    }

    #[inline]
    fn addr(&self) -> SocketAddr {
        self.latch.target().unwrap_or(self.fallback)
    }

    fn set(&mut self, addr: SocketAddr) {
        let mut expect = Expect::from_sdp(Some(addr), None, self.pts);
        expect.nat |= self.nat;
        self.fallback = addr;
        self.latch.expect(expect);
    }
}

/// Why the send loop stopped.
enum Exit {
    Done,
    Stopped,
    Failed(String),
}

struct Io<'a> {
    pair: &'a PortPair,
    ctrl: &'a mut mpsc::UnboundedReceiver<Control>,
    target: Target,
    recv_buf: Box<[u8]>,
    rtcp_buf: Box<[u8]>,
}

impl Io<'_> {
    /// Runs `fut` to completion while serving the receiver's packets and control messages.
    /// None: stop requested (or the handle dropped).
    async fn serve<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                r = self.pair.rtp.recv_from(&mut self.recv_buf) => {
                    if let Ok((n, src)) = r {
                        self.target.on_packet(&self.recv_buf[..n], src);
                    }
                }
                // Receiver reports are not acted upon; drained so they cannot pile up.
                _ = self.pair.rtcp.recv_from(&mut self.rtcp_buf) => {}
                c = self.ctrl.recv() => match c {
                    Some(Control::Stop) | None => return None,
                },
            }
        }
    }
}

async fn send(sock: &UdpSocket, buf: &[u8], to: SocketAddr) -> bool {
    sock.send_to(buf, to).await.is_ok()
}

async fn run(
    id: PlayerId,
    pair: PortPair,
    mut reader: SegmentReader,
    target: SocketAddr,
    mut cfg: PlayerConfig,
    events: mpsc::Sender<PlayerEvent>,
    mut ctrl: mpsc::UnboundedReceiver<Control>,
) -> PlayerTotals {
    let local = pair
        .rtp
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], pair.rtp_port)));
    let mut io = Io {
        pair: &pair,
        ctrl: &mut ctrl,
        target: Target::new(target, local, &cfg),
        recv_buf: vec![0u8; 2048].into_boxed_slice(),
        rtcp_buf: vec![0u8; 2048].into_boxed_slice(),
    };
    // The only allocation of the packet path: the send buffer, for the whole session.
    // Room for an SRTP tag behind the largest packet.
    let mut out = vec![0u8; RTP_HEADER_LEN + MAX_PAYLOAD + SRTP_TAG_ROOM].into_boxed_slice();
    let mut totals = PlayerTotals::default();
    let mut ts_map = TsMap::new(cfg.first_timestamp, cfg.clock_rate, cfg.max_gap);
    let mut ssrc = cfg.ssrc;
    let mut seq = cfg.first_seq;
    let start = Instant::from_std(cfg.start);
    // Due time, arrival and output timestamp of the previous packet sent.
    let mut prev: Option<(Instant, u64, u32)> = None;

    let exit = loop {
        // Next record, copied into the send buffer behind a fresh header.
        let Some(next) = io.serve(reader.next()).await else {
            break Exit::Stopped;
        };
        let (len, arrival, timestamp) = match next {
            Ok(Some(rec)) => {
                let h = rec.header;
                if h.payload_type != cfg.payload_type
                    && Some(h.payload_type) != cfg.telephone_event_pt
                {
                    totals.skipped += 1;
                    continue;
                }
                if prev.is_none() && h.ssrc == ssrc {
                    // Our own SSRC must differ from the stored sender's.
                    ssrc = !ssrc;
                }
                let (timestamp, jump) = ts_map.map(&h);
                let header = RtpHeader {
                    marker: prev.is_none() || h.marker || jump,
                    payload_type: h.payload_type,
                    sequence: seq,
                    timestamp,
                    ssrc,
                };
                // The buffer holds a header plus MAX_PAYLOAD, the most a record carries.
                let hl = header.write(&mut out).unwrap_or(RTP_HEADER_LEN);
                let n = rec.payload.len().min(out.len() - hl);
                out[hl..hl + n].copy_from_slice(&rec.payload[..n]);
                (hl + n, h.arrival_us, timestamp)
            }
            Ok(None) => break Exit::Done,
            Err(e) => break Exit::Failed(e.to_string()),
        };

        let now = Instant::now();
        let mut due = match prev {
            None => start,
            Some((t, a, ts)) => {
                let ticks = timestamp.wrapping_sub(ts);
                let media = Duration::from_micros(
                    u64::from(ticks) * 1_000_000 / u64::from(cfg.clock_rate.max(1)),
                );
                let gap = if ticks > 0 && ticks < u32::MAX / 2 && media <= cfg.max_gap {
                    media
                } else {
                    Duration::from_micros(arrival.saturating_sub(a)).min(cfg.max_gap)
                };
                t + gap
            }
        };
        if now > due + cfg.rebase_after {
            // Late (waited for the live tail): send now and keep the spacing from here.
            if prev.is_some() {
                totals.rebases += 1;
            }
            due = now;
        } else if due > now {
            let sleep = tokio::time::sleep_until(due);
            if io.serve(sleep).await.is_none() {
                break Exit::Stopped;
            }
        }
        let wire_len = match cfg.srtp.as_mut() {
            None => Ok(len),
            Some(ctx) => ctx.protect_rtp(&mut out, len),
        };
        let sent = match wire_len {
            Ok(n) => send(&pair.rtp, &out[..n], io.target.addr()).await,
            Err(_) => false,
        };
        if sent {
            totals.packets += 1;
            totals.bytes += (len - RTP_HEADER_LEN) as u64;
        } else {
            totals.send_errors += 1;
        }
        if prev.is_none() {
            let first_packet_after = Instant::now().saturating_duration_since(start);
            let _ = events
                .send(PlayerEvent {
                    player: id,
                    kind: PlayerEventKind::Started { first_packet_after },
                })
                .await;
        }
        prev = Some((due, arrival, timestamp));
        seq = seq.wrapping_add(1);
    };

    let kind = match exit {
        Exit::Done => {
            totals.done = true;
            Some(PlayerEventKind::Done {
                packets: totals.packets,
                bytes: totals.bytes,
            })
        }
        Exit::Failed(error) => {
            tracing::warn!(player = id.0, %error, "play stopped: store unreadable");
            totals.error = Some(error.clone());
            Some(PlayerEventKind::Failed {
                error,
                packets: totals.packets,
                bytes: totals.bytes,
            })
        }
        Exit::Stopped => None,
    };
    if let Some(kind) = kind {
        // The receiver may be gone (session torn down); nothing to report to then.
        let _ = events.send(PlayerEvent { player: id, kind }).await;
        // Stay until stopped so the port is not reused while the receiver may still send.
        let _ = io.serve(std::future::pending::<()>()).await;
    }
    drop(io);
    totals
    // `pair` drops here: sockets close, ports return to the allocator.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::ports::PortAllocator;
    use crate::media::rtp::RtpPacket;
    use crate::storage::segments::{SegmentOptions, SegmentWriter};
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::Path;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const STORED_SSRC: u32 = 0xdead_beef;
    const T0: u64 = 1_700_000_000_000_000;

    /// An allocator over a range free right now; `base` keeps parallel tests apart.
    fn allocator(base: u16, pairs: u16) -> PortAllocator {
        'outer: for start in (base..base + 4000).step_by(usize::from(pairs) * 2 + 2) {
            let start = start & !1;
            for p in start..start + pairs * 2 {
                if std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).is_err() {
                    continue 'outer;
                }
            }
            return PortAllocator::new(start, start + pairs * 2 - 1).unwrap();
        }
        panic!("no free range near {base}");
    }

    /// Record i of a 20 ms G.711 stream; from `gap_at` on, 200 ms of silence (DTX) precede.
    fn hdr(i: u32, gap_at: u32) -> RecordHeader {
        let gap = u32::from(i >= gap_at);
        RecordHeader {
            arrival_us: T0 + u64::from(i) * 20_000 + u64::from(gap) * 200_000,
            seq: (i as u16).wrapping_add(65_530),
            timestamp: (i * 160 + gap * 1600).wrapping_add(u32::MAX - 1000),
            ssrc: STORED_SSRC,
            payload_type: 0,
            marker: i == gap_at,
        }
    }

    fn payload(i: u32) -> Vec<u8> {
        (0..160).map(|j| (i * 7 + j) as u8).collect()
    }

    fn write(w: &mut SegmentWriter, range: std::ops::Range<u32>, gap_at: u32) {
        for i in range {
            w.append(&hdr(i, gap_at), &payload(i)).unwrap();
        }
    }

    struct Got {
        at: Instant,
        header: RtpHeader,
        payload: Vec<u8>,
    }

    async fn recv_n(sock: &UdpSocket, n: usize) -> Vec<Got> {
        let mut buf = [0u8; 2048];
        let mut out = Vec::new();
        while out.len() < n {
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("player stalled")
                .unwrap();
            let p = RtpPacket::parse(&buf[..len]).unwrap();
            out.push(Got {
                at: Instant::now(),
                header: RtpHeader {
                    marker: p.marker(),
                    payload_type: p.payload_type(),
                    sequence: p.sequence(),
                    timestamp: p.timestamp(),
                    ssrc: p.ssrc(),
                },
                payload: p.payload().to_vec(),
            });
        }
        out
    }

    async fn event(rx: &mut mpsc::Receiver<PlayerEvent>) -> PlayerEventKind {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event")
            .unwrap()
            .kind
    }

    fn start_player(
        ports: &PortAllocator,
        store: &Path,
        tail: Option<tokio::sync::watch::Receiver<crate::storage::segments::TailState>>,
        target: SocketAddr,
    ) -> (PlayerHandle, mpsc::Receiver<PlayerEvent>, SocketAddr) {
        start_player_nat(ports, store, tail, target, false)
    }

    fn start_player_nat(
        ports: &PortAllocator,
        store: &Path,
        tail: Option<tokio::sync::watch::Receiver<crate::storage::segments::TailState>>,
        target: SocketAddr,
        nat: bool,
    ) -> (PlayerHandle, mpsc::Receiver<PlayerEvent>, SocketAddr) {
        let pair = ports.allocate(LO).unwrap();
        let ours = SocketAddr::new(LO, pair.rtp_port);
        let reader = SegmentReader::open(store, 0, tail);
        let (tx, rx) = mpsc::channel(8);
        let mut cfg = PlayerConfig::new(0, 8000);
        cfg.first_seq = 65_000; // wraps during the test
        cfg.nat = nat;
        (Player::start(pair, reader, target, cfg, tx), rx, ours)
    }

    /// Sequence numbers contiguous, one SSRC unlike the stored one, payloads in order.
    fn check_stream(got: &[Got], first: u32) {
        let ssrc = got[0].header.ssrc;
        assert_ne!(ssrc, STORED_SSRC);
        for (k, g) in got.iter().enumerate() {
            let i = first + k as u32;
            assert_eq!(g.payload, payload(i), "packet {k}");
            assert_eq!(g.header.ssrc, ssrc);
            assert_eq!(g.header.payload_type, 0);
            if k > 0 {
                let p = &got[k - 1].header;
                assert_eq!(g.header.sequence, p.sequence.wrapping_add(1));
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plays_a_finished_store_in_full_at_original_pacing() {
        let ports = allocator(43000, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        write(&mut w, 0..50, 25);
        // Another payload type than the store's (not to be played).
        w.append(
            &RecordHeader {
                payload_type: 13,
                ..hdr(50, 25)
            },
            b"cn",
        )
        .unwrap();
        w.finish().unwrap();
        let rx_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let t_start = Instant::now();
        let (player, mut events, _) =
            start_player(&ports, dir.path(), None, rx_sock.local_addr().unwrap());
        let got = recv_n(&rx_sock, 50).await;
        check_stream(&got, 0);
        // Marker on the first packet and where the stored stream had one (after the gap).
        let markers: Vec<usize> = (0..50).filter(|k| got[*k].header.marker).collect();
        assert_eq!(markers, vec![0, 25]);
        // Timestamps advance by the stored deltas: 160, and 1760 across the silence.
        for k in 1..50 {
            let d = got[k]
                .header
                .timestamp
                .wrapping_sub(got[k - 1].header.timestamp);
            assert_eq!(d, if k == 25 { 1760 } else { 160 }, "packet {k}");
        }
        // 49 intervals of 20 ms plus 200 ms of silence: 1.18 s.
        let span = got[49].at - got[0].at;
        assert!(span >= Duration::from_millis(1100), "{span:?}");
        assert!(span < Duration::from_millis(2500), "{span:?}");
        let gap = got[25].at - got[24].at;
        assert!(gap >= Duration::from_millis(190), "{gap:?}");
        match event(&mut events).await {
            PlayerEventKind::Started { first_packet_after } => {
                assert!(first_packet_after <= t_start.elapsed());
                assert!(first_packet_after < Duration::from_millis(500));
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            event(&mut events).await,
            PlayerEventKind::Done {
                packets: 50,
                bytes: 50 * 160
            }
        );
        let totals = player.stop().await;
        assert!(totals.done);
        assert_eq!((totals.packets, totals.skipped), (50, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_received_faster_than_real_time_plays_at_the_media_rate() {
        // A sender that pushed 50 packets of 20 ms audio in 10 ms steps (2x real time): the
        // playback follows the RTP timestamps (what the adaptive threshold counts on).
        let ports = allocator(43100, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        for i in 0..50u32 {
            let h = RecordHeader {
                arrival_us: T0 + u64::from(i) * 10_000,
                ..hdr(i, u32::MAX)
            };
            w.append(&h, &[i as u8; 160]).unwrap();
        }
        w.finish().unwrap();
        let rx_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let (player, _events, _) =
            start_player(&ports, dir.path(), None, rx_sock.local_addr().unwrap());
        let got = recv_n(&rx_sock, 50).await;
        let span = got[49].at - got[0].at;
        // 49 intervals of 20 ms = 0.98 s, not the 0.49 s it took to arrive.
        assert!(span >= Duration::from_millis(900), "{span:?}");
        player.stop().await;
    }

    /// SIP play on a node that is not receiving the store (PROTOCOL.md 6): the player reads
    /// the chunks another node's uploader puts on s3s-fs, from the start while they arrive,
    /// and is done once the store's end object is there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plays_another_nodes_live_store_from_its_chunks() {
        use crate::storage::objects::chunks::{spawn_uploader, ChunkSource};
        use crate::storage::objects::tests::{s3_objects, start_s3s_fs};
        let Some(server) = start_s3s_fs() else { return };
        let objects = s3_objects(&server, "cv-play").await;
        let ports = allocator(43300, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        let up = spawn_uploader(
            std::sync::Arc::clone(&objects),
            "st_play".into(),
            dir.path().to_path_buf(),
            w.subscribe(),
        );
        write(&mut w, 0..10, u32::MAX);
        w.commit().unwrap();
        let rx_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let pair = ports.allocate(LO).unwrap();
        let reader = SegmentReader::from_objects(
            ChunkSource::new(std::sync::Arc::clone(&objects), "st_play", true, None),
            0,
        );
        let (tx, mut events) = mpsc::channel(8);
        let player = Player::start(
            pair,
            reader,
            rx_sock.local_addr().unwrap(),
            PlayerConfig::new(0, 8000),
            tx,
        );
        let writer = tokio::task::spawn_blocking(move || {
            for k in 10..40 {
                write(&mut w, k..k + 1, u32::MAX);
                w.commit().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            w
        });
        let got = recv_n(&rx_sock, 40).await;
        check_stream(&got, 0);
        let mut w = writer.await.unwrap();
        assert!(matches!(
            event(&mut events).await,
            PlayerEventKind::Started { .. }
        ));
        w.finish().unwrap();
        up.finish().await.unwrap();
        assert_eq!(
            event(&mut events).await,
            PlayerEventKind::Done {
                packets: 40,
                bytes: 40 * 160
            }
        );
        assert_eq!(player.stop().await.packets, 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_the_live_tail_and_is_done_only_after_finish() {
        let ports = allocator(43200, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        write(&mut w, 0..10, u32::MAX);
        w.commit().unwrap();
        let rx_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let (player, mut events, _) = start_player(
            &ports,
            dir.path(),
            Some(w.subscribe()),
            rx_sock.local_addr().unwrap(),
        );
        let mut got = recv_n(&rx_sock, 10).await;
        assert!(matches!(
            event(&mut events).await,
            PlayerEventKind::Started { .. }
        ));
        // The sender goes on, slower than real time (40 ms of stream per 60 ms), so the player
        // keeps catching up with the tail and must re-anchor.
        let writer = tokio::task::spawn_blocking(move || {
            for k in 0..10 {
                write(&mut w, 10 + 2 * k..12 + 2 * k, u32::MAX);
                w.commit().unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
            w
        });
        got.extend(recv_n(&rx_sock, 20).await);
        let mut w = writer.await.unwrap();
        check_stream(&got, 0);
        // Played out, but the store is still receiving: not done.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), events.recv())
                .await
                .is_err()
        );
        write(&mut w, 30..32, u32::MAX);
        w.finish().unwrap();
        got.extend(recv_n(&rx_sock, 2).await);
        check_stream(&got, 0);
        assert_eq!(
            event(&mut events).await,
            PlayerEventKind::Done {
                packets: 32,
                bytes: 32 * 160
            }
        );
        // Never faster than the original (31 intervals of 20 ms): re-anchoring only adds
        // delay. The margin is for receive-side scheduling jitter.
        let span = got[31].at - got[0].at;
        assert!(span >= Duration::from_millis(620 - 60), "{span:?}");
        let totals = player.stop().await;
        assert_eq!(totals.packets, 32);
        assert!(totals.rebases >= 1, "{totals:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relatches_to_the_receivers_source_and_stops_on_request() {
        let ports = allocator(43400, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        write(&mut w, 0..100, u32::MAX);
        w.finish().unwrap();
        let sdp_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let nat_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let (player, _events, ours) = start_player_nat(
            &ports,
            dir.path(),
            None,
            sdp_sock.local_addr().unwrap(),
            true,
        );
        let first = recv_n(&sdp_sock, 3).await;
        // The receiver's RTP really comes from elsewhere (NAT): we follow it.
        let mut pkt = vec![0u8; 12 + 20];
        RtpHeader {
            payload_type: 0,
            ssrc: 7,
            ..RtpHeader::default()
        }
        .write(&mut pkt)
        .unwrap();
        nat_sock.send_to(&pkt, ours).await.unwrap();
        let later = recv_n(&nat_sock, 3).await;
        assert!(
            later[0]
                .header
                .sequence
                .wrapping_sub(first[2].header.sequence)
                < 5
        );
        let totals = player.stop().await;
        assert!(!totals.done);
        assert!(totals.packets >= 6 && totals.packets < 100, "{totals:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_strangers_rtp_does_not_move_the_target() {
        let ports = allocator(43450, 1);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), SegmentOptions::default()).unwrap();
        write(&mut w, 0..100, u32::MAX);
        w.finish().unwrap();
        let sdp_sock = UdpSocket::bind((LO, 0)).await.unwrap();
        let evil = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let (player, _events, ours) =
            start_player(&ports, dir.path(), None, sdp_sock.local_addr().unwrap());
        recv_n(&sdp_sock, 2).await;
        let mut pkt = vec![0u8; 12 + 20];
        RtpHeader::default().write(&mut pkt).unwrap();
        evil.send_to(&pkt, ours).await.unwrap();
        // The receiver keeps getting the stream; the stranger gets nothing.
        recv_n(&sdp_sock, 5).await;
        let mut buf = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_millis(100), evil.recv_from(&mut buf)).await;
        assert!(got.is_err(), "the stranger got the stream");
        player.stop().await;
    }

    #[test]
    fn timestamps_follow_wall_clock_across_a_stored_discontinuity() {
        let mut m = TsMap::new(1000, 8000, Duration::from_secs(10));
        let h = |ssrc, ts, ms: u64| RecordHeader {
            arrival_us: T0 + ms * 1000,
            timestamp: ts,
            ssrc,
            ..RecordHeader::default()
        };
        assert_eq!(m.map(&h(1, 50_000, 0)), (1000, false));
        assert_eq!(m.map(&h(1, 50_160, 20)), (1160, false));
        // Reordered/duplicate timestamps map consistently.
        assert_eq!(m.map(&h(1, 50_160, 21)), (1160, false));
        // A new stored SSRC with an unrelated timestamp 500 ms later: +4000 ticks.
        assert_eq!(m.map(&h(2, 7, 521)), (5160, true));
        assert_eq!(m.map(&h(2, 167, 541)), (5320, false));
        // A timestamp jump beyond max_gap (10 s) in the same SSRC is not followed.
        assert_eq!(m.map(&h(2, 167 + 8000 * 60, 561)), (5480, true));
        // Wrapping stored timestamps are just deltas.
        let mut m = TsMap::new(0, 8000, Duration::from_secs(10));
        assert_eq!(m.map(&h(1, u32::MAX - 79, 0)), (0, false));
        assert_eq!(m.map(&h(1, 80, 20)), (160, false));
    }
}
