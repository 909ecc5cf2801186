//! Rollout policy and the rollout decision.
//!
//! [`decide`] is a pure function of (rollout, release, host, counts, now): it reads no clock, no
//! database and no configuration. The caller (the Omaha endpoint) gathers the counts from the
//! database inside the transaction that records the grant, so several server processes sharing one
//! database agree.

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc, Weekday};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Number of cohort buckets; a percentage covers `percent * 100` of them.
pub const BUCKETS: u64 = 10_000;

/// The policy an operator sets for a channel or for one group inside it (JSON in the admin API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Share of hosts eligible when the rollout starts, 0-100.
    #[serde(default = "hundred")]
    pub start_percent: f64,
    /// How the eligible share grows after the start.
    #[serde(default)]
    pub ramp: Ramp,
    /// At most this many new grants within any sliding period.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// At most this many hosts granted but not finished (complete or failed) at once.
    #[serde(default)]
    pub max_in_flight: Option<u64>,
    /// A grant older than this no longer counts as in flight.
    #[serde(default = "default_in_flight_timeout")]
    pub in_flight_timeout_secs: i64,
    /// Grants happen only inside one of these windows; none means always.
    #[serde(default)]
    pub windows: Vec<MaintenanceWindow>,
    /// Automatic halt on failures.
    #[serde(default)]
    pub halt: Option<HaltRule>,
    /// Serve this (older or newer) release instead of the channel's; a lower version is sent as a
    /// downgrade, which agents accept only when configured to.
    #[serde(default)]
    pub pin: Option<String>,
}

fn hundred() -> f64 {
    100.0
}

fn default_in_flight_timeout() -> i64 {
    2 * 3600
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            start_percent: 100.0,
            ramp: Ramp::None,
            rate_limit: None,
            max_in_flight: None,
            in_flight_timeout_secs: default_in_flight_timeout(),
            windows: Vec::new(),
            halt: None,
            pin: None,
        }
    }
}

/// Growth of the eligible share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ramp {
    /// Stay at `start_percent`.
    #[default]
    None,
    /// Grow linearly from `start_percent` to 100 over `duration_secs`.
    Linear { duration_secs: i64 },
    /// Jump to `percent` once `after_secs` have passed since the start.
    Steps { steps: Vec<Step> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub after_secs: i64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub max_grants: u64,
    pub period_secs: i64,
}

/// A recurring window: on each of `days`, from `start` (HH:MM local time in `time_zone`) for
/// `length_minutes`. A window may run past midnight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// "mon".."sun".
    pub days: Vec<String>,
    pub start: String,
    pub length_minutes: u32,
    /// IANA name, e.g. "Europe/Berlin" or "UTC".
    pub time_zone: String,
}

/// Pause the rollout when more than `max_failure_percent` of the hosts that reported an outcome
/// for the release failed, once at least `min_reports` outcomes are in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaltRule {
    pub max_failure_percent: f64,
    pub min_reports: u64,
}

impl RolloutPolicy {
    /// Checks the values an operator can get wrong; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let pct = |name: &str, v: f64| {
            if (0.0..=100.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be between 0 and 100, got {v}"))
            }
        };
        pct("start_percent", self.start_percent)?;
        match &self.ramp {
            Ramp::None => {}
            Ramp::Linear { duration_secs } if *duration_secs <= 0 => {
                return Err("ramp.duration_secs must be positive".into());
            }
            Ramp::Linear { .. } => {}
            Ramp::Steps { steps } => {
                for s in steps {
                    pct("ramp.steps[].percent", s.percent)?;
                    if s.after_secs < 0 {
                        return Err("ramp.steps[].after_secs must not be negative".into());
                    }
                }
            }
        }
        if let Some(r) = &self.rate_limit
            && r.period_secs <= 0
        {
            return Err("rate_limit.period_secs must be positive".into());
        }
        if self.in_flight_timeout_secs <= 0 {
            return Err("in_flight_timeout_secs must be positive".into());
        }
        for w in &self.windows {
            w.parse()?;
        }
        if let Some(h) = &self.halt {
            pct("halt.max_failure_percent", h.max_failure_percent)?;
        }
        if let Some(p) = &self.pin {
            Version::parse(p).map_err(|e| format!("pin {p:?} is not a version: {e}"))?;
        }
        Ok(())
    }
}

impl RolloutPolicy {
    /// The policy as labelled lines an operator reads (`rollout show`), in the order the rules
    /// apply: who is eligible, how fast grants go out, when, and what stops them.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let pct = |p: f64| format!("{p}%");
        let ramp = match &self.ramp {
            Ramp::None => "none".into(),
            Ramp::Linear { duration_secs } => format!(
                "linear from {} to 100% over {}",
                pct(self.start_percent),
                duration_text(*duration_secs)
            ),
            Ramp::Steps { steps } => steps
                .iter()
                .map(|s| format!("{} after {}", pct(s.percent), duration_text(s.after_secs)))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let mut lines = vec![("start", pct(self.start_percent)), ("ramp", ramp)];
        lines.push((
            "rate limit",
            self.rate_limit.as_ref().map_or("none".into(), |r| {
                format!(
                    "at most {} grants per {}",
                    r.max_grants,
                    duration_text(r.period_secs)
                )
            }),
        ));
        lines.push((
            "in flight",
            format!(
                "{} (a grant stops counting after {})",
                self.max_in_flight
                    .map_or("no limit".into(), |n| format!("at most {n}")),
                duration_text(self.in_flight_timeout_secs)
            ),
        ));
        lines.push((
            "windows",
            if self.windows.is_empty() {
                "always open".into()
            } else {
                self.windows
                    .iter()
                    .map(|w| {
                        format!(
                            "{} {} for {} ({})",
                            w.days.join(","),
                            w.start,
                            duration_text(i64::from(w.length_minutes) * 60),
                            w.time_zone
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ));
        lines.push((
            "halt",
            self.halt.as_ref().map_or("never".into(), |h| {
                format!(
                    "above {} failures, once {} hosts reported",
                    pct(h.max_failure_percent),
                    h.min_reports
                )
            }),
        ));
        lines.push(("pin", self.pin.clone().unwrap_or_else(|| "none".into())));
        lines
    }
}

/// Seconds as an operator writes them: "90s", "45m", "2h", "1h30m", "7d".
pub fn duration_text(secs: i64) -> String {
    if secs <= 0 {
        return format!("{secs}s");
    }
    let parts = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut left = secs;
    let mut out = String::new();
    for (unit, name) in parts {
        if left >= unit {
            out += &format!("{}{name}", left / unit);
            left %= unit;
        }
    }
    out
}

struct ParsedWindow {
    days: Vec<Weekday>,
    start: NaiveTime,
    length: Duration,
    tz: chrono_tz::Tz,
}

impl MaintenanceWindow {
    fn parse(&self) -> Result<ParsedWindow, String> {
        let days = self
            .days
            .iter()
            .map(|d| {
                d.parse::<Weekday>()
                    .map_err(|_| format!("window day {d:?} is not a weekday (mon..sun)"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let start = NaiveTime::parse_from_str(&self.start, "%H:%M")
            .map_err(|_| format!("window start {:?} is not HH:MM", self.start))?;
        let tz: chrono_tz::Tz = self
            .time_zone
            .parse()
            .map_err(|_| format!("window time zone {:?} is unknown", self.time_zone))?;
        if self.length_minutes == 0 || self.length_minutes > 7 * 24 * 60 {
            return Err(format!(
                "window length_minutes {} must be between 1 and 10080",
                self.length_minutes
            ));
        }
        Ok(ParsedWindow {
            days,
            start,
            length: Duration::minutes(i64::from(self.length_minutes)),
            tz,
        })
    }

    /// Whether `now` falls inside this window (an invalid window is never open).
    pub fn contains(&self, now: DateTime<Utc>) -> bool {
        let Ok(w) = self.parse() else { return false };
        let local = now.with_timezone(&w.tz);
        // A window that started up to 7 days ago may still be open.
        (0..=7).any(|back| {
            let day = local.date_naive() - Duration::days(back);
            if !w.days.contains(&day.weekday()) {
                return false;
            }
            let Some(start) = w.tz.from_local_datetime(&day.and_time(w.start)).earliest() else {
                return false;
            };
            let start = start.with_timezone(&Utc);
            now >= start && now < start + w.length
        })
    }
}

/// The state of one rollout (a channel, or a group override inside it).
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub policy: RolloutPolicy,
    /// Why it is paused (by an operator or by the automatic halt), if it is.
    pub paused: Option<String>,
    /// When the current release started rolling out (Unix seconds).
    pub started_at: i64,
}

/// The release a host would be offered.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseView {
    pub version: Version,
    /// Per-release salt for cohort buckets.
    pub salt: String,
    /// The release installs only over this version or newer (signed into its manifest).
    pub min_source_version: Option<Version>,
}

/// What the server knows about the asking host.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostView {
    pub machine_id: String,
    /// The version it runs (None when it did not send a parseable one).
    pub version: Option<Version>,
    /// The release it failed (install error, failed post-boot check, rollback), if any.
    pub failed_version: Option<Version>,
    /// It was granted the target release and that grant is still in flight.
    pub in_flight_for_target: bool,
}

/// Counts for this rollout and release, read from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RolloutCounts {
    /// New grants within the rate limit's period.
    pub grants_in_period: u64,
    /// Hosts granted but not finished, within the in-flight timeout.
    pub in_flight: u64,
    /// Hosts that reported success for this release.
    pub successes: u64,
    /// Hosts that reported failure for this release.
    pub failures: u64,
}

/// Why a host is not offered the release (sent to the host as `noupdate`).
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    UpToDate,
    /// The host runs a newer version and no pin asks for a downgrade.
    HostNewer,
    /// The host failed this release before.
    Quarantined,
    /// The host runs a version older than the release's minimum source version (or sent none),
    /// so it must update to an intermediate release first.
    BelowMinSourceVersion {
        min: Version,
    },
    Paused(String),
    /// The failure threshold was crossed just now: the caller pauses the rollout.
    HaltTriggered(String),
    NotInCohort {
        bucket: u64,
        percent: f64,
    },
    OutsideWindow,
    RateLimited,
    TooManyInFlight,
}

impl Hold {
    /// Short label for metrics and history.
    pub fn label(&self) -> &'static str {
        match self {
            Hold::UpToDate => "up_to_date",
            Hold::HostNewer => "host_newer",
            Hold::Quarantined => "quarantined",
            Hold::BelowMinSourceVersion { .. } => "below_min_source_version",
            Hold::Paused(_) => "paused",
            Hold::HaltTriggered(_) => "halted",
            Hold::NotInCohort { .. } => "not_in_cohort",
            Hold::OutsideWindow => "outside_window",
            Hold::RateLimited => "rate_limited",
            Hold::TooManyInFlight => "too_many_in_flight",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Offer the release. `renewed`: the host already holds an in-flight grant for it (not a new
    /// grant, so it does not count against limits). `downgrade`: the release is older than the host.
    Grant {
        renewed: bool,
        downgrade: bool,
    },
    Hold(Hold),
}

/// Stable cohort bucket of a machine for a release: first 8 bytes of SHA-256(salt || machine id),
/// big-endian, modulo 10,000.
pub fn bucket(salt: &str, machine_id: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(machine_id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

/// Eligible share (0-100) at `now` for a rollout that started at `started_at`.
pub fn rollout_percent(policy: &RolloutPolicy, started_at: i64, now: i64) -> f64 {
    let elapsed = (now - started_at).max(0);
    let start = policy.start_percent.clamp(0.0, 100.0);
    let p = match &policy.ramp {
        Ramp::None => start,
        Ramp::Linear { duration_secs } => {
            let frac = if *duration_secs <= 0 {
                1.0
            } else {
                (elapsed as f64 / *duration_secs as f64).min(1.0)
            };
            start + (100.0 - start) * frac
        }
        Ramp::Steps { steps } => steps
            .iter()
            .filter(|s| s.after_secs <= elapsed)
            .map(|s| s.percent)
            .fold(start, f64::max),
    };
    p.clamp(0.0, 100.0)
}

/// Whether the failure threshold is crossed; the reason names the counts.
pub fn halt_reason(rule: Option<&HaltRule>, counts: &RolloutCounts) -> Option<String> {
    let rule = rule?;
    let reports = counts.successes + counts.failures;
    if reports == 0 || reports < rule.min_reports {
        return None;
    }
    let failure_percent = counts.failures as f64 * 100.0 / reports as f64;
    (failure_percent > rule.max_failure_percent).then(|| {
        format!(
            "automatic halt: {} of {} reported hosts failed ({:.1}% > {}%)",
            counts.failures, reports, failure_percent, rule.max_failure_percent
        )
    })
}

/// The rollout decision for one host asking for an update.
pub fn decide(
    rollout: &Rollout,
    release: &ReleaseView,
    host: &HostView,
    counts: &RolloutCounts,
    now: DateTime<Utc>,
) -> Decision {
    let pinned = rollout.policy.pin.is_some();
    let mut downgrade = false;
    if let Some(v) = &host.version {
        if *v == release.version {
            return Decision::Hold(Hold::UpToDate);
        }
        if *v > release.version {
            if !pinned {
                return Decision::Hold(Hold::HostNewer);
            }
            downgrade = true;
        }
    }
    if let Some(min) = &release.min_source_version
        && host.version.as_ref().is_none_or(|v| v < min)
    {
        return Decision::Hold(Hold::BelowMinSourceVersion { min: min.clone() });
    }
    if host.failed_version.as_ref() == Some(&release.version) {
        return Decision::Hold(Hold::Quarantined);
    }
    if let Some(reason) = &rollout.paused {
        return Decision::Hold(Hold::Paused(reason.clone()));
    }
    if let Some(reason) = halt_reason(rollout.policy.halt.as_ref(), counts) {
        return Decision::Hold(Hold::HaltTriggered(reason));
    }
    if host.in_flight_for_target {
        return Decision::Grant {
            renewed: true,
            downgrade,
        };
    }
    let percent = rollout_percent(&rollout.policy, rollout.started_at, now.timestamp());
    let b = bucket(&release.salt, &host.machine_id);
    if (b as f64) >= percent * (BUCKETS as f64 / 100.0) {
        return Decision::Hold(Hold::NotInCohort { bucket: b, percent });
    }
    let windows = &rollout.policy.windows;
    if !windows.is_empty() && !windows.iter().any(|w| w.contains(now)) {
        return Decision::Hold(Hold::OutsideWindow);
    }
    if let Some(r) = &rollout.policy.rate_limit
        && counts.grants_in_period >= r.max_grants
    {
        return Decision::Hold(Hold::RateLimited);
    }
    if let Some(max) = rollout.policy.max_in_flight
        && counts.in_flight >= max
    {
        return Decision::Hold(Hold::TooManyInFlight);
    }
    Decision::Grant {
        renewed: false,
        downgrade,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const T0: &str = "2026-03-02T12:00:00Z"; // a Monday

    fn rollout(policy: RolloutPolicy) -> Rollout {
        Rollout {
            policy,
            paused: None,
            started_at: at(T0).timestamp(),
        }
    }

    fn release() -> ReleaseView {
        ReleaseView {
            version: v("2.0.0"),
            salt: "salt-1".into(),
            min_source_version: None,
        }
    }

    fn host(id: &str, version: &str) -> HostView {
        HostView {
            machine_id: id.into(),
            version: Some(v(version)),
            ..HostView::default()
        }
    }

    /// One check: decision for host `id` running 1.0.0 under `policy` at `now`.
    fn check(policy: RolloutPolicy, id: &str, counts: RolloutCounts, now: &str) -> Decision {
        decide(
            &rollout(policy),
            &release(),
            &host(id, "1.0.0"),
            &counts,
            at(now),
        )
    }

    const GRANT: Decision = Decision::Grant {
        renewed: false,
        downgrade: false,
    };

    #[test]
    fn bucket_is_stable_and_salted() {
        assert_eq!(bucket("s", "m1"), bucket("s", "m1"));
        assert!(bucket("s", "m1") < BUCKETS);
        let differs = (0..50)
            .filter(|i| bucket("a", &format!("m{i}")) != bucket("b", &format!("m{i}")))
            .count();
        assert!(differs > 40);
        // Known value: SHA-256("saltmachine") first 8 bytes mod 10000, computed independently.
        let d = Sha256::digest(b"saltmachine");
        let want = u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000;
        assert_eq!(bucket("salt", "machine"), want);
    }

    #[test]
    fn default_policy_grants_older_hosts_and_holds_current_ones() {
        let c = RolloutCounts::default();
        assert_eq!(check(RolloutPolicy::default(), "m", c, T0), GRANT);
        let current = host("m", "2.0.0");
        let r = rollout(RolloutPolicy::default());
        assert_eq!(
            decide(&r, &release(), &current, &c, at(T0)),
            Decision::Hold(Hold::UpToDate)
        );
        let newer = host("m", "3.0.0");
        assert_eq!(
            decide(&r, &release(), &newer, &c, at(T0)),
            Decision::Hold(Hold::HostNewer)
        );
        let unknown = HostView {
            machine_id: "m".into(),
            ..HostView::default()
        };
        assert_eq!(decide(&r, &release(), &unknown, &c, at(T0)), GRANT);
    }

    #[test]
    fn pin_offers_a_downgrade() {
        let policy = RolloutPolicy {
            pin: Some("2.0.0".into()),
            ..RolloutPolicy::default()
        };
        let newer = host("m", "3.0.0");
        assert_eq!(
            decide(
                &rollout(policy),
                &release(),
                &newer,
                &RolloutCounts::default(),
                at(T0)
            ),
            Decision::Grant {
                renewed: false,
                downgrade: true
            }
        );
    }

    #[test]
    fn staged_percent_selects_stable_growing_cohort() {
        let ids: Vec<String> = (0..2000).map(|i| format!("machine-{i}")).collect();
        let eligible = |pct: f64| -> Vec<&String> {
            let p = RolloutPolicy {
                start_percent: pct,
                ..RolloutPolicy::default()
            };
            ids.iter()
                .filter(|id| check(p.clone(), id, RolloutCounts::default(), T0) == GRANT)
                .collect()
        };
        let ten = eligible(10.0);
        let fifty = eligible(50.0);
        assert!((120..=280).contains(&ten.len()), "{}", ten.len());
        assert!((850..=1150).contains(&fifty.len()), "{}", fifty.len());
        assert!(ten.iter().all(|id| fifty.contains(id)));
        assert!(eligible(0.0).is_empty());
        assert_eq!(eligible(100.0).len(), ids.len());
        // The hold says which bucket and percent.
        let held = ids
            .iter()
            .find(|id| !ten.contains(id))
            .expect("someone outside 10%");
        let p = RolloutPolicy {
            start_percent: 10.0,
            ..RolloutPolicy::default()
        };
        match check(p, held, RolloutCounts::default(), T0) {
            Decision::Hold(Hold::NotInCohort { bucket: b, percent }) => {
                assert!(b >= 1000);
                assert_eq!(percent, 10.0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn linear_ramp_and_steps() {
        let start = at(T0).timestamp();
        let linear = RolloutPolicy {
            start_percent: 10.0,
            ramp: Ramp::Linear {
                duration_secs: 1000,
            },
            ..RolloutPolicy::default()
        };
        assert_eq!(rollout_percent(&linear, start, start - 50), 10.0);
        assert_eq!(rollout_percent(&linear, start, start), 10.0);
        assert_eq!(rollout_percent(&linear, start, start + 500), 55.0);
        assert_eq!(rollout_percent(&linear, start, start + 5000), 100.0);
        let steps = RolloutPolicy {
            start_percent: 1.0,
            ramp: Ramp::Steps {
                steps: vec![
                    Step {
                        after_secs: 3600,
                        percent: 25.0,
                    },
                    Step {
                        after_secs: 7200,
                        percent: 60.0,
                    },
                ],
            },
            ..RolloutPolicy::default()
        };
        assert_eq!(rollout_percent(&steps, start, start + 3599), 1.0);
        assert_eq!(rollout_percent(&steps, start, start + 3600), 25.0);
        assert_eq!(rollout_percent(&steps, start, start + 9000), 60.0);
    }

    #[test]
    fn rate_limit_and_in_flight() {
        let p = RolloutPolicy {
            rate_limit: Some(RateLimit {
                max_grants: 5,
                period_secs: 3600,
            }),
            max_in_flight: Some(3),
            ..RolloutPolicy::default()
        };
        let counts = |g, f| RolloutCounts {
            grants_in_period: g,
            in_flight: f,
            ..RolloutCounts::default()
        };
        assert_eq!(check(p.clone(), "m", counts(4, 2), T0), GRANT);
        assert_eq!(
            check(p.clone(), "m", counts(5, 0), T0),
            Decision::Hold(Hold::RateLimited)
        );
        assert_eq!(
            check(p.clone(), "m", counts(0, 3), T0),
            Decision::Hold(Hold::TooManyInFlight)
        );
        // A host already holding an in-flight grant is answered again, limits or not.
        let mut h = host("m", "1.0.0");
        h.in_flight_for_target = true;
        assert_eq!(
            decide(&rollout(p), &release(), &h, &counts(5, 3), at(T0)),
            Decision::Grant {
                renewed: true,
                downgrade: false
            }
        );
    }

    fn window(days: &[&str], start: &str, minutes: u32, tz: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            length_minutes: minutes,
            time_zone: tz.into(),
        }
    }

    #[test]
    fn maintenance_windows_respect_time_zone_and_midnight() {
        // Mondays 02:00-04:00 in Berlin (UTC+1 in March before DST).
        let w = window(&["mon"], "02:00", 120, "Europe/Berlin");
        assert!(w.contains(at("2026-03-02T01:30:00Z")));
        assert!(!w.contains(at("2026-03-02T00:59:59Z")));
        assert!(!w.contains(at("2026-03-02T03:00:00Z")));
        assert!(!w.contains(at("2026-03-03T01:30:00Z"))); // Tuesday
        // Sunday 23:00 for 3 hours runs into Monday.
        let late = window(&["sun"], "23:00", 180, "UTC");
        assert!(late.contains(at("2026-03-02T01:59:00Z")));
        assert!(!late.contains(at("2026-03-02T02:00:00Z")));
        let p = RolloutPolicy {
            windows: vec![w],
            ..RolloutPolicy::default()
        };
        assert_eq!(
            check(
                p.clone(),
                "m",
                RolloutCounts::default(),
                "2026-03-02T12:00:00Z"
            ),
            Decision::Hold(Hold::OutsideWindow)
        );
        assert_eq!(
            check(p, "m", RolloutCounts::default(), "2026-03-02T01:00:00Z"),
            GRANT
        );
    }

    #[test]
    fn automatic_halt_needs_minimum_reports() {
        let p = RolloutPolicy {
            halt: Some(HaltRule {
                max_failure_percent: 20.0,
                min_reports: 5,
            }),
            ..RolloutPolicy::default()
        };
        let counts = |s, f| RolloutCounts {
            successes: s,
            failures: f,
            ..RolloutCounts::default()
        };
        // 3 of 3 failed, but fewer than 5 reports: keep going.
        assert_eq!(check(p.clone(), "m", counts(0, 3), T0), GRANT);
        // 1 of 5 = 20%: not above the threshold.
        assert_eq!(check(p.clone(), "m", counts(4, 1), T0), GRANT);
        // 2 of 5 = 40%: halt, and the reason names the counts.
        match check(p.clone(), "m", counts(3, 2), T0) {
            Decision::Hold(Hold::HaltTriggered(reason)) => {
                assert!(reason.contains("2 of 5"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(halt_reason(None, &counts(0, 100)), None);
    }

    #[test]
    fn pause_and_quarantine_hold() {
        let mut r = rollout(RolloutPolicy::default());
        r.paused = Some("operator".into());
        let c = RolloutCounts::default();
        assert_eq!(
            decide(&r, &release(), &host("m", "1.0.0"), &c, at(T0)),
            Decision::Hold(Hold::Paused("operator".into()))
        );
        let r = rollout(RolloutPolicy::default());
        let mut h = host("m", "1.0.0");
        h.failed_version = Some(v("2.0.0"));
        assert_eq!(
            decide(&r, &release(), &h, &c, at(T0)),
            Decision::Hold(Hold::Quarantined)
        );
        h.failed_version = Some(v("1.5.0"));
        assert_eq!(decide(&r, &release(), &h, &c, at(T0)), GRANT);
    }

    #[test]
    fn hosts_below_the_minimum_source_version_are_held() {
        let mut rel = release();
        rel.min_source_version = Some(v("1.5.0"));
        let r = rollout(RolloutPolicy::default());
        let c = RolloutCounts::default();
        let below = Decision::Hold(Hold::BelowMinSourceVersion { min: v("1.5.0") });
        assert_eq!(decide(&r, &rel, &host("m", "1.4.9"), &c, at(T0)), below);
        assert_eq!(decide(&r, &rel, &host("m", "1.5.0"), &c, at(T0)), GRANT);
        assert_eq!(decide(&r, &rel, &host("m", "1.9.0"), &c, at(T0)), GRANT);
        // A host that sends no version cannot show it is recent enough.
        let unknown = HostView {
            machine_id: "m".into(),
            ..HostView::default()
        };
        assert_eq!(decide(&r, &rel, &unknown, &c, at(T0)), below);
        let label = Hold::BelowMinSourceVersion { min: v("1.0.0") }.label();
        assert_eq!(label, "below_min_source_version");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |p: RolloutPolicy| p.validate().unwrap_err();
        assert!(
            bad(RolloutPolicy {
                start_percent: 120.0,
                ..RolloutPolicy::default()
            })
            .contains("start_percent")
        );
        assert!(
            bad(RolloutPolicy {
                windows: vec![window(&["moon"], "02:00", 60, "UTC")],
                ..RolloutPolicy::default()
            })
            .contains("moon")
        );
        assert!(
            bad(RolloutPolicy {
                windows: vec![window(&["mon"], "02:00", 60, "Mars/Base")],
                ..RolloutPolicy::default()
            })
            .contains("Mars/Base")
        );
        assert!(
            bad(RolloutPolicy {
                pin: Some("x".into()),
                ..RolloutPolicy::default()
            })
            .contains("pin")
        );
        RolloutPolicy::default().validate().unwrap();
        let json: RolloutPolicy = serde_json::from_str(
            r#"{"start_percent":5,"ramp":{"kind":"linear","duration_secs":3600},"halt":{"max_failure_percent":10,"min_reports":3}}"#,
        )
        .unwrap();
        assert_eq!(
            json.ramp,
            Ramp::Linear {
                duration_secs: 3600
            }
        );
        assert!(serde_json::from_str::<RolloutPolicy>(r#"{"start_percnt":5}"#).is_err());
    }

    #[test]
    fn describe_reads_like_the_flags_that_set_it() {
        assert_eq!(duration_text(90), "1m30s");
        assert_eq!(duration_text(7200), "2h");
        assert_eq!(duration_text(7 * 86_400 + 60), "7d1m");
        assert_eq!(duration_text(0), "0s");
        let p = RolloutPolicy {
            start_percent: 25.0,
            ramp: Ramp::Steps {
                steps: vec![
                    Step {
                        after_secs: 3600,
                        percent: 50.0,
                    },
                    Step {
                        after_secs: 7200,
                        percent: 100.0,
                    },
                ],
            },
            rate_limit: Some(RateLimit {
                max_grants: 50,
                period_secs: 600,
            }),
            max_in_flight: Some(10),
            in_flight_timeout_secs: 7200,
            windows: vec![MaintenanceWindow {
                days: vec!["mon".into(), "tue".into()],
                start: "02:00".into(),
                length_minutes: 120,
                time_zone: "Europe/Berlin".into(),
            }],
            halt: Some(HaltRule {
                max_failure_percent: 10.0,
                min_reports: 5,
            }),
            pin: Some("1.0.0".into()),
        };
        let text: Vec<String> = p
            .describe()
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        assert_eq!(
            text,
            [
                "start: 25%",
                "ramp: 50% after 1h, 100% after 2h",
                "rate limit: at most 50 grants per 10m",
                "in flight: at most 10 (a grant stops counting after 2h)",
                "windows: mon,tue 02:00 for 2h (Europe/Berlin)",
                "halt: above 10% failures, once 5 hosts reported",
                "pin: 1.0.0",
            ]
        );
        let d: Vec<String> = RolloutPolicy::default()
            .describe()
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        assert_eq!(
            d,
            [
                "start: 100%",
                "ramp: none",
                "rate limit: none",
                "in flight: no limit (a grant stops counting after 2h)",
                "windows: always open",
                "halt: never",
                "pin: none",
            ]
        );
        let linear = RolloutPolicy {
            start_percent: 5.0,
            ramp: Ramp::Linear {
                duration_secs: 86_400,
            },
            ..RolloutPolicy::default()
        };
        assert_eq!(linear.describe()[1].1, "linear from 5% to 100% over 1d");
    }
}
