//! Upgrade from the previous data-path generation's map layout (session 17): an agent started on
//! a node where `SERVICE_CONF`/`BACKEND_SLOTS`/`BACKENDS` (the old layouts) are pinned copies
//! them into `SERVICE_CONF_V2`/`SERVICE_SLOTS`/`BACKEND_ADDRS` before it swaps the programs,
//! serves without dropping a connection, keeps the circuits' state, and removes the old pins.
//!
//! No binary of the old build is at hand in a test, so the old generation is simulated: the
//! data path is loaded and serving, then its new-layout pins are replaced by maps of the old
//! names and layouts (created with `bpftool`, filled with the same services) — exactly what an
//! old agent leaves pinned. The programs attached meanwhile keep serving from the unpinned maps,
//! as the old programs would from theirs until the new agent swaps them.

mod fixture;

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, Map, MapData};
use fixture::{Mesh, vip4};
use mesh_agent::datapath::{
    Datapath, DatapathConfig, service_key,
    spec::{Algorithm, Protocol, ServiceSpec},
};
use mesh_common::{
    backend::{BACKEND_ADDRS_MAP, BackendAddr, state_slot},
    legacy,
    service::{SERVICE_CONF_MAP, SLOTS_MAP, Service},
};

fn bpftool_create(path: &Path, key: u32, value: u32, entries: u32, name: &str) {
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(["type", "hash", "key", &key.to_string(), "value"])
        .args([
            &value.to_string(),
            "entries",
            &entries.to_string(),
            "name",
            name,
        ])
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "bpftool map create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hash<K: aya::Pod, V: aya::Pod>(path: &Path) -> HashMap<MapData, K, V> {
    HashMap::try_from(Map::HashMap(MapData::from_pin(path).unwrap())).unwrap()
}

fn array<V: aya::Pod>(path: &Path) -> Array<MapData, V> {
    Array::try_from(Map::Array(MapData::from_pin(path).unwrap())).unwrap()
}

/// Replaces the new-layout pins under `maps` by old-layout maps holding the same services.
/// Returns how many backends were written.
fn pin_previous_generation(maps: &Path) -> usize {
    let confs: HashMap<MapData, u32, Service> = hash(&maps.join(SERVICE_CONF_MAP));
    let slots: Array<MapData, u32> = array(&maps.join(SLOTS_MAP));
    let addrs: Array<MapData, BackendAddr> = array(&maps.join(BACKEND_ADDRS_MAP));
    bpftool_create(
        &maps.join(legacy::SERVICE_CONF_MAP),
        4,
        68,
        131_072,
        legacy::SERVICE_CONF_MAP,
    );
    bpftool_create(
        &maps.join(legacy::BACKEND_SLOTS_MAP),
        8,
        4,
        262_144,
        legacy::BACKEND_SLOTS_MAP,
    );
    bpftool_create(
        &maps.join(legacy::BACKENDS_MAP),
        4,
        28,
        262_144,
        legacy::BACKENDS_MAP,
    );
    let mut old_confs: HashMap<MapData, u32, legacy::Service> =
        hash(&maps.join(legacy::SERVICE_CONF_MAP));
    let mut old_slots: HashMap<MapData, legacy::SlotKey, u32> =
        hash(&maps.join(legacy::BACKEND_SLOTS_MAP));
    let mut old_backends: HashMap<MapData, u32, legacy::Backend> =
        hash(&maps.join(legacy::BACKENDS_MAP));
    let mut written = 0;
    for entry in &confs {
        let (conf_id, c) = entry.unwrap();
        let old = legacy::Service {
            key: c.key,
            conf_id: c.conf_id,
            id: c.id,
            backend_count: c.backend_count,
            algorithm: c.algorithm,
            flags: c.flags,
            _pad: 0,
            table_size: c.table_size,
            affinity_timeout_s: c.affinity_timeout_s,
            max_connections: c.max_connections,
            consecutive_failures: c.consecutive_failures,
            base_ejection_ms: c.base_ejection_ms,
            max_ejection_ms: c.max_ejection_ms,
            max_ejection_pct: c.max_ejection_pct.into(),
            panic_threshold_pct: c.panic_threshold_pct.into(),
        };
        old_confs.insert(conf_id, old, 0).unwrap();
        for i in 0..c.backend_count {
            let id = slots.get(&(c.slot_base + i), 0).unwrap();
            let b = addrs.get(&state_slot(id), 0).unwrap();
            assert_eq!((b.id, b.service_id), (id, c.id), "a live backend");
            let key = legacy::SlotKey {
                service_id: c.id,
                slot: i,
            };
            old_slots.insert(key, id, 0).unwrap();
            let value = legacy::Backend {
                addr_be: b.addr_be,
                port_be: b.port_be,
                family: b.family,
                _pad: 0,
                service_id: c.id,
                weight: b.weight,
            };
            old_backends.insert(id, value, 0).unwrap();
            written += 1;
        }
    }
    for name in [SERVICE_CONF_MAP, SLOTS_MAP, BACKEND_ADDRS_MAP] {
        std::fs::remove_file(maps.join(name)).unwrap();
    }
    written
}

#[test]
fn an_agent_on_the_previous_generations_pins_migrates_them_and_serves_throughout() {
    let Some(_k) = mesh_tests::kernel_test("datapath_upgrade") else {
        return;
    };
    let mut m = Mesh::new("datapath_upgrade", 3).expect("cluster");
    let vip = vip4(80);
    let spec = ServiceSpec {
        algorithm: Algorithm::RoundRobin,
        ..ServiceSpec::tcp(vip, m.backend_addrs(80))
    };
    m.dp.apply_service(&spec).unwrap();
    let r = m.client.hit(vip, 30, &[]).unwrap();
    assert_eq!(r.ok(), 30, "{r:?}");
    let key = service_key(vip, Protocol::Tcp);
    let before = m.dp.backend_status(&key).unwrap();
    let maps = m.dp.pin_dir().join("maps");
    assert_eq!(pin_previous_generation(&maps), 3);
    for name in legacy::MAP_NAMES {
        assert!(maps.join(name).exists(), "old pin {name} in place");
    }

    // Connections run while the new agent starts on the old pins.
    let client = m.client.clone();
    let load = thread::spawn(move || client.hit(vip, 20_000, &["--timeout-ms", "2000"]).unwrap());
    thread::sleep(Duration::from_millis(300));
    let cfg = DatapathConfig {
        cgroup: m.node.cgroup_dir().to_path_buf(),
        pin_dir: m.dp.pin_dir().to_path_buf(),
    };
    let started = Instant::now();
    m.dp = Datapath::load(&cfg).expect("the new agent loads on the old pins");
    let took = started.elapsed();
    assert!(
        !load.is_finished(),
        "the client was still connecting when the upgrade finished ({took:?})"
    );
    let r = load.join().unwrap();
    assert_eq!(
        r.failed(),
        0,
        "zero failed connections across the upgrade: {:?}",
        r.errors
    );
    assert_eq!(r.ok(), 20_000);
    assert_eq!(r.counts.len(), 3, "every backend kept serving: {r:?}");

    for name in legacy::MAP_NAMES {
        assert!(
            !maps.join(name).exists(),
            "the old pin {name} is removed after the swap"
        );
    }
    for name in [SERVICE_CONF_MAP, SLOTS_MAP, BACKEND_ADDRS_MAP] {
        assert!(maps.join(name).exists(), "new pin {name}");
    }
    // The service, its backend ids and their counters carried over.
    let after = m.dp.backend_status(&key).unwrap();
    assert_eq!(
        after.iter().map(|b| (b.id, b.addr)).collect::<Vec<_>>(),
        before.iter().map(|b| (b.id, b.addr)).collect::<Vec<_>>(),
        "same backends, same ids"
    );
    let total = |s: &[mesh_agent::datapath::BackendStatus]| -> u64 {
        s.iter().map(|b| b.state.total).sum()
    };
    assert!(
        total(&after) >= total(&before) + 20_000,
        "the circuits' counters carried over: {} then {}",
        total(&before),
        total(&after)
    );
    // Round robin from the migrated configuration, then a change applies in a new range.
    let r = m.client.hit(vip, 30, &[]).unwrap();
    for b in ["b0", "b1", "b2"] {
        assert_eq!(
            r.counts.get(b),
            Some(&10),
            "round robin after the upgrade: {r:?}"
        );
    }
    let fewer = ServiceSpec {
        algorithm: Algorithm::RoundRobin,
        ..ServiceSpec::tcp(vip, m.backend_addrs(80)[..2].to_vec())
    };
    m.dp.apply_service(&fewer).unwrap();
    let r = m.client.hit(vip, 20, &[]).unwrap();
    assert_eq!(
        (r.counts.get("b0"), r.counts.get("b1"), r.counts.get("b2")),
        (Some(&10), Some(&10), None),
        "{r:?}"
    );
}

#[test]
fn a_restart_on_this_generations_pins_has_nothing_to_migrate() {
    let Some(_k) = mesh_tests::kernel_test("datapath_upgrade_noop") else {
        return;
    };
    let mut m = Mesh::new("datapath_upgrade_noop", 2).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .unwrap();
    let cfg = DatapathConfig {
        cgroup: m.node.cgroup_dir().to_path_buf(),
        pin_dir: m.dp.pin_dir().to_path_buf(),
    };
    m.dp = Datapath::load(&cfg).unwrap();
    let maps = m.dp.pin_dir().join("maps");
    for name in legacy::MAP_NAMES {
        assert!(!maps.join(name).exists(), "no old pin {name}");
    }
    let r = m.client.hit(vip, 20, &[]).unwrap();
    assert_eq!(r.ok(), 20, "{r:?}");
    assert_eq!(m.dp.service_keys().count(), 1);
}
