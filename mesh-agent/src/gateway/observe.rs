//! Per-request telemetry of the gateway: Istio's request metrics (`telemetry::requests::record`),
//! one JSON access line on the `mesh_access` target, and a server span (`telemetry::traces`),
//! all written once, when the response body is finished or dropped (so bytes and duration cover
//! the whole exchange, as Envoy's access log and Istio's metrics do); client connections that
//! hyper or h2 ended with a protocol error of their own; plus the gateway's own `:15020/metrics`
//! endpoint.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt as _, Full};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, family::Family},
};

use super::{
    config::RuleAction,
    proxy::{Body, BoxError},
};
use crate::{
    model::ObjectName,
    telemetry::{
        Bounds, global,
        labels::{Reporter, Security},
        requests::{Protocol, Request},
        server::{METRICS_PATHS, OPENMETRICS_CONTENT_TYPE},
        traces::ActiveSpan,
    },
};

/// What the gateway's telemetry knows of itself; copied into every response body.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayTelemetry {
    /// The gateway's pod (`source_workload` of its request metrics); `None`: Istio's `unknown`.
    /// Made once per process and never freed: a reference, not an `Arc` clone per request —
    /// the workers bumping one shared reference count moved its cache line between CPUs on
    /// every request.
    pub source: Option<&'static Arc<ObjectName>>,
    /// Whether the per-request access line is written.
    pub access_log: bool,
}

/// Everything one request's telemetry records, filled in along the request path.
#[derive(Debug)]
pub struct RequestRecord {
    pub start: Instant,
    pub peer: SocketAddr,
    pub method: Method,
    pub authority: Option<String>,
    /// The request's URI as it came (its path is logged): reference counts on hyper's
    /// buffer, not a copy of the path per request.
    pub uri: http::Uri,
    pub version: http::Version,
    /// The matched rule (its `route` name is logged).
    pub route: Option<Arc<RuleAction>>,
    pub service: Option<Arc<ObjectName>>,
    pub upstream: Option<SocketAddr>,
    pub pod: Option<Arc<ObjectName>>,
    pub attempts: u32,
    pub detail: Option<String>,
    pub grpc: bool,
    /// Request body bytes read from the client, shared with the counting body ([`Counted`]);
    /// `None` while no body is counted (a request without one: most are).
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub span: Option<ActiveSpan>,
}

impl RequestRecord {
    #[must_use]
    pub fn new(peer: SocketAddr, method: Method, uri: http::Uri, version: http::Version) -> Self {
        Self {
            start: Instant::now(),
            peer,
            method,
            authority: None,
            uri,
            version,
            route: None,
            service: None,
            upstream: None,
            pod: None,
            attempts: 0,
            detail: None,
            grpc: false,
            request_bytes: None,
            span: None,
        }
    }
}

/// An HTTP version as its `Debug` text (`HTTP/1.1`), without formatting it per request;
/// `None` for a version `http` adds later (then formatted).
fn version_str(v: http::Version) -> Option<&'static str> {
    Some(match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => return None,
    })
}

/// `grpc-status` of a header block, when it has a valid one. The name is made at compile time:
/// a `&str` key is parsed into a header name on every lookup, and every response is looked up.
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    h.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The response body to the client, which writes the request's telemetry when it ends (or is
/// dropped: a client gone mid-body is still one request, recorded with what was sent).
pub struct Finish {
    inner: Body,
    status: StatusCode,
    grpc_status: Option<u16>,
    sent: u64,
    record: Option<RequestRecord>,
    telemetry: GatewayTelemetry,
}

impl Finish {
    /// Wraps `inner`, the body of a response with `status` and `headers`.
    #[must_use]
    pub fn new(
        inner: Body,
        status: StatusCode,
        headers: &HeaderMap,
        record: RequestRecord,
        telemetry: GatewayTelemetry,
    ) -> Self {
        Self {
            inner,
            status,
            // A trailers-only gRPC answer carries its status in the headers; other answers
            // are not looked up.
            grpc_status: if record.grpc {
                grpc_status(headers)
            } else {
                None
            },
            sent: 0,
            record: Some(record),
            telemetry,
        }
    }

    fn done(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        // The one clock read of the request's end: its duration, and its series' last use.
        let end = Instant::now();
        let duration = end.saturating_duration_since(r.start);
        let status = self.status.as_u16();
        let request_bytes = r
            .request_bytes
            .as_deref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        // Istio's gateway reports as `source` (it is the client of the backend).
        let request = Request {
            reporter: Reporter::Source,
            source: self.telemetry.source,
            source_principal: None,
            service: r.service.as_ref(),
            destination: r.pod.as_ref(),
            destination_principal: None,
            protocol: if r.grpc {
                Protocol::Grpc
            } else {
                Protocol::Http
            },
            response_code: status,
            grpc_status: self.grpc_status,
            security: Security::None,
            duration,
            request_bytes,
            response_bytes: self.sent,
        };
        crate::telemetry::requests::record_at(&request, end);
        if self.telemetry.access_log {
            // Formatted on this worker into its own buffer; a flush thread writes it
            // (`logging::access_line`, Envoy's per-worker access-log buffering).
            let (sent, grpc) = (self.sent, self.grpc_status);
            crate::logging::access_line("request complete", |l| {
                l.raw("direction", "inbound");
                l.raw("reporter", "gateway");
                l.socket_addr("peer", r.peer);
                // A method is an RFC 9110 token: no quote, backslash or control byte.
                l.raw("method", r.method.as_str());
                l.str("authority", r.authority.as_deref().unwrap_or("-"));
                l.str("path", r.uri.path());
                match version_str(r.version) {
                    Some(v) => l.raw("protocol", v),
                    None => l.display_raw("protocol", format_args!("{:?}", r.version)),
                }
                l.u64("status", u64::from(status));
                l.i64("grpc_status", grpc.map_or(-1, i64::from));
                l.str(
                    "route",
                    r.route.as_deref().map_or("-", |a| a.route.as_str()),
                );
                match r.upstream {
                    Some(a) => l.socket_addr("upstream", a),
                    None => l.raw("upstream", "-"),
                }
                match r.service.as_deref() {
                    Some(s) => l.str_parts("upstream_service", &[&s.namespace, "/", &s.name]),
                    None => l.raw("upstream_service", "-"),
                }
                l.u64("attempts", u64::from(r.attempts));
                l.u64("bytes_received", request_bytes);
                l.u64("bytes_sent", sent);
                l.millis("duration_ms", duration);
                match r.span.as_ref() {
                    Some(s) => l.hex("trace_id", &s.context().trace_id),
                    None => l.raw("trace_id", ""),
                }
                l.str("detail", r.detail.as_deref().unwrap_or(""));
            });
        }
        // An unsampled span (99 % at Istio's default 1 %) is only its propagated context:
        // no attributes are made for it.
        if let Some(mut span) = r.span.take().filter(ActiveSpan::recording) {
            span.set("http.request.method", r.method.as_str());
            span.set("url.path", r.uri.path().to_owned());
            if let Some(a) = &r.authority {
                span.set("server.address", a.clone());
            }
            span.set("client.address", r.peer.ip().to_string());
            if let Some(a) = &r.route {
                span.set("http.route", a.route.clone());
            }
            if let Some(u) = r.upstream {
                span.set("upstream_address", u.to_string());
            }
            span.set_int("http.response.status_code", u64::from(status));
            span.set_int("http.request.body.size", request_bytes);
            span.set_int("http.response.body.size", self.sent);
            // OpenTelemetry's HTTP server convention: 5xx are errors, 4xx are the client's.
            let error = (status >= 500).then(|| format!("status {status}"));
            span.finish(error.as_deref());
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for Finish {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                } else if let Some(t) = f.trailers_ref()
                    && let Some(g) = grpc_status(t)
                {
                    self.grpc_status = Some(g);
                }
            }
            Poll::Ready(None) => self.done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body from the client, counting its bytes for `istio_request_bytes`.
pub struct Counted<B> {
    inner: B,
    count: Option<Arc<AtomicU64>>,
}

impl<B: http_body::Body> Counted<B> {
    /// Wraps `inner`, counting into `count` (made here, shared with the request's record) —
    /// unless `inner` is already at its end: a request without a body (a `GET`) then costs no
    /// shared counter, and counts 0.
    pub fn new(inner: B, count: &mut Option<Arc<AtomicU64>>) -> Self {
        let count = (!inner.is_end_stream())
            .then(|| Arc::clone(count.get_or_insert_with(|| Arc::new(AtomicU64::new(0)))));
        Self { inner, count }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
            && let Some(count) = &self.count
        {
            count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `GET /metrics` (and `/stats/prometheus`) with the gateway's request metrics and
/// exporter counters until the process ends; a bind failure is logged, not fatal (metrics are
/// worth less than traffic), as the agent's endpoint.
pub async fn serve_metrics(addr: SocketAddr) {
    use hyper::{server::conn::http1, service::service_fn};
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "gateway metrics endpoint not served");
            return;
        }
    };
    tracing::info!(%addr, "gateway metrics endpoint listening");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                Ok::<_, Infallible>(metrics_answer(&req))
            });
            let _ = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn metrics_answer<B>(req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let text = |code, body: String, ct: &'static str| {
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
        r
    };
    if req.uri().path() == "/routes" {
        // Routes and their status (`meshctl routes`), as the status writer sees them.
        return match super::status::published() {
            Some(json) => text(StatusCode::OK, json.as_ref().clone(), "application/json"),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no configuration yet\n".into(),
                "text/plain",
            ),
        };
    }
    if !METRICS_PATHS.contains(&req.uri().path()) {
        return text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain");
    }
    let openmetrics = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match render(openmetrics) {
        Ok(body) if openmetrics => text(StatusCode::OK, body, OPENMETRICS_CONTENT_TYPE),
        Ok(body) => text(
            StatusCode::OK,
            body,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n".into(),
            "text/plain",
        ),
    }
}

/// Client connections ended by a protocol error that hyper or h2 handled by itself — a 400 or
/// 431 to a malformed or oversized HTTP/1.1 head, the header-read timeout, a GOAWAY for rapid
/// resets or an oversized header block — which no request handler saw, so no access line or
/// request metric counts them (Envoy's `downstream_cx_protocol_error`, `http1.*` and
/// `http2.*` counters). h2's own 431 to one stream whose header list is too large leaves the
/// connection up and is not seen here.
#[derive(Debug)]
struct ConnErrors(Family<ConnErrorLabels, Counter>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnErrorLabels {
    protocol: &'static str,
    error: &'static str,
}

impl Collector for &'static ConnErrors {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.0.encode(encoder.encode_descriptor(
            "mesh_gateway_connection_errors",
            "Client connections ended by a protocol error hyper or h2 answered itself, by protocol and error.",
            None,
            MetricType::Counter,
        )?)
    }
}

fn conn_errors() -> &'static ConnErrors {
    static ERRORS: OnceLock<ConnErrors> = OnceLock::new();
    ERRORS.get_or_init(|| {
        let family = Family::<ConnErrorLabels, Counter>::default();
        // The errors hostile input causes, exported from the start (at 0) so `rate()` and
        // alerts see the first one.
        for (protocol, error) in [
            ("http1", "malformed"),
            ("http1", "header_too_large"),
            ("http1", "header_timeout"),
            ("http2", "goaway_enhance_your_calm"),
            ("http2", "goaway_protocol_error"),
        ] {
            let _ = family
                .get_or_create(&ConnErrorLabels { protocol, error })
                .get();
        }
        ConnErrors(family)
    })
}

/// Counts a client connection that ended with `e` (`protocol`: `http1` or `http2`); a
/// connection that ended cleanly is not counted.
pub fn connection_error(protocol: &'static str, e: &hyper::Error) {
    let error = connection_error_kind(e);
    conn_errors()
        .0
        .get_or_create(&ConnErrorLabels { protocol, error })
        .inc();
}

/// The `error` label for `e`: what hyper answered (HTTP/1.1), the reason of the GOAWAY h2 sent
/// (HTTP/2), or how the client went away.
fn connection_error_kind(e: &hyper::Error) -> &'static str {
    if e.is_parse_too_large() {
        return "header_too_large";
    }
    if e.is_parse() || e.is_parse_status() {
        return "malformed";
    }
    if e.is_timeout() {
        return "header_timeout";
    }
    if e.is_incomplete_message() {
        return "incomplete_message";
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_library() {
                return match h2.reason() {
                    Some(h2::Reason::ENHANCE_YOUR_CALM) => "goaway_enhance_your_calm",
                    Some(h2::Reason::PROTOCOL_ERROR) => "goaway_protocol_error",
                    Some(h2::Reason::COMPRESSION_ERROR) => "goaway_compression_error",
                    Some(h2::Reason::FRAME_SIZE_ERROR) => "goaway_frame_size_error",
                    Some(h2::Reason::FLOW_CONTROL_ERROR) => "goaway_flow_control_error",
                    _ => "goaway_other",
                };
            }
            return if h2.is_io() { "io" } else { "h2_other" };
        }
        if s.is::<std::io::Error>() {
            return "io";
        }
        source = s.source();
    }
    "other"
}

/// One scrape of the gateway process: request metrics, their bound, OTLP exporter counters.
pub fn render(openmetrics: bool) -> Result<String, std::fmt::Error> {
    use prometheus_client::{encoding, registry::Registry};
    let t = global();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Arc::clone(&t.requests)));
    registry.register_collector(Box::new(Arc::clone(&t.otlp)));
    registry.register_collector(Box::new(
        crate::telemetry::access_log::AccessLogMetrics::global(),
    ));
    registry.register_collector(Box::new(Bounds(vec![t.requests.bound()])));
    registry.register_collector(Box::new(conn_errors()));
    let mut out = String::with_capacity(16 * 1024);
    if openmetrics {
        encoding::text::encode(&mut out, &registry)?;
    } else {
        encoding::prometheus_text::encode(&mut out, &registry)?;
    }
    Ok(out)
}

/// Wraps a finished response's body so its telemetry is written when the body ends. Boxed: the
/// body type hyper is given could be `Finish` itself, one allocation less, but hyper then moves
/// its few hundred bytes (the request's record) several times per response — more instructions
/// than the allocation (callgrind: +0.3k instructions per HTTP/1.1 request).
#[must_use]
pub fn finish(
    resp: http::Response<Body>,
    record: RequestRecord,
    telemetry: &GatewayTelemetry,
) -> http::Response<Body> {
    let (parts, body) = resp.into_parts();
    let body = Finish::new(body, parts.status, &parts.headers, record, *telemetry);
    http::Response::from_parts(parts, body.boxed_unsync())
}
