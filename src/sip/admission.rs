//! Per-source admission of new INVITEs and REGISTERs (PROTOCOL.md §7 "Overload"), in the manner
//! of Kamailio's `pike` module: a token bucket per source IP, in a bounded table whose idle
//! entries expire. Sans-IO: the caller passes `now`.
//!
//! Each source may start `rate` requests per second on average and `burst` at once. A request
//! over that share is refused with a [`Verdict::Reject`] carrying the `Retry-After` to send
//! (RFC 3261 §21.5.4, §20.33): the time until the source has a token again. The engine answers
//! it statelessly (§8.2.7), before any transaction, call or port exists.
//!
//! Memory is bounded by `max_sources` entries. An entry whose bucket has refilled is the same
//! as no entry, so when the table is full such entries are swept (at most once a second: the
//! sweep walks the table); if it is still full, sources without an entry share one overflow
//! bucket, so that a flood from many addresses is held to one source's share as well instead
//! of growing the table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits; `rate == 0` turns admission off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Tokens added per second to each source's bucket.
    pub rate: f64,
    /// Bucket size: requests a quiet source may send at once.
    pub burst: f64,
    /// Sources tracked at most.
    pub max_sources: usize,
}

/// What to do with one new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Admit,
    /// Over its share: refuse, asking the source to wait this many seconds.
    Reject {
        retry_after: u32,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, cfg: &AdmissionConfig, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * cfg.rate).min(cfg.burst);
        self.at = now;
    }

    fn take(&mut self, cfg: &AdmissionConfig, now: Instant) -> Verdict {
        self.refill(cfg, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Verdict::Admit
        } else {
            let wait = (1.0 - self.tokens) / cfg.rate;
            // At least a second: Retry-After is whole seconds and 0 would invite a retry storm.
            Verdict::Reject {
                retry_after: (wait.ceil() as u32).max(1),
            }
        }
    }

    fn is_refilled(&self, cfg: &AdmissionConfig, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + dt * cfg.rate >= cfg.burst
    }
}

/// The table of source buckets.
#[derive(Debug)]
pub(crate) struct Admission {
    cfg: AdmissionConfig,
    sources: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
    last_sweep: Option<Instant>,
}

/// Sweeps of a full table are this far apart at least.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Admission {
    pub(crate) fn new(cfg: AdmissionConfig) -> Admission {
        Admission {
            cfg,
            sources: HashMap::new(),
            overflow: None,
            last_sweep: None,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.cfg.rate > 0.0
    }

    /// Sources currently tracked (bounded by `max_sources`).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.sources.len()
    }

    /// Charges one new request to `ip`.
    pub(crate) fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        if !self.enabled() {
            return Verdict::Admit;
        }
        let cfg = self.cfg;
        if let Some(b) = self.sources.get_mut(&ip) {
            return b.take(&cfg, now);
        }
        if self.sources.len() >= cfg.max_sources {
            self.sweep(now);
        }
        if self.sources.len() < cfg.max_sources {
            return self
                .sources
                .entry(ip)
                .or_insert(Bucket::full(cfg.burst, now))
                .take(&cfg, now);
        }
        self.overflow
            .get_or_insert(Bucket::full(cfg.burst, now))
            .take(&cfg, now)
    }

    /// Drops the entries that have refilled (they carry no information).
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        let cfg = self.cfg;
        self.sources.retain(|_, b| !b.is_refilled(&cfg, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            rate: 10.0,
            burst: 5.0,
            max_sources: 3,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate_per_source() {
        let mut a = Admission::new(cfg());
        let t0 = Instant::now();
        let x = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(a.check(x, t0), Verdict::Admit);
        }
        assert_eq!(a.check(x, t0), Verdict::Reject { retry_after: 1 });
        // Another source has its own share.
        assert_eq!(a.check(ip("192.0.2.2"), t0), Verdict::Admit);
        // 10 per second: one more after 100 ms, not two.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(a.check(x, t1), Verdict::Admit);
        assert!(matches!(a.check(x, t1), Verdict::Reject { .. }));
        // Over one simulated second of steady sending at 40/s: about 10 admitted.
        let mut admitted = 0;
        for i in 1..=40 {
            let t = t1 + Duration::from_millis(25 * i);
            if a.check(x, t) == Verdict::Admit {
                admitted += 1;
            }
        }
        assert!((9..=11).contains(&admitted), "{admitted}");
    }

    #[test]
    fn retry_after_is_the_time_to_the_next_token() {
        let mut a = Admission::new(AdmissionConfig {
            rate: 0.25,
            burst: 1.0,
            max_sources: 10,
        });
        let t0 = Instant::now();
        assert_eq!(a.check(ip("192.0.2.1"), t0), Verdict::Admit);
        assert_eq!(
            a.check(ip("192.0.2.1"), t0),
            Verdict::Reject { retry_after: 4 }
        );
    }

    #[test]
    fn table_is_bounded_and_overflow_shares_one_bucket() {
        let mut a = Admission::new(cfg());
        let t0 = Instant::now();
        for i in 1..=3 {
            assert_eq!(a.check(ip(&format!("192.0.2.{i}")), t0), Verdict::Admit);
        }
        assert_eq!(a.tracked(), 3);
        // A flood from ever new addresses: one bucket between them, the table stays at 3.
        let mut admitted = 0;
        for i in 10..200 {
            if a.check(ip(&format!("198.51.100.{i}")), t0) == Verdict::Admit {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5);
        assert_eq!(a.tracked(), 3);
        // Once the tracked sources have refilled, their entries expire and new ones get in.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(a.check(ip("203.0.113.9"), later), Verdict::Admit);
        assert_eq!(a.tracked(), 1);
    }

    #[test]
    fn rate_zero_admits_everything() {
        let mut a = Admission::new(AdmissionConfig {
            rate: 0.0,
            burst: 0.0,
            max_sources: 0,
        });
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(a.check(ip("192.0.2.1"), t0), Verdict::Admit);
        }
        assert_eq!(a.tracked(), 0);
    }
}
