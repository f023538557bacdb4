//! The fault matrix on real parts: a private libvirt daemon with real QEMU (TCG) guests, one
//! real launcher-sidecar per guest (`--domain`, as one virt-launcher per VMI has one) and
//! the real node-aggregator. After every fault the aggregator's series must equal the truth:
//! `virsh list` (running and paused domains, `<ns>_<name>` → namespace and name), less the
//! guests whose sidecar is dead or frozen at that moment, and nothing else.
//!
//! The aggregator runs with `--keepalive-interval 1s --keepalive-timeout 1s`, so that a
//! frozen (half-open) sidecar is dropped within seconds. Every wait is bounded and
//! generous for a loaded 2-core machine; the times are printed, not asserted tightly.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, Sidecar};
use e2e::libvirt::{GuestKind, LibvirtDaemon};
use e2e::tools::wait_until;

const NODE: &str = "node-1";
const KEEPALIVE: [&str; 4] = ["--keepalive-interval", "1s", "--keepalive-timeout", "1s"];
/// How long the series may take to equal the truth after a step. The expected figures
/// are a few seconds (keepalive 2 s, sidecar reconnect backoff up to 3 s).
const SETTLE: Duration = Duration::from_secs(30);
/// The target for an aggregator restart; measured and printed, asserted only
/// against [`SETTLE`].
const RESTART_TARGET: Duration = Duration::from_secs(5);
/// Once equal, the series must stay equal for this many more consecutive scrapes.
const STABLE_SCRAPES: usize = 3;

/// Printed past the test harness's output capture, so `cargo test` shows the figures.
fn note(line: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "faults: {}", line.as_ref());
}

/// A namespace and a VMI name.
type Vmi = (String, String);

fn vmi_of(domain: &str) -> Result<Vmi> {
    let (namespace, name) = domain
        .split_once('_')
        .with_context(|| format!("{domain} is not a <namespace>_<name> domain"))?;
    Ok((namespace.to_string(), name.to_string()))
}

/// One node: the daemon, the aggregator, a sidecar per guest, and what the test did to them.
struct Node {
    daemon: LibvirtDaemon,
    aggregator: Aggregator,
    /// Every guest this node may run, running or not.
    guests: Vec<String>,
    /// The guests the test started and has not stopped (kept in step with `virsh list`,
    /// and used as the truth while the daemon is down).
    running: BTreeSet<String>,
    /// Sidecar per guest; absent while killed.
    sidecars: BTreeMap<String, Sidecar>,
    /// Sidecars frozen with SIGSTOP.
    frozen: BTreeSet<String>,
    libvirt_up: bool,
    aggregator_up: bool,
}

impl Node {
    /// Starts the daemon and the aggregator, then each guest with its sidecar.
    fn start(guests: &[&str]) -> Result<Node> {
        let daemon = LibvirtDaemon::start()?;
        let aggregator = Aggregator::start_with(NODE, &KEEPALIVE)?;
        let mut node = Node {
            daemon,
            aggregator,
            guests: guests.iter().map(|g| g.to_string()).collect(),
            running: BTreeSet::new(),
            sidecars: BTreeMap::new(),
            frozen: BTreeSet::new(),
            libvirt_up: true,
            aggregator_up: true,
        };
        for guest in guests {
            node.start_guest(guest)?;
            node.start_sidecar(guest)?;
        }
        Ok(node)
    }

    fn start_guest(&mut self, guest: &str) -> Result<()> {
        self.daemon.start_guest(guest, GuestKind::Tcg, false)?;
        self.running.insert(guest.to_string());
        Ok(())
    }

    fn destroy_guest(&mut self, guest: &str) -> Result<()> {
        self.daemon.destroy_guest(guest)?;
        self.running.remove(guest);
        Ok(())
    }

    /// SIGKILLs the guest's QEMU, as a crash would.
    fn crash_guest(&mut self, guest: &str) -> Result<()> {
        self.daemon.kill_guest_qemu(guest)?;
        self.running.remove(guest);
        Ok(())
    }

    fn start_sidecar(&mut self, guest: &str) -> Result<()> {
        let sidecar = Sidecar::start(
            &self.daemon.uri(),
            &self.aggregator.grpc_url(),
            &["--domain", guest],
        )?;
        self.sidecars.insert(guest.to_string(), sidecar);
        self.frozen.remove(guest);
        Ok(())
    }

    fn kill_sidecar(&mut self, guest: &str) -> Result<()> {
        let mut sidecar = self
            .sidecars
            .remove(guest)
            .with_context(|| format!("no sidecar for {guest}"))?;
        sidecar.kill();
        self.frozen.remove(guest);
        Ok(())
    }

    fn freeze_sidecar(&mut self, guest: &str) -> Result<()> {
        self.sidecars
            .get(guest)
            .with_context(|| format!("no sidecar for {guest}"))?
            .stop()?;
        self.frozen.insert(guest.to_string());
        Ok(())
    }

    fn thaw_sidecar(&mut self, guest: &str) -> Result<()> {
        self.sidecars
            .get(guest)
            .with_context(|| format!("no sidecar for {guest}"))?
            .cont()?;
        self.frozen.remove(guest);
        Ok(())
    }

    fn kill_aggregator(&mut self) {
        self.aggregator.kill();
        self.aggregator_up = false;
    }

    fn restart_aggregator(&mut self) -> Result<()> {
        self.aggregator.restart()?;
        self.aggregator_up = true;
        Ok(())
    }

    fn kill_libvirt(&mut self) {
        self.daemon.kill();
        self.libvirt_up = false;
    }

    fn restart_libvirt(&mut self) -> Result<()> {
        self.daemon.restart()?;
        self.libvirt_up = true;
        Ok(())
    }

    /// Sidecars that run (neither killed nor frozen).
    fn reporting(&self, guest: &str) -> bool {
        self.sidecars.contains_key(guest) && !self.frozen.contains(guest)
    }

    /// The running domains: `virsh list` while the daemon is up (and checked against what
    /// the test did), the test's own record while it is down (the guests run on).
    fn running_domains(&self) -> Result<BTreeSet<String>> {
        if !self.libvirt_up {
            return Ok(self.running.clone());
        }
        let listed: BTreeSet<String> = self.daemon.running_domains()?.into_iter().collect();
        ensure!(
            listed == self.running,
            "virsh list {listed:?} differs from the guests the test runs {:?}",
            self.running
        );
        Ok(listed)
    }

    /// The series the aggregator must hold now.
    fn expected(&self) -> Result<BTreeSet<Vmi>> {
        self.running_domains()?
            .iter()
            .filter(|domain| self.reporting(domain))
            .map(|domain| vmi_of(domain))
            .collect()
    }

    /// The series on /metrics, each checked for the labels every series must carry.
    fn exposed(&self) -> Result<BTreeSet<Vmi>> {
        let mut exposed = BTreeSet::new();
        for labels in self.aggregator.series()? {
            let vmi = (labels["namespace"].clone(), labels["name"].clone());
            ensure!(
                labels.get("node").map(String::as_str) == Some(NODE)
                    && labels.get("hypervisor_type").map(String::as_str) == Some("qemu-tcg"),
                "series with wrong labels: {labels:?}"
            );
            ensure!(exposed.insert(vmi.clone()), "series {vmi:?} twice");
        }
        Ok(exposed)
    }

    /// Waits until the aggregator's series equal the truth and stay so for a few scrapes;
    /// returns how long that took.
    fn check(&self, step: &str) -> Result<Duration> {
        let started = Instant::now();
        let expected = self.expected()?;
        let mut last = BTreeSet::new();
        let mut equal_in_a_row = 0;
        let waited = wait_until(
            SETTLE,
            &format!("series equal to the truth after {step}"),
            || {
                last = self.exposed()?;
                if last == expected {
                    equal_in_a_row += 1;
                } else {
                    equal_in_a_row = 0;
                }
                Ok((equal_in_a_row > STABLE_SCRAPES).then(|| started.elapsed()))
            },
        );
        let took = waited.with_context(|| {
            format!(
                "after {step}: expected {expected:?}, the aggregator shows {last:?}\n{}",
                self.diagnostics()
            )
        })?;
        // The truth did not move under the check.
        ensure!(
            self.expected()? == expected,
            "the running domains changed during the check after {step}"
        );
        Ok(took)
    }

    fn diagnostics(&self) -> String {
        let tail = |text: String, lines: usize| {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        let mut out = format!(
            "frozen sidecars: {:?}; killed sidecars: {:?}\n== aggregator log (tail)\n{}\n",
            self.frozen,
            self.guests
                .iter()
                .filter(|g| !self.sidecars.contains_key(*g))
                .collect::<Vec<_>>(),
            tail(self.aggregator.log(), 30)
        );
        for (guest, sidecar) in &self.sidecars {
            out.push_str(&format!(
                "== sidecar of {guest} (tail)\n{}\n",
                tail(sidecar.log(), 15)
            ));
        }
        out.push_str(&format!(
            "== libvirtd log (tail)\n{}",
            self.daemon.log_tail(10)
        ));
        out
    }
}

/// Runs `step`, then checks the series; prints and returns the time to the truth.
fn step(
    node: &mut Node,
    what: &str,
    step: impl FnOnce(&mut Node) -> Result<()>,
) -> Result<Duration> {
    step(node).with_context(|| format!("doing: {what}"))?;
    let took = node.check(what)?;
    note(format!("{what} → series equal the truth after {took:?}"));
    Ok(took)
}

#[test]
fn sidecar_sigkill_and_sigstop() -> Result<()> {
    let mut node = Node::start(&["default_vm-a", "prod_vm-b"])?;
    step(&mut node, "start", |_| Ok(()))?;

    step(&mut node, "sidecar of default_vm-a SIGKILLed", |n| {
        n.kill_sidecar("default_vm-a")
    })?;
    step(&mut node, "sidecar of default_vm-a started again", |n| {
        n.start_sidecar("default_vm-a")
    })?;

    // Half-open: the kernel keeps the connection, nothing answers the aggregator's pings.
    let gone = step(&mut node, "sidecar of prod_vm-b SIGSTOPped", |n| {
        n.freeze_sidecar("prod_vm-b")
    })?;
    ensure!(
        gone < SETTLE,
        "a frozen sidecar's series outlived the keepalive by far: {gone:?}"
    );
    step(&mut node, "sidecar of prod_vm-b SIGCONTed", |n| {
        n.thaw_sidecar("prod_vm-b")
    })?;
    Ok(())
}

#[test]
fn aggregator_sigkill_and_restart_with_guests_changing_while_it_is_down() -> Result<()> {
    let mut node = Node::start(&["default_vm-a", "prod_vm-b", "default_vm-c"])?;
    node.guests.push("other_vm-d".into());
    step(&mut node, "start", |_| Ok(()))?;

    // Straight back up.
    let killed = Instant::now();
    node.kill_aggregator();
    node.restart_aggregator()?;
    let restarted = killed.elapsed();
    let back = node.check("aggregator SIGKILLed and restarted")?;
    note(format!(
        "aggregator SIGKILLed and restarted (up again in {restarted:?}) → all series back \
         {back:?} after it answered (target {RESTART_TARGET:?})"
    ));

    // Down for a while, with guests started, destroyed and crashed meanwhile.
    node.kill_aggregator();
    node.destroy_guest("default_vm-a")?;
    node.start_guest("other_vm-d")?;
    node.start_sidecar("other_vm-d")?;
    node.crash_guest("prod_vm-b")?;
    node.restart_aggregator()?;
    let back = node.check("guests started, destroyed and crashed while the aggregator was down")?;
    note(format!(
        "aggregator down while guests started, destroyed and crashed, then restarted → series \
         equal the truth {back:?} after it answered (target {RESTART_TARGET:?})"
    ));
    ensure!(node.exposed()?.len() == 2);
    Ok(())
}

#[test]
fn libvirt_sigkill_and_restart_keeps_series_and_events_flowing() -> Result<()> {
    let mut node = Node::start(&["default_vm-a", "prod_vm-b"])?;
    step(&mut node, "start", |_| Ok(()))?;

    node.kill_libvirt();
    // Wait until every sidecar has noticed, then the series must still be there.
    wait_until(
        SETTLE,
        "every sidecar to notice that libvirt is gone",
        || {
            Ok(node
                .sidecars
                .values()
                .all(|s| s.log().contains("reconnecting, reports kept"))
                .then_some(()))
        },
    )
    .with_context(|| node.diagnostics())?;
    let kept = node.check("libvirt daemon SIGKILLed (sidecars noticed)")?;
    note(format!(
        "libvirt daemon SIGKILLed → series kept ({kept:?} to confirm)"
    ));

    step(&mut node, "libvirt daemon restarted", Node::restart_libvirt)?;
    // Events from the new daemon reach the sidecars that were connected to the old one.
    step(
        &mut node,
        "default_vm-a destroyed after the libvirt restart",
        |n| n.destroy_guest("default_vm-a"),
    )?;
    step(&mut node, "default_vm-a started again", |n| {
        n.start_guest("default_vm-a")
    })?;
    Ok(())
}

#[test]
fn a_crashed_guest_loses_its_series_and_regains_it_when_started_again() -> Result<()> {
    let mut node = Node::start(&["default_vm-a", "prod_vm-b"])?;
    step(&mut node, "start", |_| Ok(()))?;
    step(
        &mut node,
        "QEMU of default_vm-a SIGKILLed (guest crash)",
        |n| n.crash_guest("default_vm-a"),
    )?;
    step(
        &mut node,
        "default_vm-a started again after its crash",
        |n| n.start_guest("default_vm-a"),
    )?;
    Ok(())
}

/// The faults the soak draws from.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillSidecar,
    RestartSidecar,
    FreezeSidecar,
    ThawSidecar,
    RestartAggregator,
    AggregatorDownWhileGuestsChange,
    RestartLibvirt,
    CrashGuest,
    DestroyGuest,
    StartGuest,
}

const FAULTS: [Fault; 10] = [
    Fault::KillSidecar,
    Fault::RestartSidecar,
    Fault::FreezeSidecar,
    Fault::ThawSidecar,
    Fault::RestartAggregator,
    Fault::AggregatorDownWhileGuestsChange,
    Fault::RestartLibvirt,
    Fault::CrashGuest,
    Fault::DestroyGuest,
    Fault::StartGuest,
];

const SOAK_SEED: u64 = 0x6b76_686d_0004;
const SOAK_STEPS: usize = 30;
/// No new step starts after this (30 steps take about 25 s on an idle 2-core machine).
const SOAK_BUDGET: Duration = Duration::from_secs(75);

fn pick<'a>(rng: &mut fastrand::Rng, from: &'a [String]) -> Option<&'a String> {
    (!from.is_empty()).then(|| &from[rng.usize(..from.len())])
}

/// Applies one fault, if the node's state allows it; returns what it did.
fn apply(node: &mut Node, rng: &mut fastrand::Rng, fault: Fault) -> Result<Option<String>> {
    let with_sidecar: Vec<String> = node
        .guests
        .iter()
        .filter(|g| node.reporting(g))
        .cloned()
        .collect();
    let killed: Vec<String> = node
        .guests
        .iter()
        .filter(|g| !node.sidecars.contains_key(*g))
        .cloned()
        .collect();
    let frozen: Vec<String> = node.frozen.iter().cloned().collect();
    let running: Vec<String> = node.running.iter().cloned().collect();
    let stopped: Vec<String> = node
        .guests
        .iter()
        .filter(|g| !node.running.contains(*g))
        .cloned()
        .collect();
    Ok(match fault {
        Fault::KillSidecar => match pick(rng, &with_sidecar) {
            Some(g) => {
                node.kill_sidecar(g)?;
                Some(format!("SIGKILL sidecar of {g}"))
            }
            None => None,
        },
        Fault::RestartSidecar => match pick(rng, &killed) {
            Some(g) => {
                node.start_sidecar(g)?;
                Some(format!("start sidecar of {g} again"))
            }
            None => None,
        },
        Fault::FreezeSidecar => match pick(rng, &with_sidecar) {
            Some(g) => {
                node.freeze_sidecar(g)?;
                Some(format!("SIGSTOP sidecar of {g}"))
            }
            None => None,
        },
        Fault::ThawSidecar => match pick(rng, &frozen) {
            Some(g) => {
                node.thaw_sidecar(g)?;
                Some(format!("SIGCONT sidecar of {g}"))
            }
            None => None,
        },
        Fault::RestartAggregator => {
            node.kill_aggregator();
            node.restart_aggregator()?;
            Some("SIGKILL and restart the aggregator".into())
        }
        Fault::AggregatorDownWhileGuestsChange => {
            node.kill_aggregator();
            let mut did = vec!["SIGKILL the aggregator".to_string()];
            if let Some(g) = pick(rng, &running) {
                node.destroy_guest(g)?;
                did.push(format!("destroy {g}"));
            }
            if let Some(g) = pick(rng, &stopped) {
                node.start_guest(g)?;
                did.push(format!("start {g}"));
            }
            node.restart_aggregator()?;
            did.push("restart the aggregator".into());
            Some(did.join(", "))
        }
        Fault::RestartLibvirt => {
            node.kill_libvirt();
            node.check("libvirt daemon SIGKILLed")?;
            node.restart_libvirt()?;
            Some("SIGKILL libvirtd (series kept), restart it".into())
        }
        Fault::CrashGuest => match pick(rng, &running) {
            Some(g) => {
                node.crash_guest(g)?;
                Some(format!("SIGKILL the QEMU of {g}"))
            }
            None => None,
        },
        Fault::DestroyGuest => match pick(rng, &running) {
            Some(g) => {
                node.destroy_guest(g)?;
                Some(format!("destroy {g}"))
            }
            None => None,
        },
        Fault::StartGuest => match pick(rng, &stopped) {
            Some(g) => {
                node.start_guest(g)?;
                Some(format!("start {g}"))
            }
            None => None,
        },
    })
}

#[test]
fn randomized_soak_with_a_fixed_seed() -> Result<()> {
    let seed = std::env::var("KVHM_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SOAK_SEED);
    let mut rng = fastrand::Rng::with_seed(seed);
    let guests = ["default_vm-0", "prod_vm-1", "default_vm-2", "other_vm-3"];
    let started = Instant::now();
    let mut node = Node::start(&guests)?;
    node.check("start")?;
    let mut done = 0;
    let mut slowest = Duration::ZERO;
    while done < SOAK_STEPS && started.elapsed() < SOAK_BUDGET {
        let fault = FAULTS[rng.usize(..FAULTS.len())];
        let Some(what) = apply(&mut node, &mut rng, fault)? else {
            continue;
        };
        done += 1;
        let took = node
            .check(&format!("soak step {done} ({what})"))
            .with_context(|| format!("seed {seed:#x}"))?;
        slowest = slowest.max(took);
        eprintln!("soak step {done}: {what} → truth after {took:?}");
    }
    ensure!(done > 0, "the soak took no step");

    // The end: every guest running, every sidecar back, every frozen one thawed; nothing
    // stale, nothing missing.
    for guest in node.frozen.clone() {
        node.thaw_sidecar(&guest)?;
    }
    for guest in node.guests.clone() {
        if !node.sidecars.contains_key(&guest) {
            node.start_sidecar(&guest)?;
        }
        if !node.running.contains(&guest) {
            node.start_guest(&guest)?;
        }
    }
    let took = node.check("the soak's end, every sidecar running")?;
    let listed: BTreeSet<Vmi> = node
        .daemon
        .running_domains()?
        .iter()
        .map(|d| vmi_of(d))
        .collect::<Result<_>>()?;
    if node.exposed()? != listed || listed.len() != guests.len() {
        bail!("at the end, /metrics differs from virsh list {listed:?}");
    }
    note(format!(
        "soak (seed {seed:#x}): {done} random faults in {:?}, slowest step to the truth \
         {slowest:?}; at the end {} series equal virsh list after {took:?}",
        started.elapsed(),
        listed.len()
    ));
    Ok(())
}
