//! `callvault index`: the piece index as a role of its own (PROTOCOL 3 "Pieces and index",
//! 4, 5 "Index"), for an operator who wants the index on another address or host than the
//! server's HTTP API.
//!
//! It opens the same metadata database as `callvault serve` (`storage.metadata`; SQLite in
//! WAL mode, so both processes read it at once; sqlx waits up to its 5 s busy timeout on a
//! lock), which gives it everything the index needs without talking to serve: each content's
//! piece count and policies (`shares`), the offer-token secret (`share_secret`) and the
//! accounts for Basic/Digest. It serves the index routes with the very handlers serve uses
//! ([`super::shares::get_index`], [`super::shares::post_announce`], so the same
//! [`super::shares::content_access`] decides), plus `/metrics`. Holders live in its own
//! [`MemoryIndex`] behind the [`crate::share::PieceIndex`] trait; the server is the holder
//! `"server"` with every piece, at the address [`Config::server_http_address`] gives for
//! `http.listen` (the same function serve uses).
//!
//! Serve points at it when `index.url` is set: offers carry `{index.url}/v1/index/{id}` and
//! serve's own index routes answer `307` to the role.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use super::{shares, HttpState};
use crate::config::Config;
use crate::share::{MemoryIndex, PieceIndex, ShareSettings, Shares};
use crate::storage::{Accounts, Db};

/// How often expired holders are swept out (lookups drop them per content anyway; this
/// bounds the memory of contents nobody asks about any more).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for open HTTP connections after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum IndexRoleError {
    #[error("cannot bind index {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metadata database: {0}")]
    Db(String),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
}

/// The role's router: the two index routes (same handlers as serve) and `/metrics`.
pub fn router(state: HttpState, index: Arc<MemoryIndex>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let index = index.clone();
                async move {
                    (
                        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
                        render_metrics(&index, SystemTime::now()),
                    )
                        .into_response()
                }
            }),
        )
        .route("/v1/index/{content_id}", get(shares::get_index))
        .route(
            "/v1/index/{content_id}/announce",
            post(shares::post_announce),
        )
        .fallback(super::not_found)
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(Arc::new(state))
}

/// The role's `/metrics` (Prometheus text): live holders and the contents they hold.
pub fn render_metrics(index: &MemoryIndex, now: SystemTime) -> String {
    let (contents, holders) = index.stats(now);
    format!(
        "# HELP callvault_index_holders Live holders in the index (peers; the server is not counted).\n\
         # TYPE callvault_index_holders gauge\n\
         callvault_index_holders {holders}\n\
         # HELP callvault_index_contents Contents with at least one live holder.\n\
         # TYPE callvault_index_contents gauge\n\
         callvault_index_contents {contents}\n"
    )
}

/// The role's HTTP state over `db`: serve's accounts, shares and token secret, its own index.
pub async fn state(
    config: &Config,
    db: Db,
) -> Result<(HttpState, Arc<MemoryIndex>), IndexRoleError> {
    let index = Arc::new(MemoryIndex::new(Duration::from_secs(
        config.share.holder_ttl_secs,
    )));
    let mut settings = ShareSettings::from_config(&config.share);
    settings.server_address = Some(config.server_http_address(config.http.listen).to_string());
    // This is the index: it never redirects to itself.
    settings.index_base = None;
    let dyn_index: Arc<dyn PieceIndex> = index.clone();
    let shares = Shares::open_with_index(
        db.clone(),
        config.storage.data_dir.clone(),
        config.sip.domain.clone(),
        settings,
        dyn_index,
    )
    .await
    .map_err(|e| IndexRoleError::Db(e.to_string()))?;
    let mut st = HttpState::new(
        Accounts::new(db.clone(), config.sip.domain.clone()),
        crate::storage::stores::Stores::new(db),
        config.storage.data_dir.clone(),
        config.http.admin_token.clone(),
    );
    st.digest_algorithms = config.sip.digest_algorithms.clone();
    st.realm = config.sip.domain.clone();
    st.shares = Some(shares);
    Ok((st, index))
}

/// `callvault index`: binds `index.listen`, logs `ready index=ADDR`, serves until
/// SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), IndexRoleError> {
    let listen = config.index.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| IndexRoleError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| IndexRoleError::Bind {
            addr: listen,
            source,
        })?;
    let db = Db::open(&config.storage.metadata)
        .await
        .map_err(|e| IndexRoleError::Db(e.to_string()))?;
    let result = serve(&config, db.clone(), listener, bound).await;
    db.close().await;
    result
}

async fn serve(
    config: &Config,
    db: Db,
    listener: tokio::net::TcpListener,
    bound: SocketAddr,
) -> Result<(), IndexRoleError> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers before `ready`: a SIGTERM right after it must be a clean exit.
    let mut term = signal(SignalKind::terminate()).map_err(IndexRoleError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(IndexRoleError::Signal)?;
    let (st, index) = state(config, db).await?;
    let server_address = st
        .shares
        .as_ref()
        .and_then(|s| s.settings().server_address.clone())
        .unwrap_or_default();
    let sweeper = {
        let index = index.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                index.sweep(SystemTime::now());
            }
        })
    };
    let app = router(st, index);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    tracing::info!("ready index={bound} server={server_address}");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        r = &mut http => {
            // The accept loop only ends on a fatal error; report it as one line.
            sweeper.abort();
            let detail = match r {
                Ok(Ok(())) => "stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(IndexRoleError::Bind { addr: bound, source: std::io::Error::other(detail) });
        }
    }
    tracing::info!("shutting down");
    sweeper.abort();
    let _ = stop_tx.send(());
    // Peers keep pooled connections open; do not wait on them for long.
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut http)
        .await
        .is_err()
    {
        http.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::index::Bitfield;
    use crate::share::select::SourceClass;

    #[test]
    fn metrics_count_live_holders() {
        let ix = MemoryIndex::new(Duration::from_secs(600));
        let now = SystemTime::now();
        let text = render_metrics(&ix, now);
        assert!(text.contains("\ncallvault_index_holders 0\n"), "{text}");
        ix.announce(
            "c",
            "p1",
            "127.0.0.1:9000",
            SourceClass::Peer,
            Bitfield::empty(1),
            now,
        )
        .unwrap();
        ix.announce(
            "c",
            "p2",
            "127.0.0.1:9001",
            SourceClass::MobilePeer,
            Bitfield::empty(1),
            now,
        )
        .unwrap();
        let text = render_metrics(&ix, now);
        assert!(text.contains("\ncallvault_index_holders 2\n"), "{text}");
        assert!(text.contains("\ncallvault_index_contents 1\n"), "{text}");
        assert!(text.contains("# TYPE callvault_index_holders gauge"));
    }
}
