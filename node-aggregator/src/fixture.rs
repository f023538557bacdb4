//! What the unit tests report: one running domain, as a sidecar sends it.

use hypervisor_proto::v1::{Domain, DomainState, HypervisorType};

pub fn domain(namespace: &str, name: &str, hypervisor: HypervisorType) -> Domain {
    Domain {
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
        domain_name: format!("{namespace}_{name}"),
        hypervisor_type: hypervisor.into(),
        hypervisor_version: "7.2.22".into(),
        state: DomainState::Running.into(),
    }
}
