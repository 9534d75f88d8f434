//! `X-Request-Id`: the caller's own when it is a plain token of at most
//! [`MAX_LEN`] visible ASCII characters, otherwise one the proxy makes. The same
//! id goes upstream, back to the caller and into the access line.
//!
//! Made ids are a per-process random prefix and a counter
//! (`3f9c1e7b2d4e6f8a-1c`): as unique as a UUID for correlating logs, with no
//! system call per request. Each worker thread takes counter values in blocks,
//! so threads do not share a cache line per request. An id is written, in hex
//! by hand, into a small block of memory its thread shares among the next few
//! dozen ids, so making one allocates nothing and formats nothing.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use http::{HeaderMap, HeaderValue};

use crate::headers::X_REQUEST_ID;

/// Longest caller-supplied id kept.
pub const MAX_LEN: usize = 128;

/// Counter values a thread takes at once.
const BLOCK: u64 = 1 << 16;

/// The longest made id: 16 hex digits, `-`, 16 hex digits.
const MADE_LEN: usize = 33;

/// Bytes of ids a thread writes into one piece of memory (about thirty ids; a
/// request held open pins at most this much).
const IDS_BLOCK: usize = 1024;

static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The next value this thread hands out, and the end of its block.
    static RANGE: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Where this thread writes its next ids.
    static IDS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
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
    let prefix = PREFIX.get_or_init(|| {
        let mut prefix = [0; 16];
        hex(&mut prefix, rand::random::<u64>(), 16);
        prefix
    });
    let n = RANGE.with(|range| {
        let (mut next, mut end) = range.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        range.set((next + 1, end));
        next
    });
    let mut id = [0u8; MADE_LEN];
    id[..16].copy_from_slice(prefix);
    id[16] = b'-';
    let digits = hex_digits(n);
    hex(&mut id[17..17 + digits], n, digits);
    let id = &id[..17 + digits];
    let bytes = IDS.with_borrow_mut(|block| {
        if block.capacity() - block.len() < id.len() {
            *block = BytesMut::with_capacity(IDS_BLOCK);
        }
        block.extend_from_slice(id);
        block.split().freeze()
    });
    HeaderValue::from_maybe_shared(bytes).expect("hex digits and '-' are a valid header value")
}

/// How many hex digits `n` takes (at least one).
fn hex_digits(n: u64) -> usize {
    (64 - n.leading_zeros() as usize).div_ceil(4).max(1)
}

/// `n` as `out.len()` lowercase hex digits (its low ones, zero-padded).
fn hex(out: &mut [u8], mut n: u64, digits: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out[..digits].iter_mut().rev() {
        *slot = HEX[(n & 15) as usize];
        n >>= 4;
    }
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
    fn made_ids_are_the_prefix_and_the_counter_in_hex() {
        for n in [0u64, 1, 15, 16, 0xabc, u64::MAX] {
            let mut digits = [0u8; 16];
            let len = hex_digits(n);
            hex(&mut digits, n, len);
            assert_eq!(std::str::from_utf8(&digits[..len]).expect("ascii"), format!("{n:x}"));
        }
        let (a, b) = (generate(), generate());
        let (a, b) = (a.to_str().expect("ascii"), b.to_str().expect("ascii"));
        assert_eq!(a[..17], b[..17], "one prefix per process");
        let counter = |id: &str| u64::from_str_radix(&id[17..], 16).expect("hex counter");
        assert_eq!(counter(b), counter(a) + 1, "{a} then {b}");
        assert!(a[..16].bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        // Ids outlive the block they were written in, and each keeps its bytes.
        let ids: Vec<HeaderValue> = (0..200).map(|_| generate()).collect();
        let first = counter(ids[0].to_str().expect("ascii"));
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(counter(id.to_str().expect("ascii")), first + i as u64);
        }
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
