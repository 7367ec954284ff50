//! `PUT upload_url` (PROTOCOL.md 2.4 step 23, "files that are not media"): the HTTP ingest
//! adapter of [`StoreSession`], a full citizen like an RTP store session.
//!
//! The sender is the holder of the upload token (see [`super::upload_token`]) or the account
//! named as the store's sender, by Basic or Digest. Checks in the order of step 211 (decided
//! by [`session::admit`]): unknown/used/expired store `404 unknown-store`, no or bad
//! credentials `401`, not the sender `403 not-sender`, no `Content-Length` `411`, larger than
//! the receiver's free space `403 quota-exceeded` (reserved atomically by
//! [`Stores::start_session`](crate::storage::stores::Stores::start_session)).
//!
//! The body is cut into records of [`UploadPolicy::record_bytes`](super::UploadPolicy) and committed every
//! [`UploadPolicy::commit_bytes`](super::UploadPolicy) (or when the body pauses), never held whole. Every commit
//! feeds the machine, so the threshold is reached like an RTP store's and the ready note goes
//! to the receiver through [`HttpEvent::ThresholdReached`] (the store service sends it
//! in-dialog while the receiver's call lasts, else out of dialog). A body that ends short of
//! `Content-Length` (client aborted), stalls for [`UploadPolicy::idle_timeout`](super::UploadPolicy) (the
//! machine's silence timer) or is cut by a shutdown leaves the store `truncated`.
//! `Content-Type: audio/basic` (or `audio/PCMU`, `audio/PCMA`) stores the file as G.711, so
//! it can be downloaded as WAV; any other type is kept as the store's format.
//!
//! Metrics like an RTP store: `callvault_store_sessions_active` while it runs,
//! `callvault_threshold_seconds`, `callvault_prompt_to_first_packet_seconds`.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;

use super::auth::{is_party, unauthorized, Caller};
use super::errors::ApiError;
use super::stores::{path_id, require_caller, upload_token_matches, PathArg};
use super::{HttpEvent, HttpState};
use crate::error_code::{ErrorCode, Refusal};
use crate::metrics::{GaugeGuard, METRICS};
use crate::storage::objects::chunks::spawn_uploader;
use crate::storage::segments::{
    RecordHeader, SegmentError, SegmentOptions, SegmentWriter, TailState, MAX_PAYLOAD,
};
use crate::storage::session::effects::{self, observe_first_packet, Note};
use crate::storage::session::{
    self, IngestEnd, Input, Phase, SessionConfig, Snapshot, StoreSession,
};
use crate::storage::stores::{store_dir, StartSession, Store};
use crate::storage::threshold::Threshold;

/// Payload type of uploads that are not G.711 (a dynamic one; only pcap shows it).
pub(crate) const UPLOAD_PAYLOAD_TYPE: u8 = 96;

fn content_length(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(v) = headers.get(CONTENT_LENGTH) else {
        return Err(ApiError::new(
            ErrorCode::LengthRequired,
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

/// Whether the caller may send to the store: the upload token or the sender's account.
fn check_sender(state: &HttpState, caller: &Caller, store: &Store) -> Result<(), ApiError> {
    let sender = match caller {
        Caller::Token(t) if upload_token_matches(store, t) => true,
        Caller::Token(t) if store.token_matches(t) => false,
        Caller::Token(_) => return Err(unauthorized(state, "token does not open this store")),
        Caller::User(u) => is_party(&store.sender, u, &state.realm),
        Caller::Admin => false,
    };
    if sender {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::NotSender,
            format!("only {} may send to this store", store.sender),
        ))
    }
}

/// `PUT /v1/stores/{id}/data` (the prompt's `upload_url`).
pub(crate) async fn put_data(
    State(state): State<Arc<HttpState>>,
    path: PathArg,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let now = SystemTime::now();
    // Credentials first (issue 10): a stranger gets 401 whether the store exists or not, and a
    // token that opens no open store is answered like a wrong one.
    let caller = require_caller(&state, &method, &uri, &headers).await?;
    let store = match (state.stores.get(&id).await?, &caller) {
        (Some(s), _) if s.is_open(now) => s,
        (Some(s), Caller::Token(t)) if upload_token_matches(&s, t) || s.token_matches(t) => {
            return Err(Refusal::bare(ErrorCode::UnknownStore).into())
        }
        (_, Caller::Token(_)) => {
            return Err(unauthorized(&state, "token does not open this store"))
        }
        _ => return Err(Refusal::bare(ErrorCode::UnknownStore).into()),
    };
    check_sender(&state, &caller, &store)?;
    let len = content_length(&headers)?;
    let (format, payload_type) = upload_format(&headers);
    let owner = match store.owner.as_deref() {
        Some(owner) => Some(state.accounts.require(owner).await?),
        None => None,
    };
    let admitted = session::admit(&Snapshot {
        store: Some(&store),
        wall: now,
        caller: None, // checked above (a token holder has no identity)
        offer: Ok(()),
        declared: Some(len),
        free_bytes: owner.as_ref().map(|a| a.free_bytes()),
    })?;
    let policy = state.upload;
    let limits = owner
        .as_ref()
        .map_or(policy.limits, |a| a.threshold_limits(&policy.limits));
    // A file has no playout rate for the adaptive rule: use the server's percentage.
    let threshold = match store.threshold {
        Threshold::Adaptive => Threshold::Percent(policy.default_percent),
        t => t,
    };
    let resolved = threshold.resolve(Some(len), len, policy.default_percent, &limits);
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
                reserve_bytes: admitted.reserve_bytes,
                threshold_bytes: resolved.fixed_bytes(),
            },
            now,
        )
        .await?;
    tracing::info!(store = %id, bytes = len, format = %format, "upload started");
    state.emit(HttpEvent::UploadStarted {
        store_id: id.clone(),
    });
    let cfg = SessionConfig {
        admitted,
        resolved,
        playout_rate: None,
        silence_timeout: Some(policy.idle_timeout),
    };
    // Its own task: if the connection drops and hyper drops this handler, the upload still
    // ends properly (truncated) and settles the quota.
    let task = tokio::spawn(run_upload(Arc::clone(&state), started, len, cfg, body));
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

/// Creates the store's log on the blocking pool; None (logged) when it cannot.
async fn create_log(state: &HttpState, id: &str) -> Option<SegmentWriter> {
    let dir = match store_dir(&state.data_dir, id) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::error!(store = %id, error = %e, "bad store directory");
            return None;
        }
    };
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

/// The body side of an upload session: the log and the machine it feeds.
struct Upload {
    state: Arc<HttpState>,
    store: Store,
    session: StoreSession,
    writer: Option<SegmentWriter>,
    committed: TailState,
    records: u64,
    offset: u64,
    payload_type: u8,
    storage_failed: bool,
    /// The machine asked to stop (silence, size, shutdown).
    stop: Option<ErrorCode>,
    finished: Option<Store>,
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
            tracing::error!(store = %self.store.id, error = %e, "upload record refused");
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
                tracing::error!(store = %self.store.id, error = %e, "upload commit failed");
                self.storage_failed = true;
                self.committed = w.state();
                w.close_tail();
                self.writer = Some(w);
            }
            None => {
                tracing::error!(store = %self.store.id, "upload writer task failed");
                self.storage_failed = true;
            }
        }
        let n = self.committed.payload_bytes;
        if n > 0 && self.session.committed() == 0 {
            observe_first_packet(&self.store, SystemTime::now());
        }
        self.feed(Input::Committed(n)).await;
    }

    /// One input to the machine, its effects run, its notes carried out.
    async fn feed(&mut self, input: Input) {
        self.session.handle(input, Instant::now());
        for note in effects::run(&mut self.session, &self.state.stores, &self.store.id).await {
            match note {
                Note::Ready {
                    received_bytes,
                    state,
                } => self.state.emit(HttpEvent::ThresholdReached {
                    store_id: self.store.id.clone(),
                    received_bytes,
                    state,
                }),
                Note::Stop(reason) => self.stop = Some(reason),
                Note::Finished(done) => self.finished = done.map(|b| *b),
            }
        }
    }

    fn pending(&self) -> usize {
        self.writer.as_ref().map_or(0, SegmentWriter::pending_bytes)
    }
}

enum BodyEnd {
    Complete,
    /// Ended early, stalled or cut by a shutdown.
    Short(String),
}

/// Cuts the body into records and commits them, until the body ends or the machine stops it.
async fn read_body(up: &mut Upload, body: Body, len: u64) -> BodyEnd {
    let policy = up.state.upload;
    let record_bytes = policy.record_bytes.clamp(1, MAX_PAYLOAD);
    let mut stopping = up.state.stop.subscribe();
    let mut stream = body.into_data_stream();
    let mut carry: Vec<u8> = Vec::with_capacity(record_bytes);
    let mut received: u64 = 0;
    let end = loop {
        if up.storage_failed {
            break BodyEnd::Complete; // reported as a storage failure
        }
        if let Some(reason) = up.stop {
            break BodyEnd::Short(format!("stopped: {}", reason.default_detail()));
        }
        let deadline = up
            .session
            .poll_timeout()
            .map(tokio::time::Instant::from_std);
        let wait = if up.pending() > 0 {
            tokio::time::Instant::now() + policy.commit_interval
        } else {
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + policy.idle_timeout)
        };
        let next = tokio::select! {
            n = stream.next() => n,
            _ = tokio::time::sleep_until(wait) => {
                up.commit(false).await;
                up.feed(Input::Tick).await;
                continue;
            }
            _ = async { drop(stopping.wait_for(|s| *s).await) } => {
                up.feed(Input::Shutdown).await;
                continue;
            }
        };
        let chunk = match next {
            None if received == len => break BodyEnd::Complete,
            None => break BodyEnd::Short(format!("body ended after {received} of {len} bytes")),
            Some(Err(e)) => break BodyEnd::Short(format!("body aborted: {e}")),
            Some(Ok(c)) => c,
        };
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
        if up.pending() >= policy.commit_bytes {
            up.commit(false).await;
        }
    };
    if !carry.is_empty() {
        up.append(&carry);
    }
    end
}

async fn run_upload(
    state: Arc<HttpState>,
    store: Store,
    len: u64,
    cfg: SessionConfig,
    body: Body,
) -> Result<Store, ApiError> {
    let _active = GaugeGuard::new(&METRICS.store_sessions_active);
    let id = store.id.clone();
    let writer = create_log(&state, &id).await;
    let _live = writer
        .as_ref()
        .map(|w| state.live.register(&id, w.subscribe()));
    // With a remote object store the log is the write-ahead; chunks go up beside it.
    let uploader = match (
        writer.as_ref(),
        state.live.objects(),
        store_dir(&state.data_dir, &id),
    ) {
        (Some(w), Some(o), Ok(dir)) => Some(spawn_uploader(
            Arc::clone(o),
            id.clone(),
            dir,
            w.subscribe(),
        )),
        _ => None,
    };
    let mut up = Upload {
        state: Arc::clone(&state),
        payload_type: store.payload_type.unwrap_or(UPLOAD_PAYLOAD_TYPE),
        store,
        session: StoreSession::start(cfg, Instant::now()),
        storage_failed: writer.is_none(),
        writer,
        committed: TailState::default(),
        records: 0,
        offset: 0,
        stop: None,
        finished: None,
    };
    let end = read_body(&mut up, body, len).await;
    up.commit(true).await;
    // Finished in the database only once the media is all in the object store.
    drop(up.writer.take());
    if let Some(u) = uploader {
        if let Err(e) = u.finish().await {
            tracing::error!(store = %id, error = %e, "store media not uploaded");
        }
    }
    let how = match &end {
        _ if up.storage_failed => IngestEnd::StorageFailed,
        BodyEnd::Complete => IngestEnd::Done,
        BodyEnd::Short(_) => IngestEnd::Aborted,
    };
    let stored = up.committed.payload_bytes;
    up.feed(Input::IngestEnded { how, stored }).await;
    let final_state = match up.session.phase() {
        Phase::Finished(s) => s,
        other => {
            tracing::error!(store = %id, ?other, "upload session did not finish");
            return Err(ApiError::internal("upload failed"));
        }
    };
    state.emit(HttpEvent::UploadFinished {
        store_id: id.clone(),
        state: final_state,
        received_bytes: stored,
    });
    tracing::info!(store = %id, state = %final_state, bytes = stored, "upload ended");
    match end {
        _ if up.storage_failed => Err(ApiError::new(
            ErrorCode::StorageError,
            format!("storing failed after {stored} bytes; the store is truncated"),
        )),
        BodyEnd::Short(why) => Err(ApiError::new(
            ErrorCode::Truncated,
            format!("{why}; the store is truncated"),
        )),
        BodyEnd::Complete => up
            .finished
            .ok_or_else(|| ApiError::internal("store database error")),
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
