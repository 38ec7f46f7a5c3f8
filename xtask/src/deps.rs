//! System prerequisites of tests, benchmarks and the demo: Debian packages and a mounted bpffs.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;
use crate::step::{Step, warn};

/// A Debian package and why the project needs it.
struct Package {
    name: &'static str,
    why: &'static str,
    /// Installed instead when the distribution has no `name` (Ubuntu before 25.04 ships bpftool in
    /// `linux-tools-*`); `{kernel}` stands for the running kernel's release.
    fallback: &'static [&'static str],
}

const PACKAGES: &[Package] = &[
    Package {
        name: "iproute2",
        why: "ip netns, veth, tc in kernel tests",
        fallback: &[],
    },
    Package {
        name: "iptables",
        why: "kube-proxy baseline",
        fallback: &[],
    },
    Package {
        name: "bpftool",
        why: "inspecting programs and maps",
        fallback: &["linux-tools-common", "linux-tools-{kernel}"],
    },
    Package {
        name: "haproxy",
        why: "userspace proxy baseline",
        fallback: &[],
    },
    Package {
        name: "nginx",
        why: "gateway and mtls benchmarks: the reverse-proxy baseline, the backend, the sidecar-style TLS pair",
        fallback: &[],
    },
    Package {
        name: "wrk",
        why: "gateway and mtls benchmarks: HTTP/1.1 keep-alive load with latency percentiles",
        fallback: &[],
    },
    Package {
        name: "nghttp2-client",
        why: "gateway benchmark and tests: h2load (HTTP/2 over TLS, gRPC unary)",
        fallback: &[],
    },
    Package {
        name: "openssl",
        why: "gateway benchmark: the certificate the three proxies share",
        fallback: &[],
    },
    Package {
        name: "sockperf",
        why: "TCP latency benchmark",
        fallback: &[],
    },
    Package {
        name: "iperf3",
        why: "TCP throughput benchmark",
        fallback: &[],
    },
    Package {
        name: "prometheus",
        why: "telemetry test: promtool check metrics and a real Prometheus scraping the agents",
        fallback: &[],
    },
    Package {
        name: "libnginx-mod-stream",
        why: "mtls benchmark: nginx `stream` TLS proxies",
        fallback: &[],
    },
    Package {
        name: "chromium",
        why: "relay test: the live service map page rendered headless, read from its DOM",
        fallback: &[],
    },
];

const BPFFS: &str = "/sys/fs/bpf";

/// Python packages (module name = package name) and why: installed with `python3 -m pip`.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    (
        "kmock",
        "Kubernetes API stand-in of the discovery test (no kube-apiserver is installable)",
    ),
    (
        "rotel",
        "OTLP collector (`rotel-agent`) the telemetry test exports connection logs to",
    ),
];

/// `cargo xtask install-deps`: installs the missing packages and mounts bpffs.
pub fn install() -> Result<()> {
    install_packages()?;
    install_python_packages();
    mount_bpffs()
}

/// Best effort: a test that needs a missing module says so itself.
fn install_python_packages() {
    for (module, why) in PYTHON_PACKAGES {
        let step = Step::quiet(format!("checking Python module {module}"));
        let present = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|out| out.status.success());
        if present {
            step.finish("installed");
            continue;
        }
        step.finish("missing");
        let step = Step::loud(format!("python3 -m pip install {module} ({why})"));
        // Debian's own python3 is "externally managed" (PEP 668); pyenv/venv ones are not.
        let installed = [&[][..], &["--break-system-packages"][..]]
            .iter()
            .any(|extra| {
                cmd::run(
                    Command::new("python3")
                        .args(["-m", "pip", "install", "--quiet", module])
                        .args(*extra),
                )
                .is_ok()
            });
        if installed {
            step.done();
        } else {
            step.finish("failed");
            warn(&format!(
                "could not install {module}: run `python3 -m pip install {module}`"
            ));
        }
    }
}

fn install_packages() -> Result<()> {
    let step = Step::quiet("checking Debian packages");
    if cmd::which("dpkg-query").is_none() {
        step.finish("skipped");
        warn(&format!(
            "dpkg-query not found (not Debian/Ubuntu): install by hand: {}",
            PACKAGES
                .iter()
                .map(|p| format!("{} ({})", p.name, p.why))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Ok(());
    }
    let missing: Vec<&Package> = PACKAGES.iter().filter(|p| !is_installed(p.name)).collect();
    if missing.is_empty() {
        step.finish("all installed");
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    step.finish(&format!("missing: {}", names.join(" ")));
    if !cmd::is_root() {
        warn(&format!(
            "not root, so not installing them; run: \
             sudo apt-get install -y --no-install-recommends {}",
            names.join(" ")
        ));
        return Ok(());
    }

    let step = Step::loud("apt-get update");
    cmd::run(apt("apt-get").arg("update")).context(
        "`apt-get update` failed: check network access and /etc/apt/sources.list, then rerun",
    )?;
    step.done();

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut to_install = Vec::new();
    for package in missing {
        if package.fallback.is_empty() || has_candidate(package.name) {
            to_install.push(package.name.to_owned());
        } else {
            to_install.extend(
                package
                    .fallback
                    .iter()
                    .map(|name| name.replace("{kernel}", kernel.trim())),
            );
        }
    }
    let step = Step::loud(format!("installing {}", to_install.join(" ")));
    cmd::run(
        apt("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&to_install),
    )
    .with_context(|| {
        format!(
            "installing {} failed: see apt's output above; fix the package source or install them \
                 by hand and rerun",
            to_install.join(" ")
        )
    })?;
    step.done();
    Ok(())
}

fn apt(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("DEBIAN_FRONTEND", "noninteractive");
    command
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
        })
}

/// Whether apt can install `package` itself (not only as a virtual package).
fn has_candidate(package: &str) -> bool {
    Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|line| line.trim().strip_prefix("Candidate:"))
                .is_some_and(|candidate| candidate.trim() != "(none)")
        })
}

/// Whether `/proc/self/mounts` lists a bpf filesystem at `/sys/fs/bpf`.
fn bpffs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, mount_point, "bpf", ..] if *mount_point == BPFFS)
    }))
}

fn mount_bpffs() -> Result<()> {
    let step = Step::quiet(format!("checking bpffs at {BPFFS}"));
    if bpffs_mounted()? {
        step.finish("mounted");
        return Ok(());
    }
    if !cmd::is_root() {
        step.finish("not mounted");
        warn(&format!(
            "not root, so not mounting it; run: sudo mount -t bpf bpf {BPFFS}"
        ));
        return Ok(());
    }
    step.finish("not mounted");
    let step = Step::quiet(format!("mounting bpffs at {BPFFS}"));
    std::fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
    cmd::output(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context(
        "mounting bpffs failed: does the kernel have CONFIG_BPF_SYSCALL? mount it by hand and rerun",
    )?;
    if !bpffs_mounted()? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but /proc/self/mounts does not list it");
    }
    step.done();
    Ok(())
}
