//! The service graph built from flows: workloads → services with connection rate, error rate
//! and p99 duration per edge, and open circuits per service (`meshctl top|map`, the relay's map).
//!
//! Kiali draws the same graph from Istio's Prometheus metrics (`istio_tcp_connections_opened_total`
//! and `istio_requests_total` by `source_workload` → `destination_service`); Hubble UI draws it
//! from Hubble flows. We build it from flows, as Hubble does, over a window the caller chooses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use serde::Serialize;

use crate::admin::proto::Flow;

/// One endpoint of an edge.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Node {
    /// `namespace/name` of a workload or service, else an address.
    pub id: String,
    /// `workload` | `service` | `address`.
    pub kind: &'static str,
    /// Backends of this service whose last circuit event was an ejection (still open).
    pub open_circuits: u32,
}

/// Connections from one source workload to one destination service over the window.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Edge {
    pub source: String,
    pub destination: String,
    /// Connection attempts: opened, failed and refused by the mesh.
    pub attempts: u64,
    pub opened: u64,
    /// Failed by reason (`refused`, `reset`, `syn-timeout`, `l7`) and rejected by the mesh
    /// (`reject:<counter>`).
    pub errors: BTreeMap<String, u64>,
    /// Attempts per second over the window.
    pub connection_rate: f64,
    /// Errors over attempts, 0..=1.
    pub error_rate: f64,
    /// p99 of the closed connections' durations in milliseconds (flows carry no separate connect
    /// latency), 0 when none closed.
    pub p99_duration_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Edge {
    /// Errors of every kind.
    #[must_use]
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The graph over a window.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Graph {
    pub window_seconds: f64,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Flows read to build it.
    pub flows: u64,
}

/// The workload of a pod: Deployment pods are `<name>-<template hash>-<5 chars>`, `DaemonSet` and
/// Job pods `<name>-<5 chars>` (Kiali reads the owner instead; flows name only the pod).
/// `StatefulSet` pods (`web-0`) and bare pods keep their name.
#[must_use]
pub fn workload_of(pod: &str) -> &str {
    let random = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    let hash =
        |s: &str| (6..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric());
    let parts: Vec<&str> = pod.rsplitn(3, '-').collect();
    match parts.as_slice() {
        [last, mid, name] if random(last) && hash(mid) => &pod[..name.len()],
        [last, rest @ ..] if random(last) && !rest.is_empty() => &pod[..pod.len() - last.len() - 1],
        _ => pod,
    }
}

fn source_of(f: &Flow) -> (String, &'static str) {
    if !f.source_pod.is_empty() {
        (
            format!("{}/{}", f.source_namespace, workload_of(&f.source_pod)),
            "workload",
        )
    } else if !f.source_address.is_empty() {
        (f.source_address.clone(), "address")
    } else {
        ("unknown".to_owned(), "address")
    }
}

fn destination_of(f: &Flow) -> (String, &'static str) {
    if f.service.is_empty() {
        (f.service_address.clone(), "address")
    } else {
        (f.service.clone(), "service")
    }
}

/// Builds the graph of `flows` seen over `window_seconds` (rates divide by it; at least 1s).
#[must_use]
#[expect(
    clippy::cast_precision_loss,
    reason = "counts far below 2^52 turned into rates and ratios"
)]
pub fn build(flows: &[Flow], window_seconds: f64) -> Graph {
    let window = window_seconds.max(1.0);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), (Edge, Vec<u64>)> = BTreeMap::new();
    // Circuit state per (service, backend): the last event wins (flows arrive in time order
    // per agent; the relay merges agents by time).
    let mut circuits: BTreeMap<(String, String), bool> = BTreeMap::new();
    for f in flows {
        let (dst, dst_kind) = destination_of(f);
        nodes.entry(dst.clone()).or_insert_with(|| Node {
            id: dst.clone(),
            kind: dst_kind,
            open_circuits: 0,
        });
        match f.verdict.as_str() {
            "eject" | "recover" => {
                circuits.insert((dst, f.backend_address.clone()), f.verdict == "eject");
                continue;
            }
            "open" | "close" | "fail" | "reject" => {}
            _ => continue,
        }
        let (src, src_kind) = source_of(f);
        nodes.entry(src.clone()).or_insert_with(|| Node {
            id: src.clone(),
            kind: src_kind,
            open_circuits: 0,
        });
        let (edge, durations) = edges.entry((src.clone(), dst.clone())).or_insert_with(|| {
            (
                Edge {
                    source: src,
                    destination: dst,
                    ..Edge::default()
                },
                Vec::new(),
            )
        });
        match f.verdict.as_str() {
            "open" => {
                edge.attempts += 1;
                edge.opened += 1;
            }
            "close" => {
                durations.push(f.duration_us);
                edge.bytes_sent += f.bytes_sent;
                edge.bytes_received += f.bytes_received;
            }
            "fail" => {
                edge.attempts += 1;
                let reason = if f.reason.is_empty() {
                    "failed"
                } else {
                    &f.reason
                };
                *edge.errors.entry(reason.to_owned()).or_default() += 1;
            }
            _ => {
                edge.attempts += 1;
                *edge
                    .errors
                    .entry(format!("reject:{}", f.reason))
                    .or_default() += 1;
            }
        }
    }
    for ((service, _), open) in circuits {
        if let (true, Some(n)) = (open, nodes.get_mut(&service)) {
            n.open_circuits += 1;
        }
    }
    let edges = edges
        .into_values()
        .map(|(mut e, mut durations)| {
            e.connection_rate = e.attempts as f64 / window;
            e.error_rate = if e.attempts == 0 {
                0.0
            } else {
                e.error_total() as f64 / e.attempts as f64
            };
            e.p99_duration_ms = p99(&mut durations) as f64 / 1000.0;
            e
        })
        .collect();
    Graph {
        window_seconds: window,
        nodes: nodes.into_values().collect(),
        edges,
        flows: flows.len() as u64,
    }
}

/// The nearest-rank 99th percentile (0 for none).
fn p99(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    let rank = (values.len() * 99).div_ceil(100).max(1);
    values[rank - 1]
}

impl Graph {
    /// Edges busiest first (attempts, then errors), as `meshctl top` lists them.
    #[must_use]
    pub fn busiest(&self) -> Vec<&Edge> {
        let mut v: Vec<&Edge> = self.edges.iter().collect();
        v.sort_by(|a, b| {
            b.attempts
                .cmp(&a.attempts)
                .then(b.error_total().cmp(&a.error_total()))
                .then(a.source.cmp(&b.source))
                .then(a.destination.cmp(&b.destination))
        });
        v
    }

    /// Edges with errors, most errors first.
    #[must_use]
    pub fn failing(&self) -> Vec<&Edge> {
        let mut v: Vec<&Edge> = self.edges.iter().filter(|e| e.error_total() > 0).collect();
        v.sort_by(|a, b| {
            b.error_total()
                .cmp(&a.error_total())
                .then(b.error_rate.total_cmp(&a.error_rate))
                .then(a.source.cmp(&b.source))
        });
        v
    }

    /// The graph as Graphviz DOT: failing edges red, services with open circuits filled red.
    #[must_use]
    pub fn to_dot(&self) -> String {
        let mut s =
            String::from("digraph mesh {\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n");
        for n in &self.nodes {
            let shape = match n.kind {
                "service" => "box",
                "workload" => "ellipse",
                _ => "plaintext",
            };
            let style = if n.open_circuits > 0 {
                format!(
                    ", style=filled, fillcolor=\"#f8d0d0\", xlabel=\"{} open circuit(s)\"",
                    n.open_circuits
                )
            } else {
                String::new()
            };
            let _ = writeln!(s, "  {} [shape={shape}{style}];", quote(&n.id));
        }
        for e in &self.edges {
            let color = if e.error_total() > 0 { "red" } else { "black" };
            let _ = writeln!(
                s,
                "  {} -> {} [label={}, color={color}];",
                quote(&e.source),
                quote(&e.destination),
                quote(&edge_label(e))
            );
        }
        s.push_str("}\n");
        s
    }

    /// A simple SVG without Graphviz: sources left, destinations right, one line per edge.
    #[must_use]
    pub fn to_svg(&self) -> String {
        let left: BTreeSet<&str> = self.edges.iter().map(|e| e.source.as_str()).collect();
        let right: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| !left.contains(n.id.as_str()))
            .collect();
        let left: Vec<&str> = left.into_iter().collect();
        let row = 60;
        let height = 40 + row * left.len().max(right.len()).max(1);
        let y = |i: usize| 40 + row * i;
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"900\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n"
        );
        let pos = |id: &str| -> Option<(usize, usize)> {
            left.iter()
                .position(|l| *l == id)
                .map(|i| (200, y(i)))
                .or_else(|| right.iter().position(|n| n.id == id).map(|i| (650, y(i))))
        };
        for e in &self.edges {
            let (Some((x1, y1)), Some((x2, y2))) = (pos(&e.source), pos(&e.destination)) else {
                continue;
            };
            let color = if e.error_total() > 0 { "#d00" } else { "#555" };
            let _ = writeln!(
                s,
                "<line x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" stroke=\"{color}\"/><text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
                x1 + (x2 - x1) / 3,
                // A third of the way from the source, as the page (edges go up or down).
                if y2 >= y1 {
                    y1 + (y2 - y1) / 3
                } else {
                    y1 - (y1 - y2) / 3
                }
                .saturating_sub(4),
                xml(&edge_label(e))
            );
        }
        for (i, id) in left.iter().enumerate() {
            let _ = writeln!(
                s,
                "<rect x=\"20\" y=\"{}\" width=\"180\" height=\"24\" rx=\"12\" fill=\"#e8f0fe\" stroke=\"#36c\"/><text x=\"30\" y=\"{}\">{}</text>",
                y(i) - 12,
                y(i) + 4,
                xml(id)
            );
        }
        for (i, n) in right.iter().enumerate() {
            let fill = if n.open_circuits > 0 {
                "#f8d0d0"
            } else {
                "#eee"
            };
            let _ = writeln!(
                s,
                "<rect x=\"650\" y=\"{}\" width=\"230\" height=\"24\" fill=\"{fill}\" stroke=\"#333\"/><text x=\"660\" y=\"{}\">{}{}</text>",
                y(i) - 12,
                y(i) + 4,
                xml(&n.id),
                if n.open_circuits > 0 {
                    format!(" ({} open)", n.open_circuits)
                } else {
                    String::new()
                }
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// `3.2/s err 25% p99 12ms`.
#[must_use]
pub fn edge_label(e: &Edge) -> String {
    let mut s = format!("{:.2}/s", e.connection_rate);
    if e.error_total() > 0 {
        let _ = write!(s, " err {:.0}%", e.error_rate * 100.0);
    }
    if e.p99_duration_ms > 0.0 {
        let _ = write!(s, " p99 {:.1}ms", e.p99_duration_ms);
    }
    s
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: &str, pod: &str, service: &str, reason: &str, duration_us: u64) -> Flow {
        Flow {
            verdict: verdict.to_owned(),
            reason: reason.to_owned(),
            source_namespace: "shop".to_owned(),
            source_pod: pod.to_owned(),
            service: service.to_owned(),
            service_address: "10.96.0.10:80".to_owned(),
            backend_address: "10.1.0.7:8080".to_owned(),
            duration_us,
            ..Flow::default()
        }
    }

    #[test]
    fn workloads_are_named_without_the_generated_suffixes() {
        assert_eq!(workload_of("web-7d4b9c8f6d-x2x9q"), "web");
        assert_eq!(workload_of("node-agent-x2x9q"), "node-agent");
        assert_eq!(workload_of("db-0"), "db-0");
        assert_eq!(workload_of("client"), "client");
    }

    #[test]
    fn edges_count_attempts_errors_and_p99_and_circuits_mark_services() {
        let mut flows = Vec::new();
        for i in 0..100 {
            flows.push(flow("open", "client-7d4b9c8f6d-x2x9q", "shop/web", "", 0));
            flows.push(flow(
                "close",
                "client-7d4b9c8f6d-abcde",
                "shop/web",
                "",
                (i + 1) * 1000,
            ));
        }
        flows.push(flow(
            "fail",
            "client-7d4b9c8f6d-x2x9q",
            "shop/web",
            "refused",
            0,
        ));
        flows.push(flow(
            "reject",
            "client-7d4b9c8f6d-x2x9q",
            "shop/db",
            "no_backend",
            0,
        ));
        flows.push(flow("eject", "", "shop/web", "", 0));
        let g = build(&flows, 10.0);
        assert_eq!(g.edges.len(), 2);
        let web = &g.edges[1];
        assert_eq!(
            (web.source.as_str(), web.destination.as_str()),
            ("shop/client", "shop/web")
        );
        assert_eq!((web.attempts, web.opened, web.error_total()), (101, 100, 1));
        assert!((web.connection_rate - 10.1).abs() < 1e-9);
        assert!((web.p99_duration_ms - 99.0).abs() < 1e-9);
        assert_eq!(web.errors.get("refused"), Some(&1));
        let db = &g.edges[0];
        assert_eq!(db.errors.get("reject:no_backend"), Some(&1));
        assert!((db.error_rate - 1.0).abs() < 1e-9);
        let web_node = g.nodes.iter().find(|n| n.id == "shop/web").unwrap();
        assert_eq!((web_node.kind, web_node.open_circuits), ("service", 1));
        assert_eq!(g.failing()[0].destination, "shop/db");
        assert_eq!(g.busiest()[0].destination, "shop/web");
        let dot = g.to_dot();
        assert!(
            dot.contains("\"shop/client\" -> \"shop/db\" [label=\"0.10/s err 100%\", color=red]"),
            "{dot}"
        );
        assert!(g.to_svg().contains("shop/web (1 open)"));
        // A recovery closes the circuit again.
        flows.push(flow("recover", "", "shop/web", "", 0));
        assert_eq!(
            build(&flows, 10.0)
                .nodes
                .iter()
                .find(|n| n.id == "shop/web")
                .unwrap()
                .open_circuits,
            0
        );
    }
}
