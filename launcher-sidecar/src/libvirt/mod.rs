//! Follows the domains of the local libvirt daemon on a thread of its own.
//!
//! Lifecycle events drive it; a full resync after every (re)connect and every
//! [`Watcher::resync`] is the safety net. An event only says which domain to look
//! at, with one exception for speed: a domain that resumes is reported at once from
//! what its XML said before (a domain's type does not change when it starts),
//! because reading it now would wait for libvirt's start job to end; the live state
//! and XML read right after confirm or correct that. The result is one value, a
//! [`LibvirtView`], published on a `watch` channel that the report side reads.
//! Losing the daemon changes nothing in the set of domains: the VM runs on without it,
//! and the next sync after reconnecting corrects whatever changed meanwhile.
//!
//! Whether a domain is reported, held or withdrawn is one pure function, `decision::decide`;
//! libvirt's C callbacks sit behind the safe API of [`events`].

mod decision;
pub mod events;

use std::collections::{HashMap, HashSet};
use std::ffi::c_int;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use crate::classify::classify_domain_xml;
use crate::domain::{Domains, RunningDomain, VmiName};
use decision::{Decision, decide};
use events::{Noting, Pending};

/// KubeVirt's non-root virt-launcher socket, then the system daemon of root VMIs.
pub const DEFAULT_URIS: [&str; 2] = [
    "qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock",
    "qemu:///system",
];

/// What libvirt has told the sidecar so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LibvirtView {
    /// No sync yet: still connecting, or connected and waiting for the daemon's first
    /// answers (a new daemon probes QEMU for seconds before it answers some calls).
    #[default]
    Pending,
    /// No sync yet, and the connection attempt asked for by
    /// [`ConnectNow`](crate::domain::ConnectNow) failed, so libvirt is out of this
    /// container's reach; says why.
    Unreachable(String),
    /// What runs as of the last sync, kept across reconnects: the VMs run on without
    /// the daemon.
    Synced(Domains),
}

pub struct Watcher {
    /// Tried in order at every connection attempt.
    pub uris: Vec<String>,
    /// Report only this domain.
    pub only_domain: Option<String>,
    pub resync: Duration,
    /// From [`ConnectNow`](crate::domain::ConnectNow): the caller knows the daemon is up
    /// now. If the attempt that follows fails, the view turns [`LibvirtView::Unreachable`].
    pub connect_requests: Receiver<()>,
}

/// How long to wait between connection attempts: short at first, because
/// virt-launcher starts the daemon only after the sidecar is up.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(2);

impl Watcher {
    /// Starts the watcher thread. It runs until the process exits.
    pub fn spawn(self, domains: watch::Sender<LibvirtView>) -> anyhow::Result<()> {
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl()
            .context("registering libvirt's default event loop")?;
        thread::Builder::new()
            .name("libvirt".into())
            .spawn(move || self.run(domains))
            .context("starting the libvirt thread")?;
        Ok(())
    }

    fn run(self, domains: watch::Sender<LibvirtView>) {
        // Wakes the event loop for the periodic resync when nothing else happens.
        let resync_ms = c_int::try_from(self.resync.as_millis()).unwrap_or(c_int::MAX);
        if let Err(err) = virt::event::event_add_timeout(resync_ms, |_, _| {}, std::ptr::null_mut())
        {
            warn!(%err, "cannot add the resync timer; resyncing only on events");
        }
        let mut tracker = Tracker {
            domains,
            only_domain: self.only_domain.clone(),
            first_sync: true,
            ignored: HashSet::new(),
            described: HashMap::new(),
        };
        loop {
            let (conn, uri) = self.connect(&tracker.domains);
            info!(%uri, "connected to libvirt");
            // A panic in one session (libvirt bindings included) must not end the watching.
            let session = panic::catch_unwind(AssertUnwindSafe(|| {
                follow(&conn, &mut tracker, self.resync)
            }));
            match session {
                Ok(Ok(reason)) => {
                    warn!(%uri, %reason, "libvirt connection lost; reconnecting, reports kept")
                }
                Ok(Err(err)) => {
                    warn!(%uri, "libvirt connection failed: {err:#}; reconnecting, reports kept")
                }
                Err(_) => error!(%uri, "libvirt session panicked; reconnecting, reports kept"),
            }
            // Closing a dead connection can fail; the bindings panic on that.
            let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(conn)));
        }
    }

    fn connect(&self, view: &watch::Sender<LibvirtView>) -> (Connect, String) {
        let mut delay = FIRST_RETRY;
        let mut logged = false;
        let mut requested = false;
        loop {
            let mut failures = Vec::new();
            for uri in &self.uris {
                // Read-only: the sidecar never changes a domain.
                match Connect::open_read_only(Some(uri)) {
                    Ok(conn) => {
                        // Whatever was asked for meanwhile is answered by this connection.
                        while self.connect_requests.try_recv().is_ok() {}
                        return (conn, uri.clone());
                    }
                    Err(err) => failures.push(format!("{uri}: {}", err.message())),
                }
            }
            let failures = failures.join("; ");
            if requested {
                // Only before the first sync: once synced, the domains stay as they were.
                view.send_if_modified(|view| match view {
                    LibvirtView::Pending => {
                        *view = LibvirtView::Unreachable(failures.clone());
                        true
                    }
                    _ => false,
                });
            }
            if !logged {
                info!(attempts = %failures, "waiting for libvirt");
                logged = true;
            } else {
                debug!(attempts = %failures, "libvirt still not reachable");
            }
            requested = match self.connect_requests.recv_timeout(delay) {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                // Nobody can ask any more (no hook server).
                Err(RecvTimeoutError::Disconnected) => {
                    thread::sleep(delay);
                    false
                }
            };
            if !requested {
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Follows one connection until it closes; returns why it closed.
fn follow(conn: &Connect, tracker: &mut Tracker, resync: Duration) -> anyhow::Result<String> {
    let events = Noting::register(conn)
        .map_err(|err| anyhow!("registering for domain lifecycle events: {}", err.message()))?;
    if let Err(err) = conn.set_keep_alive(5, 3) {
        warn!(err = %err.message(), "libvirt keepalive not enabled; a hung daemon goes unnoticed");
    }
    let version = conn.hyp_version().map(format_version).unwrap_or_default();

    // Whatever was redefined while no connection was open went unseen.
    tracker.described.clear();
    tracker.sync_all(conn, &version)?;
    let mut last_sync = Instant::now();
    loop {
        virt::event::event_run_default_impl().context("running libvirt's event loop")?;
        let Pending {
            changed,
            redefined,
            resumed,
            closed,
        } = events.take();
        if let Some(reason) = closed {
            drop(events);
            return Ok(reason.to_string());
        }
        for name in &redefined {
            tracker.described.remove(name);
        }
        for name in &resumed {
            tracker.report_resumed(name);
        }
        for name in changed {
            tracker.sync_one(conn, &name, &version);
        }
        if last_sync.elapsed() >= resync {
            tracker.sync_all(conn, &version)?;
            last_sync = Instant::now();
        }
    }
}

/// libvirt packs the version as major * 1,000,000 + minor * 1,000 + release.
fn format_version(packed: u32) -> String {
    format!(
        "{}.{}.{}",
        packed / 1_000_000,
        packed / 1_000 % 1_000,
        packed % 1_000
    )
}

/// Decides, domain by domain, what to report, and publishes it.
struct Tracker {
    domains: watch::Sender<LibvirtView>,
    only_domain: Option<String>,
    /// The first sync after start cannot know whether a paused domain ever ran.
    first_sync: bool,
    /// Domain names that are not KubeVirt's, logged once each.
    ignored: HashSet<String>,
    /// What each tracked domain's XML said when last read, live or as defined: enough
    /// to report a start without waiting for libvirt calls that queue behind it.
    described: HashMap<String, RunningDomain>,
}

impl Tracker {
    fn sync_all(&mut self, conn: &Connect, version: &str) -> anyhow::Result<()> {
        let active = conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .context("listing the active domains")?;
        // Defined domains too, so that one defined while this sidecar was not looking
        // is reported the moment it resumes.
        let inactive = conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)
            .context("listing the defined domains")?;
        let reported = self.reported();
        let mut next = Domains::new();
        let mut present = HashSet::new();
        for domain in &active {
            let Ok(name) = domain.name() else {
                continue;
            };
            match self.observe(domain, &name, reported.contains_key(&name), version) {
                Some(running) => {
                    next.insert(name.clone(), running);
                }
                None => self.describe_defined(domain, &name, version),
            }
            present.insert(name);
        }
        for domain in &inactive {
            let Ok(name) = domain.name() else {
                continue;
            };
            self.describe_defined(domain, &name, version);
            present.insert(name);
        }
        self.described.retain(|name, _| present.contains(name));
        self.first_sync = false;
        self.domains.send_if_modified(|view| {
            let next = LibvirtView::Synced(next);
            let modified = *view != next;
            *view = next;
            modified
        });
        Ok(())
    }

    /// The domains as of the last sync; none before the first.
    fn reported(&self) -> Domains {
        match &*self.domains.borrow() {
            LibvirtView::Synced(domains) => domains.clone(),
            LibvirtView::Pending | LibvirtView::Unreachable(_) => Domains::new(),
        }
    }

    fn sync_one(&mut self, conn: &Connect, name: &str, version: &str) {
        let reported = matches!(&*self.domains.borrow(),
            LibvirtView::Synced(domains) if domains.contains_key(name));
        let domain = match conn.lookup_domain_by_name(name) {
            Ok(domain) => domain,
            Err(err) if err.code() == virt::enumutil::Enum::Known(ErrorNumber::NoDomain) => {
                self.described.remove(name);
                self.publish(name, None);
                return;
            }
            Err(err) => {
                // The next full sync settles it; a failed call says nothing about the domain.
                debug!(domain = name, err = %err.message(), "cannot look up domain after an event");
                return;
            }
        };
        let observed = self.observe(&domain, name, reported, version);
        let running = observed.is_some();
        self.publish(name, observed);
        // After publishing: a withdrawal waits for no further call.
        if !running {
            self.describe_defined(&domain, name, version);
        }
    }

    /// Reports a domain that had a `Resumed` event from its last description, if any:
    /// its CPUs run, and a running domain is always reported (see [`decide`]).
    fn report_resumed(&mut self, name: &str) {
        if let Some(described) = self.described.get(name) {
            let running = RunningDomain {
                paused: false,
                ..described.clone()
            };
            self.publish(name, Some(running));
        }
    }

    /// Reads the XML of a tracked domain that does not run, as defined, unless it is
    /// described already: a redefinition is a `Defined` event, which drops the description.
    fn describe_defined(&mut self, domain: &Domain, name: &str, version: &str) {
        if self.described.contains_key(name) {
            return;
        }
        let Some(vmi) = self.tracked(name) else {
            return;
        };
        match domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE) {
            Ok(xml) => {
                let described = describe(vmi, &xml, version, false);
                self.described.insert(name.to_string(), described);
            }
            // Only the shortcut is lost: its start is reported once the live XML is read.
            Err(err) => {
                debug!(domain = name, err = %err.message(), "cannot read the defined domain XML")
            }
        }
    }

    /// Changes one domain of the synced set (events are handled only after a sync).
    fn publish(&self, name: &str, observed: Option<RunningDomain>) {
        self.domains.send_if_modified(|view| {
            let LibvirtView::Synced(domains) = view else {
                return false;
            };
            match observed {
                Some(running) => domains.insert(name.to_string(), running.clone()) != Some(running),
                None => domains.remove(name).is_some(),
            }
        });
    }

    /// The VMI of a domain this sidecar reports, or None for any other domain.
    fn tracked(&mut self, name: &str) -> Option<VmiName> {
        if self.only_domain.as_deref().is_some_and(|only| only != name) {
            return None;
        }
        let vmi = VmiName::from_domain_name(name);
        if vmi.is_none() && self.ignored.insert(name.to_string()) {
            warn!(
                domain = name,
                "not a KubeVirt domain name (<namespace>_<name>); not reported"
            );
        }
        vmi
    }

    /// What to report for one domain, or None when it is not to be reported.
    fn observe(
        &mut self,
        domain: &Domain,
        name: &str,
        reported: bool,
        version: &str,
    ) -> Option<RunningDomain> {
        let vmi = self.tracked(name)?;
        let (state, reason) = domain.state().ok()?;
        let paused = match decide(state, reason, reported, self.first_sync) {
            Decision::Report { paused } => paused,
            // Held or withdrawn alike: not among the reported domains.
            Decision::Hold | Decision::Withdraw => return None,
        };
        let xml = match domain.xml_desc(0) {
            Ok(xml) => xml,
            Err(err) => {
                // Still reported: the VM runs, only its hypervisor is unknown.
                warn!(domain = name, err = %err.message(), "cannot read the live domain XML");
                String::new()
            }
        };
        let running = describe(vmi, &xml, version, paused);
        self.described.insert(name.to_string(), running.clone());
        Some(running)
    }
}

fn describe(vmi: VmiName, xml: &str, version: &str, paused: bool) -> RunningDomain {
    let classified = classify_domain_xml(xml);
    RunningDomain {
        vmi,
        uid: classified.uid,
        hypervisor: classified.hypervisor,
        hypervisor_version: version.to_string(),
        paused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_libvirt_prints_them() {
        assert_eq!(format_version(7_002_022), "7.2.22");
        assert_eq!(format_version(9_001_000), "9.1.0");
    }
}
