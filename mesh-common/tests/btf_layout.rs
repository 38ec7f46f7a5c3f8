//! Checks every shared type against the BTF of the built kernel object (Cilium's "align
//! checker"): same size, same fields in the same order at the same offsets. A contract change
//! that was not rebuilt into the object, or a layout the two compilers disagree on, fails here.

use std::{collections::HashMap, path::PathBuf, process::Command};

use mesh_common::{
    backend::{BackendAddr, BackendState},
    bypass::{BypassBytes, EndpointKey, LocalEndpoint, SockKey},
    event::FlowEvent,
    mesh::{
        CaptureConfig, CaptureKey, Captured, MeshEndpoint, MeshEndpointKey, MeshWorkload,
        VerdictKey,
    },
    service::{AffinityKey, AffinityValue, LbChunk, Service, ServiceKey, ServiceState, TableKey},
    sock::{RevNatKey, RevNatValue, SockState},
};
use serde_json::Value;

/// The object `cargo xtask build-ebpf` writes (or `MESH_EBPF_OBJECT`).
fn object() -> PathBuf {
    std::env::var_os("MESH_EBPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/mesh")
        },
        PathBuf::from,
    )
}

/// Struct name → (size, [(member, byte offset)]), read with `bpftool btf dump -j`.
fn btf_structs() -> HashMap<String, (usize, Vec<(String, usize)>)> {
    let obj = object();
    assert!(
        obj.is_file(),
        "kernel object {} not found: run `cargo xtask build-ebpf` first",
        obj.display()
    );
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file"])
        .arg(&obj)
        .arg("-j")
        .output()
        .expect("running bpftool (install it: `cargo xtask install-deps`)");
    assert!(
        out.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).expect("bpftool printed JSON");
    let mut structs = HashMap::new();
    for t in dump["types"].as_array().expect("a `types` array") {
        if t["kind"] != "STRUCT" {
            continue;
        }
        let Some(name) = t["name"].as_str() else {
            continue;
        };
        let members = t["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                let bits = m["bits_offset"].as_u64().expect("bits_offset");
                (
                    m["name"].as_str().unwrap_or("").to_owned(),
                    (bits / 8) as usize,
                )
            })
            .collect();
        structs.insert(
            name.to_owned(),
            (t["size"].as_u64().expect("size") as usize, members),
        );
    }
    structs
}

macro_rules! layout {
    ($t:ident { $($f:ident),* $(,)? }) => {
        (
            stringify!($t),
            core::mem::size_of::<$t>(),
            vec![$((stringify!($f).to_owned(), core::mem::offset_of!($t, $f))),*],
        )
    };
}

#[test]
#[expect(clippy::too_many_lines, reason = "one line per field of the contract")]
fn every_shared_type_matches_the_objects_btf() {
    let btf = btf_structs();
    let expected = [
        layout!(MeshWorkload { identity, flags }),
        layout!(MeshEndpointKey {
            addr_be,
            family,
            _pad
        }),
        layout!(MeshEndpoint { identity, flags }),
        layout!(VerdictKey {
            src_identity,
            dst_identity,
            port_be,
            _pad
        }),
        layout!(CaptureConfig {
            addr6_be,
            addr4_be,
            port_be,
            _pad
        }),
        layout!(CaptureKey {
            addr_be,
            port_be,
            family,
            _pad
        }),
        layout!(Captured {
            cgroup_id,
            dst_addr_be,
            svc_addr_be,
            dst_port_be,
            svc_port_be,
            family,
            flags,
            _pad,
            src_identity,
            dst_identity
        }),
        layout!(ServiceKey {
            addr_be,
            port_be,
            proto,
            family
        }),
        layout!(Service {
            key,
            conf_id,
            id,
            backend_count,
            algorithm,
            flags,
            _pad,
            table_size,
            affinity_timeout_s,
            max_connections,
            consecutive_failures,
            base_ejection_ms,
            max_ejection_ms,
            max_ejection_pct,
            panic_threshold_pct,
            _pad2,
            slot_base
        }),
        layout!(TableKey { conf_id, chunk }),
        layout!(LbChunk { backend_ids }),
        layout!(ServiceState {
            rr_next,
            ejected,
            id,
            _pad
        }),
        layout!(AffinityKey {
            netns_cookie,
            service_id,
            _pad
        }),
        layout!(AffinityValue {
            last_used_ns,
            backend_id,
            _pad
        }),
        layout!(BackendAddr {
            id,
            service_id,
            addr_be,
            port_be,
            family,
            _pad,
            weight
        }),
        layout!(BackendState {
            active,
            total,
            failures,
            consecutive_failures,
            circuit,
            closed_since_ns,
            id,
            ejections
        }),
        layout!(SockState {
            start_ns,
            cgroup_id,
            probe_word,
            service_id,
            backend_id,
            svc_addr_be,
            backend_addr_be,
            svc_port_be,
            backend_port_be,
            flags,
            family,
            proto,
            flags2
        }),
        layout!(RevNatKey {
            cookie,
            backend_addr_be,
            backend_port_be,
            _pad
        }),
        layout!(RevNatValue {
            svc_addr_be,
            svc_port_be,
            _pad
        }),
        layout!(EndpointKey { addr_be }),
        layout!(LocalEndpoint { flags }),
        layout!(SockKey {
            local_addr_be,
            remote_addr_be,
            local_port_be,
            remote_port_be,
            family,
            _pad
        }),
        layout!(BypassBytes { sent, received }),
        layout!(FlowEvent {
            ts_ns,
            cookie,
            cgroup_id,
            duration_ns,
            bytes_sent,
            bytes_received,
            service_id,
            backend_id,
            svc_addr_be,
            backend_addr_be,
            client_addr_be,
            svc_port_be,
            backend_port_be,
            kind,
            reason,
            family,
            proto
        }),
    ];
    let mut problems = Vec::new();
    for (name, size, fields) in &expected {
        let Some((btf_size, btf_fields)) = btf.get(*name) else {
            problems.push(format!(
                "{name}: not in the object's BTF (unused by every map?)"
            ));
            continue;
        };
        if btf_size != size {
            problems.push(format!(
                "{name}: size {size} in Rust, {btf_size} in the object"
            ));
        }
        if btf_fields != fields {
            problems.push(format!("{name}: fields (name, offset) differ:\n  rust:   {fields:?}\n  object: {btf_fields:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "kernel and userspace disagree on {} type(s) — rebuild with `cargo xtask build-ebpf`, \
         and if it persists fix the contract:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
