//! The operator's API (PROTOCOL 8) against a running `callvault serve`: live calls listed
//! with legs and packet counters and ended through `DELETE /v1/calls/{id}` (both SIPps see
//! the BYE with the operator's Reason), registrations, accounts over HTTP (the CLI sees the
//! same accounts) and store deletion. Every endpoint is checked for admin, own user, another
//! user and no credentials.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use callvault::storage::segments::{RecordHeader, SegmentOptions, SegmentWriter};
use callvault::storage::stores::{
    store_dir, NewStore, StartSession, StoreKind, StoreState, Stores,
};
use callvault::storage::threshold::Threshold;
use callvault::storage::Db;
use common::http::{basic, get, request, Resp};
use common::{tool_available, PortBlock, Server, ServerConfig, Sipp};
use serde_json::{json, Value};

const ADMIN: &str = "ops-admin-token-0123456789";

fn bearer() -> String {
    format!("Bearer {ADMIN}")
}

/// A server with the admin token and accounts 1001, 1002, 1003 (password `pwN`).
fn server(cfg: ServerConfig) -> Server {
    let mut server = Server::prepare(cfg);
    let toml = std::fs::read_to_string(&server.config_path).unwrap();
    let toml = toml.replacen(
        "[http]\n",
        &format!("[http]\nadmin_token = \"{ADMIN}\"\n"),
        1,
    );
    std::fs::write(&server.config_path, toml).unwrap();
    for (u, p, pin) in [
        ("1001", "pw1", "1111"),
        ("1002", "pw2", "2222"),
        ("1003", "pw3", "3333"),
    ] {
        server.account_add(u, p, pin, "1000000");
    }
    server.start();
    server
}

async fn send(a: SocketAddr, method: &str, path: &str, auth: Option<&str>, body: &str) -> Resp {
    let len = body.len().to_string();
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(v) = auth {
        headers.push(("Authorization", v));
    }
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json"));
        headers.push(("Content-Length", &len));
    }
    request(a, method, path, &headers, body.as_bytes()).await
}

/// One Server-Sent Event as read: when, `event:` and the `data:` JSON.
type Sse = (Instant, String, Value);

/// Opens `GET /v1/events` with `auth` and forwards every event; the status line is checked.
async fn events(a: SocketAddr, auth: &str) -> tokio::sync::mpsc::UnboundedReceiver<Sse> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    let req = format!("GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap_or_default();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut name = String::new();
        // Chunked framing lines (sizes, blanks) are skipped: only `event:`/`data:` count.
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(d).expect("event data is JSON");
                if tx.send((Instant::now(), name.clone(), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event named `name` for which `pred` holds, within 10 s.
async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Sse>,
    name: &str,
    pred: impl Fn(&Value) -> bool,
) -> Sse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {name} event in time"))
            .expect("event stream open");
        if ev.1 == name && pred(&ev.2) {
            return ev;
        }
    }
}

/// Polls `GET /v1/calls` (admin) until `pred` holds for the list, or panics after 10 s.
async fn calls_until(a: SocketAddr, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(a, "/v1/calls", &[("Authorization", &bearer())]).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        let list = r.json().as_array().cloned().expect("an array");
        if pred(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "{what}: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_call_is_listed_with_counters_and_ended_by_the_operator() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(10);
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(20);
    cfg.route_to = Some((ports.port(0), common::Transport::Udp));
    let server = server(cfg);
    let a = server.http_addr();

    // The callee waits up to 30 s for BYE, the caller 15 s after its ACK; neither hangs up.
    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(ports.port(2))
        .timeout(Duration::from_secs(30))
        .spawn();
    let uac = Sipp::uac("callee_bye", server.sip_addr())
        .port(ports.port(1))
        .media_port(ports.port(6))
        .timeout(Duration::from_secs(30))
        .spawn();

    // Up, with RTP counted both ways on both legs (SIPp plays audio from both ends).
    let list = calls_until(a, "an up call with packets both ways", |l| {
        l.len() == 1
            && l[0]["state"] == "up"
            && ["a", "b"].iter().all(|s| {
                let rtp = &l[0]["legs"][s]["rtp"];
                rtp["packets_in"].as_u64().unwrap_or(0) > 5
                    && rtp["packets_out"].as_u64().unwrap_or(0) > 5
            })
    })
    .await;
    let call = &list[0];
    let id = call["id"].as_str().expect("id is a string").to_string();
    assert_eq!(call["from"], "sip:1001@example.com");
    assert_eq!(call["to"], "sip:1002@example.com");
    assert_eq!(call["recording"], false);
    assert_eq!(call["stores"], json!([]));
    for k in ["started_at", "answered_at"] {
        let t = call[k].as_str().unwrap_or_default();
        assert!(t.len() == 20 && t.ends_with('Z'), "{k}: {t:?}");
    }
    let a_leg = &call["legs"]["a"];
    let b_leg = &call["legs"]["b"];
    assert!(!a_leg["call_id"].as_str().unwrap().is_empty());
    assert!(b_leg["call_id"].as_str().unwrap().starts_with("cv"));
    assert_eq!(
        a_leg["remote"],
        format!("udp:127.0.0.1:{}", ports.port(1)),
        "{call}"
    );
    assert_eq!(b_leg["remote"], format!("udp:127.0.0.1:{}", ports.port(0)));
    assert_eq!(
        a_leg["rtp"]["remote"],
        format!("127.0.0.1:{}", ports.port(6))
    );
    assert_eq!(
        b_leg["rtp"]["remote"],
        format!("127.0.0.1:{}", ports.port(2))
    );
    assert!(a_leg["rtp"]["local_port"].as_u64().unwrap() >= u64::from(server.config.rtp.base));
    // The caller's own credentials see the call; a third party sees nothing; none is 401.
    let r = get(a, "/v1/calls", &[("Authorization", &basic("1001", "pw1"))]).await;
    assert_eq!(
        (r.status, r.json().as_array().map(Vec::len)),
        (200, Some(1))
    );
    let r = get(a, "/v1/calls", &[("Authorization", &basic("1003", "pw3"))]).await;
    assert_eq!((r.status, r.json()), (200, json!([])));
    assert_eq!(get(a, "/v1/calls", &[]).await.status, 401);
    assert_eq!(
        get(a, "/v1/calls", &[("Authorization", "Bearer not-the-token")])
            .await
            .status,
        401
    );

    // The event stream: the call is there at once; a user's credentials are refused.
    let r = get(a, "/v1/events", &[("Authorization", &basic("1001", "pw1"))]).await;
    assert_eq!(r.status, 403);
    assert_eq!(get(a, "/v1/events", &[]).await.status, 401);
    let mut ev = events(a, &bearer()).await;
    let first = next_event(&mut ev, "call", |v| v["id"] == id.as_str()).await;
    assert_eq!(first.2["state"], "up");
    assert_eq!(
        first.2["legs"]["b"]["call_id"],
        call["legs"]["b"]["call_id"]
    );

    // Ending: a user may not, an unknown id is 404, the admin gets 204.
    let path = format!("/v1/calls/{id}");
    let r = send(a, "DELETE", &path, Some(&basic("1001", "pw1")), "").await;
    assert_eq!(r.status, 403);
    assert_eq!(send(a, "DELETE", &path, None, "").await.status, 401);
    let r = send(a, "DELETE", "/v1/calls/99999", Some(&bearer()), "").await;
    assert_eq!((r.status, r.error().as_str()), (404, "not-found"));
    let r = send(a, "DELETE", "/v1/calls/nonsense", Some(&bearer()), "").await;
    assert_eq!(r.status, 404);
    let r = send(a, "DELETE", &path, Some(&bearer()), "").await;
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    calls_until(a, "no call after the operator ended it", |l| l.is_empty()).await;
    let last = next_event(&mut ev, "call", |v| {
        v["id"] == id.as_str() && v["state"] == "ended"
    })
    .await;
    assert!(
        last.2["ended_at"].as_str().unwrap_or("").ends_with('Z'),
        "{:?}",
        last.2
    );
    assert_eq!(last.2["legs"]["a"]["call_id"], call["legs"]["a"]["call_id"]);
    let r = send(a, "DELETE", &path, Some(&bearer()), "").await;
    assert_eq!(r.status, 404, "ended twice");

    // Both SIPps got the BYE (their scenarios end with it) with the operator's Reason.
    let (uac, uas) = tokio::task::spawn_blocking(move || (uac.wait(), uas.wait()))
        .await
        .unwrap();
    uac.assert_successful(1);
    uas.assert_successful(1);
    for r in [&uac, &uas] {
        assert!(
            r.messages
                .contains("Reason: Q.850;cause=16;text=\"ended by operator\""),
            "{}",
            r.messages
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_listed_for_admin_and_own_user() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(2);
    let server = server(ServerConfig::new());
    let a = server.http_addr();
    let port = ports.port(0);
    let reg = Sipp::uac("register_keep", server.sip_addr())
        .port(port)
        .service("1002")
        .auth("1002", "pw2")
        .timeout(Duration::from_secs(10));
    let res = tokio::task::spawn_blocking(move || reg.run())
        .await
        .unwrap();
    res.assert_successful(1);

    let r = get(a, "/v1/registrations", &[("Authorization", &bearer())]).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert_eq!(b["aor"], "sip:1002@example.com");
    assert_eq!(b["source"], format!("127.0.0.1:{port}"));
    assert_eq!(b["transport"], "udp");
    assert!(b["contact"].as_str().unwrap().contains(&format!(":{port}")));
    assert!(b["expires_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        b["user_agent"], "callvault-sipp",
        "the REGISTER's User-Agent is kept"
    );

    let own = get(
        a,
        "/v1/registrations",
        &[("Authorization", &basic("1002", "pw2"))],
    )
    .await;
    assert_eq!(
        (own.status, own.json().as_array().map(Vec::len)),
        (200, Some(1))
    );
    let other = get(
        a,
        "/v1/registrations",
        &[("Authorization", &basic("1001", "pw1"))],
    )
    .await;
    assert_eq!((other.status, other.json()), (200, json!([])));
    assert_eq!(get(a, "/v1/registrations", &[]).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_over_http_are_the_cli_accounts() {
    let server = server(ServerConfig::new());
    let a = server.http_addr();
    let admin = bearer();
    let body = r#"{"user":"2001","password":"s3cret","pin":"4321","quota_bytes":5000}"#;

    assert_eq!(
        send(a, "POST", "/v1/accounts", None, body).await.status,
        401
    );
    let r = send(a, "POST", "/v1/accounts", Some(&basic("1001", "pw1")), body).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let r = send(a, "POST", "/v1/accounts", Some(&admin), body).await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!({"user":"2001","quota_bytes":5000,"used_bytes":0,"reserved_bytes":0,"free_bytes":5000})
    );
    let r = send(a, "POST", "/v1/accounts", Some(&admin), body).await;
    assert_eq!(r.status, 409);
    let bad_pin = r#"{"user":"2002","password":"x","pin":"12ab","quota_bytes":1}"#;
    assert_eq!(
        send(a, "POST", "/v1/accounts", Some(&admin), bad_pin)
            .await
            .status,
        400
    );
    let missing = r#"{"user":"2002","password":"x"}"#;
    assert_eq!(
        send(a, "POST", "/v1/accounts", Some(&admin), missing)
            .await
            .status,
        400
    );

    // The new account's password opens its own account; the CLI lists it.
    let r = get(
        a,
        "/v1/accounts/2001",
        &[("Authorization", &basic("2001", "s3cret"))],
    )
    .await;
    assert_eq!(r.status, 200);
    let out = std::process::Command::new(common::callvault_bin())
        .args(["account", "show", "2001", "--config"])
        .arg(&server.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5000"),
        "{out:?}"
    );

    // PATCH: admin only; everything at once; a bad field changes nothing.
    let p = "/v1/accounts/2001";
    let patch = r#"{"password":"n3w","pin":"9999","quota_bytes":7000,"prompt_format":"text","threshold":"bytes:1000"}"#;
    assert_eq!(
        send(a, "PATCH", p, Some(&basic("2001", "s3cret")), patch)
            .await
            .status,
        403
    );
    assert_eq!(send(a, "PATCH", p, None, patch).await.status, 401);
    let r = send(
        a,
        "PATCH",
        p,
        Some(&admin),
        r#"{"quota_bytes":1,"threshold":"nope"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = send(a, "PATCH", p, Some(&admin), patch).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["quota_bytes"], 7000);
    let r = get(a, p, &[("Authorization", &basic("2001", "s3cret"))]).await;
    assert_eq!(r.status, 401, "the old password is gone");
    let r = get(a, p, &[("Authorization", &basic("2001", "n3w"))]).await;
    assert_eq!(r.status, 200);
    let r = send(
        a,
        "PATCH",
        p,
        Some(&admin),
        r#"{"prompt_format":null,"threshold":"default"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        a,
        "PATCH",
        "/v1/accounts/ghost",
        Some(&admin),
        r#"{"quota_bytes":1}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(a, "PATCH", p, Some(&admin), r#"{"colour":"red"}"#).await;
    assert_eq!(r.status, 400, "unknown fields are refused");

    // DELETE: admin only, then gone for the API and the CLI.
    assert_eq!(
        send(a, "DELETE", p, Some(&basic("2001", "n3w")), "")
            .await
            .status,
        403
    );
    assert_eq!(send(a, "DELETE", p, Some(&admin), "").await.status, 204);
    assert_eq!(send(a, "DELETE", p, Some(&admin), "").await.status, 404);
    assert_eq!(get(a, p, &[("Authorization", &admin)]).await.status, 404);
    let out = std::process::Command::new(common::callvault_bin())
        .args(["account", "show", "2001", "--config"])
        .arg(&server.config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_store_removes_media_metadata_and_quota() {
    let server = server(ServerConfig::new());
    let a = server.http_addr();
    let data: PathBuf = server.dir.path().join("data");
    let db = Db::open(&format!("sqlite://{}", data.join("callvault.db").display()))
        .await
        .unwrap();
    let stores = Stores::new(db);

    // A complete store of 1002 (receiver and owner), 1001 the sender: 10 records of 160 B.
    let s = stores
        .create(
            NewStore {
                kind: StoreKind::InCall,
                sender: "sip:1001@example.com".into(),
                receiver: "sip:1002@example.com".into(),
                owner: Some("1002".into()),
                call_id: Some("ops-call".into()),
                threshold: Threshold::Percent(30),
                ttl: Duration::from_secs(300),
            },
            SystemTime::now(),
        )
        .await
        .unwrap();
    let s = stores
        .start_session(
            &s.id,
            &StartSession {
                caller: "sip:1001@example.com",
                format: "PCMU/8000",
                payload_type: 0,
                declared_bytes: Some(1600),
                reserve_bytes: 1600,
                threshold_bytes: Some(0),
            },
            SystemTime::now(),
        )
        .await
        .unwrap();
    let dir = store_dir(&data, &s.id).unwrap();
    let mut w = SegmentWriter::create(&dir, SegmentOptions::default()).unwrap();
    for i in 0..10u32 {
        let h = RecordHeader {
            arrival_us: 1_790_000_000_000_000 + u64::from(i) * 20_000,
            seq: i as u16,
            timestamp: 160 * i,
            ssrc: 7,
            payload_type: 0,
            marker: i == 0,
        };
        w.append(&h, &[0x55; 160]).unwrap();
    }
    let st = w.finish().unwrap();
    stores
        .finish(
            &s.id,
            StoreState::Complete,
            st.payload_bytes,
            SystemTime::now(),
        )
        .await
        .unwrap();
    let used = |r: Resp| r.json()["used_bytes"].as_u64().unwrap();
    let acct = get(a, "/v1/accounts/1002", &[("Authorization", &bearer())]).await;
    assert_eq!(used(acct), 1600);

    let p = format!("/v1/stores/{}", s.id);
    assert_eq!(send(a, "DELETE", &p, None, "").await.status, 401);
    let r = send(a, "DELETE", &p, Some(&basic("1001", "pw1")), "").await;
    assert_eq!(r.status, 403, "the sender may not delete");
    assert_eq!(
        send(a, "DELETE", &p, Some(&basic("1003", "pw3")), "")
            .await
            .status,
        403
    );
    let r = send(a, "DELETE", &p, Some(&basic("1002", "pw2")), "").await;
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(!dir.exists(), "media removed");
    assert_eq!(
        get(a, &p, &[("Authorization", &bearer())]).await.status,
        404
    );
    let acct = get(a, "/v1/accounts/1002", &[("Authorization", &bearer())]).await;
    assert_eq!(used(acct), 0, "quota released");
    assert_eq!(send(a, "DELETE", &p, Some(&bearer()), "").await.status, 404);
    let r = send(a, "DELETE", "/v1/stores/st_nonsense", Some(&bearer()), "").await;
    assert_eq!(r.status, 404);
}

/// A store receiving an upload over 2 s: `store` events come at least every 500 ms (plus
/// slack for a loaded machine) with growing `received_bytes`, then one with the final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_report_store_progress_while_it_receives() {
    use tokio::io::AsyncWriteExt;
    let server = server(ServerConfig::new());
    let a = server.http_addr();
    let data: PathBuf = server.dir.path().join("data");
    let db = Db::open(&format!("sqlite://{}", data.join("callvault.db").display()))
        .await
        .unwrap();
    let stores = Stores::new(db);
    let s = stores
        .create(
            NewStore {
                kind: StoreKind::InCall,
                sender: "sip:1001@example.com".into(),
                receiver: "sip:1002@example.com".into(),
                owner: Some("1002".into()),
                call_id: Some("ops-upload".into()),
                threshold: Threshold::Percent(30),
                ttl: Duration::from_secs(300),
            },
            SystemTime::now(),
        )
        .await
        .unwrap();
    let mut ev = events(a, &bearer()).await;

    // 40 KB in 2 KB pieces, one every 100 ms.
    const TOTAL: usize = 40_000;
    let mut up = tokio::net::TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT /v1/stores/{}/data?token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {TOTAL}\r\n\r\n",
        s.id,
        callvault::http::upload_token(&s)
    );
    up.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..TOTAL / 2000 {
            up.write_all(&[0x42; 2000]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        up
    });

    let id = s.id.clone();
    let mine = |v: &Value| v["store_id"] == id.as_str();
    let mut progress: Vec<(Instant, u64)> = Vec::new();
    let last = loop {
        let (t, _, v) = next_event(&mut ev, "store", mine).await;
        assert_eq!(v["declared_bytes"], json!(TOTAL));
        assert!(
            v.get("threshold_bytes").is_some() && v["ready"].is_boolean(),
            "{v}"
        );
        if v["state"] != "receiving" {
            break v;
        }
        progress.push((t, v["received_bytes"].as_u64().unwrap()));
    };
    let _ = writer.await.unwrap();
    assert_eq!(last["state"], "complete", "{last}");
    assert_eq!(last["received_bytes"], json!(TOTAL));
    assert_eq!(last["ready"], true);
    assert!(progress.len() >= 4, "{progress:?}");
    assert!(
        progress.windows(2).all(|w| w[1].1 >= w[0].1),
        "{progress:?}"
    );
    let distinct: std::collections::BTreeSet<u64> = progress.iter().map(|p| p.1).collect();
    assert!(distinct.len() >= 3, "the bar must move: {progress:?}");
    let gap = progress.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap();
    assert!(gap <= Duration::from_millis(700), "largest gap {gap:?}");
}

/// `DELETE /v1/stores/{id}` on a store still receiving over SIP (SIPp's store session): the
/// session is ended first (BYE to the sender), then the store is gone with its media and the
/// quota it reserved or used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_receiving_store_ends_its_session_first() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(20);
    let mut cfg = ServerConfig::new();
    cfg.route_to = Some((ports.port(1), common::Transport::Udp));
    let mut server = Server::prepare(cfg);
    let toml = std::fs::read_to_string(&server.config_path).unwrap();
    let toml = toml.replacen(
        "[http]\n",
        &format!("[http]\nadmin_token = \"{ADMIN}\"\n"),
        1,
    );
    std::fs::write(&server.config_path, toml).unwrap();
    server.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
    server.account_add("1001", "secret", "4321", "50MiB");
    server.account_add("1002", "secret", "4321", "50MiB");
    server.start();
    let a_http = server.http_addr();
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("store_id");
    let play_file = files.path().join("play_uri");
    let b = Sipp::uas("storage_callee")
        .port(ports.port(1))
        .media_port(ports.port(8))
        .timeout(Duration::from_secs(40))
        .arg("-key")
        .arg("play_file")
        .arg(&play_file.display().to_string())
        .spawn();
    let a = Sipp::uac("storage_caller", server.sip_addr())
        .port(ports.port(0))
        .media_port(ports.port(4))
        .service("1002")
        .timeout(Duration::from_secs(40))
        .arg("-key")
        .arg("store_file")
        .arg(&store_file.display().to_string())
        .spawn();
    let sf = store_file.clone();
    let store_id =
        tokio::task::spawn_blocking(move || common::wait_file(&sf, Duration::from_secs(15)))
            .await
            .unwrap()
            .expect("a prompt reached A");
    let store = Sipp::uac("storage_store", server.sip_addr())
        .port(ports.port(2))
        .media_port(ports.port(12))
        .service(&store_id)
        .timeout(Duration::from_secs(40))
        .spawn();
    let p = format!("/v1/stores/{store_id}");
    // Wait until it receives, with some bytes in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(a_http, &p, &[("Authorization", &bearer())]).await;
        let v = r.json();
        if v["state"] == "receiving" && v["received_bytes"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = send(a_http, "DELETE", &p, Some(&bearer()), "").await;
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        get(a_http, &p, &[("Authorization", &bearer())])
            .await
            .status,
        404
    );
    let data = server.dir.path().join("data");
    assert!(
        !store_dir(&data, &store_id).unwrap().exists(),
        "media removed"
    );
    let acct = get(a_http, "/v1/accounts/1002", &[("Authorization", &bearer())]).await;
    let acct = acct.json();
    assert_eq!(
        (acct["used_bytes"].as_u64(), acct["reserved_bytes"].as_u64()),
        (Some(0), Some(0)),
        "{acct}"
    );
    // The sender's store session got callvault's BYE (its scenario expected to hang up itself).
    let store = tokio::task::spawn_blocking(move || store.wait())
        .await
        .unwrap();
    assert!(
        store.messages.contains("BYE sip:") && store.messages.contains("ended-by-operator"),
        "{}",
        store.messages
    );
    drop((a, b));
}

/// `[store] retention_days`: a finished store older than that is deleted when the server
/// starts (and hourly after), media and quota included; a recent one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_finished_stores() {
    let mut cfg = ServerConfig::new();
    cfg.extra = "[store]\nretention_days = 2\n".into();
    let mut server = Server::prepare(cfg);
    let toml = std::fs::read_to_string(&server.config_path).unwrap();
    let toml = toml.replacen(
        "[http]\n",
        &format!("[http]\nadmin_token = \"{ADMIN}\"\n"),
        1,
    );
    std::fs::write(&server.config_path, toml).unwrap();
    server.account_add("1002", "pw2", "2222", "1000000");
    let data: PathBuf = server.dir.path().join("data");
    let db = Db::open(&format!("sqlite://{}", data.join("callvault.db").display()))
        .await
        .unwrap();
    let stores = Stores::new(db);
    let mut ids = Vec::new();
    for age_days in [3u64, 1] {
        let then = SystemTime::now() - Duration::from_secs(age_days * 86_400);
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
                then,
            )
            .await
            .unwrap();
        let s = stores
            .start_session(
                &s.id,
                &StartSession {
                    caller: "sip:1001@example.com",
                    format: "PCMU/8000",
                    payload_type: 0,
                    declared_bytes: Some(500),
                    reserve_bytes: 500,
                    threshold_bytes: Some(0),
                },
                then,
            )
            .await
            .unwrap();
        let mut w =
            SegmentWriter::create(&store_dir(&data, &s.id).unwrap(), SegmentOptions::default())
                .unwrap();
        let h = RecordHeader {
            arrival_us: 1,
            seq: 1,
            timestamp: 0,
            ssrc: 1,
            payload_type: 0,
            marker: true,
        };
        w.append(&h, &[0x55; 500]).unwrap();
        let st = w.finish().unwrap();
        stores
            .finish(&s.id, StoreState::Complete, st.payload_bytes, then)
            .await
            .unwrap();
        ids.push(s.id);
    }
    server.start();
    let a = server.http_addr();
    let (old, recent) = (&ids[0], &ids[1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(
        a,
        &format!("/v1/stores/{old}"),
        &[("Authorization", &bearer())],
    )
    .await
    .status
        != 404
    {
        assert!(Instant::now() < deadline, "the old store is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The metadata goes first, the media right after it.
    while store_dir(&data, old).unwrap().exists() {
        assert!(
            Instant::now() < deadline,
            "the old store's media is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(
        a,
        &format!("/v1/stores/{recent}"),
        &[("Authorization", &bearer())],
    )
    .await;
    assert_eq!(r.status, 200, "the recent store stays");
    let acct = get(a, "/v1/accounts/1002", &[("Authorization", &bearer())]).await;
    assert_eq!(
        acct.json()["used_bytes"],
        500,
        "only the recent store's bytes remain"
    );
}
