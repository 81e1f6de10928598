//! Every reply carries `x-request-id`: the caller's when it sent a usable
//! one, a fresh one otherwise, on success and on error alike.

use crate::helpers;

use customer_mapping::proto::{GetRequest, LinkRequest, get_request};
use helpers::TestApp;

fn link_request(id: Option<&str>) -> tonic::Request<LinkRequest> {
    let mut request = tonic::Request::new(LinkRequest {
        user_id: "user-1".into(),
        stripe_customer_id: "cus_A1".into(),
        ..Default::default()
    });
    if let Some(id) = id {
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().expect("ascii metadata"));
    }
    request
}

fn request_id(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata
        .get("x-request-id")
        .expect("x-request-id is returned")
        .to_str()
        .expect("ascii")
        .to_owned()
}

async fn the_callers_request_id_comes_back_on_success_and_error(app: TestApp) {
    let mut client = app.client.clone();
    let reply = client
        .link(link_request(Some("req-123")))
        .await
        .expect("Link");
    assert_eq!(request_id(reply.metadata()), "req-123");

    let mut request = tonic::Request::new(GetRequest {
        key: Some(get_request::Key::UserId("nobody".into())),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "req-456".parse().expect("ascii"));
    let status = client.get(request).await.expect_err("not found");
    assert_eq!(request_id(status.metadata()), "req-456");
}

async fn a_missing_or_unusable_request_id_is_replaced_by_a_fresh_one(app: TestApp) {
    let mut client = app.client.clone();
    let too_long = "x".repeat(129);
    let mut seen = Vec::new();
    for sent in [None, Some(""), Some(too_long.as_str()), Some("has space")] {
        let reply = client.link(link_request(sent)).await.expect("Link");
        let id = request_id(reply.metadata());
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{sent:?} became {id:?}");
        seen.push(id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "each call gets its own id");
}

on_both_databases!(
    the_callers_request_id_comes_back_on_success_and_error,
    a_missing_or_unusable_request_id_is_replaced_by_a_fresh_one,
);
