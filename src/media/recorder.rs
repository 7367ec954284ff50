//! The ingest side of a store session (PROTOCOL 2.5, steps 31/32): one tokio task per store
//! that receives the sender's RTP on the store's port pair and appends every accepted packet
//! to the store's segment log through an [`Ingest`] / [`WriterTask`] pipeline.
//!
//! Packet path: one receive buffer for the whole session, a zero-copy [`RtpPacket`] view, then
//! [`Ingest::push`] (which encodes into a reused batch buffer). No allocation, lock or log line
//! per packet; metrics counters are kept locally and published every [`FLUSH_PACKETS`] packets
//! or at the next flush tick.
//!
//! What is accepted: RTP version 2 with the session's payload type (or its telephone-event
//! type), from one source chosen by the strict-source policy of [`super::latch`]: the sender's
//! SDP address, or (no usable address, or a NAT-suspect one) the first source sending valid RTP
//! of those types. The source never moves on its own, not after a pause either; a new SDP
//! ([`RecorderHandle::set_source`]) re-opens it. Everything else is dropped and counted.
//!
//! Threshold: the tracker is fed the *committed* payload byte count from the writer's
//! [`TailState`] watch, not what was merely received, so a player that starts when
//! [`RecorderEventKind::ThresholdReached`] is reported finds the data on disk. When the bytes
//! buffered in the ingest reach what the threshold needs, the batch is handed to the writer at
//! once instead of waiting for the commit interval, which keeps the threshold latency at about
//! one fsync (threshold 0: the first packet is committed and reported right away).
//!
//! End of a session: [`RecorderHandle::finish`] (BYE), the RTP timeout, the size limit
//! (declared + 5%) or a storage failure. Each one flushes what is buffered, commits it, marks
//! the log finished (live readers end there), reports the threshold if it was not reached yet
//! (a finished store is always playable) and then [`RecorderEventKind::Finished`], exactly once.
//! After a timeout or size overrun the task keeps draining the sockets (the sender is still
//! sending until the BYE lands) until the handle is finished or dropped.

use super::srtp::{count_failure, SrtpContext};
use std::net::{IpAddr, SocketAddr};

use super::latch::{Decision, Expect, Latch, PtSet, Refusal, RefusedCounts};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::ports::PortPair;
use super::relay::FLUSH_PACKETS;
use super::rtp::{looks_like_rtcp, RtpPacket};
use crate::metrics::METRICS;
use crate::storage::segments::{
    Ingest, IngestError, RecordHeader, SegmentError, TailState, WriterTask,
};
use crate::storage::threshold::ThresholdTracker;

/// Receive buffer; a datagram that fills it completely may have been cut and is dropped.
const BUF_LEN: usize = 4096;
/// Longest wait for room in the event channel (see `State::emit`).
const EVENT_SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// `declared + 5%`: one rule for the recorder and the store lifecycle.
pub use crate::storage::session::size_limit_for;

/// How one store session records.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// `Callvault-Data-Size`, if given (informational; the tracker was resolved with it).
    pub declared_bytes: Option<u64>,
    /// Payload bytes accepted at most ([`size_limit_for`] the declared size); None: no limit.
    pub size_limit: Option<u64>,
    /// No RTP for this long, counted from the start or from the last accepted packet, ends the
    /// session with [`RecorderEventKind::Timeout`].
    pub rtp_timeout: Duration,
    /// The media payload type of the SDP answer.
    pub payload_type: u8,
    /// The negotiated RFC 4733 telephone-event payload type, stored too.
    pub telephone_event_pt: Option<u8>,
    /// Clock rate of the media payload type, for variable-rate playout measurement by the
    /// tracker (None: the tracker was given a fixed playout rate or does not need one).
    pub clock_rate: Option<u32>,
    /// Threshold policy bound to this store (step 32).
    pub threshold: ThresholdTracker,
    /// How often [`RecorderEventKind::Progress`] may be reported (only when the committed
    /// count changed).
    pub progress_interval: Duration,
    /// The sender's SDP address (`c=` + `m=` port): the only source taken, unless it is unusable
    /// or NAT-suspect ([`Expect::from_sdp`]).
    pub source: Option<SocketAddr>,
    /// Where the sender's signalling came from, for the NAT test of `source`.
    pub signalling_ip: Option<IpAddr>,
    /// Timer tick: hands a quiet stream's batch to the writer, publishes counters, checks the
    /// timeout. About the pipeline's commit interval.
    pub flush_interval: Duration,
    /// The sender's SRTP key (an `RTP/SAVP` store session): packets are unprotected before
    /// anything else looks at them; those that fail are dropped and counted.
    pub srtp: Option<SrtpContext>,
}

impl RecorderConfig {
    /// Defaults: limit = declared + 5%, 10 s RTP timeout, progress every second, 20 ms flush
    /// tick, no SDP source (the first valid RTP latches).
    pub fn new(
        payload_type: u8,
        declared_bytes: Option<u64>,
        threshold: ThresholdTracker,
    ) -> RecorderConfig {
        RecorderConfig {
            declared_bytes,
            size_limit: declared_bytes.map(size_limit_for),
            rtp_timeout: Duration::from_secs(10),
            payload_type,
            telephone_event_pt: None,
            clock_rate: None,
            threshold,
            progress_interval: Duration::from_secs(1),
            source: None,
            signalling_ip: None,
            flush_interval: Duration::from_millis(20),
            srtp: None,
        }
    }
}

/// Identifies a recorder in [`RecorderEvent`]s when several share one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecorderId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecorderEvent {
    pub recorder: RecorderId,
    pub kind: RecorderEventKind,
}

/// What a recorder reports. `received_bytes` is RTP payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecorderEventKind {
    /// Step 32, exactly once: `received_bytes` committed (readable) when it was reached,
    /// `after` from the first accepted packet (`callvault_threshold_seconds`). `by_finish`: it
    /// was reached only because the store ended (a store smaller than its threshold).
    ThresholdReached {
        received_bytes: u64,
        after: Duration,
        by_finish: bool,
    },
    /// Committed bytes so far, at most once per `progress_interval` (for the metadata DB).
    /// Best effort: dropped when the event channel is full.
    Progress { received_bytes: u64 },
    /// A packet would have taken the store past `size_limit`; it was dropped and ingest
    /// stopped. `received_bytes` accepted before it. The caller ends the session (BYE with
    /// `size-exceeded`); `Finished` follows.
    SizeExceeded { received_bytes: u64 },
    /// No RTP for `rtp_timeout`; `received_bytes` accepted so far. `Finished` follows.
    Timeout { received_bytes: u64 },
    /// The writer failed (disk error): the log ends at its last commit. `Finished` follows.
    StorageFailed { error: String },
    /// The log is closed: everything accepted is committed (unless storage failed) and live
    /// readers end here. Exactly once, last.
    Finished { received_bytes: u64, records: u64 },
}

/// Why a session's log was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// [`RecorderHandle::finish`] or the handle was dropped (BYE).
    Finished,
    Timeout,
    SizeExceeded,
    StorageFailed,
}

/// Packets not stored, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DropCounts {
    /// Not RTP version 2 / malformed / RTCP on the RTP port / cut by the receive buffer.
    pub malformed: u64,
    /// From a source other than the latched (or announced) one.
    pub foreign_source: u64,
    /// Payload type neither the media nor the telephone-event type.
    pub payload_type: u64,
    /// Beyond the size limit, or arriving after the log was closed.
    pub after_end: u64,
    /// Refused by the ingest because the writer lagged (backpressure).
    pub backpressure: u64,
}

/// A session's outcome, returned by [`RecorderHandle::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecorderTotals {
    /// Committed payload bytes, records and log bytes (what quota settles against).
    pub received_bytes: u64,
    pub records: u64,
    pub log_bytes: u64,
    /// Packets accepted into the ingest (equals `records` unless storage failed).
    pub accepted_packets: u64,
    pub dropped: DropCounts,
    pub end: EndReason,
    /// The storage error, when the writer failed.
    pub error: Option<String>,
}

enum Control {
    SetSource(Option<SocketAddr>),
    Finish,
}

/// Controls a running recorder. Dropping it finishes the session like [`finish`](Self::finish)
/// (the log is still closed properly), without waiting.
#[derive(Debug)]
pub struct RecorderHandle {
    id: RecorderId,
    ctrl: mpsc::UnboundedSender<Control>,
    task: JoinHandle<RecorderTotals>,
    tail: watch::Receiver<TailState>,
    rtp_port: u16,
}

impl RecorderHandle {
    pub fn id(&self) -> RecorderId {
        self.id
    }

    /// The storage RTP port (what goes into the SDP answer).
    pub fn local_rtp_port(&self) -> u16 {
        self.rtp_port
    }

    /// The store's committed state, for live readers (players, HTTP download).
    pub fn tail(&self) -> watch::Receiver<TailState> {
        self.tail.clone()
    }

    /// The sender's new SDP address (re-INVITE): re-opens latching under it.
    pub fn set_source(&self, addr: Option<SocketAddr>) {
        // A send error only means the task already ended.
        let _ = self.ctrl.send(Control::SetSource(addr));
    }

    /// True once the task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Ends the session (BYE): flushes, commits, marks the log finished, and returns the
    /// totals once the task has stopped (its ports are free when this returns). Works too
    /// after a timeout or size overrun closed the log.
    pub async fn finish(self) -> RecorderTotals {
        let _ = self.ctrl.send(Control::Finish);
        match self.task.await {
            Ok(t) => t,
            Err(e) => {
                // The task panicked or was aborted: report what the writer had committed.
                let st = *self.tail.borrow();
                RecorderTotals {
                    received_bytes: st.payload_bytes,
                    records: st.records,
                    log_bytes: st.bytes,
                    accepted_packets: st.records,
                    dropped: DropCounts::default(),
                    end: EndReason::StorageFailed,
                    error: Some(format!("recorder task failed: {e}")),
                }
            }
        }
    }
}

/// Entry point; see the module doc.
pub struct Recorder;

impl Recorder {
    /// Spawns the store session's recorder and its writer task (inside a tokio runtime).
    /// `ingest`/`writer` come from [`crate::storage::segments::pipeline`] over a fresh
    /// [`crate::storage::segments::SegmentWriter`].
    pub fn start(
        socket: PortPair,
        ingest: Ingest,
        writer: WriterTask,
        config: RecorderConfig,
        events: mpsc::Sender<RecorderEvent>,
    ) -> RecorderHandle {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = RecorderId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let tail = writer.subscribe();
        let writer = tokio::spawn(writer.run());
        let (ctrl, ctrl_rx) = mpsc::unbounded_channel();
        let rtp_port = socket.rtp_port;
        let st = State::new(id, ingest, writer, config, events);
        let task = tokio::spawn(run(st, socket, tail.clone(), ctrl_rx));
        RecorderHandle {
            id,
            ctrl,
            task,
            tail,
            rtp_port,
        }
    }
}

/// The latch expectation for a sender at SDP address `addr`: the session's media and
/// telephone-event types.
fn source_expect(cfg: &RecorderConfig, addr: Option<SocketAddr>) -> Expect {
    let pts = PtSet::of([cfg.payload_type].into_iter().chain(cfg.telephone_event_pt));
    Expect::from_sdp(addr, cfg.signalling_ip, pts)
}

fn now_us() -> u64 {
    // A clock before 1970 is a broken host; 0 keeps the records well-formed.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A terminal condition seen on the packet path or the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    SizeExceeded,
    StorageFailed,
}

struct State {
    id: RecorderId,
    cfg: RecorderConfig,
    events: mpsc::Sender<RecorderEvent>,
    /// None once the log is closed.
    ingest: Option<Ingest>,
    writer: Option<JoinHandle<Result<TailState, SegmentError>>>,
    latch: Latch,
    refused: RefusedCounts,
    /// Last accepted packet (or the start), for the RTP timeout.
    last_activity: Instant,
    first_packet: Option<StdInstant>,
    accepted_bytes: u64,
    accepted_packets: u64,
    dropped: DropCounts,
    /// The batch holding the threshold's bytes was handed off early.
    threshold_flushed: bool,
    committed: TailState,
    last_progress: (Instant, u64),
    // Metrics not yet published.
    pending_packets: u64,
    pending_bytes: u64,
    end: Option<EndReason>,
    error: Option<String>,
}

impl State {
    fn new(
        id: RecorderId,
        ingest: Ingest,
        writer: JoinHandle<Result<TailState, SegmentError>>,
        cfg: RecorderConfig,
        events: mpsc::Sender<RecorderEvent>,
    ) -> State {
        let now = Instant::now();
        let latch = Latch::new(source_expect(&cfg, cfg.source));
        State {
            id,
            cfg,
            events,
            ingest: Some(ingest),
            writer: Some(writer),
            latch,
            refused: RefusedCounts::default(),
            last_activity: now,
            first_packet: None,
            accepted_bytes: 0,
            accepted_packets: 0,
            dropped: DropCounts::default(),
            threshold_flushed: false,
            committed: TailState::default(),
            last_progress: (now, 0),
            pending_packets: 0,
            pending_bytes: 0,
            end: None,
            error: None,
        }
    }

    async fn emit(&self, kind: RecorderEventKind) {
        let ev = RecorderEvent {
            recorder: self.id,
            kind,
        };
        // Bounded wait: a consumer that stopped reading a full channel and then awaits
        // `finish` must not deadlock the session. A closed channel (session torn down) has
        // nobody to report to.
        if let Err(mpsc::error::SendTimeoutError::Timeout(ev)) =
            self.events.send_timeout(ev, EVENT_SEND_TIMEOUT).await
        {
            tracing::warn!(recorder = self.id.0, event = ?ev.kind, "recorder event dropped");
        }
    }

    /// Strict-source latching; see the module doc. Counts the refusals.
    #[inline]
    fn accept_source(&mut self, src: SocketAddr, pkt: &[u8]) -> bool {
        match self.latch.on_rtp(src, pkt) {
            Decision::Accept | Decision::Latch => true,
            Decision::Refuse(r) => {
                self.refused.count(r);
                match r {
                    Refusal::PayloadType => self.dropped.payload_type += 1,
                    Refusal::NotRtp => self.dropped.malformed += 1,
                    Refusal::ForeignSource => self.dropped.foreign_source += 1,
                }
                false
            }
        }
    }

    /// One datagram from the RTP socket; `cut`: it filled the buffer (maybe truncated).
    #[inline]
    fn on_rtp(&mut self, buf: &[u8], cut: bool, src: SocketAddr, now: Instant) -> Option<Stop> {
        let pkt = match RtpPacket::parse(buf) {
            Ok(p) if !cut && !looks_like_rtcp(buf) => p,
            _ => {
                self.dropped.malformed += 1;
                return None;
            }
        };
        if !self.accept_source(src, buf) {
            return None;
        }
        self.last_activity = now;
        let Some(ingest) = self.ingest.as_mut() else {
            self.dropped.after_end += 1;
            return None;
        };
        let pt = pkt.payload_type();
        let is_media = pt == self.cfg.payload_type;
        if !is_media && Some(pt) != self.cfg.telephone_event_pt {
            self.dropped.payload_type += 1;
            return None;
        }
        let payload = pkt.payload();
        let len = payload.len() as u64;
        if self
            .cfg
            .size_limit
            .is_some_and(|limit| self.accepted_bytes + len > limit)
        {
            self.dropped.after_end += 1;
            return Some(Stop::SizeExceeded);
        }
        let h = RecordHeader {
            arrival_us: now_us(),
            seq: pkt.sequence(),
            timestamp: pkt.timestamp(),
            ssrc: pkt.ssrc(),
            payload_type: pt,
            marker: pkt.marker(),
        };
        match ingest.push(&h, payload) {
            Ok(()) => {}
            Err(IngestError::Backpressure) => {
                self.dropped.backpressure += 1;
                return None;
            }
            Err(IngestError::WriterClosed | IngestError::Record(_)) => {
                return Some(Stop::StorageFailed)
            }
        }
        if self.first_packet.is_none() {
            self.first_packet = Some(StdInstant::now());
        }
        self.accepted_bytes += len;
        self.accepted_packets += 1;
        self.pending_packets += 1;
        self.pending_bytes += len;
        if is_media {
            if let Some(rate) = self.cfg.clock_rate {
                self.cfg
                    .threshold
                    .on_packet(pkt.timestamp(), payload.len(), rate);
            }
        }
        if !self.threshold_flushed
            && self.cfg.threshold.reached().is_none()
            && self
                .cfg
                .threshold
                .required_bytes()
                .is_some_and(|need| self.accepted_bytes >= need)
        {
            // Don't let the threshold's bytes wait out the commit interval.
            self.threshold_flushed = true;
            if ingest.flush().is_err() {
                return Some(Stop::StorageFailed);
            }
        }
        if self.pending_packets >= u64::from(FLUSH_PACKETS) {
            self.publish_metrics();
        }
        None
    }

    fn publish_metrics(&mut self) {
        self.refused.flush();
        if self.pending_packets > 0 {
            METRICS.rtp_packets_stored_total.add(self.pending_packets);
            METRICS.rtp_bytes_stored_total.add(self.pending_bytes);
            self.pending_packets = 0;
            self.pending_bytes = 0;
        }
    }

    /// New committed state from the writer: threshold check.
    async fn on_committed(&mut self, st: TailState) {
        self.committed = st;
        if let Some(r) = self
            .cfg
            .threshold
            .on_progress(st.payload_bytes, StdInstant::now())
        {
            self.threshold_event(r.received_bytes, r.at, r.by_finish)
                .await;
        }
    }

    async fn threshold_event(&self, received_bytes: u64, at: StdInstant, by_finish: bool) {
        let after = self
            .first_packet
            .map_or(Duration::ZERO, |t| at.saturating_duration_since(t));
        self.emit(RecorderEventKind::ThresholdReached {
            received_bytes,
            after,
            by_finish,
        })
        .await;
    }

    fn on_tick(&mut self, now: Instant) -> Option<Stop> {
        self.publish_metrics();
        if let Some(ingest) = self.ingest.as_mut() {
            // Commits a stream that went quiet (push only hands off on the next packet).
            if ingest.flush().is_err() {
                return Some(Stop::StorageFailed);
            }
            if now.duration_since(self.last_activity) >= self.cfg.rtp_timeout {
                return Some(Stop::Timeout);
            }
        }
        let (at, bytes) = self.last_progress;
        if now.duration_since(at) >= self.cfg.progress_interval
            && self.committed.payload_bytes != bytes
        {
            self.last_progress = (now, self.committed.payload_bytes);
            // Progress is droppable: a later one supersedes it, and the packet path must not
            // wait on a slow consumer.
            let _ = self.events.try_send(RecorderEvent {
                recorder: self.id,
                kind: RecorderEventKind::Progress {
                    received_bytes: self.committed.payload_bytes,
                },
            });
        }
        None
    }

    /// Closes the log once, for `reason`; see the module doc for the event order.
    async fn end(&mut self, reason: EndReason, tail: &watch::Receiver<TailState>) {
        if self.end.is_some() {
            return;
        }
        self.end = Some(reason);
        match reason {
            EndReason::Timeout => {
                tracing::info!(
                    recorder = self.id.0,
                    bytes = self.accepted_bytes,
                    "rtp timeout"
                );
                self.emit(RecorderEventKind::Timeout {
                    received_bytes: self.accepted_bytes,
                })
                .await;
            }
            EndReason::SizeExceeded => {
                tracing::info!(
                    recorder = self.id.0,
                    bytes = self.accepted_bytes,
                    "size limit"
                );
                self.emit(RecorderEventKind::SizeExceeded {
                    received_bytes: self.accepted_bytes,
                })
                .await;
            }
            EndReason::Finished | EndReason::StorageFailed => {}
        }
        if let Some(ingest) = self.ingest.take() {
            // An error here means the writer is gone; its own result says why.
            let _ = ingest.close().await;
        }
        if let Some(writer) = self.writer.take() {
            self.error = match writer.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(format!("store writer task failed: {e}")),
            };
        }
        if self.error.is_none() && reason == EndReason::StorageFailed {
            self.error = Some("store writer stopped".to_string());
        }
        if let Some(error) = self.error.clone() {
            tracing::warn!(recorder = self.id.0, %error, "store write failed");
            self.end = Some(EndReason::StorageFailed);
            self.emit(RecorderEventKind::StorageFailed { error }).await;
        }
        let st = *tail.borrow();
        self.committed = st;
        let now = StdInstant::now();
        if let Some(r) = self.cfg.threshold.on_progress(st.payload_bytes, now) {
            self.threshold_event(r.received_bytes, r.at, r.by_finish)
                .await;
        }
        if let Some(r) = self.cfg.threshold.on_finish(st.payload_bytes, now) {
            self.threshold_event(r.received_bytes, r.at, r.by_finish)
                .await;
        }
        self.publish_metrics();
        self.emit(RecorderEventKind::Finished {
            received_bytes: st.payload_bytes,
            records: st.records,
        })
        .await;
    }

    fn totals(&self) -> RecorderTotals {
        RecorderTotals {
            received_bytes: self.committed.payload_bytes,
            records: self.committed.records,
            log_bytes: self.committed.bytes,
            accepted_packets: self.accepted_packets,
            dropped: self.dropped,
            end: self.end.unwrap_or(EndReason::Finished),
            error: self.error.clone(),
        }
    }
}

impl From<Stop> for EndReason {
    fn from(s: Stop) -> EndReason {
        match s {
            Stop::Timeout => EndReason::Timeout,
            Stop::SizeExceeded => EndReason::SizeExceeded,
            Stop::StorageFailed => EndReason::StorageFailed,
        }
    }
}

async fn run(
    mut st: State,
    pair: PortPair,
    mut tail: watch::Receiver<TailState>,
    mut ctrl: mpsc::UnboundedReceiver<Control>,
) -> RecorderTotals {
    // The only allocations of the packet path: the two receive buffers, for the session.
    let mut rtp_buf = vec![0u8; BUF_LEN].into_boxed_slice();
    let mut rtcp_buf = vec![0u8; 2048].into_boxed_slice();
    let mut tick = tokio::time::interval(st.cfg.flush_interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tail_open = true;
    loop {
        let stop = tokio::select! {
            r = pair.rtp.recv_from(&mut rtp_buf) => match r {
                Ok((n, src)) => {
                    let cut = n == rtp_buf.len();
                    let plain = match st.cfg.srtp.as_mut() {
                        None => Some(n),
                        Some(ctx) => ctx.unprotect_rtp(&mut rtp_buf[..n]).map_err(count_failure).ok(),
                    };
                    match plain {
                        Some(n) => st.on_rtp(&rtp_buf[..n], cut, src, Instant::now()),
                        None => None,
                    }
                }
                // e.g. an ICMP error surfacing on the socket; the next packet may be fine.
                Err(_) => None,
            },
            // RTCP from the sender carries nothing the store keeps; drained so it cannot pile up.
            _ = pair.rtcp.recv_from(&mut rtcp_buf) => None,
            r = tail.changed(), if tail_open => {
                // The writer is gone once the log is closed; stop watching then.
                tail_open = r.is_ok();
                let s = *tail.borrow_and_update();
                st.on_committed(s).await;
                None
            },
            _ = tick.tick() => st.on_tick(Instant::now()),
            c = ctrl.recv() => match c {
                Some(Control::SetSource(addr)) => {
                    st.latch.expect(source_expect(&st.cfg, addr));
                    None
                }
                // Finish, or the handle was dropped.
                Some(Control::Finish) | None => break,
            },
        };
        if let Some(stop) = stop {
            st.end(stop.into(), &tail).await;
        }
    }
    st.end(EndReason::Finished, &tail).await;
    st.totals()
    // `pair` drops here: sockets close, ports return to the allocator.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::ports::PortAllocator;
    use crate::storage::segments::{
        pipeline, PipelineOptions, SegmentOptions, SegmentReader, SegmentWriter,
    };
    use crate::storage::threshold::{Resolved, Threshold, ThresholdLimits};
    use std::net::Ipv4Addr;
    use std::path::{Path, PathBuf};
    use tokio::net::UdpSocket;

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
        _ports: PortAllocator,
        _dir: tempfile::TempDir,
        store: PathBuf,
        rec: RecorderHandle,
        events: mpsc::Receiver<RecorderEvent>,
        to: SocketAddr,
        tx: UdpSocket,
    }

    async fn rig(base: u16, cfg: impl FnOnce(&mut RecorderConfig)) -> Rig {
        let ports = allocator(base, 1);
        let pair = ports.allocate(LO).unwrap();
        let to = SocketAddr::new(LO, pair.rtp_port);
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("st");
        let w = SegmentWriter::create(&store, SegmentOptions::default()).unwrap();
        let (ingest, writer) = pipeline(w, PipelineOptions::default());
        let mut config =
            RecorderConfig::new(0, None, ThresholdTracker::new(Resolved::Fixed(0), None));
        config.telephone_event_pt = Some(101);
        cfg(&mut config);
        let (etx, events) = mpsc::channel(64);
        let rec = Recorder::start(pair, ingest, writer, config, etx);
        Rig {
            _ports: ports,
            _dir: dir,
            store,
            rec,
            events,
            to,
            tx: UdpSocket::bind((LO, 0)).await.unwrap(),
        }
    }

    fn rtp(pt: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44];
        v[2..4].copy_from_slice(&seq.to_be_bytes());
        v[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn payload(i: u16, len: usize) -> Vec<u8> {
        (0..len).map(|j| (usize::from(i) * 31 + j) as u8).collect()
    }

    async fn next_event(rx: &mut mpsc::Receiver<RecorderEvent>) -> RecorderEventKind {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event")
            .expect("channel closed")
            .kind
    }

    /// The next event other than Progress.
    async fn next_major(rx: &mut mpsc::Receiver<RecorderEvent>) -> RecorderEventKind {
        loop {
            match next_event(rx).await {
                RecorderEventKind::Progress { .. } => {}
                k => return k,
            }
        }
    }

    async fn read_back(store: &Path) -> Vec<(RecordHeader, Vec<u8>)> {
        let mut r = SegmentReader::open(store, 0, None);
        let mut out = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            out.push((rec.header, rec.payload.to_vec()));
        }
        out
    }

    #[test]
    fn size_limit_is_declared_plus_five_percent() {
        assert_eq!(size_limit_for(160_000), 168_000);
        assert_eq!(size_limit_for(1), 2);
        assert_eq!(size_limit_for(0), 0);
        assert_eq!(size_limit_for(u64::MAX), u64::MAX);
    }

    #[tokio::test]
    async fn stores_packets_byte_for_byte_and_drops_wrong_payload_types() {
        let mut r = rig(41000, |_| {}).await;
        let before = METRICS.rtp_packets_stored_total.get();
        let mut sent = Vec::new();
        for i in 0..300u16 {
            let p = payload(i, 20 + usize::from(i % 200));
            // Every 10th packet is a telephone-event, which is stored too.
            let pt = if i % 10 == 5 { 101 } else { 0 };
            r.tx.send_to(&rtp(pt | if i == 0 { 0x80 } else { 0 }, i, &p), r.to)
                .await
                .unwrap();
            sent.push((i, pt, p));
            if i % 20 == 0 {
                // Wrong payload type, an RTCP packet and garbage: all dropped.
                r.tx.send_to(&rtp(8, 9999, b"nope"), r.to).await.unwrap();
                r.tx.send_to(&[0x80, 200, 0, 1, 0, 0, 0, 1], r.to)
                    .await
                    .unwrap();
                r.tx.send_to(b"hello", r.to).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        // Threshold 0 fired on the first packet.
        match next_major(&mut r.events).await {
            RecorderEventKind::ThresholdReached {
                received_bytes,
                by_finish,
                ..
            } => {
                assert!(received_bytes >= 20, "{received_bytes}");
                assert!(!by_finish);
            }
            e => panic!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let totals = r.rec.finish().await;
        let want_bytes: u64 = sent.iter().map(|(_, _, p)| p.len() as u64).sum();
        assert_eq!(totals.records, 300);
        assert_eq!(totals.received_bytes, want_bytes);
        assert_eq!(totals.accepted_packets, 300);
        assert_eq!(totals.end, EndReason::Finished);
        assert_eq!(totals.dropped.payload_type, 15);
        assert_eq!(totals.dropped.malformed, 30);
        assert!(METRICS.rtp_packets_stored_total.get() >= before + 300);
        match next_major(&mut r.events).await {
            RecorderEventKind::Finished {
                received_bytes,
                records,
            } => assert_eq!((received_bytes, records), (want_bytes, 300)),
            e => panic!("{e:?}"),
        }

        let got = read_back(&r.store).await;
        assert_eq!(got.len(), sent.len());
        let mut last_arrival = 0;
        for ((h, p), (i, pt, sp)) in got.iter().zip(&sent) {
            assert_eq!(p, sp);
            assert_eq!(h.seq, *i);
            assert_eq!(h.timestamp, u32::from(*i) * 160);
            assert_eq!(h.ssrc, 0x1122_3344);
            assert_eq!(h.payload_type, *pt);
            assert_eq!(h.marker, *i == 0);
            assert!(h.arrival_us >= last_arrival);
            last_arrival = h.arrival_us;
        }
    }

    #[tokio::test]
    async fn percent_threshold_fires_when_committed_bytes_cross_it() {
        // 100 packets of 160 bytes declared; 30% = 4800 bytes = 30 packets.
        let declared = 16_000;
        let resolved =
            Threshold::Percent(30).resolve(Some(declared), 0, 30, &ThresholdLimits::default());
        assert_eq!(resolved, Resolved::Fixed(4800));
        let mut r = rig(41200, |c| {
            c.declared_bytes = Some(declared);
            c.size_limit = Some(size_limit_for(declared));
            c.threshold = ThresholdTracker::new(resolved, Some(8000.0));
            c.progress_interval = Duration::from_millis(50);
        })
        .await;
        for i in 0..29u16 {
            r.tx.send_to(&rtp(0, i, &payload(i, 160)), r.to)
                .await
                .unwrap();
        }
        // 4640 bytes: committed (Progress says so) but no threshold.
        let deadline = Instant::now() + Duration::from_millis(400);
        let mut progressed = 0;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, r.events.recv()).await {
            match e.kind {
                RecorderEventKind::Progress { received_bytes } => progressed = received_bytes,
                k => panic!("unexpected {k:?}"),
            }
        }
        assert_eq!(progressed, 29 * 160);
        let t0 = Instant::now();
        r.tx.send_to(&rtp(0, 29, &payload(29, 160)), r.to)
            .await
            .unwrap();
        match next_major(&mut r.events).await {
            RecorderEventKind::ThresholdReached {
                received_bytes,
                by_finish,
                after,
            } => {
                assert_eq!(received_bytes, 4800);
                assert!(!by_finish);
                assert!(after >= Duration::from_millis(300), "{after:?}");
            }
            e => panic!("{e:?}"),
        }
        // Committed means readable: a reader starting now finds the threshold's bytes.
        let on_disk: usize = read_back(&r.store).await.iter().map(|(_, p)| p.len()).sum();
        assert!(on_disk >= 4800, "{on_disk}");
        // Early hand-off: no waiting for the commit interval beyond an fsync or so.
        assert!(t0.elapsed() < Duration::from_millis(500));
        // The rest goes in; no second threshold event.
        for i in 30..100u16 {
            r.tx.send_to(&rtp(0, i, &payload(i, 160)), r.to)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let totals = r.rec.finish().await;
        assert_eq!(totals.received_bytes, declared);
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::Finished {
                received_bytes: declared,
                records: 100
            }
        );
    }

    #[tokio::test]
    async fn size_limit_drops_the_excess_and_stops_ingest() {
        // Declared 1000 -> limit 1050: 10 packets of 100 go in, the 11th does not fit.
        let mut r = rig(41400, |c| {
            c.declared_bytes = Some(1000);
            c.size_limit = Some(size_limit_for(1000));
            c.threshold = ThresholdTracker::new(Resolved::Fixed(100_000), None);
        })
        .await;
        for i in 0..12u16 {
            r.tx.send_to(&rtp(0, i, &payload(i, 100)), r.to)
                .await
                .unwrap();
        }
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::SizeExceeded {
                received_bytes: 1000
            }
        );
        // The log is closed: the threshold (above what was stored) is reached by finish, and
        // live readers end.
        match next_major(&mut r.events).await {
            RecorderEventKind::ThresholdReached {
                received_bytes: 1000,
                by_finish: true,
                ..
            } => {}
            e => panic!("{e:?}"),
        }
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::Finished {
                received_bytes: 1000,
                records: 10
            }
        );
        assert!(r.rec.tail().borrow().finished);
        // Later packets are drained, not stored.
        r.tx.send_to(&rtp(0, 50, &payload(50, 10)), r.to)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let totals = r.rec.finish().await;
        assert_eq!(totals.end, EndReason::SizeExceeded);
        assert_eq!((totals.records, totals.received_bytes), (10, 1000));
        assert_eq!(totals.dropped.after_end, 3);
        assert_eq!(read_back(&r.store).await.len(), 10);
        // Exactly one Finished.
        assert!(r.events.recv().await.is_none());
    }

    #[tokio::test]
    async fn rtp_timeout_after_start_and_after_last_packet() {
        // Nothing at all: the timeout runs from the start.
        let mut r = rig(41600, |c| c.rtp_timeout = Duration::from_millis(200)).await;
        let t0 = Instant::now();
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::Timeout { received_bytes: 0 }
        );
        assert!(t0.elapsed() >= Duration::from_millis(190));
        // Empty store: the threshold is reached by finish, then Finished.
        assert!(matches!(
            next_major(&mut r.events).await,
            RecorderEventKind::ThresholdReached {
                by_finish: true,
                ..
            }
        ));
        assert!(matches!(
            next_major(&mut r.events).await,
            RecorderEventKind::Finished { records: 0, .. }
        ));
        assert_eq!(r.rec.finish().await.end, EndReason::Timeout);

        // Packets keep it alive; silence after them ends it.
        let mut r = rig(41700, |c| c.rtp_timeout = Duration::from_millis(300)).await;
        let mut last = Instant::now();
        for i in 0..10u16 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            r.tx.send_to(&rtp(0, i, &payload(i, 50)), r.to)
                .await
                .unwrap();
            last = Instant::now();
        }
        assert!(matches!(
            next_major(&mut r.events).await,
            RecorderEventKind::ThresholdReached { .. }
        ));
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::Timeout {
                received_bytes: 500
            }
        );
        assert!(last.elapsed() >= Duration::from_millis(280));
        assert_eq!(
            next_major(&mut r.events).await,
            RecorderEventKind::Finished {
                received_bytes: 500,
                records: 10
            }
        );
        let totals = r.rec.finish().await;
        assert_eq!((totals.end, totals.records), (EndReason::Timeout, 10));
    }

    #[tokio::test]
    async fn latches_only_valid_rtp_and_never_moves_after_a_pause() {
        let mut r = rig(41800, |_| {}).await;
        let other = UdpSocket::bind((LO, 0)).await.unwrap();
        // The injector speaks first: garbage, RTCP and RTP of a type not negotiated latch nothing.
        other.send_to(b"garbage", r.to).await.unwrap();
        other
            .send_to(&[0x81, 200, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0], r.to)
            .await
            .unwrap();
        other.send_to(&rtp(8, 1, b"wrong pt"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.tx.send_to(&rtp(0, 1, b"first"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.send_to(&rtp(0, 2, b"intruder"), r.to).await.unwrap();
        r.tx.send_to(&rtp(0, 3, b"second"), r.to).await.unwrap();
        // The sender pauses; another port on its host tries again: still refused.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        other
            .send_to(&rtp(0, 4, b"after pause"), r.to)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // New SDP naming an address that is not the sender's: the sender is refused too.
        r.rec.set_source(Some("127.0.0.2:4000".parse().unwrap()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        r.tx.send_to(&rtp(0, 5, b"wrong addr"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let totals = r.rec.finish().await;
        assert_eq!(totals.dropped.foreign_source, 3);
        assert_eq!(totals.dropped.payload_type, 1);
        assert_eq!(totals.dropped.malformed, 2);
        let got: Vec<Vec<u8>> = read_back(&r.store)
            .await
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(got, vec![b"first".to_vec(), b"second".to_vec()]);
        while let Some(e) = r.events.recv().await {
            if let RecorderEventKind::Finished { records, .. } = e.kind {
                assert_eq!(records, 2);
            }
        }
    }

    #[tokio::test]
    async fn strict_to_the_sdp_address() {
        let tx = UdpSocket::bind((LO, 0)).await.unwrap();
        let sdp = tx.local_addr().unwrap();
        let mut r = rig(41850, |c| c.source = Some(sdp)).await;
        // r.tx is another port of the same host: refused even though it speaks first.
        r.tx.send_to(&rtp(0, 1, b"stranger"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send_to(&rtp(0, 2, b"sender"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let totals = r.rec.finish().await;
        assert_eq!((totals.records, totals.dropped.foreign_source), (1, 1));
        while r.events.recv().await.is_some() {}
    }

    #[tokio::test]
    async fn dropping_the_handle_still_closes_the_log() {
        let mut r = rig(41900, |_| {}).await;
        let tail = r.rec.tail();
        r.tx.send_to(&rtp(0, 1, b"abc"), r.to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(r.rec);
        let mut tail2 = tail.clone();
        tokio::time::timeout(Duration::from_secs(5), tail2.wait_for(|s| s.finished))
            .await
            .unwrap()
            .ok();
        assert!(tail.borrow().finished);
        assert_eq!(tail.borrow().payload_bytes, 3);
        let mut finished = 0;
        while let Some(e) = r.events.recv().await {
            if matches!(e.kind, RecorderEventKind::Finished { .. }) {
                finished += 1;
            }
        }
        assert_eq!(finished, 1);
    }
}
