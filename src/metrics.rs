//! Prometheus metrics (PROTOCOL.md §5 names), as plain atomics.
//!
//! A fixed set of counters in one static: incrementing is one relaxed atomic add, with no
//! registry lookup and no lock, so the media path can afford it. Gauges that other components
//! own (ports in use, registrations) are copied in by the core after each batch of events.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Mirrors a counter another component owns (copied in by the core).
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets in seconds (upper bounds), shared by the histograms.
const BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0, 30.0,
];

/// A Prometheus histogram over [`BUCKETS`]; observing is a few relaxed atomic adds.
pub struct Histogram {
    counts: [AtomicU64; 12],
    count: AtomicU64,
    /// Sum in microseconds (atomics hold integers).
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; 12],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// How a call through the B2BUA ended (label of `callvault_calls_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    Answered,
    Cancelled,
    Failed,
    Timeout,
}

impl CallOutcome {
    const ALL: [CallOutcome; 4] = [
        CallOutcome::Answered,
        CallOutcome::Cancelled,
        CallOutcome::Failed,
        CallOutcome::Timeout,
    ];
    fn label(self) -> &'static str {
        match self {
            CallOutcome::Answered => "answered",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::Failed => "failed",
            CallOutcome::Timeout => "timeout",
        }
    }
}

pub struct Metrics {
    pub calls_active: Gauge,
    calls_total: [Counter; 4],
    pub sip_transactions_total: Counter,
    pub sip_retransmissions_total: Counter,
    pub sip_malformed_total: Counter,
    pub sip_overload_dropped_total: Counter,
    pub rtp_packets_relayed_total: Counter,
    pub rtp_bytes_relayed_total: Counter,
    pub rtp_packets_stored_total: Counter,
    pub rtp_bytes_stored_total: Counter,
    /// Set by the core after each batch of events (the registrar owns the number).
    pub registrations_active: Gauge,
    /// Kept by the port allocator as pairs are bound and closed.
    pub rtp_ports_in_use: Gauge,
    /// First stored packet to threshold (step 32).
    pub threshold_seconds: Histogram,
    /// Play ACK (or threshold) to first packet sent (step 333).
    pub play_start_seconds: Histogram,
}

pub static METRICS: Metrics = Metrics {
    calls_active: Gauge::new(),
    calls_total: [
        Counter::new(),
        Counter::new(),
        Counter::new(),
        Counter::new(),
    ],
    sip_transactions_total: Counter::new(),
    sip_retransmissions_total: Counter::new(),
    sip_malformed_total: Counter::new(),
    sip_overload_dropped_total: Counter::new(),
    rtp_packets_relayed_total: Counter::new(),
    rtp_bytes_relayed_total: Counter::new(),
    rtp_packets_stored_total: Counter::new(),
    rtp_bytes_stored_total: Counter::new(),
    registrations_active: Gauge::new(),
    rtp_ports_in_use: Gauge::new(),
    threshold_seconds: Histogram::new(),
    play_start_seconds: Histogram::new(),
};

impl Metrics {
    pub fn call_ended(&self, outcome: CallOutcome) {
        self.calls_total[outcome as usize].inc();
    }

    pub fn calls_total(&self, outcome: CallOutcome) -> u64 {
        self.calls_total[outcome as usize].get()
    }
}

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let m = &METRICS;
    let mut out = String::with_capacity(2048);
    let mut one = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    one(
        "callvault_calls_active",
        "gauge",
        "Calls currently up or being set up through the B2BUA.",
        m.calls_active.get().to_string(),
    );
    one(
        "callvault_sip_transactions_total",
        "counter",
        "SIP transactions created (client and server).",
        m.sip_transactions_total.get().to_string(),
    );
    one(
        "callvault_sip_retransmissions_total",
        "counter",
        "SIP retransmissions sent by the transaction layer.",
        m.sip_retransmissions_total.get().to_string(),
    );
    one(
        "callvault_sip_malformed_total",
        "counter",
        "SIP messages that could not be parsed.",
        m.sip_malformed_total.get().to_string(),
    );
    one(
        "callvault_sip_overload_dropped_total",
        "counter",
        "SIP messages shed because the core queue was full.",
        m.sip_overload_dropped_total.get().to_string(),
    );
    one(
        "callvault_registrations_active",
        "gauge",
        "Registered contacts.",
        m.registrations_active.get().to_string(),
    );
    one(
        "callvault_rtp_ports_in_use",
        "gauge",
        "RTP ports bound for calls (RTP and RTCP).",
        m.rtp_ports_in_use.get().to_string(),
    );
    one(
        "callvault_rtp_packets_relayed_total",
        "counter",
        "RTP/RTCP packets relayed between call legs.",
        m.rtp_packets_relayed_total.get().to_string(),
    );
    one(
        "callvault_rtp_bytes_relayed_total",
        "counter",
        "RTP/RTCP bytes relayed between call legs.",
        m.rtp_bytes_relayed_total.get().to_string(),
    );
    one(
        "callvault_rtp_packets_stored_total",
        "counter",
        "RTP packets appended to stores.",
        m.rtp_packets_stored_total.get().to_string(),
    );
    one(
        "callvault_rtp_bytes_stored_total",
        "counter",
        "RTP payload bytes appended to stores.",
        m.rtp_bytes_stored_total.get().to_string(),
    );
    m.threshold_seconds.render(
        &mut out,
        "callvault_threshold_seconds",
        "Time from a store's first stored packet to its threshold.",
    );
    m.play_start_seconds.render(
        &mut out,
        "callvault_play_start_seconds",
        "Time from play ACK or threshold to the first packet sent.",
    );
    let _ = writeln!(
        out,
        "# HELP callvault_calls_total Calls ended, by outcome.\n# TYPE callvault_calls_total counter"
    );
    for o in CallOutcome::ALL {
        let _ = writeln!(
            out,
            "callvault_calls_total{{outcome=\"{}\"}} {}",
            o.label(),
            m.calls_total(o)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_contract_name() {
        METRICS.call_ended(CallOutcome::Answered);
        let text = render();
        for name in [
            "callvault_calls_active ",
            "callvault_calls_total{outcome=\"answered\"} ",
            "callvault_sip_transactions_total ",
            "callvault_sip_retransmissions_total ",
            "callvault_registrations_active ",
            "callvault_rtp_ports_in_use ",
            "callvault_rtp_packets_relayed_total ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(METRICS.calls_total(CallOutcome::Answered) >= 1);
    }
}
