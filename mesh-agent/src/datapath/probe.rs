//! Kernel feature probe at start: every kernel feature the data path needs, the Linux release
//! that brought it, and either a documented fallback or one line naming what is missing.
//!
//! A kernel that lacks a helper rejects the whole object with a verifier log hundreds of lines
//! long; probing each feature first (as libbpf's `bpftool feature probe` and Cilium's
//! `probes.HaveProgramHelper` do) turns that into "kernel 5.15 lacks X; Linux 6.1 has it".
//! Program types, map types and helpers are probed through aya (`is_program_supported`,
//! `is_map_supported`, `is_helper_supported`: tiny programs the verifier accepts or names the
//! helper it does not know); cgroup links and BPF atomics with raw `bpf(2)` calls.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use tracing::{info, warn};

use super::bpfsys::{self, Insn};

/// How a feature is probed.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    /// The kernel's own BTF (`/sys/kernel/btf/vmlinux`).
    KernelBtf,
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// `BPF_LINK_CREATE` (cgroup links, pinnable, updatable in place).
    CgroupLinks,
    /// `BPF_ATOMIC` with `BPF_FETCH` (the object is built with `-C target-cpu=v3`).
    AtomicFetch,
    /// A cgroup `sock_addr` program for this attach type loads (the kernel knows the hook).
    SockAddrHook(u32),
    /// `BPF_PROG_TYPE_TRACING` with `BPF_TRACE_RAW_TP` (`tp_btf`). aya's
    /// `is_program_supported(Tracing)` errors on 6.18, so this is probed directly.
    TpBtf,
}

/// What the data path does without a feature it can live without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Do not attach `tp_btf/tcp_receive_reset`: a reset by the backend is then not told apart
    /// from the application's own abortive close, so it does not count as a failure (refused
    /// connects and SYN timeouts still do).
    NoResetTracepoint,
}

/// One kernel feature of the data path.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// What it is, as a user would search for it.
    pub name: &'static str,
    /// What the mesh uses it for.
    pub used_for: &'static str,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// The kernel commit (or document) that says so.
    pub reference: &'static str,
    pub check: Check,
    /// `None`: the agent cannot run without it.
    pub fallback: Option<Fallback>,
}

const fn feature(
    name: &'static str,
    used_for: &'static str,
    since: &'static str,
    reference: &'static str,
    check: Check,
) -> Feature {
    Feature {
        name,
        used_for,
        since,
        reference,
        check,
        fallback: None,
    }
}

const SOCK_ADDR: ProgramType = ProgramType::CgroupSockAddr;

/// Every feature, in the order probed (the README's and ARCHITECTURE.md's table).
pub const FEATURES: [Feature; 18] = [
    feature(
        "cgroup sock_addr programs (connect4/6, sendmsg4/6)",
        "service translation at connect()/sendmsg()",
        "4.18",
        "d74bad4e74ee (bpf: Hooks for sys_connect, 4.17), 1cedee13d25a (bpf: Hooks for sys_sendmsg, 4.18)",
        Check::Program(SOCK_ADDR),
    ),
    feature(
        "sockops programs",
        "per-connection accounting and circuit breaking",
        "4.13",
        "40304b2a1567 (bpf: BPF support for sock_ops)",
        Check::Program(ProgramType::SockOps),
    ),
    feature(
        "sk_msg programs and sockhash maps",
        "same-node bypass",
        "4.18",
        "4f738adba30a (sk_msg, 4.17), 81110384441a (bpf: sockmap, add hash map support, 4.18)",
        Check::Map(MapType::SockHash),
    ),
    feature(
        "bpf_msg_redirect_hash in sk_msg programs",
        "same-node bypass",
        "4.18",
        "81110384441a (bpf: sockmap, add hash map support)",
        Check::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    ),
    feature(
        "LRU hash maps",
        "session affinity, UDP reverse translation",
        "4.10",
        "29ba732acbee (bpf: Add BPF_MAP_TYPE_LRU_HASH)",
        Check::Map(MapType::LruHash),
    ),
    feature(
        "BPF_MAP_TYPE_SK_STORAGE",
        "per-socket state from connect to close",
        "5.2",
        "6ac99e8f23d4 (bpf: Introduce bpf sk local storage)",
        Check::Map(MapType::SkStorage),
    ),
    feature(
        "bpf_sk_storage_get in sockops programs",
        "per-socket state from connect to close",
        "5.3",
        "1314ef561102 (bpf: export bpf_sock for BPF_PROG_TYPE_SOCK_OPS prog type); fb85c4a730af for sock_addr",
        Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    feature(
        "bpf_get_netns_cookie in sock_addr programs",
        "telling pods apart (affinity keys)",
        "5.7",
        "f318903c0bf4 (bpf: Add netns cookie and enable it for bpf cgroup hooks)",
        Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "bpf_get_current_cgroup_id in sock_addr programs",
        "flow events name the client's cgroup",
        "5.7",
        "0f09abd105da (bpf: Enable bpf cgroup hooks to retrieve cgroup v2 and ancestor id)",
        Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_get_current_cgroup_id),
    ),
    feature(
        "cgroup bpf_link (BPF_LINK_CREATE, pinning, BPF_LINK_UPDATE)",
        "programs that survive agent restarts and are upgraded in place",
        "5.7",
        "af6eea57437a (bpf: Implement bpf_link-based cgroup BPF program attachment), 0c991ebc8c69 (BPF_LINK_UPDATE)",
        Check::CgroupLinks,
    ),
    feature(
        "cgroup getpeername4/6 hooks",
        "applications see the service address from getpeername()",
        "5.8",
        "1b66d253610c (bpf: Add get{peer,sock}name attach types for sock_addr)",
        Check::SockAddrHook(29),
    ),
    feature(
        "BPF ring buffer",
        "flow events, kernel log records",
        "5.8",
        "457f44363a88 (bpf: Implement BPF ring buffer and verifier support for it)",
        Check::Map(MapType::RingBuf),
    ),
    feature(
        "bpf_ringbuf_reserve in sockops programs",
        "flow events from the connection's life",
        "5.8",
        "457f44363a88 (bpf: Implement BPF ring buffer and verifier support for it)",
        Check::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_ringbuf_reserve),
    ),
    feature(
        "BPF atomics with fetch (-mcpu=v3)",
        "connection counters and circuit state changed by compare-and-swap",
        "5.12",
        "5ca419f2864a (bpf: Add BPF_FETCH field / create atomic_fetch_add instruction)",
        Check::AtomicFetch,
    ),
    feature(
        "bpf_loop in sock_addr programs",
        "the backend scan, verified once instead of once per slot",
        "5.17",
        "e6f2dd0f8067 (bpf: Add bpf_loop helper)",
        Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_loop),
    ),
    feature(
        "bpf_set_retval in sock_addr programs",
        "connect() fails at once with ECONNREFUSED/EHOSTUNREACH instead of EPERM",
        "6.1",
        "series 'bpf: expose bpf_{g,s}et_retval to more cgroup hooks' (2172fb8007ea; selftest cgroup_getset_retval_hooks); the helper itself is 5.18 (b44123b4a3dc) but only for sockopt/sysctl/device hooks there",
        Check::Helper(SOCK_ADDR, BpfHelper::BPF_FUNC_set_retval),
    ),
    Feature {
        fallback: Some(Fallback::NoResetTracepoint),
        ..feature(
            "kernel BTF (/sys/kernel/btf/vmlinux)",
            "tp_btf/tcp_receive_reset: resets by a backend count as failures",
            "5.4",
            "341dfcf8d78e (btf: expose BTF info through sysfs); CONFIG_DEBUG_INFO_BTF=y",
            Check::KernelBtf,
        )
    },
    Feature {
        fallback: Some(Fallback::NoResetTracepoint),
        ..feature(
            "BTF-enabled raw tracepoints (tp_btf)",
            "tp_btf/tcp_receive_reset: resets by a backend count as failures",
            "5.5",
            "f1b9509c2fb0 (bpf: Replace prog_raw_tp+btf_id with prog_tracing); aya BtfTracePoint docs: 5.5",
            Check::TpBtf,
        )
    },
];

/// What the data path may use on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// Attach `tp_btf/tcp_receive_reset` (else [`Fallback::NoResetTracepoint`]).
    pub reset_tracepoint: bool,
}

/// A feature the agent cannot run without is missing, or could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "kernel {release} lacks {} (needed for {}); Linux {} has it — see the kernel requirements in README.md",
        feature.name, feature.used_for, feature.since
    )]
    Missing {
        release: String,
        feature: &'static Feature,
    },
    #[error("could not probe kernel feature {} on kernel {release}: {reason}", feature.name)]
    Probe {
        release: String,
        feature: &'static Feature,
        reason: String,
    },
}

/// Decides from probe results (`Ok(true)` present, `Ok(false)` absent, `Err` not probed): the
/// first required feature that is absent fails; absent features with a fallback switch it on.
pub fn decide(
    release: &str,
    results: &[(&'static Feature, Result<bool, String>)],
) -> Result<KernelFeatures, ProbeError> {
    let mut features = KernelFeatures {
        release: release.to_owned(),
        reset_tracepoint: true,
    };
    for (feature, result) in results {
        match (result, feature.fallback) {
            (Ok(true), _) => {}
            (Ok(false), None) => {
                return Err(ProbeError::Missing {
                    release: release.to_owned(),
                    feature,
                });
            }
            (Err(reason), None) => {
                return Err(ProbeError::Probe {
                    release: release.to_owned(),
                    feature,
                    reason: reason.clone(),
                });
            }
            // A feature with a fallback that cannot be probed is treated as absent: the
            // fallback is safe, guessing "present" would fail the whole load.
            (Ok(false) | Err(_), Some(Fallback::NoResetTracepoint)) => {
                features.reset_tracepoint = false;
            }
        }
    }
    Ok(features)
}

fn run(check: Check) -> Result<bool, String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    match check {
        Check::KernelBtf => Ok(std::path::Path::new("/sys/kernel/btf/vmlinux").exists()),
        Check::Program(t) => is_program_supported(t).map_err(|e| s(&e)),
        Check::Map(t) => is_map_supported(t).map_err(|e| s(&e)),
        Check::Helper(t, h) => is_helper_supported(t, h).map_err(|e| s(&e)),
        Check::CgroupLinks => Ok(bpfsys::link_create_supported()),
        Check::AtomicFetch => atomic_fetch_supported(),
        Check::TpBtf => {
            const BPF_TRACE_RAW_TP: u32 = 23;
            let insns = [Insn::mov_r0(0), Insn::exit()];
            match bpfsys::prog_load(
                bpfsys::prog_type::TRACING,
                BPF_TRACE_RAW_TP,
                "mesh_probe",
                &insns,
            ) {
                Ok(_fd) => Ok(true),
                // Without a target the verifier answers "Tracing programs must provide btf_id":
                // it knows the type. A kernel without it fails before the verifier, log empty.
                Err((e, log)) if e.raw_os_error() == Some(libc::EINVAL) => Ok(!log.is_empty()),
                Err((e, log)) => Err(format!("{e} ({log})")),
            }
        }
        Check::SockAddrHook(attach_type) => {
            let insns = [Insn::mov_r0(1), Insn::exit()];
            match bpfsys::prog_load(
                bpfsys::prog_type::CGROUP_SOCK_ADDR,
                attach_type,
                "mesh_probe",
                &insns,
            ) {
                Ok(_fd) => Ok(true),
                // An attach type the kernel does not know fails `bpf_prog_load_check_attach`.
                Err((e, _)) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
                Err((e, log)) => Err(format!("{e} ({log})")),
            }
        }
    }
}

/// Loads `*(u64 *)(r10 - 8) = 0; r1 = 1; r1 = atomic_fetch_add(r10 - 8, r1); r0 = 0; exit`.
/// Kernels before 5.12 know only `BPF_XADD` and reject a non-zero `imm` (here `BPF_FETCH`).
fn atomic_fetch_supported() -> Result<bool, String> {
    const BPF_FETCH_ADD: i32 = 0x01;
    let insns = [
        Insn::new(0xb7, 1, 0, 0, 0),               // r1 = 0
        Insn::new(0x7b, 10, 1, -8, 0),             // *(u64 *)(r10 - 8) = r1
        Insn::new(0xb7, 1, 0, 0, 1),               // r1 = 1
        Insn::new(0xdb, 10, 1, -8, BPF_FETCH_ADD), // BPF_STX | BPF_ATOMIC | BPF_DW
        Insn::mov_r0(0),
        Insn::exit(),
    ];
    match bpfsys::prog_load(bpfsys::prog_type::SOCKET_FILTER, 0, "mesh_probe", &insns) {
        Ok(_fd) => Ok(true),
        Err((e, _)) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err((e, log)) => Err(format!("{e} ({log})")),
    }
}

/// The running kernel's release (`uname -r`).
#[must_use]
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "(unknown)".to_owned(), |s| s.trim().to_owned())
}

/// Each feature of [`FEATURES`] probed on this kernel: present, absent, or why it could not be
/// probed.
#[must_use]
pub fn results() -> Vec<(&'static Feature, Result<bool, String>)> {
    FEATURES.iter().map(|f| (f, run(f.check))).collect()
}

/// Probes every feature of [`FEATURES`] on this kernel.
pub fn probe() -> Result<KernelFeatures, ProbeError> {
    let features = decide(&kernel_release(), &results())?;
    if features.reset_tracepoint {
        info!(kernel = %features.release, "kernel has every feature the data path uses");
    } else {
        warn!(
            kernel = %features.release,
            "no kernel BTF or tp_btf: resets by a backend are not counted as failures (refused connects and SYN timeouts still are)"
        );
    }
    Ok(features)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(name: &str) -> &'static Feature {
        FEATURES
            .iter()
            .find(|f| f.name.starts_with(name))
            .unwrap_or_else(|| panic!("no feature {name}"))
    }

    fn all_present() -> Vec<(&'static Feature, Result<bool, String>)> {
        FEATURES.iter().map(|f| (f, Ok(true))).collect()
    }

    #[test]
    fn every_feature_present_uses_everything() {
        let f = decide("6.18.0", &all_present()).unwrap();
        assert!(f.reset_tracepoint);
        assert_eq!(f.release, "6.18.0");
    }

    #[test]
    fn a_missing_required_feature_is_one_line_naming_it_and_its_release() {
        let mut r = all_present();
        for (f, res) in &mut r {
            if f.name.starts_with("bpf_set_retval") {
                *res = Ok(false);
            }
        }
        let e = decide("5.15.0-91-generic", &r).unwrap_err().to_string();
        assert_eq!(
            e,
            "kernel 5.15.0-91-generic lacks bpf_set_retval in sock_addr programs (needed for connect() fails at once with ECONNREFUSED/EHOSTUNREACH instead of EPERM); Linux 6.1 has it — see the kernel requirements in README.md"
        );
    }

    #[test]
    fn the_first_missing_feature_in_release_order_is_named() {
        // A 5.10 kernel lacks atomics-with-fetch, bpf_loop and set_retval: the oldest is named.
        let mut r = all_present();
        for (f, res) in &mut r {
            if ["5.12", "5.17", "6.1"].contains(&f.since) {
                *res = Ok(false);
            }
        }
        let e = decide("5.10.0", &r).unwrap_err().to_string();
        assert!(e.contains("BPF atomics with fetch"), "{e}");
        assert!(e.contains("Linux 5.12 has it"), "{e}");
    }

    #[test]
    fn missing_btf_or_tp_btf_falls_back_instead_of_failing() {
        for name in ["kernel BTF", "BTF-enabled raw tracepoints"] {
            let mut r = all_present();
            for (f, res) in &mut r {
                if f.name.starts_with(name) {
                    *res = Err("EPERM".into());
                }
            }
            let f = decide("5.4.0", &r).unwrap();
            assert!(!f.reset_tracepoint, "{name}");
        }
    }

    #[test]
    fn an_unprobeable_required_feature_fails_with_the_reason() {
        let mut r = all_present();
        r[0].1 = Err("Operation not permitted (os error 1)".into());
        let e = decide("6.1.0", &r).unwrap_err().to_string();
        assert!(
            e.starts_with("could not probe kernel feature cgroup sock_addr programs"),
            "{e}"
        );
        assert!(e.contains("Operation not permitted"), "{e}");
    }

    #[test]
    fn the_readme_table_lists_every_feature_with_its_release() {
        let readme = include_str!("../../../README.md");
        for f in &FEATURES {
            let row = format!("| {} | {} | {} |", f.name, f.used_for, f.since);
            assert!(readme.contains(&row), "README.md lacks the row {row}");
        }
        assert!(readme.contains("**Linux ≥ 6.1**"), "the stated minimum");
    }

    #[test]
    fn features_are_listed_oldest_first_among_required_ones() {
        // The table doubles as documentation: required features ordered by release so the first
        // missing one is the oldest (the most useful to name).
        let key = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let required: Vec<_> = FEATURES
            .iter()
            .filter(|f| f.fallback.is_none())
            .map(|f| key(f.since))
            .collect();
        // The program types lead; from LRU maps on, by release.
        assert!(
            required[4..].windows(2).all(|w| w[0] <= w[1]),
            "{required:?}"
        );
        assert_eq!(key(find("bpf_set_retval").since), (6, 1));
        assert_eq!(
            *required.iter().max().unwrap(),
            (6, 1),
            "6.1 is the minimum"
        );
    }
}
