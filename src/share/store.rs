//! Shared files on disk and in the `shares` table (PROTOCOL 3 step 1, 5 Shares).
//!
//! Layout: `<data_dir>/shares/<content_id>/content` (the file, pieces at offsets
//! `n * piece_size`) and `<data_dir>/shares/<content_id>/manifest.json` (the manifest bytes
//! exactly as built; their SHA-256 is the directory's name). An upload is written to
//! `<data_dir>/shares/.staging/<random>/` while it arrives and renamed into place once its
//! manifest is known; one file (not one per piece) keeps Range requests a single seek and the
//! file count low.
//!
//! Content is addressed by content id, so two shares with the same bytes and name (the name is
//! in the manifest) share one directory; it is deleted when the last row naming it goes.
//!
//! Quota: publishing reserves the declared size on the owner's account before the first byte
//! is stored (journaled in `share_uploads` in the same transaction, so start-up recovery can
//! give back what a crash interrupted: [`Shares::recover_uploads`]) and, in the same database transaction that records the share, settles it (the
//! reservation off, the actual size on) and gives back the size of the share it replaces.
//! The reservation is taken in full even when replacing: the old file is still served until
//! the new one is complete.
//!
//! Offer tokens: HMAC-SHA256 of the content id under a server secret kept in the database
//! (`share_secret`), so tokens survive restarts and every node on the same database agrees.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use rand::RngCore;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use super::index::{MemoryIndex, PieceIndex};
use super::manifest::{content_id_of, is_sha256_hex, piece_count, validate_name, PieceHasher};
use super::policy::{Policy, Requester};
use super::rate::RateLimiter;
use super::ShareError;
use crate::config::ShareConfig;
use crate::sip::auth::hmac_sha256;
use crate::storage::objects::{ObjectBackend, ObjectError, Objects};
use crate::storage::stores::rfc3339;
use crate::storage::{Accounts, Db};

/// Bytes handed to the blocking writer at once: bounds what an upload holds in memory.
const WRITE_BATCH: usize = 1024 * 1024;

/// What a valid offer token opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenGrant {
    /// Given with the sharer's consent (a forwarded request, [`Shares::offer`]): the content,
    /// as long as it is shared.
    Consent,
    /// Given under the policy to this requester (None: anonymous, [`Shares::offer_to`]): the
    /// content, as long as the current policy of some share of it allows that requester.
    Holder(Option<Requester>),
}

/// Tunables, from `[share]` plus what the server knows about itself.
#[derive(Debug, Clone)]
pub struct ShareSettings {
    pub piece_size: u64,
    pub holder_ttl: Duration,
    /// 0 = unlimited.
    pub server_rate_bytes_per_sec: u64,
    /// A publish body that sends nothing for this long fails.
    pub idle_timeout: Duration,
    /// The server's HTTP `host:port` as holders should reach it (index entry "server");
    /// None: taken from the request's `Host`.
    pub server_address: Option<String>,
    /// Base URL of the index when it runs as its own role; None: this server's `/v1/index`.
    pub index_base: Option<String>,
    /// Set when the index lives on the terminals (claim 8): the DHT nodes offers name for
    /// the agents to bootstrap from (serve's own node). Serve's `/v1/index` then answers 503.
    pub terminal_index: Option<Vec<String>>,
    /// This node's `[cluster] node_id`, written with each upload in flight so recovery and
    /// takeover release only the right node's (None: the column stays NULL).
    pub node: Option<String>,
}

impl Default for ShareSettings {
    fn default() -> Self {
        ShareSettings::from_config(&ShareConfig::default())
    }
}

impl ShareSettings {
    pub fn from_config(c: &ShareConfig) -> ShareSettings {
        ShareSettings {
            piece_size: c.piece_size.max(1),
            holder_ttl: Duration::from_secs(c.holder_ttl_secs),
            server_rate_bytes_per_sec: c.server_rate_bytes_per_sec,
            idle_timeout: Duration::from_secs(30),
            server_address: None,
            index_base: None,
            terminal_index: None,
            node: None,
        }
    }
}

/// One shared file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Account name of the sharer.
    pub owner: String,
    pub name: String,
    pub content_id: String,
    pub size: u64,
    pub piece_size: u64,
    pub pieces: u64,
    pub policy: Policy,
    pub created_at: SystemTime,
}

/// The JSON of a share (publish answer, listings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShareView {
    pub owner: String,
    pub name: String,
    pub content_id: String,
    pub size: u64,
    pub piece_size: u64,
    pub pieces: u64,
    pub policy: String,
    pub created_at: String,
}

impl Share {
    pub fn view(&self) -> ShareView {
        ShareView {
            owner: self.owner.clone(),
            name: self.name.clone(),
            content_id: self.content_id.clone(),
            size: self.size,
            piece_size: self.piece_size,
            pieces: self.pieces,
            policy: self.policy.as_string(),
            created_at: rfc3339(self.created_at),
        }
    }
}

/// The share-offer body of step 3 (`application/vnd.callvault.share-offer+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub content_id: String,
    pub name: String,
    pub size: u64,
    pub piece_size: u64,
    pub pieces: u64,
    pub manifest_url: String,
    pub index_url: String,
    pub server_url: String,
    pub token: String,
    /// `"terminals"` when the index lives on the agents (claim 8; absent otherwise): an
    /// addition to PROTOCOL §3's offer, see docs/ARCHITECTURE.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<&'static str>,
    /// With `index = "terminals"`: DHT nodes (`ip:port`, UDP) to bootstrap from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dht_bootstrap: Vec<String>,
}

/// Shared files: database rows, content on disk, the piece index, offer tokens and the
/// server's egress limiter. Cheap to clone.
#[derive(Clone)]
pub struct Shares {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    accounts: Accounts,
    data_dir: PathBuf,
    realm: String,
    settings: ShareSettings,
    secret: [u8; 32],
    index: Arc<dyn PieceIndex>,
    limiter: RateLimiter,
    /// Serializes moving content into place with deleting unreferenced content.
    finalize: tokio::sync::Mutex<()>,
    /// A remote object store holding the contents (`objects = "s3://..."`); None: the
    /// content folders under `data_dir/shares` are the contents.
    objects: Option<Objects>,
}

impl fmt::Debug for Shares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shares")
            .field("data_dir", &self.inner.data_dir)
            .field("realm", &self.inner.realm)
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn bytes_i64(n: u64) -> Result<i64, ShareError> {
    i64::try_from(n).map_err(|_| ShareError::TooLarge(n))
}

const COLUMNS: &str = "owner, name, content_id, size, piece_size, pieces, policy, created_at";

impl Shares {
    /// Loads (or creates, once) the token secret and sets up the in-memory index.
    pub async fn open(
        db: Db,
        data_dir: impl Into<PathBuf>,
        realm: impl Into<String>,
        settings: ShareSettings,
    ) -> Result<Shares, ShareError> {
        let index: Arc<dyn PieceIndex> = Arc::new(MemoryIndex::new(settings.holder_ttl));
        Shares::open_with_index(db, data_dir, realm, settings, index).await
    }

    /// Like [`open`](Self::open) with another index implementation.
    pub async fn open_with_index(
        db: Db,
        data_dir: impl Into<PathBuf>,
        realm: impl Into<String>,
        settings: ShareSettings,
        index: Arc<dyn PieceIndex>,
    ) -> Result<Shares, ShareError> {
        let realm = realm.into();
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        // Insert-if-absent then read: two processes starting together agree on one secret.
        sqlx::query(
            "INSERT INTO share_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(hex::encode(fresh))
        .execute(db.pool())
        .await?;
        let stored: String = sqlx::query("SELECT secret FROM share_secret WHERE id = 1")
            .fetch_one(db.pool())
            .await?
            .try_get("secret")?;
        let mut secret = [0u8; 32];
        hex::decode_to_slice(stored.trim(), &mut secret).map_err(|_| ShareError::Corrupt {
            what: "share_secret".into(),
        })?;
        let limiter = RateLimiter::new(settings.server_rate_bytes_per_sec);
        Ok(Shares {
            inner: Arc::new(Inner {
                accounts: Accounts::new(db.clone(), realm.clone()),
                db,
                data_dir: data_dir.into(),
                realm,
                settings,
                secret,
                index,
                limiter,
                finalize: tokio::sync::Mutex::new(()),
                objects: None,
            }),
        })
    }

    /// Keeps contents in `objects` when it is a remote store (call right after opening;
    /// false if this handle was cloned already).
    pub fn set_objects(&mut self, objects: Objects) -> bool {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.objects = (!objects.is_local()).then_some(objects);
                true
            }
            None => false,
        }
    }

    /// The remote object store holding the contents, if any.
    pub fn objects(&self) -> Option<&Objects> {
        self.inner.objects.as_ref()
    }

    /// Bytes `offset..offset+len` of a content: from its part objects when contents live in
    /// an object store, else from the content file.
    pub fn content_range(
        &self,
        content_id: &str,
        offset: u64,
        len: u64,
    ) -> Result<BoxStream<'static, io::Result<Bytes>>, ShareError> {
        let dir = self.content_dir(content_id)?;
        match &self.inner.objects {
            Some(o) => Ok(object_range(
                Arc::clone(o),
                content_id.to_string(),
                offset,
                len,
            )),
            None => Ok(file_range(dir.join("content"), offset, len)),
        }
    }

    /// Puts a content folder's file as [`PART_BYTES`] part objects and its manifest, the
    /// manifest last (its presence says the content is whole).
    async fn upload_content(&self, o: &Objects, content_id: &str) -> Result<(), ShareError> {
        let path = self.content_path(content_id)?;
        let mut file = tokio::fs::File::open(&path).await?;
        let mut part = 0u64;
        loop {
            let mut buf = Vec::with_capacity(PART_BYTES);
            let n = (&mut file)
                .take(PART_BYTES as u64)
                .read_to_end(&mut buf)
                .await?;
            if n == 0 {
                break;
            }
            o.put(&part_key(content_id, part), Bytes::from(buf))
                .await
                .map_err(object_err)?;
            part += 1;
        }
        let manifest = tokio::fs::read(self.content_dir(content_id)?.join("manifest.json")).await?;
        o.put(
            &format!("shares/{content_id}/manifest.json"),
            Bytes::from(manifest),
        )
        .await
        .map_err(object_err)
    }

    pub fn settings(&self) -> &ShareSettings {
        &self.inner.settings
    }

    pub fn realm(&self) -> &str {
        &self.inner.realm
    }

    pub fn index(&self) -> &Arc<dyn PieceIndex> {
        &self.inner.index
    }

    /// The server's egress limiter (shared by all piece and content downloads).
    pub fn limiter(&self) -> &RateLimiter {
        &self.inner.limiter
    }

    fn root(&self) -> PathBuf {
        self.inner.data_dir.join("shares")
    }

    /// `<data_dir>/shares/<content_id>`; the id is checked so it can never be a path trick.
    pub fn content_dir(&self, content_id: &str) -> Result<PathBuf, ShareError> {
        if !is_sha256_hex(content_id) {
            return Err(ShareError::UnknownContent(content_id.to_string()));
        }
        Ok(self.root().join(content_id))
    }

    /// The content file (pieces at `n * piece_size`).
    pub fn content_path(&self, content_id: &str) -> Result<PathBuf, ShareError> {
        Ok(self.content_dir(content_id)?.join("content"))
    }

    /// The manifest bytes exactly as published (checked against the id).
    pub async fn manifest_bytes(&self, content_id: &str) -> Result<Vec<u8>, ShareError> {
        let path = self.content_dir(content_id)?.join("manifest.json");
        let read = match &self.inner.objects {
            Some(o) => match o.get(&format!("shares/{content_id}/manifest.json")).await {
                Ok(b) => Ok(b.to_vec()),
                Err(ObjectError::NotFound(_)) => Err(io::Error::from(io::ErrorKind::NotFound)),
                Err(e) => return Err(object_err(e)),
            },
            None => tokio::fs::read(&path).await,
        };
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ShareError::UnknownContent(content_id.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        if content_id_of(&bytes) != content_id {
            return Err(ShareError::Corrupt {
                what: format!("manifest of {content_id}"),
            });
        }
        Ok(bytes)
    }

    // -----------------------------------------------------------------------------------------
    // Tokens

    /// The capability for one content (the offer's `token`): opens its manifest, pieces,
    /// whole file and index, nothing else.
    pub fn issue_offer_token(&self, content_id: &str) -> String {
        let mut msg = b"callvault share offer\0".to_vec();
        msg.extend_from_slice(content_id.as_bytes());
        hex::encode(hmac_sha256(&self.inner.secret, &msg))
    }

    /// Constant-time check of a presented token against `content_id`.
    pub fn verify_offer_token(&self, content_id: &str, token: &str) -> bool {
        let want = self.issue_offer_token(content_id);
        want.len() == token.len() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }

    /// The token of an offer made under the policy to `requester` (None: anonymous):
    /// `<mac>.<holder>`, the holder (`s`/`o` for subscriber or other, then the AOR) in
    /// base64url. It names its holder so every use is checked against the policy *then in
    /// force* ([`Shares::offer_token_grant`]): narrowing the policy revokes it (issue 10,
    /// finding 9).
    pub fn issue_offer_token_for(&self, content_id: &str, requester: Option<&Requester>) -> String {
        let who = requester.map_or(String::new(), |r| {
            format!("{}{}", if r.subscriber { 's' } else { 'o' }, r.aor)
        });
        format!(
            "{}.{}",
            self.holder_mac(content_id, &who),
            URL_SAFE_NO_PAD.encode(&who)
        )
    }

    fn holder_mac(&self, content_id: &str, who: &str) -> String {
        let mut msg = b"callvault share offer holder\0".to_vec();
        msg.extend_from_slice(content_id.as_bytes());
        msg.push(0);
        msg.extend_from_slice(who.as_bytes());
        hex::encode(hmac_sha256(&self.inner.secret, &msg))
    }

    /// What `token` grants for `content_id`, if it is one of ours for it.
    pub fn offer_token_grant(&self, content_id: &str, token: &str) -> Option<TokenGrant> {
        let Some((mac, holder)) = token.split_once('.') else {
            return self
                .verify_offer_token(content_id, token)
                .then_some(TokenGrant::Consent);
        };
        let who = String::from_utf8(URL_SAFE_NO_PAD.decode(holder).ok()?).ok()?;
        let want = self.holder_mac(content_id, &who);
        if want.len() != mac.len() || !bool::from(want.as_bytes().ct_eq(mac.as_bytes())) {
            return None;
        }
        let requester = match who.split_at_checked(1) {
            None | Some(("", _)) => None,
            Some((kind, aor)) => Some(Requester {
                aor: aor.to_string(),
                subscriber: kind == "s",
            }),
        };
        Some(TokenGrant::Holder(requester))
    }

    /// [`Shares::offer`] made under the policy to `requester`: its token is checked against
    /// the policy on every use.
    pub fn offer_to(
        &self,
        share: &Share,
        server_url: &str,
        requester: Option<&Requester>,
    ) -> Offer {
        let mut offer = self.offer(share, server_url);
        offer.token = self.issue_offer_token_for(&share.content_id, requester);
        offer
    }

    /// The step-3 offer for `share`, with URLs under `server_url` (e.g.
    /// `http://192.0.2.10:8080`, no trailing slash needed).
    pub fn offer(&self, share: &Share, server_url: &str) -> Offer {
        let base = server_url.trim_end_matches('/');
        let index_base = self
            .inner
            .settings
            .index_base
            .as_deref()
            .map_or(base, |b| b.trim_end_matches('/'));
        Offer {
            content_id: share.content_id.clone(),
            name: share.name.clone(),
            size: share.size,
            piece_size: share.piece_size,
            pieces: share.pieces,
            manifest_url: format!("{base}/v1/shares/{}/manifest", share.content_id),
            index_url: format!("{index_base}/v1/index/{}", share.content_id),
            server_url: base.to_string(),
            token: self.issue_offer_token(&share.content_id),
            index: self
                .inner
                .settings
                .terminal_index
                .as_ref()
                .map(|_| "terminals"),
            dht_bootstrap: self
                .inner
                .settings
                .terminal_index
                .clone()
                .unwrap_or_default(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Policy

    /// `sip:<owner>@<realm>`.
    pub fn owner_aor(&self, share: &Share) -> String {
        format!(
            "sip:{}@{}",
            share.owner,
            self.inner.realm.to_ascii_lowercase()
        )
    }

    /// May `requester` (None: anonymous) fetch `share`? The owner always may.
    pub fn may_fetch(&self, share: &Share, requester: Option<&Requester>) -> bool {
        share.policy.allows(&self.owner_aor(share), requester)
    }

    // -----------------------------------------------------------------------------------------
    // Queries

    fn from_row(row: &AnyRow) -> Result<Share, ShareError> {
        let owner: String = row.try_get("owner")?;
        let name: String = row.try_get("name")?;
        let corrupt = |field: &str| ShareError::Corrupt {
            what: format!("share {owner}/{name}: {field}"),
        };
        let count = |field: &str| -> Result<u64, ShareError> {
            let v: i64 = row.try_get(field)?;
            u64::try_from(v).map_err(|_| corrupt(field))
        };
        let policy_text: String = row.try_get("policy")?;
        // Stored policies were normalized on the way in; the realm only qualifies bare users.
        let policy = Policy::parse(&policy_text, "invalid.").map_err(|_| corrupt("policy"))?;
        Ok(Share {
            content_id: row.try_get("content_id")?,
            size: count("size")?,
            piece_size: count("piece_size")?,
            pieces: count("pieces")?,
            policy,
            created_at: from_ms(row.try_get("created_at")?),
            owner,
            name,
        })
    }

    pub async fn get_by_name(&self, owner: &str, name: &str) -> Result<Option<Share>, ShareError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM shares WHERE owner = $1 AND name = $2"
        ))
        .bind(owner)
        .bind(name)
        .fetch_optional(self.inner.db.pool())
        .await?;
        row.as_ref().map(Self::from_row).transpose()
    }

    /// Every share of this content (normally one; the same file published under the same
    /// name by several owners gives several, each with its own policy). Oldest first.
    pub async fn get_by_content(&self, content_id: &str) -> Result<Vec<Share>, ShareError> {
        if !is_sha256_hex(content_id) {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM shares WHERE content_id = $1 ORDER BY created_at, owner, name"
        ))
        .bind(content_id)
        .fetch_all(self.inner.db.pool())
        .await?;
        rows.iter().map(Self::from_row).collect()
    }

    /// Every share, newest first, at most `limit` (the operator's listing, PROTOCOL 8).
    pub async fn list_all(&self, limit: u32) -> Result<Vec<Share>, ShareError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM shares ORDER BY created_at DESC, owner, name LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(self.inner.db.pool())
        .await?;
        rows.iter().map(Self::from_row).collect()
    }

    /// `owner`'s shares that `requester` may fetch (the `{"list":true}` answer), by name.
    pub async fn list_visible(
        &self,
        owner: &str,
        requester: Option<&Requester>,
    ) -> Result<Vec<Share>, ShareError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM shares WHERE owner = $1 ORDER BY name"
        ))
        .bind(owner)
        .fetch_all(self.inner.db.pool())
        .await?;
        let all: Vec<Share> = rows.iter().map(Self::from_row).collect::<Result<_, _>>()?;
        Ok(all
            .into_iter()
            .filter(|s| self.may_fetch(s, requester))
            .collect())
    }

    // -----------------------------------------------------------------------------------------
    // Publish

    /// Step 1: stores `body` (exactly `declared` bytes) as `owner`'s share `name`, cutting it
    /// into pieces and hashing each as it arrives; replaces a share of the same name.
    ///
    /// Errors, in order: bad name, unknown owner, quota exceeded (nothing stored), then body
    /// problems (shorter or longer than declared, stalled, read error) and storage failures,
    /// after which the reservation is released and the partial file removed.
    pub async fn publish_stream<S, E>(
        &self,
        owner: &str,
        name: &str,
        policy: Policy,
        declared: u64,
        mut body: S,
    ) -> Result<Share, ShareError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: fmt::Display,
    {
        validate_name(name)?;
        let declared_i = bytes_i64(declared)?;
        let upload_id = random_hex(16);
        let staging = self.root().join(".staging").join(&upload_id);
        // The folder before the journal row, so a row always has its folder on this node
        // ([`Shares::recover_uploads`]).
        tokio::fs::create_dir_all(&staging).await?;
        let reserved = self.reserve_upload(owner, declared_i, &upload_id).await;
        if let Err(e) = reserved {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e);
        }
        let result = self
            .receive_and_commit(
                owner, name, policy, declared, declared_i, &upload_id, &mut body,
            )
            .await;
        if result.is_err() {
            if let Err(e) = self.release_upload(owner, declared_i, &upload_id).await {
                tracing::error!(owner, error = %e, "share reservation not released");
            }
        }
        // Gone already when it was moved into place.
        let _ = tokio::fs::remove_dir_all(&staging).await;
        result
    }

    fn staging_root(&self) -> PathBuf {
        self.root().join(".staging")
    }

    /// Reserves `bytes` on `owner`'s free space and journals the upload `id`, in one
    /// transaction: a crash can never leave a reservation nobody knows about.
    async fn reserve_upload(&self, owner: &str, bytes: i64, id: &str) -> Result<(), ShareError> {
        let mut tx = self.inner.db.pool().begin().await?;
        // Same statement as Accounts::reserve, inside this transaction.
        let done = sqlx::query(
            "UPDATE accounts SET reserved_bytes = reserved_bytes + $2, updated_at = $3 \
             WHERE username = $1 AND quota_bytes - used_bytes - reserved_bytes >= $2",
        )
        .bind(owner)
        .bind(bytes)
        .bind(to_ms(SystemTime::now()).div_euclid(1000))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tx.rollback().await?;
            return Err(match self.inner.accounts.get(owner).await? {
                None => ShareError::NoAccount(owner.to_string()),
                Some(_) => ShareError::QuotaExceeded {
                    owner: owner.to_string(),
                    bytes: u64::try_from(bytes).unwrap_or(0),
                },
            });
        }
        sqlx::query(
            "INSERT INTO share_uploads (id, owner, reserved, started_at, node) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(owner)
        .bind(bytes)
        .bind(to_ms(SystemTime::now()))
        .bind(self.inner.settings.node.clone())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends the upload `id` without a share: its reservation back, its journal row gone, in one
    /// transaction. Nothing happens when the row is gone already (never released twice).
    async fn release_upload(&self, owner: &str, bytes: i64, id: &str) -> Result<(), ShareError> {
        let mut tx = self.inner.db.pool().begin().await?;
        let gone = sqlx::query("DELETE FROM share_uploads WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() == 1 {
            // Same arithmetic as Accounts::settle with nothing used.
            sqlx::query(
                "UPDATE accounts SET \
                 reserved_bytes = CASE WHEN reserved_bytes >= $2 THEN reserved_bytes - $2 ELSE 0 END, \
                 updated_at = $3 WHERE username = $1",
            )
            .bind(owner)
            .bind(bytes)
            .bind(to_ms(SystemTime::now()).div_euclid(1000))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Start-up recovery of uploads a crash interrupted (issue 10, finding 6): every journal
    /// row whose staging folder is on this node gets its reservation back, and every staging
    /// folder is removed (nothing is in flight before the server serves). Rows without a local
    /// folder belong to another node sharing the database and are left alone. Returns the
    /// recovered `(id, owner, bytes)`.
    pub async fn recover_uploads(&self) -> Result<Vec<(String, String, u64)>, ShareError> {
        let staging = self.staging_root();
        let mut local = std::collections::HashSet::new();
        match tokio::fs::read_dir(&staging).await {
            Ok(mut dir) => {
                while let Some(e) = dir.next_entry().await? {
                    local.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let rows = sqlx::query("SELECT id, owner, reserved, node FROM share_uploads")
            .fetch_all(self.inner.db.pool())
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            if !local.contains(&id) {
                continue;
            }
            // On a shared database, another live node's upload (nodes sharing one data_dir)
            // is not ours to release. A single node releases every row (its id may change
            // with its host name or port).
            let node: Option<String> = row.try_get("node")?;
            if let (Some(theirs), Some(me), true) = (
                &node,
                &self.inner.settings.node,
                self.inner.db.backend().is_shared(),
            ) {
                if theirs != me {
                    local.remove(&id);
                    continue;
                }
            }
            let owner: String = row.try_get("owner")?;
            let reserved: i64 = row.try_get("reserved")?;
            self.release_upload(&owner, reserved, &id).await?;
            tracing::info!(owner = %owner, bytes = reserved, "interrupted share upload: reservation released");
            out.push((id, owner, u64::try_from(reserved).unwrap_or(0)));
        }
        for name in local {
            tokio::fs::remove_dir_all(staging.join(name)).await?;
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    async fn receive_and_commit<S, E>(
        &self,
        owner: &str,
        name: &str,
        policy: Policy,
        declared: u64,
        declared_i: i64,
        upload_id: &str,
        body: &mut S,
    ) -> Result<Share, ShareError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: fmt::Display,
    {
        let piece_size = self.inner.settings.piece_size;
        let staging = self.staging_root().join(upload_id);
        let dir = staging.clone();
        let mut writer = blocking(move || ContentWriter::create(&dir, piece_size)).await?;
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batched = 0usize;
        let mut received = 0u64;
        let idle = self.inner.settings.idle_timeout;
        loop {
            let next = match tokio::time::timeout(idle, body.next()).await {
                Ok(n) => n,
                Err(_) => {
                    return Err(ShareError::Body(format!(
                        "the body stalled after {received} of {declared} bytes"
                    )))
                }
            };
            let chunk = match next {
                None => break,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    return Err(ShareError::Body(format!(
                        "body aborted after {received} bytes: {e}"
                    )))
                }
            };
            received += chunk.len() as u64;
            if received > declared {
                return Err(ShareError::Body(format!(
                    "body longer than the declared {declared} bytes"
                )));
            }
            batched += chunk.len();
            batch.push(chunk);
            if batched >= WRITE_BATCH {
                let b = std::mem::take(&mut batch);
                batched = 0;
                writer = blocking(move || writer.write(&b).map(|()| writer)).await?;
            }
        }
        if received != declared {
            return Err(ShareError::Body(format!(
                "body ended after {received} of {declared} bytes"
            )));
        }
        let name_owned = name.to_string();
        let (manifest_bytes, content_id, pieces) = blocking(move || {
            writer.write(&batch)?;
            writer.finish(&name_owned)
        })
        .await?;
        debug_assert_eq!(content_id, content_id_of(&manifest_bytes));

        let _guard = self.inner.finalize.lock().await;
        let target = self.content_dir(&content_id)?;
        if tokio::fs::metadata(target.join("manifest.json"))
            .await
            .is_err()
        {
            // A leftover partial directory (crash mid-rename is not possible, but a manual
            // copy might be) is replaced.
            let _ = tokio::fs::remove_dir_all(&target).await;
            tokio::fs::rename(&staging, &target).await?;
        }
        // Millisecond precision, as stored, so the value returned equals the one read back.
        let now = from_ms(to_ms(SystemTime::now()));
        let share = Share {
            owner: owner.to_string(),
            name: name.to_string(),
            content_id: content_id.clone(),
            size: declared,
            piece_size,
            pieces,
            policy,
            created_at: now,
        };
        // With an object store the content must be there before the row names it.
        if let Some(o) = &self.inner.objects {
            if let Err(e) = self.upload_content(o, &content_id).await {
                self.collect(&content_id).await;
                return Err(e);
            }
        }
        let replaced = match self.record(&share, declared_i, upload_id, now).await {
            Ok(r) => r,
            Err(e) => {
                self.collect(&content_id).await;
                return Err(e);
            }
        };
        if let Some(old) = replaced.filter(|old| *old != content_id) {
            self.collect(&old).await;
        }
        if self.inner.objects.is_some() {
            // The objects are the content now; the local folder was only its staging.
            let _ = tokio::fs::remove_dir_all(self.content_dir(&content_id)?).await;
        }
        tracing::info!(owner, name, content_id = %content_id, bytes = declared, pieces, "share published");
        Ok(share)
    }

    /// Writes the row (replacing `(owner, name)`) and settles the quota in one transaction.
    /// Returns the content id of the share it replaced.
    async fn record(
        &self,
        share: &Share,
        reserved: i64,
        upload_id: &str,
        now: SystemTime,
    ) -> Result<Option<String>, ShareError> {
        let mut tx = self.inner.db.pool().begin().await?;
        // Write first so SQLite takes the write lock up front (no read-to-write upgrade).
        sqlx::query("UPDATE accounts SET updated_at = updated_at WHERE username = $1")
            .bind(&share.owner)
            .execute(&mut *tx)
            .await?;
        let (old_id, old_size) = match take_row(&mut tx, &share.owner, &share.name).await? {
            Some((id, size)) => (Some(id), size),
            None => (None, 0),
        };
        sqlx::query(&format!(
            "INSERT INTO shares ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&share.owner)
        .bind(&share.name)
        .bind(&share.content_id)
        .bind(bytes_i64(share.size)?)
        .bind(bytes_i64(share.piece_size)?)
        .bind(bytes_i64(share.pieces)?)
        .bind(share.policy.as_string())
        .bind(to_ms(share.created_at))
        .execute(&mut *tx)
        .await?;
        // Same arithmetic as Accounts::settle and release_used, in one statement.
        let size = bytes_i64(share.size)?;
        let done = sqlx::query(
            "UPDATE accounts SET \
             reserved_bytes = CASE WHEN reserved_bytes >= $2 THEN reserved_bytes - $2 ELSE 0 END, \
             used_bytes = CASE WHEN used_bytes + $3 >= $4 THEN used_bytes + $3 - $4 ELSE 0 END, \
             updated_at = $5 WHERE username = $1",
        )
        .bind(&share.owner)
        .bind(reserved)
        .bind(size)
        .bind(old_size)
        .bind(to_ms(now).div_euclid(1000))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(ShareError::NoAccount(share.owner.clone()));
        }
        // The upload is over: its journal row goes with the reservation it recorded.
        sqlx::query("DELETE FROM share_uploads WHERE id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(old_id)
    }

    /// Deletes `owner`'s share `name`, giving its size back to the quota. False: no such share.
    pub async fn remove(&self, owner: &str, name: &str) -> Result<bool, ShareError> {
        let _guard = self.inner.finalize.lock().await;
        let mut tx = self.inner.db.pool().begin().await?;
        let Some((content_id, size)) = take_row(&mut tx, owner, name).await? else {
            tx.rollback().await?;
            return Ok(false);
        };
        sqlx::query(
            "UPDATE accounts SET used_bytes = CASE WHEN used_bytes >= $2 THEN used_bytes - $2 ELSE 0 END, \
             updated_at = $3 WHERE username = $1",
        )
        .bind(owner)
        .bind(size)
        .bind(to_ms(SystemTime::now()).div_euclid(1000))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        drop(_guard);
        self.collect(&content_id).await;
        Ok(true)
    }

    /// Deletes a content directory that no share names any more. Best effort: a failure
    /// leaves an orphan directory, never a row without its file.
    async fn collect(&self, content_id: &str) {
        let referenced = sqlx::query("SELECT 1 FROM shares WHERE content_id = $1 LIMIT 1")
            .bind(content_id)
            .fetch_optional(self.inner.db.pool())
            .await;
        match referenced {
            Ok(Some(_)) => {}
            Ok(None) => {
                if let Ok(dir) = self.content_dir(content_id) {
                    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
                        if e.kind() != io::ErrorKind::NotFound {
                            tracing::warn!(content_id, error = %e, "unshared content not deleted");
                        }
                    }
                }
                if let Some(o) = &self.inner.objects {
                    if let Err(e) = delete_objects(&**o, content_id).await {
                        tracing::warn!(content_id, error = %e, "unshared content objects not deleted");
                    }
                }
                self.inner.index.forget_content(content_id);
            }
            Err(e) => tracing::warn!(content_id, error = %e, "content reference check failed"),
        }
    }
}

/// Size of the part objects a content is kept in on an object store (any piece size reads
/// from at most two parts; ranged reads serve a piece without fetching more).
pub const PART_BYTES: usize = 4 * 1024 * 1024;

fn part_key(content_id: &str, part: u64) -> String {
    format!("shares/{content_id}/{part:010}.part")
}

fn object_err(e: ObjectError) -> ShareError {
    ShareError::Io(io::Error::other(e))
}

async fn delete_objects(o: &dyn ObjectBackend, content_id: &str) -> Result<(), ObjectError> {
    for e in o.list(&format!("shares/{content_id}")).await? {
        o.delete(&e.key).await?;
    }
    Ok(())
}

/// Bytes `offset..offset+len` of a content's part objects, one ranged get per part.
fn object_range(
    o: Objects,
    content_id: String,
    offset: u64,
    len: u64,
) -> BoxStream<'static, io::Result<Bytes>> {
    let end = offset.saturating_add(len);
    let part = PART_BYTES as u64;
    let parts = (offset / part)..end.div_ceil(part);
    futures_util::stream::iter(parts)
        .then(move |p| {
            let o = Arc::clone(&o);
            let key = part_key(&content_id, p);
            async move {
                let from = offset.max(p * part) - p * part;
                let to = end.min((p + 1) * part) - p * part;
                o.get_range(&key, from..to).await.map_err(io::Error::other)
            }
        })
        .boxed()
}

/// Bytes `offset..offset+len` of a content file, read in pieces of at most 64 KiB. A file
/// shorter than its manifest says breaks the body rather than padding it.
fn file_range(path: PathBuf, offset: u64, len: u64) -> BoxStream<'static, io::Result<Bytes>> {
    const READ_CHUNK: usize = 64 * 1024;
    let st = (path, None::<tokio::fs::File>, offset, len);
    futures_util::stream::unfold(st, |(path, mut file, offset, left)| async move {
        if left == 0 {
            return None;
        }
        if file.is_none() {
            let opened = async {
                let mut f = tokio::fs::File::open(&path).await?;
                f.seek(io::SeekFrom::Start(offset)).await?;
                Ok::<_, io::Error>(f)
            }
            .await;
            match opened {
                Ok(f) => file = Some(f),
                Err(e) => return Some((Err(e), (path, None, offset, 0))),
            }
        }
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(READ_CHUNK);
        let mut buf = vec![0u8; want];
        let f = file.as_mut()?;
        match f.read(&mut buf).await {
            Ok(0) => Some((
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "content file shorter than its manifest",
                )),
                (path, None, offset, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (path, file, offset, left - n as u64)))
            }
            Err(e) => Some((Err(e), (path, None, offset, 0))),
        }
    })
    .boxed()
}

/// Deletes `owner`'s share row `name` in `tx`; returns its content id and size, if it existed.
async fn take_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    owner: &str,
    name: &str,
) -> Result<Option<(String, i64)>, ShareError> {
    let old = sqlx::query("SELECT content_id, size FROM shares WHERE owner = $1 AND name = $2")
        .bind(owner)
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(old) = old else {
        return Ok(None);
    };
    sqlx::query("DELETE FROM shares WHERE owner = $1 AND name = $2")
        .bind(owner)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(Some((old.try_get("content_id")?, old.try_get("size")?)))
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ShareError> + Send + 'static,
) -> Result<T, ShareError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShareError::Io(io::Error::other(format!("storage task failed: {e}"))))?
}

/// The blocking side of a publish: appends to the content file and hashes pieces.
struct ContentWriter {
    dir: PathBuf,
    file: io::BufWriter<std::fs::File>,
    hasher: PieceHasher,
}

impl ContentWriter {
    fn create(dir: &Path, piece_size: u64) -> Result<ContentWriter, ShareError> {
        crate::secret::create_private_dir_all(dir)?;
        let file = std::fs::File::create(dir.join("content"))?;
        Ok(ContentWriter {
            dir: dir.to_path_buf(),
            file: io::BufWriter::with_capacity(256 * 1024, file),
            hasher: PieceHasher::new(piece_size),
        })
    }

    fn write(&mut self, chunks: &[Bytes]) -> Result<(), ShareError> {
        for c in chunks {
            self.file.write_all(c)?;
            self.hasher.update(c);
        }
        Ok(())
    }

    /// Makes the file durable, writes the manifest; returns (manifest bytes, content id,
    /// piece count).
    fn finish(self, name: &str) -> Result<(Vec<u8>, String, u64), ShareError> {
        let file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let manifest = self.hasher.finish(name);
        let pieces = piece_count(manifest.size, manifest.piece_size);
        let bytes = manifest.to_bytes();
        let id = content_id_of(&bytes);
        let mut m = std::fs::File::create(self.dir.join("manifest.json"))?;
        m.write_all(&bytes)?;
        m.sync_all()?;
        Ok((bytes, id, pieces))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::manifest::Manifest;
    use sha2::{Digest, Sha256};

    struct T {
        _dir: crate::storage::TestDb,
        data: PathBuf,
        db: Db,
        accounts: Accounts,
        shares: Shares,
    }

    async fn setup(piece_size: u64) -> T {
        let (dir, db) = crate::storage::test_db().await;
        let params = argon2::Params::new(256, 1, 1, None).unwrap();
        let accounts = Accounts::new(db.clone(), "example.com").with_argon2_params(params);
        accounts.add("1001", "pw", "1", 10_000).await.unwrap();
        accounts.add("1002", "pw", "2", 10_000).await.unwrap();
        let data = dir.path().join("data");
        let settings = ShareSettings {
            piece_size,
            idle_timeout: Duration::from_millis(300),
            ..ShareSettings::default()
        };
        let shares = Shares::open(db.clone(), &data, "example.com", settings)
            .await
            .unwrap();
        T {
            _dir: dir,
            data,
            db,
            accounts,
            shares,
        }
    }

    impl T {
        /// Publishes `body` in `chunk`-byte pieces of stream, declaring `declared` bytes.
        async fn publish(
            &self,
            owner: &str,
            name: &str,
            policy: Policy,
            declared: u64,
            body: &[u8],
            chunk: usize,
        ) -> Result<Share, ShareError> {
            self.shares
                .publish_stream(owner, name, policy, declared, chunks(body, chunk))
                .await
        }
    }

    /// Contents on a real S3-protocol server (s3s-fs): published into the bucket (parts and
    /// manifest), the local folder gone, read back whole and by ranges across parts, deleted
    /// with the last share.
    #[tokio::test]
    async fn contents_live_in_the_object_store() {
        use crate::storage::objects::tests::{s3_objects, start_s3s_fs};
        let Some(server) = start_s3s_fs() else { return };
        let mut t = setup(1000).await;
        let objects = s3_objects(&server, "cv-shares").await;
        assert!(t.shares.set_objects(Arc::clone(&objects)));
        let body = data(PART_BYTES + 5000, 3);
        t.accounts
            .set_quota("1001", 2 * body.len() as u64)
            .await
            .unwrap();
        let s = t
            .publish(
                "1001",
                "big.bin",
                Policy::Public,
                body.len() as u64,
                &body,
                65536,
            )
            .await
            .unwrap();
        let cid = s.content_id.clone();
        assert!(
            !t.data.join("shares").join(&cid).exists(),
            "local copy left"
        );
        let keys: Vec<String> = objects
            .list(&format!("shares/{cid}"))
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys.len(), 3, "{keys:?}"); // two parts + manifest
        let m = t.shares.manifest_bytes(&cid).await.unwrap();
        assert_eq!(content_id_of(&m), cid);
        let read = |off: u64, len: u64| {
            let st = t.shares.content_range(&cid, off, len).unwrap();
            async move {
                let parts: Vec<Bytes> = st.map(|b| b.unwrap()).collect().await;
                parts.concat()
            }
        };
        assert_eq!(read(0, body.len() as u64).await, body);
        let off = PART_BYTES as u64 - 10;
        assert_eq!(read(off, 30).await, &body[off as usize..off as usize + 30]);
        assert!(t.shares.remove("1001", "big.bin").await.unwrap());
        assert!(objects
            .list(&format!("shares/{cid}"))
            .await
            .unwrap()
            .is_empty());
    }

    fn chunks(data: &[u8], n: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let v: Vec<Result<Bytes, io::Error>> = data
            .chunks(n)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(v)
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn used(t: &T, user: &str) -> (u64, u64) {
        let a = t.accounts.require(user).await.unwrap();
        (a.used_bytes, a.reserved_bytes)
    }

    #[tokio::test]
    async fn publish_builds_manifest_pieces_and_row() {
        let t = setup(1000).await;
        let d = data(2500, 1);
        let s = t
            .publish("1001", "f.bin", Policy::Public, 2500, &d, 333)
            .await
            .unwrap();
        assert_eq!((s.size, s.piece_size, s.pieces), (2500, 1000, 3));
        let mb = t.shares.manifest_bytes(&s.content_id).await.unwrap();
        assert_eq!(content_id_of(&mb), s.content_id);
        let m = Manifest::parse(&mb).unwrap();
        assert_eq!(m.name, "f.bin");
        assert_eq!(m.pieces[1], hex::encode(Sha256::digest(&d[1000..2000])));
        let stored = std::fs::read(t.shares.content_path(&s.content_id).unwrap()).unwrap();
        assert_eq!(stored, d);
        assert_eq!(used(&t, "1001").await, (2500, 0));
        assert_eq!(
            t.shares.get_by_name("1001", "f.bin").await.unwrap(),
            Some(s.clone())
        );
        assert_eq!(
            t.shares.get_by_content(&s.content_id).await.unwrap(),
            vec![s.clone()]
        );
        assert!(t.shares.get_by_content("nothex").await.unwrap().is_empty());
        // Staging is cleaned up.
        let staging: Vec<_> = std::fs::read_dir(t.data.join("shares/.staging"))
            .unwrap()
            .collect();
        assert!(staging.is_empty());
        let v = serde_json::to_value(s.view()).unwrap();
        assert_eq!(v["policy"], "public");
        assert_eq!(v["pieces"], 3);
    }

    #[tokio::test]
    async fn republish_replaces_and_releases_old_quota() {
        let t = setup(1000).await;
        let a = t
            .publish("1001", "f", Policy::Subscribers, 3000, &data(3000, 1), 700)
            .await
            .unwrap();
        assert_eq!(used(&t, "1001").await, (3000, 0));
        let b = t
            .publish("1001", "f", Policy::Subscribers, 1200, &data(1200, 2), 700)
            .await
            .unwrap();
        assert_ne!(a.content_id, b.content_id);
        assert_eq!(used(&t, "1001").await, (1200, 0));
        assert!(!t.shares.content_dir(&a.content_id).unwrap().exists());
        assert!(t
            .shares
            .get_by_content(&a.content_id)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            t.shares.get_by_name("1001", "f").await.unwrap(),
            Some(b.clone())
        );
        // Same bytes and name by another owner: one directory, two rows; removing one keeps it.
        let c = t
            .publish("1002", "f", Policy::Public, 1200, &data(1200, 2), 100)
            .await
            .unwrap();
        assert_eq!(c.content_id, b.content_id);
        assert_eq!(
            t.shares.get_by_content(&b.content_id).await.unwrap().len(),
            2
        );
        assert!(t.shares.remove("1001", "f").await.unwrap());
        assert!(!t.shares.remove("1001", "f").await.unwrap());
        assert_eq!(used(&t, "1001").await, (0, 0));
        assert!(t.shares.content_dir(&b.content_id).unwrap().exists());
        assert!(t.shares.remove("1002", "f").await.unwrap());
        assert!(!t.shares.content_dir(&b.content_id).unwrap().exists());
    }

    #[tokio::test]
    async fn refusals_store_nothing_and_keep_quota() {
        let t = setup(1000).await;
        let e = t
            .publish("1001", "big", Policy::Public, 10_001, &[], 1)
            .await
            .unwrap_err();
        assert!(
            matches!(e, ShareError::QuotaExceeded { bytes: 10_001, .. }),
            "{e}"
        );
        let e = t
            .publish("ghost", "x", Policy::Public, 1, &[1], 1)
            .await
            .unwrap_err();
        assert!(matches!(e, ShareError::NoAccount(_)), "{e}");
        let e = t
            .publish("1001", "../x", Policy::Public, 1, &[1], 1)
            .await
            .unwrap_err();
        assert!(matches!(e, ShareError::BadName(_)), "{e}");
        // Short body.
        let e = t
            .publish("1001", "short", Policy::Public, 500, &data(400, 0), 100)
            .await
            .unwrap_err();
        assert!(matches!(e, ShareError::Body(_)), "{e}");
        // Long body.
        let e = t
            .publish("1001", "long", Policy::Public, 300, &data(400, 0), 100)
            .await
            .unwrap_err();
        assert!(matches!(e, ShareError::Body(_)), "{e}");
        // A stalled body.
        let stalled =
            futures_util::stream::iter(vec![Ok::<_, io::Error>(Bytes::from_static(b"ab"))])
                .chain(futures_util::stream::pending());
        let e = t
            .shares
            .publish_stream("1001", "stall", Policy::Public, 5, Box::pin(stalled))
            .await
            .unwrap_err();
        assert!(matches!(e, ShareError::Body(_)), "{e}");
        assert_eq!(used(&t, "1001").await, (0, 0));
        assert!(t
            .shares
            .list_visible("1001", None)
            .await
            .unwrap()
            .is_empty());
        let leftovers = std::fs::read_dir(t.data.join("shares"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name() != ".staging")
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(leftovers, 0);
        let staging = std::fs::read_dir(t.data.join("shares/.staging"))
            .unwrap()
            .count();
        assert_eq!(staging, 0);
    }

    #[tokio::test]
    async fn manifest_is_checked_against_its_id() {
        let t = setup(1000).await;
        let s = t
            .publish("1001", "m", Policy::Public, 10, &data(10, 3), 10)
            .await
            .unwrap();
        // Not a content id: never a path, whatever it holds.
        for bad in ["../shares", "", &s.content_id.to_uppercase()] {
            let e = t.shares.manifest_bytes(bad).await.unwrap_err();
            assert!(matches!(e, ShareError::UnknownContent(_)), "{bad:?}: {e}");
        }
        let unknown = "0".repeat(64);
        let e = t.shares.manifest_bytes(&unknown).await.unwrap_err();
        assert!(matches!(e, ShareError::UnknownContent(_)), "{e}");
        // Bytes on disk that no longer hash to the id are refused, not served.
        let path = t
            .shares
            .content_dir(&s.content_id)
            .unwrap()
            .join("manifest.json");
        std::fs::write(&path, b"{}").unwrap();
        let e = t.shares.manifest_bytes(&s.content_id).await.unwrap_err();
        assert!(matches!(e, ShareError::Corrupt { .. }), "{e}");
    }

    #[tokio::test]
    async fn empty_file_has_no_pieces() {
        let t = setup(1000).await;
        let s = t
            .publish("1001", "empty", Policy::Public, 0, &[], 1)
            .await
            .unwrap();
        assert_eq!((s.size, s.pieces), (0, 0));
        let m = Manifest::parse(&t.shares.manifest_bytes(&s.content_id).await.unwrap()).unwrap();
        assert!(m.pieces.is_empty());
    }

    #[tokio::test]
    async fn listing_by_policy_and_tokens() {
        let t = setup(1000).await;
        let realm = "example.com";
        for (name, policy) in [
            ("pub", Policy::Public),
            ("subs", Policy::Subscribers),
            ("only1002", Policy::parse("1002", realm).unwrap()),
        ] {
            t.publish("1001", name, policy, 3, &name.as_bytes()[..3], 3)
                .await
                .unwrap();
        }
        let names = |v: Vec<Share>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        let anon = t.shares.list_visible("1001", None).await.unwrap();
        assert_eq!(names(anon), ["pub"]);
        let r1003 = Requester::subscriber("1003", realm);
        assert_eq!(
            names(t.shares.list_visible("1001", Some(&r1003)).await.unwrap()),
            ["pub", "subs"]
        );
        let r1002 = Requester::subscriber("1002", realm);
        assert_eq!(
            names(t.shares.list_visible("1001", Some(&r1002)).await.unwrap()),
            ["only1002", "pub", "subs"]
        );
        let owner = Requester::subscriber("1001", realm);
        assert_eq!(
            t.shares
                .list_visible("1001", Some(&owner))
                .await
                .unwrap()
                .len(),
            3
        );

        let s = t.shares.get_by_name("1001", "subs").await.unwrap().unwrap();
        let other = t.shares.get_by_name("1001", "pub").await.unwrap().unwrap();
        let tok = t.shares.issue_offer_token(&s.content_id);
        assert!(t.shares.verify_offer_token(&s.content_id, &tok));
        assert!(!t.shares.verify_offer_token(&other.content_id, &tok));
        assert!(!t.shares.verify_offer_token(&s.content_id, &tok[..10]));
        // The secret is persistent: a second instance on the same database agrees.
        let again = Shares::open(t.db.clone(), &t.data, realm, ShareSettings::default())
            .await
            .unwrap();
        assert!(again.verify_offer_token(&s.content_id, &tok));

        let offer = t.shares.offer(&s, "http://192.0.2.10:8080/");
        assert_eq!(offer.server_url, "http://192.0.2.10:8080");
        assert_eq!(
            offer.manifest_url,
            format!("http://192.0.2.10:8080/v1/shares/{}/manifest", s.content_id)
        );
        assert_eq!(
            offer.index_url,
            format!("http://192.0.2.10:8080/v1/index/{}", s.content_id)
        );
        assert_eq!(offer.token, tok);
        let v = serde_json::to_value(&offer).unwrap();
        for k in [
            "content_id",
            "name",
            "size",
            "piece_size",
            "pieces",
            "manifest_url",
            "index_url",
            "server_url",
            "token",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
