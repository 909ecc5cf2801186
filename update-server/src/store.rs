//! Persistent state: SQLite (WAL) by default, PostgreSQL through the same code and schema.
//!
//! Every write that a client is told about happens in a committed transaction before the answer
//! is sent. The counts that rollout decisions depend on are read from the database inside the
//! transaction that records the grant; on PostgreSQL that transaction first locks the rollout row,
//! so several server processes sharing one database serialize their grants.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};

use crate::policy::{RolloutCounts, RolloutPolicy};

/// Channels that exist from the start, in promotion order.
pub const DEFAULT_CHANNELS: [&str; 3] = ["alpha", "beta", "stable"];

/// Checks a new channel's name; the message names it and says what is allowed. Hosts send the
/// channel as Omaha `track`, which the server reads up to 64 characters.
pub fn validate_channel_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "channel name {name:?} is invalid: use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
        ))
    }
}

/// Statuses that count as "granted but not finished".
pub const IN_FLIGHT_STATUSES: &str = "('granted','downloading','downloaded','installed')";

/// `INSERT ... ON CONFLICT DO UPDATE` of `rows` instance records, with placeholders from
/// `placeholder(1..)`.
pub(crate) fn upsert_instances_sql(rows: usize, placeholder: impl Fn(usize) -> String) -> String {
    const COLS: usize = 19;
    let values = (0..rows)
        .map(|r| {
            let p = (1..=COLS)
                .map(|c| placeholder(r * COLS + c))
                .collect::<Vec<_>>()
                .join(",");
            format!("({p})")
        })
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "INSERT INTO instances ({INSTANCE_COLUMNS}) VALUES {values}
         ON CONFLICT (machine_id) DO UPDATE SET app_id = excluded.app_id, channel = excluded.channel, grp = excluded.grp,
         rollout_grp = excluded.rollout_grp, version = excluded.version, board = excluded.board, boot_id = excluded.boot_id,
         status = excluded.status, error_code = excluded.error_code, target_version = excluded.target_version,
         granted_at = excluded.granted_at, outcome = excluded.outcome, outcome_version = excluded.outcome_version, outcome_at = excluded.outcome_at,
         failed_version = excluded.failed_version, last_seen = excluded.last_seen, checkins = excluded.checkins"
    )
}

/// Statements shared by the sqlx code and the check-in writer's own SQLite connection
/// (`$N` parameters appear in ascending order, so both bind them by position).
pub(crate) mod sql {
    pub const SELECT_RELEASE: &str = "SELECT * FROM releases WHERE version = $1";
    pub const SELECT_CHANNELS: &str = "SELECT * FROM channels ORDER BY position, name";
    pub const SELECT_ROLLOUTS: &str = "SELECT * FROM rollouts ORDER BY channel, grp";
    pub const SET_PAUSED: &str = "UPDATE rollouts SET paused = $1, pause_reason = $2, auto_halted = $3 WHERE channel = $4 AND grp = $5";
    pub const COUNT_GRANTS: &str =
        "SELECT COUNT(*) AS n FROM grants WHERE channel = $1 AND grp = $2 AND at > $3";
    pub const COUNT_OUTCOMES: &str = "SELECT outcome, COUNT(*) AS n FROM instances WHERE channel = $1 AND rollout_grp = $2 AND outcome_version = $3 AND outcome IS NOT NULL AND outcome_at >= $4 GROUP BY outcome";
    pub const INSERT_GRANT: &str =
        "INSERT INTO grants (machine_id, channel, grp, version, at) VALUES ($1, $2, $3, $4, $5)";
    pub const INSERT_HISTORY: &str = "INSERT INTO status_history (at, machine_id, channel, grp, version, target_version, status, event_type, event_result, error_code) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    pub const SELECT_LIFTS: &str = "SELECT machine_id, version, lifted_at_ms, expires_at FROM quarantine_lifts WHERE expires_at > $1 ORDER BY machine_id, version";
    pub const END_LIFT: &str =
        "DELETE FROM quarantine_lifts WHERE machine_id = $1 AND version = $2";
    pub const INSERT_ACTIVITY: &str = "INSERT INTO activity (at, kind, channel, grp, version, message) VALUES ($1, $2, $3, $4, $5, $6)";
    pub const SELECT_ROLLOUTS_LOCKED: &str =
        "SELECT * FROM rollouts ORDER BY channel, grp FOR UPDATE";
    // IN_FLIGHT_STATUSES, spelled out: a const cannot be formatted into a const.
    pub const COUNT_IN_FLIGHT: &str = "SELECT COUNT(*) AS n FROM instances WHERE channel = $1 AND rollout_grp = $2 AND target_version = $3 AND status IN ('granted','downloading','downloaded','installed') AND granted_at > $4";
    /// Check-ins of a host that changed nothing else ([`crate::seen::Touch`]): `last_seen`
    /// never moves back, `checkins` grows.
    pub const TOUCH_INSTANCE: &str = "UPDATE instances SET last_seen = CASE WHEN last_seen < $1 THEN $1 ELSE last_seen END, checkins = checkins + $2 WHERE machine_id = $3";
    pub const SELECT_INSTANCE: &str = "SELECT machine_id, app_id, channel, grp, rollout_grp, version, board, boot_id, status, error_code, target_version, granted_at, outcome, outcome_version, outcome_at, failed_version, first_seen, last_seen, checkins FROM instances WHERE machine_id = $1";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
    /// Bumped by every change to channels or rollouts made through this process, inside the
    /// changing transaction; the check-in writer keeps its copy of them while it is unchanged
    /// (SQLite only: one process owns a SQLite database; on PostgreSQL it always reads them).
    config_generation: Arc<AtomicU64>,
    /// The database file, on SQLite (the check-in writer opens its own connection to it).
    pub sqlite_path: Option<std::path::PathBuf>,
}

pub type Tx = Transaction<'static, Any>;

/// Schema migrations, applied in order; `{ID}` becomes the backend's auto-increment key.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE releases (
    version TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    sha1_base64 TEXT NOT NULL,
    size BIGINT NOT NULL,
    salt TEXT NOT NULL,
    board TEXT,
    min_source_version TEXT,
    created_unix BIGINT NOT NULL,
    uploaded_at BIGINT NOT NULL
);
CREATE TABLE channels (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL,
    release_version TEXT,
    promoted_at BIGINT
);
CREATE TABLE promotions (
    id {ID},
    version TEXT NOT NULL,
    channel TEXT NOT NULL,
    forced BIGINT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX promotions_version ON promotions (version, channel);
CREATE TABLE rollouts (
    channel TEXT NOT NULL,
    grp TEXT NOT NULL,
    policy TEXT NOT NULL,
    paused BIGINT NOT NULL,
    pause_reason TEXT,
    auto_halted BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    counts_since BIGINT NOT NULL,
    PRIMARY KEY (channel, grp)
);
CREATE TABLE instances (
    machine_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    grp TEXT NOT NULL,
    rollout_grp TEXT NOT NULL,
    version TEXT,
    board TEXT,
    boot_id TEXT,
    status TEXT NOT NULL,
    error_code BIGINT,
    target_version TEXT,
    granted_at BIGINT,
    outcome TEXT,
    outcome_version TEXT,
    outcome_at BIGINT,
    failed_version TEXT,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    checkins BIGINT NOT NULL
);
CREATE INDEX instances_rollout ON instances (channel, rollout_grp, target_version, status);
CREATE INDEX instances_outcome ON instances (channel, rollout_grp, outcome_version, outcome);
CREATE TABLE grants (
    id {ID},
    machine_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    grp TEXT NOT NULL,
    version TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX grants_at ON grants (channel, grp, at);
CREATE TABLE status_history (
    id {ID},
    at BIGINT NOT NULL,
    machine_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    grp TEXT NOT NULL,
    version TEXT,
    target_version TEXT,
    status TEXT NOT NULL,
    event_type BIGINT,
    event_result BIGINT,
    error_code BIGINT
);
CREATE INDEX status_history_at ON status_history (at);
CREATE INDEX status_history_machine ON status_history (machine_id, at);
CREATE TABLE activity (
    id {ID},
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    channel TEXT,
    grp TEXT,
    version TEXT,
    message TEXT NOT NULL
);
CREATE TABLE tokens (
    id {ID},
    hash TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
"#,
    crate::series::MIGRATION,
    r#"
CREATE TABLE quarantine_lifts (
    machine_id TEXT NOT NULL,
    version TEXT NOT NULL,
    lifted_at_ms BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (machine_id, version)
);
ALTER TABLE tokens ADD COLUMN revoked_at BIGINT
"#,
];

/// How long a quarantine lift is sent to its host at most (seconds of server time), unless the
/// host reports the version (or fails it again) first.
pub const LIFT_QUARANTINE_SECS: i64 = 7 * 86_400;

#[derive(Debug, Clone, Serialize)]
pub struct ReleaseRow {
    pub version: String,
    pub sha256: String,
    pub sha1_base64: String,
    pub size: i64,
    pub salt: String,
    pub board: Option<String>,
    pub min_source_version: Option<String>,
    pub created_unix: i64,
    pub uploaded_at: i64,
    /// Channels currently serving it.
    pub channels: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelRow {
    pub name: String,
    pub position: i64,
    pub release_version: Option<String>,
    pub promoted_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutRow {
    pub channel: String,
    pub group: String,
    pub policy: RolloutPolicy,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub auto_halted: bool,
    pub started_at: i64,
    /// Outcomes reported before this time (Unix milliseconds) do not count toward the automatic
    /// halt (set when a release is promoted and when an operator resumes).
    pub counts_since: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceRow {
    pub machine_id: String,
    pub app_id: String,
    pub channel: String,
    pub group: String,
    pub rollout_group: String,
    pub version: Option<String>,
    pub board: Option<String>,
    pub boot_id: Option<String>,
    pub status: String,
    pub error_code: Option<i64>,
    pub target_version: Option<String>,
    pub granted_at: Option<i64>,
    pub outcome: Option<String>,
    pub outcome_version: Option<String>,
    pub outcome_at: Option<i64>,
    pub failed_version: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub checkins: i64,
}

impl InstanceRow {
    /// A host first seen at `at` on `channel`: idle, no version, no outcome, no check-in yet.
    pub fn new(machine_id: &str, app_id: &str, channel: &str, at: i64) -> InstanceRow {
        InstanceRow {
            machine_id: machine_id.to_string(),
            app_id: app_id.to_string(),
            channel: channel.to_string(),
            group: String::new(),
            rollout_group: String::new(),
            version: None,
            board: None,
            boot_id: None,
            status: "idle".to_string(),
            error_code: None,
            target_version: None,
            granted_at: None,
            outcome: None,
            outcome_version: None,
            outcome_at: None,
            failed_version: None,
            first_seen: at,
            last_seen: at,
            checkins: 0,
        }
    }
}

/// An operator's lift of a host's quarantine of one release.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiftRow {
    pub machine_id: String,
    pub version: String,
    /// Server time of the lift, Unix milliseconds (a failure reported after it quarantines the
    /// host again).
    pub lifted_at_ms: i64,
    /// Server time after which the lift is no longer sent, Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivityRow {
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub channel: Option<String>,
    pub group: Option<String>,
    pub version: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    pub at: i64,
    pub machine_id: String,
    pub channel: String,
    pub group: String,
    pub version: Option<String>,
    pub target_version: Option<String>,
    pub status: String,
    pub event_type: Option<i64>,
    pub event_result: Option<i64>,
    pub error_code: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Viewer,
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            _ => bail!("role {s:?} is unknown (expected admin or viewer)"),
        }
    }
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// A token as listed (its hash is never shown).
#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// What a presented token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRole {
    Active(Role),
    Revoked,
}

fn token_from_row(r: &sqlx::any::AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: r.try_get("role")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn instance_from_row(r: &sqlx::any::AnyRow) -> Result<InstanceRow, sqlx::Error> {
    Ok(InstanceRow {
        machine_id: r.try_get("machine_id")?,
        app_id: r.try_get("app_id")?,
        channel: r.try_get("channel")?,
        group: r.try_get("grp")?,
        rollout_group: r.try_get("rollout_grp")?,
        version: r.try_get("version")?,
        board: r.try_get("board")?,
        boot_id: r.try_get("boot_id")?,
        status: r.try_get("status")?,
        error_code: r.try_get("error_code")?,
        target_version: r.try_get("target_version")?,
        granted_at: r.try_get("granted_at")?,
        outcome: r.try_get("outcome")?,
        outcome_version: r.try_get("outcome_version")?,
        outcome_at: r.try_get("outcome_at")?,
        failed_version: r.try_get("failed_version")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        checkins: r.try_get("checkins")?,
    })
}

fn rollout_from_row(r: &sqlx::any::AnyRow) -> Result<RolloutRow> {
    let policy: String = r.try_get("policy")?;
    Ok(RolloutRow {
        channel: r.try_get("channel")?,
        group: r.try_get("grp")?,
        policy: serde_json::from_str(&policy).context("stored rollout policy is not valid JSON")?,
        paused: r.try_get::<i64, _>("paused")? != 0,
        pause_reason: r.try_get("pause_reason")?,
        auto_halted: r.try_get::<i64, _>("auto_halted")? != 0,
        started_at: r.try_get("started_at")?,
        counts_since: r.try_get("counts_since")?,
    })
}

fn release_from_row(r: &sqlx::any::AnyRow) -> Result<ReleaseRow, sqlx::Error> {
    Ok(ReleaseRow {
        version: r.try_get("version")?,
        sha256: r.try_get("sha256")?,
        sha1_base64: r.try_get("sha1_base64")?,
        size: r.try_get("size")?,
        salt: r.try_get("salt")?,
        board: r.try_get("board")?,
        min_source_version: r.try_get("min_source_version")?,
        created_unix: r.try_get("created_unix")?,
        uploaded_at: r.try_get("uploaded_at")?,
        channels: Vec::new(),
    })
}

fn channel_from_row(r: &sqlx::any::AnyRow) -> Result<ChannelRow, sqlx::Error> {
    Ok(ChannelRow {
        name: r.try_get("name")?,
        position: r.try_get("position")?,
        release_version: r.try_get("release_version")?,
        promoted_at: r.try_get("promoted_at")?,
    })
}

/// All channels in promotion order, through the pool or inside a transaction.
async fn channels_on<'c, E: sqlx::Executor<'c, Database = Any>>(e: E) -> Result<Vec<ChannelRow>> {
    let rows = sqlx::query(sql::SELECT_CHANNELS).fetch_all(e).await?;
    Ok(rows
        .iter()
        .map(channel_from_row)
        .collect::<Result<_, _>>()?)
}

/// The release a one-parameter query finds, through the pool or inside a transaction.
async fn release_where<'c, E: sqlx::Executor<'c, Database = Any>>(
    e: E,
    query: &'static str,
    arg: &str,
) -> Result<Option<ReleaseRow>> {
    let row = sqlx::query(query).bind(arg).fetch_optional(e).await?;
    Ok(row.as_ref().map(release_from_row).transpose()?)
}

/// Every status a host record can have (see docs/SERVER.md).
pub const STATUSES: [&str; 9] = [
    "idle",
    "granted",
    "downloading",
    "downloaded",
    "installed",
    "complete",
    "error",
    "rolled_back",
    "deferred",
];

/// Most hosts one `instances` call returns (and its default page size).
pub const INSTANCE_PAGE_MAX: u32 = 100_000;

/// Which hosts `Store::instances` lists: each filter that is set must match; the page starts
/// after the machine id `after` (the last one of the previous page) and holds at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct InstanceFilter<'a> {
    pub channel: Option<&'a str>,
    pub version: Option<&'a str>,
    pub group: Option<&'a str>,
    pub status: Option<&'a str>,
    pub after: Option<&'a str>,
    pub limit: u32,
}

const INSTANCE_COLUMNS: &str = "machine_id, app_id, channel, grp, rollout_grp, version, board, boot_id, status, error_code, target_version, granted_at, outcome, outcome_version, outcome_at, failed_version, first_seen, last_seen, checkins";

impl Store {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            bail!("database URL {url:?} is neither sqlite: nor postgres:");
        };
        let options = AnyConnectOptions::from_str(url)
            .with_context(|| format!("database URL {url:?} is invalid"))?;
        let pool = match backend {
            Backend::Sqlite => {
                // One connection: SQLite has one writer anyway, and this way no transaction ever
                // meets SQLITE_BUSY from another connection of ours.
                AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::raw_sql(
                                "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON;",
                            )
                            .execute(conn)
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(options)
                    .await
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(options)
                    .await
            }
        }
        .with_context(|| format!("cannot open database {}", redact(url)))?;
        let store = Store {
            pool,
            backend,
            config_generation: Arc::new(AtomicU64::new(0)),
            sqlite_path: (backend == Backend::Sqlite)
                .then(|| sqlite_file(url))
                .transpose()?,
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            // Several servers may start at once against one database.
            sqlx::query("SELECT pg_advisory_xact_lock(7301)")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await?;
        let current: Option<i64> = sqlx::query("SELECT MAX(version) AS v FROM schema_version")
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
        let current = current.unwrap_or(0);
        if current > MIGRATIONS.len() as i64 {
            bail!(
                "database schema version {current} is newer than this server knows ({}); upgrade the server",
                MIGRATIONS.len()
            );
        }
        let id = match self.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        for (i, m) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            for stmt in m.replace("{ID}", id).split(';').map(str::to_string) {
                if stmt.trim().is_empty() {
                    continue;
                }
                sqlx::query(AssertSqlSafe(stmt))
                    .execute(&mut *tx)
                    .await
                    .with_context(|| format!("schema migration {} failed", i + 1))?;
            }
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await?;
        }
        let now = chrono::Utc::now().timestamp();
        let default_policy = serde_json::to_string(&RolloutPolicy::default())?;
        for (pos, name) in DEFAULT_CHANNELS.iter().enumerate() {
            sqlx::query(
                "INSERT INTO channels (name, position) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(*name)
            .bind(pos as i64)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO rollouts (channel, grp, policy, paused, auto_halted, started_at, counts_since) VALUES ($1, '', $2, 0, 0, $3, $3 * 1000) ON CONFLICT (channel, grp) DO NOTHING",
            )
            .bind(*name)
            .bind(&default_policy)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks channels/rollouts as changed (call inside the changing transaction, before commit).
    pub fn config_changed(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The counter behind [`Store::config_generation`], for the check-in writer's thread.
    pub fn generation_counter(&self) -> Arc<AtomicU64> {
        self.config_generation.clone()
    }

    /// Begins a transaction. On SQLite it takes the write lock right away (`BEGIN IMMEDIATE`):
    /// the check-in writer has its own connection, and a transaction that read first and then
    /// wrote could otherwise fail when the writer committed in between.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    // ---- tokens -------------------------------------------------------------------------------

    pub async fn insert_token(&self, hash: &str, role: Role, name: &str, now: i64) -> Result<()> {
        sqlx::query("INSERT INTO tokens (hash, role, name, created_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(role.as_str())
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The role of a token by its hash; None for an unknown or revoked token.
    pub async fn token_role(&self, hash: &str) -> Result<Option<Role>> {
        Ok(match self.token_status(hash).await? {
            Some(TokenRole::Active(r)) => Some(r),
            _ => None,
        })
    }

    /// The role of a token by its hash; `Revoked` for a revoked one.
    pub async fn token_status(&self, hash: &str) -> Result<Option<TokenRole>> {
        let row = sqlx::query("SELECT role, revoked_at FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = row else { return Ok(None) };
        if r.try_get::<Option<i64>, _>("revoked_at")?.is_some() {
            return Ok(Some(TokenRole::Revoked));
        }
        Ok(Some(TokenRole::Active(
            r.try_get::<String, _>("role")?.parse()?,
        )))
    }

    /// All tokens (without their hashes), oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>> {
        let rows =
            sqlx::query("SELECT id, name, role, created_at, revoked_at FROM tokens ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Revokes a token (keeping the first revocation time): the token and whether this call
    /// revoked it; None if there is no such token.
    pub async fn revoke_token(&self, id: i64, now: i64) -> Result<Option<(TokenRow, bool)>> {
        let changed =
            sqlx::query("UPDATE tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0;
        let row =
            sqlx::query("SELECT id, name, role, created_at, revoked_at FROM tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row
            .as_ref()
            .map(token_from_row)
            .transpose()?
            .map(|t| (t, changed)))
    }

    // ---- releases and channels ----------------------------------------------------------------

    pub async fn insert_release(&self, r: &ReleaseRow) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO releases (version, sha256, sha1_base64, size, salt, board, min_source_version, created_unix, uploaded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (version) DO NOTHING",
        )
        .bind(&r.version)
        .bind(&r.sha256)
        .bind(&r.sha1_base64)
        .bind(r.size)
        .bind(&r.salt)
        .bind(r.board.clone())
        .bind(r.min_source_version.clone())
        .bind(r.created_unix)
        .bind(r.uploaded_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn release(&self, version: &str) -> Result<Option<ReleaseRow>> {
        release_where(&self.pool, sql::SELECT_RELEASE, version).await
    }

    pub async fn release_in(tx: &mut Tx, version: &str) -> Result<Option<ReleaseRow>> {
        release_where(&mut **tx, sql::SELECT_RELEASE, version).await
    }

    pub async fn release_by_sha256(&self, sha256: &str) -> Result<Option<ReleaseRow>> {
        release_where(
            &self.pool,
            "SELECT * FROM releases WHERE sha256 = $1",
            sha256,
        )
        .await
    }

    pub async fn releases(&self) -> Result<Vec<ReleaseRow>> {
        let rows = sqlx::query("SELECT * FROM releases ORDER BY uploaded_at, version")
            .fetch_all(&self.pool)
            .await?;
        let channels = self.channels().await?;
        let mut out = Vec::new();
        for r in rows {
            let mut rel = release_from_row(&r)?;
            rel.channels = channels
                .iter()
                .filter(|c| c.release_version.as_deref() == Some(rel.version.as_str()))
                .map(|c| c.name.clone())
                .collect();
            out.push(rel);
        }
        Ok(out)
    }

    pub async fn channels(&self) -> Result<Vec<ChannelRow>> {
        channels_on(&self.pool).await
    }

    pub async fn channel_in(tx: &mut Tx, name: &str) -> Result<Option<ChannelRow>> {
        let row = sqlx::query("SELECT * FROM channels WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(row.as_ref().map(channel_from_row).transpose()?)
    }

    /// Creates a channel right after `after` in the promotion order, with the default rollout
    /// policy. The caller validated the name and checked that it is new.
    pub async fn create_channel(
        tx: &mut Tx,
        name: &str,
        after: &ChannelRow,
        now: i64,
    ) -> Result<i64> {
        let position = after.position + 1;
        sqlx::query("UPDATE channels SET position = position + 1 WHERE position >= $1")
            .bind(position)
            .execute(&mut **tx)
            .await?;
        sqlx::query("INSERT INTO channels (name, position) VALUES ($1, $2)")
            .bind(name)
            .bind(position)
            .execute(&mut **tx)
            .await?;
        Self::upsert_rollout_policy(tx, name, "", &RolloutPolicy::default(), now).await?;
        Ok(position)
    }

    pub async fn was_promoted_to(tx: &mut Tx, version: &str, channel: &str) -> Result<bool> {
        let n: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM promotions WHERE version = $1 AND channel = $2")
                .bind(version)
                .bind(channel)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?;
        Ok(n > 0)
    }

    // ---- rollouts -----------------------------------------------------------------------------

    pub async fn rollouts(&self, channel: Option<&str>) -> Result<Vec<RolloutRow>> {
        let rows = sqlx::query(
            "SELECT * FROM rollouts WHERE ($1 = '' OR channel = $1) ORDER BY channel, grp",
        )
        .bind(channel.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rollout_from_row).collect()
    }

    pub async fn upsert_rollout_policy(
        tx: &mut Tx,
        channel: &str,
        group: &str,
        policy: &RolloutPolicy,
        started_at: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO rollouts (channel, grp, policy, paused, auto_halted, started_at, counts_since) VALUES ($1, $2, $3, 0, 0, $4, $4 * 1000) ON CONFLICT (channel, grp) DO UPDATE SET policy = excluded.policy",
        )
        .bind(channel)
        .bind(group)
        .bind(serde_json::to_string(policy)?)
        .bind(started_at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Restarts the automatic-halt count (on resume).
    pub async fn reset_counts_since(
        tx: &mut Tx,
        channel: &str,
        group: &str,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE rollouts SET counts_since = $1 WHERE channel = $2 AND grp = $3")
            .bind(now_ms)
            .bind(channel)
            .bind(group)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    pub async fn set_paused(
        tx: &mut Tx,
        channel: &str,
        group: &str,
        reason: Option<&str>,
        auto: bool,
    ) -> Result<bool> {
        let done = sqlx::query(sql::SET_PAUSED)
            .bind(i64::from(reason.is_some()))
            .bind(reason.map(str::to_string))
            .bind(i64::from(auto))
            .bind(channel)
            .bind(group)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Counts for a rollout's decision, read inside the deciding transaction.
    pub async fn counts(
        tx: &mut Tx,
        channel: &str,
        group: &str,
        version: &str,
        policy: &RolloutPolicy,
        counts_since: i64,
        now: i64,
    ) -> Result<RolloutCounts> {
        let period = policy.rate_limit.as_ref().map_or(0, |r| r.period_secs);
        let grants: i64 = if policy.rate_limit.is_some() {
            sqlx::query(sql::COUNT_GRANTS)
                .bind(channel)
                .bind(group)
                .bind(now - period)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?
        } else {
            0
        };
        let in_flight: i64 = if policy.max_in_flight.is_some() {
            sqlx::query(sql::COUNT_IN_FLIGHT)
                .bind(channel)
                .bind(group)
                .bind(version)
                .bind(now - policy.in_flight_timeout_secs)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?
        } else {
            0
        };
        let (successes, failures) = if policy.halt.is_some() {
            let rows = sqlx::query(sql::COUNT_OUTCOMES)
                .bind(channel)
                .bind(group)
                .bind(version)
                .bind(counts_since)
                .fetch_all(&mut **tx)
                .await?;
            let mut s = 0i64;
            let mut f = 0i64;
            for r in rows {
                let outcome: String = r.try_get("outcome")?;
                let n: i64 = r.try_get("n")?;
                if outcome == "success" {
                    s = n;
                } else if outcome == "failure" {
                    f = n;
                }
            }
            (s, f)
        } else {
            (0, 0)
        };
        Ok(RolloutCounts {
            grants_in_period: grants as u64,
            in_flight: in_flight as u64,
            successes: successes as u64,
            failures: failures as u64,
        })
    }

    pub async fn insert_grant(
        tx: &mut Tx,
        machine_id: &str,
        channel: &str,
        group: &str,
        version: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(sql::INSERT_GRANT)
            .bind(machine_id)
            .bind(channel)
            .bind(group)
            .bind(version)
            .bind(now)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    // ---- instances ----------------------------------------------------------------------------

    pub async fn instance_in(tx: &mut Tx, machine_id: &str) -> Result<Option<InstanceRow>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE machine_id = $1"
        )))
        .bind(machine_id)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.map(|r| instance_from_row(&r)).transpose()?)
    }

    /// Bind placeholder number `i` (1-based) for a generated statement: `$i` on PostgreSQL, `?`
    /// on SQLite, where numbered parameters make binding quadratic in their count.
    fn placeholder(&self, i: usize) -> String {
        match self.backend {
            Backend::Sqlite => "?".to_string(),
            Backend::Postgres => format!("${i}"),
        }
    }

    /// All channels, read inside a transaction.
    pub async fn channels_in(tx: &mut Tx) -> Result<Vec<ChannelRow>> {
        channels_on(&mut **tx).await
    }

    /// All rollout rows; on PostgreSQL locked (`FOR UPDATE`, in key order) until the transaction
    /// ends, so grant decisions of several server processes serialize.
    pub async fn rollouts_locked(&self, tx: &mut Tx) -> Result<Vec<RolloutRow>> {
        let sql = match self.backend {
            Backend::Sqlite => sql::SELECT_ROLLOUTS,
            Backend::Postgres => sql::SELECT_ROLLOUTS_LOCKED,
        };
        let rows = sqlx::query(sql).fetch_all(&mut **tx).await?;
        rows.iter().map(rollout_from_row).collect()
    }

    /// The stored records of these machines.
    pub async fn instances_by_ids(&self, tx: &mut Tx, ids: &[String]) -> Result<Vec<InstanceRow>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let placeholders = (1..=chunk.len())
                .map(|i| self.placeholder(i))
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances WHERE machine_id IN ({placeholders})"
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.clone());
            }
            for r in q.fetch_all(&mut **tx).await? {
                out.push(instance_from_row(&r)?);
            }
        }
        Ok(out)
    }

    /// Inserts or updates many instance records in few statements.
    pub async fn upsert_instances(&self, tx: &mut Tx, rows: &[&InstanceRow]) -> Result<()> {
        for chunk in rows.chunks(200) {
            let sql = upsert_instances_sql(chunk.len(), |i| self.placeholder(i));
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for i in chunk {
                q = q
                    .bind(i.machine_id.clone())
                    .bind(i.app_id.clone())
                    .bind(i.channel.clone())
                    .bind(i.group.clone())
                    .bind(i.rollout_group.clone())
                    .bind(i.version.clone())
                    .bind(i.board.clone())
                    .bind(i.boot_id.clone())
                    .bind(i.status.clone())
                    .bind(i.error_code)
                    .bind(i.target_version.clone())
                    .bind(i.granted_at)
                    .bind(i.outcome.clone())
                    .bind(i.outcome_version.clone())
                    .bind(i.outcome_at)
                    .bind(i.failed_version.clone())
                    .bind(i.first_seen)
                    .bind(i.last_seen)
                    .bind(i.checkins);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Writes check-ins of hosts that changed nothing else, in few statements.
    pub(crate) async fn touch_instances(
        &self,
        tx: &mut Tx,
        rows: &[crate::seen::Touch],
    ) -> Result<()> {
        for chunk in rows.chunks(300) {
            let values = (0..chunk.len())
                .map(|r| {
                    format!(
                        "(CAST({} AS TEXT), CAST({} AS BIGINT), CAST({} AS BIGINT))",
                        self.placeholder(r * 3 + 1),
                        self.placeholder(r * 3 + 2),
                        self.placeholder(r * 3 + 3)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "UPDATE instances SET \
                 last_seen = CASE WHEN instances.last_seen < t.seen THEN t.seen ELSE instances.last_seen END, \
                 checkins = instances.checkins + t.added \
                 FROM (VALUES {values}) AS t (id, seen, added) WHERE instances.machine_id = t.id"
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for t in chunk {
                q = q.bind(t.machine_id.clone()).bind(t.last_seen).bind(t.added);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Appends many status history rows in few statements.
    pub async fn insert_history_many(&self, tx: &mut Tx, rows: &[HistoryRow]) -> Result<()> {
        const COLS: usize = 10;
        for chunk in rows.chunks(300) {
            let values = (0..chunk.len())
                .map(|r| {
                    let p = (1..=COLS)
                        .map(|c| self.placeholder(r * COLS + c))
                        .collect::<Vec<_>>()
                        .join(",");
                    format!("({p})")
                })
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "INSERT INTO status_history (at, machine_id, channel, grp, version, target_version, status, event_type, event_result, error_code) VALUES {values}"
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for h in chunk {
                q = q
                    .bind(h.at)
                    .bind(h.machine_id.clone())
                    .bind(h.channel.clone())
                    .bind(h.group.clone())
                    .bind(h.version.clone())
                    .bind(h.target_version.clone())
                    .bind(h.status.clone())
                    .bind(h.event_type)
                    .bind(h.event_result)
                    .bind(h.error_code);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// One page of hosts matching `f`, in machine id order.
    pub async fn instances(&self, f: &InstanceFilter<'_>) -> Result<Vec<InstanceRow>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {INSTANCE_COLUMNS} FROM instances WHERE ($1 = '' OR channel = $1) AND ($2 = '' OR version = $2) AND ($3 = '' OR grp = $3) AND ($4 = '' OR status = $4) AND machine_id > $5 ORDER BY machine_id LIMIT $6"
        )))
        .bind(f.channel.unwrap_or(""))
        .bind(f.version.unwrap_or(""))
        .bind(f.group.unwrap_or(""))
        .bind(f.status.unwrap_or(""))
        .bind(f.after.unwrap_or(""))
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(instance_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// Deletes at most `chunk` rows of status history recorded before `before` (Unix
    /// seconds), the oldest first; the rows deleted.
    pub async fn prune_history(&self, before: i64, chunk: i64) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM status_history WHERE id IN (SELECT id FROM status_history WHERE at < $1 ORDER BY at LIMIT $2)",
        )
        .bind(before)
        .bind(chunk)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn history(&self, machine_id: &str) -> Result<Vec<HistoryRow>> {
        let rows = sqlx::query(
            "SELECT * FROM status_history WHERE machine_id = $1 ORDER BY at, id LIMIT 10000",
        )
        .bind(machine_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryRow {
                    at: r.try_get("at")?,
                    machine_id: r.try_get("machine_id")?,
                    channel: r.try_get("channel")?,
                    group: r.try_get("grp")?,
                    version: r.try_get("version")?,
                    target_version: r.try_get("target_version")?,
                    status: r.try_get("status")?,
                    event_type: r.try_get("event_type")?,
                    event_result: r.try_get("event_result")?,
                    error_code: r.try_get("error_code")?,
                })
            })
            .collect()
    }

    /// Status entries per time bucket: (bucket start, channel, status, count), for charts.
    pub async fn status_timeline(
        &self,
        since: i64,
        bucket_secs: i64,
        channel: Option<&str>,
    ) -> Result<Vec<(i64, String, String, i64)>> {
        let rows = sqlx::query(
            "SELECT (at / $1) * $1 AS bucket, channel, status, COUNT(*) AS n FROM status_history WHERE at >= $2 AND ($3 = '' OR channel = $3) GROUP BY bucket, channel, status ORDER BY bucket, channel, status",
        )
        .bind(bucket_secs.max(1))
        .bind(since)
        .bind(channel.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("bucket")?,
                    r.try_get("channel")?,
                    r.try_get("status")?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }

    // ---- quarantine lifts ---------------------------------------------------------------------

    /// Records (or renews) a lift and clears the host's own quarantine of that release.
    pub async fn lift_quarantine(tx: &mut Tx, lift: &LiftRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO quarantine_lifts (machine_id, version, lifted_at_ms, expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT (machine_id, version) DO UPDATE SET lifted_at_ms = excluded.lifted_at_ms, expires_at = excluded.expires_at",
        )
        .bind(&lift.machine_id)
        .bind(&lift.version)
        .bind(lift.lifted_at_ms)
        .bind(lift.expires_at)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE instances SET failed_version = NULL WHERE machine_id = $1 AND failed_version = $2",
        )
        .bind(&lift.machine_id)
        .bind(&lift.version)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Lifts still being sent at `now` (Unix seconds).
    pub async fn quarantine_lifts_in(tx: &mut Tx, now: i64) -> Result<Vec<LiftRow>> {
        let rows = sqlx::query(sql::SELECT_LIFTS)
            .bind(now)
            .fetch_all(&mut **tx)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(LiftRow {
                    machine_id: r.try_get("machine_id")?,
                    version: r.try_get("version")?,
                    lifted_at_ms: r.try_get("lifted_at_ms")?,
                    expires_at: r.try_get("expires_at")?,
                })
            })
            .collect()
    }

    /// Forgets lifts that are done (the host reported the version, failed it again, or the lift
    /// expired).
    pub async fn end_quarantine_lift(tx: &mut Tx, machine_id: &str, version: &str) -> Result<()> {
        sqlx::query(sql::END_LIFT)
            .bind(machine_id)
            .bind(version)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    // ---- activity -----------------------------------------------------------------------------

    pub async fn activity_in(
        tx: &mut Tx,
        now: i64,
        kind: &str,
        channel: Option<&str>,
        group: Option<&str>,
        version: Option<&str>,
        message: &str,
    ) -> Result<()> {
        sqlx::query(sql::INSERT_ACTIVITY)
            .bind(now)
            .bind(kind)
            .bind(channel.map(str::to_string))
            .bind(group.map(str::to_string))
            .bind(version.map(str::to_string))
            .bind(message)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The latest time (Unix seconds) written in host records, history or activity, if any.
    pub async fn latest_record_time(&self) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT MAX(t) AS t FROM (SELECT MAX(last_seen) AS t FROM instances UNION ALL SELECT MAX(at) AS t FROM status_history UNION ALL SELECT MAX(at) AS t FROM activity) AS times",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("t")?)
    }

    pub async fn activity(&self, limit: i64) -> Result<Vec<ActivityRow>> {
        let rows = sqlx::query("SELECT * FROM activity ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        activity_rows(&rows)
    }

    // ---- metrics ------------------------------------------------------------------------------

    /// Rows of (labels..., count) for a GROUP BY query.
    pub async fn grouped_counts(
        &self,
        sql: &str,
        columns: usize,
    ) -> Result<Vec<(Vec<String>, i64)>> {
        let rows = sqlx::query(AssertSqlSafe(sql.to_string()))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let mut labels = Vec::with_capacity(columns);
                for i in 0..columns {
                    let v: Option<String> = r.try_get(i)?;
                    labels.push(v.unwrap_or_default());
                }
                Ok((labels, r.try_get::<i64, _>(columns)?))
            })
            .collect()
    }

    pub async fn failures_since(&self, since: i64) -> Result<Vec<(Vec<String>, i64)>> {
        let rows = sqlx::query(
            "SELECT channel, grp, COUNT(*) AS n FROM status_history WHERE at >= $1 AND status IN ('error','rolled_back') GROUP BY channel, grp",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    vec![r.try_get("channel")?, r.try_get("grp")?],
                    r.try_get("n")?,
                ))
            })
            .collect()
    }
}

/// The file of a `sqlite:` URL (`sqlite://PATH?mode=rwc`, `sqlite:PATH`).
pub(crate) fn sqlite_file(url: &str) -> Result<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path.contains(":memory:") {
        bail!(
            "database URL {url:?} names no file; the server needs an SQLite file (sqlite://PATH)"
        );
    }
    Ok(std::path::PathBuf::from(path))
}

/// The URL without its password, for error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Activity rows (`SELECT * FROM activity ...`) as [`ActivityRow`]s.
pub fn activity_rows(rows: &[sqlx::any::AnyRow]) -> Result<Vec<ActivityRow>> {
    rows.iter()
        .map(|r| {
            Ok(ActivityRow {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                kind: r.try_get("kind")?,
                channel: r.try_get("channel")?,
                group: r.try_get("grp")?,
                version: r.try_get("version")?,
                message: r.try_get("message")?,
            })
        })
        .collect()
}
