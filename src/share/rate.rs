//! Server egress pacing (`share.server_rate_bytes_per_sec`): one token bucket shared by every
//! piece and content download, so the operator can make the server the expensive source.
//!
//! [`TokenBucket`] is the arithmetic (sans-IO, takes `now`); [`RateLimiter`] puts it behind a
//! mutex and sleeps; [`throttle`] wraps a body stream. The bucket runs into debt: a sender
//! takes its bytes at once and waits until the debt is paid, so concurrent downloads are
//! served in arrival order and share the rate.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::metrics::{ShareSource, METRICS};

/// Largest slice sent in one go: keeps pacing smooth at low rates.
pub(crate) const MAX_SLICE: usize = 16 * 1024;

/// Token bucket with debt. `rate` 0 = unlimited.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `burst` is what may go out without waiting after a quiet period.
    pub(crate) fn new(rate_bytes_per_sec: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate_bytes_per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// A bucket for `rate`: a tenth of a second's worth of burst, at least one slice.
    pub(crate) fn for_rate(rate_bytes_per_sec: u64, now: Instant) -> TokenBucket {
        let burst = (rate_bytes_per_sec / 10).max(MAX_SLICE as u64);
        TokenBucket::new(rate_bytes_per_sec, burst, now)
    }

    pub(crate) fn is_unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    /// Takes `n` bytes at `now`; returns how long the sender must wait before sending them.
    pub(crate) fn take(&mut self, n: u64, now: Instant) -> Duration {
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A shared bucket; clones share it.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bucket: Option<Arc<Mutex<TokenBucket>>>,
}

impl RateLimiter {
    /// 0 = unlimited.
    pub fn new(rate_bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            bucket: (rate_bytes_per_sec > 0).then(|| {
                Arc::new(Mutex::new(TokenBucket::for_rate(
                    rate_bytes_per_sec,
                    Instant::now(),
                )))
            }),
        }
    }

    pub fn unlimited() -> RateLimiter {
        RateLimiter { bucket: None }
    }

    /// Waits until `n` bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let Some(b) = &self.bucket else {
            return;
        };
        let wait = b
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Paces `body` through `limiter` (in slices of at most [`MAX_SLICE`]) and counts what goes
/// out in `callvault_share_bytes_total{source}`.
pub(crate) fn throttle<S>(
    body: S,
    limiter: RateLimiter,
    source: ShareSource,
) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static,
{
    futures_util::stream::unfold((body, Bytes::new()), move |(mut body, mut rest)| {
        let limiter = limiter.clone();
        async move {
            if rest.is_empty() {
                match body.next().await? {
                    Ok(b) => rest = b,
                    Err(e) => return Some((Err(e), (body, Bytes::new()))),
                }
            }
            let slice = rest.split_to(rest.len().min(MAX_SLICE));
            limiter.acquire(slice.len() as u64).await;
            METRICS.share_bytes(source, slice.len() as u64);
            Some((Ok(slice), (body, rest)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        // The burst goes at once, then debt.
        assert_eq!(b.take(100, t0), Duration::ZERO);
        assert_eq!(b.take(500, t0), Duration::from_millis(500));
        // Another sender queued behind the debt waits longer.
        assert_eq!(b.take(500, t0), Duration::from_millis(1000));
        // 1 s later 1000 tokens arrived: the debt (1000) is paid; 100 more wait 100 ms.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(100, t1), Duration::from_millis(100));
        // A long quiet period refills only up to the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.take(100, t2), Duration::ZERO);
        assert_eq!(b.take(1, t2), Duration::from_millis(1));
        // Time going backwards (another thread's older now) changes nothing.
        assert!(b.take(0, t0) > Duration::ZERO);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::for_rate(0, t0);
        assert!(b.is_unlimited());
        assert_eq!(b.take(u64::MAX, t0), Duration::ZERO);
        assert_eq!(TokenBucket::for_rate(1_000_000, t0).burst, 100_000.0);
        assert_eq!(TokenBucket::for_rate(1000, t0).burst, MAX_SLICE as f64);
    }

    #[tokio::test]
    async fn throttled_stream_keeps_bytes_and_rate() {
        let chunks: Vec<io::Result<Bytes>> = vec![
            Ok(Bytes::from(vec![1u8; 40_000])),
            Ok(Bytes::from(vec![2u8; 8_000])),
        ];
        let before = METRICS.share_bytes_total(ShareSource::Server);
        // 100 kB/s with a 16 KiB burst: 48 kB takes about (48000 - 16384) / 100000 = 0.32 s.
        let limiter = RateLimiter::new(100_000);
        let t = Instant::now();
        let out: Vec<io::Result<Bytes>> = throttle(
            futures_util::stream::iter(chunks),
            limiter,
            ShareSource::Server,
        )
        .collect()
        .await;
        let elapsed = t.elapsed();
        let bytes: Vec<u8> = out.into_iter().flat_map(|b| b.unwrap().to_vec()).collect();
        assert_eq!(bytes.len(), 48_000);
        assert!(bytes[..40_000].iter().all(|b| *b == 1) && bytes[40_000..].iter().all(|b| *b == 2));
        assert!(elapsed >= Duration::from_millis(280), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(METRICS.share_bytes_total(ShareSource::Server) >= before + 48_000);
    }
}
