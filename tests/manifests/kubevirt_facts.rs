//! What KubeVirt defines that the manifests rely on (the hook sidecar annotation and its keys,
//! the Sidecar feature gate, `kubevirt_vmi_info`, …), recorded as data in `facts.json` of the
//! KubeVirt recordings (`kubevirt-recordings` in `../shared` beside the repository, or
//! `KVHM_RECORDINGS`): each fact names the KubeVirt file and line that defines it, so that a
//! failing check points a reader at KubeVirt itself.

use std::sync::OnceLock;

use super::*;

/// The KubeVirt recordings: `KVHM_RECORDINGS`, else beside the repository.
pub use e2e::recording::recordings_dir;

#[derive(Debug, Deserialize)]
struct FactsFile {
    kubevirt_commit: String,
    facts: Vec<Fact>,
}

/// One name KubeVirt defines, and where.
#[derive(Debug, Deserialize)]
pub struct Fact {
    pub name: String,
    pub value: Value,
    /// `file:line` in KubeVirt's tree.
    pub source: String,
    /// The line as KubeVirt writes it, where the fact quotes it.
    #[serde(default)]
    as_written: Option<String>,
    /// Set by [`facts`]: the commit and the file the fact came from, for messages.
    #[serde(skip)]
    cited: String,
}

impl Fact {
    /// Where a reader finds the fact in KubeVirt, and the file it was read from.
    pub fn cite(&self) -> &str {
        &self.cited
    }

    pub fn str(&self) -> Result<&str> {
        self.value
            .as_str()
            .with_context(|| format!("fact {:?} is not a string ({})", self.name, self.cite()))
    }

    pub fn bool(&self) -> Result<bool> {
        self.value
            .as_bool()
            .with_context(|| format!("fact {:?} is not a boolean ({})", self.name, self.cite()))
    }

    pub fn strings(&self) -> Result<Vec<&str>> {
        self.value
            .as_array()
            .and_then(|items| items.iter().map(Value::as_str).collect())
            .with_context(|| {
                format!(
                    "fact {:?} is not a list of strings ({})",
                    self.name,
                    self.cite()
                )
            })
    }
}

fn load(file: &Path) -> Result<Vec<Fact>> {
    let text = read(file).with_context(|| {
        format!(
            "KubeVirt's facts are missing: the KubeVirt recordings belong in {} (or the \
             directory KVHM_RECORDINGS names)",
            recordings_dir().display()
        )
    })?;
    let parsed: FactsFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let mut facts = parsed.facts;
    for fact in &mut facts {
        let quoted = fact
            .as_written
            .as_deref()
            .map(|line| format!(": `{line}`"))
            .unwrap_or_default();
        fact.cited = format!(
            "KubeVirt {}{quoted} at commit {}, per {}",
            fact.source,
            parsed.kubevirt_commit,
            file.display()
        );
    }
    Ok(facts)
}

/// facts.json, read once per test process.
fn facts() -> Result<&'static (PathBuf, Vec<Fact>)> {
    static FACTS: OnceLock<Result<(PathBuf, Vec<Fact>), String>> = OnceLock::new();
    FACTS
        .get_or_init(|| {
            let file = recordings_dir().join("facts.json");
            load(&file)
                .map(|facts| (file, facts))
                .map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The fact called `name`.
pub fn fact(name: &str) -> Result<&'static Fact> {
    let (file, facts) = facts()?;
    facts
        .iter()
        .find(|fact| fact.name == name)
        .with_context(|| format!("{} has no fact {name:?}", file.display()))
}

/// The JSON keys of one entry of KubeVirt's hook sidecar list (`hooks.HookSidecar`).
pub fn hook_sidecar_keys() -> Result<BTreeSet<String>> {
    let fact = fact("hook sidecar list entry fields (JSON)")?;
    Ok(fact.strings()?.into_iter().map(str::to_string).collect())
}
