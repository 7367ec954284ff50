//! Two `callvault serve` nodes on one PostgreSQL (PROTOCOL.md 6), real processes on loopback:
//! the second node (no SQLite, no local setup) sees the first's accounts and stores and takes
//! a store session for an id the first issued; a phone registered on node 1 with a Path is
//! reached from node 2 through that Path; `kill -9` of node 1 mid-store makes node 2 finish
//! the store `truncated` with what was committed and settle the quota, within
//! `lease_secs` + 5 s. Objects are the local `data_dir`, shared by both nodes here (the S3
//! backend is another branch's). PostgreSQL comes from `tests/common/pg.rs`.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use callvault::sip::dialog::Dialog;
use callvault::sip::message::{Method, Request};
use callvault::storage::db::Db;
use callvault::storage::stores::{Store, Stores};
use callvault::storage::Accounts;
use common::pg::PgDb;
use common::{fetch_metrics, metric_value, Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, Ua, PCMU};

/// A node on `db`, objects in `data` (None: its own temp dir), lease `lease` seconds.
fn node(db: &PgDb, data: Option<&Path>, lease: u64) -> Server {
    let mut cfg = ServerConfig::new().on_postgres(db);
    cfg.data_dir = data.map(Path::to_path_buf);
    cfg.extra = format!("[cluster]\nlease_secs = {lease}\n");
    Server::prepare(cfg)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn store(url: &str, id: &str) -> Store {
    block_on(async {
        let db = Db::open(url).await.unwrap();
        let st = Stores::new(db.clone()).get(id).await.unwrap().unwrap();
        db.close().await;
        st
    })
}

fn store_node(url: &str, id: &str) -> Option<String> {
    block_on(async {
        let db = Db::open(url).await.unwrap();
        let n = Stores::new(db.clone()).node_of(id).await.unwrap();
        db.close().await;
        n
    })
}

fn usage(url: &str, user: &str) -> (u64, u64) {
    block_on(async {
        let db = Db::open(url).await.unwrap();
        let a = Accounts::new(db.clone(), "example.com")
            .require(user)
            .await
            .unwrap();
        db.close().await;
        (a.used_bytes, a.reserved_bytes)
    })
}

/// `GET path` with HTTP Basic as `user`; status and JSON.
fn get_json(addr: SocketAddr, path: &str, user: &str, pw: &str) -> (u16, Value) {
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: {}\r\n\r\n",
        common::http::basic(user, pw)
    );
    let r = common::http::send_raw_blocking(addr, raw.as_bytes());
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// B's store request in the call, accepted; the prompt A got.
fn prompt(c: &mut Call) -> Value {
    c.ask_for_storage(r#"{"pin":"4321"}"#)
}

/// A's store session INVITE to `uri` at `at` (any node), declaring `size`; where RTP goes.
fn open_session(
    a: &mut Ua,
    at: SocketAddr,
    uri: &str,
    size: u64,
    rtp: &Rtp,
) -> (SocketAddr, Dialog) {
    let size = size.to_string();
    let inv = a.invite_request(
        uri,
        &[("Callvault-Data-Size", size.as_str())],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let home = a.server;
    a.server = at;
    let (r, d) = a.invite(&inv);
    a.server = home;
    assert_eq!(r.status, 200, "store session at {at}: {r:?}");
    (sdp_audio(&r.body).0, d.expect("dialog"))
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn nodes_alive(s: &Server) -> f64 {
    let m = fetch_metrics(s.http_addr()).unwrap_or_default();
    metric_value(&m, "callvault_cluster_nodes_alive", &[]).unwrap_or(-1.0)
}

#[test]
fn nodes_starting_together_on_an_empty_database_both_come_up() {
    let Some(db) = PgDb::fresh() else { return };
    let mut n1 = node(&db, None, 10);
    let mut n2 = node(&db, None, 10);
    // Both migrate the empty database at the same moment; the advisory lock serialises them.
    std::thread::scope(|s| {
        s.spawn(|| n1.start());
        s.spawn(|| n2.start());
    });
    let out = db.server.psql(
        db.url.rsplit('/').next().unwrap(),
        "SELECT COUNT(*) FROM _sqlx_migrations",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let applied: usize = text
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .expect("a count");
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert_eq!(applied, files, "each migration once: {text}");
    wait_until("both leases", Duration::from_secs(5), || {
        (nodes_alive(&n1) == 2.0 && nodes_alive(&n2) == 2.0).then_some(())
    });
}

#[test]
fn second_node_shares_accounts_stores_and_store_ids() {
    let Some(db) = PgDb::fresh() else { return };
    let mut n1 = node(&db, None, 10);
    n1.account_add("1001", "secret", "4321", "50MiB");
    n1.account_add("1002", "secret", "4321", "50MiB");
    n1.start();
    // Node 2: nothing set up locally, same database.
    let mut n2 = node(&db, None, 10);
    n2.start();
    assert!(
        !n2.dir.path().join("data/callvault.db").exists(),
        "no SQLite"
    );
    let (st, acc) = get_json(n2.http_addr(), "/v1/accounts/1002", "1002", "secret");
    assert_eq!(st, 200, "{acc}");
    assert_eq!(acc["quota_bytes"], 50 * 1024 * 1024);
    wait_until("both leases", Duration::from_secs(5), || {
        (nodes_alive(&n2) == 2.0 && nodes_alive(&n1) == 2.0).then_some(())
    });

    // Node 1 issues the store id in its call; the store session goes to node 2.
    let mut c = Call::establish(n1.sip_addr(), "1001", "1002");
    let p = prompt(&mut c);
    let id = p["store_id"].as_str().unwrap().to_string();
    assert!(p["store_uri"]
        .as_str()
        .unwrap()
        .contains(&n1.sip_addr().port().to_string()));
    let rtp = Rtp::bind();
    let uri = format!("sip:{id}@{}", n2.sip_addr());
    let (to, mut d) = open_session(&mut c.a, n2.sip_addr(), &uri, 50 * 160, &rtp);
    for i in 0..50u32 {
        rtp.send(to, 0, i == 0, i as u16, 160 * i, 7, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.a.bye(&mut d).status, 200);
    let url = db.url.clone();
    let done = wait_until("store complete", Duration::from_secs(10), || {
        let s = store(&url, &id);
        (s.state.as_str() == "complete").then_some(s)
    });
    assert_eq!(done.received_bytes, 50 * 160);
    let owner = store_node(&url, &id).unwrap();
    assert!(
        owner.ends_with(&format!(":{}", n2.sip_addr().port())),
        "received on node 2: {owner}"
    );
    assert_eq!(usage(&url, "1002"), (8000, 0));
    // Listings are cluster-wide: both nodes list it.
    for n in [&n1, &n2] {
        let (st, list) = get_json(n.http_addr(), "/v1/stores", "1002", "secret");
        assert_eq!(st, 200);
        let text = list.to_string();
        assert!(text.contains(&id), "{text}");
    }
}

/// An out-of-dialog MESSAGE from `a` to `sip:{to}@example.com`, sent to `at`.
fn message(a: &mut Ua, at: SocketAddr, to: &str, text: &str) -> u16 {
    let ruri = format!("sip:{to}@example.com");
    let mut req = Request::new(Method::Message, ruri.clone());
    let via = a.new_via();
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    req.headers.push("Via", via.to_string());
    req.headers.push("Max-Forwards", "70");
    req.headers.push("From", format!("<{}>;tag=t{n}", a.aor()));
    req.headers.push("To", format!("<{ruri}>"));
    req.headers.push("Call-ID", format!("m{n}@test"));
    req.headers.push("CSeq", "1 MESSAGE");
    req.headers.push("Content-Type", "text/plain");
    req.body = Bytes::from(text.to_string());
    a.transact_to(&req, at).status
}

#[test]
fn registration_on_node_1_reaches_the_phone_from_node_2_via_its_path() {
    let Some(db) = PgDb::fresh() else { return };
    let mut n1 = node(&db, None, 10);
    n1.account_add("1001", "secret", "4321", "1MiB");
    n1.account_add("1002", "secret", "4321", "1MiB");
    n1.start();
    let mut n2 = node(&db, None, 10);
    n2.start();
    // The "front proxy": a socket the Path names. The phone registers through it on node 1.
    let mut proxy = Ua::new("proxy", "example.com", n1.sip_addr());
    let path = format!("<sip:{};lr>", proxy.addr);
    let mut phone = Ua::new("1002", "example.com", n1.sip_addr());
    phone.register_with(&[("Path", path.as_str())]);
    // Node 2 sends the phone a MESSAGE: it goes to the Path's first hop, with the Path as
    // the Route and the phone's contact as the Request-URI.
    let mut a = Ua::new("1001", "example.com", n2.sip_addr());
    let status = std::thread::scope(|s| {
        let sender = s.spawn(|| {
            // The binding reaches the table a moment after the 200.
            wait_until("delivery via node 2", Duration::from_secs(5), || {
                let st = message(&mut a, n2.sip_addr(), "1002", "hello from node 2");
                (st == 200).then_some(st)
            })
        });
        let got = proxy.expect_request(Method::Message, None, Duration::from_secs(6));
        assert_eq!(got.uri, phone.contact().uri.to_string(), "to the contact");
        let route = got.headers.get("Route").unwrap_or_default().to_string();
        assert!(route.contains(&proxy.addr.to_string()), "Route {route}");
        assert_eq!(&got.body[..], b"hello from node 2");
        proxy.respond(&got, 200, &[], b"");
        sender.join().unwrap()
    });
    assert_eq!(status, 200);
    // The registration listing is cluster-wide: node 2 lists the binding node 1 took.
    let (st, list) = get_json(n2.http_addr(), "/v1/registrations", "1002", "secret");
    assert_eq!(st, 200, "{list}");
    let list = list.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0]["contact"]
        .as_str()
        .unwrap_or_default()
        .contains(&phone.addr.port().to_string()));
}

#[test]
fn killed_node_stores_are_truncated_and_settled_by_a_survivor() {
    let Some(db) = PgDb::fresh() else { return };
    let data = tempfile::tempdir().unwrap();
    let lease = 2;
    let mut n1 = node(&db, Some(data.path()), lease);
    n1.account_add("1001", "secret", "4321", "50MiB");
    n1.account_add("1002", "secret", "4321", "50MiB");
    n1.start();
    let mut n2 = node(&db, Some(data.path()), lease);
    n2.start();
    wait_until("both leases", Duration::from_secs(5), || {
        (nodes_alive(&n2) == 2.0).then_some(())
    });
    let mut c = Call::establish(n1.sip_addr(), "1001", "1002");
    let p = prompt(&mut c);
    let id = p["store_id"].as_str().unwrap().to_string();
    let rtp = Rtp::bind();
    let declared = 500 * 160;
    let uri = p["store_uri"].as_str().unwrap().to_string();
    let (to, _d) = open_session(&mut c.a, n1.sip_addr(), &uri, declared, &rtp);
    let url = db.url.clone();
    assert_eq!(usage(&url, "1002"), (0, declared));
    let start = Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        rtp.send(to, 0, sent == 0, sent as u16, 160 * sent, 9, &payload(sent));
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    n1.kill_hard();
    let killed = Instant::now();
    let st = wait_until("takeover", Duration::from_secs(lease + 5), || {
        let s = store(&url, &id);
        (s.state.as_str() != "receiving").then_some(s)
    });
    let took = killed.elapsed();
    assert_eq!(st.state.as_str(), "truncated", "{st:?}");
    assert!(took <= Duration::from_secs(lease + 5), "took {took:?}");
    // What was committed stays: at most ~2 s short of what was sent, never more.
    assert!(st.received_bytes <= u64::from(sent) * 160);
    assert!(
        st.received_bytes + 2 * 50 * 160 >= u64::from(sent) * 160,
        "{} of {} bytes kept",
        st.received_bytes,
        sent * 160
    );
    // The kept media is a prefix of what was sent.
    let dir = data.path().join("stores").join(&id);
    let recs = block_on(async move {
        let mut r = callvault::storage::segments::SegmentReader::open(&dir, 0, None);
        let mut out = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            out.push(rec.payload.to_vec());
        }
        out
    });
    assert_eq!(recs.len() as u64 * 160, st.received_bytes);
    for (k, pl) in recs.iter().enumerate() {
        assert_eq!(*pl, payload(k as u32), "record {k}");
    }
    // Quota settled: the reservation gone, the kept bytes used.
    assert_eq!(usage(&url, "1002"), (st.received_bytes, 0));
    assert_eq!(
        store_node(&url, &id)
            .as_deref()
            .map(|n| n.ends_with(&format!(":{}", n1.sip_addr().port()))),
        Some(true)
    );
    wait_until("node 2 counts itself alone", Duration::from_secs(3), || {
        (nodes_alive(&n2) == 1.0).then_some(())
    });
    assert!(n2.log().contains("taking over"), "{}", n2.log());
    eprintln!(
        "takeover after {took:?}: kept {} of {} bytes",
        st.received_bytes,
        sent * 160
    );
}
