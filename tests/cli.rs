//! The operating contract of PROTOCOL.md §4 through the real binary: account commands, config
//! errors and busy ports as one-line reasons with a non-zero exit, clean SIGTERM shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(callvault_bin())
        .args(args)
        .env_remove("CALLVAULT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn account_commands_round_trip() {
    let server = Server::prepare(ServerConfig::new());
    let cfg = server.config_path.to_str().unwrap();
    let add_2001 = |quota: &str| {
        run(&[
            "account",
            "add",
            "2001",
            "--password",
            "pw",
            "--pin",
            "4321",
            "--quota",
            quota,
            "--config",
            cfg,
        ])
    };
    let set_threshold =
        |t: &str| run(&["account", "set", "2001", "--threshold", t, "--config", cfg]);
    let (code, _, err) = add_2001("50MiB");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = add_2001("1MiB");
    assert_ne!(code, 0, "duplicate add must fail");
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");

    let (code, out, _) = run(&["account", "show", "2001", "--config", cfg]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["user"], "2001");
    assert_eq!(v["quota_bytes"], 52_428_800);
    assert_eq!(v["used_bytes"], 0);
    assert_eq!(v["reserved_bytes"], 0);
    assert_eq!(v["free_bytes"], 52_428_800);

    let (code, _, err) = run(&[
        "account", "set", "2001", "--quota", "1GiB", "--pin", "9999", "--config", cfg,
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(&["account", "show", "2001", "--config", cfg]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["quota_bytes"], 1_073_741_824u64);

    let (code, _, err) = set_threshold("bytes:4800");
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = set_threshold("sideways");
    assert_ne!(code, 0, "a bad threshold must be refused");
    assert!(!err.trim().is_empty());

    let (code, out, _) = run(&["account", "list", "--config", cfg]);
    assert_eq!(code, 0);
    assert!(out.contains("2001"), "{out}");

    let (code, _, _) = run(&["account", "remove", "2001", "--config", cfg]);
    assert_eq!(code, 0);
    let (code, _, err) = run(&["account", "show", "2001", "--config", cfg]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bad_config_is_one_line_and_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[sip]\nlisten = [\"udp:127.0.0.1:5060\"]\nbogus_key = 1\n",
    )
    .unwrap();
    let (code, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bogus_key"), "names the key: {err}");

    let (code, _, err) = run(&[
        "serve",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn busy_port_is_one_line_and_non_zero() {
    let first = Server::spawn(ServerConfig::new());
    // A second server on the same SIP port.
    let mut cfg = ServerConfig::new();
    let sip = first.config.sip_port();
    let http = cfg.http_port();
    cfg.extra = String::new();
    let dir = tempfile::tempdir().unwrap();
    let text = cfg.to_toml(dir.path()).replace(
        &format!("127.0.0.1:{}\"", cfg.sip_port()),
        &format!("127.0.0.1:{sip}\""),
    );
    assert!(text.contains(&format!(":{sip}")) && text.contains(&format!(":{http}")));
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
    assert_ne!(code, 0);
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("callvault:") && last.contains("bind"),
        "{err}"
    );
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut server = Server::spawn(ServerConfig::new());
    let t0 = Instant::now();
    let status = server.stop().expect("exit status");
    assert!(status.success(), "exit {status}:\n{}", server.log());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(server.log().contains("shutting down"), "{}", server.log());
}

/// PROTOCOL.md §7 "Secrets": a password read from a file and a PIN from the environment never
/// show in the process list or the log (even at trace level), they are what the account
/// holds, and the database file holding their hashes is private to its owner.
#[test]
fn account_secrets_stay_out_of_ps_and_log_and_db_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::prepare(ServerConfig::new());
    let cfg = server.config_path.to_str().unwrap();
    let password = "f1le-Secret-Quux";
    let pin = "975318";
    let pw_file = server.dir.path().join("pw.txt");
    std::fs::write(&pw_file, format!("{password}\n")).unwrap();
    let mut child = Command::new(callvault_bin())
        .args(["account", "add", "2001", "--password-file"])
        .arg(&pw_file)
        .args([
            "--pin-env",
            "CV_TEST_PIN",
            "--quota",
            "1MiB",
            "--config",
            cfg,
        ])
        .env_remove("CALLVAULT_CONFIG")
        .env("CV_TEST_PIN", pin)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // What `ps` shows: the command line, read while the process runs.
    let proc_cmdline = format!("/proc/{}/cmdline", child.id());
    let mut seen = Vec::new();
    while child.try_wait().unwrap().is_none() {
        if let Ok(c) = std::fs::read(&proc_cmdline) {
            if !c.is_empty() {
                seen.push(String::from_utf8_lossy(&c).replace('\0', " "));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    assert!(!seen.is_empty(), "the command line was never readable");
    for c in &seen {
        assert!(c.contains("--password-file"), "{c}");
        assert!(
            !c.contains(password) && !c.contains(pin),
            "secret in ps: {c}"
        );
    }
    assert!(
        !log.contains(password) && !log.contains(pin),
        "secret in log: {log}"
    );

    let db_file = server.dir.path().join("data/callvault.db");
    let mode = std::fs::metadata(&db_file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "database file mode {mode:o} is readable by others"
    );

    // The account holds exactly the file's content (one trailing newline dropped) and the PIN.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("sqlite://{}", db_file.display());
        let db = callvault::storage::Db::open(&url).await.unwrap();
        let accounts = callvault::storage::Accounts::new(db.clone(), "example.com");
        assert!(accounts.verify_password("2001", password).await.unwrap());
        assert!(!accounts
            .verify_password("2001", &format!("{password}\n"))
            .await
            .unwrap());
        assert!(accounts.verify_pin("2001", pin).await.unwrap());
        db.close().await;
    });

    // Two sources for one secret are refused with a one-line reason.
    let (code, _, err) = run(&[
        "account",
        "set",
        "2001",
        "--password",
        "x",
        "--password-env",
        "HOME",
        "--config",
        cfg,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("only one of"), "{err}");
}
