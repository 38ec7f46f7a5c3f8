//! The one parser and validator of `AuthorizationPolicy` and `PeerAuthentication` objects, used
//! by every source (the Kubernetes watch and the static file): same checks, same messages.
//!
//! As `policy::parse`: an object is valid or rejected as a whole, every problem is listed with its
//! field (`spec.rules[0].to[0].operation.methods`) and reason, and the checks are those of the
//! CRDs' schema and CEL rules (see `types`). Patterns are compiled here, once, so evaluation never
//! parses strings.

use std::{collections::BTreeMap, fmt};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::types::{
    API_VERSION, AUTHZ_KIND, AuthorizationPolicy, L7_REFUSAL, MAX_ITEMS, MAX_VALUE, Operation,
    PEER_AUTHN_KIND, PeerAuthentication, Source, WorkloadSelector,
};
use crate::{model::ObjectName, policy::parse::FieldProblem};

/// Namespace of an object that names none (the static file; as `kubectl apply` without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Longest value quoted in a message.
const MAX_QUOTED: usize = 60;

/// `ALLOW` or `DENY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        })
    }
}

/// A principal or namespace pattern, Istio's four forms.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    /// `*`: any authenticated peer.
    Any,
    Exact(String),
    /// `abc*`.
    Prefix(String),
    /// `*abc`.
    Suffix(String),
}

impl Pattern {
    /// Whether `value` (absent for an unauthenticated peer) matches. Nothing matches an absent
    /// value, as in Istio, where principals and namespaces come from the peer certificate.
    #[must_use]
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Self::Any => true,
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(e) => f.write_str(e),
            Self::Prefix(p) => write!(f, "{p}*"),
            Self::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// One compiled `from[].source`: every non-empty list must match (Istio: all fields must match,
/// any value within a field may; an empty list is an unset field).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceMatch {
    /// Matched against the peer's SPIFFE id without `spiffe://` (`cluster.local/ns/a/sa/b`).
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    /// Matched against the namespace of the peer's SPIFFE id.
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
}

/// One compiled `to[].operation`: destination ports (the pod's port, as Istio matches the
/// port the workload receives on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

impl PortMatch {
    #[must_use]
    pub fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

/// One compiled rule: `from` (any source) and `to` (any operation); empty = any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleMatch {
    pub from: Vec<SourceMatch>,
    pub to: Vec<PortMatch>,
}

/// A valid `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuthzSpec {
    /// `None`: the whole namespace (root namespace: the mesh).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    /// Empty: an ALLOW allows nothing, a DENY denies nothing (Istio).
    pub rules: Vec<RuleMatch>,
}

/// `mtls.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    /// Plaintext from outside the mesh is accepted too (Istio's default).
    #[default]
    Permissive,
    /// Only mTLS from the mesh is accepted.
    Strict,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// A valid `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAuthnSpec {
    pub selector: Option<BTreeMap<String, String>>,
    /// `None`: `UNSET`, inherit from the level above.
    pub mode: Option<MtlsMode>,
}

/// A rejected object: kind, name and every problem.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub struct ObjectError {
    pub kind: &'static str,
    pub object: ObjectName,
    pub problems: Vec<FieldProblem>,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.kind, self.object)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        f.write_str("; rejected as a whole")
    }
}

/// An object as a source read it: identity, age and either its spec or why it is rejected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Parsed<T> {
    pub name: ObjectName,
    /// `metadata.creationTimestamp` (RFC 3339, sorts by time); `None` in a static file.
    pub created: Option<String>,
    pub generation: Option<i64>,
    pub outcome: Result<T, ObjectError>,
    /// Set on a last valid version kept applying (the Kubernetes source): why the object's
    /// current version was rejected.
    pub superseded_by: Option<ObjectError>,
}

impl<T> Parsed<T> {
    /// Istio's tie-break between policies of one level: the oldest, then by name.
    #[must_use]
    pub fn age_key(&self) -> (Option<&str>, &ObjectName) {
        (self.created.as_deref(), &self.name)
    }
}

/// A parsed `AuthorizationPolicy`.
pub type ParsedAuthz = Parsed<AuthzSpec>;
/// A parsed `PeerAuthentication`.
pub type ParsedPeerAuthn = Parsed<PeerAuthnSpec>;

fn quote(v: &str) -> String {
    let mut s: String = v.chars().take(MAX_QUOTED).collect();
    if s.len() < v.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// Collects problems, then deserializes the typed object (naming the failing field).
struct Reader {
    kind: &'static str,
    name: ObjectName,
    created: Option<String>,
    generation: Option<i64>,
    problems: Vec<FieldProblem>,
}

impl Reader {
    fn new(kind: &'static str, object: &Value) -> Self {
        let meta = object.get("metadata");
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let name = ObjectName::new(
            text(meta.and_then(|m| m.get("namespace")))
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            text(meta.and_then(|m| m.get("name"))).unwrap_or_default(),
        );
        let mut r = Self {
            kind,
            created: text(meta.and_then(|m| m.get("creationTimestamp"))),
            generation: meta
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64),
            name,
            problems: Vec::new(),
        };
        if r.name.name.is_empty() {
            r.problem("metadata.name", "is required");
        }
        match object.get("apiVersion").and_then(Value::as_str) {
            Some(API_VERSION) => {}
            other => r.problem(
                "apiVersion",
                format!(
                    "{} is not {API_VERSION}",
                    other.map_or_else(|| "absent".to_owned(), quote)
                ),
            ),
        }
        match object.get("kind").and_then(Value::as_str) {
            Some(k) if k == kind => {}
            other => r.problem(
                "kind",
                format!(
                    "{} is not {kind}",
                    other.map_or_else(|| "absent".to_owned(), quote)
                ),
            ),
        }
        r
    }

    fn problem(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.problems.push(FieldProblem {
            field: field.into(),
            reason: reason.into(),
        });
    }

    /// The typed object (its `status`, the elected agent's output, ignored).
    fn typed<T: DeserializeOwned>(&mut self, object: &Value) -> Option<T> {
        let mut without_status = object.clone();
        if let Some(map) = without_status.as_object_mut() {
            map.remove("status");
        }
        match serde_path_to_error::deserialize(&without_status) {
            Ok(t) => Some(t),
            Err(e) => {
                let path = e.path().to_string();
                let reason = e.into_inner().to_string();
                self.problem(if path == "." { String::new() } else { path }, reason);
                None
            }
        }
    }

    fn finish<T>(self, spec: Option<T>) -> Parsed<T> {
        let outcome = match spec {
            Some(s) if self.problems.is_empty() => Ok(s),
            _ => Err(ObjectError {
                kind: self.kind,
                object: self.name.clone(),
                problems: self.problems,
            }),
        };
        Parsed {
            name: self.name,
            created: self.created,
            generation: self.generation,
            outcome,
            superseded_by: None,
        }
    }

    fn selector(&mut self, s: Option<&WorkloadSelector>) -> Option<BTreeMap<String, String>> {
        let s = s?;
        for (k, v) in &s.match_labels {
            if k.is_empty() || k.len() > 317 {
                self.problem(
                    "spec.selector.matchLabels",
                    format!("label key {} is empty or too long", quote(k)),
                );
            }
            if v.len() > 63 {
                self.problem(
                    format!("spec.selector.matchLabels.{k}"),
                    "label values are at most 63 characters",
                );
            }
        }
        // Istio: an empty selector selects every workload of the namespace.
        (!s.match_labels.is_empty()).then(|| s.match_labels.clone())
    }

    fn count(&mut self, field: &str, n: usize) {
        if n > MAX_ITEMS {
            self.problem(field, format!("has {n} items; at most {MAX_ITEMS}"));
        }
    }

    fn patterns(
        &mut self,
        field: &str,
        values: Option<&Vec<String>>,
        principal: bool,
    ) -> Vec<Pattern> {
        let values = values.map(Vec::as_slice).unwrap_or_default();
        self.count(field, values.len());
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let at = format!("{field}[{i}]");
            if v.is_empty() {
                self.problem(at, "must not be empty");
                continue;
            }
            if v.len() > MAX_VALUE {
                self.problem(at, format!("is longer than {MAX_VALUE} characters"));
                continue;
            }
            // Istio writes principals without the scheme; accept it written with one.
            let v = if principal {
                v.strip_prefix("spiffe://").unwrap_or(v)
            } else {
                v.as_str()
            };
            let stars = v.matches('*').count();
            let p = if v == "*" {
                Pattern::Any
            } else if stars == 0 {
                Pattern::Exact(v.to_owned())
            } else if stars == 1 && v.ends_with('*') {
                Pattern::Prefix(v[..v.len() - 1].to_owned())
            } else if stars == 1 && v.starts_with('*') {
                Pattern::Suffix(v[1..].to_owned())
            } else {
                self.problem(
                    at,
                    format!(
                        "{} has a * other than one at its start or end (Istio matches exact, prefix*, *suffix or *)",
                        quote(v)
                    ),
                );
                continue;
            };
            out.push(p);
        }
        out
    }

    fn ports(&mut self, field: &str, values: Option<&Vec<String>>) -> Vec<u16> {
        let values = values.map(Vec::as_slice).unwrap_or_default();
        self.count(field, values.len());
        let mut out = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            match v.parse::<u16>() {
                Ok(p) if p != 0 && v.bytes().all(|b| b.is_ascii_digit()) => out.push(p),
                _ => self.problem(
                    format!("{field}[{i}]"),
                    format!("{} is not a port number in 1..=65535", quote(v)),
                ),
            }
        }
        out
    }

    fn refuse_if<T>(&mut self, field: String, value: Option<&T>, reason: &str) {
        if value.is_some() {
            self.problem(field, reason);
        }
    }

    fn source(&mut self, at: &str, s: &Source) -> SourceMatch {
        let f = |x: &str| format!("{at}.{x}");
        self.refuse_if(
            f("requestPrincipals"),
            s.request_principals.as_ref(),
            L7_REFUSAL,
        );
        self.refuse_if(
            f("notRequestPrincipals"),
            s.not_request_principals.as_ref(),
            L7_REFUSAL,
        );
        let ip = "ipBlocks are not supported yet; use principals or namespaces";
        self.refuse_if(f("ipBlocks"), s.ip_blocks.as_ref(), ip);
        self.refuse_if(f("notIpBlocks"), s.not_ip_blocks.as_ref(), ip);
        self.refuse_if(f("remoteIpBlocks"), s.remote_ip_blocks.as_ref(), ip);
        self.refuse_if(f("notRemoteIpBlocks"), s.not_remote_ip_blocks.as_ref(), ip);
        SourceMatch {
            principals: self.patterns(&f("principals"), s.principals.as_ref(), true),
            not_principals: self.patterns(&f("notPrincipals"), s.not_principals.as_ref(), true),
            namespaces: self.patterns(&f("namespaces"), s.namespaces.as_ref(), false),
            not_namespaces: self.patterns(&f("notNamespaces"), s.not_namespaces.as_ref(), false),
        }
    }

    fn operation(&mut self, at: &str, o: &Operation) -> PortMatch {
        let f = |x: &str| format!("{at}.{x}");
        for (name, v) in [
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
        ] {
            self.refuse_if(f(name), v.as_ref(), L7_REFUSAL);
        }
        PortMatch {
            ports: self.ports(&f("ports"), o.ports.as_ref()),
            not_ports: self.ports(&f("notPorts"), o.not_ports.as_ref()),
        }
    }
}

/// Parses and validates one `AuthorizationPolicy` object (the whole object).
#[must_use]
pub fn parse_authorization(object: &Value) -> ParsedAuthz {
    let mut r = Reader::new(AUTHZ_KIND, object);
    let Some(p) = r.typed::<AuthorizationPolicy>(object) else {
        return r.finish(None);
    };
    let selector = r.selector(p.spec.selector.as_ref());
    let action = match p.spec.action.as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(a @ ("AUDIT" | "CUSTOM")) => {
            r.problem(
                "spec.action",
                format!("{a} is not supported (ALLOW or DENY)"),
            );
            Action::Allow
        }
        Some(other) => {
            r.problem(
                "spec.action",
                format!("{} is not ALLOW or DENY", quote(other)),
            );
            Action::Allow
        }
    };
    let raw_rules = p.spec.rules.as_deref().unwrap_or_default();
    r.count("spec.rules", raw_rules.len());
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (i, rule) in raw_rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if rule.when.is_some() {
            r.problem(
                format!("{at}.when"),
                "conditions are not supported by this L4 policy; use from and to",
            );
        }
        let from = rule.from.as_deref().unwrap_or_default();
        let to = rule.to.as_deref().unwrap_or_default();
        r.count(&format!("{at}.from"), from.len());
        r.count(&format!("{at}.to"), to.len());
        rules.push(RuleMatch {
            from: from
                .iter()
                .enumerate()
                .map(|(j, s)| r.source(&format!("{at}.from[{j}].source"), &s.source))
                .collect(),
            to: to
                .iter()
                .enumerate()
                .map(|(j, o)| r.operation(&format!("{at}.to[{j}].operation"), &o.operation))
                .collect(),
        });
    }
    r.finish(Some(AuthzSpec {
        selector,
        action,
        rules,
    }))
}

/// Parses and validates one `PeerAuthentication` object (the whole object).
#[must_use]
pub fn parse_peer_authentication(object: &Value) -> ParsedPeerAuthn {
    let mut r = Reader::new(PEER_AUTHN_KIND, object);
    let Some(p) = r.typed::<PeerAuthentication>(object) else {
        return r.finish(None);
    };
    let selector = r.selector(p.spec.selector.as_ref());
    if p.spec.port_level_mtls.is_some() {
        r.problem("spec.portLevelMtls", "is not supported yet");
    }
    let mode = match p.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("DISABLE") => {
            r.problem(
                "spec.mtls.mode",
                "DISABLE is not supported: label the workload kernmesh.io/dataplane-mode=none to take it out of the mesh",
            );
            None
        }
        Some(other) => {
            r.problem(
                "spec.mtls.mode",
                format!("{} is not STRICT, PERMISSIVE or UNSET", quote(other)),
            );
            None
        }
    };
    r.finish(Some(PeerAuthnSpec { selector, mode }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn authz(spec: &Value) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": AUTHZ_KIND,
            "metadata": { "name": "p", "namespace": "shop" },
            "spec": spec,
        })
    }

    fn err(spec: &Value) -> String {
        parse_authorization(&authz(spec))
            .outcome
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_full_policy_compiles_its_patterns_and_ports() {
        let p = parse_authorization(&authz(&json!({
            "selector": { "matchLabels": { "app": "db" } },
            "action": "DENY",
            "rules": [{
                "from": [{ "source": {
                    "principals": ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/x/*", "*/sa/admin", "*"],
                    "notNamespaces": ["shop"],
                } }],
                "to": [{ "operation": { "ports": ["5432"], "notPorts": ["22"] } }],
            }],
        })));
        let s = p.outcome.unwrap();
        assert_eq!(s.action, Action::Deny);
        assert_eq!(
            s.selector,
            Some(BTreeMap::from([("app".into(), "db".into())]))
        );
        assert_eq!(
            s.rules[0].from[0].principals,
            vec![
                Pattern::Exact("cluster.local/ns/a/sa/b".into()),
                Pattern::Prefix("cluster.local/ns/x/".into()),
                Pattern::Suffix("/sa/admin".into()),
                Pattern::Any
            ]
        );
        assert_eq!(
            s.rules[0].to[0],
            PortMatch {
                ports: vec![5432],
                not_ports: vec![22]
            }
        );
    }

    #[test]
    fn defaults_are_istios() {
        let s = parse_authorization(&authz(&json!({}))).outcome.unwrap();
        assert_eq!(
            (s.action, s.selector, s.rules.len()),
            (Action::Allow, None, 0)
        );
        let s = parse_authorization(&authz(&json!({ "selector": {}, "rules": [{}] })))
            .outcome
            .unwrap();
        assert_eq!(s.selector, None, "an empty selector is the whole namespace");
        assert_eq!(s.rules, vec![RuleMatch::default()]);
    }

    #[test]
    fn each_bad_value_names_the_object_field_and_reason() {
        for (spec, want) in [
            (
                json!({ "action": "AUDIT" }),
                "spec.action: AUDIT is not supported",
            ),
            (
                json!({ "action": "allow" }),
                "spec.action: \"allow\" is not ALLOW or DENY",
            ),
            (
                json!({ "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] }),
                "spec.rules[0].to[0].operation.methods: L7 fields are not supported by this L4 policy",
            ),
            (
                json!({ "rules": [{ "to": [{ "operation": { "paths": ["/admin"] } }] }] }),
                "spec.rules[0].to[0].operation.paths: L7 fields are not supported by this L4 policy",
            ),
            (
                json!({ "rules": [{ "from": [{ "source": { "requestPrincipals": ["*"] } }] }] }),
                "spec.rules[0].from[0].source.requestPrincipals: L7 fields are not supported",
            ),
            (
                json!({ "rules": [{ "when": [{ "key": "request.headers[x]", "values": ["y"] }] }] }),
                "spec.rules[0].when: conditions are not supported by this L4 policy",
            ),
            (
                json!({ "rules": [{ "from": [{ "source": { "principals": [""] } }] }] }),
                "spec.rules[0].from[0].source.principals[0]: must not be empty",
            ),
            (
                json!({ "rules": [{ "from": [{ "source": { "namespaces": ["a*b"] } }] }] }),
                "spec.rules[0].from[0].source.namespaces[0]: \"a*b\" has a * other than one at its start or end",
            ),
            (
                json!({ "rules": [{ "to": [{ "operation": { "ports": ["0"] } }] }] }),
                "spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port number in 1..=65535",
            ),
            (
                json!({ "rules": [{ "to": [{ "operation": { "notPorts": ["http"] } }] }] }),
                "spec.rules[0].to[0].operation.notPorts[0]: \"http\" is not a port number",
            ),
            (
                json!({ "rules": [{ "to": [{ "operation": { "ports": [80] } }] }] }),
                "spec.rules[0].to[0].operation.ports[0]: invalid type: integer `80`, expected a string",
            ),
            (
                json!({ "rules": [{ "from": [{ "source": { "principal": ["x"] } }] }] }),
                "spec.rules[0].from[0].source.principal: unknown field `principal`",
            ),
            (
                json!({ "rules": [{ "from": [{ "source": { "ipBlocks": ["10.0.0.0/8"] } }] }] }),
                "spec.rules[0].from[0].source.ipBlocks: ipBlocks are not supported yet",
            ),
        ] {
            let msg = err(&spec);
            assert!(
                msg.starts_with(&format!("AuthorizationPolicy shop/p: {want}")),
                "{spec}: got {msg}"
            );
            assert!(msg.ends_with("; rejected as a whole"), "{msg}");
        }
    }

    #[test]
    fn peer_authentication_modes() {
        let pa = |spec: Value| {
            parse_peer_authentication(&json!({
                "apiVersion": API_VERSION,
                "kind": PEER_AUTHN_KIND,
                "metadata": { "name": "default", "namespace": "shop" },
                "spec": spec,
            }))
        };
        assert_eq!(
            pa(json!({ "mtls": { "mode": "STRICT" } }))
                .outcome
                .unwrap()
                .mode,
            Some(MtlsMode::Strict)
        );
        assert_eq!(pa(json!({})).outcome.unwrap().mode, None, "UNSET inherits");
        let e = pa(json!({ "mtls": { "mode": "DISABLE" } }))
            .outcome
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "PeerAuthentication shop/default: spec.mtls.mode: DISABLE is not supported"
            ),
            "{e}"
        );
        let e = pa(json!({ "portLevelMtls": { "80": { "mode": "STRICT" } } }))
            .outcome
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.portLevelMtls: is not supported yet"),
            "{e}"
        );
    }

    #[test]
    fn wrong_kind_version_and_missing_name() {
        let mut v = authz(&json!({}));
        v["kind"] = json!("PeerAuthentication");
        v["apiVersion"] = json!("security.istio.io/v1");
        v["metadata"]["name"] = Value::Null;
        let e = parse_authorization(&v).outcome.unwrap_err().to_string();
        assert!(e.contains("metadata.name: is required"), "{e}");
        assert!(
            e.contains("kind: \"PeerAuthentication\" is not AuthorizationPolicy"),
            "{e}"
        );
        assert!(
            e.contains("apiVersion: \"security.istio.io/v1\" is not security.kernmesh.io/v1alpha1"),
            "{e}"
        );
    }
}
