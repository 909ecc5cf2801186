//! The check-in writer's own SQLite connection.
//!
//! On SQLite the writer runs on a thread of its own with a synchronous connection: a batch of
//! check-ins is a handful of statements executed right here, instead of one hand-off to sqlx's
//! SQLite worker thread and back per statement. The statements are the ones the sqlx code uses
//! ([`crate::store::sql`]); the schema and the migrations stay with [`crate::store::Store`],
//! which opened the database first. Every other part of the server keeps using the store's
//! pool; both connections take SQLite's write lock at `BEGIN IMMEDIATE`, so neither sees the
//! other's half-done work, and an answer leaves only after `COMMIT`.
//!
//! One server process owns a SQLite database: the writer holds an exclusive lock on
//! `<database>.serve-lock` while it runs, so a second `update-server serve` on the same file
//! stops with an error instead of serving beside it (the configuration the writer keeps in
//! memory between batches is only valid while no other process changes the file).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::checkin::{BatchDb, BatchWrites, CountKey};
use crate::policy::RolloutCounts;
use crate::store::{
    ChannelRow, InstanceRow, LiftRow, ReleaseRow, RolloutRow, sql, upsert_instances_sql,
};

pub(crate) struct SqliteBatch {
    conn: Connection,
    /// A transaction is open.
    open: bool,
    generation: Arc<AtomicU64>,
    upsert_instance: String,
    /// Held (locked) while this writer owns the database.
    _owner: File,
}

impl SqliteBatch {
    pub(crate) fn open(path: &Path, generation: Arc<AtomicU64>) -> Result<SqliteBatch> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".serve-lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let owner = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open lock file {}", lock_path.display()))?;
        match owner.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "database {} is in use by another update-server serving it (lock {} is held); \
                 stop that server, or point several servers at one PostgreSQL database instead",
                path.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()));
            }
        }
        let conn = Connection::open(path)
            .with_context(|| format!("cannot open database {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        )
        .with_context(|| format!("cannot set up database {}", path.display()))?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(SqliteBatch {
            conn,
            open: false,
            generation,
            upsert_instance: upsert_instances_sql(1, |i| format!("?{i}")),
            _owner: owner,
        })
    }

    fn count(&self, sql: &str, params: impl rusqlite::Params) -> Result<u64> {
        let n: i64 = self
            .conn
            .prepare_cached(sql)?
            .query_row(params, |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }
}

fn channel(r: &Row<'_>) -> rusqlite::Result<ChannelRow> {
    Ok(ChannelRow {
        name: r.get("name")?,
        position: r.get("position")?,
        release_version: r.get("release_version")?,
        promoted_at: r.get("promoted_at")?,
    })
}

fn rollout(r: &Row<'_>) -> Result<RolloutRow> {
    let policy: String = r.get("policy")?;
    Ok(RolloutRow {
        channel: r.get("channel")?,
        group: r.get("grp")?,
        policy: serde_json::from_str(&policy).context("stored rollout policy is not valid JSON")?,
        paused: r.get::<_, i64>("paused")? != 0,
        pause_reason: r.get("pause_reason")?,
        auto_halted: r.get::<_, i64>("auto_halted")? != 0,
        started_at: r.get("started_at")?,
        counts_since: r.get("counts_since")?,
    })
}

/// A host record from [`sql::SELECT_INSTANCE`], by column position (looking columns up by name
/// costs more than reading them).
fn instance(r: &Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        machine_id: r.get(0)?,
        app_id: r.get(1)?,
        channel: r.get(2)?,
        group: r.get(3)?,
        rollout_group: r.get(4)?,
        version: r.get(5)?,
        board: r.get(6)?,
        boot_id: r.get(7)?,
        status: r.get(8)?,
        error_code: r.get(9)?,
        target_version: r.get(10)?,
        granted_at: r.get(11)?,
        outcome: r.get(12)?,
        outcome_version: r.get(13)?,
        outcome_at: r.get(14)?,
        failed_version: r.get(15)?,
        first_seen: r.get(16)?,
        last_seen: r.get(17)?,
        checkins: r.get(18)?,
    })
}

fn release(r: &Row<'_>) -> rusqlite::Result<ReleaseRow> {
    Ok(ReleaseRow {
        version: r.get("version")?,
        sha256: r.get("sha256")?,
        sha1_base64: r.get("sha1_base64")?,
        size: r.get("size")?,
        salt: r.get("salt")?,
        board: r.get("board")?,
        min_source_version: r.get("min_source_version")?,
        created_unix: r.get("created_unix")?,
        uploaded_at: r.get("uploaded_at")?,
        channels: Vec::new(),
    })
}

impl BatchDb for SqliteBatch {
    async fn begin(&mut self) -> Result<()> {
        if self.open {
            // The previous batch failed before its commit.
            let _ = self.conn.execute_batch("ROLLBACK");
            self.open = false;
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.open = true;
        Ok(())
    }

    fn config_generation(&self) -> Option<u64> {
        Some(self.generation.load(Ordering::SeqCst))
    }

    fn retry_conflicts(&self) -> bool {
        false
    }

    async fn channels(&mut self) -> Result<Vec<ChannelRow>> {
        let mut st = self.conn.prepare_cached(sql::SELECT_CHANNELS)?;
        let rows = st.query_map([], channel)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    async fn rollouts(&mut self) -> Result<Vec<RolloutRow>> {
        let mut st = self.conn.prepare_cached(sql::SELECT_ROLLOUTS)?;
        let mut rows = st.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(rollout(r)?);
        }
        Ok(out)
    }

    async fn lifts(&mut self, now: i64) -> Result<Vec<LiftRow>> {
        let mut st = self.conn.prepare_cached(sql::SELECT_LIFTS)?;
        let rows = st.query_map([now], |r| {
            Ok(LiftRow {
                machine_id: r.get("machine_id")?,
                version: r.get("version")?,
                lifted_at_ms: r.get("lifted_at_ms")?,
                expires_at: r.get("expires_at")?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    async fn instances(&mut self, ids: &[String]) -> Result<Vec<InstanceRow>> {
        let mut st = self.conn.prepare_cached(sql::SELECT_INSTANCE)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(i) = st.query_row([id], instance).optional()? {
                out.push(i);
            }
        }
        Ok(out)
    }

    async fn release(&mut self, version: &str) -> Result<Option<ReleaseRow>> {
        let mut st = self.conn.prepare_cached(sql::SELECT_RELEASE)?;
        Ok(st.query_row([version], release).optional()?)
    }

    async fn counts(&mut self, key: &CountKey, r: &RolloutRow, now: i64) -> Result<RolloutCounts> {
        let (channel, group, version) = (&key.0, &key.1, &key.2);
        let p = &r.policy;
        let mut c = RolloutCounts::default();
        if let Some(rate) = &p.rate_limit {
            c.grants_in_period = self.count(
                sql::COUNT_GRANTS,
                params![channel, group, now - rate.period_secs],
            )?;
        }
        if p.max_in_flight.is_some() {
            c.in_flight = self.count(
                sql::COUNT_IN_FLIGHT,
                params![channel, group, version, now - p.in_flight_timeout_secs],
            )?;
        }
        if p.halt.is_some() {
            let mut st = self.conn.prepare_cached(sql::COUNT_OUTCOMES)?;
            let rows = st.query_map(params![channel, group, version, r.counts_since], |r| {
                Ok((r.get::<_, String>("outcome")?, r.get::<_, i64>("n")?))
            })?;
            for row in rows {
                let (outcome, n) = row?;
                match outcome.as_str() {
                    "success" => c.successes = n.max(0) as u64,
                    "failure" => c.failures = n.max(0) as u64,
                    _ => {}
                }
            }
        }
        Ok(c)
    }

    async fn halt(&mut self, key: &CountKey, reason: &str, now: i64) -> Result<()> {
        self.conn
            .prepare_cached(sql::SET_PAUSED)?
            .execute(params![1i64, reason, 1i64, key.0, key.1])?;
        self.conn
            .prepare_cached(sql::INSERT_ACTIVITY)?
            .execute(params![now, "rollout_halted", key.0, key.1, key.2, reason])?;
        Ok(())
    }

    async fn write(&mut self, w: &BatchWrites<'_>) -> Result<()> {
        // A host that only checked in again changes two columns; rewriting the whole record
        // would rewrite every index of the table too.
        let mut st = self.conn.prepare_cached(sql::TOUCH_INSTANCE)?;
        for t in w.touched {
            st.execute(params![t.last_seen, t.added, t.machine_id])?;
        }
        let mut st = self.conn.prepare_cached(&self.upsert_instance)?;
        for i in &w.instances {
            st.execute(params![
                i.machine_id,
                i.app_id,
                i.channel,
                i.group,
                i.rollout_group,
                i.version,
                i.board,
                i.boot_id,
                i.status,
                i.error_code,
                i.target_version,
                i.granted_at,
                i.outcome,
                i.outcome_version,
                i.outcome_at,
                i.failed_version,
                i.first_seen,
                i.last_seen,
                i.checkins
            ])?;
        }
        let mut st = self.conn.prepare_cached(sql::INSERT_HISTORY)?;
        for h in w.history {
            st.execute(params![
                h.at,
                h.machine_id,
                h.channel,
                h.group,
                h.version,
                h.target_version,
                h.status,
                h.event_type,
                h.event_result,
                h.error_code
            ])?;
        }
        let mut st = self.conn.prepare_cached(sql::INSERT_GRANT)?;
        for (machine, channel, group, version, at) in w.grants {
            st.execute(params![machine, channel, group, version, at])?;
        }
        let mut st = self.conn.prepare_cached(sql::END_LIFT)?;
        for (machine, version) in w.ended_lifts {
            st.execute(params![machine, version])?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        self.open = false;
        Ok(())
    }
}
