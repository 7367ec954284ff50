//! TLS for SIP (RFC 3261 §26.2, RFC 5630) and for the HTTP API (PROTOCOL.md section 7).
//!
//! rustls with exactly one crypto provider, `ring`, installed once at start
//! ([`install_crypto_provider`]): rustls panics at the first handshake when it cannot tell
//! which of two compiled-in providers to use (DESIGN.md). Only TLS 1.2 and 1.3 are enabled;
//! rustls has no code for 1.0/1.1, so such a ClientHello fails the handshake.
//!
//! The server side serves `[tls] cert_file`/`key_file` (PEM chain, leaf first). The client side
//! verifies servers against `[tls] ca_file`, or the system's roots when it is empty. The
//! framing of a TLS stream is the TCP framing in [`super`]: after the handshake the stream is
//! handed to the same connection loop.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Once};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::TlsConfig;

/// A handshake that takes longer than this is abandoned (a silent client must not hold a
/// task and a socket forever).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key} {path}: {detail}")]
    File {
        key: &'static str,
        path: String,
        detail: String,
    },
    #[error("tls.cert_file and tls.key_file are needed to serve TLS")]
    NoCertificate,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("no system root certificates found (set tls.ca_file)")]
    NoRoots,
}

/// Installs the process-wide rustls crypto provider (`ring`) once; later calls do nothing.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // `ring` rather than `aws-lc-rs`: it builds in seconds with the C compiler alone
        // (aws-lc-sys is a large C/CMake build). rustls deprecates its provider only for
        // lacking post-quantum key exchange, which no SIP phone here offers.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        // Err only when another provider was installed first, which is fine as well.
        let _ = provider.install_default();
    });
}

/// TLS 1.3 and 1.2, nothing older.
static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The server side for `tls:` listeners and HTTPS, from `cert_file`/`key_file`.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    if cfg.cert_file.is_empty() || cfg.key_file.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let file_err = |key: &'static str, path: &str| {
        let path = path.to_string();
        move |e: rustls::pki_types::pem::Error| TlsError::File {
            key,
            path,
            detail: e.to_string(),
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(file_err("cert_file", &cfg.cert_file))?
        .collect::<Result<_, _>>()
        .map_err(file_err("cert_file", &cfg.cert_file))?;
    if chain.is_empty() {
        return Err(TlsError::File {
            key: "cert_file",
            path: cfg.cert_file.clone(),
            detail: "no CERTIFICATE in the file".into(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(file_err("key_file", &cfg.key_file))?;
    let config = ServerConfig::builder_with_protocol_versions(VERSIONS)
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The client side for outbound TLS: roots from `ca_file`, or the system's.
pub fn client_config(cfg: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    if cfg.ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // One unusable system certificate must not take the others down.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
    } else {
        let file_err = |e: rustls::pki_types::pem::Error| TlsError::File {
            key: "ca_file",
            path: cfg.ca_file.clone(),
            detail: e.to_string(),
        };
        for cert in CertificateDer::pem_file_iter(&cfg.ca_file).map_err(file_err)? {
            roots.add(cert.map_err(file_err)?)?;
        }
        if roots.is_empty() {
            return Err(TlsError::File {
                key: "ca_file",
                path: cfg.ca_file.clone(),
                detail: "no CERTIFICATE in the file".into(),
            });
        }
    }
    let config = ClientConfig::builder_with_protocol_versions(VERSIONS)
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What the SIP transports need for TLS: an acceptor when callvault has a certificate, a
/// connector for outbound connections, and the name to verify per outbound address.
pub struct SipTls {
    pub(crate) acceptor: Option<TlsAcceptor>,
    pub(crate) connector: TlsConnector,
    /// Host names of `[[route]]` targets by resolved address (SNI and verification); an
    /// address not listed is verified as an IP address.
    names: std::sync::Mutex<std::collections::HashMap<SocketAddr, String>>,
}

impl SipTls {
    /// From `[tls]`: the acceptor only when a certificate is configured.
    pub fn from_config(cfg: &TlsConfig) -> Result<SipTls, TlsError> {
        let acceptor = if cfg.cert_file.is_empty() {
            None
        } else {
            Some(TlsAcceptor::from(server_config(cfg)?))
        };
        Ok(SipTls {
            acceptor,
            connector: TlsConnector::from(client_config(cfg)?),
            names: Default::default(),
        })
    }

    /// Verifies the server at `addr` as `host` (a route target named by host name).
    pub fn set_name(&self, addr: SocketAddr, host: &str) {
        if let Ok(mut m) = self.names.lock() {
            m.insert(addr, host.to_string());
        }
    }

    fn server_name(&self, addr: SocketAddr) -> Option<ServerName<'static>> {
        let named = self.names.lock().ok().and_then(|m| m.get(&addr).cloned());
        match named {
            Some(host) => match host.parse::<IpAddr>() {
                Ok(ip) => Some(ServerName::IpAddress(ip.into())),
                Err(_) => ServerName::try_from(host).ok(),
            },
            None => Some(ServerName::IpAddress(addr.ip().into())),
        }
    }

    /// Opens a TCP connection to `addr` and runs the client handshake.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = self.server_name(addr).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no usable TLS server name",
            )
        })?;
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        self.connector.connect(name, tcp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_one_line_errors() {
        let cfg = TlsConfig {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
            ca_file: String::new(),
        };
        let e = server_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("tls.cert_file") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        assert!(matches!(
            server_config(&TlsConfig::default()),
            Err(TlsError::NoCertificate)
        ));
        let cfg = TlsConfig {
            ca_file: "/nonexistent/ca.pem".into(),
            ..TlsConfig::default()
        };
        assert!(client_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("tls.ca_file"));
    }

    #[test]
    fn loads_a_generated_certificate_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.path().join("c.pem");
        let key_file = dir.path().join("k.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let cfg = TlsConfig {
            cert_file: cert_file.display().to_string(),
            key_file: key_file.display().to_string(),
            ca_file: cert_file.display().to_string(),
        };
        server_config(&cfg).unwrap();
        client_config(&cfg).unwrap();
        let tls = SipTls::from_config(&cfg).unwrap();
        let a: SocketAddr = "127.0.0.1:5061".parse().unwrap();
        tls.set_name(a, "localhost");
        assert_eq!(
            tls.server_name(a),
            Some(ServerName::try_from("localhost").unwrap())
        );
    }
}
