//! Store endpoints (PROTOCOL 2.4, 2.5, 5): metadata, listing, media download following the
//! live tail.
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
//! `PUT upload_url` is [`super::upload`], an ingest adapter of the store lifecycle.

use crate::error_code::ErrorCode;
use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use axum::response::Response;
use axum::Json;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, watch};

use super::auth::{aor_of, authenticate, is_party, unauthorized, Caller};
use super::errors::ApiError;
use super::media::{self, MediaFormat};
use super::{upload_token, HttpState};
use crate::storage::live::finished_probe;
use crate::storage::segments::{RecordHeader, SegmentError, SegmentReader, TailState};
use crate::storage::stores::{store_dir, ListFilter, Party, Store, StoreState, StoreView};

/// How often a `receiving` store without a registered writer is polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A polled `receiving` store that grows no further for this long ends the download (its
/// writer is gone; start-up recovery will settle it).
pub(crate) const POLL_IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Largest body chunk handed to the HTTP layer at once.
const MAX_CHUNK: usize = 64 * 1024;

pub(super) type PathArg = Result<Path<String>, PathRejection>;
type QueryArg = Result<Query<HashMap<String, String>>, QueryRejection>;

pub(super) fn path_id(p: PathArg) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn query_map(q: QueryArg) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(m)| m)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

pub(super) async fn require_caller(
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

pub(super) fn upload_token_matches(store: &Store, presented: &str) -> bool {
    let t = upload_token(store);
    t.len() == presented.len() && bool::from(t.as_bytes().ct_eq(presented.as_bytes()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    Metadata,
    Media,
}

pub(super) fn check_access(
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
pub(crate) async fn get_store(
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
pub(crate) async fn list_stores(
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

/// Whether a store's media can be served now (`no-data`, `unsupported-format` for a WAV of
/// another codec, `not-ready` before the threshold): whether it is still receiving, the WAV
/// format tag, and its live tail.
type Readiness = (bool, Option<u16>, Option<watch::Receiver<TailState>>);

fn readiness(state: &HttpState, store: &Store, format: MediaFormat) -> Result<Readiness, ApiError> {
    let receiving = match store.state {
        StoreState::Receiving => true,
        StoreState::Complete | StoreState::Truncated => false,
        st @ (StoreState::Pending | StoreState::Expired | StoreState::Rejected) => {
            return Err(ApiError::new(
                ErrorCode::NoData,
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
                        ErrorCode::UnsupportedFormat,
                        format!(
                            "WAV is for PCMU/PCMA stores; this one holds {}",
                            store.format.as_deref().unwrap_or("no format")
                        ),
                    )
                })?,
        ),
        _ => None,
    };
    let tail = if receiving {
        state.live.get(&store.id)
    } else {
        None
    };
    if receiving {
        let current = tail
            .as_ref()
            .map_or(store.received_bytes, |rx| rx.borrow().payload_bytes);
        let reached =
            store.threshold_at.is_some() || store.threshold_bytes.is_some_and(|t| current >= t);
        if !reached {
            return Err(ApiError::new(
                ErrorCode::NotReady,
                "the store has not reached its threshold yet",
            )
            .with_retry_after(1));
        }
    }

    Ok((receiving, wav_tag, tail))
}

/// The download response: `format`'s content type, no caching, saved as `NAME.EXT`.
pub(super) fn media_response(body: Body, format: MediaFormat, name: &str) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{name}.{}\"",
        format.extension()
    )) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    resp
}

/// `GET /v1/stores/{id}/media?format=raw|wav|pcap[&call=both]` (`call=both`: the whole
/// recorded call, [`super::whole_call`]).
pub(crate) async fn get_media(
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
    let whole_call = match q.get("call").map(String::as_str) {
        None | Some("") => false,
        Some("both") => true,
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "call={c:?}: the only value is \"both\""
            )))
        }
    };
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let store = load(&state, &id).await?;
    check_access(&state, &caller, &store, Need::Media)?;
    if whole_call {
        return super::whole_call::download(state, &caller, store, format).await;
    }

    let (receiving, wav_tag, tail) = readiness(&state, &store, format)?;
    let dir = store_dir(&state.data_dir, &store.id)?;

    let capture = media::StoreCapture::of(&store);
    let ends = capture.ends;
    // Only the store's own codec goes into a WAV (a telephone-event would be noise).
    let pt_filter = wav_tag.and(store.payload_type);
    let header = match (format, wav_tag) {
        (MediaFormat::Wav, Some(tag)) => {
            let len = if receiving {
                None
            } else {
                Some(
                    scan_payload_len(state.live.reader(&dir, &id, false, None).0, pt_filter)
                        .await
                        .map_err(storage_error)?,
                )
            };
            Some(Bytes::copy_from_slice(&media::wav_header(tag, len)))
        }
        (MediaFormat::Pcap, _) => Some(Bytes::from(media::pcap_preamble(
            &[capture.session],
            store.format.as_deref(),
            store.payload_type,
            store.started_at.map_or(0, media::unix_us),
        ))),
        _ => None,
    };

    // Not written on this node and media in an object store: its chunks, followed while
    // the store receives (another node's live tail).
    let (reader, live) = match (tail, state.live.objects()) {
        (None, Some(_)) => {
            let probe = finished_probe(&state.stores, &id);
            state.live.reader(&dir, &id, receiving, Some(probe))
        }
        (tail, _) => {
            let live = tail.is_some();
            (SegmentReader::open(&dir, 0, tail), live)
        }
    };
    let follow = Follow {
        state: Arc::clone(&state),
        id: id.clone(),
        reader,
        dir,
        live,
        draining: !receiving,
        last_data: Instant::now(),
    };
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(produce(follow, format, ends, pt_filter, header, tx));

    Ok(media_response(body_from(rx), format, &store.id))
}

pub(super) fn storage_error(e: SegmentError) -> ApiError {
    tracing::error!(error = %e, "store data unreadable");
    ApiError::new(ErrorCode::StorageError, "store data unreadable")
}

/// Payload bytes of a finished store (the WAV header's sizes), counting only `pt` if given.
async fn scan_payload_len(mut r: SegmentReader, pt: Option<u8>) -> Result<u64, SegmentError> {
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
    ends: media::PcapEnds,
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
                    media::pcap_packet(&mut out, ends, &h, &payload, ip_id);
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
pub(super) fn body_from(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Body {
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
