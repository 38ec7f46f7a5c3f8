//! L7 outcome reports: the contract of `mesh_l7_report`, the kernel program the agent runs with
//! `BPF_PROG_TEST_RUN` so that a proxy's report moves a circuit with the very code (and the same
//! compare-and-swap transitions) that sockops uses.
//!
//! The program is never attached; a test run passes its arguments as the raw tracepoint's `u64`
//! arguments and returns one of the `REPORT_R_*` values.

/// Name of the program in the object.
pub const REPORT_PROGRAM: &str = "mesh_l7_report";

/// Argument 0: the backend id.
pub const REPORT_ARG_BACKEND: usize = 0;
/// Argument 1: a configuration id of the backend's service (the kernel follows it to the
/// service's current configuration and checks that it is the same service).
pub const REPORT_ARG_CONF: usize = 1;
/// Argument 2: one of `REPORT_KIND_*`.
pub const REPORT_ARG_KIND: usize = 2;
/// Argument 3: the time of the outcome, `CLOCK_MONOTONIC` ns (the clock `bpf_ktime_get_ns`
/// reads); 0 means "now" in the kernel.
pub const REPORT_ARG_NOW: usize = 3;
/// Arguments the program reads (the test run's `ctx_in` must hold at least these).
pub const REPORT_ARGS: usize = 4;

/// A failed request (Envoy's `consecutive_5xx` / gateway failure): counts like a refused connect.
pub const REPORT_KIND_FAILURE: u64 = 1;
/// A successful request: resets the consecutive failures, like a connection that closed cleanly.
pub const REPORT_KIND_SUCCESS: u64 = 2;

/// Counted; the circuit did not change state.
pub const REPORT_R_COUNTED: u32 = 0;
/// The report ejected the backend (its circuit opened).
pub const REPORT_R_EJECTED: u32 = 1;
/// The backend is not (or no longer) a backend of that service, or its state slot is another's.
pub const REPORT_R_UNKNOWN_BACKEND: u32 = 2;
/// The service of that configuration is gone or was replaced by another service.
pub const REPORT_R_UNKNOWN_SERVICE: u32 = 3;
/// The kind argument is none of `REPORT_KIND_*`.
pub const REPORT_R_BAD_KIND: u32 = 4;
