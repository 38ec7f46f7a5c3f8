//! The relay finds the agents by watching their pods (`--agent-pods`), against the kmock API
//! stand-in: matching running pods with an IP are followed on `--agent-port`, others are not, and
//! a deleted pod stops being followed. Nothing listens on those addresses, so each agent shows
//! as a `down` source named by its address in `meshctl --server status`.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use mesh_agent::discovery::kubernetes::{
    k8s_openapi::api::core::v1::{Namespace, Pod},
    kube::{
        self, Api,
        api::{DeleteParams, PostParams},
    },
};
use mesh_tests::{agent::workspace_binary, kmock::Kmock};
use serde_json::{Value, json};

const NS: &str = "mesh-system";
const RELAY: &str = "127.0.0.1:14245";

/// A CA and the relay's client certificate (the agents are never reached here).
fn certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["relay".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("relay.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("relay.key"), key.serialize_pem()).unwrap();
}

fn pod(name: &str, app: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "namespace": NS, "labels": { "app.kubernetes.io/name": app } },
        "spec": { "containers": [] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    }))
    .unwrap()
}

/// The agent addresses the relay follows now.
fn followed() -> Result<BTreeSet<String>, String> {
    let out = Command::new(workspace_binary("meshctl").unwrap())
        .args(["--server", RELAY, "status", "-o", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect())
}

fn wait_for_set(want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let start = Instant::now();
    let mut last = Err(String::new());
    while start.elapsed() < Duration::from_secs(20) {
        last = followed();
        if last.as_ref() == Ok(&want) {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("the relay follows {last:?}, expected {want:?}");
}

#[test]
fn relay_follows_the_agent_pods_a_watch_finds_and_drops_deleted_ones() {
    let work = std::env::temp_dir().join(format!("relay_kubernetes-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    certs(&work);
    let kmock = Kmock::start(&work, None).expect("kmock API stand-in");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kube = rt
        .block_on(async { kube::Client::try_from(kube::Config::new(kmock.url.parse().unwrap())) })
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(kube.clone(), NS);
    rt.block_on(async {
        let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": NS } })).unwrap();
        Api::<Namespace>::all(kube.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap();
        for p in [
            pod("mesh-agent-a", "mesh-agent", "127.0.0.2"),
            pod("mesh-agent-b", "mesh-agent", "127.0.0.3"),
            pod("mesh-ca-x", "mesh-ca", "127.0.0.4"),
        ] {
            pods.create(&PostParams::default(), &p).await.unwrap();
        }
    });
    let mut relay = Command::new(workspace_binary("mesh-agent").unwrap())
        .args([
            "relay",
            "--agent-pods",
            "mesh-system/app.kubernetes.io/name=mesh-agent",
            "--agent-port",
            "14244",
            "--listen",
            RELAY,
            "--web-listen",
            "none",
        ])
        .arg("--tls-cert")
        .arg(work.join("relay.crt"))
        .arg("--tls-key")
        .arg(work.join("relay.key"))
        .arg("--tls-ca")
        .arg(work.join("ca.crt"))
        .env("KUBECONFIG", kmock.kubeconfig(&work).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The two agent pods, not the CA's.
    wait_for_set(&["127.0.0.2:14244", "127.0.0.3:14244"]);
    // A new agent pod is followed, a deleted one is not.
    rt.block_on(async {
        pods.create(
            &PostParams::default(),
            &pod("mesh-agent-c", "mesh-agent", "127.0.0.5"),
        )
        .await
        .unwrap();
        pods.delete("mesh-agent-a", &DeleteParams::default())
            .await
            .unwrap();
    });
    wait_for_set(&["127.0.0.3:14244", "127.0.0.5:14244"]);
    let _ = relay.kill();
    let _ = relay.wait();
    drop(kmock);
    let _ = std::fs::remove_dir_all(&work);
}
