//! List: every mapping, oldest first, in pages; page sizes; tokens this
//! service did not make; and a traversal during concurrent Links and
//! Unlinks, where every mapping present throughout appears exactly once.

use crate::helpers;

use std::{collections::HashMap, time::Duration};

use customer_mapping::proto::{ListEventsRequest, ListRequest, unlink_request};
use helpers::{
    TestApp, assert_invalid,
    bulk::{list_all, pair},
};

on_both_databases!(
    pages_cover_every_mapping_once_oldest_first,
    page_size_zero_means_a_hundred_and_is_capped_at_a_thousand,
    a_negative_page_size_is_invalid,
    a_token_this_service_did_not_make_is_invalid,
    a_traversal_during_concurrent_changes_sees_every_stable_mapping_once,
);

async fn link_many(app: &TestApp, prefix: &str, n: usize) -> Vec<(String, String)> {
    let mut linked = Vec::with_capacity(n);
    for i in 0..n {
        let (user, customer) = (format!("{prefix}-{i}"), format!("cus_{prefix}{i}"));
        app.link(&user, &customer).await.expect("Link");
        linked.push((user, customer));
    }
    linked
}

async fn pages_cover_every_mapping_once_oldest_first(app: TestApp) {
    let linked = link_many(&app, "u", 7).await;

    let (listed, pages) = list_all(&mut app.client.clone(), 3).await;

    assert_eq!(pages, 3, "7 mappings in pages of 3");
    assert_eq!(listed.iter().map(pair).collect::<Vec<_>>(), linked);
    let times: Vec<_> = listed
        .iter()
        .map(|m| {
            let t = m.create_time.expect("create_time");
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.is_sorted(), "oldest first: {times:?}");

    // Exactly a page's worth: the last page is full and has no token.
    let first = app
        .client
        .clone()
        .list(ListRequest {
            page_size: 7,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .expect("List")
        .into_inner();
    assert_eq!(first.mappings.len(), 7);
    assert!(first.next_page_token.is_empty(), "{first:?}");
}

async fn page_size_zero_means_a_hundred_and_is_capped_at_a_thousand(app: TestApp) {
    link_many(&app, "u", 101).await;
    let mut client = app.client.clone();
    let page = |page_size| ListRequest {
        page_size,
        page_token: String::new(),
        ..Default::default()
    };

    let default = client.list(page(0)).await.expect("List").into_inner();
    assert_eq!(default.mappings.len(), 100);
    assert!(!default.next_page_token.is_empty());
    let rest = client
        .list(ListRequest {
            page_size: 0,
            page_token: default.next_page_token,
            ..Default::default()
        })
        .await
        .expect("List")
        .into_inner();
    assert_eq!(rest.mappings.len(), 1);
    assert!(rest.next_page_token.is_empty());

    let huge = client
        .list(page(i32::MAX))
        .await
        .expect("List")
        .into_inner();
    assert_eq!(huge.mappings.len(), 101, "capped, not refused");
    assert!(huge.next_page_token.is_empty());
}

async fn a_negative_page_size_is_invalid(app: TestApp) {
    let status = app
        .client
        .clone()
        .list(ListRequest {
            page_size: -1,
            page_token: "not a token".into(),
            ..Default::default()
        })
        .await
        .expect_err("negative");
    // Both mistakes at once.
    assert_invalid(&status, &["page_size", "page_token"]);
}

async fn a_token_this_service_did_not_make_is_invalid(app: TestApp) {
    link_many(&app, "u", 3).await;
    let mut client = app.client.clone();
    let real = client
        .list(ListRequest {
            page_size: 1,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .expect("List")
        .into_inner()
        .next_page_token;
    assert!(!real.is_empty());
    let events_token = {
        app.unlink_by_user("u-0").await.expect("Unlink");
        app.link("u-0", "cus_u0").await.expect("Link");
        client
            .list_events(ListEventsRequest {
                key: None,
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .expect("ListEvents")
            .into_inner()
            .next_page_token
    };
    assert!(!events_token.is_empty());
    let mut tampered = real.clone().into_bytes();
    let last = tampered.len() - 20;
    tampered[last] = if tampered[last] == b'a' { b'b' } else { b'a' };

    for (token, why) in [
        ("garbage!".to_owned(), "not hex"),
        ("00".to_owned(), "too short"),
        (real[..real.len() - 2].to_owned(), "truncated"),
        (format!("{real}00"), "extended"),
        (
            String::from_utf8(tampered).expect("hex"),
            "a changed cursor",
        ),
        (events_token, "a ListEvents token"),
    ] {
        let status = client
            .list(ListRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect_err(why);
        assert_invalid(&status, &["page_token"]);
    }
}

/// Mappings that exist for the whole traversal are each listed exactly
/// once, while other clients remove and re-create mappings around them and
/// add new ones (before and after them in the order, on pages already read
/// and not). The reader waits for changes between pages, so they interleave
/// whatever the machine's speed.
async fn a_traversal_during_concurrent_changes_sees_every_stable_mapping_once(app: TestApp) {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let stable = link_many(&app, "stable", 30).await;
    let churn = link_many(&app, "churn", 20).await;

    // A fixed amount of work: new mappings go to the end of the order, so
    // writers that never stopped would keep the traversal from ending.
    let (done, changes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for w in 0..2 {
        let mut client = app.new_client().await;
        let (done, changes, churn) = (done.clone(), changes.clone(), churn.clone());
        writers.push(tokio::spawn(async move {
            for round in 0..3 {
                for (i, (user, customer)) in churn.iter().enumerate().filter(|(i, _)| i % 2 == w) {
                    helpers::unlink(&mut client, unlink_request::Key::UserId(user.clone()))
                        .await
                        .expect("Unlink of a churned mapping");
                    // Re-created: now the newest, after every stable mapping.
                    helpers::link(&mut client, user, customer)
                        .await
                        .expect("Link again");
                    let fresh = format!("new-{w}-{round}-{i}");
                    helpers::link(&mut client, &fresh, &format!("cus_new{w}x{round}x{i}"))
                        .await
                        .expect("Link of a new mapping");
                    changes.fetch_add(3, Ordering::Relaxed);
                }
            }
            done.fetch_add(1, Ordering::Relaxed);
        }));
    }

    let mut client = app.new_client().await;
    let (mut listed, mut page_token, mut pages) = (Vec::new(), String::new(), 0);
    let mut pages_after_changes = 0;
    loop {
        let before = changes.load(Ordering::Relaxed);
        let page = client
            .list(ListRequest {
                page_size: 4,
                page_token,
                ..Default::default()
            })
            .await
            .expect("List")
            .into_inner();
        pages += 1;
        listed.extend(page.mappings);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
        // Let a few changes land before the next page, while there are
        // writers (bounded).
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while changes.load(Ordering::Relaxed) < before + 6 && done.load(Ordering::Relaxed) < 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the writers made no progress in 30 s");
        if changes.load(Ordering::Relaxed) > before {
            pages_after_changes += 1;
        }
    }
    for writer in writers {
        writer.await.expect("the writer did not panic");
    }

    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for mapping in &listed {
        *seen.entry(pair(mapping)).or_default() += 1;
    }
    for key in &stable {
        assert_eq!(seen.get(key), Some(&1), "{key:?} over {pages} pages");
    }
    assert!(
        pages_after_changes >= 8,
        "changes landed between only {pages_after_changes} of {pages} pages"
    );
}
