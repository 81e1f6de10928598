//! Link in one statement, and Gets and Links sharing statements: the
//! answers stay true when a Link's answer is lost on the way, and when many
//! Gets or Links share one statement.

use std::collections::HashMap;

use customer_mapping::proto::{Mapping, get_request};

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::helpers::{
    self, Backend, Client, TestApp, TestDatabase, cut_proxy::CutProxy, pg, process::ServerProcess,
    proxy,
};
use crate::metrics::{http_get, sample, wait_until_queued};

/// A Link whose connection dies right after its statement was sent runs it
/// again on another connection. If the first attempt did commit, the retry
/// finds the pair holding this call's own token and still answers
/// `created = true`; a later call of the same pair answers `false`.
async fn a_link_cut_after_sending(deliver: bool) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = CutProxy::start(proxy::upstream_of(&database.url).await).await;
    let settings = helpers::test_settings(proxy.through(&database.url));
    let app = helpers::spawn_on(Backend::Postgres, database, settings).await;

    // The Bind message of the Link statement carries the ids.
    proxy.cut_when_client_sends(b"cus_lost", deliver);
    let reply = app
        .link("user-lost", "cus_lost")
        .await
        .expect("the Link runs again on another connection");
    assert!(proxy.fired(), "the Link's connection was cut");
    assert!(
        reply.created,
        "created = false, though this call's {} attempt {}",
        if deliver { "first" } else { "second" },
        "inserted the row"
    );
    assert_eq!(
        app.rows().await,
        [("user-lost".to_owned(), "cus_lost".to_owned())]
    );
    let again = app.link("user-lost", "cus_lost").await.expect("a repeat");
    assert!(!again.created, "another call did not create it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_answer_was_lost_after_it_committed_reports_created() {
    a_link_cut_after_sending(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_before_its_statement_arrived_creates_on_the_retry() {
    a_link_cut_after_sending(false).await;
}

const PAIRS: usize = 40;
const CALLERS: usize = 64;
const GETS_PER_CALLER: usize = 25;

/// Many Gets at once, by either key, known and unknown: every caller gets
/// the row of its own key (on PostgreSQL most of them share statements).
async fn concurrent_gets_each_get_their_own_row(app: TestApp) {
    for i in 0..PAIRS {
        app.link(&format!("user-{i}"), &format!("cus_{i}"))
            .await
            .expect("linked");
    }
    let callers = (0..CALLERS).map(|caller| {
        let mut client = app.client.clone();
        tokio::spawn(async move {
            let mut answers = Vec::with_capacity(GETS_PER_CALLER);
            for n in 0..GETS_PER_CALLER {
                // Unknown keys (i >= PAIRS) mixed in; both lanes.
                let i = (caller * 7 + n * 13) % (PAIRS + 10);
                let by_user = (caller + n) % 2 == 0;
                let key = if by_user {
                    get_request::Key::UserId(format!("user-{i}"))
                } else {
                    get_request::Key::StripeCustomerId(format!("cus_{i}"))
                };
                let answer = helpers::get(&mut client, key).await;
                answers.push((i, answer));
            }
            answers
        })
    });
    let mut found = HashMap::<usize, Mapping>::new();
    let mut not_found = 0;
    for caller in futures::future::join_all(callers).await {
        for (i, answer) in caller.expect("no caller panicked") {
            match answer {
                Ok(mapping) => {
                    assert!(i < PAIRS, "key {i} was never linked, got {mapping:?}");
                    assert_eq!(
                        (
                            mapping.user_id.as_str(),
                            mapping.stripe_customer_id.as_str()
                        ),
                        (format!("user-{i}").as_str(), format!("cus_{i}").as_str()),
                        "the answer for key {i}"
                    );
                    found.insert(i, mapping);
                }
                Err(status) => {
                    assert!(i >= PAIRS, "key {i} is linked: {status:?}");
                    helpers::assert_not_found(&status);
                    not_found += 1;
                }
            }
        }
    }
    assert!(not_found > 0, "unknown keys were asked for");
    assert_eq!(found.len(), PAIRS, "every linked key was asked for");
}

on_both_databases!(concurrent_gets_each_get_their_own_row);

/// The Links of the queued-Links test: (user, customer, what it must get).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Created,
    Existing,
    UserTaken(&'static str),
    CustomerTaken(&'static str),
    /// One of two Links of the same user to different customers.
    Contender,
}

/// The server as a process (its metrics are its own), its database, and a
/// connection to that database for reaching around the service.
async fn postgres_server_with_metrics() -> (ServerProcess, TestDatabase, DatabaseConnection) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let server = ServerProcess::start(&[
        ("DATABASE_URL", &database.url),
        ("DATABASE_MAX_CONNECTIONS", "4"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        // The Links wait on a lock on purpose: the statement in flight must
        // keep holding them up (see the stall test below for the default).
        ("DATABASE_STALL_TIMEOUT", "1m"),
    ]);
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    let db = sea_orm::Database::connect(database.url.as_str())
        .await
        .expect("the test connects");
    (server, database, db)
}

async fn link_with_request_id(
    mut client: Client,
    user: &str,
    customer: &str,
) -> Result<customer_mapping::proto::LinkResponse, tonic::Status> {
    let mut request = tonic::Request::new(customer_mapping::proto::LinkRequest {
        user_id: user.into(),
        stripe_customer_id: customer.into(),
        ..Default::default()
    });
    let id = format!("req-{user}-{customer}");
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("ASCII"));
    client.link(request).await.map(tonic::Response::into_inner)
}

/// Links that arrive while the lane is busy queue, and go out together in
/// one statement when it frees up: the table is locked, one Link takes the
/// lane's place and waits on the lock, and 25 more queue behind it (the
/// server's own gauge says when). Released, every Link gets its own
/// answer, whatever the others in its statement did, each created mapping
/// has exactly one event naming its own call, and one statement answered
/// at least 20 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_links_share_one_statement_and_each_gets_its_own_answer() {
    let (server, _database, db) = postgres_server_with_metrics().await;
    let client = helpers::connect(server.addr).await;
    for (user, customer) in [("user-replay", "cus_replay"), ("user-held", "cus_held")] {
        link_with_request_id(client.clone(), user, customer)
            .await
            .expect("linked before the test");
    }

    let lock = db.begin().await.expect("begin");
    lock.execute_unprepared("LOCK TABLE stripe_customers IN EXCLUSIVE MODE")
        .await
        .expect("lock");
    let blockers: Vec<_> = (0..1)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                link_with_request_id(client, &format!("user-b{i}"), &format!("cus_b{i}")).await
            })
        })
        .collect();
    pg::wait_until_sessions_wait_on_a_lock(&db, 1).await;

    let mut links: Vec<(String, String, Expect)> = (0..20)
        .map(|i| (format!("user-f{i}"), format!("cus_f{i}"), Expect::Created))
        .collect();
    links.extend([
        ("user-replay".into(), "cus_replay".into(), Expect::Existing),
        (
            "user-held".into(),
            "cus_other".into(),
            Expect::UserTaken("cus_held"),
        ),
        (
            "user-other".into(),
            "cus_held".into(),
            Expect::CustomerTaken("user-held"),
        ),
        ("user-x".into(), "cus_x1".into(), Expect::Contender),
        ("user-x".into(), "cus_x2".into(), Expect::Contender),
    ]);
    let queued: Vec<_> = links
        .iter()
        .map(|(user, customer, _)| {
            let (client, user, customer) = (client.clone(), user.clone(), customer.clone());
            tokio::spawn(async move { link_with_request_id(client, &user, &customer).await })
        })
        .collect();
    let metrics = server.metrics_addr();
    wait_until_queued(metrics, "link", links.len()).await;
    lock.commit().await.expect("unlock");

    for blocker in futures::future::join_all(blockers).await {
        assert!(blocker.expect("no panic").expect("linked").created);
    }
    let answers = futures::future::join_all(queued).await;
    let mut contenders = Vec::new();
    for ((user, customer, expect), answer) in links.iter().zip(answers) {
        let answer = answer.expect("no panic");
        match expect {
            Expect::Created => assert!(answer.expect("linked").created, "{user}"),
            Expect::Existing => assert!(!answer.expect("a replay").created, "{user}"),
            Expect::UserTaken(holder) => helpers::assert_already_linked(
                &answer.expect_err("taken"),
                "USER_ALREADY_LINKED",
                user,
                holder,
            ),
            Expect::CustomerTaken(holder) => helpers::assert_already_linked(
                &answer.expect_err("taken"),
                "CUSTOMER_ALREADY_LINKED",
                holder,
                customer,
            ),
            Expect::Contender => contenders.push((customer.clone(), answer)),
        }
    }
    let winners: Vec<&String> = contenders
        .iter()
        .filter(|(_, answer)| answer.as_ref().is_ok_and(|a| a.created))
        .map(|(customer, _)| customer)
        .collect();
    assert_eq!(winners.len(), 1, "one contender wins: {contenders:?}");
    for (_, answer) in &contenders {
        if let Err(status) = answer {
            assert_eq!(status.code(), Code::AlreadyExists);
            helpers::assert_already_linked(status, "USER_ALREADY_LINKED", "user-x", winners[0]);
        }
    }

    // One event per created mapping, naming the call that created it.
    let events = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT user_id, stripe_customer_id, request_id FROM mapping_events WHERE kind = 1",
        ))
        .await
        .expect("events");
    let mut events: Vec<String> = events
        .iter()
        .map(|row| {
            let get = |c| row.try_get::<String>("", c).expect("text");
            let (user, customer) = (get("user_id"), get("stripe_customer_id"));
            assert_eq!(get("request_id"), format!("req-{user}-{customer}"));
            user
        })
        .collect();
    events.sort();
    let mut created: Vec<String> = ["user-replay", "user-held", "user-b0", "user-x"]
        .into_iter()
        .map(String::from)
        .chain((0..20).map(|i| format!("user-f{i}")))
        .collect();
    created.sort();
    assert_eq!(events, created);

    let (_, body) = http_get(metrics, "/metrics").await;
    let most = sample(
        &body,
        "customer_mapping_db_calls_per_statement",
        &[r#"op="link""#, r#"quantile="1""#],
    )
    .expect("the Link statements are measured");
    assert!(
        most >= 20.0,
        "at most {most} Links shared a statement:\n{body}"
    );
}

/// A Link that waits on a key someone else holds (here an open transaction
/// that inserted it) keeps the lane's place only for the stall timeout
/// (100 ms by default): Links of other keys go out without it, and it gets
/// its own answer when the holder gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_waiting_on_a_lock_holds_up_no_link_of_other_keys() {
    let app = helpers::spawn_app(Backend::Postgres).await;
    let outside = app.db().await;
    let holder = outside.begin().await.expect("begin");
    holder
        .execute_unprepared(
            "INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
             VALUES ('user-locked', 'cus_elsewhere', now())",
        )
        .await
        .expect("an uncommitted row holding user-locked");
    let mut client = app.client.clone();
    let waiting =
        tokio::spawn(async move { helpers::link(&mut client, "user-locked", "cus_mine").await });
    pg::wait_until_sessions_wait_on_a_lock(&outside, 1).await;

    for i in 0..5 {
        let reply = app
            .link(&format!("user-free-{i}"), &format!("cus_free{i}"))
            .await
            .expect("a Link of other keys is answered while one waits");
        assert!(reply.created);
    }
    assert!(
        !waiting.is_finished(),
        "the Link of user-locked still waits"
    );

    holder.rollback().await.expect("the holder gives up");
    let reply = waiting.await.expect("no panic").expect("linked");
    assert!(reply.created, "the waiting Link created the mapping");
}
