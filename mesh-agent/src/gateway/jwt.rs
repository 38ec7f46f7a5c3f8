//! JWT authentication of a route: RS256, ES256 and `EdDSA` tokens checked against a JWKS file
//! (issuer, audience, expiry), then claim rules. 401 without a valid token, 403 when the claims
//! do not allow the request; the backend is never called for either (Envoy's `jwt_authn` +
//! RBAC, Envoy Gateway's `SecurityPolicy`).

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};

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

/// A route's JWT requirement, keys loaded.
#[derive(Debug)]
pub struct JwtRule {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    claims: Vec<ClaimSpec>,
}

/// The algorithms accepted: never `none` nor HMAC (a public JWKS must not be usable as a shared
/// secret).
const ALGORITHMS: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

impl JwtRule {
    /// Loads the JWKS of `spec`.
    pub fn load(spec: &JwtSpec) -> Result<Self, JwksError> {
        let path = &spec.jwks_file;
        let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
            path: path.clone(),
            source,
        })?;
        let set: JwkSet = serde_json::from_str(&text).map_err(|source| JwksError::Parse {
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
            return Err(JwksError::Empty { path: path.clone() });
        }
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
        for k in self
            .keys
            .iter()
            .filter(|k| k.alg == header.alg && (header.kid.is_none() || k.kid == header.kid))
        {
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
            jwks_file: jwks,
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
}
