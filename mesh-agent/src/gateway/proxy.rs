//! The request path: route, authenticate, limit, rewrite, pick an endpoint, forward (with
//! retries, timeouts and mirroring), observe the outcome, and log one access line.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use crate::telemetry::traces;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{self, HeaderName},
    uri::PathAndQuery,
};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Empty, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The backend connections a request goes out on (one set per worker).
pub use super::upstream::Upstreams;
use super::{
    backends::{Backends, CircuitView, EndpointState, HealthFeedback, NoEndpoint, ServiceBackends},
    config::{GatewayConfig, PathChange, RETRY_BUFFER, RuleAction, ServiceRef},
    jwt::Denied,
    limits::RetryBudget,
    observe::{Counted, GatewayTelemetry, RequestRecord},
    routes::{PathMatch, query_pairs},
    upstream::{Answer, Lease, Returning, UpstreamError, dial},
};

/// Errors of bodies in flight.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Bodies the gateway sends (to clients and backends).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Request limits against hostile or broken clients.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct RequestLimits {
    /// Largest request body (413 past it). Envoy has no default limit; nginx's
    /// `client_max_body_size` is 1 MiB.
    pub max_body: u64,
}

/// What every request handler shares.
#[derive(Debug)]
pub struct Shared {
    pub config: ArcSwap<GatewayConfig>,
    pub backends: ArcSwap<Backends>,
    pub epoch: Instant,
    pub limits: RequestLimits,
    pub kernel: Arc<dyn CircuitView>,
    pub feedback: Arc<dyn HealthFeedback>,
    pub telemetry: GatewayTelemetry,
    /// Set at SIGTERM: connections finish their request in flight and close.
    pub drain: tokio::sync::watch::Sender<bool>,
    /// Client connections open (from accept to close), what the drain waits for.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    budget: RetryBudget,
}

impl Shared {
    #[must_use]
    pub fn new(
        config: GatewayConfig,
        limits: RequestLimits,
        kernel: Arc<dyn CircuitView>,
        feedback: Arc<dyn HealthFeedback>,
        telemetry: GatewayTelemetry,
    ) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            backends: ArcSwap::from_pointee(Backends::default()),
            epoch: Instant::now(),
            limits,
            kernel,
            feedback,
            telemetry,
            drain: tokio::sync::watch::Sender::new(false),
            connections: Arc::default(),
            budget: RetryBudget::default(),
        }
    }
}

/// The connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local_port: u16,
    pub tls: bool,
}

/// What every request of one client connection shares, made once per connection: a request
/// clones this one reference count, which only its connection's worker touches — not the
/// process-wide `Shared` and `Upstreams` counts, whose cache lines both workers moved between
/// their CPUs on every request.
#[derive(Debug)]
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub upstreams: Arc<Upstreams>,
    pub info: ConnInfo,
    /// The client's address as `x-forwarded-for` carries it, formatted once per connection.
    peer_ip: HeaderValue,
}

impl ConnCtx {
    #[must_use]
    pub fn new(shared: Arc<Shared>, upstreams: Arc<Upstreams>, info: ConnInfo) -> Self {
        let peer_ip = HeaderValue::from_maybe_shared(Bytes::from(info.peer.ip().to_string()))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            shared,
            upstreams,
            info,
            peer_ip,
        }
    }
}

/// A plain response.
#[must_use]
pub fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

/// Handles one request (never fails: every problem is an HTTP answer). Its metrics, access
/// line and span are written when the response body ends (`observe::Finish`).
pub async fn handle(
    ctx: Arc<ConnCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut out = RequestRecord::new(
        ctx.info.peer,
        req.method().clone(),
        req.uri().clone(),
        req.version(),
    );
    if let Some(protocol) = req.extensions_mut().remove::<hyper::ext::Protocol>() {
        upgrade_form(&mut req, &protocol);
    }
    // Envoy continues an incoming trace with a span of its own (new span id, same trace) and
    // starts one otherwise; the backend sees this span as its parent.
    let (host_value, parent) = host_and_traceparent(req.headers());
    let span = start_span(parent, out.start);
    let trace = traceparent_value(span.traceparent());
    out.span = Some(span);
    let host = host_of(req.uri(), host_value);
    let resp = route(&ctx, req, host.as_deref(), trace, &mut out).await;
    // The record takes the host only now: `route` borrowed it, no copy was needed.
    out.authority = host;
    Ok(super::observe::finish(resp, out, &ctx.shared.telemetry))
}

/// The first `Host` and `traceparent` values of a request, found in one pass over its headers
/// (name comparisons, no hashing): for the few headers most requests carry, cheaper than the
/// two hashed lookups it replaces.
fn host_and_traceparent(headers: &HeaderMap) -> (Option<&HeaderValue>, Option<&HeaderValue>) {
    let (mut host, mut trace) = (None, None);
    for (k, v) in headers {
        if *k == header::HOST {
            host = host.or(Some(v));
        } else if *k == TRACEPARENT {
            trace = trace.or(Some(v));
        }
    }
    (host, trace)
}

/// The request's host, lowercase and without port: `:authority` (HTTP/2) or `Host`.
fn host_of(uri: &Uri, host_header: Option<&HeaderValue>) -> Option<String> {
    let host = match uri.authority() {
        Some(a) => a.host(),
        None => host_of_header(host_header?.as_bytes())?,
    };
    // One allocation: the copy is lowercased in place.
    let mut host = host.to_owned();
    host.make_ascii_lowercase();
    Some(host)
}

/// The bytes of a reg-name (RFC 3986 §3.2.2: unreserved, sub-delims and percent-encoding), one
/// table lookup per byte of a `Host` value.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < t.len() {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    t
};

/// The host of a `Host` value (RFC 9110 §7.2: `uri-host [ ":" port ]`), `None` when it is not
/// one. Checked here rather than parsed into an `http::uri::Authority`, which copies the value
/// and accepts a user-info part that `Host` never has.
fn host_of_header(v: &[u8]) -> Option<&str> {
    let (host, port) = if v.first() == Some(&b'[') {
        // IP-literal: hex digits, ':' and '.' (an IPv4 tail) between brackets.
        let end = v.iter().position(|&b| b == b']')?;
        let inner = &v[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        (&v[..=end], &v[end + 1..])
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let name = &v[..end];
        if name.is_empty() || !name.iter().all(|&b| REG_NAME[usize::from(b)]) {
            return None;
        }
        (name, &v[end..])
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    // Every byte checked above is ASCII.
    port_ok.then(|| std::str::from_utf8(host).ok()).flatten()
}

/// The gateway's server span: a child of a valid incoming `traceparent`, else a new root (an
/// invalid one starts a new trace, as W3C Trace Context says a receiver must).
fn start_span(traceparent: Option<&HeaderValue>, start: Instant) -> traces::ActiveSpan {
    let parent = traceparent
        .and_then(|v| v.to_str().ok())
        .and_then(traces::TraceContext::parse);
    traces::start_span_at("gateway", traces::Kind::Server, parent.as_ref(), start)
}

/// The `traceparent` header value for the backend. Its bytes live in one allocation that every
/// copy of the value shares (a try's headers copied for a retry add a reference count): a value
/// copied from the text is a `Bytes` that allocates again when first cloned.
fn traceparent_value(tp: traces::TraceParent) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from_owner(tp)).ok()
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1). Names made at
/// compile time: no parsing of a name per request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-forwarded-proto` values, checked at compile time (`from_static` outside a constant checks
/// its bytes on every call).
const PROTO_HTTPS: HeaderValue = HeaderValue::from_static("https");
const PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names present (comparisons of standard names, no hashing) finds the
    // hop-by-hop ones: most requests carry none, most responses only `connection`. Only those
    // are removed — not a hashed removal of each of the eight names.
    let mut present = 0u8;
    // Whether a `Connection` value has a token other than `close`, `keep-alive` and `upgrade`
    // (tokens naming other headers): looked at in the same pass, so the usual
    // `connection: keep-alive` of a backend's answer costs neither a second lookup nor the
    // token parse below.
    let mut names_headers = false;
    for (k, v) in &*headers {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
            names_headers |= i == 0 && names_other_tokens(v.as_bytes());
        }
    }
    if present == 0 {
        return;
    }
    let has = |name: &HeaderName| {
        HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .is_some_and(|i| present & (1 << i) != 0)
    };
    // Headers the `Connection` header names are hop-by-hop too. Its usual tokens (`close`,
    // `keep-alive`, `upgrade`) are not parsed into names: they are not headers, or are
    // removed below anyway.
    let named: Vec<HeaderName> = if names_headers {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|t| n.eq_ignore_ascii_case(t))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let te_trailers = has(&header::TE)
        && headers
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
    for n in named {
        headers.remove(n);
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) == 0
            || (keep_upgrade && (*n == header::UPGRADE || *n == header::CONNECTION))
        {
            continue;
        }
        headers.remove(n);
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end (the one TE value HTTP/2 allows).
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a `Connection` value has a non-empty token other than `close`, `keep-alive` and
/// `upgrade` (ASCII case-insensitive, around spaces and tabs). True for every value in which
/// `strip_hop_by_hop`'s parse finds a header name, so `false` lets it skip that parse.
fn names_other_tokens(v: &[u8]) -> bool {
    v.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty()
            && ![&b"close"[..], b"keep-alive", b"upgrade"]
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k))
    })
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The request path after a `ReplacePrefixMatch`/`ReplaceFullPath` change.
fn changed_path(path: &str, matched: &PathMatch, change: &PathChange) -> String {
    match change {
        PathChange::Full(p) => p.clone(),
        PathChange::Prefix(repl) => {
            let prefix_len = match matched {
                PathMatch::Prefix(p) => p.len(),
                _ => 0,
            };
            let rest = &path[prefix_len.min(path.len())..];
            let repl = repl.trim_end_matches('/');
            let joined = if rest.is_empty() || rest.starts_with('/') {
                format!("{repl}{rest}")
            } else {
                format!("{repl}/{rest}")
            };
            if joined.is_empty() {
                "/".to_owned()
            } else {
                joined
            }
        }
    }
}

/// The path match of a rule without one (never read: a path change always has its match).
const NO_MATCH: PathMatch = PathMatch::Prefix(String::new());

/// Routes and serves one request.
#[expect(
    clippy::too_many_lines,
    reason = "the request path in order, one step after the other"
)]
async fn route(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    host: Option<&str>,
    trace: Option<HeaderValue>,
    out: &mut RequestRecord,
) -> Response<Body> {
    let (shared, upstreams, conn) = (&ctx.shared, &ctx.upstreams, ctx.info);
    let Some(host) = host else {
        return plain(StatusCode::BAD_REQUEST, "missing host");
    };
    let config = shared.config.load();
    let Some(port) = config.ports.get(&conn.local_port) else {
        return plain(StatusCode::NOT_FOUND, "no listener");
    };
    let Some(vhost) = port.hosts.vhost(host) else {
        return plain(StatusCode::NOT_FOUND, "unknown host");
    };
    // The rule's action, and the path match only when a path rewrite or redirect needs it:
    // not a copy of the whole route entry per request.
    let (action, matched): (Arc<RuleAction>, Option<PathMatch>) = {
        let query = query_pairs(req.uri().query());
        match vhost.find(req.method(), req.uri().path(), &query, req.headers()) {
            Some(e) => {
                let a = &e.action;
                let path_changes = a.rewrite.as_ref().is_some_and(|r| r.path.is_some())
                    || a.redirect.as_ref().is_some_and(|r| r.path.is_some());
                (a.clone(), path_changes.then(|| e.matcher.path.clone()))
            }
            None => return plain(StatusCode::NOT_FOUND, "no route"),
        }
    };
    drop(config);
    // The rule's reference count, not a copy of its name: the record reads the name only for
    // an access line or a sampled span.
    out.route = Some(action.clone());
    // Body size, before anything is read: hyper's body knows the `Content-Length` it parsed
    // (HTTP/1.1 and HTTP/2), without a second header lookup.
    let declared = req.body().size_hint().exact();
    if declared.is_some_and(|l| l > shared.limits.max_body) {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    // Authentication and limits answer without calling a backend.
    if let Some(jwt) = &action.jwt {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match jwt.check(auth) {
            Ok(()) => {}
            Err(Denied::Unauthenticated(why)) => {
                out.detail = Some(why.clone());
                let mut r = plain(StatusCode::UNAUTHORIZED, &why);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"gateway\""),
                );
                return r;
            }
            Err(Denied::Forbidden(why)) => {
                out.detail = Some(why.clone());
                return plain(StatusCode::FORBIDDEN, &why);
            }
        }
    }
    let limited = action
        .route_limit
        .as_ref()
        .and_then(|b| b.take().err())
        .or_else(|| {
            action
                .client_limit
                .as_ref()
                .and_then(|b| b.take(conn.peer.ip()).err())
        });
    if let Some(wait) = limited {
        let mut r = plain(StatusCode::TOO_MANY_REQUESTS, "rate limited");
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return r;
    }
    if let Some(rd) = &action.redirect {
        let scheme = rd
            .scheme
            .clone()
            .unwrap_or_else(|| if conn.tls { "https" } else { "http" }.to_owned());
        let hostname = rd.hostname.clone().unwrap_or_else(|| host.to_owned());
        // Gateway API: no port given → the scheme's well-known port when the scheme is set,
        // else the listener's; a well-known port is left out of Location.
        let port = rd.port.unwrap_or(if rd.scheme.is_some() {
            if scheme == "https" { 443 } else { 80 }
        } else {
            conn.local_port
        });
        let default_port = if scheme == "https" { 443 } else { 80 };
        let path = rd.path.as_ref().map_or_else(
            || req.uri().path().to_owned(),
            |c| changed_path(req.uri().path(), matched.as_ref().unwrap_or(&NO_MATCH), c),
        );
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let location = if port == default_port {
            format!("{scheme}://{hostname}{path}{query}")
        } else {
            format!("{scheme}://{hostname}:{port}{path}{query}")
        };
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::from_u16(rd.status).unwrap_or(StatusCode::FOUND);
        match HeaderValue::from_str(&location) {
            Ok(v) => {
                r.headers_mut().insert(header::LOCATION, v);
            }
            Err(_) => return plain(StatusCode::BAD_REQUEST, "cannot redirect this path"),
        }
        return r;
    }
    if action.total_weight == 0 {
        // Gateway API: a rule without usable backendRefs answers 500.
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "no backend");
    }
    // The backendRef, by weight; retries stay on it (Envoy picks the cluster once).
    let target = {
        let mut n = fastrand::u32(..action.total_weight);
        let mut chosen = &action.backends[0];
        for b in &action.backends {
            if n < b.weight {
                chosen = b;
                break;
            }
            n -= b.weight;
        }
        match &chosen.target {
            Ok(t) => t,
            Err(why) => {
                out.detail = Some(why.clone());
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "invalid backend reference",
                );
            }
        }
    };
    if req.method() == Method::CONNECT {
        return tunnel(ctx, req, &action, target, out).await;
    }
    // The request as every try sends it. An HTTP/2 request carries `Upgrade` only as the
    // upgrade form of an extended `CONNECT` (`upgrade_form`; h2 refuses the header itself).
    let upgrade = matches!(req.version(), Version::HTTP_11 | Version::HTTP_2)
        && req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade.then(|| ClientUpgrade {
        h2: req.version() == Version::HTTP_2,
        on: hyper::upgrade::on(&mut req),
    });
    let (parts, body) = req.into_parts();
    let body = Counted::new(body, &mut out.request_bytes);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    if let Some(m) = &action.request_headers {
        m.apply(&mut headers);
    }
    // The client's path and query as they came (a reference count on hyper's buffer), unless
    // a rewrite changes the path.
    let mut path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("")),
    );
    // `Host` stays as the client sent it unless a rewrite changes it; an HTTP/2 client's
    // `:authority` becomes `Host`.
    let mut host_header = None;
    if let Some(rw) = &action.rewrite {
        if let Some(c) = &rw.path {
            let path = changed_path(parts.uri.path(), matched.as_ref().unwrap_or(&NO_MATCH), c);
            let joined = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            path_and_query = PathAndQuery::from_maybe_shared(Bytes::from(joined)).ok();
        }
        if let Some(h) = &rw.hostname {
            host_header = HeaderValue::from_str(h).ok();
        }
    }
    // Without an authority in the URI `host_of` read the host from `Host`: it is there unless
    // a header filter removed it (then the endpoint's is sent). Otherwise looked up.
    let client_host = parts.uri.authority().is_none() && action.request_headers.is_none();
    if host_header.is_none() && !client_host && !headers.contains_key(header::HOST) {
        host_header = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    }
    let has_host = match host_header {
        Some(h) => {
            headers.insert(header::HOST, h);
            true
        }
        None => client_host || headers.contains_key(header::HOST),
    };
    // Envoy appends the client's address to a list the client sent (`use_remote_address`).
    // One lookup (the entry) for both the read and the write of the name.
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) => {
            let joined = e
                .get()
                .to_str()
                .ok()
                .map(|prev| format!("{prev}, {}", conn.peer.ip()));
            // The string's buffer becomes the header's (no second copy).
            let v = match joined {
                Some(j) => HeaderValue::from_maybe_shared(Bytes::from(j)).ok(),
                None => Some(ctx.peer_ip.clone()),
            };
            if let Some(v) = v {
                e.insert(v);
            }
        }
        header::Entry::Vacant(e) => {
            e.insert(ctx.peer_ip.clone());
        }
    }
    headers.insert(
        X_FORWARDED_PROTO,
        if conn.tls { PROTO_HTTPS } else { PROTO_HTTP },
    );
    if let Some(v) = trace {
        headers.insert(TRACEPARENT, v);
    }
    // gRPC, or HTTP/2 from the client with a gRPC body, goes to the backend over h2c (gRPC
    // is HTTP/2 only: an HTTP/1.1 request's content type is not looked up).
    let grpc = action.grpc
        || (parts.version == Version::HTTP_2
            && headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc")));
    out.grpc = grpc;
    let mut template = Template {
        method: parts.method,
        path_and_query,
        headers,
        has_host,
        h2: grpc,
    };
    // Buffer small bodies of idempotent requests so they can be retried and mirrored.
    let limited = Limited::new(
        body,
        usize::try_from(shared.limits.max_body).unwrap_or(usize::MAX),
    );
    let small = limited.is_end_stream()
        || limited
            .size_hint()
            .exact()
            .is_some_and(|n| n <= RETRY_BUFFER)
        || declared.is_some_and(|n| n <= RETRY_BUFFER);
    let buffer =
        small && !upgrade && (is_idempotent(&template.method) || !action.mirrors.is_empty());
    let (mut streaming, buffered): (Option<Body>, Option<Bytes>) = if buffer {
        // A request without a body (a `GET`) has nothing to read: no collecting future.
        if limited.is_end_stream() {
            (None, Some(Bytes::new()))
        } else {
            match limited.collect().await {
                Ok(c) => (None, Some(c.to_bytes())),
                Err(e) => return body_error(&*e),
            }
        }
    } else {
        (
            Some(limited.map_err(|e| e as BoxError).boxed_unsync()),
            None,
        )
    };
    for m in &action.mirrors {
        if fastrand::u32(..1_000_000) >= m.per_million {
            continue;
        }
        if let Some(b) = &buffered {
            mirror(shared, upstreams, &m.target, &template, b.clone());
        } else {
            tracing::debug!(route = %action.route, "streaming request body: not mirrored");
        }
    }
    let Some(svc) = service(shared, target, out) else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    };
    let _active = shared.budget.start();
    let deadline = action.request_timeout.map(|t| Instant::now() + t);
    // A route without retries sends its one try with the template's headers moved, not copied.
    let retry = is_idempotent(&template.method) && buffered.is_some() && action.retry.attempts > 0;
    let mut exclude = None;
    let mut _retrying = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        out.attempts = attempt;
        let Some(ep) = pick(shared, &svc, exclude, out) else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let body = match (&buffered, streaming.take()) {
            // No body (a `GET`): boxing the zero-sized empty body allocates nothing.
            (Some(b), _) if b.is_empty() => empty(),
            (Some(b), _) => Full::new(b.clone())
                .map_err(|e: Infallible| match e {})
                .boxed_unsync(),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        // Without a retry this is the only try: its headers move into the request.
        let request = if retry {
            template.build(&ep, body)
        } else {
            template.build_last(&ep, body)
        };
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let limit = match (remaining, action.backend_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ep.active.fetch_add(1, Ordering::Relaxed);
        let fut = upstreams.send(&ep, request, template.h2);
        let result = match limit {
            Some(l) => tokio::time::timeout(l, fut).await.map_err(|_| ()),
            None => Ok(fut.await),
        };
        ep.active.fetch_sub(1, Ordering::Relaxed);
        let (failed, answer): (Option<String>, Option<Answer>) = match result {
            Ok(Ok(resp)) => {
                let status = resp.0.status();
                let grpc_unavailable =
                    template.h2 && resp.0.headers().get(GRPC_STATUS).is_some_and(|v| v == "14");
                if status.is_server_error() || grpc_unavailable {
                    (Some(format!("status {}", status.as_u16())), Some(resp))
                } else {
                    (None, Some(resp))
                }
            }
            Ok(Err(e)) if too_large(&e) => {
                // The client's streamed body passed the limit: its fault, not the backend's.
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            }
            Ok(Err(e)) => (
                Some(if e.is_connect() {
                    format!("connect: {e}")
                } else {
                    format!("reset: {e}")
                }),
                None,
            ),
            Err(()) => (Some("timeout".to_owned()), None),
        };
        if let Some(why) = &failed {
            svc.failure(&ep, shared.epoch);
            shared.feedback.failure(&svc, ep.addr, why);
        } else {
            ServiceBackends::success(&ep);
            shared.feedback.success(&svc, ep.addr);
        }
        let retriable = failed.is_some()
            && answer.as_ref().is_none_or(|(r, _)| {
                matches!(r.status().as_u16(), 502..=504)
                    || (template.h2 && r.headers().get(GRPC_STATUS).is_some_and(|v| v == "14"))
            });
        let time_left = deadline.is_none_or(|d| Instant::now() < d);
        if retriable && retry && attempt <= action.retry.attempts && time_left {
            if let Some(guard) = shared.budget.try_retry(action.retry.budget_percent) {
                _retrying = Some(guard);
                exclude = Some(ep.addr);
                tokio::time::sleep(backoff(action.retry.backoff, attempt)).await;
                continue;
            }
            out.detail = Some("retry budget exhausted".into());
        }
        return match (answer, failed) {
            (Some((resp, lease)), _) => {
                respond(shared, &svc, &ep, &action, resp, lease, client_upgrade)
            }
            (None, Some(why)) => {
                out.detail = Some(why.clone());
                if why == "timeout" {
                    plain(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
                } else if why.starts_with("connect") {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
                } else {
                    plain(StatusCode::BAD_GATEWAY, "upstream reset")
                }
            }
            (None, None) => plain(StatusCode::BAD_GATEWAY, "no response"),
        };
    }
}

/// An HTTP/2 extended `CONNECT` (RFC 8441: `:method CONNECT` with `:protocol`, how a client
/// opens a WebSocket over HTTP/2) in the HTTP/1.1 upgrade form it is routed and forwarded in:
/// `GET` with `Upgrade: <protocol>` and `Connection: upgrade` — what Envoy's HTTP/2 codec
/// does, so the request matches the same rules as a WebSocket over HTTP/1.1 and reaches an
/// HTTP/1.1 backend. Over HTTP/2 a WebSocket has no `Sec-WebSocket-Key` (RFC 8441 §5); an
/// HTTP/1.1 server requires one (RFC 6455 §4.1), so a fresh one is added.
fn upgrade_form(req: &mut Request<Incoming>, protocol: &hyper::ext::Protocol) {
    let Ok(value) = HeaderValue::from_str(protocol.as_str()) else {
        // Not a header value: left a `CONNECT`, which no rule without that method takes.
        return;
    };
    *req.method_mut() = Method::GET;
    let headers = req.headers_mut();
    headers.insert(header::UPGRADE, value);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if protocol.as_str().eq_ignore_ascii_case("websocket")
        && !headers.contains_key(header::SEC_WEBSOCKET_KEY)
    {
        use base64::Engine as _;
        let key =
            base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_ne_bytes());
        if let Ok(v) = HeaderValue::from_str(&key) {
            headers.insert(header::SEC_WEBSOCKET_KEY, v);
        }
    }
}

/// The header-only part of the request path, without I/O: host, route match, header filters,
/// rewrites, hop-by-hop removal and trace context. The fuzz target drives it with arbitrary
/// request heads; returns the matched route and the headers a backend would get.
pub fn process_head<B>(
    config: &GatewayConfig,
    port: u16,
    req: &Request<B>,
) -> Option<(String, HeaderMap)> {
    let (host_value, parent) = host_and_traceparent(req.headers());
    let host = host_of(req.uri(), host_value)?;
    let vhost = config.ports.get(&port)?.hosts.vhost(&host)?;
    let query = query_pairs(req.uri().query());
    let entry = vhost.find(req.method(), req.uri().path(), &query, req.headers())?;
    let mut headers = req.headers().clone();
    strip_hop_by_hop(&mut headers, req.headers().contains_key(header::UPGRADE));
    if let Some(m) = &entry.action.request_headers {
        m.apply(&mut headers);
    }
    if let Some(c) = entry.action.rewrite.as_ref().and_then(|r| r.path.as_ref()) {
        let _ = changed_path(req.uri().path(), &entry.matcher.path, c);
    }
    if let Some(v) = traceparent_value(start_span(parent, Instant::now()).traceparent()) {
        headers.insert(TRACEPARENT, v);
    }
    Some((entry.action.route.clone(), headers))
}

/// Whether a failed forward was the request body passing the size limit.
fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn body_error(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    if e.is::<http_body_util::LengthLimitError>() {
        plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
    } else {
        plain(StatusCode::BAD_REQUEST, "cannot read the request body")
    }
}

/// The parts of the upstream request every try shares.
struct Template {
    method: Method,
    /// Parsed once; cloning it is a reference count (`Bytes`).
    path_and_query: Option<PathAndQuery>,
    headers: HeaderMap,
    /// Whether `headers` has `Host` (HTTP/1.1 sends the endpoint's when not).
    has_host: bool,
    h2: bool,
}

impl Template {
    /// A try that may be followed by another (retry) or a mirror's copy: the headers are
    /// copied.
    fn build(&self, ep: &EndpointState, body: Body) -> Request<Body> {
        self.request(ep, self.headers.clone(), body)
    }

    /// The last use of the template (no retry can follow): the headers move instead of being
    /// copied.
    fn build_last(&mut self, ep: &EndpointState, body: Body) -> Request<Body> {
        let headers = std::mem::take(&mut self.headers);
        self.request(ep, headers, body)
    }

    /// h2c: the absolute URI, whose authority is the `:authority` sent — the request's
    /// `Host` (the client's, or a rewritten one), as Envoy sends it; the endpoint's address
    /// only when a filter removed it. HTTP/1.1: origin-form on the request line and the
    /// authority in `Host` (the endpoint's when the client's is gone).
    fn request(&self, ep: &EndpointState, headers: HeaderMap, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.headers_mut() = headers;
        if self.h2 {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            // HTTP/2 carries the authority in `:authority` (the URI), not in `Host`.
            parts.authority = Some(
                r.headers_mut()
                    .remove(header::HOST)
                    .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                    .unwrap_or_else(|| ep.authority.clone()),
            );
            parts.path_and_query.clone_from(&self.path_and_query);
            *r.uri_mut() =
                Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("http://invalid/"));
            *r.version_mut() = Version::HTTP_2;
        } else {
            *r.uri_mut() = Uri::from(
                self.path_and_query
                    .clone()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            *r.version_mut() = Version::HTTP_11;
            if !self.has_host
                && let Ok(v) = HeaderValue::from_str(ep.authority.as_str())
            {
                r.headers_mut().insert(header::HOST, v);
            }
        }
        r
    }
}

/// Sends a copy to the mirror's backend and forgets it (Gateway API `RequestMirror`: the
/// mirror's answer is ignored).
fn mirror(
    shared: &Arc<Shared>,
    upstreams: &Arc<Upstreams>,
    target: &ServiceRef,
    t: &Template,
    body: Bytes,
) {
    let backends = shared.backends.load();
    let Some(svc) = backends.services.get(target).cloned() else {
        return;
    };
    let Ok(ep) = svc.pick(None, shared.epoch, &*shared.kernel) else {
        return;
    };
    let req = t.build(
        &ep,
        Full::new(body)
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    let (upstreams, h2) = (upstreams.clone(), t.h2);
    tokio::spawn(async move {
        let sent = upstreams.send(&ep, req, h2);
        if let Ok(Ok((resp, lease))) = tokio::time::timeout(Duration::from_secs(30), sent).await {
            // Read to the end, so the connection goes back to the pool.
            let _ = with_lease(resp.into_body(), lease).collect().await;
        }
    });
}

/// The backend's answer, changed for the client.
fn respond(
    shared: &Arc<Shared>,
    svc: &Arc<ServiceBackends>,
    ep: &Arc<EndpointState>,
    action: &Arc<RuleAction>,
    mut resp: Response<Incoming>,
    lease: Option<Lease>,
    client_upgrade: Option<ClientUpgrade>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = client_upgrade
    {
        let backend_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client.on, backend_side) {
                Ok((c, b)) => splice(c, TokioIo::new(b)).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        if client.h2 {
            // RFC 8441 §5: an extended CONNECT is accepted with 200; HTTP/2 has no
            // connection-specific headers, and no `Sec-WebSocket-Accept` (it had no key).
            parts.status = StatusCode::OK;
            strip_hop_by_hop(&mut parts.headers, false);
            parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        }
        return Response::from_parts(parts, empty());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    if let Some(m) = &action.response_headers {
        m.apply(&mut parts.headers);
    }
    let body = if action.grpc {
        Observed {
            inner: body,
            watch: Some((shared.clone(), svc.clone(), ep.clone())),
        }
        .boxed_unsync()
    } else {
        with_lease(body, lease)
    };
    Response::from_parts(parts, body)
}

/// The client's side of an upgrade: hyper's handle on the connection (HTTP/1.1) or stream
/// (HTTP/2 extended `CONNECT`) it hands over once the answer is sent.
struct ClientUpgrade {
    on: hyper::upgrade::OnUpgrade,
    /// The client spoke HTTP/2: the backend's 101 reaches it as 200.
    h2: bool,
}

/// Relays bytes both ways between an upgraded client connection or stream and the backend
/// until either side is done; the bytes each way are only logged (at debug).
async fn splice<B>(client: hyper::upgrade::Upgraded, mut backend: B)
where
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = TokioIo::new(client);
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((up, down)) => tracing::debug!(up, down, "spliced connection ended"),
        Err(e) => tracing::debug!(error = %e, "spliced connection ended with an error"),
    }
}

/// A `CONNECT` request (HTTP/1.1, or HTTP/2 without `:protocol`) matched by a rule that names
/// the method: the gateway opens a TCP connection to an endpoint of the rule's backend,
/// answers 200 and relays bytes both ways — Envoy's CONNECT termination (`connect_config` on
/// the route), here the only mode: an ingress has no business forwarding `CONNECT` to a
/// backend that would dial on, and the target is always a routed Service, never the host the
/// client named. Endpoints are picked as for any request (skipping ejected ones); a failed
/// connect counts against the endpoint and is tried on another one (nothing was sent yet,
/// Envoy's `connect-failure` retry) within the route's attempts and the retry budget. The
/// tunnel holds the endpoint's active count while it lasts (least-request sees it); the
/// access line is written when the tunnel is established.
async fn tunnel(
    ctx: &ConnCtx,
    mut req: Request<Incoming>,
    action: &RuleAction,
    target: &ServiceRef,
    out: &mut RequestRecord,
) -> Response<Body> {
    let shared = &ctx.shared;
    let client_side = hyper::upgrade::on(&mut req);
    drop(req);
    let Some(svc) = service(shared, target, out) else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    };
    let _active = shared.budget.start();
    let limit = match (action.request_timeout, action.backend_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut exclude = None;
    let mut _retrying = None;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        out.attempts = attempt;
        let Some(ep) = pick(shared, &svc, exclude, out) else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let dialed = match limit {
            Some(l) => tokio::time::timeout(l, dial(ep.addr))
                .await
                .unwrap_or_else(|_| {
                    Err(UpstreamError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "route timeout",
                    )))
                }),
            None => dial(ep.addr).await,
        };
        match dialed {
            Ok(stream) => {
                ServiceBackends::success(&ep);
                shared.feedback.success(&svc, ep.addr);
                ep.active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    match client_side.await {
                        Ok(c) => splice(c, stream).await,
                        Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                    }
                    ep.active.fetch_sub(1, Ordering::Relaxed);
                });
                return Response::new(empty());
            }
            Err(e) => {
                let why = format!("connect: {e}");
                svc.failure(&ep, shared.epoch);
                shared.feedback.failure(&svc, ep.addr, &why);
                out.detail = Some(why);
            }
        }
        if attempt > action.retry.attempts {
            break;
        }
        let Some(guard) = shared.budget.try_retry(action.retry.budget_percent) else {
            out.detail = Some("retry budget exhausted".into());
            break;
        };
        _retrying = Some(guard);
        exclude = Some(ep.addr);
        tokio::time::sleep(backoff(action.retry.backoff, attempt)).await;
    }
    plain(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error")
}

/// The wait before retry `attempt` + 1: fully jittered exponential backoff (Envoy's: base
/// 25 ms, cap 10× base).
fn backoff(base: Duration, attempt: u32) -> Duration {
    let cap = base.saturating_mul(1 << attempt.min(3)).min(base * 10);
    cap.mul_f64(fastrand::f64())
}

/// The backends of a rule's Service port, recorded in `out`; `None` (answered 503) when it
/// has none.
fn service(
    shared: &Shared,
    target: &ServiceRef,
    out: &mut RequestRecord,
) -> Option<Arc<ServiceBackends>> {
    let Some(svc) = shared.backends.load().services.get(target).cloned() else {
        out.detail = Some(format!(
            "Service {} port {} has no endpoints",
            target.service, target.port
        ));
        return None;
    };
    out.service = Some(svc.label.clone());
    Some(svc)
}

/// One try's endpoint, recorded in `out`, skipping `exclude` and ejected ones; `None`
/// (answered 503) when none is left.
fn pick(
    shared: &Shared,
    svc: &ServiceBackends,
    exclude: Option<SocketAddr>,
    out: &mut RequestRecord,
) -> Option<Arc<EndpointState>> {
    let ep = match svc.pick(exclude, shared.epoch, &*shared.kernel) {
        Ok(ep) => ep,
        Err(NoEndpoint::Empty) => return None,
        Err(NoEndpoint::AllEjected) => {
            out.detail = Some("every endpoint ejected".into());
            return None;
        }
    };
    out.upstream = Some(ep.addr);
    out.pod.clone_from(&ep.pod);
    Some(ep)
}

/// A backend's response body for the client; with an HTTP/1.1 connection's lease, the
/// connection goes back to its pool when the body ends.
fn with_lease(body: Incoming, lease: Option<Lease>) -> Body {
    match lease {
        Some(l) => Returning::new(body, l).boxed_unsync(),
        None => body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
    }
}

/// A gRPC response body that reports `grpc-status: 14` (UNAVAILABLE) in its trailers as a
/// failure of the endpoint (Envoy's outlier detection counts it as a gateway failure).
struct Observed {
    inner: Incoming,
    watch: Option<(Arc<Shared>, Arc<ServiceBackends>, Arc<EndpointState>)>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(t) = f.trailers_ref()
            && t.get(GRPC_STATUS).is_some_and(|v| v == "14")
            && let Some((shared, svc, ep)) = self.watch.take()
        {
            svc.failure(&ep, shared.epoch);
            shared.feedback.failure(&svc, ep.addr, "grpc-status 14");
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `strip_hop_by_hop` by its plain definition, without the skips it takes for speed:
    /// parse every `Connection` value, remove what it names and the hop-by-hop headers, keep
    /// `te: trailers`.
    fn strip_plainly(mut h: HeaderMap, keep_upgrade: bool) -> HeaderMap {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !["close", "keep-alive", "upgrade"]
                    .iter()
                    .any(|t| n.eq_ignore_ascii_case(t))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let te_trailers = h
            .get(header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        for n in named {
            h.remove(n);
        }
        for n in &HOP_BY_HOP {
            if keep_upgrade && (*n == header::UPGRADE || *n == header::CONNECTION) {
                continue;
            }
            h.remove(n);
        }
        if te_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        h
    }

    proptest::proptest! {
        /// The fast strip (one pass, `Connection`'s tokens looked at without parsing them
        /// into names unless one names a header) removes exactly what the plain definition
        /// does, for header sets made of hop-by-hop names, names a `Connection` value can
        /// name, and token lists with odd case, spaces, tabs and empty tokens.
        #[test]
        fn the_fast_strip_removes_what_the_plain_definition_does(
            pairs in proptest::collection::vec(
                (
                    0usize..9,
                    "[ \t,]{0,2}((?i:close|keep-alive|upgrade|trailers|x-a|te|trailer)|[a-z]{1,3})?([ \t]{0,2},[ \t]{0,2}((?i:close|keep-alive|upgrade|trailers|x-a|te)|[a-z]{1,3}))*",
                ),
                0..8,
            ),
            keep_upgrade: bool,
        ) {
            let names = [
                "connection", "keep-alive", "te", "upgrade", "x-a", "ab", "trailer",
                "proxy-connection", "transfer-encoding",
            ];
            let mut h = HeaderMap::new();
            for (i, v) in &pairs {
                h.append(
                    HeaderName::from_static(names[*i]),
                    HeaderValue::from_str(v).expect("generated values are header values"),
                );
            }
            let mut fast = h.clone();
            strip_hop_by_hop(&mut fast, keep_upgrade);
            proptest::prop_assert_eq!(fast, strip_plainly(h, keep_upgrade));
        }
    }

    #[test]
    fn the_host_of_a_host_header_is_its_name_without_the_port() {
        let cases: [(&str, Option<&str>); 14] = [
            ("example.com", Some("example.com")),
            ("Example.COM:8080", Some("Example.COM")),
            ("example.com:", Some("example.com")),
            ("10.0.0.1:80", Some("10.0.0.1")),
            ("[::1]:443", Some("[::1]")),
            (
                "[2001:db8::ffff:10.0.0.1]",
                Some("[2001:db8::ffff:10.0.0.1]"),
            ),
            ("a_b-c~d.example", Some("a_b-c~d.example")),
            ("", None),
            (":80", None),
            ("user@example.com", None),
            ("example.com:80:80", None),
            ("example.com:8x", None),
            ("[::1", None),
            ("exa mple.com", None),
        ];
        for (v, want) in cases {
            assert_eq!(host_of_header(v.as_bytes()), want, "{v:?}");
            // Where ours accepts, `http`'s authority parser finds the same host.
            if let Some(h) = want {
                let a: http::uri::Authority = v.parse().unwrap();
                assert_eq!(a.host(), h, "{v:?}");
            }
        }
    }

    #[test]
    fn prefix_rewrites_replace_whole_elements() {
        let m = PathMatch::Prefix("/foo".into());
        let c = PathChange::Prefix("/bar".into());
        assert_eq!(changed_path("/foo/baz", &m, &c), "/bar/baz");
        assert_eq!(changed_path("/foo", &m, &c), "/bar");
        let root = PathChange::Prefix("/".into());
        assert_eq!(changed_path("/foo/baz", &m, &root), "/baz");
        assert_eq!(changed_path("/foo", &m, &root), "/");
    }

    #[test]
    fn connection_tokens_other_than_the_usual_three_are_noticed() {
        assert!(!names_other_tokens(b"keep-alive"));
        assert!(!names_other_tokens(b" Close ,\tUpgrade,,"));
        assert!(!names_other_tokens(b""));
        assert!(names_other_tokens(b"keep-alive, x-secret"));
        assert!(names_other_tokens(b"Keep-Alive2"));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("ok"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-app").unwrap(), "ok");

        // A WebSocket handshake keeps `connection` and `upgrade`; other hop-by-hop headers go.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade, X-Other"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("secret"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("host", HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert!(h.get("connection").is_some());
        assert!(h.get("x-other").is_none() && h.get("proxy-authorization").is_none());
        assert!(h.get("te").is_none());
        assert_eq!(h.get("host").unwrap(), "a");
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("upgrade").is_none() && h.get("connection").is_none());
        assert_eq!(h.len(), 1);
    }
}
