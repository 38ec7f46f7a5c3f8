//! The watches: their configuration (streaming lists or lists), the merged stream, and the
//! fallback from streaming lists to lists.

#[allow(clippy::wildcard_imports)]
use super::*;

pub(super) type ChangeStream = Pin<Box<dyn Stream<Item = Change> + Send>>;

/// A watch event of a lean type as the event of its full type.
pub(super) fn full_event<L, K>(event: watcher::Event<L>, into: fn(L) -> K) -> watcher::Event<K> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(into(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(into(o)),
        watcher::Event::InitApply(o) => watcher::Event::InitApply(into(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// A watch's configuration for the mode in use (`streaming`: streaming lists, else lists).
///
/// Streaming (kube-rs `streaming_lists()`): the first watch asks for `sendInitialEvents=true`,
/// `resourceVersionMatch=NotOlderThan`, `resourceVersion=0` and bookmarks; the API server sends
/// every object from its watch cache as one ADDED event each, then a BOOKMARK annotated
/// `k8s.io/initial-events-end`, so at most one object's text is held at a time — the initial
/// list that was the source's memory peak (a 28 MB response for 10,000 slices, plus its parse)
/// is never held whole. client-go's informers do the same with `WatchListClient` on.
///
/// Lists: from the API server's watch cache (`resourceVersion=0`, as informers list; a quorum
/// read of every object would load etcd on each agent restart). Unpaginated: kube-rs leaves
/// `resourceVersion=0` out of a request with a `limit` (a paginated list is a quorum read), and
/// the API server serves a `resourceVersion=0` list from its cache in one response anyway (as
/// it does for client-go's informers, whose `limit` it ignores there).
pub(super) fn watch_config(config: watcher::Config, streaming: bool) -> watcher::Config {
    let mut config = config.any_semantic();
    config.page_size = None;
    if streaming {
        config.streaming_lists()
    } else {
        config
    }
}

/// One watch (see [`watch_config`]), each object parsed as its lean type `L` (see [`lean`])
/// and turned into its full type `K`.
pub(super) fn watch<L, K>(
    api: Api<L>,
    config: watcher::Config,
    streaming: bool,
    into: fn(L) -> K,
    wrap: fn(Box<Result<watcher::Event<K>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    L: Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
    L::DynamicType: Default,
    K: 'static,
{
    watcher(api, watch_config(config, streaming))
        .default_backoff()
        .map(move |r| wrap(Box::new(r.map(|e| full_event(e, into)))))
        .boxed()
}

/// The watches, merged (see the module docs for their selectors), streaming their initial
/// state or listing it (see [`watch_config`]).
pub(super) fn watches(
    client: &kube::Client,
    node: &str,
    streaming: bool,
) -> futures::stream::SelectAll<ChangeStream> {
    select_all([
        watch(
            Api::<lean::LeanService>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            streaming,
            lean::LeanService::into_full,
            Change::Services,
        ),
        watch(
            Api::<lean::LeanSlice>::all(client.clone()),
            watcher::Config::default().labels(PROXY_LABEL_SELECTOR),
            streaming,
            lean::LeanSlice::into_full,
            Change::Slices,
        ),
        watch(
            // Every node's pods: a pod elsewhere in the mesh is a tunnel destination whose
            // identity (service account) and node the capture needs, as ztunnel learns every
            // workload from istiod. Slimmed to what the model reads.
            Api::<lean::LeanPod>::all(client.clone()),
            watcher::Config::default(),
            streaming,
            lean::LeanPod::into_full,
            Change::Pods,
        ),
        watch(
            Api::<lean::LeanNamespace>::all(client.clone()),
            watcher::Config::default(),
            streaming,
            lean::LeanNamespace::into_full,
            Change::Namespaces,
        ),
        watch(
            Api::<lean::LeanNode>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
            streaming,
            lean::LeanNode::into_full,
            Change::Nodes,
        ),
        // Whole dynamic objects, not a lean type: the policy parser reports every field of a
        // malformed policy, and the status writer reads its conditions. Policies are few.
        // Listed or streamed as the other watches (see [`watch_config`]).
        dynamic_watch::<TrafficPolicy>(client, streaming, Change::Policies),
        dynamic_watch::<crate::authz::types::AuthorizationPolicy>(
            client,
            streaming,
            Change::AuthzPolicies,
        ),
        dynamic_watch::<crate::authz::types::PeerAuthentication>(
            client,
            streaming,
            Change::PeerAuthns,
        ),
    ])
}

/// A watch of whole dynamic objects of a custom resource `K` (as the `TrafficPolicy` one).
pub(super) fn dynamic_watch<K>(
    client: &kube::Client,
    streaming: bool,
    wrap: fn(Box<Result<watcher::Event<DynamicObject>, watcher::Error>>) -> Change,
) -> ChangeStream
where
    K: Resource<DynamicType = ()>,
{
    watcher(
        Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<K>(&())),
        watch_config(watcher::Config::default(), streaming),
    )
    .default_backoff()
    .map(move |r| wrap(Box::new(r)))
    .boxed()
}

/// Set once an API server refused streaming lists (or never ended one) in [`ListMode::Auto`]:
/// later runs of the source in this process (restarts by the supervisor) list at once, and the
/// fallback is logged only by the run that set it.
pub(super) static STREAMING_REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether a watch event in [`ListMode::Auto`] while streaming says to fall back to lists, as
/// client-go's reflector does: the API server refused the streaming watch's options (an API
/// server older than 1.27 forbids `resourceVersionMatch` on a watch, a newer one with the
/// `WatchList` gate off forbids `sendInitialEvents`; both answer 422 Invalid), or a watch
/// restarted its initial state before the initial-events-end bookmark ever came (a server that
/// ignores `sendInitialEvents` sends the objects but no bookmark; kube-rs then starts over when
/// the watch times out, after `timeoutSeconds` = 290 s). `unfinished` holds the watches whose
/// streamed initial state has begun and not yet ended.
pub(super) fn streaming_fails(change: &Change, unfinished: &mut BTreeSet<&'static str>) -> bool {
    match change.marker() {
        Marker::Refused => true,
        Marker::Init => !unfinished.insert(change.kind()),
        Marker::InitDone => {
            unfinished.remove(change.kind());
            false
        }
        Marker::Other => false,
    }
}

/// Whether a run of the source in `mode` starts with streaming lists.
pub(super) fn streams_first(mode: ListMode) -> bool {
    match mode {
        ListMode::Stream => true,
        ListMode::List => false,
        ListMode::Auto => !STREAMING_REFUSED.load(Ordering::Relaxed),
    }
}

/// Records the fallback to lists for later runs, logging it only the first time.
pub(super) fn note_fallback() {
    if !STREAMING_REFUSED.swap(true, Ordering::Relaxed) {
        warn!(
            "the API server does not serve streaming lists (sendInitialEvents, Kubernetes \
             1.27+ with the WatchList feature); listing instead, as client-go's reflector \
             falls back (set discovery.listMode to list to skip the attempt)"
        );
    }
}
