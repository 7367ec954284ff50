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
    let b = std::fs::read(path).unwrap();
    let pos = b.windows(4).position(|w| w == b"data").expect("data chunk") + 8;
    b[pos..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
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
        commands: &[&str],
    ) -> Phone {
        let dir = root.join(user);
        std::fs::create_dir_all(&dir).unwrap();
        let wav = dir.join("tone.wav");
        tone(&wav, if user == "2001" { 440.0 } else { 880.0 }, 4);
        let config = format!(
            "poll_method epoll\nsip_listen 127.0.0.1:0\nsip_cafile {ca}\n\
             audio_player nil,nil\naudio_source aufile,{}\naudio_alert nil,nil\n\
             module_path /usr/lib/baresip/modules\nmodule g711.so\nmodule aufile.so\n\
             module srtp.so\nmodule sndfile.so\nmodule_app account.so\nmodule_app menu.so\n\
             snd_path {}\nrtp_ports {}-{}\nnet_interface 127.0.0.1\n",
            wav.display(),
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
        cmd.arg("-f").arg(&dir).args(["-s", "-t", "20"]);
        for c in commands {
            cmd.args(["-e", c]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("baresip (apt-get install baresip baresip-core)");
        Phone { dir, child }
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
    let b = Phone::start(root.path(), "2002", tls_port, &ca, &rtp_b, &[]);
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
