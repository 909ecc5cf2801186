//! The Omaha endpoint's logic.
//!
//! Check-ins are handed to one writer task per process, which takes whatever check-ins are
//! waiting (up to [`MAX_BATCH`]) and records them in one transaction: one read of the channels
//! and rollouts (locked on PostgreSQL), one read of the hosts' records, the rollout decisions in
//! memory over counts read from the database plus the changes of the batch itself, then
//! multi-row writes and one commit. Only after the commit does any host get its answer, so an
//! acknowledged event is never lost, and the counts each decision sees include every earlier
//! decision (of this batch, of earlier batches, and of other server processes). The one
//! exception is a check-in that changes nothing but the host's `last_seen` and `checkins`: those
//! two are written behind, within a second, by a later batch ([`crate::seen`]); and when such a
//! check-in is held, an HTTP thread may answer it from the view the writer published after its
//! last commit, without the writer ([`crate::fast`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use semver::Version;
use tokio::sync::{mpsc, oneshot};
use twinroot_format::omaha::{
    self, Action, AppRequest, AppResponse, Package, Request, Response, UpdateCheckResponse,
    UpdateOffer, event_result, event_type,
};

use crate::fast::FastPath;
use crate::policy::{self, Decision, Hold, HostView, ReleaseView, Rollout, RolloutCounts};
use crate::seen::{PendingSeen, Touch};
use crate::store::{
    Backend, ChannelRow, HistoryRow, InstanceRow, LiftRow, ReleaseRow, RolloutRow, Store, Tx,
};

/// Most check-ins recorded in one transaction.
pub const MAX_BATCH: usize = 256;

/// Statuses of a host that has a grant and has not finished it.
pub fn is_in_flight(status: &str) -> bool {
    matches!(
        status,
        "granted" | "downloading" | "downloaded" | "installed"
    )
}

/// What the endpoint needs besides the database.
#[derive(Debug, Clone)]
pub struct OmahaConfig {
    /// The app id served (compared case-insensitively, braces included).
    pub app_id: String,
    /// Name sent in `<response server>`.
    pub server_name: String,
}

/// Outcome of a check-in, for metrics.
#[derive(Debug, Default, Clone)]
pub struct CheckinSummary {
    pub granted: u32,
    pub holds: Vec<&'static str>,
    pub halted: Vec<String>,
    pub events: u32,
    /// Apps answered on the HTTP thread, without the writer ([`crate::fast`]).
    pub from_memory: u32,
}

impl CheckinSummary {
    fn merge(&mut self, o: CheckinSummary) {
        self.granted += o.granted;
        self.holds.extend(o.holds);
        self.halted.extend(o.halted);
        self.events += o.events;
        self.from_memory += o.from_memory;
    }
}

/// What one app of a check-in is answered.
pub(crate) struct Answer {
    pub update_check: Option<UpdateCheckResponse>,
    /// Quarantine lifts sent to the host (see [`LiftRow`]).
    pub lift_quarantine: Vec<String>,
    pub summary: CheckinSummary,
}

struct Job {
    app: AppRequest,
    machine_id: String,
    codebase: String,
    now: DateTime<Utc>,
    reply: oneshot::Sender<Result<Answer>>,
}

/// Handle to the writer.
#[derive(Clone)]
pub struct Checkins {
    jobs: mpsc::Sender<Job>,
    /// Asks the writer to stop after the batch it is recording.
    stop: tokio_util::sync::CancellationToken,
    /// Fires when the writer has stopped and closed its database connection.
    stopped: std::sync::Arc<tokio::sync::Mutex<Option<oneshot::Receiver<()>>>>,
    /// Cleared when the writer ends, for whatever reason (a stop, or a panic).
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Check-ins answered on the HTTP threads (SQLite with a seen delay; [`crate::fast`]).
    fast: Option<std::sync::Arc<FastPath>>,
}

/// Clears [`Checkins::running`] when the writer ends, unwinding included, and stops the HTTP
/// threads from answering check-ins nobody would write any more.
struct RunningGuard {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    fast: Option<std::sync::Arc<FastPath>>,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running
            .store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(f) = &self.fast {
            f.take(true);
        }
        tracing::info!("check-in writer ended");
    }
}

impl Checkins {
    /// Starts the writer for `store`; it ends when every handle is dropped. On SQLite the writer
    /// is a thread with its own synchronous connection (no hand-offs to a database worker per
    /// statement); on PostgreSQL it is a task using the store's pool. Check-ins that only say a
    /// host is still there are written within `seen_delay` ([`crate::seen`]). With a seen delay
    /// on SQLite, up to `cached_hosts` host records are kept for answering held hosts on the
    /// HTTP threads ([`crate::fast`]; 0 sends every check-in to the writer).
    pub fn start(store: Store, seen_delay: Duration, cached_hosts: usize) -> Result<Checkins> {
        let (tx, rx) = mpsc::channel(4096);
        let stop = tokio_util::sync::CancellationToken::new();
        let (stopped_tx, stopped) = oneshot::channel();
        let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let fast = (store.sqlite_path.is_some() && !seen_delay.is_zero() && cached_hosts > 0)
            .then(|| std::sync::Arc::new(FastPath::new(store.generation_counter(), cached_hosts)));
        let rx = WriterInput {
            jobs: rx,
            stop: stop.clone(),
            stopped: stopped_tx,
            seen: PendingSeen::new(seen_delay),
            running: RunningGuard {
                running: running.clone(),
                fast: fast.clone(),
            },
            fast: fast.clone(),
        };
        match &store.sqlite_path {
            Some(path) => {
                let db = crate::sqlite_writer::SqliteBatch::open(path, store.generation_counter())?;
                std::thread::Builder::new()
                    .name("checkin-writer".into())
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_time()
                            .build()
                            .expect("a current-thread runtime always builds");
                        rt.block_on(writer(db, rx));
                    })
                    .map_err(|e| anyhow!("cannot start the check-in writer thread: {e}"))?;
            }
            None => {
                tokio::spawn(writer(SqlxBatch { store, tx: None }, rx));
            }
        }
        Ok(Checkins {
            jobs: tx,
            stop,
            stopped: std::sync::Arc::new(tokio::sync::Mutex::new(Some(stopped))),
            running,
            fast,
        })
    }

    /// Whether the writer still records check-ins (`GET /healthz` fails once it does not).
    pub fn is_running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the writer and waits until it wrote every pending check-in and closed its database
    /// connection (on SQLite the last connection to close folds the WAL back into the database
    /// file). Check-ins after this fail.
    pub async fn close(&self) {
        self.stop.cancel();
        if let Some(stopped) = self.stopped.lock().await.take() {
            let _ = stopped.await;
        }
    }

    async fn submit(
        &self,
        app: AppRequest,
        machine_id: String,
        codebase: &str,
        now: DateTime<Utc>,
    ) -> Result<Answer> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                app,
                machine_id,
                codebase: codebase.to_string(),
                now,
                reply,
            })
            .await
            .map_err(|_| anyhow!("check-in writer stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("check-in writer dropped the check-in"))?
    }
}

/// Channels, rollouts and releases as the last batch left them.
#[derive(Default)]
struct ConfigCache {
    generation: Option<u64>,
    channels: HashMap<String, ChannelRow>,
    rollouts: BTreeMap<(String, String), RolloutRow>,
    releases: HashMap<String, Option<ReleaseRow>>,
    /// Quarantine lifts being sent, by machine id.
    lifts: HashMap<String, Vec<LiftRow>>,
}

/// The database side of one batch of check-ins: everything runs inside one transaction, from
/// [`BatchDb::begin`] to [`BatchDb::commit`].
pub(crate) trait BatchDb {
    async fn begin(&mut self) -> Result<()>;
    /// The admin-change generation, when this writer is the only one writing the database and
    /// may reuse channels, rollouts, releases and lifts while it is unchanged (SQLite).
    fn config_generation(&self) -> Option<u64>;
    /// Whether a failed batch may be a conflict with another server process worth retrying.
    fn retry_conflicts(&self) -> bool;
    async fn channels(&mut self) -> Result<Vec<ChannelRow>>;
    /// All rollouts; on PostgreSQL locked until the commit.
    async fn rollouts(&mut self) -> Result<Vec<RolloutRow>>;
    async fn lifts(&mut self, now: i64) -> Result<Vec<LiftRow>>;
    async fn instances(&mut self, ids: &[String]) -> Result<Vec<InstanceRow>>;
    async fn release(&mut self, version: &str) -> Result<Option<ReleaseRow>>;
    async fn counts(&mut self, key: &CountKey, r: &RolloutRow, now: i64) -> Result<RolloutCounts>;
    /// Pauses a rollout automatically and records why.
    async fn halt(&mut self, key: &CountKey, reason: &str, now: i64) -> Result<()>;
    async fn write(&mut self, changes: &BatchWrites<'_>) -> Result<()>;
    async fn commit(&mut self) -> Result<()>;
}

/// What a batch writes before its commit.
pub(crate) struct BatchWrites<'a> {
    /// New or changed host records.
    pub instances: Vec<&'a InstanceRow>,
    /// Check-ins of hosts that changed nothing else (see [`crate::seen`]).
    pub touched: &'a [Touch],
    pub history: &'a [HistoryRow],
    pub grants: &'a [Grant],
    /// (machine id, version)
    pub ended_lifts: &'a [(String, String)],
}

/// A new grant: (machine id, channel, rollout group, version, at).
pub(crate) type Grant = (String, String, String, String, i64);

/// [`BatchDb`] over the store's sqlx pool (PostgreSQL).
struct SqlxBatch {
    store: Store,
    tx: Option<Tx>,
}

impl SqlxBatch {
    fn tx(&mut self) -> Result<&mut Tx> {
        self.tx
            .as_mut()
            .ok_or_else(|| anyhow!("check-in batch has no transaction"))
    }
}

impl BatchDb for SqlxBatch {
    async fn begin(&mut self) -> Result<()> {
        self.tx = None;
        self.tx = Some(self.store.begin().await?);
        Ok(())
    }

    fn config_generation(&self) -> Option<u64> {
        (self.store.backend == Backend::Sqlite).then(|| self.store.config_generation())
    }

    fn retry_conflicts(&self) -> bool {
        self.store.backend == Backend::Postgres
    }

    async fn channels(&mut self) -> Result<Vec<ChannelRow>> {
        Store::channels_in(self.tx()?).await
    }

    async fn rollouts(&mut self) -> Result<Vec<RolloutRow>> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| anyhow!("check-in batch has no transaction"))?;
        self.store.rollouts_locked(tx).await
    }

    async fn lifts(&mut self, now: i64) -> Result<Vec<LiftRow>> {
        Store::quarantine_lifts_in(self.tx()?, now).await
    }

    async fn instances(&mut self, ids: &[String]) -> Result<Vec<InstanceRow>> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| anyhow!("check-in batch has no transaction"))?;
        self.store.instances_by_ids(tx, ids).await
    }

    async fn release(&mut self, version: &str) -> Result<Option<ReleaseRow>> {
        Store::release_in(self.tx()?, version).await
    }

    async fn counts(&mut self, key: &CountKey, r: &RolloutRow, now: i64) -> Result<RolloutCounts> {
        Store::counts(
            self.tx()?,
            &key.0,
            &key.1,
            &key.2,
            &r.policy,
            r.counts_since,
            now,
        )
        .await
    }

    async fn halt(&mut self, key: &CountKey, reason: &str, now: i64) -> Result<()> {
        let tx = self.tx()?;
        Store::set_paused(tx, &key.0, &key.1, Some(reason), true).await?;
        Store::activity_in(
            tx,
            now,
            "rollout_halted",
            Some(&key.0),
            Some(&key.1),
            Some(&key.2),
            reason,
        )
        .await
    }

    async fn write(&mut self, w: &BatchWrites<'_>) -> Result<()> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| anyhow!("check-in batch has no transaction"))?;
        self.store.upsert_instances(tx, &w.instances).await?;
        self.store.touch_instances(tx, w.touched).await?;
        self.store.insert_history_many(tx, w.history).await?;
        for (machine, channel, group, version, at) in w.grants {
            Store::insert_grant(tx, machine, channel, group, version, *at).await?;
        }
        for (machine, version) in w.ended_lifts {
            Store::end_quarantine_lift(tx, machine, version).await?;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<()> {
        let tx = self
            .tx
            .take()
            .ok_or_else(|| anyhow!("check-in batch has no transaction"))?;
        tx.commit().await?;
        Ok(())
    }
}

/// What the writer listens to.
struct WriterInput {
    jobs: mpsc::Receiver<Job>,
    stop: tokio_util::sync::CancellationToken,
    stopped: oneshot::Sender<()>,
    seen: PendingSeen,
    /// Dropped when the writer ends: before `stopped` fires, or while a panic unwinds.
    running: RunningGuard,
    fast: Option<std::sync::Arc<FastPath>>,
}

async fn writer<D: BatchDb>(mut db: D, input: WriterInput) {
    let WriterInput {
        jobs: mut rx,
        stop,
        stopped,
        mut seen,
        running,
        fast,
    } = input;
    let fast = fast.as_deref();
    record_until_stopped(&mut db, &mut rx, &stop, &mut seen, fast).await;
    // Nothing is answered on the HTTP threads from here on; take what they answered.
    take_answered(fast, &mut seen, true);
    if let Err(e) = write_seen(&mut db, &mut seen, true).await {
        tracing::error!(
            error = %format!("{e:#}"),
            hosts = seen.len(),
            "cannot write the last check-ins of hosts that only checked in"
        );
    }
    drop(db);
    drop(running);
    // `db` is closed and `/healthz` fails before anyone hears that the writer stopped.
    let _ = stopped.send(());
}

/// Moves the check-ins answered on the HTTP threads into the pending ones (`close`: the writer
/// is stopping, and nothing more is answered there).
fn take_answered(fast: Option<&FastPath>, seen: &mut PendingSeen, close: bool) {
    if let Some(taken) = fast.and_then(|f| f.take(close)) {
        for (id, (last_seen, added)) in taken.hosts {
            seen.add(id, last_seen, added, taken.since);
        }
    }
}

/// Writes the pending check-ins that are due (`all`: every one) in a transaction of their own.
async fn write_seen<D: BatchDb>(db: &mut D, seen: &mut PendingSeen, all: bool) -> Result<()> {
    let now = Instant::now();
    let plan = seen.plan(&[], [], now, all);
    if !plan.writes.is_empty() {
        db.begin().await?;
        if db.config_generation().is_none() {
            // Other servers may share the database (PostgreSQL). Their batches read hosts and
            // write whole records while holding the rollout locks: take them too, so that these
            // increments never land between such a read and its write (and get overwritten).
            db.rollouts().await?;
        }
        db.write(&BatchWrites {
            instances: Vec::new(),
            touched: &plan.writes,
            history: &[],
            grants: &[],
            ended_lifts: &[],
        })
        .await?;
        db.commit().await?;
    }
    seen.apply(plan, now);
    Ok(())
}

async fn record_until_stopped<D: BatchDb>(
    db: &mut D,
    rx: &mut mpsc::Receiver<Job>,
    stop: &tokio_util::sync::CancellationToken,
    seen: &mut PendingSeen,
    fast: Option<&FastPath>,
) {
    let mut cache = ConfigCache::default();
    // When to take the check-ins answered on the HTTP threads (set when they wake the writer).
    let mut take_at: Option<Instant> = None;
    loop {
        let wake = [seen.next_due(), take_at].into_iter().flatten().min();
        let first = tokio::select! {
            biased;
            job = rx.recv() => match job {
                Some(j) => j,
                None => return,
            },
            _ = stop.cancelled() => return,
            _ = async {
                match fast {
                    Some(f) => f.wake.notified().await,
                    None => std::future::pending().await,
                }
            }, if take_at.is_none() => {
                take_at = Some(Instant::now() + crate::fast::DRAIN_LAG);
                continue;
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                let now = Instant::now();
                if take_at.is_some_and(|t| t <= now) {
                    take_at = None;
                    take_answered(fast, seen, false);
                }
                // No check-in for a while: write the ones that fell due.
                if seen.next_due().is_some_and(|t| t <= now)
                    && let Err(e) = write_seen(db, seen, false).await
                {
                    tracing::warn!(error = %format!("{e:#}"), "cannot write pending check-ins; will retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match record_batch(db, &jobs, &mut cache, seen, fast).await {
                // PostgreSQL may abort one of two crossing transactions; try again.
                Err(e) if attempt < 4 && db.retry_conflicts() => {
                    tracing::debug!(error = %e, "retrying check-in batch");
                }
                other => break other,
            }
        };
        match result {
            Ok(answers) => {
                for (job, answer) in jobs.into_iter().zip(answers) {
                    let _ = job.reply.send(Ok(answer));
                }
            }
            Err(e) if jobs.len() > 1 => {
                // Isolate the check-in that failed: record the others one by one.
                tracing::warn!(error = %format!("{e:#}"), "check-in batch failed; retrying singly");
                for job in jobs {
                    let one = std::slice::from_ref(&job);
                    let r = record_batch(db, one, &mut cache, seen, fast)
                        .await
                        .map(|mut a| a.pop().expect("one answer"));
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(anyhow!("{e:#}")));
                }
            }
        }
    }
}

/// Answers a parsed request. `codebase` is the payload URL prefix (ends with '/').
pub async fn handle(
    checkins: &Checkins,
    cfg: &OmahaConfig,
    req: Request,
    codebase: &str,
    now: DateTime<Utc>,
) -> Result<(Response, CheckinSummary)> {
    let mut resp = Response {
        protocol: omaha::PROTOCOL_VERSION.to_string(),
        server: Some(cfg.server_name.clone()),
        daystart: Some(omaha::daystart_for(now.timestamp())),
        apps: Vec::new(),
    };
    let mut summary = CheckinSummary::default();
    for app in req.apps {
        let mut out = AppResponse::ok(&app.app_id);
        out.events = app.events.len() as u32;
        out.ping = app.ping.is_some();
        if !app.app_id.eq_ignore_ascii_case(&cfg.app_id) {
            out.status = "error-unknownApplication".to_string();
            out.events = 0;
            out.ping = false;
            resp.apps.push(out);
            continue;
        }
        let machine_id = app.machine_id.as_deref().unwrap_or("").trim();
        if machine_id.is_empty()
            || machine_id.len() > 256
            || machine_id.chars().any(char::is_control)
        {
            // Nothing to record without a usable machine id (one with control characters
            // could not be shown, paged or typed back); answer politely.
            if app.update_check.is_some() {
                out.update_check = Some(UpdateCheckResponse::NoUpdate);
            }
            resp.apps.push(out);
            continue;
        }
        let answer = match checkins
            .fast
            .as_ref()
            .and_then(|f| f.answer(&app, machine_id, now))
        {
            Some(a) => a,
            None => {
                let machine_id = machine_id.to_string();
                checkins.submit(app, machine_id, codebase, now).await?
            }
        };
        summary.merge(answer.summary);
        out.update_check = answer.update_check;
        out.lift_quarantine = answer.lift_quarantine;
        resp.apps.push(out);
    }
    Ok((resp, summary))
}

fn parse_version(v: Option<&str>) -> Option<Version> {
    v.and_then(|v| Version::parse(v.trim()).ok())
}

/// (channel, rollout group, release version)
pub(crate) type CountKey = (String, String, String);

/// Everything one batch reads and changes.
struct Batch {
    channels: HashMap<String, ChannelRow>,
    rollouts: BTreeMap<(String, String), RolloutRow>,
    releases: HashMap<String, Option<ReleaseRow>>,
    /// Records as stored before this batch.
    original: HashMap<String, InstanceRow>,
    /// Records as this batch leaves them.
    current: HashMap<String, InstanceRow>,
    /// Counts from the database (state before this batch).
    db_counts: HashMap<CountKey, RolloutCounts>,
    /// New grants of this batch per (channel, rollout group).
    new_grants: HashMap<(String, String), u64>,
    history: Vec<HistoryRow>,
    grants: Vec<Grant>,
    /// Lifts being sent, by machine id (as this batch leaves them).
    lifts: HashMap<String, Vec<LiftRow>>,
    /// Lifts this batch ended: (machine id, version).
    ended_lifts: Vec<(String, String)>,
    /// Whether channels, rollouts or releases differ from what the batch started from (read
    /// again, a release read, an automatic halt); lifts changed when `ended_lifts` is not empty.
    config_changed: bool,
}

async fn record_batch<D: BatchDb>(
    db: &mut D,
    jobs: &[Job],
    cache: &mut ConfigCache,
    seen: &mut PendingSeen,
    fast: Option<&FastPath>,
) -> Result<Vec<Answer>> {
    // Before the hosts are read, so that the overlay includes them.
    take_answered(fast, seen, false);
    db.begin().await?;
    // Read after `begin`: the transaction holds SQLite's write lock now, so any admin change is
    // either committed (and its generation bump visible) or not started.
    let generation = db.config_generation();
    let fresh = generation.is_some() && cache.generation == generation;
    // Until this batch commits, the cache holds nothing reusable.
    cache.generation = None;
    if !fresh {
        cache.channels = db
            .channels()
            .await?
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        cache.rollouts = db
            .rollouts()
            .await?
            .into_iter()
            .map(|r| ((r.channel.clone(), r.group.clone()), r))
            .collect();
        cache.releases.clear();
        cache.lifts.clear();
        for l in db.lifts(jobs[0].now.timestamp()).await? {
            cache.lifts.entry(l.machine_id.clone()).or_default().push(l);
        }
    }
    let mut ids: Vec<String> = jobs.iter().map(|j| j.machine_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let original: HashMap<String, InstanceRow> = db
        .instances(&ids)
        .await?
        .into_iter()
        .map(|mut i| {
            seen.overlay(&mut i);
            (i.machine_id.clone(), i)
        })
        .collect();
    let mut b = Batch {
        channels: std::mem::take(&mut cache.channels),
        rollouts: std::mem::take(&mut cache.rollouts),
        releases: std::mem::take(&mut cache.releases),
        current: original.clone(),
        original,
        db_counts: HashMap::new(),
        new_grants: HashMap::new(),
        history: Vec::new(),
        grants: Vec::new(),
        lifts: std::mem::take(&mut cache.lifts),
        ended_lifts: Vec::new(),
        config_changed: !fresh,
    };
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        answers.push(b.checkin(db, job).await?);
    }
    let mut changed: Vec<&InstanceRow> = b.current.values().collect();
    changed.sort_by(|a, c| a.machine_id.cmp(&c.machine_id));
    let mut touched: Vec<(&InstanceRow, &InstanceRow)> = Vec::new();
    let mut rewritten: Vec<&InstanceRow> = Vec::new();
    for i in changed {
        match b.original.get(&i.machine_id) {
            Some(o) if only_seen_again(o, i) => touched.push((o, i)),
            _ => rewritten.push(i),
        }
    }
    let now = Instant::now();
    let plan = seen.plan(
        &touched,
        rewritten.iter().map(|i| i.machine_id.as_str()),
        now,
        false,
    );
    db.write(&BatchWrites {
        instances: rewritten,
        touched: &plan.writes,
        history: &b.history,
        grants: &b.grants,
        ended_lifts: &b.ended_lifts,
    })
    .await?;
    db.commit().await?;
    seen.apply(plan, now);
    if let Some(f) = fast {
        // Before any answer of this batch leaves (see `crate::fast`).
        let config = match generation {
            Some(g) if b.config_changed || !b.ended_lifts.is_empty() => Some(
                crate::fast::Config::new(g, &b.channels, &b.rollouts, &b.releases, &b.lifts),
            ),
            _ => None,
        };
        f.publish(config, b.current.values());
    }
    // Only a committed batch's view (including automatic halts) may be reused.
    cache.channels = b.channels;
    cache.rollouts = b.rollouts;
    cache.releases = b.releases;
    cache.releases.retain(|_, r| r.is_some());
    cache.lifts = b.lifts;
    cache.generation = generation;
    Ok(answers)
}

/// Whether `after` differs from `before` in `last_seen` and `checkins` only.
pub(crate) fn only_seen_again(b: &InstanceRow, a: &InstanceRow) -> bool {
    b.machine_id == a.machine_id
        && b.app_id == a.app_id
        && b.channel == a.channel
        && b.group == a.group
        && b.rollout_group == a.rollout_group
        && b.version == a.version
        && b.board == a.board
        && b.boot_id == a.boot_id
        && b.status == a.status
        && b.error_code == a.error_code
        && b.target_version == a.target_version
        && b.granted_at == a.granted_at
        && b.outcome == a.outcome
        && b.outcome_version == a.outcome_version
        && b.outcome_at == a.outcome_at
        && b.failed_version == a.failed_version
        && b.first_seen == a.first_seen
}

/// The channel, group and rollout group a check-in is filed under: the track it sends
/// (`stable` when none), the group it names, and that group again when the channel has a
/// rollout of its own for it (else "", the channel's rollout).
pub(crate) fn filing(
    app: &AppRequest,
    rollouts: &BTreeMap<(String, String), RolloutRow>,
) -> (String, String, String) {
    let channel: String = app
        .track
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or("stable")
        .chars()
        .take(64)
        .collect();
    let group: String = app.group_name().unwrap_or("").chars().take(64).collect();
    let rollout_group =
        if !group.is_empty() && rollouts.contains_key(&(channel.clone(), group.clone())) {
            group.clone()
        } else {
            String::new()
        };
    (channel, group, rollout_group)
}

/// The host's record (`current`, or a new one) with this check-in's own attributes laid over
/// it: before its events and the update decision.
pub(crate) fn checked_in(
    current: Option<&InstanceRow>,
    machine_id: &str,
    app: &AppRequest,
    (channel, group, rollout_group): (&str, &str, &str),
    ts: i64,
) -> InstanceRow {
    let mut inst = current
        .cloned()
        .unwrap_or_else(|| InstanceRow::new(machine_id, &app.app_id, channel, ts));
    inst.app_id = app.app_id.clone();
    inst.channel = channel.to_string();
    inst.group = group.to_string();
    inst.rollout_group = rollout_group.to_string();
    inst.version = app.version.clone().or(inst.version);
    inst.board = app.board.clone().or(inst.board);
    inst.boot_id = app.boot_id.clone().or(inst.boot_id);
    inst.last_seen = ts;
    inst.checkins += 1;
    inst
}

/// Whether a host with a grant in flight reports running the version it was granted (without
/// events): it has completed the update.
pub(crate) fn completes_grant(inst: &InstanceRow, app: &AppRequest) -> bool {
    is_in_flight(&inst.status)
        && inst.target_version.is_some()
        && inst.target_version == inst.version
        && app.events.is_empty()
}

/// The release a rollout serves: its pin, else the channel's release.
pub(crate) fn target_of(channel: &ChannelRow, r: &RolloutRow) -> Option<String> {
    r.policy
        .pin
        .clone()
        .or_else(|| channel.release_version.clone())
}

/// The update decision as far as it goes without counts.
pub(crate) enum FirstLook {
    /// `noupdate`, for this reason (a metrics label).
    Hold(&'static str),
    Decide(Box<Considered>),
}

/// What [`policy::decide`] was given, and what it decided over empty counts. A grant still
/// needs the counts (when the rollout has a rule that reads them); a hold stands whatever the
/// counts are.
pub(crate) struct Considered {
    pub rollout: Rollout,
    pub release: ReleaseView,
    pub host: HostView,
    pub quick: Decision,
}

/// Decides as far as possible without counts: `release` is the rollout's target release.
pub(crate) fn first_look(
    app: &AppRequest,
    inst: &InstanceRow,
    r: &RolloutRow,
    release: &ReleaseRow,
    now: DateTime<Utc>,
) -> FirstLook {
    let ts = now.timestamp();
    if let (Some(want), Some(have)) = (&release.board, &app.board)
        && want != have
    {
        return FirstLook::Hold("wrong_board");
    }
    // The host may ask to stay within a version prefix (`targetversionprefix="1.2."`).
    if let Some(prefix) = app
        .update_check
        .as_ref()
        .and_then(|u| u.target_version_prefix.as_deref())
        .filter(|p| !p.is_empty())
        && !release.version.starts_with(prefix)
    {
        return FirstLook::Hold("target_version_prefix");
    }
    let Ok(version) = Version::parse(&release.version) else {
        return FirstLook::Hold("no_release");
    };
    let rollout = Rollout {
        policy: r.policy.clone(),
        paused: r
            .paused
            .then(|| r.pause_reason.clone().unwrap_or_else(|| "paused".into())),
        started_at: r.started_at,
    };
    let host = HostView {
        machine_id: inst.machine_id.clone(),
        version: parse_version(inst.version.as_deref()),
        failed_version: parse_version(inst.failed_version.as_deref()),
        in_flight_for_target: is_in_flight(&inst.status)
            && inst.target_version.as_deref() == Some(release.version.as_str())
            && inst
                .granted_at
                .is_some_and(|g| g > ts - r.policy.in_flight_timeout_secs),
    };
    let release = ReleaseView {
        version,
        salt: release.salt.clone(),
        min_source_version: parse_version(release.min_source_version.as_deref()),
    };
    let quick = policy::decide(&rollout, &release, &host, &RolloutCounts::default(), now);
    FirstLook::Decide(Box::new(Considered {
        rollout,
        release,
        host,
        quick,
    }))
}

/// What a host record adds to the counts of `key`: (in flight, success, failure).
fn contribution(
    i: Option<&InstanceRow>,
    key: &CountKey,
    r: &RolloutRow,
    now: i64,
) -> (i64, i64, i64) {
    let Some(i) = i else { return (0, 0, 0) };
    if i.channel != key.0 || i.rollout_group != key.1 {
        return (0, 0, 0);
    }
    let in_flight = is_in_flight(&i.status)
        && i.target_version.as_deref() == Some(key.2.as_str())
        && i.granted_at
            .is_some_and(|g| g > now - r.policy.in_flight_timeout_secs);
    let counted_outcome = i.outcome_version.as_deref() == Some(key.2.as_str())
        && i.outcome_at.is_some_and(|t| t >= r.counts_since);
    let success = counted_outcome && i.outcome.as_deref() == Some("success");
    let failure = counted_outcome && i.outcome.as_deref() == Some("failure");
    (i64::from(in_flight), i64::from(success), i64::from(failure))
}

impl Batch {
    async fn release<D: BatchDb>(
        &mut self,
        db: &mut D,
        version: &str,
    ) -> Result<Option<ReleaseRow>> {
        if let Some(r) = self.releases.get(version) {
            return Ok(r.clone());
        }
        let r = db.release(version).await?;
        self.releases.insert(version.to_string(), r.clone());
        // A release that is not there is not kept either (see `record_batch`).
        self.config_changed |= r.is_some();
        Ok(r)
    }

    /// Counts for a rollout and release: the database's, plus this batch's changes.
    async fn counts<D: BatchDb>(
        &mut self,
        db: &mut D,
        key: &CountKey,
        now: i64,
    ) -> Result<RolloutCounts> {
        let r = self
            .rollouts
            .get(&(key.0.clone(), key.1.clone()))
            .cloned()
            .ok_or_else(|| anyhow!("rollout {}/{} vanished", key.0, key.1))?;
        if !self.db_counts.contains_key(key) {
            let c = db.counts(key, &r, now).await?;
            self.db_counts.insert(key.clone(), c);
        }
        let base = self.db_counts[key];
        let (mut fl, mut su, mut fa) = (
            base.in_flight as i64,
            base.successes as i64,
            base.failures as i64,
        );
        for (id, cur) in &self.current {
            let before = contribution(self.original.get(id), key, &r, now);
            let after = contribution(Some(cur), key, &r, now);
            fl += after.0 - before.0;
            su += after.1 - before.1;
            fa += after.2 - before.2;
        }
        let grants = base.grants_in_period
            + self
                .new_grants
                .get(&(key.0.clone(), key.1.clone()))
                .copied()
                .unwrap_or(0);
        Ok(RolloutCounts {
            grants_in_period: grants,
            in_flight: fl.max(0) as u64,
            successes: su.max(0) as u64,
            failures: fa.max(0) as u64,
        })
    }

    async fn halt<D: BatchDb>(
        &mut self,
        db: &mut D,
        channel: &str,
        group: &str,
        version: &str,
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let key = (channel.to_string(), group.to_string(), version.to_string());
        db.halt(&key, reason, now).await?;
        if let Some(r) = self
            .rollouts
            .get_mut(&(channel.to_string(), group.to_string()))
        {
            r.paused = true;
            r.auto_halted = true;
            r.pause_reason = Some(reason.to_string());
        }
        self.config_changed = true;
        tracing::warn!(channel, group, version, reason, "rollout halted");
        Ok(())
    }

    async fn checkin<D: BatchDb>(&mut self, db: &mut D, job: &Job) -> Result<Answer> {
        let app = &job.app;
        let now = job.now;
        let ts = now.timestamp();
        let mut summary = CheckinSummary {
            events: app.events.len() as u32,
            ..CheckinSummary::default()
        };
        let (channel, group, rollout_group) = filing(app, &self.rollouts);
        let known_channel = self.channels.contains_key(&channel);
        let mut inst = checked_in(
            self.current.get(&job.machine_id),
            &job.machine_id,
            app,
            (&channel, &group, &rollout_group),
            ts,
        );
        let history = |inst: &InstanceRow, ev: Option<&omaha::Event>| history_row(inst, ev, ts);

        if completes_grant(&inst, app) {
            inst.status = "complete".to_string();
            inst.outcome = Some("success".to_string());
            inst.outcome_version = inst.target_version.clone();
            inst.outcome_at = Some(now.timestamp_millis());
            self.history.push(history(&inst, None));
        }

        // Events first: they change what the host's status is.
        let mut failure_versions = Vec::new();
        for ev in &app.events {
            apply_event(&mut inst, ev, now.timestamp_millis());
            if ev.is_failure()
                && let Some(v) = inst.outcome_version.clone()
            {
                failure_versions.push(v);
            }
            self.history.push(history(&inst, Some(ev)));
        }
        let lift_quarantine = self.apply_lifts(&mut inst, &failure_versions, ts);
        self.current.insert(inst.machine_id.clone(), inst.clone());

        // Automatic halt, judged right when a failure arrives.
        let rkey = (channel.clone(), rollout_group.clone());
        if known_channel {
            for v in failure_versions {
                let Some(r) = self.rollouts.get(&rkey).cloned() else {
                    break;
                };
                if r.paused {
                    break;
                }
                let key = (channel.clone(), rollout_group.clone(), v.clone());
                let counts = self.counts(db, &key, ts).await?;
                if let Some(reason) = policy::halt_reason(r.policy.halt.as_ref(), &counts) {
                    self.halt(db, &channel, &rollout_group, &v, &reason, ts)
                        .await?;
                    summary.halted.push(channel.clone());
                    break;
                }
            }
        }

        let answer = |update_check, summary| Answer {
            update_check,
            lift_quarantine: lift_quarantine.clone(),
            summary,
        };
        if app.update_check.is_none() {
            return Ok(answer(None, summary));
        }
        let ch = self.channels.get(&channel).cloned();
        let r = self.rollouts.get(&rkey).cloned();
        let (Some(ch), Some(r)) = (ch, r) else {
            summary.holds.push("unknown_channel");
            return Ok(answer(Some(UpdateCheckResponse::NoUpdate), summary));
        };
        let update = self
            .decide_update(
                db,
                app,
                &mut inst,
                &ch,
                &r,
                &job.codebase,
                now,
                &mut summary,
            )
            .await?;
        Ok(answer(Some(update), summary))
    }

    /// The quarantine lifts to send to this host, ending the ones that are done: the host
    /// reports running the version, failed it again after the lift, or the lift expired. A lift
    /// still running clears the host's quarantine of its version (again: on PostgreSQL the
    /// operator's own clearing may have crossed this batch's read of the host).
    ///
    /// `failed_now` are the versions this very request reported failing: the lift was read
    /// before the request, so they are failures after it whatever their timestamps. A failure
    /// from an earlier request counts when it is at or after the lift's time (the lift is
    /// stamped after the host's last outcome).
    fn apply_lifts(
        &mut self,
        inst: &mut InstanceRow,
        failed_now: &[String],
        now: i64,
    ) -> Vec<String> {
        let Some(lifts) = self.lifts.get_mut(&inst.machine_id) else {
            return Vec::new();
        };
        let mut sent = Vec::new();
        lifts.retain(|l| {
            let failed_again = failed_now.contains(&l.version)
                || (inst.failed_version.as_deref() == Some(l.version.as_str())
                    && inst.outcome_at.is_some_and(|t| t >= l.lifted_at_ms));
            let done = l.expires_at <= now
                || inst.version.as_deref() == Some(l.version.as_str())
                || failed_again;
            if done {
                self.ended_lifts
                    .push((inst.machine_id.clone(), l.version.clone()));
                return false;
            }
            if inst.failed_version.as_deref() == Some(l.version.as_str()) {
                inst.failed_version = None;
            }
            sent.push(l.version.clone());
            true
        });
        if lifts.is_empty() {
            self.lifts.remove(&inst.machine_id);
        }
        sent
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide_update<D: BatchDb>(
        &mut self,
        db: &mut D,
        app: &AppRequest,
        inst: &mut InstanceRow,
        channel: &ChannelRow,
        r: &RolloutRow,
        codebase: &str,
        now: DateTime<Utc>,
        summary: &mut CheckinSummary,
    ) -> Result<UpdateCheckResponse> {
        let ts = now.timestamp();
        let Some(target) = target_of(channel, r) else {
            summary.holds.push("no_release");
            return Ok(UpdateCheckResponse::NoUpdate);
        };
        let Some(release) = self.release(db, &target).await? else {
            summary.holds.push("no_release");
            return Ok(UpdateCheckResponse::NoUpdate);
        };
        let (rollout, release_view, host, quick) = match first_look(app, inst, r, &release, now) {
            FirstLook::Hold(label) => {
                summary.holds.push(label);
                return Ok(UpdateCheckResponse::NoUpdate);
            }
            FirstLook::Decide(c) => (c.rollout, c.release, c.host, c.quick),
        };
        // Cheap holds first: counts are read only when they can matter.
        let needs_counts = r.policy.halt.is_some()
            || r.policy.rate_limit.is_some()
            || r.policy.max_in_flight.is_some();
        let decision = match quick {
            Decision::Grant { .. } if needs_counts => {
                let key = (r.channel.clone(), r.group.clone(), release.version.clone());
                let counts = self.counts(db, &key, ts).await?;
                policy::decide(&rollout, &release_view, &host, &counts, now)
            }
            other => other,
        };
        match decision {
            Decision::Grant { renewed, .. } => {
                summary.granted += 1;
                let offer = offer_for(&release, codebase);
                if renewed {
                    return Ok(UpdateCheckResponse::Ok(offer));
                }
                self.grants.push((
                    inst.machine_id.clone(),
                    r.channel.clone(),
                    r.group.clone(),
                    release.version.clone(),
                    ts,
                ));
                *self
                    .new_grants
                    .entry((r.channel.clone(), r.group.clone()))
                    .or_default() += 1;
                inst.status = "granted".into();
                inst.target_version = Some(release.version.clone());
                inst.granted_at = Some(ts);
                inst.error_code = None;
                inst.outcome = None;
                inst.outcome_version = None;
                inst.outcome_at = None;
                self.history.push(history_row(inst, None, ts));
                self.current.insert(inst.machine_id.clone(), inst.clone());
                Ok(UpdateCheckResponse::Ok(offer))
            }
            Decision::Hold(Hold::HaltTriggered(reason)) => {
                self.halt(db, &r.channel, &r.group, &release.version, &reason, ts)
                    .await?;
                summary.halted.push(r.channel.clone());
                summary.holds.push("halted");
                Ok(UpdateCheckResponse::NoUpdate)
            }
            Decision::Hold(hold) => {
                summary.holds.push(hold.label());
                Ok(UpdateCheckResponse::NoUpdate)
            }
        }
    }
}

/// A status history entry for the host's record as it is now, with the event that changed it.
fn history_row(inst: &InstanceRow, ev: Option<&omaha::Event>, at: i64) -> HistoryRow {
    HistoryRow {
        at,
        machine_id: inst.machine_id.clone(),
        channel: inst.channel.clone(),
        group: inst.group.clone(),
        version: inst.version.clone(),
        target_version: inst.target_version.clone(),
        status: inst.status.clone(),
        event_type: ev.map(|e| i64::from(e.event_type)),
        event_result: ev.map(|e| i64::from(e.event_result)),
        error_code: ev.and_then(|e| e.error_code),
    }
}

/// Applies one event to the host's record.
fn apply_event(inst: &mut InstanceRow, ev: &omaha::Event, now_ms: i64) {
    let target = inst.target_version.clone().or(inst.version.clone());
    if ev.is_failure() {
        let rollback = ev.error_code == Some(omaha::error_code::ROLLBACK);
        inst.status = if rollback { "rolled_back" } else { "error" }.to_string();
        inst.error_code = ev.error_code;
        inst.outcome = Some("failure".to_string());
        inst.outcome_version = target.clone();
        inst.outcome_at = Some(now_ms);
        inst.failed_version = target;
        return;
    }
    match (ev.event_type, ev.event_result) {
        (event_type::DOWNLOAD_STARTED, _) => inst.status = "downloading".into(),
        (event_type::DOWNLOAD_FINISHED, _) => inst.status = "downloaded".into(),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS) => inst.status = "installed".into(),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS_REBOOT) => {
            inst.status = "complete".into();
            inst.error_code = None;
            inst.outcome = Some("success".to_string());
            inst.outcome_version = inst.version.clone().or(target);
            inst.outcome_at = Some(now_ms);
        }
        (_, event_result::DEFERRED) => inst.status = "deferred".into(),
        _ => {}
    }
}

/// The package name a release is served under: its SHA-256 plus `.bundle`.
pub fn package_name(release: &ReleaseRow) -> String {
    format!("{}.bundle", release.sha256)
}

/// The `<updatecheck status="ok">` contents for a release.
pub fn offer_for(release: &ReleaseRow, codebase: &str) -> UpdateOffer {
    let sha256_b64 = hex::decode(&release.sha256)
        .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
        .unwrap_or_default();
    UpdateOffer {
        urls: vec![codebase.to_string()],
        version: release.version.clone(),
        packages: vec![Package {
            name: package_name(release),
            size: release.size as u64,
            hash_sha1_base64: Some(release.sha1_base64.clone()),
            hash_sha256_hex: Some(release.sha256.clone()),
            required: true,
        }],
        actions: vec![Action {
            event: "postinstall".into(),
            sha256_base64: Some(sha256_b64),
            disable_payload_backoff: Some(true),
        }],
    }
}
