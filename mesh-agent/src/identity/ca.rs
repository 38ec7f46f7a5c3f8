//! The CA's signing side: its key material (generated and persisted, given files, or an
//! intermediate under the user's own root) and the workload certificates it issues.
//!
//! The signing key is loaded into this process only and is never sent anywhere: nothing in the
//! CA's API returns or accepts key material.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::SpiffeId;

/// File names in a CA directory or Secret, as Istio's `cacerts` plug-in Secret names them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
/// Certificates above `ca-cert.pem` up to and including the root (intermediate mode only).
pub const CERT_CHAIN: &str = "cert-chain.pem";
/// Istio's default workload certificate lifetime (`DEFAULT_WORKLOAD_CERT_TTL`).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_hours(24);
/// Istio's `MAX_WORKLOAD_CERT_TTL` default (90 days).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_hours(90 * 24);
/// A generated root lives 10 years, as Istio's self-signed root.
pub const ROOT_LIFETIME: Duration = Duration::from_hours(10 * 365 * 24);

/// Why the CA cannot load its keys or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Material { what: String, reason: String },
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> CaError {
    CaError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn material(what: &str, reason: impl std::fmt::Display) -> CaError {
    CaError::Material {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// The PEM texts of a CA: its signing certificate and key, and (for an intermediate) the chain
/// above it ending in the root.
#[derive(Clone)]
pub struct CaMaterial {
    /// Where it came from, for error messages (`/etc/mesh-ca`, `secret kernmesh-system/cacerts`).
    pub origin: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub chain_pem: Option<String>,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("CaMaterial")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// Reads `ca-cert.pem`, `ca-key.pem` and, if present, `cert-chain.pem` from `dir`.
    pub fn read_dir(dir: &Path) -> Result<Self, CaError> {
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| file_err(&p, e))
        };
        let chain_path = dir.join(CERT_CHAIN);
        Ok(Self {
            origin: dir.display().to_string(),
            cert_pem: read(CA_CERT)?,
            key_pem: read(CA_KEY)?,
            chain_pem: chain_path.exists().then(|| read(CERT_CHAIN)).transpose()?,
        })
    }

    /// Reads a given key pair (and chain) from three files.
    pub fn read_files(cert: &Path, key: &Path, chain: Option<&Path>) -> Result<Self, CaError> {
        let read = |p: &Path| fs::read_to_string(p).map_err(|e| file_err(p, e));
        Ok(Self {
            origin: cert.display().to_string(),
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            chain_pem: chain.map(read).transpose()?,
        })
    }

    /// A new self-signed root for `trust_domain` (ECDSA P-256, 10 years, `O=<trust domain>` as
    /// Istio's self-signed CA).
    pub fn generate_root(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "kernmesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_hours(1)).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            origin: "generated".to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: None,
        })
    }

    /// A new intermediate CA signed by this CA's key (5 years, capped by this certificate), for
    /// running the mesh CA under a root of your own: the result's chain is this certificate
    /// and the chain above it, so the root stays where it is (offline if you like).
    pub fn issue_intermediate(&self, trust_domain: &str) -> Result<Self, CaError> {
        let signing = parse_certs(&self.origin, &self.cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| material(&self.origin, "empty"))?;
        let parent_key = KeyPair::from_pem(&self.key_pem).map_err(|e| material(&self.origin, e))?;
        let (_, parent_not_after, _) =
            cert_facts(&signing).map_err(|e| material(&self.origin, e))?;
        let issuer = Issuer::from_ca_cert_der(&signing, parent_key)
            .map_err(|e| material(&self.origin, e))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "kernmesh intermediate CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_hours(1)).into();
        params.not_after = (now + Duration::from_hours(5 * 365 * 24))
            .min(parent_not_after)
            .into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &issuer)?;
        let mut chain = self.cert_pem.trim_end().to_owned();
        chain.push('\n');
        if let Some(above) = &self.chain_pem {
            chain.push_str(above);
        }
        Ok(Self {
            origin: "generated intermediate".to_owned(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            chain_pem: Some(chain),
        })
    }

    /// Writes `ca-cert.pem`, `ca-key.pem` (0600) and `cert-chain.pem` into a new directory.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| file_err(dir, e))?;
        write_new(&dir.join(CA_CERT), &self.cert_pem, 0o644)?;
        write_new(&dir.join(CA_KEY), &self.key_pem, 0o600)?;
        if let Some(chain) = &self.chain_pem {
            write_new(&dir.join(CERT_CHAIN), chain, 0o644)?;
        }
        Ok(())
    }

    /// A CA directory's material: read if `ca-key.pem` exists, otherwise a new root is generated
    /// and written (directory 0700, key 0600 created exclusively, so two CAs starting at once
    /// cannot both write one: the loser fails and its restart reads the winner's).
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<(Self, bool), CaError> {
        if dir.join(CA_KEY).exists() {
            return Ok((Self::read_dir(dir)?, false));
        }
        let generated = Self::generate_root(trust_domain)?;
        generated.write_dir(dir)?;
        Ok((
            Self {
                origin: dir.display().to_string(),
                ..generated
            },
            true,
        ))
    }
}

/// Creates `path` (failing if it exists) with `mode` and writes `text`, then syncs it.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(path, e))
}

/// 16 random bytes, positive and minimal in DER (RFC 5280: at most 20 octets).
#[must_use]
pub fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    super::random_bytes(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// A certificate's validity as `SystemTime`s, and its serial in hex.
pub fn cert_facts(der: &[u8]) -> Result<(SystemTime, SystemTime, String), String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let t = |secs: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok((
        t(cert.validity().not_before.timestamp()),
        t(cert.validity().not_after.timestamp()),
        cert.raw_serial_as_string().replace(':', ""),
    ))
}

/// A DER certificate as PEM (base64 in 64-column lines, RFC 7468).
#[must_use]
pub fn pem_certificate(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// PEM certificates → DER, naming `what` when one does not parse.
pub fn parse_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(what, e))?;
    if certs.is_empty() {
        return Err(material(what, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Lifetimes the CA hands out.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    pub default: Duration,
    pub max: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            default: DEFAULT_WORKLOAD_TTL,
            max: DEFAULT_MAX_TTL,
        }
    }
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The loaded CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates sent after every leaf: empty for a root CA; the signing certificate and
    /// the user's intermediates for an intermediate CA.
    intermediates: Vec<CertificateDer<'static>>,
    /// Roots peers must trust: the signing root first, then `extra_roots` (rotation overlap).
    roots: Vec<CertificateDer<'static>>,
    signing_not_after: SystemTime,
    trust_domain: String,
    lifetimes: Lifetimes,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Checks the material (key matches certificate, certificate is a CA, each link of the chain
    /// is signed by the next, the chain ends in a self-signed root) and builds the signer.
    /// `extra_roots` (PEM) are added to the bundle agents receive: the other root of a rotation.
    pub fn new(
        m: &CaMaterial,
        extra_roots: Option<&str>,
        trust_domain: &str,
        lifetimes: Lifetimes,
    ) -> Result<Self, CaError> {
        let what = |f: &str| format!("{}: {f}", m.origin);
        let signing = parse_certs(&what(CA_CERT), &m.cert_pem)?
            .into_iter()
            .next()
            .ok_or_else(|| material(&what(CA_CERT), "empty"))?;
        let key = KeyPair::from_pem(&m.key_pem).map_err(|e| material(&what(CA_KEY), e))?;
        let (_, cert) =
            X509Certificate::from_der(&signing).map_err(|e| material(&what(CA_CERT), e))?;
        if !cert.is_ca() {
            return Err(material(
                &what(CA_CERT),
                "not a CA certificate (basicConstraints CA:TRUE)",
            ));
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(material(
                &what(CA_KEY),
                "does not match the public key of ca-cert.pem",
            ));
        }
        let above = match &m.chain_pem {
            Some(pem) => parse_certs(&what(CERT_CHAIN), pem)?,
            None => Vec::new(),
        };
        // The chain from the signing certificate up: each is signed by the next, the last by itself.
        let mut links = vec![signing.clone()];
        links.extend(above.iter().cloned());
        for (i, der) in links.iter().enumerate() {
            let (_, c) = X509Certificate::from_der(der)
                .map_err(|e| material(&what(CERT_CHAIN), format!("certificate {i}: {e}")))?;
            let next = match links.get(i + 1) {
                Some(next) => Some(
                    X509Certificate::from_der(next)
                        .map_err(|e| {
                            material(&what(CERT_CHAIN), format!("certificate {}: {e}", i + 1))
                        })?
                        .1,
                ),
                None => None,
            };
            let issuer_spki = next.as_ref().map_or(c.public_key(), |n| n.public_key());
            c.verify_signature(Some(issuer_spki)).map_err(|_| {
                material(
                    &what(if i == 0 { CA_CERT } else { CERT_CHAIN }),
                    if links.len() == i + 1 {
                        format!(
                            "certificate {i} is not a self-signed root (give the chain up to the root in {CERT_CHAIN})"
                        )
                    } else {
                        format!("certificate {i} is not signed by certificate {}", i + 1)
                    },
                )
            })?;
        }
        let root = links.pop().expect("links holds the signing certificate");
        let mut roots = vec![root];
        if let Some(pem) = extra_roots {
            for r in parse_certs("extra roots", pem)? {
                if !roots.contains(&r) {
                    roots.push(r);
                }
            }
        }
        let (_, signing_not_after, _) =
            cert_facts(&signing).map_err(|e| material(&what(CA_CERT), e))?;
        let issuer =
            Issuer::from_ca_cert_der(&signing, key).map_err(|e| material(&what(CA_CERT), e))?;
        Ok(Self {
            issuer,
            intermediates: links,
            roots,
            signing_not_after,
            trust_domain: trust_domain.to_owned(),
            lifetimes,
        })
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: more than one root during a rotation's overlap.
    #[must_use]
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Signs a checked CSR ([`super::csr::check`]) for `id`. The certificate carries only what the
    /// CA decides: no subject, the URI SAN, digital signature + key encipherment, server and
    /// client auth (as Istio's workload certificates), a random serial, and a lifetime of
    /// `requested` (or the default) capped by the maximum and by the signing certificate's own
    /// expiry (Istio does the same: a leaf never outlives its issuer).
    pub fn sign(
        &self,
        csr: &CertificateSigningRequestParams,
        id: &SpiffeId,
        requested: Option<Duration>,
    ) -> Result<Issued, CaError> {
        let ttl = requested
            .unwrap_or(self.lifetimes.default)
            .min(self.lifetimes.max);
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        // Backdated a little for clock skew between nodes (at most a tenth of the lifetime, so a
        // 6 s test certificate is not mostly in the past).
        params.not_before = (now - (ttl / 10).min(Duration::from_mins(1))).into();
        params.not_after = (now + ttl).min(self.signing_not_after).into();
        let req = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        };
        let cert = req.signed_by(&self.issuer)?;
        let der = cert.der().clone();
        let (not_before, not_after, serial) =
            cert_facts(&der).map_err(|e| material("issued certificate", e))?;
        let mut chain = vec![der];
        chain.extend(self.intermediates.iter().cloned());
        Ok(Issued {
            chain,
            serial,
            not_before,
            not_after,
        })
    }

    /// The CA's own serving certificate for `names` (DNS names or IP addresses), with a fresh key.
    pub fn serving_cert(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kernmesh CA");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_mins(1)).into();
        params.not_after = (now + lifetime).min(self.signing_not_after).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        Ok((chain, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(m: &CaMaterial) -> Result<CertificateAuthority, CaError> {
        CertificateAuthority::new(m, None, "cluster.local", Lifetimes::default())
    }

    #[test]
    fn refuses_a_key_that_is_not_the_certificates_and_a_chain_that_does_not_link() {
        let a = CaMaterial::generate_root("cluster.local").unwrap();
        let b = CaMaterial::generate_root("cluster.local").unwrap();
        let mixed = CaMaterial {
            key_pem: b.key_pem.clone(),
            ..a.clone()
        };
        let e = ca(&mixed).unwrap_err().to_string();
        assert!(
            e.contains("ca-key.pem") && e.contains("does not match"),
            "{e}"
        );
        // An intermediate of `a` presented with `b` as its chain.
        let mut inter = a.issue_intermediate("cluster.local").unwrap();
        assert_eq!(ca(&inter).unwrap().roots().len(), 1);
        inter.chain_pem = Some(b.cert_pem.clone());
        let e = ca(&inter).unwrap_err().to_string();
        assert!(e.contains("not signed by certificate 1"), "{e}");
        // An intermediate without its chain is not a root.
        inter.chain_pem = None;
        let e = ca(&inter).unwrap_err().to_string();
        assert!(e.contains("not a self-signed root"), "{e}");
    }

    #[test]
    fn pem_round_trips() {
        let m = CaMaterial::generate_root("cluster.local").unwrap();
        let der = parse_certs("root", &m.cert_pem).unwrap();
        assert_eq!(
            parse_certs("again", &pem_certificate(&der[0])).unwrap(),
            der
        );
        for len in 0..7 {
            let bytes: Vec<u8> = (0..len).collect();
            let pem = pem_certificate(&bytes);
            let back: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            if len > 0 {
                assert_eq!(back[0].as_ref(), bytes.as_slice());
            }
        }
    }

    #[test]
    fn workload_certificates_never_outlive_the_max_or_the_issuer() {
        let m = CaMaterial::generate_root("cluster.local").unwrap();
        let authority = CertificateAuthority::new(
            &m,
            None,
            "cluster.local",
            Lifetimes {
                default: Duration::from_hours(24),
                max: Duration::from_hours(48),
            },
        )
        .unwrap();
        let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        let key = KeyPair::generate().unwrap();
        let der = super::super::csr::request(&id, &key).unwrap();
        let csr = super::super::csr::check(&der, &id).unwrap();
        let issued = authority
            .sign(&csr, &id, Some(Duration::from_hours(1000)))
            .unwrap();
        let life = issued.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(life <= Duration::from_hours(48), "{life:?}");
        let a = authority.sign(&csr, &id, None).unwrap();
        let b = authority.sign(&csr, &id, None).unwrap();
        assert_ne!(a.serial, b.serial, "serials are random");
    }
}
