//! One JSON line per finished connection (closed, rejected in the kernel, or failed to
//! connect), on stdout through `tracing` under the target [`ACCESS_TARGET`] (`logging` routes
//! that target, and only it, to stdout as flat JSON). Off by default, as Istio's access logs;
//! `--access-log true` (`MESH_ACCESS_LOG`, config key `telemetry.accessLog`) turns it on.
//!
//! Fields follow ztunnel's connection log (`src.addr`, `src.workload`, `src.namespace`,
//! `src.identity`, `dst.addr`, `dst.service`, `dst.workload`, `dst.namespace`, `dst.identity`,
//! `direction`, `bytes_sent`, `bytes_recv`, `duration`), plus `verdict` and `reason`.
//! `src.identity`/`dst.identity` are the SPIFFE ids of enrolled pods (`unknown` otherwise);
//! with `security = "none"` they say who the pods are, not that a certificate proved it.

use mesh_common::{
    PROTO_UDP,
    event::{EV_CLOSE, EV_FAIL, EV_REJECT},
};

pub use crate::logging::ACCESS_TARGET;
use crate::{flows::FlowRecord, model::ObjectName, state::Snapshot, telemetry::labels::UNKNOWN};

/// Writes the line for `flow` if it finished a connection.
pub fn log(flow: &FlowRecord, destination: Option<&ObjectName>, snapshot: &Snapshot) {
    let e = &flow.event;
    if !matches!(e.kind, EV_CLOSE | EV_REJECT | EV_FAIL) {
        return;
    }
    let identity = |pod: Option<&ObjectName>| {
        pod.and_then(|p| snapshot.mesh.enrolled.get(p))
            .map_or_else(|| UNKNOWN.to_owned(), |m| m.identity.to_string())
    };
    let src = flow.source.as_deref();
    let proto = flow.to_proto();
    tracing::info!(
        target: ACCESS_TARGET,
        direction = "outbound",
        src.addr = %proto.source_address,
        src.workload = src.map_or(UNKNOWN, |p| p.name.as_str()),
        src.namespace = src.map_or(UNKNOWN, |p| p.namespace.as_str()),
        src.identity = %identity(src),
        dst.addr = %proto.backend_address,
        dst.service = %flow
            .service
            .as_deref()
            .map_or_else(|| UNKNOWN.to_owned(), super::labels::service_fqdn),
        dst.service_addr = %proto.service_address,
        dst.workload = destination.map_or(UNKNOWN, |p| p.name.as_str()),
        dst.namespace = destination.map_or(UNKNOWN, |p| p.namespace.as_str()),
        dst.identity = %identity(destination),
        protocol = if e.proto == PROTO_UDP { "UDP" } else { "TCP" },
        bytes_sent = e.bytes_sent,
        bytes_recv = e.bytes_received,
        duration_ms = e.duration_ns as f64 / 1e6,
        verdict = proto.verdict.as_str(),
        reason = proto.reason.as_str(),
        // The kernel sees the connection in plaintext; the tunnel reports its own.
        security = "none",
        client_cgroup = e.cgroup_id,
        "connection complete"
    );
}
