//! Fetching offered content (PROTOCOL 3): the manifest (checked against `content_id`), then
//! the pieces in parallel, each from the source [`Scheduler`] picks, verified against the
//! manifest's SHA-256 and written at its offset in the output file. Alongside, an index task
//! announces what this agent holds (with the address its [`PieceServer`] listens on) and
//! keeps the holders list fresh; the announce answer is the index, so one request does both.
//! With the index on the terminals ([`IndexChoice::Terminals`]) that task is a
//! [`TerminalIndex`] instead: a DHT lookup plus the holders' bitfields, no index server.

use std::io::{IsTerminal as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::http::{authority, basic_auth, join, parse_url, Client, Request, Url};
use super::plan::{Assignment, Outcome, PlanConfig, Scheduler, Tally};
use super::serve::{PieceServer, Served};
use super::state::{Progress, ResumeState};
use super::terminals::TerminalIndex;
use super::{FetchArgs, PeerError};
use crate::share::index::{Bitfield, Holder};
use crate::share::manifest::{content_id_of, is_sha256_hex, Manifest};
use crate::share::select::{CostModel, CostParams, Source, SourceClass};

/// Holders are asked again this often (and right after each change of what we hold,
/// at most every [`ANNOUNCE_THROTTLE`]).
const INDEX_REFRESH: Duration = Duration::from_secs(1);
const ANNOUNCE_THROTTLE: Duration = Duration::from_millis(250);
/// How long the first index answer is awaited before fetching blind (server only).
const FIRST_INDEX_WAIT: Duration = Duration::from_secs(3);
/// Largest manifest accepted (about 500k pieces).
const MAX_MANIFEST: usize = 40 * 1024 * 1024;
const MAX_INDEX: usize = 16 * 1024 * 1024;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Off,
    /// A plain line per second on stdout (false) or stderr (true).
    Lines {
        stderr: bool,
    },
    /// A `\r` bar on stdout (a terminal).
    Bar,
}

/// Everything a fetch needs (built from the CLI or from an offer).
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub server_url: String,
    pub content_id: String,
    pub manifest_url: String,
    pub index_url: String,
    /// `Authorization` value for the server and index (Bearer token or Basic).
    pub auth: Option<String>,
    pub out: PathBuf,
    pub peer_id: String,
    pub parallel: usize,
    pub state_dir: Option<PathBuf>,
    pub server_only: bool,
    pub progress: ProgressMode,
    /// What this agent announces itself as (`peer` or `mobile`).
    pub class: SourceClass,
    /// Which index finds the holders.
    pub index: IndexChoice,
}

/// Where an agent learns who holds which pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexChoice {
    /// The index at `index_url` (in serve, or the `callvault index` role; claims 6–7).
    Server,
    /// The index on the terminals (claim 8): a DHT bootstrapped from these `ip:port`
    /// nodes, plus the holders' bitfields.
    Terminals { bootstrap: Vec<String> },
}

/// How long a holder the DHT stops naming is kept: the server's default `holder_ttl_secs`.
pub const TERMINAL_HOLDER_TTL: Duration = Duration::from_secs(600);

/// The share-offer body (PROTOCOL 3 step 3); only what a fetch uses is required.
#[derive(Debug, Clone, Deserialize)]
pub struct OfferBody {
    pub content_id: String,
    pub server_url: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub manifest_url: Option<String>,
    #[serde(default)]
    pub index_url: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    /// `"terminals"`: the index lives on the agents (an addition to PROTOCOL §3).
    #[serde(default)]
    pub index: Option<String>,
    /// DHT nodes to bootstrap from with `index = "terminals"`.
    #[serde(default)]
    pub dht_bootstrap: Vec<String>,
}

impl FetchOptions {
    /// Options for an offer, with defaults for the rest.
    pub fn from_offer(offer: &OfferBody, out: PathBuf, peer_id: &str) -> FetchOptions {
        let base = offer.server_url.trim_end_matches('/').to_string();
        let cid = &offer.content_id;
        FetchOptions {
            manifest_url: offer
                .manifest_url
                .clone()
                .unwrap_or_else(|| format!("{base}/v1/shares/{cid}/manifest")),
            index_url: offer
                .index_url
                .clone()
                .unwrap_or_else(|| format!("{base}/v1/index/{cid}")),
            server_url: base,
            content_id: cid.clone(),
            auth: offer.token.as_ref().map(|t| format!("Bearer {t}")),
            out,
            peer_id: peer_id.to_string(),
            parallel: 4,
            state_dir: None,
            server_only: false,
            progress: ProgressMode::Off,
            class: SourceClass::Peer,
            index: if offer.index.as_deref() == Some("terminals") {
                IndexChoice::Terminals {
                    bootstrap: offer.dht_bootstrap.clone(),
                }
            } else {
                IndexChoice::Server
            },
        }
    }
}

impl FetchOptions {
    /// `--index server|terminals|URL` over what the offer says, and `--dht-bootstrap`
    /// nodes added to the offer's for the terminal index.
    pub fn choose_index(&mut self, offer: &OfferBody, index: Option<&str>, extra: &[String]) {
        match index {
            None => {}
            Some("server") => self.index = IndexChoice::Server,
            Some("terminals") => {
                self.index = IndexChoice::Terminals {
                    bootstrap: offer.dht_bootstrap.clone(),
                }
            }
            Some(url) => {
                self.index_url = url.to_string();
                self.index = IndexChoice::Server;
            }
        }
        if let IndexChoice::Terminals { bootstrap } = &mut self.index {
            bootstrap.extend(extra.iter().cloned());
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub content_id: String,
    pub name: String,
    pub size: u64,
    pub pieces: usize,
    pub out: String,
    pub peer_id: String,
    pub address: String,
    pub elapsed_secs: f64,
    pub from_server: u64,
    pub from_peers: u64,
    /// Verified bytes per source ("server" or a peer id).
    pub by_source: std::collections::BTreeMap<String, u64>,
    pub hash_mismatches: u64,
    pub failures: u64,
    /// Pieces already verified from the resume state.
    pub resumed_pieces: usize,
}

impl FetchReport {
    fn new(
        m: &Manifest,
        o: &FetchOptions,
        addr: &str,
        t: &Tally,
        el: Duration,
        resumed: usize,
    ) -> Self {
        FetchReport {
            content_id: o.content_id.clone(),
            name: m.name.clone(),
            size: m.size,
            pieces: m.pieces.len(),
            out: o.out.display().to_string(),
            peer_id: o.peer_id.clone(),
            address: addr.to_string(),
            elapsed_secs: el.as_secs_f64(),
            from_server: t.server_bytes(),
            from_peers: t.peer_bytes(),
            by_source: t.by_source.clone(),
            hash_mismatches: t.hash_mismatches,
            failures: t.failures,
            resumed_pieces: resumed,
        }
    }

    /// The human form: `from server: N bytes, from peers: M bytes` and one line per peer.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{}: {} bytes in {:.2} s\nfrom server: {} bytes, from peers: {} bytes\n",
            self.name, self.size, self.elapsed_secs, self.from_server, self.from_peers
        );
        for (k, v) in &self.by_source {
            if k != "server" {
                s.push_str(&format!("  from peer {k}: {v} bytes\n"));
            }
        }
        if self.hash_mismatches > 0 || self.failures > 0 {
            s.push_str(&format!(
                "hash mismatches: {}, failed fetches: {}\n",
                self.hash_mismatches, self.failures
            ));
        }
        if self.resumed_pieces > 0 {
            s.push_str(&format!("resumed with {} pieces\n", self.resumed_pieces));
        }
        s
    }
}

/// Keeps announcing (and serving through its [`PieceServer`]) while alive.
#[derive(Debug)]
pub struct Announcer {
    _have: watch::Sender<Bitfield>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Deserialize)]
struct IndexJson {
    holders: Vec<HolderJson>,
}

#[derive(Deserialize)]
struct HolderJson {
    peer_id: String,
    address: String,
    have: String,
    /// Absent from older indexes: a plain peer.
    #[serde(default)]
    class: Option<String>,
}

fn parse_index(body: &[u8], pieces: usize) -> Result<Vec<Holder>, PeerError> {
    let ix: IndexJson = serde_json::from_slice(body)?;
    let now = SystemTime::now();
    Ok(ix
        .holders
        .into_iter()
        .filter_map(|h| {
            let have = Bitfield::from_base64(&h.have, pieces).ok()?;
            // Unknown classes count as plain peers: the index is newer than this agent.
            let class = match h.class.as_deref() {
                Some("server") => SourceClass::Server,
                Some(c) => SourceClass::parse_announced(c).unwrap_or(SourceClass::Peer),
                None => SourceClass::Peer,
            };
            Some(Holder {
                peer_id: h.peer_id,
                address: h.address,
                class,
                have,
                last_seen: now,
            })
        })
        .collect())
}

struct IndexTask {
    client: Client,
    url: Url,
    auth: Option<String>,
    peer_id: String,
    address: String,
    class: SourceClass,
    pieces: usize,
    announce: bool,
}

/// Redirects followed per index request (serve answers 307 when the index runs as
/// `callvault index`; one hop is the normal case).
const MAX_INDEX_REDIRECTS: usize = 3;

/// `{index}/announce` for an index URL, keeping its query (a `?token=` stays at the end).
pub fn announce_url(index: &Url) -> Url {
    let mut u = index.clone();
    u.set_path(&format!("{}/announce", index.path().trim_end_matches('/')));
    u
}

/// The index URL behind a redirect's `Location` (absolute, or relative to `from`); for an
/// announce, the `/announce` is taken off again.
pub fn index_url_from_location(from: &Url, location: &str, was_announce: bool) -> Option<Url> {
    let mut u = from.join(location).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    if was_announce {
        let base = u.path().strip_suffix("/announce")?.to_string();
        u.set_path(&base);
    }
    Some(u)
}

impl IndexTask {
    /// One index request; a `307`/`308` moves this task to the index named by `Location`
    /// for good (serve redirects to the `callvault index` role).
    async fn exchange(&mut self, req: &Request<'_>) -> Result<super::http::Response, PeerError> {
        let is_announce = req.method == "POST";
        for _ in 0..=MAX_INDEX_REDIRECTS {
            let url = if is_announce {
                announce_url(&self.url)
            } else {
                self.url.clone()
            };
            let r = self.client.send(&url, req).await?;
            if r.status != 307 && r.status != 308 {
                return Ok(r);
            }
            let next = r
                .header("Location")
                .and_then(|l| index_url_from_location(&url, l.trim(), is_announce))
                .ok_or_else(|| {
                    PeerError::Http(format!(
                        "index redirect without a usable Location: {}",
                        r.describe()
                    ))
                })?;
            tracing::info!(from = %format!("{}{}", authority(&self.url), self.url.path()),
                to = %format!("{}{}", authority(&next), next.path()), "index moved");
            self.url = next;
        }
        Err(PeerError::Http("too many index redirects".into()))
    }

    async fn run(
        mut self,
        mut have_rx: watch::Receiver<Bitfield>,
        holders_tx: watch::Sender<Arc<Vec<Holder>>>,
    ) {
        loop {
            let have = have_rx.borrow_and_update().clone();
            // Announced from the start, empty: other agents then know this one is fetching
            // and leave it its share of the pieces nobody holds yet.
            let mut req = if self.announce {
                let body = serde_json::json!({
                    "peer_id": self.peer_id,
                    "address": self.address,
                    "have": have.to_base64(),
                    "class": self.class.as_str(),
                });
                Request {
                    method: "POST",
                    headers: vec![("Content-Type".into(), "application/json".into())],
                    body: body.to_string().into_bytes(),
                    max_body: MAX_INDEX,
                }
            } else {
                Request::get(MAX_INDEX)
            };
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a.clone());
            }
            match self.exchange(&req).await {
                Ok(r) if r.is_success() => match parse_index(&r.body, self.pieces) {
                    Ok(h) => {
                        holders_tx.send_replace(Arc::new(h));
                    }
                    Err(e) => tracing::warn!(error = %e, "index answer unreadable"),
                },
                Ok(r) => tracing::warn!(answer = %r.describe(), "index refused"),
                Err(e) => tracing::warn!(error = %e, "index unreachable"),
            }
            tokio::select! {
                r = have_rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Gather a burst of new pieces into one announce.
                    tokio::time::sleep(ANNOUNCE_THROTTLE).await;
                }
                _ = tokio::time::sleep(INDEX_REFRESH) => {}
            }
        }
    }
}

/// GETs the manifest and checks `content_id` = SHA-256 of its bytes.
pub async fn get_manifest(client: &Client, o: &FetchOptions) -> Result<Manifest, PeerError> {
    if !is_sha256_hex(&o.content_id) {
        return Err(PeerError::Usage(format!(
            "content id {:?} is not 64 lowercase hex digits",
            o.content_id
        )));
    }
    let mut req = Request::get(MAX_MANIFEST);
    if let Some(a) = &o.auth {
        req = req.header("Authorization", a.clone());
    }
    let r = client.send(&parse_url(&o.manifest_url)?, &req).await?;
    if !r.is_success() {
        return Err(PeerError::Server {
            what: "manifest".into(),
            detail: r.describe(),
        });
    }
    let got = content_id_of(&r.body);
    if got != o.content_id {
        return Err(PeerError::Manifest(format!(
            "SHA-256 of the manifest is {got}, not the content id {}",
            o.content_id
        )));
    }
    Manifest::parse(&r.body).ok_or_else(|| PeerError::Manifest("inconsistent manifest".into()))
}

fn piece_hash_ok(data: &[u8], want_hex: &str) -> bool {
    hex::encode(Sha256::digest(data)) == want_hex
}

/// One piece: GET, length and hash check, write at its offset.
async fn fetch_piece(
    client: Client,
    url: Url,
    auth: Option<String>,
    a: Assignment,
    hash: String,
    file: Arc<std::fs::File>,
    offset: u64,
) -> Outcome {
    let len = usize::try_from(a.bytes).unwrap_or(usize::MAX);
    let mut req = Request::get(len);
    if let Some(v) = auth {
        req = req.header("Authorization", v);
    }
    let r = match client.send(&url, &req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(piece = a.piece, source = ?a.source, error = %e, "piece fetch failed");
            return Outcome::Failed;
        }
    };
    if r.status != 200 || r.body.len() != len {
        tracing::debug!(piece = a.piece, source = ?a.source, status = r.status, len = r.body.len(), "piece refused or short");
        return Outcome::Failed;
    }
    let (rtt, transfer) = (r.rtt, r.transfer);
    let body = r.body;
    // Hashing and the positioned write are CPU and blocking I/O: off the async workers.
    let done = tokio::task::spawn_blocking(move || {
        if !piece_hash_ok(&body, &hash) {
            return Ok(false);
        }
        file.write_all_at(&body, offset).map(|()| true)
    })
    .await;
    match done {
        Ok(Ok(true)) => Outcome::Ok {
            rtt,
            transfer,
            bytes: a.bytes,
        },
        Ok(Ok(false)) => Outcome::HashMismatch,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "writing a piece failed");
            Outcome::Failed
        }
        Err(_) => Outcome::Failed,
    }
}

/// Re-hashes the pieces the resume state names; returns those that still match.
fn verify_saved(file: &std::fs::File, m: &Manifest, saved: &Bitfield) -> Bitfield {
    let mut ok = Bitfield::empty(m.pieces.len());
    let mut buf = Vec::new();
    for (i, want) in m.pieces.iter().enumerate() {
        if !saved.get(i) {
            continue;
        }
        let Some((off, len)) = m.piece_range(i as u64) else {
            continue;
        };
        buf.resize(usize::try_from(len).unwrap_or(0), 0);
        if file.read_exact_at(&mut buf, off).is_ok() && piece_hash_ok(&buf, want) {
            ok.set(i, true);
        }
    }
    ok
}

struct ProgressOut {
    mode: ProgressMode,
    next: Instant,
}

impl ProgressOut {
    fn show(&mut self, p: &Progress, last: bool) {
        let now = Instant::now();
        if self.mode == ProgressMode::Off || (!last && now < self.next) {
            return;
        }
        match self.mode {
            ProgressMode::Off => {}
            ProgressMode::Bar => {
                self.next = now + Duration::from_millis(200);
                let mut out = std::io::stdout().lock();
                let _ = write!(out, "\r{}", p.bar(30));
                if last {
                    let _ = writeln!(out);
                }
                let _ = out.flush();
            }
            ProgressMode::Lines { stderr } => {
                self.next = now + Duration::from_secs(1);
                let line = format!("progress {}", p.line());
                if stderr {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
        }
    }
}

/// Fetches the content of `o`, serving verified pieces through `pieces_srv` and announcing
/// `advertise` as this agent's address. The [`Announcer`] keeps announcing (seeding) until
/// dropped.
pub async fn fetch(
    o: &FetchOptions,
    pieces_srv: &PieceServer,
    advertise: &str,
) -> Result<(FetchReport, Announcer), PeerError> {
    let started = Instant::now();
    let client = Client::default();
    parse_url(&o.server_url)?;
    let index_url = parse_url(&o.index_url)?;
    // Started first: the node bootstraps while the manifest is fetched.
    let dht_node = match &o.index {
        IndexChoice::Server => None,
        IndexChoice::Terminals { bootstrap } => {
            let boot = crate::share::dht::parse_bootstrap(bootstrap)?;
            if boot.is_empty() {
                tracing::warn!("terminal index without DHT bootstrap nodes: only agents that bootstrap from this one will find it");
            }
            let ip = advertise
                .parse::<std::net::SocketAddr>()
                .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            Some(crate::share::dht::start_node((ip, 0).into(), &boot).await?)
        }
    };
    let m = get_manifest(&client, o).await?;
    let n = m.pieces.len();
    let lens: Vec<u64> = (0..n as u64)
        .map(|i| m.piece_range(i).map_or(0, |(_, l)| l))
        .collect();

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&o.out)
        .map_err(|e| PeerError::Usage(format!("{}: {e}", o.out.display())))?;
    file.set_len(m.size)?;
    let file = Arc::new(file);

    let state = o
        .state_dir
        .as_ref()
        .map(|d| ResumeState::new(d, &o.content_id));
    let mut have = Bitfield::empty(n);
    if let Some(saved) = state.as_ref().and_then(|s| s.load(n)) {
        let (f, m2) = (file.clone(), m.clone());
        have = tokio::task::spawn_blocking(move || verify_saved(&f, &m2, &saved))
            .await
            .map_err(|e| PeerError::Http(e.to_string()))?;
    }
    let resumed = have.count();

    let served = Arc::new(Served {
        file: std::fs::File::open(&o.out)?,
        size: m.size,
        piece_size: m.piece_size,
        have: RwLock::new(have.clone()),
        peer_id: o.peer_id.clone(),
        class: o.class,
    });
    pieces_srv.add(&o.content_id, served.clone());

    let (have_tx, have_rx) = watch::channel(have.clone());
    let (holders_tx, mut holders_rx) = watch::channel(Arc::new(Vec::<Holder>::new()));
    let task = match dht_node {
        None => tokio::spawn(
            IndexTask {
                client: client.clone(),
                url: index_url,
                auth: o.auth.clone(),
                peer_id: o.peer_id.clone(),
                address: advertise.to_string(),
                class: o.class,
                pieces: n,
                announce: !o.server_only,
            }
            .run(have_rx, holders_tx),
        ),
        // The piece server answers the bitfield itself: nothing to push on `have_rx`.
        Some(node) => tokio::spawn(
            TerminalIndex {
                client: client.clone(),
                node,
                content_id: o.content_id.clone(),
                peer_id: o.peer_id.clone(),
                address: advertise.to_string(),
                pieces: n,
                ttl: TERMINAL_HOLDER_TTL,
                announce: !o.server_only,
            }
            .run(holders_tx),
        ),
    };
    let announcer = Announcer {
        task,
        _have: have_tx.clone(),
    };

    let mut cfg = PlanConfig::new(&o.peer_id, o.parallel);
    cfg.server_only = o.server_only;
    cfg.piece_hint = m.piece_size;
    let mut sched = Scheduler::new(cfg, lens, have, CostModel::new(agent_cost_params()));
    let mut progress = ProgressOut {
        mode: o.progress,
        next: Instant::now(),
    };
    let snapshot = |s: &Scheduler| Progress {
        pieces_done: s.have().count(),
        pieces: n,
        bytes_done: s.bytes_done(),
        bytes: m.size,
        from_server: s.tally().server_bytes(),
        from_peers: s.tally().peer_bytes(),
        elapsed: started.elapsed(),
    };

    // Know who holds what before the first choice, or every agent starting at once would
    // ask the server for its first `parallel` pieces blind.
    if !o.server_only {
        let _ = tokio::time::timeout(FIRST_INDEX_WAIT, holders_rx.changed()).await;
    }
    let mut tasks: JoinSet<(Assignment, Outcome)> = JoinSet::new();
    let mut holders = holders_rx.borrow_and_update().clone();
    let mut holders_open = true;
    while !sched.is_complete() {
        let now = Instant::now();
        while let Some(a) = sched.next(&holders, now) {
            let (url, auth) = match &a.source {
                Source::Server => (
                    join(
                        &o.server_url,
                        &format!("/v1/pieces/{}/{}", o.content_id, a.piece),
                    ),
                    o.auth.clone(),
                ),
                Source::Peer(id) => (
                    holders
                        .iter()
                        .find(|h| &h.peer_id == id)
                        .ok_or_else(|| PeerError::Http(format!("{id} left the index")))
                        .and_then(|h| {
                            parse_url(&format!(
                                "http://{}/v1/pieces/{}/{}",
                                h.address, o.content_id, a.piece
                            ))
                        }),
                    None,
                ),
            };
            let url = match url {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "no usable address");
                    sched.complete(a.piece, &a.source, Outcome::Failed, now)?;
                    continue;
                }
            };
            tracing::debug!(peer = %o.peer_id, piece = a.piece, source = ?a.source, holders = holders.len(),
                server_cost = sched.model().cost(&Source::Server, a.bytes), "fetching");
            let (offset, _) = m.piece_range(a.piece as u64).unwrap_or((0, 0));
            let hash = m.pieces.get(a.piece).cloned().unwrap_or_default();
            let fut = fetch_piece(
                client.clone(),
                url,
                auth,
                a.clone(),
                hash,
                file.clone(),
                offset,
            );
            tasks.spawn(async move { (a, fut.await) });
        }
        let wait = sched
            .next_wakeup(now)
            .map_or(Duration::from_millis(500), |t| {
                t.saturating_duration_since(now)
            })
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
        tokio::select! {
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let (a, outcome) = joined.map_err(|e| PeerError::Http(format!("fetch task: {e}")))?;
                let ok = matches!(outcome, Outcome::Ok { .. });
                if outcome == Outcome::HashMismatch {
                    tracing::warn!(piece = a.piece, source = ?a.source, "piece hash mismatch; trying another source");
                }
                sched.complete(a.piece, &a.source, outcome, Instant::now())?;
                if sched.is_banned(&a.source) {
                    tracing::debug!(source = ?a.source, "source banned");
                }
                if ok {
                    served.set_have(a.piece);
                    have_tx.send_replace(sched.have().clone());
                    if let Some(st) = &state {
                        if let Err(e) = st.save(sched.have()) {
                            tracing::warn!(error = %e, "saving resume state failed");
                        }
                    }
                }
            }
            r = holders_rx.changed(), if holders_open => {
                if r.is_err() {
                    holders_open = false;
                } else {
                    holders = holders_rx.borrow_and_update().clone();
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        progress.show(&snapshot(&sched), false);
    }
    progress.show(&snapshot(&sched), true);
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_all())
        .await
        .map_err(|e| PeerError::Http(e.to_string()))??;
    let report = FetchReport::new(&m, o, advertise, sched.tally(), started.elapsed(), resumed);
    Ok((report, announcer))
}

/// The agent's cost defaults: those of [`CostParams::default`], except that a server never
/// measured is assumed half as fast as a peer never measured. The server is the one source
/// every agent shares; with the plain defaults an unknown peer only ties with it, so each
/// agent joining a swarm would take its first pieces from the server for no reason.
pub fn agent_cost_params() -> CostParams {
    let d = CostParams::default();
    CostParams {
        default_server: crate::share::select::Estimate {
            rtt: d.default_server.rtt,
            throughput: d.default_peer.throughput / 2.0,
        },
        ..d
    }
}

pub(crate) fn random_peer_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut b);
    format!("p-{}", hex::encode(b))
}

/// Builds [`FetchOptions`] from the command line (or its `--offer` file).
pub fn options_from_args(a: &FetchArgs) -> Result<FetchOptions, PeerError> {
    let peer_id = a.peer_id.clone().unwrap_or_else(random_peer_id);
    crate::share::index::validate_peer_id(&peer_id)
        .map_err(|e| PeerError::Usage(format!("--peer-id: {e}")))?;
    let mut offer = match &a.offer {
        Some(p) => serde_json::from_slice::<OfferBody>(&std::fs::read(p)?)?,
        None => OfferBody {
            content_id: a
                .content
                .clone()
                .ok_or_else(|| PeerError::Usage("--content (or --offer) is required".into()))?,
            server_url: a
                .server
                .clone()
                .ok_or_else(|| PeerError::Usage("--server (or --offer) is required".into()))?,
            name: None,
            manifest_url: None,
            index_url: None,
            token: None,
            index: None,
            dht_bootstrap: Vec::new(),
        },
    };
    if let Some(t) = &a.token {
        offer.token = Some(t.clone());
    }
    if let Some(s) = &a.server {
        offer.server_url = s.clone();
    }
    let mut o = FetchOptions::from_offer(&offer, a.out.clone(), &peer_id);
    o.choose_index(&offer, a.index.as_deref(), &a.dht_bootstrap);
    match (&a.user, &a.password) {
        (Some(u), Some(p)) => o.auth = Some(basic_auth(u, p)),
        (None, None) => {}
        _ => return Err(PeerError::Usage("--user and --password go together".into())),
    }
    o.parallel = a.parallel.max(1);
    o.class = a.class;
    o.state_dir = a.state.clone();
    o.server_only = a.server_only;
    o.progress = if a.quiet {
        ProgressMode::Off
    } else if a.json {
        ProgressMode::Lines { stderr: true }
    } else if std::io::stdout().is_terminal() {
        ProgressMode::Bar
    } else {
        ProgressMode::Lines { stderr: false }
    };
    Ok(o)
}

/// The address to announce: `--advertise`, else the bound address (which must then be a
/// concrete IP, not 0.0.0.0).
pub fn advertised(
    advertise: Option<&str>,
    bound: std::net::SocketAddr,
) -> Result<String, PeerError> {
    match advertise {
        Some(a) => {
            crate::share::index::validate_address(a)
                .map_err(|e| PeerError::Usage(format!("--advertise: {e}")))?;
            Ok(a.to_string())
        }
        None if bound.ip().is_unspecified() => Err(PeerError::Usage(
            "listening on an unspecified address: give --advertise host:port".into(),
        )),
        None => Ok(bound.to_string()),
    }
}

/// `callvault peer fetch`.
pub async fn run_cli(a: FetchArgs) -> Result<(), PeerError> {
    let o = options_from_args(&a)?;
    let srv = PieceServer::new(a.corrupt_pieces);
    let bound = srv.spawn(&a.listen).await?;
    let addr = advertised(a.advertise.as_deref(), bound)?;
    tracing::info!(peer_id = %o.peer_id, address = %addr, content = %o.content_id, "fetching");
    let (report, announcer) = fetch(&o, &srv, &addr).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.human());
    }
    let _ = std::io::stdout().flush();
    if a.seed {
        tracing::info!(address = %addr, "seeding until interrupted");
        let _ = tokio::signal::ctrl_c().await;
    } else if let Some(secs) = a.linger {
        tracing::info!(address = %addr, secs, "serving pieces before exiting");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    drop(announcer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_json_and_offer_defaults() {
        let mut b = Bitfield::empty(3);
        b.set(1, true);
        let body = serde_json::json!({
            "content_id": "x", "pieces": 3,
            "holders": [
                {"peer_id":"server","address":"h:1","have":Bitfield::full(3).to_base64(),"last_seen":"t"},
                {"peer_id":"p1","address":"127.0.0.1:9","have":b.to_base64(),"last_seen":"t"},
                {"peer_id":"bad","address":"127.0.0.1:9","have":"!!","last_seen":"t"}
            ]
        });
        let hs = parse_index(body.to_string().as_bytes(), 3).unwrap();
        assert_eq!(hs.len(), 2, "the unreadable bitfield is skipped");
        assert_eq!(hs[1].peer_id, "p1");
        assert!(hs[1].have.get(1) && !hs[1].have.get(0));
        assert!(parse_index(b"nope", 3).is_err());

        let offer: OfferBody = serde_json::from_str(&format!(
            r#"{{"content_id":"{}","server_url":"http://127.0.0.1:8080/","token":"tk","name":"a"}}"#,
            "ab".repeat(32)
        ))
        .unwrap();
        let o = FetchOptions::from_offer(&offer, "/tmp/x".into(), "me");
        assert_eq!(o.server_url, "http://127.0.0.1:8080");
        assert_eq!(
            o.manifest_url,
            format!(
                "http://127.0.0.1:8080/v1/shares/{}/manifest",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            o.index_url,
            format!("http://127.0.0.1:8080/v1/index/{}", "ab".repeat(32))
        );
        assert_eq!(o.auth.as_deref(), Some("Bearer tk"));
    }

    #[test]
    fn index_urls_announce_and_redirects() {
        let pq = |u: &Url| match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        };
        let ix = parse_url("http://127.0.0.1:8080/v1/index/abc?token=t").unwrap();
        assert_eq!(pq(&announce_url(&ix)), "/v1/index/abc/announce?token=t");
        let plain = parse_url("http://127.0.0.1:8080/v1/index/abc/").unwrap();
        assert_eq!(pq(&announce_url(&plain)), "/v1/index/abc/announce");
        // serve's 307 for a GET: the role's index URL as it is.
        let to = index_url_from_location(&ix, "http://127.0.0.1:8081/v1/index/abc?token=t", false)
            .unwrap();
        assert_eq!(authority(&to), "127.0.0.1:8081");
        assert_eq!(pq(&to), "/v1/index/abc?token=t");
        // ...for an announce: back to the index URL, so later GETs go there too.
        let ann = announce_url(&ix);
        let to = index_url_from_location(
            &ann,
            "https://127.0.0.1:8081/v1/index/abc/announce?token=t",
            true,
        )
        .unwrap();
        assert_eq!(to.scheme(), "https");
        assert_eq!(pq(&to), "/v1/index/abc?token=t");
        assert_eq!(pq(&announce_url(&to)), "/v1/index/abc/announce?token=t");
        let to = index_url_from_location(&ix, "/elsewhere/v1/index/abc", false).unwrap();
        assert_eq!(authority(&to), "127.0.0.1:8080");
        assert_eq!(pq(&to), "/elsewhere/v1/index/abc");
        assert!(index_url_from_location(&ix, "ftp://x/y", false).is_none());
        assert!(index_url_from_location(&ann, "http://h:1/v1/index/abc", true).is_none());
    }

    #[test]
    fn the_offer_and_index_flag_choose_the_index() {
        let offer: OfferBody = serde_json::from_value(serde_json::json!({
            "content_id": "ab".repeat(32), "server_url": "http://127.0.0.1:8080",
            "index": "terminals", "dht_bootstrap": ["127.0.0.1:6881"]
        }))
        .unwrap();
        let o = FetchOptions::from_offer(&offer, "/tmp/x".into(), "me");
        let boot = |b: &[&str]| IndexChoice::Terminals {
            bootstrap: b.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(o.index, boot(&["127.0.0.1:6881"]));
        let extra = ["127.0.0.1:7000".to_string()];
        let mut c = o.clone();
        c.choose_index(&offer, None, &extra);
        assert_eq!(c.index, boot(&["127.0.0.1:6881", "127.0.0.1:7000"]));
        let mut c = o.clone();
        c.choose_index(&offer, Some("server"), &extra);
        assert_eq!(c.index, IndexChoice::Server);
        let mut c = o.clone();
        c.choose_index(&offer, Some("http://127.0.0.1:9/v1/index/x"), &[]);
        assert_eq!(
            (c.index, c.index_url.as_str()),
            (IndexChoice::Server, "http://127.0.0.1:9/v1/index/x")
        );
        // An offer without the fields: the server index, unless asked otherwise.
        let plain = OfferBody {
            index: None,
            dht_bootstrap: Vec::new(),
            ..offer.clone()
        };
        let mut c = FetchOptions::from_offer(&plain, "/tmp/x".into(), "me");
        assert_eq!(c.index, IndexChoice::Server);
        c.choose_index(&plain, Some("terminals"), &extra);
        assert_eq!(c.index, boot(&["127.0.0.1:7000"]));
    }

    #[test]
    fn holder_classes_are_read_from_the_index() {
        let e = Bitfield::empty(1).to_base64();
        let body = serde_json::json!({"holders": [
            {"peer_id":"server","address":"h:1","have":e,"class":"server"},
            {"peer_id":"m","address":"h:2","have":e,"class":"mobile"},
            {"peer_id":"p","address":"h:3","have":e},
            {"peer_id":"q","address":"h:4","have":e,"class":"satellite"}
        ]});
        let hs = parse_index(body.to_string().as_bytes(), 1).unwrap();
        let classes: Vec<SourceClass> = hs.iter().map(|h| h.class).collect();
        assert_eq!(
            classes,
            [
                SourceClass::Server,
                SourceClass::MobilePeer,
                SourceClass::Peer,
                SourceClass::Peer
            ]
        );
    }

    #[test]
    fn advertised_address() {
        let b: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertised(None, b).unwrap(), "127.0.0.1:4000");
        let any: std::net::SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert!(advertised(None, any).is_err());
        assert_eq!(
            advertised(Some("10.0.0.1:4000"), any).unwrap(),
            "10.0.0.1:4000"
        );
        assert!(advertised(Some("nope"), any).is_err());
    }

    #[test]
    fn resume_verification_rechecks_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..250u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let pieces: Vec<String> = data
            .chunks(100)
            .map(|c| hex::encode(Sha256::digest(c)))
            .collect();
        let m = Manifest {
            name: "f".into(),
            size: 250,
            piece_size: 100,
            pieces,
        };
        let f = std::fs::File::open(&path).unwrap();
        let saved = Bitfield::full(3);
        assert_eq!(verify_saved(&f, &m, &saved).count(), 3);
        // Piece 1 damaged on disk since: dropped from what is held.
        let mut bad = data.clone();
        bad[150] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let ok = verify_saved(&f, &m, &saved);
        assert!(ok.get(0) && !ok.get(1) && ok.get(2));
        // Only what the state names is trusted.
        let mut one = Bitfield::empty(3);
        one.set(2, true);
        assert_eq!(verify_saved(&f, &m, &one).count(), 1);
    }
}
