//! The mtls benchmark (`cargo xtask bench mtls`): HBONE tunnel vs plaintext vs two nginx
//! `stream` TLS proxies between two harness nodes, the proxies' CPU and memory, and userspace
//! rustls vs kernel TLS for one bulk stream.
//!
//! Two nodes, a client pod on node 1 and a server pod on node 2 (nginx serving a 64-byte body on
//! ten ports, and `iperf3 -s`). Three paths, measured in the same run and interleaved, each
//! repetition rotating their order; the report is the median of per-repetition ratios:
//! - **plain**: client pod → server pod, plaintext;
//! - **tunnel**: client pod → its node's outbound listener → mTLS HTTP/2 `CONNECT` → node 2's
//!   inbound 15008 → server pod (client address preserved). Each node's proxies run in their own
//!   process (`mesh-node-proxy`), started by [`start_node_proxies`];
//! - **nginx**: a sidecar-style pair of nginx `stream` proxies, node 1 originating TLS 1.3 with a
//!   client certificate, node 2 terminating and verifying it;
//! - **floors**: the same pair topology without any TLS — an nginx `stream` pair relaying
//!   plaintext (`nginx_plain`) and an `HAProxy` `mode tcp` pair with `option splice-auto`
//!   (`haproxy_splice`: zero-copy `splice(2)`, the cheapest relay Linux offers). What a relay pair
//!   that does no crypto cannot reach here, no TLS pair can.

#![expect(
    clippy::cast_precision_loss,
    reason = "request, byte and tick counts shown as f64 are far below 2^52"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_agent::identity::SpiffeId;
use mesh_agent::proxy::testing::TestCa;
use serde::{Deserialize, Serialize};

pub use crate::samples::Samples;
use crate::{Cluster, NodeHandle, PodChild, PodHandle};

/// First of the server pod's HTTP ports (nginx, a 64-byte body), one per service.
pub const HTTP_PORT: u16 = 8080;
/// Services of the fixed-rate run (the server pod's ports `HTTP_PORT..HTTP_PORT + SERVICES`).
pub const SERVICES: u16 = 10;
/// The server pod's `iperf3 -s`.
pub const IPERF_PORT: u16 = 5201;
/// Node 1's outbound listeners: 15001 → HTTP, this → iperf3, [`TUNNEL_SERVICE_PORT`]`+ i` →
/// service `i`.
pub const TUNNEL_IPERF_PORT: u16 = 15002;
pub const TUNNEL_SERVICE_PORT: u16 = 15010;
/// The nginx pair: node 1 listens on the pod gateway (HTTP, iperf3) and originates TLS to node 2's
/// `NGINX_TLS_PORT + i`.
pub const NGINX_HTTP_PORT: u16 = 16001;
pub const NGINX_IPERF_PORT: u16 = 16002;
pub const NGINX_TLS_PORT: u16 = 16441;
/// The plaintext nginx pair: node 1 listens on the pod gateway (HTTP, iperf3), node 2 on
/// `NGINX_PLAIN_RELAY_PORT + i`.
pub const NGINX_PLAIN_HTTP_PORT: u16 = 16011;
pub const NGINX_PLAIN_IPERF_PORT: u16 = 16012;
pub const NGINX_PLAIN_RELAY_PORT: u16 = 16451;
/// The `HAProxy` splice pair, the same way.
pub const HAPROXY_HTTP_PORT: u16 = 16021;
pub const HAPROXY_IPERF_PORT: u16 = 16022;
pub const HAPROXY_RELAY_PORT: u16 = 16461;
/// The trust domain of the benchmark's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Rate of the latency run.
pub const RATE: u32 = 1_000;
/// Body nginx answers with.
const BODY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// File descriptors each process may hold (10,000 idle streams are 20,000 sockets in a proxy).
const NOFILE: u64 = 65_536;

/// How many and how long; `--quick` shrinks everything.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub reps: usize,
    pub wrk: Duration,
    pub iperf: Duration,
    pub rate: Duration,
    pub idle_streams: usize,
    pub tls_bytes: usize,
}

impl Plan {
    #[must_use]
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                reps: 1,
                wrk: Duration::from_secs(2),
                iperf: Duration::from_secs(2),
                rate: Duration::from_secs(3),
                idle_streams: 1_000,
                tls_bytes: 256 << 20,
            }
        } else {
            Self {
                reps: 5,
                wrk: Duration::from_secs(5),
                iperf: Duration::from_secs(5),
                rate: Duration::from_secs(10),
                idle_streams: 10_000,
                tls_bytes: 1 << 30,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The per-node proxy process

/// One service the client pod reaches through its node's proxy: a connection from the client pod
/// to `listen` on its node stands for one the capture redirected on its way to `dst_pod`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRoute {
    pub listen: u16,
    pub dst_pod: SocketAddr,
    pub dst_node: SocketAddr,
    pub dst_identity: String,
}

/// What `mesh-node-proxy` runs with: the node's workload certificate (DER), its root, its local
/// pod and the services its client pod reaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeProxyConfig {
    pub trust_domain: String,
    pub identity: String,
    pub root: Vec<u8>,
    pub cert: Vec<u8>,
    /// PKCS#8.
    pub key: Vec<u8>,
    pub local_pod: IpAddr,
    pub client_pod: IpAddr,
    pub services: Vec<ServiceRoute>,
    /// The proxies' workers (`ProxyParts::workers`, the agent's `proxy.workers`); 0: the proxies
    /// on one multi-thread runtime with one tunnel pool (the layout before workers).
    #[serde(default)]
    pub worker_threads: usize,
}

/// Raises `RLIMIT_NOFILE` to [`NOFILE`] (children inherit it); where raising the hard limit is
/// not permitted (a container without `CAP_SYS_RESOURCE`), the soft limit to the hard one.
/// Returns the limit in force.
pub fn raise_fd_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    for want in [
        libc::rlimit {
            rlim_cur: NOFILE.max(lim.rlim_max),
            rlim_max: NOFILE.max(lim.rlim_max),
        },
        libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        },
    ] {
        // SAFETY: setrlimit with a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const want) } == 0 {
            return Ok(want.rlim_cur);
        }
    }
    bail!(
        "setrlimit(RLIMIT_NOFILE, {}): {}",
        lim.rlim_max,
        std::io::Error::last_os_error()
    )
}

/// A binary built next to the running one (`cargo build --bins` puts them together).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to find the current executable")?;
    let path = exe.with_file_name(name);
    ensure!(
        path.is_file(),
        "{} not found: build it with `cargo build --release -p mesh-tests --bins`",
        path.display()
    );
    Ok(path)
}

/// Starts one node's proxies (inbound 15008 and outbound 15001 plus one listener per other
/// service) in their own process in `node`'s network namespace, and waits until they listen.
/// The one place to swap for the real agent binary once it runs the proxies.
pub fn start_node_proxies(
    node: &NodeHandle,
    config: &NodeProxyConfig,
    dir: &Path,
) -> Result<PodChild> {
    let path = dir.join(format!("node-proxy-{}.json", node.name()));
    std::fs::write(&path, serde_json::to_vec(config)?)
        .with_context(|| format!("failed to write {}", path.display()))?;
    let mut cmd = node.command(sibling("mesh-node-proxy")?);
    cmd.arg(&path);
    let mut child = node.spawn(cmd)?;
    child
        .wait_ready(Duration::from_secs(10))
        .with_context(|| format!("mesh-node-proxy on node {}", node.name()))?;
    Ok(child)
}

// ---------------------------------------------------------------------------------------------
// /proc

/// CPU time (utime + stime) of a process, in microseconds.
pub fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .zip(f.get(12).and_then(|s| s.parse::<u64>().ok()))
        .map(|(u, s)| u + s)
        .context("no utime/stime in /proc stat")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 * 1e6 / hz as f64)
}

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .context("no VmRSS")
}

// ---------------------------------------------------------------------------------------------
// Certificates for nginx and the bulk TLS stream (DNS names: nginx verifies host names)

struct PemPair {
    cert: String,
    key: String,
}

struct NginxPki {
    ca: String,
    server: PemPair,
    client: PemPair,
    /// DER of the server certificate and its PKCS#8 key, for the rustls bulk stream.
    server_der: (Vec<u8>, Vec<u8>),
    ca_der: Vec<u8>,
}

const SERVER_NAME: &str = "bench-server";

fn nginx_pki() -> Result<NginxPki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mesh-bench nginx root");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf = |name: &str, usage| -> Result<(PemPair, Vec<u8>, Vec<u8>)> {
        let mut p = CertificateParams::new(vec![name.to_owned()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok((
            PemPair {
                cert: cert.pem(),
                key: key.serialize_pem(),
            },
            cert.der().to_vec(),
            key.serialize_der(),
        ))
    };
    let (server, sder, skey) = leaf(SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client, _, _) = leaf("bench-client", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(NginxPki {
        ca: ca_cert.pem(),
        server,
        client,
        server_der: (sder, skey),
        ca_der: ca_cert.der().to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// nginx configurations (single process, one worker: `master_process off`)

fn nginx_head(dir: &Path, name: &str, stream: bool) -> String {
    let module = if stream {
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
    } else {
        ""
    };
    format!(
        "# mesh-bench mtls: {name}\n{module}daemon off;\nmaster_process off;\nworker_processes 1;\n\
 error_log stderr error;\npid {dir}/{name}.pid;\n\
         events {{ worker_connections 15000; }}\n",
        dir = dir.display()
    )
}

/// The server pod's HTTP server: a 64-byte body on every service port, keep-alive without limit,
/// idle connections kept for the idle-stream run.
fn nginx_server_conf(dir: &Path) -> String {
    let mut c = nginx_head(dir, "nginx-app", false);
    let tmp = dir.display();
    let _ = write!(
        c,
        "http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 600s;\n  \
         client_header_timeout 600s;\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  \
         fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n  \
         server {{\n"
    );
    for p in HTTP_PORT..HTTP_PORT + SERVICES {
        let _ = writeln!(c, "    listen {p} backlog=4096;");
    }
    let _ = write!(
        c,
        "    location / {{ default_type text/plain; return 200 \"{BODY}\"; }}\n  }}\n}}\n"
    );
    c
}

/// Node 1's nginx: plaintext from the pod, TLS 1.3 with a client certificate to node 2.
fn nginx_client_conf(dir: &Path, gateway: IpAddr, node2: IpAddr) -> String {
    let mut c = nginx_head(dir, "nginx-client", true);
    let d = dir.display();
    let _ = write!(
        c,
        "stream {{\n  proxy_ssl on;\n  proxy_ssl_protocols TLSv1.2 TLSv1.3;\n  \
         proxy_ssl_certificate {d}/client.pem;\n  proxy_ssl_certificate_key {d}/client.key;\n  \
         proxy_ssl_verify on;\n  proxy_ssl_trusted_certificate {d}/ca.pem;\n  proxy_ssl_name {SERVER_NAME};\n  \
         proxy_ssl_session_reuse on;\n"
    );
    for (i, port) in [NGINX_HTTP_PORT, NGINX_IPERF_PORT].iter().enumerate() {
        let _ = writeln!(
            c,
            "  server {{ listen {gateway}:{port} backlog=4096; proxy_pass {node2}:{}; }}",
            NGINX_TLS_PORT + u16::try_from(i).unwrap_or(0)
        );
    }
    c.push_str("}\n");
    c
}

/// Node 2's nginx: terminates TLS, requires and verifies the client certificate.
fn nginx_server_side_conf(dir: &Path, pod: IpAddr) -> String {
    let mut c = nginx_head(dir, "nginx-server", true);
    let d = dir.display();
    let _ = write!(
        c,
        "stream {{\n  ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_certificate {d}/server.pem;\n  \
         ssl_certificate_key {d}/server.key;\n  ssl_client_certificate {d}/ca.pem;\n  ssl_verify_client on;\n"
    );
    for (i, port) in [HTTP_PORT, IPERF_PORT].iter().enumerate() {
        let _ = writeln!(
            c,
            "  server {{ listen 0.0.0.0:{} ssl backlog=4096; proxy_pass {pod}:{port}; }}",
            NGINX_TLS_PORT + u16::try_from(i).unwrap_or(0)
        );
    }
    c.push_str("}\n");
    c
}

/// One side of the plaintext nginx pair: `listen` port `i` relayed to `to[i]`, no TLS.
fn nginx_plain_conf(
    dir: &Path,
    name: &str,
    listen: IpAddr,
    relays: &[(u16, SocketAddr)],
) -> String {
    let mut c = nginx_head(dir, name, true);
    c.push_str("stream {\n");
    for (port, to) in relays {
        let _ = writeln!(
            c,
            "  server {{ listen {listen}:{port} backlog=4096; proxy_pass {to}; }}"
        );
    }
    c.push_str("}\n");
    c
}

/// One side of the `HAProxy` splice pair: `mode tcp`, one thread (as nginx's one worker),
/// `option splice-auto` (`HAProxy` splices a stream's data between the sockets through a pipe
/// once it sees it streaming), no TLS. `maxconn` 5,000: the runs hold at most 160 connections
/// through a pair, and `HAProxy` refuses to start if `RLIMIT_NOFILE` cannot fit twice `maxconn`
/// (the harness's hard limit here is 20,000).
fn haproxy_conf(name: &str, listen: IpAddr, relays: &[(u16, SocketAddr)]) -> String {
    let mut c = format!(
        "# mesh-bench mtls: {name}\nglobal\n  nbthread 1\n  maxconn 5000\n\
         defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
         timeout client 600s\n  timeout server 600s\n"
    );
    for (i, (port, to)) in relays.iter().enumerate() {
        let _ = write!(
            c,
            "listen relay{i}\n  bind {listen}:{port} backlog 4096\n  server s{i} {to}\n"
        );
    }
    c
}

fn spawn_haproxy(place: &crate::Sandbox, conf: &Path) -> Result<PodChild> {
    let mut cmd = place.command("haproxy");
    // `-db`: foreground, no daemon.
    cmd.arg("-db").arg("-f").arg(conf);
    place.spawn(cmd)
}

fn spawn_nginx(place: &crate::Sandbox, conf: &Path) -> Result<PodChild> {
    let mut cmd = place.command("nginx");
    cmd.arg("-c").arg(conf);
    place.spawn(cmd)
}

// ---------------------------------------------------------------------------------------------
// Load generators

/// `wrk` result.
#[derive(Debug, Clone, Copy)]
pub struct WrkReport {
    pub requests: f64,
    pub rps: f64,
    pub errors: f64,
}

/// Parses `wrk`'s text output.
pub fn parse_wrk(text: &str) -> Result<WrkReport> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("no request count in wrk output: {text}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N".
    let mut errors = 0.0;
    for l in text.lines() {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>();
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(WrkReport {
        requests,
        rps,
        errors,
    })
}

fn wrk(pod: &PodHandle, target: SocketAddr, time: Duration) -> Result<WrkReport> {
    let mut cmd = pod.command("wrk");
    cmd.args([
        "-t2",
        "-c32",
        &format!("-d{}s", time.as_secs()),
        &format!("http://{target}/"),
    ]);
    let out = pod.output_timeout(cmd, time + Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk to {target} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = parse_wrk(&text)?;
    ensure!(
        r.errors == 0.0 && r.requests > 0.0,
        "wrk to {target}: {} errors of {} requests: {text}",
        r.errors,
        r.requests
    );
    Ok(r)
}

/// One `iperf3` stream: bits per second received.
fn iperf(pod: &PodHandle, target: SocketAddr, time: Duration) -> Result<f64> {
    let mut cmd = pod.command("iperf3");
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-t",
        &time.as_secs().to_string(),
        "-J",
    ]);
    let out = pod.output_timeout(cmd, time + Duration::from_secs(30))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 to {target}: not JSON"))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 to {target}: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 to {target}: no end.sum_received"))
}

/// A fixed-rate run's latencies, measured from each request's scheduled start (open loop: a
/// slow answer delays no later request, so coordinated omission cannot hide it).
#[derive(Debug, Clone, Default)]
pub struct RateReport {
    pub sent: usize,
    pub errors: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Keep-alive connections the client held (one per worker and target).
    pub connections: usize,
    /// Every answered request's latency, sorted.
    pub latencies_us: Vec<u64>,
}

/// Nearest-rank percentile of sorted `v`.
#[expect(
    clippy::cast_sign_loss,
    reason = "p in 0..=100 times a length: never negative"
)]
fn percentile(v: &[u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1] as f64
}

/// A keep-alive HTTP/1.1 connection of the fixed-rate client (blocking).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(to: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// One `GET /` and its whole answer (headers, then `Content-Length` bytes of body).
    fn get(&mut self) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        self.buf.clear();
        let mut chunk = [0_u8; 2048];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return Err(Error::other(format!(
                    "status {}",
                    head.lines().next().unwrap_or("")
                )));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Error::other("no content-length"))?;
            if self.buf.len() >= end + 4 + len {
                return Ok(());
            }
        }
    }
}

/// Workers of the fixed-rate client: requests in flight at once before one waits for a worker
/// (its wait still counts: latency runs from the scheduled start).
const RATE_WORKERS: usize = 16;

/// Sends `rate` requests per second for `time` from inside `netns` (this one if `None`), spread
/// round-robin over `targets`. A pacer thread (timer slack 1 ns, absolute schedule) hands each
/// request's scheduled start to [`RATE_WORKERS`] blocking workers, each with one keep-alive
/// connection per target (opened, and one request sent on it, before the run). Open loop: a slow
/// answer delays no later request's schedule, and latency is measured from the schedule, so
/// coordinated omission cannot hide a stall.
pub fn fixed_rate(
    netns: Option<&Path>,
    targets: &[SocketAddr],
    rate: u32,
    time: Duration,
) -> Result<RateReport> {
    fixed_rate_measured(netns, targets, rate, time, || Ok(()), |()| Ok(())).map(|(r, ())| r)
}

/// [`fixed_rate`], calling `start` once every connection is open and has had its untimed first
/// request, and `end` with what `start` returned once every timed request was answered, before
/// any connection closes: what the two measure (a process's CPU time, its context switches, a
/// tracer) is the steady state of keep-alive requests, without the connections' set-up (accept,
/// `CONNECT` stream, the inbound's connect to the pod, nginx's TLS handshake per connection) and
/// tear-down, which the run repeats for each of its [`RATE_WORKERS`] × targets connections.
#[expect(
    clippy::too_many_lines,
    reason = "workers, pacer and the measured span share their channels: one piece"
)]
pub fn fixed_rate_measured<S, E>(
    netns: Option<&Path>,
    targets: &[SocketAddr],
    rate: u32,
    time: Duration,
    start: impl FnOnce() -> Result<S>,
    end: impl FnOnce(S) -> Result<E>,
) -> Result<(RateReport, E)> {
    let period = Duration::from_secs(1) / rate;
    let total = usize::try_from(u128::from(rate) * time.as_millis() / 1000)?;
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<(usize, Instant)>();
    let jobs_rx = Arc::new(std::sync::Mutex::new(jobs_rx));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    // Each worker reports its latencies when the jobs run out, then keeps its connections open
    // until `release` is dropped (after `end`, or on any early return).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<(Vec<u64>, usize)>();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let held = Arc::new(std::sync::Mutex::new(held));
    let workers: Vec<_> = (0..RATE_WORKERS.min(total.max(1)))
        .map(|_| {
            let (netns, targets, jobs, ready, done, held) = (
                netns.map(Path::to_owned),
                targets.to_vec(),
                jobs_rx.clone(),
                ready_tx.clone(),
                done_tx.clone(),
                held.clone(),
            );
            std::thread::spawn(move || {
                // One untimed request per connection: through the tunnel, a new connection's
                // first request also waits for its CONNECT stream (and, past 100 streams, a new
                // pooled connection); the run measures the steady state.
                let entered = netns.as_deref().map_or(Ok(()), crate::hbone::enter);
                let conns: Result<Vec<Conn>> = entered.and_then(|()| {
                    targets
                        .iter()
                        .map(|t| {
                            let mut c = Conn::open(*t).with_context(|| format!("connect {t}"))?;
                            c.get().with_context(|| format!("first request to {t}"))?;
                            Ok(c)
                        })
                        .collect()
                });
                let mut conns = match conns {
                    Ok(c) => {
                        let _ = ready.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        let _ = done.send((Vec::new(), 0));
                        return;
                    }
                };
                let (mut lat, mut errors) = (Vec::new(), 0);
                loop {
                    let job = jobs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .recv();
                    let Ok((i, due)) = job else { break };
                    let t = i % conns.len();
                    let ok = conns[t].get().is_ok()
                        || Conn::open(targets[t]).is_ok_and(|c| {
                            conns[t] = c;
                            conns[t].get().is_ok()
                        });
                    if ok {
                        lat.push(u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX));
                    } else {
                        errors += 1;
                    }
                }
                let _ = done.send((lat, errors));
                // Until the caller has measured; an error (sender dropped) is the release.
                let _ = held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .recv();
                drop(conns);
            })
        })
        .collect();
    drop((ready_tx, done_tx));
    for r in ready_rx.iter().take(workers.len()) {
        r?;
    }
    let measuring = start()?;
    // SAFETY: prctl(PR_SET_TIMERSLACK) on this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_u64, 0_u64, 0_u64, 0_u64) };
    let start = Instant::now() + Duration::from_millis(10);
    for i in 0..total {
        let due = start + period * u32::try_from(i)?;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        jobs_tx.send((i, due))?;
    }
    drop(jobs_tx);
    let (mut v, mut errors) = (Vec::with_capacity(total), 0);
    for _ in 0..workers.len() {
        let (lat, e) = done_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("fixed-rate worker panicked"))?;
        v.extend(lat);
        errors += e;
    }
    let measured = end(measuring);
    drop(release);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("fixed-rate worker panicked"))?;
    }
    let measured = measured?;
    v.sort_unstable();
    let report = RateReport {
        sent: total,
        errors,
        p50_us: percentile(&v, 50.0),
        p99_us: percentile(&v, 99.0),
        max_us: v.last().map_or(f64::NAN, |m| *m as f64),
        connections: RATE_WORKERS * targets.len(),
        latencies_us: v,
    };
    Ok((report, measured))
}

/// Opens `n` connections from inside `netns` to `target` and holds them until `release` is
/// dropped; returns once all are established (at most 100 connects in flight).
fn hold_connections(
    netns: &Path,
    target: SocketAddr,
    n: usize,
) -> Result<(
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
)> {
    let netns = netns.to_owned();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || -> Result<()> {
        crate::hbone::enter(&netns)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let held = rt.block_on(async {
            let mut held = Vec::with_capacity(n);
            let mut opened = 0;
            while opened < n {
                let batch = (n - opened).min(100);
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..batch {
                    set.spawn(tokio::net::TcpStream::connect(target));
                }
                while let Some(r) = set.join_next().await {
                    held.push(r??);
                }
                opened += batch;
            }
            anyhow::Ok(held)
        });
        match held {
            Ok(held) => {
                let _ = up_tx.send(Ok(()));
                let _ = released.recv();
                drop(held);
                Ok(())
            }
            Err(e) => {
                let _ = up_tx.send(Err(anyhow::anyhow!("{e:#}")));
                Err(e)
            }
        }
    });
    up_rx
        .recv_timeout(Duration::from_mins(3))
        .context("idle connections not established in 3 minutes")??;
    Ok((release, thread))
}

/// Established TCP connections to `port` from `peer` in `place` (the server side), from `ss`.
fn established_from(place: &crate::Sandbox, port: u16, peer: IpAddr) -> Result<usize> {
    let out = place.exec(
        "ss",
        [
            "-Htn",
            "state",
            "established",
            &format!("( sport = :{port} and dst {peer} )"),
        ],
    )?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

// ---------------------------------------------------------------------------------------------
// One TLS stream: rustls in userspace vs the kernel's record layer

/// Whether this kernel has the TLS upper-layer protocol (`CONFIG_TLS`): `setsockopt(TCP_ULP,
/// "tls")` on a connected socket. `Err` says why not.
pub fn ktls_probe() -> Result<(), String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let s = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let name = b"tls";
    // SAFETY: setsockopt with a buffer of the length given, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            3,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = std::io::Error::last_os_error();
        let ulps =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
        Err(format!(
            "setsockopt(TCP_ULP, \"tls\"): {e} (tcp_available_ulp: {:?}; `modprobe tls` needs a kernel built with CONFIG_TLS)",
            ulps.trim()
        ))
    }
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// One bulk TLS 1.3 stream over loopback with rustls in userspace on both ends (blocking
/// sockets, 64 KiB writes): (bytes per second, CPU µs of both ends per MiB).
fn rustls_stream(pki: &NginxPki, bytes: usize) -> Result<(f64, f64)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(pki.server_der.0.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_der.1.clone())),
        )?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pki.ca_der.clone()))?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = Arc::new(server);
    let srv = std::thread::spawn(move || -> Result<(usize, f64)> {
        let (sock, _) = listener.accept()?;
        let cpu0 = thread_cpu_us();
        let conn = rustls::ServerConnection::new(server)?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = vec![0_u8; 1 << 16];
        let mut got = 0;
        loop {
            match tls.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok((got, thread_cpu_us() - cpu0))
    });
    let sock = TcpStream::connect(addr)?;
    let cpu0 = thread_cpu_us();
    let started = Instant::now();
    let conn = rustls::ClientConnection::new(Arc::new(client), ServerName::try_from(SERVER_NAME)?)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let chunk = vec![0x5a_u8; 1 << 16];
    let mut sent = 0;
    while sent < bytes {
        tls.write_all(&chunk)?;
        sent += chunk.len();
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    tls.sock.shutdown(std::net::Shutdown::Write)?;
    let client_cpu = thread_cpu_us() - cpu0;
    let (got, server_cpu) = srv
        .join()
        .map_err(|_| anyhow::anyhow!("TLS server thread panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    ensure!(got == sent, "TLS stream: sent {sent} bytes, received {got}");
    let mib = sent as f64 / f64::from(1_u32 << 20);
    Ok((sent as f64 / secs, (client_cpu + server_cpu) / mib))
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping and report

/// Goals of issue 9: (metric, is an upper bound, bound).
pub const GOALS: [(&str, bool, f64); 9] = [
    ("tunnel_rps_ratio_vs_plain", false, 0.60),
    ("tunnel_throughput_ratio_vs_plain", false, 0.50),
    ("tunnel_throughput_ratio_vs_nginx_pair", false, 1.0),
    ("added_latency_p99_us_at_1000rps", true, 100.0),
    ("agent_cpu_us_per_req", true, 25.0),
    ("agent_rss_mb", true, 16.0),
    ("rss_kb_per_idle_stream", true, 16.0),
    // kTLS is kept only if it wins (> 1 throughput, < 1 CPU).
    ("ktls_throughput_ratio_vs_rustls", false, 1.0),
    ("ktls_cpu_ratio_vs_rustls", true, 1.0),
];

/// Met / MISSED for a goal key, `None` for other keys.
#[must_use]
pub fn verdict(key: &str, v: f64) -> Option<bool> {
    GOALS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, upper, bound)| if *upper { v <= *bound } else { v >= *bound })
}

fn print_report(m: &BTreeMap<String, f64>, s: &Samples) {
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    println!("\n== results (medians over repetitions)");
    println!(
        "{:<15} {:>12} {:>12} {:>11} {:>15} {:>15} {:>14}",
        "path", "req/s (32c)", "bulk Gbit/s", "CPU s/GiB", "p50/p99 µs", "CPU µs/req", "CPU µs/req"
    );
    println!(
        "{:<15} {:>12} {:>12} {:>11} {:>15} {:>15} {:>14}",
        "", "", "", "(bulk)", "@1000/s", "@1000/s", "(saturated)"
    );
    for p in PATHS {
        let cpu_at_rate = match p {
            "plain" => f64::NAN,
            "tunnel" => get("agent_cpu_us_per_req"),
            "nginx" => get("nginx_pair_cpu_us_per_req_at_1000rps"),
            _ => get(&format!("{p}_pair_cpu_us_per_req_at_1000rps")),
        };
        println!(
            "{p:<15} {:>12.0} {:>12.2} {:>11.2} {:>7.0}/{:<7.0} {:>15.1} {:>14.1}",
            get(&format!("rps_{p}")),
            get(&format!("throughput_gbps_{p}")),
            get(&format!("proxy_cpu_s_per_gib_{p}")),
            get(&format!("latency_p50_us_at_1000rps_{p}")),
            get(&format!("latency_p99_us_at_1000rps_{p}")),
            cpu_at_rate,
            get(&format!("proxy_cpu_us_per_req_saturated_{p}")),
        );
    }
    for p in FLOORS {
        println!(
            "floor {p:<15} throughput ratio vs plain {:.3}, CPU {:.1} µs/req at {RATE}/s, added p50 {:.0} µs / p99 {:.0} µs at {RATE}/s",
            get(&format!("{p}_pair_throughput_ratio_vs_plain")),
            get(&format!("{p}_pair_cpu_us_per_req_at_1000rps")),
            get(&format!("{p}_pair_added_latency_p50_us_at_1000rps")),
            get(&format!("{p}_pair_added_latency_p99_us_at_1000rps")),
        );
    }
    println!(
        "tunnel CPU split at 1,000 req/s: outbound (node 1) {:.1} µs/req, inbound (node 2) {:.1} µs/req; RSS node 1 {:.1} MB, node 2 {:.1} MB",
        get("agent_cpu_us_per_req_outbound"),
        get("agent_cpu_us_per_req_inbound"),
        get("agent_rss_mb_outbound"),
        get("agent_rss_mb_inbound"),
    );
    println!(
        "one bulk stream, CPU per GiB: tunnel's two proxies {:.2} s, nginx pair {:.2} s; rustls alone (both ends of one loopback stream) {:.2} s",
        get("proxy_cpu_s_per_gib_tunnel"),
        get("proxy_cpu_s_per_gib_nginx"),
        get("rustls_stream_cpu_us_per_mib") * 1024.0 / 1e6,
    );
    println!(
        "idle streams: {:.0} held; RSS +{:.1} MB outbound, +{:.1} MB inbound",
        get("idle_streams"),
        get("idle_rss_delta_mb_outbound"),
        get("idle_rss_delta_mb_inbound"),
    );
    println!(
        "one TLS stream on loopback, rustls in userspace: {:.2} Gbit/s, {:.0} µs CPU/MiB (both ends); kTLS available: {}",
        get("rustls_stream_gbps"),
        get("rustls_stream_cpu_us_per_mib"),
        match get("ktls_available") {
            v if v.is_nan() => "not probed",
            v if v > 0.0 => "yes",
            _ => "no",
        },
    );
    println!(
        "\n{:<44} {:>10} {:>21} {:>8}  verdict",
        "key", "median", "range over reps", "goal"
    );
    for (k, upper, bound) in GOALS {
        let v = get(k);
        let range = s
            .range(k)
            .map_or_else(String::new, |(lo, hi)| format!("{lo:.3}–{hi:.3}"));
        let verdict = match verdict(k, v) {
            _ if v.is_nan() => "not measured",
            Some(true) => "met",
            _ => "MISSED",
        };
        let sign = if upper { "≤" } else { "≥" };
        println!("{k:<44} {v:>10.3} {range:>21} {sign:>2}{bound:>6}  {verdict}");
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// CPU time of a process's live threads, in microseconds, from the scheduler's own account
/// (`/proc/PID/task/*/schedstat`, nanoseconds): a 1-second run at 1,000 req/s costs a proxy a
/// few clock ticks, too coarse for [`cpu_us`].
pub fn cpu_us_precise(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0_u64;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // A thread that ended meanwhile has no schedstat: it runs no more.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("bad schedstat under {dir}"))?;
    }
    Ok(ns as f64 / 1e3)
}

/// Context switches of a process so far, summed over its threads: voluntary (a sleep: at a low
/// request rate, one per wake-up) and, unless `voluntary_only`, not (a preemption).
pub fn ctxt_switches(pid: u32, voluntary_only: bool) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0.0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("status");
        // A thread that ended meanwhile has no status: it switches no more.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:").or_else(|| {
                    (!voluntary_only)
                        .then(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                        .flatten()
                })
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

/// The paths, in the order of one repetition (rotated each repetition).
const PATHS: [&str; 5] = ["plain", "tunnel", "nginx", "nginx_plain", "haproxy_splice"];
/// The floors among [`PATHS`]: relay pairs without TLS.
const FLOORS: [&str; 2] = ["nginx_plain", "haproxy_splice"];

struct Bench {
    plan: Plan,
    diag: Option<Diag>,
    // Field order is drop order: processes before the cluster.
    proxies: [PodChild; 2],
    nginx_pair: [PodChild; 2],
    nginx_plain_pair: [PodChild; 2],
    haproxy_pair: [PodChild; 2],
    app: PodChild,
    iperf: PodChild,
    client: PodHandle,
    server: PodHandle,
    n1: NodeHandle,
    cluster: Cluster,
    pki: NginxPki,
}

/// What `mesh-bench mtls` was asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub quick: bool,
    /// `paths`, `idle` or `tls`; all when `None`.
    pub only: Option<String>,
    pub diag: Option<Diag>,
    /// The proxies' workers; `None`: the agent's default (`proxy.workers`).
    pub proxy_threads: Option<usize>,
    pub out: PathBuf,
}

/// Runs the suite and writes `opts.out` (flat JSON `{"metric": number}`).
pub fn run(opts: &Options) -> Result<()> {
    let (quick, only, diag, out) = (
        opts.quick,
        opts.only.as_deref(),
        opts.diag,
        opts.out.as_path(),
    );
    ensure!(
        crate::is_root(),
        "the mtls benchmark needs root (namespaces, cgroups): run `cargo xtask bench mtls` as root"
    );
    let started = Instant::now();
    let plan = Plan::new(quick);
    let dir = out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("mtls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let nofile = raise_fd_limit()?;
    ensure!(
        nofile > plan.idle_streams as u64 + 1_000,
        "RLIMIT_NOFILE is {nofile}: too few for {} idle streams",
        plan.idle_streams
    );
    println!(
        "mesh-bench mtls{}\ncommand:  {}\nmachine:  Linux {}, {} CPUs\nnginx:    {} (stream, one worker per side, TLS 1.3, client certificates)\nplan:     {} reps; wrk -t2 -c32 {} s; iperf3 one stream {} s; {RATE} req/s open loop {} s over {SERVICES} services; {} idle tunnelled connections",
        if quick { " (quick)" } else { "" },
        std::env::var("MESH_BENCH_COMMAND").unwrap_or_else(|_| "mesh-bench mtls".to_owned()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(1, usize::from),
        first_line("nginx", &["-v"]),
        plan.reps,
        plan.wrk.as_secs(),
        plan.iperf.as_secs(),
        plan.rate.as_secs(),
        plan.idle_streams,
    );
    let proxy_threads = opts.proxy_threads.unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        mesh_agent::config::DEFAULT_PROXY_WORKERS.min(cpus)
    });
    let mut bench = Bench::setup(plan, &dir, proxy_threads)?;
    bench.diag = diag;
    let mut s = Samples::default();
    let part = |name: &str| only.is_none_or(|o| o == name);
    if part("paths") {
        for rep in 0..plan.reps {
            println!("rep {}/{}", rep + 1, plan.reps);
            bench.rep(rep, &mut s)?;
        }
    }
    let idle = if part("idle") {
        bench.idle_streams(&mut s)
    } else {
        Ok(())
    };
    if let Err(e) = &idle {
        println!("  idle streams: {e:#}");
    }
    let tls = if part("tls") {
        tls_stream(&bench.pki, plan, &mut s)
    } else {
        Ok(())
    };
    let mut metrics = s.medians();
    metrics.insert("bench_reps".to_owned(), plan.reps as f64);
    metrics.insert("bench_proxy_threads".to_owned(), proxy_threads as f64);
    metrics.insert(
        "bench_cpus".to_owned(),
        std::thread::available_parallelism().map_or(1, usize::from) as f64,
    );
    print_report(&metrics, &s);
    let json = serde_json::to_string_pretty(&metrics)?;
    std::fs::write(out, format!("{json}\n"))
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("wrote {} ({} metrics)", out.display(), metrics.len());
    bench.finish()?;
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    idle?;
    tls
}

fn first_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map_or_else(
            |_| format!("{program}: not found"),
            |o| {
                let t = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&t)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            },
        )
}

impl Bench {
    fn setup(plan: Plan, dir: &Path, proxy_threads: usize) -> Result<Self> {
        let cluster = Cluster::new("bench_mtls")?;
        let n1 = cluster.add_node("n1")?;
        let n2 = cluster.add_node("n2")?;
        let client = cluster.add_pod(&n1, "client")?;
        let server = cluster.add_pod(&n2, "server")?;
        let client_ip = IpAddr::from(client.ipv4());
        let server_ip = IpAddr::from(server.ipv4());

        // The server pod: nginx on the service ports, iperf3.
        let conf = dir.join("nginx-app.conf");
        std::fs::write(&conf, nginx_server_conf(dir))?;
        let mut app = spawn_nginx(&server, &conf)?;
        let mut iperf = server.spawn({
            let mut c = server.command("iperf3");
            c.args(["-s", "-p", &IPERF_PORT.to_string()]);
            c
        })?;
        wait_listening(
            &server,
            &[HTTP_PORT, IPERF_PORT],
            &mut [&mut app, &mut iperf],
        )?;

        // HBONE: each node's proxies in their own process.
        let ca = TestCa::new("mesh-bench mtls root")?;
        let src: SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/a/sa/client").parse()?;
        let dst: SpiffeId = format!("spiffe://{TRUST_DOMAIN}/ns/b/sa/server").parse()?;
        let node2_hbone = SocketAddr::new(n2.ipv4().into(), mesh_agent::proxy::HBONE_PORT);
        let route = |listen, port| ServiceRoute {
            listen,
            dst_pod: SocketAddr::new(server_ip, port),
            dst_node: node2_hbone,
            dst_identity: dst.to_string(),
        };
        let mut services = vec![
            route(mesh_agent::proxy::OUTBOUND_PORT, HTTP_PORT),
            route(TUNNEL_IPERF_PORT, IPERF_PORT),
        ];
        services.extend((0..SERVICES).map(|i| route(TUNNEL_SERVICE_PORT + i, HTTP_PORT + i)));
        let config = |id: &SpiffeId, local_pod, services| -> Result<NodeProxyConfig> {
            let cert = ca.issue(id)?;
            Ok(NodeProxyConfig {
                trust_domain: TRUST_DOMAIN.to_owned(),
                identity: id.to_string(),
                root: ca.root().to_vec(),
                cert: cert.chain[0].to_vec(),
                key: cert.key.secret_der().to_vec(),
                local_pod,
                client_pod: client_ip,
                services,
                worker_threads: proxy_threads,
            })
        };
        let p1 = start_node_proxies(&n1, &config(&src, client_ip, services)?, dir)?;
        let p2 = start_node_proxies(&n2, &config(&dst, server_ip, Vec::new())?, dir)?;

        let (ng1, ng2, pki) = start_nginx_pair(&n1, &n2, server_ip, dir)?;
        let (nginx_plain_pair, haproxy_pair) = start_plain_pairs(&n1, &n2, server_ip, dir)?;

        let bench = Self {
            plan,
            diag: None,
            proxies: [p1, p2],
            nginx_pair: [ng1, ng2],
            nginx_plain_pair,
            haproxy_pair,
            app,
            iperf,
            client,
            server,
            n1,
            cluster,
            pki,
        };
        // Every path answers before anything is timed.
        for p in PATHS {
            let r = fixed_rate(
                Some(bench.client.netns_path()),
                &[bench.http_target(p)],
                100,
                Duration::from_millis(200),
            )
            .with_context(|| format!("the {p} path does not answer"))?;
            ensure!(
                r.errors == 0,
                "the {p} path: {} of {} requests failed",
                r.errors,
                r.sent
            );
        }
        Ok(bench)
    }

    /// Stops every process, then removes the cluster.
    fn finish(self) -> Result<()> {
        let Self {
            proxies,
            nginx_pair,
            nginx_plain_pair,
            haproxy_pair,
            app,
            iperf,
            cluster,
            ..
        } = self;
        for (node, mut p) in ["node 1", "node 2"].into_iter().zip(proxies) {
            p.close_stdin();
            let _ = p.wait_timeout(Duration::from_secs(5));
            println!("{node} proxy: {}", tail(&p.stderr_text()));
        }
        drop((nginx_pair, nginx_plain_pair, haproxy_pair, app, iperf));
        cluster.teardown()
    }

    fn http_target(&self, path: &str) -> SocketAddr {
        let gw = IpAddr::from(self.n1.gateway_v4());
        match path {
            "tunnel" => SocketAddr::new(gw, mesh_agent::proxy::OUTBOUND_PORT),
            "nginx" => SocketAddr::new(gw, NGINX_HTTP_PORT),
            "nginx_plain" => SocketAddr::new(gw, NGINX_PLAIN_HTTP_PORT),
            "haproxy_splice" => SocketAddr::new(gw, HAPROXY_HTTP_PORT),
            _ => SocketAddr::new(self.server.ipv4().into(), HTTP_PORT),
        }
    }

    fn iperf_target(&self, path: &str) -> SocketAddr {
        let gw = IpAddr::from(self.n1.gateway_v4());
        match path {
            "tunnel" => SocketAddr::new(gw, TUNNEL_IPERF_PORT),
            "nginx" => SocketAddr::new(gw, NGINX_IPERF_PORT),
            "nginx_plain" => SocketAddr::new(gw, NGINX_PLAIN_IPERF_PORT),
            "haproxy_splice" => SocketAddr::new(gw, HAPROXY_IPERF_PORT),
            _ => SocketAddr::new(self.server.ipv4().into(), IPERF_PORT),
        }
    }

    /// The processes carrying `path` (none for plain).
    fn pids(&self, path: &str) -> Vec<u32> {
        match path {
            "tunnel" => self.proxies.iter().map(PodChild::pid).collect(),
            "nginx" => self.nginx_pair.iter().map(PodChild::pid).collect(),
            "nginx_plain" => self.nginx_plain_pair.iter().map(PodChild::pid).collect(),
            "haproxy_splice" => self.haproxy_pair.iter().map(PodChild::pid).collect(),
            _ => Vec::new(),
        }
    }

    /// The `--diag` tool on both proxies of `path` (the tunnel's or a pair's), for the
    /// runs of the first repetition.
    fn attach(&self, path: &str, rep: usize) -> Result<Option<Attached>> {
        match self.diag {
            Some(d) if path != "plain" && rep == 0 => {
                Ok(Some(Attached::start(d, &self.pids(path))?))
            }
            _ => Ok(None),
        }
    }

    fn cpu(&self, path: &str) -> Result<Vec<f64>> {
        self.pids(path).into_iter().map(cpu_us).collect()
    }

    fn rep(&mut self, rep: usize, s: &mut Samples) -> Result<()> {
        let order: Vec<&str> = (0..PATHS.len())
            .map(|i| PATHS[(i + rep) % PATHS.len()])
            .collect();
        // Keep-alive requests per second, 32 connections.
        let mut rps = BTreeMap::new();
        for p in &order {
            let attached = self.attach(p, rep)?;
            let before = self.cpu(p)?;
            let r = wrk(&self.client, self.http_target(p), self.plan.wrk)?;
            let after = self.cpu(p)?;
            if let Some(a) = attached {
                a.report(r.requests, "request (wrk, 32 connections)")?;
            }
            let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            rps.insert(*p, r.rps);
            s.push(format!("rps_{p}"), r.rps);
            if *p != "plain" {
                s.push(
                    format!("proxy_cpu_us_per_req_saturated_{p}"),
                    cpu / r.requests,
                );
            }
            println!("  wrk    {p:<7} {:>9.0} req/s", r.rps);
        }
        s.push("tunnel_rps_ratio_vs_plain", rps["tunnel"] / rps["plain"]);
        s.push("nginx_rps_ratio_vs_plain", rps["nginx"] / rps["plain"]);
        for p in FLOORS {
            s.push(
                format!("{p}_pair_rps_ratio_vs_plain"),
                rps[p] / rps["plain"],
            );
        }
        self.bulk(rep, &order, s)?;
        self.rate(rep, s)
    }

    /// One bulk stream per path.
    fn bulk(&self, rep: usize, order: &[&str], s: &mut Samples) -> Result<()> {
        // One bulk stream.
        let mut bps = BTreeMap::new();
        for p in order {
            let attached = self.attach(p, rep)?;
            let before = self.cpu(p)?;
            let b = iperf(&self.client, self.iperf_target(p), self.plan.iperf)?;
            let after = self.cpu(p)?;
            if let Some(a) = attached {
                let mib = b / 8.0 * self.plan.iperf.as_secs_f64() / f64::from(1_u32 << 20);
                a.report(mib, "MiB (iperf3, one stream)")?;
            }
            let cpu: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
            bps.insert(*p, b);
            s.push(format!("throughput_gbps_{p}"), b / 1e9);
            if *p != "plain" {
                let gib = b / 8.0 * self.plan.iperf.as_secs_f64() / f64::from(1_u32 << 30);
                s.push(format!("proxy_cpu_s_per_gib_{p}"), cpu / 1e6 / gib);
            }
            println!("  iperf3 {p:<7} {:>9.2} Gbit/s", b / 1e9);
        }
        s.push(
            "tunnel_throughput_ratio_vs_plain",
            bps["tunnel"] / bps["plain"],
        );
        s.push(
            "tunnel_throughput_ratio_vs_nginx_pair",
            bps["tunnel"] / bps["nginx"],
        );
        s.push(
            "nginx_throughput_ratio_vs_plain",
            bps["nginx"] / bps["plain"],
        );
        for p in FLOORS {
            s.push(
                format!("{p}_pair_throughput_ratio_vs_plain"),
                bps[p] / bps["plain"],
            );
        }
        Ok(())
    }

    /// The fixed-rate runs.
    #[expect(
        clippy::too_many_lines,
        reason = "one measured sequence (rounds, then their keys) reads best top to bottom"
    )]
    fn rate(&self, rep: usize, s: &mut Samples) -> Result<()> {
        // Fixed rate over ten services, all paths, in one-second rounds whose order rotates so
        // that load from outside the benchmark falls on each alike; percentiles over all of a
        // path's rounds. The pairs have one service here: its target is repeated ten times, so
        // each gets as many keep-alive connections (each its own connection through the pair:
        // nginx `stream` and HAProxy `mode tcp` do not pool) as the others.
        const RATE_PATHS: [&str; 5] = PATHS;
        let mut lat: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        // Per proxied path: CPU µs and context switches per process, requests sent.
        let mut cpu: BTreeMap<&str, [f64; 2]> = BTreeMap::new();
        let mut switches: BTreeMap<&str, [f64; 2]> = BTreeMap::new();
        let mut sleeps: BTreeMap<&str, [f64; 2]> = BTreeMap::new();
        // CPU over the whole run, with the set-up and tear-down of its 160 connections (how
        // `agent_cpu_us_per_req` was measured up to session 19).
        let mut whole_cpu: BTreeMap<&str, [f64; 2]> = BTreeMap::new();
        let mut sent: BTreeMap<&str, usize> = BTreeMap::new();
        let mut tunnel_rss = [0.0_f64; 2];
        let mut connections = 0;
        let rounds = self.plan.rate.as_secs().max(1);
        for round in 0..rounds {
            let first = usize::try_from(round).unwrap_or(0) + rep;
            for slot in 0..RATE_PATHS.len() {
                let p = RATE_PATHS[(first + slot) % RATE_PATHS.len()];
                let targets: Vec<SocketAddr> = (0..SERVICES)
                    .map(|i| match p {
                        "tunnel" => {
                            SocketAddr::new(self.n1.gateway_v4().into(), TUNNEL_SERVICE_PORT + i)
                        }
                        "plain" => SocketAddr::new(self.server.ipv4().into(), HTTP_PORT + i),
                        _ => self.http_target(p),
                    })
                    .collect();
                let pids = self.pids(p);
                let before = self.cpu(p)?;
                // Steady state: from all connections open to all requests answered (the tracer
                // of `--diag` too: attached and stopped inside that span).
                let (r, rss, steady) = self.rate_sampling_rss(
                    &targets,
                    &pids,
                    Duration::from_secs(1),
                    || {
                        let attached = if round == 0 {
                            self.attach(p, rep)?
                        } else {
                            None
                        };
                        let sw = (self.switches(p, false)?, self.switches(p, true)?);
                        Ok((attached, self.cpu_precise(p)?, sw))
                    },
                    |(attached, cpu0, sw0)| {
                        let cpu1 = self.cpu_precise(p)?;
                        let sw1 = (self.switches(p, false)?, self.switches(p, true)?);
                        if let Some(a) = attached {
                            a.report(f64::from(RATE), "request (1,000/s, steady state)")?;
                        }
                        let d = |a: Vec<f64>, b: Vec<f64>| -> Vec<f64> {
                            b.iter().zip(&a).map(|(b, a)| b - a).collect()
                        };
                        Ok((d(cpu0, cpu1), d(sw0.0, sw1.0), d(sw0.1, sw1.1)))
                    },
                )?;
                let after = self.cpu(p)?;
                ensure!(
                    r.errors == 0,
                    "{p} at {RATE} req/s: {} of {} requests failed",
                    r.errors,
                    r.sent
                );
                connections = r.connections;
                lat.entry(p).or_default().extend(&r.latencies_us);
                if p != "plain" {
                    let (cpu_sum, sw_sum) =
                        (cpu.entry(p).or_default(), switches.entry(p).or_default());
                    let vol_sum = sleeps.entry(p).or_default();
                    let whole = whole_cpu.entry(p).or_default();
                    for i in 0..2 {
                        cpu_sum[i] += steady.0[i];
                        sw_sum[i] += steady.1[i];
                        vol_sum[i] += steady.2[i];
                        whole[i] += after[i] - before[i];
                    }
                    *sent.entry(p).or_default() += r.sent;
                }
                if p == "tunnel" {
                    for i in 0..2 {
                        tunnel_rss[i] = tunnel_rss[i].max(rss[i]);
                    }
                }
            }
        }
        let mut p50 = BTreeMap::new();
        let mut p99 = BTreeMap::new();
        for (p, v) in &mut lat {
            v.sort_unstable();
            let (p50v, p99v) = (percentile(v, 50.0), percentile(v, 99.0));
            p50.insert(*p, p50v);
            p99.insert(*p, p99v);
            s.push(format!("latency_p50_us_at_1000rps_{p}"), p50v);
            s.push(format!("latency_p99_us_at_1000rps_{p}"), p99v);
            s.push(
                format!("latency_max_us_at_1000rps_{p}"),
                v.last().map_or(f64::NAN, |m| *m as f64),
            );
            println!(
                "  {RATE}/s  {p:<7} p50 {p50v:>7.0} µs  p99 {p99v:>7.0} µs  ({} requests, {connections} keep-alive connections, {rounds} rounds)",
                v.len()
            );
        }
        s.push(
            "added_latency_p50_us_at_1000rps",
            p50["tunnel"] - p50["plain"],
        );
        s.push(
            "added_latency_p99_us_at_1000rps",
            p99["tunnel"] - p99["plain"],
        );
        s.push(
            "nginx_pair_added_latency_p50_us_at_1000rps",
            p50["nginx"] - p50["plain"],
        );
        s.push(
            "nginx_pair_added_latency_p99_us_at_1000rps",
            p99["nginx"] - p99["plain"],
        );
        for p in FLOORS {
            s.push(
                format!("{p}_pair_added_latency_p50_us_at_1000rps"),
                p50[p] - p50["plain"],
            );
            s.push(
                format!("{p}_pair_added_latency_p99_us_at_1000rps"),
                p99[p] - p99["plain"],
            );
        }
        let per = |p: &str, of: &BTreeMap<&str, [f64; 2]>| {
            let n = sent.get(p).copied().unwrap_or(0).max(1) as f64;
            of.get(p).copied().unwrap_or_default().map(|c| c / n)
        };
        let (tunnel, nginx) = (per("tunnel", &cpu), per("nginx", &cpu));
        s.push("agent_cpu_us_per_req", tunnel[0] + tunnel[1]);
        s.push("agent_cpu_us_per_req_outbound", tunnel[0]);
        s.push("agent_cpu_us_per_req_inbound", tunnel[1]);
        s.push("nginx_pair_cpu_us_per_req_at_1000rps", nginx[0] + nginx[1]);
        for p in FLOORS {
            let c = per(p, &cpu);
            s.push(format!("{p}_pair_cpu_us_per_req_at_1000rps"), c[0] + c[1]);
        }
        s.push(
            "agent_cpu_ratio_vs_nginx_pair_at_1000rps",
            (tunnel[0] + tunnel[1]) / (nginx[0] + nginx[1]),
        );
        let (tunnel_whole, nginx_whole) = (per("tunnel", &whole_cpu), per("nginx", &whole_cpu));
        s.push(
            "agent_cpu_us_per_req_with_connection_setup",
            tunnel_whole[0] + tunnel_whole[1],
        );
        s.push(
            "nginx_pair_cpu_us_per_req_at_1000rps_with_connection_setup",
            nginx_whole[0] + nginx_whole[1],
        );
        println!(
            "  {RATE}/s  with the runs' connection set-up and tear-down: tunnel {:.1} µs/req, nginx pair {:.1} µs/req",
            tunnel_whole[0] + tunnel_whole[1],
            nginx_whole[0] + nginx_whole[1],
        );
        for p in PATHS.into_iter().skip(1) {
            let w = per(p, &switches);
            s.push(format!("ctxt_switches_per_req_at_1000rps_{p}"), w[0] + w[1]);
            let v = per(p, &sleeps);
            s.push(
                format!("voluntary_ctxt_switches_per_req_at_1000rps_{p}"),
                v[0] + v[1],
            );
            println!(
                "  {RATE}/s  {p:<7} proxies' CPU {:.1} µs/req (node 1 {:.1}, node 2 {:.1}), context switches {:.2}/req (node 1 {:.2}, node 2 {:.2}; voluntary {:.2})",
                per(p, &cpu)[0] + per(p, &cpu)[1],
                per(p, &cpu)[0],
                per(p, &cpu)[1],
                w[0] + w[1],
                w[0],
                w[1],
                v[0] + v[1],
            );
        }
        s.push("agent_rss_mb_outbound", tunnel_rss[0] / 1024.0);
        s.push("agent_rss_mb_inbound", tunnel_rss[1] / 1024.0);
        s.push("agent_rss_mb", tunnel_rss[0].max(tunnel_rss[1]) / 1024.0);
        Ok(())
    }

    fn cpu_precise(&self, path: &str) -> Result<Vec<f64>> {
        self.pids(path).into_iter().map(cpu_us_precise).collect()
    }

    /// Context switches (voluntary and not) of each of `path`'s processes, all threads.
    fn switches(&self, path: &str, voluntary_only: bool) -> Result<Vec<f64>> {
        self.pids(path)
            .into_iter()
            .map(|pid| ctxt_switches(pid, voluntary_only))
            .collect()
    }

    /// The fixed-rate run ([`fixed_rate_measured`] with `start` and `end`), sampling the `pids`'
    /// RSS every 100 ms: (report, peak KiB per pid, what `end` returned).
    fn rate_sampling_rss<S, E>(
        &self,
        targets: &[SocketAddr],
        pids: &[u32],
        time: Duration,
        start: impl FnOnce() -> Result<S>,
        end: impl FnOnce(S) -> Result<E>,
    ) -> Result<(RateReport, Vec<f64>, E)> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let watched = pids.to_vec();
        let sampler = std::thread::spawn(move || {
            let mut peak = vec![0.0_f64; watched.len()];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (p, pid) in peak.iter_mut().zip(&watched) {
                    *p = p.max(rss_kb(*pid).unwrap_or(0.0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let r = fixed_rate_measured(
            Some(self.client.netns_path()),
            targets,
            RATE,
            time,
            start,
            end,
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("RSS sampler panicked"))?;
        let (r, e) = r?;
        Ok((r, peak, e))
    }

    /// RSS added by `plan.idle_streams` idle tunnelled connections, per stream.
    fn idle_streams(&self, s: &mut Samples) -> Result<()> {
        let n = self.plan.idle_streams;
        let pids = self.pids("tunnel");
        // The pod sees the client pod's address on tunnelled connections (transparent
        // inbound): wait until the earlier runs' connections are gone, then count ours.
        let client_ip = IpAddr::from(self.client.ipv4());
        let settle = Instant::now() + Duration::from_secs(20);
        while established_from(&self.server, HTTP_PORT, client_ip)? > 0 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(200));
        }
        let base = established_from(&self.server, HTTP_PORT, client_ip)?;
        let before: Vec<f64> = pids.iter().map(|p| rss_kb(*p)).collect::<Result<_>>()?;
        let target = SocketAddr::new(
            self.n1.gateway_v4().into(),
            mesh_agent::proxy::OUTBOUND_PORT,
        );
        let (release, holder) = hold_connections(self.client.netns_path(), target, n)?;
        // Every stream reaches the server pod before memory is read.
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut reached = 0;
        while Instant::now() < deadline {
            reached = established_from(&self.server, HTTP_PORT, client_ip)?.saturating_sub(base);
            if reached >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(1));
        let after: Vec<f64> = pids.iter().map(|p| rss_kb(*p)).collect::<Result<_>>()?;
        drop(release);
        holder
            .join()
            .map_err(|_| anyhow::anyhow!("idle holder panicked"))??;
        s.push("idle_streams_reached", reached as f64);
        let listen = self
            .n1
            .exec("ss", ["-Hltn", "( sport = :15001 )"])
            .unwrap_or_default();
        let nstat = |p: &crate::Sandbox| {
            p.exec(
                "nstat",
                [
                    "-az",
                    "TcpExtListenOverflows",
                    "TcpExtListenDrops",
                    "TcpExtSyncookiesSent",
                    "TcpExtTCPReqQFullDrop",
                ],
            )
            .unwrap_or_default()
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("="))
            .collect::<Vec<_>>()
            .join(" ")
        };
        ensure!(
            reached >= n,
            "only {reached} of {n} idle tunnelled connections reached the server pod ({base} before); node 1 listener: {listen}; node 1: {}; client pod: {}",
            nstat(&self.n1),
            nstat(&self.client)
        );
        let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        s.push("idle_streams", n as f64);
        s.push("idle_rss_delta_mb_outbound", delta[0] / 1024.0);
        s.push("idle_rss_delta_mb_inbound", delta[1] / 1024.0);
        s.push(
            "rss_kb_per_idle_stream",
            delta.iter().sum::<f64>() / n as f64,
        );
        println!(
            "  idle   {n} streams: RSS {:.1} → {:.1} MB (node 1), {:.1} → {:.1} MB (node 2)",
            before[0] / 1024.0,
            after[0] / 1024.0,
            before[1] / 1024.0,
            after[1] / 1024.0
        );
        Ok(())
    }
}

/// The last lines of a process's stderr, for errors.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// Userspace rustls vs kTLS for one bulk stream: rustls always; kTLS only where the kernel has
/// the TLS ULP (otherwise `ktls_available` is 0 and the ratio keys are absent).
fn tls_stream(pki: &NginxPki, plan: Plan, s: &mut Samples) -> Result<()> {
    for _ in 0..plan.reps {
        let (bps, cpu) = rustls_stream(pki, plan.tls_bytes)?;
        s.push("rustls_stream_gbps", bps * 8.0 / 1e9);
        s.push("rustls_stream_cpu_us_per_mib", cpu);
    }
    match ktls_probe() {
        Ok(()) => {
            s.push("ktls_available", 1.0);
            println!(
                "  kTLS: the kernel has the TLS ULP, but this build measures rustls only (see BENCHMARKS.md)"
            );
        }
        Err(why) => {
            s.push("ktls_available", 0.0);
            println!("  kTLS unavailable: {why}");
        }
    }
    Ok(())
}

/// A diagnostic tool attached to both proxy processes during the tunnel's fixed-rate run
/// (`mesh-bench mtls --diag strace|perf`). It slows them down: numbers of such a run are not results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diag {
    /// `strace -c -f`: system calls per request, per process.
    Strace,
    /// `perf record -g`: where each process spends its CPU.
    Perf,
}

impl std::str::FromStr for Diag {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strace" => Ok(Self::Strace),
            "perf" => Ok(Self::Perf),
            _ => Err(format!("unknown diagnostic {s:?}: strace or perf")),
        }
    }
}

struct Attached {
    diag: Diag,
    children: Vec<(std::process::Child, PathBuf)>,
}

impl Attached {
    fn start(diag: Diag, pids: &[u32]) -> Result<Self> {
        let mut children = Vec::new();
        for pid in pids {
            let out = std::env::temp_dir().join(format!("mesh-bench-mtls-{pid}.{diag:?}"));
            let mut cmd = match diag {
                Diag::Strace => {
                    let mut c = std::process::Command::new("strace");
                    c.args(["-c", "-f", "-q", "-o"]).arg(&out);
                    c
                }
                Diag::Perf => {
                    let mut c = std::process::Command::new("perf");
                    c.args(["record", "-q", "-g", "-o"]).arg(&out);
                    c
                }
            };
            cmd.args(["-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            children.push((
                cmd.spawn().with_context(|| format!("starting {diag:?}"))?,
                out,
            ));
        }
        // Attaching takes a moment; requests before it are not counted.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { diag, children })
    }

    /// Stops the tools (SIGINT) and prints their summaries; system calls per `unit`.
    fn report(self, units: f64, unit: &str) -> Result<()> {
        for ((mut child, out), node) in self.children.into_iter().zip(["node 1", "node 2"]) {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
            let text = match self.diag {
                Diag::Strace => std::fs::read_to_string(&out).unwrap_or_default(),
                Diag::Perf => {
                    let o = std::process::Command::new("perf")
                        .args([
                            "report",
                            "--stdio",
                            "--no-children",
                            "-g",
                            "none",
                            "--percent-limit",
                            "1",
                            "-i",
                        ])
                        .arg(&out)
                        .output()?;
                    String::from_utf8_lossy(&o.stdout).into_owned()
                }
            };
            println!(
                "  {:?} of the {node} proxy ({units:.0} × {unit}):",
                self.diag
            );
            for l in text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .take(40)
            {
                println!("    {l}");
            }
            if self.diag == Diag::Strace
                && let Some(total) = text
                    .lines()
                    .find(|l| l.trim_end().ends_with("total"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
            {
                println!("    => {:.1} system calls per {unit}", total / units);
            }
        }
        Ok(())
    }
}

/// The sidecar-style pair: nginx `stream` on node 1 originating TLS, on node 2 terminating it.
/// Returns node 1's and node 2's process and the certificates.
fn start_nginx_pair(
    n1: &NodeHandle,
    n2: &NodeHandle,
    server_ip: IpAddr,
    dir: &Path,
) -> Result<(PodChild, PodChild, NginxPki)> {
    let pki = nginx_pki()?;
    for (name, text) in [
        ("ca.pem", &pki.ca),
        ("server.pem", &pki.server.cert),
        ("server.key", &pki.server.key),
        ("client.pem", &pki.client.cert),
        ("client.key", &pki.client.key),
    ] {
        std::fs::write(dir.join(name), text)?;
    }
    let c1 = dir.join("nginx-client.conf");
    std::fs::write(
        &c1,
        nginx_client_conf(dir, n1.gateway_v4().into(), n2.ipv4().into()),
    )?;
    let c2 = dir.join("nginx-server.conf");
    std::fs::write(&c2, nginx_server_side_conf(dir, server_ip))?;
    let mut ng2 = spawn_nginx(n2, &c2)?;
    let mut ng1 = spawn_nginx(n1, &c1)?;
    wait_listening(n2, &[NGINX_TLS_PORT, NGINX_TLS_PORT + 1], &mut [&mut ng2])?;
    wait_listening(n1, &[NGINX_HTTP_PORT, NGINX_IPERF_PORT], &mut [&mut ng1])?;
    Ok((ng1, ng2, pki))
}

/// The floors: the nginx plaintext pair and the `HAProxy` splice pair, node 1's process first.
fn start_plain_pairs(
    n1: &NodeHandle,
    n2: &NodeHandle,
    server_ip: IpAddr,
    dir: &Path,
) -> Result<([PodChild; 2], [PodChild; 2])> {
    let (gw, node2) = (IpAddr::from(n1.gateway_v4()), IpAddr::from(n2.ipv4()));
    let pod = |port| SocketAddr::new(server_ip, port);
    let relay = |port| SocketAddr::new(node2, port);
    let any = IpAddr::from([0, 0, 0, 0]);

    let c2 = dir.join("nginx-plain-server.conf");
    let to_pod = [
        (NGINX_PLAIN_RELAY_PORT, pod(HTTP_PORT)),
        (NGINX_PLAIN_RELAY_PORT + 1, pod(IPERF_PORT)),
    ];
    std::fs::write(
        &c2,
        nginx_plain_conf(dir, "nginx-plain-server", any, &to_pod),
    )?;
    let c1 = dir.join("nginx-plain-client.conf");
    let to_node2 = [
        (NGINX_PLAIN_HTTP_PORT, relay(NGINX_PLAIN_RELAY_PORT)),
        (NGINX_PLAIN_IPERF_PORT, relay(NGINX_PLAIN_RELAY_PORT + 1)),
    ];
    std::fs::write(
        &c1,
        nginx_plain_conf(dir, "nginx-plain-client", gw, &to_node2),
    )?;
    let mut ng2 = spawn_nginx(n2, &c2)?;
    let mut ng1 = spawn_nginx(n1, &c1)?;
    wait_listening(
        n2,
        &[NGINX_PLAIN_RELAY_PORT, NGINX_PLAIN_RELAY_PORT + 1],
        &mut [&mut ng2],
    )?;
    wait_listening(
        n1,
        &[NGINX_PLAIN_HTTP_PORT, NGINX_PLAIN_IPERF_PORT],
        &mut [&mut ng1],
    )?;

    let h2 = dir.join("haproxy-server.cfg");
    let to_pod = [
        (HAPROXY_RELAY_PORT, pod(HTTP_PORT)),
        (HAPROXY_RELAY_PORT + 1, pod(IPERF_PORT)),
    ];
    std::fs::write(&h2, haproxy_conf("haproxy-server", any, &to_pod))?;
    let h1 = dir.join("haproxy-client.cfg");
    let to_node2 = [
        (HAPROXY_HTTP_PORT, relay(HAPROXY_RELAY_PORT)),
        (HAPROXY_IPERF_PORT, relay(HAPROXY_RELAY_PORT + 1)),
    ];
    std::fs::write(&h1, haproxy_conf("haproxy-client", gw, &to_node2))?;
    let mut ha2 = spawn_haproxy(n2, &h2)?;
    let mut ha1 = spawn_haproxy(n1, &h1)?;
    wait_listening(
        n2,
        &[HAPROXY_RELAY_PORT, HAPROXY_RELAY_PORT + 1],
        &mut [&mut ha2],
    )?;
    wait_listening(
        n1,
        &[HAPROXY_HTTP_PORT, HAPROXY_IPERF_PORT],
        &mut [&mut ha1],
    )?;
    Ok(([ng1, ng2], [ha1, ha2]))
}

/// Waits until `ports` listen in `place` (or a process exits).
fn wait_listening(
    place: &crate::Sandbox,
    ports: &[u16],
    procs: &mut [&mut PodChild],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = place.exec("ss", ["-Hltn"])?;
        if ports.iter().all(|p| out.contains(&format!(":{p} "))) {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.try_status()? {
                bail!(
                    "{} exited ({status}): {}",
                    place.label(),
                    p.stderr_text().trim()
                );
            }
        }
        ensure!(
            Instant::now() < deadline,
            "ports {ports:?} not listening in {} after 10 s",
            place.label()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed_with_its_errors() {
        let text = "Running 2s test @ http://10.2.0.2:8080/\n  2 threads and 32 connections\n\
                    Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                    \x20 40321 requests in 2.00s, 9.12MB read\n\
                    \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                    Requests/sec:  20160.12\nTransfer/sec:      4.56MB\n";
        let r = parse_wrk(text).unwrap();
        assert!((r.rps - 20160.12).abs() < 1e-6);
        assert!((r.requests - 40321.0).abs() < 1e-6);
        assert!((r.errors - 3.0).abs() < 1e-6);
        assert!(parse_wrk("garbage").is_err());
    }

    /// The open loop counts a stall for every request scheduled during it: a server that answers
    /// nothing for 150 ms once delays ~150 of 1,000 requests (a closed loop of 16 workers would
    /// record only 16 slow samples, under 2 %, and a p90 near the fast answers).
    #[test]
    fn the_fixed_rate_client_counts_a_server_stall_for_every_request_it_delays() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let flag = flag.clone();
                std::thread::spawn(move || {
                    let mut buf = [0_u8; 1024];
                    while stream.read(&mut buf).is_ok_and(|n| n > 0) {
                        // One stall of 150 ms, 400 ms into the run, for every connection.
                        let t = started.elapsed();
                        if t > Duration::from_millis(400) && !flag.swap(true, Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(150));
                        }
                        while flag.load(Ordering::SeqCst)
                            && started.elapsed() < Duration::from_millis(550)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
        });
        let r = fixed_rate(None, &[addr], 1_000, Duration::from_secs(1)).unwrap();
        assert_eq!(r.errors, 0);
        assert_eq!(r.latencies_us.len(), 1_000);
        assert!(stalled.load(Ordering::SeqCst));
        let p90 = percentile(&r.latencies_us, 90.0);
        assert!(r.p50_us < 20_000.0, "p50 {} µs", r.p50_us);
        assert!(p90 > 30_000.0, "p90 {p90} µs: the stall was not counted");
        assert!(r.max_us >= 100_000.0, "max {} µs", r.max_us);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert!((percentile(&v, 99.0) - 99.0).abs() < 1e-9);
        assert!((percentile(&v, 50.0) - 50.0).abs() < 1e-9);
        assert!(percentile(&[], 99.0).is_nan());
    }

    #[test]
    fn goals_decide_in_the_right_direction() {
        assert_eq!(verdict("tunnel_rps_ratio_vs_plain", 0.61), Some(true));
        assert_eq!(verdict("tunnel_rps_ratio_vs_plain", 0.59), Some(false));
        assert_eq!(verdict("agent_rss_mb", 17.0), Some(false));
        assert_eq!(verdict("rps_plain", 1.0), None);
    }

    #[test]
    fn nginx_configs_load_the_stream_module_and_verify_both_ends() {
        let dir = Path::new("/tmp/x");
        let c = nginx_client_conf(
            dir,
            "10.1.0.1".parse().unwrap(),
            "172.30.0.2".parse().unwrap(),
        );
        assert!(c.starts_with("# mesh-bench"));
        assert!(c.contains("load_module /usr/lib/nginx/modules/ngx_stream_module.so;"));
        assert!(c.contains("proxy_ssl_protocols TLSv1.2 TLSv1.3;"));
        assert!(c.contains("proxy_ssl_verify on;"));
        assert!(c.contains("listen 10.1.0.1:16001 backlog=4096; proxy_pass 172.30.0.2:16441;"));
        let s = nginx_server_side_conf(dir, "10.2.0.2".parse().unwrap());
        assert!(s.contains("ssl_verify_client on;"));
        assert!(s.contains("proxy_pass 10.2.0.2:5201;"));
    }

    #[test]
    fn the_floor_pairs_relay_without_tls_and_haproxy_splices() {
        let dir = Path::new("/tmp/x");
        let to: SocketAddr = "172.30.0.2:16451".parse().unwrap();
        let n = nginx_plain_conf(dir, "p", "10.1.0.1".parse().unwrap(), &[(16011, to)]);
        assert!(n.contains("listen 10.1.0.1:16011 backlog=4096; proxy_pass 172.30.0.2:16451;"));
        assert!(!n.contains("ssl"));
        let h = haproxy_conf("h", "10.1.0.1".parse().unwrap(), &[(16021, to)]);
        assert!(h.contains("mode tcp"));
        assert!(h.contains("option splice-auto"));
        assert!(h.contains("bind 10.1.0.1:16021 backlog 4096\n  server s0 172.30.0.2:16451\n"));
        assert!(!h.contains("ssl"));
    }
}
