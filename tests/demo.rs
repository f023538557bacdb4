//! `make demo`: the whole path on this machine, printed as an operator sees it.
//!
//! A private libvirt daemon boots two tiny guests named like KubeVirt domains,
//! one sidecar per guest reports to a node-aggregator, a real Prometheus scrapes
//! it, and grpcurl reads the inventory. Everything stops when the demo ends.

use std::time::Duration;

use anyhow::Result;
use e2e::binaries::{Aggregator, Sidecar};
use e2e::libvirt::{GuestKind, LibvirtDaemon, kvm_unusable_reason};
use e2e::prometheus::Prometheus;
use e2e::tools::grpcurl;

fn main() -> Result<()> {
    println!("== starting a private libvirt daemon (as the unprivileged user kvhm-test)");
    let daemon = LibvirtDaemon::start()?;
    let mut guests = vec![("default_vm-tcg", GuestKind::Tcg)];
    match kvm_unusable_reason() {
        None => guests.insert(0, ("default_vm-kvm", GuestKind::Kvm)),
        Some(reason) => println!("   no KVM guest: {reason}"),
    }

    let aggregator = Aggregator::start("demo-node")?;
    println!(
        "== node-aggregator: gRPC {}, metrics {}",
        aggregator.grpc_addr(),
        aggregator.url("/metrics")
    );
    let mut sidecars = Vec::new();
    for (name, kind) in &guests {
        daemon.start_guest(name, *kind, false)?;
        println!(
            "== guest {name} booted with <domain type='{}'>; starting its sidecar",
            kind.domain_type()
        );
        sidecars.push(Sidecar::start(
            &daemon.uri(),
            &aggregator.grpc_url(),
            &["--domain", name],
        )?);
    }
    let names: Vec<&str> = guests
        .iter()
        .map(|(name, _)| &name["default_".len()..])
        .collect();
    aggregator.wait_for_names(&names, Duration::from_secs(30))?;

    println!("\n== curl {}", aggregator.url("/metrics"));
    for line in aggregator.metrics()?.lines() {
        if line.contains("kubevirt_vmi_hypervisor_info") {
            println!("{line}");
        }
    }

    let prometheus = Prometheus::start(&[aggregator.metrics_target()])?;
    let query = "count by (hypervisor_type) (kubevirt_vmi_hypervisor_info)";
    let result = prometheus.wait_for_query(query, Duration::from_secs(30), |result| {
        result.iter().map(|(_, count)| count).sum::<f64>() == guests.len() as f64
    })?;
    println!("\n== Prometheus: {query}");
    for (labels, count) in result {
        println!(
            "{{hypervisor_type=\"{}\"}} {count}",
            labels
                .get("hypervisor_type")
                .map(String::as_str)
                .unwrap_or("")
        );
    }

    println!(
        "\n== grpcurl -plaintext {} kubevirt.hypervisor.v1.Inventory/List",
        aggregator.grpc_addr()
    );
    print!(
        "{}",
        grpcurl(&[
            "-plaintext",
            &aggregator.grpc_addr(),
            "kubevirt.hypervisor.v1.Inventory/List"
        ])?
    );

    println!(
        "\n== cleaning up: guests destroyed, daemon, sidecars, aggregator and Prometheus stopped"
    );
    drop(sidecars);
    Ok(())
}
