//! The load client: many `kubevirt.hypervisor.v1.HypervisorReporter/Report` streams from
//! one process, speaking the real protocol the sidecar speaks (a bidi stream of
//! `DomainReport`s, one `ReportAck` per report), with the sidecar's keepalive settings.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::grpc::{Reporter, domain};
use hypervisor_proto::v1::{Domain, DomainKey, HypervisorType, domain_report::Change};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::transport::Endpoint;

/// Connections and streams being opened at once: enough to keep both sides busy, few
/// enough to stay inside the listen backlog (a SYN dropped there costs a 1 s retransmit).
const OPENING_AT_ONCE: usize = 128;
/// How long the aggregator may take to open a stream or to ack a report.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The namespace and name of the `index`th VMI: a DNS label and a DNS subdomain, shaped
/// like real ones (a node's VMIs spread over 100 namespaces).
pub fn vmi_key(index: usize) -> (String, String) {
    (
        format!("tenant-{:03}", index % 100),
        format!("vm-{index:05}-fedora"),
    )
}

/// The shared fixture domain with a uid of its own, numbered by `index`.
fn numbered(domain: Domain, index: usize) -> Domain {
    Domain {
        uid: format!("00000000-0000-4000-8000-{index:012x}"),
        ..domain
    }
}

/// The aggregator's gRPC address with the sidecar's connection settings (no HTTP/2 pings
/// of its own, TCP keepalive), so that an idle aggregator sees what a node's sidecars send.
fn endpoint(grpc_addr: &str) -> Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{grpc_addr}"))
        .with_context(|| format!("parsing {grpc_addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(10))))
}

/// How the streams share connections.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// `per_connection` streams on each HTTP/2 connection.
    Shared { per_connection: usize },
    /// One connection per stream, as a node's sidecars do.
    OwnConnection,
}

/// Streams held open, each having upserted one VMI, and the connections they use.
pub struct Streams {
    /// Held for their drop: dropping them ends the streams.
    _held: Vec<Reporter>,
    pub connections: usize,
}

/// Opens `count` streams; stream `i` upserts VMI `i` and waits for its ack (code OK).
pub async fn open_streams(grpc_addr: &str, count: usize, layout: Layout) -> Result<Streams> {
    let endpoint = endpoint(grpc_addr)?;
    let channels = match layout {
        Layout::Shared { per_connection } => {
            let channels = throttled(count.div_ceil(per_connection), |_| {
                let endpoint = endpoint.clone();
                async move {
                    endpoint
                        .connect()
                        .await
                        .context("connecting to the aggregator")
                }
            })
            .await?;
            Some((channels, per_connection))
        }
        Layout::OwnConnection => None,
    };
    let connections = channels.as_ref().map_or(count, |(c, _)| c.len());

    let held = throttled(count, |index| {
        let channel = channels
            .as_ref()
            .map(|(channels, per)| channels[index / per].clone());
        let endpoint = endpoint.clone();
        async move {
            let channel = match channel {
                Some(channel) => channel,
                None => endpoint
                    .connect()
                    .await
                    .context("connecting to the aggregator")?,
            };
            let mut stream = Reporter::open(channel, ACK_TIMEOUT).await?;
            let (namespace, name) = vmi_key(index);
            let ack = stream
                .upsert(numbered(
                    domain(&namespace, &name, HypervisorType::Kvm),
                    index,
                ))
                .await
                .with_context(|| format!("upserting {namespace}/{name}"))?;
            ensure!(
                ack.code == 0,
                "{namespace}/{name} refused ({}): {}",
                ack.code,
                ack.message
            );
            anyhow::Ok(stream)
        }
    })
    .await?;
    ensure!(
        held.len() == count,
        "opened {} of {count} streams",
        held.len()
    );
    Ok(Streams {
        _held: held,
        connections,
    })
}

/// Runs the tasks that `task` makes for `0..count`, at most [`OPENING_AT_ONCE`] at a time;
/// returns their results in the order they finished.
async fn throttled<T, F>(count: usize, task: impl Fn(usize) -> F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    let mut running = JoinSet::new();
    let mut done = Vec::with_capacity(count);
    for index in 0..count {
        if running.len() >= OPENING_AT_ONCE
            && let Some(finished) = running.join_next().await
        {
            done.push(finished.context("a task panicked")??);
        }
        running.spawn(task(index));
    }
    while let Some(finished) = running.join_next().await {
        done.push(finished.context("a task panicked")??);
    }
    Ok(done)
}

pub struct ChurnConfig {
    pub streams: usize,
    /// VMIs each stream may report; within the aggregator's --max-domains-per-stream.
    pub vmis_per_stream: usize,
    pub changes_per_second: f64,
    pub duration: Duration,
}

/// What the churn did and what the load client believes is live at the end.
pub struct ChurnOutcome {
    pub upserts: u64,
    pub withdrawals: u64,
    /// Acks with a code other than OK, with their messages.
    pub refused: Vec<String>,
    pub ack_latencies_ms: Vec<f64>,
    pub elapsed: Duration,
    /// (namespace, name) → hypervisor_type label of every series that should exist.
    pub live: BTreeMap<(String, String), &'static str>,
    /// The churn streams, still open, so the end state can be checked before they close.
    pub streams: Vec<Reporter>,
}

const TYPES: [HypervisorType; 3] = [
    HypervisorType::Kvm,
    HypervisorType::QemuTcg,
    HypervisorType::Mshv,
];

/// Upserts, modifies and withdraws VMIs on `streams` connections (one stream each) at
/// `changes_per_second` in total, spread evenly over the streams and over time.
pub async fn churn(grpc_addr: &str, config: &ChurnConfig) -> Result<ChurnOutcome> {
    let endpoint = endpoint(grpc_addr)?;
    let mut streams = Vec::with_capacity(config.streams);
    for _ in 0..config.streams {
        let channel = endpoint
            .connect()
            .await
            .context("connecting to the aggregator")?;
        streams.push(Reporter::open(channel, ACK_TIMEOUT).await?);
    }

    // Every stream sends one change per `period`; stream s is offset by s/streams of a
    // period, so the aggregator sees a steady flow rather than bursts.
    let period = Duration::from_secs_f64(config.streams as f64 / config.changes_per_second);
    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + config.duration;
    let mut tasks = JoinSet::new();
    for (s, stream) in streams.into_iter().enumerate() {
        let first = start + period.mul_f64(s as f64 / config.streams as f64);
        let pool = config.vmis_per_stream;
        tasks.spawn(churn_stream(s, stream, pool, first, period, deadline));
    }
    let mut outcome = ChurnOutcome {
        upserts: 0,
        withdrawals: 0,
        refused: Vec::new(),
        ack_latencies_ms: Vec::new(),
        elapsed: Duration::ZERO,
        live: BTreeMap::new(),
        streams: Vec::new(),
    };
    let mut last_ack = start;
    while let Some(done) = tasks.join_next().await {
        let stream = done.context("churn task")??;
        last_ack = last_ack.max(stream.last_ack);
        outcome.upserts += stream.upserts;
        outcome.withdrawals += stream.withdrawals;
        outcome.refused.extend(stream.refused);
        outcome.ack_latencies_ms.extend(stream.ack_latencies_ms);
        outcome.live.extend(stream.live);
        outcome.streams.push(stream.held);
    }
    // Up to the last acknowledged change: the streams then wait out their last period.
    outcome.elapsed = last_ack.saturating_duration_since(start);
    Ok(outcome)
}

struct StreamOutcome {
    upserts: u64,
    withdrawals: u64,
    refused: Vec<String>,
    ack_latencies_ms: Vec<f64>,
    live: BTreeMap<(String, String), &'static str>,
    held: Reporter,
    last_ack: Instant,
}

async fn churn_stream(
    s: usize,
    mut held: Reporter,
    pool: usize,
    first: Instant,
    period: Duration,
    deadline: Instant,
) -> Result<StreamOutcome> {
    // Seeded: the same run makes the same choices.
    let mut rng = fastrand::Rng::with_seed(s as u64);
    let mut ticks = tokio::time::interval_at(first, period);
    // A stream that fell behind catches up, so the achieved rate shows the aggregator's pace.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut live: BTreeMap<usize, HypervisorType> = BTreeMap::new();
    let (mut upserts, mut withdrawals) = (0, 0);
    let mut refused = Vec::new();
    let mut ack_latencies_ms = Vec::new();
    let mut last_ack = first;
    let key = |v: usize| {
        (
            format!("churn-{:02}", s % 10),
            format!("vm-s{s:03}-v{v:02}.churn"),
        )
    };
    loop {
        if ticks.tick().await >= deadline {
            break;
        }
        let v = rng.usize(..pool);
        let (namespace, name) = key(v);
        let (change, next) = match live.get(&v) {
            // Mostly withdraw what runs; sometimes change its hypervisor (a modification).
            Some(&current) if rng.u8(..3) == 0 => {
                let other = loop {
                    let t = TYPES[rng.usize(..TYPES.len())];
                    if t != current {
                        break t;
                    }
                };
                (
                    Change::Upsert(numbered(domain(&namespace, &name, other), s * 100 + v)),
                    Some(other),
                )
            }
            Some(_) => (
                Change::Withdraw(DomainKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                }),
                None,
            ),
            None => {
                let t = TYPES[rng.usize(..TYPES.len())];
                (
                    Change::Upsert(numbered(domain(&namespace, &name, t), s * 100 + v)),
                    Some(t),
                )
            }
        };
        let sent = Instant::now();
        let ack = held
            .send(Some(change))
            .await
            .with_context(|| format!("churn stream {s}"))?;
        last_ack = Instant::now();
        ack_latencies_ms.push(last_ack.duration_since(sent).as_secs_f64() * 1e3);
        if ack.code != 0 {
            refused.push(format!(
                "{namespace}/{name}: code {}: {}",
                ack.code, ack.message
            ));
            continue;
        }
        match next {
            Some(t) => {
                upserts += 1;
                live.insert(v, t);
            }
            None => {
                withdrawals += 1;
                live.remove(&v);
            }
        }
    }
    Ok(StreamOutcome {
        upserts,
        withdrawals,
        refused,
        ack_latencies_ms,
        live: live.into_iter().map(|(v, t)| (key(v), t.label())).collect(),
        held,
        last_ack,
    })
}
