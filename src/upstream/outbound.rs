//! [`Outbound`]: a request on its way to Tallyfy, lent down the send path.

use std::sync::Arc;

use http::request::Parts;
use http::{Request, Version};

use super::{RequestBody, SentBody};
use crate::body::{Progress, Tracked};

/// A request to send to Tallyfy, and the progress of its body.
///
/// It is lent (`&mut`) down the send path and taken only where it is written
/// to a connection. An async fn keeps its arguments for as long as it runs, so
/// a request (about half a KiB) moved down through each level would be held
/// once per level in every request's future, and copied with it.
pub struct Outbound {
    /// Empty once written (or, after a failure, gone with its connection).
    pub(super) request: Option<Request<SentBody>>,
    pub(super) progress: Arc<Progress>,
    pub(super) tenant: Tenant,
}

/// Whose requests an HTTP/1.1 connection to Tallyfy carries: the credential
/// (its index in the config generation, whose pool is its own) they are sent
/// with. A connection carries one tenant's requests only, so bytes Tallyfy
/// sends past an answer's end (a framing fault on its side, found too late to
/// drop the connection) can reach no other credential's caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant(pub usize);

impl Outbound {
    /// `head` and `body` as Tallyfy gets them: as HTTP/1.1 (HTTP/2 to Tallyfy
    /// is ALPN's choice, not inherited from the caller), the body reporting to
    /// a new [`Progress`], sent for `tenant`.
    pub fn new(mut head: Parts, body: RequestBody, tenant: Tenant) -> Outbound {
        head.version = Version::HTTP_11;
        let progress = Progress::new();
        let body = Tracked::new(body, progress.clone());
        Outbound { request: Some(Request::from_parts(head, body)), progress, tenant }
    }

    /// How far its body has been read, and when it last moved.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }
}
