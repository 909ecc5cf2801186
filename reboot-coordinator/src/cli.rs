//! One function per subcommand of the `reboot-coordinator` binary.

use crate::etcd_store::{EtcdConfig, EtcdStore, now_unix_ms};
use crate::metrics::Metrics;
use crate::semaphore::{Semaphore, SemaphoreConfig, SlotStore};
use crate::server::{Coordinator, ServerConfig, SystemClock, TlsFiles};
use crate::window::{RebootWindow, WindowSet};
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinroot_format::fleetlock::{validate_group, validate_id};

/// Where etcd is.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd client URLs, comma separated (http://host:2379,...).
    #[arg(long, value_delimiter = ',', required = true)]
    pub etcd: Vec<String>,
    /// Key prefix of all coordinator data in etcd.
    #[arg(long, default_value = crate::etcd_store::DEFAULT_PREFIX)]
    pub prefix: String,
    /// Deadline of each etcd call, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub etcd_timeout_ms: u64,
}

impl EtcdArgs {
    fn config(&self) -> anyhow::Result<EtcdConfig> {
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("invalid etcd endpoint {e:?}: expected http://HOST:PORT");
            }
        }
        if !self.prefix.ends_with('/') {
            bail!("invalid etcd prefix {:?}: must end with '/'", self.prefix);
        }
        Ok(EtcdConfig {
            endpoints: self.etcd.clone(),
            prefix: self.prefix.clone(),
            timeout: Duration::from_millis(self.etcd_timeout_ms),
        })
    }

    async fn store(&self) -> anyhow::Result<EtcdStore> {
        let config = self.config()?;
        Ok(EtcdStore::connect(config).await?)
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8088")]
    pub listen: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Slot count of a group, written to etcd if the group has none yet (NAME=SLOTS, repeatable).
    #[arg(long = "group", value_name = "NAME=SLOTS")]
    pub groups: Vec<String>,
    /// Slot count of groups without a configured count.
    #[arg(long, default_value_t = 1)]
    pub default_slots: u32,
    /// Lease of a slot: a holder that does not call pre-reboot again or steady-state within this
    /// time loses its slot. Size it for the longest expected reboot.
    #[arg(long, default_value_t = 900)]
    pub lease_seconds: u64,
    /// Reboot window of a group, UTC (GROUP=[DAYS ]HH:MM-HH:MM, repeatable; several per group OR).
    #[arg(long = "window", value_name = "GROUP=WINDOW")]
    pub windows: Vec<String>,
    /// File holding the bearer token FleetLock clients must send.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// Activity log entries older than this are deleted (checked hourly).
    #[arg(long, default_value_t = 168)]
    pub activity_retention_hours: u64,
    /// PEM certificate chain: serve HTTPS instead of HTTP (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

fn parse_group_slots(spec: &str) -> anyhow::Result<(String, u32)> {
    let (name, slots) = spec
        .split_once('=')
        .with_context(|| format!("invalid --group {spec:?}: expected NAME=SLOTS"))?;
    validate_group(name)?;
    let slots: u32 = slots
        .parse()
        .with_context(|| format!("invalid --group {spec:?}: slot count must be a number"))?;
    Ok((name.to_string(), slots))
}

/// `serve`: the FleetLock server until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let groups = args
        .groups
        .iter()
        .map(|g| parse_group_slots(g))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut windows: HashMap<String, WindowSet> = HashMap::new();
    for spec in &args.windows {
        let (group, w) = spec
            .split_once('=')
            .with_context(|| format!("invalid --window {spec:?}: expected GROUP=WINDOW"))?;
        validate_group(group)?;
        let w: RebootWindow = w.parse()?;
        windows.entry(group.to_string()).or_default().0.push(w);
    }
    let bearer_token = match &args.token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                bail!("token file {} is empty", path.display());
            }
            Some(t)
        }
        None => None,
    };
    if args.lease_seconds < 2 {
        bail!(
            "--lease-seconds {} is too short: etcd leases need at least 2 s",
            args.lease_seconds
        );
    }
    let store = args.etcd.store().await?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            for f in [cert, key] {
                std::fs::metadata(f)
                    .with_context(|| format!("reading TLS file {}", f.display()))?;
            }
            Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })
        }
        _ => None,
    };
    let listener = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;

    let cancel = CancellationToken::new();
    // Seed configured groups; retried in the background while etcd is unreachable.
    {
        let store = store.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            for (group, slots) in groups {
                loop {
                    match store.seed_slots(&group, slots).await {
                        Ok(in_force) => {
                            if in_force != slots {
                                tracing::warn!(
                                    group,
                                    slots = in_force,
                                    requested = slots,
                                    "group already configured in etcd; keeping its slot count (use set-slots to change it)"
                                );
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(group, error = %e, "could not seed slot count, retrying");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            }
        });
    }
    let coordinator = Arc::new(Coordinator {
        semaphore: Semaphore::new(
            store.clone(),
            SemaphoreConfig {
                default_slots: args.default_slots,
                lease_seconds: args.lease_seconds,
                ..Default::default()
            },
        ),
        config: ServerConfig {
            windows,
            bearer_token,
            clock: Box::new(SystemClock),
        },
        metrics: Metrics::default(),
    });
    {
        let c = coordinator.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            c.semaphore
                .store()
                .watch_expiries(cancel, |_, _| Metrics::inc(&c.metrics.expiries))
                .await;
        });
    }
    {
        let store = store.clone();
        let cancel = cancel.clone();
        let retention_ms = args.activity_retention_hours.saturating_mul(3_600_000);
        tokio::spawn(async move {
            loop {
                let cutoff = now_unix_ms().saturating_sub(retention_ms);
                match store.trim_activity(cutoff).await {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "trimmed activity log"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "could not trim the activity log"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                }
            }
        });
    }
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            cancel.cancel();
        });
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("listening on {scheme}://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, etcd = %args.etcd.etcd.join(","), "reboot-coordinator serving");
    match tls {
        Some(tls) => crate::server::run_tls(listener, coordinator, &tls, cancel.clone()).await?,
        None => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            crate::server::run(listener, coordinator, cancel.clone()).await?
        }
    }
    cancel.cancel();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Slot count shown for groups without a configured count.
    #[arg(long, default_value_t = 1)]
    pub default_slots: u32,
    /// Number of activity log entries to show.
    #[arg(long, default_value_t = 20)]
    pub activity: usize,
}

/// `status`: groups, slot counts, holders with age and time to expiry, recent activity.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let store = args.etcd.store().await?;
    let groups = store.groups().await?;
    let now = now_unix_ms();
    let mut out = String::new();
    if groups.is_empty() {
        out.push_str("no groups\n");
    }
    for g in &groups {
        let slots = match g.slots {
            Some(s) => s.to_string(),
            None => format!("{} (default)", args.default_slots),
        };
        out.push_str(&format!(
            "group {}: {} of {} slots held\n",
            g.group,
            g.holders.len(),
            slots
        ));
        for h in &g.holders {
            let age = now.saturating_sub(h.acquired_unix_ms) / 1000;
            let ttl = match store.lease_ttl(h.lease).await? {
                Some(t) => format!("expires in {t}s"),
                None => "expired".to_string(),
            };
            out.push_str(&format!("  {}  held {age}s, {ttl}\n", h.id));
        }
    }
    let activity = store.activity(args.activity).await?;
    if !activity.is_empty() {
        out.push_str("recent activity:\n");
        for e in activity {
            out.push_str(&format!(
                "  {} {} group={} id={} {}\n",
                e.at_unix_ms, e.event, e.group, e.id, e.detail
            ));
        }
    }
    print!("{out}");
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub id: String,
}

/// `release`: frees a holder's slot by hand (idempotent).
pub async fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    validate_group(&args.group)?;
    validate_id(&args.id)?;
    let store = args.etcd.store().await?;
    if store
        .release(&args.group, &args.id, "released by operator")
        .await?
    {
        println!("released {} in group {}", args.id, args.group);
    } else {
        println!("{} held no slot in group {}", args.id, args.group);
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct SetSlotsArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[arg(long)]
    pub group: String,
    /// New slot count (lowering it never evicts holders).
    pub slots: u32,
}

/// `set-slots`: changes a group's slot count at run time.
pub async fn set_slots(args: SetSlotsArgs) -> anyhow::Result<()> {
    validate_group(&args.group)?;
    let store = args.etcd.store().await?;
    store.set_slots(&args.group, args.slots).await?;
    println!("group {} now has {} reboot slots", args.group, args.slots);
    Ok(())
}
