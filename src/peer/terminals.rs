//! The piece index on the terminals (claim 8), fetch side: no index server is asked.
//!
//! - *Who holds the content*: this agent's mainline DHT node ([`crate::share::dht`])
//!   announces the content's key with the port of its piece server (from the start, with
//!   nothing held yet, as the server index is announced to: fetchers then leave it its share
//!   of the pieces nobody holds) and looks the key up every [`LOOKUP_EVERY`].
//! - *Which pieces*: every holder found is asked for its bitfield
//!   (`GET /v1/pieces/{content_id}`, [`super::serve`]) every [`POLL_EVERY`], the pull form
//!   of BitTorrent's `have` messages.
//!
//! What the probes answer goes into a [`MemoryIndex`] of this agent's own (the
//! [`crate::share::PieceIndex`] seam, with the server's TTL), whose holders feed the same
//! [`super::plan::Scheduler`] as the server index: selection does not change with the index.
//!
//! Holders drop out when their probe fails (the agent is gone or no longer serves the
//! content) or when the DHT has not named them for the TTL. A holder lying about a piece is
//! caught by the piece hash and banned by the scheduler, as with any index.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::http::{parse_url, Client};
use super::serve::BitfieldView;
use crate::share::dht::Node;
use crate::share::index::{Bitfield, Holder, MemoryIndex, PieceIndex};
use crate::share::select::SourceClass;

/// How often the DHT is asked who holds the content.
pub(crate) const LOOKUP_EVERY: Duration = Duration::from_secs(2);
/// How often known holders are asked for their bitfield.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(500);
/// How often this agent re-announces itself (and retries a failed announce sooner).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);
const ANNOUNCE_RETRY: Duration = Duration::from_secs(2);
/// A bitfield probe that takes longer counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest bitfield answer read (a 500k-piece bitfield is about 85 KB of base64).
const MAX_BITFIELD: usize = 1024 * 1024;

/// Addresses the DHT named, with when it last did.
type Found = Arc<Mutex<HashMap<SocketAddrV4, Instant>>>;

/// The terminal index of one content for one fetch; [`TerminalIndex::run`] until dropped.
#[derive(Debug)]
pub(crate) struct TerminalIndex {
    pub client: Client,
    pub node: Node,
    pub content_id: String,
    pub peer_id: String,
    /// This agent's piece server (`host:port`): announced, and never probed.
    pub address: String,
    pub pieces: usize,
    /// A holder the DHT has not named for this long is dropped (the server's
    /// `holder_ttl_secs`).
    pub ttl: Duration,
    /// False with `--server-only`: look up but never announce.
    pub announce: bool,
}

impl TerminalIndex {
    /// Announces, looks up and probes until dropped, publishing the live holders.
    pub(crate) async fn run(self, holders_tx: watch::Sender<Arc<Vec<Holder>>>) {
        let key = crate::share::dht::content_key(&self.content_id);
        let found: Found = Arc::default();
        // Dropped with this future: the announce and lookup loops end with it.
        let mut loops = JoinSet::new();
        if self.announce {
            let port = self
                .address
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok());
            let dht = self.node.dht.clone();
            loops.spawn(async move {
                loop {
                    let wait = match dht.announce_peer(key, port).await {
                        Ok(_) => ANNOUNCE_EVERY,
                        Err(e) => {
                            tracing::debug!(error = %e, "DHT announce failed; retrying");
                            ANNOUNCE_RETRY
                        }
                    };
                    tokio::time::sleep(wait).await;
                }
            });
        }
        let (dht, found2) = (self.node.dht.clone(), found.clone());
        let (looked_tx, mut looked_rx) = watch::channel(());
        loops.spawn(async move {
            loop {
                let mut peers = dht.get_peers(key);
                while let Some(batch) = peers.next().await {
                    let now = Instant::now();
                    if let Ok(mut f) = found2.lock() {
                        for a in batch {
                            f.insert(a, now);
                        }
                    }
                }
                looked_tx.send_replace(());
                tokio::time::sleep(LOOKUP_EVERY).await;
            }
        });
        let cache = MemoryIndex::new(self.ttl);
        // The first lookup is awaited: the fetch loop waits for a first holders list.
        let _ = tokio::time::timeout(LOOKUP_EVERY, looked_rx.changed()).await;
        loop {
            let targets = self.live_targets(&found);
            self.probe_all(&targets, &cache, &found).await;
            holders_tx.send_replace(Arc::new(cache.holders(&self.content_id, SystemTime::now())));
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Addresses named by the DHT within the TTL, except this agent's own.
    fn live_targets(&self, found: &Found) -> Vec<SocketAddrV4> {
        let Ok(mut f) = found.lock() else {
            return Vec::new();
        };
        f.retain(|_, seen| seen.elapsed() < self.ttl);
        f.keys()
            .filter(|a| a.to_string() != self.address)
            .copied()
            .collect()
    }

    /// Asks every target for its bitfield at once; answers refresh `cache`, failures drop
    /// the holder (and its address, until the DHT names it again).
    async fn probe_all(&self, targets: &[SocketAddrV4], cache: &MemoryIndex, found: &Found) {
        let mut probes = JoinSet::new();
        for a in targets {
            let (client, a) = (self.client.clone(), *a);
            let url = format!("http://{a}/v1/pieces/{}", self.content_id);
            probes.spawn(async move { (a, probe(&client, &url).await) });
        }
        while let Some(joined) = probes.join_next().await {
            let Ok((addr, answer)) = joined else {
                continue;
            };
            let address = addr.to_string();
            let ok = answer.and_then(|v| self.accept(cache, &address, v));
            if let Err(why) = ok {
                tracing::debug!(holder = %address, why, "holder dropped");
                for h in cache.holders(&self.content_id, SystemTime::now()) {
                    if h.address == address {
                        cache.remove(&self.content_id, &h.peer_id);
                    }
                }
                if let Ok(mut f) = found.lock() {
                    f.remove(&addr);
                }
            }
        }
    }

    /// Records a bitfield answer after checking it is about this content.
    fn accept(&self, cache: &MemoryIndex, address: &str, v: BitfieldView) -> Result<(), String> {
        if v.content_id != self.content_id || v.pieces != self.pieces {
            return Err(format!(
                "answered for {} / {} pieces",
                v.content_id, v.pieces
            ));
        }
        if v.peer_id == self.peer_id {
            return Err("our own peer id".into());
        }
        let have = Bitfield::from_base64(&v.have, self.pieces).map_err(|e| e.to_string())?;
        let class = SourceClass::parse_announced(&v.class).unwrap_or(SourceClass::Peer);
        cache
            .announce(
                &self.content_id,
                &v.peer_id,
                address,
                class,
                have,
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())
    }
}

/// One bitfield request.
async fn probe(client: &Client, url: &str) -> Result<BitfieldView, String> {
    let url = parse_url(url).map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(PROBE_TIMEOUT, client.get(&url, &[], MAX_BITFIELD))
        .await
        .map_err(|_| "bitfield request timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(r.describe());
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("bitfield answer: {e}"))
}
