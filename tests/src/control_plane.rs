//! The control-plane benchmark (`cargo xtask bench control-plane`): the real agent reconciling
//! 10,000 services × 10 endpoints into the kernel — from a static file (time, resident memory,
//! the rate at which endpoint changes reach the kernel, and what the rest of the agent feels while
//! all 10,000 are rewritten: `ListServices` latency over the admin socket and flow events lost
//! under a steady connection load) and from the Kubernetes API stand-in (the same services in
//! `EndpointSlices`, with their 100,000 pods: time from the first list to the kernel, resident
//! memory).

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use mesh_agent::admin::proto::{ListServicesRequest, WatchFlowsRequest};

use serde_json::json;

use crate::{
    Cluster, PodHandle,
    agent::{AgentProcess, write_atomically},
    kmock::Kmock,
};

/// The live service the flow load goes to (outside the generated services' 10.96.0.0/16).
const LIVE_VIP: &str = "10.95.0.1:80";
/// Connections per second of the flow load during the big reconciliation.
pub const FLOW_LOAD_PER_S: u64 = 5_000;

/// One row of results: (metric, value).
pub type Metric = (String, f64);

/// A static model of `services` services with `endpoints` endpoints each; `generation` shifts
/// one endpoint of the first `changed` services (endpoint churn).
#[must_use]
pub fn model(services: usize, endpoints: usize, changed: usize, generation: usize) -> String {
    let mut y = String::from("services:\n");
    for s in 0..services {
        let (hi, lo) = (s / 250, s % 250 + 1);
        let _ = write!(
            y,
            "  - name: svc-{s}\n    clusterIPs: [10.96.{hi}.{lo}]\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints:\n"
        );
        for e in 0..endpoints {
            let shift = if s < changed && e == 0 {
                generation * 16
            } else {
                0
            };
            let _ = writeln!(
                y,
                "      - {{ ip: 10.{}.{}.{} }}",
                100 + s / 250 % 100,
                s % 250,
                e + 1 + shift
            );
        }
    }
    y
}

/// The live service, with one real backend, appended to a generated model.
fn live_service(backend: &PodHandle) -> String {
    format!(
        "  - name: live\n    clusterIPs: [{}]\n    ports: [{{ port: 80 }}]\n    endpoints:\n      - {{ ip: {} }}\n",
        LIVE_VIP.split(':').next().unwrap_or_default(),
        backend.ipv4()
    )
}

/// Reads `took_ms=N` of the `n`-th "reconciled" line the agent logged.
fn reconcile_ms(log: &str, n: usize) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("reconciled"))
        .nth(n)?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("took_ms="))?
        .parse()
        .ok()
}

/// Seconds since midnight (UTC) of the first agent log line containing `what` (the text log
/// format starts each line with an RFC 3339 timestamp).
fn log_time(log: &str, what: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let time = line
        .split_whitespace()
        .next()?
        .split_once('T')?
        .1
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn rss_mb(pid: u32) -> Result<f64> {
    status_mb(pid, "VmRSS")
}

/// A `/proc/<pid>/status` size field (`VmRSS`, `RssAnon`, `RssFile`) in MB.
fn status_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field}"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// CPU time the process has used so far (user + system, every thread), in ms (the kernel counts
/// in clock ticks: 10 ms resolution at the usual 100 Hz).
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (`state`);
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .context("no comm in /proc/PID/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<f64>())
        .sum::<Result<f64, _>>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks * 1000.0 / f64::from(u32::try_from(hz).unwrap_or(100).max(1)))
}

/// The agent's CPU per flow event under the connection load alone (no reconciliation), with a
/// `WatchFlows --follow` watcher of the load's service as `meshctl flows --follow` would be:
/// (µs per event, events).
fn agent_cpu_per_flow(agent: &AgentProcess, client: &PodHandle) -> Result<(f64, f64)> {
    let pid = agent.pid().context("agent pid")?;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let watching = {
        let (socket, stop, seen) = (agent.socket.clone(), Arc::clone(&stop), Arc::clone(&seen));
        std::thread::spawn(move || count_flows(socket, stop, seen))
    };
    std::thread::sleep(Duration::from_millis(300));
    let received_before = agent.meshctl_json(&["status"])?["flows_received_total"]
        .as_u64()
        .unwrap_or(0);
    let cpu_before = cpu_ms(pid)?;
    let loading = {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        std::thread::spawn(move || flow_load(&client, &stop))
    };
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    loading
        .join()
        .map_err(|_| anyhow::anyhow!("the load panicked"))??;
    // The agent reads the ring on a 100 ms timer: let it take the last events.
    std::thread::sleep(Duration::from_millis(300));
    let cpu = cpu_ms(pid)? - cpu_before;
    let received = agent.meshctl_json(&["status"])?["flows_received_total"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(received_before);
    watching
        .join()
        .map_err(|_| anyhow::anyhow!("the flow counter panicked"))??;
    #[expect(
        clippy::cast_precision_loss,
        reason = "event counts are far below 2^52"
    )]
    let events = received.max(1) as f64;
    // The status calls above are a few ms of the agent's CPU: counted, and small against it.
    Ok((cpu * 1000.0 / events, events))
}

fn wait_for_reconcile(agent: &AgentProcess, n: usize, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(ms) = reconcile_ms(&agent.stderr(), n) {
            return Ok(ms);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("agent did not log reconciliation #{n}: {}", agent.stderr())
}

/// Nearest-rank percentile of unsorted samples.
#[expect(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    reason = "sample counts and ranks are far below 2^52 and positive"
)]
fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * samples.len() as f64).ceil().max(1.0) as usize;
    samples[rank.min(samples.len()) - 1]
}

/// A kernel counter from `meshctl status`.
fn counter(agent: &AgentProcess, name: &str) -> Result<u64> {
    let s = agent.meshctl_json(&["status"])?;
    Ok(s["counters"][name].as_u64().unwrap_or(0))
}

/// `ListServices` over the admin socket in a loop until `stop`, paging through every service as
/// `meshctl services` does (the default page, 500) and starting over after the last page; the
/// latency of each call — one page — in ms.
fn list_services_loop(socket: std::path::PathBuf, stop: Arc<AtomicBool>) -> Result<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = mesh_agent::admin::connect(&socket).await?;
        let mut samples = Vec::new();
        let mut continue_token = String::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let page = client
                .list_services(ListServicesRequest {
                    limit: 0,
                    continue_token,
                })
                .await?
                .into_inner();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
            if page.services.is_empty() {
                bail!("ListServices returned an empty page");
            }
            continue_token = page.continue_token;
        }
        Ok(samples)
    })
}

/// Counts `close` flows of `default/live` from a live `WatchFlows` until `stop` (plus a
/// second for the last ones to arrive).
fn count_flows(
    socket: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    seen: Arc<AtomicU64>,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut client = mesh_agent::admin::connect(&socket).await?;
        let mut stream = client
            .watch_flows(WatchFlowsRequest {
                service: "default/live".to_owned(),
                verdict: "close".to_owned(),
                // The live service has had no connections before: history holds none of them.
                follow: true,
                ..WatchFlowsRequest::default()
            })
            .await?
            .into_inner();
        let mut stopped_at: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                let at = *stopped_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(1) {
                    return Ok(());
                }
            }
            match tokio::time::timeout(Duration::from_millis(100), stream.message()).await {
                Ok(Ok(Some(_))) => {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(None)) => bail!("the flow stream ended"),
                Ok(Err(e)) => bail!("the flow stream failed: {e}"),
                Err(_) => {}
            }
        }
    })
}

/// Connections from `client` to the live service at about [`FLOW_LOAD_PER_S`] until `stop`, in
/// batches every 50 ms; returns (successful connections, failed ones, seconds).
fn flow_load(client: &PodHandle, stop: &AtomicBool) -> Result<(u64, u64, f64)> {
    let vip: SocketAddr = LIVE_VIP.parse()?;
    let slot = Duration::from_millis(50);
    let per_slot = (FLOW_LOAD_PER_S / 20) as usize;
    let started = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut next = started;
    while !stop.load(Ordering::Relaxed) {
        let r = client.hit(vip, per_slot, &["--concurrency", "8"])?;
        ok += r.ok();
        failed += r.failed();
        next += slot;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok((ok, failed, started.elapsed().as_secs_f64()))
}

/// Runs the benchmark; `quick` uses 1,000 services.
#[expect(
    clippy::too_many_lines,
    reason = "one measured sequence reads best top to bottom"
)]
#[expect(
    clippy::cast_precision_loss,
    reason = "counts reported as f64 metrics are far below 2^52"
)]
pub fn run(quick: bool) -> Result<Vec<Metric>> {
    let services = if quick { 1_000 } else { 10_000 };
    let endpoints = 10;
    let changed = services / 5;
    let cluster = Cluster::new("bench-control-plane")?;
    let node = cluster.add_node("a")?;
    let client = cluster.add_pod(&node, "client")?;
    let (backends, _servers) = crate::meshpod::backend_pods(&cluster, &node, "live-", 1, 80)?;
    let live = live_service(&backends[0]);
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let file = work.join("mesh.yaml");
    write_atomically(&file, &(model(services, endpoints, 0, 0) + &live))?;
    let mut agent = AgentProcess::new(
        node,
        file.clone(),
        cluster.bpffs_dir()?.join("a"),
        work.join("admin.sock"),
    );
    agent.ready_timeout = Duration::from_mins(2);
    let started = Instant::now();
    agent.start()?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let reconcile = wait_for_reconcile(&agent, 0, Duration::from_secs(5))?;
    let pid = agent.pid().context("agent pid")?;
    let rss = rss_mb(pid)?;
    // What the RSS is made of: the heap and stacks, and the binary's (and libraries') pages.
    let (rss_anon, rss_file) = (status_mb(pid, "RssAnon")?, status_mb(pid, "RssFile")?);
    // Endpoint churn: one endpoint of `changed` services moves; the agent writes only those.
    write_atomically(&file, &(model(services, endpoints, changed, 1) + &live))?;
    let churn_ms = wait_for_reconcile(&agent, 1, Duration::from_mins(1))?;
    let status = agent.meshctl_json(&["status"])?;
    if status["services"].as_u64() != Some(services as u64 + 1) {
        bail!(
            "agent holds {} services, expected {services} + 1",
            status["services"]
        );
    }
    let batch = f64::from(u32::try_from(changed)?);
    let per_s = batch / (churn_ms.max(1.0) / 1000.0);

    // Every service changes at once while admin calls and a steady connection load go on.
    let dropped_before = counter(&agent, "event_dropped")?;
    let stop_load = Arc::new(AtomicBool::new(false));
    let stop_admin = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let counting = {
        let (socket, stop, seen) = (
            agent.socket.clone(),
            Arc::clone(&stop_load),
            Arc::clone(&seen),
        );
        std::thread::spawn(move || count_flows(socket, stop, seen))
    };
    std::thread::sleep(Duration::from_millis(300));
    let loading = {
        let (client, stop) = (client.clone(), Arc::clone(&stop_load));
        std::thread::spawn(move || flow_load(&client, &stop))
    };
    let admin = {
        let (socket, stop) = (agent.socket.clone(), Arc::clone(&stop_admin));
        std::thread::spawn(move || list_services_loop(socket, stop))
    };
    // Load and calls run a moment before the change, so the whole reconciliation is covered.
    std::thread::sleep(Duration::from_millis(500));
    write_atomically(&file, &(model(services, endpoints, services, 2) + &live))?;
    let full_ms = wait_for_reconcile(&agent, 2, Duration::from_mins(1));
    std::thread::sleep(Duration::from_millis(300));
    stop_admin.store(true, Ordering::Relaxed);
    stop_load.store(true, Ordering::Relaxed);
    let full_ms = full_ms?;
    let mut admin_ms = admin
        .join()
        .map_err(|_| anyhow::anyhow!("the admin client panicked"))??;
    let (ok, failed, load_s) = loading
        .join()
        .map_err(|_| anyhow::anyhow!("the load panicked"))??;
    counting
        .join()
        .map_err(|_| anyhow::anyhow!("the flow counter panicked"))??;
    // The owner refreshes the counters every second.
    std::thread::sleep(Duration::from_millis(1500));
    let dropped = counter(&agent, "event_dropped")?.saturating_sub(dropped_before);
    let status = agent.meshctl_json(&["status"])?;
    let lagged = status["flows_lagged_total"].as_u64().unwrap_or(0);
    let received = seen.load(Ordering::Relaxed);
    let missing = ok.saturating_sub(received);
    if failed > 0 {
        bail!("{failed} of the load's connections failed during the reconciliation");
    }
    // After the reconciliation phase: its watcher must see none of these flows in its history.
    let (cpu_per_flow_us, cpu_flow_events) = agent_cpu_per_flow(&agent, &client)?;
    let label = if quick { "1k" } else { "10k" };
    let calls = admin_ms.len() as f64;
    Ok(vec![
        (format!("reconcile_{label}_services_ms"), reconcile),
        (format!("agent_rss_mb_{label}_services"), rss),
        (format!("agent_rss_anon_mb_{label}_services"), rss_anon),
        (format!("agent_rss_file_mb_{label}_services"), rss_file),
        ("endpoint_updates_per_s".to_owned(), per_s),
        (format!("agent_ready_{label}_services_ms"), ready_ms),
        ("endpoint_churn_batch".to_owned(), batch),
        ("endpoint_churn_reconcile_ms".to_owned(), churn_ms),
        (format!("reconcile_all_{label}_changed_ms"), full_ms),
        (
            "admin_p99_ms_during_reconcile".to_owned(),
            percentile(&mut admin_ms, 99.0),
        ),
        (
            "admin_p50_ms_during_reconcile".to_owned(),
            percentile(&mut admin_ms, 50.0),
        ),
        ("admin_calls_during_reconcile".to_owned(), calls),
        (
            "flow_events_lost_during_reconcile".to_owned(),
            (dropped + lagged + missing) as f64,
        ),
        ("flow_load_conn_per_s".to_owned(), ok as f64 / load_s),
        ("flow_load_connections".to_owned(), ok as f64),
        ("flow_close_events_seen".to_owned(), received as f64),
        ("flow_events_dropped_kernel".to_owned(), dropped as f64),
        ("agent_cpu_us_per_flow_event".to_owned(), cpu_per_flow_us),
        ("agent_cpu_flow_events".to_owned(), cpu_flow_events),
    ])
}

/// Nodes the Kubernetes benchmark spreads pods over; the agent's node `a` is one of them, so it
/// receives 1 % of the pods through its `spec.nodeName` field selector.
const KUBERNETES_NODES: usize = 100;

/// The node of endpoint `e` of service `s`: `a` (the agent's) or `n1`..`n99`.
fn pod_node(s: usize, e: usize) -> String {
    match (s * 10 + e) % KUBERNETES_NODES {
        0 => "a".to_owned(),
        n => format!("n{n}"),
    }
}

/// Server-side-apply bookkeeping as the API server keeps it, which the agent must not store.
fn managed_fields(manager: &str) -> serde_json::Value {
    json!([{ "manager": manager, "operation": "Update", "apiVersion": "v1",
        "time": "2026-11-24T10:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": { "f:metadata": { "f:labels": { ".": {}, "f:app": {} } },
            "f:spec": { "f:ports": { ".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {} } } } }])
}

/// The API objects of `services` services × `endpoints` endpoints as `kmock --preload` lines:
/// the namespace, the node, each Service (with kubectl's last-applied annotation), one
/// `EndpointSlice` per service, and a Pod per endpoint on one of [`KUBERNETES_NODES`] nodes.
/// Addresses are those of [`model`].
pub fn kubernetes_objects(
    out: &mut impl std::io::Write,
    services: usize,
    endpoints: usize,
) -> Result<()> {
    let mut line = |resource: &str, object: serde_json::Value| -> Result<()> {
        serde_json::to_writer(
            &mut *out,
            &json!({ "resource": resource, "object": object }),
        )?;
        out.write_all(b"\n")?;
        Ok(())
    };
    line(
        "v1/namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "default" }, "status": { "phase": "Active" } }),
    )?;
    line(
        "v1/nodes",
        json!({ "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "a", "labels": { "topology.kubernetes.io/zone": "z1" } } }),
    )?;
    for s in 0..services {
        let (hi, lo) = (s / 250, s % 250 + 1);
        let name = format!("svc-{s}");
        let spec = json!({
            "type": "ClusterIP", "clusterIP": format!("10.96.{hi}.{lo}"),
            "clusterIPs": [format!("10.96.{hi}.{lo}")], "ipFamilies": ["IPv4"],
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" }],
        });
        let applied = json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "default" }, "spec": spec });
        line(
            "v1/services",
            json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "default", "labels": { "app": name },
                "annotations": { "kubectl.kubernetes.io/last-applied-configuration": applied.to_string() },
                "managedFields": managed_fields("kubectl-client-side-apply") },
            "spec": spec, "status": { "loadBalancer": {} } }),
        )?;
        let mut eps = Vec::with_capacity(endpoints);
        for e in 0..endpoints {
            let ip = format!("10.{}.{}.{}", 100 + s / 250 % 100, s % 250, e + 1);
            let pod = format!("{name}-{e}");
            let node = pod_node(s, e);
            eps.push(json!({ "addresses": [ip],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": node, "zone": "z1",
                "targetRef": { "kind": "Pod", "namespace": "default", "name": pod,
                    "uid": format!("00000000-0000-0000-{s:04}-{e:012}") } }));
            line(
                "v1/pods",
                json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": pod, "namespace": "default", "labels": { "app": name },
                    "managedFields": managed_fields("kubelet") },
                "spec": { "nodeName": node, "serviceAccountName": "default",
                    "containers": [{ "name": "app", "image": "registry.example/app:1.0",
                        "ports": [{ "containerPort": 8080, "protocol": "TCP" }] }] },
                "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }],
                    "conditions": [{ "type": "Ready", "status": "True" }] } }),
            )?;
        }
        line(
            "discovery.k8s.io/v1/endpointslices",
            json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": format!("{name}-x1"), "namespace": "default",
                "labels": { "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io" },
                "managedFields": managed_fields("kube-controller-manager") },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": eps }),
        )?;
    }
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Kubernetes source on the API stand-in: `mesh-agent --kubernetes` against kmock holding
/// 10,000 services (1,000 with `quick`) × 10 endpoints and their pods.
#[expect(
    clippy::too_many_lines,
    reason = "one measurement, step by step: start, lists, reconcile, RSS"
)]
pub fn run_kubernetes(quick: bool) -> Result<Vec<Metric>> {
    let services = if quick { 1_000 } else { 10_000 };
    let cluster = Cluster::new("bench-control-plane-k8s")?;
    let node = cluster.add_node("a")?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let objects = work.join("objects.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&objects)?);
    kubernetes_objects(&mut file, services, 10)?;
    file.flush()?;
    drop(file);
    let kmock = Kmock::start(&work, Some(&objects))?;
    let mut agent = AgentProcess::new(
        node,
        work.join("unused.yaml"),
        cluster.bpffs_dir()?.join("a"),
        work.join("admin.sock"),
    );
    agent.kubeconfig = Some(kmock.kubeconfig(&work)?);
    agent.ready_timeout = Duration::from_mins(3);
    let started = Instant::now();
    agent.start()?;
    let ready_at = unix_now();
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    let kernel_ms = wait_for_reconcile(&agent, 0, Duration::from_secs(5))?;
    let log = agent.stderr();
    let listed_to_kernel_ms = match (
        log_time(&log, "initial lists complete"),
        log_time(&log, "reconciled"),
    ) {
        (Some(a), Some(b)) => (b - a) * 1000.0,
        _ => bail!("agent did not log its initial lists and reconcile: {log}"),
    };
    // The agent's initial lists: when the first was asked for, and when the last was served.
    // A streaming list (`sendInitialEvents`, the agent's default) is asked for with a watch
    // and served when its initial-events-end bookmark is sent; a list (`discovery.listMode:
    // list`, or the fallback) when its response is ready.
    let requests = kmock.requests();
    let initial = |r: &serde_json::Value| {
        r["params"].get("watch").is_none() || r["params"]["sendInitialEvents"] == "true"
    };
    let lists = |phases: &[&str]| -> Vec<(String, f64)> {
        requests
            .iter()
            .filter(|r| {
                phases.iter().any(|p| r["phase"] == *p) && r["method"] == "GET" && initial(r)
            })
            .filter_map(|r| Some((r["path"].as_str()?.to_owned(), r["t"].as_f64()?)))
            .collect()
    };
    let first_list = lists(&["request"])
        .into_iter()
        .map(|(_, t)| t)
        .reduce(f64::min)
        .context("kmock logged no list request")?;
    let mut served: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for (path, t) in lists(&["response", "initial-events-end"]) {
        served.entry(path).or_insert(t);
    }
    let lists_served = served
        .values()
        .copied()
        .reduce(f64::max)
        .context("kmock logged no list response")?;
    let status = agent.meshctl_json(&["status"])?;
    if status["services"].as_u64() != Some(services as u64) {
        bail!(
            "agent holds {} services, expected {services}",
            status["services"]
        );
    }
    // The heap settles after the first reconcile (freed list buffers are returned).
    std::thread::sleep(Duration::from_secs(1));
    let pid = agent.pid().context("agent pid")?;
    let rss = rss_mb(pid)?;
    let (rss_anon, rss_file) = (status_mb(pid, "RssAnon")?, status_mb(pid, "RssFile")?);
    let label = if quick { "1k" } else { "10k" };
    Ok(vec![
        // From the agent holding every initial list (received, parsed, stored) to all services
        // in the kernel: building the model and reconciling it.
        (
            format!("reconcile_{label}_services_kubernetes_ms"),
            listed_to_kernel_ms,
        ),
        // From the stand-in's answer to the last initial list to all services in the kernel:
        // adds receiving and parsing the lists, but also any time the single-threaded Python
        // stand-in spends elsewhere before sending them.
        (
            format!("lists_served_to_kernel_{label}_services_kubernetes_ms"),
            (ready_at - lists_served) * 1000.0,
        ),
        // End to end, including the Python stand-in producing the lists (a real API server
        // answers from its watch cache far faster).
        (
            format!("first_list_to_kernel_{label}_services_kubernetes_ms"),
            (ready_at - first_list) * 1000.0,
        ),
        (format!("agent_rss_mb_{label}_services_kubernetes"), rss),
        (
            format!("agent_rss_anon_mb_{label}_services_kubernetes"),
            rss_anon,
        ),
        (
            format!("agent_rss_file_mb_{label}_services_kubernetes"),
            rss_file,
        ),
        (
            format!("reconcile_{label}_services_kubernetes_kernel_ms"),
            kernel_ms,
        ),
        (
            format!("agent_ready_{label}_services_kubernetes_ms"),
            ready_ms,
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    #[expect(clippy::float_cmp, reason = "nearest rank returns a sample itself")]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut [7.0], 99.0), 7.0);
    }
}
