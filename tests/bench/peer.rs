//! The bench's fifth part, the peer side by side. What an operator would run instead for
//! per-VM libvirt metrics on a node is an exporter that reads libvirt at every scrape:
//! Debian's `prometheus-libvirt-exporter` (kumina's libvirt_exporter 0.2.0). For each
//! number of guests it runs against the same private libvirt daemon and the same running
//! TCG guests as one sidecar per guest and their aggregator, all at once, and the two are
//! measured alike: `/metrics` latency, CPU per scrape, memory, how long a stopped VM stays
//! on `/metrics`, and whether the hypervisor type is exposed at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, Sidecar};
use e2e::libvirt::{GuestKind, LibvirtDaemon};
use e2e::tools::{free_port, http_get, wait_until};

use crate::http::HttpConn;
use crate::procfs::{self, Memory};
use crate::table::{SideBySide, mib, millis, ms, percentile};
use crate::{ChildGuard, label_values, virsh, vmi_names};

const EXPORTER: &str = "prometheus-libvirt-exporter";
/// The exporter's series that every running domain gets, whatever its devices.
const EXPORTER_DOMAIN_SERIES: &str = "libvirt_domain_info_virtual_cpus{";
/// What one more running guest and its sidecar need, with room: the TCG QEMU of a 64 MiB
/// guest and a sidecar are well under it.
const MEMORY_PER_GUEST: u64 = 160 << 20;
/// Left for everything else on the machine (other engineers' builds and guests included).
const MEMORY_SPARE: u64 = 2 << 30;
const WARM_UP: usize = 5;

pub struct PeerConfig {
    /// Numbers of running guests to compare at.
    pub guests: Vec<usize>,
    /// Timed scrapes of each side per number of guests.
    pub scrapes: usize,
    /// Guests stopped one by one at the end, to time how long each stays on /metrics.
    pub stops: usize,
}

/// Runs the comparison at each number of guests the machine holds; returns the notes to
/// print under the table.
pub fn peer(
    runtime: &tokio::runtime::Runtime,
    config: &PeerConfig,
    table: &mut SideBySide,
) -> Result<Vec<String>> {
    let version = exporter_version()?;
    for &guests in &config.guests {
        let available = procfs::mem_available()?;
        let needed = guests as u64 * MEMORY_PER_GUEST + MEMORY_SPARE;
        if available < needed {
            eprintln!(
                "bench: peer with {guests} guests skipped: {} available, {} needed",
                mib(available as f64),
                mib(needed as f64)
            );
            table.row(
                "skipped: the machine has too little memory free",
                guests.to_string(),
                format!("{} available", mib(available as f64)),
                format!("{} needed", mib(needed as f64)),
            );
            continue;
        }
        compare(runtime, guests, config, table)?;
    }
    Ok(vec![
        format!(
            "Side by side: {EXPORTER} {version} (Debian) and node-aggregator with one \
             launcher-sidecar per guest (`--no-hooks --domain`), against one private \
             libvirt daemon (libvirtd pinned to one CPU) with that many running TCG guests, \
             all at once. /metrics: one kept-alive connection per side, {} timed GETs each, \
             interleaved, after {WARM_UP} warm-up GETs. CPU: schedstat of the processes over \
             the GETs less the same processes over an idle window of the same length, per \
             GET. Memory after the GETs, from smaps_rollup: private = Private_Clean + \
             Private_Dirty (USS), proportional = Pss; the per-VM figure divides by the \
             guests. A stopped VM: `virsh destroy` of {} guests one at a time, both \
             /metrics polled from when virsh returned until the VM is gone.",
            config.scrapes, config.stops
        ),
        "CPU figures leave out the QEMUs, which the exporter's calls do not reach here \
         (no disks, no NICs), and the load client."
            .to_string(),
    ])
}

/// The Debian package's version, e.g. `0.2.0-1+b12`.
fn exporter_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", EXPORTER])
        .output()
        .context("running dpkg-query")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        bail!(
            "{EXPORTER} is not installed: `make bench` installs it (scripts/install-deps.sh --bench)"
        );
    }
    Ok(version)
}

/// The domains the exporter shows a running domain's series for.
fn exporter_domains(body: &[u8]) -> BTreeSet<String> {
    label_values(body, EXPORTER_DOMAIN_SERIES, "domain")
}

/// CPU time so far of each process, in nanoseconds.
fn cpu(pids: &[u32]) -> Result<Vec<f64>> {
    pids.iter()
        .map(|&pid| Ok(procfs::cpu_ns(pid)? as f64))
        .collect()
}

fn compare(
    runtime: &tokio::runtime::Runtime,
    guests: usize,
    config: &PeerConfig,
    table: &mut SideBySide,
) -> Result<()> {
    eprintln!("bench: peer, {guests} running TCG guests on one private libvirt daemon");
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("bench-node")?;
    let started = Instant::now();
    let mut domains = Vec::with_capacity(guests);
    let mut sidecars = Vec::with_capacity(guests);
    for i in 0..guests {
        let domain = format!("peer_vm-{i:03}");
        daemon.start_guest(&domain, GuestKind::Tcg, false)?;
        sidecars.push(Sidecar::start(
            &daemon.uri(),
            &aggregator.grpc_url(),
            &["--domain", &domain],
        )?);
        domains.push(domain);
    }
    let names: Vec<&str> = domains.iter().map(|d| &d["peer_".len()..]).collect();
    aggregator
        .wait_for_names(&names, Duration::from_secs(60))
        .with_context(|| format!("the first sidecar's log:\n{}", sidecars[0].log()))?;

    let log_dir = tempfile::tempdir().context("creating a dir for the exporter's log")?;
    let log = log_dir.path().join("exporter.log");
    let exporter_addr: SocketAddr = format!("127.0.0.1:{}", free_port())
        .parse()
        .context("parsing the exporter's address")?;
    let mut command = Command::new(EXPORTER);
    command
        .arg(format!("--web.listen-address={exporter_addr}"))
        .arg(format!("--libvirt.uri={}", daemon.uri()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).context("creating the exporter's log")?);
    let exporter = ChildGuard::spawn(command)?;
    let expected: BTreeSet<String> = domains.iter().cloned().collect();
    wait_until(
        Duration::from_secs(30),
        "the exporter to show every guest",
        || {
            let body = http_get(&format!("http://{exporter_addr}/metrics"))?;
            Ok((exporter_domains(body.as_bytes()) == expected).then_some(()))
        },
    )
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    eprintln!(
        "bench: peer, {guests} guests, their sidecars and the exporter up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let aggregator_addr: SocketAddr = aggregator
        .metrics_target()
        .parse()
        .context("parsing the metrics address")?;
    let exporter_pid = exporter.0.id();
    let libvirtd_pid = daemon.pid().context("libvirtd is not running")?;
    let aggregator_pid = aggregator.pid().context("the aggregator is not running")?;
    let pids = [exporter_pid, libvirtd_pid, aggregator_pid];
    let scrapes = config.scrapes;
    let (latencies, used, idle) = runtime.block_on(async {
        let mut exporter = HttpConn::connect(exporter_addr).await?;
        let mut ours = HttpConn::connect(aggregator_addr).await?;
        for _ in 0..WARM_UP {
            exporter.get("/metrics").await?;
            ours.get("/metrics").await?;
        }
        let mut latencies = (Vec::with_capacity(scrapes), Vec::with_capacity(scrapes));
        let before = cpu(&pids)?;
        let window = Instant::now();
        for _ in 0..scrapes {
            let (took, _) = exporter.time_get("/metrics").await?;
            latencies.0.push(millis(took));
            let (took, _) = ours.time_get("/metrics").await?;
            latencies.1.push(millis(took));
        }
        let window = window.elapsed();
        let after = cpu(&pids)?;
        // The same processes for as long again, unscraped: sidecar keepalives to libvirtd
        // and to the aggregator go on in both windows.
        tokio::time::sleep(window).await;
        let idle = cpu(&pids)?;
        let used: Vec<f64> = (0..pids.len()).map(|i| after[i] - before[i]).collect();
        let idle: Vec<f64> = (0..pids.len()).map(|i| idle[i] - after[i]).collect();
        anyhow::Ok((latencies, used, idle))
    })?;
    let per_scrape = |i: usize| ((used[i] - idle[i]) / 1e6 / scrapes as f64).max(0.0);
    let (exporter_cpu, libvirtd_cpu, aggregator_cpu) =
        (per_scrape(0), per_scrape(1), per_scrape(2));
    let n = guests.to_string();
    table.row(
        "GET /metrics, median / p99",
        &n,
        median_and(&latencies.0, 99.0),
        median_and(&latencies.1, 99.0),
    );
    table.row(
        "CPU per scrape",
        &n,
        format!(
            "{} (exporter {} + libvirtd {})",
            ms(exporter_cpu + libvirtd_cpu),
            ms(exporter_cpu),
            ms(libvirtd_cpu)
        ),
        format!("{} (aggregator)", ms(aggregator_cpu)),
    );

    let exporter_memory = procfs::memory(exporter_pid)?;
    let aggregator_memory = procfs::memory(aggregator_pid)?;
    let sidecar_memory = sidecars
        .iter()
        .map(|s| procfs::memory(s.pid().context("a sidecar is not running")?))
        .collect::<Result<Vec<Memory>>>()?;
    let sidecars_total =
        |field: fn(&Memory) -> u64| -> f64 { sidecar_memory.iter().map(field).sum::<u64>() as f64 };
    for (what, field) in [
        (
            "private memory (USS)",
            (|m: &Memory| m.private) as fn(&Memory) -> u64,
        ),
        ("proportional memory (PSS)", |m: &Memory| m.proportional),
    ] {
        let exporter_bytes = field(&exporter_memory) as f64;
        let ours = field(&aggregator_memory) as f64 + sidecars_total(field);
        table.row(
            what,
            &n,
            mib(exporter_bytes),
            format!(
                "{} (aggregator {} + sidecars {})",
                mib(ours),
                mib(field(&aggregator_memory) as f64),
                mib(sidecars_total(field))
            ),
        );
        table.row(
            format!("{what} per VM"),
            &n,
            mib(exporter_bytes / guests as f64),
            mib(ours / guests as f64),
        );
    }

    hypervisor_rows(&aggregator, exporter_addr, &expected, &n, table)?;
    stopped_rows(
        runtime,
        &daemon,
        (exporter_addr, aggregator_addr),
        &domains,
        config.stops,
        &n,
        table,
    )?;
    drop(exporter);
    drop(sidecars);
    Ok(())
}

/// Whether each side says which hypervisor runs a guest: a label value naming it, on the
/// series of a guest that runs on TCG.
fn hypervisor_rows(
    aggregator: &Aggregator,
    exporter_addr: SocketAddr,
    domains: &BTreeSet<String>,
    n: &str,
    table: &mut SideBySide,
) -> Result<()> {
    let ours: BTreeSet<String> = aggregator
        .series()?
        .into_iter()
        .map(|labels| labels["hypervisor_type"].clone())
        .collect();
    let body = http_get(&format!("http://{exporter_addr}/metrics"))?;
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .context("parsing the exporter's exposition")?;
    // Every label on the exporter's series of our guests, with the values seen.
    let mut labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in &scrape.samples {
        if sample
            .labels
            .get("domain")
            .is_some_and(|d| domains.contains(d))
        {
            for (name, value) in sample.labels.iter() {
                labels
                    .entry(name.clone())
                    .or_default()
                    .insert(value.clone());
            }
        }
    }
    let hypervisor_words = ["qemu", "kvm", "tcg", "qemu-tcg", "hvm"];
    let named = labels.iter().any(|(name, values)| {
        name.contains("hypervisor")
            || name.contains("type")
            || values
                .iter()
                .any(|v| hypervisor_words.contains(&v.to_lowercase().as_str()))
    });
    let label_names: Vec<&str> = labels.keys().map(String::as_str).collect();
    ensure!(
        !label_names.is_empty(),
        "the exporter shows no series of the guests"
    );
    table.row(
        "exposes the hypervisor type",
        n,
        if named {
            format!("yes (labels {})", label_names.join(", "))
        } else {
            format!("no (its per-VM labels: {})", label_names.join(", "))
        },
        match ours.iter().collect::<Vec<_>>().as_slice() {
            [one] => format!("yes (hypervisor_type=\"{one}\" on every VM)"),
            many => format!("mixed: {many:?} (all guests run on TCG)"),
        },
    );
    Ok(())
}

/// Destroys guests one at a time and polls both /metrics, each over its own kept-alive
/// connection, from when `virsh destroy` returned until the guest is gone.
fn stopped_rows(
    runtime: &tokio::runtime::Runtime,
    daemon: &LibvirtDaemon,
    (exporter_addr, aggregator_addr): (SocketAddr, SocketAddr),
    domains: &[String],
    stops: usize,
    n: &str,
    table: &mut SideBySide,
) -> Result<()> {
    let mut exporter_gone = Vec::new();
    let mut ours_gone = Vec::new();
    for domain in domains.iter().rev().take(stops) {
        let name = domain["peer_".len()..].to_string();
        virsh(daemon, &["destroy", domain])?;
        let returned = Instant::now();
        let (exporter, ours) = runtime.block_on(async {
            let domain = domain.clone();
            let exporter = gone_after(exporter_addr, returned, move |body| {
                exporter_domains(body).contains(&domain)
            });
            let ours = gone_after(aggregator_addr, returned, move |body| {
                vmi_names(body).contains(&name)
            });
            tokio::try_join!(exporter, ours)
        })?;
        exporter_gone.push(exporter);
        ours_gone.push(ours);
    }
    table.row(
        format!(
            "a stopped VM stays on /metrics after `virsh destroy` returned, median / max of {}",
            exporter_gone.len()
        ),
        n,
        median_and(&exporter_gone, 100.0),
        median_and(&ours_gone, 100.0),
    );
    Ok(())
}

/// `median / upper percentile` of samples in milliseconds.
fn median_and(samples: &[f64], upper: f64) -> String {
    format!(
        "{} / {}",
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, upper))
    )
}

/// Milliseconds from `since` to the first /metrics response at `addr` that no longer
/// `shows` the guest.
async fn gone_after(
    addr: SocketAddr,
    since: Instant,
    shows: impl Fn(&[u8]) -> bool,
) -> Result<f64> {
    let mut conn = HttpConn::connect(addr).await?;
    let deadline = since + Duration::from_secs(30);
    loop {
        let body = conn.get("/metrics").await?;
        if !shows(&body) {
            return Ok(millis(since.elapsed()));
        }
        ensure!(
            Instant::now() < deadline,
            "a destroyed guest still on http://{addr}/metrics after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exporters_domains() {
        let body =
            b"# HELP libvirt_domain_info_virtual_cpus Number of virtual CPUs for the domain.\n\
libvirt_domain_info_virtual_cpus{domain=\"peer_vm-000\",uuid=\"1\"} 1\n\
libvirt_domain_info_maximum_memory_bytes{domain=\"peer_vm-001\",uuid=\"2\"} 6.7108864e+07\n\
libvirt_up 1\n";
        assert_eq!(
            exporter_domains(body),
            BTreeSet::from(["peer_vm-000".to_string()])
        );
    }
}
