//! A cluster in a box: a fabric bridge, nodes and pods made of network namespaces, veth pairs and
//! cgroup v2 directories, all named from the test so that concurrent tests never collide.
//!
//! # Topology and addressing
//! - **fabric** netns `<prefix>-fabric` holds bridge `br0` (multicast snooping off). It has no
//!   link to the host, so no packet can leave the machine.
//! - **node** `n` (0-based, at most [`MAX_NODES`]): netns `<prefix>-n-<name>`; `eth0` ↔ `fab<n>`
//!   on the bridge; `172.30.0.<n+1>/24` and `fd00:30::<n+1>/64`; forwarding on for v4 and v6.
//!   Its pod CIDRs are `10.<n+1>.0.0/24` and `fd00:<n+1>::/64`; every node routes each other
//!   node's pod CIDRs via that node's fabric address.
//! - **pod** `k` of node `n` (at most [`MAX_PODS_PER_NODE`]): netns `<prefix>-p-<name>`; a veth
//!   pair `eth0` (pod) ↔ `vp<k>` (node). Routed point to point, as Calico and Cilium do, without
//!   a bridge in the node: the pod has `10.<n+1>.0.<k+2>/32` and `fd00:<n+1>::<k+2>/128`, default
//!   routes (onlink) via `10.<n+1>.0.1` / `fd00:<n+1>::1`; every pod-side veth of the node carries
//!   that gateway address, and the node has a host route per pod. Same-node pod traffic is
//!   therefore routed by the node, not bridged.
//! - IPv6 duplicate address detection is off in every namespace (`accept_dad = 0`, and `nodad`),
//!   so addresses are usable at once.
//!
//! # Cgroups
//! `<cgroup2>/<prefix>` ([`Cluster::root_cgroup`]) → `<node>` ([`NodeHandle::cgroup_dir`]) →
//! `<pod>` ([`PodHandle::cgroup_dir`]): a program attached at a node's directory sees every pod of
//! that node. Processes started on a *node* (the agent) run in `<cgroup2>/<prefix>-host/<node>`,
//! outside the pods' tree, so the node's own programs do not rewrite the agent's connections.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::env::{BPFFS_DIR, cgroup2_root, ensure_bpffs, is_root};
use crate::exec::{Sandbox, set_sysctls};
use crate::ip::{ip_batch, ip_in, netns_add, netns_del};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Where per-prefix lock files live (a second run of the same test binary waits on them).
pub const LOCK_DIR: &str = "/run/mesh-tests";
/// Most nodes in one cluster (node `n` uses `172.30.0.<n+1>` and `fd00:<n+1>::/64`).
pub const MAX_NODES: usize = 32;
/// Most pods on one node (pod `k` uses host part `k+2` of the node's /24).
pub const MAX_PODS_PER_NODE: usize = 250;
/// How long `Cluster::new` waits for another process using the same prefix.
const LOCK_WAIT: Duration = Duration::from_mins(5);
/// How long teardown waits for killed processes to leave their cgroups.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A node: a network namespace on the fabric, the parent cgroup of its pods, and the place its
/// agent runs. Dereferences to the [`Sandbox`] where node processes run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHandle {
    name: String,
    index: usize,
    prefix: String,
    cgroup: PathBuf,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    sandbox: Sandbox,
}

impl NodeHandle {
    /// The node's name as given to [`Cluster::add_node`].
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 0-based position in the cluster (it fixes the addresses).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's cgroup directory, parent of its pods' cgroups: attach per-node programs here.
    #[must_use]
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }

    /// Where processes started on the node run (outside the pods' tree).
    #[must_use]
    pub fn host_cgroup_dir(&self) -> &Path {
        self.sandbox.exec_cgroup()
    }

    /// The node's fabric IPv4 address, `172.30.0.<n+1>`.
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The node's fabric IPv6 address, `fd00:30::<n+1>`.
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The node's interface on the fabric (inside its namespace).
    #[must_use]
    pub fn fabric_ifname(&self) -> &'static str {
        "eth0"
    }

    /// The gateway pods of this node use, `10.<n+1>.0.1`.
    #[must_use]
    pub fn gateway_v4(&self) -> Ipv4Addr {
        pod_v4(self.index, 0)
    }

    /// The IPv6 gateway pods of this node use, `fd00:<n+1>::1`.
    #[must_use]
    pub fn gateway_v6(&self) -> Ipv6Addr {
        pod_v6(self.index, 0)
    }

    /// This node's IPv4 pod CIDR, `10.<n+1>.0.0/24`.
    #[must_use]
    pub fn pod_cidr_v4(&self) -> (Ipv4Addr, u8) {
        (pod_cidr_v4(self.index), 24)
    }

    /// This node's IPv6 pod CIDR, `fd00:<n+1>::/64`.
    #[must_use]
    pub fn pod_cidr_v6(&self) -> (Ipv6Addr, u8) {
        (pod_cidr_v6(self.index), 64)
    }
}

impl Deref for NodeHandle {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

/// A pod: a network namespace joined to its node by a veth pair, and a cgroup under its node's.
/// Dereferences to its [`Sandbox`] (`pod.command`, `pod.run`, `pod.spawn`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodHandle {
    name: String,
    index: usize,
    node: NodeHandle,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    host_ifname: String,
    sandbox: Sandbox,
}

impl PodHandle {
    /// The pod's name as given to [`Cluster::add_pod`].
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// 0-based position among its node's pods (it fixes the addresses).
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node it runs on.
    #[must_use]
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// The pod's cgroup directory (a child of its node's); its processes run here.
    #[must_use]
    pub fn cgroup_dir(&self) -> &Path {
        self.sandbox.exec_cgroup()
    }

    /// The pod's IPv4 address, `10.<n+1>.0.<k+2>`.
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The pod's IPv6 address, `fd00:<n+1>::<k+2>`.
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// Its node's fabric IPv4 address.
    #[must_use]
    pub fn node_ipv4(&self) -> Ipv4Addr {
        self.node.ipv4
    }

    /// Its node's fabric IPv6 address.
    #[must_use]
    pub fn node_ipv6(&self) -> Ipv6Addr {
        self.node.ipv6
    }

    /// The node-side end of the pod's veth (`vp<k>`, inside the node's namespace): its
    /// `tx_packets` count what reached the pod — see [`Sandbox::iface_stats`] on the node.
    #[must_use]
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }

    /// The pod-side end of the veth (inside the pod's namespace).
    #[must_use]
    pub fn ifname(&self) -> &'static str {
        "eth0"
    }
}

impl Deref for PodHandle {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<NodeHandle>,
    pods: Vec<PodHandle>,
}

/// A cluster in a box. Dropping it (also while unwinding from a panic) kills every process in
/// its cgroups and removes its cgroups, namespaces (and so veths) and bpffs directory.
#[derive(Debug)]
pub struct Cluster {
    test_name: String,
    prefix: String,
    cgroup2: PathBuf,
    state: Mutex<State>,
    lock: Option<File>,
    torn_down: bool,
}

impl Cluster {
    /// Builds an empty cluster (the fabric) for `test_name`, first removing whatever a previous
    /// run with the same name left behind. Needs root.
    pub fn new(test_name: &str) -> Result<Self> {
        ensure!(
            is_root(),
            "Cluster::new({test_name}) needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create namespaces and cgroups"
        );
        let prefix = prefix_for(&binary_name(), test_name);
        let cgroup2 = cgroup2_root()?;
        let lock = acquire_lock(&prefix, test_name)?;
        let cluster = Self {
            test_name: test_name.to_owned(),
            prefix,
            cgroup2,
            state: Mutex::new(State::default()),
            lock: Some(lock),
            torn_down: false,
        };
        // A failure below drops `cluster`, which tears down what was made.
        cleanup_prefix(&cluster.prefix, &cluster.cgroup2)
            .with_context(|| format!("failed to remove leftovers of prefix {}", cluster.prefix))?;
        for dir in [cluster.root_cgroup(), cluster.host_cgroup_root()] {
            std::fs::create_dir(&dir)
                .with_context(|| format!("failed to create cgroup {}", dir.display()))?;
        }
        let fabric = cluster.fabric_netns();
        netns_add(&fabric)?;
        ip_batch(
            &fabric,
            &[
                "link set lo up".to_owned(),
                "link add br0 type bridge mcast_snooping 0".to_owned(),
                "link set br0 up".to_owned(),
            ],
        )?;
        Ok(cluster)
    }

    /// The name the cluster was built for.
    #[must_use]
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    /// The short prefix (`mt` + 6 hex digits) every object of this cluster is named with.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<cgroup2>/<prefix>`: parent of every node's cgroup.
    #[must_use]
    pub fn root_cgroup(&self) -> PathBuf {
        self.cgroup2.join(&self.prefix)
    }

    /// `<cgroup2>/<prefix>-host`: parent of the cgroups node processes run in.
    #[must_use]
    pub fn host_cgroup_root(&self) -> PathBuf {
        self.cgroup2.join(format!("{}-host", self.prefix))
    }

    /// The fabric namespace's name (it holds the bridge `br0`).
    #[must_use]
    pub fn fabric_netns(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    /// `/sys/fs/bpf/<prefix>`, created on demand (bpffs is mounted if missing); removed on teardown.
    pub fn bpffs_dir(&self) -> Result<PathBuf> {
        let dir = ensure_bpffs()?.join(&self.prefix);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create bpffs dir {}", dir.display()))?;
        Ok(dir)
    }

    /// The nodes added so far.
    #[must_use]
    pub fn nodes(&self) -> Vec<NodeHandle> {
        self.state().nodes.clone()
    }

    /// The pods added so far.
    #[must_use]
    pub fn pods(&self) -> Vec<PodHandle> {
        self.state().pods.clone()
    }

    /// Every namespace name of this cluster (fabric, nodes, pods).
    #[must_use]
    pub fn netns_names(&self) -> Vec<String> {
        let st = self.state();
        std::iter::once(self.fabric_netns())
            .chain(st.nodes.iter().map(|n| n.netns().to_owned()))
            .chain(st.pods.iter().map(|p| p.netns().to_owned()))
            .collect()
    }

    /// Adds a node named `name` (`[a-z0-9][a-z0-9-]*`, at most 32 characters) and routes between
    /// it and every existing node.
    pub fn add_node(&self, name: &str) -> Result<NodeHandle> {
        validate_name(name)?;
        let mut st = self.state();
        ensure!(
            st.nodes.iter().all(|n| n.name != name),
            "node {name} already exists"
        );
        let index = st.nodes.len();
        ensure!(index < MAX_NODES, "at most {MAX_NODES} nodes per cluster");
        let netns = format!("{}-n-{name}", self.prefix);
        let node = NodeHandle {
            name: name.to_owned(),
            index,
            prefix: self.prefix.clone(),
            cgroup: self.root_cgroup().join(name),
            ipv4: node_v4(index),
            ipv6: node_v6(index),
            sandbox: Sandbox::new(
                format!("node {name}"),
                netns.clone(),
                self.host_cgroup_root().join(name),
            ),
        };
        let ctx = || format!("failed to add node {name} (netns {netns})");
        for dir in [node.cgroup_dir(), node.host_cgroup_dir()] {
            std::fs::create_dir(dir)
                .with_context(|| format!("failed to create cgroup {}", dir.display()))
                .with_context(ctx)?;
        }
        netns_add(&netns).with_context(ctx)?;
        set_sysctls(
            node.netns_path(),
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )
        .with_context(ctx)?;
        let fabric = self.fabric_netns();
        let fab_if = format!("fab{index}");
        let mut lines = vec![
            "link set lo up".to_owned(),
            format!("link add eth0 type veth peer name {fab_if} netns {fabric}"),
            format!("addr add {}/24 dev eth0", node.ipv4),
            format!("addr add {}/64 dev eth0 nodad", node.ipv6),
            "link set eth0 up".to_owned(),
        ];
        for other in &st.nodes {
            lines.extend(routes_to(other));
        }
        ip_batch(&netns, &lines).with_context(ctx)?;
        ip_in(&fabric, &["link", "set", &fab_if, "master", "br0", "up"]).with_context(ctx)?;
        for other in &st.nodes {
            ip_batch(other.netns(), &routes_to(&node))
                .with_context(|| format!("failed to route node {} to node {name}", other.name))?;
        }
        st.nodes.push(node.clone());
        Ok(node)
    }

    /// Adds a pod named `name` (unique in the cluster; `[a-z0-9][a-z0-9-]*`, at most 32
    /// characters) on `node`.
    pub fn add_pod(&self, node: &NodeHandle, name: &str) -> Result<PodHandle> {
        validate_name(name)?;
        let mut st = self.state();
        ensure!(
            node.prefix == self.prefix && st.nodes.iter().any(|n| n.name == node.name),
            "node {} is not part of cluster {}",
            node.name,
            self.prefix
        );
        ensure!(
            st.pods.iter().all(|p| p.name != name),
            "pod {name} already exists"
        );
        let index = st.pods.iter().filter(|p| p.node.name == node.name).count();
        ensure!(
            index < MAX_PODS_PER_NODE,
            "at most {MAX_PODS_PER_NODE} pods per node"
        );
        let netns = format!("{}-p-{name}", self.prefix);
        let pod = PodHandle {
            name: name.to_owned(),
            index,
            node: node.clone(),
            ipv4: pod_v4(node.index, index + 1),
            ipv6: pod_v6(node.index, index + 1),
            host_ifname: format!("vp{index}"),
            sandbox: Sandbox::new(
                format!("pod {name}"),
                netns.clone(),
                node.cgroup_dir().join(name),
            ),
        };
        let ctx = || {
            format!(
                "failed to add pod {name} on node {} (netns {netns})",
                node.name
            )
        };
        std::fs::create_dir(pod.cgroup_dir())
            .with_context(|| format!("failed to create cgroup {}", pod.cgroup_dir().display()))
            .with_context(ctx)?;
        netns_add(&netns).with_context(ctx)?;
        set_sysctls(
            pod.netns_path(),
            &[
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )
        .with_context(ctx)?;
        let vp = &pod.host_ifname;
        ip_batch(
            node.netns(),
            &[
                format!("link add {vp} type veth peer name eth0 netns {netns}"),
                format!("addr add {}/32 dev {vp}", node.gateway_v4()),
                format!("addr add {}/128 dev {vp} nodad", node.gateway_v6()),
                format!("link set {vp} up"),
                format!("route add {}/32 dev {vp}", pod.ipv4),
                format!("route add {}/128 dev {vp}", pod.ipv6),
            ],
        )
        .with_context(ctx)?;
        ip_batch(
            &netns,
            &[
                "link set lo up".to_owned(),
                format!("addr add {}/32 dev eth0", pod.ipv4),
                format!("addr add {}/128 dev eth0 nodad", pod.ipv6),
                "link set eth0 up".to_owned(),
                format!(
                    "route add 0.0.0.0/0 via {} dev eth0 onlink",
                    node.gateway_v4()
                ),
                format!("route add ::/0 via {} dev eth0 onlink", node.gateway_v6()),
            ],
        )
        .with_context(ctx)?;
        st.pods.push(pod.clone());
        Ok(pod)
    }

    /// Tears down now and reports what failed (dropping does the same but only logs).
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        let result = cleanup_prefix(&self.prefix, &self.cgroup2);
        self.lock = None;
        result
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.torn_down {
            self.torn_down = true;
            if let Err(e) = cleanup_prefix(&self.prefix, &self.cgroup2) {
                eprintln!(
                    "mesh-tests: teardown of cluster {} ({}) incomplete: {e:#}",
                    self.test_name, self.prefix
                );
            }
        }
        // Released last, so a waiting run never sees half-removed objects.
        self.lock = None;
    }
}

fn routes_to(node: &NodeHandle) -> [String; 2] {
    [
        format!("route add {}/24 via {}", pod_cidr_v4(node.index), node.ipv4),
        format!("route add {}/64 via {}", pod_cidr_v6(node.index), node.ipv6),
    ]
}

fn node_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, (n + 1) as u8)
}

fn node_v6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, (n + 1) as u16)
}

fn pod_cidr_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (n + 1) as u8, 0, 0)
}

fn pod_cidr_v6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, (n + 1) as u16, 0, 0, 0, 0, 0, 0)
}

/// Host `h` of node `n`'s pod range: 1 is the gateway, pod `k` is `k + 2`.
fn pod_v4(n: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (n + 1) as u8, 0, (k + 1) as u8)
}

fn pod_v6(n: usize, k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, (n + 1) as u16, 0, 0, 0, 0, 0, (k + 1) as u16)
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    ensure!(
        ok,
        "bad name {name:?}: use 1-32 of [a-z0-9-], starting with a letter or digit"
    );
    Ok(())
}

/// The running test binary's name without cargo's `-<hash>` suffix (`harness-1a2b…` → `harness`),
/// so that separate binaries get separate prefixes while reruns of one binary share them.
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_name)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((base, hash)) if hash.len() >= 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            base.to_owned()
        }
        _ => stem,
    }
}

/// `mt` + 6 hex digits of FNV-1a over the binary and test names (interface-name sized).
fn prefix_for(binary: &str, test_name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in binary.bytes().chain([0]).chain(test_name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mt{:06x}", (h ^ (h >> 32)) & 0x00ff_ffff)
}

/// Takes `/run/mesh-tests/<prefix>.lock`. Another process holding it is waited for; this process
/// holding it means a cluster was leaked (`mem::forget`), which is treated as a leftover.
fn acquire_lock(prefix: &str, test_name: &str) -> Result<File> {
    std::fs::create_dir_all(LOCK_DIR).with_context(|| format!("failed to create {LOCK_DIR}"))?;
    let path = Path::new(LOCK_DIR).join(format!("{prefix}.lock"));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open lock {}", path.display()))?;
    let me = std::process::id();
    let start = Instant::now();
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{me}")?;
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        ensure!(
            err.kind() == std::io::ErrorKind::WouldBlock,
            "failed to lock {}: {err}",
            path.display()
        );
        let mut holder = String::new();
        file.rewind()?;
        file.read_to_string(&mut holder)?;
        if holder.trim().parse::<u32>().ok() == Some(me) {
            eprintln!(
                "mesh-tests: prefix {prefix} (test {test_name}) is held by this process: treating the earlier cluster as leaked and cleaning it"
            );
            return Ok(file);
        }
        if start.elapsed() > LOCK_WAIT {
            bail!(
                "prefix {prefix} (test {test_name}) still locked by pid {} after {LOCK_WAIT:?} ({})",
                holder.trim(),
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes everything named with `prefix`: kills processes in its cgroups (`cgroup.kill`) and in
/// its namespaces, removes the cgroups bottom-up, deletes the namespaces and the bpffs directory.
/// Goes on after a failure and reports all of them.
pub fn cleanup_prefix(prefix: &str, cgroup2_mount: &Path) -> Result<()> {
    let mut errors = Vec::new();
    let cgroups = [
        cgroup2_mount.join(prefix),
        cgroup2_mount.join(format!("{prefix}-host")),
    ];
    for cg in &cgroups {
        if cg.is_dir()
            && let Err(e) = kill_cgroup_tree(cg)
        {
            errors.push(format!("{e:#}"));
        }
    }
    let namespaces = prefixed_netns(prefix);
    kill_netns_processes(&namespaces);
    for cg in &cgroups {
        if cg.is_dir() {
            remove_cgroup_tree(cg, &mut errors);
        }
    }
    for name in namespaces {
        if let Err(e) = netns_del(&name) {
            errors.push(format!("{e:#}"));
        }
    }
    let bpf = Path::new(BPFFS_DIR).join(prefix);
    if bpf.exists()
        && let Err(e) = std::fs::remove_dir_all(&bpf)
    {
        errors.push(format!("failed to remove bpffs dir {}: {e}", bpf.display()));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// Names in `/run/netns` that start with `<prefix>-`.
fn prefixed_netns(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&want))
        .collect();
    names.sort();
    names
}

/// Kills every process in the cgroup subtree at `dir` and waits until it is empty.
fn kill_cgroup_tree(dir: &Path) -> Result<()> {
    let kill_file = dir.join("cgroup.kill");
    if std::fs::write(&kill_file, "1").is_err() {
        // Kernels before 5.14 have no cgroup.kill: signal each member.
        for pid in cgroup_tree_pids(dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if !events.lines().any(|l| l.trim() == "populated 1") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "processes in cgroup {} survived SIGKILL for {KILL_WAIT:?}: {:?}",
                dir.display(),
                cgroup_tree_pids(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cgroup_tree_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(cgroup_tree_pids(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// `rmdir` bottom-up (cgroup directories hold only control files, which cannot be unlinked).
fn remove_cgroup_tree(dir: &Path, errors: &mut Vec<String>) {
    for sub in subdirs(dir) {
        remove_cgroup_tree(&sub, errors);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            // EBUSY while the last killed tasks finish exiting.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                errors.push(format!("failed to remove cgroup {}: {e}", dir.display()));
                return;
            }
        }
    }
}

/// SIGKILLs processes (other than this one) whose network namespace is one of `names` — those
/// started outside the cluster's cgroups, e.g. with `ip netns exec`.
fn kill_netns_processes(names: &[String]) {
    let inodes: BTreeSet<u64> = names
        .iter()
        .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
        .map(|m| m.ino())
        .collect();
    if inodes.is_empty() {
        return;
    }
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut killed = Vec::new();
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(link) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        let ino = link
            .to_str()
            .and_then(|s| s.strip_prefix("net:["))
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        if ino.is_some_and(|i| inodes.contains(&i))
            && let Ok(raw) = i32::try_from(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(raw),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    if !killed.is_empty() {
        eprintln!(
            "mesh-tests: killed processes left in namespaces {names:?} outside the cluster's cgroups: {killed:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_short_and_stable() {
        let a = prefix_for("harness", "smoke");
        assert_eq!(a, prefix_for("harness", "smoke"));
        assert_eq!(a.len(), 8);
        assert!(a.starts_with("mt"));
        assert_ne!(a, prefix_for("harness", "smoke2"));
        assert_ne!(a, prefix_for("other", "smoke"));
    }

    #[test]
    fn addressing_plan() {
        assert_eq!(node_v4(0), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(node_v6(1).to_string(), "fd00:30::2");
        assert_eq!(pod_v4(0, 0), Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(pod_v4(1, 1), Ipv4Addr::new(10, 2, 0, 2));
        assert_eq!(pod_v6(0, 2).to_string(), "fd00:1::3");
        assert_eq!(pod_cidr_v6(2).to_string(), "fd00:3::");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("node-a").is_ok());
        assert!(validate_name("a1").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("A").is_err());
        assert!(validate_name("cgroup.procs").is_err());
        assert!(validate_name(&"x".repeat(33)).is_err());
    }
}
