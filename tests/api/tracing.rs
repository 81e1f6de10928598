//! Traces: a call that carries W3C trace context (`traceparent`) continues
//! the caller's trace, its database statement has a span of its own, and a
//! statement shared by several Links is linked to each of them. The spans
//! are received by a real OTLP/gRPC receiver (the collector's
//! `TraceService`) on an ephemeral port; without `OTEL_EXPORTER_OTLP_ENDPOINT`
//! nothing is exported and calls work as before.

use std::time::Duration;

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use tokio::sync::mpsc;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    helpers::{self, Backend, TestDatabase, pg, process::ServerProcess},
    metrics::wait_until_queued,
};

/// How long a test waits for spans it expects.
const EXPORTED_WITHIN: Duration = Duration::from_secs(15);

/// The collector's side of OTLP/gRPC: every span received goes to the test.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|resource| resource.scope_spans)
            .flat_map(|scope| scope.spans);
        for span in spans {
            let _ = self.0.send(span);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver on an ephemeral port: its endpoint URL and the spans it gets.
async fn receiver() -> (String, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let addr = listener.local_addr().expect("its address");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (
        format!("http://{addr}"),
        Spans {
            rx,
            seen: Vec::new(),
        },
    )
}

struct Spans {
    rx: mpsc::UnboundedReceiver<Span>,
    seen: Vec<Span>,
}

impl Spans {
    /// Waits (bounded) until a span received so far or next matches.
    async fn wait_for(&mut self, what: &str, wanted: impl Fn(&Span) -> bool) -> Span {
        if let Some(span) = self.seen.iter().find(|s| wanted(s)) {
            return span.clone();
        }
        let deadline = tokio::time::Instant::now() + EXPORTED_WITHIN;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(span)) => {
                    self.seen.push(span.clone());
                    if wanted(&span) {
                        return span;
                    }
                }
                _ => panic!(
                    "no {what} exported within {EXPORTED_WITHIN:?}; received: {:#?}",
                    self.seen
                ),
            }
        }
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A caller's trace context: trace id, its span's id, sampled.
struct Caller {
    trace_id: String,
    span_id: String,
}

impl Caller {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            trace_id: id.clone(),
            span_id: id[..16].to_owned(),
        }
    }

    fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }
}

async fn link_in_trace(
    mut client: helpers::Client,
    caller: &Caller,
    user: &str,
    customer: &str,
) -> customer_mapping::proto::LinkResponse {
    let mut request = tonic::Request::new(customer_mapping::proto::LinkRequest {
        user_id: user.into(),
        stripe_customer_id: customer.into(),
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", caller.traceparent().parse().expect("ASCII"));
    metadata.insert("tracestate", "vendor=opaque".parse().expect("ASCII"));
    metadata.insert(
        "x-request-id",
        format!("req-{user}").parse().expect("ASCII"),
    );
    client.link(request).await.expect("Link").into_inner()
}

/// The RPC's span (kind SERVER) in `caller`'s trace.
async fn rpc_span(spans: &mut Spans, caller: &Caller) -> Span {
    spans
        .wait_for("rpc span in the caller's trace", |span| {
            span.name.starts_with("customermapping.v1.CustomerMapping/")
                && hex(&span.trace_id) == caller.trace_id
        })
        .await
}

async fn traced_postgres_server(database: &TestDatabase, endpoint: Option<&str>) -> ServerProcess {
    // Batches leave the SDK every 50 ms instead of 5 s.
    traced_server(database, endpoint, "50").await
}

async fn traced_server(
    database: &TestDatabase,
    endpoint: Option<&str>,
    batch_delay_ms: &str,
) -> ServerProcess {
    let mut envs = vec![
        ("DATABASE_URL", database.url.as_str()),
        ("DATABASE_MAX_CONNECTIONS", "4"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        ("OTEL_BSP_SCHEDULE_DELAY", batch_delay_ms),
        // The queued Links must wait for the one in flight, however long.
        ("DATABASE_STALL_TIMEOUT", "1m"),
    ];
    if let Some(endpoint) = endpoint {
        envs.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
    }
    let server = ServerProcess::start(&envs);
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    server
}

/// A Link with a `traceparent` is a child of the caller's span, in the
/// caller's trace; its statement's span is the Link's child and linked to
/// it, carries the operation's name and none of the ids; the log line
/// keeps the request id and adds the trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_continues_the_callers_trace_down_to_its_statement() {
    let (endpoint, mut spans) = receiver().await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = traced_postgres_server(&database, Some(&endpoint)).await;
    let client = helpers::connect(server.addr).await;

    let caller = Caller::new();
    let linked = link_in_trace(client, &caller, "user-traced", "cus_Traced").await;
    assert!(linked.created);

    let rpc = rpc_span(&mut spans, &caller).await;
    assert_eq!(hex(&rpc.parent_span_id), caller.span_id, "{rpc:#?}");
    assert_eq!(rpc.trace_state, "vendor=opaque", "{rpc:#?}");
    assert_eq!(rpc.name, "customermapping.v1.CustomerMapping/Link");
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(attribute(&rpc, "method").as_deref(), Some("Link"));
    assert_eq!(
        attribute(&rpc, "request_id").as_deref(),
        Some("req-user-traced")
    );

    let statement = spans
        .wait_for("statement span under the Link", |span| {
            span.name == "db.statement" && span.parent_span_id == rpc.span_id
        })
        .await;
    assert_eq!(statement.trace_id, rpc.trace_id);
    assert_eq!(statement.kind, SpanKind::Client as i32);
    assert_eq!(
        attribute(&statement, "db.operation.name").as_deref(),
        Some("link")
    );
    assert_eq!(
        attribute(&statement, "db.system.name").as_deref(),
        Some("postgresql")
    );
    assert!(
        statement.links.iter().any(|l| l.span_id == rpc.span_id),
        "linked to the call it served: {statement:#?}"
    );
    // Nothing of the request, the SQL or the database's address.
    let attributes = format!("{:?}", statement.attributes);
    for secret in [
        "user-traced",
        "cus_Traced",
        "INSERT",
        "127.0.0.1",
        "postgres://",
    ] {
        assert!(!attributes.contains(secret), "{secret} in {attributes}");
    }

    let line = server.wait_for_event(|e| e["message"] == "rpc" && e["method"] == "Link");
    assert_eq!(line["request_id"], "req-user-traced");
    assert_eq!(line["trace_id"], caller.trace_id.as_str());
}

/// Links queued behind a statement in flight go out as one statement: its
/// one span is linked to every Link it answered, each in its own trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_statement_is_linked_to_every_link_it_served() {
    let (endpoint, mut spans) = receiver().await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = traced_postgres_server(&database, Some(&endpoint)).await;
    let client = helpers::connect(server.addr).await;
    let db = sea_orm::Database::connect(database.url.as_str())
        .await
        .expect("the test connects");

    let lock = pg::lock_table(&db).await;
    let blocker = {
        let client = client.clone();
        tokio::spawn(async move {
            link_in_trace(client, &Caller::new(), "user-first", "cus_first").await
        })
    };
    pg::wait_until_sessions_wait_on_a_lock(&db, 1).await;
    let callers = [Caller::new(), Caller::new(), Caller::new()];
    let queued: Vec<_> = callers
        .iter()
        .enumerate()
        .map(|(i, caller)| {
            let client = client.clone();
            let caller = Caller {
                trace_id: caller.trace_id.clone(),
                span_id: caller.span_id.clone(),
            };
            tokio::spawn(async move {
                link_in_trace(client, &caller, &format!("user-q{i}"), &format!("cus_q{i}")).await
            })
        })
        .collect();
    wait_until_queued(server.metrics_addr(), "link", callers.len()).await;
    lock.rollback().await.expect("unlock");
    assert!(blocker.await.expect("no panic").created);
    for link in futures::future::join_all(queued).await {
        assert!(link.expect("no panic").created);
    }

    let mut rpcs = Vec::new();
    for caller in &callers {
        let rpc = rpc_span(&mut spans, caller).await;
        assert_eq!(hex(&rpc.parent_span_id), caller.span_id);
        rpcs.push(rpc);
    }
    let shared = spans
        .wait_for("shared statement span", |span| {
            span.name == "db.statement"
                && rpcs
                    .iter()
                    .all(|rpc| span.links.iter().any(|l| l.span_id == rpc.span_id))
        })
        .await;
    assert_eq!(attribute(&shared, "db.calls").as_deref(), Some("3"));
    assert!(
        rpcs.iter()
            .any(|rpc| rpc.span_id == shared.parent_span_id && rpc.trace_id == shared.trace_id),
        "a child of one of the calls it served: {shared:#?}"
    );
    for (rpc, link) in rpcs.iter().zip(&callers) {
        let to_it = shared
            .links
            .iter()
            .find(|l| l.span_id == rpc.span_id)
            .expect("linked");
        assert_eq!(
            hex(&to_it.trace_id),
            link.trace_id,
            "each link in its call's trace"
        );
    }
}

/// Without `OTEL_EXPORTER_OTLP_ENDPOINT` nothing is exported (a receiver
/// listening gets nothing), calls work, and the log line still names the
/// caller's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    let (_endpoint, mut spans) = receiver().await;
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = traced_postgres_server(&database, None).await;
    let mut client = helpers::connect(server.addr).await;

    let caller = Caller::new();
    assert!(
        link_in_trace(client.clone(), &caller, "user-untraced", "cus_Untraced")
            .await
            .created
    );
    helpers::get(
        &mut client,
        customer_mapping::proto::get_request::Key::UserId("user-untraced".into()),
    )
    .await
    .expect("Get");

    let line = server.wait_for_event(|e| e["message"] == "rpc" && e["method"] == "Link");
    assert_eq!(line["request_id"], "req-user-untraced");
    assert_eq!(line["trace_id"], caller.trace_id.as_str());
    let serving =
        server.wait_for_event(|e| e["message"] == "serving customermapping.v1.CustomerMapping");
    assert_eq!(serving["traces"], "off");
    // With export on, OTEL_BSP_SCHEDULE_DELAY (50 ms) would have sent the
    // spans long before this.
    let nothing = tokio::time::timeout(Duration::from_secs(1), spans.rx.recv()).await;
    assert!(
        nothing.is_err(),
        "exported without an endpoint: {nothing:?}"
    );
}

/// Spans still batched at SIGTERM are sent before the process exits; a
/// collector that accepts connections and never answers holds up the exit
/// by the flush's bound (2 s), not by the exporter's 10 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_flushed_at_exit_within_a_bound() {
    let database = TestDatabase::create(Backend::Sqlite).await;

    let (endpoint, mut spans) = receiver().await;
    // Ten minutes between batches: only the flush at exit sends them.
    let server = traced_server(&database, Some(&endpoint), "600000").await;
    let caller = Caller::new();
    link_in_trace(
        helpers::connect(server.addr).await,
        &caller,
        "user-flushed",
        "cus_Flushed",
    )
    .await;
    server.sigterm();
    let (status, _, _server) = server.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    let rpc = rpc_span(&mut spans, &caller).await;
    assert_eq!(hex(&rpc.parent_span_id), caller.span_id);

    // Accepted by the kernel's backlog, never read: an export waits forever.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let endpoint = format!("http://{}", silent.local_addr().expect("its address"));
    let server = traced_server(&database, Some(&endpoint), "600000").await;
    link_in_trace(
        helpers::connect(server.addr).await,
        &Caller::new(),
        "user-stuck",
        "cus_Stuck",
    )
    .await;
    server.sigterm();
    let (status, took, _server) = server.exited(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

/// Not a check: the receiver for the benchmark's export-on run
/// (docs/PERFORMANCE.md), on `OTLP_RECEIVER_ADDR` (default
/// 127.0.0.1:4317), counting the spans it receives for
/// `OTLP_RECEIVER_SECONDS` (default 600).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "a receiver for benchmarks, run by hand"]
async fn otlp_receiver_for_benchmarks() {
    let addr = std::env::var("OTLP_RECEIVER_ADDR").unwrap_or_else(|_| "127.0.0.1:4317".into());
    let seconds: u64 = std::env::var("OTLP_RECEIVER_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .expect("the receiver's port is free");
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    eprintln!("receiving OTLP/gRPC spans on {addr} for {seconds} s");
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut received = 0u64;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.recv()).await {
        received += 1;
        if received.is_multiple_of(100_000) {
            eprintln!("{received} spans received");
        }
    }
    eprintln!("{received} spans received in all");
}
