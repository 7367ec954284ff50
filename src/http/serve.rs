//! Serving the API on a TCP listener (plain or TLS) with limits (issue 10, finding 5): every connection needs a
//! place in a [`ConnGate`] (per listener, per source, and the process's descriptor budget) or
//! is answered `503` and closed at once; a request head not complete within the header timeout
//! closes the connection (hyper's `header_read_timeout`, which also bounds an idle keep-alive).
//!
//! The peer address of the connection is kept in a task-local for the connection's task, so
//! authentication can count failures per source ([`peer_ip`]) without every handler passing
//! it along. HTTP/1 polls a request's handler inside its connection task, where it is set.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::guard::ConnGate;
use crate::transport::tls;

tokio::task_local! {
    static PEER: SocketAddr;
}

/// The source address of the request being handled, when served by [`serve`].
pub(crate) fn peer_ip() -> Option<IpAddr> {
    PEER.try_with(|p| p.ip()).ok()
}

/// What a refused connection reads before it is closed (best effort, never waited for).
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: application/json\r\nContent-Length: 67\r\nConnection: close\r\n\r\n\
{\"error\":\"overloaded\",\"detail\":\"too many connections; retry later\"}";

/// Accepts connections for `app` until the listener fails for good (never, in practice).
/// With `tls` (`[http] tls`, PROTOCOL.md section 7) each admitted connection does its TLS
/// handshake in its own task, bounded by [`tls::HANDSHAKE_TIMEOUT`], so a client that
/// connects and stays silent delays nobody else and holds its place under the caps only that
/// long.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    gate: Arc<ConnGate>,
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
) {
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: the descriptors come back as connections close.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = gate.admit(remote.ip()) else {
            // Over TLS the canned answer would be garbage to the client: just close.
            if tls.is_none() {
                let _ = stream.try_write(REFUSED);
            }
            continue;
        };
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(PEER.scope(remote, async move {
            let _permit = permit;
            let Some(acceptor) = tls else {
                return serve_connection(stream, app, header_timeout, remote).await;
            };
            match tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => serve_connection(s, app, header_timeout, remote).await,
                Ok(Err(e)) => tracing::debug!(peer = %remote, error = %e, "HTTPS handshake failed"),
                Err(_) => tracing::debug!(peer = %remote, "HTTPS handshake timed out"),
            }
        }));
    }
}

/// HTTP/1.1 on one connection, plain or TLS.
async fn serve_connection<S>(stream: S, app: Router, header_timeout: Duration, remote: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let service = TowerToHyperService::new(app);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(peer = %remote, error = %e, "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_answer_is_well_formed() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
