//! One kept-alive HTTP/1.1 connection for GETs, and the pre-rendered /metrics server that
//! the aggregator's rendering is compared with.
//!
//! The same client reads both servers, so the difference between them is the server's work.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;

/// The aggregator's content type, so the static server answers with the same headers.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpConn {
    sender: SendRequest<Empty<Bytes>>,
    host: String,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true).context("TCP_NODELAY")?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP/1.1 handshake with {addr}"))?;
        // Drives the connection; ends when the sender is dropped or the server closes.
        tokio::spawn(connection);
        Ok(HttpConn {
            sender,
            host: addr.to_string(),
        })
    }

    /// GETs `path` and returns the whole body.
    pub async fn get(&mut self, path: &str) -> Result<Bytes> {
        let request = hyper::Request::get(path)
            .header(HOST, &self.host)
            .body(Empty::new())
            .context("building a GET")?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .context("the connection is closed")?;
            let response = self
                .sender
                .send_request(request)
                .await
                .context("sending the GET")?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .context("reading the body")?
                .to_bytes();
            if !status.is_success() {
                bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
            }
            Ok(body)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("GET http://{}{path} timed out", self.host))?
            .with_context(|| format!("GET http://{}{path}", self.host))
    }

    /// GETs `path` and returns how long it took, from sending the request to the last byte.
    pub async fn time_get(&mut self, path: &str) -> Result<(Duration, usize)> {
        let started = Instant::now();
        let body = self.get(path).await?;
        Ok((started.elapsed(), body.len()))
    }
}

/// `bench serve-static BODY_FILE ADDR`: serves the file's bytes as /metrics with the
/// aggregator's content type, from a runtime shaped like the aggregator's (two workers),
/// in a process of its own like the aggregator. Runs until killed.
pub fn serve_static_main(args: &[String]) -> Result<()> {
    let [body, addr] = args else {
        bail!("usage: bench serve-static BODY_FILE ADDR");
    };
    let body =
        Bytes::from(std::fs::read(Path::new(body)).with_context(|| format!("reading {body}"))?);
    let addr: SocketAddr = addr.parse().with_context(|| format!("parsing {addr}"))?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the static server's runtime")?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let router = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        // A clone of Bytes shares the buffer: no copy, no rendering.
                        let body = body.clone();
                        async move { ([(CONTENT_TYPE, METRICS_CONTENT_TYPE)], body) }
                    }),
                )
                .route("/readyz", axum::routing::get(|| async { "ok\n" }));
            // The aggregator's own serving loop (node-aggregator/src/metrics.rs, without TLS):
            // hyper's HTTP/1.1 connection with its timer and header deadline, one task each.
            loop {
                let (tcp, _) = listener.accept().await.context("accepting")?;
                let service = TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10));
                    let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        })
}
