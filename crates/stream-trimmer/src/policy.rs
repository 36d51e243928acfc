//! Per-stream trim policies from configuration: `PATTERN=SPEC` rules matched against a stream's
//! name under the key prefix (`requests`, `dead`, `replies:<replica>`), `*` matching any run of
//! characters. A rule without `*` wins over patterns; among patterns the first one given wins;
//! streams no rule matches get the default policy.
//!
//! A spec is a comma-separated list: `maxlen:N`, `maxage:DURATION` (`90s`, `1h`, `7d`), `exact`
//! or `approx` (the default: Redis removes whole macro nodes only, cheaper, keeping a few more
//! entries), or `keep` alone (never trimmed). For example `dead=maxage:7d,maxlen:100000,exact`.

use cairn_redis::streams::TrimPolicy;
use cairn_runtime::parse_duration;

/// One `PATTERN=SPEC` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub pattern: String,
    pub policy: TrimPolicy,
}

impl PolicyRule {
    fn is_glob(&self) -> bool {
        self.pattern.contains('*')
    }
}

/// Parses one rule, e.g. `replies:*=maxage:1h`; the error names the rule and its bad part.
pub fn parse_rule(text: &str) -> Result<PolicyRule, String> {
    let text = text.trim();
    let Some((pattern, spec)) = text.split_once('=') else {
        return Err(format!("policy {text:?} has no '=': write PATTERN=SPEC, e.g. requests=maxlen:10000"));
    };
    let pattern = pattern.trim();
    if pattern.is_empty() || pattern.chars().any(|c| c.is_whitespace() || c == '=') {
        return Err(format!(
            "policy {text:?}: stream pattern {pattern:?} must be a non-empty name without spaces"
        ));
    }
    let policy = parse_spec(spec).map_err(|e| format!("policy {text:?}: {e}"))?;
    Ok(PolicyRule { pattern: pattern.to_owned(), policy })
}

/// Parses a spec such as `maxage:7d,maxlen:100000,exact`.
pub fn parse_spec(spec: &str) -> Result<TrimPolicy, String> {
    let mut policy = TrimPolicy::default();
    let mut keep = false;
    let mut mode = None;
    let items: Vec<&str> = spec.split(',').map(str::trim).collect();
    for item in &items {
        let (name, value) = match item.split_once(':') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (*item, None),
        };
        match (name, value) {
            ("maxlen", Some(value)) => {
                let n = value.parse::<u64>().map_err(|_| {
                    format!("{item:?}: maxlen must be a whole number of entries, e.g. maxlen:10000")
                })?;
                set_once(&mut policy.max_len, n, item)?;
            }
            ("maxage", Some(value)) => {
                let age = parse_duration(value).map_err(|e| format!("{item:?}: {e}"))?;
                set_once(&mut policy.max_age, age, item)?;
            }
            ("exact" | "approx" | "~", None) => {
                if mode.replace(name).is_some() {
                    return Err(format!("{item:?}: give exact or approx once"));
                }
                policy.exact = name == "exact";
            }
            ("keep", None) => keep = true,
            ("", None) => return Err("empty policy: give maxlen:N, maxage:DURATION or keep".into()),
            _ => {
                return Err(format!(
                    "{item:?} is not a policy item: use maxlen:N, maxage:DURATION, exact, approx or keep"
                ));
            }
        }
    }
    if keep && items.len() > 1 {
        return Err(format!("{spec:?}: keep cannot be combined with other items"));
    }
    if !keep && policy.keeps_all() {
        return Err(format!("{spec:?} sets no bound: give maxlen:N or maxage:DURATION (or keep)"));
    }
    Ok(policy)
}

fn set_once<T>(slot: &mut Option<T>, value: T, item: &str) -> Result<(), String> {
    if slot.replace(value).is_some() {
        return Err(format!("{item:?}: this bound is given twice"));
    }
    Ok(())
}

/// The configured rules and the default, resolved per stream name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    rules: Vec<PolicyRule>,
    default: TrimPolicy,
}

impl Policies {
    pub fn new(rules: Vec<PolicyRule>, default: TrimPolicy) -> Self {
        Self { rules, default }
    }

    /// The policy of the stream named `name` (its key without the prefix).
    pub fn for_stream(&self, name: &str) -> &TrimPolicy {
        let exact = self.rules.iter().find(|r| !r.is_glob() && r.pattern == name);
        let glob = || self.rules.iter().find(|r| r.is_glob() && glob_match(&r.pattern, name));
        exact.or_else(glob).map_or(&self.default, |rule| &rule.policy)
    }

    /// The policy of a partition's stream named `name` (`requests:2` on one Redis, `requests{p2}`
    /// or `dead{p2}` on a Redis Cluster): a rule for exactly its own name, else the policy of
    /// `base`, the name of the stream it is a partition of (`requests`, `dead`).
    pub fn for_partition(&self, name: &str, base: &str) -> &TrimPolicy {
        match self.rules.iter().find(|r| !r.is_glob() && r.pattern == name) {
            Some(rule) => &rule.policy,
            None => self.for_stream(base),
        }
    }
}

/// `*` matches any run of characters (also none, also `:`); everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and which name position it was last tried against.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            // Let the star swallow one more character and retry.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn parses_the_documented_examples() {
        let rule = parse_rule("requests=maxlen:10000").unwrap();
        assert_eq!(rule.pattern, "requests");
        assert_eq!(rule.policy, TrimPolicy { max_len: Some(10_000), ..TrimPolicy::default() });
        let rule = parse_rule("replies:*=maxage:1h").unwrap();
        assert_eq!(rule.policy.max_age, Some(Duration::from_secs(3600)));
        assert!(!rule.policy.exact);
        let rule = parse_rule(" dead = maxage:7d, maxlen:100000, exact ").unwrap();
        assert_eq!(
            rule.policy,
            TrimPolicy {
                max_age: Some(Duration::from_secs(7 * 86_400)),
                max_len: Some(100_000),
                exact: true
            }
        );
        assert!(parse_rule("audit=keep").unwrap().policy.keeps_all());
        assert_eq!(parse_spec("maxlen:0,approx").unwrap().max_len, Some(0));
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("requests", "no '='"),
            ("=maxlen:1", "stream pattern"),
            ("dead=maxage:7x", "\"maxage:7x\""),
            ("dead=maxlen:-1", "\"maxlen:-1\""),
            ("dead=maxlen:ten", "whole number"),
            ("dead=maxlen:1,maxlen:2", "twice"),
            ("dead=exact", "sets no bound"),
            ("dead=", "empty policy"),
            ("dead=maxlen:1,bogus", "\"bogus\" is not a policy item"),
            ("dead=keep,maxlen:1", "keep cannot be combined"),
            ("dead=maxlen:1,exact,approx", "exact or approx once"),
        ];
        for (text, needle) in cases {
            let error = parse_rule(text).unwrap_err();
            assert!(error.contains(needle), "{text:?}: {error}");
            if text.contains('=') && !text.starts_with('=') {
                assert!(error.contains(&format!("{:?}", text.trim())), "{text:?} names the rule: {error}");
            }
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("replies:*", "replies:ingress-1"));
        assert!(glob_match("replies:*", "replies:"));
        assert!(!glob_match("replies:*", "replies"));
        assert!(glob_match("*", "anything:at:all"));
        assert!(glob_match("*dead", "dead"));
        assert!(glob_match("a*b*c", "aXXbYYbZc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("requests", "requests"));
        assert!(!glob_match("requests", "requests2"));
        assert!(glob_match("r*s", "rs"));
    }

    #[test]
    fn exact_rules_beat_patterns_and_the_first_pattern_wins() {
        let rule = |t: &str| parse_rule(t).unwrap();
        let policies = Policies::new(
            vec![rule("replies:*=maxage:1h"), rule("*=maxlen:5"), rule("replies:special=maxlen:7")],
            parse_spec("maxlen:10000").unwrap(),
        );
        assert_eq!(policies.for_stream("replies:special").max_len, Some(7));
        assert_eq!(policies.for_stream("replies:a").max_age, Some(Duration::from_secs(3600)));
        assert_eq!(policies.for_stream("requests").max_len, Some(5));
        let default_only = Policies::new(vec![rule("dead=keep")], parse_spec("maxlen:10000").unwrap());
        assert_eq!(default_only.for_stream("requests").max_len, Some(10_000));
        assert!(default_only.for_stream("dead").keeps_all());
    }

    #[test]
    fn a_partition_gets_the_policy_of_its_stream_unless_named_itself() {
        let rule = |t: &str| parse_rule(t).unwrap();
        let policies = Policies::new(
            vec![
                rule("requests=maxlen:5"),
                rule("dead=keep"),
                rule("requests{p2}=maxlen:7"),
                rule("*=maxlen:9"),
            ],
            parse_spec("maxlen:10000").unwrap(),
        );
        assert_eq!(policies.for_partition("requests:1", "requests").max_len, Some(5));
        assert_eq!(policies.for_partition("requests{p1}", "requests").max_len, Some(5));
        assert_eq!(policies.for_partition("requests{p2}", "requests").max_len, Some(7));
        assert!(policies.for_partition("dead{p0}", "dead").keeps_all());
        assert_eq!(policies.for_stream("requests{p1}").max_len, Some(9), "by its own name a pattern matches");
    }
}
