//! Watch: the change feed of this replica. One poller reads the feed from
//! the database ([`Feed::poll`]) and hands each batch to every watcher in
//! memory; a watcher that is not at the poller's position (it resumes from
//! a cursor, starts from the beginning, or fell behind) reads from the
//! database up to the poller's position first, then follows in memory. So
//! the database sees one read per poll whatever the number of watchers,
//! and a stuck watcher costs the server a bounded buffer, never the
//! others' latency. Why a position never skips is the store's
//! (`store/postgres/feed.rs`).

use std::{sync::Arc, time::Duration};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::WatchSettings,
    mapping::{Error, Event},
    store::{Database, FeedPosition, Store},
};

/// Most events in one read of the feed, hence in one response: a response
/// of 500 events of the longest ids is about 1.5 MB, under gRPC's
/// customary 4 MiB limit for what a client accepts.
pub const MAX_EVENTS_PER_RESPONSE: u64 = 500;

/// Batches kept for watchers that are a little behind; one further behind
/// reads from the database instead. Memory: at most this many batches of
/// [`MAX_EVENTS_PER_RESPONSE`] events, whatever the number of watchers.
const BATCHES_KEPT: usize = 64;

/// Responses a stream may have waiting for a slow reader before its
/// watcher stops taking batches (it reads from the database once the
/// reader catches up).
const RESPONSES_BUFFERED: usize = 2;

/// Watchers reading from the database at once; others wait their turn.
const CONCURRENT_CATCH_UPS: usize = 4;

/// Least time between two polls, however often this replica's own changes
/// ask for one: under a stream of Links, the poller reads at most this
/// often, each read taking every change since the last. Each read is a
/// query and a batch fanned out to every stream: fewer, larger batches cost
/// less per event, at the price of up to this much added lag.
const MIN_POLL_GAP: Duration = Duration::from_millis(20);

/// How long one read of the feed may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new watcher waits for the poller's first position (a
/// database that has just come up) before UNAVAILABLE.
const FIRST_POSITION_TIMEOUT: Duration = Duration::from_secs(5);

/// Tells the feed that this replica committed a change, so that watchers
/// get it without waiting for a poll.
#[derive(Debug, Clone, Default)]
pub struct Changes(Arc<Notify>);

impl Changes {
    pub fn committed(&self) {
        self.0.notify_one();
    }
}

/// Where a watcher starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Now: its first response is a bookmark.
    Now,
    /// Before the first event of the trail.
    Beginning,
    /// After a position handed out earlier.
    After(FeedPosition),
}

/// What a watcher receives: the next events (none in a bookmark) and the
/// position after them.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub events: Vec<Event>,
    pub position: FeedPosition,
}

/// Events read by the poller, between two of its positions. Numbered, so
/// that a watcher knows whether a batch continues from where it is.
#[derive(Debug)]
struct Batch {
    number: u64,
    from: FeedPosition,
    to: FeedPosition,
    events: Vec<Event>,
}

/// The poller's latest position at the end of a step (never in the middle
/// of a large one), and the number of the batch that reached it.
#[derive(Debug, Clone)]
struct Head {
    number: u64,
    position: FeedPosition,
}

/// This replica's change feed.
#[derive(Debug, Clone)]
pub struct Feed(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    store: Store,
    changes: Changes,
    batches: broadcast::Sender<Arc<Batch>>,
    head: watch::Sender<Option<Head>>,
    watchers: Arc<Semaphore>,
    catch_ups: Semaphore,
    settings: WatchSettings,
    stopping: CancellationToken,
}

impl Feed {
    /// The feed of `store`; streams end when `stopping` is cancelled.
    pub fn new(
        store: Store,
        changes: Changes,
        settings: WatchSettings,
        stopping: CancellationToken,
    ) -> Self {
        Self(Arc::new(Shared {
            store,
            changes,
            batches: broadcast::channel(BATCHES_KEPT).0,
            head: watch::channel(None).0,
            watchers: Arc::new(Semaphore::new(settings.max_watchers)),
            catch_ups: Semaphore::new(CONCURRENT_CATCH_UPS),
            settings,
            stopping,
        }))
    }

    /// The database, or UNAVAILABLE while it is not open.
    pub fn database(&self) -> Result<Database, Error> {
        self.0
            .store
            .get()
            .cloned()
            .ok_or_else(|| Error::Unavailable("the database is not connected yet".into()))
    }

    /// The id of the deployment of the database, which cursors carry.
    pub async fn deployment(&self) -> Result<String, Error> {
        let db = self.database()?;
        let until = super::work_until();
        super::run_to_completion(async move { Ok(db.deployment(until).await?.to_owned()) }).await
    }

    /// Resolves when the server begins to shut down.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.0.stopping.clone().cancelled_owned()
    }

    /// A new watcher from `start`: the receiving end of its deliveries,
    /// which end with an error (UNAVAILABLE when the server stops). Refused
    /// beyond `MAX_WATCHERS`.
    pub fn watch(&self, start: Start) -> Result<mpsc::Receiver<Result<Delivery, Error>>, Error> {
        let permit = Arc::clone(&self.0.watchers)
            .try_acquire_owned()
            .map_err(|_| Error::TooManyWatchers)?;
        let (tx, rx) = mpsc::channel(RESPONSES_BUFFERED);
        let watcher = Watcher {
            feed: self.clone(),
            batches: self.0.batches.subscribe(),
            heads: self.0.head.subscribe(),
            tx,
            _permit: permit,
        };
        tokio::spawn(watcher.run(start));
        // The poller reads only while someone watches.
        self.0.changes.committed();
        Ok(rx)
    }

    /// Polls until the server stops: reads every change since its
    /// position, when this replica commits one and every poll interval for
    /// the others'.
    pub async fn poll(self) {
        let shared = &self.0;
        let stopping = shared.stopping.clone();
        let mut poller = Poller::default();
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                () = shared.changes.0.notified() => {}
                () = tokio::time::sleep(shared.settings.watch_poll_interval) => {}
            }
            if let Some(db) = shared.store.get() {
                poller.poll(shared, db).await;
            }
            tokio::time::sleep(MIN_POLL_GAP).await;
        }
    }
}

/// The poller's state between polls.
#[derive(Debug, Default)]
struct Poller {
    /// Where the last batch handed out ended (possibly in the middle of a
    /// large step); `None` while nobody watches.
    at: Option<FeedPosition>,
    /// The number of the last batch or head handed out: it only grows, so
    /// a watcher never mistakes a batch for the one it expects.
    number: u64,
    /// Whether the last poll failed: logged once, and again on recovery.
    failing: bool,
    /// When the position last moved, to move it now and then while idle.
    moved: Option<Instant>,
}

impl Poller {
    async fn poll(&mut self, shared: &Shared, db: &Database) {
        // Nobody watches: no reads. A new watcher asks for a poll.
        if shared.batches.receiver_count() == 0 {
            if self.at.take().is_some() {
                shared.head.send_replace(None);
            }
            return;
        }
        let polled = match self.at.take() {
            None => self.start(shared, db).await,
            Some(at) => self.read_on(shared, db, at).await,
        };
        match polled {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("the change feed reads the database again");
            }
            Ok(()) => {}
            Err(err) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %err, "the change feed cannot read the database; retrying");
            }
            Err(_) => {}
        }
    }

    async fn start(&mut self, shared: &Shared, db: &Database) -> Result<(), Error> {
        let position = db.feed_present(Instant::now() + READ_TIMEOUT).await?;
        self.publish(shared, position);
        Ok(())
    }

    /// Reads every step since `at`, page by page, handing each page to the
    /// watchers as a batch, and publishes the position at the end of the
    /// step. An empty step moves the position only now and then: it
    /// delivers nothing, and keeping the position keeps the next read's
    /// range where it was.
    async fn read_on(
        &mut self,
        shared: &Shared,
        db: &Database,
        mut at: FeedPosition,
    ) -> Result<(), Error> {
        loop {
            // Kept on failure: the next poll reads on from the last batch.
            self.at = Some(at.clone());
            let until = Instant::now() + READ_TIMEOUT;
            let page = db.feed(&at, None, MAX_EVENTS_PER_RESPONSE, until).await?;
            let idle_for = self.moved.map_or(Duration::MAX, |moved| moved.elapsed());
            if page.events.is_empty() && idle_for < shared.settings.watch_bookmark_interval / 2 {
                return Ok(());
            }
            self.number += 1;
            let batch = Batch {
                number: self.number,
                from: at,
                to: page.position.clone(),
                events: page.events,
            };
            at = page.position;
            self.at = Some(at.clone());
            self.moved = Some(Instant::now());
            // No receiver is fine: every watcher may have just left.
            let _ = shared.batches.send(Arc::new(batch));
            if page.reached {
                shared.head.send_replace(Some(Head {
                    number: self.number,
                    position: at,
                }));
                return Ok(());
            }
        }
    }

    /// Starts over at `position`, under a new number.
    fn publish(&mut self, shared: &Shared, position: FeedPosition) {
        self.number += 1;
        self.moved = Some(Instant::now());
        self.at = Some(position.clone());
        shared.head.send_replace(Some(Head {
            number: self.number,
            position,
        }));
    }
}

/// One Watch stream's task.
struct Watcher {
    feed: Feed,
    batches: broadcast::Receiver<Arc<Batch>>,
    heads: watch::Receiver<Option<Head>>,
    tx: mpsc::Sender<Result<Delivery, Error>>,
    _permit: OwnedSemaphorePermit,
}

/// A watcher's place: its position, and the number of the poller's batch
/// that position is the end of (`None` while it is not at the poller's).
struct Place {
    position: FeedPosition,
    batch: Option<u64>,
    /// When a response was last sent, for bookmarks.
    sent: Instant,
}

/// Why a watcher stops: the stream is gone, or it ends with an error.
enum Stop {
    Gone,
    With(Error),
}

impl Watcher {
    async fn run(mut self, start: Start) {
        let stopping = self.feed.0.stopping.clone();
        let reader = self.tx.clone();
        let ended = tokio::select! {
            ended = self.follow(start) => ended,
            () = stopping.cancelled() => Stop::With(Error::ShuttingDown),
            // The stream was dropped (the caller left): free its place now,
            // not at the next delivery.
            () = reader.closed() => Stop::Gone,
        };
        if let Stop::With(err) = ended {
            // On shutdown the gRPC stream ends by itself; this only waits
            // for a slow reader until then.
            tokio::select! {
                _ = self.tx.send(Err(err)) => {}
                () = stopping.cancelled() => {}
            }
        }
    }

    async fn follow(&mut self, start: Start) -> Stop {
        let mut place = match self.place(start).await {
            Ok(place) => place,
            Err(stop) => return stop,
        };
        loop {
            let step = match place.batch {
                Some(_) => self.next_batch(&mut place).await,
                None => self.catch_up(&mut place).await,
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    async fn place(&mut self, start: Start) -> Result<Place, Stop> {
        let db = self.feed.database().map_err(Stop::With)?;
        let position = match start {
            Start::Now => {
                let head = self.first_head().await?;
                let place = Place {
                    position: head.position,
                    batch: Some(head.number),
                    sent: Instant::now(),
                };
                self.send(Vec::new(), &place.position).await?;
                return Ok(place);
            }
            Start::Beginning => db.feed_beginning(),
            Start::After(position) => position,
        };
        Ok(Place {
            position,
            batch: None,
            sent: Instant::now(),
        })
    }

    async fn first_head(&mut self) -> Result<Head, Stop> {
        let first = self.heads.wait_for(Option::is_some);
        match tokio::time::timeout(FIRST_POSITION_TIMEOUT, first).await {
            Ok(Ok(head)) => Ok(head.clone().expect("waited for a head")),
            _ => Err(Stop::With(Error::Unavailable(
                "the change feed has not read the database yet".into(),
            ))),
        }
    }

    /// Takes the poller's next batch: delivered when it continues from the
    /// watcher's position; otherwise the watcher fell behind and reads from
    /// the database.
    async fn next_batch(&mut self, place: &mut Place) -> Result<(), Stop> {
        let bookmark_due = place.sent + self.feed.0.settings.watch_bookmark_interval;
        let received = tokio::select! {
            received = self.batches.recv() => received,
            () = tokio::time::sleep_until(bookmark_due) => {
                return self.bookmark(place).await;
            }
        };
        let batch = match received {
            Ok(batch) => batch,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                place.batch = None;
                return Ok(());
            }
            Err(broadcast::error::RecvError::Closed) => {
                return Err(Stop::With(Error::ShuttingDown));
            }
        };
        let at = place.batch.unwrap_or(0);
        if batch.number <= at {
            return Ok(());
        }
        if batch.number != at + 1 || batch.from != place.position {
            place.batch = None;
            return Ok(());
        }
        if !batch.events.is_empty() {
            self.send(batch.events.clone(), &batch.to).await?;
            place.sent = Instant::now();
        }
        place.position = batch.to.clone();
        place.batch = Some(batch.number);
        Ok(())
    }

    /// Reads from the database up to the poller's latest position, then
    /// follows the poller. A position ahead of the poller's (a cursor from
    /// a replica that had read further) waits for the poller to pass it.
    async fn catch_up(&mut self, place: &mut Place) -> Result<(), Stop> {
        let head = self.first_head().await?;
        let db = self.feed.database().map_err(Stop::With)?;
        while place.position.is_within(&head.position) {
            if place.position == head.position {
                place.batch = Some(head.number);
                return Ok(());
            }
            let page = {
                let _turn = self.feed.0.catch_ups.acquire().await;
                let until = Instant::now() + READ_TIMEOUT;
                let read = db.feed(
                    &place.position,
                    Some(&head.position),
                    MAX_EVENTS_PER_RESPONSE,
                    until,
                );
                read.await.map_err(|err| Stop::With(err.into()))?
            };
            if !page.events.is_empty() {
                self.send(page.events, &page.position).await?;
                place.sent = Instant::now();
            }
            place.position = page.position;
        }
        // Ahead of the poller: wait for it, bookmarking meanwhile.
        let bookmark_due = place.sent + self.feed.0.settings.watch_bookmark_interval;
        tokio::select! {
            _ = self.heads.changed() => Ok(()),
            () = tokio::time::sleep_until(bookmark_due) => self.bookmark(place).await,
        }
    }

    async fn bookmark(&mut self, place: &mut Place) -> Result<(), Stop> {
        self.send(Vec::new(), &place.position).await?;
        place.sent = Instant::now();
        Ok(())
    }

    /// Sends a delivery, waiting for room while the reader is slow.
    async fn send(&mut self, events: Vec<Event>, position: &FeedPosition) -> Result<(), Stop> {
        let delivery = Delivery {
            events,
            position: position.clone(),
        };
        self.tx.send(Ok(delivery)).await.map_err(|_| Stop::Gone)
    }
}
