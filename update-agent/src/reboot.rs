//! Rebooting: maintenance windows (pure), the [`Rebooter`] trait, and the real rebooters
//! (logind over D-Bus, or sync + reboot(2)).

use std::time::Duration;

use jiff::{Timestamp, ToSpan};

use crate::config::{MaintenanceWindow, RebootMethod};
use crate::error::{AgentError, AgentResult, ErrorKind};

/// Reboots the host.
pub trait Rebooter: Send {
    fn reboot(&mut self) -> AgentResult<()>;
}

/// The wall clock.
pub trait Clock: Send {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Whether `now` falls inside one of `windows` (no windows: always).
pub fn in_window(windows: &[MaintenanceWindow], now: Timestamp) -> bool {
    windows.is_empty() || windows.iter().any(|w| window_contains(w, now))
}

fn window_contains(w: &MaintenanceWindow, now: Timestamp) -> bool {
    // A window that started on an earlier day may still be open: look back far enough.
    let days_back = w.length.as_secs().div_ceil(86_400) as i64;
    for back in 0..=days_back {
        let Some(start) = start_days_from(w, now, -back) else {
            continue;
        };
        let Ok(end) = start.checked_add(w.length) else {
            continue;
        };
        if start <= now && now < end {
            return true;
        }
    }
    false
}

/// When `w` opens `days` days after (before, when negative) `now`'s date in the window's time
/// zone, if it opens that weekday.
fn start_days_from(w: &MaintenanceWindow, now: Timestamp, days: i64) -> Option<Timestamp> {
    let day = now
        .to_zoned(w.time_zone.clone())
        .date()
        .checked_add(days.days())
        .ok()?;
    window_start(w, day)
}

/// When `w` opens on `day` (local to the window's time zone), if it opens that weekday.
fn window_start(w: &MaintenanceWindow, day: jiff::civil::Date) -> Option<Timestamp> {
    if !w.days.contains(&day.weekday()) {
        return None;
    }
    let start = day
        .to_datetime(w.start)
        .to_zoned(w.time_zone.clone())
        .ok()?;
    Some(start.timestamp())
}

/// How long until the next window opens (zero when inside one or when there are no windows).
pub fn until_window(windows: &[MaintenanceWindow], now: Timestamp) -> Duration {
    if in_window(windows, now) {
        return Duration::ZERO;
    }
    // Step through the next 8 days minute by minute would be slow; check each window start.
    let mut best: Option<Duration> = None;
    for w in windows {
        for ahead in 0..=7i64 {
            let Some(start) = start_days_from(w, now, ahead) else {
                continue;
            };
            if start > now {
                let d = Duration::from_secs((start.as_second() - now.as_second()).max(0) as u64);
                best = Some(best.map_or(d, |b| b.min(d)));
                break;
            }
        }
    }
    best.unwrap_or(Duration::from_secs(3600))
}

/// sync(2) then reboot(2).
pub struct SyscallRebooter;

impl Rebooter for SyscallRebooter {
    fn reboot(&mut self) -> AgentResult<()> {
        nix::unistd::sync();
        match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
            Ok(never) => match never {},
            Err(e) => Err(AgentError::new(
                ErrorKind::Internal,
                format!("reboot(2) failed: {e}"),
            )),
        }
    }
}

/// Asks logind to reboot (`org.freedesktop.login1.Manager.Reboot`), falling back to the syscall
/// when allowed and logind is not reachable.
pub struct LogindRebooter {
    pub rt: tokio::runtime::Handle,
    pub method: RebootMethod,
}

impl Rebooter for LogindRebooter {
    fn reboot(&mut self) -> AgentResult<()> {
        if self.method != RebootMethod::Syscall {
            let r = self.rt.block_on(async {
                let conn = zbus::Connection::system().await?;
                conn.call_method(
                    Some("org.freedesktop.login1"),
                    "/org/freedesktop/login1",
                    Some("org.freedesktop.login1.Manager"),
                    "Reboot",
                    &(false,),
                )
                .await?;
                Ok::<_, zbus::Error>(())
            });
            match r {
                Ok(()) => return Ok(()),
                Err(e) if self.method == RebootMethod::Logind => {
                    return Err(AgentError::new(
                        ErrorKind::Internal,
                        format!("logind reboot failed: {e}"),
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "logind not reachable, rebooting with reboot(2)")
                }
            }
        }
        SyscallRebooter.reboot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::{Weekday, time};
    use jiff::tz::TimeZone;

    fn window(days: &[Weekday], h: i8, m: i8, minutes: u64, tz: TimeZone) -> MaintenanceWindow {
        MaintenanceWindow {
            days: days.to_vec(),
            start: time(h, m, 0, 0),
            length: Duration::from_secs(minutes * 60),
            time_zone: tz,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn window_membership() {
        // 2026-11-21 is a Saturday.
        let sat_night = window(&[Weekday::Saturday], 22, 0, 180, TimeZone::UTC);
        let cases = [
            ("2026-11-21T21:59:59Z", false),
            ("2026-11-21T22:00:00Z", true),
            ("2026-11-22T00:59:59Z", true), // crosses midnight into Sunday
            ("2026-11-22T01:00:00Z", false),
            ("2026-11-28T23:00:00Z", true),
        ];
        for (t, expected) in cases {
            assert_eq!(
                in_window(std::slice::from_ref(&sat_night), ts(t)),
                expected,
                "{t}"
            );
        }
        assert!(in_window(&[], ts("2026-11-21T12:00:00Z")));
    }

    #[test]
    fn window_in_a_time_zone() {
        let plus2 = TimeZone::fixed(jiff::tz::offset(2));
        let w = window(&[Weekday::Monday], 3, 0, 60, plus2);
        // 2026-11-23 is a Monday; 03:00 at +02:00 is 01:00 UTC.
        assert!(in_window(
            std::slice::from_ref(&w),
            ts("2026-11-23T01:30:00Z")
        ));
        assert!(!in_window(
            std::slice::from_ref(&w),
            ts("2026-11-23T03:30:00Z")
        ));
        assert_eq!(
            until_window(&[w], ts("2026-11-23T00:00:00Z")),
            Duration::from_secs(3600)
        );
    }
}
