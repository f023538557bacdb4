//! `/metrics`, `/healthz` and `/readyz`.
//!
//! The VMI series are written straight from the registry at each scrape, as the
//! lines the registry rendered for each claim: the exposition holds no copy of
//! them, so it cannot disagree with the registry.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{Encoder, IntGaugeVec, Opts, TextEncoder};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::memory::Trimmer;
use crate::registry::{INFO_SERIES, Limit, Registry};
use crate::validate::Rejection;

const PREFIX: &str = "kubevirt_hypervisor_aggregator";
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
                format!("{PREFIX}_build_info"),
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
        let mut own = Vec::new();
        // Encoding into a Vec only fails on metric families that cannot be built, which the
        // constructor already ruled out.
        if TextEncoder::new()
            .encode(&self.process.gather(), &mut own)
            .is_ok()
        {
            out.push_str(&String::from_utf8_lossy(&own));
        }
        out
    }

    fn render_registry(&self, out: &mut String) {
        let snapshot = self.registry.snapshot();

        family(
            out,
            INFO_SERIES,
            "gauge",
            "Which hypervisor runs a VirtualMachineInstance: kvm (QEMU with KVM acceleration), \
             qemu-tcg (QEMU software emulation), mshv (Microsoft Hypervisor) or unknown. \
             Always 1, one series per running VMI.",
        );
        // The hot loop of a scrape: the registry rendered each line when it changed.
        out.reserve(snapshot.series_count() * 160);
        for claim in snapshot.series() {
            out.push_str(&claim.series);
        }

        gauge(
            out,
            "streams_open",
            "Report streams from launcher sidecars open now.",
            snapshot.open_streams(),
        );
        gauge(
            out,
            "claims_held",
            "VMI reports held back because another stream reported the same VMI first.",
            snapshot.held_claims(),
        );

        let counts = snapshot.counts();
        let reports = format!("{PREFIX}_reports_total");
        family(
            out,
            &reports,
            "counter",
            "Reports applied, by action (upsert or withdraw).",
        );
        let _ = writeln!(out, "{reports}{{action=\"upsert\"}} {}", counts.upserts);
        let _ = writeln!(
            out,
            "{reports}{{action=\"withdraw\"}} {}",
            counts.withdrawals
        );

        let rejected = format!("{PREFIX}_reports_rejected_total");
        family(
            out,
            &rejected,
            "counter",
            "Reports refused, by reason; the stream that sent one goes on.",
        );
        for reason in Rejection::ALL {
            let _ = writeln!(
                out,
                "{rejected}{{reason=\"{}\"}} {}",
                reason.label(),
                counts.rejected[reason.index()]
            );
        }

        let limit_hits = format!("{PREFIX}_limit_hits_total");
        family(
            out,
            &limit_hits,
            "counter",
            "Times a client ran into one of the aggregator's limits (see its --max-* flags).",
        );
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "{limit_hits}{{limit=\"{}\"}} {}",
                limit.label(),
                counts.limit_hits[limit.index()]
            );
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, suffix: &str, help: &str, value: usize) {
    let name = format!("{PREFIX}_{suffix}");
    family(out, &name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A client gets this long for its TLS handshake and for its request headers,
/// so that slow or silent clients cannot pile up connections.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head read (hyper's default is ~400 KiB, so each client could make the
/// aggregator hold that much until its deadline); a larger one is answered 431. A scrape's
/// head is a few hundred bytes, a few KiB with a bearer token.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Serves `router` on `listener` over HTTP/1.1, in TLS when `tls` is given; `trimmer`
/// hands a connection's memory back after it closes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    trimmer: Trimmer,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, usually: wait for some to close.
                warn!(%err, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        let trim = trimmer.on_drop();
        tokio::spawn(async move {
            let _trim = trim;
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(CLIENT_DEADLINE)
                .max_buf_size(MAX_REQUEST_HEAD);
            let served = match tls {
                None => http.serve_connection(TokioIo::new(tcp), service).await,
                Some(tls) => match tokio::time::timeout(CLIENT_DEADLINE, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
                    Ok(Err(err)) => return debug!(%peer, %err, "metrics TLS handshake failed"),
                    Err(_) => return debug!(%peer, "metrics TLS handshake timed out"),
                },
            };
            if let Err(err) = served {
                debug!(%peer, %err, "metrics connection ended with an error");
            }
        });
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (the
/// report server accepts streams).
pub fn router(exposition: Arc<Exposition>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(exposition): State<Arc<Exposition>>| async move {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], exposition.render())
            }),
        )
        .with_state(exposition)
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ok\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not serving reports yet\n").into_response()
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Capacity;
    use hypervisor_proto::v1::{Domain, DomainState, HypervisorType};

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
            .upsert(Domain {
                namespace: "default".into(),
                name: "vm-a".into(),
                uid: String::new(),
                domain_name: "default_vm-a".into(),
                hypervisor_type: HypervisorType::QemuTcg.into(),
                hypervisor_version: "7.2.22".into(),
                state: DomainState::Running.into(),
            })
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
}
