//! Turns tonic's answer to an over-size request into the code gRPC itself
//! uses for it.
//!
//! tonic refuses a request message above `max_decoding_message_size` as soon
//! as it reads the 5-byte length prefix, before buffering the body or
//! calling a handler, but says OUT_OF_RANGE, which callers won't expect and
//! retry policies don't know. Our handlers never return OUT_OF_RANGE, so on
//! the services behind this layer it can only mean that refusal.

use tonic::{Code, body::Body};
use tower::util::MapResponseLayer;

use super::status;
use crate::{
    mapping::{MAX_BATCH_KEYS, MAX_ID_CHARS},
    proto::{BatchGetRequest, MappingKey, mapping_key},
    telemetry::metrics,
};

const OUT_OF_RANGE: &[u8] = b"11";

/// The layer to put in front of the services. A plain response map, not a
/// service of its own: wrapping every call in a boxed future costs a third
/// of Get's throughput (docs/PERFORMANCE.md).
pub fn request_size_layer(
    limit: usize,
) -> MapResponseLayer<impl Fn(http::Response<Body>) -> http::Response<Body> + Clone> {
    MapResponseLayer::new(move |response| too_large_as_resource_exhausted(response, limit))
}

fn too_large_as_resource_exhausted(
    mut response: http::Response<Body>,
    limit: usize,
) -> http::Response<Body> {
    // A unary refusal is "trailers-only": the status is in the headers.
    let refused = response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == OUT_OF_RANGE);
    if refused {
        metrics::record_request_refused("too_large");
        tracing::warn!(
            limit_bytes = limit,
            code = metrics::code_name(Code::ResourceExhausted),
            "request refused: message too large"
        );
        let headers = response.headers_mut();
        headers.remove("grpc-message");
        if status::request_too_large(limit)
            .add_header(headers)
            .is_err()
        {
            tracing::error!("cannot encode the too-large status");
        }
    }
    response
}

/// The largest request the contract calls valid: a BatchGet of the most
/// keys, each a user id of the most characters, each four bytes in UTF-8
/// (a Stripe customer id is ASCII, so shorter), in a connected account of
/// the longest id. The default request size
/// limit admits it (`config`), so that a caller keeping to the contract
/// only ever sees the contract's own errors.
pub fn largest_valid_request() -> BatchGetRequest {
    // Four bytes each; ten of them number the keys, so that all differ.
    const DIGITS: [char; 10] = ['😀', '😁', '😂', '😃', '😄', '😅', '😆', '😇', '😈', '😉'];
    let filler = DIGITS[0].to_string().repeat(MAX_ID_CHARS - 3);
    let keys = (0..MAX_BATCH_KEYS)
        .map(|n| {
            let number = [n / 100 % 10, n / 10 % 10, n % 10].map(|d| DIGITS[d]);
            let user_id = number.iter().collect::<String>() + &filler;
            MappingKey {
                key: Some(mapping_key::Key::UserId(user_id)),
                stripe_account: format!("acct_{}", "a".repeat(MAX_ID_CHARS - 5)),
            }
        })
        .collect();
    BatchGetRequest { keys }
}
