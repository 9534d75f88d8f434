//! `X-Request-Id`: the caller's own when it is a plain token of at most
//! [`MAX_LEN`] visible ASCII characters, otherwise one the proxy makes. The same
//! id goes upstream, back to the caller and into the access line.
//!
//! Made ids are a per-process random prefix and a counter
//! (`3f9c1e7b2d4e6f8a-1c`): as unique as a UUID for correlating logs, with no
//! system call per request. Each worker thread takes counter values in blocks,
//! so threads do not share a cache line per request.

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue};

use crate::headers::X_REQUEST_ID;

/// Longest caller-supplied id kept.
pub const MAX_LEN: usize = 128;

/// Counter values a thread takes at once.
const BLOCK: u64 = 1 << 16;

static PREFIX: OnceLock<String> = OnceLock::new();
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The next value this thread hands out, and the end of its block.
    static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// The request's id: the caller's when usable, else a new one.
pub fn for_request(headers: &HeaderMap) -> HeaderValue {
    match headers.get(X_REQUEST_ID) {
        Some(theirs) if usable(theirs.as_bytes()) => theirs.clone(),
        _ => generate(),
    }
}

fn usable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// A new id: the process prefix and this thread's next counter value.
pub fn generate() -> HeaderValue {
    let prefix = PREFIX.get_or_init(|| format!("{:016x}", rand::random::<u64>()));
    let n = RANGE.with(|range| {
        let (mut next, mut end) = range.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        range.set((next + 1, end));
        next
    });
    let mut id = String::with_capacity(prefix.len() + 17);
    id.push_str(prefix);
    let _ = write!(id, "-{n:x}");
    HeaderValue::try_from(id).expect("hex digits and '-' are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn plain_caller_ids_are_kept_and_others_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(for_request(&headers), "abc-123");
        for bad in ["x\" identity=idB status=200", "has space", ""] {
            headers.insert(X_REQUEST_ID, HeaderValue::from_str(bad).expect("value"));
            assert_ne!(for_request(&headers), bad, "{bad:?}");
        }
        let too_long = "a".repeat(MAX_LEN + 1);
        headers.insert(X_REQUEST_ID, HeaderValue::from_str(&too_long).expect("value"));
        let made = for_request(&headers);
        assert_ne!(made, too_long.as_str());
        assert_eq!(made.as_bytes()[16], b'-', "a made one: prefix, '-', counter");
    }

    #[test]
    fn made_ids_are_unique_across_threads() {
        let ids: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1000).map(|_| generate().to_str().expect("ascii").to_owned()).collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().expect("thread")).collect()
        });
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4000);
        assert!(ids.iter().all(|id| id.len() > 17 && id.as_bytes()[16] == b'-'));
    }
}
