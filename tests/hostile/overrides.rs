//! A `methods` policy judged by the method Tallyfy (Laravel) will act on.

use std::time::Duration;

use tallyfy_sandbox::fixtures::ORG_ID;

use super::{exchange, keyed_identity, stack, stack_with_identities};
use crate::support::Identity;

const WAIT: Duration = Duration::from_secs(5);

/// `narrow` (key `k`) may GET and POST; `editor` (key `e`) may PUT too.
fn identities() -> [Identity; 2] {
    [
        keyed_identity("narrow", "k").with("methods", vec!["GET", "POST"]),
        keyed_identity("editor", "e").with("methods", vec!["GET", "POST", "PUT"]),
    ]
}

fn post(target: &str, key: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {target} HTTP/1.1\r\nHost: a\r\nX-Api-Key: {key}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[tokio::test]
async fn override_headers_are_stripped_for_every_identity() {
    let stack = stack().await;
    let body = r#"{"title":"t"}"#;
    let request = format!(
        "POST /api/organizations/{ORG_ID}/tasks HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
         X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(stack.proxy.proxy_addr(), request.as_bytes(), WAIT).await;
    assert!(answer.status() < 500, "{}", answer.text());
    let received = stack.sandbox.received();
    let upstream = received.last().expect("forwarded");
    assert_eq!(upstream.method, http::Method::POST);
    for name in ["x-http-method-override", "x-http-method", "x-method-override"] {
        assert!(!upstream.headers.contains_key(name), "{name} reached Tallyfy");
    }
}

#[tokio::test]
async fn a_refused_method_in_query_form_or_json_is_refused_and_never_sent() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let tasks = format!("/api/organizations/{ORG_ID}/tasks");
    let form = "application/x-www-form-urlencoded";
    let cases: Vec<(String, &str, Vec<u8>)> = vec![
        (format!("{tasks}?_method=DELETE"), "application/json", br#"{"title":"t"}"#.to_vec()),
        (format!("{tasks}?%5Fmethod=delete"), "application/json", br#"{"title":"t"}"#.to_vec()),
        // PHP with `arg_separator.input = "&;"` reads a DELETE here.
        (format!("{tasks}?x=1;_method=DELETE"), "application/json", br#"{"a":1}"#.to_vec()),
        (tasks.clone(), form, b"title=t&_method=DELETE".to_vec()),
        (tasks.clone(), form, b"%5Fmethod=DELETE".to_vec()),
        (tasks.clone(), form, b".method=delete".to_vec()),
        (tasks.clone(), form, b"+.method=PATCH".to_vec()),
        (tasks.clone(), "application/json", br#"{"title":"t","_method":"DELETE"}"#.to_vec()),
        (tasks.clone(), "application/json", br#"{"\u005fmethod":"delete"}"#.to_vec()),
        (tasks.clone(), "text/json; charset=utf-8", br#"{"_method":"PATCH"}"#.to_vec()),
        // A form content type that also says JSON: Laravel reads the body as JSON.
        (tasks.clone(), "application/x-www-form-urlencoded; x=/json", br#"{"_method":"DELETE"}"#.to_vec()),
    ];
    for (target, content_type, body) in &cases {
        let answer = exchange(addr, &post(target, "k", content_type, body), WAIT).await;
        assert!(
            [400, 403].contains(&answer.status()),
            "{target} {}: {}",
            String::from_utf8_lossy(body),
            answer.text()
        );
    }
    assert!(sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn an_override_that_cannot_be_read_is_refused() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let tasks = format!("/api/organizations/{ORG_ID}/tasks");
    let form = "application/x-www-form-urlencoded";
    for (content_type, body) in [
        (form, &b"_method[]=DELETE"[..]),
        (form, b"_method=DEL%20ETE"),
        (form, b"_method="),
        ("application/json", br#"{"_method":5}"#),
        ("application/json", br#"{"_method":"DELETE""#),
    ] {
        let answer = exchange(addr, &post(&tasks, "k", content_type, body), WAIT).await;
        assert_eq!(answer.status(), 400, "{}: {}", String::from_utf8_lossy(body), answer.text());
        assert!(answer.text().contains("method_override_unreadable"), "{}", answer.text());
    }
    assert!(sandbox.received().is_empty());
}

#[tokio::test]
async fn allowed_overrides_and_plain_posts_are_forwarded_untouched() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let tasks = format!("/api/organizations/{ORG_ID}/tasks");
    let answer =
        exchange(addr, &post(&tasks, "e", "application/x-www-form-urlencoded", b"title=t&_method=PUT"), WAIT)
            .await;
    assert_ne!(answer.status(), 403, "editor may PUT: {}", answer.text());
    let plain = br#"{"title":"Prepare Q3 report","task_type":"task"}"#;
    let answer = exchange(addr, &post(&tasks, "k", "application/json", plain), WAIT).await;
    assert!(![400, 403].contains(&answer.status()) && answer.status() < 500, "forwarded: {}", answer.text());
    let received = sandbox.received();
    assert_eq!(received.len(), 2);
    assert_eq!(&received[0].body[..], b"title=t&_method=PUT");
    assert_eq!(&received[1].body[..], plain, "byte for byte");
}

#[tokio::test]
async fn a_compressed_form_goes_as_judged_or_not_at_all_so_its_raw_bytes_hide_no_method() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let tasks = format!("/api/organizations/{ORG_ID}/tasks");
    let hex = |text: &str| -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
    };
    // A gzip stream whose header's file name (FNAME) is `&_method=DELETE&`:
    // decoded, the body is `title=t`; PHP, splitting the raw bytes on `&`,
    // finds `_method=DELETE`.
    let gzip =
        hex("1f8b08080000000000ff265f6d6574686f643d44454c45544526002bc92cc949b52d0100308f8ea407000000");
    // A zlib stream of `title=t`, then `&_method=DELETE` after its end.
    let deflate = hex("789c2bc92cc949b52d01000bba02d4265f6d6574686f643d44454c455445");
    let request = |coding: &str, body: &[u8]| {
        let mut request = format!(
            "POST {tasks} HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Encoding: {coding}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    let answer = exchange(addr, &request("gzip", &gzip), WAIT).await;
    assert!(answer.status() < 500 && answer.status() != 403, "gzip: {}", answer.text());
    let received = sandbox.received();
    assert_eq!(received.len(), 1, "forwarded, as judged");
    assert_eq!(&received[0].body[..], b"title=t", "the decoded body, the one judged");
    assert!(!received[0].headers.contains_key("content-encoding"));
    assert_eq!(received[0].headers["content-length"], "7");
    // Bytes after a deflate stream make it no one body: it cannot be judged.
    let answer = exchange(addr, &request("deflate", &deflate), WAIT).await;
    assert_eq!(answer.status(), 400, "deflate: {}", answer.text());
    assert!(answer.text().contains("method_override_unreadable"), "{}", answer.text());
    assert_eq!(sandbox.received().len(), 1, "nothing more forwarded");
}

fn multipart(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"name\"; filename=\"a.txt\"\r\n\r\nhello\r\n--XyZ--\r\n");
    body
}

#[tokio::test]
async fn a_multipart_override_is_judged_as_the_upload_streams() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let file = format!("/api/organizations/{ORG_ID}/file");
    let content_type = "multipart/form-data; boundary=XyZ";

    let refused = multipart(&[("subject_type", "Run"), ("_method", "DELETE")]);
    let answer = exchange(addr, &post(&file, "k", content_type, &refused), WAIT).await;
    assert_eq!(answer.status(), 403, "{}", answer.text());
    for upstream in sandbox.received() {
        let seen = String::from_utf8_lossy(&upstream.body);
        assert!(
            !seen.contains("_method") && !seen.contains("DELETE"),
            "the override part never left: {seen:?}"
        );
        assert!(upstream.body_len < refused.len() as u64, "Tallyfy never had the complete request");
    }

    let allowed = multipart(&[("subject_type", "Run"), ("_method", "POST")]);
    let answer = exchange(addr, &post(&file, "k", content_type, &allowed), WAIT).await;
    assert_eq!(answer.status(), 201, "{}", answer.text());
    let last = sandbox.received().pop().expect("forwarded");
    assert_eq!(last.body_len, allowed.len() as u64);
    assert_eq!(&last.body[..], &allowed[..], "byte for byte");
}

#[tokio::test]
async fn multipart_parts_php_would_read_as_method_are_judged_in_every_spelling() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let file = format!("/api/organizations/{ORG_ID}/file");
    let content_type = "multipart/form-data; boundary=XyZ";
    let bodies: [&[u8]; 9] = [
        b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\r\nContent-Disposition: form-data; name=x;\r\nname=_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\0\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\0x\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"AAAA--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
        // PHP's `php_ap_getword` takes a run of `=` as one separator, and C's
        // `isspace` (a vertical tab) separates pairs and ends a value.
        b"--XyZ\r\nContent-Disposition: form-data; name==_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\r\nContent-Disposition: form-data;\x0bname=_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\r\nContent-Disposition: form-data; name=\x0b_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
        b"--XyZ\r\nContent-Disposition: form-data; name=_method\x0bjunk\r\n\r\nDELETE\r\n--XyZ--\r\n",
    ];
    for body in bodies {
        let answer = exchange(addr, &post(&file, "k", content_type, body), WAIT).await;
        assert_eq!(answer.status(), 403, "{}: {}", String::from_utf8_lossy(body), answer.text());
    }
    for upstream in sandbox.received() {
        assert!(!String::from_utf8_lossy(&upstream.body).contains("DELETE"), "the override never left");
    }
    let compressed = exchange(
        addr,
        &format!(
            "POST {file} HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nContent-Type: {content_type}\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        )
        .into_bytes(),
        WAIT,
    )
    .await;
    assert_eq!(compressed.status(), 400, "a compressed multipart cannot be judged: {}", compressed.text());
}

/// PHP reads multipart lines through a 5,120-byte buffer: a line whose line feed
/// is 5,120 bytes in comes back as 5,120 bytes and then an empty line, which ends
/// the part's headers. Both bodies make PHP read `_method` as DELETE while a
/// reader that took the long line whole would judge POST, or no override at all.
#[tokio::test]
async fn multipart_lines_php_reads_in_pieces_are_refused_at_the_exact_length() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let file = format!("/api/organizations/{ORG_ID}/file");
    let content_type = "multipart/form-data; boundary=B";
    let header_line = [
        &b"--B\r\nContent-Disposition: form-data; name=\"_method\"\r\nX: "[..],
        &[b'a'; 5116],
        b"\r\nDELETE\r\n--B\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nPOST\r\n--B--\r\n",
    ]
    .concat();
    let boundary_line = [
        &b"--B\0"[..],
        &[b'a'; 5116],
        b"Content-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--B--\r\n",
    ]
    .concat();
    for body in [header_line, boundary_line] {
        let answer = exchange(addr, &post(&file, "k", content_type, &body), WAIT).await;
        assert_eq!(answer.status(), 400, "{}", answer.text());
        assert!(answer.text().contains("method_override_unreadable"), "{}", answer.text());
    }
    for upstream in sandbox.received() {
        assert!(!String::from_utf8_lossy(&upstream.body).contains("DELETE"), "the override never left");
    }
}

#[tokio::test]
async fn a_multipart_override_is_refused_on_a_reused_upstream_connection_too() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let addr = proxy.proxy_addr();
    let file = format!("/api/organizations/{ORG_ID}/file");
    let content_type = "multipart/form-data; boundary=XyZ";
    let refused = multipart(&[("subject_type", "Run"), ("_method", "DELETE")]);
    let mut chunked = format!(
        "POST {file} HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nContent-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        refused.len()
    )
    .into_bytes();
    chunked.extend_from_slice(&refused);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let me = b"GET /api/me HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nConnection: close\r\n\r\n";
    for upload in [post(&file, "k", content_type, &refused), chunked] {
        // An exchange first, so that the upload goes on a pooled connection.
        assert_eq!(exchange(addr, me, WAIT).await.status(), 200);
        let before = sandbox.received().len();
        let answer = exchange(addr, &upload, WAIT).await;
        assert_eq!(answer.status(), 403, "{}", answer.text());
        for upstream in &sandbox.received()[before..] {
            assert!(upstream.method != http::Method::POST || upstream.body_len < refused.len() as u64);
            assert!(!String::from_utf8_lossy(&upstream.body).contains("DELETE"), "the override never left");
        }
    }
}

/// Over HTTP/2 a field value may keep white space at its ends (HTTP/1 parsing
/// drops it); a server in front of Tallyfy trims it, so a form read as opaque
/// here would be a form there. The values the review sent, each with a
/// `_method` the identity may not use, over one h2c connection.
#[tokio::test]
async fn a_content_type_with_white_space_at_its_ends_is_refused_over_http2() {
    let (sandbox, proxy, _dir) = stack_with_identities(identities()).await;
    let tcp = tokio::net::TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2c handshake");
    tokio::spawn(connection);
    let tasks = format!("http://a/api/organizations/{ORG_ID}/tasks");
    let send = |content_type: &'static str, body: Vec<u8>| {
        let client = client.clone();
        let request = http::Request::post(&tasks)
            .header("x-api-key", "k")
            .header("content-type", content_type)
            .body(())
            .expect("request");
        async move {
            let mut client = client.ready().await.expect("ready");
            let (response, mut stream) = client.send_request(request, false).expect("sent");
            stream.send_data(body.into(), true).expect("body");
            response.await.expect("answered").status()
        }
    };
    let form = b"_method=DELETE".to_vec();
    let parts = multipart(&[("_method", "DELETE")]);
    for (content_type, body) in [
        (" application/x-www-form-urlencoded", form.clone()),
        ("application/x-www-form-urlencoded\t", form.clone()),
        ("\tapplication/x-www-form-urlencoded ", form.clone()),
        (" multipart/form-data; boundary=XyZ", parts.clone()),
    ] {
        assert_eq!(send(content_type, body).await, 400, "{content_type:?}");
    }
    assert!(sandbox.received().is_empty(), "nothing reached Tallyfy: {:?}", sandbox.received());
    assert_eq!(send("application/x-www-form-urlencoded", form).await, 403, "judged when plain");
    send("application/x-www-form-urlencoded", b"title=t".to_vec()).await;
    assert_eq!(sandbox.received().len(), 1, "and a form without an override is sent");
    // HTTP/1 parsing trims the same value: judged as a form.
    let path = format!("/api/organizations/{ORG_ID}/tasks");
    let http1 = post(&path, "k", "application/x-www-form-urlencoded\t", b"_method=DELETE");
    let answer = exchange(proxy.proxy_addr(), &http1, WAIT).await;
    assert_eq!(answer.status(), 403, "{}", answer.text());
    assert_eq!(sandbox.received().len(), 1);
}
