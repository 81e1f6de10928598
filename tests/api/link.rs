//! Link: create, idempotent repeat, and the two kinds of conflict.

use crate::helpers;

use helpers::{TestApp, assert_already_linked};

on_both_databases!(
    link_creates_a_mapping,
    link_of_the_same_pair_again_returns_the_stored_mapping,
    link_of_a_linked_user_to_another_customer_names_the_existing_mapping,
    link_of_a_linked_customer_to_another_user_names_the_existing_mapping,
    link_conflicting_on_both_sides_reports_the_user_first,
    refused_links_write_nothing,
);

async fn link_creates_a_mapping(app: TestApp) {
    let before = std::time::SystemTime::now();
    let reply = app.link("user-1", "cus_A1").await.expect("Link succeeds");

    assert!(reply.created);
    let mapping = reply.mapping.expect("Link returns the mapping");
    assert_eq!(mapping.user_id, "user-1");
    assert_eq!(mapping.stripe_customer_id, "cus_A1");
    let created = mapping.create_time.expect("create_time is set");
    let created = std::time::UNIX_EPOCH
        + std::time::Duration::new(created.seconds as u64, created.nanos as u32);
    assert!(created + std::time::Duration::from_secs(1) >= before);
    assert_eq!(app.rows().await, [("user-1".into(), "cus_A1".into())]);
}

async fn link_of_the_same_pair_again_returns_the_stored_mapping(app: TestApp) {
    let first = app.link("user-1", "cus_A1").await.expect("first Link");
    let again = app.link("user-1", "cus_A1").await.expect("repeated Link");

    assert!(first.created);
    assert!(
        !again.created,
        "a repeat reports that the mapping already existed"
    );
    // Same mapping, original create_time.
    assert_eq!(again.mapping, first.mapping);
    assert_eq!(app.rows().await.len(), 1);
}

async fn link_of_a_linked_user_to_another_customer_names_the_existing_mapping(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("first Link");

    let status = app
        .link("user-1", "cus_B2")
        .await
        .expect_err("the user is taken");

    assert_already_linked(&status, "USER_ALREADY_LINKED", "user-1", "cus_A1");
    assert_eq!(app.rows().await, [("user-1".into(), "cus_A1".into())]);
}

async fn link_of_a_linked_customer_to_another_user_names_the_existing_mapping(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("first Link");

    let status = app
        .link("user-2", "cus_A1")
        .await
        .expect_err("the customer is taken");

    assert_already_linked(&status, "CUSTOMER_ALREADY_LINKED", "user-1", "cus_A1");
    assert_eq!(app.rows().await, [("user-1".into(), "cus_A1".into())]);
}

async fn link_conflicting_on_both_sides_reports_the_user_first(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("first Link");
    app.link("user-2", "cus_B2").await.expect("second Link");

    // user-1 is taken by cus_A1 and cus_B2 by user-2: the caller asked about
    // user-1, so it learns user-1's customer.
    let status = app
        .link("user-1", "cus_B2")
        .await
        .expect_err("both sides are taken");

    assert_already_linked(&status, "USER_ALREADY_LINKED", "user-1", "cus_A1");
}

async fn refused_links_write_nothing(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("first Link");
    app.link("user-1", "cus_B2").await.expect_err("user taken");
    app.link("user-2", "cus_A1")
        .await
        .expect_err("customer taken");
    app.link("bad user", "cus_C3").await.expect_err("invalid");

    // The refused customer and user are still free.
    let reply = app.link("user-2", "cus_B2").await.expect("free pair links");
    assert!(reply.created);
    assert_eq!(
        app.rows().await,
        [
            ("user-1".into(), "cus_A1".into()),
            ("user-2".into(), "cus_B2".into())
        ]
    );
}
