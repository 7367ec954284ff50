//! Shared integration-test harness (`mod common;` in each test file).
//!
//! - [`PortBlock`]: consecutive loopback ports free for UDP and TCP, held by lock files so
//!   tests running in parallel (threads or nextest processes) never get the same ones.
//! - [`Server`]: writes a config into a temp dir, spawns `callvault serve --config`, waits for
//!   its `ready` line, kills it on drop (SIGTERM, then SIGKILL).
//! - [`Sipp`]: runs a scenario from `sip-scenarios/` and parses its final statistics
//!   (`-trace_stat` CSV) into a [`SippResult`].
//! - [`fetch_metrics`] / [`metric_value`]: `/metrics` over plain HTTP/1.1 on a TcpStream.
//! - [`RtpCapture`]: counts the RTP each SIPp end receives. SIPp never reads incoming RTP, so
//!   the count comes from a `tcpdump -i lo --immediate-mode` capture of the destination media
//!   ports, started before the calls and parsed here (pcap is simple; no tshark needed). The
//!   capture counts only RTP version 2 packets, per destination port. Capturing needs root or
//!   CAP_NET_RAW: without it [`RtpCapture::start`] returns `None` and the RTP checks skip,
//!   unless `CALLVAULT_REQUIRE_CAPTURE=1` (scripts/test sets it as root, so CI never skips
//!   silently).
//!
//! Missing tools (sipp, tcpdump) skip a test with a SKIPPED line, unless
//! `CALLVAULT_REQUIRE_TOOLS=1` (scripts/test), which makes them failures.
#![allow(dead_code)] // each test file uses a different subset

pub mod http;
pub mod kamailio;
pub mod pg;
pub mod s3;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The SIPp scenarios, their audio and run.sh.
pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sip-scenarios")
}

/// Tests call this for every external tool they need: `false` means "skip this test" (the
/// caller returns early after the message), unless `CALLVAULT_REQUIRE_TOOLS=1`, which turns a
/// missing tool into a failure.
pub fn tool_available(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        skip_or_fail(&format!("{tool} is not installed"));
    }
    found
}

fn tools_required() -> bool {
    std::env::var("CALLVAULT_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn skip_or_fail(why: &str) {
    if tools_required() {
        panic!("{why} (CALLVAULT_REQUIRE_TOOLS=1)");
    }
    eprintln!("SKIPPED: {why}");
}

/// Capturing needs root or CAP_NET_RAW: a refused capture skips the RTP checks unless
/// `CALLVAULT_REQUIRE_CAPTURE=1` (scripts/test sets it when run as root).
fn capture_refused(why: &str) {
    if std::env::var("CALLVAULT_REQUIRE_CAPTURE").is_ok_and(|v| v == "1") {
        panic!("{why} (CALLVAULT_REQUIRE_CAPTURE=1)");
    }
    eprintln!("SKIPPED: {why}");
}

// ---------------------------------------------------------------------------------------------
// Test data

/// `n` deterministic, non-periodic bytes (xorshift64*), fast enough in debug builds.
pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// SHA-256 of a file's contents, lowercase hex (read in 1 MiB blocks: the files are large).
pub fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

// ---------------------------------------------------------------------------------------------
// Ports

/// Where blocks are searched. Below callvault's default RTP range (20000-29999) and the
/// kernel's ephemeral range (32768+), so neither a default callvault nor outgoing sockets
/// collide with us.
const PORT_SEARCH: std::ops::Range<u16> = 10000..19900;

fn port_lock_dir() -> PathBuf {
    std::env::temp_dir().join("callvault-test-ports")
}

/// `count` consecutive ports on 127.0.0.1, each bindable for UDP and TCP when reserved.
/// Lock files (one per port) keep other tests off them until the block is dropped.
pub struct PortBlock {
    pub base: u16,
    pub count: u16,
    locks: Vec<PathBuf>,
}

impl PortBlock {
    pub fn reserve(count: u16) -> PortBlock {
        assert!(count > 0 && count < 1000);
        let dir = port_lock_dir();
        fs::create_dir_all(&dir).unwrap();
        let span = u64::from(PORT_SEARCH.end - PORT_SEARCH.start - count);
        // Start somewhere different in each process so parallel test processes rarely race;
        // even bases, since RTP ranges want even starts.
        let start = (u64::from(std::process::id()) ^ now_nanos()) % span;
        let step = u64::from(count + (count & 1));
        for i in 0..span / step {
            let base = (PORT_SEARCH.start + ((start + i * step) % span) as u16) & !1;
            if let Some(block) = Self::try_take(&dir, base, count) {
                return block;
            }
        }
        panic!("no {count} consecutive free ports in {PORT_SEARCH:?}");
    }

    fn try_take(dir: &Path, base: u16, count: u16) -> Option<PortBlock> {
        let mut block = PortBlock {
            base,
            count,
            locks: Vec::new(),
        };
        for port in base..base + count {
            let lock = dir.join(port.to_string());
            if !take_lock(&lock) {
                return None; // drop releases what we took
            }
            block.locks.push(lock);
            if !port_is_free(port) {
                return None;
            }
        }
        Some(block)
    }

    pub fn port(&self, i: u16) -> u16 {
        assert!(i < self.count, "port {i} outside a block of {}", self.count);
        self.base + i
    }
}

impl Drop for PortBlock {
    fn drop(&mut self) {
        for l in &self.locks {
            let _ = fs::remove_file(l);
        }
    }
}

fn take_lock(path: &Path) -> bool {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A lock left by a killed test run: reclaim after an hour.
            let stale = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600));
            stale
                && fs::remove_file(path).is_ok()
                && OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .is_ok()
        }
        Err(_) => false,
    }
}

/// True when nothing is bound to 127.0.0.1:port, for UDP nor TCP.
pub fn port_is_free(port: u16) -> bool {
    UdpSocket::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// One free port (UDP and TCP) for the life of the returned block.
pub fn free_port() -> PortBlock {
    PortBlock::reserve(1)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Waits until something is bound to 127.0.0.1:port for the transport (our own bind fails).
pub fn wait_bound(port: u16, transport: Transport, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let bound = match transport {
            Transport::Udp => UdpSocket::bind(("127.0.0.1", port)).is_err(),
            Transport::Tcp => TcpListener::bind(("127.0.0.1", port)).is_err(),
        };
        if bound {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Sends `sig` to the child (std can only SIGKILL). A child that has already exited is fine;
/// any other failure means the rig is broken and panics, rather than letting a graceful
/// shutdown silently become a SIGKILL.
pub fn send_signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "kill({pid}, {sig}): {e}"
        );
    }
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL.
fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    send_signal(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// callvault

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
    fn sipp_flag(self) -> &'static str {
        match self {
            Transport::Udp => "u1",
            Transport::Tcp => "t1",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel fast path

thread_local! {
    static IN_PRIVATE_NETNS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Moves the calling test thread — and every process and thread it starts from now on
/// (callvault, SIPp, tcpdump) — into a fresh network namespace with `lo` up, once per thread,
/// so a tc program attached there can never touch the machine's own loopback. The namespace
/// goes away with the last process in it. False, after a SKIPPED line, when not root (a
/// failure with `CALLVAULT_REQUIRE_TOOLS=1`: CI runs as root).
pub fn private_netns() -> bool {
    if IN_PRIVATE_NETNS.with(|c| c.get()) {
        return true;
    }
    // SAFETY: plain syscalls on the calling thread.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CALLVAULT_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "kernel path tests need root (CALLVAULT_REQUIRE_TOOLS=1)"
        );
        eprintln!("SKIPPED: kernel path tests need root");
        return false;
    }
    // SAFETY: affects only the calling thread's namespaces.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip (iproute2)");
    assert!(st.success(), "ip link set lo up: {st}");
    IN_PRIVATE_NETNS.with(|c| c.set(true));
    true
}

/// `CALLVAULT_TEST_KERNEL_FORWARDING=1`: every test server forwards in the kernel, from a
/// private network namespace (scripts/test runs the relay tests a second time so).
fn kernel_forwarding_from_env() -> bool {
    if std::env::var("CALLVAULT_TEST_KERNEL_FORWARDING").as_deref() != Ok("1") {
        return false;
    }
    assert!(
        private_netns(),
        "CALLVAULT_TEST_KERNEL_FORWARDING=1 needs root"
    );
    true
}

/// What goes into the test config. `ServerConfig::new()` gives fresh ports, loopback trusted
/// and no route; set `route_to` to send calls to a UAS.
pub struct ServerConfig {
    pub domain: String,
    pub trust_loopback: bool,
    pub route_to: Option<(u16, Transport)>,
    /// Extra TOML appended verbatim (more sections, `[[route]]`s, ...).
    pub extra: String,
    /// SIP (index 0) and HTTP (index 1) ports.
    pub ports: PortBlock,
    /// callvault's RTP range (even start, 200 ports = 100 calls' worth of legs).
    pub rtp: PortBlock,
    /// `storage.metadata`; None = SQLite in the server's temp dir. `ServerConfig::new()` sets
    /// a fresh PostgreSQL database under `CALLVAULT_TEST_METADATA=postgres` (the test matrix).
    pub metadata: Option<String>,
    /// `storage.data_dir`; None = `data` in the server's temp dir.
    pub data_dir: Option<PathBuf>,
    /// Keeps the throwaway PostgreSQL of `metadata` running as long as the config lives.
    pub pg: Option<pg::PgDb>,
    /// More `[storage]` lines (e.g. a cluster test's bucket, [`s3::S3sFs::storage_toml`]);
    /// when set, the test matrix's objects are not used.
    pub storage_extra: String,
    /// `[media] kernel_forwarding`. Only inside a private network namespace
    /// ([`private_netns`]); `CALLVAULT_TEST_KERNEL_FORWARDING=1` turns it on for every server
    /// (and moves the test there).
    pub kernel_forwarding: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerConfig {
    pub fn new() -> ServerConfig {
        ServerConfig {
            domain: "example.com".into(),
            trust_loopback: true,
            route_to: None,
            extra: String::new(),
            ports: PortBlock::reserve(2),
            rtp: PortBlock::reserve(200),
            metadata: None,
            data_dir: None,
            pg: None,
            storage_extra: String::new(),
            kernel_forwarding: kernel_forwarding_from_env(),
        }
        .with_matrix_metadata()
    }

    /// Under `CALLVAULT_TEST_METADATA=postgres`, metadata in a fresh PostgreSQL database.
    fn with_matrix_metadata(mut self) -> ServerConfig {
        if pg::matrix_wants_postgres() {
            if let Some(db) = pg::PgDb::fresh() {
                self.metadata = Some(db.url.clone());
                self.pg = Some(db);
            }
        }
        self
    }

    /// Metadata in `db` (a cluster test's shared PostgreSQL).
    pub fn on_postgres(mut self, db: &pg::PgDb) -> ServerConfig {
        self.metadata = Some(db.url.clone());
        self.pg = Some(db.clone());
        self
    }

    /// The `storage.metadata` URL the server under `dir` uses.
    pub fn metadata_url(&self, dir: &Path) -> String {
        match &self.metadata {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}",
                self.data_path(dir).join("callvault.db").display()
            ),
        }
    }

    /// The `storage.data_dir` the server under `dir` uses.
    pub fn data_path(&self, dir: &Path) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| dir.join("data"))
    }

    pub fn sip_port(&self) -> u16 {
        self.ports.port(0)
    }

    pub fn http_port(&self) -> u16 {
        self.ports.port(1)
    }

    /// The TOML text; storage paths under `dir`.
    pub fn to_toml(&self, dir: &Path) -> String {
        let sip = self.sip_port();
        let data = self.data_path(dir);
        let mut t = String::new();
        writeln!(t, "[sip]").unwrap();
        writeln!(
            t,
            "listen = [\"udp:127.0.0.1:{sip}\", \"tcp:127.0.0.1:{sip}\"]"
        )
        .unwrap();
        writeln!(t, "domain = {:?}", self.domain).unwrap();
        writeln!(t, "public_address = \"127.0.0.1\"").unwrap();
        writeln!(t, "\n[media]").unwrap();
        writeln!(
            t,
            "rtp_ports = [{}, {}]",
            self.rtp.base,
            self.rtp.base + self.rtp.count - 1
        )
        .unwrap();
        if self.kernel_forwarding {
            writeln!(t, "kernel_forwarding = true").unwrap();
        }
        writeln!(t, "\n[http]\nlisten = \"127.0.0.1:{}\"", self.http_port()).unwrap();
        writeln!(t, "\n[storage]").unwrap();
        writeln!(t, "data_dir = {:?}", data.display().to_string()).unwrap();
        writeln!(t, "metadata = {:?}", self.metadata_url(dir)).unwrap();
        if !self.storage_extra.is_empty() {
            t.push_str(&self.storage_extra);
        } else if let Some(objects) = s3::matrix_toml(dir) {
            // The test matrix (scripts/test): store media and share pieces on s3s-fs.
            t.push_str(&objects);
        }
        if self.trust_loopback {
            writeln!(t, "\n[[trusted_peer]]\ncidr = \"127.0.0.0/8\"").unwrap();
        }
        if let Some((port, transport)) = self.route_to {
            writeln!(
                t,
                "\n[[route]]\nprefix = \"\"\ntarget = \"127.0.0.1:{port}\"\ntransport = \"{}\"",
                transport.as_str()
            )
            .unwrap();
        }
        if !self.extra.is_empty() {
            writeln!(t, "\n{}", self.extra).unwrap();
        }
        t
    }
}

/// A running `callvault serve`. Dropping it stops the process (SIGTERM, then SIGKILL after 5 s).
pub struct Server {
    pub config: ServerConfig,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    /// Extra environment for the server process (e.g. `CALLVAULT_MEDIA_RTP_TIMEOUT_SECS`).
    env: Vec<(String, String)>,
    /// A command the server runs under (e.g. `setpriv ... --`); empty: none.
    wrapper: Vec<String>,
}

pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub fn callvault_bin() -> &'static str {
    env!("CARGO_BIN_EXE_callvault")
}

impl Server {
    /// Writes the config without starting anything (for `account add` before `start`).
    pub fn prepare(config: ServerConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("callvault.toml");
        fs::create_dir_all(dir.path().join("data")).unwrap();
        fs::write(&config_path, config.to_toml(dir.path())).unwrap();
        Server {
            config,
            dir,
            config_path,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// Sets an environment variable for the server process (from the next `start` on); per
    /// server, so parallel tests do not see each other's overrides.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    /// Runs the server under `wrapper` (program and arguments, before callvault's own), e.g.
    /// `setpriv` dropping capabilities.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
    }

    /// `prepare` + `start`.
    pub fn spawn(config: ServerConfig) -> Server {
        let mut s = Server::prepare(config);
        s.start();
        s
    }

    /// Spawns `callvault serve --config FILE` and waits up to 20 s for the line announcing
    /// `ready` on stderr or stdout. Panics with the captured log when it exits or times out.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "server already started");
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(callvault_bin());
                c
            }
            None => Command::new(callvault_bin()),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("CALLVAULT_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn callvault");
        let (tx, rx) = mpsc::channel::<()>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = Arc::clone(&self.log);
            let tx = tx.clone();
            // Keep draining after `ready` so the server never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let ready = is_ready_line(&line);
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                    if ready {
                        let _ = tx.send(());
                    }
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout)
                | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        std::thread::sleep(Duration::from_millis(100)); // let readers finish
                        panic!("callvault exited ({st}) before ready:\n{}", self.log());
                    }
                    if Instant::now() >= deadline {
                        let _ = terminate(&mut child, Duration::from_secs(2));
                        panic!(
                            "callvault not ready within {READY_TIMEOUT:?}:\n{}",
                            self.log()
                        );
                    }
                }
            }
        }
        self.child = Some(child);
        // A kernel-path run must really be one (the fallback test wraps the server to fail it).
        if self.config.kernel_forwarding && self.wrapper.is_empty() {
            let log = self.log();
            assert!(
                log.contains("media=kernel"),
                "kernel path not attached:\n{log}"
            );
        }
    }

    /// The server's `storage.metadata` URL (SQLite file or PostgreSQL database).
    pub fn metadata_url(&self) -> String {
        self.config.metadata_url(self.dir.path())
    }

    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.config.sip_port()))
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.config.http_port()))
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the running server in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("server running");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `callvault account add USER --password P --pin N --quota Q --config FILE`.
    pub fn account_add(&self, user: &str, password: &str, pin: &str, quota: &str) {
        account_add(&self.config_path, user, password, pin, quota);
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`) to the running server.
    pub fn signal(&self, sig: libc::c_int) {
        send_signal(self.child.as_ref().expect("server running"), sig);
    }

    /// Stops the server (SIGTERM, 5 s grace, SIGKILL) and returns its exit status; `start`
    /// may be called again afterwards.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        terminate(&mut child, Duration::from_secs(5))
    }

    /// SIGKILL, no grace (crash tests); `start` may be called again afterwards.
    pub fn kill_hard(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    pub fn metrics(&self) -> String {
        fetch_metrics(self.http_addr()).unwrap_or_else(|e| panic!("GET /metrics: {e}"))
    }

    /// `callvault share publish USER FILE ARGS.. --config FILE` (before or after `start`);
    /// the JSON it prints.
    pub fn share_publish(&self, user: &str, file: &Path, args: &[&str]) -> serde_json::Value {
        let out = Command::new(callvault_bin())
            .args(["share", "publish", user])
            .arg(file)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("CALLVAULT_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "share publish {} {args:?}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "share publish printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// [`Server::share_publish`] with `--name NAME --policy POLICY`; the content id.
    pub fn publish_named(&self, user: &str, file: &Path, name: &str, policy: &str) -> String {
        self.share_publish(user, file, &["--name", name, "--policy", policy])["content_id"]
            .as_str()
            .expect("content_id")
            .to_string()
    }

    /// The offer token of `cid` from the server's own share secret in its database (what
    /// the share-offer MESSAGE would carry).
    pub fn offer_token(&self, cid: &str) -> String {
        let data = self.config.data_path(self.dir.path());
        let url = self.metadata_url();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let db = callvault::storage::Db::open(&url).await.unwrap();
            let sh = callvault::share::Shares::open(
                db.clone(),
                &data,
                "example.com",
                callvault::share::ShareSettings::default(),
            )
            .await
            .unwrap();
            let t = sh.issue_offer_token(cid);
            db.close().await;
            t
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's "ready" line (PROTOCOL.md 4): the word `ready` followed by its listen
/// addresses (`key=value` words) or nothing, e.g.
/// `INFO callvault::server: ready sip=udp:127.0.0.1:5060 http=127.0.0.1:8080`.
/// The trimmed contents of `path` once it is non-empty (a SIPp scenario writes a value there),
/// or None after `timeout`.
pub fn wait_file(path: &Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(s) = fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Some(s.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

pub fn is_ready_line(line: &str) -> bool {
    // `[log] format = "json"`: the message field carries the same text.
    if line.starts_with('{') {
        return serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["message"].as_str().map(is_ready_line))
            .unwrap_or(false);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .iter()
        .enumerate()
        .any(|(i, w)| *w == "ready" && words.get(i + 1).is_none_or(|next| next.contains('=')))
}

pub fn account_add(config: &Path, user: &str, password: &str, pin: &str, quota: &str) {
    let out = Command::new(callvault_bin())
        .args(["account", "add", user, "--password", password, "--pin", pin])
        .args(["--quota", quota])
        .arg("--config")
        .arg(config)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .expect("run callvault account add");
    assert!(
        out.status.success(),
        "callvault account add {user} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP /metrics

/// `GET /metrics` with HTTP/1.1 on a plain TcpStream (`Connection: close`); the body, with
/// chunked transfer coding undone.
pub fn fetch_metrics(addr: SocketAddr) -> Result<String, String> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        return Err(format!("status {status}: {body}"));
    }
    Ok(body)
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let (status, body) = http_get_bytes(addr, path)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// [`http_get`] keeping the body's bytes (pcap, WAV).
pub fn http_get_bytes(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    parse_http_response_bytes(&raw)
}

pub fn parse_http_response(raw: &[u8]) -> Result<(u16, String), String> {
    let (status, body) = parse_http_response_bytes(raw)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub fn parse_http_response_bytes(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// The value of one sample in Prometheus text format: `name` with exactly these labels (any
/// order), or, with `labels` empty, the sample without labels. None when absent.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    parse_samples(text)
        .into_iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// Sum of every sample of `name` whatever its labels (e.g. all outcomes of a counter).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    parse_samples(text)
        .into_iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Sorted by label name.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

pub fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                (
                    &line[..open],
                    parse_labels(&line[open + 1..close]),
                    &line[close + 1..],
                )
            }
            None => match line.split_once(char::is_whitespace) {
                Some((n, r)) => (n, Vec::new(), r),
                None => continue,
            },
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((key, val));
        rest = &after[end..];
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// SIPp

/// One SIPp instance. `Sipp::uac("basic", target)` / `Sipp::uas("basic")` pick
/// `sip-scenarios/basic_uac.xml` / `basic_uas.xml`; SIPp runs with the scenarios directory as
/// its working directory (the scenarios name their audio relative to it) and writes its
/// statistics, screen, errors and message trace into a temp dir.
pub struct Sipp {
    scenario: PathBuf,
    role: &'static str,
    target: Option<SocketAddr>,
    port: u16,
    media_port: u16,
    calls: u32,
    rate: f64,
    limit: Option<u32>,
    transport: Transport,
    service: String,
    auth: (String, String),
    domain: String,
    timeout: Duration,
    trace_msg: bool,
    extra: Vec<String>,
}

impl Sipp {
    /// The caller of scenario `name` (`NAME_uac.xml`), sending to `target`.
    pub fn uac(name: &str, target: SocketAddr) -> Sipp {
        let mut s = Sipp::new(scenarios_dir().join(format!("{name}_uac.xml")), "uac");
        s.target = Some(target);
        s.service = if name == "register" { "1001" } else { "1002" }.into();
        s
    }

    /// The callee of scenario `name` (`NAME_uas.xml`).
    pub fn uas(name: &str) -> Sipp {
        Sipp::new(scenarios_dir().join(format!("{name}_uas.xml")), "uas")
    }

    /// Any scenario file; `role` only names the output files.
    pub fn new(scenario: PathBuf, role: &'static str) -> Sipp {
        Sipp {
            scenario,
            role,
            target: None,
            port: 0,
            media_port: 0,
            calls: 1,
            rate: 10.0,
            limit: None,
            transport: Transport::Udp,
            service: "1002".into(),
            auth: ("1001".into(), "secret".into()),
            domain: "example.com".into(),
            timeout: Duration::from_secs(60),
            trace_msg: true,
            extra: Vec::new(),
        }
    }

    pub fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    /// SIPp's `-mp`: the pcap is sent from here and the SDP names it. SIPp also binds P+2.
    pub fn media_port(mut self, p: u16) -> Self {
        self.media_port = p;
        self
    }
    pub fn calls(mut self, n: u32) -> Self {
        self.calls = n;
        self
    }
    pub fn rate(mut self, r: f64) -> Self {
        self.rate = r;
        self
    }
    pub fn limit(mut self, l: u32) -> Self {
        self.limit = Some(l);
        self
    }
    pub fn transport(mut self, t: Transport) -> Self {
        self.transport = t;
        self
    }
    /// `-s`: the user dialled (the AOR user for register).
    pub fn service(mut self, s: &str) -> Self {
        self.service = s.into();
        self
    }
    /// `-au/-ap` for the UAC; the same pair is given to the register stand-in as keys.
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.auth = (user.into(), password.into());
        self
    }
    pub fn domain(mut self, d: &str) -> Self {
        self.domain = d.into();
        self
    }
    /// SIPp's global `-timeout` (with `-timeout_error`); `wait` allows 10 s more.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Keep the full message trace (on by default; off for big runs).
    pub fn trace_messages(mut self, on: bool) -> Self {
        self.trace_msg = on;
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    /// The command line (without the program name) for output files in `out`.
    pub fn args(&self, out: &Path) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        if let Some(t) = self.target {
            a.push(t.to_string());
        }
        let f = |n: &str| out.join(format!("{}_{n}", self.role)).display().to_string();
        a.extend(
            [
                "-sf",
                &self.scenario.display().to_string(),
                "-i",
                "127.0.0.1",
                "-mi",
                "127.0.0.1",
                "-t",
                self.transport.sipp_flag(),
                "-m",
                &self.calls.to_string(),
                "-r",
                &self.rate.to_string(),
                "-s",
                &self.service,
                "-au",
                &self.auth.0,
                "-ap",
                &self.auth.1,
                "-key",
                "auth_user",
                &self.auth.0,
                "-key",
                "auth_pass",
                &self.auth.1,
                "-key",
                "domain",
                &self.domain,
                "-nostdin",
                "-timeout",
                &format!("{}s", self.timeout.as_secs().max(1)),
                "-timeout_error",
                "-trace_stat",
                "-stf",
                &f("stat.csv"),
                "-fd",
                "1",
                "-trace_screen",
                "-screen_file",
                &f("screen.log"),
                "-trace_err",
                "-error_file",
                &f("errors.log"),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if self.trace_msg {
            a.extend([
                "-trace_msg".into(),
                "-message_file".into(),
                f("messages.log"),
            ]);
        }
        if self.port != 0 {
            a.extend(["-p".into(), self.port.to_string()]);
        }
        if self.media_port != 0 {
            a.extend(["-mp".into(), self.media_port.to_string()]);
        }
        if let Some(l) = self.limit {
            a.extend(["-l".into(), l.to_string()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Starts SIPp. A UAS with a fixed port is waited for until its SIP socket is bound, so a
    /// UAC started right after cannot lose its first request.
    pub fn spawn(self) -> SippRun {
        let out = tempfile::Builder::new()
            .prefix(&format!("sipp-{}-", self.role))
            .tempdir()
            .unwrap();
        let args = self.args(out.path());
        let stdout = File::create(out.path().join(format!("{}_stdout.log", self.role))).unwrap();
        let stderr = stdout.try_clone().unwrap();
        let child = Command::new("sipp")
            .args(&args)
            .current_dir(scenarios_dir())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn sipp (apt-get install sip-tester)");
        let run = SippRun {
            child,
            out,
            role: self.role,
            args,
            timeout: self.timeout + Duration::from_secs(10),
        };
        if self.target.is_none() && self.port != 0 {
            let bound = wait_bound(self.port, self.transport, Duration::from_secs(10));
            if !bound {
                let r = run.wait();
                panic!("SIPp {} never bound port {}: {r}", self.role, self.port);
            }
        }
        run
    }

    /// spawn + wait.
    pub fn run(self) -> SippResult {
        self.spawn().wait()
    }
}

/// A running SIPp; killed on drop if still running.
pub struct SippRun {
    child: Child,
    out: tempfile::TempDir,
    role: &'static str,
    args: Vec<String>,
    timeout: Duration,
}

impl SippRun {
    /// Waits for SIPp to exit (its own `-timeout` + 10 s, then SIGTERM/SIGKILL) and parses
    /// its final statistics.
    pub fn wait(mut self) -> SippResult {
        let status = match wait_timeout(&mut self.child, self.timeout) {
            Some(st) => Some(st),
            None => {
                terminate(&mut self.child, Duration::from_secs(2));
                None
            }
        };
        self.result(status)
    }

    /// Where SIPp writes its logs (kept until the run is dropped).
    pub fn out_dir(&self) -> &Path {
        self.out.path()
    }

    fn result(&self, status: Option<ExitStatus>) -> SippResult {
        let read = |n: &str| {
            fs::read_to_string(self.out.path().join(format!("{}_{n}", self.role)))
                .unwrap_or_default()
        };
        let stats = parse_stat_csv(&read("stat.csv"));
        SippResult::from_stats(
            self.role,
            status.and_then(|s| s.code()),
            stats,
            read("screen.log"),
            read("errors.log"),
            read("stdout.log"),
            read("messages.log"),
            self.args.join(" "),
        )
    }
}

impl Drop for SippRun {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child, Duration::from_secs(1));
        }
    }
}

/// SIPp's outcome: exit code plus the cumulative counters of the last `-trace_stat` row.
/// Exit codes (SIPp 3.6): 0 all calls successful, 1 at least one failed, 97 stopped by an
/// internal command, 99 normal exit without calls processed, 255 fatal error.
#[derive(Debug, Clone, Default)]
pub struct SippResult {
    pub role: String,
    /// None when SIPp had to be killed (or died from a signal).
    pub exit_code: Option<i32>,
    pub created: u64,
    pub successful: u64,
    pub failed: u64,
    pub unexpected: u64,
    pub timeouts: u64,
    pub regexp_failed: u64,
    pub max_udp_retrans: u64,
    pub tcp_closed: u64,
    pub retransmissions: u64,
    pub out_of_call: u64,
    pub dead_call: u64,
    /// Every `(C)` (cumulative) column of the last row, by name without the suffix.
    pub stats: BTreeMap<String, String>,
    pub screen: String,
    pub errors: String,
    pub stdout: String,
    pub messages: String,
    pub command: String,
}

/// Header and last row of a `-trace_stat` CSV (`;`-separated), as name -> value.
pub fn parse_stat_csv(text: &str) -> BTreeMap<String, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let Some(last) = lines.next_back() else {
        return BTreeMap::new();
    };
    header
        .split(';')
        .zip(last.split(';'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

impl SippResult {
    #[allow(clippy::too_many_arguments)]
    pub fn from_stats(
        role: &str,
        exit_code: Option<i32>,
        raw: BTreeMap<String, String>,
        screen: String,
        errors: String,
        stdout: String,
        messages: String,
        command: String,
    ) -> SippResult {
        let c = |k: &str| {
            raw.get(&format!("{k}(C)"))
                .or_else(|| raw.get(k))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let stats = raw
            .iter()
            .filter_map(|(k, v)| k.strip_suffix("(C)").map(|k| (k.to_string(), v.clone())))
            .collect();
        SippResult {
            role: role.into(),
            exit_code,
            created: c("TotalCallCreated"),
            successful: c("SuccessfulCall"),
            failed: c("FailedCall"),
            unexpected: c("FailedUnexpectedMessage"),
            timeouts: c("FailedTimeoutOnRecv") + c("FailedTimeoutOnSend"),
            regexp_failed: c("FailedRegexpDoesntMatch") + c("FailedRegexpHdrNotFound"),
            max_udp_retrans: c("FailedMaxUDPRetrans"),
            tcp_closed: c("FailedTcpClosed"),
            retransmissions: c("Retransmissions"),
            out_of_call: c("OutOfCallMsgs"),
            dead_call: c("DeadCallMsgs"),
            stats,
            screen,
            errors,
            stdout,
            messages,
            command,
        }
    }

    /// Exit code 0 and exactly `calls` successful calls, none failed.
    pub fn all_successful(&self, calls: u64) -> bool {
        self.exit_code == Some(0) && self.successful == calls && self.failed == 0
    }

    /// Panics with the screen, errors and the tail of the message trace unless
    /// [`all_successful`](Self::all_successful).
    pub fn assert_successful(&self, calls: u64) {
        assert!(self.all_successful(calls), "{self}");
    }
}

impl std::fmt::Display for SippResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "SIPp {}: exit={:?} created={} successful={} failed={} unexpected={} timeouts={} \
             regexp_failed={} max_udp_retrans={} tcp_closed={} retransmissions={}",
            self.role,
            self.exit_code,
            self.created,
            self.successful,
            self.failed,
            self.unexpected,
            self.timeouts,
            self.regexp_failed,
            self.max_udp_retrans,
            self.tcp_closed,
            self.retransmissions
        )?;
        writeln!(f, "command: sipp {}", self.command)?;
        writeln!(f, "--- screen ---\n{}", self.screen)?;
        writeln!(f, "--- errors ---\n{}", self.errors)?;
        writeln!(f, "--- stdout ---\n{}", tail(&self.stdout, 40))?;
        write!(f, "--- messages (tail) ---\n{}", tail(&self.messages, 120))
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// RTP counting

/// A `tcpdump` capture on `lo` of UDP to the given destination ports.
pub struct RtpCapture {
    child: Child,
    file: PathBuf,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// RTP packets (version 2) received per destination port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtpCounts {
    pub by_port: BTreeMap<u16, u64>,
    /// Packets by (destination port, payload type).
    pub by_port_pt: BTreeMap<(u16, u8), u64>,
}

impl RtpCounts {
    pub fn to_port(&self, port: u16) -> u64 {
        self.by_port.get(&port).copied().unwrap_or(0)
    }
}

impl RtpCapture {
    /// Starts capturing UDP to `ports` on lo and waits until tcpdump reports it is listening.
    /// `None` (after a SKIPPED message) when tcpdump is missing (panics instead with
    /// `CALLVAULT_REQUIRE_TOOLS=1`) or may not capture (panics with
    /// `CALLVAULT_REQUIRE_CAPTURE=1`).
    pub fn start(ports: &[u16]) -> Option<RtpCapture> {
        assert!(!ports.is_empty());
        if !tool_available("tcpdump") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rtp.pcap");
        let errlog = dir.path().join("tcpdump.log");
        let filter = format!(
            "udp and ({})",
            ports
                .iter()
                .map(|p| format!("dst port {p}"))
                .collect::<Vec<_>>()
                .join(" or ")
        );
        // --immediate-mode: otherwise libpcap delivers in blocks on a 1 s timeout and the last
        // packets of a call are lost when the capture is stopped soon after it.
        let mut child = Command::new("tcpdump")
            .args([
                "-i",
                "lo",
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "256",
                "-w",
            ])
            .arg(&file)
            .arg(&filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&errlog).unwrap())
            .spawn()
            .expect("spawn tcpdump");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = fs::read_to_string(&errlog).unwrap_or_default();
            if log.contains("listening on") {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                capture_refused(&format!(
                    "tcpdump cannot capture on lo ({st}): {}",
                    log.trim()
                ));
                return None;
            }
            if Instant::now() >= deadline {
                terminate(&mut child, Duration::from_secs(1));
                capture_refused(&format!("tcpdump did not start: {}", log.trim()));
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(RtpCapture {
            child,
            file,
            ports: ports.to_vec(),
            _dir: dir,
        })
    }

    /// Stops the capture and returns the pcap file's bytes (see [`udp_datagrams`]).
    pub fn stop_raw(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        send_signal(&self.child, libc::SIGINT);
        if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            terminate(&mut self.child, Duration::from_secs(1));
        }
        fs::read(&self.file).unwrap_or_default()
    }

    /// Stops the capture (SIGINT lets tcpdump flush) and counts.
    pub fn stop(mut self) -> RtpCounts {
        std::thread::sleep(Duration::from_millis(200)); // packets still in flight on lo
        send_signal(&self.child, libc::SIGINT);
        if wait_timeout(&mut self.child, Duration::from_secs(5)).is_none() {
            terminate(&mut self.child, Duration::from_secs(1));
        }
        let data = fs::read(&self.file).unwrap_or_default();
        count_rtp(&data).unwrap_or_else(|e| panic!("reading capture: {e}"))
    }
}

impl Drop for RtpCapture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child, Duration::from_secs(1));
        }
    }
}

/// Counts RTP v2 packets per UDP destination port in a classic pcap file (microsecond or
/// nanosecond, either byte order; link types Ethernet, raw IP, Linux cooked v1/v2).
pub fn count_rtp(pcap: &[u8]) -> Result<RtpCounts, String> {
    let mut counts = RtpCounts::default();
    if pcap.is_empty() {
        return Ok(counts);
    }
    if pcap.len() < 24 {
        return Err("pcap shorter than its header".into());
    }
    let (l2_len, frames) = pcap_frames(pcap)?;
    for frame in frames {
        if let Some((port, pt)) = rtp_in_frame(frame, l2_len) {
            *counts.by_port.entry(port).or_default() += 1;
            *counts.by_port_pt.entry((port, pt)).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Every IPv4/UDP datagram of a classic pcap file (formats as [`count_rtp`]), in file order,
/// as (UDP destination port, UDP payload).
pub fn udp_datagrams(pcap: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, String> {
    let mut out = Vec::new();
    if pcap.len() < 24 {
        return Ok(out);
    }
    let (l2_len, frames) = pcap_frames(pcap)?;
    for frame in frames {
        let Some(ip) = frame.get(l2_len..) else {
            continue;
        };
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
            continue;
        }
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        let ulen = (u16::from_be_bytes([udp[4], udp[5]]) as usize).clamp(8, udp.len());
        out.push((dport, udp[8..ulen].to_vec()));
    }
    Ok(out)
}

/// The link-layer header length and every complete frame of a classic pcap file of at least
/// its 24-byte header (microsecond or nanosecond, either byte order; link types Ethernet, raw
/// IP, Linux cooked v1/v2). A record cut off at the end (a capture stopped mid-write) is left
/// out.
fn pcap_frames(pcap: &[u8]) -> Result<(usize, Vec<&[u8]>), String> {
    let magic = u32::from_le_bytes([pcap[0], pcap[1], pcap[2], pcap[3]]);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        m => return Err(format!("not a pcap file (magic {m:#x})")),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(pcap, 20);
    let l2_len = match linktype {
        1 => 14,   // Ethernet (what Linux lo gives)
        101 => 0,  // raw IP
        113 => 16, // Linux cooked v1
        276 => 20, // Linux cooked v2
        other => return Err(format!("unsupported link type {other}")),
    };
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= pcap.len() {
        let incl = u32_at(pcap, off + 8) as usize;
        let start = off + 16;
        let end = start + incl;
        if end > pcap.len() {
            break;
        }
        frames.push(&pcap[start..end]);
        off = end;
    }
    Ok((l2_len, frames))
}

/// (UDP destination port, RTP payload type) when the frame is IPv4/UDP carrying RTP v2.
fn rtp_in_frame(frame: &[u8], l2_len: usize) -> Option<(u16, u8)> {
    let ip = frame.get(l2_len..)?;
    if ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if *ip.get(9)? != 17 {
        return None;
    }
    let udp = ip.get(ihl..)?;
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let rtp = udp.get(8..)?;
    if rtp.len() < 12 || rtp[0] >> 6 != 2 {
        return None;
    }
    // RTCP shares version 2; its packet types 200-204 land in PT 72-76 with the marker set.
    let pt = rtp[1] & 0x7f;
    if (72..=76).contains(&pt) {
        return None;
    }
    Some((dport, pt))
}

/// GET `path` with the admin bearer `token`: (status, body).
pub fn admin_get(addr: SocketAddr, token: &str, path: &str) -> (u16, Vec<u8>) {
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let r = http::send_raw_blocking(addr, raw.as_bytes());
    (r.status, r.body)
}

/// The `call-recording` stores the admin API lists now (admin bearer `token`).
pub fn recordings(server: &Server, token: &str) -> Vec<serde_json::Value> {
    let (status, body) = admin_get(server.http_addr(), token, "/v1/stores");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    list.into_iter()
        .filter(|s| s["kind"] == "call-recording")
        .collect()
}

/// The `call-recording` stores once `n` of them are `complete` (admin bearer `token`).
pub fn complete_recordings(server: &Server, token: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let recs = recordings(server, token);
        if recs.len() == n && recs.iter().all(|s| s["state"] == "complete") {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "recordings not complete: {} of {n}\n{}",
            recs.iter().filter(|s| s["state"] == "complete").count(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
