//! The codec of `kubevirt.hypervisor.v1`: prost with small buffers.
//!
//! tonic's default buffers take 8 KiB for each direction of every call, which the
//! aggregator holds for every open report stream. Reports and acks are a few
//! hundred bytes, and a larger message grows the buffer it needs.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of the encode and decode buffer of each call.
const BUFFER_BYTES: usize = 512;
/// Encoded messages gathered before they go to the connection: tonic's default.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] buffers; `T` is encoded, `U` decoded.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

// Not derived: the derive would require `T: Default` and `U: Default`.
impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}
