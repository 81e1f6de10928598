//! Mappings per Stripe account (Connect): the bijection holds within an
//! account, every RPC is scoped by one, and a caller that names none sees
//! the platform's own account, as before accounts existed.

use crate::helpers;

use customer_mapping::proto::{
    ListEventsRequest, ListRequest, get_request, mapping_event::Kind, unlink_request,
};
use helpers::{
    TestApp, assert_invalid, assert_not_found,
    bulk::{batch_get, customer, events_all, in_account, list_all_in, user},
};
use tonic::Code;
use tonic_types::StatusExt;

on_both_databases!(
    the_same_user_is_linked_in_three_accounts,
    conflicts_are_only_within_one_account,
    get_and_unlink_are_per_account,
    batch_get_list_and_list_events_are_per_account,
    a_caller_naming_no_account_sees_only_the_platforms_own,
    malformed_accounts_are_invalid_argument_naming_the_field,
);

const ACCOUNTS: [&str; 3] = ["", "acct_1Connected", "acct_2Connected"];

fn by_user(id: &str) -> get_request::Key {
    get_request::Key::UserId(id.into())
}

fn by_customer(id: &str) -> get_request::Key {
    get_request::Key::StripeCustomerId(id.into())
}

async fn the_same_user_is_linked_in_three_accounts(app: TestApp) {
    for (n, account) in ACCOUNTS.iter().enumerate() {
        let linked = app
            .link_in(account, "user-1", &format!("cus_Acc{n}"))
            .await
            .expect("Link in each account");
        let mapping = linked.mapping.expect("a mapping");
        assert!(linked.created);
        assert_eq!(mapping.stripe_account, *account);
    }
    for (n, account) in ACCOUNTS.iter().enumerate() {
        let found = app.get_in(account, by_user("user-1")).await.expect("Get");
        assert_eq!(found.stripe_customer_id, format!("cus_Acc{n}"));
        assert_eq!(found.stripe_account, *account);
    }
}

async fn conflicts_are_only_within_one_account(app: TestApp) {
    let connected = ACCOUNTS[1];
    app.link_in(connected, "user-1", "cus_A")
        .await
        .expect("Link");

    let status = app
        .link_in(connected, "user-1", "cus_B")
        .await
        .expect_err("the user is taken in this account");
    assert_eq!(status.code(), Code::AlreadyExists);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "USER_ALREADY_LINKED");
    assert_eq!(info.metadata["stripeCustomerId"], "cus_A");
    assert_eq!(info.metadata["stripeAccount"], connected);

    let status = app
        .link_in(connected, "user-2", "cus_A")
        .await
        .expect_err("the customer is taken in this account");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "CUSTOMER_ALREADY_LINKED");
    assert_eq!(info.metadata["userId"], "user-1");
    assert_eq!(info.metadata["stripeAccount"], connected);

    // The same ids are free in every other account.
    for account in [ACCOUNTS[0], ACCOUNTS[2]] {
        app.link_in(account, "user-2", "cus_A")
            .await
            .expect("the customer id is another account's customer");
        app.link_in(account, "user-1", "cus_B")
            .await
            .expect("the user has no customer in this account yet");
    }
    // A repeat is idempotent within its account.
    let again = app
        .link_in(connected, "user-1", "cus_A")
        .await
        .expect("repeat");
    assert!(!again.created);
}

async fn get_and_unlink_are_per_account(app: TestApp) {
    for (n, account) in ACCOUNTS.iter().enumerate() {
        app.link_in(account, "user-1", &format!("cus_U{n}"))
            .await
            .expect("Link");
    }
    let connected = ACCOUNTS[1];
    let status = app
        .get_in(connected, by_customer("cus_U0"))
        .await
        .expect_err("the platform's customer is not in the connected account");
    assert_not_found(&status);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.metadata["stripeAccount"], connected);

    let removed = app
        .unlink_in(connected, unlink_request::Key::UserId("user-1".into()))
        .await
        .expect("Unlink in one account");
    assert_eq!(removed.stripe_customer_id, "cus_U1");
    assert_not_found(
        &app.get_in(connected, by_user("user-1"))
            .await
            .expect_err("gone from that account"),
    );
    for (n, account) in [(0, ACCOUNTS[0]), (2, ACCOUNTS[2])] {
        let kept = app.get_in(account, by_user("user-1")).await.expect("kept");
        assert_eq!(kept.stripe_customer_id, format!("cus_U{n}"));
    }
    assert_not_found(
        &app.unlink_in(
            connected,
            unlink_request::Key::StripeCustomerId("cus_U2".into()),
        )
        .await
        .expect_err("another account's customer is not removed"),
    );
    app.get_in(ACCOUNTS[2], by_customer("cus_U2"))
        .await
        .expect("still linked");
}

async fn batch_get_list_and_list_events_are_per_account(app: TestApp) {
    for (n, account) in ACCOUNTS.iter().enumerate() {
        app.link_in(account, "user-1", &format!("cus_L{n}"))
            .await
            .expect("Link");
    }
    let mut client = app.client.clone();
    let results = batch_get(
        &mut client,
        vec![
            in_account(ACCOUNTS[2], user("user-1")),
            user("user-1"),
            in_account(ACCOUNTS[1], customer("cus_L2")),
            in_account(ACCOUNTS[1], customer("cus_L1")),
        ],
    )
    .await
    .expect("BatchGet");
    let customers: Vec<Option<String>> = results
        .iter()
        .map(|r| r.mapping.as_ref().map(|m| m.stripe_customer_id.clone()))
        .collect();
    assert_eq!(
        customers,
        [
            Some("cus_L2".to_owned()),
            Some("cus_L0".into()),
            None,
            Some("cus_L1".into())
        ]
    );
    assert_eq!(
        results[0].key.as_ref().map(|k| k.stripe_account.as_str()),
        Some(ACCOUNTS[2]),
        "each result echoes its key, account included"
    );

    let (all, _) = list_all_in(&mut client, 1, None).await;
    assert_eq!(all.len(), 3, "unset: every account");
    for (n, account) in ACCOUNTS.iter().enumerate() {
        let (only, _) = list_all_in(&mut client, 1, Some(account)).await;
        let found: Vec<(&str, &str)> = only
            .iter()
            .map(|m| (m.stripe_account.as_str(), m.stripe_customer_id.as_str()))
            .collect();
        assert_eq!(found, [(*account, format!("cus_L{n}").as_str())]);
    }
    // A page token is bound to its filter.
    let first = client
        .list(ListRequest {
            page_size: 1,
            stripe_account: None,
            ..Default::default()
        })
        .await
        .expect("List")
        .into_inner();
    let status = client
        .list(ListRequest {
            page_size: 1,
            page_token: first.next_page_token,
            stripe_account: Some(ACCOUNTS[1].into()),
        })
        .await
        .expect_err("a token of another filter");
    assert_invalid(&status, &["page_token"]);

    app.unlink_in(ACCOUNTS[1], unlink_request::Key::UserId("user-1".into()))
        .await
        .expect("Unlink");
    let events = events_all(
        &mut client,
        Some(in_account(ACCOUNTS[1], user("user-1"))),
        1,
    )
    .await;
    let seen: Vec<(Kind, &str, &str)> = events
        .iter()
        .map(|e| {
            let m = e.mapping.as_ref().expect("a mapping");
            (
                e.kind(),
                m.stripe_account.as_str(),
                m.stripe_customer_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Kind::Linked, ACCOUNTS[1], "cus_L1"),
            (Kind::Unlinked, ACCOUNTS[1], "cus_L1")
        ]
    );
    let trail = events_all(&mut client, None, 0).await;
    assert_eq!(trail.len(), 4, "unkeyed: every account's events");
}

async fn a_caller_naming_no_account_sees_only_the_platforms_own(app: TestApp) {
    app.link("user-1", "cus_Own")
        .await
        .expect("Link, no account");
    app.link_in(ACCOUNTS[1], "user-1", "cus_Other")
        .await
        .expect("Link in a connected account");

    let mine = app.get_by_user("user-1").await.expect("Get");
    assert_eq!(
        (
            mine.stripe_customer_id.as_str(),
            mine.stripe_account.as_str()
        ),
        ("cus_Own", "")
    );
    assert_not_found(
        &app.get_by_customer("cus_Other")
            .await
            .expect_err("another account's customer"),
    );
    let status = app
        .link("user-1", "cus_Other")
        .await
        .expect_err("the user has its own customer");
    helpers::assert_already_linked(&status, "USER_ALREADY_LINKED", "user-1", "cus_Own");
    let events = events_all(&mut app.client.clone(), Some(user("user-1")), 0).await;
    assert_eq!(
        events.len(),
        1,
        "only the platform account's events of the key"
    );
    app.unlink_by_user("user-1")
        .await
        .expect("Unlink, no account");
    app.get_in(ACCOUNTS[1], by_user("user-1"))
        .await
        .expect("the connected account's mapping stays");
}

async fn malformed_accounts_are_invalid_argument_naming_the_field(app: TestApp) {
    for bad in ["acct_", "cus_123", "acct_a-b", " acct_1", "ACCT_1"] {
        let status = app.link_in(bad, "user-1", "cus_A").await.expect_err(bad);
        assert_invalid(&status, &["stripe_account"]);
        let status = app.get_in(bad, by_user("user-1")).await.expect_err(bad);
        assert_invalid(&status, &["stripe_account"]);
        let status = app
            .unlink_in(bad, unlink_request::Key::UserId("user-1".into()))
            .await
            .expect_err(bad);
        assert_invalid(&status, &["stripe_account"]);
    }
    let too_long = format!("acct_{}", "a".repeat(251));
    let status = app.link_in(&too_long, "", "x").await.expect_err("all bad");
    assert_invalid(
        &status,
        &["user_id", "stripe_customer_id", "stripe_account"],
    );

    let mut client = app.client.clone();
    let status = batch_get(
        &mut client,
        vec![
            user("user-1"),
            in_account("acct_", user("user-1")),
            in_account("nope", user("")),
        ],
    )
    .await
    .expect_err("bad keys");
    assert_invalid(
        &status,
        &[
            "keys[1].stripe_account",
            "keys[2].user_id",
            "keys[2].stripe_account",
        ],
    );
    let status = client
        .list(ListRequest {
            stripe_account: Some("acct".into()),
            ..Default::default()
        })
        .await
        .expect_err("bad filter");
    assert_invalid(&status, &["stripe_account"]);
    let status = client
        .list_events(ListEventsRequest {
            key: Some(in_account("acct_!", user("user-1"))),
            ..Default::default()
        })
        .await
        .expect_err("bad key");
    assert_invalid(&status, &["key.stripe_account"]);
}
