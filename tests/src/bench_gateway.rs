//! The gateway benchmark (`cargo xtask bench gateway`): `mesh-agent gateway`, nginx, `HAProxy` and
//! `hyper-floor` (the smallest hyper reverse proxy) as equivalent reverse proxies in front of one
//! backend, and the backend direct, measured with `wrk` (HTTP/1.1 keep-alive) and `h2load`
//! (HTTP/2 over TLS, gRPC unary) in interleaved rounds, with each proxy's CPU per request.
//!
//! Everything runs on loopback addresses of the host (no namespaces, no eBPF: the gateway is a
//! user-space proxy and so are the baselines). Each round runs every target once per protocol,
//! in a rotated order; ratios are taken within a round and the medians of those ratios reported.

#![expect(
    clippy::cast_precision_loss,
    reason = "request counts and kilobytes shown as f64 are far below 2^52"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};

use crate::agent::workspace_binary;
use crate::bench_mtls::cpu_us_precise;
use crate::gateway::{GatewayProcess, services_yaml};
pub use crate::samples::Samples;

/// The backend: nginx answering a small body over HTTP/1.1 (and HTTP/2 over TLS for "direct").
const WEB_IP: &str = "127.0.20.2";
const WEB_PORT: u16 = 9080;
const WEB_TLS_PORT: u16 = 9443;
/// The gRPC backend (hyper h2c in this process): echoes the unary message with `grpc-status: 0`.
const GRPC_IP: &str = "127.0.20.3";
const GRPC_PORT: u16 = 9090;
/// Proxies' listeners on 127.0.0.1: (plain HTTP/1.1, TLS with ALPN h2 + http/1.1).
const GATEWAY_PORTS: (u16, u16) = (18_100, 18_143);
const NGINX_PORTS: (u16, u16) = (18_200, 18_243);
const HAPROXY_PORTS: (u16, u16) = (18_300, 18_343);
const FLOOR_PORTS: (u16, u16) = (18_400, 18_443);
/// The gRPC method h2load calls (routed by path prefix to the gRPC backend by every proxy).
const GRPC_PATH: &str = "/bench.Bench/Unary";
/// Body of the backend's HTTP answers.
const BODY: &str = "hello from the backend\n";
/// The certificate's name (SNI is sent by every client; all the proxies serve the same pair).
const HOST: &str = "bench.example.com";

/// What a run measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub seconds: u32,
    /// wrk connections and threads (HTTP/1.1).
    pub http1_connections: u32,
    pub http1_threads: u32,
    /// h2load clients and streams per client (HTTP/2 and gRPC).
    pub h2_clients: u32,
    pub h2_streams: u32,
}

impl Plan {
    #[must_use]
    pub const fn new(quick: bool) -> Self {
        Self {
            rounds: if quick { 1 } else { 5 },
            seconds: if quick { 2 } else { 8 },
            http1_connections: 50,
            http1_threads: 2,
            h2_clients: 10,
            h2_streams: 10,
        }
    }
}

/// A target: the backend itself or one of the proxies in front of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    Gateway,
    Nginx,
    Haproxy,
    /// `hyper-floor`: what hyper 1 + hyper-util + tokio-rustls cost with nothing of ours on top.
    Floor,
}

impl Target {
    const ALL: [Self; 5] = [
        Self::Direct,
        Self::Gateway,
        Self::Nginx,
        Self::Haproxy,
        Self::Floor,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Gateway => "gateway",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
            Self::Floor => "floor",
        }
    }

    fn http1_url(self) -> String {
        match self {
            Self::Direct => format!("http://{WEB_IP}:{WEB_PORT}/"),
            Self::Gateway => format!("http://127.0.0.1:{}/", GATEWAY_PORTS.0),
            Self::Nginx => format!("http://127.0.0.1:{}/", NGINX_PORTS.0),
            Self::Haproxy => format!("http://127.0.0.1:{}/", HAPROXY_PORTS.0),
            Self::Floor => format!("http://127.0.0.1:{}/", FLOOR_PORTS.0),
        }
    }

    /// `https://host:port` for h2load, which connects to `--connect-to`-less URLs: the URL names
    /// the certificate's host and `connect` gives the address.
    fn tls_port(self) -> (String, u16) {
        match self {
            Self::Direct => (WEB_IP.to_owned(), WEB_TLS_PORT),
            Self::Gateway => ("127.0.0.1".to_owned(), GATEWAY_PORTS.1),
            Self::Nginx => ("127.0.0.1".to_owned(), NGINX_PORTS.1),
            Self::Haproxy => ("127.0.0.1".to_owned(), HAPROXY_PORTS.1),
            Self::Floor => ("127.0.0.1".to_owned(), FLOOR_PORTS.1),
        }
    }
}

/// One load-generator result.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LoadResult {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    /// Requests answered with anything but 2xx, plus socket errors.
    pub(crate) errors: u64,
    pub(crate) requests: u64,
    /// CPU time the target's processes spent per request over the measured window
    /// ([`with_cpu`]), where measured.
    pub(crate) cpu_us_per_req: Option<f64>,
}

/// A child process (a proxy or server of a benchmark) stopped on drop: SIGTERM, then SIGKILL.
pub(crate) struct Proc {
    name: &'static str,
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master stops its workers only when it is told to stop
        // (a killed master leaves them running, holding the ports).
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { name, child })
    }

    pub(crate) fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}): {}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// The gRPC backend: hyper (HTTP/1.1 or h2c prior knowledge) answering every request with its
/// own body as one gRPC message and `grpc-status: 0` in the trailers.
async fn grpc_backend(listener: tokio::net::TcpListener, hits: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let hits = hits.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| grpc_answer(hits.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn grpc_answer(
    hits: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Full::new(body)
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// The gRPC request body: one length-prefixed message (field 1 = a 16-byte string).
fn grpc_request_body() -> Vec<u8> {
    let msg = b"\x0a\x10hello, gateway!!";
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    framed.extend_from_slice(msg);
    framed
}

/// Self-signed ECDSA P-256 certificate for [`HOST`]: `cert.pem`, `key.pem` and `combined.pem`
/// (`HAProxy`'s format) in `dir`.
fn make_certificate(dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={HOST}"),
            "-addext",
            &format!("subjectAltName=DNS:{HOST}"),
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .context("running openssl (the certificate shared by the three proxies)")?;
    ensure!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // rustls reads PKCS#8 keys; openssl 3 writes PKCS#8 already ("BEGIN PRIVATE KEY").
    let cert = std::fs::read_to_string(dir.join("cert.pem"))?;
    let key = std::fs::read_to_string(dir.join("key.pem"))?;
    std::fs::write(dir.join("combined.pem"), format!("{cert}{key}"))?;
    Ok(())
}

fn nginx_backend_conf(dir: &Path) -> String {
    let d = dir.display();
    // keepalive_requests: nginx closes a keep-alive connection after 1,000 requests by default
    // (HTTP/1.1 and, since 1.19.7, HTTP/2): raised so no target pays reconnects the others don't.
    format!(
        "worker_processes auto;
pid {d}/nginx-backend.pid;
error_log {d}/nginx-backend.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/nb-body;
  server {{
    listen {WEB_IP}:{WEB_PORT} backlog=4096;
    listen {WEB_IP}:{WEB_TLS_PORT} ssl http2 backlog=4096;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{ return 200 \"{}\"; }}
  }}
}}
",
        BODY.replace('\n', "\\n")
    )
}

fn nginx_proxy_conf(dir: &Path) -> String {
    let d = dir.display();
    let (http, tls) = NGINX_PORTS;
    // The documented keep-alive-to-upstream setup: HTTP/1.1, an empty Connection header and an
    // upstream `keepalive` pool; gRPC through grpc_pass (HTTP/2 to the backend).
    format!(
        "worker_processes auto;
pid {d}/nginx-proxy.pid;
error_log {d}/nginx-proxy.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/np-body;
  proxy_temp_path {d}/np-proxy;
  upstream web {{ server {WEB_IP}:{WEB_PORT}; keepalive 256; keepalive_requests 10000000; }}
  upstream grpc {{ server {GRPC_IP}:{GRPC_PORT}; keepalive 256; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{http} backlog=4096;
    listen 127.0.0.1:{tls} ssl http2 backlog=4096;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
    location /bench.Bench/ {{ grpc_pass grpc://grpc; }}
  }}
}}
"
    )
}

fn haproxy_conf(dir: &Path) -> String {
    let d = dir.display();
    let (http, tls) = HAPROXY_PORTS;
    // `http-reuse always`: idle server connections are shared between clients (keep-alive to the
    // backend, like nginx's pool and the gateway's); gRPC to the backend over h2.
    format!(
        "global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  http-reuse always
frontend fe
  bind 127.0.0.1:{http}
  bind 127.0.0.1:{tls} ssl crt {d}/combined.pem alpn h2,http/1.1
  use_backend grpc if {{ path_beg /bench.Bench/ }}
  default_backend web
backend web
  server b {WEB_IP}:{WEB_PORT}
backend grpc
  server g {GRPC_IP}:{GRPC_PORT} proto h2
"
    )
}

fn gateway_routes(dir: &Path) -> Result<String> {
    let indent = |s: &str| {
        s.lines().fold(String::new(), |mut o, l| {
            let _ = writeln!(o, "    {l}");
            o
        })
    };
    let cert = std::fs::read_to_string(dir.join("cert.pem"))?;
    let key = std::fs::read_to_string(dir.join("key.pem"))?;
    let (http, tls) = GATEWAY_PORTS;
    Ok(format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{ name: gw, namespace: default }}
spec:
  gatewayClassName: mesh
  listeners:
    - {{ name: http, port: {http}, protocol: HTTP }}
    - {{ name: https, port: {tls}, protocol: HTTPS, tls: {{ certificateRefs: [{{ name: bench }}] }} }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: bench, namespace: default }}
spec:
  parentRefs: [{{ name: gw }}]
  rules:
    - matches: [{{ path: {{ type: PathPrefix, value: /bench.Bench }} }}]
      backendRefs: [{{ name: grpc, port: {GRPC_PORT} }}]
    - backendRefs: [{{ name: web, port: 80 }}]
---
apiVersion: v1
kind: Secret
metadata: {{ name: bench, namespace: default }}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{}  tls.key: |
{}",
        indent(&cert),
        indent(&key)
    ))
}

/// `wrk -t T -c C -d S --latency URL` with this plan's threads and connections.
fn wrk(url: &str, plan: &Plan, seconds: u32) -> Result<LoadResult> {
    run_wrk(url, plan.http1_threads, plan.http1_connections, seconds)
}

/// `wrk -t threads -c connections -d seconds --latency URL`: rate, latency percentiles and
/// errors (the telemetry benchmark drives its gateway with it too).
pub(crate) fn run_wrk(
    url: &str,
    threads: u32,
    connections: u32,
    seconds: u32,
) -> Result<LoadResult> {
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "wrk {url} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&text).with_context(|| format!("parsing wrk's output for {url}:\n{text}"))
}

/// A wrk duration (`812.00us`, `1.20ms`, `2.00s`) in microseconds.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse()?,
            ["50%", v] => r.p50_us = wrk_duration_us(v).context("50% latency")?,
            ["99%", v] => r.p99_us = wrk_duration_us(v).context("99% latency")?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "Socket errors: connect 0, read 0, write 0, timeout 0"
                r.errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    ensure!(r.rps > 0.0 && r.p99_us > 0.0, "no Requests/sec or 99% line");
    Ok(r)
}

/// Seconds h2load runs before it starts counting (connections, TLS, the proxies' pools).
const H2LOAD_WARM_UP_S: u64 = 1;

/// `h2load` over TLS (ALPN h2) against `host:port`, with SNI = [`HOST`]; `grpc` sends the gRPC
/// body to [`GRPC_PATH`].
fn h2load(
    target: (String, u16),
    plan: &Plan,
    seconds: u32,
    grpc_body: Option<&Path>,
) -> Result<LoadResult> {
    let (ip, port) = target;
    let path = if grpc_body.is_some() { GRPC_PATH } else { "/" };
    let mut cmd = Command::new("h2load");
    cmd.arg(format!("https://{HOST}:{port}{path}"))
        .args(["--connect-to", &format!("{ip}:{port}")])
        .args(["-c", &plan.h2_clients.to_string()])
        .args(["-m", &plan.h2_streams.to_string()])
        .args(["-t", "1"])
        .args(["-D", &seconds.to_string()])
        .args(["--warm-up-time", &H2LOAD_WARM_UP_S.to_string()]);
    if let Some(body) = grpc_body {
        cmd.arg("-d")
            .arg(body)
            .args(["-H", "content-type: application/grpc"])
            .args(["-H", "te: trailers"]);
    }
    let out = cmd
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "h2load {ip}:{port}{path} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_h2load(&text).with_context(|| format!("parsing h2load's output for {ip}:{port}:\n{text}"))
}

fn parse_h2load(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut ok = 0;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 8.00s, 12345.60 req/s, 1.23MB/s"
            let rps = rest
                .split(", ")
                .nth(1)
                .and_then(|s| s.strip_suffix(" req/s"));
            r.rps = rps.context("req/s")?.parse()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout"
            r.requests = rest.split_whitespace().next().context("total")?.parse()?;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // "status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx"
            let counts: Vec<u64> = rest
                .split(", ")
                .filter_map(|s| s.split_whitespace().next()?.parse().ok())
                .collect();
            ok = counts.first().copied().unwrap_or(0);
            r.errors += counts.iter().skip(1).sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // "time for request:   min  max  mean  sd  +/- sd" (units as wrk's): mean as p50 stand-in
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let Some(mean) = f.get(2).and_then(|v| wrk_duration_us(v)) {
                r.p50_us = mean;
            }
        }
    }
    ensure!(r.rps > 0.0, "no `finished in` line");
    ensure!(ok > 0, "no 2xx answers");
    // Requests that did not finish with 2xx (failed, errored, reset) count as errors too.
    r.errors = r.errors.max(r.requests.saturating_sub(ok));
    Ok(r)
}

/// Resident set size of `pid` in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A process and its children (nginx's workers; `HAProxy`, the gateway and the floor are one
/// process each): whose CPU is the target's.
fn process_group(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if parse_ppid(&stat) == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// The parent's pid from `/proc/PID/stat` (`pid (comm) state ppid …`; `comm` may hold spaces
/// and parentheses, so the fields are counted after the last `)`).
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time so far of these processes' threads, in microseconds (the scheduler's account).
fn group_cpu_us(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| cpu_us_precise(p)).sum()
}

/// Runs `load` and sets its CPU per request: the CPU `pids` spent from `skip` after the start
/// (h2load's uncounted warm-up) to the end, over the requests the rate counts in `seconds`.
/// CPU time does not depend on how busy the machine is, as rates do.
fn with_cpu(
    pids: &[u32],
    skip: Duration,
    seconds: u32,
    load: impl FnOnce() -> Result<LoadResult>,
) -> Result<LoadResult> {
    let owned = pids.to_vec();
    let start = std::thread::spawn(move || {
        std::thread::sleep(skip);
        group_cpu_us(&owned)
    });
    let mut res = load()?;
    let end = group_cpu_us(pids)?;
    let start = start
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))??;
    let requests = res.rps * f64::from(seconds);
    res.cpu_us_per_req = (requests > 0.0).then(|| (end - start) / requests);
    Ok(res)
}

/// Samples the gateway's RSS every 50 ms while a load runs; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        Self { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// The keys with goals in issue 10: (key, is an upper bound, bound).
pub const GOALS: [(&str, bool, f64); 6] = [
    ("rps_ratio_vs_nginx_http1", false, 1.0),
    ("rps_ratio_vs_haproxy_http1", false, 1.0),
    ("rps_ratio_vs_nginx_h2", false, 1.0),
    ("rps_ratio_vs_haproxy_h2", false, 1.0),
    ("p99_ratio_vs_nginx_http1", true, 1.0),
    ("rps_ratio_vs_direct_http1", false, 0.65),
];

/// `hyper-floor` with the bench's certificate, in front of the same backends, 2 workers.
fn spawn_floor(dir: &Path, log: &Path) -> Result<Proc> {
    let addr = |(ip, port): (&str, u16)| format!("{ip}:{port}");
    Proc::spawn(
        "hyper-floor",
        Command::new(workspace_binary("hyper-floor")?)
            .arg("--http")
            .arg(addr(("127.0.0.1", FLOOR_PORTS.0)))
            .arg("--tls")
            .arg(addr(("127.0.0.1", FLOOR_PORTS.1)))
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .arg("--backend")
            .arg(addr((WEB_IP, WEB_PORT)))
            .arg("--grpc-backend")
            .arg(addr((GRPC_IP, GRPC_PORT)))
            .args(["--grpc-prefix", "/bench.Bench/", "--workers", "2"]),
        log,
    )
}

/// Everything the run started; dropped (killed) at the end.
struct Rig {
    dir: PathBuf,
    grpc_body: PathBuf,
    gateway: GatewayProcess,
    procs: Vec<(Proc, PathBuf)>,
    /// Each target's processes (direct: the nginx backend's), whose CPU is measured.
    cpu_pids: BTreeMap<Target, Vec<u32>>,
    grpc_hits: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl Rig {
    fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-bench-gateway-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        make_certificate(&dir)?;
        let grpc_body = dir.join("grpc-request.bin");
        std::fs::write(&grpc_body, grpc_request_body())?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let grpc_hits = Arc::new(AtomicU64::new(0));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((GRPC_IP, GRPC_PORT)))
            .with_context(|| format!("binding the gRPC backend on {GRPC_IP}:{GRPC_PORT}"))?;
        runtime.spawn(grpc_backend(listener, grpc_hits.clone()));

        let mut procs = Vec::new();
        let mut main_pids = BTreeMap::new();
        for (name, conf) in [
            ("nginx (backend)", nginx_backend_conf(&dir)),
            ("nginx (proxy)", nginx_proxy_conf(&dir)),
        ] {
            let stem = if name.contains("backend") {
                "nginx-backend"
            } else {
                "nginx-proxy"
            };
            let conf_path = dir.join(format!("{stem}.conf"));
            std::fs::write(&conf_path, conf)?;
            let log = dir.join(format!("{stem}.log"));
            let p = Proc::spawn(
                name,
                Command::new("nginx")
                    .arg("-p")
                    .arg(&dir)
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-g", "daemon off;"]),
                &log,
            )?;
            let target = if stem == "nginx-backend" {
                Target::Direct
            } else {
                Target::Nginx
            };
            main_pids.insert(target, p.child.id());
            procs.push((p, log));
        }
        let conf_path = dir.join("haproxy.cfg");
        std::fs::write(&conf_path, haproxy_conf(&dir))?;
        let log = dir.join("haproxy.log");
        let p = Proc::spawn(
            "haproxy",
            Command::new("haproxy").arg("-db").arg("-f").arg(&conf_path),
            &log,
        )?;
        main_pids.insert(Target::Haproxy, p.child.id());
        procs.push((p, log));

        let log = dir.join("hyper-floor.log");
        let p = spawn_floor(&dir, &log)?;
        main_pids.insert(Target::Floor, p.child.id());
        procs.push((p, log));

        let services = services_yaml(&[
            ("web", 80, &[WEB_IP], WEB_PORT, ""),
            ("grpc", GRPC_PORT, &[GRPC_IP], GRPC_PORT, ""),
        ]);
        // No access log, as nginx (`access_log off`) and HAProxy (no `log` line) here: the
        // gateway's per-request JSON line to stdout is on by default (Envoy Gateway's default).
        let gateway = GatewayProcess::start(
            &dir,
            &gateway_routes(&dir)?,
            &services,
            &["--access-log", "false"],
        )?;
        main_pids.insert(Target::Gateway, gateway.child.id());
        let mut rig = Self {
            dir,
            grpc_body,
            gateway,
            procs,
            cpu_pids: BTreeMap::new(),
            grpc_hits,
            _runtime: runtime,
        };
        rig.wait_ready()?;
        // After the first answers: nginx's workers exist by then.
        rig.cpu_pids = main_pids
            .into_iter()
            .map(|(t, pid)| (t, process_group(pid)))
            .collect();
        Ok(rig)
    }

    /// Every target answers 200 with the backend's body over HTTP/1.1, and over HTTP/2 + TLS,
    /// within 30 s; then every proxy echoes a gRPC message through the gRPC backend.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for target in Target::ALL {
            let (ip, port) = target.tls_port();
            let urls = [
                (target.http1_url(), Vec::new()),
                (
                    format!("https://{HOST}:{port}/"),
                    vec![
                        "--http2".to_owned(),
                        "-k".to_owned(),
                        "--resolve".to_owned(),
                        format!("{HOST}:{port}:{ip}"),
                    ],
                ),
            ];
            for (url, extra) in urls {
                loop {
                    for (p, log) in &mut self.procs {
                        p.check_alive(log)?;
                    }
                    if let Some(status) = self.gateway.child.try_wait()? {
                        bail!("the gateway exited ({status}): {}", self.gateway.log_text());
                    }
                    let out = Command::new("curl")
                        .args(["-s", "-w", "%{http_code}", "--max-time", "2"])
                        .args(&extra)
                        .arg(&url)
                        .output()
                        .context("running curl")?;
                    let answer = String::from_utf8_lossy(&out.stdout);
                    if answer == "200" || answer.ends_with("\n200") {
                        // A proxy that answered 200 with anything but the backend's body is
                        // broken, not slow: waiting would not help.
                        ensure!(
                            answer == format!("{BODY}200"),
                            "{} answered {url} with {answer:?}, not the backend's body",
                            target.name()
                        );
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "{} never answered 200 on {url}; gateway log: {}",
                            target.name(),
                            self.gateway.log_text()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        for target in Target::ALL.into_iter().filter(|&t| t != Target::Direct) {
            self.check_grpc(target)?;
        }
        Ok(())
    }

    /// One gRPC unary call through `target` over HTTP/2 + TLS: the answer must be the backend's
    /// echo of the request's message.
    fn check_grpc(&self, target: Target) -> Result<()> {
        let (ip, port) = target.tls_port();
        let out = Command::new("curl")
            .args(["-s", "--http2", "-k", "--max-time", "5", "--resolve"])
            .arg(format!("{HOST}:{port}:{ip}"))
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
            .arg("--data-binary")
            .arg(format!("@{}", self.grpc_body.display()))
            .arg(format!("https://{HOST}:{port}{GRPC_PATH}"))
            .output()
            .context("running curl (gRPC)")?;
        ensure!(
            out.stdout == grpc_request_body(),
            "{}: a gRPC call answered {:?}, not the backend's echo",
            target.name(),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    }
}

/// One round's results into the samples (raw values and the gateway's ratios), and a line.
fn record_round(
    s: &mut Samples,
    round: usize,
    rounds: usize,
    r1: &BTreeMap<Target, LoadResult>,
    r2: &BTreeMap<Target, LoadResult>,
    rg: &BTreeMap<Target, LoadResult>,
) {
    let mut line = format!("round {}/{}:", round + 1, rounds);
    for t in Target::ALL {
        let (a, b) = (r1[&t], r2[&t]);
        let n = t.name();
        s.push(format!("http1_rps_{n}"), a.rps);
        s.push(format!("http1_p50_us_{n}"), a.p50_us);
        s.push(format!("http1_p99_us_{n}"), a.p99_us);
        s.push(format!("h2_rps_{n}"), b.rps);
        s.push(format!("h2_mean_us_{n}"), b.p50_us);
        if let Some(c) = a.cpu_us_per_req {
            s.push(format!("cpu_us_per_req_http1_{n}"), c);
        }
        if let Some(c) = b.cpu_us_per_req {
            s.push(format!("cpu_us_per_req_h2_{n}"), c);
        }
        let _ = write!(line, " {n} {:.0}/{:.0}", a.rps, b.rps);
        if let Some(g) = rg.get(&t) {
            s.push(format!("grpc_unary_rps_{n}"), g.rps);
            let _ = write!(line, "/{:.0}", g.rps);
        }
    }
    println!("{line} (req/s http1/h2/grpc)");
    let gw = (
        r1[&Target::Gateway],
        r2[&Target::Gateway],
        rg[&Target::Gateway],
    );
    for base in [Target::Nginx, Target::Haproxy] {
        let n = base.name();
        s.push(format!("rps_ratio_vs_{n}_http1"), gw.0.rps / r1[&base].rps);
        s.push(
            format!("p99_ratio_vs_{n}_http1"),
            gw.0.p99_us / r1[&base].p99_us,
        );
        s.push(format!("rps_ratio_vs_{n}_h2"), gw.1.rps / r2[&base].rps);
        s.push(
            format!("grpc_unary_rps_ratio_vs_{n}"),
            gw.2.rps / rg[&base].rps,
        );
        s.push(
            format!("{n}_rps_ratio_vs_direct_http1"),
            r1[&base].rps / r1[&Target::Direct].rps,
        );
        s.push(
            format!("{n}_rps_ratio_vs_direct_h2"),
            r2[&base].rps / r2[&Target::Direct].rps,
        );
        s.push(
            format!("{n}_p99_ratio_vs_direct_http1"),
            r1[&base].p99_us / r1[&Target::Direct].p99_us,
        );
    }
    s.push(
        "rps_ratio_vs_direct_http1",
        gw.0.rps / r1[&Target::Direct].rps,
    );
    s.push("rps_ratio_vs_direct_h2", gw.1.rps / r2[&Target::Direct].rps);
    s.push(
        "p99_ratio_vs_direct_http1",
        gw.0.p99_us / r1[&Target::Direct].p99_us,
    );

    // The floor: the smallest hyper proxy against the baselines, and the gateway against it.
    let fl = (r1[&Target::Floor], r2[&Target::Floor]);
    for base in [Target::Nginx, Target::Haproxy] {
        let n = base.name();
        s.push(
            format!("floor_rps_ratio_vs_{n}_http1"),
            fl.0.rps / r1[&base].rps,
        );
        s.push(
            format!("floor_rps_ratio_vs_{n}_h2"),
            fl.1.rps / r2[&base].rps,
        );
        if let (Some(f), Some(b)) = (fl.0.cpu_us_per_req, r1[&base].cpu_us_per_req) {
            s.push(format!("floor_cpu_per_req_ratio_vs_{n}_http1"), f / b);
        }
        if let (Some(f), Some(b)) = (fl.1.cpu_us_per_req, r2[&base].cpu_us_per_req) {
            s.push(format!("floor_cpu_per_req_ratio_vs_{n}_h2"), f / b);
        }
    }
    s.push(
        "floor_p99_ratio_vs_nginx_http1",
        fl.0.p99_us / r1[&Target::Nginx].p99_us,
    );
    s.push("rps_ratio_vs_floor_http1", gw.0.rps / fl.0.rps);
    s.push("rps_ratio_vs_floor_h2", gw.1.rps / fl.1.rps);
    if let (Some(g), Some(f)) = (gw.0.cpu_us_per_req, fl.0.cpu_us_per_req) {
        s.push("cpu_per_req_ratio_vs_floor_http1", g / f);
    }
    if let (Some(g), Some(f)) = (gw.1.cpu_us_per_req, fl.1.cpu_us_per_req) {
        s.push("cpu_per_req_ratio_vs_floor_h2", g / f);
    }
}

/// Runs the benchmark: returns the flat metrics (medians) and the per-round samples.
pub fn run(plan: &Plan) -> Result<(BTreeMap<String, f64>, Samples)> {
    let mut rig = Rig::start()?;
    let gw_pid = rig.gateway.child.id();
    let mut s = Samples::default();
    let idle_rss = rss_kib(gw_pid).unwrap_or(0);
    let mut peak_rss = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();

    // Warm-up: every target, every protocol, 1 s (connection pools, TLS session, page cache).
    for t in Target::ALL {
        wrk(&t.http1_url(), plan, 1)?;
        h2load(t.tls_port(), plan, 1, None)?;
    }
    let grpc_targets = [
        Target::Gateway,
        Target::Nginx,
        Target::Haproxy,
        Target::Floor,
    ];
    for t in grpc_targets {
        h2load(t.tls_port(), plan, 1, Some(&rig.grpc_body))?;
    }

    for round in 0..plan.rounds {
        let mut order = Target::ALL.to_vec();
        order.rotate_left(round % Target::ALL.len());
        let mut r1 = BTreeMap::new();
        let mut r2 = BTreeMap::new();
        let mut rg = BTreeMap::new();
        for &t in &order {
            let sampler = (t == Target::Gateway).then(|| RssSampler::start(gw_pid));
            let res = with_cpu(&rig.cpu_pids[&t], Duration::ZERO, plan.seconds, || {
                wrk(&t.http1_url(), plan, plan.seconds)
            })?;
            if let Some(sm) = sampler {
                peak_rss = peak_rss.max(sm.finish());
            }
            *errors.entry(format!("http1_{}", t.name())).or_default() += res.errors;
            r1.insert(t, res);
        }
        for &t in &order {
            let sampler = (t == Target::Gateway).then(|| RssSampler::start(gw_pid));
            let res = with_cpu(
                &rig.cpu_pids[&t],
                Duration::from_secs(H2LOAD_WARM_UP_S),
                plan.seconds,
                || h2load(t.tls_port(), plan, plan.seconds, None),
            )?;
            if let Some(sm) = sampler {
                peak_rss = peak_rss.max(sm.finish());
            }
            *errors.entry(format!("h2_{}", t.name())).or_default() += res.errors;
            r2.insert(t, res);
        }
        for &t in order.iter().filter(|t| grpc_targets.contains(t)) {
            let sampler = (t == Target::Gateway).then(|| RssSampler::start(gw_pid));
            let res = h2load(t.tls_port(), plan, plan.seconds, Some(&rig.grpc_body))?;
            if let Some(sm) = sampler {
                peak_rss = peak_rss.max(sm.finish());
            }
            *errors.entry(format!("grpc_{}", t.name())).or_default() += res.errors;
            rg.insert(t, res);
        }
        for (p, log) in &mut rig.procs {
            p.check_alive(log)?;
        }
        record_round(&mut s, round, plan.rounds, &r1, &r2, &rg);
    }

    let mut m: BTreeMap<String, f64> =
        s.0.keys()
            .filter_map(|k| Some((k.clone(), s.median(k)?)))
            .collect();
    m.insert("gateway_rss_mib_idle".into(), idle_rss as f64 / 1024.0);
    m.insert(
        "gateway_rss_mib_under_load_peak".into(),
        peak_rss as f64 / 1024.0,
    );
    let total_errors: u64 = errors.values().sum();
    for (k, v) in &errors {
        m.insert(format!("errors_{k}"), *v as f64);
    }
    m.insert("errors_total".into(), total_errors as f64);
    m.insert(
        "grpc_backend_requests".into(),
        rig.grpc_hits.load(Ordering::Relaxed) as f64,
    );
    m.insert("rounds".into(), plan.rounds as f64);
    m.insert("seconds_per_run".into(), f64::from(plan.seconds));
    let _ = std::fs::remove_dir_all(&rig.dir);
    Ok((m, s))
}

/// Prints the table of results with the goals.
pub fn print_report(m: &BTreeMap<String, f64>, s: &Samples) {
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    println!("\n== results (median over rounds)");
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14} {:>12}",
        "target",
        "http1 req/s",
        "http1 p50µs",
        "http1 p99µs",
        "h2 req/s",
        "grpc unary/s",
        "http1 CPU µs/r",
        "h2 CPU µs/r"
    );
    for t in Target::ALL {
        let n = t.name();
        println!(
            "{n:<8} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>14.0} {:>14.1} {:>12.1}",
            get(&format!("http1_rps_{n}")),
            get(&format!("http1_p50_us_{n}")),
            get(&format!("http1_p99_us_{n}")),
            get(&format!("h2_rps_{n}")),
            get(&format!("grpc_unary_rps_{n}")),
            get(&format!("cpu_us_per_req_http1_{n}")),
            get(&format!("cpu_us_per_req_h2_{n}")),
        );
    }
    println!(
        "(CPU: the target's processes per request, scheduler time; direct = the nginx backend)"
    );
    println!(
        "gateway RSS: idle {:.1} MiB, peak under load {:.1} MiB; errors (non-2xx, socket): {}",
        get("gateway_rss_mib_idle"),
        get("gateway_rss_mib_under_load_peak"),
        get("errors_total")
    );
    println!(
        "\n{:<36} {:>9} {:>17} {:>8}  verdict",
        "ratio", "median", "range over rounds", "goal"
    );
    for k in m.keys().filter(|k| k.contains("ratio")) {
        let v = m[k];
        let range = s
            .range(k)
            .map_or_else(String::new, |(lo, hi)| format!("{lo:.3}–{hi:.3}"));
        let (goal, verdict) = match GOALS.iter().find(|(name, _, _)| name == k) {
            Some((_, upper, bound)) => {
                let ok = if *upper { v <= *bound } else { v >= *bound };
                (
                    format!("{} {bound}", if *upper { "≤" } else { "≥" }),
                    if ok { "met" } else { "NOT MET" },
                )
            }
            None => (String::new(), ""),
        };
        println!("{k:<36} {v:>9.3} {range:>17} {goal:>8}  {verdict}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let text = "Running 2s test @ http://127.0.0.1:18100/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.00ms   90.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.50ms
     99%    2.50ms
  81234 requests in 2.00s, 10.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  40617.00
Transfer/sec:      5.00MB
";
        let r = parse_wrk(text).unwrap();
        assert!((r.rps - 40617.0).abs() < 1e-9);
        assert!((r.p50_us - 812.0).abs() < 1e-9);
        assert!((r.p99_us - 2500.0).abs() < 1e-9);
        assert_eq!(r.requests, 81234);
        assert_eq!(r.errors, 7);
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn h2load_output_is_parsed_and_non_2xx_counted() {
        let text = "finished in 2.00s, 30000.50 req/s, 1.20MB/s
requests: 60001 total, 60001 started, 60001 done, 59990 succeeded, 11 failed, 11 errored, 0 timeout
status codes: 59990 2xx, 0 3xx, 0 4xx, 5 5xx
time for request:      120us     10.00ms      300us      100us    90.00%
";
        let r = parse_h2load(text).unwrap();
        assert!((r.rps - 30000.5).abs() < 1e-9);
        assert_eq!(r.requests, 60001);
        assert_eq!(r.errors, 11);
        assert!((r.p50_us - 300.0).abs() < 1e-9);
        assert!(
            parse_h2load("finished in 1s, 0 req/s\nstatus codes: 0 2xx, 0 3xx, 0 4xx, 9 5xx\n")
                .is_err()
        );
    }

    #[test]
    fn parent_pid_is_read_after_the_command_name() {
        assert_eq!(
            parse_ppid("4242 (nginx) S 4200 4242 4242 0 -1 4194624 110 0 0 0"),
            Some(4200)
        );
        // A command name with spaces and a closing parenthesis of its own.
        assert_eq!(
            parse_ppid("77 (a) b (c)) R 1 77 77 0 -1 0 0 0 0 0"),
            Some(1)
        );
        assert_eq!(parse_ppid("77 (truncated"), None);
        assert_eq!(parse_ppid("77 (x) S"), None);
    }

    #[test]
    fn grpc_body_is_one_framed_message() {
        let b = grpc_request_body();
        assert_eq!(b[0], 0);
        assert_eq!(
            u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
            b.len() - 5
        );
    }
}
