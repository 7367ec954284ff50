//! Acceptance tests of in-call storage (issue 3, PROTOCOL.md §2 and §5) against the real
//! server: a `callvault serve` process per test, the in-process SIP test UA (tests/common/ua.rs)
//! as terminals A (1001, the sender) and B (1002, the receiver), real UDP on 127.0.0.1.

mod common;
#[path = "common/ua.rs"]
mod ua;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callvault::sip::dialog::Dialog;
use callvault::sip::message::{HeaderAccess, Method, Request, Response};
use callvault::storage::stores::Store;
use common::{Server, ServerConfig};
use serde_json::Value;
use ua::{payload, sdp, sdp_audio, Call, Rtp, Ua, PCMU, T};

const STORE_REQUEST: &str = "application/vnd.callvault.store-request+json";
const STORE_ACCEPTED: &str = "application/vnd.callvault.store-accepted+json";
const PROMPT: &str = "application/vnd.callvault.prompt+json";
const READY: &str = "application/vnd.callvault.ready+json";
const ERROR: &str = "application/vnd.callvault.error+json";
const QUOTA: u64 = 50 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Fixture

/// A server with accounts 1001 and 1002 (PIN 4321, 50 MiB) plus `more` (user, quota).
fn server_with(extra: &str, more: &[(&str, &str)], env: &[(&str, &str)]) -> Server {
    let mut cfg = ServerConfig::new();
    cfg.extra = extra.to_string();
    let mut s = Server::prepare(cfg);
    for (k, v) in env {
        s.set_env(k, v);
    }
    s.account_add("1001", "secret", "4321", "50MiB");
    s.account_add("1002", "secret", "4321", "50MiB");
    for (user, quota) in more {
        s.account_add(user, "secret", "4321", quota);
    }
    s.start();
    s
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn ct(m: &impl HeaderAccess) -> String {
    m.content_type().unwrap_or_default()
}

/// B asks for storage with a MESSAGE carrying `body`.
fn store_request(c: &mut Call, body: &str) -> Response {
    c.b.in_dialog(
        &mut c.bd,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        body.as_bytes(),
    )
}

/// Asserts an error answer of §2.2/§5: status, JSON body with `error`, Warning 399 "CODE".
fn assert_error(resp: &Response, status: u16, code: &str) {
    assert_eq!(
        resp.status,
        status,
        "want {status} {code}, got {} {}: {}",
        resp.status,
        resp.reason,
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(ct(resp), ERROR, "content type of {status} {code}");
    let v = json(&resp.body);
    assert_eq!(v["error"], code, "error body {v}");
    assert!(v["detail"].is_string(), "detail in {v}");
    let warning = resp.headers.get("Warning").expect("Warning header");
    assert!(
        warning == format!("399 127.0.0.1 \"{code}\""),
        "Warning: {warning}"
    );
}

/// A's side of the prompt: the next prompt MESSAGE, answered 200; its JSON.
fn take_prompt(a: &mut Ua) -> Value {
    let p = a.expect_request(Method::Message, Some(PROMPT), T);
    a.respond(&p, 200, &[], b"");
    json(&p.body)
}

/// B's side of the ready note: the next ready MESSAGE, answered 200; its JSON.
fn take_ready(b: &mut Ua, timeout: Duration) -> Value {
    let r = b.expect_request(Method::Message, Some(READY), timeout);
    b.respond(&r, 200, &[], b"");
    json(&r.body)
}

/// A store request accepted in direct mode; returns the prompt A received.
fn accepted_prompt(c: &mut Call, body: &str) -> Value {
    let resp = store_request(c, body);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(ct(&resp), STORE_ACCEPTED);
    take_prompt(&mut c.a)
}

/// A's store session to the prompt's `store_uri`, declaring `size` bytes, answered 200: the
/// dialog and where to send RTP.
fn open_store_session(c: &mut Call, prompt: &Value, size: u64, rtp: &Rtp) -> (Dialog, SocketAddr) {
    let (r, d) = store_invite(
        &mut c.a,
        prompt["store_uri"].as_str().unwrap(),
        Some(size),
        rtp,
    );
    assert_eq!(r.status, 200);
    (d.unwrap(), store_port(&r))
}

/// A store session: INVITE to `uri` from `ua` with a PCMU sendonly offer.
fn store_invite(
    ua: &mut Ua,
    uri: &str,
    size: Option<u64>,
    rtp: &Rtp,
) -> (Response, Option<Dialog>) {
    let size = size.map(|s| s.to_string());
    let mut extra = Vec::new();
    if let Some(s) = &size {
        extra.push(("Callvault-Data-Size", s.as_str()));
    }
    let inv = ua.invite_request(uri, &extra, &sdp(rtp.port, PCMU, "sendonly"));
    ua.invite(&inv)
}

fn play_invite(ua: &mut Ua, uri: &str, rtp: &Rtp) -> (Response, Option<Dialog>) {
    let inv = ua.invite_request(uri, &[], &sdp(rtp.port, PCMU, "recvonly"));
    ua.invite(&inv)
}

/// Sends packets `range` of the test stream (PCMU, SSRC `ssrc`) at 20 ms.
fn send_stream(rtp: &Rtp, to: SocketAddr, ssrc: u32, range: std::ops::Range<u32>) {
    for i in range {
        rtp.send(to, 0, i == 0, 1000 + i as u16, 160 * i, ssrc, &payload(i));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn account(server: &Server, user: &str) -> Value {
    let out = std::process::Command::new(common::callvault_bin())
        .args(["account", "show", user, "--config"])
        .arg(&server.config_path)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "account show {user}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("JSON line");
    serde_json::from_str(line).unwrap()
}

fn db_url(server: &Server) -> String {
    format!(
        "sqlite://{}",
        server
            .dir
            .path()
            .join("data")
            .join("callvault.db")
            .display()
    )
}

/// A store's metadata, read from the server's SQLite database (the HTTP API is another
/// engineer's, in progress).
fn store_meta(server: &Server, id: &str) -> Store {
    let url = db_url(server);
    let id = id.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let db = callvault::storage::db::Db::open(&url).await.unwrap();
        let st = callvault::storage::stores::Stores::new(db.clone())
            .get(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("store {id} not in the database"));
        db.close().await;
        st
    })
}

/// Polls the store until `pred` holds (state changes are async to the SIP answers).
fn wait_store(server: &Server, id: &str, pred: impl Fn(&Store) -> bool) -> Store {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = store_meta(server, id);
        if pred(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every record of a store's segment log (after the server stopped writing it).
fn stored_records(server: &Server, id: &str) -> Vec<(u16, Vec<u8>)> {
    let dir = server.dir.path().join("data").join("stores").join(id);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut r = callvault::storage::segments::SegmentReader::open(&dir, 0, None);
        let mut out = Vec::new();
        while let Some(rec) = r.next().await.unwrap() {
            out.push((rec.header.seq, rec.payload.to_vec()));
        }
        out
    })
}

fn store_port(resp: &Response) -> SocketAddr {
    let (addr, dir) = sdp_audio(&resp.body);
    assert_eq!(dir, "recvonly", "store answer direction");
    addr
}

// ---------------------------------------------------------------------------------------------
// 1. The full flow

#[test]
fn full_flow_store_ready_play() {
    let server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");

    // Step 11/111: B asks; 200 store-accepted naming the prompted sender.
    let resp = store_request(&mut c, r#"{"pin":"4321"}"#);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert_eq!(ct(&resp), STORE_ACCEPTED);
    let acc = json(&resp.body);
    assert_eq!(acc["prompted"], "sip:1001@example.com");
    let id = acc["store_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("st_") && id.len() >= 3 + 16, "store id {id}");

    // Step 12: A gets the prompt in its dialog.
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    assert_eq!(
        p.call_id(),
        Some(c.ad.id.call_id.as_str()),
        "prompt on leg A"
    );
    c.a.respond(&p, 200, &[], b"");
    let prompt = json(&p.body);
    let port = server.config.sip_port();
    assert_eq!(prompt["store_id"], id.as_str());
    assert_eq!(prompt["receiver"], "sip:1002@example.com");
    assert_eq!(
        prompt["store_uri"],
        format!("sip:{id}@127.0.0.1:{port}").as_str()
    );
    assert_eq!(prompt["ip"], "127.0.0.1");
    assert_eq!(prompt["port"], port);
    assert_eq!(prompt["space_bytes"], QUOTA);
    assert!(prompt["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(prompt["formats"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "PCMU/8000"));
    assert!(prompt["upload_url"]
        .as_str()
        .unwrap()
        .contains(&format!("/v1/stores/{id}/data?token=")));

    // Steps 21-23: the store session.
    const N: u32 = 100;
    let declared = u64::from(N) * 160;
    let a_rtp = Rtp::bind();
    let store_uri = prompt["store_uri"].as_str().unwrap().to_string();
    let (resp, sd) = store_invite(&mut c.a, &store_uri, Some(declared), &a_rtp);
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let mut sd = sd.unwrap();
    let to = store_port(&resp);
    assert_eq!(
        account(&server, "1002")["reserved_bytes"],
        declared,
        "declared size reserved at 200"
    );

    // A streams from its own thread; B reacts to the ready note and plays meanwhile.
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            for i in 0..N {
                a_rtp.send(
                    to,
                    0,
                    i == 0,
                    5000 + i as u16,
                    160 * i,
                    0xA1A1_A1A1,
                    &payload(i),
                );
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let ready_req =
        c.b.expect_request(Method::Message, Some(READY), Duration::from_secs(10));
    let sent_at_ready = sent.load(Ordering::SeqCst);
    c.b.respond(&ready_req, 200, &[], b"");
    assert_eq!(
        ready_req.call_id(),
        Some(c.bd.id.call_id.as_str()),
        "ready note in-dialog on leg B"
    );
    let ready = json(&ready_req.body);
    let threshold = (declared * 30).div_ceil(100);
    assert!(
        sent_at_ready as u64 * 160 >= threshold,
        "ready after {sent_at_ready} packets, threshold {threshold} bytes"
    );
    assert!(
        ready["received_bytes"].as_u64().unwrap() >= threshold,
        "{ready}"
    );
    assert_eq!(ready["declared_bytes"], declared);
    assert_eq!(ready["state"], "receiving");
    assert_eq!(ready["format"], "PCMU/8000");
    assert_eq!(
        ready["play_uri"],
        format!("sip:play-{id}@127.0.0.1:{port}").as_str()
    );

    // Steps 332/333: B plays.
    let b_rtp = Rtp::bind();
    let (resp, pd) = play_invite(&mut c.b, ready["play_uri"].as_str().unwrap(), &b_rtp);
    let acked = Instant::now();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (_, dir) = sdp_audio(&resp.body);
    assert_eq!(dir, "sendonly");
    let mut pd = pd.unwrap();

    let mut got = Vec::new();
    let mut bye_sent = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() < N as usize && Instant::now() < deadline {
        if let Some(p) = b_rtp.recv(Duration::from_millis(50)) {
            got.push(p);
        }
        if !bye_sent && sender.is_finished() {
            let r = c.a.bye(&mut sd);
            assert_eq!(r.status, 200);
            bye_sent = true;
        }
    }
    let first_latency = got.first().map(|p| p.at - acked);
    eprintln!(
        "LATENCY play ACK -> first played packet: {first_latency:?}; ready after {sent_at_ready} packets sent"
    );
    assert_eq!(got.len(), N as usize, "played packets");
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.payload, payload(i as u32), "payload {i} byte for byte");
        assert_eq!(p.pt, 0);
        assert_ne!(p.ssrc, 0xA1A1_A1A1, "callvault's own SSRC");
        assert_eq!(p.ssrc, got[0].ssrc);
        assert_eq!(p.seq, got[0].seq.wrapping_add(i as u16), "contiguous seq");
        assert_eq!(p.ts, got[0].ts.wrapping_add(160 * i as u32), "timestamps");
    }
    assert!(
        first_latency.unwrap() < Duration::from_millis(500),
        "first packet {first_latency:?} after the play ACK"
    );

    // Finished and fully sent: callvault ends the play session.
    if !bye_sent {
        sender.join().unwrap();
        assert_eq!(c.a.bye(&mut sd).status, 200);
    }
    let bye =
        c.b.expect_request(Method::Bye, None, Duration::from_secs(5));
    assert_eq!(
        bye.call_id(),
        Some(pd.id.call_id.as_str()),
        "BYE of the play session"
    );
    c.b.respond(&bye, 200, &[], b"");
    let _ = &mut pd;

    let st = wait_store(&server, &id, |s| s.state.as_str() == "complete");
    assert_eq!(st.state.as_str(), "complete");
    assert_eq!(st.received_bytes, declared);
    // GET /v1/stores/{id} with the ready note's token, once the HTTP API serves it.
    let token = ready["download_url"]
        .as_str()
        .and_then(|u| u.split("token=").nth(1))
        .unwrap()
        .to_string();
    match common::http_get(
        server.http_addr(),
        &format!("/v1/stores/{id}?token={token}"),
    ) {
        Ok((200, body)) => {
            let v = json(body.as_bytes());
            assert_eq!(v["state"], "complete", "{v}");
            assert_eq!(v["received_bytes"], declared, "{v}");
        }
        other => eprintln!("SKIPPED: GET /v1/stores/{{id}} not served yet: {other:?}"),
    }
    let acc = account(&server, "1002");
    assert_eq!(acc["used_bytes"], declared, "{acc}");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    // The stored records are the payloads sent, in order.
    let recs = stored_records(&server, &id);
    assert_eq!(recs.len(), N as usize);
    assert!(recs
        .iter()
        .enumerate()
        .all(|(i, (_, p))| *p == payload(i as u32)));
}

// ---------------------------------------------------------------------------------------------
// 2. Store requests: §2.2 rows, the request forms, DTMF, modes, prompt forms

#[test]
fn store_request_error_rows() {
    let server = server_with("", &[("1003", "50MiB"), ("1004", "1")], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");

    assert_error(
        &store_request(&mut c, r#"{"pin":"#),
        400,
        "malformed-request",
    );
    assert_error(
        &store_request(&mut c, r#"{"pin":"4321","colour":"red"}"#),
        400,
        "malformed-request",
    );
    assert_error(
        &store_request(&mut c, r#"{"pin":"4321","sender":"sip:1005@example.com"}"#),
        404,
        "not-in-call",
    );
    assert_error(
        &store_request(
            &mut c,
            r#"{"pin":"4321","receiver":"sip:1001@example.com"}"#,
        ),
        403,
        "receiver-mismatch",
    );
    assert_error(&store_request(&mut c, r#"{"pin":"0000"}"#), 403, "bad-pin");
    // A right PIN before the lockout resets the count; explicit sender and receiver accepted.
    let ok = store_request(
        &mut c,
        r#"{"pin":"4321","sender":"sip:1001@example.com","receiver":"sip:1002@example.com"}"#,
    );
    assert_eq!(ok.status, 200);
    take_prompt(&mut c.a);

    // 481: an in-dialog request that matches no dialog.
    let mut fake = c.b.in_dialog_request(
        &mut c.bd,
        Method::Message,
        &[("Content-Type", STORE_REQUEST)],
        br#"{"pin":"4321"}"#,
    );
    fake.headers.set("Call-ID", "no-such-call@ua");
    assert_eq!(c.b.transact(&fake).status, 481);

    // Not a subscriber.
    let mut u = Call::establish(server.sip_addr(), "1001", "1009");
    assert_error(
        &store_request(&mut u, r#"{"pin":"4321"}"#),
        403,
        "unknown-receiver",
    );

    // Lockout: 5 wrong PINs are bad-pin, then locked-out even with the right one.
    let mut l = Call::establish(server.sip_addr(), "1001", "1003");
    for i in 0..5 {
        let r = store_request(&mut l, r#"{"pin":"1111"}"#);
        assert_error(&r, 403, "bad-pin");
        let _ = i;
    }
    assert_error(
        &store_request(&mut l, r#"{"pin":"4321"}"#),
        403,
        "locked-out",
    );
    assert_error(
        &store_request(&mut l, r#"{"pin":"1111"}"#),
        403,
        "locked-out",
    );
    // Another subscriber is not affected.
    assert_eq!(store_request(&mut c, r#"{"pin":"4321"}"#).status, 200);
    take_prompt(&mut c.a);

    // No free space: quota 1 byte, used up by a store.
    let mut q = Call::establish(server.sip_addr(), "1001", "1004");
    let p = accepted_prompt(&mut q, r#"{"pin":"4321"}"#);
    assert_eq!(p["space_bytes"], 1);
    let rtp = Rtp::bind();
    let (resp, sd) = store_invite(&mut q.a, p["store_uri"].as_str().unwrap(), Some(1), &rtp);
    assert_eq!(resp.status, 200);
    let mut sd = sd.unwrap();
    let to = store_port(&resp);
    rtp.send(to, 0, true, 1, 0, 7, &[0x55]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(q.a.bye(&mut sd).status, 200);
    let used = wait_store(&server, p["store_id"].as_str().unwrap(), |s| {
        s.state.as_str() == "complete"
    });
    assert_eq!(used.received_bytes, 1, "{used:?}");
    assert_eq!(account(&server, "1004")["free_bytes"], 0);
    assert_error(
        &store_request(&mut q, r#"{"pin":"4321"}"#),
        403,
        "quota-exhausted",
    );
}

#[test]
fn store_request_forms_dtmf_and_via_receiver() {
    let server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");

    // INFO with Info-Package: callvault.
    let r = c.b.in_dialog(
        &mut c.bd,
        Method::Info,
        &[
            ("Content-Type", STORE_REQUEST),
            ("Info-Package", "callvault"),
        ],
        br#"{"pin":"4321"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(ct(&r), STORE_ACCEPTED);
    let id1 = json(&r.body)["store_id"].as_str().unwrap().to_string();
    assert_eq!(take_prompt(&mut c.a)["store_id"], id1.as_str());

    // Legacy INFO: the content type without an Info-Package.
    let r = c.b.in_dialog(
        &mut c.bd,
        Method::Info,
        &[("Content-Type", STORE_REQUEST)],
        br#"{"pin":"4321"}"#,
    );
    assert_eq!(r.status, 200);
    let id2 = json(&r.body)["store_id"].as_str().unwrap().to_string();
    assert_ne!(id1, id2, "single-use ids");
    assert_eq!(take_prompt(&mut c.a)["store_id"], id2.as_str());

    // DTMF INFO, one digit each: *7 4321 #. None reaches A; A gets the prompt.
    for d in "*74321#".chars() {
        let r = c.b.in_dialog(
            &mut c.bd,
            Method::Info,
            &[("Content-Type", "application/dtmf-relay")],
            format!("Signal={d}\r\nDuration=160\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200, "INFO digit {d}");
    }
    let p = take_prompt(&mut c.a);
    assert_eq!(p["receiver"], "sip:1002@example.com");
    assert!(
        c.a.wait_request(
            Method::Info,
            Some("application/dtmf-relay"),
            Duration::from_millis(300)
        )
        .is_none(),
        "a feature-code digit reached A"
    );
    // A plain digit still goes through (so the check above means something).
    let digit = c.b.in_dialog_request(
        &mut c.bd,
        Method::Info,
        &[("Content-Type", "application/dtmf-relay")],
        b"Signal=5\r\nDuration=160\r\n",
    );
    let branch = digit.top_via().unwrap().branch().unwrap().to_string();
    c.b.send(&digit);
    let relayed =
        c.a.expect_request(Method::Info, Some("application/dtmf-relay"), T);
    c.a.respond(&relayed, 200, &[], b"");
    assert!(String::from_utf8_lossy(&relayed.body).contains("Signal=5"));
    assert_eq!(c.b.final_response(&branch, T).unwrap().status, 200);

    // `*` then a digit that is no feature code: both released to A, in order.
    for d in ['*', '5'] {
        let r = c.b.in_dialog(
            &mut c.bd,
            Method::Info,
            &[("Content-Type", "application/dtmf-relay")],
            format!("Signal={d}\r\nDuration=160\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200);
    }
    for d in ['*', '5'] {
        let i =
            c.a.expect_request(Method::Info, Some("application/dtmf-relay"), T);
        c.a.respond(&i, 200, &[], b"");
        assert!(
            String::from_utf8_lossy(&i.body).contains(&format!("Signal={d}")),
            "{d}"
        );
    }
    // A lone `*` is released after 3 s.
    let star = Instant::now();
    let r = c.b.in_dialog(
        &mut c.bd,
        Method::Info,
        &[("Content-Type", "application/dtmf-relay")],
        b"Signal=*\r\nDuration=160\r\n",
    );
    assert_eq!(r.status, 200);
    let i = c.a.expect_request(
        Method::Info,
        Some("application/dtmf-relay"),
        Duration::from_secs(6),
    );
    c.a.respond(&i, 200, &[], b"");
    let held = star.elapsed();
    assert!(
        held >= Duration::from_millis(2800) && held < Duration::from_secs(6),
        "lone * released after {held:?}"
    );

    // DTMF with a wrong PIN: swallowed, the error comes to B as an in-dialog MESSAGE.
    for d in "*79999#".chars() {
        let r = c.b.in_dialog(
            &mut c.bd,
            Method::Info,
            &[("Content-Type", "application/dtmf")],
            d.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200);
    }
    let e = c.b.expect_request(Method::Message, Some(ERROR), T);
    c.b.respond(&e, 200, &[], b"");
    assert_eq!(e.call_id(), Some(c.bd.id.call_id.as_str()));
    assert_eq!(json(&e.body)["error"], "bad-pin");
    assert!(c
        .a
        .wait_request(Method::Info, None, Duration::from_millis(300))
        .is_none());

    // via-receiver: the 200 carries the prompt; B relays it to A, unchanged.
    let r = store_request(&mut c, r#"{"pin":"4321","mode":"via-receiver"}"#);
    assert_eq!(r.status, 200);
    assert_eq!(ct(&r), PROMPT);
    let prompt = json(&r.body);
    assert!(prompt["store_uri"].as_str().unwrap().starts_with("sip:st_"));
    assert_eq!(prompt["space_bytes"], QUOTA);
    assert!(
        c.a.wait_request(Method::Message, Some(PROMPT), Duration::from_millis(300))
            .is_none(),
        "via-receiver must not prompt A directly"
    );
    let fwd = c.b.in_dialog_request(
        &mut c.bd,
        Method::Message,
        &[("Content-Type", PROMPT)],
        &r.body,
    );
    let branch = fwd.top_via().unwrap().branch().unwrap().to_string();
    c.b.send(&fwd);
    let at_a = c.a.expect_request(Method::Message, Some(PROMPT), T);
    assert_eq!(at_a.body, r.body, "relayed unchanged");
    c.a.respond(&at_a, 200, &[], b"");
    assert_eq!(c.b.final_response(&branch, T).unwrap().status, 200);
}

#[test]
fn prompt_as_info_and_text_fallback() {
    // prompt_method = INFO.
    let server = server_with("[store]\nprompt_method = \"INFO\"", &[], &[]);
    // Both parties accept the package (RFC 6086 4.2.1); tests/interop.rs covers the others.
    let accepts = [("Recv-Info", "callvault")];
    let mut c = Call::establish_with(server.sip_addr(), "1001", "1002", &accepts, &accepts);
    let r = store_request(&mut c, r#"{"pin":"4321"}"#);
    assert_eq!(r.status, 200);
    let p = c.a.expect_request(Method::Info, Some(PROMPT), T);
    assert_eq!(p.headers.get("Info-Package"), Some("callvault"));
    c.a.respond(&p, 200, &[], b"");
    let prompt = json(&p.body);
    assert!(prompt["store_uri"].as_str().unwrap().starts_with("sip:st_"));
    // The ready note follows prompt_method too.
    let _ = r;
    let r = store_request(&mut c, r#"{"pin":"4321","threshold":{"percent":0}}"#);
    assert_eq!(r.status, 200);
    let p = c.a.expect_request(Method::Info, Some(PROMPT), T);
    c.a.respond(&p, 200, &[], b"");
    let rtp = Rtp::bind();
    let (resp, d) = store_invite(
        &mut c.a,
        json(&p.body)["store_uri"].as_str().unwrap(),
        Some(1600),
        &rtp,
    );
    assert_eq!(resp.status, 200);
    rtp.send(store_port(&resp), 0, true, 1, 0, 5, &payload(0));
    let ready = c.b.expect_request(Method::Info, Some(READY), T);
    c.b.respond(&ready, 200, &[], b"");
    assert_eq!(ready.headers.get("Info-Package"), Some("callvault"));
    assert_eq!(c.a.bye(&mut d.unwrap()).status, 200);
    drop(c);
    drop(server);

    // Text fallback: A refuses the JSON prompt with 415 and gets a text/plain MESSAGE.
    let server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let r = store_request(&mut c, r#"{"pin":"4321"}"#);
    let id = json(&r.body)["store_id"].as_str().unwrap().to_string();
    let p = c.a.expect_request(Method::Message, Some(PROMPT), T);
    c.a.respond(&p, 415, &[], b"");
    let t = c.a.expect_request(Method::Message, Some("text/plain"), T);
    c.a.respond(&t, 200, &[], b"");
    let text = String::from_utf8_lossy(&t.body).to_string();
    let port = server.config.sip_port();
    assert!(
        text.contains(&format!("sip:{id}@127.0.0.1:{port}")),
        "text prompt names the store URI: {text}"
    );
    // From then on A gets text: the next prompt is text at once.
    assert_eq!(store_request(&mut c, r#"{"pin":"4321"}"#).status, 200);
    let t2 = c.a.expect_request(Method::Message, None, T);
    c.a.respond(&t2, 200, &[], b"");
    assert_eq!(ct(&t2), "text/plain");
}

// ---------------------------------------------------------------------------------------------
// 3. Store session checks (§2.4)

#[test]
fn store_session_error_rows() {
    let server = server_with("[store]\nstore_expiry_secs = 2", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let uri = p["store_uri"].as_str().unwrap().to_string();
    let port = server.config.sip_port();
    let rtp = Rtp::bind();

    let (r, _) = store_invite(
        &mut c.a,
        &format!("sip:st_AAAAAAAAAAAAAAAAAAAA@127.0.0.1:{port}"),
        Some(1600),
        &rtp,
    );
    assert_error(&r, 404, "unknown-store");

    let mut other = Ua::new("1003", "example.com", server.sip_addr());
    let (r, _) = store_invite(&mut other, &uri, Some(1600), &rtp);
    assert_error(&r, 403, "not-sender");

    let inv =
        c.a.invite_request(&uri, &[], &sdp(rtp.port, &[(18, "G729/8000")], "sendonly"));
    let (r, _) = c.a.invite(&inv);
    assert_error(&r, 488, "unsupported-format");

    let (r, _) = store_invite(&mut c.a, &uri, Some(QUOTA + 1), &rtp);
    assert_error(&r, 403, "quota-exceeded");
    assert_eq!(account(&server, "1002")["reserved_bytes"], 0);

    // The rejected INVITEs left the id usable.
    let (r, d) = store_invite(&mut c.a, &uri, Some(1600), &rtp);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut d = d.unwrap();
    // Used: a second session to the same URI.
    let (r, _) = store_invite(&mut c.a, &uri, Some(1600), &rtp);
    assert_error(&r, 404, "unknown-store");
    assert_eq!(c.a.bye(&mut d).status, 200);

    // Expired: no session within store_expiry_secs.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    std::thread::sleep(Duration::from_millis(2300));
    let (r, _) = store_invite(&mut c.a, p["store_uri"].as_str().unwrap(), Some(1600), &rtp);
    assert_error(&r, 404, "unknown-store");
}

// ---------------------------------------------------------------------------------------------
// 4. Threshold, play checks, ends of a store session (§2.5)

#[test]
fn thresholds_and_play_checks() {
    let server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let rtp = Rtp::bind();

    // Threshold 0: ready after the first packet.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321","threshold":{"percent":0}}"#);
    let (mut d0, to) = open_store_session(&mut c, &p, 16000, &rtp);
    assert!(
        c.b.wait_request(Method::Message, Some(READY), Duration::from_millis(300))
            .is_none(),
        "ready before any packet"
    );
    let t0 = Instant::now();
    rtp.send(to, 0, true, 1, 0, 9, &payload(0));
    let ready = take_ready(&mut c.b, T);
    eprintln!(
        "LATENCY threshold 0: first packet sent -> ready received {:?}",
        t0.elapsed()
    );
    assert_eq!(ready["received_bytes"], 160);
    assert_eq!(ready["store_id"], p["store_id"]);
    assert_eq!(c.a.bye(&mut d0).status, 200);

    // Bytes threshold: 800 bytes = 5 packets; play before it is 480 not-ready.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321","threshold":{"bytes":800}}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let port = server.config.sip_port();
    let play_uri = format!("sip:play-{id}@127.0.0.1:{port}");
    let (mut d1, to) = open_store_session(&mut c, &p, 16000, &rtp);
    send_stream(&rtp, to, 10, 0..4);
    assert!(
        c.b.wait_request(Method::Message, Some(READY), Duration::from_millis(400))
            .is_none(),
        "ready at 640 of 800 bytes"
    );
    let b_rtp = Rtp::bind();
    let (r, _) = play_invite(&mut c.b, &play_uri, &b_rtp);
    assert_error(&r, 480, "not-ready");
    assert!(r.headers.get("Retry-After").is_some(), "Retry-After on 480");
    // Someone else than the receiver.
    let (r, _) = play_invite(&mut c.a, &play_uri, &b_rtp);
    assert_error(&r, 403, "not-receiver");

    send_stream(&rtp, to, 10, 4..5);
    let ready = take_ready(&mut c.b, T);
    assert!(ready["received_bytes"].as_u64().unwrap() >= 800, "{ready}");
    let (r, pd) = play_invite(&mut c.b, &play_uri, &b_rtp);
    let acked = Instant::now();
    assert_eq!(r.status, 200);
    let first = b_rtp.recv(Duration::from_secs(2)).expect("played packet");
    eprintln!(
        "LATENCY bytes threshold: play ACK -> first packet {:?}",
        first.at - acked
    );
    assert_eq!(first.payload, payload(0));
    assert_eq!(c.a.bye(&mut d1).status, 200);
    let mut n = 1;
    while let Some(p) = b_rtp.recv(Duration::from_millis(500)) {
        assert_eq!(p.payload, payload(n));
        n += 1;
    }
    assert_eq!(n, 5, "all 5 packets played");
    let bye = c.b.expect_request(Method::Bye, None, T);
    assert_eq!(bye.call_id(), Some(pd.unwrap().id.call_id.as_str()));
    c.b.respond(&bye, 200, &[], b"");

    // Play of an unknown store.
    let (r, _) = play_invite(
        &mut c.b,
        &format!("sip:play-st_AAAAAAAAAAAAAAAAAAAA@127.0.0.1:{port}"),
        &b_rtp,
    );
    assert_error(&r, 404, "unknown-store");

    // The call ends before the threshold: the ready note goes out of dialog to B's contact.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321","threshold":{"bytes":320}}"#);
    let (mut d2, to) = open_store_session(&mut c, &p, 16000, &rtp);
    assert_eq!(c.a.bye(&mut c.ad).status, 200);
    c.b.expect_request(Method::Bye, None, T);
    let bye =
        c.b.wait_request(Method::Bye, None, Duration::from_millis(1))
            .is_none();
    assert!(bye);
    send_stream(&rtp, to, 14, 0..3);
    let r = c.b.expect_request(Method::Message, Some(READY), T);
    c.b.respond(&r, 200, &[], b"");
    assert_ne!(r.call_id(), Some(c.bd.id.call_id.as_str()));
    assert!(r.to_tag().is_none(), "out of dialog");
    assert_eq!(json(&r.body)["store_id"], p["store_id"]);
    assert_eq!(c.a.bye(&mut d2).status, 200);
}

#[test]
fn store_ends_by_rtp_timeout_and_size_overrun() {
    let server = server_with("", &[], &[("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "2")]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    c.keep_alive();
    let rtp = Rtp::bind();

    // RTP silence: callvault BYEs the store session; the store is truncated.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let (sd, to) = open_store_session(&mut c, &p, 16000, &rtp);
    send_stream(&rtp, to, 11, 0..5);
    let silent = Instant::now();
    c.a.expect_bye(&sd.id.call_id, Duration::from_secs(8));
    let after = silent.elapsed();
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(6),
        "BYE {after:?} after the last packet (timeout 2 s)"
    );
    let st = wait_store(&server, &id, |s| s.state.as_str() != "receiving");
    assert_eq!(st.state.as_str(), "truncated");
    assert_eq!(st.received_bytes, 800);
    assert_eq!(account(&server, "1002")["used_bytes"], 800);
    // The receiver was told at the end (a finished store is playable).
    take_ready(&mut c.b, T);

    // Size overrun: declared 1600 (10 packets), +5% = 1680; the 11th packet overruns it.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let (sd, to) = open_store_session(&mut c, &p, 1600, &rtp);
    send_stream(&rtp, to, 12, 0..13);
    let bye = c.a.expect_bye(&sd.id.call_id, Duration::from_secs(3));
    let reason = bye.headers.get("Reason").unwrap_or_default().to_string();
    assert!(reason.contains("size-exceeded"), "Reason: {reason}");
    let st = wait_store(&server, &id, |s| s.state.as_str() != "receiving");
    assert!(st.received_bytes <= 1680, "{st:?}");
    assert!(st.received_bytes >= 1600, "{st:?}");
    let acc = account(&server, "1002");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"], 800 + st.received_bytes, "{acc}");
}

// ---------------------------------------------------------------------------------------------
// 5. Crash

#[test]
fn crash_mid_store_recovers_truncated() {
    let mut server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let rtp = Rtp::bind();
    let declared = 500 * 160;
    let (r, _d) = store_invite(
        &mut c.a,
        p["store_uri"].as_str().unwrap(),
        Some(declared),
        &rtp,
    );
    assert_eq!(r.status, 200);
    let to = store_port(&r);
    let mut sent_at = Vec::new();
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        rtp.send(to, 0, i == 0, i as u16, 160 * i, 13, &payload(i));
        sent_at.push(Instant::now());
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    server.kill_hard();
    let sent = i;
    // Packets sent before the group-commit window preceding the kill must have survived.
    let must = sent_at
        .iter()
        .filter(|t| killed.duration_since(**t) > Duration::from_millis(200))
        .count() as u64;
    server.start();

    let st = store_meta(&server, &id);
    assert_eq!(st.state.as_str(), "truncated", "{st:?}");
    assert!(
        st.received_bytes >= must * 160,
        "{} bytes kept, {must} packets sent more than 200 ms before the kill",
        st.received_bytes
    );
    assert!(st.received_bytes <= u64::from(sent) * 160);
    let recs = stored_records(&server, &id);
    assert_eq!(recs.len() as u64 * 160, st.received_bytes);
    for (k, (seq, pl)) in recs.iter().enumerate() {
        assert_eq!(*seq, k as u16, "record {k} in order");
        assert_eq!(*pl, payload(k as u32), "record {k} payload");
    }
    let acc = account(&server, "1002");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"], st.received_bytes, "{acc}");
    eprintln!(
        "crash: sent {sent} packets, kept {} ({} required)",
        recs.len(),
        must
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Quota race

#[test]
fn concurrent_store_sessions_never_overdraw_quota() {
    let server = server_with("", &[("1005", "100000")], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1005");
    // The call outlives a slow run (argon2 PINs on a loaded machine) without an RTP timeout.
    c.keep_alive();
    let mut uris = Vec::new();
    for _ in 0..10 {
        let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
        assert_eq!(p["space_bytes"], 100000);
        uris.push(p["store_uri"].as_str().unwrap().to_string());
    }
    let rtp = Rtp::bind();
    let invites: Vec<Request> = uris
        .iter()
        .map(|u| {
            c.a.invite_request(
                u,
                &[("Callvault-Data-Size", "30000")],
                &sdp(rtp.port, PCMU, "sendonly"),
            )
        })
        .collect();
    for inv in &invites {
        c.a.send(inv);
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    let mut dialogs = Vec::new();
    for inv in &invites {
        let (r, d) = c.a.finish_invite(inv);
        if r.status != 200 {
            assert_error(&r, 403, "quota-exceeded");
        }
        *statuses.entry(r.status).or_default() += 1;
        dialogs.extend(d);
    }
    assert_eq!(statuses.get(&200), Some(&3), "{statuses:?}");
    assert_eq!(statuses.get(&403), Some(&7), "{statuses:?}");
    let acc = account(&server, "1005");
    assert_eq!(acc["reserved_bytes"], 90000, "{acc}");
    assert!(acc["reserved_bytes"].as_u64().unwrap() <= acc["quota_bytes"].as_u64().unwrap());
    // space_bytes of a new prompt is the free space now.
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    assert_eq!(p["space_bytes"], 10000);
    // A store refused for quota stays usable: exactly the free space fits.
    let refused = invites
        .iter()
        .zip(&uris)
        .find(|(inv, _)| {
            !dialogs
                .iter()
                .any(|d| d.id.call_id == inv.call_id().unwrap())
        })
        .map(|(_, u)| u.clone())
        .unwrap();
    let (r, _) = store_invite(&mut c.a, &refused, Some(10001), &rtp);
    assert_error(&r, 403, "quota-exceeded");
    let (r, d) = store_invite(&mut c.a, &refused, Some(10000), &rtp);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    dialogs.extend(d);
    assert_eq!(account(&server, "1005")["free_bytes"], 0);
    for mut d in dialogs {
        assert_eq!(c.a.bye(&mut d).status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let acc = account(&server, "1005");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"], 0, "{acc}");
}

// ---------------------------------------------------------------------------------------------
// 7. The full flow driven by SIPp

/// RTP payloads (PT 0, in order) of a pcap's datagrams to `port` (any port when None).
fn pcap_rtp_payloads(pcap: &[u8], port: Option<u16>) -> Vec<Vec<u8>> {
    common::udp_datagrams(pcap)
        .unwrap()
        .into_iter()
        .filter(|(p, d)| {
            port.is_none_or(|want| *p == want) && d.len() > 12 && d[0] >> 6 == 2 && d[1] & 0x7f == 0
        })
        .map(|(_, d)| d[12 + 4 * (d[0] & 0x0f) as usize..].to_vec())
        .collect()
}

fn wait_file(path: &std::path::Path, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.trim().is_empty() {
                return Some(s.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sipp_full_flow_bytes_equal() {
    if !common::tool_available("sipp") {
        return;
    }
    // SIP ports of A, B, store and play SIPp; media ports (each SIPp binds P and P+2).
    let ports = common::PortBlock::reserve(20);
    let mut cfg = ServerConfig::new();
    cfg.route_to = Some((ports.port(1), common::Transport::Udp));
    let mut server = Server::prepare(cfg);
    // The A-B call carries no RTP in these scenarios: keep callvault from ending it.
    server.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
    server.account_add("1001", "secret", "4321", "50MiB");
    server.account_add("1002", "secret", "4321", "50MiB");
    server.start();
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("store_id");
    let play_file = files.path().join("play_uri");
    let play_media = ports.port(16);

    let b = common::Sipp::uas("storage_callee")
        .port(ports.port(1))
        .media_port(ports.port(8))
        .timeout(Duration::from_secs(40))
        .arg("-key")
        .arg("play_file")
        .arg(&play_file.display().to_string())
        .spawn();
    let a = common::Sipp::uac("storage_caller", server.sip_addr())
        .port(ports.port(0))
        .media_port(ports.port(4))
        .service("1002")
        .timeout(Duration::from_secs(40))
        .arg("-key")
        .arg("store_file")
        .arg(&store_file.display().to_string())
        .spawn();
    let Some(store_id) = wait_file(&store_file, Duration::from_secs(15)) else {
        panic!("no prompt reached A:\n{}\n{}", a.wait(), b.wait());
    };
    assert!(store_id.starts_with("st_"), "{store_id}");

    let capture = common::RtpCapture::start(&[play_media]);
    let store = common::Sipp::uac("storage_store", server.sip_addr())
        .port(ports.port(2))
        .media_port(ports.port(12))
        .service(&store_id)
        .timeout(Duration::from_secs(40))
        .spawn();
    let Some(play_uri) = wait_file(&play_file, Duration::from_secs(15)) else {
        panic!(
            "no ready note reached B:\n{}\n{}\n{}",
            store.wait(),
            a.wait(),
            b.wait()
        );
    };
    let play_user = play_uri
        .strip_prefix("sip:")
        .and_then(|u| u.split('@').next())
        .unwrap()
        .to_string();
    assert_eq!(play_user, format!("play-{store_id}"));
    let play = common::Sipp::uac("storage_play", server.sip_addr())
        .port(ports.port(3))
        .media_port(play_media)
        .service(&play_user)
        .auth("1002", "secret")
        .timeout(Duration::from_secs(40))
        .spawn();

    let (a, b, store, play) = (a.wait(), b.wait(), store.wait(), play.wait());
    a.assert_successful(1);
    b.assert_successful(1);
    store.assert_successful(1);
    play.assert_successful(1);

    let st = wait_store(&server, &store_id, |s| s.state.as_str() == "complete");
    assert_eq!(st.state.as_str(), "complete");
    let sent = pcap_rtp_payloads(
        &std::fs::read(common::scenarios_dir().join("audio/pcmu-10s.pcap")).unwrap(),
        None,
    );
    assert_eq!(sent.len(), 500);
    assert_eq!(st.received_bytes, 80000, "{st:?}");
    if let Some(capture) = capture {
        let got = pcap_rtp_payloads(&capture.stop_raw(), Some(play_media));
        assert_eq!(got.len(), sent.len(), "packets played to B");
        assert!(got == sent, "played payloads differ from the pcap's");
    }
    assert_store_pcap_on_real_addresses(&server, &st, ports.port(12), ports.port(2));
    server.stop();
}

/// The store's `format=pcap` download carries its SIP INVITE/200 and its RTP on the addresses
/// really used: from the sender's media port to callvault's RTP port, the SIP between the
/// sender's SIP port and callvault's listener (not 5060), with the session's Call-ID
/// (PROTOCOL 2.5, issue 13).
fn assert_store_pcap_on_real_addresses(
    server: &Server,
    st: &Store,
    sender_port: u16,
    sender_sip_port: u16,
) {
    let local = st.rtp_local.expect("callvault's RTP address recorded");
    let source = st.rtp_source.expect("the sender's RTP source recorded");
    assert_eq!(source.port(), sender_port, "{st:?}");
    let (status, body) = common::http_get_bytes(
        server.http_addr(),
        &format!("/v1/stores/{}/media?format=pcap&token={}", st.id, st.token),
    )
    .unwrap();
    assert_eq!(status, 200);
    if !common::tool_available("tshark") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("store.pcap");
    std::fs::write(&pcap, &body).unwrap();
    let tshark = |filter: &str, fields: &[&str]| {
        let mut cmd = std::process::Command::new("tshark");
        cmd.arg("-r")
            .arg(&pcap)
            .args(["-Y", filter, "-T", "fields"]);
        for f in fields {
            cmd.args(["-e", f]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rtp = tshark("rtp", &["ip.src", "udp.srcport", "ip.dst", "udp.dstport"]);
    let want = format!(
        "{}\t{}\t{}\t{}",
        source.ip(),
        sender_port,
        local.ip(),
        local.port()
    );
    let lines: Vec<&str> = rtp.lines().collect();
    assert_eq!(lines.len(), 500, "every stored packet reads as RTP");
    assert!(lines.iter().all(|l| *l == want), "{want} vs {:?}", lines[0]);
    let sip = tshark(
        "sip",
        &[
            "udp.srcport",
            "udp.dstport",
            "sip.Method",
            "sip.Status-Code",
            "sdp.media.port",
        ],
    );
    let cv = server.sip_addr().port();
    assert_ne!(cv, 5060, "the test server listens elsewhere");
    assert_eq!(
        sip.lines().collect::<Vec<_>>(),
        [
            format!("{sender_sip_port}\t{cv}\tINVITE\t\t{sender_port}"),
            format!("{cv}\t{sender_sip_port}\t\t200\t{}", local.port())
        ],
        "{sip}"
    );
    let call_ids = tshark("sip", &["sip.Call-ID"]);
    assert!(
        call_ids
            .lines()
            .all(|c| !c.is_empty() && !c.ends_with("@callvault")),
        "the session's own Call-ID: {call_ids}"
    );
}

#[test]
fn rtp_dtmf_feature_code_is_swallowed_and_prompts() {
    // RFC 4733 telephone-events in the anchored RTP (PROTOCOL.md §2.1, §5).
    const TE: &[(u8, &str)] = &[(0, "PCMU/8000"), (101, "telephone-event/8000")];
    let server = server_with("", &[], &[]);
    let mut b = Ua::new("1002", "example.com", server.sip_addr());
    b.register();
    let mut a = Ua::new("1001", "example.com", server.sip_addr());
    let (a_media, b_media) = (Rtp::bind(), Rtp::bind());
    let inv = a.invite_request(
        "sip:1002@example.com",
        &[],
        &sdp(a_media.port, TE, "sendrecv"),
    );
    a.send(&inv);
    let binv = b.expect_request(Method::Invite, None, T);
    assert!(String::from_utf8_lossy(&binv.body).contains("telephone-event/8000"));
    // callvault's port facing B
    let (b_media_to, _) = sdp_audio(&binv.body);
    let _bd = b.accept_invite(&binv, &sdp(b_media.port, TE, "sendrecv"));
    let (resp, _ad) = a.finish_invite(&inv);
    assert_eq!(resp.status, 200);
    b.expect_request(Method::Ack, None, T);

    // B keys *7 4321 # as a phone does: per key 3 updates and 3 end packets with the key's
    // timestamp; its audio keeps going in between.
    let ssrc = 0x0b0b_0b0b;
    let mut seq = 1u16;
    // Returns the number of audio packets sent along.
    let mut press = |key: char, ts: u32, audio: bool| -> usize {
        let mut audio_sent = 0;
        let event = "0123456789*#".find(key).unwrap() as u8;
        for (n, (duration, end)) in [
            (160u16, false),
            (320, false),
            (480, false),
            (640, true),
            (640, true),
            (640, true),
        ]
        .into_iter()
        .enumerate()
        {
            let d = duration.to_be_bytes();
            let flags = 10 | if end { 0x80 } else { 0 };
            b_media.send(
                b_media_to,
                101,
                n == 0,
                seq,
                ts,
                ssrc,
                &[event, flags, d[0], d[1]],
            );
            seq = seq.wrapping_add(1);
            if audio {
                let i = u32::from(seq);
                b_media.send(b_media_to, 0, false, seq, 160 * i, ssrc, &payload(i));
                seq = seq.wrapping_add(1);
                audio_sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        audio_sent
    };
    let mut audio_sent = 0;
    for (i, key) in "*74321#".chars().enumerate() {
        audio_sent += press(key, 8000 * (i as u32 + 1), true);
    }
    let mut events = 0;
    let mut audio = 0;
    while let Some(p) = a_media.recv(Duration::from_millis(500)) {
        match p.pt {
            101 => events += 1,
            0 => audio += 1,
            other => panic!("unexpected payload type {other}"),
        }
    }
    assert_eq!(events, 0, "feature-code telephone-events reached A");
    assert_eq!(audio, audio_sent, "audio flows while the digits are held");
    let p = take_prompt(&mut a);
    assert_eq!(p["receiver"], "sip:1002@example.com");
    assert!(p["store_uri"].as_str().unwrap().starts_with("sip:st_"));

    // A key outside a code still reaches A (so the check above means something).
    press('5', 100_000, false);
    let mut fives = 0;
    while let Some(p) = a_media.recv(Duration::from_millis(500)) {
        assert_eq!((p.pt, p.ts, p.payload[0]), (101, 100_000, 5));
        fives += 1;
    }
    assert_eq!(fives, 6);
}

// ---------------------------------------------------------------------------------------------
// 8. The store lifecycle (issue 9): shutdown, uploads as full citizens, undeclared sizes

/// PROTOCOL.md 4: SIGTERM mid-store finishes the store `truncated` with its committed data
/// and settles the quota *before* the process exits; after a restart it plays.
#[test]
fn sigterm_mid_store_finishes_truncated_and_settles() {
    let mut server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let rtp = Rtp::bind();
    let (_sd, to) = open_store_session(&mut c, &p, 500 * 160, &rtp);
    send_stream(&rtp, to, 13, 0..50);
    std::thread::sleep(Duration::from_millis(300)); // committed (20 ms group commit)
    assert_eq!(account(&server, "1002")["reserved_bytes"], 500 * 160);
    let stopped = Instant::now();
    let status = server.stop().expect("server was running");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "bounded shutdown"
    );

    // Before any restart (no recovery has run): finished and settled by the shutdown.
    let st = store_meta(&server, &id);
    assert_eq!(st.state.as_str(), "truncated", "{st:?}");
    assert_eq!(st.received_bytes, 50 * 160, "every committed packet kept");
    let acc = account(&server, "1002");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"], st.received_bytes, "{acc}");

    server.start();
    let st = store_meta(&server, &id);
    assert_eq!(st.state.as_str(), "truncated");
    let b_rtp = Rtp::bind();
    let play_uri = format!("sip:play-{id}@127.0.0.1:{}", server.sip_addr().port());
    let (r, _pd) = play_invite(&mut c.b, &play_uri, &b_rtp);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 50 && Instant::now() < deadline {
        if let Some(p) = b_rtp.recv(Duration::from_millis(50)) {
            got.push(p.payload);
        }
    }
    assert_eq!(got.len(), 50, "played packets");
    assert!(got.iter().enumerate().all(|(i, p)| *p == payload(i as u32)));
}

/// `PUT upload_url` body: `n` printable bytes.
fn upload_body(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| b'a' + ((i + seed as usize) % 26) as u8)
        .collect()
}

/// PUTs `body` to the prompt's `upload_url` (the sender's token); the response.
fn put_upload(server: &Server, prompt: &Value, body: &[u8]) -> common::http::Resp {
    let url = prompt["upload_url"].as_str().unwrap();
    let target = &url[url.find("/v1/").unwrap()..];
    let mut raw = format!(
        "PUT {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    common::http::send_raw_blocking(server.http_addr(), &raw)
}

/// Issue 9 item 4: an upload is a full citizen. In a live call B gets the ready note in the
/// call's dialog; after the call, out of dialog; the store is `complete` and downloads as
/// uploaded.
#[test]
fn upload_in_call_notifies_in_dialog_then_out_of_dialog() {
    let server = server_with("", &[], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1002");
    c.keep_alive();
    // Two stores asked for in the call; the second is uploaded after it ended.
    let prompts = [
        accepted_prompt(&mut c, r#"{"pin":"4321"}"#),
        accepted_prompt(&mut c, r#"{"pin":"4321"}"#),
    ];
    for (k, p) in prompts.iter().enumerate() {
        let in_call = k == 0;
        if !in_call {
            assert_eq!(c.a.bye(&mut c.ad).status, 200);
            let bye = c.b.expect_request(Method::Bye, None, T);
            c.b.respond(&bye, 200, &[], b"");
        }
        let id = p["store_id"].as_str().unwrap().to_string();
        let body = upload_body(40_000, k as u8);
        let r = put_upload(&server, p, &body);
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let note = c.b.expect_request(Method::Message, Some(READY), T);
        c.b.respond(&note, 200, &[], b"");
        let in_dialog = note.call_id() == Some(c.bd.id.call_id.as_str());
        assert_eq!(
            in_dialog, in_call,
            "ready note in the call's dialog iff the call lasts"
        );
        let ready = json(&note.body);
        assert_eq!(ready["store_id"], id.as_str());
        assert!(
            ["receiving", "complete"].contains(&ready["state"].as_str().unwrap()),
            "{ready}"
        );
        let st = wait_store(&server, &id, |s| s.state.as_str() == "complete");
        assert_eq!(st.state.as_str(), "complete");
        assert_eq!(st.received_bytes, body.len() as u64);
        let url = ready["download_url"].as_str().unwrap();
        let (status, got) =
            common::http_get(server.http_addr(), &url[url.find("/v1/").unwrap()..]).unwrap();
        assert_eq!(status, 200);
        assert!(
            got.as_bytes() == body.as_slice(),
            "download equals the upload"
        );
    }
    // Metrics like an RTP store: a threshold sample per upload, no session left active.
    let m = server.metrics();
    let thresholds = common::metric_value(&m, "callvault_threshold_seconds_count", &[]);
    assert_eq!(thresholds, Some(2.0), "{m}");
    let active = common::metric_value(&m, "callvault_store_sessions_active", &[]);
    assert_eq!(active, Some(0.0));
    let acc = account(&server, "1002");
    assert_eq!(acc["used_bytes"], 80_000, "{acc}");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
}

/// Issue 10 finding 3: without `Callvault-Data-Size` the receiver's free space is reserved at
/// acceptance and is the limit: the session ends with BYE `size-exceeded` there, the account
/// never goes over its quota.
#[test]
fn undeclared_store_stops_at_the_quota() {
    let quota = 100 * 160;
    let server = server_with("", &[("1006", &quota.to_string())], &[]);
    let mut c = Call::establish(server.sip_addr(), "1001", "1006");
    c.keep_alive();
    let p = accepted_prompt(&mut c, r#"{"pin":"4321"}"#);
    let id = p["store_id"].as_str().unwrap().to_string();
    let rtp = Rtp::bind();
    let (r, d) = store_invite(&mut c.a, p["store_uri"].as_str().unwrap(), None, &rtp);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let mut d = d.unwrap();
    let acc = account(&server, "1006");
    assert_eq!(
        acc["reserved_bytes"], quota,
        "free space reserved at acceptance: {acc}"
    );
    send_stream(&rtp, store_port(&r), 7, 0..150);
    let bye =
        c.a.expect_request(Method::Bye, None, Duration::from_secs(5));
    c.a.respond(&bye, 200, &[], b"");
    assert_eq!(bye.call_id(), Some(d.id.call_id.as_str()));
    let reason = bye.headers.get("Reason").unwrap_or_default().to_string();
    assert!(reason.contains("size-exceeded"), "Reason: {reason:?}");
    let _ = &mut d;
    let st = wait_store(&server, &id, |s| s.state.as_str() == "truncated");
    assert_eq!(st.state.as_str(), "truncated", "{st:?}");
    assert_eq!(st.received_bytes, quota, "{st:?}");
    let acc = account(&server, "1006");
    assert_eq!(acc["reserved_bytes"], 0, "{acc}");
    assert_eq!(acc["used_bytes"], quota, "{acc}");
    assert_eq!(acc["free_bytes"], 0, "{acc}");
}
