//! Connection logs exported over OTLP/gRPC to a real collector (`rotel-agent`, the Rust OTLP
//! collector on PyPI): an agent on a harness node carries real connections through the kernel,
//! and the collector prints exactly those log records; the agent's metrics say how many it sent.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, PodChild,
    agent::{AgentProcess, write_atomically},
};

const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80);
const CONNECTIONS: u32 = 5;
const COLLECTOR: &str = "127.0.0.1:4317";

fn rotel_agent() -> String {
    mesh_tests::bench_telemetry::rotel_agent().expect("rotel-agent")
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

fn scrape(node: &mesh_tests::NodeHandle) -> String {
    use std::io::{Read as _, Write as _};
    let addr = format!("{}:15020", node.ipv4());
    node.run(move || {
        let mut c = std::net::TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut s = String::new();
        c.read_to_string(&mut s).map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    })
    .unwrap()
    .unwrap()
}

/// `rotel-agent` in `node`, printing every log record it receives.
fn start_collector(node: &mesh_tests::NodeHandle, rotel: &str) -> PodChild {
    let mut cmd = node.command(rotel);
    cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        COLLECTOR,
        "--otlp-http-endpoint",
        "127.0.0.1:4318",
        "--exporter",
        "blackhole",
        "--debug-log",
        "logs",
        "--debug-log-verbosity",
        "detailed",
    ]);
    node.spawn(cmd).unwrap()
}

#[test]
fn connection_logs_reach_a_real_otlp_collector() {
    let Some(_k) = mesh_tests::kernel_test("telemetry_otlp") else {
        return;
    };
    let rotel = rotel_agent();
    let cluster = Cluster::new("telemetry_otlp").unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let web = cluster.add_pod(&node, "web-0").unwrap();
    let _server = web
        .serve("web-0", &[SocketAddr::new(IpAddr::V4(web.ipv4()), 80)], &[])
        .unwrap();
    let mut collector = start_collector(&node, &rotel);
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    write_atomically(
        &config,
        &format!(
            "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports: [{{ port: 80 }}]\n    endpoints:\n      - {{ ip: {}, node: a, pod: web-0 }}\npods:\n  - {{ name: client, node: a, serviceAccount: client, ips: [{}] }}\n  - {{ name: web-0, node: a, serviceAccount: web, ips: [{}] }}\n",
            VIP.ip(),
            web.ipv4(),
            client.ipv4(),
            web.ipv4()
        ),
    )
    .unwrap();
    let mut agent = AgentProcess::new(
        node.clone(),
        config,
        cluster.bpffs_dir().unwrap().join("a"),
        work.join("admin.sock"),
    );
    agent
        .env
        .push(("MESH_OTLP_ENDPOINT".into(), format!("http://{COLLECTOR}")));
    agent.start().unwrap();

    let r = client.hit(VIP, CONNECTIONS as usize, &[]).unwrap();
    assert_eq!(r.ok(), u64::from(CONNECTIONS), "{r:?}");

    // The agent batches for at most a second; the collector accepted every record.
    let start = Instant::now();
    let text = loop {
        let t = scrape(&node);
        if metric(&t, "mesh_otlp_exported_total{signal=\"logs\"} ") == Some(f64::from(CONNECTIONS))
        {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the agent did not export {CONNECTIONS} records: {}\nagent: {}",
            t.lines()
                .filter(|l| l.starts_with("mesh_otlp"))
                .collect::<Vec<_>>()
                .join("\n"),
            agent.stderr()
        );
        thread::sleep(Duration::from_millis(250));
    };
    for reason in ["queue_full", "export_failed"] {
        assert_eq!(
            metric(
                &text,
                &format!("mesh_otlp_dropped_total{{signal=\"logs\",reason=\"{reason}\"}} ")
            ),
            Some(0.0),
            "{reason}"
        );
    }
    // What the collector printed: one record per connection, with the access-log fields.
    let start = Instant::now();
    let mut stdout = String::new();
    loop {
        while let Ok(line) = collector.next_line(Duration::from_millis(100)) {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        let printed = format!("{stdout}{}", collector.stderr_text());
        let records = printed.matches("connection complete").count();
        if records >= CONNECTIONS as usize {
            assert_eq!(records, CONNECTIONS as usize, "{printed}");
            for needle in [
                "src.workload",
                "client",
                "web.default.svc.cluster.local",
                "web-0",
            ] {
                assert!(printed.contains(needle), "{needle} not in {printed}");
            }
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the collector printed {records} records: {printed}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A loopback port for this test process's collector (other sessions may run their own).
fn collector_port() -> u16 {
    20_000 + (std::process::id() % 20_000) as u16
}

/// `rotel-agent` on loopback `port` (gRPC) printing the spans it receives, and what it printed.
fn spawn_host_collector(
    rotel: &str,
    port: u16,
) -> (
    std::process::Child,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    use std::sync::Arc;
    let grpc = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(rotel);
    cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        &grpc,
        "--otlp-http-endpoint",
        &format!("127.0.0.1:{}", port + 1),
        "--exporter",
        "blackhole",
        "--debug-log",
        "traces",
        "--debug-log-verbosity",
        "detailed",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut collector = cmd.spawn().expect("starting rotel-agent");
    // Ready when its gRPC port accepts: spans sent before that would use up the exporter's
    // retries (rotel-agent can take seconds to start on a loaded machine).
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(&grpc).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "rotel-agent never listened on {grpc}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let stdout = collector.stdout.take().unwrap();
    let printed = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = Arc::clone(&printed);
    thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    (collector, printed)
}

/// Lower-case hex, as the collector prints ids.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[test]
fn spans_keep_their_parent_links_from_gateway_through_tunnel_to_destination() {
    use mesh_agent::telemetry::{
        otlp::OtlpStats,
        traces::{Kind, TraceContext, Tracer, start_span},
    };
    use std::sync::{Arc, atomic::Ordering};
    let rotel = rotel_agent();
    let port = collector_port();
    let grpc = format!("127.0.0.1:{port}");
    let (mut collector, printed) = spawn_host_collector(&rotel, port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(OtlpStats::default());
    let (gateway, tunnel, inbound) = rt.block_on(async {
        let tracer =
            Tracer::start(&format!("http://{grpc}"), "node-a", 1.0, Arc::clone(&stats)).unwrap();
        assert!(tracer.install());
        // The gateway receives a request without trace context: a new, sampled root.
        let mut gateway = start_span("gateway GET /", Kind::Server, None);
        gateway.set("http.request.method", "GET");
        // It opens the tunnel with its context; the tunnel sends its own as `traceparent`.
        let tunnel = start_span("hbone connect", Kind::Client, Some(gateway.context()));
        let header = tunnel.traceparent();
        // The destination node parses the header it received.
        let received = TraceContext::parse(&header).unwrap();
        let inbound = start_span("hbone inbound", Kind::Server, Some(&received));
        let ids = (*gateway.context(), *tunnel.context(), *inbound.context());
        inbound.finish(None);
        tunnel.finish(None);
        gateway.finish(Some("upstream reset"));
        let start = Instant::now();
        while stats.traces.exported.load(Ordering::Relaxed) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not exported: retries {}, dropped {}",
                stats.traces.retries.load(Ordering::Relaxed),
                stats.traces.dropped_export_failed.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ids
    });
    assert_eq!(stats.traces.exported.load(Ordering::Relaxed), 3);
    assert_eq!(gateway.trace_id, tunnel.trace_id);
    assert_eq!(tunnel.trace_id, inbound.trace_id);
    // The collector printed the three spans of one trace, each child naming its parent.
    let start = Instant::now();
    loop {
        let out = printed.lock().unwrap().clone();
        let ok = out.matches(&hex(&gateway.trace_id)).count() >= 3
            && ["gateway GET /", "hbone connect", "hbone inbound"]
                .iter()
                .all(|n| out.contains(n))
            && out.contains(&hex(&gateway.span_id))
            && out.contains(&hex(&tunnel.span_id));
        if ok {
            // rotel prints `Parent ID      : <hex>` per span: the tunnel's parent is the
            // gateway, the destination's parent is the tunnel, the gateway is a root.
            let mut parents: Vec<String> = out
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Parent ID"))
                .map(|l| l.trim_start_matches([' ', ':']).trim().to_owned())
                .collect();
            parents.sort();
            let mut want = vec![String::new(), hex(&gateway.span_id), hex(&tunnel.span_id)];
            want.sort();
            assert_eq!(parents, want, "{out}");
            assert_eq!(inbound.span_id.len(), 8);
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = collector.kill();
            panic!("the collector did not print the linked spans: {out}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let _ = collector.kill();
    let _ = collector.wait();
}
