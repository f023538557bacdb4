//! Test harness for real parts: a private session-mode libvirt daemon with real QEMU guests
//! per test ([`libvirt`]), KubeVirt's own virt-launcher in a pod of its own driven by its own
//! virt-handler client ([`kubevirt`] builds it, [`kubevirt_pod`] runs it), a private
//! Prometheus ([`prometheus`]), recorders of what an aggregator showed when ([`timeline`]),
//! and helpers for ports, polling, HTTP, promtool and grpcurl ([`tools`]).
//!
//! Everything listens on loopback and lives in its own temporary directory, so tests can run
//! in parallel threads; every handle cleans up its processes and files on drop, also when a
//! test panics. The machine needs `make deps` (packages, the `kvhm-test` user, /dev/kvm
//! access) and the tests must run as root.

pub mod binaries;
pub mod kubevirt;
pub mod kubevirt_pod;
pub mod libvirt;
pub mod prometheus;
pub mod timeline;
pub mod tools;
