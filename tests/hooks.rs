//! The sidecar as virt-launcher sees it: a hook socket spoken to by grpcurl,
//! a Go gRPC client like virt-launcher's own, with this repository's .proto files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use e2e::binaries::{Aggregator, SidecarPod};
use e2e::launcher_pod::SIDECAR;
use e2e::libvirt::{GuestKind, LibvirtDaemon, guest_uid};
use e2e::tools::{TOOL_TIMEOUT, run_with_timeout, wait_until};
use launcher_sidecar::hook::DEFINITION_GRACE;
use serde_json::{Value, json};

/// libvirt is out of reach: the sidecar has only what the hooks tell it.
const NO_LIBVIRT: &str = "qemu+unix:///session?socket=/nonexistent/libvirt-sock";
const PROTOS: [&str; 4] = [
    "kubevirt/hooks/info/api_info.proto",
    "kubevirt/hooks/v1alpha1/api_v1alpha1.proto",
    "kubevirt/hooks/v1alpha2/api_v1alpha2.proto",
    "kubevirt/hooks/v1alpha3/api_v1alpha3.proto",
];

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

/// Calls `method` on the hook socket with `request` (JSON, fed on stdin so that
/// a megabyte of XML fits) and returns the JSON answer.
fn call(socket: &Path, method: &str, request: &Value) -> Result<Value> {
    let mut cmd = Command::new("grpcurl");
    // virt-launcher sends `:authority: localhost` on hook sockets since KubeVirt 1.0
    // (kubevirt/kubevirt#9552); grpcurl would send the socket path, which HTTP/2 forbids.
    cmd.args([
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-max-msg-sz",
        "16777216",
    ])
    .arg("-import-path")
    .arg(proto_dir());
    for proto in PROTOS {
        cmd.args(["-proto", proto]);
    }
    cmd.args(["-d", "@"]).arg(socket).arg(method);
    let input = serde_json::to_vec(request)?;
    let out = run_with_timeout(
        cmd,
        Some(&input),
        TOOL_TIMEOUT,
        &format!("grpcurl {method}"),
    )?;
    if !out.status.success() {
        bail!("{method} failed ({}): {}", out.status, out.stderr.trim());
    }
    serde_json::from_str(&out.stdout).with_context(|| format!("{method} answered:\n{}", out.stdout))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A domain XML as virt-launcher writes it, with the VMI's uid in KubeVirt's metadata.
fn kubevirt_domain_xml(namespace: &str, name: &str, domain_type: &str, padding: usize) -> String {
    format!(
        "<domain type=\"{domain_type}\" xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">\n\
         \t<name>{namespace}_{name}</name>\n\
         \t<memory unit=\"b\">67108864</memory>\n\
         \t<os><type arch=\"x86_64\" machine=\"q35\">hvm</type></os>\n\
         \t<metadata><kubevirt xmlns=\"http://kubevirt.io\"><uid>{uid}</uid></kubevirt></metadata>\n\
         \t<devices>{devices}</devices>\n\
         </domain>",
        uid = guest_uid(&format!("{namespace}_{name}")),
        devices = "<serial type=\"unix\"><target port=\"0\"></target></serial>".repeat(padding),
    )
}

fn vmi_json(namespace: &str, name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": guest_uid(&format!("{namespace}_{name}")),
            "annotations": {"hooks.kubevirt.io/hookSidecars": "[{\"image\": \"launcher-sidecar\"}]"},
        },
        "spec": {"domain": {"devices": {}}},
    }))
    .expect("VMI JSON")
}

/// What virt-launcher sends to OnDefineDomain, and what the answer must carry.
fn define(socket: &Path, version: &str, xml: &[u8], vmi: &[u8]) -> Result<()> {
    let answer = call(
        socket,
        &format!("kubevirt.hooks.{version}.Callbacks/OnDefineDomain"),
        &json!({"domainXML": b64(xml), "vmi": b64(vmi)}),
    )?;
    // proto3 JSON leaves an empty bytes field out.
    let returned = answer
        .get("domainXML")
        .and_then(Value::as_str)
        .unwrap_or("");
    if returned != b64(xml) {
        bail!(
            "OnDefineDomain ({version}) did not hand back the XML it was given: {} bytes in, {} base64 characters out",
            xml.len(),
            returned.len()
        );
    }
    Ok(())
}

/// Polls for the pod's hook socket as virt-launcher does, then calls Info.
fn info(pod: &SidecarPod) -> Result<Value> {
    wait_until(Duration::from_secs(10), "the hook socket", || {
        Ok(pod.socket().exists().then_some(()))
    })
    .with_context(|| pod.sidecar.log())?;
    call(&pod.socket(), "kubevirt.hooks.info.Info/Info", &json!({}))
}

#[test]
fn virt_launcher_can_run_the_whole_hook_sequence_without_libvirt() -> Result<()> {
    let aggregator = Aggregator::start("node-1")?;
    let started = Instant::now();
    let mut pod = SidecarPod::start(NO_LIBVIRT, &aggregator)?;
    let info = info(&pod)?;
    eprintln!(
        "sidecar exec → Info answered through grpcurl: {:?}",
        started.elapsed()
    );

    assert_eq!(info["name"], "kubevirt-hypervisor-metric");
    let mut hook_points: Vec<&str> = info["hookPoints"]
        .as_array()
        .context("no hookPoints")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    hook_points.sort();
    assert_eq!(hook_points, ["OnDefineDomain", "Shutdown"]);
    // virt-launcher takes the newest version it knows.
    let versions: Vec<&str> = info["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let newest = ["v1alpha3", "v1alpha2", "v1alpha1"]
        .into_iter()
        .find(|v| versions.contains(v))
        .with_context(|| format!("no version virt-launcher knows in {versions:?}"))?;
    assert_eq!(newest, "v1alpha3");

    let xml = kubevirt_domain_xml("default", "vm-hooked", "qemu", 1);
    let vmi = vmi_json("default", "vm-hooked");
    // The first call comes before virt-launcher hands the domain to libvirt: not yet.
    define(&pod.socket(), newest, xml.as_bytes(), &vmi)?;
    assert_eq!(aggregator.names()?, Vec::<String>::new());
    // virt-launcher defines the domain again with its hot-plug ports: libvirt holds it.
    define(&pod.socket(), newest, xml.as_bytes(), &vmi)?;
    aggregator.wait_for_names(&["vm-hooked"], Duration::from_secs(10))?;
    let series = aggregator.series()?;
    assert_eq!(series[0]["hypervisor_type"], "qemu-tcg");
    assert_eq!(series[0]["namespace"], "default");
    define(&pod.socket(), newest, xml.as_bytes(), &vmi)?;
    assert_eq!(aggregator.names()?, ["vm-hooked"]);
    assert!(
        pod.sidecar.log().contains("libvirt is out of reach"),
        "the sidecar says it runs from the hooks:\n{}",
        pod.sidecar.log()
    );

    // Shutdown comes after QEMU exited: withdraw, close, exit 0.
    let answer = call(
        &pod.socket(),
        "kubevirt.hooks.v1alpha3.Callbacks/Shutdown",
        &json!({}),
    )?;
    assert_eq!(answer, json!({}));
    let status = pod.sidecar.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "exit after Shutdown: {status}");
    assert_eq!(aggregator.names()?, Vec::<String>::new());
    Ok(())
}

#[test]
fn without_libvirt_a_single_definition_is_reported_after_the_grace_time() -> Result<()> {
    let aggregator = Aggregator::start("node-1")?;
    let pod = SidecarPod::start(NO_LIBVIRT, &aggregator)?;
    info(&pod)?;
    let xml = kubevirt_domain_xml("default", "vm-once", "kvm", 1);
    // The sidecar's grace timer starts while it answers the call, so the clock starts
    // before the call: the series may come no earlier than this clock says 15 s.
    let defined = Instant::now();
    define(
        &pod.socket(),
        "v1alpha3",
        xml.as_bytes(),
        &vmi_json("default", "vm-once"),
    )?;
    aggregator.wait_for_names(&["vm-once"], DEFINITION_GRACE + Duration::from_secs(20))?;
    let waited = defined.elapsed();
    eprintln!("one OnDefineDomain without libvirt → series after {waited:?}");
    assert!(
        waited >= DEFINITION_GRACE,
        "reported {waited:?} after the only OnDefineDomain, before the {DEFINITION_GRACE:?} \
         that a definition may take"
    );
    assert_eq!(aggregator.series()?[0]["hypervisor_type"], "kvm");
    Ok(())
}

#[test]
fn on_define_domain_hands_back_any_xml_byte_for_byte() -> Result<()> {
    let aggregator = Aggregator::start("node-1")?;
    let pod = SidecarPod::start(NO_LIBVIRT, &aggregator)?;
    info(&pod)?;
    let vmi = vmi_json("default", "vm-a");
    let megabyte = kubevirt_domain_xml("default", "vm-a", "kvm", 20_000);
    assert!(megabyte.len() > 1 << 20, "{}", megabyte.len());
    let cases: [(&str, &[u8], &[u8]); 5] = [
        ("garbage VMI JSON", megabyte.as_bytes(), b"{not json"),
        ("empty VMI", megabyte.as_bytes(), b""),
        ("empty XML", b"", &vmi),
        ("not XML", b"\x00\xff<domain", &vmi),
        ("1 MiB XML", megabyte.as_bytes(), &vmi),
    ];
    for (what, xml, vmi) in cases {
        for version in ["v1alpha1", "v1alpha2", "v1alpha3"] {
            define(&pod.socket(), version, xml, vmi).with_context(|| what.to_string())?;
        }
    }
    // Only the well-formed VMI made a series, classified from its XML.
    aggregator.wait_for_names(&["vm-a"], Duration::from_secs(10))?;

    // PreCloudInitIso hands its inputs back unchanged.
    let cloud_init = br##"{"dataSource":"noCloud","userData":"#cloud-config\n"}"##;
    let answer = call(
        &pod.socket(),
        "kubevirt.hooks.v1alpha2.Callbacks/PreCloudInitIso",
        &json!({"cloudInitData": b64(cloud_init), "cloudInitNoCloudSource": b64(b"{}"), "vmi": b64(&vmi)}),
    )?;
    assert_eq!(answer["cloudInitData"], b64(cloud_init));
    assert_eq!(answer["cloudInitNoCloudSource"], b64(b"{}"));
    Ok(())
}

#[test]
fn a_stale_socket_file_is_replaced() -> Result<()> {
    let aggregator = Aggregator::start("node-1")?;
    let hooks_dir = tempfile::tempdir()?;
    let stale = hooks_dir.path().join(format!("{SIDECAR}.sock"));
    std::fs::write(&stale, b"left by a previous run")?;
    let pod = SidecarPod::start_in(hooks_dir, NO_LIBVIRT, &aggregator)?;
    let info = wait_until(
        Duration::from_secs(10),
        "Info on the replaced socket",
        || Ok(info(&pod).ok()),
    )
    .with_context(|| pod.sidecar.log())?;
    assert_eq!(info["name"], "kubevirt-hypervisor-metric");
    Ok(())
}

#[test]
fn with_libvirt_the_live_domain_wins_over_the_hook() -> Result<()> {
    let daemon = LibvirtDaemon::start()?;
    let aggregator = Aggregator::start("node-1")?;
    daemon.start_guest("default_vm-live", GuestKind::Tcg, false)?;
    let pod = SidecarPod::start(&daemon.uri(), &aggregator)?;
    info(&pod)?;
    aggregator.wait_for_names(&["vm-live"], Duration::from_secs(20))?;

    // The hook claims KVM; libvirt runs it under TCG, and libvirt is right.
    let xml = kubevirt_domain_xml("default", "vm-live", "kvm", 1);
    define(
        &pod.socket(),
        "v1alpha3",
        xml.as_bytes(),
        &vmi_json("default", "vm-live"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let series = aggregator.series()?;
    assert_eq!(series.len(), 1);
    assert_eq!(series[0]["hypervisor_type"], "qemu-tcg");
    Ok(())
}
