//! Proves the harness on real parts: libvirtd + QEMU as the test user, Prometheus, promtool,
//! grpcurl. Needs root and `make deps`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use e2e::libvirt::{GuestKind, LibvirtDaemon, TEST_USER, guest_uid, skip_without_kvm};
use e2e::prometheus::Prometheus;
use e2e::tools::{free_port, grpcurl, http_get, promtool_check_metrics, wait_until};

/// Pids of live processes whose command line or environment mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let mentions = ["cmdline", "environ"].iter().any(|f| {
            std::fs::read(format!("/proc/{pid}/{f}"))
                .is_ok_and(|d| d.windows(needle.len()).any(|w| w == needle))
        });
        if mentions {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_owned()));
        }
    }
    found
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn domstate(daemon: &LibvirtDaemon, name: &str) -> Result<String> {
    Ok(daemon.virsh(&["domstate", name])?.trim().to_owned())
}

/// Drops `daemon` and checks that nothing it started survives, and its directory is gone.
fn drop_and_check_clean(daemon: LibvirtDaemon) -> Result<()> {
    let dir = daemon.runtime_dir().parent().unwrap().to_path_buf();
    drop(daemon);
    let left = processes_mentioning(&dir);
    ensure!(
        left.is_empty(),
        "processes survived the daemon's drop: {left:?}"
    );
    ensure!(!dir.exists(), "{} was not removed", dir.display());
    Ok(())
}

#[test]
fn guests_survive_a_libvirt_restart() -> Result<()> {
    let t0 = Instant::now();
    let mut daemon = LibvirtDaemon::start()?;
    eprintln!("libvirtd ready after {:?}", t0.elapsed());
    assert!(daemon.socket_path().exists());
    assert!(daemon.uri().starts_with("qemu+unix:///session?socket=/"));

    daemon.start_guest("default_vm-tcg", GuestKind::Tcg, false)?;
    daemon.start_guest("default_vm-paused", GuestKind::Tcg, true)?;
    let both = vec!["default_vm-paused".to_owned(), "default_vm-tcg".to_owned()];
    assert_eq!(sorted(daemon.running_domains()?), both);
    assert_eq!(domstate(&daemon, "default_vm-tcg")?, "running");
    assert_eq!(domstate(&daemon, "default_vm-paused")?, "paused");

    // The live XML is what the sidecar reads: domain type and KubeVirt metadata.
    let xml = daemon.virsh(&["dumpxml", "default_vm-tcg"])?;
    assert!(xml.starts_with("<domain type='qemu'"), "{xml}");
    assert!(
        xml.contains(&format!("<uid>{}</uid>", guest_uid("default_vm-tcg"))),
        "{xml}"
    );
    assert!(xml.contains("http://kubevirt.io"), "{xml}");

    // libvirt goes away under running guests and comes back.
    daemon.kill();
    assert!(
        daemon.running_domains().is_err(),
        "a killed daemon still answers"
    );
    daemon.restart()?;
    assert_eq!(sorted(daemon.running_domains()?), both);
    assert_eq!(domstate(&daemon, "default_vm-paused")?, "paused");

    daemon.resume_guest("default_vm-paused")?;
    assert_eq!(domstate(&daemon, "default_vm-paused")?, "running");
    daemon.suspend_guest("default_vm-tcg")?;
    assert_eq!(domstate(&daemon, "default_vm-tcg")?, "paused");

    // A crash: QEMU killed, libvirt notices, the domain stays defined.
    daemon.kill_guest_qemu("default_vm-tcg")?;
    assert_eq!(daemon.running_domains()?, vec!["default_vm-paused"]);
    assert_eq!(domstate(&daemon, "default_vm-tcg")?, "shut off");

    daemon.destroy_guest("default_vm-paused")?;
    assert!(daemon.running_domains()?.is_empty());

    // Drop must clean up even running guests.
    daemon.start_guest("default_vm-tcg", GuestKind::Tcg, false)?;
    drop_and_check_clean(daemon)
}

#[test]
fn drop_kills_guests_when_the_daemon_is_dead() -> Result<()> {
    let mut daemon = LibvirtDaemon::start()?;
    daemon.start_guest("default_vm-orphan", GuestKind::Tcg, false)?;
    daemon.kill();
    drop_and_check_clean(daemon)
}

#[test]
fn kvm_guest_starts_unless_kvm_is_unusable() -> Result<()> {
    if skip_without_kvm("the KVM guest")? {
        return Ok(());
    }
    let daemon = LibvirtDaemon::start()?;
    daemon.start_guest("default_vm-kvm", GuestKind::Kvm, false)?;
    let xml = daemon.virsh(&["dumpxml", "default_vm-kvm"])?;
    assert!(xml.starts_with("<domain type='kvm'"), "{xml}");
    // Really accelerated: QEMU runs with -accel kvm, as the test user.
    let pidfile = daemon
        .runtime_dir()
        .join("libvirt/qemu/run/default_vm-kvm.pid");
    let pid = std::fs::read_to_string(&pidfile)?.trim().to_owned();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("-accel kvm"), "{cmdline}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let expected = std::process::Command::new("id")
        .args(["-u", TEST_USER])
        .output()?;
    let expected = String::from_utf8(expected.stdout)?;
    assert!(
        uid.split_whitespace().nth(1) == Some(expected.trim()),
        "{uid}"
    );
    daemon.destroy_guest("default_vm-kvm")?;
    assert!(daemon.running_domains()?.is_empty());
    drop_and_check_clean(daemon)
}

#[test]
fn commands_run_as_the_daemon_user() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let out = daemon.command_as_daemon_user("id").arg("-un").output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?.trim(), TEST_USER);

    // The daemon's own user reaches the socket too (root does, see virsh()).
    let out = daemon
        .command_as_daemon_user("virsh")
        .args(["-c", &daemon.uri(), "uri"])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?.trim(), daemon.uri());

    // setpriv execs: the child's pid is the program's, so kill() reaches it.
    let mut sleeper = daemon.command_as_daemon_user("sleep").arg("60").spawn()?;
    let comm = wait_until(Duration::from_secs(5), "sleep to exec", || {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", sleeper.id()))?;
        Ok((comm.trim() == "sleep").then_some(comm))
    })?;
    assert_eq!(comm.trim(), "sleep");
    sleeper.kill()?;
    sleeper.wait()?;
    drop_and_check_clean(daemon)
}

/// Serves a fixed exposition over HTTP/1.1, one connection at a time, until the test ends.
fn serve_metrics(body: &'static str) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(port)
}

#[test]
fn prometheus_scrapes_targets() -> Result<()> {
    let live = format!(
        "127.0.0.1:{}",
        serve_metrics(
            "# TYPE kvhm_smoke gauge\nkvhm_smoke{namespace=\"default\",job=\"from-target\"} 1\n",
        )?
    );
    // Nothing listens there: its `up` must be 0.
    let dead = format!("127.0.0.1:{}", free_port());
    let prom = Prometheus::start(&[live.clone(), dead.clone()])?;
    http_get(&format!("{}/-/healthy", prom.url()))?;

    let up = prom.wait_for_query("up", Duration::from_secs(15), |r| r.len() == 2)?;
    for (labels, value) in &up {
        assert_eq!(labels["job"], "node-aggregator");
        let expected = if labels["instance"] == live { 1.0 } else { 0.0 };
        assert_eq!(*value, expected, "{labels:?}");
    }
    assert!(up.iter().any(|(l, _)| l["instance"] == dead));

    // honor_labels: a scraped label wins over the target's own (else it would become
    // `exported_job`), as KubeVirt's ServiceMonitor has it.
    let smoke = prom.query("kvhm_smoke")?;
    assert_eq!(smoke.len(), 1, "{smoke:?}");
    assert_eq!(smoke[0].0["namespace"], "default");
    assert_eq!(smoke[0].0["job"], "from-target", "{smoke:?}");

    assert_eq!(prom.query("1 + 1")?, vec![(Default::default(), 2.0)]);
    let err = prom.query("up{").unwrap_err();
    assert!(format!("{err:#}").contains("bad_data"), "{err:#}");
    Ok(())
}

#[test]
fn tools_work() -> Result<()> {
    promtool_check_metrics("# HELP kvhm_ok A gauge.\n# TYPE kvhm_ok gauge\nkvhm_ok 1\n")
        .context("a clean exposition")?;
    let err = promtool_check_metrics("# TYPE kvhm_bad_total gauge\nkvhm_bad_total 1\n")
        .expect_err("promtool accepts a gauge named _total without HELP");
    assert!(format!("{err:#}").contains("no help text"), "{err:#}");

    // grpcurl prints its version on stderr; what matters here is that it runs.
    grpcurl(&["-version"]).context("grpcurl -version")?;
    let err = grpcurl(&["-plaintext", &format!("127.0.0.1:{}", free_port()), "list"])
        .expect_err("grpcurl against a closed port succeeded");
    assert!(format!("{err:#}").contains("connection refused"), "{err:#}");

    let err = wait_until::<()>(Duration::from_millis(100), "the impossible", || {
        anyhow::bail!("still impossible")
    })
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("the impossible") && msg.contains("still impossible"),
        "{msg}"
    );
    Ok(())
}
