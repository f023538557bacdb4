//! Streams the domains to report to the node-aggregator, and keeps doing so.
//!
//! Each connection starts from nothing on the aggregator's side (a closed stream
//! takes its series with it), so every new stream first sends the whole current
//! set, then only the differences as they come.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use hypervisor_proto::v1::hypervisor_reporter_client::HypervisorReporterClient;
use hypervisor_proto::v1::{
    Domain, DomainKey, DomainReport, DomainState, ReportAck, domain_report::Change,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};
use tower::service_fn;
use tracing::{debug, info, warn};

use crate::domain::{Domains, RunningDomain};
use crate::hook::Defined;
use crate::libvirt::LibvirtView;

/// Where the domains to report come from: what runs, from libvirt; who each VMI is,
/// from the OnDefineDomain hook; and only when libvirt is out of reach, the domain
/// that the hook described, once libvirt holds it.
pub struct Sources {
    libvirt: watch::Receiver<LibvirtView>,
    hook: watch::Receiver<Defined>,
    hook_mode_logged: bool,
    /// Domains whose metadata names another uid than their VMI, logged once each.
    uid_conflicts_logged: BTreeSet<String>,
}

impl Sources {
    pub fn new(libvirt: watch::Receiver<LibvirtView>, hook: watch::Receiver<Defined>) -> Self {
        Sources {
            libvirt,
            hook,
            hook_mode_logged: false,
            uid_conflicts_logged: BTreeSet::new(),
        }
    }

    /// Waits until either source changes. A source whose sender is gone never changes again.
    async fn changed(&mut self) {
        let Sources { libvirt, hook, .. } = self;
        let libvirt = async {
            if libvirt.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let hook = async {
            if hook.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = libvirt => {}
            () = hook => {}
        }
    }

    /// The domains to report now: what runs, as of libvirt's last sync; nothing before the
    /// first. When libvirt is out of reach, the hook's domain, but only once libvirt holds
    /// it as far as the hooks can tell.
    fn current(&mut self) -> Domains {
        // Both are marked seen, so that a change of the unused one wakes nobody again.
        let hook = self.hook.borrow_and_update().clone();
        let libvirt = self.libvirt.borrow_and_update().clone();
        match libvirt {
            LibvirtView::Synced(live) => self.with_vmi_uids(live, &hook.domains),
            LibvirtView::Unreachable(_) if !hook.in_libvirt => Domains::new(),
            LibvirtView::Unreachable(reason) => {
                if !hook.domains.is_empty() && !self.hook_mode_logged {
                    self.hook_mode_logged = true;
                    warn!(
                        %reason,
                        "libvirt is out of reach: reporting the domain from the OnDefineDomain \
                         hook and withdrawing it on Shutdown (is the libvirt-runtime volume \
                         mounted into this container?)"
                    );
                }
                hook.domains
            }
            LibvirtView::Pending => Domains::new(),
        }
    }

    /// The live domains with the uid of their VMI, which only the hook's VMI JSON has:
    /// virt-launcher defines the domain with an empty `<uid>` in its metadata.
    fn with_vmi_uids(&mut self, mut live: Domains, hook: &Domains) -> Domains {
        for (name, running) in &mut live {
            let Some(vmi_uid) = hook.get(name).and_then(|defined| defined.uid.as_ref()) else {
                continue;
            };
            if let Some(metadata_uid) = &running.uid
                && metadata_uid != vmi_uid
                && self.uid_conflicts_logged.insert(name.clone())
            {
                warn!(
                    domain = %name,
                    %metadata_uid,
                    %vmi_uid,
                    "the domain's metadata names another uid than its VMI; reporting the VMI's"
                );
            }
            running.uid = Some(vmi_uid.clone());
        }
        live
    }
}

/// Where the node-aggregator listens: `http://HOST:PORT` or `unix:///PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AggregatorAddr {
    Http(String),
    Unix(PathBuf),
}

impl FromStr for AggregatorAddr {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> anyhow::Result<Self> {
        if let Some(path) = value.strip_prefix("unix://") {
            if !path.starts_with('/') {
                bail!("{value:?}: a unix socket address needs an absolute path (unix:///PATH)");
            }
            return Ok(AggregatorAddr::Unix(PathBuf::from(path)));
        }
        if value.starts_with("http://") {
            Endpoint::from_shared(value.to_string())
                .with_context(|| format!("{value:?} is not a valid http://HOST:PORT address"))?;
            return Ok(AggregatorAddr::Http(value.to_string()));
        }
        bail!("{value:?}: expected http://HOST:PORT or unix:///PATH")
    }
}

impl std::fmt::Display for AggregatorAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggregatorAddr::Http(uri) => f.write_str(uri),
            AggregatorAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Reconnection delays: doubled after each failure up to the cap, with jitter so
/// that a node's sidecars do not all knock at once after an aggregator restart.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(3);
/// The longest wait before resending a report the aggregator refused for a limit.
const MAX_REFUSED_RETRY: Duration = Duration::from_secs(30);
/// A stream that lived this long was healthy; the next reconnect starts with short delays.
const STABLE_STREAM: Duration = Duration::from_secs(10);
/// How long a withdrawal at shutdown may wait for the aggregator's answer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Streams `domains` to the aggregator until `stop` turns true; then withdraws
/// everything and closes the stream.
pub async fn run(
    aggregator: &AggregatorAddr,
    domains: &mut Sources,
    mut stop: watch::Receiver<bool>,
) {
    let shutdown = async move {
        if stop.wait_for(|stop| *stop).await.is_err() {
            // Nobody can ask for a stop any more.
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(shutdown);
    let mut delay = FIRST_RETRY;
    let mut failures = 0u32;
    loop {
        let connected = tokio::select! {
            connected = open_stream(aggregator) => connected,
            () = &mut shutdown => return,
        };
        let stream = match connected {
            Ok(stream) => stream,
            Err(err) => {
                failures += 1;
                if failures == 1 {
                    warn!(%aggregator, "cannot reach the aggregator: {err:#}; retrying");
                } else {
                    debug!(%aggregator, failures, "still cannot reach the aggregator: {err:#}");
                }
                tokio::select! {
                    () = tokio::time::sleep(jittered(delay)) => {}
                    () = &mut shutdown => return,
                }
                delay = (delay * 2).min(MAX_RETRY);
                continue;
            }
        };
        info!(%aggregator, "streaming to the aggregator");
        failures = 0;
        let opened = Instant::now();
        match stream.follow(domains, &mut shutdown).await {
            Ok(()) => return,
            Err(err) => warn!(%aggregator, "aggregator stream lost: {err:#}; reconnecting"),
        }
        // A stream that ends at once (an aggregator over its limits) must not turn
        // into a reconnect loop; one that lived a while starts over from short delays.
        if opened.elapsed() >= STABLE_STREAM {
            delay = FIRST_RETRY;
        } else {
            tokio::select! {
                () = tokio::time::sleep(jittered(delay)) => {}
                () = &mut shutdown => return,
            }
            delay = (delay * 2).min(MAX_RETRY);
        }
    }
}

fn jittered(delay: Duration) -> Duration {
    delay / 2 + delay.mul_f64(fastrand::f64() / 2.0)
}

async fn open_stream(aggregator: &AggregatorAddr) -> anyhow::Result<ReportStream> {
    let channel = connect(aggregator).await?;
    let (requests, request_stream) = mpsc::channel(16);
    let acks = HypervisorReporterClient::new(channel)
        .report(ReceiverStream::new(request_stream))
        .await
        .context("opening the report stream")?
        .into_inner();
    Ok(ReportStream::new(requests, acks))
}

async fn connect(aggregator: &AggregatorAddr) -> anyhow::Result<Channel> {
    let endpoint = |uri: String| -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(uri)?
            .connect_timeout(Duration::from_secs(2))
            // No HTTP/2 pings of its own: the aggregator pings every sidecar and drops a
            // silent one, and an aggregator that dies closes its sockets, which the sidecar
            // sees at once. Pings both ways doubled the aggregator's idle cost at 10,000
            // streams. TCP keepalive covers a connection the kernel lost track of.
            .tcp_keepalive(Some(Duration::from_secs(10))))
    };
    let channel = match aggregator {
        AggregatorAddr::Http(uri) => endpoint(uri.clone())?.connect().await,
        AggregatorAddr::Unix(path) => {
            let path = path.clone();
            // The authority is unused on a unix socket, but HTTP/2 needs one.
            endpoint("http://localhost".into())?
                .connect_with_connector(service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
        }
    };
    channel.with_context(|| format!("connecting to {aggregator}"))
}

/// One open report stream and what it has told the aggregator.
struct ReportStream {
    requests: mpsc::Sender<DomainReport>,
    acks: Streaming<ReportAck>,
    /// What the aggregator holds from this stream, by libvirt domain name.
    sent: BTreeMap<String, Domain>,
    sequence: u64,
    /// Reports awaiting their ack, by sequence: which domain and VMI each was about.
    in_flight: HashMap<u64, (String, DomainKey)>,
    /// Domains whose last report the aggregator refused for one of its limits.
    refused: BTreeSet<String>,
    /// When to send the refused reports again, and how long to wait after the next refusal.
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl ReportStream {
    fn new(requests: mpsc::Sender<DomainReport>, acks: Streaming<ReportAck>) -> Self {
        ReportStream {
            requests,
            acks,
            sent: BTreeMap::new(),
            sequence: 0,
            in_flight: HashMap::new(),
            refused: BTreeSet::new(),
            retry_at: None,
            retry_delay: FIRST_RETRY,
        }
    }

    /// Keeps the aggregator equal to `domains` until the stream fails (Err) or
    /// `shutdown` completes (Ok, after withdrawing everything).
    async fn follow(
        mut self,
        domains: &mut Sources,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> anyhow::Result<()> {
        self.send_changes(&domains.current()).await?;
        loop {
            let retry_at = self.retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                () = domains.changed() => self.send_changes(&domains.current()).await?,
                () = tokio::time::sleep_until(retry_at), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.send_changes(&domains.current()).await?;
                }
                ack = self.acks.message() => match ack.context("reading acks")? {
                    Some(ack) => self.on_ack(ack),
                    None => bail!("the aggregator closed the stream"),
                },
                () = &mut *shutdown => {
                    self.send_changes(&Domains::new()).await?;
                    return self.close().await;
                }
            }
        }
    }

    fn on_ack(&mut self, ack: ReportAck) {
        let Some((name, vmi)) = self.in_flight.remove(&ack.sequence) else {
            return;
        };
        match Code::from_i32(ack.code) {
            Code::Ok => {
                if self.refused.remove(&name) {
                    info!(domain = %name, "the aggregator accepted the report it refused before");
                }
                if self.refused.is_empty() {
                    self.retry_delay = FIRST_RETRY;
                }
            }
            // Over one of the aggregator's limits (rate, domains per stream): it still holds
            // whatever it held before, so send this domain's state again, later.
            Code::ResourceExhausted => {
                // A placeholder that matches no real report, so the next pass resends.
                let unknown = Domain {
                    namespace: vmi.namespace,
                    name: vmi.name,
                    ..Domain::default()
                };
                self.sent.insert(name.clone(), unknown);
                if self.refused.insert(name.clone()) {
                    warn!(domain = %name, reason = %ack.message, "the aggregator refused a report; retrying with backoff");
                }
                if self.retry_at.is_none() {
                    self.retry_at = Some(Instant::now() + jittered(self.retry_delay));
                    self.retry_delay = (self.retry_delay * 2).min(MAX_REFUSED_RETRY);
                }
            }
            // Invalid as sent: sending it again would not change the answer.
            code => {
                warn!(domain = %name, ?code, reason = %ack.message, "the aggregator rejected a report")
            }
        }
    }

    /// Sends what differs between `domains` and what this stream already sent.
    async fn send_changes(&mut self, domains: &Domains) -> anyhow::Result<()> {
        let gone: Vec<String> = self
            .sent
            .keys()
            .filter(|name| !domains.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(domain) = self.sent.remove(&name) {
                if !self.refused.contains(&name) {
                    info!(domain = %name, "withdrawing");
                }
                let vmi = DomainKey {
                    namespace: domain.namespace,
                    name: domain.name,
                };
                self.send(&name, vmi.clone(), Change::Withdraw(vmi)).await?;
            }
        }
        for (name, running) in domains {
            let domain = to_proto(name, running);
            if self.sent.get(name) != Some(&domain) {
                if !self.refused.contains(name) {
                    info!(
                        domain = %name,
                        hypervisor = domain.hypervisor_type().label(),
                        paused = running.paused,
                        "reporting"
                    );
                }
                let vmi = DomainKey {
                    namespace: domain.namespace.clone(),
                    name: domain.name.clone(),
                };
                self.sent.insert(name.clone(), domain.clone());
                self.send(name, vmi, Change::Upsert(domain)).await?;
            }
        }
        Ok(())
    }

    async fn send(
        &mut self,
        domain_name: &str,
        vmi: DomainKey,
        change: Change,
    ) -> anyhow::Result<()> {
        self.sequence += 1;
        self.in_flight
            .insert(self.sequence, (domain_name.to_string(), vmi));
        self.requests
            .send(DomainReport {
                sequence: self.sequence,
                change: Some(change),
            })
            .await
            .context("the report stream is closed")
    }

    /// Ends the stream and waits, briefly, for the aggregator to answer what is in flight.
    async fn close(mut self) -> anyhow::Result<()> {
        drop(self.requests);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while let Ok(Some(_)) = self.acks.message().await {}
        })
        .await;
        if drained.is_err() {
            warn!("the aggregator did not confirm the withdrawal in time; its stream timeout will");
        }
        Ok(())
    }
}

fn to_proto(domain_name: &str, running: &RunningDomain) -> Domain {
    Domain {
        namespace: running.vmi.namespace.clone(),
        name: running.vmi.name.clone(),
        uid: running.uid.clone().unwrap_or_default(),
        domain_name: domain_name.to_string(),
        hypervisor_type: running.hypervisor.into(),
        hypervisor_version: running.hypervisor_version.clone(),
        state: if running.paused {
            DomainState::Paused
        } else {
            DomainState::Running
        }
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmiName;
    use hypervisor_proto::v1::HypervisorType;

    fn domain(uid: Option<&str>, version: &str) -> RunningDomain {
        RunningDomain {
            vmi: VmiName {
                namespace: "default".into(),
                name: "vm-a".into(),
            },
            uid: uid.map(String::from),
            hypervisor: HypervisorType::Kvm,
            hypervisor_version: version.into(),
            paused: false,
        }
    }

    /// The hook's description of `default_vm-a`, as OnDefineDomain gives it.
    fn defined_domains() -> Domains {
        Domains::from([("default_vm-a".into(), domain(Some("vmi-uid"), ""))])
    }

    fn defined(in_libvirt: bool) -> Defined {
        Defined {
            domains: defined_domains(),
            in_libvirt,
        }
    }

    #[test]
    fn a_defined_domain_is_not_reported_while_libvirt_has_not_answered() {
        let (_libvirt, libvirt_rx) = watch::channel(LibvirtView::Pending);
        let (_hook, hook_rx) = watch::channel(defined(true));
        let mut sources = Sources::new(libvirt_rx, hook_rx);
        assert_eq!(sources.current(), Domains::new());
    }

    #[test]
    fn libvirt_out_of_reach_falls_back_to_the_hook_once_libvirt_holds_the_domain() {
        let (_libvirt, libvirt_rx) =
            watch::channel(LibvirtView::Unreachable("no such file".into()));
        let (hook, hook_rx) = watch::channel(defined(false));
        let mut sources = Sources::new(libvirt_rx, hook_rx);
        assert_eq!(sources.current(), Domains::new());
        hook.send_replace(defined(true));
        assert_eq!(sources.current(), defined_domains());
    }

    #[test]
    fn live_domains_carry_their_vmi_uid_from_the_hook() {
        let live = Domains::from([
            ("default_vm-a".into(), domain(None, "7.2.22")),
            ("default_vm-b".into(), domain(None, "7.2.22")),
        ]);
        let (libvirt, libvirt_rx) = watch::channel(LibvirtView::Synced(live));
        let (_hook, hook_rx) = watch::channel(defined(false));
        let mut sources = Sources::new(libvirt_rx, hook_rx);
        let current = sources.current();
        assert_eq!(current["default_vm-a"], domain(Some("vmi-uid"), "7.2.22"));
        // No hook call for it (a sidecar restarted mid-run): no uid, still reported.
        assert_eq!(current["default_vm-b"], domain(None, "7.2.22"));

        // The VMI is the authority on its uid.
        libvirt.send_replace(LibvirtView::Synced(Domains::from([(
            "default_vm-a".into(),
            domain(Some("other-uid"), "7.2.22"),
        )])));
        assert_eq!(
            sources.current()["default_vm-a"].uid.as_deref(),
            Some("vmi-uid")
        );

        // Defined but not running: libvirt's word wins, the hook adds no domain.
        libvirt.send_replace(LibvirtView::Synced(Domains::new()));
        assert_eq!(sources.current(), Domains::new());
    }

    #[test]
    fn aggregator_addresses() {
        assert_eq!(
            "http://127.0.0.1:9440".parse::<AggregatorAddr>().unwrap(),
            AggregatorAddr::Http("http://127.0.0.1:9440".into())
        );
        assert_eq!(
            "unix:///run/agg.sock".parse::<AggregatorAddr>().unwrap(),
            AggregatorAddr::Unix("/run/agg.sock".into())
        );
        for bad in ["127.0.0.1:9440", "unix://relative.sock", "https//x", ""] {
            assert!(bad.parse::<AggregatorAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }
}
