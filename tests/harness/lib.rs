//! Test harness for real parts: a private session-mode libvirt daemon with real QEMU guests
//! per test ([`libvirt`]), KubeVirt's own Go programs built from its source ([`kubevirt`]),
//! a private Prometheus ([`prometheus`]), and helpers for ports, polling, HTTP, promtool and
//! grpcurl ([`tools`]).
//!
//! Everything listens on loopback and lives in its own temporary directory, so tests can run
//! in parallel threads; every handle cleans up its processes and files on drop, also when a
//! test panics. The machine needs `make deps` (packages, the `kvhm-test` user, /dev/kvm
//! access) and the tests must run as root.

pub mod binaries;
pub mod kubevirt;
pub mod libvirt;
pub mod prometheus;
pub mod tools;
