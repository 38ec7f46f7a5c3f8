//! The control-plane benchmark (`cargo xtask bench control-plane`): the real agent reconciling
//! 10,000 services × 10 endpoints into the kernel — from a static file (time, resident memory,
//! the rate at which endpoint changes reach the kernel) and from the Kubernetes API stand-in
//! (the same services in `EndpointSlices`, with their 100,000 pods: time from the first list to
//! the kernel, resident memory).

use std::{
    fmt::Write as _,
    io::Write as _,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use serde_json::json;

use crate::{
    Cluster,
    agent::{AgentProcess, write_atomically},
    kmock::Kmock,
};

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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
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

/// Runs the benchmark; `quick` uses 1,000 services.
pub fn run(quick: bool) -> Result<Vec<Metric>> {
    let services = if quick { 1_000 } else { 10_000 };
    let endpoints = 10;
    let changed = services / 5;
    let cluster = Cluster::new("bench-control-plane")?;
    let node = cluster.add_node("a")?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let file = work.join("mesh.yaml");
    write_atomically(&file, &model(services, endpoints, 0, 0))?;
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
    // Endpoint churn: one endpoint of `changed` services moves; the agent writes only those.
    write_atomically(&file, &model(services, endpoints, changed, 1))?;
    let churn_ms = wait_for_reconcile(&agent, 1, Duration::from_mins(1))?;
    let status = agent.meshctl_json(&["status"])?;
    if status["services"].as_u64() != Some(services as u64) {
        bail!(
            "agent holds {} services, expected {services}",
            status["services"]
        );
    }
    let batch = f64::from(u32::try_from(changed)?);
    let per_s = batch / (churn_ms.max(1.0) / 1000.0);
    let label = if quick { "1k" } else { "10k" };
    Ok(vec![
        (format!("reconcile_{label}_services_ms"), reconcile),
        (format!("agent_rss_mb_{label}_services"), rss),
        ("endpoint_updates_per_s".to_owned(), per_s),
        (format!("agent_ready_{label}_services_ms"), ready_ms),
        ("endpoint_churn_batch".to_owned(), batch),
        ("endpoint_churn_reconcile_ms".to_owned(), churn_ms),
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
    let requests = kmock.requests();
    let lists = |phase: &'static str| -> Vec<(String, f64)> {
        requests
            .iter()
            .filter(|r| {
                r["phase"] == phase && r["method"] == "GET" && r["params"].get("watch").is_none()
            })
            .filter_map(|r| Some((r["path"].as_str()?.to_owned(), r["t"].as_f64()?)))
            .collect()
    };
    let first_list = lists("request")
        .into_iter()
        .map(|(_, t)| t)
        .reduce(f64::min)
        .context("kmock logged no list request")?;
    let mut served: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for (path, t) in lists("response") {
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
    let rss = rss_mb(agent.pid().context("agent pid")?)?;
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
            format!("reconcile_{label}_services_kubernetes_kernel_ms"),
            kernel_ms,
        ),
        (
            format!("agent_ready_{label}_services_kubernetes_ms"),
            ready_ms,
        ),
    ])
}
