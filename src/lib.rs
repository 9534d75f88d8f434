//! tallyfy-proxy: an authenticating reverse proxy in front of Tallyfy's REST API.
//!
//! Legacy apps that cannot do OAuth, bearer tokens or `X-Tallyfy-Client` are
//! pointed at the proxy instead of `https://go.tallyfy.com`. The proxy recognises
//! the calling app, swaps whatever it presented for the Tallyfy token its identity
//! is mapped to, adds the headers Tallyfy requires and streams the request on.
//!
//! These docs are the one description of the request's path and of the module
//! map; the README's Architecture section is generated from them
//! (`scripts/architecture`, checked in CI), and the modules point here.
//!
//! # The journey of one request
//!
//! 1. **Accept.** [`server`] accepts the connection under the connection cap,
//!    runs the TLS handshake when configured (the client certificate's names
//!    read by [`client_cert`]), tells HTTP/1.1 from HTTP/2 by the first bytes
//!    under the header-read deadline (HTTP/1: each next head under it too,
//!    watched by the connection), and hands each request to the current
//!    config generation: [`app`] loads the `ArcSwap<Proxy>` once, and the request
//!    finishes on that generation even if [`reload`] swaps in another.
//! 2. **Record.** [`proxy::Proxy::handle`] marks the caller's credential headers
//!    sensitive, gives the request its id ([`request_id`]) and starts its
//!    record (`proxy/record.rs`).
//! 3. **Prepare** ([`proxy::Proxy::prepare`], no I/O, the hot path the benches
//!    measure): [`framing::check`] refuses a length beside chunking, a length that
//!    is not one plain number and codings other than `chunked`; with
//!    `listen.unprefixed`, [`target::add_api_prefix`] reads `/me` as `/api/me`;
//!    [`target::check`] lets only `/api/*` out and refuses `CONNECT`, `TRACE`,
//!    lower-case methods, foreign absolute-form targets (or ones with user
//!    information), ambiguous decoded
//!    segments and `/api/oauth` in any spelling; [`target::host`] wants one plain
//!    `Host`; [`headers::check_fields`] gives 431 past the header limits and 400
//!    for a value with white space at either end (HTTP/2), the declared length 413;
//!    [`identity`] finds the `[[identities]]` rule the caller matches (401
//!    otherwise); [`policy`] applies its orgs, methods and paths to the decoded
//!    path, with a query `_method` judged as the method it names
//!    ([`method_override`]) (403); [`tokens::CredentialTokens::lease`] takes the
//!    identity's token with one lock-free `ArcSwap` load (503 when there is none);
//!    [`traffic::Traffic::admit`] applies the identity's `rate_limit` and
//!    `max_in_flight`, the `[[limits]]` rules and Tallyfy's remembered 429s
//!    (429 / 503, nothing sent; a request refused after this, or dropped with
//!    its caller, before it is sent gives its counts back: [`traffic::Unsent`]);
//!    [`upstream::Upstream::uri_for`] and [`headers::to_upstream`] write the
//!    upstream head: Tallyfy's host with the caller's path and query byte for
//!    byte, the caller's credentials and untrusted headers dropped, the bearer
//!    token and `X-Tallyfy-Client` set.
//! 4. **Body out** (`proxy/request_body.rs`): read whole when [`dates`] must be
//!    rewritten (byte-preserving) or a body `_method` judged; kept when small
//!    enough to replay; otherwise streamed, size-capped, multipart uploads
//!    through the override screen. The caller's body is a
//!    [`server::CallerBody`]: an HTTP/2 one ends only once its stream is known
//!    not to be reset. A request that waited (for its body, a remembered 429)
//!    takes the credential's token again (503 when none is valid now); in fleet
//!    mode the budgets it passed are then spent fleet-wide in one Redis round
//!    trip ([`fleet`], this replica's verdict standing when Redis cannot
//!    answer). [`body`] holds the plumbing: content kinds and
//!    encodings, bounded reads counted against `server.max_buffered_bytes`
//!    ([`body::Budget`], handed to each thread in slabs: 503 `buffers_full` for a
//!    body that must be read whole when it is spent), the [`body::Prefixed`],
//!    [`body::DataOnly`] (trailer fields never go on) and [`body::Tracked`]
//!    (progress, and how the body failed) wrappers.
//! 5. **Send** (`proxy/send.rs`). The upstream request, an [`upstream::Outbound`],
//!    is lent down the send path and taken only where it is written (a request
//!    moved through each async level would be held and copied at each one).
//!    [`upstream::Upstream::send`] takes one of this
//!    thread's connections to Tallyfy (rustls, HTTP/1.1 or h2 by ALPN; HTTP/1.1
//!    written and read by the request's own task, no channel to a connection
//!    task), which goes back to the thread's pool when the response body ends; its timeout
//!    measures Tallyfy's silence, not the caller's upload (502 / 504 on
//!    failure). The pool sends a request again on another connection when
//!    Tallyfy cannot have acted on it (nothing of it written; a safe bodyless
//!    request a kept connection closed unanswered; an HTTP/2 stream refused
//!    unprocessed). A kept request is sent again
//!    after a failure that did nothing at Tallyfy, within `[upstream.retry]` and
//!    its budget; a Tallyfy 429 is remembered for the credential and, when short,
//!    waited out ([`traffic`]).
//! 6. **Dead token.** On a dead-token status the rejection goes to the refresher
//!    ([`tokens::refresh::RefreshHandle::token_rejected`]); one refresh runs
//!    however many requests saw it, and a kept request waits for the new token
//!    and is replayed once.
//! 7. **Body back** (`proxy/response_body.rs`): unframeable answers refused,
//!    hop-by-hop headers and Tallyfy's trailers dropped ([`headers::to_caller`]),
//!    and JSON bodies that
//!    may hold Tallyfy's absolute links ([`links::LinkScan`], no copy otherwise)
//!    pointed back at the proxy ([`links`]).
//! 8. **Answer.** Any [`error::ProxyError`] on the way becomes a JSON response in
//!    one place ([`error::ProxyError::to_response`]). When the response body ends
//!    ([`body::Finished`]) the record writes one [`access_log`] line and the
//!    request's [`metrics`].
//!
//! Beside the request path, each the single writer of one thing:
//! - the refresher ([`tokens::refresh`]) writes the [`tokens::TokenStore`]
//!   snapshot for the life of the process: schedules, backoff, single flight,
//!   and the mapping of each generation's credentials onto slots, so a reload
//!   keeps unchanged credentials' tokens and one changed only in its secrets
//!   serves with its previous token until it has its own; in fleet mode
//!   (`tokens/refresh/shared.rs`) it takes a newer token set from the
//!   [`fleet`], or refreshes under the credential's Redis lease and shares the
//!   result, and hears of the other replicas' sets on the fleet's channel;
//! - the reloader ([`reload`]) writes the current generation, on SIGHUP or when a
//!   file it reads changes, as soon as it is loaded (nothing in it waits);
//! - [`admin`] answers `/livez`, `/readyz` and `/metrics` on its own listener.
//!
//! Threads: the binary runs one single-threaded tokio runtime per CPU, each with
//! its own `SO_REUSEPORT` socket of the proxy port ([`app::bind_shared`]) and its
//! own upstream pool, so a request never changes thread. The first runtime also
//! runs the admin listener, the reloader and the refresher.
//!
//! # Module map, top down
//!
//! Each module imports only modules further down this list
//! (`scripts/module-graph` prints the graph by layer, and fails on a cycle or
//! on anything but the wiring importing [`config`]). Tests may reach anywhere.
//!
//! Wiring, which alone reads [`config`]:
//! - `main.rs`: the command line (`run`, `check`, `sandbox`, `hash-key`),
//!   signals, one runtime per CPU, the allocator (mimalloc, default feature).
//! - [`sandbox_mode`]: the `sandbox` command, the fake Tallyfy of the
//!   `tallyfy-sandbox` crate with a proxy in front (default `sandbox` feature;
//!   `--no-default-features` builds a proxy with no fake inside).
//! - [`app`]: listeners, the current generation, the servers, the drain.
//! - [`reload`]: the reloader (a refused load tried again until it succeeds);
//!   `reload/watch.rs` watches (inotify) the files the config reads and
//!   compares their fingerprint with the one taken when it was read.
//! - [`admin`]: `/livez`, `/readyz`, `/metrics`.
//!
//! Translation:
//! - [`config`]: `proxy.toml` read by serde (`config/raw.rs`), then each section
//!   validated into its domain's types (`ctx`, `upstream`, `limits`,
//!   `listen_tls`, `credentials`, `identities`, `dates`, `fleet`,
//!   `secret_source`); `sources` names the files a config was read from and
//!   fingerprints what they held.
//!
//! The pipeline:
//! - [`proxy`]: `handle` and `forward` in `proxy.rs`; `prepare.rs`,
//!   `request_body.rs`, `send.rs` (retries, 429s), `replay.rs`,
//!   `response_body.rs`; `record.rs` (the access line and metrics of one
//!   request); `settings.rs` (what a generation gives it).
//!
//! Domains:
//! - [`identity`]: `[[identities]]` rules, API keys indexed by digest.
//! - [`tokens`]: `token.rs` (a usable token), `store.rs` (the snapshot),
//!   `credential.rs` and `credential_tokens.rs` (a generation's credentials
//!   and their slots), `refresh/` (the refresher: slots, fetches, its handle),
//!   `issuer/` (the token endpoint and the application routes, and the
//!   classification of their answers), `schedule.rs` (when to refresh, how long
//!   to back off: pure, time passed in), `jwt.rs`.
//! - [`upstream`]: the connection to Tallyfy, its URIs and timeouts;
//!   `outbound.rs` (a request on its way, lent down the send path), `pool.rs`
//!   (connections pooled per runtime thread: HTTP/1.1 ones idle, each carrying
//!   one credential's requests, the HTTP/2 one shared), `http1/` (HTTP/1.1 spoken by the request's task: `head.rs`, heads
//!   written and read, framing decided; `decoder.rs`, where a response body
//!   ends), `returning.rs` (the response body that gives its connection back
//!   when it ends).
//! - [`server`]: the accept loop and the connection places every socket of a
//!   listener shares; `connection.rs` (one connection's life and its timers),
//!   `sniff.rs`, `conn_io.rs` (the byte stream: reads shown to the head tap,
//!   small writes gathered), `head_tap.rs` (each HTTP/1 head's raw bytes, so a
//!   `Content-Length` beside `chunked` is refused; where the next head stands
//!   after a response; a long head waiting for dispatch counted against
//!   [`body::Budget`]), `activity.rs` (requests in flight, idleness, responses
//!   that stall), `caller_body.rs` (the request body handed to the handler: an
//!   HTTP/2 body's end held until the request's future, or its response body,
//!   shows no reset),
//!   `watch.rs` (the connection's timers polled only when they fire),
//!   `peers.rs` (connections per peer address, capped on the admin port).
//! - [`policy`]: orgs, methods, paths and the org alias of an identity.
//! - [`traffic`]: local limits (`bucket`, `in_flight`, `window`, `rules`),
//!   Tallyfy's 429s remembered (`throttle`), retries and their budget
//!   (`retry`), keys from callers' paths bounded in size (`key`); the counts
//!   survive reloads in one process-wide state.
//! - [`fleet`]: `[fleet]`, replicas sharing one Redis: the connection and the
//!   key check, the channel and the generations poll (`news.rs`), refresh
//!   leases with fencing numbers and token sets (`token_sets.rs`,
//!   `scripts.rs`), sealed with AES-256-GCM (`seal.rs`), budgets spent
//!   fleet-wide (`budget.rs`). Knows nothing of tokens or limits: it stores
//!   bytes and counts under names it is given.
//!
//! Pure decisions:
//! - [`target`] (request line and `Host`), [`framing`] (message length),
//!   [`headers`] (hygiene both ways, limits), [`request_id`],
//!   [`method_override`] (`_method` as PHP reads it; `multipart/` screens
//!   uploads as they stream), [`dates`] (request dates, byte-preserving),
//!   [`links`] (response links).
//!
//! Shared machinery, importing nothing of the crate or only each other (further
//! down):
//! - [`telemetry`], [`access_log`] (its values escaped with [`json`]'s
//!   eight-bytes-at-a-time scan), [`metrics`], [`client_cert`], and [`secret`]
//!   (values whose `Debug` is `[redacted]`).
//! - [`json`]: the streaming scanner, string escapes and edits behind dates,
//!   links, overrides and access lines.
//! - [`body`]: content kinds and encodings, bounded reads, body wrappers.
//! - [`error`]: `ProxyError`, classified caller / upstream / internal.
#![allow(rustdoc::private_intra_doc_links)]

pub mod access_log;
pub(crate) mod admin;
pub mod app;
pub mod body;
pub(crate) mod client_cert;
pub mod config;
pub mod dates;
pub mod error;
pub mod fleet;
pub(crate) mod framing;
pub(crate) mod headers;
pub mod identity;
pub(crate) mod json;
pub mod links;
pub(crate) mod method_override;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub(crate) mod request_id;
#[cfg(feature = "sandbox")]
pub mod sandbox_mode;
pub mod secret;
pub mod server;
pub(crate) mod target;
pub mod telemetry;
pub mod tokens;
pub mod traffic;
pub mod upstream;
