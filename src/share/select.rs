//! Source choice per piece (claims 4–5), sans-IO: the caller reports measurements and asks
//! which source to fetch a piece from; no clocks or sockets in here.
//!
//! Cost of fetching `bytes` from a source = (RTT + bytes / throughput) × the operator's
//! weight for the source's class, with RTT and throughput tracked per source as EWMAs of what
//! was observed, starting from per-class defaults for a source never measured.
//!
//! Rule ([`CostModel::choose`]): candidates are the holders that have the piece and are not
//! excluded (failed or hash-mismatched for this piece). No candidate → the server. Otherwise
//! the cheapest candidate if its cost is lower than the server's, else the server. If the
//! server itself is excluded, the cheapest candidate is taken whatever it costs (the server
//! failed; any peer is better than nothing), and with nobody left it is the server again:
//! the caller decides how often to retry it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::index::Holder;

/// Where a piece comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Server,
    /// A holder, by its `peer_id` in the index.
    Peer(String),
}

/// What kind of link a source sits behind; the operator weighs classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceClass {
    Server,
    Peer,
    /// A terminal on a mobile uplink: typically made expensive by the operator.
    MobilePeer,
}

impl SourceClass {
    /// The wire name (index JSON `class`): `server`, `peer`, `mobile`.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceClass::Server => "server",
            SourceClass::Peer => "peer",
            SourceClass::MobilePeer => "mobile",
        }
    }

    /// A class a terminal may announce for itself: `peer` or `mobile` (`server` is the
    /// server's own entry and cannot be claimed).
    pub fn parse_announced(s: &str) -> Option<SourceClass> {
        match s {
            "peer" => Some(SourceClass::Peer),
            "mobile" => Some(SourceClass::MobilePeer),
            _ => None,
        }
    }
}

/// Starting point for a source never measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub rtt: Duration,
    /// Bytes per second.
    pub throughput: f64,
}

/// The model's parameters (config-like; every field has a default).
#[derive(Debug, Clone, PartialEq)]
pub struct CostParams {
    /// EWMA weight of a new sample, 0 < alpha <= 1.
    pub alpha: f64,
    pub default_server: Estimate,
    pub default_peer: Estimate,
    pub default_mobile: Estimate,
    pub weight_server: f64,
    pub weight_peer: f64,
    pub weight_mobile: f64,
}

impl Default for CostParams {
    fn default() -> Self {
        CostParams {
            alpha: 0.3,
            default_server: Estimate {
                rtt: Duration::from_millis(20),
                throughput: 10_000_000.0,
            },
            default_peer: Estimate {
                rtt: Duration::from_millis(20),
                throughput: 10_000_000.0,
            },
            default_mobile: Estimate {
                rtt: Duration::from_millis(80),
                throughput: 1_000_000.0,
            },
            weight_server: 1.0,
            weight_peer: 1.0,
            weight_mobile: 2.0,
        }
    }
}

impl CostParams {
    fn default_for(&self, class: SourceClass) -> Estimate {
        match class {
            SourceClass::Server => self.default_server,
            SourceClass::Peer => self.default_peer,
            SourceClass::MobilePeer => self.default_mobile,
        }
    }

    pub fn weight(&self, class: SourceClass) -> f64 {
        match class {
            SourceClass::Server => self.weight_server,
            SourceClass::Peer => self.weight_peer,
            SourceClass::MobilePeer => self.weight_mobile,
        }
    }
}

/// Measured state of one source: EWMAs in seconds and bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub rtt_secs: f64,
    pub throughput: f64,
    /// Throughput samples taken (RTT-only observations do not count).
    pub samples: u32,
}

/// Throughput floor so a zero-byte or stalled sample never makes a cost infinite.
const MIN_THROUGHPUT: f64 = 1.0;
/// Transfer time floor for a throughput sample (timers are not finer than this).
const MIN_DURATION_SECS: f64 = 0.000_1;

/// Per-source EWMAs of RTT and throughput, per-class defaults and weights.
#[derive(Debug, Clone, Default)]
pub struct CostModel {
    params: CostParams,
    measured: HashMap<Source, Measured>,
    classes: HashMap<Source, SourceClass>,
}

impl CostModel {
    pub fn new(params: CostParams) -> CostModel {
        CostModel {
            params,
            measured: HashMap::new(),
            classes: HashMap::new(),
        }
    }

    pub fn params(&self) -> &CostParams {
        &self.params
    }

    /// Declares a source's class (default: `Server` for the server, `Peer` otherwise).
    pub fn set_class(&mut self, source: Source, class: SourceClass) {
        self.classes.insert(source, class);
    }

    pub fn class(&self, source: &Source) -> SourceClass {
        self.classes.get(source).copied().unwrap_or(match source {
            Source::Server => SourceClass::Server,
            Source::Peer(_) => SourceClass::Peer,
        })
    }

    /// Records one fetch: `rtt` = request sent to first byte, `duration` = first byte to last,
    /// `bytes` = body size. The first sample of a source replaces its default; later ones
    /// are blended in with weight `alpha`. A zero-byte fetch updates the RTT only.
    pub fn observe(&mut self, source: &Source, rtt: Duration, bytes: u64, duration: Duration) {
        let alpha = self.params.alpha.clamp(f64::MIN_POSITIVE, 1.0);
        let rtt_s = rtt.as_secs_f64();
        let tput = (bytes > 0).then(|| {
            (bytes as f64 / duration.as_secs_f64().max(MIN_DURATION_SECS)).max(MIN_THROUGHPUT)
        });
        let start = self.params.default_for(self.class(source));
        let m = self.measured.entry(source.clone()).or_insert(Measured {
            rtt_secs: rtt_s,
            throughput: start.throughput,
            samples: 0,
        });
        m.rtt_secs = alpha * rtt_s + (1.0 - alpha) * m.rtt_secs;
        if let Some(t) = tput {
            m.throughput = if m.samples == 0 {
                t
            } else {
                alpha * t + (1.0 - alpha) * m.throughput
            };
            m.samples = m.samples.saturating_add(1);
        }
    }

    /// What is known about a source (None: never observed, defaults apply).
    pub fn measured(&self, source: &Source) -> Option<Measured> {
        self.measured.get(source).copied()
    }

    /// Forgets a source's measurements (e.g. it changed address).
    pub fn forget(&mut self, source: &Source) {
        self.measured.remove(source);
    }

    /// Expected seconds to fetch `piece_bytes` from `source`, weighted by its class.
    pub fn cost(&self, source: &Source, piece_bytes: u64) -> f64 {
        let class = self.class(source);
        let (rtt, tput) = match self.measured.get(source) {
            Some(m) => (m.rtt_secs, m.throughput),
            None => {
                let d = self.params.default_for(class);
                (d.rtt.as_secs_f64(), d.throughput)
            }
        };
        (rtt + piece_bytes as f64 / tput.max(MIN_THROUGHPUT)) * self.params.weight(class)
    }

    /// The source for `piece` (of `piece_bytes`) among `holders` (the index's list; entries
    /// without the piece are ignored) versus the server. `excluded` are the sources that
    /// already failed this piece. Ties go to the server, then to the lower peer id, so the
    /// answer is deterministic.
    pub fn choose(
        &self,
        piece: usize,
        piece_bytes: u64,
        holders: &[Holder],
        excluded: &HashSet<Source>,
    ) -> Source {
        let best = holders
            .iter()
            .filter(|h| h.have.get(piece))
            .map(|h| Source::Peer(h.peer_id.clone()))
            .filter(|s| !excluded.contains(s))
            .map(|s| (self.cost(&s, piece_bytes), s))
            .min_by(|(ca, a), (cb, b)| ca.total_cmp(cb).then_with(|| a.cmp(b)));
        let Some((best_cost, best)) = best else {
            return Source::Server;
        };
        if excluded.contains(&Source::Server) {
            return best;
        }
        if best_cost < self.cost(&Source::Server, piece_bytes) {
            best
        } else {
            Source::Server
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::index::test_holder as holder;

    fn peer(id: &str) -> Source {
        Source::Peer(id.into())
    }

    /// One fetch of `bytes` from `s` that took a second, `rtt_ms` to the first byte.
    fn observe_1s(m: &mut CostModel, s: &Source, rtt_ms: u64, bytes: u64) {
        m.observe(
            s,
            Duration::from_millis(rtt_ms),
            bytes,
            Duration::from_secs(1),
        );
    }

    /// Server at 1 MB/s and 10 ms; peers as the test sets them.
    fn model() -> CostModel {
        let mut m = CostModel::new(CostParams::default());
        observe_1s(&mut m, &Source::Server, 10, 1_000_000);
        m
    }

    const PIECE: u64 = 262_144;

    #[test]
    fn no_holder_means_server() {
        let m = model();
        let none = HashSet::new();
        assert_eq!(m.choose(0, PIECE, &[], &none), Source::Server);
        // Holders exist, but none has piece 1.
        let hs = [holder("a", &[0], 4), holder("b", &[2, 3], 4)];
        assert_eq!(m.choose(1, PIECE, &hs, &none), Source::Server);
    }

    #[test]
    fn cheapest_holder_when_cheaper_than_server() {
        let mut m = model();
        observe_1s(&mut m, &peer("a"), 5, 4_000_000);
        observe_1s(&mut m, &peer("b"), 5, 2_000_000);
        let hs = [holder("a", &[0], 1), holder("b", &[0], 1)];
        assert_eq!(m.choose(0, PIECE, &hs, &HashSet::new()), peer("a"));
    }

    #[test]
    fn server_when_best_holder_is_not_cheaper() {
        let mut m = model();
        observe_1s(&mut m, &peer("slow"), 50, 100_000);
        let hs = [holder("slow", &[0], 1)];
        assert_eq!(m.choose(0, PIECE, &hs, &HashSet::new()), Source::Server);
        // Exactly equal cost: the server (the holder must be strictly cheaper).
        let mut eq = CostModel::new(CostParams::default());
        eq.observe(
            &Source::Server,
            Duration::from_millis(10),
            1000,
            Duration::from_millis(1),
        );
        eq.observe(
            &peer("same"),
            Duration::from_millis(10),
            1000,
            Duration::from_millis(1),
        );
        assert_eq!(
            eq.cost(&peer("same"), PIECE),
            eq.cost(&Source::Server, PIECE)
        );
        assert_eq!(
            eq.choose(0, PIECE, &[holder("same", &[0], 1)], &HashSet::new()),
            Source::Server
        );
    }

    #[test]
    fn excluded_sources_are_skipped_then_server() {
        let mut m = model();
        observe_1s(&mut m, &peer("a"), 1, 9_000_000);
        observe_1s(&mut m, &peer("b"), 1, 5_000_000);
        let hs = [holder("a", &[0], 1), holder("b", &[0], 1)];
        let mut ex = HashSet::from([peer("a")]);
        assert_eq!(m.choose(0, PIECE, &hs, &ex), peer("b"));
        ex.insert(peer("b"));
        assert_eq!(m.choose(0, PIECE, &hs, &ex), Source::Server);
        // The server failed too: nothing left, still the server (the caller's last resort).
        ex.insert(Source::Server);
        assert_eq!(m.choose(0, PIECE, &hs, &ex), Source::Server);
    }

    #[test]
    fn excluded_server_takes_any_holder() {
        let mut m = model();
        observe_1s(&mut m, &peer("slow"), 50, 100_000);
        let hs = [holder("slow", &[0], 1)];
        let ex = HashSet::from([Source::Server]);
        assert_eq!(m.choose(0, PIECE, &hs, &ex), peer("slow"));
    }

    #[test]
    fn unknown_sources_use_class_defaults_and_weights() {
        let params = CostParams {
            default_server: Estimate {
                rtt: Duration::from_millis(100),
                throughput: 1_000_000.0,
            },
            default_peer: Estimate {
                rtt: Duration::from_millis(10),
                throughput: 2_000_000.0,
            },
            default_mobile: Estimate {
                rtt: Duration::from_millis(10),
                throughput: 2_000_000.0,
            },
            weight_mobile: 4.0,
            ..CostParams::default()
        };
        let mut m = CostModel::new(params);
        // Unknown peer: 0.01 + 1e6/2e6 = 0.51 s; server: 0.1 + 1.0 = 1.1 s.
        assert!((m.cost(&peer("x"), 1_000_000) - 0.51).abs() < 1e-9);
        assert!((m.cost(&Source::Server, 1_000_000) - 1.1).abs() < 1e-9);
        let hs = [holder("x", &[0], 1)];
        assert_eq!(m.choose(0, 1_000_000, &hs, &HashSet::new()), peer("x"));
        // The same peer on a mobile uplink weighs 4x: 2.04 s > 1.1 s.
        m.set_class(peer("x"), SourceClass::MobilePeer);
        assert_eq!(m.class(&peer("x")), SourceClass::MobilePeer);
        assert!((m.cost(&peer("x"), 1_000_000) - 2.04).abs() < 1e-9);
        assert_eq!(m.choose(0, 1_000_000, &hs, &HashSet::new()), Source::Server);
    }

    #[test]
    fn ties_between_holders_go_to_lower_peer_id() {
        let m = CostModel::new(CostParams {
            default_server: Estimate {
                rtt: Duration::from_secs(1),
                throughput: 1.0,
            },
            ..CostParams::default()
        });
        let hs = [holder("b", &[0], 1), holder("a", &[0], 1)];
        assert_eq!(m.choose(0, PIECE, &hs, &HashSet::new()), peer("a"));
    }

    #[test]
    fn ewma_of_rtt_and_throughput() {
        let mut m = CostModel::new(CostParams {
            alpha: 0.5,
            ..CostParams::default()
        });
        let s = peer("p");
        assert_eq!(m.measured(&s), None);
        // First sample replaces the defaults.
        observe_1s(&mut m, &s, 100, 1_000_000);
        let a = m.measured(&s).unwrap();
        assert!((a.rtt_secs - 0.1).abs() < 1e-12);
        assert!((a.throughput - 1_000_000.0).abs() < 1e-6);
        assert_eq!(a.samples, 1);
        // Second: halfway (alpha 0.5) to 300 ms and 3 MB/s.
        observe_1s(&mut m, &s, 300, 3_000_000);
        let b = m.measured(&s).unwrap();
        assert!((b.rtt_secs - 0.2).abs() < 1e-12);
        assert!((b.throughput - 2_000_000.0).abs() < 1e-6);
        // Zero bytes: RTT moves, throughput does not.
        m.observe(&s, Duration::from_millis(0), 0, Duration::ZERO);
        let c = m.measured(&s).unwrap();
        assert!((c.rtt_secs - 0.1).abs() < 1e-12);
        assert!((c.throughput - 2_000_000.0).abs() < 1e-6);
        assert_eq!(c.samples, 2);
        // cost = (0.1 + 1e6 / 2e6) * 1.0
        assert!((m.cost(&s, 1_000_000) - 0.6).abs() < 1e-9);
        // A zero-duration sample is floored, never infinite.
        m.observe(&s, Duration::ZERO, 10, Duration::ZERO);
        assert!(m.cost(&s, 1).is_finite());
        m.forget(&s);
        assert_eq!(m.measured(&s), None);
    }

    #[test]
    fn a_rate_limited_server_loses_to_peers_over_time() {
        // The server starts cheap (defaults) but measures slow; the holder then wins.
        let mut m = CostModel::new(CostParams::default());
        let hs = [holder("p", &[0, 1], 2)];
        m.observe(
            &peer("p"),
            Duration::from_millis(20),
            262_144,
            Duration::from_millis(100),
        );
        assert_eq!(m.choose(0, PIECE, &hs, &HashSet::new()), Source::Server);
        for _ in 0..3 {
            observe_1s(&mut m, &Source::Server, 20, 262_144);
        }
        assert_eq!(m.choose(1, PIECE, &hs, &HashSet::new()), peer("p"));
    }

    #[test]
    fn class_names() {
        for c in [SourceClass::Peer, SourceClass::MobilePeer] {
            assert_eq!(SourceClass::parse_announced(c.as_str()), Some(c));
        }
        assert_eq!(SourceClass::Server.as_str(), "server");
        assert_eq!(SourceClass::parse_announced("server"), None);
        assert_eq!(SourceClass::parse_announced("Mobile"), None);
        assert_eq!(SourceClass::parse_announced(""), None);
    }

    /// Same measured RTT and throughput: the mobile peer's operator weight (2x by default)
    /// makes it lose to a plain peer, and to the server.
    #[test]
    fn a_mobile_holder_with_equal_figures_loses_when_weighted() {
        let mut m = CostModel::new(CostParams::default());
        let same = |m: &mut CostModel, s: &Source| {
            for _ in 0..3 {
                observe_1s(m, s, 10, 2_000_000);
            }
        };
        for s in [peer("mob"), peer("plain"), Source::Server] {
            same(&mut m, &s);
        }
        m.set_class(peer("mob"), SourceClass::MobilePeer);
        assert_eq!(
            m.measured(&peer("mob")).map(|x| x.throughput),
            m.measured(&peer("plain")).map(|x| x.throughput)
        );
        // "mob" sorts before "plain", so on a tie it would win: only the weight decides.
        let both = [holder("mob", &[0], 1), holder("plain", &[0], 1)];
        let mob_only = [holder("mob", &[0], 1)];
        let no_server = HashSet::from([Source::Server]);
        assert!(m.cost(&peer("mob"), PIECE) > m.cost(&peer("plain"), PIECE));
        assert_eq!(m.choose(0, PIECE, &both, &no_server), peer("plain"));
        // Against the server with equal figures: the server.
        assert!(m.cost(&peer("mob"), PIECE) > m.cost(&Source::Server, PIECE));
        assert_eq!(
            m.choose(0, PIECE, &mob_only, &HashSet::new()),
            Source::Server
        );
        // Declared a plain peer again, the same figures tie and the lower id wins.
        m.set_class(peer("mob"), SourceClass::Peer);
        assert_eq!(m.choose(0, PIECE, &both, &no_server), peer("mob"));
    }
}
