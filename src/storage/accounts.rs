//! Subscriber accounts: SIP credentials, storage PIN, quota and its use.
//!
//! Argon2 work runs on a few threads of its own (bounded: [`HASHING_SLOTS`]) so a PIN check
//! never stalls the SIP event loop and a password flood cannot take memory without bound.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, Params};
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::db::Db;
use crate::config::PromptFormat;
use crate::digest::{self, Algorithm};
use crate::storage::threshold::{Threshold, ThresholdLimits};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account {0} already exists")]
    Exists(String),
    #[error("no account {0}")]
    NotFound(String),
    #[error(
        "invalid user name {0:?}: use 1-64 of A-Z a-z 0-9 . _ + -, not starting with st_ or play-"
    )]
    InvalidUser(String),
    #[error("invalid PIN: 1 to 32 digits")]
    InvalidPin,
    #[error("invalid password: must not be empty")]
    InvalidPassword,
    #[error("invalid quota: at most {max} bytes", max = i64::MAX)]
    InvalidQuota,
    #[error("account {user}: stored {field} is invalid")]
    Corrupt { user: String, field: &'static str },
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("metadata database: {0}")]
    Db(#[from] sqlx::Error),
}

pub struct Account {
    pub user: String,
    /// Realm the HA1 values belong to (sip.domain when they were computed).
    pub realm: String,
    pub quota_bytes: u64,
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    /// Per-account override of `store.prompt_format`: "json" or "text".
    pub prompt_format: Option<String>,
    /// Per-account default threshold (between the server's and a request's).
    pub threshold: Option<Threshold>,
    /// Per-account cap on byte thresholds (tightens the server's `store.threshold_max_bytes`).
    pub threshold_max_bytes: Option<u64>,
    /// HA1 = H(user:realm:password) per algorithm. Digest verification needs exactly this
    /// value (the password itself is never stored), so both are computed whenever the password
    /// is set. It is password-equivalent for this realm: treat it as a secret.
    pub ha1_md5: String,
    pub ha1_sha256: String,
    /// Argon2 PHC string, for HTTP Basic.
    pub password_hash: String,
    /// Argon2 PHC string of the storage PIN.
    pub pin_hash: String,
}

// Hand-written so secrets (HA1 is password-equivalent) never end up in logs.
impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("user", &self.user)
            .field("realm", &self.realm)
            .field("quota_bytes", &self.quota_bytes)
            .field("used_bytes", &self.used_bytes)
            .field("reserved_bytes", &self.reserved_bytes)
            .field("prompt_format", &self.prompt_format)
            .finish_non_exhaustive()
    }
}

/// The JSON of `GET /v1/accounts/{user}` and `callvault account show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountView {
    pub user: String,
    pub quota_bytes: u64,
    pub used_bytes: u64,
    pub reserved_bytes: u64,
    pub free_bytes: u64,
}

impl Account {
    /// quota − used − reserved, never below zero (a lowered quota can undercut usage).
    pub fn free_bytes(&self) -> u64 {
        self.quota_bytes
            .saturating_sub(self.used_bytes)
            .saturating_sub(self.reserved_bytes)
    }

    /// The server's threshold limits, tightened by this account's own.
    pub fn threshold_limits(&self, server: &ThresholdLimits) -> ThresholdLimits {
        server.tighten(&ThresholdLimits {
            max_bytes: self.threshold_max_bytes,
            ..ThresholdLimits::default()
        })
    }

    pub fn view(&self) -> AccountView {
        AccountView {
            user: self.user.clone(),
            quota_bytes: self.quota_bytes,
            used_bytes: self.used_bytes,
            reserved_bytes: self.reserved_bytes,
            free_bytes: self.free_bytes(),
        }
    }

    /// The stored HA1 for `alg`, if it was computed for `realm`.
    pub fn ha1_for(&self, realm: &str, alg: Algorithm) -> Option<&str> {
        if self.realm != realm {
            return None;
        }
        Some(match alg {
            Algorithm::Md5 => &self.ha1_md5,
            Algorithm::Sha256 => &self.ha1_sha256,
        })
    }

    /// The account's prompt format override, parsed.
    pub fn prompt_format_override(&self) -> Option<PromptFormat> {
        self.prompt_format.as_deref().and_then(|s| s.parse().ok())
    }
}

/// Names double as SIP user parts and HTTP path segments, and must not collide with the
/// `st_…` store and `play-…` play URIs.
pub fn validate_user(user: &str) -> Result<(), AccountError> {
    let ok = !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        && !user.starts_with("st_")
        && !user.starts_with("play-")
        && !user.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AccountError::InvalidUser(user.to_string()))
    }
}

/// PINs are typed on keypads (`*7` PIN `#`), so digits only.
pub fn validate_pin(pin: &str) -> Result<(), AccountError> {
    if (1..=32).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(AccountError::InvalidPin)
    }
}

fn quota_i64(q: u64) -> Result<i64, AccountError> {
    i64::try_from(q).map_err(|_| AccountError::InvalidQuota)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const COLUMNS: &str =
    "username, realm, quota_bytes, used_bytes, reserved_bytes, prompt_format, threshold, \
                       threshold_max_bytes, ha1_md5, ha1_sha256, password_hash, pin_hash";

fn from_row(row: &AnyRow) -> Result<Account, AccountError> {
    let user: String = row.try_get("username")?;
    let count = |field: &'static str| -> Result<u64, AccountError> {
        let v: i64 = row.try_get(field)?;
        u64::try_from(v).map_err(|_| AccountError::Corrupt {
            user: user.clone(),
            field,
        })
    };
    Ok(Account {
        quota_bytes: count("quota_bytes")?,
        used_bytes: count("used_bytes")?,
        reserved_bytes: count("reserved_bytes")?,
        realm: row.try_get("realm")?,
        prompt_format: row.try_get("prompt_format")?,
        threshold: {
            let t: Option<String> = row.try_get("threshold")?;
            // An unreadable value falls back to the server default rather than locking the
            // account out of storage.
            t.and_then(|t| t.parse().ok())
        },
        threshold_max_bytes: {
            let n: Option<i64> = row.try_get("threshold_max_bytes")?;
            n.and_then(|n| u64::try_from(n).ok())
        },
        ha1_md5: row.try_get("ha1_md5")?,
        ha1_sha256: row.try_get("ha1_sha256")?,
        password_hash: row.try_get("password_hash")?,
        pin_hash: row.try_get("pin_hash")?,
        user,
    })
}

/// Argon2 runs at once, all callers together. Each holds 8 MiB (see [`default_params`]), so
/// this bounds what password checks can take however many arrive (issue 10, finding 4);
/// about 100 checks per second per slot is plenty for logins.
pub const HASHING_SLOTS: usize = 2;

/// The right to run one Argon2 computation (see [`HASHING_SLOTS`]).
#[derive(Debug)]
pub struct HashSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Account operations over the metadata database. `realm` is `sip.domain`.
#[derive(Debug, Clone)]
pub struct Accounts {
    db: Db,
    realm: String,
    params: Params,
    hashing: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Accounts {
    pub fn new(db: Db, realm: impl Into<String>) -> Accounts {
        Accounts {
            db,
            realm: realm.into(),
            params: default_params(),
            hashing: std::sync::Arc::new(tokio::sync::Semaphore::new(HASHING_SLOTS)),
        }
    }

    /// Overrides the Argon2 cost for new hashes (tests use a cheap one); existing hashes keep
    /// the parameters recorded in their PHC strings.
    pub fn with_argon2_params(mut self, params: Params) -> Accounts {
        self.params = params;
        self
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// A hashing slot if one is free right now: HTTP Basic sheds load (503) instead of
    /// queueing behind a flood.
    pub fn try_hashing_slot(&self) -> Option<HashSlot> {
        self.hashing
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| HashSlot { _permit: p })
    }

    /// Waits for a hashing slot.
    async fn hashing_slot(&self) -> Result<HashSlot, AccountError> {
        self.hashing
            .clone()
            .acquire_owned()
            .await
            .map(|p| HashSlot { _permit: p })
            .map_err(|e| AccountError::Hash(e.to_string()))
    }

    async fn hash(&self, secret: &str) -> Result<String, AccountError> {
        let params = self.params.clone();
        let secret = secret.to_string();
        let slot = self.hashing_slot().await?;
        run_blocking(move || {
            let _slot = slot;
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password(secret.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| AccountError::Hash(e.to_string()))
        })
        .await
    }

    fn ha1s(&self, user: &str, password: &str) -> (String, String) {
        (
            digest::ha1(Algorithm::Md5, user, &self.realm, password),
            digest::ha1(Algorithm::Sha256, user, &self.realm, password),
        )
    }

    pub async fn add(
        &self,
        user: &str,
        password: &str,
        pin: &str,
        quota_bytes: u64,
    ) -> Result<Account, AccountError> {
        validate_user(user)?;
        validate_pin(pin)?;
        if password.is_empty() {
            return Err(AccountError::InvalidPassword);
        }
        let quota = quota_i64(quota_bytes)?;
        let password_hash = self.hash(password).await?;
        let pin_hash = self.hash(pin).await?;
        let (ha1_md5, ha1_sha256) = self.ha1s(user, password);
        let now = unix_now();
        let res = sqlx::query(
            "INSERT INTO accounts (username, realm, quota_bytes, used_bytes, reserved_bytes, prompt_format, \
             ha1_md5, ha1_sha256, password_hash, pin_hash, created_at, updated_at) \
             VALUES ($1, $2, $3, 0, 0, NULL, $4, $5, $6, $7, $8, $8)",
        )
        .bind(user)
        .bind(&self.realm)
        .bind(quota)
        .bind(&ha1_md5)
        .bind(&ha1_sha256)
        .bind(&password_hash)
        .bind(&pin_hash)
        .bind(now)
        .execute(self.db.pool())
        .await;
        match res {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(AccountError::Exists(user.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Account {
            user: user.to_string(),
            realm: self.realm.clone(),
            quota_bytes,
            used_bytes: 0,
            reserved_bytes: 0,
            prompt_format: None,
            threshold: None,
            threshold_max_bytes: None,
            ha1_md5,
            ha1_sha256,
            password_hash,
            pin_hash,
        })
    }

    pub async fn get(&self, user: &str) -> Result<Option<Account>, AccountError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM accounts WHERE username = $1"
        ))
        .bind(user)
        .fetch_optional(self.db.pool())
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Like [`get`](Self::get) but a missing account is an error.
    pub async fn require(&self, user: &str) -> Result<Account, AccountError> {
        self.get(user)
            .await?
            .ok_or_else(|| AccountError::NotFound(user.to_string()))
    }

    pub async fn list(&self) -> Result<Vec<Account>, AccountError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM accounts ORDER BY username"))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The stored HA1 for digest, None when there is no such user or its HA1 was computed for
    /// another realm (sip.domain changed: the password must be set again).
    pub async fn ha1(&self, user: &str, alg: Algorithm) -> Result<Option<String>, AccountError> {
        let Some(acc) = self.get(user).await? else {
            return Ok(None);
        };
        let h = acc.ha1_for(&self.realm, alg).map(str::to_string);
        if h.is_none() {
            tracing::warn!(user, stored_realm = %acc.realm, realm = %self.realm,
                "account's digest secrets belong to another realm; set its password again");
        }
        Ok(h)
    }

    /// Runs an UPDATE that targets one account; zero rows means the account does not exist.
    async fn update_one<'q>(
        &self,
        user: &str,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<(), AccountError> {
        let done = query.execute(self.db.pool()).await?;
        if done.rows_affected() == 0 {
            return Err(AccountError::NotFound(user.to_string()));
        }
        Ok(())
    }

    pub async fn set_pin(&self, user: &str, pin: &str) -> Result<(), AccountError> {
        validate_pin(pin)?;
        let pin_hash = self.hash(pin).await?;
        let q =
            sqlx::query("UPDATE accounts SET pin_hash = $2, updated_at = $3 WHERE username = $1")
                .bind(user)
                .bind(pin_hash)
                .bind(unix_now());
        self.update_one(user, q).await
    }

    pub async fn set_quota(&self, user: &str, quota_bytes: u64) -> Result<(), AccountError> {
        let q = sqlx::query(
            "UPDATE accounts SET quota_bytes = $2, updated_at = $3 WHERE username = $1",
        )
        .bind(user)
        .bind(quota_i64(quota_bytes)?)
        .bind(unix_now());
        self.update_one(user, q).await
    }

    /// Sets the password, recomputing both HA1 values for the current realm.
    pub async fn set_password(&self, user: &str, password: &str) -> Result<(), AccountError> {
        if password.is_empty() {
            return Err(AccountError::InvalidPassword);
        }
        let password_hash = self.hash(password).await?;
        let (ha1_md5, ha1_sha256) = self.ha1s(user, password);
        let q = sqlx::query(
            "UPDATE accounts SET password_hash = $2, ha1_md5 = $3, ha1_sha256 = $4, realm = $5, updated_at = $6 \
             WHERE username = $1",
        )
        .bind(user)
        .bind(password_hash)
        .bind(ha1_md5)
        .bind(ha1_sha256)
        .bind(self.realm.clone())
        .bind(unix_now());
        self.update_one(user, q).await
    }

    /// None returns the account to the server-wide `store.prompt_format`.
    pub async fn set_prompt_format(
        &self,
        user: &str,
        format: Option<PromptFormat>,
    ) -> Result<(), AccountError> {
        let q = sqlx::query(
            "UPDATE accounts SET prompt_format = $2, updated_at = $3 WHERE username = $1",
        )
        .bind(user)
        .bind(format.map(|f| f.as_str().to_string()))
        .bind(unix_now());
        self.update_one(user, q).await
    }

    /// None returns the account to the server-wide `store.threshold_percent`.
    pub async fn set_threshold(
        &self,
        user: &str,
        threshold: Option<Threshold>,
    ) -> Result<(), AccountError> {
        let q =
            sqlx::query("UPDATE accounts SET threshold = $2, updated_at = $3 WHERE username = $1")
                .bind(user)
                .bind(threshold.map(|t| t.to_string()))
                .bind(unix_now());
        self.update_one(user, q).await
    }

    /// None removes the account's own threshold limit (the server's limits stay).
    pub async fn set_threshold_max_bytes(
        &self,
        user: &str,
        max: Option<u64>,
    ) -> Result<(), AccountError> {
        let max = max.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let q = sqlx::query(
            "UPDATE accounts SET threshold_max_bytes = $2, updated_at = $3 WHERE username = $1",
        )
        .bind(user)
        .bind(max)
        .bind(unix_now());
        self.update_one(user, q).await
    }

    pub async fn remove(&self, user: &str) -> Result<(), AccountError> {
        let q = sqlx::query("DELETE FROM accounts WHERE username = $1").bind(user);
        self.update_one(user, q).await
    }

    /// Argon2 check of the storage PIN. An unknown user is `false` after the same work, so
    /// timing does not tell users apart. Lockout is the caller's business (PROTOCOL 5).
    pub async fn verify_pin(&self, user: &str, pin: &str) -> Result<bool, AccountError> {
        let hash = self.get(user).await?.map(|a| a.pin_hash);
        let slot = self.hashing_slot().await?;
        verify_secret(slot, hash, pin.to_string(), self.params.clone()).await
    }

    /// Argon2 check of the SIP password (HTTP Basic).
    pub async fn verify_password(&self, user: &str, password: &str) -> Result<bool, AccountError> {
        let hash = self.password_hash(user).await?;
        let slot = self.hashing_slot().await?;
        self.verify_password_hash(slot, hash, password).await
    }

    /// The stored Argon2 PHC string of `user`'s password (None: no such user).
    pub async fn password_hash(&self, user: &str) -> Result<Option<String>, AccountError> {
        Ok(self.get(user).await?.map(|a| a.password_hash))
    }

    /// Argon2 check of `password` against `hash` from [`Accounts::password_hash`] in `slot`;
    /// `None` (unknown user) costs the same and is false.
    pub async fn verify_password_hash(
        &self,
        slot: HashSlot,
        hash: Option<String>,
        password: &str,
    ) -> Result<bool, AccountError> {
        verify_secret(slot, hash, password.to_string(), self.params.clone()).await
    }

    /// Reserves `bytes` against the free space, atomically. False = not enough free space.
    pub async fn reserve(&self, user: &str, bytes: u64) -> Result<bool, AccountError> {
        let n = quota_i64(bytes)?;
        let done = sqlx::query(
            "UPDATE accounts SET reserved_bytes = reserved_bytes + $2, updated_at = $3 \
             WHERE username = $1 AND quota_bytes - used_bytes - reserved_bytes >= $2",
        )
        .bind(user)
        .bind(n)
        .bind(unix_now())
        .execute(self.db.pool())
        .await?;
        if done.rows_affected() == 1 {
            return Ok(true);
        }
        self.require(user).await?;
        Ok(false)
    }

    /// Ends a reservation: `reserved` comes off the reservation, `used` is added to the use,
    /// in one statement so free space is never counted twice.
    pub async fn settle(&self, user: &str, reserved: u64, used: u64) -> Result<(), AccountError> {
        let q = sqlx::query(
            "UPDATE accounts SET \
             reserved_bytes = CASE WHEN reserved_bytes >= $2 THEN reserved_bytes - $2 ELSE 0 END, \
             used_bytes = used_bytes + $3, updated_at = $4 WHERE username = $1",
        )
        .bind(user)
        .bind(quota_i64(reserved)?)
        .bind(quota_i64(used)?)
        .bind(unix_now());
        self.update_one(user, q).await
    }

    /// Gives back space of deleted data.
    pub async fn release_used(&self, user: &str, bytes: u64) -> Result<(), AccountError> {
        let q = sqlx::query(
            "UPDATE accounts SET used_bytes = CASE WHEN used_bytes >= $2 THEN used_bytes - $2 ELSE 0 END, \
             updated_at = $3 WHERE username = $1",
        )
        .bind(user)
        .bind(quota_i64(bytes)?)
        .bind(unix_now());
        self.update_one(user, q).await
    }
}

/// Argon2id with 8 MiB and 2 passes. Modest on purpose: PINs are a few digits and the HA1
/// kept for digest is only as strong as MD5 anyway, so more cost would only slow logins.
fn default_params() -> Params {
    Params::new(8 * 1024, 2, 1, None).unwrap_or_default()
}

/// One piece of Argon2 work for [`hashing_threads`].
type HashJob = Box<dyn FnOnce() + Send>;

/// The threads Argon2 runs on: [`HASHING_SLOTS`] of them, for the whole process. Not tokio's
/// blocking pool: glibc gives each allocating thread an arena of its own and keeps freed
/// 8 MiB blocks there, so hashing spread over hundreds of blocking threads pins hundreds of
/// times 8 MiB (issue 10, finding 4: measured 93 MB after a dozen checks). Fed only by holders
/// of a [`HashSlot`], so the queue is never longer than the slots.
fn hashing_threads(
) -> Result<&'static std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>, AccountError> {
    static POOL: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..HASHING_SLOTS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || loop {
                    // Poisoning cannot leave the receiver inconsistent: take it anyway.
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => {
                            job();
                            give_back_freed_memory();
                        }
                        Err(_) => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-hashing thread");
                return None;
            }
        }
        Some(std::sync::Mutex::new(tx))
    })
    .as_ref()
    .ok_or_else(|| AccountError::Hash("no password-hashing thread".into()))
}

/// Returns the freed Argon2 blocks to the system. glibc keeps a freed 8 MiB block in the
/// thread's arena for reuse, and interleaved small allocations fragment it: measured 40-50 MB
/// held per hashing thread after a flood without this. One trim per hash costs far less than
/// the hash.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: HashJob = Box::new(move || {
        // The waiter may be gone (client hung up): the result is simply dropped.
        let _ = tx.send(f());
    });
    hashing_threads()?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| AccountError::Hash("password-hashing threads stopped".into()))?;
    rx.await
        .map_err(|_| AccountError::Hash("hashing task failed".into()))?
}

async fn verify_secret(
    slot: HashSlot,
    hash: Option<String>,
    secret: String,
    params: Params,
) -> Result<bool, AccountError> {
    run_blocking(move || {
        // Held until the computation ends, on the blocking thread.
        let _slot = slot;
        let Some(hash) = hash else {
            // Unknown user: spend the same effort on a throwaway hash.
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            let _ = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password(secret.as_bytes(), &salt);
            return Ok(false);
        };
        let parsed = PasswordHash::new(&hash).map_err(|e| AccountError::Hash(e.to_string()))?;
        // Argon2's verify compares in constant time.
        Ok(Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn accounts() -> (crate::storage::TestDb, Accounts) {
        let (dir, db) = crate::storage::test_db().await;
        // Cheap Argon2 keeps debug-build tests fast; the code path is the same.
        let params = Params::new(256, 1, 1, None).unwrap();
        (
            dir,
            Accounts::new(db, "example.com").with_argon2_params(params),
        )
    }

    #[tokio::test]
    async fn add_show_list_remove() {
        let (_dir, accs) = accounts().await;
        let a = accs
            .add("1001", "secret", "4321", 52_428_800)
            .await
            .unwrap();
        assert_eq!(a.free_bytes(), 52_428_800);
        accs.add("1002", "pw2", "1111", 1000).await.unwrap();

        let got = accs.get("1001").await.unwrap().unwrap();
        assert_eq!(got.quota_bytes, 52_428_800);
        assert_eq!(
            got.ha1_md5,
            digest::ha1(Algorithm::Md5, "1001", "example.com", "secret")
        );
        assert_eq!(
            got.ha1_sha256,
            digest::ha1(Algorithm::Sha256, "1001", "example.com", "secret")
        );
        assert!(got.password_hash.starts_with("$argon2id$"));
        assert_ne!(got.pin_hash, got.password_hash);
        let json = serde_json::to_value(got.view()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"user":"1001","quota_bytes":52428800,"used_bytes":0,"reserved_bytes":0,"free_bytes":52428800})
        );
        // Debug output must not leak secrets.
        let dbg = format!("{got:?}");
        assert!(!dbg.contains(&got.ha1_md5) && !dbg.contains("argon2"));

        let names: Vec<String> = accs
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.user)
            .collect();
        assert_eq!(names, ["1001", "1002"]);

        accs.remove("1001").await.unwrap();
        assert!(accs.get("1001").await.unwrap().is_none());
        assert!(matches!(
            accs.remove("1001").await,
            Err(AccountError::NotFound(_))
        ));
        assert!(matches!(
            accs.require("1001").await,
            Err(AccountError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn duplicate_and_invalid_input() {
        let (_dir, accs) = accounts().await;
        accs.add("alice", "pw", "1234", 10).await.unwrap();
        assert!(matches!(
            accs.add("alice", "x", "9", 10).await,
            Err(AccountError::Exists(_))
        ));
        assert!(matches!(
            accs.add("st_x", "pw", "1", 1).await,
            Err(AccountError::InvalidUser(_))
        ));
        assert!(matches!(
            accs.add("play-1", "pw", "1", 1).await,
            Err(AccountError::InvalidUser(_))
        ));
        assert!(matches!(
            accs.add("a b", "pw", "1", 1).await,
            Err(AccountError::InvalidUser(_))
        ));
        assert!(matches!(
            accs.add("", "pw", "1", 1).await,
            Err(AccountError::InvalidUser(_))
        ));
        assert!(matches!(
            accs.add("bob", "pw", "12a4", 1).await,
            Err(AccountError::InvalidPin)
        ));
        assert!(matches!(
            accs.add("bob", "pw", "", 1).await,
            Err(AccountError::InvalidPin)
        ));
        assert!(matches!(
            accs.add("bob", "", "1", 1).await,
            Err(AccountError::InvalidPassword)
        ));
        assert!(matches!(
            accs.add("bob", "pw", "1", u64::MAX).await,
            Err(AccountError::InvalidQuota)
        ));
        assert!(accs.get("bob").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn pin_and_password_verification() {
        let (_dir, accs) = accounts().await;
        accs.add("1002", "secret", "4321", 100).await.unwrap();
        assert!(accs.verify_pin("1002", "4321").await.unwrap());
        assert!(!accs.verify_pin("1002", "4322").await.unwrap());
        assert!(!accs.verify_pin("nobody", "4321").await.unwrap());
        assert!(accs.verify_password("1002", "secret").await.unwrap());
        assert!(!accs.verify_password("1002", "Secret").await.unwrap());

        accs.set_pin("1002", "9876").await.unwrap();
        assert!(!accs.verify_pin("1002", "4321").await.unwrap());
        assert!(accs.verify_pin("1002", "9876").await.unwrap());
        assert!(matches!(
            accs.set_pin("1002", "98x").await,
            Err(AccountError::InvalidPin)
        ));
        assert!(matches!(
            accs.set_pin("ghost", "1").await,
            Err(AccountError::NotFound(_))
        ));

        accs.set_password("1002", "new").await.unwrap();
        assert!(accs.verify_password("1002", "new").await.unwrap());
        assert_eq!(
            accs.ha1("1002", Algorithm::Sha256).await.unwrap().unwrap(),
            digest::ha1(Algorithm::Sha256, "1002", "example.com", "new")
        );
        assert!(accs.ha1("ghost", Algorithm::Md5).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn realm_change_hides_ha1_until_password_is_set() {
        let (_dir, accs) = accounts().await;
        accs.add("1001", "secret", "1", 1).await.unwrap();
        let moved =
            Accounts::new(accs.db.clone(), "other.org").with_argon2_params(accs.params.clone());
        assert!(moved.ha1("1001", Algorithm::Md5).await.unwrap().is_none());
        moved.set_password("1001", "secret").await.unwrap();
        assert_eq!(
            moved.ha1("1001", Algorithm::Md5).await.unwrap().unwrap(),
            digest::ha1(Algorithm::Md5, "1001", "other.org", "secret")
        );
    }

    #[tokio::test]
    async fn set_quota_and_prompt_format() {
        let (_dir, accs) = accounts().await;
        accs.add("1001", "pw", "1", 100).await.unwrap();
        accs.set_quota("1001", 5000).await.unwrap();
        accs.set_prompt_format("1001", Some(PromptFormat::Text))
            .await
            .unwrap();
        let a = accs.require("1001").await.unwrap();
        assert_eq!(a.quota_bytes, 5000);
        assert_eq!(a.prompt_format.as_deref(), Some("text"));
        assert_eq!(a.prompt_format_override(), Some(PromptFormat::Text));
        accs.set_prompt_format("1001", None).await.unwrap();
        assert_eq!(accs.require("1001").await.unwrap().prompt_format, None);
        assert_eq!(accs.require("1001").await.unwrap().threshold, None);
        accs.set_threshold("1001", Some(Threshold::Bytes(4800)))
            .await
            .unwrap();
        assert_eq!(
            accs.require("1001").await.unwrap().threshold,
            Some(Threshold::Bytes(4800))
        );
        accs.set_threshold("1001", None).await.unwrap();
        assert_eq!(accs.require("1001").await.unwrap().threshold, None);
        // The account's own limit only tightens the server's.
        let server = ThresholdLimits {
            max_bytes: Some(10_000),
            ..ThresholdLimits::default()
        };
        let a = accs.require("1001").await.unwrap();
        assert_eq!(a.threshold_limits(&server).max_bytes, Some(10_000));
        accs.set_threshold_max_bytes("1001", Some(4800))
            .await
            .unwrap();
        let a = accs.require("1001").await.unwrap();
        assert_eq!(a.threshold_max_bytes, Some(4800));
        assert_eq!(a.threshold_limits(&server).max_bytes, Some(4800));
        // A looser account limit does not loosen the server's.
        accs.set_threshold_max_bytes("1001", Some(1 << 30))
            .await
            .unwrap();
        let a = accs.require("1001").await.unwrap();
        assert_eq!(a.threshold_limits(&server).max_bytes, Some(10_000));
        accs.set_threshold_max_bytes("1001", None).await.unwrap();
        assert_eq!(
            accs.require("1001").await.unwrap().threshold_max_bytes,
            None
        );
        assert!(matches!(
            accs.set_quota("ghost", 1).await,
            Err(AccountError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn reserve_settle_release() {
        let (_dir, accs) = accounts().await;
        accs.add("1002", "pw", "1", 1000).await.unwrap();
        assert!(accs.reserve("1002", 600).await.unwrap());
        assert!(!accs.reserve("1002", 500).await.unwrap());
        assert!(accs.reserve("1002", 400).await.unwrap());
        assert_eq!(accs.require("1002").await.unwrap().free_bytes(), 0);
        // The 600 store only received 250 bytes.
        accs.settle("1002", 600, 250).await.unwrap();
        let a = accs.require("1002").await.unwrap();
        assert_eq!(
            (a.used_bytes, a.reserved_bytes, a.free_bytes()),
            (250, 400, 350)
        );
        accs.release_used("1002", 1000).await.unwrap();
        assert_eq!(accs.require("1002").await.unwrap().used_bytes, 0);
        // Quota lowered below usage: free saturates at zero.
        accs.set_quota("1002", 100).await.unwrap();
        assert_eq!(accs.require("1002").await.unwrap().view().free_bytes, 0);
        assert!(matches!(
            accs.reserve("ghost", 1).await,
            Err(AccountError::NotFound(_))
        ));
    }
}
