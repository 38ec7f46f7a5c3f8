//! Fuzz target (property-based, runs on stable) for the security-policy objects: arbitrary and
//! mutated `AuthorizationPolicy`/`PeerAuthentication` objects, as JSON values and as YAML text,
//! go through the one parser and, when accepted, through the engine and the kernel-verdict
//! expansion. Nothing may panic, and the kernel's lookup must agree with the engine.
//!
//! `cargo test -p mesh-agent --test authz_fuzz` runs a short pass; a long run:
//! `AUTHZ_FUZZ_SECS=600 cargo test --release -p mesh-agent --test authz_fuzz -- --nocapture`
//! (prints cases and time; recorded in BENCHMARKS.md).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use mesh_agent::{
    authz::{
        AuthzIndex, UNAUTHENTICATED, evaluate, kernel_entries, kernel_lookup, parse_authorization,
        parse_peer_authentication,
    },
    identity::SpiffeId,
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use serde_json::{Value, json};

/// A valid policy using every L4 field: mutations start from it, so they reach deep checks.
fn seed() -> Value {
    json!({
        "apiVersion": "security.kernmesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "p", "namespace": "shop" },
        "spec": {
            "selector": { "matchLabels": { "app": "web" } },
            "action": "ALLOW",
            "rules": [{
                "from": [{ "source": {
                    "principals": ["cluster.local/ns/a/sa/b", "cluster.local/ns/x/*", "*/sa/c", "*"],
                    "notPrincipals": ["spiffe://cluster.local/ns/a/sa/bad"],
                    "namespaces": ["shop", "dev*"],
                    "notNamespaces": ["*-test"],
                } }],
                "to": [{ "operation": { "ports": ["80", "8080"], "notPorts": ["22"] } }],
            }],
        },
    })
}

fn peer_seed() -> Value {
    json!({
        "apiVersion": "security.kernmesh.io/v1alpha1",
        "kind": "PeerAuthentication",
        "metadata": { "name": "default", "namespace": "shop" },
        "spec": { "selector": { "matchLabels": { "app": "web" } }, "mtls": { "mode": "STRICT" } },
    })
}

/// Leaves: the values that hit the parser's edges.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "*",
            "**",
            "a*b",
            "*a*",
            "ALLOW",
            "DENY",
            "AUDIT",
            "STRICT",
            "DISABLE",
            "0",
            "65535",
            "65536",
            "-1",
            "80",
            "spiffe://",
            "cluster.local/ns/a/sa/b",
            "GET",
            "/x",
        ])
        .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ]
}

/// Arbitrary JSON, a few levels deep, with the policy's field names likely as keys.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "apiVersion",
            "kind",
            "metadata",
            "name",
            "namespace",
            "spec",
            "selector",
            "matchLabels",
            "action",
            "rules",
            "from",
            "to",
            "when",
            "source",
            "operation",
            "principals",
            "notPrincipals",
            "namespaces",
            "notNamespaces",
            "ports",
            "notPorts",
            "methods",
            "paths",
            "mtls",
            "mode",
            "portLevelMtls",
            "status",
            "ipBlocks",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z]{0,8}",
    ];
    leaf().prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer of `v`.
fn pointers(v: &Value, at: &str, out: &mut Vec<String>) {
    out.push(at.to_owned());
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, c)| pointers(c, &format!("{at}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, c)| pointers(c, &format!("{at}/{i}"), out)),
        _ => {}
    }
}

/// A seed with up to four of its nodes replaced by arbitrary values.
fn mutated(seed: Value) -> impl Strategy<Value = Value> {
    let mut paths = Vec::new();
    pointers(&seed, "", &mut paths);
    prop::collection::vec((prop::sample::select(paths), arbitrary_json()), 1..5).prop_map(
        move |edits| {
            let mut v = seed.clone();
            for (path, new) in edits {
                if path.is_empty() {
                    v = new;
                } else if let Some(slot) = v.pointer_mut(&path) {
                    *slot = new;
                }
            }
            v
        },
    )
}

/// Well-formed policies built from random parts: most are valid, so the engine's matching is
/// exercised on many shapes (empty rules, empty sources, DENY/ALLOW, wildcards, ports).
fn generated() -> impl Strategy<Value = Value> {
    let pattern = prop::sample::select(vec![
        "*",
        "cluster.local/ns/a/sa/b",
        "cluster.local/ns/x/*",
        "*/sa/c",
        "a",
        "x*",
        "*test",
        "shop",
        "dev*",
        "spiffe://cluster.local/ns/shop/sa/c",
    ]);
    let list = move || prop::option::of(prop::collection::vec(pattern.clone(), 0..3));
    let source = (list(), list(), list(), list()).prop_map(|(p, np, n, nn)| {
        let mut s = serde_json::Map::new();
        for (k, v) in [
            ("principals", p),
            ("notPrincipals", np),
            ("namespaces", n),
            ("notNamespaces", nn),
        ] {
            if let Some(v) = v {
                s.insert(k.into(), json!(v));
            }
        }
        json!({ "source": s })
    });
    let ports = || {
        prop::option::of(prop::collection::vec(
            (1_u16..=65535).prop_map(|p| p.to_string()),
            0..3,
        ))
    };
    let operation = (ports(), ports()).prop_map(|(p, np)| {
        let mut o = serde_json::Map::new();
        if let Some(p) = p {
            o.insert("ports".into(), json!(p));
        }
        if let Some(np) = np {
            o.insert("notPorts".into(), json!(np));
        }
        json!({ "operation": o })
    });
    let rule = (
        prop::option::of(prop::collection::vec(source, 0..3)),
        prop::option::of(prop::collection::vec(operation, 0..3)),
    )
        .prop_map(|(from, to)| {
            let mut r = serde_json::Map::new();
            if let Some(f) = from {
                r.insert("from".into(), json!(f));
            }
            if let Some(t) = to {
                r.insert("to".into(), json!(t));
            }
            Value::Object(r)
        });
    (
        prop::option::of(prop::sample::select(vec!["ALLOW", "DENY"])),
        prop::option::of(prop::collection::vec(rule, 0..4)),
        any::<bool>(),
    )
        .prop_map(|(action, rules, selector)| {
            let mut spec = serde_json::Map::new();
            if let Some(a) = action {
                spec.insert("action".into(), json!(a));
            }
            if let Some(r) = rules {
                spec.insert("rules".into(), json!(r));
            }
            if selector {
                spec.insert(
                    "selector".into(),
                    json!({ "matchLabels": { "app": "web" } }),
                );
            }
            let mut v = seed();
            v["spec"] = Value::Object(spec);
            v
        })
}

#[derive(Debug, Clone)]
enum Input {
    Json(Value),
    Yaml(String),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        3 => generated().prop_map(Input::Json),
        3 => mutated(seed()).prop_map(Input::Json),
        1 => mutated(peer_seed()).prop_map(Input::Json),
        1 => arbitrary_json().prop_map(Input::Json),
        // YAML text: a valid object's text with bytes flipped, and arbitrary text.
        1 => (mutated(seed()), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, i, b)| {
            let mut text = serde_json::to_string(&v).unwrap_or_default().into_bytes();
            if !text.is_empty() {
                let at = i.index(text.len());
                text[at] = b;
            }
            Input::Yaml(String::from_utf8_lossy(&text).into_owned())
        }),
        1 => ".{0,200}".prop_map(Input::Yaml),
    ]
}

fn ids() -> Vec<SpiffeId> {
    [
        ("a", "b"),
        ("x", "y"),
        ("shop", "c"),
        ("dev1", "bad"),
        ("a-test", "z"),
    ]
    .iter()
    .map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa).unwrap())
    .collect()
}

/// Objects the parser accepted (so the engine ran on them).
static ACCEPTED: AtomicU64 = AtomicU64::new(0);
/// Inputs checked (counted, not assumed from the configured case count).
static CASES: AtomicU64 = AtomicU64::new(0);

fn check(input: &Input) {
    let value = match input {
        Input::Json(v) => v.clone(),
        Input::Yaml(t) => match serde_saphyr::from_str::<Value>(t) {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    let peer = parse_peer_authentication(&value);
    if let Err(e) = &peer.outcome {
        assert!(!e.to_string().is_empty());
    }
    let parsed = parse_authorization(&value);
    let Ok(_) = &parsed.outcome else {
        let msg = parsed.outcome.unwrap_err().to_string();
        assert!(msg.ends_with("; rejected as a whole"), "{msg}");
        return;
    };
    ACCEPTED.fetch_add(1, Ordering::Relaxed);
    let index = AuthzIndex::new(std::slice::from_ref(&parsed), "mesh-system");
    let labels = [("app", "web")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let workload = index.for_workload(&parsed.name.namespace, &labels);
    let ids = ids();
    let mut sources: Vec<(u32, Option<&SpiffeId>)> = vec![(UNAUTHENTICATED, None)];
    sources.extend(
        ids.iter()
            .enumerate()
            .map(|(i, id)| (i as u32 + 1, Some(id))),
    );
    let entries = kernel_entries(&[(7, &workload)], &sources);
    for (n, id) in &sources {
        for port in [1, 22, 80, 8080, 65535] {
            assert_eq!(
                kernel_lookup(&entries, *n, 7, port),
                evaluate(&workload, *id, port).allowed,
                "kernel and engine disagree: {value}"
            );
        }
    }
}

#[test]
fn policy_objects_never_panic_the_parser_or_the_engine() {
    let secs: u64 = std::env::var("AUTHZ_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    loop {
        // A fresh runner per round: a runner that finished its cases does not run again, and
        // each new one draws a new random seed.
        let mut runner = TestRunner::new(Config {
            cases: 2_000,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&input(), |i| {
                check(&i);
                CASES.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
            .unwrap();
        if Instant::now() >= deadline {
            break;
        }
    }
    let cases = CASES.load(Ordering::Relaxed);
    let accepted = ACCEPTED.load(Ordering::Relaxed);
    println!(
        "authz_fuzz: {cases} cases ({accepted} accepted policies evaluated) in {:.1} s, no panic",
        started.elapsed().as_secs_f64()
    );
    assert!(
        accepted > 0,
        "no generated policy was valid: the engine was never exercised"
    );
}

/// Istio's evaluation order as properties over generated policy sets:
/// - adding a DENY policy never allows what was denied (DENY only takes away);
/// - adding `ALLOW rules: [{}]` leaves exactly the DENY policies' verdicts (it allows
///   everything no DENY matches, whatever the other ALLOW policies say).
#[test]
fn evaluation_order_properties() {
    let mut runner = TestRunner::new(Config {
        cases: 500,
        failure_persistence: None,
        ..Config::default()
    });
    let set = prop::collection::vec(generated(), 0..5);
    runner
        .run(&(set, generated()), |(objects, extra)| {
            let parsed: Vec<_> = objects
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let mut v = v.clone();
                    v["metadata"]["name"] = json!(format!("p{i}"));
                    parse_authorization(&v)
                })
                .filter(|p| p.outcome.is_ok())
                .collect();
            let labels = [("app", "web")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into();
            let ids = ids();
            let peers: Vec<Option<&SpiffeId>> =
                std::iter::once(None).chain(ids.iter().map(Some)).collect();
            let verdicts = |ps: &[mesh_agent::authz::ParsedAuthz]| {
                let w = AuthzIndex::new(ps, "mesh-system").for_workload("shop", &labels);
                peers
                    .iter()
                    .flat_map(|id| [22, 80, 8080].map(|port| evaluate(&w, *id, port).allowed))
                    .collect::<Vec<bool>>()
            };
            let before = verdicts(&parsed);
            let mut extra = extra;
            extra["metadata"]["name"] = json!("extra");
            let mut with_deny = parsed.clone();
            extra["spec"]["action"] = json!("DENY");
            with_deny.push(parse_authorization(&extra));
            let after = verdicts(&with_deny);
            for (b, a) in before.iter().zip(&after) {
                prop_assert!(*b || !*a, "a DENY allowed something");
            }
            let denies: Vec<_> = parsed
                .iter()
                .filter(|p| {
                    p.outcome
                        .as_ref()
                        .is_ok_and(|s| s.action == mesh_agent::authz::Action::Deny)
                })
                .cloned()
                .collect();
            let deny_verdicts = verdicts(&denies);
            let mut allow_all = parsed.clone();
            allow_all.push(parse_authorization(&json!({
                "apiVersion": "security.kernmesh.io/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": { "name": "allow-all", "namespace": "shop" },
                "spec": { "rules": [{}] },
            })));
            prop_assert_eq!(
                verdicts(&allow_all),
                deny_verdicts,
                "allow-all leaves only DENY"
            );
            Ok(())
        })
        .unwrap();
}
