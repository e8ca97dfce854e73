//! A listener's TLS material and the rustls configuration built from it: a leaf that the config (to
//! check a certificate and key at load time) and the listener both use.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// TLS termination for a listener; the files were read and parsed at load time.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub cert_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub private_key: std::sync::Arc<rustls::pki_types::PrivateKeyDer<'static>>,
    pub client_ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// The crypto provider of TLS listeners: aws-lc-rs.
///
/// A new connection's server side is one signature and one key exchange. ring has no assembly for
/// P-384: with a P-384 key a new connection cost ~1.7x aws-lc's CPU (P-256 with X25519: the same;
/// benches/load/results-tls-edge.md). Also installed as the process-wide default when none is:
/// ring is compiled in as well (tonic's TLS needs it), and with two providers built in, rustls code
/// that asks for the default (tonic's client config) would find none.
pub fn server_crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            let _ = provider.clone().install_default();
            Arc::new(provider)
        })
        .clone()
}

/// Builds the rustls server config for a listener: ALPN `h2`, client certificates required when
/// `client_ca` is set, TLS 1.3 session tickets (stateless, encrypted under keys of this config).
pub fn server_tls_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let provider = server_crypto_provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if tls.client_ca_certs.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for c in &tls.client_ca_certs {
            roots
                .add(c.clone())
                .map_err(|e| format!("bad client CA certificate: {e}"))?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder
        .with_single_cert(tls.cert_chain.clone(), tls.private_key.clone_key())
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // A resumed TLS 1.3 connection skips the certificate and its signature (50-80 us less CPU per
    // connection in benches/load). Stateless tickets: rustls' default keeps 256 sessions in memory,
    // and with 2 tickets per connection only a client back within ~128 connections could resume.
    // The keys are per config, so a reload (new certificate or client CA) also ends resumption of
    // sessions made under the old one.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(config)
}
