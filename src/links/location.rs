//! A `Location` header into Tallyfy's API, pointed at the proxy as body links are.

/// `{upstream_base}/api/`, as a `Location` may spell it: scheme and host in any
/// case, the default port written or not.
#[derive(Debug, Clone)]
pub struct ApiLocation {
    /// `scheme://host[:port][/prefix]/api/`, lower-cased, as configured.
    plain: Box<[u8]>,
    /// The same with the scheme's default port written, when the base has none.
    with_port: Option<Box<[u8]>>,
}

impl ApiLocation {
    /// `upstream_base` like `https://go.tallyfy.com` (a trailing `/` ignored).
    pub fn new(upstream_base: &str) -> ApiLocation {
        let base = upstream_base.trim_end_matches('/').to_ascii_lowercase();
        let plain = format!("{base}/api/").into_bytes().into_boxed_slice();
        let with_port = base.split_once("://").and_then(|(scheme, rest)| {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let port = match scheme {
                "https" => "443",
                "http" => "80",
                _ => return None,
            };
            // An authority with a port already (or an IPv6 literal's colons) gets no second one.
            let has_port =
                authority.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
            let path = if path.is_empty() { String::new() } else { format!("/{path}") };
            (!has_port)
                .then(|| format!("{scheme}://{authority}:{port}{path}/api/").into_bytes().into_boxed_slice())
        });
        ApiLocation { plain, with_port }
    }

    /// What follows the API prefix in `location`, if it starts with it.
    pub fn rest<'l>(&self, location: &'l [u8]) -> Option<&'l [u8]> {
        let strip = |prefix: &[u8]| {
            let head = location.get(..prefix.len())?;
            head.eq_ignore_ascii_case(prefix).then(|| &location[prefix.len()..])
        };
        strip(&self.plain).or_else(|| self.with_port.as_deref().and_then(strip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_prefix_is_found_in_any_case_with_or_without_the_default_port() {
        let tallyfy = ApiLocation::new("https://go.tallyfy.com/");
        for location in [
            "https://go.tallyfy.com/api/runs?page=2",
            "HTTPS://Go.Tallyfy.com/api/runs?page=2",
            "https://go.tallyfy.com:443/api/runs?page=2",
        ] {
            assert_eq!(tallyfy.rest(location.as_bytes()), Some(&b"runs?page=2"[..]), "{location}");
        }
        for elsewhere in [
            "https://go.tallyfy.com.evil.example/api/runs",
            "https://go.tallyfy.com@evil.example/api/runs",
            "https://go.tallyfy.com:8443/api/runs",
            "http://go.tallyfy.com/api/runs",
            "https://go.tallyfy.com/login",
            "/api/runs",
            "https://files.example/f",
        ] {
            assert_eq!(tallyfy.rest(elsewhere.as_bytes()), None, "{elsewhere}");
        }
        let local = ApiLocation::new("http://127.0.0.1:8080");
        assert_eq!(local.rest(b"http://127.0.0.1:8080/api/me"), Some(&b"me"[..]));
        assert_eq!(local.rest(b"http://127.0.0.1:8080:80/api/me"), None);
    }
}
