//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can embed it (only
//! with the `datapath` feature), and generates the admin API from `proto/admin.proto` and the CA's from `proto/ca.proto`
//! (with a vendored `protoc`).

use std::path::PathBuf;

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    if std::env::var_os("CARGO_FEATURE_DATAPATH").is_none() {
        // Without the feature nothing may load the object (`app::run` refuses first), but
        // `datapath` still names it: embed an empty placeholder so `meshctl` and the library
        // build where no object exists.
        let placeholder = out.join("no-kernel-object");
        std::fs::write(&placeholder, b"").expect("writing to OUT_DIR");
        println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", placeholder.display());
        return;
    }
    let path = std::env::var_os("MESH_EBPF_OBJECT").map_or_else(
        || {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            manifest.join("../target/ebpf/bpfel-unknown-none/release/mesh")
        },
        PathBuf::from,
    );
    println!("cargo:rerun-if-changed={}", path.display());
    assert!(
        path.is_file(),
        "mesh-agent embeds the kernel object {}, which does not exist: run `cargo xtask build-ebpf` \
         first (or set MESH_EBPF_OBJECT to a built object; `meshctl` alone builds without it: \
         `cargo build -p mesh-agent --bin meshctl --no-default-features`)",
        path.display()
    );
    let path = path.canonicalize().expect("the object exists");
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", path.display());
}

fn compile_protos() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/admin.proto");
    println!("cargo:rerun-if-changed=proto/ca.proto");
    tonic_prost_build::configure()
        // meshctl prints the same messages as JSON and YAML.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/admin.proto"], &["proto"])
        .expect("compiling proto/admin.proto");
    // The CA's API (`identity::ca`): node agents are its only clients.
    tonic_prost_build::configure()
        .compile_protos(&["proto/ca.proto"], &["proto"])
        .expect("compiling proto/ca.proto");
}
