//! Generates the tonic client and server of `proto/echo.proto` (the gRPC service the gateway's
//! real-client tests put behind the gateway), with the vendored `protoc` the agent uses too.

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/echo.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/echo.proto"], &["proto"])
        .expect("compiling proto/echo.proto");
}
