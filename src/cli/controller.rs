//! `usage-backfill controller`: its flags, and the exit code of a controller
//! that stops. The controller itself is the `usage_backfill_controller` crate.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;
use usage_backfill_controller::Backoff;
use usage_backfill_controller::{Config, LeaseSettings, SECRET_RECHECK_BOUNDS, Settings};
use usage_backfill_controller::{LEASE_NAME, default_identity};
use usage_backfill_limits::duration;

use super::exit;

/// Longest `--progress-interval`: beyond the heartbeat (15s) it changes
/// nothing, and a larger value is more likely a unit mistake.
const PROGRESS_INTERVAL_MAX: Duration = Duration::from_secs(15 * 60);

/// Flags of `usage-backfill controller`.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Namespace to watch; repeat (or separate with commas) for several.
    /// Default: all namespaces.
    #[arg(
        long = "namespace",
        short = 'n',
        env = "WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Backfill runs (and reconciles) in progress at once; more runs wait
    /// in phase Pending for a slot.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, visible_alias = "http-addr", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Session setting of every backfill session, NAME=VALUE; repeatable.
    /// Applied after the spec's tuning preset, before spec.tuning.settings
    /// (which win). Default: none; the preset has the measured settings.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = super::parse_setting)]
    pub session_settings: Vec<(String, String)>,
    /// Backoff before the first retry of a failed attempt; doubles per
    /// failure.
    #[arg(long, value_parser = duration::clap_parse, default_value = "10s")]
    pub retry_backoff: Duration,
    /// Longest backoff between attempts.
    #[arg(long, value_parser = duration::clap_parse, default_value = "5m")]
    pub retry_backoff_max: Duration,
    /// How long a shutdown (or the loss of leadership) waits for runs to
    /// save their cursor.
    #[arg(long, value_parser = duration::clap_parse, default_value = "25s")]
    pub shutdown_timeout: Duration,
    /// A run writes its slice progress (status and progress record) at
    /// most this often; phase changes and the final status go out at once,
    /// and a heartbeat every 15s carries the progress too. 0s writes every
    /// slice. At most 15m.
    #[arg(long, value_parser = duration::clap_parse, default_value = "5s")]
    pub progress_interval: Duration,
    /// How often a UsageBackfill waiting for its Secret or a retry, or
    /// Failed, reads its Secrets again (a created Secret starts the run, a
    /// changed value restarts a Failed one): the longest such reaction
    /// delay without --watch-secrets. Between 1s and 1h.
    #[arg(long, value_parser = duration::clap_parse, default_value = "60s")]
    pub secret_recheck_interval: Duration,
    /// Also watch the metadata of every Secret in the watched namespaces,
    /// to react to a created or rotated Secret at once. Needs list and
    /// watch on Secrets (chart value secrets.watch); without it the
    /// operator only gets the Secrets its UsageBackfills name.
    #[arg(long, default_value_t = false, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub watch_secrets: bool,
    /// Elect a leader among the replicas with the Lease --lease-name; only
    /// the leader reconciles and runs backfills, the others stand by (healthy and ready). Set
    /// `--leader-election=false` to run a single replica without a Lease
    /// (local development).
    #[arg(long, default_value_t = true, num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease. Every installation in a namespace needs
    /// its own: replicas sharing a Lease elect one leader between them, so
    /// a second installation would stand by for good (the chart passes the
    /// release's full name).
    #[arg(long, default_value = LEASE_NAME)]
    pub lease_name: String,
    /// Namespace of the leader Lease: the operator's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Identity of this replica in the Lease. Default: $POD_NAME, else the
    /// host name.
    #[arg(long, env = "POD_NAME")]
    pub lease_identity: Option<String>,
    /// How long the Lease stays valid after the leader's last renewal:
    /// how long the replicas go without a leader when it dies. Whole
    /// seconds.
    #[arg(long, value_parser = duration::clap_parse, default_value = "15s")]
    pub lease_duration: Duration,
    /// The leader renews the Lease this long before it expires, so every
    /// --lease-duration minus this (and tries again as often when a
    /// renewal fails). It steps down a third of --lease-duration before
    /// the expiry when no renewal went through, which is also the clock
    /// skew tolerated between nodes. Whole seconds, more than a third of
    /// --lease-duration and less than it. The defaults are client-go's
    /// (lease 15s, renew deadline 10s, retry period 2s).
    #[arg(long, value_parser = duration::clap_parse, default_value = "13s")]
    pub lease_grace: Duration,
}

impl ControllerArgs {
    /// The leader election settings of these flags.
    pub fn lease_settings(&self) -> std::result::Result<LeaseSettings, String> {
        let settings = LeaseSettings {
            name: self.lease_name.clone(),
            namespace: self.lease_namespace.clone(),
            identity: self
                .lease_identity
                .clone()
                .filter(|i| !i.is_empty())
                .unwrap_or_else(default_identity),
            duration: self.lease_duration,
            grace: self.lease_grace,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// The controller's configuration of these flags; a message naming the
    /// flag when they contradict each other.
    pub fn config(&self) -> Result<Config, String> {
        let lease = self
            .leader_election
            .then(|| self.lease_settings())
            .transpose()?;
        let mut settings = Settings::default();
        settings.runner.concurrency = usize::from(self.concurrency);
        settings.runner.backoff = Backoff {
            base: self.retry_backoff,
            max: self.retry_backoff_max.max(self.retry_backoff),
        };
        settings.session_settings = self.session_settings.clone();
        let (min, max) = SECRET_RECHECK_BOUNDS;
        if !(min..=max).contains(&self.secret_recheck_interval) {
            return Err(format!(
                "--secret-recheck-interval must be between {} and {}",
                duration::format(min),
                duration::format(max)
            ));
        }
        settings.secret_recheck_interval = self.secret_recheck_interval;
        if self.progress_interval > PROGRESS_INTERVAL_MAX {
            return Err(format!(
                "--progress-interval must be at most {}",
                duration::format(PROGRESS_INTERVAL_MAX)
            ));
        }
        settings.runner.progress_interval = self.progress_interval;
        settings.watch_secrets = self.watch_secrets;
        Ok(Config {
            namespaces: self.namespaces.clone(),
            concurrency: self.concurrency,
            health_addr: self.health_addr,
            settings,
            shutdown_timeout: self.shutdown_timeout,
            lease,
        })
    }
}

/// Runs the controller until `cancel`; the exit code of its end.
pub async fn run(args: ControllerArgs, cancel: CancellationToken) -> u8 {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
    };
    match usage_backfill_controller::run(config, cancel).await {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {}", usage_backfill_engine::error_chain(&e));
            exit::RETRYABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert!(w.args.namespaces.is_empty());
        assert_eq!(w.args.concurrency, 4);
        assert_eq!(w.args.health_addr.to_string(), "0.0.0.0:8080");
        assert!(w.args.session_settings.is_empty());
        let s = w.args.config().unwrap().settings;
        assert_eq!(s.runner.backoff.base, Duration::from_secs(10));
        assert_eq!(
            s.runner.progress_interval,
            usage_backfill_controller::DEFAULT_PROGRESS_INTERVAL
        );
        assert_eq!(s.runner.progress_interval, Duration::from_secs(5));
        assert_eq!(s.runner.backoff.max, Duration::from_secs(300));

        let w = Wrap::try_parse_from([
            "x",
            "-n",
            "a,b",
            "--namespace",
            "c",
            "--concurrency",
            "2",
            "--set",
            "work_mem=64MB",
        ])
        .unwrap();
        assert_eq!(w.args.namespaces, ["a", "b", "c"]);
        assert_eq!(
            w.args.session_settings,
            [("work_mem".to_owned(), "64MB".to_owned())]
        );
        assert!(Wrap::try_parse_from(["x", "--concurrency", "0"]).is_err());

        let config = |flag: &str| Wrap::try_parse_from(["x", flag]).unwrap().args.config();
        let every = |flag| config(flag).unwrap().settings.runner.progress_interval;
        assert_eq!(every("--progress-interval=30s"), Duration::from_secs(30));
        assert_eq!(every("--progress-interval=0s"), Duration::ZERO);
        let e = config("--progress-interval=1h").unwrap_err();
        assert!(e.contains("--progress-interval"), "{e}");
    }

    #[test]
    fn secret_access_flags() {
        let config = |args: &[&str]| {
            let argv = std::iter::once("x").chain(args.iter().copied());
            Wrap::try_parse_from(argv).unwrap().args.config()
        };
        let s = config(&[]).unwrap().settings;
        assert!(!s.watch_secrets, "get only by default");
        assert_eq!(s.secret_recheck_interval, Duration::from_secs(60));
        let s = config(&["--watch-secrets", "--secret-recheck-interval=5m"])
            .unwrap()
            .settings;
        assert!(s.watch_secrets);
        assert_eq!(s.secret_recheck_interval, Duration::from_secs(300));
        assert!(
            !config(&["--watch-secrets=false"])
                .unwrap()
                .settings
                .watch_secrets
        );
        for out_of_bounds in ["500ms", "2h"] {
            let e = config(&["--secret-recheck-interval", out_of_bounds]).unwrap_err();
            assert!(e.contains("--secret-recheck-interval"), "{e}");
        }
    }

    #[test]
    fn leader_election_flags() {
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert!(w.args.leader_election, "on by default");
        assert_eq!(
            w.args.lease_settings().unwrap().name,
            LEASE_NAME,
            "the name of earlier versions, so an upgrade keeps one Lease"
        );
        assert_eq!(w.args.lease_duration, Duration::from_secs(15));
        assert_eq!(w.args.lease_grace, Duration::from_secs(13));
        assert!(
            Wrap::try_parse_from(["x", "--leader-election"])
                .unwrap()
                .args
                .leader_election
        );
        let w = Wrap::try_parse_from([
            "x",
            "--leader-election=false",
            "--lease-name",
            "shop-usage-backfill-operator",
            "--lease-namespace",
            "ops",
            "--lease-identity",
            "pod-1",
            "--lease-duration",
            "4s",
            "--lease-grace",
            "3s",
            "--http-addr",
            "127.0.0.1:9090",
        ])
        .unwrap();
        assert!(!w.args.leader_election);
        assert_eq!(w.args.health_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(
            w.args.lease_settings().unwrap(),
            LeaseSettings {
                name: "shop-usage-backfill-operator".into(),
                namespace: "ops".into(),
                identity: "pod-1".into(),
                duration: Duration::from_secs(4),
                grace: Duration::from_secs(3),
            }
        );
        let w = Wrap::try_parse_from(["x", "--lease-grace", "1500ms"]).unwrap();
        assert!(
            w.args
                .lease_settings()
                .unwrap_err()
                .contains("whole seconds")
        );
        let w = Wrap::try_parse_from(["x", "--lease-name", "Not_A_Name"]).unwrap();
        assert!(
            w.args
                .lease_settings()
                .unwrap_err()
                .contains("--lease-name")
        );
        let w = Wrap::try_parse_from(["x", "--lease-identity", ""]).unwrap();
        assert!(
            !w.args.lease_settings().unwrap().identity.is_empty(),
            "an empty identity falls back to the host name"
        );
    }
}
