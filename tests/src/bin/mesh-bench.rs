//! `mesh-bench`: the data-path benchmark. One harness cluster (one node; client, iptables-client
//! and two backend pods) measures, in one run and interleaved, TCP through the mesh's kernel socket
//! LB against a direct connection to the pod, kube-proxy-style iptables DNAT and `HAProxy`; then
//! connect latency with 10 vs 10,000 services, same-node bypass and fail fast; then, against one
//! `meshpod serve` process standing in for up to 10,000 endpoints, how evenly a service of 1,000
//! endpoints with a whole node's run ejected spreads 100,000 connects, whether any connect is
//! refused while a backend is eligible, and connect latency with 10 vs 10,000 endpoints. Writes flat JSON
//! (`{"metric": number}`) to `target/bench/datapath.json` and prints a table.
//!
//! Run it through `cargo xtask bench datapath [--quick]` (installs packages, builds the eBPF
//! object). Needs root.

#![expect(
    clippy::cast_precision_loss,
    reason = "sample counts and nanoseconds shown as f64 are far below 2^52"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use mesh_agent::datapath::spec::{Algorithm, CircuitSettings, Protocol, ServiceSpec};
use mesh_agent::datapath::{Datapath, DatapathConfig, events, service_key};
use mesh_common::backend::CIRCUIT_OPEN;
use mesh_common::counters::{
    CTR_BACKEND_FAILURE, CTR_BYPASS_ESTABLISHED, CTR_BYPASS_MISS, CTR_EVENT_DROPPED,
    CTR_REJECT_CIRCUIT_OPEN, CTR_TRANSLATED,
};
use mesh_tests::samples::Samples;
use mesh_tests::{Cluster, NodeHandle, PodChild, PodHandle, workspace_root};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Port the echo servers listen on (backends and the client's own 127.0.0.1): echo until EOF.
const ECHO_PORT: u16 = 8080;
/// One-shot port of the backends: one 64-byte echo, then the server closes first (as an
/// HTTP/1.0 server does), so churn leaves no `TIME_WAIT` on the client's ports.
const ONESHOT_PORT: u16 = 8081;
/// A port nothing listens on (for the kernel-RST comparison and the ejected service).
const CLOSED_PORT: u16 = 9;
/// `HAProxy`'s frontend ports on the node's address (→ backends' echo and one-shot ports).
const HAPROXY_PORT: u16 = 18080;
const HAPROXY_ONESHOT_PORT: u16 = 18081;
/// The mesh service (kernel socket LB) over both backends, and its one-shot port.
const MESH_VIP: SocketAddr = v4(10, 96, 0, 10, ECHO_PORT);
const MESH_VIP_ONESHOT: SocketAddr = v4(10, 96, 0, 10, ONESHOT_PORT);
/// A mesh service with only backend b0 (same-node bypass run).
const BYPASS_VIP: SocketAddr = v4(10, 96, 0, 11, ECHO_PORT);
/// A mesh service whose backends are all ejected (fail-fast run).
const FAILFAST_VIP: SocketAddr = v4(10, 96, 0, 99, ECHO_PORT);
/// Service of [`LB_ENDPOINTS`] endpoints (ports of one backend pod) for the load-spread runs.
const LB_VIP: SocketAddr = v4(10, 96, 0, 20, 80);
/// Service of [`WIDE_ENDPOINTS`] endpoints, 10 % ejected (connect latency at scale).
const WIDE_VIP: SocketAddr = v4(10, 96, 0, 21, 80);
/// Service of [`NARROW_ENDPOINTS`] endpoints (its baseline).
const NARROW_VIP: SocketAddr = v4(10, 96, 0, 22, 80);
/// First port of the many-endpoint server (`meshpod serve --tcp-ports`, answering `lb:PORT`).
const LB_FIRST_PORT: u16 = 20_000;
const LB_ENDPOINTS: u16 = 1_000;
/// A contiguous 10 % of [`LB_ENDPOINTS`] (a whole node's endpoints), ejected in the spread runs.
const LB_EJECTED: std::ops::Range<u16> = 450..550;
/// 90 % of [`LB_ENDPOINTS`] ejected (one contiguous run; eligible slots at both ends).
const LB_EJECTED_MOST: std::ops::Range<u16> = 50..950;
const WIDE_ENDPOINTS: u16 = 10_000;
/// A contiguous 10 % of [`WIDE_ENDPOINTS`].
const WIDE_EJECTED: std::ops::Range<u16> = 4_500..5_500;
const NARROW_ENDPOINTS: u16 = 10;
/// Endpoint addresses of the connect-latency-at-scale runs: `10.250.<i / 250>.<1 + i % 250>`,
/// all local to backend b1 (an `ip route add local` there, routed to b1 by the node) and served
/// by ONE listener on [`SAME_PORT`]. So 10 and 10,000 endpoints reach the same server socket
/// and the server's side of a connect is the same for both: the ratio is the mesh's (with a
/// listener per endpoint, 9,000 cold listeners cost the server ≈ 10 % more per connect, direct
/// connects included — see BENCHMARKS.md).
const SAME_NET: &str = "10.250.0.0/16";
const SAME_PORT: u16 = 30_000;
/// Client threads of a load-spread run (connections in flight at once, so least-connections has
/// counts to compare).
const LB_THREADS: usize = 4;
/// The kube-proxy iptables service: a different address, never in the mesh's maps.
const IPT_VIP: SocketAddr = v4(10, 97, 0, 10, ECHO_PORT);
const IPT_VIP_ONESHOT: SocketAddr = v4(10, 97, 0, 10, ONESHOT_PORT);
/// Request and response size of every round trip.
const MSG: usize = 64;
/// Accepting threads per listener of the echo server.
const SERVER_THREADS: usize = 8;
/// Mesh services that are always applied (measured VIP's two ports, bypass VIP).
const MESH_MEASURED: usize = 3;
/// Services in the "few services" state (mesh and iptables alike).
const FEW: usize = 10;
/// Services in the "many services" state.
const MANY: usize = 10_000;
/// Longest one measurement in a pod may take.
const RUN_TIMEOUT: Duration = Duration::from_mins(3);
/// The source range kube-proxy treats as the cluster's pods (`--cluster-cidr`).
const CLUSTER_CIDR: &str = "10.0.0.0/8";

const fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port))
}

#[derive(Parser)]
#[command(
    name = "mesh-bench",
    about = "Data-path benchmark: mesh vs direct, iptables DNAT and HAProxy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the data-path benchmark (root).
    Datapath(DatapathArgs),
    /// Run the control-plane benchmark: the agent reconciling 10,000 services (root).
    ControlPlane(ControlPlaneArgs),
    /// Run the mtls benchmark: HBONE tunnel vs plaintext vs an nginx TLS pair (root).
    Mtls(MtlsArgs),
    /// Run the gateway benchmark: `mesh-agent gateway` vs nginx, `HAProxy` and direct (wrk, h2load).
    Gateway(GatewayArgs),
    /// Run the telemetry benchmark: churn and gateway throughput with telemetry on vs off, one
    /// scrape of an agent with 10,000 services (root).
    Telemetry(TelemetryArgs),
    /// Internal: blocking TCP echo server pinned to one CPU; prints `ready` once listening.
    #[command(hide = true)]
    Serve(ServeArgs),
}

#[derive(Args)]
struct ControlPlaneArgs {
    /// 1,000 services instead of 10,000.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON (default `<workspace>/target/bench/control-plane.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only one discovery source: `file` or `kubernetes` (default: both).
    #[arg(long, value_parser = ["file", "kubernetes"])]
    only: Option<String>,
}

#[derive(Args)]
struct MtlsArgs {
    /// One repetition, shorter runs, 1,000 idle streams (a smoke check).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON (default `<workspace>/target/bench/mtls.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only one part: `paths` (plain/tunnel/nginx), `idle` (idle streams) or `tls` (one stream).
    #[arg(long, value_parser = ["paths", "idle", "tls"])]
    only: Option<String>,
    /// Attach `strace -c` or `perf record` to both processes of the tunnel's and the nginx
    /// pair's fixed-rate runs (steady state) and print where the time goes (slows them: not a
    /// results run).
    #[arg(long)]
    diag: Option<mesh_tests::bench_mtls::Diag>,
    /// The proxies' worker threads, as the agent's `proxy.workers` (default: the agent's
    /// default); 0: the layout before workers, one multi-thread runtime with one tunnel pool.
    #[arg(long)]
    proxy_threads: Option<usize>,
}

#[derive(Args)]
struct GatewayArgs {
    /// One round of 2 s runs instead of 5 rounds of 8 s (a smoke check).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON (default `<workspace>/target/bench/gateway.json`).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TelemetryArgs {
    /// One round of 2 s runs, 1,000 services for the scrape (a smoke check).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON (default `<workspace>/target/bench/telemetry.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only one part: `datapath`, `gateway` or `scrape` (default: all three).
    #[arg(long, value_parser = ["datapath", "gateway", "scrape"])]
    only: Option<String>,
}

#[derive(Args)]
struct DatapathArgs {
    /// Fewer repetitions and shorter runs (a smoke check, under a minute).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON (default `<workspace>/target/bench/datapath.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where client, server and proxy run.
    #[arg(long, value_enum, default_value_t = Layout::SameCpu)]
    cpus: Layout,
    /// Only one part: `endpoints` (load spread and connect latency over 10,000 endpoints) or
    /// `matrix` (RR and CRR against direct, iptables and `HAProxy`).
    #[arg(long, value_parser = ["endpoints", "matrix"])]
    only: Option<String>,
}

/// CPU placement of the processes that carry traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// Client, echo servers and `HAProxy` all pinned to the last CPU: every round trip is CPU work
    /// on one core. Steadiest on VMs, where a cross-CPU wake-up can wait for the next tick.
    SameCpu,
    /// Client on CPU 0, echo servers on CPU 1, `HAProxy` unpinned (needs 2 CPUs).
    Split,
}

#[derive(Args)]
struct ServeArgs {
    /// TCP address to echo on until EOF (repeatable).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// TCP address to answer one 64-byte message on, then close first (repeatable).
    #[arg(long)]
    oneshot: Vec<SocketAddr>,
    /// CPU to pin every thread to.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Datapath(a) => datapath(&a),
        Cmd::ControlPlane(a) => control_plane(&a),
        Cmd::Mtls(a) => mesh_tests::bench_mtls::run(&mesh_tests::bench_mtls::Options {
            quick: a.quick,
            only: a.only,
            diag: a.diag,
            proxy_threads: a.proxy_threads,
            out: a
                .out
                .unwrap_or_else(|| workspace_root().join("target/bench/mtls.json")),
        }),
        Cmd::Gateway(a) => gateway(&a),
        Cmd::Telemetry(a) => telemetry(&a),
        Cmd::Serve(a) => serve(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Control plane (`mesh_tests::control_plane` runs the real agent)

fn control_plane(args: &ControlPlaneArgs) -> Result<()> {
    ensure!(
        mesh_tests::is_root(),
        "mesh-bench needs root (namespaces, cgroups, eBPF): run `cargo xtask bench control-plane` as root"
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/control-plane.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    println!(
        "control-plane benchmark: {} services x 10 endpoints from a static file, then from the Kubernetes API stand-in, real agent ({})",
        if args.quick { "1,000" } else { "10,000" },
        std::env::var("MESH_BENCH_COMMAND")
            .unwrap_or_else(|_| "mesh-bench control-plane".to_owned())
    );
    let mut metrics = BTreeMap::new();
    if args.only.as_deref() != Some("kubernetes") {
        metrics.extend(mesh_tests::control_plane::run(args.quick)?);
    }
    if args.only.as_deref() != Some("file") {
        metrics.extend(mesh_tests::control_plane::run_kubernetes(args.quick)?);
    }
    for (k, v) in &metrics {
        println!("  {k:<40} {v:>12.1}");
    }
    std::fs::write(&out, serde_json::to_string_pretty(&metrics)? + "\n")
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gateway (`mesh_tests::bench_gateway`: the real `mesh-agent gateway`, nginx, HAProxy, wrk, h2load)

fn gateway(args: &GatewayArgs) -> Result<()> {
    use mesh_tests::bench_gateway::{self, GOALS, Plan};
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/gateway.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let plan = Plan::new(args.quick);
    let command = std::env::var("MESH_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "mesh-bench gateway{}",
        if args.quick { " (quick)" } else { "" }
    );
    println!("command:  {command}");
    let machine = Machine::probe();
    println!(
        "machine:  Linux {}, {} CPUs ({}); load average {}",
        machine.kernel,
        machine.cpus,
        machine.cpu_model,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "proxies:  mesh-agent gateway ({}), {}, {}, hyper-floor ({}) — each with 2 workers/threads, keep-alive to one nginx backend",
        mesh_tests::agent::workspace_binary("mesh-agent")?.display(),
        first_line("nginx", &["-v"]),
        machine.haproxy,
        mesh_tests::agent::workspace_binary("hyper-floor")?.display(),
    );
    println!(
        "load:     {} rounds × {} s per target, order rotated per round; wrk -t{} -c{} --latency (HTTP/1.1 keep-alive); h2load -c{} -m{} over TLS (HTTP/2, gRPC unary)",
        plan.rounds,
        plan.seconds,
        plan.http1_threads,
        plan.http1_connections,
        plan.h2_clients,
        plan.h2_streams
    );
    let (mut metrics, samples) = bench_gateway::run(&plan)?;
    bench_gateway::print_report(&metrics, &samples);
    for (key, upper, bound) in GOALS {
        let Some(v) = metrics.get(key).copied() else {
            continue;
        };
        let met = if upper { v <= bound } else { v >= bound };
        metrics.insert(format!("{key}_goal_met"), f64::from(u8::from(met)));
    }
    // Flat `{"metric": number}` like the other suites; the command is printed above.
    std::fs::write(&out, serde_json::to_string_pretty(&metrics)? + "\n")
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Telemetry (`mesh_tests::bench_telemetry`: the real agent and gateway, telemetry on vs off)

fn telemetry(args: &TelemetryArgs) -> Result<()> {
    use mesh_tests::bench_telemetry::{self, Part, Plan};
    ensure!(
        mesh_tests::is_root(),
        "mesh-bench needs root (namespaces, cgroups, eBPF): run `cargo xtask bench telemetry` as root"
    );
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/telemetry.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let plan = Plan::new(args.quick);
    let parts = match &args.only {
        Some(p) => vec![Part::parse(p)?],
        None => Part::ALL.to_vec(),
    };
    let command = std::env::var("MESH_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
    let machine = Machine::probe();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "mesh-bench telemetry{}",
        if args.quick { " (quick)" } else { "" }
    );
    println!("command:  {command}");
    println!(
        "machine:  Linux {}, {} CPUs ({}); load average {}",
        machine.kernel,
        machine.cpus,
        machine.cpu_model,
        load.trim()
    );
    let (metrics, samples) = bench_telemetry::run(&plan, &parts)?;
    bench_telemetry::print_report(&metrics, &samples);
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    // Flat `{"metric": number}` like the other suites; the command is printed above.
    std::fs::write(&out, serde_json::to_string_pretty(&metrics)? + "\n")
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Echo server (runs inside a pod as `mesh-bench serve`)

fn serve(args: &ServeArgs) -> Result<()> {
    // Threads spawned below inherit the main thread's affinity.
    if let Some(cpu) = args.cpu {
        pin_to_cpu(cpu).with_context(|| format!("failed to pin the server to CPU {cpu}"))?;
    }
    let all = args.listen.iter().map(|a| (a, false));
    for (addr, oneshot) in all.chain(args.oneshot.iter().map(|a| (a, true))) {
        let listener =
            TcpListener::bind(addr).with_context(|| format!("failed to listen on {addr}"))?;
        // A second listen() only raises the backlog (std uses 128).
        // SAFETY: listen on a socket we own.
        unsafe { libc::listen(listener.as_raw_fd(), 4096) };
        for _ in 0..SERVER_THREADS {
            let l = listener.try_clone()?;
            std::thread::spawn(move || {
                loop {
                    if let Ok((stream, _)) = l.accept() {
                        if oneshot {
                            echo_once(stream);
                        } else {
                            echo(stream);
                        }
                    }
                }
            });
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::park();
    }
}

/// Echoes until EOF, on the accepting thread (no spawn per connection).
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Echoes one [`MSG`]-byte message and closes (the server's FIN goes first).
fn echo_once(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; MSG];
    if stream.read_exact(&mut buf).is_ok() {
        let _ = stream.write_all(&buf);
    }
}

fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < CPU_SETSIZE; the
    // syscall reads `size_of` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client loops (run inside a pod with `pod.run`, pinned to the client CPU)

/// p50 and p99 of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Lat {
    p50_us: f64,
    p99_us: f64,
    samples: u64,
}

impl Lat {
    /// Nearest-rank percentiles of nanosecond samples.
    fn of(ns: &mut [u64]) -> Self {
        ns.sort_unstable();
        let pick = |p: usize| {
            if ns.is_empty() {
                return 0.0;
            }
            // Nearest rank, ceil(p/100 · n), in integers: 1 ≤ rank ≤ n.
            let n = ns.len();
            let rank = (p * n).div_ceil(100).clamp(1, n);
            ns[rank - 1] as f64 / 1000.0
        };
        Self {
            p50_us: pick(50),
            p99_us: pick(99),
            samples: ns.len() as u64,
        }
    }
}

/// Connection churn: rate, and `connect()` latency of the same connections.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Crr {
    per_s: f64,
    connect: Lat,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `socket()` then a blocking `connect()`, timing the `connect()` call alone.
fn timed_connect(addr: SocketAddr) -> (std::io::Result<TcpStream>, Duration) {
    let SocketAddr::V4(a) = addr else {
        return (
            Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT)),
            Duration::ZERO,
        );
    };
    // SAFETY: plain socket(2).
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return (Err(std::io::Error::last_os_error()), Duration::ZERO);
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    // SAFETY: a valid sockaddr_in of the stated length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sin).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let took = start.elapsed();
    if rc == 0 {
        (Ok(TcpStream::from(fd)), took)
    } else {
        (Err(std::io::Error::last_os_error()), took)
    }
}

fn round_trip(s: &mut TcpStream, req: &[u8; MSG], resp: &mut [u8; MSG]) -> Result<(), String> {
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    s.read_exact(resp).map_err(|e| format!("read: {e}"))?;
    if resp != req {
        return Err("echo differs from the request".to_owned());
    }
    Ok(())
}

/// `count` 64-byte request/response round trips over one connection, after `warmup` unmeasured.
fn rr_client(addr: SocketAddr, warmup: usize, count: usize) -> Result<Lat, String> {
    let (s, _) = timed_connect(addr);
    let mut s = s.map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let req = [0x5a_u8; MSG];
    let mut resp = [0u8; MSG];
    for _ in 0..warmup {
        round_trip(&mut s, &req, &mut resp)?;
    }
    let mut ns = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        round_trip(&mut s, &req, &mut resp)?;
        ns.push(nanos(t.elapsed()));
    }
    Ok(Lat::of(&mut ns))
}

/// One churn run's raw result: connections measured, the time they took, each `connect()`'s
/// latency in nanoseconds (summed over interleaved slices before the rate is taken).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CrrRaw {
    connections: u64,
    secs: f64,
    connect_ns: Vec<u64>,
}

impl CrrRaw {
    fn add(&mut self, other: Self) {
        self.connections += other.connections;
        self.secs += other.secs;
        self.connect_ns.extend(other.connect_ns);
    }

    fn summary(mut self) -> Crr {
        Crr {
            per_s: if self.secs > 0.0 {
                self.connections as f64 / self.secs
            } else {
                0.0
            },
            connect: Lat::of(&mut self.connect_ns),
        }
    }
}

/// Connect, one round trip, the server's close, then ours — repeated for `time` after `warmup`
/// (dropped); targets (one-shot ports) are used in turn.
fn crr_client(targets: &[SocketAddr], warmup: Duration, time: Duration) -> Result<CrrRaw, String> {
    let req = [0xa5_u8; MSG];
    let mut resp = [0u8; MSG];
    let mut one = |i: usize| -> Result<u64, String> {
        let addr = targets[i % targets.len()];
        let (s, took) = timed_connect(addr);
        let mut s = s.map_err(|e| format!("connection {i} to {addr}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        round_trip(&mut s, &req, &mut resp).map_err(|e| format!("connection {i}: {e}"))?;
        // Wait for the server's FIN so the client never closes first (no TIME_WAIT here).
        match s.read(&mut [0u8; 1]) {
            Ok(0) => Ok(nanos(took)),
            Ok(_) => Err(format!("connection {i} to {addr}: data after the echo")),
            Err(e) => Err(format!("connection {i} to {addr}: waiting for EOF: {e}")),
        }
    };
    let mut i = 0;
    let start = Instant::now();
    while start.elapsed() < warmup {
        one(i)?;
        i += 1;
    }
    let mut ns = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < time {
        ns.push(one(i)?);
        i += 1;
    }
    Ok(CrrRaw {
        connections: ns.len() as u64,
        secs: start.elapsed().as_secs_f64(),
        connect_ns: ns,
    })
}

/// `count` connects that must each fail with `ECONNREFUSED` (after `warmup` unmeasured).
fn refused_client(addr: SocketAddr, warmup: usize, count: usize) -> Result<Lat, String> {
    let mut ns = Vec::with_capacity(count);
    for i in 0..warmup + count {
        match timed_connect(addr) {
            (Ok(_), _) => return Err(format!("connect {i} to {addr} succeeded; expected refusal")),
            (Err(e), took) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                if i >= warmup {
                    ns.push(nanos(took));
                }
            }
            (Err(e), _) => return Err(format!("connect {i} to {addr}: {e} (expected refusal)")),
        }
    }
    Ok(Lat::of(&mut ns))
}

/// Waits until `addr` echoes.
fn wait_echo(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| e.to_string())
            .and_then(|mut s| round_trip(&mut s, &[1; MSG], &mut [0; MSG]));
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > limit => return Err(format!("{addr} never echoed: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Why a many-endpoint connection failed.
enum Fail {
    /// `connect()` returned `ECONNREFUSED` (the mesh's rejection, or a kernel RST).
    Refused,
    Other(String),
}

/// One short connection to an endpoint of a many-endpoint service: `connect()`, read the
/// `NAME:PORT` line the endpoint writes, close with RST (`SO_LINGER` 0, so neither side keeps a
/// `TIME_WAIT` socket and 100,000 connects in seconds cannot exhaust the client's ports). Returns
/// the endpoint's port and how long `connect()` took.
fn banner_connect(addr: SocketAddr) -> Result<(u16, Duration), Fail> {
    let (s, took) = timed_connect(addr);
    let mut s = match s {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Err(Fail::Refused),
        Err(e) => return Err(Fail::Other(format!("connect {addr}: {e}"))),
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid `linger` of the stated size on a socket we own.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') {
        match s.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(Fail::Other(format!("{addr}: reading the banner: {e}"))),
        }
        if len == buf.len() {
            break;
        }
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    line.trim_end()
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .map(|port| (port, took))
        .ok_or_else(|| Fail::Other(format!("{addr}: banner {line:?} names no port")))
}

/// Connections per endpoint of one load-spread run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Spread {
    /// Connections that reached endpoint `LB_FIRST_PORT + i`, per `i`.
    per_slot: Vec<u64>,
    /// Connects refused (`ECONNREFUSED`).
    refused: u64,
    /// Any other failure (client-side trouble, not the balancer's verdict), and the first one.
    other: u64,
    first_other: Option<String>,
    per_s: f64,
}

/// `count` connects to `addr` from [`LB_THREADS`] threads, each noting which of `slots`
/// endpoints (ports from [`LB_FIRST_PORT`]) answered.
fn spread_client(addr: SocketAddr, slots: usize, count: usize) -> Result<Spread, String> {
    let start = Instant::now();
    let parts: Vec<Spread> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..LB_THREADS)
            .map(|t| {
                let n = count / LB_THREADS + usize::from(t < count % LB_THREADS);
                scope.spawn(move || {
                    let mut tally = Spread {
                        per_slot: vec![0; slots],
                        ..Spread::default()
                    };
                    for _ in 0..n {
                        match banner_connect(addr) {
                            Ok((port, _)) => {
                                let i = usize::from(port.wrapping_sub(LB_FIRST_PORT));
                                if let Some(c) = tally.per_slot.get_mut(i) {
                                    *c += 1;
                                } else {
                                    tally.other += 1;
                                    tally
                                        .first_other
                                        .get_or_insert_with(|| format!("answer from port {port}"));
                                }
                            }
                            Err(Fail::Refused) => tally.refused += 1,
                            Err(Fail::Other(e)) => {
                                tally.other += 1;
                                tally.first_other.get_or_insert(e);
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a client thread panicked".to_owned()))
            .collect::<Result<_, String>>()
    })?;
    let mut all = Spread {
        per_slot: vec![0; slots],
        ..Spread::default()
    };
    for p in parts {
        for (a, b) in all.per_slot.iter_mut().zip(&p.per_slot) {
            *a += b;
        }
        all.refused += p.refused;
        all.other += p.other;
        if all.first_other.is_none() {
            all.first_other = p.first_other;
        }
    }
    all.per_s = count as f64 / start.elapsed().as_secs_f64();
    Ok(all)
}

/// `connect()` latency of short connections, one at a time, for `time` after `warmup`
/// (dropped), each to one of `targets` drawn at random (a service VIP, or endpoints directly).
/// Any failed connection is an error.
fn banner_latency_client(
    targets: &[SocketAddr],
    warmup: Duration,
    time: Duration,
) -> Result<Lat, String> {
    let mut state = 0x5eed_u64;
    let mut one = || {
        let i = splitmix64(&mut state) % targets.len() as u64;
        let addr = targets[usize::try_from(i).unwrap_or(0)];
        match banner_connect(addr) {
            Ok((_, took)) => Ok(nanos(took)),
            Err(Fail::Refused) => Err(format!("connect {addr}: refused")),
            Err(Fail::Other(e)) => Err(e),
        }
    };
    let start = Instant::now();
    while start.elapsed() < warmup {
        one()?;
    }
    let mut ns = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < time {
        ns.push(one()?);
    }
    Ok(Lat::of(&mut ns))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the kernel's `bpf_ktime_get_ns`, which circuits are timed by.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Plan and sample bookkeeping

/// Iterations and durations; `--quick` shrinks all of them.
#[derive(Debug, Clone, Copy)]
struct Plan {
    reps: usize,
    rr_warmup: usize,
    rr_count: usize,
    crr_warmup: Duration,
    crr_time: Duration,
    /// The churn comparisons (four variants; mesh vs direct with events off) split each
    /// variant's `crr_time` into this many slices, interleaved across variants (order rotated
    /// every slice), so a drift of the shared VM's speed over seconds reaches every variant
    /// alike instead of whichever ran then; each slice drops its own `crr_slice_warmup`.
    crr_slices: u32,
    crr_slice_warmup: Duration,
    scale_reps: usize,
    scale_time: Duration,
    /// Interleaved rounds of the 10 vs 10,000 endpoint connect-latency runs, and each run's
    /// warm-up (dropped) and measured time.
    endpoint_rounds: usize,
    endpoint_warmup: Duration,
    endpoint_time: Duration,
    failfast_count: usize,
    /// Repetitions of the load-spread runs (each: four algorithms and the 90 %-ejected run).
    lb_reps: usize,
    /// Connects per load-spread run.
    lb_connects: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                reps: 2,
                rr_warmup: 300,
                rr_count: 3_000,
                crr_warmup: Duration::from_millis(100),
                crr_time: Duration::from_millis(300),
                crr_slices: 2,
                crr_slice_warmup: Duration::from_millis(20),
                scale_reps: 1,
                scale_time: Duration::from_millis(300),
                endpoint_rounds: 4,
                endpoint_warmup: Duration::from_millis(50),
                endpoint_time: Duration::from_millis(150),
                failfast_count: 2_000,
                lb_reps: 1,
                lb_connects: 100_000,
            }
        } else {
            Self {
                reps: 5,
                rr_warmup: 2_000,
                rr_count: 50_000,
                crr_warmup: Duration::from_millis(300),
                crr_time: Duration::from_millis(1_500),
                crr_slices: 10,
                crr_slice_warmup: Duration::from_millis(30),
                scale_reps: 3,
                scale_time: Duration::from_secs(1),
                endpoint_rounds: 21,
                endpoint_warmup: Duration::from_millis(100),
                endpoint_time: Duration::from_millis(300),
                failfast_count: 10_000,
                lb_reps: 3,
                lb_connects: 100_000,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark

/// How a client reaches the echo service in one variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Client → backend pod address.
    Direct,
    /// Client → service VIP, translated at `connect()` by the mesh's cgroup programs.
    Mesh,
    /// Client → service VIP, DNAT by kube-proxy-shaped iptables rules (`nf_tables` backend).
    Iptables,
    /// Client → `HAProxy` (mode tcp) in the node namespace → backend.
    Haproxy,
}

impl Variant {
    const ALL: [Self; 4] = [Self::Direct, Self::Mesh, Self::Iptables, Self::Haproxy];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
            Self::Iptables => "iptables",
            Self::Haproxy => "haproxy",
        }
    }
}

/// Reads the flow-event ring as the agent does (wait until readable, drain, repeat), so the
/// kernel pays for real event delivery, wake-ups included, rather than for a full ring. It can be
/// paused for the diagnostic run (the ring fills and the kernel drops each event at `reserve`).
struct EventReader {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EventReader {
    /// Starts the reader thread, pinned to `cpu` if given.
    fn start(dp: &mut Datapath, cpu: Option<usize>) -> Result<Self> {
        let mut ring = dp
            .take_events()
            .context("the flow-event ring was already taken")?;
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let read = Arc::new(AtomicU64::new(0));
        let (st, pa, rd) = (Arc::clone(&stop), Arc::clone(&paused), Arc::clone(&read));
        let thread = std::thread::Builder::new()
            .name("flow-events".to_owned())
            .spawn(move || {
                if let Some(c) = cpu {
                    let _ = pin_to_cpu(c);
                }
                while !st.load(Ordering::Relaxed) {
                    if pa.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    let mut pfd = libc::pollfd {
                        fd: ring.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the ring's descriptor, kept open by `ring`.
                    unsafe { libc::poll(&raw mut pfd, 1, 100) };
                    let n = events::drain(&mut ring).len();
                    rd.fetch_add(n as u64, Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            stop,
            paused,
            read,
            thread: Some(thread),
        })
    }

    fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for EventReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Bench {
    plan: Plan,
    client_cpu: Option<usize>,
    server_cpu: Option<usize>,
    proxy_cpu: Option<usize>,
    out_dir: PathBuf,
    // Field order is drop order: processes and the data path go before the cluster.
    haproxy: Option<PodChild>,
    _servers: Vec<PodChild>,
    events: EventReader,
    dp: Datapath,
    /// Mesh filler services currently applied (beyond the measured ones).
    mesh_fillers: Vec<ServiceSpec>,
    client: PodHandle,
    client_ipt: PodHandle,
    backends: Vec<PodHandle>,
    node: NodeHandle,
    cluster: Cluster,
}

fn datapath(args: &DatapathArgs) -> Result<()> {
    ensure!(
        mesh_tests::is_root(),
        "mesh-bench needs root (namespaces, cgroups, eBPF): run `cargo xtask bench datapath` as root"
    );
    let plan = Plan::new(args.quick);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench/datapath.json"));
    let out_dir = out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("failed to create {}", out_dir.display()))?;
    let started = Instant::now();
    let machine = Machine::probe();
    machine.print(&plan, args.quick, args.cpus);

    let mut bench = Bench::setup(plan, args.cpus, machine.cpus, out_dir)?;
    let mut s = Samples::default();
    let failures_before = bench.dp.counter(CTR_BACKEND_FAILURE)?;
    let everything = args.only.is_none();
    if everything || args.only.as_deref() == Some("matrix") {
        bench.matrix(&mut s)?;
    }
    if everything {
        bench.bypass(&mut s)?;
    }
    let failures = bench.dp.counter(CTR_BACKEND_FAILURE)? - failures_before;
    if everything {
        bench.connect_scale_mesh(&mut s)?;
        bench.connect_scale_iptables(&mut s)?;
        bench.failfast(&mut s)?;
        bench.events_off(&mut s)?;
    }
    let spread = if everything || args.only.as_deref() == Some("endpoints") {
        Some(bench.endpoints(&mut s)?)
    } else {
        None
    };
    let dropped_events = bench.dp.counter(CTR_EVENT_DROPPED)?;
    let read_events = bench.events.read();

    let mut metrics = s.medians();
    metrics.insert("bench_reps".to_owned(), plan.reps as f64);
    metrics.insert("bench_cpus".to_owned(), machine.cpus as f64);
    metrics.insert(
        "bench_same_cpu".to_owned(),
        if args.cpus == Layout::SameCpu {
            1.0
        } else {
            0.0
        },
    );
    metrics.insert("bench_backend_failures_counted".to_owned(), failures as f64);
    // Totals over every load-spread run, not medians.
    if let Some(spread) = spread {
        for (k, v) in [
            ("lb_refused_while_eligible", spread.refused),
            ("lb_connects_to_ejected", spread.to_ejected),
            ("lb_eligible_never_chosen", spread.never_chosen),
            ("lb_connect_failures_other", spread.other),
        ] {
            metrics.insert(k.to_owned(), v as f64);
        }
    }
    print_report(&metrics, &s);
    if failures > 0 {
        println!(
            "note: the kernel counted {failures} backend failure(s) during healthy-backend runs"
        );
    }
    println!(
        "flow events: {read_events} read by the benchmark's reader thread, {dropped_events} dropped (ring full)"
    );
    let json = serde_json::to_string_pretty(&metrics)?;
    std::fs::write(&out, format!("{json}\n"))
        .with_context(|| format!("failed to write {}", out.display()))?;
    println!("wrote {} ({} metrics)", out.display(), metrics.len());
    drop(bench);
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

impl Bench {
    fn setup(plan: Plan, layout: Layout, cpus: usize, out_dir: PathBuf) -> Result<Self> {
        let (client_cpu, server_cpu, proxy_cpu) = match layout {
            Layout::SameCpu => {
                let last = Some(cpus.saturating_sub(1));
                (last, last, last)
            }
            Layout::Split => {
                ensure!(
                    cpus >= 2,
                    "--cpus split needs 2 CPUs, this machine has {cpus}"
                );
                (Some(0), Some(1), None)
            }
        };
        let cluster = Cluster::new("datapath-bench")?;
        let node = cluster.add_node("a")?;
        let client = cluster.add_pod(&node, "client")?;
        let client_ipt = cluster.add_pod(&node, "client-ipt")?;
        let backends = vec![cluster.add_pod(&node, "b0")?, cluster.add_pod(&node, "b1")?];
        // Connection churn: wide port range and TIME_WAIT reuse wherever connections start
        // (client pods; the node, where HAProxy connects to the backends).
        for sb in [&*client, &*client_ipt, &*node] {
            sb.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            sb.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        let exe = std::env::current_exe().context("cannot find the mesh-bench executable")?;
        let mut servers = Vec::new();
        let mut start_server = |pod: &PodHandle, echo: SocketAddr, oneshot: Option<SocketAddr>| {
            let mut cmd = pod.command(&exe);
            cmd.args(["serve", "--listen", &echo.to_string()]);
            if let Some(a) = oneshot {
                cmd.args(["--oneshot", &a.to_string()]);
            }
            if let Some(cpu) = server_cpu {
                cmd.args(["--cpu", &cpu.to_string()]);
            }
            let mut child = pod.spawn(cmd)?;
            child
                .wait_ready(Duration::from_secs(10))
                .with_context(|| format!("echo server in {} never became ready", pod.name()))?;
            servers.push(child);
            anyhow::Ok(())
        };
        for b in &backends {
            start_server(
                b,
                SocketAddr::new(b.ipv4().into(), ECHO_PORT),
                Some(SocketAddr::new(b.ipv4().into(), ONESHOT_PORT)),
            )?;
        }
        // True loopback inside the client pod.
        start_server(&client, v4(127, 0, 0, 1, ECHO_PORT), None)?;

        let mut dp = Datapath::load(&DatapathConfig {
            cgroup: node.cgroup_dir().to_path_buf(),
            pin_dir: cluster.bpffs_dir()?.join("a"),
        })
        .context("failed to load the data path")?;
        // The agent's work per event belongs to the mesh's cost: with `same-cpu` it runs on the
        // measured core too.
        let events = EventReader::start(&mut dp, proxy_cpu)?;
        let mut bench = Self {
            plan,
            client_cpu,
            server_cpu,
            proxy_cpu,
            out_dir,
            haproxy: None,
            _servers: servers,
            events,
            dp,
            mesh_fillers: Vec::new(),
            client,
            client_ipt,
            backends,
            node,
            cluster,
        };
        bench.apply_mesh_services()?;
        bench.load_iptables(FEW)?;
        bench.start_haproxy()?;
        for (v, oneshot) in Variant::ALL.iter().flat_map(|v| [(*v, false), (*v, true)]) {
            let target = bench.targets(v, oneshot)[0];
            let pod = bench.client_of(v).clone();
            let works = bench.in_pod(&pod, move || wait_echo(target, Duration::from_secs(10)));
            if let Err(e) = works {
                let haproxy = bench
                    .haproxy
                    .as_ref()
                    .map(PodChild::stderr_text)
                    .unwrap_or_default();
                return Err(e.context(format!(
                    "the {} path does not work (haproxy stderr: {})",
                    v.name(),
                    haproxy.trim()
                )));
            }
        }
        println!(
            "setup: cluster {} ready; CPUs: client {}, echo servers {}, HAProxy {}",
            bench.cluster.prefix(),
            cpu_name(bench.client_cpu),
            cpu_name(bench.server_cpu),
            cpu_name(bench.proxy_cpu)
        );
        Ok(bench)
    }

    fn backend_addrs(&self, port: u16) -> Vec<SocketAddr> {
        self.backends
            .iter()
            .map(|b| SocketAddr::new(b.ipv4().into(), port))
            .collect()
    }

    /// The 10 mesh services of the "few" state: the measured VIP's two ports, the bypass VIP,
    /// and fillers.
    fn apply_mesh_services(&mut self) -> Result<()> {
        self.dp
            .apply_service(&ServiceSpec::tcp(MESH_VIP, self.backend_addrs(ECHO_PORT)))?;
        self.dp.apply_service(&ServiceSpec::tcp(
            MESH_VIP_ONESHOT,
            self.backend_addrs(ONESHOT_PORT),
        ))?;
        self.dp.apply_service(&ServiceSpec::tcp(
            BYPASS_VIP,
            [SocketAddr::new(self.backends[0].ipv4().into(), ECHO_PORT)],
        ))?;
        self.set_mesh_service_count(FEW)?;
        Ok(())
    }

    /// Adds or removes filler services until the mesh serves `total` services.
    fn set_mesh_service_count(&mut self, total: usize) -> Result<Duration> {
        let start = Instant::now();
        let want_fillers = total - MESH_MEASURED;
        while self.mesh_fillers.len() < want_fillers {
            let spec = filler_service(self.mesh_fillers.len(), [10, 96], [10, 245]);
            self.dp.apply_service(&spec)?;
            self.mesh_fillers.push(spec);
        }
        while self.mesh_fillers.len() > want_fillers {
            let spec = self.mesh_fillers.pop().context("filler")?;
            self.dp
                .remove_service(&service_key(spec.vip, Protocol::Tcp))?;
        }
        let n = self.dp.service_keys().count();
        ensure!(n == total, "the mesh serves {n} services, expected {total}");
        Ok(start.elapsed())
    }

    /// Replaces the client-ipt pod's nat table with kube-proxy's rules for `services` services.
    fn load_iptables(&self, services: usize) -> Result<Duration> {
        let path = self.out_dir.join(format!("kube-proxy-{services}.rules"));
        if !path.exists() {
            let measured = [
                ("bench/echo:tcp", IPT_VIP, self.backend_addrs(ECHO_PORT)),
                (
                    "bench/echo:oneshot",
                    IPT_VIP_ONESHOT,
                    self.backend_addrs(ONESHOT_PORT),
                ),
            ];
            std::fs::write(&path, kube_proxy_rules(services, &measured))
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        let start = Instant::now();
        self.client_ipt
            // No `-w`: it takes an optional argument and would swallow the file name.
            .exec("iptables-restore", [path.as_os_str()])
            .with_context(|| format!("iptables-restore {} failed", path.display()))?;
        let took = start.elapsed();
        let listed = self
            .client_ipt
            .exec("iptables", ["-t", "nat", "-S", "KUBE-SERVICES"])?;
        let loaded = listed.lines().filter(|l| l.contains(" -d ")).count();
        ensure!(
            loaded == services,
            "KUBE-SERVICES holds {loaded} service rules after iptables-restore, expected {services}"
        );
        Ok(took)
    }

    fn start_haproxy(&mut self) -> Result<()> {
        let cfg = self.out_dir.join("haproxy.cfg");
        let mut text = String::from(
            "# mesh-bench: userspace proxy baseline (HAProxy mode tcp, one thread).\n\
             global\n    nbthread 1\n    maxconn 8000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n",
        );
        for (name, port, backend_port) in [
            ("echo", HAPROXY_PORT, ECHO_PORT),
            ("oneshot", HAPROXY_ONESHOT_PORT, ONESHOT_PORT),
        ] {
            write!(
                text,
                "\nfrontend {name}\n    bind {}:{port}\n    default_backend {name}\n\n\
                 backend {name}\n    balance random\n",
                self.node.ipv4()
            )?;
            for (i, a) in self.backend_addrs(backend_port).iter().enumerate() {
                writeln!(text, "    server b{i} {a}")?;
            }
        }
        std::fs::write(&cfg, text).with_context(|| format!("failed to write {}", cfg.display()))?;
        // Pinned with the echo servers in the same-cpu layout.
        let mut cmd = match self.proxy_cpu {
            Some(cpu) => {
                let mut c = self.node.command("taskset");
                c.args(["-c", &cpu.to_string(), "haproxy"]);
                c
            }
            None => self.node.command("haproxy"),
        };
        cmd.args(["-db", "-f"]).arg(&cfg);
        self.haproxy = Some(self.node.spawn(cmd).context("failed to start haproxy")?);
        Ok(())
    }

    fn client_of(&self, v: Variant) -> &PodHandle {
        if v == Variant::Iptables {
            &self.client_ipt
        } else {
            &self.client
        }
    }

    /// Where a variant's client connects: the echo port (RR, first address) or the one-shot
    /// port (churn; direct: both backends in turn).
    fn targets(&self, v: Variant, oneshot: bool) -> Vec<SocketAddr> {
        let node = |p| vec![SocketAddr::new(self.node.ipv4().into(), p)];
        match (v, oneshot) {
            (Variant::Direct, false) => self.backend_addrs(ECHO_PORT),
            (Variant::Direct, true) => self.backend_addrs(ONESHOT_PORT),
            (Variant::Mesh, false) => vec![MESH_VIP],
            (Variant::Mesh, true) => vec![MESH_VIP_ONESHOT],
            (Variant::Iptables, false) => vec![IPT_VIP],
            (Variant::Iptables, true) => vec![IPT_VIP_ONESHOT],
            (Variant::Haproxy, false) => node(HAPROXY_PORT),
            (Variant::Haproxy, true) => node(HAPROXY_ONESHOT_PORT),
        }
    }

    /// Runs `f` in a forked child inside `pod`, pinned to the client CPU.
    fn in_pod<T, F>(&self, pod: &PodHandle, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T, String>,
        T: Serialize + DeserializeOwned,
    {
        let cpu = self.client_cpu;
        let r: Result<T, String> = pod.run_timeout(RUN_TIMEOUT, move || {
            if let Some(c) = cpu {
                pin_to_cpu(c).map_err(|e| format!("failed to pin to CPU {c}: {e}"))?;
            }
            f()
        })?;
        r.map_err(|e| anyhow!("in pod {}: {e}", pod.name()))
    }

    fn rr(&self, pod: &PodHandle, addr: SocketAddr) -> Result<Lat> {
        let (w, n) = (self.plan.rr_warmup, self.plan.rr_count);
        self.in_pod(pod, move || rr_client(addr, w, n))
    }

    fn crr(&self, pod: &PodHandle, targets: Vec<SocketAddr>, time: Duration) -> Result<Crr> {
        Ok(self
            .crr_raw(pod, targets, self.plan.crr_warmup, time)?
            .summary())
    }

    fn crr_raw(
        &self,
        pod: &PodHandle,
        targets: Vec<SocketAddr>,
        warmup: Duration,
        time: Duration,
    ) -> Result<CrrRaw> {
        self.in_pod(pod, move || crr_client(&targets, warmup, time))
    }

    /// Churn for each of `variants` (all from `client_of`), `crr_time` each, in
    /// `crr_slices` interleaved slices whose order rotates by one every slice (starting at
    /// `rotate`): each variant's connections and time are summed over its slices. Also returns
    /// the `translated` counter's growth during each variant's slices.
    fn crr_interleaved(&self, variants: &[Variant], rotate: usize) -> Result<Vec<(Crr, u64)>> {
        let slices = self.plan.crr_slices.max(1);
        let time = self.plan.crr_time / slices;
        let mut raw = vec![(CrrRaw::default(), 0u64); variants.len()];
        for slice in 0..slices as usize {
            for k in 0..variants.len() {
                let i = (rotate + slice + k) % variants.len();
                let v = variants[i];
                let before = self.dp.counter(CTR_TRANSLATED)?;
                let r = self.crr_raw(
                    self.client_of(v),
                    self.targets(v, true),
                    self.plan.crr_slice_warmup,
                    time,
                )?;
                raw[i].1 += self.dp.counter(CTR_TRANSLATED)? - before;
                raw[i].0.add(r);
            }
        }
        Ok(raw.into_iter().map(|(r, t)| (r.summary(), t)).collect())
    }

    /// RR and CRR for the four variants, order rotated every repetition (CRR interleaved in
    /// slices within the repetition: [`Self::crr_interleaved`]).
    fn matrix(&self, s: &mut Samples) -> Result<()> {
        println!(
            "\n== request/response and connection churn: {} repetitions × {} variants (churn in {} interleaved slices of {:.0} ms each)",
            self.plan.reps,
            Variant::ALL.len(),
            self.plan.crr_slices,
            (self.plan.crr_time / self.plan.crr_slices.max(1)).as_secs_f64() * 1000.0
        );
        for rep in 0..self.plan.reps {
            let mut rr = BTreeMap::new();
            for k in 0..Variant::ALL.len() {
                let v = Variant::ALL[(rep + k) % Variant::ALL.len()];
                let translated = self.dp.counter(CTR_TRANSLATED)?;
                let lat = self.rr(self.client_of(v), self.targets(v, false)[0])?;
                let translated = self.dp.counter(CTR_TRANSLATED)? - translated;
                ensure!(
                    (v == Variant::Mesh) == (translated > 0),
                    "{} rr run: the mesh translated {translated} connects",
                    v.name()
                );
                rr.insert(v.name(), lat);
            }
            let churn = self.crr_interleaved(&Variant::ALL, rep)?;
            let mut crr = BTreeMap::new();
            for (v, (c, translated)) in Variant::ALL.iter().zip(churn) {
                let measured = c.per_s * self.plan.crr_time.as_secs_f64();
                if *v == Variant::Mesh {
                    ensure!(
                        translated as f64 >= measured * 0.99,
                        "mesh run: only {translated} connects were translated by the data path"
                    );
                } else {
                    ensure!(
                        translated == 0,
                        "{} run: the mesh translated {translated} connects it must not see",
                        v.name()
                    );
                }
                let lat = rr[v.name()];
                println!(
                    "rep {}/{} {:<8} rr p50 {:>7.2} µs  p99 {:>7.2} µs | crr {:>8.0}/s  connect p50 {:>6.2} µs",
                    rep + 1,
                    self.plan.reps,
                    v.name(),
                    lat.p50_us,
                    lat.p99_us,
                    c.per_s,
                    c.connect.p50_us
                );
                let n = v.name();
                s.push(format!("rr_latency_p50_us_{n}"), lat.p50_us);
                s.push(format!("rr_latency_p99_us_{n}"), lat.p99_us);
                s.push(format!("crr_per_s_{n}"), c.per_s);
                s.push(format!("crr_connect_p50_us_{n}"), c.connect.p50_us);
                crr.insert(v.name(), c);
            }
            let mesh = rr["mesh"];
            for base in ["direct", "iptables", "haproxy"] {
                s.push(
                    format!("rr_latency_p50_ratio_vs_{base}"),
                    mesh.p50_us / rr[base].p50_us,
                );
                s.push(
                    format!("rr_latency_p99_ratio_vs_{base}"),
                    mesh.p99_us / rr[base].p99_us,
                );
                s.push(
                    format!("crr_rate_ratio_vs_{base}"),
                    crr["mesh"].per_s / crr[base].per_s,
                );
            }
        }
        Ok(())
    }

    /// Same-node bypass vs plain same-node TCP vs 127.0.0.1, order rotated every repetition.
    fn bypass(&mut self, s: &mut Samples) -> Result<()> {
        println!(
            "\n== same-node bypass: {} repetitions (bypass via VIP, plain pod↔pod TCP, 127.0.0.1)",
            self.plan.reps
        );
        let pair: [IpAddr; 2] = [self.client.ipv4().into(), self.backends[0].ipv4().into()];
        let plain_addr = SocketAddr::new(self.backends[0].ipv4().into(), ECHO_PORT);
        for rep in 0..self.plan.reps {
            let mut got = BTreeMap::new();
            for k in 0..3 {
                let which = ["bypass", "plain", "localhost"][(rep + k) % 3];
                let bypassed = self.dp.counter(CTR_BYPASS_ESTABLISHED)?;
                let lat = match which {
                    "bypass" => {
                        self.dp.set_local_endpoints(&pair)?;
                        self.rr(&self.client, BYPASS_VIP)?
                    }
                    "plain" => {
                        self.dp.set_local_endpoints(&[])?;
                        self.rr(&self.client, plain_addr)?
                    }
                    _ => self.rr(&self.client, v4(127, 0, 0, 1, ECHO_PORT))?,
                };
                let bypassed = self.dp.counter(CTR_BYPASS_ESTABLISHED)? - bypassed;
                let want = if which == "bypass" { 2 } else { 0 };
                ensure!(
                    bypassed == want,
                    "{which} run put {bypassed} sockets on the bypass, expected {want}"
                );
                println!(
                    "rep {}/{} {which:<9} rr p50 {:>7.2} µs  p99 {:>7.2} µs",
                    rep + 1,
                    self.plan.reps,
                    lat.p50_us,
                    lat.p99_us
                );
                got.insert(which, lat);
            }
            let (b, p, l) = (got["bypass"], got["plain"], got["localhost"]);
            s.push("bypass_rr_latency_p50_us", b.p50_us);
            s.push("bypass_rr_latency_p99_us", b.p99_us);
            s.push("same_node_tcp_rr_latency_p50_us", p.p50_us);
            s.push("same_node_tcp_rr_latency_p99_us", p.p99_us);
            s.push("localhost_rr_latency_p50_us", l.p50_us);
            s.push("localhost_rr_latency_p99_us", l.p99_us);
            s.push("bypass_rr_latency_ratio_vs_loopback", b.p50_us / p.p50_us);
            s.push(
                "bypass_rr_latency_p99_ratio_vs_loopback",
                b.p99_us / p.p99_us,
            );
            s.push("bypass_rr_latency_ratio_vs_localhost", b.p50_us / l.p50_us);
        }
        self.dp.set_local_endpoints(&[])?;
        let misses = self.dp.counter(CTR_BYPASS_MISS)?;
        println!("bypass: {misses} sk_msg redirect misses");
        Ok(())
    }

    /// p50 `connect()` latency to the measured VIP with 10 and with 10,000 mesh services, the
    /// state toggled between measurements (10, 10k | 10k, 10 | …).
    fn connect_scale_mesh(&mut self, s: &mut Samples) -> Result<()> {
        println!(
            "\n== connect latency, mesh: {FEW} vs {MANY} services, {} repetitions",
            self.plan.scale_reps
        );
        let mut many = false;
        for rep in 0..self.plan.scale_reps {
            let mut got = BTreeMap::new();
            for _ in 0..2 {
                let c = self.crr(&self.client, vec![MESH_VIP_ONESHOT], self.plan.scale_time)?;
                let n = if many { MANY } else { FEW };
                println!(
                    "rep {}/{} mesh {n:>5} services: connect p50 {:>6.2} µs  p99 {:>6.2} µs  ({:.0} conn/s)",
                    rep + 1,
                    self.plan.scale_reps,
                    c.connect.p50_us,
                    c.connect.p99_us,
                    c.per_s
                );
                got.insert(many, c);
                if !got.contains_key(&!many) {
                    many = !many;
                    let took = self.set_mesh_service_count(if many { MANY } else { FEW })?;
                    let what = if many { "apply" } else { "remove" };
                    println!(
                        "        {what} {} services: {:.2} s",
                        MANY - FEW,
                        took.as_secs_f64()
                    );
                    s.push(
                        format!("mesh_{what}_{}_services_s", MANY - FEW),
                        took.as_secs_f64(),
                    );
                }
            }
            s.push("connect_latency_us_10_services", got[&false].connect.p50_us);
            s.push("connect_latency_us_10k_services", got[&true].connect.p50_us);
            s.push(
                "connect_latency_ratio_10k_vs_10_services",
                got[&true].connect.p50_us / got[&false].connect.p50_us,
            );
        }
        if many {
            self.set_mesh_service_count(FEW)?;
        }
        Ok(())
    }

    /// The same for kube-proxy's rules (10 vs 10,000 services, `iptables-restore` in between).
    fn connect_scale_iptables(&self, s: &mut Samples) -> Result<()> {
        println!(
            "\n== connect latency, iptables ({}): {FEW} vs {MANY} services, {} repetitions",
            iptables_backend(),
            self.plan.scale_reps
        );
        let mut many = false;
        for rep in 0..self.plan.scale_reps {
            let mut got = BTreeMap::new();
            for _ in 0..2 {
                let c = self.crr(
                    &self.client_ipt,
                    vec![IPT_VIP_ONESHOT],
                    self.plan.scale_time,
                )?;
                let n = if many { MANY } else { FEW };
                println!(
                    "rep {}/{} iptables {n:>5} services: connect p50 {:>6.2} µs  p99 {:>6.2} µs  ({:.0} conn/s)",
                    rep + 1,
                    self.plan.scale_reps,
                    c.connect.p50_us,
                    c.connect.p99_us,
                    c.per_s
                );
                got.insert(many, c);
                if !got.contains_key(&!many) {
                    many = !many;
                    let took = self.load_iptables(if many { MANY } else { FEW })?;
                    println!(
                        "        iptables-restore of {} services: {:.2} s",
                        if many { MANY } else { FEW },
                        took.as_secs_f64()
                    );
                    if many {
                        s.push("iptables_restore_10k_services_s", took.as_secs_f64());
                    }
                }
            }
            s.push(
                "connect_latency_us_10_services_iptables",
                got[&false].connect.p50_us,
            );
            s.push(
                "connect_latency_us_10k_services_iptables",
                got[&true].connect.p50_us,
            );
            s.push(
                "connect_latency_ratio_10k_vs_10_services_iptables",
                got[&true].connect.p50_us / got[&false].connect.p50_us,
            );
        }
        if many {
            self.load_iptables(FEW)?;
        }
        Ok(())
    }

    /// Every backend of a service ejected: p50 of rejected connects; and for scale, the kernel's
    /// own refusal (RST from a closed port of a pod).
    fn failfast(&mut self, s: &mut Samples) -> Result<()> {
        println!("\n== fail fast: every backend ejected");
        let mut spec = ServiceSpec::tcp(FAILFAST_VIP, self.backend_addrs(CLOSED_PORT));
        spec.circuit = CircuitSettings {
            consecutive_failures: 1,
            base_ejection: Duration::from_mins(10),
            max_ejection: Duration::from_mins(10),
            max_ejection_percent: 100,
            // Fail fast only without a panic threshold: at Envoy's default (50 %) a service
            // whose every backend is ejected balances over all of them instead.
            panic_threshold_percent: 0,
            ..CircuitSettings::default()
        };
        self.dp.apply_service(&spec)?;
        let key = service_key(FAILFAST_VIP, Protocol::Tcp);
        let start = Instant::now();
        loop {
            // Each refused connect (RST from the closed port) ejects the backend it reached.
            let _: u64 = self.in_pod(&self.client, || {
                for _ in 0..4 {
                    let _ = timed_connect(FAILFAST_VIP);
                }
                Ok(0)
            })?;
            let status = self.dp.backend_status(&key)?;
            if status.iter().all(|b| b.state.circuit == CIRCUIT_OPEN) {
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "backends were not all ejected: {status:?}"
            );
        }
        let n = self.plan.failfast_count;
        let closed = SocketAddr::new(self.backends[0].ipv4().into(), CLOSED_PORT);
        for rep in 0..self.plan.reps {
            let rejected = self.dp.counter(CTR_REJECT_CIRCUIT_OPEN)?;
            let ff = self.in_pod(&self.client, move || refused_client(FAILFAST_VIP, 200, n))?;
            let rejected = self.dp.counter(CTR_REJECT_CIRCUIT_OPEN)? - rejected;
            ensure!(
                rejected >= (n + 200) as u64,
                "only {rejected} of {} connects were rejected by the circuit breaker",
                n + 200
            );
            let rst = self.in_pod(&self.client, move || refused_client(closed, 200, n))?;
            println!(
                "rep {}/{} ejected service → ECONNREFUSED p50 {:.2} µs p99 {:.2} µs | closed pod port (kernel RST) p50 {:.2} µs p99 {:.2} µs",
                rep + 1,
                self.plan.reps,
                ff.p50_us,
                ff.p99_us,
                rst.p50_us,
                rst.p99_us
            );
            s.push("failfast_connect_us", ff.p50_us);
            s.push("failfast_connect_p99_us", ff.p99_us);
            s.push("closed_port_connect_us", rst.p50_us);
        }
        Ok(())
    }

    /// Diagnostic: the same fail-fast and churn figures with the event reader stopped (ring
    /// full, every event dropped at `reserve`), to show what flow-event delivery costs.
    fn events_off(&mut self, s: &mut Samples) -> Result<()> {
        println!("\n== diagnostic: flow events off (reader paused, ring full, events dropped)");
        self.events.set_paused(true);
        // Fill the ring: every rejected connect emits an event.
        let dropped = self.dp.counter(CTR_EVENT_DROPPED)?;
        let start = Instant::now();
        while self.dp.counter(CTR_EVENT_DROPPED)? == dropped {
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "the flow-event ring never filled"
            );
            let _ = self.in_pod(&self.client, || refused_client(FAILFAST_VIP, 0, 5_000))?;
        }
        let n = self.plan.failfast_count;
        let ff = self.in_pod(&self.client, move || refused_client(FAILFAST_VIP, 200, n))?;
        println!(
            "ejected service → ECONNREFUSED p50 {:.2} µs p99 {:.2} µs",
            ff.p50_us, ff.p99_us
        );
        s.push("failfast_connect_us_events_off", ff.p50_us);
        for rep in 0..self.plan.scale_reps {
            let mut got = BTreeMap::new();
            let pair = [Variant::Direct, Variant::Mesh];
            for (v, (c, _)) in pair.iter().zip(self.crr_interleaved(&pair, rep)?) {
                println!(
                    "rep {}/{} {:<8} crr {:>8.0}/s  connect p50 {:>6.2} µs",
                    rep + 1,
                    self.plan.scale_reps,
                    v.name(),
                    c.per_s,
                    c.connect.p50_us
                );
                s.push(format!("crr_per_s_{}_events_off", v.name()), c.per_s);
                got.insert(v.name(), c);
            }
            s.push(
                "crr_rate_ratio_vs_direct_events_off",
                got["mesh"].per_s / got["direct"].per_s,
            );
        }
        self.events.set_paused(false);
        self.dp
            .remove_service(&service_key(FAILFAST_VIP, Protocol::Tcp))?;
        Ok(())
    }
}

/// The busiest eligible endpoint's share ÷ its fair share when `connects` independent draws go
/// to the [`LB_ENDPOINTS`] endpoints outside `ejected`, in proportion to weights cycling through
/// `weights`: what a perfect balancer scores by chance alone.
fn ideal_max_share(
    connects: usize,
    weights: &[u64],
    ejected: std::ops::Range<u16>,
    seed: u64,
) -> f64 {
    let eligible: Vec<(usize, u64)> = (0..LB_ENDPOINTS)
        .filter(|i| !ejected.contains(i))
        .map(|i| (usize::from(i), weights[usize::from(i) % weights.len()]))
        .collect();
    // Cumulative weights: a draw in 0..total picks the first entry above it.
    let mut cumulative = Vec::with_capacity(eligible.len());
    let mut total = 0;
    for (_, w) in &eligible {
        total += w;
        cumulative.push(total);
    }
    let mut state = seed;
    let mut counts = vec![0u64; eligible.len()];
    for _ in 0..connects {
        let r = splitmix64(&mut state) % total;
        counts[cumulative.partition_point(|c| *c <= r)] += 1;
    }
    eligible
        .iter()
        .zip(&counts)
        .map(|((_, w), c)| *c as f64 / (connects as f64 * *w as f64 / total as f64))
        .fold(0.0, f64::max)
}

/// The next number of the splitmix64 sequence (a statistically sound, dependency-free PRNG).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sums over every load-spread run (at least one backend eligible in each).
#[derive(Debug, Default, Clone, Copy)]
struct SpreadTotals {
    /// Connects refused (`ECONNREFUSED`): each one while an eligible backend existed.
    refused: u64,
    /// Connections that reached an ejected endpoint (panic threshold 0: must be none).
    to_ejected: u64,
    /// Eligible endpoints that got no connection in their run, summed over runs.
    never_chosen: u64,
    /// Failures that are not the balancer's verdict (timeouts, resets, client errors).
    other: u64,
}

/// Many endpoints: load spread with a node's run ejected, refusals, connect cost at 10,000.
impl Bench {
    /// Runs the many-endpoint measurements against one `meshpod serve` process in backend b1
    /// (10,000 ports, each answering `lb:PORT`); returns the totals of the load-spread runs.
    fn endpoints(&mut self, s: &mut Samples) -> Result<SpreadTotals> {
        let pod = self.backends[1].clone();
        let first = SocketAddr::new(pod.ipv4().into(), LB_FIRST_PORT);
        // `meshpod serve --tcp-ports`, pinned with the echo servers so the layout's CPU
        // placement holds for every server (on a VM a cross-CPU wake-up is costly and noisy).
        let mut cmd = match self.server_cpu {
            Some(cpu) => {
                let mut c = pod.command("taskset");
                c.args(["-c", &cpu.to_string()])
                    .arg(mesh_tests::meshpod_path()?);
                c
            }
            None => pod.meshpod()?,
        };
        cmd.args(["serve", "--name", "lb", "--tcp", &first.to_string()])
            .args(["--tcp-ports", &WIDE_ENDPOINTS.to_string()]);
        let mut server = pod
            .spawn(cmd)
            .context("failed to start the many-endpoint server")?;
        server
            .wait_ready(Duration::from_secs(30))
            .context("the many-endpoint server never became ready")?;
        let totals = self.lb_spread(s)?;
        let same = self.same_listener_server()?;
        self.connect_scale_endpoints(s)?;
        drop(same);
        for vip in [LB_VIP, WIDE_VIP, NARROW_VIP] {
            self.dp.remove_service(&service_key(vip, Protocol::Tcp))?;
        }
        drop(server);
        Ok(totals)
    }

    /// A service of the first `n` endpoints of the many-endpoint server. Ejects on one reported
    /// failure, for 10 minutes (longer than the runs), any share; panic threshold 0, so ejected
    /// endpoints stay excluded however many there are (Envoy's 50 % would balance over all once
    /// most are ejected).
    fn endpoint_service(&self, vip: SocketAddr, n: u16, algorithm: Algorithm) -> ServiceSpec {
        let ip: IpAddr = self.backends[1].ipv4().into();
        let mut spec =
            ServiceSpec::tcp(vip, (0..n).map(|i| SocketAddr::new(ip, LB_FIRST_PORT + i)));
        spec.algorithm = algorithm;
        spec.circuit = CircuitSettings {
            max_connections: 0,
            consecutive_failures: 1,
            base_ejection: Duration::from_mins(10),
            max_ejection: Duration::from_mins(10),
            max_ejection_percent: 100,
            panic_threshold_percent: 0,
        };
        if algorithm == Algorithm::Weighted {
            for (b, w) in spec.backends.iter_mut().zip((1..=4).cycle()) {
                b.weight = w;
            }
        }
        spec
    }

    /// Applies `spec` afresh (new backend ids, closed circuits) and ejects the endpoints at
    /// `slots`, as an L7 failure report each (how a proxy's 5xx feeds the circuit).
    fn apply_ejected(&mut self, spec: &ServiceSpec, slots: std::ops::Range<u16>) -> Result<()> {
        let key = service_key(spec.vip, Protocol::Tcp);
        self.dp.remove_service(&key)?;
        self.dp.apply_service(spec)?;
        let status = self.dp.backend_status(&key)?;
        let now = monotonic_ns();
        for i in slots.clone() {
            let b = status
                .get(usize::from(i))
                .with_context(|| format!("{}: no slot {i}", spec.vip))?;
            ensure!(
                self.dp.report_failure(b.id, now)?,
                "{}: slot {i} was not ejected",
                spec.vip
            );
        }
        let open = self
            .dp
            .backend_status(&key)?
            .iter()
            .filter(|b| b.state.circuit == CIRCUIT_OPEN)
            .count();
        ensure!(
            open == slots.len(),
            "{}: {open} circuits open, expected {}",
            spec.vip,
            slots.len()
        );
        Ok(())
    }

    /// One load-spread run: `connects` connects to [`LB_VIP`] with `ejected` slots ejected.
    /// Returns the busiest eligible endpoint's share ÷ its fair share (weight-proportional for
    /// the weighted algorithm); adds refusals and misplaced connects to `totals`.
    fn spread_run(
        &mut self,
        algorithm: Algorithm,
        ejected: std::ops::Range<u16>,
        totals: &mut SpreadTotals,
    ) -> Result<f64> {
        let spec = self.endpoint_service(LB_VIP, LB_ENDPOINTS, algorithm);
        self.apply_ejected(&spec, ejected.clone())?;
        let n = self.plan.lb_connects;
        let slots = usize::from(LB_ENDPOINTS);
        let rejected = self.dp.counter(CTR_REJECT_CIRCUIT_OPEN)?;
        let r = self.in_pod(&self.client, move || spread_client(LB_VIP, slots, n))?;
        let rejected = self.dp.counter(CTR_REJECT_CIRCUIT_OPEN)? - rejected;
        let weights: Vec<f64> = spec.backends.iter().map(|b| f64::from(b.weight)).collect();
        let is_ejected = |i: usize| u16::try_from(i).is_ok_and(|i| ejected.contains(&i));
        let ok: u64 = r.per_slot.iter().sum();
        let eligible_weight: f64 = (0..slots)
            .filter(|i| !is_ejected(*i))
            .map(|i| weights[i])
            .sum();
        let mut ratio = 0.0_f64;
        let (mut to_ejected, mut never_chosen) = (0, 0);
        for (i, c) in r.per_slot.iter().enumerate() {
            if is_ejected(i) {
                to_ejected += c;
            } else {
                let fair = ok as f64 * weights[i] / eligible_weight;
                ratio = ratio.max(*c as f64 / fair);
                never_chosen += u64::from(*c == 0);
            }
        }
        println!(
            "  {:<12} {:>3} % ejected: busiest {ratio:.3}× fair | {ok} ok, {} refused ({rejected} rejected by the kernel), {} other failures | {to_ejected} to ejected, {never_chosen} eligible never chosen | {:.0} conn/s",
            format!("{algorithm:?}"),
            ejected.len() * 100 / slots,
            r.refused,
            r.other,
            r.per_s
        );
        if let Some(e) = &r.first_other {
            println!("    first other failure: {e}");
        }
        totals.refused += r.refused;
        totals.to_ejected += to_ejected;
        totals.never_chosen += never_chosen;
        totals.other += r.other;
        Ok(ratio)
    }

    /// Load spread over 1,000 endpoints with a contiguous 10 % ejected, per algorithm, and one
    /// run with 90 % ejected; returns the totals over all of them.
    fn lb_spread(&mut self, s: &mut Samples) -> Result<SpreadTotals> {
        println!(
            "\n== load spread: {LB_ENDPOINTS} endpoints, {} connects per run from {LB_THREADS} threads, {} repetitions",
            self.plan.lb_connects, self.plan.lb_reps
        );
        let key = "lb_max_share_ratio_1k_endpoints_node_ejected";
        let mut totals = SpreadTotals::default();
        for rep in 0..self.plan.lb_reps {
            println!("rep {}/{}", rep + 1, self.plan.lb_reps);
            let mut headline = 0.0_f64;
            for (algorithm, name) in [
                (Algorithm::Random, "random"),
                (Algorithm::RoundRobin, "round_robin"),
                (Algorithm::LeastConn, "least_conn"),
                (Algorithm::Weighted, "weighted"),
            ] {
                let ratio = self.spread_run(algorithm, LB_EJECTED, &mut totals)?;
                s.push(format!("{key}_{name}"), ratio);
                if algorithm != Algorithm::Weighted {
                    headline = headline.max(ratio);
                }
            }
            s.push(key, headline);
            // The same statistic for ideal balancers (independent draws, uniform or
            // weight-proportional over the eligible endpoints): the sampling-noise floor of
            // 100,000 connects, for reading the measured ratios.
            let seed = 0x5eed_0000 + rep as u64;
            s.push(
                format!("{key}_ideal_uniform"),
                ideal_max_share(self.plan.lb_connects, &[1], LB_EJECTED, seed),
            );
            s.push(
                format!("{key}_ideal_weighted"),
                ideal_max_share(self.plan.lb_connects, &[1, 2, 3, 4], LB_EJECTED, seed),
            );
            let ratio = self.spread_run(Algorithm::Random, LB_EJECTED_MOST, &mut totals)?;
            s.push(
                "lb_max_share_ratio_1k_endpoints_90pct_ejected_random",
                ratio,
            );
        }
        Ok(totals)
    }

    /// p50 `connect()` latency to a service of 10,000 endpoints with a contiguous 10 % ejected
    /// against one of 10 endpoints, both applied throughout, every endpoint served by one
    /// listener ([`SAME_NET`]). Measured in interleaved rounds: each round times the mesh to 10
    /// and to 10,000 endpoints, the same endpoint sets connected to directly (each connect to a
    /// random eligible address), and direct to the 10 once more — an A/A pair, the noise floor —
    /// in an order that rotates every round, each run after the same warm-up. Every key is the
    /// median of per-round values, so CPU frequency, cache and load drift hit both sides of
    /// each ratio alike.
    fn connect_scale_endpoints(&mut self, s: &mut Samples) -> Result<()> {
        let plan = self.plan;
        println!(
            "\n== connect latency: {NARROW_ENDPOINTS} vs {WIDE_ENDPOINTS} endpoints ({} ejected), one listener, {} interleaved rounds of {} ms runs",
            WIDE_EJECTED.len(),
            plan.endpoint_rounds,
            plan.endpoint_time.as_millis()
        );
        let wide = self.same_listener_service(WIDE_VIP, WIDE_ENDPOINTS);
        self.apply_ejected(&wide, WIDE_EJECTED)?;
        let narrow = self.same_listener_service(NARROW_VIP, NARROW_ENDPOINTS);
        self.dp
            .remove_service(&service_key(NARROW_VIP, Protocol::Tcp))?;
        self.dp.apply_service(&narrow)?;
        let eligible = |spec: &ServiceSpec, ejected: std::ops::Range<u16>| -> Vec<SocketAddr> {
            spec.backends
                .iter()
                .enumerate()
                .filter(|(i, _)| !u16::try_from(*i).is_ok_and(|i| ejected.contains(&i)))
                .map(|(_, b)| b.addr.socket_addr())
                .collect()
        };
        // (name, targets): the runs of one round.
        let runs: [(&str, Vec<SocketAddr>); 5] = [
            ("mesh_10", vec![NARROW_VIP]),
            ("mesh_10k", vec![WIDE_VIP]),
            ("direct_10", eligible(&narrow, 0..0)),
            ("direct_10k", eligible(&wide, WIDE_EJECTED)),
            ("direct_10_again", eligible(&narrow, 0..0)),
        ];
        // The programs' own time per connect, from the kernel's run statistics (on while this
        // descriptor is open): what the mesh adds in the kernel, apart from the TCP stack's cost of
        // more distinct peers that the direct runs show.
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
        if let Err(e) = &stats {
            println!("(no BPF run statistics: {e})");
        }
        for round in 0..plan.endpoint_rounds {
            let mut p50 = BTreeMap::new();
            for k in 0..runs.len() {
                let (name, targets) = &runs[(round + k) % runs.len()];
                let targets = targets.clone();
                let before = self.prog_stats();
                let c = self.in_pod(&self.client, move || {
                    banner_latency_client(&targets, plan.endpoint_warmup, plan.endpoint_time)
                })?;
                let after = self.prog_stats();
                if let (Some(b), Some(a)) = (before, after)
                    && a.connects > b.connects
                {
                    let per = |t: Duration, u: Duration| {
                        t.saturating_sub(u).as_nanos() as f64 / (a.connects - b.connects) as f64
                    };
                    s.push(
                        format!("connect4_prog_ns_{name}"),
                        per(a.connect4, b.connect4),
                    );
                    s.push(
                        format!("sockops_prog_ns_per_connect_{name}"),
                        per(a.sockops, b.sockops),
                    );
                }
                p50.insert(*name, c.p50_us);
            }
            let ratio = |a: &str, b: &str| p50[b] / p50[a];
            println!(
                "round {:>2}/{}: p50 µs mesh {:.2} → {:.2} ({:.3}), direct {:.2} → {:.2} ({:.3}), direct A/A {:.3}",
                round + 1,
                plan.endpoint_rounds,
                p50["mesh_10"],
                p50["mesh_10k"],
                ratio("mesh_10", "mesh_10k"),
                p50["direct_10"],
                p50["direct_10k"],
                ratio("direct_10", "direct_10k"),
                ratio("direct_10", "direct_10_again"),
            );
            s.push("connect_latency_us_10_endpoints", p50["mesh_10"]);
            s.push("connect_latency_us_10k_endpoints", p50["mesh_10k"]);
            s.push("connect_latency_us_10_endpoints_direct", p50["direct_10"]);
            s.push("connect_latency_us_10k_endpoints_direct", p50["direct_10k"]);
            s.push(
                "connect_latency_ratio_10k_vs_10_endpoints",
                ratio("mesh_10", "mesh_10k"),
            );
            s.push(
                "connect_latency_ratio_10k_vs_10_endpoints_direct",
                ratio("direct_10", "direct_10k"),
            );
            // The noise floor: the same run twice in one round.
            s.push(
                "connect_latency_ratio_10_vs_10_endpoints_direct_aa",
                ratio("direct_10", "direct_10_again"),
            );
            // The mesh's own part: its ratio over the same endpoints' ratio without it.
            s.push(
                "connect_latency_ratio_10k_vs_10_endpoints_mesh_over_direct",
                ratio("mesh_10", "mesh_10k") / ratio("direct_10", "direct_10k"),
            );
        }
        Ok(())
    }

    /// The run statistics of the connect and sockops programs (zero unless statistics are on).
    fn prog_stats(&self) -> Option<ProgStats> {
        let (connect4, runs) = self.dp.program_run_stats("mesh_connect4")?;
        let (sockops, _) = self.dp.program_run_stats("mesh_sockops")?;
        Some(ProgStats {
            connect4,
            connects: runs,
            sockops,
        })
    }

    /// A service of the first `n` of the [`SAME_NET`] endpoint addresses (one listener behind
    /// them all), with the circuit settings of [`Self::endpoint_service`].
    fn same_listener_service(&self, vip: SocketAddr, n: u16) -> ServiceSpec {
        let mut spec = self.endpoint_service(vip, n, Algorithm::Random);
        for (i, b) in (0u16..).zip(spec.backends.iter_mut()) {
            b.addr = v4(10, 250, (i / 250) as u8, (1 + i % 250) as u8, SAME_PORT).into();
        }
        spec
    }

    /// Makes every [`SAME_NET`] address local to backend b1 and routes the net to it through
    /// the node (via b1's own address, so the node keeps one neighbour entry, not 10,000), and
    /// starts the one listener behind them: `meshpod serve` on `0.0.0.0:SAME_PORT`, answering
    /// `same:SAME_PORT` (the banner the client reads), pinned like the other servers.
    fn same_listener_server(&self) -> Result<PodChild> {
        let pod = &self.backends[1];
        let ip = |netns: &str, args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip")
                .args(["-n", netns])
                .args(args)
                .output()
                .context("running ip")?;
            if !out.status.success() {
                anyhow::bail!(
                    "ip -n {netns} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(())
        };
        ip(
            pod.netns(),
            &["route", "replace", "local", SAME_NET, "dev", "lo"],
        )?;
        ip(
            self.node.netns(),
            &[
                "route",
                "replace",
                SAME_NET,
                "via",
                &pod.ipv4().to_string(),
                "dev",
                pod.host_ifname(),
            ],
        )?;
        let mut cmd = match self.server_cpu {
            Some(cpu) => {
                let mut c = pod.command("taskset");
                c.args(["-c", &cpu.to_string()])
                    .arg(mesh_tests::meshpod_path()?);
                c
            }
            None => pod.meshpod()?,
        };
        cmd.args(["serve", "--name", &format!("same:{SAME_PORT}")])
            .args(["--tcp", &format!("0.0.0.0:{SAME_PORT}")]);
        let mut server = pod
            .spawn(cmd)
            .context("failed to start the one-listener server")?;
        server
            .wait_ready(Duration::from_secs(30))
            .context("the one-listener server never became ready")?;
        Ok(server)
    }
}

/// Cumulative run time of `mesh_connect4` (and its runs) and of `mesh_sockops`.
#[derive(Debug, Clone, Copy)]
struct ProgStats {
    connect4: Duration,
    connects: u64,
    sockops: Duration,
}

/// Filler service `i`: VIP `<vip>.(1 + i/250).(1 + i%250):80` with two endpoints in `<ep>`
/// (never connected to).
fn filler_service(i: usize, vip: [u8; 2], ep: [u8; 2]) -> ServiceSpec {
    let (hi, lo) = ((1 + i / 250) as u8, (1 + i % 250) as u8);
    ServiceSpec::tcp(
        v4(vip[0], vip[1], hi, lo, 80),
        [
            v4(ep[0], ep[1], hi, lo, ECHO_PORT),
            v4(ep[0], ep[1].wrapping_add(1), hi, lo, ECHO_PORT),
        ],
    )
}

/// `KUBE-SVC-`/`KUBE-SEP-` chain suffix as kube-proxy makes it: 16 characters of a hash.
fn chain_hash(what: &str) -> String {
    let digest = Sha256::digest(what.as_bytes());
    digest[..8].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}

/// An `iptables-restore` file for the nat table as kube-proxy's iptables mode writes it, with
/// `services` services of two endpoints each: the `measured` ones (name, VIP, endpoints) in the
/// middle of `KUBE-SERVICES` (the average position), the others fillers.
fn kube_proxy_rules(services: usize, measured: &[(&str, SocketAddr, Vec<SocketAddr>)]) -> String {
    let fillers = services - measured.len();
    let mut svcs: Vec<(String, SocketAddr, Vec<SocketAddr>)> = (0..fillers)
        .map(|i| {
            let f = filler_service(i, [10, 97], [10, 244]);
            let eps = f.backends.iter().map(|b| b.addr.socket_addr()).collect();
            (format!("bench/filler-{i}:http"), f.vip, eps)
        })
        .collect();
    for (k, (name, vip, eps)) in measured.iter().enumerate() {
        svcs.insert(fillers / 2 + k, ((*name).to_owned(), *vip, eps.clone()));
    }
    let mut chains = String::new();
    let mut rules = String::new();
    for (name, vip, eps) in &svcs {
        let svc = format!("KUBE-SVC-{}", chain_hash(name));
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let (ip, port) = (vip.ip(), vip.port());
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {svc}"
        );
        let _ = writeln!(
            rules,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {ip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        for (j, ep) in eps.iter().enumerate() {
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{name}/{ep}")));
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = eps.len() - j;
            let stat = if left > 1 {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {ep}\"{stat} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}"
            );
        }
    }
    format!(
        "# kube-proxy (iptables mode) nat table: {services} services, written by mesh-bench\n\
         *nat\n\
         :PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         {chains}\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         {rules}\
         -A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Machine and report

/// What the numbers were measured on.
struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    iptables: String,
    haproxy: String,
}

fn first_line(program: &str, args: &[&str]) -> String {
    let Ok(out) = std::process::Command::new(program).args(args).output() else {
        return format!("{program}: not found");
    };
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn cpu_name(cpu: Option<usize>) -> String {
    cpu.map_or_else(|| "unpinned".to_owned(), |c| c.to_string())
}

/// `nf_tables` or `legacy`, from `iptables -V`.
fn iptables_backend() -> String {
    let v = first_line("iptables", &["-V"]);
    v.split_once('(')
        .and_then(|(_, b)| b.split_once(')'))
        .map_or_else(|| "unknown backend".to_owned(), |(b, _)| b.to_owned())
}

impl Machine {
    fn probe() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_default();
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model,
            iptables: first_line("iptables", &["-V"]),
            haproxy: first_line("haproxy", &["-v"]),
        }
    }

    fn print(&self, plan: &Plan, quick: bool, layout: Layout) {
        let command = std::env::var("MESH_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "));
        println!("mesh-bench datapath{}", if quick { " (quick)" } else { "" });
        println!("command:  {command}");
        println!(
            "machine:  Linux {}, {} CPUs ({})",
            self.kernel, self.cpus, self.cpu_model
        );
        println!(
            "iptables: {} — kube-proxy rules in the client-ipt pod's netns (nat OUTPUT → KUBE-SERVICES)",
            self.iptables
        );
        println!(
            "haproxy:  {} — in the node netns, mode tcp, nbthread 1",
            self.haproxy
        );
        println!(
            "cpus:     {} (client loops and echo servers pinned with sched_setaffinity, HAProxy with taskset; the flow-event reader thread with them)",
            match layout {
                Layout::SameCpu => "same-cpu: client, servers and HAProxy on the last CPU",
                Layout::Split => "split: client CPU 0, servers CPU 1, HAProxy unpinned",
            }
        );
        if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .is_ok_and(|v| v.trim() != "0")
        {
            println!(
                "WARNING:  kernel.bpf_stats_enabled is on: every BPF program run also reads the clock twice, which inflates the mesh's costs (sysctl -w kernel.bpf_stats_enabled=0)"
            );
        }
        println!(
            "plan:     {} reps; rr {} round trips of {MSG} B (+{} warm-up); crr {:.1} s per variant in {} interleaved slices (+{:.0} ms warm-up dropped per slice; {:.1} s for single runs); scale {} reps × {:.1} s",
            plan.reps,
            plan.rr_count,
            plan.rr_warmup,
            plan.crr_time.as_secs_f64(),
            plan.crr_slices,
            plan.crr_slice_warmup.as_secs_f64() * 1000.0,
            plan.crr_warmup.as_secs_f64(),
            plan.scale_reps,
            plan.scale_time.as_secs_f64()
        );
    }
}

/// Targets of the headline ratios: (metric, is an upper bound, bound).
const TARGETS: [(&str, bool, f64); 13] = [
    ("rr_latency_p50_ratio_vs_direct", true, 1.02),
    ("rr_latency_p99_ratio_vs_direct", true, 1.02),
    ("crr_rate_ratio_vs_direct", false, 0.95),
    ("connect_latency_ratio_10k_vs_10_services", true, 1.05),
    ("bypass_rr_latency_ratio_vs_loopback", true, 0.85),
    ("failfast_connect_us", true, 5.0),
    ("lb_max_share_ratio_1k_endpoints_node_ejected", true, 1.5),
    (
        "lb_max_share_ratio_1k_endpoints_node_ejected_random",
        true,
        1.5,
    ),
    (
        "lb_max_share_ratio_1k_endpoints_node_ejected_round_robin",
        true,
        1.5,
    ),
    (
        "lb_max_share_ratio_1k_endpoints_node_ejected_least_conn",
        true,
        1.5,
    ),
    (
        "lb_max_share_ratio_1k_endpoints_node_ejected_weighted",
        true,
        1.5,
    ),
    ("lb_refused_while_eligible", true, 0.0),
    ("connect_latency_ratio_10k_vs_10_endpoints", true, 1.05),
];

fn print_report(m: &BTreeMap<String, f64>, s: &Samples) {
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    println!("\n== results (median over repetitions; round-trip times, not RTT/2)");
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>16}",
        "variant", "rr p50 µs", "rr p99 µs", "crr conn/s", "crr connect p50"
    );
    for v in Variant::ALL {
        let n = v.name();
        println!(
            "{n:<10} {:>12.2} {:>12.2} {:>12.0} {:>13.2} µs",
            get(&format!("rr_latency_p50_us_{n}")),
            get(&format!("rr_latency_p99_us_{n}")),
            get(&format!("crr_per_s_{n}")),
            get(&format!("crr_connect_p50_us_{n}")),
        );
    }
    println!(
        "same-node rr p50: bypass {:.2} µs, plain pod↔pod TCP {:.2} µs, 127.0.0.1 {:.2} µs",
        get("bypass_rr_latency_p50_us"),
        get("same_node_tcp_rr_latency_p50_us"),
        get("localhost_rr_latency_p50_us")
    );
    println!(
        "connect p50: mesh {:.2} → {:.2} µs, iptables {:.2} → {:.2} µs ({FEW} → {MANY} services)",
        get("connect_latency_us_10_services"),
        get("connect_latency_us_10k_services"),
        get("connect_latency_us_10_services_iptables"),
        get("connect_latency_us_10k_services_iptables"),
    );
    println!(
        "fail fast: {:.2} µs (p99 {:.2}); kernel RST from a closed pod port {:.2} µs",
        get("failfast_connect_us"),
        get("failfast_connect_p99_us"),
        get("closed_port_connect_us")
    );
    println!(
        "endpoints: connect p50 mesh {:.2} µs ({NARROW_ENDPOINTS}) → {:.2} µs ({WIDE_ENDPOINTS}, 10 % ejected), direct {:.2} → {:.2} µs; load spread: {} connects refused while eligible, {} to ejected endpoints, {} eligible never chosen, {} other failures (totals over all runs)",
        get("connect_latency_us_10_endpoints"),
        get("connect_latency_us_10k_endpoints"),
        get("connect_latency_us_10_endpoints_direct"),
        get("connect_latency_us_10k_endpoints_direct"),
        get("lb_refused_while_eligible"),
        get("lb_connects_to_ejected"),
        get("lb_eligible_never_chosen"),
        get("lb_connect_failures_other"),
    );
    println!(
        "\n{:<52} {:>9} {:>19} {:>9}  verdict",
        "ratio (mesh / baseline)", "median", "range over reps", "target"
    );
    let ratio_keys = m
        .keys()
        .filter(|k| k.contains("ratio") || TARGETS.iter().any(|(name, _, _)| name == k));
    for k in ratio_keys {
        let v = m[k];
        let range = s
            .range(k)
            .map_or_else(String::new, |(lo, hi)| format!("{lo:.3}–{hi:.3}"));
        let (target, verdict) = match TARGETS.iter().find(|(name, _, _)| name == k) {
            Some((_, upper, bound)) => {
                let ok = if *upper { v <= *bound } else { v >= *bound };
                let sign = if *upper { "≤" } else { "≥" };
                (
                    format!("{sign} {bound}"),
                    if ok { "met" } else { "MISSED" }.to_owned(),
                )
            }
            None => (String::new(), String::new()),
        };
        println!("{k:<52} {v:>9.3} {range:>19} {target:>9}  {verdict}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).map(|x| x * 1000).rev().collect();
        let l = Lat::of(&mut v);
        assert!((l.p50_us - 50.0).abs() < 1e-9 && (l.p99_us - 99.0).abs() < 1e-9);
        assert_eq!(Lat::of(&mut []).samples, 0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        let mut s = Samples::default();
        for v in [3.0, 1.0, 2.0] {
            s.push("a", v);
        }
        for v in [4.0, 1.0] {
            s.push("b", v);
        }
        assert_eq!(s.median("a"), Some(2.0));
        assert_eq!(s.median("b"), Some(2.5));
        assert_eq!(s.range("a"), Some((1.0, 3.0)));
    }

    #[test]
    fn an_ideal_balancer_scores_near_one() {
        let uniform = ideal_max_share(100_000, &[1], LB_EJECTED, 1);
        let weighted = ideal_max_share(100_000, &[1, 2, 3, 4], LB_EJECTED, 1);
        assert!((1.0..1.5).contains(&uniform), "{uniform}");
        assert!((1.0..1.8).contains(&weighted), "{weighted}");
        // With few endpoints and many draws, chance nearly vanishes.
        let few = ideal_max_share(10_000_000, &[1], 0..990, 2);
        assert!((1.0..1.01).contains(&few), "{few}");
    }

    #[test]
    fn kube_proxy_rules_have_the_measured_service_in_the_middle() {
        let eps = vec![v4(10, 1, 0, 4, 8080), v4(10, 1, 0, 5, 8080)];
        let r = kube_proxy_rules(10, &[("bench/echo:tcp", IPT_VIP, eps)]);
        let services: Vec<&str> = r
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d"))
            .collect();
        assert_eq!(services.len(), 10);
        assert!(services[4].contains("-d 10.97.0.10/32"), "{}", services[4]);
        assert!(r.contains("--probability 0.5000000000 -j KUBE-SEP-"));
        assert!(r.contains("-j DNAT --to-destination 10.1.0.5:8080"));
        assert_eq!(r.matches("-j DNAT").count(), 20);
    }
}
