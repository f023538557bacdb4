//! A subscription of the test's own to libvirt's domain lifecycle events: the bench starts
//! its detection clock there, where the sidecar's work starts (when the daemon's event reaches
//! a client), and the replay tells from it when a domain really ran.
//!
//! The daemon sends each event to every subscribed connection as it happens, the sidecar's
//! and this one alike, so the instant this connection receives it is the instant the
//! sidecar could first know. It is taken in the callback with the monotonic clock the rest
//! of the bench uses, at nanosecond resolution; `virsh event --timestamp` would give wall
//! clock milliseconds only. The callback is the sidecar's own, from
//! `launcher_sidecar::libvirt::events`, behind its safe API.

use std::ffi::c_int;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
/// One lifecycle event as it reached the test, timed first thing in the callback.
pub use launcher_sidecar::libvirt::events::Event;
use launcher_sidecar::libvirt::events::{EventLog, Recording};
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
/// A domain is defined or redefined.
pub const DEFINED: c_int = sys::VIR_DOMAIN_EVENT_DEFINED as c_int;

/// Lifecycle events of one daemon, collected on a thread that runs libvirt's event loop.
pub struct Lifecycle {
    log: Arc<EventLog>,
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

        let log = Arc::new(EventLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn({
                let uri = uri.to_string();
                let log = Arc::clone(&log);
                let stop = Arc::clone(&stop);
                move || run(&uri, &log, &stop, ready_tx)
            })
            .context("starting the libvirt event thread")?;
        let lifecycle = Lifecycle {
            log,
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
        self.log.events()
    }

    /// The first event of `domain` of one of `kinds` that arrived at or after `since`.
    pub fn wait_for(
        &self,
        domain: &str,
        kinds: &[c_int],
        since: Instant,
        timeout: Duration,
    ) -> Result<Event> {
        self.log
            .wait_for(timeout, |e| {
                e.domain == domain && kinds.contains(&e.kind) && e.at >= since
            })
            .ok_or_else(|| anyhow!("no lifecycle event {kinds:?} for {domain} within {timeout:?}"))
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
    log: &Arc<EventLog>,
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
    let recording = match Recording::register(&conn, log) {
        Ok(recording) => recording,
        Err(err) => {
            let _ = ready.send(Err(err.message().to_string()));
            return;
        }
    };
    // Wakes the loop now and then, so that it notices `stop` without any event.
    let timer = virt::event::event_add_timeout(50, |_, _| {}, std::ptr::null_mut()).ok();
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Acquire) {
        if virt::event::event_run_default_impl().is_err() {
            break;
        }
    }
    drop(recording);
    if let Some(timer) = timer {
        let _ = timer.event_remove_timeout();
    }
    // The bindings panic when closing a connection the daemon already dropped.
    let _ = panic::catch_unwind(AssertUnwindSafe(|| drop(conn)));
}
