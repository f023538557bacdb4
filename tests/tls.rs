//! The metrics endpoint over TLS, and a certificate rotation without a restart,
//! checked with curl against the CA that signed each certificate.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use e2e::binaries::binary;
use e2e::tools::{TOOL_TIMEOUT, free_port, run_with_timeout, wait_until};

/// A CA and a certificate for localhost/127.0.0.1 signed by it, made with openssl.
fn issue(dir: &Path, ca_name: &str) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("openssl");
        cmd.args(args).current_dir(dir);
        let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "openssl")?;
        if !out.status.success() {
            bail!("openssl {}: {}", args.join(" "), out.stderr.trim());
        }
        Ok(())
    };
    let subject = format!("/CN={ca_name}");
    // A P-256 key and, with `args`, either a self-signed CA or a signing request.
    let new_key = |args: &[&str]| {
        let key = [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(&[&key[..], args].concat())
    };
    new_key(&[
        "-x509", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", &subject,
    ])?;
    new_key(&[
        "-keyout",
        "new.key",
        "-out",
        "tls.csr",
        "-subj",
        "/CN=node-aggregator",
    ])?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "new.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ])?;
    // Swapped in by rename, as a Secret volume update does, so the aggregator
    // never reads half a file.
    std::fs::rename(dir.join("new.key"), dir.join("tls.key"))?;
    std::fs::rename(dir.join("new.crt"), dir.join("tls.crt"))?;
    Ok(())
}

/// GET /metrics with curl, trusting only `ca`.
fn curl(port: u16, ca: &Path) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "5",
        "--cacert",
    ])
    .arg(ca)
    .arg(format!("https://localhost:{port}/metrics"));
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "curl")?;
    if !out.status.success() {
        bail!("curl: {}", out.stderr.trim());
    }
    Ok(out.stdout)
}

#[test]
fn metrics_over_tls_follow_a_certificate_rotation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    issue(dir.path(), "first-ca")?;
    let first_ca = dir.path().join("first-ca.pem");
    std::fs::rename(dir.path().join("ca.pem"), &first_ca)?;

    let metrics_port = free_port();
    let mut aggregator = Command::new(binary("node-aggregator")?)
        .args(["--node-name", "node-1"])
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .arg("--metrics-tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--metrics-tls-key")
        .arg(dir.path().join("tls.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("aggregator.log"))?)
        .spawn()
        .context("starting node-aggregator")?;
    let log = || std::fs::read_to_string(dir.path().join("aggregator.log")).unwrap_or_default();

    let result = (|| -> Result<()> {
        let body = wait_until(Duration::from_secs(10), "HTTPS /metrics", || {
            Ok(curl(metrics_port, &first_ca).ok())
        })
        .with_context(log)?;
        assert!(body.contains("kubevirt_vmi_hypervisor_info"), "{body}");

        // Plain HTTP on the TLS port gets nothing useful.
        let plain = e2e::tools::http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"));
        assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");

        // Rotate to a certificate from another CA: new connections get it.
        issue(dir.path(), "second-ca")?;
        let second_ca = dir.path().join("ca.pem");
        wait_until(Duration::from_secs(20), "the rotated certificate", || {
            Ok(curl(metrics_port, &second_ca).ok())
        })
        .with_context(log)?;
        assert!(
            curl(metrics_port, &first_ca).is_err(),
            "the old certificate is still served"
        );
        assert!(
            log().contains("reloaded the metrics TLS certificate"),
            "{}",
            log()
        );

        // A broken pair is refused and the working one kept.
        std::fs::write(dir.path().join("tls.key"), "not a key")?;
        wait_until(
            Duration::from_secs(20),
            "the broken key to be noticed",
            || {
                Ok(log()
                    .contains("keeping the previous metrics TLS certificate")
                    .then_some(()))
            },
        )
        .with_context(log)?;
        curl(metrics_port, &second_ca).context("the last good certificate must stay")?;
        Ok(())
    })();
    let _ = aggregator.kill();
    let _ = aggregator.wait();
    result
}
