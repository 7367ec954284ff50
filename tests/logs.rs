//! Logs (PROTOCOL 8) over a full in-call store flow driven by SIPp (call A->B, store
//! request, prompt, store session, ready note): with `[log] format = "json"`,
//! `sip_trace = true` and `hep = "udp:..."`, every line is one JSON object, the Call-IDs SIPp
//! used appear and the call's lines name both legs, the store id appears, no PIN, password or
//! token is in the log, and a UDP listener receives HEP3 packets carrying the call's INVITE.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{tool_available, wait_file, PortBlock, Server, ServerConfig, Sipp};
use serde_json::Value;

/// The value of the first `NAME: value` header line in a SIPp message trace.
fn header_in(trace: &str, name: &str) -> String {
    trace
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in the trace"))
        .trim()
        .to_string()
}

/// HEP3 chunk `kind`'s value.
fn hep_chunk(p: &[u8], kind: u16) -> Option<&[u8]> {
    let mut at = 6;
    while at + 6 <= p.len() {
        let k = u16::from_be_bytes([p[at + 2], p[at + 3]]);
        let len = usize::from(u16::from_be_bytes([p[at + 4], p[at + 5]]));
        if len < 6 || at + len > p.len() {
            return None;
        }
        if k == kind {
            return Some(&p[at + 6..at + len]);
        }
        at += len;
    }
    None
}

#[test]
fn json_logs_name_both_call_ids_mask_secrets_and_mirror_hep() {
    if !tool_available("sipp") {
        return;
    }
    let hep = UdpSocket::bind("127.0.0.1:0").unwrap();
    hep.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let hep_port = hep.local_addr().unwrap().port();

    let ports = PortBlock::reserve(20);
    let mut cfg = ServerConfig::new();
    cfg.route_to = Some((ports.port(1), common::Transport::Udp));
    cfg.extra = format!(
        "[log]\nformat = \"json\"\nlevel = \"info\"\nsip_trace = true\nhep = \"udp:127.0.0.1:{hep_port}\"\n"
    );
    let mut server = Server::prepare(cfg);
    server.set_env("CALLVAULT_MEDIA_RTP_TIMEOUT_SECS", "60");
    server.account_add("1001", "pw-sender-7", "4321", "50MiB");
    server.account_add("1002", "pw-receiver-8", "4321", "50MiB");
    server.start();
    let files = tempfile::tempdir().unwrap();
    let store_file = files.path().join("store_id");
    let play_file = files.path().join("play_uri");

    let b = Sipp::uas("storage_callee")
        .port(ports.port(1))
        .media_port(ports.port(8))
        .timeout(Duration::from_secs(40))
        .arg("-key")
        .arg("play_file")
        .arg(&play_file.display().to_string())
        .spawn();
    let a = Sipp::uac("storage_caller", server.sip_addr())
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
    let store = Sipp::uac("storage_store", server.sip_addr())
        .port(ports.port(2))
        .media_port(ports.port(12))
        .service(&store_id)
        .timeout(Duration::from_secs(40))
        .spawn();
    assert!(
        wait_file(&play_file, Duration::from_secs(15)).is_some(),
        "no ready note reached B"
    );
    // Collect HEP while the flow finishes.
    let mut packets = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 65_536];
    while Instant::now() < until {
        if let Ok(n) = hep.recv(&mut buf) {
            packets.push(buf[..n].to_vec());
        }
    }
    let (a, b, store) = (a.wait(), b.wait(), store.wait());
    a.assert_successful(1);
    b.assert_successful(1);
    store.assert_successful(1);
    server.stop();
    let log = server.log();

    // JSON, one object a line.
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 10, "{log}");

    // The Call-IDs SIPp used: the caller's (leg A) and the one callvault gave leg B.
    let call_a = header_in(&a.messages, "Call-ID");
    let call_b = header_in(&b.messages, "Call-ID");
    assert!(log.contains(&call_a) && log.contains(&call_b), "{log}");
    let both = lines.iter().filter(|l| {
        l["span"]["call_a"] == call_a.as_str() && l["span"]["call_b"] == call_b.as_str()
    });
    assert!(
        both.clone().any(|l| l["message"] == "call answered"),
        "the answer line names both legs:\n{log}"
    );
    assert!(log.contains(&store_id), "the store id is logged");
    // sip_trace: the INVITE in full.
    assert!(
        lines.iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("INVITE sip:1002@"))
        }),
        "{log}"
    );

    // No secret: passwords, PINs, and the tokens of the prompt and the ready note.
    for secret in [
        "pw-sender-7",
        "pw-receiver-8",
        "\"pin\":\"4321\"",
        "pin=4321",
        "4321#",
    ] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    for trace in [&a.messages, &b.messages] {
        for part in trace.split("token=").skip(1) {
            let token: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            assert!(token.len() >= 16, "a token in the SIPp trace: {token:?}");
            assert!(!log.contains(&token), "token {token} in the log");
        }
    }
    assert!(
        a.messages.contains("token=") || b.messages.contains("token="),
        "the flow carried tokens to check"
    );

    // HEP3: the call's INVITE, from SIPp A's port to callvault.
    let invite = packets.iter().find(|p| {
        p.starts_with(b"HEP3")
            && hep_chunk(p, 15).is_some_and(|m| {
                m.starts_with(b"INVITE ") && String::from_utf8_lossy(m).contains(&call_a)
            })
    });
    let invite = invite.unwrap_or_else(|| panic!("no HEP3 INVITE among {} packets", packets.len()));
    assert_eq!(hep_chunk(invite, 7), Some(&ports.port(0).to_be_bytes()[..]));
    assert_eq!(
        hep_chunk(invite, 8),
        Some(&server.config.sip_port().to_be_bytes()[..])
    );
    assert_eq!(hep_chunk(invite, 11), Some(&[1u8][..]), "SIP");
}
