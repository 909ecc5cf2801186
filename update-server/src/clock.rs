//! The server's clock: real time, or real time sped up by a scale for demos and simulations.
//!
//! Every time-dependent decision of a running server (ramp progress, maintenance windows,
//! in-flight timeouts, failure windows, metrics windows, activity timestamps) reads this clock,
//! through [`crate::server::AppState::now`]. With a scale F the virtual time is
//! `start + real elapsed × F`, where `start` is the wall-clock time when the server started; at
//! F = 1 it is the wall clock.

use std::time::Instant;

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};

/// A clock that runs `scale` times faster than the wall clock from the moment it was made.
#[derive(Debug, Clone, Copy)]
pub struct ServerClock {
    started: Instant,
    start_unix_ms: i64,
    scale: f64,
}

impl ServerClock {
    /// A clock starting at the current wall-clock time. `scale` must be finite and positive.
    pub fn new(scale: f64) -> Result<ServerClock> {
        Self::starting_at(Utc::now().timestamp_millis(), scale)
    }

    /// A clock whose virtual time is `start_unix_ms` now.
    pub fn starting_at(start_unix_ms: i64, scale: f64) -> Result<ServerClock> {
        validate_scale(scale)?;
        Ok(ServerClock {
            started: Instant::now(),
            start_unix_ms,
            scale,
        })
    }

    /// How much faster than the wall clock this clock runs.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Virtual now, Unix milliseconds.
    pub fn now_millis(&self) -> i64 {
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1000.0 * self.scale;
        // Saturates instead of wrapping for absurd scales.
        self.start_unix_ms.saturating_add(elapsed_ms as i64)
    }

    /// Virtual now, Unix seconds.
    pub fn now(&self) -> i64 {
        self.now_millis().div_euclid(1000)
    }

    /// Virtual now as a date.
    pub fn now_utc(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_millis()).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// A time scale must be a finite number above zero; the message names the flag.
pub fn validate_scale(scale: f64) -> Result<()> {
    if !scale.is_finite() || scale <= 0.0 {
        bail!(
            "--time-scale {scale} is invalid: it must be a finite number greater than 0 (1 = real time)"
        );
    }
    Ok(())
}

/// Parses `--time-scale` for clap.
pub fn parse_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number (1 = real time, 60 = a minute per second)"))?;
    validate_scale(v).map_err(|e| e.to_string())?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_must_be_finite_and_positive() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = ServerClock::new(bad).unwrap_err().to_string();
            assert!(e.contains("--time-scale"), "{e}");
        }
        assert!(parse_scale("fast").unwrap_err().contains("not a number"));
        assert!(parse_scale("0").unwrap_err().contains("greater than 0"));
        assert_eq!(parse_scale("3600").unwrap(), 3600.0);
    }

    #[test]
    fn virtual_time_starts_at_the_start_and_never_runs_backwards() {
        let c = ServerClock::starting_at(1_000_000, 1000.0).unwrap();
        let a = c.now_millis();
        assert!(a >= 1_000_000);
        let b = c.now_millis();
        assert!(b >= a);
        assert!(c.now() >= 1000);
        assert!(c.now_utc().timestamp() >= 1000);
        let real = ServerClock::new(1.0).unwrap();
        assert!((real.now() - Utc::now().timestamp()).abs() <= 1);
    }
}
