//! The enrollment policy (manifests/base/enrollment-admissionpolicy.yaml) on
//! VirtualMachineInstances: its CEL run by [`admit`] on VMIs as KubeVirt creates them, the
//! resulting annotation parsed the way KubeVirt parses it, and KubeVirt's own definitions
//! read from its source.

use super::admission::{Outcome, Request, admit};
use super::kubevirt_source::{
    FEATURE_GATES, FEATURE_GATES_ACTIVE, VM_CONTROLLER, VMI_CREATE_ADMITTER, VMI_STATS,
    hook_sidecar_keys, kubevirt_file,
};
use super::*;

const ANNOTATION: &str = "hooks.kubevirt.io/hookSidecars";
const ENROLL_LABEL: &str = "kubevirt-hypervisor-metric/enroll";
/// What the policy's variables hold before kustomize writes the settings into them.
const UNSET: &str = "set-by-kustomize";

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

/// The VirtualMachineInstance that virt-controller creates to start `vm`, printed by
/// KubeVirt's own code (tests/kubevirt/cmd/kvhm-vmi-from-vm: `SetupVMIFromVM` and what the
/// VM controller adds before it creates the VMI). `vm` gets the uid and generation the API
/// server would have given it.
fn vmi_from_vm(vm: &Value) -> Result<Value> {
    let programs = e2e::kubevirt::go_programs(&["kvhm-vmi-from-vm"])?;
    let mut vm = vm.clone();
    vm["metadata"]["uid"] = json!("6f0b6f3e-1d1c-4c4f-9a43-2b1e8d1d6a10");
    vm["metadata"]["generation"] = json!(1);
    let cmd = Command::new(programs.path("kvhm-vmi-from-vm"));
    let input = serde_json::to_vec(&vm)?;
    let out = run_with_timeout(cmd, Some(&input), TOOL_TIMEOUT, "kvhm-vmi-from-vm")?;
    ensure!(
        out.status.success(),
        "kvhm-vmi-from-vm: {}",
        output_text(&out)
    );
    serde_json::from_str(&out.stdout).context("kvhm-vmi-from-vm printed no JSON")
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
/// objects of strings (configMap, pvc). Keys it does not know are ignored by Go's decoder, but
/// the project writes only known ones.
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
        "KubeVirt's hooks.HookSidecar has the keys {keys:?}; the tests know {ours:?}"
    );
    ensure!(
        kubevirt_file(super::kubevirt_source::HOOKS)?
            .contains(&format!("HookSidecarListAnnotationName = \"{ANNOTATION}\"")),
        "KubeVirt's hook sidecar annotation is no longer {ANNOTATION}"
    );
    // KubeVirt refuses a VMI with the annotation while the Sidecar gate is off; the gate is
    // Alpha, so it is on exactly when featureGates lists it: the policy's matchCondition.
    ensure!(
        kubevirt_file(VMI_CREATE_ADMITTER)?.contains(
            "annotations[hooks.HookSidecarListAnnotationName] != \"\" && !config.SidecarEnabled()"
        ),
        "KubeVirt's VMI admission no longer ties the annotation to the Sidecar gate"
    );
    let active = kubevirt_file(FEATURE_GATES_ACTIVE)?;
    ensure!(
        Regex::new(r#"SidecarGate\s*=\s*"Sidecar""#)?.is_match(active)
            && active.contains("RegisterFeatureGate(FeatureGate{Name: SidecarGate, State: Alpha})"),
        "the Sidecar feature gate is no longer an Alpha gate named Sidecar: change the policy's \
         sidecar-feature-gate-enabled condition"
    );
    ensure!(
        kubevirt_file(FEATURE_GATES)?.contains("slices.Contains(devConfig.FeatureGates, gate)"),
        "KubeVirt no longer reads gates from developerConfiguration.featureGates"
    );
    // kvhm-vmi-from-vm runs SetupVMIFromVM itself, but re-does these steps of the VM
    // controller's startVMI, a method that needs a running controller.
    let controller = kubevirt_file(VM_CONTROLLER)?;
    for needle in [
        "vmi := SetupVMIFromVM(vm)",
        "setGenerationAnnotationOnVmi(vm.Generation, vmi)",
        "vmi.Finalizers = append(vmi.Finalizers, virtv1.VirtualMachineControllerFinalizer)",
        "AutoAttachInputDevice(vmi)",
        "netvmispec.SetDefaultNetworkInterface(c.clusterConfig, &vmi.Spec)",
    ] {
        ensure!(
            controller.contains(needle),
            "virt-controller's startVMI changed ({needle:?} is gone): \
             check tests/kubevirt/cmd/kvhm-vmi-from-vm"
        );
    }
    // kubevirt_vmi_info, which the coverage rules join on: its labels and its phase values.
    let stats = kubevirt_file(VMI_STATS)?;
    let declared = Regex::new(
        r#"(?s)Name:\s*"kubevirt_vmi_info".*?\[\]string\{\s*//[^\n]*\n\s*"node", "namespace", "name",\s*//[^\n]*\n\s*"phase","#,
    )?;
    ensure!(
        declared.is_match(stats),
        "kubevirt_vmi_info no longer starts with the labels node, namespace, name, phase"
    );
    ensure!(
        stats.contains("return strings.ToLower(string(vmi.Status.Phase))"),
        "kubevirt_vmi_info's phase is no longer the lower-cased VMI phase (phase=\"running\")"
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

/// The enrollment cases: (what, the VMI, its namespace, the KubeVirt CR, what must happen).
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
    let (vmi, vm) = unannotated_examples()?;
    let from_vm = vmi_from_vm(&vm)?;
    let gate_on = kubevirt_cr(&["Sidecar", "Snapshot"])?;
    let default_ns = namespace("default", json!({"kubernetes.io/metadata.name": "default"}));
    let other = json!({"image": "quay.io/acme/smbios-sidecar:1.2", "imagePullPolicy": "IfNotPresent",
                       "args": ["--version", "v1alpha2"],
                       "configMap": {"name": "hook", "key": "my_script.sh", "hookPath": "/usr/bin/onDefineDomain"}});
    let handwritten = resources_in(&resource_files()?)?;
    let annotated = only(&handwritten, "VirtualMachineInstance")?.doc.clone();

    let cases: Vec<(&str, Value, Value, Value, Expect)> = vec![
        (
            "the VMI of a VirtualMachine without any annotation of its own",
            from_vm.clone(),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "a VMI created by hand, without annotations at all",
            vmi.clone(),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "a VMI with another project's hook sidecar",
            with_annotation(&from_vm, &serde_json::to_string(&json!([other]))?),
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
            with_annotation(&from_vm, " [ ] "),
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
                &from_vm,
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
            "malformed: a truncated list",
            with_annotation(&from_vm, "[{\"image\": \"quay.io/acme/x:1\""),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: a trailing comma",
            with_annotation(&from_vm, "[{\"image\": \"quay.io/acme/x:1\"},]"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: one object, not a list",
            with_annotation(&from_vm, "{\"image\": \"quay.io/acme/x:1\"}"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: an empty annotation",
            with_annotation(&from_vm, ""),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "malformed: not JSON",
            with_annotation(&from_vm, "[image: quay.io/acme/x:1]"),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "valid JSON beyond what a sidecar list holds (nested lists): left alone too",
            with_annotation(
                &from_vm,
                "[{\"image\": \"quay.io/acme/x:1\", \"x\": [[1]]}]",
            ),
            default_ns.clone(),
            gate_on.clone(),
            Expect::Unchanged,
        ),
        (
            "a VMI labelled enroll=false (from its VM's template)",
            vmi_from_vm(&with_template_label(&vm, "false"))?,
            default_ns.clone(),
            gate_on.clone(),
            Expect::Skipped("policy objectSelector"),
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
            with_label(&from_vm, "true"),
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
    ];
    check_enrollment(&policy, &binding, &cases, &ours, &keys)?;
    eprintln!(
        "enrollment policy: {} VMIs evaluated (by hand and from virt-controller's own code)",
        cases.len()
    );
    Ok(())
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
    cases: &[(&str, Value, Value, Value, Expect)],
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
    let (_, vm) = unannotated_examples()?;
    let from_vm = vmi_from_vm(&vm)?;
    let gate_on = kubevirt_cr(&["Sidecar"])?;
    let plain_ns = namespace("default", json!({"kubernetes.io/metadata.name": "default"}));
    let opted_in_ns = namespace("team-a", json!({ENROLL_LABEL: "true"}));
    let cases: Vec<(&str, Value, Value, Value, Expect)> = vec![
        (
            "an unlabelled VMI in an unlabelled namespace",
            from_vm.clone(),
            plain_ns.clone(),
            gate_on.clone(),
            Expect::Skipped("matchCondition opted-in"),
        ),
        (
            "a VMI labelled enroll=true (from its VM's template)",
            vmi_from_vm(&with_template_label(&vm, "true"))?,
            plain_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "an unlabelled VMI in a namespace labelled enroll=true",
            from_vm.clone(),
            opted_in_ns.clone(),
            gate_on.clone(),
            Expect::Enrolled(vec![]),
        ),
        (
            "a VMI labelled enroll=false in a namespace labelled enroll=true",
            with_label(&from_vm, "false"),
            opted_in_ns.clone(),
            gate_on.clone(),
            Expect::Skipped("policy objectSelector"),
        ),
        (
            "a VMI labelled enroll=true while the Sidecar gate is off",
            with_label(&from_vm, "true"),
            plain_ns.clone(),
            kubevirt_cr(&[])?,
            Expect::Skipped("matchCondition sidecar-feature-gate-enabled"),
        ),
    ];
    check_enrollment(policy, binding, &cases, &ours, &hook_sidecar_keys()?)
}

/// The whole path, end to end without a cluster: a VMI created without any annotation goes
/// through the enrollment policy (its settings pointing at this test's aggregator, as an
/// overlay would), the pod gets the hook sidecar the mutated annotation asks for, read by
/// KubeVirt's own code, and KubeVirt's own virt-launcher runs the VM with it
/// (tests/harness/kubevirt_pod.rs). Emulated, so that it needs no KVM.
#[test]
fn a_vmi_enrolled_by_the_policy_is_reported_from_kubevirts_own_virt_launcher() -> Result<()> {
    use e2e::kubevirt_pod::{LauncherPod, Mode, PodConfig, Vmi};
    use e2e::timeline::inventory_list;
    use e2e::tools::wait_until;
    use std::time::Duration;

    let aggregator = Aggregator::start("node-1")?;
    let (mut policy, binding) = base_enrollment()?;
    set_variable(&mut policy, "aggregator", &aggregator.grpc_url())?;
    let mut vmi = Vmi::bare("default", "vm-enrolled");
    let request = Request {
        object: vmi.json.clone(),
        params: kubevirt_cr(&["Sidecar"])?,
        namespace: namespace("default", json!({"kubernetes.io/metadata.name": "default"})),
    };
    let outcome = admit(&policy, &binding, &[request])?.remove(0);
    vmi.json = outcome
        .object()
        .with_context(|| format!("the policy left the VMI alone: {outcome:?}"))?
        .clone();

    let config = PodConfig {
        kvm: false,
        use_emulation: true,
        ..PodConfig::new(Mode::NonRoot)
    };
    let mut pod = LauncherPod::start(config, &vmi)?;
    pod.sync()?;
    let series = wait_until(
        Duration::from_secs(120),
        "the enrolled VMI's series",
        || {
            Ok(aggregator
                .series()?
                .into_iter()
                .find(|labels| labels["name"] == "vm-enrolled"))
        },
    )
    .with_context(|| pod.diagnostics())?;
    ensure!(
        series["namespace"] == "default" && series["hypervisor_type"] == "qemu-tcg",
        "the enrolled VMI's series: {series:?}"
    );
    let listed = inventory_list(&aggregator.grpc_addr())?;
    ensure!(
        listed.len() == 1 && listed[0].domain.as_ref().is_some_and(|d| d.uid == vmi.uid),
        "Inventory/List should hold the VMI with its uid {}: {listed:?}",
        vmi.uid
    );

    // virt-launcher's own domain check races a kill in the VM's first seconds
    // (../shared/kubevirt/README.md).
    std::thread::sleep(Duration::from_secs(10));
    pod.kill_vm()?;
    wait_until(Duration::from_secs(60), "the series gone", || {
        Ok(aggregator.names()?.is_empty().then_some(()))
    })
    .with_context(|| pod.diagnostics())?;
    let status = pod.wait_sidecar_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "the sidecar exited {status}");
    Ok(())
}
