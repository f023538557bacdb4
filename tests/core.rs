//! The working core end to end: a private libvirt daemon with real QEMU guests,
//! the real launcher-sidecar and node-aggregator, and the real clients an
//! operator uses (Prometheus, promtool, grpcurl).

use std::time::Duration;

use anyhow::{Context, Result};
use e2e::binaries::{Aggregator, Sidecar};
use e2e::libvirt::{GuestKind, LibvirtDaemon, skip_without_kvm};
use e2e::prometheus::Prometheus;
use e2e::tools::{grpcurl, promtool_check_metrics, wait_until};

/// Generous: a busy 2-core CI machine boots QEMU slowly. The latency itself is
/// measured by `make bench`, not asserted here.
const APPEAR: Duration = Duration::from_secs(20);

fn sidecar_for(daemon: &LibvirtDaemon, aggregator: &Aggregator, domain: &str) -> Result<Sidecar> {
    Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &["--domain", domain])
}

/// "QEMU 7.2.0" in `virsh version` → "7.2.0", the hypervisor_version label.
fn qemu_version(daemon: &LibvirtDaemon) -> Result<String> {
    let out = daemon.virsh(&["version"])?;
    out.lines()
        .find_map(|line| line.trim().strip_prefix("Running hypervisor: QEMU "))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no QEMU version in `virsh version`:\n{out}"))
}

#[test]
fn guests_are_reported_with_their_hypervisor_and_labels() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    daemon.start_guest("default_vm-tcg", GuestKind::Tcg, false)?;
    let _tcg = sidecar_for(&daemon, &aggregator, "default_vm-tcg")?;
    let took = aggregator.wait_for_names(&["vm-tcg"], APPEAR)?;
    eprintln!("TCG guest running → series on /metrics: {took:?} (includes sidecar start)");

    let version = qemu_version(&daemon)?;
    let series = aggregator.series()?;
    let labels: Vec<(&str, &str)> = series[0]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("hypervisor_type", "qemu-tcg"),
            ("hypervisor_version", version.as_str()),
            ("name", "vm-tcg"),
            ("namespace", "default"),
            ("node", "node-1"),
        ]
    );

    if !skip_without_kvm("the KVM guest")? {
        daemon.start_guest("default_vm-kvm", GuestKind::Kvm, false)?;
        let _kvm = sidecar_for(&daemon, &aggregator, "default_vm-kvm")?;
        aggregator.wait_for_names(&["vm-kvm", "vm-tcg"], APPEAR)?;
        let kvm = aggregator
            .series()?
            .into_iter()
            .find(|labels| labels["name"] == "vm-kvm")
            .context("vm-kvm vanished")?;
        assert_eq!(kvm["hypervisor_type"], "kvm");
        assert_eq!(kvm["namespace"], "default");
    }
    Ok(())
}

#[test]
fn a_stopped_guest_or_a_killed_sidecar_takes_its_series_away() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    for name in ["default_vm-a", "default_vm-b", "default_vm-c"] {
        daemon.start_guest(name, GuestKind::Tcg, false)?;
    }
    let _a = sidecar_for(&daemon, &aggregator, "default_vm-a")?;
    let mut b = sidecar_for(&daemon, &aggregator, "default_vm-b")?;
    let mut c = sidecar_for(&daemon, &aggregator, "default_vm-c")?;
    aggregator.wait_for_names(&["vm-a", "vm-b", "vm-c"], APPEAR)?;

    daemon.destroy_guest("default_vm-a")?;
    let took = aggregator.wait_for_names(&["vm-b", "vm-c"], APPEAR)?;
    eprintln!("guest destroyed → series gone: {took:?}");

    // No withdrawal, no clean end of stream: the aggregator notices the reset.
    b.kill();
    aggregator.wait_for_names(&["vm-c"], APPEAR)?;
    assert!(
        daemon
            .running_domains()?
            .contains(&"default_vm-b".to_string())
    );

    // SIGTERM: withdraw, close the stream, exit 0.
    let status = c.stop_with(libc::SIGTERM, Duration::from_secs(10))?;
    assert!(
        status.success(),
        "sidecar exit on SIGTERM: {status}\n{}",
        c.log()
    );
    assert_eq!(aggregator.names()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn restarting_the_aggregator_restores_every_series() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let mut aggregator = Aggregator::start("node-1")?;
    daemon.start_guest("default_vm-a", GuestKind::Tcg, false)?;
    daemon.start_guest("prod_vm-b", GuestKind::Tcg, false)?;
    let _a = sidecar_for(&daemon, &aggregator, "default_vm-a")?;
    let _b = sidecar_for(&daemon, &aggregator, "prod_vm-b")?;
    aggregator.wait_for_names(&["vm-a", "vm-b"], APPEAR)?;

    aggregator.kill();
    // Changes while it is down must show once it is back.
    daemon.destroy_guest("default_vm-a")?;
    aggregator.restart()?;
    let took = aggregator.wait_for_names(&["vm-b"], APPEAR)?;
    eprintln!("aggregator restarted → series back: {took:?}");
    assert_eq!(aggregator.series()?[0]["namespace"], "prod");
    Ok(())
}

#[test]
fn restarting_libvirt_keeps_the_series_and_later_events_still_arrive() -> Result<()> {
    let mut daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    daemon.start_guest("default_vm-a", GuestKind::Tcg, false)?;
    daemon.start_guest("default_vm-b", GuestKind::Tcg, false)?;
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    aggregator.wait_for_names(&["vm-a", "vm-b"], APPEAR)?;

    daemon.kill();
    // The VMs run on without their daemon, and so do their series.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(aggregator.names()?, ["vm-a", "vm-b"]);
    daemon.restart()?;
    assert_eq!(aggregator.names()?, ["vm-a", "vm-b"]);

    // Events from the restarted daemon arrive on the new connection.
    daemon.destroy_guest("default_vm-b")?;
    aggregator
        .wait_for_names(&["vm-a"], APPEAR)
        .with_context(|| sidecar.log())?;
    daemon.start_guest("default_vm-c", GuestKind::Tcg, false)?;
    aggregator
        .wait_for_names(&["vm-a", "vm-c"], APPEAR)
        .with_context(|| sidecar.log())?;
    Ok(())
}

#[test]
fn the_sidecar_waits_for_libvirt_to_come_up() -> Result<()> {
    let mut daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    daemon.start_guest("default_vm-a", GuestKind::Tcg, false)?;
    daemon.kill();
    // As in virt-launcher: the sidecar is up before the daemon is.
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(aggregator.names()?.is_empty());
    daemon.restart()?;
    aggregator
        .wait_for_names(&["vm-a"], APPEAR)
        .with_context(|| sidecar.log())?;
    Ok(())
}

#[test]
fn a_guest_started_paused_is_reported_only_once_it_runs() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    daemon.start_guest("default_vm-running", GuestKind::Tcg, false)?;
    aggregator.wait_for_names(&["vm-running"], APPEAR)?;

    // Like a migration target: defined and started, but not running here yet.
    daemon.start_guest("default_vm-target", GuestKind::Tcg, true)?;
    // The running guest's series proves events are flowing; give the paused one time to
    // (wrongly) show up before checking that it did not.
    daemon.suspend_guest("default_vm-running")?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        aggregator.names()?,
        ["vm-running"],
        "a guest paused after it ran keeps its series; one started paused has none\n{}",
        sidecar.log()
    );

    daemon.resume_guest("default_vm-target")?;
    aggregator.wait_for_names(&["vm-running", "vm-target"], APPEAR)?;
    Ok(())
}

#[test]
fn a_guest_redefined_while_shut_off_is_reported_with_its_new_hypervisor() -> Result<()> {
    if skip_without_kvm("the redefinition, which switches a guest from TCG to KVM")? {
        return Ok(());
    }
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    daemon.start_guest("default_vm-a", GuestKind::Tcg, false)?;
    aggregator.wait_for_names(&["vm-a"], APPEAR)?;
    assert_eq!(aggregator.series()?[0]["hypervisor_type"], "qemu-tcg");
    daemon.destroy_guest("default_vm-a")?;
    aggregator.wait_for_names(&[], APPEAR)?;

    // The sidecar reports a start from what it read of the domain before; a redefinition
    // must replace that, or the start would first be reported with the old hypervisor.
    daemon.start_guest("default_vm-a", GuestKind::Kvm, false)?;
    aggregator.wait_for_names(&["vm-a"], APPEAR)?;
    assert_eq!(aggregator.series()?[0]["hypervisor_type"], "kvm");
    let upserts = aggregator.metric(
        "kubevirt_hypervisor_aggregator_reports_total",
        &[("action", "upsert")],
    )?;
    assert_eq!(
        upserts,
        Some(2.0),
        "one upsert per start, none correcting a wrong one\n{}",
        sidecar.log()
    );
    Ok(())
}

#[test]
fn prometheus_promtool_and_grpcurl_read_the_aggregator() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    for name in ["default_vm-a", "default_vm-b", "other_vm-c"] {
        daemon.start_guest(name, GuestKind::Tcg, false)?;
    }
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    aggregator.wait_for_names(&["vm-a", "vm-b", "vm-c"], APPEAR)?;

    // promtool's linter finds nothing to complain about.
    promtool_check_metrics(&aggregator.metrics()?)?;

    // A real Prometheus scrapes it and answers the fleet question.
    let prometheus = Prometheus::start(&[aggregator.metrics_target()])?;
    let query = "count by (hypervisor_type) (kubevirt_vmi_hypervisor_info)";
    let counts = prometheus.wait_for_query(query, Duration::from_secs(30), |result| {
        result.len() == 1 && result[0].1 == 3.0
    })?;
    assert_eq!(
        counts[0].0.get("hypervisor_type").map(String::as_str),
        Some("qemu-tcg")
    );
    let per_namespace =
        prometheus.query("count by (namespace) (kubevirt_vmi_hypervisor_info{node=\"node-1\"})")?;
    let mut per_namespace: Vec<(String, f64)> = per_namespace
        .into_iter()
        .map(|(labels, value)| (labels["namespace"].clone(), value))
        .collect();
    per_namespace.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        per_namespace,
        [("default".into(), 2.0), ("other".into(), 1.0)]
    );

    // grpcurl finds the services by reflection and reads the inventory.
    let services = grpcurl(&["-plaintext", &aggregator.grpc_addr(), "list"])?;
    for service in [
        "kubevirt.hypervisor.v1.HypervisorReporter",
        "kubevirt.hypervisor.v1.Inventory",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from:\n{services}"
        );
    }
    let listed = grpcurl(&[
        "-plaintext",
        &aggregator.grpc_addr(),
        "kubevirt.hypervisor.v1.Inventory/List",
    ])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)
        .with_context(|| format!("Inventory/List output:\n{listed}"))?;
    assert_eq!(listed["node"], "node-1");
    let mut names: Vec<&str> = listed["series"]
        .as_array()
        .context("no series in Inventory/List")?
        .iter()
        .filter_map(|s| s["domain"]["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["vm-a", "vm-b", "vm-c"]);
    let health = grpcurl(&[
        "-plaintext",
        &aggregator.grpc_addr(),
        "grpc.health.v1.Health/Check",
    ])?;
    assert!(health.contains("SERVING"), "{health}");

    // Stopping everything leaves Prometheus with nothing to count.
    drop(sidecar);
    wait_until(
        Duration::from_secs(30),
        "the series to leave Prometheus",
        || Ok(prometheus.query(query)?.is_empty().then_some(())),
    )?;
    Ok(())
}

#[test]
fn a_sidecar_refused_for_a_limit_catches_up_on_the_same_stream() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    // Two reports a second: the five guests' first reports cannot all get in at once.
    let aggregator = Aggregator::start_with("node-1", &["--max-reports-per-second", "2"])?;
    let names = ["vm-0", "vm-1", "vm-2", "vm-3", "vm-4"];
    for name in names {
        daemon.start_guest(&format!("default_{name}"), GuestKind::Tcg, false)?;
    }
    let sidecar = Sidecar::start(&daemon.uri(), &aggregator.grpc_url(), &[])?;
    let took = aggregator
        .wait_for_names(&names, Duration::from_secs(60))
        .with_context(|| sidecar.log())?;
    eprintln!("five reports at two a second: all in after {took:?}");
    let log = sidecar.log();
    assert!(log.contains("refused a report"), "no refusal seen:\n{log}");
    assert_eq!(
        log.matches("streaming to the aggregator").count(),
        1,
        "a refusal must not cost the stream:\n{log}"
    );
    let hits = aggregator.metric(
        "kubevirt_hypervisor_aggregator_limit_hits_total",
        &[("limit", "reports_per_second")],
    )?;
    assert!(hits.is_some_and(|hits| hits > 0.0), "limit hits: {hits:?}");
    Ok(())
}
