//! Turns tonic's answer to an over-size request into the code gRPC itself
//! uses for it.
//!
//! tonic refuses a request message above `max_decoding_message_size` as soon
//! as it reads the 5-byte length prefix, before buffering the body or
//! calling a handler, but says OUT_OF_RANGE, which callers won't expect and
//! retry policies don't know. Our handlers never return OUT_OF_RANGE, so on
//! the services behind this layer it can only mean that refusal.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::Code;
use tower::{Layer, Service};

use super::status;
use crate::telemetry::metrics;

#[derive(Debug, Clone, Copy)]
pub struct RequestSizeLayer {
    pub limit: usize,
}

impl<S> Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestSize {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestSize<S> {
    inner: S,
    limit: usize,
}

const OUT_OF_RANGE: &[u8] = b"11";

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RequestSize<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let limit = self.limit;
        // Cheap: the URI's parts are reference-counted.
        let uri = request.uri().clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A unary refusal is "trailers-only": the status is in the headers.
            let refused = response
                .headers()
                .get("grpc-status")
                .is_some_and(|code| code.as_bytes() == OUT_OF_RANGE);
            if refused {
                metrics::record_request_refused("too_large");
                tracing::warn!(
                    path = uri.path(),
                    limit_bytes = limit,
                    code = metrics::code_name(Code::ResourceExhausted),
                    "request refused: message too large"
                );
                let status = status::request_too_large(limit);
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                if status.add_header(headers).is_err() {
                    tracing::error!("cannot encode the too-large status");
                }
            }
            Ok(response)
        })
    }
}
