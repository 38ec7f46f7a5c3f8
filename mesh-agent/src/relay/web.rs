//! The relay's live map page: `GET /` (HTML and JS that redraw every 2 s) and `GET /api/map`
//! (the graph as JSON; `?window=SECONDS`, default 60). Hubble UI and Kiali's graph page play
//! this part; like them the page only reads.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Bytes,
    header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;

use super::Hub;

/// The page: fetches `/api/map`, draws sources left and destinations right in SVG, edges with
/// their rates; failing edges and services with open circuits in red. Every node and edge
/// carries `data-` attributes so a test (or a user's script) reads the map from the DOM.
const PAGE: &str = include_str!("map.html");

/// Serves the page until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let hub = Arc::clone(&hub);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let hub = Arc::clone(&hub);
                async move { Ok::<_, Infallible>(answer(&req, &hub)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn answer<B>(req: &Request<B>, hub: &Hub) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/" | "/index.html" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            PAGE.as_bytes().to_vec(),
        ),
        "/api/map" => {
            let window = match window(req.uri().query().unwrap_or("")) {
                Ok(w) => w,
                Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", e.into_bytes()),
            };
            match serde_json::to_vec(&hub.graph(window)) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string().into_bytes(),
                ),
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    }
}

/// `window=SECONDS` (1..=3600, default 60).
fn window(query: &str) -> Result<Duration, String> {
    let Some(v) = query.split('&').find_map(|kv| kv.strip_prefix("window=")) else {
        return Ok(Duration::from_mins(1));
    };
    match v.parse::<u64>() {
        Ok(s @ 1..=3600) => Ok(Duration::from_secs(s)),
        _ => Err(format!("window={v:?}: seconds from 1 to 3600\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded_and_named_when_wrong() {
        assert_eq!(window(""), Ok(Duration::from_mins(1)));
        assert_eq!(window("a=1&window=5"), Ok(Duration::from_secs(5)));
        assert!(window("window=0").is_err_and(|e| e.contains("window=\"0\"")));
        assert!(window("window=x").is_err());
    }
}
