//! The DTMF feature code (`*7` PIN `#`, PROTOCOL.md §2.1 and §5), sans-IO.
//!
//! Digits of one direction of a call go in, one at a time, with `now`. Once the code's first
//! digit arrives the following digits are held back from the other party until the code is
//! decided: a complete `code PIN #` is swallowed (right PIN or not: it was a feature attempt),
//! anything that stops matching releases every held digit in order, and so does silence for
//! [`HOLD_TIMEOUT`] after the last held digit.

use std::time::{Duration, Instant};

/// Held digits with no further digit for this long are released to the other party.
pub(crate) const HOLD_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest PIN accepted by the feature code (matches the account PIN limit).
const MAX_PIN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Not part of a feature code: relay it.
    Forward,
    /// Held back until the code is decided.
    Hold,
    /// Not a feature code after all: relay these held digits, in order (the last one may be
    /// the digit just given).
    Release(Vec<char>),
    /// `code PIN #` complete: every held digit is swallowed.
    Code { pin: String },
}

#[derive(Debug, Clone)]
pub(crate) struct FeatureCode {
    code: Vec<char>,
    held: Vec<char>,
    last: Option<Instant>,
}

impl FeatureCode {
    /// `code` is `store.feature_code`, e.g. `*7`. An empty code disables detection.
    pub(crate) fn new(code: &str) -> FeatureCode {
        FeatureCode {
            code: code.chars().collect(),
            held: Vec::new(),
            last: None,
        }
    }

    pub(crate) fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    pub(crate) fn on_digit(&mut self, digit: char, now: Instant) -> Decision {
        if self.code.is_empty() {
            return Decision::Forward;
        }
        if self.held.is_empty() {
            if digit == self.code[0] {
                // Even a one-digit code is only a prefix: the PIN and '#' must follow.
                self.held.push(digit);
                self.last = Some(now);
                return Decision::Hold;
            }
            return Decision::Forward;
        }
        self.held.push(digit);
        self.last = Some(now);
        let n = self.code.len();
        if self.held.len() <= n {
            if self.held[..] == self.code[..self.held.len()] {
                return Decision::Hold;
            }
            return self.release();
        }
        // Past the code: PIN digits, then '#'.
        match digit {
            '#' if self.held.len() > n + 1 => {
                let pin: String = self.held[n..self.held.len() - 1].iter().collect();
                self.held.clear();
                self.last = None;
                Decision::Code { pin }
            }
            d if d.is_ascii_digit() && self.held.len() - n <= MAX_PIN => Decision::Hold,
            _ => self.release(),
        }
    }

    fn release(&mut self) -> Decision {
        self.last = None;
        Decision::Release(std::mem::take(&mut self.held))
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.last.map(|t| t + HOLD_TIMEOUT)
    }

    /// Releases the held digits when they have waited too long.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> Option<Vec<char>> {
        match self.poll_timeout() {
            Some(t) if t <= now && !self.held.is_empty() => match self.release() {
                Decision::Release(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(fc: &mut FeatureCode, digits: &str, now: Instant) -> Vec<Decision> {
        digits.chars().map(|d| fc.on_digit(d, now)).collect()
    }

    #[test]
    fn code_with_pin_is_swallowed() {
        let now = Instant::now();
        let mut fc = FeatureCode::new("*7");
        let d = feed(&mut fc, "*74321#", now);
        assert!(d[..6].iter().all(|x| *x == Decision::Hold));
        assert_eq!(d[6], Decision::Code { pin: "4321".into() });
        assert!(!fc.is_holding());
        assert_eq!(fc.on_digit('5', now), Decision::Forward);
    }

    #[test]
    fn mismatch_releases_in_order() {
        let now = Instant::now();
        let mut fc = FeatureCode::new("*7");
        assert_eq!(fc.on_digit('1', now), Decision::Forward);
        assert_eq!(fc.on_digit('*', now), Decision::Hold);
        assert_eq!(fc.on_digit('8', now), Decision::Release(vec!['*', '8']));
        assert_eq!(fc.on_digit('*', now), Decision::Hold);
        assert_eq!(fc.on_digit('7', now), Decision::Hold);
        assert_eq!(fc.on_digit('1', now), Decision::Hold);
        assert_eq!(
            fc.on_digit('A', now),
            Decision::Release(vec!['*', '7', '1', 'A'])
        );
        // '#' right after the code (empty PIN) is not a code either.
        feed(&mut fc, "*7", now);
        assert_eq!(
            fc.on_digit('#', now),
            Decision::Release(vec!['*', '7', '#'])
        );
    }

    #[test]
    fn held_star_released_after_silence() {
        let t0 = Instant::now();
        let mut fc = FeatureCode::new("*7");
        assert_eq!(fc.on_digit('*', t0), Decision::Hold);
        assert_eq!(fc.poll_timeout(), Some(t0 + HOLD_TIMEOUT));
        assert_eq!(fc.handle_timeout(t0 + Duration::from_millis(2999)), None);
        assert_eq!(fc.handle_timeout(t0 + HOLD_TIMEOUT), Some(vec!['*']));
        assert_eq!(fc.poll_timeout(), None);
        // Each digit restarts the wait.
        fc.on_digit('*', t0);
        fc.on_digit('7', t0 + Duration::from_secs(2));
        assert_eq!(fc.handle_timeout(t0 + Duration::from_secs(4)), None);
        assert_eq!(
            fc.handle_timeout(t0 + Duration::from_secs(5)),
            Some(vec!['*', '7'])
        );
    }

    #[test]
    fn overlong_pin_releases() {
        let now = Instant::now();
        let mut fc = FeatureCode::new("*7");
        feed(&mut fc, "*7", now);
        for _ in 0..MAX_PIN {
            assert_eq!(fc.on_digit('1', now), Decision::Hold);
        }
        assert!(matches!(fc.on_digit('1', now), Decision::Release(v) if v.len() == MAX_PIN + 3));
    }

    #[test]
    fn empty_code_disables() {
        let mut fc = FeatureCode::new("");
        assert_eq!(fc.on_digit('*', Instant::now()), Decision::Forward);
    }
}
