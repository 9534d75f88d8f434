//! Connections to Tallyfy, pooled per runtime thread.
//!
//! A request takes the newest idle HTTP/1.1 connection its own thread opened
//! for the same credential ([`Tenant`]: one credential's answers never travel
//! on another's connection), or shares the thread's HTTP/2 connection, when
//! ALPN chose h2; an HTTP/1.1 connection goes back to that thread's pool when
//! its response body ends. A body dropped before its end takes its connection with it, since
//! the rest of that response is still on the wire. Once Tallyfy has chosen h2,
//! one request at a time dials the thread's next HTTP/2 connection, and the
//! ones that find none meanwhile wait for it.
//!
//! HTTP/1.1 connections are spoken by the request's own task ([`super::http1`]);
//! an HTTP/2 connection is hyper's, with a task of its own. What this saves
//! against hyper-util's pooled client, per request: a task spawned to wait for
//! the connection's return, a pool key built and hashed under a lock shared by
//! every thread, the `Host` value formatted again, the connection's details
//! copied into the response, and (HTTP/1.1) the hop through a channel to the
//! connection's task and back. Connections a thread holds are used by that
//! thread only (`pool_max_idle_per_host` is per thread), so no lock is
//! contended and no request hands off to another thread.
//!
//! Like hyper-util's client, a request that a reused connection closed before
//! any of it was written (and, over HTTP/1.1, before anything was taken from
//! its body) goes again, on another connection (over HTTP/2, once more too
//! after a new connection closed so): the upstream
//! closing a kept-alive connection just as it was picked is no failure. Over
//! HTTP/1.1 so does a safe request without a body (`GET`, `HEAD`, `OPTIONS`)
//! that a reused connection closed without a byte of answer, once, as nginx
//! and Go's client resend it: Tallyfy's close can cross the request on the
//! wire. Over HTTP/2, a request whose body is held whole (or empty) goes
//! again, once, when Tallyfy says it did not process its stream
//! ([`refused_unprocessed`]). None of this is a retry of `[upstream.retry]`,
//! which judges the outcome after it. An
//! idle connection Tallyfy closed (or wrote to unasked) is noticed when it is
//! picked, and dropped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Either;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thread_local::ThreadLocal;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;
use tower_service::Service as _;

use super::http1::{self, Resend};
use super::returning::UpstreamBody;
use super::{SentBody, Tenant};
use crate::body::Tracked;
use crate::error::BoxError;
use crate::target::canonical_authority;

/// Why a request got no response from Tallyfy.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (refused, timed out, TLS failed).
    Connect(BoxError),
    /// An HTTP/1.1 exchange failed while the request was sent or the answer awaited.
    Http1(http1::Error),
    /// The HTTP/2 stream failed while the request was sent or the answer awaited.
    Http2(hyper::Error),
    /// There was no request left to send: it had been sent already (a bug).
    Spent,
}

/// How much of one response Tallyfy may send over HTTP/2 before the proxy
/// takes it (as its caller reads): one download's pace is this much per round
/// trip (20 MiB/s at 50 ms).
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// How much of all of a connection's responses Tallyfy may send ahead: a
/// stream window for each of the 128 streams a server usually allows at once,
/// so callers that do not read stall only their own responses, never another
/// caller's on the same connection (hyper's default, 5 MiB, was 2.5 of its
/// 2 MiB streams: three unread downloads stopped every answer on it). What
/// unread responses can hold in the thread's h2 buffers is bounded by it.
const H2_CONNECTION_WINDOW: u32 = 128 * H2_STREAM_WINDOW;
/// A connection Tallyfy's side stopped answering on (a hung process keeps its
/// TCP connection open) is found by a PING unanswered for
/// [`H2_PING_TIMEOUT`], and closed, and the next request dials another;
/// without it every request of the thread waited for its timeout, for ever.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams a thread keeps open on its HTTP/2 connection before the next
/// request dials another (which then takes the thread's new requests, the
/// full one serving its streams to their end): the least RFC 9113 §6.5.2 asks
/// a server to allow. Beyond the server's own limit hyper queues a request,
/// its timeout running, behind whatever holds the streams, so one caller's
/// slow uploads or unread downloads would hold back every other caller's.
const H2_STREAMS_PER_CONNECTION: usize = 100;

/// The per-thread pools of one upstream.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector dials.
    origin: Uri,
    /// `Host` of every HTTP/1.1 request: the host, and the port unless the
    /// scheme's default (as hyper-util's client wrote it).
    host: HeaderValue,
    /// `upstream.connect_timeout_ms`: TCP, TLS and the HTTP/2 handshake together.
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    threads: ThreadLocal<Arc<Local>>,
}

/// One thread's connections.
pub(super) struct Local {
    state: Mutex<State>,
    idle_timeout: Duration,
    max_idle: usize,
    /// Wakes the requests waiting for the HTTP/2 connection another one is dialling.
    dialled: Arc<Notify>,
}

struct State {
    /// Idle HTTP/1.1 connections, every tenant's, the most recently returned last.
    idle: Vec<Idle>,
    /// The HTTP/2 connection new requests go on, when ALPN chose h2.
    h2: Option<Shared>,
    /// Whether a task is closing connections idle for longer than the timeout.
    reaping: bool,
    /// Whether a request is dialling the thread's next HTTP/2 connection (in
    /// place of a full one, or of one that closed).
    dialling: bool,
    /// Whether Tallyfy's last handshake chose h2: a request that finds no
    /// connection then waits for the one being dialled instead of dialling
    /// its own (a closed connection under load would have every request in
    /// flight on the thread open a TLS connection at once).
    speaks_h2: bool,
    /// Dials of the next HTTP/2 connection that failed, so far.
    failed_dials: u64,
}

/// A dial under way for the thread's next HTTP/2 connection: over when
/// dropped, however the dial ends (a caller gone mid-dial included), and the
/// requests waiting for it woken.
struct Dialling<'a> {
    local: &'a Local,
    failed: bool,
}

impl Drop for Dialling<'_> {
    fn drop(&mut self) {
        let mut state = self.local.lock();
        state.dialling = false;
        state.failed_dials += u64::from(self.failed);
        drop(state);
        self.local.dialled.notify_waiters();
    }
}

struct Idle {
    connection: Box<http1::Connection>,
    since: Instant,
}

/// A thread's HTTP/2 connection: its sender, when it was last used, and how
/// many of its streams are open.
struct Shared {
    sender: http2::SendRequest<SentBody>,
    last_used: Instant,
    open: Arc<AtomicUsize>,
}

/// A stream's place on its HTTP/2 connection, held until its response body
/// is dropped (or its send failed).
pub(super) struct StreamPlace(Arc<AtomicUsize>);

impl StreamPlace {
    fn take(open: &Arc<AtomicUsize>) -> StreamPlace {
        open.fetch_add(1, Ordering::Relaxed);
        StreamPlace(open.clone())
    }
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Connection {
    Http1(Box<http1::Connection>),
    Http2(http2::SendRequest<SentBody>, StreamPlace),
}

/// What a checkout found in the thread's pool.
enum Found {
    Shared(http2::SendRequest<SentBody>, StreamPlace),
    /// The HTTP/2 connection holds [`H2_STREAMS_PER_CONNECTION`] streams:
    /// this request dials the next one (no other does meanwhile).
    Full(http2::SendRequest<SentBody>, StreamPlace),
    Idle(Idle),
    /// An idle connection older than `pool_idle_timeout_ms`: closed, not used.
    Stale,
    /// Tallyfy speaks h2 and the thread has no connection: this request dials
    /// it (no other does meanwhile).
    Dial,
    /// Another request is dialling the thread's HTTP/2 connection: woken when
    /// that dial ends; it had failed when the failed dials are no longer these.
    Await(std::pin::Pin<Box<OwnedNotified>>, u64),
    Nothing,
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Pool {
        let host = host_value(&origin);
        Pool { connector, origin, host, connect_timeout, idle_timeout, max_idle, threads: ThreadLocal::new() }
    }

    fn local(&self) -> &Arc<Local> {
        self.threads.get_or(|| {
            Arc::new(Local {
                state: Mutex::new(State {
                    idle: Vec::new(),
                    h2: None,
                    reaping: false,
                    dialling: false,
                    speaks_h2: false,
                    failed_dials: 0,
                }),
                idle_timeout: self.idle_timeout,
                max_idle: self.max_idle,
                dialled: Arc::new(Notify::new()),
            })
        })
    }

    /// Sends the request in `outbound` (its URI absolute, naming the upstream)
    /// on a pooled connection of `tenant`, or a new one, and waits for the
    /// response head. The request is taken from `outbound` once written (or
    /// failed after some of it was).
    pub async fn send(
        &self,
        outbound: &mut Option<Request<SentBody>>,
        tenant: Tenant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let local = self.local();
        // A sent request goes again once at most, whatever the connections.
        let mut resent_unanswered = false;
        // Over HTTP/2, a request goes once more at most on a connection that
        // was not reused: refused unprocessed, or handed back unsent.
        let mut resent_h2 = false;
        loop {
            let (connection, reused) = self.checkout(local, tenant).await?;
            // HTTP/1.1 borrows the request for the exchange; HTTP/2 moves it
            // into hyper's send before its await (held there, not here).
            match connection {
                Connection::Http1(mut connection) => {
                    let request = outbound.as_mut().ok_or(SendError::Spent)?;
                    request.headers_mut().insert(HOST, self.host.clone());
                    match connection.exchange(request).await {
                        Ok(head) => {
                            *outbound = None;
                            let http1::ResponseHead { response, decoder, keep_alive } = head;
                            let body = UpstreamBody::http1(connection, decoder, keep_alive, local.clone());
                            return Ok(response.map(|()| body));
                        }
                        Err(failure) if reused && failure.resend == Resend::Untouched => {
                            tracing::debug!(
                                "a pooled upstream connection failed before the request was written; sending again"
                            );
                            continue;
                        }
                        Err(failure)
                            if reused && failure.resend == Resend::Unanswered && !resent_unanswered =>
                        {
                            resent_unanswered = true;
                            tracing::debug!(
                                "a pooled upstream connection closed without answering a safe request; sending it again"
                            );
                            continue;
                        }
                        Err(failure) => {
                            *outbound = None;
                            return Err(SendError::Http1(failure.error));
                        }
                    }
                }
                Connection::Http2(mut sender, place) => {
                    let request = outbound.take().ok_or(SendError::Spent)?;
                    // Boxed (this future is every request's): sent again,
                    // once, if Tallyfy refuses the stream unprocessed.
                    let copy = if resent_h2 { None } else { whole_copy(&request) };
                    let mut error = match sender.try_send_request(request).await {
                        Ok(response) => return Ok(response.map(|body| UpstreamBody::http2(body, place))),
                        Err(error) => error,
                    };
                    match (error.take_message(), copy) {
                        // Not sent: it may go on another connection, however
                        // often if this one had been used before, else once.
                        (Some(request), _) if reused || !resent_h2 => {
                            resent_h2 |= !reused;
                            *outbound = Some(request);
                            tracing::debug!(
                                "an upstream connection closed before the request was written; sending again"
                            );
                        }
                        (None, Some(copy)) if refused_unprocessed(error.error()) => {
                            copy.body().progress().read_again();
                            *outbound = Some(*copy);
                            resent_h2 = true;
                            tracing::debug!("Tallyfy refused a stream unprocessed; sending it again");
                        }
                        _ => return Err(SendError::Http2(error.into_error())),
                    }
                }
            }
        }
    }

    /// An idle connection of this thread and `tenant` that is still open, or a
    /// new one; and whether it was reused.
    async fn checkout(&self, local: &Arc<Local>, tenant: Tenant) -> Result<(Connection, bool), SendError> {
        let picked = loop {
            let found = local.find(tenant);
            match found {
                Found::Shared(mut h2, place) => {
                    if h2.ready().await.is_ok() {
                        break Some(Connection::Http2(h2, place));
                    }
                    local.forget_h2(&place);
                }
                Found::Full(mut h2, place) => {
                    let dialled = Box::pin(self.dial_next(local, tenant)).await;
                    // The new connection takes the request (its place on the
                    // full one is given up); if none could be opened, the
                    // full one, still working, takes it after all.
                    match dialled {
                        Ok(connection) => return Ok((connection, false)),
                        Err(error) => {
                            if h2.ready().await.is_ok() {
                                break Some(Connection::Http2(h2, place));
                            }
                            local.forget_h2(&place);
                            return Err(error);
                        }
                    }
                }
                // Closed by Tallyfy while idle (or not quiet): take another.
                Found::Idle(mut idle) => {
                    if idle.connection.is_open() {
                        break Some(Connection::Http1(idle.connection));
                    }
                }
                Found::Stale => {}
                Found::Dial => return Ok((Box::pin(self.dial_next(local, tenant)).await?, false)),
                Found::Await(woken, failed_dials) => {
                    // The dial is bounded by the connect timeout: so is the wait.
                    let _ = tokio::time::timeout(self.connect_timeout, woken).await;
                    if local.lock().failed_dials != failed_dials {
                        let failed = "the connection to Tallyfy this request waited for could not be opened";
                        return Err(SendError::Connect(failed.into()));
                    }
                }
                Found::Nothing => break None,
            }
        };
        match picked {
            Some(connection) => Ok((connection, true)),
            // Boxed: dialling (TLS included) is rare, and inline it would make
            // every request's future, copied at each `.await`, kilobytes larger.
            None => Ok((Box::pin(self.connect(local, tenant)).await?, false)),
        }
    }

    /// Dials the thread's next HTTP/2 connection, the one dial [`Found::Full`]
    /// or [`Found::Dial`] handed this request: its end (and whether it failed)
    /// wakes the requests waiting for it.
    async fn dial_next(&self, local: &Arc<Local>, tenant: Tenant) -> Result<Connection, SendError> {
        let mut dialling = Dialling { local, failed: false };
        let dialled = self.connect(local, tenant).await;
        dialling.failed = dialled.is_err();
        dialled
    }

    /// Dials Tallyfy and speaks the protocol ALPN chose, within
    /// `upstream.connect_timeout_ms` (a TLS or HTTP/2 handshake that stalls
    /// is a failed connect, as a TCP one is): an HTTP/2 connection runs in its
    /// own task on this thread until it closes; an HTTP/1.1 one is driven by
    /// the requests of `tenant` that use it.
    async fn connect(&self, local: &Arc<Local>, tenant: Tenant) -> Result<Connection, SendError> {
        let stalled = || SendError::Connect("connect timed out (TCP, TLS and HTTP/2 handshakes)".into());
        tokio::time::timeout(self.connect_timeout, self.handshake(local, tenant))
            .await
            .map_err(|_| stalled())?
    }

    async fn handshake(&self, local: &Arc<Local>, tenant: Tenant) -> Result<Connection, SendError> {
        let mut connector = self.connector.clone();
        let io = connector.call(self.origin.clone()).await.map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .max_header_list_size(http1::MAX_HEAD as u32)
                .handshake(io)
                .await
                .map_err(|error| SendError::Connect(error.into()))?;
            tokio::spawn(watch(connection));
            let place = local.keep_h2(sender.clone());
            return Ok(Connection::Http2(sender, place));
        }
        local.lock().speaks_h2 = false;
        Ok(Connection::Http1(Box::new(http1::Connection::new(TokioIo::new(io), tenant))))
    }
}

impl Local {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An HTTP/1.1 connection whose response body ended: idle again, in place
    /// of the thread's oldest when it already keeps `pool_max_idle_per_host`.
    pub(super) fn give_back(self: &Arc<Self>, connection: Box<http1::Connection>) {
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            if state.idle.is_empty() {
                return;
            }
            state.idle.remove(0);
        }
        state.idle.push(Idle { connection, since: Instant::now() });
        self.reap_later(&mut state);
    }

    /// A new HTTP/2 connection, shared by the thread's requests from now on
    /// (one it replaces serves its open streams to their end), and closed
    /// like an idle HTTP/1.1 one once unused for `pool_idle_timeout_ms` (its
    /// PINGs would keep it open at Tallyfy's end for ever). The place of the
    /// stream that dialled it.
    fn keep_h2(self: &Arc<Self>, sender: http2::SendRequest<SentBody>) -> StreamPlace {
        let open = Arc::new(AtomicUsize::new(0));
        let place = StreamPlace::take(&open);
        let mut state = self.lock();
        state.h2 = Some(Shared { sender, last_used: Instant::now(), open });
        state.speaks_h2 = true;
        self.reap_later(&mut state);
        place
    }

    /// What this thread's pool offers a request of `tenant` now: a place on
    /// the HTTP/2 connection (the dial of the next one when it is full, or
    /// when there is none and Tallyfy speaks h2; a wait for it when another
    /// request dials it), else the tenant's newest idle HTTP/1.1 connection
    /// (only the one taken is checked for age: the reaper closes the rest).
    fn find(&self, tenant: Tenant) -> Found {
        let mut state = self.lock();
        let now = Instant::now();
        let offered = state.h2.as_mut().filter(|h2| !h2.sender.is_closed()).map(|h2| {
            h2.last_used = now;
            let full = h2.open.load(Ordering::Relaxed) >= H2_STREAMS_PER_CONNECTION;
            (h2.sender.clone(), StreamPlace::take(&h2.open), full)
        });
        match offered {
            // Requests that come while the next connection is dialled go on
            // the full one, past the cap but within the limit a server
            // usually allows (128 and up).
            Some((h2, place, full)) if !full || state.dialling => Found::Shared(h2, place),
            Some((h2, place, _)) => {
                state.dialling = true;
                Found::Full(h2, place)
            }
            None if state.speaks_h2 => {
                state.h2 = None;
                if !state.dialling {
                    state.dialling = true;
                    return Found::Dial;
                }
                // Registered before the lock is let go: the dial's end cannot slip by.
                let mut woken = Box::pin(self.dialled.clone().notified_owned());
                woken.as_mut().enable();
                Found::Await(woken, state.failed_dials)
            }
            None => {
                state.h2 = None;
                let Some(at) = state.idle.iter().rposition(|idle| idle.connection.tenant() == tenant) else {
                    return Found::Nothing;
                };
                let idle = state.idle.remove(at);
                if now.duration_since(idle.since) < self.idle_timeout {
                    Found::Idle(idle)
                } else {
                    Found::Stale
                }
            }
        }
    }

    /// The thread's HTTP/2 connection failed: it is forgotten, unless another
    /// replaced it meanwhile (`place` is a stream's place on the failed one).
    fn forget_h2(&self, place: &StreamPlace) {
        let mut state = self.lock();
        if state.h2.as_ref().is_some_and(|h2| Arc::ptr_eq(&h2.open, &place.0)) {
            state.h2 = None;
        }
    }

    fn reap_later(self: &Arc<Self>, state: &mut State) {
        if !state.reaping {
            state.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// Closes this thread's connections once idle for `timeout`; ends when none
/// is left (the next one given back starts it again).
async fn reap(local: Weak<Local>, timeout: Duration) {
    loop {
        tokio::time::sleep(timeout / 2).await;
        let Some(local) = local.upgrade() else { return };
        let mut state = local.lock();
        let now = Instant::now();
        state.idle.retain(|idle| now.duration_since(idle.since) < timeout);
        if state.h2.as_ref().is_some_and(|h2| now.duration_since(h2.last_used) >= timeout) {
            state.h2 = None;
        }
        if state.idle.is_empty() && state.h2.is_none() {
            state.reaping = false;
            return;
        }
    }
}

/// Runs an HTTP/2 connection to its end.
async fn watch<C, E>(connection: C)
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "upstream connection ended with an error");
    }
}

/// A copy of a request whose body is held whole (or empty), to send again.
fn whole_copy(request: &Request<SentBody>) -> Option<Box<Request<SentBody>>> {
    let Either::Left(body) = request.body().inner() else { return None };
    let mut copy = Request::new(Tracked::new(Either::Left(body.clone()), request.body().progress().clone()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(Box::new(copy))
}

/// Whether Tallyfy said it did not process the request's stream (RFC 9113
/// §8.7, §6.8), so that it may go again whatever its method: it refused the
/// stream (`REFUSED_STREAM`), or a `GOAWAY` named a last stream before it. h2
/// gives a `GOAWAY`'s error only to the streams after that last one, whatever
/// its code; the streams up to it end with the connection's own failure.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let refused = h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            return h2.is_remote() && (refused || h2.is_go_away());
        }
        source = cause.source();
    }
    false
}

/// The origin's authority as `Host` names it: its port only when not the scheme's default.
fn host_value(origin: &Uri) -> HeaderValue {
    origin
        .scheme()
        .zip(origin.authority())
        .and_then(|(scheme, authority)| {
            HeaderValue::from_str(canonical_authority(scheme, authority).as_str()).ok()
        })
        .unwrap_or_else(|| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_the_port_only_when_not_the_default() {
        let host = |uri: &str| host_value(&uri.parse().expect("uri"));
        assert_eq!(host("https://go.tallyfy.com/"), "go.tallyfy.com");
        assert_eq!(host("https://go.tallyfy.com:443/"), "go.tallyfy.com");
        assert_eq!(host("http://127.0.0.1:80/"), "127.0.0.1");
        assert_eq!(host("http://127.0.0.1:9000/"), "127.0.0.1:9000");
        assert_eq!(host("https://[::1]:8443/"), "[::1]:8443");
    }
}
