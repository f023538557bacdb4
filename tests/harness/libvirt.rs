//! A private libvirt daemon per test, in the shape of KubeVirt's non-root virt-launcher: a
//! session-mode `libvirtd` running as the unprivileged system user [`TEST_USER`] with its own
//! `XDG_RUNTIME_DIR`, `XDG_CONFIG_HOME`, `XDG_CACHE_HOME` and `HOME` in a temporary directory,
//! so any number of daemons can run side by side (cargo runs tests in parallel threads).
//!
//! # Who can talk to the session socket
//!
//! Root can. The socket (`$XDG_RUNTIME_DIR/libvirt/libvirt-sock`) is owned by the test user
//! with mode 0700, which root bypasses, and libvirt 9.0's session daemon does not compare the
//! peer's uid with its own: `virsh -c <uri> list` run as root lists, defines and starts guests,
//! and those guests still run as the test user. [`LibvirtDaemon::virsh`] relies on that.
//! [`LibvirtDaemon::command_as_daemon_user`] runs a program as the daemon's user anyway, as
//! KubeVirt does (uid 107 for both the compute and the sidecar containers).
//!
//! # Things about libvirt 9.0 in session mode that shaped this code
//!
//! - Probing QEMU's capabilities takes about 8 s per daemon (both `qemu-system-x86_64` and
//!   `qemu-system-i386` are probed on the first API call). The harness copies the probe results
//!   into every new daemon's cache from a shared template in [`CAPS_TEMPLATE_DIR`], which brings
//!   a start down to about 0.1 s; libvirt still validates them (QEMU and libvirt versions, host
//!   CPU, /dev/kvm access) and probes again when they are stale.
//! - libvirt records the CPUID of the CPU the probing thread ran on, including the x2APIC id
//!   of the current CPU (leaf 0x1f), and treats the cache as stale when it differs
//!   ("host cpuid changed"). So `libvirtd` is pinned to one CPU; QEMU is not affected, libvirt
//!   gives it every host CPU.
//! - The daemon spawns `virtlogd` (with `--timeout=120`) for QEMU's console log; it lives in
//!   the same runtime directory and is killed with the rest on drop.
//! - The processes are started through `setpriv` rather than `runuser`: `runuser` forks and
//!   waits, so SIGKILL on it leaves the real process running; `setpriv` execs, so the
//!   `Child` pid is the daemon's own.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::tools::{process_alive, read_pid, run_with_timeout, sigkill, wait_until};

/// The unprivileged user that runs the daemons and their QEMUs (created by `make deps`).
pub const TEST_USER: &str = "kvhm-test";

/// Shared, persistent copy of libvirt's QEMU capabilities cache (see the module docs).
pub const CAPS_TEMPLATE_DIR: &str = "/var/tmp/kvhm-test-qemu-caps";

/// Where daemon directories are made. Not `$TMPDIR`: the test user must be able to reach it,
/// and QEMU's monitor socket path below it must fit the 108-byte limit of unix socket paths.
const BASE_DIR: &str = "/tmp";
const DIR_PREFIX: &str = "kvhm-";
/// Root-owned file in each daemon directory holding the test process's pid, so a later run can
/// clean up after a test process that was killed before its drops ran.
const OWNER_FILE: &str = "harness-owner.pid";

/// Generous: a first start on a machine without a valid capabilities cache probes QEMU
/// (about 8 s alone, more when parallel tests compete for 2 cores).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Which accelerator a guest asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKind {
    /// `<domain type='kvm'>`: hardware acceleration; libvirt refuses to start it without KVM.
    Kvm,
    /// `<domain type='qemu'>`: QEMU's software emulation (TCG).
    Tcg,
}

impl GuestKind {
    /// The `type` attribute of the `<domain>` element.
    pub fn domain_type(self) -> &'static str {
        match self {
            GuestKind::Kvm => "kvm",
            GuestKind::Tcg => "qemu",
        }
    }

    /// The `hypervisor_type` label value the project reports for such a guest (DESIGN.md).
    pub fn hypervisor_type(self) -> &'static str {
        match self {
            GuestKind::Kvm => "kvm",
            GuestKind::Tcg => "qemu-tcg",
        }
    }
}

/// KubeVirt's non-root user (`qemu`, uid and gid 107 in its images).
pub const KUBEVIRT_QEMU_UID: u32 = 107;

/// Who a daemon and its QEMUs run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonUser {
    /// [`TEST_USER`], with its groups (kvm).
    TestUser,
    /// KubeVirt's non-root `qemu` ([`KUBEVIRT_QEMU_UID`], in group kvm), as in a
    /// virt-launcher pod. The uid may be free or someone else's on this machine, and libvirt
    /// looks the user up before it starts a guest, so the daemon runs in a mount namespace of
    /// its own whose /etc/passwd and /etc/group name it; nothing of the machine changes.
    KubevirtQemu,
}

#[derive(Clone, Copy, Debug)]
struct TestUser {
    uid: u32,
    gid: u32,
    /// The kvm group for a user that /etc/group does not list (KubeVirt's `qemu`).
    kvm_gid: Option<u32>,
}

impl TestUser {
    /// `setpriv` arguments that switch to this user with its supplementary groups (`kvm`).
    fn setpriv_args(self) -> [String; 4] {
        [
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
            match self.kvm_gid {
                Some(kvm) => format!("--groups={kvm}"),
                None => "--init-groups".to_owned(),
            },
            "--".to_owned(),
        ]
    }

    fn of(user: DaemonUser) -> Result<Self> {
        match user {
            DaemonUser::TestUser => test_user(),
            DaemonUser::KubevirtQemu => {
                test_user()?; // the same preconditions: root, `make deps`
                Ok(TestUser {
                    uid: KUBEVIRT_QEMU_UID,
                    gid: KUBEVIRT_QEMU_UID,
                    kvm_gid: Some(kvm_gid()?),
                })
            }
        }
    }
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

fn test_user() -> Result<TestUser> {
    static USER: OnceLock<Result<TestUser, String>> = OnceLock::new();
    USER.get_or_init(|| lookup_test_user().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn lookup_test_user() -> Result<TestUser> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the libvirt harness must run as root: it starts libvirtd as {TEST_USER} with setpriv"
        );
    }
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id")
            .args([flag, TEST_USER])
            .output()
            .with_context(|| format!("running `id {flag} {TEST_USER}`"))?;
        if !out.status.success() {
            bail!(
                "system user {TEST_USER} does not exist ({}); run `make deps` as root, it creates \
                 the user and gives it /dev/kvm through group kvm",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("parsing `id {flag} {TEST_USER}` output {text:?}"))
    };
    Ok(TestUser {
        uid: id("-u")?,
        gid: id("-g")?,
        kvm_gid: None,
    })
}

/// A stable per-name uid for the KubeVirt metadata, so tests can predict it.
pub fn guest_uid(name: &str) -> String {
    uuid_from(name, "kubevirt-uid")
}

/// The libvirt domain UUID. Fixed per name so that defining the same name again (after a
/// crash, say) updates the domain instead of clashing with a new random UUID.
fn domain_uuid(name: &str) -> String {
    uuid_from(name, "domain-uuid")
}

fn uuid_from(name: &str, purpose: &str) -> String {
    let half = |salt: u8| {
        // DefaultHasher::new() uses fixed keys: the same name gives the same uid within a build.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (salt, purpose, name).hash(&mut h);
        h.finish()
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&half(1).to_be_bytes());
    b[8..].copy_from_slice(&half(2).to_be_bytes());
    random_uuid_from(b)
}

/// `bytes` shaped as a random (version 4, RFC 4122 variant) UUID, like Kubernetes uids.
fn random_uuid_from(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    });
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML [`LibvirtDaemon::start_guest`] defines: no disk, 64 MiB, one vCPU, a pty
/// console and KubeVirt's metadata with [`guest_uid`].
pub fn guest_xml(name: &str, kind: GuestKind) -> String {
    format!(
        r#"<domain type='{ty}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <kubevirt:kubevirt xmlns:kubevirt="http://kubevirt.io">
      <uid>{uid}</uid>
    </kubevirt:kubevirt>
  </metadata>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <console type='pty'/>
  </devices>
</domain>
"#,
        ty = kind.domain_type(),
        name = xml_escape(name),
        uuid = domain_uuid(name),
        uid = guest_uid(name),
    )
}

/// A session-mode libvirtd of its own, run as [`TEST_USER`]; see the module docs.
///
/// Dropping it destroys every guest, SIGKILLs whatever QEMU, virtlogd or libvirtd is left in
/// its directories and removes them, also while a test panics.
pub struct LibvirtDaemon {
    user: TestUser,
    /// [`DaemonUser::KubevirtQemu`]: the daemon's own /etc/passwd and /etc/group.
    user_files: bool,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
}

impl LibvirtDaemon {
    /// Starts a daemon in a fresh temporary directory and waits until it answers.
    pub fn start() -> Result<Self> {
        let mut this = Self::create(DaemonUser::TestUser)?;
        // The first daemon of this process may have to probe QEMU; let the others wait for its
        // results instead of all probing at once on 2 cores.
        static CAPS_SAVED: Mutex<bool> = Mutex::new(false);
        let saved = CAPS_SAVED.lock().unwrap_or_else(|p| p.into_inner());
        let first = if *saved {
            drop(saved);
            None
        } else {
            Some(saved)
        };
        this.seed_caps()?;
        this.spawn_daemon()?;
        this.wait_ready(&BTreeSet::new())?;
        if let Some(mut saved) = first {
            this.save_caps();
            *saved = true;
        }
        Ok(this)
    }

    /// A daemon's directories, owned by `user`, with nothing in its cache, so that once
    /// [`launch`](Self::launch)ed it probes QEMU on its first calls and answers them seconds
    /// late, as a new virt-launcher's does.
    pub fn fresh(user: DaemonUser) -> Result<Self> {
        Self::create(user)
    }

    /// Starts the daemon of [`fresh`](Self::fresh) and returns as soon as the process runs;
    /// the first `virsh` call waits for it (give it [`START_TIMEOUT`] with
    /// [`virsh_with_timeout`](Self::virsh_with_timeout)).
    pub fn launch(&mut self) -> Result<()> {
        self.spawn_daemon()
    }

    /// The daemon's directories, owned by `user`; no daemon yet.
    fn create(user: DaemonUser) -> Result<Self> {
        let identity = TestUser::of(user)?;
        sweep_stale_dirs();
        start_reaper();

        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir_in(BASE_DIR)
            .with_context(|| format!("creating a daemon directory in {BASE_DIR}"))?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .context("writing the owner pid file")?;
        let this = LibvirtDaemon {
            user: identity,
            user_files: user == DaemonUser::KubevirtQemu,
            dir,
            daemon: None,
        };
        // From here on, a failure drops `this`, which cleans up whatever got started.
        for d in [
            this.dir.path().to_path_buf(),
            this.runtime_dir(),
            this.config_home(),
            this.cache_home(),
            this.home(),
        ] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            this.give_to_user(&d, 0o700)?;
        }
        this.write_host_uuid()?;
        if this.user_files {
            this.write_user_files()?;
        }
        Ok(this)
    }

    /// /etc/passwd and /etc/group for the daemon's mount namespace: the machine's, with
    /// KubeVirt's `qemu` (in group kvm) in place of whatever held its uid or name.
    fn write_user_files(&self) -> Result<()> {
        let uid = self.user.uid.to_string();
        let ours = |line: &str| {
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or_default();
            name == "qemu" || fields.nth(1) == Some(uid.as_str())
        };
        let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
        let mut out: String = passwd
            .lines()
            .filter(|l| !ours(l))
            .map(|l| format!("{l}\n"))
            .collect();
        out.push_str(&format!("qemu:x:{uid}:{uid}:qemu user:/:/sbin/nologin\n"));
        fs::write(self.dir.path().join("passwd"), out).context("writing the daemon's passwd")?;

        let group = fs::read_to_string("/etc/group").context("reading /etc/group")?;
        let mut out = String::new();
        for line in group.lines().filter(|l| !ours(l)) {
            if line.starts_with("kvm:") {
                let sep = if line.ends_with(':') { "" } else { "," };
                out.push_str(&format!("{line}{sep}qemu\n"));
            } else {
                out.push_str(&format!("{line}\n"));
            }
        }
        out.push_str(&format!("qemu:x:{uid}:\n"));
        fs::write(self.dir.path().join("group"), out).context("writing the daemon's group")?;
        for file in ["passwd", "group"] {
            fs::set_permissions(
                self.dir.path().join(file),
                fs::Permissions::from_mode(0o644),
            )?;
        }
        Ok(())
    }

    /// Each daemon plays its own host: libvirt refuses to migrate a guest to the host it is
    /// on, and tells hosts apart by this UUID (this machine has no SMBIOS UUID anyway).
    fn write_host_uuid(&self) -> Result<()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.dir.path(), std::process::id(), Instant::now()).hash(&mut hasher);
        let a = hasher.finish();
        self.dir.path().hash(&mut hasher);
        let b = hasher.finish();
        let uuid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        );
        let dir = self.config_home().join("libvirt");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("libvirtd.conf");
        fs::write(&conf, format!("host_uuid = \"{uuid}\"\n"))
            .with_context(|| format!("writing {}", conf.display()))?;
        self.give_to_user(&dir, 0o700)?;
        self.give_to_user(&conf, 0o600)
    }

    /// Live-migrates a running guest to `target`, as KubeVirt moves a VMI between nodes:
    /// the guest arrives paused on the target, then resumes there (or stays paused with
    /// `stay_paused`), and stops on this daemon with reason `migrated`.
    pub fn migrate_guest(
        &self,
        name: &str,
        target: &LibvirtDaemon,
        stay_paused: bool,
    ) -> Result<()> {
        let migrate_uri = format!("tcp://127.0.0.1:{}", crate::tools::free_port());
        let target_uri = target.uri();
        let mut args = vec![
            "migrate",
            "--live",
            name,
            &target_uri,
            "--migrateuri",
            &migrate_uri,
        ];
        if stay_paused {
            args.push("--suspend");
        }
        self.virsh(&args)
            .with_context(|| format!("migrating {name} to {target_uri}"))?;
        Ok(())
    }

    /// `qemu+unix:///session?socket=<XDG_RUNTIME_DIR>/libvirt/libvirt-sock`
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///session?socket={}",
            self.socket_path().display()
        )
    }

    /// The daemon's unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir().join("libvirt").join("libvirt-sock")
    }

    /// The daemon's `XDG_RUNTIME_DIR` (sockets, pidfiles, QEMU status XML).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `$XDG_RUNTIME_DIR/libvirt`, where the daemon puts its sockets: a virt-launcher pod's
    /// `libvirt-runtime` volume. Made now, owned by the daemon's user, so that it can be
    /// mounted before the daemon starts, as an emptyDir is.
    pub fn libvirt_runtime_dir(&self) -> Result<PathBuf> {
        let dir = self.runtime_dir().join("libvirt");
        if !dir.is_dir() {
            fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            self.give_to_user(&dir, 0o700)?;
        }
        Ok(dir)
    }

    /// libvirtd's stdout and stderr, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("libvirtd.log")
    }

    /// The last `lines` lines of [`log_path`](Self::log_path), for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn config_home(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn cache_home(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn caps_dir(&self) -> PathBuf {
        self.cache_home().join("libvirt/qemu/cache/capabilities")
    }

    fn qemu_run_dir(&self) -> PathBuf {
        self.runtime_dir().join("libvirt/qemu/run")
    }

    /// The environment the daemon and [`command_as_daemon_user`](Self::command_as_daemon_user)
    /// commands get: nothing from the test process but these.
    fn user_env(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("PATH", PATH_ENV.into()),
            ("LC_ALL", "C".into()),
            ("HOME", self.home().into()),
            ("XDG_RUNTIME_DIR", self.runtime_dir().into()),
            ("XDG_CONFIG_HOME", self.config_home().into()),
            ("XDG_CACHE_HOME", self.cache_home().into()),
        ]
    }

    fn give_to_user(&self, path: &Path, mode: u32) -> Result<()> {
        chown(path, Some(self.user.uid), Some(self.user.gid))
            .with_context(|| format!("chown {} to {TEST_USER}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))
    }

    /// Copies the shared capabilities template into this daemon's cache (see module docs).
    fn seed_caps(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(CAPS_TEMPLATE_DIR) else {
            return Ok(());
        };
        let caps = self.caps_dir();
        let mut dir = self.cache_home();
        for part in ["libvirt", "qemu", "cache", "capabilities"] {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
                self.give_to_user(&dir, 0o755)?;
            }
        }
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().ends_with(".xml") {
                continue;
            }
            let dest = caps.join(&name);
            fs::copy(entry.path(), &dest).with_context(|| {
                format!("copying {} to {}", entry.path().display(), dest.display())
            })?;
            self.give_to_user(&dest, 0o600)?;
        }
        Ok(())
    }

    /// Stores this daemon's capabilities in the shared template. Best effort: without it the
    /// next daemon just probes again.
    fn save_caps(&self) {
        let Ok(entries) = fs::read_dir(self.caps_dir()) else {
            return;
        };
        if fs::create_dir_all(CAPS_TEMPLATE_DIR).is_err() {
            return;
        }
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Ok(data) = fs::read(entry.path()) else {
                continue;
            };
            let dest = Path::new(CAPS_TEMPLATE_DIR).join(&name);
            if fs::read(&dest).ok().as_deref() == Some(&data[..]) {
                continue;
            }
            // Write then rename, so a concurrent test process never copies half a file.
            let tmp = Path::new(CAPS_TEMPLATE_DIR).join(format!(
                ".{}.{}.tmp",
                name.to_string_lossy(),
                std::process::id()
            ));
            if fs::write(&tmp, &data).is_ok() && fs::rename(&tmp, &dest).is_err() {
                let _ = fs::remove_file(&tmp);
            }
        }
    }

    fn spawn_daemon(&mut self) -> Result<()> {
        let log_path = self.log_path();
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "=== harness: starting libvirtd ===")
            .with_context(|| format!("writing {}", log_path.display()))?;
        let cpu = first_allowed_cpu()?;

        // unshare, sh, taskset and setpriv all exec, so the child's pid is libvirtd's.
        let mut cmd = if self.user_files {
            let mut cmd = Command::new("unshare");
            cmd.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                .arg(r#"mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/group && shift 2 && exec "$@""#)
                .arg("sh")
                .arg(self.dir.path().join("passwd"))
                .arg(self.dir.path().join("group"))
                .arg("taskset");
            cmd
        } else {
            Command::new("taskset")
        };
        cmd.arg("--cpu-list")
            .arg(cpu.to_string())
            .arg("setpriv")
            .args(self.user.setpriv_args())
            .arg("libvirtd")
            .env_clear()
            .envs(self.user_env())
            .current_dir(self.home())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file handle")?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| {
            format!(
                "starting libvirtd as uid {} via taskset and setpriv",
                self.user.uid
            )
        })?;
        self.daemon = Some(child);
        Ok(())
    }

    /// Waits until the daemon answers an API call and lists every guest in `expect_running`.
    fn wait_ready(&mut self, expect_running: &BTreeSet<String>) -> Result<()> {
        let started = Instant::now();
        let deadline = started + START_TIMEOUT;
        let mut last_error = String::from("the socket never appeared");
        loop {
            let child = self.daemon.as_mut().context("libvirtd is not running")?;
            if let Some(status) = child.try_wait().context("checking on libvirtd")? {
                self.daemon = None;
                bail!(
                    "libvirtd (as {TEST_USER}) exited during startup with {status}; last lines of \
                     {}:\n{}",
                    self.log_path().display(),
                    self.log_tail(30)
                );
            }
            if self.socket_path().exists() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                // `version` is the first call that needs QEMU's capabilities, so once it has
                // answered, starting a guest will not stall on a probe.
                match self.virsh_with_timeout(&["version"], remaining.max(Duration::from_secs(1))) {
                    Ok(_) => match self.running_domains() {
                        Ok(names) => {
                            let running: BTreeSet<String> = names.into_iter().collect();
                            let missing: Vec<&String> =
                                expect_running.difference(&running).collect();
                            if missing.is_empty() {
                                return Ok(());
                            }
                            last_error = format!("running guests not listed yet: {missing:?}");
                        }
                        Err(e) => last_error = format!("{e:#}"),
                    },
                    Err(e) => last_error = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "libvirtd (as {TEST_USER}) was not ready at {} within {:?}: {last_error}; \
                     last lines of {}:\n{}",
                    self.uri(),
                    START_TIMEOUT,
                    self.log_path().display(),
                    self.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `virsh -c <uri> <args>` (as root, see the module docs) and returns its stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        self.virsh_with_timeout(args, VIRSH_TIMEOUT)
    }

    /// [`virsh`](Self::virsh) with another timeout: a fresh daemon's first answers wait for
    /// its QEMU probe.
    pub fn virsh_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c")
            .arg(self.uri())
            .args(args)
            .env_remove("LIBVIRT_DEFAULT_URI")
            .env("LC_ALL", "C");
        let what = format!("virsh {}", args.join(" "));
        let out = run_with_timeout(cmd, None, timeout, &what)
            .with_context(|| format!("on {}", self.uri()))?;
        if !out.status.success() {
            bail!(
                "{what} on {} failed ({}): {}",
                self.uri(),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Defines `name` persistently from [`guest_xml`] and starts it (`--paused` when `paused`),
    /// as virt-launcher does.
    pub fn start_guest(&self, name: &str, kind: GuestKind, paused: bool) -> Result<()> {
        check_name(name)?;
        let guests = self.dir.path().join("guests");
        fs::create_dir_all(&guests).with_context(|| format!("creating {}", guests.display()))?;
        let file = guests.join(format!("{name}.xml"));
        fs::write(&file, guest_xml(name, kind))
            .with_context(|| format!("writing {}", file.display()))?;
        let file = file
            .to_str()
            .context("daemon directory path is not UTF-8")?;
        self.virsh(&["define", file])
            .with_context(|| format!("defining {kind:?} guest {name}"))?;
        let mut args = vec!["start", name];
        if paused {
            args.push("--paused");
        }
        self.virsh(&args)
            .with_context(|| format!("starting {kind:?} guest {name} (paused: {paused})"))?;
        Ok(())
    }

    /// `virsh destroy`: stops the guest at once. It stays defined and can be started again
    /// with [`start_guest`](Self::start_guest); `virsh(&["undefine", name])` removes it.
    pub fn destroy_guest(&self, name: &str) -> Result<()> {
        self.virsh(&["destroy", name])
            .with_context(|| format!("destroying guest {name}"))?;
        Ok(())
    }

    /// `virsh resume`.
    pub fn resume_guest(&self, name: &str) -> Result<()> {
        self.virsh(&["resume", name])
            .with_context(|| format!("resuming guest {name}"))?;
        Ok(())
    }

    /// `virsh suspend` (the guest is then paused, still running for libvirt).
    pub fn suspend_guest(&self, name: &str) -> Result<()> {
        self.virsh(&["suspend", name])
            .with_context(|| format!("suspending guest {name}"))?;
        Ok(())
    }

    /// SIGKILLs the guest's QEMU, as a crash would, and waits until the process is gone and,
    /// when the daemon is up, until libvirt no longer lists the guest as running.
    pub fn kill_guest_qemu(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let pidfile = self.qemu_run_dir().join(format!("{name}.pid"));
        let pid = read_pid(&pidfile).with_context(|| {
            format!("reading QEMU pidfile of guest {name}; is the guest running?")
        })?;
        if !self.is_users_process(pid, |comm| comm.starts_with("qemu")) {
            bail!(
                "pid {pid} from {} is not a running QEMU of {TEST_USER}",
                pidfile.display()
            );
        }
        sigkill(pid);
        wait_until(
            Duration::from_secs(10),
            &format!("QEMU of guest {name} (pid {pid}) to exit"),
            || Ok((!process_alive(pid)).then_some(())),
        )?;
        if self.daemon_alive() {
            wait_until(
                Duration::from_secs(10),
                &format!("libvirt to notice that the QEMU of guest {name} died"),
                || Ok((!self.running_domains()?.iter().any(|n| n == name)).then_some(())),
            )?;
        }
        Ok(())
    }

    /// Names of the active domains (running or paused).
    pub fn running_domains(&self) -> Result<Vec<String>> {
        let out = self
            .virsh(&["list", "--name"])
            .context("listing running domains")?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The daemon's process id while it runs (its own: `setpriv` execs).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// SIGKILLs the daemon only. Its guests keep running, as when libvirt restarts under a
    /// running VM; [`restart`](Self::restart) brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Should the pidfile name another libvirtd of ours (it should not), kill that too.
        if let Ok(pid) = read_pid(&self.runtime_dir().join("libvirt/libvirtd.pid"))
            && self.is_users_process(pid, |comm| comm == "libvirtd")
        {
            sigkill(pid);
        }
    }

    /// Kills the daemon if it still runs, starts it again on the same directories, and waits
    /// until it answers and lists every guest whose QEMU is still alive.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let alive = self.guests_with_live_qemu();
        self.spawn_daemon()?;
        self.wait_ready(&alive)
            .context("waiting for the restarted libvirtd")
    }

    /// A command that runs `program` as [`TEST_USER`] with its groups, in the daemon's
    /// environment (`HOME`, `XDG_*`, a plain `PATH`, and `RUST_LOG`/`RUST_BACKTRACE` when set),
    /// like a sidecar sharing virt-launcher's uid. Add arguments and environment as usual.
    /// The program must be reachable by that user (the workspace's `target/` is). `setpriv`
    /// execs, so the child's pid, kill() and signals are the program's own.
    pub fn command_as_daemon_user(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(self.user.setpriv_args())
            .arg(program)
            .env_clear()
            .envs(self.user_env())
            .current_dir(self.home());
        for key in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        cmd
    }

    fn daemon_alive(&self) -> bool {
        self.daemon.as_ref().is_some_and(|c| process_alive(c.id()))
    }

    /// Guests whose QEMU pidfile names a live QEMU of ours.
    fn guests_with_live_qemu(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for (path, pid) in pidfiles(&self.qemu_run_dir()) {
            if path.file_name().is_some_and(|n| n == "driver.pid") {
                continue;
            }
            if self.is_users_process(pid, |comm| comm.starts_with("qemu"))
                && let Some(stem) = path.file_stem()
            {
                names.insert(stem.to_string_lossy().into_owned());
            }
        }
        names
    }

    /// Whether `pid` is alive, runs as the test user, and its command name passes `comm_ok`.
    fn is_users_process(&self, pid: u32, comm_ok: impl Fn(&str) -> bool) -> bool {
        process_alive(pid)
            && process_uid(pid) == Some(self.user.uid)
            && fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm_ok(comm.trim()))
    }

    /// Every QEMU (by pidfile or by its command line or environment naming our directory),
    /// libvirtd and virtlogd of the test user that belongs to this daemon.
    fn leftover_processes(&self) -> BTreeSet<u32> {
        let mut pids = BTreeSet::new();
        for (path, pid) in pidfiles(&self.qemu_run_dir()) {
            if path.file_name().is_some_and(|n| n != "driver.pid")
                && self.is_users_process(pid, |comm| comm.starts_with("qemu"))
            {
                pids.insert(pid);
            }
        }
        pids.extend(
            processes_mentioning(self.user.uid, self.dir.path())
                .into_iter()
                .filter(|&pid| {
                    self.is_users_process(pid, |comm| {
                        comm.starts_with("qemu") || comm == "libvirtd" || comm == "virtlogd"
                    })
                }),
        );
        pids
    }
}

impl Drop for LibvirtDaemon {
    fn drop(&mut self) {
        if self.daemon_alive() {
            let listed = self.virsh_with_timeout(&["list", "--name"], CLEANUP_TIMEOUT);
            for name in listed.iter().flat_map(|out| out.lines()) {
                let name = name.trim();
                if !name.is_empty() {
                    let _ = self.virsh_with_timeout(&["destroy", name], CLEANUP_TIMEOUT);
                }
            }
        }
        // Whatever destroy missed (or a dead daemon could not reach) goes by SIGKILL.
        let pids = self.leftover_processes();
        self.kill();
        for &pid in &pids {
            sigkill(pid);
        }
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        while pids.iter().any(|&pid| process_alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The TempDir field removes the directory after this.
    }
}

/// Whether KVM guests cannot run for [`TEST_USER`], and why. Checked once per test process:
/// /dev/kvm, its permissions for the user, and then a real paused KVM guest in a throwaway
/// daemon. `None` means KVM guests work.
pub fn kvm_unusable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(probe_kvm).clone()
}

/// Whether a test leaves out `what`, which needs KVM guests: `true` (and the reason printed)
/// where they cannot run. On CI (`CI` set) an error instead: its machines have KVM, so a
/// missing or broken /dev/kvm is a fault to see, not a reason to pass.
pub fn skip_without_kvm(what: &str) -> Result<bool> {
    let Some(reason) = kvm_unusable_reason() else {
        return Ok(false);
    };
    ensure!(
        std::env::var_os("CI").is_none(),
        "{what} needs KVM, which CI machines have: {reason}"
    );
    // Past the test harness's output capture: a skip must show.
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {reason}");
    Ok(true)
}

fn probe_kvm() -> Option<String> {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Some(
            "/dev/kvm does not exist (no hardware virtualisation, or not passed into this \
             VM/container)"
                .into(),
        );
    }
    let user = match test_user() {
        Ok(user) => user,
        Err(e) => return Some(format!("{e:#}")),
    };
    let accessible = Command::new("setpriv")
        .args(user.setpriv_args())
        .args(["test", "-r", "/dev/kvm", "-a", "-w", "/dev/kvm"])
        .status()
        .is_ok_and(|s| s.success());
    if !accessible {
        let perms = Command::new("stat")
            .args(["-c", "%U:%G %a", "/dev/kvm"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        return Some(format!(
            "/dev/kvm ({perms}) is not readable and writable by {TEST_USER}; `make deps` makes it \
             root:kvm 0660 and puts {TEST_USER} in group kvm"
        ));
    }
    let probe = || -> Result<()> {
        let daemon = LibvirtDaemon::start()?;
        daemon.start_guest("kvm-probe", GuestKind::Kvm, true)?;
        daemon.destroy_guest("kvm-probe")
    };
    probe()
        .err()
        .map(|e| format!("a KVM guest does not start as {TEST_USER}: {e:#}"))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("unusable guest name {name:?}");
    }
    Ok(())
}

/// The first CPU this process may run on (see the module docs on why libvirtd is pinned).
fn first_allowed_cpu() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    let first = list.trim().split([',', '-']).next().unwrap_or_default();
    first
        .parse()
        .with_context(|| format!("parsing Cpus_allowed_list {list:?}"))
}

fn pidfiles(dir: &Path) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
        .filter_map(|p| read_pid(&p).ok().map(|pid| (p, pid)))
        .collect()
}

fn process_uid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Live processes of `uid` whose command line or environment contains `dir`.
pub(crate) fn processes_mentioning(uid: u32, dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_uid(pid) == Some(uid) && process_alive(pid))
        .filter(|pid| {
            ["cmdline", "environ"].iter().any(|f| {
                fs::read(format!("/proc/{pid}/{f}"))
                    .is_ok_and(|data| data.windows(needle.len()).any(|w| w == needle))
            })
        })
        .collect()
}

/// Cleans up after test processes that died without running their drops (killed by a
/// timeout, say): their daemon directories still exist, with an owner pid that is gone.
/// Runs once per test process.
fn sweep_stale_dirs() {
    let uids: Vec<u32> = test_user()
        .map(|u| u.uid)
        .into_iter()
        .chain([KUBEVIRT_QEMU_UID])
        .collect();
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = fs::read_dir(BASE_DIR) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            let Ok(owner) = read_pid(&path.join(OWNER_FILE)) else {
                continue;
            };
            if process_alive(owner) {
                continue;
            }
            for &uid in &uids {
                for pid in processes_mentioning(uid, &path) {
                    sigkill(pid);
                }
            }
            let _ = fs::remove_dir_all(&path);
        }
    });
}

/// Makes the test process the reaper of the QEMUs and virtlogds its daemons start, and reaps
/// them as soon as they exit. libvirt daemonises them, so they are orphans; `virsh destroy`
/// and libvirt's crash handling wait until the pid is gone, and a zombie is not gone. An init
/// that reaps lazily (seconds, on some CI VMs) or never (a container without one) would make
/// every destroy slow or fail. Only those zombies are reaped: never a child that other code
/// holds a `Child` for.
fn start_reaper() {
    static REAPER: OnceLock<()> = OnceLock::new();
    REAPER.get_or_init(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes plain integers and affects only this process.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            // Best effort: without it the init process reaps them, only later.
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("kvhm-reaper".into())
            .spawn(|| {
                loop {
                    reap_orphans();
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        drop(spawned);
    });
}

fn reap_orphans() {
    // Cheap check first: is there any exited child at all? WNOWAIT leaves it to its owner.
    // SAFETY: siginfo_t is plain data; waitid only writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a siginfo_t; WNOHANG never blocks, WNOWAIT reaps nothing.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid to read after a successful waitid (0 when nothing exited).
    if rc != 0 || unsafe { info.si_pid() } == 0 {
        return;
    }
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next());
        let ours = comm.starts_with("qemu") || comm == "virtlogd";
        if ours
            && state == Some("Z")
            && ppid == Some(&me.to_string())
            && let Ok(pid) = libc::pid_t::try_from(pid)
        {
            // SAFETY: reaps exactly this zombie child, which no Child handle owns.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }
}
