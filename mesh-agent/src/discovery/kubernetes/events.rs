//! Watch events: the merged stream's items and how each is applied to the stores.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One item of the merged watch streams (boxed: the objects are large and differ in size).
pub(super) enum Change {
    Services(Box<Result<watcher::Event<K8sService>, watcher::Error>>),
    Slices(Box<Result<watcher::Event<EndpointSlice>, watcher::Error>>),
    Pods(Box<Result<watcher::Event<K8sPod>, watcher::Error>>),
    Namespaces(Box<Result<watcher::Event<K8sNamespace>, watcher::Error>>),
    Nodes(Box<Result<watcher::Event<K8sNode>, watcher::Error>>),
    Policies(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
    /// `AuthorizationPolicy` objects (issue 9).
    AuthzPolicies(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
    /// `PeerAuthentication` objects (issue 9).
    PeerAuthns(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>),
}

/// Where a watch event stands in its watch's initial state, for the streaming-list fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Marker {
    /// The watch (re)started its initial state.
    Init,
    /// The initial state is complete (for a streaming list: the initial-events-end bookmark).
    InitDone,
    /// The API server refused the watch's options: 422 Invalid (or 400) on the watch request,
    /// what a server without streaming lists answers `sendInitialEvents` /
    /// `resourceVersionMatch` with.
    Refused,
    Other,
}

pub(super) fn marker_of<T>(r: &Result<watcher::Event<T>, watcher::Error>) -> Marker {
    match r {
        Ok(watcher::Event::Init) => Marker::Init,
        Ok(watcher::Event::InitDone) => Marker::InitDone,
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(s)))
            if s.code == 422 || s.code == 400 =>
        {
            Marker::Refused
        }
        _ => Marker::Other,
    }
}

impl Change {
    pub(super) fn marker(&self) -> Marker {
        match self {
            Self::Services(r) => marker_of(r),
            Self::Slices(r) => marker_of(r),
            Self::Pods(r) => marker_of(r),
            Self::Namespaces(r) => marker_of(r),
            Self::Nodes(r) => marker_of(r),
            Self::Policies(r) | Self::AuthzPolicies(r) | Self::PeerAuthns(r) => marker_of(r),
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Services(_) => "Services",
            Self::Slices(_) => "EndpointSlices",
            Self::Pods(_) => "Pods",
            Self::Namespaces(_) => "Namespaces",
            Self::Nodes(_) => "Nodes",
            Self::Policies(_) => "TrafficPolicies",
            Self::AuthzPolicies(_) => "AuthorizationPolicies",
            Self::PeerAuthns(_) => "PeerAuthentications",
        }
    }
}

impl State {
    pub(super) fn apply(&mut self, change: Change) {
        let kind = change.kind();
        let err = match change {
            Change::Services(r) => (*r).map(|e| self.services.apply_service(e)).err(),
            Change::Slices(r) => (*r)
                .map(|e| self.slices.apply_slice(&mut self.names, e))
                .err(),
            Change::Pods(r) => (*r).map(|e| self.pods.apply_pod(&self.node, e)).err(),
            Change::Namespaces(r) => (*r).map(|e| self.namespaces.apply(e)).err(),
            Change::Nodes(r) => (*r).map(|e| self.nodes.apply(e)).err(),
            Change::Policies(r) => match *r {
                Ok(e) => {
                    self.policy_crd_missing = false;
                    self.policies.apply(e);
                    None
                }
                Err(e) if crd_missing(&e) => {
                    // Not an outage: the cluster has no policies. Run with the defaults (and
                    // without stale ones) while the watch keeps retrying.
                    if !self.policy_crd_missing {
                        warn!(
                            crd = "trafficpolicies.traffic.kernmesh.io",
                            "the TrafficPolicy CRD is not installed; every service uses the defaults"
                        );
                    }
                    self.policy_crd_missing = true;
                    self.policies.objects.clear();
                    self.policies.relisting = None;
                    self.policies.ready = true;
                    None
                }
                Err(e) => Some(e),
            },
            Change::AuthzPolicies(r) => {
                let crd = "authorizationpolicies.security.kernmesh.io";
                security_change(
                    &mut self.authz_policies,
                    &mut self.security_crd_missing,
                    crd,
                    *r,
                )
            }
            Change::PeerAuthns(r) => {
                let crd = "peerauthentications.security.kernmesh.io";
                security_change(
                    &mut self.peer_authns,
                    &mut self.security_crd_missing,
                    crd,
                    *r,
                )
            }
        };
        if let Some(e) = err {
            warn!(kind, error = %e, "watch error; retrying with backoff");
        }
    }
}

/// Applies a security-object watch event; a missing CRD means no such objects (not an outage),
/// as for `TrafficPolicy`.
pub(super) fn security_change(
    store: &mut Store<DynamicObject>,
    missing: &mut BTreeSet<&'static str>,
    crd: &'static str,
    r: Result<watcher::Event<DynamicObject>, watcher::Error>,
) -> Option<watcher::Error> {
    match r {
        Ok(e) => {
            missing.remove(crd);
            store.apply(e);
            None
        }
        Err(e) if crd_missing(&e) => {
            if missing.insert(crd) {
                warn!(crd, "CRD not installed; no such objects apply");
            }
            store.objects.clear();
            store.relisting = None;
            store.ready = true;
            None
        }
        Err(e) => Some(e),
    }
}

/// Whether a watch error says the resource does not exist (a CRD not installed).
pub(super) fn crd_missing(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}
