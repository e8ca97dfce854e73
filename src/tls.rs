//! A listener's TLS material and the rustls configuration built from it: a leaf that the config (to
//! check a certificate and key at load time) and the listener both use.

use std::path::PathBuf;
use std::sync::Arc;

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

/// Builds the rustls server config for a listener: ALPN `h2`, client certificates required when
/// `client_ca` is set.
pub fn server_tls_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
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
    Ok(config)
}
