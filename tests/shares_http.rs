//! Shared data over HTTP (PROTOCOL 3 step 1 and delivery, 5 Shares): publishing, manifest,
//! pieces, whole content with Range, the index and announce, policies and offer tokens, the
//! server's egress limit and its metric.
//!
//! Most tests serve the real router (`callvault::http::api_router`) in-process on
//! 127.0.0.1:0 with a configured [`Shares`] (small pieces, a rate limit) over a temp SQLite
//! database; the last one runs `callvault serve` and `callvault share publish`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use callvault::http::{api_router, HttpState};
use callvault::metrics::{ShareSource, METRICS};
use callvault::share::{Bitfield, ShareSettings, Shares};
use callvault::sip::auth::respond;
use callvault::storage::stores::Stores;
use callvault::storage::{Accounts, Db};
use common::http::{basic, get, request, send_raw, Resp};
use common::{Server, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "share-admin-token-0123456789";

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    // Not periodic at any piece size, so a piece from the wrong offset would show.
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The router in-process

struct Api {
    _dir: tempfile::TempDir,
    /// The metadata URL (SQLite in `_dir`, or PostgreSQL under the test matrix).
    url: String,
    _pg: Option<common::pg::PgDb>,
    addr: SocketAddr,
    accounts: Accounts,
}

async fn api(piece_size: u64, rate: u64) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let pg = if common::pg::matrix_wants_postgres() {
        common::pg::PgDb::fresh()
    } else {
        None
    };
    let url = match &pg {
        Some(pg) => pg.url.clone(),
        None => format!("sqlite://{}/meta/cv.db", dir.path().display()),
    };
    let db = Db::open(&url).await.unwrap();
    let params = argon2::Params::new(256, 1, 1, None).unwrap();
    let accounts = Accounts::new(db.clone(), "example.com").with_argon2_params(params);
    accounts
        .add("1001", "pw1", "1111", 10_000_000)
        .await
        .unwrap();
    accounts
        .add("1002", "pw2", "2222", 10_000_000)
        .await
        .unwrap();
    accounts
        .add("1003", "pw3", "3333", 10_000_000)
        .await
        .unwrap();
    let data_dir = dir.path().join("data");
    let settings = ShareSettings {
        piece_size,
        server_rate_bytes_per_sec: rate,
        idle_timeout: Duration::from_secs(2),
        ..ShareSettings::default()
    };
    let shares = Shares::open(db.clone(), &data_dir, "example.com", settings)
        .await
        .unwrap();
    let mut state = HttpState::new(accounts.clone(), Stores::new(db), data_dir, ADMIN);
    state.shares = Some(shares);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = api_router(state);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Api {
        _dir: dir,
        url,
        _pg: pg,
        addr,
        accounts,
    }
}

async fn publish(a: SocketAddr, user: &str, pw: &str, target: &str, body: &[u8]) -> Resp {
    request(
        a,
        "PUT",
        target,
        &[("Authorization", &basic(user, pw))],
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_then_manifest_pieces_content_and_ranges() {
    let api = api(65_536, 0).await;
    let a = api.addr;
    let file = data(65_536 * 2 + 1000, 7);
    let r = publish(
        a,
        "1001",
        "pw1",
        "/v1/shares/1001/holiday%20video.mp4",
        &file,
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let cid = v["content_id"].as_str().unwrap().to_string();
    assert_eq!(v["owner"], "1001");
    assert_eq!(v["name"], "holiday video.mp4");
    assert_eq!(v["size"], file.len());
    assert_eq!(v["piece_size"], 65_536);
    assert_eq!(v["pieces"], 3);
    assert_eq!(v["policy"], "subscribers");
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/shares/{cid}/manifest").as_str())
    );
    let acc = api.accounts.require("1001").await.unwrap();
    assert_eq!((acc.used_bytes, acc.reserved_bytes), (file.len() as u64, 0));

    // The manifest: exact bytes, its SHA-256 is the content id.
    let auth = basic("1002", "pw2");
    let r = get(
        a,
        &format!("/v1/shares/{cid}/manifest"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(sha_hex(&r.body), cid);
    let want = format!(
        "{{\"name\":\"holiday video.mp4\",\"size\":{},\"piece_size\":65536,\"pieces\":[\"{}\",\"{}\",\"{}\"]}}",
        file.len(),
        sha_hex(&file[..65_536]),
        sha_hex(&file[65_536..131_072]),
        sha_hex(&file[131_072..])
    );
    assert_eq!(String::from_utf8(r.body).unwrap(), want);

    // Pieces.
    for (n, range) in [
        (0, 0..65_536),
        (1, 65_536..131_072),
        (2, 131_072..file.len()),
    ] {
        let r = get(
            a,
            &format!("/v1/pieces/{cid}/{n}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-length"),
            Some(range.len().to_string().as_str())
        );
        assert_eq!(r.body, &file[range]);
    }
    let r = get(
        a,
        &format!("/v1/pieces/{cid}/3"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!((r.status, r.error().as_str()), (404, "not-found"));
    let r = get(
        a,
        &format!("/v1/pieces/{cid}/x"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 400);
    let r = get(
        a,
        &format!("/v1/pieces/{}/0", "0".repeat(64)),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 404);

    // Whole content and ranges.
    let url = format!("/v1/content/{cid}");
    let r = get(a, &url, &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.body, file);
    let size = file.len();
    for (range, first, last) in [
        ("bytes=10-19", 10, 19),
        ("bytes=65530-65545", 65_530, 65_545),
        (&format!("bytes={}-", size - 5) as &str, size - 5, size - 1),
        ("bytes=-7", size - 7, size - 1),
        (&format!("bytes=100-{}", size + 100) as &str, 100, size - 1),
    ] {
        let r = get(a, &url, &[("Authorization", &auth), ("Range", range)]).await;
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {first}-{last}/{size}").as_str()),
            "{range}"
        );
        assert_eq!(r.body, &file[first..=last], "{range}");
    }
    let r = get(
        a,
        &url,
        &[
            ("Authorization", &auth),
            ("Range", &format!("bytes={size}-")),
        ],
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    assert_eq!(r.error(), "range-not-satisfiable");

    // Metadata by name, and Digest works like Basic.
    let r = get(a, "/v1/shares/1001/holiday%20video.mp4", &[]).await;
    assert_eq!(r.status, 401);
    let challenge = r
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
        .map(|(_, v)| v.clone())
        .find(|c| c.starts_with("Digest ") && c.contains("MD5"))
        .expect("a Digest MD5 challenge");
    let path = "/v1/shares/1001/holiday%20video.mp4";
    let d = respond(&challenge, "1003", "pw3", "GET", path, "cn", 1).unwrap();
    let r = get(a, path, &[("Authorization", &d)]).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["content_id"], cid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refusals_and_replacement() {
    let api = api(1000, 0).await;
    let a = api.addr;
    let body = data(2500, 1);
    // Credentials: none, wrong, another user, a token.
    let r = request(a, "PUT", "/v1/shares/1001/f", &[], &body).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    let r = publish(a, "1001", "wrong", "/v1/shares/1001/f", &body).await;
    assert_eq!(r.status, 401);
    let r = publish(a, "1002", "pw2", "/v1/shares/1001/f", &body).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let r = request(a, "PUT", "/v1/shares/1001/f?token=abc", &[], &body).await;
    assert_eq!(r.status, 401);
    // Names.
    for bad in [
        "..",
        ".",
        ".hidden",
        "a%2Fb",
        "a%5Cb",
        "a%00b",
        &"x".repeat(256),
    ] {
        let r = publish(a, "1001", "pw1", &format!("/v1/shares/1001/{bad}"), &body).await;
        assert_eq!((r.status, r.error().as_str()), (400, "bad-name"), "{bad}");
    }
    // Policy.
    let r = publish(a, "1001", "pw1", "/v1/shares/1001/f?policy=sip:@x", &body).await;
    assert_eq!((r.status, r.error().as_str()), (400, "bad-policy"));
    // No Content-Length (chunked): 411.
    let r = request(
        a,
        "PUT",
        "/v1/shares/1001/f",
        &[
            ("Authorization", &basic("1001", "pw1")),
            ("Transfer-Encoding", "chunked"),
        ],
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 411);
    // Quota: 10 MB.
    let raw = format!(
        "PUT /v1/shares/1001/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {}\r\nContent-Length: 10000001\r\n\r\n",
        basic("1001", "pw1")
    );
    let r = send_raw(a, raw.as_bytes()).await;
    assert_eq!((r.status, r.error().as_str()), (403, "quota-exceeded"));
    // A body that ends early: nothing kept, nothing charged.
    let mut s = TcpStream::connect(a).await.unwrap();
    let raw = format!(
        "PUT /v1/shares/1001/short HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {}\r\nContent-Length: 5000\r\n\r\n0123456789",
        basic("1001", "pw1")
    );
    s.write_all(raw.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let acc = api.accounts.require("1001").await.unwrap();
        if acc.reserved_bytes == 0 {
            assert_eq!(acc.used_bytes, 0);
            break;
        }
        assert!(Instant::now() < deadline, "reservation not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(
        a,
        "/v1/shares/1001/short",
        &[("Authorization", &basic("1001", "pw1"))],
    )
    .await;
    assert_eq!(r.status, 404);

    // Admin may publish for a user; re-publishing replaces and gives the old space back.
    let admin = format!("Bearer {ADMIN}");
    let r = request(
        a,
        "PUT",
        "/v1/shares/1001/f?policy=public",
        &[("Authorization", &admin)],
        &body,
    )
    .await;
    assert_eq!(r.status, 201);
    let first = r.json()["content_id"].as_str().unwrap().to_string();
    assert_eq!(api.accounts.require("1001").await.unwrap().used_bytes, 2500);
    let r = publish(
        a,
        "1001",
        "pw1",
        "/v1/shares/1001/f?policy=public",
        &body[..700],
    )
    .await;
    assert_eq!(r.status, 201);
    let second = r.json()["content_id"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    assert_eq!(api.accounts.require("1001").await.unwrap().used_bytes, 700);
    let r = get(a, &format!("/v1/shares/{first}/manifest"), &[]).await;
    assert_eq!(r.status, 404, "the replaced content is gone");
    let r = get(a, &format!("/v1/content/{second}"), &[]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &body[..700]));
    let r = request(
        a,
        "PUT",
        "/v1/shares/ghost/f",
        &[("Authorization", &admin)],
        &body,
    )
    .await;
    assert_eq!(r.status, 404);
    // Delete.
    let r = request(
        a,
        "DELETE",
        "/v1/shares/1001/f",
        &[("Authorization", &basic("1002", "pw2"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 403);
    let r = request(
        a,
        "DELETE",
        "/v1/shares/1001/f",
        &[("Authorization", &basic("1001", "pw1"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(api.accounts.require("1001").await.unwrap().used_bytes, 0);
    let r = get(a, &format!("/v1/content/{second}"), &[]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_tokens_and_listing() {
    let api = api(1000, 0).await;
    let a = api.addr;
    let mut ids = std::collections::HashMap::new();
    for (name, policy) in [
        ("pub", "public"),
        ("subs", "subscribers"),
        ("only1003", "sip:1003@example.com"),
    ] {
        let r = publish(
            a,
            "1001",
            "pw1",
            &format!("/v1/shares/1001/{name}?policy={policy}"),
            name.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 201, "{name}");
        ids.insert(name, r.json()["content_id"].as_str().unwrap().to_string());
    }
    let m = |n: &str| format!("/v1/shares/{}/manifest", ids[n]);
    let b1002 = basic("1002", "pw2");
    let b1003 = basic("1003", "pw3");
    let admin = format!("Bearer {ADMIN}");
    // Anonymous: public only.
    assert_eq!(get(a, &m("pub"), &[]).await.status, 200);
    let r = get(a, &m("subs"), &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    // Subscribers.
    assert_eq!(
        get(a, &m("subs"), &[("Authorization", &b1002)])
            .await
            .status,
        200
    );
    let r = get(a, &m("only1003"), &[("Authorization", &b1002)]).await;
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    assert_eq!(
        get(a, &m("only1003"), &[("Authorization", &b1003)])
            .await
            .status,
        200
    );
    assert_eq!(
        get(
            a,
            &m("only1003"),
            &[("Authorization", &basic("1001", "pw1"))]
        )
        .await
        .status,
        200,
        "owner"
    );
    assert_eq!(
        get(a, &m("only1003"), &[("Authorization", &admin)])
            .await
            .status,
        200
    );

    // Offer tokens: open their content only, in the query or as Bearer.
    let shares = Shares::open(
        Db::open(&api.url).await.unwrap(),
        api._dir.path().join("data"),
        "example.com",
        ShareSettings::default(),
    )
    .await
    .unwrap();
    let tok = shares.issue_offer_token(&ids["only1003"]);
    let r = get(a, &format!("{}?token={tok}", m("only1003")), &[]).await;
    assert_eq!(r.status, 200);
    let bearer = format!("Bearer {tok}");
    let piece = format!("/v1/pieces/{}/0", ids["only1003"]);
    let r = get(a, &piece, &[("Authorization", &bearer)]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, b"only1003".as_slice()));
    let r = get(a, &format!("{}?token={tok}", m("subs")), &[]).await;
    assert_eq!(r.status, 401, "a token opens only its content");
    let r = get(a, &format!("/v1/content/{}?token=junk", ids["pub"]), &[]).await;
    assert_eq!(
        r.status, 401,
        "a bad token is refused even on public content"
    );

    // Listing.
    let names = |r: Resp| -> Vec<String> {
        assert_eq!(r.status, 200);
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(get(a, "/v1/shares/1001", &[]).await), ["pub"]);
    assert_eq!(
        names(get(a, "/v1/shares/1001", &[("Authorization", &b1002)]).await),
        ["pub", "subs"]
    );
    assert_eq!(
        names(get(a, "/v1/shares/1001", &[("Authorization", &b1003)]).await),
        ["only1003", "pub", "subs"]
    );
    assert_eq!(
        names(get(a, "/v1/shares/1001", &[("Authorization", &admin)]).await).len(),
        3
    );
    assert!(names(get(a, "/v1/shares/1002", &[]).await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_lists_server_and_announced_holders() {
    let api = api(1000, 0).await;
    let a = api.addr;
    let body = data(9500, 3); // 10 pieces
    let r = publish(a, "1001", "pw1", "/v1/shares/1001/f?policy=public", &body).await;
    let cid = r.json()["content_id"].as_str().unwrap().to_string();
    let url = format!("/v1/index/{cid}");
    let r = get(a, &url, &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["content_id"], cid.as_str());
    assert_eq!(v["pieces"], 10);
    let holders = v["holders"].as_array().unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0]["peer_id"], "server");
    assert_eq!(holders[0]["address"], a.to_string().as_str());
    assert_eq!(holders[0]["have"], Bitfield::full(10).to_base64().as_str());
    assert_eq!(holders[0]["have"], "/8A=");
    let ls = holders[0]["last_seen"].as_str().unwrap();
    assert!(
        ls.len() == 20 && ls.ends_with('Z') && ls.as_bytes()[10] == b'T',
        "{ls}"
    );

    let mut have = Bitfield::empty(10);
    have.set(0, true);
    have.set(9, true);
    let ann =
        serde_json::json!({"peer_id":"peer-a","address":"127.0.0.1:9101","have":have.to_base64()});
    // Announces are authenticated (issue 10), even for public content.
    let anon = request(
        a,
        "POST",
        &format!("{url}/announce"),
        &[("Content-Type", "application/json")],
        ann.to_string().as_bytes(),
    )
    .await;
    assert_eq!(anon.status, 401);
    let auth = basic("1003", "pw3");
    let post = |body: serde_json::Value| {
        let url = format!("{url}/announce");
        let auth = auth.clone();
        async move {
            request(
                a,
                "POST",
                &url,
                &[
                    ("Content-Type", "application/json"),
                    ("Authorization", &auth),
                ],
                body.to_string().as_bytes(),
            )
            .await
        }
    };
    let r = post(ann).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["holders"].as_array().unwrap().len(), 2);
    let v = get(a, &url, &[]).await.json();
    let peer = &v["holders"][1];
    assert_eq!(peer["peer_id"], "peer-a");
    assert_eq!(peer["address"], "127.0.0.1:9101");
    assert_eq!(peer["have"], "gEA=");
    let back = Bitfield::from_base64(peer["have"].as_str().unwrap(), 10).unwrap();
    assert!(back.get(0) && back.get(9) && !back.get(1));

    for (bad, why) in [
        (
            serde_json::json!({"peer_id":"p","address":"127.0.0.1:1","have":"%%%"}),
            "base64",
        ),
        (
            serde_json::json!({"peer_id":"p","address":"127.0.0.1:1","have":"AAAA"}),
            "length",
        ),
        (
            serde_json::json!({"peer_id":"server","address":"127.0.0.1:1","have":"AAA="}),
            "peer id",
        ),
        (
            serde_json::json!({"peer_id":"p","address":"nowhere","have":"AAA="}),
            "address",
        ),
        (serde_json::json!({"peer_id":"p"}), "fields"),
    ] {
        let r = post(bad).await;
        assert_eq!(
            (r.status, r.error().as_str()),
            (400, "bad-announce"),
            "{why}"
        );
    }
    // Announcing needs content access like fetching.
    let r = publish(
        a,
        "1001",
        "pw1",
        "/v1/shares/1001/private?policy=1003",
        b"x",
    )
    .await;
    let private = r.json()["content_id"].as_str().unwrap().to_string();
    let r = request(
        a,
        "POST",
        &format!("/v1/index/{private}/announce"),
        &[],
        br#"{"peer_id":"p","address":"127.0.0.1:1","have":"gA=="}"#,
    )
    .await;
    assert_eq!(r.status, 401);
    let r = get(
        a,
        &format!("/v1/index/{private}"),
        &[("Authorization", &basic("1003", "pw3"))],
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_egress_is_rate_limited_and_counted() {
    // 200 kB/s shared by all downloads, 20 kB burst.
    let api = api(65_536, 200_000).await;
    let a = api.addr;
    let body = data(150_000, 9);
    let r = publish(a, "1001", "pw1", "/v1/shares/1001/f?policy=public", &body).await;
    let cid = r.json()["content_id"].as_str().unwrap().to_string();
    let before = METRICS.share_bytes_total(ShareSource::Server);
    let t = Instant::now();
    // Two downloads at once share the bucket: 300 kB at 200 kB/s is about 1.4 s.
    let url = format!("/v1/content/{cid}");
    let (x, y) = tokio::join!(get(a, &url, &[]), get(a, &url, &[]));
    let elapsed = t.elapsed();
    assert_eq!(x.body, body);
    assert_eq!(y.body, body);
    assert!(elapsed >= Duration::from_millis(1200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    let r = get(a, &format!("/v1/pieces/{cid}/2"), &[]).await;
    assert_eq!(r.body, &body[131_072..]);
    // Other tests in this process may add to the counter too: at least ours.
    let sent = METRICS.share_bytes_total(ShareSource::Server) - before;
    assert!(sent >= 300_000 + (150_000 - 131_072) as u64, "{sent}");
    let m = get(a, "/metrics", &[]).await;
    let text = String::from_utf8(m.body).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("callvault_share_bytes_total{source=\"server\"} "))
        .expect("share bytes metric");
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= before + sent, "{line}");
}

// ---------------------------------------------------------------------------------------------
// `callvault serve` and `callvault share publish`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_cli_publish_and_http_fetch() {
    let mut server = Server::prepare(ServerConfig::new());
    server.account_add("1001", "pw1", "1111", "10MiB");
    server.account_add("1002", "pw2", "2222", "10MiB");
    let file = data(600_000, 11); // 3 pieces of the default 256 KiB
    let path = server.dir.path().join("clip.bin");
    std::fs::write(&path, &file).unwrap();
    let v = server.share_publish("1001", &path, &["--policy", "1002@example.com"]);
    assert_eq!(v["name"], "clip.bin");
    assert_eq!(v["pieces"], 3);
    assert_eq!(v["policy"], "sip:1002@example.com");
    let cid = v["content_id"].as_str().unwrap().to_string();
    // A bad name is refused before anything is stored.
    let out = std::process::Command::new(common::callvault_bin())
        .args(["share", "publish", "1001"])
        .arg(&path)
        .args(["--name", "../x", "--config"])
        .arg(&server.config_path)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());

    server.start();
    let a = server.http_addr();
    let auth = basic("1002", "pw2");
    let r = get(
        a,
        &format!("/v1/shares/{cid}/manifest"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_ne!(
        r.error(),
        "shares-disabled",
        "shares are not wired: server.rs must set HttpState::shares (Shares::open)"
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(sha_hex(&r.body), cid);
    let mut got = Vec::new();
    for n in 0..3 {
        let r = get(
            a,
            &format!("/v1/pieces/{cid}/{n}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, 200);
        got.extend_from_slice(&r.body);
    }
    assert_eq!(sha_hex(&got), sha_hex(&file));
    assert_eq!(
        get(
            a,
            &format!("/v1/content/{cid}"),
            &[("Authorization", &basic("1001", "pw1"))]
        )
        .await
        .status,
        200
    );

    // HTTP publish on the running server.
    let r = publish(
        a,
        "1002",
        "pw2",
        "/v1/shares/1002/notes.txt?policy=public",
        b"hello",
    )
    .await;
    assert_eq!(r.status, 201);
    let cid2 = r.json()["content_id"].as_str().unwrap().to_string();
    let r = get(a, &format!("/v1/content/{cid2}"), &[("Range", "bytes=1-3")]).await;
    assert_eq!((r.status, r.body.as_slice()), (206, b"ell".as_slice()));

    let metrics = server.metrics();
    let n: u64 = metrics
        .lines()
        .find(|l| l.starts_with("callvault_share_bytes_total{source=\"server\"} "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("callvault_share_bytes_total{source=\"server\"}");
    assert!(n >= 2 * 600_000 + 3, "{n}");
}
