//! The raw bytes of each HTTP/1 request head, so a chunked request that also
//! carried a `Content-Length` can be refused.
//!
//! When a request carries both, hyper frames it by `Transfer-Encoding` and drops
//! the `Content-Length` before the service sees the request (RFC 9112 §6.3
//! allows that). A front proxy that framed it by `Content-Length` would then
//! disagree with us about where the next request starts: the classic smuggling
//! set-up. Like nginx and Envoy, the proxy refuses such requests outright, and
//! the [`HeadTap`] is how it can still see the `Content-Length` hyper removed.
//!
//! The tap records what the connection reads from the moment the previous
//! response ended until hyper hands the next request over. Those bytes start
//! with the next head only if, when the response ended, nothing beyond the
//! previous request had been read and hyper had nothing of its body left to
//! drain; a request that cannot be shown to be free of a `Content-Length` is
//! refused too. So the tap also counts what it did not record and remembers
//! the last bytes read, and judges at each response's end what the recording
//! that follows can be trusted to hold ([`Next`]):
//! - bytes read past the previous request's end that do not end a head
//!   (pipelining, a head split across reads): the next head may have been read
//!   in part before recording began, so it cannot be checked ([`Next::Unknown`]);
//! - a body the handler may have left unread (hyper drains it after the
//!   response, so its bytes come first): the head is the one place the request
//!   line occurs, if it occurs once ([`Next::AfterDrain`]);
//! - otherwise the recording starts with the head ([`Next::AtStart`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use memchr::memmem;

/// Capacity a cleared recording keeps for the next head; a larger buffer (after
/// a big head) is released.
const KEPT_CAPACITY: usize = 4 * 1024;

/// How a dispatched request's body is framed, as hyper read its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Where the next head stands in the recording that follows a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// The recording starts with it.
    AtStart,
    /// Behind whatever hyper drains of the previous body, if anything.
    AfterDrain,
    /// It may have been read, in whole or in part, before recording began.
    Unknown,
}

/// What was learnt about the request in flight when it was dispatched.
#[derive(Debug, Clone, Copy)]
struct Dispatched {
    framing: Framing,
    /// Bytes recorded past its head's end; `None` when the head was not found
    /// whole in the recording.
    past_head: Option<u64>,
}

#[derive(Debug)]
struct Recording {
    bytes: Vec<u8>,
    /// Bytes read while recording that the cap left out.
    dropped: bool,
    /// Bytes read while not recording (the request's body, and anything after it).
    unrecorded: u64,
    /// The last three bytes read, recording or not, oldest first.
    tail: [u8; 3],
    /// Where the head being recorded stands.
    next: Next,
    /// The request in flight, once dispatched.
    dispatched: Option<Dispatched>,
}

/// A copy of the bytes an HTTP/1 connection reads while waiting for a request
/// head (see the module docs). At most `cap` bytes are kept.
#[derive(Debug)]
pub(super) struct HeadTap {
    recording: AtomicBool,
    state: Mutex<Recording>,
    cap: usize,
}

impl HeadTap {
    pub fn new(cap: usize) -> HeadTap {
        let state = Recording {
            bytes: Vec::new(),
            dropped: false,
            unrecorded: 0,
            tail: [0; 3],
            next: Next::AtStart,
            dispatched: None,
        };
        HeadTap { recording: AtomicBool::new(true), state: Mutex::new(state), cap }
    }

    fn state(&self) -> MutexGuard<'_, Recording> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in what the connection just read.
    pub fn record(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let recording = self.recording.load(Ordering::Acquire);
        let mut state = self.state();
        let keep = data.len().min(3);
        state.tail.rotate_left(keep);
        state.tail[3 - keep..].copy_from_slice(&data[data.len() - keep..]);
        if recording {
            let room = self.cap.saturating_sub(state.bytes.len());
            state.dropped |= data.len() > room;
            state.bytes.extend_from_slice(&data[..data.len().min(room)]);
        } else {
            state.unrecorded = state.unrecorded.saturating_add(data.len() as u64);
        }
    }

    /// The request whose head starts with `request_line` (`METHOD SP target SP`)
    /// has been dispatched: stops recording, and returns whether it is chunked
    /// and either carried a `Content-Length` or cannot be shown not to have.
    pub fn finish_head(&self, request_line: &[u8], framing: Framing) -> bool {
        self.recording.store(false, Ordering::Release);
        let mut state = self.state();
        let recorded = &state.bytes[..];
        let start = match state.next {
            Next::AtStart => recorded.starts_with(request_line).then_some(0),
            Next::AfterDrain if !state.dropped => {
                let mut found = memmem::find_iter(recorded, request_line);
                match (found.next(), found.next()) {
                    (Some(start), None) => Some(start),
                    _ => None,
                }
            }
            Next::AfterDrain | Next::Unknown => None,
        };
        // The usual request, a head with no body read in one piece, is not
        // parsed: recorded bytes that start with the request line and end a
        // head hold that head and, if more, whole heads read past it (which
        // leave nothing to record of the next, so it is refused if chunked).
        let (ambiguous, past_head) = if framing == Framing::Empty && start == Some(0) && ends_a_head(recorded)
        {
            (false, Some(0))
        } else {
            let head = start.and_then(|start| read_head(&recorded[start..]).map(|head| (start, head)));
            (
                framing == Framing::Chunked && head.is_none_or(|(_, head)| head.content_length),
                head.map(|(start, head)| (recorded.len() - start - head.len) as u64),
            )
        };
        state.dispatched = Some(Dispatched { framing, past_head });
        state.unrecorded = 0;
        state.dropped = false;
        state.bytes.clear();
        if state.bytes.capacity() > KEPT_CAPACITY {
            state.bytes = Vec::new();
        }
        ambiguous
    }

    /// The response has been sent: what arrives next is the next head, or what
    /// is left of this request's body before it.
    pub fn resume(&self) {
        let mut state = self.state();
        let at_a_head_end = ends_a_head(&state.tail);
        state.next = match state.dispatched.take() {
            Some(Dispatched { framing, past_head: Some(past) }) => {
                next_head(framing, past.saturating_add(state.unrecorded), at_a_head_end)
            }
            _ => Next::Unknown,
        };
        drop(state);
        self.recording.store(true, Ordering::Release);
    }
}

/// Where the next head will stand, from how the request in flight was framed,
/// how many bytes were read past its head, and whether the last ones read end
/// a head (or a chunked body).
fn next_head(framing: Framing, past_head: u64, at_a_head_end: bool) -> Next {
    // Bytes read past the request's end that end a head: the next head is
    // whole in hyper's buffer, so nothing of it is recorded and the check
    // refuses it (a chunked one) for want of it.
    let read_past_its_end = match framing {
        Framing::Empty => past_head > 0,
        Framing::Length(length) => past_head > length,
        // Unknown without reading the chunks: only a read that ended where a
        // chunked body can end shows it did not stop inside the next head.
        Framing::Chunked => true,
    };
    if read_past_its_end && !at_a_head_end {
        return Next::Unknown;
    }
    match framing {
        Framing::Empty => Next::AtStart,
        Framing::Length(length) if past_head >= length => Next::AtStart,
        // The handler may not have read the body to its end.
        Framing::Length(_) | Framing::Chunked => Next::AfterDrain,
    }
}

/// Whether `bytes` end with an empty line (CR LF or bare LF, as hyper's parser
/// accepts): the end of a head, or of a chunked body.
fn ends_a_head(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\n\n") || bytes.ends_with(b"\n\r\n")
}

/// A head at the start of `bytes`: its length (through the empty line) and
/// whether it has a `Content-Length` field; `None` if it does not end in
/// `bytes`. Lines may end in CR LF or a bare LF, as hyper's parser accepts.
fn read_head(bytes: &[u8]) -> Option<Head> {
    let mut content_length = false;
    let mut at = memchr::memchr(b'\n', bytes)? + 1; // past the request line
    loop {
        let end = at + memchr::memchr(b'\n', &bytes[at..])?;
        let raw = &bytes[at..end];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        at = end + 1;
        if line.is_empty() {
            return Some(Head { len: at, content_length });
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            content_length |= line[..colon].eq_ignore_ascii_case(b"content-length");
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Head {
    len: usize,
    content_length: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &[u8] = b"POST /api/me ";

    /// Records `reads` one by one, then dispatches a request.
    fn dispatch(tap: &HeadTap, reads: &[&[u8]], line: &[u8], framing: Framing) -> bool {
        for read in reads {
            tap.record(read);
        }
        tap.finish_head(line, framing)
    }

    #[test]
    fn a_content_length_is_found_in_the_dispatched_head_only() {
        let tap = HeadTap::new(1024);
        let both = b"POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n0\r\n\r\n";
        assert!(dispatch(&tap, &[both], POST, Framing::Chunked));
        let tap = HeadTap::new(1024);
        let bare_lf = b"POST /api/me HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n";
        assert!(dispatch(&tap, &[bare_lf], POST, Framing::Chunked));
        let tap = HeadTap::new(1024);
        let in_the_body =
            b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n14\r\nContent-Length: 5\r\n";
        assert!(!dispatch(&tap, &[in_the_body], POST, Framing::Chunked), "a body line is not a header");
        let tap = HeadTap::new(1024);
        assert!(dispatch(&tap, &[b"junk"], POST, Framing::Chunked), "not recorded: unknown");
        let tap = HeadTap::new(1024);
        assert!(!dispatch(&tap, &[b"junk"], POST, Framing::Empty), "only chunked requests are judged");
    }

    #[test]
    fn requests_one_after_another_are_each_checked_from_their_first_byte() {
        let tap = HeadTap::new(1024);
        assert!(!dispatch(&tap, &[b"GET /api/me HTTP/1.1\r\n\r\n"], b"GET /api/me ", Framing::Empty));
        tap.resume();
        let chunked = b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked));
        tap.record(b"0\r\n\r\n"); // the rest of its body, read as the handler takes it
        tap.resume();
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked), "chunked after chunked");
        tap.record(b"0\r\n\r\n");
        tap.resume();
        let with_length = b"POST /api/me HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel";
        assert!(!dispatch(&tap, &[with_length], POST, Framing::Length(5)));
        tap.record(b"lo");
        tap.resume();
        let smuggling = b"POST /api/me HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(dispatch(&tap, &[smuggling], POST, Framing::Chunked));
    }

    #[test]
    fn a_head_begun_before_the_previous_response_ended_cannot_be_checked() {
        // The second head arrives in two reads: the first with the GET, the
        // rest after its response. Its start was never recorded; what was
        // recorded looks like a head with no length.
        let tap = HeadTap::new(1024);
        let first = b"GET /api/me HTTP/1.1\r\n\r\nPOST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\nX: ";
        assert!(!dispatch(&tap, &[first], b"GET /api/me ", Framing::Empty));
        tap.resume();
        assert!(dispatch(&tap, &[b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n"], POST, Framing::Chunked));
        // The same after a chunked body, and after a body with a length.
        let tap = HeadTap::new(1024);
        let chunked = b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked));
        tap.record(b"0\r\n\r\nPOST /api/me HTTP/1.1\r\nContent-Length: 4\r\nX: ");
        tap.resume();
        assert!(dispatch(&tap, &[b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n"], POST, Framing::Chunked));
        let tap = HeadTap::new(1024);
        assert!(!dispatch(
            &tap,
            &[b"POST /api/me HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"],
            POST,
            Framing::Length(2)
        ));
        tap.record(b"POST /api/me HTTP/1.1\r\nContent-Length: 4\r\nX: ");
        tap.resume();
        assert!(dispatch(&tap, &[b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n"], POST, Framing::Chunked));
    }

    #[test]
    fn a_head_whole_in_hypers_buffer_is_not_recorded_and_so_refused() {
        let tap = HeadTap::new(1024);
        let both = b"GET /api/me HTTP/1.1\r\n\r\nPOST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!dispatch(&tap, &[both], b"GET /api/me ", Framing::Empty));
        tap.resume();
        assert!(tap.finish_head(POST, Framing::Chunked));
    }

    #[test]
    fn a_drained_body_holding_a_decoy_head_does_not_hide_the_real_one() {
        // The first request's body was left unread, so hyper drains it after
        // the response: its bytes are recorded first. A decoy head with the
        // same request line and no length comes before the real head.
        let decoy = b"POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let real = b"POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let tap = HeadTap::new(1024);
        let head = b"POST /nope HTTP/1.1\r\nContent-Length: 62\r\n\r\n";
        assert!(!dispatch(&tap, &[head], b"POST /nope ", Framing::Length(decoy.len() as u64)));
        tap.resume();
        assert!(dispatch(&tap, &[decoy, real], POST, Framing::Chunked), "two candidates: refused");
        // Without a decoy, the one head is checked wherever it stands.
        let tap = HeadTap::new(1024);
        assert!(!dispatch(&tap, &[head], b"POST /nope ", Framing::Length(5)));
        tap.resume();
        assert!(dispatch(&tap, &[b"hello", real], POST, Framing::Chunked));
        let tap = HeadTap::new(1024);
        assert!(!dispatch(&tap, &[head], b"POST /nope ", Framing::Length(5)));
        tap.resume();
        assert!(!dispatch(&tap, &[b"hello", decoy], POST, Framing::Chunked));
        // A drain too long for the recording hides where the head is.
        let tap = HeadTap::new(64);
        assert!(!dispatch(&tap, &[head], b"POST /nope ", Framing::Length(62)));
        tap.resume();
        assert!(dispatch(&tap, &[&[b'x'; 62], decoy], POST, Framing::Chunked));
    }

    #[test]
    fn a_body_read_to_its_end_leaves_the_next_head_at_the_start() {
        assert_eq!(next_head(Framing::Empty, 0, false), Next::AtStart);
        assert_eq!(next_head(Framing::Empty, 10, false), Next::Unknown);
        assert_eq!(next_head(Framing::Empty, 10, true), Next::AtStart);
        assert_eq!(next_head(Framing::Length(5), 5, false), Next::AtStart);
        assert_eq!(next_head(Framing::Length(5), 3, false), Next::AfterDrain);
        assert_eq!(next_head(Framing::Length(5), 9, false), Next::Unknown);
        assert_eq!(next_head(Framing::Chunked, 40, true), Next::AfterDrain);
        assert_eq!(next_head(Framing::Chunked, 40, false), Next::Unknown);
    }

    #[test]
    fn the_tail_spans_reads() {
        let tap = HeadTap::new(1024);
        let chunked = b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked));
        for byte in b"0\r\n\r\n" {
            tap.record(&[*byte]);
        }
        tap.resume();
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked), "the body ended at a read's end");
    }
}
