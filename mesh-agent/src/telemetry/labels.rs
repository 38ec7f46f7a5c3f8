//! Istio's standard metric labels (`reporter`, `source_workload`, …, `connection_security_policy`)
//! built from the names the agent knows, with Istio's `unknown` wherever it has no value.

use std::fmt::{self, Write as _};

use crate::model::ObjectName;

/// Istio's value for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";
/// Istio's default cluster id (`values.global.multiCluster.clusterName` unset): `Kubernetes`.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";
/// The Kubernetes cluster domain of service FQDNs (`destination_service`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio's `canonical_revision` without a `service.istio.io/canonical-revision` or `version` label.
pub const DEFAULT_REVISION: &str = "latest";
/// Envoy's "no response flags" value.
pub const NO_FLAGS: &str = "-";

/// Every label of Istio's standard TCP and request metrics, in ztunnel's order.
pub const COMMON_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// Who reports: the client's node (`source`) or the server's (`destination`), as Istio's label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// `connection_security_policy`: `mutual_tls` through a tunnel, `none` in plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Security {
    MutualTls,
    None,
}

impl Security {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
        }
    }
}

/// The workload a pod belongs to, as Istio names it. Istio takes the owner (a `Deployment`
/// through its `ReplicaSet`); the model has no owner references, so a pod named like a
/// Deployment's (`<name>-<pod-template-hash>-<5 characters>`, both from Kubernetes' "safe"
/// alphabet) is named `<name>`, and any other pod by its own name (what Istio does for a bare
/// pod). `StatefulSet` and `DaemonSet` pods keep their pod names (their suffixes are not
/// distinguishable from a pod's own name).
#[must_use]
pub fn workload_name(pod: &str) -> &str {
    // Kubernetes' `rand.SafeEncodeString` alphabet: no vowels, no 0/1/3, no look-alikes.
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let safe = |s: &str| s.bytes().all(|b| SAFE.contains(&b));
    let Some((rest, pod_suffix)) = pod.rsplit_once('-') else {
        return pod;
    };
    let Some((name, hash)) = rest.rsplit_once('-') else {
        return pod;
    };
    if !name.is_empty()
        && pod_suffix.len() == 5
        && safe(pod_suffix)
        && (6..=10).contains(&hash.len())
        && safe(hash)
    {
        name
    } else {
        pod
    }
}

/// A service's FQDN, as `destination_service` holds it.
#[must_use]
pub fn service_fqdn(service: &ObjectName) -> String {
    let mut s = String::with_capacity(service.name.len() + service.namespace.len() + 20);
    let _ = write!(s, "{}", fqdn_display(service));
    s
}

/// [`service_fqdn`] as the pieces it is made of, `name.namespace.svc.cluster.local`: for
/// writers that put it in place (access lines, OTLP records, label text) without a `String`.
#[must_use]
pub fn fqdn_parts(service: &ObjectName) -> [&str; 5] {
    [
        service.name.as_str(),
        ".",
        service.namespace.as_str(),
        ".svc.",
        CLUSTER_DOMAIN,
    ]
}

/// [`service_fqdn`] written where it is displayed, without a `String`.
#[must_use]
pub fn fqdn_display(service: &ObjectName) -> impl std::fmt::Display + '_ {
    struct Fqdn<'a>(&'a ObjectName);
    impl std::fmt::Display for Fqdn<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            fqdn_parts(self.0).iter().try_for_each(|p| f.write_str(p))
        }
    }
    Fqdn(service)
}

/// The values of [`COMMON_LABELS`] for one source, destination and service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Common {
    pub values: Vec<String>,
}

/// One side of a connection or request, as the labels need it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub pod: Option<&'a ObjectName>,
    /// The SPIFFE id the peer proved (mTLS only; plaintext has none: Istio's `unknown`).
    pub principal: Option<&'a str>,
}

/// One label value, borrowed from the names it is made of: text, or a service's FQDN (made
/// when it is written).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value<'a> {
    Str(&'a str),
    Fqdn(&'a ObjectName),
}

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::Fqdn(s) => fqdn_display(s).fmt(f),
        }
    }
}

/// The values of [`COMMON_LABELS`], in their order, borrowed: what [`Common`] holds as
/// `String`s, and what a scrape groups series by and writes without making them.
#[must_use]
pub fn values<'a>(
    reporter: Reporter,
    source: Peer<'a>,
    service: Option<&'a ObjectName>,
    destination: Peer<'a>,
    protocol: &'a str,
    security: Security,
) -> [Value<'a>; 23] {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = peer_values(source);
    let [d0, d1, d2, d3, d4, d5, d6, d7] = peer_values(destination);
    let (fqdn, namespace, name) = match service {
        Some(s) => (
            Value::Fqdn(s),
            Value::Str(s.namespace.as_str()),
            Value::Str(s.name.as_str()),
        ),
        None => (
            Value::Str(UNKNOWN),
            Value::Str(UNKNOWN),
            Value::Str(UNKNOWN),
        ),
    };
    [
        Value::Str(reporter.as_str()),
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
        fqdn,
        namespace,
        name,
        d0,
        d1,
        d2,
        d3,
        d4,
        d5,
        d6,
        d7,
        Value::Str(protocol),
        Value::Str(NO_FLAGS),
        Value::Str(security.as_str()),
    ]
}

/// Writes `name="value",…` of [`COMMON_LABELS`] (Prometheus text: `\`, `"` and newline
/// escaped), as prometheus-client writes a label set, without a `String` per value.
pub fn write_pairs(out: &mut String, values: &[Value<'_>; 23]) {
    for (i, (name, value)) in COMMON_LABELS.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        match value {
            Value::Str(s) => escape_label_value(out, s),
            Value::Fqdn(s) => {
                for part in fqdn_parts(s) {
                    escape_label_value(out, part);
                }
            }
        }
        out.push('"');
    }
}

/// A label value in the text formats: backslash, double quote and newline escaped.
fn escape_label_value(out: &mut String, s: &str) {
    if !s.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

impl Common {
    /// The values for `source` → `service` (served by `destination`).
    #[must_use]
    pub fn new(
        reporter: Reporter,
        source: Peer<'_>,
        service: Option<&ObjectName>,
        destination: Peer<'_>,
        protocol: &str,
        security: Security,
    ) -> Self {
        Self {
            values: values(reporter, source, service, destination, protocol, security)
                .iter()
                .map(|v| match v {
                    Value::Str(s) => (*s).to_owned(),
                    Value::Fqdn(s) => service_fqdn(s),
                })
                .collect(),
        }
    }

    /// (name, value) pairs, for the encoder.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        COMMON_LABELS
            .iter()
            .copied()
            .zip(self.values.iter().map(String::as_str))
    }
}

/// `*_workload`, canonical service and revision, namespace, principal, app, version, cluster:
/// the order [`COMMON_LABELS`] has them for either side.
fn peer_values(peer: Peer<'_>) -> [Value<'_>; 8] {
    let workload = peer.pod.map_or(UNKNOWN, |p| workload_name(&p.name));
    let namespace = peer.pod.map_or(UNKNOWN, |p| p.namespace.as_str());
    let principal = peer.principal.unwrap_or(UNKNOWN);
    // Without `app`/`version` labels Istio sets canonical service = workload name and
    // canonical revision = `latest`; `*_app`/`*_version` stay unknown.
    let revision = if peer.pod.is_some() {
        DEFAULT_REVISION
    } else {
        UNKNOWN
    };
    [
        workload,
        workload,
        revision,
        namespace,
        principal,
        UNKNOWN,
        UNKNOWN,
        DEFAULT_CLUSTER,
    ]
    .map(Value::Str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_pods_are_named_by_their_deployment_and_others_by_themselves() {
        assert_eq!(workload_name("reviews-v1-7d9c8f6b5c-x2k4q"), "reviews-v1");
        assert_eq!(workload_name("web-5f6b7c9d8-zt2p4"), "web");
        // Not Kubernetes' alphabet (vowels), wrong lengths, no dashes: the pod's own name.
        assert_eq!(workload_name("my-service-abc"), "my-service-abc");
        assert_eq!(workload_name("web-0"), "web-0");
        assert_eq!(workload_name("client"), "client");
        assert_eq!(workload_name("-5f6b7c9d8-zt2p4"), "-5f6b7c9d8-zt2p4");
        assert_eq!(workload_name("web-aeiouaa-zt2p4"), "web-aeiouaa-zt2p4");
    }

    #[test]
    fn labels_follow_istio_and_say_unknown_where_istio_does() {
        let client = ObjectName::new("shop", "client-5f6b7c9d8-zt2p4");
        let web = ObjectName::new("shop", "web");
        let backend = ObjectName::new("shop", "web-0");
        let l = Common::new(
            Reporter::Source,
            Peer {
                pod: Some(&client),
                principal: None,
            },
            Some(&web),
            Peer {
                pod: Some(&backend),
                principal: Some("spiffe://cluster.local/ns/shop/sa/web"),
            },
            "tcp",
            Security::None,
        );
        let m: std::collections::BTreeMap<_, _> = l.pairs().collect();
        assert_eq!(m.len(), COMMON_LABELS.len());
        assert_eq!(m["reporter"], "source");
        assert_eq!(m["source_workload"], "client");
        assert_eq!(m["source_canonical_service"], "client");
        assert_eq!(m["source_canonical_revision"], "latest");
        assert_eq!(m["source_workload_namespace"], "shop");
        assert_eq!(m["source_principal"], "unknown");
        assert_eq!(m["source_app"], "unknown");
        assert_eq!(m["source_cluster"], "Kubernetes");
        assert_eq!(m["destination_service"], "web.shop.svc.cluster.local");
        assert_eq!(m["destination_service_name"], "web");
        assert_eq!(m["destination_service_namespace"], "shop");
        assert_eq!(m["destination_workload"], "web-0");
        assert_eq!(
            m["destination_principal"],
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(m["request_protocol"], "tcp");
        assert_eq!(m["response_flags"], "-");
        assert_eq!(m["connection_security_policy"], "none");
        let none = Common::new(
            Reporter::Destination,
            Peer::default(),
            None,
            Peer::default(),
            "http",
            Security::MutualTls,
        );
        let m: std::collections::BTreeMap<_, _> = none.pairs().collect();
        assert_eq!(m["source_workload"], "unknown");
        assert_eq!(m["source_canonical_revision"], "unknown");
        assert_eq!(m["destination_service"], "unknown");
        assert_eq!(m["connection_security_policy"], "mutual_tls");
    }
}
