//! Get and Unlink by either key, NOT_FOUND, and linking again after Unlink.

use crate::helpers;

use helpers::{TestApp, assert_not_found};

on_both_databases!(
    get_finds_a_mapping_by_either_key,
    get_of_an_unknown_key_is_not_found,
    unlink_by_user_returns_the_removed_mapping,
    unlink_by_customer_returns_the_removed_mapping,
    unlink_of_an_unknown_key_is_not_found,
    after_unlink_both_sides_can_be_linked_again,
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
