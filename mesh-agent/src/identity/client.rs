//! The agent's side of the CA API: one call per certificate, authenticated by the node's token.

use std::{path::PathBuf, sync::Mutex, time::Duration};

use rustls_pki_types::CertificateDer;
use tonic::Code;

use super::{
    SpiffeId,
    pb::{CreateCertificateRequest, certificate_service_client::CertificateServiceClient},
    root_store, tls,
};
use crate::model::ObjectName;

/// Where the node's credential comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// A projected service-account token, re-read at every request (the kubelet rotates it).
    File(PathBuf),
    /// A bootstrap token given directly (static mode).
    Static(String),
}

impl TokenSource {
    fn read(&self) -> Result<String, CaClientError> {
        match self {
            Self::Static(t) => Ok(t.clone()),
            Self::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_owned())
                .map_err(|e| CaClientError::Token(format!("{}: {e}", p.display()))),
        }
    }
}

/// Why a certificate request failed; the variants the manager treats differently are the
/// CA's refusals (logged loudly) and everything else (retried quietly with backoff).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaClientError {
    #[error("CA refused the node's credential: {0}")]
    Unauthenticated(String),
    #[error("CA denied the request: {0}")]
    Denied(String),
    #[error("CA found the request invalid: {0}")]
    Invalid(String),
    #[error("CA unreachable or unavailable: {0}")]
    Unavailable(String),
    #[error("node token: {0}")]
    Token(String),
    #[error("CA answer: {0}")]
    Answer(String),
}

impl From<tonic::Status> for CaClientError {
    fn from(s: tonic::Status) -> Self {
        let msg = s.message().to_owned();
        match s.code() {
            Code::Unauthenticated => Self::Unauthenticated(msg),
            Code::PermissionDenied => Self::Denied(msg),
            Code::InvalidArgument => Self::Invalid(msg),
            _ => Self::Unavailable(format!("{:?}: {msg}", s.code())),
        }
    }
}

/// Where the CA is and how to reach it.
#[derive(Clone, Debug)]
pub struct CaEndpoint {
    /// `host:port`.
    pub addr: String,
    /// The name the CA's serving certificate must carry.
    pub server_name: String,
    pub token: TokenSource,
}

/// A client that keeps one channel per trust bundle: a new bundle (root rotation) makes a new
/// channel trusting it.
pub struct CaClient {
    endpoint: CaEndpoint,
    channel: Mutex<Option<(Vec<CertificateDer<'static>>, tonic::transport::Channel)>>,
}

/// What the CA returned.
#[derive(Debug, Clone)]
pub struct Signed {
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

impl CaClient {
    #[must_use]
    pub fn new(endpoint: CaEndpoint) -> Self {
        Self {
            endpoint,
            channel: Mutex::new(None),
        }
    }

    fn channel(
        &self,
        trust: &[CertificateDer<'static>],
    ) -> Result<tonic::transport::Channel, CaClientError> {
        let mut cur = self
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((roots, ch)) = cur.as_ref()
            && roots.as_slice() == trust
        {
            return Ok(ch.clone());
        }
        let ch = tls::channel(
            &self.endpoint.addr,
            &self.endpoint.server_name,
            root_store(trust),
        )
        .map_err(|e| CaClientError::Unavailable(e.0))?;
        *cur = Some((trust.to_vec(), ch.clone()));
        Ok(ch)
    }

    /// Sends `csr` (DER) for `id` on behalf of `pod`, trusting `trust` for the CA's certificate.
    pub async fn create_certificate(
        &self,
        pod: &ObjectName,
        id: &SpiffeId,
        csr: Vec<u8>,
        ttl: Option<Duration>,
        trust: &[CertificateDer<'static>],
    ) -> Result<Signed, CaClientError> {
        let token = self.endpoint.token.read()?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr,
            spiffe_id: id.to_string(),
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            validity_seconds: ttl.map_or(0, |d| d.as_secs()),
        });
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaClientError::Token("not a valid header value".to_owned()))?;
        req.metadata_mut().insert("authorization", value);
        let mut client = CertificateServiceClient::new(self.channel(trust)?);
        let resp = client.create_certificate(req).await?.into_inner();
        if resp.cert_chain.is_empty() || resp.roots.is_empty() {
            return Err(CaClientError::Answer(
                "no certificate chain or no roots".to_owned(),
            ));
        }
        Ok(Signed {
            chain: resp
                .cert_chain
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            roots: resp.roots.into_iter().map(CertificateDer::from).collect(),
        })
    }
}
