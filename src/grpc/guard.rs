//! The guard in front of every RPC: the caller's authorization, load
//! shedding and the deadline the handler runs under.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use tokio::sync::Semaphore;
use tonic::{Request, Status};

use super::status;
use crate::{
    auth::{AuthError, Authorizer, Caller, Credentials, Rpc},
    mapping::Actor,
    telemetry::metrics,
};

/// How much earlier than the caller's deadline the server gives up itself.
const DEADLINE_MARGIN: Duration = Duration::from_millis(5);

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
    pub(super) async fn run<Req, Res, Fut>(
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
            crate::mappings::with_deadline(due, handler(request.into_inner(), actor)),
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
pub(super) enum CallerLabel {
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
