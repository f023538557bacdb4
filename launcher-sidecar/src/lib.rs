//! launcher-sidecar: runs in a virt-launcher pod and tells the node-aggregator
//! which hypervisor backs the pod's domain.
//!
//! Data flows one way: libvirt event / hook → classification → report.
//!
//! - `libvirt` follows the daemon's domains and their lifecycle events; `hook` hears
//!   from virt-launcher what it defines, the VMI's uid and the fallback when libvirt is
//!   out of reach. The two are peers: each speaks only of `domain`'s model.
//! - `classify` reads each domain's XML for its hypervisor.
//! - `report` merges the two sources and streams the result to the aggregator.

pub mod classify;
pub mod domain;
pub mod hook;
pub mod libvirt;
pub mod report;
