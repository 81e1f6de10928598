//! Get and Unlink by either key, NOT_FOUND, linking again after Unlink,
//! and Unlink of only the pair the caller saw (`expected_counterpart`).

use crate::helpers;

use customer_mapping::proto::unlink_request::Key;
use helpers::{TestApp, assert_invalid, assert_not_found, bulk::events_all, unlink_expecting};
use tonic::{Code, Status};
use tonic_types::StatusExt;

on_both_databases!(
    get_finds_a_mapping_by_either_key,
    get_of_an_unknown_key_is_not_found,
    unlink_by_user_returns_the_removed_mapping,
    unlink_by_customer_returns_the_removed_mapping,
    unlink_of_an_unknown_key_is_not_found,
    after_unlink_both_sides_can_be_linked_again,
    unlink_of_the_expected_pair_removes_it_by_either_key,
    unlink_expecting_another_counterpart_removes_nothing_and_names_the_mapping,
    unlink_expecting_a_counterpart_of_an_unlinked_key_is_not_found,
    a_malformed_expected_counterpart_is_invalid_argument,
);

async fn get_finds_a_mapping_by_either_key(app: TestApp) {
    let linked = app.link("user-1", "cus_A1").await.expect("Link").mapping;

    let by_user = app.get_by_user("user-1").await.expect("Get by user");
    let by_customer = app
        .get_by_customer("cus_A1")
        .await
        .expect("Get by customer");

    assert_eq!(Some(&by_user), linked.as_ref());
    assert_eq!(by_customer, by_user);
}

async fn get_of_an_unknown_key_is_not_found(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");

    let status = app.get_by_user("user-2").await.expect_err("unknown user");
    assert_not_found(&status);
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("userId").map(String::as_str),
        Some("user-2")
    );

    let status = app
        .get_by_customer("cus_B2")
        .await
        .expect_err("unknown customer");
    assert_not_found(&status);
    let info = tonic_types::StatusExt::get_details_error_info(&status).expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("stripeCustomerId").map(String::as_str),
        Some("cus_B2")
    );
}

async fn unlink_by_user_returns_the_removed_mapping(app: TestApp) {
    let linked = app.link("user-1", "cus_A1").await.expect("Link").mapping;

    let removed = app.unlink_by_user("user-1").await.expect("Unlink");

    assert_eq!(Some(removed), linked);
    assert_not_found(&app.get_by_user("user-1").await.expect_err("gone"));
    assert_not_found(&app.get_by_customer("cus_A1").await.expect_err("gone"));
    assert!(app.rows().await.is_empty());
}

async fn unlink_by_customer_returns_the_removed_mapping(app: TestApp) {
    let linked = app.link("user-1", "cus_A1").await.expect("Link").mapping;
    app.link("user-2", "cus_B2").await.expect("another Link");

    let removed = app.unlink_by_customer("cus_A1").await.expect("Unlink");

    assert_eq!(Some(removed), linked);
    assert_eq!(app.rows().await, [("user-2".into(), "cus_B2".into())]);
}

async fn unlink_of_an_unknown_key_is_not_found(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.unlink_by_user("user-1").await.expect("first Unlink");

    // A retried Unlink finds nothing left to remove.
    assert_not_found(
        &app.unlink_by_user("user-1")
            .await
            .expect_err("already gone"),
    );
    assert_not_found(
        &app.unlink_by_customer("cus_A1")
            .await
            .expect_err("already gone"),
    );
}

async fn after_unlink_both_sides_can_be_linked_again(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.unlink_by_user("user-1").await.expect("Unlink");

    let user_elsewhere = app.link("user-1", "cus_B2").await.expect("user is free");
    let customer_elsewhere = app
        .link("user-2", "cus_A1")
        .await
        .expect("customer is free");

    assert!(user_elsewhere.created && customer_elsewhere.created);
    assert_eq!(
        app.rows().await,
        [
            ("user-1".into(), "cus_B2".into()),
            ("user-2".into(), "cus_A1".into())
        ]
    );
}

fn user(id: &str) -> Key {
    Key::UserId(id.into())
}

fn customer(id: &str) -> Key {
    Key::StripeCustomerId(id.into())
}

/// Asserts FAILED_PRECONDITION / MAPPING_CHANGED naming this mapping.
fn assert_changed(status: &Status, user_id: &str, stripe_customer_id: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "MAPPING_CHANGED");
    assert_eq!(info.domain, "customermapping.v1");
    assert_eq!(info.metadata["userId"], user_id);
    assert_eq!(info.metadata["stripeCustomerId"], stripe_customer_id);
}

async fn unlink_of_the_expected_pair_removes_it_by_either_key(app: TestApp) {
    let first = app.link("user-1", "cus_A1").await.expect("Link").mapping;
    let second = app.link("user-2", "cus_B2").await.expect("Link").mapping;
    let mut client = app.client.clone();

    let removed = unlink_expecting(&mut client, user("user-1"), "cus_A1").await;
    assert_eq!(removed.ok(), first);
    let removed = unlink_expecting(&mut client, customer("cus_B2"), "user-2").await;
    assert_eq!(removed.ok(), second);
    assert!(app.rows().await.is_empty());
}

async fn unlink_expecting_another_counterpart_removes_nothing_and_names_the_mapping(app: TestApp) {
    // The user moved to a new customer; a late webhook about the old one
    // must not remove the new link.
    app.link("user-1", "cus_Old").await.expect("Link");
    app.unlink_by_user("user-1").await.expect("Unlink");
    app.link("user-1", "cus_New").await.expect("Link again");
    let mut client = app.client.clone();
    let events_before = events_all(&mut client, None, 0).await;

    let status = unlink_expecting(&mut client, user("user-1"), "cus_Old")
        .await
        .expect_err("the user is on another customer now");
    assert_changed(&status, "user-1", "cus_New");
    let status = unlink_expecting(&mut client, customer("cus_New"), "user-9")
        .await
        .expect_err("the customer is another user's");
    assert_changed(&status, "user-1", "cus_New");

    assert_eq!(app.rows().await, [("user-1".into(), "cus_New".into())]);
    assert_eq!(
        events_all(&mut client, None, 0).await,
        events_before,
        "no event for what was not removed"
    );
}

async fn unlink_expecting_a_counterpart_of_an_unlinked_key_is_not_found(app: TestApp) {
    let mut client = app.client.clone();
    let status = unlink_expecting(&mut client, user("user-1"), "cus_A1")
        .await
        .expect_err("nothing to remove");
    assert_not_found(&status);
    let status = unlink_expecting(&mut client, customer("cus_A1"), "user-1")
        .await
        .expect_err("nothing to remove");
    assert_not_found(&status);
}

async fn a_malformed_expected_counterpart_is_invalid_argument(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    let mut client = app.client.clone();
    // A user's counterpart is a customer id, and a customer's a user id.
    for (key, expected) in [
        (user("user-1"), "user-1"),
        (user("user-1"), "cus_A1\n"),
        (customer("cus_A1"), &"u".repeat(256)),
    ] {
        let status = unlink_expecting(&mut client, key, expected)
            .await
            .expect_err("malformed");
        assert_invalid(&status, &["expected_counterpart"]);
    }
    // Every mistake at once.
    let status = unlink_expecting(&mut client, user(""), "not a customer")
        .await
        .expect_err("malformed");
    assert_invalid(&status, &["user_id", "expected_counterpart"]);
    assert_eq!(app.rows().await, [("user-1".into(), "cus_A1".into())]);
}
