//! launcher-sidecar: runs in a virt-launcher pod and tells the node-aggregator
//! which hypervisor backs the pod's domain.
//!
//! Data flows one way: `libvirt` follows the daemon's domains and their
//! lifecycle events (and `hook` hears from virt-launcher what it defines, the
//! fallback when libvirt is out of reach), `classify` reads each domain's XML,
//! and `report` streams the result to the aggregator.

pub mod classify;
pub mod hook;
pub mod libvirt;
pub mod report;
