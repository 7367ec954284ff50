//! Two real baresip 1.0 softphones, registered over TLS with `mediaenc=srtp-mand`, call each
//! other through callvault (PROTOCOL.md section 7): SRTP is terminated per leg, each phone
//! hears the other's tone, and each phone's SDP carries keys callvault made, never the other
//! phone's. The phones bind to 127.0.0.1 only (LAB-NOTES.md).

mod common;
#[path = "common/pki.rs"]
mod pki;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use pki::{tls_server, Pki};

/// A 16-bit mono 8 kHz WAV of a sine at `freq` Hz for `secs` seconds.
fn tone(path: &Path, freq: f64, secs: u32) {
    let n = 8000 * secs;
    let mut data = Vec::with_capacity(n as usize * 2);
    for i in 0..n {
        let v = (8000.0 * (2.0 * std::f64::consts::PI * freq * f64::from(i) / 8000.0).sin()) as i16;
        data.extend_from_slice(&v.to_le_bytes());
    }
    let mut w = Vec::new();
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&8000u32.to_le_bytes());
    w.extend_from_slice(&16000u32.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.extend_from_slice(&data);
    std::fs::write(path, w).unwrap();
}

/// Samples of a 16-bit mono WAV written by baresip's sndfile module.
fn samples(path: &Path) -> Vec<i16> {
    wav_samples(&std::fs::read(path).unwrap())
}

/// Samples of a mono WAV: 16-bit PCM (format 1) or G.711 µ-law (format 7).
fn wav_samples(b: &[u8]) -> Vec<i16> {
    let format = u16::from_le_bytes([b[20], b[21]]);
    let pos = b.windows(4).position(|w| w == b"data").expect("data chunk") + 8;
    match format {
        7 => b[pos..].iter().map(|&u| ulaw(u)).collect(),
        _ => b[pos..]
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect(),
    }
}

/// G.711 µ-law to linear.
fn ulaw(u: u8) -> i16 {
    let u = !u;
    let exp = (u >> 4) & 7;
    let s = ((((i32::from(u & 0x0f)) << 3) + 0x84) << exp) - 0x84;
    (if u & 0x80 != 0 { -s } else { s }) as i16
}

/// Dominant frequency by zero crossings, and the share of loud samples.
fn frequency_and_fill(s: &[i16]) -> (f64, f64) {
    let crossings = s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
    let loud = s.iter().filter(|v| v.unsigned_abs() > 500).count();
    let secs = s.len() as f64 / 8000.0;
    (
        crossings as f64 / 2.0 / secs,
        loud as f64 / s.len().max(1) as f64,
    )
}

struct Phone {
    dir: PathBuf,
    child: Child,
    /// The `ctrl_tcp` port that drives it.
    ctrl: PortBlock,
}

impl Drop for Phone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Phone {
    /// A baresip for `user` with its own config folder under `root`, sending `wav`.
    fn start(
        root: &Path,
        user: &str,
        tls_port: u16,
        ca: &str,
        rtp: &PortBlock,
        tone_secs: u32,
        commands: &[&str],
    ) -> Phone {
        let dir = root.join(user);
        std::fs::create_dir_all(&dir).unwrap();
        let wav = dir.join("tone.wav");
        tone(&wav, if user == "2001" { 440.0 } else { 880.0 }, tone_secs);
        let ctrl = PortBlock::reserve(1);
        let config = format!(
            "poll_method epoll\nsip_listen 127.0.0.1:0\nsip_cafile {ca}\n\
             audio_player nil,nil\naudio_source aufile,{}\naudio_alert nil,nil\n\
             module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\n\
             module srtp.so\nmodule sndfile.so\nmodule_app account.so\nmodule_app menu.so\n\
             module_app ctrl_tcp.so\nctrl_tcp_listen 127.0.0.1:{}\n\
             snd_path {}\nrtp_ports {}-{}\nnet_interface 127.0.0.1\n",
            wav.display(),
            ctrl.port(0),
            dir.display(),
            rtp.port(0),
            rtp.port(rtp.count - 1),
        );
        std::fs::write(dir.join("config"), config).unwrap();
        std::fs::write(
            dir.join("accounts"),
            format!(
                "<sip:{user}@example.com;transport=tls>;outbound=\"sip:127.0.0.1:{tls_port};transport=tls\";\
                 mediaenc=srtp-mand;regint=300;answermode=auto;audio_codecs=PCMU\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let mut cmd = Command::new("baresip");
        cmd.arg("-f").arg(&dir).args(["-s", "-t", "60"]);
        for c in commands {
            cmd.args(["-e", c]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("baresip (apt-get install baresip baresip-core)");
        Phone { dir, child, ctrl }
    }

    /// A `ctrl_tcp` command (netstring JSON), e.g. `dial` or `sndcode`.
    fn command(&self, command: &str, params: &str) {
        use std::io::Write;
        let end = Instant::now() + Duration::from_secs(5);
        let mut s = loop {
            match std::net::TcpStream::connect(("127.0.0.1", self.ctrl.port(0))) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("ctrl_tcp: {e}\n{}", self.log()),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let body =
            serde_json::json!({"command": command, "params": params, "token": "t"}).to_string();
        s.write_all(format!("{}:{body},", body.len()).as_bytes())
            .unwrap();
        // Give baresip the time to act before the connection goes.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The first `sip:<prefix>...;transport=tls` URI in the log (from a text prompt/note).
    fn uri_after(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let log = self.log();
            if let Some(i) = log.find(prefix) {
                let tail = &log[i..];
                let stop = tail
                    .find(|c: char| c.is_whitespace() || c == '(' || c == '\x1b')
                    .unwrap_or(tail.len());
                return Some(tail[..stop].to_string());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// How often `what` occurs in the log.
    fn count(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn wait_log(&self, what: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The recorded WAV whose name ends with `suffix` (`-dec.wav`: what the phone heard).
    fn dump(&self, suffix: &str) -> PathBuf {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("no *{suffix} in {}:\n{}", self.dir.display(), self.log()))
    }

    /// Every `a=crypto` key in the phone's SIP trace (what it sent and what it got).
    fn crypto_keys(&self) -> HashSet<String> {
        self.log()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a=crypto:"))
            .filter_map(|l| l.split("inline:").nth(1))
            .map(|k| k.split(['|', ' ']).next().unwrap_or("").to_string())
            .collect()
    }
}

#[test]
fn two_baresip_phones_over_tls_with_srtp_mand_hear_each_other_through_callvault() {
    let pki = Pki::new();
    let (server, tls_port, _p) = tls_server(&pki, false, "");
    let ca = pki.path("ca.pem");
    let root = tempfile::tempdir().unwrap();
    let (rtp_a, rtp_b) = (PortBlock::reserve(20), PortBlock::reserve(20));
    let b = Phone::start(root.path(), "2002", tls_port, &ca, &rtp_b, 4, &[]);
    assert!(
        b.wait_log("200 OK", Duration::from_secs(10)),
        "B registers over TLS:\n{}",
        b.log()
    );
    let a = Phone::start(
        root.path(),
        "2001",
        tls_port,
        &ca,
        &rtp_a,
        4,
        &["/dial sip:2002@example.com"],
    );
    assert!(
        a.wait_log("Call established", Duration::from_secs(15)),
        "A's call is up:\n{}\n--- callvault:\n{}",
        a.log(),
        server.log()
    );
    // The tone files last 4 s; the phone whose source ends hangs up.
    assert!(
        a.wait_log("terminated", Duration::from_secs(15)),
        "call ends:\n{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    for (phone, want) in [(&a, 880.0), (&b, 440.0)] {
        assert!(phone.log().contains("SRTP is Enabled"), "{}", phone.log());
        let heard = samples(&phone.dump("-dec.wav"));
        let (freq, fill) = frequency_and_fill(&heard);
        assert!(
            (freq - want).abs() < want * 0.05 && fill > 0.5,
            "{}: heard {freq:.0} Hz, {:.0}% loud (want {want} Hz)",
            phone.dir.display(),
            fill * 100.0
        );
    }
    // Each phone saw its own key and callvault's, never the other phone's.
    let (ka, kb) = (a.crypto_keys(), b.crypto_keys());
    assert!(ka.len() >= 2 && kb.len() >= 2, "A {ka:?} B {kb:?}");
    assert!(
        ka.is_disjoint(&kb),
        "a key crossed callvault: A {ka:?} B {kb:?}"
    );
    drop(server);
}

/// PROTOCOL.md section 2 end to end with two SRTP softphones over TLS: B keys `*7PIN#` (RFC 4733
/// events inside SRTP), A gets the text prompt naming a TLS store URI and calls it with SRTP,
/// B gets the ready note naming a TLS play URI and calls it. What callvault stored is A's
/// decrypted tone.
#[test]
fn baresip_store_flow_over_tls_and_srtp() {
    let pki = Pki::new();
    let (server, tls_port, _p) = tls_server(&pki, false, "[store]\nprompt_format = \"text\"\n");
    server.account_add("2002", "pw-b", "4321", "10MiB");
    let ca = pki.path("ca.pem");
    let root = tempfile::tempdir().unwrap();
    let (rtp_a, rtp_b) = (PortBlock::reserve(20), PortBlock::reserve(20));
    let b = Phone::start(root.path(), "2002", tls_port, &ca, &rtp_b, 40, &[]);
    assert!(b.wait_log("200 OK", Duration::from_secs(10)), "{}", b.log());
    let a = Phone::start(root.path(), "2001", tls_port, &ca, &rtp_a, 12, &[]);
    assert!(a.wait_log("200 OK", Duration::from_secs(10)), "{}", a.log());
    a.command("dial", "sip:2002@example.com");
    assert!(
        a.wait_log("Call established", Duration::from_secs(10)),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    // Step 11: the feature code as RFC 4733 events inside B's SRTP.
    b.command("sndcode", "*74321#");
    let store_uri = a
        .uri_after("sip:st_", Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "no prompt at A:\n{}\n--- callvault:\n{}",
                a.log(),
                server.log()
            )
        });
    assert!(
        store_uri.ends_with(&format!("@127.0.0.1:{tls_port};transport=tls")),
        "{store_uri}"
    );
    let store_id = store_uri["sip:".len()..]
        .split('@')
        .next()
        .unwrap()
        .to_string();
    // Steps 2-3: A calls the store URI; B gets the ready note with a TLS play URI.
    a.command("dial", &store_uri);
    let play_uri = b
        .uri_after("sip:play-st_", Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "no ready note at B:\n{}\n--- callvault:\n{}",
                b.log(),
                server.log()
            )
        });
    assert_eq!(
        play_uri,
        format!("sip:play-{store_id}@127.0.0.1:{tls_port};transport=tls")
    );
    // What is stored is A's tone, decrypted.
    let wav = runtime().block_on(common::http::get(
        server.http_addr(),
        &format!("/v1/stores/{store_id}/media?format=wav"),
        &[("Authorization", &common::http::basic("2002", "pw-b"))],
    ));
    assert_eq!(wav.status, 200, "{}", String::from_utf8_lossy(&wav.body));
    let (freq, fill) = frequency_and_fill(&wav_samples(&wav.body));
    assert!(
        (freq - 440.0).abs() < 22.0 && fill > 0.5,
        "stored audio is {freq:.0} Hz, {:.0}% loud",
        fill * 100.0
    );
    // Step 333: B calls the play URI over TLS with SRTP and receives the stream.
    let secured = b.count("SRTP is Enabled");
    b.command("dial", &play_uri);
    assert!(
        b.wait_log(
            "incoming rtp for 'audio' established",
            Duration::from_secs(10)
        ) && b.count("SRTP is Enabled") > secured,
        "{}",
        b.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    b.command("hangup", "");
    let end = Instant::now() + Duration::from_secs(5);
    while !server.log().contains("play session ended") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = server.log();
    let played = log
        .lines()
        .find(|l| l.contains("play session ended"))
        .and_then(|l| l.split("packets=").nth(1))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(played > 50, "play session sent {played} packets:\n{log}");
    // Every key a phone saw was its own or callvault's.
    let (ka, kb) = (a.crypto_keys(), b.crypto_keys());
    assert!(
        ka.is_disjoint(&kb),
        "a key crossed callvault: A {ka:?} B {kb:?}"
    );
    drop(server);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
