//! `SERVICE_SLOTS` ranges (session 17): every configuration's backend ids in a range of one
//! array. When no free range is long enough — every element held by live configurations or by
//! freed ranges still in their quarantine — the update is refused as a full map, nothing is
//! truncated, the previous configuration keeps serving, and once the quarantine is over the
//! same update fits.

mod fixture;

use std::{
    net::{Ipv4Addr, SocketAddr},
    thread,
    time::Duration,
};

use fixture::{Mesh, vip4};
use mesh_agent::datapath::{
    DatapathError,
    ranges::RANGE_QUARANTINE,
    service_key,
    spec::{Algorithm, Protocol, ServiceSpec},
};
use mesh_common::service::{MAX_BACKENDS_PER_SERVICE, SLOTS_CAPACITY, SLOTS_MAP};

/// Service `i` of three with `MAX_BACKENDS_PER_SERVICE` endpoints each; endpoint addresses are
/// never connected to.
fn big(i: u8) -> ServiceSpec {
    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 1, i), 80));
    let backends = (0..MAX_BACKENDS_PER_SERVICE).map(move |n| {
        let ip = Ipv4Addr::new(10, 200 + i, (n >> 8) as u8, (n & 0xff) as u8);
        SocketAddr::new(ip.into(), 80)
    });
    ServiceSpec {
        algorithm: Algorithm::RoundRobin,
        ..ServiceSpec::tcp(vip, backends)
    }
}

#[test]
fn no_free_range_is_a_full_map_and_the_last_configuration_serves() {
    let Some(_k) = mesh_tests::kernel_test("datapath_slots_full") else {
        return;
    };
    let per = MAX_BACKENDS_PER_SERVICE;
    assert_eq!(8 * per, SLOTS_CAPACITY, "the arithmetic below");
    let mut m = Mesh::new("datapath_slots_full", 1).expect("cluster");
    let vip = vip4(80);
    m.dp.apply_service(&ServiceSpec::tcp(vip, m.backend_addrs(80)))
        .unwrap();
    for i in 0..3 {
        m.dp.apply_service(&big(i)).unwrap();
    }
    // Live: 1 + 3 × 65,536 slots, the rest free in one piece (327,679). Every apply writes a new
    // configuration in a new range and frees the old one into quarantine: four fit, the fifth
    // finds 65,535 free. The quarantine is made long so that a slow machine cannot see one end.
    m.dp.set_range_quarantine(Duration::from_mins(10));
    for i in [0, 1, 2, 0] {
        m.dp.apply_service(&big(i)).unwrap();
    }
    // Refused while 327,679 elements were free: only because ranges were quarantined.
    let err =
        m.dp.apply_service(&big(1))
            .expect_err("a fifth range of 65,536 fitted while four were quarantined");
    let DatapathError::MapFull { name, capacity, .. } = &err else {
        panic!("not a full map: {err}");
    };
    assert_eq!((*name, *capacity), (SLOTS_MAP, SLOTS_CAPACITY), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("SERVICE_SLOTS") && text.contains("full") && text.contains("65536"),
        "{text}"
    );
    assert!(m.dp.map_full_total() >= 1);
    // Nothing truncated: service 1 still has all of its backends; the small service serves.
    let key1 = service_key(big(1).vip, Protocol::Tcp);
    assert_eq!(m.dp.backend_status(&key1).unwrap().len(), per as usize);
    let r = m.client.hit(vip, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "{r:?}");
    // After the quarantine the freed ranges are free again: the same update fits.
    m.dp.set_range_quarantine(RANGE_QUARANTINE);
    thread::sleep(RANGE_QUARANTINE + Duration::from_millis(100));
    m.dp.apply_service(&big(1)).unwrap();
    for i in 0..3 {
        assert!(
            m.dp.remove_service(&service_key(big(i).vip, Protocol::Tcp))
                .unwrap()
        );
    }
    let r = m.client.hit(vip, 10, &[]).unwrap();
    assert_eq!(r.ok(), 10, "{r:?}");
}
