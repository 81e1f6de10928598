//! A database that goes silent: bytes accepted, never answered, no RST, no
//! FIN (a hung server, a partition, a failed-over primary whose address
//! vanished). The service must end every call within its deadline, report
//! NOT_SERVING within one probe interval plus the probe timeout, and serve
//! again within 10 s of a working path returning, with no restart, while
//! the connections opened before stay silent forever. Each scenario reports
//! operations checked, indeterminate, seconds to NOT_SERVING and seconds
//! from the heal to ten OK calls in a row.

use crate::helpers;

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use customer_mapping::{config::Settings, proto::get_request};
use helpers::{
    Backend, TestDatabase,
    history::{self, Control, Event, History, Load, Op, Outcome},
    proxy::upstream_of,
    silent_proxy::SilentProxy,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// Long enough to outlast every deadline, the pool's timeouts and the
/// server's idle-in-transaction timeout (5 s): whatever was in flight is
/// cut off for good before the path comes back.
const SILENCE: Duration = Duration::from_secs(8);

/// Deadline of every call in these scenarios, as in the trial.
const DEADLINE: Duration = Duration::from_secs(2);

/// What the service promises after a heal.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// Room for a loaded machine (four agents compiling and testing on two
/// cores) on top of the bounds under test.
const SCHEDULING_SLACK: Duration = Duration::from_millis(1500);

/// Settings for a server reaching `url` through the silent proxy: probes
/// every 500 ms with a 500 ms timeout, short pool timeouts.
fn settings(url: String) -> Settings {
    let mut settings = helpers::test_settings(url);
    settings.database.database_acquire_timeout = Duration::from_millis(500);
    settings.database.database_connect_timeout = Duration::from_millis(500);
    settings.health.health_probe_interval = Duration::from_millis(500);
    settings.health.health_probe_timeout = Duration::from_millis(500);
    settings
}

/// What a call cut off by the outage may end with: UNAVAILABLE or
/// DEADLINE_EXCEEDED from the server, or CANCELLED ("Timeout expired"),
/// which is how a tonic client reports its own deadline passing first.
fn cut_off(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    )
}

fn not_serving_bound(settings: &Settings) -> Duration {
    settings.health.health_probe_interval + settings.health.health_probe_timeout + SCHEDULING_SLACK
}

async fn table(url: &str) -> HashSet<(history::Key, history::Key)> {
    let db = sea_orm::Database::connect(url)
        .await
        .expect("connect to read the table");
    let rows = helpers::read_mappings(&db).await;
    db.close().await.expect("close");
    history::table_pairs(rows)
}

/// A Get with `DEADLINE`, classified.
async fn get(client: &mut helpers::Client, key: get_request::Key) -> Result<Outcome, Code> {
    let mut request = tonic::Request::new(customer_mapping::proto::GetRequest {
        key: Some(key),
        ..Default::default()
    });
    request.set_timeout(DEADLINE);
    match client.get(request).await {
        Ok(reply) => {
            let m = reply.into_inner().mapping.expect("a mapping");
            Ok(Outcome::Mapping(
                m.user_id
                    .trim_start_matches("user-")
                    .parse()
                    .expect("a user"),
                m.stripe_customer_id
                    .trim_start_matches("cus_")
                    .parse()
                    .expect("a customer"),
            ))
        }
        Err(status) if status.code() == Code::NotFound => Ok(Outcome::NotFound),
        Err(status) => Err(status.code()),
    }
}

/// Calls Get on a fresh connection until ten in a row are answered by the
/// database (a mapping or NOT_FOUND), bounded by `limit` from `since`.
/// Returns how long after `since` the tenth came.
async fn ten_answers_in_a_row(addr: SocketAddr, since: Instant, limit: Duration) -> Duration {
    let mut client = helpers::connect(addr).await;
    let mut in_a_row = 0;
    let mut last_error = None;
    while in_a_row < 10 {
        assert!(
            since.elapsed() < limit,
            "no ten answered calls in a row within {limit:?} (last error {last_error:?})"
        );
        match get(&mut client, get_request::Key::UserId("user-0".into())).await {
            Ok(_) => in_a_row += 1,
            Err(code) => {
                in_a_row = 0;
                last_error = Some(code);
                // Pacing between failed attempts, not synchronization.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    since.elapsed()
}

/// Get-only callers beside the checked load, as the eight clients:
/// they record what they saw (a lost read changes nothing, so they add no
/// work to the checker) and check that every call ended within its
/// deadline with an answer or UNAVAILABLE / DEADLINE_EXCEEDED.
fn start_readers(
    addr: SocketAddr,
    n: usize,
    users: usize,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<History> {
    tokio::spawn(async move {
        let readers = (0..n).map(|i| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut client = helpers::connect(addr).await;
                let mut history = History::default();
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    k = (k + 1) % users;
                    let invoked = started.elapsed();
                    let call = Instant::now();
                    let outcome = get(&mut client, get_request::Key::UserId(format!("user-{k}")));
                    let outcome = outcome.await;
                    let took = call.elapsed();
                    assert!(
                        took <= DEADLINE + SCHEDULING_SLACK,
                        "a Get took {took:?}, past its {DEADLINE:?} deadline"
                    );
                    let outcome = match outcome {
                        Ok(outcome) => outcome,
                        Err(code) if cut_off(code) => Outcome::Unknown,
                        Err(code) => panic!("a Get ended {code:?}"),
                    };
                    history.events.push(Event {
                        op: Op::GetByUser(k as history::Key),
                        outcome,
                        invoked: invoked.as_nanos() as u64,
                        completed: if outcome == Outcome::Unknown {
                            u64::MAX
                        } else {
                            started.elapsed().as_nanos() as u64
                        },
                    });
                    if outcome == Outcome::Unknown {
                        // Pacing during the outage, not synchronization.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                history
            })
        });
        History::merge(
            futures::future::join_all(readers)
                .await
                .into_iter()
                .map(|h| h.expect("no reader panicked")),
        )
    })
}

/// Silence under load on PostgreSQL: four clients running the checked
/// Link/Get/Unlink mix and four reading, 2 s deadlines; the path goes
/// silent for 8 s, then a working path returns while the old connections
/// stay silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_under_load_on_postgres() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url.clone();
    let proxy = SilentProxy::start(upstream_of(&url).await).await;
    let settings = settings(proxy.through(&url));
    let not_serving_within = not_serving_bound(&settings);
    let app = helpers::spawn_on(Backend::Postgres, database, settings).await;

    let seed: u64 = rand::random();
    let load = Load {
        clients: 4,
        operations_per_client: 100_000,
        deadline: DEADLINE,
        // Every call in the silence is indeterminate; the checker's search
        // grows exponentially with those (17 of them once made it give up),
        // so clients pause long after one: a few each over the silence.
        // The readers keep the load up meanwhile.
        pause_after_unknown: Duration::from_secs(3),
        ..Load::small(seed)
    };
    let started = Instant::now();
    let control = Control::default();
    let stop = control.stop.clone();
    let checked_load = tokio::spawn({
        let (control, addr) = (control.clone(), app.addr);
        async move { history::run_load(&[addr], load, started, Some(control)).await }
    });
    let readers = start_readers(app.addr, 4, load.users, started, stop.clone());

    // Let the load make progress first.
    control.answered_more(50).await;
    proxy.silence();
    let silenced = Instant::now();
    helpers::wait_for_health(app.addr, "", ServingStatus::NotServing).await;
    let to_not_serving = silenced.elapsed();
    tokio::time::sleep(SILENCE.saturating_sub(silenced.elapsed())).await;

    proxy.heal();
    let healed = Instant::now();
    helpers::wait_for_health(app.addr, "", ServingStatus::Serving).await;
    let to_serving = healed.elapsed();
    let to_ten_ok = ten_answers_in_a_row(app.addr, healed, RECOVERY_BOUND).await;
    // Some load after the recovery, to check what it sees.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let history = History::merge([
        checked_load.await.expect("the load did not panic"),
        readers.await.expect("the readers did not panic"),
    ]);

    let (checked, unknown) = history::assert_linearizable(
        &format!("PostgreSQL silent for {SILENCE:?} under load (seed {seed})"),
        &history,
        load.users,
        &table(&url).await,
    );
    helpers::report(&format!(
        "silence under load: {checked} operations checked, {unknown} indeterminate, \
         NOT_SERVING after {:.2} s, SERVING {:.2} s and ten OK calls in a row {:.2} s after \
         the heal",
        to_not_serving.as_secs_f64(),
        to_serving.as_secs_f64(),
        to_ten_ok.as_secs_f64()
    ));
    assert!(
        to_not_serving <= not_serving_within,
        "NOT_SERVING took {to_not_serving:?}"
    );
    assert!(to_ten_ok <= RECOVERY_BOUND, "recovery took {to_ten_ok:?}");
    assert!(
        checked > 100 && unknown > 0,
        "{checked} checked, {unknown} unknown"
    );
}

/// A Link with `DEADLINE`, timed.
async fn link(
    client: &mut helpers::Client,
    user: &str,
    customer: &str,
) -> (Result<bool, tonic::Status>, Duration) {
    let mut request = tonic::Request::new(customer_mapping::proto::LinkRequest {
        user_id: user.into(),
        stripe_customer_id: customer.into(),
        ..Default::default()
    });
    request.set_timeout(DEADLINE);
    let started = Instant::now();
    let reply = client.link(request).await;
    (reply.map(|r| r.into_inner().created), started.elapsed())
}

/// One Link whose statement is caught by the silence (Link is one
/// autocommit statement, so the statement is its COMMIT): delivered (it
/// commits, the answer is lost) or swallowed (it never reaches the
/// database). The Link ends within its deadline as indeterminate; after the
/// heal the service serves within 10 s and the same Link then tells the
/// truth: not created again if the statement ran, created if it did not.
async fn a_link_silenced_waiting_for_commit(deliver: bool) {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url.clone();
    let proxy = SilentProxy::start(upstream_of(&url).await).await;
    // In plaintext, so that the proxy can see the Link's parameters go by.
    let mut through = url::Url::parse(&proxy.through(&url)).expect("a URL");
    through.query_pairs_mut().append_pair("sslmode", "disable");
    let settings = settings(through.to_string());
    let not_serving_within = not_serving_bound(&settings);
    let app = helpers::spawn_on(Backend::Postgres, database, settings).await;
    let started = Instant::now();
    let mut history = History::default();
    let mut client = app.new_client().await;

    // The Bind message of the Link statement carries its ids; nothing else
    // the service sends does.
    proxy.silence_when_client_sends(b"cus_1", deliver);
    let invoked = started.elapsed().as_nanos() as u64;
    let silenced = Instant::now();
    let (reply, took) = link(&mut client, "user-1", "cus_1").await;
    let status = reply.expect_err("the Link's statement was never answered");
    assert!(cut_off(status.code()), "{status:?}");
    assert!(
        took <= DEADLINE + SCHEDULING_SLACK,
        "the Link took {took:?}"
    );
    history.events.push(Event {
        op: Op::Link(1, 1),
        outcome: Outcome::Unknown,
        invoked,
        completed: u64::MAX,
    });
    helpers::wait_for_health(app.addr, "", ServingStatus::NotServing).await;
    let to_not_serving = silenced.elapsed();

    // Heal at once: the stuck session, if any, still holds its locks.
    proxy.heal();
    let healed = Instant::now();
    let to_ten_ok = ten_answers_in_a_row(app.addr, healed, RECOVERY_BOUND).await;
    let created = loop {
        assert!(
            healed.elapsed() < RECOVERY_BOUND,
            "the same Link kept failing for {RECOVERY_BOUND:?} after the heal"
        );
        let invoked = started.elapsed().as_nanos() as u64;
        match link(&mut client, "user-1", "cus_1").await.0 {
            Ok(created) => {
                history.events.push(Event {
                    op: Op::Link(1, 1),
                    outcome: if created {
                        Outcome::Created
                    } else {
                        Outcome::AlreadyLinked
                    },
                    invoked,
                    completed: started.elapsed().as_nanos() as u64,
                });
                break created;
            }
            // Waiting behind the stuck session's locks until PostgreSQL
            // ends it: indeterminate, try again.
            Err(status) if cut_off(status.code()) => {
                history.events.push(Event {
                    op: Op::Link(1, 1),
                    outcome: Outcome::Unknown,
                    invoked,
                    completed: u64::MAX,
                });
            }
            Err(status) => panic!("the Link after the heal: {status:?}"),
        }
    };
    let to_linked = healed.elapsed();
    assert_eq!(
        created,
        !deliver,
        "created = {created}, though the first Link statement was {}",
        if deliver { "delivered" } else { "swallowed" }
    );
    let (checked, unknown) = history::assert_linearizable(
        &format!(
            "a Link's statement {}",
            if deliver {
                "delivered, answer lost"
            } else {
                "swallowed"
            }
        ),
        &history,
        3,
        &table(&url).await,
    );
    helpers::report(&format!(
        "silence at the Link statement ({}): {checked} operations checked, {unknown} indeterminate, \
         NOT_SERVING after {:.2} s, ten OK calls in a row {:.2} s and the same Link answered \
         {:.2} s after the heal",
        if deliver { "delivered" } else { "swallowed" },
        to_not_serving.as_secs_f64(),
        to_ten_ok.as_secs_f64(),
        to_linked.as_secs_f64(),
    ));
    assert!(
        to_not_serving <= DEADLINE + not_serving_within,
        "NOT_SERVING took {to_not_serving:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_commit_was_delivered_and_its_answer_lost() {
    a_link_silenced_waiting_for_commit(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_commit_was_swallowed() {
    a_link_silenced_waiting_for_commit(false).await;
}

/// Silent from the start: the server starts anyway, says NOT_SERVING and
/// answers UNAVAILABLE within the deadline, and serves within 10 s of the
/// path returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_at_start_up() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url.clone();
    let proxy = SilentProxy::start(upstream_of(&url).await).await;
    proxy.silence();
    let app =
        helpers::spawn_unready(Backend::Postgres, database, settings(proxy.through(&url))).await;
    helpers::wait_for_health(app.addr, "", ServingStatus::NotServing).await;
    let mut client = app.new_client().await;
    let silenced = Instant::now();
    // Several start-up attempts (each bounded by the connect timeout) fail
    // while the calls keep being answered.
    while silenced.elapsed() < Duration::from_secs(3) {
        let call = Instant::now();
        let code = get(&mut client, get_request::Key::UserId("user-0".into()))
            .await
            .expect_err("no database yet");
        assert_eq!(code, Code::Unavailable);
        assert!(call.elapsed() <= DEADLINE + SCHEDULING_SLACK);
        // Pacing, not synchronization.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.heal();
    let healed = Instant::now();
    helpers::wait_for_health(app.addr, "", ServingStatus::Serving).await;
    let to_serving = healed.elapsed();
    let to_ten_ok = ten_answers_in_a_row(app.addr, healed, RECOVERY_BOUND).await;
    helpers::report(&format!(
        "silence at start-up: SERVING {:.2} s and ten OK calls in a row {:.2} s after the heal",
        to_serving.as_secs_f64(),
        to_ten_ok.as_secs_f64()
    ));
    assert!(to_ten_ok <= RECOVERY_BOUND, "recovery took {to_ten_ok:?}");
}

/// Every call is seen: with the database silent, a Link cut off by its
/// deadline and a Get whose caller gives up each get exactly one log line
/// and one count in `grpc_server_handled_total` (DEADLINE_EXCEEDED and
/// CANCELLED), and the server ended the Link within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_logged_and_counted_while_the_database_is_silent() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let proxy = SilentProxy::start(upstream_of(&database.url).await).await;
    let url = proxy.through(&database.url);
    let server = helpers::process::ServerProcess::start(&[
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_MAX_CONNECTIONS", "4"),
        ("METRICS_ADDR", "127.0.0.1:0"),
        // One probe at start, none during the test: the calls below meet
        // the silence on the connections the pool holds, not a pool the
        // probe already emptied.
        ("HEALTH_PROBE_INTERVAL", "10m"),
    ]);
    let metrics = server.metrics_addr();
    helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    let mut client = helpers::connect(server.addr).await;
    proxy.silence();

    // Cut off by its deadline.
    let deadline = Duration::from_secs(1);
    let mut request = tonic::Request::new(customer_mapping::proto::LinkRequest {
        user_id: "user-1".into(),
        stripe_customer_id: "cus_1".into(),
        ..Default::default()
    });
    request.set_timeout(deadline);
    request
        .metadata_mut()
        .insert("x-request-id", "silent-deadline".parse().expect("ascii"));
    let status = client
        .link(request)
        .await
        .expect_err("the database is silent");
    assert!(cut_off(status.code()), "{status:?}");

    // Given up by its caller once its database work has begun.
    let before = proxy.swallowed_from_clients();
    let mut request = tonic::Request::new(customer_mapping::proto::GetRequest {
        key: Some(get_request::Key::UserId("user-2".into())),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(30));
    request
        .metadata_mut()
        .insert("x-request-id", "silent-cancel".parse().expect("ascii"));
    let mut cancelled_client = helpers::connect(server.addr).await;
    let call = tokio::spawn(async move { cancelled_client.get(request).await });
    let waiting = Instant::now();
    while proxy.swallowed_from_clients() == before {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the Get never reached the database"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    call.abort();

    let lines_for = |id: &str| {
        server
            .events()
            .into_iter()
            .filter(|e| e["message"] == "rpc" && e["request_id"] == id)
            .collect::<Vec<_>>()
    };
    server.wait_for_event(|e| e["message"] == "rpc" && e["request_id"] == "silent-cancel");
    server.wait_for_event(|e| e["message"] == "rpc" && e["request_id"] == "silent-deadline");
    let link = lines_for("silent-deadline");
    assert_eq!(link.len(), 1, "one line for the Link: {link:?}");
    assert_eq!(link[0]["method"], "Link");
    assert_eq!(link[0]["code"], "DeadlineExceeded");
    let latency = link[0]["latency_ms"].as_f64().expect("a latency");
    assert!(
        latency <= (deadline + SCHEDULING_SLACK).as_secs_f64() * 1000.0,
        "the server answered the Link after {latency} ms, past its deadline"
    );
    let get = lines_for("silent-cancel");
    assert_eq!(get.len(), 1, "one line for the Get: {get:?}");
    assert_eq!(get[0]["method"], "Get");
    assert_eq!(get[0]["code"], "Canceled");

    let (_, body) = crate::metrics::http_get(metrics, "/metrics").await;
    let handled = |method: &str, code: &str| {
        crate::metrics::sample(
            &body,
            "grpc_server_handled_total",
            &[
                &format!("grpc_method=\"{method}\""),
                &format!("grpc_code=\"{code}\""),
            ],
        )
    };
    assert_eq!(handled("Link", "DeadlineExceeded"), Some(1.0), "{body}");
    assert_eq!(handled("Get", "Canceled"), Some(1.0), "{body}");
    helpers::report(&format!(
        "every call seen, database silent: Link cut off by its {deadline:?} deadline logged and \
         counted once as DeadlineExceeded ({latency:.0} ms), a Get given up by its caller once as \
         Canceled"
    ));
}
