//! The agent's settings, defined once: named keys, `DEFAULT_*` values, parse → construct →
//! validate, one section per part (datapath, discovery, admin, metrics, proxy, gateway), dumped
//! at start and by the admin API's `ConfigDump`. Also the one parser of every per-service value
//! (algorithm names, durations, limits) that both discovery sources call.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;

use crate::datapath::spec::Algorithm;

/// Key: this node's name.
pub const KEY_NODE: &str = "node";
/// Key: the static model file (file source).
pub const KEY_CONFIG_FILE: &str = "discovery.configFile";
/// Key: cgroup v2 directory the programs attach to.
pub const KEY_CGROUP: &str = "datapath.cgroup";
/// Key: bpffs directory of the pins.
pub const KEY_PIN_DIR: &str = "datapath.pinDir";
/// Key: admin socket.
pub const KEY_ADMIN_SOCKET: &str = "admin.socket";
/// Key: readiness address.
pub const KEY_READINESS_ADDR: &str = "admin.readinessAddr";
/// Key: metrics address.
pub const KEY_METRICS_ADDR: &str = "metrics.addr";
/// Key: one JSON access-log line per finished connection (`telemetry::access_log`).
pub const KEY_ACCESS_LOG: &str = "telemetry.accessLog";
/// Key: longest time an access line waits in its buffer before the flush thread writes it
/// (Envoy's `--file-flush-interval-msec`); above zero.
pub const KEY_ACCESS_LOG_FLUSH_INTERVAL: &str = "telemetry.accessLogFlushInterval";
/// Key: OTLP/gRPC collector the connection logs are exported to (`telemetry::otlp`).
pub const KEY_OTLP_ENDPOINT: &str = "telemetry.otlpEndpoint";
/// Key: share of new traces sampled (`telemetry::traces`), 0..=1.
pub const KEY_TRACE_SAMPLING: &str = "telemetry.traceSampling";
/// Default trace sampling: Istio's default of 1 % (`meshConfig.defaultConfig.tracing.sampling`).
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;
/// Key: first delay before a failed discovery source is restarted.
pub const KEY_RESTART_BACKOFF: &str = "discovery.restartBackoff";
/// Key: longest delay between restarts of a failing source.
pub const KEY_RESTART_BACKOFF_MAX: &str = "discovery.restartBackoffMax";
/// Key: how the Kubernetes source gets each watch's initial state (`auto`, `stream`, `list`).
pub const KEY_LIST_MODE: &str = "discovery.listMode";
/// Key: how long subscribers of the drain signal get to finish at shutdown.
pub const KEY_DRAIN_PERIOD: &str = "proxy.drainPeriod";
/// Key: the node addresses pods reach the agent's outbound listener at (one IPv4 and/or one
/// IPv6, comma-separated); enrolled cross-node connects are sent there (the `DaemonSet` passes the
/// node's `status.hostIP`).
pub const KEY_CAPTURE_ADDRESS: &str = "proxy.captureAddress";
/// Key: the node's uplink interfaces (comma-separated), where `STRICT` plaintext from other nodes
/// is dropped; default: the interfaces of the default routes.
pub const KEY_UPLINKS: &str = "proxy.uplinks";
/// Key: HBONE proxy worker threads (each a single-threaded runtime with its own listeners and
/// tunnel pool); default ztunnel's 2, at most the CPUs.
pub const KEY_PROXY_WORKERS: &str = "proxy.workers";
/// Default proxy workers: ztunnel's `ZTUNNEL_WORKER_THREADS` default.
pub const DEFAULT_PROXY_WORKERS: usize = 2;
/// Most proxy workers accepted (each holds a pool of tunnels to every peer node).
pub const MAX_PROXY_WORKERS: usize = 64;
/// Key: whether this node's pod-to-pod connections may skip the TCP/IP stack (`sk_msg`).
pub const KEY_BYPASS: &str = "datapath.bypass";
/// Trust domain of workload SPIFFE ids (default `cluster.local`, Istio's).
pub const KEY_TRUST_DOMAIN: &str = "mesh.trustDomain";
/// Root namespace: its namespace-wide security policies apply mesh-wide (default: the agent's
/// namespace from the downward API, else `mesh-system`; Istio's `istio-system` role).
pub const KEY_ROOT_NAMESPACE: &str = "mesh.rootNamespace";

/// Default readiness address (ztunnel's port).
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Default metrics address: on, on every address, ztunnel's port (`:15020/metrics` and
/// `/stats/prometheus`), as Istio's proxies serve it by default for Prometheus' pod scraping.
/// It serves counters and workload names, never keys or payload; `none` turns it off. A bind
/// failure is logged, not fatal (as the readiness endpoint).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
/// Connection access logs are off by default, as Istio's (`meshConfig.accessLogFile` unset):
/// one line per connection is a lot of log volume on a busy node.
pub const DEFAULT_ACCESS_LOG: bool = false;
/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mesh/admin.sock";
/// Default bpffs directory for pins.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mesh";
/// Same-node bypass is off unless a node turns it on (only pod addresses ever take part). Off
/// because of the kernel: a socket in a sockmap reads through `tcp_bpf_recvmsg`, which returns
/// `EAGAIN` to a blocking read after any wake-up that brought no data (its own half-close, for
/// one) where TCP sleeps on — shown by `tests/tests/bypass_bytes.rs`
/// `a_blocked_reader_gets_eagain_from_the_bypass_at_its_own_half_close`. Istio ambient and
/// Cilium's socket LB carry same-node traffic through TCP too.
pub const DEFAULT_BYPASS: bool = false;
/// Default first restart delay of a failed discovery source (doubled per failure). kube-rs'
/// watcher default backoff also starts below a second.
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// Default cap of the restart delay (kube-rs' default watcher backoff caps at 30 s too).
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A source that ran this long without failing starts again from the first delay.
pub const RESTART_BACKOFF_RESET_AFTER: Duration = Duration::from_mins(1);
/// Default drain period at shutdown: Istio's `terminationDrainDuration` (5 s).
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(5);
/// Longest drain period accepted: the `DaemonSet`'s grace period must cover it.
pub const MAX_DRAIN_PERIOD: Duration = Duration::from_mins(5);
/// Default outbound capture port (ztunnel's), used by the mTLS stage.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default HBONE port (ztunnel's), used by the mTLS stage.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

/// A setting the agent cannot start with: which key, what value, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{key} is required: {hint}")]
    Missing {
        key: &'static str,
        hint: &'static str,
    },
}

/// Settings as given (flags or environment), before parsing: strings, so every value is parsed
/// and reported in one place.
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    pub node: Option<String>,
    pub config_file: Option<PathBuf>,
    pub kubernetes: bool,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub readiness_addr: Option<String>,
    pub metrics_addr: Option<String>,
    /// `true` / `false`.
    pub access_log: Option<String>,
    /// A duration above zero (`200ms`, `5s`).
    pub access_log_flush_interval: Option<String>,
    /// `http(s)://host:port`, or `none`.
    pub otlp_endpoint: Option<String>,
    /// 0..=1.
    pub trace_sampling: Option<String>,
    pub restart_backoff: Option<String>,
    pub restart_backoff_max: Option<String>,
    /// `auto` / `stream` / `list`.
    pub list_mode: Option<String>,
    pub drain_period: Option<String>,
    /// `true` / `false`.
    pub bypass: Option<String>,
    pub trust_domain: Option<String>,
    pub root_namespace: Option<String>,
    pub capture_address: Option<String>,
    pub uplinks: Option<String>,
    pub proxy_workers: Option<String>,
}

/// Where the cluster model comes from.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub enum Source {
    /// A static YAML file, reloaded on change.
    File(PathBuf),
    /// The Kubernetes API (in-cluster or kubeconfig).
    Kubernetes,
}

impl Source {
    /// The name the source has in status and logs.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// How the Kubernetes source gets the initial state of each watch.
///
/// client-go's informers use streaming lists when its `WatchListClient` feature is on; its
/// reflector falls back to LIST + WATCH when the streaming watch fails or ends before the
/// initial-events-end bookmark ("making progress is better than deadlocking"). `auto` does the
/// same for the refusal an API server without the feature answers (422 Invalid); `stream` and
/// `list` force a mode.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListMode {
    /// Stream; if the API server refuses streaming lists (< 1.27, or its `WatchList` feature
    /// gate off), list instead, logged once.
    #[default]
    Auto,
    /// Streaming lists only (KEP-3157, `sendInitialEvents=true`): objects arrive one watch
    /// event at a time, so no list response is ever held whole. A refusing server is retried
    /// with backoff, as any failed watch.
    Stream,
    /// A list from the watch cache (`resourceVersion=0`), then a watch from its version: what
    /// informers did before streaming lists.
    List,
}

impl ListMode {
    /// The setting's spelling.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Stream => "stream",
            Self::List => "list",
        }
    }
}

/// `discovery.listMode`: `auto` (default), `stream` or `list`.
fn parse_list_mode(raw: Option<&str>) -> Result<ListMode, ConfigError> {
    match raw.map(str::trim) {
        None | Some("" | "auto") => Ok(ListMode::Auto),
        Some("stream") => Ok(ListMode::Stream),
        Some("list") => Ok(ListMode::List),
        Some(other) => Err(ConfigError::Invalid {
            key: KEY_LIST_MODE,
            value: other.to_owned(),
            reason: "must be `auto`, `stream` or `list`".to_owned(),
        }),
    }
}

/// The kernel side.
#[derive(Clone, Debug, Serialize)]
pub struct DatapathSection {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Same-node pod-to-pod bypass (`sk_msg`); off: this node's pod addresses are never put in
    /// `LOCAL_ENDPOINTS`, so every connection takes the TCP/IP stack.
    pub bypass: bool,
}

/// Discovery sources and their supervision.
#[derive(Clone, Debug, Serialize)]
pub struct DiscoverySection {
    pub source: Source,
    pub file_poll_interval: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// How the Kubernetes source gets its initial state (unused by the file source).
    pub list_mode: ListMode,
}

/// The admin socket and the readiness endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct AdminSection {
    pub socket: PathBuf,
    pub readiness_addr: Option<SocketAddr>,
}

/// Prometheus metrics (`telemetry::server`).
#[derive(Clone, Debug, Serialize)]
pub struct MetricsSection {
    pub addr: Option<SocketAddr>,
}

/// Logs beyond the agent's own (`telemetry::access_log`).
#[derive(Clone, Debug, Serialize)]
pub struct TelemetrySection {
    /// One JSON line per finished connection on stdout (tracing target `mesh_access`).
    pub access_log: bool,
    /// Longest wait of an access line in its buffer (default
    /// `logging::ACCESS_FLUSH_INTERVAL`, 200 ms).
    pub access_log_flush_interval: Duration,
    /// OTLP/gRPC collector of connection logs (`None`: no export, the default).
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (children follow their parent's decision).
    pub trace_sampling: f64,
}

/// The node proxies (mTLS stage): not served yet; the drain period already governs shutdown.
#[derive(Clone, Debug, Serialize)]
pub struct ProxySection {
    /// The HBONE proxies run (a CA is configured: workloads can get certificates).
    pub enabled: bool,
    pub outbound_port: u16,
    pub hbone_port: u16,
    pub drain_period: Duration,
    /// Where the kernel sends enrolled cross-node connects (the outbound listener's address as
    /// pods reach it); empty = capture unconfigured, so such connects fail at once.
    pub capture_addresses: Vec<IpAddr>,
    /// Interfaces the `STRICT` ingress program is attached to; `None` = the default routes'.
    pub uplinks: Option<Vec<String>>,
    /// Worker threads of the proxies (`proxy::ProxyParts::workers`), ≥ 1.
    pub workers: usize,
}

/// The gateway (a later stage): not served yet.
#[derive(Clone, Debug, Serialize)]
pub struct GatewaySection {
    pub enabled: bool,
}

/// The agent's configuration, after parsing and validation; served by `ConfigDump`.
#[derive(Clone, Debug, Serialize)]
pub struct AgentConfig {
    pub node: String,
    pub datapath: DatapathSection,
    pub discovery: DiscoverySection,
    pub admin: AdminSection,
    pub metrics: MetricsSection,
    pub telemetry: TelemetrySection,
    pub proxy: ProxySection,
    pub gateway: GatewaySection,
    /// Enrollment and identity settings (issue 9).
    pub mesh: crate::authz::MeshSettings,
}

/// `proxy.workers`: 1..=64; unset: ztunnel's 2, or the CPUs when fewer.
fn proxy_workers(raw: Option<&str>) -> Result<usize, ConfigError> {
    let Some(raw) = raw else {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        return Ok(DEFAULT_PROXY_WORKERS.min(cpus));
    };
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_PROXY_WORKERS).contains(&n) => Ok(n),
        _ => Err(ConfigError::Invalid {
            key: KEY_PROXY_WORKERS,
            value: raw.to_owned(),
            reason: format!("must be a whole number from 1 to {MAX_PROXY_WORKERS}"),
        }),
    }
}

/// `proxy.captureAddress`: at most one IPv4 and one IPv6 address, comma-separated.
fn parse_capture_addresses(raw: Option<&str>) -> Result<Vec<IpAddr>, ConfigError> {
    let mut out: Vec<IpAddr> = Vec::new();
    for part in raw
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let invalid = |reason: String| ConfigError::Invalid {
            key: KEY_CAPTURE_ADDRESS,
            value: raw.unwrap_or("").to_owned(),
            reason,
        };
        let ip: IpAddr = part
            .parse()
            .map_err(|_| invalid(format!("{part:?} is not an IP address")))?;
        if ip.is_unspecified() {
            return Err(invalid(format!(
                "{ip} is not an address pods can connect to"
            )));
        }
        if out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(invalid(
                "give at most one IPv4 and one IPv6 address".to_owned(),
            ));
        }
        out.push(ip);
    }
    Ok(out)
}

impl AgentConfig {
    /// Parses and validates `raw`; `node` and `cgroup` must already be resolved (main reads the
    /// hostname and the cgroup2 mount when they are not given).
    pub fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let telemetry = telemetry_section(&raw)?;
        let node = raw
            .node
            .filter(|n| !n.is_empty())
            .ok_or(ConfigError::Missing {
                key: KEY_NODE,
                hint: "pass --node-name or set NODE_NAME",
            })?;
        let source = match (raw.config_file, raw.kubernetes) {
            (Some(f), false) => Source::File(f),
            (None, true) => Source::Kubernetes,
            (Some(f), true) => {
                return Err(ConfigError::Invalid {
                    key: KEY_CONFIG_FILE,
                    value: f.display().to_string(),
                    reason: "choose one source: a file or Kubernetes, not both".to_owned(),
                });
            }
            (None, false) => {
                return Err(ConfigError::Missing {
                    key: KEY_CONFIG_FILE,
                    hint: "choose where the cluster model comes from: --config-file FILE or --kubernetes",
                });
            }
        };
        let cgroup = raw.cgroup.ok_or(ConfigError::Missing {
            key: KEY_CGROUP,
            hint: "pass --cgroup (default: the cgroup2 mount root)",
        })?;
        let duration = |key, value: Option<String>, default| match value {
            None => Ok(default),
            Some(v) => parse_duration(&v).map_err(|e| ConfigError::Invalid {
                key,
                value: v,
                reason: e.to_string(),
            }),
        };
        let config = Self {
            node,
            datapath: DatapathSection {
                cgroup,
                pin_dir: raw.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
                bypass: parse_bool(KEY_BYPASS, raw.bypass.as_deref(), DEFAULT_BYPASS)?,
            },
            discovery: DiscoverySection {
                source,
                file_poll_interval: crate::discovery::file::DEFAULT_POLL_INTERVAL,
                restart_backoff: duration(
                    KEY_RESTART_BACKOFF,
                    raw.restart_backoff,
                    DEFAULT_RESTART_BACKOFF,
                )?,
                restart_backoff_max: duration(
                    KEY_RESTART_BACKOFF_MAX,
                    raw.restart_backoff_max,
                    DEFAULT_RESTART_BACKOFF_MAX,
                )?,
                list_mode: parse_list_mode(raw.list_mode.as_deref())?,
            },
            admin: AdminSection {
                socket: raw
                    .admin_socket
                    .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
                readiness_addr: parse_addr(
                    KEY_READINESS_ADDR,
                    raw.readiness_addr
                        .as_deref()
                        .unwrap_or(DEFAULT_READINESS_ADDR),
                )?,
            },
            metrics: MetricsSection {
                addr: parse_addr(
                    KEY_METRICS_ADDR,
                    raw.metrics_addr.as_deref().unwrap_or(DEFAULT_METRICS_ADDR),
                )?,
            },
            telemetry,
            proxy: ProxySection {
                enabled: false,
                outbound_port: DEFAULT_OUTBOUND_PORT,
                hbone_port: DEFAULT_HBONE_PORT,
                drain_period: duration(KEY_DRAIN_PERIOD, raw.drain_period, DEFAULT_DRAIN_PERIOD)?,
                capture_addresses: parse_capture_addresses(raw.capture_address.as_deref())?,
                uplinks: raw.uplinks.map(|u| {
                    u.split(',')
                        .map(str::trim)
                        .filter(|i| !i.is_empty())
                        .map(str::to_owned)
                        .collect()
                }),
                workers: proxy_workers(raw.proxy_workers.as_deref())?,
            },
            gateway: GatewaySection { enabled: false },
            mesh: mesh_settings(raw.trust_domain, raw.root_namespace)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.discovery;
        if d.restart_backoff.is_zero() {
            return Err(ConfigError::Invalid {
                key: KEY_RESTART_BACKOFF,
                value: humantime::format_duration(d.restart_backoff).to_string(),
                reason: "must be longer than 0s (a failing source would spin)".to_owned(),
            });
        }
        if d.restart_backoff_max < d.restart_backoff {
            return Err(ConfigError::Invalid {
                key: KEY_RESTART_BACKOFF_MAX,
                value: humantime::format_duration(d.restart_backoff_max).to_string(),
                reason: format!(
                    "is shorter than {KEY_RESTART_BACKOFF} ({})",
                    humantime::format_duration(d.restart_backoff)
                ),
            });
        }
        if self.proxy.drain_period > MAX_DRAIN_PERIOD {
            return Err(ConfigError::Invalid {
                key: KEY_DRAIN_PERIOD,
                value: humantime::format_duration(self.proxy.drain_period).to_string(),
                reason: format!(
                    "is longer than {} (the DaemonSet's grace period must cover it)",
                    humantime::format_duration(MAX_DRAIN_PERIOD)
                ),
            });
        }
        Ok(())
    }
}

/// Trust domain and root namespace, checked as the SPIFFE id parts they become.
fn mesh_settings(
    trust_domain: Option<String>,
    root_namespace: Option<String>,
) -> Result<crate::authz::MeshSettings, ConfigError> {
    let defaults = crate::authz::MeshSettings::default();
    let trust_domain = trust_domain
        .filter(|s| !s.is_empty())
        .unwrap_or(defaults.trust_domain);
    let root_namespace = root_namespace
        .filter(|s| !s.is_empty())
        .unwrap_or(defaults.root_namespace);
    if let Err(e) = crate::identity::SpiffeId::new(&trust_domain, "ns", "sa") {
        return Err(ConfigError::Invalid {
            key: KEY_TRUST_DOMAIN,
            value: trust_domain,
            reason: format!("is not a SPIFFE trust domain: {e}"),
        });
    }
    if let Err(e) = crate::identity::SpiffeId::new("td", &root_namespace, "sa") {
        return Err(ConfigError::Invalid {
            key: KEY_ROOT_NAMESPACE,
            value: root_namespace,
            reason: format!("is not a namespace name: {e}"),
        });
    }
    Ok(crate::authz::MeshSettings {
        trust_domain,
        root_namespace,
    })
}

/// The telemetry settings: access log, OTLP endpoint, trace sampling.
fn telemetry_section(raw: &RawConfig) -> Result<TelemetrySection, ConfigError> {
    let access_log = raw.access_log.as_deref();
    let access_log_flush_interval = raw.access_log_flush_interval.as_deref();
    let otlp_endpoint = raw.otlp_endpoint.clone();
    let trace_sampling = raw.trace_sampling.as_deref();
    Ok(TelemetrySection {
        access_log: parse_bool(KEY_ACCESS_LOG, access_log, DEFAULT_ACCESS_LOG)?,
        access_log_flush_interval: match access_log_flush_interval {
            None => crate::logging::ACCESS_FLUSH_INTERVAL,
            Some(v) => parse_positive_duration(v).map_err(|e| ConfigError::Invalid {
                key: KEY_ACCESS_LOG_FLUSH_INTERVAL,
                value: v.to_owned(),
                reason: e.to_string(),
            })?,
        },
        otlp_endpoint: parse_endpoint(KEY_OTLP_ENDPOINT, otlp_endpoint)?,
        trace_sampling: match trace_sampling {
            None => DEFAULT_TRACE_SAMPLING,
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| ConfigError::Invalid {
                    key: KEY_TRACE_SAMPLING,
                    value: v.to_owned(),
                    reason: "is not a number from 0 to 1".to_owned(),
                })?,
        },
    })
}

/// `http://…` or `https://…`; absent, empty or `none`: off.
fn parse_endpoint(key: &'static str, value: Option<String>) -> Result<Option<String>, ConfigError> {
    match value.as_deref() {
        None | Some("" | "none") => Ok(None),
        Some(v) if v.starts_with("http://") || v.starts_with("https://") => Ok(value),
        Some(v) => Err(ConfigError::Invalid {
            key,
            value: v.to_owned(),
            reason: "is not an http:// or https:// URL (or `none`)".to_owned(),
        }),
    }
}

/// `true` or `false` (absent: `default`).
fn parse_bool(key: &'static str, value: Option<&str>, default: bool) -> Result<bool, ConfigError> {
    value.map_or(Ok(default), |v| {
        v.parse().map_err(|_| ConfigError::Invalid {
            key,
            value: v.to_owned(),
            reason: "not `true` or `false`".to_owned(),
        })
    })
}

/// `address:port`, or `none` for off.
pub fn parse_addr(key: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value == "none" {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: "is not an address:port (or `none`)".to_owned(),
    })
}

/// A per-service value that cannot be used; the message completes "value … <message>" as both
/// sources print it next to the object and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("is not one of {ALGORITHM_NAMES}")]
    Algorithm,
    #[error("is not a whole number in 0..={}", u32::MAX)]
    Number,
    #[error("is not 0..=100")]
    Percent,
    #[error("is not a duration like 30s or 5m ({0})")]
    Duration(String),
    #[error("is not longer than 0s")]
    ZeroDuration,
}

/// Every algorithm name, as users write them (annotations, the static file, `meshctl`).
pub const ALGORITHM_NAMES: &str = "random, round-robin, weighted, maglev, least-connections";

/// An algorithm by its name.
pub fn parse_algorithm(value: &str) -> Result<Algorithm, SettingError> {
    Ok(match value {
        "random" => Algorithm::Random,
        "round-robin" => Algorithm::RoundRobin,
        "weighted" => Algorithm::Weighted,
        "maglev" => Algorithm::Maglev,
        "least-connections" => Algorithm::LeastConn,
        _ => return Err(SettingError::Algorithm),
    })
}

/// The name of an algorithm ([`parse_algorithm`]'s inverse).
#[must_use]
pub fn algorithm_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Random => "random",
        Algorithm::RoundRobin => "round-robin",
        Algorithm::Weighted => "weighted",
        Algorithm::Maglev => "maglev",
        Algorithm::LeastConn => "least-connections",
    }
}

/// A whole number.
pub fn parse_u32(value: &str) -> Result<u32, SettingError> {
    value.parse::<u32>().map_err(|_| SettingError::Number)
}

/// A share in percent, 0..=100.
pub fn parse_percent(value: &str) -> Result<u32, SettingError> {
    check_percent(parse_u32(value)?)
}

/// Checks an already numeric percentage.
pub fn check_percent(p: u32) -> Result<u32, SettingError> {
    if p > 100 {
        return Err(SettingError::Percent);
    }
    Ok(p)
}

/// A duration in `humantime` syntax (`30s`, `5m`, `1h 30m`).
pub fn parse_duration(value: &str) -> Result<Duration, SettingError> {
    humantime::parse_duration(value).map_err(|e| SettingError::Duration(e.to_string()))
}

/// A duration longer than zero.
pub fn parse_positive_duration(value: &str) -> Result<Duration, SettingError> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err(SettingError::ZeroDuration);
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_settings_default_and_are_checked() {
        let c = AgentConfig::from_raw(raw()).unwrap();
        assert_eq!(c.mesh, crate::authz::MeshSettings::default());
        assert_eq!(c.mesh.trust_domain, "cluster.local");
        let e = AgentConfig::from_raw(RawConfig {
            trust_domain: Some("Cluster.Local".into()),
            ..raw()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("mesh.trustDomain \"Cluster.Local\": is not a SPIFFE trust domain"),
            "{e}"
        );
        let c = AgentConfig::from_raw(RawConfig {
            trust_domain: Some("example.org".into()),
            root_namespace: Some("istio-system".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(
            (c.mesh.trust_domain.as_str(), c.mesh.root_namespace.as_str()),
            ("example.org", "istio-system")
        );
    }

    fn raw() -> RawConfig {
        RawConfig {
            node: Some("a".into()),
            config_file: Some("/etc/mesh/mesh.yaml".into()),
            cgroup: Some("/sys/fs/cgroup".into()),
            ..RawConfig::default()
        }
    }

    #[test]
    fn list_mode_defaults_to_auto_and_is_checked() {
        let c = AgentConfig::from_raw(raw()).unwrap();
        assert_eq!(c.discovery.list_mode, ListMode::Auto);
        for (given, mode) in [("stream", ListMode::Stream), ("list", ListMode::List)] {
            let c = AgentConfig::from_raw(RawConfig {
                list_mode: Some(given.into()),
                ..raw()
            })
            .unwrap();
            assert_eq!(c.discovery.list_mode, mode);
            assert_eq!(mode.name(), given);
        }
        let e = AgentConfig::from_raw(RawConfig {
            list_mode: Some("watch".into()),
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "discovery.listMode \"watch\": must be `auto`, `stream` or `list`"
        );
    }

    #[test]
    fn defaults_fill_every_section() {
        let c = AgentConfig::from_raw(raw()).unwrap();
        assert_eq!(c.datapath.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(
            c.admin.readiness_addr,
            Some(DEFAULT_READINESS_ADDR.parse().unwrap())
        );
        assert_eq!(
            c.metrics.addr,
            Some(DEFAULT_METRICS_ADDR.parse().unwrap()),
            "served by default, as Istio's :15020"
        );
        assert!(!c.telemetry.access_log, "off by default, as Istio's");
        assert_eq!(c.telemetry.otlp_endpoint, None);
        assert!((c.telemetry.trace_sampling - DEFAULT_TRACE_SAMPLING).abs() < f64::EPSILON);
        assert_eq!(
            c.telemetry.access_log_flush_interval,
            crate::logging::ACCESS_FLUSH_INTERVAL
        );
        for (bad, reason) in [("0s", "is not longer than 0s"), ("soon", "")] {
            let e = AgentConfig::from_raw(RawConfig {
                access_log_flush_interval: Some(bad.into()),
                ..raw()
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with(&format!("telemetry.accessLogFlushInterval \"{bad}\": "))
                    && e.contains(reason),
                "{e}"
            );
        }
        let e = AgentConfig::from_raw(RawConfig {
            trace_sampling: Some("2".into()),
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "telemetry.traceSampling \"2\": is not a number from 0 to 1"
        );
        let e = AgentConfig::from_raw(RawConfig {
            otlp_endpoint: Some("collector:4317".into()),
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "telemetry.otlpEndpoint \"collector:4317\": is not an http:// or https:// URL (or `none`)"
        );
        assert_eq!(c.discovery.restart_backoff, DEFAULT_RESTART_BACKOFF);
        assert_eq!(c.proxy.drain_period, DEFAULT_DRAIN_PERIOD);
        assert!(!c.datapath.bypass);
        let on = AgentConfig::from_raw(RawConfig {
            bypass: Some("true".into()),
            ..raw()
        })
        .unwrap();
        assert!(on.datapath.bypass);
        let bad = AgentConfig::from_raw(RawConfig {
            bypass: Some("sometimes".into()),
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "datapath.bypass \"sometimes\": not `true` or `false`"
        );
        let dump = serde_json::to_value(&c).unwrap();
        for section in [
            "datapath",
            "discovery",
            "admin",
            "metrics",
            "telemetry",
            "proxy",
            "gateway",
        ] {
            assert!(dump.get(section).is_some(), "{section} in {dump}");
        }
    }

    #[test]
    fn proxy_workers_default_to_ztunnels_two_and_are_bounded() {
        let c = AgentConfig::from_raw(raw()).unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(c.proxy.workers, DEFAULT_PROXY_WORKERS.min(cpus));
        let four = AgentConfig::from_raw(RawConfig {
            proxy_workers: Some("4".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(four.proxy.workers, 4);
        for bad in ["0", "65", "two"] {
            let e = AgentConfig::from_raw(RawConfig {
                proxy_workers: Some(bad.into()),
                ..raw()
            })
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("proxy.workers \"{bad}\": must be a whole number from 1 to 64")
            );
        }
    }

    #[test]
    fn bad_values_name_the_key_and_the_reason() {
        let e = AgentConfig::from_raw(RawConfig {
            readiness_addr: Some("localhost".into()),
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "admin.readinessAddr \"localhost\": is not an address:port (or `none`)"
        );
        let e = AgentConfig::from_raw(RawConfig {
            restart_backoff: Some("10s".into()),
            restart_backoff_max: Some("1s".into()),
            ..raw()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("discovery.restartBackoffMax \"1s\": is shorter than"),
            "{e}"
        );
        let e = AgentConfig::from_raw(RawConfig {
            drain_period: Some("soon".into()),
            ..raw()
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("proxy.drainPeriod \"soon\": is not a duration"),
            "{e}"
        );
        let e = AgentConfig::from_raw(RawConfig {
            kubernetes: true,
            ..raw()
        })
        .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    key: KEY_CONFIG_FILE,
                    ..
                }
            ),
            "{e}"
        );
        let e = AgentConfig::from_raw(RawConfig {
            node: None,
            ..raw()
        })
        .unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                key: KEY_NODE,
                hint: "pass --node-name or set NODE_NAME"
            }
        );
    }

    #[test]
    fn setting_parsers_round_trip_and_explain() {
        for a in [
            Algorithm::Random,
            Algorithm::RoundRobin,
            Algorithm::Weighted,
            Algorithm::Maglev,
            Algorithm::LeastConn,
        ] {
            assert_eq!(parse_algorithm(algorithm_name(a)), Ok(a));
        }
        assert_eq!(
            parse_algorithm("fastest").unwrap_err().to_string(),
            format!("is not one of {ALGORITHM_NAMES}")
        );
        assert_eq!(parse_percent("100"), Ok(100));
        assert_eq!(parse_percent("101"), Err(SettingError::Percent));
        assert_eq!(parse_u32("-1"), Err(SettingError::Number));
        assert_eq!(parse_positive_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(
            parse_positive_duration("0s"),
            Err(SettingError::ZeroDuration)
        );
        assert!(matches!(
            parse_duration("5 parsecs"),
            Err(SettingError::Duration(_))
        ));
    }
}
