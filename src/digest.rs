//! Digest hash algorithms (RFC 7616 §3.2, RFC 8760 for SHA-256) and HA1, the value an account
//! stores per algorithm. Shared by SIP digest (`sip::auth`), HTTP digest (`http::auth`) and
//! the accounts table (`storage::accounts`), so storage needs nothing of SIP.

use std::fmt;
use std::str::FromStr;

use md5::Md5;
use sha2::{Digest, Sha256};

/// An algorithm name callvault does not support (`MD5-sess`, `SHA-512-256`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported digest algorithm {0:?} (MD5 or SHA-256)")]
pub struct UnsupportedAlgorithm(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Lowercase hex digest of `data`.
    pub fn hash_hex(self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 => hex::encode(Md5::digest(data)),
            Algorithm::Sha256 => hex::encode(Sha256::digest(data)),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = UnsupportedAlgorithm;
    fn from_str(s: &str) -> Result<Self, UnsupportedAlgorithm> {
        if s.eq_ignore_ascii_case("MD5") {
            Ok(Algorithm::Md5)
        } else if s.eq_ignore_ascii_case("SHA-256") {
            Ok(Algorithm::Sha256)
        } else {
            Err(UnsupportedAlgorithm(s.to_string()))
        }
    }
}

impl TryFrom<String> for Algorithm {
    type Error = UnsupportedAlgorithm;
    fn try_from(s: String) -> Result<Self, UnsupportedAlgorithm> {
        s.parse()
    }
}

impl From<Algorithm> for String {
    fn from(a: Algorithm) -> String {
        a.as_str().to_string()
    }
}

/// H(username:realm:password), the value stored per account and algorithm.
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hash_hex(format!("{username}:{realm}:{password}").as_bytes())
}
