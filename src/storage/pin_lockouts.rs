//! PIN lockouts in the shared database (PROTOCOL.md 5 and 6): on a cluster a guesser spreading
//! wrong PINs over nodes meets one count. Failures within a window of [`WINDOW`] from the first
//! one are counted; the [`MAX_FAILURES`]th locks the PIN for [`LOCK_FOR`], right PIN or not; a
//! right PIN before that clears the count. The window is fixed from its first failure (the
//! in-memory single-node table, `b2bua::store_service::lockout`, slides it per failure): one
//! row per user, each change one statement, so concurrent failures on several nodes all count.
//! Times come in (`now`), as Unix milliseconds in the table.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;

use super::db::Db;

pub const WINDOW: Duration = Duration::from_secs(600);
pub const LOCK_FOR: Duration = Duration::from_secs(600);
pub const MAX_FAILURES: i64 = 5;

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The `pin_lockouts` table.
#[derive(Debug, Clone)]
pub struct PinLockouts {
    db: Db,
}

impl PinLockouts {
    pub fn new(db: Db) -> PinLockouts {
        PinLockouts { db }
    }

    /// The PIN of `user` is locked at `now`.
    pub async fn is_locked(&self, user: &str, now: SystemTime) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT locked_until FROM pin_lockouts WHERE username = $1")
            .bind(user)
            .fetch_optional(self.db.pool())
            .await?;
        Ok(match row {
            Some(r) => r.try_get::<i64, _>("locked_until")? > ms(now),
            None => false,
        })
    }

    /// Records a wrong PIN at `now`; the fifth within the window locks the PIN.
    pub async fn failure(&self, user: &str, now: SystemTime) -> Result<(), sqlx::Error> {
        let now_ms = ms(now);
        sqlx::query(
            "INSERT INTO pin_lockouts (username, failures, window_start, locked_until) \
             VALUES ($1, 1, $2, 0) ON CONFLICT (username) DO UPDATE SET \
             failures = CASE WHEN pin_lockouts.window_start <= $3 THEN 1 \
                             ELSE pin_lockouts.failures + 1 END, \
             window_start = CASE WHEN pin_lockouts.window_start <= $3 THEN $2 \
                                 ELSE pin_lockouts.window_start END",
        )
        .bind(user)
        .bind(now_ms)
        .bind(now_ms.saturating_sub(dur_ms(WINDOW)))
        .execute(self.db.pool())
        .await?;
        sqlx::query(
            "UPDATE pin_lockouts SET locked_until = $2, failures = 0, window_start = $3 \
             WHERE username = $1 AND failures >= $4",
        )
        .bind(user)
        .bind(now_ms.saturating_add(dur_ms(LOCK_FOR)))
        .bind(now_ms)
        .bind(MAX_FAILURES)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// A right PIN (while not locked): the count starts again.
    pub async fn success(&self, user: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM pin_lockouts WHERE username = $1 AND locked_until = 0")
            .bind(user)
            .execute(self.db.pool())
            .await?;
        sqlx::query("UPDATE pin_lockouts SET failures = 0 WHERE username = $1")
            .bind(user)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_000_000 + s)
    }

    #[tokio::test]
    async fn fifth_failure_in_the_window_locks_for_ten_minutes() {
        let (_dir, db) = crate::storage::test_db().await;
        let l = PinLockouts::new(db.clone());
        // A second handle stands for another node on the same database.
        let other = PinLockouts::new(db);
        for i in 0..4 {
            let node = if i % 2 == 0 { &l } else { &other };
            node.failure("1002", t(i * 10)).await.unwrap();
            assert!(!l.is_locked("1002", t(i * 10)).await.unwrap());
        }
        other.failure("1002", t(50)).await.unwrap();
        assert!(l.is_locked("1002", t(51)).await.unwrap(), "fifth locks");
        assert!(other.is_locked("1002", t(649)).await.unwrap());
        assert!(!l.is_locked("1002", t(650)).await.unwrap(), "10 minutes");
        assert!(!l.is_locked("1001", t(51)).await.unwrap(), "per user");
        // Failures older than the window start a new count.
        for i in 0..4 {
            l.failure("1003", t(i)).await.unwrap();
        }
        l.failure("1003", t(700)).await.unwrap();
        assert!(!l.is_locked("1003", t(701)).await.unwrap());
        // A right PIN clears the count.
        for i in 0..4 {
            l.failure("1004", t(i)).await.unwrap();
        }
        l.success("1004").await.unwrap();
        l.failure("1004", t(10)).await.unwrap();
        assert!(!l.is_locked("1004", t(11)).await.unwrap());
    }
}
