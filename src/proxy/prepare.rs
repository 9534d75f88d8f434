//! [`Proxy::prepare`]: every decision about a request that needs no I/O, from
//! the framing check to the rewritten head. The hot path the benches measure.

use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{Method, Uri};

use super::response_body::LinksTo;
use super::{Proxy, TOKEN_RETRY_AFTER};

use crate::error::ProxyError;
use crate::headers;
use crate::identity::{Caller, Identity};
use crate::method_override;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::server::ConnectionInfo;
use crate::tokens::{CredentialId, Lease, Unavailable};
use crate::traffic::{Admitted, FleetSpend, Refused, clock};
use crate::{framing, target};

/// A request whose head has been rewritten for Tallyfy.
pub struct Prepared<'p> {
    pub identity: &'p Identity,
    /// The identity's place in the generation's identities.
    pub index: usize,
    /// The token the head now carries; `None` while the credential's first
    /// token is still being fetched (a credential new or changed by a reload):
    /// the request waits for it ([`Proxy::first_token`]).
    pub lease: Option<Lease>,
    /// Where this caller's links should point.
    pub(super) links_to: LinksTo,
    /// What the local limits decided: the place held, the rule counted, any
    /// wait for a remembered Tallyfy 429.
    pub admitted: Admitted,
    /// Fleet mode: the budgets to spend fleet-wide before sending (empty
    /// otherwise, and for requests no limit counts).
    /// Boxed: rare, and every request's future holds this whole.
    pub fleet_budgets: Option<Box<FleetSpend>>,
}

impl Proxy {
    /// Every decision about a request that needs no I/O: checks the target and
    /// limits, identifies the caller, applies its policy, takes its token (one
    /// atomic load) and rewrites the head into the upstream request's. The hot
    /// path measured by the benches.
    pub fn prepare(&self, head: &mut Parts, connection: &ConnectionInfo) -> Result<Prepared<'_>, ProxyError> {
        let shared = &*self.shared;
        // Framing first: a request whose length is ambiguous is refused (and its
        // connection closed) whatever else is wrong with it.
        framing::check(head)?;
        // An app configured with Tallyfy's unprefixed host sends `/me`: it is
        // `/api/me` from here on, through every check.
        let unprefixed = shared.unprefixed && target::add_api_prefix(&mut head.uri)?;
        target::check(&head.method, head.version, &head.uri, shared.upstream.authority())?;
        let host = target::host(head.version, &head.uri, &head.headers)?;
        let links_to = self.links_to(head, host, connection.local, unprefixed);
        headers::check_fields(&head.headers, shared.limits.max_headers, shared.limits.max_header_bytes)?;
        if declared_length(&head.headers).is_some_and(|n| n > shared.limits.max_request_body_bytes) {
            return Err(ProxyError::BodyTooLarge { limit: shared.limits.max_request_body_bytes });
        }
        let caller =
            Caller { headers: &head.headers, peer: connection.peer, cert_names: &connection.cert_names };
        let index = shared.identities.identify_index(&caller).ok_or(ProxyError::UnknownCaller)?;
        let identity = shared.identities.get(index);
        if !identity.policy.is_unrestricted() {
            if let Some(aliased) = head.uri.path_and_query().and_then(|pq| identity.policy.resolve_alias(pq))
            {
                let mut parts = head.uri.clone().into_parts();
                parts.path_and_query = Some(aliased);
                head.uri =
                    Uri::from_parts(parts).map_err(|e| ProxyError::Internal(format!("aliased URI: {e}")))?;
            }
            identity
                .policy
                .authorize(&head.method, head.uri.path())
                .map_err(|denied| ProxyError::Forbidden(denied.reason()))?;
            if identity.policy.restricts_methods() && head.method == Method::POST {
                let query = head.uri.query().unwrap_or_default().as_bytes();
                judge_overrides(&identity.policy, method_override::in_query(query))?;
            }
        }
        // One clock read for the token's freshness and the limits.
        let now = tokio::time::Instant::now();
        let lease = match shared.tokens.lease(identity.credential, now) {
            Ok(lease) => Some(lease),
            Err(Unavailable::FirstPending) => None,
            Err(_) => return Err(self.token_unavailable(identity.credential)),
        };
        // Made before the limits count the request: nothing after them refuses it.
        let upstream_uri = shared.upstream.uri_for(&head.uri)?;
        let admitted = self.admit(index, identity, &head.method, head.uri.path(), clock::nanos(now))?;
        let fleet_budgets = match shared.traffic.fleet() {
            None => None,
            Some(_) => Some(Box::new(shared.traffic.fleet_budgets(
                index,
                identity.credential.index(),
                &head.method,
                head.uri.path(),
                clock::nanos(now),
            )))
            .filter(|spend| !spend.budgets.is_empty()),
        };
        head.uri = upstream_uri;
        let authorization = lease.as_ref().map(|lease| lease.authorization.clone());
        headers::to_upstream(&mut head.headers, authorization, shared.upstream.client_header());
        Ok(Prepared { identity, index, lease, links_to, admitted, fleet_budgets })
    }

    /// The refusal of a request whose credential holds no valid token.
    pub(super) fn token_unavailable(&self, credential: CredentialId) -> ProxyError {
        ProxyError::TokenUnavailable {
            credential: self.shared.tokens.name(credential).to_string(),
            retry_after: TOKEN_RETRY_AFTER,
        }
    }

    /// The local limits' verdict ([`crate::traffic`]), counted in the metrics
    /// when it is a refusal.
    fn admit(
        &self,
        index: usize,
        identity: &Identity,
        method: &Method,
        path: &str,
        now: clock::Nanos,
    ) -> Result<Admitted, ProxyError> {
        let shared = &*self.shared;
        shared.traffic.admit(index, identity.credential.index(), method, path, now).map_err(|refused| {
            match refused {
                Refused::RateLimited { limit, retry_after, remembered } => {
                    let metrics = &shared.metrics;
                    if remembered {
                        Metrics::credential(
                            &metrics.remembered_429_answers,
                            &shared.tokens.name(identity.credential),
                        );
                    } else {
                        metrics.limit_rejected(&limit);
                    }
                    ProxyError::RateLimited { limit, retry_after }
                }
                Refused::InFlight { max } => {
                    shared.metrics.limit_rejected(&format!("{}.max_in_flight", identity.name));
                    ProxyError::TooManyInFlight { max }
                }
            }
        })
    }
}

impl Proxy {
    /// Fleet mode: spends the request's budgets fleet-wide (one Redis round
    /// trip). When Redis cannot answer, this replica's own counts (already
    /// passed) stand. A refusal is a refusal before sending: `forward`'s
    /// [`crate::traffic::Unsent`] gives this replica's counts back.
    pub(super) async fn spend_fleet_wide(&self, spend: &FleetSpend) -> Result<(), ProxyError> {
        let shared = &*self.shared;
        let Some(fleet) = shared.traffic.fleet() else { return Ok(()) };
        let budgets = &spend.budgets;
        match fleet.spend(budgets.iter().map(|(_, spend)| spend)).await {
            Ok(None) => Ok(()),
            // The refused budget's index comes from Redis: one out of range is
            // an answer this replica cannot use, like no answer.
            Ok(Some((refused, retry_after))) if refused < budgets.len() => {
                let limit = budgets[refused].0.clone();
                shared.metrics.limit_rejected(&limit);
                Err(ProxyError::RateLimited { limit, retry_after })
            }
            Ok(Some(_)) | Err(_) => {
                Metrics::reason(&shared.metrics.fleet_fallbacks, "budget_unreachable");
                Ok(())
            }
        }
    }
}

/// Judges the methods `_method` overrides name against the identity's policy.
pub(super) fn judge_overrides(
    policy: &Policy,
    found: Result<Vec<Method>, method_override::Unreadable>,
) -> Result<(), ProxyError> {
    let methods = found.map_err(|unreadable| ProxyError::OverrideUnreadable(unreadable.0))?;
    for method in &methods {
        policy.authorize_method(method).map_err(|_| {
            ProxyError::Forbidden("this identity may not use the method its _method override names")
        })?;
    }
    Ok(())
}

pub(super) fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
