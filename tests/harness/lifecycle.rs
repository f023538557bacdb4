//! A subscription of the test's own to libvirt's domain lifecycle events: the bench starts
//! its detection clock there, where the sidecar's work starts (when the daemon's event reaches
//! a client), and the replay tells from it when a domain really ran.
//!
//! The daemon sends each event to every subscribed connection as it happens, the sidecar's
//! and this one alike, so the instant this connection receives it is the instant the
//! sidecar could first know. It is taken in the callback with the monotonic clock the rest
//! of the bench uses, at nanosecond resolution; `virsh event --timestamp` would give wall
//! clock milliseconds only.

use std::ffi::{CStr, c_int, c_void};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use virt::connect::Connect;
use virt::sys;

/// What `virsh start` makes libvirt emit: `Resumed` when QEMU's CPUs start running, then
/// `Started` once the start job ends (1–4 ms later here). A client can know from the first.
pub const START: &[c_int] = &[
    sys::VIR_DOMAIN_EVENT_RESUMED as c_int,
    sys::VIR_DOMAIN_EVENT_STARTED as c_int,
];
/// The end of libvirt's start job: until then the domain's job lock holds back other calls
/// on it, the sidecar's reads of state and XML included.
pub const STARTED: c_int = sys::VIR_DOMAIN_EVENT_STARTED as c_int;
/// What `virsh destroy` makes libvirt emit.
pub const STOP: &[c_int] = &[sys::VIR_DOMAIN_EVENT_STOPPED as c_int];
/// A domain's CPUs run: a start (not `--paused`), or a resume.
pub const RESUMED: c_int = sys::VIR_DOMAIN_EVENT_RESUMED as c_int;
/// A domain's CPUs stop: `virsh suspend`, or a start with `--paused`.
pub const SUSPENDED: c_int = sys::VIR_DOMAIN_EVENT_SUSPENDED as c_int;
/// A domain is defined or redefined.
pub const DEFINED: c_int = sys::VIR_DOMAIN_EVENT_DEFINED as c_int;

/// One lifecycle event as it reached the bench.
#[derive(Clone, Debug)]
pub struct Event {
    pub domain: String,
    pub kind: c_int,
    /// The event's detail (`VIR_DOMAIN_EVENT_*_*` of its kind).
    pub detail: c_int,
    pub at: Instant,
    /// The same moment by the wall clock, to compare with the sidecar's log timestamps.
    pub wall: SystemTime,
}

#[derive(Default)]
struct Shared {
    events: Mutex<Vec<Event>>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lifecycle events of one daemon, collected on a thread that runs libvirt's event loop.
pub struct Lifecycle {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Lifecycle {
    pub fn subscribe(uri: &str) -> Result<Self> {
        // libvirt allows one event loop implementation per process, registered before any
        // connection is opened.
        static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
        LOOP.get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| e.message().to_string())
        })
        .clone()
        .map_err(|e| anyhow!("registering libvirt's default event loop: {e}"))?;

        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn({
                let uri = uri.to_string();
                let shared = Arc::clone(&shared);
                let stop = Arc::clone(&stop);
                move || run(&uri, shared, &stop, ready_tx)
            })
            .context("starting the libvirt event thread")?;
        let lifecycle = Lifecycle {
            shared,
            stop,
            thread: Some(thread),
        };
        // A new daemon answers its first connection only after probing QEMU.
        ready_rx
            .recv_timeout(crate::libvirt::START_TIMEOUT)
            .context("the libvirt event thread did not report back")?
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("subscribing to lifecycle events on {uri}"))?;
        Ok(lifecycle)
    }

    /// Every event so far, in the order they arrived.
    pub fn events(&self) -> Vec<Event> {
        self.shared.lock().clone()
    }

    /// The first event of `domain` of one of `kinds` that arrived at or after `since`.
    pub fn wait_for(
        &self,
        domain: &str,
        kinds: &[c_int],
        since: Instant,
        timeout: Duration,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut events = self.shared.lock();
        loop {
            if let Some(event) = events
                .iter()
                .find(|e| e.domain == domain && kinds.contains(&e.kind) && e.at >= since)
            {
                return Ok(event.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no lifecycle event {kinds:?} for {domain} within {timeout:?}");
            }
            events = self
                .shared
                .arrived
                .wait_timeout(events, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Lifecycle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    uri: &str,
    shared: Arc<Shared>,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let conn = match Connect::open_read_only(Some(uri)) {
        Ok(conn) => conn,
        Err(err) => {
            let _ = ready.send(Err(err.message().to_string()));
            return;
        }
    };
    // SAFETY: libvirt gets one strong reference of `shared` and gives it back through
    // `release` when the callback is deregistered. The callback's real signature is the
    // lifecycle one; libvirt's API takes it cast to the generic type (VIR_DOMAIN_EVENT_CALLBACK).
    let id = unsafe {
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
            Arc::into_raw(Arc::clone(&shared)) as *mut c_void,
            Some(release),
        )
    };
    if id < 0 {
        let _ = ready.send(Err(virt::error::Error::last_error().message().to_string()));
        return;
    }
    // Wakes the loop now and then, so that it notices `stop` without any event.
    let timer = virt::event::event_add_timeout(50, |_, _| {}, std::ptr::null_mut()).ok();
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Acquire) {
        if virt::event::event_run_default_impl().is_err() {
            break;
        }
    }
    // SAFETY: `id` came from a successful registration on this connection.
    unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
    if let Some(timer) = timer {
        let _ = timer.event_remove_timeout();
    }
    // The bindings panic when closing a connection the daemon already dropped.
    let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(conn)));
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // First thing: the clocks.
    let at = Instant::now();
    let wall = SystemTime::now();
    // SAFETY: libvirt passes back the `Shared` registered with this callback; the name
    // pointer lives as long as `domain`, which outlives this call.
    let (shared, name) = unsafe { (&*(opaque as *const Shared), sys::virDomainGetName(domain)) };
    if name.is_null() {
        return 0;
    }
    // SAFETY: a NUL-terminated string owned by `domain`.
    let domain = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    shared.lock().push(Event {
        domain,
        kind: event,
        detail,
        at,
        wall,
    });
    shared.arrived.notify_all();
    0
}

unsafe extern "C" fn release(opaque: *mut c_void) {
    // SAFETY: `opaque` is the strong reference made by Arc::into_raw at registration.
    drop(unsafe { Arc::from_raw(opaque as *const Shared) });
}
