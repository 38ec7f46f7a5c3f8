//! The gateway's configuration: Gateway API objects (`Gateway`, `HTTPRoute`, `GRPCRoute`), TLS
//! `Secret`s and `RoutePolicy` objects read from a multi-document YAML file, judged with the
//! `gateway-api` crate's types, and compiled into an immutable routing table that the proxy
//! swaps in whole. Any bad object rejects the whole version of the file with the file, line,
//! object, field and reason; the previous table keeps serving.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use gateway_api::{gateways::Gateway, grpcroutes::GrpcRoute, httproutes::HttpRoute};
use http::{HeaderName, HeaderValue, Method};
use regex_lite::Regex;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use super::{
    jwt::JwtRule,
    limits::{RateLimit, TokenBucket},
    routes::{Entry, HostPattern, HostTable, PathMatch, RouteMatch, RouteOrigin, ValueMatch},
    status,
};
use crate::model::ObjectName;

/// Group of the Gateway API kinds.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// API version of the gateway's own `RoutePolicy`.
pub const POLICY_API_VERSION: &str = "gateway.kernmesh.io/v1alpha1";
/// Most bytes of a request body buffered so it can be retried or mirrored (Envoy's
/// `per_connection_buffer_limit_bytes` default is 1 MiB; requests over this stream through).
pub const RETRY_BUFFER: u64 = 64 * 1024;
/// Istio's default retries: 2 more attempts.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Envoy's retry budget default: retries in flight ≤ 20 % of requests in flight.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Envoy's retry backoff base interval (25 ms; the cap is 10×).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// A rejected configuration: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct GatewayConfigError {
    pub file: PathBuf,
    /// 1-based line of the object (0: unknown).
    pub line: u64,
    /// `HTTPRoute shop/web` (empty for the file itself).
    pub object: String,
    /// Dotted field path (`spec.rules[0].matches[0].path.value`), empty when none.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for GatewayConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A listener's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ListenerProtocol {
    Http,
    Https,
}

/// One listener of one Gateway.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listener {
    pub gateway: String,
    pub name: String,
    pub port: u16,
    pub protocol: ListenerProtocol,
    pub hostname: Option<String>,
    /// Which routes may attach (`allowedRoutes`).
    pub allowed: Allowed,
}

/// A certificate with the names it is served for.
#[derive(Clone, Debug)]
pub struct Cert {
    /// The listener's hostname (`None`: the port's default certificate).
    pub host: HostPattern,
    pub key: Arc<CertifiedKey>,
    /// `Secret ns/name`.
    pub source: String,
}

/// What is served on one port.
#[derive(Clone, Debug, Default)]
pub struct PortConfig {
    pub tls: bool,
    pub hosts: HostTable,
    /// SNI choices, in listener order (the first one is the default).
    pub certs: Vec<Cert>,
}

impl PortConfig {
    /// The certificate for `sni`: exact name, then the longest wildcard, then the first one.
    #[must_use]
    pub fn cert_for(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let sni = sni.map(str::to_ascii_lowercase);
        let by = |want: &dyn Fn(&HostPattern) -> bool| {
            self.certs
                .iter()
                .filter(|c| want(&c.host))
                .max_by_key(|c| match &c.host {
                    HostPattern::Wildcard(s) => s.len(),
                    _ => 0,
                })
                .map(|c| c.key.clone())
        };
        if let Some(sni) = sni.as_deref() {
            if let Some(k) = by(&|h| matches!(h, HostPattern::Exact(e) if e == sni)) {
                return Some(k);
            }
            if let Some(k) = by(&|h| matches!(h, HostPattern::Wildcard(_)) && h.matches(sni)) {
                return Some(k);
            }
        }
        self.certs.first().map(|c| c.key.clone())
    }
}

/// Header changes of `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Clone, Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Applies the changes: set replaces, add appends, remove deletes (the spec's order).
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

/// A path change (redirect or rewrite).
#[derive(Clone, Debug)]
pub enum PathChange {
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

/// `RequestRedirect`.
#[derive(Clone, Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
    pub port: Option<u16>,
    pub status: u16,
}

/// `URLRewrite`.
#[derive(Clone, Debug, Default)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
}

/// A Service port a rule sends to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub service: ObjectName,
    pub port: u16,
}

/// One `backendRef`: a Service port, or a reference the gateway cannot use (the spec's 500).
#[derive(Clone, Debug)]
pub struct WeightedBackend {
    pub target: Result<ServiceRef, String>,
    pub weight: u32,
}

/// `RequestMirror`.
#[derive(Clone, Debug)]
pub struct Mirror {
    pub target: ServiceRef,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

/// Retries of a rule (`RoutePolicy.spec.retry`; Istio's defaults otherwise).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub budget_percent: u32,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            backoff: DEFAULT_RETRY_BACKOFF,
        }
    }
}

/// What a matched rule does.
#[derive(Debug)]
pub struct RuleAction {
    /// `HTTPRoute shop/web` rule 0.
    pub route: String,
    pub grpc: bool,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
    pub backends: Vec<WeightedBackend>,
    pub total_weight: u32,
    /// `timeouts.request`: the whole request, retries included.
    pub request_timeout: Option<Duration>,
    /// `timeouts.backendRequest`: one try.
    pub backend_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub jwt: Option<Arc<JwtRule>>,
    /// One bucket for the rule (Envoy Gateway's local rate limit is per route too).
    pub route_limit: Option<TokenBucket>,
    /// A bucket per client address.
    pub client_limit: Option<super::limits::ClientBuckets>,
}

/// The whole compiled configuration, swapped in at once.
#[derive(Debug, Default)]
pub struct GatewayConfig {
    pub listeners: Vec<Listener>,
    pub ports: BTreeMap<u16, PortConfig>,
    /// Every Service port a rule can send to (the backends snapshot is built for these).
    pub services: BTreeSet<ServiceRef>,
    /// Files the configuration read besides itself (JWKS): a change reloads it.
    pub extra_files: Vec<PathBuf>,
    /// Routes that attach to no listener, with why (Accepted=False in the spec's status).
    pub unattached: Vec<String>,
    /// Status facts of every route judged (for `/routes` and the status writer).
    pub route_infos: Vec<status::RouteInfo>,
    /// Status facts of every Gateway judged.
    pub gateway_infos: Vec<status::GatewayInfo>,
    /// Objects left out, with why ([`Mode::Kubernetes`] only).
    pub rejected: Vec<String>,
}

pub use super::route_policy::{ClaimSpec, JwtSpec};
use super::route_policy::{RateSpec, RoutePolicySpec};

/// `ReferenceGrant` (`gateway.networking.k8s.io/v1beta1`): lets routes of the `from`
/// namespaces refer to the `to` objects of the grant's own namespace.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReferenceGrantSpec {
    from: Vec<GrantFrom>,
    to: Vec<GrantTo>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrantFrom {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrantTo {
    group: String,
    kind: String,
    #[serde(default)]
    name: Option<String>,
}

/// Every `ReferenceGrant`, by the namespace it lives in (the target namespace).
#[derive(Default, Debug)]
struct Grants {
    by_namespace: BTreeMap<String, Vec<ReferenceGrantSpec>>,
}

impl Grants {
    /// Whether a `from_kind` route in `from_ns` may refer to Service `name` in `to_ns` (the
    /// spec: a grant in the target namespace naming the route's group, kind and namespace, and
    /// the core Service kind, with no name or this name).
    fn allows(&self, from_kind: &str, from_ns: &str, to_ns: &str, name: &str) -> bool {
        self.by_namespace.get(to_ns).is_some_and(|grants| {
            grants.iter().any(|g| {
                g.from.iter().any(|f| {
                    f.group == GATEWAY_GROUP && f.kind == from_kind && f.namespace == from_ns
                }) && g.to.iter().any(|t| {
                    t.group.is_empty()
                        && t.kind == "Service"
                        && t.name.as_deref().is_none_or(|n| n == name)
                })
            })
        })
    }
}

/// The route a `backendRef` is resolved for.
struct RouteRef<'a> {
    kind: &'static str,
    namespace: &'a str,
    grants: &'a Grants,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct SecretDoc {
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

/// A Gateway API duration (GEP-2257: `1h`, `10s`, `500ms`, `1m30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a Gateway API duration (like 10s, 500ms, 1m30s)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (Duration::from_mins(1), 1)
        } else if rest.starts_with('h') {
            (Duration::from_hours(1), 1)
        } else {
            return Err(bad());
        };
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        rest = &rest[len..];
    }
    Ok(total)
}

/// Reads and compiles `path`.
pub fn load(path: &Path) -> Result<GatewayConfig, GatewayConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| GatewayConfigError {
        file: path.to_owned(),
        line: 0,
        object: String::new(),
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// One object (of the file, or from the API server), with where it starts.
pub struct Doc {
    /// 1-based line in the file (0: not from a file).
    pub line: u64,
    pub kind: String,
    pub name: ObjectName,
    /// The whole object (`apiVersion`, `kind`, `metadata`, `spec`).
    pub value: serde_json::Value,
}

/// Builds errors about one object.
struct At<'a> {
    file: &'a Path,
    line: u64,
    object: String,
}

impl At<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> GatewayConfigError {
        GatewayConfigError {
            file: self.file.to_owned(),
            line: self.line,
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Most YAML nodes a gateway file may have: routes are operator input, but a fuzzer (or a
/// typo'd anchor) must not make the parser allocate without bound.
const MAX_NODES: usize = 2_000_000;

/// Parses and compiles a multi-document YAML text.
pub fn parse(file: &Path, text: &str) -> Result<GatewayConfig, GatewayConfigError> {
    let whole = |reason: String, line: u64| GatewayConfigError {
        file: file.to_owned(),
        line,
        object: String::new(),
        field: String::new(),
        reason,
    };
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_nodes: MAX_NODES, max_events: 4 * MAX_NODES },
    };
    let raw: Vec<serde_saphyr::Spanned<serde_json::Value>> =
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| {
            let line = e.location().map_or(0, |l| l.line());
            whole(e.to_string(), line)
        })?;
    let mut docs = Vec::new();
    for d in raw {
        let line = d.referenced.line();
        if d.value.is_null() {
            continue;
        }
        let kind = d.value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let meta = d.value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(|n| n.as_str());
        let ns = meta
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default");
        let Some(name) = name else {
            return Err(GatewayConfigError {
                object: kind.to_owned(),
                field: "metadata.name".into(),
                ..whole("required".into(), line)
            });
        };
        docs.push(Doc {
            line,
            kind: kind.to_owned(),
            name: ObjectName::new(ns, name),
            value: d.value,
        });
    }
    compile(file, docs, Mode::File)
}

/// Deserializes `value` as `T`, naming the field that does not fit.
fn typed<T: serde::de::DeserializeOwned>(
    at: &At<'_>,
    value: serde_json::Value,
) -> Result<T, GatewayConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        at.err(
            if field == "." { String::new() } else { field },
            e.into_inner().to_string(),
        )
    })
}

fn header_name(at: &At<'_>, field: &str, n: &str) -> Result<HeaderName, GatewayConfigError> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| at.err(field, format!("{n:?} is not a valid header name")))
}

fn header_value(at: &At<'_>, field: &str, v: &str) -> Result<HeaderValue, GatewayConfigError> {
    HeaderValue::from_str(v)
        .map_err(|_| at.err(field, format!("{v:?} is not a valid header value")))
}

fn regex(at: &At<'_>, field: &str, r: &str) -> Result<Regex, GatewayConfigError> {
    // Anchored: Gateway API regex matches are full matches (RE2 `FullMatch` in Envoy).
    regex_lite::RegexBuilder::new(&format!("^(?:{r})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| at.err(field, format!("invalid regular expression: {e}")))
}

fn port(at: &At<'_>, field: &str, p: Option<i32>) -> Result<u16, GatewayConfigError> {
    let p = p.ok_or_else(|| at.err(field, "required when the backend is a Service"))?;
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| at.err(field, format!("{p} is not a port (1-65535)")))
}

/// A parent reference, reduced to what attachment needs.
struct Parent {
    gateway: ObjectName,
    section: Option<String>,
    port: Option<i32>,
}

#[expect(
    clippy::too_many_arguments,
    reason = "the fields of three generated backendRef types"
)]
/// Resolves a `backendRef` (kind Service; same namespace unless a `ReferenceGrant` in the
/// Service's namespace allows it: otherwise the spec's `RefNotPermitted`, and requests for it
/// get 500).
fn backend_ref(
    at: &At<'_>,
    field: &str,
    route: &RouteRef<'_>,
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    p: Option<i32>,
) -> Result<Result<ServiceRef, String>, GatewayConfigError> {
    if group.is_some_and(|g| !g.is_empty()) || kind.is_some_and(|k| k != "Service") {
        return Ok(Err(format!(
            "backendRef {name}: only core Services are supported (InvalidKind)"
        )));
    }
    let target_ns = namespace.unwrap_or(route.namespace);
    if target_ns != route.namespace
        && !route
            .grants
            .allows(route.kind, route.namespace, target_ns, name)
    {
        return Ok(Err(format!(
            "backendRef {target_ns}/{name}: no ReferenceGrant in {target_ns} lets {} of {} refer to it (RefNotPermitted)",
            route.kind, route.namespace
        )));
    }
    Ok(Ok(ServiceRef {
        service: ObjectName::new(target_ns, name),
        port: port(at, &format!("{field}.port"), p)?,
    }))
}

fn mirror_share(
    at: &At<'_>,
    field: &str,
    percent: Option<i32>,
    fraction: Option<(i32, Option<i32>)>,
) -> Result<u32, GatewayConfigError> {
    let bad = |r: &str| at.err(field, r.to_owned());
    match (percent, fraction) {
        (Some(_), Some(_)) => Err(bad("set percent or fraction, not both")),
        (Some(p), None) => u32::try_from(p)
            .ok()
            .filter(|p| *p <= 100)
            .map(|p| p * 10_000)
            .ok_or_else(|| bad("percent must be 0-100")),
        (None, Some((n, d))) => {
            let d = d.unwrap_or(100);
            if d <= 0 || n < 0 || n > d {
                return Err(bad(
                    "fraction needs 0 <= numerator <= denominator, denominator > 0",
                ));
            }
            Ok(u32::try_from(i64::from(n) * 1_000_000 / i64::from(d)).unwrap_or(1_000_000))
        }
        (None, None) => Ok(1_000_000),
    }
}

/// Policies by the route they target.
#[derive(Default)]
struct Policies {
    by_route: BTreeMap<(String, ObjectName), PolicyParts>,
}

#[derive(Default, Clone)]
struct PolicyParts {
    jwt: Option<Arc<JwtRule>>,
    route_limit: Option<RateLimit>,
    client_limit: Option<RateLimit>,
    retry: RetryPolicy,
}

fn rate(at: &At<'_>, field: &str, r: &RateSpec) -> Result<RateLimit, GatewayConfigError> {
    let per = parse_duration(&r.per).map_err(|e| at.err(format!("{field}.per"), e))?;
    if r.requests == 0 || per.is_zero() {
        return Err(at.err(field, "requests and per must be positive"));
    }
    Ok(RateLimit {
        requests: r.requests,
        per,
    })
}

fn compile_policy(
    at: &At<'_>,
    ns: &str,
    spec: RoutePolicySpec,
    policies: &mut Policies,
    extra_files: &mut Vec<PathBuf>,
) -> Result<(), GatewayConfigError> {
    let mut parts = PolicyParts::default();
    if let Some(j) = spec.jwt {
        extra_files.extend(j.jwks_file.iter().chain(&j.jwks_ca_file).cloned());
        let field = if j.jwks_uri.is_some() {
            "spec.jwt.jwksUri"
        } else {
            "spec.jwt.jwksFile"
        };
        let rule = JwtRule::load(&j).map_err(|e| at.err(field, e.to_string()))?;
        parts.jwt = Some(Arc::new(rule));
    }
    if let Some(r) = spec.rate_limit {
        if let Some(route) = &r.route {
            parts.route_limit = Some(rate(at, "spec.rateLimit.route", route)?);
        }
        if let Some(client) = &r.client {
            parts.client_limit = Some(rate(at, "spec.rateLimit.client", client)?);
        }
    }
    if let Some(r) = spec.retry {
        if r.budget_percent.is_some_and(|p| p > 100) {
            return Err(at.err("spec.retry.budgetPercent", "must be 0-100"));
        }
        parts.retry = RetryPolicy {
            attempts: r.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS).min(10),
            budget_percent: r.budget_percent.unwrap_or(DEFAULT_RETRY_BUDGET_PERCENT),
            backoff: match r.backoff {
                Some(b) => parse_duration(&b).map_err(|e| at.err("spec.retry.backoff", e))?,
                None => DEFAULT_RETRY_BACKOFF,
            },
        };
    }
    if spec.target_refs.is_empty() {
        return Err(at.err("spec.targetRefs", "at least one target is required"));
    }
    for (i, t) in spec.target_refs.iter().enumerate() {
        if t.group.as_deref().is_some_and(|g| g != GATEWAY_GROUP)
            || !matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute")
        {
            return Err(at.err(
                format!("spec.targetRefs[{i}]"),
                "targets are HTTPRoute or GRPCRoute (group gateway.networking.k8s.io)",
            ));
        }
        let key = (t.kind.clone(), ObjectName::new(ns, &t.name));
        if policies.by_route.contains_key(&key) {
            return Err(at.err(
                format!("spec.targetRefs[{i}]"),
                format!("{} {} already has a RoutePolicy", t.kind, key.1),
            ));
        }
        policies.by_route.insert(key, parts.clone());
    }
    Ok(())
}

fn load_cert(at: &At<'_>, s: &SecretDoc) -> Result<Arc<CertifiedKey>, GatewayConfigError> {
    let get = |k: &str| -> Result<Vec<u8>, GatewayConfigError> {
        if let Some(v) = s.string_data.get(k) {
            return Ok(v.clone().into_bytes());
        }
        let v = s
            .data
            .get(k)
            .ok_or_else(|| at.err(format!("data.{k}"), "required for a TLS Secret"))?;
        base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .map_err(|e| at.err(format!("data.{k}"), format!("not base64: {e}")))
    };
    let crt = get("tls.crt")?;
    let key = get("tls.key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
        .collect::<Result<_, _>>()
        .map_err(|e| at.err("data.tls.crt", format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(at.err("data.tls.crt", "no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| at.err("data.tls.key", format!("not a PEM private key: {e}")))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| at.err("data.tls.key", format!("unsupported key: {e}")))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| at.err("data.tls.key", format!("does not match tls.crt: {e}")))?;
    Ok(Arc::new(ck))
}

/// How strictly objects are judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A file: any bad object rejects the whole version (the previous one keeps serving), so a
    /// typo never half-applies.
    File,
    /// Objects from the API server: a bad object is left out, its status says why, and the
    /// others serve (Envoy Gateway and Istio do the same: one user's bad route must not stop
    /// everyone's routes). Routes name only Gateways given (the source passes the Gateways of
    /// our `GatewayClass`); parents that are other controllers' Gateways get no status from us.
    Kubernetes,
}

/// Which namespaces' routes a listener admits (`allowedRoutes.namespaces.from`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum AllowedFrom {
    /// The spec's default: the Gateway's own namespace.
    #[default]
    Same,
    All,
    /// Namespaces whose labels match `allowedRoutes.namespaces.selector` (a Kubernetes label
    /// selector: `matchLabels` and `matchExpressions`, all of which must hold). Every namespace also carries
    /// `kubernetes.io/metadata.name: <name>`, as the API server sets it.
    Selector(kube::core::Selector),
}

/// Namespace name → labels, from the `Namespace` objects given to the compiler.
pub type NamespaceLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The label the API server puts on every namespace (Kubernetes ≥ 1.21): its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Whether namespace `ns` matches `selector` (its labels from `namespaces`, plus its name label).
fn namespace_matches(
    selector: &kube::core::Selector,
    ns: &str,
    namespaces: &NamespaceLabels,
) -> bool {
    use kube::core::SelectorExt as _;
    let mut labels = namespaces.get(ns).cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned());
    selector.matches(&labels)
}

/// The listener's namespace selector as a Kubernetes label selector.
fn namespace_selector(
    s: &gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesSelector,
) -> Result<kube::core::Selector, String> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    kube::core::Selector::try_from(LabelSelector {
        match_labels: s.match_labels.clone(),
        match_expressions: s.match_expressions.as_ref().map(|es| {
            es.iter()
                .map(|e| LabelSelectorRequirement {
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                    values: e.values.clone(),
                })
                .collect()
        }),
    })
    .map_err(|e| e.to_string())
}

/// A listener's `allowedRoutes`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Allowed {
    pub from: AllowedFrom,
    /// Route kinds (empty: every kind the protocol serves, `HTTPRoute` and `GRPCRoute`).
    pub kinds: Vec<String>,
}

/// The facts of one listener that compiled, or why it did not.
type ListenerOutcome =
    Result<(Listener, Vec<Cert>), (&'static str, &'static str, GatewayConfigError)>;

/// Compiles listener `i` of Gateway `gname`.
#[expect(
    clippy::result_large_err,
    reason = "once per listener per configuration version, never per request"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one field of the listener after the other"
)]
fn compile_listener(
    at: &At<'_>,
    gname: &ObjectName,
    i: usize,
    l: &gateway_api::gateways::GatewayListeners,
    secrets: &BTreeMap<ObjectName, (At<'_>, SecretDoc)>,
) -> ListenerOutcome {
    use gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesFrom as From;
    use status::reason as R;
    let field = format!("spec.listeners[{i}]");
    let port = u16::try_from(l.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            (
                R::PORT_UNAVAILABLE,
                R::ACCEPTED,
                at.err(format!("{field}.port"), "not a port (1-65535)"),
            )
        })?;
    let protocol = match l.protocol.as_str() {
        "HTTP" => ListenerProtocol::Http,
        "HTTPS" => ListenerProtocol::Https,
        other => {
            return Err((
                R::UNSUPPORTED_PROTOCOL,
                R::ACCEPTED,
                at.err(
                    format!("{field}.protocol"),
                    format!("{other:?} is not served (HTTP or HTTPS)"),
                ),
            ));
        }
    };
    let host = l
        .hostname
        .as_deref()
        .map_or(HostPattern::Any, HostPattern::parse);
    let mut certs = Vec::new();
    if protocol == ListenerProtocol::Https {
        let cert_err = |f: String, reason: String| {
            (
                R::INVALID_CERTIFICATE_REF,
                R::RESOLVED_REFS,
                at.err(f, reason),
            )
        };
        let tls = l
            .tls
            .as_ref()
            .ok_or_else(|| cert_err(format!("{field}.tls"), "required for HTTPS".into()))?;
        if tls.mode.as_ref().is_some_and(|m| {
            matches!(
                m,
                gateway_api::gateways::GatewayListenersTlsMode::Passthrough
            )
        }) {
            return Err((
                R::UNSUPPORTED_VALUE,
                R::ACCEPTED,
                at.err(
                    format!("{field}.tls.mode"),
                    "Passthrough is not served (Terminate)",
                ),
            ));
        }
        let refs = tls.certificate_refs.as_deref().unwrap_or_default();
        if refs.is_empty() {
            return Err(cert_err(
                format!("{field}.tls.certificateRefs"),
                "at least one Secret is required".into(),
            ));
        }
        for (j, r) in refs.iter().enumerate() {
            let f = format!("{field}.tls.certificateRefs[{j}]");
            if r.kind.as_deref().is_some_and(|k| k != "Secret")
                || r.group.as_deref().is_some_and(|g| !g.is_empty())
            {
                return Err(cert_err(
                    f,
                    "only core Secrets are supported (InvalidCertificateRef)".into(),
                ));
            }
            let sname =
                ObjectName::new(r.namespace.as_deref().unwrap_or(&gname.namespace), &r.name);
            let (sat, secret) = secrets.get(&sname).ok_or_else(|| {
                cert_err(
                    f.clone(),
                    format!("Secret {sname} is not found (InvalidCertificateRef)"),
                )
            })?;
            let key = load_cert(sat, secret).map_err(|e| {
                cert_err(
                    f.clone(),
                    format!("Secret {sname}: {}: {}", e.field, e.reason),
                )
            })?;
            certs.push(Cert {
                host: host.clone(),
                key,
                source: format!("Secret {sname}"),
            });
        }
    }
    let allowed = match l.allowed_routes.as_ref() {
        None => Allowed::default(),
        Some(allowed) => Allowed {
            from: match allowed.namespaces.as_ref().and_then(|n| n.from.as_ref()) {
                None | Some(From::Same) => AllowedFrom::Same,
                Some(From::All) => AllowedFrom::All,
                Some(From::Selector) => {
                    let selector_field = format!("{field}.allowedRoutes.namespaces.selector");
                    let invalid = |why: String| {
                        (
                            R::UNSUPPORTED_VALUE,
                            R::ACCEPTED,
                            at.err(selector_field.clone(), why),
                        )
                    };
                    let s = allowed
                        .namespaces
                        .as_ref()
                        .and_then(|n| n.selector.as_ref())
                        .ok_or_else(|| invalid("required with from: Selector".into()))?;
                    AllowedFrom::Selector(namespace_selector(s).map_err(invalid)?)
                }
            },
            kinds: allowed
                .kinds
                .iter()
                .flatten()
                .filter(|k| k.group.as_deref().is_none_or(|g| g == GATEWAY_GROUP))
                .map(|k| k.kind.clone())
                .collect(),
        },
    };
    Ok((
        Listener {
            gateway: gname.to_string(),
            name: l.name.clone(),
            port,
            protocol,
            hostname: l.hostname.clone(),
            allowed,
        },
        certs,
    ))
}

/// Why a listener does not admit a route of `kind` from `ns` (`None`: it does).
fn refuses(
    l: &Listener,
    gateway: &ObjectName,
    kind: &str,
    ns: &str,
    namespaces: &NamespaceLabels,
) -> Option<String> {
    let ns_ok = match &l.allowed.from {
        AllowedFrom::Same => ns == gateway.namespace,
        AllowedFrom::All => true,
        AllowedFrom::Selector(s) => namespace_matches(s, ns, namespaces),
    };
    if !ns_ok {
        return Some(format!(
            "listener {} admits routes from {}",
            l.name,
            match &l.allowed.from {
                AllowedFrom::Same => format!("namespace {} only", gateway.namespace),
                AllowedFrom::Selector(s) => format!("namespaces labelled {s}, not {ns}"),
                AllowedFrom::All => "all namespaces".into(),
            },
        ));
    }
    if !l.allowed.kinds.is_empty() && !l.allowed.kinds.iter().any(|k| k == kind) {
        return Some(format!(
            "listener {} admits kinds {:?}, not {kind}",
            l.name, l.allowed.kinds
        ));
    }
    None
}

/// A `backendRef` problem, with the spec's reason read off the message [`backend_ref`] wrote.
fn ref_problem(message: &str) -> status::Cond {
    let reason = if message.contains("(InvalidKind)") {
        status::reason::INVALID_KIND
    } else if message.contains("(RefNotPermitted)") {
        status::reason::REF_NOT_PERMITTED
    } else {
        status::reason::BACKEND_NOT_FOUND
    };
    status::Cond::no(reason, message)
}

/// A match for people (`meshctl routes`).
fn describe_match(m: &RouteMatch) -> String {
    use std::fmt::Write as _;
    let unanchor = |r: &Regex| {
        let s = r.as_str();
        s.strip_prefix("^(?:")
            .and_then(|s| s.strip_suffix(")$"))
            .unwrap_or(s)
            .to_owned()
    };
    let mut out = match &m.path {
        PathMatch::Exact(p) => format!("path = {p}"),
        PathMatch::Prefix(p) => format!("path /{}*", p.trim_start_matches('/')),
        PathMatch::Regex(r) => format!("path ~ {}", unanchor(r)),
    };
    if let Some(method) = &m.method {
        let _ = write!(out, ", method {method}");
    }
    for (n, v) in &m.headers {
        match v {
            ValueMatch::Exact(v) => {
                let _ = write!(out, ", header {n}={v}");
            }
            ValueMatch::Regex(r) => {
                let _ = write!(out, ", header {n}~{}", unanchor(r));
            }
        }
    }
    for (n, v) in &m.query {
        match v {
            ValueMatch::Exact(v) => {
                let _ = write!(out, ", query {n}={v}");
            }
            ValueMatch::Regex(r) => {
                let _ = write!(out, ", query {n}~{}", unanchor(r));
            }
        }
    }
    out
}

/// The rules of a compiled route, for the report.
fn rule_infos(rules: &CompiledRules) -> Vec<status::RuleInfo> {
    rules
        .iter()
        .map(|(matches, a)| {
            let mut filters = Vec::new();
            if a.redirect.is_some() {
                filters.push("RequestRedirect".to_owned());
            }
            if a.rewrite.is_some() {
                filters.push("URLRewrite".to_owned());
            }
            if a.request_headers.is_some() {
                filters.push("RequestHeaderModifier".to_owned());
            }
            if a.response_headers.is_some() {
                filters.push("ResponseHeaderModifier".to_owned());
            }
            for m in &a.mirrors {
                filters.push(format!(
                    "RequestMirror {}:{}",
                    m.target.service, m.target.port
                ));
            }
            status::RuleInfo {
                matches: matches.iter().map(describe_match).collect(),
                backends: a
                    .backends
                    .iter()
                    .map(|b| match &b.target {
                        Ok(s) => status::BackendInfo {
                            target: format!("{}:{}", s.service, s.port),
                            weight: b.weight,
                            problem: None,
                            service: Some((s.service.clone(), s.port)),
                        },
                        Err(e) => status::BackendInfo {
                            target: e
                                .strip_prefix("backendRef ")
                                .and_then(|s| s.split(':').next())
                                .unwrap_or(e)
                                .to_owned(),
                            weight: b.weight,
                            problem: Some(ref_problem(e)),
                            service: None,
                        },
                    })
                    .collect(),
                filters,
            }
        })
        .collect()
}

/// `spec.parentRefs` read from the raw object (for a route whose spec does not parse).
fn raw_parents(value: &serde_json::Value, ns: &str) -> Vec<Parent> {
    value
        .pointer("/spec/parentRefs")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(Parent {
                gateway: ObjectName::new(
                    p.get("namespace").and_then(|n| n.as_str()).unwrap_or(ns),
                    p.get("name")?.as_str()?,
                ),
                section: p
                    .get("sectionName")
                    .and_then(|s| s.as_str())
                    .map(str::to_owned),
                port: p
                    .get("port")
                    .and_then(serde_json::Value::as_i64)
                    .and_then(|p| i32::try_from(p).ok()),
            })
        })
        .collect()
}

/// Compiles objects read from the API server (see [`Mode::Kubernetes`]); errors name
/// `kubernetes` as their file.
#[must_use]
pub fn compile_objects(docs: Vec<Doc>) -> GatewayConfig {
    match compile(Path::new("kubernetes"), docs, Mode::Kubernetes) {
        Ok(cfg) => cfg,
        // Never: in this mode every problem is recorded and the object left out.
        Err(e) => GatewayConfig {
            rejected: vec![e.to_string()],
            ..GatewayConfig::default()
        },
    }
}

/// Turns the objects into the table.
#[expect(
    clippy::too_many_lines,
    reason = "one pass over the object kinds, in order"
)]
fn compile(file: &Path, docs: Vec<Doc>, mode: Mode) -> Result<GatewayConfig, GatewayConfigError> {
    use status::{Cond, GatewayInfo, ListenerInfo, ParentInfo, RouteInfo, reason as R};
    let lenient = mode == Mode::Kubernetes;
    // A file fails whole; the API server's objects fail one by one.
    let reject = |cfg: &mut GatewayConfig, e: GatewayConfigError| {
        if lenient {
            tracing::warn!(error = %e, "object left out of the gateway configuration");
            cfg.rejected.push(e.to_string());
            Ok(())
        } else {
            Err(e)
        }
    };
    let mut cfg = GatewayConfig::default();
    let mut gateways: Vec<(At<'_>, ObjectName, Option<i64>, Gateway)> = Vec::new();
    let mut routes: Vec<(At<'_>, ObjectName, Option<i64>, RouteKind)> = Vec::new();
    let mut secrets: BTreeMap<ObjectName, (At<'_>, SecretDoc)> = BTreeMap::new();
    let mut policies = Policies::default();
    let mut grants = Grants::default();
    let mut namespaces = NamespaceLabels::new();
    let mut seen = BTreeSet::new();
    // Every Gateway given, compiled or not: a route's parent among them is ours.
    let mut gateway_names = BTreeSet::new();
    for d in docs {
        let at = At {
            file,
            line: d.line,
            object: format!("{} {}", d.kind, d.name),
        };
        if !seen.insert((d.kind.clone(), d.name.clone())) {
            reject(
                &mut cfg,
                at.err("metadata.name", "defined twice in this file"),
            )?;
            continue;
        }
        let generation = d
            .value
            .pointer("/metadata/generation")
            .and_then(serde_json::Value::as_i64);
        let api = d
            .value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        let group = api.rsplit_once('/').map_or("", |(g, _)| g);
        match (d.kind.as_str(), group) {
            ("Gateway", GATEWAY_GROUP) => {
                gateway_names.insert(d.name.clone());
                match typed::<Gateway>(&at, d.value) {
                    Ok(g) => gateways.push((at, d.name, generation, g)),
                    Err(e) => {
                        cfg.gateway_infos.push(GatewayInfo {
                            name: d.name,
                            generation,
                            accepted: Cond::no(R::INVALID, e.to_string()),
                            listeners: Vec::new(),
                        });
                        reject(&mut cfg, e)?;
                    }
                }
            }
            ("HTTPRoute" | "GRPCRoute", GATEWAY_GROUP) => {
                let parents = raw_parents(&d.value, &d.name.namespace);
                let parsed = if d.kind == "HTTPRoute" {
                    typed::<HttpRoute>(&at, d.value).map(|r| RouteKind::Http(Box::new(r)))
                } else {
                    typed::<GrpcRoute>(&at, d.value).map(|r| RouteKind::Grpc(Box::new(r)))
                };
                match parsed {
                    Ok(r) => routes.push((at, d.name, generation, r)),
                    Err(e) => {
                        cfg.route_infos.push(RouteInfo {
                            kind: d.kind.clone(),
                            name: d.name,
                            generation,
                            hostnames: Vec::new(),
                            parents: parents
                                .into_iter()
                                .map(|p| ParentInfo {
                                    gateway: p.gateway,
                                    section: p.section,
                                    port: p.port,
                                    accepted: Cond::no(R::UNSUPPORTED_VALUE, e.to_string()),
                                })
                                .collect(),
                            resolved_refs: Cond::yes(R::RESOLVED_REFS),
                            rules: Vec::new(),
                        });
                        reject(&mut cfg, e)?;
                    }
                }
            }
            ("ReferenceGrant", GATEWAY_GROUP) => {
                let spec = d
                    .value
                    .get("spec")
                    .cloned()
                    .ok_or_else(|| at.err("spec", "required"));
                let spec = spec.and_then(|spec| {
                    serde_path_to_error::deserialize::<_, ReferenceGrantSpec>(spec).map_err(|e| {
                        at.err(format!("spec.{}", e.path()), e.into_inner().to_string())
                    })
                });
                match spec {
                    Ok(spec) => grants
                        .by_namespace
                        .entry(d.name.namespace.clone())
                        .or_default()
                        .push(spec),
                    Err(e) => reject(&mut cfg, e)?,
                }
            }
            // Only its labels matter (listeners' namespace selectors).
            ("Namespace", "") => {
                let name = d
                    .value
                    .pointer("/metadata/name")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or(&d.name.name)
                    .to_owned();
                match d
                    .value
                    .pointer("/metadata/labels")
                    .cloned()
                    .map(serde_json::from_value)
                {
                    None => {
                        namespaces.insert(name, BTreeMap::new());
                    }
                    Some(Ok(labels)) => {
                        namespaces.insert(name, labels);
                    }
                    Some(Err(e)) => reject(&mut cfg, at.err("metadata.labels", e.to_string()))?,
                }
            }
            ("Secret", "") => match typed::<SecretDoc>(&at, d.value) {
                Ok(s) => {
                    secrets.insert(d.name, (at, s));
                }
                Err(e) => reject(&mut cfg, e)?,
            },
            ("RoutePolicy", "gateway.kernmesh.io") => {
                let spec = d
                    .value
                    .get("spec")
                    .cloned()
                    .ok_or_else(|| at.err("spec", "required"));
                let done = spec.and_then(|spec| {
                    let spec: RoutePolicySpec =
                        serde_path_to_error::deserialize(spec).map_err(|e| {
                            at.err(format!("spec.{}", e.path()), e.into_inner().to_string())
                        })?;
                    compile_policy(
                        &at,
                        &d.name.namespace,
                        spec,
                        &mut policies,
                        &mut cfg.extra_files,
                    )
                });
                if let Err(e) = done {
                    reject(&mut cfg, e)?;
                }
            }
            (kind, _) => {
                reject(
                    &mut cfg,
                    at.err(
                        "kind",
                        format!(
                            "{kind:?} ({api}) is not served: use Gateway, HTTPRoute, GRPCRoute ({GATEWAY_GROUP}/v1), ReferenceGrant ({GATEWAY_GROUP}/v1beta1), Secret (v1) or RoutePolicy ({POLICY_API_VERSION})"
                        ),
                    ),
                )?;
            }
        }
    }
    // Listeners, with their certificates.
    for (at, gname, generation, g) in &gateways {
        let mut infos = Vec::new();
        for (i, l) in g.spec.listeners.iter().enumerate() {
            let mut outcome = compile_listener(at, gname, i, l, &secrets);
            if let Ok((listener, _)) = &outcome {
                let port = listener.port;
                let tls = listener.protocol == ListenerProtocol::Https;
                if cfg.listeners.iter().any(|x| x.port == port)
                    && cfg.ports.get(&port).is_some_and(|pc| pc.tls != tls)
                {
                    outcome = Err((
                        R::PORT_UNAVAILABLE,
                        R::ACCEPTED,
                        at.err(
                            format!("spec.listeners[{i}].protocol"),
                            format!("port {port} already has a listener of the other protocol"),
                        ),
                    ));
                }
            }
            match outcome {
                Ok((listener, certs)) => {
                    let pc = cfg.ports.entry(listener.port).or_default();
                    pc.tls = listener.protocol == ListenerProtocol::Https;
                    pc.certs.extend(certs);
                    infos.push(ListenerInfo {
                        name: listener.name.clone(),
                        port: i32::from(listener.port),
                        protocol: l.protocol.clone(),
                        attached_routes: 0,
                        accepted: Cond::yes(R::ACCEPTED),
                        resolved_refs: Cond::yes(R::RESOLVED_REFS),
                    });
                    cfg.listeners.push(listener);
                }
                Err((reason, condition, e)) => {
                    let bad = Cond::no(reason, format!("{}: {}", e.field, e.reason));
                    let (accepted, resolved_refs) = if condition == R::RESOLVED_REFS {
                        (Cond::yes(R::ACCEPTED), bad)
                    } else {
                        (bad, Cond::yes(R::RESOLVED_REFS))
                    };
                    infos.push(ListenerInfo {
                        name: l.name.clone(),
                        port: l.port,
                        protocol: l.protocol.clone(),
                        attached_routes: 0,
                        accepted,
                        resolved_refs,
                    });
                    reject(&mut cfg, e)?;
                }
            }
        }
        let bad: Vec<&str> = infos
            .iter()
            .filter(|l| !(l.accepted.status && l.resolved_refs.status))
            .map(|l| l.name.as_str())
            .collect();
        cfg.gateway_infos.push(GatewayInfo {
            name: gname.clone(),
            generation: *generation,
            accepted: if bad.is_empty() {
                Cond::yes(R::ACCEPTED)
            } else {
                // The spec: Accepted stays True while some listener is valid; the reason
                // says some are not.
                Cond {
                    status: bad.len() < infos.len(),
                    reason: "ListenersNotValid".into(),
                    message: format!("listeners not valid: {}", bad.join(", ")),
                }
            },
            listeners: infos,
        });
    }
    // Routes, attached to the listeners their parentRefs select.
    for (at, rname, generation, route) in &routes {
        let (kind, created, parents, hostnames) = route.header(rname);
        let policy = policies
            .by_route
            .get(&(kind.to_owned(), rname.clone()))
            .cloned()
            .unwrap_or_default();
        let rules = match route.compile(at, rname, &policy, &grants, &mut cfg.services) {
            Ok(rules) => rules,
            Err(e) => {
                cfg.route_infos.push(RouteInfo {
                    kind: kind.to_owned(),
                    name: rname.clone(),
                    generation: *generation,
                    hostnames: hostnames.clone(),
                    parents: parents
                        .into_iter()
                        .map(|p| ParentInfo {
                            gateway: p.gateway,
                            section: p.section,
                            port: p.port,
                            accepted: Cond::no(R::UNSUPPORTED_VALUE, e.to_string()),
                        })
                        .collect(),
                    resolved_refs: Cond::yes(R::RESOLVED_REFS),
                    rules: Vec::new(),
                });
                reject(&mut cfg, e)?;
                continue;
            }
        };
        let mut parent_infos = Vec::new();
        let rhosts: Vec<HostPattern> = if hostnames.is_empty() {
            vec![HostPattern::Any]
        } else {
            hostnames.iter().map(|h| HostPattern::parse(h)).collect()
        };
        for p in &parents {
            let gateway = p.gateway.to_string();
            let selected: Vec<&Listener> = cfg
                .listeners
                .iter()
                .filter(|l| {
                    l.gateway == gateway
                        && p.section.as_deref().is_none_or(|s| s == l.name)
                        && p.port.is_none_or(|port| port == i32::from(l.port))
                })
                .collect();
            let allowed: Vec<&Listener> = selected
                .iter()
                .copied()
                .filter(|l| refuses(l, &p.gateway, kind, &rname.namespace, &namespaces).is_none())
                .collect();
            let mut attach: Vec<(u16, HostPattern)> = Vec::new();
            for l in &allowed {
                let lhost = l
                    .hostname
                    .as_deref()
                    .map_or(HostPattern::Any, HostPattern::parse);
                for rh in &rhosts {
                    if let Some(h) = HostPattern::intersect(&lhost, rh) {
                        attach.push((l.port, h));
                    }
                }
            }
            let accepted = if selected.is_empty() {
                Cond::no(
                    R::NO_MATCHING_PARENT,
                    if gateway_names.contains(&p.gateway) {
                        format!(
                            "Gateway {} has no valid listener{}{}",
                            p.gateway,
                            p.section
                                .as_deref()
                                .map(|s| format!(" named {s}"))
                                .unwrap_or_default(),
                            p.port.map(|s| format!(" on port {s}")).unwrap_or_default()
                        )
                    } else {
                        format!("Gateway {} not found", p.gateway)
                    },
                )
            } else if allowed.is_empty() {
                Cond::no(
                    R::NOT_ALLOWED_BY_LISTENERS,
                    selected
                        .iter()
                        .filter_map(|l| refuses(l, &p.gateway, kind, &rname.namespace, &namespaces))
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            } else if attach.is_empty() {
                Cond::no(
                    R::NO_MATCHING_LISTENER_HOSTNAME,
                    format!(
                        "no listener hostname of Gateway {} intersects {hostnames:?}",
                        p.gateway
                    ),
                )
            } else {
                Cond::yes(R::ACCEPTED)
            };
            if !accepted.status && (!lenient || gateway_names.contains(&p.gateway)) {
                cfg.unattached.push(format!(
                    "{kind} {rname}: parent {}: {} ({})",
                    p.gateway, accepted.message, accepted.reason
                ));
            }
            parent_infos.push(ParentInfo {
                gateway: p.gateway.clone(),
                section: p.section.clone(),
                port: p.port,
                accepted,
            });
            for (port, h) in attach {
                // Listeners enter `cfg.listeners` together with their port's entry.
                let pc = cfg.ports.entry(port).or_default();
                for (ri, (matches, action)) in rules.iter().enumerate() {
                    for (mi, m) in matches.iter().enumerate() {
                        pc.hosts.add(
                            h.clone(),
                            Entry {
                                matcher: m.clone(),
                                origin: RouteOrigin {
                                    created: created.clone(),
                                    name: rname.to_string(),
                                    rule: ri,
                                    matched: mi,
                                },
                                action: action.clone(),
                            },
                        );
                    }
                }
            }
        }
        cfg.route_infos.push(RouteInfo {
            kind: kind.to_owned(),
            name: rname.clone(),
            generation: *generation,
            hostnames,
            parents: parent_infos,
            resolved_refs: Cond::yes(R::RESOLVED_REFS),
            rules: rule_infos(&rules),
        });
    }
    if lenient {
        // Parents that are not Gateways of ours belong to other controllers: no status here.
        for r in &mut cfg.route_infos {
            r.parents.retain(|p| gateway_names.contains(&p.gateway));
        }
        cfg.route_infos.retain(|r| !r.parents.is_empty());
    }
    for pc in cfg.ports.values_mut() {
        pc.hosts.finish();
        // Two listeners of one port with the same hostname would have to share a
        // certificate; the first one's certificate is served (listed first).
        // Entries whose hostname is more specific than any certificate use the default.
    }
    Ok(cfg)
}

/// An `HTTPRoute` or a `GRPCRoute`.
enum RouteKind {
    Http(Box<HttpRoute>),
    Grpc(Box<GrpcRoute>),
}

type CompiledRules = Vec<(Vec<RouteMatch>, Arc<RuleAction>)>;

impl RouteKind {
    fn header(
        &self,
        name: &ObjectName,
    ) -> (&'static str, Option<String>, Vec<Parent>, Vec<String>) {
        let parent =
            |gname: &str, ns: Option<&str>, section: Option<&String>, port: Option<i32>| Parent {
                gateway: ObjectName::new(ns.unwrap_or(&name.namespace), gname),
                section: section.cloned(),
                port,
            };
        match self {
            Self::Http(r) => (
                "HTTPRoute",
                r.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string()),
                r.spec
                    .parent_refs
                    .iter()
                    .flatten()
                    .map(|p| {
                        parent(
                            &p.name,
                            p.namespace.as_deref(),
                            p.section_name.as_ref(),
                            p.port,
                        )
                    })
                    .collect(),
                r.spec.hostnames.clone().unwrap_or_default(),
            ),
            Self::Grpc(r) => (
                "GRPCRoute",
                r.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string()),
                r.spec
                    .parent_refs
                    .iter()
                    .flatten()
                    .map(|p| {
                        parent(
                            &p.name,
                            p.namespace.as_deref(),
                            p.section_name.as_ref(),
                            p.port,
                        )
                    })
                    .collect(),
                r.spec.hostnames.clone().unwrap_or_default(),
            ),
        }
    }

    fn compile(
        &self,
        at: &At<'_>,
        name: &ObjectName,
        policy: &PolicyParts,
        grants: &Grants,
        services: &mut BTreeSet<ServiceRef>,
    ) -> Result<CompiledRules, GatewayConfigError> {
        match self {
            Self::Http(r) => compile_http(at, name, r, policy, grants, services),
            Self::Grpc(r) => compile_grpc(at, name, r, policy, grants, services),
        }
    }
}

fn new_action(route: String, grpc: bool, policy: &PolicyParts) -> RuleAction {
    RuleAction {
        route,
        grpc,
        request_headers: None,
        response_headers: None,
        redirect: None,
        rewrite: None,
        mirrors: Vec::new(),
        backends: Vec::new(),
        total_weight: 0,
        request_timeout: None,
        backend_timeout: None,
        retry: policy.retry,
        jwt: policy.jwt.clone(),
        route_limit: policy.route_limit.map(TokenBucket::new),
        client_limit: policy.client_limit.map(super::limits::ClientBuckets::new),
    }
}

/// `set`/`add`/`remove` lists of a header modifier, with the field prefix for errors.
fn modifier<'a>(
    at: &At<'_>,
    field: &str,
    set: impl Iterator<Item = (&'a str, &'a str)>,
    add: impl Iterator<Item = (&'a str, &'a str)>,
    remove: impl Iterator<Item = &'a str>,
) -> Result<HeaderModifier, GatewayConfigError> {
    let mut m = HeaderModifier::default();
    for (i, (n, v)) in set.enumerate() {
        let f = format!("{field}.set[{i}]");
        m.set
            .push((header_name(at, &f, n)?, header_value(at, &f, v)?));
    }
    for (i, (n, v)) in add.enumerate() {
        let f = format!("{field}.add[{i}]");
        m.add
            .push((header_name(at, &f, n)?, header_value(at, &f, v)?));
    }
    for (i, n) in remove.enumerate() {
        m.remove
            .push(header_name(at, &format!("{field}.remove[{i}]"), n)?);
    }
    Ok(m)
}

fn path_change(
    at: &At<'_>,
    field: &str,
    full: Option<&String>,
    prefix: Option<&String>,
    prefix_type: bool,
    has_prefix_match: bool,
) -> Result<PathChange, GatewayConfigError> {
    if prefix_type {
        if !has_prefix_match {
            return Err(at.err(
                field,
                "ReplacePrefixMatch needs a PathPrefix match in every match of the rule",
            ));
        }
        let p = prefix.ok_or_else(|| at.err(format!("{field}.replacePrefixMatch"), "required"))?;
        Ok(PathChange::Prefix(p.clone()))
    } else {
        let p = full.ok_or_else(|| at.err(format!("{field}.replaceFullPath"), "required"))?;
        Ok(PathChange::Full(p.clone()))
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one field of the HTTPRoute rule after the other"
)]
fn compile_http(
    at: &At<'_>,
    name: &ObjectName,
    r: &HttpRoute,
    policy: &PolicyParts,
    grants: &Grants,
    services: &mut BTreeSet<ServiceRef>,
) -> Result<CompiledRules, GatewayConfigError> {
    use gateway_api::httproutes::{
        HttpRouteRulesFiltersRequestRedirectPathType as RedirectPathType,
        HttpRouteRulesFiltersRequestRedirectScheme as Scheme, HttpRouteRulesFiltersType as F,
        HttpRouteRulesFiltersUrlRewritePathType as RewritePathType,
        HttpRouteRulesMatchesHeadersType as HType, HttpRouteRulesMatchesPathType as PType,
        HttpRouteRulesMatchesQueryParamsType as QType,
    };
    let route = RouteRef {
        kind: "HTTPRoute",
        namespace: &name.namespace,
        grants,
    };
    let mut out = Vec::new();
    let default_rule = [gateway_api::httproutes::HttpRouteRules::default()];
    let rules = r.spec.rules.as_deref().unwrap_or(&default_rule);
    for (ri, rule) in rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut matches = Vec::new();
        let given = rule.matches.as_deref().unwrap_or_default();
        let default_match = [gateway_api::httproutes::HttpRouteRulesMatches::default()];
        let given = if given.is_empty() {
            &default_match[..]
        } else {
            given
        };
        let mut all_prefix = true;
        for (mi, m) in given.iter().enumerate() {
            let mf = format!("{rf}.matches[{mi}]");
            let (ptype, pvalue) =
                m.path
                    .as_ref()
                    .map_or((PType::PathPrefix, "/".to_owned()), |p| {
                        (
                            p.r#type.clone().unwrap_or(PType::PathPrefix),
                            p.value.clone().unwrap_or_else(|| "/".into()),
                        )
                    });
            let path = match ptype {
                PType::Exact | PType::PathPrefix if !pvalue.starts_with('/') => {
                    return Err(at.err(format!("{mf}.path.value"), "must start with /"));
                }
                PType::Exact => {
                    all_prefix = false;
                    PathMatch::Exact(pvalue)
                }
                PType::PathPrefix => PathMatch::Prefix(pvalue.trim_end_matches('/').to_owned()),
                PType::RegularExpression => {
                    all_prefix = false;
                    PathMatch::Regex(regex(at, &format!("{mf}.path.value"), &pvalue)?)
                }
            };
            let method = m
                .method
                .as_ref()
                .map(|m| {
                    let s = serde_json::to_value(m)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned));
                    s.and_then(|s| Method::from_bytes(s.as_bytes()).ok())
                        .ok_or_else(|| at.err(format!("{mf}.method"), "not a method"))
                })
                .transpose()?;
            let mut headers = Vec::new();
            for (hi, h) in m.headers.iter().flatten().enumerate() {
                let hf = format!("{mf}.headers[{hi}]");
                let n = header_name(at, &format!("{hf}.name"), &h.name)?;
                let v = match h.r#type.as_ref().unwrap_or(&HType::Exact) {
                    HType::Exact => ValueMatch::Exact(h.value.clone()),
                    HType::RegularExpression => {
                        ValueMatch::Regex(regex(at, &format!("{hf}.value"), &h.value)?)
                    }
                };
                headers.push((n, v));
            }
            let mut query = Vec::new();
            for (qi, q) in m.query_params.iter().flatten().enumerate() {
                let v = match q.r#type.as_ref().unwrap_or(&QType::Exact) {
                    QType::Exact => ValueMatch::Exact(q.value.clone()),
                    QType::RegularExpression => ValueMatch::Regex(regex(
                        at,
                        &format!("{mf}.queryParams[{qi}].value"),
                        &q.value,
                    )?),
                };
                query.push((q.name.clone(), v));
            }
            matches.push(RouteMatch {
                path,
                method,
                headers,
                query,
            });
        }
        let mut action = new_action(format!("HTTPRoute {name} rule {ri}"), false, policy);
        for (fi, f) in rule.filters.iter().flatten().enumerate() {
            let ff = format!("{rf}.filters[{fi}]");
            let missing = |what: &str| {
                at.err(
                    format!("{ff}.{what}"),
                    format!("required by type {:?}", f.r#type),
                )
            };
            match f.r#type {
                F::RequestHeaderModifier => {
                    let m = f
                        .request_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("requestHeaderModifier"))?;
                    action.request_headers = Some(modifier(
                        at,
                        &format!("{ff}.requestHeaderModifier"),
                        m.set
                            .iter()
                            .flatten()
                            .map(|h| (h.name.as_str(), h.value.as_str())),
                        m.add
                            .iter()
                            .flatten()
                            .map(|h| (h.name.as_str(), h.value.as_str())),
                        m.remove.iter().flatten().map(String::as_str),
                    )?);
                }
                F::ResponseHeaderModifier => {
                    let m = f
                        .response_header_modifier
                        .as_ref()
                        .ok_or_else(|| missing("responseHeaderModifier"))?;
                    action.response_headers = Some(modifier(
                        at,
                        &format!("{ff}.responseHeaderModifier"),
                        m.set
                            .iter()
                            .flatten()
                            .map(|h| (h.name.as_str(), h.value.as_str())),
                        m.add
                            .iter()
                            .flatten()
                            .map(|h| (h.name.as_str(), h.value.as_str())),
                        m.remove.iter().flatten().map(String::as_str),
                    )?);
                }
                F::RequestRedirect => {
                    let rr = f
                        .request_redirect
                        .as_ref()
                        .ok_or_else(|| missing("requestRedirect"))?;
                    let status = match rr.status_code.unwrap_or(302) {
                        s @ (301 | 302 | 303 | 307 | 308) => u16::try_from(s).unwrap_or(302),
                        s => {
                            return Err(at.err(
                                format!("{ff}.requestRedirect.statusCode"),
                                format!("{s} is not 301, 302, 303, 307 or 308"),
                            ));
                        }
                    };
                    let path = rr
                        .path
                        .as_ref()
                        .map(|p| {
                            path_change(
                                at,
                                &format!("{ff}.requestRedirect.path"),
                                p.replace_full_path.as_ref(),
                                p.replace_prefix_match.as_ref(),
                                matches!(p.r#type, RedirectPathType::ReplacePrefixMatch),
                                all_prefix,
                            )
                        })
                        .transpose()?;
                    action.redirect = Some(Redirect {
                        scheme: rr.scheme.as_ref().map(|s| match s {
                            Scheme::Http => "http".to_owned(),
                            Scheme::Https => "https".to_owned(),
                        }),
                        hostname: rr.hostname.clone(),
                        path,
                        port: rr
                            .port
                            .map(|p| {
                                u16::try_from(p).map_err(|_| {
                                    at.err(format!("{ff}.requestRedirect.port"), "not a port")
                                })
                            })
                            .transpose()?,
                        status,
                    });
                }
                F::UrlRewrite => {
                    let u = f
                        .url_rewrite
                        .as_ref()
                        .ok_or_else(|| missing("urlRewrite"))?;
                    let path = u
                        .path
                        .as_ref()
                        .map(|p| {
                            path_change(
                                at,
                                &format!("{ff}.urlRewrite.path"),
                                p.replace_full_path.as_ref(),
                                p.replace_prefix_match.as_ref(),
                                matches!(p.r#type, RewritePathType::ReplacePrefixMatch),
                                all_prefix,
                            )
                        })
                        .transpose()?;
                    action.rewrite = Some(Rewrite {
                        hostname: u.hostname.clone(),
                        path,
                    });
                }
                F::RequestMirror => {
                    let m = f
                        .request_mirror
                        .as_ref()
                        .ok_or_else(|| missing("requestMirror"))?;
                    let b = &m.backend_ref;
                    let mf = format!("{ff}.requestMirror.backendRef");
                    let target = backend_ref(
                        at,
                        &mf,
                        &route,
                        b.group.as_deref(),
                        b.kind.as_deref(),
                        &b.name,
                        b.namespace.as_deref(),
                        b.port,
                    )?
                    .map_err(|e| at.err(&mf, e))?;
                    services.insert(target.clone());
                    action.mirrors.push(Mirror {
                        target,
                        per_million: mirror_share(
                            at,
                            &format!("{ff}.requestMirror"),
                            m.percent,
                            m.fraction.as_ref().map(|f| (f.numerator, f.denominator)),
                        )?,
                    });
                }
                F::ExtensionRef | F::Cors => {
                    return Err(at.err(
                        format!("{ff}.type"),
                        format!("{:?} filters are not served", f.r#type),
                    ));
                }
            }
        }
        if action.redirect.is_some() && action.rewrite.is_some() {
            return Err(at.err(
                format!("{rf}.filters"),
                "RequestRedirect and URLRewrite cannot be used together",
            ));
        }
        for (bi, b) in rule.backend_refs.iter().flatten().enumerate() {
            let bf = format!("{rf}.backendRefs[{bi}]");
            if b.filters.as_ref().is_some_and(|f| !f.is_empty()) {
                return Err(at.err(
                    format!("{bf}.filters"),
                    "per-backend filters are not served",
                ));
            }
            let weight = u32::try_from(b.weight.unwrap_or(1))
                .map_err(|_| at.err(format!("{bf}.weight"), "must be 0 or more"))?;
            let target = backend_ref(
                at,
                &bf,
                &route,
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
                b.port,
            )?;
            if let Ok(t) = &target {
                services.insert(t.clone());
            }
            action.total_weight += weight;
            action.backends.push(WeightedBackend { target, weight });
        }
        if let Some(t) = &rule.timeouts {
            if let Some(v) = &t.request {
                let d =
                    parse_duration(v).map_err(|e| at.err(format!("{rf}.timeouts.request"), e))?;
                action.request_timeout = (!d.is_zero()).then_some(d);
            }
            if let Some(v) = &t.backend_request {
                let d = parse_duration(v)
                    .map_err(|e| at.err(format!("{rf}.timeouts.backendRequest"), e))?;
                action.backend_timeout = (!d.is_zero()).then_some(d);
            }
            if let (Some(req), Some(be)) = (action.request_timeout, action.backend_timeout)
                && be > req
            {
                return Err(at.err(
                    format!("{rf}.timeouts.backendRequest"),
                    "must not exceed timeouts.request",
                ));
            }
        }
        out.push((matches, Arc::new(action)));
    }
    Ok(out)
}

#[expect(
    clippy::too_many_lines,
    reason = "one field of the GRPCRoute rule after the other"
)]
fn compile_grpc(
    at: &At<'_>,
    name: &ObjectName,
    r: &GrpcRoute,
    policy: &PolicyParts,
    grants: &Grants,
    services: &mut BTreeSet<ServiceRef>,
) -> Result<CompiledRules, GatewayConfigError> {
    use gateway_api::grpcroutes::{
        GrpcRouteRulesFiltersType as F, GrpcRouteRulesMatchesHeadersType as HType,
        GrpcRouteRulesMatchesMethodType as MType,
    };
    let route = RouteRef {
        kind: "GRPCRoute",
        namespace: &name.namespace,
        grants,
    };
    let mut out = Vec::new();
    let default_rule = [gateway_api::grpcroutes::GrpcRouteRules::default()];
    let rules = r.spec.rules.as_deref().unwrap_or(&default_rule);
    for (ri, rule) in rules.iter().enumerate() {
        let rf = format!("spec.rules[{ri}]");
        let mut matches = Vec::new();
        let given = rule.matches.as_deref().unwrap_or_default();
        let default_match = [gateway_api::grpcroutes::GrpcRouteRulesMatches::default()];
        let given = if given.is_empty() {
            &default_match[..]
        } else {
            given
        };
        for (mi, m) in given.iter().enumerate() {
            let mf = format!("{rf}.matches[{mi}]");
            // gRPC calls are `POST /{service}/{method}`: a method match is a path match.
            let path = match &m.method {
                None => PathMatch::Prefix(String::new()),
                Some(mm) => {
                    let (s, meth) = (mm.service.as_deref(), mm.method.as_deref());
                    if s.is_none() && meth.is_none() {
                        return Err(at.err(format!("{mf}.method"), "set service, method or both"));
                    }
                    match mm.r#type.as_ref().unwrap_or(&MType::Exact) {
                        MType::Exact => match (s, meth) {
                            (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
                            (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                            (None, Some(m)) => PathMatch::Regex(regex(
                                at,
                                &format!("{mf}.method"),
                                &format!("/[^/]+/{}", regex_escape(m)),
                            )?),
                            (None, None) => unreachable!("checked above"),
                        },
                        MType::RegularExpression => PathMatch::Regex(regex(
                            at,
                            &format!("{mf}.method"),
                            &format!("/{}/{}", s.unwrap_or("[^/]+"), meth.unwrap_or("[^/]+")),
                        )?),
                    }
                }
            };
            let mut headers = Vec::new();
            for (hi, h) in m.headers.iter().flatten().enumerate() {
                let hf = format!("{mf}.headers[{hi}]");
                let n = header_name(at, &format!("{hf}.name"), &h.name)?;
                let v = match h.r#type.as_ref().unwrap_or(&HType::Exact) {
                    HType::Exact => ValueMatch::Exact(h.value.clone()),
                    HType::RegularExpression => {
                        ValueMatch::Regex(regex(at, &format!("{hf}.value"), &h.value)?)
                    }
                };
                headers.push((n, v));
            }
            matches.push(RouteMatch {
                path,
                method: None,
                headers,
                query: Vec::new(),
            });
        }
        let mut action = new_action(format!("GRPCRoute {name} rule {ri}"), true, policy);
        for (fi, f) in rule.filters.iter().flatten().enumerate() {
            let ff = format!("{rf}.filters[{fi}]");
            match f.r#type {
                F::RequestHeaderModifier => {
                    if let Some(m) = &f.request_header_modifier {
                        action.request_headers = Some(modifier(
                            at,
                            &format!("{ff}.requestHeaderModifier"),
                            m.set
                                .iter()
                                .flatten()
                                .map(|h| (h.name.as_str(), h.value.as_str())),
                            m.add
                                .iter()
                                .flatten()
                                .map(|h| (h.name.as_str(), h.value.as_str())),
                            m.remove.iter().flatten().map(String::as_str),
                        )?);
                    }
                }
                F::ResponseHeaderModifier => {
                    if let Some(m) = &f.response_header_modifier {
                        action.response_headers = Some(modifier(
                            at,
                            &format!("{ff}.responseHeaderModifier"),
                            m.set
                                .iter()
                                .flatten()
                                .map(|h| (h.name.as_str(), h.value.as_str())),
                            m.add
                                .iter()
                                .flatten()
                                .map(|h| (h.name.as_str(), h.value.as_str())),
                            m.remove.iter().flatten().map(String::as_str),
                        )?);
                    }
                }
                F::RequestMirror | F::ExtensionRef => {
                    return Err(at.err(
                        format!("{ff}.type"),
                        format!("{:?} filters are not served on GRPCRoute", f.r#type),
                    ));
                }
            }
        }
        for (bi, b) in rule.backend_refs.iter().flatten().enumerate() {
            let bf = format!("{rf}.backendRefs[{bi}]");
            let weight = u32::try_from(b.weight.unwrap_or(1))
                .map_err(|_| at.err(format!("{bf}.weight"), "must be 0 or more"))?;
            let target = backend_ref(
                at,
                &bf,
                &route,
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
                b.port,
            )?;
            if let Ok(t) = &target {
                services.insert(t.clone());
            }
            action.total_weight += weight;
            action.backends.push(WeightedBackend { target, weight });
        }
        out.push((matches, Arc::new(action)));
    }
    Ok(out)
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn a_bad_object_names_file_line_object_field_and_reason() {
        let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw }
spec:
  gatewayClassName: mesh
  listeners: [{ name: http, port: 8080, protocol: HTTP }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: default }
spec:
  parentRefs: [{ name: gw }]
  rules:
    - matches: [{ path: { type: Exact, value: nope } }]
";
        let e = parse(Path::new("routes.yaml"), text).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert_eq!(e.object, "HTTPRoute default/web");
        assert_eq!(e.field, "spec.rules[0].matches[0].path.value");
        assert!(e.to_string().contains("must start with /"), "{e}");
        let e = parse(
            Path::new("routes.yaml"),
            &text.replace("type: Exact", "type: Bogus"),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.rules[0].matches[0].path.type", "{e}");
    }

    #[test]
    fn cross_namespace_backend_refs_need_a_reference_grant() {
        let routes = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw }
spec:
  gatewayClassName: mesh
  listeners: [{ name: http, port: 8080, protocol: HTTP }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: default }
spec:
  parentRefs: [{ name: gw }]
  rules:
    - backendRefs: [{ name: api, namespace: shop, port: 80 }]
";
        let target = |text: &str| {
            let cfg = parse(Path::new("routes.yaml"), text).unwrap();
            cfg.ports
                .values()
                .flat_map(|p| &p.hosts.vhosts)
                .flat_map(|v| &v.entries)
                .map(|e| e.action.backends[0].target.clone())
                .next()
                .unwrap()
        };
        let refused = target(routes).unwrap_err();
        assert!(refused.contains("RefNotPermitted"), "{refused}");
        let grant = |from_ns: &str, to_name: &str| {
            format!(
                "---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{ name: from-default, namespace: shop }}
spec:
  from: [{{ group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {from_ns} }}]
  to: [{{ group: \"\", kind: Service{to_name} }}]
"
            )
        };
        // Granted: the route's namespace and kind, any Service or this one by name.
        for name in ["", ", name: api"] {
            let ok = target(&format!("{routes}{}", grant("default", name))).unwrap();
            assert_eq!(ok.service, ObjectName::new("shop", "api"));
            assert_eq!(ok.port, 80);
        }
        // Another namespace, or another Service's name: still refused.
        assert!(target(&format!("{routes}{}", grant("other", ""))).is_err());
        assert!(target(&format!("{routes}{}", grant("default", ", name: db"))).is_err());
        // A grant with a typo is an error naming its field, not silently ignored.
        let e = parse(
            Path::new("routes.yaml"),
            &format!("{routes}{}", grant("default", ""))
                .replace("kind: Service", "kind: Service, nmae: x"),
        )
        .unwrap_err();
        assert_eq!(e.object, "ReferenceGrant shop/from-default", "{e}");
    }

    /// The objects of `text` as the Kubernetes source hands them over.
    fn objects(text: &str) -> Vec<Doc> {
        serde_saphyr::from_multiple::<serde_json::Value>(text)
            .unwrap()
            .into_iter()
            .filter(|v| !v.is_null())
            .map(|v| Doc {
                line: 0,
                kind: v["kind"].as_str().unwrap().to_owned(),
                name: ObjectName::new(
                    v["metadata"]["namespace"].as_str().unwrap_or("default"),
                    v["metadata"]["name"].as_str().unwrap(),
                ),
                value: v,
            })
            .collect()
    }

    #[test]
    fn kubernetes_objects_fail_one_by_one_with_the_specs_reasons() {
        let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw, namespace: default, generation: 3 }
spec:
  gatewayClassName: mesh
  listeners:
    - { name: http, port: 8080, protocol: HTTP }
    - { name: udp, port: 8081, protocol: UDP }
    - { name: https, port: 8443, protocol: HTTPS, tls: { certificateRefs: [{ name: missing }] } }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: good, namespace: default, generation: 2 }
spec:
  parentRefs: [{ name: gw, sectionName: http }, { name: elsewhere }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: typo, namespace: default }
spec:
  parentRefs: [{ name: gw }]
  rules: [{ backendRefs: [{ name: web, port: 80, weight: -1 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: foreign, namespace: other }
spec:
  parentRefs: [{ name: gw, namespace: default }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
";
        // A file with these objects is rejected whole (the first bad one named)...
        let e = parse(Path::new("routes.yaml"), text).unwrap_err();
        assert!(e.to_string().contains("spec.listeners[1]"), "{e}");
        // ...the API server's objects fail one by one and the rest is served.
        let cfg = compile_objects(objects(text));
        assert_eq!(cfg.listeners.len(), 1, "{:?}", cfg.listeners);
        assert_eq!(cfg.rejected.len(), 3, "{:?}", cfg.rejected);
        let g = &cfg.gateway_infos[0];
        assert_eq!(g.generation, Some(3));
        assert!(g.accepted.status, "some listeners are valid: {g:?}");
        assert_eq!(g.accepted.reason, "ListenersNotValid");
        let l = |n: &str| g.listeners.iter().find(|l| l.name == n).unwrap();
        assert_eq!(
            l("udp").accepted.reason,
            status::reason::UNSUPPORTED_PROTOCOL
        );
        assert_eq!(
            l("https").resolved_refs.reason,
            status::reason::INVALID_CERTIFICATE_REF
        );
        assert!(l("http").accepted.status && l("http").resolved_refs.status);
        let r = |n: &str| cfg.route_infos.iter().find(|r| r.name.name == n).unwrap();
        // The parent that is not one of ours (not given) gets no entry.
        assert_eq!(r("good").parents.len(), 1);
        assert_eq!(r("good").parents[0].accepted, status::Cond::yes("Accepted"));
        assert_eq!(r("good").generation, Some(2));
        assert_eq!(r("good").rules[0].backends[0].target, "default/web:80");
        let typo = &r("typo").parents[0].accepted;
        assert_eq!(typo.reason, status::reason::UNSUPPORTED_VALUE);
        assert!(
            typo.message.contains("spec.rules[0].backendRefs[0].weight"),
            "{typo:?}"
        );
        let foreign = &r("foreign").parents[0].accepted;
        assert_eq!(foreign.reason, status::reason::NOT_ALLOWED_BY_LISTENERS);
        // Only the good route serves.
        let served: Vec<&str> = cfg
            .ports
            .values()
            .flat_map(|p| &p.hosts.vhosts)
            .flat_map(|v| &v.entries)
            .map(|e| e.origin.name.as_str())
            .collect();
        assert_eq!(served, ["default/good"]);
        // BackendNotFound is judged against the model's Services.
        let report = status::RoutesReport::build(
            &cfg,
            "kubernetes",
            Some(&status::KnownServices::default()),
        );
        let good = report
            .routes
            .iter()
            .find(|r| r.name.name == "good")
            .unwrap();
        assert_eq!(good.resolved_refs.reason, status::reason::BACKEND_NOT_FOUND);
        assert_eq!(report.gateways[0].listeners[0].attached_routes, 1);
    }

    #[test]
    fn a_namespace_selector_admits_routes_from_matching_namespaces_only() {
        let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw, namespace: infra }
spec:
  gatewayClassName: mesh
  listeners:
    - name: shared
      port: 8080
      protocol: HTTP
      allowedRoutes:
        namespaces:
          from: Selector
          selector:
            matchLabels: { gateway-access: granted }
            matchExpressions: [{ key: tier, operator: NotIn, values: [dev] }]
    - name: by-name
      port: 8081
      protocol: HTTP
      allowedRoutes:
        namespaces:
          from: Selector
          selector: { matchLabels: { kubernetes.io/metadata.name: team-c } }
---
apiVersion: v1
kind: Namespace
metadata: { name: team-a, labels: { gateway-access: granted } }
---
apiVersion: v1
kind: Namespace
metadata: { name: team-b, labels: { gateway-access: granted, tier: dev } }
---
apiVersion: v1
kind: Namespace
metadata: { name: team-c }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: a, namespace: team-a }
spec:
  parentRefs: [{ name: gw, namespace: infra, sectionName: shared }]
  hostnames: [a.example]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: b, namespace: team-b }
spec:
  parentRefs: [{ name: gw, namespace: infra, sectionName: shared }]
  hostnames: [b.example]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: c, namespace: team-c }
spec:
  parentRefs: [{ name: gw, namespace: infra }]
  hostnames: [c.example]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
";
        let cfg = parse(Path::new("routes.yaml"), text).unwrap();
        let r = |n: &str| cfg.route_infos.iter().find(|r| r.name.name == n).unwrap();
        // team-a: labelled, not dev → admitted by `shared`.
        assert_eq!(r("a").parents[0].accepted, status::Cond::yes("Accepted"));
        // team-b: labelled but `tier: dev` → refused, and the message names the selector.
        let b = &r("b").parents[0].accepted;
        assert_eq!(b.reason, status::reason::NOT_ALLOWED_BY_LISTENERS, "{b:?}");
        assert!(b.message.contains("gateway-access=granted"), "{b:?}");
        // team-c: no labels of its own; the name label the API server sets admits it to
        // `by-name` (and `shared` refuses it).
        assert_eq!(r("c").parents[0].accepted, status::Cond::yes("Accepted"));
        let served: BTreeSet<(u16, &str)> = cfg
            .ports
            .iter()
            .flat_map(|(port, p)| {
                p.hosts
                    .vhosts
                    .iter()
                    .flat_map(|v| &v.entries)
                    .map(move |e| (*port, e.origin.name.as_str()))
            })
            .collect();
        assert_eq!(
            served,
            BTreeSet::from([(8080, "team-a/a"), (8081, "team-c/c")])
        );
        // A selector with an unknown operator is the listener's error, named by field.
        let bad = text.replace("operator: NotIn", "operator: Near");
        let e = parse(Path::new("routes.yaml"), &bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.listeners[0].allowedRoutes.namespaces.selector"),
            "{e}"
        );
    }
}
