//! Watch's gRPC side: the request to a starting point, positions to
//! cursors and back, and the response stream, which ends with UNAVAILABLE
//! as soon as the server begins to shut down, however far behind its
//! reader is, so that no stream holds up the drain.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::{Code, Status};

use super::{
    observe::{CallRecord, RecordedStream},
    page_token::{self, Paged},
};
use crate::{
    mapping::{Actor, Error, FieldViolation},
    mappings::{Delivery, Start},
    proto::{WatchRequest, WatchResponse},
    store::FeedPosition,
    telemetry::metrics,
};

/// Where a Watch starts: its `after` cursor, made by this deployment's
/// Watch, or the present, or the beginning.
pub(super) fn watch_start(request: &WatchRequest, deployment: &str) -> Result<Start, Error> {
    let refuse = |description: &str| {
        Error::InvalidArgument(vec![FieldViolation {
            field: "after".into(),
            description: description.into(),
        }])
    };
    if request.after.is_empty() {
        return Ok(if request.from_beginning {
            Start::Beginning
        } else {
            Start::Now
        });
    }
    if request.from_beginning {
        return Err(refuse(
            "set either after (resume) or from_beginning (replay), not both",
        ));
    }
    page_token::decode(Paged::Watch, &request.after, deployment.as_bytes())
        .and_then(|bytes| FeedPosition::from_bytes(&bytes))
        .map(Start::After)
        .ok_or_else(|| {
            refuse("not a cursor this deployment's Watch handed out; watch from the present after listing again")
        })
}

/// The cursor of `position`, valid only with `deployment`'s database.
fn cursor(position: &FeedPosition, deployment: &str) -> String {
    page_token::encode(Paged::Watch, &position.to_bytes(), deployment.as_bytes())
}

/// The responses of one Watch. The call is logged and counted when it
/// ends, however it ends, with the events it sent.
pub struct WatchStream {
    deliveries: mpsc::Receiver<Result<Delivery, Error>>,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    deployment: String,
    actor: Actor,
    record: Option<CallRecord>,
    events: usize,
    /// How the stream ended; `None` while it goes on (or when the caller
    /// went away first).
    ended: Option<Code>,
}

impl WatchStream {
    pub(super) fn new(
        deliveries: mpsc::Receiver<Result<Delivery, Error>>,
        stopping: WaitForCancellationFutureOwned,
        deployment: String,
        actor: Actor,
    ) -> Self {
        metrics::record_watchers(1.0);
        Self {
            deliveries,
            stopping: Box::pin(stopping),
            deployment,
            actor,
            record: None,
            events: 0,
            ended: None,
        }
    }

    fn end(&mut self, status: Status) -> Poll<Option<Result<WatchResponse, Status>>> {
        self.ended = Some(status.code());
        Poll::Ready(Some(Err(status)))
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended.is_some() {
            return Poll::Ready(None);
        }
        if self.stopping.as_mut().poll(cx).is_ready() {
            return self.end(Error::ShuttingDown.into());
        }
        match ready!(self.deliveries.poll_recv(cx)) {
            Some(Ok(delivery)) => {
                self.events += delivery.events.len();
                metrics::record_watch_delivery(delivery.events.iter().map(|e| e.time));
                Poll::Ready(Some(Ok(WatchResponse {
                    cursor: cursor(&delivery.position, &self.deployment),
                    events: delivery.events.into_iter().map(Into::into).collect(),
                })))
            }
            Some(Err(err)) => self.end(err.into()),
            // The watcher ended without saying why: a bug, not the caller's.
            None => self.end(Status::internal("internal error")),
        }
    }
}

impl RecordedStream for WatchStream {
    fn keep(&mut self, record: CallRecord) {
        self.record = Some(record);
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        metrics::record_watchers(-1.0);
        if let Some(record) = self.record.take() {
            // No status sent: the caller went away first.
            let code = self.ended.unwrap_or(Code::Cancelled);
            record.finish(code, &self.actor.caller, Some(self.events));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_taken_back_only_by_its_own_deployment() {
        let position = FeedPosition::Sequence(42);
        let token = cursor(&position, "d1");
        let request = |after: &str, from_beginning| WatchRequest {
            after: after.into(),
            from_beginning,
        };
        assert!(matches!(
            watch_start(&request(&token, false), "d1"),
            Ok(Start::After(p)) if p == position
        ));
        for (after, from_beginning, deployment) in [
            (token.as_str(), false, "d2"),
            (token.as_str(), true, "d1"),
            ("00", false, "d1"),
            ("not hex", false, "d1"),
        ] {
            assert!(
                matches!(
                    watch_start(&request(after, from_beginning), deployment),
                    Err(Error::InvalidArgument(v)) if v[0].field == "after"
                ),
                "{after} {from_beginning} {deployment}"
            );
        }
        assert!(matches!(
            watch_start(&request("", false), "d1"),
            Ok(Start::Now)
        ));
        assert!(matches!(
            watch_start(&request("", true), "d1"),
            Ok(Start::Beginning)
        ));
    }
}
