//! Bad configuration fails fast: the built binary, given each refused value
//! as a flag and as an environment variable, exits with status 2 and one
//! line naming both, before it listens; values at the ends of every range
//! are served without a panic.

use crate::helpers;

use std::{
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use helpers::process::{BINARY, ServerProcess};
use tonic_health::pb::health_check_response::ServingStatus;

/// The issue asks for "within a second"; this leaves room for a loaded
/// machine (the figure measured is printed).
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// Every duration setting, by flag.
const DURATIONS: [&str; 10] = [
    "database-acquire-timeout",
    "database-connect-timeout",
    "sqlite-busy-timeout",
    "health-probe-interval",
    "health-probe-timeout",
    "shutdown-drain-timeout",
    "default-deadline",
    "handshake-timeout",
    "http2-keepalive-interval",
    "http2-keepalive-timeout",
];

/// Every count setting, by flag.
const COUNTS: [&str; 5] = [
    "database-max-connections",
    "max-request-bytes",
    "max-concurrent-streams",
    "max-concurrent-requests",
    "max-connections",
];

fn env_of(flag: &str) -> String {
    flag.to_uppercase().replace('-', "_")
}

/// How one run of the binary ended.
struct Refusal {
    code: Option<i32>,
    took: Duration,
    lines: Vec<String>,
    port: u16,
}

/// Starts `customer-mapping serve` with nothing but `args` and `envs` (and
/// a free port to listen on and a SQLite file in `dir`), and waits, bounded,
/// for it to exit.
fn run(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Refusal {
    let port = free_port();
    let database = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let listen = format!("127.0.0.1:{port}");
    let mut command = Command::new(BINARY);
    command
        .env_clear()
        .arg("serve")
        .args(["--listen-addr", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !envs.iter().any(|(k, _)| k.starts_with("DATABASE_URL")) && !args.contains(&"--database-url")
    {
        command.env("DATABASE_URL", &database);
    }
    let mut child = command
        .args(args)
        .envs(envs.iter().copied())
        .spawn()
        .expect("the binary starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > EXIT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} {envs:?}: still running after {EXIT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = started.elapsed();
    let mut printed = String::new();
    for mut output in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        output
            .read_to_string(&mut printed)
            .expect("the output reads");
    }
    Refusal {
        code: status.code(),
        took,
        lines: printed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect(),
        port,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Refusal {
    /// Status 2, in time, exactly one line, naming every one of `names`,
    /// no panic, and nothing listening.
    fn assert_refused(&self, case: &str, names: &[&str]) {
        assert_eq!(self.code, Some(2), "{case}: {:?}", self.lines);
        assert!(self.took < EXIT_LIMIT, "{case}: took {:?}", self.took);
        assert!(
            !self.lines.iter().any(|l| l.contains("panicked")),
            "{case}: {:?}",
            self.lines
        );
        assert_eq!(self.lines.len(), 1, "{case}: one line: {:?}", self.lines);
        for name in names {
            assert!(
                self.lines[0].contains(name),
                "{case}: the line names {name}: {:?}",
                self.lines[0]
            );
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        assert!(
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
            "{case}: something listens on {addr}"
        );
    }
}

#[test]
fn each_out_of_range_value_is_refused_as_a_flag_and_as_an_environment_variable() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut cases: Vec<(&str, &str)> = COUNTS.iter().map(|flag| (*flag, "0")).collect();
    for flag in DURATIONS {
        cases.push((flag, "0s"));
        cases.push((flag, "99999999999h"));
    }
    cases.extend([
        ("database-max-connections", "1001"),
        ("max-connections", "99999999999999999999"),
        ("health-probe-interval", "soon"),
    ]);
    let mut slowest = Duration::ZERO;
    for (flag, value) in &cases {
        let env = env_of(flag);
        let long = format!("--{flag}");
        for (form, refusal) in [
            ("flag", run(dir.path(), &[&long, value], &[])),
            ("env", run(dir.path(), &[], &[(&env, value)])),
        ] {
            refusal.assert_refused(&format!("{long} {value} ({form})"), &[&long, &env, value]);
            slowest = slowest.max(refusal.took);
        }
    }
    println!(
        "{} refused values, each as a flag and as an environment variable: slowest exit {slowest:?}",
        cases.len()
    );
}

#[test]
fn settings_that_contradict_each_other_are_refused_together() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    run(
        dir.path(),
        &[
            "--health-probe-interval",
            "1s",
            "--health-probe-timeout",
            "1s",
        ],
        &[],
    )
    .assert_refused(
        "probe timeout = interval",
        &["--health-probe-timeout", "HEALTH_PROBE_TIMEOUT", "1s"],
    );
    run(dir.path(), &[], &[("HEALTH_PROBE_INTERVAL", "1s")]).assert_refused(
        "the default probe timeout (2s) over a 1s interval",
        &["HEALTH_PROBE_TIMEOUT", "HEALTH_PROBE_INTERVAL", "2s"],
    );
    run(
        dir.path(),
        &[],
        &[
            ("METRICS_ADDR", "127.0.0.1:9"),
            ("HEALTH_LISTEN_ADDR", "0.0.0.0:9"),
        ],
    )
    .assert_refused(
        "metrics on the health port",
        &["METRICS_ADDR", "HEALTH_LISTEN_ADDR", "127.0.0.1:9"],
    );
}

#[test]
fn a_database_url_no_retry_can_fix_is_refused_without_its_password() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let unsupported = "foo://app:hunter2-secret@bar/db";
    let missing_dir = "sqlite:///nonexistent/dir/x.db?mode=rwc";
    let cases = [
        (unsupported, "unsupported scheme \"foo\""),
        ("postgres://app:hunter2-secret@db:99999/x", "not a URL"),
        (missing_dir, "/nonexistent/dir does not exist"),
    ];
    for (url, says) in cases {
        for (form, refusal) in [
            ("flag", run(dir.path(), &["--database-url", url], &[])),
            ("env", run(dir.path(), &[], &[("DATABASE_URL", url)])),
        ] {
            let case = format!("{url} ({form})");
            refusal.assert_refused(&case, &["--database-url", "DATABASE_URL", says]);
            assert!(
                !refusal.lines[0].contains("hunter2"),
                "{case}: password leaked"
            );
        }
    }

    // The same from a mounted secret file.
    let secret = dir.path().join("DATABASE_URL");
    for (url, says) in cases {
        std::fs::write(&secret, format!("{url}\n")).expect("write the secret");
        let path = secret.to_str().expect("a UTF-8 path");
        let refusal = run(dir.path(), &[], &[("DATABASE_URL_FILE", path)]);
        let case = format!("{url} in DATABASE_URL_FILE");
        refusal.assert_refused(&case, &["DATABASE_URL_FILE", "--database-url-file", says]);
        assert!(
            !refusal.lines[0].contains("hunter2"),
            "{case}: password leaked"
        );
    }
    run(
        dir.path(),
        &[],
        &[(
            "DATABASE_URL_FILE",
            &dir.path().join("absent").display().to_string(),
        )],
    )
    .assert_refused("a missing secret file", &["DATABASE_URL_FILE", "absent"]);
}

/// Makes `file` read-only for whoever this test runs as: a mode is enough
/// for an ordinary user; root writes through modes, but not through the
/// immutable attribute (undone on drop, or the directory can't be removed).
struct ReadOnly<'a> {
    file: &'a std::path::Path,
    immutable: bool,
}

impl<'a> ReadOnly<'a> {
    fn make(file: &'a std::path::Path) -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        let writable = || std::fs::OpenOptions::new().write(true).open(file).is_ok();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        if !writable() {
            return Some(Self {
                file,
                immutable: false,
            });
        }
        let immutable = Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success());
        let guard = Self { file, immutable };
        (!writable()).then_some(guard)
    }
}

impl Drop for ReadOnly<'_> {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").arg(self.file).status();
        }
    }
}

#[test]
fn a_read_only_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("read-only.db");
    std::fs::write(&file, b"").expect("create the file");
    let Some(_read_only) = ReadOnly::make(&file) else {
        println!(
            "SKIPPED: cannot make a file read-only for this user here \
             (root, and no chattr +i on this filesystem)"
        );
        return;
    };
    let url = format!("sqlite://{}?mode=rwc", file.display());
    for (form, refusal) in [
        ("flag", run(dir.path(), &["--database-url", &url], &[])),
        ("env", run(dir.path(), &[], &[("DATABASE_URL", &url)])),
    ] {
        refusal.assert_refused(
            &format!("read-only SQLite file ({form})"),
            &["--database-url", "DATABASE_URL", "read-only"],
        );
    }
}

#[test]
fn values_clap_refuses_are_one_line_naming_the_variable_too() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (envs, names) in [
        (
            [("REFLECTION", "maybe")],
            ["--reflection", "REFLECTION", "maybe", "true, false"],
        ),
        (
            [("LOG_FORMAT", "xml")],
            ["--log-format", "LOG_FORMAT", "xml", "text, json"],
        ),
        (
            [("METRICS_ADDR", "localhost")],
            ["--metrics-addr", "METRICS_ADDR", "localhost", "address"],
        ),
        (
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")],
            [
                "--otlp-endpoint",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "https://collector:4317",
                "http:// URL",
            ],
        ),
        (
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "127.0.0.1:4317")],
            [
                "--otlp-endpoint",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "127.0.0.1:4317",
                "http:// URL",
            ],
        ),
        (
            [("TLS_CERT_FILE", "cert.pem")],
            ["--tls-key-file", "TLS_KEY_FILE", "required", "not provided"],
        ),
    ] {
        run(dir.path(), &[], &envs).assert_refused(&format!("{envs:?}"), &names);
    }
}

#[test]
fn help_shows_each_range() {
    let output = Command::new(BINARY)
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for range in [
        "[range: 1 to 1000]",
        "[range: 10ms to 10m, below --health-probe-interval]",
        "[range: 1s to 25s]",
    ] {
        assert!(help.contains(range), "--help lacks {range}: {help}");
    }
}

/// Every setting at one end of its range: served, no panic, a clean exit.
/// With `serving`, health must reach SERVING; without, the database probe
/// must have run once, whatever it found.
async fn served_at(dir: &std::path::Path, envs: &[(&str, &str)], serving: bool) {
    let database = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let mut all = vec![("DATABASE_URL", database.as_str())];
    all.extend_from_slice(envs);
    let server = ServerProcess::start(&all);
    if serving {
        helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
    } else {
        server.wait_for_event(|e| {
            matches!(
                e["message"].as_str(),
                Some("database connected" | "database not ready")
            )
        });
    }
    server.sigterm();
    let (status, _, server) = server.exited(Duration::from_secs(40)).await;
    assert_eq!(status.code(), Some(0), "output: {:?}", server.lines());
    assert!(
        !server.lines().iter().any(|l| l.contains("panicked")),
        "{:?}",
        server.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_at_its_maximum_is_served() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    served_at(
        dir.path(),
        &[
            ("DATABASE_MAX_CONNECTIONS", "1000"),
            ("DATABASE_ACQUIRE_TIMEOUT", "1m"),
            ("DATABASE_CONNECT_TIMEOUT", "1m"),
            ("SQLITE_BUSY_TIMEOUT", "1m"),
            ("HEALTH_PROBE_INTERVAL", "10m"),
            ("HEALTH_PROBE_TIMEOUT", "9m"),
            ("SHUTDOWN_DRAIN_TIMEOUT", "25s"),
            ("MAX_REQUEST_BYTES", "4194304"),
            ("MAX_CONCURRENT_STREAMS", "10000"),
            ("MAX_CONCURRENT_REQUESTS", "100000"),
            ("MAX_CONNECTIONS", "100000"),
            ("DEFAULT_DEADLINE", "5m"),
            ("HANDSHAKE_TIMEOUT", "1m"),
            ("HTTP2_KEEPALIVE_INTERVAL", "1h"),
            ("HTTP2_KEEPALIVE_TIMEOUT", "5m"),
        ],
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_setting_at_its_minimum_is_served() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    // 10 ms to connect may not be enough on a loaded machine, and a 10 ms
    // handshake or keepalive timeout may cut a test client off: only a
    // start, a probe and a clean exit are asked.
    served_at(
        dir.path(),
        &[
            ("DATABASE_MAX_CONNECTIONS", "1"),
            ("DATABASE_ACQUIRE_TIMEOUT", "10ms"),
            ("DATABASE_CONNECT_TIMEOUT", "10ms"),
            ("SQLITE_BUSY_TIMEOUT", "10ms"),
            ("HEALTH_PROBE_INTERVAL", "20ms"),
            ("HEALTH_PROBE_TIMEOUT", "10ms"),
            ("SHUTDOWN_DRAIN_TIMEOUT", "1s"),
            ("MAX_REQUEST_BYTES", "1"),
            ("MAX_CONCURRENT_STREAMS", "1"),
            ("MAX_CONCURRENT_REQUESTS", "1"),
            ("MAX_CONNECTIONS", "1"),
            ("DEFAULT_DEADLINE", "10ms"),
            ("HANDSHAKE_TIMEOUT", "10ms"),
            ("HTTP2_KEEPALIVE_INTERVAL", "10ms"),
            ("HTTP2_KEEPALIVE_TIMEOUT", "10ms"),
        ],
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_url_without_a_mode_creates_its_file_and_serves() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, url) in [
        (
            "x.db",
            format!("sqlite://{}", dir.path().join("x.db").display()),
        ),
        (
            "y.db",
            format!("sqlite:{}", dir.path().join("y.db").display()),
        ),
    ] {
        let server = ServerProcess::start(&[("DATABASE_URL", url.as_str())]);
        helpers::wait_for_health(server.addr, "", ServingStatus::Serving).await;
        assert!(dir.path().join(name).is_file(), "{url}: no file");
        server.sigterm();
        let (status, _, server) = server.exited(Duration::from_secs(40)).await;
        assert_eq!(status.code(), Some(0), "{url}: {:?}", server.lines());
    }
}
