//! The store lifecycle (PROTOCOL.md 2.4 step 211 to 2.5 step 331, and section 4's clean
//! shutdown) as one sans-IO state machine, [`StoreSession`], shaped like
//! `sip/transaction.rs`: the driver feeds it [`Input`]s with the time, and carries out the
//! [`Action`]s it queues. It reads no clock, spawns nothing and touches no database or
//! socket, so every path is unit-tested with simulated time (see the tests below).
//!
//! Every store goes through it, whatever carries the data: an RTP store session
//! (`media/recorder.rs`), `PUT upload_url` (`http/stores.rs`) and whole-call recording
//! (`b2bua/recording.rs`) are *ingest adapters* that report what their log has committed and
//! how the ingest ended; `b2bua/store_service` and the upload handler are thin drivers that
//! run the database effects and hand the notes to the engine.
//!
//! ```text
//!   admit(snapshot) --Err--> Refusal (404 unknown-store, 403 not-sender, 488
//!        |                   unsupported-format, 403 quota-exceeded; nothing changes)
//!        | Ok: Reserve{bytes}
//!        v
//!   Receiving --Committed(n), n >= threshold--> MarkThreshold + SendReady   (once)
//!        |   --Committed(n), n > limit-------> StopIngest(size-exceeded)
//!        |   --Tick, silent > timeout---------> StopIngest(rtp-timeout)
//!        |   --Shutdown-----------------------> StopIngest(shutdown)
//!        |   --IngestEnded(how)---------------+
//!        v                                    |
//!   Settling (waits for IngestEnded) <--------+
//!        | Finish{state, stored}  (+ MarkThreshold/SendReady if never reached: a
//!        v                         finished store is always playable)
//!   Finished(complete | truncated)
//! ```
//!
//! The final state: `complete` when the ingest ended normally (BYE, whole body, call end)
//! or the sender overran a declared size (all declared data is in); `truncated` on silence,
//! an aborted body, a storage failure, the receiver's quota being reached without a
//! declared size, or a shutdown. Quota: without `Callvault-Data-Size` the receiver's whole
//! free space is reserved at acceptance and is the limit (issue 10 finding 3); `Finish`
//! settles it (used = stored bytes, the reservation released).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use crate::error_code::{ErrorCode, Refusal};
use crate::storage::stores::{Store, StoreState};
use crate::storage::threshold::{Reached, Resolved, ThresholdTracker};

pub(crate) mod effects;

/// `declared + 5%` (rounded up): payload beyond this ends the session (PROTOCOL.md 2.5).
pub fn size_limit_for(declared: u64) -> u64 {
    declared.saturating_add(declared.div_ceil(20))
}

/// What the driver knows when a store session is asked for (step 211): the store row, who
/// asks, what it offers and the receiver's account at that moment.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot<'a> {
    /// The store as read (None: no such id).
    pub store: Option<&'a Store>,
    /// Wall time of the request, for the store's expiry.
    pub wall: SystemTime,
    /// The caller's identity (`user@domain`), or None when it holds the upload token.
    pub caller: Option<&'a str>,
    /// The verdict on what is offered (SDP, codecs, size header): `malformed-message`,
    /// `unsupported-format`, `malformed-request`; checked after the caller's identity.
    pub offer: Result<(), Refusal>,
    /// `Callvault-Data-Size` / `Content-Length`.
    pub declared: Option<u64>,
    /// The owner's free space (quota - used - reserved); None: no quota (the operator).
    pub free_bytes: Option<u64>,
}

/// What step 211 decided: how much to reserve and the most the store may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admitted {
    pub reserve_bytes: u64,
    /// Payload accepted at most (declared + 5%, else the free space); None: unlimited.
    pub limit: Option<u64>,
    /// Whether reaching `limit` means the quota ran out (truncated) rather than an overrun of
    /// the declared size (complete).
    pub limit_is_quota: bool,
}

fn same_identity(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Step 211 in the order of PROTOCOL.md 2.4. Decides without changing anything; the driver
/// then reserves atomically (which may still refuse `quota-exceeded` on a race).
pub(crate) fn admit(s: &Snapshot<'_>) -> Result<Admitted, Refusal> {
    let Some(store) = s.store.filter(|st| st.is_open(s.wall)) else {
        return Err(Refusal::bare(ErrorCode::UnknownStore));
    };
    if let Some(caller) = s.caller {
        if !same_identity(caller, &store.sender) {
            return Err(Refusal::new(
                ErrorCode::NotSender,
                format!("{caller} is not the sender this store was offered to"),
            ));
        }
    }
    s.offer.clone()?;
    match (s.declared, s.free_bytes) {
        (Some(d), Some(free)) if d > free => Err(Refusal::new(
            ErrorCode::QuotaExceeded,
            format!("{d} bytes declared, {free} free"),
        )),
        (Some(d), _) => Ok(Admitted {
            reserve_bytes: d,
            limit: Some(size_limit_for(d)),
            limit_is_quota: false,
        }),
        (None, Some(0)) => Err(Refusal::new(
            ErrorCode::QuotaExceeded,
            "the receiver has no free space",
        )),
        (None, Some(free)) => Ok(Admitted {
            reserve_bytes: free,
            limit: Some(free),
            limit_is_quota: true,
        }),
        (None, None) => Ok(Admitted {
            reserve_bytes: 0,
            limit: None,
            limit_is_quota: false,
        }),
    }
}

/// Step 333: may `caller` play the store now? (`GET media` answers the same way.)
pub(crate) fn may_play(store: &Store, caller: &str) -> Result<(), Refusal> {
    if !same_identity(caller, &store.receiver) {
        return Err(Refusal::new(
            ErrorCode::NotReceiver,
            format!("{caller} is not the receiver of {}", store.id),
        ));
    }
    match store.state {
        StoreState::Complete | StoreState::Truncated => Ok(()),
        StoreState::Receiving if store.threshold_at.is_some() => Ok(()),
        StoreState::Receiving | StoreState::Pending => {
            Err(Refusal::bare(ErrorCode::NotReady).retry_after(2))
        }
        StoreState::Expired | StoreState::Rejected => Err(Refusal::new(
            ErrorCode::UnknownStore,
            format!("{} holds no data", store.id),
        )),
    }
}

/// How an ingest ended, as its adapter saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IngestEnd {
    /// The sender ended normally: BYE, the whole body, the recorded call's end.
    Done,
    /// The body ended short or the sender aborted.
    Aborted,
    /// Silence for the timeout (the adapter's own timer).
    TimedOut,
    /// More than the limit arrived (the adapter dropped it).
    Overran,
    /// The log could not be written.
    StorageFailed,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Input {
    /// The log has committed (made durable and readable) this many payload bytes.
    Committed(u64),
    /// The ingest's own threshold tracker (fed per packet, so it knows the playout rate of a
    /// variable-rate codec) says the threshold is reached at this many committed bytes.
    IngestThreshold(u64),
    /// The ingest stopped; `stored` payload bytes are committed for good.
    IngestEnded { how: IngestEnd, stored: u64 },
    /// Timer.
    Tick,
    /// A clean shutdown (SIGTERM/SIGINT): stop now, keep what is committed.
    Shutdown,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Step 32: note `threshold_at`; `after` from the first stored bytes
    /// (`callvault_threshold_seconds`); `by_finish`: reached only because the store ended.
    MarkThreshold {
        received_bytes: u64,
        after: Duration,
        by_finish: bool,
    },
    /// Step 331: the ready note, with the store's state when it is sent.
    SendReady {
        received_bytes: u64,
        state: StoreState,
    },
    /// Stop the ingest (BYE with this reason / stop reading the body); `IngestEnded` follows.
    StopIngest { reason: ErrorCode },
    /// Settle and finish: the store becomes `state` with `stored` bytes, the quota used =
    /// stored, the reservation released. Last action.
    Finish { state: StoreState, stored: u64 },
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Receiving,
    /// Stopped by us (or shut down); waiting for the ingest to report its end. The state it
    /// will finish in.
    Settling(StoreState),
    Finished(StoreState),
}

/// Settings of one session.
#[derive(Debug, Clone)]
pub(crate) struct SessionConfig {
    pub admitted: Admitted,
    /// The threshold bound to the declared size (Threshold::resolve).
    pub resolved: Resolved,
    /// The stream's playout rate when constant (`playout_rate_for`), for adaptive.
    pub playout_rate: Option<f64>,
    /// Silence that ends the session `truncated` (RTP timeout, upload idle); None: the
    /// ingest has no such timer (a recorded call ends with the call).
    pub silence_timeout: Option<Duration>,
}

/// One store's lifecycle from acceptance to its final state.
#[derive(Debug)]
pub(crate) struct StoreSession {
    cfg: SessionConfig,
    phase: Phase,
    tracker: ThresholdTracker,
    committed: u64,
    last_data: Instant,
    threshold: Option<Reached>,
    actions: VecDeque<Action>,
}

impl StoreSession {
    /// The session of an admitted store whose reservation succeeded, started at `now`.
    pub(crate) fn start(cfg: SessionConfig, now: Instant) -> StoreSession {
        let tracker = ThresholdTracker::new(cfg.resolved, cfg.playout_rate);
        StoreSession {
            cfg,
            phase: Phase::Receiving,
            tracker,
            committed: 0,
            last_data: now,
            threshold: None,
            actions: VecDeque::new(),
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn committed(&self) -> u64 {
        self.committed
    }

    /// The next action to carry out, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When the driver must feed [`Input::Tick`] next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        match (self.phase, self.cfg.silence_timeout) {
            (Phase::Receiving, Some(t)) => Some(self.last_data + t),
            _ => None,
        }
    }

    pub(crate) fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Committed(n) => self.on_committed(n, now),
            Input::IngestThreshold(n) => {
                self.on_committed(n, now);
                if self.threshold.is_none() && self.phase == Phase::Receiving {
                    let r = self.tracker.on_finish(n, now).map(|r| Reached {
                        by_finish: false,
                        ..r
                    });
                    self.reach(r, StoreState::Receiving);
                }
            }
            Input::IngestEnded { how, stored } => self.on_ended(how, stored, now),
            Input::Tick => {
                let silent = self.poll_timeout().is_some_and(|deadline| now >= deadline);
                if silent {
                    self.stop(ErrorCode::RtpTimeout, StoreState::Truncated);
                }
            }
            Input::Shutdown => match self.phase {
                Phase::Receiving => self.stop(ErrorCode::Shutdown, StoreState::Truncated),
                // Already stopping for another reason: the shutdown makes it truncated.
                Phase::Settling(_) => self.phase = Phase::Settling(StoreState::Truncated),
                Phase::Finished(_) => {}
            },
        }
    }

    fn on_committed(&mut self, n: u64, now: Instant) {
        if self.phase != Phase::Receiving || n < self.committed {
            return;
        }
        if n > self.committed {
            self.last_data = now;
        }
        self.committed = n;
        let reached = self.tracker.on_progress(n, now);
        self.reach(reached, StoreState::Receiving);
        if let Some(limit) = self.cfg.admitted.limit {
            if n >= limit && self.cfg.admitted.limit_is_quota {
                self.stop(ErrorCode::SizeExceeded, StoreState::Truncated);
            } else if n > limit {
                self.stop(ErrorCode::SizeExceeded, StoreState::Complete);
            }
        }
    }

    fn reach(&mut self, r: Option<Reached>, state: StoreState) {
        let Some(r) = r else {
            return;
        };
        if self.threshold.is_some() {
            return;
        }
        self.threshold = Some(r);
        self.actions.push_back(Action::MarkThreshold {
            received_bytes: r.received_bytes,
            after: r.since_first,
            by_finish: r.by_finish,
        });
        self.actions.push_back(Action::SendReady {
            received_bytes: r.received_bytes,
            state,
        });
    }

    fn stop(&mut self, reason: ErrorCode, state: StoreState) {
        if self.phase != Phase::Receiving {
            return;
        }
        self.phase = Phase::Settling(state);
        self.actions.push_back(Action::StopIngest { reason });
    }

    fn on_ended(&mut self, how: IngestEnd, stored: u64, now: Instant) {
        let state = match (self.phase, how) {
            (Phase::Finished(_), _) => return,
            (Phase::Settling(s), _) => s,
            (Phase::Receiving, IngestEnd::Done) => StoreState::Complete,
            (Phase::Receiving, IngestEnd::Overran) => {
                if self.cfg.admitted.limit_is_quota {
                    StoreState::Truncated
                } else {
                    StoreState::Complete
                }
            }
            (Phase::Receiving, _) => StoreState::Truncated,
        };
        // What the log holds is the truth, even if a commit was not reported.
        let stored = stored.max(self.committed);
        self.committed = stored;
        // A finished store is always playable (the threshold by the end).
        let r = self.tracker.on_finish(stored, now);
        self.reach(r, state);
        self.phase = Phase::Finished(state);
        self.actions.push_back(Action::Finish { state, stored });
    }
}

#[cfg(test)]
mod tests;
