//! `callvault serve`: binds everything, then runs the core task that feeds the sans-IO
//! engine with transport events, relay events and timers, and sends what it returns.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::mpsc;

use crate::b2bua::engine::{
    resolve_route, AccountAuth, Engine, EngineConfig, EngineEvent, GuardConfig,
};
use crate::b2bua::errors::set_warn_agent;
use crate::b2bua::media::{MediaEvent, RelayMedia};
use crate::b2bua::recording::{self, RecordingService};
use crate::b2bua::share_service::{self, ShareService, ShareServiceConfig};
use crate::b2bua::store_service::{Command, ServiceConfig, StoreService};
use crate::config::{Config, Transport};
use crate::guard::{ConnGate, ExpiringMap, FdBudget};
use crate::http::admin::{remove_store, AdminCommand};
use crate::media::ports::PortAllocator;
use crate::media::relay::{RelayCounters, RelayEvent};
use crate::media::threads::MediaThreads;
use crate::metrics::{Listener, METRICS};
use crate::sip::auth::{Algorithm, Credentials, NonceKey, Verifier, DEFAULT_NONCE_TTL_SECS};
use crate::sip::message::{HeaderAccess, Request, SipMessage};
use crate::sip::transaction::TimerConfig;
use crate::storage::accounts::Accounts;
use crate::storage::db::Db;
use crate::storage::live::LiveStores;
use crate::storage::stores::Stores;
use crate::transport::tls::{self, SipTls};
use crate::transport::{TcpLimits, TransportEvent, Transports};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("cannot bind HTTP {addr}: {source}")]
    HttpBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metadata database: {0}")]
    Db(String),
    #[error("RTP ports: {0}")]
    Ports(String),
    #[error("route {0}: cannot resolve target")]
    Route(String),
    #[error("{0}")]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("terminal index: {0}")]
    Dht(#[from] crate::share::dht::DhtError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("object store: {0}")]
    Objects(#[from] crate::storage::objects::ObjectError),
    #[error("cannot start {what}: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
}

/// How long an account's digest data is trusted before it is read again from the database
/// (so `callvault account set --password` takes effect on a running server).
const ACCOUNT_CACHE_TTL: Duration = Duration::from_secs(5);
/// User names remembered as looked up at most (see `Core::account_seen`).
const ACCOUNT_CACHE_CAPACITY: usize = 4096;

/// Queued SIP events the core handles in one go before flushing transmits.
const CORE_BATCH: usize = 63;

/// How long a clean shutdown waits for stores to finish and settle (PROTOCOL.md 4).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (capped at 2^20, Linux's usual
/// `fs.nr_open`); returns the soft limit in force afterwards.
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < want {
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return want;
        }
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "could not raise the open-file limit"
        );
    }
    lim.rlim_cur
}

/// Descriptors inbound connections may hold: of `nofile`, `reserve` stays for files and the
/// database, then one per RTP port (at most half of the rest: a port range larger than the
/// limit could never be used in full anyway), and connections get what remains. So a flood of
/// connections is refused before RTP ports could fail for want of descriptors.
pub(crate) fn connection_fd_budget(nofile: u64, rtp_ports: usize, reserve: usize) -> usize {
    let after_reserve = usize::try_from(nofile)
        .unwrap_or(usize::MAX)
        .saturating_sub(reserve);
    after_reserve - rtp_ports.min(after_reserve / 2)
}

/// With a remote object store: the recovered stores whose log is on this disk get the rest
/// of their log uploaded and their end object, so every node reads them whole.
async fn upload_recovered(
    objects: &dyn crate::storage::objects::ObjectBackend,
    data_dir: &std::path::Path,
    recovered: &[crate::storage::stores::RecoveredStore],
) {
    for r in recovered {
        let Ok(rec) = &r.outcome else { continue };
        if rec.segments == 0 {
            continue; // not written here
        }
        let Ok(dir) = crate::storage::stores::store_dir(data_dir, &r.id) else {
            continue;
        };
        let done =
            crate::storage::objects::chunks::upload_rest(objects, &r.id, &dir, rec.bytes).await;
        if let Err(e) = done {
            tracing::warn!(store = %r.id, error = %e, "recovered store not uploaded");
        }
    }
}

/// `[media] kernel_forwarding`: the attached kernel fast path, or None (off, or it could not
/// be attached: logged, and the user-space relay carries everything).
fn start_kernel_path(config: &Config) -> Option<Arc<crate::media::kernel::KernelPath>> {
    if !config.media.kernel_forwarding {
        return None;
    }
    match crate::media::kernel::KernelPath::start(config.sip.public_address) {
        Ok(k) => {
            tracing::info!(interfaces = ?k.interfaces(), "kernel fast path attached");
            Some(k)
        }
        Err(e) => {
            tracing::warn!(error = %e, "kernel fast path unavailable, relaying in user space");
            None
        }
    }
}

/// Detaches the kernel fast path when dropped.
struct KernelGuard(Option<Arc<crate::media::kernel::KernelPath>>);

impl Drop for KernelGuard {
    fn drop(&mut self) {
        if let Some(k) = &self.0 {
            k.shutdown();
        }
    }
}

pub async fn run(config: Config) -> Result<(), ServerError> {
    run_from(config, None).await
}

/// [`run`], with the config file SIGHUP reads again (None: the default path).
pub async fn run_from(
    config: Config,
    config_path: Option<std::path::PathBuf>,
) -> Result<(), ServerError> {
    let config = Arc::new(config);
    let nofile = raise_nofile_limit();
    let [lo, hi] = config.media.rtp_ports;
    let fd_budget = connection_fd_budget(
        nofile,
        usize::from(hi.saturating_sub(lo)) + 1,
        config.limits.fd_reserve,
    );
    tracing::info!(nofile, connections = fd_budget, "descriptor budget");
    let fds = FdBudget::new(fd_budget);
    let lim = &config.limits;
    crate::secret::create_private_dir_all(&config.storage.data_dir)
        .map_err(|e| ServerError::Db(e.to_string()))?;
    let db = Db::open(&config.storage.metadata)
        .await
        .map_err(|e| ServerError::Db(e.to_string()))?;
    let accounts = Accounts::new(db.clone(), config.sip.domain.clone());
    // Every store issued or received here carries this node's id (PROTOCOL 6).
    let node_id = crate::cluster::node_id(&config);
    let stores = Stores::new(db.clone()).with_node(node_id.clone());
    let shared_db = db.backend().is_shared();
    // Digest nonces must verify on every node behind the front proxy: one key in the shared
    // database; a single node keeps a per-process key (a restart makes old nonces stale).
    let nonce_key = if shared_db {
        NonceKey::from_bytes(
            crate::storage::nodes::shared_secret(&db, "sip-nonce")
                .await
                .map_err(|e| ServerError::Db(e.to_string()))?,
        )
    } else {
        NonceKey::random()
    };
    // Store media and share pieces: the local disk, or a bucket (created if missing).
    let objects = crate::storage::objects::open(&config.storage).await?;
    tracing::info!(objects = %objects.describe(), "object store");
    // Stores interrupted by a crash or restart: cut to their last good record, `truncated`.
    match stores
        .recover_on_startup(&config.storage.data_dir, SystemTime::now())
        .await
    {
        Ok(recovered) => {
            for r in &recovered {
                tracing::info!(store = ?r, "recovered interrupted store as truncated");
            }
            if !objects.is_local() {
                upload_recovered(&*objects, &config.storage.data_dir, &recovered).await;
            }
        }
        Err(e) => return Err(ServerError::Db(e.to_string())),
    }

    // TLS only when something uses it: a `tls:` listener, a TLS route or HTTPS.
    let uses_tls = config.http.tls
        || config
            .sip
            .listen
            .iter()
            .any(|l| l.transport == Transport::Tls)
        || config.route.iter().any(|r| r.transport == Transport::Tls);
    let sip_tls = if uses_tls {
        Some(Arc::new(SipTls::from_config(&config.tls)?))
    } else {
        None
    };
    let (sip_tx, sip_rx) = mpsc::channel(8192);
    let transports = Transports::bind_with_tls(
        &config.sip.listen,
        sip_tx,
        TcpLimits {
            idle: Duration::from_secs(config.sip.tcp_idle_secs),
            message_timeout: Duration::from_secs(lim.sip_tcp_message_timeout_secs),
            max_message_bytes: lim.sip_tcp_max_message_bytes,
            gate: ConnGate::new(
                Listener::SipTcp,
                lim.sip_tcp_max_connections,
                lim.sip_tcp_max_connections_per_source,
                fds.clone(),
            ),
        },
        sip_tls.clone(),
    )
    .await?;

    let http = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| ServerError::HttpBind {
            addr: config.http.listen,
            source,
        })?;
    let http_addr = http.local_addr().map_err(|source| ServerError::HttpBind {
        addr: config.http.listen,
        source,
    })?;

    let ports = PortAllocator::new(lo, hi).map_err(|e| ServerError::Ports(e.to_string()))?;
    let counters = Arc::new(RelayCounters::default());
    let kernel = start_kernel_path(&config);
    // Detaches the program on every way out of this function (the links would also go with
    // the process: they are never pinned).
    let _kernel_guard = KernelGuard(kernel.clone());
    let (media, relay_rx) = RelayMedia::new(
        config.sip.public_address,
        ports.clone(),
        Duration::from_secs(config.media.rtp_timeout_secs),
        counters.clone(),
    );
    let media_threads = MediaThreads::start(config.media.threads, config.media.thread_nice)
        .map_err(|source| ServerError::Thread {
            what: "the media threads",
            source,
        })?;
    let media = media
        .with_threads(Arc::new(media_threads))
        .with_kernel(kernel.clone());

    let routes = resolve_routes(&config, sip_tls.as_deref())?;
    set_warn_agent(&config.sip.public_address.to_string());
    let engine_cfg = EngineConfig {
        domain: config.sip.domain.clone(),
        public_ip: config.sip.public_address,
        udp_port: transports.local_addr(Transport::Udp).map(|a| a.port()),
        tcp_port: transports.local_addr(Transport::Tcp).map(|a| a.port()),
        tls_port: transports.local_addr(Transport::Tls).map(|a| a.port()),
        digest_algorithms: config.sip.digest_algorithms.clone(),
        trusted: config.trusted_peer.iter().map(|t| t.cidr).collect(),
        routes,
        timers: TimerConfig::default(),
        registration_min_expires: config.sip.registration_min_expires,
        registration_max_expires: config.sip.registration_max_expires,
        feature_code: config.store.feature_code.clone(),
        guard: GuardConfig::from(&config.sip),
        srtp: config.media.srtp,
    };
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut engine = Engine::new(
        engine_cfg,
        media,
        Verifier::new(nonce_key, DEFAULT_NONCE_TTL_SECS),
        (Instant::now(), unix),
        rand::random(),
    );

    // Handlers first: a SIGTERM right after `ready` must shut down cleanly, not kill us.
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;

    let listen: Vec<String> = transports
        .bound()
        .iter()
        .map(|(t, a)| format!("{t}:{a}"))
        .collect();
    let media_path = if kernel.is_some() { "kernel" } else { "user" };
    tracing::info!(
        "ready sip={} http={} media={media_path}",
        listen.join(","),
        http_addr
    );

    let sip_port = transports
        .local_addr(Transport::Udp)
        .or_else(|| transports.local_addr(Transport::Tcp))
        .map(|a| a.port())
        .unwrap_or(5060);
    let http_host = if http_addr.ip().is_unspecified() {
        config.sip.public_address
    } else {
        http_addr.ip()
    };
    // Every URL callvault writes (upload, download, manifest, index, server) starts here.
    let scheme = if config.http.tls { "https" } else { "http" };
    let http_base = match http_host {
        std::net::IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{}", http_addr.port()),
        v4 => format!("{scheme}://{v4}:{}", http_addr.port()),
    };
    let cluster = if shared_db {
        let node = crate::storage::nodes::NodeInfo {
            node_id: node_id.clone(),
            http_advertise: crate::cluster::http_advertise(&config, &http_base),
            lease: Duration::from_secs(config.cluster.lease_secs),
            started_at: SystemTime::now(),
        };
        let c = crate::cluster::Cluster::start(
            db.clone(),
            stores.clone(),
            if objects.is_local() {
                crate::cluster::SharedMedia::Disk(config.storage.data_dir.clone())
            } else {
                crate::cluster::SharedMedia::Bucket(Arc::clone(&objects))
            },
            node,
        )
        .await
        .map_err(|e| ServerError::Db(e.to_string()))?;
        engine.share_registrations(true);
        Some(c)
    } else {
        METRICS.cluster_nodes_alive.set(1);
        None
    };
    let live = Arc::new(LiveStores::with_objects(Arc::clone(&objects)));
    let (service, commands) = StoreService::new(
        ServiceConfig {
            public_ip: config.sip.public_address,
            sip_port,
            tls_port: transports.local_addr(Transport::Tls).map(|a| a.port()),
            http_base: http_base.clone(),
            store: config.store.clone(),
            data_dir: config.storage.data_dir.clone(),
            rtp_timeout: Duration::from_secs(config.media.rtp_timeout_secs),
        },
        accounts.clone(),
        stores.clone(),
        ports,
        live.clone(),
    );
    tokio::spawn(expire_pending_stores(stores.clone()));
    // Whole-call recording exists only when asked for: otherwise no service, no channel.
    let (recorder, record_commands) = if config.media.record_calls {
        let (svc, rx) = RecordingService::new(
            config.storage.data_dir.clone(),
            accounts.clone(),
            stores.clone(),
            live.clone(),
            kernel.as_deref(),
        )
        .map_err(|source| ServerError::Thread {
            what: "the recording writer thread",
            source,
        })?;
        (Some(svc), Some(rx))
    } else {
        (None, None)
    };

    let mut http_state = crate::http::HttpState::new(
        accounts.clone(),
        stores.clone(),
        config.storage.data_dir.clone(),
        config.http.admin_token.clone(),
    );
    http_state.digest_algorithms = config.sip.digest_algorithms.clone();
    http_state.realm = config.sip.domain.clone();
    http_state.live = live.clone();
    // Uploads resolve thresholds under the same server limits as RTP stores.
    http_state.upload.default_percent = config.store.threshold_percent;
    http_state.upload.limits = config.store.threshold_limits();
    // Uploads report their threshold to the store service, which sends the ready note.
    let (http_tx, http_events) = mpsc::unbounded_channel();
    http_state.events = Some(http_tx);
    let stop_uploads = http_state.stop.clone();
    let (admin, admin_rx) = crate::http::admin::AdminHandle::new(config.media.record_calls);
    http_state.admin = Some(admin);
    if config.store.retention_days > 0 {
        tokio::spawn(retention(
            stores.clone(),
            accounts.clone(),
            config.storage.data_dir.clone(),
            live.objects().cloned(),
            config.store.retention_days,
        ));
    }
    let mut share_settings = crate::share::ShareSettings::from_config(&config.share);
    share_settings.server_address = Some(config.server_http_address(http_addr).to_string());
    // `index.url` set: offers name the `callvault index` role and our /v1/index redirects there.
    share_settings.index_base = config.index.base().map(str::to_string);
    share_settings.node = Some(node_id.clone());
    // `[share] index = "terminals"`: serve runs the DHT node the agents bootstrap from
    // (claim 8); it lives as long as `run`.
    let _dht_node = if config.share.index == crate::config::IndexPlacement::Terminals {
        let bind = std::net::SocketAddr::new(http_addr.ip(), config.share.dht_port);
        let node = crate::share::dht::start_node(bind, &[])
            .await
            .map_err(ServerError::Dht)?;
        let offered = std::net::SocketAddr::new(http_host, node.addr.port());
        tracing::info!(dht = %offered, "piece index on the terminals: DHT bootstrap node up");
        share_settings.terminal_index = Some(vec![offered.to_string()]);
        Some(node)
    } else {
        None
    };
    let mut shares = crate::share::Shares::open(
        db.clone(),
        config.storage.data_dir.clone(),
        config.sip.domain.clone(),
        share_settings,
    )
    .await
    .map_err(|e| ServerError::Db(e.to_string()))?;
    shares.set_objects(Arc::clone(&objects));
    // Share uploads a crash interrupted: reservations back, staging folders gone.
    shares
        .recover_uploads()
        .await
        .map_err(|e| ServerError::Db(e.to_string()))?;
    http_state.shares = Some(shares.clone());
    // Share requests over SIP (PROTOCOL §3 steps 2–3); offers point at our HTTP API.
    let (share_service, share_commands) = ShareService::new(
        ShareServiceConfig {
            domain: config.sip.domain.clone(),
            http_base,
            relay_deadline: share_service::RELAY_DEADLINE,
        },
        shares,
        accounts.clone(),
    );
    let app = crate::http::api_router(http_state);
    let https = if config.http.tls {
        Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            &config.tls,
        )?))
    } else {
        None
    };
    let http_gate = ConnGate::new(
        Listener::Http,
        lim.http_max_connections,
        lim.http_max_connections_per_source,
        fds,
    );
    tokio::spawn(crate::http::serve::serve(
        http,
        app,
        http_gate,
        Duration::from_secs(lim.http_header_timeout_secs),
        https,
    ));

    let core = Core {
        engine,
        service,
        share_service,
        recorder,
        transports,
        accounts,
        account_seen: ExpiringMap::new(ACCOUNT_CACHE_CAPACITY),
        counters,
        live,
        stop_uploads,
        tracer: crate::logging::SipTracer::new(&config.log),
        config_path,
        cluster,
        held_events: std::collections::VecDeque::new(),
    };
    let result = core
        .run(Inbox {
            sip_rx,
            relay_rx,
            commands,
            share_commands,
            record_commands,
            http_events,
            admin_rx,
            term,
            int,
            hup,
        })
        .await;
    db.close().await;
    result
}

/// What the core task listens to besides its own timers.
struct Inbox {
    sip_rx: mpsc::Receiver<TransportEvent>,
    relay_rx: mpsc::Receiver<RelayEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    share_commands: mpsc::UnboundedReceiver<share_service::Command>,
    /// None when `media.record_calls` is off.
    record_commands: Option<mpsc::UnboundedReceiver<recording::Command>>,
    /// Uploads' events (their ready notes).
    http_events: mpsc::UnboundedReceiver<crate::http::HttpEvent>,
    /// The HTTP admin API's questions (PROTOCOL 8).
    admin_rx: mpsc::Receiver<AdminCommand>,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP: reload what can change live.
    hup: tokio::signal::unix::Signal,
}

struct Core {
    engine: Engine<RelayMedia>,
    service: StoreService,
    share_service: ShareService,
    /// Whole-call recording, when `media.record_calls` is on.
    recorder: Option<RecordingService>,
    transports: Transports,
    accounts: Accounts,
    /// User names whose digest data the engine got recently (bounded, expiring: the names
    /// come from requests, issue 10 finding 7).
    account_seen: ExpiringMap<String, ()>,
    counters: Arc<RelayCounters>,
    /// Stores being written (RTP, uploads, recordings): a shutdown waits for them.
    live: Arc<LiveStores>,
    /// Tells uploads in flight to stop.
    stop_uploads: Arc<tokio::sync::watch::Sender<bool>>,
    /// `[log] sip_trace` and `[log] hep`.
    tracer: crate::logging::SipTracer,
    /// Read again on SIGHUP.
    config_path: Option<std::path::PathBuf>,
    /// Shared PostgreSQL: leases, takeover, registrations in the table (PROTOCOL 6).
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Engine events taken early by [`Core::persist_bindings`], handled by the next flush.
    held_events: std::collections::VecDeque<EngineEvent>,
}

impl Core {
    async fn run(mut self, inbox: Inbox) -> Result<(), ServerError> {
        let Inbox {
            mut sip_rx,
            mut relay_rx,
            mut commands,
            mut share_commands,
            record_commands,
            mut http_events,
            mut admin_rx,
            mut term,
            mut int,
            mut hup,
        } = inbox;
        let recording_on = record_commands.is_some();
        // Without recording, a receiver nobody sends to keeps the select arm idle.
        let mut record_commands = record_commands.unwrap_or_else(|| mpsc::unbounded_channel().1);
        loop {
            let deadline = self
                .engine
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                ev = sip_rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.on_transport_event(ev).await;
                    // Under load, take what is already queued before the next flush and timer
                    // computation: fewer wake-ups and task hand-offs per message.
                    for _ in 0..CORE_BATCH {
                        match sip_rx.try_recv() {
                            Ok(ev) => self.on_transport_event(ev).await,
                            Err(_) => break,
                        }
                    }
                }
                Some(cmd) = commands.recv() => {
                    if let Some(user) = StoreService::notified_user(&cmd) {
                        let aor = format!("{user}@{}", self.accounts.realm());
                        self.load_remote_aor(&aor).await;
                    }
                    self.service.apply(&mut self.engine, cmd, Instant::now());
                }
                Some(ev) = http_events.recv() => self.service.on_http_event(ev),
                Some(cmd) = share_commands.recv() => {
                    self.share_service.apply(&mut self.engine, cmd, Instant::now());
                }
                Some(cmd) = record_commands.recv(), if recording_on => {
                    if let Some(r) = self.recorder.as_mut() {
                        r.apply(self.engine.media_mut(), cmd);
                    }
                }
                Some(cmd) = admin_rx.recv() => self.on_admin(cmd),
                Some(ev) = relay_rx.recv() => match self.engine.media_mut().on_relay_event(ev) {
                    Some(MediaEvent::Timeout(call)) => {
                        self.engine.handle_media_timeout(call, Instant::now());
                    }
                    Some(MediaEvent::FeatureCode { call, side, pin }) => {
                        self.engine.handle_media_feature_code(call, side, pin);
                    }
                    None => {}
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.engine.handle_timeout(Instant::now());
                }
                _ = hup.recv() => self.reload(),
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            self.flush();
        }
        tracing::info!("shutting down");
        self.service.shutdown();
        let _ = self.stop_uploads.send(true);
        if let Some(r) = &self.recorder {
            r.shutdown();
        }
        self.engine.shutdown(Instant::now());
        self.flush();
        self.finish_stores(&mut commands, &mut record_commands)
            .await;
        // Let the BYEs leave (TCP writer tasks) before the runtime goes away.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    /// PROTOCOL.md 4: a clean shutdown finishes every store `truncated` with its committed
    /// data and settles its quota before the process exits, bounded by [`SHUTDOWN_GRACE`].
    /// The store tasks still talk to the engine meanwhile (their BYEs, their goodbyes).
    async fn finish_stores(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        record_commands: &mut mpsc::UnboundedReceiver<recording::Command>,
    ) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while self.service.sessions_left() > 0 || !self.live.is_empty() {
            tokio::select! {
                Some(cmd) = commands.recv() => {
                    self.service.apply(&mut self.engine, cmd, Instant::now());
                }
                // A recording starting now has no call left to attach to.
                Some(_) = record_commands.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        sessions = self.service.sessions_left(),
                        stores = self.live.len(),
                        "stores still open at the end of the shutdown grace"
                    );
                    break;
                }
            }
            self.flush();
        }
    }

    async fn on_transport_event(&mut self, ev: TransportEvent) {
        match ev {
            TransportEvent::Message { msg, peer, .. } => {
                self.trace(true, peer, &msg.to_bytes());
                self.load_accounts(&msg).await;
                self.load_remote_bindings(&msg).await;
                // Every line logged while handling names both legs' Call-IDs (PROTOCOL 8).
                let call_id = match &msg {
                    SipMessage::Request(r) => r.call_id(),
                    SipMessage::Response(r) => r.call_id(),
                };
                let (a, b) = call_id
                    .map(|id| self.engine.leg_call_ids(id))
                    .unwrap_or_default();
                let span = tracing::info_span!("sip", call_a = a.as_deref(), call_b = b.as_deref());
                let _in = span.enter();
                self.engine.handle_message(msg, peer, Instant::now());
                drop(_in);
                self.persist_bindings().await;
            }
            TransportEvent::Unreachable(peer) => {
                self.engine.handle_unreachable(peer, Instant::now());
            }
        }
    }

    /// SIGHUP: reads the config file again and applies routes, trusted peers and the log
    /// level. Anything else changed in the file needs a restart; a file that does not load
    /// changes nothing.
    fn reload(&mut self) {
        let loaded = Config::load(self.config_path.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|c| {
                resolve_routes(&c, self.transports.tls())
                    .map(|r| (c, r))
                    .map_err(|e| e.to_string())
            });
        let (config, routes) = match loaded {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP: config not reloaded");
                return;
            }
        };
        let trusted = config.trusted_peer.iter().map(|t| t.cidr).collect();
        let n = routes.len();
        self.engine.reconfigure(routes, trusted);
        // Logged before the new level applies, so a quieter level still shows the reload.
        tracing::info!(
            routes = n,
            trusted_peers = config.trusted_peer.len(),
            level = %config.log.level,
            "SIGHUP: config reloaded"
        );
        if let Err(e) = crate::logging::reload_level(&config.log.level) {
            tracing::warn!(error = %e, "SIGHUP: log level not changed");
        }
    }

    /// Traces one SIP message (log and HEP) when `[log]` asks for it.
    fn trace(&self, received: bool, peer: crate::sip::transaction::Peer, data: &[u8]) {
        if !self.tracer.is_on() {
            return;
        }
        let local = self
            .transports
            .local_addr(peer.transport)
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (src, dst) = if received {
            (peer.addr, local)
        } else {
            (local, peer.addr)
        };
        self.tracer.trace(received, src, dst, peer.transport, data);
    }

    fn send(&self, t: crate::sip::transaction::Transmit) {
        self.trace(false, t.peer, &t.data);
        self.transports.send(t);
    }

    /// Cluster: a REGISTER's bindings reach the shared table before its 200 leaves
    /// ([`crate::cluster`]); the events taken here wait in `held_events` for [`Self::flush`].
    async fn persist_bindings(&mut self) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        while let Some(ev) = self.engine.poll_event() {
            if let EngineEvent::BindingsChanged {
                aor,
                changed,
                removed,
                all_removed,
            } = &ev
            {
                c.bindings_changed(aor, changed, removed, *all_removed)
                    .await;
            }
            self.held_events.push_back(ev);
        }
    }

    fn flush(&mut self) {
        while let Some(t) = self.engine.poll_transmit() {
            self.send(t);
        }
        while let Some(ev) = self
            .held_events
            .pop_front()
            .or_else(|| self.engine.poll_event())
        {
            if let Some(r) = self.recorder.as_mut() {
                r.on_event(&self.engine, &ev);
            }
            self.service.on_event(&self.engine, &ev);
            self.share_service
                .on_event(&mut self.engine, &ev, Instant::now());
        }
        while let Some(t) = self.engine.poll_transmit() {
            self.send(t);
        }
        let stats = self.engine.tx_stats();
        METRICS
            .registrations_active
            .set(self.engine.registrations() as i64);
        METRICS
            .sip_transactions_total
            .set(stats.client_created + stats.server_created);
        METRICS.sip_retransmissions_total.set(stats.retransmissions);
        METRICS
            .rtp_packets_relayed_total
            .set(self.counters.rtp_packets_total());
        METRICS.rtp_packets_kernel_total.set(
            self.counters
                .kernel_rtp_packets
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }

    /// Answers the admin API from the engine (the oneshot's receiver may have gone: a client
    /// that hung up does not care).
    fn on_admin(&mut self, cmd: AdminCommand) {
        let now = Instant::now();
        match cmd {
            AdminCommand::Calls(tx) => {
                let _ = tx.send(self.engine.calls_snapshot());
            }
            AdminCommand::EndCall(id, tx) => {
                let _ = tx.send(self.engine.end_call_by_operator(id, now));
            }
            AdminCommand::Registrations(tx) => {
                let mut list = self.engine.registrations_snapshot(now);
                match &self.cluster {
                    // Cluster-wide (PROTOCOL 6): other nodes' rows come from the table.
                    Some(c) => {
                        let c = c.clone();
                        tokio::spawn(async move {
                            list.extend(c.other_nodes_registrations().await);
                            list.sort_by(|a, b| a.aor.cmp(&b.aor).then(a.contact.cmp(&b.contact)));
                            let _ = tx.send(list);
                        });
                    }
                    None => {
                        let _ = tx.send(list);
                    }
                }
            }
            AdminCommand::EndStore(id, tx) => {
                let _ = tx.send(self.engine.end_store_sessions(&id, now));
            }
        }
    }

    /// Cluster: before a request that looks an AOR up, hands the engine that AOR's bindings
    /// other nodes hold (the engine stays sans-IO; this is its async step at the edge).
    async fn load_remote_bindings(&mut self, msg: &SipMessage) {
        let (Some(cluster), SipMessage::Request(req)) = (&self.cluster, msg) else {
            return;
        };
        let Some(aor) = self.engine.lookup_aor(req) else {
            return;
        };
        let records = cluster.remote_bindings(&aor).await;
        self.engine
            .set_remote_bindings(&aor, &records, Instant::now());
    }

    /// Cluster: refreshes the engine's view of `aor`'s bindings on other nodes.
    async fn load_remote_aor(&mut self, aor: &str) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let records = cluster.remote_bindings(aor).await;
        self.engine
            .set_remote_bindings(aor, &records, Instant::now());
    }

    /// Makes sure the engine has fresh digest data for the user a request authenticates as.
    async fn load_accounts(&mut self, msg: &SipMessage) {
        let SipMessage::Request(req) = msg else {
            return;
        };
        for user in credential_users(req) {
            // No account can have this name: nothing to look up or remember.
            if crate::storage::accounts::validate_user(&user).is_err() {
                continue;
            }
            if self.account_seen.get(&user, Instant::now()).is_some() {
                continue;
            }
            let auth = match self.accounts.get(&user).await {
                Ok(Some(a)) => {
                    let realm = self.accounts.realm().to_string();
                    match (
                        a.ha1_for(&realm, Algorithm::Md5),
                        a.ha1_for(&realm, Algorithm::Sha256),
                    ) {
                        (Some(m), Some(s)) => Some(AccountAuth {
                            ha1_md5: m.to_string(),
                            ha1_sha256: s.to_string(),
                        }),
                        _ => None,
                    }
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "account lookup failed");
                    continue;
                }
            };
            self.engine.set_account(&user, auth);
            let now = Instant::now();
            // Full of fresh names (a spray): this one is simply looked up again next time.
            self.account_seen
                .insert(user, (), now + ACCOUNT_CACHE_TTL, now);
        }
    }
}

/// The `[[route]]` targets, resolved to addresses; a TLS route's host name is what its
/// server's certificate is verified against (SNI).
fn resolve_routes(
    config: &Config,
    tls: Option<&SipTls>,
) -> Result<Vec<crate::b2bua::engine::RouteTarget>, ServerError> {
    let mut routes = Vec::new();
    for r in &config.route {
        let t = resolve_route(&r.prefix, &r.target.host, r.target.port, r.transport)
            .ok_or_else(|| ServerError::Route(format!("{}:{}", r.target.host, r.target.port)))?;
        if let (Transport::Tls, Some(tls)) = (r.transport, tls) {
            tls.set_name(t.peer.addr, &r.target.host);
        }
        routes.push(t);
    }
    Ok(routes)
}

/// Marks store ids that were never used `expired`, once a minute.
async fn expire_pending_stores(stores: Stores) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if let Err(e) = stores.expire_pending(SystemTime::now()).await {
            tracing::warn!(error = %e, "expiring pending stores failed");
        }
    }
}

/// `store.retention_days`: once an hour (and at start), deletes finished stores older than
/// that, like `DELETE /v1/stores/{id}` does.
async fn retention(
    stores: Stores,
    accounts: Accounts,
    data_dir: std::path::PathBuf,
    objects: Option<crate::storage::objects::Objects>,
    days: u32,
) {
    let keep = Duration::from_secs(u64::from(days) * 86_400);
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let Some(cutoff) = SystemTime::now().checked_sub(keep) else {
            continue;
        };
        let ids = match stores.finished_before(cutoff).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "retention: listing old stores failed");
                continue;
            }
        };
        for id in ids {
            match remove_store(&stores, &accounts, &data_dir, objects.as_ref(), &id).await {
                Ok(_) => tracing::info!(store = %id, days, "store deleted by retention"),
                Err(e) => tracing::warn!(store = %id, error = %e, "retention: delete failed"),
            }
        }
    }
}

fn credential_users(req: &Request) -> Vec<String> {
    let mut users: Vec<String> = req
        .headers
        .get_all("Authorization")
        .chain(req.headers.get_all("Proxy-Authorization"))
        .filter_map(|v| Credentials::parse(v).ok())
        .map(|c| c.username)
        .collect();
    // With credentials, the From user too: the engine refuses a From naming another
    // subscriber, and knows subscribers by their digest data (engine/identity.rs). Requests
    // without credentials are only challenged, so they cost no lookup.
    if !users.is_empty() {
        if let Some(from) = req.from_hdr().and_then(|f| f.uri.user_unescaped()) {
            if !users.contains(&from) {
                users.push(from);
            }
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_budget_keeps_rtp_ports_and_reserve() {
        // Plenty: every RTP port and the reserve, connections the rest.
        assert_eq!(connection_fd_budget(40_000, 10_000, 256), 29_744);
        assert_eq!(connection_fd_budget(20_000, 10_000, 256), 9_872);
        // The old default of 1024 with a large port range: half of what is left each.
        assert_eq!(connection_fd_budget(1024, 10_000, 256), 384);
        assert_eq!(connection_fd_budget(100, 10, 256), 0);
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, soft);
        assert_eq!(soft, lim.rlim_max.min(1 << 20));
    }
}
