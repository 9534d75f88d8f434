//! `server.max_buffered_bytes`: a proxy whose budget is spent.

use std::time::Duration;

use tallyfy_sandbox::fixtures::ORG_ID;

use tokio::io::AsyncWriteExt;

use super::{exchange, keyed_identity, read_response, read_until_closed, stack_with_identities};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_spent_budget_refuses_bodies_that_must_be_read_whole_and_streams_answers_as_they_are() {
    let (sandbox, proxy, _dir) =
        stack_with_identities([keyed_identity("narrow", "k").with("methods", vec!["GET", "POST"])]).await;
    let addr = proxy.proxy_addr();
    let form = format!(
        "POST /api/organizations/{ORG_ID}/tasks HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntitle=t"
    );
    let list = format!(
        "GET /api/organizations/{ORG_ID}/runs?per_page=2 HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nConnection: close\r\n\r\n"
    );
    // As Laravel writes them, slashes escaped.
    let upstream_links = format!("\"{}\\/api\\/organizations", sandbox.base_url().replace('/', "\\/"));

    // The proxy serves on this test's thread (a current-thread runtime):
    // bytes counted here (past the total: they take no slab) are felt by its
    // requests, and what its requests count shows on this thread's counter.
    let counter = tallyfy_proxy::body::Budget::unlimited();
    let before = counter.used_here();
    let mut held_elsewhere = counter.reserve();
    held_elsewhere.force(1 << 40);
    let refused = exchange(addr, form.as_bytes(), WAIT).await;
    assert_eq!(refused.status(), 503, "{}", refused.text());
    assert!(refused.text().contains("buffers_full"), "{}", refused.text());
    assert!(refused.text().to_ascii_lowercase().contains("retry-after: 1\r\n"), "{}", refused.text());
    assert!(sandbox.received().is_empty(), "a body that could not be judged was not sent");
    let streamed = exchange(addr, list.as_bytes(), WAIT).await;
    assert_eq!(streamed.status(), 200, "{}", streamed.text());
    assert!(streamed.text().contains(&upstream_links), "streamed as it came: {}", streamed.text());

    drop(held_elsewhere);
    let judged = exchange(addr, form.as_bytes(), WAIT).await;
    assert_ne!(judged.status(), 503, "room again: {}", judged.text());
    assert_eq!(&sandbox.received().last().expect("forwarded").body[..], b"title=t");
    let rewritten = exchange(addr, list.as_bytes(), WAIT).await;
    assert!(!rewritten.text().contains(&upstream_links), "{}", rewritten.text());
    assert!(rewritten.text().contains("\"http://a/api/organizations"), "{}", rewritten.text());
    let metrics = crate::support::scrape(proxy.admin_addr()).await;
    assert!(metrics.contains("tallyfy_proxy_buffers_full_total 2"), "{metrics}");
    // Every byte counted for those requests was given back with their bodies.
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.used_here() != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes still counted",
            counter.used_here() - before
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection holding a long unfinished head holds it twice (the head tap's
/// copy and hyper's read buffer): past its first 8 KiB, both count against
/// `server.max_buffered_bytes`, so many connections trickling 60 KiB heads
/// cannot take more memory than bodies may. With the total spent, such a head
/// ends its connection, unanswered and unforwarded, while a usual head is
/// served; with room again, the same long head is served.
#[tokio::test]
async fn a_long_unfinished_head_counts_against_the_budget_and_is_cut_when_it_is_spent() {
    let (sandbox, proxy, _dir) = stack_with_identities([keyed_identity("narrow", "k")]).await;
    let addr = proxy.proxy_addr();
    let request = |padding: usize| {
        format!(
            "GET /api/organizations/{ORG_ID}/runs HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\n\
             X-Padding: {}\r\nConnection: close\r\n\r\n",
            "p".repeat(padding)
        )
    };
    let long = request(20 * 1024);
    let usual = request(1024);

    // The proxy serves on this test's thread: bytes counted here past the
    // total are felt by its connections.
    let counter = tallyfy_proxy::body::Budget::unlimited();
    let before = counter.used_here();
    let mut held_elsewhere = counter.reserve();
    held_elsewhere.force(1 << 40);
    let cut = exchange(addr, long.as_bytes(), WAIT).await;
    assert!(cut.closed && cut.bytes.is_empty(), "cut unanswered: {}", cut.text());
    assert!(sandbox.received().is_empty(), "nothing forwarded");
    let served = exchange(addr, usual.as_bytes(), WAIT).await;
    assert_eq!(served.status(), 200, "a usual head is not counted: {}", served.text());
    let metrics = crate::support::scrape(proxy.admin_addr()).await;
    assert!(metrics.contains("tallyfy_proxy_heads_over_budget_total 1"), "{metrics}");

    drop(held_elsewhere);
    let served = exchange(addr, long.as_bytes(), WAIT).await;
    assert_eq!(served.status(), 200, "room again: {}", served.text());
    assert_eq!(sandbox.received().len(), 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.used_here() != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} bytes still counted",
            counter.used_here() - before
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Once a connection's read buffer has grown (a large upload earlier on it),
/// one read can hold a short head with much of its body, or a head with the
/// next one behind it. With the total spent: a short head whose body came
/// with it is served (the body is not the head's); a head followed by a long
/// unfinished one (two, pipelined) are answered, and the connection then ends (what hyper holds
/// of the next head is counted, and found no room), before its header
/// deadline could cut it.
#[tokio::test]
async fn on_a_grown_connection_body_bytes_do_not_count_as_head_and_a_pipelined_head_does() {
    let (_sandbox, proxy, _dir) =
        stack_with_identities([keyed_identity("narrow", "k").with("methods", vec!["GET", "POST"])]).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.proxy_addr()).await.expect("connect");
    let upload = |length: usize| {
        let head = format!(
            "POST /api/organizations/{ORG_ID}/runs HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
        );
        [head.as_bytes(), &vec![b'x'; length]].concat()
    };
    stream.write_all(&upload(300_000)).await.expect("write");
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 "), "{first}");

    let counter = tallyfy_proxy::body::Budget::unlimited();
    let mut held_elsewhere = counter.reserve();
    held_elsewhere.force(1 << 40);
    stream.write_all(&upload(20 * 1024)).await.expect("write");
    let served = read_response(&mut stream).await;
    assert!(served.starts_with("HTTP/1.1 "), "a short head with its body is served: {served}");

    let get = format!("GET /api/organizations/{ORG_ID}/runs HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\n\r\n");
    let unfinished = format!("GET /api/me HTTP/1.1\r\nHost: a\r\nX-Padding: {}", "p".repeat(40 * 1024));
    // Two heads before it: the second is dispatched from hyper's buffer, with
    // nothing read for it, and what is counted behind it stays counted.
    stream.write_all(format!("{get}{get}{unfinished}").as_bytes()).await.expect("write");
    for _ in 0..2 {
        let answered = read_response(&mut stream).await;
        assert!(answered.starts_with("HTTP/1.1 200"), "the requests before it are answered: {answered}");
    }
    let rest = read_until_closed(&mut stream, WAIT).await;
    assert!(rest.closed && rest.bytes.is_empty(), "then cut: {}", rest.text());
    let metrics = crate::support::scrape(proxy.admin_addr()).await;
    assert!(metrics.contains("tallyfy_proxy_heads_over_budget_total 1"), "{metrics}");
    drop(held_elsewhere);
}
