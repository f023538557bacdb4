//! The protocols of this project, generated from `proto/`:
//! - `v1`: `kubevirt.hypervisor.v1`, between launcher-sidecar and node-aggregator, plus
//!   the values of the `hypervisor_type` label, so both ends agree on them; its calls
//!   use [`codec::SmallBufferCodec`];
//! - `hooks`: KubeVirt's hook sidecar API, which virt-launcher calls.

#![allow(clippy::derive_partial_eq_without_eq)]

/// The buffer type of the hooks' `bytes` fields.
pub use prost::bytes as prost_bytes;

pub mod codec;

pub mod v1 {
    tonic::include_proto!("kubevirt.hypervisor.v1");

    /// The encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("hypervisor_descriptor");

    impl HypervisorType {
        /// The value of the `hypervisor_type` label (DESIGN.md, classification).
        pub fn label(self) -> &'static str {
            match self {
                HypervisorType::Kvm => "kvm",
                HypervisorType::QemuTcg => "qemu-tcg",
                HypervisorType::Mshv => "mshv",
                HypervisorType::Unknown => "unknown",
            }
        }
    }
}

/// KubeVirt's hook sidecar API (`kubevirt.hooks.*`), wire-compatible with KubeVirt's own.
pub mod hooks {
    pub mod info {
        tonic::include_proto!("kubevirt.hooks.info");
    }
    pub mod v1alpha1 {
        tonic::include_proto!("kubevirt.hooks.v1alpha1");
    }
    pub mod v1alpha2 {
        tonic::include_proto!("kubevirt.hooks.v1alpha2");
    }
    pub mod v1alpha3 {
        tonic::include_proto!("kubevirt.hooks.v1alpha3");
    }
}
