//! Which hypervisor backs a domain, and the uid of the VMI the domain belongs to.
//!
//! The hypervisor is the live XML's root `type` attribute (DESIGN.md,
//! classification). Only the head of the document is read: the root element and
//! the header elements libvirt writes before `<memory>`, where KubeVirt's
//! metadata lives, so a domain with a thousand devices costs no more than one
//! with none.

use hypervisor_proto::v1::HypervisorType;
use quick_xml::NsReader;
use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};

// The fuzz checks (tests/fuzz/src/checks.rs, replayed by tests/fuzz_regressions.rs) take
// it from here, beside the XML they classify.
pub use crate::domain::VmiName;

const KUBEVIRT_NAMESPACE: Namespace<'static> = Namespace(b"http://kubevirt.io");

/// What the domain XML says about the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainXml {
    pub hypervisor: HypervisorType,
    /// The VMI's uid from `<metadata><kubevirt:kubevirt><uid>`, when present.
    pub uid: Option<String>,
}

pub fn classify_domain_xml(xml: &str) -> DomainXml {
    let mut reader = NsReader::from_str(xml);
    let hypervisor = match root_type(&mut reader) {
        Ok(Some(domain_type)) => hypervisor_of(&domain_type),
        Ok(None) | Err(_) => HypervisorType::Unknown,
    };
    // A uid is a bonus: a domain whose metadata cannot be read is still reported.
    let uid = kubevirt_uid(&mut reader).ok().flatten();
    DomainXml { hypervisor, uid }
}

/// The libvirt domain type → hypervisor table of DESIGN.md.
pub fn hypervisor_of(domain_type: &str) -> HypervisorType {
    match domain_type {
        "kvm" => HypervisorType::Kvm,
        "qemu" => HypervisorType::QemuTcg,
        "hyperv" => HypervisorType::Mshv,
        _ => HypervisorType::Unknown,
    }
}

/// The `type` attribute of the root `<domain>` element.
fn root_type(reader: &mut NsReader<&[u8]>) -> anyhow::Result<Option<String>> {
    loop {
        match reader.read_event()? {
            Event::Start(root) | Event::Empty(root) => {
                if root.local_name().as_ref() != b"domain" {
                    return Ok(None);
                }
                // Every attribute is read, so that a duplicated one makes the element unreadable.
                let mut domain_type = None;
                for attribute in root.attributes() {
                    let attribute = attribute?;
                    if attribute.key.as_ref() == b"type" {
                        domain_type = Some(attribute.unescape_value()?.into_owned());
                    }
                }
                return Ok(domain_type);
            }
            Event::Eof => return Ok(None),
            // Declaration, comments, processing instructions, whitespace.
            _ => {}
        }
    }
}

/// Reads on from just inside the root element to the KubeVirt uid, stopping at
/// the first element that libvirt writes after `<metadata>`.
fn kubevirt_uid(reader: &mut NsReader<&[u8]>) -> anyhow::Result<Option<String>> {
    // Depth below the root element, and whether we are inside <kubevirt:kubevirt>.
    let mut depth = 0usize;
    let mut in_kubevirt = false;
    let mut in_uid = false;
    loop {
        let (namespace, event) = reader.read_resolved_event()?;
        match event {
            Event::Start(element) => {
                depth += 1;
                let local = element.local_name();
                if depth == 1 && !is_header_element(local.as_ref()) {
                    return Ok(None);
                }
                if depth == 2
                    && local.as_ref() == b"kubevirt"
                    && namespace == ResolveResult::Bound(KUBEVIRT_NAMESPACE)
                {
                    in_kubevirt = true;
                }
                in_uid = in_kubevirt && depth == 3 && local.as_ref() == b"uid";
            }
            Event::Empty(element)
                if depth == 0 && !is_header_element(element.local_name().as_ref()) =>
            {
                return Ok(None);
            }
            Event::Text(text) if in_uid => {
                let uid = text.decode()?.trim().to_string();
                return Ok((!uid.is_empty()).then_some(uid));
            }
            Event::End(_) => {
                if depth == 0 {
                    return Ok(None);
                }
                if depth == 2 {
                    in_kubevirt = false;
                }
                in_uid = false;
                depth -= 1;
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

/// The elements libvirt formats before `<memory>`: everything up to `<metadata>`.
fn is_header_element(local_name: &[u8]) -> bool {
    matches!(
        local_name,
        b"name" | b"uuid" | b"genid" | b"title" | b"description" | b"metadata"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBEVIRT_DOMAIN: &str = r#"<domain type='kvm' id='1'>
  <name>default_vm-a</name>
  <uuid>5d2a5ec8-2bd4-4b3b-9c4e-8f1c6f0d3d7e</uuid>
  <metadata>
    <kubevirt:kubevirt xmlns:kubevirt="http://kubevirt.io">
      <kubevirt:uid>6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10</kubevirt:uid>
      <kubevirt:graceperiod><kubevirt:deletionGracePeriodSeconds>30</kubevirt:deletionGracePeriodSeconds></kubevirt:graceperiod>
    </kubevirt:kubevirt>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <devices><console type='pty'/></devices>
</domain>"#;

    fn with_type(domain_type: &str) -> String {
        format!("<domain type='{domain_type}'><name>ns_vm</name></domain>")
    }

    #[test]
    fn the_classification_table() {
        for (domain_type, expected) in [
            ("kvm", HypervisorType::Kvm),
            ("qemu", HypervisorType::QemuTcg),
            ("hyperv", HypervisorType::Mshv),
            ("xen", HypervisorType::Unknown),
            ("KVM", HypervisorType::Unknown),
            ("", HypervisorType::Unknown),
        ] {
            assert_eq!(
                classify_domain_xml(&with_type(domain_type)).hypervisor,
                expected,
                "type='{domain_type}'"
            );
        }
    }

    #[test]
    fn missing_or_unreadable_type_is_unknown() {
        for xml in [
            "<domain><name>ns_vm</name></domain>",
            "<domain type='kvm'",
            "<domain type='kvm' type='qemu'></domain>",
            "<domain type=kvm></domain>",
            "<network type='kvm'></network>",
            "not xml at all",
            "",
        ] {
            assert_eq!(
                classify_domain_xml(xml).hypervisor,
                HypervisorType::Unknown,
                "{xml:?}"
            );
        }
    }

    #[test]
    fn escaped_type_values_are_compared_unescaped() {
        assert_eq!(
            classify_domain_xml("<domain type='&#107;vm'/>").hypervisor,
            HypervisorType::Kvm
        );
    }

    #[test]
    fn reads_the_kubevirt_uid() {
        let domain = classify_domain_xml(KUBEVIRT_DOMAIN);
        assert_eq!(domain.hypervisor, HypervisorType::Kvm);
        assert_eq!(
            domain.uid.as_deref(),
            Some("6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10")
        );
    }

    #[test]
    fn a_uid_outside_the_kubevirt_namespace_is_ignored() {
        let xml = KUBEVIRT_DOMAIN.replace("http://kubevirt.io", "http://example.com");
        assert_eq!(classify_domain_xml(&xml).uid, None);
    }

    #[test]
    fn truncation_after_the_root_tag_keeps_the_type() {
        let truncated = &KUBEVIRT_DOMAIN[..KUBEVIRT_DOMAIN.find("<uuid>").unwrap() + 3];
        let domain = classify_domain_xml(truncated);
        assert_eq!(domain.hypervisor, HypervisorType::Kvm);
        assert_eq!(domain.uid, None);
        let inside_root = &KUBEVIRT_DOMAIN[..10];
        assert_eq!(
            classify_domain_xml(inside_root).hypervisor,
            HypervisorType::Unknown
        );
    }

    #[test]
    fn a_huge_domain_is_read_only_up_to_its_header() {
        let devices = "<disk type='file' device='disk'><source file='/x'/></disk>".repeat(20_000);
        let xml = KUBEVIRT_DOMAIN.replace("<devices>", &format!("<devices>{devices}"));
        assert!(xml.len() > 1 << 20);
        let domain = classify_domain_xml(&xml);
        assert_eq!(domain.hypervisor, HypervisorType::Kvm);
        assert!(domain.uid.is_some());
        // Garbage after the header cannot change the answer: it is never read.
        let garbage = format!("{}<<<&&&", &xml[..xml.find("<memory").unwrap()]);
        assert_eq!(classify_domain_xml(&garbage), domain);
    }
}
