//! BatchGet: one result per key, in order, echoing the key; unset where
//! nothing is linked; limits and every validation case at once.

use crate::helpers;

use customer_mapping::proto::MappingKey;
use helpers::{
    TestApp, assert_invalid,
    bulk::{batch_get, customer, pair, user},
};

on_both_databases!(
    results_follow_the_request_order_and_echo_the_keys,
    a_key_nothing_holds_has_no_mapping,
    one_to_a_thousand_keys_are_accepted,
    no_keys_or_too_many_are_invalid,
    every_bad_key_is_reported_at_once,
);

async fn results_follow_the_request_order_and_echo_the_keys(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.link("user-2", "cus_B2").await.expect("Link");
    let keys = vec![
        customer("cus_B2"),
        user("user-1"),
        user("user-2"),
        customer("cus_A1"),
        user("user-1"),
    ];

    let results = batch_get(&mut app.client.clone(), keys.clone())
        .await
        .expect("BatchGet");

    let echoed: Vec<MappingKey> = results.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(echoed, keys);
    let found: Vec<(String, String)> = results
        .iter()
        .map(|r| pair(r.mapping.as_ref().expect("every key is linked")))
        .collect();
    let (a, b) = (
        ("user-1".to_owned(), "cus_A1".to_owned()),
        ("user-2".to_owned(), "cus_B2".to_owned()),
    );
    assert_eq!(found, [b.clone(), a.clone(), b, a.clone(), a]);
    // The same mapping as Get returns, create_time included.
    let got = app.get_by_user("user-1").await.expect("Get");
    assert_eq!(results[1].mapping.as_ref(), Some(&got));
}

async fn a_key_nothing_holds_has_no_mapping(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.unlink_by_user("user-1").await.expect("Unlink");
    app.link("user-2", "cus_B2").await.expect("Link");

    let results = batch_get(
        &mut app.client.clone(),
        vec![user("user-1"), customer("cus_B2"), customer("cus_A1")],
    )
    .await
    .expect("missing keys are not an error");

    assert_eq!(results.len(), 3);
    assert_eq!(results[0].key, Some(user("user-1")));
    assert!(results[0].mapping.is_none(), "{:?}", results[0]);
    assert_eq!(
        results[1].mapping.as_ref().map(pair),
        Some(("user-2".into(), "cus_B2".into()))
    );
    assert!(results[2].mapping.is_none(), "{:?}", results[2]);
}

async fn one_to_a_thousand_keys_are_accepted(app: TestApp) {
    for n in 0..3 {
        app.link(&format!("u{n}"), &format!("cus_{n}"))
            .await
            .expect("Link");
    }
    let keys: Vec<MappingKey> = (0..1000)
        .map(|n| {
            if n % 2 == 0 {
                user(&format!("u{n}"))
            } else {
                customer(&format!("cus_{n}"))
            }
        })
        .collect();

    let results = batch_get(&mut app.client.clone(), keys.clone())
        .await
        .expect("1,000 keys");

    assert_eq!(results.len(), 1000);
    let linked: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.mapping.is_some())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(linked, [0, 1, 2]);
    let one = batch_get(&mut app.client.clone(), vec![user("u0")])
        .await
        .expect("one key");
    assert_eq!(one.len(), 1);
}

async fn no_keys_or_too_many_are_invalid(app: TestApp) {
    let mut client = app.client.clone();
    let status = batch_get(&mut client, vec![]).await.expect_err("no keys");
    assert_invalid(&status, &["keys"]);
    let keys = (0..1001).map(|n| user(&format!("u{n}"))).collect();
    let status = batch_get(&mut client, keys).await.expect_err("1,001 keys");
    assert_invalid(&status, &["keys"]);
}

async fn every_bad_key_is_reported_at_once(app: TestApp) {
    let keys = vec![
        user("user-1"),
        MappingKey {
            key: None,
            ..Default::default()
        },
        user("user 2"),
        customer("acct_3"),
        customer("cus_4"),
        user(""),
    ];

    let status = batch_get(&mut app.client.clone(), keys)
        .await
        .expect_err("bad keys");

    assert_invalid(
        &status,
        &[
            "keys[1]",
            "keys[2].user_id",
            "keys[3].stripe_customer_id",
            "keys[5].user_id",
        ],
    );
}
