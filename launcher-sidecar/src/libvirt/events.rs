//! libvirt's domain lifecycle and connection close callbacks, behind a safe API. The
//! `virt` crate binds neither, so they are registered through `virt::sys`; every `unsafe`
//! block of the crate is in this file.
//!
//! Two subscriptions: the watcher's ([`Noting`]), whose callbacks only note which domain
//! to look at, since the watcher reads the state again anyway and libvirt's event loop
//! should not wait; and the tests' own ([`Recording`]), which records every event with the
//! instant it arrived, the first thing it does, to time the sidecar from the event.

use std::collections::BTreeSet;
use std::ffi::{CStr, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;
use virt::connect::Connect;
use virt::error::Error;
use virt::sys;

/// Domain names whose state changed, and whether the connection closed, as the
/// watcher's callbacks saw them.
#[derive(Default)]
pub struct Pending {
    pub changed: BTreeSet<String>,
    /// Had a `Defined` event: what was known of their XML is out of date, also for a
    /// `Resumed` event that arrived with it.
    pub redefined: BTreeSet<String>,
    /// Had a `Resumed` event: their CPUs run now.
    pub resumed: BTreeSet<String>,
    pub closed: Option<&'static str>,
}

/// The watcher's lifecycle and close callbacks on one connection; deregistered on drop.
pub struct Noting<'a> {
    lifecycle: Lifecycle<'a>,
    close_registered: bool,
    pending: Arc<Mutex<Pending>>,
}

impl<'a> Noting<'a> {
    /// Fails when no lifecycle events can be had; without the close callback the
    /// watcher still resyncs, so that one is only logged.
    pub fn register(conn: &'a Connect) -> Result<Self, Error> {
        let pending = Arc::<Mutex<Pending>>::default();
        // SAFETY: on_lifecycle_noting reads its opaque pointer as a `Mutex<Pending>`.
        let lifecycle = unsafe { Lifecycle::register(conn, on_lifecycle_noting, &pending) }?;
        // SAFETY: `conn` outlives the registration, borrowed for 'a. libvirt gets one
        // strong reference of `pending`, read by on_close as a `Mutex<Pending>` and given
        // back through `release` when libvirt drops the callback.
        let closed = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                Arc::into_raw(Arc::clone(&pending)) as *mut c_void,
                Some(release::<Mutex<Pending>>),
            )
        };
        if closed < 0 {
            warn!("cannot watch for the libvirt connection closing; relying on resyncs");
        }
        Ok(Noting {
            lifecycle,
            close_registered: closed >= 0,
            pending,
        })
    }

    /// What the callbacks noted since the last call.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *lock(&self.pending))
    }
}

impl Drop for Noting<'_> {
    fn drop(&mut self) {
        if self.close_registered {
            // SAFETY: on_close was registered on this connection, borrowed for 'a.
            unsafe {
                sys::virConnectUnregisterCloseCallback(self.lifecycle.conn.as_ptr(), Some(on_close))
            };
        }
    }
}

/// One lifecycle event as it reached a client.
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

/// Every event a [`Recording`] received, in the order they arrived.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<Vec<Event>>,
    arrived: Condvar,
}

impl EventLog {
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// The first event that `matches`, waiting up to `timeout` for it to arrive.
    pub fn wait_for(&self, timeout: Duration, matches: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut events = self.lock();
        loop {
            if let Some(event) = events.iter().find(|e| matches(e)) {
                return Some(event.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            events = self
                .arrived
                .wait_timeout(events, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A lifecycle callback that records every event of one connection into an
/// [`EventLog`]; deregistered on drop.
pub struct Recording<'a> {
    _lifecycle: Lifecycle<'a>,
}

impl<'a> Recording<'a> {
    pub fn register(conn: &'a Connect, log: &Arc<EventLog>) -> Result<Self, Error> {
        // SAFETY: on_lifecycle_recording reads its opaque pointer as an `EventLog`.
        let lifecycle = unsafe { Lifecycle::register(conn, on_lifecycle_recording, log) }?;
        Ok(Recording {
            _lifecycle: lifecycle,
        })
    }
}

/// A lifecycle callback's real signature; libvirt's API takes it cast to its generic
/// callback type (C's `VIR_DOMAIN_EVENT_CALLBACK`), whatever the event id.
type LifecycleCallback =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;

/// One lifecycle callback registration; deregistered on drop.
struct Lifecycle<'a> {
    conn: &'a Connect,
    id: c_int,
}

impl<'a> Lifecycle<'a> {
    /// Registers `callback` for every domain of `conn`, with one strong reference of
    /// `state` as its opaque pointer, given back through `release` when libvirt drops it.
    ///
    /// # Safety
    ///
    /// `callback` must read its opaque pointer as a `*const T`.
    unsafe fn register<T>(
        conn: &'a Connect,
        callback: LifecycleCallback,
        state: &Arc<T>,
    ) -> Result<Self, Error> {
        // SAFETY: `conn` outlives the registration, borrowed for 'a; `callback` has the
        // signature libvirt calls for VIR_DOMAIN_EVENT_ID_LIFECYCLE, and the caller
        // vouches that it reads its opaque pointer as the `T` handed over here.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
                Some(std::mem::transmute::<
                    LifecycleCallback,
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(callback)),
                Arc::into_raw(Arc::clone(state)) as *mut c_void,
                Some(release::<T>),
            )
        };
        if id < 0 {
            return Err(Error::last_error());
        }
        Ok(Lifecycle { conn, id })
    }
}

impl Drop for Lifecycle<'_> {
    fn drop(&mut self) {
        // SAFETY: the id came from a successful registration on this connection,
        // borrowed for 'a.
        unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id) };
    }
}

unsafe extern "C" fn on_lifecycle_noting(
    _conn: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes back the `Mutex<Pending>` registered with this callback
    // (Noting::register), alive until `release`; the name pointer lives as long as
    // `domain`, which outlives this call.
    let (pending, name) = unsafe {
        let name = sys::virDomainGetName(domain);
        (&*(opaque as *const Mutex<Pending>), name)
    };
    if !name.is_null() {
        // The state is read again when the event is handled, so the event itself
        // only says which domain to look at (and, for a resume, what to report meanwhile).
        // SAFETY: a NUL-terminated string owned by `domain`.
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
    // SAFETY: libvirt passes back the `Mutex<Pending>` registered with this callback
    // (Noting::register), alive until `release`.
    let pending = unsafe { &*(opaque as *const Mutex<Pending>) };
    lock(pending).closed = Some(match reason as u32 {
        sys::VIR_CONNECT_CLOSE_REASON_EOF => "the daemon closed the connection",
        sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE => "the daemon stopped answering keepalives",
        sys::VIR_CONNECT_CLOSE_REASON_CLIENT => "closed by the client",
        _ => "connection error",
    });
}

unsafe extern "C" fn on_lifecycle_recording(
    _conn: sys::virConnectPtr,
    domain: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // First thing: the clocks.
    let at = Instant::now();
    let wall = SystemTime::now();
    // SAFETY: libvirt passes back the `EventLog` registered with this callback
    // (Recording::register), alive until `release`; the name pointer lives as long as
    // `domain`, which outlives this call.
    let (log, name) = unsafe { (&*(opaque as *const EventLog), sys::virDomainGetName(domain)) };
    if name.is_null() {
        return 0;
    }
    // SAFETY: a NUL-terminated string owned by `domain`.
    let domain = unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned();
    log.lock().push(Event {
        domain,
        kind: event,
        detail,
        at,
        wall,
    });
    log.arrived.notify_all();
    0
}

/// libvirt's free callback for an opaque pointer made from an `Arc<T>`.
unsafe extern "C" fn release<T>(opaque: *mut c_void) {
    // SAFETY: `opaque` is one strong reference made by Arc::into_raw at registration,
    // of the `T` that this instance of `release` was registered with.
    drop(unsafe { Arc::from_raw(opaque as *const T) });
}

fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    pending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
