//! The project's own binaries, run as real processes on loopback.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::launcher_pod::SIDECAR;
use crate::tools::{free_port, http_get, wait_until};

/// A built binary of this workspace, next to the test executable's directory.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // Tests run from target/<profile>/deps/, the demo from target/<profile>/.
    let mut dir = exe.parent().context("the executable has no directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the binaries first (`cargo build --workspace --bins`, which `make test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// One `kubevirt_vmi_hypervisor_info` series: its labels.
pub type Labels = BTreeMap<String, String>;

/// A running node-aggregator with its own ports and log file.
pub struct Aggregator {
    child: Option<Child>,
    node: String,
    grpc_port: u16,
    metrics_port: u16,
    dir: TempDir,
    starts: usize,
    /// Flags added to every start, e.g. limits and keepalive timeouts.
    extra_args: Vec<String>,
}

impl Aggregator {
    pub fn start(node: &str) -> Result<Self> {
        Self::start_with(node, &[])
    }

    /// Starts it with `extra_args` after the harness's own flags; a restart keeps them.
    pub fn start_with(node: &str, extra_args: &[&str]) -> Result<Self> {
        let mut aggregator = Aggregator {
            child: None,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            node: node.to_string(),
            grpc_port: free_port(),
            metrics_port: free_port(),
            dir: tempfile::Builder::new()
                .prefix("node-aggregator.")
                .tempdir()
                .context("creating the aggregator's temp dir")?,
            starts: 0,
        };
        aggregator.spawn()?;
        Ok(aggregator)
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("aggregator-{}.log", self.starts));
        let child = Command::new(binary("node-aggregator")?)
            .args(["--node-name", &self.node])
            .args(["--grpc-listen", &self.grpc_addr()])
            .args([
                "--metrics-listen",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).context("creating the aggregator log")?)
            .spawn()
            .context("starting node-aggregator")?;
        self.child = Some(child);
        wait_until(Duration::from_secs(10), "node-aggregator /readyz", || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("node-aggregator exited with {status}: {}", self.log());
            }
            Ok(http_get(&self.url("/readyz")).ok().map(|_| ()))
        })
    }

    /// `127.0.0.1:PORT` of the gRPC services, as grpcurl takes it.
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The address a sidecar's `--aggregator` takes.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr())
    }

    /// `127.0.0.1:PORT` of /metrics, as a Prometheus target.
    pub fn metrics_target(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics_target())
    }

    pub fn metrics(&self) -> Result<String> {
        http_get(&self.url("/metrics"))
    }

    /// The labels of every `kubevirt_vmi_hypervisor_info` series on /metrics.
    pub fn series(&self) -> Result<Vec<Labels>> {
        info_series(&self.metrics()?)
    }

    /// The VMI names on /metrics, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .series()?
            .into_iter()
            .map(|labels| labels["name"].clone())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Waits until the VMI names on /metrics are exactly `expected`; returns how long it took.
    pub fn wait_for_names(&self, expected: &[&str], timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        let mut last = Vec::new();
        wait_until(timeout, &format!("series {expected:?} on /metrics"), || {
            last = self.names()?;
            Ok((last == expected).then_some(()))
        })
        .with_context(|| format!("last seen: {last:?}; aggregator log:\n{}", self.log()))?;
        Ok(started.elapsed())
    }

    pub fn log(&self) -> String {
        let path = self
            .dir
            .path()
            .join(format!("aggregator-{}.log", self.starts));
        std::fs::read_to_string(&path).unwrap_or_else(|err| format!("({}: {err})", path.display()))
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its resident memory now (`VmRSS` of /proc/PID/status).
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("the aggregator is not running")?;
        rss_bytes(pid)
    }

    /// The value of the sample `name{labels}` on /metrics (labels given must match, others
    /// may exist); `None` when there is no such sample.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        sample_value(&self.metrics()?, name, labels)
    }

    /// SIGKILL, as when the node's aggregator pod dies.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Parses the `kubevirt_vmi_hypervisor_info` series out of an exposition.
pub fn info_series(exposition: &str) -> Result<Vec<Labels>> {
    let scrape = prometheus_parse::Scrape::parse(exposition.lines().map(|l| Ok(l.to_string())))
        .context("parsing the /metrics exposition")?;
    Ok(scrape
        .samples
        .into_iter()
        .filter(|sample| sample.metric == "kubevirt_vmi_hypervisor_info")
        .map(|sample| {
            sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .collect())
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
pub fn sample_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
    let scrape = prometheus_parse::Scrape::parse(exposition.lines().map(|l| Ok(l.to_string())))
        .context("parsing the /metrics exposition")?;
    Ok(scrape
        .samples
        .into_iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| sample.labels.get(k).is_some_and(|value| value == *v))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        }))
}

/// `VmRSS` of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .context("no VmRSS in /proc/PID/status")?
        .trim()
        .parse()
        .context("parsing VmRSS")?;
    Ok(kib * 1024)
}

/// A running launcher-sidecar.
pub struct Sidecar {
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Sidecar {
    /// Starts a sidecar outside KubeVirt (no hook socket): libvirt at `libvirt_uri`,
    /// reporting to `aggregator`.
    pub fn start(libvirt_uri: &str, aggregator: &str, extra_args: &[&str]) -> Result<Self> {
        let mut args = vec![
            "--libvirt-uri",
            libvirt_uri,
            "--aggregator",
            aggregator,
            "--no-hooks",
        ];
        args.extend_from_slice(extra_args);
        Self::spawn(&args, None)
    }

    /// Starts a sidecar as KubeVirt does in a virt-launcher pod: its hook socket is
    /// `<hooks_dir>/<container_name>.sock`, the name coming from `CONTAINER_NAME`.
    pub fn start_in_pod(
        libvirt_uri: &str,
        aggregator: &str,
        hooks_dir: &Path,
        container_name: &str,
    ) -> Result<Self> {
        let hooks_dir = hooks_dir.to_str().context("hooks dir is not UTF-8")?;
        Self::spawn(
            &[
                "--libvirt-uri",
                libvirt_uri,
                "--aggregator",
                aggregator,
                "--hooks-dir",
                hooks_dir,
            ],
            Some(container_name),
        )
    }

    fn spawn(args: &[&str], container_name: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("launcher-sidecar.")
            .tempdir()
            .context("creating the sidecar's temp dir")?;
        let log = dir.path().join("sidecar.log");
        let mut command = Command::new(binary("launcher-sidecar")?);
        command
            .args(args)
            .env("RUST_LOG", "info")
            // Whatever the machine running the tests calls its own container.
            .env_remove("CONTAINER_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).context("creating the sidecar log")?);
        if let Some(name) = container_name {
            command.env("CONTAINER_NAME", name);
        }
        let child = command.spawn().context("starting launcher-sidecar")?;
        Ok(Sidecar {
            child: Some(child),
            log,
            _dir: dir,
        })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no withdrawal, no clean end of stream.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the process freezes with its connections open, a half-open peer for the
    /// aggregator (the kernel still acknowledges TCP, nothing answers HTTP/2 pings).
    pub fn stop(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`stop`](Self::stop).
    pub fn cont(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: i32) -> Result<()> {
        let pid = self.pid().context("the sidecar is not running")?;
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `signal` and waits for the exit.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_ref().context("the sidecar is not running")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        self.wait_exit(timeout)
    }

    /// Waits for the sidecar to exit by itself (after the Shutdown hook).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the sidecar is not running")?;
        let status = wait_until(timeout, "the sidecar to exit", || Ok(child.try_wait()?));
        if status.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status.with_context(|| self.log())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A sidecar in a virt-launcher pod of its own, as container [`SIDECAR`], with the pod's
/// hooks dir.
pub struct SidecarPod {
    pub sidecar: Sidecar,
    hooks_dir: TempDir,
}

impl SidecarPod {
    pub fn start(libvirt_uri: &str, aggregator: &Aggregator) -> Result<Self> {
        let hooks_dir = tempfile::tempdir().context("creating a hooks dir")?;
        Self::start_in(hooks_dir, libvirt_uri, aggregator)
    }

    /// With `hooks_dir` as the pod's hooks dir, which may hold files already.
    pub fn start_in(
        hooks_dir: TempDir,
        libvirt_uri: &str,
        aggregator: &Aggregator,
    ) -> Result<Self> {
        let sidecar = Sidecar::start_in_pod(
            libvirt_uri,
            &aggregator.grpc_url(),
            hooks_dir.path(),
            SIDECAR,
        )?;
        Ok(SidecarPod { sidecar, hooks_dir })
    }

    /// The hook socket the sidecar serves.
    pub fn socket(&self) -> PathBuf {
        self.hooks_dir.path().join(format!("{SIDECAR}.sock"))
    }
}
