//! Concurrent clients' histories are linearizable against the sequential
//! model of the service, on each database and across replicas. The checker
//! is proven first on hand-made histories.

use crate::helpers;

use std::{collections::HashSet, time::Instant};

use helpers::{
    Backend, TestDatabase,
    history::{self, Event, History, Load, Model, Op, Outcome, linearize},
    process::ServerProcess,
};
use tonic_health::pb::health_check_response::ServingStatus;

fn event(op: Op, outcome: Outcome, invoked: u64, completed: u64) -> Event {
    Event {
        op,
        outcome,
        invoked,
        completed,
    }
}

fn history(events: Vec<Event>) -> History {
    History { events }
}

#[test]
fn checker_accepts_concurrent_links_with_one_winner() {
    // Two overlapping Links of user 0: the second saw the first's mapping.
    let h = history(vec![
        event(Op::Link(0, 0), Outcome::Created, 0, 10),
        event(Op::Link(0, 1), Outcome::UserTaken(0), 5, 15),
        event(Op::GetByCustomer(0), Outcome::Mapping(0, 0), 20, 30),
    ]);
    let end = linearize(&h, Model::new(2), None).expect("linearizable");
    assert_eq!(end.pairs(), HashSet::from([(0, 0)]));
}

#[test]
fn checker_rejects_two_winners_for_one_user() {
    let h = history(vec![
        event(Op::Link(0, 0), Outcome::Created, 0, 10),
        event(Op::Link(0, 1), Outcome::Created, 5, 15),
    ]);
    assert!(linearize(&h, Model::new(2), None).is_none());
}

#[test]
fn checker_rejects_the_debt_015_race() {
    // The replaced code answered "already linked" to A's pair when the user
    // was in fact linked to B's customer.
    let h = history(vec![
        event(Op::Link(0, 1), Outcome::Created, 0, 10),
        event(Op::Link(0, 0), Outcome::AlreadyLinked, 5, 15),
    ]);
    assert!(linearize(&h, Model::new(2), None).is_none());
}

#[test]
fn checker_rejects_a_stale_read_after_an_acknowledged_unlink() {
    let h = history(vec![
        event(Op::Link(0, 0), Outcome::Created, 0, 1),
        event(Op::UnlinkByCustomer(0), Outcome::Mapping(0, 0), 2, 3),
        event(Op::GetByUser(0), Outcome::Mapping(0, 0), 4, 5),
    ]);
    assert!(linearize(&h, Model::new(1), None).is_none());
}

#[test]
fn checker_rejects_a_batch_that_saw_half_of_a_move() {
    use history::NONE;
    let batch = |users, customers| Outcome::Batch(users, customers);
    let mut of_users = [NONE; history::MAX_BATCH];
    let mut of_customers = [NONE; history::MAX_BATCH];
    // user 0 moves from customer 0 to customer 1, one step at a time.
    let moving = vec![
        event(Op::Link(0, 0), Outcome::Created, 0, 1),
        event(Op::UnlinkByUser(0), Outcome::Mapping(0, 0), 2, 3),
        event(Op::Link(0, 1), Outcome::Created, 4, 5),
    ];
    let read = Op::BatchGet {
        users: 1,
        customers: 2,
        accounts: 1,
    };
    // Before, during and after: each a state of the model.
    of_users[0] = 0;
    of_customers[0] = 0;
    let before = batch(of_users, of_customers);
    let mut h = moving.clone();
    h.push(event(read, before, 0, 10));
    assert!(linearize(&history(h), Model::new(1), None).is_some());
    // The user already on customer 1 while customer 0 still names it: no
    // instant had both.
    of_users[0] = 1;
    let torn = batch(of_users, of_customers);
    let mut h = moving;
    h.push(event(read, torn, 0, 10));
    assert!(linearize(&history(h), Model::new(1), None).is_none());
}

#[test]
fn checker_lets_unknown_operations_happen_or_not() {
    let link = event(Op::Link(0, 0), Outcome::Unknown, 0, u64::MAX);
    for seen in [Outcome::Mapping(0, 0), Outcome::NotFound] {
        let h = history(vec![link, event(Op::GetByUser(0), seen, 5, 6)]);
        assert!(linearize(&h, Model::new(1), None).is_some(), "{seen:?}");
    }
    // ...but not before it was invoked.
    let h = history(vec![
        event(Op::GetByUser(0), Outcome::Mapping(0, 0), 0, 1),
        event(Op::Link(0, 0), Outcome::Unknown, 5, u64::MAX),
    ]);
    assert!(linearize(&h, Model::new(1), None).is_none());
}

#[test]
fn checker_may_need_each_of_several_identical_unknown_operations() {
    // Both unanswered Links must have happened, one on each side of the
    // acknowledged Unlink: trying only the earliest pending twin at each
    // step must still find that.
    let h = history(vec![
        event(Op::Link(0, 0), Outcome::Unknown, 0, u64::MAX),
        event(Op::UnlinkByUser(0), Outcome::Mapping(0, 0), 10, 11),
        event(Op::Link(0, 0), Outcome::Unknown, 20, u64::MAX),
        event(Op::GetByUser(0), Outcome::Mapping(0, 0), 30, 31),
    ]);
    assert!(linearize(&h, Model::new(1), None).is_some());
}

#[test]
fn checker_rejects_an_unlink_of_the_pair_seen_that_removed_a_newer_one() {
    // User 0 moved from customer 0 to customer 1; then a webhook about
    // customer 0 unlinks the user, expecting customer 0.
    let moved = vec![
        event(Op::Link(0, 0), Outcome::Created, 0, 1),
        event(Op::UnlinkByUser(0), Outcome::Mapping(0, 0), 2, 3),
        event(Op::Link(0, 1), Outcome::Created, 4, 5),
    ];
    let answered = |outcome| {
        let mut h = moved.clone();
        h.push(event(Op::UnlinkUserIf(0, 0), outcome, 6, 7));
        linearize(&history(h), Model::new(2), None)
    };
    assert!(
        answered(Outcome::Mapping(0, 1)).is_none(),
        "removed the new link"
    );
    assert!(
        answered(Outcome::Mapping(0, 0)).is_none(),
        "removed a pair long gone"
    );
    let end = answered(Outcome::Changed(0, 1)).expect("refused, naming the new link");
    assert_eq!(end.pairs(), HashSet::from([(0, 1)]));
    // By customer: customer 1 is user 0's, not user 1's.
    let mut h = moved;
    h.push(event(
        Op::UnlinkCustomerIf(1, 1),
        Outcome::Changed(0, 1),
        6,
        7,
    ));
    assert!(linearize(&history(h), Model::new(2), None).is_some());
}

/// Every write the model knows over `n` users and customers.
fn every_write(n: u8) -> Vec<Op> {
    let mut ops = Vec::new();
    for u in 0..n {
        for c in 0..n {
            ops.push(Op::Link(u, c));
        }
        ops.push(Op::UnlinkByUser(u));
        ops.push(Op::UnlinkByCustomer(u));
        ops.push(Op::UnlinkUserIf(u, (u + 1) % n));
    }
    ops
}

#[test]
fn checker_copes_with_a_fault_that_leaves_many_operations_unanswered() {
    // Unanswered writes (several of every write over 3 users), as a long
    // outage leaves them, then reads that pin the outcome down. The search
    // used to give up on a few dozen such operations.
    let unanswered = |count: usize| -> Vec<Event> {
        every_write(3)
            .into_iter()
            .cycle()
            .take(count)
            .enumerate()
            .map(|(i, op)| event(op, Outcome::Unknown, i as u64, u64::MAX))
            .collect()
    };
    let reads = [
        event(Op::GetByUser(0), Outcome::Mapping(0, 2), 100, 101),
        event(Op::GetByUser(1), Outcome::NotFound, 102, 103),
        event(Op::GetByCustomer(1), Outcome::Mapping(2, 1), 104, 105),
    ];
    let with_reads = |count: usize, extra: &[Event]| {
        let mut events = unanswered(count);
        events.extend(reads);
        events.extend_from_slice(extra);
        history(events)
    };
    assert!(linearize(&with_reads(60, &[]), Model::new(4), None).is_some());

    // And it still says no, after searching every order, when none explains
    // a read: nothing ever linked customer 3.
    let impossible = event(Op::GetByUser(1), Outcome::Mapping(1, 3), 106, 107);
    assert!(linearize(&with_reads(16, &[impossible]), Model::new(4), None).is_none());
}

#[test]
fn checker_refuses_a_stale_preparation_that_linked() {
    // A prepares user 0 at generation 0; B links and unlinks it; A's Link
    // with generation 0 must be refused (the user is at generation 1).
    let race = |late_link: Outcome| {
        history(vec![
            event(Op::Prepare(0), Outcome::Prepared(0), 0, 1),
            event(Op::Link(0, 1), Outcome::Created, 2, 3),
            event(Op::UnlinkByUser(0), Outcome::Mapping(0, 1), 4, 5),
            event(Op::LinkPrepared(0, 2, 0), late_link, 6, 7),
        ])
    };
    assert!(linearize(&race(Outcome::Stale(1)), Model::new(3), None).is_some());
    assert!(linearize(&race(Outcome::Created), Model::new(3), None).is_none());
    // The refused Link wrote nothing: a later Get finds no mapping.
    let mut after = race(Outcome::Stale(1)).events;
    after.push(event(Op::GetByUser(0), Outcome::Mapping(0, 2), 8, 9));
    assert!(linearize(&history(after), Model::new(3), None).is_none());
    // A failed Link moves nothing: the preparation still links.
    let refused_then_linked = history(vec![
        event(Op::Prepare(0), Outcome::Prepared(0), 0, 1),
        event(Op::Link(1, 2), Outcome::Created, 2, 3),
        event(Op::Link(0, 2), Outcome::CustomerTaken(1), 4, 5),
        event(Op::LinkPrepared(0, 1, 0), Outcome::Created, 6, 7),
    ]);
    assert!(linearize(&refused_then_linked, Model::new(3), None).is_some());
}

#[test]
fn checker_holds_the_final_table_to_the_history() {
    let h = history(vec![event(Op::Link(0, 0), Outcome::Created, 0, 1)]);
    // An acknowledged Link that is not in the table was lost.
    assert!(linearize(&h, Model::new(1), Some(&HashSet::new())).is_none());
    assert!(linearize(&h, Model::new(1), Some(&HashSet::from([(0, 0)]))).is_some());
}

async fn concurrent_history_is_linearizable(app: helpers::TestApp) {
    let seed: u64 = rand::random();
    let load = Load::small(seed);
    let history = history::run_load(&[app.addr], load, Instant::now(), None).await;
    let db = app.db().await;
    let table = history::table_pairs(helpers::read_mappings(&db).await);
    db.close().await.expect("closes");
    history::assert_linearizable(
        &format!("{:?} single server (seed {seed})", app.backend),
        &history,
        load.users,
        &table,
    );
    assert_eq!(history.unknown(), 0, "no faults, so every answer is known");
}

on_both_databases!(concurrent_history_is_linearizable);

/// Three server processes sharing one PostgreSQL database, clients spread
/// over them: the database is the only shared state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_database_are_linearizable() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let replicas: Vec<ServerProcess> = (0..3)
        .map(|_| {
            ServerProcess::start(&[
                ("DATABASE_URL", &database.url),
                ("DATABASE_MAX_CONNECTIONS", "4"),
            ])
        })
        .collect();
    for replica in &replicas {
        helpers::wait_for_health(replica.addr, "", ServingStatus::Serving).await;
    }
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    let seed: u64 = rand::random();
    let load = Load {
        clients: 9,
        ..Load::small(seed)
    };

    let history = history::run_load(&addrs, load, Instant::now(), None).await;

    let db = sea_orm::Database::connect(&database.url)
        .await
        .expect("connect");
    let rows = helpers::read_mappings(&db).await;
    history::assert_linearizable(
        &format!("3 replicas (seed {seed})"),
        &history,
        load.users,
        &history::table_pairs(rows),
    );
    assert_eq!(history.unknown(), 0);
}
