//! The KubeVirt hook server on `<hooks-dir>/<CONTAINER_NAME>.sock`.
//!
//! virt-launcher will not start the VM until every requested sidecar's socket
//! answers `Info`, and it fails the VM when `OnDefineDomain` fails or returns
//! anything but a domain XML. So this server binds first, answers at once, and
//! hands the domain XML back exactly as it came, whatever else goes wrong. What
//! it learns from the VMI is who the VMI is (its uid is nowhere else), and from the
//! XML a fallback for when the sidecar cannot reach libvirt.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hypervisor_proto::hooks::info::{
    HookPoint, InfoParams, InfoResult,
    info_server::{Info, InfoServer},
};
use hypervisor_proto::hooks::{v1alpha1, v1alpha2, v1alpha3};
use hypervisor_proto::prost_bytes::Bytes;
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::classify::classify_domain_xml;
use crate::domain::{ConnectNow, Domains, RunningDomain, VmiName};

const HOOK_NAME: &str = "kubevirt-hypervisor-metric";
const VERSIONS: [&str; 3] = ["v1alpha1", "v1alpha2", "v1alpha3"];
const ON_DEFINE_DOMAIN: &str = "OnDefineDomain";
const SHUTDOWN: &str = "Shutdown";

/// Binds the hook socket, replacing a stale one from an earlier run.
pub fn bind(hooks_dir: &Path, container_name: &str) -> anyhow::Result<(UnixListener, PathBuf)> {
    anyhow::ensure!(
        !container_name.is_empty() && !container_name.contains('/'),
        "CONTAINER_NAME {container_name:?} cannot name a socket file"
    );
    let path = hooks_dir.join(format!("{container_name}.sock"));
    match std::fs::remove_file(&path) {
        Ok(()) => info!(socket = %path.display(), "replaced a stale hook socket"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err)
                .with_context(|| format!("removing the stale hook socket {}", path.display()));
        }
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the hook socket {}", path.display()))?;
    Ok((listener, path))
}

/// What virt-launcher's OnDefineDomain calls said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Defined {
    /// The domain, as the XML describes it, with the uid of the VMI it belongs to.
    pub domains: Domains,
    /// Whether libvirt holds the domain by now, as far as the hooks can tell (see
    /// [`DEFINITION_GRACE`]).
    pub in_libvirt: bool,
}

/// virt-launcher calls OnDefineDomain just before it hands the domain to libvirt, and a new
/// daemon's first definition waits seconds while it probes QEMU. The hooks cannot see that
/// definition end, but a second call shows it ended: a virt-launcher that can hot-plug PCIe
/// devices (KubeVirt's default on amd64 and arm64, `allocateHotplugPorts`) defines the
/// domain, then defines it again with its hot-plug ports, calling the hooks each time. One
/// that calls once is taken at its word after this long.
pub const DEFINITION_GRACE: Duration = Duration::from_secs(15);

/// What the hooks tell the rest of the sidecar.
pub struct Hooks {
    /// What virt-launcher defines: the VMI's uid for every report, and the domain to
    /// report when libvirt is out of reach.
    pub defined: watch::Sender<Defined>,
    /// virt-launcher defines its domain through libvirt, so at OnDefineDomain the daemon
    /// is up: the libvirt watcher tries at once, and if that fails, libvirt is out of reach.
    pub libvirt_is_up: ConnectNow,
    /// Set by the Shutdown hook: the VM is gone and so is this sidecar's purpose.
    pub shutdown: watch::Sender<bool>,
}

/// Serves the hook API on `listener` until `stop` completes.
pub async fn serve(
    listener: UnixListener,
    hooks: Hooks,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let hooks = std::sync::Arc::new(hooks);
    tonic::transport::Server::builder()
        .add_service(InfoServer::new(InfoService))
        .add_service(v1alpha1::callbacks_server::CallbacksServer::from_arc(
            hooks.clone(),
        ))
        .add_service(v1alpha2::callbacks_server::CallbacksServer::from_arc(
            hooks.clone(),
        ))
        .add_service(v1alpha3::callbacks_server::CallbacksServer::from_arc(hooks))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await
        .context("serving the hook socket")
}

struct InfoService;

#[tonic::async_trait]
impl Info for InfoService {
    async fn info(&self, _: Request<InfoParams>) -> Result<Response<InfoResult>, Status> {
        Ok(Response::new(InfoResult {
            name: HOOK_NAME.to_string(),
            hook_points: [ON_DEFINE_DOMAIN, SHUTDOWN]
                .map(|name| HookPoint {
                    name: name.to_string(),
                    priority: 0,
                })
                .to_vec(),
            versions: VERSIONS.map(String::from).to_vec(),
        }))
    }
}

/// The parts of a VirtualMachineInstance the sidecar reads.
#[derive(Deserialize)]
struct Vmi {
    metadata: VmiMetadata,
}

/// Who a VMI is, from virt-launcher's VMI JSON.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct VmiMetadata {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl VmiMetadata {
    pub fn from_vmi_json(vmi_json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<Vmi>(vmi_json).map(|vmi| vmi.metadata)
    }
}

impl Hooks {
    /// Records the domain being defined and hands its XML back, untouched.
    fn answer_define_domain(&self, domain_xml: Bytes, vmi_json: &[u8]) -> Bytes {
        // A bug here must cost the metric, never the VM.
        let noted = panic::catch_unwind(AssertUnwindSafe(|| {
            self.note_defined(&domain_xml, vmi_json)
        }));
        if noted.is_err() {
            error!("OnDefineDomain: reading the domain panicked; answering virt-launcher anyway");
        }
        domain_xml
    }

    /// Never fails: virt-launcher gets its answer whatever this finds.
    fn note_defined(&self, domain_xml: &[u8], vmi_json: &[u8]) {
        let vmi = match VmiMetadata::from_vmi_json(vmi_json) {
            Ok(vmi) => vmi,
            Err(err) => {
                warn!(%err, "OnDefineDomain: unreadable VMI JSON; the domain is reported from libvirt only");
                return;
            }
        };
        let xml = String::from_utf8_lossy(domain_xml);
        let classified = classify_domain_xml(&xml);
        let domain = RunningDomain {
            vmi: VmiName {
                namespace: vmi.namespace,
                name: vmi.name,
            },
            uid: Some(vmi.uid)
                .filter(|uid| !uid.is_empty())
                .or(classified.uid),
            hypervisor: classified.hypervisor,
            hypervisor_version: String::new(),
            paused: false,
        };
        let domain_name = domain.vmi.domain_name();
        info!(
            domain = %domain_name,
            hypervisor = classified.hypervisor.label(),
            "OnDefineDomain"
        );
        let again = self.defined.borrow().domains.contains_key(&domain_name);
        self.defined.send_replace(Defined {
            domains: Domains::from([(domain_name, domain)]),
            in_libvirt: again,
        });
        if !again {
            let defined = self.defined.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DEFINITION_GRACE).await;
                defined
                    .send_if_modified(|defined| !std::mem::replace(&mut defined.in_libvirt, true));
            });
        }
        self.libvirt_is_up.request();
    }

    fn on_shutdown(&self) {
        info!("Shutdown hook: withdrawing and exiting");
        self.shutdown.send_replace(true);
    }
}

#[tonic::async_trait]
impl v1alpha1::callbacks_server::Callbacks for Hooks {
    async fn on_define_domain(
        &self,
        request: Request<v1alpha1::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha1::OnDefineDomainResult>, Status> {
        let params = request.into_inner();
        let domain_xml = self.answer_define_domain(params.domain_xml, &params.vmi);
        Ok(Response::new(v1alpha1::OnDefineDomainResult { domain_xml }))
    }
}

#[tonic::async_trait]
impl v1alpha2::callbacks_server::Callbacks for Hooks {
    async fn on_define_domain(
        &self,
        request: Request<v1alpha2::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha2::OnDefineDomainResult>, Status> {
        let params = request.into_inner();
        let domain_xml = self.answer_define_domain(params.domain_xml, &params.vmi);
        Ok(Response::new(v1alpha2::OnDefineDomainResult { domain_xml }))
    }

    async fn pre_cloud_init_iso(
        &self,
        request: Request<v1alpha2::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha2::PreCloudInitIsoResult>, Status> {
        let params = request.into_inner();
        Ok(Response::new(v1alpha2::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: params.cloud_init_no_cloud_source,
            cloud_init_data: params.cloud_init_data,
        }))
    }
}

#[tonic::async_trait]
impl v1alpha3::callbacks_server::Callbacks for Hooks {
    async fn on_define_domain(
        &self,
        request: Request<v1alpha3::OnDefineDomainParams>,
    ) -> Result<Response<v1alpha3::OnDefineDomainResult>, Status> {
        let params = request.into_inner();
        let domain_xml = self.answer_define_domain(params.domain_xml, &params.vmi);
        Ok(Response::new(v1alpha3::OnDefineDomainResult { domain_xml }))
    }

    async fn pre_cloud_init_iso(
        &self,
        request: Request<v1alpha3::PreCloudInitIsoParams>,
    ) -> Result<Response<v1alpha3::PreCloudInitIsoResult>, Status> {
        let params = request.into_inner();
        Ok(Response::new(v1alpha3::PreCloudInitIsoResult {
            cloud_init_no_cloud_source: params.cloud_init_no_cloud_source,
            cloud_init_data: params.cloud_init_data,
        }))
    }

    async fn shutdown(
        &self,
        _: Request<v1alpha3::ShutdownParams>,
    ) -> Result<Response<v1alpha3::ShutdownResult>, Status> {
        self.on_shutdown();
        Ok(Response::new(v1alpha3::ShutdownResult {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_who_the_vmi_is() {
        let json = br#"{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance",
            "metadata":{"namespace":"default","name":"vm-a","uid":"6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10",
            "labels":{"a":"b"}},"spec":{"domain":{}}}"#;
        assert_eq!(
            VmiMetadata::from_vmi_json(json).unwrap(),
            VmiMetadata {
                namespace: "default".into(),
                name: "vm-a".into(),
                uid: "6f1e9cde-8c1a-4a0e-9d43-2d2a1d5b7c10".into(),
            }
        );
        for bad in [
            &b""[..],
            b"{",
            b"{}",
            br#"{"metadata":{"name":"vm"}}"#,
            b"\xff",
        ] {
            assert!(VmiMetadata::from_vmi_json(bad).is_err(), "{bad:?}");
        }
    }
}
