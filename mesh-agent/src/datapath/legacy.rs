//! Upgrade from the previous data-path generation: copies the services a previous agent left in
//! the old-layout pinned maps (`SERVICE_CONF`, `BACKEND_SLOTS`, `BACKENDS`) into this generation's
//! (`SERVICE_CONF_V2`, `SERVICE_SLOTS`, `BACKEND_ADDRS`) before the programs are swapped, and
//! removes the old pins after.
//!
//! The old programs keep serving from the old maps until `BPF_LINK_UPDATE` swaps each link; the
//! new ones find everything in place: the same `SERVICES` (same layout, same configuration ids),
//! the same `BACKEND_STATE` (counters and circuits carry over), the same lookup tables. So an
//! upgrade drops no connection and resets no circuit, like a restart of the same build.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Instant,
};

use aya::maps::{HashMap, Map, MapData};
use mesh_common::{
    backend::{BACKEND_ADDRS_MAP, BackendAddr, state_slot},
    legacy,
    service::{SERVICE_CONF_MAP, SERVICES_MAP, SLOTS_CAPACITY, SLOTS_MAP, Service, ServiceKey},
};
use tracing::{info, warn};

use super::{Datapath, DatapathError, map_err, ranges::Ranges, write_array};

fn open<K: aya::Pod, V: aya::Pod>(
    maps_dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let path = maps_dir.join(name);
    let io = |e: String| DatapathError::Io {
        op: "open the previous generation's pinned map",
        path: path.clone(),
        source: std::io::Error::other(e),
    };
    let data = MapData::from_pin(&path).map_err(|e| io(e.to_string()))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|e| io(e.to_string()))
}

/// Copies every published service of the previous generation's pins under `maps_dir` into
/// `dp`'s maps; returns the previous generation's map names that are pinned there (to unpin
/// once the programs are swapped). Idempotent: a configuration already in `SERVICE_CONF_V2`
/// (an upgrade interrupted after copying it) is kept as it is.
pub(super) fn migrate(
    dp: &mut Datapath,
    maps_dir: &Path,
) -> Result<Vec<&'static str>, DatapathError> {
    let present: Vec<&'static str> = legacy::MAP_NAMES
        .into_iter()
        .filter(|n| maps_dir.join(n).exists())
        .collect();
    if !present.contains(&legacy::SERVICE_CONF_MAP) {
        // Without the old configurations nothing old is published (any other old pin is left
        // from an interrupted upgrade that already copied them): only unpin.
        return Ok(present);
    }
    let confs: HashMap<MapData, u32, legacy::Service> = open(maps_dir, legacy::SERVICE_CONF_MAP)?;
    let slots: Option<HashMap<MapData, legacy::SlotKey, u32>> = present
        .contains(&legacy::BACKEND_SLOTS_MAP)
        .then(|| open(maps_dir, legacy::BACKEND_SLOTS_MAP))
        .transpose()?;
    let backends: Option<HashMap<MapData, u32, legacy::Backend>> = present
        .contains(&legacy::BACKENDS_MAP)
        .then(|| open(maps_dir, legacy::BACKENDS_MAP))
        .transpose()?;
    let services: Vec<(ServiceKey, u32)> = dp
        .services
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_err("read", SERVICES_MAP))?;
    // Ranges for the copies; `adopt` then reserves every published configuration's range in the
    // agent's own allocator. Ranges of configurations already copied stay theirs.
    let mut ranges = Ranges::new(SLOTS_CAPACITY);
    let mut done = HashSet::new();
    for (_, conf_id) in &services {
        if let Ok(c) = dp.confs.get(conf_id, 0) {
            ranges.reserve(c.slot_base, c.backend_count);
            done.insert(*conf_id);
        }
    }
    let (mut copied, mut copied_backends) = (0usize, 0usize);
    let now = Instant::now();
    for (key, conf_id) in services {
        if done.contains(&conf_id) {
            continue;
        }
        let Ok(old) = confs.get(&conf_id, 0) else {
            continue;
        };
        let n = copy_service(
            dp,
            &old,
            &mut ranges,
            slots.as_ref(),
            backends.as_ref(),
            now,
        )
        .map_err(|e| match e {
            DatapathError::MapFull { name, capacity, .. } => DatapathError::MapFull {
                name,
                capacity,
                what: format!(
                    "{key:?} (copying the previous generation's configuration {conf_id})"
                ),
            },
            e => e,
        })?;
        copied_backends += n;
        copied += 1;
    }
    info!(
        services = copied,
        backends = copied_backends,
        old_maps = ?present,
        "copied the previous data-path generation's maps into this one's"
    );
    Ok(present)
}

/// Copies one old configuration: its backends (whose state slot is their own) into
/// `BACKEND_ADDRS`, its slots into a new range, itself into `SERVICE_CONF_V2` under the same id.
/// Returns the backends copied.
fn copy_service(
    dp: &mut Datapath,
    old: &legacy::Service,
    ranges: &mut Ranges,
    slots: Option<&HashMap<MapData, legacy::SlotKey, u32>>,
    backends: Option<&HashMap<MapData, u32, legacy::Backend>>,
    now: Instant,
) -> Result<usize, DatapathError> {
    let mut ids = Vec::with_capacity(old.backend_count as usize);
    let mut addrs = Vec::with_capacity(old.backend_count as usize);
    for slot in 0..old.backend_count {
        let Some(id) = slots.and_then(|m| {
            m.get(
                &legacy::SlotKey {
                    service_id: old.id,
                    slot,
                },
                0,
            )
            .ok()
        }) else {
            continue;
        };
        let Some(b) = backends
            .and_then(|m| m.get(&id, 0).ok())
            .filter(|b| b.service_id == old.id)
        else {
            continue;
        };
        // Only a backend whose state slot is its own (the old kernel skipped others too).
        if dp
            .backend_state
            .get(&state_slot(id), 0)
            .is_ok_and(|st| st.id == id)
        {
            ids.push(id);
            addrs.push(BackendAddr {
                id,
                service_id: old.id,
                addr_be: b.addr_be,
                port_be: b.port_be,
                family: b.family,
                _pad: 0,
                weight: b.weight,
            });
        }
    }
    let n = ids.len() as u32;
    let base = ranges.alloc(n, now).ok_or_else(|| DatapathError::MapFull {
        name: SLOTS_MAP,
        capacity: SLOTS_CAPACITY,
        what: String::new(),
    })?;
    let state_slots: Vec<u32> = ids.iter().map(|id| state_slot(*id)).collect();
    let cleared = vec![BackendAddr::default(); ids.len()];
    write_array(
        &mut dp.backend_addrs,
        BACKEND_ADDRS_MAP,
        &state_slots,
        &cleared,
    )?;
    write_array(
        &mut dp.backend_addrs,
        BACKEND_ADDRS_MAP,
        &state_slots,
        &addrs,
    )?;
    let keys: Vec<u32> = (base..base + n).collect();
    write_array(&mut dp.slots, SLOTS_MAP, &keys, &ids)?;
    let conf = Service {
        key: old.key,
        conf_id: old.conf_id,
        id: old.id,
        backend_count: n,
        algorithm: old.algorithm,
        flags: old.flags,
        _pad: 0,
        table_size: old.table_size,
        affinity_timeout_s: old.affinity_timeout_s,
        max_connections: old.max_connections,
        consecutive_failures: old.consecutive_failures,
        base_ejection_ms: old.base_ejection_ms,
        max_ejection_ms: old.max_ejection_ms,
        max_ejection_pct: super::percent(old.max_ejection_pct),
        panic_threshold_pct: super::percent(old.panic_threshold_pct),
        _pad2: 0,
        slot_base: base,
    };
    dp.confs
        .insert(old.conf_id, conf, 0)
        .map_err(map_err("write", SERVICE_CONF_MAP))?;
    Ok(ids.len())
}

/// Removes the previous generation's pins (after the programs were swapped). A failure is only
/// logged: the maps are unused, and the next start tries again.
pub(super) fn unpin(maps_dir: &Path, names: &[&'static str]) {
    for name in names {
        let path: PathBuf = maps_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "removed the previous generation's pinned map"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "could not remove the previous generation's pinned map");
            }
        }
    }
}
