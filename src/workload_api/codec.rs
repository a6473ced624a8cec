//! The protobuf codec of every gRPC service and client in tbot: prost, with a 2 KiB starting buffer
//! instead of tonic's 8 KiB. An open `FetchX509SVID` stream keeps its encode buffer for as long as
//! it is open, and a message (an SVID, its key and the bundle) is about 1.5 KiB, so the default cost
//! every open stream 8 KiB of which it used a quarter; a larger message still grows the buffer.
//!
//! A message that does not decode is the sender's fault, so it is refused with `INVALID_ARGUMENT`
//! (prost's codec says `INTERNAL`, which tells a client to retry and an operator to look at the
//! server).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The starting size of each call's encode and decode buffer.
pub const BUFFER_BYTES: usize = 2 * 1024;

/// tonic's default: a stream yields after encoding this much at once.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_BYTES`] buffers (named in `build.rs` as the generated code's codec).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = StrictDecoder<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
            BUFFER_BYTES,
            YIELD_THRESHOLD,
        )))
    }
}

/// prost's decoder, whose refusals of a malformed message carry `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct StrictDecoder<D>(D);

impl<D: Decoder<Error = Status>> Decoder for StrictDecoder<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0.decode(buf).map_err(|e| {
            if e.code() == Code::Internal {
                Status::invalid_argument(format!(
                    "the message is not a valid protobuf message of this call: {}; send what \
                     this API's .proto file describes",
                    e.message()
                ))
            } else {
                e
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
