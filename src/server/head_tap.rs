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
//! response ended until hyper hands the next request over. Where the next head
//! starts in that recording is a matter of arithmetic, not of searching (an
//! attacker writes the bytes searched): the previous request's body ends
//! `length` bytes after its head, the tap counts every byte read past that head
//! before recording began, recorded or not, and the difference is where the
//! next head starts ([`Next::At`]; a body hyper drains after the response comes
//! first). A head read in part before recording began cannot be checked
//! ([`Next::Unknown`]), and neither can anything after a chunked body, whose end
//! the tap does not parse: a chunked request's connection is closed after its
//! response (see [`super::activity`]). A chunked request whose head is not where
//! the arithmetic puts it, starting with its request line, is refused.
//!
//! An unfinished head is held twice, in the tap and in hyper's read buffer.
//! Past its first [`UNCOUNTED_HEAD`] bytes, both copies are counted against
//! `server.max_buffered_bytes` (the [`Budget`] bodies are counted on) until
//! the head is dispatched or the connection ends: many connections trickling
//! long heads cannot take more memory than bodies may, and a read the budget
//! has no room for ends the connection ([`HeadsFull`]). Only the head counts:
//! body bytes read with it are the body's. Bytes read past a dispatched head
//! that are not its body (the next heads, pipelined or read with the body's
//! end) wait in hyper's buffer: past [`UNCOUNTED_HEAD`] they are counted too,
//! until hyper reads for a head again, and when the budget has no room for
//! them the connection ends at its next read between requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus_client::metrics::counter::Counter;

use crate::body::{Budget, Reservation};

/// Capacity a cleared recording keeps for the next head; a larger buffer (after
/// a big head) is released.
const KEPT_CAPACITY: usize = 4 * 1024;

/// Bytes of an unfinished head a connection holds without counting them (a
/// head this long, or a body read with it, is the usual case: hyper's read
/// buffer starts at 8 KiB).
pub(super) const UNCOUNTED_HEAD: u64 = 8 * 1024;

/// The budget had no room for more of an unfinished head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unfinished request heads hold all of server.max_buffered_bytes")]
pub(super) struct HeadsFull;

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

/// `METHOD SP request-target SP`, as a dispatched request's head starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct RequestLine<'a> {
    pub method: &'a [u8],
    pub target: &'a [u8],
}

impl RequestLine<'_> {
    fn starts(&self, bytes: &[u8]) -> bool {
        let Some(rest) = bytes.strip_prefix(self.method).and_then(|rest| rest.strip_prefix(b" ")) else {
            return false;
        };
        rest.strip_prefix(self.target).is_some_and(|rest| rest.starts_with(b" "))
    }
}

/// Where the next head stands in the recording that follows a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// This many bytes in (what is left of the previous body, then any empty
    /// lines, which hyper's parser skips).
    At(u64),
    /// It may have been read, in whole or in part, before recording began.
    Unknown,
}

/// What was learnt about the request in flight when it was dispatched.
#[derive(Debug, Clone, Copy)]
struct Dispatched {
    framing: Framing,
    /// Bytes read past its head's end before it was dispatched (kept, or left
    /// out by the cap); `None` when the head was not where it should have been.
    past_head: Option<u64>,
}

#[derive(Debug)]
struct Recording {
    bytes: Vec<u8>,
    /// Bytes read while recording that the cap left out.
    dropped: u64,
    /// Bytes read while not recording (the request's body, and anything after it).
    unrecorded: u64,
    /// Where the head being recorded stands.
    next: Next,
    /// The request in flight, once dispatched.
    dispatched: Option<Dispatched>,
    /// What the head being recorded holds of the budget (both copies of its
    /// bytes past [`UNCOUNTED_HEAD`]); `None` until it holds any.
    counted: Option<Reservation>,
    /// Where the head being recorded starts (past the empty lines before
    /// it), how far the recording was searched for its end, and where it ends
    /// once found (only past [`UNCOUNTED_HEAD`]).
    head_start: Option<usize>,
    scanned: usize,
    head_end: Option<usize>,
    /// Bytes read past the dispatched head that are not its body, in hyper's
    /// buffer, past [`UNCOUNTED_HEAD`]: counted until hyper reads for a head again.
    carried: Option<Reservation>,
}

/// A copy of the bytes an HTTP/1 connection reads while waiting for a request
/// head (see the module docs). At most `cap` bytes are kept.
#[derive(Debug)]
pub(super) struct HeadTap {
    recording: AtomicBool,
    state: Mutex<Recording>,
    cap: usize,
    /// What long unfinished heads are counted against; `None`: not counted.
    counting: Option<Counting>,
    /// The budget had no room for what hyper holds of the next heads: the
    /// connection ends at its next read.
    over: AtomicBool,
}

/// The budget a connection's long unfinished heads are counted against, and
/// the count of connections cut for want of room in it.
#[derive(Debug)]
pub(super) struct Counting {
    pub budget: Budget,
    pub over: Counter,
}

impl HeadTap {
    pub fn new(cap: usize, counting: Option<Counting>) -> HeadTap {
        let state = Recording {
            bytes: Vec::new(),
            dropped: 0,
            unrecorded: 0,
            next: Next::At(0),
            dispatched: None,
            counted: None,
            head_start: None,
            scanned: 0,
            head_end: None,
            carried: None,
        };
        HeadTap {
            recording: AtomicBool::new(true),
            state: Mutex::new(state),
            cap,
            counting,
            over: AtomicBool::new(false),
        }
    }

    fn state(&self) -> MutexGuard<'_, Recording> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes in what the connection just read; `Err` when the head waiting
    /// for dispatch has grown past what the budget has room for.
    pub fn record(&self, data: &[u8]) -> Result<(), HeadsFull> {
        if data.is_empty() {
            return Ok(());
        }
        let recording = self.recording.load(Ordering::Acquire);
        let mut state = self.state();
        if !recording {
            state.unrecorded += data.len() as u64;
            return Ok(());
        }
        let kept = data.len().min(self.cap.saturating_sub(state.bytes.len()));
        state.bytes.extend_from_slice(&data[..kept]);
        state.dropped += (data.len() - kept) as u64;
        let read = state.bytes.len() as u64 + state.dropped;
        match &self.counting {
            Some(counting) if read > UNCOUNTED_HEAD => state.count(counting.budget).inspect_err(|_| {
                counting.over.inc();
            }),
            _ => Ok(()),
        }
    }

    /// Whether the connection must end before its next read: the budget had
    /// no room for what hyper holds of its next heads. Only between requests
    /// (a request in flight reads its body to its end, and is answered).
    pub fn is_over(&self) -> bool {
        self.over.load(Ordering::Relaxed) && self.recording.load(Ordering::Acquire)
    }

    /// The request whose head starts with `request_line` has been dispatched:
    /// stops recording, and returns whether it is chunked and either carried a
    /// `Content-Length` or cannot be shown not to have.
    pub fn finish_head(&self, request_line: RequestLine<'_>, framing: Framing) -> bool {
        self.recording.store(false, Ordering::Release);
        let mut state = self.state();
        let recorded = &state.bytes[..];
        let start = match state.next {
            Next::At(offset) => usize::try_from(offset)
                .ok()
                .filter(|&offset| offset <= recorded.len())
                .map(|offset| {
                    offset + recorded[offset..].iter().take_while(|&&b| b == b'\r' || b == b'\n').count()
                })
                .filter(|&start| request_line.starts(&recorded[start..])),
            Next::Unknown => None,
        };
        let total = recorded.len() as u64 + state.dropped;
        // Bytes past this head that are not its body (the next heads) are
        // counted when there are more than the uncounted share: then the
        // head is parsed for where it ends.
        let counts_carried = self.counting.is_some() && total > UNCOUNTED_HEAD;
        // The usual request, a head with no body read in one piece, is not
        // parsed: kept bytes that start with the request line and end a head
        // hold that head and, if more, whole heads read past it (which leave
        // nothing to record of the next, so it is refused if chunked).
        let (ambiguous, past_head) = if !counts_carried
            && framing == Framing::Empty
            && start == Some(0)
            && state.dropped == 0
            && ends_a_head(recorded)
        {
            (false, Some(0))
        } else {
            let head = start.and_then(|start| read_head(&recorded[start..]).map(|head| (start, head)));
            (
                framing == Framing::Chunked && head.is_none_or(|(_, head)| head.content_length),
                head.map(|(start, head)| (recorded.len() - start - head.len) as u64 + state.dropped),
            )
        };
        let carried = if counts_carried { not_body(framing, past_head, total) } else { 0 };
        state.dispatched = Some(Dispatched { framing, past_head });
        // The dispatched head left both copies. With nothing recorded since
        // the last response, it came whole from hyper's buffer, which still
        // holds whatever was counted behind it: that stays counted. Otherwise
        // hyper read for it, so its buffer held no other head: what it carried
        // was this head's, and what is carried now is counted anew.
        state.counted = None;
        state.scanned = 0;
        state.head_start = None;
        state.head_end = None;
        if total > 0 {
            state.carried = None;
            self.carry(&mut state, carried);
        }
        state.unrecorded = 0;
        state.dropped = 0;
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
        let dispatched = state.dispatched.take();
        if self.counting.is_some() && state.unrecorded > 0 {
            // Read while the request was in flight, past its body: the next head.
            let carried = match dispatched {
                Some(Dispatched { framing, past_head }) => {
                    not_body(framing, past_head.map(|past| past + state.unrecorded), state.unrecorded)
                }
                None => state.unrecorded,
            };
            self.carry(&mut state, carried);
        }
        state.next = match dispatched {
            Some(Dispatched { framing, past_head: Some(past) }) => {
                next_head(framing, past + state.unrecorded)
            }
            _ => Next::Unknown,
        };
        drop(state);
        self.recording.store(true, Ordering::Release);
    }

    /// Counts hyper's copy of `bytes` of the next heads past
    /// [`UNCOUNTED_HEAD`] (at least what is counted already); with no room,
    /// the connection ends at its next read.
    fn carry(&self, state: &mut Recording, bytes: u64) {
        let Some(counting) = &self.counting else { return };
        let held = usize::try_from(bytes.saturating_sub(UNCOUNTED_HEAD)).unwrap_or(usize::MAX);
        if held == 0 {
            return;
        }
        let carried = state.carried.get_or_insert_with(|| counting.budget.reserve());
        if !carried.grow(held.saturating_sub(carried.bytes())) && !self.over.swap(true, Ordering::Relaxed) {
            counting.over.inc();
        }
    }
}

/// Of the bytes read past a head (`past`, when known; else all `read`), those
/// that are not its body: the next heads. After a chunked head, none: where
/// its body ends is not known (counting it would count a whole upload), and
/// its connection closes after the response, so hyper parses nothing past
/// the body.
fn not_body(framing: Framing, past: Option<u64>, read: u64) -> u64 {
    match (framing, past) {
        (Framing::Chunked, _) => 0,
        (_, None) => read,
        (Framing::Empty, Some(past)) => past,
        (Framing::Length(length), Some(past)) => past.saturating_sub(length),
    }
}

impl Recording {
    /// Counts both copies (the tap's, hyper's buffer) of the head waiting for
    /// dispatch, past [`UNCOUNTED_HEAD`]: its kept bytes up to its end (all
    /// of them until the end is found), twice. Body bytes read with it are
    /// not the head's.
    fn count(&mut self, budget: Budget) -> Result<(), HeadsFull> {
        let head = self.head_len() as u64;
        let held = head.saturating_sub(UNCOUNTED_HEAD) * 2;
        let counted = self.counted.get_or_insert_with(|| budget.reserve());
        let more = usize::try_from(held).unwrap_or(usize::MAX).saturating_sub(counted.bytes());
        if counted.grow(more) { Ok(()) } else { Err(HeadsFull) }
    }

    /// The kept bytes of the head being recorded, up to its end once found
    /// (searched from where the last search stopped: a head trickling in a
    /// byte at a time is searched once). Where the head starts is not known
    /// (`Next::Unknown`): all of them.
    fn head_len(&mut self) -> usize {
        if let Some(end) = self.head_end {
            return end;
        }
        let start = match self.head_start {
            Some(start) => start,
            None => {
                let Next::At(offset) = self.next else { return self.bytes.len() };
                let Ok(offset) = usize::try_from(offset) else { return self.bytes.len() };
                let Some(after) = self.bytes.get(offset..) else { return self.bytes.len() };
                // Empty lines before a head are skipped, as hyper's parser does.
                let start = offset + after.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
                if start == self.bytes.len() {
                    // Only empty lines so far: looked at again past them.
                    return self.bytes.len();
                }
                self.head_start = Some(start);
                start
            }
        };
        // An end split across reads is found: the search backs up two bytes.
        let from = self.scanned.saturating_sub(2).max(start);
        self.scanned = self.bytes.len();
        match head_end(&self.bytes[from..]) {
            Some(end) => {
                self.head_end = Some(from + end);
                from + end
            }
            None => self.bytes.len(),
        }
    }
}

/// Where the first head in `bytes` ends (just past its empty line: CR LF or a
/// bare LF, as hyper's parser accepts), if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes).find_map(|at| match &bytes[at + 1..] {
        [b'\n', ..] => Some(at + 2),
        [b'\r', b'\n', ..] => Some(at + 3),
        _ => None,
    })
}

/// Where the next head will stand in the recording, from how the request in
/// flight was framed and how many bytes were read past its head.
fn next_head(framing: Framing, read_past_head: u64) -> Next {
    let length = match framing {
        Framing::Empty => 0,
        Framing::Length(length) => length,
        Framing::Chunked => return Next::Unknown,
    };
    length.checked_sub(read_past_head).map_or(Next::Unknown, Next::At)
}

/// Whether `bytes` end with an empty line (CR LF or bare LF, as hyper's parser
/// accepts): the end of a head.
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

    const POST: RequestLine<'static> = RequestLine { method: b"POST", target: b"/api/me" };
    const GET: RequestLine<'static> = RequestLine { method: b"GET", target: b"/api/me" };
    const NOPE: RequestLine<'static> = RequestLine { method: b"POST", target: b"/nope" };

    /// Records `reads` one by one, then dispatches a request.
    fn dispatch(tap: &HeadTap, reads: &[&[u8]], line: RequestLine<'_>, framing: Framing) -> bool {
        for read in reads {
            tap.record(read).expect("not counted");
        }
        tap.finish_head(line, framing)
    }

    #[test]
    fn a_content_length_is_found_in_the_dispatched_head_only() {
        let tap = HeadTap::new(1024, None);
        let both = b"POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n0\r\n\r\n";
        assert!(dispatch(&tap, &[both], POST, Framing::Chunked));
        let tap = HeadTap::new(1024, None);
        let bare_lf = b"POST /api/me HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n";
        assert!(dispatch(&tap, &[bare_lf], POST, Framing::Chunked));
        let tap = HeadTap::new(1024, None);
        let in_the_body =
            b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n14\r\nContent-Length: 5\r\n";
        assert!(!dispatch(&tap, &[in_the_body], POST, Framing::Chunked), "a body line is not a header");
        let tap = HeadTap::new(1024, None);
        assert!(dispatch(&tap, &[b"junk"], POST, Framing::Chunked), "not recorded: unknown");
        let tap = HeadTap::new(1024, None);
        assert!(!dispatch(&tap, &[b"junk"], POST, Framing::Empty), "only chunked requests are judged");
    }

    #[test]
    fn requests_one_after_another_are_each_checked_from_their_first_byte() {
        let tap = HeadTap::new(1024, None);
        assert!(!dispatch(&tap, &[b"GET /api/me HTTP/1.1\r\n\r\n"], GET, Framing::Empty));
        tap.resume();
        let with_length = b"POST /api/me HTTP/1.1\r\nContent-Length: 5\r\n\r\nhel";
        assert!(!dispatch(&tap, &[with_length], POST, Framing::Length(5)));
        tap.record(b"lo").expect("not counted"); // the rest of its body, read as the handler takes it
        tap.resume();
        let chunked = b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
        assert!(
            !dispatch(&tap, &[b"\r\n", chunked], POST, Framing::Chunked),
            "empty lines first are skipped"
        );
        let smuggling = b"POST /api/me HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let tap = HeadTap::new(1024, None);
        assert!(!dispatch(&tap, &[with_length, b"lo"], POST, Framing::Length(5)));
        tap.resume();
        assert!(dispatch(&tap, &[smuggling], POST, Framing::Chunked));
    }

    #[test]
    fn nothing_after_a_chunked_request_is_trusted() {
        // Its connection is closed after the response; were it not, the end of
        // its body is not known without parsing the chunks.
        let tap = HeadTap::new(1024, None);
        let chunked = b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!dispatch(&tap, &[chunked], POST, Framing::Chunked));
        tap.resume();
        assert!(dispatch(&tap, &[chunked], POST, Framing::Chunked));
    }

    #[test]
    fn a_head_begun_before_the_previous_response_ended_cannot_be_checked() {
        // The second head arrives in two reads: the first with the GET, the
        // rest after its response. Its start was never recorded; what was
        // recorded looks like a head with no length.
        let tap = HeadTap::new(1024, None);
        let first = b"GET /api/me HTTP/1.1\r\n\r\nPOST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\nX: ";
        assert!(!dispatch(&tap, &[first], GET, Framing::Empty));
        tap.resume();
        assert!(dispatch(&tap, &[b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n"], POST, Framing::Chunked));
        // The same after a body with a length, read while not recording.
        let tap = HeadTap::new(1024, None);
        assert!(!dispatch(
            &tap,
            &[b"POST /api/me HTTP/1.1\r\nContent-Length: 2\r\n\r\n"],
            POST,
            Framing::Length(2)
        ));
        tap.record(b"abPOST /api/me HTTP/1.1\r\nContent-Length: 4\r\nX: ").expect("not counted");
        tap.resume();
        assert!(dispatch(&tap, &[b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n"], POST, Framing::Chunked));
    }

    #[test]
    fn a_head_whole_in_hypers_buffer_is_not_recorded_and_so_refused() {
        let tap = HeadTap::new(1024, None);
        let both = b"GET /api/me HTTP/1.1\r\n\r\nPOST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!dispatch(&tap, &[both], GET, Framing::Empty));
        tap.resume();
        assert!(tap.finish_head(POST, Framing::Chunked));
    }

    #[test]
    fn the_head_is_placed_past_a_drained_body_whatever_that_body_holds() {
        // The first request's body was left unread, so hyper drains it after
        // the response and its bytes are recorded first. A decoy head with the
        // same request line and no length is not taken for the real one.
        let decoy = b"POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let real = b"POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let head = b"POST /nope HTTP/1.1\r\nContent-Length: 62\r\n\r\n";
        let refused = |body: &[u8], next: &[u8], decoy_first: bool| {
            let tap = HeadTap::new(1024, None);
            assert!(!dispatch(&tap, &[head], NOPE, Framing::Length(body.len() as u64)));
            tap.resume();
            let reads: [&[u8]; 2] = if decoy_first { [body, next] } else { [next, body] };
            dispatch(&tap, &reads[..if decoy_first { 2 } else { 1 }], POST, Framing::Chunked)
        };
        assert!(refused(decoy, real, true), "the decoy is the drained body");
        assert!(refused(b"hello", real, true));
        assert!(!refused(b"hello", decoy, true), "a chunked head with no length behind the body passes");
        // A normalised target (hyper drops a `#fragment`) never matches the
        // line rebuilt from hyper's request, wherever a decoy stands.
        let tap = HeadTap::new(1024, None);
        let fragment = b"POST /api/me#x HTTP/1.1\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n19\r\nPOST /api/me HTTP/1.1\r\n\r\n\r\n0\r\n\r\n";
        assert!(dispatch(&tap, &[fragment], POST, Framing::Chunked));
    }

    #[test]
    fn bytes_the_cap_left_out_still_count() {
        // A head longer than the cap, then the start of the next one: its
        // bytes were read but not kept, so the next head began before
        // recording did.
        let tap = HeadTap::new(32, None);
        let long = [
            &b"GET /api/me HTTP/1.1\r\nX: "[..],
            &[b'a'; 40],
            b"\r\n\r\nPOST /api/me HTTP/1.1\r\nContent-Length: 4\r\nX: ",
        ]
        .concat();
        assert!(!dispatch(&tap, &[&long], GET, Framing::Empty));
        tap.resume();
        assert!(dispatch(
            &tap,
            &[b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"],
            POST,
            Framing::Chunked
        ));
        // And a head that ends past the cap is not read as a whole head.
        let tap = HeadTap::new(32, None);
        let smuggling =
            [&b"POST /api/me HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"[..], b"Content-Length: 4\r\n\r\n"]
                .concat();
        assert!(dispatch(&tap, &[&smuggling], POST, Framing::Chunked));
    }

    #[test]
    fn long_unfinished_heads_are_counted_twice_and_refused_when_the_budget_is_spent() {
        let budget = Budget::alone(128 * 1024);
        let over = Counter::default();
        let tap = || HeadTap::new(64 * 1024, Some(Counting { budget, over: over.clone() }));
        let head = [&b"GET /api/me HTTP/1.1\r\nX: "[..], &[b'a'; 32 * 1024 - 29], b"\r\n\r\n"].concat();
        let (short, rest) = head.split_at(UNCOUNTED_HEAD as usize);
        let first = tap();
        first.record(short).expect("the usual head is not counted");
        assert_eq!(budget.used_here(), 0);
        first.record(rest).expect("room");
        let counted = 2 * (head.len() - UNCOUNTED_HEAD as usize);
        assert_eq!(budget.used_here(), counted, "the tap's copy and hyper's");
        let second = tap();
        second.record(&head).expect("room for two");
        let third = tap();
        assert_eq!(third.record(&head), Err(HeadsFull), "no room for a third");
        assert_eq!(over.get(), 1);
        assert_eq!(budget.used_here(), 2 * counted, "the refused head holds nothing");

        // A dispatched head gives its bytes back.
        assert!(!first.finish_head(GET, Framing::Empty));
        assert_eq!(budget.used_here(), counted);
        drop(second);
        assert_eq!(budget.used_here(), 0, "a connection's end gives its head's bytes back");
        let fourth = tap();
        fourth.record(&head).expect("room again");
    }

    #[test]
    fn body_bytes_read_with_a_head_are_not_the_heads() {
        let budget = Budget::alone(64 * 1024);
        let mut spent = budget.reserve();
        assert!(spent.grow(64 * 1024), "the whole budget held elsewhere");
        let over = Counter::default();
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: over.clone() }));
        let post = [&b"POST /api/me HTTP/1.1\r\nContent-Length: 20480\r\n\r\n"[..], &[b'x'; 20480]].concat();
        let (first, rest) = post.split_at(9000);
        tap.record(first).expect("a short head and its body: nothing counted");
        tap.record(rest).expect("nor with more of the body");
        assert!(!tap.finish_head(POST, Framing::Length(20480)));
        tap.resume();
        assert!(!tap.is_over(), "the body is no next head");
        assert_eq!(over.get(), 0);
    }

    #[test]
    fn the_next_heads_held_past_a_dispatched_one_are_counted_and_end_the_connection_without_room() {
        let budget = Budget::alone(64 * 1024);
        let over = Counter::default();
        let get = b"GET /api/me HTTP/1.1\r\n\r\n";
        let unfinished = [&b"GET /api/me HTTP/1.1\r\nX: "[..], &[b'a'; 30 * 1024]].concat();
        // Pipelined in one read: the next head waits in hyper's buffer.
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: over.clone() }));
        tap.record(&[&get[..], &unfinished].concat()).expect("the dispatched head is short");
        assert!(!tap.finish_head(GET, Framing::Empty));
        assert_eq!(budget.used_here(), unfinished.len() - UNCOUNTED_HEAD as usize, "hyper's copy");
        assert!(!tap.is_over());
        // With no room, the connection ends at its next read.
        let mut spent = budget.reserve();
        assert!(spent.grow(64 * 1024 - budget.used_here()));
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: over.clone() }));
        tap.record(&[&get[..], &unfinished].concat()).expect("the dispatched head is short");
        assert!(!tap.finish_head(GET, Framing::Empty), "the request in flight goes on");
        assert!(!tap.is_over(), "its body, if any, is read to its end");
        tap.resume();
        assert!(tap.is_over(), "then the connection ends");
        assert_eq!(over.get(), 1);
        drop(tap);
        drop(spent);
        // Read with a body's end while its request was in flight.
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: over.clone() }));
        tap.record(b"POST /api/me HTTP/1.1\r\nContent-Length: 2\r\n\r\n").expect("short");
        assert!(!tap.finish_head(POST, Framing::Length(2)));
        let before = budget.used_here();
        tap.record(&[&b"ab"[..], &unfinished].concat()).expect("not recording");
        tap.resume();
        assert_eq!(budget.used_here() - before, unfinished.len() - UNCOUNTED_HEAD as usize);
    }

    #[test]
    fn heads_hyper_dispatches_from_its_buffer_keep_what_is_counted_behind_them() {
        let budget = Budget::alone(1024 * 1024);
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: Counter::default() }));
        let get = b"GET /api/me HTTP/1.1\r\n\r\n";
        let unfinished = [&b"GET /api/me HTTP/1.1\r\nX: "[..], &[b'a'; 30 * 1024]].concat();
        tap.record(&[&get[..], get, &unfinished].concat()).expect("room");
        assert!(!tap.finish_head(GET, Framing::Empty));
        let held = budget.used_here();
        assert!(held > 0);
        tap.resume();
        // The second GET comes from hyper's buffer: nothing was read for it.
        assert!(!tap.finish_head(GET, Framing::Empty));
        assert_eq!(budget.used_here(), held, "the unfinished head is still held, and counted");
        tap.resume();
        tap.record(b"\r\n\r\n").expect("room");
        assert!(!tap.finish_head(GET, Framing::Empty));
        assert_eq!(budget.used_here(), 0, "read for and dispatched: given back");
    }

    #[test]
    fn a_heads_end_is_found_across_reads() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nbody"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        let budget = Budget::alone(1024 * 1024);
        let tap = HeadTap::new(64 * 1024, Some(Counting { budget, over: Counter::default() }));
        let head = [&b"GET /api/me HTTP/1.1\r\nX: "[..], &[b'a'; 10 * 1024], b"\r\n\r\n"].concat();
        for byte in head.chunks(1) {
            tap.record(byte).expect("room");
        }
        tap.record(&[b'x'; 4096]).expect("room");
        assert_eq!(budget.used_here(), 2 * (head.len() - UNCOUNTED_HEAD as usize), "the head alone");
    }

    #[test]
    fn the_next_head_is_where_the_body_ends() {
        assert_eq!(next_head(Framing::Empty, 0), Next::At(0));
        assert_eq!(next_head(Framing::Empty, 10), Next::Unknown);
        assert_eq!(next_head(Framing::Length(5), 5), Next::At(0));
        assert_eq!(next_head(Framing::Length(5), 3), Next::At(2));
        assert_eq!(next_head(Framing::Length(5), 9), Next::Unknown);
        assert_eq!(next_head(Framing::Chunked, 0), Next::Unknown);
    }
}
