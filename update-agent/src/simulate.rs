//! The fleet simulator: N instances of the real agent core ([`Agent`]) in one process, each a
//! tokio task with its own machine id, in-memory A/B slots and state, talking real HTTP (Omaha,
//! FleetLock) to a real update-server and reboot-coordinator.
//!
//! What is simulated, and how:
//! - **disk**: a [`MemorySlotTable`] per host; the slot bytes are dropped once an install is
//!   verified (the boot is simulated, only the slot attributes matter afterwards), so memory stays
//!   bounded by the installs running at once.
//! - **download**: each payload URL is fetched over real HTTP **once** per simulator process (the
//!   first host that needs it); every host then runs the real install pipeline (signature and
//!   digest verification, decompression, write, read-back) from that shared copy. Thousands of
//!   real downloads of the same bundle would measure the loopback, not the rollout.
//! - **reboot**: the agent's reboot request ends the task's current "boot"; after
//!   `--reboot-secs` the boot selector rule ([`sim::boot`]) picks a slot on the host's slot table,
//!   a release configured to panic at boot consumes its try and the selector runs again, then a
//!   new [`Agent`] starts on the chosen slot (new boot id), as after a real reboot.
//! - **health**: per release, a share of hosts (optionally only of one board) fails its required
//!   post-boot check or panics at boot (`--health '2.0.0:fail=30%'`,
//!   `--health '2.1.0:panic=100%,board=X'`).
//! - **time**: every simulator delay (poll interval, reboot, lock retries, settle time) is given
//!   in simulated seconds and divided by `--time-scale`. The server is not scaled: its ramp
//!   durations are real seconds (use short ramps or step policies in scenarios).

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use twinroot_format::keyring::Keyring;
use twinroot_format::omaha;
use twinroot_format::slot::{SlotAttrs, SlotName};

use crate::agent::{
    Agent, AgentPolicy, BootOutcome, CheckOutcome, HealthChecks, Host, Identity, RebootDecision,
    SourceFactory,
};
use crate::apply::{BundleSource, InstallPolicy};
use crate::config::RebootStrategy;
use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::health::{CheckResult, HealthReport, Outcome, Requirement};
use crate::net::{FleetLockClient, HttpOmaha, OmahaTransport, RebootLock};
use crate::reboot::{Clock, Rebooter};
use crate::sim::{self, MemorySource};
use crate::slots::{BootedSlot, MemorySlotTable};
use crate::state::{MemoryStateStore, PersistentState, StateStore};

// ----------------------------------------------------------------------------------------------
// Options

/// What a release does on some hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// The required post-boot check fails (the agent marks the slot bad and goes back).
    Fail,
    /// The kernel panics at boot (the selector falls back once the tries are used).
    Panic,
}

/// `VERSION:fail=P%[,board=B]` or `VERSION:panic=P%[,board=B]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthRule {
    pub version: String,
    pub kind: FailKind,
    pub percent: f64,
    pub board: Option<String>,
}

fn parse_percent(s: &str, what: &str) -> anyhow::Result<f64> {
    let p: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| anyhow!("{what}: {s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&p) {
        bail!("{what}: {p} is not between 0 and 100");
    }
    Ok(p)
}

impl FromStr for HealthRule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let what = format!("--health {s:?}");
        let (version, rest) = s
            .split_once(':')
            .ok_or_else(|| anyhow!("{what}: expected VERSION:fail=P% or VERSION:panic=P%"))?;
        semver::Version::parse(version.trim())
            .map_err(|e| anyhow!("{what}: version {version:?}: {e}"))?;
        let mut kind = None;
        let mut percent = None;
        let mut board = None;
        for part in rest.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("{what}: {part:?} is not KEY=VALUE"))?;
            match k.trim() {
                "fail" => {
                    kind = Some(FailKind::Fail);
                    percent = Some(parse_percent(v, &what)?);
                }
                "panic" => {
                    kind = Some(FailKind::Panic);
                    percent = Some(parse_percent(v, &what)?);
                }
                "board" => board = Some(v.trim().to_string()),
                other => bail!("{what}: unknown key {other:?} (fail, panic, board)"),
            }
        }
        Ok(HealthRule {
            version: version.trim().to_string(),
            kind: kind.ok_or_else(|| anyhow!("{what}: needs fail=P% or panic=P%"))?,
            percent: percent.unwrap_or(100.0),
            board,
        })
    }
}

/// `BOARD=P%`: that share of the hosts reports this board.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BoardShare {
    pub board: String,
    pub percent: f64,
}

impl FromStr for BoardShare {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let what = format!("--board-share {s:?}");
        let (b, p) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("{what}: expected BOARD=P%"))?;
        if b.trim().is_empty() {
            bail!("{what}: empty board name");
        }
        Ok(BoardShare {
            board: b.trim().to_string(),
            percent: parse_percent(p, &what)?,
        })
    }
}

/// Everything one simulation run needs.
#[derive(Clone)]
pub struct SimOptions {
    pub hosts: usize,
    /// Omaha endpoint (a bare `http://host:port` gets `/v1/update/`).
    pub server: String,
    /// FleetLock base URL; without it the hosts reboot immediately.
    pub coordinator: Option<String>,
    pub channel: String,
    /// Omaha rollout group and FleetLock group (`default` for FleetLock when unset).
    pub group: Option<String>,
    /// Each host sends its board as its Omaha rollout group (hosts without a board send
    /// `group`), so a per-group policy can treat boards apart. The FleetLock group stays `group`.
    pub group_by_board: bool,
    pub health: Vec<HealthRule>,
    pub boards: Vec<BoardShare>,
    pub time_scale: f64,
    pub keyring: Keyring,
    pub app_id: String,
    /// The version every host runs at the start (slot A, good).
    pub initial_version: semver::Version,
    /// Simulated seconds between update checks (+-10% jitter); the first check falls in
    /// `[0, interval)`.
    pub interval: Duration,
    /// Simulated duration of a reboot.
    pub reboot: Duration,
    /// Stop after this much simulated time at the latest.
    pub max_duration: Duration,
    /// Stop once no host is busy (staged, rebooting, holding a reboot slot) and nothing happened
    /// for this long (simulated).
    pub settle: Duration,
    /// Stop as soon as every host runs this version (and no host is busy).
    pub until_all_on: Option<String>,
    /// Agent steps (check, install, boot assessment) running at once.
    pub parallel: usize,
    /// Boot tries given to a new slot.
    pub tries: u8,
    /// Machine ids derive from this.
    pub seed: String,
}

impl SimOptions {
    pub fn new(hosts: usize, server: &str, keyring: Keyring) -> Self {
        SimOptions {
            hosts,
            server: server.to_string(),
            coordinator: None,
            channel: "stable".into(),
            group: None,
            group_by_board: false,
            health: Vec::new(),
            boards: Vec::new(),
            time_scale: 1.0,
            keyring,
            app_id: omaha::FLATCAR_APP_ID.to_string(),
            initial_version: semver::Version::new(1, 0, 0),
            interval: Duration::from_secs(10),
            reboot: Duration::from_secs(2),
            max_duration: Duration::from_secs(3600),
            settle: Duration::from_secs(30),
            until_all_on: None,
            parallel: 32,
            tries: 1,
            seed: "twinroot-sim".into(),
        }
    }

    fn omaha_url(&self) -> String {
        let s = self.server.trim_end_matches('/');
        let after_scheme = s.split_once("://").map(|(_, r)| r).unwrap_or(s);
        if after_scheme.contains('/') {
            self.server.clone()
        } else {
            format!("{s}/v1/update/")
        }
    }

    fn real(&self, sim: Duration) -> Duration {
        sim.div_f64(self.time_scale.max(1e-6))
    }
}

mod report;
pub use report::{
    BoardSummary, Report, TimelineEvent, VersionSummary, count_reboots, summarize,
    summarize_boards, summarize_hosts,
};

// ----------------------------------------------------------------------------------------------
// Shared run state

struct Ctx {
    opts: SimOptions,
    rt: Handle,
    client: reqwest::Client,
    start: Instant,
    timeline: Mutex<Vec<TimelineEvent>>,
    /// Real milliseconds since start of the last event.
    last_change_ms: AtomicU64,
    lock_holders: AtomicUsize,
    max_lock_holders: AtomicUsize,
    rebooting: AtomicUsize,
    max_rebooting: AtomicUsize,
    checks: AtomicU64,
    check_errors: AtomicU64,
    lock_busy: AtomicU64,
    /// Per host: staged, rebooting or holding a slot.
    busy: Vec<AtomicBool>,
    /// Per host: the version running now.
    running: Mutex<Vec<String>>,
    stop: AtomicBool,
    stop_notify: tokio::sync::Notify,
    steps: tokio::sync::Semaphore,
    bundles: BundleCache,
}

impl Ctx {
    fn sim_now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.opts.time_scale
    }

    fn record(&self, host: usize, event: &'static str, version: &str, detail: String) {
        let t = self.sim_now();
        self.last_change_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::SeqCst);
        if event == "booted" {
            self.running.lock().expect("running lock")[host] = version.to_string();
        }
        self.timeline
            .lock()
            .expect("timeline lock")
            .push(TimelineEvent {
                t,
                host,
                event,
                version: version.to_string(),
                detail,
            });
    }

    async fn sleep_sim(&self, sim: Duration) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(self.opts.real(sim)) => !self.stop.load(Ordering::SeqCst),
            _ = self.stop_notify.notified() => false,
        }
    }
}

fn bump_max(current: &AtomicUsize, max: &AtomicUsize) {
    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
    max.fetch_max(now, Ordering::SeqCst);
}

/// One payload, fetched by the first host that needs it.
type Payload = Arc<tokio::sync::OnceCell<Arc<Vec<u8>>>>;

/// Payloads fetched once per URL over real HTTP, shared by every host.
#[derive(Default)]
struct BundleCache {
    bundles: Mutex<HashMap<String, Payload>>,
}

struct CachedSources {
    ctx: Arc<Ctx>,
}

impl SourceFactory for CachedSources {
    fn open(&mut self, url: &str) -> AgentResult<Box<dyn BundleSource>> {
        let cell = self
            .ctx
            .bundles
            .bundles
            .lock()
            .expect("bundle cache lock")
            .entry(url.to_string())
            .or_default()
            .clone();
        let client = self.ctx.client.clone();
        let u = url.to_string();
        let bytes = self.ctx.rt.block_on(async move {
            cell.get_or_try_init(|| async {
                let resp = client.get(&u).send().await.map_err(|e| {
                    AgentError::new(ErrorKind::Network, format!("{u}: download: {e}"))
                })?;
                if !resp.status().is_success() {
                    return Err(AgentError::new(
                        ErrorKind::HttpStatus(resp.status().as_u16()),
                        format!("{u}: server answered HTTP {}", resp.status()),
                    ));
                }
                let b = resp.bytes().await.map_err(|e| {
                    AgentError::new(ErrorKind::Network, format!("{u}: download: {e}"))
                })?;
                tracing::info!(url = %u, bytes = b.len(), "payload downloaded for the simulated fleet");
                Ok(Arc::new(b.to_vec()))
            })
            .await
            .cloned()
        })?;
        Ok(Box::new(MemorySource {
            name: url.to_string(),
            bytes,
        }))
    }
}

/// Adds the rollout group to every Omaha request.
struct GroupOmaha {
    inner: HttpOmaha,
    group: Option<String>,
}

impl OmahaTransport for GroupOmaha {
    fn exchange(&mut self, request: &omaha::Request) -> AgentResult<omaha::Response> {
        match &self.group {
            None => self.inner.exchange(request),
            Some(g) => {
                let mut r = request.clone();
                for app in &mut r.apps {
                    app.group = Some(g.clone());
                }
                self.inner.exchange(&r)
            }
        }
    }
    fn probe(&mut self) -> AgentResult<()> {
        self.inner.probe()
    }
}

/// Counts reboot-slot holders: up from a granted answer, down before asking to release, so the
/// count is never above what the coordinator granted.
struct CountingLock {
    inner: FleetLockClient,
    ctx: Arc<Ctx>,
    host: usize,
    held: bool,
    /// Asked to release; not acknowledged yet.
    releasing: bool,
}

impl RebootLock for CountingLock {
    fn pre_reboot(&mut self) -> AgentResult<()> {
        match self.inner.pre_reboot() {
            Ok(()) => {
                if !self.held {
                    self.held = true;
                    bump_max(&self.ctx.lock_holders, &self.ctx.max_lock_holders);
                    self.ctx
                        .record(self.host, "lock_granted", "", String::new());
                }
                Ok(())
            }
            Err(e) => {
                self.ctx.lock_busy.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn steady_state(&mut self) -> AgentResult<()> {
        // A host stops counting as a holder once it asks to release; a release that failed
        // (e.g. the coordinator died after committing it) is retried without counting the host
        // again, so the count is never above what the coordinator granted.
        if std::mem::take(&mut self.held) {
            self.ctx.lock_holders.fetch_sub(1, Ordering::SeqCst);
            self.releasing = true;
        }
        let r = self.inner.steady_state();
        if r.is_ok() && std::mem::take(&mut self.releasing) {
            self.ctx
                .record(self.host, "lock_released", "", String::new());
        }
        r
    }
}

/// The reboot is done by the host task once the agent asked for it.
struct FlagRebooter(Arc<AtomicBool>);

impl Rebooter for FlagRebooter {
    fn reboot(&mut self) -> AgentResult<()> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Wall clock running `time_scale` times faster from the start of the run.
struct ScaledClock {
    start_unix_ms: i64,
    start: Instant,
    scale: f64,
}

impl Clock for ScaledClock {
    fn now(&self) -> jiff::Timestamp {
        let ms =
            self.start_unix_ms + (self.start.elapsed().as_secs_f64() * self.scale * 1000.0) as i64;
        jiff::Timestamp::from_millisecond(ms).unwrap_or_default()
    }
}

/// The configured health outcome for one host and release.
fn fate(
    opts: &SimOptions,
    machine_id: &str,
    board: Option<&str>,
    version: &str,
) -> Option<FailKind> {
    opts.health
        .iter()
        .filter(|r| r.version == version)
        .filter(|r| r.board.is_none() || r.board.as_deref() == board)
        .find(|r| unit(&format!("{machine_id}/{version}/{:?}", r.kind)) * 100.0 < r.percent)
        .map(|r| r.kind)
}

/// A number in [0, 1) from a string (stable across runs).
fn unit(s: &str) -> f64 {
    let h = Sha256::digest(s.as_bytes());
    u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) as f64 / (u64::MAX as f64 + 1.0)
}

struct SimChecks {
    fails: bool,
    version: String,
}

impl HealthChecks for SimChecks {
    fn run(&mut self) -> HealthReport {
        HealthReport {
            results: vec![CheckResult {
                name: "simulated-service".into(),
                requirement: Requirement::Required,
                outcome: if self.fails {
                    Outcome::Failed(format!("simulated failure of release {}", self.version))
                } else {
                    Outcome::Passed
                },
                stdout: String::new(),
                stderr: String::new(),
                duration: Duration::ZERO,
            }],
        }
    }
}

// ----------------------------------------------------------------------------------------------
// One host

struct HostSpec {
    idx: usize,
    machine_id: String,
    board: Option<String>,
}

/// The machine id of simulated host `idx` under `seed` (what the server's records are keyed by).
pub fn machine_id(seed: &str, idx: usize) -> String {
    hex::encode(&Sha256::digest(format!("{seed}/{idx}").as_bytes())[..16])
}

fn host_spec(opts: &SimOptions, idx: usize) -> HostSpec {
    let machine_id = machine_id(&opts.seed, idx);
    // Boards by share, in order, from a per-host number.
    let u = unit(&format!("{machine_id}/board")) * 100.0;
    let mut acc = 0.0;
    let mut board = None;
    for b in &opts.boards {
        acc += b.percent;
        if u < acc {
            board = Some(b.board.clone());
            break;
        }
    }
    HostSpec {
        idx,
        machine_id,
        board,
    }
}

/// Runs one step of the agent on the blocking pool (the core is synchronous). `None` when the
/// run stopped while the step waited for its turn (it is not run then).
/// The daemon's post-boot step: judge the boot, and reboot back at once if it was bad.
fn post_boot(a: &mut Agent) -> AgentResult<BootOutcome> {
    let o = a.after_boot();
    if let Ok(BootOutcome::MarkedBad { .. }) = &o {
        let _ = a.reboot_if_due(true);
    }
    o
}

async fn step<T: Send + 'static>(
    ctx: &Ctx,
    mut agent: Agent,
    f: impl FnOnce(&mut Agent) -> T + Send + 'static,
) -> Option<(Agent, T)> {
    if ctx.stop.load(Ordering::SeqCst) {
        return None;
    }
    let _permit = tokio::select! {
        p = ctx.steps.acquire() => p.expect("semaphore open"),
        _ = ctx.stop_notify.notified() => return None,
    };
    if ctx.stop.load(Ordering::SeqCst) {
        return None;
    }
    let done = tokio::task::spawn_blocking(move || {
        let r = f(&mut agent);
        (agent, r)
    })
    .await
    .expect("agent step panicked");
    Some(done)
}

fn new_agent(
    ctx: &Arc<Ctx>,
    spec: &HostSpec,
    host: Host,
    booted: SlotName,
    version: &semver::Version,
    boot: u32,
    rebooted: Arc<AtomicBool>,
) -> Agent {
    let mut host = host;
    host.rebooter = Box::new(FlagRebooter(rebooted));
    host.checks = Box::new(SimChecks {
        fails: fate(
            &ctx.opts,
            &spec.machine_id,
            spec.board.as_deref(),
            &version.to_string(),
        ) == Some(FailKind::Fail),
        version: version.to_string(),
    });
    let identity = Identity {
        app_id: ctx.opts.app_id.clone(),
        track: ctx.opts.channel.clone(),
        machine_id: spec.machine_id.clone(),
        boot_id: format!("{{{}-{boot}}}", &spec.machine_id[..8]),
        board: spec.board.clone(),
    };
    let policy = AgentPolicy {
        install: InstallPolicy {
            current_version: version.clone(),
            allow_downgrade: false,
            board: spec.board.clone(),
            tries: ctx.opts.tries,
            download_retries: 0,
            retry_base: Duration::from_millis(100),
            checkpoint_every: 1 << 30,
            readback_from_medium: false,
        },
        strategy: if ctx.opts.coordinator.is_some() {
            RebootStrategy::Coordinated
        } else {
            RebootStrategy::Immediate
        },
        windows: Vec::new(),
        check_server_reachable: true,
        // Ten check intervals, at most the daemon's default of five minutes (simulated time).
        server_reachable_grace: (ctx.opts.interval * 10).min(Duration::from_secs(300)),
    };
    Agent::new(
        host,
        BootedSlot::new(booted),
        identity,
        policy,
        ctx.opts.keyring.clone(),
    )
}

/// A reboot slot still held on a steady boot: its release failed and must be retried.
fn lock_left_held(agent: &mut Agent) -> bool {
    agent
        .state()
        .map(|s| s.staged.is_none() && s.reboot_lock_held)
        .unwrap_or(false)
}

/// The delay before the next update check after `failures` failed ones in a row: the daemon's
/// rule (`daemon::next_check_delay`) with its default ratios to the interval (first retry
/// after 120/2700 of it, doubling up to 14400/2700 of it).
fn check_delay(interval: Duration, failures: u32, unit: f64) -> Duration {
    let s = crate::config::ServerSettings {
        url: None,
        app_id: String::new(),
        track: String::new(),
        first_check_min: interval.mul_f64(120.0 / 2700.0),
        first_check_max: interval,
        interval,
        jitter: interval / 10,
        max_backoff: interval.mul_f64(14400.0 / 2700.0),
        download_retries: 0,
        timeout: Duration::from_secs(30),
    };
    crate::daemon::next_check_delay(&s, false, failures, unit)
}

fn is_busy(agent: &mut Agent) -> bool {
    agent
        .state()
        .map(|s| s.staged.is_some() || s.reboot_lock_held)
        .unwrap_or(true)
}

async fn run_host(ctx: Arc<Ctx>, spec: HostSpec) -> anyhow::Result<()> {
    let i = spec.idx;
    let opts = &ctx.opts;
    let mut table = MemorySlotTable::new(1 << 40);
    table.attrs[SlotName::A.index()] = SlotAttrs {
        priority: 1,
        tries: 0,
        successful: true,
    };
    let slot_data = table.data.clone();
    let mut state = PersistentState::default();
    state
        .slot_versions
        .insert(SlotName::A.to_string(), opts.initial_version.to_string());
    let mut store = MemoryStateStore::default();
    store.save(&state)?;
    let lock: Option<Box<dyn RebootLock>> = opts.coordinator.as_ref().map(|url| {
        Box::new(CountingLock {
            inner: FleetLockClient {
                client: ctx.client.clone(),
                rt: ctx.rt.clone(),
                base_url: url.clone(),
                id: spec.machine_id.clone(),
                group: opts.group.clone().unwrap_or_else(|| "default".into()),
            },
            ctx: ctx.clone(),
            host: i,
            held: false,
            releasing: false,
        }) as Box<dyn RebootLock>
    });
    let start_unix_ms = jiff::Timestamp::now().as_millisecond();
    let mut host = Host {
        slots: Box::new(table),
        store: Box::new(store),
        omaha: Some(Box::new(GroupOmaha {
            inner: HttpOmaha {
                client: ctx.client.clone(),
                rt: ctx.rt.clone(),
                url: opts.omaha_url(),
            },
            group: if opts.group_by_board {
                spec.board.clone().or_else(|| opts.group.clone())
            } else {
                opts.group.clone()
            },
        })),
        sources: Box::new(CachedSources { ctx: ctx.clone() }),
        lock,
        rebooter: Box::new(FlagRebooter(Arc::new(AtomicBool::new(false)))),
        clock: Box::new(ScaledClock {
            start_unix_ms,
            start: ctx.start,
            scale: opts.time_scale,
        }),
        checks: Box::new(SimChecks {
            fails: false,
            version: String::new(),
        }),
    };
    let mut booted = SlotName::A;
    let mut version = opts.initial_version.clone();
    let mut boot = 0u32;
    let jitter = |base: Duration| base.mul_f64(0.9 + 0.2 * fastrand::f64());
    let mut first_delay = opts.interval.mul_f64(fastrand::f64());
    let mut check_failures = 0u32;
    loop {
        boot += 1;
        let rebooted = Arc::new(AtomicBool::new(false));
        let agent = new_agent(&ctx, &spec, host, booted, &version, boot, rebooted.clone());
        let Some((mut agent, mut outcome)) = step(&ctx, agent, post_boot).await else {
            return Ok(());
        };
        // The server was down at boot: the agent keeps the boot pending and checks again.
        while let Ok(BootOutcome::ChecksPending { retry_in, .. }) = &outcome {
            tokio::select! {
                _ = tokio::time::sleep(opts.real(*retry_in)) => {}
                _ = ctx.stop_notify.notified() => return Ok(()),
            }
            let Some(next) = step(&ctx, agent, post_boot).await else {
                return Ok(());
            };
            (agent, outcome) = next;
        }
        match &outcome {
            Ok(BootOutcome::MarkedGood { version: v }) => ctx.record(i, "good", v, String::new()),
            Ok(BootOutcome::MarkedBad { version: v, reason }) => {
                ctx.record(i, "bad", v, reason.clone())
            }
            Ok(BootOutcome::RolledBack { version: v }) => {
                ctx.record(i, "rolled_back", v, format!("back on {version}"))
            }
            Ok(_) => {}
            Err(e) => ctx.record(i, "boot_error", &version.to_string(), e.to_string()),
        }
        ctx.busy[i].store(is_busy(&mut agent), Ordering::SeqCst);

        // Poll until the agent reboots (or the run stops), as the daemon does: a check every
        // interval (the daemon's backoff after failed checks), a reboot attempt after each check
        // while an update is staged or a reboot slot is still held (a release that failed, e.g.
        // while the coordinator was down, is retried), backing off while the slot is refused.
        let mut next_check = Instant::now() + opts.real(first_delay);
        let mut next_reboot_try: Option<Instant> =
            lock_left_held(&mut agent).then(|| Instant::now() + opts.real(opts.interval / 10));
        let mut lock_failures = 0u32;
        while !rebooted.load(Ordering::SeqCst) {
            let wake = next_reboot_try.map_or(next_check, |r| r.min(next_check));
            let now = Instant::now();
            if wake > now {
                if ctx.stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(wake - now) => {}
                    _ = ctx.stop_notify.notified() => return Ok(()),
                }
            }
            if ctx.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            if Instant::now() >= next_check {
                let Some((a, r)) = step(&ctx, agent, |a| a.check()).await else {
                    return Ok(());
                };
                agent = a;
                ctx.checks.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(o) => {
                        check_failures = 0;
                        if let CheckOutcome::Installed { version: v } = o {
                            // The slot bytes were verified; the simulated boot only needs the
                            // attributes, so give the memory back.
                            for d in &slot_data {
                                let mut g = d.lock().expect("slot lock");
                                g.clear();
                                g.shrink_to_fit();
                            }
                            ctx.record(i, "installed", &v, String::new());
                        }
                    }
                    Err(e) => {
                        check_failures += 1;
                        ctx.check_errors.fetch_add(1, Ordering::Relaxed);
                        ctx.record(i, "check_error", "", e.to_string());
                    }
                }
                let busy = is_busy(&mut agent);
                ctx.busy[i].store(busy, Ordering::SeqCst);
                if busy {
                    next_reboot_try.get_or_insert_with(Instant::now);
                }
                next_check = Instant::now()
                    + opts.real(check_delay(opts.interval, check_failures, fastrand::f64()));
            }
            if next_reboot_try.is_some_and(|t| Instant::now() >= t) {
                let Some((a, r)) = step(&ctx, agent, |a| {
                    a.retry_release();
                    a.reboot_if_due(false)
                })
                .await
                else {
                    return Ok(());
                };
                agent = a;
                // Exponential from a tenth of the interval, capped at the interval.
                let backoff = |failures: u32| {
                    let d = opts
                        .interval
                        .div_f64(10.0)
                        .saturating_mul(1 << failures.saturating_sub(1).min(10))
                        .min(opts.interval);
                    Instant::now() + opts.real(jitter(d))
                };
                next_reboot_try = match r {
                    Ok(RebootDecision::Rebooted) => None,
                    Ok(RebootDecision::LockBusy(_)) => {
                        lock_failures += 1;
                        Some(backoff(lock_failures))
                    }
                    Ok(RebootDecision::WaitForWindow(d)) => Some(Instant::now() + opts.real(d)),
                    Ok(_) if lock_left_held(&mut agent) => {
                        lock_failures += 1;
                        Some(backoff(lock_failures))
                    }
                    Ok(_) => None,
                    Err(e) => {
                        ctx.record(i, "reboot_error", "", e.to_string());
                        Some(Instant::now() + opts.real(opts.interval))
                    }
                };
                if next_reboot_try.is_none() {
                    lock_failures = 0;
                }
                ctx.busy[i].store(is_busy(&mut agent), Ordering::SeqCst);
            }
        }

        // The simulated reboot.
        let staged = agent.state().ok().and_then(|s| s.staged);
        ctx.record(
            i,
            "reboot",
            &staged.map(|s| s.version).unwrap_or_default(),
            String::new(),
        );
        host = agent.host;
        ctx.busy[i].store(true, Ordering::SeqCst);
        bump_max(&ctx.rebooting, &ctx.max_rebooting);
        let chosen = loop {
            if !ctx.sleep_sim(opts.reboot).await {
                ctx.rebooting.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            }
            let Some(slot) = sim::boot(&mut *host.slots).map_err(|e| anyhow!("host {i}: {e}"))?
            else {
                ctx.record(i, "unbootable", "", "no bootable slot".into());
                ctx.rebooting.fetch_sub(1, Ordering::SeqCst);
                return Ok(());
            };
            let v = host
                .store
                .load()?
                .slot_versions
                .get(&slot.to_string())
                .cloned()
                .ok_or_else(|| anyhow!("host {i}: no version recorded for slot {slot}"))?;
            if fate(opts, &spec.machine_id, spec.board.as_deref(), &v) == Some(FailKind::Panic) {
                ctx.record(i, "panic", &v, format!("slot {slot}"));
                continue;
            }
            break (slot, v);
        };
        ctx.rebooting.fetch_sub(1, Ordering::SeqCst);
        booted = chosen.0;
        version = semver::Version::parse(&chosen.1)
            .with_context(|| format!("host {i}: slot version {:?}", chosen.1))?;
        ctx.record(i, "booted", &chosen.1, format!("slot {booted}"));
        // After a reboot the agent starts, then polls after a short random delay.
        first_delay = opts.interval.mul_f64(fastrand::f64() * 0.5);
    }
}

// ----------------------------------------------------------------------------------------------
// The run

/// Runs the fleet until it settles (or a stop condition) and returns the report. Must be called
/// on a multi-threaded tokio runtime.
pub async fn run(opts: SimOptions) -> anyhow::Result<Report> {
    if opts.hosts == 0 {
        bail!("--hosts must be at least 1");
    }
    if opts.time_scale <= 0.0 || !opts.time_scale.is_finite() {
        bail!("--time-scale must be a positive number");
    }
    let share: f64 = opts.boards.iter().map(|b| b.percent).sum();
    if share > 100.0 + 1e-9 {
        bail!("--board-share adds up to {share}%, more than 100%");
    }
    let client =
        crate::net::http_client(Duration::from_secs(30)).map_err(|e| anyhow!("{}", e.message))?;
    let ctx = Arc::new(Ctx {
        rt: Handle::current(),
        client,
        start: Instant::now(),
        timeline: Mutex::new(Vec::new()),
        last_change_ms: AtomicU64::new(0),
        lock_holders: AtomicUsize::new(0),
        max_lock_holders: AtomicUsize::new(0),
        rebooting: AtomicUsize::new(0),
        max_rebooting: AtomicUsize::new(0),
        checks: AtomicU64::new(0),
        check_errors: AtomicU64::new(0),
        lock_busy: AtomicU64::new(0),
        busy: (0..opts.hosts).map(|_| AtomicBool::new(false)).collect(),
        running: Mutex::new(vec![opts.initial_version.to_string(); opts.hosts]),
        stop: AtomicBool::new(false),
        stop_notify: tokio::sync::Notify::new(),
        steps: tokio::sync::Semaphore::new(opts.parallel.max(1)),
        bundles: BundleCache::default(),
        opts: opts.clone(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.hosts {
        let spec = host_spec(&opts, i);
        let ctx = ctx.clone();
        tasks.spawn(async move { run_host(ctx, spec).await.map_err(|e| (i, e)) });
    }
    let poll = Duration::from_millis(50);
    let ended = loop {
        tokio::time::sleep(poll).await;
        if let Some(Ok(Err((i, e)))) = tasks.try_join_next() {
            ctx.stop.store(true, Ordering::SeqCst);
            ctx.stop_notify.notify_waiters();
            return Err(e.context(format!("simulated host {i}")));
        }
        let sim = ctx.sim_now();
        if sim >= opts.max_duration.as_secs_f64() {
            break "max_duration";
        }
        let busy = ctx.busy.iter().any(|b| b.load(Ordering::SeqCst));
        if busy {
            continue;
        }
        if let Some(v) = &opts.until_all_on
            && ctx
                .running
                .lock()
                .expect("running lock")
                .iter()
                .all(|r| r == v)
        {
            break "all_on_version";
        }
        let quiet_ms =
            ctx.start.elapsed().as_millis() as u64 - ctx.last_change_ms.load(Ordering::SeqCst);
        if Duration::from_millis(quiet_ms) >= opts.real(opts.settle) {
            break "settled";
        }
    };
    let real_secs = ctx.start.elapsed().as_secs_f64();
    ctx.stop.store(true, Ordering::SeqCst);
    ctx.stop_notify.notify_waiters();
    // Tasks wake from their sleeps or their wait for a step; one inside an agent step finishes
    // that step first.
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err((i, e))) = r {
            return Err(e.context(format!("simulated host {i}")));
        }
    }
    let timeline = std::mem::take(&mut *ctx.timeline.lock().expect("timeline lock"));
    let initial = opts.initial_version.to_string();
    let (versions, _) = summarize(opts.hosts, &initial, &timeline);
    let boards = if opts.boards.is_empty() {
        Vec::new()
    } else {
        let of_host: Vec<Option<String>> =
            (0..opts.hosts).map(|i| host_spec(&opts, i).board).collect();
        summarize_boards(&of_host, &initial, &timeline)
    };
    let (reboots, extra_reboots) = count_reboots(&timeline);
    Ok(Report {
        hosts: opts.hosts,
        time_scale: opts.time_scale,
        real_secs,
        sim_secs: real_secs * opts.time_scale,
        max_lock_holders: ctx.max_lock_holders.load(Ordering::SeqCst),
        max_rebooting: ctx.max_rebooting.load(Ordering::SeqCst),
        checks: ctx.checks.load(Ordering::SeqCst),
        check_errors: ctx.check_errors.load(Ordering::SeqCst),
        lock_busy_answers: ctx.lock_busy.load(Ordering::SeqCst),
        reboots,
        extra_reboots,
        versions,
        boards,
        ended: ended.to_string(),
        timeline,
    })
}

// ----------------------------------------------------------------------------------------------
// The subcommand

/// `update-agent simulate`: N real agents against a real update-server (and coordinator).
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of simulated hosts.
    #[arg(long)]
    pub hosts: usize,
    /// Update server (Omaha endpoint; a bare http://HOST:PORT gets /v1/update/).
    #[arg(long)]
    pub server: String,
    /// FleetLock reboot coordinator base URL (coordinated reboots); without it hosts reboot at once.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Channel (Omaha track).
    #[arg(long, default_value = "stable")]
    pub channel: String,
    /// Rollout group (Omaha) and FleetLock group.
    #[arg(long)]
    pub group: Option<String>,
    /// Each host sends its board (--board-share) as its Omaha rollout group, so per-group
    /// policies apply per board (hosts without a board send --group).
    #[arg(long)]
    pub group_by_board: bool,
    /// Health outcome of a release: VERSION:fail=P%[,board=B] or VERSION:panic=P%[,board=B].
    #[arg(long = "health")]
    pub health: Vec<HealthRule>,
    /// Share of hosts with a board: BOARD=P% (repeatable).
    #[arg(long = "board-share")]
    pub board_share: Vec<BoardShare>,
    /// Simulated seconds per real second (delays below are in simulated seconds).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Keyring the bundles must satisfy (as on the hosts).
    #[arg(long)]
    pub keyring: PathBuf,
    /// Version every host runs at the start.
    #[arg(long, default_value = "1.0.0")]
    pub initial_version: semver::Version,
    /// Omaha app id.
    #[arg(long, default_value = omaha::FLATCAR_APP_ID)]
    pub app_id: String,
    /// Seconds between update checks (simulated).
    #[arg(long, default_value_t = 60.0)]
    pub interval_secs: f64,
    /// Seconds a reboot takes (simulated).
    #[arg(long, default_value_t = 30.0)]
    pub reboot_secs: f64,
    /// Stop after this many simulated seconds at the latest.
    #[arg(long, default_value_t = 86400.0)]
    pub max_secs: f64,
    /// Stop when nothing happened for this many simulated seconds and no host is busy
    /// (default: 5 check intervals).
    #[arg(long)]
    pub settle_secs: Option<f64>,
    /// Stop as soon as every host runs this version.
    #[arg(long)]
    pub until_all_on: Option<String>,
    /// Agent steps running at once (blocking threads).
    #[arg(long, default_value_t = 64)]
    pub parallel: usize,
    /// Write the timeline as CSV.
    #[arg(long, conflicts_with = "json")]
    pub csv: Option<PathBuf>,
    /// Write the summary and timeline as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seed for the machine ids.
    #[arg(long, default_value = "twinroot-sim")]
    pub seed: String,
}

fn secs(what: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| anyhow!("{what}: {s} is not a valid duration"))
}

impl SimulateArgs {
    pub fn options(&self) -> anyhow::Result<SimOptions> {
        let keyring = crate::host::load_keyring(&self.keyring)?;
        let mut o = SimOptions::new(self.hosts, &self.server, keyring);
        o.coordinator = self.coordinator.clone();
        o.channel = self.channel.clone();
        o.group = self.group.clone();
        o.group_by_board = self.group_by_board;
        o.health = self.health.clone();
        o.boards = self.board_share.clone();
        o.time_scale = self.time_scale;
        o.initial_version = self.initial_version.clone();
        o.app_id = self.app_id.clone();
        o.interval = secs("--interval-secs", self.interval_secs)?;
        o.reboot = secs("--reboot-secs", self.reboot_secs)?;
        o.max_duration = secs("--max-secs", self.max_secs)?;
        o.settle = match self.settle_secs {
            Some(s) => secs("--settle-secs", s)?,
            None => o.interval * 5,
        };
        o.until_all_on = self.until_all_on.clone();
        o.parallel = self.parallel;
        o.seed = self.seed.clone();
        Ok(o)
    }
}

/// Runs the subcommand: prints the summary, writes the timeline.
pub fn main(args: &SimulateArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(args.parallel.max(1) * 4 + 16)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = rt.block_on(run(opts))?;
    print!("{}", report.render());
    if let Some(p) = &args.csv {
        std::fs::write(p, report.timeline_csv())
            .with_context(|| format!("{}: cannot write the timeline", p.display()))?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&report.to_json())?)
            .with_context(|| format!("{}: cannot write the report", p.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn health_rules_parse_and_name_bad_input() {
        let r: HealthRule = "2.0.0:fail=30%".parse().unwrap();
        assert_eq!((r.kind, r.percent, r.board), (FailKind::Fail, 30.0, None));
        let r: HealthRule = "2.1.0:panic=100%,board=X".parse().unwrap();
        assert_eq!(
            (r.kind, r.percent, r.board.as_deref()),
            (FailKind::Panic, 100.0, Some("X"))
        );
        for bad in [
            "2.0.0",
            "x:fail=3%",
            "2.0.0:fail=300%",
            "2.0.0:oops=1",
            "2.0.0:board=X",
        ] {
            let e = bad.parse::<HealthRule>().unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        let b: BoardShare = "X=10%".parse().unwrap();
        assert_eq!((b.board.as_str(), b.percent), ("X", 10.0));
        assert!("=5%".parse::<BoardShare>().is_err());
    }

    #[test]
    fn fates_follow_the_shares() {
        let keyring = Keyring::new(
            1,
            1,
            &[twinroot_format::keyring::generate_signing_key()
                .unwrap()
                .verifying_key()],
        )
        .unwrap();
        let mut o = SimOptions::new(1000, "http://127.0.0.1:1", keyring);
        o.health = vec!["2.0.0:fail=30%".parse().unwrap()];
        o.boards = vec!["X=10%".parse().unwrap()];
        let specs: Vec<_> = (0..1000).map(|i| host_spec(&o, i)).collect();
        let failing = specs
            .iter()
            .filter(|s| fate(&o, &s.machine_id, s.board.as_deref(), "2.0.0").is_some())
            .count();
        assert!((230..370).contains(&failing), "{failing}");
        let on_x = specs
            .iter()
            .filter(|s| s.board.as_deref() == Some("X"))
            .count();
        assert!((60..140).contains(&on_x), "{on_x}");
        assert!(
            specs
                .iter()
                .all(|s| fate(&o, &s.machine_id, None, "1.0.0").is_none())
        );
        let ids: BTreeSet<_> = specs.iter().map(|s| s.machine_id.clone()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
