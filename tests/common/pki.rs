//! A test PKI: a CA made with rcgen and a server certificate it signed for `localhost` and
//! 127.0.0.1, written as PEM files; rustls clients that trust only that CA.
#![allow(dead_code)] // each test uses a different subset

use std::sync::Arc;

use tokio_rustls::rustls;

use crate::common::{PortBlock, Server, ServerConfig};

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1, as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
}

impl Pki {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "callvault test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "callvault");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem() + &ca.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
        }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A rustls client config trusting only this CA.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        client_trusting(&self.ca_pem)
    }
}

pub fn client_trusting(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    callvault::transport::tls::install_crypto_provider();
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A server with `tls:127.0.0.1:<tls port>` beside UDP/TCP and `[tls]` set; `https` turns on
/// `[http] tls`. Returns the server and its TLS port.
pub fn tls_server(pki: &Pki, https: bool, extra: &str) -> (Server, u16, PortBlock) {
    let tls_port = PortBlock::reserve(1);
    let mut config = ServerConfig::new();
    config.extra = extra.to_string();
    let sip = config.sip_port();
    let mut server = Server::prepare(config);
    server.set_env(
        "CALLVAULT_SIP_LISTEN",
        &format!(
            "udp:127.0.0.1:{sip},tcp:127.0.0.1:{sip},tls:127.0.0.1:{}",
            tls_port.port(0)
        ),
    );
    server.set_env("CALLVAULT_TLS_CERT_FILE", &pki.path("cert.pem"));
    server.set_env("CALLVAULT_TLS_KEY_FILE", &pki.path("key.pem"));
    server.set_env("CALLVAULT_TLS_CA_FILE", &pki.path("ca.pem"));
    if https {
        server.set_env("CALLVAULT_HTTP_TLS", "true");
    }
    server.start();
    let port = tls_port.port(0);
    (server, port, tls_port)
}
