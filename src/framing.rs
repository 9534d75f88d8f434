//! How a request's body is delimited. Pure checks over the request head.
//!
//! A proxy and the server behind it must agree on where each request ends, or a
//! request can be smuggled inside another (RFC 9112 §6.3, §11.2). hyper already
//! refuses the worst heads (a conflicting `Content-Length` list, a
//! `Transfer-Encoding` without `chunked` last, bare CR, obs-fold). On top of that,
//! the proxy refuses, as nginx and Envoy do by default:
//! - a request with both `Content-Length` and `Transfer-Encoding` (400, and the
//!   connection is closed): see [`AmbiguousLength`];
//! - any `Transfer-Encoding` other than one `chunked` (501: the codings are not
//!   implemented, and a list such as `gzip, chunked` is exactly what desync
//!   attacks play on);
//! - a `Content-Length` that is not one plain number (400): HTTP/2 lets an empty
//!   one, or two, through, and hyper's HTTP/1 server takes `5, 5` as 5, where
//!   Tallyfy's servers might read them otherwise.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;

use crate::error::ProxyError;
use crate::headers::single_length;

/// Marks a request (in its extensions) whose HTTP/1 head carried both
/// `Content-Length` and `Transfer-Encoding`: hyper framed it by the latter and
/// removed the former; [`check`] refuses it and the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmbiguousLength;

/// Refuses a request whose framing another HTTP implementation could read differently.
pub fn check(head: &Parts) -> Result<(), ProxyError> {
    if head.extensions.get::<AmbiguousLength>().is_some() {
        return Err(ProxyError::AmbiguousLength);
    }
    if head.headers.contains_key(CONTENT_LENGTH) && single_length(&head.headers).is_none() {
        return Err(ProxyError::BadRequest("a Content-Length must be one plain number"));
    }
    let mut codings = head.headers.get_all(TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(only), None) if only.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::UnsupportedTransferEncoding),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    fn head(codings: &[&'static str], ambiguous: bool) -> Parts {
        let mut request = Request::new(());
        for coding in codings {
            request.headers_mut().append(TRANSFER_ENCODING, HeaderValue::from_static(coding));
        }
        if ambiguous {
            request.extensions_mut().insert(AmbiguousLength);
        }
        request.into_parts().0
    }

    #[test]
    fn plain_chunked_and_unframed_requests_pass() {
        assert!(check(&head(&[], false)).is_ok());
        assert!(check(&head(&["chunked"], false)).is_ok());
        assert!(check(&head(&["Chunked "], false)).is_ok());
    }

    #[test]
    fn other_codings_and_lists_are_not_implemented() {
        for codings in [&["gzip, chunked"][..], &["chunked", "chunked"], &["identity"], &["chunked, chunked"]]
        {
            assert!(
                matches!(check(&head(codings, false)), Err(ProxyError::UnsupportedTransferEncoding)),
                "{codings:?}"
            );
        }
    }

    #[test]
    fn a_length_is_one_plain_number() {
        let with_lengths = |lengths: &[&'static str]| {
            let mut head = head(&[], false);
            for length in lengths {
                head.headers.append(CONTENT_LENGTH, HeaderValue::from_static(length));
            }
            check(&head)
        };
        assert!(with_lengths(&["0"]).is_ok());
        assert!(with_lengths(&["12"]).is_ok());
        for lengths in [&[""][..], &["5, 5"], &["0", "00"], &["0", ""], &["+1"], &["1 "]] {
            assert!(matches!(with_lengths(lengths), Err(ProxyError::BadRequest(_))), "{lengths:?}");
        }
    }

    #[test]
    fn a_length_beside_chunked_is_refused() {
        assert!(matches!(check(&head(&["chunked"], true)), Err(ProxyError::AmbiguousLength)));
    }
}
