//! The byte-preserving JSON machinery the body rewriters share: a validating
//! streaming scanner ([`scan`]), JSON string contents ([`strings`]: decoding
//! escapes, writing plain strings, the pre-scans' escape check) and byte-range
//! edits spliced into a body ([`edits`]), the only way output bytes change.
//!
//! Used by [`crate::dates`] (request dates), [`crate::links`] (response links)
//! and [`crate::method_override`] (a JSON body's `_method`).

pub(crate) mod edits;
pub(crate) mod scan;
pub(crate) mod strings;

pub(crate) use edits::{Edit, splice};
