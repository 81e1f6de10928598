//! Watch, the change feed: a bookmark on start, every later change once,
//! in per-key commit order; replay from the beginning; resume from any
//! cursor; bookmarks while idle; checked cursors; the watcher limit; and
//! shutdown. On PostgreSQL, the scenarios built to make a feed skip: a
//! transaction held open while later ones commit (written the previous
//! release's way), two replicas with an import running, and events written
//! before the upgrade.

use crate::helpers;

use std::time::{Duration, Instant};

use customer_mapping::proto::{Mapping, MappingEvent, mapping_event::Kind};
use helpers::{
    Backend, Client, TestApp, TestDatabase, assert_invalid,
    bulk::events_all,
    import::{import_csv, numbered_csv},
    process::ServerProcess,
    report, spawn_app_with, spawn_on, test_settings,
    watch::{
        Received, assert_exactly_once, assert_per_key_order, next, read_until, read_while, watch,
        watch_now,
    },
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sea_orm::{ConnectionTrait, TransactionTrait};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

on_both_databases!(
    starting_now_gives_a_bookmark_then_every_later_change_in_order,
    from_the_beginning_replays_the_trail_then_follows,
    resuming_from_any_cursor_delivers_exactly_what_follows_it,
    concurrent_changes_arrive_once_each_in_per_key_commit_order,
    a_reader_that_stops_reading_holds_up_no_other_and_loses_nothing,
    bad_cursors_are_invalid_argument_on_after,
    changes_in_every_account_arrive_naming_their_account,
);

/// Links a pair no other test step uses and reads `stream` until its
/// event arrives: everything committed before it has then been delivered
/// (it is the last change, so the last event of the feed).
async fn read_to_marker(
    app: &TestApp,
    stream: &mut tonic::Streaming<customer_mapping::proto::WatchResponse>,
    received: &mut Received,
    name: &str,
) {
    let user = format!("marker-{name}");
    let customer: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    app.link(&user, &format!("cus_Marker{customer}"))
        .await
        .expect("the marker links");
    read_while(stream, received, |r| {
        !r.events.iter().any(|e| is_of(e, &user))
    })
    .await;
    let last = received.events.last().expect("the marker");
    assert!(is_of(last, &user), "the marker, committed last, comes last");
}

/// Each received event's kind, user and one more field of its mapping.
fn kinds_users_and(
    received: &Received,
    other: impl Fn(&Mapping) -> String,
) -> Vec<(Kind, String, String)> {
    received
        .events
        .iter()
        .map(|e| {
            let m = e.mapping.as_ref().expect("a mapping");
            (e.kind(), m.user_id.clone(), other(m))
        })
        .collect()
}

fn is_of(event: &MappingEvent, user: &str) -> bool {
    event.mapping.as_ref().is_some_and(|m| m.user_id == user)
}

/// `count` random Links and Unlinks over a few users and customers, so
/// that keys are reused and changes of one key follow each other closely.
async fn churn(client: Client, seed: u64, count: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..count {
        let user = format!("churn-{}", rng.random_range(0..8));
        let mut client = client.clone();
        if rng.random_bool(0.6) {
            let customer = format!("cus_Churn{}", rng.random_range(0..8));
            let _ = helpers::link(&mut client, &user, &customer).await;
        } else {
            let _ = helpers::unlink(
                &mut client,
                customer_mapping::proto::unlink_request::Key::UserId(user),
            )
            .await;
        }
    }
}

async fn starting_now_gives_a_bookmark_then_every_later_change_in_order(app: TestApp) {
    app.link("before", "cus_Before").await.expect("Link");
    let (mut stream, _) = watch_now(&mut app.client.clone()).await;

    app.link("user-1", "cus_A1").await.expect("Link");
    app.link("user-1", "cus_A1")
        .await
        .expect("a repeat writes nothing");
    app.unlink_by_user("user-1").await.expect("Unlink");
    app.link("user-2", "cus_A1").await.expect("Link");

    let mut received = Received::default();
    read_until(&mut stream, &mut received, 3).await;
    let seen = kinds_users_and(&received, |m| m.stripe_customer_id.clone());
    assert_eq!(
        seen,
        [
            (Kind::Linked, "user-1".into(), "cus_A1".into()),
            (Kind::Unlinked, "user-1".into(), "cus_A1".into()),
            (Kind::Linked, "user-2".into(), "cus_A1".into()),
        ],
        "only the changes made after the bookmark, in order"
    );
    let trail = events_all(&mut app.client.clone(), None, 0).await;
    assert_eq!(received.events, trail[1..], "events as ListEvents has them");
}

/// The same ids in two accounts are two mappings: a watcher (which names no
/// account) gets the changes of both, each naming its account.
async fn changes_in_every_account_arrive_naming_their_account(app: TestApp) {
    let (mut stream, _) = watch_now(&mut app.client.clone()).await;
    app.link("user-1", "cus_A1").await.expect("Link");
    app.link_in("acct_1", "user-1", "cus_A1")
        .await
        .expect("Link in a connected account");
    app.unlink_in(
        "acct_1",
        customer_mapping::proto::unlink_request::Key::UserId("user-1".into()),
    )
    .await
    .expect("Unlink in the connected account");

    let mut received = Received::default();
    read_until(&mut stream, &mut received, 3).await;
    let seen = kinds_users_and(&received, |m| m.stripe_account.clone());
    assert_eq!(
        seen,
        [
            (Kind::Linked, "user-1".into(), String::new()),
            (Kind::Linked, "user-1".into(), "acct_1".into()),
            (Kind::Unlinked, "user-1".into(), "acct_1".into()),
        ]
    );
    assert_eq!(
        app.get_by_user("user-1")
            .await
            .expect("Get")
            .stripe_customer_id,
        "cus_A1",
        "the platform's mapping was not the one unlinked"
    );
}

async fn from_the_beginning_replays_the_trail_then_follows(app: TestApp) {
    for i in 0..5 {
        app.link(&format!("user-{i}"), &format!("cus_B{i}"))
            .await
            .expect("Link");
    }
    app.unlink_by_user("user-0").await.expect("Unlink");
    let mut stream = watch(&mut app.client.clone(), "", true)
        .await
        .expect("Watch starts");
    let mut received = Received::default();
    read_until(&mut stream, &mut received, 6).await;
    read_to_marker(&app, &mut stream, &mut received, "replay").await;

    let trail = events_all(&mut app.client.clone(), None, 0).await;
    assert_eq!(received.events, trail, "the whole trail, then what follows");
}

async fn resuming_from_any_cursor_delivers_exactly_what_follows_it(app: TestApp) {
    let mut stream = watch(&mut app.client.clone(), "", true)
        .await
        .expect("Watch starts");
    // Changes made while the stream follows, so that it hands out many
    // cursors, some in the middle of a burst.
    let writers: Vec<_> = (0..3)
        .map(|seed| tokio::spawn(churn(app.client.clone(), seed, 80)))
        .collect();
    let mut received = Received::default();
    for writer in writers {
        writer.await.expect("the writer ran");
    }
    read_to_marker(&app, &mut stream, &mut received, "first").await;
    assert!(
        received.cursors.len() > 3,
        "{} cursors",
        received.cursors.len()
    );

    let mut rng = StdRng::seed_from_u64(7);
    let mut picks: Vec<usize> = (0..8)
        .map(|_| rng.random_range(0..received.cursors.len()))
        .collect();
    picks.extend([0, received.cursors.len() - 1]);
    for (n, pick) in picks.into_iter().enumerate() {
        let (before, cursor) = received.cursors[pick].clone();
        let mut resumed = watch(&mut app.client.clone(), &cursor, false)
            .await
            .expect("Watch resumes");
        let mut more = Received::default();
        read_to_marker(&app, &mut resumed, &mut more, &format!("resume-{n}")).await;
        let trail = events_all(&mut app.client.clone(), None, 0).await;
        let delivered: Vec<MappingEvent> = received.events[..before]
            .iter()
            .chain(&more.events)
            .cloned()
            .collect();
        // Everything before the cursor, then everything after it: the
        // whole trail, each event once, each key in order.
        assert_exactly_once(&delivered, &trail);
        assert_per_key_order(&delivered);
    }
}

async fn concurrent_changes_arrive_once_each_in_per_key_commit_order(app: TestApp) {
    let (mut stream, _) = watch_now(&mut app.client.clone()).await;
    let writers: Vec<_> = (0..8)
        .map(|seed| tokio::spawn(churn(app.client.clone(), 100 + seed, 60)))
        .collect();
    for writer in writers {
        writer.await.expect("the writer ran");
    }
    let mut received = Received::default();
    read_to_marker(&app, &mut stream, &mut received, "concurrent").await;

    let trail = events_all(&mut app.client.clone(), None, 0).await;
    assert!(
        trail.len() > 100,
        "enough changes to interleave: {}",
        trail.len()
    );
    assert_exactly_once(&received.events, &trail);
    assert_per_key_order(&received.events);
}

async fn a_reader_that_stops_reading_holds_up_no_other_and_loses_nothing(app: TestApp) {
    let (mut stuck, _) = watch_now(&mut app.client.clone()).await;
    let (mut reading, _) = watch_now(&mut app.new_client().await).await;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = app.client.clone();
            tokio::spawn(async move {
                for i in 0..500 {
                    let mut client = client.clone();
                    helpers::link(&mut client, &format!("w{w}-{i}"), &format!("cus_W{w}x{i}"))
                        .await
                        .expect("Link");
                }
            })
        })
        .collect();
    let mut fast = Received::default();
    read_until(&mut reading, &mut fast, 2000).await;
    for writer in writers {
        writer.await.expect("the writer ran");
    }
    // The stuck reader reads now, from its first event.
    let mut slow = Received::default();
    read_until(&mut stuck, &mut slow, 2000).await;

    let trail = events_all(&mut app.client.clone(), None, 0).await;
    assert_exactly_once(&fast.events, &trail);
    assert_exactly_once(&slow.events, &trail);
}

async fn bad_cursors_are_invalid_argument_on_after(app: TestApp) {
    let (_stream, cursor) = watch_now(&mut app.client.clone()).await;
    let other = spawn_app_with(app.backend, |_| {}).await;
    let (_other_stream, foreign) = watch_now(&mut other.client.clone()).await;
    let mut client = app.client.clone();
    for (after, from_beginning, why) in [
        ("not a cursor", false, "garbage"),
        (&cursor[..cursor.len() - 2], false, "cut short"),
        (&foreign, false, "another deployment's"),
        (&cursor, true, "both after and from_beginning"),
    ] {
        let status = watch(&mut client, after, from_beginning)
            .await
            .map(drop)
            .expect_err(why);
        assert_invalid(&status, &["after"]);
    }
    watch(&mut client, &cursor, false)
        .await
        .expect("the cursor itself is fine");
    other.stop().await;
}

/// Links `count` new pairs through `addr`, eight at a time.
async fn link_many(client: &Client, prefix: &str, count: usize) {
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let client = client.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                for i in (w..count).step_by(8) {
                    let mut client = client.clone();
                    helpers::link(
                        &mut client,
                        &format!("{prefix}-{i}"),
                        &format!("cus_{prefix}{i}"),
                    )
                    .await
                    .expect("Link");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("the writer ran");
    }
}

/// What a watcher has not read waits in the database, not in the server:
/// each one that reads nothing holds at most two responses and its HTTP/2
/// window, however many changes pass it (the README's figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_read_nothing_hold_little_memory_and_lose_nothing() {
    const STALLED: usize = 16;
    const CHANGES: usize = 10_000;
    const LIMIT_PER_WATCHER_KIB: u64 = 512;
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = ServerProcess::start(&[("DATABASE_URL", database.url.as_str())]);
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    let client = helpers::connect(server.addr).await;
    // The same load once with no one stalled: what the server holds for
    // the changes themselves (its pool, the batches kept for watchers).
    let (mut reading, _) = watch_now(&mut client.clone()).await;
    link_many(&client, "warm", CHANGES).await;
    read_until(&mut reading, &mut Received::default(), CHANGES).await;
    let warm = server.peak_memory_kib();

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        // A connection each: a reader that stops reading also stops its
        // connection's window.
        let mut own = helpers::connect(server.addr).await;
        let (stream, _) = watch_now(&mut own).await;
        stalled.push((own, stream));
    }
    let (mut reading, _) = watch_now(&mut client.clone()).await;
    let mut fast = Received::default();
    link_many(&client, "load", CHANGES).await;
    read_until(&mut reading, &mut fast, CHANGES).await;
    let peak = server.peak_memory_kib();
    let per_watcher = peak.saturating_sub(warm) / STALLED as u64;
    report(&format!(
        "watch memory: {STALLED} watchers reading nothing while {CHANGES} changes passed: \
         peak {warm} -> {peak} KiB, {per_watcher} KiB each"
    ));
    assert!(
        per_watcher <= LIMIT_PER_WATCHER_KIB,
        "{per_watcher} KiB per stalled watcher (peak {warm} -> {peak} KiB)"
    );

    // And they lose nothing: each now reads every change, once.
    for (_, stream) in &mut stalled {
        let mut slow = Received::default();
        read_until(stream, &mut slow, CHANGES).await;
        assert_exactly_once(&slow.events, &fast.events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_gets_bookmarks_that_are_cursors() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let app = spawn_app_with(backend, |s| {
            s.watch.watch_bookmark_interval = Duration::from_millis(200);
        })
        .await;
        let (mut stream, first) = watch_now(&mut app.client.clone()).await;
        let bookmark = next(&mut stream).await.expect("a bookmark");
        assert!(
            bookmark.events.is_empty(),
            "{backend:?}: idle, so a bookmark"
        );

        app.link("user-1", "cus_A1").await.expect("Link");
        for cursor in [first, bookmark.cursor] {
            let mut resumed = watch(&mut app.client.clone(), &cursor, false)
                .await
                .expect("a bookmark's cursor resumes");
            let mut received = Received::default();
            read_until(&mut resumed, &mut received, 1).await;
            assert!(is_of(&received.events[0], "user-1"), "{backend:?}");
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_beyond_the_maximum_get_resource_exhausted() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.watch.max_watchers = 2).await;
    let (first, _) = watch_now(&mut app.client.clone()).await;
    let (_second, _) = watch_now(&mut app.client.clone()).await;
    let status = watch(&mut app.client.clone(), "", false)
        .await
        .map(drop)
        .expect_err("a third watcher");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // A watcher that leaves frees its place (the server notices at once,
    // asynchronously: bounded retries).
    drop(first);
    let mut freed = false;
    for _ in 0..200 {
        match watch(&mut app.client.clone(), "", false).await {
            Ok(_) => {
                freed = true;
                break;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        freed,
        "the place of a watcher that left is given to another"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_stream_with_unavailable_and_none_holds_up_the_drain() {
    let drain = Duration::from_secs(20);
    let app = spawn_app_with(Backend::Postgres, |s| s.shutdown_drain_timeout = drain).await;
    let (mut idle, _) = watch_now(&mut app.client.clone()).await;
    // One that reads nothing while changes pile up behind it.
    let (_stuck, _) = watch_now(&mut app.new_client().await).await;
    for i in 0..300 {
        app.link(&format!("user-{i}"), &format!("cus_S{i}"))
            .await
            .expect("Link");
    }
    let mut received = Received::default();
    read_until(&mut idle, &mut received, 300).await;

    let stopping = Instant::now();
    let client = app.client.clone();
    let stopped = tokio::spawn(app.stop());
    let status = next(&mut idle).await.expect_err("the stream ends");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stopped.await.expect("the server stopped");
    assert!(
        stopping.elapsed() < drain,
        "the streams held up the drain for {:?}",
        stopping.elapsed()
    );
    drop(client);
}

/// The previous release, and any writer that knows nothing of Watch,
/// records a mapping and its event in one transaction without naming the
/// columns this release added. Held open while later changes commit, its
/// event must be delayed, never skipped: every cursor handed out meanwhile
/// must still lead to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_held_open_delays_only_its_own_events_and_is_never_skipped() {
    let app = helpers::spawn_app(Backend::Postgres).await;
    let (mut stream, start) = watch_now(&mut app.client.clone()).await;
    let db = app.db().await;
    let held = db.begin().await.expect("begin");
    // Its transaction id is taken now, before every Link below.
    held.execute_unprepared(PREVIOUS_RELEASE_LINK.replace("{n}", "1").as_str())
        .await
        .expect("the previous release's Link");

    for i in 0..30 {
        app.link(&format!("user-{i}"), &format!("cus_H{i}"))
            .await
            .expect("Link");
    }
    let mut received = Received::default();
    read_until(&mut stream, &mut received, 30).await;
    assert!(
        !received.events.iter().any(|e| is_of(e, "held-1")),
        "nothing uncommitted is delivered"
    );
    let mut cursors: Vec<String> = received.cursors.iter().map(|(_, c)| c.clone()).collect();
    cursors.push(start);

    held.execute_unprepared(PREVIOUS_RELEASE_LINK.replace("{n}", "2").as_str())
        .await
        .expect("a second Link in the same transaction");
    held.commit().await.expect("commit");
    read_until(&mut stream, &mut received, 32).await;
    assert!(is_of(&received.events[30], "held-1") && is_of(&received.events[31], "held-2"));

    for (n, cursor) in cursors.iter().enumerate() {
        let mut resumed = watch(&mut app.client.clone(), cursor, false)
            .await
            .expect("Watch resumes");
        let mut more = Received::default();
        read_to_marker(&app, &mut resumed, &mut more, &format!("held-{n}")).await;
        assert!(
            ["held-1", "held-2"]
                .iter()
                .all(|user| more.events.iter().any(|e| is_of(e, user))),
            "cursor {n}, handed out while the transaction was open, leads to its events"
        );
    }
    let trail = events_all(&mut app.client.clone(), None, 0).await;
    assert_exactly_once(&received.events, &trail[..32]);
    report(&format!(
        "watch, a transaction held open: {} events checked, 0 missed, 0 duplicated, {} cursors resumed",
        received.events.len(),
        cursors.len()
    ));
    app.stop().await;
}

/// The previous release's Link of `held-{n}`: the row and its event, the
/// event's columns named as that release names them.
const PREVIOUS_RELEASE_LINK: &str = "\
INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
VALUES ('held-{n}', 'cus_Held{n}', now()); \
INSERT INTO mapping_events (kind, user_id, stripe_customer_id, mapping_created_at, time, caller, request_id) \
VALUES (1, 'held-{n}', 'cus_Held{n}', now(), now(), 'previous-release', 'held-{n}')";

/// Two replicas on one database, Links and Unlinks through both, and an
/// import of large batches (long statements that take their sequence
/// numbers early and commit late: what made ListEvents' tail skip). The
/// watcher moves between replicas mid-way, resuming from its last cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_an_import_lose_nothing_and_repeat_nothing() {
    let a = helpers::spawn_app(Backend::Postgres).await;
    let url = a.database.url.clone();
    let b = spawn_on(
        Backend::Postgres,
        TestDatabase::external(url.clone()),
        test_settings(url.clone()),
    )
    .await;
    let (mut stream, _) = watch_now(&mut a.client.clone()).await;
    let dir = tempfile::tempdir().expect("a directory");
    let csv = numbered_csv(dir.path(), 6_000);
    let report_path = dir.path().join("report.csv");
    let importing = {
        let url = url.clone();
        tokio::spawn(async move {
            import_csv(&url, &csv, &report_path, &["--batch-rows", "2000"]).await
        })
    };
    let writers: Vec<_> = [a.client.clone(), b.client.clone()]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
        .map(|(seed, client)| tokio::spawn(churn(client, 300 + seed as u64, 100)))
        .collect();

    let mut received = Received::default();
    let mut moves = 0;
    while !writers.iter().all(tokio::task::JoinHandle::is_finished) || !importing.is_finished() {
        received.take(next(&mut stream).await.expect("the stream goes on"));
        // Every few responses, leave and resume on the other replica.
        if received.cursors.len() % 5 == 0 {
            moves += 1;
            let to = if moves % 2 == 1 { &b } else { &a };
            stream = watch(&mut to.client.clone(), received.last_cursor(), false)
                .await
                .expect("Watch resumes on the other replica");
        }
    }
    for writer in writers {
        writer.await.expect("the writer ran");
    }
    let imported = importing.await.expect("the import ran");
    assert_eq!(imported.code, 0, "{:?}", imported.events);
    let to = if moves % 2 == 1 { &b } else { &a };
    read_to_marker(to, &mut stream, &mut received, "replicas").await;

    let trail = events_all(&mut a.client.clone(), None, 0).await;
    assert!(trail.len() > 6_000, "{}", trail.len());
    assert_exactly_once(&received.events, &trail);
    assert_per_key_order(&received.events);
    report(&format!(
        "watch, two replicas and an import: {} events checked, 0 missed, 0 duplicated, {moves} moves between replicas",
        trail.len()
    ));
    b.stop().await;
    a.stop().await;
}

/// Events written before this release's migration (no transaction id) are
/// replayed from the beginning, before everything written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_before_the_upgrade_are_replayed_from_the_beginning() {
    use migration::MigratorTrait;
    let database = TestDatabase::create(Backend::Postgres).await;
    let db = sea_orm::Database::connect(&database.url)
        .await
        .expect("connects");
    let previous_release_migrations = 3;
    migration::Migrator::up(&db, Some(previous_release_migrations))
        .await
        .expect("the previous release's migrations");
    for n in 1..=3 {
        db.execute_unprepared(&PREVIOUS_RELEASE_LINK.replace("{n}", &n.to_string()))
            .await
            .expect("the previous release's Link");
    }
    db.close().await.expect("closes");
    let url = database.url.clone();
    let app = spawn_on(Backend::Postgres, database, test_settings(url)).await;
    let mut stream = watch(&mut app.client.clone(), "", true)
        .await
        .expect("Watch starts");
    let mut received = Received::default();
    read_until(&mut stream, &mut received, 3).await;
    read_to_marker(&app, &mut stream, &mut received, "upgrade").await;
    let users: Vec<&str> = received
        .events
        .iter()
        .filter_map(|e| e.mapping.as_ref().map(|m| m.user_id.as_str()))
        .collect();
    assert_eq!(users, ["held-1", "held-2", "held-3", "marker-upgrade"]);
    app.stop().await;
}
