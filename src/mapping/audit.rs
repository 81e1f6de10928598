//! The audit trail: one event per committed change.

use chrono::{DateTime, Utc};

use super::Mapping;

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
