//! node-aggregator: one per node. Sidecars stream their domains' hypervisors in
//! (`service`), the `registry` holds one series per VMI for as long as the
//! stream that reported it is open, and `metrics` (Prometheus) and `inventory`
//! (gRPC, for grpcurl) read the registry. `validate` decides what may become a
//! series; `tls` keeps the metrics endpoint's certificate current.

pub mod inventory;
pub mod metrics;
pub mod registry;
pub mod service;
pub mod tls;
pub mod validate;
