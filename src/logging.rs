//! Logs (PROTOCOL 8): the `[log]` section, the subscriber set up from it, the SIP trace with
//! secrets masked, and HEP v3 mirroring of SIP to a Homer capture server.
//!
//! HEP v3 (the HEP3 "chunk" format of HEP/EEP, as Homer and Kamailio's siptrace use it): a
//! `HEP3` header with the total length, then chunks of vendor 0 (`u16 vendor, u16 type,
//! u16 length` including these 6 bytes, then the value, all big-endian): IP family (1),
//! protocol (2, 17 = UDP, 6 = TCP), source/destination IPv4 (3/4) or IPv6 (5/6), ports (7/8),
//! timestamp seconds and microseconds (9/10), protocol type (11, 1 = SIP), capture agent id
//! (12), and the payload (15). No crate for it is kept up to date, so this is a small encoder
//! with its own tests.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Transport;

/// `[log] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (default) or `json` (one JSON object a line).
    pub format: LogFormat,
    /// A tracing filter (`info`, `debug`, `callvault=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
    /// Log every SIP message sent and received in full, secrets masked.
    pub sip_trace: bool,
    /// `udp:HOST:PORT` of a HEP v3 capture server; empty: none.
    pub hep: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            sip_trace: false,
            hep: String::new(),
        }
    }
}

impl LogConfig {
    /// Checks `level` and `hep`; the error names what is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if tracing_subscriber::EnvFilter::try_new(&self.level).is_err() {
            return Err(("log.level", format!("{:?} is not a log filter", self.level)));
        }
        self.hep_target().map(|_| ()).map_err(|e| ("log.hep", e))
    }

    /// The HEP capture server, if configured.
    pub fn hep_target(&self) -> Result<Option<SocketAddr>, String> {
        if self.hep.is_empty() {
            return Ok(None);
        }
        let Some(addr) = self.hep.strip_prefix("udp:") else {
            return Err(format!("{:?}: expected udp:HOST:PORT", self.hep));
        };
        use std::net::ToSocketAddrs;
        addr.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(Some)
            .ok_or_else(|| format!("{:?}: cannot resolve", self.hep))
    }
}

/// Changes the log filter of the running subscriber (SIGHUP); set by [`init`].
type Reloader = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD: std::sync::OnceLock<Reloader> = std::sync::OnceLock::new();

/// Installs the global subscriber: `RUST_LOG` if set, else `level`; text or JSON on stderr.
pub fn init(cfg: &LogConfig) {
    use std::io::IsTerminal;
    let filter = rust_log()
        .ok_or(())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).map_err(|_| ()))
        .or_else(|()| tracing_subscriber::EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // The two formats are different types; each keeps its own reload handle.
    let reloader: Reloader = match cfg.format {
        LogFormat::Text => {
            let b = builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f| h.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Json => {
            let b = builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |f| h.reload(f).map_err(|e| e.to_string()))
        }
    };
    let _ = RELOAD.set(reloader);
}

/// `RUST_LOG` when set and not empty (an empty one means "not set").
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Applies `[log] level` again (SIGHUP). `RUST_LOG`, when set, still wins.
pub fn reload_level(level: &str) -> Result<(), String> {
    if rust_log().is_some() {
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    match RELOAD.get() {
        Some(r) => r(filter),
        None => Ok(()), // no subscriber of ours (tests, library use)
    }
}

// ------------------------------------------------------------------------------------------
// Masking

/// Header names whose whole credential value is masked (digest responses, bearer tokens).
const SECRET_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "callvault-pin"];
/// `name=` / `"name":` keys whose values are masked wherever they appear (bodies, URLs).
const SECRET_KEYS: [&str; 5] = ["pin", "password", "token", "response", "cnonce"];
const MASK: &str = "***";

/// A SIP message (or any text) with PINs, passwords and tokens replaced by `***`: credential
/// headers entirely after their scheme, and the values of `pin`, `password`, `token`,
/// `response`, `cnonce` keys in JSON (`"pin":"1234"`), URLs and headers (`token=abc`,
/// `response="..."`), plus DTMF digits of INFO bodies (`Signal=`).
pub fn mask_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let lower = line.to_ascii_lowercase();
        let header = SECRET_HEADERS
            .iter()
            .find(|h| lower.starts_with(*h) && lower[h.len()..].trim_start().starts_with(':'));
        if let Some(h) = header {
            // Keep the name and the scheme (Digest/Bearer) for the reader, nothing else.
            let colon = h.len() + lower[h.len()..].find(':').unwrap_or(0);
            let value = line[colon + 1..].trim_start();
            let scheme = value.split(' ').next().unwrap_or("");
            out.push_str(&line[..=colon]);
            out.push(' ');
            if value.contains(' ') {
                out.push_str(scheme);
                out.push(' ');
            }
            out.push_str(MASK);
            continue;
        }
        if lower.starts_with("signal") && lower["signal".len()..].trim_start().starts_with('=') {
            out.push_str("Signal=");
            out.push_str(MASK);
            continue;
        }
        out.push_str(&mask_keys(line));
    }
    out
}

/// Masks the value after every `key=`, `key="`, `"key":"` or `"key": ` of [`SECRET_KEYS`].
fn mask_keys(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    'scan: while i < line.len() {
        for key in SECRET_KEYS {
            if !lower[i..].starts_with(key) {
                continue;
            }
            // A whole key: not the tail of a longer word (`upin`, `tokens`).
            let before_ok =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            let mut j = i + key.len();
            let quoted_key = i > 0 && bytes[i - 1] == b'"';
            if quoted_key && bytes.get(j) == Some(&b'"') {
                j += 1;
            }
            let sep = bytes.get(j).copied();
            if !before_ok || !matches!(sep, Some(b'=') | Some(b':')) {
                continue;
            }
            j += 1;
            while bytes.get(j) == Some(&b' ') {
                j += 1;
            }
            let quote = bytes.get(j) == Some(&b'"');
            if quote {
                j += 1;
            }
            let end = (j..line.len())
                .find(|&k| {
                    let c = bytes[k];
                    if quote {
                        c == b'"'
                    } else {
                        matches!(c, b'&' | b',' | b';' | b' ' | b'"' | b'}' | b'>' | b'\r')
                    }
                })
                .unwrap_or(line.len());
            if end == j {
                continue; // empty value: nothing to hide
            }
            out.push_str(&line[i..j]);
            out.push_str(MASK);
            i = end;
            continue 'scan;
        }
        let c = line[i..].chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

// ------------------------------------------------------------------------------------------
// HEP v3

/// One HEP v3 packet for a SIP message from `src` to `dst` at `at`.
pub fn hep3_packet(
    src: SocketAddr,
    dst: SocketAddr,
    transport: Transport,
    at: SystemTime,
    capture_id: u32,
    payload: &[u8],
) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        let len = u16::try_from(6 + value.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&value[..usize::from(len) - 6]);
    }
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + 100);
    out.extend_from_slice(b"HEP3\0\0");
    let (family, kinds) = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (2u8, (3, 4)),
        _ => (10u8, (5, 6)),
    };
    chunk(&mut out, 1, &[family]);
    chunk(
        &mut out,
        2,
        &[if transport == Transport::Tcp { 6 } else { 17 }],
    );
    let ip_bytes = |a: IpAddr| match (a, family) {
        (IpAddr::V4(v4), 2) => v4.octets().to_vec(),
        (IpAddr::V4(v4), _) => v4.to_ipv6_mapped().octets().to_vec(),
        (IpAddr::V6(v6), _) => v6.octets().to_vec(),
    };
    chunk(&mut out, kinds.0, &ip_bytes(src.ip()));
    chunk(&mut out, kinds.1, &ip_bytes(dst.ip()));
    chunk(&mut out, 7, &src.port().to_be_bytes());
    chunk(&mut out, 8, &dst.port().to_be_bytes());
    let secs = u32::try_from(since.as_secs()).unwrap_or(u32::MAX);
    chunk(&mut out, 9, &secs.to_be_bytes());
    chunk(&mut out, 10, &since.subsec_micros().to_be_bytes());
    chunk(&mut out, 11, &[1]); // SIP
    chunk(&mut out, 12, &capture_id.to_be_bytes());
    chunk(&mut out, 15, payload);
    let total = u16::try_from(out.len()).unwrap_or(u16::MAX);
    out[4..6].copy_from_slice(&total.to_be_bytes());
    out
}

/// Where SIP messages are traced: the log (masked) and a HEP capture server.
#[derive(Debug, Default)]
pub struct SipTracer {
    log: bool,
    hep: Option<(UdpSocket, SocketAddr)>,
}

impl SipTracer {
    /// From `[log]`; a HEP socket that cannot be opened is logged and left out.
    pub fn new(cfg: &LogConfig) -> SipTracer {
        let hep = match cfg.hep_target() {
            Ok(Some(target)) => {
                let bind: SocketAddr = if target.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                match UdpSocket::bind(bind).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                    Ok(s) => Some((s, target)),
                    Err(e) => {
                        tracing::warn!(error = %e, "HEP socket not opened; no HEP mirroring");
                        None
                    }
                }
            }
            _ => None,
        };
        SipTracer {
            log: cfg.sip_trace,
            hep,
        }
    }

    pub fn is_on(&self) -> bool {
        self.log || self.hep.is_some()
    }

    /// One SIP message that went from `src` to `dst` (`received`: it came to us).
    pub fn trace(
        &self,
        received: bool,
        src: SocketAddr,
        dst: SocketAddr,
        transport: Transport,
        data: &[u8],
    ) {
        if self.log {
            let text = mask_secrets(&String::from_utf8_lossy(data));
            let dir = if received { "received" } else { "sent" };
            tracing::info!(%src, %dst, %transport, "SIP {dir}:\n{text}");
        }
        if let Some((sock, target)) = &self.hep {
            let pkt = hep3_packet(src, dst, transport, SystemTime::now(), 1, data);
            // Best effort, like any capture agent: a full socket buffer drops the copy.
            let _ = sock.send_to(&pkt, target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_credentials_pins_and_tokens() {
        let msg = "MESSAGE sip:x SIP/2.0\r\n\
            Authorization: Digest username=\"1001\", realm=\"e\", response=\"abcdef\"\r\n\
            Proxy-Authorization: Bearer s3cr3t-token\r\n\
            Content-Type: application/json\r\n\r\n\
            {\"action\":\"store\",\"pin\":\"4321\",\"upload_url\":\"http://h/v1/stores/st_1/data?token=deadbeef&x=1\"}\n\
            Signal=7\n\
            password=hunter2; next";
        let m = mask_secrets(msg);
        for secret in [
            "abcdef",
            "s3cr3t-token",
            "4321",
            "deadbeef",
            "hunter2",
            "Signal=7",
        ] {
            assert!(!m.contains(secret), "{secret} left in:\n{m}");
        }
        assert!(m.contains("Authorization: Digest ***"), "{m}");
        assert!(m.contains("Proxy-Authorization: Bearer ***"), "{m}");
        assert!(m.contains("\"pin\":\"***\""), "{m}");
        assert!(m.contains("token=***&x=1"), "{m}");
        assert!(m.contains("password=***; next"), "{m}");
        assert!(m.contains("\"action\":\"store\""), "the rest stays: {m}");
        // Words that only contain a key are left alone.
        assert_eq!(mask_secrets("spinner=1 tokens=2"), "spinner=1 tokens=2");
    }

    #[test]
    fn hep3_layout() {
        let src: SocketAddr = "127.0.0.1:5070".parse().unwrap();
        let dst: SocketAddr = "127.0.0.2:5060".parse().unwrap();
        let at = UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_250_000);
        let p = hep3_packet(src, dst, Transport::Udp, at, 7, b"INVITE sip:x SIP/2.0\r\n");
        assert_eq!(&p[..4], b"HEP3");
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])), p.len());
        // Walk the chunks.
        let mut at = 6;
        let mut seen = std::collections::BTreeMap::new();
        while at < p.len() {
            let kind = u16::from_be_bytes([p[at + 2], p[at + 3]]);
            let len = usize::from(u16::from_be_bytes([p[at + 4], p[at + 5]]));
            seen.insert(kind, p[at + 6..at + len].to_vec());
            at += len;
        }
        assert_eq!(at, p.len());
        assert_eq!(seen[&1], [2]);
        assert_eq!(seen[&2], [17]);
        assert_eq!(seen[&3], [127, 0, 0, 1]);
        assert_eq!(seen[&4], [127, 0, 0, 2]);
        assert_eq!(seen[&7], 5070u16.to_be_bytes());
        assert_eq!(seen[&8], 5060u16.to_be_bytes());
        assert_eq!(seen[&9], 1_700_000_000u32.to_be_bytes());
        assert_eq!(seen[&10], 250_000u32.to_be_bytes());
        assert_eq!(seen[&11], [1]);
        assert_eq!(seen[&12], 7u32.to_be_bytes());
        assert_eq!(seen[&15], b"INVITE sip:x SIP/2.0\r\n");
        let v6 = hep3_packet(
            "[::1]:1".parse().unwrap(),
            dst,
            Transport::Tcp,
            at_zero(),
            1,
            b"",
        );
        assert_eq!(v6[6 + 6], 10, "IPv6 family when either side is IPv6");
    }

    fn at_zero() -> SystemTime {
        UNIX_EPOCH
    }

    #[test]
    fn config_checks() {
        let mut c = LogConfig::default();
        assert!(c.validate().is_ok());
        c.hep = "udp:127.0.0.1:9060".into();
        assert_eq!(
            c.hep_target().unwrap(),
            Some("127.0.0.1:9060".parse().unwrap())
        );
        c.hep = "tcp:127.0.0.1:9060".into();
        assert_eq!(c.validate().unwrap_err().0, "log.hep");
        c.hep.clear();
        c.level = "info,[".into();
        assert_eq!(c.validate().unwrap_err().0, "log.level");
    }
}
