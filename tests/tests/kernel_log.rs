//! Kernel-side aya-log messages reach the agent's `tracing` output: an ejection in the kernel
//! logs at debug level, and the record comes out of the subscriber the agent installs.

mod fixture;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::spec::{Algorithm, CircuitSettings, ServiceSpec};

/// A `tracing` writer into shared memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn kernel_debug_log_reaches_tracing() {
    let Some(_k) = mesh_tests::kernel_test("kernel_log_to_tracing") else {
        return;
    };
    let out = Captured::default();
    // SAFETY: set before any thread of this test binary reads the environment.
    unsafe { std::env::set_var("RUST_LOG", "info,mesh_ebpf=debug") };
    let writer = out.clone();
    mesh_agent::logging::init_with_writer(false, move || writer.clone());
    let mut m = Mesh::new("kernel_log_to_tracing", 1).expect("cluster");
    let mut logger = m.dp.take_logger().expect("the object logs with aya-log");
    let vip = vip4(80);
    let circuit = CircuitSettings {
        consecutive_failures: 1,
        base_ejection: Duration::from_secs(30),
        ..CircuitSettings::default()
    };
    let spec = ServiceSpec {
        algorithm: Algorithm::Random,
        circuit,
        ..ServiceSpec::tcp(vip, m.backend_addrs(80))
    };
    m.dp.apply_service(&spec).unwrap();
    m.servers.clear();
    let r = m.client.hit(vip, 1, &[]).unwrap();
    assert_eq!(r.errors.get("ECONNREFUSED").copied(), Some(1), "{r:?}");
    logger.flush();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.lines().any(|l| l.contains("DEBUG")
            && l.contains("mesh_ebpf")
            && l.contains("circuit opened")),
        "kernel log line in the tracing output:\n{text}"
    );
}
