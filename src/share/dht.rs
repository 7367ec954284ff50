//! The terminal index's "who holds content X" (claim 8): a BitTorrent mainline DHT (BEP 5)
//! through the `mainline` crate. A holder `announce_peer`s the key of a content with the
//! port of its piece server; a fetcher `get_peers` the same key and then asks each holder
//! for its bitfield (`GET /v1/pieces/{content_id}`, [`crate::peer::terminals`]).
//!
//! The key is the first 20 bytes of SHA-256(`"callvault terminal index\0"` ‖ content id):
//! separated from real BitTorrent info-hashes, and the same for every agent of the content.
//!
//! Nodes run in server mode (they store announces for each other) and bootstrap only from
//! the addresses they are given (the offer's `dht_bootstrap`, `--dht-bootstrap`): never from
//! the public bootstrap nodes that `mainline` uses by default.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mainline::async_dht::AsyncDht;
use mainline::{Dht, Id};
use sha2::{Digest, Sha256};

/// A DHT query waits this long for each node: loopback and LAN nodes answer in
/// milliseconds, and a vanished node should not stall lookups for the default 2 s.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DhtError {
    #[error("the DHT binds IPv4 only, not {0}")]
    NotIpv4(IpAddr),
    #[error("DHT bootstrap address {0:?} is not ip:port")]
    BadBootstrap(String),
    #[error("starting the DHT node: {0}")]
    Io(#[from] std::io::Error),
}

/// The DHT key of a content.
pub(crate) fn content_key(content_id: &str) -> Id {
    let mut h = Sha256::new();
    h.update(b"callvault terminal index\0");
    h.update(content_id.as_bytes());
    let digest = h.finalize();
    let mut id = [0u8; 20];
    id.copy_from_slice(&digest[..20]);
    Id::from(id)
}

/// Parses bootstrap entries (`ip:port`, IPv4): names would need a resolver and the public
/// DHT is never wanted.
pub(crate) fn parse_bootstrap(list: &[String]) -> Result<Vec<SocketAddr>, DhtError> {
    list.iter()
        .map(|s| {
            s.trim()
                .parse::<SocketAddr>()
                .ok()
                .filter(SocketAddr::is_ipv4)
                .ok_or_else(|| DhtError::BadBootstrap(s.clone()))
        })
        .collect()
}

/// A running DHT node and the UDP address it answers on.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub dht: AsyncDht,
    pub addr: SocketAddr,
}

/// Starts a server-mode node on `bind` (port 0: any), bootstrapping from `bootstrap` only
/// (none: the first node of a swarm).
pub(crate) async fn start_node(
    bind: SocketAddr,
    bootstrap: &[SocketAddr],
) -> Result<Node, DhtError> {
    let ip = match bind.ip() {
        IpAddr::V4(ip) => ip,
        other => return Err(DhtError::NotIpv4(other)),
    };
    let mut b = Dht::builder();
    b.server_mode()
        .bind_address(ip)
        .port(bind.port())
        .request_timeout(REQUEST_TIMEOUT);
    if bootstrap.is_empty() {
        b.no_bootstrap();
    } else {
        b.bootstrap(bootstrap);
    }
    // Binding the socket and spawning the node's thread: blocking, but short.
    let dht = tokio::task::spawn_blocking(move || b.build())
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??
        .as_async();
    let local = dht.info().await.local_addr();
    // An unspecified bind answers on every address; peers reach it on the one asked for.
    let addr_ip = if ip.is_unspecified() {
        Ipv4Addr::LOCALHOST
    } else {
        *local.ip()
    };
    Ok(Node {
        dht,
        addr: SocketAddr::from((addr_ip, local.port())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    #[test]
    fn keys_and_bootstrap_lists() {
        let a = content_key(&"a".repeat(64));
        assert_eq!(a, content_key(&"a".repeat(64)));
        assert_ne!(a, content_key(&"b".repeat(64)));
        let ok = parse_bootstrap(&["127.0.0.1:6881".into()]).unwrap();
        assert_eq!(ok, vec!["127.0.0.1:6881".parse::<SocketAddr>().unwrap()]);
        for bad in ["router.bittorrent.com:6881", "[::1]:6881", "127.0.0.1"] {
            assert!(parse_bootstrap(&[bad.into()]).is_err(), "{bad}");
        }
    }

    /// Three loopback nodes, two bootstrapped from the first: an announce by one is found
    /// by the other, with the announced port.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announce_and_get_peers_on_loopback() {
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = start_node(local, &[]).await.unwrap();
        assert!(first.addr.ip().is_loopback() && first.addr.port() != 0);
        let a = start_node(local, &[first.addr]).await.unwrap();
        let b = start_node(local, &[first.addr]).await.unwrap();
        let key = content_key(&"c".repeat(64));
        a.dht.announce_peer(key, Some(45555)).await.unwrap();
        let mut found = Vec::new();
        let mut s = b.dht.get_peers(key);
        while let Some(batch) = s.next().await {
            found.extend(batch);
        }
        assert!(
            found
                .iter()
                .any(|p| p.port() == 45555 && p.ip().is_loopback()),
            "{found:?}"
        );
    }
}
