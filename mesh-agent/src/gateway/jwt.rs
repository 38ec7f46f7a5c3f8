//! JWT authentication of a route: RS256, ES256 and `EdDSA` tokens checked against a JWKS file
//! or a JWKS URL (issuer, audience, expiry), then claim rules. 401 without a valid token, 403
//! when the claims do not allow the request; the backend is never called for either (Envoy's
//! `jwt_authn` + RBAC, Envoy Gateway's `SecurityPolicy` with `localJWKS` or `remoteJWKS`).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use tokio::sync::Notify;

use super::config::{ClaimSpec, JwtSpec};

/// Why a JWKS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a JWKS: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: key {index}: {reason}")]
    Key {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{path} has no usable key (RS256, ES256 or EdDSA)")]
    Empty { path: PathBuf },
    #[error("set one of jwksFile and jwksUri")]
    NoSource,
    #[error("jwksUri {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("jwksRefresh: {0}")]
    Refresh(String),
    #[error("jwksCaFile {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// 401: no token, or a token that does not verify (signature, issuer, audience, expiry).
    Unauthenticated(String),
    /// 403: a valid token whose claims the rule does not allow.
    Forbidden(String),
}

#[derive(Debug)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    decoding: DecodingKey,
}

/// Where a rule's keys are.
#[derive(Debug)]
enum Keys {
    /// Read from a file when the configuration was compiled.
    Fixed(Arc<Vec<Key>>),
    /// Fetched and refreshed in the background.
    Remote(Arc<RemoteJwks>),
}

/// A route's JWT requirement, keys loaded.
#[derive(Debug)]
pub struct JwtRule {
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    claims: Vec<ClaimSpec>,
}

/// Parses a JWKS document; `from` names it in errors.
fn parse_jwks(from: &std::path::Path, text: &str) -> Result<Vec<Key>, JwksError> {
    let path = from.to_owned();
    let set: JwkSet = serde_json::from_str(text).map_err(|source| JwksError::Parse {
        path: path.clone(),
        source,
    })?;
    let mut keys = Vec::new();
    for (index, jwk) in set.keys.iter().enumerate() {
        let err = |reason: String| JwksError::Key {
            path: path.clone(),
            index,
            reason,
        };
        let alg = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
            _ => return Err(err("symmetric and unknown key types are refused".into())),
        };
        if let Some(a) = jwk.common.key_algorithm {
            // KeyAlgorithm and Algorithm share variant names (RS256, ES256, EdDSA).
            if format!("{a:?}") != format!("{alg:?}") {
                return Err(err(format!("alg {a:?} does not fit the key type")));
            }
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| err(e.to_string()))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            decoding: key,
        });
    }
    if keys.is_empty() {
        return Err(JwksError::Empty { path });
    }
    Ok(keys)
}

/// The algorithms accepted: never `none` nor HMAC (a public JWKS must not be usable as a shared
/// secret).
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

impl JwtRule {
    /// Loads the JWKS of `spec`: reads its file, or joins (or starts) the fetcher of its URL.
    pub fn load(spec: &JwtSpec) -> Result<Self, JwksError> {
        let keys = match (&spec.jwks_file, &spec.jwks_uri) {
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
                    path: path.clone(),
                    source,
                })?;
                Keys::Fixed(Arc::new(parse_jwks(path, &text)?))
            }
            (None, Some(uri)) => Keys::Remote(RemoteJwks::get(
                uri,
                spec.jwks_ca_file.as_deref(),
                match &spec.jwks_refresh {
                    Some(r) => super::config::parse_duration(r).map_err(JwksError::Refresh)?,
                    None => DEFAULT_JWKS_REFRESH,
                },
            )?),
            _ => return Err(JwksError::NoSource),
        };
        Ok(Self {
            issuer: spec.issuer.clone(),
            audiences: spec.audiences.clone(),
            keys,
            claims: spec.claims.clone(),
        })
    }

    /// Checks the `Authorization: Bearer` header value.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), Denied> {
        let token = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| Denied::Unauthenticated("Jwt is missing".into()))?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            Denied::Unauthenticated(format!(
                "Jwt is not in the form of Header.Payload.Signature: {e}"
            ))
        })?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(Denied::Unauthenticated(format!(
                "Jwt algorithm {:?} is not allowed",
                header.alg
            )));
        }
        let mut last = String::from("Jwks doesn't have key to match kid or alg from Jwt");
        let keys = match &self.keys {
            Keys::Fixed(k) => Arc::clone(k),
            Keys::Remote(r) => r.keys.load_full(),
        };
        let candidates: Vec<&Key> = keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || k.kid == header.kid))
            .collect();
        if candidates.is_empty()
            && !keys.is_empty()
            && let Keys::Remote(r) = &self.keys
        {
            // A key the issuer rotated in since the last fetch: fetch again (rate-limited).
            // Before the first fetch succeeds, the fetcher is retrying already.
            r.refresh_soon();
        }
        for k in candidates {
            let mut v = Validation::new(k.alg);
            v.set_issuer(&[&self.issuer]);
            v.set_required_spec_claims(&["exp", "iss"]);
            if self.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&self.audiences);
            }
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.decoding, &v) {
                Ok(data) => return self.allow(&data.claims),
                Err(e) => last = format!("Jwt verification fails: {e}"),
            }
        }
        Err(Denied::Unauthenticated(last))
    }

    fn allow(&self, claims: &serde_json::Value) -> Result<(), Denied> {
        for rule in &self.claims {
            let ok = match claims.get(&rule.name) {
                Some(serde_json::Value::String(s)) => rule.values.contains(s),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(serde_json::Value::as_str)
                    .any(|s| rule.values.iter().any(|v| v == s)),
                Some(other) => rule.values.contains(&other.to_string()),
                None => false,
            };
            if !ok {
                return Err(Denied::Forbidden(format!(
                    "claim {} is not one of {:?}",
                    rule.name, rule.values
                )));
            }
        }
        Ok(())
    }
}

/// Envoy Gateway's `remoteJWKS.cacheDuration` default.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_mins(5);
/// Least time between fetches asked for by unknown `kid`s (a flood of made-up `kid`s must not
/// turn into a flood of fetches).
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Retry interval while no fetch has succeeded yet.
const FIRST_FETCH_RETRY: Duration = Duration::from_secs(2);
/// Bound of one fetch (connect, TLS, answer).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One JWKS URL's keys, shared by every rule (and configuration version) naming the same URL,
/// CA and refresh interval, so a reload keeps the cache. Its fetch task stops once no rule
/// holds it.
pub struct RemoteJwks {
    uri: String,
    keys: ArcSwap<Vec<Key>>,
    wake: Arc<Notify>,
    last_wake: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("uri", &self.uri)
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

type RemoteKey = (String, Option<PathBuf>, Duration);

/// Live fetchers by URL, CA file and interval.
static REMOTES: Mutex<BTreeMap<RemoteKey, Weak<RemoteJwks>>> = Mutex::new(BTreeMap::new());

impl RemoteJwks {
    /// The fetcher of `uri`, started if none runs (needs a Tokio runtime).
    fn get(
        uri: &str,
        ca: Option<&std::path::Path>,
        every: Duration,
    ) -> Result<Arc<Self>, JwksError> {
        let bad = |reason: String| JwksError::Uri {
            uri: uri.to_owned(),
            reason,
        };
        let parsed: http::Uri = uri.parse().map_err(|e| bad(format!("not a URL: {e}")))?;
        if parsed.scheme_str() != Some("https") || parsed.host().is_none() {
            return Err(bad("an https:// URL with a host is required".into()));
        }
        if every < Duration::from_secs(1) {
            return Err(JwksError::Refresh("at least 1s".into()));
        }
        let tls = client_tls(ca)?;
        let key = (uri.to_owned(), ca.map(std::path::Path::to_owned), every);
        let mut remotes = REMOTES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        remotes.retain(|_, w| w.strong_count() > 0);
        if let Some(r) = remotes.get(&key).and_then(Weak::upgrade) {
            return Ok(r);
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| bad("fetching needs the gateway's runtime".into()))?;
        let remote = Arc::new(Self {
            uri: uri.to_owned(),
            keys: ArcSwap::from_pointee(Vec::new()),
            wake: Arc::new(Notify::new()),
            last_wake: Mutex::new(None),
        });
        runtime.spawn(refresh_loop(
            Arc::downgrade(&remote),
            Arc::clone(&remote.wake),
            parsed,
            tls,
            every,
        ));
        remotes.insert(key, Arc::downgrade(&remote));
        Ok(remote)
    }

    /// Asks for a fetch now, unless one was asked for within [`MIN_REFETCH`].
    fn refresh_soon(&self) {
        let mut last = self
            .last_wake
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < MIN_REFETCH) {
            return;
        }
        *last = Some(Instant::now());
        self.wake.notify_one();
    }
}

/// rustls client settings for JWKS servers: the CA file's certificates, or the system's roots.
fn client_tls(ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, JwksError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca {
        let bad = |reason: String| JwksError::Ca {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate".into()));
        }
    } else {
        // Unreadable system certificates are skipped, as curl and Envoy do.
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| JwksError::Uri {
        uri: String::new(),
        reason: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Fetches and parses the JWKS at `uri`.
async fn fetch(uri: &http::Uri, tls: &Arc<rustls::ClientConfig>) -> Result<Vec<Key>, String> {
    use http_body_util::BodyExt as _;
    let host = uri
        .host()
        .ok_or("no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("server name {host:?}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("answered {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|e| format!("not UTF-8: {e}"))?;
    parse_jwks(std::path::Path::new(&uri.to_string()), text).map_err(|e| e.to_string())
}

/// Fetches at start, every `every`, and when woken; keeps the last good keys on failure.
async fn refresh_loop(
    remote: Weak<RemoteJwks>,
    wake: Arc<Notify>,
    uri: http::Uri,
    tls: Arc<rustls::ClientConfig>,
    every: Duration,
) {
    loop {
        let result = tokio::time::timeout(FETCH_TIMEOUT, fetch(&uri, &tls)).await;
        let Some(me) = remote.upgrade() else { return };
        let have = match result {
            Ok(Ok(keys)) => {
                tracing::debug!(%uri, keys = keys.len(), "JWKS fetched");
                me.keys.store(Arc::new(keys));
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(%uri, error = %e, "JWKS fetch failed; the last good keys stay");
                !me.keys.load().is_empty()
            }
            Err(_) => {
                tracing::warn!(%uri, timeout = ?FETCH_TIMEOUT, "JWKS fetch timed out; the last good keys stay");
                !me.keys.load().is_empty()
            }
        };
        drop(me);
        let wait = if have {
            every
        } else {
            FIRST_FETCH_RETRY.min(every)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// An Ed25519 key pair: (encoding key, its JWKS entry).
    fn ed25519(kid: &str) -> (EncodingKey, serde_json::Value) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        (
            EncodingKey::from_ed_der(&kp.serialize_der()),
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA" }),
        )
    }

    fn token(key: &EncodingKey, kid: &str, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    #[test]
    fn valid_expired_wrong_signature_wrong_issuer_missing_and_claims() {
        let (key, jwk) = ed25519("k1");
        let (other, _) = ed25519("k1");
        let dir = std::env::temp_dir().join(format!("jwks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
        let rule = JwtRule::load(&JwtSpec {
            issuer: "https://issuer.test".into(),
            audiences: vec!["api".into()],
            jwks_file: Some(jwks),
            jwks_uri: None,
            jwks_ca_file: None,
            jwks_refresh: None,
            claims: vec![ClaimSpec {
                name: "role".into(),
                values: vec!["admin".into()],
            }],
        })
        .unwrap();
        let claims = |iss: &str, exp: u64, role: &str| serde_json::json!({ "iss": iss, "aud": "api", "exp": exp, "role": role });
        let bearer = |t: String| format!("Bearer {t}");
        let good = token(
            &key,
            "k1",
            &claims("https://issuer.test", now() + 600, "admin"),
        );
        assert_eq!(rule.check(Some(&bearer(good))), Ok(()));
        let expired = token(
            &key,
            "k1",
            &claims("https://issuer.test", now() - 3600, "admin"),
        );
        assert!(matches!(
            rule.check(Some(&bearer(expired))),
            Err(Denied::Unauthenticated(_))
        ));
        let forged = token(
            &other,
            "k1",
            &claims("https://issuer.test", now() + 600, "admin"),
        );
        assert!(matches!(
            rule.check(Some(&bearer(forged))),
            Err(Denied::Unauthenticated(_))
        ));
        let issuer = token(
            &key,
            "k1",
            &claims("https://evil.test", now() + 600, "admin"),
        );
        assert!(matches!(
            rule.check(Some(&bearer(issuer))),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(rule.check(None), Err(Denied::Unauthenticated(_))));
        assert!(matches!(
            rule.check(Some("Bearer nonsense")),
            Err(Denied::Unauthenticated(_))
        ));
        let viewer = token(
            &key,
            "k1",
            &claims("https://issuer.test", now() + 600, "viewer"),
        );
        assert!(matches!(
            rule.check(Some(&bearer(viewer))),
            Err(Denied::Forbidden(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A JWKS server over HTTPS (rcgen certificate for `localhost`): serves `doc`, or 500
    /// while it is empty; counts fetches.
    async fn jwks_server(
        doc: Arc<Mutex<String>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    ) -> (u16, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let dir = std::env::temp_dir().join(format!("jwks-remote-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, doc, fetches) = (acceptor.clone(), doc.clone(), fetches.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |_req| {
                        let (doc, fetches) = (doc.clone(), fetches.clone());
                        async move {
                            fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let body = doc.lock().unwrap().clone();
                            let status = if body.is_empty() { 500 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (port, ca)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_from_a_url_is_cached_refreshed_on_unknown_kid_and_kept_on_failure() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let (k1, jwk1) = ed25519("k1");
        let (k2, jwk2) = ed25519("k2");
        let doc = Arc::new(Mutex::new(
            serde_json::json!({ "keys": [jwk1] }).to_string(),
        ));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (port, ca) = jwks_server(doc.clone(), fetches.clone()).await;
        let spec = JwtSpec {
            issuer: "https://issuer.test".into(),
            audiences: vec![],
            jwks_file: None,
            jwks_uri: Some(format!("https://localhost:{port}/jwks")),
            jwks_ca_file: Some(ca.clone()),
            jwks_refresh: Some("2s".into()),
            claims: vec![],
        };
        let rule = JwtRule::load(&spec).unwrap();
        let claims = serde_json::json!({ "iss": "https://issuer.test", "exp": now() + 600 });
        let bearer = |k: &EncodingKey, kid: &str| format!("Bearer {}", token(k, kid, &claims));
        let until = |what: &str, ok: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !ok() {
                assert!(start.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        until("the first fetch", &|| {
            rule.check(Some(&bearer(&k1, "k1"))).is_ok()
        });
        // A second rule (a reload) for the same URL shares the cache: no fetch of its own.
        let again = JwtRule::load(&spec).unwrap();
        assert_eq!(again.check(Some(&bearer(&k1, "k1"))), Ok(()));
        assert_eq!(fetches.load(SeqCst), 1);
        // The issuer rotates to k2: the first k2 token is refused and asks for a fetch (not
        // waiting for the 2 s refresh); k2 then verifies.
        *doc.lock().unwrap() = serde_json::json!({ "keys": [jwk2] }).to_string();
        let started = Instant::now();
        assert!(rule.check(Some(&bearer(&k2, "k2"))).is_err());
        until("k2 after the unknown-kid fetch", &|| {
            rule.check(Some(&bearer(&k2, "k2"))).is_ok()
        });
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        // More unknown kids within MIN_REFETCH ask for no more fetches.
        let before = fetches.load(SeqCst);
        for i in 0..50 {
            assert!(rule.check(Some(&bearer(&k2, &format!("x{i}")))).is_err());
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            fetches.load(SeqCst),
            before,
            "unknown kids are rate-limited"
        );
        // The server fails: refreshes keep failing, the last good keys (k2) stay.
        doc.lock().unwrap().clear();
        let failing = fetches.load(SeqCst);
        until("a failed refresh", &|| fetches.load(SeqCst) > failing);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rule.check(Some(&bearer(&k2, "k2"))), Ok(()));
        // A bad URL or source is a configuration error naming the field.
        let mut bad = spec;
        bad.jwks_uri = Some("http://localhost/jwks".into());
        assert!(matches!(JwtRule::load(&bad), Err(JwksError::Uri { .. })));
        bad.jwks_file = Some(ca);
        assert!(matches!(JwtRule::load(&bad), Err(JwksError::NoSource)));
    }
}
