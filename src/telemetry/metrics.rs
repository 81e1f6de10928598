//! Prometheus metrics, served as text on their own HTTP port (`/metrics`).
//!
//! Recording goes through the `metrics` facade: with no exporter installed
//! (the default) every record call is a no-op.

use std::{convert::Infallible, sync::OnceLock};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// RPCs handled, by `grpc_service`, `grpc_method` and `grpc_code`.
pub const RPC_HANDLED: &str = "grpc_server_handled_total";
/// RPC latency in seconds, by `grpc_service` and `grpc_method`.
pub const RPC_DURATION: &str = "grpc_server_handling_seconds";
/// Database pool connections, by `state` (`in_use`, `idle`).
pub const DB_POOL_CONNECTIONS: &str = "customer_mapping_db_pool_connections";
/// Calls waiting for a shared database statement, by `op` (a gauge).
pub const QUEUED_CALLS: &str = "customer_mapping_db_queued_calls";
/// Calls answered per statement sent, by `op` (a summary: its `_count` is
/// the statements, its `_sum` the calls).
pub const CALLS_PER_STATEMENT: &str = "customer_mapping_db_calls_per_statement";
/// 1 while health reports SERVING, 0 otherwise.
pub const SERVING: &str = "customer_mapping_serving";
/// Connections closed before serving anything, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "customer_mapping_connections_refused_total";
/// Requests refused before reaching a handler (too large), by `reason`.
pub const REQUESTS_REFUSED: &str = "customer_mapping_requests_refused_total";
/// Watch streams open now.
pub const WATCHERS: &str = "customer_mapping_watchers";
/// Seconds from a change to its delivery by a Watch stream, per event
/// (a histogram; a stream replaying old events records their age).
pub const WATCH_DELIVERY_LAG: &str = "customer_mapping_watch_delivery_lag_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls share it) and
/// returns the handle that renders it.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(RPC_DURATION.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(WATCH_DELIVERY_LAG.into()), LAG_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    // Losing this race to another thread is fine: use the winner's handle.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle);
        describe();
    }
    HANDLE
        .get()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("another metrics recorder is already installed"))
}

fn describe() {
    metrics::describe_counter!(RPC_HANDLED, "RPCs handled, by method and gRPC status code.");
    metrics::describe_histogram!(
        RPC_DURATION,
        metrics::Unit::Seconds,
        "Time to handle an RPC, by method."
    );
    metrics::describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database pool connections, by state (in_use, idle)."
    );
    metrics::describe_gauge!(
        QUEUED_CALLS,
        "Calls waiting to share the next database statement, by op (link, get_by_user, get_by_customer)."
    );
    metrics::describe_histogram!(
        CALLS_PER_STATEMENT,
        "Calls answered per database statement sent, by op: _count is statements, _sum calls."
    );
    metrics::describe_gauge!(SERVING, "1 while gRPC health reports SERVING, else 0.");
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed before serving anything, by reason."
    );
    metrics::describe_gauge!(WATCHERS, "Watch streams open now.");
    metrics::describe_histogram!(
        WATCH_DELIVERY_LAG,
        metrics::Unit::Seconds,
        "Time from a change to its delivery by a Watch stream, per event."
    );
    metrics::describe_counter!(
        REQUESTS_REFUSED,
        "Requests refused before reaching a handler, by reason."
    );
}

pub fn record_connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

pub fn record_request_refused(reason: &'static str) {
    metrics::counter!(REQUESTS_REFUSED, "reason" => reason).increment(1);
}

pub fn record_rpc(service: &'static str, method: &'static str, code: tonic::Code, seconds: f64) {
    metrics::counter!(
        RPC_HANDLED,
        "grpc_service" => service,
        "grpc_method" => method,
        "grpc_code" => code_name(code),
    )
    .increment(1);
    metrics::histogram!(RPC_DURATION, "grpc_service" => service, "grpc_method" => method)
        .record(seconds);
}

/// Open and idle connections of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    pub open: u32,
    pub idle: u32,
}

pub fn record_pool(stats: PoolStats) {
    let in_use = stats.open.saturating_sub(stats.idle);
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
    metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(stats.idle));
}

pub fn record_watchers(change: f64) {
    metrics::gauge!(WATCHERS).increment(change);
}

/// Records the delivery lag of events made at `times`.
pub fn record_watch_delivery(times: impl Iterator<Item = chrono::DateTime<chrono::Utc>>) {
    let now = chrono::Utc::now();
    let lag = metrics::histogram!(WATCH_DELIVERY_LAG);
    for time in times {
        let seconds = (now - time).num_microseconds().unwrap_or(i64::MAX);
        // A clock stepped back shows as no lag, not as a negative one.
        lag.record(seconds.max(0) as f64 / 1e6);
    }
}

pub fn record_serving(serving: bool) {
    metrics::gauge!(SERVING).set(if serving { 1.0 } else { 0.0 });
}

/// gRPC code names as the other gRPC ecosystems label them (`OK`,
/// `InvalidArgument`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics listener cannot accept");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(respond(&request, &handle)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond<B>(request: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() == "/metrics" {
        handle.run_upkeep();
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
