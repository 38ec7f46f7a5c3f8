//! Mutual TLS 1.3 between the relay and the agents' flow API: both sides present a certificate
//! (PEM files: from the mesh CA, cert-manager, or `mesh-agent ca`) and verify the other's against
//! the same trust bundle. Hubble does the same between Relay and the agents' port 4244.

use std::{path::PathBuf, sync::Arc};

use rustls::{ClientConfig, RootCertStore, ServerConfig, crypto::ring};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// What the agents' flow API certificates must name: one fixed name for every agent (the relay
/// dials them by IP), as Hubble's `*.<cluster>.hubble-grpc.cilium.io`.
pub const DEFAULT_SERVER_NAME: &str = "flows.mesh-system.svc";

/// A certificate, its key and the bundle the peer's certificate must chain to.
#[derive(Clone, Debug, clap::Args)]
pub struct TlsFiles {
    /// Our certificate chain (PEM).
    #[arg(long = "tls-cert")]
    pub cert: PathBuf,
    /// Our private key (PEM, PKCS#8 or SEC1/PKCS#1).
    #[arg(long = "tls-key")]
    pub key: PathBuf,
    /// Roots the peer's certificate must chain to (PEM; the mesh CA's `root-cert.pem`).
    #[arg(long = "tls-ca")]
    pub ca: PathBuf,
}

/// Unusable TLS material, naming the file and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_err(file: &std::path::Path, reason: &dyn std::fmt::Display) -> TlsError {
    TlsError::File {
        file: file.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read(file: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|e| file_err(file, &e))
}

fn certs(file: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(file, &format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(file, &"no CERTIFICATE block"));
    }
    Ok(certs)
}

impl TlsFiles {
    fn parts(
        &self,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
            Arc<RootCertStore>,
        ),
        TlsError,
    > {
        let chain = certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| file_err(&self.key, &format!("not a PEM private key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for c in certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| file_err(&self.ca, &format!("not a usable root: {e}")))?;
        }
        Ok((chain, key, Arc::new(roots)))
    }

    /// A server that requires a client certificate chaining to `ca`: unauthenticated peers
    /// fail the handshake and never reach the API.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let (chain, key, roots) = self.parts()?;
        let provider = Arc::new(ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| file_err(&self.ca, &e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }

    /// A client presenting our certificate and verifying the server's against `ca`.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let (chain, key, roots) = self.parts()?;
        let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}
