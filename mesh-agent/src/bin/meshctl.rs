//! `meshctl`: inspect the node agent — status, services, backends, circuits, identities, config
//! and live flows — over its admin socket, or cluster-wide through the relay (`--server`). Habits
//! of `kubectl get`, `hubble observe` and `istioctl`/Kiali's graph (`top`, `map`).

use std::{fmt::Write as _, io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use mesh_agent::admin::proto::{
    ConfigDumpRequest, Flow, ListBackendsRequest, ListIdentitiesRequest, ListPoliciesRequest,
    ListPoliciesResponse, ListServicesRequest, ListTunnelsRequest, ServiceInfo, StatusRequest,
    WatchFlowsRequest, admin_client::AdminClient,
};
use mesh_agent::relay::{
    self,
    graph::{Edge, Graph},
};
use serde::Serialize;
use tonic::transport::Channel;

/// Inspect the mesh's node agent.
#[derive(Parser)]
#[command(name = "meshctl", version, about)]
struct Cli {
    /// The agent's admin socket.
    #[arg(long, global = true, env = "MESH_ADMIN_SOCKET", default_value = mesh_agent::config::DEFAULT_ADMIN_SOCKET)]
    socket: PathBuf,
    /// Talk to a relay (or an agent's TCP flow API) at `host:port` instead of the local socket,
    /// as `hubble --server relay:4245`: `flows`, `top` and `map` then cover the whole cluster.
    #[arg(long, global = true, env = "MESH_SERVER")]
    server: Option<String>,
    /// Output format (`dot` and `svg` for `map`).
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Services (or backends) fetched per call; lists page through transparently, as
    /// `kubectl get --chunk-size` (0 = the agent's default, 500).
    #[arg(long, global = true, default_value_t = 500)]
    chunk_size: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
    Dot,
    Svg,
}

#[derive(Subcommand)]
enum Command {
    /// Agent health, source and kernel counters.
    Status,
    /// The ingress gateway's routes: parents, hostnames, rules → backends (weights) and their
    /// `Accepted`/`ResolvedRefs` status, read from the gateway's admin port (`/routes`), as
    /// `kubectl get httproute` + `istioctl x describe` would show them (file or Kubernetes).
    Routes {
        /// The gateway's metrics/admin address.
        #[arg(long, env = "MESH_GATEWAY", default_value = "http://127.0.0.1:15020")]
        gateway: String,
    },
    /// Services in the data path.
    Services,
    /// Backends of a service, with circuit state and kernel counters.
    Backends {
        /// `name` or `namespace/name`.
        service: String,
    },
    /// Backends whose circuit is open or half-open (all services).
    Circuits {
        /// Show closed circuits too.
        #[arg(long)]
        all: bool,
    },
    /// Workload identities on this node.
    Identities,
    /// Which traffic policy applies to each service and why (and the policies that do not).
    Policies,
    /// Flow events: recent, then live with --follow.
    Flows {
        #[arg(short, long)]
        follow: bool,
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// `name` or `namespace/name`.
        #[arg(long)]
        service: Option<String>,
        /// open | close | reject | fail | eject | recover
        #[arg(long)]
        verdict: Option<String>,
        /// Only flows newer than this (e.g. 30s, 5m).
        #[arg(long)]
        since: Option<String>,
    },
    /// Busiest and failing workload → service pairs over a window (from the flows).
    Top {
        /// The window (e.g. 30s, 5m): flows newer than this count.
        #[arg(long, default_value = "1m")]
        window: String,
        /// Rows per table.
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// The service graph over a window: workloads and services with connection rate, error
    /// rate and p99 per edge (`-o dot|svg|json` for a picture or a program).
    Map {
        #[arg(long, default_value = "1m")]
        window: String,
    },
    /// HBONE tunnels: pooled connections (peer node, identities, age), streams open/total,
    /// bytes each way, and the proxies' counters.
    Tunnels,
    /// The agent's running configuration (JSON).
    Config,
    /// Print a shell completion script.
    Completion { shell: clap_complete::Shell },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(socket: PathBuf, server: Option<String>) -> Result<AdminClient<Channel>> {
    if let Some(server) = server {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
            .with_context(|| format!("--server {server:?}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot reach the relay at {server}"))?;
        return Ok(AdminClient::new(channel));
    }
    mesh_agent::admin::connect(&socket).await.with_context(|| {
        format!(
            "cannot reach the mesh agent at {} (is it running on this node, and are you root?)",
            socket.display()
        )
    })
}

#[expect(
    clippy::too_many_lines,
    reason = "one short arm per subcommand reads best in one place"
)]
async fn run(cli: Cli) -> Result<()> {
    if let Command::Completion { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "meshctl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    if let Command::Routes { gateway } = &cli.command {
        return routes(gateway, cli.output).await;
    }
    let mut client = connect(cli.socket, cli.server).await?;
    let out = cli.output;
    let chunk = cli.chunk_size;
    match cli.command {
        Command::Status => status(&mut client, out).await,
        Command::Services => {
            let services = list_services(&mut client, chunk).await?;
            print(out, &services, || {
                table(
                    &[
                        "NAMESPACE",
                        "NAME",
                        "ADDRESS",
                        "PROTO",
                        "LB",
                        "BACKENDS",
                        "MAX-CONN",
                        "EJECT-AFTER",
                        "EJECT-TIME",
                    ],
                    services
                        .iter()
                        .map(|s| {
                            vec![
                                s.namespace.clone(),
                                s.name.clone(),
                                s.address.clone(),
                                s.protocol.clone(),
                                s.algorithm.clone(),
                                s.backends.to_string(),
                                s.max_connections.to_string(),
                                s.consecutive_failures.to_string(),
                                format!("{}ms", s.base_ejection_ms),
                            ]
                        })
                        .collect(),
                )
            })
        }
        Command::Backends { service } => backends(&mut client, out, chunk, service, false).await,
        Command::Circuits { all } => backends(&mut client, out, chunk, String::new(), !all).await,
        Command::Identities => {
            let r = client
                .list_identities(ListIdentitiesRequest {})
                .await?
                .into_inner();
            print(out, &r.identities, || {
                table(
                    &[
                        "NAMESPACE",
                        "POD",
                        "SERVICE-ACCOUNT",
                        "SPIFFE-ID",
                        "ADDRESSES",
                        "SERIAL",
                        "NOT-BEFORE",
                        "NOT-AFTER",
                        "STATE",
                    ],
                    r.identities
                        .iter()
                        .map(|i| {
                            vec![
                                i.namespace.clone(),
                                i.pod.clone(),
                                i.service_account.clone(),
                                i.spiffe_id.clone(),
                                i.addresses.join(","),
                                i.serial.clone(),
                                i.not_before.clone(),
                                i.not_after.clone(),
                                i.cert_state.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        Command::Tunnels => {
            let r = client
                .list_tunnels(ListTunnelsRequest {})
                .await?
                .into_inner();
            print(out, &r, || {
                let mut text = table(
                    &[
                        "DIRECTION",
                        "PEER",
                        "SOURCE",
                        "DESTINATION",
                        "AGE",
                        "STREAMS",
                        "TOTAL",
                        "SENT",
                        "RECEIVED",
                    ],
                    r.tunnels
                        .iter()
                        .map(|t| {
                            vec![
                                t.direction.clone(),
                                t.peer.clone(),
                                t.source_identity.clone(),
                                t.destination_identity.clone(),
                                format!("{}s", t.age_seconds),
                                t.streams_open.to_string(),
                                t.streams_total.to_string(),
                                t.bytes_sent.to_string(),
                                t.bytes_received.to_string(),
                            ]
                        })
                        .collect(),
                );
                let mut counters: Vec<_> = r.counters.iter().filter(|(_, v)| **v > 0).collect();
                counters.sort();
                for (name, value) in counters {
                    let _ = writeln!(text, "{name}: {value}");
                }
                text
            })
        }
        Command::Policies => {
            let r = client
                .list_policies(ListPoliciesRequest {})
                .await?
                .into_inner();
            print(out, &r, || policies_tables(&r))
        }
        Command::Config => {
            let r = client.config_dump(ConfigDumpRequest {}).await?.into_inner();
            let v: serde_json::Value = serde_json::from_str(&r.json)?;
            match out {
                Output::Yaml => print!("{}", serde_saphyr::to_string(&v)?),
                _ => println!("{}", serde_json::to_string_pretty(&v)?),
            }
            Ok(())
        }
        Command::Flows {
            follow,
            namespace,
            pod,
            service,
            verdict,
            since,
        } => {
            let since_seconds = match since {
                Some(s) => humantime::parse_duration(&s)
                    .with_context(|| format!("--since {s:?}"))?
                    .as_secs()
                    .max(1),
                None => 0,
            };
            let req = WatchFlowsRequest {
                namespace: namespace.unwrap_or_default(),
                pod: pod.unwrap_or_default(),
                service: service.unwrap_or_default(),
                verdict: verdict.unwrap_or_default(),
                since_seconds,
                follow,
            };
            let mut stream = client.watch_flows(req).await?.into_inner();
            if matches!(out, Output::Table) {
                println!("{}", flow_row(None));
            }
            while let Some(flow) = stream.message().await? {
                match out {
                    Output::Table | Output::Dot | Output::Svg => {
                        println!("{}", flow_row(Some(&flow)));
                    }
                    Output::Json => println!("{}", serde_json::to_string(&flow)?),
                    Output::Yaml => print!("---\n{}", serde_saphyr::to_string(&flow)?),
                }
                std::io::stdout().flush()?;
            }
            Ok(())
        }
        Command::Top { window, limit } => {
            let graph = graph(&mut client, &window).await?;
            print(out, &graph, || top_tables(&graph, limit))
        }
        Command::Map { window } => {
            let graph = graph(&mut client, &window).await?;
            match out {
                Output::Dot => print!("{}", graph.to_dot()),
                Output::Svg => print!("{}", svg(&graph)),
                _ => print(out, &graph, || map_table(&graph))?,
            }
            Ok(())
        }
        Command::Completion { .. } | Command::Routes { .. } => unreachable!("handled above"),
    }
}

/// The graph of the flows newer than `window` (the agent's, or the relay's whole cluster).
async fn graph(client: &mut AdminClient<Channel>, window: &str) -> Result<Graph> {
    let window =
        humantime::parse_duration(window).with_context(|| format!("--window {window:?}"))?;
    let since_seconds = window.as_secs().max(1);
    let mut stream = client
        .watch_flows(WatchFlowsRequest {
            since_seconds,
            ..WatchFlowsRequest::default()
        })
        .await?
        .into_inner();
    let mut flows = Vec::new();
    while let Some(f) = stream.message().await? {
        flows.push(f);
    }
    Ok(relay::graph::build(&flows, window.as_secs_f64().max(1.0)))
}

fn edge_rows(edges: &[&Edge], limit: usize) -> Vec<Vec<String>> {
    edges
        .iter()
        .take(limit)
        .map(|e| {
            vec![
                e.source.clone(),
                e.destination.clone(),
                e.attempts.to_string(),
                format!("{:.2}", e.connection_rate),
                e.error_total().to_string(),
                format!("{:.1}%", e.error_rate * 100.0),
                e.errors
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{:.1}ms", e.p99_duration_ms),
            ]
        })
        .collect()
}

const EDGE_HEADERS: [&str; 8] = [
    "SOURCE",
    "DESTINATION",
    "CONNS",
    "CONN/S",
    "ERRORS",
    "ERR%",
    "REASONS",
    "P99",
];

/// `meshctl top`: the busiest pairs, then the failing ones.
fn top_tables(g: &Graph, limit: usize) -> String {
    format!(
        "BUSIEST ({} flows over {}s)\n{}\nFAILING\n{}",
        g.flows,
        g.window_seconds,
        table(&EDGE_HEADERS, edge_rows(&g.busiest(), limit)),
        table(&EDGE_HEADERS, edge_rows(&g.failing(), limit))
    )
}

/// `meshctl map`: nodes (with open circuits), then every edge.
fn map_table(g: &Graph) -> String {
    let nodes = table(
        &["NODE", "KIND", "OPEN-CIRCUITS"],
        g.nodes
            .iter()
            .map(|n| vec![n.id.clone(), n.kind.to_owned(), n.open_circuits.to_string()])
            .collect(),
    );
    let edges: Vec<&Edge> = g.edges.iter().collect();
    format!(
        "{nodes}\n{}",
        table(&EDGE_HEADERS, edge_rows(&edges, usize::MAX))
    )
}

/// SVG by Graphviz when `dot` is installed (better layout), else our own.
fn svg(g: &Graph) -> String {
    let rendered = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(g.to_dot().as_bytes())?;
            }
            child.wait_with_output()
        });
    match rendered {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => g.to_svg(),
    }
}

async fn status(client: &mut AdminClient<Channel>, out: Output) -> Result<()> {
    let s = client.status(StatusRequest {}).await?.into_inner();
    print(out, &s, || {
        let mut rows = vec![
            vec!["node".into(), s.node.clone()],
            vec![
                "ready".into(),
                if s.ready {
                    "true".into()
                } else {
                    format!("false ({})", s.not_ready_reason)
                },
            ],
            vec!["source".into(), s.source.clone()],
            vec!["uptime".into(), format!("{}s", s.uptime_seconds)],
            vec!["services".into(), s.services.to_string()],
            vec!["backends".into(), s.backends.to_string()],
            vec![
                "model".into(),
                format!(
                    "generation {}, in the kernel for {}",
                    s.model_generation,
                    age(s.model_age_ms)
                ),
            ],
            vec!["cgroup".into(), s.cgroup.clone()],
            vec!["pins".into(), s.pin_dir.clone()],
            vec!["map full errors".into(), s.map_full_total.to_string()],
            vec![
                "lb table memory".into(),
                format!("{} KiB", s.lb_table_bytes / 1024),
            ],
            vec![
                "backends in quarantine".into(),
                s.retired_backends.to_string(),
            ],
            vec![
                "flows".into(),
                format!(
                    "{} received, {} missed by slow watchers",
                    s.flows_received_total, s.flows_lagged_total
                ),
            ],
        ];
        for src in &s.sources {
            let mut v = src.state.clone();
            if !src.reason.is_empty() {
                let _ = write!(v, ": {}", src.reason);
            }
            if src.synced {
                let _ = write!(v, ", last sync {} ago", age(src.last_sync_age_ms));
            } else {
                v.push_str(", never synced");
            }
            if src.restarts > 0 {
                let _ = write!(
                    v,
                    ", {} restarts (last failure: {})",
                    src.restarts, src.last_error
                );
            }
            rows.push(vec![format!("source {}", src.name), v]);
        }
        if s.rejections.is_empty() {
            rows.push(vec!["rejections".into(), "-".into()]);
        }
        for r in &s.rejections {
            rows.push(vec![
                format!("rejected {}", r.key),
                format!("{} ({} ago)", r.message, age(r.age_seconds * 1000)),
            ]);
        }
        for e in &s.reconcile_errors {
            rows.push(vec!["reconcile error".into(), e.clone()]);
        }
        let mut counters: Vec<_> = s.counters.iter().filter(|(_, v)| **v > 0).collect();
        counters.sort();
        rows.extend(
            counters
                .into_iter()
                .map(|(k, v)| vec![format!("counter {k}"), v.to_string()]),
        );
        table(&["FIELD", "VALUE"], rows)
    })
}

/// Every service, page by page (`limit` per call) until the agent returns no continue token.
async fn list_services(client: &mut AdminClient<Channel>, limit: u32) -> Result<Vec<ServiceInfo>> {
    let mut services = Vec::new();
    let mut continue_token = String::new();
    loop {
        let page = client
            .list_services(ListServicesRequest {
                limit,
                continue_token,
            })
            .await?
            .into_inner();
        services.extend(page.services);
        if page.continue_token.is_empty() {
            return Ok(services);
        }
        continue_token = page.continue_token;
    }
}

async fn backends(
    client: &mut AdminClient<Channel>,
    out: Output,
    limit: u32,
    service: String,
    open_only: bool,
) -> Result<()> {
    let mut all = Vec::new();
    let mut continue_token = String::new();
    loop {
        let page = client
            .list_backends(ListBackendsRequest {
                service: service.clone(),
                open_only,
                limit,
                continue_token,
            })
            .await?
            .into_inner();
        all.extend(page.backends);
        if page.continue_token.is_empty() {
            break;
        }
        continue_token = page.continue_token;
    }
    print(out, &all, || {
        table(
            &[
                "SERVICE",
                "BACKEND",
                "CIRCUIT",
                "ACTIVE",
                "TOTAL",
                "FAILURES",
                "CONSEC",
                "EJECTIONS",
                "EJECTED-FOR",
            ],
            all.iter()
                .map(|b| {
                    vec![
                        b.service.clone(),
                        b.address.clone(),
                        b.circuit.clone(),
                        b.active.to_string(),
                        b.total.to_string(),
                        b.failures.to_string(),
                        b.consecutive_failures.to_string(),
                        b.ejections.to_string(),
                        if b.ejected_for_ms == 0 {
                            "-".into()
                        } else {
                            format!("{}ms", b.ejected_for_ms)
                        },
                    ]
                })
                .collect(),
        )
    })
}

/// `1.2s`, `3m 4s`: an age for a table.
fn age(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{}s", ms / 1000, ms % 1000 / 100)
    } else {
        humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
    }
}

fn flow_row(f: Option<&Flow>) -> String {
    let Some(f) = f else {
        return format!(
            "{:<15} {:<8} {:<28} {:<24} {:<22} {:<12} {}",
            "TIME", "VERDICT", "SOURCE", "SERVICE", "BACKEND", "REASON", "BYTES/DURATION"
        );
    };
    let secs = f.time_unix_nano / 1_000_000_000;
    let time = format!(
        "{:02}:{:02}:{:02}.{:06}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        (f.time_unix_nano / 1000) % 1_000_000
    );
    let source = if f.source_pod.is_empty() {
        if f.source_address.is_empty() {
            format!("cgroup:{}", f.cgroup_id)
        } else {
            f.source_address.clone()
        }
    } else {
        format!("{}/{}", f.source_namespace, f.source_pod)
    };
    let service = if f.service.is_empty() {
        f.service_address.clone()
    } else {
        f.service.clone()
    };
    let extra = if f.verdict == "close" {
        format!(
            "↑{} ↓{} {}µs",
            f.bytes_sent, f.bytes_received, f.duration_us
        )
    } else {
        String::new()
    };
    format!(
        "{time:<15} {:<8} {source:<28} {service:<24} {:<22} {:<12} {extra}",
        f.verdict, f.backend_address, f.reason
    )
}

/// Services with the policy that applies (or the defaults) and those that do not, then every
/// policy with its `Accepted` condition.
fn policies_tables(r: &ListPoliciesResponse) -> String {
    let services = table(
        &[
            "SERVICE",
            "POLICY",
            "VIA",
            "LB",
            "MAX-CONN",
            "EJECT-AFTER",
            "EJECT-TIME",
            "MAX-EJECT%",
            "PANIC%",
            "NOT APPLIED",
        ],
        r.services
            .iter()
            .map(|s| {
                vec![
                    s.service.clone(),
                    if s.policy.is_empty() {
                        "(defaults)".to_owned()
                    } else {
                        s.policy.clone()
                    },
                    s.via.clone(),
                    s.algorithm.clone(),
                    s.max_connections.to_string(),
                    s.consecutive_failures.to_string(),
                    format!("{}ms", s.base_ejection_ms),
                    s.max_ejection_percent.to_string(),
                    s.panic_threshold_percent.to_string(),
                    s.not_applied
                        .iter()
                        .map(|n| format!("{} ({}: {})", n.policy, n.reason, n.why))
                        .collect::<Vec<_>>()
                        .join("; "),
                ]
            })
            .collect(),
    );
    let policies = table(
        &["POLICY", "ACCEPTED", "REASON", "SERVICES", "MESSAGE"],
        r.policies
            .iter()
            .map(|p| {
                vec![
                    p.policy.clone(),
                    if p.accepted { "True" } else { "False" }.to_owned(),
                    p.reason.clone(),
                    p.services.to_string(),
                    p.message.clone(),
                ]
            })
            .collect(),
    );
    format!("{services}\n{policies}\n{}", security_tables(r))
}

/// Each pod's enrollment, identity, mTLS mode and authorization policies, every security
/// object, and the services out of the mesh (issue 9).
fn security_tables(r: &ListPoliciesResponse) -> String {
    let workloads = table(
        &[
            "POD",
            "MESH",
            "IDENTITY",
            "MTLS",
            "MODE FROM",
            "DENY",
            "ALLOW",
        ],
        r.workloads
            .iter()
            .map(|w| {
                vec![
                    w.pod.clone(),
                    if w.enrolled {
                        "yes".to_owned()
                    } else {
                        format!("no ({})", w.not_enrolled)
                    },
                    w.identity.clone(),
                    w.mtls_mode.clone(),
                    w.mode_from.clone(),
                    w.deny_policies.join(","),
                    w.allow_policies.join(","),
                ]
            })
            .collect(),
    );
    let security = table(
        &["KIND", "OBJECT", "ACCEPTED", "SELECTS", "MESSAGE"],
        r.security
            .iter()
            .map(|o| {
                vec![
                    o.kind.clone(),
                    o.object.clone(),
                    if o.accepted { "True" } else { "False" }.to_owned(),
                    o.selects.to_string(),
                    o.message.clone(),
                ]
            })
            .collect(),
    );
    let opted_out: Vec<&str> = r
        .services
        .iter()
        .filter(|s| s.mesh_opt_out)
        .map(|s| s.service.as_str())
        .collect();
    let opted_out = if opted_out.is_empty() {
        String::new()
    } else {
        format!(
            "\nservices out of the mesh (kernmesh.io/dataplane-mode=none): {}\n",
            opted_out.join(", ")
        )
    };
    format!("{workloads}\n{security}{opted_out}")
}

/// `meshctl routes`: fetches `/routes` from the gateway and prints it.
async fn routes(gateway: &str, out: Output) -> Result<()> {
    use http_body_util::BodyExt as _;
    use mesh_agent::gateway::status::RoutesReport;
    let url = format!("{}/routes", gateway.trim_end_matches('/'));
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("--gateway {gateway:?}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client
        .get(uri)
        .await
        .with_context(|| format!("fetching {url} (is the gateway's --metrics-addr there?)"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{url}: {status}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    let report: RoutesReport =
        serde_json::from_slice(&body).with_context(|| format!("{url}: not a routes report"))?;
    print(out, &report, || routes_table(&report))
}

/// `meshctl routes` as tables: routes, then listeners, then why each condition is not True.
fn routes_table(report: &mesh_agent::gateway::status::RoutesReport) -> String {
    use mesh_agent::gateway::status::Cond;
    let cond = |c: &Cond| format!("{}/{}", if c.status { "True" } else { "False" }, c.reason);
    let mut text = table(
        &[
            "ROUTE",
            "PARENTS",
            "HOSTNAMES",
            "RULES",
            "ACCEPTED",
            "RESOLVED-REFS",
        ],
        report
            .routes
            .iter()
            .map(|r| {
                let rules = r
                    .rules
                    .iter()
                    .map(|rule| {
                        let backends = rule
                            .backends
                            .iter()
                            .map(|b| format!("{} w{}", b.target, b.weight))
                            .chain(rule.filters.iter().cloned())
                            .collect::<Vec<_>>()
                            .join(", ");
                        format!("[{}] -> {backends}", rule.matches.join(" | "))
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                vec![
                    format!("{} {}", r.kind, r.name),
                    r.parents
                        .iter()
                        .map(|p| {
                            let mut s = p.gateway.to_string();
                            if let Some(sec) = &p.section {
                                s.push('/');
                                s.push_str(sec);
                            }
                            s
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    if r.hostnames.is_empty() {
                        "*".into()
                    } else {
                        r.hostnames.join(",")
                    },
                    rules,
                    r.parents
                        .iter()
                        .map(|p| cond(&p.accepted))
                        .collect::<Vec<_>>()
                        .join(","),
                    cond(&r.resolved_refs),
                ]
            })
            .collect(),
    );
    text.push('\n');
    text.push_str(&table(
        &[
            "GATEWAY",
            "LISTENER",
            "PORT",
            "PROTOCOL",
            "ROUTES",
            "ACCEPTED",
            "RESOLVED-REFS",
        ],
        report
            .gateways
            .iter()
            .flat_map(|g| {
                g.listeners.iter().map(move |l| {
                    vec![
                        g.name.to_string(),
                        l.name.clone(),
                        l.port.to_string(),
                        l.protocol.clone(),
                        l.attached_routes.to_string(),
                        cond(&l.accepted),
                        cond(&l.resolved_refs),
                    ]
                })
            })
            .collect(),
    ));
    let why = routes_why(report);
    if !why.is_empty() {
        text.push('\n');
        text.push_str(&why);
    }
    text
}

/// Why each condition of the report is not True (`kubectl describe`'s messages).
fn routes_why(report: &mesh_agent::gateway::status::RoutesReport) -> String {
    let mut why = String::new();
    for r in &report.routes {
        for p in r.parents.iter().filter(|p| !p.accepted.status) {
            let _ = writeln!(
                why,
                "{} {} (parent {}): Accepted=False {}: {}",
                r.kind, r.name, p.gateway, p.accepted.reason, p.accepted.message
            );
        }
        if !r.resolved_refs.status {
            let _ = writeln!(
                why,
                "{} {}: ResolvedRefs=False {}: {}",
                r.kind, r.name, r.resolved_refs.reason, r.resolved_refs.message
            );
        }
    }
    for g in &report.gateways {
        if !g.accepted.status || g.accepted.reason != "Accepted" {
            let _ = writeln!(
                why,
                "Gateway {}: Accepted={} {}: {}",
                g.name, g.accepted.status, g.accepted.reason, g.accepted.message
            );
        }
    }
    for r in &report.rejected {
        let _ = writeln!(why, "rejected: {r}");
    }
    why
}

fn print<T: Serialize>(out: Output, value: &T, table: impl FnOnce() -> String) -> Result<()> {
    match out {
        Output::Table | Output::Dot | Output::Svg => print!("{}", table()),
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
    }
    Ok(())
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("   ");
        s.truncate(s.trim_end().len());
        s + "\n"
    };
    let mut s = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        s += &line(r);
    }
    s
}
