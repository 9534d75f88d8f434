//! `[[limits]]` rules as the pipeline uses them: which requests a rule counts,
//! and under which organisation.

use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::window::Windows;
use crate::policy::PathPattern;

/// One `[[limits]]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleSettings {
    pub name: String,
    /// `None` counts every method.
    pub methods: Option<Vec<Method>>,
    pub path: PathPattern,
    pub max: u32,
    pub per: Duration,
}

/// A rule with its windows (shared with the previous generation when the rule
/// did not change, so a reload never resets an hourly count).
#[derive(Debug)]
pub struct Rule {
    pub settings: RuleSettings,
    pub name: Arc<str>,
    /// The segment holding `{org}`, if the pattern names one.
    org_at: Option<usize>,
    pub windows: Arc<Windows>,
}

impl Rule {
    pub fn new(settings: RuleSettings, windows: Arc<Windows>) -> Rule {
        Rule { name: settings.name.as_str().into(), org_at: settings.path.param("org"), settings, windows }
    }

    /// Whether a request of `method` to the decoded path `segments` counts here.
    pub fn applies<S: AsRef<str>>(&self, method: &Method, segments: &[S]) -> bool {
        self.settings.methods.as_ref().is_none_or(|methods| methods.contains(method))
            && self.settings.path.matches(segments)
    }

    /// The organisation a counted request is for (`""` when the pattern names none).
    pub fn org<'s, S: AsRef<str>>(&self, segments: &'s [S]) -> &'s str {
        self.org_at.and_then(|at| segments.get(at)).map_or("", AsRef::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guests() -> Rule {
        let settings = RuleSettings {
            name: "guest-invites".into(),
            methods: Some(vec![Method::POST]),
            path: PathPattern::parse("/api/organizations/{org}/guests").expect("pattern"),
            max: 30,
            per: Duration::from_secs(3600),
        };
        Rule::new(settings, Arc::default())
    }

    fn segments(path: &str) -> Vec<&str> {
        path.split('/').skip(1).collect()
    }

    #[test]
    fn a_rule_counts_its_method_and_path_under_the_org_the_path_names() {
        let rule = guests();
        let path = segments("/api/organizations/abc/guests");
        assert!(rule.applies(&Method::POST, &path));
        assert_eq!(rule.org(&path), "abc");
        assert!(!rule.applies(&Method::GET, &path), "another method");
        assert!(!rule.applies(&Method::POST, &segments("/api/organizations/abc/tasks")), "another path");
        assert!(
            rule.applies(&Method::POST, &segments("/api/Organizations/abc/Guests/x")),
            "as policy paths match"
        );
    }
}
