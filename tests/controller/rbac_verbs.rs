//! RBAC to the verb, proved both ways from the requests the test suite
//! makes on the fake API server, which holds the chart's rules
//! (`crates/testkit/src/rbac-rules.yaml`):
//!
//! - every verb used is granted: the fake answers 403 to anything else, so
//!   a test whose controller needs more fails;
//! - every verb granted is used: with `USAGE_BACKFILL_RBAC_LOG` naming a
//!   file, the fake notes each allowed request's Secret mode, scope, group,
//!   resource and verb; `.ci/run` sets it for `cargo test` and then runs
//!   the ignored [`every_granted_verb_is_used_in_each_secret_mode_and_scope`],
//!   which fails on a granted verb no test used, per Secret mode and scope.
//!
//! [`the_controller_uses_every_verb_in_each_secret_mode_and_scope`] makes
//! sure each of the four combinations sees a whole run, leader election
//! included, so that the table does not depend on which other tests
//! happen to run in which mode.

use usage_backfill_testkit as testkit;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use testkit::apiserver::rbac::{self, Scope, SecretAccess, Use};
use usage_backfill_api::Phase;
use usage_backfill_controller::{Election, HealthState, LeaseSettings, Metrics, Replica};
use usage_backfill_standin::fixture::HistorySpec;

use testkit::harness::{Harness, NS, UsageBackfillBuilder, WAIT};
use testkit::settings;

/// The release namespace of the namespaced install (the Lease's Role).
const RELEASE_NS: &str = "ops";

const MODES: [SecretAccess; 2] = [SecretAccess::Get, SecretAccess::Watch];

fn scopes() -> [Scope; 2] {
    [Scope::default(), Scope::namespaced(&[NS], RELEASE_NS)]
}

/// A whole run under a leader-elected controller, with the chart's rules
/// for `access` bound as in `scope`: lists and watches, the finalizer, the
/// status, the Secret, Events, the progress record from its first read to
/// its deletion, and the Lease from its creation to a renewal.
async fn one_run(access: SecretAccess, scope: Scope) {
    let mut s = settings();
    s.watch_secrets = access == SecretAccess::Watch;
    let history = HistorySpec {
        rows: 200,
        months: 3,
        ..HistorySpec::default()
    };
    let h = Harness::with_settings(Some(history), s.clone()).await;
    let label = format!(
        "{} Secrets, {}",
        rbac::secrets_name(access),
        rbac::scope_name(&scope)
    );
    h.fake.set_rbac_scope(scope.clone());
    h.put_secret();
    let replica = Arc::new(Replica {
        client: h.ctx.client.clone(),
        settings: s,
        namespaces: scope.watched.clone(),
        concurrency: 4,
        shutdown_timeout: WAIT,
        state: HealthState::new(true, Metrics::new()),
    });
    let election = Election::start(
        h.ctx.client.clone(),
        LeaseSettings {
            name: "usage-backfill-operator".into(),
            namespace: RELEASE_NS.into(),
            identity: "pod-a".into(),
            duration: Duration::from_secs(3),
            grace: Duration::from_secs(2),
        },
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let lead = tokio::spawn({
        let (replica, leading, cancel) = (replica.clone(), election.subscribe(), cancel.clone());
        async move { replica.lead_while_elected(leading, cancel).await }
    });
    h.apply(UsageBackfillBuilder::new("every-verb"));
    let done = h
        .fake
        .wait_for(&format!("{label}: Succeeded"), WAIT, |f| {
            let o = f.get(NS, "every-verb")?;
            let s = o.status.clone()?;
            let finished =
                s.phase == Some(Phase::Succeeded) && !usage_backfill_controller::has_finalizer(&o);
            finished.then_some(s)
        })
        .await;
    assert_eq!(done.watermark_stamped, Some(true), "{label}: {done:?}");
    // A renewal of the Lease, beside its creation.
    h.fake
        .wait_for(&format!("{label}: a Lease renewal"), WAIT, |f| {
            let renewals = f
                .requests()
                .iter()
                .filter(|r| r.resource == "leases" && r.method == "PATCH" && r.code == 200)
                .count();
            (renewals >= 2).then_some(())
        })
        .await;
    cancel.cancel();
    tokio::time::timeout(WAIT, lead)
        .await
        .expect("the replica stops")
        .unwrap()
        .unwrap();
    election.stop().await;
    let refused: Vec<String> = h
        .fake
        .requests()
        .iter()
        .filter(|r| r.code == 403)
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(refused.is_empty(), "{label}: refused {refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_uses_every_verb_in_each_secret_mode_and_scope() {
    for access in MODES {
        for scope in scopes() {
            one_run(access, scope).await;
        }
    }
}

/// (group, resource) -> verbs.
type Table = BTreeMap<(String, String), BTreeSet<String>>;

#[test]
#[ignore = "run by .ci/run after the suite, on the log the suite wrote (USAGE_BACKFILL_RBAC_LOG)"]
fn every_granted_verb_is_used_in_each_secret_mode_and_scope() {
    let path = std::env::var(rbac::LOG_ENV).unwrap_or_else(|_| {
        panic!(
            "set {} to the log of a `cargo test` run made with it set",
            rbac::LOG_ENV
        )
    });
    let log = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let uses: BTreeSet<Use> = log
        .lines()
        .map(|l| Use::parse(l).unwrap_or_else(|| panic!("{path}: a bad line {l:?}")))
        .collect();
    let mut unused = Vec::new();
    for access in MODES {
        let granted = rbac::grants(access);
        for scope in scopes() {
            let (mode, where_) = (rbac::secrets_name(access), rbac::scope_name(&scope));
            let mut used = Table::new();
            for u in uses
                .iter()
                .filter(|u| u.secrets == mode && u.scope == where_)
            {
                used.entry((u.group.clone(), u.resource.clone()))
                    .or_default()
                    .insert(u.verb.clone());
            }
            eprintln!("Secrets {mode}, {where_}: granted -> used");
            for ((group, resource), verbs) in &granted {
                let got = used
                    .get(&(group.clone(), resource.clone()))
                    .cloned()
                    .unwrap_or_default();
                let show = |v: &BTreeSet<String>| v.iter().cloned().collect::<Vec<_>>().join(",");
                eprintln!(
                    "  {group:>20} {resource:<24} {:<28} {}",
                    show(verbs),
                    show(&got)
                );
                for verb in verbs.difference(&got) {
                    unused.push(format!(
                        "{mode} Secrets, {where_}: {group}/{resource} {verb}"
                    ));
                }
            }
            // The other way round holds by construction (the fake refuses
            // what is not granted), unless the log is not the fake's.
            for ((group, resource), verbs) in &used {
                let granted_here = granted
                    .get(&(group.clone(), resource.clone()))
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    verbs.is_subset(&granted_here),
                    "{mode} Secrets, {where_}: {group}/{resource} {verbs:?} used, not granted"
                );
            }
        }
    }
    assert!(
        unused.is_empty(),
        "granted, yet no test used them (drop them from the chart and rbac-rules.yaml, or add the test that uses them):\n{}",
        unused.join("\n")
    );
}
