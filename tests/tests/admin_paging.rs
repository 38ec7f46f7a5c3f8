//! Paged lists through `meshctl`: with 1,200 services, `meshctl services` and `meshctl circuits
//! --all` page through the agent's admin API (Kubernetes-style `limit`/`continue`) and show every
//! service exactly once — also while other services are added and removed under the listing.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Cluster,
    agent::{AgentProcess, write_atomically},
};
use serde_json::Value;

/// Services present throughout.
const STABLE: usize = 1_200;

/// `STABLE` services `svc-N` (10.96.x.y) plus churn services `churn-G-N` (10.97.x.y) whose set
/// changes with `generation`: some added ahead of a listing's position, some removed behind it.
fn model(generation: usize) -> String {
    let mut y = String::from("services:\n");
    let mut service = |name: String, ip: String| {
        let _ = write!(
            y,
            "  - name: {name}\n    clusterIPs: [{ip}]\n    ports: [{{ port: 80 }}]\n    endpoints:\n      - {{ ip: 10.200.0.1 }}\n"
        );
    };
    for s in 0..STABLE {
        service(
            format!("svc-{s}"),
            format!("10.96.{}.{}", s / 250, s % 250 + 1),
        );
    }
    // 100 churn services per generation, over a window that slides by 37 addresses each time.
    for c in 0..100 {
        let n = (generation * 37 + c * 7) % 2_000;
        service(
            format!("churn-{n}"),
            format!("10.97.{}.{}", n / 250, n % 250 + 1),
        );
    }
    y
}

/// How many times each stable service appears in the JSON list `items` (by `field`).
fn counts(items: &Value, field: impl Fn(&Value) -> Option<String>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for item in items.as_array().expect("a JSON list") {
        if let Some(name) = field(item).filter(|n| n.starts_with("svc-") || n.contains("/svc-")) {
            *seen.entry(name).or_default() += 1;
        }
    }
    seen
}

fn generation(agent: &AgentProcess) -> u64 {
    agent.meshctl_json(&["status"]).unwrap()["model_generation"]
        .as_u64()
        .unwrap()
}

#[test]
fn meshctl_pages_through_1200_services_exactly_once_while_services_change() {
    let Some(_k) = mesh_tests::kernel_test("admin_paging") else {
        return;
    };
    let cluster = Cluster::new("admin_paging").unwrap();
    let node = cluster.add_node("a").unwrap();
    let dir = cluster.bpffs_dir().unwrap();
    let work = std::env::temp_dir().join(cluster.prefix());
    std::fs::create_dir_all(&work).unwrap();
    let config = work.join("mesh.yaml");
    write_atomically(&config, &model(0)).unwrap();
    let mut agent = AgentProcess::new(node, config.clone(), dir.join("a"), work.join("admin.sock"));
    agent.start().unwrap();

    // A still model first: the default page (500) lists all 1,200 (+100) in three calls.
    let all = agent.meshctl_json(&["services"]).unwrap();
    let seen = counts(&all, |s| s["name"].as_str().map(str::to_owned));
    assert_eq!(seen.len(), STABLE, "every stable service listed");
    assert!(seen.values().all(|&n| n == 1), "a service listed twice");
    assert_eq!(all.as_array().unwrap().len(), STABLE + 100);

    // Then while a writer rewrites the model every 30 ms (100 services in, others out).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, written, config) = (Arc::clone(&stop), Arc::clone(&written), config.clone());
        thread::spawn(move || {
            let mut g = 1;
            while !stop.load(Ordering::Relaxed) {
                write_atomically(&config, &model(g)).unwrap();
                written.fetch_add(1, Ordering::Relaxed);
                g += 1;
                thread::sleep(Duration::from_millis(30));
            }
        })
    };
    let start = Instant::now();
    let mut spanning = 0;
    let mut listings = 0;
    while spanning < 3 && start.elapsed() < Duration::from_secs(8) {
        let before = generation(&agent);
        // Small pages: 24+ calls per listing, so reconciliations land between them.
        let services = agent
            .meshctl_json(&["services", "--chunk-size", "50"])
            .unwrap();
        let backends = agent
            .meshctl_json(&["circuits", "--all", "--chunk-size", "60"])
            .unwrap();
        let after = generation(&agent);
        listings += 1;
        if after > before {
            spanning += 1;
        }
        for (what, seen) in [
            (
                "services",
                counts(&services, |s| s["name"].as_str().map(str::to_owned)),
            ),
            (
                "circuits",
                counts(&backends, |b| b["service"].as_str().map(str::to_owned)),
            ),
        ] {
            assert_eq!(
                seen.len(),
                STABLE,
                "listing {listings} of {what}: every stable service listed"
            );
            let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
            assert!(
                twice.is_empty(),
                "listing {listings} of {what}: listed more than once: {twice:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        spanning >= 3,
        "only {spanning} of {listings} listings spanned a reconciliation ({} writes): the test did not test paging under change",
        written.load(Ordering::Relaxed)
    );
}
