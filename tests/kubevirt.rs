//! KubeVirt's recorded virt-launcher drives the sidecar: each test replays pods recorded from
//! KubeVirt's own virt-launcher (tests/harness/replay.rs) against the real sidecar in its pod,
//! a fresh libvirt daemon with a real QEMU guest, and the real aggregator, and checks what a
//! user would check: the series on `/metrics` and in `Inventory/List`. Each also records the
//! aggregator's `Inventory/Watch` stream, every change of `/metrics` and libvirt's own
//! lifecycle events, to prove when the series appeared and that it never went away while the
//! domain ran.
//!
//! The scenario tests replay one recording each, with the scenario's own checks (and, where a
//! scenario needs it, an action of its own between recorded steps: a kill, an aggregator
//! restart). [`every_recorded_pod_replays_as_recorded`] replays every pod of the recordings
//! directory (`KVHM_RECORDINGS`) and checks what holds for any VM.
//!
//! Every replay prints (stderr) how long its series took to reach the aggregator after the
//! domain ran, for the closing note; `make bench` is where speed is measured, these only
//! bound it.

use std::io::Write as _;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, Labels};
use e2e::libvirt::skip_without_kvm;
use e2e::lifecycle;
use e2e::recording::{RecordedPod, RecordedVmi, scenarios};
use e2e::replay::{Action, Replay};
use e2e::timeline::{MetricsRecorder, WatchRecorder, Watched, inventory_list};
use e2e::tools::wait_until;
use hypervisor_proto::v1::watch_event::Kind;
use hypervisor_proto::v1::{DomainState, HypervisorType, Series};

const NODE: &str = "node-1";
/// Generous bounds for a busy 2-core machine; the real figures are printed.
const APPEAR: Duration = Duration::from_secs(60);
const SIDECAR_EXIT: Duration = Duration::from_secs(60);
/// How soon after the domain runs its series must be on the aggregator.
const WITHIN: Duration = Duration::from_millis(100);
/// The sidecar and the test's own subscription receive the same libvirt broadcast; the test
/// stamps it on its event thread, the series takes two more hops (aggregator, Watch stream).
/// A series seen this much "before" the domain ran is a scheduling jitter; the faults this
/// guards against (a report at definition) are half a second and more early.
const SAME_BROADCAST: Duration = Duration::from_millis(50);
/// How long after a sidecar restarts its series must be back, and after the domain stops (or
/// the pod is deleted) gone.
const SETTLE: Duration = Duration::from_secs(5);

/// Printed past the test harness's output capture, so `cargo test` shows the figures.
fn note(scenario: &str, line: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "kubevirt: {scenario}: {}", line.as_ref());
}

/// Whether the recorded pods cannot be replayed here (printed): a KVM domain needs KVM.
fn skip(scenario: &str, pods: &[RecordedPod]) -> Result<bool> {
    if !pods.iter().any(|p| p.domain_type == "kvm") {
        return Ok(false);
    }
    skip_without_kvm(&format!("kubevirt: {scenario} (a kvm domain)"))
}

/// One node: the aggregator and what the test records of it.
struct Node {
    aggregator: Aggregator,
    watch: WatchRecorder,
    metrics: MetricsRecorder,
}

impl Node {
    fn start() -> Result<Self> {
        let aggregator = Aggregator::start(NODE)?;
        let watch = WatchRecorder::start(&aggregator.grpc_addr())?;
        let metrics = MetricsRecorder::start(&aggregator.url("/metrics"))?;
        Ok(Node {
            aggregator,
            watch,
            metrics,
        })
    }

    /// A replay of `recorded` whose sidecar reports to this node's aggregator.
    fn replay(&self, recorded: &RecordedPod) -> Result<Replay> {
        Replay::new(recorded, &self.aggregator.grpc_url(), Instant::now())
    }

    /// The VMI's series on /metrics now.
    fn exposed(&self, vmi: &RecordedVmi) -> Result<Vec<Labels>> {
        Ok(self
            .aggregator
            .series()?
            .into_iter()
            .filter(|l| is_vmi(l, vmi))
            .collect())
    }

    /// The VMI's series in Inventory/List now.
    fn listed(&self, vmi: &RecordedVmi) -> Result<Vec<Series>> {
        Ok(inventory_list(&self.aggregator.grpc_addr())?
            .into_iter()
            .filter(|s| s.domain.as_ref().is_some_and(|d| is_domain_of(d, vmi)))
            .collect())
    }

    /// Waits until /metrics shows the VMI (`present`) or no longer does.
    fn wait_exposed(&self, replay: &Replay, present: bool) -> Result<()> {
        let vmi = &replay.recorded().vmi;
        let what = format!(
            "{}/{} {} /metrics",
            vmi.namespace,
            vmi.name,
            if present { "on" } else { "gone from" }
        );
        wait_until(APPEAR, &what, || {
            Ok((self.exposed(vmi)?.is_empty() != present).then_some(()))
        })
        .with_context(|| self.story(replay))
    }

    /// The VMI's series is on /metrics and in Inventory/List exactly once, of the recorded
    /// domain's type, in `state`, and with the recorded VMI's uid (`uid_required`) or, when
    /// it may be unknown, with no other uid.
    fn assert_series(
        &self,
        replay: &Replay,
        state: DomainState,
        uid_required: bool,
        version_required: bool,
    ) -> Result<()> {
        let recorded = replay.recorded();
        let vmi = &recorded.vmi;
        let hypervisor = hypervisor_of(recorded)?;
        let exposed = self.exposed(vmi)?;
        ensure!(
            exposed.len() == 1,
            "/metrics should have one series of {}/{}, has {exposed:?}",
            vmi.namespace,
            vmi.name
        );
        let labels = &exposed[0];
        ensure!(
            labels["node"] == NODE && labels["hypervisor_type"] == hypervisor.label(),
            "/metrics: {labels:?}, expected node {NODE} and hypervisor_type {}",
            hypervisor.label()
        );
        let version = &labels["hypervisor_version"];
        if version_required {
            ensure!(
                version.split('.').count() == 3
                    && version.split('.').all(|p| p.parse::<u32>().is_ok()),
                "hypervisor_version should be QEMU's version from libvirt, is {version:?}"
            );
        }
        let listed = self.listed(vmi)?;
        ensure!(
            listed.len() == 1,
            "Inventory/List should have one series of {}/{}, has {listed:?}",
            vmi.namespace,
            vmi.name
        );
        let series = &listed[0];
        let domain = series.domain.as_ref().expect("filtered on the domain");
        ensure!(
            domain.hypervisor_type() == hypervisor
                && domain.state() == state
                && domain.domain_name == vmi.domain()
                && series.node == NODE
                && !series.held,
            "Inventory/List: {series:?}, expected {hypervisor:?}, {state:?}, domain {}",
            vmi.domain()
        );
        if uid_required || !domain.uid.is_empty() {
            ensure!(
                domain.uid == vmi.uid,
                "Inventory/List: uid {:?}, the recorded VMI's metadata.uid is {:?}",
                domain.uid,
                vmi.uid
            );
        }
        Ok(())
    }

    /// The Watch stream's events of the VMI (`ADDED`, `MODIFIED`, `REMOVED`, with the series),
    /// and `ENDED` for each end of the stream, which drops every series.
    fn watch_events(&self, vmi: &RecordedVmi) -> Vec<(SystemTime, &'static str, Option<Series>)> {
        self.watch
            .seen()
            .into_iter()
            .filter_map(|seen| match seen {
                Watched::Event { at, kind, series } => series
                    .domain
                    .as_ref()
                    .is_some_and(|d| is_domain_of(d, vmi))
                    .then(|| (at, watch_kind(kind), Some(series))),
                Watched::Ended { at, .. } => Some((at, "ENDED", None)),
            })
            .collect()
    }

    /// "Appears only once the domain runs, within [`WITHIN`], never withdrawn while it runs",
    /// from the Watch stream and every /metrics change up to `until`. Returns how long after
    /// the domain ran the series reached the aggregator.
    fn assert_reported_once_running(&self, replay: &Replay, until: SystemTime) -> Result<Duration> {
        let vmi = &replay.recorded().vmi;
        let running = replay
            .first_event(&[lifecycle::RESUMED])
            .context("the domain never ran")?;
        let story = || self.story(replay);
        let events: Vec<_> = self
            .watch_events(vmi)
            .into_iter()
            .filter(|(at, ..)| *at <= until)
            .collect();
        let added: Vec<SystemTime> = events
            .iter()
            .filter(|(_, kind, _)| *kind == "ADDED")
            .map(|(at, ..)| *at)
            .collect();
        ensure!(
            added.len() == 1,
            "the series should be added exactly once while the domain runs, was added {} \
             times:\n{}",
            added.len(),
            story()
        );
        ensure!(
            !events
                .iter()
                .any(|(_, kind, _)| *kind == "REMOVED" || *kind == "ENDED"),
            "the series must not be withdrawn while the domain runs:\n{}",
            story()
        );
        let latency = check_appeared(added[0], running, &story)?;
        self.assert_metrics_kept(replay, running, until)?;
        Ok(latency)
    }

    /// /metrics never showed the series before the domain ran, and never lost it between its
    /// first appearance and `until`.
    fn assert_metrics_kept(
        &self,
        replay: &Replay,
        running: SystemTime,
        until: SystemTime,
    ) -> Result<()> {
        let vmi = &replay.recorded().vmi;
        self.metrics.wait_caught_up(until, APPEAR)?;
        let mut first_seen = None;
        for scrape in self.metrics.changes().iter().filter(|s| s.at <= until) {
            let present = scrape
                .series
                .as_ref()
                .is_some_and(|series| series.iter().any(|l| is_vmi(l, vmi)));
            match (first_seen, present) {
                (None, true) => {
                    ensure!(
                        scrape.at + SAME_BROADCAST >= running,
                        "/metrics showed the series {:?} before the domain ran:\n{}",
                        running.duration_since(scrape.at).unwrap_or_default(),
                        self.story(replay)
                    );
                    first_seen = Some(scrape.at);
                }
                (Some(_), false) => bail!(
                    "/metrics lost the series while the domain ran:\n{}",
                    self.story(replay)
                ),
                _ => {}
            }
        }
        first_seen
            .map(drop)
            .with_context(|| format!("the series never reached /metrics:\n{}", self.story(replay)))
    }

    /// What the replay did, what libvirt, the Watch stream and /metrics said about the pod's
    /// VMI, in order, in seconds from the first thing the replay did.
    fn story(&self, replay: &Replay) -> String {
        let vmi = &replay.recorded().vmi;
        let mut lines: Vec<(SystemTime, String)> = replay
            .played()
            .iter()
            .map(|(at, action)| (*at, format!("replay: {action:?}")))
            .collect();
        for event in replay.lifecycle_events() {
            lines.push((
                event.wall,
                format!("libvirt: {}", lifecycle_name(event.kind)),
            ));
        }
        for (at, kind, series) in self.watch_events(vmi) {
            let state = series
                .and_then(|s| s.domain)
                .map(|d| format!(" ({:?}, uid {:?})", d.state(), d.uid))
                .unwrap_or_default();
            lines.push((at, format!("Inventory/Watch: {kind}{state}")));
        }
        let mut was = None;
        for scrape in self.metrics.changes() {
            let now = scrape
                .series
                .as_ref()
                .map(|series| series.iter().any(|l| is_vmi(l, vmi)));
            if now != was {
                let what = match now {
                    Some(true) => "on /metrics",
                    Some(false) => "not on /metrics",
                    None => "/metrics unreachable",
                };
                lines.push((scrape.at, what.to_owned()));
                was = now;
            }
        }
        lines.sort_by_key(|(at, _)| *at);
        let origin = lines.first().map_or(SystemTime::now(), |(at, _)| *at);
        let mut out = format!(
            "timeline of {}/{} (seconds from the replay's start):\n",
            vmi.namespace, vmi.name
        );
        for (at, line) in lines {
            let offset = at.duration_since(origin).unwrap_or_default().as_secs_f64();
            out.push_str(&format!("  {offset:+8.3}  {line}\n"));
        }
        out.push_str(&replay.diagnostics());
        out
    }
}

/// The series first reached the aggregator at `added`, the domain ran at `running`: not
/// before it (but for [`SAME_BROADCAST`]), and within [`WITHIN`]. Returns the latency.
fn check_appeared(
    added: SystemTime,
    running: SystemTime,
    story: &dyn Fn() -> String,
) -> Result<Duration> {
    ensure!(
        added + SAME_BROADCAST >= running,
        "the series was added {:?} before the domain ran:\n{}",
        running.duration_since(added).unwrap_or_default(),
        story()
    );
    let latency = added.duration_since(running).unwrap_or_default();
    ensure!(
        latency <= WITHIN,
        "the series reached the aggregator {latency:?} after the domain ran, more than \
         {WITHIN:?}:\n{}",
        story()
    );
    Ok(latency)
}

fn lifecycle_name(kind: i32) -> &'static str {
    [
        "defined",
        "undefined",
        "started",
        "suspended",
        "resumed",
        "stopped",
        "shutdown",
        "pmsuspended",
        "crashed",
    ]
    .get(kind as usize)
    .copied()
    .unwrap_or("other")
}

fn watch_kind(kind: Kind) -> &'static str {
    match kind {
        Kind::Added => "ADDED",
        Kind::Modified => "MODIFIED",
        Kind::Removed => "REMOVED",
        Kind::Unspecified => "UNSPECIFIED",
    }
}

fn is_vmi(labels: &Labels, vmi: &RecordedVmi) -> bool {
    labels.get("namespace") == Some(&vmi.namespace) && labels.get("name") == Some(&vmi.name)
}

fn is_domain_of(domain: &hypervisor_proto::v1::Domain, vmi: &RecordedVmi) -> bool {
    domain.namespace == vmi.namespace && domain.name == vmi.name
}

/// What the recorded domain's type makes of it (DESIGN.md, classification).
fn hypervisor_of(recorded: &RecordedPod) -> Result<HypervisorType> {
    Ok(match recorded.domain_type.as_str() {
        "kvm" => HypervisorType::Kvm,
        "qemu" => HypervisorType::QemuTcg,
        "hyperv" => HypervisorType::Mshv,
        other => bail!(
            "{}: the replay has no QEMU for a {other:?} domain",
            recorded.label()
        ),
    })
}

// ---------------------------------------------------------------------------------------
// Every recorded pod.

/// Replays every scenario of the recordings directory, its pods side by side on one node as
/// recorded, and checks for each pod what holds for any VM: every answer as recorded (the
/// replay checks each), one series while the domain runs, on the aggregator within
/// [`WITHIN`] of it running and none before, with the recorded VMI's namespace, name and uid
/// and the type of its domain, gone once the domain stops or the pod is deleted, and the
/// sidecar's clean exit.
#[test]
fn every_recorded_pod_replays_as_recorded() -> Result<()> {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (scenario, pods) in scenarios()? {
        let recorded = pods
            .iter()
            .map(|pod| RecordedPod::load(&scenario, pod))
            .collect::<Result<Vec<_>>>()?;
        if skip(&scenario, &recorded)? {
            continue;
        }
        match replay_scenario(&recorded) {
            Ok(()) => replayed += recorded.len(),
            Err(err) => failures.push(format!("{scenario}: {err:#}")),
        }
    }
    note(
        "every recorded pod",
        format!("{replayed} pods replayed in {:.0?}", started.elapsed()),
    );
    ensure!(
        failures.is_empty(),
        "{} scenario(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    Ok(())
}

/// Plays the pods of one scenario side by side on one node, then checks each.
fn replay_scenario(recorded: &[RecordedPod]) -> Result<()> {
    let node = Node::start()?;
    let origin = Instant::now();
    let aggregator = node.aggregator.grpc_url();
    let played: Vec<Result<(Replay, std::process::ExitStatus)>> = thread::scope(|scope| {
        let handles: Vec<_> = recorded
            .iter()
            .map(|pod| {
                let aggregator = aggregator.clone();
                scope.spawn(move || {
                    let mut replay = Replay::new(pod, &aggregator, origin)?;
                    replay.play_to_end()?;
                    let status = replay.wait_sidecar_exit(SIDECAR_EXIT)?;
                    Ok((replay, status))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("the replay thread panicked"))
            })
            .collect()
    });
    let mut replays = Vec::new();
    for result in played {
        replays.push(result?);
    }
    // The last scrapes and Watch events after the last exit.
    node.metrics.wait_caught_up(SystemTime::now(), APPEAR)?;
    std::thread::sleep(Duration::from_millis(100));
    for (replay, status) in &replays {
        check_any_vm(&node, replay, *status).with_context(|| replay.recorded().label())?;
    }
    Ok(())
}

/// The checks of [`every_recorded_pod_replays_as_recorded`] for one played pod.
fn check_any_vm(node: &Node, replay: &Replay, status: std::process::ExitStatus) -> Result<()> {
    let recorded = replay.recorded();
    let vmi = &recorded.vmi;
    let story = || node.story(replay);
    ensure!(
        status.success(),
        "the sidecar should exit 0 (Shutdown hook or SIGTERM), exited {status}:\n{}",
        story()
    );
    let running = replay
        .first_event(&[lifecycle::RESUMED])
        .context("the domain never ran")?;
    let events = node.watch_events(vmi);
    let added: Vec<&(SystemTime, &str, Option<Series>)> = events
        .iter()
        .filter(|(_, kind, _)| *kind == "ADDED")
        .collect();
    let first = added
        .first()
        .with_context(|| format!("never reported:\n{}", story()))?;
    let figure = if recorded.libvirt_mount {
        let latency = check_appeared(first.0, running, &story)?;
        format!("domain running → series on the aggregator: {latency:.0?}")
    } else {
        // Without libvirt, the hooks' domain once libvirt holds it (DESIGN.md).
        let defined = replay
            .first_event(&[lifecycle::DEFINED])
            .context("the domain was never defined")?;
        ensure!(
            first.0 + SAME_BROADCAST >= defined && first.0 <= running + WITHIN,
            "the hook fallback's series should appear between the definition and the run:\n{}",
            story()
        );
        format!(
            "domain defined → series on the aggregator: {:.0?} (running at +{:.0?})",
            first.0.duration_since(defined).unwrap_or_default(),
            running.duration_since(defined).unwrap_or_default()
        )
    };
    let hypervisor = hypervisor_of(recorded)?;
    let restarts: Vec<SystemTime> = replay
        .played()
        .iter()
        .filter(|(_, action)| matches!(action, Action::SidecarStart(n) if *n > 1))
        .map(|(at, _)| *at)
        .collect();
    for (at, _, series) in &added {
        let series = series.as_ref().expect("an event has a series");
        let domain = series.domain.as_ref().expect("filtered on the domain");
        // A restarted sidecar gets no hook call: the uid may be unknown, never wrong.
        let uid_known = !restarts.iter().any(|r| r <= at);
        ensure!(
            domain.hypervisor_type() == hypervisor
                && series.node == NODE
                && domain.domain_name == vmi.domain()
                && (domain.uid == vmi.uid || (!uid_known && domain.uid.is_empty())),
            "added as {series:?}; recorded: {hypervisor:?}, uid {:?}:\n{}",
            vmi.uid,
            story()
        );
    }
    check_kept_and_gone(node, replay, running, &restarts)?;
    note(&recorded.label(), figure);
    Ok(())
}

/// Withdrawn only while a restarted sidecar comes back, back within [`SETTLE`] unless the
/// domain was gone by then, and gone within [`SETTLE`] of the domain's stop or the pod's
/// deletion, for good; at no time two series of the VMI on /metrics.
fn check_kept_and_gone(
    node: &Node,
    replay: &Replay,
    running: SystemTime,
    restarts: &[SystemTime],
) -> Result<()> {
    let vmi = &replay.recorded().vmi;
    let story = || node.story(replay);
    let stopped = replay.first_event(lifecycle::STOP);
    let terminated = replay.played_at(|a| *a == Action::Terminate);
    let end = [stopped, terminated]
        .into_iter()
        .flatten()
        .min()
        .context("the domain neither stopped nor was its pod deleted")?;
    let events = node.watch_events(vmi);
    let mut present = false;
    for (at, kind, _) in &events {
        match *kind {
            "ADDED" => present = true,
            "REMOVED" | "ENDED" if present => {
                present = false;
                let restarting = restarts
                    .iter()
                    .any(|r| *r <= *at + SAME_BROADCAST && *at <= *r + SETTLE);
                ensure!(
                    *at + SAME_BROADCAST >= end || restarting || *at < running,
                    "withdrawn while the domain ran:\n{}",
                    story()
                );
                ensure!(
                    *at <= end + SETTLE || restarting,
                    "withdrawn {:?} after the domain stopped, more than {SETTLE:?}:\n{}",
                    at.duration_since(end).unwrap_or_default(),
                    story()
                );
            }
            _ => {}
        }
    }
    ensure!(
        !present,
        "the series is still there at the end:\n{}",
        story()
    );
    for restart in restarts.iter().filter(|r| **r + SETTLE < end) {
        ensure!(
            events
                .iter()
                .any(|(at, kind, _)| *kind == "ADDED" && at >= restart && *at <= *restart + SETTLE),
            "the restarted sidecar's series did not come back within {SETTLE:?}:\n{}",
            story()
        );
    }
    let doubled = node.metrics.changes().into_iter().find(|scrape| {
        scrape
            .series
            .as_ref()
            .is_some_and(|s| s.iter().filter(|l| is_vmi(l, vmi)).count() > 1)
    });
    ensure!(
        doubled.is_none(),
        "/metrics showed two series of the VMI: {doubled:?}\n{}",
        story()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The scenarios, one recording each.

/// A node and a replay of `scenario`'s only pod that reports to it, or `None` (printed)
/// where the pod cannot be replayed here.
fn scenario(scenario: &str) -> Result<Option<(Node, Replay)>> {
    let recorded = RecordedPod::load(scenario, "pod-0")?;
    if skip(scenario, std::slice::from_ref(&recorded))? {
        return Ok(None);
    }
    let node = Node::start()?;
    let replay = node.replay(&recorded)?;
    Ok(Some((node, replay)))
}

/// Plays until the domain runs and the series is on /metrics; checks it there and in
/// Inventory/List.
fn play_until_reported(node: &Node, replay: &mut Replay, version_required: bool) -> Result<()> {
    replay.play_through(|a| matches!(a, Action::Start { .. } | Action::Resume))?;
    node.wait_exposed(replay, true)?;
    node.assert_series(replay, DomainState::Running, true, version_required)
}

/// Plays on to the domain's stop, then [`check_held`].
fn play_until_stop(node: &Node, replay: &mut Replay) -> Result<()> {
    replay.play_until(|a| matches!(a, Action::Destroy))?;
    check_held(node, replay)
}

/// The series appeared once, within [`WITHIN`] of the domain running, and stayed until now;
/// prints that latency.
fn check_held(node: &Node, replay: &Replay) -> Result<()> {
    let latency = node.assert_reported_once_running(replay, SystemTime::now())?;
    node.assert_series(replay, DomainState::Running, true, true)?;
    note(
        &replay.recorded().scenario,
        format!("domain running → series on the aggregator: {latency:.0?}"),
    );
    Ok(())
}

/// Plays to the end (the domain stops, the Shutdown hook): the series goes, and the sidecar,
/// told by the hook, withdraws and exits 0.
fn play_out_and_check_cleanup(node: &Node, replay: &mut Replay) -> Result<()> {
    replay.play_to_end()?;
    node.wait_exposed(replay, false)?;
    let vmi = &replay.recorded().vmi;
    ensure!(
        node.listed(vmi)?.is_empty(),
        "Inventory/List still has {}/{} after the VM stopped",
        vmi.namespace,
        vmi.name
    );
    check_sidecar_exit(replay, "shutdown hook")
}

/// The sidecar exits 0, having logged why (`cause`, lowercase).
fn check_sidecar_exit(replay: &mut Replay, cause: &str) -> Result<()> {
    let status = replay.wait_sidecar_exit(SIDECAR_EXIT)?;
    ensure!(
        status.success(),
        "the sidecar should exit 0 after the {cause}, exited {status}:\n{}",
        replay.diagnostics()
    );
    ensure!(
        replay.sidecar_log().to_lowercase().contains(cause),
        "the sidecar exited without logging the {cause}:\n{}",
        replay.sidecar_log()
    );
    Ok(())
}

/// The sidecar's log line for the hook fallback: a warning that names both libvirt and the
/// hook.
fn logged_hook_fallback(log: &str) -> bool {
    log.lines().any(|line| {
        let lower = line.to_lowercase();
        line.contains("WARN") && lower.contains("libvirt") && lower.contains("hook")
    })
}

/// A start, ten seconds of running, KillVirtualMachine.
fn start_and_kill(name: &str) -> Result<()> {
    let Some((node, mut replay)) = scenario(name)? else {
        return Ok(());
    };
    play_until_reported(&node, &mut replay, true)?;
    play_until_stop(&node, &mut replay)?;
    ensure!(
        !logged_hook_fallback(&replay.sidecar_log()),
        "the sidecar has the libvirt mount but logged the hook fallback:\n{}",
        replay.sidecar_log()
    );
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn non_root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill()
-> Result<()> {
    start_and_kill(
        "non_root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill",
    )
}

#[test]
fn root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill() -> Result<()> {
    start_and_kill(
        "root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill",
    )
}

#[test]
fn emulation_without_kvm_reports_qemu_tcg() -> Result<()> {
    start_and_kill("emulation_without_kvm_reports_qemu_tcg")
}

#[test]
fn a_hook_sidecar_that_starts_after_virt_launcher_is_still_collected() -> Result<()> {
    // The recording's compute container started 3 s before the sidecar's, and virt-launcher
    // polled for the socket meanwhile: its first call comes as recorded.
    start_and_kill("a_hook_sidecar_that_starts_after_virt_launcher_is_still_collected")
}

/// Waits until Inventory/List shows the VMI in `state`.
fn wait_state(node: &Node, replay: &Replay, state: DomainState) -> Result<()> {
    let vmi = &replay.recorded().vmi;
    wait_until(APPEAR, &format!("Inventory/List to show {state:?}"), || {
        Ok(node
            .listed(vmi)?
            .iter()
            .any(|s| s.domain.as_ref().is_some_and(|d| d.state() == state))
            .then_some(()))
    })
    .with_context(|| node.story(replay))
}

#[test]
fn pause_and_unpause_keep_the_series_and_show_its_state() -> Result<()> {
    let Some((node, mut replay)) =
        scenario("pause_and_unpause_keep_the_series_and_show_its_state")?
    else {
        return Ok(());
    };
    play_until_reported(&node, &mut replay, true)?;
    // Recorded 40 ms apart; held until the paused state is seen, which is what a user checks.
    replay.play_through(|a| *a == Action::Suspend)?;
    wait_state(&node, &replay, DomainState::Paused)?;
    node.assert_series(&replay, DomainState::Paused, true, true)?;
    replay.play_through(|a| *a == Action::Resume)?;
    wait_state(&node, &replay, DomainState::Running)?;
    // Paused is still running for the series: one add, updates, no withdrawal.
    play_until_stop(&node, &mut replay)?;
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn a_guest_that_powers_itself_off_is_withdrawn_and_the_sidecar_exits() -> Result<()> {
    // Emulated in the recording, so it runs on machines without KVM too.
    let Some((node, mut replay)) =
        scenario("a_guest_that_powers_itself_off_is_withdrawn_and_the_sidecar_exits")?
    else {
        return Ok(());
    };
    play_until_reported(&node, &mut replay, true)?;
    // The guest's own power-off: libvirt's `stopped`, then virt-launcher's Shutdown hook.
    replay.play_through(|a| *a == Action::AwaitPowerOff)?;
    let stopped = replay
        .first_event(lifecycle::STOP)
        .context("the guest did not power off")?;
    let latency = node.assert_reported_once_running(&replay, stopped)?;
    note(
        &replay.recorded().scenario,
        format!("domain running → series on the aggregator: {latency:.0?}"),
    );
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn without_the_libvirt_mount_the_hook_fallback_reports_from_definition_to_shutdown() -> Result<()> {
    let Some((node, mut replay)) = scenario(
        "without_the_libvirt_mount_the_hook_fallback_reports_from_definition_to_shutdown",
    )?
    else {
        return Ok(());
    };
    ensure!(
        !replay.recorded().libvirt_mount,
        "{}: the recorded sidecar reached libvirt",
        replay.recorded().label()
    );
    replay.play_through(|a| matches!(a, Action::Start { .. }))?;
    node.wait_exposed(&replay, true)?;
    // From the defined XML and the VMI JSON only: no version without libvirt.
    node.assert_series(&replay, DomainState::Running, true, false)?;
    replay.play_until(|a| *a == Action::Destroy)?;

    let story = || node.story(&replay);
    let events = node.watch_events(&replay.recorded().vmi);
    let added: Vec<SystemTime> = events
        .iter()
        .filter(|(_, kind, _)| *kind == "ADDED")
        .map(|(at, ..)| *at)
        .collect();
    ensure!(
        added.len() == 1
            && !events
                .iter()
                .any(|(_, k, _)| *k == "REMOVED" || *k == "ENDED"),
        "the fallback series should be added once and kept:\n{}",
        story()
    );
    let defined = replay
        .first_event(&[lifecycle::DEFINED])
        .context("never defined")?;
    let running = replay
        .first_event(&[lifecycle::RESUMED])
        .context("never ran")?;
    ensure!(
        added[0] + SAME_BROADCAST >= defined,
        "the fallback series was added {:?} before libvirt defined the domain:\n{}",
        defined.duration_since(added[0]).unwrap_or_default(),
        story()
    );
    ensure!(
        logged_hook_fallback(&replay.sidecar_log()),
        "the sidecar should say that it reports from the hook because libvirt is out of \
         reach:\n{}",
        replay.sidecar_log()
    );
    note(
        &replay.recorded().scenario,
        format!(
            "domain defined → series on the aggregator: {:.0?} (running at +{:.0?})",
            added[0].duration_since(defined).unwrap_or_default(),
            running.duration_since(defined).unwrap_or_default()
        ),
    );
    play_out_and_check_cleanup(&node, &mut replay)
}

/// Waits until the replay's series is back on /metrics after `what` happened at `since`,
/// and prints how long that took.
fn wait_back(node: &Node, replay: &Replay, since: Instant, what: &str) -> Result<()> {
    node.wait_exposed(replay, true)?;
    note(
        &replay.recorded().scenario,
        format!("{what} → series back on /metrics: {:.0?}", since.elapsed()),
    );
    Ok(())
}

#[test]
fn a_sidecar_killed_and_restarted_mid_run_reports_the_vm_again() -> Result<()> {
    let Some((node, mut replay)) =
        scenario("a_sidecar_killed_and_restarted_mid_run_reports_the_vm_again")?
    else {
        return Ok(());
    };
    ensure!(
        replay.recorded().sidecar_starts().len() == 2,
        "{}: the recording should restart the sidecar once",
        replay.recorded().label()
    );
    play_until_reported(&node, &mut replay, true)?;
    replay.play_until(|a| *a == Action::Destroy)?;
    replay.sleep_until_due(|a| *a == Action::SidecarStart(2))?;
    check_held(&node, &replay)?;
    replay.kill_sidecar();
    // Its stream closed with it: the aggregator drops the series at once.
    node.wait_exposed(&replay, false)?;
    let restarted = Instant::now();
    // The recording restarted the sidecar a tenth of a second after virt-launcher began to
    // kill the VM (QEMU was gone before libvirt said so); played before the kill here, so
    // that the new sidecar has a running VM to find, which is what this scenario is about.
    replay.play_ahead(|a| *a == Action::SidecarStart(2))?;
    wait_back(&node, &replay, restarted, "sidecar restarted")?;
    // No OnDefineDomain reaches the new process: the uid may be unknown, never wrong.
    node.assert_series(&replay, DomainState::Running, false, true)?;
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn an_aggregator_restarted_mid_run_gets_the_series_back() -> Result<()> {
    let Some((mut node, mut replay)) =
        scenario("an_aggregator_restarted_mid_run_gets_the_series_back")?
    else {
        return Ok(());
    };
    play_until_reported(&node, &mut replay, true)?;
    play_until_stop(&node, &mut replay)?;
    // Not recorded (virt-launcher does not see it): the aggregator restarts while the VM runs.
    let restarted = Instant::now();
    node.aggregator.restart()?;
    wait_back(&node, &replay, restarted, "aggregator restarted")?;
    node.assert_series(&replay, DomainState::Running, true, true)?;
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn a_vmi_started_paused_has_no_series_until_it_is_unpaused() -> Result<()> {
    let Some((node, mut replay)) =
        scenario("a_vmi_started_paused_has_no_series_until_it_is_unpaused")?
    else {
        return Ok(());
    };
    replay.play_through(|a| *a == Action::Start { paused: true })?;
    // Started, its CPUs never ran, for the ten recorded seconds.
    replay.play_until(|a| *a == Action::Resume)?;
    ensure!(
        node.exposed(&replay.recorded().vmi)?.is_empty()
            && node.listed(&replay.recorded().vmi)?.is_empty(),
        "a VMI started paused has never run; it must have no series yet:\n{}",
        node.story(&replay)
    );
    play_until_reported(&node, &mut replay, true)?;
    play_until_stop(&node, &mut replay)?;
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn deleting_the_pod_withdraws_the_series_and_stops_the_vm_within_its_grace_period() -> Result<()> {
    let Some((node, mut replay)) =
        scenario("deleting_the_pod_withdraws_the_series_and_stops_the_vm_within_its_grace_period")?
    else {
        return Ok(());
    };
    ensure!(
        !replay.recorded().has_shutdown_call(),
        "{}: a deleted pod gets no Shutdown hook",
        replay.recorded().label()
    );
    play_until_reported(&node, &mut replay, true)?;
    replay.play_until(|a| *a == Action::Terminate)?;
    node.assert_reported_once_running(&replay, SystemTime::now())?;
    replay.play_through(|a| *a == Action::Terminate)?;
    let terminated = replay
        .played_at(|a| *a == Action::Terminate)
        .context("not terminated")?;
    check_sidecar_exit(&mut replay, "sigterm")?;
    node.wait_exposed(&replay, false)?;
    // virt-launcher stops the VM itself once the grace period is over (this guest has no
    // operating system to act on ACPI).
    replay.play_to_end()?;
    note(
        &replay.recorded().scenario,
        format!(
            "SIGTERM → domain stopped by virt-launcher: {:.1?} (the recording: {:.1} s)",
            replay
                .first_event(lifecycle::STOP)
                .context("the domain did not stop")?
                .duration_since(terminated)
                .unwrap_or_default(),
            recorded_gap(
                &replay,
                |a| *a == Action::Terminate,
                |a| *a == Action::Destroy
            )
        ),
    );
    Ok(())
}

/// Seconds between the recorded steps that `from` and `to` match.
fn recorded_gap(
    replay: &Replay,
    from: impl Fn(&Action) -> bool,
    to: impl Fn(&Action) -> bool,
) -> f64 {
    let at = |matches: &dyn Fn(&Action) -> bool| {
        replay
            .steps()
            .iter()
            .find(|s| matches(&s.action))
            .map_or(f64::NAN, |s| s.at_s)
    };
    at(&to) - at(&from)
}

#[test]
fn a_vmi_being_deleted_keeps_its_series_while_the_guest_runs_out_its_grace_period() -> Result<()> {
    let Some((node, mut replay)) =
        scenario("a_vmi_being_deleted_keeps_its_series_while_the_guest_runs_out_its_grace_period")?
    else {
        return Ok(());
    };
    play_until_reported(&node, &mut replay, true)?;
    // virt-handler's deletion: ACPI shutdown first; this guest has no operating system to act
    // on it, so it runs on through the grace period, and so does its series.
    replay.play_through(|a| *a == Action::PowerButton)?;
    play_until_stop(&node, &mut replay)?;
    play_out_and_check_cleanup(&node, &mut replay)
}

#[test]
fn two_pods_on_one_node_have_one_series_each() -> Result<()> {
    let scenario = "two_pods_on_one_node_have_one_series_each";
    let recorded = ["pod-0", "pod-1"]
        .map(|pod| RecordedPod::load(scenario, pod))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    if skip(scenario, &recorded)? {
        return Ok(());
    }
    let node = Node::start()?;
    let origin = Instant::now();
    let aggregator = node.aggregator.grpc_url();
    let mut first = Replay::new(&recorded[0], &aggregator, origin)?;
    let mut second = Replay::new(&recorded[1], &aggregator, origin)?;
    // Side by side as recorded, each until its VM is about to be killed.
    thread::scope(|scope| {
        let a = scope.spawn(|| first.play_until(|a| *a == Action::Destroy));
        let b = scope.spawn(|| second.play_until(|a| *a == Action::Destroy));
        [a.join(), b.join()]
            .into_iter()
            .try_for_each(|r| r.unwrap_or_else(|_| bail!("a replay thread panicked")))
    })?;
    for replay in [&first, &second] {
        node.assert_reported_once_running(replay, SystemTime::now())?;
        node.assert_series(replay, DomainState::Running, true, true)?;
    }
    ensure!(
        node.aggregator.series()?.len() == 2,
        "/metrics should have exactly the two VMIs: {:?}",
        node.aggregator.series()?
    );
    play_out_and_check_cleanup(&node, &mut first)?;
    // The other pod's series was never touched.
    node.assert_reported_once_running(&second, SystemTime::now())?;
    node.assert_series(&second, DomainState::Running, true, true)?;
    play_out_and_check_cleanup(&node, &mut second)
}
