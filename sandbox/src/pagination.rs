//! Tallyfy's list pagination: `page` (1-based), `per_page` (default 10, cap 100)
//! and `without_pagination=true`; `meta.pagination.links` holds absolute
//! `previous`/`next` URLs, or is `[]` when there is neither.

use serde_json::{Map, Value, json};

use super::encoding::query_param;

const DEFAULT_PER_PAGE: usize = 10;
const MAX_PER_PAGE: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PageRequest {
    pub page: usize,
    pub per_page: usize,
    /// `without_pagination=true`: every item, no `meta`.
    pub everything: bool,
}

impl PageRequest {
    /// Reads the query; missing or unusable values fall back to the defaults.
    pub fn from_query(query: Option<&str>) -> PageRequest {
        let number = |name| query_param(query, name).and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0);
        PageRequest {
            page: number("page").unwrap_or(1),
            per_page: number("per_page").unwrap_or(DEFAULT_PER_PAGE).min(MAX_PER_PAGE),
            everything: query_param(query, "without_pagination").is_some_and(|v| v == "true" || v == "1"),
        }
    }
}

/// One page of `items`; `list_url` is the absolute URL of the list without a query.
pub(super) fn paginate(items: Vec<Value>, request: PageRequest, list_url: &str) -> Value {
    if request.everything {
        return json!({ "data": items });
    }
    let total = items.len();
    let total_pages = total.div_ceil(request.per_page).max(1);
    let data: Vec<Value> = items
        .into_iter()
        .skip((request.page - 1).saturating_mul(request.per_page))
        .take(request.per_page)
        .collect();
    let link = |page: usize| Value::String(format!("{list_url}?page={page}&per_page={}", request.per_page));
    let mut links = Map::new();
    if request.page > 1 {
        links.insert("previous".to_owned(), link(request.page - 1));
    }
    if request.page < total_pages {
        links.insert("next".to_owned(), link(request.page + 1));
    }
    let links = if links.is_empty() { json!([]) } else { Value::Object(links) };
    json!({
        "data": data,
        "meta": {"pagination": {
            "total": total,
            "count": data.len(),
            "per_page": request.per_page,
            "current_page": request.page,
            "total_pages": total_pages,
            "links": links,
        }},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<Value> {
        (0..n).map(Value::from).collect()
    }

    #[test]
    fn query_defaults_and_caps() {
        let defaults = PageRequest { page: 1, per_page: 10, everything: false };
        assert_eq!(PageRequest::from_query(None), defaults);
        assert_eq!(PageRequest::from_query(Some("page=0&per_page=x")), defaults);
        let capped = PageRequest::from_query(Some("page=3&per_page=500"));
        assert_eq!((capped.page, capped.per_page), (3, 100));
        assert!(PageRequest::from_query(Some("without_pagination=true")).everything);
    }

    #[test]
    fn pages_and_links() {
        let url = "http://h/api/organizations/o/runs";
        let middle = paginate(items(12), PageRequest::from_query(Some("page=2&per_page=5")), url);
        let p = &middle["meta"]["pagination"];
        assert_eq!(
            (p["total"].as_u64(), p["count"].as_u64(), p["total_pages"].as_u64()),
            (Some(12), Some(5), Some(3))
        );
        assert_eq!(p["links"]["previous"], format!("{url}?page=1&per_page=5"));
        assert_eq!(p["links"]["next"], format!("{url}?page=3&per_page=5"));
        assert_eq!(middle["data"][0], 5);
        let only = paginate(items(3), PageRequest::from_query(None), url);
        assert_eq!(only["meta"]["pagination"]["links"], json!([]));
        let past = paginate(items(3), PageRequest::from_query(Some("page=9")), url);
        assert_eq!(past["data"], json!([]));
        assert!(past["meta"]["pagination"]["links"]["next"].is_null());
    }
}
