//! Check-ins answered on the HTTP threads.
//!
//! Most check-ins of a fleet are update checks of hosts that are held (current, outside the
//! rollout's cohort, paused, quarantined...) and that change nothing in their record but
//! `last_seen` and `checkins`. Handing each of those to the check-in writer and back costs more
//! than deciding it. So, on SQLite (where this process is the database's only writer), the
//! writer publishes what its last committed batch saw: the channels, rollouts, releases and
//! quarantine lifts, and the records of the hosts it recorded (a bounded number). An HTTP
//! thread answers a check-in itself when all of these hold:
//!
//! - the published view belongs to the current admin-change generation (an admin change bumps
//!   the generation inside its transaction, so from then on every check-in goes to the writer
//!   until the writer has read the change);
//! - the check-in carries no event, and the host's record is published, with no quarantine lift;
//! - the check-in changes nothing in that record but `last_seen` and `checkins`
//!   ([`crate::checkin::checked_in`] over the published record, as the writer would);
//! - the decision over empty counts is a hold. A grant, even a renewed one, goes to the writer,
//!   which reads the counts (rate limits, in-flight limit, automatic halt) in its transaction.
//!   A hold never depends on the counts: the automatic halt is judged by the writer when a
//!   failure arrives, and a halted rollout answers `noupdate` either way.
//!
//! The check-in itself is kept here, per host, and the writer takes it into its pending
//! check-ins ([`crate::seen`]) within [`DRAIN_LAG`], at every batch, and when it stops. From
//! there it is written like any other "still here" check-in: within the seen delay of the
//! check-in, as an increment. The writer publishes a batch's host records before it answers
//! that batch, so a host's next check-in never sees an older record than its last answer.
//!
//! The view is per process: on PostgreSQL, where several servers may share the database, every
//! check-in goes to the writer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use twinroot_format::omaha::{AppRequest, UpdateCheckResponse};

use crate::checkin::{Answer, CheckinSummary, FirstLook, checked_in, completes_grant, filing};
use crate::checkin::{first_look, only_seen_again, target_of};
use crate::policy::Decision;
use crate::store::{ChannelRow, InstanceRow, LiftRow, ReleaseRow, RolloutRow};

/// Longest a check-in answered here waits before the writer takes it (its seen delay counts
/// from the check-in, not from then).
pub const DRAIN_LAG: Duration = Duration::from_millis(100);
/// Host records kept for answering here unless `serve --cached-hosts` says otherwise (about
/// 1 KiB each). Hosts beyond it are answered by the writer.
pub const DEFAULT_CACHED_HOSTS: usize = 200_000;

/// What the HTTP threads answer from, and the check-ins they answered.
pub(crate) struct FastPath {
    /// The store's admin-change generation.
    generation: Arc<AtomicU64>,
    view: RwLock<View>,
    answered: Mutex<Answered>,
    /// Wakes the writer when the first check-in is answered here after it last took them.
    pub(crate) wake: tokio::sync::Notify,
    max_hosts: usize,
}

#[derive(Default)]
struct View {
    /// None until the writer's first committed batch.
    config: Option<Config>,
    /// Records as committed, valid for `config`'s generation (`last_seen` and `checkins` may
    /// lag: they are not read here).
    hosts: HashMap<String, InstanceRow>,
}

/// The writer's view of the configuration after a committed batch.
pub(crate) struct Config {
    pub generation: u64,
    pub channels: HashMap<String, ChannelRow>,
    pub rollouts: BTreeMap<(String, String), RolloutRow>,
    pub releases: HashMap<String, ReleaseRow>,
    /// Hosts with a quarantine lift being sent.
    pub lifted: HashSet<String>,
}

impl Config {
    pub fn new(
        generation: u64,
        channels: &HashMap<String, ChannelRow>,
        rollouts: &BTreeMap<(String, String), RolloutRow>,
        releases: &HashMap<String, Option<ReleaseRow>>,
        lifts: &HashMap<String, Vec<LiftRow>>,
    ) -> Config {
        Config {
            generation,
            channels: channels.clone(),
            rollouts: rollouts.clone(),
            releases: releases
                .iter()
                .filter_map(|(v, r)| Some((v.clone(), r.clone()?)))
                .collect(),
            lifted: lifts.keys().cloned().collect(),
        }
    }
}

/// Check-ins answered here that the writer has not taken yet.
struct Answered {
    /// Cleared when the writer stops: then nothing is answered here any more.
    open: bool,
    /// When the oldest of them was answered.
    since: Option<Instant>,
    /// Per machine id: (newest check-in time, number of check-ins).
    hosts: HashMap<String, (i64, i64)>,
}

/// Check-ins answered here, as the writer takes them.
pub(crate) struct Taken {
    pub since: Instant,
    pub hosts: HashMap<String, (i64, i64)>,
}

impl FastPath {
    pub fn new(generation: Arc<AtomicU64>, max_hosts: usize) -> FastPath {
        FastPath {
            generation,
            view: RwLock::new(View::default()),
            answered: Mutex::new(Answered {
                open: true,
                since: None,
                hosts: HashMap::new(),
            }),
            wake: tokio::sync::Notify::new(),
            max_hosts,
        }
    }

    /// Answers a check-in without the writer, or says it cannot (None): see the module docs.
    pub fn answer(&self, app: &AppRequest, machine_id: &str, now: DateTime<Utc>) -> Option<Answer> {
        if !app.events.is_empty() {
            return None;
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let config = view.config.as_ref()?;
        if config.generation != self.generation.load(Ordering::SeqCst)
            || config.lifted.contains(machine_id)
        {
            return None;
        }
        let stored = view.hosts.get(machine_id)?;
        let ts = now.timestamp();
        let (channel, group, rollout_group) = filing(app, &config.rollouts);
        let inst = checked_in(
            Some(stored),
            machine_id,
            app,
            (&channel, &group, &rollout_group),
            ts,
        );
        if completes_grant(&inst, app) || !only_seen_again(stored, &inst) {
            return None;
        }
        let hold = match &app.update_check {
            None => None,
            Some(_) => Some(hold_label(
                config,
                app,
                &inst,
                &channel,
                &rollout_group,
                now,
            )?),
        };
        drop(view);
        if !self.record(machine_id, ts) {
            return None;
        }
        Some(Answer {
            update_check: hold.map(|_| UpdateCheckResponse::NoUpdate),
            lift_quarantine: Vec::new(),
            summary: CheckinSummary {
                holds: hold.into_iter().collect(),
                from_memory: 1,
                ..CheckinSummary::default()
            },
        })
    }

    /// Keeps a check-in answered here for the writer; false once the writer has stopped.
    fn record(&self, machine_id: &str, ts: i64) -> bool {
        let mut a = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if !a.open {
            return false;
        }
        let first = a.hosts.is_empty();
        match a.hosts.get_mut(machine_id) {
            Some((seen, n)) => {
                *seen = (*seen).max(ts);
                *n += 1;
            }
            None => {
                a.hosts.insert(machine_id.to_string(), (ts, 1));
            }
        }
        if first {
            a.since = Some(Instant::now());
            drop(a);
            self.wake.notify_one();
        }
        true
    }

    /// Takes the check-ins answered here so far (the writer). With `close`, nothing more is
    /// answered here afterwards.
    pub fn take(&self, close: bool) -> Option<Taken> {
        let mut a = self.answered.lock().unwrap_or_else(|e| e.into_inner());
        if close {
            a.open = false;
        }
        let since = a.since.take()?;
        Some(Taken {
            since,
            hosts: std::mem::take(&mut a.hosts),
        })
    }

    /// Publishes what a committed batch saw (the writer, before it answers the batch): the
    /// configuration when it changed (`config`; a new generation also forgets every host
    /// record), and the records of the batch's hosts.
    pub fn publish<'a>(
        &self,
        config: Option<Config>,
        hosts: impl IntoIterator<Item = &'a InstanceRow>,
    ) {
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = config {
            if view
                .config
                .as_ref()
                .is_none_or(|c| c.generation != config.generation)
            {
                view.hosts.clear();
            }
            view.config = Some(config);
        }
        for h in hosts {
            if let Some(stored) = view.hosts.get_mut(&h.machine_id) {
                stored.clone_from(h);
            } else if view.hosts.len() < self.max_hosts {
                view.hosts.insert(h.machine_id.clone(), h.clone());
            }
        }
    }
}

/// The hold an update check gets over `config` (a metrics label), or None when only the writer
/// can decide it (a grant, or a release not in the view).
fn hold_label(
    config: &Config,
    app: &AppRequest,
    inst: &InstanceRow,
    channel: &str,
    rollout_group: &str,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    let ch = config.channels.get(channel);
    let r = config
        .rollouts
        .get(&(channel.to_string(), rollout_group.to_string()));
    let (Some(ch), Some(r)) = (ch, r) else {
        return Some("unknown_channel");
    };
    let Some(target) = target_of(ch, r) else {
        return Some("no_release");
    };
    let release = config.releases.get(&target)?;
    match first_look(app, inst, r, release, now) {
        FirstLook::Hold(label) => Some(label),
        FirstLook::Decide(c) => match c.quick {
            Decision::Hold(hold) => Some(hold.label()),
            Decision::Grant { .. } => None,
        },
    }
}
