//! Where access lines go: standard output, written in batches.
//!
//! Each thread appends its lines to its own buffer; the buffer is written (one
//! `write` for many lines) when it fills, when the runtime worker is about to
//! park (nothing left to do: see [`flush_thread`], installed by the binary as
//! tokio's park hook), and when the thread ends. So a busy proxy makes one system
//! call per few dozen lines and shares nothing between threads per request,
//! while an idle one shows each line at once. Whole buffers are written under
//! one lock, so lines from different threads never interleave.
//!
//! Tests can [`capture`] the lines instead; captured lines are written at once.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// A thread's buffer is written once it holds this much.
const FLUSH_AT: usize = 16 * 1024;

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

/// Writes this thread's pending lines. The binary calls it whenever a runtime
/// worker parks and when a runtime thread stops.
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
