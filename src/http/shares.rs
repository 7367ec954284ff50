//! Shared-data endpoints (PROTOCOL 3, 5 Shares).
//!
//! | route | who |
//! | --- | --- |
//! | `PUT /v1/shares/{user}/{name}[?policy=]` | the user (Basic/Digest) or admin |
//! | `GET /v1/shares/{user}` | anyone: the user's shares the caller may fetch |
//! | `GET /v1/shares/{user}/{name}` | who may fetch it: the share's metadata |
//! | `DELETE /v1/shares/{user}/{name}` | the user or admin |
//! | `GET /v1/shares/{content_id}/manifest` | content access (below) |
//! | `GET /v1/pieces/{content_id}/{n}` | content access |
//! | `GET /v1/content/{content_id}` (Range) | content access |
//! | `GET /v1/index/{content_id}` | content access |
//! | `POST /v1/index/{content_id}/announce` | content access with credentials (never anonymous) |
//!
//! The two index routes are also what `callvault index` serves ([`super::index_role`]), with
//! the same handlers and the same [`content_access`] over the same database. When the index
//! runs as its own role (`index.url` set, [`crate::share::ShareSettings::index_base`] here), serve's index
//! routes answer `307 Temporary Redirect` to it (path and query kept, so a POST stays a POST
//! with its body), before any authentication: the role checks access itself.
//!
//! Content access: the content's offer token (`?token=` or Bearer), the Basic/Digest of a
//! user some share of the content allows (its owner always), admin, or nobody at all when a
//! share of it is `public`. A token for other content is `401` (the server cannot tell it
//! from garbage), an authenticated user the policy refuses `403`. A token given under the
//! policy names its holder and is checked against the policy in force
//! ([`crate::share::TokenGrant`]): after the owner narrows the policy it is `403`.
//!
//! Announces (issue 10, finding 9) also need credentials (the offer token or an account): the
//! holder list steers other peers' traffic. Each holder is recorded under its announcer (a
//! digest of the token, or the user): `409 peer-id-taken` for another's peer id, `429
//! too-many-holders` past the per-announcer cap, `503 index-full` when the content is full.
//!
//! `/v1/shares/{content_id}/manifest` and `/v1/shares/{user}/{name}` have the same shape: a
//! GET whose first segment is 64 lowercase hex digits and whose second is `manifest` is the
//! manifest (user names that look like content ids cannot have a share called `manifest`
//! read by name; publishing and the manifest route are unaffected).
//!
//! Upload: checks in order `401` (no or bad credentials), `403` (another user), `400
//! bad-name`, `400 bad-policy`, `411` (no Content-Length), `403 quota-exceeded`; the body is
//! cut into pieces and hashed as it arrives ([`Shares::publish_stream`]) in a task of its
//! own, so a client that disconnects still gets its reservation and partial file cleaned up.
//!
//! Downloads (pieces, content) read the content file in slices and pass through the server's
//! shared egress limiter ([`crate::share::rate`]), which also counts
//! `callvault_share_bytes_total{source="server"}`.

use crate::error_code::ErrorCode;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HOST, LOCATION,
    RANGE,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth::{authenticate, unauthorized, Caller};
use super::errors::ApiError;
use super::HttpState;
use crate::metrics::ShareSource;
use crate::share::index::{Bitfield, IndexError};
use crate::share::manifest::{is_sha256_hex, percent_encode, piece_range, validate_name};
use crate::share::rate::throttle;
use crate::share::select::SourceClass;
use crate::share::{Policy, Requester, Share, ShareError, ShareView, Shares, TokenGrant};
use crate::storage::stores::rfc3339;
use sha2::{Digest as _, Sha256};

type QueryArg = Result<Query<HashMap<String, String>>, QueryRejection>;

impl From<ShareError> for ApiError {
    fn from(e: ShareError) -> ApiError {
        match e {
            ShareError::BadName(_) => ApiError::new(ErrorCode::BadName, e.to_string()),
            ShareError::BadPolicy(_) => ApiError::new(ErrorCode::BadPolicy, e.to_string()),
            ShareError::NoAccount(_) | ShareError::UnknownContent(_) => {
                ApiError::not_found(e.to_string())
            }
            ShareError::QuotaExceeded { .. } => {
                ApiError::new(ErrorCode::QuotaExceeded, e.to_string())
            }
            ShareError::TooLarge(_) => ApiError::new(ErrorCode::TooLarge, e.to_string()),
            ShareError::Body(_) => ApiError::new(ErrorCode::IncompleteBody, e.to_string()),
            other => {
                tracing::error!(error = %other, "share operation failed");
                ApiError::new(ErrorCode::StorageError, "share storage error")
            }
        }
    }
}

fn shares(state: &HttpState) -> Result<&Shares, ApiError> {
    state.shares.as_ref().ok_or_else(|| {
        ApiError::new(
            ErrorCode::SharesDisabled,
            "shared data is not enabled on this server",
        )
    })
}

fn path2(p: Result<Path<(String, String)>, PathRejection>) -> Result<(String, String), ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn path1(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn query_map(q: QueryArg) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn requester_of(state: &HttpState, caller: Option<&Caller>) -> Option<Requester> {
    match caller {
        Some(Caller::User(u)) => Some(Requester::subscriber(u, &state.realm)),
        _ => None,
    }
}

/// Checks content access (module docs) and returns the content's oldest share (size and
/// pieces are the content's, so any share of it serves). The one access check of every
/// content route, in serve and in the `callvault index` role.
pub(crate) async fn content_access(
    state: &HttpState,
    content_id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Share, ApiError> {
    content_access_as(state, content_id, method, uri, headers)
        .await
        .map(|(share, _)| share)
}

/// [`content_access`], also giving who was let in.
async fn content_access_as(
    state: &HttpState,
    content_id: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(Share, Option<Caller>), ApiError> {
    let sh = shares(state)?;
    let caller = authenticate(state, method, uri, headers).await?;
    let rows = if is_sha256_hex(content_id) {
        sh.get_by_content(content_id).await?
    } else {
        Vec::new()
    };
    authorize(state, sh, content_id, &rows, caller.as_ref())?;
    let share = rows
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("no shared content {content_id}")))?;
    Ok((share, caller))
}

/// May `caller` read content `content_id`, given the shares naming it? Admin and a token for
/// this content may; a user if some share's policy allows them (`403` if none does); nobody
/// at all only when some share is open to anyone.
fn authorize(
    state: &HttpState,
    sh: &Shares,
    content_id: &str,
    rows: &[Share],
    caller: Option<&Caller>,
) -> Result<(), ApiError> {
    if rows.is_empty() {
        return Err(ApiError::not_found(format!(
            "no shared content {content_id}"
        )));
    }
    let allowed = |r: Option<&Requester>| rows.iter().any(|s| sh.may_fetch(s, r));
    match caller {
        Some(Caller::Admin) => Ok(()),
        // A token given under the policy is checked against the policy in force now.
        Some(Caller::Token(t)) => match sh.offer_token_grant(content_id, t) {
            Some(TokenGrant::Consent) => Ok(()),
            Some(TokenGrant::Holder(r)) if allowed(r.as_ref()) => Ok(()),
            Some(TokenGrant::Holder(_)) => Err(ApiError::forbidden(
                "the sharing policy no longer includes this token's holder",
            )),
            None => Err(unauthorized(state, "token does not open this content")),
        },
        Some(Caller::User(_)) if allowed(requester_of(state, caller).as_ref()) => Ok(()),
        Some(Caller::User(_)) => Err(ApiError::forbidden(
            "the sharing policy does not include you",
        )),
        None if allowed(None) => Ok(()),
        None => Err(unauthorized(
            state,
            "credentials or the offer token required",
        )),
    }
}

/// Authenticated as `owner` (or admin) for changes to `owner`'s shares.
async fn require_owner(
    state: &HttpState,
    owner: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    match authenticate(state, method, uri, headers).await? {
        None => Err(unauthorized(state, "credentials required")),
        Some(Caller::Token(_)) => Err(unauthorized(
            state,
            "a content token cannot change shares; use the account's credentials",
        )),
        Some(Caller::Admin) => Ok(()),
        Some(Caller::User(u)) if u == owner => Ok(()),
        Some(Caller::User(_)) => Err(ApiError::forbidden(format!(
            "only {owner} may change {owner}'s shares"
        ))),
    }
}

fn content_length(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(v) = headers.get(CONTENT_LENGTH) else {
        return Err(ApiError::new(
            ErrorCode::LengthRequired,
            "Content-Length (the file size) is required",
        ));
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))
}

/// `PUT /v1/shares/{user}/{name}[?policy=public|subscribers|AOR,AOR]`.
pub(crate) async fn put_share(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: QueryArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (owner, name) = path2(path)?;
    let q = query_map(query)?;
    let sh = shares(&state)?.clone();
    require_owner(&state, &owner, &method, &uri, &headers).await?;
    validate_name(&name).map_err(ShareError::from)?;
    let policy = Policy::parse(q.get("policy").map_or("", String::as_str), &state.realm)
        .map_err(ShareError::from)?;
    let len = content_length(&headers)?;
    // Its own task: a dropped connection must not cancel the cleanup of a failed upload.
    let task = tokio::spawn(async move {
        sh.publish_stream(&owner, &name, policy, len, body.into_data_stream())
            .await
    });
    let share = match task.await {
        Ok(r) => r?,
        Err(e) => {
            tracing::error!(error = %e, "publish task failed");
            return Err(ApiError::internal("publish failed"));
        }
    };
    let mut resp = (StatusCode::CREATED, Json(share.view())).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/shares/{}/manifest", share.content_id)) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

/// `GET /v1/shares/{user}/{name}` (metadata) or `GET /v1/shares/{content_id}/manifest`.
pub(crate) async fn get_share_or_manifest(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (first, second) = path2(path)?;
    if second == "manifest" && is_sha256_hex(&first) {
        content_access(&state, &first, &method, &uri, &headers).await?;
        let bytes = shares(&state)?.manifest_bytes(&first).await?;
        return Ok((
            [
                (CONTENT_TYPE, HeaderValue::from_static("application/json")),
                // Content-addressed: the bytes for this id never change.
                (
                    CACHE_CONTROL,
                    HeaderValue::from_static("private, max-age=86400"),
                ),
            ],
            bytes,
        )
            .into_response());
    }
    let sh = shares(&state)?;
    let caller = authenticate(&state, &method, &uri, &headers).await?;
    let share = sh
        .get_by_name(&first, &second)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{first} shares no {second:?}")))?;
    authorize(
        &state,
        sh,
        &share.content_id,
        std::slice::from_ref(&share),
        caller.as_ref(),
    )?;
    Ok(Json(share.view()).into_response())
}

/// Most shares `GET /v1/shares` lists.
const LIST_ALL_MAX: u32 = 1000;

/// `GET /v1/shares[?limit=N]` (admin): every share, newest first (the console's share list;
/// each share's holders and their pieces are its index, `GET /v1/index/{content_id}`).
pub(crate) async fn list_all_shares(
    State(state): State<Arc<HttpState>>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<ShareView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    match authenticate(&state, &method, &uri, &headers).await? {
        Some(Caller::Admin) => {}
        Some(_) => return Err(ApiError::forbidden("listing every share is for the admin")),
        None => return Err(unauthorized(&state, "the admin token is needed")),
    }
    let limit = match query.get("limit") {
        None => LIST_ALL_MAX,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=LIST_ALL_MAX).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("bad limit {l:?} (1..=1000)")))?,
    };
    let list = shares(&state)?.list_all(limit).await?;
    Ok(Json(list.iter().map(Share::view).collect()))
}

/// `GET /v1/shares/{user}`: what the caller may fetch of `user`'s shares, by name.
pub(crate) async fn list_shares(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<ShareView>>, ApiError> {
    let owner = path1(path)?;
    let sh = shares(&state)?;
    let caller = authenticate(&state, &method, &uri, &headers).await?;
    let list = match &caller {
        Some(Caller::Admin) => {
            let me = Requester::subscriber(&owner, &state.realm);
            sh.list_visible(&owner, Some(&me)).await?
        }
        // A content token is no identity: it lists what anybody may see.
        _ => {
            sh.list_visible(&owner, requester_of(&state, caller.as_ref()).as_ref())
                .await?
        }
    };
    Ok(Json(list.iter().map(Share::view).collect()))
}

/// `DELETE /v1/shares/{user}/{name}`.
pub(crate) async fn delete_share(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (owner, name) = path2(path)?;
    let sh = shares(&state)?;
    require_owner(&state, &owner, &method, &uri, &headers).await?;
    if sh.remove(&owner, &name).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("{owner} shares no {name:?}")))
    }
}

/// `len` bytes of the content file from `offset`, through the egress limiter, as an
/// `application/octet-stream` response with its `Content-Length`.
fn octet_response(
    state: &HttpState,
    content_id: &str,
    offset: u64,
    len: u64,
) -> Result<Response, ApiError> {
    let sh = shares(state)?;
    let body = Body::from_stream(throttle(
        sh.content_range(content_id, offset, len)?,
        sh.limiter().clone(),
        ShareSource::Server,
    ));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// `GET /v1/pieces/{content_id}/{n}`.
pub(crate) async fn get_piece(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<(String, String)>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (content_id, n) = path2(path)?;
    let share = content_access(&state, &content_id, &method, &uri, &headers).await?;
    let n: u64 = n
        .parse()
        .map_err(|_| ApiError::bad_request(format!("bad piece number {n:?}")))?;
    let (offset, len) = piece_range(share.size, share.piece_size, n).ok_or_else(|| {
        ApiError::not_found(format!(
            "piece {n} of {content_id}: it has {} pieces",
            share.pieces
        ))
    })?;
    octet_response(&state, &content_id, offset, len)
}

/// What a `Range` header asks of a `size`-byte body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeAsk {
    /// No (usable) Range: the whole body, `200`.
    Whole,
    /// `206` with `(first, last)` inclusive.
    Part(u64, u64),
    /// `416`.
    Unsatisfiable,
}

/// Single ranges only (`bytes=a-b`, `a-`, `-n`); a multi-range or malformed header is
/// ignored (RFC 9110 14.2 lets a server serve the whole representation instead).
pub(crate) fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(h) = header else {
        return RangeAsk::Whole;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAsk::Whole;
    };
    if spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), b.is_empty()) {
        // -n: the last n bytes.
        (true, false) => match num(b) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(size.saturating_sub(n), size - 1),
            None => RangeAsk::Whole,
        },
        // a-
        (false, true) => match num(a) {
            Some(first) if first < size => RangeAsk::Part(first, size - 1),
            Some(_) => RangeAsk::Unsatisfiable,
            None => RangeAsk::Whole,
        },
        // a-b
        (false, false) => match (num(a), num(b)) {
            (Some(first), Some(last)) if first <= last => {
                if first < size {
                    RangeAsk::Part(first, last.min(size - 1))
                } else {
                    RangeAsk::Unsatisfiable
                }
            }
            _ => RangeAsk::Whole,
        },
        (true, true) => RangeAsk::Whole,
    }
}

/// `GET /v1/content/{content_id}` with HTTP Range.
pub(crate) async fn get_content(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let content_id = path1(path)?;
    let share = content_access(&state, &content_id, &method, &uri, &headers).await?;
    let size = share.size;
    let range = parse_range(headers.get(RANGE).and_then(|v| v.to_str().ok()), size);
    let (status, offset, len) = match range {
        RangeAsk::Whole => (StatusCode::OK, 0, size),
        RangeAsk::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        RangeAsk::Unsatisfiable => {
            let mut r = ApiError::new(
                ErrorCode::RangeNotSatisfiable,
                format!("the content has {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let mut resp = octet_response(&state, &content_id, offset, len)?;
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {offset}-{}/{size}", offset + len - 1))
        {
            h.insert(CONTENT_RANGE, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename*=UTF-8''{}",
        rfc8187_value(&share.name)
    )) {
        h.insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// RFC 8187 value encoding (attr-char kept, everything else %XX).
fn rfc8187_value(s: &str) -> String {
    percent_encode(s, crate::share::manifest::ATTR_CHAR)
}

/// One holder in the index JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct HolderView {
    pub peer_id: String,
    pub address: String,
    pub have: String,
    pub last_seen: String,
    /// `server`, `peer` or `mobile` (an addition to PROTOCOL 5's holder fields).
    pub class: &'static str,
}

/// The index JSON (`GET index_url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct IndexView {
    pub content_id: String,
    pub pieces: u64,
    pub holders: Vec<HolderView>,
}

fn index_view(sh: &Shares, share: &Share, headers: &HeaderMap) -> IndexView {
    let now = SystemTime::now();
    let pieces = usize::try_from(share.pieces).unwrap_or(usize::MAX);
    let server_address = sh
        .settings()
        .server_address
        .clone()
        .or_else(|| {
            headers
                .get(HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let mut holders = vec![HolderView {
        peer_id: "server".into(),
        address: server_address,
        have: Bitfield::full(pieces).to_base64(),
        last_seen: rfc3339(now),
        class: SourceClass::Server.as_str(),
    }];
    holders.extend(
        sh.index()
            .holders(&share.content_id, now)
            .into_iter()
            .map(|h| HolderView {
                peer_id: h.peer_id,
                address: h.address,
                have: h.have.to_base64(),
                last_seen: rfc3339(h.last_seen),
                class: h.class.as_str(),
            }),
    );
    IndexView {
        content_id: share.content_id.clone(),
        pieces: share.pieces,
        holders,
    }
}

/// With the index in a role of its own: `307` to the same path and query there. With the
/// index on the terminals (claim 8): `503`, serve keeps none.
fn index_redirect(state: &HttpState, uri: &Uri) -> Option<Response> {
    if state.shares.as_ref()?.settings().terminal_index.is_some() {
        return Some(
            ApiError::new(
                ErrorCode::IndexOnTerminals,
                "the piece index lives on the terminals: use the offer's dht_bootstrap",
            )
            .into_response(),
        );
    }
    let base = state.shares.as_ref()?.settings().index_base.as_deref()?;
    let mut location = format!("{}{}", base.trim_end_matches('/'), uri.path());
    if let Some(q) = uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let value = HeaderValue::from_str(&location).ok()?;
    Some(
        (
            StatusCode::TEMPORARY_REDIRECT,
            [
                (LOCATION, value),
                (CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
    )
}

/// `GET /v1/index/{content_id}`.
pub(crate) async fn get_index(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(r) = index_redirect(&state, &uri) {
        return Ok(r);
    }
    let content_id = path1(path)?;
    let share = content_access(&state, &content_id, &method, &uri, &headers).await?;
    Ok(Json(index_view(shares(&state)?, &share, &headers)).into_response())
}

#[derive(Debug, Deserialize)]
struct Announce {
    peer_id: String,
    address: String,
    have: String,
    /// `peer` (default) or `mobile`.
    #[serde(default)]
    class: Option<String>,
}

/// `POST /v1/index/{content_id}/announce {"peer_id","address","have"[,"class"]}`; answers
/// the index.
pub(crate) async fn post_announce(
    State(state): State<Arc<HttpState>>,
    path: Result<Path<String>, PathRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(r) = index_redirect(&state, &uri) {
        return Ok(r);
    }
    let content_id = path1(path)?;
    let (share, caller) = content_access_as(&state, &content_id, &method, &uri, &headers).await?;
    // Announces are authenticated (issue 10): the holder list steers other peers' traffic.
    let announcer = match &caller {
        None => {
            return Err(unauthorized(
                &state,
                "announces need the offer token or an account",
            ))
        }
        Some(Caller::Token(t)) => format!("token:{}", hex::encode(&Sha256::digest(t)[..16])),
        Some(Caller::User(u)) => format!("user:{u}"),
        Some(Caller::Admin) => "admin".to_string(),
    };
    let bad = |detail: String| ApiError::new(ErrorCode::BadAnnounce, detail);
    let a: Announce = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "announce body: {e} (want {{\"peer_id\",\"address\",\"have\"[,\"class\"]}})"
        ))
    })?;
    let class = match a.class.as_deref() {
        None => SourceClass::Peer,
        Some(c) => SourceClass::parse_announced(c)
            .ok_or_else(|| bad(format!("class {c:?}: want \"peer\" or \"mobile\"")))?,
    };
    let pieces = usize::try_from(share.pieces).unwrap_or(usize::MAX);
    let have = Bitfield::from_base64(&a.have, pieces).map_err(|e| bad(e.to_string()))?;
    let sh = shares(&state)?;
    sh.index()
        .announce_as(
            &content_id,
            &a.peer_id,
            &a.address,
            class,
            have,
            &announcer,
            SystemTime::now(),
        )
        .map_err(|e| match e {
            IndexError::PeerIdTaken(_) => ApiError::new(ErrorCode::PeerIdTaken, e.to_string()),
            IndexError::TooManyFromAnnouncer => {
                ApiError::new(ErrorCode::TooManyHolders, e.to_string())
            }
            IndexError::Full => {
                ApiError::new(ErrorCode::IndexFull, e.to_string()).with_retry_after(60)
            }
            _ => bad(e.to_string()),
        })?;
    Ok(Json(index_view(sh, &share, &headers)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeAsk::*;
        assert_eq!(parse_range(None, 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=90-200"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=50-"), 100), Part(50, 99));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Part(90, 99));
        assert_eq!(parse_range(Some("bytes=-500"), 100), Part(0, 99));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Unsatisfiable);
        // Ignored: malformed, reversed, multi-range, other units.
        assert_eq!(parse_range(Some("bytes=9-0"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=a-b"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=-"), 100), Whole);
        assert_eq!(parse_range(Some("bytes=+1-2"), 100), Whole);
    }

    #[test]
    fn filename_encoding() {
        assert_eq!(rfc8187_value("a b.txt"), "a%20b.txt");
        assert_eq!(rfc8187_value("é\"x"), "%C3%A9%22x");
    }

    #[test]
    fn share_errors_map_to_codes() {
        let e: ApiError = ShareError::QuotaExceeded {
            owner: "a".into(),
            bytes: 1,
        }
        .into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, ErrorCode::QuotaExceeded)
        );
        let e: ApiError = ShareError::BadName(crate::share::manifest::NameError::Dot).into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, ErrorCode::BadName)
        );
        let e: ApiError = ShareError::UnknownContent("x".into()).into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e: ApiError = ShareError::Body("short".into()).into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
