//! Watch from the client's side: opening streams, reading events with
//! their cursors, and the checks every Watch test makes of what arrived.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use customer_mapping::proto::{MappingEvent, WatchRequest, WatchResponse, mapping_event::Kind};
use tonic::{Status, Streaming};

use super::Client;

/// How long a test waits for events it expects.
pub const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

pub async fn watch(
    client: &mut Client,
    after: &str,
    from_beginning: bool,
) -> Result<Streaming<WatchResponse>, Status> {
    client
        .watch(WatchRequest {
            after: after.into(),
            from_beginning,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A Watch from now, and the cursor of its first response (a bookmark).
pub async fn watch_now(client: &mut Client) -> (Streaming<WatchResponse>, String) {
    let mut stream = watch(client, "", false).await.expect("Watch starts");
    let first = next(&mut stream).await.expect("the first response");
    assert!(first.events.is_empty(), "the first response is a bookmark");
    assert!(!first.cursor.is_empty(), "a bookmark carries a cursor");
    (stream, first.cursor)
}

/// The next response, bounded: a stream that goes silent fails the test.
pub async fn next(stream: &mut Streaming<WatchResponse>) -> Result<WatchResponse, Status> {
    match tokio::time::timeout(DELIVERY_LIMIT, stream.message()).await {
        Ok(Ok(Some(response))) => Ok(response),
        Ok(Ok(None)) => panic!("the stream ended without a status"),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no response within {DELIVERY_LIMIT:?}"),
    }
}

/// What a stream delivered: its events in order, and each cursor it
/// handed out with the number of events delivered before it.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub events: Vec<MappingEvent>,
    pub cursors: Vec<(usize, String)>,
}

impl Received {
    pub fn take(&mut self, response: WatchResponse) {
        self.events.extend(response.events);
        self.cursors.push((self.events.len(), response.cursor));
    }

    pub fn last_cursor(&self) -> &str {
        self.cursors.last().map_or("", |(_, c)| c.as_str())
    }
}

/// Reads `stream` until `count` events have arrived in all.
pub async fn read_until(
    stream: &mut Streaming<WatchResponse>,
    received: &mut Received,
    count: usize,
) {
    read_while(stream, received, |r| r.events.len() < count).await;
    assert_eq!(
        received.events.len(),
        count,
        "no more events than were made"
    );
}

/// Reads `stream` while `wanting` what it received, within
/// [`DELIVERY_LIMIT`] in all: bookmarks keep a stream talking, so a
/// stream that has skipped what the test waits for must fail it anyway.
pub async fn read_while(
    stream: &mut Streaming<WatchResponse>,
    received: &mut Received,
    wanting: impl Fn(&Received) -> bool,
) {
    let deadline = tokio::time::Instant::now() + DELIVERY_LIMIT;
    while wanting(received) {
        let response = tokio::time::timeout_at(deadline, stream.message()).await;
        match response {
            Ok(Ok(Some(response))) => received.take(response),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => panic!("the stream failed: {status:?}"),
            Err(_) => panic!(
                "still waiting after {DELIVERY_LIMIT:?}, {} events received",
                received.events.len()
            ),
        }
    }
}

/// Asserts that `delivered` holds each event of `expected` exactly once
/// (by sequence), and nothing else.
pub fn assert_exactly_once(delivered: &[MappingEvent], expected: &[MappingEvent]) {
    let mut seen = BTreeSet::new();
    let duplicated: Vec<i64> = delivered
        .iter()
        .filter(|e| !seen.insert(e.sequence))
        .map(|e| e.sequence)
        .collect();
    let wanted: BTreeSet<i64> = expected.iter().map(|e| e.sequence).collect();
    let missed: Vec<&i64> = wanted.difference(&seen).collect();
    let unexpected: Vec<&i64> = seen.difference(&wanted).collect();
    assert!(
        duplicated.is_empty() && missed.is_empty() && unexpected.is_empty(),
        "{} delivered, {} expected: duplicated {duplicated:?}, missed {missed:?}, unexpected {unexpected:?}",
        delivered.len(),
        expected.len()
    );
}

/// Asserts that the events of each user, and of each customer, arrive in
/// the order they committed: by increasing sequence (per key, the order of
/// commits), a Link never after a Link and an Unlink only of the mapping
/// the last Link made.
pub fn assert_per_key_order(events: &[MappingEvent]) {
    let mut last: HashMap<(bool, String), &MappingEvent> = HashMap::new();
    for event in events {
        let mapping = event
            .mapping
            .as_ref()
            .expect("an event carries its mapping");
        for key in [
            (true, mapping.user_id.clone()),
            (false, mapping.stripe_customer_id.clone()),
        ] {
            if let Some(previous) = last.get(&key) {
                assert!(
                    previous.sequence < event.sequence,
                    "{key:?}: event {} delivered after {}",
                    event.sequence,
                    previous.sequence
                );
                match (previous.kind(), event.kind()) {
                    (Kind::Linked, Kind::Unlinked) => assert_eq!(
                        previous.mapping, event.mapping,
                        "{key:?}: an Unlink of another mapping than the last Link's"
                    ),
                    (Kind::Unlinked, Kind::Linked) => {}
                    (a, b) => panic!(
                        "{key:?}: {a:?} then {b:?} ({} then {})",
                        previous.sequence, event.sequence
                    ),
                }
            }
            last.insert(key, event);
        }
    }
}
