//! Reading an agent's `:15020/metrics` inside a harness node: a plain HTTP GET, the text
//! exposition parsed into samples, sums over label sets.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    time::Duration,
};

use crate::NodeHandle;

/// The agent's metrics port (ztunnel's).
pub const METRICS_PORT: u16 = 15020;

/// A plain HTTP/1.1 GET; (status, body).
pub fn http_get(addr: &str, path: &str, accept: &str) -> Result<(u16, String), String> {
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    c.read_to_end(&mut resp).map_err(|e| e.to_string())?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").ok_or("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no status")?;
    // hyper answers `Connection: close` requests without chunking (a `Full` body has a length).
    Ok((code, body.to_owned()))
}

/// GET inside `node`'s network namespace.
#[must_use]
pub fn get_in(node: &NodeHandle, addr: &str, path: &str) -> (u16, String) {
    let (addr, target) = (addr.to_owned(), path.to_owned());
    node.run(move || http_get(&addr, &target, "text/plain"))
        .expect("running in the node")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One agent's scrape.
#[must_use]
pub fn scrape(node: &NodeHandle) -> String {
    let (code, body) = get_in(node, &format!("{}:{METRICS_PORT}", node.ipv4()), "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// Parses `name{labels} value` lines: (name, labels, value).
#[must_use]
pub fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value.parse().ok()?))
        })
        .collect()
}

/// The sum of `name` over the series whose labels include every pair of `want`.
#[must_use]
pub fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}
