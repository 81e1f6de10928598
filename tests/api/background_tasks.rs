//! A long-lived task that dies takes the process with it: a non-zero exit
//! and a log line naming the task, so the orchestrator restarts the pod
//! instead of keeping a server that listens and does nothing. The panic is
//! provoked by the debug build's `CUSTOMER_MAPPING_TEST_PANIC_TASK`.

use crate::helpers;

use std::time::Duration;

use helpers::{Backend, TestDatabase, process::ServerProcess};

async fn exits_when_task_panics(task: &str, extra: &[(&str, &str)]) {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let mut env = vec![
        ("DATABASE_URL", database.url.as_str()),
        ("CUSTOMER_MAPPING_TEST_PANIC_TASK", task),
    ];
    env.extend_from_slice(extra);
    let server = ServerProcess::start(&env);
    let (status, _, server) = server.exited(Duration::from_secs(20)).await;
    assert!(
        !status.success(),
        "a panic in the {task} task must end the process with a failure, got {status}; \
         output: {:?}",
        server.lines()
    );
    let named = server.events().into_iter().any(|e| {
        e["level"] == "ERROR"
            && e["task"] == task
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("panicked"))
    });
    assert!(
        named,
        "no ERROR line naming the {task} task; output: {:?}",
        server.lines()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_database_supervisor_ends_the_process() {
    exits_when_task_panics("database supervisor", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_metrics_listener_ends_the_process() {
    exits_when_task_panics("metrics listener", &[("METRICS_ADDR", "127.0.0.1:0")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_health_listener_ends_the_process() {
    exits_when_task_panics("health listener", &[("HEALTH_LISTEN_ADDR", "127.0.0.1:0")]).await;
}

/// The log writer can't log its own death: it says so on stderr and the
/// process exits 70.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_log_writer_ends_the_process() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let server = ServerProcess::start(&[
        ("DATABASE_URL", database.url.as_str()),
        ("CUSTOMER_MAPPING_TEST_PANIC_TASK", "log writer"),
    ]);
    let (status, _, server) = server.exited(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(70), "output: {:?}", server.lines());
    assert!(
        server
            .lines()
            .iter()
            .any(|l| l.contains("the log writer task panicked")),
        "output: {:?}",
        server.lines()
    );
}
