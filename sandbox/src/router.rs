//! Every request's path through the sandbox: read and record it, gate on
//! `X-Tallyfy-Client`, match the route, authenticate, check the organization,
//! run the handler, and stamp the common response headers.

use std::sync::Arc;

use http::header::HeaderValue;
use http::request::Parts;
use http::{Method, Request};
use hyper::body::Incoming;

use super::auth::{self, Caller};
use super::body::{self, ReadBody};
use super::encoding::random_hex;
use super::respond::{self, Outcome, Reply};
use super::state::{RATE_LIMIT, Shared};
use super::{ReceivedRequest, applications, files, oauth, people, runs, tasks};

/// Returned to hyper to close the connection without an answer (`TokenFault::Drop`).
#[derive(Debug)]
pub(super) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sandbox dropped the connection on purpose")
    }
}

impl std::error::Error for Dropped {}

/// One request as handlers see it.
pub(super) struct Call<'a> {
    pub shared: &'a Shared,
    pub parts: &'a Parts,
    pub body: &'a ReadBody,
}

impl Call<'_> {
    pub fn query(&self) -> Option<&str> {
        self.parts.uri.query()
    }

    pub fn date_format(&self) -> &str {
        &self.shared.settings.request_date_format
    }

    /// `{public_base_url}/api/organizations/{org}/{rest}`, for absolute links.
    pub fn org_url(&self, org: &str, rest: &str) -> String {
        format!("{}/api/organizations/{org}/{rest}", self.shared.settings.public_base_url)
    }
}

/// The hyper service: answers every request, or drops the connection on purpose.
pub(super) async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Reply, Dropped> {
    let (parts, body) = request.into_parts();
    let body = body::read(body).await;
    let uri = parts.uri.path_and_query().map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned());
    shared.lock().log.record(ReceivedRequest {
        method: parts.method.clone(),
        uri,
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.prefix.clone(),
        body_len: body.len,
        body_complete: !body.failed,
        trailers: body.trailers.clone(),
    });
    let request_id = parts.headers.get("x-request-id").cloned().unwrap_or_else(|| {
        HeaderValue::from_str(&random_hex(32)).expect("hex digits are a valid header value")
    });
    let mut reply = if body.failed {
        respond::bad_request("The request body ended early.")
    } else {
        route(&Call { shared: &shared, parts: &parts, body: &body }).await?
    };
    reply.headers_mut().insert("x-request-id", request_id);
    let accepts_gzip = parts
        .headers
        .get(http::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|coding| coding.trim().starts_with("gzip")));
    let is_json = reply.headers().get(http::header::CONTENT_TYPE).is_some_and(|v| v == "application/json");
    if accepts_gzip && is_json { Ok(respond::gzipped(reply).await) } else { Ok(reply) }
}

/// The routes the sandbox knows, matched on method and raw path segments.
enum Route<'a> {
    MintUserToken { org: &'a str, email: &'a str },
    ProvisionUser { org: &'a str },
    Resource(Resource<'a>),
}

/// Routes that act as a user.
enum Resource<'a> {
    Me,
    MyOrganizations,
    Org { org: &'a str, action: OrgAction<'a> },
}

enum OrgAction<'a> {
    MyTasks,
    ListTasks,
    CreateTask,
    UpdateTask(&'a str),
    ListRuns,
    LaunchRun,
    UpdateRunTask { run: &'a str, task: &'a str },
    CreateGuest,
    Upload,
    Download(&'a str),
}

impl<'a> Route<'a> {
    fn parse(method: &Method, path: &'a str) -> Option<Route<'a>> {
        let segments: Vec<&'a str> = path.strip_prefix("/api/")?.split('/').collect();
        let org_action = |org, action| Some(Route::Resource(Resource::Org { org, action }));
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["applications", org, "users", email, "token"]) => {
                Some(Route::MintUserToken { org, email })
            }
            ("POST", ["applications", org, "users"]) => Some(Route::ProvisionUser { org }),
            ("GET", ["me"]) => Some(Route::Resource(Resource::Me)),
            ("GET", ["me", "organizations"]) => Some(Route::Resource(Resource::MyOrganizations)),
            ("GET", ["organizations", org, "me", "tasks"]) => org_action(org, OrgAction::MyTasks),
            ("GET", ["organizations", org, "tasks"]) => org_action(org, OrgAction::ListTasks),
            ("POST", ["organizations", org, "tasks"]) => org_action(org, OrgAction::CreateTask),
            ("PUT", ["organizations", org, "tasks", task]) => org_action(org, OrgAction::UpdateTask(task)),
            ("GET", ["organizations", org, "runs"]) => org_action(org, OrgAction::ListRuns),
            ("POST", ["organizations", org, "runs"]) => org_action(org, OrgAction::LaunchRun),
            ("PUT", ["organizations", org, "runs", run, "tasks", task]) => {
                org_action(org, OrgAction::UpdateRunTask { run, task })
            }
            ("POST", ["organizations", org, "guests"]) => org_action(org, OrgAction::CreateGuest),
            ("POST", ["organizations", org, "file"]) => org_action(org, OrgAction::Upload),
            ("GET", ["organizations", org, "file", id, "dl"]) => org_action(org, OrgAction::Download(id)),
            _ => None,
        }
    }
}

async fn route(call: &Call<'_>) -> Result<Reply, Dropped> {
    let served = call.parts.uri.path().strip_prefix(call.shared.settings.path_prefix.as_str());
    let Some(path) = served else { return Ok(respond::plain_not_found()) };
    if call.parts.method == Method::POST && (path == "/api/oauth/token" || path == "/oauth/token") {
        return oauth::token(call).await;
    }
    if path != "/api" && !path.starts_with("/api/") {
        return Ok(respond::plain_not_found());
    }
    if !auth::has_client_header(&call.parts.headers) {
        return Ok(respond::endpoint_not_found());
    }
    let fault = call.shared.lock().api_fault(path);
    if let Some(fault) = fault {
        return Ok(respond::api_fault(&fault));
    }
    let Some(route) = Route::parse(&call.parts.method, path) else {
        return Ok(respond::endpoint_not_found());
    };
    match route {
        Route::MintUserToken { org, email } => applications::mint(call, org, email).await,
        Route::ProvisionUser { org } => Ok(applications::provision(call, org)),
        Route::Resource(resource) => {
            Ok(with_rate_limit(call.shared, serve_resource(call, resource).unwrap_or_else(|reply| reply)))
        }
    }
}

/// A route that acts as a user (user token or personal token).
fn serve_resource(call: &Call<'_>, resource: Resource<'_>) -> Outcome {
    let (caller, token_org) = auth::caller(call.shared, &call.parts.headers)?;
    match resource {
        Resource::Me => people::me(call, &caller),
        Resource::MyOrganizations => Ok(people::my_organizations(&token_org)),
        Resource::Org { org, action } => {
            auth::check_org(org, &token_org)?;
            org_action(call, &caller, org, action)
        }
    }
}

fn org_action(call: &Call<'_>, caller: &Caller, org: &str, action: OrgAction<'_>) -> Outcome {
    match action {
        OrgAction::MyTasks => tasks::list(call, org, Some(caller)),
        OrgAction::ListTasks => tasks::list(call, org, None),
        OrgAction::CreateTask => tasks::create(call),
        OrgAction::UpdateTask(task) => tasks::update(call, task),
        OrgAction::ListRuns => runs::list(call, org),
        OrgAction::LaunchRun => runs::launch(call, caller),
        OrgAction::UpdateRunTask { run, task } => runs::update_task(call, run, task),
        OrgAction::CreateGuest => people::create_guest(call),
        OrgAction::Upload => Ok(files::upload(call)),
        OrgAction::Download(file) => Ok(files::download(call, file)),
    }
}

fn with_rate_limit(shared: &Shared, mut reply: Reply) -> Reply {
    let remaining = shared.lock().rate.hit();
    let headers = reply.headers_mut();
    headers.insert("x-ratelimit-limit", HeaderValue::from(RATE_LIMIT));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    reply
}
