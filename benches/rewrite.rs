//! Benchmarks of the pure body rewriters: `cargo bench --bench rewrite`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tallyfy_proxy::dates::{self, DateRules};
use tallyfy_proxy::links::LinkRewriter;

/// About `size` bytes of a JSON array of template-like items; `step_deadlines` adds the template step
/// `"deadline":{"value":2,"unit":"days"}` look-alike (a candidate key, so the body needs a full scan).
fn big_body(size: usize, step_deadlines: bool) -> Vec<u8> {
    let mut out = b"{\"data\":[".to_vec();
    let mut n = 0;
    while out.len() < size {
        if n > 0 {
            out.push(b',');
        }
        let deadline =
            if step_deadlines { r#""deadline":{"value":2,"unit":"days","option":"from"},"# } else { "" };
        out.extend_from_slice(
            format!(
                r#"{{"id":"{n:032x}","title":"Step {n}: prepare the quarterly report","summary":"Collect the figures from every region, check them against last quarter and write a short caf\u00e9-style summary for the board.",{deadline}"position":{n},"assignees":[1001,1002,1003],"meta":{{"required":true,"note":null,"url":"https:\/\/example.com\/docs\/{n}","weight":12.5e-1}}}}"#
            )
            .as_bytes(),
        );
        n += 1;
    }
    out.extend_from_slice(b"]}");
    out
}

fn task_body() -> Vec<u8> {
    let summary = "Collect the figures from every region and check them against last quarter. ".repeat(23);
    format!(
        r#"{{"title":"Prepare Q3 report","task_type":"task","summary":"{summary}","owners":{{"users":[1001],"guests":[],"groups":[]}},"deadline":"2025-09-30T17:00:00Z","started_at":"2025-09-01T09:00:00+02:00","taskdata":{{"8c01f2a3b4c5d6e7f8091a2b3c4d5e6f":"2025-08-15T00:00:00.000Z","e423":"normal text"}}}}"#
    )
    .into_bytes()
}

fn list_response(items: usize) -> Vec<u8> {
    let mut out = b"{\"data\":[".to_vec();
    for n in 0..items {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!(r#"{{"id":"{n:032x}","name":"Onboarding - Acme {n}","status":"active","progress":{{"complete":3,"total":12,"percentage":25}},"owner_id":1001,"created_at":"2025-07-01T09:00:00.000Z","last_updated":"2025-07-02T10:30:00.000Z","checklist_title":"Client onboarding","is_public":false}}"#).as_bytes());
    }
    out.extend_from_slice(br#"],"meta":{"pagination":{"total":500,"count":100,"per_page":100,"current_page":1,"total_pages":5,"links":{"next":"https:\/\/go.tallyfy.com\/api\/organizations\/0123456789abcdef0123456789abcdef\/runs?page=2"}}}}"#);
    out
}

fn benches(c: &mut Criterion) {
    let rules = DateRules::default();
    let berlin = DateRules {
        timezone: jiff::tz::TimeZone::get("Europe/Berlin").expect("zone"),
        ..DateRules::default()
    };

    let mut g = c.benchmark_group("dates_json");
    let free = big_body(1 << 20, false);
    g.throughput(Throughput::Bytes(free.len() as u64));
    g.bench_function("date_free_1MiB", |b| b.iter(|| dates::rewrite_json(black_box(&free), &rules)));
    let lookalike = big_body(1 << 20, true);
    assert_eq!(dates::rewrite_json(&lookalike, &rules).map(|r| r.dates_rewritten), Ok(0));
    g.throughput(Throughput::Bytes(lookalike.len() as u64));
    g.bench_function("step_deadline_objects_1MiB_full_scan", |b| {
        b.iter(|| dates::rewrite_json(black_box(&lookalike), &rules))
    });
    let task = task_body();
    assert_eq!(dates::rewrite_json(&task, &rules).map(|r| r.dates_rewritten), Ok(3));
    g.throughput(Throughput::Bytes(task.len() as u64));
    g.bench_function(format!("task_{}B_3_dates_utc", task.len()), |b| {
        b.iter(|| dates::rewrite_json(black_box(&task), &rules))
    });
    g.bench_function(format!("task_{}B_3_dates_berlin", task.len()), |b| {
        b.iter(|| dates::rewrite_json(black_box(&task), &berlin))
    });
    g.finish();

    let mut g = c.benchmark_group("dates_value");
    g.bench_function("convert_rfc3339_offset", |b| {
        b.iter(|| dates::convert(black_box("2025-08-01T12:00:00+02:00"), &rules))
    });
    g.bench_function("convert_naive_berlin", |b| {
        b.iter(|| dates::convert(black_box("2025-08-01 12:00:00"), &berlin))
    });
    let form = b"title=Prepare+Q3&deadline=2025-09-30T17%3A00%3A00Z&prerun%5Babc%5D=2025-07-01&x=1".to_vec();
    g.bench_function("form_2_dates", |b| b.iter(|| dates::rewrite_form(black_box(&form), &rules)));
    g.finish();

    let mut g = c.benchmark_group("links");
    let links = LinkRewriter::new("https://go.tallyfy.com", "http://127.0.0.1:8080", true);
    let list = list_response(100);
    assert_eq!(links.rewrite_json(&list).map(|r| r.links_rewritten), Ok(1));
    g.throughput(Throughput::Bytes(list.len() as u64));
    g.bench_function(format!("list_100_items_{}B", list.len()), |b| {
        b.iter(|| links.rewrite_json(black_box(&list)))
    });
    let no_link = big_body(1 << 20, false);
    g.throughput(Throughput::Bytes(no_link.len() as u64));
    g.bench_function("link_free_1MiB", |b| b.iter(|| links.rewrite_json(black_box(&no_link))));
    g.finish();
}

criterion_group! {
    name = rewrite;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(rewrite);
