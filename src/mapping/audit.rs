use chrono::{DateTime, Utc};

use super::{
    Error, InvalidId, Key, Mapping, Mappings, StripeCustomerId, UserId, run_to_completion,
};
use crate::store::{self, Side, event_entity::Model, events};

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Linked,
    Unlinked,
}

/// One committed change, from the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sequence: i64,
    pub kind: EventKind,
    /// The mapping created, or as it was before removal.
    pub mapping: Mapping,
    pub time: DateTime<Utc>,
    pub caller: String,
    pub request_id: String,
}

/// One page of ListEvents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsPage {
    pub events: Vec<Event>,
    /// The sequence to continue after, when more events follow.
    pub next: Option<i64>,
}

impl Mappings {
    /// Up to `page_size` events after sequence `after`, in sequence order;
    /// only those about mappings holding `key` when given.
    pub async fn list_events(
        &self,
        key: Option<Key>,
        after: Option<i64>,
        page_size: u64,
    ) -> Result<EventsPage, Error> {
        let (db, until) = (self.db()?.clone(), super::work_until());
        run_to_completion(async move {
            let side = key.as_ref().map(|key| match key {
                Key::User(id) => Side::User(id.as_str()),
                Key::Customer(id) => Side::Customer(id.as_str()),
            });
            let mut rows = store::events::page(&db, side, after, page_size + 1, until).await?;
            let more = rows.len() as u64 > page_size;
            rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
            let next = rows.last().filter(|_| more).map(|last| last.sequence);
            Ok(EventsPage {
                events: rows
                    .into_iter()
                    .map(Event::try_from)
                    .collect::<Result<_, _>>()?,
                next,
            })
        })
        .await
    }
}

impl TryFrom<Model> for Event {
    type Error = Error;

    /// Events are written only from validated mappings; one that does not
    /// parse was edited by hand: internal, not the caller's.
    fn try_from(row: Model) -> Result<Self, Error> {
        let corrupt = |why: String| {
            Error::Internal(format!("stored event {} is invalid: {why}", row.sequence).into())
        };
        let kind = match row.kind {
            events::KIND_LINKED => EventKind::Linked,
            events::KIND_UNLINKED => EventKind::Unlinked,
            other => return Err(corrupt(format!("unknown kind {other}"))),
        };
        let invalid = |e: InvalidId| corrupt(e.to_string());
        Ok(Event {
            sequence: row.sequence,
            kind,
            mapping: Mapping {
                user_id: UserId::parse(row.user_id.clone()).map_err(invalid)?,
                stripe_customer_id: StripeCustomerId::parse(row.stripe_customer_id.clone())
                    .map_err(invalid)?,
                created_at: row.mapping_created_at,
            },
            time: row.time,
            caller: row.caller,
            request_id: row.request_id,
        })
    }
}
