//! Handler-level tests: the real router served on 127.0.0.1:0 over a temp SQLite database,
//! driven by a tiny HTTP/1.1 client (so chunked framing and headers are exercised too).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::*;
use crate::sip::auth::{respond, Algorithm, NonceKey, Verifier};
use crate::storage::db::Db;
use crate::storage::segments::{RecordHeader, SegmentOptions, SegmentReader, SegmentWriter};
use crate::storage::stores::{store_dir, NewStore, StartSession, Store, StoreKind};
use crate::storage::threshold::Threshold;

// The integration tests' HTTP client: a self-contained file (nothing else of tests/common).
// Its items are `pub` for the integration tests that include it too.
#[allow(unreachable_pub)]
#[path = "../../tests/common/http.rs"]
mod http_client;
use http_client::{basic, get, parse, request, send_raw, Resp};

const ADMIN: &str = "admin-secret-token";

struct H {
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    state: HttpState,
    events: mpsc::UnboundedReceiver<HttpEvent>,
}

async fn harness_with(f: impl FnOnce(&mut HttpState)) -> H {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/meta/cv.db", dir.path().display());
    let db = Db::open(&url).await.unwrap();
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let accounts = Accounts::new(db.clone(), "example.com").with_argon2_params(params);
    accounts
        .add("1001", "pw1", "1111", 1_000_000)
        .await
        .unwrap();
    accounts
        .add("1002", "pw2", "2222", 1_000_000)
        .await
        .unwrap();
    accounts
        .add("1003", "pw3", "3333", 1_000_000)
        .await
        .unwrap();
    let mut state = HttpState::new(accounts, Stores::new(db), dir.path().join("data"), ADMIN);
    let (tx, events) = mpsc::unbounded_channel();
    state.events = Some(tx);
    f(&mut state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = api_router(state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    H {
        _dir: dir,
        addr,
        state,
        events,
    }
}

async fn harness() -> H {
    harness_with(|_| {}).await
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

async fn get_as(addr: SocketAddr, target: &str, auth: &str) -> Resp {
    get(addr, target, &[("Authorization", auth)]).await
}

fn aor(u: &str) -> String {
    format!("sip:{u}@example.com")
}

fn t0() -> SystemTime {
    SystemTime::now()
}

async fn pending_store(h: &H, sender: &str, receiver: &str, ttl: Duration) -> Store {
    h.state
        .stores
        .create(
            NewStore {
                kind: StoreKind::InCall,
                sender: aor(sender),
                receiver: aor(receiver),
                owner: Some(receiver.into()),
                call_id: Some("c1".into()),
                threshold: Threshold::Percent(30),
                ttl,
            },
            t0(),
        )
        .await
        .unwrap()
}

fn rec(i: u32, pt: u8, len: usize) -> (RecordHeader, Vec<u8>) {
    (
        RecordHeader {
            arrival_us: 1_700_000_000_000_000 + u64::from(i) * 20_000,
            seq: 1000 + i as u16,
            timestamp: 160 * i,
            ssrc: 0x1234_5678,
            payload_type: pt,
            marker: i == 0,
        },
        (0..len).map(|j| (i as usize * 31 + j) as u8).collect(),
    )
}

/// A receiving store (sender 1001 -> receiver), with its writer.
async fn receiving_store(
    h: &H,
    receiver: &str,
    format: &str,
    pt: u8,
    threshold: Option<u64>,
) -> (Store, SegmentWriter) {
    let s = pending_store(h, "1001", receiver, Duration::from_secs(300)).await;
    let sender = aor("1001");
    let s = h
        .state
        .stores
        .start_session(
            &s.id,
            &StartSession {
                caller: &sender,
                format,
                payload_type: pt,
                declared_bytes: Some(10_000),
                reserve_bytes: 10_000,
                threshold_bytes: threshold,
            },
            t0(),
        )
        .await
        .unwrap();
    let w = SegmentWriter::create(
        &store_dir(&h.state.data_dir, &s.id).unwrap(),
        SegmentOptions::default(),
    )
    .unwrap();
    (s, w)
}

async fn finished_store(
    h: &H,
    receiver: &str,
    format: &str,
    pt: u8,
    recs: &[(RecordHeader, Vec<u8>)],
) -> Store {
    let (s, mut w) = receiving_store(h, receiver, format, pt, Some(0)).await;
    for (hd, p) in recs {
        w.append(hd, p).unwrap();
    }
    let st = w.finish().unwrap();
    h.state
        .stores
        .finish(&s.id, StoreState::Complete, st.payload_bytes, t0())
        .await
        .unwrap()
}

fn challenge_for<'a>(r: &'a Resp, alg: &str) -> &'a str {
    r.all("www-authenticate")
        .into_iter()
        .find(|c| c.starts_with("Digest") && c.contains(&format!("algorithm={alg}")))
        .unwrap_or_else(|| panic!("no {alg} challenge in {:?}", r.headers))
}

#[tokio::test]
async fn account_auth_paths() {
    let h = harness().await;
    let a = h.addr;
    let path = "/v1/accounts/1001";

    // No credentials: 401 with Digest SHA-256, Digest MD5 and Basic, in that order.
    let r = get(a, path, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.error(), "unauthorized");
    let ch = r.all("www-authenticate");
    assert_eq!(ch.len(), 3, "{ch:?}");
    assert!(
        ch[0].starts_with("Digest")
            && ch[0].contains("algorithm=SHA-256")
            && ch[0].contains("qop=\"auth\"")
    );
    assert!(ch[0].contains("realm=\"example.com\""));
    assert!(ch[1].contains("algorithm=MD5"));
    assert!(ch[2].starts_with("Basic realm=\"example.com\""));
    assert_eq!(r.header("content-type"), Some("application/json"));

    // Basic.
    let r = get_as(a, path, &basic("1001", "pw1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"user":"1001","quota_bytes":1_000_000,"used_bytes":0,"reserved_bytes":0,"free_bytes":1_000_000})
    );
    let r = get_as(a, path, &basic("1001", "wrong")).await;
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    assert_eq!(r.all("www-authenticate").len(), 3);
    let r = get_as(a, path, &basic("nobody", "pw1")).await;
    assert_eq!(r.status, 401);
    let r = get_as(a, path, "Basic !!!notbase64").await;
    assert_eq!(r.status, 401);
    // Authenticated, but another account: 403.
    let r = get_as(a, path, &basic("1002", "pw2")).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));

    // Admin.
    let r = get_as(a, path, &bearer(ADMIN)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["user"], "1001");
    let r = get_as(a, "/v1/accounts/ghost", &bearer(ADMIN)).await;
    assert_eq!((r.status, r.error().as_str()), (404, "not-found"));
    // The admin token only counts in the Authorization header.
    let r = get(a, &format!("{path}?token={ADMIN}"), &[]).await;
    assert_eq!(r.status, 401);
    let r = get_as(a, path, &bearer("not-the-admin")).await;
    assert_eq!(r.status, 401);
    let r = get_as(a, path, "Negotiate abc").await;
    assert_eq!(r.status, 401);

    // Digest, both algorithms; the nonce count guards replays.
    let first = get(a, path, &[]).await;
    for alg in ["SHA-256", "MD5"] {
        let ch = challenge_for(&first, alg);
        let auth = respond(ch, "1001", "pw1", "GET", path, &format!("cn-{alg}"), 1).unwrap();
        let r = get_as(a, path, &auth).await;
        assert_eq!(
            r.status,
            200,
            "{alg}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let replay = get_as(a, path, &auth).await;
        assert_eq!(replay.status, 401, "{alg} replay");
        let auth2 = respond(ch, "1001", "pw1", "GET", path, &format!("cn-{alg}"), 2).unwrap();
        assert_eq!(get_as(a, path, &auth2).await.status, 200);
        let bad = respond(ch, "1001", "nope", "GET", path, "x", 3).unwrap();
        assert_eq!(get_as(a, path, &bad).await.status, 401);
        // The digest uri must be this request's.
        let other = respond(ch, "1001", "pw1", "GET", "/v1/accounts/1002", "y", 4).unwrap();
        assert_eq!(get_as(a, path, &other).await.status, 401);
    }
    // Digest for another account: authenticated, 403.
    let ch = challenge_for(&first, "MD5");
    let auth = respond(ch, "1002", "pw2", "GET", path, "z", 9).unwrap();
    assert_eq!(get_as(a, path, &auth).await.status, 403);
    // A nonce from another key (another process, a restart): stale=true.
    let foreign = Verifier::new(NonceKey::random(), 300)
        .challenge("example.com", Algorithm::Md5, false, unix())
        .to_header_value();
    let auth = respond(&foreign, "1001", "pw1", "GET", path, "s", 1).unwrap();
    let r = get_as(a, path, &auth).await;
    assert_eq!(r.status, 401);
    assert!(
        r.all("www-authenticate")
            .iter()
            .any(|c| c.contains("stale=true")),
        "{:?}",
        r.headers
    );
    // Malformed digest.
    assert_eq!(get_as(a, path, "Digest garbage").await.status, 401);
}

fn unix() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn no_admin_without_admin_token() {
    let h = harness_with(|s| s.admin_token.clear()).await;
    assert_eq!(
        get_as(h.addr, "/v1/accounts/1001", "Bearer ").await.status,
        401
    );
    assert_eq!(get_as(h.addr, "/v1/stores", &bearer("x")).await.status, 401);
    // /metrics needs nothing; unknown routes and methods answer JSON.
    let r = get(h.addr, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    let r = get(h.addr, "/v2/nothing", &[]).await;
    assert_eq!((r.status, r.error().as_str()), (404, "not-found"));
    let r = request(h.addr, "DELETE", "/v1/stores", &[], b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.error(), "method-not-allowed");
}

#[tokio::test]
async fn store_metadata_and_listing() {
    let h = harness().await;
    let a = h.addr;
    let s1 = finished_store(&h, "1002", "PCMU/8000", 0, &[rec(0, 0, 160)]).await;
    // Distinct creation times (milliseconds) so "newest first" is well defined.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let s2 = pending_store(&h, "1001", "1002", Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let s3 = pending_store(&h, "1003", "1001", Duration::from_secs(300)).await;
    let path = |s: &Store| format!("/v1/stores/{}", s.id);

    let r = get(a, &path(&s1), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.all("www-authenticate").len(), 3);
    // Download token, upload token, receiver, sender, admin.
    let r = get(a, &format!("{}?token={}", path(&s1), s1.token), &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v, serde_json::to_value(s1.view()).unwrap());
    assert_eq!(
        (v["state"].as_str(), v["received_bytes"].as_u64()),
        (Some("complete"), Some(160))
    );
    assert_eq!(v["format"], "PCMU/8000");
    assert_eq!(get_as(a, &path(&s1), &bearer(&s1.token)).await.status, 200);
    assert_eq!(
        get(
            a,
            &format!("{}?token={}", path(&s1), upload_token(&s1)),
            &[]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get_as(a, &path(&s1), &basic("1002", "pw2")).await.status,
        200
    );
    assert_eq!(
        get_as(a, &path(&s1), &basic("1001", "pw1")).await.status,
        200
    );
    assert_eq!(get_as(a, &path(&s1), &bearer(ADMIN)).await.status, 200);
    // Not a party: 403. Another store's token: 401.
    let r = get_as(a, &path(&s1), &basic("1003", "pw3")).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let r = get(a, &format!("{}?token={}", path(&s1), s2.token), &[]).await;
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    let r = get(a, &format!("{}?token=", path(&s1)), &[]).await;
    assert_eq!(r.status, 401);
    // Unknown and malformed ids.
    let r = get_as(a, "/v1/stores/st_00000000000000000000", &bearer(ADMIN)).await;
    assert_eq!((r.status, r.error().as_str()), (404, "not-found"));
    let r = get_as(a, "/v1/stores/..%2F..%2Fetc", &bearer(ADMIN)).await;
    assert_eq!(r.status, 404);

    // Listing: own stores newest first, all with admin, ?state= filter.
    let ids = |r: &Resp| -> Vec<String> {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["store_id"].as_str().unwrap().to_string())
            .collect()
    };
    let r = get_as(a, "/v1/stores", &basic("1002", "pw2")).await;
    assert_eq!(r.status, 200);
    assert_eq!(ids(&r), [s2.id.clone(), s1.id.clone()]);
    let r = get_as(a, "/v1/stores", &basic("1001", "pw1")).await;
    assert_eq!(ids(&r), [s3.id.clone(), s2.id.clone(), s1.id.clone()]);
    let r = get_as(a, "/v1/stores", &bearer(ADMIN)).await;
    assert_eq!(ids(&r), [s3.id.clone(), s2.id.clone(), s1.id.clone()]);
    let r = get_as(a, "/v1/stores?state=complete", &basic("1002", "pw2")).await;
    assert_eq!(ids(&r), [s1.id.as_str()]);
    let r = get_as(a, "/v1/stores?state=pending&limit=1", &bearer(ADMIN)).await;
    assert_eq!(ids(&r), [s3.id.as_str()]);
    let r = get_as(a, "/v1/stores?state=receiving", &bearer(ADMIN)).await;
    assert!(ids(&r).is_empty());
    let r = get_as(a, "/v1/stores?state=bogus", &bearer(ADMIN)).await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad-request"));
    let r = get_as(a, "/v1/stores?limit=x", &bearer(ADMIN)).await;
    assert_eq!(r.status, 400);
    let r = get(a, &format!("/v1/stores?token={}", s1.token), &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(get(a, "/v1/stores", &[]).await.status, 401);
    let r = get_as(a, "/v1/stores", &basic("1003", "pw3")).await;
    assert_eq!(ids(&r), [s3.id.as_str()]);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// A pcap download holds every record, in order, as RTP with its arrival time; tshark (when
/// installed) reads it as RTP too.
fn check_pcap(p: &[u8], recs: &[(RecordHeader, Vec<u8>)], dir: &std::path::Path) {
    assert_eq!(le32(p, 0), 0xa1b2_c3d4);
    assert_eq!(le32(p, 20), 101);
    let mut at = 24;
    // First the store session's INVITE and 200 (SIP on port 5060, with SDP), then the RTP.
    for start in ["INVITE sip:", "SIP/2.0 200 OK"] {
        let incl = le32(p, at + 8) as usize;
        let pkt = &p[at + 16..at + 16 + incl];
        assert_eq!(u16::from_be_bytes([pkt[20], pkt[21]]), 5060);
        let sip = std::str::from_utf8(&pkt[28..]).unwrap();
        assert!(
            sip.starts_with(start) && sip.contains("m=audio 5004 RTP/AVP"),
            "{sip}"
        );
        at += 16 + incl;
    }
    let mut n = 0;
    while at < p.len() {
        let incl = le32(p, at + 8) as usize;
        let pkt = &p[at + 16..at + 16 + incl];
        let (hd, pl) = &recs[n];
        assert_eq!(
            u64::from(le32(p, at)) * 1_000_000 + u64::from(le32(p, at + 4)),
            hd.arrival_us
        );
        let rtp = &pkt[28..];
        assert_eq!(rtp[1] & 0x7f, hd.payload_type);
        assert_eq!(rtp[1] >> 7, u8::from(hd.marker));
        assert_eq!(u16::from_be_bytes([rtp[2], rtp[3]]), hd.seq);
        assert_eq!(&rtp[12..], &pl[..]);
        at += 16 + incl;
        n += 1;
    }
    assert_eq!(n, recs.len());
    // tshark reads it as RTP without being told the port (skip when absent).
    if std::process::Command::new("tshark")
        .arg("-v")
        .output()
        .is_ok()
    {
        let f = dir.join("x.pcap");
        std::fs::write(&f, p).unwrap();
        let out = std::process::Command::new("tshark")
            .args([
                "-r",
                f.to_str().unwrap(),
                "-Y",
                "rtp",
                "-T",
                "fields",
                "-e",
                "rtp.seq",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seqs: Vec<u16> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(seqs, recs.iter().map(|(h, _)| h.seq).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn download_raw_wav_pcap_of_a_finished_store() {
    let h = harness().await;
    let a = h.addr;
    // 30 PCMU records and one telephone-event (PT 101) in the middle.
    let mut recs: Vec<_> = (0..30).map(|i| rec(i, 0, 160)).collect();
    recs.insert(10, rec(100, 101, 4));
    let s = finished_store(&h, "1002", "PCMU/8000", 0, &recs).await;
    let media = |fmt: &str| format!("/v1/stores/{}/media?format={fmt}&token={}", s.id, s.token);
    let all: Vec<u8> = recs.iter().flat_map(|(_, p)| p.clone()).collect();
    let audio: Vec<u8> = recs
        .iter()
        .filter(|(h, _)| h.payload_type == 0)
        .flat_map(|(_, p)| p.clone())
        .collect();

    let r = get(
        a,
        &format!("/v1/stores/{}/media?token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body, all, "raw: every payload in record order");
    assert_eq!(get(a, &media("raw"), &[]).await.body, all);

    let r = get(a, &media("wav"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("audio/wav"));
    let w = &r.body;
    assert_eq!(&w[0..4], b"RIFF");
    assert_eq!(u16::from_le_bytes([w[20], w[21]]), 7, "mu-law");
    assert_eq!(le32(w, 54) as usize, audio.len());
    assert_eq!(le32(w, 4) as usize, w.len() - 8);
    assert_eq!(&w[58..], &audio[..], "WAV holds only the store's codec");

    let r = get(a, &media("pcap"), &[]).await;
    assert_eq!(r.status, 200);
    check_pcap(&r.body, &recs, h._dir.path());

    // Who may download: receiver, its token, admin; not the sender, not the upload token.
    let plain = format!("/v1/stores/{}/media", s.id);
    assert_eq!(get_as(a, &plain, &basic("1002", "pw2")).await.body, all);
    assert_eq!(get_as(a, &plain, &bearer(ADMIN)).await.status, 200);
    let r = get_as(a, &plain, &basic("1001", "pw1")).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let r = get(a, &format!("{plain}?token={}", upload_token(&s)), &[]).await;
    assert_eq!(r.status, 403);
    assert_eq!(get(a, &plain, &[]).await.status, 401);
    let r = get(
        a,
        &format!("/v1/stores/{}/media?format=mp3&token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad-request"));

    // WAV of a non-G.711 store: 415. A pending store has no data: 409.
    let g722 = finished_store(&h, "1002", "G722/8000", 9, &[rec(0, 9, 160)]).await;
    let r = get(
        a,
        &format!(
            "/v1/stores/{}/media?format=wav&token={}",
            g722.id, g722.token
        ),
        &[],
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (415, "unsupported-format"));
    let p = pending_store(&h, "1001", "1002", Duration::from_secs(60)).await;
    let r = get(
        a,
        &format!("/v1/stores/{}/media?token={}", p.id, p.token),
        &[],
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (409, "no-data"));
}

#[tokio::test]
async fn live_tail_follows_the_writer_until_finish() {
    let h = harness().await;
    let (s, mut w) = receiving_store(&h, "1002", "PCMU/8000", 0, Some(320)).await;
    let _live = h.state.live.register(&s.id, w.subscribe());
    let url = format!("/v1/stores/{}/media?format=wav&token={}", s.id, s.token);

    // Below the threshold: 503 not-ready with Retry-After.
    w.append(&rec(0, 0, 160).0, &rec(0, 0, 160).1).unwrap();
    w.commit().unwrap();
    let r = get(h.addr, &url, &[]).await;
    assert_eq!((r.status, r.error().as_str()), (503, "not-ready"));
    assert_eq!(r.header("retry-after"), Some("1"));

    w.append(&rec(1, 0, 160).0, &rec(1, 0, 160).1).unwrap();
    w.commit().unwrap();
    let addr = h.addr;
    let reader = tokio::spawn(async move { get(addr, &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 2..10 {
        let (hd, p) = rec(i, 0, 160);
        w.append(&hd, &p).unwrap();
        w.commit().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!reader.is_finished(), "the download follows the tail");
    w.finish().unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(le32(&r.body, 54), 0xFFFF_FFFF, "live WAV: unknown size");
    let want: Vec<u8> = (0..10).flat_map(|i| rec(i, 0, 160).1).collect();
    assert_eq!(&r.body[58..], &want[..]);
}

#[tokio::test]
async fn unregistered_receiving_store_is_polled_to_its_end() {
    let h = harness().await;
    // Threshold 0: readable at once. Not registered in LiveStores.
    let (s, mut w) = receiving_store(&h, "1002", "PCMA/8000", 8, Some(0)).await;
    w.append(&rec(0, 8, 100).0, &rec(0, 8, 100).1).unwrap();
    w.commit().unwrap();
    let addr = h.addr;
    let url = format!("/v1/stores/{}/media?token={}", s.id, s.token);
    let reader = tokio::spawn(async move { get(addr, &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.append(&rec(1, 8, 100).0, &rec(1, 8, 100).1).unwrap();
    w.commit().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!reader.is_finished());
    w.append(&rec(2, 8, 100).0, &rec(2, 8, 100).1).unwrap();
    let st = w.finish().unwrap();
    h.state
        .stores
        .finish(&s.id, StoreState::Complete, st.payload_bytes, t0())
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    let want: Vec<u8> = (0..3).flat_map(|i| rec(i, 8, 100).1).collect();
    assert_eq!(r.body, want);
}

async fn usage(h: &H, user: &str) -> (u64, u64) {
    let a = h.state.accounts.get(user).await.unwrap().unwrap();
    (a.used_bytes, a.reserved_bytes)
}

#[tokio::test]
async fn upload_happy_path() {
    let mut h = harness().await;
    let s = pending_store(&h, "1001", "1002", Duration::from_secs(300)).await;
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let url = format!("/v1/stores/{}/data?token={}", s.id, upload_token(&s));
    let r = request(
        h.addr,
        "PUT",
        &url,
        &[("Content-Type", "audio/basic")],
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/stores/{}", s.id).as_str())
    );
    let v = r.json();
    assert_eq!(v["state"], "complete");
    assert_eq!(v["received_bytes"], 5000);
    assert_eq!(v["declared_bytes"], 5000);
    assert_eq!(v["format"], "PCMU/8000");
    assert_eq!(v["threshold_bytes"], 1500);
    assert!(v["threshold_at"].is_string());
    assert_eq!(usage(&h, "1002").await, (5000, 0));

    // Records of 1200 bytes, read back byte for byte, also as WAV.
    let dir = store_dir(&h.state.data_dir, &s.id).unwrap();
    let mut rd = SegmentReader::open(&dir, 0, None);
    let mut lens = Vec::new();
    while let Some(r) = rd.next().await.unwrap() {
        lens.push(r.payload.len());
    }
    assert_eq!(lens, [1200, 1200, 1200, 1200, 200]);
    let r = get(
        h.addr,
        &format!("/v1/stores/{}/media?token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!(r.body, body);
    let r = get(
        h.addr,
        &format!("/v1/stores/{}/media?format=wav&token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!(&r.body[58..], &body[..]);

    let mut evs = Vec::new();
    while let Ok(e) = h.events.try_recv() {
        evs.push(e);
    }
    assert_eq!(evs.len(), 3, "{evs:?}");
    assert_eq!(
        evs[0],
        HttpEvent::UploadStarted {
            store_id: s.id.clone()
        }
    );
    assert!(matches!(&evs[1], HttpEvent::ThresholdReached { store_id, .. } if *store_id == s.id));
    assert_eq!(
        evs[2],
        HttpEvent::UploadFinished {
            store_id: s.id.clone(),
            state: StoreState::Complete,
            received_bytes: 5000
        }
    );
    assert!(h.state.live.is_empty());

    // Used once: the same URL again is 404 unknown-store.
    let r = request(h.addr, "PUT", &url, &[], &body).await;
    assert_eq!((r.status, r.error().as_str()), (404, "unknown-store"));

    upload_as_sender_and_empty(&h).await;
}

/// The sender's own credentials upload too, any Content-Type kept as the format; an empty
/// file is a complete store.
async fn upload_as_sender_and_empty(h: &H) {
    let s2 = pending_store(h, "1001", "1002", Duration::from_secs(300)).await;
    let r = request(
        h.addr,
        "PUT",
        &format!("/v1/stores/{}/data", s2.id),
        &[
            ("Authorization", &basic("1001", "pw1")),
            ("Content-Type", "application/pdf"),
        ],
        b"%PDF-1.4 tiny",
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["format"], "application/pdf");
    let r = get(
        h.addr,
        &format!("/v1/stores/{}/media?format=wav&token={}", s2.id, s2.token),
        &[],
    )
    .await;
    assert_eq!(r.status, 415);
    // An empty file is a complete store.
    let s3 = pending_store(h, "1001", "1002", Duration::from_secs(300)).await;
    let r = request(
        h.addr,
        "PUT",
        &format!("/v1/stores/{}/data?token={}", s3.id, upload_token(&s3)),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["received_bytes"], 0);
}

#[tokio::test]
async fn upload_error_rows() {
    let h = harness_with(|s| s.upload.idle_timeout = Duration::from_millis(400)).await;
    let a = h.addr;
    let put = |s: &Store| format!("/v1/stores/{}/data?token={}", s.id, upload_token(s));

    // Unknown stores: 401 to strangers (issue 10: ids cannot be probed), 404 to an account;
    // an expired store with its own token: 404 unknown-store.
    let r = request(
        a,
        "PUT",
        "/v1/stores/st_00000000000000000000/data?token=x",
        &[],
        b"abc",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    let r = request(a, "PUT", "/v1/stores/garbage/data", &[], b"abc").await;
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    let r = request(
        a,
        "PUT",
        "/v1/stores/garbage/data",
        &[("Authorization", &basic("1001", "pw1"))],
        b"abc",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (404, "unknown-store"));
    let expired = pending_store(&h, "1001", "1002", Duration::ZERO).await;
    let r = request(a, "PUT", &put(&expired), &[], b"abc").await;
    assert_eq!((r.status, r.error().as_str()), (404, "unknown-store"));

    let s = pending_store(&h, "1001", "1002", Duration::from_secs(300)).await;
    // No credentials, or a token of nothing: 401.
    let r = request(a, "PUT", &format!("/v1/stores/{}/data", s.id), &[], b"abc").await;
    assert_eq!(r.status, 401);
    let r = request(
        a,
        "PUT",
        &format!("/v1/stores/{}/data?token=nope", s.id),
        &[],
        b"abc",
    )
    .await;
    assert_eq!(r.status, 401);
    // Not the sender: the receiver's download token, the receiver's account, admin.
    for auth in [bearer(&s.token), basic("1002", "pw2"), bearer(ADMIN)] {
        let r = request(
            a,
            "PUT",
            &format!("/v1/stores/{}/data", s.id),
            &[("Authorization", &auth)],
            b"abc",
        )
        .await;
        assert_eq!(
            (r.status, r.error().as_str()),
            (403, "not-sender"),
            "{auth}"
        );
    }
    // No Content-Length: 411.
    let r = request(
        a,
        "PUT",
        &put(&s),
        &[("Transfer-Encoding", "chunked")],
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (411, "length-required"));
    // Larger than the receiver's free space: 403 quota-exceeded, the store stays usable.
    let raw = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000001\r\n\r\n",
        put(&s)
    );
    let r = send_raw(a, raw.as_bytes()).await;
    assert_eq!((r.status, r.error().as_str()), (403, "quota-exceeded"));
    let r = send_raw(a, format!("PUT {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 99999999999999999999\r\n\r\n", put(&s)).as_bytes()).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        h.state.stores.get(&s.id).await.unwrap().unwrap().state,
        StoreState::Pending
    );
    assert_eq!(usage(&h, "1002").await, (0, 0));

    upload_cut_short(&h, &s).await;
}

/// A client that hangs up mid-body, and one that stalls: both stores end `truncated`.
async fn upload_cut_short(h: &H, s: &Store) {
    let a = h.addr;
    let put = |s: &Store| format!("/v1/stores/{}/data?token={}", s.id, upload_token(s));
    // A client that sends 3000 of 10000 bytes and hangs up: truncated, quota settled.
    let mut c = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n",
        put(s)
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&[7u8; 3000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    let st = wait_finished(h, &s.id).await;
    assert_eq!((st.state, st.received_bytes), (StoreState::Truncated, 3000));
    assert_eq!(usage(h, "1002").await, (3000, 0));
    assert!(h.state.live.is_empty());

    // A client that stalls with the connection open: truncated after the idle timeout.
    let s = &pending_store(h, "1001", "1002", Duration::from_secs(300)).await;
    let mut c = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
        put(s)
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&[1u8; 1300]).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let r = parse(&out);
    assert_eq!((r.status, r.error().as_str()), (400, "truncated"));
    let st = h.state.stores.get(&s.id).await.unwrap().unwrap();
    assert_eq!((st.state, st.received_bytes), (StoreState::Truncated, 1300));
}

async fn wait_finished(h: &H, id: &str) -> Store {
    for _ in 0..100 {
        let s = h.state.stores.get(id).await.unwrap().unwrap();
        if s.state != StoreState::Receiving {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store {id} still receiving");
}

#[tokio::test]
async fn live_upload_is_downloadable_while_it_arrives() {
    let h = harness().await;
    let s = pending_store(&h, "1001", "1002", Duration::from_secs(300)).await;
    // Threshold 30% of 4800 = 1440 bytes.
    let mut up = TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "PUT /v1/stores/{}/data?token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4800\r\n\r\n",
        s.id,
        upload_token(&s)
    );
    up.write_all(head.as_bytes()).await.unwrap();
    up.write_all(&[1u8; 2400]).await.unwrap();
    // Wait until the first part is committed and the threshold passed.
    for _ in 0..100 {
        let st = h.state.stores.get(&s.id).await.unwrap().unwrap();
        if st.threshold_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = h.addr;
    let url = format!("/v1/stores/{}/media?token={}", s.id, s.token);
    let reader = tokio::spawn(async move { get(addr, &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!reader.is_finished());
    up.write_all(&[2u8; 2400]).await.unwrap();
    let mut out = Vec::new();
    up.read_to_end(&mut out).await.unwrap();
    assert_eq!(parse(&out).status, 201);
    let r = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    let mut want = vec![1u8; 2400];
    want.extend_from_slice(&[2u8; 2400]);
    assert_eq!(r.body, want);
}

/// A store receiving on another node (its log in another data_dir, not in this node's
/// `LiveStores`), media in S3 (s3s-fs): the download follows its chunks from the start while
/// it arrives and ends at the end object, byte for byte.
#[tokio::test]
async fn another_nodes_receiving_store_is_followed_through_its_chunks() {
    use crate::storage::live::LiveStores;
    use crate::storage::objects::chunks;
    use crate::storage::objects::tests::{s3_objects, start_s3s_fs};
    let Some(server) = start_s3s_fs() else { return };
    let objects = s3_objects(&server, "cv-http").await;
    let o = Arc::clone(&objects);
    let h = harness_with(move |st| st.live = Arc::new(LiveStores::with_objects(o))).await;
    let (s, _unused) = receiving_store(&h, "1002", "PCMU/8000", 0, Some(0)).await;
    // "Node X": its own folder and uploader.
    let other = tempfile::tempdir().unwrap();
    let log = other.path().join(&s.id);
    let mut w = SegmentWriter::create(&log, SegmentOptions::default()).unwrap();
    let up = chunks::spawn_uploader(Arc::clone(&objects), s.id.clone(), log, w.subscribe());
    let recs: Vec<_> = (0..40).map(|i| rec(i, 0, 160)).collect();
    for (hd, p) in &recs[..10] {
        w.append(hd, p).unwrap();
    }
    w.commit().unwrap();

    let addr = h.addr;
    let url = format!("/v1/stores/{}/media?token={}", s.id, s.token);
    let reader = tokio::spawn(async move { get(addr, &url, &[]).await });
    for (hd, p) in &recs[10..] {
        w.append(hd, p).unwrap();
        w.commit().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!reader.is_finished(), "the download follows the chunks");
    let st = w.finish().unwrap();
    assert_eq!(up.finish().await.unwrap(), st.bytes);
    h.state
        .stores
        .finish(&s.id, StoreState::Complete, st.payload_bytes, t0())
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);
    let want: Vec<u8> = recs.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(r.body, want);
    // Finished: read from the bucket alone (nothing of it on this node's disk).
    drop(other);
    let r = get(
        h.addr,
        &format!("/v1/stores/{}/media?format=wav&token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        le32(&r.body, 54),
        want.len() as u32,
        "finished WAV: real size"
    );
    assert_eq!(&r.body[58..], &want[..]);
}
