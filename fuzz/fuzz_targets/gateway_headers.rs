//! Fuzz target: the gateway's request-head handling (host, matching with regexes, header
//! filters, hop-by-hop removal, rewrites, trace context) never panics on any request head.
#![no_main]

use std::{path::Path, sync::OnceLock};

use mesh_agent::gateway::config::{GatewayConfig, parse};

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: gw }
spec:
  gatewayClassName: mesh
  listeners: [{ name: http, port: 80, protocol: HTTP }, { name: w, port: 80, protocol: HTTP, hostname: "*.example.com" }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r }
spec:
  parentRefs: [{ name: gw }]
  rules:
    - matches: [{ path: { type: RegularExpression, value: "/a/[0-9]+" }, headers: [{ name: x-v, type: RegularExpression, value: "v.*" }] }]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: { set: [{ name: x-set, value: s }], add: [{ name: x-add, value: a }], remove: [x-drop] }
      backendRefs: [{ name: a, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /p }, queryParams: [{ name: q, value: "1" }] }]
      filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: / } } }]
      backendRefs: [{ name: b, port: 80 }]
    - backendRefs: [{ name: c, port: 80 }]
"#;

fn config() -> &'static GatewayConfig {
    static C: OnceLock<GatewayConfig> = OnceLock::new();
    C.get_or_init(|| parse(Path::new("routes.yaml"), ROUTES).expect("the fixed routes parse"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Lines: method, target, then `name: value` headers.
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let mut b = http::Request::builder()
        .method(lines.next().unwrap_or("GET").trim())
        .uri(lines.next().unwrap_or("/").trim());
    for l in lines {
        if let Some((n, v)) = l.split_once(':') {
            b = b.header(n.trim(), v.trim());
        }
    }
    if let Ok(req) = b.body(()) {
        let _ = mesh_agent::gateway::proxy::process_head(config(), 80, &req);
    }
});
