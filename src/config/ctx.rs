//! The parsing context every validator shares, and the checks for scalar values
//! (addresses, durations, URLs, names, IDs, digests) that several sections use.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use http::uri::{Scheme, Uri};
use toml::Spanned;

use super::ConfigError;
use super::error::line_of;
use super::secret_source::SecretSource;
use crate::secret::Secret;

/// Parsing context: turns spans into lines and builds errors.
pub(super) struct Ctx<'a> {
    pub file: &'a Path,
    pub source: &'a str,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    pub fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: span.map(|s| line_of(self.source, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    pub fn at<T>(&self, value: &Spanned<T>, key: impl Into<String>, msg: impl Into<String>) -> ConfigError {
        self.err(Some(value.span()), key, msg)
    }

    pub fn base_dir(&self) -> PathBuf {
        self.file.parent().map(Path::to_owned).unwrap_or_default()
    }

    /// Reads the secret at `key`; one written in the file itself works, with a
    /// warning naming its line (never its value).
    pub fn secret(
        &self,
        source: &Spanned<SecretSource>,
        key: &str,
        warnings: &mut Vec<String>,
    ) -> Result<Secret, ConfigError> {
        let secret =
            source.get_ref().resolve(&self.base_dir(), self.env).map_err(|m| self.at(source, key, m))?;
        if source.get_ref().is_inline() {
            warnings.push(format!(
                "{}:{}: {key} is written in the file; prefer {{ env = \"NAME\" }} or {{ file = \"PATH\" }}",
                self.file.display(),
                line_of(self.source, source.span().start)
            ));
        }
        Ok(secret)
    }
}

pub(super) fn socket_addr(
    ctx: &Ctx<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| {
        ctx.at(
            value,
            key,
            format!("{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")", value.get_ref()),
        )
    })
}

pub(super) fn millis(
    ctx: &Ctx<'_>,
    value: Option<&Spanned<u64>>,
    key: &str,
    default_ms: u64,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_millis(default_ms)),
        Some(v) if *v.get_ref() == 0 => Err(ctx.at(v, key, "must be greater than 0")),
        Some(v) => Ok(Duration::from_millis(*v.get_ref())),
    }
}

pub(super) fn http_url(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<Uri, ConfigError> {
    let text = value.get_ref();
    if text.contains('@') {
        // Checked first, and the URL never quoted: what comes before an `@`
        // may be a password, whatever else the URL holds (a `/` in the
        // password, `https://u:p/w@host`, would hide it from a check of the
        // authority alone). Tallyfy's URLs hold none.
        return Err(ctx.at(
            value,
            key,
            "must not hold '@': no credentials in the URL (its value is not shown)",
        ));
    }
    let shown = |text: &str| format!("{text:?}");
    if text.contains('#') {
        // The URL parser drops a fragment; the text kept for links would not.
        return Err(ctx.at(value, key, format!("{} must not hold a '#' fragment", shown(text))));
    }
    let uri: Uri =
        text.parse().map_err(|e| ctx.at(value, key, format!("{} is not a URL: {e}", shown(text))))?;
    let scheme_ok = uri.scheme() == Some(&Scheme::HTTP) || uri.scheme() == Some(&Scheme::HTTPS);
    if !scheme_ok || !uri.authority().is_some_and(reachable) {
        return Err(ctx.at(
            value,
            key,
            format!(
                "{} must start with http:// or https:// and name a host (and a port from 1 to 65535, if any)",
                shown(text)
            ),
        ));
    }
    Ok(uri)
}

/// Whether `authority` (holding no user-info: `http_url` refuses an `@`) names
/// a host, and a port a connection can go to when it names one: `http://:80`,
/// `http://host:` and `http://host:65536` parse as URLs, and would start a
/// proxy whose every request fails.
fn reachable(authority: &http::uri::Authority) -> bool {
    let host = authority.host();
    let port = authority.as_str().strip_prefix(host).unwrap_or(":");
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            digits.bytes().all(|b| b.is_ascii_digit()) && digits.parse::<u16>().is_ok_and(|port| port != 0)
        }
    };
    !host.is_empty() && host != "[]" && port_ok
}

/// A list of HTTP methods (`["GET", "post"]`), uppercased: the methods
/// Tallyfy's API serves. Any other word (`PSOT`) is a typo that would make a
/// rule or a policy name a method no request has.
pub(super) fn methods(
    ctx: &Ctx<'_>,
    list: &Spanned<Vec<String>>,
    key: &str,
) -> Result<Vec<Method>, ConfigError> {
    const SERVED: [Method; 7] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    list.get_ref()
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .ok()
                .filter(|method| SERVED.contains(method))
                .ok_or_else(|| {
                    ctx.at(
                        list,
                        key,
                        format!("{m:?} is not one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                    )
                })
        })
        .collect()
}

/// A name for credentials and identities: also a metric label later, so tame.
pub(super) fn name(ctx: &Ctx<'_>, value: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let name = value.get_ref();
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        return Err(ctx.at(value, key, "names use letters, digits, '-', '_' and '.' only"));
    }
    Ok(name.clone())
}

/// A 32-hex organization ID, lowercased.
pub(super) fn org_id(
    ctx: &Ctx<'_>,
    value: &str,
    span: Range<usize>,
    key: &str,
) -> Result<String, ConfigError> {
    if value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(ctx.err(Some(span), key, format!("{value:?} is not a 32-hex Tallyfy organization ID")))
    }
}

/// A SHA-256 digest written as 64 hex digits (what `tallyfy-proxy hash-key` prints).
pub(super) fn sha256_hex(
    ctx: &Ctx<'_>,
    value: &str,
    span: Range<usize>,
    key: &str,
) -> Result<[u8; 32], ConfigError> {
    let bad =
        || ctx.err(Some(span.clone()), key, "must be 64 hex digits, as printed by `tallyfy-proxy hash-key`");
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    if digest == EMPTY_SHA256 {
        // An empty key is no key (the proxy ignores an empty one), and an
        // empty password lets anyone who knows the user name in.
        return Err(ctx.err(Some(span), key, "is the digest of an empty value: pick a non-empty secret"));
    }
    Ok(digest)
}

/// SHA-256 of the empty string.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27,
    0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];
