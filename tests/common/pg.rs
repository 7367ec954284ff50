//! A throwaway PostgreSQL 15 (Debian's `postgresql` package) for tests: `initdb --no-sync` in a temp
//! dir, `pg_ctl start` on a free loopback port with its socket in that dir, one database per
//! caller, `pg_ctl stop -m fast` when the last holder drops it. Nothing here uses the system
//! cluster Debian may have started.
//!
//! As root the server runs as the `postgres` user (`runuser -u postgres`; PostgreSQL refuses
//! to run as root); as another user it runs as that user. Self-contained (std + tempfile) so
//! the library's unit tests include this file too (`src/storage/mod.rs`).
//!
//! Missing PostgreSQL: [`PgServer::shared`] returns None (the test skips with a SKIPPED line)
//! unless `CALLVAULT_REQUIRE_TOOLS=1`, which makes it a failure.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Where Debian 12 installs PostgreSQL 15's server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `CALLVAULT_TEST_METADATA=postgres`: the integration tests' servers keep their metadata in
/// a throwaway PostgreSQL instead of SQLite (the test matrix of `scripts/test`).
pub fn matrix_wants_postgres() -> bool {
    std::env::var("CALLVAULT_TEST_METADATA").is_ok_and(|v| v == "postgres")
}

/// A running throwaway cluster.
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

/// The server of this test process while someone holds it.
static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn required() -> bool {
    std::env::var("CALLVAULT_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl PgServer {
    /// PostgreSQL is installed here; otherwise SKIPPED (or a panic under
    /// `CALLVAULT_REQUIRE_TOOLS=1`).
    pub fn available() -> bool {
        let ok = Path::new(PG_BIN).join("initdb").exists();
        if !ok {
            let why = format!("PostgreSQL 15 is not installed ({PG_BIN}/initdb)");
            if required() {
                panic!("{why} (CALLVAULT_REQUIRE_TOOLS=1)");
            }
            eprintln!("SKIPPED: {why}");
        }
        ok
    }

    /// The process's server, started on first use; None when PostgreSQL is missing and not
    /// required. It stops when the last `Arc` goes.
    pub fn shared() -> Option<Arc<PgServer>> {
        let mut slot = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.upgrade() {
            return Some(s);
        }
        if !PgServer::available() {
            return None;
        }
        let s = Arc::new(PgServer::start());
        *slot = Arc::downgrade(&s);
        Some(s)
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let bin = PathBuf::from(PG_BIN).join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// initdb + pg_ctl start (a few seconds), retrying on another port if one is taken.
    pub fn start() -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("cvpg")
            .tempdir()
            .expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(st.success(), "chown the PostgreSQL dir to postgres");
        }
        let mut pg = PgServer {
            dir,
            port: 0,
            as_postgres,
        };
        let data = pg.data();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "-A",
                "trust",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            pg.port = free_port();
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                pg.port,
                pg.dir.path().display()
            );
            let log = pg.dir.path().join("log").display().to_string();
            let out = pg.run(
                "pg_ctl",
                &["-D", &data, "-o", &opts, "-l", &log, "-w", "start"],
            );
            if out.status.success() && pg.wait_ready(Duration::from_secs(20)) {
                return pg;
            }
            let _ = pg.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
        }
        panic!(
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(pg.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.psql("postgres", "SELECT 1").status.success() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Runs one SQL command through `psql` over TCP.
    pub fn psql(&self, db: &str, sql: &str) -> Output {
        let port = self.port.to_string();
        Command::new(Path::new(PG_BIN).join("psql"))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("psql")
    }

    /// A fresh empty database; its `postgres://` URL.
    pub fn create_db(&self) -> String {
        let name = format!(
            "cv_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let out = self.psql("postgres", &format!("CREATE DATABASE {name}"));
        assert!(
            out.status.success(),
            "CREATE DATABASE: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
    }
}

/// A database on the process's shared server, kept alive as long as this value.
#[derive(Clone)]
pub struct PgDb {
    pub server: Arc<PgServer>,
    pub url: String,
}

impl PgDb {
    /// None: PostgreSQL is missing and not required (the caller skips).
    pub fn fresh() -> Option<PgDb> {
        let server = PgServer::shared()?;
        let url = server.create_db();
        Some(PgDb { server, url })
    }
}
