//! Node leases: which nodes of a cluster are alive and which dead ones to take over
//! (PROTOCOL.md 6 "Node failure"). Pure policy, sans-IO: the caller reads the `nodes` rows and
//! passes them in with `now` (its own monotonic clock); [`LeaseWatch::observe`] says how many
//! nodes are alive and which dead nodes to claim. The database work (renewing, claiming with a
//! conditional UPDATE, finishing stores) is `storage::nodes`, the timers `crate::cluster`.
//!
//! Every node bumps its row's `renewals` counter every `lease_secs / 3`. A watcher never
//! compares another machine's clock with its own: it notes, by its own clock, when it last
//! saw each node's counter move, and a node whose counter has not moved for that node's
//! `lease_secs` is dead. A node seen for the first time gets a full lease of benefit of the
//! doubt (a watcher that starts after a death takes over `lease_secs` later). Rows already
//! taken over are neither alive nor to be taken over again until they renew (a restarted
//! node's renewal clears `taken_over_by`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One row of the `nodes` table as the policy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub node_id: String,
    /// The renewal counter: moves at every renewal of a live node.
    pub renewals: i64,
    pub lease: Duration,
    /// Some node already finished this node's stores.
    pub taken_over: bool,
}

/// A dead node to claim, at the renewal count it died with (the claim is conditional on it,
/// so a node that renews meanwhile is not taken over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    pub node_id: String,
    pub renewals: i64,
}

/// What one observation decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Nodes with a live lease, this one included (`callvault_cluster_nodes_alive`).
    pub alive: usize,
    /// Dead nodes not yet taken over.
    pub dead: Vec<Dead>,
}

/// The watcher's memory: per node, the counter last seen and when (by our clock) it moved.
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    me: String,
    seen: HashMap<String, (i64, Instant)>,
}

impl LeaseWatch {
    pub fn new(me: impl Into<String>) -> LeaseWatch {
        LeaseWatch {
            me: me.into(),
            seen: HashMap::new(),
        }
    }

    /// Feeds the current rows; returns the verdict at `now`.
    pub fn observe(&mut self, rows: &[LeaseRow], now: Instant) -> Verdict {
        // Nodes whose rows are gone are forgotten (their ids may come back as new nodes).
        self.seen
            .retain(|id, _| rows.iter().any(|r| &r.node_id == id));
        let mut alive = 1; // this node, whatever its own row says
        let mut dead = Vec::new();
        for row in rows.iter().filter(|r| r.node_id != self.me) {
            let entry = self
                .seen
                .entry(row.node_id.clone())
                .or_insert((row.renewals, now));
            if entry.0 != row.renewals {
                *entry = (row.renewals, now);
            }
            let silent = now.saturating_duration_since(entry.1);
            if silent < row.lease {
                if !row.taken_over {
                    alive += 1;
                }
            } else if !row.taken_over {
                dead.push(Dead {
                    node_id: row.node_id.clone(),
                    renewals: row.renewals,
                });
            }
        }
        dead.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Verdict { alive, dead }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, renewals: i64, taken_over: bool) -> LeaseRow {
        LeaseRow {
            node_id: id.into(),
            renewals,
            lease: Duration::from_secs(10),
            taken_over,
        }
    }

    #[test]
    fn renewing_nodes_stay_alive_and_silent_ones_die_after_their_lease() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = LeaseWatch::new("a");
        // Benefit of the doubt on first sight, whatever the counter.
        let v = w.observe(&[row("a", 1, false), row("b", 7, false)], at(0));
        assert_eq!(
            v,
            Verdict {
                alive: 2,
                dead: vec![]
            }
        );
        // b renews every 3 s: alive at any time.
        for s in (3..30).step_by(3) {
            let v = w.observe(&[row("a", 1, false), row("b", 7 + s as i64, false)], at(s));
            assert_eq!(v.alive, 2, "at {s} s");
            assert!(v.dead.is_empty());
        }
        // b's counter stops at 34 (seen at 27 s): still alive 9 s later, dead at 10 s.
        let rows = [row("a", 1, false), row("b", 34, false)];
        assert_eq!(w.observe(&rows, at(36)).alive, 2);
        let v = w.observe(&rows, at(37));
        assert_eq!(v.alive, 1);
        assert_eq!(
            v.dead,
            vec![Dead {
                node_id: "b".into(),
                renewals: 34
            }]
        );
        // Once taken over it is neither alive nor dead again.
        let v = w.observe(&[row("a", 1, false), row("b", 34, true)], at(40));
        assert_eq!(
            v,
            Verdict {
                alive: 1,
                dead: vec![]
            }
        );
        // A restarted b renews: alive again, the silence clock restarts.
        let v = w.observe(&[row("a", 1, false), row("b", 35, false)], at(41));
        assert_eq!(
            v,
            Verdict {
                alive: 2,
                dead: vec![]
            }
        );
        assert!(w.observe(&[row("b", 35, false)], at(50)).dead.is_empty());
        assert_eq!(w.observe(&[row("b", 35, false)], at(51)).dead.len(), 1);
    }

    #[test]
    fn own_row_never_dies_and_a_late_watcher_waits_a_full_lease() {
        let t0 = Instant::now();
        let mut w = LeaseWatch::new("me");
        // Our own row may lag (renewal failed): we are alive anyway, never our own taker.
        let v = w.observe(&[row("me", 1, false)], t0 + Duration::from_secs(100));
        assert_eq!(
            v,
            Verdict {
                alive: 1,
                dead: vec![]
            }
        );
        // A watcher that starts after c died still waits c's lease from its first sight.
        let mut late = LeaseWatch::new("me");
        let c = [row("c", 3, false)];
        assert!(late.observe(&c, t0).dead.is_empty());
        assert!(late
            .observe(&c, t0 + Duration::from_secs(9))
            .dead
            .is_empty());
        assert_eq!(late.observe(&c, t0 + Duration::from_secs(10)).dead.len(), 1);
    }

    #[test]
    fn each_row_uses_its_own_lease_and_dead_nodes_are_sorted() {
        let t0 = Instant::now();
        let mut w = LeaseWatch::new("a");
        let mut short = row("z", 1, false);
        short.lease = Duration::from_secs(2);
        let rows = [row("y", 1, false), short.clone(), row("x", 1, false)];
        w.observe(&rows, t0);
        let v = w.observe(&rows, t0 + Duration::from_secs(2));
        assert_eq!(v.alive, 3);
        assert_eq!(
            v.dead
                .iter()
                .map(|d| d.node_id.as_str())
                .collect::<Vec<_>>(),
            ["z"]
        );
        let v = w.observe(&rows, t0 + Duration::from_secs(10));
        assert_eq!(v.alive, 1);
        assert_eq!(
            v.dead
                .iter()
                .map(|d| d.node_id.as_str())
                .collect::<Vec<_>>(),
            ["x", "y", "z"]
        );
    }
}
