//! Which piece to fetch next and from where, sans-IO: the fetch loop asks [`Scheduler::next`]
//! with the latest holders and `now`, runs the fetch, and reports [`Outcome`]s back.
//!
//! Per piece the source is [`CostModel::choose`] (PROTOCOL 3: no other holder → server,
//! else the cheapest holder if cheaper than the server). Which piece comes next is the
//! agent's own freedom, used to keep the server's egress low:
//! - pieces some peer can serve more cheaply than the server go first (rarest first);
//! - only then a piece from the server, preferring pieces no peer holds yet, in an order
//!   shuffled per agent (`order_seed`) so agents ask the server for different pieces and
//!   then trade them (a plain rotation makes a fast agent that reaches another's start
//!   fetch the same pieces in lockstep with it);
//! - pieces nobody holds yet are split among the agents still fetching (those in the index
//!   with incomplete bitfields, and this one) by a hash of the piece number, so each asks
//!   the server for its own share only, without any coordination beyond the index; another
//!   agent's share is taken from the server only after it stays unheld for a grace period
//!   (three expected server fetches, at least 2 s), in case that agent left;
//! - a holder that is the cheapest source but has all its slots taken is waited for, not
//!   replaced by the server;
//! - the server gets at most `server_slots` of the parallel fetches while peers exist, so
//!   slots stay free for pieces that appear at peers and fewer server fetches overlap with
//!   other agents' fetches of the same piece.
//!
//! Failures: a hash mismatch excludes that source for that piece and counts against it
//! (two mismatches and the peer is dropped for good); a transport failure excludes it for
//! the piece and takes the source out of the running for a backoff. A piece that has failed
//! `MAX_ATTEMPTS` times fails the fetch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::share::index::{Bitfield, Holder};
use crate::share::select::{CostModel, Source};

/// Tries per piece before the fetch gives up.
pub(crate) const MAX_ATTEMPTS: u32 = 12;
/// Hash mismatches after which a peer is never asked again.
pub(crate) const BAN_AFTER_MISMATCHES: u32 = 2;
/// Backoff after a transport failure: doubles per consecutive failure up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Shortest wait before fetching from the server a piece that is another agent's share.
const OTHERS_GRACE_MIN: f64 = 2.0;
const OTHERS_GRACE_MAX: f64 = 60.0;

/// One piece to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assignment {
    pub piece: usize,
    pub source: Source,
    /// The piece's length in bytes.
    pub bytes: u64,
}

/// How a fetch went.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Verified and written; timings for the cost model.
    Ok {
        rtt: Duration,
        transfer: Duration,
        bytes: u64,
    },
    /// The bytes did not hash to the manifest's value.
    HashMismatch,
    /// Connection, status or length error.
    Failed,
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub(crate) struct PlanConfig {
    /// This agent's peer id: its own index entry is never a source.
    pub self_id: String,
    /// Concurrent fetches.
    pub parallel: usize,
    /// Concurrent fetches from the server while some peer holds pieces. Few: with a slow
    /// server, every extra outstanding request is a piece another agent may be fetching
    /// from it at the same time (nobody announces pieces in flight).
    pub server_slots: usize,
    /// Concurrent fetches from one peer.
    pub per_peer_slots: usize,
    /// Ignore peers altogether (the server-only baseline).
    pub server_only: bool,
    /// Typical piece size, for the grace period before taking another agent's share.
    pub piece_hint: u64,
    /// Seed of this agent's piece order (spreads agents over the file); None: 0, 1, 2...
    pub order_seed: Option<u64>,
}

impl PlanConfig {
    pub(crate) fn new(self_id: &str, parallel: usize) -> PlanConfig {
        let parallel = parallel.max(1);
        PlanConfig {
            self_id: self_id.to_string(),
            parallel,
            server_slots: parallel.div_ceil(4),
            piece_hint: 262_144,
            per_peer_slots: 2,
            server_only: false,
            order_seed: Some(fnv1a(self_id.as_bytes(), FNV_OFFSET)),
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: a full-avalanche mix, so orders for different seeds are
/// unrelated (FNV alone leaves strides that put agents in lockstep).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An agent's piece order: deterministic for a seed, unrelated between seeds.
pub(crate) fn piece_order(seed: Option<u64>, pieces: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pieces).collect();
    if let Some(seed) = seed {
        order.sort_by_key(|&i| (mix(seed ^ mix(i as u64)), i));
    }
    order
}

/// Bytes fetched per source (verified pieces only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub by_source: BTreeMap<String, u64>,
    pub hash_mismatches: u64,
    pub failures: u64,
}

impl Tally {
    pub(crate) fn server_bytes(&self) -> u64 {
        self.by_source.get("server").copied().unwrap_or(0)
    }

    pub(crate) fn peer_bytes(&self) -> u64 {
        self.by_source
            .iter()
            .filter(|(k, _)| k.as_str() != "server")
            .map(|(_, v)| v)
            .sum()
    }
}

pub(crate) fn source_name(s: &Source) -> &str {
    match s {
        Source::Server => "server",
        Source::Peer(id) => id,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("piece {piece} failed {attempts} times from every source")]
    GaveUp { piece: usize, attempts: u32 },
}

/// The fetch plan of one content.
#[derive(Debug)]
pub(crate) struct Scheduler {
    cfg: PlanConfig,
    lens: Vec<u64>,
    order: Vec<usize>,
    have: Bitfield,
    in_flight: HashMap<usize, Source>,
    excluded: HashMap<usize, HashSet<Source>>,
    attempts: Vec<u32>,
    model: CostModel,
    down_until: HashMap<Source, Instant>,
    consecutive_failures: HashMap<Source, u32>,
    mismatches: HashMap<Source, u32>,
    banned: HashSet<Source>,
    /// When a piece held by nobody, and another agent's to fetch, was first passed over,
    /// and whose share it was then.
    unheld_since: HashMap<usize, (String, Instant)>,
    tally: Tally,
}

impl Scheduler {
    /// `lens[i]` is piece i's length; `have` what is already verified (resume).
    pub(crate) fn new(
        cfg: PlanConfig,
        lens: Vec<u64>,
        have: Bitfield,
        model: CostModel,
    ) -> Scheduler {
        let n = lens.len();
        Scheduler {
            order: piece_order(cfg.order_seed, n),
            cfg,
            lens,
            have,
            in_flight: HashMap::new(),
            excluded: HashMap::new(),
            attempts: vec![0; n],
            model,
            down_until: HashMap::new(),
            consecutive_failures: HashMap::new(),
            mismatches: HashMap::new(),
            banned: HashSet::new(),
            unheld_since: HashMap::new(),
            tally: Tally::default(),
        }
    }

    pub(crate) fn have(&self) -> &Bitfield {
        &self.have
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.have.is_complete()
    }

    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub(crate) fn tally(&self) -> &Tally {
        &self.tally
    }

    pub(crate) fn model(&self) -> &CostModel {
        &self.model
    }

    pub(crate) fn is_banned(&self, s: &Source) -> bool {
        self.banned.contains(s)
    }

    /// Bytes verified so far.
    pub(crate) fn bytes_done(&self) -> u64 {
        (0..self.lens.len())
            .filter(|&i| self.have.get(i))
            .map(|i| self.lens[i])
            .sum()
    }

    fn slots_of(&self, s: &Source) -> usize {
        self.in_flight.values().filter(|v| *v == s).count()
    }

    fn is_down(&self, s: &Source, now: Instant) -> bool {
        self.down_until.get(s).is_some_and(|t| now < *t)
    }

    /// The next fetch to start, or None (all slots busy, nothing pending, or every useful
    /// source is busy or backing off: ask again after the next outcome or holders change).
    pub(crate) fn next(&mut self, holders: &[Holder], now: Instant) -> Option<Assignment> {
        if self.in_flight.len() >= self.cfg.parallel {
            return None;
        }
        // The classes the index reports: the operator's weight for a mobile holder applies.
        for h in holders {
            if h.peer_id != "server"
                && self.model.class(&Source::Peer(h.peer_id.clone())) != h.class
            {
                self.model
                    .set_class(Source::Peer(h.peer_id.clone()), h.class);
            }
        }
        let peers: Vec<Holder> = if self.cfg.server_only {
            Vec::new()
        } else {
            holders
                .iter()
                .filter(|h| h.peer_id != self.cfg.self_id && h.peer_id != "server")
                .filter(|h| h.have.len() == self.lens.len())
                .cloned()
                .collect()
        };
        // Sources that cannot be asked now: banned or backing off (hard), or with all
        // their slots taken (busy: worth waiting for if they are the cheapest).
        let mut hard: HashSet<Source> = self.banned.clone();
        let mut busy: HashSet<Source> = HashSet::new();
        for h in &peers {
            let s = Source::Peer(h.peer_id.clone());
            if self.is_down(&s, now) {
                hard.insert(s);
            } else if self.slots_of(&s) >= self.cfg.per_peer_slots {
                busy.insert(s);
            }
        }
        let server_cap = if peers.is_empty() {
            self.cfg.parallel
        } else {
            self.cfg.server_slots.max(1)
        };
        let server_ok =
            !self.is_down(&Source::Server, now) && self.slots_of(&Source::Server) < server_cap;
        // Agents still fetching (they announce once they hold a piece), this one included:
        // pieces nobody holds yet are split among them for the server fetches.
        let mut fetching: Vec<&str> = peers
            .iter()
            .filter(|h| !h.have.is_complete())
            .map(|h| h.peer_id.as_str())
            .chain(std::iter::once(self.cfg.self_id.as_str()))
            .collect();
        fetching.sort_unstable();
        fetching.dedup();
        let grace = Duration::from_secs_f64(
            (3.0 * self.model.cost(&Source::Server, self.cfg.piece_hint))
                .clamp(OTHERS_GRACE_MIN, OTHERS_GRACE_MAX),
        );

        // (rarity, position in this agent's order) → smaller is better.
        let mut best_peer: Option<((usize, usize), usize, Source)> = None;
        let mut best_server: Option<((usize, usize), usize)> = None;
        for pos in 0..self.order.len() {
            let piece = self.order[pos];
            if self.have.get(piece) || self.in_flight.contains_key(&piece) {
                continue;
            }
            let rarity = peers.iter().filter(|h| h.have.get(piece)).count();
            let key = (rarity, pos);
            let mut ex: HashSet<Source> = hard.clone();
            if let Some(e) = self.excluded.get(&piece) {
                ex.extend(e.iter().cloned());
            }
            let mut choice = self.model.choose(piece, self.lens[piece], &peers, &ex);
            if busy.contains(&choice) {
                // The cheapest holder is busy: another holder if one is still cheaper than
                // the server, else wait for a slot rather than pay the server.
                ex.extend(busy.iter().cloned());
                choice = self.model.choose(piece, self.lens[piece], &peers, &ex);
                if choice == Source::Server {
                    continue;
                }
            }
            match choice {
                Source::Peer(id) => {
                    if best_peer.as_ref().is_none_or(|(k, _, _)| key < *k) {
                        best_peer = Some((key, piece, Source::Peer(id)));
                    }
                }
                Source::Server => {
                    if rarity == 0 && fetching.len() > 1 {
                        let owner = fetching[(mix(piece as u64) % fetching.len() as u64) as usize];
                        if owner != self.cfg.self_id {
                            // Another agent's share: it is probably fetching it now. Take it
                            // only if it stays unheld for the grace period (that agent may
                            // be gone or slow).
                            // The clock restarts when the owner changes (agents came or
                            // finished): the new owner has only just learnt it is its share.
                            let entry = self
                                .unheld_since
                                .entry(piece)
                                .or_insert_with(|| (owner.to_string(), now));
                            if entry.0 != owner {
                                *entry = (owner.to_string(), now);
                            }
                            if now.saturating_duration_since(entry.1) < grace {
                                continue;
                            }
                        }
                    }
                    if best_server.is_none_or(|(k, _)| key < k) {
                        best_server = Some((key, piece));
                    }
                }
            }
        }
        let (piece, source) = match (best_peer, best_server) {
            (Some((_, p, s)), _) => (p, s),
            (None, Some((_, p))) if server_ok => (p, Source::Server),
            _ => return None,
        };
        self.in_flight.insert(piece, source.clone());
        self.attempts[piece] = self.attempts[piece].saturating_add(1);
        Some(Assignment {
            piece,
            source,
            bytes: self.lens[piece],
        })
    }

    /// Records how an assignment went. Err when a piece has used up its attempts.
    pub(crate) fn complete(
        &mut self,
        piece: usize,
        source: &Source,
        outcome: Outcome,
        now: Instant,
    ) -> Result<(), PlanError> {
        if self.in_flight.get(&piece) == Some(source) {
            self.in_flight.remove(&piece);
        }
        match outcome {
            Outcome::Ok {
                rtt,
                transfer,
                bytes,
            } => {
                self.model.observe(source, rtt, bytes, transfer);
                self.consecutive_failures.remove(source);
                if !self.have.get(piece) {
                    self.have.set(piece, true);
                    *self
                        .tally
                        .by_source
                        .entry(source_name(source).to_string())
                        .or_default() += bytes;
                }
                self.excluded.remove(&piece);
                return Ok(());
            }
            Outcome::HashMismatch => {
                self.tally.hash_mismatches += 1;
                self.excluded
                    .entry(piece)
                    .or_default()
                    .insert(source.clone());
                if *source != Source::Server {
                    let m = self.mismatches.entry(source.clone()).or_default();
                    *m += 1;
                    if *m >= BAN_AFTER_MISMATCHES {
                        self.banned.insert(source.clone());
                    }
                }
            }
            Outcome::Failed => {
                self.tally.failures += 1;
                self.excluded
                    .entry(piece)
                    .or_default()
                    .insert(source.clone());
                let f = self.consecutive_failures.entry(source.clone()).or_default();
                *f = f.saturating_add(1);
                let backoff = BACKOFF_START
                    .saturating_mul(1u32 << (*f - 1).min(8))
                    .min(BACKOFF_CAP);
                self.down_until.insert(source.clone(), now + backoff);
            }
        }
        // Sources that failed stay excluded for this piece; when none is left `choose`
        // falls back to the server, which is retried after its backoff.
        if self.attempts[piece] >= MAX_ATTEMPTS {
            return Err(PlanError::GaveUp {
                piece,
                attempts: self.attempts[piece],
            });
        }
        Ok(())
    }

    /// When the soonest backoff ends (for the caller's wait), if any source is backing off.
    pub(crate) fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        self.down_until
            .values()
            .filter(|t| **t > now)
            .min()
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::index::test_holder as holder;
    use crate::share::select::{CostParams, Estimate, SourceClass};

    fn peer(id: &str) -> Source {
        Source::Peer(id.into())
    }

    const P: u64 = 1000;

    fn sched(n: usize, parallel: usize) -> Scheduler {
        sched_with(n, parallel, CostModel::new(CostParams::default()))
    }

    /// `n` pieces of `P` bytes, none held, in order 0, 1, 2...
    fn sched_with(n: usize, parallel: usize, model: CostModel) -> Scheduler {
        let mut cfg = PlanConfig::new("me", parallel);
        cfg.order_seed = None;
        cfg.piece_hint = P;
        Scheduler::new(cfg, vec![P; n], Bitfield::empty(n), model)
    }

    /// The server measured: a piece in `transfer` (5 s: slow enough that any peer wins).
    fn server_takes(s: &mut Scheduler, transfer: Duration) {
        s.model
            .observe(&Source::Server, Duration::from_millis(1), P, transfer);
    }

    fn ok(ms: u64) -> Outcome {
        Outcome::Ok {
            rtt: Duration::from_millis(1),
            transfer: Duration::from_millis(ms),
            bytes: P,
        }
    }

    /// Drives the scheduler to completion with a fake fetcher, one fetch at a time;
    /// returns the sequence of (piece, source).
    fn run(
        s: &mut Scheduler,
        holders: &[Holder],
        mut fetch: impl FnMut(usize, &Source) -> Outcome,
    ) -> Result<Vec<(usize, Source)>, PlanError> {
        let mut log = Vec::new();
        let mut now = Instant::now();
        for _ in 0..10_000 {
            if s.is_complete() {
                return Ok(log);
            }
            match s.next(holders, now) {
                Some(a) => {
                    let o = fetch(a.piece, &a.source);
                    log.push((a.piece, a.source.clone()));
                    s.complete(a.piece, &a.source, o, now)?;
                }
                None => now += Duration::from_secs(1),
            }
        }
        panic!("did not finish: {log:?}");
    }

    /// The class in the index reaches the cost model: the same holder is taken as a plain
    /// peer and passed over for the server as a mobile one.
    #[test]
    fn holder_class_from_the_index_is_weighed() {
        let est = |tput: f64| Estimate {
            rtt: Duration::from_millis(20),
            throughput: tput,
        };
        let params = CostParams {
            default_server: est(5_000_000.0),
            default_peer: est(10_000_000.0),
            default_mobile: est(10_000_000.0),
            weight_mobile: 2.0,
            ..CostParams::default()
        };
        let first = |class: SourceClass| {
            let mut s = sched_with(2, 1, CostModel::new(params.clone()));
            let mut h = holder("m", &[0, 1], 2);
            h.class = class;
            let a = s.next(&[h], Instant::now()).unwrap();
            assert_eq!(s.model().class(&peer("m")), class);
            a.source
        };
        assert_eq!(first(SourceClass::Peer), peer("m"));
        assert_eq!(first(SourceClass::MobilePeer), Source::Server);
    }

    #[test]
    fn server_only_when_no_peers() {
        let mut s = sched(5, 1);
        let log = run(&mut s, &[], |_, _| ok(1)).unwrap();
        assert_eq!(log.len(), 5);
        assert!(log.iter().all(|(_, src)| *src == Source::Server));
        assert_eq!(s.tally().server_bytes(), 5 * P);
        assert_eq!(s.tally().peer_bytes(), 0);
        assert_eq!(s.bytes_done(), 5 * P);
    }

    #[test]
    fn own_entry_and_server_entry_are_not_peers() {
        let mut s = sched(3, 1);
        let hs = [holder("me", &[0, 1, 2], 3), holder("server", &[0, 1, 2], 3)];
        let log = run(&mut s, &hs, |_, _| ok(1)).unwrap();
        assert!(log.iter().all(|(_, src)| *src == Source::Server));
    }

    #[test]
    fn fast_peer_wins_once_server_measures_slow() {
        let mut s = sched(6, 1);
        let hs = [holder("a", &[0, 1, 2, 3, 4, 5], 6)];
        // Server: 1000 bytes in 2 s (slow); peer: 1000 bytes in 1 ms.
        let log = run(&mut s, &hs, |_, src| match src {
            Source::Server => ok(2000),
            Source::Peer(_) => ok(1),
        })
        .unwrap();
        // Unknown peer vs unknown server tie → server first; after that, the peer.
        assert_eq!(log[0].1, Source::Server);
        assert!(log[1..].iter().all(|(_, src)| *src == peer("a")), "{log:?}");
        assert_eq!(s.tally().peer_bytes(), 5 * P);
    }

    #[test]
    fn corrupt_peer_is_excluded_then_banned() {
        let mut s = sched(4, 1);
        // Make the server look slow so the peer is preferred.
        server_takes(&mut s, Duration::from_secs(5));
        let hs = [holder("bad", &[0, 1, 2, 3], 4)];
        let log = run(&mut s, &hs, |_, src| match src {
            Source::Server => ok(5000),
            Source::Peer(_) => Outcome::HashMismatch,
        })
        .unwrap();
        // Two mismatches (two pieces), then the peer is banned: the rest from the server.
        let from_bad = log.iter().filter(|(_, src)| *src == peer("bad")).count();
        assert_eq!(from_bad, BAN_AFTER_MISMATCHES as usize, "{log:?}");
        assert!(s.is_banned(&peer("bad")));
        assert_eq!(s.tally().hash_mismatches, 2);
        assert_eq!(s.tally().server_bytes(), 4 * P);
        assert_eq!(s.tally().peer_bytes(), 0);
        // The peer was tried on two different pieces (peer pieces go first), each of which
        // then came from the server.
        assert_eq!(
            (log[0].1.clone(), log[1].1.clone()),
            (peer("bad"), peer("bad"))
        );
        assert_ne!(log[0].0, log[1].0);
        for bad_piece in [log[0].0, log[1].0] {
            assert!(log[2..].contains(&(bad_piece, Source::Server)), "{log:?}");
        }
    }

    #[test]
    fn failed_peer_backs_off_and_pieces_fall_back() {
        let mut s = sched(3, 1);
        server_takes(&mut s, Duration::from_secs(5));
        let hs = [holder("dead", &[0, 1, 2], 3)];
        let now = Instant::now();
        let a = s.next(&hs, now).unwrap();
        assert_eq!(a.source, peer("dead"));
        s.complete(a.piece, &a.source, Outcome::Failed, now)
            .unwrap();
        assert!(s.next_wakeup(now).is_some());
        // While it backs off, everything goes to the server.
        let b = s.next(&hs, now).unwrap();
        assert_eq!(b.source, Source::Server);
        assert_eq!(
            b.piece, a.piece,
            "the failed piece is retried first (rarity ties, order)"
        );
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut s = sched(1, 1);
        let r = run(&mut s, &[], |_, _| Outcome::Failed);
        assert_eq!(
            r,
            Err(PlanError::GaveUp {
                piece: 0,
                attempts: MAX_ATTEMPTS
            })
        );
    }

    #[test]
    fn parallel_slots_and_no_duplicate_pieces() {
        let mut s = sched(10, 4);
        let now = Instant::now();
        let mut seen = HashSet::new();
        while let Some(a) = s.next(&[], now) {
            assert!(seen.insert(a.piece));
        }
        assert_eq!(seen.len(), 4);
        assert_eq!(s.in_flight(), 4);
        // With a peer present, the server gets only a quarter of the slots.
        let mut s = sched(10, 4);
        let hs = [holder("a", &[9], 10)];
        server_takes(&mut s, Duration::from_secs(5));
        let mut by = Vec::new();
        while let Some(a) = s.next(&hs, now) {
            by.push(a);
        }
        // Piece 9 from the peer first, then 1 from the server; slots left idle for peers.
        assert_eq!(by[0].piece, 9);
        assert_eq!(by[0].source, peer("a"));
        assert_eq!(by.iter().filter(|a| a.source == Source::Server).count(), 1);
        assert_eq!(by.len(), 2);
    }

    #[test]
    fn peer_pieces_first_rarest_first() {
        let mut s = sched(4, 1);
        server_takes(&mut s, Duration::from_secs(5));
        let hs = [holder("a", &[1, 2], 4), holder("b", &[2], 4)];
        let a = s.next(&hs, Instant::now()).unwrap();
        // Piece 0 would come from the server; piece 1 (one holder) before piece 2 (two).
        assert_eq!((a.piece, a.source), (1, peer("a")));
    }

    #[test]
    fn orders_spread_agents_and_resume_skips_held_pieces() {
        assert!(piece_order(Some(1), 0).is_empty());
        let firsts: HashSet<usize> = (0..8)
            .map(|i| PlanConfig::new(&format!("peer{i}"), 4).order_seed)
            .map(|seed| piece_order(seed, 256)[0])
            .collect();
        assert!(firsts.len() >= 6, "{firsts:?}");
        let o = piece_order(Some(7), 100);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "a permutation");
        assert_eq!(o, piece_order(Some(7), 100), "deterministic");
        // Two agents' orders do not run in lockstep: few equal neighbours.
        let p = piece_order(Some(8), 100);
        let next_of =
            |v: &[usize], x: usize| v[(v.iter().position(|&y| y == x).unwrap() + 1) % 100];
        let same = (0..100)
            .filter(|&x| next_of(&o, x) == next_of(&p, x))
            .count();
        assert!(same < 10, "{same}");
        let mut have = Bitfield::empty(4);
        have.set(0, true);
        have.set(2, true);
        let mut cfg = PlanConfig::new("me", 1);
        cfg.order_seed = None;
        let mut s = Scheduler::new(cfg, vec![P; 4], have, CostModel::new(CostParams::default()));
        assert_eq!(s.bytes_done(), 2 * P);
        let log = run(&mut s, &[], |_, _| ok(1)).unwrap();
        let pieces: Vec<usize> = log.iter().map(|(p, _)| *p).collect();
        assert_eq!(pieces, vec![1, 3]);
    }

    #[test]
    fn unheld_pieces_are_split_among_fetching_agents() {
        let n = 64;
        let mut s = sched(n, 64);
        s.cfg.server_slots = n;
        server_takes(&mut s, Duration::from_secs(5));
        // "other" is fetching too (incomplete, holds piece 0 only).
        let hs = [holder("other", &[0], n)];
        let now = Instant::now();
        let mut mine = Vec::new();
        while let Some(a) = s.next(&hs, now) {
            mine.push(a);
        }
        // Piece 0 from the peer; of the rest, only this agent's share from the server.
        assert_eq!(mine[0].piece, 0);
        let server: Vec<usize> = mine[1..].iter().map(|a| a.piece).collect();
        assert!(mine[1..].iter().all(|a| a.source == Source::Server));
        let members = ["me", "other"];
        for p in &server {
            assert_eq!(members[(mix(*p as u64) % 2) as usize], "me", "piece {p}");
        }
        assert!(server.len() > 10 && server.len() < 50, "{}", server.len());
        // After the grace period, the other agent's pieces are taken too.
        let later = now + Duration::from_secs(61);
        let mut rest = 0;
        while s.next(&hs, later).is_some() {
            rest += 1;
        }
        assert_eq!(1 + server.len() + rest, n);
        // A complete holder is a seeder, not a fetcher: everything is this agent's share.
        let mut s = sched(n, 64);
        s.cfg.server_slots = n;
        let mut full = holder("seed", &[], n);
        full.have = Bitfield::full(n);
        server_takes(&mut s, Duration::from_millis(1));
        let mut count = 0;
        while s.next(&[holder("gone", &[], n)], now).is_some() {
            count += 1;
        }
        assert!(count < n, "an empty incomplete holder still takes a share");
        let mut s = sched(n, 64);
        s.cfg.server_slots = n;
        server_takes(&mut s, Duration::from_millis(1));
        let mut count = 0;
        // (The server measured fast here, so nothing is taken from the seeder either.)
        while s.next(&[full.clone()], now).is_some() {
            count += 1;
        }
        assert_eq!(count, n);
    }

    #[test]
    fn a_busy_cheapest_holder_is_waited_for() {
        let mut s = sched(4, 4);
        server_takes(&mut s, Duration::from_secs(5));
        let hs = [holder("a", &[0, 1, 2, 3], 4)];
        let now = Instant::now();
        let got: Vec<Assignment> = std::iter::from_fn(|| s.next(&hs, now)).collect();
        // Two slots on "a" (its cap), and the server is not used for what "a" holds.
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|a| a.source == peer("a")));
    }

    #[test]
    fn server_only_ignores_holders() {
        let mut cfg = PlanConfig::new("me", 2);
        cfg.server_only = true;
        let mut s = Scheduler::new(
            cfg,
            vec![P; 3],
            Bitfield::empty(3),
            CostModel::new(CostParams::default()),
        );
        server_takes(&mut s, Duration::from_secs(5));
        let hs = [holder("a", &[0, 1, 2], 3)];
        let log = run(&mut s, &hs, |_, _| ok(1)).unwrap();
        assert!(log.iter().all(|(_, src)| *src == Source::Server));
    }
}
