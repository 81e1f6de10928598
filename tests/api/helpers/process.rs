//! The built binary as a child process, for what only a real process shows:
//! signals, exit codes and its log output.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, mpsc},
    time::{Duration, Instant},
};

pub const BINARY: &str = env!("CARGO_BIN_EXE_customer-mapping");

pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    /// Notified whenever a line arrives.
    arrived: Arc<Condvar>,
}

/// What becomes of the server's output once it is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Kept, for [`ServerProcess::lines`] and friends.
    Keep,
    /// Read and thrown away (a benchmark's millions of request lines), so
    /// the server never blocks on a full pipe.
    Discard,
}

impl ServerProcess {
    /// Starts `customer-mapping serve` on an ephemeral port with JSON logs
    /// and the given environment, and waits for its "serving" line.
    pub fn start(envs: &[(&str, &str)]) -> Self {
        Self::start_binary(std::path::Path::new(BINARY), envs, Output::Keep)
    }

    /// [`Self::start`] with another build of the server (A/B benchmarks),
    /// choosing what happens to its output.
    pub fn start_binary(binary: &std::path::Path, envs: &[(&str, &str)], output: Output) -> Self {
        let mut child = Command::new(binary)
            .arg("serve")
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env_remove("RUST_LOG")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let arrived = Arc::new(Condvar::new());
        let (serving_tx, serving_rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            let arrived = arrived.clone();
            let serving_tx = serving_tx.clone();
            std::thread::spawn(move || {
                let mut serving = false;
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(addr) = serving_addr(&line) {
                        serving = true;
                        let _ = serving_tx.send(addr);
                    }
                    if serving && output == Output::Discard {
                        continue;
                    }
                    lines.lock().expect("log lines").push(line);
                    arrived.notify_all();
                }
            });
        }
        let addr = serving_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no 'serving' line; output: {:?}", lines.lock()));
        Self {
            child,
            addr,
            lines,
            arrived,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The most memory the process has held at once (`VmHWM`), in KiB.
    pub fn peak_memory_kib(&self) -> u64 {
        memory_kib(self.pid(), "VmHWM").expect("VmHWM in /proc status")
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit, at most `limit`; returns its status and
    /// how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < limit,
                "the server did not exit within {limit:?}; output: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Self::wait_exit`] from async code, without blocking the runtime.
    pub async fn exited(mut self, limit: Duration) -> (ExitStatus, Duration, Self) {
        tokio::task::spawn_blocking(move || {
            let (status, took) = self.wait_exit(limit);
            (status, took, self)
        })
        .await
        .expect("waiting for the server did not panic")
    }

    /// Every line the process printed so far (JSON logs).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("log lines").clone()
    }

    /// Waits (at most 10 s) for a JSON log event matching `wanted`.
    pub fn wait_for_event(&self, wanted: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = self.lines.lock().expect("log lines");
        loop {
            if let Some(event) = lines
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .find(|e| wanted(e))
            {
                return event;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no such log event; output: {lines:?}");
            lines = self.arrived.wait_timeout(lines, left).expect("log lines").0;
        }
    }

    /// The metrics address the "serving" line names (`METRICS_ADDR` set).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.wait_for_event(|e| e["message"] == "serving customermapping.v1.CustomerMapping")
            ["metrics"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .expect("the serving line names the metrics address")
    }

    /// The JSON log events so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// A memory figure of process `pid` from `/proc/<pid>/status`, in KiB:
/// `VmRSS` (resident now) or `VmHWM` (the most it ever held).
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serving_addr(line: &str) -> Option<SocketAddr> {
    let event: serde_json::Value = serde_json::from_str(line).ok()?;
    if !event["message"].as_str()?.starts_with("serving") {
        return None;
    }
    event["addr"].as_str()?.parse().ok()
}
