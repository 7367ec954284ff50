//! Share requests over SIP against the real server (PROTOCOL §3 steps 2–3, §5 "Shares"):
//! `callvault serve` with files published by `callvault share publish`, the in-process SIP
//! test UA (tests/common/ua.rs) as the requester 1002 and the sharer 1001, real UDP on
//! 127.0.0.1 (a trusted range: identities are From URIs of existing accounts).

mod common;
#[path = "common/ua.rs"]
mod ua;

use bytes::Bytes;
use callvault::sip::message::{HeaderAccess, Method, Request, Response};
use common::{http_get, Server, ServerConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};
use ua::{Ua, T};

const SHARE_REQUEST: &str = "application/vnd.callvault.share-request+json";
const SHARE_OFFER: &str = "application/vnd.callvault.share-offer+json";
const ERROR: &str = "application/vnd.callvault.error+json";
const PIECE: usize = 65536;
/// Four pieces, the last one short. Printable, so the text HTTP helper returns it intact.
const SIZE: usize = 3 * PIECE + 1234;

fn content() -> Vec<u8> {
    (0..SIZE)
        .map(|i| b'a' + ((i * 7 + i / 97) % 26) as u8)
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// 1001 shares `holiday.mp4` (subscribers) and `secret.bin` (only 1003); accounts 1001-1003.
fn server() -> (Server, String) {
    let mut cfg = ServerConfig::new();
    cfg.extra = format!("[share]\npiece_size = {PIECE}");
    let server = Server::prepare(cfg);
    for user in ["1001", "1002", "1003"] {
        server.account_add(user, "secret", "4321", "10MiB");
    }
    let path = server.dir.path().join("holiday.mp4");
    std::fs::write(&path, content()).unwrap();
    let cid = server.publish_named("1001", &path, "holiday.mp4", "subscribers");
    server.publish_named("1001", &path, "secret.bin", "1003@example.com");
    let mut server = server;
    server.start();
    (server, cid)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// An out-of-dialog share request from `ua` to `sharer` (not sent).
fn share_request(ua: &mut Ua, sharer: &str, body: &str) -> Request {
    let mut req = Request::new(Method::Message, format!("sip:{sharer}@example.com"));
    let n: u64 = rand::random();
    req.headers.push("Via", ua.new_via().to_string());
    req.headers.push("Max-Forwards", "70");
    req.headers
        .push("From", format!("<{}>;tag=f{n:x}", ua.aor()));
    req.headers
        .push("To", format!("<sip:{sharer}@example.com>"));
    req.headers.push("Call-ID", format!("share-{n:x}@ua"));
    req.headers.push("CSeq", "1 MESSAGE");
    req.headers.push("Content-Type", SHARE_REQUEST);
    req.body = Bytes::from(body.to_string());
    req
}

fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(
        resp.status,
        status,
        "want {status} {code}, got {} {}: {}",
        resp.status,
        resp.reason,
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.content_type().as_deref(), Some(ERROR));
    assert_eq!(json(&resp.body)["error"], code);
    let warning = resp.headers.get("Warning").expect("Warning header");
    assert_eq!(warning, format!("399 127.0.0.1 \"{code}\""));
}

/// B's share request `body` to 1001, relayed to A's terminal, which answers `status` with
/// `answer`; the final response at B.
fn relayed(a: &mut Ua, b: &mut Ua, body: &str, status: u16, answer: &[u8]) -> Response {
    let req = share_request(b, "1001", body);
    b.send(&req);
    let m = a.expect_request(Method::Message, Some(SHARE_REQUEST), T);
    a.respond(&m, status, &[], answer);
    let branch = req.top_via().unwrap().branch().unwrap().to_string();
    b.final_response(&branch, T).unwrap()
}

/// The offer MESSAGE at `ua`, answered 200; its Request-URI and JSON.
fn take_offer(ua: &mut Ua) -> (String, Value) {
    let m = ua.expect_request(Method::Message, Some(SHARE_OFFER), T);
    ua.respond(&m, 200, &[], b"");
    (m.uri.clone(), json(&m.body))
}

/// Checks every field of an offer and that its token opens the manifest and the pieces.
fn check_offer(server: &Server, offer: &Value) {
    let file = content();
    let base = format!("http://{}", server.http_addr());
    let cid = offer["content_id"]
        .as_str()
        .expect("content_id")
        .to_string();
    assert_eq!(cid.len(), 64);
    assert_eq!(offer["name"], "holiday.mp4");
    assert_eq!(offer["size"], SIZE as u64);
    assert_eq!(offer["piece_size"], PIECE as u64);
    assert_eq!(offer["pieces"], 4);
    assert_eq!(offer["server_url"], base.as_str());
    assert_eq!(
        offer["manifest_url"],
        format!("{base}/v1/shares/{cid}/manifest").as_str()
    );
    assert_eq!(
        offer["index_url"],
        format!("{base}/v1/index/{cid}").as_str()
    );
    let token = offer["token"].as_str().expect("token");
    assert!(!token.is_empty());

    let addr = server.http_addr();
    let path = |url: &str| url.strip_prefix(&base).unwrap().to_string();
    let manifest_url = offer["manifest_url"].as_str().unwrap();
    let (st, manifest) = http_get(addr, &format!("{}?token={token}", path(manifest_url))).unwrap();
    assert_eq!(st, 200, "{manifest}");
    assert_eq!(sha_hex(manifest.as_bytes()), cid);
    let hashes = json(manifest.as_bytes())["pieces"].clone();
    // Without the token the piece is closed; with it, it is the file's bytes.
    let (st, _) = http_get(addr, &format!("/v1/pieces/{cid}/1")).unwrap();
    assert_eq!(st, 401);
    for n in [0usize, 3] {
        let (st, piece) = http_get(addr, &format!("/v1/pieces/{cid}/{n}?token={token}")).unwrap();
        assert_eq!(st, 200, "piece {n}: {piece}");
        let want = &file[n * PIECE..((n + 1) * PIECE).min(SIZE)];
        assert_eq!(piece.as_bytes(), want, "piece {n}");
        assert_eq!(hashes[n], sha_hex(want).as_str());
    }
    let (st, _) = http_get(
        addr,
        &format!(
            "{}?token={token}",
            path(offer["index_url"].as_str().unwrap())
        ),
    )
    .unwrap();
    assert_eq!(st, 200);
}

#[test]
fn sharer_offline_is_answered_from_policy() {
    let (server, cid) = server();
    // The requester is not registered: the offer goes back to where its request came from.
    let mut b = Ua::new("1002", "example.com", server.sip_addr());

    // (a) Sharer not registered, policy `subscribers`: 200 then the offer.
    let req = share_request(&mut b, "1001", r#"{"name":"holiday.mp4"}"#);
    let resp = b.transact(&req);
    assert_eq!(
        resp.status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&resp.body),
        server.log()
    );
    assert!(resp.to_tag().is_some());
    let (uri, offer) = take_offer(&mut b);
    assert_eq!(uri, "sip:1002@example.com");
    assert_eq!(offer["content_id"], cid.as_str());
    check_offer(&server, &offer);

    // (e) Policy denial, unknown name, bad JSON.
    let req = share_request(&mut b, "1001", r#"{"name":"secret.bin"}"#);
    assert_error(&b.transact(&req), 403, "share-denied");
    let req = share_request(&mut b, "1001", r#"{"name":"nothing.here"}"#);
    assert_error(&b.transact(&req), 404, "unknown-share");
    let req = share_request(&mut b, "1009", r#"{"name":"holiday.mp4"}"#);
    assert_error(&b.transact(&req), 404, "unknown-share");
    let req = share_request(&mut b, "1001", r#"{"name": holiday"#);
    assert_error(&b.transact(&req), 400, "malformed-request");
    // 1003 is on secret.bin's list.
    let mut c = Ua::new("1003", "example.com", server.sip_addr());
    let req = share_request(&mut c, "1001", r#"{"name":"secret.bin"}"#);
    assert_eq!(c.transact(&req).status, 200);
    let (_, offer) = take_offer(&mut c);
    assert_eq!(offer["name"], "secret.bin");
    // A non-subscriber (a trusted peer's From of no account) is refused `subscribers` files.
    let mut x = Ua::new("carol", "elsewhere.org", server.sip_addr());
    let req = share_request(&mut x, "1001", r#"{"name":"holiday.mp4"}"#);
    assert_error(&x.transact(&req), 403, "share-denied");

    // (f) The list: what 1002 may see, no offer.
    let req = share_request(&mut b, "1001", r#"{"list":true}"#);
    let resp = b.transact(&req);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.content_type().as_deref(), Some("application/json"));
    let list = json(&resp.body);
    assert_eq!(list["owner"], "sip:1001@example.com");
    let shares = list["shares"].as_array().expect("shares array");
    assert_eq!(shares.len(), 1, "{list}");
    assert_eq!(shares[0]["name"], "holiday.mp4");
    assert_eq!(shares[0]["size"], SIZE as u64);
    assert_eq!(shares[0]["content_id"], cid.as_str());
    let req = share_request(&mut c, "1001", r#"{"list":true}"#);
    let names: Vec<String> = json(&c.transact(&req).body)["shares"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["holiday.mp4", "secret.bin"]);
    assert!(
        b.wait_request(
            Method::Message,
            Some(SHARE_OFFER),
            std::time::Duration::from_millis(300)
        )
        .is_none(),
        "no offer after a list"
    );
}

#[test]
fn sharer_online_forwards_refuses_or_is_unavailable() {
    let (server, cid) = server();
    let mut a = Ua::new("1001", "example.com", server.sip_addr());
    a.register();
    let mut b = Ua::new("1002", "example.com", server.sip_addr());
    b.register();

    // (b) The sharer's terminal forwards: 200 to B, then the offer to B's contact.
    let req = share_request(&mut b, "1001", r#"{"name":"holiday.mp4"}"#);
    b.send(&req);
    let m = a.expect_request(Method::Message, Some(SHARE_REQUEST), T);
    assert_eq!(&m.body[..], br#"{"name":"holiday.mp4"}"#);
    assert_eq!(m.uri, a.contact().uri.to_string());
    a.respond(
        &m,
        200,
        &[("Content-Type", "application/json")],
        br#"{"forward":true}"#,
    );
    let branch = req.top_via().unwrap().branch().unwrap().to_string();
    let resp = b.final_response(&branch, T).expect("answer to B");
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (uri, offer) = take_offer(&mut b);
    assert_eq!(
        uri,
        b.contact().uri.to_string(),
        "to B's registered contact"
    );
    assert_eq!(offer["content_id"], cid.as_str());
    check_offer(&server, &offer);

    // (c) The sharer refuses.
    assert_error(
        &relayed(&mut a, &mut b, r#"{"name":"holiday.mp4"}"#, 403, b""),
        403,
        "share-denied",
    );

    // (d) The sharer's terminal is unavailable (480): answered on its behalf by policy.
    assert_eq!(
        relayed(&mut a, &mut b, r#"{"name":"holiday.mp4"}"#, 480, b"").status,
        200
    );
    let (_, offer) = take_offer(&mut b);
    assert_eq!(offer["name"], "holiday.mp4");
    // ...and by policy it may be a denial.
    assert_error(
        &relayed(&mut a, &mut b, r#"{"name":"secret.bin"}"#, 480, b""),
        403,
        "share-denied",
    );

    // A forward of a name that does not exist is still unknown.
    assert_error(
        &relayed(
            &mut a,
            &mut b,
            r#"{"name":"gone.mp4"}"#,
            200,
            br#"{"forward":true}"#,
        ),
        404,
        "unknown-share",
    );

    // Other answers of the sharer are relayed as they are.
    assert_eq!(
        relayed(&mut a, &mut b, r#"{"name":"holiday.mp4"}"#, 486, b"").status,
        486
    );
    // The list is callvault's own answer even with the sharer online.
    let req = share_request(&mut b, "1001", r#"{"list":true}"#);
    assert_eq!(b.transact(&req).status, 200);
    assert!(a
        .wait_request(
            Method::Message,
            Some(SHARE_REQUEST),
            std::time::Duration::from_millis(300)
        )
        .is_none());
}

#[test]
fn silent_sharer_is_answered_on_its_behalf_after_the_relay_deadline() {
    let (server, cid) = server();
    let mut a = Ua::new("1001", "example.com", server.sip_addr());
    a.register();
    let mut b = Ua::new("1002", "example.com", server.sip_addr());

    // The sharer's terminal takes the request and never answers: well before Timer F (32 s,
    // when B itself would give up) callvault answers from the policy.
    let req = share_request(&mut b, "1001", r#"{"name":"holiday.mp4"}"#);
    let sent = std::time::Instant::now();
    b.send(&req);
    a.expect_request(Method::Message, Some(SHARE_REQUEST), T);
    let branch = req.top_via().unwrap().branch().unwrap().to_string();
    let resp = b
        .final_response(&branch, std::time::Duration::from_secs(20))
        .expect("answered on the sharer's behalf");
    let took = sent.elapsed();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(
        took >= std::time::Duration::from_secs(9) && took < std::time::Duration::from_secs(15),
        "answered after {took:?}"
    );
    let (_, offer) = take_offer(&mut b);
    assert_eq!(offer["content_id"], cid.as_str());
}
