//! SIGTERM, as Kubernetes sends it: health turns NOT_SERVING at once,
//! in-flight RPCs finish (up to the drain timeout), the process exits 0.
//! Also checks the per-RPC log line of the real binary.

use crate::helpers;

use std::time::Duration;

use customer_mapping::proto::LinkRequest;
use helpers::{Backend, TestDatabase, process::ServerProcess};
use sea_orm::Database;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const IN_FLIGHT: usize = 3;

/// The test database's URL with a password in it: PostgreSQL here trusts
/// local connections and ignores it, so the server runs while we check that
/// the password never shows up in its output.
fn with_password(url: &str) -> String {
    let mut url = url::Url::parse(url).expect("a URL");
    url.set_password(Some("s3cret-pw"))
        .expect("a password fits");
    url.to_string()
}

fn spawn_links(
    server: &ServerProcess,
    count: usize,
) -> Vec<
    tokio::task::JoinHandle<
        Result<tonic::Response<customer_mapping::proto::LinkResponse>, tonic::Status>,
    >,
> {
    (0..count)
        .map(|i| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut client = helpers::connect(addr).await;
                let mut request = tonic::Request::new(LinkRequest {
                    user_id: format!("user-{i}"),
                    stripe_customer_id: format!("cus_{i}"),
                    ..Default::default()
                });
                request.metadata_mut().insert(
                    "x-request-id",
                    format!("shutdown-test-{i}").parse().expect("ascii"),
                );
                client.link(request).await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_rpcs_and_exits_zero() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = with_password(&database.url);
    let server = ServerProcess::start(&[
        ("DATABASE_URL", &url),
        ("SHUTDOWN_DRAIN_TIMEOUT", "10s"),
        ("DATABASE_MAX_CONNECTIONS", "4"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        // The Links queued behind the one on the lock stay queued.
        ("DATABASE_STALL_TIMEOUT", "1m"),
    ]);
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    let mut health = HealthClient::new(helpers::channel(server.addr).await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    let first = updates.message().await.expect("Watch").expect("open");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // Slow in-flight calls: one waits on a table lock held by the test, the
    // others are queued behind it to share the next statement.
    let outside = Database::connect(&database.url).await.expect("connect");
    let lock = helpers::pg::lock_table(&outside).await;
    let links = spawn_links(&server, IN_FLIGHT);
    helpers::pg::wait_until_sessions_wait_on_a_lock(&outside, 1).await;
    crate::metrics::wait_until_queued(server.metrics_addr(), "link", IN_FLIGHT - 1).await;

    server.sigterm();

    // Health says NOT_SERVING at once, on the connection already open.
    let update = tokio::time::timeout(Duration::from_secs(5), updates.message())
        .await
        .expect("health changed promptly");
    if let Ok(Some(update)) = update {
        assert_eq!(update.status, ServingStatus::NotServing as i32);
    } else {
        panic!("expected NOT_SERVING before the stream closed, got {update:?}");
    }

    // The in-flight calls complete normally once the database lets them.
    lock.rollback().await.expect("unlock");
    for (i, link) in links.into_iter().enumerate() {
        let response = link
            .await
            .expect("no panic")
            .expect("in-flight Link completes OK");
        assert_eq!(
            response
                .metadata()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            Some(format!("shutdown-test-{i}").as_str()),
        );
        assert!(response.into_inner().created);
    }

    let (status, took, server) = server.exited(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status; output: {:?}",
        server.lines()
    );
    // Done draining as soon as the calls were: the open Watch stream did not
    // keep it waiting for the 10 s drain timeout.
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    assert_eq!(helpers::pg::rows_in_table(&outside).await, IN_FLIGHT as i64);

    // One log line per RPC with method, code, latency and request id.
    let events = server.events();
    for i in 0..IN_FLIGHT {
        let line = events
            .iter()
            .find(|e| e["message"] == "rpc" && e["request_id"] == format!("shutdown-test-{i}"))
            .unwrap_or_else(|| panic!("no rpc log line for request {i}: {events:?}"));
        assert_eq!(line["method"], "Link");
        assert_eq!(line["code"], "OK");
        assert!(
            line["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
            "{line}"
        );
        assert_eq!(line["level"], "INFO");
    }
    let everything = server.lines().join("\n");
    assert!(
        !everything.contains("s3cret-pw"),
        "the password leaked into the logs"
    );
    assert!(
        everything.contains("postgres:***@"),
        "the redacted URL is logged"
    );
    outside.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_still_in_flight_after_the_drain_timeout_are_cut_and_leave_nothing() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = ServerProcess::start(&[
        ("DATABASE_URL", &database.url),
        ("HEALTH_PROBE_INTERVAL", "100ms"),
        ("HEALTH_PROBE_TIMEOUT", "90ms"),
        ("SHUTDOWN_DRAIN_TIMEOUT", "1s"),
    ]);
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;

    let outside = Database::connect(&database.url).await.expect("connect");
    let lock = helpers::pg::lock_table(&outside).await;
    let links = spawn_links(&server, 1);
    helpers::pg::wait_until_sessions_wait_on_a_lock(&outside, 1).await;

    server.sigterm();
    let (status, took, server) = server.exited(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "output: {:?}", server.lines());
    assert!(
        took < Duration::from_secs(5),
        "exited after {took:?} with a 1 s drain timeout"
    );

    for link in links {
        link.await
            .expect("no panic")
            .expect_err("the cut call fails");
    }
    // The cut Link's transaction died with its connection: nothing written.
    lock.rollback().await.expect("unlock");
    assert_eq!(helpers::pg::rows_in_table(&outside).await, 0);
    outside.close().await.expect("close");
}

/// A database that accepts connections and never answers: the server is
/// stuck in a 30 s connection attempt when SIGTERM comes, and must not wait
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hanging_database_connection_exits_promptly() {
    // The kernel completes the handshakes; nobody ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "postgres://postgres@{}/mapping",
        silent.local_addr().expect("addr")
    );
    let server =
        ServerProcess::start(&[("DATABASE_URL", &url), ("DATABASE_CONNECT_TIMEOUT", "30s")]);
    helpers::wait_for_health(server.addr, "", ServingStatus::NotServing).await;

    server.sigterm();
    let (status, took, _) = server.exited(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}
