//! The live telemetry switch: the static file's `telemetry:` section turns the connection log
//! on stdout and the OTLP connection-log export on or off without a restart (Istio's
//! `Telemetry` API); the `--access-log` / `--otlp-endpoint` flags are the defaults.
//!
//! ```yaml
//! telemetry:                 # optional; absent = the flags' setting
//!   accessLog: true          # the JSON connection line on stdout (default: --access-log)
//!   otlpLogs: false          # connection logs to --otlp-endpoint (default: on when it is set)
//! ```
//!
//! Istio: a `Telemetry` resource's `accessLogging: [{ providers: [{name: envoy}], disabled: …}]`
//! (the `envoy` stdout provider, or an `envoyOtelAls`/OpenTelemetry provider for OTLP) is pushed
//! by istiod over xDS and Envoy/ztunnel apply it to new connections without a restart; an
//! invalid resource is refused by istiod's validating webhook and the previous one stays. Here
//! a bad section rejects the file (file, line, field, reason; the last good file and its
//! setting keep serving), and a switch applies to the next batch of flows read from the ring:
//! records already formatted stay queued in the stdout buffer and the OTLP exporter, which a
//! switch never tears down, so nothing queued is lost. Removing the section goes back to the
//! flags' setting (as deleting the `Telemetry` resource goes back to the mesh default).

use std::{
    path::Path,
    sync::{
        OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

/// The `telemetry:` section as written; `None` fields take the flags' setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Setting {
    pub access_log: Option<bool>,
    pub otlp_logs: Option<bool>,
}

/// What the flags gave at start: the defaults the file's section overrides.
#[derive(Clone, Copy, Debug)]
struct Defaults {
    access_log: bool,
    /// An OTLP endpoint is configured: the export can be switched on.
    otlp_available: bool,
}

static DEFAULTS: OnceLock<Defaults> = OnceLock::new();
static ACCESS_LOG: AtomicBool = AtomicBool::new(false);
static OTLP_LOGS: AtomicBool = AtomicBool::new(false);

/// Records the flags' setting and makes it the live one; `telemetry::start` calls it once, before
/// the file source runs (a second call keeps the first defaults).
pub fn init(access_log: bool, otlp_available: bool) {
    let d = *DEFAULTS.get_or_init(|| Defaults {
        access_log,
        otlp_available,
    });
    ACCESS_LOG.store(d.access_log, Ordering::Relaxed);
    OTLP_LOGS.store(d.otlp_available, Ordering::Relaxed);
}

/// Parses and checks a section: `Err((field, reason))` for what cannot be served. Switching OTLP
/// logs on needs a collector the agent was started with (`--otlp-endpoint`): the endpoint is a
/// process setting, as Istio's providers are mesh config, not `Telemetry` fields.
pub fn parse(v: &serde_json::Value) -> Result<Setting, (String, String)> {
    let err = |field: &str, reason: String| Err((format!("telemetry{field}"), reason));
    let serde_json::Value::Object(map) = v else {
        return err("", format!("is {v}, not a map (accessLog, otlpLogs)"));
    };
    let mut s = Setting::default();
    for (key, value) in map {
        let slot = match key.as_str() {
            "accessLog" => &mut s.access_log,
            "otlpLogs" => &mut s.otlp_logs,
            other => {
                return err(
                    &format!(".{other}"),
                    "unknown field (accessLog, otlpLogs)".to_owned(),
                );
            }
        };
        match value {
            serde_json::Value::Bool(b) => *slot = Some(*b),
            serde_json::Value::Null => {}
            other => return err(&format!(".{key}"), format!("{other} is not true or false")),
        }
    }
    if s.otlp_logs == Some(true) && !DEFAULTS.get().is_some_and(|d| d.otlp_available) {
        return err(
            ".otlpLogs",
            "no OTLP collector is configured (start the agent with --otlp-endpoint)".to_owned(),
        );
    }
    Ok(s)
}

/// Makes `s` (from an accepted `file`) the live setting. Without [`init`] (a process with no flow
/// telemetry) it does nothing.
pub fn apply(file: &Path, s: Setting) {
    let Some(d) = DEFAULTS.get() else {
        return;
    };
    let access_log = s.access_log.unwrap_or(d.access_log);
    // `validate` refused `true` without an endpoint; the check here keeps that enforced.
    let otlp_logs = s.otlp_logs.unwrap_or(d.otlp_available) && d.otlp_available;
    let was = (
        ACCESS_LOG.swap(access_log, Ordering::Relaxed),
        OTLP_LOGS.swap(otlp_logs, Ordering::Relaxed),
    );
    if was != (access_log, otlp_logs) {
        tracing::info!(file = %file.display(), access_log, otlp_logs, "telemetry switched");
    }
}

/// The connection log on stdout is on.
#[must_use]
pub fn access_log() -> bool {
    ACCESS_LOG.load(Ordering::Relaxed)
}

/// The OTLP connection-log export is on.
#[must_use]
pub fn otlp_logs() -> bool {
    OTLP_LOGS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_overrides_the_flags_and_its_absence_restores_them() {
        init(false, true);
        let f = Path::new("mesh.yaml");
        assert!(!access_log() && otlp_logs());
        apply(
            f,
            Setting {
                access_log: Some(true),
                otlp_logs: Some(false),
            },
        );
        assert!(access_log() && !otlp_logs());
        apply(f, Setting::default());
        assert!(!access_log() && otlp_logs());
        assert_eq!(
            parse(&serde_json::json!({ "otlpLogs": true })),
            Ok(Setting {
                access_log: None,
                otlp_logs: Some(true)
            })
        );
    }

    #[test]
    fn a_bad_section_rejects_the_file_with_line_and_field() {
        let f = Path::new("mesh.yaml");
        let parse = |t: &str| crate::discovery::file::parse(f, t, None).map(|_| ());
        assert_eq!(parse("node: a\ntelemetry: { accessLog: false }\n"), Ok(()));
        let e = parse("node: a\ntelemetry: { accessLog: maybe }\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert_eq!(e.field, "telemetry.accessLog", "{e}");
        assert_eq!(e.reason, "\"maybe\" is not true or false", "{e}");
        let e = parse("node: a\ntelemetry: { accesLog: true }\n").unwrap_err();
        assert_eq!(e.field, "telemetry.accesLog", "{e}");
    }
}
