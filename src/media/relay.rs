//! The anchored RTP/RTCP relay of one call: one tokio task polling the four sockets of the two
//! legs and forwarding each packet to the other leg's remote party. In the server the task
//! runs on a media thread ([`super::threads`]), with its sockets registered there.
//!
//! Source latching ([`super::latch`], strict source against RTP bleed): each side's target is
//! its SDP address ([`RelayHandle::set_expect`]); packets are taken only from that address, or,
//! when the SDP suggests NAT or gives no address, from the first source sending valid RTP of a
//! negotiated payload type. The latched source never moves on its own (no re-latch after
//! silence); new signalling re-opens it. RTCP is taken only from the RTP source's host.
//! Refused datagrams are counted in `callvault_rtp_packets_refused_total{reason}`.
//!
//! DTMF feature code (PROTOCOL.md §2.1, §5): once a side's telephone-event payload type is
//! known ([`RelayHandle::set_dtmf_pt`]), its telephone-event packets go through a
//! [`DtmfGate`] that holds back `*7` PIN `#` and reports it as [`RelayEvent::FeatureCode`];
//! everything else of that side pays one payload-type compare.
//!
//! SRTP terminated per leg (PROTOCOL.md section 7): a side may have a context that
//! unprotects what it sends ([`SrtpDir::FromSide`], before latching, the DTMF gate and the
//! recording, which so see plain RTP) and one that protects what is sent to it
//! ([`SrtpDir::ToSide`], into a scratch buffer made when SRTP is switched on). Packets that
//! fail authentication or replay checks are dropped and counted
//! (`callvault_srtp_auth_failures_total`). A call without SRTP pays one branch per packet.
//!
//! Kernel fast path (the second gear, [`super::kernel`]): with a [`KernelPath`] in the config,
//! a direction whose sender is latched, whose receiver has a target, and which needs no
//! per-packet work here (no SRTP context, no inspector) is handed to the kernel: its packets
//! no longer reach this task. A recorded direction is handed over only when its log has an id
//! at the writer thread that drains the kernel's recording ring ([`RecordSinks::kernel_ids`]);
//! the kernel then records it, and this task hands its own batch to the writer as soon as the
//! sockets are drained, so the packets it recorded stay ahead of the kernel's in the log. The
//! entries follow every change of latch, target, SRTP, recording and DTMF types; the kernel's
//! counters (with the copies its ring had no room for) are read every [`KERNEL_POLL`] (and at
//! the RTP-timeout check and at stop) into the same counters.
//!
//! Packet path: one buffer per socket allocated at start, `try_send_to` (a full socket buffer
//! drops the packet rather than stalling both directions), counters kept locally and flushed to
//! the shared atomics every [`FLUSH_PACKETS`] packets or [`FLUSH_INTERVAL`], no locks, no logs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::dtmf::DtmfGate;
use super::kernel::{ring, KernelLegs, KernelPath, Want};
use super::latch::{Decision, Expect, Latch, PtSet, RefusedCounts};
use super::ports::PortPair;
use super::rtp::RtpPacket;
use super::srtp::{SrtpContext, SrtpError};
use crate::media::feature_code::HOLD_TIMEOUT;
use crate::metrics::METRICS;
use crate::storage::segments::{Ingest, IngestError, RecordHeader};

/// Largest datagram relayed whole; real RTP/RTCP stays under the 1500-byte MTU.
const BUF_LEN: usize = 2048;
/// Local counters are published after this many packets...
pub(crate) const FLUSH_PACKETS: u32 = 64;
/// ...or this long after the previous flush, whichever comes first.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How often a relay with kernel entries reads the kernel's counters of its legs.
pub(crate) const KERNEL_POLL: Duration = Duration::from_millis(500);

/// One party of the call: leg A (the caller's side) or leg B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn idx(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// What a packet inspector decides for one RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    // Only the relay's own tests install an inspector today; the hook stays on the packet path
    // as one predictable branch.
    #[cfg_attr(not(test), allow(dead_code))]
    Drop,
}

/// Optional per-packet hook on RTP (not RTCP), called with the side the packet came from and
/// its bytes, before forwarding (e.g. RFC 4733 feature-code detection). Absent by default, in
/// which case the packet path pays one predictable branch.
pub(crate) type Inspector = Box<dyn FnMut(Side, &[u8]) -> Verdict + Send>;

#[derive(Debug, Clone)]
pub(crate) struct RelayConfig {
    /// No packet from either side for this long ends the relay with [`RelayEvent::Timeout`].
    pub rtp_timeout: Duration,
    /// Whether the RTP timeout runs from the start or only after [`RelayHandle::arm_timeout`].
    pub timeout_armed_at_start: bool,
    /// DTMF feature code held back from the other party (`store.feature_code`, e.g. `*7`);
    /// empty: telephone-events are relayed untouched.
    pub feature_code: String,
    /// Held feature-code digits with no further telephone-event for this long are released.
    pub dtmf_hold_timeout: Duration,
    /// The kernel fast path, when attached (module doc).
    pub kernel: Option<Arc<KernelPath>>,
}

impl RelayConfig {
    pub(crate) fn new(rtp_timeout: Duration) -> Self {
        RelayConfig {
            rtp_timeout,
            ..Self::default()
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            rtp_timeout: Duration::from_secs(10),
            timeout_armed_at_start: true,
            feature_code: String::new(),
            dtmf_hold_timeout: HOLD_TIMEOUT,
            kernel: None,
        }
    }
}

/// Packets and bytes relayed in one direction.
#[derive(Debug, Default)]
pub(crate) struct DirectionCounters {
    pub rtp_packets: AtomicU64,
    pub rtp_bytes: AtomicU64,
    pub rtcp_packets: AtomicU64,
    pub rtcp_bytes: AtomicU64,
}

/// Counters of one relay or, shared through the `Arc`, of many (the metrics module reads them).
/// Updated with `Relaxed` ordering in batches; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct RelayCounters {
    pub a_to_b: DirectionCounters,
    pub b_to_a: DirectionCounters,
    /// Packets not forwarded: unknown target, foreign source, inspector drop, send failure,
    /// feature-code packets swallowed.
    pub dropped: AtomicU64,
    /// Of the RTP packets above (both directions), those the kernel forwarded.
    pub kernel_rtp_packets: AtomicU64,
    /// Counters that get the same additions (a relay's own counters feed the server-wide
    /// ones, so one relay's packets can be listed without a second pass on the packet path).
    pub parent: Option<Arc<RelayCounters>>,
}

impl RelayCounters {
    /// Fresh counters of one relay whose additions also go to `parent`.
    pub(crate) fn with_parent(parent: Arc<RelayCounters>) -> RelayCounters {
        RelayCounters {
            parent: Some(parent),
            ..RelayCounters::default()
        }
    }

    /// RTP packets relayed from `side` so far (published every flush).
    pub(crate) fn rtp_packets_from(&self, side: Side) -> u64 {
        self.direction_from(side)
            .rtp_packets
            .load(Ordering::Relaxed)
    }

    /// Counters of packets coming from `side`.
    pub(crate) fn direction_from(&self, side: Side) -> &DirectionCounters {
        match side {
            Side::A => &self.a_to_b,
            Side::B => &self.b_to_a,
        }
    }

    /// RTP packets relayed in both directions (`callvault_rtp_packets_relayed_total`).
    pub(crate) fn rtp_packets_total(&self) -> u64 {
        self.a_to_b.rtp_packets.load(Ordering::Relaxed)
            + self.b_to_a.rtp_packets.load(Ordering::Relaxed)
    }
}

/// Identifies a relay in [`RelayEvent`]s when several share one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RelayId(pub u64);

/// Reported by the relay task on the channel given at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RelayEvent {
    /// Nothing was received from either side for `rtp_timeout`; the relay has stopped and its
    /// ports are freed.
    Timeout { relay: RelayId },
    /// The party on `side` keyed the feature code as RFC 4733 telephone-events; its packets
    /// were not relayed.
    FeatureCode {
        relay: RelayId,
        side: Side,
        pin: String,
    },
}

/// Whole-call recording sinks (PROTOCOL.md §1): the store log of the packets coming *from*
/// each side. A side without a sink is not recorded.
#[derive(Debug, Default)]
pub(crate) struct RecordSinks {
    pub from_a: Option<Ingest>,
    pub from_b: Option<Ingest>,
    /// The logs' ids at the writer thread that drains the kernel's recording ring (A, B;
    /// 0: none): with one, a recorded direction may be forwarded and recorded in the kernel.
    pub kernel_ids: [u32; 2],
}

/// What the relay did with the recording of one direction, read after it stopped.
#[derive(Debug, Default)]
pub(crate) struct RecordCounters {
    /// Packets refused by a lagging store writer (relayed, but missing from the recording).
    pub backpressure_drops: AtomicU64,
}

/// The recording state of a running relay, indexed by the side packets come from.
struct Recording {
    sinks: [Option<Ingest>; 2],
    /// [`RecordSinks::kernel_ids`].
    kernel_ids: [u32; 2],
    /// The gear epoch of each direction's last kernel entry (`media::kernel::ring`).
    epochs: [u8; 2],
    /// Backpressure refusals since the last flush.
    dropped: u64,
    /// Packets and payload bytes handed to the logs since the last flush (metrics).
    stored_packets: u64,
    stored_bytes: u64,
    counters: Arc<RecordCounters>,
}

impl Recording {
    /// Appends one relayed RTP packet to its direction's log. Never blocks: a refusal only
    /// loses the packet from the recording; a dead writer ends that direction's recording.
    #[inline]
    fn push(&mut self, from: Side, pkt: &[u8]) {
        let Some(ingest) = self.sinks[from.idx()].as_mut() else {
            return;
        };
        let Ok(rtp) = RtpPacket::parse(pkt) else {
            return;
        };
        let h = RecordHeader {
            arrival_us: now_us(),
            seq: rtp.sequence(),
            timestamp: rtp.timestamp(),
            ssrc: rtp.ssrc(),
            payload_type: rtp.payload_type(),
            marker: rtp.marker(),
        };
        match ingest.push(&h, rtp.payload()) {
            Ok(()) => {
                self.stored_packets += 1;
                self.stored_bytes += rtp.payload().len() as u64;
            }
            Err(IngestError::Backpressure) => self.dropped += 1,
            Err(IngestError::WriterClosed | IngestError::Record(_)) => {
                self.sinks[from.idx()] = None;
            }
        }
    }

    fn flush(&mut self) {
        for slot in &mut self.sinks {
            if let Some(ingest) = slot.as_mut() {
                if ingest.flush().is_err() {
                    *slot = None;
                }
            }
        }
        if self.dropped > 0 {
            self.counters
                .backpressure_drops
                .fetch_add(self.dropped, Ordering::Relaxed);
            METRICS.recording_packets_refused_total.add(self.dropped);
            self.dropped = 0;
        }
        if self.stored_packets > 0 {
            METRICS.rtp_packets_stored_total.add(self.stored_packets);
            METRICS.rtp_bytes_stored_total.add(self.stored_bytes);
            self.stored_packets = 0;
            self.stored_bytes = 0;
        }
    }

    /// Hands the rest of each log to its writer, which then finishes it.
    async fn close(mut self) {
        self.flush();
        for ingest in self.sinks.into_iter().flatten() {
            // A closed writer has already ended; nothing more to hand it.
            let _ = ingest.close().await;
        }
    }
}

fn now_us() -> u64 {
    // A clock before 1970 is a broken host; 0 keeps the records well-formed.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Which packets of a side an SRTP context works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrtpDir {
    /// Unprotects what the side sends (its own key, from its `a=crypto`).
    FromSide,
    /// Protects what is sent to the side (callvault's key for that leg).
    ToSide,
}

/// The SRTP state of a relay: contexts per side and direction, the scratch buffer packets are
/// protected into, and drops not yet published.
struct LegsSrtp {
    from: [Option<SrtpContext>; 2],
    to: [Option<SrtpContext>; 2],
    scratch: [u8; BUF_LEN],
    auth_failures: u64,
    replays: u64,
}

enum Control {
    SetRemote(Side, Expect),
    SetSrtp(Side, SrtpDir, Option<Box<SrtpContext>>),
    SetDtmfPt(Side, Option<u8>),
    ArmTimeout,
    #[cfg_attr(not(test), allow(dead_code))]
    SetInspector(Option<Inspector>),
    Record(Box<RecordSinks>, Arc<RecordCounters>),
    Stop,
}

/// Controls a running relay. Dropping it stops the relay too.
#[derive(Debug)]
pub(crate) struct RelayHandle {
    id: RelayId,
    ctrl: mpsc::UnboundedSender<Control>,
    task: JoinHandle<()>,
    rtp_ports: [u16; 2],
}

impl RelayHandle {
    pub(crate) fn id(&self) -> RelayId {
        self.id
    }

    /// The relay's own RTP port facing `side` (what goes into that side's SDP).
    pub(crate) fn local_rtp_port(&self, side: Side) -> u16 {
        self.rtp_ports[side.idx()]
    }

    /// Sets what `side`'s signalling says about its media ([`Expect`]): the SDP address
    /// becomes the target at once and latching re-opens for `side` (module doc).
    pub(crate) fn set_expect(&self, side: Side, expect: Expect) {
        // A send error only means the task already ended; nothing left to update.
        let _ = self.ctrl.send(Control::SetRemote(side, expect));
    }

    /// [`set_expect`](Self::set_expect) strict to `addr` with any payload type (`None`:
    /// unknown, the first valid RTP latches).
    #[cfg(test)]
    pub(crate) fn set_remote(&self, side: Side, addr: Option<SocketAddr>) {
        self.set_expect(side, Expect::strict(addr, PtSet::ANY));
    }

    /// Sets the telephone-event payload type `side`'s SDP announced (`None`: none). Packets
    /// of either side's type from either side go through that side's feature-code gate.
    pub(crate) fn set_dtmf_pt(&self, side: Side, pt: Option<u8>) {
        let _ = self.ctrl.send(Control::SetDtmfPt(side, pt));
    }

    /// Starts the RTP timeout. Until then silence is normal (a call still ringing without
    /// early media must not be ended by it); the engine arms it when the call is answered.
    pub(crate) fn arm_timeout(&self) {
        let _ = self.ctrl.send(Control::ArmTimeout);
    }

    /// Installs (or with None removes) the SRTP context of `side` for `dir`.
    pub(crate) fn set_srtp(&self, side: Side, dir: SrtpDir, ctx: Option<Box<SrtpContext>>) {
        let _ = self.ctrl.send(Control::SetSrtp(side, dir, ctx));
    }

    /// Installs or removes the per-packet inspector.
    #[cfg(test)]
    pub(crate) fn set_inspector(&self, inspector: Option<Inspector>) {
        let _ = self.ctrl.send(Control::SetInspector(inspector));
    }

    /// Starts recording each direction into its sink (replacing earlier sinks, which are
    /// closed). The sinks are closed when the relay ends, so their writers finish then.
    pub(crate) fn record(&self, sinks: RecordSinks, counters: Arc<RecordCounters>) {
        // If the task already ended, the sinks drop here and their writers finish at once.
        let _ = self.ctrl.send(Control::Record(Box::new(sinks), counters));
    }

    /// True once the task has ended (stopped or timed out).
    #[cfg(test)]
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops the relay and waits until its task has ended: counters are flushed and the ports
    /// are back in the allocator when this returns.
    pub(crate) async fn stop(self) {
        let _ = self.ctrl.send(Control::Stop);
        // A JoinError means the task panicked or was aborted; either way it is gone.
        let _ = self.task.await;
    }
}

/// Entry point; see the module doc.
pub(crate) struct Relay;

impl Relay {
    /// Spawns the relay task for one call on the current tokio runtime. Remote addresses
    /// start unknown: call [`RelayHandle::set_remote`] with each side's SDP address.
    #[cfg(test)]
    pub(crate) fn start(
        leg_a: PortPair,
        leg_b: PortPair,
        config: RelayConfig,
        counters: Arc<RelayCounters>,
        events: mpsc::Sender<RelayEvent>,
    ) -> RelayHandle {
        Self::start_on(
            &tokio::runtime::Handle::current(),
            leg_a,
            leg_b,
            config,
            counters,
            events,
        )
    }

    /// [`start`](Self::start) on the runtime `rt`, which must be the one the legs' sockets
    /// are registered with ([`PortAllocator::allocate_on`](super::ports::PortAllocator::allocate_on)).
    pub(crate) fn start_on(
        rt: &tokio::runtime::Handle,
        leg_a: PortPair,
        leg_b: PortPair,
        config: RelayConfig,
        counters: Arc<RelayCounters>,
        events: mpsc::Sender<RelayEvent>,
    ) -> RelayHandle {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = RelayId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
        let rtp_ports = [leg_a.rtp_port, leg_b.rtp_port];
        let task = rt.spawn(run(id, [leg_a, leg_b], config, counters, events, ctrl_rx));
        RelayHandle {
            id,
            ctrl,
            task,
            rtp_ports,
        }
    }
}

/// What the relay knows about where one side's media goes.
#[derive(Debug)]
struct Peer {
    /// Where this side's packets are taken from and its RTP is sent to.
    latch: Latch,
    /// The payload types this side's own SDP listed (the latch takes both sides' types: a
    /// sender numbers by the receiver's SDP, RFC 3264 5.1).
    own_pts: PtSet,
    /// RTCP source seen from this side, if any (else RTP port + 1).
    rtcp: Option<SocketAddr>,
}

impl Peer {
    fn new() -> Self {
        Peer {
            // Until its SDP is known, a side may only use the other side's payload types.
            latch: Latch::new(Expect::strict(None, PtSet::EMPTY)),
            own_pts: PtSet::EMPTY,
            rtcp: None,
        }
    }

    /// The policy's decision for an RTP datagram from `src`.
    #[inline]
    fn accept_rtp(&mut self, src: SocketAddr, pkt: &[u8]) -> Decision {
        let d = self.latch.on_rtp(src, pkt);
        if d == Decision::Latch && self.rtcp.is_some_and(|r| r.ip() != src.ip()) {
            // RTCP follows the RTP source unless seen again from its host.
            self.rtcp = None;
        }
        d
    }

    /// RTCP is taken from the host RTP is latched to (any port).
    #[inline]
    fn accept_rtcp(&mut self, src: SocketAddr) -> bool {
        let ok = self.latch.rtcp_ok(src);
        if ok {
            self.rtcp = Some(src);
        }
        ok
    }

    #[inline]
    fn rtp_target(&self) -> Option<SocketAddr> {
        self.latch.target()
    }

    fn rtcp_target(&self) -> Option<SocketAddr> {
        self.rtcp.or_else(|| {
            let rtp = self.rtp_target()?;
            Some(SocketAddr::new(rtp.ip(), rtp.port().checked_add(1)?))
        })
    }
}

/// Counts kept on the task's stack between flushes.
#[derive(Default)]
struct LocalCounts {
    rtp_packets: [u64; 2],
    rtp_bytes: [u64; 2],
    rtcp_packets: [u64; 2],
    rtcp_bytes: [u64; 2],
    kernel_packets: u64,
    dropped: u64,
    refused: RefusedCounts,
    pending: u32,
}

impl LocalCounts {
    #[inline]
    fn count_sent(&mut self, from: usize, len: usize, sent: bool) {
        if sent {
            self.rtp_packets[from] += 1;
            self.rtp_bytes[from] += len as u64;
        } else {
            self.dropped += 1;
        }
    }

    fn flush(&mut self, counters: &RelayCounters) {
        if self.pending == 0 {
            return;
        }
        for c in std::iter::successors(Some(counters), |c| c.parent.as_deref()) {
            self.publish(c);
        }
        self.refused.flush();
        *self = LocalCounts::default();
    }

    fn publish(&self, c: &RelayCounters) {
        for side in [Side::A, Side::B] {
            let i = side.idx();
            let d = c.direction_from(side);
            d.rtp_packets
                .fetch_add(self.rtp_packets[i], Ordering::Relaxed);
            d.rtp_bytes.fetch_add(self.rtp_bytes[i], Ordering::Relaxed);
            d.rtcp_packets
                .fetch_add(self.rtcp_packets[i], Ordering::Relaxed);
            d.rtcp_bytes
                .fetch_add(self.rtcp_bytes[i], Ordering::Relaxed);
        }
        c.dropped.fetch_add(self.dropped, Ordering::Relaxed);
        c.kernel_rtp_packets
            .fetch_add(self.kernel_packets, Ordering::Relaxed);
    }
}

struct State {
    id: RelayId,
    peers: [Peer; 2],
    local_addrs: Vec<SocketAddr>,
    inspector: Option<Inspector>,
    /// Whole-call recording; None (the default) costs the packet path one branch.
    recording: Option<Box<Recording>>,
    /// SRTP of either leg; None (plain calls) costs the packet path one branch.
    srtp: Option<Box<LegsSrtp>>,
    /// This relay's entries in the kernel fast path; None when it is off.
    kernel: Option<Box<KernelLegs>>,
    /// The kernel just took a recorded direction over: hand the recording's batch to the
    /// writer once the sockets are drained, ahead of the kernel's records (`log_thread`).
    recording_flush_due: bool,
    /// Feature-code gate of the packets coming from each side; created when a
    /// telephone-event type becomes known (calls without one never allocate it).
    gates: [Option<Box<DtmfGate>>; 2],
    /// Telephone-event type announced by each side's SDP.
    dtmf_pts: [Option<u8>; 2],
    /// A gate changed: the hold timer must be re-read.
    gates_changed: bool,
    feature_code: String,
    dtmf_hold_timeout: Duration,
    events: mpsc::Sender<RelayEvent>,
    counts: LocalCounts,
    counters: Arc<RelayCounters>,
    last_flush: Instant,
    last_activity: Instant,
    /// The RTP timeout applies only once armed (see [`RelayHandle::arm_timeout`]).
    timeout_armed: bool,
}

impl State {
    /// Forwards one RTP packet received from `from` out of `out` (the other leg's RTP socket).
    #[inline]
    fn on_rtp(&mut self, from: Side, pkt: &[u8], src: SocketAddr, out: &UdpSocket, now: Instant) {
        self.last_activity = now;
        let decision = self.peers[from.idx()].accept_rtp(src, pkt);
        match decision {
            Decision::Refuse(r) => self.counts.refused.count(r),
            // A new latch may let the kernel take this direction over.
            Decision::Latch if self.kernel.is_some() => self.sync_kernel(),
            _ => {}
        }
        let ok = decision.is_ok()
            && match self.inspector.as_mut() {
                None => true,
                Some(inspect) => inspect(from, pkt) == Verdict::Forward,
            };
        if ok
            && self.gates[from.idx()]
                .as_deref()
                .is_some_and(|g| g.wants(pkt))
        {
            self.on_dtmf(from, pkt, out, now);
            self.after_packet(now);
            return;
        }
        let target = self.peers[from.other().idx()].rtp_target();
        let sent = ok
            && send_leg(
                self.srtp.as_deref_mut(),
                from.other(),
                Kind::Rtp,
                out,
                pkt,
                target,
            );
        self.counts.count_sent(from.idx(), pkt.len(), sent);
        if sent {
            if let Some(rec) = self.recording.as_deref_mut() {
                rec.push(from, pkt);
            }
        }
        self.after_packet(now);
    }

    #[inline]
    fn on_rtcp(&mut self, from: Side, pkt: &[u8], src: SocketAddr, out: &UdpSocket, now: Instant) {
        self.last_activity = now;
        let accepted = self.peers[from.idx()].accept_rtcp(src);
        if !accepted {
            self.counts
                .refused
                .count(crate::media::latch::Refusal::ForeignSource);
        }
        let target = self.peers[from.other().idx()].rtcp_target();
        let sent = accepted
            && send_leg(
                self.srtp.as_deref_mut(),
                from.other(),
                Kind::Rtcp,
                out,
                pkt,
                target,
            );
        if sent {
            self.counts.rtcp_packets[from.idx()] += 1;
            self.counts.rtcp_bytes[from.idx()] += pkt.len() as u64;
        } else {
            self.counts.dropped += 1;
        }
        self.after_packet(now);
    }

    /// A telephone-event packet from `from`: through the gate, which relays it (and whatever
    /// it releases) out of `out` or holds it back.
    #[cold]
    fn on_dtmf(&mut self, from: Side, pkt: &[u8], out: &UdpSocket, now: Instant) {
        let i = from.idx();
        let target = self.peers[from.other().idx()].rtp_target();
        let counts = &mut self.counts;
        let srtp = &mut self.srtp;
        let Some(gate) = self.gates[i].as_deref_mut() else {
            return;
        };
        let res = gate.on_packet(pkt, now.into_std(), &mut |p: &[u8]| {
            let sent = send_leg(srtp.as_deref_mut(), from.other(), Kind::Rtp, out, p, target);
            counts.count_sent(i, p.len(), sent);
        });
        self.counts.dropped += res.swallowed as u64;
        self.gates_changed = true;
        if let Some(pin) = res.code {
            self.report_code(from, pin);
        }
    }

    /// The earliest hold deadline of the gates.
    fn hold_deadline(&self) -> Option<Instant> {
        self.gates
            .iter()
            .flatten()
            .filter_map(|g| g.poll_timeout())
            .min()
            .map(Instant::from_std)
    }

    /// Releases digits held too long; `rtp` are the RTP sockets facing A and B.
    fn on_hold_timer(&mut self, now: Instant, rtp: [&UdpSocket; 2]) {
        for from in [Side::A, Side::B] {
            let i = from.idx();
            let out = rtp[from.other().idx()];
            let target = self.peers[from.other().idx()].rtp_target();
            let counts = &mut self.counts;
            let srtp = &mut self.srtp;
            let Some(gate) = self.gates[i].as_deref_mut() else {
                continue;
            };
            let res = gate.handle_timeout(now.into_std(), &mut |p: &[u8]| {
                let sent = send_leg(srtp.as_deref_mut(), from.other(), Kind::Rtp, out, p, target);
                counts.count_sent(i, p.len(), sent);
                counts.pending += 1;
            });
            self.counts.dropped += res.swallowed as u64;
            if let Some(pin) = res.code {
                self.report_code(from, pin);
            }
        }
        self.gates_changed = true;
    }

    fn report_code(&mut self, side: Side, pin: String) {
        tracing::info!(relay = self.id.0, ?side, "DTMF feature code in RTP");
        let ev = RelayEvent::FeatureCode {
            relay: self.id,
            side,
            pin,
        };
        // Never stall the media path on the core; a full queue means it is far behind.
        if self.events.try_send(ev).is_err() {
            tracing::warn!(
                relay = self.id.0,
                "relay event queue full, feature code lost"
            );
        }
    }

    /// New signalling for `side`: its latch re-opens; the other side's latch keeps its source
    /// and learns the new payload types.
    fn set_expect(&mut self, side: Side, expect: Expect) {
        let own = expect.pts;
        let other = self.peers[side.other().idx()].own_pts;
        let peer = &mut self.peers[side.idx()];
        peer.own_pts = own;
        peer.rtcp = None;
        peer.latch.expect(Expect {
            pts: own.union(other),
            ..expect
        });
        self.peers[side.other().idx()]
            .latch
            .set_pts(other.union(own));
    }

    fn set_dtmf_pt(&mut self, side: Side, pt: Option<u8>) {
        self.dtmf_pts[side.idx()] = pt;
        for from in [Side::A, Side::B] {
            // The sender may number the event by either SDP (RFC 3264 says the receiver's).
            let pts = [self.dtmf_pts[from.idx()], self.dtmf_pts[from.other().idx()]];
            let slot = &mut self.gates[from.idx()];
            if slot.is_none() && pts.iter().any(Option::is_some) && !self.feature_code.is_empty() {
                *slot = Some(Box::new(DtmfGate::new(
                    &self.feature_code,
                    self.dtmf_hold_timeout,
                )));
            }
            // A gate stays once made: what it holds is released by its timer even if the type
            // is gone after a re-INVITE.
            if let Some(g) = slot.as_deref_mut() {
                g.set_payload_types(pts);
            }
        }
    }

    fn recv_error(&mut self) {
        self.counts.dropped += 1;
        self.counts.pending += 1;
    }

    #[inline]
    fn after_packet(&mut self, now: Instant) {
        self.counts.pending += 1;
        if self.counts.pending >= FLUSH_PACKETS
            || now.duration_since(self.last_flush) >= FLUSH_INTERVAL
        {
            self.flush(now);
        }
    }

    /// Unprotects an SRTP/SRTCP packet from `from` in place: its plain length, or None when
    /// it is dropped (failed authentication or replay, counted).
    #[inline]
    fn unprotect(&mut self, from: Side, kind: Kind, pkt: &mut [u8], now: Instant) -> Option<usize> {
        let Some(s) = self.srtp.as_deref_mut() else {
            return Some(pkt.len());
        };
        let Some(ctx) = s.from[from.idx()].as_mut() else {
            return Some(pkt.len());
        };
        let r = match kind {
            Kind::Rtp => ctx.unprotect_rtp(pkt),
            Kind::Rtcp => ctx.unprotect_rtcp(pkt),
        };
        match r {
            Ok(n) => Some(n),
            Err(e) => {
                if e == SrtpError::Replay {
                    s.replays += 1;
                } else {
                    s.auth_failures += 1;
                }
                self.counts.dropped += 1;
                self.after_packet(now);
                None
            }
        }
    }

    /// Brings the kernel entries in line with the latches, targets and per-packet work of
    /// both directions (module doc). Not on the packet path: called on latching and controls.
    #[cold]
    fn sync_kernel(&mut self) {
        let Some(k) = self.kernel.as_deref_mut() else {
            return;
        };
        let srtp_free = self
            .srtp
            .as_deref()
            .is_none_or(|s| s.from.iter().chain(s.to.iter()).all(Option::is_none));
        let plain = srtp_free && self.inspector.is_none();
        for from in [Side::A, Side::B] {
            let (i, o) = (from.idx(), from.other().idx());
            // A recorded direction goes to the kernel only when the kernel can record it; an
            // entry that keeps recording the same log keeps its id, a new one starts an epoch.
            let before = k.recording_into(i);
            let rec_id = match self.recording.as_deref_mut() {
                Some(r) if r.sinks[i].is_some() && r.kernel_ids[i] == 0 => Some(0),
                Some(r) if r.sinks[i].is_some() => {
                    Some(if ring::log_of(before) == r.kernel_ids[i] {
                        before
                    } else {
                        r.epochs[i] = r.epochs[i].wrapping_add(1);
                        ring::with_epoch(r.kernel_ids[i], r.epochs[i])
                    })
                }
                _ => None,
            };
            let want = if plain && rec_id != Some(0) {
                let gate = self.gates[i].is_some();
                match (self.peers[i].latch.latched(), self.peers[o].rtp_target()) {
                    (Some(peer), Some(dst)) => Some(Want {
                        peer,
                        dst,
                        // Telephone-events of either side's type go through the gate here.
                        punt_pt: if gate {
                            [self.dtmf_pts[i], self.dtmf_pts[o]]
                        } else {
                            [None, None]
                        },
                        rec_id: rec_id.unwrap_or(0),
                    }),
                    _ => None,
                }
            } else {
                None
            };
            k.set(i, want);
            let now = k.recording_into(i);
            self.recording_flush_due |= now != 0 && now != before;
        }
    }

    /// Adds what the kernel forwarded since the last read to this relay's counts; growth is
    /// activity for the RTP timeout.
    fn poll_kernel(&mut self, now: Instant) {
        let Some(k) = self.kernel.as_deref_mut() else {
            return;
        };
        let delta = k.poll();
        let not_recorded: u64 = delta.iter().map(|d| d.rec_drops).sum();
        if not_recorded > 0 {
            match self.recording.as_deref_mut() {
                Some(rec) => rec.dropped += not_recorded,
                None => METRICS.recording_packets_refused_total.add(not_recorded),
            }
        }
        for (i, d) in delta.iter().enumerate() {
            if d.packets > 0 {
                self.counts.rtp_packets[i] += d.packets;
                self.counts.rtp_bytes[i] += d.bytes;
                self.counts.kernel_packets += d.packets;
                self.counts.pending += 1;
                self.last_activity = now;
            }
        }
    }

    fn kernel_active(&self) -> bool {
        self.kernel.as_deref().is_some_and(KernelLegs::active)
    }

    fn set_srtp(&mut self, side: Side, dir: SrtpDir, ctx: Option<Box<SrtpContext>>) {
        let s = self.srtp.get_or_insert_with(|| {
            Box::new(LegsSrtp {
                from: [None, None],
                to: [None, None],
                scratch: [0; BUF_LEN],
                auth_failures: 0,
                replays: 0,
            })
        });
        let slot = match dir {
            SrtpDir::FromSide => &mut s.from[side.idx()],
            SrtpDir::ToSide => &mut s.to[side.idx()],
        };
        *slot = ctx.map(|c| *c);
    }

    fn flush(&mut self, now: Instant) {
        self.counts.flush(&self.counters);
        if let Some(s) = self.srtp.as_deref_mut() {
            if s.auth_failures + s.replays > 0 {
                METRICS.srtp_auth_failures_total.add(s.auth_failures);
                METRICS.srtp_replay_failures_total.add(s.replays);
                s.auth_failures = 0;
                s.replays = 0;
            }
        }
        if let Some(rec) = self.recording.as_deref_mut() {
            rec.flush();
        }
        self.last_flush = now;
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::SetRemote(side, mut expect) => {
                // Pointing a side at our own sockets would loop packets forever.
                expect.addr = expect.addr.filter(|a| !self.local_addrs.contains(a));
                self.set_expect(side, expect);
            }
            Control::ArmTimeout => {
                if !self.timeout_armed {
                    self.timeout_armed = true;
                    self.last_activity = Instant::now();
                }
            }
            Control::SetDtmfPt(side, pt) => self.set_dtmf_pt(side, pt),
            Control::SetSrtp(side, dir, ctx) => self.set_srtp(side, dir, ctx),
            Control::SetInspector(i) => self.inspector = i,
            Control::Record(sinks, counters) => {
                let RecordSinks {
                    from_a,
                    from_b,
                    kernel_ids,
                } = *sinks;
                let old = self.recording.replace(Box::new(Recording {
                    sinks: [from_a, from_b],
                    kernel_ids,
                    epochs: [0; 2],
                    dropped: 0,
                    stored_packets: 0,
                    stored_bytes: 0,
                    counters,
                }));
                if let Some(old) = old {
                    // Closing waits for queue room; the writers drain on their own tasks.
                    tokio::spawn(old.close());
                }
            }
            Control::Stop => {}
        }
        self.sync_kernel();
    }
}

#[inline]
fn send(out: &UdpSocket, pkt: &[u8], to: Option<SocketAddr>) -> bool {
    match to {
        Some(to) => out.try_send_to(pkt, to).is_ok(),
        None => false,
    }
}

/// Sends `pkt` to the side `to`, protected with its SRTP context when it has one (copied into
/// the scratch buffer first: the plain packet may still be recorded).
#[inline]
fn send_leg(
    srtp: Option<&mut LegsSrtp>,
    to: Side,
    kind: Kind,
    out: &UdpSocket,
    pkt: &[u8],
    target: Option<SocketAddr>,
) -> bool {
    let Some(LegsSrtp {
        to: ctxs, scratch, ..
    }) = srtp
    else {
        return send(out, pkt, target);
    };
    let Some(ctx) = ctxs[to.idx()].as_mut() else {
        return send(out, pkt, target);
    };
    if target.is_none() || pkt.len() > scratch.len() {
        return false;
    }
    scratch[..pkt.len()].copy_from_slice(pkt);
    let protected = match kind {
        Kind::Rtp => ctx.protect_rtp(scratch, pkt.len()),
        Kind::Rtcp => ctx.protect_rtcp(scratch, pkt.len()),
    };
    match protected {
        Ok(n) => send(out, &scratch[..n], target),
        Err(_) => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rtp,
    Rtcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Stopped,
    TimedOut,
}

/// Rounds over the sockets in one wake-up before yielding to the thread's other relays.
const MAX_ROUNDS_PER_WAKE: u32 = 16;

/// One non-blocking receive; `Pending` registers the task for the socket's next readiness.
#[inline]
fn poll_recv(
    sock: &UdpSocket,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<std::io::Result<(usize, SocketAddr)>> {
    let mut rb = ReadBuf::new(buf);
    match sock.poll_recv_from(cx, &mut rb) {
        Poll::Ready(Ok(src)) => Poll::Ready(Ok((rb.filled().len(), src))),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

async fn run(
    id: RelayId,
    legs: [PortPair; 2],
    config: RelayConfig,
    counters: Arc<RelayCounters>,
    events: mpsc::Sender<RelayEvent>,
    mut ctrl: mpsc::UnboundedReceiver<Control>,
) {
    let now = Instant::now();
    let local_addrs = legs
        .iter()
        .flat_map(|l| [l.rtp.local_addr(), l.rtcp.local_addr()])
        .filter_map(Result::ok)
        .collect();
    let kernel = config.kernel.clone().and_then(|path| {
        let a = legs[0].rtp.local_addr().ok()?;
        let b = legs[1].rtp.local_addr().ok()?;
        Some(Box::new(KernelLegs::new(path, [a, b])))
    });
    let mut st = State {
        id,
        kernel,
        recording_flush_due: false,
        peers: [Peer::new(), Peer::new()],
        local_addrs,
        inspector: None,
        recording: None,
        srtp: None,
        gates: [None, None],
        dtmf_pts: [None, None],
        gates_changed: false,
        feature_code: config.feature_code.clone(),
        dtmf_hold_timeout: config.dtmf_hold_timeout,
        events: events.clone(),
        counts: LocalCounts::default(),
        counters,
        last_flush: now,
        last_activity: now,
        timeout_armed: config.timeout_armed_at_start,
    };
    let [a, b] = &legs;
    // The four sockets: (socket, the socket its packets leave by, the side they come from,
    // RTP or RTCP). Index i reads into `bufs[i]`.
    let socks = [
        (&a.rtp, &b.rtp, Side::A, Kind::Rtp),
        (&b.rtp, &a.rtp, Side::B, Kind::Rtp),
        (&a.rtcp, &b.rtcp, Side::A, Kind::Rtcp),
        (&b.rtcp, &a.rtcp, Side::B, Kind::Rtcp),
    ];
    // The only allocation of the packet path: one buffer per socket, for the whole call.
    let mut bufs = vec![[0u8; BUF_LEN]; socks.len()].into_boxed_slice();

    let sleep = tokio::time::sleep_until(now + config.rtp_timeout);
    tokio::pin!(sleep);
    // Feature-code hold timer, armed only while a gate holds something.
    let hold = tokio::time::sleep_until(now);
    tokio::pin!(hold);
    let mut hold_armed = false;
    // Kernel counter reads, armed only while this relay has kernel entries.
    let kpoll = tokio::time::sleep_until(now);
    tokio::pin!(kpoll);
    let mut kpoll_armed = false;

    // One wake-up handles whatever is ready on the four sockets, then the control channel and
    // the timers; sockets are read at most once per round so a flood on one cannot starve the
    // others. Hand-written rather than `select!`, which builds and drops a future per branch
    // for every packet (a visible share of the relay's CPU).
    let exit = std::future::poll_fn(|cx| {
        // Round 1 looks at everything, registering the task with every source; later rounds
        // only at sockets that just gave a packet (more may be queued; a socket that said
        // Pending wakes the task when it has data, and so do the channel and the timers).
        let mut again = [true; 4];
        let mut full = true;
        let mut rounds = 0u32;
        loop {
            let now = Instant::now();
            let mut got = [false; 4];
            for (i, &(sock, out, from, kind)) in socks.iter().enumerate() {
                if !again[i] {
                    continue;
                }
                let buf = &mut bufs[i];
                if let Poll::Ready(r) = poll_recv(sock, cx, buf) {
                    match r {
                        // SRTP legs are unprotected in place first; a dropped packet ends here.
                        Ok((n, src)) => {
                            if let Some(n) = st.unprotect(from, kind, &mut buf[..n], now) {
                                match kind {
                                    Kind::Rtp => st.on_rtp(from, &buf[..n], src, out, now),
                                    Kind::Rtcp => st.on_rtcp(from, &buf[..n], src, out, now),
                                }
                            }
                        }
                        // e.g. ICMP errors surfacing on the socket; the next packet may be fine.
                        Err(_) => st.recv_error(),
                    }
                    got[i] = true;
                }
            }
            let mut progress = got.iter().any(|g| *g);
            // The channel and the timers once per full round: they wake the task when they
            // have something; only one that just fired needs another look.
            let mut fired = false;
            if full {
                match ctrl.poll_recv(cx) {
                    // Stop, or the handle was dropped.
                    Poll::Ready(Some(Control::Stop) | None) => return Poll::Ready(Exit::Stopped),
                    Poll::Ready(Some(c)) => {
                        st.control(c);
                        fired = true;
                    }
                    Poll::Pending => {}
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    // Packets the kernel forwarded are activity too.
                    st.poll_kernel(now);
                    // Re-armed once per timeout period, not per packet.
                    let idle_until = st.last_activity + config.rtp_timeout;
                    // Also publishes what piled up since traffic stopped, so a reader of the
                    // Timeout event sees final counts.
                    st.flush(now);
                    if st.timeout_armed && idle_until <= now {
                        return Poll::Ready(Exit::TimedOut);
                    }
                    sleep.as_mut().reset(if st.timeout_armed {
                        idle_until
                    } else {
                        now + config.rtp_timeout
                    });
                    fired = true;
                }
                if hold_armed && hold.as_mut().poll(cx).is_ready() {
                    st.on_hold_timer(now, [&a.rtp, &b.rtp]);
                    fired = true;
                }
                if !st.kernel_active() {
                    kpoll_armed = false;
                } else if !kpoll_armed || kpoll.as_mut().poll(cx).is_ready() {
                    if kpoll_armed {
                        st.poll_kernel(now);
                        st.flush(now);
                    }
                    kpoll.as_mut().reset(now + KERNEL_POLL);
                    kpoll_armed = true;
                    // The next full round polls (registers) the re-armed timer.
                    fired = true;
                }
            }
            // Set by packets (a gate started or stopped holding) as well as by controls.
            if st.gates_changed {
                st.gates_changed = false;
                hold_armed = match st.hold_deadline() {
                    Some(t) => {
                        hold.as_mut().reset(t);
                        true
                    }
                    None => false,
                };
                // The next round is a full one, which polls (registers) the re-armed timer.
                fired = true;
            }
            progress |= fired;
            if !progress {
                if st.recording_flush_due {
                    st.recording_flush_due = false;
                    if let Some(rec) = st.recording.as_deref_mut() {
                        rec.flush();
                    }
                }
                return Poll::Pending;
            }
            rounds += 1;
            if rounds >= MAX_ROUNDS_PER_WAKE {
                // Let the other relays of this thread run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            full = fired || !got.iter().any(|g| *g);
            again = if full { [true; 4] } else { got };
        }
    })
    .await;
    if exit == Exit::TimedOut {
        tracing::info!(relay = id.0, "rtp timeout, relay stopped");
        // The receiver may be gone (call already torn down); nothing to do then.
        let _ = events.send(RelayEvent::Timeout { relay: id }).await;
    }
    // Entries out before the sockets close, then their last counts.
    if let Some(k) = st.kernel.as_deref_mut() {
        k.clear();
    }
    st.poll_kernel(Instant::now());
    st.flush(Instant::now());
    // Sockets close and ports return to the allocator before the recording is wrapped up.
    drop(legs);
    if let Some(rec) = st.recording.take() {
        // Off the relay task: a writer stuck on disk must not hold up `stop`.
        tokio::spawn(rec.close());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::ports::PortAllocator;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Mutex;

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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

    struct Rig {
        ports: PortAllocator,
        relay: RelayHandle,
        counters: Arc<RelayCounters>,
        events: mpsc::Receiver<RelayEvent>,
        /// Relay-side addresses: [A rtp, A rtcp, B rtp, B rtcp].
        relay_addrs: [SocketAddr; 4],
    }

    fn rig(base: u16, config: RelayConfig) -> Rig {
        let ports = allocator(base, 2);
        let a = ports.allocate(LO).unwrap();
        let b = ports.allocate(LO).unwrap();
        let relay_addrs = [
            SocketAddr::new(LO, a.rtp_port),
            SocketAddr::new(LO, a.rtp_port + 1),
            SocketAddr::new(LO, b.rtp_port),
            SocketAddr::new(LO, b.rtp_port + 1),
        ];
        let counters = Arc::new(RelayCounters::default());
        let (tx, events) = mpsc::channel(4);
        let relay = Relay::start(a, b, config, counters.clone(), tx);
        Rig {
            ports,
            relay,
            counters,
            events,
            relay_addrs,
        }
    }

    /// A phone: RTP and RTCP sockets on consecutive ports.
    fn phone(alloc: &PortAllocator) -> PortPair {
        alloc.allocate(LO).unwrap()
    }

    fn addr(p: &PortPair) -> SocketAddr {
        SocketAddr::new(LO, p.rtp_port)
    }

    fn rtp_packet(seq: u16, len: usize) -> Vec<u8> {
        let mut v = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        v[2..4].copy_from_slice(&seq.to_be_bytes());
        v.extend((0..len).map(|i| (i as u8).wrapping_mul(seq as u8)));
        v
    }

    async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf))
            .await
            .expect("nothing received")
            .unwrap();
        (buf[..n].to_vec(), from)
    }

    async fn nothing(sock: &UdpSocket) {
        let mut buf = [0u8; 2048];
        let r = tokio::time::timeout(Duration::from_millis(150), sock.recv_from(&mut buf)).await;
        assert!(r.is_err(), "unexpected packet");
    }

    #[tokio::test]
    async fn relays_both_ways_byte_for_byte_and_counts() {
        let mut rig = rig(42000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(42500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        let [a_rtp, a_rtcp, b_rtp, b_rtcp] = rig.relay_addrs;
        assert_eq!(rig.relay.local_rtp_port(Side::A), a_rtp.port());
        assert_eq!(rig.relay.local_rtp_port(Side::B), b_rtp.port());

        let mut bytes_ab = 0;
        for seq in 0..50u16 {
            let p = rtp_packet(seq, 160);
            bytes_ab += p.len() as u64;
            pa.rtp.send_to(&p, a_rtp).await.unwrap();
            let (got, from) = recv(&pb.rtp).await;
            assert_eq!(got, p);
            // B sees the packets coming from the relay's B-side port (anchoring)
            assert_eq!(from, b_rtp);
        }
        for seq in 0..30u16 {
            let p = rtp_packet(1000 + seq, 80 + usize::from(seq));
            pb.rtp.send_to(&p, b_rtp).await.unwrap();
            let (got, from) = recv(&pa.rtp).await;
            assert_eq!(got, p);
            assert_eq!(from, a_rtp);
        }
        // RTCP goes to the RTP port + 1 of each side, from the relay's RTCP ports
        let rr = [0x81u8, 201, 0, 7, 0, 0, 0, 1, 9, 9, 9, 9];
        pa.rtcp.send_to(&rr, a_rtcp).await.unwrap();
        assert_eq!(recv(&pb.rtcp).await, (rr.to_vec(), b_rtcp));
        pb.rtcp.send_to(&rr[..8], b_rtcp).await.unwrap();
        assert_eq!(recv(&pa.rtcp).await, (rr[..8].to_vec(), a_rtcp));

        rig.relay.stop().await;
        let c = &rig.counters;
        assert_eq!(c.a_to_b.rtp_packets.load(Ordering::Relaxed), 50);
        assert_eq!(c.a_to_b.rtp_bytes.load(Ordering::Relaxed), bytes_ab);
        assert_eq!(c.b_to_a.rtp_packets.load(Ordering::Relaxed), 30);
        assert_eq!(c.a_to_b.rtcp_packets.load(Ordering::Relaxed), 1);
        assert_eq!(c.b_to_a.rtcp_bytes.load(Ordering::Relaxed), 8);
        assert_eq!(c.rtp_packets_total(), 80);
        assert_eq!(c.dropped.load(Ordering::Relaxed), 0);
        assert!(rig.events.try_recv().is_err(), "no timeout event on stop");
    }

    #[tokio::test]
    async fn latches_onto_real_source_and_relatches_after_sdp_update() {
        let rig = rig(43000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(43500, 4);
        let (pa, pb, pa_moved, announced_only) = (
            phone(&phones),
            phone(&phones),
            phone(&phones),
            phone(&phones),
        );
        let [a_rtp, _, b_rtp, b_rtcp] = rig.relay_addrs;
        // SDP says A is at `announced_only`, but A really sends from `pa` (NAT).
        rig.relay.set_expect(
            Side::A,
            Expect {
                addr: Some(addr(&announced_only)),
                pts: PtSet::of([0]),
                nat: true,
            },
        );
        rig.relay.set_remote(Side::B, Some(addr(&pb)));

        pa.rtp.send_to(&rtp_packet(1, 20), a_rtp).await.unwrap();
        recv(&pb.rtp).await;
        pb.rtp.send_to(&rtp_packet(2, 20), b_rtp).await.unwrap();
        assert_eq!(recv(&pa.rtp).await.0, rtp_packet(2, 20));
        nothing(&announced_only.rtp).await;

        // A stray source while A is alive is dropped, and A's target does not move.
        pa_moved
            .rtp
            .send_to(&rtp_packet(3, 20), a_rtp)
            .await
            .unwrap();
        nothing(&pb.rtp).await;
        pb.rtp.send_to(&rtp_packet(4, 20), b_rtp).await.unwrap();
        assert_eq!(recv(&pa.rtp).await.0, rtp_packet(4, 20));

        // After an SDP update (re-INVITE), the new source is taken at its first packet.
        rig.relay.set_remote(Side::A, Some(addr(&pa_moved)));
        pa_moved
            .rtp
            .send_to(&rtp_packet(5, 20), a_rtp)
            .await
            .unwrap();
        assert_eq!(recv(&pb.rtp).await.0, rtp_packet(5, 20));
        pb.rtp.send_to(&rtp_packet(6, 20), b_rtp).await.unwrap();
        assert_eq!(recv(&pa_moved.rtp).await.0, rtp_packet(6, 20));
        nothing(&pa.rtp).await;
        // RTCP towards A now follows the new source's port + 1
        let sr = [0x80u8, 200, 0, 1, 0, 0, 0, 0];
        pb.rtcp.send_to(&sr, b_rtcp).await.unwrap();
        assert_eq!(recv(&pa_moved.rtcp).await.0, sr.to_vec());

        rig.relay.stop().await;
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn no_relatch_after_silence_and_rtcp_follows_the_rtp_host() {
        let rig = rig(44000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(44500, 3);
        let (pa, pb, pa2) = (phone(&phones), phone(&phones), phone(&phones));
        let [a_rtp, a_rtcp, b_rtp, b_rtcp] = rig.relay_addrs;
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        // A's SDP address is unknown (e.g. 0.0.0.0): B's packets are dropped until A sends.
        pb.rtp.send_to(&rtp_packet(1, 10), b_rtp).await.unwrap();
        nothing(&pa.rtp).await;
        // Garbage does not latch; RTP does.
        pa2.rtp.send_to(b"hello", a_rtp).await.unwrap();
        pa.rtp.send_to(&rtp_packet(2, 10), a_rtp).await.unwrap();
        assert_eq!(recv(&pb.rtp).await.0, rtp_packet(2, 10));
        // A pause is no opening: another source, even on A's host, is refused after it.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        pa2.rtp.send_to(&rtp_packet(3, 10), a_rtp).await.unwrap();
        nothing(&pb.rtp).await;
        pb.rtp.send_to(&rtp_packet(4, 10), b_rtp).await.unwrap();
        assert_eq!(recv(&pa.rtp).await.0, rtp_packet(4, 10));
        nothing(&pa2.rtp).await;

        // A sends RTCP from its host but not from RTP + 1: B's RTCP for A goes there.
        let rr = [0x81u8, 201, 0, 1, 0, 0, 0, 2];
        pa2.rtp.send_to(&rr, a_rtcp).await.unwrap();
        assert_eq!(recv(&pb.rtcp).await.0, rr.to_vec());
        pb.rtcp.send_to(&rr, b_rtcp).await.unwrap();
        assert_eq!(recv(&pa2.rtp).await.0, rr.to_vec());
        rig.relay.stop().await;
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn eavesdropper_before_the_caller_speaks_gets_nothing() {
        let rig = rig(44200, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(44700, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        let [a_rtp, a_rtcp, b_rtp, _] = rig.relay_addrs;
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        // Another host sends valid RTP and RTCP to A's port before A says anything.
        let evil = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let refused =
            METRICS.rtp_packets_refused_total(crate::media::latch::Refusal::ForeignSource);
        evil.send_to(&rtp_packet(1, 20), a_rtp).await.unwrap();
        evil.send_to(&[0x81u8, 201, 0, 1, 0, 0, 0, 2], a_rtcp)
            .await
            .unwrap();
        nothing(&pb.rtp).await;
        // B's audio still goes to A, and none to the stranger.
        for i in 0..5u16 {
            pb.rtp.send_to(&rtp_packet(i, 20), b_rtp).await.unwrap();
            assert_eq!(recv(&pa.rtp).await.0, rtp_packet(i, 20));
        }
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(Duration::from_millis(150), evil.recv_from(&mut buf)).await;
        assert!(got.is_err(), "the eavesdropper got a packet");
        rig.relay.stop().await;
        assert!(
            METRICS.rtp_packets_refused_total(crate::media::latch::Refusal::ForeignSource)
                >= refused + 2
        );
    }

    #[tokio::test]
    async fn timeout_fires_and_frees_ports() {
        let mut rig = rig(45000, RelayConfig::new(Duration::from_millis(200)));
        let phones = allocator(45500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        assert_eq!(rig.ports.pairs_in_use(), 2);
        // Traffic keeps it alive past one timeout period...
        let start = Instant::now();
        for i in 0..6u16 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            pa.rtp
                .send_to(&rtp_packet(i, 10), rig.relay_addrs[0])
                .await
                .unwrap();
            recv(&pb.rtp).await;
        }
        let last = Instant::now();
        assert!(last - start >= Duration::from_millis(400));
        assert!(!rig.relay.is_finished());
        // ...then silence ends it.
        let ev = tokio::time::timeout(Duration::from_secs(2), rig.events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ev,
            RelayEvent::Timeout {
                relay: rig.relay.id()
            }
        );
        let waited = Instant::now() - last;
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        // counters were flushed before the event
        assert_eq!(rig.counters.a_to_b.rtp_packets.load(Ordering::Relaxed), 6);
        rig.relay.stop().await;
        assert_eq!(rig.ports.pairs_in_use(), 0);
    }

    #[tokio::test]
    async fn unarmed_timeout_waits_for_arm() {
        // A ringing call has no RTP yet: silence must not end it until the call is answered.
        let config = RelayConfig {
            timeout_armed_at_start: false,
            ..RelayConfig::new(Duration::from_millis(100))
        };
        let mut rig = rig(46100, config);
        let early = tokio::time::timeout(Duration::from_millis(400), rig.events.recv()).await;
        assert!(early.is_err(), "no timeout before arming");
        rig.relay.arm_timeout();
        let ev = tokio::time::timeout(Duration::from_secs(2), rig.events.recv())
            .await
            .unwrap();
        assert!(matches!(ev, Some(RelayEvent::Timeout { .. })));
    }

    #[tokio::test]
    async fn timeout_with_no_traffic_at_all() {
        let mut rig = rig(46000, RelayConfig::new(Duration::from_millis(200)));
        let ev = tokio::time::timeout(Duration::from_secs(2), rig.events.recv())
            .await
            .unwrap();
        assert!(matches!(ev, Some(RelayEvent::Timeout { .. })));
        // the task is over and the ports are back without calling stop
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(rig.relay.is_finished());
        assert_eq!(rig.ports.pairs_in_use(), 0);
    }

    #[tokio::test]
    async fn stop_and_drop_release_ports() {
        let r1 = rig(47000, RelayConfig::default());
        assert_eq!(r1.ports.ports_in_use(), 4);
        r1.relay.stop().await;
        assert_eq!(r1.ports.ports_in_use(), 0);
        // the same ports can be bound again at once
        let again = r1.ports.allocate(LO).unwrap();
        assert!(r1.relay_addrs.iter().any(|a| a.port() == again.rtp_port));
        drop(again);

        let rig2 = rig(47000, RelayConfig::default());
        assert_eq!(rig2.ports.pairs_in_use(), 2);
        let ports = rig2.ports.clone();
        drop(rig2.relay);
        for _ in 0..100 {
            if ports.pairs_in_use() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(ports.pairs_in_use(), 0);
    }

    #[tokio::test]
    async fn inspector_sees_rtp_and_can_drop() {
        let rig = rig(48000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(48500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        let [a_rtp, a_rtcp, b_rtp, _] = rig.relay_addrs;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        // Swallow telephone-events (PT 101) from A, as the feature-code hook will.
        rig.relay
            .set_inspector(Some(Box::new(move |side, pkt: &[u8]| {
                log.lock().unwrap().push((side, pkt[1] & 0x7f));
                if side == Side::A && pkt[1] & 0x7f == 101 {
                    Verdict::Drop
                } else {
                    Verdict::Forward
                }
            })));
        let mut dtmf = rtp_packet(1, 4);
        dtmf[1] = 101;
        pa.rtp.send_to(&dtmf, a_rtp).await.unwrap();
        pa.rtp.send_to(&rtp_packet(2, 10), a_rtp).await.unwrap();
        assert_eq!(recv(&pb.rtp).await.0, rtp_packet(2, 10));
        // B's telephone-events are forwarded
        pb.rtp.send_to(&dtmf, b_rtp).await.unwrap();
        assert_eq!(recv(&pa.rtp).await.0, dtmf);
        // RTCP is not inspected
        pa.rtcp
            .send_to(&[0x80, 200, 0, 1, 0, 0, 0, 0], a_rtcp)
            .await
            .unwrap();
        recv(&pb.rtcp).await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(Side::A, 101), (Side::A, 0), (Side::B, 101)]
        );
        // removing it forwards everything again
        rig.relay.set_inspector(None);
        pa.rtp.send_to(&dtmf, a_rtp).await.unwrap();
        assert_eq!(recv(&pb.rtp).await.0, dtmf);
        rig.relay.stop().await;
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn remote_pointing_at_the_relay_itself_is_ignored() {
        let rig = rig(49000, RelayConfig::new(Duration::from_secs(5)));
        let a_rtp = rig.relay_addrs[0];
        // B "announced" the relay's own A port: that would loop, so B stays unknown.
        rig.relay.set_remote(Side::B, Some(a_rtp));
        let phones = allocator(49500, 1);
        let pa = phone(&phones);
        pa.rtp.send_to(&rtp_packet(1, 10), a_rtp).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        rig.relay.stop().await;
        assert_eq!(rig.counters.a_to_b.rtp_packets.load(Ordering::Relaxed), 0);
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 1);
    }

    // ---- RFC 4733 feature code

    const TE: u8 = 101;

    /// One key press as a phone sends it: 3 updates of growing duration, then 3 end packets,
    /// all with the press's timestamp.
    fn key_press(key: char, ts: u32, seq: &mut u16) -> Vec<Vec<u8>> {
        use crate::media::dtmf::{char_to_event, TelephoneEvent};
        let event = char_to_event(key).unwrap();
        let mut out = Vec::new();
        for (duration, end) in [
            (160, false),
            (320, false),
            (480, false),
            (640, true),
            (640, true),
            (640, true),
        ] {
            let mut p = vec![0x80, TE, 0, 0, 0, 0, 0, 0, 0, 0, 0x0d, 0x0d];
            p[2..4].copy_from_slice(&seq.to_be_bytes());
            p[4..8].copy_from_slice(&ts.to_be_bytes());
            p.extend_from_slice(
                &TelephoneEvent {
                    event,
                    end,
                    volume: 10,
                    duration,
                }
                .to_bytes(),
            );
            *seq = seq.wrapping_add(1);
            out.push(p);
        }
        out
    }

    /// Everything arriving on `sock` until it has been quiet for 300 ms.
    async fn drain(sock: &UdpSocket) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await
        {
            got.push(buf[..r.unwrap().0].to_vec());
        }
        got
    }

    fn is_te(p: &[u8]) -> bool {
        p[1] & 0x7f == TE
    }

    /// A rig with both phones, telephone-events announced on both sides, and a first audio
    /// packet each way through (so the controls are in effect).
    async fn dtmf_rig(base: u16, hold: Duration) -> (Rig, PortPair, PortPair) {
        let config = RelayConfig {
            feature_code: "*7".into(),
            dtmf_hold_timeout: hold,
            ..RelayConfig::new(Duration::from_secs(10))
        };
        let rig = rig(base, config);
        let phones = allocator(base + 500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        rig.relay.set_dtmf_pt(Side::A, Some(TE));
        rig.relay.set_dtmf_pt(Side::B, Some(TE));
        let [a_rtp, _, b_rtp, _] = rig.relay_addrs;
        pa.rtp.send_to(&rtp_packet(1, 20), a_rtp).await.unwrap();
        recv(&pb.rtp).await;
        pb.rtp.send_to(&rtp_packet(1, 20), b_rtp).await.unwrap();
        recv(&pa.rtp).await;
        (rig, pa, pb)
    }

    #[tokio::test]
    async fn rtp_feature_code_is_swallowed_and_reported_while_audio_flows() {
        let (mut rig, pa, pb) = dtmf_rig(50000, Duration::from_secs(3)).await;
        let b_rtp = rig.relay_addrs[2];
        let mut seq = 100;
        let mut audio_sent = Vec::new();
        for (i, key) in "*74321#".chars().enumerate() {
            for p in key_press(key, 8000 * i as u32, &mut seq) {
                pb.rtp.send_to(&p, b_rtp).await.unwrap();
                // audio interleaved with the events keeps flowing during the hold
                let audio = rtp_packet(seq, 160);
                seq = seq.wrapping_add(1);
                pb.rtp.send_to(&audio, b_rtp).await.unwrap();
                audio_sent.push(audio);
            }
        }
        let got = drain(&pa.rtp).await;
        assert!(
            !got.iter().any(|p| is_te(p)),
            "{} feature-code packets reached A",
            got.iter().filter(|p| is_te(p)).count()
        );
        assert_eq!(got, audio_sent, "all audio, in order");
        let ev = tokio::time::timeout(Duration::from_secs(1), rig.events.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ev,
            RelayEvent::FeatureCode {
                relay: rig.relay.id(),
                side: Side::B,
                pin: "4321".into()
            }
        );
        // a key outside the code goes through, every packet of it
        let five = key_press('5', 90_000, &mut seq);
        for p in &five {
            pb.rtp.send_to(p, b_rtp).await.unwrap();
        }
        assert_eq!(drain(&pa.rtp).await, five);
        // A's side has its own gate: A's code is reported for A
        let a_rtp = rig.relay_addrs[0];
        for (i, key) in "*78#".chars().enumerate() {
            for p in key_press(key, 500_000 + 8000 * i as u32, &mut seq) {
                pa.rtp.send_to(&p, a_rtp).await.unwrap();
            }
        }
        let ev = tokio::time::timeout(Duration::from_secs(1), rig.events.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(ev, RelayEvent::FeatureCode { side: Side::A, ref pin, .. } if pin == "8"),
            "{ev:?}"
        );
        assert!(drain(&pb.rtp).await.is_empty());
        rig.relay.stop().await;
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 7 * 6 + 4 * 6);
    }

    #[tokio::test]
    async fn rtp_star_then_other_key_released_in_order() {
        let (mut rig, pa, pb) = dtmf_rig(51000, Duration::from_secs(3)).await;
        let b_rtp = rig.relay_addrs[2];
        let mut seq = 7;
        let mut sent = key_press('*', 1000, &mut seq);
        sent.extend(key_press('9', 2000, &mut seq));
        for p in &sent {
            pb.rtp.send_to(p, b_rtp).await.unwrap();
        }
        let got = drain(&pa.rtp).await;
        assert_eq!(got, sent, "both keys' packets, in order");
        assert!(rig.events.try_recv().is_err(), "no feature code");
        rig.relay.stop().await;
        assert_eq!(rig.counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(rig.counters.b_to_a.rtp_packets.load(Ordering::Relaxed), 13);
    }

    #[tokio::test]
    async fn rtp_lone_star_released_after_hold_timeout() {
        let hold = Duration::from_millis(400);
        let (mut rig, pa, pb) = dtmf_rig(52000, hold).await;
        let b_rtp = rig.relay_addrs[2];
        let mut seq = 7;
        let star = key_press('*', 1000, &mut seq);
        for p in &star {
            pb.rtp.send_to(p, b_rtp).await.unwrap();
        }
        let held_from = Instant::now();
        // audio during the hold arrives at once; the '*' does not
        for i in 0..5u16 {
            let audio = rtp_packet(200 + i, 40);
            pb.rtp.send_to(&audio, b_rtp).await.unwrap();
            assert_eq!(recv(&pa.rtp).await.0, audio);
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let mut got = Vec::new();
        while got.len() < star.len() {
            got.push(recv(&pa.rtp).await.0);
        }
        let waited = held_from.elapsed();
        assert_eq!(got, star);
        assert!(waited >= hold - Duration::from_millis(20), "{waited:?}");
        assert!(waited < hold + Duration::from_millis(800), "{waited:?}");
        assert!(rig.events.try_recv().is_err());
        rig.relay.stop().await;
    }

    #[tokio::test]
    async fn without_feature_code_or_event_type_dtmf_passes_untouched() {
        // no telephone-event type announced: the gate does not exist
        let config = RelayConfig {
            feature_code: "*7".into(),
            ..RelayConfig::new(Duration::from_secs(10))
        };
        let rig = rig(53000, config);
        let phones = allocator(53500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        let b_rtp = rig.relay_addrs[2];
        let mut seq = 0;
        let sent: Vec<Vec<u8>> = "*74321#"
            .chars()
            .enumerate()
            .flat_map(|(i, k)| key_press(k, 1000 * i as u32, &mut seq))
            .collect();
        for p in &sent {
            pb.rtp.send_to(p, b_rtp).await.unwrap();
        }
        assert_eq!(drain(&pa.rtp).await, sent);
        rig.relay.stop().await;
    }

    // ---- whole-call recording

    /// A store log in a temp dir: the relay's sink and the running writer.
    fn log(
        dir: &tempfile::TempDir,
        name: &str,
        opts: crate::storage::segments::PipelineOptions,
    ) -> (
        Ingest,
        JoinHandle<
            Result<crate::storage::segments::TailState, crate::storage::segments::SegmentError>,
        >,
    ) {
        use crate::storage::segments::{pipeline, SegmentOptions, SegmentWriter};
        let w = SegmentWriter::create(&dir.path().join(name), SegmentOptions::default()).unwrap();
        let (ingest, task) = pipeline(w, opts);
        (ingest, tokio::spawn(task.run()))
    }

    #[tokio::test]
    async fn records_each_direction_and_finishes_logs_on_stop() {
        let rig = rig(54000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(54500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::A, Some(addr(&pa)));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        let [a_rtp, a_rtcp, b_rtp, _] = rig.relay_addrs;
        let dir = tempfile::tempdir().unwrap();
        let (from_a, wa) = log(&dir, "a", Default::default());
        let (from_b, wb) = log(&dir, "b", Default::default());
        let counters = Arc::new(RecordCounters::default());
        rig.relay.record(
            RecordSinks {
                from_a: Some(from_a),
                from_b: Some(from_b),
                kernel_ids: [0, 0],
            },
            counters.clone(),
        );
        for i in 0..20u16 {
            pa.rtp.send_to(&rtp_packet(i, 160), a_rtp).await.unwrap();
            assert_eq!(recv(&pb.rtp).await.0, rtp_packet(i, 160));
        }
        for i in 0..5u16 {
            pb.rtp.send_to(&rtp_packet(i, 80), b_rtp).await.unwrap();
            recv(&pa.rtp).await;
        }
        // RTCP is relayed but not recorded.
        pa.rtcp
            .send_to(&[0x80, 200, 0, 1, 0, 0, 0, 0], a_rtcp)
            .await
            .unwrap();
        recv(&pb.rtcp).await;
        // The logs stay open while the call lasts...
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!wa.is_finished() && !wb.is_finished());
        rig.relay.stop().await;
        // ...and are finished with exactly the relayed RTP payloads once it stops.
        let ta = tokio::time::timeout(Duration::from_secs(5), wa)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let tb = tokio::time::timeout(Duration::from_secs(5), wb)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(ta.finished && tb.finished);
        assert_eq!((ta.records, ta.payload_bytes), (20, 20 * 160));
        assert_eq!((tb.records, tb.payload_bytes), (5, 5 * 80));
        assert_eq!(counters.backpressure_drops.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stuck_recording_never_holds_up_the_relay() {
        let rig = rig(55000, RelayConfig::new(Duration::from_secs(5)));
        let phones = allocator(55500, 2);
        let (pa, pb) = (phone(&phones), phone(&phones));
        rig.relay.set_remote(Side::B, Some(addr(&pb)));
        let a_rtp = rig.relay_addrs[0];
        // A writer that is never run, and room for about two packets: the rest is refused.
        let dir = tempfile::tempdir().unwrap();
        let w = crate::storage::segments::SegmentWriter::create(
            &dir.path().join("a"),
            Default::default(),
        )
        .unwrap();
        let opts = crate::storage::segments::PipelineOptions {
            batch_bytes: 1 << 20,
            commit_interval: Duration::from_secs(60),
            queue_depth: 1,
            max_buffered_bytes: 300,
        };
        let (ingest, _stalled) = crate::storage::segments::pipeline(w, opts);
        let counters = Arc::new(RecordCounters::default());
        let refused_before = METRICS.recording_packets_refused_total.get();
        rig.relay.record(
            RecordSinks {
                from_a: Some(ingest),
                from_b: None,
                kernel_ids: [0, 0],
            },
            counters.clone(),
        );
        for i in 0..30u16 {
            pa.rtp.send_to(&rtp_packet(i, 160), a_rtp).await.unwrap();
            assert_eq!(recv(&pb.rtp).await.0, rtp_packet(i, 160));
        }
        // Stopping does not wait on the stalled writer.
        tokio::time::timeout(Duration::from_secs(2), rig.relay.stop())
            .await
            .unwrap();
        assert_eq!(rig.counters.a_to_b.rtp_packets.load(Ordering::Relaxed), 30);
        let refused = counters.backpressure_drops.load(Ordering::Relaxed);
        assert!(refused >= 20, "{refused}");
        // The operator sees them too.
        assert!(METRICS.recording_packets_refused_total.get() >= refused_before + refused);
    }
}
