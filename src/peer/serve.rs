//! The agent's piece server: `GET /v1/pieces/{content_id}/{n}` for the pieces it has
//! verified, read from its output file, and `GET /v1/pieces/{content_id}` for its bitfield
//! (the terminal index's "which pieces", claim 8: fetchers poll it, as BitTorrent peers
//! send `have`s, and it answers what the fetch loop has verified up to that moment). No
//! authentication between peers: a piece is only useful to someone holding the manifest,
//! and every fetcher verifies it against the hash.
//!
//! `corrupt` (the hidden `--corrupt-pieces` test mode) serves each piece with its first
//! byte flipped, so fetchers can be tested against a bad peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::PeerError;
use crate::share::index::Bitfield;
use crate::share::select::SourceClass;

/// One content this agent serves.
#[derive(Debug)]
pub struct Served {
    pub file: std::fs::File,
    pub size: u64,
    pub piece_size: u64,
    /// Verified pieces (the fetch loop sets them).
    pub have: RwLock<Bitfield>,
    /// This agent's id and class for this content, as its bitfield answer names them.
    pub peer_id: String,
    pub class: SourceClass,
}

impl Served {
    pub fn set_have(&self, piece: usize) {
        if let Ok(mut h) = self.have.write() {
            h.set(piece, true);
        }
    }
}

/// What the server holds; clones share it.
#[derive(Debug, Clone, Default)]
pub struct PieceServer {
    contents: Arc<RwLock<HashMap<String, Arc<Served>>>>,
    corrupt: bool,
    /// Bytes served to other peers.
    served_bytes: Arc<AtomicU64>,
}

impl PieceServer {
    pub fn new(corrupt: bool) -> PieceServer {
        PieceServer {
            corrupt,
            ..PieceServer::default()
        }
    }

    pub fn add(&self, content_id: &str, served: Arc<Served>) {
        if let Ok(mut m) = self.contents.write() {
            m.insert(content_id.to_string(), served);
        }
    }

    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.load(Ordering::Relaxed)
    }

    fn lookup(&self, content_id: &str) -> Option<Arc<Served>> {
        self.contents.read().ok()?.get(content_id).cloned()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/pieces/{content_id}", get(get_bitfield))
            .route("/v1/pieces/{content_id}/{n}", get(get_piece))
            .with_state(self.clone())
    }

    /// Binds `listen` and serves in a background task; returns the bound address.
    pub async fn spawn(&self, listen: &str) -> Result<SocketAddr, PeerError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| PeerError::Listen(format!("{listen}: {e}")))?;
        let addr = listener.local_addr()?;
        let app = self.router();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "piece server stopped");
            }
        });
        Ok(addr)
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// The bitfield answer: one holder as in the index JSON (PROTOCOL 5), plus the piece count.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct BitfieldView {
    pub content_id: String,
    pub pieces: usize,
    pub peer_id: String,
    pub class: String,
    pub have: String,
}

async fn get_bitfield(State(srv): State<PieceServer>, Path(content_id): Path<String>) -> Response {
    let Some(c) = srv.lookup(&content_id) else {
        return plain(StatusCode::NOT_FOUND, "unknown content\n");
    };
    let Ok(have) = c.have.read().map(|h| h.clone()) else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "bitfield unavailable\n");
    };
    let view = BitfieldView {
        content_id,
        pieces: have.len(),
        peer_id: c.peer_id.clone(),
        class: c.class.as_str().to_string(),
        have: have.to_base64(),
    };
    let mut resp = axum::Json(view).into_response();
    // Polled for freshness: never cached.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn get_piece(
    State(srv): State<PieceServer>,
    Path((content_id, n)): Path<(String, String)>,
) -> Response {
    let Some(c) = srv.lookup(&content_id) else {
        return plain(StatusCode::NOT_FOUND, "unknown content\n");
    };
    let Ok(n) = n.parse::<u64>() else {
        return plain(StatusCode::BAD_REQUEST, "bad piece number\n");
    };
    let held = usize::try_from(n)
        .ok()
        .is_some_and(|i| c.have.read().is_ok_and(|h| h.get(i)));
    let Some((offset, len)) = crate::share::manifest::piece_range(c.size, c.piece_size, n) else {
        return plain(StatusCode::NOT_FOUND, "no such piece\n");
    };
    if !held {
        return plain(StatusCode::NOT_FOUND, "piece not held\n");
    }
    let Ok(len_usize) = usize::try_from(len) else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "piece too large\n");
    };
    let corrupt = srv.corrupt;
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len_usize];
        c.file.read_exact_at(&mut buf, offset).map(|()| buf)
    })
    .await;
    let mut buf = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, piece = n, "reading a held piece failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "read failed\n");
        }
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "read failed\n"),
    };
    if corrupt {
        if let Some(b) = buf.first_mut() {
            *b ^= 0xff;
        }
    }
    srv.served_bytes.fetch_add(len, Ordering::Relaxed);
    let mut resp = Response::new(Body::from(buf));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::http::{parse_url, Client};
    use std::io::Write as _;

    #[tokio::test]
    async fn serves_held_pieces_only_and_corrupts_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let cid = "c".repeat(64);
        for corrupt in [false, true] {
            let srv = PieceServer::new(corrupt);
            let served = Arc::new(Served {
                file: std::fs::File::open(&path).unwrap(),
                size: 250,
                piece_size: 100,
                have: RwLock::new(Bitfield::empty(3)),
                peer_id: "p1".into(),
                class: SourceClass::Peer,
            });
            srv.add(&cid, served.clone());
            served.set_have(2);
            let addr = srv.spawn("127.0.0.1:0").await.unwrap();
            let client = Client::default();
            let get = |p: String| {
                let client = client.clone();
                async move {
                    client
                        .get(&parse_url(&format!("http://{addr}{p}")).unwrap(), &[], 1000)
                        .await
                        .unwrap()
                }
            };
            let r = get(format!("/v1/pieces/{cid}/2")).await;
            assert_eq!(r.status, 200);
            let mut want = data[200..].to_vec();
            if corrupt {
                want[0] ^= 0xff;
            }
            assert_eq!(r.body, want);
            assert_eq!(get(format!("/v1/pieces/{cid}/0")).await.status, 404);
            assert_eq!(get(format!("/v1/pieces/{cid}/3")).await.status, 404);
            assert_eq!(get(format!("/v1/pieces/{cid}/x")).await.status, 400);
            assert_eq!(
                get(format!("/v1/pieces/{}/0", "d".repeat(64))).await.status,
                404
            );
            assert_eq!(srv.served_bytes(), 50);
            // The bitfield answer follows what is held.
            let r = get(format!("/v1/pieces/{cid}")).await;
            assert_eq!(r.status, 200);
            let v: BitfieldView = serde_json::from_slice(&r.body).unwrap();
            assert_eq!((v.peer_id.as_str(), v.pieces), ("p1", 3));
            assert_eq!(Bitfield::from_base64(&v.have, 3).unwrap().count(), 1);
            served.set_have(0);
            let v: BitfieldView =
                serde_json::from_slice(&get(format!("/v1/pieces/{cid}")).await.body).unwrap();
            assert!(Bitfield::from_base64(&v.have, 3).unwrap().get(0));
            assert_eq!(
                get(format!("/v1/pieces/{}", "d".repeat(64))).await.status,
                404
            );
        }
    }
}
