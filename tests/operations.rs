//! Packaging an operator expects (PROTOCOL 8, issue 13): `callvault config check` prints the
//! effective config with secrets masked, `/metrics` carries `process_*` and
//! `callvault_build_info`, and SIGHUP reloads routes and the log level from the file.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{callvault_bin, metric_value, tool_available, PortBlock, Server, ServerConfig, Sipp};

fn config_check(path: &std::path::Path) -> std::process::Output {
    Command::new(callvault_bin())
        .args(["config", "check", "--config"])
        .arg(path)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[http]\nadmin_token = \"topsecret-admin\"\n[storage]\n\
         metadata = \"postgres://cv:pg-pass-9@db:5432/cv\"\n[store]\nretention_days = 30\n\
         [log]\nformat = \"json\"\n",
    )
    .unwrap();
    let out = config_check(&path);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("topsecret-admin") && !text.contains("pg-pass-9"),
        "{text}"
    );
    assert!(text.contains("admin_token = \"***\""), "{text}");
    assert!(text.contains("postgres://cv:***@db:5432/cv"), "{text}");
    // Effective: defaults filled in, the file's values kept.
    assert!(text.contains("retention_days = 30"), "{text}");
    assert!(text.contains("rtp_timeout_secs = 10"), "{text}");
    assert!(text.contains("format = \"json\""), "{text}");
    // What it prints is itself a valid config.
    let again = dir.path().join("again.toml");
    std::fs::write(&again, &text).unwrap();
    assert!(config_check(&again).status.success());

    std::fs::write(&path, "[log]\nlevel = \"info\"\nhep = \"tcp:1.2.3.4:9\"\n").unwrap();
    let out = config_check(&path);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("log.hep"),
        "{out:?}"
    );
}

#[test]
fn metrics_carry_process_and_build_info() {
    let server = Server::spawn(ServerConfig::new());
    let text = server.metrics();
    let value = |n: &str| metric_value(&text, n, &[]).unwrap_or_else(|| panic!("{n}:\n{text}"));
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = value("process_start_time_seconds");
    assert!(
        (now - 120.0..=now + 5.0).contains(&start),
        "start {start}, now {now}"
    );
    let version = env!("CARGO_PKG_VERSION");
    // The test binary is built with the same profile as the server binary.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert_eq!(
        metric_value(
            &text,
            "callvault_build_info",
            &[("version", version), ("profile", profile)],
        ),
        Some(1.0),
        "{text}"
    );
}

#[test]
fn sighup_reloads_routes_and_log_level() {
    if !tool_available("sipp") {
        return;
    }
    let ports = PortBlock::reserve(10);
    let dead = PortBlock::reserve(1);
    let mut cfg = ServerConfig::new();
    cfg.rtp = PortBlock::reserve(20);
    // Calls first go to a port where nobody answers.
    cfg.route_to = Some((dead.port(0), common::Transport::Udp));
    let mut server = Server::prepare(cfg);
    // No RUST_LOG, so `[log] level` decides (RUST_LOG would override it).
    server.set_env("RUST_LOG", "");
    server.start();
    let toml = std::fs::read_to_string(&server.config_path).unwrap();
    let toml = toml.replace(
        &format!("127.0.0.1:{}", dead.port(0)),
        &format!("127.0.0.1:{}", ports.port(0)),
    ) + "\n[log]\nlevel = \"warn\"\n";
    std::fs::write(&server.config_path, toml).unwrap();
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("SIGHUP: config reloaded") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The new route takes the call; the level is `warn` now, so its info lines are gone.
    let uas = Sipp::uas("basic")
        .port(ports.port(0))
        .media_port(ports.port(2))
        .timeout(Duration::from_secs(30))
        .spawn();
    let uac = Sipp::uac("basic", server.sip_addr())
        .port(ports.port(1))
        .media_port(ports.port(6))
        .timeout(Duration::from_secs(30))
        .run();
    uac.assert_successful(1);
    uas.wait().assert_successful(1);
    let log = server.log();
    assert!(
        !log.contains("call answered"),
        "info lines after the reload to warn:\n{log}"
    );

    // A broken file changes nothing and says so.
    std::fs::write(&server.config_path, "[sip]\nnope = 1\n").unwrap();
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("SIGHUP: config not reloaded") {
        assert!(Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}
