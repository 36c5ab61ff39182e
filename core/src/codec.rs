//! The gRPC codec of Ferry's services: prost's, except that a message's
//! buffer space is reserved at its exact encoded size before it is written.
//!
//! prost writes a message into tonic's send buffer field by field, and the
//! buffer grows as it goes: an exchange frame of a few hundred KiB that
//! lands in a buffer of tonic's default 8 KiB is copied into four or five
//! ever larger allocations on its way. Reserving `encoded_len` first (prost
//! computes it anyway) makes that one allocation and no copy but the write.
//! The bytes are prost's own, so a peer on prost's codec reads them
//! unchanged; every gRPC test of the exchange and of the JobManager's
//! control calls goes through this codec.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// prost's codec with exact-size reservation on the encoding side.
#[derive(Debug, Clone)]
pub struct SizedCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SizedCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for SizedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes a prost message into space reserved at its encoded size.
#[derive(Debug, Clone)]
pub struct SizedEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        // An `EncodeBuf` grows on demand, so prost's only error (too little
        // room) cannot happen; report it rather than panic all the same.
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }
}
