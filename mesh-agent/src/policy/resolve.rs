//! Which policy applies to each Service, and why the others do not: the Gateway API's policy
//! attachment rules (GEP-713) over the parsed policies of one source.
//!
//! - Per target (one Service, or one Namespace) the **oldest** valid policy wins
//!   (`creationTimestamp`, then `namespace/name`); the younger ones are `Conflicted` there.
//! - Per Service, the winner of its Service target beats the winner of its Namespace target
//!   (the more specific attachment wins, as Istio prefers a workload-specific resource to a
//!   namespace-wide one). The winning policy's settings replace the defaults whole: fields are
//!   not merged across policies (Istio likewise applies one `DestinationRule` per host).
//! - An invalid policy applies nowhere; the Services it names keep what valid policies give them.
//!
//! A policy's condition: `Invalid` if it was rejected; else `TargetNotFound` if none of its
//! targets exists; else `Conflicted` if it lost every target it found to an older policy; else
//! `Accepted` (the message names targets it lost or did not find).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
};

use serde::Serialize;

use super::parse::{ParsedPolicy, PolicySettings, Target, TargetKind};
use crate::model::ObjectName;

/// The `Accepted` condition's reasons (Gateway API policy status).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Reason {
    Accepted,
    Invalid,
    Conflicted,
    TargetNotFound,
}

impl Reason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "Accepted",
            Self::Invalid => "Invalid",
            Self::Conflicted => "Conflicted",
            Self::TargetNotFound => "TargetNotFound",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one policy stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PolicyState {
    /// `Accepted` condition status: true only for `Reason::Accepted`.
    pub accepted: bool,
    pub reason: Reason,
    pub message: String,
    /// The policy's `metadata.generation` the state was computed from.
    pub generation: Option<i64>,
    pub targets: Vec<Target>,
    /// Services it applies to.
    pub applies_to: usize,
}

/// A policy that targets a Service but does not apply to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NotApplied {
    pub policy: ObjectName,
    pub reason: Reason,
    pub why: String,
}

/// What applies to one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServicePolicy {
    /// The winning policy and through which target kind; `None` = the defaults.
    pub applied: Option<(ObjectName, TargetKind)>,
    pub not_applied: Vec<NotApplied>,
}

/// Every policy's state, and the Services some policy targets (a Service absent here has the
/// defaults and no policy names it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Report {
    pub policies: BTreeMap<ObjectName, PolicyState>,
    pub services: BTreeMap<ObjectName, ServicePolicy>,
}

/// The outcome of [`resolve`]: settings per Service that a policy applies to, and the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub settings: BTreeMap<ObjectName, PolicySettings>,
    pub report: Report,
}

/// Resolves `policies` against the Services that exist and the namespaces that are live.
#[must_use]
pub fn resolve(
    policies: &[ParsedPolicy],
    services: &BTreeSet<ObjectName>,
    namespace_live: &dyn Fn(&str) -> bool,
) -> Resolution {
    // Valid policies per target, oldest first.
    let mut by_target: BTreeMap<&Target, Vec<usize>> = BTreeMap::new();
    for (i, p) in policies.iter().enumerate() {
        if p.outcome.is_ok() {
            for t in &p.targets {
                by_target.entry(t).or_default().push(i);
            }
        }
    }
    for list in by_target.values_mut() {
        list.sort_by(|&a, &b| policies[a].age_key().cmp(&policies[b].age_key()));
    }
    // Invalid policies per target, to show them next to the Services they name.
    let mut invalid_by_target: BTreeMap<&Target, Vec<usize>> = BTreeMap::new();
    for (i, p) in policies.iter().enumerate() {
        if p.outcome.is_err() {
            for t in &p.targets {
                invalid_by_target.entry(t).or_default().push(i);
            }
        }
    }
    // Services in namespaces no policy names are skipped without allocating: on a large
    // cluster most are.
    let named: BTreeSet<&str> = by_target
        .keys()
        .chain(invalid_by_target.keys())
        .map(|t| match t.kind {
            TargetKind::Service => t.object.namespace.as_str(),
            TargetKind::Namespace => t.object.name.as_str(),
        })
        .collect();
    let mut out = Resolution::default();
    let mut applies_to = vec![0_usize; policies.len()];
    for svc in services {
        if !named.contains(svc.namespace.as_str()) {
            continue;
        }
        let st = Target {
            kind: TargetKind::Service,
            object: svc.clone(),
        };
        let nt = Target {
            kind: TargetKind::Namespace,
            object: ObjectName::new("", svc.namespace.clone()),
        };
        let on_svc = by_target.get(&st).map(Vec::as_slice).unwrap_or_default();
        let on_ns = by_target.get(&nt).map(Vec::as_slice).unwrap_or_default();
        let winner = on_svc
            .first()
            .map(|&i| (i, TargetKind::Service))
            .or_else(|| on_ns.first().map(|&i| (i, TargetKind::Namespace)));
        let mut entry = ServicePolicy::default();
        if let Some((w, kind)) = winner {
            applies_to[w] += 1;
            if let Ok(s) = &policies[w].outcome {
                out.settings.insert(svc.clone(), *s);
            }
            entry.applied = Some((policies[w].name.clone(), kind));
        }
        let winner_name = winner.map(|(w, _)| &policies[w].name);
        entry.not_applied = not_applied(
            policies,
            winner_name,
            [(on_svc, &st), (on_ns, &nt)],
            [&st, &nt].map(|t| {
                invalid_by_target
                    .get(t)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
            }),
        );
        if entry != ServicePolicy::default() {
            out.report.services.insert(svc.clone(), entry);
        }
    }
    for (i, p) in policies.iter().enumerate() {
        let state = policy_state(i, p, policies, &by_target, services, namespace_live);
        out.report.policies.insert(
            p.name.clone(),
            PolicyState {
                applies_to: applies_to[i],
                ..state
            },
        );
    }
    out
}

/// The policies naming a service that do not apply to it, and why: losers of a conflict on one
/// of its targets, a Namespace-targeted winner overridden by a Service-targeted one, and invalid
/// policies.
fn not_applied(
    policies: &[ParsedPolicy],
    winner_name: Option<&ObjectName>,
    valid: [(&[usize], &Target); 2],
    invalid: [&[usize]; 2],
) -> Vec<NotApplied> {
    let mut out = Vec::new();
    for (list, target) in valid {
        for (rank, &i) in list.iter().enumerate() {
            if Some(&policies[i].name) == winner_name {
                continue;
            }
            let (reason, why) = if rank > 0 {
                (
                    Reason::Conflicted,
                    format!(
                        "conflicts on {target} with older policy {}, which wins",
                        policies[list[0]].name
                    ),
                )
            } else {
                (
                    Reason::Accepted,
                    format!(
                        "targets {target}; overridden by Service-targeted policy {}",
                        winner_name.map(ToString::to_string).unwrap_or_default()
                    ),
                )
            };
            out.push(NotApplied {
                policy: policies[i].name.clone(),
                reason,
                why,
            });
        }
    }
    for &i in invalid.into_iter().flatten() {
        if let Err(e) = &policies[i].outcome {
            out.push(NotApplied {
                policy: policies[i].name.clone(),
                reason: Reason::Invalid,
                why: e.to_string(),
            });
        }
    }
    out
}

fn policy_state(
    i: usize,
    p: &ParsedPolicy,
    policies: &[ParsedPolicy],
    by_target: &BTreeMap<&Target, Vec<usize>>,
    services: &BTreeSet<ObjectName>,
    namespace_live: &dyn Fn(&str) -> bool,
) -> PolicyState {
    let state = |accepted, reason, message| PolicyState {
        accepted,
        reason,
        message,
        generation: p.generation,
        targets: p.targets.clone(),
        applies_to: 0,
    };
    if let Err(e) = &p.outcome {
        return state(false, Reason::Invalid, e.to_string());
    }
    let exists = |t: &Target| match t.kind {
        TargetKind::Service => services.contains(&t.object),
        TargetKind::Namespace => namespace_live(&t.object.name),
    };
    let (found, missing): (Vec<&Target>, Vec<&Target>) = p.targets.iter().partition(|t| exists(t));
    let names = |ts: &[&Target]| {
        ts.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if found.is_empty() {
        return state(
            false,
            Reason::TargetNotFound,
            format!("no target exists: {}", names(&missing)),
        );
    }
    let mut lost = Vec::new();
    for t in &found {
        let first = by_target.get(t).and_then(|l| l.first()).copied();
        if let Some(w) = first.filter(|&w| w != i) {
            lost.push(format!("{t} (older policy {} wins)", policies[w].name));
        }
    }
    if lost.len() == found.len() {
        return state(
            false,
            Reason::Conflicted,
            format!("conflicts on every target: {}", lost.join(", ")),
        );
    }
    let mut message = "applies to its targets".to_owned();
    if !lost.is_empty() {
        let _ = write!(message, "; conflicted on {}", lost.join(", "));
    }
    if !missing.is_empty() {
        let _ = write!(message, "; not found: {}", names(&missing));
    }
    state(true, Reason::Accepted, message)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{datapath::spec::Algorithm, policy::parse::parse};

    fn policy(name: &str, created: &str, targets: &[(&str, &str)], simple: &str) -> ParsedPolicy {
        let refs: Vec<_> = targets
            .iter()
            .map(|(k, n)| json!({ "kind": k, "name": n }))
            .collect();
        parse(&json!({
            "apiVersion": "traffic.kernmesh.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": { "name": name, "namespace": "shop", "creationTimestamp": created },
            "spec": { "targetRefs": refs, "loadBalancer": { "simple": simple } },
        }))
    }

    fn svcs(names: &[&str]) -> BTreeSet<ObjectName> {
        names.iter().map(|n| ObjectName::new("shop", *n)).collect()
    }

    fn live(ns: &str) -> bool {
        ns == "shop"
    }

    #[test]
    fn service_beats_namespace_and_the_oldest_wins_between_equals() {
        let ps = vec![
            policy(
                "ns-wide",
                "2026-01-01T00:00:00Z",
                &[("Namespace", "shop")],
                "WEIGHTED",
            ),
            policy(
                "young",
                "2026-03-01T00:00:00Z",
                &[("Service", "web")],
                "RANDOM",
            ),
            policy(
                "old",
                "2026-02-01T00:00:00Z",
                &[("Service", "web")],
                "ROUND_ROBIN",
            ),
        ];
        let r = resolve(&ps, &svcs(&["web", "db"]), &live);
        let web = ObjectName::new("shop", "web");
        let db = ObjectName::new("shop", "db");
        assert_eq!(r.settings[&web].algorithm, Algorithm::RoundRobin);
        assert_eq!(r.settings[&db].algorithm, Algorithm::Weighted);
        let w = &r.report.services[&web];
        assert_eq!(
            w.applied,
            Some((ObjectName::new("shop", "old"), TargetKind::Service))
        );
        let reasons: Vec<_> = w
            .not_applied
            .iter()
            .map(|n| (n.policy.name.as_str(), n.reason))
            .collect();
        assert_eq!(
            reasons,
            [("young", Reason::Conflicted), ("ns-wide", Reason::Accepted)]
        );
        let p = &r.report.policies;
        assert_eq!(p[&ObjectName::new("shop", "old")].reason, Reason::Accepted);
        let young = &p[&ObjectName::new("shop", "young")];
        assert_eq!((young.accepted, young.reason), (false, Reason::Conflicted));
        assert!(
            young.message.contains("older policy shop/old wins"),
            "{}",
            young.message
        );
        let ns = &p[&ObjectName::new("shop", "ns-wide")];
        assert_eq!(
            (ns.accepted, ns.applies_to),
            (true, 1),
            "overridden on web, applies to db"
        );
    }

    #[test]
    fn name_breaks_a_timestamp_tie() {
        let ps = vec![
            policy("b", "2026-01-01T00:00:00Z", &[("Service", "web")], "RANDOM"),
            policy(
                "a",
                "2026-01-01T00:00:00Z",
                &[("Service", "web")],
                "ROUND_ROBIN",
            ),
        ];
        let r = resolve(&ps, &svcs(&["web"]), &live);
        assert_eq!(
            r.settings[&ObjectName::new("shop", "web")].algorithm,
            Algorithm::RoundRobin
        );
    }

    #[test]
    fn invalid_policies_apply_nowhere_and_missing_targets_are_reported() {
        let mut bad = policy(
            "bad",
            "2026-01-01T00:00:00Z",
            &[("Service", "web")],
            "FASTEST",
        );
        assert!(bad.outcome.is_err());
        bad.generation = Some(4);
        let ps = vec![
            bad,
            policy(
                "good",
                "2026-02-01T00:00:00Z",
                &[("Service", "web")],
                "ROUND_ROBIN",
            ),
            policy(
                "lost",
                "2026-02-01T00:00:00Z",
                &[("Service", "gone")],
                "RANDOM",
            ),
        ];
        let r = resolve(&ps, &svcs(&["web"]), &live);
        let web = ObjectName::new("shop", "web");
        assert_eq!(
            r.settings[&web].algorithm,
            Algorithm::RoundRobin,
            "the valid one applies"
        );
        let bad = &r.report.policies[&ObjectName::new("shop", "bad")];
        assert_eq!(
            (bad.accepted, bad.reason, bad.generation),
            (false, Reason::Invalid, Some(4))
        );
        assert!(
            bad.message.contains("spec.loadBalancer.simple"),
            "{}",
            bad.message
        );
        assert!(
            r.report.services[&web]
                .not_applied
                .iter()
                .any(|n| n.reason == Reason::Invalid && n.policy.name == "bad")
        );
        let lost = &r.report.policies[&ObjectName::new("shop", "lost")];
        assert_eq!(lost.reason, Reason::TargetNotFound);
        assert_eq!(lost.message, "no target exists: Service shop/gone");
        assert_eq!(r.settings.len(), 1);
        assert!(
            !r.report
                .services
                .contains_key(&ObjectName::new("shop", "gone")),
            "only existing services are reported"
        );
    }

    #[test]
    fn a_service_nothing_targets_is_not_in_the_report() {
        let r = resolve(&[], &svcs(&["web"]), &live);
        assert!(r.settings.is_empty() && r.report.services.is_empty());
    }
}
