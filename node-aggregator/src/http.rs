//! The metrics port: `/metrics`, `/healthz` and `/readyz` over HTTP/1.1, in TLS when
//! configured, with deadlines and a size cap that keep slow or large clients cheap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::memory::Trimmer;
use crate::metrics::Exposition;
use crate::text_format::CONTENT_TYPE;

/// A client gets this long for its TLS handshake and for its request headers,
/// so that slow or silent clients cannot pile up connections.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request head read (hyper's default is ~400 KiB, so each client could make the
/// aggregator hold that much until its deadline); a larger one is answered 431. A scrape's
/// head is a few hundred bytes, a few KiB with a bearer token.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Serves `router` on `listener` over HTTP/1.1, in TLS when `tls` is given; `trimmer`
/// hands a connection's memory back after it closes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    trimmer: Trimmer,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, usually: wait for some to close.
                warn!(%err, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        let trim = trimmer.on_drop();
        tokio::spawn(async move {
            let _trim = trim;
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(CLIENT_DEADLINE)
                .max_buf_size(MAX_REQUEST_HEAD);
            let served = match tls {
                None => http.serve_connection(TokioIo::new(tcp), service).await,
                Some(tls) => match tokio::time::timeout(CLIENT_DEADLINE, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => http.serve_connection(TokioIo::new(stream), service).await,
                    Ok(Err(err)) => return debug!(%peer, %err, "metrics TLS handshake failed"),
                    Err(_) => return debug!(%peer, "metrics TLS handshake timed out"),
                },
            };
            if let Err(err) = served {
                debug!(%peer, %err, "metrics connection ended with an error");
            }
        });
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (the
/// report server accepts streams).
pub fn router(exposition: Arc<Exposition>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(exposition): State<Arc<Exposition>>| async move {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], exposition.render())
            }),
        )
        .with_state(exposition)
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                if ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ok\n").into_response()
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not serving reports yet\n").into_response()
                }
            }),
        )
}
