//! A virt-launcher pod without a cluster: KubeVirt's real virt-launcher (built by
//! [`crate::kubevirt`]) in its `compute` container, the project's real `launcher-sidecar` in
//! `hook-sidecar-0`, and `kvhm-handler` (tests/kubevirt/cmd/kvhm-handler) playing virt-handler
//! through KubeVirt's own client, notify server and VMI defaults.
//!
//! # The pod
//!
//! One directory on the host (`/tmp/kvhm-pod-*`) holds one subdirectory per emptyDir volume
//! of KubeVirt's launcher pod (`v/public`, `v/sockets`, `v/private`, `v/libvirt-runtime`,
//! `v/ephemeral-disks`, `v/hook-sidecar-sockets`, …), what the compute container's image
//! adds to the machine's files (`c/`), host disks (`disks/`), the handler's own directory and
//! the logs. Each container runs in its own mount and PID namespaces (`unshare`), built by a
//! shell script the harness writes into the pod directory (`compute.sh`, `hook-sidecar-0.sh`;
//! the tails of the containers' logs are in every error message, since the directory goes
//! with the pod):
//!
//! - `compute`: a tmpfs on /run with the volumes bound where KubeVirt mounts them; its own
//!   /dev with /dev/kvm only when the pod gets it (KubeVirt's device plugin); /etc/libvirt
//!   with KubeVirt's `qemu.conf` and `virtqemud.conf`; /etc/passwd and /etc/group with
//!   KubeVirt's `qemu` user (uid 107, in group kvm) added; /usr/bin with virt-launcher and
//!   virt-launcher-monitor and /usr/sbin with a `virtqemud` stand-in (below), both through
//!   read-only overlays; /var through an overlay whose upper layer is the pod's, so what a
//!   root libvirtd writes there stays in the pod. PID 1 is virt-launcher-monitor, as in a
//!   pod; non-root mode runs it as uid 107 with only CAP_NET_BIND_SERVICE (ambient), root
//!   mode as root with a container runtime's default capabilities plus KubeVirt's.
//! - `hook-sidecar-0`: a tmpfs on /run with only its own subdirectory of the hook socket
//!   volume at /var/run/kubevirt-hooks (KubeVirt's subPath) and, when the admission policy
//!   applies, the `libvirt-runtime` volume read-only at /var/run/libvirt (what
//!   manifests/base/mutatingadmissionpolicy.yaml adds). Non-root: uid 107, no capabilities,
//!   no new privileges.
//!
//! The users exist only inside the namespaces (a bind mount over /etc/passwd and /etc/group):
//! uid 107 may belong to someone else on the machine, and nothing here changes the machine.
//!
//! Debian 12 has no modular `virtqemud`: the stand-in execs `libvirtd` with virt-launcher's
//! arguments and links virtqemud's socket names to libvirtd's, as virt-launcher and the
//! sidecar expect them (`virtqemud-sock`, `-sock-ro`, `-admin-sock`).
//!
//! # Lifetime
//!
//! Every process of a container lives in its PID namespace, QEMU and libvirtd included, and
//! `unshare --kill-child` SIGKILLs the namespace's PID 1 when `unshare` dies, which ends every
//! process in it. [`LauncherPod`] SIGKILLs its `unshare`s and the handler on drop; each also
//! gets SIGKILL should the test process die first (PR_SET_PDEATHSIG). A pod directory whose
//! owning test process is gone is removed by the next run. Mounts vanish with the namespaces.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::binaries::binary;
use crate::kubevirt::{GoPrograms, go_programs, kubevirt_tree};
use crate::libvirt::{processes_mentioning, random_uuid_from};
use crate::tools::{process_alive, read_pid, sigkill, wait_until};

/// KubeVirt's non-root user and group (`qemu` in its images).
pub const NON_ROOT_UID: u32 = 107;
/// The one hook sidecar of these pods.
pub const SIDECAR: &str = "hook-sidecar-0";

const POD_DIR_PREFIX: &str = "kvhm-pod-";
const OWNER_FILE: &str = "owner.pid";
/// KubeVirt's Go programs a pod needs.
const PROGRAMS: [&str; 3] = ["virt-launcher", "virt-launcher-monitor", "kvhm-handler"];
/// How long virt-launcher waits for its hook sidecars and for QEMU (`--qemu-timeout`).
const QEMU_TIMEOUT: &str = "300s";
/// A cold libvirtd probes QEMU for seconds before the first define returns, longer on a busy
/// machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(240);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long virt-launcher may take to start its daemon and serve its command socket.
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// How virt-launcher runs: KubeVirt's default since 1.0, or the legacy root mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--run-as-nonroot`: uid 107, session daemon at /var/run/libvirt/virtqemud-sock.
    NonRoot,
    /// As root, with `qemu:///system`.
    Root,
}

/// What the pod is made of, as virt-controller and the admission policy would render it.
#[derive(Clone, Debug)]
pub struct PodConfig {
    pub mode: Mode,
    /// /dev/kvm in the compute container (KubeVirt's `devices.kubevirt.io/kvm`).
    pub kvm: bool,
    /// The cluster's `developerConfiguration.useEmulation`: `--allow-emulation`, and the
    /// pod asks for no /dev/kvm.
    pub use_emulation: bool,
    /// The MutatingAdmissionPolicy applied: `hook-sidecar-0` has /var/run/libvirt read-only.
    pub libvirt_mount: bool,
    /// Host disks by volume name: `hostDisk` volumes of the VMI, the image's bytes.
    pub host_disks: BTreeMap<String, Vec<u8>>,
}

impl PodConfig {
    /// A pod as KubeVirt renders it by default: non-root, KVM, the policy applied.
    pub fn new(mode: Mode) -> Self {
        PodConfig {
            mode,
            kvm: true,
            use_emulation: false,
            libvirt_mount: true,
            host_disks: BTreeMap::new(),
        }
    }
}

/// A VirtualMachineInstance as a user writes it; virt-api's defaults are applied by the
/// handler with KubeVirt's own code.
#[derive(Clone, Debug)]
pub struct Vmi {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub json: Value,
}

impl Vmi {
    /// 128 MiB, no network (outside a cluster there is no pod network to bind), no
    /// annotations, a random uid as the API server would give it, and, on hosts that need
    /// it, CPU model kvm64 (see [`host_needs_kvm64`]).
    pub fn bare(namespace: &str, name: &str) -> Self {
        let uid = random_uuid();
        let mut cpu = json!({});
        if host_needs_kvm64() {
            cpu = json!({"model": "kvm64"});
        }
        Vmi {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.clone(),
            json: json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {"namespace": namespace, "name": name, "uid": uid},
                "spec": {
                    "domain": {
                        "cpu": cpu,
                        "resources": {"requests": {"memory": "128Mi"}},
                        "devices": {"autoattachPodInterface": false},
                    },
                    "terminationGracePeriodSeconds": 30,
                },
            }),
        }
    }

    /// A [`bare`](Self::bare) VMI with the hook sidecar annotation, written by hand: the
    /// launcher-sidecar, reporting to `aggregator`.
    pub fn new(namespace: &str, name: &str, aggregator: &str) -> Self {
        let mut vmi = Self::bare(namespace, name);
        let sidecars = json!([{
            "image": "registry.example/kubevirt-hypervisor-metric/launcher-sidecar:test",
            "args": ["--aggregator", aggregator],
        }]);
        vmi.json["metadata"]["annotations"] =
            json!({"hooks.kubevirt.io/hookSidecars": sidecars.to_string()});
        vmi
    }

    /// The libvirt domain name: `<namespace>_<name>`.
    pub fn domain(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }

    /// `spec.startStrategy: Paused`.
    pub fn start_paused(mut self) -> Self {
        self.json["spec"]["startStrategy"] = json!("Paused");
        self
    }

    /// `spec.terminationGracePeriodSeconds`.
    pub fn grace_period(mut self, seconds: u32) -> Self {
        self.json["spec"]["terminationGracePeriodSeconds"] = json!(seconds);
        self
    }

    /// A `hostDisk` volume with a disk on the virtio bus, booted first.
    pub fn host_disk(mut self, volume: &str) -> Self {
        let spec = &mut self.json["spec"];
        spec["domain"]["devices"]["disks"] = json!([{
            "name": volume, "disk": {"bus": "virtio"}, "bootOrder": 1,
        }]);
        spec["volumes"] = json!([{
            "name": volume,
            "hostDisk": {"path": format!("/var/lib/kvhm/{volume}/disk.img"), "type": "Disk"},
        }]);
        self
    }

    fn grace_period_seconds(&self) -> u64 {
        self.json["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
    }
}

/// On nested AMD hosts, QEMU 7.2 dies with KubeVirt's default `host-model` CPU (and with
/// `host-passthrough`); `kvm64` runs (../shared/kubevirt/README.md).
fn host_needs_kvm64() -> bool {
    static NEEDS: OnceLock<bool> = OnceLock::new();
    *NEEDS.get_or_init(|| {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let amd = cpuinfo.contains("AuthenticAMD");
        let nested = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        amd && nested
    })
}

fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    bytes.iter_mut().for_each(|b| *b = fastrand::u8(..));
    random_uuid_from(bytes)
}

/// A 1 MiB disk whose boot sector waits `seconds` (BIOS INT 15h, AH=86h), then powers the
/// machine off through the ACPI PM1a control register (SLP_EN with sleep type 0, port
/// 0x604 where SeaBIOS puts it on q35): a guest that shuts itself down, a few seconds after
/// it runs, with no operating system.
pub fn power_off_disk(seconds: u32) -> Vec<u8> {
    let micros = seconds * 1_000_000;
    let [d0, d1, c0, c1] = micros.to_le_bytes();
    let code = [
        0xFB, // sti: the BIOS wait needs the timer interrupt
        0xB4, 0x86, // mov ah, 0x86: wait CX:DX microseconds
        0xB9, c0, c1, // mov cx, high word
        0xBA, d0, d1, // mov dx, low word
        0xCD, 0x15, // int 0x15
        0xFA, // cli
        0xBA, 0x04, 0x06, // mov dx, 0x604: PM1a control
        0xB8, 0x00, 0x20, // mov ax, 0x2000: SLP_EN, SLP_TYP 0 (soft off)
        0xEF, // out dx, ax
        0xF4, // hlt
        0xEB, 0xFD, // jmp back to hlt
    ];
    let mut disk = vec![0u8; 1024 * 1024];
    disk[..code.len()].copy_from_slice(&code);
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk
}

/// One line the handler printed, with the wall-clock time it carries.
#[derive(Clone, Debug)]
pub struct HandlerEvent {
    pub at: SystemTime,
    pub json: Value,
}

impl HandlerEvent {
    fn str(&self, key: &str) -> &str {
        self.json[key].as_str().unwrap_or_default()
    }

    /// A libvirt lifecycle event (`defined`, `started`, `resumed`, `suspended`, `stopped`,
    /// `undefined`, …) of `domain`.
    pub fn is_libvirt(&self, domain: &str, lifecycle: &str) -> bool {
        self.str("event") == "libvirt"
            && self.str("domain") == domain
            && self.str("lifecycle") == lifecycle
    }

    /// A domain event virt-launcher sent to the notify server, with this status
    /// (`Running`, `Paused`, `Shutoff`, …).
    pub fn is_notified(&self, status: &str) -> bool {
        self.str("event") == "domain" && self.str("status") == status
    }
}

#[derive(Default)]
struct HandlerOutput {
    events: Mutex<(Vec<HandlerEvent>, bool)>,
    arrived: Condvar,
}

/// `kvhm-handler`, driven line by line.
pub struct Handler {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<HandlerOutput>,
    next_id: u64,
    stderr: PathBuf,
}

impl Handler {
    fn start(program: &Path, layout: &Layout, mode: Mode, config: &Value) -> Result<Self> {
        let stderr = layout.logs().join("handler.log");
        let mut cmd = Command::new(program);
        cmd.arg("--launcher-socket")
            .arg(layout.volume("sockets").join("launcher-sock"))
            .arg("--notify-pipe")
            .arg(layout.volume("public").join("domain-notify-pipe.sock"))
            .arg("--handler-dir")
            .arg(layout.handler_dir())
            .arg(format!("--kubevirt-config={config}"));
        if mode == Mode::NonRoot {
            cmd.arg("--non-root");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).context("creating the handler log")?);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().context("starting kvhm-handler")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let output = Arc::new(HandlerOutput::default());
        let reader_output = Arc::clone(&output);
        std::thread::Builder::new()
            .name("kvhm-handler".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let Ok(json) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let nanos = json["unix_ns"].as_u64().unwrap_or_default();
                    let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
                    let mut events = reader_output
                        .events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    events.0.push(HandlerEvent { at, json });
                    reader_output.arrived.notify_all();
                }
                let mut events = reader_output
                    .events
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                events.1 = true;
                reader_output.arrived.notify_all();
            })
            .context("starting the handler's reader")?;
        let stdin = child.stdin.take();
        let handler = Handler {
            child,
            stdin,
            output,
            next_id: 1,
            stderr,
        };
        handler
            .wait_for(
                "the handler to serve the notify socket",
                Duration::from_secs(30),
                |e| e.str("event") == "ready",
            )
            .map(|_| handler)
    }

    /// Sends one command and waits for its result; a failed command is an error.
    pub fn call(&mut self, mut command: Value, timeout: Duration) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        command["id"] = json!(id);
        let name = command["command"].as_str().unwrap_or_default().to_owned();
        let stdin = self
            .stdin
            .as_mut()
            .context("the handler's stdin is closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("sending {name} to the handler"))?;
        let result = self.wait_for(&format!("the result of {name}"), timeout, |e| {
            e.str("event") == "result" && e.json["id"].as_u64() == Some(id)
        })?;
        if result.json["ok"] != json!(true) {
            bail!(
                "{name} failed: {}",
                result.json["error"]
                    .as_str()
                    .unwrap_or("(no error message)")
            );
        }
        Ok(result.json)
    }

    /// Waits for the first event, past or future, that `matches`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&HandlerEvent) -> bool,
    ) -> Result<HandlerEvent> {
        let deadline = Instant::now() + timeout;
        let mut events = self.output.events.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(event) = events.0.iter().find(|e| matches(e)) {
                return Ok(event.clone());
            }
            if events.1 {
                bail!(
                    "waiting for {what}: the handler exited; its log:\n{}",
                    self.log()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {what} within {timeout:?}");
            }
            events = self
                .output
                .arrived
                .wait_timeout(events, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Everything the handler printed so far.
    pub fn events(&self) -> Vec<HandlerEvent> {
        self.output
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    fn log(&self) -> String {
        tail(&self.stderr, 40)
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod directory and where things are in it.
struct Layout {
    dir: tempfile::TempDir,
}

/// KubeVirt's launcher pod volumes: name in the pod directory → mount path in compute.
const VOLUMES: [(&str, &str); 8] = [
    ("public", "/run/kubevirt"),
    ("sockets", "/run/kubevirt/sockets"),
    ("container-disks", "/run/kubevirt/container-disks"),
    ("hotplug-disks", "/run/kubevirt/hotplug-disks"),
    ("private", "/run/kubevirt-private"),
    ("libvirt-runtime", "/run/libvirt"),
    ("ephemeral-disks", "/run/kubevirt-ephemeral-disks"),
    ("hook-sidecar-sockets", "/run/kubevirt-hooks"),
];

impl Layout {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn volume(&self, name: &str) -> PathBuf {
        self.path().join("v").join(name)
    }
    fn compute(&self) -> PathBuf {
        self.path().join("c")
    }
    fn handler_dir(&self) -> PathBuf {
        self.path().join("handler")
    }
    fn logs(&self) -> PathBuf {
        self.path().join("logs")
    }
}

/// One container: `unshare` running a script that builds its namespaces, then execs.
struct Container {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Container {
    fn start(name: &str, script: &Path, log: PathBuf) -> Result<Self> {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
            "/bin/sh",
            "-eu",
        ])
        .arg(script)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?,
        )
        .stderr(
            fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .with_context(|| format!("opening {}", log.display()))?,
        );
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting container {name}"))?;
        Ok(Container {
            name: name.to_owned(),
            child: Some(child),
            log,
            status: None,
        })
    }

    /// The container's PID 1, as the machine numbers it: the child of `unshare`.
    fn init_pid(&self) -> Result<u32> {
        let unshare = self
            .child
            .as_ref()
            .with_context(|| format!("container {} is not running", self.name))?
            .id();
        let children = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .with_context(|| format!("reading the children of {} (pid {unshare})", self.name))?;
        children
            .split_whitespace()
            .next()
            .with_context(|| format!("container {} has no PID 1 (yet)", self.name))?
            .parse()
            .context("parsing a pid")
    }

    /// Sends `signal` to the container's PID 1, as the kubelet does.
    fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.init_pid()?;
        // SAFETY: kill(2) on the PID 1 of our own container.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!(
                "signal {signal} to {} (pid {pid}): {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status once it has exited.
    fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        if let Some(status) = child.try_wait()? {
            self.status = Some(status);
            self.child = None;
        }
        Ok(self.status)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.name.clone();
        wait_until(timeout, &format!("container {name} to exit"), || {
            self.try_status()
        })
        .with_context(|| format!("{name}'s log:\n{}", tail(&self.log, 40)))
    }

    /// SIGKILL: `unshare` dies, `--kill-child` kills PID 1, and the kernel kills every
    /// other process of the namespace before PID 1 is gone, which this waits for.
    fn kill(&mut self) {
        let init = self.init_pid().ok();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
        if let Some(init) = init {
            let gone = wait_until(
                Duration::from_secs(10),
                "a container's PID 1 to exit",
                || Ok((!process_alive(init)).then_some(())),
            );
            if gone.is_err() {
                sigkill(init);
            }
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Gives the child SIGKILL when the thread that started it dies: pods are started and
/// dropped on a test's own thread, so this fires only when the test process is gone.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(2) is async-signal-safe and touches nothing but the new process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A virt-launcher pod; see the module docs.
pub struct LauncherPod {
    config: PodConfig,
    vmi: Vmi,
    handler: Handler,
    sidecar: Container,
    sidecar_starts: usize,
    compute: Container,
    // Last: the directory goes after every process that uses it.
    layout: Layout,
}

impl LauncherPod {
    /// Lays the pod out and starts its containers (hook sidecar first, then compute, as a
    /// kubelet may), the handler, and waits until virt-launcher answers on its command
    /// socket and the handler follows libvirt's events. The VMI is not synced yet.
    /// `hook-sidecar-0` runs what the VMI's `hooks.kubevirt.io/hookSidecars` annotation
    /// asks for, as KubeVirt reads it: its one entry must name a `launcher-sidecar` image
    /// (this repository's binary stands in for it), whose `args` it gets.
    pub fn start(config: PodConfig, vmi: &Vmi) -> Result<Self> {
        Self::start_with(config, vmi, Duration::ZERO)
    }

    /// As [`start`](Self::start), with the sidecar container starting `sidecar_delay`
    /// after the compute container.
    pub fn start_with(config: PodConfig, vmi: &Vmi, sidecar_delay: Duration) -> Result<Self> {
        ensure_root()?;
        sweep_stale_pods();
        let programs = go_programs(&PROGRAMS)?;
        let sidecar_binary = binary("launcher-sidecar")?;
        let dir = tempfile::Builder::new()
            .prefix(POD_DIR_PREFIX)
            .tempdir_in("/tmp")
            .context("creating a pod directory in /tmp")?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .context("writing the pod's owner file")?;
        let layout = Layout { dir };
        lay_out(&layout, &config, &programs)?;

        let kubevirt_config = if config.use_emulation {
            json!({"developerConfiguration": {"useEmulation": true}})
        } else {
            json!({})
        };
        let mut handler = Handler::start(
            programs.path("kvhm-handler"),
            &layout,
            config.mode,
            &kubevirt_config,
        )?;
        let sidecar_args = launcher_sidecar_args(&mut handler, vmi)?;
        write_compute_script(&layout, &config, vmi)?;
        write_sidecar_script(&layout, &config, &sidecar_binary, &sidecar_args)?;
        let (sidecar, compute) = if sidecar_delay.is_zero() {
            let sidecar = start_sidecar(&layout, 1)?;
            (sidecar, start_compute(&layout)?)
        } else {
            let compute = start_compute(&layout)?;
            std::thread::sleep(sidecar_delay);
            (start_sidecar(&layout, 1)?, compute)
        };
        let mut pod = LauncherPod {
            config,
            vmi: vmi.clone(),
            handler,
            sidecar,
            sidecar_starts: 1,
            compute,
            layout,
        };
        pod.wait_ready()?;
        let uri = pod.libvirt_uri();
        pod.handler
            .call(
                json!({"command": "watchLibvirt", "uri": uri, "timeout": "60s"}),
                COMMAND_TIMEOUT,
            )
            .with_context(|| pod.diagnostics())?;
        Ok(pod)
    }

    /// Waits, as virt-handler does, until virt-launcher serves its command socket; fails at
    /// once with the logs when a container exits meanwhile.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = [&mut self.compute, &mut self.sidecar]
                .into_iter()
                .find_map(|c| Some((c.name.clone(), c.try_status().ok()??)));
            if let Some((name, status)) = exited {
                bail!(
                    "container {name} exited ({status}) before virt-launcher was ready:\n{}",
                    self.diagnostics()
                );
            }
            let attempt = self.handler.call(
                json!({"command": "connect", "timeout": "2s"}),
                COMMAND_TIMEOUT,
            );
            match attempt {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(err.context(format!(
                        "virt-launcher not ready within {READY_TIMEOUT:?}:\n{}",
                        self.diagnostics()
                    )));
                }
                Err(_) => {}
            }
        }
    }

    /// What a root process on the machine connects to, read-only, to see the pod's domains.
    fn libvirt_uri(&self) -> String {
        let runtime = self.layout.volume("libvirt-runtime");
        match self.config.mode {
            Mode::NonRoot => format!(
                "qemu+unix:///session?socket={}",
                runtime.join("libvirt-sock").display()
            ),
            Mode::Root => format!(
                "qemu+unix:///system?socket={}",
                runtime.join("libvirt-sock-ro").display()
            ),
        }
    }

    pub fn vmi(&self) -> &Vmi {
        &self.vmi
    }

    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// virt-handler's first SyncVirtualMachine: virt-launcher converts the VMI, calls the
    /// hooks, defines and starts the domain. Returns when virt-launcher answered.
    pub fn sync(&mut self) -> Result<()> {
        let vmi = self.vmi.json.clone();
        self.command(json!({"command": "sync", "vmi": vmi}), SYNC_TIMEOUT)
    }

    /// PauseVirtualMachine.
    pub fn pause(&mut self) -> Result<()> {
        self.command(json!({"command": "pause"}), COMMAND_TIMEOUT)
    }

    /// UnpauseVirtualMachine.
    pub fn unpause(&mut self) -> Result<()> {
        self.command(json!({"command": "unpause"}), COMMAND_TIMEOUT)
    }

    /// KillVirtualMachine; the handler then deletes the domain, as virt-handler does.
    pub fn kill_vm(&mut self) -> Result<()> {
        self.command(json!({"command": "kill"}), COMMAND_TIMEOUT)
    }

    /// ShutdownVirtualMachine: virt-handler's graceful stop, an ACPI power button press.
    pub fn shutdown_vm(&mut self) -> Result<()> {
        self.command(json!({"command": "shutdown"}), COMMAND_TIMEOUT)
    }

    /// The domain's `type` as virt-launcher reports it to virt-handler (GetDomain).
    pub fn domain_type(&mut self) -> Result<String> {
        let answer = self
            .handler
            .call(json!({"command": "getDomain"}), COMMAND_TIMEOUT)
            .with_context(|| self.diagnostics())?;
        ensure!(
            answer["exists"] == json!(true),
            "virt-launcher has no domain"
        );
        Ok(answer["type"].as_str().unwrap_or_default().to_owned())
    }

    fn command(&mut self, command: Value, timeout: Duration) -> Result<()> {
        let name = command["command"].clone();
        let result = self.handler.call(command, timeout);
        result
            .map(|_| ())
            .with_context(|| format!("{name} ({})", self.diagnostics()))
    }

    /// Waits for libvirt's `lifecycle` event of this pod's domain; the first one at or after
    /// `since`.
    pub fn wait_libvirt(
        &self,
        lifecycle: &str,
        since: SystemTime,
        timeout: Duration,
    ) -> Result<SystemTime> {
        let domain = self.vmi.domain();
        self.handler
            .wait_for(
                &format!("libvirt's {lifecycle} event of {domain}"),
                timeout,
                |e| e.at >= since && e.is_libvirt(&domain, lifecycle),
            )
            .map(|e| e.at)
            .with_context(|| self.diagnostics())
    }

    /// The sidecar's log, all starts of its container.
    pub fn sidecar_log(&self) -> String {
        fs::read_to_string(self.layout.logs().join(format!("{SIDECAR}.log"))).unwrap_or_default()
    }

    /// SIGKILLs the sidecar container, as an OOM kill would.
    pub fn kill_sidecar(&mut self) {
        self.sidecar.kill();
    }

    /// Starts the sidecar container again: a new process with the same volumes, no new hook
    /// call from virt-launcher.
    pub fn restart_sidecar(&mut self) -> Result<()> {
        self.sidecar.kill();
        self.sidecar_starts += 1;
        self.sidecar = start_sidecar(&self.layout, self.sidecar_starts)?;
        Ok(())
    }

    /// Waits for the sidecar to exit by itself.
    pub fn wait_sidecar_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.sidecar.wait_exit(timeout)
    }

    /// Pod deletion: the kubelet sends SIGTERM to every container's PID 1 at once.
    pub fn terminate(&mut self) -> Result<()> {
        self.sidecar.signal(libc::SIGTERM)?;
        self.compute.signal(libc::SIGTERM)
    }

    /// The tails of the pod's logs, for error messages.
    pub fn diagnostics(&self) -> String {
        let logs = self.layout.logs();
        format!(
            "pod {}\n--- {SIDECAR} ---\n{}\n--- compute ---\n{}\n--- handler ---\n{}",
            self.layout.path().display(),
            tail(&logs.join(format!("{SIDECAR}.log")), 30),
            tail(&logs.join("compute.log"), 30),
            tail(&logs.join("handler.log"), 15),
        )
    }
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the KubeVirt pod harness must run as root: it builds mount and PID namespaces");
    }
    Ok(())
}

fn start_sidecar(layout: &Layout, start: usize) -> Result<Container> {
    let log = layout.logs().join(format!("{SIDECAR}.log"));
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "=== harness: container {SIDECAR} start {start} ===")?;
    Container::start(SIDECAR, &layout.path().join(format!("{SIDECAR}.sh")), log)
}

fn start_compute(layout: &Layout) -> Result<Container> {
    Container::start(
        "compute",
        &layout.path().join("compute.sh"),
        layout.logs().join("compute.log"),
    )
}

/// Creates the volumes, the compute container's image additions and the host disks.
fn lay_out(layout: &Layout, config: &PodConfig, programs: &GoPrograms) -> Result<()> {
    let owner = match config.mode {
        Mode::NonRoot => NON_ROOT_UID,
        Mode::Root => 0,
    };
    for dir in [layout.logs(), layout.handler_dir()] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // emptyDirs are 0777; a non-root pod's fsGroup 107 owns them.
    for (name, _) in VOLUMES {
        make_dir(&layout.volume(name), 0o777, owner)?;
    }
    make_dir(
        &layout.volume("hook-sidecar-sockets").join(SIDECAR),
        0o777,
        owner,
    )?;
    // Mount points of the volumes that KubeVirt mounts inside the `public` one.
    for inner in VOLUMES
        .iter()
        .filter_map(|(_, mount)| mount.strip_prefix("/run/kubevirt/"))
    {
        make_dir(&layout.volume("public").join(inner), 0o755, owner)?;
    }
    for (volume, image) in &config.host_disks {
        let dir = layout.path().join("disks").join(volume);
        make_dir(&dir, 0o755, owner)?;
        let disk = dir.join("disk.img");
        fs::write(&disk, image).with_context(|| format!("writing {}", disk.display()))?;
        chown(&disk, Some(owner), Some(owner))
            .with_context(|| format!("chown {}", disk.display()))?;
        let mount_point = layout.volume("private").join("vmi-disks").join(volume);
        make_dir(mount_point.parent().expect("has a parent"), 0o755, owner)?;
        make_dir(&mount_point, 0o755, owner)?;
    }

    let compute = layout.compute();
    let tree = kubevirt_tree()?;
    let etc_libvirt = compute.join("etc-libvirt");
    fs::create_dir_all(&etc_libvirt)?;
    for file in ["qemu.conf", "virtqemud.conf"] {
        let from = tree.join("cmd/virt-launcher").join(file);
        fs::copy(&from, etc_libvirt.join(file))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    // virt-launcher starts virtlogd with this file; an empty one means its defaults.
    fs::write(etc_libvirt.join("virtlogd.conf"), "")?;
    fs::set_permissions(&etc_libvirt, fs::Permissions::from_mode(0o755))?;

    let bin = compute.join("image/usr/bin");
    let sbin = compute.join("image/usr/sbin");
    fs::create_dir_all(&bin)?;
    fs::create_dir_all(&sbin)?;
    for program in ["virt-launcher", "virt-launcher-monitor"] {
        std::os::unix::fs::symlink(programs.path(program), bin.join(program))
            .with_context(|| format!("linking {program} into the compute image"))?;
    }
    let virtqemud = sbin.join("virtqemud");
    fs::write(&virtqemud, VIRTQEMUD_STAND_IN)?;
    fs::set_permissions(&virtqemud, fs::Permissions::from_mode(0o755))?;
    for dir in ["var/upper", "var/work"] {
        fs::create_dir_all(compute.join(dir))?;
    }
    write_users(&compute)
}

/// KubeVirt's virt-launcher runs `/usr/sbin/virtqemud -f /var/run/libvirt/virtqemud.conf`.
const VIRTQEMUD_STAND_IN: &str = "#!/bin/sh
# Stand-in for libvirt's modular QEMU daemon, which Debian 12 does not ship: the monolithic
# libvirtd serves the same API with the same arguments. It names its sockets libvirt-sock*
# where virtqemud's are virtqemud-sock*, the names virt-launcher and the sidecar look for.
ln -sf libvirt-sock /var/run/libvirt/virtqemud-sock
ln -sf libvirt-sock-ro /var/run/libvirt/virtqemud-sock-ro
ln -sf libvirt-admin-sock /var/run/libvirt/virtqemud-admin-sock
exec /usr/sbin/libvirtd \"$@\"
";

fn make_dir(path: &Path, mode: u32, owner: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    chown(path, Some(owner), Some(owner)).with_context(|| format!("chown {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// /etc/passwd and /etc/group of the compute image: the machine's, with KubeVirt's `qemu`
/// (107, in group kvm, so that QEMU opens /dev/kvm) and the `libvirt-qemu` user that
/// Debian's privileged libvirtd looks up before it reads qemu.conf.
fn write_users(compute: &Path) -> Result<()> {
    let ours = |line: &str| {
        let mut fields = line.split(':');
        let name = fields.next().unwrap_or_default();
        let id = fields.nth(1).unwrap_or_default();
        matches!(name, "qemu" | "libvirt-qemu") || id == NON_ROOT_UID.to_string()
    };
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let mut out: String = passwd
        .lines()
        .filter(|l| !ours(l))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str("qemu:x:107:107:qemu user:/:/sbin/nologin\n");
    out.push_str("libvirt-qemu:x:64055:64055:Libvirt Qemu:/nonexistent:/usr/sbin/nologin\n");
    fs::write(compute.join("passwd"), out)?;

    let group = fs::read_to_string("/etc/group").context("reading /etc/group")?;
    let mut out = String::new();
    for line in group.lines().filter(|l| !ours(l)) {
        if line.starts_with("kvm:") {
            let members = line.rsplit(':').next().unwrap_or_default();
            let head = &line[..line.len() - members.len()];
            let sep = if members.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{head}{members}{sep}qemu");
        } else {
            let _ = writeln!(out, "{line}");
        }
    }
    if !group.lines().any(|l| l.starts_with("kvm:")) {
        bail!("no group kvm on this machine; `make deps` creates it");
    }
    out.push_str("qemu:x:107:\nlibvirt-qemu:x:64055:\n");
    fs::write(compute.join("group"), out)?;
    for file in ["passwd", "group"] {
        fs::set_permissions(compute.join(file), fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// The gid of group kvm on this machine.
fn kvm_gid() -> Result<u32> {
    let group = fs::read_to_string("/etc/group").context("reading /etc/group")?;
    group
        .lines()
        .find_map(|l| l.strip_prefix("kvm:"))
        .and_then(|rest| rest.split(':').nth(1))
        .context("no group kvm; `make deps` creates it")?
        .parse()
        .context("parsing the gid of group kvm")
}

/// A container runtime's default capabilities (containerd, CRI-O) and the two that KubeVirt
/// adds to a root compute container.
const ROOT_CAPABILITIES: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap,+sys_nice";
/// The same runtime defaults for a root hook sidecar, to which KubeVirt adds nothing.
const ROOT_SIDECAR_CAPABILITIES: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The environment KubeVirt gives non-root containers.
const NON_ROOT_ENV: &str = "XDG_CACHE_HOME=/var/run/kubevirt-private XDG_CONFIG_HOME=/var/run/kubevirt-private XDG_RUNTIME_DIR=/var/run";

/// One word for the shell, quoted.
fn quote(word: impl AsRef<OsStr>) -> String {
    format!(
        "'{}'",
        word.as_ref().to_string_lossy().replace('\'', r"'\''")
    )
}

fn write_compute_script(layout: &Layout, config: &PodConfig, vmi: &Vmi) -> Result<()> {
    let mut s = String::from(
        "# The compute container of a virt-launcher pod (tests/harness/kubevirt_pod.rs).\n",
    );
    s.push_str("mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run\n");
    for (name, mount) in VOLUMES {
        let _ = writeln!(
            s,
            "mkdir -p {mount} && mount --bind {} {mount}",
            quote(layout.volume(name))
        );
    }
    for volume in config.host_disks.keys() {
        let _ = writeln!(
            s,
            "mount --bind {} /run/kubevirt-private/vmi-disks/{volume}",
            quote(layout.path().join("disks").join(volume))
        );
    }
    let c = layout.compute();
    let _ = writeln!(
        s,
        "mount --bind {} /etc/libvirt",
        quote(c.join("etc-libvirt"))
    );
    let _ = writeln!(s, "mount --bind {} /etc/passwd", quote(c.join("passwd")));
    let _ = writeln!(s, "mount --bind {} /etc/group", quote(c.join("group")));
    for dir in ["usr/bin", "usr/sbin"] {
        let _ = writeln!(
            s,
            "mount -t overlay overlay -o lowerdir={}:/{dir} /{dir}",
            c.join("image").join(dir).display()
        );
    }
    let _ = writeln!(
        s,
        "mount -t overlay overlay -o lowerdir=/var,upperdir={},workdir={} /var",
        c.join("var/upper").display(),
        c.join("var/work").display()
    );
    s.push_str(&device_script(config.kvm && !config.use_emulation)?);

    let mut args = vec![
        format!("--qemu-timeout {QEMU_TIMEOUT}"),
        format!("--name {}", vmi.name),
        format!("--uid {}", vmi.uid),
        format!("--namespace {}", vmi.namespace),
        "--kubevirt-share-dir /var/run/kubevirt".into(),
        "--ephemeral-disk-dir /var/run/kubevirt-ephemeral-disks".into(),
        "--container-disk-dir /var/run/kubevirt/container-disks".into(),
        format!("--grace-period-seconds {}", vmi.grace_period_seconds()),
        "--hook-sidecars 1".into(),
        "--ovmf-path /usr/share/OVMF".into(),
        "--hypervisor kvm".into(),
    ];
    let (privileges, env) = match config.mode {
        Mode::NonRoot => {
            args.push("--run-as-nonroot".into());
            (
                format!(
                    "setpriv --reuid={NON_ROOT_UID} --regid={NON_ROOT_UID} --groups={} \
                     --inh-caps=-all,+net_bind_service --ambient-caps=+net_bind_service \
                     --bounding-set=-all,+net_bind_service --no-new-privs --",
                    kvm_gid()?
                ),
                NON_ROOT_ENV,
            )
        }
        Mode::Root => (
            format!("setpriv --inh-caps=-all --bounding-set={ROOT_CAPABILITIES} --"),
            "",
        ),
    };
    if config.use_emulation {
        args.push("--allow-emulation".into());
    }
    let _ = writeln!(
        s,
        "cd /\nexec {privileges} env -i PATH={CONTAINER_PATH} HOME=/ POD_NAME=virt-launcher-{}-test {env} \
         /usr/bin/virt-launcher-monitor {}",
        vmi.name,
        args.join(" ")
    );
    fs::write(layout.path().join("compute.sh"), s).context("writing compute.sh")
}

/// A pod's own /dev: the usual character devices, /dev/kvm when the pod gets it, pts, shm.
fn device_script(kvm: bool) -> Result<String> {
    let mut s = String::from(
        "mount -t tmpfs -o mode=0755,nosuid tmpfs /dev\nmkdir /dev/net /dev/pts /dev/shm\n",
    );
    let mut devices = vec![
        "null", "zero", "full", "random", "urandom", "tty", "net/tun",
    ];
    if kvm {
        devices.push("kvm");
    }
    for device in devices {
        let host = Path::new("/dev").join(device);
        let Ok(meta) = fs::metadata(&host) else {
            if device == "kvm" {
                bail!("the pod should get /dev/kvm, but this machine has none");
            }
            continue;
        };
        let rdev = meta.rdev();
        let _ = writeln!(
            s,
            "mknod -m {:o} /dev/{device} c {} {} && chown {}:{} /dev/{device}",
            meta.mode() & 0o7777,
            libc::major(rdev),
            libc::minor(rdev),
            meta.uid(),
            meta.gid()
        );
    }
    s.push_str(
        "mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts\n\
         ln -s pts/ptmx /dev/ptmx\n\
         mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm\n\
         ln -s /proc/self/fd /dev/fd\n\
         ln -s /proc/self/fd/0 /dev/stdin\n\
         ln -s /proc/self/fd/1 /dev/stdout\n\
         ln -s /proc/self/fd/2 /dev/stderr\n",
    );
    Ok(s)
}

/// The `args` of the VMI's one hook sidecar, read by KubeVirt's own code; see
/// [`LauncherPod::start`].
fn launcher_sidecar_args(handler: &mut Handler, vmi: &Vmi) -> Result<Vec<String>> {
    let answer = handler.call(
        json!({"command": "hookSidecars", "vmi": vmi.json}),
        COMMAND_TIMEOUT,
    )?;
    let sidecars = answer["sidecars"].as_array().cloned().unwrap_or_default();
    let [sidecar] = sidecars.as_slice() else {
        bail!(
            "the harness runs one hook sidecar, the VMI asks for {}: {sidecars:?}",
            sidecars.len()
        );
    };
    let image = sidecar["image"].as_str().unwrap_or_default();
    let repository = image.split(['@', ':']).next().unwrap_or_default();
    ensure!(
        repository.rsplit('/').next() == Some("launcher-sidecar"),
        "the VMI's hook sidecar image {image:?} is not a launcher-sidecar"
    );
    ensure!(
        sidecar["command"].is_null(),
        "the VMI's hook sidecar replaces the image's entrypoint: {sidecar}"
    );
    sidecar["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|arg| {
            arg.as_str()
                .map(str::to_owned)
                .with_context(|| format!("a hook sidecar argument that is not a string: {arg}"))
        })
        .collect()
}

fn write_sidecar_script(
    layout: &Layout,
    config: &PodConfig,
    sidecar: &Path,
    args: &[String],
) -> Result<()> {
    let mut s =
        format!("# Container {SIDECAR} of a virt-launcher pod (tests/harness/kubevirt_pod.rs).\n");
    s.push_str("mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run\n");
    let _ = writeln!(
        s,
        "mkdir -p /run/kubevirt-hooks && mount --bind {} /run/kubevirt-hooks",
        quote(layout.volume("hook-sidecar-sockets").join(SIDECAR))
    );
    if config.libvirt_mount {
        let _ = writeln!(
            s,
            "mkdir -p /run/libvirt && mount --bind {} /run/libvirt && mount -o remount,bind,ro /run/libvirt",
            quote(layout.volume("libvirt-runtime"))
        );
    }
    let (privileges, env) = match config.mode {
        Mode::NonRoot => (
            format!(
                "setpriv --reuid={NON_ROOT_UID} --regid={NON_ROOT_UID} --clear-groups \
                 --inh-caps=-all --bounding-set=-all --no-new-privs --"
            ),
            NON_ROOT_ENV,
        ),
        Mode::Root => (
            format!("setpriv --inh-caps=-all --bounding-set={ROOT_SIDECAR_CAPABILITIES} --"),
            "",
        ),
    };
    let args: Vec<String> = args.iter().map(quote).collect();
    let _ = writeln!(
        s,
        "cd /\nexec {privileges} env -i PATH={CONTAINER_PATH} HOME=/ CONTAINER_NAME={SIDECAR} RUST_LOG=info {env} \
         {} {}",
        quote(sidecar),
        args.join(" ")
    );
    fs::write(layout.path().join(format!("{SIDECAR}.sh")), s).context("writing the sidecar script")
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes pod directories whose test process is gone, and whatever of theirs still runs.
/// Runs once per test process.
fn sweep_stale_pods() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(POD_DIR_PREFIX)
            {
                continue;
            }
            match read_pid(&path.join(OWNER_FILE)) {
                Ok(owner) if process_alive(owner) => continue,
                _ => {}
            }
            // The containers' `unshare` and the handler, root's, name the directory in
            // their arguments; killing `unshare` ends its namespaces.
            for pid in processes_mentioning(0, &path) {
                sigkill(pid);
            }
            let _ = fs::remove_dir_all(&path);
        }
    });
}
