//! A real S3-protocol server for the tests: `s3s-fs` (crates.io, built by `.ci/run` into
//! `.cache/s3s-fs/bin`) on a free loopback port, serving a temporary folder.
//!
//! [`S3sFs::start`] gives a server stopped on drop. The test matrix (`CALLVAULT_TEST_OBJECTS=s3`,
//! scripts/test) puts every [`super::ServerConfig`]'s store media in a bucket of its own
//! server ([`matrix_toml`]); that server lives as long as the test's thread.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "cvtestkey";
pub const SECRET_KEY: &str = "cvtestsecret123";

/// A running s3s-fs; dropping it kills it.
pub struct S3sFs {
    child: Child,
    pub port: u16,
    pub endpoint: String,
    /// The folder it serves: bucket `b` is `root/b`, object `k` the file `root/b/k`.
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary: `CALLVAULT_S3S_FS`, the `.ci/run` cache, or `s3s-fs` on PATH.
pub fn binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CALLVAULT_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/s3s-fs/bin/s3s-fs");
    if cached.exists() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.exists())
    })
}

impl S3sFs {
    /// Starts s3s-fs; None (after `SKIPPED`) when it is not installed, a panic when
    /// `CALLVAULT_REQUIRE_TOOLS=1`.
    pub fn start() -> Option<S3sFs> {
        Self::start_with(None)
    }

    /// `in_dir`: serve that folder (created) and die when the calling thread ends
    /// (`PR_SET_PDEATHSIG`), for servers nobody holds (the test matrix); else a temporary folder.
    fn start_with(in_dir: Option<&std::path::Path>) -> Option<S3sFs> {
        let Some(bin) = binary() else {
            super::tool_available("s3s-fs");
            return None;
        };
        let with_thread = in_dir.is_some();
        let dir = match in_dir {
            Some(d) => {
                std::fs::create_dir_all(d).unwrap();
                tempfile::TempDir::new_in(d).unwrap()
            }
            None => tempfile::tempdir().unwrap(),
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if with_thread {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn s3s-fs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(S3sFs {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            root: dir.path().to_path_buf(),
            _dir: dir,
        })
    }

    /// The `[storage]` lines putting objects in `bucket` here.
    pub fn storage_toml(&self, bucket: &str) -> String {
        format!(
            "objects = \"s3://{bucket}\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\n\
             s3_access_key_id = \"{ACCESS_KEY}\"\ns3_secret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint
        )
    }

    /// The keys of the objects in `bucket` under `prefix` (paths relative to the bucket).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let base = self.root.join(bucket);
        let mut stack = vec![base.join(prefix)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&base) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }
}

/// The test matrix: with `CALLVAULT_TEST_OBJECTS=s3` the `[storage]` lines of a server
/// config whose objects live on a fresh s3s-fs serving a folder in `dir` (the server's test
/// folder, removed with it; the process is killed when the test thread ends); None on the
/// embedded default.
pub fn matrix_toml(dir: &std::path::Path) -> Option<String> {
    if std::env::var("CALLVAULT_TEST_OBJECTS").as_deref() != Ok("s3") {
        return None;
    }
    let server = S3sFs::start_with(Some(&dir.join("s3")))?;
    let toml = server.storage_toml("callvault");
    // Nobody holds it: it lives until the test's thread ends (PDEATHSIG); its folder goes
    // with the server's.
    std::mem::forget(server);
    Some(toml)
}
