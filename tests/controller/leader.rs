//! Leader election: replicas on one (fake) API server.

use super::*;

// ---------------------------------------------------------------------------
// Leader election: replicas on one (fake) API server
// ---------------------------------------------------------------------------

const LEASE_NS: &str = "ops";
/// Short Lease timings: renewed every second, valid for three, and a
/// leader that cannot confirm a renewal steps down a second before expiry.
const LEASE_DURATION: Duration = Duration::from_secs(3);

fn lease(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: LEASE_NAME.into(),
        namespace: LEASE_NS.into(),
        identity: identity.into(),
        duration: LEASE_DURATION,
        grace: Duration::from_secs(2),
    }
}

async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let polled = tokio::time::timeout(timeout, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        polled.is_ok(),
        "timed out after {timeout:?} waiting for {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_elect_one_leader_and_a_stopped_leader_hands_over() {
    let (client_a, fake) = FakeApiServer::start();
    let (client_b, _) = fake.connect();
    let a = Election::start(client_a, lease("pod-a"));
    let b = Election::start(client_b, lease("pod-b"));
    until("a leader", WAIT, || a.is_leading() || b.is_leading()).await;
    let a_leads = a.is_leading();
    let leader_id = if a_leads { "pod-a" } else { "pod-b" };
    let renewed_at =
        |f: &FakeApiServer| f.lease(LEASE_NS, LEASE_NAME).unwrap()["spec"]["renewTime"].clone();
    let first_renewal = renewed_at(&fake);

    // Over two Lease durations (renewals included): one leader, always the same.
    let watch_until = Instant::now() + 2 * LEASE_DURATION;
    while Instant::now() < watch_until {
        assert_eq!(
            (a.is_leading(), b.is_leading()),
            (a_leads, !a_leads),
            "exactly one leader, and no flapping"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        fake.lease_holder(LEASE_NS, LEASE_NAME).as_deref(),
        Some(leader_id)
    );
    assert_ne!(
        renewed_at(&fake),
        first_renewal,
        "the leader renews the Lease"
    );
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());

    // A leader that stops (SIGTERM) releases the Lease: the other takes
    // it over by the time it would have expired, with no forced takeover.
    let (leader, standby, standby_id) = if a_leads {
        (a, b, "pod-b")
    } else {
        (b, a, "pod-a")
    };
    let stopped = Instant::now();
    leader.stop().await;
    until("the standby to take over", WAIT, || standby.is_leading()).await;
    assert!(
        stopped.elapsed() < LEASE_DURATION + Duration::from_millis(1500),
        "took {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        fake.lease_holder(LEASE_NS, LEASE_NAME).as_deref(),
        Some(standby_id)
    );
    standby.stop().await;
    assert_eq!(
        fake.lease_holder(LEASE_NS, LEASE_NAME),
        None,
        "released on stop"
    );
}

/// Two installations in one namespace (two Helm releases, each passing its
/// full name as `--lease-name`): each elects its own leader, so neither
/// release's watched namespaces go unreconciled while the other leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_with_their_own_lease_names_each_elect_a_leader() {
    let (client, fake) = FakeApiServer::start();
    let named = |lease_name: &str, identity: &str| LeaseSettings {
        name: lease_name.into(),
        ..lease(identity)
    };
    let (shop, billing) = (
        "shop-usage-backfill-operator",
        "billing-usage-backfill-operator",
    );
    let shop_pods = [
        Election::start(client.clone(), named(shop, "shop-0")),
        Election::start(fake.connect().0, named(shop, "shop-1")),
    ];
    let billing_pods = [
        Election::start(fake.connect().0, named(billing, "billing-0")),
        Election::start(fake.connect().0, named(billing, "billing-1")),
    ];
    let leaders = |pods: &[Election; 2]| pods.iter().filter(|e| e.is_leading()).count();
    until("a leader in each installation", WAIT, || {
        leaders(&shop_pods) == 1 && leaders(&billing_pods) == 1
    })
    .await;
    // Over two Lease durations, renewals included: still one each.
    let watch_until = Instant::now() + 2 * LEASE_DURATION;
    while Instant::now() < watch_until {
        assert_eq!(
            (leaders(&shop_pods), leaders(&billing_pods)),
            (1, 1),
            "exactly one leader per installation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let holder = |name| fake.lease_holder(LEASE_NS, name).unwrap_or_default();
    assert!(holder(shop).starts_with("shop-"), "{}", holder(shop));
    assert!(
        holder(billing).starts_with("billing-"),
        "{}",
        holder(billing)
    );
    assert!(
        fake.lease(LEASE_NS, LEASE_NAME).is_none(),
        "nobody uses the default name"
    );
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
    for e in shop_pods.into_iter().chain(billing_pods) {
        e.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_election_stops_renewing_its_lease() {
    let (client, fake) = FakeApiServer::start();
    let a = Election::start(client, lease("pod-a"));
    until("pod-a to lead", WAIT, || a.is_leading()).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let renewed = fake.lease(LEASE_NS, LEASE_NAME).unwrap()["spec"]["renewTime"].clone();
    tokio::time::sleep(LEASE_DURATION).await;
    assert_eq!(
        fake.lease(LEASE_NS, LEASE_NAME).unwrap()["spec"]["renewTime"],
        renewed,
        "nothing renews the Lease any more: it expires"
    );
}

/// The leader is cut off from the API server: it must step down before its
/// Lease expires, the standby takes over after the expiry, never both at once.
async fn a_cut_off_leader_hands_over(outage: Outage) {
    let (client_a, fake) = FakeApiServer::start();
    let (client_b, _) = fake.connect();
    let a = Election::start(client_a, lease("pod-a"));
    until("pod-a to lead", WAIT, || a.is_leading()).await;
    let b = Election::start(client_b, lease("pod-b"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.is_leading() && !b.is_leading());

    let cut = Instant::now();
    fake.cut(0, Some(outage));
    let (mut a_down, mut b_up) = (None, None);
    tokio::time::timeout(WAIT, async {
        while b_up.is_none() {
            let (al, bl) = (a.is_leading(), b.is_leading());
            assert!(!(al && bl), "two leaders at once");
            if !al && a_down.is_none() {
                a_down = Some(cut.elapsed());
            }
            if bl {
                b_up = Some(cut.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("pod-b takes over");
    let (a_down, b_up) = (a_down.unwrap(), b_up.unwrap());
    eprintln!(
        "{outage:?}: pod-a stepped down {a_down:?} after the cut, pod-b led {b_up:?} after it"
    );
    // The last renewal was before the cut, so the Lease expires within
    // LEASE_DURATION of it; pod-a is gone a second (grace / 2) before that.
    assert!(
        a_down < LEASE_DURATION,
        "pod-a stepped down after {a_down:?}"
    );
    assert!(a_down < b_up, "pod-a {a_down:?}, pod-b {b_up:?}");
    assert!(b_up < LEASE_DURATION + Duration::from_secs(3), "{b_up:?}");
    assert_eq!(
        fake.lease_holder(LEASE_NS, LEASE_NAME).as_deref(),
        Some("pod-b")
    );

    // Back online, pod-a finds pod-b holding the Lease and stays standby.
    fake.cut(0, None);
    let watch_until = Instant::now() + LEASE_DURATION;
    while Instant::now() < watch_until {
        assert!(!a.is_leading() && b.is_leading());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_before_its_lease_expires() {
    a_cut_off_leader_hands_over(Outage::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_fail_steps_down_before_its_lease_expires() {
    a_cut_off_leader_hands_over(Outage::Fail).await;
}

fn replica(client: kube::Client, shutdown_timeout: Duration) -> Arc<Replica> {
    Arc::new(Replica {
        client,
        settings: settings(),
        namespaces: Vec::new(),
        concurrency: 4,
        shutdown_timeout,
        state: HealthState::new(true, Metrics::new()),
    })
}

fn metric(r: &Replica, series: &str) -> Option<f64> {
    r.state
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_runs_backfills_and_a_new_leader_resumes_the_run() {
    let h = Harness::new(Some(slow_history())).await;
    h.put_secret();
    let (client_b, b_id) = h.fake.connect();
    let (ra, rb) = (
        replica(h.ctx.client.clone(), WAIT),
        replica(client_b.clone(), WAIT),
    );
    let ea = Election::start(h.ctx.client.clone(), lease("pod-a"));
    until("pod-a to lead", WAIT, || ea.is_leading()).await;
    let eb = Election::start(client_b, lease("pod-b"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let spawn = |r: &Arc<Replica>, e: &Election| {
        let (r, leading, cancel) = (r.clone(), e.subscribe(), cancel.clone());
        tokio::spawn(async move { r.lead_while_elected(leading, cancel).await })
    };
    let (ta, tb) = (spawn(&ra, &ea), spawn(&rb, &eb));

    h.apply(UsageBackfillBuilder::new("handover").sleep_between_slices("700ms"));
    h.wait_running("handover", 1).await;
    assert!(
        h.fake
            .requests()
            .iter()
            .filter(|r| r.client == b_id)
            .all(|r| r.resource == "leases"),
        "the standby neither watches nor writes UsageBackfills, Secrets or Events"
    );
    assert_eq!(metric(&ra, "usage_backfill_leader"), Some(1.0));
    assert_eq!(metric(&rb, "usage_backfill_leader"), Some(0.0));
    assert_eq!(metric(&ra, "usage_backfill_runs_active"), Some(1.0));

    // pod-a loses the API server: it steps down and cancels its run (lock
    // 4246 released, nothing stamped; its final write fails), and stands by.
    // Counted after the cut: a progress write still in flight before it
    // is pod-a's last, not one after the handover.
    h.fake.cut(0, Some(Outage::Fail));
    let writes_before = h.fake.status_writes("handover").len();
    until("pod-a to step down", WAIT, || !ea.is_leading()).await;
    until("pod-a's run to stop", WAIT, || {
        metric(&ra, "usage_backfill_runs_active") == Some(0.0)
    })
    .await;
    assert_eq!(metric(&ra, "usage_backfill_leader"), Some(0.0));
    assert_eq!(
        metric(&ra, "usage_backfill_runs_total{outcome=\"cancelled\"}"),
        Some(1.0)
    );
    assert!(!ta.is_finished(), "pod-a stays up as a standby");

    // pod-b takes over and continues the run from its cursor.
    let done = h
        .fake
        .wait_for("Succeeded under pod-b", WAIT, |f| {
            let o = f.get(NS, "handover")?;
            let s = o.status.clone()?;
            (s.phase == Some(Phase::Succeeded) && !writes_has_finalizer(&o)).then_some(s)
        })
        .await;
    assert!(eb.is_leading());
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.slices_processed, done.slices_total);
    assert_eq!(done.attempts, Some(1), "a new leader is not a new attempt");
    // A write of pod-a's that passed the fake before the cut can still be
    // recorded after it; from pod-b's first write on, only pod-b writes.
    let after: Vec<_> = h.fake.status_writes("handover")[writes_before..]
        .iter()
        .skip_while(|r| r.client != b_id)
        .cloned()
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|r| r.client == b_id),
        "only pod-b writes now"
    );
    let resumed = after[0].status().unwrap();
    assert!(
        message(&resumed, ConditionType::Reconciling)
            .starts_with("continuing attempt 1 of 7 after a controller restart, resuming at "),
        "{}",
        message(&resumed, ConditionType::Reconciling)
    );
    assert_eq!(
        metric(&rb, "usage_backfill_runs_total{outcome=\"backfilled\"}"),
        Some(1.0)
    );
    h.assert_rollup_correct().await;

    // pod-a back online: still a standby.
    h.fake.cut(0, None);
    tokio::time::sleep(LEASE_DURATION).await;
    assert!(!ea.is_leading() && eb.is_leading());
    cancel.cancel();
    for t in [ta, tb] {
        tokio::time::timeout(WAIT, t)
            .await
            .expect("the replica stops")
            .unwrap()
            .expect("a clean stop");
    }
    ea.stop().await;
    eb.stop().await;
    assert!(h.lock_4246().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_outlives_its_leadership_makes_the_replica_exit() {
    let h = Harness::new(Some(slow_history())).await;
    h.put_secret();
    let ra = replica(h.ctx.client.clone(), Duration::from_millis(500));
    let ea = Election::start(h.ctx.client.clone(), lease("pod-a"));
    until("pod-a to lead", WAIT, || ea.is_leading()).await;
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (ra, leading, cancel) = (ra.clone(), ea.subscribe(), cancel.clone());
        async move { ra.lead_while_elected(leading, cancel).await }
    });
    // One session, so that the walk (seven slices, a second apart) still
    // has slices to go when leadership ends two seconds after the cut: two
    // sessions could finish and stamp first.
    h.apply(
        UsageBackfillBuilder::new("stuck")
            .sleep_between_slices("1s")
            .edit(|s| s.parallelism = 1),
    );
    h.wait_running("stuck", 1).await;
    let watermark = h.watermark().await;

    // A partition: the run is cancelled, but its final status write hangs
    // past --shutdown-timeout, so the replica gives up with an error (the
    // binary exits 1 and the Deployment restarts it as a standby).
    h.fake.cut(0, Some(Outage::Hang));
    // A watch event already on its way starts a reconcile, whose GET hangs:
    // it must not hold up the stepping down either.
    let status = h.status("stuck");
    h.fake.set_status(NS, "stuck", &status);
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("the replica gives up")
        .unwrap();
    assert!(
        matches!(
            result,
            Err(ControllerError::RunsOutlivedLeadership { runs: 1 })
        ),
        "{result:?}"
    );
    assert!(!ea.is_leading());
    // The engine let go of the lock all the same, and stamped nothing.
    assert!(h.lock_4246().await.is_empty());
    assert_eq!(h.watermark().await, watermark);
    assert!(h.fake.hung_requests() > 0);
    drop(ea);
}
