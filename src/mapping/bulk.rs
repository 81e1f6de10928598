//! The bulk reads' bounds and pages: BatchGet and List.

use chrono::{DateTime, Utc};

use super::Mapping;

/// Most keys one BatchGet may ask for.
pub const MAX_BATCH_KEYS: usize = 1000;

/// Page size when the caller asks for none.
pub const DEFAULT_PAGE_SIZE: u64 = 100;
/// Largest page; larger requests get this many.
pub const MAX_PAGE_SIZE: u64 = 1000;

/// Where the next page of List starts: after this mapping's place in the
/// order (creation time, then the row's id). The order is total and a
/// mapping's place in it never changes, so a mapping present for a whole
/// traversal is on exactly one page whatever else changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub id: i64,
}

/// One page of List.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub mappings: Vec<Mapping>,
    /// Set when more mappings follow.
    pub next: Option<ListCursor>,
}
