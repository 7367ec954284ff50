//! SIP registrations in the shared database (PROTOCOL.md 6): every node writes the bindings
//! its REGISTERs create, refresh or remove, and reads another node's before it looks an AOR
//! up, so a phone registered through the front proxy on node 1 is reached from node 2 via its
//! recorded Path. Plain rows: the SIP meaning (parsing the contact and Path, the route set)
//! stays in `sip::registrar`; the edge (`crate::cluster`) converts.
//!
//! Only used on a shared (PostgreSQL) database; the embedded single node keeps its
//! registrations in memory as before.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::AnyRow;
use sqlx::Row;

use super::db::Db;

/// One binding as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationRow {
    pub aor: String,
    pub contact_uri: String,
    pub contact: String,
    /// Path values in order; empty when the REGISTER came straight from the phone.
    pub path: Vec<String>,
    pub transport: String,
    pub source: String,
    pub q: u16,
    pub call_id: String,
    pub cseq: u32,
    pub user_agent: Option<String>,
    /// The node that took the REGISTER.
    pub node: String,
    pub expires_at: SystemTime,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_row(r: &AnyRow) -> Result<RegistrationRow, sqlx::Error> {
    let path: String = r.try_get("path")?;
    let q: i64 = r.try_get("q")?;
    let cseq: i64 = r.try_get("cseq")?;
    let expires: i64 = r.try_get("expires_at")?;
    Ok(RegistrationRow {
        aor: r.try_get("aor")?,
        contact_uri: r.try_get("contact_uri")?,
        contact: r.try_get("contact")?,
        path: path
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        transport: r.try_get("transport")?,
        source: r.try_get("source")?,
        q: u16::try_from(q).unwrap_or(1000),
        call_id: r.try_get("call_id")?,
        cseq: u32::try_from(cseq).unwrap_or(0),
        user_agent: r.try_get("user_agent")?,
        node: r.try_get("node")?,
        expires_at: UNIX_EPOCH + Duration::from_millis(u64::try_from(expires).unwrap_or(0)),
    })
}

const COLUMNS: &str = "aor, contact_uri, contact, path, transport, source, q, call_id, cseq, \
                       user_agent, node, expires_at";

/// Registration rows over the metadata database.
#[derive(Debug, Clone)]
pub struct Registrations {
    db: Db,
}

impl Registrations {
    pub fn new(db: Db) -> Registrations {
        Registrations { db }
    }

    /// Writes `rows` (created or refreshed bindings), each replacing the row of the same AOR
    /// and contact whichever node wrote it.
    pub async fn upsert(
        &self,
        rows: &[RegistrationRow],
        now: SystemTime,
    ) -> Result<(), sqlx::Error> {
        for r in rows {
            sqlx::query(
                "INSERT INTO registrations (aor, contact_uri, contact, path, transport, source, q, \
                 call_id, cseq, user_agent, node, expires_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (aor, contact_uri) DO UPDATE SET contact = excluded.contact, \
                 path = excluded.path, transport = excluded.transport, source = excluded.source, \
                 q = excluded.q, call_id = excluded.call_id, cseq = excluded.cseq, \
                 user_agent = excluded.user_agent, node = excluded.node, \
                 expires_at = excluded.expires_at, updated_at = excluded.updated_at",
            )
            .bind(&r.aor)
            .bind(&r.contact_uri)
            .bind(&r.contact)
            .bind(r.path.join("\n"))
            .bind(&r.transport)
            .bind(&r.source)
            .bind(i64::from(r.q))
            .bind(&r.call_id)
            .bind(i64::from(r.cseq))
            .bind(r.user_agent.clone())
            .bind(&r.node)
            .bind(ms(r.expires_at))
            .bind(ms(now))
            .execute(self.db.pool())
            .await?;
        }
        Ok(())
    }

    /// Removes the bindings of `aor` with these contact URIs.
    pub async fn remove(&self, aor: &str, contact_uris: &[String]) -> Result<(), sqlx::Error> {
        for uri in contact_uris {
            sqlx::query("DELETE FROM registrations WHERE aor = $1 AND contact_uri = $2")
                .bind(aor)
                .bind(uri)
                .execute(self.db.pool())
                .await?;
        }
        Ok(())
    }

    /// Removes every binding of `aor` (`Contact: *`).
    pub async fn remove_aor(&self, aor: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM registrations WHERE aor = $1")
            .bind(aor)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// Live bindings of `aor` written by nodes other than `except` (None: every node).
    pub async fn lookup(
        &self,
        aor: &str,
        except: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<RegistrationRow>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM registrations WHERE aor = $1 AND expires_at > $2 \
             AND node <> $3 ORDER BY contact_uri"
        ))
        .bind(aor)
        .bind(ms(now))
        .bind(except.unwrap_or(""))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Every live binding of every node (cluster-wide listing).
    pub async fn list(&self, now: SystemTime) -> Result<Vec<RegistrationRow>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM registrations WHERE expires_at > $1 ORDER BY aor, contact_uri"
        ))
        .bind(ms(now))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Deletes expired rows; returns how many.
    pub async fn purge_expired(&self, now: SystemTime) -> Result<u64, sqlx::Error> {
        let done = sqlx::query("DELETE FROM registrations WHERE expires_at <= $1")
            .bind(ms(now))
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
