//! RFC 4475 to the letter, against a running callvault over UDP: every well-formed request of
//! sections 3.1.1 (valid messages) and 3.3 (application-layer semantics) gets an answer, and
//! the answer is the one the RFC prefers where it names one (416 for an unknown Request-URI
//! scheme, 420 with `Unsupported` for unknown extensions, 415 for an unknown body type, 400
//! for a REGISTER whose To is not a SIP URI, ...). The parser's decisions on the same messages
//! are in `tests/parser_table.rs`; here the whole server answers.
//!
//! The messages are files in `tests/data/rfc4475/`, named after their RFC section, byte for
//! byte as the RFC prints them except that the top Via names 127.0.0.1 over UDP with `rport`
//! (so the answer comes back to the sending socket) and its own branch (the RFC's examples
//! share some, and here they reach one server one after another); `generate.py` there writes
//! them. 3.1.1.12/13 and 3.3.10 are responses,
//! which are never answered, and are left out.
//!
//! The server runs twice: with no trusted peer (callers on loopback are challenged, as any
//! stranger would be) and with loopback trusted (requests reach routing and the registrar).

mod common;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// (file stem, status with loopback untrusted, status with loopback trusted).
const EXPECT: &[(&str, u16, u16)] = &[
    // In-dialog (To tag) INVITE for a dialog that does not exist.
    ("3.1.1.1_wsinv", 481, 481),
    ("3.1.1.2_intmeth", 501, 501),
    // Untrusted: challenged. Trusted: the escaped user `sips:user@example.com` is nobody.
    ("3.1.1.3_esc01", 407, 404),
    // Trusted: a trusted peer may register any user, `null-%00-null` too.
    ("3.1.1.4_escnull", 401, 200),
    ("3.1.1.5_esc02", 501, 501),
    ("3.1.1.6_lwsdisp", 200, 200),
    ("3.1.1.7_longreq", 407, 404),
    // Only the first request of the datagram counts (RFC 4475: the rest is not a message).
    ("3.1.1.8_dblreq", 401, 200),
    ("3.1.1.9_semiuri", 200, 200),
    ("3.1.1.10_transports", 200, 200),
    // A MESSAGE with a binary multipart body: challenged, or routed (kumiko is nobody here).
    ("3.1.1.11_mpart01", 407, 404),
    ("3.3.1_insuf", 400, 400),
    ("3.3.2_unkscm", 416, 416),
    ("3.3.3_novelsc", 416, 416),
    ("3.3.4_unksm2", 400, 400),
    ("3.3.5_bext01", 420, 420),
    ("3.3.6_invut", 415, 415),
    ("3.3.7_regaut01", 401, 200),
    ("3.3.8_multi01", 400, 400),
    ("3.3.9_mcl01", 400, 400),
    // callvault answers OPTIONS itself; it would not forward it.
    ("3.3.11_zeromf", 200, 200),
    ("3.3.12_cparam01", 401, 200),
    ("3.3.13_cparam02", 401, 200),
    // A Contact with an escaped Route header is a valid URI: registered as is.
    ("3.3.14_regescrt", 401, 200),
    ("3.3.15_sdp01", 406, 406),
];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rfc4475")
}

/// Sends one message from a fresh socket; the first final response (100 skipped).
fn answer(server: std::net::SocketAddr, msg: &[u8]) -> Option<String> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(msg, server).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = vec![0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let Ok(n) = s.recv(&mut buf) else { break };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if !text.starts_with("SIP/2.0 100") {
            return Some(text);
        }
    }
    None
}

fn status(resp: &str) -> u16 {
    resp.get(8..11).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn run(trusted: bool) {
    let mut cfg = ServerConfig::new();
    cfg.trust_loopback = trusted;
    let server = Server::spawn(cfg);
    let files: Vec<_> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sip"))
        .collect();
    assert_eq!(files.len(), EXPECT.len(), "a file without an expectation");
    let mut wrong = Vec::new();
    for &(name, untrusted_status, trusted_status) in EXPECT {
        let want = if trusted {
            trusted_status
        } else {
            untrusted_status
        };
        let msg = std::fs::read(data_dir().join(format!("{name}.sip"))).unwrap();
        match answer(server.sip_addr(), &msg) {
            None => wrong.push(format!("{name}: no answer (want {want})")),
            Some(resp) => {
                if status(&resp) != want {
                    wrong.push(format!("{name}: want {want}, got:\n{resp}"));
                    continue;
                }
                check_details(name, &resp);
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "trusted={trusted}:\n{}\n--- log:\n{}",
        wrong.join("\n"),
        server.log()
    );
}

/// What else the RFC asks of some answers.
fn check_details(name: &str, resp: &str) {
    let lower = resp.to_ascii_lowercase();
    match name {
        // The unsupported extension is named (RFC 3261 8.2.2.3).
        "3.3.5_bext01" => assert!(lower.contains("\r\nunsupported: nothing"), "{resp}"),
        // What we do accept (RFC 3261 8.2.3).
        "3.3.6_invut" => assert!(lower.contains("\r\naccept: application/sdp"), "{resp}"),
        // A 400 names the fault in the reason phrase or the error body.
        "3.3.1_insuf" => assert!(resp.contains("Missing"), "{resp}"),
        _ => {}
    }
}

#[test]
fn rfc4475_requests_are_answered_untrusted() {
    run(false);
}

#[test]
fn rfc4475_requests_are_answered_trusted() {
    run(true);
}
