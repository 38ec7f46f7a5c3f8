//! The authorization engine: which `AuthorizationPolicy` objects select a workload (computed once
//! per workload and model), and the verdict for one connection, with Istio's evaluation order.
//!
//! Istio's rules, kept exactly (`security/v1beta1/authorization.proto`):
//! 1. If any DENY policy selecting the workload matches, deny.
//! 2. If no ALLOW policy selects the workload, allow.
//! 3. If any ALLOW policy selecting the workload matches, allow; else deny.
//!
//! A policy matches if any of its rules does (no rules: never, so an ALLOW without rules allows
//! nothing); a rule matches if any `from` source and any `to` operation do (absent: any); a
//! source matches if each of its set fields does. Principals and namespaces come only from the
//! peer's certificate: for an unauthenticated (plaintext) peer a positive field never matches and
//! a negative one (`notPrincipals`) always does — so Istio's "DENY `notPrincipals: ["*"]`" refuses
//! plaintext here too. Ports are the destination pod's port.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
    sync::Arc,
};

use tracing::warn;

use super::parse::{Action, AuthzSpec, ParsedAuthz, PortMatch, RuleMatch, SourceMatch};
use crate::{identity::SpiffeId, model::ObjectName};

/// A valid policy with its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamedPolicy {
    pub name: ObjectName,
    pub spec: AuthzSpec,
}

/// The valid policies, indexed by namespace for selection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AuthzIndex {
    root_namespace: String,
    by_namespace: BTreeMap<String, Vec<Arc<NamedPolicy>>>,
}

/// The policies selecting one workload, split by action (oldest first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadPolicies {
    pub deny: Vec<Arc<NamedPolicy>>,
    pub allow: Vec<Arc<NamedPolicy>>,
}

impl WorkloadPolicies {
    /// No policy selects the workload: everything is allowed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    /// Every selecting policy (DENY first).
    pub fn iter(&self) -> impl Iterator<Item = &NamedPolicy> {
        self.deny.iter().chain(&self.allow).map(AsRef::as_ref)
    }

    /// Ports any selecting policy names (`ports` or `notPorts`): a verdict can differ only
    /// between these and "any other port".
    #[must_use]
    pub fn named_ports(&self) -> BTreeSet<u16> {
        self.iter()
            .flat_map(|p| &p.spec.rules)
            .flat_map(|r| &r.to)
            .flat_map(|o| o.ports.iter().chain(&o.not_ports))
            .copied()
            .collect()
    }
}

/// Whether `selector` (`None` = every workload) selects a pod with `labels`.
#[must_use]
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

impl AuthzIndex {
    /// Indexes the valid policies of `parsed` (invalid ones apply nowhere). A policy in
    /// `root_namespace` applies to every namespace (Istio's root namespace).
    #[must_use]
    pub fn new(parsed: &[ParsedAuthz], root_namespace: &str) -> Self {
        let mut valid: Vec<&ParsedAuthz> = parsed.iter().filter(|p| p.outcome.is_ok()).collect();
        valid.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let mut by_namespace: BTreeMap<String, Vec<Arc<NamedPolicy>>> = BTreeMap::new();
        for p in valid {
            if let Ok(spec) = &p.outcome {
                by_namespace
                    .entry(p.name.namespace.clone())
                    .or_default()
                    .push(Arc::new(NamedPolicy {
                        name: p.name.clone(),
                        spec: spec.clone(),
                    }));
            }
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
        }
    }

    /// The policies selecting a workload in `namespace` with `labels`: its namespace's and the
    /// root namespace's whose selector matches.
    #[must_use]
    pub fn for_workload(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        let mut namespaces = vec![namespace];
        if namespace != self.root_namespace {
            namespaces.push(&self.root_namespace);
        }
        for ns in namespaces {
            for p in self
                .by_namespace
                .get(ns)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if selects(p.spec.selector.as_ref(), labels) {
                    match p.spec.action {
                        Action::Deny => out.deny.push(Arc::clone(p)),
                        Action::Allow => out.allow.push(Arc::clone(p)),
                    }
                }
            }
        }
        out
    }

    /// Every valid policy.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<NamedPolicy>> {
        self.by_namespace.values().flatten()
    }
}

/// The calling side as the engine matches it, prepared once per connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's principal form); `None` = unauthenticated.
    principal: Option<String>,
    namespace: Option<String>,
}

impl Peer {
    #[must_use]
    pub fn new(identity: Option<&SpiffeId>) -> Self {
        Self {
            principal: identity.map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            namespace: identity.map(|id| id.namespace().to_owned()),
        }
    }
}

/// Why a connection was allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// No policy selects the destination.
    NoPolicy,
    /// A DENY policy matched (named in the decision).
    DenyMatched,
    /// An ALLOW policy matched (named in the decision).
    AllowMatched,
    /// ALLOW policies select the destination and none matched.
    NoAllowMatched,
    /// The destination address is no enrolled workload of this node.
    UnknownDestination,
}

impl DecisionReason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPolicy => "no_policy",
            Self::DenyMatched => "deny_matched",
            Self::AllowMatched => "allow_matched",
            Self::NoAllowMatched => "no_allow_matched",
            Self::UnknownDestination => "unknown_destination",
        }
    }
}

/// The verdict for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that decided (the matching DENY or ALLOW); `None` for no policy, no ALLOW
    /// matched, unknown destination.
    pub policy: Option<ObjectName>,
    pub reason: DecisionReason,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        match (&self.policy, self.reason) {
            (Some(p), DecisionReason::DenyMatched) => {
                write!(f, "{verdict}: DENY policy {p} matched")
            }
            (Some(p), _) => write!(f, "{verdict}: ALLOW policy {p} matched"),
            (None, DecisionReason::NoAllowMatched) => {
                write!(
                    f,
                    "{verdict}: no ALLOW policy selecting the workload matched"
                )
            }
            (None, DecisionReason::UnknownDestination) => {
                write!(
                    f,
                    "{verdict}: the destination is no mesh workload of this node"
                )
            }
            (None, _) => write!(f, "{verdict}: no policy selects the workload"),
        }
    }
}

fn any_or<T>(items: &[T], f: impl Fn(&T) -> bool) -> bool {
    items.is_empty() || items.iter().any(f)
}

fn source_matches(s: &SourceMatch, peer: &Peer) -> bool {
    let principal = peer.principal.as_deref();
    let namespace = peer.namespace.as_deref();
    any_or(&s.principals, |p| p.matches(principal))
        && !s.not_principals.iter().any(|p| p.matches(principal))
        && any_or(&s.namespaces, |p| p.matches(namespace))
        && !s.not_namespaces.iter().any(|p| p.matches(namespace))
}

fn rule_matches(r: &RuleMatch, peer: &Peer, port: u16) -> bool {
    any_or(&r.from, |s| source_matches(s, peer)) && any_or(&r.to, |o: &PortMatch| o.matches(port))
}

fn policy_matches(p: &NamedPolicy, peer: &Peer, port: u16) -> bool {
    p.spec.rules.iter().any(|r| rule_matches(r, peer, port))
}

/// The verdict for a connection from `peer` to a workload selected by `policies`, on the
/// destination pod's `port`. Pure: reads the precomputed selection, allocates only the
/// deciding policy's name.
#[must_use]
pub fn evaluate_peer(policies: &WorkloadPolicies, peer: &Peer, port: u16) -> Decision {
    if let Some(p) = policies.deny.iter().find(|p| policy_matches(p, peer, port)) {
        return Decision {
            allowed: false,
            policy: Some(p.name.clone()),
            reason: DecisionReason::DenyMatched,
        };
    }
    if policies.allow.is_empty() {
        return Decision {
            allowed: true,
            policy: None,
            reason: DecisionReason::NoPolicy,
        };
    }
    match policies
        .allow
        .iter()
        .find(|p| policy_matches(p, peer, port))
    {
        Some(p) => Decision {
            allowed: true,
            policy: Some(p.name.clone()),
            reason: DecisionReason::AllowMatched,
        },
        None => Decision {
            allowed: false,
            policy: None,
            reason: DecisionReason::NoAllowMatched,
        },
    }
}

/// [`evaluate_peer`] for a source identity (`None` = plaintext, unauthenticated).
#[must_use]
pub fn evaluate(policies: &WorkloadPolicies, source: Option<&SpiffeId>, port: u16) -> Decision {
    evaluate_peer(policies, &Peer::new(source), port)
}

/// Port of a kernel entry that stands for every port the destination's policies do not name.
pub const ANY_PORT: u16 = 0;
/// Source identity number of an unauthenticated (not enrolled, or unknown) source.
pub const UNAUTHENTICATED: u32 = 0;

/// Key of the same-node kernel verdict map: (source identity number, destination identity
/// number, destination port or [`ANY_PORT`]).
pub type KernelKey = (u32, u32, u16);

/// The same-node verdicts the kernel needs, compactly: for each local destination number that
/// some policy selects and each known source, an [`ANY_PORT`] entry with the verdict for ports no
/// policy names, plus an entry per named port whose verdict differs. The kernel looks up the
/// exact port, then [`ANY_PORT`]; a destination without entries has no policy (allow). Sources
/// the caller cannot number map to [`UNAUTHENTICATED`], which should be among `sources`.
///
/// Destinations sharing a number (numbered by SPIFFE id while policies select pods by label)
/// get the conjunction of their verdicts, port by port over the union of their named ports:
/// deny wins, never a verdict one of them would not give. Numbered per pod, the entries are
/// exactly the engine's. Size: destination numbers with policies × sources × (1 + differing
/// named ports).
#[must_use]
pub fn kernel_entries(
    destinations: &[(u32, &WorkloadPolicies)],
    sources: &[(u32, Option<&SpiffeId>)],
) -> BTreeMap<KernelKey, bool> {
    let peers: Vec<(u32, Peer)> = sources.iter().map(|(n, id)| (*n, Peer::new(*id))).collect();
    let mut groups: BTreeMap<u32, Vec<&WorkloadPolicies>> = BTreeMap::new();
    for (dst, policies) in destinations {
        groups.entry(*dst).or_default().push(policies);
    }
    let mut out = BTreeMap::new();
    for (dst, group) in groups {
        if group.iter().all(|p| p.is_empty()) {
            continue;
        }
        let named: BTreeSet<u16> = group.iter().flat_map(|p| p.named_ports()).collect();
        // A port no policy names stands for all of them. Should every port be named, `other`
        // is a named port and still correct: each named port whose verdict differs from it
        // gets its own entry.
        let other = (1..=u16::MAX)
            .find(|p| !named.contains(p))
            .unwrap_or(u16::MAX);
        let verdict =
            |peer: &Peer, port: u16| group.iter().all(|p| evaluate_peer(p, peer, port).allowed);
        for (src, peer) in &peers {
            let default = verdict(peer, other);
            out.insert((*src, dst, ANY_PORT), default);
            for &port in &named {
                let v = verdict(peer, port);
                if v != default {
                    out.insert((*src, dst, port), v);
                }
            }
        }
    }
    out
}

/// The kernel's lookup over [`kernel_entries`]' output (its specification, and what tests use).
#[must_use]
pub fn kernel_lookup(entries: &BTreeMap<KernelKey, bool>, src: u32, dst: u32, port: u16) -> bool {
    entries
        .get(&(src, dst, port))
        .or_else(|| entries.get(&(src, dst, ANY_PORT)))
        .copied()
        .unwrap_or(true)
}

/// Where a connection was judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnforcementPoint {
    /// The inbound HBONE proxy of the destination's node.
    Hbone,
    /// The kernel's `connect()` on a node holding both ends.
    SameNode,
}

impl EnforcementPoint {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::SameNode => "same_node",
        }
    }
}

/// One denied connection, logged with both identities (Istio's ztunnel logs `src.identity`
/// and `dst.identity` the same way).
#[derive(Clone, Debug)]
pub struct Denial<'a> {
    pub source: Option<&'a SpiffeId>,
    pub source_addr: Option<SocketAddr>,
    pub destination: Option<&'a SpiffeId>,
    pub destination_pod: Option<&'a ObjectName>,
    pub destination_addr: SocketAddr,
    pub point: EnforcementPoint,
    pub decision: &'a Decision,
}

impl Denial<'_> {
    /// Writes the log line (`tracing` WARN, target `authz`), structured so JSON logs carry
    /// each field.
    pub fn log(&self) {
        warn!(
            target: "authz",
            src_identity = %OrNone(self.source),
            src_addr = %OrNone(self.source_addr.as_ref()),
            dst_identity = %OrNone(self.destination),
            dst_pod = %OrNone(self.destination_pod),
            dst_addr = %self.destination_addr,
            point = self.point.as_str(),
            policy = %OrNone(self.decision.policy.as_ref()),
            reason = self.decision.reason.as_str(),
            "connection denied by authorization policy"
        );
    }
}

impl fmt::Display for Denial<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "denied {} ({}) -> {} ({}, pod {}) at {}: {}",
            OrNone(self.source),
            OrNone(self.source_addr.as_ref()),
            OrNone(self.destination),
            self.destination_addr,
            OrNone(self.destination_pod),
            self.point.as_str(),
            self.decision
        )
    }
}

/// `-` for an absent value in a log line.
struct OrNone<'a, T>(Option<&'a T>);

impl<T: fmt::Display> fmt::Display for OrNone<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::authz::parse::parse_authorization;

    const ROOT: &str = "mesh-system";

    fn policy(ns: &str, name: &str, spec: &Value) -> ParsedAuthz {
        let p = parse_authorization(&json!({
            "apiVersion": "security.kernmesh.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": name, "namespace": ns },
            "spec": spec,
        }));
        assert!(p.outcome.is_ok(), "{:?}", p.outcome);
        p
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Verdict for `source` → a workload `app=<app>` in `ns` on `port` under `policies`.
    fn verdict(
        policies: &[ParsedAuthz],
        ns: &str,
        app: &str,
        source: Option<&SpiffeId>,
        port: u16,
    ) -> Decision {
        let index = AuthzIndex::new(policies, ROOT);
        evaluate(
            &index.for_workload(ns, &labels(&[("app", app)])),
            source,
            port,
        )
    }

    #[test]
    fn no_policy_allows_everything() {
        let d = verdict(&[], "foo", "httpbin", None, 80);
        assert!(d.allowed);
        assert_eq!(d.reason, DecisionReason::NoPolicy);
    }

    /// Istio's "allow-nothing": `spec: {}` denies every request to the namespace.
    #[test]
    fn allow_without_rules_allows_nothing() {
        let ps = [policy("foo", "allow-nothing", &json!({}))];
        let d = verdict(&ps, "foo", "httpbin", Some(&id("foo", "sleep")), 80);
        assert!(!d.allowed);
        assert_eq!(d.reason, DecisionReason::NoAllowMatched);
        assert!(
            verdict(&ps, "bar", "httpbin", None, 80).allowed,
            "other namespaces unaffected"
        );
    }

    /// Istio's "allow-all": `rules: [{}]` matches everything.
    #[test]
    fn an_empty_rule_allows_everything() {
        let ps = [
            policy("foo", "allow-nothing", &json!({})),
            policy("foo", "allow-all", &json!({ "rules": [{}] })),
        ];
        let d = verdict(&ps, "foo", "httpbin", None, 80);
        assert!(d.allowed);
        assert_eq!(d.policy, Some(ObjectName::new("foo", "allow-all")));
    }

    /// Istio: a DENY policy without rules denies nothing; `deny-all` needs `rules: [{}]`.
    #[test]
    fn deny_wins_over_allow() {
        let ps = [
            policy("foo", "allow-all", &json!({ "rules": [{}] })),
            policy("foo", "deny-empty", &json!({ "action": "DENY" })),
        ];
        assert!(verdict(&ps, "foo", "httpbin", None, 80).allowed);
        let ps = [
            policy("foo", "allow-all", &json!({ "rules": [{}] })),
            policy(
                "foo",
                "deny-sleep",
                &json!({
                    "action": "DENY",
                    "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/foo/sa/sleep"] } }] }],
                }),
            ),
        ];
        let d = verdict(&ps, "foo", "httpbin", Some(&id("foo", "sleep")), 80);
        assert_eq!(
            (d.allowed, d.reason, d.policy),
            (
                false,
                DecisionReason::DenyMatched,
                Some(ObjectName::new("foo", "deny-sleep"))
            )
        );
        assert!(verdict(&ps, "foo", "httpbin", Some(&id("foo", "other")), 80).allowed);
    }

    /// Istio's example: ALLOW from `cluster.local/ns/default/sa/sleep` or namespace `dev` on
    /// workload `app: httpbin`; other workloads of the namespace stay open.
    #[test]
    fn allow_selects_then_must_match() {
        let ps = [policy(
            "foo",
            "httpbin",
            &json!({
                "selector": { "matchLabels": { "app": "httpbin" } },
                "rules": [{ "from": [
                    { "source": { "principals": ["cluster.local/ns/default/sa/sleep"] } },
                    { "source": { "namespaces": ["dev"] } },
                ] }],
            }),
        )];
        assert!(verdict(&ps, "foo", "httpbin", Some(&id("default", "sleep")), 80).allowed);
        assert!(verdict(&ps, "foo", "httpbin", Some(&id("dev", "anything")), 80).allowed);
        assert!(!verdict(&ps, "foo", "httpbin", Some(&id("default", "curl")), 80).allowed);
        assert!(
            !verdict(&ps, "foo", "httpbin", None, 80).allowed,
            "plaintext has no principal"
        );
        assert!(
            verdict(&ps, "foo", "other", None, 80).allowed,
            "not selected: no policy"
        );
    }

    #[test]
    fn principals_and_namespaces_match_exact_prefix_suffix_and_any() {
        let allow = |field: &str, values: &[&str]| {
            [policy(
                "foo",
                "p",
                &json!({ "rules": [{ "from": [{ "source": { field: values } }] }] }),
            )]
        };
        let sleep = id("foo", "sleep");
        let admin = id("ops", "admin");
        let cases: [(&str, &[&str], &SpiffeId, bool); 9] = [
            ("principals", &["cluster.local/ns/foo/*"], &sleep, true),
            ("principals", &["cluster.local/ns/foo/*"], &admin, false),
            ("principals", &["*/sa/admin"], &admin, true),
            ("principals", &["*/sa/admin"], &sleep, false),
            ("principals", &["*"], &sleep, true),
            (
                "principals",
                &["spiffe://cluster.local/ns/ops/sa/admin"],
                &admin,
                true,
            ),
            ("namespaces", &["op*"], &admin, true),
            ("namespaces", &["*oo"], &sleep, true),
            ("namespaces", &["*oo"], &admin, false),
        ];
        for (field, values, who, want) in cases {
            assert_eq!(
                verdict(&allow(field, values), "foo", "x", Some(who), 80).allowed,
                want,
                "{field} {values:?} {who}"
            );
        }
        // `*` needs an authenticated peer, as Istio's presence match.
        assert!(!verdict(&allow("principals", &["*"]), "foo", "x", None, 80).allowed);
        assert!(!verdict(&allow("namespaces", &["*"]), "foo", "x", None, 80).allowed);
    }

    /// Istio's idiom "DENY `notPrincipals: ["*"]`" refuses plaintext and admits any mTLS peer;
    /// `notNamespaces` likewise.
    #[test]
    fn negative_fields_match_the_unauthenticated() {
        let ps = [policy(
            "foo",
            "require-mtls",
            &json!({
                "action": "DENY",
                "rules": [{ "from": [{ "source": { "notPrincipals": ["*"] } }] }],
            }),
        )];
        assert!(!verdict(&ps, "foo", "x", None, 80).allowed);
        assert!(verdict(&ps, "foo", "x", Some(&id("bar", "y")), 80).allowed);
        let ps = [policy(
            "foo",
            "only-foo",
            &json!({
                "action": "DENY",
                "rules": [{ "from": [{ "source": { "notNamespaces": ["foo"] } }] }],
            }),
        )];
        assert!(verdict(&ps, "foo", "x", Some(&id("foo", "y")), 80).allowed);
        assert!(!verdict(&ps, "foo", "x", Some(&id("bar", "y")), 80).allowed);
        assert!(!verdict(&ps, "foo", "x", None, 80).allowed);
    }

    #[test]
    fn ports_and_not_ports() {
        let ps = [policy(
            "foo",
            "p",
            &json!({
                "rules": [{
                    "from": [{ "source": { "namespaces": ["foo"] } }],
                    "to": [{ "operation": { "ports": ["8080", "9090"] } }, { "operation": { "notPorts": ["22", "8080", "9090"] } }],
                }],
            }),
        )];
        let me = id("foo", "a");
        assert!(verdict(&ps, "foo", "x", Some(&me), 8080).allowed);
        assert!(
            verdict(&ps, "foo", "x", Some(&me), 443).allowed,
            "second operation"
        );
        assert!(!verdict(&ps, "foo", "x", Some(&me), 22).allowed);
        assert!(!verdict(&ps, "foo", "x", Some(&id("bar", "a")), 8080).allowed);
        // Fields of one source are ANDed: both must match.
        let ps = [policy(
            "foo",
            "p",
            &json!({
                "rules": [{ "from": [{ "source": { "namespaces": ["foo"], "notPrincipals": ["cluster.local/ns/foo/sa/bad"] } }] }],
            }),
        )];
        assert!(verdict(&ps, "foo", "x", Some(&me), 1).allowed);
        assert!(!verdict(&ps, "foo", "x", Some(&id("foo", "bad")), 1).allowed);
    }

    /// A policy in the root namespace applies to every namespace; with a selector, to matching
    /// workloads of every namespace.
    #[test]
    fn root_namespace_policies_are_mesh_wide() {
        let ps = [policy(
            ROOT,
            "deny-bar",
            &json!({
                "action": "DENY",
                "rules": [{ "from": [{ "source": { "namespaces": ["bar"] } }] }],
            }),
        )];
        assert!(!verdict(&ps, "foo", "x", Some(&id("bar", "a")), 80).allowed);
        assert!(!verdict(&ps, "baz", "x", Some(&id("bar", "a")), 80).allowed);
        let ps = [policy(
            ROOT,
            "db-only",
            &json!({
                "selector": { "matchLabels": { "app": "db" } },
                "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/api"] } }] }],
            }),
        )];
        assert!(!verdict(&ps, "foo", "db", Some(&id("bar", "a")), 5432).allowed);
        assert!(verdict(&ps, "foo", "db", Some(&id("shop", "api")), 5432).allowed);
        assert!(verdict(&ps, "foo", "web", Some(&id("bar", "a")), 80).allowed);
    }

    #[test]
    fn kernel_entries_agree_with_the_engine_on_every_port() {
        let ps = [
            policy(
                "foo",
                "deny-ssh",
                &json!({
                    "action": "DENY",
                    "rules": [{ "to": [{ "operation": { "ports": ["22"] } }] }],
                }),
            ),
            policy(
                "foo",
                "allow-api",
                &json!({
                    "rules": [
                        { "from": [{ "source": { "principals": ["cluster.local/ns/foo/sa/api"] } }] },
                        { "from": [{ "source": { "namespaces": ["ops"] } }], "to": [{ "operation": { "notPorts": ["8443"] } }] },
                    ],
                }),
            ),
        ];
        let index = AuthzIndex::new(&ps, ROOT);
        let db = index.for_workload("foo", &labels(&[("app", "db")]));
        let open = index.for_workload("bar", &labels(&[]));
        let (api, ops, other) = (id("foo", "api"), id("ops", "x"), id("foo", "web"));
        let sources = [
            (UNAUTHENTICATED, None),
            (1, Some(&api)),
            (2, Some(&ops)),
            (3, Some(&other)),
        ];
        let entries = kernel_entries(&[(10, &db), (11, &open)], &sources);
        for (n, source) in sources {
            for port in [1, 22, 80, 8443, 65535] {
                assert_eq!(
                    kernel_lookup(&entries, n, 10, port),
                    evaluate(&db, source, port).allowed,
                    "source {n} port {port}"
                );
                assert!(kernel_lookup(&entries, n, 11, port), "no policy on 11");
            }
        }
        assert!(
            entries.keys().all(|k| k.1 == 10),
            "a destination without policy has no entries"
        );
        assert!(entries.len() <= sources.len() * 3, "compact: {entries:?}");
    }

    /// Two pods under one destination number (numbered by SPIFFE id) with policies naming
    /// different ports: each port gets the conjunction, never one pod's allow for the other.
    #[test]
    fn destinations_sharing_a_number_get_the_deny_wins_conjunction() {
        let ps = [
            policy(
                "foo",
                "a-80",
                &json!({
                    "selector": { "matchLabels": { "app": "a" } },
                    "rules": [{ "to": [{ "operation": { "ports": ["80"] } }] }],
                }),
            ),
            policy(
                "foo",
                "b-443",
                &json!({
                    "selector": { "matchLabels": { "app": "b" } },
                    "rules": [{ "to": [{ "operation": { "ports": ["443"] } }] }],
                }),
            ),
        ];
        let index = AuthzIndex::new(&ps, ROOT);
        let a = index.for_workload("foo", &labels(&[("app", "a")]));
        let b = index.for_workload("foo", &labels(&[("app", "b")]));
        let c = index.for_workload("foo", &labels(&[("app", "c")]));
        let sources = [(UNAUTHENTICATED, None)];
        let shared = kernel_entries(&[(5, &a), (5, &b), (5, &c)], &sources);
        for port in [80, 443, 8080] {
            let each = [&a, &b, &c].iter().all(|w| evaluate(w, None, port).allowed);
            assert_eq!(kernel_lookup(&shared, 0, 5, port), each, "port {port}");
            assert!(!each, "port {port}: one of them denies");
        }
        let own = kernel_entries(&[(1, &a), (2, &b), (3, &c)], &sources);
        assert!(kernel_lookup(&own, 0, 1, 80) && !kernel_lookup(&own, 0, 1, 443));
        assert!(kernel_lookup(&own, 0, 2, 443) && !kernel_lookup(&own, 0, 2, 80));
        assert!(kernel_lookup(&own, 0, 3, 22), "no policy selects c");
    }

    #[test]
    fn denial_line_names_both_identities() {
        let d = Decision {
            allowed: false,
            policy: Some(ObjectName::new("foo", "deny-sleep")),
            reason: DecisionReason::DenyMatched,
        };
        let (src, dst) = (id("foo", "sleep"), id("foo", "httpbin"));
        let pod = ObjectName::new("foo", "httpbin-0");
        let line = Denial {
            source: Some(&src),
            source_addr: Some("10.1.0.2:40000".parse().unwrap()),
            destination: Some(&dst),
            destination_pod: Some(&pod),
            destination_addr: "10.1.0.3:8080".parse().unwrap(),
            point: EnforcementPoint::Hbone,
            decision: &d,
        };
        line.log();
        assert_eq!(
            line.to_string(),
            "denied spiffe://cluster.local/ns/foo/sa/sleep (10.1.0.2:40000) -> \
             spiffe://cluster.local/ns/foo/sa/httpbin (10.1.0.3:8080, pod foo/httpbin-0) at hbone: \
             denied: DENY policy foo/deny-sleep matched"
        );
    }
}
