//! Metadata on a real PostgreSQL (a throwaway server from `tests/common/pg.rs`), with two
//! pools standing for two nodes: concurrent migrations, quota reservations that never
//! overdraw, the takeover claim, registrations with their Path, shared secrets. Skipped
//! (SKIPPED line) without PostgreSQL unless `CALLVAULT_REQUIRE_TOOLS=1`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;

use super::accounts::Accounts;
use super::db::{Backend, Db};
use super::lease::Dead;
use super::nodes::{shared_secret, NodeInfo, Nodes};
use super::pg_rig::PgDb;
use super::registrations::{RegistrationRow, Registrations};
use super::segments::{RecordHeader, SegmentOptions, SegmentWriter};
use super::stores::{store_dir, NewStore, StartSession, StoreKind, StoreState, Stores};
use super::threshold::Threshold;

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_795_000_000 + secs)
}

fn cheap(db: Db) -> Accounts {
    Accounts::new(db, "example.com")
        .with_argon2_params(argon2::Params::new(256, 1, 1, None).unwrap())
}

fn new_in_call(owner: &str) -> NewStore {
    NewStore {
        kind: StoreKind::InCall,
        sender: "1001@example.com".into(),
        receiver: format!("{owner}@example.com"),
        owner: Some(owner.into()),
        call_id: None,
        threshold: Threshold::Percent(30),
        ttl: Duration::from_secs(600),
    }
}

fn start(reserve: u64) -> StartSession<'static> {
    StartSession {
        caller: "1001@example.com",
        format: "PCMU/8000",
        payload_type: 0,
        declared_bytes: Some(reserve),
        reserve_bytes: reserve,
        threshold_bytes: None,
    }
}

async fn usage(accounts: &Accounts, user: &str) -> (u64, u64) {
    let a = accounts.require(user).await.unwrap();
    (a.used_bytes, a.reserved_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_under_concurrent_starts() {
    let Some(pg) = PgDb::fresh() else { return };
    // Two "nodes" open the empty database at the same moment, twice over.
    for round in 0..2 {
        let (a, b) = tokio::join!(Db::open(&pg.url), Db::open(&pg.url));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.backend(), Backend::Postgres);
        let rows = sqlx::query("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(a.pool())
            .await
            .unwrap();
        let versions: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>("version")).collect();
        assert_eq!(
            versions,
            (1..=10).collect::<Vec<i64>>(),
            "round {round}: each once"
        );
        // The schema is there and usable from the other pool.
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM nodes")
            .fetch_one(b.pool())
            .await
            .unwrap()
            .get("n");
        assert_eq!(n, 0);
        a.close().await;
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_from_two_nodes_never_overdraw_a_quota() {
    let Some(pg) = PgDb::fresh() else { return };
    let node1 = Db::open(&pg.url).await.unwrap();
    let node2 = Db::open(&pg.url).await.unwrap();
    let accounts = cheap(node1.clone());
    accounts.add("1002", "pw", "1", 1000).await.unwrap();
    let s1 = Stores::new(node1.clone()).with_node("n1");
    let s2 = Stores::new(node2.clone()).with_node("n2");
    // Ten store sessions of 300 bytes, issued on either node, started at once on both:
    // exactly three fit in 1000.
    let mut ids = Vec::new();
    for i in 0..10 {
        let issuer = if i % 2 == 0 { &s1 } else { &s2 };
        ids.push(issuer.create(new_in_call("1002"), t(0)).await.unwrap().id);
    }
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        // Each session starts on the other node than the one that issued its id.
        let st = if i % 2 == 0 { s2.clone() } else { s1.clone() };
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            st.start_session(&id, &start(300), t(1)).await
        }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(super::stores::StoreError::QuotaExceeded { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(usage(&accounts, "1002").await, (0, 900));
    // Plain reservations race the same way from both pools.
    let a2 = cheap(node2.clone());
    let mut tasks = Vec::new();
    for i in 0..10 {
        let acc = if i % 2 == 0 {
            accounts.clone()
        } else {
            a2.clone()
        };
        tasks.push(tokio::spawn(async move { acc.reserve("1002", 30).await }));
    }
    let mut granted = 0;
    for task in tasks {
        granted += usize::from(task.await.unwrap().unwrap());
    }
    assert_eq!(granted, 3, "100 bytes left: three of 30");
    let a = accounts.require("1002").await.unwrap();
    assert!(a.used_bytes + a.reserved_bytes <= a.quota_bytes);
    assert_eq!(a.reserved_bytes, 990);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_survivor_claims_a_dead_node_and_settles_its_stores() {
    let Some(pg) = PgDb::fresh() else { return };
    let data = tempfile::tempdir().unwrap();
    let db1 = Db::open(&pg.url).await.unwrap();
    let db2 = Db::open(&pg.url).await.unwrap();
    let db3 = Db::open(&pg.url).await.unwrap();
    let accounts = cheap(db1.clone());
    accounts.add("1002", "pw", "1", 100_000).await.unwrap();
    let dead_node = NodeInfo {
        node_id: "n1".into(),
        http_advertise: "http://127.0.0.1:1".into(),
        lease: Duration::from_secs(3),
        started_at: t(0),
    };
    Nodes::new(db1.clone())
        .renew(&dead_node, t(0))
        .await
        .unwrap();
    // n1 receives a store and commits 25 records of 160 bytes, then dies.
    let s1 = Stores::new(db1.clone()).with_node("n1");
    let s = s1.create(new_in_call("1002"), t(0)).await.unwrap();
    s1.start_session(&s.id, &start(16_000), t(1)).await.unwrap();
    let mut w = SegmentWriter::create(
        &store_dir(data.path(), &s.id).unwrap(),
        SegmentOptions::default(),
    )
    .unwrap();
    for i in 0..25u32 {
        let h = RecordHeader {
            arrival_us: u64::from(i) * 20_000,
            seq: i as u16,
            timestamp: i * 160,
            ssrc: 1,
            payload_type: 0,
            marker: false,
        };
        w.append(&h, &[0x55; 160]).unwrap();
    }
    w.commit().unwrap();
    drop(w);
    assert_eq!(usage(&accounts, "1002").await, (0, 16_000));
    // Registrations: one through the proxy (Path), one straight from the phone.
    let regs = Registrations::new(db1.clone());
    let row = |uri: &str, path: Vec<String>| RegistrationRow {
        aor: "1002@example.com".into(),
        contact_uri: uri.into(),
        contact: format!("<{uri}>"),
        path,
        transport: "udp".into(),
        source: "127.0.0.1:5090".into(),
        q: 1000,
        call_id: "c".into(),
        cseq: 1,
        user_agent: None,
        node: "n1".into(),
        expires_at: SystemTime::now() + Duration::from_secs(600),
    };
    regs.upsert(
        &[
            row("sip:a@10.0.0.1", vec!["<sip:127.0.0.1:5070;lr>".into()]),
            row("sip:b@10.0.0.2", Vec::new()),
        ],
        SystemTime::now(),
    )
    .await
    .unwrap();

    // Two survivors race for the claim: exactly one wins.
    let dead = Dead {
        node_id: "n1".into(),
        renewals: 1,
    };
    let (n2, n3) = (Nodes::new(db2.clone()), Nodes::new(db3.clone()));
    let (c2, c3) = tokio::join!(n2.claim(&dead, "n2", t(20)), n3.claim(&dead, "n3", t(20)));
    assert!(c2.unwrap() ^ c3.unwrap(), "exactly one claim wins");
    // A stale view (n1 renewed since) cannot claim.
    let stale = Dead {
        node_id: "n1".into(),
        renewals: 0,
    };
    assert!(!n2.claim(&stale, "n2", t(20)).await.unwrap());

    let s2 = Stores::new(db2.clone()).with_node("n2");
    assert_eq!(s2.receiving_on("n1").await.unwrap(), vec![s.id.clone()]);
    let got = s2.take_over(data.path(), &s.id, t(21)).await.unwrap();
    assert_eq!(
        (got.state, got.received_bytes),
        (StoreState::Truncated, 4000)
    );
    assert_eq!(usage(&accounts, "1002").await, (4000, 0), "quota settled");
    // Only once: a second taker finds it finished and changes nothing.
    assert!(s2.take_over(data.path(), &s.id, t(22)).await.is_err());
    assert_eq!(usage(&accounts, "1002").await, (4000, 0));
    // A share upload n1 had in flight: its reservation comes back, once.
    assert!(accounts.reserve("1002", 500).await.unwrap());
    sqlx::query(
        "INSERT INTO share_uploads (id, owner, reserved, started_at, node) \
         VALUES ('u1', '1002', 500, 0, 'n1')",
    )
    .execute(db1.pool())
    .await
    .unwrap();
    assert_eq!(n2.release_share_uploads("n1").await.unwrap(), 1);
    assert_eq!(n3.release_share_uploads("n1").await.unwrap(), 0);
    assert_eq!(usage(&accounts, "1002").await, (4000, 0));
    assert_eq!(n2.drop_unreachable_registrations("n1").await.unwrap(), 1);
    let left = Registrations::new(db3.clone())
        .lookup("1002@example.com", Some("n3"), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].path, ["<sip:127.0.0.1:5070;lr>"]);
    // n1 restarts: its renewal clears the takeover mark.
    Nodes::new(db1.clone())
        .renew(&dead_node, t(30))
        .await
        .unwrap();
    assert_eq!(n2.taken_over_by("n1").await.unwrap(), None);
    let leases = n3.leases().await.unwrap();
    assert_eq!((leases[0].renewals, leases[0].taken_over), (2, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_secrets_are_shared() {
    let Some(pg) = PgDb::fresh() else { return };
    let db1 = Db::open(&pg.url).await.unwrap();
    let db2 = Db::open(&pg.url).await.unwrap();
    let (k1, k2) = tokio::join!(
        shared_secret(&db1, "sip-nonce"),
        shared_secret(&db2, "sip-nonce")
    );
    assert_eq!(k1.unwrap(), k2.unwrap(), "one key for every node");
    let r1 = Registrations::new(db1);
    let r2 = Registrations::new(db2);
    let now = SystemTime::now();
    let row = RegistrationRow {
        aor: "1001@example.com".into(),
        contact_uri: "sip:1001@10.0.0.5".into(),
        contact: "<sip:1001@10.0.0.5>;+sip.instance=\"<urn:x>\"".into(),
        path: vec!["<sip:edge2;lr>".into(), "<sip:edge1;lr;ob>".into()],
        transport: "tcp".into(),
        source: "127.0.0.1:5070".into(),
        q: 500,
        call_id: "abc".into(),
        cseq: 7,
        user_agent: Some("phone".into()),
        node: "n1".into(),
        expires_at: UNIX_EPOCH
            + Duration::from_millis(
                u64::try_from(now.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
                    + 60_000,
            ),
    };
    r1.upsert(std::slice::from_ref(&row), now).await.unwrap();
    let seen = r2
        .lookup("1001@example.com", Some("n2"), now)
        .await
        .unwrap();
    assert_eq!(seen, vec![row.clone()]);
    // Its own node does not read it back as remote; expired rows are not live.
    assert!(r1
        .lookup("1001@example.com", Some("n1"), now)
        .await
        .unwrap()
        .is_empty());
    let later = now + Duration::from_secs(120);
    assert!(r2
        .lookup("1001@example.com", None, later)
        .await
        .unwrap()
        .is_empty());
    // A refresh from node 2 replaces the row; removal by contact and `*` work from anywhere.
    let mut moved = row.clone();
    moved.node = "n2".into();
    moved.cseq = 8;
    r2.upsert(std::slice::from_ref(&moved), now).await.unwrap();
    assert_eq!(r1.list(now).await.unwrap(), [moved]);
    r1.remove("1001@example.com", &["sip:1001@10.0.0.5".into()])
        .await
        .unwrap();
    assert!(r2.list(now).await.unwrap().is_empty());
    r1.upsert(std::slice::from_ref(&row), now).await.unwrap();
    r2.remove_aor("1001@example.com").await.unwrap();
    assert!(r1.list(now).await.unwrap().is_empty());
}
