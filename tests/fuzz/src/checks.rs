//! What each fuzz target checks. Every function takes the fuzzer's raw bytes and panics
//! when a property does not hold; anything else the code under test does with the bytes is
//! fine, as long as it does not panic (or, under the sanitizer, touch memory it must not).
//!
//! Shared by the cargo-fuzz targets (`tests/fuzz/fuzz_targets/`) and by
//! `tests/fuzz_regressions.rs`, which replays saved inputs in `cargo test`.

use std::collections::{BTreeMap, BTreeSet};

use hypervisor_proto::v1::{Domain, DomainReport, HypervisorType, domain_report::Change};
use launcher_sidecar::classify::{VmiName, classify_domain_xml as classify, hypervisor_of};
use launcher_sidecar::hook::VmiMetadata;
use node_aggregator::metrics::Exposition;
use node_aggregator::registry::{Capacity, Registry, StreamHandle, VmiKey};
use node_aggregator::validate::{self, Rejection};
use prost::Message;

/// `classify_domain_xml` on the bytes as UTF-8 (when they are) and through
/// `from_utf8_lossy` (what the hook does with virt-launcher's bytes); `VmiName` on the same
/// text; and the bytes as the uid of an otherwise well-formed KubeVirt domain.
pub fn classify_domain_xml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_domain_xml(text);
        check_domain_name(text);
    }
    let lossy = String::from_utf8_lossy(data);
    check_domain_xml(&lossy);
    check_domain_name(&lossy);
    check_uid_round_trip(data);
}

fn check_domain_xml(xml: &str) {
    let classified = classify(xml);
    if let Some(uid) = &classified.uid {
        assert!(!uid.is_empty(), "an empty uid must read as None");
        assert_eq!(uid.trim(), uid, "the uid is trimmed");
    }
    // Anything but `unknown` needs a root `<domain>` element with a `type` attribute.
    if classified.hypervisor != HypervisorType::Unknown {
        assert!(
            xml.contains("domain") && xml.contains("type"),
            "{:?} from a text without <domain type=…>: {xml:?}",
            classified.hypervisor
        );
    }
    assert_eq!(classify(xml), classified, "the same XML classified twice");
}

fn check_domain_name(text: &str) {
    if let Some(vmi) = VmiName::from_domain_name(text) {
        assert!(!vmi.namespace.is_empty() && !vmi.name.is_empty());
        assert!(
            !vmi.namespace.contains('_'),
            "the namespace ends at the first '_'"
        );
        assert_eq!(format!("{}_{}", vmi.namespace, vmi.name), text);
    } else {
        assert!(
            match text.split_once('_') {
                None => true,
                Some((namespace, name)) => namespace.is_empty() || name.is_empty(),
            },
            "{text:?} is a KubeVirt domain name"
        );
    }
}

/// The domain types KubeVirt's and libvirt's XML may carry, plus some that map to `unknown`.
const DOMAIN_TYPES: [&str; 6] = ["kvm", "qemu", "hyperv", "xen", "KVM", ""];

/// The first byte picks the domain type; the rest, reduced to the characters a uid is made
/// of, is the uid in KubeVirt's metadata. Both must come back out exactly.
fn check_uid_round_trip(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let domain_type = DOMAIN_TYPES[usize::from(pick) % DOMAIN_TYPES.len()];
    let uid: String = rest
        .iter()
        .map(|&b| char::from(b))
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let xml = format!(
        "<domain type='{domain_type}' id='7'>\n  <name>ns_vm</name>\n  <uuid>5d2a5ec8-2bd4-4b3b-9c4e-8f1c6f0d3d7e</uuid>\n  \
         <metadata>\n    <kubevirt:kubevirt xmlns:kubevirt=\"http://kubevirt.io\">\n      \
         <kubevirt:uid>{uid}</kubevirt:uid>\n    </kubevirt:kubevirt>\n  </metadata>\n  \
         <memory unit='KiB'>65536</memory>\n</domain>\n"
    );
    let classified = classify(&xml);
    assert_eq!(classified.hypervisor, hypervisor_of(domain_type), "{xml}");
    assert_eq!(
        classified.uid.as_deref(),
        (!uid.is_empty()).then_some(uid.as_str()),
        "{xml}"
    );
}

/// `VmiMetadata::from_vmi_json`: no panic, and what it reads survives a round trip.
pub fn vmi_json(data: &[u8]) {
    let Ok(vmi) = VmiMetadata::from_vmi_json(data) else {
        return;
    };
    let again = serde_json::json!({
        "metadata": {"namespace": vmi.namespace, "name": vmi.name, "uid": vmi.uid}
    })
    .to_string();
    assert_eq!(
        VmiMetadata::from_vmi_json(again.as_bytes()).expect("re-encoded VMI JSON"),
        vmi
    );
}

/// Stream slots the fuzzer can open and close, more than the registry's capacity.
const SLOTS: usize = 4;
const CAPACITY: Capacity = Capacity {
    streams: 3,
    domains_per_stream: 4,
};

/// Reports decoded with prost from the fuzzer's bytes, applied through the registry on up to
/// four streams the input opens and closes, against a model of what the registry must hold.
///
/// The input is a list of operations, one byte each: the low two bits pick a stream slot,
/// the next two the operation: open the slot's stream, close it, or send one message whose
/// length is the next byte and whose bytes follow (decoded as a `DomainReport`; a message
/// that does not decode is validated no further, as the gRPC layer would end the stream).
pub fn report_validator(data: &[u8]) {
    let registry = Registry::new("fuzz-node", CAPACITY);
    let mut model = Model::default();
    let mut streams: [Option<StreamHandle>; SLOTS] = Default::default();
    let mut input = data.iter().copied();
    while let Some(op) = input.next() {
        let slot = usize::from(op & 3);
        match (op >> 2) & 3 {
            0 => {
                if streams[slot].is_none() {
                    let open = streams.iter().flatten().count();
                    match registry.open_stream(format!("slot-{slot}")) {
                        Ok(stream) => {
                            assert!(open < CAPACITY.streams, "a stream over the capacity");
                            model.open(stream.id());
                            streams[slot] = Some(stream);
                        }
                        Err(_) => assert_eq!(open, CAPACITY.streams, "refused below capacity"),
                    }
                }
            }
            1 => {
                if let Some(stream) = streams[slot].take() {
                    model.close(stream.id());
                }
            }
            _ => {
                let len = usize::from(input.next().unwrap_or(0));
                let message: Vec<u8> = input.by_ref().take(len).collect();
                let Ok(report) = DomainReport::decode(message.as_slice()) else {
                    continue;
                };
                if let Some(stream) = &streams[slot] {
                    apply(stream, report, &mut model);
                }
            }
        }
        model.check(&registry);
    }
    // Rendering reads /proc for the process metrics, ten times the cost of the rest: one
    // input in eight (by length) checks it.
    if data.len().is_multiple_of(8) {
        check_exposition(&registry, &model);
    }
    drop(streams);
    assert_eq!(
        registry.snapshot().series().count(),
        0,
        "closed streams left series"
    );
    assert!(registry.claims().is_empty());
}

fn apply(stream: &StreamHandle, report: DomainReport, model: &mut Model) {
    let id = stream.id();
    match report.change {
        Some(Change::Upsert(domain)) => {
            let expected = validate::domain(&domain);
            let key = VmiKey {
                namespace: domain.namespace.clone(),
                name: domain.name.clone(),
            };
            let result = stream.upsert(domain.clone());
            match expected {
                Err(rejection) => assert_eq!(result, Err(rejection), "{domain:?}"),
                Ok(()) => {
                    check_label_values(&domain);
                    let full = model.keys_of(id).len() >= CAPACITY.domains_per_stream
                        && !model.keys_of(id).contains(&key);
                    if full {
                        assert_eq!(result, Err(Rejection::TooManyDomains));
                    } else {
                        assert_eq!(result, Ok(()), "{domain:?}");
                        model.upsert(id, key, domain);
                    }
                }
            }
        }
        Some(Change::Withdraw(key)) => {
            let key = VmiKey {
                namespace: key.namespace,
                name: key.name,
            };
            let owned = model.keys_of(id).contains(&key);
            let result = stream.withdraw(&key);
            if owned {
                assert_eq!(result, Ok(()));
                model.withdraw(id, &key);
            } else {
                assert_eq!(result, Err(Rejection::NotReported), "{key:?}");
            }
        }
        None => {}
    }
}

/// What validation lets through must be safe as a Prometheus label value, checked here
/// independently of `validate`'s own code.
fn check_label_values(domain: &Domain) {
    let dns_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    assert!((1..=63).contains(&domain.namespace.len()));
    assert!(domain.namespace.chars().all(dns_char), "{domain:?}");
    assert!((1..=253).contains(&domain.name.len()));
    assert!(
        domain.name.chars().all(|c| dns_char(c) || c == '.'),
        "{domain:?}"
    );
    assert!(domain.hypervisor_version.len() <= 64);
    assert!(
        !domain.hypervisor_version.contains(['\n', '\r']),
        "{domain:?}"
    );
}

/// The `/metrics` text: one line per exposed series, each a complete sample.
fn check_exposition(registry: &std::sync::Arc<Registry>, model: &Model) {
    let text = Exposition::new(std::sync::Arc::clone(registry))
        .expect("building the exposition")
        .render();
    let info: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("kubevirt_vmi_hypervisor_info"))
        .collect();
    assert_eq!(info.len(), model.exposed().len(), "{text}");
    for line in info {
        assert!(
            line.starts_with("kubevirt_vmi_hypervisor_info{namespace=\"")
                && line.ends_with("\"} 1"),
            "{line}"
        );
    }
}

/// What the registry must hold: every open stream's claims, and per VMI the streams that
/// claim it in the order they first did (the first one is the exposed series).
#[derive(Default)]
struct Model {
    streams: BTreeMap<u64, BTreeMap<VmiKey, Domain>>,
    claimants: BTreeMap<VmiKey, Vec<u64>>,
}

impl Model {
    fn open(&mut self, id: u64) {
        assert!(
            self.streams.insert(id, BTreeMap::new()).is_none(),
            "stream id {id} reused"
        );
    }

    fn close(&mut self, id: u64) {
        let keys = self.streams.remove(&id).unwrap_or_default();
        for key in keys.keys() {
            self.unclaim(id, key);
        }
    }

    fn keys_of(&self, id: u64) -> BTreeSet<VmiKey> {
        self.streams[&id].keys().cloned().collect()
    }

    fn upsert(&mut self, id: u64, key: VmiKey, domain: Domain) {
        let claims = self.claimants.entry(key.clone()).or_default();
        if !claims.contains(&id) {
            claims.push(id);
        }
        self.streams
            .get_mut(&id)
            .expect("open stream")
            .insert(key, domain);
    }

    fn withdraw(&mut self, id: u64, key: &VmiKey) {
        self.streams.get_mut(&id).expect("open stream").remove(key);
        self.unclaim(id, key);
    }

    fn unclaim(&mut self, id: u64, key: &VmiKey) {
        if let Some(claims) = self.claimants.get_mut(key) {
            claims.retain(|&claimant| claimant != id);
            if claims.is_empty() {
                self.claimants.remove(key);
            }
        }
    }

    /// Per VMI: the stream whose claim is exposed and what it reported.
    fn exposed(&self) -> BTreeMap<&VmiKey, (u64, &Domain)> {
        self.claimants
            .iter()
            .map(|(key, claims)| (key, (claims[0], &self.streams[&claims[0]][key])))
            .collect()
    }

    fn check(&self, registry: &Registry) {
        let exposed = self.exposed();
        {
            let snapshot = registry.snapshot();
            assert_eq!(snapshot.open_streams(), self.streams.len());
            let series: Vec<_> = snapshot.series().collect();
            assert_eq!(
                series.len(),
                exposed.len(),
                "one series per distinct VMI key"
            );
            for claim in series {
                let key = VmiKey {
                    namespace: claim.domain.namespace.clone(),
                    name: claim.domain.name.clone(),
                };
                let (stream, domain) = exposed
                    .get(&key)
                    .unwrap_or_else(|| panic!("series {key:?} that no open stream reported"));
                assert_eq!(
                    claim.stream_id, *stream,
                    "{key:?} exposed from the wrong stream"
                );
                assert_eq!(
                    &claim.domain, *domain,
                    "{key:?} is not what its stream said last"
                );
                assert!(!claim.held);
            }
            let claims: usize = self.claimants.values().map(Vec::len).sum();
            assert_eq!(snapshot.held_claims(), claims - exposed.len());
        }
        let claims = registry.claims();
        assert_eq!(
            claims.iter().filter(|c| !c.held).count(),
            exposed.len(),
            "exactly one claim per VMI is not held"
        );
        for claim in &claims {
            let key = VmiKey {
                namespace: claim.domain.namespace.clone(),
                name: claim.domain.name.clone(),
            };
            assert_eq!(
                self.streams[&claim.stream_id].get(&key),
                Some(&claim.domain),
                "claim {key:?} of stream {}",
                claim.stream_id
            );
        }
    }
}
