//! The exposition: `/metrics` in the text format, from the registry and the process.
//!
//! The VMI series are written straight from the registry at each scrape, as the
//! lines the registry rendered for each claim: the exposition holds no copy of
//! them, so it cannot disagree with the registry.

use std::sync::Arc;

use anyhow::Context;
use prometheus::{Encoder, IntGaugeVec, Opts, TextEncoder};

use crate::registry::{INFO_SERIES, Registry};
use crate::text_format::{self, Kind};
use crate::validate::{Limit, Rejection};

const PREFIX: &str = "kubevirt_hypervisor_aggregator";

pub struct Exposition {
    registry: Arc<Registry>,
    /// The process's own metrics (build, CPU, memory, file descriptors).
    process: prometheus::Registry,
}

impl Exposition {
    pub fn new(registry: Arc<Registry>) -> anyhow::Result<Self> {
        let process = prometheus::Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                own("build_info"),
                "A metric with a constant '1' value labelled by the version of node-aggregator.",
            ),
            &["version"],
        )
        .context("describing the build info metric")?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        process
            .register(Box::new(build_info))
            .context("registering the build info metric")?;
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .context("registering the process metrics")?;
        Ok(Exposition { registry, process })
    }

    /// The whole exposition in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_registry(&mut out);
        let mut process = Vec::new();
        // Encoding into a Vec only fails on metric families that cannot be built, which the
        // constructor already ruled out.
        if TextEncoder::new()
            .encode(&self.process.gather(), &mut process)
            .is_ok()
        {
            out.push_str(&String::from_utf8_lossy(&process));
        }
        out
    }

    fn render_registry(&self, out: &mut String) {
        let snapshot = self.registry.snapshot();

        text_format::family(
            out,
            INFO_SERIES,
            Kind::Gauge,
            "Which hypervisor runs a VirtualMachineInstance: kvm (QEMU with KVM acceleration), \
             qemu-tcg (QEMU software emulation), mshv (Microsoft Hypervisor) or unknown. \
             Always 1, one series per running VMI.",
        );
        // The hot loop of a scrape: the registry rendered each line when it changed.
        out.reserve(snapshot.series_count() * 160);
        for claim in snapshot.series() {
            out.push_str(&claim.series);
        }

        text_format::gauge(
            out,
            &own("streams_open"),
            "Report streams from launcher sidecars open now.",
            snapshot.open_streams(),
        );
        text_format::gauge(
            out,
            &own("claims_held"),
            "VMI reports held back because another stream reported the same VMI first.",
            snapshot.held_claims(),
        );
        // The counters are atomics beside the state: they need no lock.
        drop(snapshot);

        let counters = self.registry.counters();
        let reports = own("reports_total");
        text_format::family(
            out,
            &reports,
            Kind::Counter,
            "Reports applied, by action (upsert or withdraw).",
        );
        text_format::sample(out, &reports, &[("action", "upsert")], counters.upserts());
        text_format::sample(
            out,
            &reports,
            &[("action", "withdraw")],
            counters.withdrawals(),
        );

        let rejected = own("reports_rejected_total");
        text_format::family(
            out,
            &rejected,
            Kind::Counter,
            "Reports refused, by reason; the stream that sent one goes on.",
        );
        for reason in Rejection::ALL {
            text_format::sample(
                out,
                &rejected,
                &[("reason", reason.label())],
                counters.rejected(reason),
            );
        }

        let limit_hits = own("limit_hits_total");
        text_format::family(
            out,
            &limit_hits,
            Kind::Counter,
            "Times a client ran into one of the aggregator's limits (see its --max-* flags).",
        );
        for limit in Limit::ALL {
            text_format::sample(
                out,
                &limit_hits,
                &[("limit", limit.label())],
                counters.limit_hits(limit),
            );
        }
    }
}

/// The full name of one of the aggregator's own metrics.
fn own(suffix: &str) -> String {
    format!("{PREFIX}_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::domain;
    use crate::registry::{Capacity, VmiKey};
    use hypervisor_proto::v1::HypervisorType;

    #[test]
    fn renders_one_info_series_per_vmi_with_the_node_label() {
        let registry = Registry::new(
            "node-1",
            Capacity {
                streams: 1,
                domains_per_stream: 1,
            },
        );
        let stream = registry.open_stream("peer").unwrap();
        stream
            .upsert(domain("default", "vm-a", HypervisorType::QemuTcg))
            .unwrap();
        let text = Exposition::new(Arc::clone(&registry)).unwrap().render();
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(INFO_SERIES))
            .collect();
        assert_eq!(
            info,
            [
                r#"kubevirt_vmi_hypervisor_info{namespace="default",name="vm-a",node="node-1",hypervisor_type="qemu-tcg",hypervisor_version="7.2.22"} 1"#
            ]
        );
        assert!(text.contains("kubevirt_hypervisor_aggregator_streams_open 1\n"));
        assert!(
            text.contains("kubevirt_hypervisor_aggregator_reports_total{action=\"upsert\"} 1\n")
        );

        drop(stream);
        let text = Exposition::new(registry).unwrap().render();
        assert!(!text.lines().any(|l| l.starts_with(INFO_SERIES)));
        assert!(text.contains("kubevirt_hypervisor_aggregator_streams_open 0\n"));
    }

    #[test]
    fn renders_the_registrys_families_byte_for_byte() {
        let registry = Registry::new(
            "node-1",
            Capacity {
                streams: 2,
                domains_per_stream: 2,
            },
        );
        let a = registry.open_stream("a").unwrap();
        let b = registry.open_stream("b").unwrap();
        assert!(registry.open_stream("c").is_err());
        let mut quoted = domain("default", "vm-a", HypervisorType::Kvm);
        quoted.hypervisor_version = r#"7.2 "beta" \ build"#.into();
        a.upsert(quoted).unwrap();
        b.upsert(domain("default", "vm-a", HypervisorType::QemuTcg))
            .unwrap();
        b.upsert(domain("ns", "vm-b", HypervisorType::Mshv))
            .unwrap();
        assert!(b.upsert(domain("ns", "vm-c", HypervisorType::Kvm)).is_err());
        assert!(a.upsert(domain("Bad", "vm", HypervisorType::Kvm)).is_err());
        let gone = VmiKey {
            namespace: "ns".into(),
            name: "gone".into(),
        };
        a.upsert(domain("ns", "gone", HypervisorType::Unknown))
            .unwrap();
        a.withdraw(&gone).unwrap();
        assert!(a.withdraw(&gone).is_err());
        // As the report service counts what it refuses before the registry sees it.
        a.count_rejection(Rejection::RateLimited);
        a.count_rejection(Rejection::Malformed);
        a.count_rejection(Rejection::Empty);
        a.count_limit_hit(Limit::MessageBytes);

        let text = Exposition::new(registry).unwrap().render();
        let process = text
            .find("# HELP kubevirt_hypervisor_aggregator_build_info")
            .unwrap();
        assert_eq!(
            &text[..process],
            r#"# HELP kubevirt_vmi_hypervisor_info Which hypervisor runs a VirtualMachineInstance: kvm (QEMU with KVM acceleration), qemu-tcg (QEMU software emulation), mshv (Microsoft Hypervisor) or unknown. Always 1, one series per running VMI.
# TYPE kubevirt_vmi_hypervisor_info gauge
kubevirt_vmi_hypervisor_info{namespace="default",name="vm-a",node="node-1",hypervisor_type="kvm",hypervisor_version="7.2 \"beta\" \\ build"} 1
kubevirt_vmi_hypervisor_info{namespace="ns",name="vm-b",node="node-1",hypervisor_type="mshv",hypervisor_version="7.2.22"} 1
# HELP kubevirt_hypervisor_aggregator_streams_open Report streams from launcher sidecars open now.
# TYPE kubevirt_hypervisor_aggregator_streams_open gauge
kubevirt_hypervisor_aggregator_streams_open 2
# HELP kubevirt_hypervisor_aggregator_claims_held VMI reports held back because another stream reported the same VMI first.
# TYPE kubevirt_hypervisor_aggregator_claims_held gauge
kubevirt_hypervisor_aggregator_claims_held 1
# HELP kubevirt_hypervisor_aggregator_reports_total Reports applied, by action (upsert or withdraw).
# TYPE kubevirt_hypervisor_aggregator_reports_total counter
kubevirt_hypervisor_aggregator_reports_total{action="upsert"} 4
kubevirt_hypervisor_aggregator_reports_total{action="withdraw"} 1
# HELP kubevirt_hypervisor_aggregator_reports_rejected_total Reports refused, by reason; the stream that sent one goes on.
# TYPE kubevirt_hypervisor_aggregator_reports_rejected_total counter
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="empty"} 1
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="invalid_namespace"} 1
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="invalid_name"} 0
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="invalid_uid"} 0
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="invalid_domain_name"} 0
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="invalid_version"} 0
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="not_reported"} 1
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="too_many_domains"} 1
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="rate_limited"} 1
kubevirt_hypervisor_aggregator_reports_rejected_total{reason="malformed"} 1
# HELP kubevirt_hypervisor_aggregator_limit_hits_total Times a client ran into one of the aggregator's limits (see its --max-* flags).
# TYPE kubevirt_hypervisor_aggregator_limit_hits_total counter
kubevirt_hypervisor_aggregator_limit_hits_total{limit="streams"} 1
kubevirt_hypervisor_aggregator_limit_hits_total{limit="domains_per_stream"} 1
kubevirt_hypervisor_aggregator_limit_hits_total{limit="message_bytes"} 1
kubevirt_hypervisor_aggregator_limit_hits_total{limit="reports_per_second"} 1
"#
        );
    }
}
