//! The harness tested on its own: SIPp UAC against SIPp UAS directly on 127.0.0.1 (no
//! callvault), RTP counted from a loopback capture, plus the harness's parsers on known input.
//!
//! Tests that need SIPp skip (with a SKIPPED line) when it is not installed; RTP counts need
//! tcpdump with capture rights (root in CI). `CALLVAULT_REQUIRE_TOOLS=1` (scripts/test) makes
//! a missing tool a failure instead.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// 4.98 s of PCMU in 20 ms packets: sip-scenarios/audio/pcmu-5s.pcap.
const PACKETS_5S: u64 = 250;

/// Ports for one direct pair: UAS SIP, UAC SIP, and a media port for each (SIPp binds the
/// media port and the one two above it).
struct PairPorts {
    _block: PortBlock,
    uas_sip: u16,
    uac_sip: u16,
    uas_media: u16,
    uac_media: u16,
}

fn pair_ports() -> PairPorts {
    let block = PortBlock::reserve(10);
    PairPorts {
        uas_sip: block.port(0),
        uac_sip: block.port(1),
        uas_media: block.port(2),
        uac_media: block.port(6),
        _block: block,
    }
}

#[test]
fn basic_call_direct_with_rtp_both_ways() {
    if !tool_available("sipp") {
        return;
    }
    let p = pair_ports();
    // Started before the UAS, so no packet of the call is missed.
    let capture = RtpCapture::start(&[p.uac_media, p.uas_media]);

    let uas = Sipp::uas("basic")
        .port(p.uas_sip)
        .media_port(p.uas_media)
        .timeout(Duration::from_secs(30))
        .spawn();
    let uac = Sipp::uac("basic", ([127, 0, 0, 1], p.uas_sip).into())
        .port(p.uac_sip)
        .media_port(p.uac_media)
        .timeout(Duration::from_secs(30))
        .run();
    let uas = uas.wait();

    uac.assert_successful(1);
    uas.assert_successful(1);
    assert_eq!(uac.unexpected + uas.unexpected, 0);

    let Some(capture) = capture else {
        eprintln!("RTP counts not checked: no capture");
        return;
    };
    let counts = capture.stop();
    assert_eq!(
        counts.to_port(p.uas_media),
        PACKETS_5S,
        "RTP at the UAS: {counts:?}"
    );
    assert_eq!(
        counts.to_port(p.uac_media),
        PACKETS_5S,
        "RTP at the UAC: {counts:?}"
    );
    // All of it PCMU.
    assert_eq!(counts.by_port_pt.get(&(p.uas_media, 0)), Some(&PACKETS_5S));
    assert_eq!(counts.by_port_pt.get(&(p.uac_media, 0)), Some(&PACKETS_5S));
}

#[test]
fn harness_reports_a_failed_run() {
    if !tool_available("sipp") {
        return;
    }
    // Nobody answers at the target: SIPp retransmits until its -timeout and exits non-zero.
    let p = pair_ports();
    let r = Sipp::uac("basic", ([127, 0, 0, 1], p.uas_sip).into())
        .port(p.uac_sip)
        .media_port(p.uac_media)
        .timeout(Duration::from_secs(2))
        .run();
    assert!(!r.all_successful(1), "{r}");
    assert_ne!(r.exit_code, Some(0), "{r}");
    assert_eq!(r.successful, 0, "{r}");
    assert!(!r.stats.is_empty(), "statistics CSV not parsed: {r}");
    assert!(r.messages.contains("INVITE sip:1002@"), "{r}");
}

#[test]
fn run_sh_drives_a_pair_and_prints_results() {
    if !tool_available("sipp") {
        return;
    }
    let p = pair_ports();
    let out = Command::new(scenarios_dir().join("run.sh"))
        .args(["-q", "--direct", "--timeout", "30"])
        .args(["--uas-port", &p.uas_sip.to_string()])
        .args(["--uac-port", &p.uac_sip.to_string()])
        .args(["--uas-media-port", &p.uas_media.to_string()])
        .args(["--uac-media-port", &p.uac_media.to_string()])
        .arg("cancel")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("RESULT side=uac exit=0 successful=1 failed=0"),
        "{text}"
    );
    assert!(
        text.contains("RESULT side=uas exit=0 successful=1 failed=0"),
        "{text}"
    );
}

#[test]
fn every_scenario_pair_exists_and_is_documented() {
    for name in [
        "basic",
        "info_message",
        "cancel",
        "callee_bye",
        "hold",
        "register",
        "malformed",
    ] {
        for role in ["uac", "uas"] {
            let path = scenarios_dir().join(format!("{name}_{role}.xml"));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(text.contains("<scenario"), "{}", path.display());
            assert!(
                text.contains("Asserts"),
                "{}: no assertion notes",
                path.display()
            );
        }
    }
}

// --- the harness's parsers, on known input ------------------------------------------------

#[test]
fn counts_the_committed_pcap() {
    let data = std::fs::read(scenarios_dir().join("audio/pcmu-5s.pcap")).unwrap();
    let c = count_rtp(&data).unwrap();
    // make_rtp_pcap.py addresses every packet to port 6002, PT 0.
    assert_eq!(c.to_port(6002), PACKETS_5S);
    assert_eq!(c.by_port_pt.get(&(6002, 0)), Some(&PACKETS_5S));
    let data10 = std::fs::read(scenarios_dir().join("audio/pcmu-10s.pcap")).unwrap();
    assert_eq!(count_rtp(&data10).unwrap().to_port(6002), 2 * PACKETS_5S);
    // The raw µ-law files hold the same audio: 160 bytes per packet.
    let ul = std::fs::metadata(scenarios_dir().join("audio/speech-5s.ul")).unwrap();
    assert_eq!(ul.len(), PACKETS_5S * 160);
}

#[test]
fn rejects_what_is_not_a_pcap() {
    assert!(count_rtp(b"definitely not a capture file").is_err());
    assert_eq!(count_rtp(b"").unwrap(), RtpCounts::default());
}

#[test]
fn reads_metrics_by_name_and_labels() {
    let text = "# HELP callvault_calls_active Calls up\n\
                # TYPE callvault_calls_active gauge\n\
                callvault_calls_active 3\n\
                callvault_calls_total{outcome=\"completed\"} 7\n\
                callvault_calls_total{outcome=\"cancelled\"} 2\n\
                callvault_threshold_seconds_bucket{le=\"+Inf\",kind=\"a,b\"} 5\n\
                callvault_rtp_packets_relayed_total 1.5e3\n";
    assert_eq!(metric_value(text, "callvault_calls_active", &[]), Some(3.0));
    assert_eq!(
        metric_value(text, "callvault_calls_total", &[("outcome", "cancelled")]),
        Some(2.0)
    );
    assert_eq!(metric_value(text, "callvault_calls_total", &[]), None);
    assert_eq!(metric_sum(text, "callvault_calls_total"), 9.0);
    assert_eq!(
        metric_value(
            text,
            "callvault_threshold_seconds_bucket",
            &[("kind", "a,b"), ("le", "+Inf")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric_value(text, "callvault_rtp_packets_relayed_total", &[]),
        Some(1500.0)
    );
    assert_eq!(metric_value(text, "callvault_missing", &[]), None);
}

#[test]
fn parses_plain_and_chunked_http() {
    let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(parse_http_response(plain).unwrap(), (200, "hello".into()));
    let chunked =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
    assert_eq!(
        parse_http_response(chunked).unwrap(),
        (200, "hello world".into())
    );
    assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
    assert_eq!(
        parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n")
            .unwrap()
            .0,
        404
    );
}

#[test]
fn parses_sipp_statistics_csv() {
    let csv = "StartTime;TotalCallCreated;SuccessfulCall(P);SuccessfulCall(C);FailedCall(C);\
               FailedUnexpectedMessage(C);Retransmissions(C);\n\
               t0;0;0;0;0;0;0;\n\
               t1;3;1;2;1;1;4;\n";
    let r = SippResult::from_stats(
        "uac",
        Some(1),
        parse_stat_csv(csv),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    assert_eq!(
        (
            r.created,
            r.successful,
            r.failed,
            r.unexpected,
            r.retransmissions
        ),
        (3, 2, 1, 1, 4)
    );
    assert!(!r.all_successful(3));
    assert!(parse_stat_csv("").is_empty());
}

#[test]
fn recognises_the_ready_line() {
    assert!(is_ready_line(
        "2026-11-21T16:00:00Z  INFO callvault::server: ready sip=udp:127.0.0.1:5060 http=127.0.0.1:8080"
    ));
    assert!(is_ready_line("ready"));
    assert!(!is_ready_line("INFO callvault: already listening"));
    assert!(!is_ready_line("not-ready yet"));
    assert!(!is_ready_line("WARN callvault: storage not ready yet"));
}

#[test]
fn test_config_is_accepted_by_callvault() {
    let mut cfg = ServerConfig::new();
    cfg.route_to = Some((5070, Transport::Tcp));
    let dir = tempfile::tempdir().unwrap();
    let text = cfg.to_toml(dir.path());
    let parsed = callvault::config::Config::from_toml_str(&text, |_| None)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(parsed.http.listen.port(), cfg.http_port());
    assert_eq!(parsed.media.rtp_ports[0], cfg.rtp.base);
    assert_eq!(parsed.trusted_peer.len(), 1);
    assert_eq!(parsed.route.len(), 1);
    assert!(parsed.storage.data_dir.starts_with(dir.path()));
}

#[test]
fn port_blocks_do_not_overlap_and_are_free() {
    let a = PortBlock::reserve(10);
    let b = PortBlock::reserve(10);
    assert!(a.base + a.count <= b.base || b.base + b.count <= a.base);
    assert_eq!(a.base % 2, 0);
    for port in b.base..b.base + b.count {
        assert!(port_is_free(port));
    }
}

// --- the committed config files -------------------------------------------------------------

fn config_file(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn default_config_file_states_the_built_in_defaults() {
    let text = config_file("config/callvault.toml");
    let parsed = callvault::config::Config::from_toml_str(&text, |_| None)
        .unwrap_or_else(|e| panic!("config/callvault.toml: {e}"));
    assert_eq!(parsed, callvault::config::Config::default());
}

#[test]
fn example_configs_load() {
    for rel in [
        "config/examples/sipp-local.toml",
        "config/examples/asterisk-trunk.toml",
        "config/examples/docker.toml",
    ] {
        let parsed = callvault::config::Config::from_toml_str(&config_file(rel), |_| None)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(!parsed.sip.listen.is_empty(), "{rel}");
    }
    let lab = callvault::config::Config::from_toml_str(
        &config_file("config/examples/asterisk-trunk.toml"),
        |_| None,
    )
    .unwrap();
    assert_eq!(lab.route.len(), 3, "asterisk, sipp, freeswitch");
    assert_eq!(lab.trusted_peer.len(), 3, "asterisk, sipp, freeswitch");
}
