//! Failover to a synchronous standby with nothing lost: a private primary
//! and a streaming standby (`synchronous_commit = on`), the recorded
//! Link/Get/Unlink history under load, the primary SIGKILLed, the address
//! the service uses (a proxy standing in for a Kubernetes `-rw` Service or
//! a virtual IP) moved to the standby while the old primary's connections
//! go silent, and the standby promoted. The history must be linearizable
//! against the new primary's table (so every acknowledged Link not later
//! Unlinked is there), and the service serving within 10 s of the
//! promotion. Before the promotion the address already leads to the
//! standby: the service must refuse it (UNAVAILABLE, NOT_SERVING), not read
//! from or try to write through it.

use crate::helpers;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use customer_mapping::proto::get_request;
use helpers::{
    Backend, TestDatabase,
    history::{self, Control, History, Load},
    pg_cluster::PgCluster,
    silent_proxy::SilentProxy,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const DEADLINE: Duration = Duration::from_secs(2);
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_synchronous_standby_loses_nothing() {
    let Some((primary, standby)) = PgCluster::start_primary_and_synchronous_standby() else {
        return; // said why
    };
    let proxy = SilentProxy::start(primary.addr()).await;
    let mut settings = helpers::test_settings(proxy.through(&primary.url()));
    settings.database.database_acquire_timeout = Duration::from_millis(500);
    settings.database.database_connect_timeout = Duration::from_millis(500);
    settings.health.health_probe_interval = Duration::from_millis(500);
    settings.health.health_probe_timeout = Duration::from_millis(500);
    let app = helpers::spawn_on(
        Backend::Postgres,
        TestDatabase::external(proxy.through(&primary.url())),
        settings,
    )
    .await;

    let seed: u64 = rand::random();
    let load = Load {
        clients: 4,
        operations_per_client: 100_000,
        deadline: DEADLINE,
        pause_after_unknown: Duration::from_secs(1),
        ..Load::small(seed)
    };
    let started = Instant::now();
    let control = Control::default();
    let stop = control.stop.clone();
    let running = tokio::spawn({
        let (control, addr) = (control.clone(), app.addr);
        async move { history::run_load(&[addr], load, started, Some(control)).await }
    });

    // Let the load make progress first.
    control.answered_more(50).await;
    // The primary dies and its address vanishes: its connections go silent.
    proxy.silence();
    primary.kill();
    helpers::wait_for_health(app.addr, "", ServingStatus::NotServing).await;
    // The address moves before the standby is promoted: what it leads to
    // is still in recovery, and must be refused.
    proxy.retarget(standby.addr());
    proxy.heal();
    let mut client = app.new_client().await;
    for _ in 0..3 {
        let mut request = tonic::Request::new(customer_mapping::proto::GetRequest {
            key: Some(get_request::Key::UserId("user-0".into())),
            ..Default::default()
        });
        request.set_timeout(DEADLINE);
        let status = client
            .get(request)
            .await
            .expect_err("a standby is not the database of record");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert_eq!(
        health(app.addr).await,
        ServingStatus::NotServing as i32,
        "a standby must not look healthy"
    );

    standby.promote();
    let promoted = Instant::now();
    helpers::wait_for_health(app.addr, "", ServingStatus::Serving).await;
    let to_serving = promoted.elapsed();
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            promoted.elapsed() < RECOVERY_BOUND,
            "no ten OK calls in a row within {RECOVERY_BOUND:?} of the promotion"
        );
        let mut request = tonic::Request::new(customer_mapping::proto::GetRequest {
            key: Some(get_request::Key::UserId("user-0".into())),
            ..Default::default()
        });
        request.set_timeout(DEADLINE);
        match client.get(request).await {
            Ok(_) => in_a_row += 1,
            Err(status) if status.code() == Code::NotFound => in_a_row += 1,
            Err(_) => {
                in_a_row = 0;
                // Pacing between failed attempts, not synchronization.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let to_ten_ok = promoted.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let history: History = running.await.expect("the load did not panic");

    let table = {
        let db = sea_orm::Database::connect(standby.url())
            .await
            .expect("connect to the new primary");
        let rows = helpers::read_mappings(&db).await;
        db.close().await.expect("close");
        history::table_pairs(rows)
    };
    let (checked, unknown) = history::assert_linearizable(
        &format!("primary SIGKILLed, synchronous standby promoted (seed {seed})"),
        &history,
        load.users,
        &table,
    );
    helpers::report(&format!(
        "failover: {checked} operations checked, {unknown} indeterminate, linearizable against \
         the new primary's table (0 acknowledged Links lost), SERVING {:.2} s and ten OK calls \
         in a row {:.2} s after the promotion",
        to_serving.as_secs_f64(),
        to_ten_ok.as_secs_f64()
    ));
    assert!(
        checked > 50 && unknown > 0,
        "{checked} checked, {unknown} unknown"
    );
}

async fn health(addr: std::net::SocketAddr) -> i32 {
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(helpers::channel(addr).await);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Check answers")
        .into_inner()
        .status
}
