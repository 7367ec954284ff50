//! Whole-call recording (PROTOCOL.md §1, §5 "Recorded calls"): with `[media] record_calls`,
//! one SIPp call with 5 s of PCMU each way through callvault leaves two `call-recording`
//! stores, one per direction, listed to the admin with leg A's Call-ID and downloadable.
//!
//! Skips with a SKIPPED line when SIPp is missing, unless `CALLVAULT_REQUIRE_TOOLS=1`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const ADMIN: &str = "recording-admin-token";
/// 250 packets of 160 PCMU bytes: sip-scenarios/audio/pcmu-5s.pcap.
const BYTES_5S: u64 = 250 * 160;

/// GET with the admin bearer: (status, body).
fn admin_get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\n\
         Connection: close\r\n\r\n"
    );
    let r = http::send_raw_blocking(addr, raw.as_bytes());
    (r.status, r.body)
}

/// A server that records calls and routes to a SIPp UAS, with that UAS and the UAC of one
/// basic call through it (not started yet), each given `timeout`.
struct RecordedCall {
    /// The SIPp ports, reserved while the test runs.
    _ports: PortBlock,
    server: Server,
    uas: Sipp,
    uac: Sipp,
}

fn recorded_call(timeout: Duration) -> RecordedCall {
    let ports = PortBlock::reserve(10);
    let (uas_sip, uac_sip, uas_media, uac_media) =
        (ports.port(0), ports.port(1), ports.port(2), ports.port(6));
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(20);
    cfg.route_to = Some((uas_sip, Transport::Udp));
    let mut server = Server::prepare(cfg);
    server.set_env("CALLVAULT_MEDIA_RECORD_CALLS", "true");
    server.set_env("CALLVAULT_HTTP_ADMIN_TOKEN", ADMIN);
    server.start();
    let uas = Sipp::uas("basic")
        .port(uas_sip)
        .media_port(uas_media)
        .transport(Transport::Udp)
        .calls(1)
        .timeout(timeout)
        .trace_messages(true);
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(uac_sip)
        .media_port(uac_media)
        .transport(Transport::Udp)
        .calls(1)
        .timeout(timeout)
        .trace_messages(true);
    RecordedCall {
        _ports: ports,
        server,
        uas,
        uac,
    }
}

fn within_1pct(got: u64, want: u64) -> bool {
    got * 100 >= want * 99 && got * 100 <= want * 101
}

#[test]
fn recorded_call_lists_two_complete_stores_with_the_audio() {
    if !tool_available("sipp") {
        return;
    }
    let RecordedCall {
        _ports,
        server,
        uas,
        uac,
    } = recorded_call(Duration::from_secs(60));
    let uas = uas.spawn();
    let uac = uac.run();
    let uas = uas.wait();
    uac.assert_successful(1);
    uas.assert_successful(1);
    // Leg A's Call-ID: the one the UAC used.
    let call_id = uac
        .messages
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("Call-ID")
                .then(|| value.trim().to_string())
        })
        .expect("Call-ID in the UAC trace");

    // The stores finish once the relay has stopped and the logs are committed.
    let http = server.http_addr();
    let deadline = Instant::now() + Duration::from_secs(15);
    let stores = loop {
        let (status, body) = admin_get(http, "/v1/stores");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let recs: Vec<serde_json::Value> = list
            .into_iter()
            .filter(|s| s["kind"] == "call-recording")
            .collect();
        if recs.len() == 2 && recs.iter().all(|s| s["state"] == "complete") {
            break recs;
        }
        assert!(
            Instant::now() < deadline,
            "recordings not complete: {recs:#?}\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    let mut senders = Vec::new();
    for s in &stores {
        assert_eq!(s["call_id"], call_id.as_str(), "{s:#}");
        let got = s["received_bytes"].as_u64().unwrap();
        assert!(within_1pct(got, BYTES_5S), "received {got}: {s:#}");
        senders.push(s["sender"].as_str().unwrap().to_string());
        let id = s["store_id"].as_str().unwrap();
        let (status, media) = admin_get(http, &format!("/v1/stores/{id}/media?format=raw"));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&media));
        assert_eq!(media.len() as u64, got, "raw download of {id}");
    }
    // One store per direction: each party sends one of them.
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), 2, "{stores:#?}");
}

/// A crash mid-call keeps every committed byte of both recordings: callvault is killed
/// (SIGKILL) while the call's audio flows and restarted on the same data; both stores come
/// back `truncated` with what was written before the kill, readable to the last record.
#[test]
fn recordings_survive_a_kill_mid_call_with_every_committed_byte() {
    if !tool_available("sipp") {
        return;
    }
    let RecordedCall {
        _ports,
        mut server,
        uas,
        uac,
    } = recorded_call(Duration::from_secs(20));
    let _uas = uas.spawn();
    let _uac = uac.spawn();
    // Audio is flowing into both recordings...
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_value(&server.metrics(), "callvault_rtp_packets_stored_total", &[]).unwrap_or(0.0)
        < 100.0
    {
        assert!(
            Instant::now() < deadline,
            "no recorded packets\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...long enough for at least one write of each log (1 s batches, 250 ms ticks).
    std::thread::sleep(Duration::from_millis(2000));
    server.kill_hard();
    server.start();

    let (status, body) = admin_get(server.http_addr(), "/v1/stores");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    let recs: Vec<&serde_json::Value> = list
        .iter()
        .filter(|s| s["kind"] == "call-recording")
        .collect();
    assert_eq!(recs.len(), 2, "{list:#?}");
    for s in recs {
        assert_eq!(s["state"], "truncated", "{s:#}");
        let got = s["received_bytes"].as_u64().unwrap();
        // At least half a second of 160-byte packets was written before the kill, and never
        // more than the 5 s the call carries.
        assert!(
            (25 * 160..=BYTES_5S).contains(&got),
            "received {got}: {s:#}"
        );
        let id = s["store_id"].as_str().unwrap();
        let (status, media) = admin_get(
            server.http_addr(),
            &format!("/v1/stores/{id}/media?format=raw"),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&media));
        assert_eq!(
            media.len() as u64,
            got,
            "raw download of {id} after recovery"
        );
    }
}
