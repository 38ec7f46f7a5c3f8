//! The live telemetry switch (the static file's `telemetry:` section): a real agent on a harness
//! node, real connections through the kernel and a real OTLP collector (`rotel-agent`). The
//! connection log on stdout and the OTLP log export go off, on, and off again by rewriting the
//! file, with no restart; what was queued when a switch came is still delivered; a bad value
//! is rejected with file, field and reason and the last good setting keeps serving; removing
//! the section goes back to the flags. Istio does the same with a `Telemetry` resource
//! (`accessLogging[].providers` / `disabled`): Envoy and ztunnel apply it without a restart,
//! istiod's webhook refuses an invalid one, deleting it goes back to the mesh default.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster, NodeHandle, PodHandle,
    agent::{AgentProcess, write_atomically},
};

const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 21)), 80);
const COLLECTOR: &str = "127.0.0.1:4317";

fn rotel_agent() -> String {
    mesh_tests::bench_telemetry::rotel_agent().expect("rotel-agent")
}

fn scrape(node: &NodeHandle) -> String {
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

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

const OPENED: &str = "istio_tcp_connections_opened_total";
const EXPORTED: &str = "mesh_otlp_exported_total{signal=\"logs\"} ";

/// Sum of `istio_tcp_connections_opened_total` over its series.
fn opened(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(OPENED))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Fixture {
    node: NodeHandle,
    client: PodHandle,
    web: PodHandle,
    agent: AgentProcess,
    config: std::path::PathBuf,
    /// Connections made so far.
    made: u32,
}

impl Fixture {
    fn write(&self, telemetry: &str) {
        write_atomically(
            &self.config,
            &format!(
                "node: a\nservices:\n  - name: web\n    clusterIPs: [{}]\n    ports: [{{ port: 80 }}]\n    endpoints:\n      - {{ ip: {}, node: a, pod: web-0 }}\npods:\n  - {{ name: client, node: a, serviceAccount: client, ips: [{}] }}\n  - {{ name: web-0, node: a, serviceAccount: web, ips: [{}] }}\n{telemetry}",
                VIP.ip(),
                self.web.ipv4(),
                self.client.ipv4(),
                self.web.ipv4()
            ),
        )
        .unwrap();
    }

    /// Writes the file and waits until the agent logged `needle` once more.
    fn switch(&self, telemetry: &str, needle: &str) {
        let n = self.agent.stderr().matches(needle).count() + 1;
        self.write(telemetry);
        let start = Instant::now();
        while self.agent.stderr().matches(needle).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no {needle:?} #{n}: {}",
                self.agent.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes `n` connections and waits until telemetry has seen them all (the metrics count
    /// every flow whatever the switch says).
    fn hit(&mut self, n: u32) {
        let r = self
            .client
            .hit(VIP, usize::try_from(n).unwrap(), &[])
            .unwrap();
        assert_eq!(r.ok(), u64::from(n), "{r:?}");
        self.made += n;
        let start = Instant::now();
        while opened(&scrape(&self.node)) < f64::from(self.made) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "telemetry did not see {} connections",
                self.made
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the collector accepted `want` records, then checks it stays there for
    /// longer than the exporter's batching (1 s) and the stdout flush.
    fn exported(&self, want: f64) {
        let start = Instant::now();
        while metric(&scrape(&self.node), EXPORTED) < want {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "not {want} exported: {}",
                self.agent.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }
        thread::sleep(Duration::from_millis(1500));
        let now = metric(&scrape(&self.node), EXPORTED);
        assert!((now - want).abs() < 0.5, "{now} exported, not {want}");
    }

    /// The connection lines on stdout so far (none more within `wait`).
    fn lines(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        while let Ok(l) = self.agent.stdout_line(wait) {
            assert!(l.contains("connection complete"), "{l}");
            n += 1;
        }
        n
    }
}

#[test]
fn connection_log_and_otlp_export_switch_live_from_the_file() {
    let Some(_k) = mesh_tests::kernel_test("telemetry_switch") else {
        return;
    };
    let rotel = rotel_agent();
    let cluster = Cluster::new("telemetry_switch").unwrap();
    let node = cluster.add_node("a").unwrap();
    let client = cluster.add_pod(&node, "client").unwrap();
    let web = cluster.add_pod(&node, "web-0").unwrap();
    let _server = web
        .serve("web-0", &[SocketAddr::new(IpAddr::V4(web.ipv4()), 80)], &[])
        .unwrap();
    let mut cmd = node.command(&rotel);
    cmd.args([
        "start",
        "--otlp-grpc-endpoint",
        COLLECTOR,
        "--otlp-http-endpoint",
        "127.0.0.1:4318",
        "--exporter",
        "blackhole",
    ]);
    let _collector = node.spawn(cmd).unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    let mut agent = AgentProcess::new(
        node.clone(),
        config.clone(),
        cluster.bpffs_dir().unwrap().join("a"),
        work.join("admin.sock"),
    );
    "info".clone_into(&mut agent.log_filter);
    // The flags: connection log off, OTLP on (the defaults the file's section overrides).
    agent.env = vec![
        ("MESH_ACCESS_LOG".into(), "false".into()),
        ("MESH_OTLP_ENDPOINT".into(), format!("http://{COLLECTOR}")),
        ("MESH_ACCESS_LOG_FLUSH_INTERVAL".into(), "100ms".into()),
    ];
    let mut f = Fixture {
        node,
        client,
        web,
        agent,
        config,
        made: 0,
    };
    // Started with both off by the file.
    f.write("telemetry: { accessLog: false, otlpLogs: false }\n");
    f.agent.start().unwrap();
    f.hit(3);
    f.exported(0.0);
    assert_eq!(f.lines(Duration::from_millis(500)), 0);

    // On, live: every connection from now on is logged and exported.
    f.switch(
        "telemetry: { accessLog: true, otlpLogs: true }\n",
        "telemetry switched",
    );
    f.hit(5);
    // Off again at once: the 5 records are queued in the exporter's batch (up to 1 s) and
    // possibly the stdout buffer; the switch drops none of them.
    f.switch(
        "telemetry: { accessLog: false, otlpLogs: false }\n",
        "telemetry switched",
    );
    f.exported(5.0);
    assert_eq!(f.lines(Duration::from_millis(500)), 5);
    f.hit(4);
    f.exported(5.0);
    assert_eq!(f.lines(Duration::from_millis(500)), 0);

    // A bad value: the file is rejected with file, line, field and reason; still off.
    f.switch(
        "telemetry: { accessLog: sometimes }\n",
        "telemetry.accessLog: \"sometimes\" is not true or false",
    );
    assert!(
        f.agent.stderr().contains("mesh.yaml:11:"),
        "{}",
        f.agent.stderr()
    );
    f.hit(2);
    f.exported(5.0);
    assert_eq!(f.lines(Duration::from_millis(500)), 0);

    // The section removed: the flags' setting (log off, OTLP on) comes back.
    f.switch("", "telemetry switched");
    f.hit(3);
    f.exported(8.0);
    assert_eq!(f.lines(Duration::from_millis(500)), 0);
    let (status, log) = f.agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
}
