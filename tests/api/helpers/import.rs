//! `customer-mapping import` as a child process, for the tests that run
//! it (`import.rs`) and those that write while it runs (`watch.rs`).

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::process::BINARY;

/// How long one import in these tests may take.
pub const IMPORT_LIMIT: Duration = Duration::from_secs(60);

/// What one run of `customer-mapping import` did.
pub struct Run {
    pub code: i32,
    /// Its JSON log events.
    pub events: Vec<serde_json::Value>,
}

impl Run {
    /// The summary line's counts: read, created, present, refused.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let summary = self
            .events
            .iter()
            .rev()
            .find(|e| e["created"].is_u64())
            .unwrap_or_else(|| panic!("no summary line in {:?}", self.events));
        let n = |field: &str| summary[field].as_u64().expect("a count");
        (n("read"), n("created"), n("present"), n("refused"))
    }
}

/// The import as a child process with JSON logs, read line by line.
pub struct ImportProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    events: Vec<serde_json::Value>,
}

impl ImportProcess {
    pub fn start(database_url: &str, args: &[&str], rust_log: &str) -> Self {
        let mut child = Command::new(BINARY)
            .arg("import")
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            lines,
            events: Vec::new(),
        }
    }

    /// Reads lines until a JSON event matches `wanted` (at most 30 s).
    pub fn wait_for(&mut self, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no such event; so far: {:?}", self.events));
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                self.events.push(serde_json::Value::String(line));
                continue;
            };
            self.events.push(event.clone());
            if wanted(&event) {
                return event;
            }
        }
    }

    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    }

    /// Waits for the exit (bounded) and every line printed.
    pub fn finish(mut self) -> Run {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                started.elapsed() < IMPORT_LIMIT,
                "the import did not exit within {IMPORT_LIMIT:?}; so far: {:?}",
                self.events
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The readers end with the pipes, once the process is gone.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.events
                .push(serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line)));
        }
        Run {
            code: status.code().unwrap_or(-1),
            events: self.events,
        }
    }
}

/// Runs `customer-mapping import ARGS` to the end.
pub async fn import(database_url: &str, args: &[&str]) -> Run {
    let (url, args): (String, Vec<String>) = (
        database_url.to_owned(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ImportProcess::start(&url, &args, "info").finish()
    })
    .await
    .expect("the import ran")
}

/// `import --csv CSV --report REPORT EXTRA...` to the end.
pub async fn import_csv(database_url: &str, csv: &Path, report: &Path, extra: &[&str]) -> Run {
    let (csv, report) = (csv.display().to_string(), report.display().to_string());
    let mut args = vec!["--csv", csv.as_str(), "--report", report.as_str()];
    args.extend_from_slice(extra);
    import(database_url, &args).await
}

pub fn write_csv(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("the CSV is written");
    path
}

/// `user-I,cus_I` for I in 0..rows.
pub fn numbered_csv(dir: &Path, rows: usize) -> PathBuf {
    let mut content = String::from("user_id,stripe_customer_id\n");
    for i in 0..rows {
        content.push_str(&format!("user-{i},cus_{i}\n"));
    }
    write_csv(dir, "in.csv", &content)
}
