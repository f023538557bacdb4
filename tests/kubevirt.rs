//! KubeVirt's own virt-launcher drives the sidecar: each scenario runs a virt-launcher pod
//! built from KubeVirt's source (tests/harness/kubevirt_pod.rs) with the real sidecar in
//! `hook-sidecar-0` and the real aggregator outside, plays virt-handler's part through
//! KubeVirt's own client, and checks what a user would check: the series on `/metrics` and
//! `Inventory/List`. Each also records the aggregator's `Inventory/Watch` stream, every change
//! of `/metrics` and libvirt's own lifecycle events, to prove when the series appeared and
//! that it never went away while the domain ran.
//!
//! Every scenario prints (stderr) how long its series took to reach /metrics after the
//! domain started running, for the closing note; the times are not asserted (that is `make
//! bench`'s job), only bounded by generous timeouts.

use std::io::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, Labels};
use e2e::kubevirt_pod::{LauncherPod, Mode, PodConfig, Vmi, power_off_disk};
use e2e::libvirt::kvm_unusable_reason;
use e2e::timeline::{MetricsRecorder, WatchRecorder, Watched, inventory_list};
use e2e::tools::wait_until;
use hypervisor_proto::v1::watch_event::Kind;
use hypervisor_proto::v1::{DomainState, HypervisorType, Series};

const NODE: &str = "node-1";
/// Generous bounds for a busy 2-core machine; the real figures are printed.
const APPEAR: Duration = Duration::from_secs(60);
const LIBVIRT_EVENT: Duration = Duration::from_secs(120);
const SIDECAR_EXIT: Duration = Duration::from_secs(60);
/// How long a scenario keeps a VM running before it stops it: virt-launcher's own domain
/// check races a kill within its first ~10 s (../shared/kubevirt/README.md).
const HOLD: Duration = Duration::from_secs(10);
/// The sidecar and the handler receive the same libvirt broadcast; the handler stamps it
/// as it arrives, and the series needs two more hops (aggregator, Watch stream) before the
/// test sees it. Half a second covers a handler thread scheduled late on a busy machine;
/// the faults this guards against are seconds early.
const SAME_BROADCAST: Duration = Duration::from_millis(500);

/// Printed past the test harness's output capture, so `cargo test` shows the figures.
fn note(scenario: &str, line: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "kubevirt: {scenario}: {}", line.as_ref());
}

/// A node for a scenario that needs KVM, or `None`, printing why, where KVM is unusable.
fn kvm_node(scenario: &str) -> Result<Option<Node>> {
    if let Some(reason) = kvm_unusable_reason() {
        note(scenario, format!("SKIPPED (needs KVM): {reason}"));
        return Ok(None);
    }
    Node::start().map(Some)
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

    fn vmi(&self, namespace: &str, name: &str) -> Vmi {
        Vmi::new(namespace, name, &self.aggregator.grpc_url())
    }

    /// A launcher pod for `vmi` whose sidecar reports to this node's aggregator.
    fn pod(&self, config: PodConfig, vmi: Vmi) -> Result<LauncherPod> {
        LauncherPod::start(config, &vmi)
    }

    /// The VMI's series on /metrics now.
    fn exposed(&self, vmi: &Vmi) -> Result<Vec<Labels>> {
        Ok(self
            .aggregator
            .series()?
            .into_iter()
            .filter(|l| is_vmi(l, vmi))
            .collect())
    }

    /// The VMI's series in Inventory/List now.
    fn listed(&self, vmi: &Vmi) -> Result<Vec<Series>> {
        Ok(inventory_list(&self.aggregator.grpc_addr())?
            .into_iter()
            .filter(|s| {
                s.domain
                    .as_ref()
                    .is_some_and(|d| d.namespace == vmi.namespace && d.name == vmi.name)
            })
            .collect())
    }

    /// Waits until /metrics shows the VMI (`present`) or no longer does.
    fn wait_exposed(&self, vmi: &Vmi, present: bool, pod: &LauncherPod) -> Result<()> {
        let what = format!(
            "{}/{} {} /metrics",
            vmi.namespace,
            vmi.name,
            if present { "on" } else { "gone from" }
        );
        wait_until(APPEAR, &what, || {
            Ok((self.exposed(vmi)?.is_empty() != present).then_some(()))
        })
        .with_context(|| pod.diagnostics())
    }

    /// The VMI's series is on /metrics and in Inventory/List exactly once, as `hypervisor`,
    /// in `state`, and with the VMI's uid (`uid_required`) or, when it may be unknown, with
    /// no other uid.
    fn assert_series(
        &self,
        vmi: &Vmi,
        hypervisor: HypervisorType,
        state: DomainState,
        uid_required: bool,
        version_required: bool,
    ) -> Result<()> {
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
                "Inventory/List: uid {:?}, the VMI's metadata.uid is {:?}",
                domain.uid,
                vmi.uid
            );
        }
        Ok(())
    }

    /// "Appears only once the domain runs, never withdrawn while it runs": from the Watch
    /// stream and every /metrics change up to `until`. Returns how long after the domain
    /// started running the series was first on /metrics.
    fn assert_reported_once_running(
        &self,
        pod: &LauncherPod,
        start: &Start,
        until: SystemTime,
    ) -> Result<Duration> {
        let vmi = pod.vmi();
        let events = self.watch_events(vmi, until);
        let story = || self.story(pod, start.synced, until);
        let added: Vec<SystemTime> = events
            .iter()
            .filter(|(_, kind)| kind == "ADDED")
            .map(|(at, _)| *at)
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
                .any(|(_, kind)| kind == "REMOVED" || kind == "ENDED"),
            "the series must not be withdrawn while the domain runs:\n{}",
            story()
        );
        ensure!(
            added[0] >= start.defined,
            "the series was added {:?} before libvirt defined the domain:\n{}",
            start.defined.duration_since(added[0]).unwrap_or_default(),
            story()
        );
        ensure!(
            added[0] + SAME_BROADCAST >= start.running,
            "the series was added {:?} before the domain ran:\n{}",
            start.running.duration_since(added[0]).unwrap_or_default(),
            story()
        );

        let mut first_seen = None;
        for scrape in self.metrics.changes().iter().filter(|s| s.at <= until) {
            let present = scrape
                .series
                .as_ref()
                .is_some_and(|series| series.iter().any(|l| is_vmi(l, vmi)));
            match (first_seen, present) {
                (None, true) => {
                    ensure!(
                        scrape.at + SAME_BROADCAST >= start.running,
                        "/metrics showed the series {:?} before the domain ran:\n{}",
                        start.running.duration_since(scrape.at).unwrap_or_default(),
                        story()
                    );
                    first_seen = Some(scrape.at);
                }
                (Some(_), false) => {
                    bail!(
                        "/metrics lost the series while the domain ran:\n{}",
                        story()
                    )
                }
                _ => {}
            }
        }
        let first_seen = first_seen
            .with_context(|| format!("the series never reached /metrics:\n{}", story()))?;
        Ok(first_seen.duration_since(start.running).unwrap_or_default())
    }

    /// What libvirt, virt-launcher, the Watch stream and /metrics said about the pod's VMI
    /// up to `until`, in order, in seconds from `origin`.
    fn story(&self, pod: &LauncherPod, origin: SystemTime, until: SystemTime) -> String {
        let vmi = pod.vmi();
        let domain = vmi.domain();
        let mut lines: Vec<(SystemTime, String)> = Vec::new();
        for event in pod.handler().events() {
            let json = &event.json;
            if json["event"] == "libvirt" && json["domain"] == domain.as_str() {
                lines.push((
                    event.at,
                    format!("libvirt: {}", json["detail"].as_str().unwrap_or_default()),
                ));
            } else if json["event"] == "domain" {
                lines.push((
                    event.at,
                    format!(
                        "virt-launcher → virt-handler: {} {} ({})",
                        json["type"].as_str().unwrap_or_default(),
                        json["status"].as_str().unwrap_or_default(),
                        json["reason"].as_str().unwrap_or_default()
                    ),
                ));
            }
        }
        for (at, kind) in self.watch_events(vmi, until) {
            lines.push((at, format!("Inventory/Watch: {kind}")));
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
        let mut out = format!(
            "timeline of {}/{} (seconds from the first sync):\n",
            vmi.namespace, vmi.name
        );
        for (at, line) in lines.into_iter().filter(|(at, _)| *at <= until) {
            let offset = match at.duration_since(origin) {
                Ok(after) => after.as_secs_f64(),
                Err(before) => -before.duration().as_secs_f64(),
            };
            out.push_str(&format!("  {offset:+8.3}  {line}\n"));
        }
        out.push_str(&pod.diagnostics());
        out
    }

    /// The Watch stream's events of the VMI up to `until` (`ADDED`, `MODIFIED`, `REMOVED`),
    /// and `ENDED` for each end of the stream, which drops every series.
    fn watch_events(&self, vmi: &Vmi, until: SystemTime) -> Vec<(SystemTime, String)> {
        self.watch
            .seen()
            .into_iter()
            .filter_map(|seen| match seen {
                Watched::Event { at, kind, series } => series
                    .domain
                    .filter(|d| d.namespace == vmi.namespace && d.name == vmi.name)
                    .map(|_| (at, watch_kind(kind).to_owned())),
                Watched::Ended { at, .. } => Some((at, "ENDED".to_owned())),
            })
            .filter(|(at, _)| *at <= until)
            .collect()
    }
}

fn watch_kind(kind: Kind) -> &'static str {
    match kind {
        Kind::Added => "ADDED",
        Kind::Modified => "MODIFIED",
        Kind::Removed => "REMOVED",
        Kind::Unspecified => "UNSPECIFIED",
    }
}

fn is_vmi(labels: &Labels, vmi: &Vmi) -> bool {
    labels.get("namespace") == Some(&vmi.namespace) && labels.get("name") == Some(&vmi.name)
}

/// When a VM was first synced, then defined and running by libvirt's own events.
struct Start {
    synced: SystemTime,
    defined: SystemTime,
    running: SystemTime,
}

/// Syncs the VMI and waits until its domain is defined and runs.
fn start_vm(pod: &mut LauncherPod) -> Result<Start> {
    let synced = SystemTime::now();
    pod.sync()?;
    Ok(Start {
        synced,
        defined: pod.wait_libvirt("defined", synced, LIBVIRT_EVENT)?,
        running: pod.wait_libvirt("resumed", synced, LIBVIRT_EVENT)?,
    })
}

/// Keeps the VM running until [`HOLD`] after `running`.
fn hold(running: SystemTime) {
    let held = SystemTime::now()
        .duration_since(running)
        .unwrap_or_default();
    std::thread::sleep(HOLD.saturating_sub(held));
}

/// KillVirtualMachine, then: the domain stops, the series goes, and the sidecar, told by
/// the Shutdown hook, withdraws and exits 0.
fn kill_and_check_cleanup(node: &Node, pod: &mut LauncherPod) -> Result<()> {
    let vmi = pod.vmi().clone();
    let before = SystemTime::now();
    pod.kill_vm()?;
    pod.wait_libvirt("stopped", before, LIBVIRT_EVENT)?;
    node.wait_exposed(&vmi, false, pod)?;
    ensure!(
        node.listed(&vmi)?.is_empty(),
        "Inventory/List still has {}/{} after the VM stopped",
        vmi.namespace,
        vmi.name
    );
    check_sidecar_exit(pod)
}

/// The sidecar exits 0 after virt-launcher's Shutdown hook.
fn check_sidecar_exit(pod: &mut LauncherPod) -> Result<()> {
    let status = pod.wait_sidecar_exit(SIDECAR_EXIT)?;
    ensure!(
        status.success(),
        "the sidecar should exit 0 after the Shutdown hook, exited {status}:\n{}",
        pod.diagnostics()
    );
    ensure!(
        pod.sidecar_log().to_lowercase().contains("shutdown hook"),
        "the sidecar exited without logging the Shutdown hook:\n{}",
        pod.sidecar_log()
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

/// The emulated pod of a cluster with `useEmulation`: no /dev/kvm, `--allow-emulation`.
fn emulated() -> PodConfig {
    PodConfig {
        kvm: false,
        use_emulation: true,
        ..PodConfig::new(Mode::NonRoot)
    }
}

/// Starts the pod's VM and keeps it running for [`HOLD`]; checks its series on /metrics and
/// in Inventory/List and that it appeared once, once the domain ran, and stayed; prints how
/// long it took to reach /metrics.
fn run_and_check(
    scenario: &str,
    node: &Node,
    pod: &mut LauncherPod,
    hypervisor: HypervisorType,
) -> Result<Start> {
    let start = start_vm(pod)?;
    // What KubeVirt's converter made of the VMI, as virt-launcher tells virt-handler.
    let domain_type = pod.domain_type()?;
    let expected = match hypervisor {
        HypervisorType::Kvm => "kvm",
        HypervisorType::QemuTcg => "qemu",
        other => bail!("no domain type for {other:?}"),
    };
    ensure!(
        domain_type == expected,
        "virt-launcher defined a {domain_type:?} domain, the scenario expects {expected:?}"
    );
    check_running_series(scenario, "domain running", node, pod, &start, hypervisor)?;
    Ok(start)
}

/// Checks that the pod's series reaches /metrics and Inventory/List, keeps the domain
/// running for [`HOLD`], checks that the series appeared once, once the domain ran, and
/// stayed; prints how long it took from `running` (what the domain's start was) to /metrics.
fn check_running_series(
    scenario: &str,
    running: &str,
    node: &Node,
    pod: &LauncherPod,
    start: &Start,
    hypervisor: HypervisorType,
) -> Result<()> {
    let vmi = pod.vmi();
    node.wait_exposed(vmi, true, pod)?;
    node.assert_series(vmi, hypervisor, DomainState::Running, true, true)?;
    hold(start.running);
    let latency = node.assert_reported_once_running(pod, start, SystemTime::now())?;
    node.assert_series(vmi, hypervisor, DomainState::Running, true, true)?;
    note(
        scenario,
        format!("{running} → series on /metrics: {latency:.0?}"),
    );
    Ok(())
}

/// Waits until the pod's series is back on /metrics after `what` happened at `since`, and
/// prints how long that took.
fn wait_back(
    scenario: &str,
    node: &Node,
    pod: &LauncherPod,
    since: SystemTime,
    what: &str,
) -> Result<()> {
    node.wait_exposed(pod.vmi(), true, pod)?;
    let back = SystemTime::now().duration_since(since).unwrap_or_default();
    note(
        scenario,
        format!("{what} → series back on /metrics: {back:.0?}"),
    );
    Ok(())
}

/// Starts a VM in `mode` and checks everything a start and a kill must show.
fn start_and_kill(scenario: &str, mode: Mode) -> Result<()> {
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let mut pod = node.pod(PodConfig::new(mode), node.vmi("default", "vm-start"))?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;
    ensure!(
        !logged_hook_fallback(&pod.sidecar_log()),
        "the sidecar has the libvirt mount but logged the hook fallback:\n{}",
        pod.sidecar_log()
    );
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn non_root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill()
-> Result<()> {
    start_and_kill("non-root start and kill", Mode::NonRoot)
}

#[test]
fn root_virt_launcher_reports_one_kvm_series_once_running_and_withdraws_it_at_kill() -> Result<()> {
    start_and_kill("root start and kill", Mode::Root)
}

#[test]
fn emulation_without_kvm_reports_qemu_tcg() -> Result<()> {
    let scenario = "useEmulation without /dev/kvm";
    let node = Node::start()?;
    let mut pod = node.pod(emulated(), node.vmi("emulated", "vm-tcg"))?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::QemuTcg)?;
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn pause_and_unpause_keep_the_series_and_show_its_state() -> Result<()> {
    let scenario = "pause and unpause";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let mut pod = node.pod(
        PodConfig::new(Mode::NonRoot),
        node.vmi("default", "vm-pause"),
    )?;
    let start = run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;
    let vmi = pod.vmi().clone();
    for (paused, lifecycle, state) in [
        (true, "suspended", DomainState::Paused),
        (false, "resumed", DomainState::Running),
    ] {
        let before = SystemTime::now();
        if paused {
            pod.pause()?;
        } else {
            pod.unpause()?;
        }
        pod.wait_libvirt(lifecycle, before, LIBVIRT_EVENT)?;
        wait_until(APPEAR, &format!("Inventory/List to show {state:?}"), || {
            Ok(node
                .listed(&vmi)?
                .iter()
                .any(|s| s.domain.as_ref().is_some_and(|d| d.state() == state))
                .then_some(()))
        })
        .with_context(|| pod.diagnostics())?;
        node.assert_series(&vmi, HypervisorType::Kvm, state, true, true)?;
    }
    // Paused is still running for the series: one add, updates, no withdrawal.
    node.assert_reported_once_running(&pod, &start, SystemTime::now())?;
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn a_guest_that_powers_itself_off_is_withdrawn_and_the_sidecar_exits() -> Result<()> {
    let scenario = "guest powers itself off";
    let node = Node::start()?;
    // Emulated, so that it runs on machines without KVM too: the guest's own shutdown does
    // not depend on the accelerator.
    let mut config = emulated();
    config
        .host_disks
        .insert("poweroff".into(), power_off_disk(HOLD.as_secs() as u32));
    let vmi = node.vmi("default", "vm-poweroff").host_disk("poweroff");
    let mut pod = node.pod(config, vmi.clone())?;
    let start = start_vm(&mut pod)?;
    node.wait_exposed(&vmi, true, &pod)?;
    node.assert_series(
        &vmi,
        HypervisorType::QemuTcg,
        DomainState::Running,
        true,
        true,
    )?;

    // The guest's own shutdown: libvirt's `shutdown` event, then QEMU exits (`stopped`).
    let shutting_down = pod.wait_libvirt("shutdown", start.running, LIBVIRT_EVENT)?;
    pod.wait_libvirt("stopped", shutting_down, LIBVIRT_EVENT)?;
    let latency = node.assert_reported_once_running(&pod, &start, shutting_down)?;
    note(
        scenario,
        format!("domain running → series on /metrics: {latency:.0?}"),
    );
    pod.handler()
        .wait_for(
            "virt-launcher to tell virt-handler that the guest shut down",
            LIBVIRT_EVENT,
            |e| e.is_notified("Shutoff") && e.json["reason"] == "Shutdown",
        )
        .with_context(|| pod.diagnostics())?;
    node.wait_exposed(&vmi, false, &pod)?;
    ensure!(
        node.listed(&vmi)?.is_empty(),
        "Inventory/List still has the VMI"
    );
    check_sidecar_exit(&mut pod)
}

#[test]
fn without_the_libvirt_mount_the_hook_fallback_reports_from_definition_to_shutdown() -> Result<()> {
    let scenario = "no libvirt mount (hook fallback)";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let config = PodConfig {
        libvirt_mount: false,
        ..PodConfig::new(Mode::NonRoot)
    };
    let vmi = node.vmi("default", "vm-fallback");
    let mut pod = node.pod(config, vmi.clone())?;
    let start = start_vm(&mut pod)?;
    node.wait_exposed(&vmi, true, &pod)?;
    // From the defined XML and the VMI JSON only: no version without libvirt.
    node.assert_series(&vmi, HypervisorType::Kvm, DomainState::Running, true, false)?;
    hold(start.running);

    let until = SystemTime::now();
    let events = node.watch_events(&vmi, until);
    let added: Vec<SystemTime> = events
        .iter()
        .filter(|(_, kind)| kind == "ADDED")
        .map(|(at, _)| *at)
        .collect();
    ensure!(
        added.len() == 1 && !events.iter().any(|(_, k)| k == "REMOVED" || k == "ENDED"),
        "the fallback series should be added once and kept:\n{}",
        node.story(&pod, start.synced, until)
    );
    ensure!(
        added[0] + SAME_BROADCAST >= start.defined,
        "the fallback series was added {:?} before libvirt defined the domain:\n{}",
        start.defined.duration_since(added[0]).unwrap_or_default(),
        node.story(&pod, start.synced, until)
    );
    ensure!(
        logged_hook_fallback(&pod.sidecar_log()),
        "the sidecar should say that it reports from the hook because libvirt is out of \
         reach:\n{}",
        pod.sidecar_log()
    );
    let first_seen = node
        .metrics
        .changes()
        .into_iter()
        .find(|s| {
            s.series
                .as_ref()
                .is_some_and(|v| v.iter().any(|l| is_vmi(l, &vmi)))
        })
        .context("the series never reached /metrics")?
        .at;
    note(
        scenario,
        format!(
            "domain defined → series on /metrics: {:.0?} (running at +{:.0?})",
            first_seen.duration_since(start.defined).unwrap_or_default(),
            start
                .running
                .duration_since(start.defined)
                .unwrap_or_default()
        ),
    );
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn a_sidecar_killed_and_restarted_mid_run_reports_the_vm_again() -> Result<()> {
    let scenario = "sidecar killed and restarted";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let vmi = node.vmi("default", "vm-sidecar-restart");
    let mut pod = node.pod(PodConfig::new(Mode::NonRoot), vmi.clone())?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;

    pod.kill_sidecar();
    // Its stream closed with it: the aggregator drops the series at once.
    node.wait_exposed(&vmi, false, &pod)?;
    let restarted = SystemTime::now();
    pod.restart_sidecar()?;
    wait_back(scenario, &node, &pod, restarted, "sidecar restarted")?;
    // No OnDefineDomain reaches the new process: the uid may be unknown, never wrong.
    node.assert_series(&vmi, HypervisorType::Kvm, DomainState::Running, false, true)?;
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn an_aggregator_restarted_mid_run_gets_the_series_back() -> Result<()> {
    let scenario = "aggregator restarted";
    let Some(mut node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let vmi = node.vmi("default", "vm-aggregator-restart");
    let mut pod = node.pod(PodConfig::new(Mode::NonRoot), vmi.clone())?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;

    let restarted = SystemTime::now();
    node.aggregator.restart()?;
    wait_back(scenario, &node, &pod, restarted, "aggregator restarted")?;
    node.assert_series(&vmi, HypervisorType::Kvm, DomainState::Running, true, true)?;
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn a_vmi_started_paused_has_no_series_until_it_is_unpaused() -> Result<()> {
    let scenario = "startStrategy Paused";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let vmi = node.vmi("default", "vm-start-paused").start_paused();
    let mut pod = node.pod(PodConfig::new(Mode::NonRoot), vmi.clone())?;
    let synced = SystemTime::now();
    pod.sync()?;
    let defined = pod.wait_libvirt("defined", synced, LIBVIRT_EVENT)?;
    pod.wait_libvirt("started", synced, LIBVIRT_EVENT)?;
    // Started, its CPUs never ran: give the sidecar every chance to report it wrongly.
    std::thread::sleep(HOLD);
    ensure!(
        node.exposed(&vmi)?.is_empty() && node.listed(&vmi)?.is_empty(),
        "a VMI started paused has never run; it must have no series yet:\n{}",
        node.story(&pod, synced, SystemTime::now())
    );

    let unpaused = SystemTime::now();
    pod.unpause()?;
    let start = Start {
        synced,
        defined,
        running: pod.wait_libvirt("resumed", unpaused, LIBVIRT_EVENT)?,
    };
    check_running_series(
        scenario,
        "domain running (unpaused)",
        &node,
        &pod,
        &start,
        HypervisorType::Kvm,
    )?;
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn deleting_the_pod_withdraws_the_series_and_stops_the_vm_within_its_grace_period() -> Result<()> {
    let scenario = "pod deleted (SIGTERM to every container)";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let grace = 5;
    let vmi = node.vmi("default", "vm-pod-deleted").grace_period(grace);
    let mut pod = node.pod(PodConfig::new(Mode::NonRoot), vmi.clone())?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;

    let before = SystemTime::now();
    pod.terminate()?;
    let status = pod.wait_sidecar_exit(SIDECAR_EXIT)?;
    ensure!(
        status.success(),
        "the sidecar should withdraw and exit 0 on SIGTERM, exited {status}:\n{}",
        pod.diagnostics()
    );
    node.wait_exposed(&vmi, false, &pod)?;
    // virt-launcher stops the VM itself once the grace period is over (this guest has no
    // operating system to act on ACPI).
    let stopped = pod.wait_libvirt(
        "stopped",
        before,
        Duration::from_secs(u64::from(grace)) + LIBVIRT_EVENT,
    )?;
    note(
        scenario,
        format!(
            "SIGTERM → domain stopped by virt-launcher: {:.0?} (grace period {grace} s)",
            stopped.duration_since(before).unwrap_or_default()
        ),
    );
    Ok(())
}

#[test]
fn a_vmi_being_deleted_keeps_its_series_while_the_guest_runs_out_its_grace_period() -> Result<()> {
    let scenario = "VMI deleted (graceful shutdown, then kill)";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let grace = 5;
    let vmi = node.vmi("default", "vm-deleted").grace_period(grace);
    let mut pod = node.pod(PodConfig::new(Mode::NonRoot), vmi.clone())?;
    let start = run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;

    // virt-handler's deletion: ACPI shutdown first; this guest has no operating system to
    // act on it, so it runs on through the grace period, and so does its series.
    pod.shutdown_vm()?;
    std::thread::sleep(Duration::from_secs(u64::from(grace)));
    node.assert_reported_once_running(&pod, &start, SystemTime::now())?;
    node.assert_series(&vmi, HypervisorType::Kvm, DomainState::Running, true, true)?;
    // Then the kill, once the grace period is over.
    kill_and_check_cleanup(&node, &mut pod)
}

#[test]
fn two_pods_on_one_node_have_one_series_each() -> Result<()> {
    let scenario = "two pods on one node";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let mut first = node.pod(PodConfig::new(Mode::NonRoot), node.vmi("team-a", "vm-one"))?;
    let mut second = node.pod(PodConfig::new(Mode::NonRoot), node.vmi("team-b", "vm-two"))?;
    run_and_check(scenario, &node, &mut first, HypervisorType::Kvm)?;
    let second_start = run_and_check(scenario, &node, &mut second, HypervisorType::Kvm)?;
    ensure!(
        node.aggregator.series()?.len() == 2,
        "/metrics should have exactly the two VMIs: {:?}",
        node.aggregator.series()?
    );

    kill_and_check_cleanup(&node, &mut first)?;
    // The other pod's series was never touched.
    node.assert_reported_once_running(&second, &second_start, SystemTime::now())?;
    node.assert_series(
        second.vmi(),
        HypervisorType::Kvm,
        DomainState::Running,
        true,
        true,
    )?;
    kill_and_check_cleanup(&node, &mut second)
}

#[test]
fn a_hook_sidecar_that_starts_after_virt_launcher_is_still_collected() -> Result<()> {
    let scenario = "sidecar container starts late";
    let Some(node) = kvm_node(scenario)? else {
        return Ok(());
    };
    let vmi = node.vmi("default", "vm-late-sidecar");
    // Containers of a pod start in no guaranteed order; virt-launcher polls for the hook
    // sockets before it starts anything.
    let mut pod =
        LauncherPod::start_with(PodConfig::new(Mode::NonRoot), &vmi, Duration::from_secs(3))?;
    run_and_check(scenario, &node, &mut pod, HypervisorType::Kvm)?;
    kill_and_check_cleanup(&node, &mut pod)
}
