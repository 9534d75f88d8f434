//! Keys made of what callers write in their paths (an organisation, a whole
//! path), bounded in size: the windows, the remembered hourly caps and the
//! fleet's Redis keys hold one per distinct value, and a caller chooses them.

use std::borrow::Cow;
use std::fmt::Write;

use http::Method;
use sha2::{Digest, Sha256};

/// The longest organisation kept as written (Tallyfy's are 32 hex digits).
pub const LONGEST_ORG: usize = 64;
/// The longest path kept as written in the key of a cap that matched no rule.
pub const LONGEST_PATH: usize = 512;

/// `text` as a key: itself up to `longest` bytes, beyond that `sha256:` and
/// the hex digest of its lower-case form (so spellings in other cases still
/// meet, as the short keys do, which their users lower-case).
pub fn bounded(text: &str, longest: usize) -> Cow<'_, str> {
    if text.len() <= longest {
        return Cow::Borrowed(text);
    }
    let digest = Sha256::digest(text.to_ascii_lowercase().as_bytes());
    let mut key = String::with_capacity(7 + 64);
    key.push_str("sha256:");
    for byte in digest {
        let _ = write!(key, "{byte:02x}");
    }
    Cow::Owned(key)
}

/// The key of a remembered cap that matched no `[[limits]]` rule: the method
/// and the path as Tallyfy reads it (each segment decoded, lower case, no
/// trailing `/`), so a respelling of the path is held back too.
pub fn unmatched_limit<S: AsRef<str>>(method: &Method, segments: &[S]) -> String {
    let mut path = String::new();
    for segment in segments {
        path.push('/');
        path.extend(segment.as_ref().chars().map(|c| c.to_ascii_lowercase()));
    }
    format!("{method} {}", bounded(&path, LONGEST_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept_and_long_ones_become_one_digest_whatever_their_case() {
        assert_eq!(
            bounded("5a3f9c1e7b2d4e6f8a0b1c2d3e4f5a6b", LONGEST_ORG),
            "5a3f9c1e7b2d4e6f8a0b1c2d3e4f5a6b"
        );
        let long = "A".repeat(60_000);
        let key = bounded(&long, LONGEST_ORG);
        assert_eq!(key.len(), 7 + 64);
        assert!(key.starts_with("sha256:"));
        assert_eq!(key, bounded(&long.to_ascii_lowercase(), LONGEST_ORG));
        assert_ne!(key, bounded(&"B".repeat(60_000), LONGEST_ORG));
    }

    #[test]
    fn an_unmatched_cap_is_keyed_by_the_path_as_tallyfy_reads_it() {
        let key = |segments: &[&str]| unmatched_limit(&Method::POST, segments);
        let plain = key(&["api", "organizations", "hh", "tasks", "t1", "comments"]);
        assert_eq!(plain, "POST /api/organizations/hh/tasks/t1/comments");
        assert_eq!(key(&["api", "Organizations", "HH", "tasks", "t1", "Comments"]), plain);
        let long = "x".repeat(1000);
        assert!(key(&["api", &long]).len() < 100, "bounded");
    }
}
