use super::{Error, Mapping, Mappings, run_to_completion};
use crate::store::{self, entity::Model};

/// Page size when the caller asks for none.
pub const DEFAULT_PAGE_SIZE: u64 = 100;
/// Largest page; larger requests get this many.
pub const MAX_PAGE_SIZE: u64 = 1000;

/// Where the next page of List starts: after this mapping's place in the
/// order (creation time, then row id).
pub use store::list::After as ListCursor;

/// One page of List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub mappings: Vec<Mapping>,
    /// Set when more mappings follow.
    pub next: Option<ListCursor>,
}

impl Mappings {
    /// Up to `page_size` mappings after `after`, oldest first.
    pub async fn list(&self, after: Option<ListCursor>, page_size: u64) -> Result<ListPage, Error> {
        let (db, until) = (self.db()?.clone(), super::work_until());
        run_to_completion(async move {
            // One row more than asked tells whether another page follows.
            let mut rows = store::list::page(&db, after, page_size + 1, until).await?;
            let more = rows.len() as u64 > page_size;
            rows.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
            let next = match rows.last() {
                Some(last) if more => Some(cursor(last)),
                _ => None,
            };
            Ok(ListPage {
                mappings: rows
                    .into_iter()
                    .map(Mapping::try_from)
                    .collect::<Result<_, _>>()?,
                next,
            })
        })
        .await
    }
}

fn cursor(row: &Model) -> ListCursor {
    ListCursor {
        created_at: row.created_at,
        id: row.id,
    }
}
