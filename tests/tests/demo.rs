//! The README's first command keeps working: runs the `mesh-demo` binary (as `cargo xtask demo`
//! does) and checks the story it tells actually happened — each promise on the line that
//! reports it (a result line, a flow line, a `meshctl` table row), never a word the narration
//! prints anyway.

/// The lines of `text` printed by `say` (4 spaces), without the indent.
fn said(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect()
}

/// The one line starting with `prefix`.
fn line<'a>(lines: &[&'a str], prefix: &str, text: &str) -> &'a str {
    let found: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(prefix))
        .collect();
    assert!(!found.is_empty(), "no line starts with {prefix:?}:\n{text}");
    found[0]
}

/// Flow lines of `meshctl flows` (`HH:MM:SS.ffffff VERDICT SOURCE SERVICE …`), as fields.
fn flows<'a>(lines: &[&'a str]) -> Vec<Vec<&'a str>> {
    lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            f.first().is_some_and(|t| {
                t.len() == 15 && t.as_bytes()[2] == b':' && t.as_bytes()[8] == b'.'
            })
        })
        .collect()
}

#[test]
fn the_demo_runs_and_shows_what_it_promises() {
    let Some(_k) = mesh_tests::kernel_test("demo") else {
        return;
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-demo"))
        .output()
        .expect("mesh-demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mesh-demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = said(&text);
    // [1] Where web-1 lives: its address names it in flow lines.
    let web1 = line(&lines, "pod web-1", &text)
        .split_whitespace()
        .nth(4)
        .expect("web-1's address")
        .to_owned();
    // [3] Round robin over three backends, and getpeername() undone.
    assert_eq!(
        line(&lines, "answers by backend:", &text),
        r#"answers by backend: {"web-0": 10, "web-1": 10, "web-2": 10}; errors: {}"#
    );
    assert_eq!(
        line(&lines, "the application saw the service address", &text),
        "the application saw the service address from getpeername(): true"
    );
    let flows = flows(&lines);
    // `meshctl flows --follow` shows the connections, named (the demo shows closes, which
    // carry bytes and duration, before opens).
    assert!(
        flows.iter().any(|f| f[1] == "close"
            && f[2] == "default/client"
            && f[3] == "default/web"
            && f.last().is_some_and(|d| d.ends_with("µs"))),
        "a close flow from the client to web with its duration:\n{text}"
    );
    // [4] Three refusals, then the circuit opens.
    assert!(
        line(&lines, "answers: ", &text)
            .ends_with(r#"errors seen by the client: {"ECONNREFUSED": 3}"#),
        "{text}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f[1] == "eject" && f[4].starts_with(&format!("{web1}:"))),
        "an eject flow for web-1 ({web1}):\n{text}"
    );
    // [5] The half-open probe succeeds: web-1 recovers.
    assert!(
        flows
            .iter()
            .any(|f| f[1] == "recover" && f[4].starts_with(&format!("{web1}:"))),
        "a recover flow for web-1 ({web1}):\n{text}"
    );
    // [6] Fail fast with no endpoints.
    assert!(
        line(&lines, "10.96.0.11:80: errors", &text)
            .starts_with(r#"10.96.0.11:80: errors {"EHOSTUNREACH": 100}, connect p50"#),
        "{text}"
    );
    // [7] Across the SIGKILL and restart not one connection failed, and the change made while
    // down is in the kernel.
    let restart = line(&lines, "agent back (adopted its pins);", &text);
    assert!(
        restart.ends_with(" connections meanwhile, 0 failed"),
        "{restart}"
    );
    let connections: u64 = restart
        .split_whitespace()
        .nth(5)
        .and_then(|n| n.parse().ok())
        .expect("a count of connections");
    assert_eq!(connections, 20_000, "{restart}");
    assert!(
        lines.iter().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 4 && f[1] == "web" && f[2] == "10.96.0.10:80" && f[4] == "least-connections"
        }),
        "meshctl services shows web on least-connections after the restart:\n{text}"
    );
    // [8] Same-node bypass: the payload did not cross the client's veth, and arrived intact.
    let prefix = "8 MiB echoed with web-0 (same node: bypass):";
    let same = line(&lines, prefix, &text);
    let crossed: u64 = same[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("bytes crossed");
    assert!(crossed < 1 << 20, "bypass: {same}");
    assert!(same.ends_with("sha256 intact: true"), "{same}");
    // [9] mTLS across nodes, then a DENY on the client's identity on both paths.
    mtls_step(&lines, &text);
    // [10] The agent reports itself ready.
    assert!(
        lines
            .iter()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["ready", "true"]),
        "meshctl status says ready:\n{text}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("demo finished in ")),
        "{text}"
    );
}

/// Step 9: the client's connections to the other node's pod travel over HBONE (node b's agent
/// logs the caller's identity); a DENY refuses it in the kernel on the same node and at node b.
fn mtls_step(lines: &[&str], text: &str) {
    assert_eq!(
        line(lines, "client → web-2 (node-b) directly:", text),
        r#"client → web-2 (node-b) directly: answers {"web-2": 10}, errors {}"#
    );
    assert!(
        line(lines, "node-b's agent:", text)
            .contains("HBONE stream admitted source=spiffe://cluster.local/ns/default/sa/frontend"),
        "{text}"
    );
    assert!(
        line(lines, "client → web-0 (same node", text)
            .ends_with(r#"answers {}, errors {"EACCES": 5}"#),
        "{text}"
    );
    assert!(
        line(lines, "client → web-2 (other node", text).contains("answers {}, errors {\""),
        "{text}"
    );
}
