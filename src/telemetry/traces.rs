//! Traces: W3C trace context in, OTLP/gRPC out.
//!
//! Every RPC's span (`grpc/observe.rs`) continues the caller's trace when
//! it sends `traceparent` (and `tracestate`), and every database statement
//! gets a span of its own ([`statement_span`]). They are exported only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set: otherwise no layer is installed, no
//! exporter exists, and the only work left is reading the caller's trace id
//! for the log line.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The service's name in traces, unless `OTEL_SERVICE_NAME` says otherwise.
const SERVICE_NAME: &str = "customer-mapping";

/// How long exit waits for the last spans to be sent: a collector that
/// does not answer must not hold up a shutdown that Kubernetes bounds.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(2);

/// Whether spans are exported: set once, at start.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Exports spans to the OTLP/gRPC collector at `endpoint`: the layer to
/// install, and the guard that flushes it at exit.
///
/// The exporter's channel connects lazily and its batches go out from the
/// SDK's own thread, so a collector that is down costs failed exports,
/// never a failed start or a blocked call. Must run inside the runtime
/// (tonic's channel spawns its worker there).
pub fn exporter<S>(
    endpoint: &url::Url,
) -> anyhow::Result<(
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    TracesGuard,
)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.as_str())
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|name| name.is_empty()) {
        resource = resource.with_service_name(SERVICE_NAME);
    }
    // The sampler is the SDK's default (parent-based, always on for a new
    // trace), or OTEL_TRACES_SAMPLER: a caller that did not sample its
    // trace gets none of ours either.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer(SERVICE_NAME);
    EXPORTING.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Events are log lines, which go to the log; spans carry timing.
        .with_location(false)
        .with_threads(false);
    Ok((layer, TracesGuard { provider }))
}

/// Keep until exit: dropping it sends the spans still batched, within
/// [`FLUSH_ON_EXIT`].
#[must_use = "dropping the guard stops exporting traces"]
pub struct TracesGuard {
    provider: SdkTracerProvider,
}

impl Drop for TracesGuard {
    fn drop(&mut self) {
        // The SDK's shutdown blocks its caller until the exporter answers or
        // its own timeout passes; on a thread of its own, exit waits for it
        // no longer than FLUSH_ON_EXIT whatever happens inside.
        let provider = self.provider.clone();
        let (done, finished) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("traces-flush".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(FLUSH_ON_EXIT);
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = finished.recv_timeout(FLUSH_ON_EXIT + Duration::from_millis(200));
        }
    }
}

/// Reads W3C trace context from gRPC metadata (HTTP/2 headers).
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

/// Makes `span` (a call's) a child of the caller's span when the caller
/// sent a valid `traceparent`, and returns the trace the call belongs to,
/// for its log line: ours when exporting (a new one if the caller sent
/// none), else the caller's. A malformed `traceparent` is ignored, as the
/// W3C spec asks: the call goes on in a new trace.
pub fn continue_callers_trace(
    span: &Span,
    service: &str,
    method: &str,
    headers: &http::HeaderMap,
) -> Option<TraceId> {
    let caller = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .filter(|value| well_formed(value))
        .map(|_| propagator().extract(&Headers(headers)))
        .filter(|cx| cx.span().span_context().is_valid());
    if !EXPORTING.load(Ordering::Relaxed) {
        return caller.map(|cx| cx.span().span_context().trace_id());
    }
    // Named as OpenTelemetry names a gRPC server span: service/method.
    span.record(
        "otel.name",
        tracing::field::display(format_args!("{service}/{method}")),
    );
    span.record("otel.kind", "server");
    if let Some(cx) = caller {
        // Only fails when the span is disabled (filtered out): then there
        // is nothing to parent.
        let _ = span.set_parent(cx);
    }
    let ours = span.context().span().span_context().trace_id();
    (ours != TraceId::INVALID).then_some(ours)
}

/// Whether `traceparent`'s fields have the lengths W3C Trace Context
/// gives them: the SDK's parser reads hex of any length, so a truncated
/// trace id would otherwise become another trace.
fn well_formed(traceparent: &str) -> bool {
    let fields: Vec<&str> = traceparent.split('-').collect();
    let lengths_ok = fields.len() >= 4
        && fields
            .iter()
            .zip([2, 32, 16, 2])
            .all(|(field, len)| field.len() == len);
    // Version 00 has exactly these four; later versions may append more.
    lengths_ok && (fields[0] != "00" || fields.len() == 4)
}

/// The span to link a statement to: the current call's, when spans are
/// exported (none otherwise: nothing would read it).
pub fn call_span() -> Span {
    if EXPORTING.load(Ordering::Relaxed) {
        Span::current()
    } else {
        Span::none()
    }
}

/// The span of one database statement, `operation` its name (never its
/// SQL, which would carry the callers' ids), a child of the current call.
/// Made only when spans are exported: a span per statement costs
/// allocation and formatting that nothing else reads.
pub fn statement_span(operation: &'static str, system: &'static str) -> Span {
    if !EXPORTING.load(Ordering::Relaxed) {
        return Span::none();
    }
    tracing::info_span!(
        "db.statement",
        otel.kind = "client",
        db.system.name = system,
        db.operation.name = operation,
    )
}

/// The span of one statement shared by `calls` (each a call's span): a
/// child of the first, linked (`follows_from`, an OpenTelemetry span link)
/// to every one of them, so each call's trace leads to the statement that
/// answered it.
pub fn shared_statement_span<'a>(
    operation: &'static str,
    calls: impl ExactSizeIterator<Item = &'a Span> + Clone,
) -> Span {
    if !EXPORTING.load(Ordering::Relaxed) {
        return Span::none();
    }
    let count = calls.len();
    let parent = calls.clone().next().and_then(Span::id);
    let span = tracing::info_span!(
        parent: parent,
        "db.statement",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = operation,
        db.calls = count,
    );
    for call in calls {
        span.follows_from(call);
    }
    span
}

/// The trace id as logs and trace UIs write it: 32 lowercase hex digits.
pub fn hex(trace_id: TraceId) -> String {
    format!("{trace_id:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", traceparent.parse().expect("ascii"));
        headers
    }

    #[test]
    fn the_callers_trace_id_is_read_without_an_exporter() {
        let span = Span::none();
        let id = continue_callers_trace(
            &span,
            "s",
            "m",
            &headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(
            id.map(hex).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn a_malformed_or_missing_traceparent_is_no_trace() {
        let span = Span::none();
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0f067aa0ba902b7-01",
        ] {
            assert_eq!(
                continue_callers_trace(&span, "s", "m", &headers(bad)),
                None,
                "{bad:?}"
            );
        }
        assert_eq!(
            continue_callers_trace(&span, "s", "m", &http::HeaderMap::new()),
            None
        );
    }
}
