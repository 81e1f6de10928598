//! The server's own decode-then-validate path, fed arbitrary bytes: the first
//! byte picks the RPC, the rest is the request message as it would arrive in
//! a gRPC frame. Whatever the bytes, no panic, and every refusal is
//! INVALID_ARGUMENT (never INTERNAL, which would mean a bug, not bad input).
#![no_main]

use customer_mapping::{auth::Rpc, grpc::decode_and_validate};
use libfuzzer_sys::fuzz_target;
use tonic::Code;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, message)) = data.split_first() else {
        return;
    };
    let method = Rpc::ALL[usize::from(selector) % Rpc::ALL.len()];
    if let Err(status) = decode_and_validate(method, message) {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
});
