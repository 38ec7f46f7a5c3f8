//! The README's first command keeps working: runs the `mesh-demo` binary (as `cargo xtask demo`
//! does) and checks the story it tells actually happened.

#[test]
fn the_demo_runs_and_shows_what_it_promises() {
    let Some(_k) = mesh_tests::kernel_test("demo") else {
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .output()
        .expect("mesh-demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mesh-demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for promise in [
        r#"answers by backend: {"web-0": 10, "web-1": 10, "web-2": 10}"#,
        "getpeername(): true",
        r#"errors seen by the client: {"ECONNREFUSED": 3}"#,
        "open ",
        " recover ",
        "EHOSTUNREACH",
        "0 failed",
        "least-connections",
        "demo finished",
    ] {
        assert!(
            text.contains(promise),
            "the demo output lacks {promise:?}:\n{text}"
        );
    }
}
