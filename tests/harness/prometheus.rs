//! A private Prometheus server per test (Debian's `/usr/bin/prometheus`), scraping the given
//! targets every second on loopback, with its own config and TSDB in a temporary directory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::tools::{
    free_port, http_get, http_get_any, process_alive, read_pid, sigkill, wait_until,
};

/// The binary from Debian's `prometheus` package (`make deps`).
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// The scrape job; its name is what `up{job=...}` and the project's queries use.
pub const JOB: &str = "node-aggregator";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const DIR_PREFIX: &str = "kvhm-prometheus-";
/// Root-owned files in each directory, so that a later test process can kill a Prometheus
/// whose test process was killed before its drop ran.
const OWNER_FILE: &str = "harness-owner.pid";
const PID_FILE: &str = "prometheus.pid";

/// One element of an instant vector: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

pub struct Prometheus {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, e.g. `127.0.0.1:9441`) every second
    /// as job `node-aggregator` with `honor_labels: true` (as KubeVirt's ServiceMonitor), and
    /// waits until it reports ready.
    ///
    /// The first scrape comes about 5.5 s after that: Prometheus's discovery manager hands
    /// even static targets to the scrape manager on a fixed 5 s tick (not configurable in
    /// 2.42), so give the first [`wait_for_query`](Self::wait_for_query) 15 s or so.
    pub fn start(targets: &[String]) -> Result<Self> {
        sweep_stale_dirs();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .context("creating a directory for Prometheus")?;
        fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .context("writing the owner pid file")?;
        let config = dir.path().join("prometheus.yml");
        fs::write(&config, config_yaml(targets))
            .with_context(|| format!("writing {}", config.display()))?;
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config)
            .output()
            .context("running promtool check config")?;
        if !check.status.success() {
            bail!(
                "promtool rejects the generated Prometheus config: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }

        // free_port() can race with another process taking the port before Prometheus binds
        // it; try again with a new one in that case.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match launch(dir.path(), &config) {
                Ok((child, port)) => return Ok(Prometheus { dir, child, port }),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    /// The last `lines` lines of Prometheus's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Evaluates `promql` now through `/api/v1/query`. A vector result gives one entry per
    /// series; a scalar gives one entry with no labels.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let url = format!("{}/api/v1/query", self.url());
        let (status, body) = http_get_any(&url, &[("query", promql)])
            .with_context(|| format!("querying Prometheus for {promql}"))?;
        parse_query_response(&body)
            .with_context(|| format!("query {promql} (HTTP {status}): {}", body.trim()))
    }

    /// Polls [`query`](Self::query) until `predicate` accepts the result, which it returns.
    /// On timeout the error shows the last result.
    pub fn wait_for_query(
        &self,
        promql: &str,
        timeout: Duration,
        mut predicate: impl FnMut(&[Sample]) -> bool,
    ) -> Result<Vec<Sample>> {
        wait_until(timeout, &format!("Prometheus query {promql}"), || {
            let result = self.query(promql)?;
            if predicate(&result) {
                Ok(Some(result))
            } else {
                bail!("last result: {result:?}")
            }
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The TempDir field removes the config and TSDB after this.
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs Prometheus on a free port and waits until it is ready; kills it on failure.
fn launch(dir: &Path, config: &Path) -> Result<(Child, u16)> {
    let port = free_port();
    let log_path = dir.join("prometheus.log");
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = Command::new(PROMETHEUS_BIN)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicating the log file handle")?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!("starting {PROMETHEUS_BIN} (from `make deps`, Debian package prometheus)")
        })?;
    // Best effort: only the sweep of a later test process reads it.
    let _ = fs::write(dir.join(PID_FILE), child.id().to_string());
    let url = format!("http://127.0.0.1:{port}/-/ready");
    let deadline = Instant::now() + READY_TIMEOUT;
    let failure = loop {
        match child.try_wait() {
            Ok(Some(status)) => break format!("Prometheus exited during startup with {status}"),
            Ok(None) => {}
            Err(e) => break format!("checking on Prometheus: {e}"),
        }
        let last = match http_get(&url) {
            Ok(_) => return Ok((child, port)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            break format!("Prometheus was not ready at {url} within {READY_TIMEOUT:?}: {last:#}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "{failure}; last lines of {}:\n{}",
        log_path.display(),
        log_tail(&log_path, 20)
    )
}

fn config_yaml(targets: &[String]) -> String {
    // JSON strings are valid YAML scalars, so quoting cannot go wrong.
    let targets: Vec<String> = targets
        .iter()
        .map(|t| serde_json::to_string(t).expect("a string serialises"))
        .collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: {JOB}\n    honor_labels: true\n    static_configs:\n      \
         - targets: [{}]\n",
        targets.join(", ")
    )
}

fn parse_query_response(body: &str) -> Result<Vec<Sample>> {
    let json: Value = serde_json::from_str(body).context("answer is not JSON")?;
    if json["status"] != "success" {
        bail!(
            "Prometheus answered {}: {}",
            json["errorType"].as_str().unwrap_or("an error"),
            json["error"].as_str().unwrap_or("(no message)")
        );
    }
    let data = &json["data"];
    let sample_value = |v: &Value| -> Result<f64> {
        // A sample is [unix_time, "value"]; values are strings so that NaN and ±Inf fit.
        let text = v[1].as_str().context("sample value is not a string")?;
        text.parse::<f64>()
            .with_context(|| format!("sample value {text:?} is not a number"))
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .context("vector result is not an array")?
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .context("series without a metric object")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Ok((labels, sample_value(&series["value"])?))
            })
            .collect(),
        Some("scalar") => Ok(vec![(BTreeMap::new(), sample_value(&data["result"])?)]),
        other => bail!("unsupported result type {other:?} (expected an instant vector)"),
    }
}

/// Kills the Prometheus of test processes that died without running their drops, and removes
/// their directories. Runs once per test process.
fn sweep_stale_dirs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                continue;
            }
            match read_pid(&path.join(OWNER_FILE)) {
                Ok(owner) if !process_alive(owner) => {}
                _ => continue,
            }
            if let Ok(pid) = read_pid(&path.join(PID_FILE))
                && process_alive(pid)
                && fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "prometheus")
            {
                sigkill(pid);
            }
            let _ = fs::remove_dir_all(&path);
        }
    });
}
