//! The HBONE `CONNECT` request: building it (outbound) and parsing it (inbound), as ztunnel
//! writes it — `:authority` = destination pod `ip:port`, `baggage`, `forwarded`, `traceparent`.
//!
//! Everything here parses bytes from the network; `tests::parser_never_panics` fuzzes it.

use std::fmt::Write as _;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderMap, HeaderValue, Method, Request, header::HeaderName};

use crate::identity::SpiffeId;

/// Largest header value we read (baggage and forwarded are short; anything longer is refused).
pub const MAX_HEADER_LEN: usize = 8 * 1024;
/// Most baggage members kept (W3C baggage allows 64 list members).
pub const MAX_BAGGAGE: usize = 64;

pub const BAGGAGE: &str = "baggage";
pub const FORWARDED: &str = "forwarded";
pub const TRACEPARENT: &str = "traceparent";

/// Why the inbound side answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("no :authority")]
    NoAuthority,
    #[error(":authority {0:?} is not a pod ip:port")]
    Authority(String),
    #[error("header {name}: {reason}")]
    Header { name: &'static str, reason: String },
}

/// A parsed `CONNECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The destination pod.
    pub authority: SocketAddr,
    /// The source workload's address from `forwarded: for=` (ztunnel's inbound uses it as the
    /// original source; absent, the caller's own address is used).
    pub forwarded_for: Option<SocketAddr>,
    /// `forwarded: host=` — the service the client aimed at, for logs.
    pub forwarded_host: Option<String>,
    /// `baggage` members (malformed members are skipped, as a tracing header must not fail a
    /// connection).
    pub baggage: Vec<(String, String)>,
    /// A valid W3C `traceparent`, if one was sent.
    pub traceparent: Option<String>,
}

/// `ip:port` with a non-zero port and a unicast address (IPv6 in brackets). Hostnames are
/// refused: ztunnel's authority is always an address.
pub fn parse_authority(s: &str) -> Result<SocketAddr, BadRequest> {
    let bad = || BadRequest::Authority(s.chars().take(256).collect());
    let addr: SocketAddr = s.parse().map_err(|_| bad())?;
    let ip = addr.ip();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
        return Err(bad());
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err(bad());
    }
    Ok(addr)
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// RFC 7239 `forwarded`: the first element's `for` (address, optionally with port) and `host`.
pub fn parse_forwarded(value: &[u8]) -> Result<(Option<SocketAddr>, Option<String>), BadRequest> {
    let err = |reason: &str| BadRequest::Header {
        name: FORWARDED,
        reason: reason.to_owned(),
    };
    let text = std::str::from_utf8(value).map_err(|_| err("not UTF-8"))?;
    let first = text.split(',').next().unwrap_or_default();
    let (mut addr, mut host) = (None, None);
    for pair in first.split(';') {
        let Some((k, v)) = pair.split_once('=') else {
            if pair.trim().is_empty() {
                continue;
            }
            return Err(err("element without '='"));
        };
        let v = unquote(v);
        match k.trim().to_ascii_lowercase().as_str() {
            "for" => {
                let parsed = v.parse::<SocketAddr>().ok().or_else(|| {
                    let bare = v
                        .strip_prefix('[')
                        .and_then(|b| b.strip_suffix(']'))
                        .unwrap_or(v);
                    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
                });
                addr = Some(parsed.ok_or_else(|| err("for= is not an address"))?);
            }
            "host" => host = Some(v.to_owned()),
            _ => {}
        }
    }
    Ok((addr, host))
}

/// W3C baggage: `key=value` members separated by commas, properties after `;` dropped.
#[must_use]
pub fn parse_baggage(value: &[u8]) -> Vec<(String, String)> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Vec::new();
    };
    text.split(',')
        .filter_map(|m| {
            let m = m.split(';').next()?;
            let (k, v) = m.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
        })
        .take(MAX_BAGGAGE)
        .collect()
}

/// A W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero), or `None`.
#[must_use]
pub fn parse_traceparent(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0');
    ok.then(|| text.to_ascii_lowercase())
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<Option<&'a [u8]>, BadRequest> {
    let Some(v) = headers.get(name) else {
        return Ok(None);
    };
    if v.len() > MAX_HEADER_LEN {
        return Err(BadRequest::Header {
            name,
            reason: format!("longer than {MAX_HEADER_LEN} bytes"),
        });
    }
    Ok(Some(v.as_bytes()))
}

/// Parses an inbound request (as h2 hands it over).
pub fn parse_request<B>(req: &Request<B>) -> Result<ConnectRequest, BadRequest> {
    if req.method() != Method::CONNECT {
        return Err(BadRequest::Method(req.method().to_string()));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or(BadRequest::NoAuthority)?
        .as_str();
    let authority = parse_authority(authority)?;
    let headers = req.headers();
    let (forwarded_for, forwarded_host) = match header(headers, FORWARDED)? {
        Some(v) => parse_forwarded(v)?,
        None => (None, None),
    };
    let baggage = header(headers, BAGGAGE)?
        .map(parse_baggage)
        .unwrap_or_default();
    let traceparent = header(headers, TRACEPARENT)?.and_then(parse_traceparent);
    Ok(ConnectRequest {
        authority,
        forwarded_for,
        forwarded_host,
        baggage,
        traceparent,
    })
}

/// What the outbound side knows about the source, for the request's headers.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    /// The source pod's address as its socket had it.
    pub addr: Option<SocketAddr>,
    /// `k8s.<type>.name` of the source's workload, e.g. `("deployment", "web")`.
    pub workload: Option<(String, String)>,
    /// The service hostname the client aimed at, if it aimed at a service.
    pub service_host: Option<String>,
}

/// Istio's default cluster id, sent as `k8s.cluster.name` (ztunnel sends its `CLUSTER_ID`).
pub const CLUSTER_NAME: &str = "Kubernetes";

static TRACE_SEQ: AtomicU64 = AtomicU64::new(1);

/// A fresh random-looking trace context; ids need uniqueness, not secrecy, so a randomly keyed
/// `SipHash` of a counter and the clock serves (no RNG dependency).
fn new_traceparent() -> String {
    let state = std::collections::hash_map::RandomState::new();
    let seq = TRACE_SEQ.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let word = |salt: u64| {
        let mut h = state.build_hasher();
        h.write_u64(seq);
        h.write_u128(nanos);
        h.write_u64(salt);
        h.finish() | 1
    };
    format!("00-{:016x}{:016x}-{:016x}-01", word(1), word(2), word(3))
}

/// The outbound `CONNECT` to `dst` for `source` (its identity gives the namespace).
pub fn build_request(
    dst: SocketAddr,
    source: &SpiffeId,
    info: &SourceInfo,
) -> Result<Request<()>, http::Error> {
    let mut baggage = format!(
        "k8s.cluster.name={CLUSTER_NAME},k8s.namespace.name={}",
        source.namespace()
    );
    if let Some((kind, name)) = &info.workload {
        let _ = write!(baggage, ",k8s.{kind}.name={name},service.name={name}");
    }
    let mut builder = Request::builder()
        .method(Method::CONNECT)
        .uri(dst.to_string())
        .header(HeaderName::from_static(BAGGAGE), baggage)
        .header(HeaderName::from_static(TRACEPARENT), new_traceparent());
    if let Some(addr) = info.addr {
        let mut fwd = format!("for=\"{addr}\"");
        if let Some(host) = &info.service_host
            && HeaderValue::from_str(host).is_ok()
        {
            let _ = write!(fwd, ";host={host}");
        }
        builder = builder.header(HeaderName::from_static(FORWARDED), fwd);
    }
    builder.body(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_build_request_sends() {
        let src: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let info = SourceInfo {
            addr: Some("10.1.0.2:40000".parse().unwrap()),
            workload: Some(("deployment".into(), "web".into())),
            service_host: Some("cart.shop.svc.cluster.local".into()),
        };
        let req = build_request("10.2.0.3:8080".parse().unwrap(), &src, &info).unwrap();
        let parsed = parse_request(&req).unwrap();
        assert_eq!(parsed.authority, "10.2.0.3:8080".parse().unwrap());
        assert_eq!(parsed.forwarded_for, info.addr);
        assert_eq!(
            parsed.forwarded_host.as_deref(),
            Some("cart.shop.svc.cluster.local")
        );
        assert!(
            parsed
                .baggage
                .contains(&("k8s.namespace.name".into(), "shop".into()))
        );
        assert!(parsed.traceparent.is_some());
        let v6 = build_request("[fd00:2::3]:80".parse().unwrap(), &src, &info).unwrap();
        assert_eq!(
            parse_request(&v6).unwrap().authority,
            "[fd00:2::3]:80".parse().unwrap()
        );
    }

    #[test]
    fn refuses_malformed_authorities() {
        for bad in [
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "0.0.0.0:80",
            "[::1]",
            "224.0.0.1:5",
            "1.2.3.4:70000",
            "",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad}");
        }
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        assert!(matches!(parse_request(&req), Err(BadRequest::Authority(_))));
        let get = Request::builder()
            .uri("http://10.0.0.1:80/")
            .body(())
            .unwrap();
        assert!(matches!(parse_request(&get), Err(BadRequest::Method(_))));
        assert!(parse_forwarded(b"for=nope").is_err());
        assert_eq!(
            parse_forwarded(b"for=\"[fd00::1]\";proto=http, for=1.2.3.4")
                .unwrap()
                .0,
            Some("[fd00::1]:0".parse().unwrap())
        );
        assert_eq!(
            parse_traceparent(b"00-00000000000000000000000000000000-0000000000000001-01"),
            None
        );
    }

    /// Bytes a hostile client could put in each field: printable noise, the grammar's own
    /// characters, and raw bytes.
    fn noise() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "[\\[\\]0-9a-fA-F:.;,=\" fortshap-]{0,120}".prop_map(String::into_bytes),
        ]
    }

    fn fields() -> impl Strategy<Value = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>)> {
        (noise(), noise(), noise(), noise())
    }

    /// One case: the CONNECT parser (authority and every header) and the SNI decoder return, never panics, on any
    /// input, and what it accepts is within its stated bounds.
    fn check(
        (authority, forwarded, baggage, trace): (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>),
    ) -> Result<(), TestCaseError> {
        let auth_text = String::from_utf8_lossy(&authority).into_owned();
        if let Ok(addr) = parse_authority(&auth_text) {
            prop_assert!(addr.port() != 0);
        }
        let _ = parse_forwarded(&forwarded);
        // The SNI name the server decodes is network input too.
        let _ = crate::proxy::tls::id_from_sni(&auth_text);
        prop_assert!(parse_baggage(&baggage).len() <= MAX_BAGGAGE);
        if let Some(t) = parse_traceparent(&trace) {
            prop_assert_eq!(t.len(), 55);
        }
        // The whole request, whenever http can even represent it.
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(auth_text.as_str());
        for (name, value) in [
            (FORWARDED, &forwarded),
            (BAGGAGE, &baggage),
            (TRACEPARENT, &trace),
        ] {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                builder = builder.header(name, v);
            }
        }
        if let Ok(req) = builder.body(()) {
            let _ = parse_request(&req);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4_000, ..ProptestConfig::default() })]
        #[test]
        fn parser_never_panics(case in fields()) {
            check(case)?;
        }
    }

    /// A timed run: 1 s in every `cargo test`; the long run recorded in `BENCHMARKS.md` sets
    /// `HBONE_FUZZ_SECS=600`: `cargo test -p mesh-agent --lib parser_fuzz_timed -- --nocapture`.
    #[test]
    fn parser_fuzz_timed() {
        use proptest::test_runner::TestRunner;
        let secs = std::env::var("HBONE_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let started = std::time::Instant::now();
        let deadline = started + std::time::Duration::from_secs(secs);
        let batch = 5_000;
        let config = ProptestConfig {
            cases: batch,
            // A hand-made runner has no source file to persist failures next to.
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut cases = 0_u64;
        while std::time::Instant::now() < deadline {
            // A runner counts its successes: a fresh one (freshly seeded) per batch.
            TestRunner::new(config.clone())
                .run(&fields(), check)
                .unwrap();
            cases += u64::from(batch);
        }
        println!(
            "parser_fuzz_timed: {cases} cases in {:.0} s, no panic",
            started.elapsed().as_secs_f64()
        );
    }
}
