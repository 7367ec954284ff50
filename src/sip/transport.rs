//! The SIP transports callvault speaks (RFC 3261 §18: UDP and TCP; §26.2 / RFC 5630: TLS),
//! as named in `Via`, `transport=` URI parameters and the config's listen addresses
//! (`udp:127.0.0.1:5060`). The config re-uses this type; the transaction layer, the registrar
//! and the engine key their state on it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    /// SIP over TLS (RFC 3261 §26.2, RFC 5630): a TCP connection carrying TLS 1.2/1.3.
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "udp" => Ok(Transport::Udp),
            "tcp" => Ok(Transport::Tcp),
            "tls" => Ok(Transport::Tls),
            _ => Err(format!("unknown transport {s:?} (udp, tcp or tls)")),
        }
    }
}
