//! The telemetry benchmark (`cargo xtask bench telemetry`): what turning the mesh's telemetry on
//! costs the traffic it observes, and what one scrape of a big agent costs.
//!
//! - **Data path**: connection churn (a new TCP connection per request, one 64-byte round trip,
//!   the server closes first) from a client pod through a service VIP of the real agent's kernel
//!   programs, with the agent's telemetry on (metrics on :15020 scraped every second, the JSON
//!   access log on stdout, OTLP logs to a real `rotel-agent` collector) against off (metrics
//!   not scraped, no access log, no OTLP export). One agent runs the whole part; its telemetry is
//!   switched live by the static file's `telemetry:` section (`mesh_agent::telemetry::switch`,
//!   as an Istio user flips a `Telemetry` resource), not by restarting it. Each round
//!   interleaves `slices` short slices per side (`seconds` split among them; 4 × 2 s by
//!   default), each after the switch and a 1 s warm-up that is not counted (≥ the OTLP
//!   batch time, so an "on" slice's last export is not charged to the next "off" one), the
//!   first side alternating every slice and every round (on off, off on, …, as the CRR bench's
//!   `crr_interleaved`); connections and seconds are summed per side, the round's ratio is
//!   on ÷ off connections per second, and the reported ratio is the median over rounds. Slow
//!   drifts of a shared VM then land on both sides alike (session 19's sequential blocks, an
//!   agent restart and warm-up each, swung 0.889–1.055 per round). Each round checks that
//!   "on" really was on and "off" off: `istio_tcp_connections_opened_total` grew by every
//!   connection, and the OTLP records exported and the connection lines on stdout match the
//!   "on" slices' connections (not the "off" ones'). CPU µs per connection, agent (on, off)
//!   and collector, is summed over the same slices.
//! - **Gateway**: HTTP/1.1 keep-alive (wrk) through `mesh-agent gateway` in front of one nginx
//!   backend, one gateway process with its telemetry on (metrics scraped every second, access
//!   log, OTLP traces at the default 1 % sampling) and one with it off, alternating per round.
//! - **Scrape**: an agent whose model has 10,000 services × 10 endpoints (file source, 100,000
//!   backends), after one real connection to every service (so every per-connection
//!   `istio_tcp_*` series exists): the time of one `GET /metrics` (median of several, first and
//!   slowest reported too), the body's size and its number of series.

#![expect(
    clippy::cast_precision_loss,
    reason = "connection, request and byte counts shown as f64 are far below 2^52"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::agent::{AgentProcess, write_atomically};
use crate::bench_gateway::Proc;
use crate::gateway::{GatewayProcess, http_route_yaml, services_yaml};
use crate::prom::{METRICS_PORT, http_get, samples};
use crate::samples::Samples;
use crate::{Cluster, NodeHandle, PodChild, PodHandle};

/// The churned service (kernel socket LB over two backend pods' one-shot port).
const CHURN_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 8081);
/// The backends' one-shot port: one 64-byte echo, then the server closes first (no
/// `TIME_WAIT` on the client's ports).
const ONESHOT_PORT: u16 = 8081;
/// Request and response size of a churn connection.
const MSG: usize = 64;
/// The OTLP collector: in the node for the agent, on host loopback for the gateway (ports of
/// its own, so a test's collector on 4317 elsewhere does not collide).
const NODE_COLLECTOR: &str = "127.0.0.1:4317";
const HOST_COLLECTOR: (&str, &str) = ("127.0.0.1:14317", "127.0.0.1:14318");
/// The gateway's backend (nginx) and the two gateways' listeners and the "on" one's metrics.
const WEB_IP: &str = "127.0.21.2";
const WEB_PORT: u16 = 9081;
const GATEWAY_ON_PORT: u16 = 18_410;
const GATEWAY_OFF_PORT: u16 = 18_420;
const GATEWAY_METRICS: &str = "127.0.0.1:18496";
/// Endpoint addresses of the scrape model: `10.200.0.0/15`, all local to one backend pod.
const SCRAPE_NET: &str = "10.200.0.0/15";
const SCRAPE_PORT: u16 = 8080;
const SCRAPE_ENDPOINTS: usize = 10;
/// Scrapes timed on the big agent.
const SCRAPES: usize = 7;
/// Pod-name suffix alphabet of Kubernetes (no vowels, no confusable digits).
const K8S_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// What a run measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    /// Measured seconds of one churn or wrk run (after `warmup`, not counted).
    pub seconds: u32,
    pub warmup: Duration,
    /// Data path: on/off slices per side and round (`seconds` split among them), and the
    /// churn before each slice's measured time (after the switch).
    pub slices: u32,
    pub slice_warmup: Duration,
    /// Services of the scrape model.
    pub services: usize,
    pub wrk_connections: u32,
    pub wrk_threads: u32,
}

impl Plan {
    #[must_use]
    pub const fn new(quick: bool) -> Self {
        Self {
            rounds: if quick { 1 } else { 5 },
            seconds: if quick { 2 } else { 8 },
            warmup: Duration::from_secs(1),
            slices: if quick { 2 } else { 4 },
            // At least the OTLP exporter's batch time (1 s): an "on" slice's last batch is sent
            // (and received) before the next "off" slice is measured, not charged to it.
            slice_warmup: Duration::from_secs(1),
            services: if quick { 1_000 } else { 10_000 },
            wrk_connections: 50,
            wrk_threads: 2,
        }
    }
}

/// Which parts run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Datapath,
    Gateway,
    Scrape,
}

impl Part {
    pub const ALL: [Self; 3] = [Self::Datapath, Self::Gateway, Self::Scrape];

    /// Parses `datapath`, `gateway` or `scrape`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "datapath" => Self::Datapath,
            "gateway" => Self::Gateway,
            "scrape" => Self::Scrape,
            other => bail!("unknown part {other:?} (datapath, gateway or scrape)"),
        })
    }
}

/// The keys with goals in issue 11: (key, is an upper bound, bound).
pub const GOALS: [(&str, bool, f64); 3] = [
    ("throughput_ratio_telemetry_on_vs_off_datapath", false, 0.95),
    ("throughput_ratio_telemetry_on_vs_off_gateway", false, 0.95),
    ("scrape_ms_10k_services", true, 250.0),
];

/// Runs the chosen parts: the flat metrics (medians and single values) and the per-round samples.
pub fn run(plan: &Plan, parts: &[Part]) -> Result<(BTreeMap<String, f64>, Samples)> {
    let mut m = BTreeMap::new();
    let mut s = Samples::default();
    if parts.contains(&Part::Datapath) {
        datapath(plan, &mut s, &mut m)?;
    }
    if parts.contains(&Part::Gateway) {
        gateway(plan, &mut s, &mut m)?;
    }
    if parts.contains(&Part::Scrape) {
        scrape(plan, &mut m)?;
    }
    m.extend(s.medians());
    m.insert("rounds".into(), plan.rounds as f64);
    m.insert("seconds_per_run".into(), f64::from(plan.seconds));
    for (key, upper, bound) in GOALS {
        if let Some(v) = m.get(key).copied() {
            let met = if upper { v < bound } else { v >= bound };
            m.insert(format!("{key}_goal_met"), f64::from(u8::from(met)));
        }
    }
    Ok((m, s))
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

/// `rotel-agent`, shipped inside the `rotel` Python package (`cargo xtask install-deps`); the
/// telemetry tests start the same collector.
pub fn rotel_agent() -> Result<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .context("running python3 (to find rotel-agent)")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        out.status.success() && Path::new(&path).is_file(),
        "rotel-agent not found: python3 -m pip install rotel (cargo xtask install-deps)"
    );
    Ok(path)
}

/// `rotel-agent start` (`cmd`, made for the network namespace it runs in) on (gRPC, HTTP)
/// loopback ports, discarding what it receives.
fn collector_command(mut cmd: Command, grpc: &str, http: &str) -> Command {
    cmd.args(["start", "--otlp-grpc-endpoint", grpc])
        .args(["--otlp-http-endpoint", http])
        .args(["--exporter", "blackhole"]);
    cmd
}

/// A Prometheus-like scraper: `GET /metrics` every second until stopped, run by `get` (in a
/// node's namespace or on the host); counts the scrapes that answered 200.
struct Scraper {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Scraper {
    fn start(get: impl Fn() -> bool + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (st, k) = (Arc::clone(&stop), Arc::clone(&ok));
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                if get() {
                    k.fetch_add(1, Ordering::Relaxed);
                }
                next += Duration::from_secs(1);
                while !st.load(Ordering::Relaxed) && Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self { stop, ok, thread }
    }

    /// Stops; the number of successful scrapes.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.ok.load(Ordering::Relaxed)
    }
}

/// Value of the one unlabelled (or first matching) sample `series` in a scrape.
fn metric(text: &str, family: &str, want: &[(&str, &str)]) -> f64 {
    crate::prom::sum(text, family, want)
}

// ---------------------------------------------------------------------------------------------
// Data path: connection churn through the kernel with the agent's telemetry on vs off

/// Connect, one 64-byte round trip, the server's close, then ours; repeated for `warmup`
/// (dropped) and then `time`: (connections in `time`, seconds measured).
fn churn(vip: SocketAddr, warmup: Duration, time: Duration) -> Result<(u64, f64), String> {
    let req = [0xa5_u8; MSG];
    let mut resp = [0u8; MSG];
    let one = |resp: &mut [u8; MSG]| -> Result<(), String> {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))
            .map_err(|e| format!("connect {vip}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        s.write_all(&req).map_err(|e| format!("write: {e}"))?;
        s.read_exact(resp).map_err(|e| format!("read: {e}"))?;
        // Wait for the server's FIN so the client never closes first.
        match s.read(&mut [0u8; 1]) {
            Ok(0) => Ok(()),
            Ok(_) => Err("data after the echo".to_owned()),
            Err(e) => Err(format!("waiting for EOF: {e}")),
        }
    };
    let start = Instant::now();
    while start.elapsed() < warmup {
        one(&mut resp)?;
    }
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        one(&mut resp)?;
        n += 1;
    }
    Ok((n, start.elapsed().as_secs_f64()))
}

fn churn_model(client: &PodHandle, backends: &[PodHandle]) -> String {
    let mut y = format!(
        "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports: [{{ name: tcp, port: {ONESHOT_PORT} }}]\n    endpoints:\n",
        CHURN_VIP.ip()
    );
    for b in backends {
        let _ = writeln!(
            y,
            "      - {{ ip: {}, node: a, pod: {} }}",
            b.ipv4(),
            b.name()
        );
    }
    y.push_str("pods:\n");
    for p in std::iter::once(client).chain(backends) {
        let _ = writeln!(
            y,
            "  - {{ name: {0}, node: a, serviceAccount: {0}, ips: [{1}] }}",
            p.name(),
            p.ipv4()
        );
    }
    y
}

/// The file's `telemetry:` section for a slice (the agent's live switch).
fn telemetry_section(on: bool) -> String {
    format!("telemetry: {{ accessLog: {on}, otlpLogs: {on} }}\n")
}

/// The agent's counters that prove "on" really exported, read from one scrape.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    opened: f64,
    otlp_exported: f64,
    otlp_dropped: f64,
}

impl Counters {
    fn read(node: &NodeHandle) -> Result<Self> {
        let addr = format!("{}:{METRICS_PORT}", node.ipv4());
        let (code, text) = node
            .run(move || http_get(&addr, "/metrics", "*/*"))?
            .map_err(|e| anyhow::anyhow!("scraping the agent: {e}"))?;
        ensure!(code == 200, "scrape answered {code}");
        Ok(Self {
            opened: metric(&text, "istio_tcp_connections_opened_total", &[]),
            otlp_exported: metric(&text, "mesh_otlp_exported_total", &[("signal", "logs")]),
            otlp_dropped: metric(&text, "mesh_otlp_dropped_total", &[("signal", "logs")]),
        })
    }
}

/// What one side (on or off) summed over a round's slices.
#[derive(Clone, Copy, Debug, Default)]
struct Side {
    /// Measured connections and seconds (slice warm-ups excluded).
    conns: u64,
    secs: f64,
    /// Connections made including the warm-ups (their rate taken as the slice's measured one),
    /// and the agent's and the collector's CPU µs over the same time.
    made: f64,
    agent_cpu_us: f64,
    collector_cpu_us: f64,
    scrapes: u64,
}

impl Side {
    fn per_s(&self) -> f64 {
        self.conns as f64 / self.secs
    }
}

/// The running agent of the data-path part and how to switch its telemetry.
struct Switched<'a> {
    node: &'a NodeHandle,
    agent: AgentProcess,
    config: &'a Path,
    model: String,
    /// "telemetry switched" lines the agent logged so far, and the setting in force.
    switches: usize,
    on: bool,
    access_lines: u64,
}

impl Switched<'_> {
    /// Rewrites the file with `on`'s section and waits until the agent applied it (its log);
    /// nothing to do when it is in force already (the agent logs changes only).
    fn switch(&mut self, on: bool) -> Result<()> {
        if on == self.on {
            return Ok(());
        }
        self.on = on;
        write_atomically(
            self.config,
            &format!("{}{}", self.model, telemetry_section(on)),
        )?;
        let start = Instant::now();
        loop {
            let n = self.agent.stderr().matches("telemetry switched").count();
            if n > self.switches {
                self.switches = n;
                return Ok(());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "the agent did not switch telemetry {}: {}",
                if on { "on" } else { "off" },
                self.agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the connection lines the agent wrote so far (waiting up to `wait` for more), so
    /// its stdout never backs up.
    fn drain(&mut self, wait: Duration) {
        while self.agent.stdout_line(wait).is_ok() {
            self.access_lines += 1;
        }
    }
}

/// One slice: telemetry switched to `on` (scraped every second while on), `warmup` of churn
/// not counted, then `time` measured; added to `side`.
fn churn_slice(
    sw: &mut Switched<'_>,
    client: &PodHandle,
    collector_pid: u32,
    on: bool,
    (warmup, time): (Duration, Duration),
    side: &mut Side,
) -> Result<()> {
    sw.switch(on)?;
    let scraper = on.then(|| {
        let node = sw.node.clone();
        let addr = format!("{}:{METRICS_PORT}", node.ipv4());
        Scraper::start(move || {
            let addr = addr.clone();
            node.run(move || http_get(&addr, "/metrics", "*/*").is_ok_and(|(c, _)| c == 200))
                .unwrap_or(false)
        })
    });
    let agent_pid = sw.agent.pid().context("the agent has no pid")?;
    let cpu = || -> Result<(f64, f64)> {
        Ok((
            crate::bench_mtls::cpu_us(agent_pid)?,
            crate::bench_mtls::cpu_us(collector_pid)?,
        ))
    };
    let before = cpu()?;
    let r: Result<(u64, f64), String> = client
        .run_timeout(time + warmup + Duration::from_mins(1), move || {
            churn(CHURN_VIP, warmup, time)
        })?;
    let after = cpu()?;
    let (n, secs) = r.map_err(|e| anyhow::anyhow!("churn from {}: {e}", client.name()))?;
    side.scrapes += scraper.map_or(0, Scraper::finish);
    side.conns += n;
    side.secs += secs;
    side.made += n as f64 * (secs + warmup.as_secs_f64()) / secs;
    side.agent_cpu_us += after.0 - before.0;
    side.collector_cpu_us += after.1 - before.1;
    // Between slices, not while measuring.
    sw.drain(Duration::ZERO);
    Ok(())
}

/// Checks that a round's "on" slices really had telemetry on (and "off" ones off), and keeps
/// its samples.
fn record_round(
    s: &mut Samples,
    sides: &[Side; 2],
    delta: &Counters,
    access_lines: u64,
) -> Result<()> {
    let [off, on] = sides;
    for (side, name) in [(off, "off"), (on, "on")] {
        s.push(format!("datapath_conn_per_s_{name}"), side.per_s());
        s.push(
            format!("datapath_agent_cpu_us_per_conn_{name}"),
            side.agent_cpu_us / side.made,
        );
    }
    // Counted exactly (warm-ups come on top): the lower bounds.
    let measured = (off.conns + on.conns) as f64;
    // The metrics count every flow whatever the switch says: nothing was missed.
    ensure!(
        delta.opened >= measured,
        "istio_tcp_connections_opened_total grew by {} < {measured} connections measured",
        delta.opened
    );
    // The export followed the switch: the "on" slices' connections, not the "off" ones' (the
    // few a switch catches between the ring and the observer aside).
    let sent = delta.otlp_exported + delta.otlp_dropped;
    let on_measured = on.conns as f64;
    ensure!(
        sent >= on_measured * 0.98 && sent <= on.made * 1.05 + 500.0,
        "telemetry on for {:.0} connections (off for {:.0}), yet {sent} OTLP log records",
        on.made,
        off.made
    );
    ensure!(
        delta.otlp_exported > 0.0,
        "telemetry on, yet the collector accepted no OTLP log record"
    );
    ensure!(
        access_lines as f64 >= on_measured * 0.98 && access_lines as f64 <= on.made * 1.05 + 500.0,
        "telemetry on for {:.0} connections, yet {access_lines} connection lines",
        on.made
    );
    s.push(
        "datapath_collector_cpu_us_per_conn_on",
        on.collector_cpu_us / on.made,
    );
    // Both sides' connections (the metrics count every flow).
    s.push("datapath_round_istio_tcp_opened", delta.opened);
    s.push("datapath_on_otlp_logs_exported", delta.otlp_exported);
    s.push("datapath_on_otlp_logs_dropped", delta.otlp_dropped);
    s.push("datapath_on_access_lines", access_lines as f64);
    s.push("datapath_on_scrapes", on.scrapes as f64);
    Ok(())
}

/// One round: `plan.slices` slices per side, interleaved; checks and records it.
fn churn_round(
    sw: &mut Switched<'_>,
    client: &PodHandle,
    collector: &mut PodChild,
    plan: &Plan,
    round: usize,
    s: &mut Samples,
) -> Result<()> {
    let slices = plan.slices.max(1);
    let slice_time = Duration::from_secs(plan.seconds.into()) / slices;
    let mut sides = [Side::default(); 2];
    let before = Counters::read(sw.node)?;
    let lines_before = sw.access_lines;
    for slice in 0..slices as usize {
        // The first side alternates every slice and every round (on off, off on, …).
        let first_on = (round + slice).is_multiple_of(2);
        for on in [first_on, !first_on] {
            churn_slice(
                sw,
                client,
                collector.pid(),
                on,
                (plan.slice_warmup, slice_time),
                &mut sides[usize::from(on)],
            )?;
            if let Ok(Some(status)) = collector.try_status() {
                bail!("rotel-agent exited ({status}): {}", collector.stderr_text());
            }
        }
    }
    // What the agent read from the ring and batched for OTLP in the last second, and the
    // last connection lines.
    std::thread::sleep(Duration::from_millis(1500));
    sw.drain(Duration::from_millis(200));
    let after = Counters::read(sw.node)?;
    let delta = Counters {
        opened: after.opened - before.opened,
        otlp_exported: after.otlp_exported - before.otlp_exported,
        otlp_dropped: after.otlp_dropped - before.otlp_dropped,
    };
    record_round(s, &sides, &delta, sw.access_lines - lines_before)?;
    let [off, on] = sides;
    let ratio = on.per_s() / off.per_s();
    s.push("throughput_ratio_telemetry_on_vs_off_datapath", ratio);
    // What "on" costs in CPU per connection: the agent's extra and the collector's.
    let cpu =
        on.agent_cpu_us / on.made - off.agent_cpu_us / off.made + on.collector_cpu_us / on.made;
    s.push("datapath_telemetry_cpu_us_per_conn", cpu);
    println!(
        "round {}/{}: on {:.0} conn/s, off {:.0} conn/s, ratio {ratio:.3}; agent CPU µs/conn on {:.2} off {:.2}, collector {:.2}",
        round + 1,
        plan.rounds,
        on.per_s(),
        off.per_s(),
        on.agent_cpu_us / on.made,
        off.agent_cpu_us / off.made,
        on.collector_cpu_us / on.made
    );
    Ok(())
}

fn datapath(plan: &Plan, s: &mut Samples, m: &mut BTreeMap<String, f64>) -> Result<()> {
    let exe = std::env::current_exe().context("finding the mesh-bench executable")?;
    ensure!(
        exe.file_name().is_some_and(|n| n == "mesh-bench"),
        "the data-path part runs `mesh-bench serve` in the backends: run it from mesh-bench"
    );
    let rotel = rotel_agent()?;
    let slices = plan.slices.max(1);
    let slice_time = Duration::from_secs(plan.seconds.into()) / slices;
    println!(
        "\n== data path: connection churn through {CHURN_VIP}, agent telemetry on vs off ({} rounds × {} s per side in {slices} interleaved slices of {:.1} s + {:.1} s warm-up)",
        plan.rounds,
        plan.seconds,
        slice_time.as_secs_f64(),
        plan.slice_warmup.as_secs_f64()
    );
    let cluster = Cluster::new("bench-telemetry")?;
    let node = cluster.add_node("a")?;
    let client = cluster.add_pod(&node, "client")?;
    let backends = vec![
        cluster.add_pod(&node, "web-0")?,
        cluster.add_pod(&node, "web-1")?,
    ];
    for sb in std::iter::once(&client).chain(&backends) {
        sb.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        sb.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    let mut servers: Vec<PodChild> = Vec::new();
    for b in &backends {
        let mut cmd = b.command(&exe);
        cmd.args(["serve", "--oneshot"])
            .arg(SocketAddr::new(b.ipv4().into(), ONESHOT_PORT).to_string());
        let mut child = b.spawn(cmd)?;
        child.wait_ready(Duration::from_secs(10))?;
        servers.push(child);
    }
    let mut collector = node.spawn(collector_command(
        node.command(&rotel),
        NODE_COLLECTOR,
        "127.0.0.1:4318",
    ))?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let config = work.join("mesh.yaml");
    let model = churn_model(&client, &backends);
    write_atomically(&config, &format!("{model}{}", telemetry_section(false)))?;
    let pins = cluster.bpffs_dir()?.join("a");
    // One agent for the whole part, started with everything "on" can need (metrics endpoint,
    // connection log, OTLP collector); the file's section switches the log and the export
    // live, and "off" slices are not scraped.
    let mut agent = AgentProcess::new(node.clone(), config.clone(), pins, work.join("admin.sock"));
    "warn,mesh_agent::telemetry::switch=info".clone_into(&mut agent.log_filter);
    let env = |k: &str, v: String| (k.to_owned(), v);
    agent.env = vec![
        env("MESH_METRICS_ADDR", format!("0.0.0.0:{METRICS_PORT}")),
        env("MESH_ACCESS_LOG", "true".into()),
        env("MESH_OTLP_ENDPOINT", format!("http://{NODE_COLLECTOR}")),
    ];
    agent.start()?;
    let mut sw = Switched {
        node: &node,
        agent,
        config: &config,
        model,
        switches: 0,
        on: false,
        access_lines: 0,
    };
    // The start's own switch (the flags' "on" → the file's "off") is in the log, or comes.
    let start = Instant::now();
    while sw.agent.stderr().matches("telemetry switched").count() == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the agent did not apply the file's telemetry section: {}",
            sw.agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sw.switches = 1;

    for round in 0..plan.rounds {
        churn_round(&mut sw, &client, &mut collector, plan, round, s)?;
    }
    sw.agent.terminate(Duration::from_secs(10))?;
    drop(servers);
    collector.kill();
    let _ = std::fs::remove_dir_all(&work);
    m.insert("datapath_churn_seconds".into(), f64::from(plan.seconds));
    m.insert("datapath_slices".into(), f64::from(slices));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Gateway: HTTP/1.1 keep-alive through `mesh-agent gateway`, telemetry on vs off

/// One wrk result: (requests per second, p99 in µs, non-2xx + socket errors).
fn wrk(url: &str, plan: &Plan, seconds: u32) -> Result<(f64, f64, u64)> {
    let r = crate::bench_gateway::run_wrk(url, plan.wrk_threads, plan.wrk_connections, seconds)?;
    Ok((r.rps, r.p99_us, r.errors))
}

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {d}/body;
  server {{
    listen {WEB_IP}:{WEB_PORT} backlog=4096;
    location / {{ return 200 \"hello from the backend\\n\"; }}
  }}
}}
"
    )
}

/// CPU time of a process and its descendants (nginx's master and its worker), in µs.
fn tree_cpu_us(pid: u32) -> Result<f64> {
    let mut total = crate::bench_mtls::cpu_us(pid)?;
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            total += tree_cpu_us(c).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// CPU time (user + system) of this process's children that were waited for, in µs.
fn children_cpu_us() -> f64 {
    // SAFETY: `getrusage` writes into the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut ru);
        ru
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Polls `url` with curl until it answers 200 (30 s).
fn wait_200(url: &str, alive: &mut dyn FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        alive()?;
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ])
            .arg(url)
            .output()
            .context("running curl")?;
        if out.stdout == b"200" {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{url} never answered 200");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one measured sequence (start, warm up, alternate, check) reads best top to bottom"
)]
fn gateway(plan: &Plan, s: &mut Samples, m: &mut BTreeMap<String, f64>) -> Result<()> {
    println!(
        "\n== gateway: HTTP/1.1 keep-alive (wrk -t{} -c{}) through mesh-agent gateway, telemetry on vs off ({} rounds × {} s)",
        plan.wrk_threads, plan.wrk_connections, plan.rounds, plan.seconds
    );
    let rotel = rotel_agent()?;
    let dir = std::env::temp_dir().join(format!("mesh-bench-telemetry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir))?;
    let nginx_log = dir.join("nginx.log");
    let mut nginx = Proc::spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]),
        &nginx_log,
    )?;
    let rotel_log = dir.join("rotel.log");
    let mut collector = Proc::spawn(
        "rotel-agent",
        &mut collector_command(Command::new(&rotel), HOST_COLLECTOR.0, HOST_COLLECTOR.1),
        &rotel_log,
    )?;
    let services = services_yaml(&[("web", 80, &[WEB_IP], WEB_PORT, "")]);
    let on_dir = dir.join("on");
    let off_dir = dir.join("off");
    std::fs::create_dir_all(&on_dir)?;
    std::fs::create_dir_all(&off_dir)?;
    let otlp = format!("http://{}", HOST_COLLECTOR.0);
    let metrics_addr = GATEWAY_METRICS.to_owned();
    let mut on = GatewayProcess::start(
        &on_dir,
        &http_route_yaml(GATEWAY_ON_PORT, "web", ""),
        &services,
        &[
            "--metrics-addr",
            &metrics_addr,
            "--access-log",
            "true",
            "--otlp-endpoint",
            &otlp,
            "--pod-name",
            "mesh-gateway-7d9f8b6c4-x2x9z",
        ],
    )?;
    let mut off = GatewayProcess::start(
        &off_dir,
        &http_route_yaml(GATEWAY_OFF_PORT, "web", ""),
        &services,
        &["--metrics-addr", "none", "--access-log", "false"],
    )?;
    let pids = [off.child.id(), on.child.id()];
    let others = [collector.child.id(), nginx.child.id()];
    let urls = [
        format!("http://127.0.0.1:{GATEWAY_OFF_PORT}/"),
        format!("http://127.0.0.1:{GATEWAY_ON_PORT}/"),
    ];
    let mut alive = || -> Result<()> {
        nginx.check_alive(&nginx_log)?;
        collector.check_alive(&rotel_log)?;
        for g in [&mut on, &mut off] {
            if let Some(status) = g.child.try_wait()? {
                bail!("a gateway exited ({status}): {}", g.log_text());
            }
        }
        Ok(())
    };
    for url in &urls {
        wait_200(url, &mut alive)?;
        wrk(url, plan, 1)?;
    }
    for round in 0..plan.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let mut rps = [0.0; 2];
        for is_on in order {
            let scraper = is_on.then(|| {
                let addr = metrics_addr.clone();
                Scraper::start(move || {
                    http_get(&addr, "/metrics", "*/*").is_ok_and(|(c, _)| c == 200)
                })
            });
            let pid = pids[usize::from(is_on)];
            // The gateway's, the collector's, nginx's and wrk's CPU (wrk: this process's
            // waited-for children, of which wrk is the only one during the run).
            let cpu_before = crate::bench_mtls::cpu_us(pid)?;
            let others_before = [
                tree_cpu_us(others[0])?,
                tree_cpu_us(others[1])?,
                children_cpu_us(),
            ];
            let (r, p99, errors) = wrk(&urls[usize::from(is_on)], plan, plan.seconds)?;
            let cpu = crate::bench_mtls::cpu_us(pid)? - cpu_before;
            let others_after = [
                tree_cpu_us(others[0])?,
                tree_cpu_us(others[1])?,
                children_cpu_us(),
            ];
            let scrape_count = scraper.map_or(0, Scraper::finish);
            let name = if is_on { "on" } else { "off" };
            let requests = r * f64::from(plan.seconds);
            // The gateway's own CPU per request (its flush thread included): less noisy than
            // the throughput on a shared machine.
            s.push(format!("gateway_cpu_us_per_req_{name}"), cpu / requests);
            for (i, who) in ["collector", "nginx", "wrk"].into_iter().enumerate() {
                s.push(
                    format!("gateway_{who}_cpu_us_per_req_{name}"),
                    (others_after[i] - others_before[i]) / requests,
                );
            }
            rps[usize::from(is_on)] = r;
            s.push(format!("gateway_rps_{name}"), r);
            s.push(format!("gateway_p99_us_{name}"), p99);
            s.push(format!("gateway_errors_{name}"), errors as f64);
            if is_on {
                s.push("gateway_on_scrapes", scrape_count as f64);
            }
        }
        alive()?;
        let ratio = rps[1] / rps[0];
        s.push("throughput_ratio_telemetry_on_vs_off_gateway", ratio);
        println!(
            "round {}/{}: on {:.0} req/s, off {:.0} req/s, ratio {ratio:.3}",
            round + 1,
            plan.rounds,
            rps[1],
            rps[0]
        );
    }
    // Telemetry was really on: the requests are in the "on" gateway's metrics, its access log
    // has lines, and the collector accepted spans.
    let (code, text) = http_get(&metrics_addr, "/metrics", "*/*")
        .map_err(|e| anyhow::anyhow!("scraping the gateway: {e}"))?;
    ensure!(code == 200, "gateway scrape answered {code}");
    let requests = metric(&text, "istio_requests_total", &[]);
    ensure!(requests > 0.0, "telemetry on, yet no istio_requests_total");
    m.insert("gateway_on_istio_requests_total".into(), requests);
    m.insert(
        "gateway_on_otlp_spans_exported".into(),
        metric(&text, "mesh_otlp_exported_total", &[("signal", "traces")]),
    );
    let access_lines = on
        .log_text()
        .lines()
        .filter(|l| l.contains("mesh_access"))
        .count();
    m.insert("gateway_on_access_lines".into(), access_lines as f64);
    ensure!(access_lines > 0, "telemetry on, yet no access line");
    drop((on, off, collector, nginx));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scrape of an agent with 10,000 services × 10 endpoints

/// A pod name `NAME-<10 chars>-<5 chars>` in Kubernetes' alphabet (the Deployment pattern, so
/// the workload label is `NAME`).
fn pod_name(name: &str, i: usize) -> String {
    let pick = |mut v: usize, n: usize| {
        let mut out = String::with_capacity(n);
        for _ in 0..n {
            out.push(char::from(K8S_ALPHABET[v % K8S_ALPHABET.len()]));
            v /= K8S_ALPHABET.len();
        }
        out
    };
    format!(
        "{name}-{}-{}",
        pick(i.wrapping_mul(7919) + 12_345, 10),
        pick(i, 5)
    )
}

/// Endpoint `e` of service `s`: `10.200.0.1` counted up (inside `10.200.0.0/15`).
fn scrape_endpoint(s: usize, e: usize) -> Ipv4Addr {
    let i = u32::try_from(s * SCRAPE_ENDPOINTS + e + 1).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i)
}

fn scrape_vip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        96,
        u8::try_from(s / 250).unwrap_or(u8::MAX),
        u8::try_from(s % 250 + 1).unwrap_or(0),
    )
}

fn scrape_model(services: usize, client: &PodHandle) -> String {
    let mut y = String::from("node: a\nservices:\n");
    for s in 0..services {
        let _ = write!(
            y,
            "  - name: svc-{s}\n    clusterIPs: [{}]\n    ports: [{{ name: tcp, port: 80, targetPort: {SCRAPE_PORT} }}]\n    endpoints:\n",
            scrape_vip(s)
        );
        for e in 0..SCRAPE_ENDPOINTS {
            let _ = writeln!(
                y,
                "      - {{ ip: {}, pod: {} }}",
                scrape_endpoint(s, e),
                pod_name(&format!("svc-{s}"), e)
            );
        }
    }
    let _ = writeln!(
        y,
        "pods:\n  - {{ name: {0}, node: a, serviceAccount: {0}, ips: [{1}] }}",
        client.name(),
        client.ipv4()
    );
    y
}

/// One connection to each of the first `services` VIPs (read the banner, close): (ok, failed).
fn connect_each(services: usize) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    for s in 0..services {
        let addr = SocketAddr::new(scrape_vip(s).into(), 80);
        let r = (|| -> std::io::Result<()> {
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 64];
            let n = c.read(&mut b)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            Ok(())
        })();
        if r.is_ok() {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    (ok, failed)
}

fn ip(netns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip -n {netns} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Time of one full `GET /metrics` (connect to the last byte), in ms, and the body.
fn timed_scrape(node: &NodeHandle) -> Result<(f64, String)> {
    let addr = format!("{}:{METRICS_PORT}", node.ipv4());
    let (ms, r) = node.run(move || {
        let t = Instant::now();
        let r = http_get(&addr, "/metrics", "text/plain");
        (t.elapsed().as_secs_f64() * 1000.0, r)
    })?;
    let (code, body) = r.map_err(|e| anyhow::anyhow!("scraping the agent: {e}"))?;
    ensure!(code == 200, "scrape answered {code}: {body}");
    Ok((ms, body))
}

#[expect(
    clippy::too_many_lines,
    reason = "one measured sequence (model, traffic, scrapes, checks) reads best top to bottom"
)]
fn scrape(plan: &Plan, m: &mut BTreeMap<String, f64>) -> Result<()> {
    let n = plan.services;
    println!(
        "\n== scrape: one GET /metrics of an agent with {n} services × {SCRAPE_ENDPOINTS} endpoints, after one connection to every service"
    );
    let cluster = Cluster::new("bench-telemetry-scrape")?;
    let node = cluster.add_node("a")?;
    let client = cluster.add_pod(&node, "client")?;
    let web = cluster.add_pod(&node, "web")?;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    // Every endpoint address is local to the one `web` pod (one listener behind 100,000
    // endpoints), routed to it by the node through its own address.
    ip(
        web.netns(),
        &["route", "replace", "local", SCRAPE_NET, "dev", "lo"],
    )?;
    ip(
        node.netns(),
        &[
            "route",
            "replace",
            SCRAPE_NET,
            "via",
            &web.ipv4().to_string(),
            "dev",
            web.host_ifname(),
        ],
    )?;
    let _server = web.serve(
        "web",
        &[SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), SCRAPE_PORT)],
        &[],
    )?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let config = work.join("mesh.yaml");
    write_atomically(&config, &scrape_model(n, &client))?;
    let mut agent = AgentProcess::new(
        node.clone(),
        config,
        cluster.bpffs_dir()?.join("a"),
        work.join("admin.sock"),
    );
    "warn".clone_into(&mut agent.log_filter);
    agent.ready_timeout = Duration::from_mins(3);
    agent.env.push((
        "MESH_METRICS_ADDR".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
    ));
    let t = Instant::now();
    agent.start()?;
    m.insert("scrape_agent_ready_s".into(), t.elapsed().as_secs_f64());
    let (ok, failed) = client.run_timeout(Duration::from_mins(5), move || connect_each(n))?;
    ensure!(
        failed == 0,
        "{failed} of {n} connections to the services failed"
    );
    // The agent reads the flow ring on a 100 ms timer.
    std::thread::sleep(Duration::from_secs(1));
    // `MESH_BENCH_PERF=FILE`: `perf record -g` of the agent during the timed scrapes (a
    // diagnostic: the numbers of such a run are not results).
    let perf = match (std::env::var_os("MESH_BENCH_PERF"), agent.pid()) {
        (Some(file), Some(pid)) => Some(
            Command::new("perf")
                .args(["record", "-g", "-p", &pid.to_string(), "-o"])
                .arg(file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf record")?,
        ),
        _ => None,
    };
    let mut times = Vec::with_capacity(SCRAPES);
    let mut cpu_ms = Vec::with_capacity(SCRAPES);
    let mut body = String::new();
    for _ in 0..SCRAPES {
        // The agent's CPU time for the scrape (all its threads: the owner thread's map reads
        // and the encoding): on a shared machine steadier than the wall-clock time.
        let before = agent.pid().map(crate::bench_mtls::cpu_us).transpose()?;
        let (ms, b) = timed_scrape(&node)?;
        if let (Some(pid), Some(before)) = (agent.pid(), before) {
            cpu_ms.push((crate::bench_mtls::cpu_us(pid)? - before) / 1000.0);
        }
        times.push(ms);
        body = b;
        std::thread::sleep(Duration::from_millis(200));
    }
    if !cpu_ms.is_empty() {
        cpu_ms.sort_by(f64::total_cmp);
        println!("agent CPU per scrape (ms, sorted): {cpu_ms:.1?}");
        m.insert("scrape_agent_cpu_ms".into(), cpu_ms[cpu_ms.len() / 2]);
    }
    if let Some(mut p) = perf {
        if let Ok(pid) = libc::pid_t::try_from(p.id()) {
            // SAFETY: signalling our own child (perf writes its file on SIGINT).
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        let _ = p.wait();
    }
    let opened = metric(&body, "istio_tcp_connections_opened_total", &[]);
    ensure!(
        opened >= ok as f64,
        "istio_tcp_connections_opened_total = {opened}, expected {ok}"
    );
    let series = samples(&body).len();
    let tcp_series = samples(&body)
        .iter()
        .filter(|(n, _, _)| n == "istio_tcp_connections_opened_total")
        .count();
    let first = times[0];
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    println!(
        "scrapes (ms): {}; body {} KiB, {series} series ({tcp_series} istio_tcp_connections_opened_total)",
        times
            .iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", "),
        body.len() / 1024
    );
    let key = if n == 10_000 {
        "scrape_ms_10k_services".to_owned()
    } else {
        format!("scrape_ms_{n}_services")
    };
    m.insert(key, median);
    m.insert("scrape_ms_first".into(), first);
    m.insert("scrape_ms_max".into(), sorted[sorted.len() - 1]);
    m.insert("scrape_body_bytes".into(), body.len() as f64);
    m.insert("scrape_series".into(), series as f64);
    m.insert("scrape_istio_tcp_series".into(), tcp_series as f64);
    m.insert("scrape_services".into(), n as f64);
    m.insert("scrape_backends".into(), (n * SCRAPE_ENDPOINTS) as f64);
    m.insert("scrape_connections".into(), ok as f64);
    if let Some(pid) = agent.pid() {
        m.insert("scrape_agent_rss_mib".into(), rss_mib(pid));
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Prints the goals table.
pub fn print_report(m: &BTreeMap<String, f64>, s: &Samples) {
    println!("\n== results (median over rounds)");
    for (k, v) in m {
        let range = s
            .range(k)
            .map_or_else(String::new, |(lo, hi)| format!("{lo:.3}–{hi:.3}"));
        println!("  {k:<48} {v:>14.3} {range:>19}");
    }
    println!("\n{:<48} {:>10} {:>10}  verdict", "goal", "value", "bound");
    for (key, upper, bound) in GOALS {
        let Some(v) = m.get(key) else { continue };
        let ok = if upper { *v < bound } else { *v >= bound };
        println!(
            "{key:<48} {v:>10.3} {:>10}  {}",
            format!("{} {bound}", if upper { "<" } else { "≥" }),
            if ok { "met" } else { "NOT MET" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_model_addresses_are_distinct_and_in_the_routed_net() {
        assert_eq!(scrape_endpoint(0, 0), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(scrape_endpoint(9_999, 9), Ipv4Addr::new(10, 201, 134, 160));
        assert_eq!(scrape_vip(9_999), Ipv4Addr::new(10, 96, 39, 250));
        assert_ne!(scrape_vip(249), scrape_vip(250));
        let names: std::collections::BTreeSet<String> = (0..SCRAPE_ENDPOINTS)
            .map(|e| pod_name("svc-1", e))
            .collect();
        assert_eq!(names.len(), SCRAPE_ENDPOINTS);
        assert!(names.iter().all(|n| n.len() == "svc-1".len() + 17));
    }
}
