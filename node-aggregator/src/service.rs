//! `HypervisorReporter/Report`: the sidecars' streams into the registry.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use hypervisor_proto::v1::hypervisor_reporter_server::HypervisorReporter;
use hypervisor_proto::v1::{DomainReport, ReportAck, domain_report::Change};
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::registry::{Limit, Registry, StreamHandle, VmiKey};
use crate::validate::Rejection;

/// Acks in flight per stream before the aggregator stops reading that stream.
const ACK_BUFFER: usize = 16;

pub struct ReportService {
    registry: Arc<Registry>,
    reports_per_second: u32,
    trim: Arc<Notify>,
}

impl ReportService {
    /// `reports_per_second` bounds each stream, with one second's worth as burst.
    /// Must be called inside the runtime: it starts the memory trimmer.
    pub fn new(registry: Arc<Registry>, reports_per_second: u32) -> Self {
        let trim = Arc::new(Notify::new());
        tokio::spawn(trim_freed_memory(Arc::clone(&trim)));
        ReportService {
            registry,
            reports_per_second,
            trim,
        }
    }
}

/// After streams close, hands the memory they used back to the system: glibc
/// keeps freed memory for reuse, so a burst of thousands of streams would
/// otherwise leave the aggregator large for good. At most once a second.
async fn trim_freed_memory(closed: Arc<Notify>) {
    loop {
        closed.notified().await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
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
        let stream = self.registry.open_stream(peer.as_str()).map_err(|full| {
            warn!(%peer, "report stream refused: {full}");
            Status::resource_exhausted(full.to_string())
        })?;
        let (acks, ack_stream) = mpsc::channel(ACK_BUFFER);
        info!(stream = stream.id(), %peer, "report stream opened");
        let budget = RateBudget::new(self.reports_per_second);
        let trim = Arc::clone(&self.trim);
        tokio::spawn(async move {
            serve_stream(stream, peer, request.into_inner(), budget, acks).await;
            trim.notify_one();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_stream))))
    }
}

/// Applies one stream's reports until it ends. The stream's series live exactly
/// as long as this task holds `stream`.
async fn serve_stream(
    stream: StreamHandle,
    peer: String,
    mut reports: Streaming<DomainReport>,
    mut budget: RateBudget,
    acks: mpsc::Sender<Result<ReportAck, Status>>,
) {
    let failure = loop {
        let report = match reports.message().await {
            Ok(Some(report)) => report,
            Ok(None) => break None,
            Err(status) => {
                // Undecodable bytes or a broken connection: nothing more of this stream can be trusted.
                let status = match status.code() {
                    // tonic's word for a message over the decoding limit.
                    Code::OutOfRange => {
                        stream.count_limit_hit(Limit::MessageBytes);
                        Status::resource_exhausted(format!(
                            "report larger than --max-message-bytes: {}",
                            status.message()
                        ))
                    }
                    // Undecodable protobuf: INTERNAL, as gRPC specifies for parse errors.
                    Code::Internal if status.message().starts_with("failed to decode") => {
                        stream.count_rejection(Rejection::Malformed);
                        status
                    }
                    _ => status,
                };
                let failure = format!("{}: {}", status.code(), status.message());
                let _ = acks.send(Err(status)).await;
                break Some(failure);
            }
        };
        let ack = if budget.take() {
            apply(&stream, report)
        } else {
            stream.count_rejection(Rejection::RateLimited);
            stream.count_limit_hit(Limit::ReportsPerSecond);
            rejected(report.sequence, Rejection::RateLimited)
        };
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
        Some(Change::Upsert(domain)) => stream.upsert(domain),
        Some(Change::Withdraw(key)) => stream.withdraw(&VmiKey {
            namespace: key.namespace,
            name: key.name,
        }),
        None => {
            stream.count_rejection(Rejection::Empty);
            Err(Rejection::Empty)
        }
    };
    match result {
        Ok(()) => ReportAck {
            sequence: report.sequence,
            code: Code::Ok as i32,
            message: String::new(),
        },
        Err(rejection) => rejected(report.sequence, rejection),
    }
}

fn rejected(sequence: u64, rejection: Rejection) -> ReportAck {
    let code = match rejection {
        Rejection::NotReported => Code::NotFound,
        Rejection::TooManyDomains | Rejection::RateLimited => Code::ResourceExhausted,
        Rejection::Malformed => Code::Internal,
        Rejection::Empty
        | Rejection::InvalidNamespace
        | Rejection::InvalidName
        | Rejection::InvalidUid
        | Rejection::InvalidDomainName
        | Rejection::InvalidVersion => Code::InvalidArgument,
    };
    ReportAck {
        sequence,
        code: code as i32,
        message: rejection.to_string(),
    }
}

/// A token bucket holding one second's worth of reports: a sidecar resending its
/// state after a reconnect fits; a flood does not.
struct RateBudget {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

impl RateBudget {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        RateBudget {
            per_second,
            tokens: per_second,
            refilled: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.per_second);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|addr| addr.to_string())
        .unwrap_or_else(|| "unix".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_budget_allows_one_second_of_burst_then_the_rate() {
        let mut budget = RateBudget::new(10);
        assert_eq!((0..20).filter(|_| budget.take()).count(), 10);
        budget.refilled -= std::time::Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| budget.take()).count(), 5);
    }
}
