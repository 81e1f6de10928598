//! gRPC health follows the database: NOT_SERVING until it first answers,
//! flipping both ways while the server keeps running.

use crate::helpers;

use std::time::Duration;

use helpers::Backend;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICE: &str = "customermapping.v1.CustomerMapping";
/// Upper bound for a flip: a few probe intervals (100 ms in tests) plus the
/// probe timeout (500 ms) plus the pool's connect timeout.
const FLIP_WITHIN: Duration = Duration::from_secs(5);

async fn check(addr: std::net::SocketAddr, service: &str) -> Result<ServingStatus, tonic::Status> {
    let mut health = HealthClient::new(helpers::channel(addr).await);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status).expect("a known status"))
}

/// Next status from a Watch stream, within `FLIP_WITHIN`.
async fn next_status(
    updates: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let update = tokio::time::timeout(FLIP_WITHIN, updates.message())
        .await
        .expect("health changed within the bound")
        .expect("the Watch stream is healthy")
        .expect("the Watch stream is open");
    ServingStatus::try_from(update.status).expect("a known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_from_start_through_outages() {
    // The database is unreachable before the server even starts.
    let (database, proxy, settings) = helpers::postgres_behind_proxy().await;
    proxy.cut();
    let app = helpers::spawn_unready(Backend::Postgres, database, settings).await;

    // It serves anyway: health NOT_SERVING for both names, RPCs UNAVAILABLE.
    for service in ["", SERVICE] {
        assert_eq!(
            check(app.addr, service).await.expect("Check"),
            ServingStatus::NotServing
        );
    }
    let status = app
        .link("user-1", "cus_A1")
        .await
        .expect_err("no database yet");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let mut health = HealthClient::new(helpers::channel(app.addr).await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .expect("Watch")
        .into_inner();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);

    // The database arrives: connected and migrated in the background.
    proxy.restore();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    assert_eq!(
        check(app.addr, "").await.expect("Check"),
        ServingStatus::Serving
    );
    assert!(app.link("user-1", "cus_A1").await.expect("Link").created);

    // It goes away, and comes back: same server process throughout.
    proxy.cut();
    assert_eq!(next_status(&mut updates).await, ServingStatus::NotServing);
    assert_eq!(
        check(app.addr, "").await.expect("Check"),
        ServingStatus::NotServing
    );
    proxy.restore();
    assert_eq!(next_status(&mut updates).await, ServingStatus::Serving);
    assert_eq!(
        app.get_by_user("user-1")
            .await
            .expect("Get")
            .stripe_customer_id,
        "cus_A1"
    );
}

async fn both_names_are_serving_and_unknown_names_are_not_found(app: helpers::TestApp) {
    for service in ["", SERVICE] {
        assert_eq!(
            check(app.addr, service).await.expect("Check"),
            ServingStatus::Serving
        );
    }
    let status = check(app.addr, "customermapping.v1.Nope")
        .await
        .expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

on_both_databases!(both_names_are_serving_and_unknown_names_are_not_found);
