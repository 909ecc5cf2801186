//! Pre-aggregated time series for the rollout dashboard.
//!
//! The check-in path writes `status_history` rows and `instances`; this module folds them,
//! incrementally, into per-bucket counters so a chart over 30 days of a 100,000-host fleet reads a
//! few hundred rows instead of millions. [`catch_up`] runs before every dashboard read (and may run
//! from any number of server processes: on PostgreSQL the cursor row is locked for the duration).
//!
//! Tables (schema migration [`MIGRATION`]):
//! - `dash_series (step, bucket, channel, kind, k, value)`: one counter per bucket of `step`
//!   seconds (60, 3600, 86400). Kinds: `status` (history entries with status `k`), `success` and
//!   `failure` (outcomes for release `k`), `version` (net change of hosts on version `k`).
//! - `dash_totals (channel, kind, k, value)`: all-time sums of the same counters, so the value of a
//!   gauge at the end of bucket `b` is `total - (changes after b)`, read from the same range scan.
//! - `dash_hosts (machine_id, channel, version, at, failed)`: each host as the series last saw it;
//!   `failed` is the release whose failure it last counted for the host, so a host that fails its
//!   check (`error`) and then reports the rollback (`rolled_back`) counts once, as the automatic
//!   halt counts it.
//! - `dash_cursor (name, value)`: how far `status_history` (by id) and `instances` (by last_seen)
//!   have been folded in.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};

use crate::policy::{self, RolloutPolicy};
use crate::store::{Backend, Store, Tx};

/// Schema migration appended to the store's list.
pub const MIGRATION: &str = r#"
CREATE TABLE dash_series (
    step BIGINT NOT NULL,
    channel TEXT NOT NULL,
    bucket BIGINT NOT NULL,
    kind TEXT NOT NULL,
    k TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (step, channel, bucket, kind, k)
);
CREATE TABLE dash_totals (
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    k TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (channel, kind, k)
);
CREATE TABLE dash_hosts (
    machine_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    version TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE TABLE dash_cursor (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO dash_cursor (name, value) VALUES ('history', 0);
INSERT INTO dash_cursor (name, value) VALUES ('instances', 0);
CREATE INDEX dash_instances_seen ON instances (last_seen);
CREATE INDEX activity_at ON activity (at)
"#;

/// Indexes the dashboard added after [`MIGRATION`], created by the first catch-up that finds them
/// missing (`dash_cursor` row `schema` counts those applied), so the store's migration list needs
/// no new entry. The instance list filters by status (e.g. every failed host) and sorts by
/// machine id.
const EXTRA_SCHEMA: [&str; 2] = [
    "CREATE INDEX IF NOT EXISTS dash_instances_status ON instances (status, machine_id)",
    "ALTER TABLE dash_hosts ADD COLUMN failed TEXT",
];

/// Bucket sizes kept, in seconds.
pub const STEPS: [i64; 3] = [60, 3600, 86_400];
/// Minute buckets are kept this long (they serve the "last hour" view only).
pub const MINUTE_RETENTION_SECS: i64 = 3 * 86_400;
/// A check-in is committed within this many seconds of its timestamp; instances seen more
/// recently than that are looked at again by the next catch-up (folding them in twice changes
/// nothing).
const INSTANCE_OVERLAP_SECS: i64 = 5;

/// Statuses that are a failed outcome, and the one that is a successful outcome.
pub const FAILURE_STATUSES: [&str; 2] = ["error", "rolled_back"];
pub const SUCCESS_STATUS: &str = "complete";

/// Process-wide: one catch-up at a time (several stores in one process just queue).
static CATCH_UP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A time range the dashboard offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    Hour,
    Day,
    Week,
    Month,
}

impl Range {
    pub fn parse(s: &str) -> Result<Range, String> {
        match s {
            "hour" | "1h" => Ok(Range::Hour),
            "day" | "24h" | "1d" => Ok(Range::Day),
            "week" | "7d" => Ok(Range::Week),
            "month" | "30d" => Ok(Range::Month),
            _ => Err(format!(
                "range {s:?} is unknown (expected hour, day, week or 30d)"
            )),
        }
    }

    /// (length in seconds, bucket step in seconds).
    pub fn span(self) -> (i64, i64) {
        match self {
            Range::Hour => (3600, 60),
            Range::Day => (86_400, 3600),
            Range::Week => (7 * 86_400, 3600),
            Range::Month => (30 * 86_400, 86_400),
        }
    }
}

/// A host seen at a time: from a history row (with its status and outcome version; folded first
/// at equal times) or from its instance record.
struct Seen {
    at: i64,
    order: u8,
    machine_id: String,
    channel: String,
    version: String,
    status: Option<(String, String)>,
}

/// One counter change.
type Key = (i64, String, i64, &'static str, String);

#[derive(Default)]
struct Fold {
    series: HashMap<Key, i64>,
    totals: HashMap<(String, &'static str, String), i64>,
    hosts: HashMap<String, (String, String, i64)>,
    /// Per host: the release whose failure was last counted for it.
    failed: HashMap<String, String>,
    changed_hosts: Vec<String>,
}

impl Fold {
    fn add(&mut self, at: i64, channel: &str, kind: &'static str, k: &str, v: i64) {
        for step in STEPS {
            *self
                .series
                .entry((
                    step,
                    channel.to_string(),
                    at - at.rem_euclid(step),
                    kind,
                    k.to_string(),
                ))
                .or_default() += v;
        }
        if kind != "status" {
            *self
                .totals
                .entry((channel.to_string(), kind, k.to_string()))
                .or_default() += v;
        }
    }

    /// A host's outcome for release `version`: a failure counts once per host and release (an
    /// `error` followed by its `rolled_back` is one failed host), a success clears that.
    fn outcome(&mut self, at: i64, channel: &str, machine_id: &str, status: &str, version: &str) {
        if FAILURE_STATUSES.contains(&status) {
            if self.failed.get(machine_id).map(String::as_str) != Some(version) {
                self.add(at, channel, "failure", version, 1);
                self.failed
                    .insert(machine_id.to_string(), version.to_string());
                self.changed_hosts.push(machine_id.to_string());
            }
        } else if status == SUCCESS_STATUS {
            self.add(at, channel, "success", version, 1);
            if self.failed.remove(machine_id).is_some() {
                self.changed_hosts.push(machine_id.to_string());
            }
        }
    }

    /// The host is on (channel, version) as of `at`; older news than what we hold is ignored.
    fn host_seen(&mut self, machine_id: &str, channel: &str, version: &str, at: i64) {
        match self.hosts.get(machine_id).cloned() {
            Some((c, v, t)) => {
                if at < t {
                    return;
                }
                if c != channel || v != version {
                    self.add(at, &c, "version", &v, -1);
                    self.add(at, channel, "version", version, 1);
                }
            }
            None => self.add(at, channel, "version", version, 1),
        }
        self.hosts.insert(
            machine_id.to_string(),
            (channel.to_string(), version.to_string(), at),
        );
        self.changed_hosts.push(machine_id.to_string());
    }
}

fn ph(backend: Backend, i: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_string(),
        Backend::Postgres => format!("${i}"),
    }
}

fn values(backend: Backend, rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let p = (1..=cols)
                .map(|c| ph(backend, r * cols + c))
                .collect::<Vec<_>>()
                .join(",");
            format!("({p})")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the series stand after a catch-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaughtUp {
    /// History rows folded in by this call.
    pub folded: u64,
    /// The last history row folded in (any change of a host's outcome writes one).
    pub history_cursor: i64,
    /// A random number identifying this database (for caches keyed by database).
    pub database_id: i64,
}

/// Catch-ups of one database in this process: how many have started, and the last result with
/// its start number.
#[derive(Default)]
struct Started {
    count: u64,
    last: Option<(u64, CaughtUp)>,
}

static STARTED: std::sync::Mutex<Option<HashMap<String, Started>>> = std::sync::Mutex::new(None);

fn with_started<T>(store: &Store, f: impl FnOnce(&mut Started) -> T) -> T {
    let key = store.pool.connect_options().database_url.to_string();
    let mut all = STARTED.lock().expect("catch-up counters");
    f(all.get_or_insert_with(HashMap::new).entry(key).or_default())
}

/// Folds everything new in `status_history` and `instances` into the series.
///
/// Concurrent callers share the work: a catch-up that started after a caller arrived has seen
/// everything committed before it arrived, so the caller takes that result instead of running
/// another (a burst of N dashboard reads runs at most two catch-ups, not N).
pub async fn catch_up(store: &Store, now: i64) -> Result<CaughtUp> {
    let arrived = with_started(store, |s| s.count);
    let _guard = CATCH_UP.lock().await;
    let covered = with_started(store, |s| match s.last {
        Some((n, c)) if n > arrived => Err(CaughtUp { folded: 0, ..c }),
        _ => {
            s.count += 1;
            Ok(s.count)
        }
    });
    let number = match covered {
        Ok(n) => n,
        Err(c) => return Ok(c),
    };
    let caught_up = fold_new(store, now).await?;
    with_started(store, |s| s.last = Some((number, caught_up)));
    Ok(caught_up)
}

async fn fold_new(store: &Store, now: i64) -> Result<CaughtUp> {
    let mut tx = store.begin().await?;
    let lock = match store.backend {
        Backend::Sqlite => "SELECT name, value FROM dash_cursor",
        Backend::Postgres => "SELECT name, value FROM dash_cursor ORDER BY name FOR UPDATE",
    };
    let mut history_cursor = 0i64;
    let mut seen_cursor = 0i64;
    let mut database_id = None;
    let mut extra_schema = 0i64;
    for r in sqlx::query(lock).fetch_all(&mut *tx).await? {
        let name: String = r.try_get("name")?;
        let v: i64 = r.try_get("value")?;
        match name.as_str() {
            "history" => history_cursor = v,
            "instances" => seen_cursor = v,
            "database_id" => database_id = Some(v),
            "schema" => extra_schema = v,
            _ => {}
        }
    }
    let database_id = match database_id {
        Some(id) => id,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let id = i64::from_le_bytes(b) & i64::MAX;
            sqlx::query("INSERT INTO dash_cursor (name, value) VALUES ('database_id', $1)")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            id
        }
    };
    if extra_schema < EXTRA_SCHEMA.len() as i64 {
        for sql in &EXTRA_SCHEMA[extra_schema as usize..] {
            sqlx::query(*sql).execute(&mut *tx).await?;
        }
        sqlx::query(if extra_schema == 0 {
            "INSERT INTO dash_cursor (name, value) VALUES ('schema', $1)"
        } else {
            "UPDATE dash_cursor SET value = $1 WHERE name = 'schema'"
        })
        .bind(EXTRA_SCHEMA.len() as i64)
        .execute(&mut *tx)
        .await?;
    }
    let mut fold = Fold::default();
    let mut events: Vec<Seen> = Vec::new();
    let hist = sqlx::query(
        "SELECT id, at, machine_id, channel, version, target_version, status FROM status_history WHERE id > $1 ORDER BY id",
    )
    .bind(history_cursor)
    .fetch_all(&mut *tx)
    .await?;
    let mut folded = 0u64;
    for r in &hist {
        let id: i64 = r.try_get("id")?;
        history_cursor = history_cursor.max(id);
        let version: Option<String> = r.try_get("version")?;
        let target: Option<String> = r.try_get("target_version")?;
        let outcome_version = target.clone().or(version.clone()).unwrap_or_default();
        events.push(Seen {
            at: r.try_get("at")?,
            order: 0,
            machine_id: r.try_get("machine_id")?,
            channel: r.try_get("channel")?,
            version: version.unwrap_or_default(),
            status: Some((r.try_get("status")?, outcome_version)),
        });
        folded += 1;
    }
    let inst = sqlx::query(
        "SELECT machine_id, channel, version, first_seen, last_seen FROM instances WHERE last_seen > $1",
    )
    .bind(seen_cursor)
    .fetch_all(&mut *tx)
    .await?;
    let mut first_seen = HashMap::new();
    // Every instance seen at or before the cursor has been folded in.
    let mut max_seen = seen_cursor;
    for r in &inst {
        let at: i64 = r.try_get("last_seen")?;
        max_seen = max_seen.max(at);
        let version: Option<String> = r.try_get("version")?;
        let machine_id: String = r.try_get("machine_id")?;
        first_seen.insert(machine_id.clone(), r.try_get::<i64, _>("first_seen")?);
        events.push(Seen {
            at,
            order: 1,
            machine_id,
            channel: r.try_get("channel")?,
            version: version.unwrap_or_default(),
            status: None,
        });
    }
    let seen_cursor = max_seen.min(now - INSTANCE_OVERLAP_SECS).max(seen_cursor);
    if events.is_empty() {
        tx.commit().await?;
        return Ok(CaughtUp {
            folded: 0,
            history_cursor,
            database_id,
        });
    }
    events.sort_by_key(|e| (e.at, e.order));
    let mut ids: Vec<String> = events.iter().map(|e| e.machine_id.clone()).collect();
    ids.sort();
    ids.dedup();
    load_hosts(store.backend, &mut tx, &ids, &mut fold).await?;
    // A host new to the series counts from its first check-in, on the version of its earliest
    // history entry here (or its current one): check-ins without news write no history.
    let mut appear: HashMap<String, Seen> = HashMap::new();
    for e in &events {
        if fold.hosts.contains_key(&e.machine_id) || appear.contains_key(&e.machine_id) {
            continue;
        }
        if let Some(t) = first_seen.get(&e.machine_id) {
            appear.insert(
                e.machine_id.clone(),
                Seen {
                    at: (*t).min(e.at),
                    order: 0,
                    machine_id: e.machine_id.clone(),
                    channel: e.channel.clone(),
                    version: e.version.clone(),
                    status: None,
                },
            );
        }
    }
    if !appear.is_empty() {
        events.extend(appear.into_values());
        events.sort_by_key(|e| (e.at, e.order));
    }
    for e in &events {
        if let Some((status, outcome_version)) = &e.status {
            fold.add(e.at, &e.channel, "status", status, 1);
            fold.outcome(e.at, &e.channel, &e.machine_id, status, outcome_version);
        }
        fold.host_seen(&e.machine_id, &e.channel, &e.version, e.at);
    }
    write_fold(store.backend, &mut tx, &fold).await?;
    for (name, v) in [("history", history_cursor), ("instances", seen_cursor)] {
        sqlx::query("UPDATE dash_cursor SET value = $1 WHERE name = $2")
            .bind(v)
            .bind(name)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM dash_series WHERE step = 60 AND bucket < $1")
        .bind(now - MINUTE_RETENTION_SECS)
        .execute(&mut *tx)
        .await?;
    tx.commit()
        .await
        .context("cannot commit dashboard series")?;
    Ok(CaughtUp {
        folded,
        history_cursor,
        database_id,
    })
}

async fn load_hosts(backend: Backend, tx: &mut Tx, ids: &[String], out: &mut Fold) -> Result<()> {
    for chunk in ids.chunks(500) {
        let p = (1..=chunk.len())
            .map(|i| ph(backend, i))
            .collect::<Vec<_>>()
            .join(",");
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "SELECT machine_id, channel, version, at, failed FROM dash_hosts WHERE machine_id IN ({p})"
        )));
        for id in chunk {
            q = q.bind(id.clone());
        }
        for r in q.fetch_all(&mut **tx).await? {
            let id: String = r.try_get("machine_id")?;
            if let Some(v) = r.try_get::<Option<String>, _>("failed")? {
                out.failed.insert(id.clone(), v);
            }
            out.hosts.insert(
                id,
                (
                    r.try_get("channel")?,
                    r.try_get("version")?,
                    r.try_get("at")?,
                ),
            );
        }
    }
    Ok(())
}

async fn write_fold(backend: Backend, tx: &mut Tx, fold: &Fold) -> Result<()> {
    let series: Vec<_> = fold.series.iter().filter(|(_, v)| **v != 0).collect();
    for chunk in series.chunks(150) {
        let sql = format!(
            "INSERT INTO dash_series (step, channel, bucket, kind, k, value) VALUES {} ON CONFLICT (step, channel, bucket, kind, k) DO UPDATE SET value = dash_series.value + excluded.value",
            values(backend, chunk.len(), 6)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for ((step, channel, bucket, kind, k), v) in chunk {
            q = q
                .bind(*step)
                .bind(channel.clone())
                .bind(*bucket)
                .bind(*kind)
                .bind(k.clone())
                .bind(**v);
        }
        q.execute(&mut **tx).await?;
    }
    let totals: Vec<_> = fold.totals.iter().filter(|(_, v)| **v != 0).collect();
    for chunk in totals.chunks(200) {
        let sql = format!(
            "INSERT INTO dash_totals (channel, kind, k, value) VALUES {} ON CONFLICT (channel, kind, k) DO UPDATE SET value = dash_totals.value + excluded.value",
            values(backend, chunk.len(), 4)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for ((channel, kind, k), v) in chunk {
            q = q
                .bind(channel.clone())
                .bind(*kind)
                .bind(k.clone())
                .bind(**v);
        }
        q.execute(&mut **tx).await?;
    }
    let mut changed = fold.changed_hosts.clone();
    changed.sort();
    changed.dedup();
    for chunk in changed.chunks(200) {
        let sql = format!(
            "INSERT INTO dash_hosts (machine_id, channel, version, at, failed) VALUES {} ON CONFLICT (machine_id) DO UPDATE SET channel = excluded.channel, version = excluded.version, at = excluded.at, failed = excluded.failed",
            values(backend, chunk.len(), 5)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            let (c, v, at) = &fold.hosts[id];
            q = q
                .bind(id.clone())
                .bind(c.clone())
                .bind(v.clone())
                .bind(*at)
                .bind(fold.failed.get(id).cloned());
        }
        q.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Per-bucket values of one key.
pub type Lines = BTreeMap<String, Vec<i64>>;

/// A gauge (value at the end of each bucket) from its all-time total and its per-bucket changes:
/// the value at the end of bucket `i` is the total minus every change after bucket `i`.
pub fn gauge_from_deltas(total: i64, deltas: &[i64], changes_after_range: i64) -> Vec<i64> {
    let mut out = vec![0; deltas.len()];
    let mut v = total - changes_after_range;
    for i in (0..deltas.len()).rev() {
        out[i] = v;
        v -= deltas[i];
    }
    out
}

/// Failure share in percent, `None` without reports.
pub fn failure_percent(failures: i64, successes: i64) -> Option<f64> {
    let n = failures + successes;
    (n > 0).then(|| failures as f64 * 100.0 / n as f64)
}

/// The series of one channel over a range, as the rollout page draws them.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSeries {
    pub channel: String,
    pub step: i64,
    pub from: i64,
    pub to: i64,
    /// Bucket start times (Unix seconds).
    pub buckets: Vec<i64>,
    /// Hosts on each version at the end of each bucket.
    pub versions: Lines,
    /// History entries per status in each bucket.
    pub statuses: Lines,
    /// The channel's release (or the pinned one).
    pub release: Option<String>,
    /// Eligible share of the ramp at the end of each bucket (current policy; 0 before the
    /// rollout started).
    pub target_percent: Vec<f64>,
    /// Share of the channel's hosts on the release at the end of each bucket.
    pub actual_percent: Vec<f64>,
    /// Outcomes for the release in each bucket.
    pub failures: Vec<i64>,
    pub successes: Vec<i64>,
    /// All-time failure share for the release at the end of each bucket.
    pub failure_percent: Vec<Option<f64>>,
    pub halt_threshold_percent: Option<f64>,
    pub halt_min_reports: Option<u64>,
}

/// Reads one channel's series (call [`catch_up`] first).
pub async fn channel_series(
    store: &Store,
    channel: &str,
    range: Range,
    now: i64,
    release: Option<&str>,
    rollout: Option<(&RolloutPolicy, i64)>,
) -> Result<ChannelSeries> {
    let (len, step) = range.span();
    let last = now - now.rem_euclid(step);
    let first = last - (len / step - 1) * step;
    let buckets: Vec<i64> = (0..len / step).map(|i| first + i * step).collect();
    let n = buckets.len();
    // One row per (kind, k) with its buckets packed as "bucket:value,...": the database driver
    // hands rows over one by one between threads, which cost more than the query itself when a
    // week of hour buckets was read as ~1,300 rows.
    let packed = match store.backend {
        Backend::Sqlite => "group_concat(bucket || ':' || value, ',')",
        Backend::Postgres => "string_agg(bucket::text || ':' || value::text, ',')",
    };
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT kind, k, {packed} AS pts FROM dash_series WHERE step = $1 AND channel = $2 AND bucket >= $3 GROUP BY kind, k"
    )))
    .bind(step)
    .bind(channel)
    .bind(first)
    .fetch_all(&store.pool)
    .await?;
    let mut version_deltas: Lines = BTreeMap::new();
    let mut after: HashMap<(String, String), i64> = HashMap::new();
    let mut statuses: Lines = BTreeMap::new();
    let mut outcomes: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for r in rows {
        let kind: String = r.try_get("kind")?;
        let k: String = r.try_get("k")?;
        let pts: String = r.try_get("pts")?;
        for (bucket, v) in unpack_points(&pts)? {
            let i = ((bucket - first) / step) as usize;
            if i >= n {
                *after.entry((kind.clone(), k.clone())).or_default() += v;
                continue;
            }
            let line = match kind.as_str() {
                "version" => version_deltas
                    .entry(k.clone())
                    .or_insert_with(|| vec![0; n]),
                "status" => statuses.entry(k.clone()).or_insert_with(|| vec![0; n]),
                _ => outcomes
                    .entry((kind.clone(), k.clone()))
                    .or_insert_with(|| vec![0; n]),
            };
            line[i] += v;
        }
    }
    let totals = sqlx::query("SELECT kind, k, value FROM dash_totals WHERE channel = $1")
        .bind(channel)
        .fetch_all(&store.pool)
        .await?;
    let mut total: HashMap<(String, String), i64> = HashMap::new();
    for r in totals {
        total.insert((r.try_get("kind")?, r.try_get("k")?), r.try_get("value")?);
    }
    let mut versions: Lines = BTreeMap::new();
    for ((kind, k), t) in &total {
        if kind != "version" {
            continue;
        }
        let deltas = version_deltas.get(k).cloned().unwrap_or_else(|| vec![0; n]);
        let a = after.get(&(kind.clone(), k.clone())).copied().unwrap_or(0);
        let line = gauge_from_deltas(*t, &deltas, a);
        if line.iter().any(|v| *v != 0) {
            versions.insert(k.clone(), line);
        }
    }
    let mut actual_percent = vec![0.0; n];
    if let Some(rel) = release {
        for (i, p) in actual_percent.iter_mut().enumerate() {
            let all: i64 = versions.values().map(|l| l[i]).sum();
            let on = versions.get(rel).map_or(0, |l| l[i]);
            if all > 0 {
                *p = on as f64 * 100.0 / all as f64;
            }
        }
    }
    let target_percent = buckets
        .iter()
        .map(|b| match rollout {
            Some((policy, started)) => {
                let end = (b + step).min(now);
                if end < started {
                    0.0
                } else {
                    policy::rollout_percent(policy, started, end)
                }
            }
            None => 0.0,
        })
        .collect();
    let rel = release.unwrap_or_default().to_string();
    let line = |kind: &str| {
        outcomes
            .get(&(kind.to_string(), rel.clone()))
            .cloned()
            .unwrap_or_else(|| vec![0; n])
    };
    let failures = line("failure");
    let successes = line("success");
    let tot = |kind: &str| {
        let key = (kind.to_string(), rel.clone());
        (
            total.get(&key).copied().unwrap_or(0),
            after.get(&key).copied().unwrap_or(0),
        )
    };
    let (ft, fa) = tot("failure");
    let (st, sa) = tot("success");
    let fcum = gauge_from_deltas(ft, &failures, fa);
    let scum = gauge_from_deltas(st, &successes, sa);
    let failure_pct = fcum
        .iter()
        .zip(&scum)
        .map(|(f, s)| failure_percent(*f, *s))
        .collect();
    let halt = rollout.and_then(|(p, _)| p.halt.clone());
    Ok(ChannelSeries {
        channel: channel.to_string(),
        step,
        from: first,
        to: now,
        buckets,
        versions,
        statuses,
        release: release.map(str::to_string),
        target_percent,
        actual_percent,
        failures,
        successes,
        failure_percent: failure_pct,
        halt_threshold_percent: halt.as_ref().map(|h| h.max_failure_percent),
        halt_min_reports: halt.as_ref().map(|h| h.min_reports),
    })
}

/// Parses "bucket:value,bucket:value" as packed by [`channel_series`]'s query.
fn unpack_points(pts: &str) -> Result<Vec<(i64, i64)>> {
    pts.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (b, v) = p
                .split_once(':')
                .with_context(|| format!("dash_series point {p:?} is not bucket:value"))?;
            Ok((
                b.parse()
                    .with_context(|| format!("dash_series bucket {b:?}"))?,
                v.parse()
                    .with_context(|| format!("dash_series value {v:?}"))?,
            ))
        })
        .collect()
}

/// Hosts per version now, per channel (from the series' own host table).
pub async fn hosts_per_version(store: &Store) -> Result<BTreeMap<String, BTreeMap<String, i64>>> {
    let rows = sqlx::query("SELECT channel, k, value FROM dash_totals WHERE kind = 'version'")
        .fetch_all(&store.pool)
        .await?;
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for r in rows {
        let v: i64 = r.try_get("value")?;
        if v != 0 {
            out.entry(r.try_get("channel")?)
                .or_default()
                .insert(r.try_get("k")?, v);
        }
    }
    Ok(out)
}

/// Outcome totals per (channel, release version): (failures, successes).
pub async fn outcome_totals(store: &Store) -> Result<HashMap<(String, String), (i64, i64)>> {
    let rows = sqlx::query(
        "SELECT channel, kind, k, value FROM dash_totals WHERE kind IN ('failure', 'success')",
    )
    .fetch_all(&store.pool)
    .await?;
    let mut out: HashMap<(String, String), (i64, i64)> = HashMap::new();
    for r in rows {
        let kind: String = r.try_get("kind")?;
        let v: i64 = r.try_get("value")?;
        let e = out
            .entry((r.try_get("channel")?, r.try_get("k")?))
            .or_default();
        if kind == "failure" {
            e.0 += v;
        } else {
            e.1 += v;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_counts_back_from_total() {
        // 5 hosts now; +2 in bucket 1, -1 in bucket 2, +1 after the range.
        assert_eq!(gauge_from_deltas(5, &[0, 2, -1], 1), vec![3, 5, 4]);
        assert_eq!(gauge_from_deltas(0, &[], 0), Vec::<i64>::new());
    }

    #[test]
    fn ranges_parse_and_span() {
        assert_eq!(Range::parse("30d"), Ok(Range::Month));
        assert_eq!(Range::Week.span(), (604_800, 3600));
        assert!(Range::parse("year").unwrap_err().contains("year"));
    }

    #[test]
    fn packed_points_parse() {
        assert_eq!(
            unpack_points("3600:2,7200:-1").unwrap(),
            vec![(3600, 2), (7200, -1)]
        );
        assert_eq!(unpack_points("").unwrap(), vec![]);
        assert!(
            unpack_points("3600")
                .unwrap_err()
                .to_string()
                .contains("3600")
        );
    }

    #[test]
    fn failure_share() {
        assert_eq!(failure_percent(1, 3), Some(25.0));
        assert_eq!(failure_percent(0, 0), None);
    }
}
