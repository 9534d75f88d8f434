//! A kept copy of a request, so it can be sent again: with a fresh token after
//! Tallyfy rejected one, after a retryable failure, or after a short 429.

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Uri, Version};
use http_body_util::{Either, Full};

use crate::upstream::RequestBody;

pub(super) struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

impl Replay {
    /// A copy of the upstream request `head` with its whole `body`.
    pub(super) fn of(head: &Parts, body: Bytes) -> Replay {
        Replay {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
            body,
        }
    }

    /// The request once more, with `authorization` in place of the token it
    /// was first sent with, if given.
    pub(super) fn request(&self, authorization: Option<HeaderValue>) -> Request<RequestBody> {
        let mut request = Request::new(Either::Left(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        if let Some(authorization) = authorization {
            request.headers_mut().insert(AUTHORIZATION, authorization);
        }
        request
    }
}
