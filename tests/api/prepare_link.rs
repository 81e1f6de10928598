//! PrepareLink: get-or-create without orphaned Stripe customers. One
//! idempotency key per user, account and generation, the same on every
//! replica and after a restart; a new one after each Unlink; and a Link of
//! a stale preparation refused, writing nothing.

use crate::helpers;

use std::collections::HashSet;

use customer_mapping::{
    mapping::IdempotencyNamespace,
    proto::{
        CustomerCreation, LinkRequest, PrepareLinkRequest, prepare_link_response::Outcome,
        unlink_request,
    },
};
use helpers::{
    Backend, Client, TestApp, TestDatabase, assert_invalid, bulk::events_all, spawn_on,
    test_settings,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;

on_both_databases!(
    a_linked_user_gets_its_mapping_and_an_unlinked_one_a_creation,
    the_key_changes_after_each_unlink_and_never_after_a_failed_link,
    keys_differ_between_users_and_accounts,
    a_stale_preparation_is_refused_and_writes_nothing,
    a_prepared_link_of_a_current_generation_links,
    malformed_preparations_are_invalid_argument,
);

async fn prepare(client: &mut Client, account: &str, user: &str) -> Result<Outcome, Status> {
    let reply = client
        .prepare_link(PrepareLinkRequest {
            user_id: user.into(),
            stripe_account: account.into(),
        })
        .await?
        .into_inner();
    Ok(reply.outcome.expect("PrepareLink answers with an outcome"))
}

async fn creation(client: &mut Client, account: &str, user: &str) -> CustomerCreation {
    match prepare(client, account, user).await.expect("PrepareLink") {
        Outcome::Creation(creation) => creation,
        Outcome::Mapping(m) => panic!("{user} is linked already: {m:?}"),
    }
}

async fn link_prepared(
    client: &mut Client,
    account: &str,
    user: &str,
    customer: &str,
    generation: i64,
) -> Result<bool, Status> {
    let reply = client
        .link(LinkRequest {
            user_id: user.into(),
            stripe_customer_id: customer.into(),
            stripe_account: account.into(),
            prepared_generation: Some(generation),
        })
        .await?
        .into_inner();
    Ok(reply.created)
}

async fn a_linked_user_gets_its_mapping_and_an_unlinked_one_a_creation(app: TestApp) {
    let mut client = app.client.clone();
    let first = creation(&mut client, "", "alice@example.com").await;
    assert_eq!(first.generation, 0);
    assert!(
        first.idempotency_key.len() <= 255
            && first
                .idempotency_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
        "{:?}",
        first.idempotency_key
    );
    assert!(!first.idempotency_key.contains("alice"), "no raw user id");
    assert_eq!(
        first.metadata["customer_mapping_user_id"],
        "alice@example.com"
    );
    assert_eq!(first.metadata["customer_mapping_generation"], "0");
    assert!(
        !first
            .metadata
            .contains_key("customer_mapping_stripe_account")
    );

    let again = creation(&mut client, "", "alice@example.com").await;
    assert_eq!(
        again, first,
        "a preparation is a read: the same until linked"
    );

    let created = link_prepared(&mut client, "", "alice@example.com", "cus_Alice", 0)
        .await
        .expect("Link of the prepared customer");
    assert!(created);
    match prepare(&mut client, "", "alice@example.com")
        .await
        .expect("PrepareLink")
    {
        Outcome::Mapping(m) => assert_eq!(m.stripe_customer_id, "cus_Alice"),
        Outcome::Creation(c) => panic!("linked, yet told to create: {c:?}"),
    }
    let replay = link_prepared(&mut client, "", "alice@example.com", "cus_Alice", 0)
        .await
        .expect("a repeat of the prepared Link");
    assert!(!replay, "idempotent");
}

async fn the_key_changes_after_each_unlink_and_never_after_a_failed_link(app: TestApp) {
    let mut client = app.client.clone();
    let mut keys = Vec::new();
    for generation in 0..3 {
        let prepared = creation(&mut client, "", "user-1").await;
        assert_eq!(prepared.generation, generation);
        app.link("user-2", &format!("cus_Taken{generation}"))
            .await
            .expect("Link");
        let status = link_prepared(
            &mut client,
            "",
            "user-1",
            &format!("cus_Taken{generation}"),
            generation,
        )
        .await
        .expect_err("the customer is another user's");
        assert_eq!(status.code(), Code::AlreadyExists);
        assert_eq!(
            creation(&mut client, "", "user-1").await,
            prepared,
            "a refused Link changes nothing"
        );
        link_prepared(
            &mut client,
            "",
            "user-1",
            &format!("cus_U{generation}"),
            generation,
        )
        .await
        .expect("Link");
        app.unlink_by_user("user-1").await.expect("Unlink");
        app.unlink_by_user("user-2").await.expect("Unlink");
        keys.push(prepared.idempotency_key);
    }
    let after = creation(&mut client, "", "user-1").await;
    assert_eq!(after.generation, 3);
    keys.push(after.idempotency_key);
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        4,
        "a new key per generation"
    );
    assert_eq!(
        creation(&mut client, "", "user-2").await.generation,
        3,
        "user-2 was unlinked three times too"
    );
}

async fn keys_differ_between_users_and_accounts(app: TestApp) {
    let mut client = app.client.clone();
    let mut keys = HashSet::new();
    for account in ["", "acct_1", "acct_2"] {
        for user in ["user-1", "user-2"] {
            let prepared = creation(&mut client, account, user).await;
            if !account.is_empty() {
                assert_eq!(
                    prepared.metadata["customer_mapping_stripe_account"],
                    account
                );
            }
            keys.insert(prepared.idempotency_key);
        }
    }
    assert_eq!(keys.len(), 6);
}

async fn a_stale_preparation_is_refused_and_writes_nothing(app: TestApp) {
    let mut a = app.client.clone();
    let mut b = app.new_client().await;
    // A prepares and creates its customer in Stripe; meanwhile B links the
    // user (Stripe replayed the same customer to it, or another one) and an
    // Unlink removes it.
    let stale = creation(&mut a, "acct_1", "user-1").await;
    link_prepared(&mut b, "acct_1", "user-1", "cus_B", stale.generation)
        .await
        .expect("B's Link");
    app.unlink_in("acct_1", unlink_request::Key::UserId("user-1".into()))
        .await
        .expect("Unlink");
    let before = events_all(&mut a, None, 0).await;

    for customer in ["cus_A", "cus_B"] {
        let status = link_prepared(&mut a, "acct_1", "user-1", customer, stale.generation)
            .await
            .expect_err("a stale preparation");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "STALE_PREPARATION");
        assert_eq!(info.metadata["userId"], "user-1");
        assert_eq!(info.metadata["stripeAccount"], "acct_1");
        assert_eq!(info.metadata["preparedGeneration"], "0");
        assert_eq!(info.metadata["generation"], "1");
    }
    assert!(app.rows().await.is_empty(), "nothing was linked");
    assert_eq!(
        events_all(&mut a, None, 0).await,
        before,
        "no event written"
    );
    let fresh = creation(&mut a, "acct_1", "user-1").await;
    assert_eq!(fresh.generation, 1);
    assert_ne!(fresh.idempotency_key, stale.idempotency_key);
}

async fn a_prepared_link_of_a_current_generation_links(app: TestApp) {
    let mut client = app.client.clone();
    for round in 0..2 {
        let prepared = creation(&mut client, "acct_9", "user-1").await;
        assert_eq!(prepared.generation, round);
        assert!(
            link_prepared(
                &mut client,
                "acct_9",
                "user-1",
                "cus_X",
                prepared.generation
            )
            .await
            .expect("current")
        );
        app.unlink_in(
            "acct_9",
            unlink_request::Key::StripeCustomerId("cus_X".into()),
        )
        .await
        .expect("Unlink by customer moves the user on too");
    }
}

async fn malformed_preparations_are_invalid_argument(app: TestApp) {
    let mut client = app.client.clone();
    let status = prepare(&mut client, "acct_", "")
        .await
        .expect_err("both bad");
    assert_invalid(&status, &["user_id", "stripe_account"]);
    let status = link_prepared(&mut client, "", "user-1", "cus_A", -1)
        .await
        .expect_err("negative");
    assert_invalid(&status, &["prepared_generation"]);
}

/// 64 concurrent get-or-creates of one new user, spread over two replicas
/// of one database, are all told the same key: one customer in Stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_on_two_replicas_get_one_key() {
    let a = helpers::spawn_app(Backend::Postgres).await;
    let url = a.database.url.clone();
    let b = spawn_on(
        Backend::Postgres,
        TestDatabase::external(url.clone()),
        test_settings(url),
    )
    .await;
    let calls = (0..64).map(|i| {
        let mut client = if i % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        tokio::spawn(async move { creation(&mut client, "acct_7", "user-1").await })
    });
    let keys: HashSet<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|c| c.expect("no call panicked").idempotency_key)
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    helpers::report("prepare_link: 64 concurrent calls on two replicas, 1 key");
    b.stop().await;
    a.stop().await;
}

/// The key depends on nothing a process holds: a server started afresh on
/// the same database gives the same one. Another database (deployment), or
/// a configured namespace, gives another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_survives_a_restart_and_differs_between_deployments() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let database = TestDatabase::create(backend).await;
        let url = database.url.clone();
        let serve = |namespace: Option<&str>| {
            let mut settings = test_settings(url.clone());
            settings.stripe_idempotency_namespace = namespace.map(IdempotencyNamespace::new);
            spawn_on(backend, TestDatabase::external(url.clone()), settings)
        };
        let first = serve(None).await;
        let key = creation(&mut first.client.clone(), "", "user-1").await;
        first.stop().await;
        let restarted = serve(None).await;
        assert_eq!(
            creation(&mut restarted.client.clone(), "", "user-1").await,
            key
        );
        restarted.stop().await;

        let named = serve(Some("billing-live")).await;
        let named_key = creation(&mut named.client.clone(), "", "user-1").await;
        assert_ne!(named_key.idempotency_key, key.idempotency_key);
        named.stop().await;

        let other = helpers::spawn_app(backend).await;
        let other_key = creation(&mut other.client.clone(), "", "user-1").await;
        assert_ne!(other_key.idempotency_key, key.idempotency_key);
        other.stop().await;
        drop(database);
    }
}
