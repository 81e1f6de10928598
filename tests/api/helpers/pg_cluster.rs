//! A private PostgreSQL cluster, started by the test from the machine's
//! PostgreSQL binaries, so that it can be stopped, crashed and restarted
//! without touching anything else.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Server settings beyond the defaults every cluster gets (`-c ...`).
    settings: String,
    _dir: tempfile::TempDir,
}

/// The newest `/usr/lib/postgresql/*/bin` that has `initdb` and `pg_ctl`.
pub fn binaries() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    found.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

/// PostgreSQL refuses to run as root: run its tools as `postgres` then.
fn command(program: &Path) -> Command {
    if is_root() {
        // A PATH without /usr/sbin (where util-linux puts it) still finds it.
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or("runuser");
        let mut command = Command::new(runuser);
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A temporary directory PostgreSQL's tools may write in.
fn owned_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["postgres:postgres"]).arg(dir.path());
                c
            },
            "chown",
        );
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PgCluster {
    /// Creates and starts a cluster on a free loopback port, or returns
    /// `None` (after saying why) where no PostgreSQL binaries exist.
    pub fn start_new() -> Option<Self> {
        Self::start_new_with("")
    }

    /// [`Self::start_new`] with extra server settings (`-c name=value ...`).
    pub fn start_new_with(settings: &str) -> Option<Self> {
        let Some(bin) = binaries() else {
            super::report(
                "SKIPPED: no PostgreSQL binaries under /usr/lib/postgresql/*/bin \
                 (initdb, pg_ctl); install the postgresql package to run the fault tests",
            );
            return None;
        };
        let dir = owned_tempdir();
        let data = dir.path().join("data");
        let mut initdb = command(&bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
                "--encoding=UTF8",
            ])
            .arg("-D")
            .arg(&data);
        run(initdb, "initdb");
        let cluster = Self {
            bin,
            data,
            port: free_port(),
            settings: settings.to_owned(),
            _dir: dir,
        };
        cluster.start();
        Some(cluster)
    }

    /// A primary that commits only once a streaming standby has flushed the
    /// commit record (`synchronous_commit = on`, any standby counts), and
    /// that standby, made by `pg_basebackup -R` and started, with
    /// replication confirmed synchronous. `None` (said why) without the
    /// binaries.
    pub fn start_primary_and_synchronous_standby() -> Option<(Self, Self)> {
        let primary = Self::start_new_with(
            "-c synchronous_standby_names='*' -c synchronous_commit=on -c wal_level=replica",
        )?;
        let dir = owned_tempdir();
        let data = dir.path().join("data");
        let mut basebackup = command(&primary.bin.join("pg_basebackup"));
        basebackup
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-X", "stream", "-R", "--no-sync", "-D"])
            .arg(&data);
        run(basebackup, "pg_basebackup");
        let standby = Self {
            bin: primary.bin.clone(),
            data,
            port: free_port(),
            settings: String::new(),
            _dir: dir,
        };
        standby.start();
        primary.wait_for_synchronous_standby();
        Some((primary, standby))
    }

    /// Waits (bounded) until a standby streams synchronously from this one.
    fn wait_for_synchronous_standby(&self) {
        let query = "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'";
        for _ in 0..300 {
            if self.psql(query) == "1" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the standby never became synchronous");
    }

    /// Runs one query with `psql` (next to the server binaries, or on the
    /// PATH) and returns its unaligned output.
    pub fn psql(&self, query: &str) -> String {
        let psql = [self.bin.join("psql"), PathBuf::from("psql")]
            .into_iter()
            .find(|p| p.is_absolute() && p.exists())
            .unwrap_or_else(|| PathBuf::from("psql"));
        let output = Command::new(psql)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-At", "-c", query])
            .output()
            .expect("psql runs");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILLs the postmaster: a primary that dies at once, no shutdown.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .expect("the postmaster's pid file");
        let pid = pid.lines().next().expect("a pid").trim().to_owned();
        let killed = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill runs");
        assert!(killed.success(), "kill -KILL {pid}");
    }

    /// Promotes this standby and waits until it accepts writes.
    pub fn promote(&self) {
        let mut pg_ctl = command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "promote"]);
        run(pg_ctl, "pg_ctl promote");
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let mut pg_ctl = command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-l"])
            .arg(self.data.join("log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=50 {}",
                self.port, self.settings
            ))
            .arg("start");
        run(pg_ctl, "pg_ctl start");
    }

    /// Stops the server: `fast` (clean, sessions ended) or `immediate`
    /// (a crash: no checkpoint, recovery from WAL at next start).
    pub fn stop(&self, mode: &str) {
        let mut pg_ctl = command(&self.bin.join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", mode, "stop"]);
        run(pg_ctl, "pg_ctl stop");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}
