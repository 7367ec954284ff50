//! Store metadata (PROTOCOL 2): one row per store in the `stores` table, from the prompt
//! (`pending`) through the store session (`receiving`) to its end (`complete`, `truncated`,
//! `rejected`) or expiry (`expired`).
//!
//! Quota: a store session reserves its size on the owner's account when it starts and
//! settles it (reservation off, actual bytes on) when it ends. The store's state change and
//! the account update happen in one database transaction, so a crash between them cannot
//! leak or double-count space, and the conditional `UPDATE` on the account means concurrent
//! sessions can never reserve past the quota. The account SQL is the same as
//! [`Accounts::reserve`](super::accounts::Accounts::reserve) /
//! [`settle`](super::accounts::Accounts::settle), run on the transaction's connection.
//!
//! Times are kept as Unix milliseconds; the JSON view renders them as RFC 3339.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::db::Db;
use super::segments::{self, Recovered, SegmentError};
use super::threshold::Threshold;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Unknown, already used or expired (PROTOCOL 2.4: `404 unknown-store`).
    #[error("unknown, used or expired store {0}")]
    UnknownStore(String),
    /// `403 not-sender`.
    #[error("{caller} is not the sender store {id} was offered to")]
    NotSender { id: String, caller: String },
    /// `403 quota-exceeded`.
    #[error("store {id}: {bytes} bytes exceed the receiver's free space")]
    QuotaExceeded { id: String, bytes: u64 },
    #[error("store {id}: account {owner} that owns it no longer exists")]
    NoOwner { id: String, owner: String },
    #[error("store {id} is {state}, not {expected}")]
    WrongState {
        id: String,
        state: StoreState,
        expected: StoreState,
    },
    #[error("{0:?} is not a store id")]
    InvalidId(String),
    #[error("{0} is not a final store state")]
    NotFinal(StoreState),
    #[error("store {id}: stored {field} is invalid")]
    Corrupt { id: String, field: &'static str },
    #[error("store size {0} is out of range")]
    TooLarge(u64),
    #[error("metadata database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store data: {0}")]
    Segments(#[from] SegmentError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    InCall,
    CallRecording,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::InCall => "in-call",
            StoreKind::CallRecording => "call-recording",
        }
    }
}

impl FromStr for StoreKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "in-call" => Ok(StoreKind::InCall),
            "call-recording" => Ok(StoreKind::CallRecording),
            _ => Err(()),
        }
    }
}

/// Which way a `call-recording` store's audio flowed (PROTOCOL.md §5 "Recorded calls").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Direction {
    /// From leg A (the caller) towards leg B: `"a"`.
    #[serde(rename = "a")]
    AToB,
    /// From leg B (the callee) back to leg A: `"b"`.
    #[serde(rename = "b")]
    BToA,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::AToB => "a",
            Direction::BToA => "b",
        }
    }

    /// The other direction of the same call.
    pub fn other(self) -> Direction {
        match self {
            Direction::AToB => Direction::BToA,
            Direction::BToA => Direction::AToB,
        }
    }
}

impl FromStr for Direction {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "a" => Ok(Direction::AToB),
            "b" => Ok(Direction::BToA),
            _ => Err(()),
        }
    }
}

/// The network ends of the session a store's media came over, recorded when it starts (for
/// the pcap download): RTP as in [`Store::rtp_source`]/[`Store::rtp_local`], and the SIP
/// addresses and Call-ID of that session (an in-call store's session INVITE, or a recorded
/// call's leg).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionEnds {
    pub rtp_source: Option<SocketAddr>,
    pub rtp_local: Option<SocketAddr>,
    /// The far end's SIP address (the sender of an in-call store; leg A's or leg B's party).
    pub sip_remote: Option<SocketAddr>,
    /// callvault's own SIP address on that session.
    pub sip_local: Option<SocketAddr>,
    pub sip_call_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreState {
    /// Prompted; no store session yet.
    Pending,
    Receiving,
    /// Ended by BYE (or a finished upload).
    Complete,
    /// RTP timeout, shutdown, or a restart mid-store.
    Truncated,
    Rejected,
    /// No session started before `expires_at`.
    Expired,
}

impl StoreState {
    pub const ALL: [StoreState; 6] = [
        StoreState::Pending,
        StoreState::Receiving,
        StoreState::Complete,
        StoreState::Truncated,
        StoreState::Rejected,
        StoreState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Pending => "pending",
            StoreState::Receiving => "receiving",
            StoreState::Complete => "complete",
            StoreState::Truncated => "truncated",
            StoreState::Rejected => "rejected",
            StoreState::Expired => "expired",
        }
    }

    /// States a store session can end in.
    pub fn ends_session(self) -> bool {
        matches!(
            self,
            StoreState::Complete | StoreState::Truncated | StoreState::Rejected
        )
    }

    /// Has (or may have) data to play.
    pub fn has_data(self) -> bool {
        matches!(
            self,
            StoreState::Receiving | StoreState::Complete | StoreState::Truncated
        )
    }
}

impl fmt::Display for StoreState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreState {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        StoreState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

/// One store's metadata.
#[derive(Clone, PartialEq, Eq)]
pub struct Store {
    pub id: String,
    /// Capability for the HTTP URLs of this store; compare with [`Store::token_matches`].
    pub token: String,
    pub kind: StoreKind,
    pub sender: String,
    pub receiver: String,
    /// Account charged for the data; None = the operator (no quota).
    pub owner: Option<String>,
    pub call_id: Option<String>,
    /// The policy asked for (resolved into `threshold_bytes` at session start).
    pub threshold: Threshold,
    pub format: Option<String>,
    pub payload_type: Option<u8>,
    pub declared_bytes: Option<u64>,
    pub received_bytes: u64,
    /// Reserved on the owner's quota at session start (held only while `receiving`).
    pub reserved_bytes: u64,
    /// None: adaptive (decided on the rates), or not started yet.
    pub threshold_bytes: Option<u64>,
    pub state: StoreState,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub threshold_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// The sender's RTP source as its offer named it (None: upload, or not recorded).
    pub rtp_source: Option<SocketAddr>,
    /// callvault's RTP address and port that received the session (None: as `rtp_source`).
    pub rtp_local: Option<SocketAddr>,
    /// A call recording's direction (None: an in-call store, or recorded before migration 8).
    pub direction: Option<Direction>,
    /// The SIP session's far end and callvault's end, and its Call-ID (None: not recorded).
    pub sip_remote: Option<SocketAddr>,
    pub sip_local: Option<SocketAddr>,
    pub sip_call_id: Option<String>,
}

// Hand-written so the token never ends up in logs.
impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .field("sender", &self.sender)
            .field("receiver", &self.receiver)
            .field("owner", &self.owner)
            .field("format", &self.format)
            .field("declared_bytes", &self.declared_bytes)
            .field("received_bytes", &self.received_bytes)
            .field("reserved_bytes", &self.reserved_bytes)
            .field("threshold_bytes", &self.threshold_bytes)
            .finish_non_exhaustive()
    }
}

/// A party as PROTOCOL.md 2.5 writes it everywhere: an AOR URI exactly as in the prompt
/// (`sip:1001@example.com`). The database keeps `user@domain` (what the identity checks and
/// the listing filter compare); rows written in either form read the same.
pub fn party_uri(party: &str) -> String {
    let lower = party.to_ascii_lowercase();
    if lower.starts_with("sip:") || lower.starts_with("sips:") || lower.starts_with("tel:") {
        party.to_string()
    } else {
        format!("sip:{party}")
    }
}

/// The JSON of `GET /v1/stores/{id}` and of each item of `GET /v1/stores` (PROTOCOL 2.5, 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreView {
    pub store_id: String,
    pub kind: StoreKind,
    pub state: StoreState,
    pub sender: String,
    pub receiver: String,
    pub call_id: Option<String>,
    /// A call recording's direction: `"a"` (A to B) or `"b"` (B to A); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    pub format: Option<String>,
    pub declared_bytes: Option<u64>,
    pub received_bytes: u64,
    pub threshold_bytes: Option<u64>,
    pub created_at: String,
    pub expires_at: String,
    pub started_at: Option<String>,
    pub threshold_at: Option<String>,
    pub finished_at: Option<String>,
}

impl Store {
    pub fn view(&self) -> StoreView {
        StoreView {
            store_id: self.id.clone(),
            kind: self.kind,
            state: self.state,
            sender: party_uri(&self.sender),
            receiver: party_uri(&self.receiver),
            call_id: self.call_id.clone(),
            direction: self.direction,
            format: self.format.clone(),
            declared_bytes: self.declared_bytes,
            received_bytes: self.received_bytes,
            threshold_bytes: self.threshold_bytes,
            created_at: rfc3339(self.created_at),
            expires_at: rfc3339(self.expires_at),
            started_at: self.started_at.map(rfc3339),
            threshold_at: self.threshold_at.map(rfc3339),
            finished_at: self.finished_at.map(rfc3339),
        }
    }

    /// Constant-time comparison with a presented capability token.
    pub fn token_matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.token.len() == presented.len()
            && bool::from(self.token.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Still usable for a store session at `now`.
    pub fn is_open(&self, now: SystemTime) -> bool {
        self.state == StoreState::Pending && now < self.expires_at
    }
}

/// What [`Stores::create`] needs (the prompt of step 12, or a recording's start).
#[derive(Debug, Clone)]
pub struct NewStore {
    pub kind: StoreKind,
    pub sender: String,
    pub receiver: String,
    pub owner: Option<String>,
    pub call_id: Option<String>,
    pub threshold: Threshold,
    /// `store.store_expiry_secs`: how long the id waits for its session.
    pub ttl: Duration,
}

/// The store session's facts at step 211/22.
#[derive(Debug, Clone, Copy)]
pub struct StartSession<'a> {
    /// Identity of the caller; must be the store's sender.
    pub caller: &'a str,
    /// The codec chosen from the offer, e.g. `PCMU/8000`, and its payload type.
    pub format: &'a str,
    pub payload_type: u8,
    /// `Callvault-Data-Size`, if sent.
    pub declared_bytes: Option<u64>,
    /// Space to reserve on the owner's quota: normally the declared size. Grow it later with
    /// [`Stores::extend_reservation`] (undeclared sizes, the +5% overrun allowance).
    pub reserve_bytes: u64,
    /// The resolved threshold ([`Threshold::resolve`]); None for adaptive.
    pub threshold_bytes: Option<u64>,
}

/// Which stores [`Stores::list`] returns.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only stores where this party is sender or receiver (AOR) or owner (user name).
    /// None: all (admin).
    pub party: Option<Party>,
    pub state: Option<StoreState>,
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub aor: String,
    pub user: String,
}

/// Outcome of start-up recovery for one interrupted store.
#[derive(Debug)]
pub struct RecoveredStore {
    pub id: String,
    /// What was kept; an error leaves the store `receiving` for the next start to retry.
    pub outcome: Result<Recovered, StoreError>,
}

const ID_PREFIX: &str = "st_";
const ID_CHARS: usize = 20; // 20 base62 digits: ~119 random bits
const TOKEN_CHARS: usize = 32; // ~190 bits
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn random_base62(n: usize) -> String {
    // ThreadRng is a CSPRNG reseeded from the OS; gen_range is unbiased.
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from(BASE62[rng.gen_range(0..BASE62.len())]))
        .collect()
}

/// A fresh unguessable store id, `st_` + 20 base62 characters.
pub fn new_store_id() -> String {
    format!("{ID_PREFIX}{}", random_base62(ID_CHARS))
}

/// Ids come from URIs and URLs: check the shape before using one as a path or key.
pub fn valid_store_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX).is_some_and(|rest| {
        rest.len() == ID_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Directory of a store's segments: `<data_dir>/stores/<id>`.
pub fn store_dir(data_dir: &Path, id: &str) -> Result<PathBuf, StoreError> {
    if !valid_store_id(id) {
        return Err(StoreError::InvalidId(id.to_string()));
    }
    Ok(data_dir.join("stores").join(id))
}

fn to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn from_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

fn to_secs(t: SystemTime) -> i64 {
    to_ms(t).div_euclid(1000)
}

/// RFC 3339 in UTC with whole seconds, e.g. `2026-11-21T14:05:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = to_secs(t);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn bytes_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::TooLarge(n))
}

const COLUMNS: &str = "id, token, kind, sender, receiver, owner, call_id, threshold, format, \
    payload_type, declared_bytes, received_bytes, reserved_bytes, threshold_bytes, state, \
    created_at, expires_at, started_at, threshold_at, finished_at, rtp_source, rtp_local, \
    direction, sip_remote, sip_local, sip_call_id";

fn from_row(row: &AnyRow) -> Result<Store, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |field: &'static str| StoreError::Corrupt {
        id: id.clone(),
        field,
    };
    let count = |field: &'static str| -> Result<u64, StoreError> {
        let v: i64 = row.try_get(field)?;
        u64::try_from(v).map_err(|_| corrupt(field))
    };
    let opt_count = |field: &'static str| -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = row.try_get(field)?;
        v.map(|v| u64::try_from(v).map_err(|_| corrupt(field)))
            .transpose()
    };
    let time = |field: &'static str| -> Result<Option<SystemTime>, StoreError> {
        let v: Option<i64> = row.try_get(field)?;
        Ok(v.map(from_ms))
    };
    let addr = |field: &'static str| -> Result<Option<SocketAddr>, StoreError> {
        let v: Option<String> = row.try_get(field)?;
        v.map(|v| v.parse().map_err(|_| corrupt(field))).transpose()
    };
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    let threshold: String = row.try_get("threshold")?;
    let pt: Option<i64> = row.try_get("payload_type")?;
    Ok(Store {
        token: row.try_get("token")?,
        kind: kind.parse().map_err(|_| corrupt("kind"))?,
        sender: row.try_get("sender")?,
        receiver: row.try_get("receiver")?,
        owner: row.try_get("owner")?,
        call_id: row.try_get("call_id")?,
        threshold: threshold.parse().map_err(|_| corrupt("threshold"))?,
        format: row.try_get("format")?,
        payload_type: pt
            .map(|p| u8::try_from(p).map_err(|_| corrupt("payload_type")))
            .transpose()?,
        declared_bytes: opt_count("declared_bytes")?,
        received_bytes: count("received_bytes")?,
        reserved_bytes: count("reserved_bytes")?,
        threshold_bytes: opt_count("threshold_bytes")?,
        state: state.parse().map_err(|_| corrupt("state"))?,
        created_at: time("created_at")?.ok_or_else(|| corrupt("created_at"))?,
        expires_at: time("expires_at")?.ok_or_else(|| corrupt("expires_at"))?,
        started_at: time("started_at")?,
        threshold_at: time("threshold_at")?,
        finished_at: time("finished_at")?,
        rtp_source: addr("rtp_source")?,
        rtp_local: addr("rtp_local")?,
        direction: row
            .try_get::<Option<String>, _>("direction")?
            .map(|d| d.parse().map_err(|()| corrupt("direction")))
            .transpose()?,
        sip_remote: addr("sip_remote")?,
        sip_local: addr("sip_local")?,
        sip_call_id: row.try_get("sip_call_id")?,
        id,
    })
}

/// Store metadata operations over the metadata database.
#[derive(Debug, Clone)]
pub struct Stores {
    db: Db,
}

impl Stores {
    pub fn new(db: Db) -> Stores {
        Stores { db }
    }

    /// Creates a `pending` store with a fresh id and token, expiring after `new.ttl`.
    pub async fn create(&self, new: NewStore, now: SystemTime) -> Result<Store, StoreError> {
        let store = Store {
            id: new_store_id(),
            token: random_base62(TOKEN_CHARS),
            kind: new.kind,
            sender: new.sender,
            receiver: new.receiver,
            owner: new.owner,
            call_id: new.call_id,
            threshold: new.threshold,
            format: None,
            payload_type: None,
            declared_bytes: None,
            received_bytes: 0,
            reserved_bytes: 0,
            threshold_bytes: None,
            state: StoreState::Pending,
            // Whole milliseconds, as stored, so the returned value equals a later `get`.
            created_at: from_ms(to_ms(now)),
            expires_at: from_ms(
                to_ms(now)
                    .saturating_add(i64::try_from(new.ttl.as_millis()).unwrap_or(i64::MAX / 2)),
            ),
            started_at: None,
            threshold_at: None,
            finished_at: None,
            rtp_source: None,
            rtp_local: None,
            direction: None,
            sip_remote: None,
            sip_local: None,
            sip_call_id: None,
        };
        sqlx::query(
            "INSERT INTO stores (id, token, kind, sender, receiver, owner, call_id, threshold, \
             received_bytes, reserved_bytes, state, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, $9, $10, $11)",
        )
        .bind(&store.id)
        .bind(&store.token)
        .bind(store.kind.as_str())
        .bind(&store.sender)
        .bind(&store.receiver)
        .bind(store.owner.clone())
        .bind(store.call_id.clone())
        .bind(store.threshold.to_string())
        .bind(store.state.as_str())
        .bind(to_ms(store.created_at))
        .bind(to_ms(store.expires_at))
        .execute(self.db.pool())
        .await?;
        Ok(store)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Store>, StoreError> {
        if !valid_store_id(id) {
            return Ok(None);
        }
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM stores WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Store>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM stores WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if filter.party.is_some() {
            let (a, b, c) = (next(), next(), next());
            sql.push_str(&format!(
                " AND (sender = {a} OR receiver = {b} OR owner = {c})"
            ));
        }
        if filter.state.is_some() {
            sql.push_str(&format!(" AND state = {}", next()));
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        if filter.limit.is_some() {
            sql.push_str(&format!(" LIMIT {}", next()));
        }
        let mut q = sqlx::query(&sql);
        if let Some(p) = &filter.party {
            q = q
                .bind(p.aor.clone())
                .bind(p.aor.clone())
                .bind(p.user.clone());
        }
        if let Some(st) = filter.state {
            q = q.bind(st.as_str());
        }
        if let Some(l) = filter.limit {
            q = q.bind(i64::from(l));
        }
        let rows = q.fetch_all(self.db.pool()).await?;
        rows.iter().map(from_row).collect()
    }

    /// Store counts per state (`callvault_stores{state}`).
    pub async fn count_by_state(&self) -> Result<Vec<(StoreState, u64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM stores GROUP BY state")
            .fetch_all(self.db.pool())
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let state: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            if let Ok(st) = state.parse() {
                out.push((st, u64::try_from(n).unwrap_or(0)));
            }
        }
        Ok(out)
    }

    /// Step 211/22, atomically: the store must be `pending`, unexpired and offered to
    /// `caller`; it becomes `receiving` (consumed) and `reserve_bytes` is reserved on the
    /// owner's quota, both or neither. A refused start leaves the store usable.
    pub async fn start_session(
        &self,
        id: &str,
        s: &StartSession<'_>,
        now: SystemTime,
    ) -> Result<Store, StoreError> {
        if !valid_store_id(id) {
            return Err(StoreError::UnknownStore(id.to_string()));
        }
        let reserve = bytes_i64(s.reserve_bytes)?;
        let declared = s.declared_bytes.map(bytes_i64).transpose()?;
        let threshold = s.threshold_bytes.map(bytes_i64).transpose()?;
        let now_ms = to_ms(now);
        let mut tx = self.db.pool().begin().await?;
        // A write first, so SQLite takes the write lock (waiting its busy timeout) instead of
        // failing a read-to-write upgrade under contention.
        let claimed = sqlx::query(
            "UPDATE stores SET state = 'receiving', started_at = $2, format = $3, \
             payload_type = $4, declared_bytes = $5, reserved_bytes = $6, threshold_bytes = $7, \
             received_bytes = 0 \
             WHERE id = $1 AND state = 'pending' AND expires_at > $2 AND sender = $8",
        )
        .bind(id)
        .bind(now_ms)
        .bind(s.format)
        .bind(i64::from(s.payload_type))
        .bind(declared)
        .bind(reserve)
        .bind(threshold)
        .bind(s.caller)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(match self.get(id).await? {
                Some(st) if st.is_open(now) => StoreError::NotSender {
                    id: id.to_string(),
                    caller: s.caller.to_string(),
                },
                _ => StoreError::UnknownStore(id.to_string()),
            });
        }
        let owner: Option<String> = sqlx::query("SELECT owner FROM stores WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("owner")?;
        if let Some(owner) = &owner {
            let reserved = sqlx::query(
                "UPDATE accounts SET reserved_bytes = reserved_bytes + $2, updated_at = $3 \
                 WHERE username = $1 AND quota_bytes - used_bytes - reserved_bytes >= $2",
            )
            .bind(owner)
            .bind(reserve)
            .bind(to_secs(now))
            .execute(&mut *tx)
            .await?;
            if reserved.rows_affected() == 0 {
                let exists = sqlx::query("SELECT 1 FROM accounts WHERE username = $1")
                    .bind(owner)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                tx.rollback().await?;
                return Err(if exists {
                    StoreError::QuotaExceeded {
                        id: id.to_string(),
                        bytes: s.reserve_bytes,
                    }
                } else {
                    StoreError::NoOwner {
                        id: id.to_string(),
                        owner: owner.clone(),
                    }
                });
            }
        }
        tx.commit().await?;
        self.get(id)
            .await?
            .ok_or_else(|| StoreError::UnknownStore(id.to_string()))
    }

    /// Reserves `extra` more bytes for a `receiving` store, atomically with the account.
    /// False: the owner has not that much free space (the session should end).
    pub async fn extend_reservation(&self, id: &str, extra: u64) -> Result<bool, StoreError> {
        let n = bytes_i64(extra)?;
        let mut tx = self.db.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE stores SET reserved_bytes = reserved_bytes + $2 \
             WHERE id = $1 AND state = 'receiving'",
        )
        .bind(id)
        .bind(n)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(self.not_in_state(id, StoreState::Receiving).await);
        }
        let owner: Option<String> = sqlx::query("SELECT owner FROM stores WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("owner")?;
        if let Some(owner) = owner {
            let done = sqlx::query(
                "UPDATE accounts SET reserved_bytes = reserved_bytes + $2 \
                 WHERE username = $1 AND quota_bytes - used_bytes - reserved_bytes >= $2",
            )
            .bind(&owner)
            .bind(n)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Records the stored byte count of a `receiving` store (call it every second or so, not
    /// per packet). False when the store is not receiving.
    pub async fn record_progress(&self, id: &str, received: u64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE stores SET received_bytes = $2 WHERE id = $1 AND state = 'receiving'",
        )
        .bind(id)
        .bind(bytes_i64(received)?)
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Step 32: notes the moment the threshold was reached (once). True if this call set it.
    pub async fn mark_threshold(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE stores SET threshold_at = $2 WHERE id = $1 AND threshold_at IS NULL \
             AND state IN ('receiving', 'complete', 'truncated')",
        )
        .bind(id)
        .bind(to_ms(now))
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the addresses a store session uses (the sender's RTP source and callvault's
    /// receiving socket, both SIP ends and the Call-ID), for the pcap download.
    pub async fn set_session_ends(&self, id: &str, ends: &SessionEnds) -> Result<(), StoreError> {
        let text = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        sqlx::query(
            "UPDATE stores SET rtp_source = $2, rtp_local = $3, sip_remote = $4, \
             sip_local = $5, sip_call_id = $6 WHERE id = $1",
        )
        .bind(id)
        .bind(text(ends.rtp_source))
        .bind(text(ends.rtp_local))
        .bind(text(ends.sip_remote))
        .bind(text(ends.sip_local))
        .bind(ends.sip_call_id.clone())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Marks a call recording's direction.
    pub async fn set_direction(&self, id: &str, direction: Direction) -> Result<(), StoreError> {
        sqlx::query("UPDATE stores SET direction = $2 WHERE id = $1")
            .bind(id)
            .bind(direction.as_str())
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// The other direction's store of the call `store` recorded: same Call-ID, the other
    /// direction, the one created closest in time (a Call-ID may come back in a later call).
    /// None for stores that are not directed call recordings.
    pub async fn recording_sibling(&self, store: &Store) -> Result<Option<Store>, StoreError> {
        let (Some(call_id), Some(direction)) = (&store.call_id, store.direction) else {
            return Ok(None);
        };
        if store.kind != StoreKind::CallRecording {
            return Ok(None);
        }
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM stores WHERE call_id = $1 AND kind = $2 AND direction = $3 \
             AND id <> $4"
        ))
        .bind(call_id)
        .bind(StoreKind::CallRecording.as_str())
        .bind(direction.other().as_str())
        .bind(&store.id)
        .fetch_all(self.db.pool())
        .await?;
        let at = to_ms(store.created_at);
        let mut best: Option<Store> = None;
        for row in &rows {
            let s = from_row(row)?;
            let gap = |x: &Store| (to_ms(x.created_at) - at).unsigned_abs();
            if best.as_ref().is_none_or(|b| gap(&s) < gap(b)) {
                best = Some(s);
            }
        }
        Ok(best)
    }

    /// Ends a `receiving` store in `state` with `received` bytes stored, settling the quota in
    /// the same transaction: the reservation comes off, the actual bytes go on.
    pub async fn finish(
        &self,
        id: &str,
        state: StoreState,
        received: u64,
        now: SystemTime,
    ) -> Result<Store, StoreError> {
        if !state.ends_session() {
            return Err(StoreError::NotFinal(state));
        }
        let used = bytes_i64(received)?;
        let mut tx = self.db.pool().begin().await?;
        let done = sqlx::query(
            "UPDATE stores SET state = $2, received_bytes = $3, finished_at = $4 \
             WHERE id = $1 AND state = 'receiving'",
        )
        .bind(id)
        .bind(state.as_str())
        .bind(used)
        .bind(to_ms(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(self.not_in_state(id, StoreState::Receiving).await);
        }
        let row = sqlx::query("SELECT owner, reserved_bytes FROM stores WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        let owner: Option<String> = row.try_get("owner")?;
        let reserved: i64 = row.try_get("reserved_bytes")?;
        if let Some(owner) = owner {
            // Same statement as Accounts::settle. A vanished account has nothing to settle.
            sqlx::query(
                "UPDATE accounts SET \
                 reserved_bytes = CASE WHEN reserved_bytes >= $2 THEN reserved_bytes - $2 ELSE 0 END, \
                 used_bytes = used_bytes + $3, updated_at = $4 WHERE username = $1",
            )
            .bind(&owner)
            .bind(reserved)
            .bind(used)
            .bind(to_secs(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.get(id)
            .await?
            .ok_or_else(|| StoreError::UnknownStore(id.to_string()))
    }

    async fn not_in_state(&self, id: &str, expected: StoreState) -> StoreError {
        match self.get(id).await {
            Ok(Some(st)) => StoreError::WrongState {
                id: id.to_string(),
                state: st.state,
                expected,
            },
            Ok(None) => StoreError::UnknownStore(id.to_string()),
            Err(e) => e,
        }
    }

    /// Removes a store's row (admin `DELETE /v1/stores/{id}`); returns what it was, None when
    /// there was no such store. The caller removes the media and releases the quota.
    pub async fn delete(&self, id: &str) -> Result<Option<Store>, StoreError> {
        let Some(store) = self.get(id).await? else {
            return Ok(None);
        };
        let done = sqlx::query("DELETE FROM stores WHERE id = $1")
            .bind(id)
            .execute(self.db.pool())
            .await?;
        Ok((done.rows_affected() == 1).then_some(store))
    }

    /// Ids of the stores created before `cutoff` that are no longer pending or receiving
    /// (`store.retention_days`).
    pub async fn finished_before(&self, cutoff: SystemTime) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM stores WHERE created_at < $1 AND state <> 'pending' \
             AND state <> 'receiving'",
        )
        .bind(to_ms(cutoff))
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("id").map_err(StoreError::from))
            .collect()
    }

    /// Marks every `pending` store past its expiry `expired`; returns how many.
    pub async fn expire_pending(&self, now: SystemTime) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE stores SET state = 'expired', finished_at = $1 \
             WHERE state = 'pending' AND expires_at <= $1",
        )
        .bind(to_ms(now))
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// At start-up: every store still `receiving` was interrupted. Its segments are cut back
    /// to the last good record ([`segments::recover`]) and it is finished `truncated` with the
    /// recovered payload bytes, settling its quota. Stale `pending` stores expire.
    pub async fn recover_on_startup(
        &self,
        data_dir: &Path,
        now: SystemTime,
    ) -> Result<Vec<RecoveredStore>, StoreError> {
        self.expire_pending(now).await?;
        let ids: Vec<String> = sqlx::query("SELECT id FROM stores WHERE state = 'receiving'")
            .fetch_all(self.db.pool())
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let outcome = self.recover_one(data_dir, &id, now).await;
            match &outcome {
                Ok(r) => tracing::info!(store = %id, records = r.records,
                    payload_bytes = r.payload_bytes, cut_bytes = r.truncated_bytes,
                    "interrupted store recovered as truncated"),
                Err(e) => tracing::error!(store = %id, error = %e,
                    "interrupted store not recovered; left receiving"),
            }
            out.push(RecoveredStore { id, outcome });
        }
        Ok(out)
    }

    async fn recover_one(
        &self,
        data_dir: &Path,
        id: &str,
        now: SystemTime,
    ) -> Result<Recovered, StoreError> {
        let dir = store_dir(data_dir, id)?;
        let rec = tokio::task::spawn_blocking(move || segments::recover(&dir))
            .await
            .map_err(|e| SegmentError::Task(e.to_string()))??;
        self.finish(id, StoreState::Truncated, rec.payload_bytes, now)
            .await?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::accounts::Accounts;
    use crate::storage::segments::{RecordHeader, SegmentOptions, SegmentWriter};

    #[test]
    fn parties_read_as_aor_uris() {
        // Rows of either form (older rows hold `user@domain`) read as the prompt writes them.
        assert_eq!(party_uri("1002@example.com"), "sip:1002@example.com");
        assert_eq!(party_uri("sip:1002@example.com"), "sip:1002@example.com");
        assert_eq!(party_uri("SIPS:1002@example.com"), "SIPS:1002@example.com");
    }

    async fn setup() -> (tempfile::TempDir, Stores, Accounts) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/meta/cv.db", dir.path().display());
        let db = Db::open(&url).await.unwrap();
        let params = argon2::Params::new(256, 1, 1, None).unwrap();
        let accounts = Accounts::new(db.clone(), "example.com").with_argon2_params(params);
        (dir, Stores::new(db), accounts)
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_000_000 + secs)
    }

    fn new_in_call(owner: &str) -> NewStore {
        NewStore {
            kind: StoreKind::InCall,
            sender: "sip:1001@example.com".into(),
            receiver: format!("sip:{owner}@example.com"),
            owner: Some(owner.into()),
            call_id: Some("call-1".into()),
            threshold: Threshold::Percent(30),
            ttl: Duration::from_secs(300),
        }
    }

    #[tokio::test]
    async fn recording_directions_pair_up_and_keep_their_session_ends() {
        let (_dir, stores, _) = setup().await;
        let rec = |call_id: &str| NewStore {
            kind: StoreKind::CallRecording,
            sender: "1001@example.com".into(),
            receiver: "1002@example.com".into(),
            owner: None,
            call_id: Some(call_id.into()),
            threshold: Threshold::Bytes(0),
            ttl: Duration::from_secs(60),
        };
        let a = stores.create(rec("c1@h"), t(0)).await.unwrap();
        let b = stores.create(rec("c1@h"), t(0)).await.unwrap();
        // The same Call-ID again, an hour later (another call).
        let later = stores.create(rec("c1@h"), t(3600)).await.unwrap();
        let other = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        stores.set_direction(&a.id, Direction::AToB).await.unwrap();
        stores.set_direction(&b.id, Direction::BToA).await.unwrap();
        stores
            .set_direction(&later.id, Direction::BToA)
            .await
            .unwrap();
        let ends = SessionEnds {
            rtp_source: Some("127.0.0.1:40000".parse().unwrap()),
            rtp_local: Some("127.0.0.1:20000".parse().unwrap()),
            sip_remote: Some("127.0.0.1:15061".parse().unwrap()),
            sip_local: Some("127.0.0.1:15060".parse().unwrap()),
            sip_call_id: Some("c1@h".into()),
        };
        stores.set_session_ends(&a.id, &ends).await.unwrap();

        let a = stores.get(&a.id).await.unwrap().unwrap();
        assert_eq!(a.direction, Some(Direction::AToB));
        assert_eq!(a.view().direction, Some(Direction::AToB));
        assert_eq!(
            (a.rtp_source, a.rtp_local, a.sip_remote, a.sip_local),
            (
                ends.rtp_source,
                ends.rtp_local,
                ends.sip_remote,
                ends.sip_local
            )
        );
        assert_eq!(a.sip_call_id.as_deref(), Some("c1@h"));
        let sib = stores.recording_sibling(&a).await.unwrap().unwrap();
        assert_eq!(
            sib.id, b.id,
            "the other direction of the same call, not the later one"
        );
        let back = stores.recording_sibling(&sib).await.unwrap().unwrap();
        assert_eq!(back.id, a.id);
        assert!(stores.recording_sibling(&other).await.unwrap().is_none());
        let json = serde_json::to_value(a.view()).unwrap();
        assert_eq!(json["direction"], "a");
        let json = serde_json::to_value(other.view()).unwrap();
        assert!(json.get("direction").is_none(), "in-call stores have none");
    }

    fn start(declared: u64) -> StartSession<'static> {
        StartSession {
            caller: "sip:1001@example.com",
            format: "PCMU/8000",
            payload_type: 0,
            declared_bytes: Some(declared),
            reserve_bytes: declared,
            threshold_bytes: Some(declared * 3 / 10),
        }
    }

    async fn usage(accounts: &Accounts, user: &str) -> (u64, u64) {
        let a = accounts.require(user).await.unwrap();
        (a.used_bytes, a.reserved_bytes)
    }

    #[test]
    fn ids_and_times() {
        let a = new_store_id();
        assert!(valid_store_id(&a), "{a}");
        assert_eq!(a.len(), 23);
        assert_ne!(a, new_store_id());
        assert!(!valid_store_id("st_../../etc/passwd12"));
        assert!(!valid_store_id("st_short"));
        assert!(!valid_store_id("xx_Yp3q9ZbE1rWk7nLx0aTc"));
        assert!(valid_store_id("st_Yp3q9ZbE1rWk7nLx0aTc"));
        assert!(store_dir(Path::new("/d"), "st_/../x").is_err());
        assert_eq!(
            store_dir(Path::new("/d"), "st_Yp3q9ZbE1rWk7nLx0aTc").unwrap(),
            Path::new("/d/stores/st_Yp3q9ZbE1rWk7nLx0aTc")
        );
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_269_900)),
            "2026-11-21T14:05:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(from_ms(to_ms(t(5))), t(5));
    }

    #[tokio::test]
    async fn create_get_view_and_list() {
        let (_d, stores, accounts) = setup().await;
        accounts.add("1002", "pw", "1", 1_000_000).await.unwrap();
        let s1 = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        let mut rec = new_in_call("1003");
        rec.kind = StoreKind::CallRecording;
        rec.sender = "sip:1003@example.com".into();
        rec.owner = None;
        rec.threshold = Threshold::Adaptive;
        let s2 = stores.create(rec, t(10)).await.unwrap();
        assert_eq!(stores.get(&s1.id).await.unwrap().unwrap(), s1);
        assert!(stores
            .get("st_nonexistent00000000")
            .await
            .unwrap()
            .is_none());
        assert!(stores.get("garbage").await.unwrap().is_none());
        assert!(s1.token_matches(&s1.token.clone()));
        assert!(!s1.token_matches("x"));
        assert!(!format!("{s1:?}").contains(&s1.token));

        let v = serde_json::to_value(s1.view()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "store_id": s1.id, "kind": "in-call", "state": "pending",
                "sender": "sip:1001@example.com", "receiver": "sip:1002@example.com",
                "call_id": "call-1", "format": null, "declared_bytes": null,
                "received_bytes": 0, "threshold_bytes": null,
                "created_at": rfc3339(t(0)), "expires_at": rfc3339(t(300)),
                "started_at": null, "threshold_at": null, "finished_at": null
            })
        );
        assert_eq!(s2.view().kind, StoreKind::CallRecording);
        assert_eq!(
            serde_json::to_value(s2.view()).unwrap()["kind"],
            "call-recording"
        );

        let all = stores.list(&ListFilter::default()).await.unwrap();
        assert_eq!(
            all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            [s2.id.as_str(), s1.id.as_str()],
            "newest first"
        );
        let party = |u: &str| {
            Some(Party {
                aor: format!("sip:{u}@example.com"),
                user: u.into(),
            })
        };
        let mine = ListFilter {
            party: party("1002"),
            ..ListFilter::default()
        };
        assert_eq!(stores.list(&mine).await.unwrap(), vec![s1.clone()]);
        let sender = ListFilter {
            party: party("1001"),
            ..ListFilter::default()
        };
        assert_eq!(stores.list(&sender).await.unwrap(), vec![s1.clone()]);
        let none = ListFilter {
            party: party("9999"),
            ..ListFilter::default()
        };
        assert!(stores.list(&none).await.unwrap().is_empty());
        let receiving = ListFilter {
            state: Some(StoreState::Receiving),
            ..ListFilter::default()
        };
        assert!(stores.list(&receiving).await.unwrap().is_empty());
        stores
            .start_session(&s1.id, &start(1000), t(20))
            .await
            .unwrap();
        assert_eq!(stores.list(&receiving).await.unwrap().len(), 1);
        let limited = ListFilter {
            party: party("1002"),
            state: Some(StoreState::Receiving),
            limit: Some(1),
        };
        assert_eq!(stores.list(&limited).await.unwrap()[0].id, s1.id);
        let counts = stores.count_by_state().await.unwrap();
        assert!(counts.contains(&(StoreState::Receiving, 1)));
        assert!(counts.contains(&(StoreState::Pending, 1)));
    }

    #[tokio::test]
    async fn session_lifecycle_and_quota() {
        let (_d, stores, accounts) = setup().await;
        accounts.add("1002", "pw", "1", 10_000).await.unwrap();
        let s = stores.create(new_in_call("1002"), t(0)).await.unwrap();

        // Step 211 refusals leave the store usable.
        let mut wrong = start(1000);
        wrong.caller = "sip:6666@example.com";
        assert!(matches!(
            stores.start_session(&s.id, &wrong, t(1)).await,
            Err(StoreError::NotSender { .. })
        ));
        assert!(matches!(
            stores.start_session(&s.id, &start(10_001), t(1)).await,
            Err(StoreError::QuotaExceeded { bytes: 10_001, .. })
        ));
        assert_eq!(usage(&accounts, "1002").await, (0, 0));
        assert_eq!(
            stores.get(&s.id).await.unwrap().unwrap().state,
            StoreState::Pending
        );

        let st = stores
            .start_session(&s.id, &start(4000), t(2))
            .await
            .unwrap();
        assert_eq!(st.state, StoreState::Receiving);
        assert_eq!(st.format.as_deref(), Some("PCMU/8000"));
        assert_eq!(st.payload_type, Some(0));
        assert_eq!((st.declared_bytes, st.reserved_bytes), (Some(4000), 4000));
        assert_eq!(st.threshold_bytes, Some(1200));
        assert_eq!(st.started_at, Some(t(2)));
        assert_eq!(usage(&accounts, "1002").await, (0, 4000));
        // Single use.
        assert!(matches!(
            stores.start_session(&s.id, &start(10), t(3)).await,
            Err(StoreError::UnknownStore(_))
        ));

        assert!(stores.record_progress(&s.id, 1500).await.unwrap());
        assert!(stores.mark_threshold(&s.id, t(4)).await.unwrap());
        assert!(!stores.mark_threshold(&s.id, t(5)).await.unwrap(), "once");
        // The +5% allowance.
        assert!(stores.extend_reservation(&s.id, 200).await.unwrap());
        assert!(!stores.extend_reservation(&s.id, 6000).await.unwrap());
        assert_eq!(usage(&accounts, "1002").await, (0, 4200));

        let done = stores
            .finish(&s.id, StoreState::Complete, 4100, t(9))
            .await
            .unwrap();
        assert_eq!(done.state, StoreState::Complete);
        assert_eq!(done.received_bytes, 4100);
        assert_eq!(done.threshold_at, Some(t(4)));
        assert_eq!(done.finished_at, Some(t(9)));
        assert_eq!(usage(&accounts, "1002").await, (4100, 0));
        // Finishing twice does not settle twice.
        assert!(matches!(
            stores.finish(&s.id, StoreState::Truncated, 1, t(10)).await,
            Err(StoreError::WrongState {
                state: StoreState::Complete,
                ..
            })
        ));
        assert!(!stores.record_progress(&s.id, 9).await.unwrap());
        assert!(matches!(
            stores.finish(&s.id, StoreState::Pending, 1, t(10)).await,
            Err(StoreError::NotFinal(_))
        ));
        assert_eq!(usage(&accounts, "1002").await, (4100, 0));
        let v = serde_json::to_value(done.view()).unwrap();
        assert_eq!(v["state"], "complete");
        assert_eq!(v["threshold_at"], rfc3339(t(4)));
    }

    #[tokio::test]
    async fn expiry_and_operator_owned_stores() {
        let (_d, stores, _accounts) = setup().await;
        let s = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        // Past its expiry the id is unknown even before the sweep...
        assert!(matches!(
            stores.start_session(&s.id, &start(1), t(300)).await,
            Err(StoreError::UnknownStore(_))
        ));
        assert_eq!(stores.expire_pending(t(299)).await.unwrap(), 0);
        assert_eq!(stores.expire_pending(t(301)).await.unwrap(), 1);
        assert_eq!(
            stores.get(&s.id).await.unwrap().unwrap().state,
            StoreState::Expired
        );
        // An owner that is not an account is refused at start.
        let s = stores.create(new_in_call("ghost"), t(0)).await.unwrap();
        assert!(matches!(
            stores.start_session(&s.id, &start(1), t(1)).await,
            Err(StoreError::NoOwner { .. })
        ));
        // Operator-owned (no quota).
        let mut n = new_in_call("x");
        n.owner = None;
        let s = stores.create(n, t(0)).await.unwrap();
        stores
            .start_session(&s.id, &start(u32::MAX.into()), t(1))
            .await
            .unwrap();
        let f = stores
            .finish(&s.id, StoreState::Truncated, 77, t(2))
            .await
            .unwrap();
        assert_eq!(f.received_bytes, 77);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_sessions_never_overdraw_a_quota() {
        let (_d, stores, accounts) = setup().await;
        accounts.add("1002", "pw", "1", 10_000).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(stores.create(new_in_call("1002"), t(0)).await.unwrap().id);
        }
        // 40 sessions of 1000 bytes against 10 000: exactly ten may start.
        let tasks: Vec<_> = ids
            .iter()
            .cloned()
            .map(|id| {
                let stores = stores.clone();
                tokio::spawn(async move { stores.start_session(&id, &start(1000), t(1)).await })
            })
            .collect();
        let mut ok = Vec::new();
        for (task, id) in tasks.into_iter().zip(&ids) {
            match task.await.unwrap() {
                Ok(_) => ok.push(id.clone()),
                Err(StoreError::QuotaExceeded { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok.len(), 10);
        assert_eq!(usage(&accounts, "1002").await, (0, 10_000));

        // The same store raced by many callers is consumed exactly once.
        accounts.add("1003", "pw", "1", 1_000_000).await.unwrap();
        let one = stores.create(new_in_call("1003"), t(0)).await.unwrap().id;
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (stores, id) = (stores.clone(), one.clone());
                tokio::spawn(async move { stores.start_session(&id, &start(500), t(1)).await })
            })
            .collect();
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StoreError::UnknownStore(_)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(usage(&accounts, "1003").await, (0, 500));

        // Growing a reservation is bounded the same way: the quota is fully reserved.
        let grow = |ids: Vec<String>, by: u64| {
            let stores = stores.clone();
            async move {
                let tasks: Vec<_> = ids
                    .into_iter()
                    .map(|id| {
                        let stores = stores.clone();
                        tokio::spawn(async move { stores.extend_reservation(&id, by).await })
                    })
                    .collect();
                let mut n = 0;
                for task in tasks {
                    n += usize::from(task.await.unwrap().unwrap());
                }
                n
            }
        };
        assert_eq!(grow(ok.clone(), 50).await, 0);
        // Half finish short (900 of 1000) concurrently, freeing 500 bytes...
        let (short, rest): (Vec<_>, Vec<_>) =
            ok.iter().cloned().partition(|id| ok[..5].contains(id));
        let tasks: Vec<_> = short
            .into_iter()
            .map(|id| {
                let stores = stores.clone();
                tokio::spawn(
                    async move { stores.finish(&id, StoreState::Complete, 900, t(2)).await },
                )
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(usage(&accounts, "1002").await, (4500, 5000));
        // ...of which ten racing growths of 100 can take exactly five.
        let twice: Vec<String> = rest.iter().chain(rest.iter()).cloned().collect();
        assert_eq!(grow(twice, 100).await, 5);
        assert_eq!(usage(&accounts, "1002").await, (4500, 5500));
        for id in &rest {
            stores
                .finish(id, StoreState::Complete, 1000, t(3))
                .await
                .unwrap();
        }
        assert_eq!(usage(&accounts, "1002").await, (9500, 0));
    }

    #[tokio::test]
    async fn startup_recovery_truncates_and_settles() {
        let (dir, stores, accounts) = setup().await;
        let data = dir.path().join("data");
        accounts.add("1002", "pw", "1", 100_000).await.unwrap();
        let s = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        stores
            .start_session(&s.id, &start(16_000), t(1))
            .await
            .unwrap();
        // Old progress report, behind what was committed.
        stores.record_progress(&s.id, 320).await.unwrap();
        let sdir = store_dir(&data, &s.id).unwrap();
        let mut w = SegmentWriter::create(&sdir, SegmentOptions::default()).unwrap();
        for i in 0..30u32 {
            let h = RecordHeader {
                arrival_us: u64::from(i) * 20_000,
                seq: i as u16,
                timestamp: i * 160,
                ssrc: 1,
                payload_type: 0,
                marker: false,
            };
            w.append(&h, &[0x55; 160]).unwrap();
            if i == 24 {
                w.commit().unwrap();
            }
        }
        // "Crash": five records appended but never committed; a torn write on disk.
        drop(w);
        let seg = std::fs::read_dir(&sdir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = std::fs::OpenOptions::new().append(true).open(seg).unwrap();
        std::io::Write::write_all(&mut f, &[1, 2, 3]).unwrap();
        drop(f);
        // A pending store that expired meanwhile, and one whose data directory is missing.
        let p = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        let m = stores.create(new_in_call("1002"), t(0)).await.unwrap();
        stores
            .start_session(&m.id, &start(1000), t(1))
            .await
            .unwrap();
        assert_eq!(usage(&accounts, "1002").await, (0, 17_000));

        let out = stores.recover_on_startup(&data, t(1000)).await.unwrap();
        assert_eq!(out.len(), 2);
        let r = out.iter().find(|r| r.id == s.id).unwrap();
        let rec = r.outcome.as_ref().unwrap();
        assert_eq!((rec.records, rec.payload_bytes), (25, 25 * 160));
        let got = stores.get(&s.id).await.unwrap().unwrap();
        assert_eq!(got.state, StoreState::Truncated);
        assert_eq!(got.received_bytes, 4000);
        assert_eq!(got.finished_at, Some(t(1000)));
        let got = stores.get(&m.id).await.unwrap().unwrap();
        assert_eq!((got.state, got.received_bytes), (StoreState::Truncated, 0));
        assert_eq!(
            stores.get(&p.id).await.unwrap().unwrap().state,
            StoreState::Expired
        );
        assert_eq!(usage(&accounts, "1002").await, (4000, 0));
        // Idempotent: nothing is receiving any more.
        assert!(stores
            .recover_on_startup(&data, t(1001))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(usage(&accounts, "1002").await, (4000, 0));
    }
}
