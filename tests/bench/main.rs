//! `make bench`: the footprint and the latencies of the real launcher-sidecar and
//! node-aggregator (release builds), on loopback, printed as one table.
//! docs/performance.md explains every row and holds a full run.
//!
//! 1. Sidecar: exec → hook socket answers `Info`; memory and CPU after an idle minute.
//! 2. Detection on a private libvirt daemon: libvirt event (and `virsh` returning) →
//!    series on /metrics, for started and destroyed TCG guests.
//! 3. Aggregator at 1,000 and 10,000 report streams: memory per stream, /metrics render
//!    time against the same bytes served pre-rendered, idle CPU with keepalives.
//! 4. Churn: 1,000 changes per second for 30 s, then an exact end-state check.
//! 5. The peer (`peer.rs`): Debian's prometheus-libvirt-exporter against the same daemon
//!    and guests as the sidecars and the aggregator, printed side by side.
//!
//! `BENCH_QUICK=1` shortens the windows for a smoke run; its figures are not the reference.
//! Everything runs on 127.0.0.1, bounded in count and time; every process and guest the
//! bench starts is stopped by a drop, also when a phase fails.

mod http;
mod load;
mod peer;
mod procfs;
mod table;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, SidecarPod, binary, info_series};
use e2e::grpc::{inventory, unix_channel};
use e2e::launcher_pod::SIDECAR;
use e2e::libvirt::{GuestKind, LibvirtDaemon, guest_xml};
use e2e::lifecycle;
use e2e::tools::{http_get, wait_until};
use hypervisor_proto::hooks::info::{InfoParams, info_client::InfoClient};

use crate::http::HttpConn;
use crate::load::Layout;
use crate::procfs::Memory;
use crate::table::{SideBySide, Table, kib, mib, millis, ms, percentile};

const INFO_PREFIX: &str = "kubevirt_vmi_hypervisor_info{";
/// libvirt out of reach: the startup measurement needs only the hook socket.
const NO_LIBVIRT: &str = "qemu+unix:///session?socket=/nonexistent/libvirt-sock";
/// Scale runs raise the aggregator's stream limit (default 4,096) to fit 10,000 streams;
/// every other flag keeps its default, streams per connection (16) included.
const MAX_STREAMS: &str = "10000";
/// Streams per HTTP/2 connection in the shared layout: the aggregator's default
/// --max-streams-per-connection, its advertised SETTINGS_MAX_CONCURRENT_STREAMS.
const STREAMS_PER_CONNECTION: usize = 16;
/// Between two /metrics polls in the detection phase. A poll of a one-series exposition
/// takes ~0.15 ms; back-to-back polling would keep a core of this 2-core machine busy
/// rendering and compete with the sidecar being measured.
const POLL_PAUSE: Duration = Duration::from_micros(500);

/// The parts of the bench, selectable with `BENCH_ONLY=sidecar,detection,aggregator,churn,peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Sidecar,
    Detection,
    Aggregator,
    Churn,
    Peer,
}

const PARTS: [(&str, Part); 5] = [
    ("sidecar", Part::Sidecar),
    ("detection", Part::Detection),
    ("aggregator", Part::Aggregator),
    ("churn", Part::Churn),
    ("peer", Part::Peer),
];

struct Config {
    quick: bool,
    parts: Vec<Part>,
    startup_runs: usize,
    guests: usize,
    idle: Duration,
    scrapes: usize,
    churn: Duration,
    scales: Vec<usize>,
    peer: peer::PeerConfig,
}

impl Config {
    fn from_env() -> Result<Self> {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let parts = match std::env::var("BENCH_ONLY") {
            Ok(only) if !only.trim().is_empty() => only
                .split(',')
                .map(|name| {
                    PARTS
                        .iter()
                        .find(|(n, _)| *n == name.trim())
                        .map(|(_, part)| *part)
                        .with_context(|| {
                            format!(
                                "BENCH_ONLY: unknown part {name:?}; the parts are {:?}",
                                PARTS.map(|(n, _)| n)
                            )
                        })
                })
                .collect::<Result<_>>()?,
            _ => PARTS.map(|(_, part)| part).to_vec(),
        };
        Ok(Config {
            quick,
            parts,
            // 100 samples, so that the p99 is not simply the largest one.
            startup_runs: if quick { 5 } else { 100 },
            guests: if quick { 5 } else { 100 },
            idle: Duration::from_secs(if quick { 5 } else { 60 }),
            scrapes: if quick { 10 } else { 100 },
            churn: Duration::from_secs(if quick { 5 } else { 30 }),
            scales: vec![1_000, 10_000],
            peer: peer::PeerConfig {
                guests: if quick { vec![5] } else { vec![10, 30, 100] },
                scrapes: if quick { 20 } else { 100 },
                stops: if quick { 2 } else { 5 },
            },
        })
    }

    fn describe(&self) -> String {
        let mut what = if self.is_reference() {
            "full run".to_string()
        } else if self.quick {
            "QUICK run (BENCH_QUICK=1), not the reference".to_string()
        } else {
            "partial run".to_string()
        };
        if self.parts.len() != PARTS.len() {
            let names: Vec<&str> = PARTS
                .iter()
                .filter(|(_, p)| self.runs(*p))
                .map(|(n, _)| *n)
                .collect();
            what.push_str(&format!("; parts: {}", names.join(", ")));
        }
        what
    }

    fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }

    /// The whole bench, as docs/performance.md reports it.
    fn is_reference(&self) -> bool {
        !self.quick && self.parts.len() == PARTS.len()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve-static") => http::serve_static_main(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some(other) => Err(anyhow::anyhow!(
            "unknown argument {other:?}; run without arguments (BENCH_QUICK=1 for a smoke run)"
        )),
        None => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let config = Config::from_env()?;
    let began = Instant::now();
    // Children inherit it: the aggregator needs a descriptor per connection too.
    let nofile = e2e::tools::raise_nofile(65_536)?;
    ensure!(
        nofile >= 12_000 || !config.runs(Part::Aggregator),
        "RLIMIT_NOFILE can only be raised to {nofile}; 10,000 connections need 12,000"
    );
    let runtime = load_client_runtime()?;
    // Drops of gRPC handles on this thread find the runtime too.
    let _entered = runtime.enter();
    let mut table = Table::default();
    // Printed under the table: how to read the rows of the parts that ran.
    let mut notes = Vec::new();
    eprintln!("bench: {} on {}", config.describe(), machine());

    if config.runs(Part::Sidecar) {
        sidecar_startup(&runtime, &config, &mut table)?;
    }

    // The daemon and the aggregator of the detection phase also host the idle sidecar.
    let libvirt = if config.runs(Part::Detection) || config.runs(Part::Sidecar) {
        let daemon = LibvirtDaemon::start()?;
        let aggregator = Aggregator::start("bench-node")?;
        Some((daemon, aggregator))
    } else {
        None
    };
    if let Some((daemon, aggregator)) = &libvirt
        && config.runs(Part::Detection)
    {
        let poll_ms = detection(&runtime, daemon, aggregator, &config, &mut table)?;
        notes.push(format!(
            "Detection clocks start when the bench's own libvirt connection receives the domain's \
             first lifecycle event (Resumed for a start, Stopped for a destroy; the daemon sends \
             each event to every subscriber, the sidecar included) or when `virsh start|destroy` \
             exits (negative: the series changed before virsh returned). They stop at the first \
             /metrics response showing the change, polled over one kept-alive connection every \
             {poll_ms:.2} ms (median), so each figure is an upper bound by up to that much."
        ));
    }
    let idle_sidecar = match &libvirt {
        Some((daemon, aggregator)) if config.runs(Part::Sidecar) => {
            Some(IdleSidecar::start(daemon, aggregator)?)
        }
        _ => None,
    };

    let mut fleets = Vec::new();
    if config.runs(Part::Aggregator) {
        for &count in &config.scales {
            for layout in [
                Layout::Shared {
                    per_connection: STREAMS_PER_CONNECTION,
                },
                Layout::OwnConnection,
            ] {
                let fleet = Fleet::start(&runtime, count, layout)?;
                fleet.memory_rows(&mut table);
                if matches!(layout, Layout::OwnConnection) {
                    render_rows(&runtime, &fleet, config.scrapes, &mut table)?;
                }
                fleets.push(fleet);
            }
        }
    }

    if idle_sidecar.is_some() || !fleets.is_empty() {
        idle_window(&config, idle_sidecar.as_ref(), &fleets, &mut table)?;
    }
    for fleet in fleets {
        fleet.close(&runtime)?;
    }
    drop(idle_sidecar);
    drop(libvirt);

    if config.runs(Part::Churn) {
        churn(&runtime, &config, &mut table)?;
    }

    let mut side_by_side = SideBySide::default();
    let mut peer_notes = Vec::new();
    if config.runs(Part::Peer) {
        peer_notes = peer::peer(&runtime, &config.peer, &mut side_by_side)?;
    }

    let took = began.elapsed();
    println!();
    println!(
        "kubevirt-hypervisor-metric bench ({}), {}",
        config.describe(),
        machine()
    );
    if !table.is_empty() {
        println!();
        print!("{}", table.render());
        println!();
        notes.push(
            "p99 is the nearest-rank percentile: of 100 samples the second largest, of fewer than 100 the largest.".into(),
        );
        for note in notes {
            println!("{note}");
        }
    }
    if !side_by_side.is_empty() {
        println!();
        print!("{}", side_by_side.render());
        println!();
        for note in peer_notes {
            println!("{note}");
        }
    }
    println!();
    println!(
        "Bench took {:.0} s; {} target(s) missed.",
        took.as_secs_f64(),
        table.missed()
    );
    Ok(())
}

/// `bench hold GRPC_ADDR STREAMS shared|own SECONDS`: opens the streams against an
/// aggregator started by hand (under a profiler, say), holds them, then closes them.
fn hold(args: &[String]) -> Result<()> {
    let [addr, count, layout, seconds] = args else {
        bail!("usage: bench hold GRPC_ADDR STREAMS shared|own SECONDS");
    };
    let count: usize = count.parse().context("parsing STREAMS")?;
    let seconds: u64 = seconds.parse().context("parsing SECONDS")?;
    let layout = match layout.as_str() {
        "shared" => Layout::Shared {
            per_connection: STREAMS_PER_CONNECTION,
        },
        "own" => Layout::OwnConnection,
        other => bail!("layout {other:?}: expected shared or own"),
    };
    e2e::tools::raise_nofile(65_536)?;
    let runtime = load_client_runtime()?;
    let _entered = runtime.enter();
    let streams = runtime.block_on(load::open_streams(addr, count, layout))?;
    eprintln!(
        "bench: holding {count} streams over {} connections for {seconds} s",
        streams.connections
    );
    std::thread::sleep(Duration::from_secs(seconds));
    drop(streams);
    Ok(())
}

/// CPU model, cores and kernel, for the table's heading.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores of {cpu}, Linux {kernel}")
}

/// A child process of the bench itself, killed on drop.
struct ChildGuard(Child);

impl ChildGuard {
    fn spawn(mut command: Command) -> Result<Self> {
        // SAFETY: prctl is async-signal-safe. The child dies with the bench even when the
        // bench is killed before its drops run (PR_SET_PDEATHSIG follows the spawning thread,
        // and the bench spawns from its main thread only).
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let program = format!("{:?}", command.get_program());
        Ok(ChildGuard(
            command
                .spawn()
                .with_context(|| format!("starting {program}"))?,
        ))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// 1. Sidecar startup

fn sidecar_startup(
    runtime: &tokio::runtime::Runtime,
    config: &Config,
    table: &mut Table,
) -> Result<()> {
    eprintln!(
        "bench: sidecar exec → hook socket answers Info, {} runs",
        config.startup_runs
    );
    let program = binary("launcher-sidecar")?;
    let mut samples = Vec::with_capacity(config.startup_runs);
    for _ in 0..config.startup_runs {
        let dir = tempfile::tempdir().context("creating a hooks dir")?;
        let socket = dir.path().join(format!("{SIDECAR}.sock"));
        let log = File::create(dir.path().join("sidecar.log")).context("creating a log")?;
        let mut command = Command::new(&program);
        command
            .arg("--hooks-dir")
            .arg(dir.path())
            .args(["--libvirt-uri", NO_LIBVIRT])
            // Nothing listens there: the sidecar keeps retrying, as before its aggregator is up.
            .args(["--aggregator", "http://127.0.0.1:9"])
            .env("CONTAINER_NAME", SIDECAR)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let started = Instant::now();
        let child = ChildGuard::spawn(command)?;
        let answered = runtime
            .block_on(first_info_answer(
                &socket,
                started + Duration::from_secs(10),
            ))
            .with_context(|| {
                let log = std::fs::read_to_string(dir.path().join("sidecar.log"));
                format!("sidecar log: {}", log.unwrap_or_default())
            })?;
        samples.push(millis(answered - started));
        drop(child);
    }
    let (median, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    table.target(
        format!(
            "sidecar: exec → hook socket answers Info (N={})",
            samples.len()
        ),
        ms(median),
        ms(p99),
        "≤ 20 ms",
        p99 <= 20.0,
    );
    Ok(())
}

/// Calls `Info` on the hook socket until it answers; returns when it did.
async fn first_info_answer(socket: &Path, deadline: Instant) -> Result<Instant> {
    let mut last = anyhow::anyhow!("the socket never appeared");
    while Instant::now() < deadline {
        if socket.exists() {
            match info(socket).await {
                Ok(name) => {
                    let answered = Instant::now();
                    ensure!(
                        name == "kubevirt-hypervisor-metric",
                        "Info answered with name {name:?}"
                    );
                    return Ok(answered);
                }
                Err(err) => last = err,
            }
        }
        // Blocks only the main thread, which does nothing else meanwhile; tokio's timer
        // would round a pause up to a whole millisecond.
        std::thread::sleep(Duration::from_micros(50));
    }
    Err(last.context(format!("no Info answer on {}", socket.display())))
}

/// One `kubevirt.hooks.info.Info/Info` call over the unix socket, as virt-launcher makes it
/// (`:authority` localhost); returns the hook's name.
async fn info(socket: &Path) -> Result<String> {
    let answer = InfoClient::new(unix_channel(socket).await?)
        .info(InfoParams {})
        .await
        .context("calling Info")?
        .into_inner();
    Ok(answer.name)
}

/// A sidecar as in a pod (hook socket served) with one running guest and an open stream,
/// left alone for the idle window.
struct IdleSidecar(SidecarPod);

impl IdleSidecar {
    fn start(daemon: &LibvirtDaemon, aggregator: &Aggregator) -> Result<Self> {
        eprintln!("bench: idle sidecar with one running guest");
        daemon.start_guest("bench_idle", GuestKind::Tcg, false)?;
        let pod = SidecarPod::start(&daemon.uri(), aggregator)?;
        aggregator.wait_for_names(&["idle"], Duration::from_secs(30))?;
        Ok(IdleSidecar(pod))
    }

    fn pid(&self) -> Result<u32> {
        self.0
            .sidecar
            .pid()
            .context("the idle sidecar is not running")
    }
}

// ---------------------------------------------------------------------------------------
// 2. Detection latency

fn detection(
    runtime: &tokio::runtime::Runtime,
    daemon: &LibvirtDaemon,
    aggregator: &Aggregator,
    config: &Config,
    table: &mut Table,
) -> Result<f64> {
    eprintln!(
        "bench: detection latency, {} TCG guests on a private libvirt daemon",
        config.guests
    );
    let events = lifecycle::Lifecycle::subscribe(&daemon.uri())?;
    let pod = SidecarPod::start(&daemon.uri(), aggregator)?;
    let sidecar = &pod.sidecar;
    wait_until(
        Duration::from_secs(30),
        "the sidecar to reach libvirt and the aggregator",
        || {
            let log = sidecar.log();
            Ok((log.contains("connected to libvirt")
                && log.contains("streaming to the aggregator"))
            .then_some(()))
        },
    )
    .with_context(|| sidecar.log())?;
    let metrics: SocketAddr = aggregator
        .metrics_target()
        .parse()
        .context("parsing the metrics address")?;
    let poller = Poller::start(runtime, metrics)?;
    let guests_dir = tempfile::tempdir().context("creating a dir for guest XML")?;

    // Instants to wall-clock time, to place the sidecar's log timestamps between them.
    let clock = (Instant::now(), SystemTime::now());
    let wall = |at: Instant| clock.1 + at.saturating_duration_since(clock.0);
    let mut start_event = Vec::new();
    let mut start_job = Vec::new();
    let mut start_virsh = Vec::new();
    let mut stop_event = Vec::new();
    let mut stop_virsh = Vec::new();
    // Per guest: (domain, start event, series seen, stop event, series gone).
    let mut guests = Vec::new();
    for i in 0..config.guests {
        let domain = format!("bench_vm-{i:02}");
        let name = &domain["bench_".len()..];
        let xml = guests_dir.path().join(format!("{domain}.xml"));
        std::fs::write(&xml, guest_xml(&domain, GuestKind::Tcg))
            .with_context(|| format!("writing {}", xml.display()))?;
        virsh(daemon, &["define", path_str(&xml)?])?;

        let called = Instant::now();
        virsh(daemon, &["start", &domain])?;
        let returned = Instant::now();
        let seen = poller.wait(name, true, called, Duration::from_secs(30))?;
        let started =
            events.wait_for(&domain, lifecycle::START, called, Duration::from_secs(10))?;
        let job_done = events.wait_for(
            &domain,
            &[lifecycle::STARTED],
            called,
            Duration::from_secs(10),
        )?;
        start_event.push(signed_ms(seen, started.at));
        start_job.push(signed_ms(job_done.at, started.at));
        start_virsh.push(signed_ms(seen, returned));

        // Lets the start settle (QEMU's first seconds, the sidecar's follow-up reads) so the
        // destroy is measured on its own.
        std::thread::sleep(Duration::from_millis(200));
        let called = Instant::now();
        virsh(daemon, &["destroy", &domain])?;
        let returned = Instant::now();
        let gone = poller.wait(name, false, called, Duration::from_secs(30))?;
        let stopped = events.wait_for(&domain, lifecycle::STOP, called, Duration::from_secs(10))?;
        stop_event.push(signed_ms(gone, stopped.at));
        stop_virsh.push(signed_ms(gone, returned));
        guests.push((domain, started, seen, stopped, gone));
    }
    // Where the time goes: the sidecar logs "reporting" and "withdrawing" just before it
    // sends the upsert or the withdrawal, with a microsecond UTC timestamp.
    let sends = sidecar_sends(&sidecar.log());
    let (mut start_to_send, mut send_to_seen) = (Vec::new(), Vec::new());
    let (mut stop_to_send, mut send_to_gone) = (Vec::new(), Vec::new());
    for (domain, started, seen, stopped, gone) in &guests {
        if let Some(&sent) = sends.get(&(domain.clone(), true)) {
            start_to_send.push(signed_wall_ms(sent, started.wall));
            send_to_seen.push(signed_wall_ms(wall(*seen), sent));
        }
        if let Some(&sent) = sends.get(&(domain.clone(), false)) {
            stop_to_send.push(signed_wall_ms(sent, stopped.wall));
            send_to_gone.push(signed_wall_ms(wall(*gone), sent));
        }
    }
    let polls = poller.stop()?;
    eprintln!(
        "bench: /metrics polled {} times, one poll (request to last byte) median {} p99 {}",
        polls.len(),
        ms(percentile(&polls, 50.0)),
        ms(percentile(&polls, 99.0))
    );
    let poll_period = percentile(&polls, 50.0) + millis(POLL_PAUSE);
    let n = config.guests;
    let row = |table: &mut Table, what: &str, samples: &[f64], target: bool| {
        let (median, p99) = (percentile(samples, 50.0), percentile(samples, 99.0));
        // The whole distribution, for a look at the tail.
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let sorted: Vec<String> = sorted.iter().map(|v| format!("{v:.1}")).collect();
        eprintln!("bench: {what}, ms, sorted: {}", sorted.join(" "));
        if target {
            table.target(what, ms(median), ms(p99), "p99 ≤ 10 ms", p99 <= 10.0);
        } else {
            table.info(what, ms(median), ms(p99));
        }
    };
    row(
        table,
        &format!("detection: libvirt start event (Resumed) → series on /metrics (N={n})"),
        &start_event,
        true,
    );
    row(
        table,
        &format!("detection: … Resumed → Started, libvirt's start job (N={n})"),
        &start_job,
        false,
    );
    row(
        table,
        &format!(
            "detection: … Resumed → sidecar sends the upsert (N={})",
            start_to_send.len()
        ),
        &start_to_send,
        false,
    );
    row(
        table,
        &format!(
            "detection: … sidecar sends → series on /metrics, gRPC + aggregator + poll (N={})",
            send_to_seen.len()
        ),
        &send_to_seen,
        false,
    );
    row(
        table,
        &format!("detection: libvirt event Stopped → series gone (N={n})"),
        &stop_event,
        true,
    );
    row(
        table,
        &format!(
            "detection: … Stopped → sidecar sends the withdrawal (N={})",
            stop_to_send.len()
        ),
        &stop_to_send,
        false,
    );
    row(
        table,
        &format!(
            "detection: … sidecar sends → series gone from /metrics (N={})",
            send_to_gone.len()
        ),
        &send_to_gone,
        false,
    );
    row(
        table,
        &format!("detection: `virsh start` returned → series on /metrics (N={n})"),
        &start_virsh,
        false,
    );
    row(
        table,
        &format!("detection: `virsh destroy` returned → series gone (N={n})"),
        &stop_virsh,
        false,
    );
    drop(pod);
    Ok(poll_period)
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// When the sidecar's log says it sent each report: (domain, upsert?) → time of the first
/// "reporting" (upsert) or "withdrawing" line naming the domain.
fn sidecar_sends(log: &str) -> HashMap<(String, bool), SystemTime> {
    let mut sends = HashMap::new();
    for line in log.lines() {
        let mut tokens = line.split_whitespace();
        let Some(at) = tokens.next().and_then(parse_utc) else {
            continue;
        };
        let tokens: Vec<&str> = tokens.collect();
        let upsert = if tokens.contains(&"reporting") {
            true
        } else if tokens.contains(&"withdrawing") {
            false
        } else {
            continue;
        };
        if let Some(domain) = tokens.iter().find_map(|t| t.strip_prefix("domain=")) {
            sends.entry((domain.to_string(), upsert)).or_insert(at);
        }
    }
    sends
}

/// `2026-11-22T00:25:26.392541Z` (tracing's timestamps) as a time.
fn parse_utc(timestamp: &str) -> Option<SystemTime> {
    let (date, time) = timestamp.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let nanos: u32 = format!("{fraction:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(seconds).ok()?, nanos))
}

fn signed_wall_ms(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => millis(d),
        Err(e) => -millis(e.duration()),
    }
}

/// `later - earlier` in milliseconds, negative when `later` came first.
fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => millis(d),
        None => -millis(earlier - later),
    }
}

/// Runs `virsh -c <daemon> <args>` and returns as soon as it exits (the harness's own
/// helper polls every 5 ms, too coarse to start a clock on).
fn virsh(daemon: &LibvirtDaemon, args: &[&str]) -> Result<()> {
    let child = Command::new("virsh")
        .arg("-c")
        .arg(daemon.uri())
        .args(args)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting virsh")?;
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    let output = match done_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(output) => output.context("waiting for virsh")?,
        Err(_) => {
            // SAFETY: kill(2) on our own child, which the waiting thread has not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("virsh {} did not finish within 30 s", args.join(" "));
        }
    };
    if !output.status.success() {
        bail!(
            "virsh {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A change of the set of VMI names on /metrics, as the poller saw it.
struct Transition {
    name: String,
    appeared: bool,
    /// When the response that first showed it had arrived.
    at: Instant,
}

#[derive(Default)]
struct PollLog {
    transitions: Mutex<Vec<Transition>>,
    changed: Condvar,
}

/// Polls /metrics over one kept-alive connection on a thread of its own and logs every
/// change of the VMI names.
struct Poller {
    log: Arc<PollLog>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<f64>>>>,
}

impl Poller {
    fn start(runtime: &tokio::runtime::Runtime, metrics: SocketAddr) -> Result<Self> {
        let log = Arc::new(PollLog::default());
        let stop = Arc::new(AtomicBool::new(false));
        let handle = runtime.handle().clone();
        let thread = std::thread::Builder::new()
            .name("metrics-poller".into())
            .spawn({
                let log = Arc::clone(&log);
                let stop = Arc::clone(&stop);
                move || handle.block_on(poll(metrics, &log, &stop))
            })
            .context("starting the poller")?;
        Ok(Poller {
            log,
            stop,
            thread: Some(thread),
        })
    }

    /// When `name` appeared (or disappeared) on /metrics, at or after `since`.
    fn wait(
        &self,
        name: &str,
        appeared: bool,
        since: Instant,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let mut transitions = self
            .log
            .transitions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(t) = transitions
                .iter()
                .find(|t| t.name == name && t.appeared == appeared && t.at >= since)
            {
                return Ok(t.at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{name} did not {} on /metrics within {timeout:?}",
                    if appeared { "appear" } else { "disappear" }
                );
            }
            transitions = self
                .log
                .changed
                .wait_timeout(transitions, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops polling; returns every poll's duration in ms.
    fn stop(mut self) -> Result<Vec<f64>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("the poller panicked"),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn poll(metrics: SocketAddr, log: &PollLog, stop: &AtomicBool) -> Result<Vec<f64>> {
    let mut conn = HttpConn::connect(metrics).await?;
    let mut previous = BTreeSet::new();
    let mut durations = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let sent = Instant::now();
        let body = conn.get("/metrics").await?;
        let at = Instant::now();
        durations.push(millis(at - sent));
        let names = vmi_names(&body);
        if names != previous {
            let mut transitions = log.transitions.lock().unwrap_or_else(|p| p.into_inner());
            for name in names.difference(&previous) {
                transitions.push(Transition {
                    name: name.clone(),
                    appeared: true,
                    at,
                });
            }
            for name in previous.difference(&names) {
                transitions.push(Transition {
                    name: name.clone(),
                    appeared: false,
                    at,
                });
            }
            log.changed.notify_all();
            previous = names;
        }
        // A thread sleep, not tokio's: its timer rounds up to whole milliseconds.
        std::thread::sleep(POLL_PAUSE);
    }
    Ok(durations)
}

/// The `name` label of every info series in an exposition.
fn vmi_names(body: &[u8]) -> BTreeSet<String> {
    label_values(body, INFO_PREFIX, "name")
}

/// The values of `label` on the lines of `body` that start with `series` (up to its `{`).
fn label_values(body: &[u8], series: &str, label: &str) -> BTreeSet<String> {
    let (first, other) = (format!("{{{label}=\""), format!(",{label}=\""));
    String::from_utf8_lossy(body)
        .lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| {
            let (at, len) = line
                .find(&first)
                .map(|at| (at, first.len()))
                .or_else(|| line.find(&other).map(|at| (at, other.len())))?;
            let rest = &line[at + len..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

fn info_lines(body: &[u8]) -> usize {
    body.split(|&b| b == b'\n')
        .filter(|line| line.starts_with(INFO_PREFIX.as_bytes()))
        .count()
}

// ---------------------------------------------------------------------------------------
// 3. Aggregator at scale

/// One aggregator holding `count` open report streams from the load client.
struct Fleet {
    count: usize,
    layout: Layout,
    connections: usize,
    aggregator: Aggregator,
    streams: load::Streams,
    baseline: Memory,
    loaded: Memory,
}

impl Fleet {
    fn label(&self) -> String {
        match self.layout {
            Layout::Shared { per_connection } => format!(
                "{} streams, {per_connection} per connection",
                thousands(self.count)
            ),
            Layout::OwnConnection => {
                format!("{} streams, one connection each", thousands(self.count))
            }
        }
    }

    fn start(runtime: &tokio::runtime::Runtime, count: usize, layout: Layout) -> Result<Self> {
        let aggregator = Aggregator::start_with("bench-node", &["--max-streams", MAX_STREAMS])?;
        let pid = aggregator.pid().context("the aggregator is not running")?;
        // One scrape first, so the baseline includes what serving /metrics allocates once.
        aggregator.metrics()?;
        std::thread::sleep(Duration::from_millis(300));
        let baseline = procfs::memory(pid)?;
        let opening = Instant::now();
        let streams = runtime
            .block_on(load::open_streams(&aggregator.grpc_addr(), count, layout))
            .with_context(|| format!("opening {count} streams ({layout:?})"))?;
        let opened_in = opening.elapsed();
        let body = aggregator.metrics()?;
        let shown = info_lines(body.as_bytes());
        ensure!(
            shown == count,
            "/metrics shows {shown} series for {count} acknowledged streams"
        );
        // Let the allocator and the connections settle before reading memory.
        std::thread::sleep(Duration::from_secs(1));
        let loaded = procfs::memory(pid)?;
        let connections = streams.connections;
        eprintln!(
            "bench: {count} streams over {connections} connections opened and acknowledged in {:.1} s; \
             aggregator RSS {} → {}, anonymous {} → {}, {} fds",
            opened_in.as_secs_f64(),
            mib(baseline.rss as f64),
            mib(loaded.rss as f64),
            mib(baseline.anonymous as f64),
            mib(loaded.anonymous as f64),
            procfs::open_fds(pid).unwrap_or(0),
        );
        Ok(Fleet {
            count,
            layout,
            connections,
            aggregator,
            streams,
            baseline,
            loaded,
        })
    }

    fn memory_rows(&self, table: &mut Table) {
        let per_stream = (self.loaded.rss as f64 - self.baseline.rss as f64) / self.count as f64;
        let what = format!(
            "aggregator: RSS per stream, {} ({} connections)",
            self.label(),
            thousands(self.connections)
        );
        if self.count >= 10_000 {
            table.target(
                what,
                kib(per_stream),
                "–",
                "≤ 16 KiB",
                per_stream <= 16.0 * 1024.0,
            );
        } else {
            table.info(what, kib(per_stream), "–");
        }
    }

    /// Closes every stream and waits until their series are gone.
    fn close(self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        let label = self.label();
        let closing = Instant::now();
        drop(self.streams);
        let metrics: SocketAddr = self
            .aggregator
            .metrics_target()
            .parse()
            .context("parsing the metrics address")?;
        runtime.block_on(async {
            let mut conn = HttpConn::connect(metrics).await?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left = info_lines(&conn.get("/metrics").await?);
                if left == 0 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{left} series still on /metrics 60 s after closing {label}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        })?;
        eprintln!(
            "bench: {label}: closed; every series gone from /metrics after {}",
            ms(millis(closing.elapsed()))
        );
        Ok(())
    }
}

/// `10000` → `10,000`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// GET /metrics from the aggregator against the same bytes from a static server, the two
/// interleaved so that any drift of the machine hits both alike.
fn render_rows(
    runtime: &tokio::runtime::Runtime,
    fleet: &Fleet,
    scrapes: usize,
    table: &mut Table,
) -> Result<()> {
    let aggregator: SocketAddr = fleet
        .aggregator
        .metrics_target()
        .parse()
        .context("parsing the metrics address")?;
    let body =
        runtime.block_on(async { HttpConn::connect(aggregator).await?.get("/metrics").await })?;
    let dir = tempfile::tempdir().context("creating a dir for the static body")?;
    let body_file = dir.path().join("metrics.txt");
    std::fs::write(&body_file, &body).context("writing the static body")?;
    let static_port = e2e::tools::free_port();
    let static_addr: SocketAddr = format!("127.0.0.1:{static_port}")
        .parse()
        .context("parsing the static server's address")?;
    let mut command = Command::new(std::env::current_exe().context("locating the bench")?);
    command
        .arg("serve-static")
        .arg(&body_file)
        .arg(static_addr.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _server = ChildGuard::spawn(command)?;
    wait_until(Duration::from_secs(10), "the static server", || {
        Ok(http_get(&format!("http://{static_addr}/readyz")).ok())
    })?;

    let (dynamic, pre_rendered) = runtime.block_on(async {
        let mut a = HttpConn::connect(aggregator).await?;
        let mut s = HttpConn::connect(static_addr).await?;
        for _ in 0..5 {
            a.get("/metrics").await?;
            s.get("/metrics").await?;
        }
        let mut dynamic = Vec::with_capacity(scrapes);
        let mut pre_rendered = Vec::with_capacity(scrapes);
        for _ in 0..scrapes {
            let (took, len) = a.time_get("/metrics").await?;
            ensure!(
                len.abs_diff(body.len()) < 1024,
                "the aggregator's body changed size"
            );
            dynamic.push(millis(took));
            let (took, len) = s.time_get("/metrics").await?;
            ensure!(len == body.len(), "the static server's body differs");
            pre_rendered.push(millis(took));
        }
        anyhow::Ok((dynamic, pre_rendered))
    })?;
    let n = thousands(fleet.count);
    let (d50, d99) = (percentile(&dynamic, 50.0), percentile(&dynamic, 99.0));
    let (s50, s99) = (
        percentile(&pre_rendered, 50.0),
        percentile(&pre_rendered, 99.0),
    );
    let ratio = d50 / s50;
    let what = format!(
        "aggregator: GET /metrics, {n} series ({} KiB), rendered (N={scrapes})",
        body.len() / 1024
    );
    if fleet.count >= 10_000 {
        table.target(
            what,
            ms(d50),
            ms(d99),
            format!("≤ 2× pre-rendered (is {ratio:.1}×)"),
            ratio <= 2.0,
        );
    } else {
        table.info(
            format!("{what}, {ratio:.1}× pre-rendered"),
            ms(d50),
            ms(d99),
        );
    }
    table.info(
        format!("aggregator: GET the same {n}-series bytes pre-rendered (N={scrapes})"),
        ms(s50),
        ms(s99),
    );
    Ok(())
}

/// One idle window for every idle process at once: the sidecar and each aggregator with
/// its open streams. Idle processes do not compete for CPU, so sharing the window changes
/// no figure and saves minutes.
fn idle_window(
    config: &Config,
    sidecar: Option<&IdleSidecar>,
    fleets: &[Fleet],
    table: &mut Table,
) -> Result<()> {
    eprintln!(
        "bench: idle window of {} s ({} sidecar, {} aggregators)",
        config.idle.as_secs(),
        usize::from(sidecar.is_some()),
        fleets.len()
    );
    let mut pids = Vec::new();
    if let Some(sidecar) = sidecar {
        pids.push(sidecar.pid()?);
    }
    for fleet in fleets {
        pids.push(
            fleet
                .aggregator
                .pid()
                .context("an aggregator is not running")?,
        );
    }
    let before = pids
        .iter()
        .map(|&pid| Ok((procfs::cpu_ns(pid)?, procfs::cpu_ticks_ns(pid)?)))
        .collect::<Result<Vec<_>>>()?;
    let started = Instant::now();
    std::thread::sleep(config.idle);
    let window = started.elapsed();
    let used: Vec<(f64, f64)> = pids
        .iter()
        .zip(&before)
        .map(|(&pid, &(ns, ticks))| {
            Ok((
                (procfs::cpu_ns(pid)? - ns) as f64,
                (procfs::cpu_ticks_ns(pid)? - ticks) as f64,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let secs = window.as_secs_f64();
    let mut used = used.into_iter();
    if let Some(sidecar) = sidecar {
        let (ns, ticks) = used.next().unwrap_or_default();
        sidecar_idle_rows(sidecar.pid()?, ns, ticks, secs, table)?;
    }
    for (fleet, (ns, _)) in fleets.iter().zip(used) {
        let percent = ns / 1e9 / secs * 100.0;
        let what = format!(
            "aggregator: idle CPU, {}, keepalives every 10 s ({secs:.0} s window)",
            fleet.label()
        );
        if fleet.count >= 10_000 && matches!(fleet.layout, Layout::OwnConnection) {
            table.target(
                what,
                format!("{percent:.2} %"),
                "–",
                "≤ 2 % of a core",
                percent <= 2.0,
            );
        } else {
            table.info(what, format!("{percent:.2} %"), "–");
        }
        let pid = fleet
            .aggregator
            .pid()
            .context("an aggregator is not running")?;
        let after = procfs::memory(pid)?;
        eprintln!(
            "bench: {}: RSS after the idle window {} (was {})",
            fleet.label(),
            mib(after.rss as f64),
            mib(fleet.loaded.rss as f64)
        );
    }
    Ok(())
}

/// The sidecar's rows: memory after the window, CPU used in it (`ns` by schedstat,
/// `ticks_ns` by utime+stime, as a cross-check).
fn sidecar_idle_rows(pid: u32, ns: f64, ticks_ns: f64, secs: f64, table: &mut Table) -> Result<()> {
    let memory = procfs::memory(pid)?;
    table.info(
        "sidecar: resident memory (RSS) after the idle window",
        mib(memory.rss as f64),
        "–",
    );
    table.target(
        "sidecar: private anonymous memory after the idle window",
        mib(memory.anonymous as f64),
        "–",
        "≤ 3 MiB",
        memory.anonymous <= 3 * 1024 * 1024,
    );
    let per_minute = ns / 1e6 * 60.0 / secs;
    table.target(
        format!(
            "sidecar: CPU per idle minute, open stream and one running guest ({secs:.0} s window)"
        ),
        format!("{per_minute:.2} ms"),
        "–",
        "≤ 10 ms",
        per_minute <= 10.0,
    );
    eprintln!(
        "bench: sidecar private (clean+dirty) {}, utime+stime over the window {:.0} ms",
        mib(memory.private as f64),
        ticks_ns / 1e6
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Churn

fn churn(runtime: &tokio::runtime::Runtime, config: &Config, table: &mut Table) -> Result<()> {
    let churn = load::ChurnConfig {
        streams: 100,
        // Within the aggregator's default --max-domains-per-stream (16).
        vmis_per_stream: 12,
        changes_per_second: 1000.0,
        duration: config.churn,
    };
    eprintln!(
        "bench: churn, {} changes/s over {} streams for {} s",
        churn.changes_per_second,
        churn.streams,
        churn.duration.as_secs()
    );
    let aggregator = Aggregator::start("bench-node")?;
    let outcome = runtime.block_on(load::churn(&aggregator.grpc_addr(), &churn))?;
    let applied = outcome.upserts + outcome.withdrawals;
    let rate = applied as f64 / outcome.elapsed.as_secs_f64();

    // The end state, while the streams are still open.
    let expected: BTreeSet<(String, String, String)> = outcome
        .live
        .iter()
        .map(|((ns, name), t)| (ns.clone(), name.clone(), t.to_string()))
        .collect();
    let on_metrics: BTreeSet<(String, String, String)> = info_series(&aggregator.metrics()?)?
        .into_iter()
        .map(|l| {
            (
                l["namespace"].clone(),
                l["name"].clone(),
                l["hypervisor_type"].clone(),
            )
        })
        .collect();
    let listed = runtime.block_on(inventory(&aggregator.grpc_url(), Duration::from_secs(10)))?;
    let held = listed.iter().filter(|s| s.held).count();
    let in_inventory: BTreeSet<(String, String, String)> = listed
        .iter()
        .filter_map(|s| s.domain.as_ref())
        .map(|d| {
            (
                d.namespace.clone(),
                d.name.clone(),
                d.hypervisor_type().label().to_string(),
            )
        })
        .collect();
    let diff = |seen: &BTreeSet<(String, String, String)>| {
        (
            seen.difference(&expected).count(),
            expected.difference(seen).count(),
        )
    };
    let (stale_metrics, missing_metrics) = diff(&on_metrics);
    let (stale_inventory, missing_inventory) = diff(&in_inventory);
    let exact = stale_metrics + missing_metrics + stale_inventory + missing_inventory + held == 0
        && listed.len() == expected.len()
        && outcome.refused.is_empty();

    drop(outcome.streams);
    let closed_clean = wait_until(Duration::from_secs(10), "churn series to go", || {
        Ok((info_lines(aggregator.metrics()?.as_bytes()) == 0).then_some(()))
    })
    .is_ok();

    table.target(
        format!(
            "churn: achieved rate ({} upserts + {} withdrawals in {:.1} s, 100 streams)",
            outcome.upserts,
            outcome.withdrawals,
            outcome.elapsed.as_secs_f64()
        ),
        format!("{rate:.0} /s"),
        "–",
        "≥ 1,000 /s",
        rate >= 990.0,
    );
    table.info(
        "churn: change sent → its ack",
        ms(percentile(&outcome.ack_latencies_ms, 50.0)),
        ms(percentile(&outcome.ack_latencies_ms, 99.0)),
    );
    table.target(
        format!(
            "churn: end state, /metrics and Inventory/List vs the client ({} live)",
            expected.len()
        ),
        if exact {
            "exact".to_string()
        } else {
            format!(
                "metrics stale {stale_metrics} missing {missing_metrics}; inventory stale \
                 {stale_inventory} missing {missing_inventory} held {held}; refused {}",
                outcome.refused.len()
            )
        },
        "–",
        "exact",
        exact,
    );
    table.target(
        "churn: all streams closed → no series left",
        if closed_clean {
            "none left"
        } else {
            "series left"
        },
        "–",
        "none left",
        closed_clean,
    );
    if !outcome.refused.is_empty() {
        eprintln!(
            "bench: churn refusals (first 5): {:?}",
            &outcome.refused[..outcome.refused.len().min(5)]
        );
    }
    Ok(())
}

/// The load client's runtime: two workers, like the machine's two cores.
fn load_client_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the load client's runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmi_names_off_an_exposition() {
        let body = b"# HELP kubevirt_vmi_hypervisor_info x\n\
kubevirt_vmi_hypervisor_info{namespace=\"bench\",name=\"vm-01\",node=\"n\",hypervisor_type=\"qemu-tcg\",hypervisor_version=\"7.2.22\"} 1\n\
kubevirt_hypervisor_aggregator_streams_open 1\n";
        assert_eq!(vmi_names(body), BTreeSet::from(["vm-01".to_string()]));
        assert_eq!(info_lines(body), 1);
    }

    #[test]
    fn reads_the_sidecars_send_times() {
        assert_eq!(
            parse_utc("1970-01-02T00:00:01.5Z"),
            Some(UNIX_EPOCH + Duration::from_millis(86_401_500))
        );
        // date -u -d 2026-11-22T00:25:26Z +%s
        assert_eq!(
            parse_utc("2026-11-22T00:25:26.392541Z"),
            Some(UNIX_EPOCH + Duration::new(1_795_307_126, 392_541_000))
        );
        assert_eq!(parse_utc("yesterday"), None);
        let log = "2026-11-22T00:25:26.000001Z  INFO launcher_sidecar::report: reporting domain=bench_vm-01 hypervisor=qemu-tcg paused=false\n\
                   2026-11-22T00:25:27.000001Z  INFO launcher_sidecar::report: withdrawing domain=bench_vm-01\n\
                   2026-11-22T00:25:28.000001Z  INFO launcher_sidecar::report: reporting domain=bench_vm-01 hypervisor=qemu-tcg paused=false\n";
        let sends = sidecar_sends(log);
        assert_eq!(sends.len(), 2);
        assert_eq!(
            sends[&("bench_vm-01".to_string(), true)],
            parse_utc("2026-11-22T00:25:26.000001Z").unwrap()
        );
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
