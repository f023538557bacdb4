//! The enrollment policy (manifests/base/enrollment-admissionpolicy.yaml) on
//! VirtualMachineInstances: its CEL run by [`admit`] on VMIs as KubeVirt creates them (the
//! VMIs that KubeVirt's virt-controller made of recorded VirtualMachines, in `vmi-from-vm/` of
//! the KubeVirt recordings), the resulting annotation parsed the way KubeVirt parses it, and
//! KubeVirt's own definitions checked against its recorded facts.

use super::admission::{Outcome, Request, admit};
use super::kubevirt_facts::{fact, hook_sidecar_keys, recordings_dir};
use super::*;

const ANNOTATION: &str = "hooks.kubevirt.io/hookSidecars";
const ENROLL_LABEL: &str = "kubevirt-hypervisor-metric/enroll";
/// What the policy's variables hold before kustomize writes the settings into them.
const UNSET: &str = "set-by-kustomize";
/// The fact that lists what virt-controller's startVMI adds to the VMI it creates.
const START_VMI: &str =
    "what virt-controller adds to SetupVMIFromVM's VMI before it creates it (startVMI)";
/// The steps of startVMI that the recorded VMIs carry, as the fact names them.
const START_VMI_STEPS: [&str; 4] = [
    "annotation kubevirt.io/vm-generation",
    "finalizer kubevirt.io/virtualMachineControllerFinalize",
    "AutoAttachInputDevice",
    "the default pod network interface (SetDefaultNetworkInterface)",
];

/// The settings the enrollment adds: (image, aggregator), from enrollment-settings.yaml.
fn settings(resources: &[Resource]) -> Result<(String, String)> {
    let settings = find(resources, "ConfigMap", ENROLLMENT)?;
    Ok((
        settings.str_at("/data/image")?.to_string(),
        settings.str_at("/data/aggregator")?.to_string(),
    ))
}

/// The value of the policy's variable `name`: the text between the quotes of its literal.
fn variable(policy: &Resource, name: &str) -> Result<String> {
    let variables = policy
        .at("/spec/variables")?
        .as_array()
        .context("variables")?;
    let expression = variables
        .iter()
        .find(|v| v["name"] == json!(name))
        .and_then(|v| v["expression"].as_str())
        .with_context(|| format!("{} has no variable {name}", policy.describe()))?;
    let value = expression
        .strip_prefix('\'')
        .and_then(|e| e.strip_suffix('\''))
        .with_context(|| format!("variable {name} is not a plain string literal: {expression}"))?;
    Ok(value.to_string())
}

/// The enrollment policy and binding of `kustomization` (relative to manifests/) as kustomize
/// builds them, or `None` without kubectl (the reason is on stderr).
fn built_enrollment(kustomization: &str) -> Result<Option<(Resource, Resource)>> {
    let dir = manifests_dir().join(kustomization);
    let Some(built) = kustomize(&dir)? else {
        return Ok(None);
    };
    let resources = built_resources(&built, &dir)?;
    Ok(Some((
        find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?.clone(),
        find(&resources, "MutatingAdmissionPolicyBinding", ENROLLMENT)?.clone(),
    )))
}

/// The base's enrollment policy with its settings in place: as kustomize builds it, or, without
/// kubectl, with the settings written into the two variables as the transformer writes them.
fn base_enrollment() -> Result<(Resource, Resource)> {
    if let Some(built) = built_enrollment("base")? {
        return Ok(built);
    }
    eprintln!(
        "the enrollment policy gets its settings from the test instead of kustomize (no kubectl)"
    );
    let resources = base_resources()?;
    let (image, aggregator) = settings(&resources)?;
    let mut policy = find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?.clone();
    set_variable(&mut policy, "image", &image)?;
    set_variable(&mut policy, "aggregator", &aggregator)?;
    let binding = find(&resources, "MutatingAdmissionPolicyBinding", ENROLLMENT)?.clone();
    Ok((policy, binding))
}

/// Writes `value` into the policy's variable `name` as the settings transformer does: as
/// the text of its string literal.
fn set_variable(policy: &mut Resource, name: &str, value: &str) -> Result<()> {
    let what = policy.describe();
    let variable = policy.doc["spec"]["variables"]
        .as_array_mut()
        .context("variables")?
        .iter_mut()
        .find(|v| v["name"] == json!(name))
        .with_context(|| format!("{what} has no variable {name}"))?;
    variable["expression"] = json!(format!("'{value}'"));
    Ok(())
}

/// The KubeVirt CR (the policy's parameter) with these feature gates.
fn kubevirt_cr(gates: &[&str]) -> Result<Value> {
    let resources = resources_in(&resource_files()?)?;
    let mut kubevirt = only(&resources, "KubeVirt")?.doc.clone();
    kubevirt["spec"]["configuration"]["developerConfiguration"]["featureGates"] = json!(gates);
    Ok(kubevirt)
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels}})
}

/// What the policy must do with a recorded VMI.
#[derive(Clone, Copy)]
enum Want {
    /// Enrolled: its own hook sidecars (those of its VM's template), then ours.
    Enroll,
    /// Left out by this selector or matchCondition (a prefix of the reason).
    Skip(&'static str),
}

/// Every example of `vmi-from-vm/`: (its name, what it shows, what the base policy does with
/// it, what the opt-in component does with it). The directory must hold exactly these.
const RECORDED: [(&str, &str, Want, Want); 5] = [
    (
        "example",
        "the VMI of the examples' VirtualMachine, without any annotation of its own",
        Want::Enroll,
        Want::Skip("matchCondition opted-in"),
    ),
    (
        "example-opted-in",
        "a VMI labelled enroll=true (from its VM's template)",
        Want::Enroll,
        Want::Enroll,
    ),
    (
        "example-opted-out",
        "a VMI labelled enroll=false (from its VM's template)",
        Want::Skip("policy objectSelector"),
        Want::Skip("policy objectSelector"),
    ),
    (
        "fedora",
        "a VM with labels of its own and a masquerade interface, in another namespace",
        Want::Enroll,
        Want::Skip("matchCondition opted-in"),
    ),
    (
        "other-sidecar",
        "a VM whose template asks for another project's hook sidecar",
        Want::Enroll,
        Want::Skip("matchCondition opted-in"),
    ),
];

/// A recorded VirtualMachine and the VMI that KubeVirt's virt-controller code made of it: the
/// object an admission policy on VMI CREATE sees.
struct RecordedVmi {
    vm: Value,
    vmi: Value,
}

/// A recorded example: (name, what it shows, its pair, base, opt-in), as in [`RECORDED`].
type Example = (&'static str, String, RecordedVmi, Want, Want);

/// The recorded example `name`.
fn example<'a>(examples: &'a [Example], name: &str) -> Result<&'a RecordedVmi> {
    examples
        .iter()
        .find(|e| e.0 == name)
        .map(|e| &e.2)
        .with_context(|| format!("no recorded example {name}"))
}

fn vmi_from_vm_dir() -> PathBuf {
    recordings_dir().join("vmi-from-vm")
}

/// Every `<name>.vm.json` and `<name>.vmi.json` pair of `vmi-from-vm/`, by name; half a pair
/// is an error.
fn recorded_vmis() -> Result<BTreeMap<String, RecordedVmi>> {
    let dir = vmi_from_vm_dir();
    let mut names = BTreeSet::new();
    let entries = fs::read_dir(&dir).with_context(|| {
        format!(
            "listing {} (the VMIs KubeVirt made of VirtualMachines)",
            dir.display()
        )
    })?;
    for entry in entries {
        let file = entry.with_context(|| format!("listing {}", dir.display()))?;
        let file = file.file_name();
        let file = file.to_string_lossy();
        let name = file
            .strip_suffix(".vmi.json")
            .or_else(|| file.strip_suffix(".vm.json"));
        names.extend(name.map(str::to_string));
    }
    let load = |name: &str, kind: &str| -> Result<Value> {
        let path = dir.join(format!("{name}.{kind}.json"));
        serde_json::from_str(&read(&path)?).with_context(|| format!("parsing {}", path.display()))
    };
    names
        .into_iter()
        .map(|name| {
            let pair = RecordedVmi {
                vm: load(&name, "vm")?,
                vmi: load(&name, "vmi")?,
            };
            Ok((name, pair))
        })
        .collect()
}

/// [`RECORDED`] with each example's files: (name, what it shows, its pair, base, opt-in), after
/// checking that the directory holds exactly the examples the tests know.
fn recorded_examples() -> Result<Vec<Example>> {
    let mut recorded = recorded_vmis()?;
    let found: BTreeSet<&str> = recorded.keys().map(String::as_str).collect();
    let known: BTreeSet<&str> = RECORDED.iter().map(|(name, ..)| *name).collect();
    ensure!(
        found == known,
        "{} holds the examples {found:?}, the tests know {known:?}: a missing one must be \
         recorded again, a new one needs its outcomes in RECORDED",
        vmi_from_vm_dir().display()
    );
    RECORDED
        .iter()
        .map(|(name, what, base, opt_in)| {
            let pair = recorded.remove(*name).context("checked above")?;
            let what = format!("vmi-from-vm/{name}.vmi.json, {what}");
            Ok((*name, what, pair, *base, *opt_in))
        })
        .collect()
}

/// The hook sidecars a VM's template asks for, which its VMI gets from it.
fn template_sidecars(vm: &Value) -> Result<Vec<Value>> {
    let Some(list) = vm.pointer(&format!(
        "/spec/template/metadata/annotations/{}",
        ANNOTATION.replace('/', "~1")
    )) else {
        return Ok(vec![]);
    };
    let list = list
        .as_str()
        .context("the template's annotation is not a string")?;
    serde_json::from_str(list).with_context(|| format!("the template's list {list:?}"))
}

/// One case per recorded example, in its own namespace: `opt_in` picks the outcome.
fn recorded_cases<'a>(
    examples: &'a [Example],
    gate_on: &Value,
    opt_in: bool,
) -> Result<Vec<Case<'a>>> {
    examples
        .iter()
        .map(|(_, what, pair, base, with_opt_in)| {
            let expect = match if opt_in { with_opt_in } else { base } {
                Want::Enroll => Expect::Enrolled(template_sidecars(&pair.vm)?),
                Want::Skip(reason) => Expect::Skipped(reason),
            };
            let ns = pair.vmi["metadata"]["namespace"]
                .as_str()
                .with_context(|| format!("{what}: no namespace"))?;
            let namespace = namespace(ns, json!({"kubernetes.io/metadata.name": ns}));
            Ok((
                what.as_str(),
                pair.vmi.clone(),
                namespace,
                gate_on.clone(),
                expect,
            ))
        })
        .collect()
}
/// The examples' VMI and VM, without the hand-written annotation.
fn unannotated_examples() -> Result<(Value, Value)> {
    let resources = resources_in(&resource_files()?)?;
    let mut vmi = only(&resources, "VirtualMachineInstance")?.doc.clone();
    vmi["metadata"]
        .as_object_mut()
        .context("metadata")?
        .remove("annotations");
    let mut vm = only(&resources, "VirtualMachine")?.doc.clone();
    vm["spec"]["template"]["metadata"]
        .as_object_mut()
        .context("template metadata")?
        .remove("annotations");
    Ok((vmi, vm))
}

fn with_annotation(vmi: &Value, list: &str) -> Value {
    let mut vmi = vmi.clone();
    if !vmi["metadata"]["annotations"].is_object() {
        vmi["metadata"]["annotations"] = json!({});
    }
    vmi["metadata"]["annotations"][ANNOTATION] = json!(list);
    vmi
}

fn with_label(vmi: &Value, value: &str) -> Value {
    let mut vmi = vmi.clone();
    if !vmi["metadata"]["labels"].is_object() {
        vmi["metadata"]["labels"] = json!({});
    }
    vmi["metadata"]["labels"][ENROLL_LABEL] = json!(value);
    vmi
}

/// The hook sidecar list of a VMI as KubeVirt reads it: `hooks.UnmarshalHookSidecarList`
/// decodes the annotation into `[]HookSidecar`, whose fields are strings, string lists and two
/// objects of strings (configMap, pvc). Keys it does not know are ignored by KubeVirt's JSON
/// decoder, but the project writes only known ones.
fn hook_sidecars(
    vmi: &Value,
    keys: &BTreeSet<String>,
) -> Result<Vec<serde_json::Map<String, Value>>> {
    let text = vmi["metadata"]["annotations"][ANNOTATION]
        .as_str()
        .context("no hooks.kubevirt.io/hookSidecars annotation")?;
    let list: Vec<serde_json::Map<String, Value>> = serde_json::from_str(text)
        .with_context(|| format!("KubeVirt could not decode the list {text:?}"))?;
    for sidecar in &list {
        for (key, value) in sidecar {
            let known = keys.iter().find(|k| k.eq_ignore_ascii_case(key));
            let Some(known) = known else { continue };
            let fits = match known.as_str() {
                "command" | "args" => value
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string)),
                "configMap" | "pvc" => value
                    .as_object()
                    .is_some_and(|o| o.values().all(Value::is_string)),
                _ => value.is_string(),
            };
            ensure!(
                fits || value.is_null(),
                "KubeVirt cannot decode {key}: {value}"
            );
        }
    }
    Ok(list)
}

#[test]
fn kubevirt_defines_what_the_enrollment_relies_on() -> Result<()> {
    // The annotation and the JSON keys of one sidecar.
    let keys = hook_sidecar_keys()?;
    let ours: BTreeSet<String> = HOOK_SIDECAR_KEYS.iter().map(|k| k.to_string()).collect();
    ensure!(
        keys == ours,
        "KubeVirt's hooks.HookSidecar has the keys {keys:?} ({}); the tests know {ours:?}",
        fact("hook sidecar list entry fields (JSON)")?.cite()
    );
    let annotation = fact("hook sidecar annotation")?;
    ensure!(
        annotation.str()? == ANNOTATION,
        "KubeVirt's hook sidecar annotation is {:?}, no longer {ANNOTATION} ({})",
        annotation.str()?,
        annotation.cite()
    );
    // KubeVirt refuses a VMI with the annotation while the Sidecar gate is off; the gate is
    // Alpha, so it is on exactly when featureGates lists it: the policy's matchCondition.
    let refuses = fact("VMI admission refuses the annotation while the Sidecar gate is off")?;
    ensure!(
        refuses.bool()?,
        "KubeVirt's VMI admission no longer ties the annotation to the Sidecar gate ({})",
        refuses.cite()
    );
    let (gate, state) = (
        fact("Sidecar feature gate name")?,
        fact("Sidecar feature gate state")?,
    );
    ensure!(
        gate.str()? == "Sidecar" && state.str()? == "Alpha",
        "the Sidecar feature gate is no longer an Alpha gate named Sidecar but a {} gate named \
         {:?} ({}; {}): change the policy's sidecar-feature-gate-enabled condition",
        state.str()?,
        gate.str()?,
        gate.cite(),
        state.cite()
    );
    let gates_at = fact("where enabled feature gates are read")?;
    ensure!(
        gates_at.str()? == "spec.configuration.developerConfiguration.featureGates",
        "KubeVirt no longer reads gates from developerConfiguration.featureGates but from {} \
         ({})",
        gates_at.str()?,
        gates_at.cite()
    );
    // The policy reads the gate there, by that name.
    let resources = base_resources()?;
    let policy = find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?;
    let condition = policy
        .at("/spec/matchConditions")?
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["name"] == "sidecar-feature-gate-enabled")
        })
        .and_then(|c| c["expression"].as_str())
        .with_context(|| format!("{} has no sidecar-feature-gate-enabled", policy.describe()))?;
    let reads = format!(
        "params.{}.exists(g, g == '{}')",
        gates_at.str()?,
        gate.str()?
    );
    ensure!(
        condition.contains(&reads),
        "{}: sidecar-feature-gate-enabled must test {reads} ({}; {})",
        policy.describe(),
        gates_at.cite(),
        gate.cite()
    );
    // The recorded VMIs carry what startVMI adds to SetupVMIFromVM's VMI
    // (the_recorded_vmis_are_what_virt_controller_makes_of_their_vms).
    let added = fact(START_VMI)?;
    for step in START_VMI_STEPS {
        ensure!(
            added.strings()?.contains(&step),
            "virt-controller's startVMI changed ({step:?} is gone, {}): check that vmi-from-vm/ \
             still shows what it adds",
            added.cite()
        );
    }
    // kubevirt_vmi_info, which the coverage rules join on: its labels. (How its phase is
    // written, lower case as in phase="running", is not among the recorded facts.)
    let info = fact("kubevirt_vmi_info labels, in order")?;
    let labels = info.strings()?;
    ensure!(
        labels.starts_with(&["node", "namespace", "name", "phase"]),
        "kubevirt_vmi_info no longer starts with the labels node, namespace, name, phase: \
         {labels:?} ({})",
        info.cite()
    );
    Ok(())
}

/// The name a step of [`START_VMI_STEPS`] adds (`annotation X` → `X`).
fn start_vmi_step(prefix: &str) -> Result<&'static str> {
    START_VMI_STEPS
        .iter()
        .find_map(|step| step.strip_prefix(prefix))
        .with_context(|| format!("no step {prefix}… in START_VMI_STEPS"))
}

/// The recorded VMIs are what the manifests' examples become, and carry what
/// virt-controller adds before it creates a VMI, so the cases below see what the API server
/// hands the policy.
#[test]
fn the_recorded_vmis_are_what_virt_controller_makes_of_their_vms() -> Result<()> {
    let cite = fact(START_VMI)?.cite();
    let examples = recorded_examples()?;
    for (_, what, pair, ..) in &examples {
        made_from(pair).with_context(|| format!("{what} (virt-controller's startVMI: {cite})"))?;
    }
    // The examples are the manifests' own VirtualMachine, as it is, opted in and opted out.
    let (_, vm) = unannotated_examples()?;
    for (name, want) in [
        ("example", vm.clone()),
        ("example-opted-in", with_template_label(&vm, "true")),
        ("example-opted-out", with_template_label(&vm, "false")),
    ] {
        let mut got = example(&examples, name)?.vm.clone();
        // What the API server gave it.
        for field in ["uid", "generation"] {
            got["metadata"]
                .as_object_mut()
                .context("metadata")?
                .remove(field);
        }
        ensure!(
            got == want,
            "vmi-from-vm/{name}.vm.json is no longer manifests/examples/virtualmachine.yaml \
             (without its annotation{}): record it again\n{got}\ninstead of\n{want}",
            if name == "example" {
                ""
            } else {
                ", with the enroll label"
            }
        );
    }
    Ok(())
}

/// `pair.vmi` is SetupVMIFromVM's VMI of `pair.vm` with what startVMI adds.
fn made_from(pair: &RecordedVmi) -> Result<()> {
    let (vm, vmi) = (&pair.vm, &pair.vmi);
    for field in ["name", "namespace"] {
        ensure!(
            vmi["metadata"][field] == vm["metadata"][field],
            "the VMI's {field} is not its VM's"
        );
    }
    let owner = json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                       "name": vm["metadata"]["name"], "uid": vm["metadata"]["uid"],
                       "controller": true, "blockOwnerDeletion": true});
    ensure!(
        vmi["metadata"]["ownerReferences"] == json!([owner]),
        "the VMI is not owned by its VM: {}",
        vmi["metadata"]["ownerReferences"]
    );
    // The template's labels and annotations reach the VMI: the opt-out label and the
    // VM's own hook sidecars do.
    for field in ["labels", "annotations"] {
        let template = &vm["spec"]["template"]["metadata"][field];
        for (key, value) in template.as_object().into_iter().flatten() {
            ensure!(
                &vmi["metadata"][field][key] == value,
                "the VMI lacks its template's {field} {key}: {value}"
            );
        }
    }
    let generation = start_vmi_step("annotation ")?;
    let want = vm["metadata"]["generation"].as_i64().map(|g| g.to_string());
    ensure!(
        want.is_some() && vmi["metadata"]["annotations"][generation].as_str() == want.as_deref(),
        "the VMI's {generation} is not its VM's generation {}",
        vm["metadata"]["generation"]
    );
    let finalizer = start_vmi_step("finalizer ")?;
    ensure!(
        vmi["metadata"]["finalizers"] == json!([finalizer]),
        "the VMI's finalizers are not [{finalizer}]: {}",
        vmi["metadata"]["finalizers"]
    );
    // SetDefaultNetworkInterface: a VM without interfaces gets one on the pod network. (No
    // example sets autoattachInputDevice, so AutoAttachInputDevice adds nothing to see.)
    let template = &vm["spec"]["template"]["spec"];
    let interfaces = &vmi["spec"]["domain"]["devices"]["interfaces"];
    if template["domain"]["devices"]["interfaces"].is_null() {
        ensure!(
            interfaces
                .as_array()
                .is_some_and(|i| i.len() == 1 && i[0]["name"] == "default")
                && vmi["spec"]["networks"] == json!([{"name": "default", "pod": {}}]),
            "the VMI has not the default pod network interface: {interfaces} on {}",
            vmi["spec"]["networks"]
        );
    } else {
        ensure!(
            interfaces == &template["domain"]["devices"]["interfaces"]
                && vmi["spec"]["networks"] == template["networks"],
            "the VMI's interfaces and networks are not its template's: {interfaces} on {}",
            vmi["spec"]["networks"]
        );
    }
    // Not created yet: the API server gives it its uid.
    ensure!(
        vmi["metadata"]["uid"].is_null(),
        "the VMI has a uid already: it is not the object of a CREATE"
    );
    Ok(())
}

#[test]
fn the_settings_reach_the_enrollment_policy_and_fit_the_other_manifests() -> Result<()> {
    let resources = base_resources()?;
    let settings_object = find(&resources, "ConfigMap", ENROLLMENT)?;
    ensure!(
        settings_object.is_local_config(),
        "{} must be kustomize-only ({LOCAL_CONFIG}: \"true\")",
        settings_object.describe()
    );
    let (image, aggregator) = settings(&resources)?;
    // The address is the gRPC Service, which is also the sidecar's built-in default.
    let grpc = find(&resources, "Service", "node-aggregator")?;
    let port = grpc.at("/spec/ports/0/port")?.as_i64().context("port")?;
    let address = format!("http://{}.{NAMESPACE}.svc:{port}", grpc.name());
    ensure!(
        aggregator == address,
        "the enrollment's aggregator {aggregator} is not the Service {address}"
    );
    // The image is one the libvirt-socket policy gives the socket to, and the enrollment
    // policy checks images with the same pattern.
    ensure!(
        policy_image_regex(&resources)?.is_match(&image),
        "the libvirt-socket policy would not recognize the enrollment's image {image}"
    );
    let enrollment = find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?;
    ensure!(
        image_pattern(enrollment)?
            == image_pattern(find(&resources, "MutatingAdmissionPolicy", LIBVIRT_SOCKET)?)?,
        "the two policies must recognize launcher-sidecar images with the same pattern"
    );
    // The policy in the repository holds placeholders only: the values come from kustomize.
    for name in ["image", "aggregator"] {
        ensure!(
            variable(enrollment, name)? == UNSET,
            "the policy's {name} must be written by kustomize, not by hand"
        );
    }

    // kustomize writes them in, in the base and, from the overlay's `images:`, in the overlay.
    let Some((base, _)) = built_enrollment("base")? else {
        return Ok(());
    };
    ensure!(
        variable(&base, "image")? == image && variable(&base, "aggregator")? == aggregator,
        "kubectl kustomize manifests/base did not write the settings into the policy"
    );
    let overlay = &parse_yaml(
        &read(&manifests_dir().join("overlays/example/kustomization.yaml"))?,
        "overlay",
    )?[0];
    let entry = overlay["images"]
        .as_array()
        .context("images")?
        .iter()
        .find(|i| i["name"] == json!("kubevirt-hypervisor-metric/launcher-sidecar"))
        .context("the example overlay sets no launcher-sidecar image")?;
    let want = format!(
        "{}:{}",
        entry["newName"].as_str().context("newName")?,
        entry["newTag"].as_str().context("newTag")?
    );
    let (built, _) = built_enrollment("overlays/example")?.context("kubectl vanished")?;
    ensure!(
        variable(&built, "image")? == want && variable(&built, "aggregator")? == aggregator,
        "the example overlay's launcher-sidecar image {want} did not reach the enrollment policy \
         (is ../../transformers/enrollment-settings listed under its transformers?)"
    );
    Ok(())
}

/// An enrollment case: (what, the VMI, its namespace, the KubeVirt CR, what must happen).
type Case<'a> = (&'a str, Value, Value, Value, Expect);

/// What must happen to the VMI of a case.
enum Expect {
    /// Left out by this selector or matchCondition (a prefix of the reason).
    Skipped(&'static str),
    /// Applied, and the VMI is left exactly as it was.
    Unchanged,
    /// Applied: the VMI's list is these entries (as JSON), then ours.
    Enrolled(Vec<Value>),
}

#[test]
fn the_enrollment_policy_adds_the_sidecar_to_new_vmis() -> Result<()> {
    let (policy, binding) = base_enrollment()?;
    let resources = base_resources()?;
    let (image, aggregator) = settings(&resources)?;
    let ours = json!({"image": image, "args": ["--aggregator", aggregator]});
    let keys = hook_sidecar_keys()?;
    let examples = recorded_examples()?;
    let gate_on = kubevirt_cr(&["Sidecar", "Snapshot"])?;
    let mut cases = recorded_cases(&examples, &gate_on, false)?;
    // The examples' VMI as virt-controller creates it from their VM, changed by hand.
    let from_vm = &example(&examples, "example")?.vmi;
    cases.extend(handwritten_cases(from_vm, &gate_on)?);
    cases.extend(malformed_cases(from_vm, &gate_on));
    check_enrollment(&policy, &binding, &cases, &ours, &keys)?;
    eprintln!(
        "enrollment policy: {} VMIs evaluated (by hand and as virt-controller made them)",
        cases.len()
    );
    Ok(())
}

/// The base policy's cases on VMIs written by hand or changed by hand from `from_vm`.
fn handwritten_cases(from_vm: &Value, gate_on: &Value) -> Result<Vec<Case<'static>>> {
    let (vmi, _) = unannotated_examples()?;
    let default_ns = namespace("default", json!({"kubernetes.io/metadata.name": "default"}));
    let other = json!({"image": "quay.io/acme/smbios-sidecar:1.2", "imagePullPolicy": "IfNotPresent",
                       "args": ["--version", "v1alpha2"],
                       "configMap": {"name": "hook", "key": "my_script.sh", "hookPath": "/usr/bin/onDefineDomain"}});
    let handwritten = resources_in(&resource_files()?)?;
    let annotated = only(&handwritten, "VirtualMachineInstance")?.doc.clone();

    Ok(vec![
        (
            "a VMI created by hand, without annotations at all",
            vmi.clone(),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "a VMI with another project's hook sidecar",
            with_annotation(from_vm, &serde_json::to_string(&json!([other]))?),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![other.clone()]),
        ),
        (
            "a list written by hand: spaces, line breaks, an escaped quote, non-ASCII text",
            with_annotation(
                &vmi,
                "  [ {\"image\" : \"a/b:1\", \"args\": [\"--name=\\\"é\\\"\", \"x\"]},\n {\"image\": \"c/d\", \"pvc\": {\"name\": \"p\", \"volumePath\": \"/v\"}} ]\n",
            ),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![
                json!({"image": "a/b:1", "args": ["--name=\"é\"", "x"]}),
                json!({"image": "c/d", "pvc": {"name": "p", "volumePath": "/v"}}),
            ]),
        ),
        (
            "an empty list",
            with_annotation(from_vm, " [ ] "),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "the examples' VMI, which asks for the sidecar itself",
            annotated.clone(),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "our sidecar from another registry, pinned by digest, after another sidecar, key \"Image\"",
            with_annotation(
                from_vm,
                &format!(
                    "[{}, {{\"Image\": \"registry.example.com:5000/x/launcher-sidecar@sha256:{}\"}}]",
                    serde_json::to_string(&other)?,
                    "0123456789abcdef".repeat(4)
                ),
            ),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "a VMI in a namespace labelled enroll=false",
            from_vm.clone(),
            namespace("default", json!({ENROLL_LABEL: "false"})),
            gate_on.clone(),
            Expect::Skipped("binding namespaceSelector"),
        ),
        (
            "a VMI labelled enroll=true in a namespace labelled enroll=false",
            with_label(from_vm, "true"),
            namespace("default", json!({ENROLL_LABEL: "false"})),
            gate_on.clone(),
            Expect::Skipped("binding namespaceSelector"),
        ),
        (
            "the Sidecar feature gate is off",
            from_vm.clone(),
            default_ns.clone(),
            kubevirt_cr(&["Snapshot"])?,
            Expect::Skipped("matchCondition sidecar-feature-gate-enabled"),
        ),
        (
            "a KubeVirt CR without developerConfiguration",
            from_vm.clone(),
            default_ns.clone(),
            {
                let mut cr = gate_on.clone();
                cr["spec"]["configuration"] = json!({});
                cr
            },
            Expect::Skipped("matchCondition sidecar-feature-gate-enabled"),
        ),
    ])
}

/// Lists that are not plainly a JSON list of sidecar objects, on `from_vm`: left alone.
fn malformed_cases(from_vm: &Value, gate_on: &Value) -> Vec<Case<'static>> {
    let default_ns = namespace("default", json!({"kubernetes.io/metadata.name": "default"}));
    vec![
        (
            "malformed: a truncated list",
            with_annotation(from_vm, "[{\"image\": \"quay.io/acme/x:1\""),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: a trailing comma",
            with_annotation(from_vm, "[{\"image\": \"quay.io/acme/x:1\"},]"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: one object, not a list",
            with_annotation(from_vm, "{\"image\": \"quay.io/acme/x:1\"}"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: an empty annotation",
            with_annotation(from_vm, ""),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: not JSON",
            with_annotation(from_vm, "[image: quay.io/acme/x:1]"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "valid JSON beyond what a sidecar list holds (nested lists): left alone too",
            with_annotation(from_vm, "[{\"image\": \"quay.io/acme/x:1\", \"x\": [[1]]}]"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
    ]
}

fn with_template_label(vm: &Value, value: &str) -> Value {
    let mut vm = vm.clone();
    vm["spec"]["template"]["metadata"]["labels"] = json!({ENROLL_LABEL: value});
    vm
}

/// Runs the cases; every enrolled VMI is run through the policy once more, as the API server
/// re-invokes it after other mutations, and must come out unchanged.
fn check_enrollment(
    policy: &Resource,
    binding: &Resource,
    cases: &[Case],
    ours: &Value,
    keys: &BTreeSet<String>,
) -> Result<()> {
    let requests: Vec<Request> = cases
        .iter()
        .map(|(_, object, namespace, params, _)| Request {
            object: object.clone(),
            params: params.clone(),
            namespace: namespace.clone(),
        })
        .collect();
    let outcomes = admit(policy, binding, &requests)?;
    let mut again = Vec::new();
    for ((what, vmi, namespace, params, expect), outcome) in cases.iter().zip(&outcomes) {
        match (expect, outcome) {
            (Expect::Skipped(reason), Outcome::Skipped(why)) => ensure!(
                why.starts_with(reason),
                "{what}: left out by {why}, expected {reason}"
            ),
            (Expect::Skipped(reason), Outcome::Patched { patches, .. }) => {
                bail!("{what}: must be left out by {reason}, got the patches {patches:?}")
            }
            (_, Outcome::Skipped(why)) => bail!("{what}: left out by {why}"),
            (Expect::Unchanged, Outcome::Patched { patches, object }) => ensure!(
                object == vmi && patches.is_empty(),
                "{what}: must be left as it is, got the patches {patches:?}"
            ),
            (Expect::Enrolled(before), Outcome::Patched { patches, object }) => {
                let list = hook_sidecars(object, keys)
                    .with_context(|| format!("{what}: after the patches {patches:?}"))?;
                let mut want: Vec<Value> = before.clone();
                want.push(ours.clone());
                let got: Vec<Value> = list.into_iter().map(Value::Object).collect();
                ensure!(
                    got == want,
                    "{what}: the list is {got:?}, expected {want:?}"
                );
                // Nothing but that annotation changed.
                let mut rest = object.clone();
                let mut original = vmi.clone();
                for doc in [&mut rest, &mut original] {
                    if let Some(annotations) = doc
                        .pointer_mut("/metadata/annotations")
                        .and_then(Value::as_object_mut)
                    {
                        annotations.remove(ANNOTATION);
                        if annotations.is_empty() {
                            doc["metadata"]
                                .as_object_mut()
                                .context("metadata")?
                                .remove("annotations");
                        }
                    }
                }
                ensure!(
                    rest == original,
                    "{what}: more than the annotation changed: {rest} instead of {original}"
                );
                again.push((
                    *what,
                    Request {
                        object: object.clone(),
                        params: params.clone(),
                        namespace: namespace.clone(),
                    },
                ));
            }
        }
    }
    let outcomes = admit(
        policy,
        binding,
        &again.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
    )?;
    for ((what, request), outcome) in again.iter().zip(outcomes) {
        ensure!(
            outcome.object() == Some(&request.object),
            "{what}: a second run (reinvocation) changed the VMI again: {outcome:?}"
        );
    }
    Ok(())
}

#[test]
fn the_opt_in_component_enrolls_only_what_is_labelled() -> Result<()> {
    let dir = temp_dir("enrollment-opt-in.")?;
    example_with_component(dir.path(), "enrollment-opt-in")?;
    let Some(built) = kustomize(dir.path())? else {
        return Ok(());
    };
    let resources = built_resources(&built, dir.path())?;
    let policy = find(&resources, "MutatingAdmissionPolicy", ENROLLMENT)?;
    let binding = find(&resources, "MutatingAdmissionPolicyBinding", ENROLLMENT)?;
    // The coverage alert goes, the coverage rules stay.
    let rule = only(&resources, "PrometheusRule")?;
    let text = serde_json::to_string(&rule.doc)?;
    ensure!(
        !text.contains("KubeVirtVMIHypervisorNotReported")
            && text.contains("namespace_name_node:kubevirt_vmi_hypervisor_info:missing"),
        "the opt-in component must drop the coverage alert and keep the coverage rules"
    );

    let image = variable(policy, "image")?;
    let aggregator = variable(policy, "aggregator")?;
    let ours = json!({"image": image, "args": ["--aggregator", aggregator]});
    let examples = recorded_examples()?;
    let from_vm = &example(&examples, "example")?.vmi;
    let gate_on = kubevirt_cr(&["Sidecar"])?;
    let plain_ns = namespace("default", json!({"kubernetes.io/metadata.name": "default"}));
    let opted_in_ns = namespace("team-a", json!({ENROLL_LABEL: "true"}));
    let mut cases = recorded_cases(&examples, &gate_on, true)?;
    cases.extend(vec![
        (
            "an unlabelled VMI in a namespace labelled enroll=true",
            from_vm.clone(),
            opted_in_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "a VMI labelled enroll=false in a namespace labelled enroll=true",
            with_label(from_vm, "false"),
            opted_in_ns.clone(),
            gate_on.clone(),
            Expect::Skipped("policy objectSelector"),
        ),
        (
            "a VMI labelled enroll=true while the Sidecar gate is off",
            with_label(from_vm, "true"),
            plain_ns.clone(),
            kubevirt_cr(&[])?,
            Expect::Skipped("matchCondition sidecar-feature-gate-enabled"),
        ),
    ]);
    check_enrollment(policy, binding, &cases, &ours, &hook_sidecar_keys()?)
}

/// The recorded pod of an emulated VM: it runs on machines without KVM too.
const EMULATED_POD: (&str, &str) = ("emulation_without_kvm_reports_qemu_tcg", "pod-0");

/// The whole path, end to end without a cluster: the VMI of a recorded virt-launcher pod,
/// created without any annotation, goes through the enrollment policy (its settings pointing
/// at this test's aggregator, as an overlay would); the real launcher-sidecar runs in the pod
/// with the args of the entry the policy added, as KubeVirt runs the entry's image, and the
/// replay plays that pod's virt-launcher (tests/harness/replay.rs) against it.
#[test]
fn a_vmi_enrolled_by_the_policy_is_reported_by_the_sidecar_its_annotation_asks_for() -> Result<()> {
    use e2e::recording::RecordedPod;
    use e2e::replay::Replay;
    use e2e::timeline::inventory_list;
    use std::time::{Duration, Instant};

    let mut recorded = RecordedPod::load(EMULATED_POD.0, EMULATED_POD.1)?;
    let aggregator = Aggregator::start("node-1")?;
    let (mut policy, binding) = base_enrollment()?;
    set_variable(&mut policy, "aggregator", &aggregator.grpc_url())?;
    let file = recorded.dir.join("define-1.vmi.json");
    let mut vmi: Value = serde_json::from_str(&read(&file)?)
        .with_context(|| format!("parsing {}", file.display()))?;
    // The recording's own annotation goes: the policy writes it.
    vmi["metadata"]
        .as_object_mut()
        .context("metadata")?
        .remove("annotations");
    let request = Request {
        object: vmi,
        params: kubevirt_cr(&["Sidecar"])?,
        namespace: namespace(
            &recorded.vmi.namespace,
            json!({"kubernetes.io/metadata.name": recorded.vmi.namespace}),
        ),
    };
    let outcome = admit(&policy, &binding, &[request])?.remove(0);
    let enrolled = outcome
        .object()
        .with_context(|| format!("the policy left the VMI alone: {outcome:?}"))?;
    let sidecars = hook_sidecars(enrolled, &hook_sidecar_keys()?)?;
    let [entry] = sidecars.as_slice() else {
        bail!("the policy did not add one entry: {sidecars:?}");
    };
    recorded.vmi.sidecar_args = entry["args"]
        .as_array()
        .and_then(|args| args.iter().map(|a| a.as_str().map(str::to_owned)).collect())
        .context("the entry's args are not strings")?;
    let address = match recorded.vmi.sidecar_args.as_slice() {
        [flag, address] if flag == "--aggregator" => address.clone(),
        args => bail!("the entry's args are not [\"--aggregator\", <address>]: {args:?}"),
    };
    ensure!(
        address == aggregator.grpc_url(),
        "the entry's aggregator is {address}, the policy's setting {}",
        aggregator.grpc_url()
    );

    // This repository's binary stands in for the entry's image.
    let mut replay = Replay::new(&recorded, &address, Instant::now())?;
    replay.play_until(|a| *a == e2e::replay::Action::Destroy)?;
    let series = aggregator.series()?;
    ensure!(
        series.len() == 1
            && series[0]["namespace"] == recorded.vmi.namespace
            && series[0]["name"] == recorded.vmi.name
            && series[0]["hypervisor_type"] == "qemu-tcg",
        "the enrolled VMI must have one series, of type qemu-tcg (the recorded domain's): \
         {series:?}\n{}",
        replay.diagnostics()
    );
    let listed = inventory_list(&aggregator.grpc_addr())?;
    ensure!(
        listed.len() == 1
            && listed[0]
                .domain
                .as_ref()
                .is_some_and(|d| d.uid == recorded.vmi.uid),
        "Inventory/List should hold the VMI with its uid {}: {listed:?}",
        recorded.vmi.uid
    );
    replay.play_to_end()?;
    let status = replay.wait_sidecar_exit(Duration::from_secs(60))?;
    ensure!(
        status.success(),
        "the sidecar exited {status} after Shutdown"
    );
    ensure!(
        aggregator.names()?.is_empty(),
        "the series outlived the domain"
    );
    Ok(())
}
