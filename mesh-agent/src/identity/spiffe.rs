//! SPIFFE ids as Istio writes them: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// A workload's identity. Parsing accepts only the Istio form, so an id that parses names exactly
/// one (trust domain, namespace, service account) and formats back to the same string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not an Istio-form SPIFFE id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("does not start with spiffe://")]
    Scheme,
    #[error("path is not /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error(
        "{part} {value:?} has a character outside [a-z0-9.-] (trust domain) or [a-z0-9-] (namespace, service account)"
    )]
    Character { part: &'static str, value: String },
    #[error("{part} is longer than {max} bytes")]
    TooLong { part: &'static str, max: usize },
}

/// SPIFFE caps a whole id at 2,048 bytes; Kubernetes names are DNS labels/subdomains.
const MAX_TRUST_DOMAIN: usize = 255;
const MAX_NAME: usize = 253;

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check("trust domain", trust_domain, MAX_TRUST_DOMAIN, true)?;
        check("namespace", namespace, MAX_NAME, false)?;
        check("service account", service_account, MAX_NAME, true)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// Trust domains are DNS names; namespaces are DNS labels; service accounts are DNS subdomains
/// (dots allowed). Upper case is refused rather than folded, as SPIFFE requires lower case.
fn check(part: &'static str, value: &str, max: usize, dots: bool) -> Result<(), SpiffeIdError> {
    if value.is_empty() {
        return Err(SpiffeIdError::Empty(part));
    }
    if value.len() > max {
        return Err(SpiffeIdError::TooLong { part, max });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'));
    if !ok {
        return Err(SpiffeIdError::Character {
            part,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').ok_or(SpiffeIdError::Path)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Self::new(trust_domain, ns, sa),
            _ => Err(SpiffeIdError::Path),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_the_istio_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart.v2".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart.v2");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart.v2");
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://Cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a.b/sa/b",
            "spiffe://cluster.local/ns/a/sa/b c",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }
}
