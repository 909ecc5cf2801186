//! `update-server watch CHANNEL`: the rollout page in a terminal, redrawn in place.
//!
//! It reads the same JSON the web page draws (`/api/v1/series/CHANNEL`) whenever the server's event
//! stream says something changed, and every `--interval` anyway, renders it with
//! [`render`] (a pure function of the view, the width and the time) and redraws on the alternate
//! screen. `q`, `Esc` or Ctrl-C leave it and restore the terminal.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use serde_json::Value;

/// What `watch` needs.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub server: String,
    pub token: String,
    pub channel: String,
    /// hour, day, week or 30d (for the status and failure figures).
    pub range: String,
    pub interval: Duration,
}

fn pct(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.1}%"),
        None => "-".to_string(),
    }
}

fn bar(fraction: f64, width: usize) -> String {
    let fraction = fraction.clamp(0.0, 1.0);
    let full = (fraction * width as f64).round() as usize;
    format!("{}{}", "#".repeat(full), ".".repeat(width - full))
}

fn time_of(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The screen for one view of a channel (the JSON of `/api/v1/series/CHANNEL`), `width` columns
/// wide, as lines without colors.
pub fn render(view: &Value, width: usize, now: i64) -> Vec<String> {
    let width = width.max(40);
    let mut out = Vec::new();
    let state = if view["auto_halted"] == true {
        "HALTED"
    } else if view["paused"] == true {
        "PAUSED"
    } else {
        "ROLLING"
    };
    let release = view["release"].as_str().unwrap_or("none");
    out.push(format!(
        "twinroot rollout  channel {}  release {}  {}    {}",
        view["channel"].as_str().unwrap_or("?"),
        release,
        state,
        time_of(now)
    ));
    if let Some(r) = view["pause_reason"].as_str() {
        out.push(format!("  reason: {r}"));
    }
    out.push(String::new());
    let total = view["total_hosts"].as_i64().unwrap_or(0);
    let updated = view["updated_hosts"].as_i64().unwrap_or(0);
    let share = if total > 0 {
        updated as f64 / total as f64
    } else {
        0.0
    };
    let target = view["current_percent"].as_f64().unwrap_or(0.0);
    let bar_w = width.saturating_sub(60).clamp(10, 50);
    out.push(format!(
        "Progress  [{}]  {updated} / {total} updated ({})  target {}",
        bar(share, bar_w),
        pct(Some(share * 100.0)),
        pct(Some(target))
    ));
    out.push(String::new());
    out.push("Versions".to_string());
    if let Some(hosts) = view["hosts"].as_object() {
        let mut hosts: Vec<(&String, i64)> = hosts
            .iter()
            .map(|(k, v)| (k, v.as_i64().unwrap_or(0)))
            .collect();
        hosts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (v, n) in hosts {
            let f = if total > 0 {
                n as f64 / total as f64
            } else {
                0.0
            };
            let mark = if v == release { "*" } else { " " };
            out.push(format!(
                "  {mark}{:<14} {:>8}  {:>6}  {}",
                if v.is_empty() { "unknown" } else { v },
                n,
                pct(Some(f * 100.0)),
                bar(f, bar_w)
            ));
        }
    }
    out.push(String::new());
    let threshold = view["halt_threshold_percent"].as_f64();
    let rate = view["halt_failure_percent"].as_f64();
    let verdict = match (rate, threshold) {
        (Some(r), Some(t)) if r > t => "ABOVE THRESHOLD",
        (_, Some(_)) => "ok",
        (_, None) => "no automatic halt set",
    };
    out.push(format!(
        "Failures  {} of {} reports = {}   threshold {}{}   {verdict}",
        view["halt_failures"].as_i64().unwrap_or(0),
        view["halt_reports"].as_i64().unwrap_or(0),
        pct(rate),
        threshold.map_or("none".to_string(), |t| pct(Some(t))),
        view["halt_min_reports"]
            .as_u64()
            .map_or(String::new(), |m| format!(" (min {m} reports)")),
    ));
    out.push(reboot_slots_line(&view["reboot_slots"]));
    let series = &view["series"];
    let span = match series["step"].as_i64() {
        Some(60) => "last hour",
        Some(86_400) => "last 30 days",
        _ => "in range",
    };
    if let Some(st) = series["statuses"].as_object() {
        let mut parts: Vec<String> = st
            .iter()
            .map(|(k, v)| {
                let n: i64 = v
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_i64).sum())
                    .unwrap_or(0);
                format!("{k} {n}")
            })
            .collect();
        parts.sort();
        out.push(format!("Reports {span}: {}", parts.join("  ")));
    }
    out.push(String::new());
    out.push("Recent activity".to_string());
    let acts = view["activity"].as_array().cloned().unwrap_or_default();
    if acts.is_empty() {
        out.push("  (none)".to_string());
    }
    for a in acts.iter().take(8) {
        out.push(format!(
            "  {}  {:<16} {}",
            time_of(a["at"].as_i64().unwrap_or(0)),
            a["kind"].as_str().unwrap_or(""),
            a["message"].as_str().unwrap_or("")
        ));
    }
    out.push(String::new());
    out.push("q: quit".to_string());
    out.into_iter()
        .map(|l| l.chars().take(width).collect())
        .collect()
}

/// The coordinator's reboot slots, as the view reports them.
fn reboot_slots_line(r: &Value) -> String {
    match r["state"].as_str() {
        Some("known") => {
            let groups = r["groups"].as_array().cloned().unwrap_or_default();
            let detail = if groups.len() > 1 {
                let parts: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        format!(
                            "{} {}/{}",
                            g["group"].as_str().unwrap_or("?"),
                            g["in_use"],
                            g["slots"]
                        )
                    })
                    .collect();
                format!("   ({})", parts.join(", "))
            } else {
                String::new()
            };
            format!(
                "Reboots   {} / {} slots in use{detail}",
                r["in_use"], r["total"]
            )
        }
        Some("unavailable") => format!(
            "Reboots   coordinator unavailable: {}",
            r["error"].as_str().unwrap_or("?")
        ),
        _ => "Reboots   no coordinator configured".to_string(),
    }
}

async fn fetch(http: &reqwest::Client, cfg: &WatchConfig) -> Result<Value> {
    let url = format!(
        "{}/api/v1/series/{}?range={}",
        cfg.server.trim_end_matches('/'),
        cfg.channel,
        cfg.range
    );
    let resp = http
        .get(&url)
        .bearer_auth(&cfg.token)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", cfg.server))?;
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .with_context(|| format!("{url}: answer is not JSON"))?;
    if !status.is_success() {
        bail!(
            "{url}: {status}: {}",
            v["error"].as_str().unwrap_or("request failed")
        );
    }
    Ok(v)
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Restores the terminal however `watch` ends.
struct Screen;

impl Screen {
    fn enter() -> Result<Screen> {
        terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

fn draw(lines: &[String]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    queue!(out, cursor::MoveTo(0, 0))?;
    for l in lines {
        queue!(out, terminal::Clear(terminal::ClearType::CurrentLine))?;
        write!(out, "{l}\r\n")?;
    }
    queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
    out.flush()?;
    Ok(())
}

/// Whether a key asks to quit.
fn quits(ev: &Event) -> bool {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

/// Follows the server's event stream (`/api/v1/dashboard/events`), raising `changed` on each
/// event and `live` while connected; reconnects 5 s after the stream ends or fails.
async fn listen(cfg: WatchConfig, changed: Arc<AtomicBool>, live: Arc<AtomicBool>) {
    use futures_util::StreamExt;
    // No overall timeout: the stream stays open.
    let Ok(http) = crate::http_client_builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
    else {
        return;
    };
    let url = format!(
        "{}/api/v1/dashboard/events",
        cfg.server.trim_end_matches('/')
    );
    loop {
        if let Ok(resp) = http.get(&url).bearer_auth(&cfg.token).send().await
            && resp.status().is_success()
        {
            live.store(true, Ordering::Relaxed);
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    // `hello` too: redraw once connected, to show that the view is live.
                    if block
                        .lines()
                        .any(|l| matches!(l.trim_end(), "event: change" | "event: hello"))
                    {
                        changed.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        live.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Runs until the user quits.
pub async fn run(cfg: WatchConfig) -> Result<()> {
    crate::series::Range::parse(&cfg.range).map_err(anyhow::Error::msg)?;
    let http = crate::http_client_builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Fail before taking over the terminal when the server or token is wrong.
    let mut view = fetch(&http, &cfg).await?;
    let _screen = Screen::enter()?;
    // Redraw as soon as the server says something changed; poll every interval anyway.
    let changed = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicBool::new(false));
    let listener = tokio::spawn(listen(cfg.clone(), changed.clone(), live.clone()));
    let _stop_listening = AbortOnDrop(listener);
    let mut error: Option<String> = None;
    loop {
        let (w, _) = terminal::size().unwrap_or((80, 24));
        // The server's time (it may run faster than the wall clock: `serve --time-scale`).
        let now = view["series"]["to"].as_i64().unwrap_or_default();
        let mut lines = render(&view, w as usize, now);
        if let Some(e) = &error {
            lines.push(format!("(last refresh failed: {e})"));
        }
        if let Some(last) = lines.last_mut() {
            last.push_str(if live.load(Ordering::Relaxed) {
                "   (live)"
            } else {
                "   (polling)"
            });
        }
        draw(&lines)?;
        // Wait for a key or the next refresh.
        let deadline = tokio::time::Instant::now() + cfg.interval;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || changed.swap(false, Ordering::Relaxed) {
                break;
            }
            let ev = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Event>> {
                if event::poll(left.min(Duration::from_millis(200)))? {
                    Ok(Some(event::read()?))
                } else {
                    Ok(None)
                }
            })
            .await??;
            match ev {
                Some(e) if quits(&e) => return Ok(()),
                Some(Event::Resize(..)) => break,
                _ => {}
            }
        }
        match fetch(&http, &cfg).await {
            Ok(v) => {
                view = v;
                error = None;
            }
            Err(e) => error = Some(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reboot_slot_lines() {
        let known = json!({"state": "known", "in_use": 2, "total": 3, "groups": [
            {"group": "default", "slots": 2, "in_use": 1}, {"group": "db", "slots": 1, "in_use": 1}]});
        assert_eq!(
            reboot_slots_line(&known),
            "Reboots   2 / 3 slots in use   (default 1/2, db 1/1)"
        );
        let down = json!({"state": "unavailable", "error": "cannot reach http://c/v1/status"});
        assert_eq!(
            reboot_slots_line(&down),
            "Reboots   coordinator unavailable: cannot reach http://c/v1/status"
        );
    }

    #[test]
    fn renders_progress_versions_failures_and_activity() {
        let v = json!({
            "channel": "beta", "release": "2.0.0", "paused": true, "auto_halted": true,
            "pause_reason": "automatic halt: 3 of 5 reported hosts failed (60.0% > 25%)",
            "current_percent": 85.0, "hosts": {"1.0.0": 19, "2.0.0": 21},
            "total_hosts": 40, "updated_hosts": 21, "halt_failures": 3, "halt_reports": 5,
            "halt_failure_percent": 60.0, "halt_threshold_percent": 25.0, "halt_min_reports": 5,
            "activity": [{"at": 0, "kind": "rollout_halted", "message": "halted"}],
            "series": {"step": 3600, "statuses": {"error": [1, 2], "complete": [0, 21]}}
        });
        let lines = render(&v, 100, 0);
        let text = lines.join("\n");
        assert!(lines[0].contains("channel beta") && lines[0].contains("HALTED"));
        assert!(
            text.contains("21 / 40 updated (52.5%)  target 85.0%"),
            "{text}"
        );
        assert!(text.contains("*2.0.0                21   52.5%"), "{text}");
        assert!(
            text.contains(
                "3 of 5 reports = 60.0%   threshold 25.0% (min 5 reports)   ABOVE THRESHOLD"
            ),
            "{text}"
        );
        assert!(text.contains("complete 21  error 3"), "{text}");
        assert!(
            text.contains("Reboots   no coordinator configured"),
            "{text}"
        );
        assert!(text.contains("rollout_halted"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 100));
    }
}
