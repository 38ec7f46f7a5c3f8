//! The ingress gateway end to end: the real `mesh-agent gateway` process, real sockets, real
//! clients (curl over HTTP/1.1, h2c and HTTP/2 over TLS; hyper; raw TCP for hostile input and
//! upgrades). No kernel needed. Build first: `cargo build -p mesh-agent --bins`.

#![expect(
    clippy::too_many_lines,
    clippy::many_single_char_names,
    clippy::type_complexity,
    reason = "end-to-end scenarios read best as one sequence with short backend names and inline case tables"
)]

use std::{
    fmt::Write as _,
    process::Command,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use mesh_tests::gateway::{Backend, GatewayProcess, services_yaml, tls_secret_yaml, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GATEWAY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw, namespace: default }
spec:
  gatewayClassName: mesh
  listeners:
    - { name: http, port: PORT, protocol: HTTP }
";

/// Gateways of these tests run side by side in one network namespace: no `:15020` for them
/// (`gateway_telemetry.rs` tests the endpoint).
const NO_METRICS: &[&str] = &["--metrics-addr", "none"];

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-gateway-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `http://127.0.0.1:{port}{path}` with `Host: host` and extra headers: (status, headers, body).
async fn get(
    c: &HttpClient,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String)> {
    get_method(c, "GET", port, host, path, headers).await
}

async fn get_method(
    c: &HttpClient,
    method: &str,
    port: u16,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String)> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("host", host);
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

async fn ready(port: u16, host: &str, path: &str) -> Result<()> {
    let c = client();
    wait_for("the gateway to route", Duration::from_secs(20), || {
        let c = c.clone();
        let host = host.to_owned();
        let path = path.to_owned();
        async move {
            get(&c, port, &host, &path, &[])
                .await
                .is_ok_and(|(s, _, _)| s == 200)
        }
    })
    .await
}

/// Raw bytes in, the first response line out (or "closed").
async fn raw(port: u16, bytes: &[u8]) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(bytes).await?;
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) if !got.is_empty() => break,
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    Ok(if text.is_empty() {
        "closed".into()
    } else {
        text
    })
}

fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .context("running curl")?;
    anyhow::ensure!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_precedence_filters_and_protocols() -> Result<()> {
    let port = 18081;
    let ips = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"];
    let mut backends = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        backends.push(Backend::start(&format!("b{i}"), format!("{ip}:9001").parse()?).await?);
    }
    let services = services_yaml(&[
        ("exact", 80, &ips[0..1], 9001, ""),
        ("prefix", 80, &ips[1..2], 9001, ""),
        ("longer", 80, &ips[2..3], 9001, ""),
        ("canary", 80, &ips[3..4], 9001, ""),
    ]);
    let routes = format!(
        "{}---\n{}",
        GATEWAY.replace("PORT", &port.to_string()),
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: a, namespace: default, creationTimestamp: "2024-01-01T00:00:00Z" }
spec:
  parentRefs: [{ name: gw }]
  hostnames: [app.example.com]
  rules:
    - matches: [{ path: { type: PathPrefix, value: / } }]
      backendRefs: [{ name: prefix, port: 80 }]
    - matches: [{ path: { type: Exact, value: /api } }]
      backendRefs: [{ name: exact, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /api/v2 } }]
      backendRefs: [{ name: longer, port: 80 }]
    - matches:
        - path: { type: PathPrefix, value: /api }
          headers: [{ name: x-canary, value: "yes" }]
      backendRefs: [{ name: canary, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /api }, method: POST }]
      backendRefs: [{ name: exact, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /q }, queryParams: [{ name: v, value: "2" }] }]
      backendRefs: [{ name: longer, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /old } }]
      filters:
        - type: RequestRedirect
          requestRedirect: { scheme: https, hostname: new.example.com, path: { type: ReplacePrefixMatch, replacePrefixMatch: /new }, statusCode: 301 }
    - matches: [{ path: { type: PathPrefix, value: /rw } }]
      filters:
        - type: URLRewrite
          urlRewrite: { hostname: internal.example.com, path: { type: ReplacePrefixMatch, replacePrefixMatch: /v1 } }
        - type: RequestHeaderModifier
          requestHeaderModifier: { set: [{ name: x-set, value: s }], add: [{ name: x-add, value: a }], remove: [x-drop] }
        - type: ResponseHeaderModifier
          responseHeaderModifier: { add: [{ name: x-resp, value: r }] }
      backendRefs: [{ name: prefix, port: 80 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: wild, namespace: default }
spec:
  parentRefs: [{ name: gw }]
  hostnames: ["*.example.com"]
  rules:
    - backendRefs: [{ name: canary, port: 80 }]
"#
    );
    let dir = tmpdir("routing");
    let gw = GatewayProcess::start(&dir, &routes, &services, NO_METRICS)?;
    ready(port, "app.example.com", "/")
        .await
        .with_context(|| gw.log_text())?;
    let c = client();
    let who = |body: &str| body.split(' ').next().unwrap_or("").to_owned();
    // Precedence (Gateway API): exact > longest prefix > header > method > query.
    let cases: &[(&str, &str, &[(&str, &str)], &str)] = &[
        ("GET", "/api", &[], "b0"),
        ("GET", "/api/v2/x", &[], "b2"),
        ("GET", "/api/v1", &[("x-canary", "yes")], "b3"),
        ("GET", "/api/v1", &[], "b1"),
        ("POST", "/api/v1", &[], "b0"),
        ("GET", "/apix", &[("x-canary", "yes")], "b1"),
        ("GET", "/q?v=2", &[], "b2"),
        ("GET", "/q?v=3", &[], "b1"),
    ];
    for (method, path, headers, want) in cases {
        let (s, _, body) = get_method(&c, method, port, "app.example.com", path, headers).await?;
        assert_eq!(
            (s, who(&body)),
            (200, (*want).to_owned()),
            "{method} {path} {headers:?}: {body}"
        );
    }
    // Exact hostname beats the wildcard; the wildcard catches the rest; the apex and other
    // hosts are unknown.
    assert_eq!(
        who(&get(&c, port, "other.example.com", "/api", &[]).await?.2),
        "b3"
    );
    assert_eq!(get(&c, port, "example.com", "/", &[]).await?.0, 404);
    assert_eq!(get(&c, port, "nope.test", "/", &[]).await?.0, 404);
    // Redirect.
    let (s, h, _) = get(&c, port, "app.example.com", "/old/page?x=1", &[]).await?;
    assert_eq!(s, 301);
    assert_eq!(h["location"], "https://new.example.com/new/page?x=1");
    // Rewrite and header filters.
    let (s, h, body) = get(
        &c,
        port,
        "app.example.com",
        "/rw/thing",
        &[("x-drop", "1"), ("x-set", "old")],
    )
    .await?;
    assert_eq!(s, 200);
    assert_eq!(body, "b1 GET /v1/thing");
    assert_eq!(h["seen-host"], "internal.example.com");
    assert_eq!(h["seen-x-set"], "s");
    assert_eq!(h["seen-x-add"], "a");
    assert!(h.get("seen-x-drop").is_none());
    assert_eq!(h["x-resp"], "r");
    assert!(
        h.contains_key("seen-traceparent"),
        "a traceparent is started"
    );
    // A given traceparent's trace continues, with the gateway's span as the parent (Envoy).
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, h, _) = get(&c, port, "app.example.com", "/", &[("traceparent", tp)]).await?;
    let seen = h["seen-traceparent"].to_str()?;
    assert!(
        seen.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && seen.ends_with("-01"),
        "{seen}"
    );
    assert_ne!(seen, tp);
    // curl: HTTP/1.1 and h2c by prior knowledge.
    let url = format!("http://127.0.0.1:{port}/api");
    assert_eq!(
        who(&curl(&["--http1.1", "-H", "Host: app.example.com", &url])?),
        "b0"
    );
    let out = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "Host: app.example.com",
        "-w",
        " %{http_version}",
        &url,
    ])?;
    assert!(out.starts_with("b0 ") && out.ends_with(" 2"), "{out}");
    // WebSocket-style upgrade: 101, then bytes echo through.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await?;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping through the gateway").await?;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"ping through the gateway");
    drop(backends);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_90_10() -> Result<()> {
    let port = 18082;
    let stable = Backend::start("stable", "127.0.2.1:9002".parse()?).await?;
    let canary = Backend::start("canary", "127.0.2.2:9002".parse()?).await?;
    let services = services_yaml(&[
        ("stable", 80, &["127.0.2.1"], 9002, ""),
        ("canary", 80, &["127.0.2.2"], 9002, ""),
    ]);
    let routes = format!(
        "{}---\n{}",
        GATEWAY.replace("PORT", &port.to_string()),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split }
spec:
  parentRefs: [{ name: gw }]
  rules:
    - backendRefs: [{ name: stable, port: 80, weight: 90 }, { name: canary, port: 80, weight: 10 }]
"
    );
    let dir = tmpdir("weighted");
    let gw = GatewayProcess::start(&dir, &routes, &services, NO_METRICS)?;
    ready(port, "x", "/").await.with_context(|| gw.log_text())?;
    let (s0, c0) = (
        stable.hits.load(Ordering::Relaxed),
        canary.hits.load(Ordering::Relaxed),
    );
    let c = client();
    for _ in 0..2000 {
        assert_eq!(get(&c, port, "x", "/", &[]).await?.0, 200);
    }
    let s = stable.hits.load(Ordering::Relaxed) - s0;
    let k = canary.hits.load(Ordering::Relaxed) - c0;
    assert_eq!(s + k, 2000);
    let share = f64::from(u32::try_from(s)?) / 2000.0;
    assert!(
        (0.87..=0.93).contains(&share),
        "stable got {share:.3} ({s}/{k})"
    );
    Ok(())
}

/// The metrics endpoint of `hostile_input_gets_its_answer`'s gateway.
const HOSTILE_METRICS: &str = "127.0.0.1:19083";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_its_answer() -> Result<()> {
    let port = 18083;
    let _b = Backend::start("b", "127.0.3.1:9003".parse()?).await?;
    let services = services_yaml(&[("web", 80, &["127.0.3.1"], 9003, "")]);
    let routes = format!(
        "{}---\n{}",
        GATEWAY.replace("PORT", &port.to_string()),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web }
spec:
  parentRefs: [{ name: gw }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
"
    );
    let dir = tmpdir("hostile");
    let gw = GatewayProcess::start(
        &dir,
        &routes,
        &services,
        &[
            "--metrics-addr",
            HOSTILE_METRICS,
            "--max-body",
            "1000",
            "--header-read-timeout",
            "1s",
            "--max-header-bytes",
            "8192",
        ],
    )?;
    ready(port, "x", "/").await.with_context(|| gw.log_text())?;
    let first = |s: String| s.lines().next().unwrap_or("").to_owned();
    assert_eq!(
        first(raw(port, b"GARBAGE\r\n\r\n").await?),
        "HTTP/1.1 400 Bad Request"
    );
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    assert_eq!(
        first(raw(port, big.as_bytes()).await?),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    let body = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{}",
        "a".repeat(5000)
    );
    assert_eq!(
        first(raw(port, body.as_bytes()).await?),
        "HTTP/1.1 413 Payload Too Large"
    );
    let chunked = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n{}\r\n0\r\n\r\n",
        "a".repeat(5000)
    );
    assert_eq!(
        first(raw(port, chunked.as_bytes()).await?),
        "HTTP/1.1 413 Payload Too Large"
    );
    // Smuggling: CL and TE together. The body is read as chunked, Content-Length is dropped,
    // and the connection closes after the answer, so the "smuggled" request never runs.
    let smuggle = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let answer = raw(port, smuggle).await?;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(!answer.contains("/smuggled"), "{answer}");
    // Slowloris: headers never finish → the connection is closed after the header timeout.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await?;
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // Keep trickling a byte now and then, as slowloris does.
            let _ = s.write_all(b"X").await;
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
            {
                return r;
            }
        }
    })
    .await??;
    let waited = t0.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    // What hyper answered by itself reached no request handler: it is counted per connection.
    for (error, least) in [
        ("malformed", 1.0),
        ("header_too_large", 1.0),
        ("header_timeout", 1.0),
    ] {
        let series =
            format!("mesh_gateway_connection_errors_total{{protocol=\"http1\",error=\"{error}\"}}");
        let n = mesh_tests::gateway::metric(HOSTILE_METRICS, &series).await?;
        assert!(n >= least, "{series} = {n}");
    }
    // Memory stays flat: 200 more of each input above (and 50 slowloris connections held to
    // their timeout at once) after a warm-up round; what the first connections allocate for
    // good (worker arenas, buffers) is in the warm-up.
    let attacks: [&[u8]; 5] = [
        b"GARBAGE\r\n\r\n",
        big.as_bytes(),
        body.as_bytes(),
        chunked.as_bytes(),
        smuggle,
    ];
    let round = || async {
        for a in attacks {
            let answer = raw(port, a).await?;
            // Each gets its one answer (4xx; the smuggling attempt's outer POST a 200).
            anyhow::ensure!(
                answer.starts_with("HTTP/1.1 ") && !answer.contains("/smuggled"),
                "{answer}"
            );
        }
        anyhow::Ok(())
    };
    let slowloris = || async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await?;
        let mut buf = [0u8; 512];
        // Closed (or answered 408) at the header-read timeout: no more than 5 s.
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        anyhow::Ok(())
    };
    futures::future::try_join_all((0..10).map(|_| round())).await?;
    let before = mesh_tests::bench_mtls::rss_kb(gw.child.id())?;
    for _ in 0..20 {
        futures::future::try_join_all((0..10).map(|_| round())).await?;
    }
    futures::future::try_join_all((0..50).map(|_| slowloris())).await?;
    let after = mesh_tests::bench_mtls::rss_kb(gw.child.id())?;
    println!("HTTP/1.1 hostile input: gateway RSS {before:.0} KiB before, {after:.0} KiB after");
    assert!(
        after - before < 8.0 * 1024.0,
        "the gateway's RSS grew from {before:.0} to {after:.0} KiB over 1,000 hostile requests and 50 \
         slowloris connections"
    );
    assert!(!gw.log_text().contains("panicked"), "{}", gw.log_text());
    // The process is fine after all that.
    assert_eq!(get(&client(), port, "x", "/", &[]).await?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_retries_and_ejection() -> Result<()> {
    let port = 18084;
    let a = Backend::start("a", "127.0.4.1:9004".parse()?).await?;
    let b = Backend::start("b", "127.0.4.2:9004".parse()?).await?;
    let policy = "  - apiVersion: traffic.kernmesh.io/v1alpha1
    kind: TrafficPolicy
    metadata: { name: web }
    spec:
      targetRefs: [{ group: \"\", kind: Service, name: web }]
      loadBalancer: { simple: ROUND_ROBIN }
      outlierDetection: { consecutiveFailures: 3, baseEjectionTime: 30s, maxEjectionPercent: 100, healthyPanicThreshold: 0 }
";
    let services = services_yaml(&[
        ("web", 80, &["127.0.4.1", "127.0.4.2"], 9004, policy),
        ("limited", 80, &["127.0.4.1"], 9004, ""),
    ]);
    let routes = format!(
        "{}---\n{}",
        GATEWAY.replace("PORT", &port.to_string()),
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web }
spec:
  parentRefs: [{ name: gw }]
  hostnames: [web]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: limited }
spec:
  parentRefs: [{ name: gw }]
  hostnames: [limited]
  rules: [{ backendRefs: [{ name: limited, port: 80 }] }]
---
apiVersion: gateway.kernmesh.io/v1alpha1
kind: RoutePolicy
metadata: { name: limited }
spec:
  targetRefs: [{ kind: HTTPRoute, name: limited }]
  rateLimit: { route: { requests: 20, per: 1s } }
"
    );
    let dir = tmpdir("resilience");
    let gw = GatewayProcess::start(&dir, &routes, &services, NO_METRICS)?;
    ready(port, "web", "/")
        .await
        .with_context(|| gw.log_text())?;
    let c = client();
    // Rate limit: a burst of 20, then 429 with Retry-After.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..40 {
        let (s, h, _) = get(&c, port, "limited", "/", &[]).await?;
        match s {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(h.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!((20..=22).contains(&ok), "{ok} allowed, {limited} limited");
    // One backend fails: GETs are retried on the other, clients see no error, and after 3
    // failures it is ejected (no more requests reach it).
    a.failing.store(true, Ordering::Relaxed);
    for _ in 0..50 {
        let (s, _, body) = get(&c, port, "web", "/", &[]).await?;
        assert_eq!((s, body.starts_with("b ")), (200, true), "{body}");
    }
    let hits = a.hits.load(Ordering::Relaxed);
    for _ in 0..20 {
        get(&c, port, "web", "/", &[]).await?;
    }
    assert_eq!(
        a.hits.load(Ordering::Relaxed),
        hits,
        "the ejected backend gets nothing"
    );
    // Every backend ejected → 503 at once.
    b.failing.store(true, Ordering::Relaxed);
    for _ in 0..10 {
        let _ = get(&c, port, "web", "/", &[]).await?;
    }
    let t0 = Instant::now();
    let (s, _, _) = get(&c, port, "web", "/", &[]).await?;
    assert_eq!(s, 503);
    assert!(t0.elapsed() < Duration::from_millis(200));
    let hits_b = b.hits.load(Ordering::Relaxed);
    let _ = get(&c, port, "web", "/", &[]).await?;
    assert_eq!(b.hits.load(Ordering::Relaxed), hits_b, "no backend called");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reload_under_load_and_bad_files_keep_the_last_good() -> Result<()> {
    let port = 18085;
    let _a = Backend::start("one", "127.0.5.1:9005".parse()?).await?;
    let _b = Backend::start("two", "127.0.5.2:9005".parse()?).await?;
    let services = services_yaml(&[
        ("one", 80, &["127.0.5.1"], 9005, ""),
        ("two", 80, &["127.0.5.2"], 9005, ""),
    ]);
    let route = |svc: &str| {
        format!(
            "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: r }}\nspec:\n  parentRefs: [{{ name: gw }}]\n  rules: [{{ backendRefs: [{{ name: {svc}, port: 80 }}] }}]\n",
            GATEWAY.replace("PORT", &port.to_string())
        )
    };
    let dir = tmpdir("reload");
    let gw = GatewayProcess::start(&dir, &route("one"), &services, NO_METRICS)?;
    ready(port, "x", "/").await.with_context(|| gw.log_text())?;
    let c = client();
    // Requests go on until every reload is done (at least 1,500): how fast they go must not
    // decide whether both versions are seen.
    let reloading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let c = c.clone();
        let reloading = reloading.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeMap::<String, u32>::new();
            let mut n = 0;
            while n < 1500 || reloading.load(Ordering::Relaxed) {
                n += 1;
                let (s, _, body) = get(&c, port, "x", "/", &[]).await.unwrap();
                assert_eq!(s, 200, "{body}");
                *seen
                    .entry(body.split(' ').next().unwrap().to_owned())
                    .or_default() += 1;
            }
            seen
        })
    };
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        gw.set_routes(&route(if i % 2 == 0 { "two" } else { "one" }))?;
    }
    // A bad version: rejected, the last good one keeps serving.
    gw.set_routes(&route("two").replace("port: 80", "port: 0"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    reloading.store(false, Ordering::Relaxed);
    let seen = load.await?;
    assert!(seen.len() == 2, "both versions served: {seen:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(&c, port, "x", "/", &[]).await?.0, 200);
    let log = gw.log_text();
    assert!(
        log.contains("HTTPRoute default/r") && log.contains("spec.rules[0].backendRefs[0].port"),
        "the rejection names object and field: {log}"
    );
    Ok(())
}

#[test]
fn tls_sni_chooses_the_certificate_and_speaks_h2() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let port = 18443;
        let _b = Backend::start("tls", "127.0.6.1:9006".parse()?).await?;
        let dir = tmpdir("tls");
        let mut secrets = String::new();
        for (name, host) in [("a", "a.example.com"), ("b", "b.example.com")] {
            let key = rcgen::KeyPair::generate()?;
            let cert = rcgen::CertificateParams::new(vec![host.to_owned()])?.self_signed(&key)?;
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
            let _ = write!(secrets, "---\n{}", tls_secret_yaml(name, &cert, &key));
        }
        let routes = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: a, port: {port}, protocol: HTTPS, hostname: a.example.com, tls: {{ certificateRefs: [{{ name: a }}] }} }}
    - {{ name: b, port: {port}, protocol: HTTPS, hostname: b.example.com, tls: {{ certificateRefs: [{{ name: b }}] }} }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: r }}
spec:
  parentRefs: [{{ name: gw }}]
  rules: [{{ backendRefs: [{{ name: tls, port: 80 }}] }}]
{secrets}"
        );
        let services = services_yaml(&[("tls", 80, &["127.0.6.1"], 9006, "")]);
        let gw = GatewayProcess::start(&dir, &routes, &services, NO_METRICS)?;
        let ca = |n: &str| dir.join(format!("{n}.pem")).display().to_string();
        let resolve = |h: &str| format!("{h}:{port}:127.0.0.1");
        let mut last = String::new();
        for _ in 0..100 {
            match curl(&["--http2", "--cacert", &ca("a"), "--resolve", &resolve("a.example.com"), "-w", " %{http_version}", &format!("https://a.example.com:{port}/")]) {
                Ok(out) if out.starts_with("tls GET /") => {
                    last = out;
                    break;
                }
                Ok(out) => last = out,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(last.ends_with(" 2"), "{last}\n{}", gw.log_text());
        // b's name gets b's certificate (verified against b's CA only), over HTTP/1.1 too,
        // and with TLS 1.2.
        let out = curl(&["--http1.1", "--tlsv1.2", "--tls-max", "1.2", "--cacert", &ca("b"), "--resolve", &resolve("b.example.com"), "-w", " %{http_version}", &format!("https://b.example.com:{port}/")])?;
        assert!(out.starts_with("tls GET /") && out.ends_with(" 1.1"), "{out}");
        // a's certificate does not verify for b.
        assert!(curl(&["--cacert", &ca("a"), "--resolve", &resolve("b.example.com"), &format!("https://b.example.com:{port}/")]).is_err());
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn the_gateway_deployment_parses_and_its_routes_compile() -> Result<()> {
    use k8s_openapi::api::{
        apps::v1::Deployment,
        core::v1::{Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.yaml");
    let text = std::fs::read_to_string(&path)?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
    let mut kinds = Vec::new();
    for d in docs {
        let kind = d["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "ServiceAccount" => drop(serde_json::from_value::<ServiceAccount>(d)?),
            "ClusterRole" => drop(serde_json::from_value::<ClusterRole>(d)?),
            "ClusterRoleBinding" => drop(serde_json::from_value::<ClusterRoleBinding>(d)?),
            "Service" => drop(serde_json::from_value::<Service>(d)?),
            "Role" => drop(serde_json::from_value::<Role>(d)?),
            "RoleBinding" => drop(serde_json::from_value::<RoleBinding>(d)?),
            // Routes come from the Kubernetes API; the shipped Gateway compiles.
            "GatewayClass" => {}
            "Gateway" => {
                let cfg = mesh_agent::gateway::config::parse(
                    std::path::Path::new("gateway.yaml"),
                    &serde_json::to_string(&d)?,
                )?;
                assert_eq!(cfg.listeners.len(), 1);
            }
            "Deployment" => {
                let dep: Deployment = serde_json::from_value(d)?;
                let pod = dep.spec.unwrap().template.spec.unwrap();
                let args = pod.containers[0].args.clone().unwrap_or_default();
                assert_eq!(
                    args[..2],
                    ["--log-json", "gateway"],
                    "--log-json is the agent's flag, before the subcommand"
                );
            }
            other => anyhow::bail!("unexpected kind {other}"),
        }
        kinds.push(kind);
    }
    assert_eq!(kinds.len(), 9, "{kinds:?}");
    Ok(())
}
