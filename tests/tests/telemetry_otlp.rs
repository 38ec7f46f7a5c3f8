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

/// `rotel-agent`, shipped inside the `rotel` Python package (`cargo xtask install-deps`).
fn rotel_agent() -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && std::path::Path::new(&path).is_file()).then_some(path)
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
    let rotel = rotel_agent().expect("rotel-agent (python3 -m pip install rotel)");
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
