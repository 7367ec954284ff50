//! PIN lockout (PROTOCOL.md §5): failures 1–5 within a 10-minute window are `bad-pin`; from
//! then on every attempt for the next 10 minutes is `locked-out`, right PIN or not. A right PIN
//! before lockout resets the count. Sans-IO: time comes in. Kept in memory (one node on SQLite;
//! a cluster on PostgreSQL uses the shared table, `storage::pin_lockouts`): a restart forgets
//! failures (documented in docs/ARCHITECTURE.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(super) const WINDOW: Duration = Duration::from_secs(600);
pub(super) const LOCK_FOR: Duration = Duration::from_secs(600);
pub(super) const MAX_FAILURES: usize = 5;

#[derive(Debug, Default)]
pub(crate) struct Lockout {
    users: HashMap<String, Entry>,
}

#[derive(Debug, Default)]
struct Entry {
    failures: Vec<Instant>,
    locked_until: Option<Instant>,
}

impl Lockout {
    pub(crate) fn is_locked(&self, user: &str, now: Instant) -> bool {
        self.users
            .get(user)
            .and_then(|e| e.locked_until)
            .is_some_and(|t| now < t)
    }

    /// Records a wrong PIN; the fifth in the window locks the PIN.
    pub(crate) fn failure(&mut self, user: &str, now: Instant) {
        let e = self.users.entry(user.to_string()).or_default();
        e.failures.retain(|t| now.duration_since(*t) < WINDOW);
        e.failures.push(now);
        if e.failures.len() >= MAX_FAILURES {
            e.locked_until = Some(now + LOCK_FOR);
            e.failures.clear();
        }
    }

    pub(crate) fn success(&mut self, user: &str) {
        self.users.remove(user);
    }

    /// Forgets entries with nothing left to remember.
    #[cfg(test)]
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.users.retain(|_, e| {
            e.failures.retain(|t| now.duration_since(*t) < WINDOW);
            e.locked_until.is_some_and(|t| now < t) || !e.failures.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_lock_for_ten_minutes() {
        let t0 = Instant::now();
        let mut l = Lockout::default();
        for i in 0..4 {
            l.failure("1002", t0 + Duration::from_secs(i));
            assert!(!l.is_locked("1002", t0 + Duration::from_secs(i)));
        }
        l.failure("1002", t0 + Duration::from_secs(5));
        assert!(l.is_locked("1002", t0 + Duration::from_secs(5)));
        assert!(l.is_locked("1002", t0 + Duration::from_secs(604)));
        assert!(!l.is_locked("1002", t0 + Duration::from_secs(606)));
        assert!(!l.is_locked("other", t0));
    }

    #[test]
    fn failures_outside_window_and_success_reset() {
        let t0 = Instant::now();
        let mut l = Lockout::default();
        for i in 0..4 {
            l.failure("u", t0 + Duration::from_secs(i));
        }
        // The first four have left the window by now.
        l.failure("u", t0 + Duration::from_secs(700));
        assert!(!l.is_locked("u", t0 + Duration::from_secs(700)));
        for i in 0..3 {
            l.failure("u", t0 + Duration::from_secs(701 + i));
        }
        l.success("u");
        l.failure("u", t0 + Duration::from_secs(710));
        assert!(!l.is_locked("u", t0 + Duration::from_secs(710)));
        l.sweep(t0 + Duration::from_secs(2000));
        assert!(l.users.is_empty());
    }
}
