//! A Kamailio 5.6 process for a test: `kamailio -DD -E` in the foreground with its own pid
//! file and runtime dir in a temp dir, every log line kept, stopped (SIGTERM, then SIGKILL)
//! on drop. The config is either text written by the test or a file of the repository run
//! with `-A NAME=VALUE` defines (config/kamailio/kamailio.cfg).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{free_port, send_signal, tool_available, wait_bound, PortBlock, Transport};

pub struct Kamailio {
    child: Child,
    /// The UDP address it listens on.
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
    _port: PortBlock,
}

impl Kamailio {
    /// Runs the config `text(port)` (the test's own), listening on a free loopback port.
    /// `None` (after a SKIPPED line) when kamailio is not installed and tools are optional.
    pub fn start(text: impl FnOnce(u16) -> String) -> Option<Kamailio> {
        Kamailio::spawn(|dir, port| {
            let cfg = dir.join("kamailio.cfg");
            std::fs::write(&cfg, text(port)).unwrap();
            (cfg.display().to_string(), Vec::new())
        })
    }

    /// Runs the repository file `cfg` with `-A LISTEN=udp:127.0.0.1:<free port>` and the
    /// given extra defines (`NAME=VALUE`, string values quoted by the caller).
    pub fn start_file(cfg: &Path, defines: &[String]) -> Option<Kamailio> {
        let cfg = cfg.display().to_string();
        Kamailio::spawn(|_, port| {
            let mut args = vec![format!("LISTEN=udp:127.0.0.1:{port}")];
            args.extend(defines.iter().cloned());
            (cfg, args)
        })
    }

    fn spawn(setup: impl FnOnce(&Path, u16) -> (String, Vec<String>)) -> Option<Kamailio> {
        if !tool_available("kamailio") {
            return None;
        }
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let (cfg, defines) = setup(dir.path(), port.port(0));
        let mut cmd = Command::new("kamailio");
        cmd.arg("-f").arg(&cfg);
        for d in &defines {
            cmd.arg("-A").arg(d);
        }
        let mut child = cmd
            .args(["-DD", "-E", "-m", "32", "-M", "8"])
            .arg("-P")
            .arg(dir.path().join("kamailio.pid"))
            .arg("-Y")
            .arg(dir.path())
            .arg("-w")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kamailio");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let mut k = Kamailio {
            addr: SocketAddr::from(([127, 0, 0, 1], port.port(0))),
            child,
            log,
            dir,
            _port: port,
        };
        // Up when its UDP port is taken; a config error makes it exit at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wait_bound(k.addr.port(), Transport::Udp, Duration::from_millis(100)) {
            let exited = k.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!("kamailio not listening ({exited:?}):\n{}", k.log());
            }
        }
        Some(k)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// A scratch directory that lives as long as this process (for a dispatcher list).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kamailio log:\n{}", self.log());
        }
        send_signal(&self.child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
