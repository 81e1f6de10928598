//! Request parsing for BatchGet, List and ListEvents: every mistake is
//! reported at once, with the proto's field path.

use chrono::DateTime;

use super::page_token::{self, Paged};
use super::request::{account, customer_id, missing_key, user_id};
use crate::mapping::{
    DEFAULT_PAGE_SIZE, Error, FieldViolation, Key, ListCursor, MAX_BATCH_KEYS, MAX_PAGE_SIZE, Side,
    StripeAccount,
};
use crate::proto::{self, BatchGetRequest, ListEventsRequest, ListRequest, MappingKey};

/// BatchGet's keys, in request order.
pub(super) fn batch_get_keys(request: &BatchGetRequest) -> Result<Vec<Key>, Error> {
    if request.keys.is_empty() || request.keys.len() > MAX_BATCH_KEYS {
        return Err(Error::InvalidArgument(vec![FieldViolation {
            field: "keys".into(),
            description: format!(
                "give 1 to {MAX_BATCH_KEYS} keys, got {}",
                request.keys.len()
            ),
        }]));
    }
    let mut keys = Vec::with_capacity(request.keys.len());
    let mut violations = Vec::new();
    for (i, key) in request.keys.iter().enumerate() {
        match mapping_key(&format!("keys[{i}]"), key) {
            Ok(key) => keys.push(key),
            Err(found) => violations.extend(found),
        }
    }
    if violations.is_empty() {
        Ok(keys)
    } else {
        Err(Error::InvalidArgument(violations))
    }
}

/// What List asks for.
pub(super) struct ListQuery {
    pub account: Option<StripeAccount>,
    pub after: Option<ListCursor>,
    pub page_size: u64,
}

pub(super) fn list_arguments(request: &ListRequest) -> Result<ListQuery, Error> {
    let size = page_size(request.page_size);
    let filter = request
        .stripe_account
        .clone()
        .map(|raw| account("stripe_account", raw))
        .transpose();
    // The token is bound to the filter it was made with; with a bad filter
    // there is nothing to check it against.
    let cursor = match &filter {
        Ok(filter) => page_cursor(
            Paged::Mappings,
            &request.page_token,
            &list_request(filter.as_ref()),
            decode_list_cursor,
        ),
        Err(_) => Ok(None),
    };
    match (filter, size, cursor) {
        (Ok(account), Ok(page_size), Ok(after)) => Ok(ListQuery {
            account,
            after,
            page_size,
        }),
        (filter, size, cursor) => Err(Error::InvalidArgument(
            [filter.err(), size.err(), cursor.err()]
                .into_iter()
                .flatten()
                .collect(),
        )),
    }
}

/// What ListEvents asks for.
pub(super) struct EventsQuery {
    pub key: Option<Key>,
    pub after: Option<i64>,
    pub page_size: u64,
}

pub(super) fn list_events_arguments(request: &ListEventsRequest) -> Result<EventsQuery, Error> {
    let key = request
        .key
        .as_ref()
        .map(|key| mapping_key("key", key))
        .transpose();
    let size = page_size(request.page_size);
    // The token is bound to the key it was made with; with a bad key there
    // is nothing to check it against, and the key's violation says enough.
    let cursor = match &key {
        Ok(key) => page_cursor(
            Paged::Events,
            &request.page_token,
            &events_request(key.as_ref()),
            decode_sequence,
        ),
        Err(_) => Ok(None),
    };
    match (key, size, cursor) {
        (Ok(key), Ok(page_size), Ok(after)) => Ok(EventsQuery {
            key,
            after,
            page_size,
        }),
        (key, size, cursor) => Err(Error::InvalidArgument(
            key.err()
                .into_iter()
                .flatten()
                .chain([size.err(), cursor.err()].into_iter().flatten())
                .collect(),
        )),
    }
}

/// The token that continues a List of `account` (every account when
/// `None`) after `cursor`.
pub(super) fn list_token(account: Option<&StripeAccount>, cursor: ListCursor) -> String {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&cursor.created_at.timestamp_micros().to_be_bytes());
    bytes.extend_from_slice(&cursor.id.to_be_bytes());
    page_token::encode(Paged::Mappings, &bytes, &list_request(account))
}

/// What a List token is bound to besides its cursor: nothing without a
/// filter (as before accounts, so tokens of the previous release stay
/// valid).
fn list_request(account: Option<&StripeAccount>) -> Vec<u8> {
    match account {
        None => Vec::new(),
        Some(account) => [b"a\0", account.as_str().as_bytes()].concat(),
    }
}

/// The token that continues a ListEvents for `key` after `sequence`.
pub(super) fn events_token(key: Option<&Key>, sequence: i64) -> String {
    page_token::encode(Paged::Events, &sequence.to_be_bytes(), &events_request(key))
}

/// What a ListEvents token is bound to besides its cursor: the key, and
/// its account unless it is the platform's (as before accounts, so tokens
/// of the previous release stay valid).
fn events_request(key: Option<&Key>) -> Vec<u8> {
    let Some(key) = key else {
        return Vec::new();
    };
    let side: &[u8] = match key.side {
        Side::User(_) => b"u\0",
        Side::Customer(_) => b"c\0",
    };
    let mut bound = [side, key.side.as_str().as_bytes()].concat();
    if !key.account.is_platform() {
        bound.extend_from_slice(b"\0a\0");
        bound.extend_from_slice(key.account.as_str().as_bytes());
    }
    bound
}

/// A key of a BatchGet or a ListEvents; violations named under `path`.
/// Both the side and the account are checked, so every mistake is told.
fn mapping_key(path: &str, key: &MappingKey) -> Result<Key, Vec<FieldViolation>> {
    let named = |violation: FieldViolation| FieldViolation {
        field: format!("{path}.{}", violation.field).into(),
        ..violation
    };
    let side = match &key.key {
        Some(proto::mapping_key::Key::UserId(id)) => user_id(id.clone()).map(Side::User),
        Some(proto::mapping_key::Key::StripeCustomerId(id)) => {
            customer_id(id.clone()).map(Side::Customer)
        }
        None => Err(missing_key(path.to_owned())),
    };
    let side = side.map_err(|violation| match key.key {
        None => violation,
        Some(_) => named(violation),
    });
    match (side, account("stripe_account", key.stripe_account.clone())) {
        (Ok(side), Ok(account)) => Ok(Key { account, side }),
        (side, account) => Err([side.err(), account.err().map(named)]
            .into_iter()
            .flatten()
            .collect()),
    }
}

fn page_size(raw: i32) -> Result<u64, FieldViolation> {
    match u64::try_from(raw) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
        Err(_) => Err(FieldViolation {
            field: "page_size".into(),
            description: format!("must not be negative, got {raw}"),
        }),
    }
}

fn page_cursor<T>(
    paged: Paged,
    token: &str,
    request: &[u8],
    cursor: impl FnOnce(&[u8]) -> Option<T>,
) -> Result<Option<T>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    page_token::decode(paged, token, request)
        .and_then(|bytes| cursor(&bytes))
        .map(Some)
        .ok_or_else(|| FieldViolation {
            field: "page_token".into(),
            description: "not a page token this service returned for this request; \
                          start again with an empty page_token"
                .into(),
        })
}

fn decode_list_cursor(bytes: &[u8]) -> Option<ListCursor> {
    let (micros, id) = bytes.split_first_chunk::<8>()?;
    let id: [u8; 8] = id.try_into().ok()?;
    Some(ListCursor {
        created_at: DateTime::from_timestamp_micros(i64::from_be_bytes(*micros))?,
        id: i64::from_be_bytes(id),
    })
}

fn decode_sequence(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}
