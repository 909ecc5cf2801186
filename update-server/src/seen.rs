//! Write-behind of "still here" check-ins.
//!
//! Most check-ins of a settled fleet change nothing about a host but its `last_seen` and
//! `checkins`. Writing those two columns at every check-in costs the check-in writer more than
//! everything else it does for that check-in (a dirty table page and a dirty `last_seen` index
//! page per host in every commit). So a check-in that changes nothing else is answered without
//! waiting for that write: the writer keeps the host's new `last_seen` and the number of
//! check-ins not yet stored here, lays them over the record whenever it reads the host again,
//! and writes them within [`PendingSeen::delay`] (default [`DEFAULT_DELAY`]), folded with any
//! later check-in of the same host and into the transaction of a later batch.
//!
//! What stays synchronous: every check-in that changes anything else (a new host, an event, a
//! grant, a new version, channel or group, the end of a quarantine lift) is committed, with the
//! host's pending check-ins, before its answer leaves. What a `kill -9` can lose is the last
//! `delay` of `last_seen` and `checkins` of hosts that only checked in; a graceful stop writes
//! them all. A delay of zero writes every check-in before its answer.
//!
//! Pending check-ins are written as increments (`checkins = checkins + n`, `last_seen` never
//! moves back), so several servers sharing one PostgreSQL database count every check-in.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::store::InstanceRow;

/// The delay `serve` uses unless told otherwise.
pub const DEFAULT_DELAY: Duration = Duration::from_secs(1);
/// The longest delay allowed: the dashboard's catch-up re-reads hosts seen within its last few
/// seconds (`series::INSTANCE_OVERLAP_SECS`), which must cover a deferred write.
pub const MAX_DELAY: Duration = Duration::from_secs(4);
/// Most deferred hosts written in one batch when they fall due, so that writing them never
/// holds up a batch of check-ins for long.
const MAX_DUE_PER_BATCH: usize = 4096;

/// A write of check-ins a host made since its stored record: `last_seen` becomes at least
/// `last_seen`, and `checkins` grows by `added`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Touch {
    pub machine_id: String,
    pub last_seen: i64,
    pub added: i64,
}

#[derive(Debug)]
struct Entry {
    last_seen: i64,
    added: i64,
    /// When this host's oldest unwritten check-in was deferred.
    since: Instant,
}

/// Check-ins answered but not yet written, by machine id.
#[derive(Debug)]
pub(crate) struct PendingSeen {
    delay: Duration,
    hosts: HashMap<String, Entry>,
    /// (deferred at, machine id), oldest first. An item whose host has been written since (its
    /// entry is gone, or newer) is skipped when it comes up.
    order: VecDeque<(Instant, String)>,
}

/// What a batch does about pending check-ins, applied with [`PendingSeen::apply`] once the
/// batch has committed (a batch that fails leaves everything pending as it was).
#[derive(Debug, Default)]
pub(crate) struct SeenPlan {
    /// Written in this batch's transaction.
    pub writes: Vec<Touch>,
    /// Hosts whose pending check-ins are written by this batch (as a touch or a full record).
    forget: Vec<String>,
    /// Hosts deferred by this batch: (machine id, last_seen, added).
    defer: Vec<(String, i64, i64)>,
    /// Items of `order` this batch has dealt with.
    popped: usize,
}

impl PendingSeen {
    pub fn new(delay: Duration) -> PendingSeen {
        PendingSeen {
            delay,
            hosts: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Lays the check-ins not yet written over a record read from the database.
    pub fn overlay(&self, inst: &mut InstanceRow) {
        if let Some(e) = self.hosts.get(&inst.machine_id) {
            inst.last_seen = inst.last_seen.max(e.last_seen);
            inst.checkins += e.added;
        }
    }

    /// Adds `added` check-ins of a host answered outside a batch (on the HTTP threads,
    /// [`crate::fast`]), the oldest of them at `since`, the newest at `last_seen`.
    pub fn add(&mut self, machine_id: String, last_seen: i64, added: i64, since: Instant) {
        match self.hosts.get_mut(&machine_id) {
            Some(e) => {
                e.last_seen = e.last_seen.max(last_seen);
                e.added += added;
            }
            None => {
                // `order` stays oldest first: `since` may be older than the last items.
                let at = self.order.partition_point(|(t, _)| *t <= since);
                self.order.insert(at, (since, machine_id.clone()));
                self.hosts.insert(
                    machine_id,
                    Entry {
                        last_seen,
                        added,
                        since,
                    },
                );
            }
        }
    }

    /// When the oldest deferred check-in falls due (`None`: nothing is pending).
    pub fn next_due(&self) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at + self.delay)
    }

    /// Plans the writes of a batch. `touched` are the hosts of the batch whose only changes are
    /// `last_seen` and `checkins`, as (record before the batch, with [`Self::overlay`] applied;
    /// record after it); `rewritten` are the hosts whose whole record the batch writes (which
    /// carries their pending check-ins). With `all`, everything pending is written now (the
    /// writer is stopping).
    pub fn plan<'a>(
        &self,
        touched: &[(&InstanceRow, &InstanceRow)],
        rewritten: impl IntoIterator<Item = &'a str>,
        now: Instant,
        all: bool,
    ) -> SeenPlan {
        let mut plan = SeenPlan::default();
        let mut in_batch: HashSet<&str> = HashSet::new();
        for id in rewritten {
            in_batch.insert(id);
            plan.forget.push(id.to_string());
        }
        for (before, after) in touched {
            let id = after.machine_id.as_str();
            in_batch.insert(id);
            let prev = self.hosts.get(id);
            let added = prev.map_or(0, |e| e.added) + (after.checkins - before.checkins);
            let due =
                all || self.delay.is_zero() || prev.is_some_and(|e| self.is_due(e.since, now));
            if due {
                plan.writes.push(Touch {
                    machine_id: id.to_string(),
                    last_seen: after.last_seen,
                    added,
                });
                plan.forget.push(id.to_string());
            } else {
                plan.defer.push((id.to_string(), after.last_seen, added));
            }
        }
        for (at, id) in &self.order {
            if !all && (!self.is_due(*at, now) || plan.writes.len() >= MAX_DUE_PER_BATCH) {
                break;
            }
            plan.popped += 1;
            if in_batch.contains(id.as_str()) {
                continue;
            }
            if let Some(e) = self.hosts.get(id).filter(|e| e.since == *at) {
                plan.writes.push(Touch {
                    machine_id: id.clone(),
                    last_seen: e.last_seen,
                    added: e.added,
                });
                plan.forget.push(id.clone());
            }
        }
        plan
    }

    /// Records what a committed batch planned.
    pub fn apply(&mut self, plan: SeenPlan, now: Instant) {
        for id in &plan.forget {
            self.hosts.remove(id);
        }
        self.order.drain(..plan.popped.min(self.order.len()));
        for (id, last_seen, added) in plan.defer {
            match self.hosts.get_mut(&id) {
                Some(e) => {
                    e.last_seen = e.last_seen.max(last_seen);
                    e.added = added;
                }
                None => {
                    self.order.push_back((now, id.clone()));
                    self.hosts.insert(
                        id,
                        Entry {
                            last_seen,
                            added,
                            since: now,
                        },
                    );
                }
            }
        }
    }

    fn is_due(&self, since: Instant, now: Instant) -> bool {
        since + self.delay <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, last_seen: i64, checkins: i64) -> InstanceRow {
        InstanceRow {
            version: Some("1.0.0".into()),
            last_seen,
            checkins,
            ..InstanceRow::new(id, "app", "stable", 0)
        }
    }

    /// One check-in of `id` through `p`, as the writer does it: read (stored record plus
    /// overlay), one more check-in at `at`, plan, apply.
    fn checkin(p: &mut PendingSeen, stored: &InstanceRow, at: i64, now: Instant) -> Vec<Touch> {
        let mut before = stored.clone();
        p.overlay(&mut before);
        let mut after = before.clone();
        after.last_seen = at;
        after.checkins += 1;
        let plan = p.plan(&[(&before, &after)], [], now, false);
        let writes = plan.writes.clone();
        p.apply(plan, now);
        writes
    }

    #[test]
    fn a_check_in_waits_for_the_delay_then_is_written_with_the_later_ones() {
        let t0 = Instant::now();
        let mut p = PendingSeen::new(Duration::from_secs(1));
        let stored = host("a", 100, 5);
        assert!(checkin(&mut p, &stored, 101, t0).is_empty());
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(1)));
        // A second check-in within the delay is folded in; the overlay shows both.
        assert!(checkin(&mut p, &stored, 102, t0 + Duration::from_millis(500)).is_empty());
        let mut seen = stored.clone();
        p.overlay(&mut seen);
        assert_eq!((seen.last_seen, seen.checkins), (102, 7));
        // The third, after the delay, writes all three.
        let w = checkin(&mut p, &stored, 103, t0 + Duration::from_secs(1));
        assert_eq!(
            w,
            vec![Touch {
                machine_id: "a".into(),
                last_seen: 103,
                added: 3
            }]
        );
        assert_eq!(p.len(), 0);
        assert_eq!(p.next_due(), None, "{p:?}");
    }

    #[test]
    fn due_hosts_are_written_by_any_batch_and_in_the_order_they_waited() {
        let t0 = Instant::now();
        let mut p = PendingSeen::new(Duration::from_secs(1));
        checkin(&mut p, &host("a", 10, 1), 11, t0);
        checkin(
            &mut p,
            &host("b", 10, 1),
            12,
            t0 + Duration::from_millis(300),
        );
        // Not due yet: nothing to write.
        let plan = p.plan(&[], [], t0 + Duration::from_millis(900), false);
        assert!(plan.writes.is_empty());
        // `a` is due, `b` not.
        let now = t0 + Duration::from_millis(1100);
        let plan = p.plan(&[], [], now, false);
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(plan.writes[0].machine_id, "a");
        p.apply(plan, now);
        assert_eq!(p.len(), 1);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_millis(1300)));
        // Stopping writes everything.
        let plan = p.plan(&[], [], now, true);
        assert_eq!(
            plan.writes,
            vec![Touch {
                machine_id: "b".into(),
                last_seen: 12,
                added: 1
            }]
        );
        p.apply(plan, now);
        assert_eq!((p.len(), p.next_due()), (0, None));
    }

    #[test]
    fn a_rewritten_host_carries_its_pending_check_ins() {
        let t0 = Instant::now();
        let mut p = PendingSeen::new(Duration::from_secs(1));
        let stored = host("a", 10, 1);
        checkin(&mut p, &stored, 11, t0);
        // The next check-in changes the record (say, an event): the whole record, overlay
        // included, is written, so nothing stays pending and nothing is written twice.
        let mut before = stored.clone();
        p.overlay(&mut before);
        assert_eq!(before.checkins, 2);
        let plan = p.plan(&[], ["a"], t0 + Duration::from_secs(2), false);
        assert!(plan.writes.is_empty(), "{plan:?}");
        p.apply(plan, t0 + Duration::from_secs(2));
        assert_eq!((p.len(), p.next_due()), (0, None));
        // Deferred again later: a fresh wait, and the stale queue item is skipped.
        checkin(&mut p, &host("a", 12, 3), 13, t0 + Duration::from_secs(3));
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn without_a_delay_every_check_in_is_written_at_once() {
        let mut p = PendingSeen::new(Duration::ZERO);
        let w = checkin(&mut p, &host("a", 10, 1), 11, Instant::now());
        assert_eq!(
            w,
            vec![Touch {
                machine_id: "a".into(),
                last_seen: 11,
                added: 1
            }]
        );
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn many_due_hosts_are_spread_over_batches() {
        let t0 = Instant::now();
        let mut p = PendingSeen::new(Duration::from_secs(1));
        let n = MAX_DUE_PER_BATCH + 10;
        for i in 0..n {
            checkin(&mut p, &host(&format!("h{i}"), 1, 1), 2, t0);
        }
        let now = t0 + Duration::from_secs(2);
        let plan = p.plan(&[], [], now, false);
        assert_eq!(plan.writes.len(), MAX_DUE_PER_BATCH);
        p.apply(plan, now);
        let plan = p.plan(&[], [], now, false);
        assert_eq!(plan.writes.len(), 10);
        p.apply(plan, now);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn check_ins_added_from_outside_keep_their_time_and_fold_with_batches() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = PendingSeen::new(Duration::from_secs(1));
        // "b" is deferred by a batch at t0 + 50 ms; "a" was answered outside at t0 and arrives
        // later: it still falls due first.
        checkin(&mut p, &host("b", 1, 1), 2, t0 + ms(50));
        p.add("a".into(), 5, 2, t0);
        assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(1)));
        // More outside check-ins of "a" fold into its entry; the overlay shows them.
        p.add("a".into(), 7, 1, t0 + ms(80));
        let mut a = host("a", 3, 10);
        p.overlay(&mut a);
        assert_eq!((a.last_seen, a.checkins), (7, 13));
        // At t0 + 1 s only "a" is due; "b" follows 50 ms later.
        let now = t0 + Duration::from_secs(1);
        let plan = p.plan(&[], [], now, false);
        assert_eq!(
            plan.writes,
            vec![Touch {
                machine_id: "a".into(),
                last_seen: 7,
                added: 3
            }]
        );
        p.apply(plan, now);
        assert_eq!(p.next_due(), Some(t0 + ms(1050)));
        // A batch check-in of "b" carries what is pending for it.
        let w = checkin(&mut p, &host("b", 1, 1), 9, t0 + ms(1050));
        assert_eq!(w[0].added, 2);
        assert_eq!(p.len(), 0);
    }
}
