//! The compiled routing table: hostnames (exact and wildcard), request matches and the Gateway
//! API's precedence between them, evaluated per request without locks or allocation-heavy work.

use std::{cmp::Reverse, sync::Arc};

use http::{HeaderMap, HeaderName, Method};
use regex_lite::Regex;

use super::config::RuleAction;

/// A hostname as a listener or a route gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// `www.example.com`.
    Exact(String),
    /// `*.example.com`, kept as the suffix `.example.com`: matches one or more labels before
    /// it (`a.example.com`, `a.b.example.com`) but never `example.com` itself (Gateway API).
    Wildcard(String),
    /// No hostname: every host.
    Any,
}

impl HostPattern {
    /// Parses a Gateway API hostname (lowercased; a `*.` prefix makes a wildcard).
    #[must_use]
    pub fn parse(s: &str) -> Self {
        let s = s.to_ascii_lowercase();
        match s.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => Self::Wildcard(suffix.to_owned()),
            _ if s.is_empty() => Self::Any,
            _ => Self::Exact(s),
        }
    }

    /// Whether `host` (lowercase, without port) matches.
    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
            Self::Any => true,
        }
    }

    /// Sort key, most specific first: exact, then wildcards by suffix length, then any.
    fn specificity(&self) -> (u8, Reverse<usize>) {
        match self {
            Self::Exact(h) => (0, Reverse(h.len())),
            Self::Wildcard(s) => (1, Reverse(s.len())),
            Self::Any => (2, Reverse(0)),
        }
    }

    /// The hostnames a route serves on a listener: the intersection of the two (Gateway API
    /// "hostname matching" between `Listener.hostname` and `HTTPRoute.hostnames`); `None` when
    /// they do not intersect (the route does not attach to that listener).
    #[must_use]
    pub fn intersect(listener: &Self, route: &Self) -> Option<Self> {
        match (listener, route) {
            (Self::Any, r) => Some(r.clone()),
            (l, Self::Any) => Some(l.clone()),
            (Self::Exact(l), Self::Exact(r)) => (l == r).then(|| listener.clone()),
            (Self::Wildcard(_), Self::Exact(r)) => listener.matches(r).then(|| route.clone()),
            (Self::Exact(l), Self::Wildcard(_)) => route.matches(l).then(|| listener.clone()),
            (Self::Wildcard(l), Self::Wildcard(r)) => {
                if r.ends_with(l.as_str()) {
                    Some(route.clone())
                } else if l.ends_with(r.as_str()) {
                    Some(listener.clone())
                } else {
                    None
                }
            }
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(s) => write!(f, "*{s}"),
            Self::Any => f.write_str("*"),
        }
    }
}

/// How a path is matched.
#[derive(Clone, Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, kept without a trailing `/`: `/foo` matches `/foo`, `/foo/` and
    /// `/foo/bar`, never `/foobar` (Gateway API `PathPrefix`). `/` is kept as the empty string.
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    /// Whether `path` (without query) matches.
    #[must_use]
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => p == path,
            Self::Prefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            Self::Regex(r) => r.is_match(path),
        }
    }

    /// Precedence: exact paths first, then regular expressions (Envoy Gateway's order; the
    /// specification leaves regex precedence to the implementation), then prefixes; longer
    /// before shorter within each.
    fn rank(&self) -> (u8, Reverse<usize>) {
        match self {
            Self::Exact(p) => (0, Reverse(p.len())),
            Self::Regex(r) => (1, Reverse(r.as_str().len())),
            Self::Prefix(p) => (2, Reverse(p.len())),
        }
    }
}

/// How a header or query value is matched.
#[derive(Clone, Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    #[must_use]
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v) => v == value,
            Self::Regex(r) => r.is_match(value),
        }
    }
}

/// One `HTTPRouteMatch` (or a `GRPCRouteMatch` turned into its path form): every condition
/// must hold.
#[derive(Clone, Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    /// Query parameter names are case-sensitive (Gateway API).
    pub query: Vec<(String, ValueMatch)>,
}

impl RouteMatch {
    /// Whether the request matches.
    #[must_use]
    pub fn matches(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &HeaderMap,
    ) -> bool {
        match &self.method {
            Some(m) if m != method => return false,
            // `CONNECT` opens a tunnel: only a rule that names the method takes it (Envoy
            // routes `CONNECT` only by a route's `connect_matcher`), so an existing route
            // never starts relaying raw bytes because a client asked.
            None if *method == Method::CONNECT => return false,
            _ => {}
        }
        if !self.path.matches(path) {
            return false;
        }
        // A header given several times matches on its first value, as Envoy does for
        // non-list headers; names are case-insensitive (HeaderName is lowercase).
        let headers_ok = self.headers.iter().all(|(name, m)| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| m.matches(v))
        });
        // A repeated query parameter matches on its first value (the spec allows any choice).
        headers_ok
            && self.query.iter().all(|(name, m)| {
                query
                    .iter()
                    .find(|(k, _)| k == name)
                    .is_some_and(|(_, v)| m.matches(v))
            })
    }
}

/// Where a matched rule came from, for precedence between routes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteOrigin {
    /// `metadata.creationTimestamp` as RFC 3339 (sorts chronologically); `None` (the static
    /// file without timestamps) sorts after every timestamped route.
    pub created: Option<String>,
    /// `namespace/name`.
    pub name: String,
    pub rule: usize,
    pub matched: usize,
}

/// One (match, rule) pair of the table.
#[derive(Clone, Debug)]
pub struct Entry {
    pub matcher: RouteMatch,
    pub origin: RouteOrigin,
    pub action: Arc<RuleAction>,
}

impl Entry {
    /// The Gateway API's order: exact path, longest prefix, method, most header matches, most
    /// query matches; then the oldest route, then `namespace/name`, then rule and match order.
    fn key(&self) -> impl Ord + '_ {
        (
            self.matcher.path.rank(),
            self.matcher.method.is_none(),
            Reverse(self.matcher.headers.len()),
            Reverse(self.matcher.query.len()),
            (self.origin.created.is_none(), &self.origin),
        )
    }
}

/// The rules served for one hostname pattern of one port (Envoy's virtual host).
#[derive(Clone, Debug)]
pub struct VirtualHost {
    pub host: HostPattern,
    /// Sorted by precedence: the first match wins.
    pub entries: Vec<Entry>,
}

impl VirtualHost {
    /// Sorts the entries by precedence.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.key().cmp(&b.key()));
    }

    /// The first entry (by precedence) matching the request.
    #[must_use]
    pub fn find(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &HeaderMap,
    ) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.matcher.matches(method, path, query, headers))
    }
}

/// Virtual hosts of one port, most specific hostname first.
#[derive(Clone, Debug, Default)]
pub struct HostTable {
    pub vhosts: Vec<VirtualHost>,
}

impl HostTable {
    /// Adds `entry` under `host`.
    pub fn add(&mut self, host: HostPattern, entry: Entry) {
        if let Some(v) = self.vhosts.iter_mut().find(|v| v.host == host) {
            v.entries.push(entry);
        } else {
            self.vhosts.push(VirtualHost {
                host,
                entries: vec![entry],
            });
        }
    }

    /// Orders hosts by specificity and each host's rules by precedence.
    pub fn finish(&mut self) {
        self.vhosts.sort_by_key(|v| v.host.specificity());
        for v in &mut self.vhosts {
            v.sort();
        }
    }

    /// The most specific virtual host for `host` (Envoy picks one virtual host and never falls
    /// back to a less specific one when its routes do not match: the request gets 404).
    #[must_use]
    pub fn vhost(&self, host: &str) -> Option<&VirtualHost> {
        self.vhosts.iter().find(|v| v.host.matches(host))
    }
}

/// Splits a query string into pairs (no percent-decoding: values compare as sent).
#[must_use]
pub fn query_pairs(query: Option<&str>) -> Vec<(&str, &str)> {
    query
        .map(|q| {
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_one_or_more_labels_but_not_the_apex() {
        let w = HostPattern::parse("*.example.com");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("aexample.com"));
        assert_eq!(
            HostPattern::intersect(&w, &HostPattern::parse("foo.example.com")),
            Some(HostPattern::parse("foo.example.com"))
        );
        assert_eq!(
            HostPattern::intersect(&w, &HostPattern::parse("*.a.example.com")),
            Some(HostPattern::parse("*.a.example.com"))
        );
        assert_eq!(
            HostPattern::intersect(&w, &HostPattern::parse("foo.other.com")),
            None
        );
    }

    #[test]
    fn connect_is_taken_only_by_a_rule_that_names_it() {
        let headers = HeaderMap::new();
        let any = RouteMatch {
            path: PathMatch::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        };
        let connect = RouteMatch {
            method: Some(Method::CONNECT),
            ..any.clone()
        };
        // A `CONNECT` request has no path ("" in its authority-form URI).
        assert!(!any.matches(&Method::CONNECT, "", &[], &headers));
        assert!(connect.matches(&Method::CONNECT, "", &[], &headers));
        assert!(any.matches(&Method::GET, "/", &[], &headers));
        assert!(!connect.matches(&Method::GET, "/", &[], &headers));
        // A path match other than the default never takes a `CONNECT`.
        let exact = RouteMatch {
            path: PathMatch::Exact("/".into()),
            ..connect.clone()
        };
        assert!(!exact.matches(&Method::CONNECT, "", &[], &headers));
    }

    #[test]
    fn prefixes_match_whole_path_elements() {
        let p = PathMatch::Prefix("/foo".into());
        assert!(p.matches("/foo"));
        assert!(p.matches("/foo/"));
        assert!(p.matches("/foo/bar"));
        assert!(!p.matches("/foobar"));
        assert!(PathMatch::Prefix(String::new()).matches("/anything"));
    }
}
