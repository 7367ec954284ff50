//! The operator's API (PROTOCOL 8): calls, registrations, accounts over HTTP, deleting stores.
//!
//! | route | who |
//! | --- | --- |
//! | `GET /v1/calls` | admin: all; an account: the calls it is a party of |
//! | `DELETE /v1/calls/{id}` | admin |
//! | `GET /v1/registrations` | admin: all; an account: its own bindings |
//! | `POST /v1/accounts`, `PATCH`/`DELETE /v1/accounts/{user}` | admin |
//! | `DELETE /v1/stores/{id}` | the store's receiver, admin |
//!
//! Calls and registrations live in the sans-IO engine, which the core task owns: handlers ask
//! it through [`AdminHandle`] (a command channel; the core answers each command through a
//! oneshot), so the engine is never shared across tasks.

use crate::error_code::ErrorCode;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::auth::{authenticate, is_party, unauthorized, Caller};
use super::errors::ApiError;
use super::HttpState;
use crate::b2bua::engine::{CallSnapshot, LegSnapshot, RegistrationSnapshot};
use crate::b2bua::media::CallKey;
use crate::config::PromptFormat;
use crate::storage::accounts::AccountError;
use crate::storage::stores::{rfc3339, store_dir, ListFilter, StoreError, StoreState, Stores};
use crate::storage::threshold::Threshold;
use crate::storage::{AccountView, Accounts};

/// What the HTTP layer asks the core task (which owns the engine).
#[derive(Debug)]
pub enum AdminCommand {
    Calls(oneshot::Sender<Vec<CallSnapshot>>),
    /// Answers false when no such call is ringing or up.
    EndCall(CallKey, oneshot::Sender<bool>),
    Registrations(oneshot::Sender<Vec<RegistrationSnapshot>>),
    /// Ends the store sessions of a store still receiving; answers how many.
    EndStore(String, oneshot::Sender<usize>),
}

/// The HTTP side of the admin channel.
#[derive(Debug, Clone)]
pub struct AdminHandle {
    pub commands: mpsc::Sender<AdminCommand>,
    /// `media.record_calls`: answered calls are being recorded.
    pub record_calls: bool,
}

impl AdminHandle {
    /// A handle and the receiver the core task serves.
    pub fn new(record_calls: bool) -> (AdminHandle, mpsc::Receiver<AdminCommand>) {
        let (tx, rx) = mpsc::channel(64);
        (
            AdminHandle {
                commands: tx,
                record_calls,
            },
            rx,
        )
    }

    /// Sends a command and waits for the core's answer.
    pub(crate) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> AdminCommand,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        let gone = || ApiError::internal("the SIP core is not running");
        self.commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

fn admin_handle(state: &HttpState) -> Result<&AdminHandle, ApiError> {
    state
        .admin
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorCode::AdminUnavailable, "this server runs no SIP core"))
}

async fn caller(
    state: &HttpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    match authenticate(state, method, uri, headers).await? {
        None => Err(unauthorized(state, "credentials required")),
        Some(Caller::Token(_)) => Err(unauthorized(
            state,
            "not the admin token (a store token opens only its store)",
        )),
        Some(c) => Ok(c),
    }
}

pub(crate) async fn require_admin(
    state: &HttpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    match caller(state, method, uri, headers).await? {
        Caller::Admin => Ok(()),
        _ => Err(ApiError::forbidden("admin only")),
    }
}

// ------------------------------------------------------------------------------------------
// Calls

/// One call of `GET /v1/calls` (PROTOCOL 8).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallView {
    pub id: String,
    pub state: &'static str,
    pub from: String,
    pub to: String,
    pub started_at: String,
    pub answered_at: Option<String>,
    pub recording: bool,
    pub legs: Legs,
    pub stores: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Legs {
    pub a: LegView,
    pub b: LegView,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LegView {
    pub call_id: String,
    /// `transport:address` of the leg's SIP peer.
    pub remote: String,
    pub rtp: Option<RtpView>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RtpView {
    pub local_port: u16,
    pub remote: Option<String>,
    pub packets_in: u64,
    pub packets_out: u64,
}

fn leg_view(l: &LegSnapshot) -> LegView {
    LegView {
        call_id: l.call_id.clone(),
        remote: format!("{}:{}", l.remote.transport, l.remote.addr),
        rtp: l.rtp.map(|r| RtpView {
            local_port: r.local_port,
            remote: r.remote.map(|a| a.to_string()),
            packets_in: r.packets_in,
            packets_out: r.packets_out,
        }),
    }
}

/// The listing JSON of one call (also the payload of `call` events).
pub(crate) fn call_view(c: &CallSnapshot, record_calls: bool, stores: Vec<String>) -> CallView {
    CallView {
        id: c.id.to_string(),
        state: if c.up { "up" } else { "ringing" },
        from: format!("sip:{}", c.caller),
        to: format!("sip:{}", c.callee),
        started_at: rfc3339(c.started_at),
        answered_at: c.answered_at.map(rfc3339),
        recording: record_calls && c.up,
        legs: Legs {
            a: leg_view(&c.legs[0]),
            b: leg_view(&c.legs[1]),
        },
        stores,
    }
}

/// `user@domain` of a call party is `user` at our realm.
fn party_is(party: &str, user: &str, realm: &str) -> bool {
    is_party(&format!("sip:{party}"), user, realm)
}

/// The calls `caller` may see, as listed (stores in flight matched by either leg's Call-ID).
pub(crate) async fn visible_calls(
    state: &HttpState,
    caller: &Caller,
) -> Result<Vec<CallView>, ApiError> {
    let admin = admin_handle(state)?;
    let mut calls = admin.ask(AdminCommand::Calls).await?;
    if let Caller::User(u) = caller {
        calls.retain(|c| {
            party_is(&c.caller, u, &state.realm) || party_is(&c.callee, u, &state.realm)
        });
    }
    let mut open = Vec::new();
    if !calls.is_empty() {
        for st in [StoreState::Pending, StoreState::Receiving] {
            let filter = ListFilter {
                state: Some(st),
                ..ListFilter::default()
            };
            open.extend(state.stores.list(&filter).await?);
        }
    }
    Ok(calls
        .iter()
        .map(|c| {
            let stores = open
                .iter()
                .filter(|s| {
                    s.call_id
                        .as_deref()
                        .is_some_and(|id| c.legs.iter().any(|l| l.call_id == id))
                })
                .map(|s| s.id.clone())
                .collect();
            call_view(c, admin.record_calls, stores)
        })
        .collect())
}

pub(crate) async fn list_calls(
    State(state): State<Arc<HttpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<CallView>>, ApiError> {
    let who = caller(&state, &method, &uri, &headers).await?;
    Ok(Json(visible_calls(&state, &who).await?))
}

pub(crate) async fn delete_call(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    require_admin(&state, &method, &uri, &headers).await?;
    let not_found = || ApiError::not_found(format!("no call {id}"));
    let key: CallKey = id.parse().map_err(|_| not_found())?;
    if admin_handle(&state)?
        .ask(|tx| AdminCommand::EndCall(key, tx))
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

// ------------------------------------------------------------------------------------------
// Registrations

/// One binding of `GET /v1/registrations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RegistrationView {
    pub aor: String,
    pub contact: String,
    pub source: String,
    pub transport: String,
    pub expires_at: String,
    /// The REGISTER's User-Agent (at most 256 bytes); null when it sent none.
    pub user_agent: Option<String>,
}

pub(crate) fn registration_view(r: &RegistrationSnapshot) -> RegistrationView {
    RegistrationView {
        aor: format!("sip:{}", r.aor),
        contact: r.contact.clone(),
        source: r.source.to_string(),
        transport: r.transport.to_string(),
        expires_at: rfc3339(r.expires_at),
        user_agent: r.user_agent.clone(),
    }
}

pub(crate) async fn visible_registrations(
    state: &HttpState,
    caller: &Caller,
) -> Result<Vec<RegistrationView>, ApiError> {
    let mut regs = admin_handle(state)?
        .ask(AdminCommand::Registrations)
        .await?;
    if let Caller::User(u) = caller {
        regs.retain(|r| party_is(&r.aor, u, &state.realm));
    }
    Ok(regs.iter().map(registration_view).collect())
}

pub(crate) async fn list_registrations(
    State(state): State<Arc<HttpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<RegistrationView>>, ApiError> {
    let who = caller(&state, &method, &uri, &headers).await?;
    Ok(Json(visible_registrations(&state, &who).await?))
}

// ------------------------------------------------------------------------------------------
// Accounts

fn account_error(e: AccountError) -> ApiError {
    match e {
        AccountError::Exists(_) => ApiError::new(ErrorCode::AccountExists, e.to_string()),
        AccountError::InvalidPin | AccountError::InvalidPassword | AccountError::InvalidQuota => {
            ApiError::bad_request(e.to_string())
        }
        other => ApiError::from(other),
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// Body of `POST /v1/accounts`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewAccount {
    user: String,
    password: String,
    pin: String,
    quota_bytes: u64,
}

pub(crate) async fn post_account(
    State(state): State<Arc<HttpState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Json<NewAccount>, JsonRejection>,
) -> Result<(StatusCode, Json<AccountView>), ApiError> {
    require_admin(&state, &method, &uri, &headers).await?;
    let b = json_body(body)?;
    let account = state
        .accounts
        .add(&b.user, &b.password, &b.pin, b.quota_bytes)
        .await
        .map_err(account_error)?;
    tracing::info!(user = %b.user, "account added over HTTP");
    Ok((StatusCode::CREATED, Json(account.view())))
}

/// Body of `PATCH /v1/accounts/{user}`: every field optional; `prompt_format` and `threshold`
/// take `null` or `"default"` to go back to the server's setting.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountPatch {
    password: Option<String>,
    pin: Option<String>,
    quota_bytes: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    prompt_format: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    threshold: Option<Option<String>>,
}

/// Tells a field given as `null` (Some(None)) from one left out (None).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `null` or `"default"`: the server's setting.
fn or_default(v: Option<String>) -> Option<String> {
    v.filter(|s| s != "default")
}

pub(crate) async fn patch_account(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Json<AccountPatch>, JsonRejection>,
) -> Result<Json<AccountView>, ApiError> {
    let Path(user) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    require_admin(&state, &method, &uri, &headers).await?;
    let p = json_body(body)?;
    // Parse everything before changing anything, so a bad field changes nothing.
    let format = match p.prompt_format.clone().map(or_default) {
        Some(Some(f)) => Some(Some(f.parse::<PromptFormat>().map_err(|_| {
            ApiError::bad_request(format!("prompt_format {f:?}: json, text or default"))
        })?)),
        Some(None) => Some(None),
        None => None,
    };
    let threshold = match p.threshold.clone().map(or_default) {
        Some(Some(t)) => {
            Some(Some(t.parse::<Threshold>().map_err(|e| {
                ApiError::bad_request(format!("threshold {t:?}: {e}"))
            })?))
        }
        Some(None) => Some(None),
        None => None,
    };
    if let Some(pin) = &p.pin {
        crate::storage::accounts::validate_pin(pin).map_err(account_error)?;
    }
    let accounts = &state.accounts;
    accounts.require(&user).await.map_err(account_error)?;
    if let Some(pw) = &p.password {
        accounts
            .set_password(&user, pw)
            .await
            .map_err(account_error)?;
    }
    if let Some(pin) = &p.pin {
        accounts.set_pin(&user, pin).await.map_err(account_error)?;
    }
    if let Some(q) = p.quota_bytes {
        accounts.set_quota(&user, q).await.map_err(account_error)?;
    }
    if let Some(f) = format {
        accounts
            .set_prompt_format(&user, f)
            .await
            .map_err(account_error)?;
    }
    if let Some(t) = threshold {
        accounts
            .set_threshold(&user, t)
            .await
            .map_err(account_error)?;
    }
    tracing::info!(%user, "account changed over HTTP");
    let account = accounts.require(&user).await.map_err(account_error)?;
    Ok(Json(account.view()))
}

pub(crate) async fn delete_account(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path(user) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    require_admin(&state, &method, &uri, &headers).await?;
    state.accounts.remove(&user).await.map_err(account_error)?;
    tracing::info!(%user, "account removed over HTTP");
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------------------------
// Stores

/// How long `DELETE /v1/stores/{id}` waits for a receiving store to finish after ending its
/// session.
const END_STORE_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn delete_store(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let who = caller(&state, &method, &uri, &headers).await?;
    let not_found = || ApiError::not_found(format!("no store {id}"));
    let store = state.stores.get(&id).await?.ok_or_else(not_found)?;
    match &who {
        Caller::Admin => {}
        Caller::User(u) if is_party(&store.receiver, u, &state.realm) => {}
        _ => {
            return Err(ApiError::forbidden(
                "only the store's receiver or admin deletes a store",
            ))
        }
    }
    if store.state == StoreState::Receiving {
        end_receiving(&state, &id).await?;
    }
    let objects = state.live.objects();
    if !remove_store(
        &state.stores,
        &state.accounts,
        &state.data_dir,
        objects,
        &id,
    )
    .await?
    {
        return Err(not_found());
    }
    tracing::info!(store = %id, "store deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a finished store: its row, its media, and the quota it used. False: no such store.
/// (`DELETE /v1/stores/{id}` and `store.retention_days`.)
pub(crate) async fn remove_store(
    stores: &Stores,
    accounts: &Accounts,
    data_dir: &FsPath,
    objects: Option<&crate::storage::objects::Objects>,
    id: &str,
) -> Result<bool, StoreError> {
    let dir = store_dir(data_dir, id)?;
    let Some(gone) = stores.delete(id).await? else {
        return Ok(false);
    };
    if let Some(owner) = gone.owner.as_deref().filter(|_| gone.state.has_data()) {
        if let Err(e) = accounts.release_used(owner, gone.received_bytes).await {
            tracing::warn!(store = %id, error = %e, "quota of a deleted store not released");
        }
    }
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(store = %id, error = %e, "media of a deleted store not removed"),
    }
    if let Some(o) = objects {
        if let Err(e) = crate::storage::objects::chunks::delete_store(&**o, id).await {
            tracing::warn!(store = %id, error = %e, "chunks of a deleted store not removed");
        }
    }
    Ok(true)
}

/// Ends the store's SIP session and waits for the store to leave `receiving`.
async fn end_receiving(state: &HttpState, id: &str) -> Result<(), ApiError> {
    let owned = id.to_string();
    admin_handle(state)?
        .ask(|tx| AdminCommand::EndStore(owned, tx))
        .await?;
    let deadline = SystemTime::now() + END_STORE_WAIT;
    loop {
        match state.stores.get(id).await? {
            Some(s) if s.state == StoreState::Receiving => {}
            _ => return Ok(()),
        }
        if SystemTime::now() > deadline {
            return Err(ApiError::new(
                ErrorCode::StoreReceiving,
                "the store is still receiving; try again",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
