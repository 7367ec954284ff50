//! `callvault index`, the piece index as a role of its own (PROTOCOL 3 "Pieces and index",
//! 4, 5 "Index"), against real processes: `callvault serve` with `index.url` set and a
//! `callvault index` on its own port over the same config file and database; `callvault peer
//! fetch` receivers on 127.0.0.1; `callvault peer serve` registering over TCP and removing its
//! binding on SIGTERM; the announced source class.
//!
//! `cargo nextest run --release --test index_role`.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callvault::sip::message::{Method, Request, Response};
use common::http::Resp;
use common::{pseudo_random, sha256_file, PortBlock, Server, ServerConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;
const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";

/// One HTTP/1.1 exchange (`Connection: close`), response with headers.
fn http(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> Resp {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if method == "POST" {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    common::http::send_raw_blocking(addr, &raw)
}

/// A child process with its stderr/stdout collected; SIGKILLed on drop.
struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    stdout_lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .env_remove("CALLVAULT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, stdout_lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let (log1, tx1) = (log.clone(), tx.clone());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                log1.lock().unwrap().push_str(&format!("{l}\n"));
                let _ = tx1.send(l);
            }
        });
        let err = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if !l.starts_with("progress ") {
                    log2.lock().unwrap().push_str(&format!("{l}\n"));
                }
            }
        });
        Proc {
            name: name.to_string(),
            child,
            log,
            stdout_lines,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_for_log(&self, what: impl Fn(&str) -> bool, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.log().lines().any(&what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn sigterm(&self) {
        common::send_signal(&self.child, libc::SIGTERM);
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "{} did not exit; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first stdout line that is JSON (a fetch report), within `by`.
    fn report(&mut self, by: Instant) -> Value {
        loop {
            let left = by.saturating_duration_since(Instant::now());
            match self
                .stdout_lines
                .recv_timeout(left.max(Duration::from_millis(1)))
            {
                Ok(l) if l.starts_with('{') => return serde_json::from_str(&l).unwrap(),
                Ok(_) => {}
                Err(_) => panic!("{}: no report; log:\n{}", self.name, self.log()),
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `callvault index --config FILE`, waited for until its `ready` line.
fn start_index(config: &Path, cwd: &Path) -> Proc {
    let p = Proc::spawn(
        "index",
        Command::new(common::callvault_bin())
            .args(["index", "--config"])
            .arg(config)
            .current_dir(cwd)
            .env("RUST_LOG", "info"),
    );
    assert!(
        p.wait_for_log(common::is_ready_line, Duration::from_secs(20)),
        "callvault index not ready:\n{}",
        p.log()
    );
    p
}

/// serve + the index role on `index_port`, both over one config file and database, with
/// accounts 1001 and 1002 and `extra_share` in `[share]`. `before_start` runs before serve
/// starts (publishing with the CLI).
fn serve_with_role(
    index_port: u16,
    extra_share: &str,
    trust_loopback: bool,
    before_start: impl FnOnce(&Server),
) -> (Server, Proc) {
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = trust_loopback;
    cfg.extra = format!(
        "[share]\n{extra_share}\n\n[index]\nlisten = \"127.0.0.1:{index_port}\"\nurl = \"http://127.0.0.1:{index_port}\"\n"
    );
    let mut server = Server::prepare(cfg);
    server.account_add("1001", "pw1", "1111", "200MiB");
    server.account_add("1002", "pw2", "2222", "200MiB");
    before_start(&server);
    server.start();
    let role = start_index(&server.config_path, server.dir.path());
    (server, role)
}

/// An out-of-dialog share request from `ua` to `sharer` (not sent).
fn share_request(ua: &mut ua::Ua, sharer: &str, body: &str, cseq: u32, call_id: &str) -> Request {
    let mut req = Request::new(Method::Message, format!("sip:{sharer}@example.com"));
    req.headers.push("Via", ua.new_via().to_string());
    req.headers.push("Max-Forwards", "70");
    req.headers
        .push("From", format!("<{}>;tag=f{call_id}", ua.aor()));
    req.headers
        .push("To", format!("<sip:{sharer}@example.com>"));
    req.headers.push("Call-ID", call_id.to_string());
    req.headers.push("CSeq", format!("{cseq} MESSAGE"));
    req.headers.push("Content-Type", SHARE_REQUEST);
    req.body = Bytes::from(body.to_string());
    req
}

/// Sends a share request as `user`/`password`, through callvault's digest challenge if
/// there is one; the final answer.
fn ask(ua: &mut ua::Ua, password: &str, sharer: &str, name: &str, call_id: &str) -> Response {
    let body = format!("{{\"name\":\"{name}\"}}");
    ua.transact_with_digest(password, |ua, cseq, authz| {
        let mut req = share_request(ua, sharer, &body, cseq, call_id);
        if let Some((name, value)) = authz {
            req.headers.push(name, value);
        }
        req
    })
}

fn take_offer(ua: &mut ua::Ua) -> Value {
    let m = ua.expect_request(Method::Message, Some(SHARE_OFFER), ua::T);
    ua.respond(&m, 200, &[], b"");
    serde_json::from_slice(&m.body).unwrap()
}

fn holder<'a>(index: &'a Value, peer_id: &str) -> Option<&'a Value> {
    index["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["peer_id"] == peer_id)
}

fn fetcher(name: &str, out: &Path, args: &[&str]) -> Proc {
    Proc::spawn(
        name,
        Command::new(common::callvault_bin())
            .args(["peer", "fetch", "--peer-id", name, "--json", "--seed"])
            .args(["--listen", "127.0.0.1:0", "--out"])
            .arg(out)
            .args(args)
            .env("RUST_LOG", "warn"),
    )
}

// ---------------------------------------------------------------------------------------------

/// serve with `index.url` + `callvault index`: the offer names the role; 1 sharer + 4 peers
/// (a rate-limited server) fetch through it, three from the offer and one the old way
/// (index on the server, redirected); the role lists them; serve's index routes redirect; the
/// role's refusals are serve's.
#[test]
fn peers_fetch_through_the_index_role() {
    let iport = PortBlock::reserve(1);
    let ip = iport.port(0);
    let work = tempfile::tempdir().unwrap();
    let size = 6 * MIB;
    let bytes = pseudo_random(size, 7);
    let want = hex::encode(Sha256::digest(&bytes));
    let src = work.path().join("clip.bin");
    std::fs::write(&src, &bytes).unwrap();
    let mut cid = String::new();
    let (server, role) = serve_with_role(
        ip,
        "piece_size = 131072\nserver_rate_bytes_per_sec = 3145728",
        true,
        |s| cid = s.publish_named("1001", &src, "clip.bin", "subscribers"),
    );
    let role_addr: SocketAddr = format!("127.0.0.1:{ip}").parse().unwrap();
    let base = format!("http://{}", server.http_addr());
    let index_base = format!("http://127.0.0.1:{ip}");

    // The offer (sharer offline: callvault answers from the policy) names the role.
    let mut b = ua::Ua::new("1002", "example.com", server.sip_addr());
    let resp = ask(&mut b, "pw2", "1001", "clip.bin", "role-offer@ua");
    assert_eq!(resp.status, 200, "{}", server.log());
    let offer = take_offer(&mut b);
    assert_eq!(offer["content_id"], cid.as_str());
    assert_eq!(offer["server_url"], base.as_str());
    assert_eq!(
        offer["index_url"],
        format!("{index_base}/v1/index/{cid}").as_str()
    );
    let tok = offer["token"].as_str().unwrap().to_string();
    let offer_file = work.path().join("offer.json");
    std::fs::write(&offer_file, offer.to_string()).unwrap();

    // serve's own index answers 307 to the role, query kept, for GET and announce.
    for (method, path, body) in [
        ("GET", format!("/v1/index/{cid}?token={tok}"), &b""[..]),
        (
            "POST",
            format!("/v1/index/{cid}/announce?token={tok}"),
            b"{}",
        ),
    ] {
        let r = http(server.http_addr(), method, &path, body);
        assert_eq!(r.status, 307);
        assert_eq!(
            r.header("Location"),
            Some(format!("{index_base}{path}").as_str())
        );
    }

    // Three receivers from the offer, one given only the server (its index requests are
    // redirected to the role).
    let offer_arg = offer_file.to_str().unwrap().to_string();
    let started = Instant::now();
    let mut peers = Vec::new();
    for i in 0..4 {
        let id = format!("r{i}");
        let out = work.path().join(format!("{id}.bin"));
        let p = if i < 3 {
            fetcher(&id, &out, &["--offer", &offer_arg])
        } else {
            fetcher(
                &id,
                &out,
                &["--server", &base, "--content", &cid, "--token", &tok],
            )
        };
        peers.push((p, out));
        std::thread::sleep(Duration::from_millis(600));
    }
    let by = started + Duration::from_secs(60);
    let mut from_peers = 0;
    for (p, out) in peers.iter_mut() {
        let r = p.report(by);
        assert_eq!(r["size"], size as u64, "{r}");
        from_peers += r["from_peers"].as_u64().unwrap();
        assert_eq!(sha256_file(out), want, "{}", p.name);
    }
    println!(
        "4 receivers of {} MiB through the index role in {:.2?}; {from_peers} B from peers",
        size / MIB,
        started.elapsed()
    );
    assert!(from_peers > 0, "no piece came from a peer");

    // The role's index: the server with every piece at serve's address, and all four peers.
    let r = http(
        role_addr,
        "GET",
        &format!("/v1/index/{cid}?token={tok}"),
        b"",
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let ix = r.json();
    assert_eq!(ix["content_id"], cid.as_str());
    assert_eq!(ix["pieces"], (size / 131072) as u64);
    let srv = holder(&ix, "server").expect("server holder");
    assert_eq!(srv["address"], server.http_addr().to_string().as_str());
    assert_eq!(srv["class"], "server");
    for i in 0..4 {
        let h = holder(&ix, &format!("r{i}")).unwrap_or_else(|| panic!("r{i} missing: {ix}"));
        assert_eq!(h["class"], "peer");
    }
    let m = common::fetch_metrics(role_addr).unwrap();
    assert!(
        common::metric_value(&m, "callvault_index_holders", &[]).unwrap_or(0.0) >= 4.0,
        "{m}"
    );

    // Refusals at the role: a bad token, unknown content, a bad announce, a bad class.
    let r = http(role_addr, "GET", &format!("/v1/index/{cid}?token=bad"), b"");
    assert_eq!(r.status, 401);
    assert!(r.header("WWW-Authenticate").is_some());
    let r = http(
        role_addr,
        "GET",
        &format!("/v1/index/{}", "0".repeat(64)),
        b"",
    );
    assert_eq!(r.status, 404);
    let ann = format!("/v1/index/{cid}/announce?token={tok}");
    let r = http(role_addr, "POST", &ann, b"{not json");
    assert_eq!((r.status, r.error()), (400, "bad-announce".to_string()));
    let r = http(
        role_addr,
        "POST",
        &ann,
        br#"{"peer_id":"x1","address":"127.0.0.1:9","have":"!!"}"#,
    );
    assert_eq!(r.status, 400);
    // Account credentials work at the role as at serve (Basic, the sharer).
    let basic = common::http::basic("1001", "pw1");
    let r = common::http::send_raw_blocking(
        role_addr,
        format!(
            "GET /v1/index/{cid} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);

    drop(peers);
    let mut role = role;
    role.sigterm();
    assert!(
        role.wait_exit(Duration::from_secs(5)).success(),
        "{}",
        role.log()
    );
}

/// The announced class: `peer fetch --class mobile` shows as `mobile` in the role's index;
/// an announce without a class is a `peer`; an unknown class is `400 bad-announce`.
#[test]
fn announced_class_shows_in_the_index() {
    let iport = PortBlock::reserve(1);
    let ip = iport.port(0);
    let work = tempfile::tempdir().unwrap();
    let bytes = pseudo_random(4 * MIB, 9);
    let src = work.path().join("m.bin");
    std::fs::write(&src, &bytes).unwrap();
    let mut cid = String::new();
    let (server, _role) = serve_with_role(ip, "piece_size = 262144", true, |s| {
        cid = s.publish_named("1001", &src, "m.bin", "subscribers")
    });
    let tok = server.offer_token(&cid);
    let role_addr: SocketAddr = format!("127.0.0.1:{ip}").parse().unwrap();
    let base = format!("http://{}", server.http_addr());
    let index_url = format!("http://127.0.0.1:{ip}/v1/index/{cid}");
    let index = || {
        http(
            role_addr,
            "GET",
            &format!("/v1/index/{cid}?token={tok}"),
            b"",
        )
        .json()
    };
    let out = work.path().join("mob.bin");
    let mut p = fetcher(
        "mob",
        &out,
        &[
            "--server",
            &base,
            "--content",
            &cid,
            "--token",
            &tok,
            "--index",
            &index_url,
            "--class",
            "mobile",
        ],
    );
    let r = p.report(Instant::now() + Duration::from_secs(30));
    assert_eq!(r["size"], bytes.len() as u64);
    assert_eq!(sha256_file(&out), hex::encode(Sha256::digest(&bytes)));

    let ix = index();
    assert_eq!(holder(&ix, "mob").expect("mob listed")["class"], "mobile");

    // 4 MiB / 256 KiB = 16 pieces = 2 bytes of bitfield: "AAA=", none held.
    let ann = format!("/v1/index/{cid}/announce?token={tok}");
    let r = http(
        role_addr,
        "POST",
        &ann,
        br#"{"peer_id":"plain1","address":"127.0.0.1:9","have":"AAA="}"#,
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(holder(&r.json(), "plain1").unwrap()["class"], "peer");
    let r = http(
        role_addr,
        "POST",
        &ann,
        br#"{"peer_id":"m2","address":"127.0.0.1:9","have":"AAA=","class":"mobile"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(holder(&r.json(), "m2").unwrap()["class"], "mobile");
    for bad in ["satellite", "server", ""] {
        let body =
            format!(r#"{{"peer_id":"m3","address":"127.0.0.1:9","have":"AAA=","class":"{bad}"}}"#);
        let r = http(role_addr, "POST", &ann, body.as_bytes());
        assert_eq!(
            (r.status, r.error()),
            (400, "bad-announce".to_string()),
            "class {bad:?}"
        );
    }
    let ix = index();
    assert!(holder(&ix, "m3").is_none());
}

/// The role's process contract: one line and a non-zero exit on a bad config or a busy
/// port; `ready` then a clean exit 0 on SIGTERM (and SIGINT).
#[test]
fn index_role_exits_cleanly_and_reports_errors_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |toml: &str| {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, toml).unwrap();
        let out = Command::new(common::callvault_bin())
            .args(["index", "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .env_remove("CALLVAULT_CONFIG")
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let storage = format!(
        "[storage]\ndata_dir = {:?}\nmetadata = {:?}\n",
        dir.path().join("data").display().to_string(),
        format!("sqlite://{}", dir.path().join("data/cv.db").display())
    );
    for (toml, word) in [
        ("[index]\nlisten = \"nope\"\n".to_string(), "listen"),
        ("[index]\nport = 8081\n".to_string(), "index.port"),
        ("[index]\nurl = \"ftp://x\"\n".to_string(), "index.url"),
    ] {
        let (st, err) = run(&format!("{storage}{toml}"));
        assert!(!st.success(), "{toml}: {st}");
        assert_eq!(err.trim().lines().count(), 1, "{toml}: {err}");
        assert!(err.contains(word), "{toml}: {err}");
    }
    // Busy port.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (st, err) = run(&format!(
        "{storage}[index]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    assert!(!st.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cannot bind index"), "{err}");
    assert!(err.contains(&port.to_string()), "{err}");
    drop(busy);

    // Ready, then SIGTERM → exit 0; SIGINT likewise.
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let ports = PortBlock::reserve(1);
        let cfg = dir.path().join("ok.toml");
        std::fs::write(
            &cfg,
            format!(
                "{storage}[index]\nlisten = \"127.0.0.1:{}\"\n",
                ports.port(0)
            ),
        )
        .unwrap();
        let mut p = start_index(&cfg, dir.path());
        assert!(
            p.log()
                .contains(&format!("ready index=127.0.0.1:{}", ports.port(0))),
            "{}",
            p.log()
        );
        let addr: SocketAddr = format!("127.0.0.1:{}", ports.port(0)).parse().unwrap();
        let m = common::fetch_metrics(addr).unwrap();
        assert_eq!(
            common::metric_value(&m, "callvault_index_holders", &[]),
            Some(0.0)
        );
        common::send_signal(&p.child, sig);
        let st = p.wait_exit(Duration::from_secs(5));
        assert!(st.success(), "{name}: {st}; {}", p.log());
    }
}

fn registrations(server: &Server) -> f64 {
    common::metric_value(&server.metrics(), "callvault_registrations_active", &[]).unwrap_or(0.0)
}

fn wait_registrations(server: &Server, want: f64, within: Duration, what: &dyn Fn() -> String) {
    let end = Instant::now() + within;
    loop {
        let n = registrations(server);
        if n == want {
            return;
        }
        assert!(
            Instant::now() < end,
            "registrations {n}, want {want}; {}",
            what()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `peer serve --transport tcp`: registers (digest) over TCP, gets the relayed share request
/// on that connection and forwards it; on SIGTERM removes its binding before exiting, so the
/// next request is answered by callvault on the sharer's behalf at once.
#[test]
fn peer_serve_over_tcp_registers_and_unregisters_on_sigterm() {
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = false;
    let server = Server::prepare(cfg);
    server.account_add("1001", "pw1", "1111", "100MiB");
    server.account_add("1002", "pw2", "2222", "100MiB");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("song.bin");
    std::fs::write(&src, pseudo_random(200 * 1024 + 3, 5)).unwrap();
    server.publish_named("1001", &src, "song.bin", "subscribers");
    let mut server = server;
    server.start();
    assert_eq!(registrations(&server), 0.0);

    let dl: PathBuf = work.path().join("a");
    let mut agent = Proc::spawn(
        "agent",
        Command::new(common::callvault_bin())
            .args(["peer", "serve", "--transport", "tcp"])
            .args(["--sip", &server.sip_addr().to_string()])
            .args([
                "--user",
                "1001",
                "--password",
                "pw1",
                "--domain",
                "example.com",
            ])
            .args(["--expires", "300", "--out-dir"])
            .arg(&dl)
            .env("RUST_LOG", "callvault=debug"),
    );
    wait_registrations(&server, 1.0, Duration::from_secs(10), &|| {
        format!("agent:\n{}\nserver:\n{}", agent.log(), server.log())
    });
    assert!(
        agent.wait_for_log(
            |l| l.contains("registered") && l.contains(";transport=tcp>"),
            Duration::from_secs(2)
        ),
        "{}",
        agent.log()
    );

    // Relayed over the agent's TCP connection and forwarded by it: 200 well before the
    // relay deadline (about 10 s).
    let mut b = ua::Ua::new("1002", "example.com", server.sip_addr());
    let sent = Instant::now();
    let resp = ask(&mut b, "pw2", "1001", "song.bin", "tcp-1@ua");
    assert_eq!(resp.status, 200, "{}", agent.log());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        agent.wait_for_log(|l| l.contains("share-request"), Duration::from_secs(2)),
        "the agent saw no share request:\n{}",
        agent.log()
    );
    take_offer(&mut b);

    // SIGTERM: the binding goes (un-REGISTER with digest) and the agent exits 0.
    agent.sigterm();
    let st = agent.wait_exit(Duration::from_secs(5));
    assert!(st.success(), "{st}; {}", agent.log());
    assert!(agent.log().contains("unregistered"), "{}", agent.log());
    wait_registrations(&server, 0.0, Duration::from_secs(1), &|| server.log());

    // Sharer offline now: callvault answers on its behalf right away, offer follows.
    let sent = Instant::now();
    let resp = ask(&mut b, "pw2", "1001", "song.bin", "tcp-2@ua");
    assert_eq!(resp.status, 200, "{}", server.log());
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "answered after {:?}: still relayed to the gone agent?",
        sent.elapsed()
    );
    let offer = take_offer(&mut b);
    assert_eq!(offer["name"], "song.bin");
}
