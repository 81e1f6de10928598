//! The log writer: the request path appends each formatted line to a
//! shared buffer, and one thread writes what gathered to stdout in one
//! `write(2)`.
//!
//! Why not a channel to a writer thread (tracing-appender's `non_blocking`):
//! every line sent to an idle writer wakes it, and on a busy server each
//! wake is a context switch on cores the requests need (its cost is in
//! docs/PERFORMANCE.md). Here the thread, after writing, lets lines gather
//! for [`GATHER`] before it looks again: under load that is one wake and one
//! write per interval whatever the request rate; when idle, the first line
//! wakes it at once.
//!
//! Nothing is dropped: past [`MAX_BUFFERED`] bytes a logging call waits for
//! the writer. Dropping the [`LogGuard`] writes what is left (bounded).

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, mpsc},
    thread,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer lets lines gather after a write.
const GATHER: Duration = Duration::from_millis(10);

/// Buffered bytes beyond which logging calls wait for the writer.
const MAX_BUFFERED: usize = 4 << 20;

/// How long dropping the guard waits for the last lines to be written.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(1);

/// Name of the thread that writes log lines.
pub const LOG_WRITER: &str = "log-writer";

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for the first line.
    lines: Condvar,
    /// Logging calls wait here while the buffer is full.
    room: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The writer waits on `lines` (only then is it worth a notify).
    writer_waiting: bool,
    /// Logging calls waiting on `room`.
    waiting_for_room: usize,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where the subscriber writes: hands each line to the writer thread.
#[derive(Clone)]
pub struct Lines(Arc<Shared>);

/// Keep until exit: dropping it writes the lines still buffered.
#[must_use = "dropping the guard stops the log writer; keep it until exit"]
pub struct LogGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

/// Starts the writer thread over `out`.
pub fn spawn(out: impl Write + Send + 'static) -> io::Result<(Lines, LogGuard)> {
    let shared = Arc::new(Shared::default());
    let (finished, done) = mpsc::channel();
    let thread_shared = shared.clone();
    thread::Builder::new()
        .name(LOG_WRITER.into())
        .spawn(move || {
            write_until_closed(&thread_shared, out);
            let _ = finished.send(());
        })?;
    Ok((Lines(shared.clone()), LogGuard { shared, done }))
}

fn write_until_closed(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            while state.buf.is_empty() && !state.closed {
                state.writer_waiting = true;
                state = shared
                    .lines
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.writer_waiting = false;
            std::mem::swap(&mut batch, &mut state.buf);
            if state.waiting_for_room > 0 {
                shared.room.notify_all();
            }
            state.closed
        };
        if !batch.is_empty() {
            test_hook(&mut out, &batch);
            // Nowhere to report a failed write to: the line is lost, as
            // it would be on a closed stdout anyway.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        }
        if closed {
            return;
        }
        thread::sleep(GATHER);
    }
}

/// Debug builds only: lets the tests prove that a dead writer ends the
/// process. It dies on the first write after the "serving" line, which it
/// writes first, so the test sees the server start.
#[cfg(debug_assertions)]
fn test_hook(out: &mut impl Write, batch: &[u8]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SERVED: AtomicBool = AtomicBool::new(false);
    if std::env::var("CUSTOMER_MAPPING_TEST_PANIC_TASK").is_ok_and(|task| task == "log writer") {
        if SERVED.load(Ordering::Relaxed) {
            let _ = out.flush();
            panic!("CUSTOMER_MAPPING_TEST_PANIC_TASK: panicking in the log writer, as asked");
        }
        if batch.windows(7).any(|w| w == b"serving") {
            SERVED.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(not(debug_assertions))]
fn test_hook(_: &mut impl Write, _: &[u8]) {}

impl Drop for LogGuard {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            self.shared.lines.notify_one();
        }
        let _ = self.done.recv_timeout(FLUSH_ON_EXIT);
    }
}

/// One logging call's handle on the buffer.
pub struct Line<'a>(&'a Shared);

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.0)
    }
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.0.lock();
        if state.closed {
            // After the guard: straight to stdout rather than lost.
            drop(state);
            return io::stdout().write(line);
        }
        while state.buf.len() >= MAX_BUFFERED && !state.closed {
            state.waiting_for_room += 1;
            state = self
                .0
                .room
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.waiting_for_room -= 1;
        }
        state.buf.extend_from_slice(line);
        if state.writer_waiting {
            state.writer_waiting = false;
            self.0.lines.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("captured").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_by_the_time_the_guard_is_dropped() {
        let out = Captured::default();
        let (lines, guard) = spawn(out.clone()).expect("the writer starts");
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let lines = lines.clone();
                thread::spawn(move || {
                    for i in 0..1000 {
                        // One write per line, as the subscriber does.
                        let line = format!("{t} {i}\n");
                        lines
                            .make_writer()
                            .write_all(line.as_bytes())
                            .expect("written");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("no panic");
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().expect("captured").clone()).expect("UTF-8");
        let mut next = [0; 4];
        for line in text.lines() {
            let (t, i) = line.split_once(' ').expect("a line");
            let (t, i): (usize, usize) = (t.parse().expect("t"), i.parse().expect("i"));
            assert_eq!(i, next[t], "thread {t}'s lines in order");
            next[t] += 1;
        }
        assert_eq!(next, [1000; 4], "no line lost");
    }
}
