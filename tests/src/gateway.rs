//! Harness for the ingress gateway: echo backends (HTTP/1.1, h2c and upgrades, each naming
//! itself in its answers) on loopback addresses, and the real `mesh-agent gateway` process
//! with a routes file and a Services file of its own.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

use crate::agent::{workspace_binary, write_atomically};

/// A Gateway `gw` with one plain HTTP listener on `port` and one `HTTPRoute` named after Service
/// `svc`, sending everything to `svc`:80 (namespace `default`); `extra` is appended (more YAML
/// documents, starting with `---`).
#[must_use]
pub fn http_route_yaml(port: u16, svc: &str, extra: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {port}, protocol: HTTP }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: {svc}, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  rules:
    - backendRefs: [{{ name: {svc}, port: 80 }}]
{extra}"
    )
}

/// A Gateway `gw` with one HTTPS listener on `port` for `host` (a fresh self-signed certificate,
/// returned so a client can trust it) and one `HTTPRoute` sending everything to Service
/// `svc`:80 (namespace `default`).
pub fn tls_route_yaml(port: u16, host: &str, svc: &str) -> Result<(String, rcgen::Certificate)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])?.self_signed(&key)?;
    let routes = tls_route_yaml_with(port, host, svc, &cert, &key);
    Ok((routes, cert))
}

/// [`tls_route_yaml`] with a given certificate and key (in the Secret named `svc`).
#[must_use]
pub fn tls_route_yaml_with(
    port: u16,
    host: &str,
    svc: &str,
    cert: &rcgen::Certificate,
    key: &rcgen::KeyPair,
) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: tls, port: {port}, protocol: HTTPS, hostname: {host}, tls: {{ certificateRefs: [{{ name: {svc} }}] }} }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: r }}
spec:
  parentRefs: [{{ name: gw }}]
  rules: [{{ backendRefs: [{{ name: {svc}, port: 80 }}] }}]
---
{}",
        tls_secret_yaml(svc, cert, key)
    )
}

/// A TLS connection to the gateway on loopback `port` for server name `name`, trusting only
/// `roots`, offering `alpn`.
pub async fn tls_client(
    port: u16,
    name: &str,
    roots: &[&rcgen::Certificate],
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der().clone())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_owned())?,
            tcp,
        )
        .await
        .context("TLS handshake with the gateway")
}

/// A `kubernetes.io/tls` Secret named `name` holding `cert` and `key` (PEM), as a YAML document
/// without the leading `---`.
#[must_use]
pub fn tls_secret_yaml(name: &str, cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> String {
    let indent = |s: String| {
        s.lines().fold(String::new(), |mut out, l| {
            let _ = writeln!(out, "    {l}");
            out
        })
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{ name: {name} }}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert.pem()),
        indent(key.serialize_pem())
    )
}

/// An echo backend: answers `{name} {method} {path}` and copies `x-*` request headers back as
/// `seen-x-*`; fails with 503 while `failing` is set; echoes bytes after an `Upgrade`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub failing: Arc<AtomicBool>,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts one on `addr` (a loopback address and port).
    pub async fn start(name: &str, addr: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding backend {name} on {addr}"))?;
        let failing = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (n, f, h) = (name.to_owned(), failing.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, f, h) = (n.clone(), f.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| echo(n.clone(), f.clone(), h.clone(), req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            name: name.to_owned(),
            addr,
            failing,
            hits,
            task,
        })
    }
}

async fn echo(
    name: String,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    if failing.load(Ordering::Relaxed) {
        let mut r = Response::new(Full::new(Bytes::from(format!("{name} failing"))));
        *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        return Ok(r);
    }
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(hyper::header::CONNECTION, "upgrade".parse().unwrap());
        r.headers_mut()
            .insert(hyper::header::UPGRADE, "websocket".parse().unwrap());
        return Ok(r);
    }
    let line = format!("{name} {} {}", req.method(), req.uri());
    let mut r = Response::builder();
    for (k, v) in req.headers() {
        if k.as_str().starts_with("x-") || k == "host" || k == "traceparent" {
            r = r.header(format!("seen-{k}"), v.clone());
        }
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let text = if body.is_empty() {
        line
    } else {
        format!("{line} body={}", body.len())
    };
    Ok(r.body(Full::new(Bytes::from(text))).unwrap())
}

/// The gateway process, killed on drop.
pub struct GatewayProcess {
    pub child: Child,
    pub routes: PathBuf,
    pub services: PathBuf,
    pub log: PathBuf,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl GatewayProcess {
    /// Starts `mesh-agent gateway` with these files in `dir`; `extra` flags are appended.
    pub fn start(dir: &Path, routes: &str, services: &str, extra: &[&str]) -> Result<Self> {
        let routes_path = dir.join("routes.yaml");
        let services_path = dir.join("services.yaml");
        write_atomically(&routes_path, routes)?;
        write_atomically(&services_path, services)?;
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(workspace_binary("mesh-agent")?)
            .arg("gateway")
            .arg("--routes")
            .arg(&routes_path)
            .arg("--config-file")
            .arg(&services_path)
            .args(["--listen-address", "127.0.0.1"])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .context("starting mesh-agent gateway")?;
        Ok(Self {
            child,
            routes: routes_path,
            services: services_path,
            log,
        })
    }

    /// The process's log so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces the routes file.
    pub fn set_routes(&self, text: &str) -> Result<()> {
        write_atomically(&self.routes, text)
    }
}

/// The value of one series (`name{labels}` exactly as the exposition writes it) on the
/// gateway's metrics endpoint at `addr`; 0 when the series is not there.
pub async fn metric(addr: &str, series: &str) -> Result<f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text))
        .await
        .context("the metrics answer did not end within 5 s")??;
    let Some(line) = text
        .lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
    else {
        return Ok(0.0);
    };
    line[series.len()..]
        .trim()
        .parse()
        .with_context(|| format!("metric line {line:?}"))
}

/// Waits until `check` holds (polling), or fails after `timeout` with `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out waiting for {what}")
}

/// A Services file: each `(name, port, endpoint IPs, targetPort, extra)`; cluster IPs are
/// made up (the gateway dials endpoints, never the cluster IP).
#[must_use]
pub fn services_yaml(services: &[(&str, u16, &[&str], u16, &str)]) -> String {
    let mut s = String::from("node: gateway\nservices:\n");
    for (i, (name, port, ips, target, _)) in services.iter().enumerate() {
        let _ = write!(
            s,
            "  - name: {name}\n    clusterIPs: [10.96.9.{}]\n    ports: [{{ name: http, port: {port}, targetPort: {target} }}]\n    endpoints:\n",
            i + 1
        );
        for ip in *ips {
            let _ = writeln!(s, "      - {{ ip: {ip}, ready: true }}");
        }
    }
    let policies: Vec<&str> = services
        .iter()
        .map(|s| s.4)
        .filter(|p| !p.is_empty())
        .collect();
    if !policies.is_empty() {
        s.push_str("policies:\n");
        for p in policies {
            s.push_str(p);
        }
    }
    s
}
