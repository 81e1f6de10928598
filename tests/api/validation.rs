//! Every malformed request is INVALID_ARGUMENT with a BadRequest naming the
//! field, decided before the database is touched.

use crate::helpers;

use customer_mapping::proto::{GetRequest, UnlinkRequest, get_request, unlink_request};
use helpers::{TestApp, assert_invalid};

const VALID_USER: &str = "user-1";
const VALID_CUSTOMER: &str = "cus_A1";

fn bad_user_ids() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("256 characters", "u".repeat(256)),
        ("256 multi-byte characters", "é".repeat(256)),
        ("a space", "user 1".into()),
        ("a leading tab", "\tuser".into()),
        ("a newline", "user\n".into()),
        ("a no-break space", "user\u{a0}1".into()),
        ("NUL", "user\0".into()),
        ("a control character", "user\u{1b}".into()),
    ]
}

fn bad_customer_ids() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("no prefix", "A1".into()),
        ("prefix only", "cus_".into()),
        ("another prefix", "acct_A1".into()),
        ("upper-case prefix", "CUS_A1".into()),
        ("a dash", "cus_A-1".into()),
        ("an underscore after the prefix", "cus_A_1".into()),
        ("non-ASCII", "cus_Ä1".into()),
        ("a space", "cus_A1 ".into()),
        ("NUL", "cus_A1\0".into()),
        ("256 characters", format!("cus_{}", "a".repeat(252))),
    ]
}

on_both_databases!(
    link_refuses_each_malformed_user_id,
    link_refuses_each_malformed_stripe_customer_id,
    link_names_both_fields_when_both_are_malformed,
    link_accepts_the_longest_and_most_unusual_valid_ids,
    get_and_unlink_refuse_a_request_without_key,
    get_and_unlink_refuse_malformed_keys,
);

async fn link_refuses_each_malformed_user_id(app: TestApp) {
    for (what, user_id) in bad_user_ids() {
        let status = app.link(&user_id, VALID_CUSTOMER).await.expect_err(what);
        assert_invalid(&status, &["user_id"]);
    }
    assert!(app.rows().await.is_empty());
}

async fn link_refuses_each_malformed_stripe_customer_id(app: TestApp) {
    for (what, customer) in bad_customer_ids() {
        let status = app.link(VALID_USER, &customer).await.expect_err(what);
        assert_invalid(&status, &["stripe_customer_id"]);
    }
    assert!(app.rows().await.is_empty());
}

async fn link_names_both_fields_when_both_are_malformed(app: TestApp) {
    let status = app.link("", "cus_").await.expect_err("both invalid");
    assert_invalid(&status, &["user_id", "stripe_customer_id"]);
}

async fn link_accepts_the_longest_and_most_unusual_valid_ids(app: TestApp) {
    let user_id = "ü".repeat(255); // 255 characters, 510 bytes
    let customer = format!("cus_{}", "Z9".repeat(125)) + "x"; // 255 characters
    let reply = app.link(&user_id, &customer).await.expect("valid ids link");
    assert!(reply.created);
    let mapping = app.get_by_user(&user_id).await.expect("round trip");
    assert_eq!(mapping.user_id, user_id);
    assert_eq!(mapping.stripe_customer_id, customer);

    for user_id in [
        "用户-42",
        "user@example.com",
        "a\"quote';DROP/**/TABLE/**/stripe_customers;--",
    ] {
        let n = app.rows().await.len();
        let customer = format!("cus_{n}");
        app.link(user_id, &customer)
            .await
            .expect("any non-space Unicode");
        let mapping = app.get_by_customer(&customer).await.expect("round trip");
        assert_eq!(mapping.user_id, user_id, "stored byte for byte");
    }
}

async fn get_and_unlink_refuse_a_request_without_key(app: TestApp) {
    let mut client = app.client.clone();
    let status = client
        .get(GetRequest {
            key: None,
            ..Default::default()
        })
        .await
        .expect_err("Get needs a key");
    assert_invalid(&status, &["key"]);
    let status = client
        .unlink(UnlinkRequest {
            key: None,
            ..Default::default()
        })
        .await
        .expect_err("Unlink needs a key");
    assert_invalid(&status, &["key"]);
}

async fn get_and_unlink_refuse_malformed_keys(app: TestApp) {
    let mut client = app.client.clone();
    for (what, user_id) in bad_user_ids() {
        let status = helpers::get(&mut client, get_request::Key::UserId(user_id.clone()))
            .await
            .expect_err(what);
        assert_invalid(&status, &["user_id"]);
        let status = helpers::unlink(&mut client, unlink_request::Key::UserId(user_id))
            .await
            .expect_err(what);
        assert_invalid(&status, &["user_id"]);
    }
    for (what, customer) in bad_customer_ids() {
        let status = helpers::get(
            &mut client,
            get_request::Key::StripeCustomerId(customer.clone()),
        )
        .await
        .expect_err(what);
        assert_invalid(&status, &["stripe_customer_id"]);
        let status = helpers::unlink(&mut client, unlink_request::Key::StripeCustomerId(customer))
            .await
            .expect_err(what);
        assert_invalid(&status, &["stripe_customer_id"]);
    }
}

/// With the database cut off, a malformed request still gets
/// INVALID_ARGUMENT, not UNAVAILABLE: validation happens first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_does_not_touch_the_database() {
    let (database, proxy, settings) = helpers::postgres_behind_proxy().await;
    let app = helpers::spawn_on(helpers::Backend::Postgres, database, settings).await;

    proxy.cut();

    assert_invalid(
        &app.link("", VALID_CUSTOMER).await.expect_err("bad user"),
        &["user_id"],
    );
    assert_invalid(
        &app.get_by_customer("nope").await.expect_err("bad customer"),
        &["stripe_customer_id"],
    );
    // ...while a valid request does need the database.
    let status = app
        .get_by_user(VALID_USER)
        .await
        .expect_err("database is cut off");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}
