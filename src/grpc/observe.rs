//! What every RPC gets on its way in and out, around the guard: a request
//! id, one log line naming the caller, and metrics, however the call ends.

use std::{fmt, future::Future, time::Duration, time::Instant};

use opentelemetry::trace::TraceId;
use tonic::{Code, Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use super::guard::Guard;
use crate::{
    auth::Rpc,
    mapping::Actor,
    proto::SERVICE_NAME,
    telemetry::{metrics, traces},
};

/// Metadata key of the request id: taken from the caller when it sends a
/// usable one, generated otherwise, and always returned.
pub const REQUEST_ID: &str = "x-request-id";

/// Longest caller-supplied request id we adopt; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Runs `handler` on the request's message and who sent it (the caller and
/// the request id, for the audit trail) if the guard lets it, then logs
/// and counts the result and returns the request id in the response (or
/// error) metadata.
pub async fn observe<Req, Res, F, Fut>(
    guard: &Guard,
    rpc: Rpc,
    request: Request<Req>,
    handler: F,
) -> Result<Response<Res>, Status>
where
    F: FnOnce(Req, Actor) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    observe_with(guard, rpc, request, handler, |_, record, caller| {
        record.finish(Code::Ok, caller, None);
    })
    .await
}

/// A call whose answer is a stream: its log line and count come when the
/// stream ends, with how it ended, so the stream keeps the call's record.
pub trait RecordedStream {
    fn keep(&mut self, record: CallRecord);
}

/// [`observe`] for a call answered by a stream: an error is logged and
/// counted at once, a stream when it ends.
pub async fn observe_stream<Req, S, F, Fut>(
    guard: &Guard,
    rpc: Rpc,
    request: Request<Req>,
    handler: F,
) -> Result<Response<S>, Status>
where
    F: FnOnce(Req, Actor) -> Fut,
    Fut: Future<Output = Result<S, Status>>,
    S: RecordedStream,
{
    observe_with(guard, rpc, request, handler, |stream, record, _| {
        stream.keep(record);
    })
    .await
}

async fn observe_with<Req, Res, F, Fut>(
    guard: &Guard,
    rpc: Rpc,
    request: Request<Req>,
    handler: F,
    answered: impl FnOnce(&mut Res, CallRecord, &dyn fmt::Display),
) -> Result<Response<Res>, Status>
where
    F: FnOnce(Req, Actor) -> Fut,
    Fut: Future<Output = Result<Res, Status>>,
{
    let method = rpc.name();
    let request_id = request_id(&request);
    let deadline = caller_deadline(&request);
    // `otel.*` are recorded only when traces are exported (see
    // `continue_callers_trace`): formatting them for every call's log
    // context would be paid with export off too.
    let span = tracing::info_span!(
        "rpc",
        otel.name = tracing::field::Empty,
        otel.kind = tracing::field::Empty,
        method,
        request_id = %request_id,
    );
    // The one place every call's span is made: here it joins the caller's
    // trace (W3C `traceparent`, `tracestate`).
    let trace_id =
        traces::continue_callers_trace(&span, SERVICE_NAME, method, request.metadata().as_ref());
    let record = CallRecord {
        method,
        request_id: Some(request_id.clone()),
        trace_id,
        deadline,
        started: Instant::now(),
    };
    let (caller, result) = guard
        .run(rpc, request, &request_id, deadline, handler)
        .instrument(span)
        .await;

    // Only visible ASCII gets here (see `request_id`), so this can't fail.
    let value = MetadataValue::try_from(request_id.as_str()).ok();
    match result {
        Ok(mut message) => {
            answered(&mut message, record, &caller);
            let mut response = Response::new(message);
            if let Some(value) = value {
                response.metadata_mut().insert(REQUEST_ID, value);
            }
            Ok(response)
        }
        Err(mut status) => {
            record.finish(status.code(), &caller, None);
            if let Some(value) = value {
                status.metadata_mut().insert(REQUEST_ID, value);
            }
            Err(status)
        }
    }
}

/// The log line and the count of one call, made exactly once: by
/// [`CallRecord::finish`] when the handler returns, or on drop when the
/// call's future is dropped first. tonic drops it when the caller's
/// deadline passes (tonic's own timer, which started a moment before ours),
/// when the caller cancels (RST_STREAM) and when the connection goes away;
/// without this those calls left no trace at all.
pub struct CallRecord {
    method: &'static str,
    /// Taken by `finish`; still here on drop when the call was cut off.
    request_id: Option<String>,
    /// The trace the call belongs to, when it has one (see
    /// `traces::continue_callers_trace`).
    trace_id: Option<TraceId>,
    deadline: Option<Duration>,
    started: Instant,
}

/// How close to its deadline a dropped call counts as having reached it.
/// tonic starts its timer when the request arrives, a little before this
/// module sees it, so at the drop our clock reads slightly less than the
/// deadline; a caller cancelling this close to its deadline is, for an
/// operator, a deadline too.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

impl CallRecord {
    /// Logs and counts the call as ended with `code`, having sent
    /// `events` (a stream's).
    pub fn finish(mut self, code: Code, caller: &dyn fmt::Display, events: Option<usize>) {
        let request_id = self.request_id.take().unwrap_or_default();
        log_and_count(
            self.method,
            code,
            self.started,
            &request_id,
            self.trace_id,
            caller,
            events,
        );
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let Some(request_id) = self.request_id.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        let code = match self.deadline {
            Some(deadline) if elapsed + DEADLINE_SLACK >= deadline => Code::DeadlineExceeded,
            _ => Code::Cancelled,
        };
        log_and_count(
            self.method,
            code,
            self.started,
            &request_id,
            self.trace_id,
            &"unknown",
            None,
        );
    }
}

fn log_and_count(
    method: &'static str,
    code: Code,
    started: Instant,
    request_id: &str,
    trace_id: Option<TraceId>,
    caller: &dyn fmt::Display,
    events: Option<usize>,
) {
    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    tracing::info!(
        method,
        code = metrics::code_name(code),
        latency_ms,
        request_id = %request_id,
        trace_id = trace_id.map(traces::hex),
        caller = %caller,
        events,
        "rpc"
    );
    metrics::record_rpc(SERVICE_NAME, method, code, elapsed.as_secs_f64());
}

/// The caller's deadline (`grpc-timeout`), if it sent one that parses.
fn caller_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    // At most 8 digits, then a unit (the gRPC over HTTP/2 spec).
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().expect("ascii"));
        request
    }

    #[test]
    fn caller_deadline_reads_every_grpc_timeout_unit() {
        for (value, expected) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("1500m", Duration::from_millis(1500)),
            ("250u", Duration::from_micros(250)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(
                caller_deadline(&with_timeout(value)),
                Some(expected),
                "{value}"
            );
        }
    }

    #[test]
    fn caller_deadline_ignores_what_the_spec_does_not_allow() {
        for value in ["", "5", "m", "5x", "123456789S", "-5S", "1.5S"] {
            assert_eq!(caller_deadline(&with_timeout(value)), None, "{value:?}");
        }
        assert_eq!(caller_deadline(&Request::new(())), None);
    }
}
