//! `usage-backfill wait NAME`: blocks until a UsageBackfill is Ready for
//! its current generation, printing progress, for a Helm pre-upgrade hook
//! Job (Helm waits for Jobs, not for custom resources) or a script.
//!
//! Plain polling with GET, every `--poll`: it needs only `get` on
//! usagebackfills, survives API server restarts and proxies that cut long
//! requests, and a backfill's minutes make a poll's seconds irrelevant.
//! Only a status that describes the current generation
//! (`status.observedGeneration == metadata.generation`) counts, so a Ready
//! left over from the previous spec is never mistaken for this one's.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use kube::Client;
use kube::api::Api;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::exit;
use usage_backfill_api::{
    ConditionStatus, ConditionType, Phase, UsageBackfill, UsageBackfillStatus,
};
use usage_backfill_limits::duration;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    Ready=True for the current generation (status.observedGeneration ==
       metadata.generation): backfilled, skipped or planned (dry run)
  1    not Ready within --timeout (the backfill may still be running or
       waiting for a retry: waiting again may succeed), or the API server
       cannot be reached
  2    usage error: bad flags or values
  3    needs attention: Stalled=True or phase Failed (the condition message
       is printed), the resource does not exist after --not-found-grace or
       was deleted, or reading it is forbidden (the Job's ServiceAccount needs
       get on usagebackfills.usage.multica.ai)
  130  interrupted by SIGINT/SIGTERM";

/// Flags of `usage-backfill wait`.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Name of the UsageBackfill.
    pub name: String,
    /// Its namespace. Default: the kubeconfig context's namespace (in a pod,
    /// the pod's own).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Give up after this long (Go-style duration: 30m, 1h30m, 90s).
    #[arg(long, value_parser = duration::clap_parse, default_value = "30m")]
    pub timeout: Duration,
    /// How often to read the resource (at least 100ms).
    #[arg(long, value_parser = duration::clap_parse, default_value = "2s")]
    pub poll: Duration,
    /// How long to wait for a resource that does not exist yet before
    /// giving up (bounded by --timeout).
    #[arg(long, value_parser = duration::clap_parse, default_value = "1m")]
    pub not_found_grace: Duration,
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Ready=True for the current generation; the Ready message.
    Ready { reason: String, message: String },
    /// Stalled=True, or phase Failed, for the current generation.
    Failed { reason: String, message: String },
    /// Not Ready within the timeout; the last progress seen.
    TimedOut { last: String },
    /// It never appeared within the grace period, or it was deleted.
    NotFound { deleted: bool },
    /// The API server refused to show it.
    Forbidden { message: String },
    /// SIGINT or SIGTERM.
    Interrupted,
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Ready { .. } => exit::OK,
            Outcome::TimedOut { .. } => exit::RETRYABLE,
            Outcome::Failed { .. } | Outcome::NotFound { .. } | Outcome::Forbidden { .. } => {
                exit::NEEDS_ATTENTION
            }
            Outcome::Interrupted => exit::INTERRUPTED,
        }
    }
}

/// What one read of the object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assessment {
    Ready {
        reason: String,
        message: String,
    },
    Failed {
        reason: String,
        message: String,
    },
    /// Still going: a progress line.
    Waiting(String),
}

/// Judges one read of the object (pure).
pub fn assess(obj: &UsageBackfill) -> Assessment {
    let generation = obj.metadata.generation.unwrap_or(0);
    let status = obj.status.clone().unwrap_or_default();
    if status.observed_generation != generation {
        return Assessment::Waiting(if status.observed_generation < 0 {
            format!("generation {generation} not picked up by the controller yet")
        } else {
            format!(
                "generation {generation} not observed yet (the status describes generation {})",
                status.observed_generation
            )
        });
    }
    let current = |t: ConditionType| {
        status
            .condition(t)
            .filter(|c| c.observed_generation.is_none_or(|g| g == generation))
    };
    if let Some(c) = current(ConditionType::Stalled).filter(|c| ConditionStatus::is_true(c)) {
        return Assessment::Failed {
            reason: c.reason.clone(),
            message: c.message.clone(),
        };
    }
    if status.phase == Some(Phase::Failed) {
        let ready = current(ConditionType::Ready);
        return Assessment::Failed {
            reason: ready.map_or_else(|| "Failed".to_owned(), |c| c.reason.clone()),
            message: status
                .last_error
                .clone()
                .or_else(|| ready.map(|c| c.message.clone()))
                .unwrap_or_default(),
        };
    }
    if let Some(c) = current(ConditionType::Ready).filter(|c| ConditionStatus::is_true(c)) {
        return Assessment::Ready {
            reason: c.reason.clone(),
            message: c.message.clone(),
        };
    }
    Assessment::Waiting(progress(&status))
}

/// `Running 3/12 slices, 1234 rows: <message>`, with the lock holder while
/// waiting for the lock.
fn progress(s: &UsageBackfillStatus) -> String {
    let mut line = s.phase.map_or("Pending", Phase::as_str).to_owned();
    if let Some(p) = &s.progress {
        line.push_str(&format!(" {p} slices"));
    }
    if let Some(rows) = s.rows_touched {
        line.push_str(&format!(", {rows} rows"));
    }
    if s.phase == Some(Phase::WaitingForLock)
        && let Some(h) = &s.lock_holder
    {
        line.push_str(", lock 4246 held by");
        if let Some(pid) = h.pid {
            line.push_str(&format!(" pid {pid}"));
        }
        if let Some(app) = h.application_name.as_deref().filter(|a| !a.is_empty()) {
            line.push_str(&format!(" ({app})"));
        }
        if let Some(addr) = &h.client_addr {
            line.push_str(&format!(" from {addr}"));
        }
        if let Some(since) = &h.since {
            line.push_str(&format!(" since {}", since.0));
        }
    }
    // The condition that says what is going on: Reconciling while work is
    // pending, else Ready (e.g. Suspended).
    let why = s
        .condition(ConditionType::Reconciling)
        .filter(|c| ConditionStatus::is_true(c))
        .or_else(|| s.condition(ConditionType::Ready));
    if let Some(c) = why {
        line.push_str(&format!(" [{}]", c.reason));
        if !c.message.is_empty() {
            line.push_str(&format!(": {}", c.message));
        }
    }
    line
}

/// Waits as `args` say, printing a line to `out` whenever the progress
/// changes.
pub async fn wait(
    client: Client,
    args: &WaitArgs,
    out: &mut (dyn Write + Send),
    cancel: &CancellationToken,
) -> Outcome {
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let api: Api<UsageBackfill> = Api::namespaced(client, &namespace);
    let who = format!("usagebackfill {namespace}/{}", args.name);
    let started = Instant::now();
    let deadline = started + args.timeout;
    let poll = args.poll.max(Duration::from_millis(100));
    let mut printed: Option<String> = None;
    let mut say = |line: String| {
        if printed.as_ref() != Some(&line) {
            let _ = writeln!(out, "{who}: {line}");
            let _ = out.flush();
            printed = Some(line);
        }
    };
    let mut seen = false;
    let mut last = String::from("nothing read yet");
    loop {
        let read = tokio::select! {
            () = cancel.cancelled() => return Outcome::Interrupted,
            () = tokio::time::sleep_until(deadline) => return Outcome::TimedOut { last },
            r = api.get_opt(&args.name) => r,
        };
        match read {
            Ok(Some(obj)) => {
                seen = true;
                match assess(&obj) {
                    Assessment::Ready { reason, message } => {
                        return Outcome::Ready { reason, message };
                    }
                    Assessment::Failed { reason, message } => {
                        return Outcome::Failed { reason, message };
                    }
                    Assessment::Waiting(mut line) => {
                        if obj.metadata.deletion_timestamp.is_some() {
                            line.push_str(" (being deleted)");
                        }
                        last = line.clone();
                        say(line);
                    }
                }
            }
            Ok(None) if seen => return Outcome::NotFound { deleted: true },
            Ok(None) => {
                if started.elapsed() >= args.not_found_grace {
                    return Outcome::NotFound { deleted: false };
                }
                last = "does not exist (yet)".into();
                say(format!(
                    "does not exist yet; waiting up to {} for it to be created",
                    duration::format(args.not_found_grace)
                ));
            }
            Err(kube::Error::Api(e)) if e.code == 401 || e.code == 403 => {
                return Outcome::Forbidden { message: e.message };
            }
            Err(e) => {
                last = format!("cannot read it: {e}");
                say(format!("cannot read it: {e}; retrying"));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Outcome::Interrupted,
            () = tokio::time::sleep_until(deadline) => return Outcome::TimedOut { last },
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// The final line for `outcome`.
pub fn describe(outcome: &Outcome, args: &WaitArgs) -> String {
    match outcome {
        Outcome::Ready { reason, message } => format!("Ready ({reason}): {message}"),
        Outcome::Failed { reason, message } => format!("failed ({reason}): {message}"),
        Outcome::TimedOut { last } => format!(
            "not Ready within {}; last seen: {last}",
            duration::format(args.timeout)
        ),
        Outcome::NotFound { deleted: true } => "was deleted while waiting for it".into(),
        Outcome::NotFound { deleted: false } => format!(
            "does not exist (waited {}); check the name, the namespace and that the CRD is installed",
            duration::format(args.not_found_grace.min(args.timeout))
        ),
        Outcome::Forbidden { message } => format!(
            "forbidden: {message} (the ServiceAccount needs get on usagebackfills.usage.multica.ai)"
        ),
        Outcome::Interrupted => "interrupted".into(),
    }
}

/// `usage-backfill wait`: the exit code.
pub async fn run(args: WaitArgs, cancel: CancellationToken) -> u8 {
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot set up the Kubernetes client: {e}");
            return exit::RETRYABLE;
        }
    };
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let mut stdout = std::io::stdout();
    let outcome = wait(client, &args, &mut stdout, &cancel).await;
    let line = format!(
        "usagebackfill {namespace}/{}: {}",
        args.name,
        describe(&outcome, &args)
    );
    match outcome {
        Outcome::Ready { .. } => println!("{line}"),
        _ => eprintln!("error: {line}"),
    }
    outcome.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use usage_backfill_api::{LockHolder, Reason, UsageBackfillSpec};

    fn obj(generation: i64, edit: impl FnOnce(&mut UsageBackfillStatus)) -> UsageBackfill {
        let mut o = UsageBackfill::new("b", UsageBackfillSpec::new("db"));
        o.metadata.generation = Some(generation);
        let mut s = UsageBackfillStatus::default();
        edit(&mut s);
        o.status = Some(s);
        o
    }

    fn now() -> Time {
        Time("2026-01-01T00:00:00Z".parse().unwrap())
    }

    #[test]
    fn only_the_current_generation_counts() {
        assert_eq!(
            assess(&obj(1, |_| {})),
            Assessment::Waiting("generation 1 not picked up by the controller yet".into())
        );
        let stale_ready = obj(2, |s| {
            s.observed_generation = 1;
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::True,
                Reason::Backfilled,
                "done",
                &now(),
            );
        });
        assert_eq!(
            assess(&stale_ready),
            Assessment::Waiting(
                "generation 2 not observed yet (the status describes generation 1)".into()
            )
        );
        let ready = obj(2, |s| {
            s.observed_generation = 2;
            s.phase = Some(Phase::Succeeded);
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::True,
                Reason::Skipped,
                "skipped",
                &now(),
            );
        });
        assert_eq!(
            assess(&ready),
            Assessment::Ready {
                reason: "Skipped".into(),
                message: "skipped".into()
            }
        );
    }

    #[test]
    fn stalled_or_failed_is_a_failure_with_its_message() {
        let stalled = obj(3, |s| {
            s.observed_generation = 3;
            s.phase = Some(Phase::Failed);
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::False,
                Reason::InvalidSpec,
                "bad",
                &now(),
            );
            s.set_condition(
                ConditionType::Stalled,
                ConditionStatus::True,
                Reason::InvalidSpec,
                "spec.lagThreshold: invalid duration",
                &now(),
            );
        });
        assert_eq!(
            assess(&stalled),
            Assessment::Failed {
                reason: "InvalidSpec".into(),
                message: "spec.lagThreshold: invalid duration".into()
            }
        );
        let failed = obj(1, |s| {
            s.observed_generation = 1;
            s.phase = Some(Phase::Failed);
            s.last_error = Some("permission denied".into());
        });
        assert_eq!(
            assess(&failed),
            Assessment::Failed {
                reason: "Failed".into(),
                message: "permission denied".into()
            }
        );
    }

    #[test]
    fn progress_lines_show_phase_counts_and_the_lock_holder() {
        let running = obj(1, |s| {
            s.observed_generation = 1;
            s.phase = Some(Phase::Running);
            s.set_slices(3, 12);
            s.rows_touched = Some(1234);
            s.set_condition(
                ConditionType::Reconciling,
                ConditionStatus::True,
                Reason::Running,
                "walking",
                &now(),
            );
        });
        assert_eq!(
            assess(&running),
            Assessment::Waiting("Running 3/12 slices, 1234 rows [Running]: walking".into())
        );
        let waiting = obj(1, |s| {
            s.observed_generation = 1;
            s.phase = Some(Phase::WaitingForLock);
            s.lock_holder = Some(LockHolder {
                pid: Some(42),
                application_name: Some("pg_cron rollup".into()),
                client_addr: None,
                since: Some(now()),
            });
        });
        assert_eq!(
            assess(&waiting),
            Assessment::Waiting(
                "WaitingForLock, lock 4246 held by pid 42 (pg_cron rollup) since 2026-01-01T00:00:00Z"
                    .into()
            )
        );
    }

    #[test]
    fn exit_codes() {
        let ready = Outcome::Ready {
            reason: "Backfilled".into(),
            message: String::new(),
        };
        assert_eq!(ready.exit_code(), 0);
        assert_eq!(
            Outcome::TimedOut {
                last: String::new()
            }
            .exit_code(),
            1
        );
        assert_eq!(Outcome::NotFound { deleted: false }.exit_code(), 3);
        assert_eq!(
            Outcome::Forbidden {
                message: String::new()
            }
            .exit_code(),
            3
        );
        assert_eq!(Outcome::Interrupted.exit_code(), 130);
    }
}
