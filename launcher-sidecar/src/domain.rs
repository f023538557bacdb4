//! The sidecar's model: the domains to report and who their VMIs are, shared by its two
//! sources of truth, `libvirt` and `hook`, so that neither depends on the other.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, SyncSender};

use hypervisor_proto::v1::HypervisorType;

/// The VMI a domain belongs to, from KubeVirt's `<namespace>_<name>` domain name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VmiName {
    pub namespace: String,
    pub name: String,
}

impl VmiName {
    /// Namespaces cannot contain `_`, so the first one separates the two.
    pub fn from_domain_name(domain_name: &str) -> Option<VmiName> {
        let (namespace, name) = domain_name.split_once('_')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| VmiName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The name of the VMI's domain, as virt-launcher names it in libvirt.
    pub fn domain_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

/// A domain that runs and is to be reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningDomain {
    pub vmi: VmiName,
    pub uid: Option<String>,
    pub hypervisor: HypervisorType,
    pub hypervisor_version: String,
    pub paused: bool,
}

/// The domains to report, by libvirt domain name.
pub type Domains = BTreeMap<String, RunningDomain>;

/// Asks the libvirt watcher to try connecting at once rather than at its next backoff
/// step: the hooks know when virt-launcher's daemon is up.
#[derive(Clone)]
pub struct ConnectNow(SyncSender<()>);

impl ConnectNow {
    /// The handle, and the requests for the watcher's `connect_requests`.
    pub fn channel() -> (Self, Receiver<()>) {
        let (sender, requests) = mpsc::sync_channel(1);
        (ConnectNow(sender), requests)
    }

    /// Never blocks: one pending request is as good as many.
    pub fn request(&self) {
        let _ = self.0.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names() {
        assert_eq!(
            VmiName::from_domain_name("default_vm-a"),
            Some(VmiName {
                namespace: "default".into(),
                name: "vm-a".into()
            })
        );
        // Names may contain '_' in KubeVirt's own tests; the namespace never does.
        assert_eq!(
            VmiName::from_domain_name("ns_vm_with_underscores").map(|v| v.name),
            Some("vm_with_underscores".into())
        );
        for bad in ["no-separator", "_vm", "ns_", ""] {
            assert_eq!(VmiName::from_domain_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_domain_name_reads_back_as_its_vmi() {
        for name in ["default_vm-a", "ns_vm_with_underscores"] {
            let vmi = VmiName::from_domain_name(name).unwrap();
            assert_eq!(vmi.domain_name(), name);
        }
    }
}
