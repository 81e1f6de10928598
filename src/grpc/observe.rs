//! What every RPC gets on its way in and out: a request id, the caller's
//! authorization, load shedding, the server's deadline, one log line naming
//! the caller, and metrics.

use std::{fmt, future::Future, sync::Arc, time::Duration, time::Instant};

use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use super::status;
use crate::{
    auth::{AuthError, Authorizer, Caller, Credentials, Rpc},
    mapping::Actor,
    proto::SERVICE_NAME,
    telemetry::metrics,
};

/// What the RPCs of the service share: who may call, how many may be in
/// progress, and how long one may take.
#[derive(Debug, Clone)]
pub struct Guard {
    authorizer: Authorizer,
    in_progress: Arc<Semaphore>,
    default_deadline: Duration,
}

impl Guard {
    pub fn new(authorizer: Authorizer, max_in_progress: usize, default_deadline: Duration) -> Self {
        Self {
            authorizer,
            in_progress: Arc::new(Semaphore::new(max_in_progress)),
            default_deadline,
        }
    }

    /// Authorizes, sheds or runs `handler` under the deadline. Returns how
    /// to name the caller in the log, and the result.
    async fn run<Req, Res, Fut>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        request_id: &str,
        deadline: Option<Duration>,
        handler: impl FnOnce(Req, Actor) -> Fut,
    ) -> (CallerLabel, Result<Res, Status>)
    where
        Fut: Future<Output = Result<Res, Status>>,
    {
        let caller = match with_credentials(&request, |c| self.authorizer.authorize(c, rpc)) {
            Ok(caller) => CallerLabel::Known(caller),
            Err(err) => return (denied_caller(&err), Err(err.into())),
        };
        // Shed rather than queue: a caller told UNAVAILABLE at once can back
        // off or go elsewhere; one left waiting only adds to the overload.
        let Ok(_permit) = self.in_progress.try_acquire() else {
            return (caller, Err(status::overloaded()));
        };
        // tonic also enforces the caller's deadline (answering CANCELLED);
        // this bounds calls from callers that set none, and tells the
        // domain when the answer is due, so that its database work is
        // bounded by it too.
        let timeout = match deadline {
            // Answered a moment before the caller's deadline, so that the
            // caller hears DEADLINE_EXCEEDED from us rather than tonic's
            // CANCELLED ("Timeout expired"), whose timer started when the
            // request arrived, a little before this.
            Some(deadline) => deadline
                .saturating_sub(DEADLINE_MARGIN.min(deadline / 10))
                .min(self.default_deadline),
            None => self.default_deadline,
        };
        let due = tokio::time::Instant::now() + timeout;
        // The audit trail names the caller as the log line does.
        let actor = Actor::new(caller.to_string(), request_id.to_owned());
        let result = tokio::time::timeout_at(
            due,
            crate::mapping::with_deadline(due, handler(request.into_inner(), actor)),
        )
        .await
        .unwrap_or_else(|_| Err(status::deadline_exceeded()));
        (caller, result)
    }
}

/// Checks server reflection callers against the policy: under a policy,
/// only callers it knows may read the schema.
pub fn reflection_interceptor(
    authorizer: Authorizer,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request| match with_credentials(&request, |c| {
        authorizer.authenticate(c, "ServerReflectionInfo")
    }) {
        Ok(_) => Ok(request),
        Err(err) => {
            tracing::info!(
                method = "ServerReflectionInfo",
                caller = %denied_caller(&err),
                code = metrics::code_name(Status::from(err.clone()).code()),
                "rpc refused"
            );
            Err(err.into())
        }
    }
}

/// Calls `check` with what the request presented: the verified client
/// certificate (mutual TLS) and the `authorization` metadata.
fn with_credentials<T, R>(request: &Request<T>, check: impl FnOnce(Credentials<'_>) -> R) -> R {
    let certificates = request.peer_certs();
    check(Credentials {
        certificate: certificates.as_ref().and_then(|chain| chain.first()),
        authorization: request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes()),
    })
}

/// How the log line names the caller.
enum CallerLabel {
    Known(Caller),
    Unauthenticated,
}

impl fmt::Display for CallerLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallerLabel::Known(caller) => caller.fmt(f),
            CallerLabel::Unauthenticated => f.write_str("unauthenticated"),
        }
    }
}

fn denied_caller(err: &AuthError) -> CallerLabel {
    match err {
        AuthError::Unauthenticated(_) => CallerLabel::Unauthenticated,
        AuthError::PermissionDenied { caller, .. } => CallerLabel::Known(caller.clone()),
    }
}

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
    let method = rpc.name();
    let request_id = request_id(&request);
    let deadline = caller_deadline(&request);
    let span = tracing::info_span!("rpc", method, request_id = %request_id);
    let mut record = CallRecord {
        method,
        request_id: Some(request_id.clone()),
        deadline,
        started: Instant::now(),
    };
    let (caller, result) = guard
        .run(rpc, request, &request_id, deadline, handler)
        .instrument(span)
        .await;
    let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
    let request_id = record.finish(code, &caller);

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

/// The log line and the count of one call, made exactly once: by
/// [`CallRecord::finish`] when the handler returns, or on drop when the
/// call's future is dropped first. tonic drops it when the caller's
/// deadline passes (tonic's own timer, which started a moment before ours),
/// when the caller cancels (RST_STREAM) and when the connection goes away;
/// without this those calls left no trace at all.
struct CallRecord {
    method: &'static str,
    /// Taken by `finish`; still here on drop when the call was cut off.
    request_id: Option<String>,
    deadline: Option<Duration>,
    started: Instant,
}

/// How much earlier than the caller's deadline the server gives up itself.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

/// How close to its deadline a dropped call counts as having reached it.
/// tonic starts its timer when the request arrives, a little before this
/// module sees it, so at the drop our clock reads slightly less than the
/// deadline; a caller cancelling this close to its deadline is, for an
/// operator, a deadline too.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

impl CallRecord {
    fn finish(&mut self, code: Code, caller: &dyn fmt::Display) -> String {
        let request_id = self.request_id.take().unwrap_or_default();
        log_and_count(self.method, code, self.started, &request_id, caller);
        request_id
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
        log_and_count(self.method, code, self.started, &request_id, &"unknown");
    }
}

fn log_and_count(
    method: &'static str,
    code: Code,
    started: Instant,
    request_id: &str,
    caller: &dyn fmt::Display,
) {
    let elapsed = started.elapsed();
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    tracing::info!(
        method,
        code = metrics::code_name(code),
        latency_ms,
        request_id = %request_id,
        caller = %caller,
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
