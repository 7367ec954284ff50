//! The cluster front (PROTOCOL.md section 6, issue 11): the repository's own
//! `config/kamailio/kamailio.cfg`, run by Debian's Kamailio 5.6 with a dispatcher list of
//! stand-in nodes (SIPp UASs on 127.0.0.1), spreads new INVITEs round robin, stays in the
//! dialog (Record-Route; ACK and BYE follow the route set), sends a request whose
//! Request-URI names a node (a prompt's `store_uri`, a `play_uri`) to that node alone, and
//! fails over to the next node when one answers 503 or does not answer at all. The same file fronts real callvault nodes
//! in tests/cluster.rs; here the nodes are SIPp so the front's policy is checked alone.
//!
//! A missing `kamailio` or `sipp` skips with a SKIPPED line, unless
//! `CALLVAULT_REQUIRE_TOOLS=1` (scripts/test), which makes it a failure.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::kamailio::Kamailio;
use common::{scenarios_dir, tool_available, PortBlock, Sipp};

fn repo_cfg() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/kamailio/kamailio.cfg")
}

/// Kamailio on the repository config with `nodes` (UDP ports on 127.0.0.1) as set 1, no
/// OPTIONS probing (SIPp stand-ins would count a probe as a failed call), and a short
/// per-node answer timeout.
fn front(nodes: &[u16], dir: &tempfile::TempDir) -> Option<Kamailio> {
    if !tool_available("sipp") {
        return None;
    }
    let list = dir.path().join("dispatcher.list");
    let body: String = nodes
        .iter()
        .map(|p| format!("1 sip:127.0.0.1:{p} 0 0\n"))
        .collect();
    std::fs::write(&list, body).unwrap();
    Kamailio::start_file(
        &repo_cfg(),
        &[
            format!("DISPATCHER_LIST=\"{}\"", list.display()),
            "PROBE_SECS=0".into(),
            "NODE_TIMEOUT_MS=700".into(),
        ],
    )
}

fn node(scenario: &str, port: u16, calls: u32) -> Sipp {
    Sipp::new(scenarios_dir().join(scenario), "uas")
        .port(port)
        .calls(calls)
        .timeout(Duration::from_secs(20))
}

#[test]
fn front_spreads_new_calls_round_robin_and_stays_in_the_dialog() {
    let ports = PortBlock::reserve(2);
    let dir = tempfile::tempdir().unwrap();
    let Some(k) = front(&[ports.port(0), ports.port(1)], &dir) else {
        return;
    };
    let n1 = node("front_uas.xml", ports.port(0), 3).spawn();
    let n2 = node("front_uas.xml", ports.port(1), 3).spawn();
    let caller = Sipp::uac("front", k.addr)
        .calls(6)
        .rate(5.0)
        .timeout(Duration::from_secs(20))
        .run();
    caller.assert_successful(6);
    // Each stand-in takes exactly its share, BYE included (it exits after 3 calls).
    let (r1, r2) = (n1.wait(), n2.wait());
    r1.assert_successful(3);
    r2.assert_successful(3);
    assert!(
        caller.messages.contains("Record-Route:"),
        "the front must record-route: {}",
        caller.messages
    );
}

#[test]
fn front_fails_over_on_503_and_on_a_silent_node() {
    // Node 0 answers 503, node 1 is silent (nothing bound), node 2 works: every call lands on
    // node 2, and after the first call the two bad nodes are marked and skipped.
    let ports = PortBlock::reserve(3);
    let dir = tempfile::tempdir().unwrap();
    let Some(k) = front(&[ports.port(0), ports.port(1), ports.port(2)], &dir) else {
        return;
    };
    let busy = node("front_busy_uas.xml", ports.port(0), 1).spawn();
    let good = node("front_uas.xml", ports.port(2), 4).spawn();
    let caller = Sipp::uac("front", k.addr)
        .calls(4)
        .rate(2.0)
        .timeout(Duration::from_secs(20))
        .run();
    caller.assert_successful(4);
    good.wait().assert_successful(4);
    let b = busy.wait();
    assert_eq!(
        b.created, 1,
        "the 503 node must be tried once, then skipped: {b:?}"
    );
}

#[test]
fn front_sends_a_request_uri_naming_a_node_to_that_node() {
    let ports = PortBlock::reserve(2);
    let dir = tempfile::tempdir().unwrap();
    let Some(k) = front(&[ports.port(0), ports.port(1)], &dir) else {
        return;
    };
    let named = std::net::SocketAddr::from(([127, 0, 0, 1], ports.port(1)));
    // Node 1 would take half the calls by round robin; it must take none.
    let n1 = node("front_uas.xml", ports.port(0), 1)
        .timeout(Duration::from_secs(3))
        .spawn();
    let n2 = node("front_uas.xml", named.port(), 4).spawn();
    // The Request-URI names node 2 (`-s` user @ node 2), the datagrams go to the front (-rsa).
    let caller = Sipp::uac("front", named)
        .calls(4)
        .rate(5.0)
        .timeout(Duration::from_secs(20))
        .arg("-rsa")
        .arg(&k.addr.to_string())
        .run();
    caller.assert_successful(4);
    n2.wait().assert_successful(4);
    let r1 = n1.wait();
    assert_eq!(r1.created, 0, "a call for node 2 reached node 1: {r1:?}");
    assert!(
        caller
            .messages
            .contains(&format!("Record-Route: <sip:{}", k.addr)),
        "the front must stay in the dialog: {}",
        caller.messages
    );
}
