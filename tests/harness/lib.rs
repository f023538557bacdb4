//! Test harness for real parts: a private session-mode libvirt daemon with real QEMU guests
//! per test ([`libvirt`]) and a subscription to its lifecycle events ([`lifecycle`]); KubeVirt's
//! virt-launcher played from recordings of the real one ([`recording`] reads them, [`replay`]
//! plays them) against the real sidecar in a pod of its own ([`launcher_pod`]); a private
//! Prometheus ([`prometheus`]); recorders of what an aggregator showed when ([`timeline`]);
//! gRPC clients: report streams driven report by report, and calls with raw bytes
//! ([`grpc`]); and helpers for ports, polling, HTTP, promtool and grpcurl ([`tools`]).
//!
//! Everything listens on loopback and lives in its own temporary directory, so tests can run
//! in parallel threads; every handle cleans up its processes and files on drop, also when a
//! test panics. The machine needs `make deps` (packages, the `kvhm-test` user, /dev/kvm
//! access) and the tests must run as root.

pub mod binaries;
pub mod grpc;
pub mod launcher_pod;
pub mod libvirt;
pub mod lifecycle;
pub mod prometheus;
pub mod recording;
pub mod replay;
pub mod timeline;
pub mod tools;
