//! Reboot windows: when a group may start new reboots (UTC).
//!
//! Syntax: `[DAYS ]HH:MM-HH:MM`, DAYS being a comma list of days or day ranges
//! (`Mon-Fri`, `Sat,Sun`, `Mon,Wed-Fri`); without DAYS every day. The end is exclusive, may be
//! `24:00`, and may be earlier than the start for windows that cross midnight (the part after
//! midnight belongs to the day the window started).

use std::fmt;
use std::str::FromStr;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One reboot window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootWindow {
    /// Index 0 = Monday.
    days: [bool; 7],
    start_minute: u16,
    end_minute: u16,
    text: String,
}

/// A group's windows: open when any of them is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowSet(pub Vec<RebootWindow>);

impl WindowSet {
    /// No windows means always open.
    pub fn is_open(&self, unix_seconds: u64) -> bool {
        self.0.is_empty() || self.0.iter().any(|w| w.contains(unix_seconds))
    }
}

impl fmt::Display for WindowSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<&str> = self.0.iter().map(|w| w.text.as_str()).collect();
        write!(f, "{} UTC", texts.join(" or "))
    }
}

/// Day index (0 = Monday) and minute of the day of a unix time, UTC.
pub fn weekday_and_minute(unix_seconds: u64) -> (usize, u16) {
    let days = unix_seconds / 86_400;
    // 1970-01-01 was a Thursday (index 3).
    let weekday = ((days + 3) % 7) as usize;
    let minute = ((unix_seconds % 86_400) / 60) as u16;
    (weekday, minute)
}

impl RebootWindow {
    pub fn contains(&self, unix_seconds: u64) -> bool {
        let (day, minute) = weekday_and_minute(unix_seconds);
        if self.start_minute < self.end_minute {
            self.days[day] && minute >= self.start_minute && minute < self.end_minute
        } else {
            let previous = (day + 6) % 7;
            (self.days[day] && minute >= self.start_minute)
                || (self.days[previous] && minute < self.end_minute)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid reboot window {text:?}: {reason} (expected e.g. \"Mon-Fri 02:00-05:00\" or \"22:00-04:00\")"
)]
pub struct WindowError {
    pub text: String,
    pub reason: String,
}

fn parse_day(s: &str) -> Option<usize> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let lower = s.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .zip(FULL)
        .position(|(short, full)| lower == *short || lower == full)
}

fn parse_time(s: &str, allow_24: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    if h == 24 && m == 0 && allow_24 {
        return Some(24 * 60);
    }
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl FromStr for RebootWindow {
    type Err = WindowError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| WindowError {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_text, times_text) = match parts.as_slice() {
            [t] => (None, *t),
            [d, t] => (Some(*d), *t),
            _ => return Err(err("expected \"[DAYS ]HH:MM-HH:MM\"")),
        };
        let mut days = [days_text.is_none(); 7];
        if let Some(d) = days_text {
            for item in d.split(',') {
                match item.split_once('-') {
                    Some((a, b)) => {
                        let a = parse_day(a).ok_or_else(|| err(&format!("unknown day {a:?}")))?;
                        let b = parse_day(b).ok_or_else(|| err(&format!("unknown day {b:?}")))?;
                        let mut i = a;
                        loop {
                            days[i] = true;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    }
                    None => {
                        let a =
                            parse_day(item).ok_or_else(|| err(&format!("unknown day {item:?}")))?;
                        days[a] = true;
                    }
                }
            }
        }
        let (start, end) = times_text
            .split_once('-')
            .ok_or_else(|| err("expected a time range HH:MM-HH:MM"))?;
        let start_minute =
            parse_time(start, false).ok_or_else(|| err(&format!("bad start time {start:?}")))?;
        let end_minute =
            parse_time(end, true).ok_or_else(|| err(&format!("bad end time {end:?}")))?;
        if start_minute == end_minute {
            return Err(err(
                "start and end are equal (use 00:00-24:00 for a whole day)",
            ));
        }
        Ok(RebootWindow {
            days,
            start_minute,
            end_minute,
            text: text.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-01-01 was a Monday.
    const MONDAY_MIDNIGHT: u64 = 1_704_067_200;

    fn at(day: u64, hh: u64, mm: u64) -> u64 {
        MONDAY_MIDNIGHT + day * 86_400 + hh * 3600 + mm * 60
    }

    fn check(spec: &str, cases: &[(u64, u64, u64, bool)]) {
        let w: RebootWindow = spec.parse().unwrap();
        for &(d, h, m, open) in cases {
            assert_eq!(
                w.contains(at(d, h, m)),
                open,
                "{spec} day {d} {h:02}:{m:02}"
            );
        }
    }

    #[test]
    fn weekday_arithmetic() {
        assert_eq!(weekday_and_minute(0), (3, 0));
        assert_eq!(weekday_and_minute(MONDAY_MIDNIGHT), (0, 0));
        assert_eq!(weekday_and_minute(at(6, 23, 59)), (6, 23 * 60 + 59));
    }

    #[test]
    fn windows() {
        check(
            "Mon-Fri 02:00-05:00",
            &[
                (0, 2, 0, true),
                (0, 4, 59, true),
                (0, 5, 0, false),
                (0, 1, 59, false),
                (4, 3, 0, true),
                (5, 3, 0, false),
                (6, 3, 0, false),
            ],
        );
        check(
            "Sat,Sun 22:00-04:00",
            &[
                (5, 22, 0, true),
                (6, 3, 59, true), // Saturday's window spilling into Sunday
                (6, 23, 0, true),
                (0, 3, 0, true), // Sunday's window spilling into Monday
                (0, 22, 0, false),
                (5, 3, 0, false), // Friday had no window
            ],
        );
        check("00:00-24:00", &[(2, 0, 0, true), (2, 23, 59, true)]);
        check(
            "Fri-Mon 10:00-11:00",
            &[(4, 10, 0, true), (0, 10, 30, true), (1, 10, 30, false)],
        );
        assert!(WindowSet::default().is_open(at(0, 0, 0)));
    }

    #[test]
    fn bad_windows() {
        for bad in [
            "",
            "Mon",
            "Mon 2-5",
            "Xyz 02:00-03:00",
            "25:00-26:00",
            "02:00-02:00",
            "a b c",
        ] {
            let e = bad.parse::<RebootWindow>().unwrap_err();
            assert!(e.to_string().contains("invalid reboot window"), "{bad}");
        }
    }
}
