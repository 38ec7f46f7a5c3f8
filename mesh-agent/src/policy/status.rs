//! The elected writer of `TrafficPolicy` status: every agent resolves policies the same way, but
//! only the holder of one `coordination.k8s.io/v1` Lease writes `status.conditions` (and the
//! Warning Event of an invalid policy), so N nodes do not write N times or fight.
//!
//! Election follows client-go's `leaderelection`: the holder renews `spec.renewTime` every
//! [`RENEW_INTERVAL`]; a candidate takes the Lease over only when its record has not changed
//! for [`LEASE_DURATION`] *as measured on the candidate's own clock* (so clock skew between
//! nodes cannot shorten a term), and every write carries the `resourceVersion` it read, so of
//! two candidates only one wins (the API server answers the other `409 Conflict`). A holder
//! that cannot renew for [`RENEW_DEADLINE`] stops writing before anyone may take over.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::ObjectReference},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    resolve::{PolicyState, Reason},
    types::{PolicyCondition, TrafficPolicy},
};
use crate::model::ObjectName;

/// Name of the Lease, in the agent's namespace.
pub const LEASE_NAME: &str = "kernmesh-policy-status";
/// How long a Lease record may stay unchanged before another agent takes it (client-go: 15 s).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long the holder keeps acting without a successful renewal (client-go: 10 s).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often the holder renews, and a candidate retries (client-go's retry period is 2 s; the
/// holder renews a little less often to keep API traffic low on large clusters).
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// How often a candidate checks the Lease.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Condition type written.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Reason of the Warning Event for an invalid policy.
pub const EVENT_REASON_INVALID: &str = "InvalidPolicy";
/// Reporting controller of Events and field manager of status writes.
pub const CONTROLLER: &str = "kernmesh-agent";

/// Where the Lease lives and who this agent is.
#[derive(Clone, Debug)]
pub struct StatusConfig {
    /// The agent's namespace (`POD_NAMESPACE` from the downward API).
    pub namespace: String,
    /// This agent's identity in the Lease (`POD_NAME`, else the node name).
    pub identity: String,
}

impl StatusConfig {
    /// From the downward API's `POD_NAMESPACE`/`POD_NAME`; `None` without `POD_NAMESPACE`
    /// (the agent outside a pod, as in tests: nothing writes status).
    #[must_use]
    pub fn from_env(node: &str) -> Option<Self> {
        let namespace = std::env::var("POD_NAMESPACE")
            .ok()
            .filter(|s| !s.is_empty())?;
        let identity = std::env::var("POD_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| node.to_owned());
        Some(Self {
            namespace,
            identity,
        })
    }
}

/// What one policy's status should say, with what it says now.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// The condition to write (its `lastTransitionTime` is filled in when written).
    pub condition: PolicyCondition,
    /// The object's current `Accepted` condition.
    pub current: Option<PolicyCondition>,
    /// The object, for its Event.
    pub reference: ObjectReference,
}

/// Desired status of every policy.
pub type DesiredStatus = BTreeMap<ObjectName, Desired>;

/// The `Accepted` condition for a policy state (without `lastTransitionTime`).
#[must_use]
pub fn condition(state: &PolicyState) -> PolicyCondition {
    PolicyCondition {
        type_: CONDITION_ACCEPTED.to_owned(),
        status: if state.accepted { "True" } else { "False" }.to_owned(),
        reason: state.reason.as_str().to_owned(),
        message: state.message.clone(),
        observed_generation: state.generation,
        last_transition_time: String::new(),
    }
}

/// Same status, reason, message and generation (the transition time aside).
fn same(a: &PolicyCondition, b: &PolicyCondition) -> bool {
    a.type_ == b.type_
        && a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

/// The current `Accepted` condition in a policy object's status.
#[must_use]
pub fn current_condition(object: &DynamicObject) -> Option<PolicyCondition> {
    let conditions = object.data.pointer("/status/conditions")?.as_array()?;
    conditions
        .iter()
        .filter_map(|c| serde_json::from_value::<PolicyCondition>(c.clone()).ok())
        .find(|c| c.type_ == CONDITION_ACCEPTED)
}

/// A Lease record as an observer compares it: holder and renew time.
type LeaseRecord = (Option<String>, Option<MicroTime>);

/// The Lease-election state machine (one per agent; the gateway's status writer uses one too,
/// with its own Lease).
pub(crate) struct Elector {
    identity: String,
    /// The Lease's name.
    lease: String,
    /// The last Lease record seen (holder, renew time) and when this agent first saw it.
    observed: Option<(LeaseRecord, Instant)>,
    /// When this agent last renewed successfully while holding.
    renewed: Option<Instant>,
}

impl Elector {
    pub(crate) fn new(identity: String, lease: &str) -> Self {
        Self {
            identity,
            lease: lease.to_owned(),
            observed: None,
            renewed: None,
        }
    }

    pub(crate) fn leading(&self) -> bool {
        self.renewed.is_some_and(|t| t.elapsed() < RENEW_DEADLINE)
    }

    /// Reads the Lease and creates, renews or takes it over as the rules allow; returns whether
    /// this agent holds it now.
    pub(crate) async fn try_acquire_or_renew(
        &mut self,
        leases: &Api<Lease>,
    ) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        // By status code, not reason: some API servers (and stand-ins) spell the reason
        // differently, and `get_opt` only knows `NotFound`.
        let found = match leases.get(&self.lease).await {
            Ok(lease) => Some(lease),
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(e) => return Err(e),
        };
        let Some(lease) = found else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": { "name": self.lease },
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": LEASE_DURATION.as_secs(),
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            }))
            .map_err(kube::Error::SerdeError)?;
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(lease = %self.lease, identity = %self.identity, "policy status: Lease created; this agent writes status");
                    self.renewed = Some(Instant::now());
                    Ok(true)
                }
                // Another agent created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        let first_seen = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => Instant::now(),
        };
        self.observed = Some((record, first_seen));
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        if !mine && holder.is_some() && first_seen.elapsed() < duration {
            self.renewed = None;
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let patch = json!({
            // Optimistic concurrency: the API server refuses the write if the Lease changed
            // since this read.
            "metadata": { "resourceVersion": lease.metadata.resource_version },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": LEASE_DURATION.as_secs(),
                "renewTime": now,
                "acquireTime": if mine { spec.acquire_time.clone() } else { Some(now.clone()) },
                "leaseTransitions": if mine { transitions } else { transitions + 1 },
            },
        });
        match leases
            .patch(&self.lease, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(lease = %self.lease, identity = %self.identity, previous = ?holder, "policy status: Lease acquired; this agent writes status");
                }
                self.renewed = Some(Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.renewed = None;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Runs the election and, while this agent holds the Lease, writes what `desired` says. Returns
/// when the sender of `desired` is gone (the Kubernetes source stopped).
pub async fn run(
    client: kube::Client,
    config: StatusConfig,
    desired: watch::Receiver<Arc<DesiredStatus>>,
) {
    run_many(
        client,
        config,
        vec![(ApiResource::erase::<TrafficPolicy>(&()), desired)],
    )
    .await;
}

/// [`run`] for several kinds at once (`TrafficPolicy` and issue 9's security objects): one
/// election, one Lease, a desired status per kind. Returns when any sender is gone.
pub async fn run_many(
    client: kube::Client,
    config: StatusConfig,
    mut kinds: Vec<(ApiResource, watch::Receiver<Arc<DesiredStatus>>)>,
) {
    if kinds.is_empty() {
        return;
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER.to_owned(),
            instance: Some(config.identity.clone()),
        },
    );
    let mut elector = Elector::new(config.identity.clone(), LEASE_NAME);
    // What this agent wrote last per kind and object, so a write is not repeated before the
    // watch shows it.
    let mut written: Vec<BTreeMap<ObjectName, PolicyCondition>> =
        vec![BTreeMap::new(); kinds.len()];
    let mut last_try: Option<Instant> = None;
    info!(namespace = %config.namespace, identity = %config.identity, lease = LEASE_NAME, "policy status: standing for election");
    loop {
        let interval = if elector.leading() {
            RENEW_INTERVAL
        } else {
            RETRY_INTERVAL
        };
        if last_try.is_none_or(|t| t.elapsed() >= interval) {
            last_try = Some(Instant::now());
            let was = elector.leading();
            if let Err(e) = elector.try_acquire_or_renew(&leases).await {
                warn!(lease = LEASE_NAME, error = %e, "policy status: Lease not renewed");
            }
            if was && !elector.leading() {
                info!(lease = LEASE_NAME, "policy status: no longer the writer");
                written.iter_mut().for_each(BTreeMap::clear);
            }
        }
        if elector.leading() {
            for ((resource, desired), written) in kinds.iter_mut().zip(&mut written) {
                let snapshot = Arc::clone(&desired.borrow_and_update());
                write(&client, resource, &recorder, &snapshot, written).await;
            }
        }
        let changed = futures::future::select_all(
            kinds
                .iter_mut()
                .map(|(_, desired)| Box::pin(desired.changed())),
        );
        tokio::select! {
            (changed, _, _) = changed => if changed.is_err() { return; },
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
        }
    }
}

/// Writes every condition that differs from the object's and from what was written last.
async fn write(
    client: &kube::Client,
    resource: &ApiResource,
    recorder: &Recorder,
    desired: &DesiredStatus,
    written: &mut BTreeMap<ObjectName, PolicyCondition>,
) {
    written.retain(|k, _| desired.contains_key(k));
    for (name, d) in desired {
        if d.current.as_ref().is_some_and(|c| same(c, &d.condition)) {
            written.remove(name);
            continue;
        }
        if written.get(name).is_some_and(|w| same(w, &d.condition)) {
            continue;
        }
        let mut condition = d.condition.clone();
        condition.last_transition_time = match &d.current {
            Some(c) if c.status == condition.status && !c.last_transition_time.is_empty() => {
                c.last_transition_time.clone()
            }
            _ => Timestamp::now().to_string(),
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &name.namespace, resource);
        let patch = json!({ "status": { "conditions": [condition] } });
        match api
            .patch_status(&name.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                debug!(policy = %name, reason = %condition.reason, "policy status written");
                if condition.reason == Reason::Invalid.as_str() {
                    publish_invalid(recorder, d, &condition.message);
                }
                written.insert(name.clone(), condition);
            }
            Err(e) => warn!(policy = %name, error = %e, "policy status not written; retrying"),
        }
    }
}

/// Records the Warning Event of an invalid policy, in the background (best effort).
fn publish_invalid(recorder: &Recorder, d: &Desired, message: &str) {
    let recorder = recorder.clone();
    let reference = d.reference.clone();
    let event = Event {
        type_: EventType::Warning,
        reason: EVENT_REASON_INVALID.to_owned(),
        note: Some(message.to_owned()),
        action: "ValidatePolicy".to_owned(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            debug!(error = %e, "recording the InvalidPolicy Event failed");
        }
    });
}
