//! Post-boot health checks: built-in checks plus the operator's hooks.
//!
//! Hooks are executables in `CHECK_DIR/required.d/` (any failure = bad boot) and
//! `CHECK_DIR/wanted.d/` (failure = warning), run in file name order, each with a timeout, with
//! stdout and stderr captured into the report. Non-executable files and files whose name starts
//! with a dot are skipped.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Most bytes of a hook's stdout and of its stderr kept in the report.
pub const MAX_CAPTURE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    Required,
    Wanted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed(String),
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub requirement: Requirement,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
    pub duration: Duration,
}

/// All checks of one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    pub results: Vec<CheckResult>,
}

impl HealthReport {
    /// True when every required check passed.
    pub fn healthy(&self) -> bool {
        !self
            .results
            .iter()
            .any(|r| r.requirement == Requirement::Required && r.outcome != Outcome::Passed)
    }

    /// The first failed required check.
    pub fn first_failure(&self) -> Option<&CheckResult> {
        self.results
            .iter()
            .find(|r| r.requirement == Requirement::Required && r.outcome != Outcome::Passed)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &CheckResult> {
        self.results
            .iter()
            .filter(|r| r.requirement == Requirement::Wanted && r.outcome != Outcome::Passed)
    }

    /// One line per check, then captured output of failed checks.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for r in &self.results {
            let req = match r.requirement {
                Requirement::Required => "required",
                Requirement::Wanted => "wanted",
            };
            match &r.outcome {
                Outcome::Passed => s.push_str(&format!("{req} {}: passed\n", r.name)),
                Outcome::Failed(why) => {
                    s.push_str(&format!("{req} {}: FAILED: {why}\n", r.name));
                    if !r.stdout.is_empty() {
                        s.push_str(&format!("  stdout: {}\n", r.stdout.trim_end()));
                    }
                    if !r.stderr.is_empty() {
                        s.push_str(&format!("  stderr: {}\n", r.stderr.trim_end()));
                    }
                }
            }
        }
        s
    }
}

/// Lists the executable hooks of one directory, in name order.
pub fn hooks_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut hooks: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .collect();
    hooks.sort();
    hooks
}

/// Runs one hook with a timeout, capturing its output.
pub fn run_hook(path: &Path, requirement: Requirement, timeout: Duration) -> CheckResult {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let started = Instant::now();
    let result = |outcome, stdout, stderr| CheckResult {
        name: name.clone(),
        requirement,
        outcome,
        stdout,
        stderr,
        duration: started.elapsed(),
    };
    let mut child = match Command::new(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return result(
                Outcome::Failed(format!("cannot run {}: {e}", path.display())),
                String::new(),
                String::new(),
            );
        }
    };
    let pid = child.id() as i32;
    let capture = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut r) = r {
                let mut buf = [0u8; 8192];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if out.len() < MAX_CAPTURE {
                        let take = n.min(MAX_CAPTURE - out.len());
                        out.extend_from_slice(&buf[..take]);
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let out_t = capture(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = capture(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                // Kill the hook's whole process group so its children do not hold the pipes open.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                return result(
                    Outcome::Failed(format!("waiting for {}: {e}", path.display())),
                    String::new(),
                    String::new(),
                );
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let outcome = match status {
        _ if timed_out => Outcome::Failed(format!("timed out after {} s", timeout.as_secs_f32())),
        Some(s) if s.success() => Outcome::Passed,
        Some(s) => Outcome::Failed(match s.code() {
            Some(c) => format!("exited with status {c}"),
            None => format!("killed by {s}"),
        }),
        None => Outcome::Failed("no exit status".into()),
    };
    result(outcome, stdout, stderr)
}

/// A check built into the agent (server reachable, system not degraded).
pub struct BuiltinCheck {
    pub name: String,
    pub run: Box<dyn FnMut() -> Result<(), String> + Send>,
}

/// Runs built-in checks, then `required.d` and `wanted.d` hooks under `dir`.
pub fn run_checks(builtins: Vec<BuiltinCheck>, dir: &Path, timeout: Duration) -> HealthReport {
    let mut report = HealthReport::default();
    for mut b in builtins {
        let started = Instant::now();
        let outcome = match (b.run)() {
            Ok(()) => Outcome::Passed,
            Err(e) => Outcome::Failed(e),
        };
        report.results.push(CheckResult {
            name: b.name,
            requirement: Requirement::Required,
            outcome,
            stdout: String::new(),
            stderr: String::new(),
            duration: started.elapsed(),
        });
    }
    for (sub, req) in [
        ("required.d", Requirement::Required),
        ("wanted.d", Requirement::Wanted),
    ] {
        for hook in hooks_in(&dir.join(sub)) {
            let r = run_hook(&hook, req, timeout);
            match &r.outcome {
                Outcome::Passed => tracing::info!(check = %r.name, "check passed"),
                Outcome::Failed(why) => {
                    tracing::warn!(check = %r.name, required = (req == Requirement::Required), reason = %why, stderr = %r.stderr.trim_end(), "check failed")
                }
            }
            report.results.push(r);
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(dir: &Path, sub: &str, name: &str, script: &str) {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn required_failure_is_unhealthy_wanted_failure_is_warning() {
        let dir = tempfile::tempdir().unwrap();
        hook(dir.path(), "required.d", "10-ok", "echo fine");
        hook(dir.path(), "wanted.d", "20-meh", "echo grumble >&2; exit 3");
        let r = run_checks(vec![], dir.path(), Duration::from_secs(10));
        assert!(r.healthy(), "{}", r.summary());
        let w: Vec<_> = r.warnings().collect();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].stderr, "grumble\n");
        assert_eq!(w[0].outcome, Outcome::Failed("exited with status 3".into()));

        hook(
            dir.path(),
            "required.d",
            "30-bad",
            "echo out; echo err >&2; exit 1",
        );
        let r = run_checks(vec![], dir.path(), Duration::from_secs(10));
        assert!(!r.healthy());
        let f = r.first_failure().unwrap();
        assert_eq!(f.name, "30-bad");
        assert_eq!(f.stdout, "out\n");
        assert_eq!(f.stderr, "err\n");
        assert!(
            r.summary()
                .contains("required 30-bad: FAILED: exited with status 1")
        );
    }

    #[test]
    fn hook_timeout_kills_it() {
        let dir = tempfile::tempdir().unwrap();
        hook(dir.path(), "required.d", "slow", "sleep 30");
        let r = run_checks(vec![], dir.path(), Duration::from_millis(300));
        assert!(!r.healthy());
        assert!(matches!(&r.results[0].outcome, Outcome::Failed(m) if m.contains("timed out")));
    }

    #[test]
    fn non_executables_are_skipped_and_builtins_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("required.d")).unwrap();
        std::fs::write(dir.path().join("required.d/README"), "not a hook").unwrap();
        let r = run_checks(
            vec![BuiltinCheck {
                name: "server-reachable".into(),
                run: Box::new(|| Err("connection refused".into())),
            }],
            dir.path(),
            Duration::from_secs(1),
        );
        assert_eq!(r.results.len(), 1);
        assert!(!r.healthy());
        assert_eq!(r.first_failure().unwrap().name, "server-reachable");
    }
}
