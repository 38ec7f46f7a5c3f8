//! mTLS for HBONE: TLS 1.3 only, ALPN `h2`, SPIFFE URI SAN identities, certificates asked of the
//! [`CertProvider`] at every handshake.
//!
//! How the server learns which workload's certificate to present: the client sends SNI naming the
//! destination identity ([`sni_for`], a DNS-safe encoding). ztunnel's old node mode learned it from
//! the accepted socket's local address instead (the client dialled the pod address and the node
//! steered it); SNI needs no steering on the destination node. See `ARCHITECTURE.md`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DistinguishedName, OtherError, RootCertStore};
use tracing::warn;

use crate::identity::{CertProvider, SpiffeId};

/// ALPN protocol both sides require.
pub const ALPN_H2: &[u8] = b"h2";
/// The fixed suffix of an HBONE SNI name; never resolved, only matched.
const SNI_SUFFIX: &str = "hbone.kernmesh";
/// A DNS label holds at most 63 bytes; hex pairs fill 62.
const SNI_LABEL: usize = 62;
/// A DNS name holds at most 253 bytes.
const SNI_MAX: usize = 253;

/// What can go wrong building a TLS configuration or reading a peer's identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate for workload {0} on this node (yet)")]
    NoCertificate(SpiffeId),
    #[error("identity {0} is too long for an HBONE SNI name (at most {max} bytes)", max = sni_capacity())]
    SniTooLong(SpiffeId),
    #[error("SNI {0:?} is not an HBONE identity name")]
    BadSni(String),
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
    #[error("building the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The longest SPIFFE path (`<td>/ns/<ns>/sa/<sa>`) an SNI name can carry.
const fn sni_capacity() -> usize {
    // hex doubles; every SNI_LABEL hex bytes cost one dot; then the suffix and its dot.
    (SNI_MAX - SNI_SUFFIX.len() - 1) * SNI_LABEL / (SNI_LABEL + 1) / 2
}

/// The crypto HBONE (here) and the flow API (`relay::tls`) use.
pub(crate) fn ring() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// [`ring`]'s signature algorithms, which every verifier here checks chains and handshakes with.
pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The three handshake-signature methods of a rustls `ServerCertVerifier` or
/// `ClientCertVerifier`, checked with the verifier's field `$algs` ([`algorithms`]) as rustls'
/// own webpki verifiers do. A macro because the mesh's verifiers (HBONE's and the flow API's)
/// implement two traits that share only these methods; paths are absolute so it
/// expands anywhere.
macro_rules! signature_checks {
    ($algs:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$algs)
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$algs.supported_schemes()
        }
    };
}
pub(crate) use signature_checks;

/// The SNI name that asks the server for `id`'s certificate: the id without `spiffe://`, hex in
/// labels of 62, then `.hbone.kernmesh`. Hex because a service account may hold dots and the trust
/// domain does, so no dotted form would be unambiguous.
pub fn sni_for(id: &SpiffeId) -> Result<ServerName<'static>, TlsError> {
    let path = id.to_string();
    let path = path.strip_prefix("spiffe://").unwrap_or(&path);
    if path.len() > sni_capacity() {
        return Err(TlsError::SniTooLong(id.clone()));
    }
    let mut name = String::with_capacity(SNI_MAX);
    for (i, b) in path.bytes().enumerate() {
        if i > 0 && (i * 2) % SNI_LABEL == 0 {
            name.push('.');
        }
        let _ = write!(name, "{b:02x}");
    }
    name.push('.');
    name.push_str(SNI_SUFFIX);
    ServerName::try_from(name).map_err(|e| TlsError::BadSni(e.to_string()))
}

/// The identity an SNI name made by [`sni_for`] names.
pub fn id_from_sni(sni: &str) -> Result<SpiffeId, TlsError> {
    let bad = || TlsError::BadSni(sni.to_owned());
    let hex = sni
        .strip_suffix(SNI_SUFFIX)
        .and_then(|h| h.strip_suffix('.'))
        .ok_or_else(bad)?;
    let hex: String = hex.split('.').collect();
    if !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    let path = String::from_utf8(bytes).map_err(|_| bad())?;
    format!("spiffe://{path}").parse().map_err(|_| bad())
}

/// The SPIFFE id in a certificate's URI SAN (exactly one `spiffe://` URI, as SPIFFE requires).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::PeerCertificate(format!("not X.509: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::PeerCertificate(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::PeerCertificate("no subjectAltName".to_owned()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let uri = uris
        .next()
        .ok_or_else(|| TlsError::PeerCertificate("no spiffe:// URI SAN".to_owned()))?;
    if uris.next().is_some() {
        return Err(TlsError::PeerCertificate(
            "more than one spiffe:// URI SAN".to_owned(),
        ));
    }
    uri.parse()
        .map_err(|e| TlsError::PeerCertificate(format!("URI SAN {uri:?}: {e}")))
}

/// A certificate refused with `msg` (rustls reports it as an invalid certificate).
pub(crate) fn refused(msg: String) -> rustls::Error {
    #[derive(Debug)]
    struct Msg(String);
    impl std::fmt::Display for Msg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Msg {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Msg(msg)))))
}

/// `end_entity` chains through `intermediates` to one of `roots` with server-auth usage: rustls'
/// webpki server check without its DNS-name match, for peers named by URI SAN instead.
pub(crate) fn server_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now: UnixTime,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<(), rustls::Error> {
    let cert = ParsedCertificate::try_from(end_entity)?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &cert,
        roots,
        intermediates,
        now,
        algs.all,
    )
}

/// The client's check of the server: chain to one of the roots, and URI SAN = the identity the
/// destination must have (not a DNS name, as ztunnel).
#[derive(Debug)]
struct ServerIdVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerIdVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        server_chain(end_entity, intermediates, &self.roots, now, &self.algs)?;
        let id = spiffe_id_of(end_entity).map_err(|e| refused(e.to_string()))?;
        if id != self.expected {
            return Err(refused(format!(
                "server identity {id} is not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!(algs);
}

/// The client configuration of one pooled connection: `source`'s certificate (asked for now, so
/// a rotated one is used by the next connection), expecting `expected` on the other side.
pub fn client_config(
    provider: &dyn CertProvider,
    source: &SpiffeId,
    expected: &SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let cert = provider
        .workload(source)
        .ok_or_else(|| TlsError::NoCertificate(source.clone()))?;
    let verifier = ServerIdVerifier {
        roots: provider.roots(),
        expected: expected.clone(),
        algs: algorithms(),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A webpki verifier built for one root store, rebuilt only when the roots handed out are
/// another `Arc` (a rotation): building one parses every root, too slow for each handshake.
pub(crate) struct Cached<V: ?Sized> {
    slot: Mutex<Option<(Arc<RootCertStore>, Arc<V>)>>,
}

impl<V: ?Sized> Cached<V> {
    pub(crate) fn new() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }

    /// The verifier for `roots`, built by `build` unless the last one was for the same roots.
    pub(crate) fn get(
        &self,
        roots: Arc<RootCertStore>,
        build: impl FnOnce(Arc<RootCertStore>) -> Result<Arc<V>, rustls::Error>,
    ) -> Result<Arc<V>, rustls::Error> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((r, v)) = slot.as_ref()
            && Arc::ptr_eq(r, &roots)
        {
            return Ok(Arc::clone(v));
        }
        let v = build(Arc::clone(&roots))?;
        *slot = Some((roots, Arc::clone(&v)));
        Ok(v)
    }
}

/// What a [`ClientVerifier`] asks of the endpoint it guards.
pub(crate) trait ClientCheck: std::fmt::Debug + Send + Sync + 'static {
    /// The roots a client's chain must lead to, asked at every handshake (so a root rotation
    /// applies at once); the same `Arc` until they change.
    fn roots(&self) -> Arc<RootCertStore>;
    /// Accepts or refuses `end_entity`, which already chains to [`ClientCheck::roots`].
    fn accept(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error>;
}

/// A server's check of clients (HBONE's inbound and the flow API alike): a certificate is
/// mandatory, must chain to the check's current roots with client-auth usage, then pass the
/// check's [`ClientCheck::accept`].
pub(crate) struct ClientVerifier<C> {
    check: C,
    /// The webpki verifier for the last roots seen (rebuilt when the check hands out others).
    inner: Cached<dyn ClientCertVerifier>,
    algs: WebPkiSupportedAlgorithms,
}

impl<C> ClientVerifier<C> {
    pub(crate) fn new(check: C) -> Self {
        Self {
            check,
            inner: Cached::new(),
            algs: algorithms(),
        }
    }
}

impl<C: std::fmt::Debug> std::fmt::Debug for ClientVerifier<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl<C: ClientCheck> ClientCertVerifier for ClientVerifier<C> {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.inner.get(self.check.roots(), |roots| {
            WebPkiClientVerifier::builder_with_provider(roots, ring())
                .build()
                .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))
        })?;
        inner.verify_client_cert(end_entity, intermediates, now)?;
        self.check.accept(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!(algs);
}

/// HBONE's check of clients: the provider's current roots, and a SPIFFE id of our trust domain.
struct SameTrustDomain(Arc<dyn CertProvider>);

impl std::fmt::Debug for SameTrustDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SameTrustDomain")
            .field(&self.0.trust_domain())
            .finish()
    }
}

impl ClientCheck for SameTrustDomain {
    fn roots(&self) -> Arc<RootCertStore> {
        self.0.roots()
    }

    fn accept(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = spiffe_id_of(end_entity).map_err(|e| refused(e.to_string()))?;
        if id.trust_domain() != self.0.trust_domain() {
            return Err(refused(format!(
                "client identity {id} is outside trust domain {}",
                self.0.trust_domain()
            )));
        }
        Ok(())
    }
}

/// Presents the certificate of the workload the client's SNI names, asked of the provider at
/// each handshake; the signing key is parsed once per certificate serial.
struct WorkloadCertResolver {
    provider: Arc<dyn CertProvider>,
    keys: Mutex<HashMap<SpiffeId, (String, Arc<CertifiedKey>)>>,
}

impl std::fmt::Debug for WorkloadCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertResolver")
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for WorkloadCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            warn!("HBONE handshake without SNI: no destination identity to present");
            return None;
        };
        let id = match id_from_sni(sni) {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "HBONE handshake refused");
                return None;
            }
        };
        if id.trust_domain() != self.provider.trust_domain() {
            warn!(%id, "HBONE handshake asks for an identity outside our trust domain");
            return None;
        }
        let Some(cert) = self.provider.workload(&id) else {
            warn!(%id, "HBONE handshake asks for a workload with no certificate on this node");
            return None;
        };
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((serial, key)) = keys.get(&id)
            && *serial == cert.serial
        {
            return Some(key.clone());
        }
        let signing = match rustls::crypto::ring::sign::any_supported_type(&cert.key) {
            Ok(k) => k,
            Err(e) => {
                warn!(%id, error = %e, "workload key unusable");
                return None;
            }
        };
        let key = Arc::new(CertifiedKey::new(cert.chain.clone(), signing));
        keys.insert(id, (cert.serial.clone(), key.clone()));
        Some(key)
    }
}

/// The inbound server's configuration: TLS 1.3, ALPN `h2`, mandatory client certificates.
pub fn server_config(provider: Arc<dyn CertProvider>) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = ClientVerifier::new(SameTrustDomain(provider.clone()));
    let resolver = WorkloadCertResolver {
        provider,
        keys: Mutex::new(HashMap::new()),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("HBONE_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(4_000),
            ..ProptestConfig::default()
        })]
        /// The SNI a client sends is network input: decoding never panics, and whatever decodes
        /// encodes back to the same name.
        #[test]
        fn sni_decoding_never_panics(name in prop_oneof![
            "[0-9a-f.]{0,200}\\.hbone\\.kernmesh",
            "[ -~]{0,300}",
        ]) {
            if let Ok(id) = id_from_sni(&name) {
                let ServerName::DnsName(again) = sni_for(&id).unwrap() else { panic!("not DNS") };
                prop_assert_eq!(id_from_sni(again.as_ref()).unwrap(), id);
            }
        }
    }

    #[test]
    fn sni_round_trips_and_is_a_dns_name() {
        for id in [
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://example.org/ns/a-b/sa/x.y.z",
        ] {
            let id: SpiffeId = id.parse().unwrap();
            let ServerName::DnsName(name) = sni_for(&id).unwrap() else {
                panic!("not a DNS name")
            };
            assert!(name.as_ref().split('.').all(|l| l.len() <= 63));
            assert_eq!(id_from_sni(name.as_ref()).unwrap(), id);
        }
        let long = SpiffeId::new("cluster.local", &"n".repeat(60), &"s".repeat(80)).unwrap();
        assert!(matches!(sni_for(&long), Err(TlsError::SniTooLong(_))));
        assert!(id_from_sni("example.com").is_err());
        assert!(id_from_sni("zz.hbone.kernmesh").is_err());
    }
}
