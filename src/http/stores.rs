//! Store endpoints (PROTOCOL 2.4, 2.5, 5): metadata, listing, media download following the
//! live tail, and `PUT upload_url` for files that are not media.
//!
//! Download: records are read in order and encoded ([`super::media`]) by a producer task
//! that feeds the response body through a small channel, so a client that stops reading
//! stops the reading, and a client that goes away ends the task even while it waits for the
//! live tail. A `receiving` store registered in [`super::LiveStores`] is followed through its
//! writer's watch; one that is not (registration race, or a writer in another process) is
//! followed by polling the disk and the database every [`POLL_INTERVAL`].
//!
//! Before the threshold (step 32) a `receiving` store answers `503 not-ready` with
//! `Retry-After`, as a play session gets `480` (step 333). `pending`, `expired` and `rejected`
//! stores have no data: `409 no-data`.
//!
//! Upload: the sender is the holder of the upload token (see [`super::upload_token`]) or the
//! account named as the store's sender, by Basic or Digest. Checks in the order of step 211:
//! unknown/used/expired store `404 unknown-store`, no or bad credentials `401`, not the sender
//! `403 not-sender`, no `Content-Length` `411`, larger than the receiver's free space
//! `403 quota-exceeded` (reserved atomically by [`Stores::start_session`]). The body is cut
//! into records of [`UploadPolicy::record_bytes`] and committed every
//! [`UploadPolicy::commit_bytes`] (or when the body pauses), never held whole. A body that
//! ends short of `Content-Length` (client aborted) or stalls for
//! [`UploadPolicy::idle_timeout`](super::UploadPolicy) leaves the store `truncated`.
//! `Content-Type: audio/basic` (or `audio/PCMU`, `audio/PCMA`) stores the file as G.711, so it
//! can be downloaded as WAV; any other type is kept as the store's format.

use std::collections::HashMap;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::auth::{aor_of, authenticate, is_party, unauthorized, Caller};
use super::errors::ApiError;
use super::media::{self, MediaFormat};
use super::{upload_token, HttpEvent, HttpState, UploadPolicy};
use crate::storage::segments::{
    RecordHeader, SegmentError, SegmentOptions, SegmentReader, SegmentWriter, TailState,
    MAX_PAYLOAD,
};
use crate::storage::stores::{
    store_dir, ListFilter, Party, StartSession, Store, StoreState, StoreView,
};
use crate::storage::threshold::Threshold;

/// How often a `receiving` store without a registered writer is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A polled `receiving` store that grows no further for this long ends the download (its
/// writer is gone; start-up recovery will settle it).
pub const POLL_IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Largest body chunk handed to the HTTP layer at once.
const MAX_CHUNK: usize = 64 * 1024;
/// Payload type of uploads that are not G.711 (a dynamic one; only pcap shows it).
pub const UPLOAD_PAYLOAD_TYPE: u8 = 96;

type PathArg = Result<Path<String>, PathRejection>;
type QueryArg = Result<Query<HashMap<String, String>>, QueryRejection>;

fn path_id(p: PathArg) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn query_map(q: QueryArg) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn require_caller(
    state: &HttpState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    authenticate(state, method, uri, headers)
        .await?
        .ok_or_else(|| unauthorized(state, "credentials required"))
}

async fn load(state: &HttpState, id: &str) -> Result<Store, ApiError> {
    state
        .stores
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no store {id}")))
}

fn upload_token_matches(store: &Store, presented: &str) -> bool {
    let t = upload_token(store);
    t.len() == presented.len() && bool::from(t.as_bytes().ct_eq(presented.as_bytes()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Metadata,
    Media,
}

fn check_access(
    state: &HttpState,
    caller: &Caller,
    store: &Store,
    need: Need,
) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::User(u) => {
            let owner = store.owner.as_deref() == Some(u.as_str());
            let receiver = is_party(&store.receiver, u, &state.realm);
            let sender = is_party(&store.sender, u, &state.realm);
            match need {
                Need::Metadata if owner || receiver || sender => Ok(()),
                Need::Media if owner || receiver => Ok(()),
                Need::Media if sender => Err(ApiError::forbidden(
                    "only the receiver may download a store",
                )),
                _ => Err(ApiError::forbidden("not a party of this store")),
            }
        }
        Caller::Token(t) => {
            if store.token_matches(t) {
                Ok(())
            } else if upload_token_matches(store, t) {
                match need {
                    Need::Metadata => Ok(()),
                    Need::Media => Err(ApiError::forbidden(
                        "the upload token does not open the store's media",
                    )),
                }
            } else {
                Err(unauthorized(state, "token does not open this store"))
            }
        }
    }
}

/// `GET /v1/stores/{id}`.
pub async fn get_store(
    State(state): State<Arc<HttpState>>,
    path: PathArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<StoreView>, ApiError> {
    let id = path_id(path)?;
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let store = load(&state, &id).await?;
    check_access(&state, &caller, &store, Need::Metadata)?;
    Ok(Json(store.view()))
}

/// `GET /v1/stores[?state=..][&limit=N]`, newest first.
pub async fn list_stores(
    State(state): State<Arc<HttpState>>,
    query: QueryArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Json<Vec<StoreView>>, ApiError> {
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let q = query_map(query)?;
    let mut filter = ListFilter::default();
    if let Some(s) = q.get("state") {
        filter.state = Some(s.parse().map_err(|()| {
            ApiError::bad_request(format!(
                "unknown state {s:?}: pending, receiving, complete, truncated, rejected or expired"
            ))
        })?);
    }
    if let Some(l) = q.get("limit") {
        filter.limit = Some(
            l.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ApiError::bad_request(format!("bad limit {l:?}")))?,
        );
    }
    match caller {
        Caller::Admin => {}
        Caller::User(u) => {
            filter.party = Some(Party {
                aor: aor_of(&u, &state.realm),
                user: u,
            })
        }
        Caller::Token(_) => {
            return Err(unauthorized(
                &state,
                "a store token opens only its store; list with account credentials",
            ))
        }
    }
    let list = state.stores.list(&filter).await?;
    Ok(Json(list.iter().map(Store::view).collect()))
}

/// `GET /v1/stores/{id}/media?format=raw|wav|pcap`.
pub async fn get_media(
    State(state): State<Arc<HttpState>>,
    path: PathArg,
    query: QueryArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let q = query_map(query)?;
    let format = match q.get("format").map(String::as_str) {
        None | Some("") => MediaFormat::Raw,
        Some(f) => f
            .parse()
            .map_err(|()| ApiError::bad_request("format must be raw, wav or pcap"))?,
    };
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let store = load(&state, &id).await?;
    check_access(&state, &caller, &store, Need::Media)?;

    let receiving = match store.state {
        StoreState::Receiving => true,
        StoreState::Complete | StoreState::Truncated => false,
        st @ (StoreState::Pending | StoreState::Expired | StoreState::Rejected) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "no-data",
                format!("store is {st}: it holds no data"),
            ))
        }
    };
    let wav_tag = match format {
        MediaFormat::Wav => Some(
            store
                .format
                .as_deref()
                .and_then(media::g711_format_tag)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "unsupported-format",
                        format!(
                            "WAV is for PCMU/PCMA stores; this one holds {}",
                            store.format.as_deref().unwrap_or("no format")
                        ),
                    )
                })?,
        ),
        _ => None,
    };
    let dir = store_dir(&state.data_dir, &store.id)?;
    let tail = if receiving { state.live.get(&id) } else { None };
    if receiving {
        let current = tail
            .as_ref()
            .map_or(store.received_bytes, |rx| rx.borrow().payload_bytes);
        let reached =
            store.threshold_at.is_some() || store.threshold_bytes.is_some_and(|t| current >= t);
        if !reached {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "the store has not reached its threshold yet",
            )
            .with_retry_after(1));
        }
    }

    // Only the store's own codec goes into a WAV (a telephone-event would be noise).
    let pt_filter = wav_tag.and(store.payload_type);
    let header = match (format, wav_tag) {
        (MediaFormat::Wav, Some(tag)) => {
            let len = if receiving {
                None
            } else {
                Some(
                    scan_payload_len(&dir, pt_filter)
                        .await
                        .map_err(storage_error)?,
                )
            };
            Some(Bytes::copy_from_slice(&media::wav_header(tag, len)))
        }
        (MediaFormat::Pcap, _) => Some(Bytes::from(media::pcap_preamble(
            &store.id,
            store.format.as_deref(),
            store.payload_type,
            store.started_at.map_or(0, media::unix_us),
        ))),
        _ => None,
    };

    let live = tail.is_some();
    let follow = Follow {
        state: Arc::clone(&state),
        id: id.clone(),
        reader: SegmentReader::open(&dir, 0, tail),
        dir,
        live,
        draining: !receiving,
        last_data: Instant::now(),
    };
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(produce(follow, format, pt_filter, header, tx));

    let mut resp = Response::new(body_from(rx));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}.{}\"",
        store.id,
        format.extension()
    )) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

fn storage_error(e: SegmentError) -> ApiError {
    tracing::error!(error = %e, "store data unreadable");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage-error",
        "store data unreadable",
    )
}

/// Payload bytes of a finished store (the WAV header's sizes), counting only `pt` if given.
async fn scan_payload_len(dir: &FsPath, pt: Option<u8>) -> Result<u64, SegmentError> {
    let mut r = SegmentReader::open(dir, 0, None);
    let mut n = 0u64;
    while let Some(rec) = r.next().await? {
        if pt.is_none_or(|p| rec.header.payload_type == p) {
            n += rec.payload.len() as u64;
        }
    }
    Ok(n)
}

/// Reads a store's records in order to its end, following it while it is written.
struct Follow {
    state: Arc<HttpState>,
    id: String,
    dir: PathBuf,
    reader: SegmentReader,
    /// The reader follows the writer's watch.
    live: bool,
    /// The store is finished: what is on disk is all there is.
    draining: bool,
    last_data: Instant,
}

impl Follow {
    async fn next(&mut self) -> Result<Option<(RecordHeader, Bytes)>, SegmentError> {
        loop {
            match self.reader.next().await {
                Ok(Some(r)) => {
                    self.last_data = Instant::now();
                    return Ok(Some((r.header, Bytes::copy_from_slice(r.payload))));
                }
                Ok(None) if self.live || self.draining => return Ok(None),
                Ok(None) => {}
                // Polling a log we cannot watch: the last record may be half written.
                Err(SegmentError::Corrupt { .. }) if !self.live && !self.draining => {}
                Err(e) => return Err(e),
            }
            // Polling: the writer may have registered since, or the store may have ended.
            let pos = self.reader.position();
            if let Some(rx) = self.state.live.get(&self.id) {
                self.reader = SegmentReader::open(&self.dir, pos, Some(rx));
                self.live = true;
                continue;
            }
            match self.state.stores.get(&self.id).await {
                Ok(Some(s)) if s.state == StoreState::Receiving => {}
                Ok(_) => {
                    // Finished (the writer committed everything before the state changed):
                    // one last read to the end of the disk.
                    self.reader = SegmentReader::open(&self.dir, pos, None);
                    self.draining = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(store = %self.id, error = %e, "store state unreadable");
                }
            }
            if self.last_data.elapsed() >= POLL_IDLE_LIMIT {
                tracing::warn!(store = %self.id, "receiving store stopped growing; download ends");
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

async fn produce(
    mut follow: Follow,
    format: MediaFormat,
    pt_filter: Option<u8>,
    header: Option<Bytes>,
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
) {
    if let Some(h) = header {
        if tx.send(Ok(h)).await.is_err() {
            return;
        }
    }
    let mut ip_id: u16 = 0;
    loop {
        let next = tokio::select! {
            // The client went away while we wait for the live tail.
            () = tx.closed() => return,
            n = follow.next() => n,
        };
        let chunk = match next {
            Ok(Some((h, payload))) => match format {
                MediaFormat::Raw => payload,
                MediaFormat::Wav => {
                    if pt_filter.is_some_and(|p| p != h.payload_type) {
                        continue;
                    }
                    payload
                }
                MediaFormat::Pcap => {
                    let mut out = Vec::with_capacity(16 + 40 + payload.len());
                    media::pcap_packet(&mut out, &h, &payload, ip_id);
                    ip_id = ip_id.wrapping_add(1);
                    Bytes::from(out)
                }
            },
            Ok(None) => return,
            Err(e) => {
                tracing::error!(store = %follow.id, error = %e, "download aborted");
                // An error ends the chunked body without its last chunk: the client sees a
                // broken transfer, not a short file.
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return;
            }
        };
        if chunk.is_empty() {
            continue;
        }
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}

struct BodyState {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    err: Option<io::Error>,
}

/// A chunked body from the producer: whatever is queued goes out together (up to
/// [`MAX_CHUNK`]), so a finished store is not sent one tiny chunk per record.
fn body_from(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Body {
    let st = BodyState { rx, err: None };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(e) = st.err.take() {
            return Some((Err(e), st));
        }
        let first = match st.rx.recv().await? {
            Ok(b) => b,
            Err(e) => return Some((Err(e), st)),
        };
        let mut buf: Option<Vec<u8>> = None;
        while buf.as_ref().map_or(first.len(), Vec::len) < MAX_CHUNK {
            match st.rx.try_recv() {
                Ok(Ok(b)) => buf
                    .get_or_insert_with(|| first.to_vec())
                    .extend_from_slice(&b),
                Ok(Err(e)) => {
                    st.err = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        let chunk = buf.map_or(first, Bytes::from);
        Some((Ok::<Bytes, io::Error>(chunk), st))
    });
    Body::from_stream(stream)
}

// ---------------------------------------------------------------------------------------------
// Upload

fn unknown_store(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown-store",
        format!("unknown, used or expired store {id}"),
    )
}

fn content_length(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(v) = headers.get(CONTENT_LENGTH) else {
        return Err(ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length-required",
            "Content-Length (the data size) is required",
        ));
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))
}

/// The store format and payload type for an upload's `Content-Type`.
fn upload_format(headers: &HeaderMap) -> (String, u8) {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|s| {
            (3..=100).contains(&s.len())
                && s.contains('/')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-/".contains(&b))
        });
    match ct.as_deref() {
        Some("audio/basic" | "audio/pcmu") => ("PCMU/8000".into(), 0),
        Some("audio/pcma") => ("PCMA/8000".into(), 8),
        Some(other) => (other.to_string(), UPLOAD_PAYLOAD_TYPE),
        None => ("application/octet-stream".into(), UPLOAD_PAYLOAD_TYPE),
    }
}

/// `PUT /v1/stores/{id}/data` (the prompt's `upload_url`).
pub async fn put_data(
    State(state): State<Arc<HttpState>>,
    path: PathArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let now = SystemTime::now();
    let store = match state.stores.get(&id).await? {
        Some(s) if s.is_open(now) => s,
        _ => return Err(unknown_store(&id)),
    };
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let sender = match &caller {
        Caller::Token(t) if upload_token_matches(&store, t) => true,
        Caller::Token(t) if store.token_matches(t) => false,
        Caller::Token(_) => return Err(unauthorized(&state, "token does not open this store")),
        Caller::User(u) => is_party(&store.sender, u, &state.realm),
        Caller::Admin => false,
    };
    if !sender {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not-sender",
            format!("only {} may send to this store", store.sender),
        ));
    }
    let len = content_length(&headers)?;
    let (format, payload_type) = upload_format(&headers);
    let policy = state.upload;
    // A file has no playout rate for the adaptive rule: use the server's percentage.
    let threshold = match store.threshold {
        Threshold::Adaptive => Threshold::Percent(policy.default_percent),
        t => t,
    };
    let threshold_bytes = threshold
        .resolve(Some(len), len, policy.default_percent, &policy.limits)
        .fixed_bytes();
    let started = state
        .stores
        .start_session(
            &id,
            &StartSession {
                // Checked above; the store's own spelling satisfies the SQL match.
                caller: &store.sender,
                format: &format,
                payload_type,
                declared_bytes: Some(len),
                reserve_bytes: len,
                threshold_bytes,
            },
            now,
        )
        .await?;
    tracing::info!(store = %id, bytes = len, format = %format, "upload started");
    state.emit(HttpEvent::UploadStarted {
        store_id: id.clone(),
    });
    // Its own task: if the connection drops and hyper drops this handler, the upload still
    // ends properly (truncated) and settles the quota.
    let task = tokio::spawn(run_upload(
        Arc::clone(&state),
        started,
        len,
        threshold_bytes,
        body,
    ));
    let done = match task.await {
        Ok(r) => r?,
        Err(e) => {
            tracing::error!(store = %id, error = %e, "upload task failed");
            return Err(ApiError::internal("upload failed"));
        }
    };
    let mut resp = (StatusCode::CREATED, Json(done.view())).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/stores/{id}")) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Ok(resp)
}

fn arrival_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs blocking writer work on the blocking pool. None: the task itself failed (the writer
/// is lost).
async fn blocking<T: Send + 'static>(
    mut w: SegmentWriter,
    f: impl FnOnce(&mut SegmentWriter) -> Result<T, SegmentError> + Send + 'static,
) -> Option<(SegmentWriter, Result<T, SegmentError>)> {
    tokio::task::spawn_blocking(move || {
        let r = f(&mut w);
        (w, r)
    })
    .await
    .ok()
}

/// The body side of an upload session.
struct Upload {
    state: Arc<HttpState>,
    id: String,
    policy: UploadPolicy,
    threshold_bytes: Option<u64>,
    writer: Option<SegmentWriter>,
    committed: TailState,
    threshold_marked: bool,
    last_progress: Instant,
    records: u64,
    offset: u64,
    payload_type: u8,
    storage_failed: bool,
}

impl Upload {
    fn append(&mut self, payload: &[u8]) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        let h = RecordHeader {
            arrival_us: arrival_us(),
            seq: self.records as u16, // RTP-style wrap
            timestamp: self.offset as u32,
            ssrc: 0,
            payload_type: self.payload_type,
            marker: self.records == 0,
        };
        if let Err(e) = w.append(&h, payload) {
            tracing::error!(store = %self.id, error = %e, "upload record refused");
            self.storage_failed = true;
            return;
        }
        self.records += 1;
        self.offset += payload.len() as u64;
    }

    /// Commits what is buffered (fsync, then readers see it); `finish` also ends the tail.
    async fn commit(&mut self, finish: bool) {
        let Some(w) = self.writer.take() else {
            return;
        };
        let res = if finish {
            blocking(w, SegmentWriter::finish).await
        } else {
            blocking(w, SegmentWriter::commit).await
        };
        match res {
            Some((mut w, Ok(st))) => {
                self.committed = st;
                if self.storage_failed && finish {
                    w.close_tail();
                }
                self.writer = Some(w);
            }
            Some((mut w, Err(e))) => {
                tracing::error!(store = %self.id, error = %e, "upload commit failed");
                self.storage_failed = true;
                self.committed = w.state();
                w.close_tail();
                self.writer = Some(w);
            }
            None => {
                tracing::error!(store = %self.id, "upload writer task failed");
                self.storage_failed = true;
            }
        }
        self.after_commit(SystemTime::now()).await;
    }

    async fn after_commit(&mut self, now: SystemTime) {
        let c = self.committed;
        if !self.threshold_marked
            && c.records > 0
            && self.threshold_bytes.is_some_and(|t| c.payload_bytes >= t)
        {
            self.mark_threshold(now).await;
        }
        if self.last_progress.elapsed() >= Duration::from_secs(1) {
            self.last_progress = Instant::now();
            if let Err(e) = self
                .state
                .stores
                .record_progress(&self.id, c.payload_bytes)
                .await
            {
                tracing::warn!(store = %self.id, error = %e, "upload progress not recorded");
            }
        }
    }

    async fn mark_threshold(&mut self, now: SystemTime) {
        self.threshold_marked = true;
        match self.state.stores.mark_threshold(&self.id, now).await {
            Ok(true) => self.state.emit(HttpEvent::ThresholdReached {
                store_id: self.id.clone(),
                received_bytes: self.committed.payload_bytes,
            }),
            Ok(false) => {}
            Err(e) => tracing::warn!(store = %self.id, error = %e, "threshold not recorded"),
        }
    }

    fn pending(&self) -> usize {
        self.writer.as_ref().map_or(0, SegmentWriter::pending_bytes)
    }
}

enum BodyEnd {
    Complete,
    /// Ended early or stalled: the client's fault.
    Short(String),
}

async fn run_upload(
    state: Arc<HttpState>,
    store: Store,
    len: u64,
    threshold_bytes: Option<u64>,
    body: Body,
) -> Result<Store, ApiError> {
    let id = store.id.clone();
    let policy = state.upload;
    let record_bytes = policy.record_bytes.clamp(1, MAX_PAYLOAD);
    let writer = match store_dir(&state.data_dir, &id) {
        Ok(dir) => {
            match tokio::task::spawn_blocking(move || {
                SegmentWriter::create(&dir, SegmentOptions::default())
            })
            .await
            {
                Ok(Ok(w)) => Some(w),
                Ok(Err(e)) => {
                    tracing::error!(store = %id, error = %e, "cannot create store log");
                    None
                }
                Err(e) => {
                    tracing::error!(store = %id, error = %e, "store log task failed");
                    None
                }
            }
        }
        Err(e) => {
            tracing::error!(store = %id, error = %e, "bad store directory");
            None
        }
    };
    let _live = writer
        .as_ref()
        .map(|w| state.live.register(&id, w.subscribe()));
    let mut up = Upload {
        state: Arc::clone(&state),
        id: id.clone(),
        policy,
        threshold_bytes,
        storage_failed: writer.is_none(),
        writer,
        committed: TailState::default(),
        threshold_marked: false,
        last_progress: Instant::now(),
        records: 0,
        offset: 0,
        payload_type: store.payload_type.unwrap_or(UPLOAD_PAYLOAD_TYPE),
    };

    let mut stream = body.into_data_stream();
    let mut carry: Vec<u8> = Vec::with_capacity(record_bytes);
    let mut received: u64 = 0;
    let mut last_data = Instant::now();
    let end = loop {
        if up.storage_failed {
            break BodyEnd::Complete; // reported as a storage failure below
        }
        let wait = if up.pending() > 0 {
            up.policy.commit_interval
        } else {
            up.policy.idle_timeout
        };
        let next = match tokio::time::timeout(wait, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                if last_data.elapsed() >= up.policy.idle_timeout {
                    break BodyEnd::Short("the body stalled".into());
                }
                up.commit(false).await;
                continue;
            }
        };
        let chunk = match next {
            None => {
                if received == len {
                    break BodyEnd::Complete;
                }
                break BodyEnd::Short(format!("body ended after {received} of {len} bytes"));
            }
            Some(Err(e)) => break BodyEnd::Short(format!("body aborted: {e}")),
            Some(Ok(c)) => c,
        };
        last_data = Instant::now();
        // HTTP framing never delivers more than Content-Length; cap it anyway.
        let room = usize::try_from(len - received).unwrap_or(usize::MAX);
        let mut data = &chunk[..chunk.len().min(room)];
        received += data.len() as u64;
        if !carry.is_empty() {
            let take = (record_bytes - carry.len()).min(data.len());
            carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if carry.len() == record_bytes {
                up.append(&carry);
                carry.clear();
            }
        }
        while data.len() >= record_bytes {
            up.append(&data[..record_bytes]);
            data = &data[record_bytes..];
        }
        carry.extend_from_slice(data);
        if up.pending() >= up.policy.commit_bytes {
            up.commit(false).await;
        }
    };
    if !carry.is_empty() {
        up.append(&carry);
    }
    up.commit(true).await;

    let now = SystemTime::now();
    let complete = matches!(end, BodyEnd::Complete) && !up.storage_failed;
    let final_state = if complete {
        StoreState::Complete
    } else {
        StoreState::Truncated
    };
    if complete && !up.threshold_marked {
        // A whole file has reached any threshold (also an empty one, or threshold 0).
        up.mark_threshold(now).await;
    }
    let stored = up.committed.payload_bytes;
    let finished = state.stores.finish(&id, final_state, stored, now).await;
    state.emit(HttpEvent::UploadFinished {
        store_id: id.clone(),
        state: final_state,
        received_bytes: stored,
    });
    let finished = finished?;
    tracing::info!(store = %id, state = %final_state, bytes = stored, "upload ended");
    match end {
        _ if up.storage_failed => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage-error",
            format!("storing failed after {stored} bytes; the store is truncated"),
        )),
        BodyEnd::Short(why) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "truncated",
            format!("{why}; the store is truncated"),
        )),
        BodyEnd::Complete => Ok(finished),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_formats() {
        let mut h = HeaderMap::new();
        assert_eq!(
            upload_format(&h),
            ("application/octet-stream".to_string(), 96)
        );
        h.insert(CONTENT_TYPE, HeaderValue::from_static("audio/basic"));
        assert_eq!(upload_format(&h), ("PCMU/8000".to_string(), 0));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Audio/PCMA; rate=8000"),
        );
        assert_eq!(upload_format(&h), ("PCMA/8000".to_string(), 8));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/pdf"));
        assert_eq!(upload_format(&h), ("application/pdf".to_string(), 96));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("no slash"));
        assert_eq!(upload_format(&h).0, "application/octet-stream");
    }

    #[test]
    fn content_length_rules() {
        let mut h = HeaderMap::new();
        assert_eq!(
            content_length(&h).unwrap_err().status,
            StatusCode::LENGTH_REQUIRED
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&h).unwrap(), 12);
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert_eq!(
            content_length(&h).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
