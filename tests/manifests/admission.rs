//! The admission policies, run the way the API server runs a MutatingAdmissionPolicy on one
//! request: the policy's and the binding's selectors (here, in Rust), then its
//! matchConditions, variables and JSONPatch expression (CEL, with npm `@bufbuild/cel`: RE2
//! regexes and the CEL strings extension, as in Kubernetes), then the patch, applied by the
//! rules of RFC 6902 as the API server's json-patch library applies them.
//!
//! What is emulated, because that evaluator is not Kubernetes':
//! - the typed literals `JSONPatch{…}` and `Object.…{…}` are evaluated as maps with the same
//!   fields ([`plain_literals`]);
//! - `lists.range` and `jsonpatch.escapeKey` are defined in [`EVALUATOR`] as Kubernetes
//!   defines them (`k8s.io/apiserver/pkg/cel/library`);
//! - variables are evaluated eagerly, in order (Kubernetes evaluates them lazily), so every
//!   variable must evaluate without error on every request: stricter, never looser.
//!
//! The API server's own type checking of a policy is not covered (docs/deployment.md says so).

use super::*;

/// One admission request, as the policy's CEL sees it.
#[derive(Clone)]
pub struct Request {
    pub object: Value,
    /// `params`: the binding's parameter object (null for a policy without paramKind).
    pub params: Value,
    /// `namespaceObject`: the Namespace of the object.
    pub namespace: Value,
}

/// What a policy did to a request.
#[derive(Debug)]
pub enum Outcome {
    /// Not applied: the selector or matchCondition named.
    Skipped(String),
    /// Applied: the JSONPatch operations and the object after them (no operation: unchanged).
    Patched { patches: Vec<Value>, object: Value },
}

impl Outcome {
    pub fn object(&self) -> Option<&Value> {
        match self {
            Outcome::Patched { object, .. } => Some(object),
            Outcome::Skipped(_) => None,
        }
    }
}

/// Whether a LabelSelector matches `labels`, with Kubernetes' semantics (an absent or empty
/// selector matches everything; NotIn and DoesNotExist match an absent key).
pub fn label_selector_matches(selector: &Value, labels: &Value) -> Result<bool> {
    if selector.is_null() {
        return Ok(true);
    }
    let labels = string_map(labels);
    for (key, value) in string_map(&selector["matchLabels"]) {
        if labels.get(&key) != Some(&value) {
            return Ok(false);
        }
    }
    for expression in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = expression["key"].as_str().context("matchExpressions key")?;
        let values: Vec<&str> = expression["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let label = labels.get(key).map(String::as_str);
        let matches = match expression["operator"].as_str() {
            Some("In") => label.is_some_and(|l| values.contains(&l)),
            Some("NotIn") => label.is_none_or(|l| !values.contains(&l)),
            Some("Exists") => label.is_some(),
            Some("DoesNotExist") => label.is_none(),
            other => bail!("unknown selector operator {other:?}"),
        };
        if !matches {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Rewrites the typed literals `JSONPatch{op: …}` and `Object.a.b{field: …}` into map
/// literals `{'op': …}`: the same fields, without Kubernetes' types. String literals (also
/// raw ones) are copied untouched.
pub fn plain_literals(expression: &str) -> String {
    let chars: Vec<char> = expression.chars().collect();
    let mut out = String::new();
    // Open brackets: '{' of a typed literal is 'T', others as written.
    let mut open: Vec<char> = Vec::new();
    let mut last_significant = ' ';
    let mut i = 0;
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' || c == '"' {
            let raw = i > 0 && (chars[i - 1] == 'r' || chars[i - 1] == 'R');
            let start = i;
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' && !raw { 2 } else { 1 };
            }
            i += 1;
            out.extend(&chars[start..i.min(chars.len())]);
            last_significant = c;
            continue;
        }
        if is_ident(c) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == '.')) {
            let start = i;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let typed =
                (word == "JSONPatch" || word.starts_with("Object")) && chars.get(i) == Some(&'{');
            if typed {
                out.push('{');
                open.push('T');
                i += 1;
                last_significant = '{';
                continue;
            }
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let field = open.last() == Some(&'T')
                && (last_significant == '{' || last_significant == ',')
                && chars.get(j) == Some(&':');
            if field {
                out.push_str(&format!("'{word}'"));
            } else {
                out.push_str(&word);
            }
            last_significant = 'a';
            continue;
        }
        match c {
            '{' | '[' | '(' => open.push(c),
            '}' | ']' | ')' => {
                open.pop();
            }
            _ => {}
        }
        if !c.is_whitespace() {
            last_significant = c;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Evaluates each request with @bufbuild/cel; the input is `input.json` beside it.
const EVALUATOR: &str = r#"import { readFileSync } from "node:fs";
import { run, celFunc, listType, CelScalar, isCelList, isCelMap, isCelError } from "@bufbuild/cel";
import { strings } from "@bufbuild/cel/ext";
// Kubernetes' own CEL functions, as k8s.io/apiserver/pkg/cel/library defines them.
const range = celFunc("lists.range", [CelScalar.INT], listType(CelScalar.INT),
  (n) => Array.from({ length: Number(n) }, (_, i) => BigInt(i)));
const escapeKey = celFunc("jsonpatch.escapeKey", [CelScalar.STRING], CelScalar.STRING,
  (key) => key.replaceAll("~", "~0").replaceAll("/", "~1"));
const funcs = [...strings, range, escapeKey];
const check = (v) => {
  if (isCelError(v)) throw new Error(v.message ?? String(v));
  return v;
};
const plain = (v) => {
  check(v);
  if (isCelList(v)) return [...v].map(plain);
  if (isCelMap(v)) return Object.fromEntries([...v.entries()].map(([k, x]) => [String(k), plain(x)]));
  if (typeof v === "bigint") return Number(v);
  return v;
};
const evaluate = (expr, bindings) => check(run(expr, bindings, { funcs }));
// RFC 6902 as gopkg.in/evanphx/json-patch.v4 applies it: a failed test leaves the object as it was.
const keys = (path) => path.split("/").slice(1).map((k) => k.replaceAll("~1", "/").replaceAll("~0", "~"));
const parentOf = (doc, path) => {
  const ks = keys(path);
  const last = ks.pop();
  let parent = doc;
  for (const k of ks) {
    parent = parent?.[Array.isArray(parent) ? Number(k) : k];
    if (parent === undefined || parent === null) throw new Error(`${path}: no parent`);
  }
  return [parent, last];
};
const applyOne = (doc, { op, path, value }) => {
  const [parent, last] = parentOf(doc, path);
  const list = Array.isArray(parent);
  const has = list ? Number(last) < parent.length : Object.hasOwn(parent, last);
  switch (op) {
    case "add":
      if (list) parent.splice(last === "-" ? parent.length : Number(last), 0, value);
      else parent[last] = value;
      return true;
    case "replace":
      if (!has) throw new Error(`replace ${path}: nothing there`);
      parent[list ? Number(last) : last] = value;
      return true;
    case "remove":
      if (!has) throw new Error(`remove ${path}: nothing there`);
      if (list) parent.splice(Number(last), 1); else delete parent[last];
      return true;
    case "test":
      return JSON.stringify(parent[list ? Number(last) : last]) === JSON.stringify(value);
    default:
      throw new Error(`unknown op ${op}`);
  }
};
const input = JSON.parse(readFileSync("input.json", "utf8"));
const results = input.requests.map(({ object, params, namespaceObject }) => {
  const request = { object, oldObject: null, params, namespaceObject };
  try {
    for (const [name, expr] of input.conditions) {
      if (evaluate(expr, request) !== true) return { skipped: name };
    }
    const variables = {};
    for (const [name, expr] of input.variables) {
      try { variables[name] = evaluate(expr, { ...request, variables }); }
      catch (e) { throw new Error(`variable ${name}: ${e.message}`); }
    }
    const patches = [];
    for (const expr of input.mutations) {
      const ops = plain(evaluate(expr, { ...request, variables }));
      const patched = structuredClone(object);
      if (ops.every((op) => applyOne(patched, op))) Object.assign(object, patched);
      patches.push(...ops);
    }
    return { patches, object };
  } catch (e) {
    return { error: e.message };
  }
});
console.log(JSON.stringify(results));
"#;

/// Runs `policy` (with `binding`'s selectors) on each request; an evaluation error is an error.
pub fn admit(policy: &Resource, binding: &Resource, requests: &[Request]) -> Result<Vec<Outcome>> {
    let tools = schema_tools()?;
    let expressions = |pointer: &str, with_names: bool| -> Result<Vec<Value>> {
        Ok(policy
            .doc
            .pointer(pointer)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|item| {
                let expression = item["expression"].as_str().unwrap_or("");
                if with_names {
                    json!([item["name"], plain_literals(expression)])
                } else {
                    json!(plain_literals(expression))
                }
            })
            .collect())
    };
    let conditions = expressions("/spec/matchConditions", true)?;
    let variables = expressions("/spec/variables", true)?;
    let mutations: Vec<Value> = policy
        .at("/spec/mutations")?
        .as_array()
        .context("mutations")?
        .iter()
        .map(|m| {
            ensure!(
                m["patchType"] == json!("JSONPatch"),
                "{}: only JSONPatch mutations can be evaluated here",
                policy.describe()
            );
            Ok(json!(plain_literals(
                m["jsonPatch"]["expression"].as_str().unwrap_or("")
            )))
        })
        .collect::<Result<_>>()?;

    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    let mut evaluated = Vec::new();
    for request in requests {
        let labels = &request.object["metadata"]["labels"];
        let namespace_labels = &request.namespace["metadata"]["labels"];
        let selectors = [
            (
                "policy objectSelector",
                &policy.doc["spec"]["matchConstraints"]["objectSelector"],
                labels,
            ),
            (
                "policy namespaceSelector",
                &policy.doc["spec"]["matchConstraints"]["namespaceSelector"],
                namespace_labels,
            ),
            (
                "binding objectSelector",
                &binding.doc["spec"]["matchResources"]["objectSelector"],
                labels,
            ),
            (
                "binding namespaceSelector",
                &binding.doc["spec"]["matchResources"]["namespaceSelector"],
                namespace_labels,
            ),
        ];
        let mut skipped = None;
        for (what, selector, labels) in selectors {
            if !label_selector_matches(selector, labels)? {
                skipped = Some(Outcome::Skipped(what.to_string()));
                break;
            }
        }
        if skipped.is_none() {
            evaluated.push(json!({
                "object": request.object,
                "params": request.params,
                "namespaceObject": request.namespace,
            }));
        }
        outcomes.push(skipped);
    }

    let dir = temp_dir("admission-cel.")?;
    std::os::unix::fs::symlink(tools.join("node_modules"), dir.path().join("node_modules"))?;
    let input = json!({
        "conditions": conditions,
        "variables": variables,
        "mutations": mutations,
        "requests": evaluated,
    });
    fs::write(
        dir.path().join("input.json"),
        serde_json::to_string(&input)?,
    )?;
    fs::write(dir.path().join("evaluate.mjs"), EVALUATOR)?;
    let mut cmd = Command::new("node");
    cmd.arg("evaluate.mjs").current_dir(dir.path());
    let out = run_with_timeout(cmd, None, TOOL_TIMEOUT, "node evaluate.mjs")
        .context("node comes from the machine image or `make deps` (Debian nodejs)")?;
    ensure!(
        out.status.success(),
        "evaluating {}'s CEL failed:\n{}",
        policy.describe(),
        output_text(&out)
    );
    let mut results: Vec<Value> = serde_json::from_str(out.stdout.trim())?;
    results.reverse();
    outcomes
        .into_iter()
        .map(|outcome| {
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            let result = results.pop().context("a result per request")?;
            if let Some(error) = result["error"].as_str() {
                bail!("{}: {error}", policy.describe());
            }
            Ok(match result["skipped"].as_str() {
                Some(condition) => Outcome::Skipped(format!("matchCondition {condition}")),
                None => Outcome::Patched {
                    patches: result["patches"].as_array().cloned().unwrap_or_default(),
                    object: result["object"].clone(),
                },
            })
        })
        .collect()
}

#[test]
fn typed_literals_become_maps_and_strings_stay_as_they_are() {
    assert_eq!(
        plain_literals(
            "[JSONPatch{op: 'add', path: '/a', value: Object.spec.x{name: 'n', readOnly: c ? a : b}}]"
        ),
        "[{'op': 'add', 'path': '/a', 'value': {'name': 'n', 'readOnly': c ? a : b}}]"
    );
    assert_eq!(
        plain_literals(r#"JSONPatch{value: '{image: "x", it\'s: [a]}' + r'a\', path: {'k': v}}"#),
        r#"{'value': '{image: "x", it\'s: [a]}' + r'a\', 'path': {'k': v}}"#
    );
}

// ---------------------------------------------------------------------------------------------
// The libvirt-socket policy

/// A virt-launcher pod as KubeVirt renders it, reduced to what the policy looks at.
fn launcher_pod(containers: Value, volumes: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "virt-launcher-vm-a-x7k2p", "namespace": "default",
                     "labels": {"kubevirt.io": "virt-launcher"}},
        "spec": {"containers": containers, "volumes": volumes}
    })
}

fn hook_sidecar(name: &str, image: &str, extra_mounts: Value) -> Value {
    let mut mounts =
        vec![json!({"name": "hook-sidecar-sockets", "mountPath": "/var/run/kubevirt-hooks"})];
    mounts.extend(extra_mounts.as_array().cloned().unwrap_or_default());
    json!({"name": name, "image": image, "volumeMounts": mounts})
}

/// Pods to admit: (what, pod, the containers that mount /var/run/libvirt after the mutation;
/// `None`: the policy must not apply at all).
fn socket_cases() -> Vec<(&'static str, Value, Option<Vec<&'static str>>)> {
    let sidecar = "registry.example.com:5000/kvhm/launcher-sidecar:0.1.0";
    let digest = "quay.io/kvhm/launcher-sidecar@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let compute = json!({"name": "compute", "image": "quay.io/kubevirt/virt-launcher:v1.6.0",
        "volumeMounts": [{"name": "libvirt-runtime", "mountPath": "/var/run/libvirt"}]});
    let disk = json!({"name": "volumecontainerdisk", "image": "quay.io/kubevirt/cirros-container-disk-demo"});
    let volumes = json!([{"name": "libvirt-runtime", "emptyDir": {}},
                         {"name": "hook-sidecar-sockets", "emptyDir": {}}]);
    vec![
        (
            "our sidecar next to compute and a container disk",
            launcher_pod(
                json!([
                    compute,
                    hook_sidecar("hook-sidecar-0", sidecar, json!([])),
                    disk
                ]),
                volumes.clone(),
            ),
            Some(vec!["compute", "hook-sidecar-0"]),
        ),
        (
            "another project's sidecar first, ours second, pinned by digest and without mounts",
            launcher_pod(
                json!([compute, hook_sidecar("hook-sidecar-0", "quay.io/acme/smbios-sidecar:1", json!([])),
                       {"name": "hook-sidecar-1", "image": digest}]),
                volumes.clone(),
            ),
            Some(vec!["compute", "hook-sidecar-1"]),
        ),
        (
            "our sidecar that already mounts the socket directory",
            launcher_pod(
                json!([
                    compute,
                    hook_sidecar(
                        "hook-sidecar-0",
                        sidecar,
                        json!([{"name": "libvirt-runtime", "mountPath": "/var/run/libvirt/", "readOnly": true}])
                    )
                ]),
                volumes.clone(),
            ),
            Some(vec!["compute", "hook-sidecar-0"]),
        ),
        (
            "our image in a container that is not a hook sidecar, next to another project's sidecar",
            launcher_pod(
                json!([
                    compute,
                    hook_sidecar("hook-sidecar-0", "quay.io/acme/smbios-sidecar:1", json!([])),
                    {"name": "debug", "image": sidecar}
                ]),
                volumes.clone(),
            ),
            Some(vec!["compute"]),
        ),
        (
            "a VM without hook sidecars",
            launcher_pod(json!([compute, disk]), volumes.clone()),
            None,
        ),
        (
            "no libvirt-runtime volume",
            launcher_pod(
                json!([{"name": "compute", "image": "x"}, hook_sidecar("hook-sidecar-0", sidecar, json!([]))]),
                json!([{"name": "hook-sidecar-sockets", "emptyDir": {}}]),
            ),
            None,
        ),
        (
            "not a virt-launcher pod",
            {
                let mut pod = launcher_pod(
                    json!([compute, hook_sidecar("hook-sidecar-0", sidecar, json!([]))]),
                    volumes.clone(),
                );
                pod["metadata"]["labels"] = json!({"app": "other"});
                pod
            },
            None,
        ),
    ]
}

#[test]
fn the_admission_policy_mounts_the_socket_into_launcher_sidecars_only() -> Result<()> {
    let resources = base_resources()?;
    let policy = find(&resources, "MutatingAdmissionPolicy", LIBVIRT_SOCKET)?;
    let binding = find(&resources, "MutatingAdmissionPolicyBinding", LIBVIRT_SOCKET)?;
    let cases = socket_cases();
    let requests: Vec<Request> = cases
        .iter()
        .map(|(_, pod, _)| Request {
            object: pod.clone(),
            params: Value::Null,
            namespace: json!({"metadata": {"name": "default", "labels": {}}}),
        })
        .collect();
    let outcomes = admit(policy, binding, &requests)?;
    for ((what, pod, expected), outcome) in cases.iter().zip(&outcomes) {
        match (expected, outcome) {
            (None, Outcome::Skipped(_)) => {}
            (None, Outcome::Patched { patches, .. }) => {
                bail!("{what}: the policy must not apply, it patched {patches:?}")
            }
            (Some(_), Outcome::Skipped(why)) => bail!("{what}: the policy did not apply ({why})"),
            (Some(expected), Outcome::Patched { patches, object }) => {
                let containers = object["spec"]["containers"]
                    .as_array()
                    .context("containers")?;
                ensure!(
                    containers.len() == pod["spec"]["containers"].as_array().map_or(0, Vec::len),
                    "{what}: containers added or removed"
                );
                let mut mounting = Vec::new();
                for container in containers {
                    let name = container["name"].as_str().unwrap_or("");
                    let mounts: Vec<&Value> = container["volumeMounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|m| {
                            m["mountPath"]
                                .as_str()
                                .is_some_and(|p| p.trim_end_matches('/') == "/var/run/libvirt")
                        })
                        .collect();
                    ensure!(
                        mounts.len() <= 1,
                        "{what}: {name} mounts /var/run/libvirt twice"
                    );
                    if let Some(mount) = mounts.first() {
                        mounting.push(name);
                        if name.starts_with("hook-sidecar-") {
                            ensure!(
                                mount["name"] == json!("libvirt-runtime")
                                    && mount["readOnly"] == json!(true),
                                "{what}: {name} must mount libvirt-runtime read-only: {mount}"
                            );
                        }
                    }
                }
                ensure!(
                    mounting == *expected,
                    "{what}: /var/run/libvirt is mounted by {mounting:?}, expected {expected:?} \
                     (patches: {patches:?})"
                );
            }
        }
    }
    Ok(())
}
