//! `StoreSession` with a simulated clock and fake effects: a `Harness` plays the driver, runs
//! every action against an in-memory account (quota, used, reserved) and store row, the way
//! `b2bua/store_service` runs them against the database.

use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::storage::stores::StoreKind;
use crate::storage::threshold::Threshold;

const SENDER: &str = "1001@example.com";
const RECEIVER: &str = "1002@example.com";

fn store(state: StoreState) -> Store {
    let now = SystemTime::now();
    Store {
        id: "st_test".into(),
        token: "t".into(),
        kind: StoreKind::InCall,
        sender: SENDER.into(),
        receiver: RECEIVER.into(),
        owner: Some("1002".into()),
        call_id: None,
        threshold: Threshold::Percent(30),
        format: Some("PCMU/8000".into()),
        payload_type: Some(0),
        declared_bytes: None,
        received_bytes: 0,
        reserved_bytes: 0,
        threshold_bytes: None,
        state,
        created_at: now,
        expires_at: now + Duration::from_secs(300),
        started_at: None,
        threshold_at: None,
        finished_at: None,
        rtp_source: None,
        rtp_local: None,
        direction: None,
        sip_remote: None,
        sip_local: None,
        sip_call_id: None,
    }
}

fn snapshot<'a>(st: Option<&'a Store>, declared: Option<u64>, free: Option<u64>) -> Snapshot<'a> {
    Snapshot {
        store: st,
        wall: SystemTime::now(),
        caller: Some(SENDER),
        offer: Ok(()),
        declared,
        free_bytes: free,
    }
}

/// The driver's side: a fake clock, an account and the store row, every action applied.
struct Harness {
    now: Instant,
    start: Instant,
    s: StoreSession,
    quota: u64,
    used: u64,
    reserved: u64,
    /// Reservation of this store (released by Finish).
    store_reserved: u64,
    threshold_at: Option<Duration>,
    ready: Vec<(u64, StoreState)>,
    stopped: Vec<ErrorCode>,
    finished: Option<(StoreState, u64)>,
}

impl Harness {
    /// Admits like the driver: decide, reserve, start.
    fn new(
        declared: Option<u64>,
        quota: u64,
        threshold: Threshold,
        timeout: Option<Duration>,
    ) -> Harness {
        let st = store(StoreState::Pending);
        let admitted = admit(&snapshot(Some(&st), declared, Some(quota))).unwrap();
        let resolved = threshold.resolve(
            declared,
            8000,
            30,
            &crate::storage::threshold::ThresholdLimits::default(),
        );
        let now = Instant::now();
        let s = StoreSession::start(
            SessionConfig {
                admitted,
                resolved,
                playout_rate: Some(8000.0),
                silence_timeout: timeout,
            },
            now,
        );
        Harness {
            now,
            start: now,
            s,
            quota,
            used: 0,
            reserved: admitted.reserve_bytes,
            store_reserved: admitted.reserve_bytes,
            threshold_at: None,
            ready: Vec::new(),
            stopped: Vec::new(),
            finished: None,
        }
    }

    fn feed(&mut self, i: Input) {
        self.s.handle(i, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.s.poll_action() {
            match a {
                Action::MarkThreshold { .. } => {
                    assert!(self.threshold_at.is_none(), "threshold marked twice");
                    self.threshold_at = Some(self.now - self.start);
                }
                Action::SendReady {
                    received_bytes,
                    state,
                } => self.ready.push((received_bytes, state)),
                Action::StopIngest { reason } => self.stopped.push(reason),
                Action::Finish { state, stored } => {
                    assert!(self.finished.is_none(), "finished twice");
                    self.reserved -= self.store_reserved;
                    self.used += stored;
                    self.finished = Some((state, stored));
                }
            }
        }
    }

    /// Advances the clock, ticking at the machine's deadlines like the driver's timer.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(t) = self.s.poll_timeout().filter(|t| *t <= end) {
            self.now = t.max(self.now);
            self.feed(Input::Tick);
        }
        self.now = end;
    }

    /// 20 ms of G.711 per step, committed as it comes.
    fn send(&mut self, bytes: u64) {
        let mut sent = self.s.committed();
        let target = sent + bytes;
        while sent < target && self.s.phase() == Phase::Receiving {
            sent = (sent + 160).min(target);
            self.now += Duration::from_millis(20);
            self.feed(Input::Committed(sent));
        }
    }

    fn end(&mut self, how: IngestEnd) {
        let stored = self.s.committed();
        self.feed(Input::IngestEnded { how, stored });
    }

    fn assert_settled(&self) {
        assert_eq!(self.reserved, 0, "reservation released");
        assert!(self.used <= self.quota, "never over quota");
        assert_eq!(self.used, self.finished.unwrap().1);
    }
}

// --- step 211: every refusal row, in order ---

#[test]
fn refusal_rows_in_protocol_order() {
    let pending = store(StoreState::Pending);
    let code = |s: Snapshot<'_>| admit(&s).unwrap_err().code;
    assert_eq!(
        code(snapshot(None, None, Some(10))),
        ErrorCode::UnknownStore
    );
    let used = store(StoreState::Receiving);
    assert_eq!(
        code(snapshot(Some(&used), None, Some(10))),
        ErrorCode::UnknownStore
    );
    let mut expired = store(StoreState::Pending);
    expired.expires_at = SystemTime::now() - Duration::from_secs(1);
    assert_eq!(
        code(snapshot(Some(&expired), None, Some(10))),
        ErrorCode::UnknownStore
    );
    // not-sender is checked before the format, the format before the quota.
    let mut s = snapshot(Some(&pending), Some(100), Some(10));
    s.caller = Some("1003@example.com");
    s.offer = Err(Refusal::bare(ErrorCode::UnsupportedFormat));
    assert_eq!(code(s.clone()), ErrorCode::NotSender);
    s.caller = Some("1001@EXAMPLE.com");
    assert_eq!(code(s.clone()), ErrorCode::UnsupportedFormat);
    s.offer = Ok(());
    assert_eq!(code(s.clone()), ErrorCode::QuotaExceeded);
    let e = admit(&s).unwrap_err();
    assert_eq!(e.code.sip_status(), 403);
    // The upload token stands for the sender.
    s.caller = None;
    s.declared = Some(10);
    assert!(admit(&s).is_ok());
    // No free space and no declared size: refused too.
    assert_eq!(
        code(snapshot(Some(&pending), None, Some(0))),
        ErrorCode::QuotaExceeded
    );
}

#[test]
fn admission_reserves_declared_or_free_space() {
    let st = store(StoreState::Pending);
    let a = admit(&snapshot(Some(&st), Some(1000), Some(5000))).unwrap();
    assert_eq!(
        (a.reserve_bytes, a.limit, a.limit_is_quota),
        (1000, Some(1050), false)
    );
    // Issue 10 finding 3: undeclared reserves the receiver's free space and stops there.
    let a = admit(&snapshot(Some(&st), None, Some(5000))).unwrap();
    assert_eq!(
        (a.reserve_bytes, a.limit, a.limit_is_quota),
        (5000, Some(5000), true)
    );
    // The operator's stores (recordings) have no quota.
    let a = admit(&snapshot(Some(&st), None, None)).unwrap();
    assert_eq!((a.reserve_bytes, a.limit), (0, None));
}

// --- the states ---

#[test]
fn receiving_then_complete_by_bye() {
    let mut h = Harness::new(Some(16_000), 1 << 20, Threshold::Percent(30), None);
    assert_eq!(h.s.phase(), Phase::Receiving);
    assert_eq!(h.reserved, 16_000);
    h.send(16_000);
    assert_eq!(h.ready, vec![(4800, StoreState::Receiving)]);
    h.end(IngestEnd::Done);
    assert_eq!(h.s.phase(), Phase::Finished(StoreState::Complete));
    assert_eq!(h.finished, Some((StoreState::Complete, 16_000)));
    h.assert_settled();
    // Nothing happens after the end.
    h.feed(Input::Committed(20_000));
    h.feed(Input::Shutdown);
    assert_eq!(h.s.poll_action(), None);
}

#[test]
fn aborted_and_storage_failure_are_truncated() {
    for how in [
        IngestEnd::Aborted,
        IngestEnd::StorageFailed,
        IngestEnd::TimedOut,
    ] {
        let mut h = Harness::new(Some(16_000), 1 << 20, Threshold::Percent(30), None);
        h.send(1600);
        h.end(how);
        assert_eq!(h.finished, Some((StoreState::Truncated, 1600)), "{how:?}");
        h.assert_settled();
    }
}

// --- threshold crossing, each kind ---

#[test]
fn threshold_percent_bytes_zero_and_fallback() {
    // percent of the declared size
    let mut h = Harness::new(Some(10_000), 1 << 20, Threshold::Percent(50), None);
    h.send(4960);
    assert!(h.ready.is_empty());
    h.send(160);
    assert_eq!(h.ready, vec![(5120, StoreState::Receiving)]);
    // bytes
    let mut h = Harness::new(Some(10_000), 1 << 20, Threshold::Bytes(320), None);
    h.send(320);
    assert_eq!(h.ready, vec![(320, StoreState::Receiving)]);
    // 0: the first stored packet
    let mut h = Harness::new(Some(10_000), 1 << 20, Threshold::Bytes(0), None);
    h.send(160);
    assert_eq!(h.ready, vec![(160, StoreState::Receiving)]);
    // percent without a declared size: fallback_bytes (8000 here)
    let mut h = Harness::new(None, 1 << 20, Threshold::Percent(30), None);
    h.send(7840);
    assert!(h.ready.is_empty());
    h.send(160);
    assert_eq!(h.ready, vec![(8000, StoreState::Receiving)]);
}

#[test]
fn threshold_adaptive_on_the_rates() {
    // Sent at the playout rate (8000 B/s): playback may start after the margin.
    let mut h = Harness::new(Some(80_000), 1 << 20, Threshold::Adaptive, None);
    h.send(4000);
    assert_eq!(h.ready.len(), 1);
    let (at, _) = h.ready[0];
    assert!(at < 8000, "adaptive at the playout rate starts early: {at}");
    // Sent at half the playout rate: about half of the data first.
    let mut h = Harness::new(Some(80_000), 1 << 20, Threshold::Adaptive, None);
    let mut sent = 0;
    while h.ready.is_empty() && sent < 80_000 {
        sent += 160;
        h.now += Duration::from_millis(40);
        h.feed(Input::Committed(sent));
    }
    let (at, _) = h.ready[0];
    assert!(
        (38_000..=46_000).contains(&at),
        "half rate needs about half: {at}"
    );
}

#[test]
fn ingest_threshold_counts_once() {
    let mut h = Harness::new(Some(80_000), 1 << 20, Threshold::Adaptive, None);
    h.feed(Input::IngestThreshold(160));
    h.send(50_000);
    assert_eq!(h.ready, vec![(160, StoreState::Receiving)]);
}

#[test]
fn short_store_reaches_its_threshold_by_finishing() {
    let mut h = Harness::new(Some(100_000), 1 << 20, Threshold::Percent(50), None);
    h.send(1600);
    assert!(h.ready.is_empty());
    h.end(IngestEnd::Done);
    assert!(h.threshold_at.is_some());
    // The ready note carries the store's real state.
    assert_eq!(h.ready, vec![(1600, StoreState::Complete)]);
}

// --- overrun, timeout, shutdown, quota ---

#[test]
fn overrun_of_the_declared_size_ends_complete() {
    let mut h = Harness::new(Some(1000), 1 << 20, Threshold::Percent(30), None);
    h.send(1120);
    assert_eq!(h.stopped, vec![ErrorCode::SizeExceeded]);
    assert_eq!(h.s.phase(), Phase::Settling(StoreState::Complete));
    h.end(IngestEnd::Overran);
    assert_eq!(h.finished.map(|f| f.0), Some(StoreState::Complete));
    h.assert_settled();
}

#[test]
fn silence_times_out_truncated() {
    let mut h = Harness::new(
        Some(16_000),
        1 << 20,
        Threshold::Percent(30),
        Some(Duration::from_secs(10)),
    );
    h.send(1600);
    h.run_for(Duration::from_secs(9));
    assert!(h.stopped.is_empty());
    h.send(160);
    h.run_for(Duration::from_secs(9));
    assert!(h.stopped.is_empty(), "data restarts the silence timer");
    h.run_for(Duration::from_secs(2));
    assert_eq!(h.stopped, vec![ErrorCode::RtpTimeout]);
    h.end(IngestEnd::Done);
    assert_eq!(h.finished, Some((StoreState::Truncated, 1760)));
    h.assert_settled();
}

#[test]
fn shutdown_mid_store_keeps_what_is_committed() {
    let mut h = Harness::new(Some(160_000), 1 << 20, Threshold::Percent(30), None);
    h.send(3200);
    h.feed(Input::Shutdown);
    assert_eq!(h.stopped, vec![ErrorCode::Shutdown]);
    // Late commits from the ingest's last flush still count in the final size.
    h.feed(Input::IngestEnded {
        how: IngestEnd::Done,
        stored: 3360,
    });
    assert_eq!(h.finished, Some((StoreState::Truncated, 3360)));
    assert_eq!((h.used, h.reserved), (3360, 0));
    assert!(h.threshold_at.is_some(), "a truncated store is playable");
}

#[test]
fn shutdown_while_settling_truncates() {
    let mut h = Harness::new(Some(1000), 1 << 20, Threshold::Percent(30), None);
    h.send(1120);
    h.feed(Input::Shutdown);
    h.end(IngestEnd::Overran);
    assert_eq!(h.finished.map(|f| f.0), Some(StoreState::Truncated));
}

#[test]
fn undeclared_store_stops_at_the_quota() {
    let quota = 48_000;
    let mut h = Harness::new(None, quota, Threshold::Percent(30), None);
    assert_eq!(h.reserved, quota, "free space reserved at acceptance");
    h.send(100_000);
    assert_eq!(h.stopped, vec![ErrorCode::SizeExceeded]);
    assert!(h.s.committed() <= quota);
    h.end(IngestEnd::Overran);
    assert_eq!(h.finished.map(|f| f.0), Some(StoreState::Truncated));
    h.assert_settled();
    assert_eq!(h.used, quota);
}

// --- step 333 ---

#[test]
fn play_before_and_after_the_threshold() {
    let mut st = store(StoreState::Receiving);
    let e = may_play(&st, RECEIVER).unwrap_err();
    assert_eq!(
        (e.code, e.code.sip_status(), e.retry_after),
        (ErrorCode::NotReady, 480, Some(2))
    );
    st.threshold_at = Some(SystemTime::now());
    assert!(may_play(&st, RECEIVER).is_ok());
    assert_eq!(
        may_play(&st, SENDER).unwrap_err().code,
        ErrorCode::NotReceiver
    );
    st.state = StoreState::Truncated;
    st.threshold_at = None;
    assert!(may_play(&st, "1002@Example.COM").is_ok());
    st.state = StoreState::Pending;
    assert_eq!(
        may_play(&st, RECEIVER).unwrap_err().code,
        ErrorCode::NotReady
    );
    st.state = StoreState::Rejected;
    assert_eq!(
        may_play(&st, RECEIVER).unwrap_err().code,
        ErrorCode::UnknownStore
    );
}
