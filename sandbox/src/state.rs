//! The sandbox's shared state: settings fixed at start, and everything that
//! changes (tokens, records, controls) behind one mutex that is never held
//! across an `.await`.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::seed;
use super::store::Store;
use super::tokens::TokenStore;
use super::{ApiFault, ReceivedRequest, SandboxConfig, TokenFault, TokenRequest};

/// How many received requests are kept.
const RECEIVED_CAPACITY: usize = 10_000;
/// The advertised `X-RateLimit-Limit`, per minute.
pub(super) const RATE_LIMIT: u32 = 600;

/// What never changes after start.
pub(super) struct Settings {
    pub request_date_format: String,
    /// No trailing slash.
    pub public_base_url: String,
    /// What every served path starts with (no trailing slash; usually empty).
    pub path_prefix: String,
}

pub(super) struct Shared {
    pub settings: Settings,
    state: Mutex<State>,
    /// Bumped by a rolling restart: connections accepted before it close after
    /// their next response.
    pub restarts: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn new(config: SandboxConfig, base_url: &str) -> Shared {
        let path_prefix = config.path_prefix.trim_end_matches('/').to_owned();
        let public_base_url = match config.public_base_url.as_deref() {
            Some(base) => base.trim_end_matches('/').to_owned(),
            None => format!("{base_url}{path_prefix}"),
        };
        Shared {
            settings: Settings {
                request_date_format: config.request_date_format,
                public_base_url,
                path_prefix,
            },
            state: Mutex::new(State {
                tokens: TokenStore::default(),
                store: seed::store(),
                token_lifetime: config.token_lifetime,
                user_token_lifetime: config.user_token_lifetime,
                fault: None,
                log: Log::default(),
                rate: RateWindow::default(),
                api_faults: Vec::new(),
            }),
            restarts: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The state; a panic in another request never locks the sandbox up.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct State {
    pub tokens: TokenStore,
    pub store: Store,
    pub token_lifetime: Duration,
    pub user_token_lifetime: Duration,
    pub fault: Option<TokenFault>,
    pub log: Log,
    pub rate: RateWindow,
    /// `Sandbox::fail_api`: (path fragment, answers left, answer).
    pub api_faults: Vec<(String, u32, ApiFault)>,
}

impl State {
    /// The fault the next request to `path` gets, if any (spending one answer).
    pub fn api_fault(&mut self, path: &str) -> Option<ApiFault> {
        let (_, left, fault) =
            self.api_faults.iter_mut().find(|(part, left, _)| *left > 0 && path.contains(part.as_str()))?;
        *left -= 1;
        Some(fault.clone())
    }
}

/// What the sandbox saw: requests (a bounded ring) and token-endpoint calls.
#[derive(Default)]
pub(super) struct Log {
    received: VecDeque<ReceivedRequest>,
    token_requests: Vec<TokenRequest>,
}

impl Log {
    pub fn record(&mut self, request: ReceivedRequest) {
        if self.received.len() == RECEIVED_CAPACITY {
            self.received.pop_front();
        }
        self.received.push_back(request);
    }

    pub fn received(&self) -> Vec<ReceivedRequest> {
        self.received.iter().cloned().collect()
    }

    pub fn clear_received(&mut self) {
        self.received.clear();
    }

    pub fn record_token_request(&mut self, grant: &str, client_id: Option<&str>, answered: u16) {
        self.token_requests.push(TokenRequest {
            grant: grant.to_owned(),
            client_id: client_id.map(str::to_owned),
            answered,
        });
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.token_requests.clone()
    }
}

/// A fixed one-minute window counting resource requests, for `X-RateLimit-*`.
#[derive(Default)]
pub(super) struct RateWindow {
    started: Option<Instant>,
    used: u32,
}

impl RateWindow {
    /// Counts one request; returns the remaining allowance.
    pub fn hit(&mut self) -> u32 {
        let now = Instant::now();
        match self.started {
            Some(started) if now.duration_since(started) < Duration::from_secs(60) => {}
            _ => {
                self.started = Some(now);
                self.used = 0;
            }
        }
        self.used = self.used.saturating_add(1);
        RATE_LIMIT.saturating_sub(self.used)
    }
}
