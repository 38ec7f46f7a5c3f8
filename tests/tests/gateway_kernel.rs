//! One health picture for the gateway and the kernel, on real programs: a node agent, two HTTP
//! backend pods, a client pod and `mesh-agent gateway` processes in the node. 5xx the gateway
//! sees are reported over the agent's admin socket (`ReportBackendResult`), the kernel ejects the
//! backend (`meshctl circuits` shows it) and the client pod's `connect()` to the Service avoids
//! it; a second gateway that never saw a failure skips it too, reading the kernel's circuits from
//! the agent's pinned maps. Build first: `cargo build -p mesh-agent --bins`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{
    NodeHandle, PodChild, PodHandle,
    agent::{AgentProcess, workspace_binary, write_atomically},
};

const VIP: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
const GW_PORT: u16 = 18087;
const GW2_PORT: u16 = 18088;

/// An HTTP/1.1 server answering its name, or 503 while the flag file exists.
const SERVER: &str = r#"
import http.server, os, sys
name, port, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 503 if os.path.exists(flag) else 200
        body = (name + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;

fn model(backends: &[&PodHandle]) -> String {
    let endpoints = backends.iter().fold(String::new(), |mut s, p| {
        let _ = writeln!(
            s,
            "      - {{ ip: {}, node: a, pod: {}, ready: true }}",
            p.ipv4(),
            p.name()
        );
        s
    });
    format!(
        "node: a
services:
  - name: web
    clusterIPs: [{}]
    ports: [{{ name: http, port: 80 }}]
    endpoints:
{endpoints}policies:
  - apiVersion: traffic.kernmesh.io/v1alpha1
    kind: TrafficPolicy
    metadata: {{ name: web }}
    spec:
      targetRefs: [{{ kind: Service, name: web }}]
      loadBalancer: {{ simple: ROUND_ROBIN }}
      outlierDetection: {{ consecutiveFailures: 3, baseEjectionTime: 120s, maxEjectionPercent: 50, healthyPanicThreshold: 0 }}
",
        VIP.ip()
    )
}

/// `curl` in `place` (a node or pod): (status, body) per request.
fn curl(place: &mesh_tests::Sandbox, url: &str, n: usize) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut cmd = place.command("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "5",
            "-H",
            "Host: web",
            "-w",
            " %{http_code}",
            url,
        ]);
        let o = place.output(cmd)?;
        let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let (body, code) = text.rsplit_once(' ').unwrap_or(("", &text));
        out.push((code.to_owned(), body.trim().to_owned()));
    }
    Ok(out)
}

fn by_body(answers: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (code, body) in answers {
        *m.entry(format!("{code} {body}")).or_default() += 1;
    }
    m
}

fn start_gateway(
    node: &NodeHandle,
    dir: &Path,
    port: u16,
    config: &Path,
    extra: &[&str],
) -> Result<PodChild> {
    let routes_path = dir.join(format!("routes-{port}.yaml"));
    write_atomically(
        &routes_path,
        &mesh_tests::gateway::http_route_yaml(port, "web", ""),
    )?;
    let mut cmd = node.command(workspace_binary("mesh-agent")?);
    cmd.arg("gateway")
        .arg("--routes")
        .arg(&routes_path)
        .arg("--config-file")
        .arg(config)
        .args(["--listen-address", "127.0.0.1", "--metrics-addr", "none"])
        .args(["--access-log", "false"])
        .args(extra)
        .env("RUST_LOG", "info");
    node.spawn(cmd)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out waiting for {what}")
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario in order: eject through the gateway, then every client avoids it"
)]
fn gateway_5xx_eject_in_the_kernel_and_every_client_avoids_the_backend() -> Result<()> {
    let Some(_k) = mesh_tests::kernel_test("gateway_kernel") else {
        return Ok(());
    };
    let cluster = mesh_tests::Cluster::new("gateway_kernel")?;
    let node = cluster.add_node("a")?;
    let client = cluster.add_pod(&node, "client")?;
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work)?;
    let mut pods = Vec::new();
    let mut servers = Vec::new();
    for i in 0..2 {
        let pod = cluster.add_pod(&node, &format!("web-{i}"))?;
        let flag = work.join(format!("web-{i}.fail"));
        let mut cmd = pod.command("python3");
        cmd.args(["-c", SERVER, pod.name(), "80"]).arg(&flag);
        servers.push(pod.spawn(cmd)?);
        pods.push(pod);
    }
    let bad = pods[1].ipv4();
    let bad_flag = work.join("web-1.fail");
    let config = work.join("mesh.yaml");
    write_atomically(&config, &model(&[&pods[0], &pods[1]]))?;
    let pins = cluster.bpffs_dir()?.join("a");
    let mut agent = AgentProcess::new(
        node.clone(),
        config.clone(),
        pins.clone(),
        work.join("admin.sock"),
    );
    agent.start()?;
    // Both backends answer through the kernel's round robin before anything fails.
    let vip_url = format!("http://{VIP}/");
    wait_until("the backends to serve", Duration::from_secs(20), || {
        Ok(curl(&client, &vip_url, 1)?[0].0 == "200")
    })?;
    let before = by_body(&curl(&client, &vip_url, 10)?);
    assert_eq!(
        before.get("200 web-0").zip(before.get("200 web-1")),
        Some((&5, &5)),
        "round robin over both: {before:?}"
    );

    // Gateway 1 reports to the agent. web-1 answers 503: each such try is retried on web-0
    // (the client sees 200) and reported; the third consecutive one ejects it in the kernel.
    let socket = agent.socket.display().to_string();
    let pin_dir = pins.display().to_string();
    let gw = start_gateway(
        &node,
        &work,
        GW_PORT,
        &config,
        &["--agent-socket", &socket, "--node-pin-dir", &pin_dir],
    )?;
    let gw_url = format!("http://127.0.0.1:{GW_PORT}/");
    wait_until("the gateway to route", Duration::from_secs(20), || {
        Ok(curl(&node, &gw_url, 1)?[0].0 == "200")
    })
    .with_context(|| gw.stderr_text())?;
    std::fs::write(&bad_flag, b"")?;
    let answers = curl(&node, &gw_url, 12)?;
    assert!(
        answers.iter().all(|(c, b)| c == "200" && b == "web-0"),
        "retried on web-0: {answers:?}"
    );
    let mut circuits = serde_json::Value::Null;
    wait_until(
        "meshctl circuits to show web-1 open",
        Duration::from_secs(10),
        || {
            circuits = agent.meshctl_json(&["circuits"])?;
            Ok(circuits.as_array().is_some_and(|a| {
                a.iter()
                    .any(|b| b["address"] == format!("{bad}:80") && b["circuit"] == "open")
            }))
        },
    )
    .with_context(|| format!("{circuits}\n{}", gw.stderr_text()))?;
    let list = circuits.as_array().context("circuits")?;
    assert_eq!(list.len(), 1, "only web-1 is ejected: {circuits}");
    assert_eq!(list[0]["service"], "default/web", "{circuits}");
    assert!(list[0]["failures"].as_u64() >= Some(3), "{circuits}");

    // The pods' traffic avoids it: every connect() of the client pod goes to web-0, although
    // web-1 would answer now.
    std::fs::remove_file(&bad_flag)?;
    let after = by_body(&curl(&client, &vip_url, 10)?);
    assert_eq!(after.get("200 web-0"), Some(&10), "{after:?}");

    // A second gateway, which never saw web-1 fail, reads the kernel's circuit from the pinned
    // maps and skips it too (without them, round robin would send it every other request).
    let second = start_gateway(
        &node,
        &work,
        GW2_PORT,
        &config,
        &["--node-pin-dir", &pin_dir],
    )?;
    let second_url = format!("http://127.0.0.1:{GW2_PORT}/");
    wait_until("gateway 2 to route", Duration::from_secs(20), || {
        Ok(curl(&node, &second_url, 1)?[0].0 == "200")
    })
    .with_context(|| second.stderr_text())?;
    // Its circuit reader refreshes every 500 ms; give it one round.
    std::thread::sleep(Duration::from_secs(1));
    let via2 = by_body(&curl(&node, &second_url, 10)?);
    assert_eq!(via2.get("200 web-0"), Some(&10), "{via2:?}");
    assert!(
        second.stderr_text().contains("pinned maps"),
        "{}",
        second.stderr_text()
    );
    drop((gw, second, servers));
    Ok(())
}
