//! The gateway's telemetry hooks end to end: the real `mesh-agent gateway` process, a real
//! backend, real requests; then its `/metrics` (Istio's `istio_requests_total` and histograms
//! with their labels), its JSON access lines on stdout (`mesh_access`) and the `traceparent` the
//! backend received. No kernel needed. Build first: `cargo build -p mesh-agent --bins`.

use std::{process::Command, sync::atomic::Ordering, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use mesh_tests::gateway::{Backend, GatewayProcess, wait_for};

const PORT: u16 = 18086;
const METRICS: &str = "127.0.0.1:18096";
const GATEWAY_POD: &str = "mesh-gateway-7d9f8b6c4-x2x9z";
const BACKEND_POD: &str = "web-5d8f7c9b4-kx7wz";

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

async fn get(
    c: &HttpClient,
    url: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String)> {
    let mut b = http::Request::builder().uri(url).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Empty::new())?).await?;
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// The value of the one sample of `family` whose labels include every `labels` pair.
fn sample(scrape: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((set, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        if labels
            .iter()
            .all(|(k, v)| set.contains(&format!("{k}=\"{v}\"")))
        {
            assert!(found.is_none(), "two samples of {family} match {labels:?}");
            found = value.trim().parse().ok();
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario: known requests, then the metrics, the log and the traces they left"
)]
async fn requests_are_counted_logged_and_traced() -> Result<()> {
    let backend = Backend::start("web", "127.0.6.1:9006".parse()?).await?;
    let services = format!(
        "node: gateway\nservices:\n  - name: web\n    clusterIPs: [10.96.9.61]\n    ports: [{{ name: http, port: 80, targetPort: 9006 }}]\n    endpoints:\n      - {{ ip: 127.0.6.1, pod: {BACKEND_POD}, ready: true }}\n"
    );
    let routes = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {PORT}, protocol: HTTP }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: web-route, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  hostnames: [web.example.com]
  rules:
    - backendRefs: [{{ name: web, port: 80 }}]
"
    );
    let dir = std::env::temp_dir().join(format!("mesh-gateway-telemetry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let gw = GatewayProcess::start(
        &dir,
        &routes,
        &services,
        &[
            "--metrics-addr",
            METRICS,
            "--pod-name",
            GATEWAY_POD,
            "--pod-namespace",
            "mesh-system",
        ],
    )?;
    let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://127.0.0.1:{PORT}/hello");
    wait_for("the gateway to route", Duration::from_secs(20), || {
        let (c, url) = (c.clone(), url.clone());
        async move {
            get(&c, &url, "web.example.com", &[])
                .await
                .is_ok_and(|(s, _, _)| s == 200)
        }
    })
    .await
    .with_context(|| gw.log_text())?;
    // The metrics start after readiness: read the baseline, then make exactly known requests.
    let scrape = || async {
        let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        get(&c, &format!("http://{METRICS}/metrics"), "metrics", &[])
            .await
            .map(|r| r.2)
    };
    let ok_labels: &[(&str, &str)] = &[
        ("reporter", "source"),
        ("source_workload", "mesh-gateway"),
        ("source_workload_namespace", "mesh-system"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_workload", "web"),
        ("destination_workload_namespace", "default"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("connection_security_policy", "none"),
    ];
    let before = sample(&scrape().await?, "istio_requests_total", ok_labels).unwrap_or(0.0);

    // 5 answered requests, one with a sampled incoming trace context.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut body_len = 0;
    for i in 0..5 {
        let h: &[(&str, &str)] = if i == 0 { &[("traceparent", tp)] } else { &[] };
        let (s, headers, body) = get(&c, &url, "web.example.com", h).await?;
        assert_eq!(s, 200, "{body}");
        body_len = body.len();
        let seen = headers["seen-traceparent"].to_str()?;
        let parts: Vec<&str> = seen.split('-').collect();
        assert_eq!(parts.len(), 4, "{seen}");
        if i == 0 {
            // Envoy's behaviour: the same trace, the gateway's own span as the parent.
            assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c", "{seen}");
            assert_ne!(parts[2], "b7ad6b7169203331", "{seen}");
            assert_eq!(
                parts[3], "01",
                "a sampled parent's child is sampled: {seen}"
            );
        } else {
            assert_ne!(
                parts[1], "0af7651916cd43dd8448eb211c80319c",
                "a new trace: {seen}"
            );
        }
    }
    // 3 requests the backend answers 503 (each also retried inside the gateway: the metric
    // counts what the client got, not the tries).
    backend.failing.store(true, Ordering::Relaxed);
    let hits = backend.hits.load(Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(get(&c, &url, "web.example.com", &[]).await?.0, 503);
    }
    assert!(backend.hits.load(Ordering::Relaxed) - hits >= 3);
    backend.failing.store(false, Ordering::Relaxed);
    // A streamed POST body: 1,000 bytes counted in istio_request_bytes.
    let post = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", "Host: web.example.com"])
        .args(["--data-binary", &"x".repeat(1000), &url])
        .output()?;
    assert!(post.status.success(), "{post:?}");
    assert_eq!(
        String::from_utf8_lossy(&post.stdout),
        "web POST /hello body=1000"
    );

    // Recorded when each response body ends, so a scrape right after may miss the last one.
    let mut text = String::new();
    for _ in 0..50 {
        text = scrape().await?;
        if sample(&text, "istio_requests_total", ok_labels).unwrap_or(0.0) - before >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = |family: &str, extra: &[(&str, &str)]| {
        let mut l = ok_labels.to_vec();
        l.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        l.extend_from_slice(extra);
        sample(&text, family, &l)
    };
    assert_eq!(
        n("istio_requests_total", &[]),
        Some(before + 6.0),
        "5 GETs and a POST answered 200:\n{text}"
    );
    assert_eq!(
        n("istio_requests_total", &[("response_code", "503")]),
        Some(3.0),
        "3 answered 503:\n{text}"
    );
    assert_eq!(
        n(
            "istio_request_duration_milliseconds_count",
            &[("response_code", "503")]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        n("istio_request_bytes_sum", &[("response_code", "200")]),
        Some(1000.0),
        "only the POST had a body:\n{text}"
    );
    let response_bytes = n("istio_response_bytes_sum", &[]).context("response bytes")?;
    assert!(
        response_bytes >= f64::from(u32::try_from(5 * body_len)?),
        "5 × {body_len} bytes at least:\n{text}"
    );

    // One JSON access line per request on stdout, with the trace id the backend saw. Lines are
    // written by the gateway's flush thread (at most its interval after the request).
    let mut log = gw.log_text();
    for _ in 0..50 {
        if log.contains("\"method\":\"POST\"")
            && log.contains("0af7651916cd43dd8448eb211c80319c")
            && log.matches("\"status\":503").count() >= 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        log = gw.log_text();
    }
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "request complete")
        .collect();
    let traced: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["trace_id"] == "0af7651916cd43dd8448eb211c80319c")
        .collect();
    assert_eq!(traced.len(), 1, "{log}");
    let l = traced[0];
    assert_eq!(l["target"], "mesh_access", "{l}");
    assert_eq!(l["method"], "GET", "{l}");
    assert_eq!(l["authority"], "web.example.com", "{l}");
    assert_eq!(l["path"], "/hello", "{l}");
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["route"], "HTTPRoute default/web-route rule 0", "{l}");
    assert_eq!(l["upstream"], "127.0.6.1:9006", "{l}");
    assert!(l["duration_ms"].as_f64().is_some(), "{l}");
    let failed = lines.iter().filter(|v| v["status"] == 503).count();
    assert_eq!(failed, 3, "{log}");
    let posted: Vec<_> = lines.iter().filter(|v| v["method"] == "POST").collect();
    assert_eq!(posted.len(), 1, "{log}");
    assert_eq!(posted[0]["bytes_received"], 1000, "{log}");
    Ok(())
}
