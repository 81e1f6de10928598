//! `grpc.health.v1` driven by the database: SERVING only while it answers.
//!
//! One background task, [`supervise_database`], first opens the database
//! (connect, then migrate when configured), retrying every probe interval
//! while it does not answer, so the server starts and reports NOT_SERVING
//! instead of crash-looping. Once up, it pings the database every interval
//! and flips health both ways.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::DatabaseSettings,
    proto::SERVICE_NAME,
    store::{Database, Failure, Migrations, Store},
    telemetry::metrics,
};

/// Health of `""` (the whole server) and of the CustomerMapping service,
/// which always agree: the service is only as healthy as its database.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    /// `true` once shutdown began: from then on nothing may report SERVING.
    /// A mutex, not an atomic, so that a probe result and the shutdown can't
    /// interleave between the check and the update.
    stopping: std::sync::Arc<Mutex<bool>>,
}

impl Health {
    /// The reporter and the gRPC service to mount. tonic-health starts `""`
    /// as SERVING; we say NOT_SERVING until the first database check passes.
    pub async fn new() -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Self {
            reporter,
            stopping: Default::default(),
        };
        health.publish(false).await;
        (health, service)
    }

    /// Reports whether the database answers (ignored once shutting down).
    pub async fn set_serving(&self, serving: bool) {
        let stopping = self.stopping.lock().await;
        if !*stopping {
            self.publish(serving).await;
        }
    }

    /// NOT_SERVING for good: the server is shutting down. Open Watch streams
    /// get NOT_SERVING and then end: a graceful shutdown waits for every
    /// stream to finish, and a Watch never would.
    pub async fn shut_down(&self) {
        let mut stopping = self.stopping.lock().await;
        *stopping = true;
        self.publish(false).await;
        // Dropping a status' sender ends the streams watching it...
        let mut reporter = self.reporter.clone();
        for service in ["", SERVICE_NAME] {
            reporter.clear_service_status(service).await;
        }
        // ...and publishing again keeps Check answering NOT_SERVING.
        self.publish(false).await;
    }

    async fn publish(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(SERVICE_NAME, status).await;
        metrics::record_serving(serving);
    }
}

/// How often the database is checked, and how long a check may take.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Opens the database, publishes it in `store`, then keeps `health` in
/// step with it until `stop` is cancelled.
///
/// Failures that time can fix keep being retried every interval with
/// NOT_SERVING, but are logged once per change (the first failure, then
/// each change of kind), not once per probe: a long outage must not bury
/// the log.
pub async fn supervise_database(
    database: DatabaseSettings,
    probe: ProbeSettings,
    store: Store,
    health: Health,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(probe.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = false;
    let mut last_failure: Option<&'static str> = None;
    let mut opened = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        // Opening can take the whole connect timeout: shutdown must not
        // wait for it.
        let checked = tokio::select! {
            checked = check(&database, probe, &store, &mut opened) => checked,
            () = stop.cancelled() => return,
        };
        if let Some(db) = store.get() {
            metrics::record_pool(db.stats());
        }
        if let Err(failure) = &checked
            && last_failure != Some(failure.kind)
        {
            tracing::warn!(
                error = %failure,
                kind = failure.kind,
                retry_in = ?probe.interval,
                "database not ready to serve; checking again every interval (logged again \
                 when the kind of failure changes)"
            );
        }
        last_failure = checked.as_ref().err().map(|failure| failure.kind);
        let answered = checked.is_ok();
        // Publish changes only: every publication wakes every Watch stream.
        if answered != serving {
            if answered {
                tracing::info!("database answers: SERVING");
            } else {
                tracing::warn!("database stopped answering: NOT_SERVING");
            }
            serving = answered;
            health.set_serving(answered).await;
        }
    }
}

/// One probe: once the database is open and its schema is this
/// release's, a ping. Before that, opens it (kept in `opened` between
/// probes) and checks its schema; the database is published, and calls
/// served, only once the schema is there: until then they answer
/// UNAVAILABLE, and health NOT_SERVING.
async fn check(
    database: &DatabaseSettings,
    probe: ProbeSettings,
    store: &Store,
    opened: &mut Option<Database>,
) -> Result<(), Failure> {
    if let Some(db) = store.get() {
        return db.ping(probe.timeout).await;
    }
    let db = match opened.take() {
        Some(db) => db,
        None => {
            let migrations = if database.migrate_on_start {
                Migrations::Apply
            } else {
                Migrations::Leave
            };
            Database::open(database, migrations).await?
        }
    };
    if let Err(failure) = db.check_schema(probe.timeout).await {
        *opened = Some(db);
        return Err(failure);
    }
    store.set(db);
    tracing::info!(database = %database.redacted_url(), "database connected");
    Ok(())
}
