//! Calling BatchGet, List and ListEvents from tests.

use customer_mapping::proto::{
    BatchGetRequest, BatchGetResult, ListEventsRequest, ListRequest, Mapping, MappingEvent,
    MappingKey, mapping_key,
};
use tonic::Status;

use super::Client;

pub fn user(id: &str) -> MappingKey {
    MappingKey {
        key: Some(mapping_key::Key::UserId(id.into())),
        ..Default::default()
    }
}

pub fn customer(id: &str) -> MappingKey {
    MappingKey {
        key: Some(mapping_key::Key::StripeCustomerId(id.into())),
        ..Default::default()
    }
}

/// `key` in `stripe_account`.
pub fn in_account(stripe_account: &str, key: MappingKey) -> MappingKey {
    MappingKey {
        stripe_account: stripe_account.into(),
        ..key
    }
}

pub async fn batch_get(
    client: &mut Client,
    keys: Vec<MappingKey>,
) -> Result<Vec<BatchGetResult>, Status> {
    Ok(client
        .batch_get(BatchGetRequest { keys })
        .await?
        .into_inner()
        .results)
}

/// Every mapping, following `next_page_token` to the end with pages of
/// `page_size`; also returns how many pages it took.
pub async fn list_all(client: &mut Client, page_size: i32) -> (Vec<Mapping>, usize) {
    list_all_in(client, page_size, None).await
}

/// [`list_all`] of one account's mappings (every account's when `None`).
pub async fn list_all_in(
    client: &mut Client,
    page_size: i32,
    stripe_account: Option<&str>,
) -> (Vec<Mapping>, usize) {
    let mut mappings = Vec::new();
    let mut page_token = String::new();
    for pages in 1.. {
        let page = client
            .list(ListRequest {
                page_size,
                page_token,
                stripe_account: stripe_account.map(str::to_owned),
            })
            .await
            .expect("List")
            .into_inner();
        mappings.extend(page.mappings);
        if page.next_page_token.is_empty() {
            return (mappings, pages);
        }
        page_token = page.next_page_token;
    }
    unreachable!("the loop returns")
}

/// Every event (of `key`, when given), following `next_page_token` to the end.
pub async fn events_all(
    client: &mut Client,
    key: Option<MappingKey>,
    page_size: i32,
) -> Vec<MappingEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_events(ListEventsRequest {
                key: key.clone(),
                page_size,
                page_token,
            })
            .await
            .expect("ListEvents")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

/// `(user_id, stripe_customer_id)` of a mapping.
pub fn pair(mapping: &Mapping) -> (String, String) {
    (mapping.user_id.clone(), mapping.stripe_customer_id.clone())
}
