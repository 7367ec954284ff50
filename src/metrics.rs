//! Prometheus metrics (PROTOCOL.md §5 names), as plain atomics.
//!
//! A fixed set of counters in one static: incrementing is one relaxed atomic add, with no
//! registry lookup and no lock, so the media path can afford it. Gauges that other components
//! own (ports in use, registrations) are copied in by the core after each batch of events.
//!
//! `callvault_stores{state}` is the one family that is not kept here: the `/metrics` handler
//! asks the metadata database (`Stores::count_by_state`, one `GROUP BY` per scrape) and hands
//! the counts to [`render_with`]. A gauge kept in memory would have to be told of every state
//! change, including those made outside the store sessions (pending stores expiring in the
//! server's sweep, uploads over HTTP, start-up recovery marking stores `truncated`, another
//! node writing the same PostgreSQL database); a periodic refresh would be stale by its period.
//! Asking at scrape time is always exact and costs one indexed query per scrape (seconds
//! apart). With several nodes on one database every node reports the cluster-wide counts, so
//! aggregate that family with `max`, not `sum`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::media::latch::Refusal;
use crate::storage::stores::StoreState;

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

/// Latency buckets in seconds (upper bounds) of the media-path histograms.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0, 30.0,
];

/// Buckets of `callvault_prompt_to_first_packet_seconds`: a person may take minutes to dial the
/// store URI (a store id stays open `store_expiry_secs`, default 300 s), a SIPp or softphone
/// client tens of milliseconds.
const HUMAN_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Most buckets a [`Histogram`] can have (the counts live in a fixed array so the histogram
/// can be a `static` without allocation).
const MAX_BUCKETS: usize = 16;

/// A Prometheus histogram over fixed bucket bounds; observing is a few relaxed atomic adds.
pub struct Histogram {
    buckets: &'static [f64],
    counts: [AtomicU64; MAX_BUCKETS],
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
    /// Latency buckets (1 ms .. 30 s).
    pub const fn new() -> Histogram {
        Histogram::with_buckets(&LATENCY_BUCKETS)
    }

    /// `buckets`: ascending upper bounds in seconds, at most 16 (+Inf is implicit).
    pub const fn with_buckets(buckets: &'static [f64]) -> Histogram {
        assert!(buckets.len() <= MAX_BUCKETS);
        Histogram {
            buckets,
            counts: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        // NaN would land in +Inf only and poison the sum; a negative duration cannot happen.
        let seconds = if seconds.is_finite() {
            seconds.max(0.0)
        } else {
            0.0
        };
        if let Some(i) = self.buckets.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum();
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Keeps a gauge raised while it lives: `inc` now, `dec` on drop, so every exit path of a
/// session task (early returns, errors, cancellation) lowers it again.
pub struct GaugeGuard(&'static Gauge);

impl GaugeGuard {
    pub fn new(g: &'static Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
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

/// Where shared-data bytes came from (label of `callvault_share_bytes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareSource {
    Server,
    Peer,
}

impl ShareSource {
    const ALL: [ShareSource; 2] = [ShareSource::Server, ShareSource::Peer];
    fn label(self) -> &'static str {
        match self {
            ShareSource::Server => "server",
            ShareSource::Peer => "peer",
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
    /// New INVITEs/REGISTERs answered 503 by per-source admission (`b2bua::engine::guard`).
    pub sip_admission_rejected_total: Counter,
    pub rtp_packets_relayed_total: Counter,
    pub rtp_bytes_relayed_total: Counter,
    pub rtp_packets_stored_total: Counter,
    pub rtp_bytes_stored_total: Counter,
    /// Of `rtp_packets_relayed_total`, those forwarded in the kernel (`media::kernel`).
    pub rtp_packets_kernel_total: Counter,
    /// 1 when the kernel fast path is attached (`callvault_media_path{path="kernel"}`).
    pub media_path_kernel: Gauge,
    /// Of `rtp_packets_stored_total`, those the kernel fast path copied into its recording
    /// ring (`media::kernel::ring`).
    pub rtp_packets_stored_kernel_total: Counter,
    /// Relayed RTP packets left out of a recording: a lagging writer had no room, or the
    /// kernel's recording ring was full (relayed, not recorded).
    pub recording_packets_refused_total: Counter,
    /// Set by the core after each batch of events (the registrar owns the number).
    pub registrations_active: Gauge,
    /// Nodes with a live lease, this one included (PROTOCOL 6); 1 on the embedded SQLite.
    pub cluster_nodes_alive: Gauge,
    /// Kept by the port allocator as pairs are bound and closed.
    pub rtp_ports_in_use: Gauge,
    /// First stored packet to threshold (step 32).
    pub threshold_seconds: Histogram,
    /// Play ACK (or threshold) to first packet sent (step 333).
    pub play_start_seconds: Histogram,
    /// Store sessions (RTP ingest) running: from the store's `receiving` to its end.
    pub store_sessions_active: Gauge,
    /// Play sessions accepted (`200` to `INVITE play-<id>`).
    pub play_sessions_total: Counter,
    /// Play sessions from their `200` to their end.
    pub play_sessions_active: Gauge,
    /// Prompt sent (the store created, step 12) to the first RTP packet of its store session
    /// stored (committed, step 31).
    pub prompt_to_first_packet_seconds: Histogram,
    /// Shared-data bytes by [`ShareSource`] (`callvault_share_bytes_total{source}`).
    share_bytes_total: [Counter; 2],
    /// RTP/RTCP datagrams refused by the source latch, by [`Refusal`]
    /// (`callvault_rtp_packets_refused_total{reason}`).
    rtp_packets_refused_total: [Counter; 3],
    /// SRTP/SRTCP packets dropped: failed authentication, or replayed / too old
    /// (`callvault_srtp_auth_failures_total{reason="auth"|"replay"}`).
    pub srtp_auth_failures_total: Counter,
    pub srtp_replay_failures_total: Counter,
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
    sip_admission_rejected_total: Counter::new(),
    rtp_packets_relayed_total: Counter::new(),
    rtp_bytes_relayed_total: Counter::new(),
    rtp_packets_stored_total: Counter::new(),
    rtp_bytes_stored_total: Counter::new(),
    rtp_packets_kernel_total: Counter::new(),
    media_path_kernel: Gauge::new(),
    rtp_packets_stored_kernel_total: Counter::new(),
    recording_packets_refused_total: Counter::new(),
    registrations_active: Gauge::new(),
    cluster_nodes_alive: Gauge::new(),
    rtp_ports_in_use: Gauge::new(),
    threshold_seconds: Histogram::new(),
    play_start_seconds: Histogram::new(),
    store_sessions_active: Gauge::new(),
    play_sessions_total: Counter::new(),
    play_sessions_active: Gauge::new(),
    prompt_to_first_packet_seconds: Histogram::with_buckets(&HUMAN_BUCKETS),
    share_bytes_total: [Counter::new(), Counter::new()],
    rtp_packets_refused_total: [Counter::new(), Counter::new(), Counter::new()],
    srtp_auth_failures_total: Counter::new(),
    srtp_replay_failures_total: Counter::new(),
};

impl Metrics {
    pub fn call_ended(&self, outcome: CallOutcome) {
        self.calls_total[outcome as usize].inc();
    }

    pub fn calls_total(&self, outcome: CallOutcome) -> u64 {
        self.calls_total[outcome as usize].get()
    }

    /// Shared-data bytes sent (server) or fetched from peers.
    pub fn share_bytes(&self, source: ShareSource, n: u64) {
        self.share_bytes_total[source as usize].add(n);
    }

    pub fn share_bytes_total(&self, source: ShareSource) -> u64 {
        self.share_bytes_total[source as usize].get()
    }

    /// `n` datagrams refused by a media port's source latch for `reason`.
    pub fn rtp_packets_refused(&self, reason: Refusal, n: u64) {
        self.rtp_packets_refused_total[reason as usize].add(n);
    }

    pub fn rtp_packets_refused_total(&self, reason: Refusal) -> u64 {
        self.rtp_packets_refused_total[reason as usize].get()
    }
}

/// Renders the Prometheus text exposition format (version 0.0.4), without the store counts.
pub fn render() -> String {
    render_with(None)
}

/// Like [`render`], plus `callvault_stores{state}` from `stores` (per-state counts as
/// [`Stores::count_by_state`](crate::storage::stores::Stores::count_by_state) returns them;
/// states it leaves out are 0). `None`: the counts are unavailable and the family is left out
/// rather than reported as zeros.
pub fn render_with(stores: Option<&[(StoreState, u64)]>) -> String {
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
        "callvault_sip_admission_rejected_total",
        "counter",
        "New INVITEs and REGISTERs refused with 503 because their source was over its share.",
        m.sip_admission_rejected_total.get().to_string(),
    );
    one(
        "callvault_registrations_active",
        "gauge",
        "Registered contacts.",
        m.registrations_active.get().to_string(),
    );
    one(
        "callvault_cluster_nodes_alive",
        "gauge",
        "Nodes with a live lease in the shared metadata database, this one included.",
        m.cluster_nodes_alive.get().to_string(),
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
        "callvault_rtp_packets_kernel_total",
        "counter",
        "RTP packets of callvault_rtp_packets_relayed_total forwarded by the kernel fast path.",
        m.rtp_packets_kernel_total.get().to_string(),
    );
    one(
        "callvault_rtp_packets_stored_total",
        "counter",
        "RTP packets appended to stores.",
        m.rtp_packets_stored_total.get().to_string(),
    );
    one(
        "callvault_rtp_packets_stored_kernel_total",
        "counter",
        "RTP packets of callvault_rtp_packets_stored_total recorded through the kernel fast path's ring.",
        m.rtp_packets_stored_kernel_total.get().to_string(),
    );
    one(
        "callvault_rtp_bytes_stored_total",
        "counter",
        "RTP payload bytes appended to stores.",
        m.rtp_bytes_stored_total.get().to_string(),
    );
    one(
        "callvault_recording_packets_refused_total",
        "counter",
        "Relayed RTP packets left out of a call recording: its writer was behind, or the kernel fast path's recording ring was full.",
        m.recording_packets_refused_total.get().to_string(),
    );
    one(
        "callvault_store_sessions_active",
        "gauge",
        "Store sessions receiving RTP right now.",
        m.store_sessions_active.get().to_string(),
    );
    one(
        "callvault_play_sessions_total",
        "counter",
        "Play sessions accepted (200 to INVITE play-<id>).",
        m.play_sessions_total.get().to_string(),
    );
    one(
        "callvault_play_sessions_active",
        "gauge",
        "Play sessions up right now.",
        m.play_sessions_active.get().to_string(),
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
    m.prompt_to_first_packet_seconds.render(
        &mut out,
        "callvault_prompt_to_first_packet_seconds",
        "Time from the prompt (store created) to the first RTP packet of its store session stored.",
    );
    let kernel = u64::from(m.media_path_kernel.get() > 0);
    labelled(
        &mut out,
        (
            "callvault_media_path",
            "gauge",
            "The media path in use: kernel (tc eBPF fast path) or user (user-space relay).",
        ),
        "path",
        [("kernel", kernel), ("user", 1 - kernel)],
    );
    if let Some(counts) = stores {
        let by_state = StoreState::ALL.map(|st| {
            let n = counts.iter().filter(|(s, _)| *s == st).map(|(_, n)| *n);
            (st.as_str(), n.sum())
        });
        labelled(
            &mut out,
            ("callvault_stores", "gauge", "Stores by state."),
            "state",
            by_state,
        );
    }
    labelled(
        &mut out,
        (
            "callvault_calls_total",
            "counter",
            "Calls ended, by outcome.",
        ),
        "outcome",
        CallOutcome::ALL.map(|o| (o.label(), m.calls_total(o))),
    );
    labelled(
        &mut out,
        (
            "callvault_share_bytes_total",
            "counter",
            "Shared-data bytes, by source.",
        ),
        "source",
        ShareSource::ALL.map(|s| (s.label(), m.share_bytes_total(s))),
    );
    labelled(
        &mut out,
        (
            "callvault_rtp_packets_refused_total",
            "counter",
            "RTP/RTCP datagrams refused on a media port: not from the signalled or latched source, not RTP, or of a payload type not negotiated.",
        ),
        "reason",
        Refusal::ALL.map(|r| (r.label(), m.rtp_packets_refused_total(r))),
    );
    labelled(
        &mut out,
        (
            "callvault_srtp_auth_failures_total",
            "counter",
            "SRTP/SRTCP packets dropped, by reason (auth: failed authentication, replay: \
             replayed or older than the replay window).",
        ),
        "reason",
        [
            ("auth", m.srtp_auth_failures_total.get()),
            ("replay", m.srtp_replay_failures_total.get()),
        ],
    );
    DEFENCE.render(&mut out);
    process_and_build(&mut out);
    out
}

/// Which password check a guard counts for (label `protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthProto {
    Http,
    Sip,
}

impl AuthProto {
    const ALL: [AuthProto; 2] = [AuthProto::Http, AuthProto::Sip];
    fn label(self) -> &'static str {
        match self {
            AuthProto::Http => "http",
            AuthProto::Sip => "sip",
        }
    }
}

/// A listener whose connections are capped (label `listener`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Http,
    SipTcp,
}

impl Listener {
    const ALL: [Listener; 2] = [Listener::Http, Listener::SipTcp];
    fn label(self) -> &'static str {
        match self {
            Listener::Http => "http",
            Listener::SipTcp => "sip_tcp",
        }
    }
}

/// Defences against floods and guessing (issue 10): kept apart from [`Metrics`] so they read
/// as one group.
#[derive(Default)]
pub struct DefenceMetrics {
    auth_failures: [Counter; 2],
    auth_user_lockouts: [Counter; 2],
    auth_source_lockouts: [Counter; 2],
    auth_refused_locked: [Counter; 2],
    /// HTTP Basic attempts answered 503 because every password-hashing slot was busy.
    pub auth_hash_busy: Counter,
    /// HTTP Basic checks answered from the cache of recent successes (no Argon2 run).
    pub auth_cache_hits: Counter,
    connections_active: [Gauge; 2],
    connections_refused: [Counter; 2],
}

pub static DEFENCE: DefenceMetrics = DefenceMetrics {
    auth_failures: [Counter::new(), Counter::new()],
    auth_user_lockouts: [Counter::new(), Counter::new()],
    auth_source_lockouts: [Counter::new(), Counter::new()],
    auth_refused_locked: [Counter::new(), Counter::new()],
    auth_hash_busy: Counter::new(),
    auth_cache_hits: Counter::new(),
    connections_active: [Gauge::new(), Gauge::new()],
    connections_refused: [Counter::new(), Counter::new()],
};

impl DefenceMetrics {
    pub fn auth_failure(&self, p: AuthProto) {
        self.auth_failures[p as usize].inc();
    }
    /// `key`: "user" or "source".
    pub fn auth_lockout(&self, p: AuthProto, key: &str) {
        match key {
            "user" => self.auth_user_lockouts[p as usize].inc(),
            _ => self.auth_source_lockouts[p as usize].inc(),
        }
    }
    pub fn auth_refused_locked(&self, p: AuthProto) {
        self.auth_refused_locked[p as usize].inc();
    }
    pub fn connection_opened(&self, l: Listener) {
        self.connections_active[l as usize].inc();
    }
    pub fn connection_closed(&self, l: Listener) {
        self.connections_active[l as usize].dec();
    }
    pub fn connection_refused(&self, l: Listener) {
        self.connections_refused[l as usize].inc();
    }

    fn render(&self, out: &mut String) {
        let per_proto = |c: &[Counter; 2]| AuthProto::ALL.map(|p| (p.label(), c[p as usize].get()));
        labelled(
            out,
            (
                "callvault_auth_failures_total",
                "counter",
                "Wrong passwords or unknown users, by protocol.",
            ),
            "protocol",
            per_proto(&self.auth_failures),
        );
        labelled(
            out,
            (
                "callvault_auth_user_lockouts_total",
                "counter",
                "User names locked out after repeated failures, by protocol.",
            ),
            "protocol",
            per_proto(&self.auth_user_lockouts),
        );
        labelled(
            out,
            (
                "callvault_auth_source_lockouts_total",
                "counter",
                "Source addresses locked out after repeated failures, by protocol.",
            ),
            "protocol",
            per_proto(&self.auth_source_lockouts),
        );
        labelled(
            out,
            (
                "callvault_auth_refused_locked_total",
                "counter",
                "Authentication attempts refused unchecked during a lockout, by protocol.",
            ),
            "protocol",
            per_proto(&self.auth_refused_locked),
        );
        labelled(
            out,
            (
                "callvault_auth_hash_busy_total",
                "counter",
                "HTTP Basic attempts answered 503 because every password-hashing slot was busy.",
            ),
            "protocol",
            [("http", self.auth_hash_busy.get())],
        );
        labelled(
            out,
            (
                "callvault_auth_cache_hits_total",
                "counter",
                "HTTP Basic checks answered from the cache of recent successes.",
            ),
            "protocol",
            [("http", self.auth_cache_hits.get())],
        );
        let per_listener = Listener::ALL.map(|l| {
            (
                l.label(),
                u64::try_from(self.connections_active[l as usize].get()).unwrap_or(0),
            )
        });
        labelled(
            out,
            (
                "callvault_connections_active",
                "gauge",
                "Open inbound connections, by listener.",
            ),
            "listener",
            per_listener,
        );
        labelled(out, ("callvault_connections_refused_total", "counter",
            "Inbound connections closed at once because a connection cap was reached, by listener."),
            "listener", Listener::ALL.map(|l| (l.label(), self.connections_refused[l as usize].get())));
    }
}

/// `callvault_build_info` and the standard `process_*` family (the names the Prometheus
/// client libraries use), read from `/proc/self` at scrape time; a value that cannot be read
/// (not Linux) is left out.
fn process_and_build(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP callvault_build_info The running build (value 1).
         # TYPE callvault_build_info gauge
         callvault_build_info{{version=\"{}\",profile=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
    for (name, kind, help, value) in process_values() {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

fn process_values() -> Vec<(&'static str, &'static str, &'static str, String)> {
    let mut v = Vec::new();
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`, which may contain spaces: state is field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    if let (Some(ut), Some(st)) = (field(14), field(15)) {
        if tick > 0 {
            let secs = (ut + st) as f64 / tick as f64;
            v.push((
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent in seconds.",
                format!("{secs}"),
            ));
        }
    }
    if let Some(rss) = field(24).filter(|_| page > 0) {
        v.push((
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            (rss * page as u64).to_string(),
        ));
    }
    if let Some(vsize) = field(23) {
        v.push((
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize.to_string(),
        ));
    }
    if let (Some(start), Some(boot)) = (field(22), boot_time()) {
        if tick > 0 {
            let t = boot as f64 + start as f64 / tick as f64;
            v.push((
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch in seconds.",
                format!("{t}"),
            ));
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        v.push((
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            dir.count().to_string(),
        ));
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        v.push((
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            lim.rlim_cur.to_string(),
        ));
    }
    v
}

/// `btime` of /proc/stat: boot time in Unix seconds.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// One family with a single label: `(name, type, help)`, then a sample per label value.
fn labelled<const N: usize>(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    label: &str,
    values: [(&str, u64); N],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
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
            "callvault_cluster_nodes_alive ",
            "callvault_rtp_ports_in_use ",
            "callvault_rtp_packets_relayed_total ",
            "callvault_share_bytes_total{source=\"server\"} ",
            "callvault_rtp_packets_refused_total{reason=\"foreign_source\"} ",
            "callvault_rtp_packets_refused_total{reason=\"not_rtp\"} ",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(METRICS.calls_total(CallOutcome::Answered) >= 1);
    }

    #[test]
    fn renders_store_families() {
        let text = render_with(Some(&[(StoreState::Complete, 3), (StoreState::Pending, 1)]));
        for line in [
            "callvault_stores{state=\"pending\"} 1\n",
            "callvault_stores{state=\"receiving\"} 0\n",
            "callvault_stores{state=\"complete\"} 3\n",
            "callvault_stores{state=\"truncated\"} 0\n",
            "callvault_stores{state=\"rejected\"} 0\n",
            "callvault_stores{state=\"expired\"} 0\n",
            "# TYPE callvault_stores gauge\n",
            "callvault_store_sessions_active ",
            "callvault_play_sessions_total ",
            "callvault_play_sessions_active ",
            "callvault_prompt_to_first_packet_seconds_count ",
            "callvault_prompt_to_first_packet_seconds_bucket{le=\"300\"} ",
            "callvault_threshold_seconds_count ",
            "callvault_play_start_seconds_count ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Unknown counts: the family is absent, not a misleading set of zeros.
        assert!(!render().contains("callvault_stores{"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        static H: Histogram = Histogram::with_buckets(&[0.1, 1.0, 10.0]);
        H.observe(0.05);
        H.observe(0.1); // upper bounds are inclusive
        H.observe(0.5);
        H.observe(20.0);
        H.observe(f64::NAN); // counted as 0, sum unharmed
        let mut out = String::new();
        H.render(&mut out, "h", "test");
        for line in [
            "h_bucket{le=\"0.1\"} 3\n",
            "h_bucket{le=\"1\"} 4\n",
            "h_bucket{le=\"10\"} 4\n",
            "h_bucket{le=\"+Inf\"} 5\n",
            "h_count 5\n",
            "h_sum 20.65\n",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        assert_eq!(H.count(), 5);
    }

    #[test]
    fn gauge_guard_lowers_on_every_exit() {
        static G: Gauge = Gauge::new();
        {
            let _a = GaugeGuard::new(&G);
            let _b = GaugeGuard::new(&G);
            assert_eq!(G.get(), 2);
        }
        assert_eq!(G.get(), 0);
        let r = std::panic::catch_unwind(|| {
            let _g = GaugeGuard::new(&G);
            panic!("session task failed");
        });
        assert!(r.is_err());
        assert_eq!(G.get(), 0, "lowered on unwind too");
    }
}
