//! The console (`GET /console`, PROTOCOL 8) in headless Chromium (Debian's `chromium`, driven
//! over the DevTools protocol on `--remote-debugging-pipe`: no driver, no browser download):
//! with a live SIPp call and a store receiving a slow upload, the page shows the call with its
//! packet counters, the store's bar moves, the player's clock and decoded bytes advance while
//! the store is still receiving, and the end-call button ends the call (both SIPps see BYE).
//! Shares: with a published share and a peer that announced some of its pieces, the page
//! shows each holder (the server, the peer) with its piece map, the right pieces set.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use callvault::storage::stores::{NewStore, StoreKind, Stores};
use callvault::storage::threshold::Threshold;
use callvault::storage::Db;
use common::http::{get, request};
use common::{tool_available, PortBlock, Server, ServerConfig, Sipp};
use serde_json::{json, Value};

const ADMIN: &str = "console-admin-token-0123456789";

/// Headless Chromium with a DevTools session on one page.
struct Browser {
    child: Child,
    to: std::fs::File,
    from: mpsc::Receiver<Value>,
    session: String,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // fd 3: commands to the browser; fd 4: its answers and events (NUL-separated JSON).
        let (cmd_r, cmd_w) = std::io::pipe().unwrap();
        let (out_r, out_w) = std::io::pipe().unwrap();
        let (cmd_r, out_w): (OwnedFd, OwnedFd) = (cmd_r.into(), out_w.into());
        let (r, w) = (cmd_r.as_raw_fd(), out_w.as_raw_fd());
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--autoplay-policy=no-user-gesture-required",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe dup2 calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn chromium");
        drop(cmd_r);
        drop(out_w);
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut rd = BufReader::new(out_r);
            let mut buf = Vec::new();
            while rd.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to: std::fs::File::from(OwnedFd::from(cmd_w)),
            from,
            session: String::new(),
            next: 0,
            _profile: profile,
        };
        let t = b.call(None, "Target.createTarget", json!({ "url": url }));
        let target = t["targetId"].as_str().expect("targetId").to_string();
        let a = b.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        b.session = a["sessionId"].as_str().expect("sessionId").to_string();
        b
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer to {method}"));
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its JSON value.
    fn eval(&mut self, expr: &str) -> Value {
        let s = self.session.clone();
        let r = self.call(
            Some(&s),
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is truthy; panics with `what` and the last value after 15 s.
    fn wait_for(&mut self, what: &str, expr: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self.eval(expr);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: last value {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium_available() -> bool {
    Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_live_call_moving_store_bar_player_and_ends_the_call() {
    if !tool_available("sipp") || !chromium_available() {
        eprintln!("skipped: needs sipp and chromium");
        return;
    }
    use tokio::io::AsyncWriteExt;
    let ports = PortBlock::reserve(10);
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(20);
    cfg.route_to = Some((ports.port(0), common::Transport::Udp));
    // Small pieces: a 9500-byte share has 10.
    cfg.extra = "[share]\npiece_size = 1000".into();
    let mut server = Server::prepare(cfg);
    let toml = std::fs::read_to_string(&server.config_path).unwrap();
    let toml = toml.replacen(
        "[http]\n",
        &format!("[http]\nadmin_token = \"{ADMIN}\"\n"),
        1,
    );
    std::fs::write(&server.config_path, toml).unwrap();
    server.account_add("1002", "pw2", "2222", "1000000");
    server.start();
    let a: SocketAddr = server.http_addr();

    // The page is served with its script and a same-origin-only policy.
    let r = get(a, "/console", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));
    assert!(String::from_utf8_lossy(&r.body).contains("/console/console.js"));
    let js = get(a, "/console/console.js", &[]).await;
    assert_eq!(js.status, 200);
    assert!(
        !String::from_utf8_lossy(&js.body).contains("http://"),
        "nothing from another host"
    );

    // A share of 10 pieces, and a peer that announced pieces 0, 3 and 9 of it.
    let file = server.dir.path().join("shared.bin");
    std::fs::write(&file, common::pseudo_random(9500, 7)).unwrap();
    let cid = server.publish_named("1002", &file, "manual.pdf", "public");
    let mut have = callvault::share::index::Bitfield::empty(10);
    for i in [0, 3, 9] {
        have.set(i, true);
    }
    let announce =
        json!({"peer_id": "peer-7", "address": "127.0.0.1:9107", "have": have.to_base64()});
    let bearer = format!("Bearer {ADMIN}");
    let r = request(
        a,
        "POST",
        &format!("/v1/index/{cid}/announce"),
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        announce.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The operator's share list the console reads.
    let r = get(a, "/v1/shares", &[("Authorization", &bearer)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["content_id"], cid.as_str());
    assert_eq!(get(a, "/v1/shares", &[]).await.status, 401);

    // A live call: neither SIPp hangs up.
    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(ports.port(2))
        .timeout(Duration::from_secs(40))
        .spawn();
    let uac = Sipp::uac("callee_bye", server.sip_addr())
        .port(ports.port(1))
        .media_port(ports.port(6))
        .timeout(Duration::from_secs(40))
        .spawn();

    // A store receiving 48 000 bytes of PCMU (6 s of audio) over 6 s.
    let data: PathBuf = server.dir.path().join("data");
    let stores = Stores::new(
        Db::open(&format!("sqlite://{}", data.join("callvault.db").display()))
            .await
            .unwrap(),
    );
    let s = stores
        .create(
            NewStore {
                kind: StoreKind::InCall,
                sender: "sip:1001@example.com".into(),
                receiver: "sip:1002@example.com".into(),
                owner: Some("1002".into()),
                call_id: None,
                threshold: Threshold::Percent(30),
                ttl: Duration::from_secs(300),
            },
            SystemTime::now(),
        )
        .await
        .unwrap();
    const TOTAL: usize = 48_000;
    let mut up = tokio::net::TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT /v1/stores/{}/data?token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: audio/PCMU\r\nContent-Length: {TOTAL}\r\n\r\n",
        s.id,
        callvault::http::upload_token(&s)
    );
    up.write_all(head.as_bytes()).await.unwrap();
    // A 400 Hz tone in mu-law, so the player has something to play.
    let tone: Vec<u8> = (0..TOTAL)
        .map(|i| if (i / 10) % 2 == 0 { 0x20 } else { 0xa0 })
        .collect();
    let writer = tokio::spawn(async move {
        for chunk in tone.chunks(800) {
            up.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        up
    });

    let url = format!("http://{a}/console#token={ADMIN}");
    let id = s.id.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let mut b = Browser::launch(&url);
        // The share with a piece map per holder: the server has every piece, the peer the
        // three it announced, drawn as filled cells.
        let holder = |peer: &str| {
            format!(
                "(() => {{ const r = document.querySelector('[data-share=\"{cid}\"] \
                 [data-holder=\"{peer}\"]'); if (!r) return null; \
                 return [r.dataset.have, [...r.querySelectorAll('.piece')].map((e, i) => \
                 e.classList.contains('have') ? i : -1).filter(i => i >= 0).join(','), \
                 r.querySelectorAll('.piece').length]; }})()"
            )
        };
        let peer = b.wait_for("the peer's piece map", &holder("peer-7"));
        assert_eq!(peer, json!(["0,3,9", "0,3,9", 10]), "peer-7's pieces");
        let all = b.wait_for("the server's piece map", &holder("server"));
        assert_eq!(
            all,
            json!(["0,1,2,3,4,5,6,7,8,9", "0,1,2,3,4,5,6,7,8,9", 10])
        );
        // The live call with both legs' counters moving.
        b.wait_for(
            "a live call with packets",
            "(() => { const r = document.querySelector('[data-call]'); \
             return r && r.querySelector('.state').textContent === 'up' && \
             [...r.querySelectorAll('.rtp')].every(e => Number(e.dataset.in) > 0); })()",
        );
        // The store's bar moves.
        let bar = format!(
            "(() => {{ const e = document.querySelector('[data-store=\"{id}\"] .received'); \
             return e ? parseFloat(e.style.width) : 0; }})()"
        );
        let w1 = b.wait_for("the store's bar", &bar).as_f64().unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        let w2 = b.eval(&bar).as_f64().unwrap();
        assert!(w2 > w1, "the bar must move: {w1} -> {w2}");
        let state = format!("document.querySelector('[data-store=\"{id}\"] .state').textContent");
        assert!(b.eval(&state).as_str().unwrap().starts_with("receiving"));

        // `CALLVAULT_CONSOLE_SCREENSHOT=FILE` keeps a picture of the page (the README's).
        if let Some(path) = std::env::var_os("CALLVAULT_CONSOLE_SCREENSHOT") {
            let session = b.session.clone();
            b.call(
                Some(&session),
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1280, "height": 640, "deviceScaleFactor": 1, "mobile": false }),
            );
            let shot = b.call(
                Some(&session),
                "Page.captureScreenshot",
                json!({ "format": "png" }),
            );
            use base64::Engine as _;
            let png = base64::engine::general_purpose::STANDARD
                .decode(shot["data"].as_str().unwrap_or(""))
                .unwrap();
            std::fs::write(path, png).unwrap();
        }

        // The player, started while the store receives: its clock and bytes advance.
        b.eval(&format!(
            "document.querySelector('[data-store=\"{id}\"] button.play').click()"
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.eval("window.cvPlayer.decoded > 0") != json!(true) {
            let diag = b.eval(
                "JSON.stringify([document.getElementById('player').textContent, \
                 window.cvPlayer.ctx && window.cvPlayer.ctx.state, window.cvPlayer.store])",
            );
            assert!(
                Instant::now() < deadline,
                "the player decodes nothing: {diag}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let p1 = b.eval("[window.cvPlayer.ctx.currentTime, window.cvPlayer.decoded]");
        std::thread::sleep(Duration::from_millis(1000));
        let p2 = b.eval(
            "[window.cvPlayer.ctx.currentTime, window.cvPlayer.decoded, window.cvPlayer.ctx.state]",
        );
        assert!(
            b.eval(&state).as_str().unwrap().starts_with("receiving"),
            "still receiving while played"
        );
        assert!(
            p2[0].as_f64() > p1[0].as_f64(),
            "the clock advances: {p1} {p2}"
        );
        assert!(
            p2[1].as_u64() > p1[1].as_u64(),
            "bytes keep arriving: {p1} {p2}"
        );
        assert_eq!(p2[2], "running");

        // End the call with the button.
        b.eval("document.querySelector('[data-call] button.end').click()");
        b.wait_for(
            "the call gone from the page",
            "document.querySelectorAll('[data-call]').length === 0",
        );
        // The store ends complete on the page.
        b.wait_for(
            "the store complete",
            &format!("{state}.startsWith('complete')"),
        );
    });
    checks.await.unwrap();
    let _ = writer.await.unwrap();
    let (uac, uas) = tokio::task::spawn_blocking(move || (uac.wait(), uas.wait()))
        .await
        .unwrap();
    uac.assert_successful(1);
    uas.assert_successful(1);
}
