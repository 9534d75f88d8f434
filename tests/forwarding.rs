//! The forwarding core, end to end: a real client -> the proxy -> the sandbox
//! Tallyfy, all on loopback.

mod support;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use support::{Stack, raw_request};
use tallyfy_sandbox::fixtures::{ORG_ID, PERSONAL_TOKEN};

#[tokio::test]
async fn the_callers_credentials_are_swapped_for_the_tallyfy_token() {
    let stack = Stack::start().await;
    let response = stack
        .client
        .get(stack.url("/api/me"))
        .header("authorization", "Bearer legacy-app-key")
        .header("cookie", "laravel_session=abc")
        .header("x-api-key", "another-key")
        .header("x-tallyfy-client", "LegacyApp")
        .header("x-custom", "kept")
        .send()
        .await
        .expect("proxy answers");
    assert_eq!(response.status(), 200);

    let received = stack.sandbox.received();
    let upstream = received.last().expect("the sandbox saw the request");
    let h = &upstream.headers;
    assert_eq!(h["authorization"], format!("Bearer {PERSONAL_TOKEN}").as_str());
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(h["x-tallyfy-client"], "APIClient");
    assert_eq!(h["accept"], "*/*", "the caller's Accept is kept");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["host"], stack.sandbox.addr().to_string().as_str());
    assert!(h.get("cookie").is_none() && h.get("x-api-key").is_none());
    let all_values = format!("{:?}", h.iter().map(|(_, v)| v.to_str().unwrap_or("")).collect::<Vec<_>>());
    assert!(!all_values.contains("legacy-app-key") && !all_values.contains("another-key"));
}

#[tokio::test]
async fn accept_json_is_added_when_the_caller_sent_no_accept() {
    let stack = Stack::start().await;
    let response =
        raw_request(stack.proxy.proxy_addr(), "GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await;
    assert_eq!(response.status, 200);
    assert_eq!(stack.sandbox.received().last().expect("forwarded").headers["accept"], "application/json");
}

#[tokio::test]
async fn path_and_query_reach_tallyfy_byte_for_byte() {
    let stack = Stack::start().await;
    let target = format!("/api/organizations/{ORG_ID}/tasks?q=a%20b&x=%2F&y=%41&z=a+b&empty=&per_page=2");
    let request = format!("GET {target} HTTP/1.1\r\nHost: legacy.local\r\nConnection: close\r\n\r\n");
    let response = raw_request(stack.proxy.proxy_addr(), &request).await;
    assert_eq!(response.status, 200, "{response:?}");
    let received = stack.sandbox.received();
    assert_eq!(received.last().expect("forwarded").uri, target);
}

#[tokio::test]
async fn an_email_in_the_path_keeps_its_percent_encoding() {
    let stack = Stack::start().await;
    let target = "/api/applications/x/users/someone%40example.com/token";
    let request =
        format!("POST {target} HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    raw_request(stack.proxy.proxy_addr(), &request).await;
    assert_eq!(stack.sandbox.received().last().expect("forwarded").uri, target);
}

#[tokio::test]
async fn a_multi_megabyte_upload_streams_through() {
    let stack = Stack::start().await;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 128; // 8 MiB, sent chunked with no Content-Length
    let mut expected = Sha256::new();
    let chunks: Vec<bytes::Bytes> = (0..CHUNKS)
        .map(|i| {
            let chunk = bytes::Bytes::from(vec![(i % 251) as u8; CHUNK]);
            expected.update(&chunk);
            chunk
        })
        .collect();
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let response = stack
        .client
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/file")))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("upload answered");
    assert_eq!(response.status(), 201);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["data"]["size"], (CHUNK * CHUNKS) as u64);
    assert_eq!(body["data"]["sha256"], hex(&expected.finalize()));
}

#[tokio::test]
async fn a_multi_megabyte_download_streams_back() {
    let stack = Stack::start().await;
    let size: usize = 16 * 1024 * 1024;
    let response = stack
        .client
        .get(stack.url(&format!("/api/organizations/{ORG_ID}/file/f1/dl?bytes={size}")))
        .send()
        .await
        .expect("download answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(size as u64));
    let mut stream = response.bytes_stream();
    let mut offset = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        for (i, byte) in chunk.iter().enumerate() {
            assert_eq!(*byte, ((offset + i) % 251) as u8, "byte {}", offset + i);
        }
        offset += chunk.len();
    }
    assert_eq!(offset, size);
}

#[tokio::test]
async fn only_api_paths_are_proxied() {
    let stack = Stack::start().await;
    for path in ["/", "/health", "/api", "/apix/me", "/oauth/token"] {
        let response = stack.client.get(stack.url(path)).send().await.expect("answered");
        assert_eq!(response.status(), 404, "{path}");
        let body: serde_json::Value = response.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "not_proxied", "{path}");
    }
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn traversal_absolute_form_and_connect_never_leave_the_proxy() {
    let stack = Stack::start().await;
    let requests = [
        "GET /api/../admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /api/%2e%2e/admin HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /api/me/%252E%252E/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET http://evil.example/api/me HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    ];
    for request in requests {
        let response = raw_request(stack.proxy.proxy_addr(), request).await;
        assert_eq!(response.status, 400, "{request}");
        assert_eq!(response.json()["error"]["code"], "bad_request", "{request}");
    }
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn tallyfy_errors_and_headers_come_back_untouched() {
    let stack = Stack::start().await;
    stack.sandbox.revoke_personal_token();
    let response = stack
        .client
        .get(stack.url("/api/me"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["x-request-id"], "req-42");
    assert_eq!(response.text().await.expect("body"), r#"{"message":"Unauthenticated."}"#);

    stack.sandbox.restore_personal_token();
    let response = stack
        .client
        .get(stack.url(&format!("/api/organizations/{ORG_ID}/tasks")))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-ratelimit-remaining"));
    assert_eq!(response.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn http2_callers_are_served_over_h2c() {
    let stack = Stack::start().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().expect("client");
    let response = h2.get(stack.url("/api/me")).send().await.expect("answered");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let upstream = stack.sandbox.received();
    assert_eq!(upstream.last().expect("forwarded").headers["x-tallyfy-client"], "APIClient");
}

#[tokio::test]
async fn oversized_headers_and_bodies_get_json_errors() {
    let stack = Stack::start_with(|c| {
        c.set("server", "max_headers", 20).set("server", "max_request_body_bytes", 1000)
    })
    .await;
    let mut many = String::new();
    for i in 0..30 {
        many.push_str(&format!("X-Filler-{i}: v\r\n"));
    }
    let response = raw_request(
        stack.proxy.proxy_addr(),
        &format!("GET /api/me HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(response.status, 431);
    assert_eq!(response.json()["error"]["code"], "headers_too_large");

    let declared = stack
        .client
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/file")))
        .body(vec![b'x'; 5000])
        .send()
        .await
        .expect("answered");
    assert_eq!(declared.status(), 413);

    let streamed = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 500]))),
    );
    let response = stack
        .client
        .post(stack.url(&format!("/api/organizations/{ORG_ID}/file")))
        .body(reqwest::Body::wrap_stream(streamed))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "body_too_large");
    let uploads_completed =
        stack.sandbox.received().iter().filter(|r| r.uri.ends_with("/file") && r.body_len > 1000).count();
    assert_eq!(uploads_completed, 0, "no oversized body was delivered whole");
}

#[tokio::test]
async fn the_admin_listener_reports_live_and_ready() {
    let stack = Stack::start().await;
    let admin = stack.proxy.admin_addr();
    for path in ["/livez", "/readyz"] {
        let response = stack.client.get(format!("http://{admin}{path}")).send().await.expect("answered");
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = stack.client.get(format!("http://{admin}/api/me")).send().await.expect("answered");
    assert_eq!(response.status(), 404, "the admin port never proxies");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
