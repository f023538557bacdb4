//! Live migration between two private libvirt daemons, each playing a node with
//! its own aggregator, as KubeVirt moves a VMI: the target's domain arrives
//! paused and is reported only once it runs; the source's stops with reason
//! `migrated` and is withdrawn at once.

use std::time::Duration;

use anyhow::Result;
use e2e::binaries::{Aggregator, Sidecar};
use e2e::libvirt::{GuestKind, LibvirtDaemon};

const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn a_migrating_vmi_is_reported_where_it_runs() -> Result<()> {
    let source = LibvirtDaemon::start()?;
    let target = LibvirtDaemon::start()?;
    let node_a = Aggregator::start("node-a")?;
    let node_b = Aggregator::start("node-b")?;
    let _on_a = Sidecar::start(&source.uri(), &node_a.grpc_url(), &[])?;
    let _on_b = Sidecar::start(&target.uri(), &node_b.grpc_url(), &[])?;
    source.start_guest("default_vm-mig", GuestKind::Tcg, false)?;
    node_a.wait_for_names(&["vm-mig"], SETTLE)?;

    // Migrate and leave the guest paused on the target, as it is until KubeVirt resumes it.
    source.migrate_guest("default_vm-mig", &target, true)?;
    let took = node_a.wait_for_names(&[], SETTLE)?;
    eprintln!("source stopped (migrated) → its series gone: {took:?} after virsh migrate returned");

    // A guest started on the target after the migration proves the target's sidecar has
    // handled the migration's events; the paused arrival must not be reported.
    target.start_guest("default_vm-other", GuestKind::Tcg, false)?;
    node_b.wait_for_names(&["vm-other"], SETTLE)?;
    assert_eq!(node_b.names()?, ["vm-other"]);

    target.resume_guest("default_vm-mig")?;
    node_b.wait_for_names(&["vm-mig", "vm-other"], SETTLE)?;
    let moved = node_b
        .series()?
        .into_iter()
        .find(|labels| labels["name"] == "vm-mig")
        .expect("vm-mig on node-b");
    assert_eq!(moved["node"], "node-b");
    assert_eq!(moved["hypervisor_type"], "qemu-tcg");

    // And back, without stopping on the way: it ends up on node-a only.
    target.migrate_guest("default_vm-mig", &source, false)?;
    node_a.wait_for_names(&["vm-mig"], SETTLE)?;
    node_b.wait_for_names(&["vm-other"], SETTLE)?;
    Ok(())
}
