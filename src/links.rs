//! Pagination link rewriting for response bodies.
//!
//! Tallyfy's list responses carry absolute upstream URLs (`meta.pagination.links.next`), e.g.
//! `https://go.tallyfy.com/api/organizations/{org}/runs?page=2`; a legacy client that follows one leaves
//! the proxy. [`LinkRewriter::rewrite_json`] rewrites every JSON string *value* (never a key) whose decoded
//! text starts with `{upstream_base}/api/` so it starts with `{public_base}/api/` instead.
//!
//! Byte-preserving: only the matched prefix of such a string is replaced (written plainly); the rest of
//! the string keeps its raw bytes, so PHP's `\/` escapes after the prefix stay. The prefix is matched on
//! the decoded text, so `https:\/\/go.tallyfy.com\/api\/` (PHP's default) matches like the plain form.
//! The comparison is exact bytes (Tallyfy writes lowercase scheme and host).

mod location;
#[cfg(test)]
mod tests;

pub use location::ApiLocation;

use memchr::memmem;

use crate::json::scan::{self as json_scan, StrToken, Visitor};
use crate::json::strings::{JsonChars, ascii_set, escape_may_hide, push_escaped};
use crate::json::{Edit, splice};

/// Response link rewriting (`[links]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    /// JSON responses are buffered up to this size to rewrite their links; larger
    /// ones stream through untouched.
    pub max_body_bytes: u64,
}

/// The pre-scan every JSON response gets: can it hold an upstream link at all?
/// Built once per config generation; a body that passes it is forwarded as the
/// very same bytes, never copied or parsed.
#[derive(Debug, Clone)]
pub struct LinkScan {
    /// Finds the upstream authority (`go.tallyfy.com`): every link contains it,
    /// plainly or escaped. Built once: a searcher made per response cost more
    /// than searching a 700-byte body.
    host: memmem::Finder<'static>,
    host_set: [bool; 128],
}

impl LinkScan {
    pub fn new(upstream_base: &str) -> Self {
        let after_scheme = upstream_base.split_once("://").map_or(upstream_base, |(_, rest)| rest);
        let host = after_scheme.split('/').next().unwrap_or_default().as_bytes();
        let host_set = ascii_set([host]);
        LinkScan { host: memmem::Finder::new(host).into_owned(), host_set }
    }

    /// `false` means no string in `body` can start with the upstream prefix.
    pub fn may_need_rewrite(&self, body: &[u8]) -> bool {
        self.host.find(body).is_some() || escape_may_hide(body, &self.host_set)
    }

    /// [`LinkScan::may_need_rewrite`] over a body held as the chunks it arrived
    /// in, looking across each boundary too, without joining them.
    pub fn may_need_rewrite_chunks(&self, chunks: &[bytes::Bytes]) -> bool {
        if let [only] = chunks {
            return self.may_need_rewrite(only);
        }
        // A host or a `\uXXXX` escape may straddle a boundary: look at the last
        // `edge` bytes before it together with the first `edge` after it.
        let edge = self.host.needle().len().max(6) - 1;
        let mut tail: Vec<u8> = Vec::with_capacity(2 * edge);
        for chunk in chunks {
            if self.may_need_rewrite(chunk) {
                return true;
            }
            let tail_len = tail.len();
            tail.extend_from_slice(&chunk[..chunk.len().min(edge)]);
            if tail_len > 0 && self.may_need_rewrite(&tail) {
                return true;
            }
            tail.truncate(tail_len);
            tail.extend_from_slice(&chunk[chunk.len().saturating_sub(edge)..]);
            let excess = tail.len().saturating_sub(edge);
            tail.drain(..excess);
        }
        false
    }
}

/// Rewrites upstream API links into proxy links.
#[derive(Debug, Clone)]
pub struct LinkRewriter {
    /// `{upstream_base}/api/`, decoded text.
    from: String,
    /// `{public_base}/api/`, as JSON string content.
    to: Vec<u8>,
    scan: LinkScan,
}

/// The result of [`LinkRewriter::rewrite_json`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkRewrite {
    /// `None`: nothing changed, forward the very same bytes.
    pub body: Option<Vec<u8>>,
    pub links_rewritten: usize,
}

/// The body had a candidate link but is not valid JSON; forward it untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("response body is not valid JSON")]
pub struct InvalidJson;

impl LinkRewriter {
    /// `upstream_base` like `https://go.tallyfy.com`, `public_base` like `http://127.0.0.1:8080`;
    /// a trailing `/` on either is ignored. `api`: links keep their `/api`
    /// (`{public_base}/api/...`); without it they lose it (`{public_base}/...`),
    /// for callers that use Tallyfy's unprefixed host style.
    pub fn new(upstream_base: &str, public_base: &str, api: bool) -> Self {
        let from = format!("{}/api/", upstream_base.trim_end_matches('/'));
        let mut to = Vec::new();
        let prefix = if api { "/api/" } else { "/" };
        push_escaped(&mut to, &format!("{}{prefix}", public_base.trim_end_matches('/')));
        LinkRewriter { from, to, scan: LinkScan::new(upstream_base) }
    }

    /// Cheap pre-scan: `false` means no string in `body` can start with the upstream prefix.
    pub fn may_need_rewrite(&self, body: &[u8]) -> bool {
        self.scan.may_need_rewrite(body)
    }

    /// Rewrites the upstream links in a JSON body. Bodies without a candidate are not validated.
    pub fn rewrite_json(&self, body: &[u8]) -> Result<LinkRewrite, InvalidJson> {
        if !self.may_need_rewrite(body) {
            return Ok(LinkRewrite::default());
        }
        let mut visitor = LinkVisitor { rewriter: self, edits: Vec::new() };
        json_scan::scan(json_scan::Reader::AnyCaller, body, (), &mut visitor).map_err(|_| InvalidJson)?;
        Ok(LinkRewrite { links_rewritten: visitor.edits.len(), body: splice(body, &visitor.edits) })
    }

    /// Raw length of the prefix of `raw` (string content) that decodes to `self.from`, if it does.
    fn matched_prefix(&self, raw: &[u8], escaped: bool) -> Option<usize> {
        let from = self.from.as_bytes();
        if !escaped {
            return raw.starts_with(from).then_some(from.len());
        }
        let mut chars = JsonChars::new(raw);
        let mut end = 0;
        for expected in self.from.chars() {
            let (c, next) = chars.next()?;
            if c != expected {
                return None;
            }
            end = next;
        }
        Some(end)
    }
}

struct LinkVisitor<'a> {
    rewriter: &'a LinkRewriter,
    edits: Vec<Edit>,
}

impl Visitor for LinkVisitor<'_> {
    type Ctx = ();

    fn key(&mut self, _: &[u8], _: (), _: StrToken) {}

    fn element(&mut self, _: ()) {}

    fn string(&mut self, body: &[u8], _: (), token: StrToken) {
        if let Some(len) = self.rewriter.matched_prefix(token.raw(body), token.escaped) {
            let start = token.start + 1;
            self.edits.push(Edit { range: start..start + len, bytes: self.rewriter.to.clone() });
        }
    }

    fn number(&mut self, _: &[u8], _: (), _: std::ops::Range<usize>) {}
}
