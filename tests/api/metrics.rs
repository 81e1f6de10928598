//! Prometheus metrics on their own port. The recorder is process-wide, so
//! the counts are read from the built binary in a process of its own: calls
//! made by the other tests in this binary would change them otherwise.

use crate::helpers;

use std::net::SocketAddr;

use helpers::{Backend, TestDatabase, process::ServerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;

pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

/// The value of the sample of `name` whose labels include all of `labels`.
pub(crate) fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits (polling the server's gauge, bounded) until `n` calls of `op`
/// queue to share the next database statement.
pub(crate) async fn wait_until_queued(metrics: SocketAddr, op: &str, n: usize) {
    let label = format!("op=\"{op}\"");
    let mut body = String::new();
    for _ in 0..1000 {
        body = http_get(metrics, "/metrics").await.1;
        let queued = sample(&body, "customer_mapping_db_queued_calls", &[&label]);
        if queued == Some(n as f64) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{n} calls of {op} never queued:\n{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_by_method_and_code() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let server = ServerProcess::start(&[
        ("DATABASE_URL", &database.url),
        ("METRICS_ADDR", "127.0.0.1:0"),
        ("HEALTH_PROBE_INTERVAL", "100ms"),
        ("HEALTH_PROBE_TIMEOUT", "50ms"),
    ]);
    let metrics = server.metrics_addr();
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    let mut client = helpers::connect(server.addr).await;
    let user = |id: &str| customer_mapping::proto::get_request::Key::UserId(id.into());

    helpers::link(&mut client, "user-1", "cus_A1")
        .await
        .expect("Link");
    helpers::link(&mut client, "user-1", "cus_A1")
        .await
        .expect("repeat Link");
    helpers::link(&mut client, "user-1", "cus_B2")
        .await
        .expect_err("conflict");
    helpers::get(&mut client, user("user-2"))
        .await
        .expect_err("not found");

    let (head, body) = http_get(metrics, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );

    let service = r#"grpc_service="customermapping.v1.CustomerMapping""#;
    let handled = |method: &str, code: &str| {
        sample(
            &body,
            "grpc_server_handled_total",
            &[
                service,
                &format!(r#"grpc_method="{method}""#),
                &format!(r#"grpc_code="{code}""#),
            ],
        )
    };
    assert_eq!(handled("Link", "OK"), Some(2.0), "{body}");
    assert_eq!(handled("Link", "AlreadyExists"), Some(1.0), "{body}");
    assert_eq!(handled("Get", "NotFound"), Some(1.0), "{body}");
    assert_eq!(
        sample(
            &body,
            "grpc_server_handling_seconds_count",
            &[r#"grpc_method="Link""#]
        ),
        Some(3.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            "grpc_server_handling_seconds_bucket",
            &[r#"grpc_method="Get""#, r#"le="+Inf""#]
        )
        .is_some(),
        "{body}"
    );
    assert_eq!(
        sample(&body, "customer_mapping_serving", &[]),
        Some(1.0),
        "{body}"
    );
    assert!(
        sample(
            &body,
            "customer_mapping_db_pool_connections",
            &[r#"state="idle""#]
        )
        .is_some(),
        "{body}"
    );
    assert!(
        sample(
            &body,
            "customer_mapping_db_pool_connections",
            &[r#"state="in_use""#]
        )
        .is_some(),
        "{body}"
    );
    assert!(body.contains("# HELP grpc_server_handled_total"), "{body}");

    let (head, _) = http_get(metrics, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
