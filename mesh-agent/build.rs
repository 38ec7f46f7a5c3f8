//! Locates the kernel object built by `cargo xtask build-ebpf` so the agent can embed it, and
//! generates the admin API from `proto/admin.proto` (with a vendored `protoc`).

use std::path::PathBuf;

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
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
         first (or set MESH_EBPF_OBJECT to a built object)",
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
    tonic_prost_build::configure()
        // meshctl prints the same messages as JSON and YAML.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/admin.proto"], &["proto"])
        .expect("compiling proto/admin.proto");
}
