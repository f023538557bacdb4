//! Plays KubeVirt's virt-launcher from a recorded pod ([`crate::recording`]) against the
//! real `launcher-sidecar` in a pod of its own ([`crate::launcher_pod`]), a fresh private
//! libvirt daemon with a real QEMU guest, and whatever aggregator the sidecar is pointed at.
//!
//! # What is played, and when
//!
//! Every step happens at its recorded offset on the scenario's clock (see
//! [`RecordedPod`]), in recorded order:
//!
//! - each start of the sidecar container (`hook-calls.jsonl`); a later start first kills the
//!   running container, as a restart does;
//! - virt-launcher starting its daemon once it has collected the hook sockets ("Collected all
//!   requested hook sidecar sockets"): a fresh `libvirtd`, with an empty cache, so that its
//!   first answers wait seconds for its QEMU probe, as a new virt-launcher's do. It runs as
//!   KubeVirt's uid 107 in both modes; its socket is where the recorded mode puts it
//!   (`virtqemud-sock` for non-root pods; for root pods also `virtqemud-sock-ro` and
//!   `libvirt-sock-ro`, `qemu:///system`'s read-only socket);
//! - each hook call, with the recorded request bytes, deadline and `:authority` `localhost`,
//!   after waiting for the socket as virt-launcher does (every 300 ms). Each answer is checked
//!   at once: the recorded status; for `Info` the recorded message (name, hook points,
//!   versions); for `OnDefineDomain` the request's domain XML back byte for byte; for any
//!   other call the recorded answer's bytes;
//! - the domain's life from virt-launcher's own log (`virt-launcher-events.jsonl`): defined
//!   and redefined from the XML the sidecar's latest `OnDefineDomain` answer returned,
//!   started (paused when libvirt's `started` came with `suspended`), suspended, resumed,
//!   destroyed (when libvirt's events of the kill came, or when virt-launcher saw QEMU gone,
//!   "Process <domain> and pid <n> is gone!", if that came first: libvirt tells of a kill
//!   only once its cleanup is done), undefined; an ACPI power button for virt-handler's graceful shutdown
//!   ("Signaled graceful shutdown for <vmi>"); SIGTERM to the sidecar container when
//!   virt-launcher got the kubelet's ("Signaled graceful shutdown": a pod deletion sends it
//!   to every container at once).
//!
//! A step that ends later than recorded (a define waiting for the daemon's probe, a test
//! holding the replay to look at something) delays every later step by as much, so the
//! recorded gaps between steps hold; nothing runs earlier than recorded.
//!
//! # What is changed in the domain XML
//!
//! Only the paths under the compute container's `/var/run/kubevirt-private/` (the serial
//! console's socket and log, the VNC socket, host disks), which become the same paths in the
//! pod directory. A host disk of the recording is not part of it; where the recorded guest
//! powered itself off (libvirt's `stopped`/`shutdown`), each file disk gets a boot sector that
//! powers the guest off as long after it runs as the recorded one did; otherwise it is blank.
//! The root `type`, `<name>`, `<uuid>`, `<metadata>` and `<os>` are the recording's.

use std::fs;
use std::os::unix::fs::chown;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use hypervisor_proto::hooks::info::InfoResult;
use hypervisor_proto::hooks::v1alpha3::{OnDefineDomainParams, OnDefineDomainResult};
use prost::Message;

use crate::binaries::binary;
use crate::grpc::{code_name, unary_raw, unix_channel};
use crate::launcher_pod::{
    KUBEVIRT_PRIVATE, PodDir, SidecarContainer, SidecarSpec, make_dir, power_off_disk, tail,
};
use crate::libvirt::{DaemonUser, KUBEVIRT_QEMU_UID, LibvirtDaemon, START_TIMEOUT};
use crate::lifecycle::{self, Lifecycle};
use crate::recording::{HookCall, HookLine, RecordedPod};
use crate::tools::wait_until;

/// How often virt-launcher looks for the hook sockets.
const SOCKET_POLL: Duration = Duration::from_millis(300);
/// How long virt-launcher waits for them before it fails the VMI ("up to minutes").
const SOCKET_WAIT: Duration = Duration::from_secs(120);
/// A guest that powers itself off does so seconds after it runs; a busy machine's TCG is
/// slower than the recording's.
const POWER_OFF_WAIT: Duration = Duration::from_secs(120);

/// One thing virt-launcher (or the kubelet) did.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The n-th start of the sidecar container (1 is the pod's start).
    SidecarStart(usize),
    /// virt-launcher starts its libvirt daemon.
    DaemonStart,
    /// The recorded hook call of this index among the pod's calls.
    Hook(usize),
    /// Defines, or redefines, the domain from the latest `OnDefineDomain` answer.
    Define,
    Start {
        paused: bool,
    },
    Suspend,
    Resume,
    /// An ACPI power button press: virt-handler's graceful shutdown.
    PowerButton,
    Destroy,
    /// The guest powers itself off: waits for libvirt's `stopped` event, which virt-launcher
    /// reacts to.
    AwaitPowerOff,
    Undefine,
    /// The kubelet's SIGTERM (the pod is being deleted).
    Terminate,
}

/// An [`Action`] at its recorded offset.
#[derive(Clone, Debug)]
pub struct Step {
    pub at_s: f64,
    pub action: Action,
}

/// The steps of a recorded pod, in order, and how long after it ran the guest powered
/// itself off, if it did.
pub fn steps(recorded: &RecordedPod) -> Result<(Vec<Step>, Option<Duration>)> {
    let mut steps = Vec::new();
    let mut call = 0;
    let mut starts = 0;
    for line in &recorded.hook_lines {
        match line {
            HookLine::SidecarStart { at_s } => {
                starts += 1;
                steps.push(Step {
                    at_s: *at_s,
                    action: Action::SidecarStart(starts),
                });
            }
            HookLine::Call(c) => {
                steps.push(Step {
                    at_s: c.at_s,
                    action: Action::Hook(call),
                });
                call += 1;
            }
        }
    }
    let (domain_steps, powers_off) = domain_steps(recorded)?;
    steps.extend(domain_steps);
    // Stable: a call and a domain step at the same offset keep the order they were read in.
    steps.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Ok((steps, powers_off))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Life {
    Absent,
    Defined,
    Running,
    Paused,
    Stopped,
}

/// The steps of virt-launcher's own log; see the module docs.
fn domain_steps(recorded: &RecordedPod) -> Result<(Vec<Step>, Option<Duration>)> {
    let file = recorded.dir.join("virt-launcher-events.jsonl");
    let mut steps = Vec::new();
    let mut push = |at_s: f64, action: Action| steps.push(Step { at_s, action });
    let mut life = Life::Absent;
    let mut started_at = None;
    let mut powers_off = None;
    let mut daemon_started = false;
    // libvirt's events alone, each with its line's index, to look ahead from a line.
    let lifecycle: Vec<(usize, &str, &str)> = recorded
        .events
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.lifecycle().map(|(ev, d)| (i, ev, d)))
        .collect();
    let next_after = |i: usize| {
        lifecycle
            .iter()
            .find(|(j, ..)| *j > i)
            .map(|(_, e, d)| (*e, *d))
    };
    let mut skip_next: Option<&str> = None;
    // virt-launcher saw QEMU gone before libvirt's events of the kill: these follow.
    let mut killed = false;
    let gone = format!("Process {} and pid ", recorded.vmi.domain());
    for (i, event) in recorded.events.iter().enumerate() {
        let at = event.at_s;
        if event.msg.starts_with(&gone) && matches!(life, Life::Running | Life::Paused) {
            push(at, Action::Destroy);
            life = Life::Stopped;
            killed = true;
            continue;
        }
        if event.msg == "Collected all requested hook sidecar sockets" && !daemon_started {
            daemon_started = true;
            push(at, Action::DaemonStart);
            continue;
        }
        if event.msg == "Signaled graceful shutdown" {
            push(at, Action::Terminate);
            continue;
        }
        if event.msg.starts_with("Signaled graceful shutdown for ") {
            push(at, Action::PowerButton);
            continue;
        }
        let Some((ev, detail)) = event.lifecycle() else {
            continue;
        };
        if skip_next == Some(ev) {
            skip_next = None;
            continue;
        }
        if killed && matches!(ev, "shutdown" | "stopped") {
            killed = ev != "stopped";
            continue;
        }
        match (ev, life) {
            ("defined", _) => {
                push(at, Action::Define);
                if matches!(life, Life::Absent | Life::Stopped) {
                    life = Life::Defined;
                }
            }
            ("resumed", Life::Defined | Life::Stopped) => {
                push(at, Action::Start { paused: false });
                started_at = Some(at);
                life = Life::Running;
            }
            ("started", Life::Defined | Life::Stopped) => {
                let paused = next_after(i).is_some_and(|(e, _)| e == "suspended");
                if paused {
                    skip_next = Some("suspended");
                } else {
                    started_at = Some(at);
                }
                push(at, Action::Start { paused });
                life = if paused { Life::Paused } else { Life::Running };
            }
            // libvirt's `started` comes with the `resumed` of the same start.
            ("started", Life::Running) => {}
            ("suspended", Life::Running) => {
                push(at, Action::Suspend);
                life = Life::Paused;
            }
            ("resumed", Life::Paused) => {
                push(at, Action::Resume);
                started_at.get_or_insert(at);
                life = Life::Running;
            }
            ("shutdown", Life::Running | Life::Paused) => {
                match next_after(i) {
                    Some(("stopped", "destroyed")) => push(at, Action::Destroy),
                    Some(("stopped", "shutdown")) => {
                        let ran = started_at.context("the guest shut down before it ran")?;
                        powers_off = Some(Duration::from_secs_f64((at - ran).max(0.0)));
                        push(at, Action::AwaitPowerOff);
                    }
                    other => bail!(
                        "{}: the replay cannot play a shutdown followed by {other:?}",
                        file.display()
                    ),
                }
                skip_next = Some("stopped");
                life = Life::Stopped;
            }
            ("stopped", Life::Running | Life::Paused) if detail == "destroyed" => {
                push(at, Action::Destroy);
                life = Life::Stopped;
            }
            ("undefined", _) => {
                push(at, Action::Undefine);
                life = Life::Absent;
            }
            _ => bail!(
                "{}: the replay cannot play libvirt's {ev}/{detail} at {at} s",
                file.display()
            ),
        }
    }
    Ok((steps, powers_off))
}

/// One recorded pod being replayed; see the module docs.
pub struct Replay {
    recorded: RecordedPod,
    steps: Vec<Step>,
    next: usize,
    origin: Instant,
    shift: Duration,
    powers_off: Option<Duration>,
    /// The domain XML of the latest `OnDefineDomain` answer.
    answer_xml: Option<Vec<u8>>,
    defines: usize,
    journal: Vec<(SystemTime, String)>,
    played: Vec<(SystemTime, Action)>,
    runtime: tokio::runtime::Runtime,
    lifecycle: Option<Lifecycle>,
    sidecar: Option<SidecarContainer>,
    // Dropped in this order: the container, the daemon (and its guest), the directory.
    daemon: LibvirtDaemon,
    pod: PodDir,
}

impl Replay {
    /// Lays the pod out for `recorded`, whose sidecar reports to `aggregator` instead of the
    /// recording's (the only argument changed); nothing runs yet. `origin` is the scenario
    /// clock's zero, shared by the pods of one scenario.
    pub fn new(recorded: &RecordedPod, aggregator: &str, origin: Instant) -> Result<Self> {
        let (steps, powers_off) = steps(recorded)?;
        let daemon = LibvirtDaemon::fresh(DaemonUser::KubevirtQemu)?;
        let runtime_dir = daemon.libvirt_runtime_dir()?;
        let mut links = vec!["virtqemud-sock"];
        if recorded.root {
            links.extend(["virtqemud-sock-ro", "libvirt-sock-ro"]);
        }
        for link in links {
            std::os::unix::fs::symlink("libvirt-sock", runtime_dir.join(link))
                .with_context(|| format!("linking {link} to the daemon's socket"))?;
        }
        let pod = PodDir::create(KUBEVIRT_QEMU_UID)?;
        pod.write_sidecar_script(&SidecarSpec {
            root: recorded.root,
            libvirt_runtime: recorded.libvirt_mount.then_some(runtime_dir),
            program: binary("launcher-sidecar")?,
            args: sidecar_args(&recorded.vmi.sidecar_args, aggregator),
        })?;
        Ok(Replay {
            recorded: recorded.clone(),
            steps,
            next: 0,
            origin,
            shift: Duration::ZERO,
            powers_off,
            answer_xml: None,
            defines: 0,
            journal: Vec::new(),
            played: Vec::new(),
            // A worker of its own, so that a call's connection closes when the call is done,
            // as virt-launcher's do: the sidecar's server then drains at once on exit.
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("building a tokio runtime")?,
            lifecycle: None,
            sidecar: None,
            daemon,
            pod,
        })
    }

    pub fn recorded(&self) -> &RecordedPod {
        &self.recorded
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Plays every step before the first one that `stop` matches (all of them if none does).
    pub fn play_until(&mut self, stop: impl Fn(&Action) -> bool) -> Result<()> {
        while let Some(step) = self.steps.get(self.next) {
            if stop(&step.action) {
                return Ok(());
            }
            self.play_next()?;
        }
        Ok(())
    }

    /// Plays every step up to and including the first one that `stop` matches.
    pub fn play_through(&mut self, stop: impl Fn(&Action) -> bool) -> Result<()> {
        self.play_until(&stop)?;
        ensure!(
            self.next < self.steps.len(),
            "{}: no such step to play through",
            self.recorded.label()
        );
        self.play_next()
    }

    /// Plays the first step still to come that `matches` now, ahead of the steps before it,
    /// which follow as recorded; for a test that says why.
    pub fn play_ahead(&mut self, matches: impl Fn(&Action) -> bool) -> Result<()> {
        let index = self.steps[self.next..]
            .iter()
            .position(|s| matches(&s.action))
            .map(|i| self.next + i)
            .with_context(|| format!("{}: no such step to play ahead", self.recorded.label()))?;
        let step = self.steps.remove(index);
        self.steps.insert(self.next, step);
        self.play_next()
    }

    /// Sleeps until the first step still to come that `matches` is due, without playing it.
    pub fn sleep_until_due(&self, matches: impl Fn(&Action) -> bool) -> Result<()> {
        let step = self.steps[self.next..]
            .iter()
            .find(|s| matches(&s.action))
            .with_context(|| format!("{}: no such step to come", self.recorded.label()))?;
        let due = self.origin + Duration::from_secs_f64(step.at_s.max(0.0)) + self.shift;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    pub fn play_to_end(&mut self) -> Result<()> {
        self.play_until(|_| false)
    }

    fn play_next(&mut self) -> Result<()> {
        let step = self.steps[self.next].clone();
        self.next += 1;
        let recorded_at = self.origin + Duration::from_secs_f64(step.at_s.max(0.0));
        let due = recorded_at + self.shift;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.note(format!(
            "{:?} (recorded at {:.3} s)",
            step.action, step.at_s
        ));
        self.played.push((SystemTime::now(), step.action.clone()));
        self.act(&step.action).with_context(|| {
            format!(
                "replaying {} at {:.3} s: {:?}\n{}",
                self.recorded.label(),
                step.at_s,
                step.action,
                self.diagnostics()
            )
        })?;
        self.shift = self
            .shift
            .max(Instant::now().saturating_duration_since(recorded_at));
        Ok(())
    }

    fn act(&mut self, action: &Action) -> Result<()> {
        let domain = self.recorded.vmi.domain();
        match action {
            Action::SidecarStart(n) => {
                if let Some(mut running) = self.sidecar.take() {
                    running.kill();
                }
                self.sidecar = Some(SidecarContainer::start(&self.pod, *n)?);
            }
            Action::DaemonStart => self.daemon.launch()?,
            Action::Hook(index) => self.call(*index)?,
            Action::Define => self.define()?,
            Action::Start { paused } => {
                let mut args = vec!["start", domain.as_str()];
                if *paused {
                    args.push("--paused");
                }
                self.virsh(&args)?;
            }
            Action::Suspend => self.virsh(&["suspend", &domain])?,
            Action::Resume => self.virsh(&["resume", &domain])?,
            Action::PowerButton => self.virsh(&["shutdown", &domain, "--mode", "acpi"])?,
            Action::Destroy => self.virsh(&["destroy", &domain])?,
            Action::AwaitPowerOff => {
                let lifecycle = self
                    .lifecycle
                    .as_ref()
                    .context("the domain was never defined")?;
                let since = self.origin;
                lifecycle.wait_for(&domain, lifecycle::STOP, since, POWER_OFF_WAIT)?;
            }
            Action::Undefine => self.virsh(&["undefine", &domain])?,
            Action::Terminate => self
                .sidecar
                .as_ref()
                .context("no sidecar container to terminate")?
                .signal(libc::SIGTERM)?,
        }
        Ok(())
    }

    fn virsh(&self, args: &[&str]) -> Result<()> {
        self.daemon
            .virsh_with_timeout(args, START_TIMEOUT)
            .map(drop)
    }

    /// One recorded hook call, checked against the recording; see the module docs.
    fn call(&mut self, index: usize) -> Result<()> {
        let call: HookCall = self
            .recorded
            .calls()
            .nth(index)
            .cloned()
            .context("no such recorded call")?;
        let socket = self.pod.hook_socket();
        wait_until(
            SOCKET_WAIT,
            "the hook socket, as virt-launcher polls for it",
            || {
                if socket.exists() {
                    return Ok(Some(()));
                }
                std::thread::sleep(SOCKET_POLL);
                Ok(None)
            },
        )?;
        let deadline = Duration::from_secs_f64(call.deadline_s);
        let started = Instant::now();
        let answer = self.runtime.block_on(async {
            let channel = unix_channel(&socket).await?;
            unary_raw(channel, &call.method, call.request.clone(), deadline).await
        })?;
        let took = started.elapsed();
        let code = match &answer {
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        };
        ensure!(
            code == call.code,
            "{} answered {code} ({:?}), the recorded sidecar answered {}",
            call.method,
            answer.as_ref().err().map(|s| s.message()),
            call.code
        );
        self.note(format!("{} answered {code} in {took:.1?}", call.name()));
        let Ok(response) = answer else {
            return Ok(());
        };
        match call.name() {
            "Info" => {
                let got = InfoResult::decode(response.as_slice()).context("decoding Info")?;
                let recorded = InfoResult::decode(call.response.as_slice())
                    .context("decoding the recorded Info")?;
                ensure!(
                    got == recorded,
                    "Info answered {got:?}, the recorded sidecar {recorded:?}"
                );
            }
            "OnDefineDomain" => {
                let sent = OnDefineDomainParams::decode(call.request.as_slice())
                    .context("decoding the recorded OnDefineDomain request")?;
                let got = OnDefineDomainResult::decode(response.as_slice())
                    .context("decoding the OnDefineDomain answer")?;
                ensure!(
                    got.domain_xml == sent.domain_xml,
                    "OnDefineDomain did not hand the domain XML back byte for byte: sent {} \
                     bytes, got {} bytes back",
                    sent.domain_xml.len(),
                    got.domain_xml.len()
                );
                self.answer_xml = Some(got.domain_xml.to_vec());
            }
            _ => ensure!(
                response == call.response,
                "{} answered {:?}, the recorded sidecar {:?}",
                call.method,
                response,
                call.response
            ),
        }
        Ok(())
    }

    /// Defines the domain from the latest answer, with the pod's paths (module docs).
    fn define(&mut self) -> Result<()> {
        let xml = self
            .answer_xml
            .clone()
            .context("no OnDefineDomain answer to define the domain from")?;
        let xml = String::from_utf8(xml).context("the domain XML is not UTF-8")?;
        let xml = self.with_pod_paths(&xml)?;
        if self.lifecycle.is_none() {
            let socket = self.daemon.socket_path();
            wait_until(START_TIMEOUT, "the libvirt daemon's socket", || {
                Ok(socket.exists().then_some(()))
            })?;
            self.lifecycle = Some(Lifecycle::subscribe(&self.daemon.uri())?);
        }
        self.defines += 1;
        let file = self.pod.path().join(format!("define-{}.xml", self.defines));
        fs::write(&file, xml).with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_str().context("the pod directory is not UTF-8")?;
        self.virsh(&["define", file])
    }

    /// The XML with every path under [`KUBEVIRT_PRIVATE`] in the pod directory, their
    /// directories made, and each file disk written (once).
    fn with_pod_paths(&self, xml: &str) -> Result<String> {
        let mut out = String::with_capacity(xml.len());
        let mut rest = xml;
        while let Some(at) = rest.find(KUBEVIRT_PRIVATE) {
            out.push_str(&rest[..at]);
            let end = rest[at..]
                .find(['"', '\'', '<'])
                .map_or(rest.len(), |n| at + n);
            let path = &rest[at..end];
            let host = self.pod.host_path(path).expect("starts with the prefix");
            if let Some(dir) = host.parent() {
                make_dir(dir, 0o755, KUBEVIRT_QEMU_UID)?;
            }
            let is_disk = out.ends_with("<source file=\"");
            if is_disk && !host.exists() {
                self.write_disk(&host)?;
            }
            out.push_str(host.to_str().context("the pod directory is not UTF-8")?);
            rest = &rest[end..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn write_disk(&self, path: &Path) -> Result<()> {
        let image = match self.powers_off {
            // The BIOS wait starts a moment after the domain runs.
            Some(after) => power_off_disk(after.as_secs() as u32),
            None => vec![0; 1024 * 1024],
        };
        fs::write(path, image).with_context(|| format!("writing {}", path.display()))?;
        chown(path, Some(KUBEVIRT_QEMU_UID), Some(KUBEVIRT_QEMU_UID))
            .with_context(|| format!("chown {}", path.display()))
    }

    fn note(&mut self, what: String) {
        self.journal.push((SystemTime::now(), what));
    }

    /// What the replay did, when.
    pub fn journal(&self) -> &[(SystemTime, String)] {
        &self.journal
    }

    /// When the first step that `matches` was played.
    pub fn played_at(&self, matches: impl Fn(&Action) -> bool) -> Option<SystemTime> {
        self.played
            .iter()
            .find(|(_, action)| matches(action))
            .map(|(at, _)| *at)
    }

    /// Every step played so far, with when.
    pub fn played(&self) -> &[(SystemTime, Action)] {
        &self.played
    }

    /// libvirt's lifecycle events of the domain so far, as the test's own subscription
    /// received them (none before the first define).
    pub fn lifecycle_events(&self) -> Vec<lifecycle::Event> {
        let domain = self.recorded.vmi.domain();
        self.lifecycle
            .as_ref()
            .map(|l| l.events())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.domain == domain)
            .collect()
    }

    /// When libvirt's `kind` event of the domain (a `lifecycle` constant) first arrived.
    pub fn first_event(&self, kinds: &[i32]) -> Option<SystemTime> {
        self.lifecycle_events()
            .into_iter()
            .find(|e| kinds.contains(&e.kind))
            .map(|e| e.wall)
    }

    /// SIGKILLs the sidecar container, as an OOM kill would.
    pub fn kill_sidecar(&mut self) {
        if let Some(sidecar) = self.sidecar.as_mut() {
            sidecar.kill();
        }
        self.note("sidecar container killed".into());
    }

    /// Waits for the sidecar container to exit by itself.
    pub fn wait_sidecar_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let sidecar = self.sidecar.as_mut().context("no sidecar container")?;
        sidecar.wait_exit(timeout)
    }

    pub fn sidecar_log(&self) -> String {
        self.pod.sidecar_log()
    }

    /// The tails of the pod's logs and the replay's journal, for error messages.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "pod {} (recording {})\n--- replay ---\n",
            self.pod.path().display(),
            self.recorded.dir.display()
        );
        for (at, what) in self.journal.iter().rev().take(12).rev() {
            let since = at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            out.push_str(&format!("  {:.3}  {what}\n", since.as_secs_f64() % 1000.0));
        }
        out.push_str(&format!(
            "--- {} ---\n{}\n--- libvirtd ---\n{}",
            crate::launcher_pod::SIDECAR,
            tail(&self.pod.sidecar_log_path(), 25),
            self.daemon.log_tail(10)
        ));
        out
    }
}

/// The sidecar's `args` from the VMI's annotation, with `aggregator` for the recording's
/// aggregator address (added when the annotation named none).
pub fn sidecar_args(recorded: &[String], aggregator: &str) -> Vec<String> {
    let mut args = Vec::with_capacity(recorded.len() + 2);
    let mut replaced = false;
    let mut iter = recorded.iter();
    while let Some(arg) = iter.next() {
        if arg == "--aggregator" {
            iter.next();
            args.extend(["--aggregator".to_owned(), aggregator.to_owned()]);
            replaced = true;
        } else if arg.starts_with("--aggregator=") {
            args.push(format!("--aggregator={aggregator}"));
            replaced = true;
        } else {
            args.push(arg.clone());
        }
    }
    if !replaced {
        args.extend(["--aggregator".to_owned(), aggregator.to_owned()]);
    }
    args
}
