//! Recordings of KubeVirt's own virt-launcher (`../shared/kubevirt-recordings/`, or the
//! directory `KVHM_RECORDINGS` names): every hook call it made to the sidecar, byte for byte,
//! and its own log of the domain's life on the same clock, one directory per pod. The
//! format is the recordings' README; [`RecordedPod::load`] reads one pod, and any file that
//! does not parse is an error naming it.
//!
//! Two facts of a pod's layout are not data of their own, and are read from its logs:
//! whether the pod ran as root (virt-launcher's "Connecting to libvirt daemon: <uri>", which
//! is `qemu:///system` in root mode), and whether its sidecar had the libvirt socket mounted
//! (the recorded sidecar logged "connected to libvirt" at least once).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::Value;

/// The recordings directory: `KVHM_RECORDINGS`, or `../shared/kubevirt-recordings` beside the
/// repository.
pub fn recordings_dir() -> PathBuf {
    match std::env::var_os("KVHM_RECORDINGS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        // The e2e crate is the repository's tests/.
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/kubevirt-recordings"),
    }
}

/// Every scenario of the recordings directory with its pods (`pod-0`, `pod-1`, …), sorted.
pub fn scenarios() -> Result<Vec<(String, Vec<String>)>> {
    let dir = recordings_dir().join("scenarios");
    let mut scenarios = Vec::new();
    for entry in sorted_dir(&dir)? {
        if !entry.is_dir() {
            continue;
        }
        let pods: Vec<String> = sorted_dir(&entry)?
            .into_iter()
            .filter(|p| p.is_dir() && file_name(p).starts_with("pod-"))
            .map(|p| file_name(&p))
            .collect();
        ensure!(
            !pods.is_empty(),
            "{} holds no pod-<n> directory",
            entry.display()
        );
        scenarios.push((file_name(&entry), pods));
    }
    ensure!(
        !scenarios.is_empty(),
        "{} holds no scenario (is KVHM_RECORDINGS right?)",
        dir.display()
    );
    Ok(scenarios)
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing the recordings in {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One hook call virt-launcher made, as recorded.
#[derive(Clone, Debug)]
pub struct HookCall {
    /// Seconds on the scenario's clock.
    pub at_s: f64,
    /// The full gRPC path, `/kubevirt.hooks.info.Info/Info`.
    pub method: String,
    /// The status the sidecar answered: `OK`, or a gRPC code name.
    pub code: String,
    pub deadline_s: f64,
    pub request: Vec<u8>,
    pub response: Vec<u8>,
}

impl HookCall {
    /// The method's name without its service: `Info`, `OnDefineDomain`, `Shutdown`, ….
    pub fn name(&self) -> &str {
        self.method.rsplit('/').next().unwrap_or_default()
    }
}

/// A line of hook-calls.jsonl: a call, or the start of the sidecar container.
#[derive(Clone, Debug)]
pub enum HookLine {
    /// The recordings number every start 1, so the replay counts them itself.
    SidecarStart {
        at_s: f64,
    },
    Call(HookCall),
}

/// A line of virt-launcher's own log that marks the domain's life.
#[derive(Clone, Debug)]
pub struct LauncherEvent {
    pub at_s: f64,
    pub msg: String,
}

impl LauncherEvent {
    /// `("defined", "added")` of a `DomainLifecycle event Domain event="defined"
    /// detail="added" …` line.
    pub fn lifecycle(&self) -> Option<(&str, &str)> {
        let rest = self
            .msg
            .strip_prefix("DomainLifecycle event Domain event=\"")?;
        let (event, rest) = rest.split_once('"')?;
        let rest = rest.strip_prefix(" detail=\"")?;
        let (detail, _) = rest.split_once('"')?;
        Some((event, detail))
    }
}

/// Who the VMI is, from the VMI JSON of the first `OnDefineDomain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedVmi {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The `args` of its one hook sidecar, from `hooks.kubevirt.io/hookSidecars`.
    pub sidecar_args: Vec<String>,
}

impl RecordedVmi {
    /// The libvirt domain name: `<namespace>_<name>`.
    pub fn domain(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

/// One recorded virt-launcher pod.
#[derive(Clone, Debug)]
pub struct RecordedPod {
    pub scenario: String,
    pub pod: String,
    pub dir: PathBuf,
    pub hook_lines: Vec<HookLine>,
    pub events: Vec<LauncherEvent>,
    pub vmi: RecordedVmi,
    /// The root `type` of the first domain XML virt-launcher defined (`kvm`, `qemu`).
    pub domain_type: String,
    /// Root mode: virt-launcher connected to `qemu:///system`.
    pub root: bool,
    /// The sidecar had the libvirt-runtime volume (it connected to libvirt).
    pub libvirt_mount: bool,
}

impl RecordedPod {
    /// Reads `scenarios/<scenario>/<pod>` of the recordings directory.
    pub fn load(scenario: &str, pod: &str) -> Result<Self> {
        let dir = recordings_dir().join("scenarios").join(scenario).join(pod);
        ensure!(
            dir.is_dir(),
            "no recorded pod {} (KVHM_RECORDINGS: {:?})",
            dir.display(),
            std::env::var_os("KVHM_RECORDINGS")
        );
        let hook_lines = read_jsonl(&dir.join("hook-calls.jsonl"), hook_line)?;
        let events = read_jsonl(&dir.join("virt-launcher-events.jsonl"), launcher_event)?;
        let vmi = read_vmi(&dir.join("define-1.vmi.json"))?;
        let domain_type = root_type(&dir.join("define-1.domain.xml"))?;
        let compute = read_text(&dir.join("compute.log"))?;
        let root = compute
            .lines()
            .any(|l| l.contains("Connecting to libvirt daemon: qemu:///system"));
        let sidecar_log = read_text(&dir.join("hook-sidecar-0.log"))?;
        let libvirt_mount = sidecar_log.contains("connected to libvirt");
        let pod = RecordedPod {
            scenario: scenario.to_owned(),
            pod: pod.to_owned(),
            dir,
            hook_lines,
            events,
            vmi,
            domain_type,
            root,
            libvirt_mount,
        };
        ensure!(
            matches!(pod.hook_lines.first(), Some(HookLine::SidecarStart { .. })),
            "{}: the first line is not the sidecar container's start",
            pod.dir.join("hook-calls.jsonl").display()
        );
        Ok(pod)
    }

    /// `<scenario>/<pod>`, for messages.
    pub fn label(&self) -> String {
        format!("{}/{}", self.scenario, self.pod)
    }

    /// The recorded calls, in order.
    pub fn calls(&self) -> impl Iterator<Item = &HookCall> {
        self.hook_lines.iter().filter_map(|line| match line {
            HookLine::Call(call) => Some(call),
            HookLine::SidecarStart { .. } => None,
        })
    }

    /// When each start of the sidecar container happened.
    pub fn sidecar_starts(&self) -> Vec<f64> {
        self.hook_lines
            .iter()
            .filter_map(|line| match line {
                HookLine::SidecarStart { at_s, .. } => Some(*at_s),
                HookLine::Call(_) => None,
            })
            .collect()
    }

    /// Whether virt-launcher called the Shutdown hook.
    pub fn has_shutdown_call(&self) -> bool {
        self.calls().any(|c| c.name() == "Shutdown")
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading the recording {}", path.display()))
}

fn read_jsonl<T>(path: &Path, parse: impl Fn(&Value) -> Result<T>) -> Result<Vec<T>> {
    let text = read_text(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let value: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            parse(&value).with_context(|| format!("{}:{}: {line}", path.display(), i + 1))
        })
        .collect()
}

fn number(value: &Value, key: &str) -> Result<f64> {
    value[key]
        .as_f64()
        .with_context(|| format!("no number {key:?}"))
}

fn string(value: &Value, key: &str) -> Result<String> {
    value[key]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no string {key:?}"))
}

fn base64_field(value: &Value, key: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(string(value, key)?)
        .with_context(|| format!("{key:?} is not base64"))
}

fn hook_line(value: &Value) -> Result<HookLine> {
    let at_s = number(value, "at_s")?;
    if value["event"] == "sidecar-container-start" {
        return Ok(HookLine::SidecarStart { at_s });
    }
    Ok(HookLine::Call(HookCall {
        at_s,
        method: string(value, "method")?,
        code: string(value, "code")?,
        deadline_s: number(value, "deadline_s")?,
        request: base64_field(value, "request")?,
        response: base64_field(value, "response")?,
    }))
}

fn launcher_event(value: &Value) -> Result<LauncherEvent> {
    Ok(LauncherEvent {
        at_s: number(value, "at_s")?,
        msg: string(value, "msg")?,
    })
}

fn read_vmi(path: &Path) -> Result<RecordedVmi> {
    let json: Value = serde_json::from_str(&read_text(path)?)
        .with_context(|| format!("{}: not JSON", path.display()))?;
    let metadata = &json["metadata"];
    let field =
        |key: &str| string(metadata, key).with_context(|| format!("{}: metadata", path.display()));
    let annotation = metadata["annotations"]["hooks.kubevirt.io/hookSidecars"]
        .as_str()
        .with_context(|| {
            format!(
                "{}: no hooks.kubevirt.io/hookSidecars annotation",
                path.display()
            )
        })?;
    let sidecars: Vec<Value> = serde_json::from_str(annotation)
        .with_context(|| format!("{}: the hook sidecar annotation", path.display()))?;
    let [sidecar] = sidecars.as_slice() else {
        bail!(
            "{}: the replay runs one hook sidecar, the VMI asks for {}",
            path.display(),
            sidecars.len()
        );
    };
    let sidecar_args = sidecar["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|arg| arg.as_str().map(str::to_owned))
        .collect::<Option<Vec<String>>>()
        .with_context(|| format!("{}: a hook sidecar arg is not a string", path.display()))?;
    Ok(RecordedVmi {
        namespace: field("namespace")?,
        name: field("name")?,
        uid: field("uid")?,
        sidecar_args,
    })
}

/// The `type` attribute of the root `<domain>` element.
fn root_type(path: &Path) -> Result<String> {
    let xml = read_text(path)?;
    let start = xml
        .find("<domain")
        .with_context(|| format!("{}: no <domain> element", path.display()))?;
    let tag = &xml[start..];
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let value = tag
        .split_once("type=")
        .and_then(|(_, rest)| {
            let quote = rest.chars().next()?;
            rest[1..].split(quote).next()
        })
        .with_context(|| format!("{}: <domain> has no type", path.display()))?;
    Ok(value.to_owned())
}
