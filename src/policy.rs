//! What an identity may reach: organizations, methods and path prefixes, checked
//! locally so a violation is a 403 that never reaches Tallyfy. Pure functions.
//!
//! Also the `current` org alias: an app that does not know its org ID calls
//! `/api/organizations/current/...` and the identity's org is put in its place.

use std::borrow::Cow;

use http::Method;
use http::uri::PathAndQuery;

use crate::target;

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
/// themselves (ignoring ASCII case, so `/Tasks` is no way around a rule),
/// `{anything}` matches one segment, and the prefix ends on a segment boundary
/// (`/tasks` allows `/tasks/123` but not `/tasksets`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    /// `{name}`: any one segment.
    Param(String),
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
            .map(|s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => Segment::Param(name.to_owned()),
                None => Segment::Literal(s.to_owned()),
            })
            .collect();
        Ok(PathPattern { segments })
    }

    /// Whether the decoded `segments` (of a whole path) start with this pattern.
    pub fn matches<S: AsRef<str>>(&self, segments: &[S]) -> bool {
        self.segments.len() <= segments.len()
            && self.segments.iter().zip(segments).all(|(want, segment)| match want {
                Segment::Param(_) => !segment.as_ref().is_empty(),
                Segment::Literal(literal) => literal.eq_ignore_ascii_case(segment.as_ref()),
            })
    }

    /// The last literal segment and its position (`/api` is 0): what an index
    /// of patterns keys on.
    pub fn last_literal(&self) -> (usize, &str) {
        self.segments
            .iter()
            .enumerate()
            .rev()
            .find_map(|(at, s)| match s {
                Segment::Literal(literal) => Some((at, literal.as_str())),
                Segment::Param(_) => None,
            })
            .unwrap_or((0, "api"))
    }

    /// The position of `{name}` among the path's segments (`/api` is 0).
    pub fn param(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| matches!(s, Segment::Param(p) if p == name))
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for segment in &self.segments {
            match segment {
                Segment::Literal(literal) => write!(f, "/{literal}")?,
                Segment::Param(name) => write!(f, "/{{{name}}}")?,
            }
        }
        Ok(())
    }
}

impl Policy {
    /// Whether the identity may use `method` (always, without a `methods` rule).
    /// Also how a method override (`_method`) is judged.
    pub fn authorize_method(&self, method: &Method) -> Result<(), Denied> {
        match &self.methods {
            Some(methods) if !methods.contains(method) => Err(Denied::Method),
            _ => Ok(()),
        }
    }

    /// Whether a `methods` rule restricts this identity (so overrides matter).
    pub fn restricts_methods(&self) -> bool {
        self.methods.is_some()
    }

    pub fn is_unrestricted(&self) -> bool {
        self.orgs.is_none() && self.methods.is_none() && self.paths.is_none() && self.org_alias.is_none()
    }

    /// The target with `current` replaced by the alias org, or `None` when there is
    /// nothing to replace.
    pub fn resolve_alias(&self, target: &PathAndQuery) -> Option<PathAndQuery> {
        let org = self.org_alias.as_deref()?;
        let path = target.path();
        let after_api = path.strip_prefix("/api/")?;
        let (family, rest) = after_api.split_once('/')?;
        if !ORG_SCOPED.iter().any(|f| f.eq_ignore_ascii_case(family)) {
            return None;
        }
        let after_current = rest.strip_prefix(CURRENT_ORG)?;
        if !(after_current.is_empty() || after_current.starts_with(['/', '?'])) {
            return None;
        }
        let tail = &target.as_str()["/api/".len() + family.len() + 1 + CURRENT_ORG.len()..];
        PathAndQuery::try_from(format!("/api/{family}/{org}{tail}")).ok()
    }

    /// Whether `method path` is allowed. Rules are checked against the path as
    /// Tallyfy will read it (each segment percent-decoded, as Laravel matches
    /// routes; route words in any case), so `%6Frganizations` and
    /// `Organizations` are organizations routes too. A path whose decoding is
    /// ambiguous was refused for everyone by [`target::check`]; here it is a
    /// [`Denied::Path`] as well.
    pub fn authorize(&self, method: &Method, path: &str) -> Result<(), Denied> {
        self.authorize_method(method)?;
        let segments: Vec<Cow<'_, str>> =
            target::segments(path).collect::<Result<_, _>>().map_err(|_| Denied::Path)?;
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

/// The organization an org-scoped path names (`/api/organizations/{org}/...`),
/// `Some("")` for an org-scoped route without one.
fn org_of<'a>(segments: &'a [Cow<'_, str>]) -> Option<&'a str> {
    match segments {
        [api, family, rest @ ..]
            if api == "api" && ORG_SCOPED.iter().any(|f| f.eq_ignore_ascii_case(family)) =>
        {
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
    fn route_words_match_in_any_case() {
        let p = policy();
        assert_eq!(p.authorize(&Method::GET, &format!("/api/Organizations/{OTHER}/tasks")), Err(Denied::Org));
        assert_eq!(p.authorize(&Method::GET, &format!("/api/APPLICATIONS/{OTHER}/users")), Err(Denied::Org));
        assert_eq!(
            p.authorize(&Method::GET, &format!("/api/%4Frganizations/{OTHER}/tasks")),
            Err(Denied::Org)
        );
        assert_eq!(p.authorize(&Method::GET, &format!("/api/Organizations/{ORG}/Tasks")), Ok(()));
        assert_eq!(
            p.authorize(&Method::GET, &format!("/api/organizations/{}/tasks", ORG.to_uppercase())),
            Ok(())
        );
        assert_eq!(p.authorize(&Method::GET, "/api/me/"), Ok(()), "a trailing slash is the same route");
        assert_eq!(p.authorize(&Method::GET, "/api//me"), Err(Denied::Path));
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
        let cased = PathAndQuery::from_static("/api/Organizations/current?x=1");
        assert_eq!(
            p.resolve_alias(&cased).expect("aliased").as_str(),
            format!("/api/Organizations/{ORG}?x=1")
        );
        assert!(p.resolve_alias(&PathAndQuery::from_static("/api/me/current")).is_none());
        assert!(Policy::default().resolve_alias(&target).is_none());
    }
}
