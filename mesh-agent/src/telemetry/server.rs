//! The metrics endpoint: `GET /metrics` (and `/stats/prometheus`, the path Istio's proxies
//! serve on 15020) in the Prometheus text format 0.0.4, or `OpenMetrics` when the scraper asks
//! for it (`Accept: application/openmetrics-text`, as Prometheus does). Served with hyper, one
//! task per connection; each scrape reads the kernel now ([`super::kernel::Scrape`]).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Bytes,
    header::{ACCEPT, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{encoding, registry::Registry};
use tracing::{info, warn};

use super::{Bounds, global, kernel::Scrape};
use crate::app::Shared;

/// Paths that answer a scrape.
pub const METRICS_PATHS: [&str; 2] = ["/metrics", "/stats/prometheus"];
/// `Content-Type` of `OpenMetrics` text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the metrics until the process ends; a bind failure is logged, not fatal (as the
/// readiness endpoint: metrics are worth less than traffic).
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "metrics endpoint not served");
            return;
        }
    };
    info!(%addr, "metrics endpoint listening");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(answer(&req, &shared).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer<B>(req: &Request<B>, shared: &Shared) -> Response<Full<Bytes>> {
    if !METRICS_PATHS.contains(&req.uri().path()) {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let openmetrics = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let (code, body, content_type) = match render(shared, openmetrics).await {
        Ok(text) => (
            StatusCode::OK,
            text,
            if openmetrics {
                OPENMETRICS_CONTENT_TYPE
            } else {
                encoding::prometheus_text::CONTENT_TYPE
            },
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n".to_owned(),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// One scrape's text.
pub async fn render(shared: &Shared, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let scrape = Scrape::gather(shared).await;
    let t = global();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    registry.register_collector(Box::new(Arc::clone(&t.reconcile)));
    // `istio_tcp_*` (nearly all of a big node's scrape) is written directly, after the rest.
    registry.register_collector(Box::new(Arc::clone(&t.requests)));
    registry.register_collector(Box::new(Arc::clone(&t.otlp)));
    registry.register_collector(Box::new(super::access_log::AccessLogMetrics::global()));
    registry.register_collector(Box::new(Bounds(vec![t.tcp.bound(), t.requests.bound()])));
    // Sized like the last scrape (30 MB at 10,000 services): growing from 64 KiB by doubling
    // copied about twice the body per scrape.
    let mut out = String::with_capacity(LAST_SIZE.load(Ordering::Relaxed).max(64 * 1024));
    if openmetrics {
        encoding::text::encode(&mut out, &registry)?;
        // The TCP families go before the end marker.
        let body = out
            .strip_suffix(super::tcp::EOF)
            .ok_or(std::fmt::Error)?
            .len();
        out.truncate(body);
        t.tcp.encode_text(&mut out, true)?;
        out.push_str(super::tcp::EOF);
    } else {
        encoding::prometheus_text::encode(&mut out, &registry)?;
        t.tcp.encode_text(&mut out, false)?;
    }
    LAST_SIZE.store(out.len() + out.len() / 16, Ordering::Relaxed);
    Ok(out)
}

/// Length of the last scrape's text plus 1/16 (the next one's starting capacity).
static LAST_SIZE: AtomicUsize = AtomicUsize::new(0);
