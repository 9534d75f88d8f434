//! `[[limits]]` rules as the pipeline uses them: which requests a rule counts,
//! and under which organisation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use smallvec::SmallVec;

use super::key;
use super::window::Windows;
use crate::policy::PathPattern;
use crate::target;

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

    /// The organisation a counted request is for (`""` when the pattern names
    /// none), as a key of bounded size ([`key::bounded`]).
    pub fn org<'s, S: AsRef<str>>(&self, segments: &'s [S]) -> Cow<'s, str> {
        key::bounded(self.org_at.and_then(|at| segments.get(at)).map_or("", AsRef::as_ref), key::LONGEST_ORG)
    }
}

/// The rules filed at one position, by their lowercase literal.
type ByLiteral = HashMap<String, SmallVec<[usize; 2]>>;

/// A generation's rules, indexed so a request looks at the few that can
/// match it rather than at all of them: each rule is filed under its pattern's
/// last literal segment and that segment's position (`guests` at 4 for
/// `/api/organizations/{org}/guests`); a request looks up its own segment at
/// each such position (at most a handful of hash lookups), and only the rules
/// found there are matched in full.
#[derive(Debug, Default)]
pub struct Rules {
    rules: Box<[Rule]>,
    /// Position -> lowercase literal -> indices of the rules filed there.
    index: Vec<(usize, ByLiteral)>,
    /// The longest literal filed at any position, so longer segments skip the lookup.
    longest: usize,
    /// The last position anything is filed at, where reading the path stops.
    last_position: usize,
}

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Rules {
        let mut index: Vec<(usize, ByLiteral)> = Vec::new();
        let mut longest = 0;
        let mut last_position = 0;
        for (i, rule) in rules.iter().enumerate() {
            let (at, literal) = rule.settings.path.last_literal();
            longest = longest.max(literal.len());
            last_position = last_position.max(at);
            let slot = match index.iter().position(|(p, _)| *p == at) {
                Some(slot) => slot,
                None => {
                    index.push((at, HashMap::new()));
                    index.len() - 1
                }
            };
            index[slot].1.entry(literal.to_ascii_lowercase()).or_default().push(i);
        }
        Rules { rules: rules.into(), index, longest, last_position }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn get(&self, i: usize) -> &Rule {
        &self.rules[i]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// The rules whose filed literal the raw `path` holds at its position: the
    /// only rules a request there can count under, still to be matched in full
    /// ([`Rule::applies`]). Only the segments at filed positions are decoded,
    /// so a request no rule names costs a split and a lookup or two.
    pub fn candidates(&self, path: &str) -> SmallVec<[usize; 4]> {
        let mut found = SmallVec::new();
        if self.index.is_empty() {
            return found;
        }
        let mut lowered = [0u8; 64];
        let raw = target::split_at_slashes(path.strip_prefix('/').unwrap_or(path));
        for (at, segment) in raw.enumerate().take(self.last_position + 1) {
            let Some((_, by_literal)) = self.index.iter().find(|(p, _)| *p == at) else { continue };
            // A segment that does not decode was refused before limits are looked at.
            let Ok(segment) = target::decode_segment(segment) else { continue };
            if segment.len() > self.longest || segment.len() > lowered.len() {
                continue;
            }
            let lowered = &mut lowered[..segment.len()];
            lowered.copy_from_slice(segment.as_bytes());
            lowered.make_ascii_lowercase();
            let Ok(key) = std::str::from_utf8(lowered) else { continue };
            if let Some(rules) = by_literal.get(key) {
                found.extend_from_slice(rules);
            }
        }
        found.sort_unstable();
        found
    }

    /// The rules a request of `method` to `path` (decoded as `segments`)
    /// counts under, in file order.
    #[cfg(test)]
    pub fn matching<S: AsRef<str>>(
        &self,
        method: &Method,
        path: &str,
        segments: &[S],
    ) -> SmallVec<[usize; 4]> {
        let mut found = self.candidates(path);
        found.retain(|i| self.rules[*i].applies(method, segments));
        found
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
    fn the_index_finds_exactly_the_rules_that_match() {
        let mut settings = guests().settings;
        let mut all = Vec::new();
        for (i, path) in
            ["/api/organizations/{org}/guests", "/api/organizations/{org}/tasks/{task}/comments", "/api/me"]
                .iter()
                .enumerate()
        {
            settings.name = format!("r{i}");
            settings.path = PathPattern::parse(path).expect("pattern");
            settings.methods = None;
            all.push(Rule::new(settings.clone(), Arc::default()));
        }
        let rules = Rules::new(all);
        let found = |path: &str| rules.matching(&Method::POST, path, &segments(path)).into_vec();
        assert_eq!(found("/api/organizations/abc/guests"), [0]);
        assert_eq!(found("/api/organizations/abc/GUESTS/x"), [0], "any case, and a longer path");
        assert_eq!(found("/api/organizations/abc/tasks/t1/comments"), [1]);
        assert_eq!(found("/api/organizations/abc/tasks/t1"), Vec::<usize>::new());
        assert_eq!(found("/api/me"), [2]);
        assert_eq!(found("/api/me/organizations"), [2], "prefixes, as identity paths");
        assert_eq!(found("/api/organizations/abc/runs"), Vec::<usize>::new());
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

    /// The org comes from the caller's path and keys a window (and a Redis key
    /// in a fleet): a 60,000-byte one is held as a 71-byte digest, where it
    /// used to be held whole, 10,000 of them to a rule.
    #[test]
    fn a_huge_org_is_keyed_by_a_digest() {
        let path = format!("/api/organizations/{}/guests", "o".repeat(60_000));
        let org = guests().org(&segments(&path)).into_owned();
        assert_eq!(org.len(), "sha256:".len() + 64, "{}", &org[..80.min(org.len())]);
    }
}
