//! The sandbox Tallyfy, driven over real HTTP: OAuth grants, the application
//! user-token flow, resource routes with Tallyfy's dates and pagination,
//! streaming, faults and revocation.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tallyfy_sandbox::fixtures::*;
use tallyfy_sandbox::{Sandbox, SandboxConfig, TokenFault};
use tokio::net::TcpListener;

const UNAUTHENTICATED: &str = r#"{"message":"Unauthenticated."}"#;

type Form<'a> = Vec<(&'a str, &'a str)>;

struct Env {
    sandbox: Sandbox,
    http: reqwest::Client,
}

async fn start() -> Env {
    start_with(SandboxConfig::default()).await
}

async fn start_with(config: SandboxConfig) -> Env {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sandbox = Sandbox::start(listener, config).await.expect("sandbox starts");
    Env { sandbox, http: client(reqwest::Client::builder()) }
}

fn client(builder: reqwest::ClientBuilder) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    builder.build().expect("reqwest client")
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.sandbox.base_url())
    }

    async fn token(&self, pairs: &[(&str, &str)]) -> Response {
        self.http
            .post(self.sandbox.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(pairs))
            .send()
            .await
            .expect("token endpoint answers")
    }

    /// A Tallyfy API call with `X-Tallyfy-Client` and a bearer token.
    fn api(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("x-tallyfy-client", "APIClient")
            .header("authorization", format!("Bearer {token}"))
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        read(self.api(Method::GET, path, token).send().await.expect("answered")).await
    }

    async fn send_json(&self, method: Method, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        read(self.api(method, path, token).json(&body).send().await.expect("answered")).await
    }

    async fn app_token(&self) -> String {
        let (status, body) = read(
            self.token(&[
                ("grant_type", "client_credentials"),
                ("client_id", APP_CLIENT_ID),
                ("client_secret", APP_CLIENT_SECRET),
                ("scope", "*"),
            ])
            .await,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().expect("access_token").to_owned()
    }

    async fn password_grant(&self) -> Value {
        let (status, body) = read(
            self.token(&[
                ("grant_type", "password"),
                ("client_id", USER_CLIENT_ID),
                ("client_secret", USER_CLIENT_SECRET),
                ("username", USERNAME),
                ("password", PASSWORD),
            ])
            .await,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn mint(&self, app_token: &str, email: &str) -> (StatusCode, Value) {
        let path = format!("/api/applications/{ORG_ID}/users/{}/token", email.replace('@', "%40"));
        read(self.api(Method::POST, &path, app_token).send().await.expect("answered")).await
    }
}

async fn read(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT-shaped");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON claims")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tasks_path() -> String {
    format!("/api/organizations/{ORG_ID}/tasks")
}

#[tokio::test]
async fn client_credentials_issue_an_application_token_with_a_readable_exp() {
    let env = start().await;
    let response = env
        .token(&[
            ("grant_type", "client_credentials"),
            ("client_id", APP_CLIENT_ID),
            ("client_secret", APP_CLIENT_SECRET),
        ])
        .await;
    assert_eq!(response.headers()["content-type"], "application/json");
    let (status, body) = read(response).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body.get("refresh_token").is_none(), "client tokens have no refresh token");
    let token = body["access_token"].as_str().expect("token");
    let claims = claims(token);
    assert_eq!(claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"), 3600);
    assert_ne!(token, env.app_token().await, "every token is unique");
    let grants = env.sandbox.token_requests();
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[0].grant, "client_credentials");
    assert_eq!(grants[0].client_id.as_deref(), Some(APP_CLIENT_ID));
    assert_eq!(grants[0].answered, 200);
}

#[tokio::test]
async fn token_endpoint_errors_follow_passport() {
    let env = start().await;
    let user_client = [("client_id", USER_CLIENT_ID), ("client_secret", USER_CLIENT_SECRET)];
    let cases: Vec<(Form, u16, &str)> = vec![
        (
            vec![
                ("grant_type", "password"),
                user_client[0],
                user_client[1],
                ("username", USERNAME),
                ("password", "wrong"),
            ],
            400,
            "invalid_grant",
        ),
        (
            vec![
                ("grant_type", "password"),
                user_client[0],
                ("client_secret", "nope"),
                ("username", USERNAME),
                ("password", PASSWORD),
            ],
            401,
            "invalid_client",
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_id", "9999"), ("client_secret", "x")],
            401,
            "invalid_client",
        ),
        (
            vec![("grant_type", "password"), user_client[0], user_client[1], ("username", USERNAME)],
            400,
            "invalid_request",
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_secret", APP_CLIENT_SECRET)],
            400,
            "invalid_request",
        ),
        (vec![("grant_type", "magic"), user_client[0], user_client[1]], 400, "unsupported_grant_type"),
    ];
    for (pairs, status, error) in &cases {
        let (got, body) = read(env.token(pairs).await).await;
        assert_eq!((got.as_u16(), body["error"].as_str()), (*status, Some(*error)), "{pairs:?}: {body}");
        assert!(body["message"].is_string() && body["error_description"].is_string(), "{body}");
    }
    let json_body = env
        .http
        .post(env.sandbox.token_url())
        .json(&json!({"grant_type": "client_credentials", "client_id": APP_CLIENT_ID}))
        .send()
        .await
        .expect("answered");
    let (status, body) = read(json_body).await;
    assert_eq!((status.as_u16(), body["error"].as_str()), (400, Some("invalid_request")));
    let recorded: Vec<(String, u16)> =
        env.sandbox.token_requests().into_iter().map(|r| (r.grant, r.answered)).collect();
    assert_eq!(recorded.len(), cases.len() + 1);
    assert_eq!(recorded[5], ("magic".to_owned(), 400));
    assert_eq!(recorded[6], (String::new(), 400), "a body that is not a form has no readable grant");
}

#[tokio::test]
async fn password_grant_and_rotating_refresh_with_double_redemption() {
    let env = start().await;
    let first = env.password_grant().await;
    let access = first["access_token"].as_str().expect("access token");
    let refresh = first["refresh_token"].as_str().expect("refresh token");
    let (status, me) = env.get("/api/me", access).await;
    assert_eq!((status.as_u16(), me["data"]["email"].as_str()), (200, Some(USERNAME)));

    let refresh_form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh),
        ("client_id", USER_CLIENT_ID),
        ("client_secret", USER_CLIENT_SECRET),
    ];
    let (status, second) = read(env.token(&refresh_form).await).await;
    assert_eq!(status, 200, "{second}");
    let new_access = second["access_token"].as_str().expect("new access token");
    assert_ne!(second["refresh_token"].as_str().expect("rotated"), refresh);
    assert_eq!(env.get("/api/me", access).await.0, 401, "the access token that came with it died");
    assert_eq!(env.get("/api/me", new_access).await.0, 200);

    let (status, again) = read(env.token(&refresh_form).await).await;
    assert_eq!((status.as_u16(), again["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(env.sandbox.double_redemptions(), 1);
    let grants: Vec<String> = env.sandbox.token_requests().into_iter().map(|r| r.grant).collect();
    assert_eq!(grants, ["password", "refresh_token", "refresh_token"]);
}

#[tokio::test]
async fn the_token_endpoint_answers_on_both_documented_paths() {
    let env = start().await;
    let response = env
        .http
        .post(env.url("/oauth/token"))
        .header("content-type", "application/x-www-form-urlencoded; charset=UTF-8")
        .body(form_encode(&[
            ("grant_type", "client_credentials"),
            ("client_id", APP_CLIENT_ID),
            ("client_secret", APP_CLIENT_SECRET),
        ]))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(env.sandbox.token_url(), format!("{}/api/oauth/token", env.sandbox.base_url()));
}

#[tokio::test]
async fn applications_mint_user_tokens_and_provision_users() {
    let env = start_with(SandboxConfig {
        user_token_lifetime: Duration::from_secs(120),
        ..SandboxConfig::default()
    })
    .await;
    let app = env.app_token().await;
    let (status, minted) = env.mint(&app, APP_USER_EMAIL).await;
    assert_eq!(status, 200, "{minted}");
    assert_eq!((minted["token_type"].as_str(), minted["expires_in"].as_u64()), (Some("Bearer"), Some(120)));
    let user_token = minted["access_token"].as_str().expect("user token");
    let (status, me) = env.get("/api/me", user_token).await;
    assert_eq!((status.as_u16(), me["data"]["email"].as_str()), (200, Some(APP_USER_EMAIL)));
    let (_, tasks) = env.get(&format!("/api/organizations/{ORG_ID}/me/tasks"), user_token).await;
    assert_eq!(tasks["meta"]["pagination"]["total"], SEEDED_APP_USER_TASKS);

    let (status, missing) = env.mint(&app, NEW_USER_EMAIL).await;
    assert_eq!((status.as_u16(), missing["error"].as_bool()), (404, Some(true)), "{missing}");
    let (status, malformed) = env.mint(&app, "not-an-email").await;
    assert_eq!(status, 422);
    assert!(malformed["errors"]["email"].is_array(), "{malformed}");

    let users = format!("/api/applications/{ORG_ID}/users");
    let new_user =
        json!({"first_name": "New", "last_name": "Hire", "email": NEW_USER_EMAIL, "role": "light"});
    let (status, created) = env.send_json(Method::POST, &users, &app, new_user.clone()).await;
    assert_eq!(
        (status.as_u16(), created["data"]["email"].as_str()),
        (201, Some(NEW_USER_EMAIL)),
        "{created}"
    );
    let (status, taken) = env.send_json(Method::POST, &users, &app, new_user).await;
    assert_eq!(status, 422);
    assert_eq!(taken["errors"]["email"][0], "The email has already been taken.");
    let (status, incomplete) =
        env.send_json(Method::POST, &users, &app, json!({"email": "x@example.com"})).await;
    assert_eq!(status, 422);
    assert_eq!(incomplete["errors"]["first_name"][0], "The first name field is required.");
    assert_eq!(env.mint(&app, NEW_USER_EMAIL).await.0, 200, "a provisioned user can be minted for");

    let other_org =
        format!("/api/applications/{OTHER_ORG_ID}/users/{}/token", APP_USER_EMAIL.replace('@', "%40"));
    let response = env.api(Method::POST, &other_org, &app).send().await.expect("answered");
    assert_eq!(response.status(), 403);
    let (status, body) = env.mint(user_token, APP_USER_EMAIL).await;
    assert_eq!(
        (status.as_u16(), body),
        (401, json!({"message": "Unauthenticated."})),
        "user tokens cannot mint"
    );
    assert_eq!(env.get("/api/me", &app).await.0, 401, "application tokens have no user");

    let mints: Vec<(Option<String>, u16)> = env
        .sandbox
        .token_requests()
        .into_iter()
        .filter(|r| r.grant == "user_token")
        .map(|r| (r.client_id, r.answered))
        .collect();
    let app_client = || Some(APP_CLIENT_ID.to_owned());
    let expected = [
        (app_client(), 200),
        (app_client(), 404),
        (app_client(), 422),
        (app_client(), 200),
        (app_client(), 403),
        (None, 401), // a user token: no application client behind it
    ];
    assert_eq!(mints, expected);
}

#[tokio::test]
async fn a_missing_bad_or_revoked_bearer_gets_the_exact_401_body() {
    let env = start().await;
    let path = tasks_path();
    let no_bearer = env.http.get(env.url(&path)).header("x-tallyfy-client", "APIClient").send().await;
    let mut responses = vec![no_bearer.expect("answered")];
    for value in
        ["Bearer not-a-token", &format!("bearer {PERSONAL_TOKEN}"), &format!("Bearer  {PERSONAL_TOKEN}")]
    {
        let request = env
            .http
            .get(env.url(&path))
            .header("x-tallyfy-client", "APIClient")
            .header("authorization", value);
        responses.push(request.send().await.expect("answered"));
    }
    env.sandbox.revoke_personal_token();
    responses.push(env.api(Method::GET, &path, PERSONAL_TOKEN).send().await.expect("answered"));
    for response in responses {
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.text().await.expect("body"), UNAUTHENTICATED);
    }
    env.sandbox.restore_personal_token();
    assert_eq!(env.get(&path, PERSONAL_TOKEN).await.0, 200);
}

#[tokio::test]
async fn a_missing_client_header_is_404_before_auth_and_unknown_routes_are_404() {
    let env = start().await;
    let endpoint_not_found =
        json!({"error": true, "message": "API endpoint not found", "code": "ENDPOINT_NOT_FOUND"});
    let without_header =
        env.http.get(env.url("/api/me")).bearer_auth(PERSONAL_TOKEN).send().await.expect("answered");
    assert_eq!(read(without_header).await, (StatusCode::NOT_FOUND, endpoint_not_found.clone()));
    let blank =
        env.http.get(env.url("/api/me")).header("x-tallyfy-client", " ").send().await.expect("answered");
    assert_eq!(read(blank).await, (StatusCode::NOT_FOUND, endpoint_not_found.clone()), "checked before auth");

    assert_eq!(
        env.get("/api/nope", PERSONAL_TOKEN).await,
        (StatusCode::NOT_FOUND, endpoint_not_found.clone())
    );
    assert_eq!(env.get("/api/nope", "garbage").await.0, 404, "routes match before auth");
    let outside = env.http.get(env.url("/nope")).send().await.expect("answered");
    assert_eq!(outside.status(), 404);
    assert!(outside.headers()["content-type"].to_str().expect("ascii").starts_with("text/plain"));

    let forbidden = env.get(&format!("/api/organizations/{OTHER_ORG_ID}/tasks"), PERSONAL_TOKEN).await;
    assert_eq!(forbidden, (StatusCode::FORBIDDEN, json!({"message": "This action is unauthorized."})));
    let unknown = env.get("/api/organizations/ffffffffffffffffffffffffffffffff/tasks", PERSONAL_TOKEN).await;
    assert_eq!(unknown.0, 404);
    let organizations = env.get("/api/me/organizations", PERSONAL_TOKEN).await.1;
    assert_eq!(organizations["data"][0]["id"], ORG_ID);
}

#[tokio::test]
async fn responses_carry_request_ids_and_rate_limit_headers() {
    let env = start().await;
    let echoed =
        env.api(Method::GET, &tasks_path(), PERSONAL_TOKEN).header("x-request-id", "req-42").send().await;
    let echoed = echoed.expect("answered");
    assert_eq!(echoed.headers()["x-request-id"], "req-42");
    assert_eq!(echoed.headers()["x-ratelimit-limit"], "600");
    let first: u32 =
        echoed.headers()["x-ratelimit-remaining"].to_str().expect("ascii").parse().expect("number");
    let second = env.api(Method::GET, "/api/me", PERSONAL_TOKEN).send().await.expect("answered");
    let generated = second.headers()["x-request-id"].to_str().expect("ascii");
    assert_eq!(generated.len(), 32, "a generated id");
    let remaining: u32 =
        second.headers()["x-ratelimit-remaining"].to_str().expect("ascii").parse().expect("number");
    assert_eq!(remaining, first - 1);
}

#[tokio::test]
async fn request_dates_must_use_the_configured_format() {
    let env = start().await;
    let task = json!({"title": "Prepare Q3 report", "task_type": "task", "owners": {"users": [10001], "guests": [], "groups": []},
                      "deadline": "2025-09-30T17:00:00Z", "started_at": "2025-09-01T09:00:00+02:00"});
    let (status, body) = env.send_json(Method::POST, &tasks_path(), PERSONAL_TOKEN, task.clone()).await;
    assert_eq!(status, 422);
    assert_eq!(
        body,
        json!({"message": "The given data was invalid.", "errors": {
            "deadline": ["The deadline does not match the format Y-d-m H:i:s."],
            "started_at": ["The started at does not match the format Y-d-m H:i:s."],
        }})
    );
    let valid = json!({"title": "Prepare Q3 report", "deadline": "2025-30-09 17:00:00", "started_at": "2025-01-09 07:00:00"});
    let (status, created) = env.send_json(Method::POST, &tasks_path(), PERSONAL_TOKEN, valid).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["data"]["deadline"], "2025-09-30T17:00:00.000Z");
    assert_eq!(created["data"]["started_at"], "2025-09-01T07:00:00.000Z");
    let (status, missing) = env.send_json(Method::POST, &tasks_path(), PERSONAL_TOKEN, json!({})).await;
    assert_eq!(status, 422);
    assert_eq!(missing["errors"]["title"][0], "The title field is required.");

    let id = created["data"]["id"].as_str().expect("task id");
    let update = json!({"deadline": "2025-01-10 12:00:00"});
    let (status, updated) =
        env.send_json(Method::PUT, &format!("{}/{id}", tasks_path()), PERSONAL_TOKEN, update).await;
    assert_eq!(
        (status.as_u16(), updated["data"]["deadline"].as_str()),
        (200, Some("2025-10-01T12:00:00.000Z"))
    );

    let broken = env
        .api(Method::POST, &tasks_path(), PERSONAL_TOKEN)
        .body("{not json")
        .send()
        .await
        .expect("answered");
    assert_eq!(broken.status(), 400);
    assert_eq!(read(broken).await.1["error"], true);
}

#[tokio::test]
async fn run_launch_validates_dates_in_steps_prerun_and_taskdata_but_not_free_text() {
    let env = start().await;
    let runs = format!("/api/organizations/{ORG_ID}/runs");
    let [step0, step1, _] = STEP_IDS;
    let iso = json!({"checklist_id": CHECKLIST_ID, "name": "Onboarding - Acme",
                     "prerun": {PRERUN_TEXT_FIELD: "2025-07-01T09:00:00-05:00", PRERUN_DATE_FIELD: "2025-07-01T09:00:00-05:00"},
                     "tasks": {step0: {"deadline": "2025-07-15T17:00:00Z"}}});
    let (status, body) = env.send_json(Method::POST, &runs, PERSONAL_TOKEN, iso).await;
    assert_eq!(status, 422);
    let errors = body["errors"].as_object().expect("errors");
    let mut paths: Vec<&str> = errors.keys().map(String::as_str).collect();
    paths.sort_unstable();
    let mut expected = [format!("prerun.{PRERUN_DATE_FIELD}"), format!("tasks.{step0}.deadline")];
    expected.sort_unstable();
    assert_eq!(paths, expected, "free text is never validated as a date");
    assert_eq!(
        errors[&format!("tasks.{step0}.deadline")][0],
        format!("The tasks.{step0}.deadline does not match the format Y-d-m H:i:s.")
    );

    let launch = json!({"checklist_id": CHECKLIST_ID, "name": "Onboarding - Acme",
                        "prerun": {PRERUN_TEXT_FIELD: "Acme Corp", PRERUN_DATE_FIELD: "2025-01-07 14:00:00"},
                        "tasks": {step1: {"deadline": "2025-15-07 17:00:00"}}});
    let (status, run) = env.send_json(Method::POST, &runs, PERSONAL_TOKEN, launch).await;
    assert_eq!(status, 201, "{run}");
    assert_eq!(run["data"]["prerun"][PRERUN_DATE_FIELD], "2025-07-01T14:00:00.000Z");
    assert_eq!(run["data"]["prerun"][PRERUN_TEXT_FIELD], "Acme Corp");
    let tasks = run["data"]["tasks"]["data"].as_array().expect("tasks");
    assert_eq!(tasks.len(), STEP_IDS.len());
    assert_eq!(tasks[1]["deadline"], "2025-07-15T17:00:00.000Z");

    let run_id = run["data"]["id"].as_str().expect("run id");
    let task_id = tasks[0]["id"].as_str().expect("task id");
    let path = format!("{runs}/{run_id}/tasks/{task_id}");
    let bad = json!({"taskdata": {TASK_DATE_FIELD: "2025-08-15T00:00:00.000Z", TASK_TEXT_FIELD: "2025-08-15T00:00:00.000Z"}});
    let (status, body) = env.send_json(Method::PUT, &path, PERSONAL_TOKEN, bad).await;
    assert_eq!(status, 422);
    assert_eq!(
        body["errors"].as_object().expect("errors").keys().collect::<Vec<_>>(),
        [&format!("taskdata.{TASK_DATE_FIELD}")]
    );
    let good = json!({"deadline": "2025-01-08 10:00:00", "taskdata": {TASK_DATE_FIELD: "2025-15-08 00:00:00", TASK_TEXT_FIELD: "normal text"}});
    let (status, task) = env.send_json(Method::PUT, &path, PERSONAL_TOKEN, good).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["data"]["deadline"], "2025-08-01T10:00:00.000Z");
    assert_eq!(task["data"]["taskdata"][TASK_DATE_FIELD], "2025-08-15T00:00:00.000Z");
    assert_eq!(task["data"]["taskdata"][TASK_TEXT_FIELD], "normal text");

    let wrong_checklist = json!({"checklist_id": "0000", "name": "x"});
    let (status, body) = env.send_json(Method::POST, &runs, PERSONAL_TOKEN, wrong_checklist).await;
    assert_eq!((status.as_u16(), body["errors"]["checklist_id"].is_array()), (422, true));
}

#[tokio::test]
async fn guests_and_a_configured_year_month_day_format() {
    let env = start_with(SandboxConfig {
        request_date_format: "%Y-%m-%d %H:%M:%S".to_owned(),
        ..SandboxConfig::default()
    })
    .await;
    let guests = format!("/api/organizations/{ORG_ID}/guests");
    let guest = json!({"email": "client@acme.com", "first_name": "C", "last_name": "C", "external_date_creation": "2024-11-05 08:30:00"});
    let (status, created) = env.send_json(Method::POST, &guests, PERSONAL_TOKEN, guest).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["data"]["external_date_creation"], "2024-11-05T08:30:00.000Z");
    let spec_format = json!({"email": "other@acme.com", "external_date_creation": "2024-05-11 08:30:00 "});
    let (status, body) = env.send_json(Method::POST, &guests, PERSONAL_TOKEN, spec_format).await;
    assert_eq!(status, 422);
    assert_eq!(
        body["errors"]["external_date_creation"][0],
        "The external date creation does not match the format Y-m-d H:i:s."
    );
}

#[tokio::test]
async fn pagination_links_are_absolute_and_walk_to_the_end() {
    let env = start().await;
    let mut next = Some(env.url(&format!("/api/organizations/{ORG_ID}/runs?per_page=5")));
    let (mut pages, mut seen) = (0, Vec::new());
    while let Some(url) = next {
        let response =
            env.http.get(&url).header("x-tallyfy-client", "c").bearer_auth(PERSONAL_TOKEN).send().await;
        let (status, page) = read(response.expect("answered")).await;
        assert_eq!(status, 200, "{url}");
        pages += 1;
        let meta = &page["meta"]["pagination"];
        assert_eq!(
            (meta["total"].as_u64(), meta["per_page"].as_u64(), meta["total_pages"].as_u64()),
            (Some(12), Some(5), Some(3))
        );
        assert_eq!(meta["current_page"], pages);
        assert_eq!(meta["count"].as_u64(), Some(page["data"].as_array().expect("data").len() as u64));
        seen.extend(page["data"].as_array().expect("data").iter().map(|run| run["id"].clone()));
        if pages > 1 {
            assert_eq!(
                meta["links"]["previous"],
                env.url(&format!("/api/organizations/{ORG_ID}/runs?page={}&per_page=5", pages - 1))
            );
        }
        next = meta["links"]["next"].as_str().map(str::to_owned);
    }
    assert_eq!((pages, seen.len()), (3, SEEDED_RUNS));
    seen.dedup();
    assert_eq!(seen.len(), SEEDED_RUNS, "no run twice");

    let (_, mine) = env
        .get(
            &format!(
                "/api/organizations/{ORG_ID}/me/tasks?status=active&per_page=50&deadline_before=2025-06-30"
            ),
            PERSONAL_TOKEN,
        )
        .await;
    assert_eq!(mine["meta"]["pagination"]["total"], SEEDED_USER_TASKS);
    assert_eq!(mine["meta"]["pagination"]["links"], json!([]), "one page: links is an empty array");
    let (_, capped) = env.get(&format!("{}?per_page=1000", tasks_path()), PERSONAL_TOKEN).await;
    assert_eq!(capped["meta"]["pagination"]["per_page"], 100);
    let (_, default) = env.get(&format!("/api/organizations/{ORG_ID}/me/tasks"), PERSONAL_TOKEN).await;
    assert_eq!(
        (default["data"].as_array().map(Vec::len), default["meta"]["pagination"]["total_pages"].as_u64()),
        (Some(10), Some(3))
    );
}

#[tokio::test]
async fn links_use_the_public_base_url_when_configured() {
    let env = start_with(SandboxConfig {
        public_base_url: Some("https://go.tallyfy.com/".to_owned()),
        ..SandboxConfig::default()
    })
    .await;
    let (_, page) =
        env.get(&format!("/api/organizations/{ORG_ID}/runs?page=1&per_page=10"), PERSONAL_TOKEN).await;
    assert_eq!(
        page["meta"]["pagination"]["links"],
        json!({"next": format!("https://go.tallyfy.com/api/organizations/{ORG_ID}/runs?page=2&per_page=10")})
    );
}

/// A body of `chunks` × 64 KiB with no size hint, so it goes out chunked.
struct Chunked {
    left: usize,
}

impl http_body::Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![(self.left % 251) as u8; 64 * 1024])))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[tokio::test]
async fn uploads_are_hashed_as_they_stream_in() {
    let env = start().await;
    const CHUNKS: usize = 80; // 5 MiB
    let mut expected = Sha256::new();
    for left in (0..CHUNKS).rev() {
        expected.update(vec![(left % 251) as u8; 64 * 1024]);
    }
    let path = format!("/api/organizations/{ORG_ID}/file");
    let response = env
        .api(Method::POST, &path, PERSONAL_TOKEN)
        .body(reqwest::Body::wrap(Chunked { left: CHUNKS }))
        .send()
        .await;
    let (status, body) = read(response.expect("answered")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["size"], 5 * 1024 * 1024);
    assert_eq!(body["data"]["sha256"], hex(&expected.finalize()));
    let received = env.sandbox.received();
    let upload = received.last().expect("recorded");
    assert_eq!(upload.body_len, 5 * 1024 * 1024);
    assert_eq!(upload.body.len(), 1024 * 1024, "only the first MiB is kept");
    assert!(upload.headers.get("content-length").is_none(), "the upload was chunked");
}

#[tokio::test]
async fn downloads_stream_n_deterministic_bytes() {
    let env = start().await;
    let size = 3 * 1024 * 1024 + 17;
    let path = format!("/api/organizations/{ORG_ID}/file/f1/dl?bytes={size}");
    let mut response = env.api(Method::GET, &path, PERSONAL_TOKEN).send().await.expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(size as u64));
    assert_eq!(response.headers()["content-type"], "application/octet-stream");
    let (mut offset, mut chunks) = (0usize, 0);
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        assert!(chunk.iter().enumerate().all(|(i, b)| *b == ((offset + i) % 251) as u8), "bytes at {offset}");
        offset += chunk.len();
        chunks += 1;
    }
    assert_eq!(offset, size);
    assert!(chunks > 1, "delivered in pieces");
}

#[tokio::test]
async fn every_token_fault_applies_to_the_token_endpoint_and_the_mint() {
    let env = start().await;
    let app = env.app_token().await;
    let grant = [
        ("grant_type", "client_credentials"),
        ("client_id", APP_CLIENT_ID),
        ("client_secret", APP_CLIENT_SECRET),
    ];
    let faults: [(TokenFault, u16, &str); 5] = [
        (TokenFault::ServerError, 500, "application/json"),
        (TokenFault::Maintenance, 503, "text/html; charset=UTF-8"),
        (TokenFault::Empty, 200, "application/json"),
        (TokenFault::Garbage, 200, "text/plain"),
        (TokenFault::MissingToken, 200, "application/json"),
    ];
    for (fault, status, content_type) in faults {
        env.sandbox.set_token_fault(Some(fault.clone()));
        for response in [
            env.token(&grant).await,
            env.api(Method::POST, &format!("/api/applications/{ORG_ID}/users/{APP_USER_EMAIL}/token"), &app)
                .send()
                .await
                .expect("answered"),
        ] {
            assert_eq!(response.status(), status, "{fault:?}");
            assert_eq!(response.headers()["content-type"], content_type, "{fault:?}");
            let text = response.text().await.expect("body");
            match fault {
                TokenFault::ServerError => {
                    assert_eq!(serde_json::from_str::<Value>(&text).expect("JSON")["error"], "server_error")
                }
                TokenFault::Maintenance => assert!(text.contains("<html>")),
                TokenFault::Empty => assert!(text.is_empty()),
                TokenFault::Garbage => assert!(serde_json::from_str::<Value>(&text).is_err()),
                _ => {
                    let body: Value = serde_json::from_str(&text).expect("JSON");
                    assert!(body.get("access_token").is_none() && body["token_type"] == "Bearer", "{body}");
                }
            }
        }
    }

    env.sandbox.set_token_fault(Some(TokenFault::Slow(Duration::from_millis(300))));
    let started = Instant::now();
    let (status, body) = read(env.token(&grant).await).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(status == 200 && body["access_token"].is_string(), "slow but correct: {body}");

    env.sandbox.set_token_fault(Some(TokenFault::Drop));
    let dropped = env
        .http
        .post(env.sandbox.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_encode(&grant))
        .send()
        .await;
    assert!(dropped.is_err(), "the connection closed without an answer");
    env.sandbox.set_token_fault(None);
    assert_eq!(env.token(&grant).await.status(), 200);

    let answered: Vec<u16> = env.sandbox.token_requests().iter().map(|r| r.answered).collect();
    assert_eq!(answered, [200, 500, 500, 503, 503, 200, 200, 200, 200, 200, 200, 200, 0, 200]);
    assert!(
        env.sandbox
            .received()
            .iter()
            .all(|r| r.headers.get("x-tallyfy-client").is_some() || r.uri.ends_with("/oauth/token"))
    );
}

#[tokio::test]
async fn revoking_kills_issued_tokens_but_not_the_personal_token() {
    let env = start().await;
    let app = env.app_token().await;
    let user = env.password_grant().await;
    let user_token = user["access_token"].as_str().expect("token");
    let minted = env.mint(&app, APP_USER_EMAIL).await.1["access_token"].as_str().expect("minted").to_owned();
    env.sandbox.revoke_all_tokens();
    assert_eq!(env.get("/api/me", user_token).await.0, 401);
    assert_eq!(env.get("/api/me", &minted).await.0, 401);
    assert_eq!(env.mint(&app, APP_USER_EMAIL).await.0, 401);
    assert_eq!(env.get("/api/me", PERSONAL_TOKEN).await.0, 200);
    let fresh = env.app_token().await;
    assert_eq!(env.mint(&fresh, APP_USER_EMAIL).await.0, 200, "new tokens work again");
}

#[tokio::test]
async fn tokens_expire_by_real_time_and_the_lifetime_changes_at_run_time() {
    let env = start().await;
    env.sandbox.set_token_lifetime(Duration::ZERO);
    let body = env.password_grant().await;
    assert_eq!(body["expires_in"], 0);
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(claims(token)["exp"], claims(token)["iat"]);
    assert_eq!(env.get("/api/me", token).await.0, 401, "now >= exp is expired");
    env.sandbox.set_token_lifetime(Duration::from_secs(90));
    assert_eq!(env.password_grant().await["expires_in"], 90);
}

#[tokio::test]
async fn received_requests_keep_the_raw_target_and_redact_credentials_in_debug() {
    let env = start().await;
    let target = format!("/api/organizations/{ORG_ID}/tasks?q=a%20b&x=%2F&y=%41&z=a+b&empty=&per_page=2");
    let response =
        env.api(Method::GET, &target, PERSONAL_TOKEN).header("cookie", "laravel_session=s3cret").send().await;
    assert_eq!(response.expect("answered").status(), 200);
    let body = json!({"title": "t", "deadline": "2025-30-09 17:00:00"});
    env.send_json(Method::POST, &tasks_path(), PERSONAL_TOKEN, body.clone()).await;
    let received = env.sandbox.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].uri, target);
    assert_eq!(received[0].method, http::Method::GET);
    assert_eq!(received[0].version, http::Version::HTTP_11);
    assert_eq!(received[0].headers["authorization"], format!("Bearer {PERSONAL_TOKEN}").as_str());
    assert_eq!(serde_json::from_slice::<Value>(&received[1].body).expect("JSON body"), body);
    assert_eq!(received[1].body_len, received[1].body.len() as u64);
    let debug = format!("{:?}", received[0]);
    assert!(!debug.contains(PERSONAL_TOKEN) && !debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("[redacted]") && debug.contains("x-tallyfy-client"));
    env.sandbox.clear_received();
    assert!(env.sandbox.received().is_empty());
}

#[tokio::test]
async fn h2c_and_tls_with_alpn_h2_are_served() {
    let env = start().await;
    let h2c = client(reqwest::Client::builder().http2_prior_knowledge());
    let response =
        h2c.get(env.url("/api/me")).header("x-tallyfy-client", "c").bearer_auth(PERSONAL_TOKEN).send().await;
    assert_eq!(response.expect("answered").version(), reqwest::Version::HTTP_2);
    assert_eq!(env.sandbox.received()[0].version, http::Version::HTTP_2);

    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer);
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.expect("leaf cert").der().clone()], key)
        .expect("server cert");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sandbox =
        Sandbox::start_tls(listener, SandboxConfig::default(), Arc::new(tls)).await.expect("TLS sandbox");
    assert!(sandbox.base_url().starts_with("https://127.0.0.1:"));
    let root = reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA pem");
    let https = client(reqwest::Client::builder().tls_certs_only([root]));
    let response = https
        .get(format!("{}/api/me", sandbox.base_url()))
        .header("x-tallyfy-client", "c")
        .bearer_auth(PERSONAL_TOKEN)
        .send()
        .await;
    let response = response.expect("answered over TLS");
    assert_eq!(
        (response.status().as_u16(), response.version()),
        (200, reqwest::Version::HTTP_2),
        "ALPN defaulted to h2"
    );
    assert_eq!(sandbox.received()[0].version, http::Version::HTTP_2);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let env = start().await;
    let addr = env.sandbox.addr();
    assert_eq!(env.get("/api/me", PERSONAL_TOKEN).await.0, 200);
    env.sandbox.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "nothing listens any more");
}

#[tokio::test]
async fn a_rolling_restart_closes_each_open_connection_after_its_next_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start().await;
    let mut stream = tokio::net::TcpStream::connect(env.sandbox.addr()).await.expect("connect");
    let request = format!(
        "GET /api/me HTTP/1.1\r\nHost: a\r\nX-Tallyfy-Client: APIClient\r\nAuthorization: Bearer {PERSONAL_TOKEN}\r\n\r\n"
    );
    let mut buf = vec![0u8; 16 * 1024];
    stream.write_all(request.as_bytes()).await.expect("write");
    let n = stream.read(&mut buf).await.expect("read");
    let first = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(first.starts_with("http/1.1 200") && !first.contains("connection: close"), "{first}");

    env.sandbox.restart_connections();
    stream.write_all(request.as_bytes()).await.expect("the connection is still open");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed after the response")
        .expect("read");
    let second = String::from_utf8_lossy(&rest).to_ascii_lowercase();
    assert!(second.starts_with("http/1.1 200") && second.contains("connection: close"), "{second}");
    let fresh =
        env.http.get(env.url("/api/me")).bearer_auth(PERSONAL_TOKEN).header("x-tallyfy-client", "APIClient");
    assert_eq!(fresh.send().await.expect("new connections are served").status(), 200);
}
