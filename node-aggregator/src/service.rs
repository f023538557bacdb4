//! `HypervisorReporter/Report`: the sidecars' streams into the registry.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream;
use hypervisor_proto::v1::hypervisor_reporter_server::HypervisorReporter;
use hypervisor_proto::v1::{DomainReport, ReportAck, domain_report::Change};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::memory::{TrimOnDrop, Trimmer};
use crate::registry::{Registry, StreamHandle, StreamId, VmiKey};
use crate::validate::{Limit, Rejection};

pub struct ReportService {
    registry: Arc<Registry>,
    reports_per_second: u32,
    trimmer: Trimmer,
}

impl ReportService {
    /// `reports_per_second` bounds each stream, with one second's worth as burst. A stream
    /// that ends has `trimmer` hand its memory back.
    pub fn new(registry: Arc<Registry>, reports_per_second: u32, trimmer: Trimmer) -> Self {
        ReportService {
            registry,
            reports_per_second,
            trimmer,
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
        info!(stream = stream.id(), %peer, "report stream opened");
        let served = ServedStream {
            reports: request.into_inner(),
            budget: RateBudget::new(self.reports_per_second),
            ending: Ending {
                stream: stream.id(),
                peer,
                failure: Some("the stream was reset or its connection lost".into()),
                _trim: self.trimmer.on_drop(),
            },
            stream,
        };
        // Each report is read and applied when tonic asks for the next ack, in the task
        // that sends the acks: a sidecar that stops reading acks fills its flow-control
        // window, and then its reports are not read either.
        let acks = stream::unfold(Some(served), |served| async move {
            let mut served = served?;
            let ack = served.next_ack().await?;
            // After an error nothing more of the stream can be trusted: it ends here.
            let next = ack.is_ok().then_some(served);
            Some((ack, next))
        });
        Ok(Response::new(Box::pin(acks)))
    }
}

/// One stream's reports, applied one at a time. The stream's series live exactly as
/// long as this holds `stream`: until the sidecar ends the stream, the stream fails,
/// or tonic drops the acks (the stream was reset or its connection lost).
struct ServedStream {
    stream: StreamHandle,
    reports: Streaming<DomainReport>,
    budget: RateBudget,
    /// Declared after `stream`, and fields drop in order: the series are gone when it logs.
    ending: Ending,
}

impl ServedStream {
    /// Reads and applies the next report; `None` once the sidecar has ended the stream.
    async fn next_ack(&mut self) -> Option<Result<ReportAck, Status>> {
        let stream = &self.stream;
        let report = match self.reports.message().await {
            Ok(Some(report)) => report,
            Ok(None) => {
                self.ending.failure = None;
                return None;
            }
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
                self.ending.failure =
                    Some(format!("{}: {}", status.code(), status.message()).into());
                return Some(Err(status));
            }
        };
        let ack = if self.budget.take() {
            apply(stream, report)
        } else {
            stream.count_rejection(Rejection::RateLimited);
            rejected(report.sequence, Rejection::RateLimited)
        };
        if ack.code != Code::Ok as i32 {
            let peer = &self.ending.peer;
            debug!(stream = stream.id(), %peer, reason = %ack.message, "report rejected");
        }
        Some(Ok(ack))
    }
}

/// Logs how a stream ended, once its series are gone, and has its memory trimmed.
struct Ending {
    stream: StreamId,
    peer: String,
    /// Why the stream failed; `None` once the sidecar has ended it. Starts as what
    /// dropping a stream still open means: tonic drops the acks of a stream that was
    /// reset or whose connection was lost.
    failure: Option<Cow<'static, str>>,
    /// Dropped after the log line, with the rest of the stream already gone.
    _trim: TrimOnDrop,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let (id, peer) = (self.stream, &self.peer);
        match &self.failure {
            None => info!(stream = id, %peer, "report stream closed; its series are gone"),
            Some(reason) => {
                warn!(stream = id, %peer, %reason, "report stream failed; its series are gone")
            }
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
