//! Two callvault nodes on shared engines behind the cluster front (PROTOCOL.md section 6,
//! issue 11), all real processes on 127.0.0.1: Debian's PostgreSQL 15 in a temp dir
//! (tests/common/pg.rs), s3s-fs serving the bucket (tests/common/s3.rs), Kamailio 5.6 on the
//! repository's `config/kamailio/kamailio.cfg` with both nodes in its dispatcher list
//! (tests/common/kamailio.rs), and two `callvault serve` processes with their own SIP, HTTP,
//! RTP addresses and data dirs.
//!
//! - calls from SIPp through the front reach both nodes;
//! - a phone registered through the front on node 1 is reached by node 2 (INVITE and an
//!   out-of-dialog MESSAGE, by the Path it registered with);
//! - a store received on one node is played (SIP) from the other while it still arrives,
//!   payload equal packet for packet, and downloaded (HTTP, with the ready note's token) from
//!   the other;
//! - 10 concurrent store sessions for one receiver, split over both nodes, never overdraw
//!   the quota;
//! - `kill -9` of the node receiving a store: the other marks it `truncated` within
//!   `lease_secs` + 5 s, the kept media is a prefix of what was sent at most 2 s short, and
//!   the quota is settled.
//!
//! Missing PostgreSQL, s3s-fs, Kamailio or SIPp skips with a SKIPPED line, unless
//! `CALLVAULT_REQUIRE_TOOLS=1` (scripts/test), which makes it a failure.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use callvault::sip::dialog::Dialog;
use callvault::sip::message::{HeaderAccess, Method};
use common::kamailio::Kamailio;
use common::pg::PgDb;
use common::s3::S3sFs;
use common::{metric_sum, tool_available, Server, ServerConfig, Sipp};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Rtp, Ua, PCMU, T};

const READY: &str = "application/vnd.callvault.ready+json";
const BUCKET: &str = "callvault";
const PIN: &str = "4321";

/// The engines, the nodes and the front of one test.
struct Cluster {
    nodes: Vec<Server>,
    front: Kamailio,
    s3: S3sFs,
    _pg: PgDb,
}

fn repo_cfg() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/kamailio/kamailio.cfg")
}

impl Cluster {
    /// `None` (skipped) when an engine is missing and tools are optional. `route_to`: where
    /// both nodes send calls for unregistered users (a SIPp UAS), if anywhere.
    fn start(lease_secs: u32, route_to: Option<u16>) -> Option<Cluster> {
        if !tool_available("sipp") || !tool_available("kamailio") {
            return None;
        }
        let pg = PgDb::fresh()?;
        let s3 = S3sFs::start()?;
        let mut nodes = Vec::new();
        for i in 1..=2 {
            let mut c = ServerConfig::new().on_postgres(&pg);
            c.storage_extra = s3.storage_toml(BUCKET);
            c.route_to = route_to.map(|p| (p, common::Transport::Udp));
            c.extra = format!(
                "[cluster]\nnode_id = \"node{i}\"\nhttp_advertise = \"http://127.0.0.1:{}\"\n\
                 lease_secs = {lease_secs}\n",
                c.http_port()
            );
            nodes.push(Server::prepare(c));
        }
        // Accounts live in the shared database: made once, through node 1's config.
        nodes[0].account_add("1001", "secret", PIN, "10MiB");
        nodes[0].account_add("1002", "secret", PIN, "10MiB");
        for n in &mut nodes {
            // The A-B calls carry no RTP of their own in these tests.
            n.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
            n.start();
        }
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("dispatcher.list");
        let body: String = nodes
            .iter()
            .map(|n| format!("1 sip:{} 0 0\n", n.sip_addr()))
            .collect();
        std::fs::write(&list, body).unwrap();
        let front = Kamailio::start_file(
            &repo_cfg(),
            &[
                format!("DISPATCHER_LIST=\"{}\"", list.display()),
                "PROBE_SECS=0".into(),
            ],
        )?;
        // The list file is read at start; the dir may go.
        drop(dir);
        Some(Cluster {
            nodes,
            front,
            s3,
            _pg: pg,
        })
    }

    fn node_uri(&self, i: usize, user: &str) -> String {
        format!("sip:{user}@{}", self.nodes[i].sip_addr())
    }
}

/// `user` registered through the front, on node `i` (the Request-URI names the node, so the
/// front sends it there and adds its Path).
fn register_on(c: &Cluster, i: usize, user: &str) -> Ua {
    let mut ua = Ua::new(user, "example.com", c.front.addr);
    ua.register_to(&format!("sip:{}", c.nodes[i].sip_addr()), &[]);
    ua
}

/// A (a new UA) calls B through the front with a Request-URI naming node `i`; B answers.
/// Returns (A, A's dialog, B's dialog).
fn call_on(c: &Cluster, i: usize, b: &mut Ua) -> (Ua, Dialog, Dialog) {
    let mut a = Ua::new("1001", "example.com", c.front.addr);
    let (am, bm) = (Rtp::bind(), Rtp::bind());
    let inv = a.invite_request(&c.node_uri(i, "1002"), &[], &sdp(am.port, PCMU, "sendrecv"));
    a.send(&inv);
    let binv = b.expect_request(Method::Invite, None, T);
    let bd = b.accept_invite(&binv, &sdp(bm.port, PCMU, "sendrecv"));
    let (resp, ad) = a.finish_invite(&inv);
    assert_eq!(resp.status, 200, "{resp:?}");
    b.expect_request(Method::Ack, None, T);
    (a, ad.unwrap(), bd)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(body));
    })
}

/// B asks for storage in its call (threshold `threshold_bytes`); A answers the prompt.
fn ask(a: &mut Ua, b: &mut Ua, bd: &mut Dialog, threshold_bytes: u32) -> Value {
    let body = format!(r#"{{"pin":"{PIN}","threshold":{{"bytes":{threshold_bytes}}}}}"#);
    ua::ask_for_storage(a, b, bd, &body)
}

/// The store session INVITE (A, sendonly, declared `size`) to `uri`; the 200's dialog and
/// where to send the RTP, or the refusal.
fn store_session(a: &mut Ua, uri: &str, size: u64, rtp: &Rtp) -> Result<(Dialog, SocketAddr), u16> {
    let size = size.to_string();
    let inv = a.invite_request(
        uri,
        &[("Callvault-Data-Size", size.as_str())],
        &sdp(rtp.port, PCMU, "sendonly"),
    );
    let (resp, d) = a.invite(&inv);
    match d {
        Some(d) if resp.status == 200 => Ok((d, sdp_audio(&resp.body).0)),
        _ => Err(resp.status),
    }
}

/// `uri` with its host:port replaced by node `i`'s SIP address (the same store, another node).
fn on_node(c: &Cluster, uri: &str, i: usize) -> String {
    let (user, _) = uri.split_once('@').expect("user@host");
    format!("{user}@{}", c.nodes[i].sip_addr())
}

fn store_json(c: &Cluster, i: usize, id: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let auth = common::http::basic("1002", "secret");
    let r = rt.block_on(common::http::get(
        c.nodes[i].http_addr(),
        &format!("/v1/stores/{id}"),
        &[("Authorization", auth.as_str())],
    ));
    assert_eq!(r.status, 200, "{}", r.error());
    r.json()
}

fn account(c: &Cluster, i: usize, user: &str) -> Value {
    let out = std::process::Command::new(common::callvault_bin())
        .args(["account", "show", user, "--config"])
        .arg(&c.nodes[i].config_path)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "account show {user}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().find(|l| l.starts_with('{')).expect("JSON")).unwrap()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn calls_through_the_front_reach_both_nodes() {
    let uas_port = common::PortBlock::reserve(1);
    let Some(c) = Cluster::start(10, Some(uas_port.port(0))) else {
        return;
    };
    let uas = Sipp::uas("basic").port(uas_port.port(0)).calls(4).spawn();
    let uac = Sipp::uac("basic", c.front.addr).calls(4).rate(4.0).run();
    uac.assert_successful(4);
    uas.wait().assert_successful(4);
    for (i, n) in c.nodes.iter().enumerate() {
        let m = n.metrics();
        assert!(
            metric_sum(&m, "callvault_calls_total") >= 1.0,
            "node {} took no call:\n{m}",
            i + 1
        );
        assert_eq!(
            common::metric_value(&m, "callvault_cluster_nodes_alive", &[]),
            Some(2.0),
            "{m}"
        );
    }
}

#[test]
fn a_phone_registered_on_node1_is_reached_by_node2_and_a_store_plays_across_nodes() {
    let Some(c) = Cluster::start(10, None) else {
        return;
    };
    // B registers on node 1; A's call lands on node 2, which reaches B by the Path.
    let mut b = register_on(&c, 0, "1002");
    let (mut a, ad, mut bd) = call_on(&c, 1, &mut b);

    // In-call storage on node 2: 150 packets (3 s), threshold after 10.
    let prompt = ask(&mut a, &mut b, &mut bd, 1600);
    let store_uri = prompt["store_uri"].as_str().unwrap().to_string();
    assert!(
        store_uri.ends_with(&c.nodes[1].sip_addr().to_string()),
        "the prompt names the node that sent it: {store_uri}"
    );
    let a_rtp = Rtp::bind();
    let (mut sd, to) = store_session(&mut a, &store_uri, 150 * 160, &a_rtp).expect("store 200");
    let sending = std::thread::spawn(move || {
        for i in 0..150u32 {
            a_rtp.send(to, 0, i == 0, i as u16, 160 * i, 7, &payload(i));
            std::thread::sleep(Duration::from_millis(20));
        }
        (a_rtp, Instant::now())
    });
    let ready = b.expect_request(Method::Message, Some(READY), T);
    b.respond(&ready, 200, &[], b"");
    let ready = json(&ready.body);
    let id = ready["store_id"].as_str().unwrap().to_string();

    // B plays it from node 1 (the play_uri names node 2; any node must serve it) while it
    // still arrives on node 2.
    let play_uri = on_node(&c, ready["play_uri"].as_str().unwrap(), 0);
    let b_rtp = Rtp::bind();
    let inv = b.invite_request(&play_uri, &[], &sdp(b_rtp.port, PCMU, "recvonly"));
    let (resp, pd) = b.invite(&inv);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let mut got = Vec::new();
    let mut first_at = None;
    while got.len() < 150 {
        let p = b_rtp
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("played packet {} from node 1", got.len()));
        first_at.get_or_insert(Instant::now());
        got.push(p.payload);
    }
    let (a_rtp, sent_all_at) = sending.join().unwrap();
    assert!(
        first_at.unwrap() < sent_all_at,
        "the first played packet must come while the store still arrives"
    );
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p, &payload(i as u32), "packet {i} played from node 1");
    }
    assert_eq!(a.bye(&mut sd).status, 200);
    let bye = b.expect_request(Method::Bye, None, T);
    assert_eq!(bye.call_id(), Some(pd.unwrap().id.call_id.as_str()));
    b.respond(&bye, 200, &[], b"");
    drop(a_rtp);

    // Downloaded from node 1 with the ready note's token.
    let url = ready["download_url"].as_str().unwrap();
    let path = &url[url.find("/v1/").unwrap()..];
    let (status, media) = common::http_get_bytes(c.nodes[0].http_addr(), path).unwrap();
    assert_eq!(status, 200);
    let want: Vec<u8> = (0..150).flat_map(payload).collect();
    assert_eq!(media, want, "download from node 1");
    assert_eq!(store_json(&c, 0, &id)["state"], "complete");

    // A second store; B hangs up first, so node 2 sends the ready note out of dialog, to the
    // binding B made on node 1, through the front by its Path.
    let prompt = ask(&mut a, &mut b, &mut bd, 320);
    let a_rtp = Rtp::bind();
    let (mut sd, to) =
        store_session(&mut a, prompt["store_uri"].as_str().unwrap(), 1600, &a_rtp).unwrap();
    assert_eq!(b.bye(&mut bd).status, 200);
    let bye = a.expect_request(Method::Bye, None, T);
    a.respond(&bye, 200, &[], b"");
    for i in 0..10u32 {
        a_rtp.send(to, 0, i == 0, i as u16, 160 * i, 8, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = b.expect_request(Method::Message, Some(READY), T);
    assert!(r.to_tag().is_none(), "out of dialog: {r:?}");
    assert!(
        r.top_via()
            .is_some_and(|v| v.port == Some(c.front.addr.port())),
        "node 2 must reach B through the front (Path): {r:?}"
    );
    b.respond(&r, 200, &[], b"");
    assert_eq!(a.bye(&mut sd).status, 200);
    let _ = ad;
}

#[test]
fn ten_concurrent_store_sessions_over_both_nodes_never_overdraw_the_quota() {
    let Some(c) = Cluster::start(10, None) else {
        return;
    };
    let mut b = register_on(&c, 0, "1002");
    let (mut a, _ad, mut bd) = call_on(&c, 0, &mut b);
    // 10 prompts from node 1; each store declares a quarter of B's 10 MiB quota, so exactly
    // four fit whatever node takes them.
    let uris: Vec<String> = (0..10)
        .map(|_| {
            ask(&mut a, &mut b, &mut bd, 320)["store_uri"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let quarter = 10 * 1024 * 1024 / 4;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let go = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = uris
        .into_iter()
        .enumerate()
        .map(|(k, uri)| {
            let uri = on_node(&c, &uri, k % 2);
            let (front, outcomes, go) = (c.front.addr, outcomes.clone(), go.clone());
            std::thread::spawn(move || {
                let mut a = Ua::new("1001", "example.com", front);
                let rtp = Rtp::bind();
                while !go.load(Ordering::Relaxed) {
                    std::thread::yield_now();
                }
                let r = store_session(&mut a, &uri, quarter, &rtp);
                outcomes
                    .lock()
                    .unwrap()
                    .push((k % 2, r.as_ref().map(|_| ()).map_err(|s| *s)));
                if let Ok((mut d, _)) = r {
                    // Held long enough that every INVITE is decided while it lasts.
                    std::thread::sleep(Duration::from_millis(1500));
                    assert_eq!(a.bye(&mut d).status, 200);
                }
            })
        })
        .collect();
    go.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let accepted = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
    assert_eq!(accepted, 4, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|(_, r)| matches!(r, Ok(()) | Err(403))),
        "refusals must be 403 quota-exceeded: {outcomes:?}"
    );
    // Settled: nothing left reserved (the stores ended with no media).
    let acc = account(&c, 1, "1002");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
}

#[test]
fn kill_9_of_the_receiving_node_leaves_a_truncated_prefix_and_a_settled_quota() {
    let lease = 3;
    let Some(mut c) = Cluster::start(lease, None) else {
        return;
    };
    let mut b = register_on(&c, 1, "1002");
    let (mut a, _ad, mut bd) = call_on(&c, 0, &mut b);
    let prompt = ask(&mut a, &mut b, &mut bd, 320);
    let a_rtp = Rtp::bind();
    let declared = 500 * 160;
    let (_sd, to) = store_session(
        &mut a,
        prompt["store_uri"].as_str().unwrap(),
        declared,
        &a_rtp,
    )
    .unwrap();
    // 3 s of RTP to node 1, then node 1 dies mid-store.
    let sent = 150u32;
    for i in 0..sent {
        a_rtp.send(to, 0, i == 0, i as u16, 160 * i, 9, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready = b.expect_request(Method::Message, Some(READY), T);
    b.respond(&ready, 200, &[], b"");
    let id = json(&ready.body)["store_id"].as_str().unwrap().to_string();
    let killed_at = Instant::now();
    c.nodes[0].kill_hard();

    // Node 2 finishes it within lease_secs + 5 s.
    let deadline = killed_at + Duration::from_secs(lease as u64 + 5);
    let store = loop {
        let s = store_json(&c, 1, &id);
        if s["state"] == "truncated" {
            break s;
        }
        assert!(Instant::now() < deadline, "not taken over in time: {s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("taken over after {:?}", killed_at.elapsed());
    let kept = store["received_bytes"].as_u64().unwrap();
    assert!(kept <= sent as u64 * 160, "{store}");
    assert!(
        kept >= (sent as u64 - 100) * 160,
        "at most 2 s (100 packets) lost: kept {kept} of {}",
        sent * 160
    );
    // The media, read by node 2 from the bucket alone, is a prefix of what was sent.
    let (status, media) = common::http_get_bytes(
        c.nodes[1].http_addr(),
        &format!(
            "/v1/stores/{id}/media?token={}",
            json(&ready.body)["download_url"]
                .as_str()
                .unwrap()
                .split("token=")
                .nth(1)
                .unwrap()
        ),
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(media.len() as u64, kept);
    let want: Vec<u8> = (0..sent).flat_map(payload).collect();
    assert_eq!(
        &media[..],
        &want[..media.len()],
        "a prefix of what was sent"
    );
    // Quota settled: the reservation released, the kept bytes used.
    let acc = account(&c, 1, "1002");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"].as_u64(), Some(kept), "{acc}");
    assert!(!c.s3.keys(BUCKET, "").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Benchmark (bench/run `cluster`, docs/BENCHMARKS.md): `cargo test --release --test cluster
// bench_ -- --ignored --nocapture` prints `BENCH` lines.

/// CPU seconds (user + system) the process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One node on `backend` ("sqlite+file" or "postgres+s3"): store set-ups per second and
/// CPU per stored packet.
fn bench_one_node(backend: &str, pg: Option<&PgDb>, s3: Option<&S3sFs>) {
    let mut cfg = ServerConfig::new();
    if let (Some(pg), Some(s3)) = (pg, s3) {
        cfg = cfg.on_postgres(pg);
        cfg.storage_extra = s3.storage_toml(BUCKET);
        cfg.extra = "[cluster]\nnode_id = \"bench\"\nlease_secs = 10\n".into();
    }
    let mut node = Server::prepare(cfg);
    node.account_add("1001", "secret", PIN, "10GiB");
    node.account_add("1002", "secret", PIN, "10GiB");
    node.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
    node.start();
    let mut b = Ua::new("1002", "example.com", node.sip_addr());
    b.register();
    let (mut a, _ad, mut bd) = {
        let mut a = Ua::new("1001", "example.com", node.sip_addr());
        let (am, bm) = (Rtp::bind(), Rtp::bind());
        let inv = a.invite_request("sip:1002@example.com", &[], &sdp(am.port, PCMU, "sendrecv"));
        a.send(&inv);
        let binv = b.expect_request(Method::Invite, None, T);
        let bd = b.accept_invite(&binv, &sdp(bm.port, PCMU, "sendrecv"));
        let (resp, ad) = a.finish_invite(&inv);
        assert_eq!(resp.status, 200);
        b.expect_request(Method::Ack, None, T);
        (a, ad.unwrap(), bd)
    };
    let ready_of = |b: &mut Ua| {
        let r = b.expect_request(Method::Message, Some(READY), T);
        b.respond(&r, 200, &[], b"");
    };

    // Set-ups: request, prompt, store session INVITE/200/ACK, one packet, BYE, ready note.
    let n = 40;
    let rtp = Rtp::bind();
    let t0 = Instant::now();
    for _ in 0..n {
        let p = ask(&mut a, &mut b, &mut bd, 160);
        let (mut d, to) =
            store_session(&mut a, p["store_uri"].as_str().unwrap(), 160, &rtp).unwrap();
        rtp.send(to, 0, true, 1, 160, 5, &payload(1));
        ready_of(&mut b);
        assert_eq!(a.bye(&mut d).status, 200);
    }
    let setups = n as f64 / t0.elapsed().as_secs_f64();
    println!("BENCH cluster {backend} store set-ups: {setups:.1}/s (n={n}, one after another)");

    // Ingest: 8 concurrent stores of 1,500 packets each at 500 packets/s.
    let (stores, packets) = (8usize, 1500u32);
    let sessions: Vec<_> = (0..stores)
        .map(|_| {
            let p = ask(&mut a, &mut b, &mut bd, 160);
            let r = Rtp::bind();
            let size = u64::from(packets) * 160;
            let (d, to) =
                store_session(&mut a, p["store_uri"].as_str().unwrap(), size, &r).unwrap();
            (d, to, r)
        })
        .collect();
    let pid = node.pid().unwrap();
    let cpu0 = cpu_secs(pid);
    let senders: Vec<_> = sessions
        .iter()
        .map(|(_, to, r)| {
            let (to, sock) = (*to, r.sock.try_clone().unwrap());
            std::thread::spawn(move || {
                let r = Rtp { port: 0, sock };
                for i in 0..packets {
                    r.send(to, 0, i == 0, i as u16, 160 * i, 6, &payload(i));
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    for _ in 0..stores {
        ready_of(&mut b);
    }
    for (mut d, _, _) in sessions {
        assert_eq!(a.bye(&mut d).status, 200);
    }
    std::thread::sleep(Duration::from_secs(1)); // the last commits and uploads
    let cpu = cpu_secs(pid) - cpu0;
    let total = stores as f64 * f64::from(packets);
    println!(
        "BENCH cluster {backend} stored packets per CPU-second: {:.0} ({total} packets, {cpu:.2} CPU-s)",
        total / cpu
    );
}

#[test]
#[ignore = "benchmark: bench/run cluster"]
fn bench_cluster_backends_tail_lag_and_takeover() {
    let Some(pg) = PgDb::fresh() else { return };
    let Some(s3) = S3sFs::start() else { return };
    bench_one_node("sqlite+file", None, None);
    bench_one_node("postgres+s3", Some(&pg), Some(&s3));
    drop((pg, s3));

    // Cross-node live tail: a store received on node 1, played from node 2 from its start;
    // lag = arrival at the player - the moment the packet was sent to node 1.
    let lease = 3;
    let Some(mut c) = Cluster::start(lease, None) else {
        return;
    };
    let mut b = register_on(&c, 1, "1002");
    let (mut a, _ad, mut bd) = call_on(&c, 0, &mut b);
    let p = ask(&mut a, &mut b, &mut bd, 160);
    let a_rtp = Rtp::bind();
    let n = 250u32;
    let (_sd, to) = store_session(
        &mut a,
        p["store_uri"].as_str().unwrap(),
        u64::from(n) * 160 * 2,
        &a_rtp,
    )
    .unwrap();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut sent = Vec::new();
        for i in 0..n {
            sent.push(t0.elapsed().as_secs_f64());
            a_rtp.send(to, 0, i == 0, i as u16, 160 * i, 7, &payload(i));
            std::thread::sleep(Duration::from_millis(20));
        }
        (sent, a_rtp)
    });
    let ready = b.expect_request(Method::Message, Some(READY), T);
    b.respond(&ready, 200, &[], b"");
    let ready = json(&ready.body);
    let b_rtp = Rtp::bind();
    let inv = b.invite_request(
        &on_node(&c, ready["play_uri"].as_str().unwrap(), 1),
        &[],
        &sdp(b_rtp.port, PCMU, "recvonly"),
    );
    let (resp, _pd) = b.invite(&inv);
    assert_eq!(resp.status, 200);
    let mut got = Vec::new();
    for _ in 0..n {
        let pkt = b_rtp.recv(Duration::from_secs(5)).expect("played packet");
        got.push(pkt.at.duration_since(t0).as_secs_f64());
    }
    let (sent, a_rtp) = sender.join().unwrap();
    let mut lag: Vec<f64> = got
        .iter()
        .zip(&sent)
        .map(|(g, s)| (g - s) * 1000.0)
        .collect();
    let (p50, p99) = (percentile(&mut lag, 0.5), percentile(&mut lag, 0.99));
    println!("BENCH cluster live-tail lag node 1 -> node 2: p50={p50:.0}ms p99={p99:.0}ms (n={n})");

    // Takeover: node 1 killed mid-store; node 2 finishes the store.
    let p = ask(&mut a, &mut b, &mut bd, 160);
    let (_sd, to) =
        store_session(&mut a, p["store_uri"].as_str().unwrap(), 1_000_000, &a_rtp).unwrap();
    for i in 0..50u32 {
        a_rtp.send(to, 0, i == 0, i as u16, 160 * i, 8, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = b.expect_request(Method::Message, Some(READY), T);
    b.respond(&r, 200, &[], b"");
    let id = json(&r.body)["store_id"].as_str().unwrap().to_string();
    let killed = Instant::now();
    c.nodes[0].kill_hard();
    while store_json(&c, 1, &id)["state"] != "truncated" {
        assert!(killed.elapsed() < Duration::from_secs(30), "no takeover");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "BENCH cluster takeover of a dead node's store: {:.2}s after kill -9 (lease_secs = {lease})",
        killed.elapsed().as_secs_f64()
    );
}
