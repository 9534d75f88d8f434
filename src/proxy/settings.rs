//! What one config generation's pipeline needs, in the domain's own types (the
//! wiring builds it from `proxy.toml`).

use crate::identity::Identity;
use crate::{dates, links, tokens};

pub struct Settings {
    /// In match order: the first identity whose rule matches the caller wins.
    pub identities: Vec<Identity>,
    pub limits: RequestLimits,
    pub tokens: tokens::Settings,
    pub dates: dates::Settings,
    pub links: links::Settings,
    /// `listen.public_url`, or `None` to derive links' base from each request.
    pub public_url: Option<String>,
    /// Scheme of the proxy listener, for derived public URLs.
    pub listener_scheme: &'static str,
    /// `listen.unprefixed`: paths outside `/api` are read as under it.
    pub unprefixed: bool,
}

/// What a request may be before the proxy refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Sum of header name and value lengths; above it: 431.
    pub max_header_bytes: usize,
    /// Number of header fields; above it: 431.
    pub max_headers: usize,
    /// Request bodies above it: 413 (checked on `Content-Length` and while streaming).
    pub max_request_body_bytes: u64,
    /// What bodies held whole may take, all threads together.
    pub buffer_budget: crate::body::Budget,
}
