//! Conversion of Kubernetes API objects into the model's types: Service ports, cluster IPs and
//! affinity, `EndpointSlice` endpoints and their merge, pods.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A Service's own settings: `ClientIP` affinity from its `spec` (policies add the rest).
#[must_use]
pub fn service_settings(spec: Option<&K8sServiceSpec>) -> ServiceSettings {
    ServiceSettings {
        affinity_timeout: spec_affinity(spec),
        ..ServiceSettings::default()
    }
}

/// `ClientIP` affinity from the Service spec, as Kubernetes defines it.
pub(super) fn spec_affinity(spec: Option<&K8sServiceSpec>) -> Option<Duration> {
    let spec = spec?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .filter(|&s| s > 0);
    Some(seconds.map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs))
}

/// Ports of a Service (TCP and UDP; SCTP and out-of-range ports skipped).
#[must_use]
pub fn service_ports(spec: &K8sServiceSpec) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(protocol) = protocol(p.protocol.as_deref()) else {
            debug!(
                protocol = p.protocol.as_deref(),
                port = p.port,
                "service port skipped: protocol not balanced"
            );
            continue;
        };
        let Some(port) = port_number(p.port) else {
            continue;
        };
        // The Service's `targetPort` (number or name) is the EndpointSlice controller's input;
        // the port an endpoint serves on is the one its slice lists (kube-proxy reads only that).
        out.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port,
            protocol,
            target_port: None,
        });
    }
    // Kept by the store for as long as the Service exists: a vector grown by pushes holds 4
    // places (128 bytes) for a Service's one port.
    out.shrink_to_fit();
    out
}

/// A port's protocol (absent = TCP, as the API defaults it); `None` for SCTP.
pub(super) fn protocol(name: Option<&str>) -> Option<Protocol> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

pub(super) fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// Cluster IPs of a Service: none for headless, `ExternalName` or not-yet-allocated services.
#[must_use]
pub fn cluster_ips(spec: &K8sServiceSpec) -> Vec<IpAddr> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    let single = spec.cluster_ip.as_slice();
    let raw: &[String] = if listed.is_empty() { single } else { listed };
    let mut out = Vec::new();
    for ip in raw {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => warn!(cluster_ip = %ip, "service cluster IP is not an address; skipped"),
        }
    }
    // Kept by the store: 4 places for one address otherwise.
    out.shrink_to_fit();
    out
}

/// Endpoints of one `EndpointSlice` of a service with `service_ports` (`FQDN` slices and
/// unparsable addresses skipped). An endpoint serves a service port only if the slice lists a
/// port of the same name and protocol (kube-proxy's `ServicePortName` match), on the number the
/// slice gives; a slice port the service does not have is dropped. With `trafficDistribution`
/// `PreferClose`/`PreferSameZone` (`PreferSameNode`), an endpoint without zone (node) hints gets
/// its own zone (node) as hint — what the `EndpointSlice` controller writes for these values;
/// kube-proxy reads only the hints, so without the controller (or before it caught up) it would
/// not prefer close endpoints.
#[must_use]
pub fn slice_endpoints(
    slice: &EndpointSlice,
    service_ports: &[ServicePort],
    traffic_distribution: Option<&str>,
) -> Vec<Endpoint> {
    let mut names = Names::default();
    StoredSlice::new(slice, &mut names).endpoints(
        &names,
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        service_ports,
        traffic_distribution,
    )
}

/// Merges endpoints of several slices: one entry per (address, ports), the most usable copy
/// (ready, then serving), sorted so the model does not depend on slice order. During a
/// rollout an address can sit in two slices at once, terminating in one and ready in another.
#[must_use]
pub fn merge_endpoints(all: impl IntoIterator<Item = Endpoint>) -> Vec<Endpoint> {
    let mut merged: BTreeMap<(IpAddr, Arc<BTreeMap<String, u16>>), Endpoint> = BTreeMap::new();
    for ep in all {
        match merged.entry((ep.ip, Arc::clone(&ep.ports))) {
            Entry::Vacant(v) => {
                v.insert(ep);
            }
            Entry::Occupied(mut o) => {
                let rank = |e: &Endpoint| (e.ready, e.serving);
                let cur = o.get_mut();
                if rank(&ep) > rank(cur) {
                    *cur = ep;
                }
            }
        }
    }
    merged.into_values().collect()
}

/// The node addresses a pod's status names (`status.hostIPs`, else `status.hostIP`): where
/// the agent of its node is reached.
pub(super) fn host_ips(pod: &K8sPod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = status
        .host_ips
        .iter()
        .flatten()
        .map(|h| h.ip.as_str())
        .collect();
    let raw = if listed.is_empty() {
        status.host_ip.as_deref().into_iter().collect()
    } else {
        listed
    };
    raw.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// A pod of the model, if it is scheduled (on any node) and not finished.
#[must_use]
pub fn pod_of(pod: &K8sPod) -> Option<model::Pod> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return None;
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.clone()).collect::<Vec<_>>())
        .unwrap_or_default();
    let raw = if listed.is_empty() {
        status.and_then(|s| s.pod_ip.clone()).into_iter().collect()
    } else {
        listed
    };
    for ip in raw {
        if let Ok(ip) = ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    Some(model::Pod {
        name: ObjectName::new(pod.namespace().unwrap_or_default(), pod.name_any()),
        node: node.to_owned(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        ips,
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        host_network: spec.host_network.unwrap_or(false),
    })
}
