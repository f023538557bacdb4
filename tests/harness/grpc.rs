//! gRPC clients of the tests: a report stream that the test drives report by report
//! ([`Reporter`]) with the domain it reports ([`domain`]), and calls with bytes as they are on
//! the wire, which no generated type would send: the replay sends recorded requests byte for
//! byte and compares the answers' bytes ([`unary_raw`]), the bad input sends garbage as
//! report payloads ([`raw_report`]).

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use hyper_util::rt::TokioIo;
use hypervisor_proto::v1::hypervisor_reporter_client::HypervisorReporterClient;
use hypervisor_proto::v1::inventory_client::InventoryClient;
use hypervisor_proto::v1::{
    Domain, DomainKey, DomainReport, DomainState, HypervisorType, ListRequest, ReportAck, Series,
    domain_report::Change,
};
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

pub const REPORT_PATH: &str = "/kubevirt.hypervisor.v1.HypervisorReporter/Report";

/// A running domain as a sidecar reports it, named as KubeVirt names it.
pub fn domain(namespace: &str, name: &str, hypervisor: HypervisorType) -> Domain {
    Domain {
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
        domain_name: format!("{namespace}_{name}"),
        hypervisor_type: hypervisor.into(),
        hypervisor_version: "7.2.22".into(),
        state: DomainState::Running.into(),
    }
}

/// One HTTP/2 connection to the gRPC server at `url` (`http://127.0.0.1:PORT`).
pub async fn connect(url: &str, timeout: Duration) -> Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .connect_timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// `Inventory/List` of the aggregator at `url`, on a connection of its own.
pub async fn inventory(url: &str, timeout: Duration) -> Result<Vec<Series>> {
    let listed = InventoryClient::new(connect(url, timeout).await?)
        .list(ListRequest {})
        .await
        .context("Inventory/List")?
        .into_inner();
    Ok(listed.series)
}

/// A gRPC channel over the unix socket at `path`, with `:authority` `localhost`, as
/// virt-launcher talks to hook sockets.
pub async fn unix_channel(path: &Path) -> Result<Channel> {
    let socket: PathBuf = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .with_context(|| format!("connecting to {}", path.display()))
}

/// A report stream driven by the test: each `send` waits for its ack. Dropping it ends the
/// stream.
pub struct Reporter {
    requests: mpsc::Sender<DomainReport>,
    acks: Streaming<ReportAck>,
    sequence: u64,
    /// How long the aggregator may take to open the stream, to ack or to end it.
    answer: Duration,
}

impl Reporter {
    pub async fn open(channel: Channel, answer: Duration) -> Result<Self> {
        // Room for a burst of reports queued before their acks are read.
        let (requests, stream) = mpsc::channel(64);
        let acks = tokio::time::timeout(
            answer,
            HypervisorReporterClient::new(channel).report(ReceiverStream::new(stream)),
        )
        .await
        .context("opening a report stream timed out")?
        .context("opening a report stream")?
        .into_inner();
        Ok(Reporter {
            requests,
            acks,
            sequence: 0,
            answer,
        })
    }

    /// Sends one report and waits for its ack, which must be for this report.
    pub async fn send(&mut self, change: Option<Change>) -> Result<ReportAck> {
        let sequence = self.queue(change).await?;
        let ack = self.next_ack().await?;
        ensure!(
            ack.sequence == sequence,
            "ack {ack:?} for report {sequence}"
        );
        Ok(ack)
    }

    /// Sends one report without waiting for its ack; returns its sequence number.
    pub async fn queue(&mut self, change: Option<Change>) -> Result<u64> {
        self.sequence += 1;
        self.requests
            .send(DomainReport {
                sequence: self.sequence,
                change,
            })
            .await
            .context("the report stream is closed")?;
        Ok(self.sequence)
    }

    /// The next ack, whichever report it is for.
    pub async fn next_ack(&mut self) -> Result<ReportAck> {
        tokio::time::timeout(self.answer, self.acks.message())
            .await
            .context("no ack in time")?
            .context("reading the ack")?
            .context("the stream ended instead of acking")
    }

    pub async fn upsert(&mut self, domain: Domain) -> Result<ReportAck> {
        self.send(Some(Change::Upsert(domain))).await
    }

    pub async fn withdraw(&mut self, namespace: &str, name: &str) -> Result<ReportAck> {
        self.send(Some(Change::Withdraw(DomainKey {
            namespace: namespace.into(),
            name: name.into(),
        })))
        .await
    }

    /// Upserts and insists on an OK ack.
    pub async fn report(&mut self, domain: Domain) -> Result<()> {
        let ack = self.upsert(domain).await?;
        ensure!(ack.code == Code::Ok as i32, "report refused: {ack:?}");
        Ok(())
    }

    /// Waits until the aggregator ends the stream; returns the status it ended with.
    pub async fn end_status(&mut self) -> Result<Status> {
        end_status(&mut self.acks, self.answer).await
    }
}

/// How the aggregator ended a report stream (`Code::Ok` for a clean end), skipping acks
/// still in flight.
async fn end_status(acks: &mut Streaming<ReportAck>, answer: Duration) -> Result<Status> {
    tokio::time::timeout(answer, async {
        loop {
            match acks.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Status::ok(""),
                Err(status) => return status,
            }
        }
    })
    .await
    .context("the aggregator did not end the stream in time")
}

/// Opens a Report stream that sends `messages` as they are, each framed by tonic as one
/// message, and returns how the aggregator ended it.
pub async fn raw_report(
    channel: Channel,
    messages: Vec<Vec<u8>>,
    answer: Duration,
) -> Result<Status> {
    let (requests, stream) = mpsc::channel(messages.len() + 1);
    for message in messages {
        requests.send(message).await?;
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("the channel is not ready")?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(REPORT_PATH);
    let response = tokio::time::timeout(
        answer,
        grpc.streaming(
            tonic::Request::new(ReceiverStream::new(stream)),
            path,
            BytesCodec::<ReportAck>::default(),
        ),
    )
    .await
    .context("opening the raw stream timed out")?;
    let mut acks = match response {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok(status),
    };
    // Keep `requests` open: the aggregator, not the end of our input, must end the stream.
    let status = end_status(&mut acks, answer).await?;
    drop(requests);
    Ok(status)
}

/// One unary call of `method` (a full path, `/pkg.Service/Method`) with `request` as the
/// message's bytes, within `deadline` (sent as `grpc-timeout`). Returns the answer's bytes, or
/// the status the server ended the call with.
pub async fn unary_raw(
    channel: Channel,
    method: &str,
    request: Vec<u8>,
    deadline: Duration,
) -> Result<std::result::Result<Vec<u8>, Status>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .with_context(|| format!("{method}: the channel is not ready"))?;
    let path: tonic::codegen::http::uri::PathAndQuery = method
        .parse()
        .with_context(|| format!("{method:?} is not a gRPC path"))?;
    let mut call = tonic::Request::new(request);
    call.set_timeout(deadline);
    Ok(grpc
        .unary(call, path, BytesCodec::<Vec<u8>>::default())
        .await
        .map(tonic::Response::into_inner))
}

/// The canonical name of a gRPC status code, as the recordings spell it (`OK`,
/// `DEADLINE_EXCEEDED`, …).
pub fn code_name(code: impl Into<Code>) -> &'static str {
    match code.into() {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Sends messages as the bytes it is given; decodes the answers as `A`: bytes as they are,
/// or a message.
pub struct BytesCodec<A>(PhantomData<A>);

impl<A> Default for BytesCodec<A> {
    fn default() -> Self {
        BytesCodec(PhantomData)
    }
}

/// What a [`BytesCodec`] decodes an answer's bytes to.
pub trait Answer: Sized + Send + 'static {
    fn from_wire(bytes: Bytes) -> Result<Self, Status>;
}

impl Answer for Vec<u8> {
    fn from_wire(bytes: Bytes) -> Result<Self, Status> {
        Ok(bytes.to_vec())
    }
}

impl Answer for ReportAck {
    fn from_wire(bytes: Bytes) -> Result<Self, Status> {
        ReportAck::decode(bytes).map_err(|err| Status::internal(err.to_string()))
    }
}

pub struct BytesEncoder;
pub struct AnswerDecoder<A>(PhantomData<A>);

impl<A: Answer> Codec for BytesCodec<A> {
    type Encode = Vec<u8>;
    type Decode = A;
    type Encoder = BytesEncoder;
    type Decoder = AnswerDecoder<A>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> AnswerDecoder<A> {
        AnswerDecoder(PhantomData)
    }
}

impl Encoder for BytesEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<A: Answer> Decoder for AnswerDecoder<A> {
    type Item = A;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<A>, Status> {
        A::from_wire(src.copy_to_bytes(src.remaining())).map(Some)
    }
}
