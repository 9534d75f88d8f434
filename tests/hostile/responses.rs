//! What a broken or hostile upstream answer must not do to the caller's connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{access_line, access_log, exchange, short_timers};
use crate::support::{TestConfig, start_proxy};

const WAIT: Duration = Duration::from_secs(5);

/// A raw upstream: reads each request head, records it, answers `response`
/// verbatim and closes.
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    async fn start(response: &'static [u8]) -> Recorder {
        Recorder::answering(|_| response).await
    }

    /// As [`Recorder::start`], with an answer that may name the recorder's own address.
    async fn answering(answer: impl FnOnce(SocketAddr) -> &'static [u8]) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let response = answer(addr);
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    recorded.lock().expect("not poisoned").push(String::from_utf8_lossy(&head).into_owned());
                    let _ = stream.write_all(response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Recorder { addr, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("not poisoned").clone()
    }
}

async fn proxy_to(recorder: &Recorder) -> (tallyfy_proxy::app::Running, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let config =
        short_timers(TestConfig::personal_any(&format!("http://{}", recorder.addr))).parse(dir.path());
    (start_proxy(&config).await, dir)
}

#[tokio::test]
async fn a_response_with_both_length_and_chunking_is_502_never_a_second_response() {
    // `Content-Length: 2` would end the body after `{}`; the rest, an injected
    // response, would reach a keep-alive caller as the answer to its next request.
    const SPLIT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
        Transfer-Encoding: chunked\r\n\r\n4a\r\n{}HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\ninjected\r\n0\r\n\r\n";
    for content_type in ["application/json", "application/octet-stream"] {
        let recorder = Recorder::start(SPLIT).await;
        let (proxy, _dir) = proxy_to(&recorder).await;
        let request = format!(
            "GET /api/me HTTP/1.1\r\nHost: a\r\nAccept: {content_type}\r\n\r\nGET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        let answer = exchange(proxy.proxy_addr(), request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 502, "{}", answer.text());
        assert!(answer.text().contains("upstream_error"), "{}", answer.text());
        assert!(
            !answer.text().contains("injected"),
            "no injected response reached the caller: {}",
            answer.text()
        );
        assert_eq!(answer.text().matches("HTTP/1.1 200").count(), 0, "{}", answer.text());
    }
}

/// A length that is no length is never forwarded (RFC 9110 §8.6; nginx:
/// 502), on an answer with no body too: a `HEAD`'s passed it on as it came,
/// and its connection was used again.
#[tokio::test]
async fn a_head_answer_with_a_length_that_is_no_length_is_502() {
    for length in ["5, 7", "abc", "-1"] {
        let answer =
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n\r\n");
        let recorder = Recorder::start(Box::leak(answer.into_bytes().into_boxed_slice())).await;
        let (proxy, _dir) = proxy_to(&recorder).await;
        let request = b"HEAD /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
        assert_eq!(answer.status(), 502, "{length}: {}", answer.text());
        assert!(!answer.text().contains(length), "{}", answer.text());
    }
}

/// A 429 framed both ways is refused like any such answer: its body was read
/// and passed on, and the 429 remembered against the credential.
#[tokio::test]
async fn a_429_framed_both_ways_is_502_and_not_remembered() {
    const BOTH: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n\
        Retry-After: 60\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let recorder = Recorder::start(BOTH).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let request = b"POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    assert_eq!(answer.status(), 502, "{}", answer.text());
    assert!(answer.text().contains("upstream_error"), "{}", answer.text());
    // Not remembered: the next request goes to Tallyfy (and meets the same answer).
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    assert_eq!(answer.status(), 502, "sent, not held as throttled: {}", answer.text());
    assert_eq!(recorder.heads().len(), 2, "both reached the upstream");
}

#[tokio::test]
async fn a_response_under_a_transfer_coding_other_than_chunked_is_502() {
    // `gzip, chunked`: de-chunked, the body is still gzip, and the caller
    // would get it with no `Content-Encoding` to say so. `chunked, gzip`: the
    // body could only be read until close, chunk sizes and all.
    const GZIP_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: gzip, chunked\r\n\r\n1f\r\n\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xabVJI,IT\xb2\x8a\x8e\xad\x05\x00\x94d\xb2^\x0b\x00\x00\x00\r\n0\r\n\r\n";
    const CHUNKED_GZIP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked, gzip\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    for response in [GZIP_CHUNKED, CHUNKED_GZIP] {
        let recorder = Recorder::start(response).await;
        let (proxy, _dir) = proxy_to(&recorder).await;
        let answer = exchange(
            proxy.proxy_addr(),
            b"GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            WAIT,
        )
        .await;
        assert_eq!(answer.status(), 502, "{}", answer.text());
        assert!(answer.text().contains("upstream_error"), "{}", answer.text());
        assert!(!answer.bytes.windows(2).any(|w| w == b"\x1f\x8b"), "no gzip bytes reached the caller");
        assert!(!answer.text().contains("\r\n2\r\n{}"), "no chunk framing reached the caller");
    }
}

#[tokio::test]
async fn a_redirect_into_tallyfys_api_stays_on_the_proxy_and_tallyfys_cookies_stay_behind() {
    for (status, location, expected) in [
        // Into Tallyfy's API: pointed at the proxy, as the caller named it.
        ("302 Found", "{up}/api/organizations/o/runs?page=2", "http://a/api/organizations/o/runs?page=2"),
        ("201 Created", "{up}/api/organizations/o/runs/r1", "http://a/api/organizations/o/runs/r1"),
        // Its scheme in capitals: Tallyfy all the same. Another port: not Tallyfy.
        ("302 Found", "{UP}/api/me", "http://a/api/me"),
        ("302 Found", "{up}:80/api/me", "{up}:80/api/me"),
        // Elsewhere (a file's storage, a look-alike host): left as it is.
        ("302 Found", "https://files.example/o/f1?sig=x", "https://files.example/o/f1?sig=x"),
        ("302 Found", "{up}.evil.example/api/me", "{up}.evil.example/api/me"),
    ] {
        let recorder = Recorder::answering(|addr| {
            let up = format!("http://{addr}");
            let answer = format!(
                "HTTP/1.1 {status}\r\nLocation: {}\r\nSet-Cookie: tallyfy_session=s3cr3t; path=/; secure; httponly\r\n\
                 Alt-Svc: h3=\":443\"\r\nContent-Length: 0\r\n\r\n",
                location.replace("{up}", &up).replace("{UP}", &up.replacen("http", "HTTP", 1))
            );
            Box::leak(answer.into_bytes().into_boxed_slice())
        })
        .await;
        let up = format!("http://{}", recorder.addr);
        let (proxy, _dir) = proxy_to(&recorder).await;
        // `curl -I -L` follows a HEAD's redirect too.
        for method in ["GET", "HEAD"] {
            let request = format!("{method} /api/me/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let answer = exchange(proxy.proxy_addr(), request.as_bytes(), WAIT).await;
            let text = answer.text();
            let head = text.to_ascii_lowercase();
            let expected = expected.replace("{up}", &up);
            assert!(text.contains(&format!("\r\nlocation: {expected}\r\n")), "{method} {location}: {text}");
            assert!(!head.contains("set-cookie") && !text.contains("s3cr3t"), "{text}");
            assert!(!head.contains("alt-svc"), "{text}");
        }
    }
}

#[tokio::test]
async fn switching_protocols_is_not_tunnelled() {
    const UPGRADE: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw bytes";
    let recorder = Recorder::start(UPGRADE).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let answer = exchange(
        proxy.proxy_addr(),
        b"GET /api/me HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(answer.status(), 502, "{}", answer.text());
    assert!(!answer.text().contains("raw bytes"));
    let head = recorder.heads().pop().expect("forwarded");
    assert!(!head.to_ascii_lowercase().contains("upgrade"), "the caller's Upgrade is hop-by-hop: {head}");
}

#[tokio::test]
async fn the_caller_gets_the_proxys_request_id_and_tallyfys_under_its_own_name() {
    let _capture = access_log();
    const WITH_ID: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: tallyfy-7f3a\r\n\
        Content-Length: 2\r\nConnection: close\r\n\r\n{}";
    let recorder = Recorder::start(WITH_ID).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let answer = exchange(
        proxy.proxy_addr(),
        b"GET /api/me HTTP/1.1\r\nHost: a\r\nX-Request-Id: legacy-777\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    let text = answer.text().to_ascii_lowercase();
    assert!(text.contains("x-request-id: legacy-777\r\n"), "{text}");
    assert!(text.contains("x-upstream-request-id: tallyfy-7f3a\r\n"), "{text}");
    assert_eq!(text.matches("x-request-id:").count(), 1, "one id, the proxy's: {text}");
    let head = recorder.heads().pop().expect("forwarded").to_ascii_lowercase();
    assert!(head.contains("x-request-id: legacy-777\r\n"), "the same id went upstream: {head}");
    let line = access_line("legacy-777").await;
    assert!(line.contains(r#"upstream_request_id="tallyfy-7f3a""#), "{line}");

    // A generated id is the same in all three places too.
    let answer =
        exchange(proxy.proxy_addr(), b"GET /api/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", WAIT)
            .await;
    let text = answer.text();
    let id = text.lines().find_map(|l| l.strip_prefix("x-request-id: ")).expect("an id came back").to_owned();
    let head = recorder.heads().pop().expect("forwarded");
    assert!(head.contains(&format!("x-request-id: {id}\r\n")), "{head}");
    access_line(&format!("request_id=\"{id}\"")).await;
}

/// `status` with a JSON body holding a link into Tallyfy's API, and fields
/// that describe Tallyfy's bytes.
fn json_answer_with_a_link(addr: SocketAddr, status: &str) -> &'static [u8] {
    let body = format!(r#"{{"data":[],"links":{{"next":"http://{addr}/api/runs?page=2"}}}}"#);
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nETag: \"v1\"\r\nAccept-Ranges: bytes\r\n\
         Content-MD5: c3R1Yg==\r\nDigest: sha-256=c3R1Yg==\r\nContent-Range: bytes 0-{last}/{len}\r\n\
         Content-Length: {len}\r\n\r\n{body}",
        last = body.len() - 1,
        len = body.len()
    );
    Box::leak(answer.into_bytes().into_boxed_slice())
}

#[tokio::test]
async fn a_rewritten_body_keeps_no_field_that_describes_tallyfys_bytes() {
    let recorder = Recorder::answering(|addr| json_answer_with_a_link(addr, "200 OK")).await;
    let text = runs_page(&recorder).await;
    assert!(text.contains(r#""next":"http://a/api/runs?page=2""#), "the link was rewritten: {text}");
    let head = text.to_ascii_lowercase();
    assert!(head.contains("\r\netag: w/\"v1\"\r\n"), "a strong ETag promises Tallyfy's bytes: {text}");
    for gone in ["accept-ranges", "content-md5", "digest:"] {
        assert!(!head.contains(gone), "{gone} describes Tallyfy's bytes: {text}");
    }
}

/// What a caller gets, head and body, for `GET /api/runs` (`Host: a`) through a
/// proxy to `recorder`; a 200.
async fn runs_page(recorder: &Recorder) -> String {
    let (proxy, _dir) = proxy_to(recorder).await;
    let request = b"GET /api/runs HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 200, "{text}");
    text
}

/// A 200 answer with the JSON `body` and its length, as the recorder sends it.
fn json_200(body: String) -> &'static [u8] {
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Box::leak(answer.into_bytes().into_boxed_slice())
}

/// An answer serde_json would refuse (200 arrays deep, a number past f64)
/// but JavaScript's `JSON.parse` reads: its link is pointed at the proxy all
/// the same (it used to pass as Tallyfy's, for a caller to follow with its key).
#[tokio::test]
async fn an_answer_past_serde_json_s_limits_keeps_no_link_to_tallyfy() {
    let recorder = Recorder::answering(|addr| {
        json_200(format!(
            r#"{{"total":1e400,"deep":{}{},"next":"http://{addr}/api/runs?page=2"}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ))
    })
    .await;
    let text = runs_page(&recorder).await;
    assert!(text.contains(r#""next":"http://a/api/runs?page=2""#), "the link was rewritten: {text}");
    assert!(text.contains(r#"{"total":1e400,"deep":[[["#), "the rest as it came: {text}");
}

/// Answers JavaScript's `JSON.parse` or Python's `json` read and PHP's
/// `json_decode` refuses, a lone surrogate escape, or a byte order mark before
/// the JSON (a stray one in a PHP file): their links are pointed at the proxy
/// too (they passed as Tallyfy's), and every other byte stays as it came.
#[tokio::test]
async fn answers_with_a_lone_surrogate_or_a_byte_order_mark_keep_no_link_to_tallyfy() {
    for (prefix, extra) in [("", r#","s":"\ud800""#), ("\u{feff}", "")] {
        let recorder = Recorder::answering(move |addr| {
            json_200(format!(r#"{prefix}{{"next":"http://{addr}/api/runs?page=2"{extra}}}"#))
        })
        .await;
        let text = runs_page(&recorder).await;
        let expected = format!(r#"{prefix}{{"next":"http://a/api/runs?page=2"{extra}}}"#);
        assert!(
            text.ends_with(&format!("\r\n\r\n{expected}")),
            "{prefix:?}{extra}: rewritten, the rest as it came: {text}"
        );
    }
}

/// A caller that names no host (HTTP/1.0 without `Host`) gets links and a
/// `Location` pointed at the address it reached, as nginx falls back to its
/// own name: never Tallyfy's, where following one takes its key to Tallyfy.
#[tokio::test]
async fn a_caller_that_names_no_host_gets_links_to_the_address_it_reached() {
    let recorder = Recorder::answering(|addr| json_answer_with_a_link(addr, "200 OK")).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let answer = exchange(proxy.proxy_addr(), b"GET /api/runs HTTP/1.0\r\n\r\n", WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 200, "{text}");
    let reached = format!(r#""next":"http://{}/api/runs?page=2""#, proxy.proxy_addr());
    assert!(text.contains(&reached), "{reached} in {text}");

    let recorder = Recorder::answering(|addr| {
        let answer =
            format!("HTTP/1.1 302 Found\r\nLocation: http://{addr}/api/me\r\nContent-Length: 0\r\n\r\n");
        Box::leak(answer.into_bytes().into_boxed_slice())
    })
    .await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let answer = exchange(proxy.proxy_addr(), b"GET /api/me HTTP/1.0\r\n\r\n", WAIT).await;
    let expected = format!("\r\nlocation: http://{}/api/me\r\n", proxy.proxy_addr());
    assert!(answer.text().contains(&expected), "{}", answer.text());
}

#[tokio::test]
async fn a_partial_answer_is_passed_on_as_it_came() {
    let recorder = Recorder::answering(|addr| json_answer_with_a_link(addr, "206 Partial Content")).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let request = b"GET /api/runs HTTP/1.1\r\nHost: a\r\nRange: bytes=0-\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 206, "{text}");
    let up = format!("http://{}/api/runs?page=2", recorder.addr);
    assert!(text.contains(&up), "the part is Tallyfy's bytes, as its Content-Range counts them: {text}");
    assert!(text.contains("\r\netag: \"v1\"\r\n"), "{text}");
}

#[tokio::test]
async fn a_head_answer_names_no_length_where_the_gets_body_would_be_rewritten() {
    let recorder = Recorder::answering(|addr| json_answer_with_a_link(addr, "200 OK")).await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let request = b"HEAD /api/runs HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 200, "{text}");
    let head = text.to_ascii_lowercase();
    assert!(!head.contains("content-length"), "{text}");
    assert!(head.contains("\r\netag: w/\"v1\"\r\n") && !head.contains("accept-ranges"), "{text}");
}

#[tokio::test]
async fn a_not_modified_answer_names_its_etag_as_the_rewritten_answers_do() {
    let recorder = Recorder::start(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n").await;
    let (proxy, _dir) = proxy_to(&recorder).await;
    let request =
        b"GET /api/runs HTTP/1.1\r\nHost: a\r\nIf-None-Match: W/\"v1\"\r\nConnection: close\r\n\r\n";
    let answer = exchange(proxy.proxy_addr(), request, WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 304, "{text}");
    assert!(text.to_ascii_lowercase().contains("\r\netag: w/\"v1\"\r\n"), "{text}");
}
