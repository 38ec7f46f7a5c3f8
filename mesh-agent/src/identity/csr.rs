//! Checking a workload's certificate signing request before the CA signs it.
//!
//! Bytes from the network: every path returns an error, never panics (fuzzed by
//! `csr_check_never_panics` with arbitrary and mutated DER).

/// The key type agents generate workload keys with (ECDSA P-256 by default).
pub use rcgen::KeyPair;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType, SignatureAlgorithm,
};
use rustls_pki_types::CertificateSigningRequestDer;

use super::SpiffeId;

/// Largest CSR accepted (an ECDSA CSR with one URI SAN is ~300 bytes; RSA-4096 ~1.7 KiB).
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// Why a CSR is refused; the CA answers `INVALID_ARGUMENT` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr: {0} bytes, more than the {MAX_CSR_BYTES} allowed")]
    TooLarge(usize),
    #[error("csr: not a PKCS#10 request, or its signature does not verify: {0}")]
    Malformed(String),
    #[error("csr: key type {0} is not allowed (ECDSA P-256/P-384 or Ed25519)")]
    KeyType(String),
    #[error("csr: subjectAltName must be exactly one URI (the SPIFFE id), found {0}")]
    Sans(String),
    #[error("csr: URI SAN {found:?} is not the requested identity {expected}")]
    WrongIdentity { found: String, expected: String },
    #[error("csr: requests a CA certificate")]
    RequestsCa,
}

/// Signature algorithms (and so key types) a workload key may use. ztunnel and Istio's agent
/// generate ECDSA P-256 by default; RSA is refused rather than judged for strength.
fn allowed(alg: &SignatureAlgorithm) -> bool {
    [
        &PKCS_ECDSA_P256_SHA256,
        &PKCS_ECDSA_P384_SHA384,
        &PKCS_ED25519,
    ]
    .contains(&alg)
}

/// Parses `der`, verifies its self-signature (proof the requester holds the key), and checks that
/// it names exactly `expected` and nothing else. Returns the request, ready for
/// [`super::ca::CertificateAuthority::sign`] (which ignores everything but the public key and
/// writes its own subject, SAN, usages and lifetime).
pub fn check(der: &[u8], expected: &SpiffeId) -> Result<CertificateSigningRequestParams, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !allowed(csr.public_key.algorithm()) {
        return Err(CsrError::KeyType(format!(
            "{:?}",
            csr.public_key.algorithm()
        )));
    }
    let sans = &csr.params.subject_alt_names;
    let [SanType::URI(uri)] = sans.as_slice() else {
        let found: Vec<String> = sans.iter().map(|s| format!("{s:?}")).collect();
        return Err(CsrError::Sans(if found.is_empty() {
            "none".to_owned()
        } else {
            found.join(", ")
        }));
    };
    let uri = uri.as_str();
    if uri != expected.to_string() {
        return Err(CsrError::WrongIdentity {
            found: uri.to_owned(),
            expected: expected.to_string(),
        });
    }
    if !matches!(csr.params.is_ca, rcgen::IsCa::NoCa) {
        return Err(CsrError::RequestsCa);
    }
    Ok(csr)
}

/// A CSR for `id` signed by `key` (the agent side): the URI SAN only, no subject, as ztunnel's.
pub fn request(id: &SpiffeId, key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "shop", sa).unwrap()
    }

    fn good_csr() -> Vec<u8> {
        request(&id("web"), &KeyPair::generate().unwrap()).unwrap()
    }

    #[test]
    fn accepts_the_agents_own_request() {
        let csr = check(&good_csr(), &id("web")).unwrap();
        assert_eq!(csr.params.subject_alt_names.len(), 1);
    }

    #[test]
    fn refuses_another_identity_extra_sans_no_sans_and_bad_signatures() {
        let key = KeyPair::generate().unwrap();
        assert!(matches!(
            check(&request(&id("db"), &key).unwrap(), &id("web")),
            Err(CsrError::WrongIdentity { .. })
        ));
        let mut two = CertificateParams::default();
        two.subject_alt_names = vec![
            SanType::URI(id("web").to_string().try_into().unwrap()),
            SanType::DnsName("web.shop".try_into().unwrap()),
        ];
        let der = two.serialize_request(&key).unwrap().der().to_vec();
        assert!(matches!(check(&der, &id("web")), Err(CsrError::Sans(_))));
        let none = CertificateParams::default();
        let der = none.serialize_request(&key).unwrap().der().to_vec();
        assert!(matches!(check(&der, &id("web")), Err(CsrError::Sans(s)) if s == "none"));
        // A flipped bit in the signature (the last bytes) breaks proof of possession.
        let mut der = good_csr();
        let last = der.len() - 3;
        der[last] ^= 0x40;
        assert!(matches!(
            check(&der, &id("web")),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            check(&vec![0x30; MAX_CSR_BYTES + 1], &id("web")),
            Err(CsrError::TooLarge(_))
        ));
    }

    #[test]
    fn refuses_a_ca_request() {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id("web").to_string().try_into().unwrap())];
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = p.serialize_request(&key).unwrap().der().to_vec();
        assert_eq!(check(&der, &id("web")).unwrap_err(), CsrError::RequestsCa);
    }

    /// The fuzz target (`PROPTEST_CASES` sets the count; BENCHMARKS.md records the long run):
    /// arbitrary bytes, and a valid CSR with bytes overwritten, inserted, removed or truncated.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        Truncate(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<usize>().prop_map(Mutation::Remove),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    fn base() -> &'static [u8] {
        static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        BASE.get_or_init(good_csr)
    }

    proptest! {
        #[test]
        fn csr_check_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = check(&bytes, &id("web"));
        }

        #[test]
        fn csr_check_never_panics_on_mutated_csrs(muts in proptest::collection::vec(mutation(), 1..8)) {
            let mut der = base().to_vec();
            for m in muts {
                let n = der.len().max(1);
                match m {
                    Mutation::Set(i, b) => { if !der.is_empty() { der[i % n] = b; } }
                    Mutation::Insert(i, b) => der.insert(i % (der.len() + 1), b),
                    Mutation::Remove(i) => { if !der.is_empty() { der.remove(i % n); } }
                    Mutation::Truncate(i) => der.truncate(i % n),
                }
            }
            let _ = check(&der, &id("web"));
        }
    }
}
