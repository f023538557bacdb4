//! The registry: the one place that knows which series exist.
//!
//! Every report stream gets a [`StreamHandle`]; a stream can only change what it
//! reported itself, and everything it reported disappears when the handle is
//! dropped, whatever ended the stream. Two streams may claim the same VMI (a
//! sidecar restarted while its old connection has not timed out yet): the
//! oldest claim is the exposed series, the others are held until it goes.
//!
//! Each claim carries its series already in the Prometheus text format, rendered
//! when the claim is made or changed, as kube-state-metrics keeps its series: a
//! scrape copies the lines as they are, which at 10,000 series takes a fraction of
//! the time of formatting them anew.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use hypervisor_proto::v1::{Domain, HypervisorType};
use smallvec::SmallVec;
use tokio::sync::broadcast;

use crate::text_format;
use crate::validate::{self, Limit, Rejection};

/// The series of every exposed claim: one per running VMI.
pub const INFO_SERIES: &str = "kubevirt_vmi_hypervisor_info";

/// Identifies one report stream for the aggregator's lifetime.
pub type StreamId = u64;

/// A VMI's identity on this node: its namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmiKey {
    pub namespace: String,
    pub name: String,
}

/// One stream's claim on one VMI: what it reported and when.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub domain: Domain,
    /// The claim's series, one line of the text format:
    /// `kubevirt_vmi_hypervisor_info{namespace="…",name="…",node="…",hypervisor_type="…",hypervisor_version="…"} 1`.
    pub series: Box<str>,
    pub stream_id: StreamId,
    pub peer: Arc<str>,
    pub reported_at: SystemTime,
    /// Another stream's older claim on the same VMI is the exposed series.
    pub held: bool,
}

impl Claim {
    pub fn hypervisor_type(&self) -> HypervisorType {
        hypervisor_type(&self.domain)
    }
}

fn hypervisor_type(domain: &Domain) -> HypervisorType {
    // An enum value from a newer sidecar is still a domain we know nothing about.
    HypervisorType::try_from(domain.hypervisor_type).unwrap_or(HypervisorType::Unknown)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Removed,
}

/// A change of one claim, for the inventory's watchers.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: ChangeKind,
    pub claim: Claim,
}

/// Counts of what the streams sent, for the aggregator's own metrics. Atomics beside
/// the state rather than in it: a report refused before it reaches the registry (the
/// flood a limit is there to absorb) is counted without taking the registry's lock.
#[derive(Debug, Default)]
pub struct Counters {
    upserts: AtomicU64,
    withdrawals: AtomicU64,
    /// Indexed like [`Rejection::ALL`].
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Indexed like [`Limit::ALL`].
    limit_hits: [AtomicU64; Limit::ALL.len()],
}

impl Counters {
    pub fn upserts(&self) -> u64 {
        self.upserts.load(Ordering::Relaxed)
    }

    pub fn withdrawals(&self) -> u64 {
        self.withdrawals.load(Ordering::Relaxed)
    }

    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected[reason.index()].load(Ordering::Relaxed)
    }

    pub fn limit_hits(&self, limit: Limit) -> u64 {
        self.limit_hits[limit.index()].load(Ordering::Relaxed)
    }

    fn upsert(&self) {
        self.upserts.fetch_add(1, Ordering::Relaxed);
    }

    fn withdrawal(&self) {
        self.withdrawals.fetch_add(1, Ordering::Relaxed);
    }

    /// A refused report, under its reason and, when a limit refused it, that limit.
    fn refusal(&self, reason: Rejection) {
        self.rejected[reason.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(limit) = reason.limit() {
            self.limit_hit(limit);
        }
    }

    fn limit_hit(&self, limit: Limit) {
        self.limit_hits[limit.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// How much the registry holds at most.
#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    /// Open report streams, all clients together.
    pub streams: usize,
    /// VMIs one stream may report (a virt-launcher holds one).
    pub domains_per_stream: usize,
}

/// A new stream was refused: the aggregator holds as many as it may.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the aggregator holds its maximum of {0} report streams")]
pub struct TooManyStreams(pub usize);

/// What the exposition reads at each scrape.
pub struct Snapshot<'a> {
    state: MutexGuard<'a, State>,
}

impl Snapshot<'_> {
    /// The exposed series: the oldest claim of every VMI.
    pub fn series(&self) -> impl Iterator<Item = &Claim> {
        self.state.vmis.values().filter_map(|claims| claims.first())
    }

    /// How many series [`Snapshot::series`] yields.
    pub fn series_count(&self) -> usize {
        self.state.vmis.len()
    }

    pub fn open_streams(&self) -> usize {
        self.state.streams.len()
    }

    pub fn held_claims(&self) -> usize {
        self.state
            .vmis
            .values()
            .map(|claims| claims.len() - 1)
            .sum()
    }
}

pub struct Registry {
    node: String,
    capacity: Capacity,
    state: Mutex<State>,
    counters: Counters,
}

struct State {
    next_stream_id: StreamId,
    streams: HashMap<StreamId, StreamRecord>,
    /// Every claim on a VMI, oldest first.
    vmis: BTreeMap<VmiKey, Claims>,
    /// Each change goes out under the lock that made it, so watchers get the changes in
    /// the order the state took them, and a watcher's snapshot holds exactly the changes
    /// made before it subscribed. A send only copies into the buffer: it never blocks.
    changes: broadcast::Sender<Change>,
}

/// The claims on one VMI, oldest first. Nearly always one: kept in the map's own
/// node, so that a scrape reads each series without chasing a pointer per VMI.
type Claims = SmallVec<[Claim; 1]>;

struct StreamRecord {
    keys: HashSet<VmiKey>,
}

/// Watchers that fall this far behind are cut off rather than slowing reports.
const WATCH_BUFFER: usize = 1024;

impl Registry {
    pub fn new(node: impl Into<String>, capacity: Capacity) -> Arc<Self> {
        Arc::new(Registry {
            node: node.into(),
            capacity,
            state: Mutex::new(State {
                next_stream_id: 0,
                streams: HashMap::new(),
                vmis: BTreeMap::new(),
                changes: broadcast::channel(WATCH_BUFFER).0,
            }),
            counters: Counters::default(),
        })
    }

    /// The value of every series' `node` label.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn open_stream(
        self: &Arc<Self>,
        peer: impl Into<Arc<str>>,
    ) -> Result<StreamHandle, TooManyStreams> {
        let mut state = self.lock();
        if state.streams.len() >= self.capacity.streams {
            self.counters.limit_hit(Limit::Streams);
            return Err(TooManyStreams(self.capacity.streams));
        }
        state.next_stream_id += 1;
        let id = state.next_stream_id;
        state.streams.insert(
            id,
            StreamRecord {
                keys: HashSet::new(),
            },
        );
        Ok(StreamHandle {
            registry: Arc::clone(self),
            id,
            peer: peer.into(),
        })
    }

    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot { state: self.lock() }
    }

    /// Every claim, exposed and held.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().vmis.values().flatten().cloned().collect()
    }

    /// Every claim now plus every change from then on, with nothing lost in between.
    pub fn watch(&self) -> (Vec<Claim>, broadcast::Receiver<Change>) {
        let state = self.lock();
        let receiver = state.changes.subscribe();
        (state.vmis.values().flatten().cloned().collect(), receiver)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the state half-changed: every change is made
        // by code that does not panic, so the data behind a poisoned lock is sound.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn upsert(&self, stream: &StreamHandle, domain: Domain) -> Result<(), Rejection> {
        let key = VmiKey {
            namespace: domain.namespace.clone(),
            name: domain.name.clone(),
        };
        let mut state = self.lock();
        let full = state.streams.get(&stream.id).is_some_and(|record| {
            record.keys.len() >= self.capacity.domains_per_stream && !record.keys.contains(&key)
        });
        if full {
            self.counters.refusal(Rejection::TooManyDomains);
            return Err(Rejection::TooManyDomains);
        }
        self.counters.upsert();
        let claims = state.vmis.entry(key.clone()).or_default();
        let (kind, claim) = match claims.iter_mut().find(|c| c.stream_id == stream.id) {
            Some(existing) if existing.domain == domain => return Ok(()),
            Some(existing) => {
                existing.series = series_line(&self.node, &domain);
                existing.domain = domain;
                existing.reported_at = SystemTime::now();
                (ChangeKind::Modified, existing.clone())
            }
            None => {
                let claim = Claim {
                    series: series_line(&self.node, &domain),
                    domain,
                    stream_id: stream.id,
                    peer: Arc::clone(&stream.peer),
                    reported_at: SystemTime::now(),
                    held: !claims.is_empty(),
                };
                claims.push(claim.clone());
                (ChangeKind::Added, claim)
            }
        };
        if let Some(record) = state.streams.get_mut(&stream.id) {
            record.keys.insert(key);
        }
        state.publish(kind, claim);
        Ok(())
    }

    fn withdraw(&self, stream: &StreamHandle, key: &VmiKey) -> Result<(), Rejection> {
        let mut state = self.lock();
        let owned = state
            .streams
            .get_mut(&stream.id)
            .is_some_and(|record| record.keys.remove(key));
        if !owned {
            self.counters.refusal(Rejection::NotReported);
            return Err(Rejection::NotReported);
        }
        self.counters.withdrawal();
        let changes = remove_claim(&mut state.vmis, key, stream.id);
        for (kind, claim) in changes {
            state.publish(kind, claim);
        }
        Ok(())
    }

    fn close_stream(&self, id: StreamId) {
        let mut state = self.lock();
        let Some(record) = state.streams.remove(&id) else {
            return;
        };
        let mut changes = Vec::new();
        for key in &record.keys {
            changes.extend(remove_claim(&mut state.vmis, key, id));
        }
        for (kind, claim) in changes {
            state.publish(kind, claim);
        }
    }
}

impl State {
    fn publish(&self, kind: ChangeKind, claim: Claim) {
        if self.changes.receiver_count() > 0 {
            // Only fails when every watcher left in the meantime.
            let _ = self.changes.send(Change { kind, claim });
        }
    }
}

/// A VMI's series as a line of the text format.
fn series_line(node: &str, domain: &Domain) -> Box<str> {
    let mut line = String::with_capacity(160);
    text_format::sample(
        &mut line,
        INFO_SERIES,
        &[
            ("namespace", &domain.namespace),
            ("name", &domain.name),
            ("node", node),
            ("hypervisor_type", hypervisor_type(domain).label()),
            ("hypervisor_version", &domain.hypervisor_version),
        ],
        1,
    );
    line.into_boxed_str()
}

/// Removes one stream's claim on a VMI, promoting the next-oldest claim if the
/// removed one was exposed. Returns the changes for watchers.
fn remove_claim(
    vmis: &mut BTreeMap<VmiKey, Claims>,
    key: &VmiKey,
    stream_id: StreamId,
) -> Vec<(ChangeKind, Claim)> {
    let mut changes = Vec::new();
    let Some(claims) = vmis.get_mut(key) else {
        return changes;
    };
    if let Some(position) = claims.iter().position(|c| c.stream_id == stream_id) {
        changes.push((ChangeKind::Removed, claims.remove(position)));
        if position == 0
            && let Some(promoted) = claims.first_mut()
        {
            promoted.held = false;
            changes.push((ChangeKind::Modified, promoted.clone()));
        }
    }
    if claims.is_empty() {
        vmis.remove(key);
    }
    changes
}

/// One open report stream. Dropping it removes every series the stream reported.
pub struct StreamHandle {
    registry: Arc<Registry>,
    id: StreamId,
    peer: Arc<str>,
}

impl StreamHandle {
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Creates or replaces this stream's series of the domain's VMI.
    pub fn upsert(&self, domain: Domain) -> Result<(), Rejection> {
        if let Err(rejection) = validate::domain(&domain) {
            self.count_rejection(rejection);
            return Err(rejection);
        }
        self.registry.upsert(self, domain)
    }

    /// Counts a report of this stream that was refused before it reached the registry.
    pub fn count_rejection(&self, reason: Rejection) {
        self.registry.counters.refusal(reason);
    }

    /// Counts a limit this stream ran into that refuses no single report (the message
    /// size, which ends the stream).
    pub fn count_limit_hit(&self, limit: Limit) {
        self.registry.counters.limit_hit(limit);
    }

    /// Removes this stream's series of a VMI; another stream's series is out of reach.
    pub fn withdraw(&self, key: &VmiKey) -> Result<(), Rejection> {
        self.registry.withdraw(self, key)
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.registry.close_stream(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::domain;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicBool;

    const CAPACITY: Capacity = Capacity {
        streams: 8,
        domains_per_stream: 2,
    };

    fn key(namespace: &str, name: &str) -> VmiKey {
        VmiKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn exposed(registry: &Registry) -> Vec<(String, String, &'static str)> {
        let snapshot = registry.snapshot();
        snapshot
            .series()
            .map(|c| {
                (
                    c.domain.namespace.clone(),
                    c.domain.name.clone(),
                    c.hypervisor_type().label(),
                )
            })
            .collect()
    }

    #[test]
    fn label_values_are_escaped_for_the_text_format() {
        let registry = Registry::new("node-1", CAPACITY);
        let stream = registry.open_stream("peer").unwrap();
        let mut quoted = domain("default", "vm-a", HypervisorType::Kvm);
        quoted.hypervisor_version = r#"7.2 "beta" \ build"#.into();
        stream.upsert(quoted).unwrap();
        let snapshot = registry.snapshot();
        let lines: Vec<&str> = snapshot.series().map(|c| &*c.series).collect();
        assert_eq!(
            lines,
            [
                "kubevirt_vmi_hypervisor_info{namespace=\"default\",name=\"vm-a\",node=\"node-1\",\
                 hypervisor_type=\"kvm\",hypervisor_version=\"7.2 \\\"beta\\\" \\\\ build\"} 1\n"
            ]
        );
    }

    #[test]
    fn upsert_then_withdraw() {
        let registry = Registry::new("node-1", CAPACITY);
        let stream = registry.open_stream("peer").unwrap();
        stream
            .upsert(domain("default", "vm-a", HypervisorType::Kvm))
            .unwrap();
        assert_eq!(
            exposed(&registry),
            [("default".into(), "vm-a".into(), "kvm")]
        );
        stream
            .upsert(domain("default", "vm-a", HypervisorType::QemuTcg))
            .unwrap();
        assert_eq!(
            exposed(&registry),
            [("default".into(), "vm-a".into(), "qemu-tcg")]
        );
        stream.withdraw(&key("default", "vm-a")).unwrap();
        assert!(exposed(&registry).is_empty());
        let counters = registry.counters();
        assert_eq!((counters.upserts(), counters.withdrawals()), (2, 1));
    }

    #[test]
    fn closing_a_stream_drops_only_its_series() {
        let registry = Registry::new("node-1", CAPACITY);
        let first = registry.open_stream("a").unwrap();
        let second = registry.open_stream("b").unwrap();
        first
            .upsert(domain("ns", "vm-1", HypervisorType::Kvm))
            .unwrap();
        first
            .upsert(domain("ns", "vm-2", HypervisorType::Kvm))
            .unwrap();
        second
            .upsert(domain("ns", "vm-3", HypervisorType::Mshv))
            .unwrap();
        drop(first);
        assert_eq!(exposed(&registry), [("ns".into(), "vm-3".into(), "mshv")]);
        assert_eq!(registry.snapshot().open_streams(), 1);
    }

    #[test]
    fn a_stream_cannot_withdraw_another_streams_series() {
        let registry = Registry::new("node-1", CAPACITY);
        let owner = registry.open_stream("a").unwrap();
        let other = registry.open_stream("b").unwrap();
        owner
            .upsert(domain("ns", "vm", HypervisorType::Kvm))
            .unwrap();
        assert_eq!(
            other.withdraw(&key("ns", "vm")),
            Err(Rejection::NotReported)
        );
        assert_eq!(exposed(&registry).len(), 1);
        assert_eq!(registry.counters().rejected(Rejection::NotReported), 1);
    }

    #[test]
    fn a_second_claim_is_held_until_the_first_goes() {
        let registry = Registry::new("node-1", CAPACITY);
        let old = registry.open_stream("old").unwrap();
        let new = registry.open_stream("new").unwrap();
        old.upsert(domain("ns", "vm", HypervisorType::Kvm)).unwrap();
        new.upsert(domain("ns", "vm", HypervisorType::QemuTcg))
            .unwrap();
        assert_eq!(exposed(&registry), [("ns".into(), "vm".into(), "kvm")]);
        assert_eq!(registry.snapshot().held_claims(), 1);
        let held: Vec<bool> = registry.claims().iter().map(|c| c.held).collect();
        assert_eq!(held, [false, true]);

        drop(old);
        assert_eq!(exposed(&registry), [("ns".into(), "vm".into(), "qemu-tcg")]);
        assert_eq!(registry.snapshot().held_claims(), 0);
    }

    #[test]
    fn an_invalid_report_changes_nothing_else() {
        let registry = Registry::new("node-1", CAPACITY);
        let stream = registry.open_stream("a").unwrap();
        stream
            .upsert(domain("ns", "vm", HypervisorType::Kvm))
            .unwrap();
        assert_eq!(
            stream.upsert(domain("Bad_NS", "vm", HypervisorType::Kvm)),
            Err(Rejection::InvalidNamespace)
        );
        assert_eq!(exposed(&registry), [("ns".into(), "vm".into(), "kvm")]);
    }

    #[test]
    fn watchers_see_every_change_after_the_snapshot() {
        let registry = Registry::new("node-1", CAPACITY);
        let stream = registry.open_stream("a").unwrap();
        stream
            .upsert(domain("ns", "before", HypervisorType::Kvm))
            .unwrap();
        let (initial, mut changes) = registry.watch();
        assert_eq!(initial.len(), 1);
        stream
            .upsert(domain("ns", "after", HypervisorType::Kvm))
            .unwrap();
        drop(stream);
        let kinds: Vec<(ChangeKind, String)> = std::iter::from_fn(|| changes.try_recv().ok())
            .map(|c| (c.kind, c.claim.domain.name))
            .collect();
        assert_eq!(
            kinds.len(),
            3,
            "one add and two removals, in any order of removal: {kinds:?}"
        );
        assert_eq!(kinds[0], (ChangeKind::Added, "after".into()));
        assert!(
            kinds[1..]
                .iter()
                .all(|(kind, _)| *kind == ChangeKind::Removed)
        );
    }

    #[test]
    fn limits_refuse_only_what_is_over_them() {
        let registry = Registry::new("node-1", CAPACITY);
        let streams: Vec<StreamHandle> = (0..CAPACITY.streams)
            .map(|i| registry.open_stream(format!("peer-{i}")).unwrap())
            .collect();
        assert_eq!(
            registry.open_stream("one too many").err(),
            Some(TooManyStreams(CAPACITY.streams))
        );

        let stream = &streams[0];
        stream
            .upsert(domain("ns", "vm-1", HypervisorType::Kvm))
            .unwrap();
        stream
            .upsert(domain("ns", "vm-2", HypervisorType::Kvm))
            .unwrap();
        assert_eq!(
            stream.upsert(domain("ns", "vm-3", HypervisorType::Kvm)),
            Err(Rejection::TooManyDomains)
        );
        // Updating what it already reports is still fine at the limit.
        stream
            .upsert(domain("ns", "vm-2", HypervisorType::QemuTcg))
            .unwrap();
        assert_eq!(exposed(&registry).len(), 2);
        let counters = registry.counters();
        assert_eq!(counters.limit_hits(Limit::Streams), 1);
        assert_eq!(counters.limit_hits(Limit::DomainsPerStream), 1);
        assert_eq!(counters.rejected(Rejection::TooManyDomains), 1);

        drop(streams);
        assert!(registry.open_stream("room again").is_ok());
    }

    #[test]
    fn unknown_hypervisor_enum_values_read_as_unknown() {
        let mut d = domain("ns", "vm", HypervisorType::Kvm);
        d.hypervisor_type = 42;
        let registry = Registry::new("n", CAPACITY);
        let stream = registry.open_stream("a").unwrap();
        stream.upsert(d).unwrap();
        assert_eq!(exposed(&registry), [("ns".into(), "vm".into(), "unknown")]);
    }

    /// Watchers that subscribe at any moment while several streams report, withdraw and
    /// close at once must see each change once and in the order the state took it: a
    /// watcher's snapshot with its changes applied in order ends as the registry does.
    #[test]
    fn watchers_that_subscribe_under_load_agree_with_the_registry() {
        for seed in 0..WATCH_ROUNDS {
            let (watchers, disagreements) = watch_round(seed);
            assert!(
                disagreements.is_empty(),
                "round {seed}: {} of {watchers} watchers disagree with the registry; the first: {}",
                disagreements.len(),
                disagreements[0],
            );
        }
    }

    const WATCH_ROUNDS: u64 = 40;
    const WRITERS: usize = 3;
    const STREAMS_PER_WRITER: usize = 2;
    const OPS_PER_WRITER: usize = 80;
    const WATCHERS: usize = 2;
    const SUBSCRIPTIONS_PER_WATCHER: usize = 200;
    const WATCHED_CAPACITY: Capacity = Capacity {
        streams: 64,
        domains_per_stream: 2,
    };
    // A watcher drains only at the end of its round, so a round makes no more changes than
    // it may fall behind by: at most two per claim a closing stream drops (its removal and
    // the promotion of the next claim), and a stream closes once per operation at most.
    const _: () =
        assert!(WRITERS * OPS_PER_WRITER * 2 * WATCHED_CAPACITY.domains_per_stream <= WATCH_BUFFER);

    /// One round on a fresh registry: writers and watchers start together; once the writers
    /// are done, every watcher's view is checked against the registry. Returns how many
    /// watchers subscribed and what each disagreeing one saw.
    fn watch_round(seed: u64) -> (usize, Vec<String>) {
        let registry = Registry::new("node-1", WATCHED_CAPACITY);
        let start = Barrier::new(WRITERS + WATCHERS);
        let writing = AtomicBool::new(true);
        let (streams, subscriptions) = std::thread::scope(|scope| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|writer| {
                    let (registry, start) = (&registry, &start);
                    scope.spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(seed * 64 + writer as u64);
                        let mut streams: Vec<StreamHandle> = (0..STREAMS_PER_WRITER)
                            .map(|_| registry.open_stream("writer").unwrap())
                            .collect();
                        start.wait();
                        for _ in 0..OPS_PER_WRITER {
                            let stream = rng.usize(..STREAMS_PER_WRITER);
                            // Few VMIs, so that streams claim the same ones and hold claims.
                            let name = format!("vm-{}", rng.usize(..3));
                            match rng.u8(..10) {
                                0..5 => {
                                    let hypervisor = [
                                        HypervisorType::Kvm,
                                        HypervisorType::QemuTcg,
                                        HypervisorType::Mshv,
                                    ][rng.usize(..3)];
                                    // Refused when the stream is full: that changes nothing.
                                    let _ = streams[stream].upsert(domain("ns", &name, hypervisor));
                                }
                                5..8 => {
                                    // Refused when the stream holds no such claim.
                                    let _ = streams[stream].withdraw(&key("ns", &name));
                                }
                                _ => streams[stream] = registry.open_stream("writer").unwrap(),
                            }
                        }
                        streams
                    })
                })
                .collect();
            let watchers: Vec<_> = (0..WATCHERS)
                .map(|watcher| {
                    let (registry, start, writing) = (&registry, &start, &writing);
                    scope.spawn(move || {
                        let mut rng = fastrand::Rng::with_seed(seed * 64 + 32 + watcher as u64);
                        let mut subscriptions = Vec::new();
                        start.wait();
                        while writing.load(Ordering::Acquire)
                            && subscriptions.len() < SUBSCRIPTIONS_PER_WATCHER
                        {
                            subscriptions.push(registry.watch());
                            for _ in 0..rng.usize(..200) {
                                std::hint::spin_loop();
                            }
                        }
                        subscriptions
                    })
                })
                .collect();
            let streams: Vec<Vec<StreamHandle>> =
                writers.into_iter().map(|w| w.join().unwrap()).collect();
            writing.store(false, Ordering::Release);
            let subscriptions: Vec<_> = watchers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            (streams, subscriptions)
        });
        let expected = by_identity(registry.claims());
        let watchers = subscriptions.len();
        let disagreements = subscriptions
            .into_iter()
            .enumerate()
            .filter_map(|(watcher, (initial, changes))| {
                let seen = match replay(initial, changes) {
                    Ok(seen) => seen,
                    Err(wrong) => return Some(format!("watcher {watcher} {wrong}")),
                };
                (seen != expected).then(|| {
                    format!(
                        "watcher {watcher} ends with {:?} but the registry holds {:?}",
                        summary(&seen),
                        summary(&expected)
                    )
                })
            })
            .collect();
        drop(streams);
        (watchers, disagreements)
    }

    /// A claim's identity: the VMI and the stream that claims it.
    type Identity = (VmiKey, StreamId);

    fn identity(claim: &Claim) -> Identity {
        (
            key(&claim.domain.namespace, &claim.domain.name),
            claim.stream_id,
        )
    }

    fn by_identity(claims: Vec<Claim>) -> BTreeMap<Identity, Claim> {
        claims.into_iter().map(|c| (identity(&c), c)).collect()
    }

    /// A watcher's view: its snapshot with every change received since applied in order.
    fn replay(
        initial: Vec<Claim>,
        mut changes: broadcast::Receiver<Change>,
    ) -> Result<BTreeMap<Identity, Claim>, String> {
        let mut view = by_identity(initial);
        loop {
            let change = match changes.try_recv() {
                Ok(change) => change,
                Err(broadcast::error::TryRecvError::Empty) => return Ok(view),
                Err(err) => panic!("the round is larger than the watch buffer: {err}"),
            };
            let id = identity(&change.claim);
            let kind = change.kind;
            let wrong = match kind {
                ChangeKind::Added => view.insert(id.clone(), change.claim).is_some(),
                ChangeKind::Modified => view.insert(id.clone(), change.claim).is_none(),
                ChangeKind::Removed => view.remove(&id).is_none(),
            };
            if wrong {
                let (key, stream) = id;
                let state = if kind == ChangeKind::Added {
                    "already"
                } else {
                    "not"
                };
                return Err(format!(
                    "saw {kind:?} {}/{} of stream {stream}, {state} in its view",
                    key.namespace, key.name
                ));
            }
        }
    }

    fn summary(claims: &BTreeMap<Identity, Claim>) -> Vec<String> {
        claims
            .values()
            .map(|c| {
                format!(
                    "{}/{} of stream {}: {}{}",
                    c.domain.namespace,
                    c.domain.name,
                    c.stream_id,
                    c.hypervisor_type().label(),
                    if c.held { ", held" } else { "" }
                )
            })
            .collect()
    }
}
