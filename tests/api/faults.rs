//! Faults under load, each checked like the rest: the history must be
//! linearizable and end in the table as read afterwards (so the table is a
//! bijection and every acknowledged Link not later Unlinked is there).
//! Each scenario prints how many operations it checked and how many were
//! indeterminate.

use crate::helpers;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use helpers::{
    Backend, TestDatabase,
    history::{self, Control, History, Load},
    pg_cluster::PgCluster,
    process::ServerProcess,
};
use sea_orm::Database;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A load that runs until told to stop.
fn endless(seed: u64) -> Load {
    Load {
        operations_per_client: 100_000,
        deadline: Duration::from_secs(3),
        ..Load::small(seed)
    }
}

/// Starts `load` in the background; returns its control and the handle.
fn start_load(
    addrs: Vec<std::net::SocketAddr>,
    load: Load,
    started: Instant,
) -> (Control, tokio::task::JoinHandle<History>) {
    let control = Control::default();
    let handle = tokio::spawn({
        let control = control.clone();
        async move { history::run_load(&addrs, load, started, Some(control)).await }
    });
    (control, handle)
}

async fn stop_load(control: Control, load: tokio::task::JoinHandle<History>) -> History {
    control.stop.store(true, Ordering::Relaxed);
    load.await.expect("the load did not panic")
}

async fn table(url: &str) -> std::collections::HashSet<(u8, u8)> {
    let db = Database::connect(url)
        .await
        .expect("connect to read the table");
    let rows = helpers::read_mappings(&db).await;
    db.close().await.expect("close");
    history::table_pairs(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_killed_mid_load() {
    let app = helpers::spawn_app(Backend::Postgres).await;
    let seed: u64 = rand::random();
    let load = endless(seed);
    let (load_control, running) = start_load(vec![app.addr], load, Instant::now());

    let admin = app.db().await;
    let mut killed = 0;
    for _ in 0..5 {
        load_control.answered_more(30).await;
        killed += helpers::pg::count(
            &admin,
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await;
    }
    load_control.answered_more(50).await;
    let history = stop_load(load_control, running).await;

    assert!(killed > 0, "the service's connections were killed");
    let (checked, _) = history::assert_linearizable(
        &format!("pg_terminate_backend x5, {killed} sessions (seed {seed})"),
        &history,
        load.users,
        &table(&app.database.url).await,
    );
    assert!(checked > 100, "the load ran: {checked} operations");
}

/// A Link whose session dies before COMMIT is retried on a new connection:
/// the caller never sees the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_connection_dies_before_commit_is_retried() {
    let app = helpers::spawn_app(Backend::Postgres).await;
    let outside = app.db().await;
    let lock = helpers::pg::lock_table(&outside).await;
    let link = tokio::spawn({
        let mut client = app.new_client().await;
        async move { helpers::link(&mut client, "user-1", "cus_A1").await }
    });
    // Kill the session of the Link once it waits on the lock.
    let waiting = "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                   WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let mut killed = 0;
    for _ in 0..500 {
        killed = helpers::pg::count(&outside, waiting).await;
        if killed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(killed, 1, "the Link's session was killed while it waited");
    lock.rollback().await.expect("unlock");

    let reply = link
        .await
        .expect("no panic")
        .expect("the Link succeeds after a retry");
    assert!(reply.created);
    assert_eq!(app.rows().await, [("user-1".into(), "cus_A1".into())]);
}

/// PostgreSQL stopped (fast, then immediate: a crash) and restarted under
/// load: UNAVAILABLE and NOT_SERVING while it is down, then the same server
/// process recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_under_load() {
    let Some(cluster) = PgCluster::start_new() else {
        return; // said why
    };
    let mut settings = helpers::test_settings(cluster.url());
    settings.database.database_connect_timeout = Duration::from_millis(500);
    settings.database.database_acquire_timeout = Duration::from_millis(500);
    let app = helpers::spawn_on(
        Backend::Postgres,
        TestDatabase::external(cluster.url()),
        settings,
    )
    .await;
    let seed: u64 = rand::random();
    // Fewer clients than elsewhere, and a longer pause after an unknown
    // outcome: every call during the outage is indeterminate, and the
    // checker's work grows exponentially with those. A refused connection
    // now fails a call at once instead of after the acquire timeout, so
    // with the default pause clients made 112 such calls in one run and the
    // checker gave up (and with 1 s, 20 took it over a minute once).
    let load = Load {
        clients: 4,
        pause_after_unknown: Duration::from_secs(2),
        ..endless(seed)
    };
    let (load_control, running) = start_load(vec![app.addr], load, Instant::now());

    for mode in ["fast", "immediate"] {
        load_control.answered_more(50).await;
        cluster.stop(mode);
        helpers::wait_for_health(app.addr, "", ServingStatus::NotServing).await;
        let status = app
            .get_by_user("user-0")
            .await
            .expect_err("database is down");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        cluster.start();
        helpers::wait_for_health(app.addr, "", ServingStatus::Serving).await;
    }
    load_control.answered_more(50).await;
    let history = stop_load(load_control, running).await;

    let (checked, unknown) = history::assert_linearizable(
        &format!("PostgreSQL stop -m fast and -m immediate, restarted (seed {seed})"),
        &history,
        load.users,
        &table(&cluster.url()).await,
    );
    assert!(
        checked > 100 && unknown > 0,
        "{checked} checked, {unknown} unknown"
    );
}

/// The server killed with SIGKILL under load and started again on the same
/// database: nothing acknowledged is lost, nothing half-written appears.
async fn server_killed_and_restarted(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let env = [
        ("DATABASE_URL", database.url.as_str()),
        ("HEALTH_PROBE_INTERVAL", "100ms"),
        ("HEALTH_PROBE_TIMEOUT", "90ms"),
    ];
    let seed: u64 = rand::random();
    let load = endless(seed);
    let started = Instant::now();

    let first = ServerProcess::start(&env);
    helpers::wait_for_health(first.addr, "", ServingStatus::Serving).await;
    let (load_control, running) = start_load(vec![first.addr], load, started);
    load_control.answered_more(100).await;
    // Clients stop starting new calls as the server dies; the calls in
    // flight at the kill are the indeterminate ones.
    load_control.stop.store(true, Ordering::Relaxed);
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &first.pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let before = stop_load(load_control, running).await;
    drop(first);

    let second = ServerProcess::start(&env);
    helpers::wait_for_health(second.addr, "", ServingStatus::Serving).await;
    let after = history::run_load(&[second.addr], Load::small(seed ^ 1), started, None).await;

    let history = History::merge([before, after]);
    history::assert_linearizable(
        &format!("{backend:?}: server SIGKILLed and restarted (seed {seed})"),
        &history,
        load.users,
        &table(&database.url).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_on_postgres() {
    server_killed_and_restarted(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_on_sqlite() {
    server_killed_and_restarted(Backend::Sqlite).await;
}

/// A database that answers slowly: calls past their deadline end as
/// DEADLINE_EXCEEDED, and whatever they did or did not write is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_with_deadlines() {
    let (database, proxy, settings) = helpers::postgres_behind_proxy().await;
    let url = database.url.clone();
    let app = helpers::spawn_on(Backend::Postgres, database, settings).await;
    let seed: u64 = rand::random();
    // Deadlines drawn between 50 and 400 ms: a call takes tens of
    // milliseconds, so most make it and some don't. (More indeterminate
    // calls than this and the checker's search, exponential in them, can
    // outgrow its bound.)
    let load = Load {
        clients: 4,
        deadline: Duration::from_millis(400),
        operations_per_client: 40,
        ..Load::small(seed)
    };

    // Every chunk to and from the database waits 10 ms.
    proxy.set_delay(Duration::from_millis(10));
    let history = history::run_load(&[app.addr], load, Instant::now(), None).await;
    proxy.set_delay(Duration::ZERO);

    let (checked, unknown) = history::assert_linearizable(
        &format!("database slowed by 10 ms per chunk, 50-400 ms deadlines (seed {seed})"),
        &history,
        load.users,
        &table(&url).await,
    );
    assert!(
        unknown > 0 && unknown < checked,
        "some calls, not all, ran past their deadline ({checked} checked, {unknown} unknown)"
    );
    // The service is still healthy for calls with time to finish.
    app.link("user-9", "cus_9")
        .await
        .expect("a Link with no deadline");
}
