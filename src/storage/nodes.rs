//! The cluster's shared rows (PROTOCOL.md 6): node leases, the takeover claim, secrets every
//! node must agree on, and the registrations a dead node leaves behind. Database only; the
//! policy that decides who is dead is [`super::lease`], the timers are `crate::cluster`.
//!
//! Exactly one survivor takes a dead node over: [`Nodes::claim`] is a conditional UPDATE
//! (`taken_over_by IS NULL` and the renewal count the watcher saw), so concurrent watchers
//! race on one row and one wins; a node that renewed meanwhile is not claimed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sqlx::Row;

use super::db::Db;
use super::lease::{Dead, LeaseRow};

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// This node as its lease row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub http_advertise: String,
    pub lease: Duration,
    /// When this incarnation started (node's clock).
    pub started_at: SystemTime,
}

/// Node rows over the metadata database.
#[derive(Debug, Clone)]
pub struct Nodes {
    db: Db,
}

impl Nodes {
    pub fn new(db: Db) -> Nodes {
        Nodes { db }
    }

    /// Renews (or creates) `me`'s lease: bumps its renewal counter and clears a takeover mark
    /// left from a previous incarnation.
    pub async fn renew(&self, me: &NodeInfo, now: SystemTime) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO nodes (node_id, http_advertise, lease_secs, renewals, started_at, \
             renewed_at, taken_over_by, taken_over_at) VALUES ($1, $2, $3, 1, $4, $5, NULL, NULL) \
             ON CONFLICT (node_id) DO UPDATE SET http_advertise = excluded.http_advertise, \
             lease_secs = excluded.lease_secs, renewals = nodes.renewals + 1, \
             started_at = excluded.started_at, renewed_at = excluded.renewed_at, \
             taken_over_by = NULL, taken_over_at = NULL",
        )
        .bind(&me.node_id)
        .bind(&me.http_advertise)
        .bind(i64::try_from(me.lease.as_secs()).unwrap_or(i64::MAX))
        .bind(ms(me.started_at))
        .bind(ms(now))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Every node's lease row.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT node_id, renewals, lease_secs, taken_over_by FROM nodes ORDER BY node_id",
        )
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let lease: i64 = r.try_get("lease_secs")?;
                let taken: Option<String> = r.try_get("taken_over_by")?;
                Ok(LeaseRow {
                    node_id: r.try_get("node_id")?,
                    renewals: r.try_get("renewals")?,
                    lease: Duration::from_secs(u64::try_from(lease).unwrap_or(0)),
                    taken_over: taken.is_some(),
                })
            })
            .collect()
    }

    /// Claims dead node `dead` for `me`. True for exactly one claimant; false when another
    /// node claimed it first or it renewed since it was seen dead.
    pub async fn claim(&self, dead: &Dead, me: &str, now: SystemTime) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE nodes SET taken_over_by = $2, taken_over_at = $3 \
             WHERE node_id = $1 AND renewals = $4 AND taken_over_by IS NULL",
        )
        .bind(&dead.node_id)
        .bind(me)
        .bind(ms(now))
        .bind(dead.renewals)
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Who took `node` over, if anyone.
    pub async fn taken_over_by(&self, node: &str) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query("SELECT taken_over_by FROM nodes WHERE node_id = $1")
            .bind(node)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(match row {
            Some(r) => r.try_get("taken_over_by")?,
            None => None,
        })
    }

    /// Drops the registrations only `node` could reach: those that came straight from the
    /// phone (no Path), whose NAT binding or connection ends at the dead node. Bindings with
    /// a Path are reached through the front proxy from any node and stay.
    pub async fn drop_unreachable_registrations(&self, node: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM registrations WHERE node = $1 AND path = ''")
            .bind(node)
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected())
    }
}

impl Nodes {
    /// Ends the dead `node`'s share uploads in flight: each journal row goes and its
    /// reservation comes back, in one transaction per upload (a row already gone is skipped,
    /// so nothing is released twice). Returns how many.
    pub async fn release_share_uploads(&self, node: &str) -> Result<u64, sqlx::Error> {
        let rows = sqlx::query("SELECT id, owner, reserved FROM share_uploads WHERE node = $1")
            .bind(node)
            .fetch_all(self.db.pool())
            .await?;
        let mut n = 0;
        for row in rows {
            let id: String = row.try_get("id")?;
            let owner: String = row.try_get("owner")?;
            let reserved: i64 = row.try_get("reserved")?;
            let mut tx = self.db.pool().begin().await?;
            let gone = sqlx::query("DELETE FROM share_uploads WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            if gone.rows_affected() == 1 {
                sqlx::query(
                    "UPDATE accounts SET reserved_bytes = CASE WHEN reserved_bytes >= $2 \
                     THEN reserved_bytes - $2 ELSE 0 END WHERE username = $1",
                )
                .bind(&owner)
                .bind(reserved)
                .execute(&mut *tx)
                .await?;
                n += 1;
            }
            tx.commit().await?;
        }
        Ok(n)
    }
}

/// The 32-byte secret `name` every node shares, created by whichever node asks first (a
/// concurrent first use keeps one: `ON CONFLICT DO NOTHING`, then read back).
pub async fn shared_secret(db: &Db, name: &str) -> Result<[u8; 32], sqlx::Error> {
    let mut fresh = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    sqlx::query(
        "INSERT INTO cluster_secrets (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(hex::encode(fresh))
    .execute(db.pool())
    .await?;
    let hex_secret: String = sqlx::query("SELECT secret FROM cluster_secrets WHERE name = $1")
        .bind(name)
        .fetch_one(db.pool())
        .await?
        .try_get("secret")?;
    let mut out = [0u8; 32];
    match hex::decode(&hex_secret) {
        Ok(b) if b.len() == 32 => out.copy_from_slice(&b),
        _ => {
            return Err(sqlx::Error::Decode(
                format!("cluster secret {name} is not 32 bytes of hex").into(),
            ))
        }
    }
    Ok(out)
}
