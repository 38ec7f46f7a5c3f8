//! One JSON line per finished connection (closed, rejected in the kernel, or failed to
//! connect), on stdout with the target [`ACCESS_TARGET`]. Off by default, as Istio's access
//! logs; `--access-log true` (`MESH_ACCESS_LOG`, config key `telemetry.accessLog`) turns it on.
//!
//! The record is formatted once per connection ([`object`]) by the flow observer (on the ring
//! reader's thread) and serves both the stdout line and the OTLP record's body. Lines go into
//! the observer's own buffer of the process's access-log sink (`logging::AccessSink`) and are
//! written by the sink's flush thread in large writes — at most
//! `logging::ACCESS_FLUSH_INTERVAL` after they were made, in the order they were made, and
//! whatever is buffered when the agent stops (`SIGTERM`) or exits. A line that finds its buffer
//! full is dropped and counted (`mesh_access_log_dropped_total{reason="buffer_full"}`).
//!
//! Fields follow ztunnel's connection log (`src.addr`, `src.workload`, `src.namespace`,
//! `src.identity`, `dst.addr`, `dst.service`, `dst.workload`, `dst.namespace`, `dst.identity`,
//! `direction`, `bytes_sent`, `bytes_recv`, `duration`), plus `verdict` and `reason`.
//! `src.identity`/`dst.identity` are the SPIFFE ids of enrolled pods (`unknown` otherwise);
//! with `security = "none"` they say who the pods are, not that a certificate proved it.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use mesh_common::{
    PROTO_UDP,
    event::{EV_CLOSE, EV_FAIL, EV_REJECT},
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder};

pub use crate::logging::ACCESS_TARGET;
use crate::{
    flows::FlowRecord,
    logging::{AccessBuffer, AccessLine, AccessStats},
    model::ObjectName,
    state::Snapshot,
    telemetry::labels::{UNKNOWN, fqdn_parts},
};

/// The message of a connection's line and OTLP record.
pub const MESSAGE: &str = "connection complete";

/// Whether `flow` finished a connection (closed, rejected, failed): what gets a line.
#[must_use]
pub fn finishes(flow: &FlowRecord) -> bool {
    matches!(flow.event.kind, EV_CLOSE | EV_REJECT | EV_FAIL)
}

/// Appends the line for `flow` to `out` if it finished a connection.
pub fn log(
    out: &AccessBuffer,
    flow: &FlowRecord,
    destination: Option<&ObjectName>,
    snapshot: &Snapshot,
) {
    if finishes(flow) {
        out.line(MESSAGE, |l| fields(l, flow, destination, snapshot));
    }
}

/// Writes `{"message":"connection complete", FIELDS…}` for a finished `flow` into `out`: the
/// record both the stdout line ([`AccessBuffer::line_object`]) and the OTLP log record's body
/// are made of, formatted once.
pub fn object(
    out: &mut Vec<u8>,
    flow: &FlowRecord,
    destination: Option<&ObjectName>,
    snapshot: &Snapshot,
) {
    AccessLine::object(out, |l| {
        l.raw("message", MESSAGE);
        fields(l, flow, destination, snapshot);
    });
}

/// The fields of a finished connection.
fn fields(
    l: &mut AccessLine<'_>,
    flow: &FlowRecord,
    destination: Option<&ObjectName>,
    snapshot: &Snapshot,
) {
    let e = &flow.event;
    let identity = |pod: Option<&ObjectName>| {
        pod.and_then(|p| snapshot.mesh.enrolled.get(p))
            .map(|m| &m.identity)
    };
    let src = flow.source.as_deref();
    l.raw("direction", "outbound");
    match flow.client() {
        Some(c) => l.ip("src.addr", c),
        None => l.raw("src.addr", ""),
    }
    l.str("src.workload", src.map_or(UNKNOWN, |p| p.name.as_str()));
    l.str(
        "src.namespace",
        src.map_or(UNKNOWN, |p| p.namespace.as_str()),
    );
    match identity(src) {
        Some(id) => l.display("src.identity", id),
        None => l.str("src.identity", UNKNOWN),
    }
    match flow.backend_addr() {
        Some(b) => l.socket_addr("dst.addr", b),
        None => l.raw("dst.addr", ""),
    }
    match flow.service.as_deref() {
        // `name.namespace.svc.cluster.local` written in place (no `fmt` pass).
        Some(s) => l.str_parts("dst.service", &fqdn_parts(s)),
        None => l.str("dst.service", UNKNOWN),
    }
    l.socket_addr("dst.service_addr", flow.service_addr());
    l.str(
        "dst.workload",
        destination.map_or(UNKNOWN, |p| p.name.as_str()),
    );
    l.str(
        "dst.namespace",
        destination.map_or(UNKNOWN, |p| p.namespace.as_str()),
    );
    match identity(destination) {
        Some(id) => l.display("dst.identity", id),
        None => l.str("dst.identity", UNKNOWN),
    }
    l.raw("protocol", if e.proto == PROTO_UDP { "UDP" } else { "TCP" });
    l.u64("bytes_sent", e.bytes_sent);
    l.u64("bytes_recv", e.bytes_received);
    l.millis(
        "duration_ms",
        std::time::Duration::from_nanos(e.duration_ns),
    );
    l.raw("verdict", flow.verdict());
    l.str("reason", &flow.reason());
    // The kernel sees the connection in plaintext; the tunnel reports its own.
    l.raw("security", "none");
    l.u64("client_cgroup", e.cgroup_id);
}

/// The access-log sink's counters as `mesh_access_log_*` (lines written, dropped by reason).
#[derive(Debug, Clone)]
pub struct AccessLogMetrics(pub Arc<AccessStats>);

impl AccessLogMetrics {
    /// The process's sink's counters.
    #[must_use]
    pub fn global() -> Self {
        Self(Arc::clone(crate::logging::access_sink().stats()))
    }
}

impl Collector for AccessLogMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        super::counter(
            &mut enc,
            "mesh_access_log_lines",
            "Access lines handed to the flush thread's writes (counted when written, up to the flush interval after they were made; those whose write failed are also counted as dropped).",
            s.lines.load(Ordering::Relaxed),
        )?;
        super::counter_family(
            &mut enc,
            "mesh_access_log_dropped",
            "Access lines lost: their buffer was full (stdout not taking them), or the write failed.",
            [
                (
                    [("reason", "buffer_full")],
                    s.dropped_buffer_full.load(Ordering::Relaxed),
                ),
                (
                    [("reason", "write_failed")],
                    s.dropped_write_failed.load(Ordering::Relaxed),
                ),
            ],
        )?;
        super::counter(
            &mut enc,
            "mesh_access_log_writes",
            "Writes of buffered access lines to stdout.",
            s.writes.load(Ordering::Relaxed),
        )
    }
}
