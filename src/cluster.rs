//! The cluster edge (PROTOCOL.md 6): what a node does when its metadata database is shared
//! PostgreSQL. Nothing here runs on the embedded SQLite.
//!
//! - **Lease.** [`Cluster::start`] writes this node's lease row, then a task renews it every
//!   `lease_secs / 3` and, every second, reads every node's row and asks the pure policy
//!   ([`LeaseWatch`]) who is alive (`callvault_cluster_nodes_alive`) and who is dead.
//! - **Takeover.** For a dead node the task tries the conditional claim
//!   ([`Nodes::claim`]); the one node that wins finishes each of the dead node's `receiving`
//!   stores `truncated` with the media that reached shared storage
//!   ([`Stores::take_over`] → `storage::stores::committed_len`), settling its quota in the same
//!   transaction, releases its share uploads in flight, and drops the registrations only the
//!   dead node could reach.
//! - **Registrations.** The engine reports what REGISTERs change
//!   ([`EngineEvent::BindingsChanged`](crate::b2bua::engine::EngineEvent)); the core writes
//!   them to the shared table before the REGISTER's 200 leaves (RFC 3261 10.3 step 8: the
//!   registrar answers once the bindings are updated), so a request that reaches another node
//!   right after the 200 finds them. Before the core hands the engine a request that
//!   looks an AOR up (new INVITE, MESSAGE, REGISTER), it reads that AOR's bindings of other
//!   nodes ([`Cluster::remote_bindings`]) and gives them to the engine, which keeps them as a
//!   cache beside its own (`sip::registrar`). One indexed SELECT per such request; a phone
//!   registered on node 1 through the front proxy is reached from node 2 via its Path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::b2bua::engine::RegistrationSnapshot;
use crate::config::Config;
use crate::metrics::METRICS;
use crate::sip::registrar::BindingRecord;
use crate::sip::transport::Transport;
use crate::storage::lease::LeaseWatch;
use crate::storage::nodes::{NodeInfo, Nodes};
use crate::storage::objects::{chunks, Objects};
use crate::storage::registrations::{RegistrationRow, Registrations};
use crate::storage::stores::{Store, StoreState, Stores};
use crate::storage::Db;

/// How often every node's lease row is read: bounds the takeover delay at about
/// `lease_secs` + 2 s after the last renewal.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// `[cluster] node_id`, or host name + ":" + the first SIP listen port.
pub(crate) fn node_id(config: &Config) -> String {
    if !config.cluster.node_id.is_empty() {
        return config.cluster.node_id.clone();
    }
    let port = config.sip.listen.first().map_or(5060, |l| l.addr.port());
    format!("{}:{port}", host_name())
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `[cluster] http_advertise`, or the node's own HTTP base URL.
pub(crate) fn http_advertise(config: &Config, http_base: &str) -> String {
    if config.cluster.http_advertise.is_empty() {
        http_base.to_string()
    } else {
        config.cluster.http_advertise.clone()
    }
}

/// This node's part in the cluster; cheap to share.
#[derive(Debug)]
pub(crate) struct Cluster {
    node: NodeInfo,
    registrations: Registrations,
}

impl Cluster {
    /// Writes the first lease (so other nodes see this one from its start), then spawns the
    /// lease/takeover task.
    pub(crate) async fn start(
        db: Db,
        stores: Stores,
        media: SharedMedia,
        node: NodeInfo,
    ) -> Result<Arc<Cluster>, sqlx::Error> {
        let nodes = Nodes::new(db.clone());
        nodes.renew(&node, SystemTime::now()).await?;
        tracing::info!(node = %node.node_id, http = %node.http_advertise,
            lease_secs = node.lease.as_secs(), "cluster: lease taken");
        let registrations = Registrations::new(db);
        tokio::spawn(lease_task(nodes, stores, media, node.clone()));
        Ok(Arc::new(Cluster {
            node,
            registrations,
        }))
    }

    /// Writes what a REGISTER changed to the shared table. A database error is logged: the
    /// binding then lives on this node only (the phone's next refresh writes it again).
    pub(crate) async fn bindings_changed(
        &self,
        aor: &str,
        changed: &[BindingRecord],
        removed: &[String],
        all_removed: bool,
    ) {
        let now = SystemTime::now();
        let changed: Vec<RegistrationRow> = changed
            .iter()
            .map(|b| RegistrationRow {
                aor: aor.to_string(),
                contact_uri: b.contact_uri.clone(),
                contact: b.contact.clone(),
                path: b.path.clone(),
                transport: b.transport.as_str().to_string(),
                source: b.source.to_string(),
                q: b.q,
                call_id: b.call_id.clone(),
                cseq: b.cseq,
                user_agent: b.user_agent.clone(),
                node: self.node.node_id.clone(),
                expires_at: now + b.expires_in,
            })
            .collect();
        let regs = &self.registrations;
        let done = async {
            if all_removed {
                regs.remove_aor(aor).await?;
            }
            regs.remove(aor, removed).await?;
            regs.upsert(&changed, SystemTime::now()).await
        }
        .await;
        if let Err(e) = done {
            tracing::warn!(aor = %aor, error = %e, "cluster: registration not written");
        }
    }

    /// Other nodes' live bindings of `aor`, as records for the engine. A database error
    /// gives none (logged): the request then sees only this node's bindings.
    pub(crate) async fn remote_bindings(&self, aor: &str) -> Vec<BindingRecord> {
        let now = SystemTime::now();
        let rows = match self
            .registrations
            .lookup(aor, Some(&self.node.node_id), now)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(aor, error = %e, "cluster: registrations not read");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter_map(|r| {
                Some(BindingRecord {
                    transport: r.transport.parse::<Transport>().ok()?,
                    source: r.source.parse::<SocketAddr>().ok()?,
                    expires_in: r.expires_at.duration_since(now).unwrap_or_default(),
                    contact: r.contact,
                    contact_uri: r.contact_uri,
                    path: r.path,
                    q: r.q,
                    call_id: r.call_id,
                    cseq: r.cseq,
                    user_agent: r.user_agent,
                })
            })
            .collect()
    }
}

impl Cluster {
    /// Every live binding other nodes hold, for the admin listing (cluster-wide).
    pub(crate) async fn other_nodes_registrations(&self) -> Vec<RegistrationSnapshot> {
        let rows = match self.registrations.list(SystemTime::now()).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: registrations not listed");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter(|r| r.node != self.node.node_id)
            .filter_map(|r| {
                Some(RegistrationSnapshot {
                    source: r.source.parse().ok()?,
                    transport: r.transport.parse().ok()?,
                    aor: r.aor,
                    contact: r.contact,
                    expires_at: r.expires_at,
                    user_agent: r.user_agent,
                })
            })
            .collect()
    }
}

/// Renews this node's lease and takes dead nodes over, until the process ends.
async fn lease_task(nodes: Nodes, stores: Stores, media: SharedMedia, me: NodeInfo) {
    let renew_every = (me.lease / 3).max(Duration::from_millis(500));
    let mut watch = LeaseWatch::new(me.node_id.clone());
    let mut last_renewal = Instant::now();
    let mut tick = tokio::time::interval(WATCH_EVERY.min(renew_every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purge = Instant::now();
    loop {
        tick.tick().await;
        if last_renewal.elapsed() >= renew_every {
            match nodes.renew(&me, SystemTime::now()).await {
                Ok(()) => last_renewal = Instant::now(),
                Err(e) => tracing::warn!(error = %e, "cluster: lease not renewed"),
            }
        }
        let rows = match nodes.leases().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: leases not read");
                continue;
            }
        };
        let verdict = watch.observe(&rows, Instant::now());
        METRICS
            .cluster_nodes_alive
            .set(i64::try_from(verdict.alive).unwrap_or(i64::MAX));
        for dead in verdict.dead {
            match nodes.claim(&dead, &me.node_id, SystemTime::now()).await {
                Ok(true) => take_over(&nodes, &stores, &media, &dead.node_id).await,
                Ok(false) => {}
                Err(e) => tracing::warn!(node = %dead.node_id, error = %e,
                    "cluster: takeover claim failed"),
            }
        }
        if purge.elapsed() >= Duration::from_secs(60) {
            purge = Instant::now();
            let regs = Registrations::new(stores.db().clone());
            if let Err(e) = regs.purge_expired(SystemTime::now()).await {
                tracing::warn!(error = %e, "cluster: expired registrations not purged");
            }
        }
    }
}

/// Where a survivor reads what a dead node's receiving store kept.
#[derive(Debug, Clone)]
pub(crate) enum SharedMedia {
    /// `objects = "file"`: the nodes' `data_dir` is one shared disk.
    Disk(PathBuf),
    /// The bucket: the store's chunk objects (the dead node's disk is out of reach).
    Bucket(Objects),
}

/// One dead node's `receiving` store finished `truncated` with what reached shared storage,
/// its quota settled ([`Stores::finish`]); with a bucket its end object then tells live
/// readers on other nodes to stop.
async fn finish_dead_store(
    stores: &Stores,
    media: &SharedMedia,
    id: &str,
) -> Result<Store, String> {
    let now = SystemTime::now();
    match media {
        SharedMedia::Disk(dir) => stores
            .take_over(dir, id, now)
            .await
            .map_err(|e| e.to_string()),
        SharedMedia::Bucket(objects) => {
            let kept = chunks::committed_payload(&**objects, id)
                .await
                .map_err(|e| e.to_string())?;
            let st = stores
                .finish(id, StoreState::Truncated, kept.payload_bytes, now)
                .await
                .map_err(|e| e.to_string())?;
            chunks::mark_finished(&**objects, id, kept.log_bytes)
                .await
                .map_err(|e| e.to_string())?;
            Ok(st)
        }
    }
}

/// Finishes the dead node's receiving stores and drops the registrations only it reached.
async fn take_over(nodes: &Nodes, stores: &Stores, media: &SharedMedia, dead: &str) {
    tracing::warn!(node = %dead, "cluster: node's lease expired; taking over its stores");
    let ids = match stores.receiving_on(dead).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(node = %dead, error = %e, "cluster: dead node's stores not listed");
            Vec::new()
        }
    };
    for id in ids {
        match finish_dead_store(stores, media, &id).await {
            Ok(st) => tracing::info!(store = %id, node = %dead, bytes = st.received_bytes,
                "cluster: dead node's store finished truncated, quota settled"),
            Err(e) => tracing::warn!(store = %id, node = %dead, error = %e,
                "cluster: dead node's store not taken over"),
        }
    }
    match nodes.release_share_uploads(dead).await {
        Ok(n) if n > 0 => tracing::info!(node = %dead, uploads = n,
            "cluster: dead node's share uploads released"),
        Ok(_) => {}
        Err(e) => tracing::warn!(node = %dead, error = %e, "cluster: share uploads not released"),
    }
    match nodes.drop_unreachable_registrations(dead).await {
        Ok(n) => tracing::info!(node = %dead, removed = n,
            "cluster: registrations only the dead node could reach removed"),
        Err(e) => tracing::warn!(node = %dead, error = %e, "cluster: registrations not removed"),
    }
}
