//! A virt-launcher pod as KubeVirt lays it out, without a cluster, for the replay
//! ([`crate::replay`]): the `hook-sidecar-0` container runs the project's real
//! `launcher-sidecar`; the compute container's part (the libvirt daemon, and virt-launcher's
//! calls) is the replay's.
//!
//! # The pod
//!
//! One directory on the host (`/tmp/kvhm-pod-*`) holds the hook socket volume with the
//! container's own subdirectory (`hooks/hook-sidecar-0/`, as KubeVirt ≥ 1.6 mounts it), the
//! compute container's `/var/run/kubevirt-private` (`private/`: the files the domain names),
//! and the container's log. The `libvirt-runtime` volume is the daemon's own
//! `$XDG_RUNTIME_DIR/libvirt` (KubeVirt sets `XDG_RUNTIME_DIR=/var/run`, which makes it
//! `/var/run/libvirt`).
//!
//! `hook-sidecar-0` runs in its own mount and PID namespaces (`unshare`), built by a shell
//! script the harness writes into the pod directory: a tmpfs on /run with only its
//! subdirectory of the hook socket volume at /var/run/kubevirt-hooks (KubeVirt's subPath)
//! and, when the pod has the admission policy's mount, the `libvirt-runtime` volume
//! read-only at /var/run/libvirt. Non-root: uid 107, no capabilities, no new privileges;
//! root: a container runtime's default capabilities. Its arguments are the `args` of the
//! VMI's hook sidecar annotation, as KubeVirt passes them.
//!
//! # Lifetime
//!
//! Every process of the container lives in its PID namespace, and `unshare --kill-child`
//! SIGKILLs the namespace's PID 1 when `unshare` dies, which ends every process in it.
//! [`SidecarContainer`] SIGKILLs its `unshare` on drop, which also happens should the test
//! process die first (PR_SET_PDEATHSIG). A pod directory whose owning test process is gone is
//! removed by the next run. Mounts vanish with the namespaces.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::libvirt::{KUBEVIRT_QEMU_UID, processes_mentioning};
use crate::tools::{process_alive, read_pid, sigkill, wait_until};

/// The one hook sidecar of these pods.
pub const SIDECAR: &str = "hook-sidecar-0";

const POD_DIR_PREFIX: &str = "kvhm-pod-";
const OWNER_FILE: &str = "owner.pid";
/// Where the compute container has its private volume; the domain XML names files there.
pub const KUBEVIRT_PRIVATE: &str = "/var/run/kubevirt-private/";

/// A container runtime's default capabilities (containerd, CRI-O) for a root hook sidecar, to
/// which KubeVirt adds nothing.
const ROOT_SIDECAR_CAPABILITIES: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The environment KubeVirt gives the containers of a non-root pod.
const NON_ROOT_ENV: &str = "XDG_CACHE_HOME=/var/run/kubevirt-private XDG_CONFIG_HOME=/var/run/kubevirt-private XDG_RUNTIME_DIR=/var/run";

/// How the pod's `hook-sidecar-0` is made.
#[derive(Clone, Debug)]
pub struct SidecarSpec {
    /// Root mode: the container runs as root.
    pub root: bool,
    /// The libvirt-runtime volume, mounted read-only at /var/run/libvirt; `None` without the
    /// admission policy's mount.
    pub libvirt_runtime: Option<PathBuf>,
    /// The program and its arguments.
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// The pod directory; see the module docs.
pub struct PodDir {
    dir: tempfile::TempDir,
}

impl PodDir {
    /// Lays a pod out in a new directory, its volumes owned by `owner` (the pod's fsGroup).
    pub fn create(owner: u32) -> Result<Self> {
        ensure_root()?;
        sweep_stale_pods();
        let dir = tempfile::Builder::new()
            .prefix(POD_DIR_PREFIX)
            .tempdir_in("/tmp")
            .context("creating a pod directory in /tmp")?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .context("writing the pod's owner file")?;
        let pod = PodDir { dir };
        fs::create_dir_all(pod.logs()).context("creating the pod's log directory")?;
        // emptyDirs are 0777; a non-root pod's fsGroup owns them.
        for volume in [pod.path().join("hooks"), pod.hook_dir(), pod.private()] {
            make_dir(&volume, 0o777, owner)?;
        }
        Ok(pod)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The container's subdirectory of the hook socket volume.
    pub fn hook_dir(&self) -> PathBuf {
        self.path().join("hooks").join(SIDECAR)
    }

    /// Where virt-launcher finds the sidecar's socket.
    pub fn hook_socket(&self) -> PathBuf {
        self.hook_dir().join(format!("{SIDECAR}.sock"))
    }

    /// The compute container's /var/run/kubevirt-private.
    pub fn private(&self) -> PathBuf {
        self.path().join("private")
    }

    fn logs(&self) -> PathBuf {
        self.path().join("logs")
    }

    pub fn sidecar_log_path(&self) -> PathBuf {
        self.logs().join(format!("{SIDECAR}.log"))
    }

    /// The sidecar's log, every start of its container.
    pub fn sidecar_log(&self) -> String {
        fs::read_to_string(self.sidecar_log_path()).unwrap_or_default()
    }

    /// `path` of the compute container (under [`KUBEVIRT_PRIVATE`]) as the host sees it.
    pub fn host_path(&self, path: &str) -> Option<PathBuf> {
        path.strip_prefix(KUBEVIRT_PRIVATE)
            .map(|rest| self.private().join(rest))
    }

    /// Writes the container's script; [`SidecarContainer::start`] runs it.
    pub fn write_sidecar_script(&self, spec: &SidecarSpec) -> Result<()> {
        let mut s = format!(
            "# Container {SIDECAR} of a virt-launcher pod (tests/harness/launcher_pod.rs).\n"
        );
        s.push_str("mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run\n");
        let _ = writeln!(
            s,
            "mkdir -p /run/kubevirt-hooks && mount --bind {} /run/kubevirt-hooks",
            quote(self.hook_dir())
        );
        if let Some(runtime) = &spec.libvirt_runtime {
            let _ = writeln!(
                s,
                "mkdir -p /run/libvirt && mount --bind {} /run/libvirt && mount -o remount,bind,ro /run/libvirt",
                quote(runtime)
            );
        }
        let (privileges, env) = if spec.root {
            (
                format!("setpriv --inh-caps=-all --bounding-set={ROOT_SIDECAR_CAPABILITIES} --"),
                "",
            )
        } else {
            (
                format!(
                    "setpriv --reuid={KUBEVIRT_QEMU_UID} --regid={KUBEVIRT_QEMU_UID} --clear-groups \
                     --inh-caps=-all --bounding-set=-all --no-new-privs --"
                ),
                NON_ROOT_ENV,
            )
        };
        let args: Vec<String> = spec.args.iter().map(quote).collect();
        let _ = writeln!(
            s,
            "cd /\nexec {privileges} env -i PATH={CONTAINER_PATH} HOME=/ CONTAINER_NAME={SIDECAR} RUST_LOG=info {env} KVHM_POD={} {} {}",
            quote(self.path()),
            quote(&spec.program),
            args.join(" ")
        );
        fs::write(self.script(), s).context("writing the sidecar container's script")
    }

    fn script(&self) -> PathBuf {
        self.path().join(format!("{SIDECAR}.sh"))
    }
}

/// Creates `path` (and its parents) owned by `owner` with `mode`.
pub fn make_dir(path: &Path, mode: u32, owner: u32) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    chown(path, Some(owner), Some(owner)).with_context(|| format!("chown {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// One word for the shell, quoted.
fn quote(word: impl AsRef<OsStr>) -> String {
    format!(
        "'{}'",
        word.as_ref().to_string_lossy().replace('\'', r"'\''")
    )
}

/// The `hook-sidecar-0` container: `unshare` running the pod's script, which builds its
/// namespaces, then execs the sidecar as the namespace's PID 1.
pub struct SidecarContainer {
    child: Option<Child>,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl SidecarContainer {
    /// Starts the container (`start` counts its starts, for the log).
    pub fn start(pod: &PodDir, start: usize) -> Result<Self> {
        let log = pod.sidecar_log_path();
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(file, "=== harness: container {SIDECAR} start {start} ===")?;
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
        .arg(pod.script())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(file.try_clone().context("duplicating the log's handle")?)
        .stderr(file);
        let child = spawn_for_good(cmd).with_context(|| format!("starting container {SIDECAR}"))?;
        Ok(SidecarContainer {
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
            .with_context(|| format!("container {SIDECAR} is not running"))?
            .id();
        let children = fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
            .with_context(|| format!("reading the children of {SIDECAR} (pid {unshare})"))?;
        children
            .split_whitespace()
            .next()
            .with_context(|| format!("container {SIDECAR} has no PID 1 (yet)"))?
            .parse()
            .context("parsing a pid")
    }

    /// Sends `signal` to the container's PID 1, as the kubelet does.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.init_pid()?;
        // SAFETY: kill(2) on the PID 1 of our own container.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!(
                "signal {signal} to {SIDECAR} (pid {pid}): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status once it has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
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

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_until(timeout, &format!("container {SIDECAR} to exit"), || {
            self.try_status()
        })
        .with_context(|| format!("{SIDECAR}'s log:\n{}", tail(&self.log, 40)))
    }

    /// SIGKILL to PID 1, as an OOM kill would: the kernel kills every other process of the
    /// namespace before PID 1 is gone, which this waits for; then `unshare` goes. PID 1 first:
    /// `--kill-child` would not reach it, since the switch to uid 107 clears its parent-death
    /// signal.
    pub fn kill(&mut self) {
        if let Ok(init) = self.init_pid() {
            sigkill(init);
            let _ = wait_until(
                Duration::from_secs(10),
                "a container's PID 1 to exit",
                || Ok((!process_alive(init)).then_some(())),
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(status) = child.wait() {
                self.status = Some(status);
            }
        }
    }
}

impl Drop for SidecarContainer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` with SIGKILL as its parent-death signal, from a thread that lives as long as
/// the test process: the signal follows the thread that spawned the child, and a replay
/// may start a container on a thread that ends before the container should.
fn spawn_for_good(mut cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("container-spawner".into())
            .spawn(move || {
                for (mut cmd, answer) in incoming {
                    let _ = answer.send(cmd.spawn());
                }
            });
        drop(thread);
        Mutex::new(requests)
    });
    // SAFETY: prctl(2) is async-signal-safe and touches nothing but the new process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (answer, answered) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, answer))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answered
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
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

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the pod harness must run as root: it builds mount and PID namespaces");
    }
    Ok(())
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
            // The container's `unshare`, root's, names the directory in its arguments, and its
            // PID 1 (a non-root sidecar outlives `unshare`) in its environment (`KVHM_POD`).
            for uid in [KUBEVIRT_QEMU_UID, 0] {
                for pid in processes_mentioning(uid, &path) {
                    sigkill(pid);
                }
            }
            let _ = fs::remove_dir_all(&path);
        }
    });
}
