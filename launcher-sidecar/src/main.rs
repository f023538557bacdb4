use std::io::IsTerminal;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::FutureExt;
use launcher_sidecar::domain::ConnectNow;
use launcher_sidecar::hook::{self, Defined, Hooks};
use launcher_sidecar::libvirt::{DEFAULT_URIS, LibvirtView, Watcher};
use launcher_sidecar::report::{self, AggregatorAddr, Sources};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Reports the hypervisor of its virt-launcher's domain to the node-aggregator.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// libvirt URI to read domains from [default: KubeVirt's non-root virtqemud socket, then qemu:///system]
    #[arg(long, env = "LIBVIRT_URI")]
    libvirt_uri: Option<String>,
    /// Report only this domain (default: every domain on the connection; a virt-launcher holds one).
    #[arg(long, env = "DOMAIN_NAME")]
    domain: Option<String>,
    /// The node-aggregator: http://HOST:PORT or unix:///PATH.
    #[arg(
        long,
        env = "AGGREGATOR_ADDR",
        default_value = "http://node-aggregator.kubevirt-hypervisor-metric.svc:9440"
    )]
    aggregator: AggregatorAddr,
    /// Where virt-launcher looks for hook sockets.
    #[arg(long, env = "HOOKS_DIR", default_value = "/var/run/kubevirt-hooks")]
    hooks_dir: PathBuf,
    /// This container's name, set by KubeVirt; the hook socket is <hooks-dir>/<container-name>.sock.
    #[arg(long, env = "CONTAINER_NAME", required_unless_present = "no_hooks")]
    container_name: Option<String>,
    /// Serve no hook socket, for use outside KubeVirt.
    #[arg(long)]
    no_hooks: bool,
}

/// Resync with libvirt this often even when no event arrives: the safety net, not the mechanism.
const RESYNC: Duration = Duration::from_secs(30);
/// How long the hook server may take to send its last answers before the process exits.
const HOOK_DRAIN: Duration = Duration::from_secs(2);

// One thread for the hooks and the report stream; libvirt's event loop has its own.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // One log line per panic, wherever it happens; the callers decide how to go on.
    std::panic::set_hook(Box::new(|panic| error!("{panic}")));

    // First of all: virt-launcher waits for this socket before it starts anything else.
    let hook_socket = match (&args.container_name, args.no_hooks) {
        (Some(container), false) => Some(hook::bind(&args.hooks_dir, container)?),
        _ => None,
    };

    // Handled from here on, so that a stop is always a clean withdrawal and exit 0.
    let mut terminate = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;

    let (libvirt_tx, libvirt_rx) = watch::channel(LibvirtView::Pending);
    let (defined_tx, defined_rx) = watch::channel(Defined::default());
    let (libvirt_is_up, connect_requests) = ConnectNow::channel();
    // Set by SIGTERM, SIGINT or the Shutdown hook.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (stop_hooks_tx, mut stop_hooks_rx) = watch::channel(false);

    let hook_server = hook_socket.map(|(listener, path)| {
        info!(socket = %path.display(), "hook socket ready");
        let hooks = Hooks {
            defined: defined_tx,
            libvirt_is_up,
            shutdown: stop_tx.clone(),
        };
        let stop = async move {
            let _ = stop_hooks_rx.wait_for(|stop| *stop).await;
        };
        (tokio::spawn(hook::serve(listener, hooks, stop)), path)
    });

    Watcher {
        uris: match args.libvirt_uri {
            Some(uri) => vec![uri],
            None => DEFAULT_URIS.map(String::from).to_vec(),
        },
        only_domain: args.domain,
        resync: RESYNC,
        connect_requests,
    }
    .spawn(libvirt_tx)?;

    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: withdrawing and exiting"),
            _ = interrupt.recv() => info!("SIGINT: withdrawing and exiting"),
        }
        stop_tx.send_replace(true);
    });

    let mut sources = Sources::new(libvirt_rx, defined_rx);
    // A bug in the report loop costs a reconnect, not the sidecar: virt-launcher pods
    // do not restart their containers.
    while AssertUnwindSafe(report::run(&args.aggregator, &mut sources, stop_rx.clone()))
        .catch_unwind()
        .await
        .is_err()
    {
        error!("the report loop panicked; starting it again");
    }

    if let Some((server, path)) = hook_server {
        stop_hooks_tx.send_replace(true);
        match tokio::time::timeout(HOOK_DRAIN, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => warn!("hook server: {err:#}"),
            Ok(Err(err)) => warn!(%err, "hook server task"),
            Err(_) => warn!("hook server did not drain in time"),
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
