//! Each limit with the status code a caller sees, and the server still
//! serving other clients afterwards.

use crate::helpers;

use std::time::{Duration, Instant};

use customer_mapping::{
    config::Settings,
    grpc::limits::largest_valid_request,
    proto::{GetRequest, LinkRequest, get_request, mapping_key},
};
use helpers::{
    Backend, TestApp, assert_invalid,
    bulk::{batch_get, customer},
    pg,
    raw::{EMPTY_SETTINGS, PREFACE, closed_by_server},
    spawn_app_with,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::Code;

on_both_databases!(
    the_largest_valid_request_is_served_under_the_defaults,
    too_many_keys_are_the_contracts_own_error_under_the_defaults,
);

fn get(n: u32) -> GetRequest {
    GetRequest {
        key: Some(get_request::Key::UserId(format!("user-{n}"))),
        ..Default::default()
    }
}

async fn still_serving(app: &TestApp) {
    let mut client = app.new_client().await;
    let linked = client
        .link(LinkRequest {
            user_id: "after".into(),
            stripe_customer_id: "cus_after".into(),
            ..Default::default()
        })
        .await
        .expect("a new client is served");
    assert!(linked.into_inner().created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_resource_exhausted_before_any_database_work() {
    let app = spawn_app_with(Backend::Postgres, |_| {}).await;
    // Any call that reached the table would wait on this lock; the refusal
    // comes back at once, so it never got there.
    let outside = app.db().await;
    let lock = pg::lock_table(&outside).await;

    let five_megabytes = "u".repeat(5 * 1024 * 1024);
    let err = app
        .link(&five_megabytes, "cus_1")
        .await
        .expect_err("a 5 MB request is refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let limit = Settings::defaults().limits.max_request_bytes;
    assert!(err.message().contains(&limit.to_string()), "{err:?}");

    lock.rollback().await.expect("unlock");
    assert_eq!(pg::rows_in_table(&outside).await, 0);
    // The same connection, and new ones, are still served.
    app.link("user-1", "cus_1")
        .await
        .expect("Link on the same client");
    still_serving(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_concurrency_limit_are_shed_with_unavailable() {
    let app = spawn_app_with(Backend::Postgres, |s| s.limits.max_concurrent_requests = 2).await;
    let outside = app.db().await;
    let lock = pg::lock_table(&outside).await;
    let in_progress: Vec<_> = (0..2)
        .map(|n| {
            let mut client = app.client.clone();
            tokio::spawn(async move { client.get(get(n)).await })
        })
        .collect();
    pg::wait_until_sessions_wait_on_a_lock(&outside, 2).await;

    let started = Instant::now();
    let err = app.get_by_user("user-9").await.expect_err("shed");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("overloaded"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shedding must not queue"
    );

    lock.rollback().await.expect("unlock");
    for call in in_progress {
        let err = call.await.expect("no panic").expect_err("nothing linked");
        assert_eq!(err.code(), Code::NotFound, "the admitted calls completed");
    }
    still_serving(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_deadline_gets_the_servers_default() {
    let app = spawn_app_with(Backend::Postgres, |s| {
        s.limits.default_deadline = Duration::from_millis(300);
    })
    .await;
    let outside = app.db().await;
    let lock = pg::lock_table(&outside).await;
    let err = app
        .get_by_user("user-1")
        .await
        .expect_err("the lock outlasts the deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    lock.rollback().await.expect("unlock");
    still_serving(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_limit_per_connection_is_advertised_to_clients() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_concurrent_streams = 7).await;
    let tcp = TcpStream::connect(app.addr).await.expect("connects");
    let (_send, mut connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let mut ping = connection.ping_pong().expect("a ping handle");
    // The server's SETTINGS come before its answer to our PING.
    tokio::select! {
        pong = ping.ping(h2::Ping::opaque()) => drop(pong.expect("PONG")),
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 7);
    still_serving(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.http2_keepalive_interval = Duration::from_millis(200);
        s.limits.http2_keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let mut tcp = TcpStream::connect(app.addr).await.expect("connects");
    tcp.write_all(&[PREFACE, EMPTY_SETTINGS].concat())
        .await
        .expect("send the preface");
    // Never answer the server's PINGs, as a vanished peer wouldn't.
    closed_by_server(&mut tcp, Duration::from_secs(10)).await;
    still_serving(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    const LIMIT: usize = 3;
    let app = spawn_app_with(Backend::Sqlite, |s| s.limits.max_connections = LIMIT).await;
    // An accepted connection hears the server's SETTINGS; a refused one is
    // closed without a byte.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..LIMIT + 2 {
        let mut tcp = TcpStream::connect(app.addr).await.expect("TCP connects");
        tcp.write_all(&[PREFACE, EMPTY_SETTINGS].concat())
            .await
            .ok();
        let mut first = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut first)).await {
            Ok(Ok(n)) if n > 0 => accepted.push(tcp),
            Ok(_) => refused += 1,
            Err(_) => panic!("neither served nor closed"),
        }
    }
    assert!(refused >= 2, "{refused} refused");
    assert!(accepted.len() < LIMIT, "the test's own client holds a slot");
    // The test's own client, connected before, is unaffected.
    app.link("user-1", "cus_1").await.expect("existing client");
    app.stop().await;
}

/// A BatchGet of 1,000 user ids of 255 four-byte characters: the largest
/// request the contract calls valid.
async fn the_largest_valid_request_is_served_under_the_defaults(app: TestApp) {
    let request = largest_valid_request();
    let Some(mapping_key::Key::UserId(first)) = request.keys[0].key.clone() else {
        panic!("a user key");
    };
    app.link_in(&request.keys[0].stripe_account, &first, "cus_A1")
        .await
        .expect("Link");

    let results = app
        .client
        .clone()
        .batch_get(request.clone())
        .await
        .expect("served")
        .into_inner()
        .results;

    assert_eq!(results.len(), 1000);
    let echoed: Vec<_> = results.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(echoed, request.keys);
    let linked = results.iter().filter(|r| r.mapping.is_some()).count();
    assert_eq!(linked, 1);
    assert!(results[0].mapping.is_some());
}

/// 1,001 realistic Stripe customer ids (about 22 KB) are refused for their
/// number, as the contract says, not for their size.
async fn too_many_keys_are_the_contracts_own_error_under_the_defaults(app: TestApp) {
    let keys = (0..1001)
        .map(|n| customer(&format!("cus_Nffr{n:010}")))
        .collect();
    let status = batch_get(&mut app.client.clone(), keys)
        .await
        .expect_err("1,001 keys");
    assert_invalid(&status, &["keys"]);
}
