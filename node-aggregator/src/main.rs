use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hypervisor_proto::v1::{
    FILE_DESCRIPTOR_SET, hypervisor_reporter_server::HypervisorReporterServer,
    inventory_server::InventoryServer,
};
use node_aggregator::inventory::InventoryService;
use node_aggregator::memory::Trimmer;
use node_aggregator::metrics::Exposition;
use node_aggregator::registry::{Capacity, Registry};
use node_aggregator::service::ReportService;
use node_aggregator::tls::ReloadingCert;
use node_aggregator::{http, listener};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tracing::info;

/// Holds the kubevirt_vmi_hypervisor_info series of one node and serves them to Prometheus.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address for the gRPC services (reports from sidecars, inventory, health, reflection).
    #[arg(long, env = "GRPC_LISTEN", default_value = "0.0.0.0:9440")]
    grpc_listen: SocketAddr,
    /// Also serve the gRPC services on this unix socket.
    #[arg(long, env = "GRPC_UNIX")]
    grpc_unix: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9441")]
    metrics_listen: SocketAddr,
    /// Serve the metrics address over HTTPS with this PEM certificate chain (reloaded when it changes).
    #[arg(long, env = "METRICS_TLS_CERT", requires = "metrics_tls_key")]
    metrics_tls_cert: Option<PathBuf>,
    /// The PEM private key of --metrics-tls-cert.
    #[arg(long, env = "METRICS_TLS_KEY", requires = "metrics_tls_cert")]
    metrics_tls_key: Option<PathBuf>,
    /// This node's name: the `node` label of every series (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Ping every connection this often (HTTP/2 ping, and TCP keepalive probes)...
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_interval: Duration,
    /// ...and close it, dropping its streams' series, when a ping goes unanswered this long.
    #[arg(long, env = "KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// Open report streams, all clients together; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_STREAMS", default_value_t = 4096)]
    max_streams: usize,
    /// Concurrent streams on one HTTP/2 connection (a sidecar needs one).
    #[arg(long, env = "MAX_STREAMS_PER_CONNECTION", default_value_t = 16)]
    max_streams_per_connection: u32,
    /// VMIs one stream may report (a virt-launcher holds one).
    #[arg(long, env = "MAX_DOMAINS_PER_STREAM", default_value_t = 16)]
    max_domains_per_stream: usize,
    /// Largest report message accepted; a larger one ends its stream.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 16 * 1024)]
    max_message_bytes: usize,
    /// Reports per second per stream, with one second's worth as burst.
    #[arg(long, env = "MAX_REPORTS_PER_SECOND", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    max_reports_per_second: u32,
}

// Two workers hold a node's streams with room to spare; one per core would waste memory on big nodes.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    anyhow::ensure!(!args.node_name.is_empty(), "--node-name must not be empty");

    let registry = Registry::new(
        args.node_name.clone(),
        Capacity {
            streams: args.max_streams,
            domains_per_stream: args.max_domains_per_stream,
        },
    );
    let ready = Arc::new(AtomicBool::new(false));
    let exposition = Arc::new(Exposition::new(Arc::clone(&registry))?);

    let metrics_listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_listen))?;
    let grpc_incoming = TcpIncoming::bind(args.grpc_listen)
        .with_context(|| format!("binding the gRPC address {}", args.grpc_listen))?
        .with_nodelay(Some(true))
        .with_keepalive(Some(args.keepalive_interval))
        .with_keepalive_interval(Some(args.keepalive_interval))
        .with_keepalive_retries(Some(3));
    // Connections and streams that end have their memory handed back to the system.
    let trimmer = Trimmer::start();
    let routes = grpc_routes(&args, Arc::clone(&registry), trimmer.clone()).await?;

    let unix_server = match &args.grpc_unix {
        Some(path) => {
            // A socket file left by an earlier run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .with_context(|| format!("binding the gRPC unix socket {}", path.display()))?;
            let server = grpc_server(&args)
                .add_routes(routes.clone())
                .serve_with_incoming(UnixListenerStream::new(listener));
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let grpc = tokio::spawn(
        grpc_server(&args)
            .add_routes(routes)
            .serve_with_incoming(listener::require_preface(grpc_incoming, trimmer.clone())),
    );
    let tls = match (&args.metrics_tls_cert, &args.metrics_tls_key) {
        // clap makes each flag require the other.
        (Some(cert), Some(key)) => {
            let cert = ReloadingCert::load(cert, key)?;
            let acceptor = cert.acceptor()?;
            tokio::spawn(cert.watch());
            Some(acceptor)
        }
        _ => None,
    };
    let http = tokio::spawn(http::serve(
        metrics_listener,
        http::router(exposition, Arc::clone(&ready)),
        tls,
        trimmer,
    ));
    ready.store(true, Ordering::Release);
    info!(
        node = %args.node_name,
        grpc = %args.grpc_listen,
        grpc_unix = ?args.grpc_unix,
        metrics = %args.metrics_listen,
        metrics_tls = args.metrics_tls_cert.is_some(),
        "node-aggregator serving"
    );

    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    let unix = async {
        match unix_server {
            Some(server) => server.await,
            None => std::future::pending().await,
        }
    };
    // Report streams never end by themselves, so shutting down means leaving them:
    // every sidecar reconnects to the next aggregator and resends its state.
    tokio::select! {
        result = grpc => result.context("gRPC server task")?.context("serving gRPC")?,
        result = unix => result.context("gRPC unix server task")?.context("serving gRPC on the unix socket")?,
        result = http => result.context("metrics server task")?,
        _ = terminate.recv() => info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => info!("SIGINT: shutting down"),
    }
    Ok(())
}

fn grpc_server(args: &Args) -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(args.keepalive_interval))
        .http2_keepalive_timeout(Some(args.keepalive_timeout))
        .max_concurrent_streams(args.max_streams_per_connection)
}

async fn grpc_routes(
    args: &Args,
    registry: Arc<Registry>,
    trimmer: Trimmer,
) -> anyhow::Result<Routes> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<HypervisorReporterServer<ReportService>>()
        .await;
    health
        .set_serving::<InventoryServer<InventoryService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reports = HypervisorReporterServer::new(ReportService::new(
        Arc::clone(&registry),
        args.max_reports_per_second,
        trimmer,
    ))
    .max_decoding_message_size(args.max_message_bytes);
    Ok(Routes::new(reports)
        .add_service(InventoryServer::new(InventoryService::new(registry)))
        .add_service(health_service)
        .add_service(
            reflection()
                .build_v1()
                .context("building gRPC reflection v1")?,
        )
        // grpcurl releases before 1.9 speak only v1alpha.
        .add_service(
            reflection()
                .build_v1alpha()
                .context("building gRPC reflection v1alpha")?,
        ))
}
