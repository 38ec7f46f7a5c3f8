//! The mesh maps of the data path: enrolled workloads and pods, identity numbers, same-node
//! identity verdicts, the capture address, `STRICT` ingress on the uplink, and the lookup of a
//! captured connection's original destination.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData},
    programs::{SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions},
};
use mesh_common::{
    ids::{ID_ALLOC_MAP, ID_IDENTITY},
    mesh::{
        CAPTURE_CONFIG_MAP, CAPTURED_F_SERVICE, CAPTURED_MAP, CaptureConfig, CaptureKey, Captured,
        IDENTITY_VERDICTS_CAPACITY, IDENTITY_VERDICTS_MAP, MESH_ENDPOINTS_CAPACITY,
        MESH_ENDPOINTS_MAP, MESH_F_DEFAULT_DENY, MESH_F_ENROLLED, MESH_F_LOCAL, MESH_F_STRICT,
        MESH_WORKLOADS_CAPACITY, MESH_WORKLOADS_MAP, MeshEndpoint, MeshEndpointKey, MeshWorkload,
        VERDICT_ALLOW, VERDICT_ANY_PORT, VERDICT_DENY, VerdictKey,
    },
};
use tracing::debug;

use super::{Datapath, DatapathError, addr_be, ip_from_be, link, map_err, take};
use crate::identity::SpiffeId;

/// The `tc` ingress program that refuses plaintext to `STRICT` pods.
pub const STRICT_INGRESS_PROGRAM: &str = "mesh_strict_ingress";

/// The agent's handles on the mesh maps (owned by [`Datapath`]).
pub(super) struct MeshMaps {
    workloads: HashMap<MapData, u64, MeshWorkload>,
    endpoints: HashMap<MapData, MeshEndpointKey, MeshEndpoint>,
    verdicts: HashMap<MapData, VerdictKey, u32>,
    capture: Array<MapData, CaptureConfig>,
    /// SPIFFE id → identity number handed out by this agent.
    numbers: StdHashMap<SpiffeId, u32>,
    /// Next identity number (persisted in `ID_ALLOC[ID_IDENTITY]` before it is used).
    next_number: Option<u64>,
}

impl MeshMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            workloads: take(ebpf, MESH_WORKLOADS_MAP)?,
            endpoints: take(ebpf, MESH_ENDPOINTS_MAP)?,
            verdicts: take(ebpf, IDENTITY_VERDICTS_MAP)?,
            capture: take(ebpf, CAPTURE_CONFIG_MAP)?,
            numbers: StdHashMap::new(),
            next_number: None,
        })
    }
}

/// A local workload (pod) as the kernel's mesh decisions see it, keyed by its cgroup id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshWorkloadSpec {
    /// cgroup v2 id (inode number of the pod's cgroup directory).
    pub cgroup_id: u64,
    /// Identity number ([`Datapath::identity_number`]); 0 = none.
    pub identity: u32,
    /// In the mesh (namespace label `kernmesh.io/dataplane-mode=mesh`, not opted out).
    pub enrolled: bool,
}

/// A pod address of the cluster as the kernel's mesh decisions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshEndpointSpec {
    pub addr: IpAddr,
    /// Identity number; 0 = none.
    pub identity: u32,
    pub enrolled: bool,
    /// The pod runs on this node.
    pub local: bool,
    pub peer_auth: PeerAuthentication,
    /// An `ALLOW` authorization policy selects the pod: same-node connects need an allowing
    /// verdict (Istio: "if any ALLOW policy selects the workload, something must allow").
    pub default_deny: bool,
}

/// Peer authentication of a pod (Istio's `PeerAuthentication` modes; default `PERMISSIVE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerAuthentication {
    /// Plaintext and mesh traffic are both accepted.
    #[default]
    Permissive,
    /// Plaintext from outside the mesh is refused (in the kernel).
    Strict,
}

/// One same-node identity verdict: source identity → destination identity on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityVerdict {
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Destination port; `None` = every port (looked up after the exact port).
    pub port: Option<u16>,
    pub allow: bool,
}

/// From the authorization engine's kernel entries (`authz::engine::kernel_entries`: key
/// (source identity, destination identity, port or 0 = any) → allowed).
impl From<((u32, u32, u16), bool)> for IdentityVerdict {
    fn from(((src_identity, dst_identity, port), allow): ((u32, u32, u16), bool)) -> Self {
        Self {
            src_identity,
            dst_identity,
            port: (port != VERDICT_ANY_PORT).then_some(port),
            allow,
        }
    }
}

/// Where a captured connection was going, looked up by the client address the agent's
/// outbound listener accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedConnection {
    /// The destination pod (after the kernel's load balancing).
    pub dst: SocketAddr,
    /// The service address the application connected to, if it went through one.
    pub service: Option<SocketAddr>,
    /// cgroup id of the source workload.
    pub src_cgroup_id: u64,
    /// Identity numbers of both ends at connect time.
    pub src_identity: u32,
    pub dst_identity: u32,
}

impl From<Captured> for CapturedConnection {
    fn from(c: Captured) -> Self {
        let dst = SocketAddr::new(
            ip_from_be(c.dst_addr_be, c.family),
            u16::from_be(c.dst_port_be),
        );
        let service = (c.flags & CAPTURED_F_SERVICE != 0).then(|| {
            SocketAddr::new(
                ip_from_be(c.svc_addr_be, c.family),
                u16::from_be(c.svc_port_be),
            )
        });
        Self {
            dst,
            service,
            src_cgroup_id: c.cgroup_id,
            src_identity: c.src_identity,
            dst_identity: c.dst_identity,
        }
    }
}

/// A read-only handle on the kernel's record of captured connections, opened from its pin (its
/// own map fd), so a proxy task can look up accepted connections without the data-path owner.
pub struct OriginalDstTable {
    map: HashMap<MapData, CaptureKey, Captured>,
}

impl OriginalDstTable {
    /// Opens the `CAPTURED` map pinned under `pin_dir` (the agent's `datapath.pinDir`).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join("maps").join(CAPTURED_MAP);
        let data = MapData::from_pin(&path).map_err(map_err("open pinned", CAPTURED_MAP))?;
        let map = HashMap::try_from(Map::LruHashMap(data))
            .map_err(map_err("open pinned", CAPTURED_MAP))?;
        Ok(Self { map })
    }

    /// The original destination of the connection whose client is `peer` (what `accept()`
    /// returned), if the kernel captured it and it has not closed.
    #[must_use]
    pub fn original_dst(&self, peer: SocketAddr) -> Option<CapturedConnection> {
        let key = capture_key(peer);
        self.map.get(&key, 0).ok().map(CapturedConnection::from)
    }
}

/// The `CAPTURED` key of an accepted peer: an IPv4-mapped IPv6 peer (a dual-stack listener) is
/// the IPv4 client the kernel filed it under.
fn capture_key(peer: SocketAddr) -> CaptureKey {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    let (addr_be, family) = addr_be(ip);
    CaptureKey {
        addr_be,
        port_be: peer.port().to_be(),
        family,
        _pad: 0,
    }
}

/// The `IDENTITY_VERDICTS` entries for `want`; two verdicts for one key: deny wins (Istio: any
/// DENY match denies).
fn verdict_entries(want: &[IdentityVerdict]) -> StdHashMap<VerdictKey, u32> {
    let mut out: StdHashMap<VerdictKey, u32> = StdHashMap::with_capacity(want.len());
    for v in want {
        let key = VerdictKey {
            src_identity: v.src_identity,
            dst_identity: v.dst_identity,
            port_be: v.port.map_or(VERDICT_ANY_PORT, u16::to_be),
            _pad: 0,
        };
        let verdict = if v.allow { VERDICT_ALLOW } else { VERDICT_DENY };
        let e = out.entry(key).or_insert(verdict);
        if verdict == VERDICT_DENY {
            *e = VERDICT_DENY;
        }
    }
    out
}

/// The key of a pod address in `MESH_ENDPOINTS`.
fn endpoint_key(ip: IpAddr) -> MeshEndpointKey {
    let (addr_be, family) = addr_be(ip);
    MeshEndpointKey {
        addr_be,
        family,
        _pad: [0; 3],
    }
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}

impl Datapath {
    /// Sets the agent's outbound listener that enrolled cross-node connects are sent to (Istio
    /// ztunnel's 15001 on the pods' gateway address). `None` for both addresses, or port 0,
    /// leaves capture unconfigured: enrolled cross-node connects then fail at once
    /// (`ECONNREFUSED`, counted `capture_miss`), never plaintext.
    pub fn set_capture(
        &mut self,
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
        port: u16,
    ) -> Result<(), DatapathError> {
        let conf = CaptureConfig {
            addr4_be: v4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            addr6_be: v6.map_or([0; 4], |a| addr_be(IpAddr::V6(a)).0),
            port_be: port.to_be(),
            _pad: 0,
        };
        self.mesh
            .capture
            .set(0, conf, 0)
            .map_err(map_err("write", CAPTURE_CONFIG_MAP))
    }

    /// The identity number of `id`, handed out once per SPIFFE id by this agent from the pinned
    /// counter `ID_ALLOC[ID_IDENTITY]` (persisted before it is returned), so a number never names
    /// two identities — across restarts too (a restarted agent hands out new numbers and rewrites
    /// every entry).
    pub fn identity_number(&mut self, id: &SpiffeId) -> Result<u32, DatapathError> {
        if let Some(n) = self.mesh.numbers.get(id) {
            return Ok(*n);
        }
        let mut next = match self.mesh.next_number {
            Some(n) => n,
            None => self
                .id_alloc
                .get(&ID_IDENTITY, 0)
                .map_err(map_err("read", ID_ALLOC_MAP))?
                .max(1),
        };
        let mut n = (next & u64::from(u32::MAX)) as u32;
        if n == 0 {
            // The 32-bit wrap: 0 means "no identity".
            next += 1;
            n = 1;
        }
        next += 1;
        self.id_alloc
            .set(ID_IDENTITY, next, 0)
            .map_err(map_err("write", ID_ALLOC_MAP))?;
        self.mesh.next_number = Some(next);
        self.mesh.numbers.insert(id.clone(), n);
        debug!(identity = %id, number = n, "identity number assigned");
        Ok(n)
    }

    /// Sets the local workloads (by cgroup id), writing only what changed and removing the rest.
    pub fn set_mesh_workloads(&mut self, want: &[MeshWorkloadSpec]) -> Result<(), DatapathError> {
        if want.len() > MESH_WORKLOADS_CAPACITY as usize {
            self.map_full_total += 1;
            return Err(DatapathError::MapFull {
                name: MESH_WORKLOADS_MAP,
                capacity: MESH_WORKLOADS_CAPACITY,
                what: format!("{} local mesh workloads", want.len()),
            });
        }
        let want: StdHashMap<u64, MeshWorkload> = want
            .iter()
            .map(|w| {
                (
                    w.cgroup_id,
                    MeshWorkload {
                        identity: w.identity,
                        flags: flag(w.enrolled, MESH_F_ENROLLED),
                    },
                )
            })
            .collect();
        let map = &mut self.mesh.workloads;
        let have: StdHashMap<u64, MeshWorkload> = map.iter().filter_map(Result::ok).collect();
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                map.insert(k, v, 0)
                    .map_err(map_err("write", MESH_WORKLOADS_MAP))?;
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            let _ = map.remove(k);
        }
        Ok(())
    }

    /// Sets the mesh pods of the cluster (by address), writing only what changed.
    pub fn set_mesh_endpoints(&mut self, want: &[MeshEndpointSpec]) -> Result<(), DatapathError> {
        if want.len() > MESH_ENDPOINTS_CAPACITY as usize {
            self.map_full_total += 1;
            return Err(DatapathError::MapFull {
                name: MESH_ENDPOINTS_MAP,
                capacity: MESH_ENDPOINTS_CAPACITY,
                what: format!("{} mesh pod addresses", want.len()),
            });
        }
        let want: StdHashMap<MeshEndpointKey, MeshEndpoint> = want
            .iter()
            .map(|e| {
                (
                    endpoint_key(e.addr),
                    MeshEndpoint {
                        identity: e.identity,
                        flags: flag(e.enrolled, MESH_F_ENROLLED)
                            | flag(e.local, MESH_F_LOCAL)
                            | flag(e.peer_auth == PeerAuthentication::Strict, MESH_F_STRICT)
                            | flag(e.default_deny, MESH_F_DEFAULT_DENY),
                    },
                )
            })
            .collect();
        let map = &mut self.mesh.endpoints;
        let have: StdHashMap<MeshEndpointKey, MeshEndpoint> =
            map.iter().filter_map(Result::ok).collect();
        for (k, v) in &want {
            if have.get(k) != Some(v) {
                map.insert(k, v, 0)
                    .map_err(map_err("write", MESH_ENDPOINTS_MAP))?;
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            let _ = map.remove(k);
        }
        Ok(())
    }

    /// Sets the same-node identity verdicts (from the authorization engine): new and changed
    /// entries are written before stale ones are removed. A pair without a verdict gets its
    /// destination's default (deny when an `ALLOW` policy selects it).
    pub fn set_identity_verdicts(&mut self, want: &[IdentityVerdict]) -> Result<(), DatapathError> {
        if want.len() > IDENTITY_VERDICTS_CAPACITY as usize {
            self.map_full_total += 1;
            return Err(DatapathError::MapFull {
                name: IDENTITY_VERDICTS_MAP,
                capacity: IDENTITY_VERDICTS_CAPACITY,
                what: format!("{} identity verdicts", want.len()),
            });
        }
        let wanted = verdict_entries(want);
        let map = &mut self.mesh.verdicts;
        let have: StdHashMap<VerdictKey, u32> = map.iter().filter_map(Result::ok).collect();
        for (k, v) in &wanted {
            if have.get(k) != Some(v) {
                map.insert(k, v, 0)
                    .map_err(map_err("write", IDENTITY_VERDICTS_MAP))?;
            }
        }
        for k in have.keys().filter(|k| !wanted.contains_key(k)) {
            let _ = map.remove(k);
        }
        Ok(())
    }

    /// Attaches the `STRICT` ingress program (tcx, ingress) to `ifname` in the calling thread's
    /// network namespace — the node's uplink, where traffic from other nodes arrives — through a
    /// link pinned at `<pin>/links/mesh_strict_ingress_<ifname>`; an existing pin (a restart) has
    /// its program replaced in place.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let name = STRICT_INGRESS_PROGRAM;
        let prog_err = |op| move |source| DatapathError::Program { op, name, source };
        let pin: PathBuf = self
            .pin_dir
            .join("links")
            .join(format!("{name}_{}", ifname.replace('.', "_")));
        let prog: &mut SchedClassifier = super::program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(prog_err("load"))?;
        }
        if pin.exists() {
            let fd = prog.fd().map_err(prog_err("get fd of"))?;
            link::update_pinned(&pin, fd.as_fd().as_raw_fd()).map_err(|source| {
                DatapathError::Io {
                    op: "update pinned link",
                    path: pin.clone(),
                    source,
                }
            })?;
            return Ok(());
        }
        let id = prog
            .attach_with_options(
                ifname,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
            )
            .map_err(prog_err("attach"))?;
        let link = prog.take_link(id).map_err(prog_err("take link of"))?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Io {
            op: "convert link",
            path: pin.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        super::pin_link(fd_link, name, &pin)
    }

    /// A handle on the captured-connection records for the proxies (its own map fd).
    pub fn original_dst_table(&self) -> Result<OriginalDstTable, DatapathError> {
        OriginalDstTable::open(&self.pin_dir)
    }

    /// The mesh pods currently in the kernel (for status and tests).
    pub fn mesh_endpoints(&self) -> Vec<(IpAddr, MeshEndpoint)> {
        self.mesh
            .endpoints
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (ip_from_be(k.addr_be, k.family), v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::{FAMILY_V4, FAMILY_V6};

    use super::*;

    #[test]
    fn deny_wins_and_any_port_is_zero() {
        let v = |port, allow| IdentityVerdict {
            src_identity: 1,
            dst_identity: 2,
            port,
            allow,
        };
        let e = verdict_entries(&[v(Some(80), true), v(Some(80), false), v(None, true)]);
        assert_eq!(e.len(), 2);
        let key = |port_be| VerdictKey {
            src_identity: 1,
            dst_identity: 2,
            port_be,
            _pad: 0,
        };
        assert_eq!(e[&key(80u16.to_be())], VERDICT_DENY);
        assert_eq!(e[&key(VERDICT_ANY_PORT)], VERDICT_ALLOW);
    }

    #[test]
    fn engine_entries_convert_with_port_zero_as_any() {
        let any = IdentityVerdict::from(((1, 2, 0), false));
        assert_eq!((any.port, any.allow), (None, false));
        let exact = IdentityVerdict::from(((1, 2, 443), true));
        assert_eq!((exact.src_identity, exact.dst_identity), (1, 2));
        assert_eq!((exact.port, exact.allow), (Some(443), true));
    }

    #[test]
    fn mapped_peers_are_looked_up_as_ipv4() {
        let v4: SocketAddr = "10.1.0.2:40000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.0.2]:40000".parse().unwrap();
        assert_eq!(capture_key(v4), capture_key(mapped));
        assert_eq!(capture_key(v4).family, FAMILY_V4);
        assert_eq!(capture_key(v4).port_be, 40000u16.to_be());
        let v6: SocketAddr = "[fd00:1::2]:40000".parse().unwrap();
        assert_eq!(capture_key(v6).family, FAMILY_V6);
    }

    #[test]
    fn a_record_reads_back_as_the_destination_and_service() {
        let (dst, _) = addr_be("10.2.0.2".parse().unwrap());
        let (vip, _) = addr_be("10.96.0.10".parse().unwrap());
        let c = Captured {
            cgroup_id: 7,
            dst_addr_be: dst,
            svc_addr_be: vip,
            dst_port_be: 8080u16.to_be(),
            svc_port_be: 80u16.to_be(),
            family: FAMILY_V4,
            flags: CAPTURED_F_SERVICE,
            src_identity: 3,
            dst_identity: 4,
            ..Captured::default()
        };
        let got = CapturedConnection::from(c);
        assert_eq!(got.dst, "10.2.0.2:8080".parse().unwrap());
        assert_eq!(got.service, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!(
            (got.src_cgroup_id, got.src_identity, got.dst_identity),
            (7, 3, 4)
        );
        let direct = CapturedConnection::from(Captured { flags: 0, ..c });
        assert_eq!(
            direct.service, None,
            "a pod dialled directly has no service"
        );
    }
}
