//! Issue 9 end to end: two harness nodes, each with the real agent binary (static file source),
//! a real CA (`mesh-agent ca`), real programs and real TCP. Enrolled pods reach each other over
//! HBONE (mTLS, TLS 1.3 on the link, the caller's address preserved), authorization policy
//! decides both across nodes (inbound proxy) and on one node (the kernel, `EACCES`), the agent's
//! absence fails closed, and a connection outlives certificate rotations and a CA restart.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    Cluster, NodeHandle, PodChild, PodHandle, RrReport,
    agent::{AgentProcess, write_atomically},
    connect::{connect_from, tcp_in_segs},
    hbone::{Capture, contains},
    mtls::CaSetup,
    prom::{scrape, sum},
};

const APP_PORT: u16 = 8080;
/// The server pod's HTTP port (behind service `api`), for the gateway.
const HTTP_PORT: u16 = 8081;
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 1);
const NEAR_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 2);
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 9, 3);
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/shop/sa/gateway";
/// The gateway's HTTP listener in its pod.
const GW_PORT: u16 = 8000;
/// An HTTP/1.0 backend (one connection per request, so each request is a new captured connect
/// and a new authorization decision) answering `NAME\n`.
const HTTP_SERVER: &str = r#"
import http.server, sys
name, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (name + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"#;
const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// What the client sends across nodes; the link must never show it.
const PAYLOAD: &str = "secret-payload-across";

/// The two-node mesh: `client`, `near` (same node) and `gateway` on a, `server` on b,
/// `outsider` (a namespace not in the mesh) on a; the CA runs in node a's namespace.
struct Mesh {
    cluster: Cluster,
    a: NodeHandle,
    b: NodeHandle,
    client: PodHandle,
    near: PodHandle,
    server: PodHandle,
    outsider: PodHandle,
    gateway: PodHandle,
    work: PathBuf,
    ca_dir: PathBuf,
    ca: Option<PodChild>,
    ca_ttl: &'static str,
    agents: Vec<AgentProcess>,
    _servers: Vec<PodChild>,
}

impl Mesh {
    fn new(test: &str, workload_ttl: &'static str) -> Result<Self> {
        let cluster = Cluster::new(test)?;
        let a = cluster.add_node("a")?;
        let b = cluster.add_node("b")?;
        let client = cluster.add_pod(&a, "client")?;
        let near = cluster.add_pod(&a, "near")?;
        let outsider = cluster.add_pod(&a, "outsider")?;
        let gateway = cluster.add_pod(&a, "gateway")?;
        let server = cluster.add_pod(&b, "server")?;
        let mut servers = Vec::new();
        let mut http = server.command("python3");
        http.args(["-c", HTTP_SERVER, "api", &HTTP_PORT.to_string()]);
        servers.push(server.spawn(http)?);
        for p in [&near, &server] {
            let mut cmd = p.meshpod()?;
            cmd.args(["serve", "--show-peer", "--name", p.name(), "--tcp"])
                .arg(SocketAddr::new(p.ipv4().into(), APP_PORT).to_string());
            let mut child = p.spawn(cmd)?;
            child.wait_ready(Duration::from_secs(10))?;
            servers.push(child);
        }
        let work = std::env::temp_dir().join(cluster.prefix());
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let ca_dir = work.join("ca");
        let mut mesh = Self {
            cluster,
            a,
            b,
            client,
            near,
            server,
            outsider,
            gateway,
            ca_dir,
            work,
            ca: None,
            ca_ttl: workload_ttl,
            agents: Vec::new(),
            _servers: servers,
        };
        mesh.write_cluster("", "")?;
        mesh.start_ca()?;
        for node in [mesh.a.clone(), mesh.b.clone()] {
            let agent = mesh.start_agent(&node)?;
            mesh.agents.push(agent);
        }
        Ok(mesh)
    }

    /// The cluster as both agents' files (and the CA's truth) describe it, with extra
    /// authorization and peer-authentication objects.
    fn cluster_yaml(&self, node: &str, authz: &str, peer_authn: &str) -> String {
        let pod = |p: &PodHandle, ns: &str, sa: &str| {
            format!(
                "  - {{ name: {}, namespace: {ns}, node: {}, serviceAccount: {sa}, ips: [{}], labels: {{ app: {} }} }}\n",
                p.name(),
                p.node().name(),
                p.ipv4(),
                p.name()
            )
        };
        let svc = |name: &str, vip: Ipv4Addr, p: &PodHandle, target: u16| {
            format!(
                "  - name: {name}\n    namespace: shop\n    clusterIPs: [{vip}]\n    ports: [{{ name: http, port: 80, targetPort: {target}, protocol: TCP }}]\n    endpoints: [{{ ip: {}, node: {}, pod: {} }}]\n",
                p.ipv4(),
                p.node().name(),
                p.name()
            )
        };
        format!(
            "node: {node}\nnodes:\n  - {{ name: a, addresses: [{}] }}\n  - {{ name: b, addresses: [{}] }}\nnamespaces:\n  - {{ name: shop, dataplaneMode: mesh }}\npods:\n{}{}{}{}{}services:\n{}{}{}{authz}{peer_authn}",
            self.a.ipv4(),
            self.b.ipv4(),
            pod(&self.client, "shop", "client"),
            pod(&self.near, "shop", "web"),
            pod(&self.server, "shop", "web"),
            pod(&self.outsider, "plain", "default"),
            pod(&self.gateway, "shop", "gateway"),
            svc("web", WEB_VIP, &self.server, APP_PORT),
            svc("near", NEAR_VIP, &self.near, APP_PORT),
            svc("api", API_VIP, &self.server, HTTP_PORT),
        )
    }

    fn file(&self, node: &str) -> PathBuf {
        self.work.join(format!("mesh-{node}.yaml"))
    }

    fn write_cluster(&self, authz: &str, peer_authn: &str) -> Result<()> {
        for node in ["a", "b", "ca"] {
            write_atomically(
                &self.file(node),
                &self.cluster_yaml(node, authz, peer_authn),
            )?;
        }
        Ok(())
    }

    fn ca_setup(&self) -> CaSetup {
        CaSetup {
            node: self.a.clone(),
            dir: self.ca_dir.clone(),
            static_pods: self.file("ca"),
            ttl: self.ca_ttl.to_owned(),
        }
    }

    fn start_ca(&mut self) -> Result<()> {
        self.ca = Some(self.ca_setup().start()?);
        Ok(())
    }

    fn start_agent(&self, node: &NodeHandle) -> Result<AgentProcess> {
        let mut agent = AgentProcess::new(
            node.clone(),
            self.file(node.name()),
            self.cluster.bpffs_dir()?.join(node.name()),
            self.work.join(format!("admin-{}.sock", node.name())),
        );
        "info".clone_into(&mut agent.log_filter);
        agent.env = self.ca_setup().agent_env(node, &self.work)?;
        agent.start()?;
        Ok(agent)
    }

    /// Waits until every enrolled pod of each node has a valid certificate.
    fn wait_for_certificates(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for agent in &self.agents {
            loop {
                let v = agent.meshctl_json(&["identities"])?;
                let rows = v.as_array().context("identities is a list")?;
                let pending: Vec<&serde_json::Value> = rows
                    .iter()
                    .filter(|r| {
                        r["cert_state"] != "valid"
                            && r["cert_state"] != "renewing"
                            && r["cert_state"] != "not-enrolled"
                    })
                    .collect();
                if !rows.is_empty() && pending.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("certificates not issued: {v}\n{}", agent.stderr());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    fn counter(&self, node: usize, name: &str) -> u64 {
        self.agents[node]
            .meshctl_json(&["status"])
            .ok()
            .and_then(|s| s["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// Waits for a kernel counter to reach `min` (status reads counters about once a second).
    fn counted(&self, node: usize, name: &str, min: u64) -> Result<()> {
        Self::eventually(&format!("{name} >= {min} on node {node}"), || {
            self.counter(node, name) >= min
        })
    }

    fn proxy_counter(&self, node: usize, name: &str) -> u64 {
        self.agents[node]
            .meshctl_json(&["tunnels"])
            .ok()
            .and_then(|s| s["counters"][name].as_u64())
            .unwrap_or(0)
    }

    /// Istio's TCP metrics of the client → server tunnel on both nodes: reported by each proxy
    /// (`reporter` source on a, destination on b) as `mutual_tls` with both principals — the
    /// kernel does not see captured connections — with the request (`payload` bytes) and the
    /// response (banner and echo) counted.
    fn tunnel_metrics_reported(&self, payload: usize) -> Result<()> {
        let payload = f64::from(u32::try_from(payload)?);
        for (node, reporter) in [(&self.a, "source"), (&self.b, "destination")] {
            let labels = [
                ("reporter", reporter),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", CLIENT_ID),
                ("destination_principal", WEB_ID),
                ("source_workload", "client"),
                ("destination_workload", "server"),
            ];
            Self::eventually(&format!("{reporter}'s tunnel metrics"), || {
                let text = scrape(node);
                sum(&text, "istio_tcp_connections_opened_total", &labels) >= 1.0
                    && sum(&text, "istio_tcp_connections_closed_total", &labels) >= 1.0
                    && sum(&text, "istio_tcp_received_bytes_total", &labels) >= payload
                    && sum(&text, "istio_tcp_sent_bytes_total", &labels) >= payload
            })?;
        }
        Ok(())
    }

    /// Polls `f` every 100 ms for up to 10 s (agents reload their file every 500 ms).
    fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if f() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("timed out waiting until {what}")
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for a in &mut self.agents {
            a.kill();
        }
        if let Some(ca) = self.ca.as_mut() {
            ca.kill();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Sends `payload` from `pod` to `to` and reads the banner and echo back.
fn exchange(pod: &PodHandle, to: SocketAddr, payload: &'static str) -> Result<String> {
    pod.run(move || -> std::result::Result<String, String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        s.write_all(payload.as_bytes()).map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .map_err(|e| format!("read from {to}: {e} (got {out:?})"))?;
        Ok(out)
    })?
    .map_err(anyhow::Error::msg)
}

/// `curl` from node a (outside the mesh, as a client of a `LoadBalancer`) to the gateway:
/// (status, body).
fn via_gateway(mesh: &Mesh) -> Result<(String, String)> {
    let mut cmd = mesh.a.command("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-H",
        "Host: api",
        "-w",
        " %{http_code}",
    ])
    .arg(format!("http://{}:{GW_PORT}/", mesh.gateway.ipv4()));
    let o = mesh.a.output(cmd)?;
    let text = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let (body, code) = text.rsplit_once(' ').unwrap_or(("", &text));
    Ok((code.to_owned(), body.trim().to_owned()))
}

fn deny_gateway() -> &'static str {
    "authorizationPolicies:\n  - apiVersion: security.kernmesh.io/v1alpha1\n    kind: AuthorizationPolicy\n    metadata: { name: no-gateway, namespace: shop }\n    spec:\n      action: DENY\n      rules: [{ from: [{ source: { principals: [cluster.local/ns/shop/sa/gateway] } }] }]\n"
}

/// Issue 10's "enrolled backends are reached over the mesh's mTLS with the gateway's own
/// identity, so authorization policy applies": the gateway runs as a pod of an enrolled
/// namespace (as an Istio ambient ingress gateway in an ambient namespace), so the kernel
/// captures its connects to backends on other nodes and the node's proxy tunnels them with
/// the gateway's workload certificate. The backend's node logs that identity, and a DENY on it
/// turns the gateway's answers into 5xx while the client pod keeps its access.
#[test]
fn the_gateway_reaches_enrolled_backends_with_its_own_identity() -> Result<()> {
    let Some(_k) = mesh_tests::kernel_test("mtls_gateway") else {
        return Ok(());
    };
    let mesh = Mesh::new("mtls_gateway", "24h")?;
    mesh.wait_for_certificates()?;
    let routes = mesh.work.join("routes.yaml");
    write_atomically(
        &routes,
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{ name: gw, namespace: shop }}\nspec:\n  gatewayClassName: mesh\n  listeners:\n    - {{ name: http, port: {GW_PORT}, protocol: HTTP }}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: api, namespace: shop }}\nspec:\n  parentRefs: [{{ name: gw }}]\n  hostnames: [api]\n  rules:\n    - backendRefs: [{{ name: api, port: 80 }}]\n"
        ),
    )?;
    let mut cmd = mesh
        .gateway
        .command(mesh_tests::agent::workspace_binary("mesh-agent")?);
    cmd.arg("gateway")
        .arg("--routes")
        .arg(&routes)
        .arg("--config-file")
        .arg(mesh.file("a"))
        .args(["--listen-address", &mesh.gateway.ipv4().to_string()])
        .args(["--metrics-addr", "none", "--access-log", "false"])
        .env("RUST_LOG", "info");
    let _gw = mesh.gateway.spawn(cmd)?;
    Mesh::eventually("the gateway answers through the tunnel", || {
        via_gateway(&mesh).is_ok_and(|(code, body)| code == "200" && body == "api")
    })?;
    let b_log = mesh.agents[1].stderr();
    ensure!(
        b_log
            .lines()
            .any(|l| l.contains("HBONE stream admitted") && l.contains(GATEWAY_ID)),
        "B's agent did not admit the gateway's identity: {b_log}"
    );
    ensure!(
        mesh.agents[0].meshctl_json(&["tunnels"])?["tunnels"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["source_identity"] == GATEWAY_ID)),
        "no tunnel with the gateway's identity on a"
    );

    // A DENY on the gateway's principal: its requests fail, the client pod's do not.
    mesh.write_cluster(deny_gateway(), "")?;
    Mesh::eventually("the gateway's backend connects are denied", || {
        via_gateway(&mesh).is_ok_and(|(code, _)| code.starts_with('5'))
    })?;
    ensure!(
        mesh.agents[1]
            .stderr()
            .lines()
            .any(|l| l.contains("denied") && l.contains(GATEWAY_ID)),
        "the denial names the gateway"
    );
    ensure!(
        exchange(&mesh.client, SocketAddr::new(WEB_VIP.into(), 80), "still")?
            .starts_with("server peer="),
        "the client pod is not affected"
    );
    mesh.write_cluster("", "")?;
    Mesh::eventually("the gateway is allowed again", || {
        via_gateway(&mesh).is_ok_and(|(code, body)| code == "200" && body == "api")
    })?;
    Ok(())
}

fn deny_client() -> &'static str {
    "authorizationPolicies:\n  - apiVersion: security.kernmesh.io/v1alpha1\n    kind: AuthorizationPolicy\n    metadata: { name: no-client, namespace: shop }\n    spec:\n      action: DENY\n      rules: [{ from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }] }]\n"
}

#[test]
fn enrolled_pods_talk_mtls_across_nodes_and_policy_decides_on_both_paths() -> Result<()> {
    let Some(_k) = mesh_tests::kernel_test("mtls_e2e") else {
        return Ok(());
    };
    let mesh = Mesh::new("mtls_e2e", "24h")?;
    mesh.wait_for_certificates()?;
    let web = SocketAddr::new(WEB_VIP.into(), 80);
    let near = SocketAddr::new(NEAR_VIP.into(), 80);

    // Across nodes: through the tunnel, the server sees the client pod's own address, and the
    // link carries TLS 1.3 and none of the payload.
    let capture = Capture::start(mesh.b.netns_path())?;
    let answer = exchange(&mesh.client, web, PAYLOAD)?;
    let frames = capture.finish()?;
    let client_ip = mesh.client.ipv4();
    ensure!(
        answer.starts_with(&format!("server peer={client_ip}:")),
        "the server saw {answer:?}"
    );
    ensure!(answer.ends_with(PAYLOAD), "{answer:?}");
    ensure!(
        frames
            .iter()
            .any(|f| contains(f, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04])),
        "no TLS 1.3 ServerHello on the link"
    );
    ensure!(
        !frames.iter().any(|f| contains(f, PAYLOAD.as_bytes())),
        "payload visible on the link"
    );
    mesh.counted(0, "captured", 1)?;
    let b_log = mesh.agents[1].stderr();
    ensure!(
        b_log
            .lines()
            .any(|l| l.contains("HBONE stream admitted") && l.contains(CLIENT_ID)),
        "B's agent did not log the caller's identity: {b_log}"
    );
    let tunnels = mesh.agents[0].meshctl_json(&["tunnels"])?;
    ensure!(
        tunnels["tunnels"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["source_identity"] == CLIENT_ID)),
        "meshctl tunnels on a: {tunnels}"
    );
    // The tunnelled connection in Istio's TCP metrics, from both proxies.
    mesh.tunnel_metrics_reported(PAYLOAD.len())?;
    // Same node: no tunnel, plain connect; a pod outside the mesh still reaches mesh pods
    // (PERMISSIVE).
    ensure!(exchange(&mesh.client, near, "x")?.starts_with("near peer="));
    ensure!(
        exchange(
            &mesh.outsider,
            SocketAddr::new(mesh.server.ipv4().into(), APP_PORT),
            "x"
        )?
        .starts_with("server peer="),
        "plaintext from outside the mesh (PERMISSIVE)"
    );

    // DENY on the client's identity: refused across nodes by the inbound proxy, on the same
    // node by the kernel at connect() with EACCES; both counted.
    mesh.write_cluster(deny_client(), "")?;
    Mesh::eventually("the cross-node connect is denied", || {
        !exchange(&mesh.client, web, "denied?").is_ok_and(|a| a.starts_with("server"))
    })?;
    ensure!(
        mesh.proxy_counter(1, "inbound_denied") >= 1,
        "denial counted on b"
    );
    let b_log = mesh.agents[1].stderr();
    ensure!(
        b_log
            .lines()
            .any(|l| l.contains("denied") && l.contains(CLIENT_ID) && l.contains(WEB_ID)),
        "denial logged with both identities: {b_log}"
    );
    Mesh::eventually("the same-node connect is denied", || {
        connect_from(&mesh.client, near, Duration::from_secs(2)).errno == Some(libc::EACCES)
    })?;
    let c = connect_from(&mesh.client, near, Duration::from_secs(2));
    ensure!(c.elapsed_us < 100_000, "denied at once: {c:?}");
    mesh.counted(0, "same_node_deny", 1)?;

    // Removing it restores both.
    mesh.write_cluster("", "")?;
    Mesh::eventually("both paths are allowed again", || {
        exchange(&mesh.client, web, "back").is_ok_and(|a| a.starts_with("server peer="))
            && exchange(&mesh.client, near, "back").is_ok_and(|a| a.starts_with("near peer="))
    })?;

    // STRICT in the namespace: plaintext from outside the mesh is refused, on the same node
    // at connect() and from the other node at b's uplink; mesh traffic keeps flowing.
    mesh.write_cluster(
        "",
        "peerAuthentications:\n  - apiVersion: security.kernmesh.io/v1alpha1\n    kind: PeerAuthentication\n    metadata: { name: default, namespace: shop }\n    spec: { mtls: { mode: STRICT } }\n",
    )?;
    let near_pod = SocketAddr::new(mesh.near.ipv4().into(), APP_PORT);
    let server_pod = SocketAddr::new(mesh.server.ipv4().into(), APP_PORT);
    Mesh::eventually("plaintext to STRICT pods is refused", || {
        connect_from(&mesh.outsider, near_pod, Duration::from_secs(1)).errno == Some(libc::EACCES)
            && connect_from(&mesh.outsider, server_pod, Duration::from_secs(1))
                .line
                .is_none()
    })?;
    mesh.counted(0, "strict_refuse_local", 1)?;
    mesh.counted(1, "strict_refuse_remote", 1)?;
    ensure!(exchange(&mesh.client, web, "strict")?.starts_with("server peer="));
    Ok(())
}

#[test]
fn without_its_agent_a_node_fails_enrolled_connects_at_once_and_recovers() -> Result<()> {
    let Some(_k) = mesh_tests::kernel_test("mtls_sigkill") else {
        return Ok(());
    };
    let mut mesh = Mesh::new("mtls_sigkill", "24h")?;
    mesh.wait_for_certificates()?;
    let web = SocketAddr::new(WEB_VIP.into(), 80);
    ensure!(exchange(&mesh.client, web, "before")?.starts_with("server peer="));
    let before = tcp_in_segs(&mesh.server);
    mesh.agents[0].kill();
    for _ in 0..5 {
        let c = connect_from(&mesh.client, web, Duration::from_secs(2));
        ensure!(c.errno == Some(libc::ECONNREFUSED), "{c:?}");
        ensure!(c.elapsed_us < 100_000, "refused at once: {c:?}");
    }
    ensure!(
        tcp_in_segs(&mesh.server) == before,
        "the server pod received packets while a's agent was down (plaintext?)"
    );
    let a = mesh.a.clone();
    let agent = mesh.start_agent(&a)?;
    mesh.agents[0] = agent;
    mesh.wait_for_certificates()?;
    Mesh::eventually("enrolled connects work again", || {
        exchange(&mesh.client, web, "after").is_ok_and(|a| a.starts_with("server peer="))
    })?;
    Ok(())
}

#[test]
fn a_connection_outlives_three_certificate_rotations_and_a_ca_restart() -> Result<()> {
    let Some(_k) = mesh_tests::kernel_test("mtls_rotation") else {
        return Ok(());
    };
    let mut mesh = Mesh::new("mtls_rotation", "4s")?;
    mesh.wait_for_certificates()?;
    let web = SocketAddr::new(WEB_VIP.into(), 80);
    // One connection held open, a round trip every 200 ms, while certificates rotate at half
    // life (2 s) and the CA restarts in the middle.
    let mut cmd = mesh.client.meshpod()?;
    cmd.args(["rr", "--addr", &web.to_string()]).args([
        "--count",
        "65",
        "--size",
        "32",
        "--pause-ms",
        "200",
    ]);
    let holder = mesh.client.spawn(cmd)?;
    let serial = |mesh: &Mesh| -> Option<String> {
        let v = match mesh.agents[0].meshctl_json(&["identities"]) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("meshctl identities: {e:#}");
                return None;
            }
        };
        v.as_array()?
            .iter()
            .find(|r| r["spiffe_id"] == CLIENT_ID)
            .and_then(|r| r["serial"].as_str().map(str::to_owned))
    };
    let mut serials = std::collections::BTreeSet::new();
    let start = Instant::now();
    let mut restarted = false;
    while start.elapsed() < Duration::from_secs(13) {
        if let Some(s) = serial(&mesh) {
            serials.insert(s);
        }
        if !restarted && start.elapsed() > Duration::from_secs(5) {
            if let Some(mut ca) = mesh.ca.take() {
                ca.kill();
            }
            mesh.start_ca()?;
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = holder.finish(Duration::from_secs(20))?;
    let report: RrReport = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("rr report: {}", String::from_utf8_lossy(&out.stdout)))?;
    ensure!(
        report.error.is_none() && report.ok == 65 && report.name.starts_with("server"),
        "the held connection broke: {report:?}"
    );
    ensure!(
        serials.len() >= 4,
        "the client's certificate rotated {} times: {serials:?}\nagent a: {}\nCA: {}",
        serials.len().saturating_sub(1),
        mesh.agents[0].stderr(),
        mesh.ca
            .as_ref()
            .map(PodChild::stderr_text)
            .unwrap_or_default()
    );
    // A new connection after the rotations handshakes with the current certificates.
    ensure!(exchange(&mesh.client, web, "fresh")?.starts_with("server peer="));
    Ok(())
}
