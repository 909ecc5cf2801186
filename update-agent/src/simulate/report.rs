//! What a simulation run produced: the timeline, and the summaries built from it (pure).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEvent {
    /// Simulated seconds since the start.
    pub t: f64,
    pub host: usize,
    /// installed, reboot, booted, panic, good, bad, rolled_back, lock_granted, lock_released,
    /// check_error, boot_error, reboot_error, unbootable.
    pub event: &'static str,
    pub version: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct VersionSummary {
    pub version: String,
    /// Hosts that booted this version at least once (for a bad release: the blast radius).
    pub hosts_booted: usize,
    /// Hosts on which it failed its checks or panicked.
    pub failed: usize,
    /// Hosts that went back from it to their previous version.
    pub rolled_back: usize,
    /// Hosts running it at the end.
    pub running_at_end: usize,
    /// Simulated seconds until half / all of the hosts counted ran it (when reached).
    pub t50: Option<f64>,
    pub t100: Option<f64>,
}

/// The same summary for the hosts of one board (`--board-share`; `-` for hosts without one).
#[derive(Debug, Clone, Serialize, Default)]
pub struct BoardSummary {
    pub board: String,
    pub hosts: usize,
    pub versions: Vec<VersionSummary>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub hosts: usize,
    pub time_scale: f64,
    pub real_secs: f64,
    pub sim_secs: f64,
    /// Most hosts holding a FleetLock reboot slot at once, as seen by the hosts (counted from the
    /// granted answer to the release request, so never more than the coordinator granted).
    pub max_lock_holders: usize,
    /// Most hosts inside a simulated reboot at once.
    pub max_rebooting: usize,
    pub checks: u64,
    pub check_errors: u64,
    pub lock_busy_answers: u64,
    /// Reboots in all.
    pub reboots: usize,
    /// Reboots beyond the one each install and each bad boot calls for, summed over hosts.
    pub extra_reboots: usize,
    pub versions: Vec<VersionSummary>,
    /// Per board, when the run had `--board-share`s.
    pub boards: Vec<BoardSummary>,
    /// Why the run ended: settled, all_on_version, max_duration.
    pub ended: String,
    #[serde(skip)]
    pub timeline: Vec<TimelineEvent>,
}

impl Report {
    pub fn version(&self, v: &str) -> Option<&VersionSummary> {
        self.versions.iter().find(|s| s.version == v)
    }

    /// The summary of `version` on the hosts of `board` (`-`: hosts without a board).
    pub fn board_version(&self, board: &str, version: &str) -> Option<&VersionSummary> {
        self.boards
            .iter()
            .find(|b| b.board == board)
            .and_then(|b| b.versions.iter().find(|s| s.version == version))
    }

    /// The summary as printed by `update-agent simulate`.
    pub fn render(&self) -> String {
        let mut out = format!(
            "fleet simulator: {} hosts, {:.1} s real, {:.1} s simulated (x{}), ended: {}\n",
            self.hosts, self.real_secs, self.sim_secs, self.time_scale, self.ended
        );
        render_versions(&mut out, "", &self.versions);
        for b in &self.boards {
            out.push_str(&format!("board {} ({} hosts):\n", b.board, b.hosts));
            render_versions(&mut out, "  ", &b.versions);
        }
        out.push_str(&format!(
            "max reboot-slot holders at once: {}; max hosts rebooting at once: {}\n",
            self.max_lock_holders, self.max_rebooting
        ));
        out.push_str(&format!(
            "reboots: {} ({} beyond what installs and bad boots call for)\n",
            self.reboots, self.extra_reboots
        ));
        out.push_str(&format!(
            "update checks: {} ({} failed); reboot slot refused: {} times\n",
            self.checks, self.check_errors, self.lock_busy_answers
        ));
        out
    }

    pub fn timeline_csv(&self) -> String {
        let mut out = String::from("t,host,event,version,detail\n");
        for e in &self.timeline {
            let detail = e.detail.replace('"', "'");
            out.push_str(&format!(
                "{:.3},{},{},{},\"{}\"\n",
                e.t, e.host, e.event, e.version, detail
            ));
        }
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"summary": self, "timeline": self.timeline})
    }
}

fn render_versions(out: &mut String, indent: &str, versions: &[VersionSummary]) {
    out.push_str(&format!(
        "{indent}{:<14} {:>8} {:>8} {:>12} {:>10} {:>10} {:>10}\n",
        "version", "booted", "failed", "rolled_back", "running", "t50%", "t100%"
    ));
    let t = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}s"));
    for v in versions {
        out.push_str(&format!(
            "{indent}{:<14} {:>8} {:>8} {:>12} {:>10} {:>10} {:>10}\n",
            v.version,
            v.hosts_booted,
            v.failed,
            v.rolled_back,
            v.running_at_end,
            t(v.t50),
            t(v.t100)
        ));
    }
}

/// Builds the per-version summary of the whole fleet (`hosts` hosts) from the timeline (pure).
pub fn summarize(
    hosts: usize,
    initial: &str,
    timeline: &[TimelineEvent],
) -> (Vec<VersionSummary>, BTreeMap<String, usize>) {
    let all: BTreeSet<usize> = (0..hosts).collect();
    summarize_hosts(&all, initial, timeline)
}

/// The per-version summary of the hosts in `members` only; t50/t100 are shares of them (pure).
pub fn summarize_hosts(
    members: &BTreeSet<usize>,
    initial: &str,
    timeline: &[TimelineEvent],
) -> (Vec<VersionSummary>, BTreeMap<String, usize>) {
    let hosts = members.len();
    let mut running: BTreeMap<usize, String> =
        members.iter().map(|&h| (h, initial.to_string())).collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    counts.insert(initial.to_string(), hosts);
    let mut booted: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    let mut failed: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    let mut rolled: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    let mut t50: BTreeMap<String, f64> = BTreeMap::new();
    let mut t100: BTreeMap<String, f64> = BTreeMap::new();
    for e in timeline.iter().filter(|e| members.contains(&e.host)) {
        match e.event {
            "booted" => {
                booted.entry(e.version.clone()).or_default().insert(e.host);
                let slot = running.get_mut(&e.host).expect("member");
                let old = std::mem::replace(slot, e.version.clone());
                if let Some(c) = counts.get_mut(&old) {
                    *c -= 1;
                }
                let c = counts.entry(e.version.clone()).or_default();
                *c += 1;
                let c = *c;
                if e.version == initial {
                    continue;
                }
                if c * 2 >= hosts {
                    t50.entry(e.version.clone()).or_insert(e.t);
                }
                if c == hosts {
                    t100.entry(e.version.clone()).or_insert(e.t);
                }
            }
            "panic" => {
                booted.entry(e.version.clone()).or_default().insert(e.host);
                failed.entry(e.version.clone()).or_default().insert(e.host);
            }
            "bad" => {
                failed.entry(e.version.clone()).or_default().insert(e.host);
            }
            "rolled_back" => {
                rolled.entry(e.version.clone()).or_default().insert(e.host);
            }
            _ => {}
        }
    }
    let mut versions: BTreeSet<String> = counts.keys().cloned().collect();
    versions.extend(booted.keys().cloned());
    let mut list: Vec<VersionSummary> = versions
        .into_iter()
        .map(|v| VersionSummary {
            hosts_booted: booted.get(&v).map_or(0, |s| s.len()),
            failed: failed.get(&v).map_or(0, |s| s.len()),
            rolled_back: rolled.get(&v).map_or(0, |s| s.len()),
            running_at_end: counts.get(&v).copied().unwrap_or(0),
            t50: t50.get(&v).copied(),
            t100: t100.get(&v).copied(),
            version: v,
        })
        .collect();
    list.sort_by(|a, b| {
        match (
            semver::Version::parse(&a.version),
            semver::Version::parse(&b.version),
        ) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.version.cmp(&b.version),
        }
    });
    (list, counts)
}

/// Per board: the hosts of each board (`boards[host]`, `None` shown as `-`) summarized (pure).
pub fn summarize_boards(
    boards: &[Option<String>],
    initial: &str,
    timeline: &[TimelineEvent],
) -> Vec<BoardSummary> {
    let mut by_board: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (host, b) in boards.iter().enumerate() {
        by_board
            .entry(b.clone().unwrap_or_else(|| "-".into()))
            .or_default()
            .insert(host);
    }
    by_board
        .into_iter()
        .map(|(board, members)| BoardSummary {
            hosts: members.len(),
            versions: summarize_hosts(&members, initial, timeline).0,
            board,
        })
        .collect()
}

/// (reboots, reboots beyond one per install and one per bad boot), summed over hosts (pure).
pub fn count_reboots(timeline: &[TimelineEvent]) -> (usize, usize) {
    let mut per_host: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for e in timeline {
        let (reboots, needed) = per_host.entry(e.host).or_default();
        match e.event {
            "reboot" => *reboots += 1,
            "installed" | "bad" => *needed += 1,
            _ => {}
        }
    }
    let total = per_host.values().map(|(r, _)| r).sum();
    let extra = per_host.values().map(|(r, n)| r.saturating_sub(*n)).sum();
    (total, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, host: usize, event: &'static str, version: &str) -> TimelineEvent {
        TimelineEvent {
            t,
            host,
            event,
            version: version.into(),
            detail: String::new(),
        }
    }

    #[test]
    fn summary_counts_blast_radius_and_times() {
        let tl = vec![
            ev(1.0, 0, "booted", "2.0.0"),
            ev(2.0, 0, "bad", "2.0.0"),
            ev(3.0, 0, "booted", "1.0.0"),
            ev(3.5, 0, "rolled_back", "2.0.0"),
            ev(4.0, 1, "panic", "2.0.0"),
            ev(5.0, 1, "booted", "1.0.0"),
            ev(5.5, 1, "rolled_back", "2.0.0"),
            ev(6.0, 2, "booted", "3.0.0"),
            ev(7.0, 3, "booted", "3.0.0"),
        ];
        let (v, counts) = summarize(4, "1.0.0", &tl);
        let two = v.iter().find(|s| s.version == "2.0.0").unwrap();
        assert_eq!(
            (
                two.hosts_booted,
                two.failed,
                two.rolled_back,
                two.running_at_end
            ),
            (2, 2, 2, 0)
        );
        let three = v.iter().find(|s| s.version == "3.0.0").unwrap();
        assert_eq!((three.t50, three.t100), (Some(7.0), None));
        assert_eq!(counts["1.0.0"], 2);
        assert_eq!(v[0].version, "1.0.0");

        // Hosts 2 and 3 on board Y: all of them reached 3.0.0, none booted 2.0.0.
        let boards = vec![Some("X".into()), None, Some("Y".into()), Some("Y".into())];
        let b = summarize_boards(&boards, "1.0.0", &tl);
        assert_eq!(
            b.iter()
                .map(|b| (b.board.as_str(), b.hosts))
                .collect::<Vec<_>>(),
            [("-", 1), ("X", 1), ("Y", 2)]
        );
        let y = &b[2].versions;
        let y3 = y.iter().find(|s| s.version == "3.0.0").unwrap();
        assert_eq!((y3.running_at_end, y3.t100), (2, Some(7.0)));
        assert!(y.iter().all(|s| s.version != "2.0.0"));
    }

    #[test]
    fn reboots_beyond_need_are_counted() {
        let tl = vec![
            ev(1.0, 0, "installed", "2.0.0"),
            ev(2.0, 0, "reboot", "2.0.0"),
            ev(3.0, 0, "bad", "2.0.0"),
            ev(4.0, 0, "reboot", "2.0.0"),
            ev(5.0, 1, "installed", "2.0.0"),
            ev(6.0, 1, "reboot", "2.0.0"),
            ev(7.0, 1, "reboot", "2.0.0"),
            ev(8.0, 2, "check_error", ""),
        ];
        assert_eq!(count_reboots(&tl), (4, 1));
    }
}
