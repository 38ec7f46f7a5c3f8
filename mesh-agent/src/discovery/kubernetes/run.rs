//! The watch loop: batches of events, the model built off the runtime and sent when it changed,
//! rejections and policy status.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Applies one batch of changes (until [`DEBOUNCE`] passes quietly, at most [`MAX_BATCH`]);
/// with `unfinished` (streaming in [`ListMode::Auto`]) returns `true` as soon as a change says
/// to fall back to lists (see [`streaming_fails`]).
pub(super) async fn apply_batch(
    changes: &mut futures::stream::SelectAll<ChangeStream>,
    state: &mut State,
    mut unfinished: Option<&mut BTreeSet<&'static str>>,
) -> Result<bool, KubernetesError> {
    let mut take = |change: Change, state: &mut State| {
        let fails = unfinished
            .as_deref_mut()
            .is_some_and(|u| streaming_fails(&change, u));
        state.apply(change);
        fails
    };
    let Some(first) = changes.next().await else {
        return Err(KubernetesError::WatchEnded { kind: "all" });
    };
    if take(first, state) {
        return Ok(true);
    }
    let deadline = Instant::now() + MAX_BATCH;
    while Instant::now() < deadline {
        match tokio::time::timeout(DEBOUNCE, changes.next()).await {
            Ok(Some(change)) => {
                if take(change, state) {
                    return Ok(true);
                }
            }
            Ok(None) => return Err(KubernetesError::WatchEnded { kind: "all" }),
            Err(_) => break,
        }
    }
    Ok(false)
}

/// [`run_with_mode`], standing for election as policy status writer with `status` (none:
/// never write).
#[expect(
    clippy::too_many_lines,
    reason = "one loop: apply a batch, build, send the model and its rejections"
)]
pub async fn run_with_status(
    client: kube::Client,
    node: String,
    mode: ListMode,
    status: Option<StatusConfig>,
    updates: mpsc::Sender<Update>,
) -> Result<(), KubernetesError> {
    let statuses = StatusSenders::start(&client, status);
    let mut streaming = streams_first(mode);
    // Only `auto` falls back; a forced `stream` retries a refusing server with backoff.
    let mut may_fall_back = mode == ListMode::Auto && streaming;
    let mut unfinished: BTreeSet<&'static str> = BTreeSet::new();
    let mut changes = watches(&client, &node, streaming);
    let mut state = State::new(node.clone());
    // The digest of the last model sent, not a copy of it (see `ClusterModel::digest`).
    let mut last_sent: Option<u64> = None;
    info!(
        node = %node,
        list_mode = mode.name(),
        initial_state = if streaming { "streaming lists" } else { "lists" },
        "watching Kubernetes: Services, EndpointSlices, Pods of every node, Namespaces, this \
         Node, TrafficPolicies, AuthorizationPolicies, PeerAuthentications"
    );
    loop {
        let unfinished = may_fall_back.then_some(&mut unfinished);
        if apply_batch(&mut changes, &mut state, unfinished).await? {
            // Every watch starts over with a list; each replaces its store when its list is
            // complete (a watch that had finished streaming keeps serving its store meanwhile).
            note_fallback();
            streaming = false;
            may_fall_back = false;
            changes = watches(&client, &node, streaming);
        }
        if !state.ready() {
            continue;
        }
        let had_problems: Vec<ObjectName> = state.reported.keys().cloned().collect();
        if last_sent.is_none() {
            // The start of the first model: the control-plane benchmark times from here.
            info!(
                services = state.services.objects.len(),
                slices = state.slices.objects.len(),
                pods = state.pods.len(),
                policies = state.policies.objects.len(),
                "initial lists complete"
            );
        }
        // Building (and hashing) a 10,000-service model takes hundreds of milliseconds of CPU:
        // on a blocking thread, so the runtime's workers keep serving the admin API and
        // draining flow events meanwhile (the file source parses the same way). The state
        // moves there and back; nothing else uses it meanwhile.
        let built = tokio::task::spawn_blocking(move || {
            let (mut model, rejections) = state.build();
            let security = state.security(&mut model);
            let digest = model.digest();
            // The build's temporaries were freed on this thread: out of its cache, so the
            // owner's purge after the reconcile (or the one below) returns their pages.
            crate::heap::flush_thread_cache();
            (state, model, rejections, security, digest)
        })
        .await;
        let (model, rejections, security, digest);
        (state, model, rejections, security, digest) = match built {
            Ok(built) => built,
            // A panic in the build stays a panic of this source: the supervisor reports it and
            // restarts the source with backoff.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(KubernetesError::BuildCancelled { node }),
        };
        let (security_rejections, security_resolved) = security;
        statuses.publish(&state);
        if last_sent == Some(digest) {
            // Unchanged: no reconcile follows to hand the pages back (the owner purges after
            // each), and a 10,000-service model is tens of megabytes.
            drop(model);
            crate::heap::release_free();
        } else {
            debug!(
                services = model.services.len(),
                pods = model.pods.len() + model.other_pods.len(),
                policies = model.policies.policies.len(),
                "sending the cluster model"
            );
            if last_sent.is_none()
                && let Some(ip) = api_server_cluster_ip(
                    std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
                    &model,
                )
            {
                warn!(
                    cluster_ip = %ip,
                    "the API server is reached through a ClusterIP this agent programs; an agent \
                     down while the control plane moves could not list again: set \
                     k8s-service-host and k8s-service-port (Helm: k8sServiceHost, \
                     k8sServicePort) to its direct address"
                );
            }
            if updates.send(Update::Model(model)).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
            last_sent = Some(digest);
        }
        // A policy that was rejected and is now valid (or gone) clears its rejection.
        for name in had_problems {
            if !state.reported.contains_key(&name) {
                let resolved = Update::Resolved(ObjectRef::new("TrafficPolicy", name));
                if updates.send(resolved).await.is_err() {
                    return Err(KubernetesError::ChannelClosed { node });
                }
            }
        }
        for r in rejections {
            warn!(policy = %r.policy, "{r}");
            if updates.send(Update::Rejected(r.into())).await.is_err() {
                return Err(KubernetesError::ChannelClosed { node });
            }
        }
        if send_security(&updates, security_resolved, security_rejections)
            .await
            .is_err()
        {
            return Err(KubernetesError::ChannelClosed { node });
        }
    }
}

/// The desired statuses per kind, sent to the elected writer.
pub(super) struct StatusSenders {
    pub(super) traffic: watch_channel::Sender<Arc<DesiredStatus>>,
    pub(super) authz: watch_channel::Sender<Arc<DesiredStatus>>,
    pub(super) peer: watch_channel::Sender<Arc<DesiredStatus>>,
}

impl StatusSenders {
    /// Starts the writer (one election for every kind) when `status` names this agent's pod.
    pub(super) fn start(client: &kube::Client, status: Option<StatusConfig>) -> Self {
        let (traffic, traffic_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        let (authz, authz_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        let (peer, peer_rx) = watch_channel::channel(Arc::new(DesiredStatus::new()));
        if let Some(config) = status {
            tokio::spawn(policy::status::run_many(
                client.clone(),
                config,
                vec![
                    (ApiResource::erase::<TrafficPolicy>(&()), traffic_rx),
                    (
                        ApiResource::erase::<crate::authz::types::AuthorizationPolicy>(&()),
                        authz_rx,
                    ),
                    (
                        ApiResource::erase::<crate::authz::types::PeerAuthentication>(&()),
                        peer_rx,
                    ),
                ],
            ));
        }
        Self {
            traffic,
            authz,
            peer,
        }
    }

    /// Sends each kind's desired status if it changed.
    pub(super) fn publish(&self, state: &State) {
        for (tx, now) in [
            (&self.traffic, &state.desired_status),
            (&self.authz, &state.authz_status),
            (&self.peer, &state.peer_status),
        ] {
            tx.send_if_modified(|d| {
                let differs = **d != *now;
                if differs {
                    *d = Arc::new(now.clone());
                }
                differs
            });
        }
    }
}

/// Reports security objects whose rejection is over, then the new rejections; `Err` when the
/// agent stopped listening.
pub(super) async fn send_security(
    updates: &mpsc::Sender<Update>,
    resolved: Vec<(&'static str, ObjectName)>,
    rejections: Vec<discovery::Rejection>,
) -> Result<(), ()> {
    for (kind, name) in resolved {
        let resolved = Update::Resolved(ObjectRef::new(kind, name));
        updates.send(resolved).await.map_err(|_| ())?;
    }
    for r in rejections {
        warn!("{r}; its last valid version, if it had one, keeps applying");
        updates.send(Update::Rejected(r)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// The cluster IP `host` is, if it is one the model programs: the agent would then reach the API
/// server through its own data path (`KUBERNETES_SERVICE_HOST` left at the kubelet's value).
pub(super) fn api_server_cluster_ip(host: Option<&str>, model: &ClusterModel) -> Option<IpAddr> {
    let ip: IpAddr = host?.trim().parse().ok()?;
    model
        .services
        .values()
        .any(|s| s.cluster_ips.contains(&ip))
        .then_some(ip)
}
