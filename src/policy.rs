//! What an identity may reach: organizations, methods and path prefixes, checked
//! locally so a violation is a 403 that never reaches Tallyfy. Pure functions.
//!
//! Also the `current` org alias: an app that does not know its org ID calls
//! `/api/organizations/current/...` and the identity's org is put in its place.

use std::borrow::Cow;

use http::Method;
use http::uri::PathAndQuery;
use percent_encoding::percent_decode_str;

/// The path segment replaced by the identity's `org_alias`.
pub const CURRENT_ORG: &str = "current";

/// Route families whose second segment is an organization ID.
const ORG_SCOPED: [&str; 2] = ["organizations", "applications"];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Allowed organization IDs (lowercase); `None` allows all.
    pub orgs: Option<Vec<String>>,
    /// Allowed methods; `None` allows all.
    pub methods: Option<Vec<Method>>,
    /// Allowed path prefixes; `None` allows all.
    pub paths: Option<Vec<PathPattern>>,
    /// Organization substituted for `current` in org-scoped paths.
    pub org_alias: Option<String>,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Org,
    Method,
    Path,
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::Org => "this identity may not reach that organization",
            Denied::Method => "this identity may not use that method",
            Denied::Path => "this identity may not reach that path",
        }
    }
}

/// A path prefix such as `/api/organizations/{org}/tasks`: literal segments match
/// themselves, `{anything}` matches one segment, and the prefix ends on a segment
/// boundary (`/tasks` allows `/tasks/123` but not `/tasksets`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Option<String>>,
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<PathPattern, String> {
        if !pattern.starts_with("/api/") {
            return Err(format!("{pattern:?} must start with /api/"));
        }
        let segments = pattern
            .trim_end_matches('/')
            .split('/')
            .skip(1)
            .map(|s| if s.starts_with('{') && s.ends_with('}') { None } else { Some(s.to_owned()) })
            .collect();
        Ok(PathPattern { segments })
    }

    /// Whether the decoded `segments` (of a whole path) start with this pattern.
    fn matches(&self, segments: &[Cow<'_, str>]) -> bool {
        self.segments.len() <= segments.len()
            && self.segments.iter().zip(segments).all(|(want, segment)| match want {
                None => !segment.is_empty(),
                Some(literal) => literal == segment,
            })
    }
}

impl Policy {
    pub fn is_unrestricted(&self) -> bool {
        self.orgs.is_none() && self.methods.is_none() && self.paths.is_none() && self.org_alias.is_none()
    }

    /// The target with `current` replaced by the alias org, or `None` when there is
    /// nothing to replace.
    pub fn resolve_alias(&self, target: &PathAndQuery) -> Option<PathAndQuery> {
        let org = self.org_alias.as_deref()?;
        let path = target.path();
        let family = ORG_SCOPED.iter().find(|family| {
            path.strip_prefix("/api/")
                .and_then(|rest| rest.strip_prefix(**family))
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|rest| rest == CURRENT_ORG || rest.starts_with("current/"))
        })?;
        let prefix_len = "/api/".len() + family.len() + 1;
        let rest = &target.as_str()[prefix_len + CURRENT_ORG.len()..];
        PathAndQuery::try_from(format!("/api/{family}/{org}{rest}")).ok()
    }

    /// Whether `method path` is allowed. Rules are checked against the path as
    /// Tallyfy will read it (each segment percent-decoded, as Laravel matches
    /// routes), so `%6Frganizations` is an organizations route too. A path whose
    /// decoding is ambiguous (an encoded `/` or `\`, an empty segment) is refused.
    pub fn authorize(&self, method: &Method, path: &str) -> Result<(), Denied> {
        if let Some(methods) = &self.methods
            && !methods.contains(method)
        {
            return Err(Denied::Method);
        }
        let segments = decoded_segments(path).ok_or(Denied::Path)?;
        if let Some(orgs) = &self.orgs
            && let Some(org) = org_of(&segments)
            && !orgs.iter().any(|allowed| allowed.eq_ignore_ascii_case(org))
        {
            return Err(Denied::Org);
        }
        if let Some(paths) = &self.paths
            && !paths.iter().any(|p| p.matches(&segments))
        {
            return Err(Denied::Path);
        }
        Ok(())
    }
}

/// The path's segments after the leading `/`, percent-decoded; `None` when a
/// segment is empty, not UTF-8, or decodes to something holding `/` or `\`.
fn decoded_segments(path: &str) -> Option<Vec<Cow<'_, str>>> {
    path.strip_prefix('/')?
        .split('/')
        .map(|raw| {
            let decoded = percent_decode_str(raw).decode_utf8().ok()?;
            let ambiguous = decoded.is_empty() || decoded.contains(['/', '\\']);
            (!ambiguous).then_some(decoded)
        })
        .collect()
}

/// The organization an org-scoped path names (`/api/organizations/{org}/...`),
/// `Some("")` for an org-scoped route without one.
fn org_of<'a>(segments: &'a [Cow<'_, str>]) -> Option<&'a str> {
    match segments {
        [api, family, rest @ ..] if api == "api" && ORG_SCOPED.contains(&family.as_ref()) => {
            Some(rest.first().map_or("", |org| org.as_ref()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "3f2c8d0e9a1b4c5d6e7f8091a2b3c4d5";
    const OTHER: &str = "00000000000000000000000000000000";

    fn policy() -> Policy {
        Policy {
            orgs: Some(vec![ORG.to_owned()]),
            methods: Some(vec![Method::GET, Method::POST]),
            paths: Some(vec![
                PathPattern::parse("/api/organizations/{org}/tasks").expect("valid"),
                PathPattern::parse("/api/me").expect("valid"),
            ]),
            org_alias: Some(ORG.to_owned()),
        }
    }

    #[test]
    fn allowed_org_method_and_prefix_pass() {
        let p = policy();
        assert_eq!(p.authorize(&Method::GET, &format!("/api/organizations/{ORG}/tasks")), Ok(()));
        assert_eq!(
            p.authorize(&Method::POST, &format!("/api/organizations/{ORG}/tasks/abc/comments")),
            Ok(())
        );
        assert_eq!(p.authorize(&Method::GET, "/api/me"), Ok(()), "org-less routes pass the org rule");
    }

    #[test]
    fn each_rule_refuses_on_its_own() {
        let p = policy();
        assert_eq!(p.authorize(&Method::GET, &format!("/api/organizations/{OTHER}/tasks")), Err(Denied::Org));
        assert_eq!(p.authorize(&Method::GET, &format!("/api/applications/{OTHER}/users")), Err(Denied::Org));
        assert_eq!(
            p.authorize(&Method::DELETE, &format!("/api/organizations/{ORG}/tasks")),
            Err(Denied::Method)
        );
        assert_eq!(p.authorize(&Method::GET, &format!("/api/organizations/{ORG}/runs")), Err(Denied::Path));
        assert_eq!(
            p.authorize(&Method::GET, &format!("/api/organizations/{ORG}/tasksets")),
            Err(Denied::Path)
        );
        assert_eq!(
            p.authorize(&Method::GET, "/api/organizations"),
            Err(Denied::Org),
            "a missing org is no org"
        );
    }

    #[test]
    fn an_unrestricted_policy_allows_everything() {
        assert_eq!(Policy::default().authorize(&Method::PATCH, "/api/anything"), Ok(()));
    }

    #[test]
    fn current_is_replaced_by_the_alias_org_keeping_the_query() {
        let p = policy();
        let target = PathAndQuery::from_static("/api/organizations/current/tasks?page=2");
        assert_eq!(
            p.resolve_alias(&target).expect("aliased").as_str(),
            format!("/api/organizations/{ORG}/tasks?page=2")
        );
        let apps = PathAndQuery::from_static("/api/applications/current/users");
        assert_eq!(
            p.resolve_alias(&apps).expect("aliased").as_str(),
            format!("/api/applications/{ORG}/users")
        );
        assert!(p.resolve_alias(&PathAndQuery::from_static("/api/organizations/currently/x")).is_none());
        assert!(p.resolve_alias(&PathAndQuery::from_static("/api/me/current")).is_none());
        assert!(Policy::default().resolve_alias(&target).is_none());
    }
}
