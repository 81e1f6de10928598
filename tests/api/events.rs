//! ListEvents, the audit trail: one KIND_LINKED event per Link that created,
//! none for an idempotent repeat or a failed Link, one KIND_UNLINKED per
//! Unlink with the removed mapping; caller names and request ids; the key
//! filter; pagination; and, under concurrent changes, a trail whose replay
//! gives exactly the table.

use crate::helpers;

use std::collections::{BTreeSet, HashMap};

use customer_mapping::proto::{
    LinkRequest, ListEventsRequest, MappingEvent, MappingKey, UnlinkRequest, mapping_event::Kind,
    unlink_request,
};
use helpers::{
    Backend, TestApp, assert_invalid,
    bulk::{customer, events_all, pair, user},
};
use sha2::{Digest, Sha256};
use tonic::Request;

on_both_databases!(
    a_link_that_creates_writes_one_event_and_a_repeat_none,
    a_link_that_fails_writes_no_event,
    an_unlink_writes_one_event_with_the_removed_mapping,
    events_name_the_request_id_and_anonymous_without_a_policy,
    the_key_filters_events_by_either_side,
    pages_follow_the_sequence_and_tokens_are_bound_to_their_key,
    bad_requests_are_invalid,
    under_concurrent_changes_the_trail_replays_to_the_table,
);

fn kinds(events: &[MappingEvent]) -> Vec<Kind> {
    events.iter().map(MappingEvent::kind).collect()
}

fn event_pairs(events: &[MappingEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| pair(e.mapping.as_ref().expect("an event carries its mapping")))
        .collect()
}

async fn a_link_that_creates_writes_one_event_and_a_repeat_none(app: TestApp) {
    let linked = app.link("user-1", "cus_A1").await.expect("Link");
    let repeat = app.link("user-1", "cus_A1").await.expect("repeat");
    assert!(linked.created && !repeat.created);

    let events = events_all(&mut app.client.clone(), None, 0).await;

    assert_eq!(kinds(&events), [Kind::Linked]);
    let event = &events[0];
    assert_eq!(event.mapping, linked.mapping);
    assert!(event.sequence > 0);
    assert_eq!(
        event.time,
        linked.mapping.as_ref().and_then(|m| m.create_time),
        "a link's event is timed at the mapping's creation"
    );
}

async fn a_link_that_fails_writes_no_event(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.link("user-1", "cus_B2")
        .await
        .expect_err("the user is linked to another customer");
    app.link("user-2", "cus_A1")
        .await
        .expect_err("the customer is linked to another user");
    app.link("user 3", "cus_C3").await.expect_err("invalid");

    let events = events_all(&mut app.client.clone(), None, 0).await;

    assert_eq!(event_pairs(&events), [("user-1".into(), "cus_A1".into())]);
}

async fn an_unlink_writes_one_event_with_the_removed_mapping(app: TestApp) {
    let linked = app.link("user-1", "cus_A1").await.expect("Link").mapping;
    let removed = app.unlink_by_customer("cus_A1").await.expect("Unlink");
    app.unlink_by_user("user-1")
        .await
        .expect_err("nothing left to unlink");

    let events = events_all(&mut app.client.clone(), None, 0).await;

    assert_eq!(kinds(&events), [Kind::Linked, Kind::Unlinked]);
    assert_eq!(events[1].mapping.as_ref(), Some(&removed));
    assert_eq!(events[1].mapping, linked, "with its original create_time");
    assert!(events[0].sequence < events[1].sequence);
    let (linked_at, unlinked_at) = (events[0].time.expect("time"), events[1].time.expect("time"));
    assert!(
        (unlinked_at.seconds, unlinked_at.nanos) >= (linked_at.seconds, linked_at.nanos),
        "{linked_at:?} then {unlinked_at:?}"
    );
}

async fn events_name_the_request_id_and_anonymous_without_a_policy(app: TestApp) {
    let mut client = app.client.clone();
    let mut link = Request::new(LinkRequest {
        user_id: "user-1".into(),
        stripe_customer_id: "cus_A1".into(),
        ..Default::default()
    });
    link.metadata_mut()
        .insert("x-request-id", "req-link-1".parse().expect("ASCII"));
    client.link(link).await.expect("Link");
    let mut unlink = Request::new(UnlinkRequest {
        key: Some(unlink_request::Key::UserId("user-1".into())),
        ..Default::default()
    });
    unlink
        .metadata_mut()
        .insert("x-request-id", "req-unlink-1".parse().expect("ASCII"));
    client.unlink(unlink).await.expect("Unlink");
    // Without a usable x-request-id the server makes one up; the event
    // records the one it returned.
    let reply = client
        .link(LinkRequest {
            user_id: "user-2".into(),
            stripe_customer_id: "cus_B2".into(),
            ..Default::default()
        })
        .await
        .expect("Link");
    let generated = reply
        .metadata()
        .get("x-request-id")
        .expect("returned")
        .to_str()
        .expect("ASCII")
        .to_owned();

    let events = events_all(&mut client, None, 0).await;

    let who: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.caller.as_str(), e.request_id.as_str()))
        .collect();
    assert_eq!(
        who,
        [
            ("anonymous", "req-link-1"),
            ("anonymous", "req-unlink-1"),
            ("anonymous", generated.as_str()),
        ]
    );
}

async fn the_key_filters_events_by_either_side(app: TestApp) {
    app.link("user-1", "cus_A1").await.expect("Link");
    app.link("user-2", "cus_B2").await.expect("Link");
    app.unlink_by_user("user-1").await.expect("Unlink");
    // The customer moves to another user: both users' trails show it.
    app.link("user-3", "cus_A1").await.expect("Link");
    let mut client = app.client.clone();

    let of_user_1 = events_all(&mut client, Some(user("user-1")), 0).await;
    assert_eq!(kinds(&of_user_1), [Kind::Linked, Kind::Unlinked]);
    assert_eq!(
        event_pairs(&of_user_1),
        [
            ("user-1".into(), "cus_A1".into()),
            ("user-1".into(), "cus_A1".into())
        ]
    );

    let of_customer = events_all(&mut client, Some(customer("cus_A1")), 0).await;
    assert_eq!(
        kinds(&of_customer),
        [Kind::Linked, Kind::Unlinked, Kind::Linked]
    );
    assert_eq!(
        event_pairs(&of_customer)[2],
        ("user-3".to_owned(), "cus_A1".to_owned())
    );

    let of_unknown = events_all(&mut client, Some(user("user-9")), 0).await;
    assert!(of_unknown.is_empty());
    assert_eq!(events_all(&mut client, None, 0).await.len(), 4);
}

async fn pages_follow_the_sequence_and_tokens_are_bound_to_their_key(app: TestApp) {
    for n in 0..5 {
        app.link(&format!("user-{n}"), &format!("cus_{n}"))
            .await
            .expect("Link");
        app.unlink_by_user(&format!("user-{n}"))
            .await
            .expect("Unlink");
    }
    app.link("user-0", "cus_0").await.expect("Link");
    let mut client = app.client.clone();

    let all = events_all(&mut client, None, 3).await;
    assert_eq!(all.len(), 11);
    let sequences: Vec<i64> = all.iter().map(|e| e.sequence).collect();
    assert!(sequences.is_sorted() && sequences.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(events_all(&mut client, None, 0).await, all);
    let of_user_0 = events_all(&mut client, Some(user("user-0")), 1).await;
    assert_eq!(of_user_0.len(), 3);

    let page = |key: Option<MappingKey>, page_token: String| ListEventsRequest {
        key,
        page_size: 1,
        page_token,
    };
    let token = client
        .list_events(page(Some(user("user-0")), String::new()))
        .await
        .expect("ListEvents")
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    for key in [None, Some(user("user-1")), Some(customer("cus_0"))] {
        let status = client
            .list_events(page(key.clone(), token.clone()))
            .await
            .expect_err("a token made for another key");
        assert_invalid(&status, &["page_token"]);
    }
}

async fn bad_requests_are_invalid(app: TestApp) {
    let mut client = app.client.clone();
    let request = |key, page_size, page_token: &str| ListEventsRequest {
        key,
        page_size,
        page_token: page_token.into(),
    };
    for (request, fields) in [
        (request(Some(user("user 1")), 0, ""), &["key.user_id"][..]),
        (
            request(Some(customer("acct_1")), 0, ""),
            &["key.stripe_customer_id"],
        ),
        (
            request(
                Some(MappingKey {
                    key: None,
                    ..Default::default()
                }),
                0,
                "",
            ),
            &["key"],
        ),
        (request(None, -5, ""), &["page_size"]),
        (request(None, 0, "abc"), &["page_token"]),
        (
            request(Some(user("")), -1, "abc"),
            &["key.user_id", "page_size"],
        ),
    ] {
        let status = client
            .list_events(request.clone())
            .await
            .expect_err("invalid");
        assert_invalid(&status, fields);
    }
}

/// Two clients link and unlink the same few keys at once. Replaying the
/// trail in sequence order gives exactly the table, and there is one event
/// per change a caller was told succeeded: no more (an event without its
/// change) and no fewer (a change without its event).
async fn under_concurrent_changes_the_trail_replays_to_the_table(app: TestApp) {
    let mut tasks = Vec::new();
    for w in 0..3u32 {
        let mut client = app.new_client().await;
        tasks.push(tokio::spawn(async move {
            let (mut created, mut unlinked) = (0, 0);
            for round in 0..30u32 {
                let n = (round + w) % 4;
                // Conflicting pairs: users and customers cross over.
                let customer = format!("cus_{}", (n + round % 2) % 4);
                match helpers::link(&mut client, &format!("user-{n}"), &customer).await {
                    Ok(reply) if reply.created => created += 1,
                    _ => {}
                }
                if round % 3 == w % 3
                    && helpers::unlink(
                        &mut client,
                        unlink_request::Key::UserId(format!("user-{}", (n + 1) % 4)),
                    )
                    .await
                    .is_ok()
                {
                    unlinked += 1;
                }
            }
            (created, unlinked)
        }));
    }
    let (mut created, mut unlinked) = (0, 0);
    for task in tasks {
        let (c, u) = task.await.expect("the client did not panic");
        created += c;
        unlinked += u;
    }
    // At least one of each, whatever the interleaving did.
    assert!(app.link("user-x", "cus_X").await.expect("Link").created);
    app.unlink_by_user("user-x").await.expect("Unlink");
    created += 1;
    unlinked += 1;

    let events = events_all(&mut app.client.clone(), None, 7).await;

    let mut replayed = BTreeSet::new();
    let mut count: HashMap<Kind, usize> = HashMap::new();
    for event in &events {
        let mapping = pair(event.mapping.as_ref().expect("mapping"));
        *count.entry(event.kind()).or_default() += 1;
        match event.kind() {
            Kind::Linked => assert!(replayed.insert(mapping), "linked twice: {event:?}"),
            Kind::Unlinked => assert!(replayed.remove(&mapping), "not linked: {event:?}"),
            Kind::Unspecified => panic!("{event:?}"),
        }
    }
    let table: BTreeSet<(String, String)> = app.rows().await.into_iter().collect();
    assert_eq!(replayed, table);
    assert_eq!(count.get(&Kind::Linked).copied().unwrap_or(0), created);
    assert_eq!(count.get(&Kind::Unlinked).copied().unwrap_or(0), unlinked);
}

const WEBHOOKS_TOKEN: &str = "webhooks-5e1f0c9a7b3d";
const ADMIN_TOKEN: &str = "admin-8c2e4a6f0b1d";
const READER_TOKEN: &str = "reader-3b7d9f1a5c0e";
const LONG_NAMED_TOKEN: &str = "long-9d4b2f6a8c1e";

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII"),
    );
    request
}

fn long_name() -> String {
    format!("spiffe://cluster.local/ns/billing/sa/{}", "x".repeat(300))
}

/// Under a policy the events name the policy entry, and the bulk reads are
/// allowed by their own names only: a caller allowed `Get` may not use them.
async fn under_a_policy(backend: Backend) {
    let files = tempfile::tempdir().expect("a temporary directory");
    let policy = files.path().join("policy.json");
    let hash = |token: &str| hex::encode(Sha256::digest(token));
    std::fs::write(
        &policy,
        format!(
            r#"{{"callers": [
                {{"name": "billing-webhooks", "token_sha256": "{}", "allow": ["Link"]}},
                {{"name": "support-admin", "token_sha256": "{}", "allow": ["Unlink", "ListEvents", "BatchGet", "List"]}},
                {{"name": "reader", "token_sha256": "{}", "allow": ["Get"]}},
                {{"name": "{}", "token_sha256": "{}", "allow": ["Link"]}}
            ]}}"#,
            hash(WEBHOOKS_TOKEN),
            hash(ADMIN_TOKEN),
            hash(READER_TOKEN),
            long_name(),
            hash(LONG_NAMED_TOKEN)
        ),
    )
    .expect("write the policy");
    let app = helpers::spawn_app_with(backend, |settings| {
        settings.access.policy_file = Some(policy.clone());
    })
    .await;
    let mut client = app.client.clone();
    let link = LinkRequest {
        user_id: "user-1".into(),
        stripe_customer_id: "cus_A1".into(),
        ..Default::default()
    };
    client
        .link(bearer(link.clone(), WEBHOOKS_TOKEN))
        .await
        .expect("Link");
    client
        .link(bearer(link, ADMIN_TOKEN))
        .await
        .expect_err("the admin may not Link");
    client
        .unlink(bearer(
            UnlinkRequest {
                key: Some(unlink_request::Key::StripeCustomerId("cus_A1".into())),
                ..Default::default()
            },
            ADMIN_TOKEN,
        ))
        .await
        .expect("Unlink");

    // A caller's name has no length limit, and a change never fails for it.
    client
        .link(bearer(
            LinkRequest {
                user_id: "user-2".into(),
                stripe_customer_id: "cus_B2".into(),
                ..Default::default()
            },
            LONG_NAMED_TOKEN,
        ))
        .await
        .expect("Link by a caller with a long name");

    let events = client
        .list_events(bearer(ListEventsRequest::default(), ADMIN_TOKEN))
        .await
        .expect("ListEvents")
        .into_inner()
        .events;
    let callers: Vec<&str> = events.iter().map(|e| e.caller.as_str()).collect();
    assert_eq!(
        callers,
        ["billing-webhooks", "support-admin", long_name().as_str()]
    );

    for token in [READER_TOKEN, WEBHOOKS_TOKEN] {
        let denied = [
            client
                .batch_get(bearer(
                    customer_mapping::proto::BatchGetRequest {
                        keys: vec![user("user-1")],
                    },
                    token,
                ))
                .await
                .map(drop),
            client
                .list(bearer(
                    customer_mapping::proto::ListRequest::default(),
                    token,
                ))
                .await
                .map(drop),
            client
                .list_events(bearer(ListEventsRequest::default(), token))
                .await
                .map(drop),
        ];
        for result in denied {
            let status = result.expect_err("not allowed");
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        }
    }
    app.stop().await;
}

mod under_a_policy_events_name_the_caller_and_reads_need_their_own_grant {
    use super::{Backend, under_a_policy};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        under_a_policy(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        under_a_policy(Backend::Postgres).await;
    }
}
