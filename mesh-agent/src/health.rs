//! Readiness on `:15021` (`GET /healthz/ready`): 200 once the first model is in the kernel and
//! while every discovery source runs; 503 with the reason otherwise. Read from the published
//! status snapshot, so a probe never waits for a reconciliation. Served with hyper, one task per
//! connection.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::{info, warn};

use crate::app::Shared;

/// Path of the readiness check (as ztunnel serves it).
pub const READY_PATH: &str = "/healthz/ready";

/// Serves readiness until the process ends; a bind failure is logged, not fatal.
pub async fn serve_readiness(addr: SocketAddr, shared: Arc<Shared>) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "readiness endpoint not served");
            return;
        }
    };
    info!(%addr, "readiness endpoint listening");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let status = shared.stores.status.load_full();
                async move {
                    let (code, body) = match (req.uri().path(), status.ready) {
                        (READY_PATH, true) => (StatusCode::OK, "ready\n".to_owned()),
                        (READY_PATH, false) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {}\n", status.not_ready_reason),
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = code;
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
