//! What a report must look like before it may become a series, and the limits
//! that refuse too much of it.
//!
//! Label values end up in every scrape and every query, so they are held to
//! Kubernetes' own rules for the objects they name.

use hypervisor_proto::v1::Domain;

/// Why a report was refused; each one is counted under its `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the report carries neither an upsert nor a withdrawal")]
    Empty,
    #[error("namespace must be a DNS-1123 label (lower-case alphanumerics and '-', at most 63)")]
    InvalidNamespace,
    #[error(
        "name must be a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.', at most 253)"
    )]
    InvalidName,
    #[error("uid must be a UUID when present")]
    InvalidUid,
    #[error("domain_name must be printable ASCII of at most 253 characters")]
    InvalidDomainName,
    #[error("hypervisor_version must be printable ASCII of at most 64 characters")]
    InvalidVersion,
    #[error("the VMI was not reported on this stream")]
    NotReported,
    #[error("this stream reports as many VMIs as --max-domains-per-stream allows")]
    TooManyDomains,
    #[error("this stream sends more reports per second than --max-reports-per-second allows")]
    RateLimited,
    #[error("the message is not a DomainReport; the stream ends")]
    Malformed,
}

/// The limits that keep one misbehaving client from costing everyone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Streams,
    DomainsPerStream,
    MessageBytes,
    ReportsPerSecond,
}

impl Limit {
    pub const ALL: [Limit; 4] = [
        Limit::Streams,
        Limit::DomainsPerStream,
        Limit::MessageBytes,
        Limit::ReportsPerSecond,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The value of the `limit` label.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Streams => "streams",
            Limit::DomainsPerStream => "domains_per_stream",
            Limit::MessageBytes => "message_bytes",
            Limit::ReportsPerSecond => "reports_per_second",
        }
    }
}

impl Rejection {
    /// Every reason, so each counter exists from the start (`rate()` needs a zero).
    pub const ALL: [Rejection; 10] = [
        Rejection::Empty,
        Rejection::InvalidNamespace,
        Rejection::InvalidName,
        Rejection::InvalidUid,
        Rejection::InvalidDomainName,
        Rejection::InvalidVersion,
        Rejection::NotReported,
        Rejection::TooManyDomains,
        Rejection::RateLimited,
        Rejection::Malformed,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The limit that refused the report, if one did: such a refusal is also a hit of
    /// that limit.
    pub fn limit(self) -> Option<Limit> {
        match self {
            Rejection::TooManyDomains => Some(Limit::DomainsPerStream),
            Rejection::RateLimited => Some(Limit::ReportsPerSecond),
            Rejection::Empty
            | Rejection::InvalidNamespace
            | Rejection::InvalidName
            | Rejection::InvalidUid
            | Rejection::InvalidDomainName
            | Rejection::InvalidVersion
            | Rejection::NotReported
            | Rejection::Malformed => None,
        }
    }

    /// The value of the `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Empty => "empty",
            Rejection::InvalidNamespace => "invalid_namespace",
            Rejection::InvalidName => "invalid_name",
            Rejection::InvalidUid => "invalid_uid",
            Rejection::InvalidDomainName => "invalid_domain_name",
            Rejection::InvalidVersion => "invalid_version",
            Rejection::NotReported => "not_reported",
            Rejection::TooManyDomains => "too_many_domains",
            Rejection::RateLimited => "rate_limited",
            Rejection::Malformed => "malformed",
        }
    }
}

pub fn domain(domain: &Domain) -> Result<(), Rejection> {
    vmi_key(&domain.namespace, &domain.name)?;
    if !domain.uid.is_empty() && !is_uuid(&domain.uid) {
        return Err(Rejection::InvalidUid);
    }
    if !is_printable(&domain.domain_name, 253) {
        return Err(Rejection::InvalidDomainName);
    }
    if !is_printable(&domain.hypervisor_version, 64) {
        return Err(Rejection::InvalidVersion);
    }
    Ok(())
}

pub fn vmi_key(namespace: &str, name: &str) -> Result<(), Rejection> {
    if !is_dns1123_label(namespace) {
        return Err(Rejection::InvalidNamespace);
    }
    if !is_dns1123_subdomain(name) {
        return Err(Rejection::InvalidName);
    }
    Ok(())
}

fn is_dns1123_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-')
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
}

fn is_dns1123_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns1123_label)
}

fn is_uuid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_printable(value: &str, max_len: usize) -> bool {
    value.len() <= max_len && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names() {
        for good in ["default", "kube-system", "a", "0abc", &"a".repeat(63)] {
            assert!(is_dns1123_label(good), "{good}");
        }
        for bad in ["", "Default", "-a", "a-", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        for good in ["vm-a", "vm.a.b", "0"] {
            assert!(is_dns1123_subdomain(good), "{good}");
        }
        for bad in ["", "vm..a", ".vm", "vm.", "VM", "vm_a", &"a.".repeat(127)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn uids_and_versions() {
        assert!(is_uuid("6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10"));
        assert!(!is_uuid("6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c1"));
        assert!(!is_uuid("not-a-uuid"));
        assert!(is_printable("7.2.22", 64));
        assert!(is_printable("", 64));
        assert!(!is_printable("7.2\n", 64));
        assert!(!is_printable(&"9".repeat(65), 64));
    }

    #[test]
    fn every_reason_and_limit_has_its_own_index() {
        for (i, reason) in Rejection::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{}", reason.label());
        }
        for (i, limit) in Limit::ALL.iter().enumerate() {
            assert_eq!(limit.index(), i, "{}", limit.label());
        }
    }
}
