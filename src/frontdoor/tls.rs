//! Step one of every connection: mutual TLS. The server configuration
//! (TLS 1.2/1.3, ring's suites in the agent's order, a client certificate
//! signed by the agent's CA required) is built once from the agent's PKI;
//! each connection's identity is read once from its verified certificate.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::config::{ServeConfig, ServeError};
use crate::pki::{Bundle, Ca, Identity, IdentityError, host_names};

/// ring's suites with AES-128-GCM first: the cheapest per byte with AES-NI,
/// which matters when images stream through the proxy.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        (!name.contains("AES_128_GCM"), !name.contains("AES_256_GCM"))
    });
    p
}

/// The server's TLS; `client_auth`: a certificate from the agent's CA is
/// required (the front door), else none is asked (the token listener).
fn tls_config(
    ca: &Ca,
    server: &Bundle,
    client_auth: bool,
) -> Result<rustls::ServerConfig, ServeError> {
    let provider = Arc::new(provider());
    let pem_certs = |pem: &str| -> Result<Vec<CertificateDer<'static>>, ServeError> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| ServeError::Tls(e.to_string()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca.cert_pem())? {
        roots.add(c).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let verifier = match client_auth {
        true => WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| ServeError::Tls(e.to_string()))?,
        false => WebPkiClientVerifier::no_client_auth(),
    };
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())
        .map_err(|e| ServeError::Tls(format!("the server key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&server.cert_pem)?, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order wins: OpenSSL clients (docker-py, curl) would pick
    // AES-256 first.
    cfg.ignore_client_order = true;
    Ok(cfg)
}

/// The front door's configuration checked and its TLS material ready: the
/// CA, a current server certificate for the host's names, the admin bundle
/// and the acceptor built from them. Made before the engine, so that a bad
/// configuration or CA stops the agent before anything on the host changes.
pub struct Tls {
    pub(super) acceptor: TlsAcceptor,
    pub(super) ca: Ca,
    /// With `[token]` enabled: the token listener's acceptor (the same
    /// server certificate, no client certificate asked) and its verifier.
    pub(super) token: Option<(TlsAcceptor, crate::oidc::Verifier)>,
}

impl Tls {
    pub fn prepare(cfg: &ServeConfig) -> Result<Tls, ServeError> {
        cfg.validate()?;
        let ca = Ca::load_or_create(&cfg.certs_dir)?;
        let server = ca.ensure_server(&cfg.certs_dir, &host_names(&cfg.san))?;
        ca.ensure_admin(&cfg.certs_dir)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&ca, &server, true)?));
        let token = match cfg.token.enabled {
            true => Some((
                TlsAcceptor::from(Arc::new(tls_config(&ca, &server, false)?)),
                // Key files are read now: a bad one stops the start here.
                crate::oidc::Verifier::new(&cfg.token).map_err(|e| ServeError::Config {
                    key: "token.issuers",
                    why: e.to_string(),
                })?,
            )),
            false => None,
        };
        Ok(Tls {
            acceptor,
            ca,
            token,
        })
    }
}

/// Who a handshaken connection is: the identity its verified client
/// certificate names (`None`: it sent none).
pub fn identity<IO>(
    tls: &tokio_rustls::server::TlsStream<IO>,
) -> Option<Result<Identity, IdentityError>> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::from_cert_der(c.as_ref()))
}
