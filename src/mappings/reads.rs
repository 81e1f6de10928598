//! The bulk reads: BatchGet, List and ListEvents.

use std::collections::HashMap;

use super::{Mappings, run_to_completion, work_until};
use crate::mapping::{Error, EventsPage, Key, ListCursor, ListPage, Mapping, StripeAccount};

impl Mappings {
    /// The mapping holding each of `keys` (`None` where none does), in the
    /// order asked, all as they were at one instant.
    pub async fn batch_get(&self, keys: Vec<Key>) -> Result<Vec<Option<Mapping>>, Error> {
        let (db, until) = (self.db()?, work_until());
        run_to_completion(async move {
            let found = db.holding_any(&keys, until).await?;
            let mut by_key: HashMap<Key, &Mapping> = HashMap::with_capacity(2 * found.len());
            for mapping in &found {
                for key in mapping.keys() {
                    by_key.insert(key, mapping);
                }
            }
            Ok(keys
                .iter()
                .map(|key| by_key.get(key).map(|m| (*m).clone()))
                .collect())
        })
        .await
    }

    /// Up to `page_size` mappings after `after`, oldest first; only those
    /// of `account` when given.
    pub async fn list(
        &self,
        account: Option<StripeAccount>,
        after: Option<ListCursor>,
        page_size: u64,
    ) -> Result<ListPage, Error> {
        let (db, until) = (self.db()?, work_until());
        run_to_completion(async move {
            // One row more than asked tells whether another page follows.
            let mut rows = db
                .list(account.as_ref(), after, page_size + 1, until)
                .await?;
            let more = truncate(&mut rows, page_size);
            let next = rows.last().filter(|_| more).map(|(_, cursor)| *cursor);
            Ok(ListPage {
                mappings: rows.into_iter().map(|(mapping, _)| mapping).collect(),
                next,
            })
        })
        .await
    }

    /// Up to `page_size` events after sequence `after`, in sequence order;
    /// only those about mappings holding `key` when given.
    pub async fn list_events(
        &self,
        key: Option<Key>,
        after: Option<i64>,
        page_size: u64,
    ) -> Result<EventsPage, Error> {
        let (db, until) = (self.db()?, work_until());
        run_to_completion(async move {
            let mut events = db.events(key.as_ref(), after, page_size + 1, until).await?;
            let more = truncate(&mut events, page_size);
            let next = events.last().filter(|_| more).map(|last| last.sequence);
            Ok(EventsPage { events, next })
        })
        .await
    }
}

/// Cuts `rows` to `page_size`; whether there were more.
fn truncate<T>(rows: &mut Vec<T>, page_size: u64) -> bool {
    let more = rows.len() as u64 > page_size;
    rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
    more
}
