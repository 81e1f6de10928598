//! What every RPC gets on its way in and out: a request id, one log line,
//! and metrics.

use std::{future::Future, time::Instant};

use tonic::{Code, Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use crate::{proto::SERVICE_NAME, telemetry::metrics};

/// Metadata key of the request id: taken from the caller when it sends a
/// usable one, generated otherwise, and always returned.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest caller-supplied request id we adopt; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Runs `handler` on the request's message, then logs and counts the result
/// and returns the request id in the response (or error) metadata.
pub async fn observe<Req, Res, F, Fut>(
    method: &'static str,
    request: Request<Req>,
    handler: F,
) -> Result<Response<Res>, Status>
where
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    let request_id = request_id(&request);
    let span = tracing::info_span!("rpc", method, request_id = %request_id);
    let started = Instant::now();
    let result = handler(request.into_inner()).instrument(span).await;
    let elapsed = started.elapsed();

    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    tracing::info!(
        method,
        code = metrics::code_name(code),
        latency_ms,
        request_id = %request_id,
        "rpc"
    );
    metrics::record_rpc(SERVICE_NAME, method, code, elapsed.as_secs_f64());

    // Only visible ASCII gets here (see `request_id`), so this can't fail.
    let value = MetadataValue::try_from(request_id.as_str()).ok();
    match result {
        Ok(message) => {
            let mut response = Response::new(message);
            if let Some(value) = value {
                response.metadata_mut().insert(REQUEST_ID, value);
            }
            Ok(response)
        }
        Err(mut status) => {
            if let Some(value) = value {
                status.metadata_mut().insert(REQUEST_ID, value);
            }
            Err(status)
        }
    }
}

/// The caller's request id when it is short, visible ASCII (so it can't
/// forge log lines); a new UUID otherwise.
fn request_id<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}
