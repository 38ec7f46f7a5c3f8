//! Mutual TLS 1.3 between the relay and the agents' flow API. Both sides present a certificate
//! and check the other's, with their credentials from one of two places:
//! - the mesh CA (the default in the manifests): each side's certificate is an ordinary workload
//!   certificate (the agent's for its own pod, the relay's by the CA's relay rule), renewed at
//!   half-life and asked for at every handshake, so rotation needs no restart; the peer must
//!   chain to the mesh roots **and** carry the expected SPIFFE id (the mesh CA signs every
//!   workload, so chaining alone proves nothing);
//! - PEM files (cert-manager, or any CA): loaded once at start; the peer must chain to the given
//!   roots and, when an id is configured, carry it. Without an id this is Hubble's model: a CA
//!   dedicated to the flow API, where holding any of its certificates is the authorization.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, WebPkiServerVerifier,
        danger::{ServerCertVerified, ServerCertVerifier},
    },
    crypto::{WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tracing::warn;

use crate::identity::{CertProvider as _, SpiffeId, manager::IdentityManager};
// The pieces every mesh verifier shares with HBONE's.
use crate::proxy::tls::{
    Cached, ClientCheck, ClientVerifier, algorithms, refused, ring as provider, server_chain,
    signature_checks, spiffe_id_of,
};

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// What the agents' flow API certificates must name in file mode without `--agent-id`: one fixed
/// name for every agent (the relay dials them by IP), as Hubble's `*.<cluster>.hubble-grpc.cilium.io`.
pub const DEFAULT_SERVER_NAME: &str = "flows.mesh-system.svc";
/// The agents' service account as the manifests make it (their flow-API id's).
pub const DEFAULT_AGENT_ACCOUNT: (&str, &str) = ("mesh-system", "mesh-agent");
/// The relay's service account as the manifests make it (its client id's).
pub const DEFAULT_RELAY_ACCOUNT: (&str, &str) = ("mesh-system", "mesh-relay");

/// A certificate, its key and the bundle the peer's certificate must chain to.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsFiles {
    /// Our certificate chain (PEM); with --tls-key and --tls-ca instead of the mesh CA.
    #[arg(long = "tls-cert", requires_all = ["key", "ca"])]
    pub cert: Option<PathBuf>,
    /// Our private key (PEM, PKCS#8 or SEC1/PKCS#1).
    #[arg(long = "tls-key", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Roots the peer's certificate must chain to (PEM).
    #[arg(long = "tls-ca", requires = "cert")]
    pub ca: Option<PathBuf>,
}

/// Unusable TLS material or settings, naming the file or flag and why.
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

/// Where one side's certificate and the peer's roots come from; asked at every handshake.
pub trait Credentials: Send + Sync + 'static {
    /// Our current certificate and key, or `None` if there is none (yet).
    fn certified_key(&self) -> Option<Arc<CertifiedKey>>;
    /// The roots the peer's chain must lead to; the same `Arc` until they change.
    fn roots(&self) -> Arc<RootCertStore>;
}

/// PEM files, read once.
pub struct FileCredentials {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
}

impl FileCredentials {
    /// Reads and checks the three files (a bad one is named with the reason).
    pub fn load(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Self, TlsError> {
        let chain = certs(cert)?;
        let private = PrivateKeyDer::from_pem_slice(&read(key)?)
            .map_err(|e| file_err(key, &format!("not a PEM private key: {e}")))?;
        let signing = ring::sign::any_supported_type(&private)
            .map_err(|e| file_err(key, &format!("unusable key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing);
        certified
            .keys_match()
            .map_err(|e| file_err(key, &format!("does not match {}: {e}", cert.display())))?;
        let mut roots = RootCertStore::empty();
        for c in certs(ca)? {
            roots
                .add(c)
                .map_err(|e| file_err(ca, &format!("not a usable root: {e}")))?;
        }
        Ok(Self {
            key: Arc::new(certified),
            roots: Arc::new(roots),
        })
    }
}

impl TlsFiles {
    /// The files' credentials, or `None` when no file was given.
    pub fn credentials(&self) -> Result<Option<FileCredentials>, TlsError> {
        match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => FileCredentials::load(cert, key, ca).map(Some),
            _ => Ok(None),
        }
    }
}

impl Credentials for FileCredentials {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.key))
    }

    fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }
}

/// One identity's certificate from the mesh CA through an [`IdentityManager`] (which renews it
/// at half-life); the roots are the manager's (its anchors and the CA's latest bundle, so a root
/// rotation applies at the next handshake).
pub struct CaCredentials {
    manager: IdentityManager,
    id: SpiffeId,
    /// The signing key parsed for the current serial (parsed again only after a renewal).
    cached: Mutex<Option<(String, Arc<CertifiedKey>)>>,
}

impl CaCredentials {
    /// `manager` must be managing `id` (`set_workloads`); it is kept alive here.
    #[must_use]
    pub fn new(manager: IdentityManager, id: SpiffeId) -> Self {
        Self {
            manager,
            id,
            cached: Mutex::new(None),
        }
    }
}

impl Credentials for CaCredentials {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.manager.workload(&self.id)?;
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((serial, key)) = cached.as_ref()
            && *serial == cert.serial
        {
            return Some(Arc::clone(key));
        }
        let signing = match ring::sign::any_supported_type(&cert.key) {
            Ok(k) => k,
            Err(e) => {
                warn!(identity = %self.id, error = %e, "flow API key unusable");
                return None;
            }
        };
        let key = Arc::new(CertifiedKey::new(cert.chain.clone(), signing));
        *cached = Some((cert.serial.clone(), Arc::clone(&key)));
        Some(key)
    }

    fn roots(&self) -> Arc<RootCertStore> {
        self.manager.roots()
    }
}

/// `end_entity`'s SPIFFE id must be `expected`.
fn check_id(
    end_entity: &CertificateDer<'_>,
    expected: &SpiffeId,
    who: &str,
) -> Result<(), rustls::Error> {
    let id = spiffe_id_of(end_entity)
        .map_err(|e| refused(format!("{who} certificate: {e}, expected {expected}")))?;
    if id != *expected {
        return Err(refused(format!(
            "{who} identity {id} is not the expected {expected}"
        )));
    }
    Ok(())
}

/// The flow API's check of the relay (in a [`ClientVerifier`]): the credentials' current roots,
/// and URI SAN `expected` when one is set.
struct RelayCheck {
    creds: Arc<dyn Credentials>,
    expected: Option<SpiffeId>,
}

impl std::fmt::Debug for RelayCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCheck")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ClientCheck for RelayCheck {
    fn roots(&self) -> Arc<RootCertStore> {
        self.creds.roots()
    }

    fn accept(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match &self.expected {
            Some(expected) => check_id(end_entity, expected, "client"),
            None => Ok(()),
        }
    }
}

/// The relay's check of an agent: a chain to the current roots and URI SAN `expected` (the
/// agents' id; the relay dials pod IPs, so no DNS name could be checked), or, without an id,
/// the name the relay dialled (file mode, Hubble's fixed name).
struct AgentVerifier {
    creds: Arc<dyn Credentials>,
    expected: Option<SpiffeId>,
    by_name: Cached<WebPkiServerVerifier>,
    algs: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for AgentVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for AgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.creds.roots();
        let Some(expected) = &self.expected else {
            let inner = self.by_name.get(roots, |roots| {
                WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| rustls::Error::General(format!("server verifier: {e}")))
            })?;
            return inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        };
        server_chain(end_entity, intermediates, &roots, now, &self.algs)?;
        check_id(end_entity, expected, "agent")?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!(algs);
}

/// Presents the credentials' current certificate (server and client side alike).
struct Current(Arc<dyn Credentials>);

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.0.certified_key();
        if key.is_none() {
            warn!("flow API handshake refused: no certificate from the CA yet");
        }
        key
    }
}

impl ResolvesClientCert for Current {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.0.certified_key();
        if key.is_none() {
            warn!("relay has no client certificate from the CA yet: the agent will refuse it");
        }
        key
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The agent's flow API: TLS 1.3, ALPN `h2`, our current certificate, and a mandatory client
/// certificate chaining to the roots (with URI SAN `client_id` when set): an unauthenticated
/// peer fails the handshake and never reaches the API.
pub fn server_config(
    creds: Arc<dyn Credentials>,
    client_id: Option<SpiffeId>,
) -> Result<ServerConfig, TlsError> {
    let verifier = ClientVerifier::new(RelayCheck {
        creds: Arc::clone(&creds),
        expected: client_id,
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Current(creds)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection is a full handshake, so the relay's certificate is
    // checked against the current roots and id each time and ours is the current one. The
    // relay keeps one long-lived connection per agent, so this costs nothing measurable.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The relay's side: our current certificate, the agent checked by `agent_id` (or, without one,
/// by the dialled name).
pub fn client_config(
    creds: Arc<dyn Credentials>,
    agent_id: Option<SpiffeId>,
) -> Result<ClientConfig, TlsError> {
    let verifier = AgentVerifier {
        creds: Arc::clone(&creds),
        expected: agent_id,
        by_name: Cached::new(),
        algs: algorithms(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Current(creds)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Full handshakes only (see `server_config`): a reconnect checks the agent's current
    // certificate and presents our current one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    use rustls::{ClientConnection, ServerConnection};

    /// A scratch directory named after the test.
    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mesh-relay-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A CA in `d/ca.crt` and one certificate per `(file stem, SAN)`: a `spiffe://` SAN is a
    /// URI, anything else a DNS name.
    fn pki(d: &std::path::Path, leaves: &[(&str, &str)]) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(d.join("ca.crt"), ca.pem()).unwrap();
        for (stem, san) in leaves {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![if san.starts_with("spiffe://") {
                SanType::URI((*san).try_into().unwrap())
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            }];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            std::fs::write(d.join(format!("{stem}.crt")), cert.pem()).unwrap();
            std::fs::write(d.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        }
    }

    fn creds(d: &std::path::Path, stem: &str) -> Arc<dyn Credentials> {
        Arc::new(
            FileCredentials::load(
                &d.join(format!("{stem}.crt")),
                &d.join(format!("{stem}.key")),
                &d.join("ca.crt"),
            )
            .unwrap(),
        )
    }

    /// A whole handshake in memory; the first error either side raises.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(DEFAULT_SERVER_NAME).unwrap();
        let mut c = ClientConnection::new(Arc::new(client), name)?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err(rustls::Error::General(
            "handshake made no progress".to_owned(),
        ))
    }

    const RELAY: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-relay";
    const AGENT: &str = "spiffe://cluster.local/ns/mesh-system/sa/mesh-agent";

    #[test]
    fn file_mode_checks_names_by_default_and_ids_when_asked() {
        let d = dir("files");
        pki(
            &d,
            &[
                ("agent-dns", DEFAULT_SERVER_NAME),
                ("relay-dns", "relay.mesh-system.svc"),
                ("agent-id", AGENT),
                ("relay-id", RELAY),
            ],
        );
        let relay: SpiffeId = RELAY.parse().unwrap();
        let agent: SpiffeId = AGENT.parse().unwrap();
        // Hubble's model: a dedicated CA, the agents' fixed DNS name.
        handshake(
            client_config(creds(&d, "relay-dns"), None).unwrap(),
            server_config(creds(&d, "agent-dns"), None).unwrap(),
        )
        .unwrap();
        // With the ids asked for, both sides check URI SANs.
        handshake(
            client_config(creds(&d, "relay-id"), Some(agent.clone())).unwrap(),
            server_config(creds(&d, "agent-id"), Some(relay.clone())).unwrap(),
        )
        .unwrap();
        let e = handshake(
            client_config(creds(&d, "relay-dns"), None).unwrap(),
            server_config(creds(&d, "agent-dns"), Some(relay.clone())).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("client certificate") && e.contains(RELAY), "{e}");
        let e = handshake(
            client_config(creds(&d, "relay-id"), Some(agent.clone())).unwrap(),
            server_config(creds(&d, "relay-id"), Some(relay)).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!(
                "agent identity {RELAY} is not the expected {AGENT}"
            )),
            "{e}"
        );
        // Without an id, an agent certificate must carry the dialled name.
        let e = handshake(
            client_config(creds(&d, "relay-dns"), None).unwrap(),
            server_config(creds(&d, "agent-id"), None).unwrap(),
        );
        assert!(e.is_err(), "a certificate without the name was accepted");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn file_errors_name_the_file() {
        let d = dir("errors");
        pki(
            &d,
            &[("a", DEFAULT_SERVER_NAME), ("b", DEFAULT_SERVER_NAME)],
        );
        let err = |cert: &str, key: &str, ca: &str| {
            FileCredentials::load(&d.join(cert), &d.join(key), &d.join(ca))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = err("a.crt", "b.key", "ca.crt");
        assert!(e.contains("b.key") && e.contains("does not match"), "{e}");
        let e = err("a.crt", "a.key", "missing.crt");
        assert!(e.contains("missing.crt"), "{e}");
        let e = err("a.key", "a.key", "ca.crt");
        assert!(e.contains("a.key") && e.contains("CERTIFICATE"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
