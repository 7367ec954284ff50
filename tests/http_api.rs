//! The HTTP API (PROTOCOL 2.4, 2.5, 5) against a running `callvault serve`: authentication
//! (Basic, Digest, tokens, admin), account and store metadata, listing, raw/WAV/pcap
//! downloads, following a store that is still being written, and `PUT upload_url`.
//!
//! Stores are created through the library on the server's own SQLite database (WAL allows a
//! second process) and their segments written into its data directory, as the store session
//! would. A store written by this test process is not in the server's live registry, so its
//! download follows it by polling: the cross-process path.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use callvault::sip::auth::respond;
use callvault::storage::capability::upload_token;
use callvault::storage::segments::{RecordHeader, SegmentOptions, SegmentWriter};
use callvault::storage::stores::{
    store_dir, NewStore, StartSession, Store, StoreKind, StoreState, Stores,
};
use callvault::storage::threshold::Threshold;
use callvault::storage::Db;
use common::http::{basic, get, request, send_raw, Resp};
use common::{Server, ServerConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const ADMIN: &str = "it-admin-token-0123456789";

struct Api {
    server: Server,
    stores: Stores,
    data: PathBuf,
}

impl Api {
    async fn start() -> Api {
        let mut server = Server::prepare(ServerConfig::new());
        let cfg = std::fs::read_to_string(&server.config_path).unwrap();
        let cfg = cfg.replacen(
            "[http]\n",
            &format!("[http]\nadmin_token = \"{ADMIN}\"\n"),
            1,
        );
        std::fs::write(&server.config_path, cfg).unwrap();
        server.account_add("1001", "pw1", "1111", "1000000");
        server.account_add("1002", "pw2", "2222", "1000000");
        server.account_add("1003", "pw3", "3333", "1000000");
        server.start();
        let data = server.dir.path().join("data");
        let url = server.metadata_url();
        let db = Db::open(&url).await.unwrap();
        let api = Api {
            server,
            stores: Stores::new(db),
            data,
        };
        let r = get(api.addr(), "/v1/stores", &[]).await;
        assert!(
            r.status == 401 && r.header("www-authenticate").is_some(),
            "the HTTP API is not served (wire crate::http::api_router into server.rs): {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        api
    }

    fn addr(&self) -> SocketAddr {
        self.server.http_addr()
    }

    async fn pending(&self, sender: &str, receiver: &str, ttl: Duration) -> Store {
        self.stores
            .create(
                NewStore {
                    kind: StoreKind::InCall,
                    sender: aor(sender),
                    receiver: aor(receiver),
                    owner: Some(receiver.into()),
                    call_id: Some("it-call".into()),
                    threshold: Threshold::Percent(30),
                    ttl,
                },
                SystemTime::now(),
            )
            .await
            .unwrap()
    }

    async fn receiving(&self, receiver: &str, format: &str, pt: u8) -> (Store, SegmentWriter) {
        let s = self
            .pending("1001", receiver, Duration::from_secs(300))
            .await;
        let sender = aor("1001");
        let s = self
            .stores
            .start_session(
                &s.id,
                &StartSession {
                    caller: &sender,
                    format,
                    payload_type: pt,
                    declared_bytes: Some(16_000),
                    reserve_bytes: 16_000,
                    threshold_bytes: Some(0),
                },
                SystemTime::now(),
            )
            .await
            .unwrap();
        let w = SegmentWriter::create(
            &store_dir(&self.data, &s.id).unwrap(),
            SegmentOptions::default(),
        )
        .unwrap();
        (s, w)
    }

    async fn finish(&self, s: &Store, w: &mut SegmentWriter) -> Store {
        let st = w.finish().unwrap();
        self.stores
            .finish(
                &s.id,
                StoreState::Complete,
                st.payload_bytes,
                SystemTime::now(),
            )
            .await
            .unwrap()
    }
}

fn aor(u: &str) -> String {
    format!("sip:{u}@example.com")
}

fn rec(i: u32, len: usize) -> (RecordHeader, Vec<u8>) {
    (
        RecordHeader {
            arrival_us: 1_790_000_000_000_000 + u64::from(i) * 20_000,
            seq: 500 + i as u16,
            timestamp: 160 * i,
            ssrc: 0xabcd_0001,
            payload_type: 0,
            marker: i == 0,
        },
        (0..len).map(|j| (i as usize * 13 + j) as u8).collect(),
    )
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_accounts_metadata_and_listing() {
    let api = Api::start().await;
    let a = api.addr();

    // /metrics stays open.
    assert_eq!(get(a, "/metrics", &[]).await.status, 200);

    // 401 with one Digest challenge per configured algorithm (MD5 by default) and Basic.
    let path = "/v1/accounts/1002";
    let r = get(a, path, &[]).await;
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    let ch = r.all("www-authenticate");
    assert!(ch.iter().any(|c| c.starts_with("Basic ")), "{ch:?}");
    let digest = ch
        .iter()
        .find(|c| c.starts_with("Digest ") && c.contains("qop=\"auth\""))
        .expect("a Digest challenge");
    assert!(digest.contains("realm=\"example.com\""));

    // Basic, Digest, admin; another user is 403.
    let r = get(a, path, &[("Authorization", &basic("1002", "pw2"))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"user":"1002","quota_bytes":1_000_000,"used_bytes":0,
                           "reserved_bytes":0,"free_bytes":1_000_000})
    );
    let auth = respond(digest, "1002", "pw2", "GET", path, "it-cnonce", 1).unwrap();
    assert_eq!(get(a, path, &[("Authorization", &auth)]).await.status, 200);
    assert_eq!(
        get(a, path, &[("Authorization", &auth)]).await.status,
        401,
        "replay"
    );
    let wrong = respond(digest, "1002", "nope", "GET", path, "c2", 2).unwrap();
    assert_eq!(get(a, path, &[("Authorization", &wrong)]).await.status, 401);
    let r = get(a, path, &[("Authorization", &basic("1001", "pw1"))]).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let admin = format!("Bearer {ADMIN}");
    assert_eq!(get(a, path, &[("Authorization", &admin)]).await.status, 200);
    assert_eq!(
        get(a, "/v1/accounts/ghost", &[("Authorization", &admin)])
            .await
            .status,
        404
    );

    // Store metadata: tokens open only their store.
    let (s1, mut w) = api.receiving("1002", "PCMU/8000", 0).await;
    w.append(&rec(0, 160).0, &rec(0, 160).1).unwrap();
    let s1 = api.finish(&s1, &mut w).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let s2 = api.pending("1001", "1003", Duration::from_secs(300)).await;
    let meta = |s: &Store, token: &str| format!("/v1/stores/{}?token={token}", s.id);
    let r = get(a, &meta(&s1, &s1.token), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::to_value(s1.view()).unwrap());
    assert_eq!(r.json()["state"], "complete");
    assert_eq!(
        get(a, &meta(&s1, &upload_token(&s1)), &[]).await.status,
        200
    );
    assert_eq!(get(a, &meta(&s1, &s2.token), &[]).await.status, 401);
    let bare = format!("/v1/stores/{}", s1.id);
    assert_eq!(
        get(a, &bare, &[("Authorization", &basic("1003", "pw3"))])
            .await
            .status,
        403
    );
    assert_eq!(
        get(a, &bare, &[("Authorization", &basic("1001", "pw1"))])
            .await
            .status,
        200,
        "the sender sees the metadata"
    );

    // Listing.
    let ids = |r: &Resp| -> Vec<String> {
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["store_id"].as_str().unwrap().to_string())
            .collect()
    };
    let r = get(a, "/v1/stores", &[("Authorization", &basic("1001", "pw1"))]).await;
    assert_eq!(ids(&r), [s2.id.clone(), s1.id.clone()]);
    let r = get(a, "/v1/stores", &[("Authorization", &basic("1002", "pw2"))]).await;
    assert_eq!(ids(&r), [s1.id.as_str()]);
    let r = get(a, "/v1/stores?state=pending", &[("Authorization", &admin)]).await;
    assert_eq!(ids(&r), [s2.id.as_str()]);
    let r = get(a, "/v1/stores?state=nope", &[("Authorization", &admin)]).await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad-request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_raw_wav_pcap_and_live_tail() {
    let api = Api::start().await;
    let a = api.addr();
    let (s, mut w) = api.receiving("1002", "PCMU/8000", 0).await;
    let recs: Vec<_> = (0..50).map(|i| rec(i, 160)).collect();
    for (h, p) in &recs[..20] {
        w.append(h, p).unwrap();
    }
    w.commit().unwrap();

    // Live: the download starts with 20 records committed and follows the rest.
    let url = format!("/v1/stores/{}/media?token={}", s.id, s.token);
    let live = tokio::spawn(async move { get(a, &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (h, p) in &recs[20..] {
        w.append(h, p).unwrap();
        w.commit().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !live.is_finished(),
        "the download waits for the store to finish"
    );
    let s = api.finish(&s, &mut w).await;
    let r = tokio::time::timeout(Duration::from_secs(10), live)
        .await
        .expect("download ends after the store finished")
        .unwrap();
    let all: Vec<u8> = recs.iter().flat_map(|(_, p)| p.clone()).collect();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.body, all);

    // Finished: raw, WAV (real sizes, readable by sox), pcap (readable by tshark).
    let media = |f: &str| format!("/v1/stores/{}/media?format={f}", s.id);
    let auth = basic("1002", "pw2");
    let r = get(a, &media("raw"), &[("Authorization", &auth)]).await;
    assert_eq!(r.body, all);
    let r = get(a, &media("wav"), &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(le32(&r.body, 54) as usize, all.len());
    assert_eq!(&r.body[58..], &all[..]);
    let wav = api.server.dir.path().join("s.wav");
    std::fs::write(&wav, &r.body).unwrap();
    if which("sox") {
        let out = std::process::Command::new("sox")
            .arg("--i")
            .arg(&wav)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("8000"), "{text}");
        assert!(text.contains("u-law"), "{text}");
        assert!(text.contains("8000 samples"), "{text}");
    }
    let r = get(a, &media("pcap"), &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(le32(&r.body, 0), 0xa1b2_c3d4);
    let pcap = api.server.dir.path().join("s.pcap");
    std::fs::write(&pcap, &r.body).unwrap();
    if which("tshark") {
        let out = std::process::Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            // No "Decode As": the SIP INVITE/200 at the start carry the SDP that makes it RTP.
            .args(["-Y", "rtp", "-T", "fields"])
            .args(["-e", "rtp.seq", "-e", "rtp.p_type", "-e", "rtp.ssrc"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 50);
        assert!(lines[0].starts_with("500\t0\t0xabcd0001"), "{}", lines[0]);
        let sip = std::process::Command::new("tshark")
            .arg("-r")
            .arg(&pcap)
            .args([
                "-Y",
                "sip",
                "-T",
                "fields",
                "-e",
                "sip.Method",
                "-e",
                "sip.Status-Code",
            ])
            .args(["-e", "sdp.media.port"])
            .output()
            .unwrap();
        let sip = String::from_utf8_lossy(&sip.stdout);
        assert_eq!(
            sip.lines().collect::<Vec<_>>(),
            ["INVITE\t\t5004", "\t200\t5004"],
            "{sip}"
        );
    }

    // Who may download.
    let r = get(
        a,
        &media("raw"),
        &[("Authorization", &basic("1001", "pw1"))],
    )
    .await;
    assert_eq!(r.status, 403, "the sender may not download");
    let r = get(
        a,
        &format!("{}&token={}", media("raw"), upload_token(&s)),
        &[],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = get(
        a,
        &media("raw"),
        &[("Authorization", &format!("Bearer {ADMIN}"))],
    )
    .await;
    assert_eq!(r.body, all);
    let r = get(a, &media("flac"), &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 400);
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_url_happy_path_and_error_rows() {
    let api = Api::start().await;
    let a = api.addr();
    let s = api.pending("1001", "1002", Duration::from_secs(300)).await;
    let put = |s: &Store| format!("/v1/stores/{}/data?token={}", s.id, upload_token(s));

    // Error rows first, on the same store (each leaves it usable).
    let r = request(
        a,
        "PUT",
        "/v1/stores/st_00000000000000000000/data?token=x",
        &[],
        b"x",
    )
    .await;
    // A token of no store: 401, like a wrong one (issue 10: ids cannot be probed).
    assert_eq!((r.status, r.error().as_str()), (401, "unauthorized"));
    let r = request(
        a,
        "PUT",
        &format!("/v1/stores/{}/data?token={}", s.id, s.token),
        &[],
        b"x",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (403, "not-sender"));
    let r = request(
        a,
        "PUT",
        &format!("/v1/stores/{}/data", s.id),
        &[("Authorization", &basic("1002", "pw2"))],
        b"x",
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (403, "not-sender"));
    let r = request(
        a,
        "PUT",
        &put(&s),
        &[("Transfer-Encoding", "chunked")],
        b"1\r\nx\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 411);
    // Only the head: the answer comes before any body is read.
    let r = send_raw(
        a,
        format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000001\r\n\r\n",
            put(&s)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (403, "quota-exceeded"));
    let expired = api.pending("1001", "1002", Duration::ZERO).await;
    let r = request(a, "PUT", &put(&expired), &[], b"x").await;
    assert_eq!((r.status, r.error().as_str()), (404, "unknown-store"));

    // The upload itself.
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let r = request(
        a,
        "PUT",
        &put(&s),
        &[("Content-Type", "application/zip")],
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(
        (v["state"].as_str(), v["received_bytes"].as_u64()),
        (Some("complete"), Some(100_000))
    );
    assert_eq!(v["format"], "application/zip");
    // Used now.
    let r = request(a, "PUT", &put(&s), &[], b"x").await;
    assert_eq!((r.status, r.error().as_str()), (404, "unknown-store"));
    // Quota settled, data downloadable by the receiver.
    let r = get(
        a,
        "/v1/accounts/1002",
        &[("Authorization", &basic("1002", "pw2"))],
    )
    .await;
    assert_eq!(r.json()["used_bytes"], 100_000);
    assert_eq!(r.json()["reserved_bytes"], 0);
    let r = get(
        a,
        &format!("/v1/stores/{}/media?token={}", s.id, s.token),
        &[],
    )
    .await;
    assert_eq!(r.body, body);

    // A client that hangs up part way: the store ends truncated with what arrived.
    let s = api.pending("1001", "1002", Duration::from_secs(300)).await;
    let mut c = TcpStream::connect(a).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n",
        put(&s)
    );
    c.write_all(head.as_bytes()).await.unwrap();
    c.write_all(&[9u8; 12_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(c);
    let mut got = None;
    for _ in 0..100 {
        let st = api.stores.get(&s.id).await.unwrap().unwrap();
        if st.state != StoreState::Receiving {
            got = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = got.expect("the aborted upload ends");
    assert_eq!(
        (st.state, st.received_bytes),
        (StoreState::Truncated, 12_000)
    );
}
