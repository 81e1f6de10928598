//! Load generator: the service against the database's own ceiling.
//!
//! For each database it starts the release server as a child process, loads
//! the table, measures the gRPC floor (health Check through the same server,
//! client and connections: no database work), and for every scenario and
//! concurrency runs the same work twice: through gRPC against the service,
//! and as the cheapest SQL that does the job, sent straight to the database
//! (same concurrency, same pool size, no ping before acquire): the ceiling
//! no service can beat. It prints both and their ratio, each process' CPU
//! per call, the server's peak RSS and its time from start to SERVING.
//!
//!     cargo bench --bench loadgen -- --help
//!     cargo bench --bench loadgen -- --database postgres --in-flight 32
//!     cargo bench --bench loadgen -- --smoke          # a few seconds, CI
//!     cargo bench --bench loadgen -- --import-rows 1000000
//!     cargo bench --bench loadgen -- --watchers 0 1 100 1000
//!
//! `--watchers N...` runs every scenario once per count with that many
//! Watch streams open (each reading everything), and reports the server's
//! RSS per idle watcher and the delivery lag of every event every watcher
//! received (from the event's `time`, taken by the server before its
//! change committed, to its arrival). With `--watch-another-replica` the
//! watchers connect to a second server on the same database (the lag of
//! changes made through another replica); with `--watchers-stalled` they
//! read nothing after their first response.
//!
//! `--import-rows N` measures `customer-mapping import` instead: a generated
//! CSV of N rows into an empty database (all created), the same file again
//! (all present), and a dry run, each with its wall time and the import
//! process's peak RSS.
//!
//! The ceilings: one prepared `SELECT ... WHERE key = $1` for get, and one
//! autocommit `INSERT ... ON CONFLICT DO NOTHING RETURNING` for every Link
//! scenario (it cannot tell a replay from a conflict, or name the holder,
//! which the service must: a bar, not the service's own SQL).

// The test helpers, shared rather than copied: the benchmark starts the
// server and its databases exactly as the tests do. It uses only part of
// them.
#[allow(dead_code)]
#[path = "../tests/api/helpers/mod.rs"]
mod helpers;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use customer_mapping::proto::{
    GetRequest, LinkRequest, PrepareLinkRequest, UnlinkRequest, WatchRequest,
    customer_mapping_client::CustomerMappingClient, get_request, unlink_request,
};
use hdrhistogram::Histogram;
use helpers::{
    Backend, TestDatabase,
    process::{Output, ServerProcess, memory_kib},
};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use sea_orm::sqlx::{self, Row};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A pool straight to the database, bypassing the service.
#[derive(Clone)]
enum Pool {
    Pg(Arc<PgConnections>),
    Sqlite(sqlx::SqlitePool),
}

/// Runs the same code on either pool (their types differ, the SQL doesn't).
/// On PostgreSQL `$p` is one connection, put back only if `$body` did not
/// return an error early.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Pg(connections) => {
                let (slot, mut connection) = connections.take().await?;
                let result = {
                    let $p = &mut connection;
                    $body
                };
                connections.put(connection, slot);
                result
            }
            Pool::Sqlite($p) => $body,
        }
    };
}

/// The ceiling's PostgreSQL connections: none is pinged, neither when handed
/// out nor when given back. sqlx's pool always pings a connection it takes
/// back (`return_to_pool`, sqlx-core 0.9), one more round trip per
/// statement that the service, which holds its own connections, does not
/// pay: with it the ceiling was not the cheapest way to run the statement.
struct PgConnections {
    options: sqlx::postgres::PgConnectOptions,
    idle: std::sync::Mutex<Vec<sqlx::PgConnection>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl PgConnections {
    async fn take(
        &self,
    ) -> Result<(tokio::sync::OwnedSemaphorePermit, sqlx::PgConnection), sqlx::Error> {
        use sqlx::Connection;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = self.idle.lock().expect("idle connections").pop();
        let connection = match idle {
            Some(connection) => connection,
            None => sqlx::PgConnection::connect_with(&self.options).await?,
        };
        Ok((slot, connection))
    }

    fn put(&self, connection: sqlx::PgConnection, slot: tokio::sync::OwnedSemaphorePermit) {
        self.idle.lock().expect("idle connections").push(connection);
        drop(slot);
    }

    async fn close(&self) {
        use sqlx::Connection;
        let idle = std::mem::take(&mut *self.idle.lock().expect("idle connections"));
        for connection in idle {
            let _ = connection.close().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Db {
    Postgres,
    Sqlite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Random hits by user id and by customer id over the preloaded rows.
    Get,
    /// Links of fresh pairs.
    LinkNew,
    /// Idempotent repeats of existing pairs.
    LinkReplay,
    /// Links that get ALREADY_EXISTS.
    LinkConflict,
    /// 90% get, 5% link-new, 5% unlink then relink.
    Mixed,
    /// PrepareLink: half of linked users (the mapping), half of users
    /// never linked (a creation). Its direct-SQL bar is a Get by user.
    Prepare,
}

#[derive(Debug, Parser)]
#[command(about = "customer-mapping load generator: the service vs. direct SQL")]
struct Args {
    #[arg(long, value_enum, num_args = 1.., default_values_t = [Db::Postgres, Db::Sqlite])]
    database: Vec<Db>,
    #[arg(long, value_enum, num_args = 1.., default_values_t = [Scenario::Get, Scenario::LinkNew, Scenario::LinkReplay, Scenario::LinkConflict, Scenario::Mixed, Scenario::Prepare])]
    scenario: Vec<Scenario>,
    /// Requests in flight (one list entry per run).
    #[arg(long, num_args = 1.., default_values_t = [32])]
    in_flight: Vec<usize>,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Database pool size, for the server and for the direct-SQL ceiling.
    #[arg(long, default_value_t = 10)]
    pool_size: u32,
    /// Measured time per run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Mappings preloaded before the runs.
    #[arg(long, default_value_t = 10_000)]
    rows: u64,
    /// Watch streams open during the scenarios (one pass of every scenario
    /// per count).
    #[arg(long, num_args = 1.., default_values_t = [0])]
    watchers: Vec<usize>,
    /// Connect the watchers to a second replica on the same database, so
    /// that their lag is that of changes made through another replica.
    #[arg(long)]
    watch_another_replica: bool,
    /// Watchers take their first response, then read nothing: the
    /// server's cost of streams whose readers stopped.
    #[arg(long)]
    watchers_stalled: bool,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
    /// Extra environment for the server, e.g. `TOKIO_WORKER_THREADS=1`
    /// (repeatable). Keep the "serving" line at INFO (`customer_mapping=info`):
    /// the address is read from it.
    #[arg(long, value_parser = parse_env)]
    server_env: Vec<(String, String)>,
    /// Another server binary to run, and to import with (A/B comparisons of
    /// builds); default: this build's.
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
    /// Measure `customer-mapping import` of a generated CSV of this many
    /// rows instead of the load scenarios.
    #[arg(long)]
    import_rows: Option<u64>,
    /// With `--import-rows`: spread the rows over this many connected
    /// accounts and the platform's own, named in a `stripe_account` column
    /// (`--account-column`).
    #[arg(long, default_value_t = 0)]
    import_accounts: u64,
    /// A few seconds of everything, small: proves the tool works (CI).
    #[arg(long)]
    smoke: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {raw:?}"))
}

/// What one run measured.
#[derive(Debug)]
struct Measured {
    ops: u64,
    seconds: f64,
    latency_us: Histogram<u64>,
    codes: BTreeMap<String, u64>,
    /// CPU spent during the measured window, by process.
    cpu: Cpu,
}

/// CPU seconds (user + system) of the load generator (the client), the
/// server process and every PostgreSQL process. On a machine where all
/// three share the cores, throughput is bounded by the sum per operation:
/// this is how the report shows where the time goes.
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    client: f64,
    server: f64,
    database: f64,
}

impl Cpu {
    fn now(server_pid: u32) -> Self {
        let database = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                std::fs::read_to_string(entry.path().join("comm"))
                    .is_ok_and(|comm| comm.trim() == "postgres")
            })
            .filter_map(|entry| cpu_seconds(&entry.file_name().to_string_lossy()))
            .sum();
        Self {
            client: cpu_seconds("self").unwrap_or(0.0),
            server: cpu_seconds(&server_pid.to_string()).unwrap_or(0.0),
            database,
        }
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            client: self.client - earlier.client,
            server: self.server - earlier.server,
            database: self.database - earlier.database,
        }
    }

    /// Microseconds per operation, as `client/server/database`.
    fn per_op(&self, ops: u64) -> String {
        let us = |s: f64| s * 1e6 / ops.max(1) as f64;
        format!(
            "{:.0}/{:.0}/{:.0}",
            us(self.client),
            us(self.server),
            us(self.database)
        )
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

impl Measured {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
    fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.duration = Duration::from_millis(500);
        args.warmup = Duration::from_millis(100);
        args.rows = args.rows.min(1000);
        args.in_flight = vec![8];
        args.watchers = vec![0, 2];
    }
    if !args.json {
        println!(
            "{:<9} {:<13} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>8} {:>6} {:>6} {:>12} {:>12}  codes",
            "database",
            "scenario",
            "inflt",
            "ops/s",
            "p50ms",
            "p90ms",
            "p99ms",
            "p999ms",
            "maxms",
            "sql ops/s",
            "sql p99",
            "tput",
            "p99",
            "cpu c/s/d",
            "sql c/s/d"
        );
    }
    if let Some(rows) = args.import_rows {
        for &db in &args.database {
            run_import(db, rows, &args).await?;
        }
        return Ok(());
    }
    for &db in &args.database {
        run_database(db, &args).await?;
    }
    if args.smoke {
        for &db in &args.database {
            run_import(db, 1000, &args).await?;
        }
    }
    Ok(())
}

/// `customer-mapping import` of `rows` generated rows into a fresh
/// database: all new, then all present, then a dry run.
async fn run_import(db: Db, rows: u64, args: &Args) -> anyhow::Result<()> {
    let database = TestDatabase::create(match db {
        Db::Postgres => Backend::Postgres,
        Db::Sqlite => Backend::Sqlite,
    })
    .await;
    let url = without_tls(db, &database.url)?;
    let accounts = args.import_accounts;
    let csv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("import-{rows}-{accounts}-accounts.csv"));
    if !csv.exists() {
        let partial = csv.with_extension("partial");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        use std::io::Write as _;
        let (header, column) = match accounts {
            0 => ("", ""),
            _ => (",stripe_account", ","),
        };
        writeln!(out, "user_id,stripe_customer_id,created_at{header}")?;
        for i in 0..rows {
            let account = match i % (accounts + 1) {
                0 => String::new(),
                k => format!("acct_{k:016}"),
            };
            writeln!(
                out,
                "user-{i:08},cus_{i:08}x,2024-01-01T00:00:00Z{column}{account}"
            )?;
        }
        out.flush()?;
        std::fs::rename(&partial, &csv)?;
    }
    let binary = args
        .server_bin
        .as_deref()
        .unwrap_or_else(|| std::path::Path::new(helpers::process::BINARY));
    let by_column: &[&str] = match accounts {
        0 => &[],
        _ => &["--account-column", "stripe_account"],
    };
    for (pass, extra) in [
        ("all new", None),
        ("all present", None),
        ("dry run", Some("--dry-run")),
    ] {
        let started = Instant::now();
        let child = std::process::Command::new(binary)
            .arg("import")
            .arg("--csv")
            .arg(&csv)
            .args(extra)
            .args(by_column)
            .env("DATABASE_URL", &url)
            .env("LOG_FORMAT", "json")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let (code, peak_kib) =
            tokio::task::spawn_blocking(move || wait_with_peak_rss(child)).await??;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(code == Some(0), "{db:?} import ({pass}) exited {code:?}");
        println!(
            "{db:?}: import {rows} rows ({accounts} accounts), {pass}: {seconds:.1} s \
             ({:.0} rows/s), peak RSS {:.1} MiB",
            rows as f64 / seconds,
            peak_kib as f64 / 1024.0
        );
    }
    drop(database);
    Ok(())
}

/// Waits for `child` and returns its exit code and its peak RSS in KiB, as
/// the kernel counted it (`wait4`'s `ru_maxrss`).
fn wait_with_peak_rss(child: std::process::Child) -> std::io::Result<(Option<i32>, u64)> {
    let pid = libc::pid_t::try_from(child.id()).map_err(std::io::Error::other)?;
    let mut status = 0;
    // SAFETY: both pointers are to locals that outlive the call, and `pid`
    // is our own child, not yet waited for (`child` is never waited on).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid {
        return Err(std::io::Error::last_os_error());
    }
    drop(child);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Ok((code, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

async fn run_database(db: Db, args: &Args) -> anyhow::Result<()> {
    let database = TestDatabase::create(match db {
        Db::Postgres => Backend::Postgres,
        Db::Sqlite => Backend::Sqlite,
    })
    .await;
    // Loopback: measure the service, not TLS. Both paths use this URL; sqlx
    // would otherwise negotiate TLS (`prefer`).
    let url = without_tls(db, &database.url)?;
    let started = Instant::now();
    let pool_size = args.pool_size.to_string();
    let mut env = vec![
        ("DATABASE_URL", url.as_str()),
        ("DATABASE_MAX_CONNECTIONS", pool_size.as_str()),
        ("HEALTH_PROBE_INTERVAL", "1s"),
        ("HEALTH_PROBE_TIMEOUT", "500ms"),
    ];
    env.extend(
        args.server_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let binary = args
        .server_bin
        .as_deref()
        .unwrap_or_else(|| std::path::Path::new(helpers::process::BINARY));
    let server = ServerProcess::start_binary(binary, &env, Output::Discard);
    let addr = server.addr;
    helpers::wait_for_health(addr, "", ServingStatus::Serving).await;
    let startup = started.elapsed();
    let ceiling = ceiling_pool(db, &url, args.pool_size).await?;
    preload(&ceiling, args.rows).await?;

    let channels = connections(addr, args.connections)?;
    let fresh = Arc::new(AtomicU64::new(0));

    // The gRPC floor: health Check through the same server, client and
    // connections, no database work. What no RPC of the service can beat.
    for &in_flight in &args.in_flight {
        let floor = measure(args, server.pid(), in_flight, {
            let channels = channels.clone();
            move |task, _| {
                let mut health = HealthClient::new(channels[task % channels.len()].clone());
                async move {
                    match health.check(HealthCheckRequest::default()).await {
                        Ok(_) => "OK".to_owned(),
                        Err(s) => format!("{:?}", s.code()),
                    }
                }
            }
        })
        .await;
        report(db, "GrpcFloor", in_flight, &floor, None, args.json);
    }

    let replica = args
        .watch_another_replica
        .then(|| ServerProcess::start_binary(binary, &env, Output::Discard));
    let (watch_addr, watch_pid) = match &replica {
        Some(replica) => {
            helpers::wait_for_health(replica.addr, "", ServingStatus::Serving).await;
            (replica.addr, replica.pid())
        }
        None => (addr, server.pid()),
    };
    for &watchers in &args.watchers {
        let watching =
            Watchers::open(watch_addr, watchers, watch_pid, args.watchers_stalled).await?;
        run_scenarios(args, db, &server, &channels, &ceiling, &fresh, watchers).await;
        watching.close(db, args.json).await;
    }

    let rss = memory_kib(server.pid(), "VmHWM");
    server.sigterm();
    server.exited(Duration::from_secs(30)).await;
    match &ceiling {
        Pool::Pg(p) => p.close().await,
        Pool::Sqlite(p) => p.close().await,
    }
    let summary = format!(
        "{db:?}: server start to SERVING {:.0} ms, peak RSS {:.1} MiB, {} preloaded rows",
        startup.as_secs_f64() * 1000.0,
        rss.unwrap_or(0) as f64 / 1024.0,
        args.rows
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "database": format!("{db:?}"),
                "startup_ms": startup.as_secs_f64() * 1000.0,
                "peak_rss_mib": rss.unwrap_or(0) as f64 / 1024.0,
                "rows": args.rows,
            })
        );
    } else {
        println!("{summary}");
    }
    drop(replica);
    drop(database);
    Ok(())
}

/// Every scenario at every concurrency, through the service and straight
/// to the database; rows are labelled with the watchers open, if any.
async fn run_scenarios(
    args: &Args,
    db: Db,
    server: &ServerProcess,
    channels: &[Channel],
    ceiling: &Pool,
    fresh: &Arc<AtomicU64>,
    watchers: usize,
) {
    for &scenario in &args.scenario {
        for &in_flight in &args.in_flight {
            let service = measure(args, server.pid(), in_flight, {
                let (channels, fresh) = (channels.to_vec(), fresh.clone());
                let rows = args.rows;
                move |task, rng| {
                    let mut client =
                        CustomerMappingClient::new(channels[task % channels.len()].clone());
                    let op = Op::draw(scenario, rows, &fresh, rng);
                    async move { op.via_grpc(&mut client).await }
                }
            })
            .await;
            let direct = measure(args, server.pid(), in_flight, {
                let (pool, fresh) = (ceiling.clone(), fresh.clone());
                let rows = args.rows;
                move |_, rng| {
                    let pool = pool.clone();
                    let op = Op::draw(scenario, rows, &fresh, rng);
                    async move { op.via_sql(&pool).await }
                }
            })
            .await;
            let label = match watchers {
                0 => format!("{scenario:?}"),
                n => format!("{scenario:?}/w{n}"),
            };
            report(db, &label, in_flight, &service, Some(&direct), args.json);
        }
    }
}

/// Watch streams open while scenarios run: each reads everything and
/// records every event's delivery lag.
struct Watchers {
    count: usize,
    rss_per_watcher_kib: f64,
    readers: Vec<tokio::task::JoinHandle<Histogram<u64>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Watchers {
    /// Opens `count` streams spread over `channels`, each once its first
    /// response (a bookmark) arrived, and measures the server's resident
    /// memory they added while idle.
    async fn open(
        addr: std::net::SocketAddr,
        count: usize,
        pid: u32,
        stalled: bool,
    ) -> anyhow::Result<Self> {
        // Connections of their own, each within the server's default
        // MAX_CONCURRENT_STREAMS (128): a stream beyond it would wait for
        // a slot that never frees.
        let count_connections = count.div_ceil(100).max(1);
        // HTTP/2's smallest windows for readers that read nothing: they
        // stop their streams at once, instead of taking in hyper's default
        // 2 MiB per stream first.
        let channels = if stalled {
            stalled_connections(addr, count_connections)?
        } else {
            connections(addr, count_connections)?
        };
        let before = memory_kib(pid, "VmRSS").unwrap_or(0);
        let stop = tokio_util::sync::CancellationToken::new();
        let mut readers = Vec::with_capacity(count);
        for n in 0..count {
            let mut client = CustomerMappingClient::new(channels[n % channels.len()].clone());
            let mut stream = client
                .watch(WatchRequest::default())
                .await
                .map_err(|s| anyhow::anyhow!("Watch {n}: {s:?}"))?
                .into_inner();
            stream
                .message()
                .await
                .map_err(|s| anyhow::anyhow!("Watch {n}: {s:?}"))?;
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut lag_us =
                    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
                if stalled {
                    stop.cancelled().await;
                    drop(stream);
                    return lag_us;
                }
                loop {
                    let response = tokio::select! {
                        () = stop.cancelled() => break,
                        r = stream.message() => r,
                    };
                    let Ok(Some(response)) = response else { break };
                    let now = std::time::SystemTime::now();
                    for event in response.events {
                        let Some(time) = event
                            .time
                            .and_then(|t| std::time::SystemTime::try_from(t).ok())
                        else {
                            continue;
                        };
                        let lag = now.duration_since(time).unwrap_or_default();
                        let _ = lag_us.record(lag.as_micros().max(1) as u64);
                    }
                }
                lag_us
            }));
        }
        // Let the server settle before reading its memory.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = memory_kib(pid, "VmRSS").unwrap_or(0);
        let rss_per_watcher_kib = if count == 0 {
            0.0
        } else {
            after.saturating_sub(before) as f64 / count as f64
        };
        Ok(Self {
            count,
            rss_per_watcher_kib,
            readers,
            stop,
        })
    }

    async fn close(self, db: Db, json: bool) {
        if self.count == 0 {
            return;
        }
        self.stop.cancel();
        let mut lag_us = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        for reader in self.readers {
            if let Ok(h) = reader.await {
                let _ = lag_us.add(h);
            }
        }
        let ms = |q: f64| lag_us.value_at_quantile(q) as f64 / 1000.0;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "database": format!("{db:?}"),
                    "watchers": self.count,
                    "rss_kib_per_idle_watcher": self.rss_per_watcher_kib,
                    "events_delivered": lag_us.len(),
                    "lag_p50_ms": ms(0.5),
                    "lag_p99_ms": ms(0.99),
                    "lag_max_ms": lag_us.max() as f64 / 1000.0,
                })
            );
        } else {
            println!(
                "{db:?}: {} watchers: {:.1} KiB RSS per idle watcher; {} deliveries, lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                self.count,
                self.rss_per_watcher_kib,
                lag_us.len(),
                ms(0.5),
                ms(0.99),
                lag_us.max() as f64 / 1000.0
            );
        }
    }
}

/// `count` HTTP/2 connections to the server at `addr`, opened on first use.
fn connections(addr: std::net::SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    connections_with(addr, count, |endpoint| endpoint)
}

/// [`connections`] with HTTP/2's smallest flow-control windows.
fn stalled_connections(addr: std::net::SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    connections_with(addr, count, |endpoint| {
        endpoint
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
    })
}

fn connections_with(
    addr: std::net::SocketAddr,
    count: usize,
    configure: impl Fn(Endpoint) -> Endpoint,
) -> anyhow::Result<Vec<Channel>> {
    (0..count)
        .map(|_| {
            Channel::from_shared(format!("http://{addr}"))
                .map(|endpoint| configure(endpoint).connect_lazy())
                .map_err(anyhow::Error::from)
        })
        .collect()
}

/// One request, drawn for a scenario.
#[derive(Debug, Clone)]
enum Op {
    GetByUser(String),
    GetByCustomer(String),
    Link(String, String),
    /// Unlink by user, then Link the same pair again.
    Relink(String, String),
    Prepare(String),
}

impl Op {
    fn draw(scenario: Scenario, rows: u64, fresh: &AtomicU64, rng: &mut SmallRng) -> Op {
        let existing = |rng: &mut SmallRng| rng.random_range(0..rows);
        let new_pair = || {
            let k = fresh.fetch_add(1, Ordering::Relaxed);
            (format!("new-{k}"), format!("cus_new{k}"))
        };
        match scenario {
            Scenario::Get => {
                let i = existing(rng);
                if rng.random_bool(0.5) {
                    Op::GetByUser(format!("user-{i}"))
                } else {
                    Op::GetByCustomer(format!("cus_{i}"))
                }
            }
            Scenario::LinkNew => {
                let (u, c) = new_pair();
                Op::Link(u, c)
            }
            Scenario::LinkReplay => {
                let i = existing(rng);
                Op::Link(format!("user-{i}"), format!("cus_{i}"))
            }
            Scenario::LinkConflict => {
                let i = existing(rng);
                let j = (i + 1 + rng.random_range(0..rows.max(2) - 1)) % rows;
                Op::Link(format!("user-{i}"), format!("cus_{j}"))
            }
            Scenario::Mixed => match rng.random_range(0..100) {
                0..90 => Op::draw(Scenario::Get, rows, fresh, rng),
                90..95 => Op::draw(Scenario::LinkNew, rows, fresh, rng),
                _ => {
                    let i = existing(rng);
                    Op::Relink(format!("user-{i}"), format!("cus_{i}"))
                }
            },
            Scenario::Prepare => {
                let i = existing(rng);
                Op::Prepare(if rng.random_bool(0.5) {
                    format!("user-{i}")
                } else {
                    format!("unlinked-{i}")
                })
            }
        }
    }

    /// Returns the gRPC code name of the (last) reply.
    async fn via_grpc(self, client: &mut CustomerMappingClient<Channel>) -> String {
        let code = |r: Result<(), tonic::Status>| match r {
            Ok(()) => "OK".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        match self {
            Op::GetByUser(u) => code(
                client
                    .get(GetRequest {
                        key: Some(get_request::Key::UserId(u)),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            Op::GetByCustomer(c) => code(
                client
                    .get(GetRequest {
                        key: Some(get_request::Key::StripeCustomerId(c)),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            Op::Link(u, c) => code(
                client
                    .link(LinkRequest {
                        user_id: u,
                        stripe_customer_id: c,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            Op::Relink(u, c) => {
                let _ = client
                    .unlink(UnlinkRequest {
                        key: Some(unlink_request::Key::UserId(u.clone())),
                        ..Default::default()
                    })
                    .await;
                code(
                    client
                        .link(LinkRequest {
                            user_id: u,
                            stripe_customer_id: c,
                            ..Default::default()
                        })
                        .await
                        .map(drop),
                )
            }
            Op::Prepare(u) => code(
                client
                    .prepare_link(PrepareLinkRequest {
                        user_id: u,
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
        }
    }

    /// The same work as the service does, as SQL straight to the database.
    async fn via_sql(self, pool: &Pool) -> String {
        let result = match self {
            Op::GetByUser(u) | Op::Prepare(u) => sql_get(pool, GET_BY_USER, &u).await,
            Op::GetByCustomer(c) => sql_get(pool, GET_BY_CUSTOMER, &c).await,
            Op::Link(u, c) => sql_link(pool, &u, &c).await,
            Op::Relink(u, c) => match sql_unlink(pool, &u).await {
                Ok(_) => sql_link(pool, &u, &c).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(code) => code.to_owned(),
            Err(_) => "SqlError".to_owned(),
        }
    }
}

const GET_BY_USER: &str = "SELECT id, user_id, stripe_customer_id, created_at \
                           FROM stripe_customers WHERE user_id = $1";
const GET_BY_CUSTOMER: &str = "SELECT id, user_id, stripe_customer_id, created_at \
                               FROM stripe_customers WHERE stripe_customer_id = $1";

async fn sql_get(pool: &Pool, sql: &'static str, value: &str) -> Result<&'static str, sqlx::Error> {
    let found =
        on_pool!(pool, p => sqlx::query(sql).bind(value).fetch_optional(p).await?.is_some());
    Ok(if found { "OK" } else { "NotFound" })
}

async fn sql_unlink(pool: &Pool, user: &str) -> Result<&'static str, sqlx::Error> {
    let sql = "DELETE FROM stripe_customers WHERE user_id = $1 \
               RETURNING id, user_id, stripe_customer_id, created_at";
    let found = on_pool!(pool, p => sqlx::query(sql).bind(user).fetch_optional(p).await?.is_some());
    Ok(if found { "OK" } else { "NotFound" })
}

/// The cheapest way the database can do any Link: one prepared
/// `INSERT ... ON CONFLICT DO NOTHING RETURNING` in autocommit. It can't
/// tell a replay from a conflict (the service must, and say who holds the
/// key), so it is a bar no Link can beat, not the service's own SQL.
async fn sql_link(pool: &Pool, user: &str, customer: &str) -> Result<&'static str, sqlx::Error> {
    let insert = "INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
                  VALUES ($1, $2, $3) ON CONFLICT DO NOTHING \
                  RETURNING id, user_id, stripe_customer_id, created_at";
    let now = chrono::Utc::now();
    let inserted = on_pool!(pool, p => sqlx::query(insert)
        .bind(user)
        .bind(customer)
        .bind(now)
        .fetch_optional(p)
        .await?
        .is_some());
    Ok(if inserted { "Inserted" } else { "NotInserted" })
}

/// Runs `in_flight` tasks, each issuing one request at a time, for the
/// warm-up and then the measured duration.
async fn measure<F, Fut>(args: &Args, server_pid: u32, in_flight: usize, op: F) -> Measured
where
    F: Fn(usize, &mut SmallRng) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    let warmup_ends = Instant::now() + args.warmup;
    let ends = warmup_ends + args.duration;
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(warmup_ends.into()).await;
        let start = Cpu::now(server_pid);
        tokio::time::sleep_until(ends.into()).await;
        Cpu::now(server_pid).since(start)
    });
    let tasks = (0..in_flight).map(|task| {
        let op = op.clone();
        tokio::spawn(async move {
            let mut rng = SmallRng::seed_from_u64(task as u64);
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let now = Instant::now();
                if now >= ends {
                    break;
                }
                let code = op(task, &mut rng).await;
                if now >= warmup_ends {
                    let _ = latency.record(now.elapsed().as_micros().max(1) as u64);
                    *codes.entry(code).or_default() += 1;
                }
            }
            (latency, codes)
        })
    });
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut codes = BTreeMap::new();
    for joined in futures::future::join_all(tasks).await {
        let (l, c) = joined.expect("a load task panicked");
        latency_us.add(l).expect("same bounds");
        for (code, n) in c {
            *codes.entry(code).or_default() += n;
        }
    }
    Measured {
        ops: latency_us.len(),
        seconds: args.duration.as_secs_f64(),
        latency_us,
        codes,
        cpu: cpu.await.unwrap_or_default(),
    }
}

/// One row: the service's figures and, where there is one, the ceiling's
/// (`direct`) and the ratios.
fn report(
    db: Db,
    scenario: &str,
    in_flight: usize,
    service: &Measured,
    direct: Option<&Measured>,
    json: bool,
) {
    let ratio = |f: fn(&Measured) -> f64| direct.map(|d| f(service) / f(d));
    let tput_ratio = ratio(Measured::throughput);
    let p99_ratio = ratio(|m| m.quantile_ms(0.99));
    let or_dash = |v: Option<f64>, decimals: usize| {
        v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "database": format!("{db:?}"),
                "scenario": scenario,
                "in_flight": in_flight,
                "ops_per_s": service.throughput(),
                "p50_ms": service.quantile_ms(0.5),
                "p90_ms": service.quantile_ms(0.9),
                "p99_ms": service.quantile_ms(0.99),
                "p999_ms": service.quantile_ms(0.999),
                "max_ms": service.latency_us.max() as f64 / 1000.0,
                "codes": service.codes,
                "ceiling_ops_per_s": direct.map(Measured::throughput),
                "ceiling_p99_ms": direct.map(|d| d.quantile_ms(0.99)),
                "ceiling_codes": direct.map(|d| &d.codes),
                "throughput_ratio": tput_ratio,
                "p99_ratio": p99_ratio,
                "cpu_us_per_op": {
                    "client": service.cpu.client * 1e6 / service.ops.max(1) as f64,
                    "server": service.cpu.server * 1e6 / service.ops.max(1) as f64,
                    "database": service.cpu.database * 1e6 / service.ops.max(1) as f64,
                },
                "ceiling_cpu_us_per_op": direct.map(|d| serde_json::json!({
                    "client": d.cpu.client * 1e6 / d.ops.max(1) as f64,
                    "database": d.cpu.database * 1e6 / d.ops.max(1) as f64,
                })),
            })
        );
    } else {
        let codes: Vec<String> = service
            .codes
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        println!(
            "{:<9} {:<13} {:>5} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>8} {:>6} {:>6} {:>12} {:>12}  {}",
            format!("{db:?}"),
            scenario,
            in_flight,
            service.throughput(),
            service.quantile_ms(0.5),
            service.quantile_ms(0.9),
            service.quantile_ms(0.99),
            service.quantile_ms(0.999),
            service.latency_us.max() as f64 / 1000.0,
            or_dash(direct.map(Measured::throughput), 0),
            or_dash(direct.map(|d| d.quantile_ms(0.99)), 2),
            or_dash(tput_ratio, 2),
            or_dash(p99_ratio, 2),
            service.cpu.per_op(service.ops),
            direct.map_or_else(|| "-".to_owned(), |d| d.cpu.per_op(d.ops)),
            codes.join(" ")
        );
    }
}

/// `url` with TLS off for PostgreSQL (loopback: the benchmark measures the
/// service, not TLS).
fn without_tls(db: Db, url: &str) -> anyhow::Result<String> {
    if db == Db::Sqlite {
        return Ok(url.to_owned());
    }
    let mut url = url::Url::parse(url)?;
    if !url.query_pairs().any(|(k, _)| k == "sslmode") {
        url.query_pairs_mut().append_pair("sslmode", "disable");
    }
    Ok(url.to_string())
}

/// The ceiling's pool straight to the database: the size the server's pool
/// has, and no ping (on PostgreSQL none at all, see [`PgConnections`]; the
/// server pings none either).
async fn ceiling_pool(db: Db, url: &str, size: u32) -> anyhow::Result<Pool> {
    Ok(match db {
        Db::Postgres => Pool::Pg(Arc::new(PgConnections {
            options: url.parse()?,
            idle: std::sync::Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(size as usize)),
        })),
        Db::Sqlite => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
            let options: SqliteConnectOptions = url.parse()?;
            let options = options
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(5));
            Pool::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(size)
                    .test_before_acquire(false)
                    .connect_with(options)
                    .await?,
            )
        }
    })
}

/// Inserts `user-{i}` <-> `cus_{i}` for i in 0..rows, in one statement.
async fn preload(pool: &Pool, rows: u64) -> anyhow::Result<()> {
    let last = rows - 1;
    let n: i64 = match pool {
        Pool::Pg(connections) => {
            let (slot, mut p) = connections.take().await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
                 SELECT 'user-' || g, 'cus_' || g, now() FROM generate_series(0, {last}) AS g; \
                 ANALYZE stripe_customers"
            )))
            .execute(&mut p)
            .await?;
            let n = sqlx::query("SELECT count(*) AS n FROM stripe_customers")
                .fetch_one(&mut p)
                .await?
                .try_get("n")?;
            connections.put(p, slot);
            n
        }
        Pool::Sqlite(p) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < {last}) \
                 INSERT INTO stripe_customers (user_id, stripe_customer_id, created_at) \
                 SELECT 'user-' || i, 'cus_' || i, strftime('%Y-%m-%d %H:%M:%f+00:00', 'now') FROM g"
            )))
            .execute(p)
            .await?;
            sqlx::query("SELECT count(*) AS n FROM stripe_customers")
                .fetch_one(p)
                .await?
                .try_get("n")?
        }
    };
    anyhow::ensure!(n as u64 == rows, "preloaded {n} rows, wanted {rows}");
    Ok(())
}
