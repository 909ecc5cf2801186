//! update-server command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use update_server::cli::{self, Client, PolicyFlags};
use update_server::server::ServerConfig;
use update_server::store::Role;

/// mimalloc: the check-in path allocates many small strings on several threads, where glibc's
/// allocator cost about a sixth of the server's CPU time (perf, bench/server.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "update-server",
    version,
    about = "twinroot Omaha update server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Omaha endpoint, payloads, admin API and metrics.
    Serve(ServeArgs),
    /// Copy the SQLite database consistently while servers run (PostgreSQL: use pg_dump).
    Backup {
        #[command(flatten)]
        db: LocalDb,
        /// The file to write (it must not exist yet).
        #[arg(long)]
        to: PathBuf,
    },
    /// Manage admin API tokens (direct database access).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Create and list channels (the promotion order).
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Upload, list and promote releases.
    Release {
        #[command(subcommand)]
        command: ReleaseCommand,
    },
    /// Show and change rollout policies.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// List hosts (or lift a host's quarantine with `instances lift-quarantine`).
    Instances {
        #[command(subcommand)]
        command: Option<InstancesCommand>,
        #[command(flatten)]
        conn: Conn,
        /// Only hosts on this channel.
        #[arg(long)]
        channel: Option<String>,
        /// Only hosts running this version.
        #[arg(long)]
        version: Option<String>,
        /// Only hosts in this group.
        #[arg(long)]
        group: Option<String>,
        /// Only hosts with this status (idle, granted, downloading, downloaded, installed,
        /// complete, error, rolled_back, deferred).
        #[arg(long)]
        status: Option<String>,
        /// At most this many hosts, in machine id order (a full page says how to get the next).
        #[arg(long, default_value_t = update_server::store::INSTANCE_PAGE_MAX)]
        limit: u32,
        /// Start after this machine id (the last one of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the activity log, newest first.
    Activity {
        #[command(flatten)]
        conn: Conn,
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Watch a channel's rollout live in the terminal (q or Ctrl-C to quit).
    Watch {
        #[command(flatten)]
        conn: Conn,
        channel: String,
        /// Time range of the report counts: hour, day, week or 30d.
        #[arg(long, default_value = "hour")]
        range: String,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
}

#[derive(Subcommand)]
enum ChannelCommand {
    /// Add a channel to the promotion order, right after an existing one.
    Create {
        #[command(flatten)]
        conn: Conn,
        /// 1-64 lowercase letters, digits, `.`, `_` or `-`, starting with a letter or digit.
        name: String,
        /// The channel it follows (releases must pass through that one first).
        #[arg(long)]
        after: String,
    },
    /// List channels in promotion order with their releases.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum InstancesCommand {
    /// Let a host install a release it failed again (clears the server's quarantine and tells
    /// the host's agent in its next check-ins).
    LiftQuarantine {
        #[command(flatten)]
        conn: Conn,
        /// The host, as it sends itself (Omaha `machineid`).
        machine_id: String,
        /// The release it may install again.
        version: String,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Address and port to listen on (Omaha, admin API, dashboard, metrics).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the SQLite database and stored release bundles (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// sqlite://PATH or postgres://USER@HOST/DB (default: SQLite in the data dir).
    #[arg(long, env = "TWINROOT_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Keyring that release bundles must satisfy (uploads are refused without one).
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Omaha app id served.
    #[arg(long, default_value = twinroot_format::omaha::FLATCAR_APP_ID)]
    app_id: String,
    /// Payload base URL (CDN/object store holding SHA256.bundle files) instead of this server.
    #[arg(long)]
    payload_base_url: Option<String>,
    /// This server's public URL, used in payload URLs (default: the request's Host header).
    #[arg(long)]
    public_url: Option<String>,
    /// Run the server's clock this many times faster than real time (demos, simulations): ramps,
    /// windows, timeouts and metrics windows all follow it.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = update_server::clock::parse_scale)]
    time_scale: f64,
    /// Milliseconds a check-in that changes nothing but the host's last-seen time and check-in
    /// count may wait before those two are written (folded with later ones; 0 writes every
    /// check-in before answering it; at most 4000). Every other check-in is committed before
    /// its answer.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=4000))]
    seen_delay_ms: u64,
    /// Most host records kept in memory for answering update checks of held hosts that change
    /// nothing but their last-seen time on the HTTP threads, without the check-in writer (SQLite
    /// with a seen delay only; about 1 KiB per host; 0 sends every check-in to the writer).
    #[arg(long, default_value_t = update_server::fast::DEFAULT_CACHED_HOSTS)]
    cached_hosts: usize,
    /// Base URL of the FleetLock reboot coordinator the fleet uses (shown on the dashboard).
    #[arg(long, value_parser = update_server::server::parse_coordinator_url)]
    coordinator: Option<reqwest::Url>,
    /// Days of host status history kept (server time); older rows are deleted every hour.
    /// Charts and failure windows reaching further back see only what is kept. 0 keeps
    /// everything.
    #[arg(long, default_value_t = update_server::server::DEFAULT_HISTORY_DAYS)]
    history_days: u32,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (only its hash is stored).
    Create {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The server's database URL, when it is not SQLite in the data directory.
        #[arg(long, env = "TWINROOT_DATABASE_URL", hide_env_values = true)]
        database: Option<String>,
        /// admin (every call) or viewer (reads only).
        #[arg(long)]
        role: Role,
        /// A label for `token list`.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (id, name, role, creation and revocation times; never the tokens).
    List {
        #[command(flatten)]
        db: LocalDb,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (from `token list`): it is refused with 401 from then on.
    Revoke {
        #[command(flatten)]
        db: LocalDb,
        /// The token id shown by `token list`.
        id: i64,
    },
}

/// Direct access to a server's database (the token subcommands).
#[derive(Args)]
struct LocalDb {
    /// The server's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The server's database URL, when it is not SQLite in the data directory.
    #[arg(long, env = "TWINROOT_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
}

#[derive(Args, Clone)]
struct Conn {
    /// Server base URL.
    #[arg(long, env = "TWINROOT_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Bearer token (from `token create`; its value is never shown in help).
    #[arg(
        long,
        env = "TWINROOT_TOKEN",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true
    )]
    token: String,
}

impl Conn {
    fn client(&self) -> Result<Client> {
        Client::new(&self.server, &self.token)
    }
}

#[derive(Subcommand)]
enum ReleaseCommand {
    /// Upload a signed bundle.
    Upload {
        #[command(flatten)]
        conn: Conn,
        /// A bundle built and signed by image-tools.
        file: PathBuf,
    },
    /// List releases.
    List {
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Promote a release to a channel (alpha, then beta, then stable).
    Promote {
        #[command(flatten)]
        conn: Conn,
        /// The release version (as uploaded).
        version: String,
        /// The channel to serve it on.
        #[arg(long)]
        channel: String,
        /// Skip the channel order.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct PolicyArgs {
    /// The whole policy as JSON (overrides the other flags).
    #[arg(long)]
    policy_json: Option<String>,
    /// Share of hosts eligible at the start, 0-100 (default 100).
    #[arg(long)]
    start_percent: Option<f64>,
    /// Linear ramp from start_percent to 100 over this many seconds.
    #[arg(long)]
    ramp_secs: Option<i64>,
    /// Steps "SECS:PERCENT,SECS:PERCENT".
    #[arg(long)]
    steps: Option<String>,
    /// Rate limit: at most this many new grants per --period-secs.
    #[arg(long)]
    max_grants: Option<u64>,
    /// Rate limit period in seconds (with --max-grants).
    #[arg(long)]
    period_secs: Option<i64>,
    /// At most this many hosts granted but not finished at once.
    #[arg(long)]
    max_in_flight: Option<u64>,
    /// Seconds after which an unfinished grant stops counting as in flight (default 7200).
    #[arg(long)]
    in_flight_timeout_secs: Option<i64>,
    /// Maintenance window "DAYS@HH:MM+MINUTES@TIMEZONE" (repeatable).
    #[arg(long = "window")]
    windows: Vec<String>,
    /// Automatic halt: pause when more than this share of reported outcomes are failures.
    #[arg(long)]
    halt_failure_percent: Option<f64>,
    /// Automatic halt: judge only once this many hosts reported an outcome.
    #[arg(long)]
    halt_min_reports: Option<u64>,
    /// Serve this release instead of the channel's (may be a downgrade).
    #[arg(long)]
    pin: Option<String>,
}

/// The rollout a subcommand is about: a channel, or a group override inside it.
#[derive(Args)]
struct RolloutTarget {
    #[command(flatten)]
    conn: Conn,
    /// The channel (alpha, beta, stable or one created).
    channel: String,
    /// A group's override inside the channel instead of the channel's own rollout.
    #[arg(long)]
    group: Option<String>,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Set a channel's policy (or a group override with --group).
    Set {
        #[command(flatten)]
        target: RolloutTarget,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Stop granting the channel's release (hosts already granted finish).
    Pause {
        #[command(flatten)]
        target: RolloutTarget,
        /// Recorded in the activity log and shown with the rollout.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Grant again after a pause or an automatic halt.
    Resume {
        #[command(flatten)]
        target: RolloutTarget,
    },
    /// The rollout's release, current percentage, pause state and policy.
    Show {
        #[command(flatten)]
        target: RolloutTarget,
        /// Print the API's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("update-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let mut cfg = ServerConfig::new(a.data_dir);
            cfg.database_url = a.database;
            cfg.keyring = a.keyring;
            cfg.app_id = a.app_id;
            cfg.payload_base_url = a.payload_base_url;
            cfg.public_url = a.public_url;
            cfg.time_scale = a.time_scale;
            cfg.seen_delay = std::time::Duration::from_millis(a.seen_delay_ms);
            cfg.cached_hosts = a.cached_hosts;
            cfg.coordinator = a.coordinator;
            cfg.history_days = a.history_days;
            cli::serve(a.listen, cfg).await
        }
        Command::Backup { db, to } => cli::backup(&db.data_dir, db.database, &to),
        Command::Token {
            command:
                TokenCommand::Create {
                    data_dir,
                    database,
                    role,
                    name,
                },
        } => cli::token_create(&data_dir, database, role, &name).await,
        Command::Token {
            command: TokenCommand::List { db, json },
        } => cli::token_list(&db.data_dir, db.database, json).await,
        Command::Token {
            command: TokenCommand::Revoke { db, id },
        } => cli::token_revoke(&db.data_dir, db.database, id).await,
        Command::Channel { command } => match command {
            ChannelCommand::Create { conn, name, after } => {
                cli::channel_create(&conn.client()?, &name, &after).await
            }
            ChannelCommand::List { conn, json } => cli::channel_list(&conn.client()?, json).await,
        },
        Command::Release { command } => match command {
            ReleaseCommand::Upload { conn, file } => {
                cli::release_upload(&conn.client()?, &file).await
            }
            ReleaseCommand::List { conn, json } => cli::release_list(&conn.client()?, json).await,
            ReleaseCommand::Promote {
                conn,
                version,
                channel,
                force,
            } => cli::release_promote(&conn.client()?, &version, &channel, force).await,
        },
        Command::Rollout { command } => match command {
            RolloutCommand::Set {
                target: t,
                policy: p,
            } => {
                let flags = PolicyFlags {
                    policy_json: p.policy_json,
                    start_percent: p.start_percent,
                    ramp_secs: p.ramp_secs,
                    steps: p.steps,
                    max_grants: p.max_grants,
                    period_secs: p.period_secs,
                    max_in_flight: p.max_in_flight,
                    in_flight_timeout_secs: p.in_flight_timeout_secs,
                    windows: p.windows,
                    halt_failure_percent: p.halt_failure_percent,
                    halt_min_reports: p.halt_min_reports,
                    pin: p.pin,
                };
                cli::rollout_set(&t.conn.client()?, &t.channel, t.group.as_deref(), &flags).await
            }
            RolloutCommand::Pause { target: t, reason } => {
                let group = t.group.as_deref();
                let c = t.conn.client()?;
                cli::rollout_pause(&c, &t.channel, group, reason.as_deref(), true).await
            }
            RolloutCommand::Resume { target: t } => {
                let c = t.conn.client()?;
                cli::rollout_pause(&c, &t.channel, t.group.as_deref(), None, false).await
            }
            RolloutCommand::Show { target: t, json } => {
                cli::rollout_show(&t.conn.client()?, &t.channel, t.group.as_deref(), json).await
            }
        },
        Command::Instances {
            command:
                Some(InstancesCommand::LiftQuarantine {
                    conn,
                    machine_id,
                    version,
                }),
            ..
        } => cli::lift_quarantine(&conn.client()?, &machine_id, &version).await,
        Command::Instances {
            command: None,
            conn,
            channel,
            version,
            group,
            status,
            limit,
            after,
            json,
        } => {
            let filter = update_server::store::InstanceFilter {
                channel: channel.as_deref(),
                version: version.as_deref(),
                group: group.as_deref(),
                status: status.as_deref(),
                after: after.as_deref(),
                limit,
            };
            cli::instances(&conn.client()?, &filter, json).await
        }
        Command::Activity { conn, limit, json } => {
            cli::activity(&conn.client()?, limit, json).await
        }
        Command::Watch {
            conn,
            channel,
            range,
            interval,
        } => {
            conn.client()?;
            update_server::watch::run(update_server::watch::WatchConfig {
                server: conn.server,
                token: conn.token,
                channel,
                range,
                interval: std::time::Duration::from_secs_f64(interval.clamp(0.2, 3600.0)),
            })
            .await
        }
    }
}
