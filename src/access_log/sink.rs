//! Where access lines go: standard output, written in batches.
//!
//! Each thread appends its lines to its own buffer; the buffer is written (one
//! `write` for many lines) when it fills, at most [`MAX_DELAY`] after its first
//! line (when its single-threaded runtime is about to park, [`on_park`] leaves a
//! timer that writes it; on any other thread the park writes it at once), when
//! the runtime returns ([`flush_thread`]) and when the thread ends. So a busy
//! proxy makes one system call per fifty-odd lines and shares nothing between
//! threads per request (writing at every park cost about 0.4 µs per request), and an
//! idle one shows a line within 50 ms, like nginx's `access_log ... flush=`.
//! Whole buffers are written under one lock, so lines from different threads
//! never interleave.
//!
//! Tests can [`capture`] the lines instead; captured lines are written at once.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// A thread's buffer is written once it holds this much.
const FLUSH_AT: usize = 16 * 1024;

/// The longest a line waits in a thread's buffer for more to come.
const MAX_DELAY: Duration = Duration::from_millis(50);

/// Where written buffers go instead of standard output (tests, benches).
static REDIRECT: OnceLock<Redirect> = OnceLock::new();

enum Redirect {
    Capture(Arc<Mutex<Vec<u8>>>),
    Discard,
}
/// Serialises writes of whole buffers to standard output.
static STDOUT: Mutex<()> = Mutex::new(());
/// Set once a capture exists: lines are written at once.
static UNBUFFERED: AtomicBool = AtomicBool::new(false);

struct LineBuffer(Vec<u8>);

impl Drop for LineBuffer {
    fn drop(&mut self) {
        write_out(&mut self.0);
    }
}

thread_local! {
    static BUFFER: RefCell<LineBuffer> = const { RefCell::new(LineBuffer(Vec::new())) };
    /// A timer will write this thread's buffer.
    static WRITE_SCHEDULED: Cell<bool> = const { Cell::new(false) };
}

/// Appends one line (written by `line` into the buffer, newline included).
pub fn emit(line: impl FnOnce(&mut Vec<u8>)) {
    let _ = BUFFER.try_with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        line(&mut buffer.0);
        if buffer.0.len() >= FLUSH_AT || UNBUFFERED.load(Ordering::Relaxed) {
            write_out(&mut buffer.0);
        }
    });
}

/// The runtime on this thread has nothing to do: its pending lines are written
/// within [`MAX_DELAY`]. The binary installs this as tokio's park hook.
///
/// On a single-threaded runtime a task spawned here runs on this thread (tokio
/// runs it instead of parking) and writes this thread's buffer when its timer
/// fires; elsewhere the buffer is written at once.
pub fn on_park() {
    let pending =
        BUFFER.try_with(|buffer| buffer.try_borrow().is_ok_and(|b| !b.0.is_empty())).unwrap_or(false);
    if !pending || WRITE_SCHEDULED.get() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            WRITE_SCHEDULED.set(true);
            runtime.spawn(async {
                tokio::time::sleep(MAX_DELAY).await;
                WRITE_SCHEDULED.set(false);
                flush_thread();
            });
        }
        _ => flush_thread(),
    }
}

/// Writes this thread's pending lines now. The binary calls it when a runtime
/// returns and when a runtime thread stops.
pub fn flush_thread() {
    let _ = BUFFER.try_with(|buffer| {
        if let Ok(mut buffer) = buffer.try_borrow_mut() {
            write_out(&mut buffer.0);
        }
    });
}

fn write_out(bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    match REDIRECT.get() {
        Some(Redirect::Capture(capture)) => {
            capture.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(bytes)
        }
        Some(Redirect::Discard) => {}
        None => {
            let _one_writer = STDOUT.lock().unwrap_or_else(PoisonError::into_inner);
            // Nowhere to report a failed write of the log itself.
            let _ = std::io::stdout().lock().write_all(bytes);
        }
    }
    bytes.clear();
    if bytes.capacity() > 4 * FLUSH_AT {
        bytes.shrink_to(FLUSH_AT);
    }
}

/// Sends every access line of this process to memory instead of standard
/// output, unbuffered, and returns the buffer (for tests).
///
/// # Panics
/// If [`discard`] was chosen first.
pub fn capture() -> Arc<Mutex<Vec<u8>>> {
    let Redirect::Capture(capture) = REDIRECT.get_or_init(|| Redirect::Capture(Arc::default())) else {
        panic!("access lines are already being discarded");
    };
    UNBUFFERED.store(true, Ordering::Relaxed);
    capture.clone()
}

/// Formats every access line as usual but writes none (benches measure the
/// formatting without filling a terminal). Has no effect after [`capture`].
pub fn discard() {
    let _ = REDIRECT.set(Redirect::Discard);
}
