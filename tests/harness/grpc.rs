//! gRPC calls with bytes as they are on the wire: the replay sends recorded requests byte
//! for byte and compares the answers' bytes, so nothing of it goes through generated types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use prost::bytes::{Buf, BufMut};
use tokio::net::UnixStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

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
        .unary(call, path, BytesCodec)
        .await
        .map(tonic::Response::into_inner))
}

/// The canonical name of a gRPC status code, as the recordings spell it (`OK`,
/// `DEADLINE_EXCEEDED`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
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

/// Messages as bytes, both ways.
#[derive(Clone, Copy, Default)]
pub struct BytesCodec;

pub struct BytesEncoder;
pub struct BytesDecoder;

impl Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = BytesEncoder;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> BytesDecoder {
        BytesDecoder
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

impl Decoder for BytesDecoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}
