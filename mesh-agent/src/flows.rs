//! Flow events from the kernel ring, named (pod and service) as they arrive, handed in order to
//! the process's observer (telemetry), kept in a bounded recent-history buffer and broadcast
//! live to `meshctl flows --follow` watchers.
//!
//! The per-event path allocates nothing: a [`FlowRecord`] is the kernel's event plus `Arc`s of
//! the names the published snapshot already holds; text (addresses, verdicts, the protobuf
//! [`Flow`]) is made only when a watcher asks, and only for the flows it is sent.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{
    PROTO_UDP,
    counters::COUNTER_NAMES,
    event::{
        EV_CLOSE, EV_EJECT, EV_FAIL, EV_OPEN, EV_RECOVER, EV_REJECT, FAIL_L7, FAIL_REFUSED,
        FAIL_RESET, FAIL_SYN_TIMEOUT, FlowEvent,
    },
};
use tokio::sync::broadcast;

use crate::{admin::proto::Flow, datapath::events, datapath::ip_from_be, model::ObjectName};

/// Flows kept for `meshctl flows` without `--follow`.
pub const RECENT_CAPACITY: usize = 10_000;
/// Live subscribers that fall this far behind lose the oldest flows (and are told how many).
pub const BROADCAST_CAPACITY: usize = 4096;

/// Names for what the kernel reports by address or cgroup; filled from the cluster model. The
/// names are shared (`Arc`), so naming a flow copies no string.
pub trait Names {
    /// The pod owning an address.
    fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<ObjectName>>;
    /// The service owning an address and protocol.
    fn service_by_addr(&self, addr: SocketAddr, udp: bool) -> Option<Arc<ObjectName>>;
    /// The pod of a cgroup v2 id (for rejects, where no address is bound yet).
    fn pod_by_cgroup(&self, cgroup_id: u64) -> Option<Arc<ObjectName>>;
}

/// What sees every flow, in order, on the ring reader's thread before any watcher: telemetry
/// (`istio_tcp_*`, the access log, OTLP connection logs). Called once per drained batch, so it
/// can never fall behind and lose flows the way a lagging broadcast subscriber does, and costs
/// no task wake-up or record copy per flow.
pub trait FlowObserver: Send {
    fn observe(&mut self, flows: &[FlowRecord]);
}

/// One flow as the agent keeps it: the kernel's event, its wall-clock time, and the names it
/// had when it arrived (a pod deleted later still names its old flows, as Hubble's do).
#[derive(Clone, Debug)]
pub struct FlowRecord {
    pub event: FlowEvent,
    /// Unix time in nanoseconds.
    pub time_unix_nano: u64,
    /// The client pod (by address, else by cgroup).
    pub source: Option<Arc<ObjectName>>,
    pub service: Option<Arc<ObjectName>>,
}

impl FlowRecord {
    /// `open`, `close`, …
    #[must_use]
    pub fn verdict(&self) -> &'static str {
        verdict(self.event.kind)
    }

    /// The client's own address, if the kernel knew it (not for rejects: not bound yet).
    #[must_use]
    pub fn client(&self) -> Option<IpAddr> {
        let ip = ip_from_be(self.event.client_addr_be, self.event.family);
        (!ip.is_unspecified()).then_some(ip)
    }

    /// The service address the client connected to.
    #[must_use]
    pub fn service_addr(&self) -> SocketAddr {
        let e = &self.event;
        SocketAddr::new(
            ip_from_be(e.svc_addr_be, e.family),
            u16::from_be(e.svc_port_be),
        )
    }

    /// The backend the kernel chose, if it chose one.
    #[must_use]
    pub fn backend_addr(&self) -> Option<SocketAddr> {
        let e = &self.event;
        (e.backend_id != 0).then(|| {
            SocketAddr::new(
                ip_from_be(e.backend_addr_be, e.family),
                u16::from_be(e.backend_port_be),
            )
        })
    }

    /// Why it was rejected or failed (`""` for opens and closes).
    #[must_use]
    pub fn reason(&self) -> std::borrow::Cow<'static, str> {
        reason(self.event.kind, self.event.reason)
    }

    /// The protobuf form `WatchFlows` sends.
    #[must_use]
    pub fn to_proto(&self) -> Flow {
        let e = &self.event;
        let (source_namespace, source_pod) = self
            .source
            .as_deref()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .unwrap_or_default();
        Flow {
            time_unix_nano: self.time_unix_nano,
            verdict: self.verdict().to_owned(),
            reason: self.reason().into_owned(),
            source_namespace,
            source_pod,
            source_address: self.client().map(|c| c.to_string()).unwrap_or_default(),
            service: self
                .service
                .as_deref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            service_address: self.service_addr().to_string(),
            backend_address: self
                .backend_addr()
                .map(|b| b.to_string())
                .unwrap_or_default(),
            protocol: if e.proto == PROTO_UDP { "UDP" } else { "TCP" }.to_owned(),
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            duration_us: e.duration_ns / 1000,
            cgroup_id: e.cgroup_id,
            node: String::new(),
            seq: 0,
            instance: 0,
        }
    }
}

/// An item as a [`SeqRing`] kept it: its place in the ring's stream (Hubble's ring position)
/// and the item — for the agent's hub a [`FlowRecord`], kept apart from the record the observer
/// sees before numbering.
#[derive(Clone, Debug)]
pub struct Sequenced<T = FlowRecord> {
    /// 1 for the first item the ring kept, one more for each later one.
    pub seq: u64,
    pub flow: T,
}

impl Sequenced {
    /// The protobuf form, numbered by `instance` ([`FlowHub::instance`]).
    #[must_use]
    pub fn to_proto(&self, instance: u64) -> Flow {
        Flow {
            seq: self.seq,
            instance,
            ..self.flow.to_proto()
        }
    }
}

/// The last `capacity` items, numbered as they are kept, and the live broadcast of each — the
/// agent's flow hub and the relay's merged stream. Numbering, keeping and sending happen under
/// one lock, so the history and every live subscription hold the items in seq order whoever
/// publishes; a watcher that subscribes, then copies the history, drops the live items numbered
/// at most the copy's last (they are in both).
pub struct SeqRing<T> {
    /// The history; its newest entry's seq is the last number given (it never empties once an
    /// item was kept).
    recent: Mutex<VecDeque<Sequenced<T>>>,
    live: broadcast::Sender<Sequenced<T>>,
    capacity: usize,
}

impl<T: Clone> SeqRing<T> {
    /// Keeps `capacity` items; live followers buffer [`BROADCAST_CAPACITY`].
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self::with_live_buffer(capacity, BROADCAST_CAPACITY)
    }

    /// Keeps `capacity` items; live followers buffer `live`.
    #[must_use]
    pub fn with_live_buffer(capacity: usize, live: usize) -> Self {
        Self {
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            live: broadcast::channel(live).0,
            capacity,
        }
    }

    /// Numbers an item, keeps it (dropping the oldest when full) and sends it to live watchers.
    pub fn publish(&self, item: T) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let numbered = Sequenced {
            seq: recent.back().map_or(0, |last| last.seq) + 1,
            flow: item,
        };
        if recent.len() == self.capacity {
            recent.pop_front();
        }
        recent.push_back(numbered.clone());
        let _ = self.live.send(numbered);
    }

    /// A copy of the kept items, oldest (lowest seq) first.
    #[must_use]
    pub fn recent(&self) -> Vec<Sequenced<T>> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// How many items were ever kept: the newest one's seq.
    #[must_use]
    pub fn published(&self) -> u64 {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .back()
            .map_or(0, |last| last.seq)
    }

    /// A live subscription: every item kept from now on, in seq order.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Sequenced<T>> {
        self.live.subscribe()
    }

    /// The kept items numbered after `seq`, oldest first.
    fn after(&self, seq: u64) -> Vec<Sequenced<T>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        // Seqs are consecutive in the ring, so the first wanted one's index is arithmetic.
        let skip = recent.front().map_or(0, |first| {
            usize::try_from((seq + 1).saturating_sub(first.seq)).unwrap_or(usize::MAX)
        });
        recent.iter().skip(skip).cloned().collect()
    }
}

/// What a [`follow`] stream yields.
#[derive(Debug)]
pub enum Followed<T> {
    /// The next item, in seq order.
    Item(Sequenced<T>),
    /// This many items were lost for good: the follower fell behind the live broadcast and the
    /// history no longer held them either.
    Lost(u64),
}

/// Every item of `ring` numbered after `after`, live from the subscription `live` (taken before
/// whatever copy of the history `after` ends), in seq order and each once. A follower that falls
/// behind the live broadcast (its buffer is [`BROADCAST_CAPACITY`] items) is not simply told how
/// many it missed: it catches up from the history, which holds more, and only what the history
/// no longer holds is reported lost. (Hubble's observer reads its ring by position and so never
/// loses what the ring still has; the broadcast here is the fast path, the history the fallback.)
pub fn follow<T: Clone + Send + Sync + 'static>(
    ring: Arc<SeqRing<T>>,
    after: u64,
    live: broadcast::Receiver<Sequenced<T>>,
) -> impl futures::Stream<Item = Followed<T>> + Send + 'static {
    struct State<T> {
        ring: Arc<SeqRing<T>>,
        live: broadcast::Receiver<Sequenced<T>>,
        last: u64,
        caught_up: VecDeque<Sequenced<T>>,
    }
    let state = State {
        ring,
        live,
        last: after,
        caught_up: VecDeque::new(),
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.caught_up.pop_front() {
                return Some((Followed::Item(item), st));
            }
            match st.live.recv().await {
                Ok(item) if item.seq <= st.last => {}
                Ok(item) => {
                    st.last = item.seq;
                    return Some((Followed::Item(item), st));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // The receiver skipped to its oldest buffered item; everything between the
                    // last one sent and the newest kept is read from the history instead (the
                    // buffered ones are then repeats, dropped by seq above).
                    let kept = st.ring.after(st.last);
                    let lost = kept
                        .first()
                        .map_or(0, |first| first.seq.saturating_sub(st.last + 1));
                    if let Some(newest) = kept.last() {
                        st.last = newest.seq;
                    }
                    st.caught_up = kept.into();
                    if lost > 0 {
                        return Some((Followed::Lost(lost), st));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

/// Recent flows and live subscribers.
pub struct FlowHub {
    /// The recent flows, numbered, and their live broadcast.
    ring: Arc<SeqRing<FlowRecord>>,
    /// This process's id in the numbering (random, nonzero): a restarted agent starts at seq 1
    /// again, and a watcher told the instance changed knows it is not a repeat.
    instance: u64,
    /// The observer ([`FlowObserver`]); locked only by the ring reader, and once by its setter.
    observer: Mutex<Option<Box<dyn FlowObserver>>>,
    /// Wall-clock minus monotonic, to stamp kernel times (`bpf_ktime_get_ns`) as Unix time.
    wall_offset_ns: u64,
    /// Flows a live watcher missed because it fell behind (the agent's own drops; the kernel
    /// counts the ring's in `event_dropped`).
    lagged_total: AtomicU64,
    /// Flows read from the kernel ring.
    received_total: AtomicU64,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self::new()
    }
}

impl FlowHub {
    #[must_use]
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            ring: Arc::new(SeqRing::new(RECENT_CAPACITY)),
            instance: fastrand::u64(1..),
            observer: Mutex::new(None),
            wall_offset_ns: wall.saturating_sub(monotonic_ns()),
            lagged_total: AtomicU64::new(0),
            received_total: AtomicU64::new(0),
        }
    }

    /// Names a kernel event: the client pod by its address (else its cgroup), the service by
    /// its address. Hash lookups and `Arc` clones only.
    pub fn enrich(&self, e: &FlowEvent, names: &dyn Names) -> FlowRecord {
        let client = ip_from_be(e.client_addr_be, e.family);
        let source = (!client.is_unspecified())
            .then(|| names.pod_by_ip(client))
            .flatten()
            .or_else(|| names.pod_by_cgroup(e.cgroup_id));
        let svc = SocketAddr::new(
            ip_from_be(e.svc_addr_be, e.family),
            u16::from_be(e.svc_port_be),
        );
        FlowRecord {
            event: *e,
            time_unix_nano: e.ts_ns + self.wall_offset_ns,
            source,
            service: names.service_by_addr(svc, e.proto == PROTO_UDP),
        }
    }

    /// Sets the observer every later flow is handed to (replacing any earlier one).
    pub fn set_observer(&self, observer: Box<dyn FlowObserver>) {
        *self.observer.lock().unwrap_or_else(PoisonError::into_inner) = Some(observer);
    }

    /// Hands a batch to the observer, then records each flow and sends it to live watchers.
    pub fn publish_batch(&self, flows: &mut Vec<FlowRecord>) {
        if let Some(o) = self
            .observer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            o.observe(flows);
        }
        for flow in flows.drain(..) {
            self.publish(flow);
        }
    }

    /// Numbers a flow, records it and sends it to live watchers ([`SeqRing::publish`]; the
    /// ring pump is the only writer).
    pub fn publish(&self, flow: FlowRecord) {
        self.ring.publish(flow);
    }

    /// A copy of the recent flows, oldest (lowest seq) first.
    #[must_use]
    pub fn recent(&self) -> Vec<Sequenced> {
        self.ring.recent()
    }

    /// This process's id in the numbering ([`Flow::instance`]).
    #[must_use]
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Notes flows a live watcher missed.
    pub fn note_lagged(&self, missed: u64) {
        self.lagged_total.fetch_add(missed, Ordering::Relaxed);
    }

    /// Flows live watchers missed so far.
    #[must_use]
    pub fn lagged_total(&self) -> u64 {
        self.lagged_total.load(Ordering::Relaxed)
    }

    /// Flows read from the kernel so far.
    #[must_use]
    pub fn received_total(&self) -> u64 {
        self.received_total.load(Ordering::Relaxed)
    }

    /// A live subscription: every flow published from now on, in seq order.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Sequenced> {
        self.ring.subscribe()
    }

    /// The flows after `after`, live from `live` ([`follow`]).
    pub fn follow(
        &self,
        after: u64,
        live: broadcast::Receiver<Sequenced>,
    ) -> impl futures::Stream<Item = Followed<FlowRecord>> + Send + 'static {
        follow(Arc::clone(&self.ring), after, live)
    }

    /// Reads the kernel ring whenever it has data, until the process ends. The ring has exactly
    /// one reader: this task. Names come from `names` without waiting for a reconciliation (the
    /// agent's come from the published snapshot), so the ring is drained while one runs.
    pub async fn pump(
        self: Arc<Self>,
        ring: RingBuf<MapData>,
        names: Arc<dyn Names + Send + Sync>,
    ) {
        // Reused for every batch: the records' room is allocated once.
        let mut records = Vec::new();
        crate::logging::on_readable("flow event ring", ring, |ring| {
            let batch = events::drain(ring);
            self.received_total
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            records.extend(batch.iter().map(|e| self.enrich(e, names.as_ref())));
            self.publish_batch(&mut records);
        })
        .await;
    }
}

fn verdict(kind: u8) -> &'static str {
    match kind {
        EV_OPEN => "open",
        EV_CLOSE => "close",
        EV_REJECT => "reject",
        EV_FAIL => "fail",
        EV_EJECT => "eject",
        EV_RECOVER => "recover",
        _ => "unknown",
    }
}

fn reason(kind: u8, reason: u8) -> std::borrow::Cow<'static, str> {
    use std::borrow::Cow;
    match (kind, reason) {
        (_, 0) => Cow::Borrowed(""),
        (EV_REJECT, r) => COUNTER_NAMES
            .get(usize::from(r))
            .map_or_else(|| Cow::Owned(r.to_string()), |s| Cow::Borrowed(*s)),
        (_, FAIL_REFUSED) => Cow::Borrowed("refused"),
        (_, FAIL_SYN_TIMEOUT) => Cow::Borrowed("syn-timeout"),
        (_, FAIL_RESET) => Cow::Borrowed("reset"),
        (_, FAIL_L7) => Cow::Borrowed("l7"),
        (_, r) => Cow::Owned(r.to_string()),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    ts.tv_sec.cast_unsigned() * 1_000_000_000 + ts.tv_nsec.cast_unsigned()
}

#[cfg(test)]
mod tests {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
        net::Ipv4Addr,
    };

    use mesh_common::{FAMILY_V4, PROTO_TCP};

    use super::*;

    /// Counts this thread's allocations, so a test can assert that a path makes none (other
    /// tests run on other threads and do not disturb the count).
    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    fn allocations() -> u64 {
        ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
    }

    // SAFETY: forwards to the system allocator unchanged; only counts.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: the caller's contract, passed on.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    struct Fixed {
        client: Arc<ObjectName>,
        service: Arc<ObjectName>,
    }

    impl Names for Fixed {
        fn pod_by_ip(&self, ip: IpAddr) -> Option<Arc<ObjectName>> {
            (ip == IpAddr::V4(Ipv4Addr::new(10, 1, 0, 2))).then(|| Arc::clone(&self.client))
        }
        fn service_by_addr(&self, addr: SocketAddr, udp: bool) -> Option<Arc<ObjectName>> {
            (addr.port() == 80 && !udp).then(|| Arc::clone(&self.service))
        }
        fn pod_by_cgroup(&self, _: u64) -> Option<Arc<ObjectName>> {
            None
        }
    }

    fn be(ip: [u8; 4]) -> mesh_common::AddrBe {
        [u32::from_ne_bytes(ip), 0, 0, 0]
    }

    fn event(kind: u8, i: u64) -> FlowEvent {
        FlowEvent {
            ts_ns: i,
            cookie: i,
            kind,
            family: FAMILY_V4,
            proto: PROTO_TCP,
            svc_addr_be: be([10, 96, 0, 10]),
            svc_port_be: 80u16.to_be(),
            backend_addr_be: be([10, 1, 0, 7]),
            backend_port_be: 8080u16.to_be(),
            backend_id: 3,
            client_addr_be: be([10, 1, 0, 2]),
            bytes_sent: 64,
            duration_ns: 5_000,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn naming_and_keeping_a_flow_allocates_nothing_and_the_text_comes_on_request() {
        let names = Fixed {
            client: Arc::new(ObjectName::new("shop", "client")),
            service: Arc::new(ObjectName::new("shop", "web")),
        };
        let hub = FlowHub::new();
        let mut live = hub.subscribe();
        // Fill the history past its capacity first: the steady state drops the oldest.
        for i in 0..=RECENT_CAPACITY as u64 {
            hub.publish(hub.enrich(&event(EV_OPEN, i), &names));
        }
        let before = allocations();
        for i in 0..2_000 {
            let kind = if i % 2 == 0 { EV_OPEN } else { EV_CLOSE };
            hub.publish(hub.enrich(&event(kind, i), &names));
        }
        assert_eq!(
            allocations() - before,
            0,
            "the per-event path (name, keep, broadcast) allocated"
        );
        assert_eq!(hub.recent().len(), RECENT_CAPACITY);
        let last = hub.recent().pop().unwrap().flow.to_proto();
        assert_eq!(
            (
                last.verdict.as_str(),
                last.source_namespace.as_str(),
                last.source_pod.as_str(),
                last.source_address.as_str(),
                last.service.as_str(),
                last.service_address.as_str(),
                last.backend_address.as_str(),
                last.protocol.as_str(),
                last.duration_us,
            ),
            (
                "close",
                "shop",
                "client",
                "10.1.0.2",
                "shop/web",
                "10.96.0.10:80",
                "10.1.0.7:8080",
                "TCP",
                5,
            )
        );
        // A live watcher gets the same records (it fell behind here: the hub kept sending).
        assert!(
            live.try_recv()
                .is_err_and(|e| matches!(e, broadcast::error::TryRecvError::Lagged(_)))
        );
        assert!(live.try_recv().is_ok_and(|f| f.flow.service.is_some()));
    }

    /// Drains what `stream` yields within a short wait.
    async fn drain<T>(stream: impl futures::Stream<Item = Followed<T>>) -> Vec<Followed<T>> {
        use futures::StreamExt as _;
        let mut stream = std::pin::pin!(stream);
        let mut got = Vec::new();
        while let Ok(Some(x)) =
            tokio::time::timeout(std::time::Duration::from_millis(100), stream.next()).await
        {
            got.push(x);
        }
        got
    }

    fn shape<T>(got: &[Followed<T>]) -> (Vec<u64>, u64) {
        let mut seqs = Vec::new();
        let mut lost = 0;
        for x in got {
            match x {
                Followed::Item(i) => seqs.push(i.seq),
                Followed::Lost(n) => lost += n,
            }
        }
        (seqs, lost)
    }

    #[tokio::test]
    async fn a_follower_behind_the_broadcast_catches_up_from_the_history() {
        let ring = Arc::new(SeqRing::with_live_buffer(1000, 16));
        let live = ring.subscribe();
        for i in 0..500u32 {
            ring.publish(i);
        }
        let stream = follow(Arc::clone(&ring), 0, live);
        let mut stream = Box::pin(stream);
        let mut got = Vec::new();
        {
            use futures::StreamExt as _;
            for _ in 0..500 {
                got.push(stream.next().await.expect("the stream goes on"));
            }
        }
        for i in 0..3u32 {
            ring.publish(1000 + i);
        }
        got.extend(drain(stream).await);
        let (seqs, lost) = shape(&got);
        assert_eq!(lost, 0, "the history held every flow the broadcast dropped");
        assert_eq!(seqs, (1..=503).collect::<Vec<u64>>(), "each once, in order");
    }

    #[tokio::test]
    async fn what_the_history_no_longer_holds_is_reported_lost_with_its_count() {
        let ring = Arc::new(SeqRing::with_live_buffer(100, 16));
        let live = ring.subscribe();
        for i in 0..500u32 {
            ring.publish(i);
        }
        let got = drain(follow(Arc::clone(&ring), 0, live)).await;
        assert!(matches!(got.first(), Some(Followed::Lost(400))), "{got:?}");
        let (seqs, lost) = shape(&got);
        assert_eq!(lost, 400);
        assert_eq!(seqs, (401..=500).collect::<Vec<u64>>());
    }
}
