//! A generation's traffic control, with time passed in.

use super::*;
use crate::policy::PathPattern;

const SECOND: u64 = 1_000_000_000;
const ORG: &str = "3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5";
const OTHER: &str = "00000000000000000000000000000000";

fn guests(max: u32) -> RuleSettings {
    RuleSettings {
        name: "guest-invites".into(),
        methods: Some(vec![Method::POST]),
        path: PathPattern::parse("/api/organizations/{org}/guests").expect("pattern"),
        max,
        per: Duration::from_secs(3600),
    }
}

fn settings(rules: Vec<RuleSettings>) -> Settings {
    Settings { rules, ..Settings::default() }
}

fn limited(rate: Option<Rate>, max_in_flight: Option<usize>) -> IdentityLimits {
    IdentityLimits { rate, max_in_flight }
}

fn guests_path(org: &str) -> String {
    format!("/api/organizations/{org}/guests")
}

#[test]
fn an_identity_without_limits_passes_with_nothing_held() {
    let state = TrafficState::new();
    let traffic = state.generation(
        &Settings::default(),
        &[("app", IdentityLimits::default())],
        &[("ops", Some("ops"))],
    );
    let admitted = traffic.admit(0, 0, &Method::GET, "/api/me", SECOND).expect("admitted");
    assert!(admitted.place.is_none() && admitted.rule.is_none() && admitted.delay.is_zero());
}

#[test]
fn a_burst_over_the_rate_is_refused_with_the_wait_and_the_limit_named() {
    let state = TrafficState::new();
    let rate = Rate { per_second: 2, burst: 3 };
    let traffic = state.generation(
        &Settings::default(),
        &[("billing", limited(Some(rate), None))],
        &[("ops", Some("ops"))],
    );
    let results: Vec<_> = (0..5).map(|_| traffic.admit(0, 0, &Method::GET, "/api/me", SECOND)).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    let Err(Refused::RateLimited { limit, retry_after, remembered }) = &results[3] else {
        panic!("refused: {:?}", results[3]);
    };
    assert_eq!(
        (&**limit, *retry_after, *remembered),
        ("billing.rate_limit", Duration::from_millis(500), false)
    );
}

#[test]
fn open_requests_are_capped_until_their_places_are_given_back() {
    let state = TrafficState::new();
    let traffic = state.generation(
        &Settings::default(),
        &[("billing", limited(None, Some(2)))],
        &[("ops", Some("ops"))],
    );
    let a = traffic.admit(0, 0, &Method::GET, "/api/me", 0).expect("first");
    let _b = traffic.admit(0, 0, &Method::GET, "/api/me", 0).expect("second");
    assert_eq!(traffic.admit(0, 0, &Method::GET, "/api/me", 0).err(), Some(Refused::InFlight { max: 2 }));
    drop(a);
    assert!(traffic.admit(0, 0, &Method::GET, "/api/me", 0).is_ok());
}

/// A reload that changes `max_in_flight` keeps the identity's count: the
/// requests open under the old maximum hold their places against the new one,
/// where a fresh count let old and new together run past it.
#[test]
fn a_changed_max_in_flight_counts_the_requests_already_open() {
    let state = TrafficState::new();
    let first = state.generation(
        &Settings::default(),
        &[("billing", limited(None, Some(4)))],
        &[("ops", Some("ops"))],
    );
    let held: Vec<_> =
        (0..3).map(|_| first.admit(0, 0, &Method::GET, "/api/me", SECOND).expect("open")).collect();
    let lowered = state.generation(
        &Settings::default(),
        &[("billing", limited(None, Some(2)))],
        &[("ops", Some("ops"))],
    );
    assert!(lowered.admit(0, 0, &Method::GET, "/api/me", SECOND).is_err(), "three open fill two");
    drop(held);
    assert!(lowered.admit(0, 0, &Method::GET, "/api/me", SECOND).is_ok());
}

/// A reload that lifts `max_in_flight`, then one that sets it again, count
/// the requests still open from before: the count was dropped with the limit,
/// and the limit set again let `max` more in beside them.
#[test]
fn a_max_in_flight_lifted_then_set_again_counts_the_requests_still_open() {
    let state = TrafficState::new();
    let generation = |max| {
        state.generation(&Settings::default(), &[("billing", limited(None, max))], &[("ops", Some("ops"))])
    };
    let first = generation(Some(2));
    let held: Vec<_> =
        (0..2).map(|_| first.admit(0, 0, &Method::GET, "/api/me", SECOND).expect("open")).collect();
    let lifted = generation(None);
    assert!(lifted.admit(0, 0, &Method::GET, "/api/me", SECOND).is_ok(), "no limit");
    let again = generation(Some(2));
    assert!(again.admit(0, 0, &Method::GET, "/api/me", SECOND).is_err(), "the two still open fill it");
    drop(held);
    assert!(again.admit(0, 0, &Method::GET, "/api/me", SECOND).is_ok());
    let _ = generation(None);
    assert!(lock(&state.in_flight).is_empty(), "a count no request holds is not kept");
}

#[test]
fn an_hourly_cap_counts_per_org_and_credential_and_reopens_with_the_window() {
    let state = TrafficState::new();
    let identities = [("a", IdentityLimits::default()), ("b", IdentityLimits::default())];
    let traffic = state.generation(
        &settings(vec![guests(2)]),
        &identities,
        &[("app", Some("app")), ("user", Some("user"))],
    );
    let post = |identity, credential, org: &str, at| {
        traffic.admit(identity, credential, &Method::POST, &guests_path(org), at)
    };
    assert!(post(0, 0, ORG, 0).is_ok() && post(0, 0, ORG, SECOND).is_ok());
    let Err(Refused::RateLimited { limit, retry_after, .. }) = post(0, 0, ORG, 10 * SECOND) else {
        panic!("the third in the hour is refused");
    };
    assert_eq!((&*limit, retry_after), ("guest-invites", Duration::from_secs(3590)));
    assert!(
        post(1, 0, ORG, 10 * SECOND).is_err(),
        "another identity on the same credential shares the count"
    );
    assert!(post(1, 1, ORG, 10 * SECOND).is_ok(), "another credential counts apart");
    assert!(post(0, 0, OTHER, 10 * SECOND).is_ok(), "another org counts apart");
    assert!(traffic.admit(0, 0, &Method::GET, &guests_path(ORG), 10 * SECOND).is_ok(), "GET is not counted");
    assert!(post(0, 0, ORG, 3600 * SECOND).is_ok(), "the window closed");
    let encoded = format!("/api/organizations/{ORG}/%67uests");
    assert!(traffic.admit(0, 0, &Method::POST, &encoded, 3601 * SECOND).is_ok());
    assert!(
        traffic.admit(0, 0, &Method::POST, &encoded, 3602 * SECOND).is_err(),
        "an encoded path is counted as Tallyfy reads it"
    );
}

#[test]
fn a_reload_keeps_unchanged_limits_counting_and_starts_changed_ones_afresh() {
    let state = TrafficState::new();
    let rate = Rate { per_second: 1, burst: 1 };
    let identities = [("billing", limited(Some(rate), None))];
    let first = state.generation(&settings(vec![guests(1)]), &identities, &[("app", Some("app"))]);
    assert!(first.admit(0, 0, &Method::POST, &guests_path(ORG), 0).is_ok());

    let same = state.generation(&settings(vec![guests(1)]), &identities, &[("app", Some("app"))]);
    assert!(same.admit(0, 0, &Method::POST, &guests_path(ORG), 5 * SECOND).is_err(), "the window survived");
    assert!(same.admit(0, 0, &Method::GET, "/api/me", 5 * SECOND).is_ok());
    assert!(same.admit(0, 0, &Method::GET, "/api/me", 5 * SECOND).is_err(), "and the bucket");

    let changed = state.generation(&settings(vec![guests(5)]), &identities, &[("app", Some("app"))]);
    assert!(
        changed.admit(0, 0, &Method::POST, &guests_path(ORG), 6 * SECOND).is_ok(),
        "a changed rule starts afresh"
    );
}

#[test]
fn a_remembered_429_answers_locally_until_retry_after_and_a_short_one_is_waited_out() {
    let state = TrafficState::new();
    let mut with_wait = settings(vec![guests(30)]);
    with_wait.retry_429_max_wait = Duration::from_secs(2);
    let traffic = state.generation(&with_wait, &[("a", IdentityLimits::default())], &[("app", Some("app"))]);

    // A burst throttle: the whole credential waits.
    let burst = Said { retry_after: Some(Duration::from_secs(10)), hourly: false };
    traffic.remember_429(0, &Method::GET, "/api/me", None, burst, 0);
    let Err(Refused::RateLimited { limit, retry_after, remembered }) =
        traffic.admit(0, 0, &Method::GET, "/api/other", SECOND)
    else {
        panic!("answered locally");
    };
    assert_eq!((&*limit, retry_after, remembered), (TALLYFY_LIMIT, Duration::from_secs(9), true));
    let admitted = traffic.admit(0, 0, &Method::GET, "/api/other", 9 * SECOND).expect("short enough to wait");
    assert_eq!(admitted.delay, Duration::from_secs(1));
    assert!(traffic.admit(0, 0, &Method::GET, "/api/other", 10 * SECOND).expect("lifted").delay.is_zero());

    // An hourly cap: only that org and rule wait.
    let rule = traffic.admit(0, 0, &Method::POST, &guests_path(ORG), 11 * SECOND).expect("counted").rule;
    let cap = Said { retry_after: Some(Duration::from_secs(600)), hourly: true };
    traffic.remember_429(0, &Method::POST, &guests_path(ORG), rule, cap, 11 * SECOND);
    assert!(traffic.admit(0, 0, &Method::POST, &guests_path(ORG), 12 * SECOND).is_err());
    assert!(traffic.admit(0, 0, &Method::POST, &guests_path(OTHER), 12 * SECOND).is_ok());
    assert!(traffic.admit(0, 0, &Method::GET, "/api/me", 12 * SECOND).is_ok());
}
