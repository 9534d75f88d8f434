//! The refresher on a paused clock, against an in-process [`TokenSource`]:
//! hours of token life, refreshes and backoffs in milliseconds of real time.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::secret::Secret;
use crate::tokens::issuer::Issued;
use crate::tokens::{
    Answer, Credential, CredentialId, CredentialTokens, OAuthClient, Provision, Settings, TokenSource,
};

const HOUR: Duration = Duration::from_secs(3600);

/// One call the refresher made, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    ClientCredentials,
    Password,
    /// With the refresh token presented.
    Refresh(String),
    Mint,
    Provision,
}

/// A token endpoint that answers from a script: scripted failures first, then
/// tokens `t1`, `t2`, ... (with refresh tokens `r1`, `r2`, ... for user grants).
struct Fake {
    lifetime: Duration,
    /// How long each answer takes.
    /// How long each answer takes from now on (read when a call begins).
    latency: Mutex<Duration>,
    failures: Mutex<VecDeque<FetchError>>,
    calls: Mutex<Vec<(Call, Instant)>>,
    /// Whether the minted user exists yet (a mint for a missing one is a 404).
    user_exists: Mutex<bool>,
    /// Whether every mint is refused with a 401 (the application lost the org).
    mint_refused: Mutex<bool>,
}

impl Fake {
    fn new(lifetime: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            lifetime,
            latency: Mutex::new(Duration::ZERO),
            failures: Mutex::default(),
            calls: Mutex::default(),
            user_exists: Mutex::new(true),
            mint_refused: Mutex::new(false),
        })
    }

    /// A fake whose every answer takes `latency`.
    fn answering_in(lifetime: Duration, latency: Duration) -> Arc<Fake> {
        let fake = Fake::new(lifetime);
        fake.answer_in(latency);
        fake
    }

    fn answer_in(&self, latency: Duration) {
        *self.latency.lock().expect("lock") = latency;
    }

    fn latency(&self) -> Duration {
        *self.latency.lock().expect("lock")
    }

    fn fail_next(&self, errors: impl IntoIterator<Item = FetchError>) {
        self.failures.lock().expect("lock").extend(errors);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("lock").iter().map(|(call, _)| call.clone()).collect()
    }

    /// Lets the clock run (in one-second steps) until `n` calls were made.
    async fn wait_for_calls(&self, n: usize) {
        while self.calls.lock().expect("lock").len() < n {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn call_times(&self) -> Vec<Instant> {
        self.calls.lock().expect("lock").iter().map(|(_, at)| *at).collect()
    }

    async fn answer(&self, call: Call, refresh_token: bool) -> Result<Issued, FetchError> {
        let n = {
            let mut calls = self.calls.lock().expect("lock");
            calls.push((call, Instant::now()));
            calls.len()
        };
        tokio::time::sleep(self.latency()).await;
        if let Some(error) = self.failures.lock().expect("lock").pop_front() {
            return Err(error);
        }
        Ok(Issued {
            access_token: Secret::new(format!("t{n}")),
            refresh_token: refresh_token.then(|| Secret::new(format!("r{n}"))),
            lifetime: self.lifetime,
        })
    }
}

/// The source the refresher holds: a shared handle on the fake.
struct Source(Arc<Fake>);

impl TokenSource for Source {
    fn client_credentials<'a>(&'a self, _: &'a OAuthClient, _: Option<&'a str>) -> Answer<'a, Issued> {
        Box::pin(self.0.answer(Call::ClientCredentials, false))
    }

    fn password<'a>(
        &'a self,
        _: &'a OAuthClient,
        _: &'a str,
        _: &'a Secret,
        _: Option<&'a str>,
    ) -> Answer<'a, Issued> {
        Box::pin(self.0.answer(Call::Password, true))
    }

    fn refresh<'a>(&'a self, _: &'a OAuthClient, refresh_token: &'a Secret) -> Answer<'a, Issued> {
        Box::pin(self.0.answer(Call::Refresh(refresh_token.expose().to_owned()), true))
    }

    fn mint_user_token<'a>(&'a self, _: &'a HeaderValue, _: &'a str, _: &'a str) -> Answer<'a, Issued> {
        Box::pin(async move {
            if *self.0.mint_refused.lock().expect("lock") {
                self.0.calls.lock().expect("lock").push((Call::Mint, Instant::now()));
                tokio::time::sleep(self.0.latency()).await;
                return Err(FetchError::Refused { status: 401, code: "http_401".into() });
            }
            if !*self.0.user_exists.lock().expect("lock") {
                self.0.calls.lock().expect("lock").push((Call::Mint, Instant::now()));
                return Err(FetchError::Refused { status: 404, code: "http_404".into() });
            }
            self.0.answer(Call::Mint, false).await
        })
    }

    fn provision_user<'a>(
        &'a self,
        _: &'a HeaderValue,
        _: &'a str,
        _: &'a str,
        _: &'a Provision,
    ) -> Answer<'a, ()> {
        Box::pin(async move {
            self.0.calls.lock().expect("lock").push((Call::Provision, Instant::now()));
            *self.0.user_exists.lock().expect("lock") = true;
            Ok(())
        })
    }
}

fn client() -> OAuthClient {
    OAuthClient { id: "client".into(), secret: Secret::new("secret") }
}

fn application() -> Credential {
    Credential {
        name: "app".into(),
        kind: CredentialKind::ClientCredentials { client: client(), scope: None },
    }
}

fn user() -> Credential {
    Credential {
        name: "user".into(),
        kind: CredentialKind::Password {
            client: client(),
            username: "jane".into(),
            password: Secret::new("pw"),
            scope: None,
        },
    }
}

/// A user token minted by credential 0 (an application) for jane.
fn minted(provision: Option<Provision>) -> Credential {
    Credential {
        name: "jane".into(),
        kind: CredentialKind::ApplicationUser {
            application: CredentialId::new(0),
            org: "org".into(),
            email: "jane@example.com".into(),
            provision,
        },
    }
}

fn settings() -> Settings {
    Settings {
        schedule: Schedule::default(),
        fetch_timeout: Duration::from_secs(10),
        default_lifetime: HOUR,
        dead_token_statuses: vec![http::StatusCode::UNAUTHORIZED],
        replay_max_body_bytes: 1024,
        min_forced_refresh_interval: Duration::from_secs(5),
    }
}

fn set(credentials: Vec<Credential>) -> CredentialSet {
    CredentialSet { credentials, settings: settings(), upstream: "fake".into() }
}

/// A running refresher over `credentials`, answered by `fake`.
struct Running {
    tokens: CredentialTokens,
    handle: RefreshHandle,
    stop: CancellationToken,
}

impl Running {
    async fn start(fake: &Arc<Fake>, credentials: Vec<Credential>) -> Running {
        let (mut refresher, handle) = Refresher::new(TokenStore::new(), Arc::new(Metrics::new()));
        let tokens = refresher.configure(&set(credentials), Source(fake.clone())).expect("configured");
        let stop = CancellationToken::new();
        tokio::spawn(refresher.run(stop.clone()));
        tokens.ready().await;
        Running { tokens, handle, stop }
    }

    fn slot(&self, credential: usize) -> SlotId {
        self.tokens.slot(CredentialId::new(credential))
    }

    fn lease(&self, credential: usize) -> Result<crate::tokens::Lease, crate::tokens::Unavailable> {
        self.tokens.lease(CredentialId::new(credential), Instant::now())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_at_75_to_85_percent_of_their_life_and_never_lapse() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application()]).await;
    let began = Instant::now();
    while began.elapsed() < 10 * HOUR {
        assert!(running.lease(0).is_ok(), "a valid token at every moment ({:?} in)", began.elapsed());
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let times = fake.call_times();
    // Ten hours of one-hour tokens refreshed at 45 to 51 minutes: 12 or 13 fetches.
    assert!((12..=14).contains(&times.len()), "{} fetches", times.len());
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= HOUR.mul_f64(0.75) && gap <= HOUR.mul_f64(0.85), "refreshed after {gap:?}");
    }
    assert!(fake.calls().iter().all(|call| *call == Call::ClientCredentials));
}

#[tokio::test(start_paused = true)]
async fn a_failing_endpoint_backs_off_exponentially_and_the_old_token_serves_until_it_expires() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application()]).await;
    let expires_at = running.tokens.expires_at(CredentialId::new(0)).expect("expiry");
    fake.fail_next(std::iter::repeat_n(FetchError::ServerError { status: 503 }, 400));

    // Until expiry the old token serves; from then on there is none.
    tokio::time::sleep_until(expires_at - Duration::from_millis(1)).await;
    assert!(running.lease(0).is_ok(), "the old token serves while refreshes fail");
    tokio::time::sleep_until(expires_at).await;
    assert_eq!(running.lease(0), Err(crate::tokens::Unavailable::Expired));

    // Retries: 200 ms doubling up to 30 s, each between half and all of its step.
    let times = fake.call_times();
    let schedule = Schedule::default();
    for (failures, pair) in (1u32..).zip(times[1..].windows(2)) {
        let step = schedule.backoff_min.saturating_mul(1 << (failures - 1).min(20)).min(schedule.backoff_max);
        let gap = pair[1] - pair[0];
        assert!(gap >= step / 2 && gap <= step, "retry {failures} after {gap:?}, step {step:?}");
    }
    assert!(times.len() > 10, "it kept retrying: {} calls", times.len());

    // The endpoint recovers: the next retry publishes, within the longest step.
    fake.failures.lock().expect("lock").clear();
    let recovered = Instant::now();
    while running.lease(0).is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.elapsed() <= schedule.backoff_max);
}

/// A mint refused (401) because its application token was replaced while it
/// was under way mints again at once with the new one: its waiters get the
/// new user token, and the application is not renewed a second time.
#[tokio::test(start_paused = true)]
async fn a_mint_refused_with_an_application_token_since_replaced_mints_again_at_once() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let minted = minted(None);
    let running = Running::start(&fake, vec![application(), minted]).await;
    let (app, user) = (running.slot(0), running.slot(1));
    let store = running.tokens.store().clone();
    let app_generation = running.lease(0).expect("token").generation;
    let user_generation = running.lease(1).expect("token").generation;
    // The application's token is rejected: its renewal takes 300 ms.
    running.handle.token_rejected(app, app_generation);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Meanwhile the user's is too, and its mint (made with the old application
    // token) is refused once the application's new token is out.
    *fake.mint_refused.lock().expect("lock") = true;
    let settled = store.settled(user);
    running.handle.token_rejected(user, user_generation);
    tokio::time::sleep(Duration::from_millis(10)).await;
    *fake.mint_refused.lock().expect("lock") = false;
    let lease = store.newer_than(user, user_generation, settled, Duration::from_secs(10)).await;
    assert!(lease.is_some(), "the waiter got the re-minted token: {:?}", fake.calls());
    let after_start = &fake.calls()[2..];
    assert_eq!(after_start, [Call::ClientCredentials, Call::Mint, Call::Mint], "one renewal, two mints");
}

/// However many reports of one credential's dead token are queued, another
/// credential's report is heard: a full queue used to drop it, and its waiters
/// waited out their whole timeout.
#[tokio::test(start_paused = true)]
async fn a_storm_of_one_credentials_rejections_never_drowns_anothers() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application(), user()]).await;
    let (first, second) = (running.slot(0), running.slot(1));
    let storm = running.lease(0).expect("token").generation;
    for _ in 0..2000 {
        running.handle.token_rejected(first, storm);
    }
    let rejected = running.lease(1).expect("token").generation;
    let store = running.tokens.store().clone();
    let settled = store.settled(second);
    running.handle.token_rejected(second, rejected);
    let lease = store.newer_than(second, rejected, settled, Duration::from_secs(10)).await;
    assert_eq!(lease.expect("a newer token for the other credential").generation, rejected + 1);
}

#[tokio::test(start_paused = true)]
async fn a_hundred_rejections_of_one_token_make_one_fetch_and_every_waiter_gets_its_successor() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application()]).await;
    let slot = running.slot(0);
    let store = running.tokens.store().clone();
    let first = running.lease(0).expect("token").generation;
    let settled = store.settled(slot);
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            running.handle.token_rejected(slot, first);
            let store = store.clone();
            tokio::spawn(async move { store.newer_than(slot, first, settled, Duration::from_secs(10)).await })
        })
        .collect();
    for waiter in waiters {
        let lease = waiter.await.expect("waiter").expect("a newer token");
        assert_eq!(lease.generation, first + 1);
    }
    assert_eq!(fake.calls().len(), 2, "the first fetch and one refresh");
}

#[tokio::test(start_paused = true)]
async fn rejections_force_at_most_one_refresh_per_interval_and_declined_waiters_go_at_once() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application()]).await;
    let slot = running.slot(0);
    let store = running.tokens.store().clone();

    let reject = |generation| {
        let settled = store.settled(slot);
        running.handle.token_rejected(slot, generation);
        store.newer_than(slot, generation, settled, Duration::from_secs(30))
    };
    assert!(reject(1).await.is_some(), "the first rejection refreshes");
    let waited = Instant::now();
    assert!(reject(2).await.is_none(), "a second within the interval is declined");
    assert_eq!(waited.elapsed(), Duration::ZERO, "declined at once, not at the timeout");
    assert_eq!(fake.calls().len(), 2);

    tokio::time::sleep(settings().min_forced_refresh_interval).await;
    assert_eq!(
        reject(2).await.map(|lease| lease.generation),
        Some(3),
        "after the interval it refreshes again"
    );
}

#[tokio::test(start_paused = true)]
async fn refresh_tokens_rotate_are_presented_once_and_a_refused_one_falls_back_to_the_password() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![user()]).await;
    fake.wait_for_calls(3).await; // two scheduled refreshes
    assert_eq!(fake.calls(), [Call::Password, Call::Refresh("r1".into()), Call::Refresh("r2".into())]);

    fake.fail_next([FetchError::Refused { status: 400, code: "invalid_grant".into() }]);
    fake.wait_for_calls(5).await;
    assert_eq!(
        fake.calls()[3..],
        [Call::Refresh("r3".into()), Call::Password],
        "a refused refresh token is not presented again; the password grant signs in"
    );
    assert!(running.lease(0).is_ok());

    // A refresh that failed in a way that may have consumed the token: the next
    // attempt signs in again rather than presenting it twice.
    fake.fail_next([FetchError::Timeout]);
    fake.wait_for_calls(7).await;
    let calls = fake.calls();
    assert_eq!(calls[5..], [Call::Refresh("r5".into()), Call::Password], "{calls:?}");
    assert!(running.lease(0).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_missing_user_is_provisioned_then_minted_with_the_application_token() {
    let fake = Fake::new(HOUR);
    *fake.user_exists.lock().expect("lock") = false;
    let minted = minted(Some(Provision {
        first_name: "Jane".into(),
        last_name: "Doe".into(),
        role: None,
        timezone: None,
    }));
    let running = Running::start(&fake, vec![application(), minted]).await;
    assert_eq!(fake.calls(), [Call::ClientCredentials, Call::Mint, Call::Provision, Call::Mint]);
    assert!(running.lease(1).is_ok());
}

/// A mint Tallyfy always refuses with a 401 renews the application token at
/// most once per `min_forced_refresh_interval` and is otherwise retried with
/// backoff: it used to loop, mint and application token, at network speed.
#[tokio::test(start_paused = true)]
async fn a_mint_tallyfy_always_refuses_backs_off_instead_of_looping() {
    let fake = Arc::new(Fake {
        lifetime: HOUR,
        latency: Mutex::new(Duration::from_millis(10)),
        failures: Mutex::default(),
        calls: Mutex::default(),
        user_exists: Mutex::new(true),
        mint_refused: Mutex::new(true),
    });
    let minted = minted(None);
    let (mut refresher, _handle) = Refresher::new(TokenStore::new(), Arc::new(Metrics::new()));
    let tokens =
        refresher.configure(&set(vec![application(), minted]), Source(fake.clone())).expect("configured");
    let stop = CancellationToken::new();
    tokio::spawn(refresher.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(60)).await;
    stop.cancel();
    let calls = fake.calls();
    let count = |call: Call| calls.iter().filter(|made| **made == call).count();
    // Backoff from 200 ms, doubling to 30 s, and an application renewal at
    // most every 5 s (each letting the mint go once more): about twenty mints
    // in the minute, where the loop made thousands.
    assert!(count(Call::Mint) <= 30, "{} mints", count(Call::Mint));
    assert!(count(Call::ClientCredentials) <= 14, "{} application tokens", count(Call::ClientCredentials));
    assert!(count(Call::Mint) >= 5, "still retried: {} mints", count(Call::Mint));
    assert!(tokens.lease(CredentialId::new(1), Instant::now()).is_err(), "no token to serve");
}

#[tokio::test(start_paused = true)]
async fn a_reconfigure_keeps_unchanged_credentials_and_forgets_retired_slots_after_the_grace() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application()]).await;
    let old = running.slot(0);

    let same =
        running.handle.reconfigure(set(vec![application()]), Source(fake.clone())).await.expect("same");
    assert_eq!(same.slot(CredentialId::new(0)), old, "an unchanged credential keeps its slot");
    assert_eq!(fake.calls().len(), 1, "and its token: no fetch");

    let mut scoped = application();
    scoped.kind = CredentialKind::ClientCredentials { client: client(), scope: Some("read".into()) };
    let changed = running.handle.reconfigure(set(vec![scoped]), Source(fake.clone())).await.expect("changed");
    let new = changed.slot(CredentialId::new(0));
    assert_ne!(new, old, "a changed credential gets a new slot");
    fake.wait_for_calls(2).await;
    let own = changed.lease(CredentialId::new(0), Instant::now()).expect("its own token");
    assert_eq!((own.authorization.to_str().ok(), own.generation), (Some("Bearer t2"), 1));

    let store = running.tokens.store();
    tokio::time::sleep(RETIRED_GRACE - Duration::from_secs(1)).await;
    assert!(store.lease(old, Instant::now()).is_ok(), "requests of the old config still hold its token");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.lease(old, Instant::now()), Err(crate::tokens::Unavailable::NeverObtained));
    assert_eq!(
        fake.calls().len(),
        2,
        "the retired slot was never refreshed (its token outlived the grace: 15 min < 45)"
    );
}

/// A request of the old config whose token Tallyfy rejects after a reload
/// removed its credential gets no new token: no grant is made with settings
/// the reload took away (a revoked secret), and its wait ends at once.
#[tokio::test(start_paused = true)]
async fn a_removed_credentials_rejected_token_is_not_refreshed_and_its_waiters_go_at_once() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application(), user()]).await;
    let removed = running.slot(1);
    let rejected = running.lease(1).expect("the user's token").generation;
    running.handle.reconfigure(set(vec![application()]), Source(fake.clone())).await.expect("reloaded");

    let store = running.tokens.store().clone();
    let settled = store.settled(removed);
    let waited = Instant::now();
    running.handle.token_rejected(removed, rejected);
    let newer = store.newer_than(removed, rejected, settled, Duration::from_secs(30)).await;
    assert!(newer.is_none(), "no token after the removal: {newer:?}");
    assert_eq!(waited.elapsed(), Duration::ZERO, "released at once, not at the timeout");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(fake.calls().len(), 2, "the two first fetches, no grant since: {:?}", fake.calls());
}

/// A mint under way at a reload that removed both the user token and its
/// application, refused by Tallyfy, renews no application token: that renewal
/// would be a grant with the removed application's secret.
#[tokio::test(start_paused = true)]
async fn a_mint_refused_after_its_application_was_removed_renews_nothing() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let minted_generation = running.lease(1).expect("the user token").generation;
    *fake.mint_refused.lock().expect("lock") = true;
    running.handle.token_rejected(running.slot(1), minted_generation); // a mint, refused at +300 ms
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.handle.reconfigure(set(vec![user()]), Source(fake.clone())).await.expect("reloaded");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let calls = fake.calls();
    let count = |call: Call| calls.iter().filter(|made| **made == call).count();
    assert_eq!(count(Call::ClientCredentials), 1, "the application's first token only: {calls:?}");
    assert_eq!(count(Call::Mint), 2, "the first mint and the one under way at the reload: {calls:?}");
}

/// A mint refused while its application's token was being replaced, whose
/// credential a reload removed meanwhile, is not tried again, and its waiters
/// get Tallyfy's answer at once. It used to be left due: the refresher spun on
/// it (a core) until it was forgotten, 15 minutes on, and its waiters waited
/// for their timeout. On the real clock: a spinning refresher never lets a
/// paused one advance, so the old behaviour would hang the test, not fail it.
#[tokio::test]
async fn a_removed_mint_refused_beside_an_application_renewal_releases_its_waiters() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let (app, user) = (running.slot(0), running.slot(1));
    let store = running.tokens.store().clone();
    *fake.mint_refused.lock().expect("lock") = true;
    running.handle.token_rejected(app, running.lease(0).expect("app").generation); // renewed at +300 ms
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rejected = running.lease(1).expect("the user token").generation;
    let settled = store.settled(user);
    running.handle.token_rejected(user, rejected); // a mint with the old application token, refused at +320 ms
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.newer_than(user, rejected, settled, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    running.handle.reconfigure(set(vec![application()]), Source(fake.clone())).await.expect("reloaded");
    let released = tokio::time::timeout(Duration::from_secs(5), waiter).await;
    let newer = released.expect("released when the mint was refused, not at its timeout").expect("waiter");
    assert!(newer.is_none(), "no token for a removed credential: {newer:?}");
    let mints = fake.calls().iter().filter(|call| **call == Call::Mint).count();
    assert_eq!(mints, 2, "the first mint and the refused one, none since");
}

/// A user token's first-token waiters, waiting behind its application's
/// first token, go at once when a reload removes the user token: no token
/// will come for it (they waited for their timeout, 31 s by default).
#[tokio::test(start_paused = true)]
async fn first_token_waiters_of_a_removed_credential_go_at_the_reload() {
    let fake = Fake::answering_in(HOUR, Duration::from_secs(5));
    let (mut refresher, handle) = Refresher::new(TokenStore::new(), Arc::new(Metrics::new()));
    let tokens = refresher
        .configure(&set(vec![application(), minted(None)]), Source(fake.clone()))
        .expect("configured");
    let stop = CancellationToken::new();
    tokio::spawn(refresher.run(stop.clone()));
    let (user, store) = (tokens.slot(CredentialId::new(1)), tokens.store().clone());
    let waiter = tokio::spawn(async move { store.newer_than(user, 0, 0, Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    handle.reconfigure(set(vec![application()]), Source(fake.clone())).await.expect("reloaded");
    let reloaded = Instant::now();
    assert!(waiter.await.expect("waiter").is_none(), "no token for a removed credential");
    assert_eq!(reloaded.elapsed(), Duration::ZERO, "released at the reload");
    stop.cancel();
}

/// A mint refused while its application's token is being renewed waits for
/// that token; a reload that removes the user token meanwhile lets its
/// waiters go at once (the renewal's end no longer wakes a removed mint).
#[tokio::test(start_paused = true)]
async fn waiters_of_a_mint_awaiting_its_application_go_when_a_reload_removes_it() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let (app, user) = (running.slot(0), running.slot(1));
    let store = running.tokens.store().clone();
    fake.answer_in(Duration::from_secs(1));
    running.handle.token_rejected(app, running.lease(0).expect("app").generation); // renewed at +1 s
    tokio::time::sleep(Duration::from_millis(10)).await;
    fake.answer_in(Duration::from_millis(10));
    *fake.mint_refused.lock().expect("lock") = true;
    let rejected = running.lease(1).expect("the user token").generation;
    let settled = store.settled(user);
    running.handle.token_rejected(user, rejected); // refused at +20 ms, the renewal still running
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.newer_than(user, rejected, settled, Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(90)).await;
    running.handle.reconfigure(set(vec![application()]), Source(fake.clone())).await.expect("reloaded");
    let reloaded = Instant::now();
    assert!(waiter.await.expect("waiter").is_none(), "no token for a removed credential");
    assert_eq!(reloaded.elapsed(), Duration::ZERO, "released at the reload");
}

/// The credential `app` with client secret `secret`.
fn application_with_secret(secret: &str) -> Credential {
    Credential {
        name: "app".into(),
        kind: CredentialKind::ClientCredentials {
            client: OAuthClient { id: "client".into(), secret: Secret::new(secret) },
            scope: None,
        },
    }
}

/// Whether the credential's token at `at` is the `Bearer` of `token`.
fn serves(tokens: &CredentialTokens, token: &str, at: Instant) -> bool {
    tokens.lease(CredentialId::new(0), at).is_ok_and(|lease| lease.authorization == format!("Bearer {token}"))
}

/// A rotated secret that Tallyfy refuses never stops the traffic: the
/// previous token serves until its own expiry while the new settings are
/// tried again with backoff. The reload used to wait 10 s, then serve 503s.
#[tokio::test(start_paused = true)]
async fn a_rotated_secret_serves_with_the_previous_token_until_its_own_even_when_refused() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application()]).await;
    let expires_at = running.tokens.expires_at(CredentialId::new(0)).expect("expiry");
    let refused = FetchError::Refused { status: 401, code: "invalid_client".into() };
    fake.fail_next(std::iter::repeat_n(refused, 1000));

    let rotated = running
        .handle
        .reconfigure(set(vec![application_with_secret("mistyped")]), Source(fake.clone()))
        .await
        .expect("reconfigured");
    assert_ne!(rotated.slot(CredentialId::new(0)), running.slot(0), "new settings, new slot");
    assert!(serves(&rotated, "t1", Instant::now()), "the previous token, at once");
    fake.wait_for_calls(3).await;
    assert!(rotated.not_ready(Instant::now()).is_empty(), "ready: readiness does not flap");
    tokio::time::sleep_until(expires_at - Duration::from_millis(1)).await;
    assert!(serves(&rotated, "t1", Instant::now()), "until the previous token's own expiry");
    assert!(fake.calls().len() >= 8, "the new secret is tried again: {} calls", fake.calls().len());
    tokio::time::sleep_until(expires_at).await;
    assert_eq!(rotated.lease(CredentialId::new(0), Instant::now()), Err(crate::tokens::Unavailable::Expired));
}

/// A credential that now acts as another principal (here a scope) takes no
/// token of the previous settings: its first own one is awaited (and a
/// failed first fetch ends that wait); settings for another upstream neither.
#[tokio::test(start_paused = true)]
async fn another_principal_or_upstream_starts_without_a_token_and_its_first_fetch_is_awaited() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application()]).await;
    fake.fail_next([FetchError::ServerError { status: 503 }]);
    let mut scoped = application();
    scoped.kind = CredentialKind::ClientCredentials { client: client(), scope: Some("read".into()) };
    let changed = running.handle.reconfigure(set(vec![scoped]), Source(fake.clone())).await.expect("changed");
    let credential = CredentialId::new(0);
    assert_eq!(
        changed.lease(credential, Instant::now()),
        Err(crate::tokens::Unavailable::FirstPending),
        "its first fetch is worth waiting for"
    );
    // Each call takes 300 ms; a failed one is tried again 100 ms or more later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        changed.lease(credential, Instant::now()),
        Err(crate::tokens::Unavailable::NeverObtained),
        "a failed first fetch ends the wait"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(serves(&changed, "t3", Instant::now()), "its own token, after the backoff");

    let mut elsewhere = set(vec![application()]);
    elsewhere.upstream = "another".into();
    let moved = running.handle.reconfigure(elsewhere, Source(fake.clone())).await.expect("moved");
    assert_eq!(
        moved.lease(credential, Instant::now()),
        Err(crate::tokens::Unavailable::FirstPending),
        "a token never crosses to another upstream"
    );
}

/// A minted user token's principal includes its application: a rotated
/// application secret keeps both tokens serving; another application
/// client leaves the user token to be minted anew (by the new application).
#[tokio::test(start_paused = true)]
async fn a_user_token_stands_in_only_while_its_application_is_the_same_principal() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let user = CredentialId::new(1);
    let (first_app, first_user) = (running.lease(0).expect("app"), running.lease(1).expect("user"));

    let rotated = running
        .handle
        .reconfigure(set(vec![application_with_secret("rotated"), minted(None)]), Source(fake.clone()))
        .await
        .expect("rotated");
    assert_eq!(
        rotated.lease(CredentialId::new(0), Instant::now()).map(|l| l.authorization),
        Ok(first_app.authorization)
    );
    assert_eq!(
        rotated.lease(user, Instant::now()).map(|l| l.authorization),
        Ok(first_user.authorization.clone())
    );

    tokio::time::sleep(Duration::from_secs(2)).await; // the rotated settings' own tokens
    let other = Credential {
        name: "app".into(),
        kind: CredentialKind::ClientCredentials {
            client: OAuthClient { id: "another-client".into(), secret: Secret::new("s") },
            scope: None,
        },
    };
    fake.fail_next([FetchError::ServerError { status: 503 }]);
    let moved = running
        .handle
        .reconfigure(set(vec![other, minted(None)]), Source(fake.clone()))
        .await
        .expect("moved");
    assert_eq!(moved.lease(user, Instant::now()), Err(crate::tokens::Unavailable::FirstPending));
    // Each call takes 300 ms; a failed one is tried again 100 ms or more later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        moved.lease(user, Instant::now()),
        Err(crate::tokens::Unavailable::NeverObtained),
        "the application's failed fetch ends the user token's wait too"
    );
    // The new application's token after the backoff, then the user's, minted with it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = fake.calls();
    assert_eq!(calls[calls.len() - 3..], [Call::ClientCredentials, Call::ClientCredentials, Call::Mint]);
    let minted = moved.lease(user, Instant::now()).expect("minted anew");
    assert_ne!(minted.authorization, first_user.authorization);
}

/// jane, at another address: another principal, so a new user token to mint.
fn minted_for(email: &str) -> Credential {
    let mut credential = minted(None);
    if let CredentialKind::ApplicationUser { email: e, .. } = &mut credential.kind {
        *e = email.into();
    }
    credential
}

/// A failed refresh of an application that still holds a valid token does
/// not end the wait of a user token whose first mint is under way with it.
#[tokio::test(start_paused = true)]
async fn an_application_refresh_failing_with_a_valid_token_leaves_a_first_mint_awaited() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let app = running.lease(0).expect("app");
    fake.fail_next([FetchError::ServerError { status: 503 }]);
    running.handle.token_rejected(running.slot(0), app.generation); // refresh: fails at +300 ms
    tokio::time::sleep(Duration::from_millis(100)).await;
    let changed = running
        .handle
        .reconfigure(set(vec![application(), minted_for("jane.doe@example.com")]), Source(fake.clone()))
        .await
        .expect("changed"); // the first mint: done at +400 ms
    let user = CredentialId::new(1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(running.lease(0).is_ok(), "the application's token still serves");
    assert_eq!(changed.lease(user, Instant::now()), Err(crate::tokens::Unavailable::FirstPending));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(changed.lease(user, Instant::now()).is_ok(), "minted");
}

/// A user token whose application has no token and is backing off will not
/// be minted before the application's next attempt: its callers are not
/// kept waiting for it.
#[tokio::test(start_paused = true)]
async fn a_first_mint_behind_an_application_without_a_token_is_not_awaited() {
    let fake = Fake::new(HOUR);
    let running = Running::start(&fake, vec![application(), minted(None)]).await;
    let expires_at = running.tokens.expires_at(CredentialId::new(0)).expect("expiry");
    fake.fail_next(std::iter::repeat_n(FetchError::ServerError { status: 503 }, 1000));
    tokio::time::sleep_until(expires_at + Duration::from_secs(1)).await;
    assert!(running.lease(0).is_err(), "the application lost its token");
    let changed = running
        .handle
        .reconfigure(set(vec![application(), minted_for("jane.doe@example.com")]), Source(fake.clone()))
        .await
        .expect("changed");
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        changed.lease(CredentialId::new(1), Instant::now()),
        Err(crate::tokens::Unavailable::NeverObtained)
    );
}

/// A refresh of the replaced slot that is under way at the reload (Tallyfy
/// revokes the access token it replaces) is passed on to the slot standing in
/// for it, through a second rotation too: a rotated password that is refused
/// does not leave it the revoked token.
#[tokio::test(start_paused = true)]
async fn a_refresh_under_way_at_rotations_is_passed_on_to_the_slots_standing_in() {
    for rotations in [1, 2] {
        let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
        let running = Running::start(&fake, vec![user()]).await;
        let first = running.lease(0).expect("t1");
        running.handle.token_rejected(running.slot(0), first.generation); // refresh: t2 at +300 ms
        let mut latest = None;
        for rotation in 0..rotations {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut rotated = user();
            if let CredentialKind::Password { password, .. } = &mut rotated.kind {
                *password = Secret::new(format!("mistyped-{rotation}"));
            }
            let changed =
                running.handle.reconfigure(set(vec![rotated]), Source(fake.clone())).await.expect("rotated");
            assert!(serves(&changed, "t1", Instant::now()), "the previous token, at once");
            latest = Some(changed);
        }
        let latest = latest.expect("rotated");
        tokio::time::sleep_until(first_call_end(&fake) + Duration::from_millis(50)).await;
        let refused = FetchError::Refused { status: 400, code: "invalid_grant".into() };
        fake.fail_next(std::iter::repeat_n(refused, rotations));
        assert!(serves(&latest, "t2", Instant::now()), "{rotations}: the refreshed token, passed on");
        // The sign-ins end by +500 ms; a retry comes 100 ms or more after one
        // (the backoff's equal jitter), and ends 300 ms later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut expected = vec![Call::Refresh("r1".into())];
        expected.extend(std::iter::repeat_n(Call::Password, rotations));
        assert_eq!(fake.calls()[1..2 + rotations], expected);
        assert!(
            serves(&latest, "t2", Instant::now()),
            "{rotations}: kept when the new passwords are refused"
        );
    }
}

/// When the refresh (the second call) ends: it began then and takes the latency.
fn first_call_end(fake: &Fake) -> Instant {
    fake.call_times()[1] + fake.latency()
}

/// A slot that obtained its own token stands in for nothing any more: a
/// refresh of the slot it replaced, under way at the reload and ended after
/// that token came, reaches neither it nor the slot standing in for it since.
#[tokio::test(start_paused = true)]
async fn a_slot_with_its_own_token_is_not_reached_by_its_predecessors_refresh() {
    let fake = Fake::answering_in(HOUR, Duration::from_millis(300));
    let running = Running::start(&fake, vec![user()]).await; // t1
    let rotation = |password: &str| {
        let mut rotated = user();
        if let CredentialKind::Password { password: p, .. } = &mut rotated.kind {
            *p = Secret::new(password);
        }
        set(vec![rotated])
    };
    running.handle.token_rejected(running.slot(0), 1); // the first slot refreshes: t2 at +300 ms
    tokio::time::sleep(Duration::from_millis(50)).await;
    fake.answer_in(Duration::from_millis(10));
    let second = running.handle.reconfigure(rotation("second"), Source(fake.clone())).await.expect("second");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(serves(&second, "t3", Instant::now()), "its own token");
    fake.fail_next([FetchError::Refused { status: 400, code: "invalid_grant".into() }]);
    let third = running.handle.reconfigure(rotation("mistyped"), Source(fake.clone())).await.expect("third");
    fake.answer_in(Duration::from_secs(2)); // its sign-in's retry ends after what follows
    tokio::time::sleep(Duration::from_millis(250)).await; // the first slot's refresh has ended
    assert_eq!(fake.calls()[1..4], [Call::Refresh("r1".into()), Call::Password, Call::Password]);
    assert!(serves(&running.tokens, "t2", Instant::now()), "the first slot refreshed");
    let now = Instant::now();
    assert!(serves(&second, "t3", now), "the second slot keeps its own token");
    assert!(serves(&third, "t3", now), "the third stands in for the second: not reached either");
}
