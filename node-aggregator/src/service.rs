//! `HypervisorReporter/Report`: the sidecars' streams into the registry.

use std::pin::Pin;
use std::sync::Arc;

use hypervisor_proto::v1::hypervisor_reporter_server::HypervisorReporter;
use hypervisor_proto::v1::{DomainReport, ReportAck, domain_report::Change};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::registry::{Registry, StreamHandle, VmiKey};
use crate::validate::Rejection;

/// Acks in flight per stream before the aggregator stops reading that stream.
const ACK_BUFFER: usize = 16;

pub struct ReportService {
    registry: Arc<Registry>,
}

impl ReportService {
    pub fn new(registry: Arc<Registry>) -> Self {
        ReportService { registry }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl HypervisorReporter for ReportService {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<DomainReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = peer_of(&request);
        let stream = self.registry.open_stream(peer.as_str());
        let (acks, ack_stream) = mpsc::channel(ACK_BUFFER);
        info!(stream = stream.id(), %peer, "report stream opened");
        tokio::spawn(serve_stream(stream, peer, request.into_inner(), acks));
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }
}

/// Applies one stream's reports until it ends. The stream's series live exactly
/// as long as this task holds `stream`.
async fn serve_stream(
    stream: StreamHandle,
    peer: String,
    mut reports: Streaming<DomainReport>,
    acks: mpsc::Sender<Result<ReportAck, Status>>,
) {
    let failure = loop {
        let report = match reports.message().await {
            Ok(Some(report)) => report,
            Ok(None) => break None,
            Err(status) => {
                // Undecodable bytes or a broken connection: nothing more of this stream can be trusted.
                let failure = format!("{}: {}", status.code(), status.message());
                let _ = acks.send(Err(status)).await;
                break Some(failure);
            }
        };
        let ack = apply(&stream, report);
        if ack.code != Code::Ok as i32 {
            debug!(stream = stream.id(), %peer, reason = %ack.message, "report rejected");
        }
        if acks.send(Ok(ack)).await.is_err() {
            break Some("the sidecar stopped reading acks".to_string());
        }
    };
    let id = stream.id();
    drop(stream);
    match failure {
        None => info!(stream = id, %peer, "report stream closed; its series are gone"),
        Some(reason) => {
            warn!(stream = id, %peer, %reason, "report stream failed; its series are gone")
        }
    }
}

fn apply(stream: &StreamHandle, report: DomainReport) -> ReportAck {
    let result = match report.change {
        Some(Change::Upsert(domain)) => stream
            .upsert(domain)
            .map_err(|rejection| (Code::InvalidArgument, rejection.to_string())),
        Some(Change::Withdraw(key)) => stream
            .withdraw(&VmiKey {
                namespace: key.namespace,
                name: key.name,
            })
            .map_err(|refusal| (Code::NotFound, refusal.to_string())),
        None => {
            stream.count_rejection(Rejection::Empty);
            Err((Code::InvalidArgument, Rejection::Empty.to_string()))
        }
    };
    let (code, message) = result.err().unwrap_or((Code::Ok, String::new()));
    ReportAck {
        sequence: report.sequence,
        code: code as i32,
        message,
    }
}

fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_else(|| "unix".to_string())
}
