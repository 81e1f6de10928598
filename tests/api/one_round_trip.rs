//! Link in one statement and Gets coalesced (issue 14): the answers stay
//! true when a Link's answer is lost on the way, and when many Gets share
//! one statement.

use std::collections::HashMap;

use customer_mapping::proto::{Mapping, get_request};

use crate::helpers::{self, Backend, TestApp, TestDatabase, cut_proxy::CutProxy, proxy};

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
