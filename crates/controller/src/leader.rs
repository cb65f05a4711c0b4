//! Leader election on a `coordination.k8s.io/v1` Lease, so that several
//! replicas can run and only one reconciles and backfills.
//!
//! [`kube_lease_manager`] acquires and renews the Lease (server-side apply
//! makes two simultaneous acquisitions conflict). It reports when the lock
//! changes hands, but not when a renewal fails or hangs: a leader cut off
//! from the API server would go on believing it leads after its Lease has
//! expired and another replica has taken over. So leadership here is a
//! fact with a deadline: this replica leads while the manager says it
//! holds the Lease *and* a read of the Lease showed it as the holder with a
//! `renewTime + leaseDurationSeconds` more than the margin ahead. The
//! Lease is read once per renewal, just after the manager should have
//! renewed it; when that read fails or shows no renewal, leadership ends
//! at `expiry - margin`, before any other replica may take over.
//!
//! The timings follow client-go's leader election (leaseDuration 15 s,
//! renewDeadline 10 s, retryPeriod 2 s), mapped onto the two parameters
//! kube-lease-manager has:
//! - `duration` 15 s is the Lease's `leaseDurationSeconds`: how long a
//!   standby waits after the last renewal before it takes over;
//! - `grace` 13 s: the manager renews that long before the expiry, so
//!   every `duration - grace` = 2 s (the retry period), and a failed
//!   renewal is tried again after the same pause;
//! - the margin is `duration / 3` = 5 s: a leader whose renewals have not
//!   been confirmed for `duration - margin` = 10 s (the renew deadline)
//!   steps down, 5 s before a standby may take over. That leaves four or
//!   five tries (a PATCH and the confirming GET each, with a timeout of
//!   the retry period) to get a renewal through a slow API server, where
//!   15 s / 5 s left about 2.5 s for one.
//!
//! The margin is also the clock skew tolerated between nodes: the manager
//! of a standby compares the holder's `renewTime` (the holder's clock) with
//! its own wall clock, and takes over an expired Lease by force, without a
//! resourceVersion check. A standby whose clock runs ahead of the leader's
//! by more than the margin would take over while the leader still leads;
//! nodes must keep their clocks in sync (NTP; see docs/reliability.md).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseParams};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The Lease the replicas compete for unless told another (`--lease-name`):
/// the name every earlier version used, so an upgrade keeps one Lease.
pub const LEASE_NAME: &str = "usage-backfill-operator";

/// Where the Lease is, who we are, and its timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// One per installation: the replicas sharing a Lease elect one leader
    /// between them, whatever namespaces each of them watches.
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    /// How long the Lease stays valid after a renewal; whole seconds, at
    /// least 2 (the Lease API counts in seconds).
    pub duration: Duration,
    /// The holder renews this long before the Lease expires, that is every
    /// `duration - grace`; whole seconds, more than a third of `duration`
    /// (the margin) and less than `duration`.
    pub grace: Duration,
}

/// Client-go's leaseDuration (the CLI's `--lease-duration` default).
#[cfg(test)]
const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Renewals every 2 s, client-go's retryPeriod (see the module doc).
#[cfg(test)]
const DEFAULT_LEASE_GRACE: Duration = Duration::from_secs(13);

impl LeaseSettings {
    /// Checks the timings against what the Lease API and the manager accept.
    pub fn validate(&self) -> Result<(), String> {
        let whole = |d: Duration| d.subsec_nanos() == 0;
        if !whole(self.duration) || !whole(self.grace) {
            return Err("--lease-duration and --lease-grace must be whole seconds".into());
        }
        if self.grace.is_zero() || self.grace >= self.duration {
            return Err("--lease-grace must be at least 1s and less than --lease-duration".into());
        }
        if self.grace <= self.margin() {
            return Err(
                "--lease-grace must be more than a third of --lease-duration: the leader steps down a third of \
                 the duration before the expiry, and must have renewed before"
                    .into(),
            );
        }
        if self.duration.as_secs() > i32::MAX as u64 {
            return Err("--lease-duration is too long".into());
        }
        if self.identity.is_empty() || self.name.is_empty() || self.namespace.is_empty() {
            return Err("the Lease name, namespace and identity must not be empty".into());
        }
        // Refused here rather than by the API server, which would refuse
        // every attempt to create the Lease while the replica retries.
        if !is_dns_subdomain(&self.name) {
            return Err(format!(
                "--lease-name {:?} is not a valid object name (lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit, at most 253 characters)",
                self.name
            ));
        }
        Ok(())
    }

    /// Leadership ends this long before the Lease expires: client-go's
    /// leaseDuration - renewDeadline.
    fn margin(&self) -> Duration {
        self.duration / 3
    }

    /// How often the holder renews, and the pause before it tries again
    /// after a failure: client-go's retryPeriod.
    pub fn retry_period(&self) -> Duration {
        self.duration
            .saturating_sub(self.grace)
            .max(Duration::from_millis(100))
    }

    /// Timeout of each request about the Lease: a hung renewal fails in
    /// time for another try before the leader has to step down.
    pub fn request_timeout(&self) -> Duration {
        self.retry_period().max(Duration::from_secs(1))
    }
}

/// An RFC 1123 subdomain: what the API server accepts as a Lease name.
fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// This replica's identity: `POD_NAME`, else the host name (which is the
/// pod name in a pod), else something unique to the process.
pub fn default_identity() -> String {
    let from_env = |k| {
        std::env::var(k)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("usage-backfill-{}", std::process::id()))
}

/// A running campaign for the Lease. Dropping it aborts the campaign
/// without releasing the Lease (it then expires); [`Election::stop`]
/// releases it.
pub struct Election {
    leading: watch::Receiver<bool>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Election {
    /// Starts campaigning. Panics when `settings` do not
    /// [validate](LeaseSettings::validate).
    pub fn start(client: Client, settings: LeaseSettings) -> Election {
        if let Err(e) = settings.validate() {
            panic!("invalid lease settings: {e}");
        }
        let (tx, leading) = watch::channel(false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(campaign(client, settings, tx, stop.clone()));
        Election {
            leading,
            stop,
            task: Some(task),
        }
    }

    /// Whether this replica leads now.
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Follows leadership: true while this replica leads.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stops campaigning; a held Lease is released (within two request
    /// timeouts), so that another replica takes it over when it looks again
    /// (at the latest when it would have expired) rather than after a forced
    /// takeover.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn campaign(
    client: Client,
    s: LeaseSettings,
    leading: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let Some(manager) = build(&client, &s, &stop).await else {
        return;
    };
    let manager = Arc::new(manager);
    // The manager's loop runs in a task of its own, never cancelled midway:
    // dropping it during a renewal would abandon the renewal.
    let (changes_tx, mut changes) = mpsc::channel(4);
    let driver = tokio::spawn({
        let manager = manager.clone();
        let pause = s.retry_period();
        async move {
            loop {
                // Stops when the campaign is gone (also when it was aborted):
                // otherwise this loop would renew the Lease forever.
                let result = tokio::select! {
                    r = manager.changed() => r,
                    () = changes_tx.closed() => return,
                };
                let failed = result.is_err();
                if changes_tx.send(result).await.is_err() {
                    return;
                }
                if failed {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    });
    let leases: Api<Lease> = Api::namespaced(client, &s.namespace);
    let mut w = Watch {
        holder: false,
        valid_until: None,
        read_now: false,
    };
    loop {
        let now = Instant::now();
        publish(&leading, &s, w.leading(now, s.margin()), w.holder);
        let wake = w.next_wake(now, &s);
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            change = changes.recv() => match change {
                Some(Ok(holder)) => {
                    tracing::debug!(identity = %s.identity, holder, "lease manager: lock state changed");
                    w.holder = holder;
                    w.read_now = holder;
                    if !holder {
                        w.valid_until = None;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(lease = %s.name, error = %e, "leader election: cannot talk to the API server");
                }
                None => break,
            },
            () = sleep_until(wake), if wake.is_some() => {
                // Step down first when due: the read below may take a while.
                publish(&leading, &s, w.leading(Instant::now(), s.margin()), w.holder);
                w.read_now = false;
                w.valid_until = read_lease(&leases, &s).await.unwrap_or(w.valid_until);
            }
        }
    }
    publish(&leading, &s, false, false);
    driver.abort();
    let _ = driver.await;
    if w.holder {
        // A read and a patch; bounded, so that a shutdown fits in the pod's
        // termination grace period.
        match tokio::time::timeout(s.request_timeout() * 2, manager.release()).await {
            Ok(Ok(())) => tracing::info!(lease = %s.name, "released the leader Lease"),
            Ok(Err(e)) => {
                tracing::warn!(lease = %s.name, error = %e, "cannot release the leader Lease; it expires on its own")
            }
            Err(_) => {
                tracing::warn!(lease = %s.name, "releasing the leader Lease timed out; it expires on its own")
            }
        }
    }
}

/// What this replica knows about its lock.
struct Watch {
    /// The manager says we hold the Lease.
    holder: bool,
    /// The Lease, as last read, names us and is valid until then.
    valid_until: Option<Instant>,
    /// Read the Lease as soon as possible (just acquired).
    read_now: bool,
}

impl Watch {
    fn leading(&self, now: Instant, margin: Duration) -> bool {
        self.holder && self.valid_until.is_some_and(|u| u > now + margin)
    }

    /// When to read the Lease next, or to step down (whichever is first).
    fn next_wake(&self, now: Instant, s: &LeaseSettings) -> Option<Instant> {
        if !self.holder {
            return None;
        }
        if self.read_now {
            return Some(now);
        }
        let retry = now + s.retry_period() / 2;
        let Some(until) = self.valid_until else {
            return Some(retry);
        };
        // The manager renews `grace` before the expiry; look half a retry
        // period later.
        let renewed_by = (until.checked_sub(s.grace).unwrap_or(now)) + s.retry_period() / 2;
        let step_down = until.checked_sub(s.margin()).unwrap_or(now);
        if renewed_by > now {
            Some(renewed_by.min(step_down))
        } else if step_down > now {
            Some(retry.min(step_down))
        } else {
            Some(retry)
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads the Lease: `Some(Some(expiry))` while it names us, `Some(None)`
/// when it does not, `None` when it cannot be read in time.
async fn read_lease(leases: &Api<Lease>, s: &LeaseSettings) -> Option<Option<Instant>> {
    let read = tokio::time::timeout(s.request_timeout(), leases.get_opt(&s.name)).await;
    match read {
        Ok(Ok(lease)) => Some(lease.as_ref().and_then(|l| expiry(l, &s.identity))),
        Ok(Err(e)) => {
            tracing::debug!(lease = %s.name, error = %e, "cannot read the leader Lease");
            None
        }
        Err(_) => {
            tracing::debug!(lease = %s.name, "reading the leader Lease timed out");
            None
        }
    }
}

/// When the Lease expires, if `identity` holds it. The times in a Lease are
/// the holder's own clock, so comparing them with ours is exact.
fn expiry(lease: &Lease, identity: &str) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    let expires = renewed.checked_add(duration)?;
    let now = (SystemTime::now(), Instant::now());
    Some(match expires.duration_since(now.0) {
        Ok(ahead) => now.1 + ahead,
        Err(_) => now.1,
    })
}

fn publish(tx: &watch::Sender<bool>, s: &LeaseSettings, leading: bool, holder: bool) {
    let changed = tx.send_if_modified(|v| {
        let changed = *v != leading;
        *v = leading;
        changed
    });
    if !changed {
        return;
    }
    if leading {
        tracing::info!(lease = %s.name, namespace = %s.namespace, identity = %s.identity, "became the leader");
    } else if holder {
        tracing::warn!(lease = %s.name, identity = %s.identity,
            "cannot confirm the renewal of the leader Lease before it expires: stepping down");
    } else {
        tracing::warn!(lease = %s.name, identity = %s.identity, "lost the leader Lease: stepping down");
    }
}

/// Builds the manager (creating the Lease when missing), retrying until
/// it works or `stop`.
async fn build(
    client: &Client,
    s: &LeaseSettings,
    stop: &CancellationToken,
) -> Option<LeaseManager> {
    let mut pause = Duration::from_millis(200);
    loop {
        let params = LeaseParams::new(s.identity.clone(), s.duration.as_secs(), s.grace.as_secs());
        let built = LeaseManagerBuilder::new(client.clone(), &s.name)
            .with_namespace(&s.namespace)
            .with_parameters(params)
            .build();
        tokio::select! {
            () = stop.cancelled() => return None,
            r = built => match r {
                Ok(m) => return Some(m),
                Err(e) => tracing::warn!(lease = %s.name, namespace = %s.namespace, error = %e,
                    retry_in = ?pause, "leader election: cannot set up the Lease"),
            },
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            name: LEASE_NAME.into(),
            namespace: "ops".into(),
            identity: "pod-a".into(),
            duration: DEFAULT_LEASE_DURATION,
            grace: DEFAULT_LEASE_GRACE,
        }
    }

    #[test]
    fn timings_are_checked() {
        assert_eq!(settings().validate(), Ok(()));
        let mut s = settings();
        s.grace = Duration::from_secs(15);
        assert!(s.validate().is_err());
        s.grace = Duration::ZERO;
        assert!(s.validate().is_err());
        s.grace = Duration::from_millis(1500);
        assert!(s.validate().unwrap_err().contains("whole seconds"));
        // Renewed after the step-down would be due: refused.
        s.grace = Duration::from_secs(5);
        assert!(s.validate().unwrap_err().contains("a third"));
        s.grace = Duration::from_secs(6);
        assert_eq!(s.validate(), Ok(()));
        let mut s = settings();
        s.identity.clear();
        assert!(s.validate().is_err());
        for bad in ["Upper", "-dash", "dash-", "under_score", &"a".repeat(254)] {
            let s = LeaseSettings {
                name: bad.to_owned(),
                ..settings()
            };
            assert!(s.validate().unwrap_err().contains("--lease-name"), "{bad}");
        }
        for good in ["shop-usage-backfill-operator", "a", "ops.usage-backfill-2"] {
            let s = LeaseSettings {
                name: good.to_owned(),
                ..settings()
            };
            assert_eq!(s.validate(), Ok(()), "{good}");
        }
    }

    #[test]
    fn the_defaults_are_client_gos_margins() {
        let s = settings();
        assert_eq!(s.duration, Duration::from_secs(15), "leaseDuration");
        assert_eq!(s.retry_period(), Duration::from_secs(2), "retryPeriod");
        assert_eq!(
            s.duration - s.margin(),
            Duration::from_secs(10),
            "renewDeadline"
        );
        assert_eq!(s.request_timeout(), Duration::from_secs(2));
    }

    #[test]
    fn leadership_ends_at_the_renew_deadline() {
        let s = settings();
        let now = Instant::now();
        let mut w = Watch {
            holder: true,
            valid_until: Some(now + Duration::from_secs(15)),
            read_now: false,
        };
        assert!(w.leading(now, s.margin()));
        // The renewal is due 2 s after the last one; the Lease is read a
        // second later.
        assert_eq!(w.next_wake(now, &s), Some(now + Duration::from_secs(3)));
        // No renewal seen: read again every second, and step down 10 s
        // after the last confirmed renewal (expiry - 5 s).
        let late = now + Duration::from_millis(9_500);
        assert_eq!(w.next_wake(late, &s), Some(now + Duration::from_secs(10)));
        assert_eq!(
            w.next_wake(now + Duration::from_secs(4), &s),
            Some(now + Duration::from_secs(5))
        );
        assert!(w.leading(late, s.margin()));
        assert!(!w.leading(now + Duration::from_secs(10), s.margin()));
        // Not the holder by the manager's account: not leading, whatever the Lease said.
        w.holder = false;
        assert!(!w.leading(now, s.margin()));
        assert_eq!(w.next_wake(now, &s), None);
    }

    #[test]
    fn expiry_needs_our_identity_and_a_renew_time() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let lease = |holder: &str, renewed: Option<jiff::Timestamp>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: renewed.map(MicroTime),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = jiff::Timestamp::now();
        let until = expiry(&lease("pod-a", Some(now)), "pod-a").unwrap();
        let ahead = until.duration_since(Instant::now());
        assert!(
            ahead > Duration::from_secs(14) && ahead <= Duration::from_secs(15),
            "{ahead:?}"
        );
        assert_eq!(expiry(&lease("pod-b", Some(now)), "pod-a"), None);
        assert_eq!(expiry(&lease("pod-a", None), "pod-a"), None);
        let long_ago = now - jiff::SignedDuration::from_secs(60);
        let past = expiry(&lease("pod-a", Some(long_ago)), "pod-a").unwrap();
        assert!(past <= Instant::now());
    }
}
