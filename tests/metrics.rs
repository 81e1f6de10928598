//! Prometheus metrics on their own port. One test in this file: the
//! recorder is process-wide, so other tests' calls would change the counts.

mod common;

use std::net::SocketAddr;

use common::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_owned(), body.to_owned())
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_rpcs_by_method_and_code() {
    let app = common::spawn_app_with(Backend::Sqlite, |s| {
        s.metrics_addr = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics are on");

    app.link("user-1", "cus_A1").await.expect("Link");
    app.link("user-1", "cus_A1").await.expect("repeat Link");
    app.link("user-1", "cus_B2").await.expect_err("conflict");
    app.get_by_user("user-2").await.expect_err("not found");

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
