//! Request smuggling: heads whose body framing two HTTP implementations could
//! read differently, and malformed `Host`s.

use std::time::Duration;

use tallyfy_sandbox::fixtures::ORG_ID;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{exchange, read_response, read_until_closed, stack};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn content_length_beside_transfer_encoding_is_refused_and_the_connection_closed() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    // Each carries a second, smuggled request after the chunked body's end.
    let smuggled = "GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n";
    for head in [
        "POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        "POST /api/me HTTP/1.1\r\nHost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n",
    ] {
        let request = format!("{head}0\r\n\r\n{smuggled}");
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 400, "{head:?}: {}", answer.text());
        assert!(answer.text().contains("ambiguous_length"), "{}", answer.text());
        assert!(answer.text().to_ascii_lowercase().contains("connection: close"), "{}", answer.text());
        assert!(answer.closed, "the connection is closed after the refusal");
        assert_eq!(answer.responses(), 1, "the smuggled request got no answer: {}", answer.text());
    }
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

#[tokio::test]
async fn transfer_codings_other_than_one_chunked_are_not_implemented() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    for codings in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked, chunked\r\n",
    ] {
        let request = format!("POST /api/me HTTP/1.1\r\nHost: a\r\n{codings}\r\n0\r\n\r\n");
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 501, "{codings:?}: {}", answer.text());
        assert!(answer.text().contains("unsupported_transfer_encoding"));
    }
    // Codings that do not end in chunked cannot be framed at all: hyper refuses them.
    for codings in ["Transfer-Encoding: gzip\r\n", "Transfer-Encoding: identity\r\n"] {
        let request = format!("POST /api/me HTTP/1.1\r\nHost: a\r\n{codings}\r\nabc");
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 400, "{codings:?}: {}", answer.text());
    }
    assert!(stack.sandbox.received().is_empty());
}

#[tokio::test]
async fn malformed_lengths_and_header_syntax_are_refused_by_the_parser() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    for (what, head) in [
        ("two lengths", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("a list of lengths", "Content-Length: 5, 6\r\n"),
        ("a negative length", "Content-Length: -1\r\n"),
        ("2^64", "Content-Length: 18446744073709551616\r\n"),
        ("a hex length", "Content-Length: 0x5\r\n"),
        ("obs-fold", "X-Folded: a\r\n  b\r\nContent-Length: 0\r\n"),
        ("a bare CR", "X-Cr: a\rb\r\nContent-Length: 0\r\n"),
        ("a NUL", "X-Nul: a\0b\r\nContent-Length: 0\r\n"),
        ("a space before the colon", "Content-Length : 5\r\n"),
        ("HTTP/1.0 chunked", "__1.0__Transfer-Encoding: chunked\r\n"),
    ] {
        let (version, head) = match head.strip_prefix("__1.0__") {
            Some(rest) => ("HTTP/1.0", rest),
            None => ("HTTP/1.1", head),
        };
        let request = format!("POST /api/me {version}\r\nHost: a\r\n{head}\r\nhello");
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 400, "{what}: {}", answer.text());
    }
    assert!(stack.sandbox.received().is_empty());
}

#[tokio::test]
async fn a_chunk_size_overflow_is_a_refused_body() {
    let stack = stack().await;
    let request = format!(
        "POST /api/organizations/{ORG_ID}/file HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\n\
         Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"
    );
    let answer = exchange(stack.proxy.proxy_addr(), request.as_bytes(), WAIT).await;
    assert_eq!(answer.status(), 400, "{}", answer.text());
    assert!(stack.sandbox.received().is_empty(), "{:?}", stack.sandbox.received());
}

#[tokio::test]
async fn host_must_be_one_plain_host_and_port() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    for (what, hosts) in [
        ("no Host", ""),
        ("two Hosts", "Host: a\r\nHost: b\r\n"),
        ("user info", "Host: user:pw@a\r\n"),
        ("a path", "Host: a/evil\r\n"),
        ("a space", "Host: a b\r\n"),
        ("a bad port", "Host: a:99999\r\n"),
        ("a query", "Host: a?x=1\r\n"),
    ] {
        let request = format!("GET /api/me HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n");
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 400, "{what}: {}", answer.text());
    }
    let old = exchange(addr, b"GET /api/me HTTP/1.0\r\n\r\n", WAIT).await;
    assert_eq!(old.status(), 200, "HTTP/1.0 may omit Host: {}", old.text());
    assert_eq!(stack.sandbox.received().len(), 1, "only the HTTP/1.0 request was forwarded");
}

#[tokio::test]
async fn a_pipelined_or_oddly_targeted_chunked_request_with_a_length_is_refused_too() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    // The second head arrives in the same packet as the first: it was read before
    // the first was answered.
    let pipelined = b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let answer = exchange(addr, pipelined, WAIT).await;
    let text = answer.text();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 400") && text.contains("ambiguous_length"), "{text}");
    assert!(answer.closed, "closed after the refusal");
    assert_eq!(stack.sandbox.received().len(), 1, "only the GET was forwarded");
    // Framing is judged before anything else: a 404, 403 or 405 route closes too.
    for line in ["POST /nope HTTP/1.1", "POST /api/oauth/token HTTP/1.1", "TRACE /api/me HTTP/1.1"] {
        let request = format!(
            "{line}\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/me HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        let answer = exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!(answer.status(), 400, "{line}: {}", answer.text());
        assert!(answer.closed && answer.responses() == 1, "{line}: {}", answer.text());
    }
    assert_eq!(stack.sandbox.received().len(), 1);
}

/// Found in review: after a response to a request whose body was not read
/// (a 404), hyper drains that body, and the bytes it reads are the first the
/// tap records for the next head. A decoy head in the body, with the next
/// request's request line and no `Content-Length`, was taken for the real
/// one, and the chunked request with a length behind it went to Tallyfy. The
/// first head is 8,192 bytes, one whole read, so the body is read only in the
/// drain.
#[tokio::test]
async fn a_decoy_head_in_a_drained_body_does_not_hide_a_length_beside_chunked() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let attack = [
        &b"POST /nope HTTP/1.1\r\nHost: a\r\nContent-Length: 62\r\nX-Pad: "[..],
        &[b'a'; 8131],
        b"\r\n\r\nPOST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n",
    ]
    .concat();
    let first_head = attack.windows(4).position(|w| w == b"\r\n\r\n").map(|end| end + 4);
    assert_eq!(first_head, Some(8192), "one whole read of hyper's");
    let answer = exchange(addr, &attack, WAIT).await;
    let text = answer.text();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.contains("HTTP/1.1 400") && text.contains("ambiguous_length"), "{text}");
    assert!(answer.closed, "closed after the refusal");
    assert_eq!(answer.responses(), 2, "the GET behind it got no answer: {text}");
    assert!(stack.sandbox.received().is_empty(), "nothing reached Tallyfy");
}

/// A head that began in the same read as the previous request and ends after
/// its response: what the tap records starts in the middle of the head, and
/// there it looks like a head of its own with no `Content-Length`.
#[tokio::test]
async fn a_head_split_across_a_response_is_refused_when_chunked() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET /api/me HTTP/1.1\r\nHost: a\r\n\r\n\
POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\nX: ",
        )
        .await
        .expect("write");
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream.write_all(b"POST /api/me HTTP/1.1\r\n\r\n0\r\n\r\n").await.expect("write");
    let answer = read_until_closed(&mut stream, WAIT).await;
    let text = answer.text();
    assert_eq!(answer.status(), 400, "{text}");
    assert!(text.contains("ambiguous_length"), "{text}");
    assert!(answer.closed, "closed after the refusal");
    assert_eq!(stack.sandbox.received().len(), 1, "only the GET was forwarded");
}

/// Found in review of the tap: after a chunked request the tap cannot tell
/// where the next head starts without reading the chunks, and a target hyper
/// normalises (a `#fragment` dropped) let a decoy in the next request's own
/// body pass for its head. A chunked request's connection now ends with its
/// response.
#[tokio::test]
async fn a_chunked_request_is_the_last_on_its_connection() {
    let stack = stack().await;
    let addr = stack.proxy.proxy_addr();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"POST /api/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .expect("write");
    let first = read_response(&mut stream).await;
    assert!(first.to_ascii_lowercase().contains("connection: close"), "{first}");
    // What the review sent next; the connection is gone, so it goes nowhere.
    let _ = stream
        .write_all(
            b"POST /api/me#x HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
19\r\nPOST /api/me HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
        )
        .await;
    let rest = read_until_closed(&mut stream, WAIT).await;
    assert!(rest.closed, "closed after the chunked request's response");
    assert_eq!(rest.text(), "", "nothing more was answered");
    assert_eq!(stack.sandbox.received().len(), 1, "only the first request was forwarded");

    // Behind a request with a length, the head is where that body ends, and a
    // normalised target there does not match: refused, decoy or not.
    let answer = exchange(
        addr,
        b"POST /api/me HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab\
POST /api/me#x HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
19\r\nPOST /api/me HTTP/1.1\r\n\r\n\r\n0\r\n\r\n",
        WAIT,
    )
    .await;
    let text = answer.text();
    assert_eq!(answer.responses(), 2, "{text}");
    assert!(text.contains("HTTP/1.1 400") && text.contains("ambiguous_length"), "{text}");
    assert_eq!(stack.sandbox.received().len(), 2, "the second head never reached Tallyfy");
}
