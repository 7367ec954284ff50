//! The HTTP API (axum): `/metrics`, accounts and stores (PROTOCOL 2.4, 2.5, 5), the operator's
//! API (PROTOCOL 8).
//!
//! | route | who |
//! | --- | --- |
//! | `GET /metrics` | anyone |
//! | `GET /v1/accounts/{user}` | the user (Basic/Digest) or admin |
//! | `GET /v1/stores` | own stores as sender, receiver or owner; all with admin; `?state=`, `?limit=` |
//! | `GET /v1/stores/{id}` | sender, receiver or owner; the store's download or upload token; admin |
//! | `GET /v1/stores/{id}/media?format=raw\|wav\|pcap` | receiver or owner; the download token; admin |
//! | `PUT /v1/stores/{id}/data` | the sender: the upload token, or the sender's Basic/Digest |
//! | `DELETE /v1/stores/{id}` | the receiver or admin ([`admin`]) |
//! | `GET /v1/calls`, `GET /v1/registrations` | admin: all; an account: its own ([`admin`]) |
//! | `GET /v1/events` (Server-Sent Events) | admin ([`events`]) |
//! | `GET /console`, `/console/console.js` | anyone (the page then needs the admin token) |
//! | `DELETE /v1/calls/{id}`, `POST /v1/accounts`, `PATCH`/`DELETE /v1/accounts/{user}` | admin |
//!
//! Tokens: a store has one secret (`Store::token`). The *download token* (in `download_url`,
//! given to the receiver with the ready note) is that secret; the *upload token* (in
//! `upload_url`, given to the sender with the prompt) is derived from it one-way
//! ([`crate::storage::capability::upload_token`]), so the sender's URL cannot download and the receiver's cannot upload.
//! The admin token is accepted only as `Authorization: Bearer` (never in a URL, which ends up
//! in logs). A token that does not open the addressed resource is answered `401`, as RFC 6750
//! does for an invalid token: the server cannot tell a token of another store from garbage.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod console;
pub mod errors;
pub mod events;
pub mod index_role;
pub mod media;
pub(crate) mod serve;
pub mod shares;
pub mod stores;
pub mod upload;
pub(crate) mod whole_call;

use crate::error_code::ErrorCode;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::Router;
use tokio::sync::{mpsc, watch};

use crate::sip::auth::{Algorithm, NonceKey, Verifier, DEFAULT_NONCE_TTL_SECS};
use crate::storage::stores::{StoreState, Stores};
use crate::storage::threshold::ThresholdLimits;
use crate::storage::Accounts;

pub use errors::ApiError;

// The store capabilities the API checks, and the live-tail registry its readers follow, are
// storage's; re-exported here for the API's callers.
pub use crate::storage::capability::{download_token, download_url, upload_token, upload_url};
pub use crate::storage::live::{LiveGuard, LiveStores};

/// Everything the handlers need; build with [`HttpState::new`], adjust the public fields,
/// then [`api_router`].
#[derive(Clone)]
pub struct HttpState {
    pub accounts: Accounts,
    pub stores: Stores,
    /// `storage.data_dir`: segments are under `<data_dir>/stores/<id>`.
    pub data_dir: PathBuf,
    /// `http.admin_token`; empty disables admin access.
    pub admin_token: String,
    /// Digest realm = `sip.domain`; also the domain of the AORs `sip:<user>@<realm>`.
    pub realm: String,
    /// Digest challenges offered on 401, strongest first (one header each), then Basic.
    pub digest_algorithms: Vec<Algorithm>,
    /// Nonces and the replay guard for HTTP Digest (its own key: HTTP and SIP nonces are
    /// not interchangeable).
    pub digest: Arc<Mutex<Verifier>>,
    /// Stores being written right now, for readers that follow the live tail.
    pub live: Arc<LiveStores>,
    pub upload: UploadPolicy,
    /// Where uploads report their progress (the ready notification of step 331 hangs off
    /// `ThresholdReached`). None: nobody listens.
    pub events: Option<mpsc::UnboundedSender<HttpEvent>>,
    /// Shared data (PROTOCOL 3); None: the share routes answer `503 shares-disabled`.
    pub shares: Option<crate::share::Shares>,
    /// Set to true at a clean shutdown: uploads in flight stop and finish `truncated`.
    pub stop: Arc<watch::Sender<bool>>,
    /// Lockouts and the cache of verified Basic credentials ([`auth`]).
    pub(crate) auth_limits: Arc<auth::AuthLimits>,
    /// The SIP core's admin channel (PROTOCOL 8); None: calls and registrations answer
    /// `503 admin-unavailable`.
    pub admin: Option<admin::AdminHandle>,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("data_dir", &self.data_dir)
            .field("admin", &!self.admin_token.is_empty())
            .field("realm", &self.realm)
            .field("digest_algorithms", &self.digest_algorithms)
            .field("upload", &self.upload)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    /// Defaults: realm = the accounts' realm, Digest SHA-256 and MD5, a fresh nonce key, an
    /// empty live registry, [`UploadPolicy::default`], no event listener.
    pub fn new(
        accounts: Accounts,
        stores: Stores,
        data_dir: impl Into<PathBuf>,
        admin_token: impl Into<String>,
    ) -> HttpState {
        let realm = accounts.realm().to_string();
        HttpState {
            accounts,
            stores,
            data_dir: data_dir.into(),
            admin_token: admin_token.into(),
            realm,
            digest_algorithms: vec![Algorithm::Sha256, Algorithm::Md5],
            digest: Arc::new(Mutex::new(Verifier::new(
                NonceKey::random(),
                DEFAULT_NONCE_TTL_SECS,
            ))),
            live: Arc::new(LiveStores::new()),
            upload: UploadPolicy::default(),
            events: None,
            shares: None,
            stop: Arc::new(watch::channel(false).0),
            auth_limits: Arc::new(auth::AuthLimits::new()),
            admin: None,
        }
    }

    pub(crate) fn emit(&self, ev: HttpEvent) {
        if let Some(tx) = &self.events {
            // A listener that went away is not the uploader's problem.
            let _ = tx.send(ev);
        }
    }
}

/// How `PUT .../data` stores a file.
#[derive(Debug, Clone, Copy)]
pub struct UploadPolicy {
    /// Payload bytes per record, so uploads read back like RTP stores (and as pcap).
    pub record_bytes: usize,
    /// Commit (fsync + publish to readers) when this much is buffered...
    pub commit_bytes: usize,
    /// ...or when the body pauses this long with something buffered.
    pub commit_interval: std::time::Duration,
    /// A body that sends nothing for this long ends the upload `truncated` (like RTP
    /// silence ending a store session).
    pub idle_timeout: std::time::Duration,
    /// `store.threshold_percent`: used for an adaptive request (a file has no playout rate).
    pub default_percent: u8,
    pub limits: ThresholdLimits,
}

impl Default for UploadPolicy {
    fn default() -> Self {
        UploadPolicy {
            record_bytes: 1200,
            commit_bytes: 64 * 1024,
            commit_interval: std::time::Duration::from_millis(20),
            idle_timeout: std::time::Duration::from_secs(10),
            default_percent: 30,
            limits: ThresholdLimits::default(),
        }
    }
}

/// What an upload reports through [`HttpState::events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpEvent {
    /// The store session of an upload started (the store is `receiving`).
    UploadStarted { store_id: String },
    /// Step 32 for an upload: `threshold_at` was just set; the ready note is due, with the
    /// store's `state` at that moment.
    ThresholdReached {
        store_id: String,
        received_bytes: u64,
        state: StoreState,
    },
    /// The upload ended (`complete` or `truncated`).
    UploadFinished {
        store_id: String,
        state: StoreState,
        received_bytes: u64,
    },
}

/// The whole API, `/metrics` included.
pub fn api_router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_with_stores))
        .route("/v1/accounts", post(admin::post_account))
        .route(
            "/v1/accounts/{user}",
            get(accounts::get_account)
                .patch(admin::patch_account)
                .delete(admin::delete_account),
        )
        .route("/v1/calls", get(admin::list_calls))
        .route("/v1/calls/{id}", delete(admin::delete_call))
        .route("/v1/registrations", get(admin::list_registrations))
        .route("/v1/events", get(events::events))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/v1/stores", get(stores::list_stores))
        .route(
            "/v1/stores/{id}",
            get(stores::get_store).delete(admin::delete_store),
        )
        .route("/v1/stores/{id}/media", get(stores::get_media))
        .route("/v1/stores/{id}/data", put(upload::put_data))
        .route("/v1/shares", get(shares::list_all_shares))
        .route("/v1/shares/{user}", get(shares::list_shares))
        .route(
            "/v1/shares/{user}/{name}",
            put(shares::put_share)
                .get(shares::get_share_or_manifest)
                .delete(shares::delete_share),
        )
        .route("/v1/pieces/{content_id}/{n}", get(shares::get_piece))
        .route("/v1/content/{content_id}", get(shares::get_content))
        .route("/v1/index/{content_id}", get(shares::get_index))
        .route(
            "/v1/index/{content_id}/announce",
            post(shares::post_announce),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::new(state))
}

/// Only `/metrics` (what `server.rs` serves until it builds an [`HttpState`]).
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

/// Kept for the current call site in `server.rs`; same as [`metrics_router`].
pub fn router() -> Router {
    metrics_router()
}

async fn metrics() -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

/// `/metrics` with `callvault_stores{state}` counted in the database at scrape time (why:
/// [`crate::metrics`]). A failed count leaves that family out; the rest is still served.
async fn metrics_with_stores(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
) -> impl IntoResponse {
    let counts = match state.stores.count_by_state().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "store counts for /metrics");
            None
        }
    };
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render_with(counts.as_deref()),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this resource",
    )
}

#[cfg(test)]
mod tests;
