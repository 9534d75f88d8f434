//! A kept copy of a request, so it can be sent again: with a fresh token after
//! Tallyfy rejected one, after a retryable failure, or after a short 429.

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{Either, Full};

use crate::upstream::{Outbound, Tenant};

pub(super) struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    tenant: Tenant,
}

impl Replay {
    /// A copy of the upstream request `head` with its whole `body`, sent for `tenant`.
    pub(super) fn of(head: &Parts, body: Bytes, tenant: Tenant) -> Replay {
        let (method, uri, headers) = (head.method.clone(), head.uri.clone(), head.headers.clone());
        Replay { method, uri, headers, body, tenant }
    }

    /// The request once more, with `authorization` in place of the token it
    /// was first sent with, if given.
    pub(super) fn outbound(&self, authorization: Option<HeaderValue>) -> Outbound {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.headers = self.headers.clone();
        if let Some(authorization) = authorization {
            head.headers.insert(AUTHORIZATION, authorization);
        }
        Outbound::new(head, Either::Left(Full::new(self.body.clone())), self.tenant)
    }
}
