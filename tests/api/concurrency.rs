//! Link has no race window: concurrent callers, released together, get
//! exactly one winner and answers that name it; a randomized stress of
//! Link / Unlink / Get keeps every answer and the final table consistent.

use crate::helpers;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use customer_mapping::proto::{LinkResponse, get_request, unlink_request};
use helpers::{Backend, Client, TestApp, assert_already_linked};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::Barrier;
use tonic::{Code, Status};
use tonic_types::StatusExt;

const CALLERS: usize = 64;
/// HTTP/2 connections the callers are spread over.
const CONNECTIONS: usize = 8;

/// A server whose pool is big enough for real overlap between transactions.
async fn spawn_concurrent_app(backend: Backend) -> TestApp {
    helpers::spawn_app_with(backend, |s| s.database.database_max_connections = 8).await
}

async fn clients(app: &TestApp) -> Vec<Client> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(app.new_client().await);
    }
    clients
}

/// Runs `CALLERS` Links at once (all wait at a barrier, then fire).
async fn link_all_at_once(
    app: &TestApp,
    pairs: Vec<(String, String)>,
) -> Vec<Result<LinkResponse, Status>> {
    let clients = clients(app).await;
    let barrier = Arc::new(Barrier::new(pairs.len()));
    let calls = pairs.into_iter().enumerate().map(|(i, (user, customer))| {
        let mut client = clients[i % CONNECTIONS].clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            helpers::link(&mut client, &user, &customer).await
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.expect("no caller panicked"))
        .collect()
}

async fn one_user_many_customers_has_exactly_one_winner(backend: Backend) {
    let app = spawn_concurrent_app(backend).await;
    let pairs = (0..CALLERS)
        .map(|i| ("user-1".to_owned(), format!("cus_{i}")))
        .collect();

    let results = link_all_at_once(&app, pairs).await;

    let winners: Vec<&LinkResponse> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one Link succeeds: {results:?}");
    assert!(winners[0].created);
    let winner = winners[0].mapping.clone().expect("mapping");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_already_linked(
            status,
            "USER_ALREADY_LINKED",
            "user-1",
            &winner.stripe_customer_id,
        );
    }
    assert_eq!(
        app.rows().await,
        [("user-1".into(), winner.stripe_customer_id)]
    );
}

async fn one_customer_many_users_has_exactly_one_winner(backend: Backend) {
    let app = spawn_concurrent_app(backend).await;
    let pairs = (0..CALLERS)
        .map(|i| (format!("user-{i}"), "cus_A1".to_owned()))
        .collect();

    let results = link_all_at_once(&app, pairs).await;

    let winners: Vec<&LinkResponse> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one Link succeeds: {results:?}");
    assert!(winners[0].created);
    let winner = winners[0].mapping.clone().expect("mapping");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_already_linked(status, "CUSTOMER_ALREADY_LINKED", &winner.user_id, "cus_A1");
    }
    assert_eq!(app.rows().await, [(winner.user_id, "cus_A1".into())]);
}

async fn the_same_pair_many_times_is_created_once(backend: Backend) {
    let app = spawn_concurrent_app(backend).await;
    let pairs = (0..CALLERS)
        .map(|_| ("user-1".to_owned(), "cus_A1".to_owned()))
        .collect();

    let results = link_all_at_once(&app, pairs).await;

    let replies: Vec<LinkResponse> = results
        .into_iter()
        .map(|r| r.expect("every idempotent Link succeeds"))
        .collect();
    assert_eq!(replies.iter().filter(|r| r.created).count(), 1);
    // Everyone sees the one stored mapping, with the same create_time.
    assert!(replies.iter().all(|r| r.mapping == replies[0].mapping));
    assert_eq!(app.rows().await.len(), 1);
}

/// What one stress operation did, for the final accounting.
#[derive(Default)]
struct Tally {
    created: HashMap<(String, String), i64>,
    unlinked: HashMap<(String, String), i64>,
    operations: usize,
}

const STRESS_WORKERS: usize = 16;
const STRESS_OPERATIONS_PER_WORKER: usize = 120;
const POOL_USERS: usize = 4;
const POOL_CUSTOMERS: usize = 4;

/// Random Link / Unlink / Get over 4 users x 4 customers, so that most calls
/// conflict with another in flight. Every answer is checked on its own, and
/// at the end, for every pair, `created - unlinked` must equal its presence
/// in the table: nothing lost, nothing linked twice.
async fn randomized_link_unlink_get_stays_consistent(backend: Backend) {
    let app = spawn_concurrent_app(backend).await;
    let clients = clients(&app).await;
    let seed: u64 = rand::rng().random();
    eprintln!("stress seed: {seed}");

    let workers = (0..STRESS_WORKERS).map(|w| {
        let mut client = clients[w % CONNECTIONS].clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64));
            let mut tally = Tally::default();
            for _ in 0..STRESS_OPERATIONS_PER_WORKER {
                let user = format!("user-{}", rng.random_range(0..POOL_USERS));
                let customer = format!("cus_{}", rng.random_range(0..POOL_CUSTOMERS));
                match rng.random_range(0..6) {
                    0..=2 => check_link(&mut client, &user, &customer, &mut tally).await,
                    3 => {
                        let key = unlink_request::Key::UserId(user.clone());
                        check_unlink(helpers::unlink(&mut client, key).await, &mut tally, |m| {
                            m.user_id == user
                        })
                    }
                    4 => {
                        let key = unlink_request::Key::StripeCustomerId(customer.clone());
                        check_unlink(helpers::unlink(&mut client, key).await, &mut tally, |m| {
                            m.stripe_customer_id == customer
                        })
                    }
                    _ => {
                        let key = get_request::Key::UserId(user.clone());
                        match helpers::get(&mut client, key).await {
                            Ok(m) => assert_eq!(m.user_id, user),
                            Err(status) => helpers::assert_not_found(&status),
                        }
                    }
                }
                tally.operations += 1;
            }
            tally
        })
    });

    let mut created: HashMap<(String, String), i64> = HashMap::new();
    let mut unlinked: HashMap<(String, String), i64> = HashMap::new();
    let mut operations = 0;
    for tally in futures::future::join_all(workers).await {
        let tally = tally.expect("no worker panicked");
        for (pair, n) in tally.created {
            *created.entry(pair).or_default() += n;
        }
        for (pair, n) in tally.unlinked {
            *unlinked.entry(pair).or_default() += n;
        }
        operations += tally.operations;
    }
    assert_eq!(operations, STRESS_WORKERS * STRESS_OPERATIONS_PER_WORKER);

    let present: HashSet<(String, String)> = app.rows().await.into_iter().collect();
    let pairs: HashSet<&(String, String)> = created
        .keys()
        .chain(unlinked.keys())
        .chain(&present)
        .collect();
    for pair in pairs {
        let balance =
            created.get(pair).copied().unwrap_or(0) - unlinked.get(pair).copied().unwrap_or(0);
        let expected = i64::from(present.contains(pair));
        assert_eq!(
            balance, expected,
            "{pair:?}: created - unlinked != present (seed {seed})"
        );
    }
    let total_created: i64 = created.values().sum();
    assert!(
        total_created > 10,
        "the stress exercised links ({total_created} created)"
    );
}

async fn check_link(client: &mut Client, user: &str, customer: &str, tally: &mut Tally) {
    match helpers::link(client, user, customer).await {
        Ok(reply) => {
            let m = reply.mapping.expect("mapping");
            assert_eq!(
                (m.user_id.as_str(), m.stripe_customer_id.as_str()),
                (user, customer)
            );
            if reply.created {
                *tally
                    .created
                    .entry((user.into(), customer.into()))
                    .or_default() += 1;
            }
        }
        Err(status) => {
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            let (holder_user, holder_customer) =
                (&info.metadata["userId"], &info.metadata["stripeCustomerId"]);
            match info.reason.as_str() {
                // The user is held by another customer...
                "USER_ALREADY_LINKED" => {
                    assert_eq!(holder_user, user);
                    assert_ne!(holder_customer, customer);
                }
                // ...or the customer by another user.
                "CUSTOMER_ALREADY_LINKED" => {
                    assert_eq!(holder_customer, customer);
                    assert_ne!(holder_user, user);
                }
                other => panic!("unexpected reason {other}"),
            }
        }
    }
}

fn check_unlink(
    result: Result<customer_mapping::proto::Mapping, Status>,
    tally: &mut Tally,
    holds_key: impl Fn(&customer_mapping::proto::Mapping) -> bool,
) {
    match result {
        Ok(m) => {
            assert!(
                holds_key(&m),
                "Unlink returned a mapping without the key: {m:?}"
            );
            *tally
                .unlinked
                .entry((m.user_id, m.stripe_customer_id))
                .or_default() += 1;
        }
        Err(status) => helpers::assert_not_found(&status),
    }
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { super::$name(super::Backend::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { super::$name(super::Backend::Postgres).await }
        }
    )*};
}

both!(
    one_user_many_customers_has_exactly_one_winner,
    one_customer_many_users_has_exactly_one_winner,
    the_same_pair_many_times_is_created_once,
    randomized_link_unlink_get_stays_consistent,
);
