//! Attacks on a running `callvault serve` over loopback (issue 10, findings 4, 5, 7, 10): each
//! test plays the attacker and asserts the defended outcome. Attackers use their own loopback
//! addresses (127.0.x.y) so per-source limits can tell them from the legitimate client on
//! 127.0.0.1. Every flood is bounded in count and time.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callvault::sip::message::{parse, HeaderAccess, Method, Request, SipMessage};
use common::http::{basic, parse as parse_http, Resp};
use common::{metric_value, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ua::{Call, Ua};

/// Growth of the server's resident memory allowed during a flood (before the fixes: 2 GB for
/// a password flood of 16 clients).
const RSS_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

async fn connect_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((src, 0)))?;
    tokio::time::timeout(Duration::from_secs(5), s.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timeout"))?
}

/// One request from `src`; the status (None: no answer, e.g. the connection was refused).
async fn status_from(src: [u8; 4], to: SocketAddr, raw: &str) -> Option<Resp> {
    let mut s = connect_from(src, to).await.ok()?;
    s.write_all(raw.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    if !out.windows(4).any(|w| w == b"\r\n\r\n") {
        return None;
    }
    Some(parse_http(&out))
}

fn get_raw(target: &str, auth: Option<&str>) -> String {
    let mut r = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(a) = auth {
        r.push_str(&format!("Authorization: {a}\r\n"));
    }
    r.push_str("\r\n");
    r
}

fn server_with(accounts: &[(&str, &str)], trust_loopback: bool, extra: &str) -> Server {
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = trust_loopback;
    cfg.extra = extra.to_string();
    let mut srv = Server::prepare(cfg);
    for (u, pw) in accounts {
        srv.account_add(u, pw, "1234", "1000000");
    }
    srv.start();
    srv
}

fn metric(srv: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&srv.metrics(), name, labels).unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// Finding 4: 32 clients guessing Basic passwords for a few seconds. Argon2 runs in a couple of
/// slots (the rest get 503), so memory stays bounded; a remembered login is served during the
/// flood and a new login succeeds once it ends; repeated digest failures lock the source out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_flood_keeps_memory_bounded_and_locks_guessers_out() {
    let srv = server_with(&[("1001", "pw1"), ("1003", "pw3")], true, "");
    let http = srv.http_addr();
    let me = [127, 0, 0, 1];
    let legit = basic("1001", "pw1");
    let r = status_from(me, http, &get_raw("/v1/accounts/1001", Some(&legit)))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let base = srv.rss_kib();

    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let (counts, stop) = (counts.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A new user name each time: only the source and the slots can stop it.
                let auth = basic(&format!("guess{i}x{n}"), "wrong");
                let st = status_from(
                    [127, 0, 1, i + 1],
                    http,
                    &get_raw("/v1/accounts/x", Some(&auth)),
                )
                .await
                .map_or(0, |r| r.status);
                let slot = match st {
                    401 => 0,
                    429 => 1,
                    503 => 2,
                    _ => 3,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let flood_for = Duration::from_secs(4);
    let start = Instant::now();
    let mut peak = base;
    let mut served_during = None;
    while start.elapsed() < flood_for {
        peak = peak.max(srv.rss_kib());
        if served_during.is_none() && start.elapsed() > Duration::from_secs(2) {
            let r = status_from(me, http, &get_raw("/v1/accounts/1001", Some(&legit))).await;
            served_during = Some(r.map_or(0, |r| r.status));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    peak = peak.max(srv.rss_kib());
    let [c401, c429, c503, other] = [0, 1, 2, 3].map(|i| counts[i].load(Ordering::Relaxed));
    eprintln!(
        "password flood: RSS {base} -> peak {peak} KiB; answers 401={c401} 429={c429} 503={c503} other={other}"
    );
    assert!(
        peak < base + RSS_GROWTH_LIMIT_KIB,
        "RSS grew from {base} to {peak} KiB during the flood"
    );
    assert_eq!(
        served_during,
        Some(200),
        "remembered login during the flood"
    );
    assert!(c503 > 0, "excess password checks shed with 503");
    assert_eq!(other, 0, "every attempt answered 401, 429 or 503");
    assert!(
        metric(
            &srv,
            "callvault_auth_hash_busy_total",
            &[("protocol", "http")]
        ) > 0.0
    );

    // A login never seen before works once the flood is over (503s carry Retry-After: 1).
    let fresh = basic("1003", "pw3");
    let mut status = 0;
    for _ in 0..30 {
        status = status_from(me, http, &get_raw("/v1/accounts/1003", Some(&fresh)))
            .await
            .map_or(0, |r| r.status);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(status, 200, "new login after the flood");

    // Wrong digest answers from one source (cheap to send, no Argon2): locked out with 429.
    let guesser = [127, 0, 2, 1];
    let mut locked = None;
    for n in 1..=30u32 {
        let r = status_from(guesser, http, &get_raw("/v1/accounts/1003", None))
            .await
            .unwrap();
        let ch = r
            .all("WWW-Authenticate")
            .into_iter()
            .find(|c| c.starts_with("Digest"))
            .map(str::to_string);
        let Some(ch) = ch else {
            locked = Some((n, r));
            break;
        };
        let authz = callvault::sip::auth::respond(
            &ch,
            &format!("name{n}"),
            "guess",
            "GET",
            "/v1/accounts/1003",
            "cn",
            1,
        )
        .unwrap();
        let r = status_from(guesser, http, &get_raw("/v1/accounts/1003", Some(&authz)))
            .await
            .unwrap();
        if r.status != 401 {
            locked = Some((n, r));
            break;
        }
    }
    let (n, r) = locked.expect("the guessing source is locked out");
    assert_eq!(
        (r.status, r.error().as_str()),
        (429, "login-locked-out"),
        "after {n}"
    );
    assert!(r.header("Retry-After").is_some());
    // Locked before any password work, whatever the scheme; a login remembered as right
    // (the cache) is still served, so a guesser cannot lock a working client out.
    let r = status_from(
        guesser,
        http,
        &get_raw("/v1/accounts/1003", Some(&basic("1003", "x"))),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429);
    let r = status_from(guesser, http, &get_raw("/v1/accounts/1003", Some(&fresh)))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        metric(
            &srv,
            "callvault_auth_source_lockouts_total",
            &[("protocol", "http")]
        ) >= 1.0
    );
    // Others are not affected.
    let r = status_from(me, http, &get_raw("/v1/accounts/1003", Some(&fresh)))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

const HALF_HTTP: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ";
const HALF_SIP: &[u8] =
    b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.3;branch=z9hG4bKx\r\n";

/// Opens `n` connections from `src` to `to`, writes `half` on each and keeps them.
async fn hold_half_sent(src: [u8; 4], to: SocketAddr, n: usize, half: &[u8]) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let Ok(mut s) = connect_from(src, to).await else {
            continue;
        };
        if s.write_all(half).await.is_ok() {
            held.push(s);
        }
    }
    held
}

/// Does the server close `s` (EOF or reset) within `within`?
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a 503 refusal before the close
        }
    }
}

fn sip_options_over_tcp(sip: SocketAddr) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&sip, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = s.local_addr().unwrap();
    let msg = format!(
        "OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {local};branch=z9hG4bKlegit1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:1001@example.com>;tag=a1\r\nTo: <sip:example.com>\r\n\
         Call-ID: legit-options-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(msg.as_bytes()).unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "SIP TCP closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    match parse(&got).unwrap() {
        SipMessage::Response(r) => r.status,
        SipMessage::Request(_) => panic!("request instead of a response"),
    }
}

/// Finding 5: thousands of half-sent requests on HTTP and SIP over TCP. The per-source caps
/// refuse most at once, the header timeouts close the rest; HTTP, SIP over TCP and a new call
/// keep working, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_flood_leaves_http_sip_and_calls_working() {
    let extra = "[limits]\nhttp_header_timeout_secs = 2\nsip_tcp_message_timeout_secs = 2\n\
                 http_max_connections_per_source = 100\nsip_tcp_max_connections_per_source = 50";
    let srv = server_with(&[("1001", "pw1"), ("1002", "pw2")], true, extra);
    let (http, sip) = (srv.http_addr(), srv.sip_addr());
    let base = srv.rss_kib();

    let start = Instant::now();
    let mut held_http = hold_half_sent([127, 0, 0, 2], http, 2000, HALF_HTTP).await;
    let mut held_sip = hold_half_sent([127, 0, 0, 3], sip, 1000, HALF_SIP).await;
    eprintln!(
        "flood: {} HTTP + {} SIP TCP half-sent in {:?}",
        held_http.len(),
        held_sip.len(),
        start.elapsed()
    );
    let peak = srv.rss_kib();

    // While the flood is held: HTTP, SIP over TCP and a new call.
    let r = status_from(
        [127, 0, 0, 1],
        http,
        &get_raw("/v1/accounts/1001", Some(&basic("1001", "pw1"))),
    )
    .await
    .expect("HTTP answers during the flood");
    assert_eq!(r.status, 200);
    assert_eq!(sip_options_over_tcp(sip), 200);
    let sip2 = sip;
    tokio::task::spawn_blocking(move || drop(Call::establish(sip2, "1001", "1002")))
        .await
        .unwrap();

    let m = srv.metrics();
    let active_http =
        metric_value(&m, "callvault_connections_active", &[("listener", "http")]).unwrap();
    let refused_http = metric_value(
        &m,
        "callvault_connections_refused_total",
        &[("listener", "http")],
    )
    .unwrap();
    let refused_sip = metric_value(
        &m,
        "callvault_connections_refused_total",
        &[("listener", "sip_tcp")],
    )
    .unwrap();
    eprintln!("active http {active_http}, refused http {refused_http}, sip {refused_sip}; RSS {base} -> {peak} KiB");
    assert!(active_http <= 102.0, "per-source cap holds: {active_http}");
    assert!(refused_http >= 1800.0, "{refused_http}");
    assert!(refused_sip >= 900.0, "{refused_sip}");
    assert!(
        peak < base + RSS_GROWTH_LIMIT_KIB,
        "RSS {base} -> {peak} KiB"
    );

    // A SIP message larger than the per-connection buffer limit: answered and closed.
    let mut big = connect_from([127, 0, 0, 1], sip).await.unwrap();
    let head = "MESSAGE sip:1002@example.com SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5;branch=z9hG4bKbig\r\n\
                From: <sip:1001@example.com>;tag=b\r\nTo: <sip:1002@example.com>\r\nCall-ID: big\r\n\
                CSeq: 1 MESSAGE\r\nContent-Length: 200000\r\n\r\n";
    big.write_all(head.as_bytes()).await.unwrap();
    let _ = big.write_all(&vec![b'x'; 70_000]).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("SIP/2.0 513") || text.starts_with("SIP/2.0 400"),
        "oversized message answered and closed: {text:?}"
    );

    // The connections that were let in are closed by the header/message timeouts (2 s).
    let mut closed = 0;
    for s in held_http.iter_mut().chain(held_sip.iter_mut()) {
        if closed_by_server(s, Duration::from_secs(4)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        held_http.len() + held_sip.len(),
        "every flood connection closed"
    );
    let m = srv.metrics();
    assert_eq!(
        metric_value(
            &m,
            "callvault_connections_active",
            &[("listener", "sip_tcp")]
        ),
        Some(0.0)
    );
    assert!(srv.rss_kib() < base + RSS_GROWTH_LIMIT_KIB);
}

/// A SIP REGISTER for `user` from `sock`, with `authz` if given.
fn register(
    sock: &UdpSocket,
    server: SocketAddr,
    user: &str,
    n: u32,
    authz: Option<&str>,
) -> Request {
    let local = sock.local_addr().unwrap();
    let mut req = Request::new(Method::Register, "sip:example.com".to_string());
    req.headers
        .push("Via", format!("SIP/2.0/UDP {local};branch=z9hG4bKatk{n}"));
    req.headers.push("Max-Forwards", "70");
    req.headers
        .push("From", format!("<sip:{user}@example.com>;tag=atk"));
    req.headers.push("To", format!("<sip:{user}@example.com>"));
    req.headers.push("Call-ID", "attack-register@127.0.0.2");
    req.headers.push("CSeq", format!("{n} REGISTER"));
    req.headers.push("Contact", format!("<sip:{user}@{local}>"));
    req.headers.push("Expires", "300");
    if let Some(a) = authz {
        req.headers.push("Authorization", a.to_string());
    }
    sock.send_to(&req.to_bytes(), server).unwrap();
    req
}

fn response_to(sock: &UdpSocket, cseq: u32) -> callvault::sip::message::Response {
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(SipMessage::Response(r)) = parse(&buf[..n]) {
            if r.cseq().is_some_and(|c| c.seq == cseq) && r.status >= 200 {
                return r;
            }
        }
    }
    panic!("no final response to CSeq {cseq}");
}

/// Finding 4 (SIP): a digest guesser is locked out (503 + Retry-After, counted in /metrics)
/// after a few wrong answers, while another user still registers.
#[test]
fn digest_guess_flood_is_locked_out_while_others_register() {
    let srv = server_with(&[("1001", "pw1"), ("1002", "pw2")], false, "");
    let sip = srv.sip_addr();
    let sock = UdpSocket::bind("127.0.0.2:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    register(&sock, sip, "1001", 1, None);
    let ch = response_to(&sock, 1);
    assert_eq!(ch.status, 401);
    let challenge = ch.headers.get("WWW-Authenticate").unwrap().to_string();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for n in 2..=60u32 {
        let authz = callvault::sip::auth::respond(
            &challenge,
            "1001",
            &format!("guess{n}"),
            "REGISTER",
            "sip:example.com",
            "cn",
            n,
        )
        .unwrap();
        register(&sock, sip, "1001", n, Some(&authz));
        let r = response_to(&sock, n);
        if r.status == 503 {
            retry_after = r.headers.get("Retry-After").map(str::to_string);
        }
        statuses.push(r.status);
    }
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    let locked = statuses.iter().filter(|s| **s == 503).count();
    eprintln!("digest guesses: {wrong} checked (401), {locked} refused (503)");
    assert!(wrong <= 10, "at most 10 guesses checked: {statuses:?}");
    assert_eq!(wrong + locked, statuses.len(), "{statuses:?}");
    assert!(retry_after.is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)));
    assert!(
        metric(
            &srv,
            "callvault_auth_user_lockouts_total",
            &[("protocol", "sip")]
        ) >= 1.0
    );
    assert!(
        metric(
            &srv,
            "callvault_auth_refused_locked_total",
            &[("protocol", "sip")]
        ) >= 40.0
    );

    // Another user, from another host, registers normally.
    let mut ua = Ua::new("1002", "example.com", sip);
    let resp = ua.transact_with_digest("pw2", |ua, n, authz| {
        let aor = ua.aor();
        let mut req = Request::new(Method::Register, "sip:example.com".to_string());
        req.headers.push("Via", ua.new_via().to_string());
        req.headers.push("Max-Forwards", "70");
        req.headers.push("From", format!("<{aor}>;tag=legit"));
        req.headers.push("To", format!("<{aor}>"));
        req.headers.push("Call-ID", "legit-register");
        req.headers.push("CSeq", format!("{n} REGISTER"));
        req.headers.push("Contact", ua.contact().to_string());
        if let Some((h, v)) = authz {
            req.headers.push(h, v);
        }
        req
    });
    assert_eq!(resp.status, 200, "{resp:?}");
}

/// Finding 10: a digest response computed for the path alone, or for another query, does not
/// open a request whose target has a query.
#[tokio::test]
async fn digest_uri_must_match_the_query_too() {
    let srv = server_with(&[("1001", "pw1")], true, "");
    let http = srv.http_addr();
    let me = [127, 0, 0, 1];
    let target = "/v1/accounts/1001?view=full";
    let mut nc = 0;
    for (uri, want) in [
        ("/v1/accounts/1001", 401),
        ("/v1/accounts/1001?view=other", 401),
        (target, 200),
    ] {
        let r = status_from(me, http, &get_raw(target, None)).await.unwrap();
        assert_eq!(r.status, 401);
        let ch = r
            .all("WWW-Authenticate")
            .into_iter()
            .find(|c| c.starts_with("Digest"))
            .unwrap()
            .to_string();
        nc += 1;
        let authz =
            callvault::sip::auth::respond(&ch, "1001", "pw1", "GET", uri, "cn", nc).unwrap();
        let r = status_from(me, http, &get_raw(target, Some(&authz)))
            .await
            .unwrap();
        assert_eq!(r.status, want, "digest uri {uri}");
    }
}

/// Finding 10: `PUT .../data` (the `upload_url`) answers 401 to a stranger whether the store
/// exists or not, so store ids cannot be probed.
#[tokio::test]
async fn upload_url_answers_401_before_404() {
    let srv = server_with(&[("1001", "pw1")], true, "");
    let http = srv.http_addr();
    for target in [
        "/v1/stores/st_00000000000000000000/data?token=0123456789abcdef",
        "/v1/stores/st_00000000000000000000/data",
        "/v1/stores/no-such-store/data",
    ] {
        let raw = format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc"
        );
        let r = status_from([127, 0, 0, 1], http, &raw).await.unwrap();
        assert_eq!(
            (r.status, r.error().as_str()),
            (401, "unauthorized"),
            "{target}"
        );
    }
    // An account learns that the store does not exist.
    let raw = format!(
        "PUT /v1/stores/st_00000000000000000000/data HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: {}\r\nContent-Length: 3\r\n\r\nabc",
        basic("1001", "pw1")
    );
    let r = status_from([127, 0, 0, 1], http, &raw).await.unwrap();
    assert_eq!(r.status, 404);
}

/// `reserved_bytes` and `free_bytes` of `user` (Basic).
async fn usage(http: SocketAddr, user: &str, pw: &str) -> (u64, u64) {
    let r = status_from(
        [127, 0, 0, 1],
        http,
        &get_raw(&format!("/v1/accounts/{user}"), Some(&basic(user, pw))),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let j = r.json();
    (
        j["reserved_bytes"].as_u64().unwrap(),
        j["free_bytes"].as_u64().unwrap(),
    )
}

fn staging_entries(srv: &Server) -> usize {
    std::fs::read_dir(srv.dir.path().join("data/shares/.staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Finding 6: callvault killed (-9) during `PUT /v1/shares/...`: after the restart the
/// upload's reservation is back, its staging folder is gone, and a publish that needs the
/// space succeeds.
#[tokio::test]
async fn share_reservation_comes_back_after_a_crash_mid_upload() {
    let mut srv = server_with(&[("1001", "pw1")], true, "");
    let http = srv.http_addr();
    let (_, free0) = usage(http, "1001", "pw1").await;
    assert_eq!(free0, 1_000_000);
    let mut up = connect_from([127, 0, 0, 1], http).await.unwrap();
    let head = format!(
        "PUT /v1/shares/1001/big.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Length: 600000\r\n\r\n",
        basic("1001", "pw1")
    );
    up.write_all(head.as_bytes()).await.unwrap();
    up.write_all(&vec![7u8; 100_000]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while usage(http, "1001", "pw1").await.0 != 600_000 || staging_entries(&srv) == 0 {
        assert!(Instant::now() < deadline, "upload never reserved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    srv.kill_hard();
    drop(up);
    assert_eq!(
        staging_entries(&srv),
        1,
        "the crash left the staging folder"
    );

    srv.start();
    assert_eq!(usage(http, "1001", "pw1").await, (0, 1_000_000));
    assert_eq!(staging_entries(&srv), 0, "staging folder removed");
    // The space is really free: a 700 kB share fits.
    let body = vec![1u8; 700_000];
    let raw_head = format!(
        "PUT /v1/shares/1001/other.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: {}\r\nContent-Length: {}\r\n\r\n",
        basic("1001", "pw1"),
        body.len()
    );
    let mut raw = raw_head.into_bytes();
    raw.extend_from_slice(&body);
    let r = common::http::send_raw(http, &raw).await;
    assert!(r.status == 200 || r.status == 201, "{r:?}");
    assert_eq!(usage(http, "1001", "pw1").await, (0, 300_000));
}

const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";

/// `user` asks 1001 over SIP for `name`; the offer's token (the requester is trusted loopback:
/// its identity is its From).
fn offer_token_over_sip(srv: &Server, user: &str, name: &str) -> String {
    let mut ua = Ua::new(user, "example.com", srv.sip_addr());
    let mut req = Request::new(Method::Message, "sip:1001@example.com".to_string());
    req.headers.push("Via", ua.new_via().to_string());
    req.headers.push("Max-Forwards", "70");
    req.headers.push("From", format!("<{}>;tag=s1", ua.aor()));
    req.headers.push("To", "<sip:1001@example.com>");
    req.headers
        .push("Call-ID", format!("share-{user}-{name}@ua"));
    req.headers.push("CSeq", "1 MESSAGE");
    req.headers.push("Content-Type", SHARE_REQUEST);
    req.body = bytes::Bytes::from(format!(r#"{{"name":"{name}"}}"#));
    assert_eq!(ua.transact(&req).status, 200);
    let m = ua.expect_request(Method::Message, Some(SHARE_OFFER), ua::T);
    ua.respond(&m, 200, &[], b"");
    let offer: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    offer["token"].as_str().unwrap().to_string()
}

async fn publish(http: SocketAddr, name: &str, policy: &str, body: &[u8]) -> String {
    let head = format!(
        "PUT /v1/shares/1001/{name}?policy={policy} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: {}\r\nContent-Length: {}\r\n\r\n",
        basic("1001", "pw1"),
        body.len()
    );
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    let r = common::http::send_raw(http, &raw).await;
    assert!(r.status == 200 || r.status == 201, "{r:?}");
    r.json()["content_id"].as_str().unwrap().to_string()
}

async fn announce(
    http: SocketAddr,
    cid: &str,
    token: Option<&str>,
    peer: &str,
    addr: &str,
) -> Resp {
    let body = format!(r#"{{"peer_id":"{peer}","address":"{addr}","have":"gA=="}}"#);
    let mut raw = format!(
        "POST /v1/index/{cid}/announce HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        raw.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    raw.push_str("\r\n");
    raw.push_str(&body);
    status_from([127, 0, 0, 1], http, &raw).await.unwrap()
}

/// Finding 9: an offer token works only while the current policy still allows the requester
/// it was given to; narrowing the policy revokes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_tokens_follow_the_narrowed_policy() {
    let srv = server_with(
        &[("1001", "pw1"), ("1002", "pw2"), ("1003", "pw3")],
        true,
        "",
    );
    let http = srv.http_addr();
    let cid = publish(http, "doc.txt", "subscribers", b"the plans").await;
    let srv2 = &srv;
    let (t2, t3) = tokio::task::block_in_place(|| {
        (
            offer_token_over_sip(srv2, "1002", "doc.txt"),
            offer_token_over_sip(srv2, "1003", "doc.txt"),
        )
    });
    let content = |t: &str| get_raw(&format!("/v1/content/{cid}?token={t}"), None);
    let me = [127, 0, 0, 1];
    assert_eq!(
        status_from(me, http, &content(&t2)).await.unwrap().status,
        200
    );

    // The owner narrows the policy to 1003 (same bytes and name: same content).
    assert_eq!(
        publish(http, "doc.txt", "sip:1003@example.com", b"the plans").await,
        cid
    );
    let r = status_from(me, http, &content(&t2)).await.unwrap();
    assert_eq!((r.status, r.error().as_str()), (403, "forbidden"));
    let r = status_from(me, http, &content(&t3)).await.unwrap();
    assert_eq!(r.status, 200, "1003 is still allowed");
    // A forged holder (the MAC covers it) is refused.
    let (mac, _) = t2.split_once('.').unwrap();
    let forged = format!("{mac}.{}", {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("ssip:1003@example.com")
    });
    assert_eq!(
        status_from(me, http, &content(&forged))
            .await
            .unwrap()
            .status,
        401
    );
}

/// Finding 9: announces need the offer token; nobody can move another announcer's peer, and
/// one announcer cannot fill the index and push real peers out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announces_are_authenticated_and_holders_bounded() {
    let srv = server_with(
        &[("1001", "pw1"), ("1002", "pw2"), ("1003", "pw3")],
        true,
        "",
    );
    let http = srv.http_addr();
    let cid = publish(http, "pub.bin", "public", b"x").await;
    let srv2 = &srv;
    let (real, attacker) = tokio::task::block_in_place(|| {
        (
            offer_token_over_sip(srv2, "1002", "pub.bin"),
            offer_token_over_sip(srv2, "1003", "pub.bin"),
        )
    });

    // Anonymous announce, even of public content: refused.
    let r = announce(http, &cid, None, "anon", "127.0.0.9:1").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        announce(http, &cid, Some(&real), "real", "127.0.0.1:9000")
            .await
            .status,
        200
    );
    // Another announcer cannot take the real peer's id to redirect its traffic.
    let r = announce(http, &cid, Some(&attacker), "real", "127.0.0.9:6666").await;
    assert_eq!((r.status, r.error().as_str()), (409, "peer-id-taken"));
    // Nor flood the index: a few holders per announcer, then 429.
    let mut accepted = 0;
    let mut refused = 0;
    for i in 0..40 {
        match announce(
            http,
            &cid,
            Some(&attacker),
            &format!("fake{i}"),
            "127.0.0.9:1",
        )
        .await
        .status
        {
            200 => accepted += 1,
            429 => refused += 1,
            s => panic!("announce answered {s}"),
        }
    }
    let cap = callvault::share::index::MAX_HOLDERS_PER_ANNOUNCER;
    assert_eq!((accepted, refused), (cap, 40 - cap));
    let r = status_from(
        [127, 0, 0, 1],
        http,
        &get_raw(&format!("/v1/index/{cid}?token={real}"), None),
    )
    .await
    .unwrap();
    let holders = r.json()["holders"].as_array().unwrap().clone();
    let real_entry = holders
        .iter()
        .find(|h| h["peer_id"] == "real")
        .expect("real peer kept");
    assert_eq!(real_entry["address"], "127.0.0.1:9000");
    assert_eq!(
        holders.len(),
        1 + 1 + cap,
        "server, the real peer and the capped fakes"
    );
}
