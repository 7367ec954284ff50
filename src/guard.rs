//! Guards against password guessing and state that a peer could grow without end (issue 10,
//! findings 4 and 7; Kamailio's `htable`-with-expiry practice).
//!
//! * [`ExpiringMap`]: a table keyed by something a peer chooses, bounded in size, every entry
//!   with an expiry. When it is full of live entries a new key is *not* tracked (the caller
//!   says what that means), so an attacker spraying keys cannot grow memory.
//! * [`AuthGuard`]: failed password checks counted per user and per source address; past
//!   [`GuardPolicy::user_failures`] (resp. `source_failures`) within `window` the user (resp.
//!   the source) is locked out for `lock_for`. Locked attempts are refused *before* any
//!   password work, so a flood costs a table lookup each. IPv6 sources are counted per /64
//!   (one host usually owns a whole /64).
//!
//! * [`ConnGate`]: connection caps per listener and per source, and a process-wide
//!   [`FdBudget`] so connections can never take the descriptors RTP ports need (issue 10,
//!   finding 5). A permit is held for the life of a connection and given back on drop.
//!
//! Sans-IO: every call takes `now`; the caller owns the clock and the lock. Counters go to
//! [`crate::metrics`].

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{AuthProto, Listener, DEFENCE};

/// How often a full table may be scanned for expired entries (bounds the cost of a flood of
/// new keys against a full table to one scan per interval).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A bounded map whose entries expire.
#[derive(Debug)]
pub(crate) struct ExpiringMap<K, V> {
    map: HashMap<K, (V, Instant)>,
    capacity: usize,
    last_sweep: Option<Instant>,
}

impl<K: Hash + Eq, V> ExpiringMap<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        ExpiringMap {
            map: HashMap::new(),
            capacity: capacity.max(1),
            last_sweep: None,
        }
    }

    /// The live value of `key`.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<&V> {
        self.map
            .get(key)
            .filter(|(_, exp)| now < *exp)
            .map(|(v, _)| v)
    }

    /// The live value of `key`, mutable, with its expiry.
    pub(crate) fn get_mut(&mut self, key: &K, now: Instant) -> Option<(&mut V, &mut Instant)> {
        self.map
            .get_mut(key)
            .filter(|(_, exp)| now < *exp)
            .map(|(v, exp)| (v, exp))
    }

    /// Inserts or replaces `key` until `expires`. False: the table is full of live entries and
    /// `key` was not stored.
    pub(crate) fn insert(&mut self, key: K, value: V, expires: Instant, now: Instant) -> bool {
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            let due = self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_INTERVAL);
            if due {
                self.sweep(now);
            }
            if self.map.len() >= self.capacity {
                return false;
            }
        }
        self.map.insert(key, (value, expires));
        true
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|(v, _)| v)
    }

    /// Drops every expired entry.
    pub(crate) fn sweep(&mut self, now: Instant) {
        self.last_sweep = Some(now);
        self.map.retain(|_, (_, exp)| now < *exp);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// Lockout thresholds. The defaults are for interactive logins: a person mistyping a password
/// a few times is never locked out, a guesser is after a dozen tries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardPolicy {
    /// Failures of one user name within `window` that lock the name.
    pub user_failures: u32,
    /// Failures from one source within `window` that lock the source.
    pub source_failures: u32,
    pub window: Duration,
    /// How long a lockout lasts (the `Retry-After` given).
    pub lock_for: Duration,
    /// Entries per table (user names, sources).
    pub capacity: usize,
}

impl Default for GuardPolicy {
    fn default() -> Self {
        GuardPolicy {
            user_failures: 10,
            source_failures: 20,
            window: Duration::from_secs(60),
            lock_for: Duration::from_secs(60),
            capacity: 16_384,
        }
    }
}

/// Failures within the current window, and the end of a lockout.
#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
}

/// What a [`AuthGuard::check`] says about an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Go,
    /// Locked out for this long more (round up for `Retry-After`).
    Locked(Duration),
}

impl Admit {
    /// Whole seconds for `Retry-After`, at least 1.
    pub(crate) fn retry_after_secs(self) -> u64 {
        match self {
            Admit::Go => 0,
            Admit::Locked(d) => (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1),
        }
    }
}

/// Per-user and per-source failure counting for one protocol (HTTP or SIP).
#[derive(Debug)]
pub(crate) struct AuthGuard {
    policy: GuardPolicy,
    proto: AuthProto,
    users: ExpiringMap<String, Entry>,
    sources: ExpiringMap<IpAddr, Entry>,
}

/// The key a source is counted under: the address, or its /64 for IPv6.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl AuthGuard {
    pub(crate) fn new(proto: AuthProto, policy: GuardPolicy) -> AuthGuard {
        AuthGuard {
            policy,
            proto,
            users: ExpiringMap::new(policy.capacity),
            sources: ExpiringMap::new(policy.capacity),
        }
    }

    /// May an attempt for `user` from `source` (None: unknown) go on to the password check?
    pub(crate) fn check(&self, user: &str, source: Option<IpAddr>, now: Instant) -> Admit {
        let src = source
            .map(source_key)
            .and_then(|s| self.sources.get(&s, now))
            .and_then(|e| e.locked_until);
        let usr = self
            .users
            .get(&user.to_string(), now)
            .and_then(|e| e.locked_until);
        let until = src.into_iter().chain(usr).filter(|t| now < *t).max();
        match until {
            Some(t) => {
                DEFENCE.auth_refused_locked(self.proto);
                Admit::Locked(t - now)
            }
            None => Admit::Go,
        }
    }

    /// A wrong password (or unknown user) for `user` from `source`.
    pub(crate) fn failure(&mut self, user: &str, source: Option<IpAddr>, now: Instant) {
        DEFENCE.auth_failure(self.proto);
        let p = self.policy;
        if count(&mut self.users, user.to_string(), p.user_failures, &p, now) {
            DEFENCE.auth_lockout(self.proto, "user");
            tracing::warn!(user, protocol = ?self.proto, "user locked out after repeated authentication failures");
        }
        if let Some(src) = source.map(source_key) {
            if count(&mut self.sources, src, p.source_failures, &p, now) {
                DEFENCE.auth_lockout(self.proto, "source");
                tracing::warn!(source = %src, protocol = ?self.proto, "source locked out after repeated authentication failures");
            }
        }
    }

    /// A right password: the user's count starts again. The source's count stays (a guesser
    /// holding one valid account must not be able to reset it).
    pub(crate) fn success(&mut self, user: &str, now: Instant) {
        if self
            .users
            .get(&user.to_string(), now)
            .is_some_and(|e| e.locked_until.is_none())
        {
            self.users.remove(&user.to_string());
        }
    }

    /// Entries tracked (users, sources).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> (usize, usize) {
        (self.users.len(), self.sources.len())
    }
}

/// Counts one failure of `key`; true when this one locked it.
fn count<K: Hash + Eq>(
    table: &mut ExpiringMap<K, Entry>,
    key: K,
    limit: u32,
    p: &GuardPolicy,
    now: Instant,
) -> bool {
    if let Some((e, exp)) = table.get_mut(&key, now) {
        if e.locked_until.is_some_and(|t| now < t) {
            return false;
        }
        e.failures += 1;
        if e.failures >= limit {
            e.failures = 0;
            e.locked_until = Some(now + p.lock_for);
            *exp = now + p.lock_for;
            return true;
        }
        return false;
    }
    // A new window. Table full of live entries: this key goes uncounted (the other table
    // still counts the attempt), which keeps memory bounded under a spray of keys.
    let locks = limit <= 1;
    let entry = Entry {
        failures: if locks { 0 } else { 1 },
        locked_until: locks.then(|| now + p.lock_for),
    };
    let exp = now + if locks { p.lock_for } else { p.window };
    table.insert(key, entry, exp, now) && locks
}

/// Descriptors that inbound connections may hold, every listener together.
#[derive(Debug)]
pub(crate) struct FdBudget {
    open: AtomicUsize,
    ceiling: usize,
}

impl FdBudget {
    pub(crate) fn new(ceiling: usize) -> Arc<FdBudget> {
        Arc::new(FdBudget {
            open: AtomicUsize::new(0),
            ceiling,
        })
    }

    fn take(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.ceiling).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts of one listener's open connections.
#[derive(Debug, Default)]
struct GateCounts {
    total: usize,
    /// Only sources with at least one connection: bounded by `total`.
    per_source: HashMap<IpAddr, usize>,
}

/// Connection caps of one listener.
#[derive(Debug)]
pub(crate) struct ConnGate {
    listener: Listener,
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<GateCounts>,
    fds: Arc<FdBudget>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    gate: Arc<ConnGate>,
    key: IpAddr,
}

impl ConnGate {
    pub(crate) fn new(
        listener: Listener,
        max_total: usize,
        max_per_source: usize,
        fds: Arc<FdBudget>,
    ) -> Arc<ConnGate> {
        Arc::new(ConnGate {
            listener,
            max_total,
            max_per_source,
            counts: Mutex::new(GateCounts::default()),
            fds,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, GateCounts> {
        // Each update is one call: the counts stay consistent even after a panic.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection from `peer`, or None (close it at once).
    pub(crate) fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<ConnPermit> {
        let key = source_key(peer);
        let mut c = self.counts();
        let mine = c.per_source.get(&key).copied().unwrap_or(0);
        if c.total >= self.max_total || mine >= self.max_per_source || !self.fds.take() {
            drop(c);
            DEFENCE.connection_refused(self.listener);
            return None;
        }
        c.total += 1;
        c.per_source.insert(key, mine + 1);
        drop(c);
        DEFENCE.connection_opened(self.listener);
        Some(ConnPermit {
            gate: Arc::clone(self),
            key,
        })
    }

    /// Open connections (total, from `peer`).
    #[cfg(test)]
    pub(crate) fn open(&self, peer: IpAddr) -> (usize, usize) {
        let c = self.counts();
        (
            c.total,
            c.per_source.get(&source_key(peer)).copied().unwrap_or(0),
        )
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_source.remove(&self.key);
            }
        }
        drop(c);
        self.gate.fds.give_back();
        DEFENCE.connection_closed(self.gate.listener);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> GuardPolicy {
        GuardPolicy {
            user_failures: 3,
            source_failures: 5,
            window: Duration::from_secs(60),
            lock_for: Duration::from_secs(30),
            capacity: 4,
        }
    }

    #[test]
    fn expiring_map_bounds_and_expires() {
        let t0 = Instant::now();
        let mut m: ExpiringMap<u32, u32> = ExpiringMap::new(2);
        assert!(m.insert(1, 10, t0 + Duration::from_secs(5), t0));
        assert!(m.insert(2, 20, t0 + Duration::from_secs(10), t0));
        // Full of live entries: a new key is refused, an existing one replaced.
        assert!(!m.insert(3, 30, t0 + Duration::from_secs(5), t0));
        assert!(m.insert(2, 21, t0 + Duration::from_secs(10), t0));
        assert_eq!(m.get(&2, t0), Some(&21));
        // Key 1 expired: it reads as absent and makes room (after the sweep interval).
        let t6 = t0 + Duration::from_secs(6);
        assert_eq!(m.get(&1, t6), None);
        assert!(m.insert(3, 30, t0 + Duration::from_secs(20), t6));
        assert_eq!(m.len(), 2);
        m.sweep(t0 + Duration::from_secs(100));
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn user_locked_after_failures_then_released() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(AuthProto::Sip, policy());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        for i in 0..2 {
            g.failure("1001", Some(if i % 2 == 0 { a } else { b }), t0);
            assert_eq!(g.check("1001", None, t0), Admit::Go);
        }
        g.failure("1001", Some(a), t0);
        let locked = g.check("1001", None, t0);
        assert_eq!(locked, Admit::Locked(Duration::from_secs(30)));
        assert_eq!(locked.retry_after_secs(), 30);
        // Another user from an unlocked source is not affected.
        assert_eq!(g.check("1002", Some(b), t0), Admit::Go);
        assert_eq!(
            g.check("1001", None, t0 + Duration::from_secs(31)),
            Admit::Go
        );
    }

    #[test]
    fn source_locked_whatever_the_user() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(AuthProto::Http, policy());
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        for i in 0..5 {
            g.failure(&format!("u{i}"), Some(a), t0);
        }
        assert!(matches!(
            g.check("other", Some(same_64), t0),
            Admit::Locked(_)
        ));
        assert_eq!(
            g.check("other", Some("2001:db8:1::1".parse().unwrap()), t0),
            Admit::Go
        );
    }

    #[test]
    fn success_resets_user_but_not_a_lock() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(AuthProto::Http, policy());
        g.failure("u", None, t0);
        g.failure("u", None, t0);
        g.success("u", t0);
        g.failure("u", None, t0);
        assert_eq!(g.check("u", None, t0), Admit::Go);
        g.failure("u", None, t0);
        g.failure("u", None, t0);
        assert!(matches!(g.check("u", None, t0), Admit::Locked(_)));
        g.success("u", t0);
        assert!(matches!(g.check("u", None, t0), Admit::Locked(_)));
    }

    #[test]
    fn name_spray_stays_bounded() {
        let t0 = Instant::now();
        let mut g = AuthGuard::new(AuthProto::Sip, policy());
        for i in 0..1000 {
            g.failure(&format!("name{i}"), None, t0);
        }
        assert!(g.tracked().0 <= 4);
    }

    #[test]
    fn gate_caps_per_source_total_and_fds() {
        let fds = FdBudget::new(5);
        let g = ConnGate::new(Listener::Http, 4, 2, fds.clone());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let c: IpAddr = "127.0.0.4".parse().unwrap();
        let p1 = g.admit(a).unwrap();
        let _p2 = g.admit(a).unwrap();
        assert!(g.admit(a).is_none(), "third from one source");
        let _p3 = g.admit(b).unwrap();
        let _p4 = g.admit(b).unwrap();
        assert!(g.admit(c).is_none(), "listener full");
        drop(p1);
        assert_eq!(g.open(a), (3, 1));
        let _p5 = g.admit(c).unwrap();
        // Another listener on the same budget: one descriptor left of five.
        let g2 = ConnGate::new(Listener::SipTcp, 10, 10, fds);
        let _q1 = g2.admit(c).unwrap();
        assert!(g2.admit(c).is_none(), "descriptor budget spent");
    }
}
