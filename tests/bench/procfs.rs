//! What a process costs, read from /proc: resident and private memory, CPU time.

use std::fs;

use anyhow::{Context, Result};

/// A process's memory, from /proc/PID/smaps_rollup (bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Resident set: everything mapped and in RAM, shared library and binary pages included.
    pub rss: u64,
    /// Anonymous pages: heap, stacks, written data. No other process shares these here
    /// (nothing forks), so this is what each further instance adds to the node.
    pub anonymous: u64,
    /// Pages only this process maps, clean or dirty (includes its own binary's pages
    /// when no other process runs the same binary).
    pub private: u64,
    /// Proportional set: each resident page divided by the number of processes mapping it.
    pub proportional: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| kib_field(&text, name, &path);
    Ok(Memory {
        rss: field("Rss")?,
        anonymous: field("Anonymous")?,
        private: field("Private_Clean")? + field("Private_Dirty")?,
        proportional: field("Pss")?,
    })
}

/// `MemAvailable` of /proc/meminfo: what can be allocated without swapping, in bytes.
pub fn mem_available() -> Result<u64> {
    let path = "/proc/meminfo";
    let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    kib_field(&text, "MemAvailable", path)
}

/// The `NAME:   N kB` line of a /proc file, in bytes.
fn kib_field(text: &str, name: &str, path: &str) -> Result<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .with_context(|| format!("no {name} in {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {name} in {path}"))?;
    Ok(kib * 1024)
}

/// CPU time the process has used so far, all its threads together, in nanoseconds.
///
/// Summed over /proc/PID/task/*/schedstat (the scheduler's own nanosecond accounting)
/// rather than utime+stime of /proc/PID/stat, whose 10 ms ticks are as coarse as the
/// sidecar's whole idle budget. Threads that exited are not counted; the measured
/// processes keep their threads.
pub fn cpu_ns(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = entry.with_context(|| format!("listing {dir}"))?.path();
        let Ok(text) = fs::read_to_string(path.join("schedstat")) else {
            // The thread ended between listing and reading.
            continue;
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse()
            .with_context(|| format!("parsing {}/schedstat", path.display()))?;
        total += ns;
    }
    Ok(total)
}

/// utime + stime of /proc/PID/stat in nanoseconds: a cross-check of [`cpu_ns`] at tick
/// resolution that also counts threads that have exited.
pub fn cpu_ticks_ns(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name, which may itself hold ')'.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("no command name in {path}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .with_context(|| format!("{path} has no field {i}"))?
            .parse::<u64>()
            .with_context(|| format!("parsing field {i} of {path}"))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Ok((ticks(14)? + ticks(15)?) * 1_000_000_000 / hz)
}

/// Number of open file descriptors.
pub fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .count())
}
