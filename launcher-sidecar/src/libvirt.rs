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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{CStr, c_int, c_void};
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use hypervisor_proto::v1::HypervisorType;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};
use virt::connect::Connect;
use virt::domain::{Domain, DomainPausedReason, DomainState};
use virt::error::ErrorNumber;
use virt::sys;

use crate::classify::{VmiName, classify_domain_xml};

/// KubeVirt's non-root virt-launcher socket, then the system daemon of root VMIs.
pub const DEFAULT_URIS: [&str; 2] = [
    "qemu+unix:///session?socket=/var/run/libvirt/virtqemud-sock",
    "qemu:///system",
];

/// A domain that runs and is to be reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningDomain {
    pub vmi: VmiName,
    pub uid: Option<String>,
    pub hypervisor: HypervisorType,
    pub hypervisor_version: String,
    pub paused: bool,
}

/// The domains to report, by libvirt domain name.
pub type Domains = BTreeMap<String, RunningDomain>;

/// What libvirt has told the sidecar so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LibvirtView {
    /// No sync yet: still connecting, or connected and waiting for the daemon's first
    /// answers (a new daemon probes QEMU for seconds before it answers some calls).
    #[default]
    Pending,
    /// No sync yet, and the connection attempt asked for by [`ConnectNow`] failed, so
    /// libvirt is out of this container's reach; says why.
    Unreachable(String),
    /// What runs as of the last sync, kept across reconnects: the VMs run on without
    /// the daemon.
    Synced(Domains),
}

/// Asks the watcher to try connecting at once rather than at its next backoff step.
#[derive(Clone)]
pub struct ConnectNow(SyncSender<()>);

impl ConnectNow {
    /// The handle, and the requests for [`Watcher::connect_requests`].
    pub fn channel() -> (Self, Receiver<()>) {
        let (sender, requests) = mpsc::sync_channel(1);
        (ConnectNow(sender), requests)
    }

    /// Never blocks: one pending request is as good as many.
    pub fn request(&self) {
        let _ = self.0.try_send(());
    }
}

pub struct Watcher {
    /// Tried in order at every connection attempt.
    pub uris: Vec<String>,
    /// Report only this domain.
    pub only_domain: Option<String>,
    pub resync: Duration,
    /// From [`ConnectNow`]: the caller knows the daemon is up now. If the attempt that
    /// follows fails, the view turns [`LibvirtView::Unreachable`].
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

/// Domain names whose state changed, and whether the connection closed, as the
/// event callbacks saw them.
#[derive(Default)]
struct Pending {
    changed: BTreeSet<String>,
    /// Had a `Defined` event: what was known of their XML is out of date, also for a
    /// `Resumed` event that arrived with it.
    redefined: BTreeSet<String>,
    /// Had a `Resumed` event: their CPUs run now.
    resumed: BTreeSet<String>,
    closed: Option<&'static str>,
}

type SharedPending = Arc<Mutex<Pending>>;

/// Follows one connection until it closes; returns why it closed.
fn follow(conn: &Connect, tracker: &mut Tracker, resync: Duration) -> anyhow::Result<String> {
    let pending = SharedPending::default();
    let callbacks = Callbacks::register(conn, &pending)?;
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
        } = std::mem::take(&mut *lock(&pending));
        if let Some(reason) = closed {
            drop(callbacks);
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

    /// Reports a domain that had a `Resumed` event from its last description, if any.
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
        let paused = match state.unwrap_or(DomainState::NoState) {
            DomainState::Running | DomainState::Blocked | DomainState::Shutdown => false,
            DomainState::Paused | DomainState::PMSuspended => true,
            DomainState::Shutoff | DomainState::Crashed | DomainState::NoState => return None,
        };
        if paused && !reported && !(self.first_sync && has_run(reason)) {
            // A migration target or a domain started paused: not running here yet.
            return None;
        }
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

/// Whether a paused domain found at start has run before, judging by why it is paused.
fn has_run(reason: virt::domain::DomainStateReasonEnum) -> bool {
    use virt::domain::DomainStateReason;
    match reason {
        virt::enumutil::Enum::Known(DomainStateReason::Paused(paused)) => !matches!(
            paused,
            virt::enumutil::Enum::Known(
                DomainPausedReason::Migration | DomainPausedReason::StartingUp
            )
        ),
        // Suspended by the guest itself.
        virt::enumutil::Enum::Known(DomainStateReason::PMSuspended(_)) => true,
        _ => false,
    }
}

/// The lifecycle and close callbacks of one connection; deregistered on drop.
struct Callbacks<'a> {
    conn: &'a Connect,
    lifecycle: c_int,
}

impl<'a> Callbacks<'a> {
    fn register(conn: &'a Connect, pending: &SharedPending) -> anyhow::Result<Self> {
        // SAFETY: each registration hands libvirt one strong reference of `pending`,
        // which `release` gives back when libvirt drops the callback.
        let lifecycle = unsafe {
            let callback: unsafe extern "C" fn(
                sys::virConnectPtr,
                sys::virDomainPtr,
                c_int,
                c_int,
                *mut c_void,
            ) -> c_int = on_lifecycle;
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                // libvirt's VIR_DOMAIN_EVENT_CALLBACK cast: the real signature depends on the event id.
                Some(std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        c_int,
                        c_int,
                        *mut c_void,
                    ) -> c_int,
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(callback)),
                Arc::into_raw(Arc::clone(pending)) as *mut c_void,
                Some(release),
            )
        };
        anyhow::ensure!(
            lifecycle >= 0,
            "registering for domain lifecycle events: {}",
            virt::error::Error::last_error().message()
        );
        let closed = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                Arc::into_raw(Arc::clone(pending)) as *mut c_void,
                Some(release),
            )
        };
        if closed < 0 {
            warn!("cannot watch for the libvirt connection closing; relying on resyncs");
        }
        Ok(Callbacks { conn, lifecycle })
    }
}

impl Drop for Callbacks<'_> {
    fn drop(&mut self) {
        // SAFETY: the id came from a successful registration on this connection.
        unsafe {
            sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.lifecycle);
            sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close));
        }
    }
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes back the `pending` registered with this callback, and the
    // name pointer it returns lives as long as `domain`, which outlives this call.
    let (pending, name) = unsafe {
        let name = sys::virDomainGetName(domain);
        (&*(opaque as *const Mutex<Pending>), name)
    };
    if !name.is_null() {
        // The state is read again when the event is handled, so the event itself
        // only says which domain to look at (and, for a resume, what to report meanwhile).
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let mut pending = lock(pending);
        match u32::try_from(event) {
            Ok(sys::VIR_DOMAIN_EVENT_DEFINED) => pending.redefined.insert(name.clone()),
            Ok(sys::VIR_DOMAIN_EVENT_RESUMED) => pending.resumed.insert(name.clone()),
            _ => false,
        };
        pending.changed.insert(name);
    }
    0
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: as in on_lifecycle.
    let pending = unsafe { &*(opaque as *const Mutex<Pending>) };
    lock(pending).closed = Some(match reason as u32 {
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "the daemon closed the connection",
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "the daemon stopped answering keepalives",
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by the client",
        _ => "connection error",
    });
}

unsafe extern "C" fn release(opaque: *mut c_void) {
    // SAFETY: `opaque` is one strong reference made by Arc::into_raw in register.
    drop(unsafe { Arc::from_raw(opaque as *const Mutex<Pending>) });
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
