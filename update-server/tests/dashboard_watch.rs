//! `update-server watch CHANNEL` under tmux: the figures of a seeded fleet on screen, a pause
//! shows up without a restart, q and Ctrl-C leave cleanly (exit status 0).

mod common;
mod dashboard_fleet;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use dashboard_fleet::{FleetSpec, forty_hosts_policy, seed};
use serde_json::json;

/// Stops the private tmux server however the test ends.
struct TmuxServer(std::path::PathBuf);

impl Drop for TmuxServer {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.0)
            .arg("kill-server")
            .output();
    }
}

fn tmux(sock: &Path, args: &[&str]) -> String {
    let out = Command::new("tmux")
        .current_dir(sock.parent().unwrap())
        .arg("-S")
        .arg(sock)
        .args(args)
        .output()
        .expect("tmux is installed");
    assert!(
        out.status.success(),
        "tmux {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls the pane until `pred` holds for its text.
async fn wait_screen(sock: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let screen = tmux(sock, &["capture-pane", "-p", "-t", "w"]);
        if pred(&screen) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; screen:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where the pane's shell writes watch's exit status.
fn exit_status_file(sock: &Path) -> std::path::PathBuf {
    sock.with_extension("status")
}

/// Presses `key` in the pane and waits for watch to exit; returns its exit status. Like a user at
/// a busy terminal, presses it again every few seconds while the program is still running.
async fn quit_with(sock: &Path, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = exit_status_file(sock);
    let mut next_press = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&status)
            && s.ends_with('\n')
        {
            return s.trim().to_string();
        }
        if Instant::now() >= next_press {
            // Not asserted: the program may exit between the check above and this press.
            let _ = Command::new("tmux")
                .arg("-S")
                .arg(sock)
                .args(["send-keys", "-t", "w", key])
                .output();
            next_press = Instant::now() + Duration::from_secs(3);
        }
        assert!(Instant::now() < deadline, "watch did not exit on {key}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `watch beta` in the pane, polling every `interval` seconds (besides the event stream).
fn start_watch(sock: &Path, url: &str, token: &str, interval: f64) {
    // The shell records watch's exit status in a file: tmux's own #{pane_dead_status} was seen
    // to stay empty on a loaded machine although the program had exited.
    let cmd = format!(
        "sh -c '{} watch beta --server {url} --token {token} --range day --interval {interval}; echo $? > {}'",
        env!("CARGO_BIN_EXE_update-server"),
        exit_status_file(sock).display()
    );
    tmux(
        sock,
        &[
            "new-session",
            "-d",
            "-s",
            "w",
            "-x",
            "120",
            "-y",
            "40",
            "sleep 60",
        ],
    );
    // Keep the pane after the program ends so its exit status can be read.
    tmux(sock, &["set-option", "-t", "w", "remain-on-exit", "on"]);
    tmux(sock, &["respawn-pane", "-k", "-t", "w", &cmd]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_the_rollout_live_and_quits_on_q_and_ctrl_c() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "beta").await;
    s.put("/api/v1/rollouts/beta", forty_hosts_policy()).await;
    let fig = seed(
        &s.state.store,
        &FleetSpec::forty_hosts(chrono::Utc::now().timestamp()),
    )
    .await;
    assert_eq!((fig.updated, fig.failed), (21, 3));

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tmux.sock");
    let _tmux = TmuxServer(sock.clone());
    // Polling only once an hour: every redraw below comes from the server's event stream.
    start_watch(&sock, &s.url, &s.viewer, 3600.0);
    let screen = wait_screen(&sock, "the rollout figures, live", |t| {
        t.contains("21 / 40 updated") && t.contains("q: quit   (live)")
    })
    .await;
    assert!(
        screen.contains("channel beta  release 2.0.0  ROLLING"),
        "{screen}"
    );
    assert!(
        screen.contains("21 / 40 updated (52.5%)  target 85.0%"),
        "{screen}"
    );
    assert!(
        screen.contains("*2.0.0                21   52.5%"),
        "{screen}"
    );
    assert!(
        screen.contains(" 1.0.0                19   47.5%"),
        "{screen}"
    );
    assert!(
        screen.contains("3 of 24 reports = 12.5%   threshold 25.0% (min 5 reports)   ok"),
        "{screen}"
    );
    assert!(screen.contains("error 3"), "{screen}");
    assert!(
        screen.contains("Reboots   no coordinator configured"),
        "{screen}"
    );
    assert!(screen.contains("release_promoted"), "{screen}");

    // Paused through the API: the view redraws in place with the reason (told by the stream).
    s.post(
        "/api/v1/rollouts/beta/pause",
        json!({"reason": "waiting for the kernel fix"}),
    )
    .await;
    let screen = wait_screen(&sock, "the paused state", |t| t.contains("PAUSED")).await;
    assert!(
        screen.contains("reason: waiting for the kernel fix"),
        "{screen}"
    );
    assert!(screen.contains("rollout_paused"), "{screen}");

    assert_eq!(quit_with(&sock, "q").await, "0", "q exits with status 0");
    // The terminal is restored: the alternate screen is gone.
    let after = tmux(&sock, &["capture-pane", "-p", "-t", "w"]);
    assert!(!after.contains("Recent activity"), "{after}");
    tmux(&sock, &["kill-server"]);

    // A second tmux server (a fresh socket: the first may still be shutting down).
    let sock = dir.path().join("tmux2.sock");
    let _tmux2 = TmuxServer(sock.clone());
    start_watch(&sock, &s.url, &s.viewer, 0.3);
    wait_screen(&sock, "the rollout figures", |t| {
        t.contains("21 / 40 updated")
    })
    .await;
    assert_eq!(
        quit_with(&sock, "C-c").await,
        "0",
        "Ctrl-C exits with status 0"
    );
    s.stop().await;
}

#[tokio::test]
async fn watch_refuses_a_bad_token_or_channel_before_taking_the_terminal() {
    let s = TestServer::start().await;
    // `watch nosuch` with a token, without a terminal: fails with `expected` on stderr.
    let refused = |token: String, expected: &'static str| {
        let url = s.url.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(env!("CARGO_BIN_EXE_update-server"))
                    .args(["watch", "nosuch", "--server", &url, "--token", &token])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(expected), "{err}");
        }
    };
    refused("wrong".into(), "unknown token").await;
    refused(s.viewer.clone(), "channel nosuch does not exist").await;
    s.stop().await;
}
