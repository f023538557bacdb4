//! node-aggregator: one per node. Sidecars stream their domains' hypervisors in
//! (`service`), the `registry` holds one series per VMI for as long as the
//! stream that reported it is open, and `metrics` (Prometheus, written in
//! `text_format` and served by `http`) and `inventory` (gRPC, for grpcurl) read
//! the registry. `validate` decides what may become a series and names the
//! limits; `listener` and `tls` guard the two ports, and `memory` hands back
//! what closed connections and streams used.

#[cfg(test)]
mod fixture;
pub mod http;
pub mod inventory;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod service;
pub mod text_format;
pub mod tls;
pub mod validate;
