//! Traffic control that knows Tallyfy's limits: local limits answered by the
//! proxy (nothing sent), Tallyfy's own 429s remembered, and safe retries.
//!
//! - [`bucket`]: `rate_limit = { per_second, burst }` per identity (GCRA, one
//!   atomic); [`in_flight`]: `max_in_flight` per identity;
//! - [`window`] and [`rules`]: `[[limits]]`, at most `max` requests per `per`
//!   per organisation and credential (Tallyfy's hourly caps, kept locally);
//! - [`throttle`]: what Tallyfy's 429s said, per credential, until their
//!   `Retry-After`;
//! - [`retry`]: `[upstream.retry]` and its budget;
//! - [`key`]: keys made of what callers write in their paths, bounded in size.
//!
//! The state (buckets, windows, throttles, budget) lives in one process-wide
//! [`TrafficState`]. Each config generation gets a [`Traffic`]: its rules and,
//! per identity and credential, the state it counts in, found by settings, so
//! a reload that leaves a limit unchanged keeps its counts (an hourly window
//! is not reset) and a changed one starts afresh; an identity's open requests
//! are counted by its name alone (a changed `max_in_flight` counts the
//! requests already open). Requests read a generation's
//! `Traffic` through the generation's snapshot and count in atomics: no lock on
//! the hot path (the windows of a matching `[[limits]]` rule take a short one).

pub mod bucket;
pub mod clock;
pub mod in_flight;
pub mod key;
pub mod retry;
pub mod rules;
pub mod throttle;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use smallvec::SmallVec;

use bucket::Bucket;
pub use bucket::Rate;
use clock::Nanos;
use in_flight::{InFlight, Place};
pub use retry::{Budget, Failure, RetrySettings};
pub use rules::RuleSettings;
use rules::{Rule, Rules};
pub use throttle::Said;
use throttle::Throttle;
use window::Windows;

use crate::fleet::{Fleet, Spend, Throttled};
use crate::target;

/// An identity's own limits (`rate_limit`, `max_in_flight`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IdentityLimits {
    pub rate: Option<Rate>,
    pub max_in_flight: Option<usize>,
}

/// What a generation's config says about traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `[[limits]]`, in file order.
    pub rules: Vec<RuleSettings>,
    /// `[upstream.retry]`.
    pub retry: RetrySettings,
    /// `upstream.retry_429_max_wait_ms`: a Tallyfy 429 whose `Retry-After` is
    /// at most this is waited out instead of passed on (0: never).
    pub retry_429_max_wait: Duration,
}

/// Why the proxy answers a request itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Over a local limit, or inside a remembered Tallyfy 429 (`limit` names
    /// which: `tallyfy` for Tallyfy's own).
    RateLimited { limit: Arc<str>, retry_after: Duration, remembered: bool },
    /// The identity's `max_in_flight` requests are open.
    InFlight { max: usize },
}

/// A request let through: its place among the identity's open requests (held
/// until the response ends), the rule it was counted under, and how long to
/// hold it back first (a remembered Tallyfy 429 short enough to wait out).
#[derive(Debug, Default)]
pub struct Admitted {
    pub place: Option<Place>,
    pub rule: Option<usize>,
    pub delay: Duration,
    /// When it was counted.
    pub at: Nanos,
}

/// What a request let through counted locally: given back when the request is
/// refused, or dropped with its caller, before it is sent ([`Unsent`],
/// [`Traffic::give_back`]), so the limits count only requests that went to
/// Tallyfy.
#[derive(Debug, Default)]
pub struct Counts {
    identity: usize,
    credential: usize,
    /// When the counts were taken.
    at: Nanos,
    /// Whether the identity's bucket was taken.
    bucket: bool,
    /// The windows counted: by rule, the organisation's key (lower case).
    windows: SmallVec<[(usize, String); 2]>,
}

/// A request the limits let through that has not been sent: when this drops
/// before [`Unsent::sent`] (the request refused on its way, or dropped with its
/// caller), what it counted is given back ([`Traffic::give_back`]).
pub struct Unsent<'t> {
    traffic: &'t Traffic,
    request: Option<CountedRequest<'t>>,
}

/// A request [`Traffic::admit`] let through, as the limits counted it.
pub struct CountedRequest<'t> {
    pub identity: usize,
    pub credential: usize,
    pub method: &'t Method,
    /// The path it was admitted on.
    pub path: &'t str,
    /// When it was counted ([`Admitted::at`]).
    pub at: Nanos,
    /// Fleet mode: what it spends fleet-wide (and counted here).
    pub fleet: Option<&'t FleetSpend>,
}

impl Unsent<'_> {
    /// The request is being sent: its counts stand, whatever comes of it.
    pub fn sent(mut self) {
        self.request = None;
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        let Some(request) = self.request.take() else { return };
        match request.fleet {
            Some(spend) => self.traffic.give_back(&spend.counts),
            None => {
                let CountedRequest { identity, credential, method, path, at, .. } = request;
                self.traffic.give_back(&self.traffic.counted(identity, credential, method, path, at));
            }
        }
    }
}

/// Fleet mode: what a request spends fleet-wide (its budgets, by limit name),
/// and what it counted locally.
#[derive(Debug, Default)]
pub struct FleetSpend {
    pub budgets: Vec<(Arc<str>, Spend)>,
    pub counts: Counts,
}

/// The name under which Tallyfy's own limits are reported.
pub const TALLYFY_LIMIT: &str = "tallyfy";

/// One identity's gate.
#[derive(Debug)]
struct Gate {
    bucket: Option<(Arc<Bucket>, Arc<str>, Rate)>,
    in_flight: Option<Arc<InFlight>>,
}

/// A generation's traffic control.
#[derive(Debug)]
pub struct Traffic {
    /// By identity index.
    gates: Box<[Gate]>,
    /// By credential index, with the credential's name (windows count by it).
    throttles: Box<[(Arc<Throttle>, Arc<str>)]>,
    /// By credential index: the principal its tokens act as (told with a 429,
    /// so a replica where the name is another user's does not take it);
    /// `None` for one whose principal tells no user apart (a personal token:
    /// the token is the user), whose 429s are neither told nor learned.
    principals: Box<[Option<Arc<str>>]>,
    rules: Rules,
    pub settings: Settings,
    budget: Arc<Budget>,
    /// Fleet mode: where budgets are spent fleet-wide and 429s are told.
    fleet: Option<Arc<Fleet>>,
}

impl Traffic {
    /// Judges a request of `identity` (spending `credential`'s token) before it
    /// is sent. `path` is the upstream path (`/api/...`).
    pub fn admit(
        &self,
        identity: usize,
        credential: usize,
        method: &Method,
        path: &str,
        now: Nanos,
    ) -> Result<Admitted, Refused> {
        let mut admitted = Admitted { at: now, ..Admitted::default() };
        let (throttle, credential_name) = &self.throttles[credential];
        // Segments are decoded only when a rule or a remembered cap needs them.
        let mut segments: Option<SmallVec<[std::borrow::Cow<'_, str>; 12]>> = None;
        let mut decoded = || -> SmallVec<[std::borrow::Cow<'_, str>; 12]> {
            target::segments(path).filter_map(Result::ok).collect()
        };
        let mut matching = self.rules.candidates(path);
        if !matching.is_empty() {
            let segs = segments.insert(decoded());
            matching.retain(|i| self.rules.get(*i).applies(method, segs));
        }
        admitted.rule = matching.first().copied();
        if let Some(wait) = throttle.wait(now, || {
            let segs = segments.get_or_insert_with(&mut decoded);
            self.limit_key(method, segs, admitted.rule)
        }) {
            if wait > self.settings.retry_429_max_wait {
                return Err(Refused::RateLimited {
                    limit: TALLYFY_LIMIT.into(),
                    retry_after: wait,
                    remembered: true,
                });
            }
            admitted.delay = wait;
        }
        // What can be undone first (a place is given back when dropped), what
        // only looks next, and what spends last, so a refused request spends
        // nothing of the limits it passed.
        let gate = &self.gates[identity];
        if let Some(in_flight) = &gate.in_flight {
            admitted.place = Some(in_flight.enter().ok_or(Refused::InFlight { max: in_flight.max() })?);
        }
        let refused = |rule: &Rule, wait| Refused::RateLimited {
            limit: rule.name.clone(),
            retry_after: wait,
            remembered: false,
        };
        // Fleet mode with Redis answering: the fleet's windows decide (spent
        // just before sending). This replica's own, opened at its own first
        // request and not the fleet's, count on without refusing (a replica
        // refused after the fleet's window had closed with its budget
        // unspent), and decide only while Redis cannot answer.
        let fleet_decides =
            !matching.is_empty() && self.fleet.as_ref().is_some_and(|fleet| fleet.is_connected());
        let segs = segments.as_deref().unwrap_or_default();
        let matching = || {
            matching.iter().map(|&i| {
                let rule = self.rules.get(i);
                (rule, rule.org(segs))
            })
        };
        for (rule, org) in matching().filter(|_| !fleet_decides) {
            let settings = &rule.settings;
            rule.windows
                .peek(&org, credential_name, now, settings.max, settings.per)
                .map_err(|w| refused(rule, w))?;
        }
        if let Some((bucket, name, _)) = &gate.bucket {
            bucket.take(now).map_err(|wait| Refused::RateLimited {
                limit: name.clone(),
                retry_after: wait,
                remembered: false,
            })?;
        }
        for (rule, org) in matching() {
            let settings = &rule.settings;
            let max = if fleet_decides { None } else { Some(settings.max) };
            rule.windows
                .count(&org, credential_name, now, max, settings.per)
                .map_err(|w| refused(rule, w))?;
        }
        Ok(admitted)
    }

    /// What [`Traffic::admit`] counted of a request it let through at `at`:
    /// the identity's bucket, and the window of each `[[limits]]` rule that
    /// matches, under its organisation. Worked out again from the request
    /// (only for a refusal or a fleet spend), not kept on the hot path.
    pub fn counted(
        &self,
        identity: usize,
        credential: usize,
        method: &Method,
        path: &str,
        at: Nanos,
    ) -> Counts {
        let bucket = self.gates[identity].bucket.is_some();
        let mut counts = Counts { identity, credential, at, bucket, windows: SmallVec::new() };
        let mut matching = self.rules.candidates(path);
        if matching.is_empty() {
            return counts;
        }
        let segments: SmallVec<[std::borrow::Cow<'_, str>; 12]> =
            target::segments(path).filter_map(Result::ok).collect();
        matching.retain(|i| self.rules.get(*i).applies(method, &segments));
        for i in matching {
            counts.windows.push((i, self.rules.get(i).org(&segments).to_ascii_lowercase()));
        }
        counts
    }

    /// Fleet mode: the budgets (by limit name) a request [`Traffic::admit`]
    /// let through at `at` spends fleet-wide before it is sent, in one Redis
    /// round trip, with what it counted locally. Empty outside fleet mode,
    /// and for requests no limit counts.
    pub fn fleet_budgets(
        &self,
        identity: usize,
        credential: usize,
        method: &Method,
        path: &str,
        at: Nanos,
    ) -> FleetSpend {
        let counts = self.counted(identity, credential, method, path, at);
        let mut budgets = Vec::new();
        if self.fleet.is_none() {
            return FleetSpend { budgets, counts };
        }
        if let Some((_, name, rate)) = &self.gates[identity].bucket {
            let key = format!("rate/{name}/{}-{}", rate.per_second, rate.burst);
            budgets.push((name.clone(), Spend::Rate { key, per_second: rate.per_second, burst: rate.burst }));
        }
        let credential_name = &self.throttles[credential].1;
        for (i, org) in &counts.windows {
            let rule = self.rules.get(*i);
            let RuleSettings { max, per, .. } = rule.settings;
            let key = format!("limit/{}/{max}-{}/{org}/{credential_name}", rule.name, per.as_millis());
            budgets.push((rule.name.clone(), Spend::Window { key, max, per }));
        }
        FleetSpend { budgets, counts }
    }

    /// A request [`Traffic::admit`] let through, not sent yet: what it counted
    /// is given back unless [`Unsent::sent`] says it went.
    pub fn unsent<'t>(&'t self, request: CountedRequest<'t>) -> Unsent<'t> {
        Unsent { traffic: self, request: Some(request) }
    }

    /// A request [`Traffic::admit`] let through was refused before it was
    /// sent (by the fleet's budgets, its body, its token), or its caller went
    /// away first: its local counts are given back, so the windows and buckets
    /// hold only requests that went to Tallyfy (a refused request spends
    /// nothing), and in fleet mode this replica does not refuse on after the
    /// fleet's window has closed.
    pub fn give_back(&self, counts: &Counts) {
        if counts.bucket
            && let Some((bucket, _, _)) = &self.gates[counts.identity].bucket
        {
            bucket.give_back();
        }
        let credential_name = &self.throttles[counts.credential].1;
        for (rule, org) in &counts.windows {
            self.rules.get(*rule).windows.give_back(org, credential_name, counts.at);
        }
    }

    /// Tallyfy answered 429 to a request of `credential` for `path`: remember it
    /// (see [`throttle`]). Returns what was remembered, as the other replicas
    /// of a fleet are told it (`None`: not told, see [`Traffic::principals`]).
    pub fn remember_429(
        &self,
        credential: usize,
        method: &Method,
        path: &str,
        rule: Option<usize>,
        said: Said,
        now: Nanos,
    ) -> Option<Throttled> {
        let segments: SmallVec<[std::borrow::Cow<'_, str>; 12]> =
            target::segments(path).filter_map(Result::ok).collect();
        let (org, limit) = self.limit_key(method, &segments, rule);
        let (throttle, name) = &self.throttles[credential];
        let wait = throttle.remember(said.retry_after, said.hourly, &org, &limit, now);
        let principal = Some(self.principals[credential].as_deref()?.to_owned());
        Some(Throttled { credential: name.to_string(), principal, wait, hourly: said.hourly, org, limit })
    }

    /// The organisation and limit a remembered hourly cap is kept under: the
    /// `[[limits]]` rule the request matched, else its method and path as
    /// Tallyfy reads it ([`key::unmatched_limit`]).
    fn limit_key<S: AsRef<str>>(
        &self,
        method: &Method,
        segments: &[S],
        rule: Option<usize>,
    ) -> (String, String) {
        match rule.map(|i| self.rules.get(i)) {
            Some(rule) => (rule.org(segments).into_owned(), rule.name.to_string()),
            None => (
                key::bounded(org_of(segments), key::LONGEST_ORG).into_owned(),
                key::unmatched_limit(method, segments),
            ),
        }
    }

    /// Fleet mode: the fleet this generation counts in.
    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    /// Tallyfy answered a request of `credential` with something other than 429.
    pub fn answered(&self, credential: usize) {
        self.throttles[credential].0.answered();
    }

    /// Whether a request of `method` may be sent again ([`RetrySettings::covers`],
    /// or any request once 429s are waited out), so its body is worth keeping.
    pub fn may_resend(&self, method: &Method) -> bool {
        // A refused connection is the failure every covered method may retry.
        self.settings.retry.covers(method, retry::Failure::Connect)
            || !self.settings.retry_429_max_wait.is_zero()
    }

    /// Counts a first send for the retry budget.
    pub fn sent(&self, now: Nanos) {
        self.budget.request(now);
    }

    /// Takes a retry from the budget; `false` when it is spent.
    pub fn may_retry(&self, now: Nanos) -> bool {
        self.budget.try_retry(now, self.settings.retry.budget_percent)
    }

    /// The rules, for `check` and the metrics.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| &*rule.name)
    }
}

/// The organisation an org-scoped path names, or `""`.
fn org_of<S: AsRef<str>>(segments: &[S]) -> &str {
    match segments {
        [_, family, org, ..]
            if ["organizations", "applications"].iter().any(|f| f.eq_ignore_ascii_case(family.as_ref())) =>
        {
            org.as_ref()
        }
        _ => "",
    }
}

/// Key of an identity's bucket: its name and settings.
type IdentityKey<T> = (String, T);

/// A credential's remembered 429s, and the principal it acted as when they
/// were met (`None`: one that tells no user apart, a personal token).
type KeptThrottle = (Option<String>, Arc<Throttle>);

/// The process-wide traffic state, across config generations. Only the
/// reloader (and start-up) builds generations, so its maps take a lock there
/// and nowhere else.
#[derive(Debug, Default)]
pub struct TrafficState {
    buckets: Mutex<HashMap<IdentityKey<Rate>, Arc<Bucket>>>,
    /// By identity name alone: a changed `max_in_flight` keeps the count.
    in_flight: Mutex<HashMap<String, Arc<InFlight>>>,
    windows: Mutex<HashMap<RuleSettings, Arc<Windows>>>,
    /// By credential name, with the principal it acted as.
    throttles: Mutex<HashMap<String, KeptThrottle>>,
    budget: Arc<Budget>,
    fleet: Option<Arc<Fleet>>,
}

impl TrafficState {
    pub fn new() -> Arc<TrafficState> {
        Arc::default()
    }

    /// In fleet mode: budgets also count in `fleet`, and Tallyfy's 429s are
    /// told to the other replicas.
    pub fn with_fleet(fleet: Option<Arc<Fleet>>) -> Arc<TrafficState> {
        Arc::new(TrafficState { fleet, ..TrafficState::default() })
    }

    /// Another replica met Tallyfy's 429: remember it as if this one had,
    /// when the credential of that name acts as the same principal here (a
    /// replica where the name is another user's, mid-rollout or sharing the
    /// prefix, was not throttled). Answers whether it was taken.
    pub fn learn(&self, throttled: &Throttled, now: Nanos) -> bool {
        let throttles = lock(&self.throttles);
        let Some((principal, throttle)) = throttles.get(&throttled.credential) else { return false };
        // One here that tells no user apart learns nothing; a replica of an
        // earlier version names no principal: taken by name, as it was.
        let Some(principal) = principal else { return false };
        if throttled.principal.as_ref().is_some_and(|told| told != principal) {
            return false;
        }
        throttle.remember(Some(throttled.wait), throttled.hourly, &throttled.org, &throttled.limit, now);
        true
    }

    /// The traffic control of a generation with these identities (name and
    /// limits, in order) and credentials (name and the principal its tokens
    /// act as, in order). State for settings the previous generation had is
    /// carried over; the rest is dropped.
    pub fn generation(
        &self,
        settings: &Settings,
        identities: &[(&str, IdentityLimits)],
        credentials: &[(&str, Option<&str>)],
    ) -> Traffic {
        let mut buckets = lock(&self.buckets);
        let mut in_flight = lock(&self.in_flight);
        let mut windows = lock(&self.windows);
        let mut throttles = lock(&self.throttles);
        let (mut kept_buckets, mut kept_in_flight) = (HashMap::new(), HashMap::new());
        let gates = identities
            .iter()
            .map(|&(name, limits)| Gate {
                bucket: limits.rate.map(|rate| {
                    let key = (name.to_owned(), rate);
                    let bucket = buckets.remove(&key).unwrap_or_else(|| Arc::new(Bucket::new(rate)));
                    kept_buckets.insert(key, bucket.clone());
                    (bucket, Arc::from(format!("{name}.rate_limit")), rate)
                }),
                in_flight: limits.max_in_flight.map(|max| {
                    let count = in_flight.remove(name).unwrap_or_else(|| Arc::new(InFlight::new(max)));
                    count.set_max(max);
                    kept_in_flight.insert(name.to_owned(), count.clone());
                    count
                }),
            })
            .collect();
        *buckets = kept_buckets;
        // A count this generation does not use is kept while requests hold
        // places in it: a later reload that sets the identity's limit again
        // counts them (a fresh count let `max` more in beside them).
        kept_in_flight.extend(in_flight.drain().filter(|(_, count)| count.open() > 0));
        *in_flight = kept_in_flight;
        let mut kept_windows = HashMap::new();
        let rules = settings
            .rules
            .iter()
            .map(|rule| {
                let counts = windows.remove(rule).unwrap_or_default();
                kept_windows.insert(rule.clone(), counts.clone());
                Rule::new(rule.clone(), counts)
            })
            .collect::<Vec<_>>();
        *windows = kept_windows;
        // Tallyfy's 429s are about whom the credential acts as: kept while it
        // is the same principal (a rotated secret), dropped when it is another
        // (Tallyfy's throttle is per user, and did not meet that one).
        let mut kept_throttles = HashMap::new();
        let throttles_now = credentials
            .iter()
            .map(|&(name, principal)| {
                let throttle = throttles
                    .remove(name)
                    .filter(|(was, _)| was.as_deref() == principal)
                    .map_or_else(Arc::default, |(_, throttle)| throttle);
                kept_throttles.insert(name.to_owned(), (principal.map(str::to_owned), throttle.clone()));
                (throttle, Arc::from(name))
            })
            .collect();
        *throttles = kept_throttles;
        Traffic {
            gates,
            throttles: throttles_now,
            principals: credentials.iter().map(|&(_, principal)| principal.map(Arc::from)).collect(),
            rules: Rules::new(rules),
            settings: settings.clone(),
            budget: self.budget.clone(),
            fleet: self.fleet.clone(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
