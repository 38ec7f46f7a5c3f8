//! Per-CPU reason counters (`COUNTERS`): every reject, drop and notable decision has one, exported
//! by the agent. Index = one of the constants below.

/// Map name: per-CPU array of `u64` indexed by reason.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// Capacity of [`COUNTERS_MAP`].
pub const COUNTERS_CAPACITY: u32 = 48;

/// connect/sendmsg to a service was translated to a backend.
pub const CTR_TRANSLATED: u32 = 0;
/// Rejected: the service has no backends (errno `EHOSTUNREACH`).
pub const CTR_REJECT_NO_BACKENDS: u32 = 1;
/// Rejected: every backend's circuit is open (errno `ECONNREFUSED`).
pub const CTR_REJECT_CIRCUIT_OPEN: u32 = 2;
/// Rejected: every eligible backend is at `max_connections` (errno `ECONNREFUSED`).
pub const CTR_REJECT_MAX_CONNECTIONS: u32 = 3;
/// A slot or table entry named a backend that is not (or no longer) in `BACKEND_ADDRS`, or one
/// of another service (agent mid-update, or a recycled element caught by validation); retried.
pub const CTR_BACKEND_MISSING: u32 = 4;
/// Socket storage could not be created; the connection is translated but not accounted.
pub const CTR_SOCK_STORAGE_FAILED: u32 = 5;
/// A flow event was dropped because the ring buffer was full.
pub const CTR_EVENT_DROPPED: u32 = 6;
/// A socket could not be added to the bypass sockhash (full?).
pub const CTR_BYPASS_INSERT_FAILED: u32 = 7;
/// An `sk_msg` redirect found no peer socket; the data took the normal path.
pub const CTR_BYPASS_MISS: u32 = 8;
/// The affinity map could not be updated.
pub const CTR_AFFINITY_UPDATE_FAILED: u32 = 9;
/// The UDP reverse-translation map could not be updated.
pub const CTR_REVNAT_UPDATE_FAILED: u32 = 10;
/// A backend was ejected (circuit opened).
pub const CTR_EJECTION: u32 = 11;
/// An ejection was skipped because `max_ejection_pct` was reached.
pub const CTR_EJECTION_SKIPPED_MAX_PCT: u32 = 12;
/// A half-open probe connection was let through.
pub const CTR_PROBE: u32 = 13;
/// A circuit closed again after a successful probe.
pub const CTR_RECOVERED: u32 = 14;
/// A connect to a backend failed (refused, SYN retransmit timeout).
pub const CTR_BACKEND_FAILURE: u32 = 15;
/// Socket pairs put on the same-node bypass.
pub const CTR_BYPASS_ESTABLISHED: u32 = 16;
/// Address family of the service and backend differ; connect left untouched.
pub const CTR_FAMILY_MISMATCH: u32 = 17;
/// A backend reset an established, translated connection (`tcp_receive_reset`).
pub const CTR_PEER_RESET: u32 = 18;
/// An affinity entry named a backend that is gone or no longer of its service; not used.
pub const CTR_AFFINITY_STALE: u32 = 19;
/// A slot below the service's backend count held no backend id (0); retried.
pub const CTR_SLOT_MISSING: u32 = 20;
/// A lookup-table chunk of the service's configuration was missing; retried.
pub const CTR_TABLE_MISSING: u32 = 21;
/// Every random pick was ineligible; a full scan chose among the eligible backends.
pub const CTR_RANDOM_EXHAUSTED: u32 = 22;
/// Fewer backends than the panic threshold were eligible: balanced over all of them.
pub const CTR_PANIC: u32 = 23;
/// The service's configuration vanished or changed under the lookup (agent switching); retried.
pub const CTR_CONF_STALE: u32 = 24;
/// A UDP datagram from a backend had no reverse-translation entry (its source stays the backend).
pub const CTR_REVNAT_MISS: u32 = 25;
/// An ejection could not reserve its share of `max_ejection_pct` under contention; not ejected.
pub const CTR_EJECTION_CONTENDED: u32 = 26;
/// A backend's state slot held another id (a socket outlived its backend); nothing counted there.
pub const CTR_STATE_STALE: u32 = 27;
/// An `AF_INET6` socket reached an IPv4 service through its v4-mapped address.
pub const CTR_V4_MAPPED: u32 = 28;
/// The client closed its own connect while the SYN was in flight: not held against the backend.
pub const CTR_CONNECT_ABANDONED: u32 = 29;
/// A connection established after a SYN retransmit: counted as the success it is.
pub const CTR_SYN_RETRY_RECOVERED: u32 = 30;
/// An enrolled pod's connect to an enrolled pod on another node was sent to the agent's outbound
/// listener (capture, `mesh::CAPTURE_PORT`).
pub const CTR_CAPTURED: u32 = 31;
/// An enrolled connect that had to be captured could not be (capture not configured, IPv6 without
/// a listener address, the record could not be written): refused with `ECONNREFUSED`, never sent
/// in plaintext.
pub const CTR_CAPTURE_MISS: u32 = 32;
/// A same-node enrolled connect denied by the identity policy (`EACCES`).
pub const CTR_SAME_NODE_DENY: u32 = 33;
/// Plaintext from a non-enrolled local pod to a `STRICT` pod refused at `connect()` (`EACCES`).
pub const CTR_STRICT_REFUSE_LOCAL: u32 = 34;
/// A new TCP connection (SYN) from the uplink to a `STRICT` pod dropped at ingress.
pub const CTR_STRICT_REFUSE_REMOTE: u32 = 35;

/// Names for each counter index, in order, for metrics and the CLI.
pub const COUNTER_NAMES: [&str; 36] = [
    "translated",
    "reject_no_backends",
    "reject_circuit_open",
    "reject_max_connections",
    "backend_missing",
    "sock_storage_failed",
    "event_dropped",
    "bypass_insert_failed",
    "bypass_miss",
    "affinity_update_failed",
    "revnat_update_failed",
    "ejection",
    "ejection_skipped_max_pct",
    "probe",
    "recovered",
    "backend_failure",
    "bypass_established",
    "family_mismatch",
    "peer_reset",
    "affinity_stale",
    "slot_missing",
    "table_missing",
    "random_exhausted",
    "panic",
    "conf_stale",
    "revnat_miss",
    "ejection_contended",
    "state_stale",
    "v4_mapped",
    "connect_abandoned",
    "syn_retry_recovered",
    "captured",
    "capture_miss",
    "same_node_deny",
    "strict_refuse_local",
    "strict_refuse_remote",
];
