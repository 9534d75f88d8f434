//! Request dates normalised into Tallyfy's request format, end to end against
//! the sandbox (which, like Tallyfy's specification, rejects any other format
//! with 422), and Tallyfy's absolute links pointed back at the proxy.

mod support;

use std::io::Write;

use futures_util::StreamExt as _;

use support::{Credential, Identity, Match, Secret, Stack, TOKEN_ENV, TestConfig, client};
use tallyfy_sandbox::fixtures::{
    CHECKLIST_ID, ORG_ID, PRERUN_DATE_FIELD, PRERUN_TEXT_FIELD, STEP_IDS, TASK_DATE_FIELD, TASK_TEXT_FIELD,
};

fn task_body() -> String {
    r#"{"title":"Prepare Q3 report","task_type":"task","owners":{"users":[],"guests":[],"groups":[]},
 "deadline":"2025-09-30T17:00:00Z","started_at":"2025-09-01T09:00:00+02:00"}"#
        .to_owned()
}

async fn post(
    http: &reqwest::Client,
    url: String,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    http.post(url).header("content-type", content_type).body(body).send().await.expect("answered")
}

/// The same request sent straight to the sandbox, with the headers the proxy
/// would add: Tallyfy's answer to a legacy app without the proxy.
async fn direct(stack: &Stack, method: reqwest::Method, path: &str, body: &str) -> u16 {
    stack
        .client
        .request(method, format!("{}{path}", stack.sandbox.base_url()))
        .header("authorization", format!("Bearer {}", tallyfy_sandbox::fixtures::PERSONAL_TOKEN))
        .header("x-tallyfy-client", "APIClient")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("answered")
        .status()
        .as_u16()
}

#[tokio::test]
async fn iso_dates_are_accepted_through_the_proxy_and_refused_directly() {
    let stack = Stack::start().await;
    let http = &stack.client;
    let tasks = format!("/api/organizations/{ORG_ID}/tasks");

    let direct = http
        .post(format!("{}{tasks}", stack.sandbox.base_url()))
        .header("authorization", format!("Bearer {}", tallyfy_sandbox::fixtures::PERSONAL_TOKEN))
        .header("x-tallyfy-client", "APIClient")
        .header("content-type", "application/json")
        .body(task_body())
        .send()
        .await
        .expect("answered");
    assert_eq!(direct.status(), 422, "Tallyfy refuses ISO dates");

    let proxied = post(http, stack.url(&tasks), "application/json", task_body()).await;
    assert_eq!(proxied.status(), 201);
    let sent = stack.sandbox.received().last().expect("forwarded").body.clone();
    let expected = task_body()
        .replace("2025-09-30T17:00:00Z", "2025-30-09 17:00:00")
        .replace("2025-09-01T09:00:00+02:00", "2025-01-09 07:00:00");
    assert_eq!(String::from_utf8_lossy(&sent), expected, "only the date values changed, byte for byte");
    let created: serde_json::Value = proxied.json().await.expect("JSON");
    assert_eq!(created["data"]["deadline"], "2025-09-30T17:00:00.000Z");
}

#[tokio::test]
async fn a_launch_with_prerun_and_step_deadlines_and_a_task_update_with_taskdata() {
    let stack = Stack::start().await;
    let http = &stack.client;
    let launch = format!(
        r#"{{"checklist_id":"{CHECKLIST_ID}","name":"Onboarding - Acme",
            "prerun":{{"{PRERUN_TEXT_FIELD}":"Acme Corp","{PRERUN_DATE_FIELD}":"2025-07-01T09:00:00-05:00"}},
            "tasks":{{"{}":{{"deadline":"2025-07-15T17:00:00Z"}}}}}}"#,
        STEP_IDS[0]
    );
    let runs = format!("/api/organizations/{ORG_ID}/runs");
    assert_eq!(direct(&stack, reqwest::Method::POST, &runs, &launch).await, 422, "refused directly");
    let response = post(http, stack.url(&runs), "application/json", launch).await;
    assert_eq!(response.status(), 201);
    let sent =
        String::from_utf8(stack.sandbox.received().last().expect("forwarded").body.to_vec()).expect("utf-8");
    assert!(sent.contains("\"2025-01-07 14:00:00\"") && sent.contains("\"2025-15-07 17:00:00\""), "{sent}");
    assert!(sent.contains("\"Acme Corp\""), "free text untouched");

    let run: serde_json::Value = response.json().await.expect("JSON");
    let run_id = run["data"]["id"].as_str().expect("run id");
    let task_id = run["data"]["tasks"]["data"][0]["id"].as_str().expect("task id");
    let update = format!(
        r#"{{"deadline":"2025-08-01T12:00:00+02:00","taskdata":{{"{TASK_DATE_FIELD}":"2025-08-15T00:00:00.000Z","{TASK_TEXT_FIELD}":"normal text"}}}}"#
    );
    let task_path = format!("/api/organizations/{ORG_ID}/runs/{run_id}/tasks/{task_id}");
    assert_eq!(direct(&stack, reqwest::Method::PUT, &task_path, &update).await, 422, "refused directly");
    let updated = http
        .put(stack.url(&task_path))
        .header("content-type", "application/json")
        .body(update)
        .send()
        .await
        .expect("answered");
    assert_eq!(updated.status(), 200);
    let sent =
        String::from_utf8(stack.sandbox.received().last().expect("forwarded").body.to_vec()).expect("utf-8");
    assert!(sent.contains("\"2025-01-08 10:00:00\"") && sent.contains("\"2025-15-08 00:00:00\""), "{sent}");
}

#[tokio::test]
async fn guests_forms_and_gzip_bodies_are_rewritten() {
    let stack = Stack::start().await;
    let http = &stack.client;
    let guest = r#"{"email":"client@acme.com","first_name":"C","last_name":"C","external_date_creation":"2024-11-05T08:30:00Z"}"#;
    let guests = format!("/api/organizations/{ORG_ID}/guests");
    assert_eq!(direct(&stack, reqwest::Method::POST, &guests, guest).await, 422, "refused directly");
    let response = post(http, stack.url(&guests), "application/json", guest).await;
    assert_eq!(response.status(), 201);
    let sent =
        String::from_utf8_lossy(&stack.sandbox.received().last().expect("forwarded").body).into_owned();
    assert!(sent.contains("\"2024-05-11 08:30:00\""), "{sent}");

    let form = "title=Form+task&deadline=2025-09-30T17%3A00%3A00Z&note=2025-09-30T17%3A00%3A00Z";
    post(
        http,
        stack.url(&format!("/api/organizations/{ORG_ID}/tasks")),
        "application/x-www-form-urlencoded",
        form,
    )
    .await;
    let sent =
        String::from_utf8(stack.sandbox.received().last().expect("forwarded").body.to_vec()).expect("utf-8");
    assert_eq!(sent, "title=Form+task&deadline=2025-30-09+17%3A00%3A00&note=2025-09-30T17%3A00%3A00Z");

    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(task_body().as_bytes()).expect("gzip");
    let response = http
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/tasks")))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip.finish().expect("gzip"))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 201, "decoded, rewritten and sent decoded");
    let forwarded = stack.sandbox.received().last().expect("forwarded").clone();
    assert!(forwarded.headers.get("content-encoding").is_none());
    assert!(String::from_utf8_lossy(&forwarded.body).contains("2025-30-09 17:00:00"));
}

/// Bodies Laravel reads as JSON (`isJson`: any content type saying `/json` or
/// `+json`) and form names PHP folds into a date field's are rewritten too:
/// they reached Tallyfy unrewritten, its `2025-03-04` read as 3 April.
#[tokio::test]
async fn bodies_and_names_as_laravel_reads_them_are_rewritten() {
    let stack = Stack::start().await;
    let http = &stack.client;
    let tasks = stack.url(&format!("/api/organizations/{ORG_ID}/tasks"));
    for content_type in ["text/json", "application/vnd.api+json; charset=utf-8", "TEXT/JSON"] {
        post(http, tasks.clone(), content_type, r#"{"title":"T","deadline":"2025-03-04 10:00:00"}"#).await;
        let sent = stack.sandbox.received().last().expect("forwarded").body.clone();
        assert_eq!(
            String::from_utf8_lossy(&sent),
            r#"{"title":"T","deadline":"2025-04-03 10:00:00"}"#,
            "{content_type}"
        );
    }
    let form = "title=T&+deadline=2025-03-04+10%3A00%3A00&started.at=2025-03-04&deadline%00x=2025-03-04";
    post(http, tasks.clone(), "application/x-www-form-urlencoded", form).await;
    let sent = stack.sandbox.received().last().expect("forwarded").body.clone();
    assert_eq!(
        String::from_utf8_lossy(&sent),
        "title=T&+deadline=2025-04-03+10%3A00%3A00&started.at=2025-04-03+00%3A00%3A00&deadline%00x=2025-04-03+00%3A00%3A00"
    );
}

/// Symfony reads a `PUT`, `PATCH` or `DELETE` body as a form when its
/// content type only starts with `application/x-www-form-urlencoded` (and
/// Laravel as JSON only for a lower-case `/json` or `+json`): its dates are
/// Tallyfy's to read, and were sent unconverted.
#[tokio::test]
async fn a_put_patch_or_delete_form_known_by_the_start_of_its_type_is_rewritten() {
    let stack = Stack::start().await;
    let task = stack.url(&format!("/api/organizations/{ORG_ID}/tasks/t1"));
    let types = ["application/x-www-form-urlencodedUTF8", "application/x-www-form-urlencoded-v2+JSON"];
    for (method, content_type) in [reqwest::Method::PUT, reqwest::Method::PATCH, reqwest::Method::DELETE]
        .into_iter()
        .zip(types.iter().cycle())
    {
        stack
            .client
            .request(method.clone(), task.clone())
            .header("content-type", *content_type)
            .body("deadline=2025-03-04+10%3A00%3A00")
            .send()
            .await
            .expect("answered");
        let sent = stack.sandbox.received().last().expect("forwarded").body.clone();
        assert_eq!(
            String::from_utf8_lossy(&sent),
            "deadline=2025-04-03+10%3A00%3A00",
            "{method} {content_type}"
        );
    }
}

#[tokio::test]
async fn bodies_without_dates_and_invalid_json_pass_as_the_very_same_bytes() {
    let stack = Stack::start().await;
    let http = &stack.client;
    let tasks = stack.url(&format!("/api/organizations/{ORG_ID}/tasks"));
    for body in [
        "{ \"title\" : \"No dates\",\n  \"deadline\": \"2025-30-09 17:00:00\", \"n\": 1.50e2 }",
        "{\"title\": \"broken\", \"deadline\": \"2025-09-30T17:00:00Z\"",
    ] {
        post(http, tasks.clone(), "application/json", body).await;
        assert_eq!(stack.sandbox.received().last().expect("forwarded").body, body.as_bytes());
    }
    let metrics = support::scrape(stack.proxy.admin_addr()).await;
    assert!(metrics.contains("tallyfy_proxy_bodies_invalid_total 1"), "{metrics}");
}

/// A deflate body with bytes after its stream is not one body: it goes as it
/// came (as a gzip body with bytes after its member does). It used to be
/// rewritten from its stream alone and sent decoded, the bytes after it dropped.
#[tokio::test]
async fn a_deflate_body_with_bytes_after_its_stream_goes_as_it_came() {
    let stack = Stack::start().await;
    let mut deflate = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    deflate.write_all(br#"{"title":"T","deadline":"2025-09-30T17:00:00Z"}"#).expect("deflate");
    let sent = [deflate.finish().expect("deflate").as_slice(), br#"{"deadline":"2025-03-04"}"#].concat();
    stack
        .client
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/tasks")))
        .header("content-type", "application/json")
        .header("content-encoding", "deflate")
        .body(sent.clone())
        .send()
        .await
        .expect("answered");
    let forwarded = stack.sandbox.received().last().expect("forwarded").clone();
    assert_eq!(forwarded.body, sent, "the very same bytes");
    assert_eq!(forwarded.headers.get("content-encoding").map(|v| v.as_bytes()), Some(&b"deflate"[..]));
}

#[tokio::test]
async fn a_body_too_large_to_rewrite_is_refused_only_when_it_holds_dates() {
    let stack = Stack::start_with(|c| c.set("dates", "max_body_bytes", 1024)).await;
    let http = &stack.client;
    let file = stack.url(&format!("/api/organizations/{ORG_ID}/tasks"));
    let padding = "x".repeat(4096);
    let with_dates = format!(r#"{{"deadline":"2025-09-30T17:00:00Z","notes":"{padding}"}}"#);
    let response = post(http, file.clone(), "application/json", with_dates).await;
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "body_too_large_for_dates");
    assert!(stack.sandbox.received().is_empty(), "nothing half-sent");

    let form = format!("deadline=2025-09-30T17%3A00%3A00Z&notes={padding}");
    let response = post(http, file.clone(), "application/x-www-form-urlencoded", form).await;
    assert_eq!(response.status(), 413, "a form body too");

    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(format!(r#"{{"deadline":"2025-09-30T17:00:00Z","notes":"{padding}"}}"#).as_bytes())
        .expect("gzip");
    let compressed = gzip.finish().expect("gzip");
    assert!(compressed.len() < 1024, "small on the wire, large once inflated");
    let response = http
        .post(file.clone())
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 413, "a gzip body that inflates past the limit");
    assert!(stack.sandbox.received().is_empty(), "nothing half-sent");

    // Deflate in stored blocks: past the limit on the wire too, its start
    // (a zlib stream cut off) decodes as far as it goes. It used to decode as
    // nothing, and the form went with its date unconverted.
    // In small stored blocks (twice its size: the start read inflates to less
    // than the limit), sent in two parts so the proxy reads a start just
    // past its limit.
    let mut stored = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::none());
    let form = format!("deadline=2025-09-30T17%3A00%3A00Z&notes={padding}");
    for piece in form.as_bytes().chunks(16) {
        stored.write_all(piece).expect("deflate");
        stored.flush().expect("a block of its own");
    }
    let stored = bytes::Bytes::from(stored.finish().expect("deflate"));
    let (start, rest) = (stored.slice(..1100), stored.slice(1100..));
    let parts = futures_util::stream::iter([(start, 0), (rest, 300)]).then(|(part, after_ms)| async move {
        tokio::time::sleep(std::time::Duration::from_millis(after_ms)).await;
        Ok::<_, std::io::Error>(part)
    });
    let response = http
        .put(file.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "deflate")
        .body(reqwest::Body::wrap_stream(parts))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 413, "a deflate body past the limit as it came");
    assert!(stack.sandbox.received().is_empty(), "nothing half-sent");

    let without = format!(r#"{{"title":"big","notes":"{padding}"}}"#);
    post(http, file, "application/json", without.clone()).await;
    assert_eq!(stack.sandbox.received().last().expect("forwarded").body, without.as_bytes());
}

#[tokio::test]
async fn an_identity_already_speaking_ydm_is_not_swapped_twice() {
    let stack = Stack::start().await; // its identity reads naive dates year-month-day
    let tasks = stack.url(&format!("/api/organizations/{ORG_ID}/tasks"));
    // "2025-03-04 10:00:00" is 4 March in YMD: sent as 2025-04-03.
    post(&stack.client, tasks, "application/json", r#"{"title":"t","deadline":"2025-03-04 10:00:00"}"#).await;
    let sent =
        String::from_utf8_lossy(&stack.sandbox.received().last().expect("forwarded").body).into_owned();
    assert!(sent.contains("2025-04-03 10:00:00"), "{sent}");

    let ydm = TestConfig::new(&stack.sandbox.base_url())
        .credential(Credential::personal("ops", Secret::Env(TOKEN_ENV)))
        .identity(Identity::new("local-app", "ops", Match::Any).with("date_input_order", "ydm"));
    let dir = tempfile::tempdir().expect("dir");
    let proxy = support::start_proxy(&ydm.parse(dir.path())).await;
    let url = format!("http://{}/api/organizations/{ORG_ID}/tasks", proxy.proxy_addr());
    let response =
        post(&client(), url, "application/json", r#"{"title":"t","deadline":"2025-03-04 10:00:00"}"#).await;
    assert_eq!(response.status(), 201);
    let sent =
        String::from_utf8_lossy(&stack.sandbox.received().last().expect("forwarded").body).into_owned();
    assert!(sent.contains("2025-03-04 10:00:00"), "already in the request format: unchanged: {sent}");
}

#[tokio::test]
async fn following_links_next_never_leaves_the_proxy() {
    let stack = Stack::start().await;
    let proxy_base = format!("http://{}", stack.proxy.proxy_addr());
    for gzip in [false, true] {
        let mut next = Some(format!("{proxy_base}/api/organizations/{ORG_ID}/runs?per_page=5"));
        let (mut pages, mut runs) = (0, 0);
        while let Some(url) = next {
            assert!(url.starts_with(&proxy_base), "link points at the proxy: {url}");
            let mut request = stack.client.get(&url);
            if gzip {
                request = request.header("accept-encoding", "gzip");
            }
            let response = request.send().await.expect("answered");
            assert_eq!(response.status(), 200);
            assert!(response.headers().get("content-encoding").is_none(), "sent decoded after rewriting");
            let page: serde_json::Value = response.json().await.expect("JSON");
            runs += page["data"].as_array().expect("data").len();
            pages += 1;
            next = page["meta"]["pagination"]["links"]["next"].as_str().map(str::to_owned);
        }
        assert_eq!((pages, runs), (3, tallyfy_sandbox::fixtures::SEEDED_RUNS), "gzip: {gzip}");
    }
    let direct =
        stack.sandbox.received().iter().filter(|r| !r.headers.contains_key("x-tallyfy-client")).count();
    assert_eq!(direct, 0, "every request came through the proxy");
}
