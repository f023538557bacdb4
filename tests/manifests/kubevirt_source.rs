//! Files of KubeVirt's own source, from the tarball in `../shared/kubevirt` beside the
//! repository: the manifests rely on KubeVirt's names (the hook sidecar annotation and its
//! keys, the Sidecar feature gate, `kubevirt_vmi_info`), and these tests read them where
//! KubeVirt defines them instead of trusting a copy.

use std::sync::OnceLock;

use std::time::Duration;

use super::*;

/// The files the tests read, relative to the tree's root.
pub const HOOKS: &str = "pkg/hooks/hooks.go";
pub const FEATURE_GATES_ACTIVE: &str = "pkg/virt-config/featuregate/active.go";
pub const FEATURE_GATES: &str = "pkg/virt-config/featuregate/feature-gates.go";
pub const VMI_CREATE_ADMITTER: &str =
    "pkg/virt-api/webhooks/validating-webhook/admitters/vmi-create-admitter.go";
pub const VMI_STATS: &str = "pkg/monitoring/metrics/virt-controller/vmistats_collector.go";
pub const VM_CONTROLLER: &str = "pkg/virt-controller/watch/vm/vm.go";
const FILES: [&str; 6] = [
    HOOKS,
    FEATURE_GATES_ACTIVE,
    FEATURE_GATES,
    VMI_CREATE_ADMITTER,
    VMI_STATS,
    VM_CONTROLLER,
];
/// Decompressing the whole tarball to reach the files takes seconds; on a busy machine more.
const EXTRACT_TIMEOUT: Duration = Duration::from_secs(180);

fn tarball() -> Result<PathBuf> {
    let dir = repo().join("../shared/kubevirt");
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "listing {} (KubeVirt's source tarball, beside the repository)",
                dir.display()
            )
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kubevirt-") && n.ends_with("-src.tar.xz"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no kubevirt-*-src.tar.xz in {}", dir.display()))
}

fn extract() -> Result<BTreeMap<&'static str, String>> {
    let tarball = tarball()?;
    let dir = temp_dir("kubevirt-source.")?;
    let mut cmd = Command::new("tar");
    cmd.arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.path())
        .args(FILES.iter().map(|f| format!("kubevirt/{f}")));
    let what = format!("tar -xJf {}", tarball.display());
    let out = run_with_timeout(cmd, None, EXTRACT_TIMEOUT, &what)?;
    ensure!(out.status.success(), "{what}: {}", output_text(&out));
    FILES
        .iter()
        .map(|file| Ok((*file, read(&dir.path().join("kubevirt").join(file))?)))
        .collect()
}

/// One of [`FILES`], extracted once per test process.
pub fn kubevirt_file(file: &str) -> Result<&'static str> {
    static FILES: OnceLock<Result<BTreeMap<&'static str, String>, String>> = OnceLock::new();
    let files = FILES
        .get_or_init(|| extract().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("reading KubeVirt's source: {e}"))?;
    files
        .get(file)
        .map(String::as_str)
        .with_context(|| format!("{file} is not among the KubeVirt files the tests read"))
}

/// The JSON keys of KubeVirt's `hooks.HookSidecar`, from its struct tags.
pub fn hook_sidecar_keys() -> Result<BTreeSet<String>> {
    let source = kubevirt_file(HOOKS)?;
    let body = source
        .split_once("type HookSidecar struct {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .context("no `type HookSidecar struct` in pkg/hooks/hooks.go")?;
    let tag = Regex::new(r#"json:"([^",]+)"#)?;
    Ok(tag
        .captures_iter(body)
        .map(|c| c[1].to_string())
        .filter(|key| key != "-")
        .collect())
}
