//! Byte-range replacements and splicing them into a body: the only way output bytes change.

use std::ops::Range;

/// Replace `range` of the input with `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Edit {
    pub range: Range<usize>,
    pub bytes: Vec<u8>,
}

/// Copies `body`, replacing each edit's range. Edits must be in order and must not overlap
/// (scanners produce them that way); `None` when there is nothing to replace.
pub(crate) fn splice(body: &[u8], edits: &[Edit]) -> Option<Vec<u8>> {
    if edits.is_empty() {
        return None;
    }
    let grow: usize = edits.iter().map(|e| e.bytes.len()).sum();
    let mut out = Vec::with_capacity(body.len() + grow);
    let mut copied = 0;
    for edit in edits {
        debug_assert!(copied <= edit.range.start && edit.range.start <= edit.range.end);
        out.extend_from_slice(&body[copied..edit.range.start]);
        out.extend_from_slice(&edit.bytes);
        copied = edit.range.end;
    }
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_in_order_and_keeps_the_rest() {
        let body = b"0123456789";
        let edits = [Edit { range: 1..3, bytes: b"ab".to_vec() }, Edit { range: 5..5, bytes: b"X".to_vec() }];
        assert_eq!(splice(body, &edits).as_deref(), Some(&b"0ab34X56789"[..]));
        assert_eq!(splice(body, &[]), None);
    }
}
