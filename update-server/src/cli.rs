//! One function per subcommand; `main.rs` only parses the command line.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::policy::{HaltRule, MaintenanceWindow, Ramp, RateLimit, RolloutPolicy, Step};
use crate::server::{self, ServerConfig};
use crate::store::{InstanceFilter, Role, Store};

/// `update-server serve`: runs until SIGINT or SIGTERM.
pub async fn serve(listen: SocketAddr, config: ServerConfig) -> Result<()> {
    let state = server::open_state(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "update-server listening");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        trigger.cancel();
    });
    let result = server::run(listener, state.clone(), shutdown).await;
    // Closing every connection lets SQLite checkpoint and remove its WAL.
    state.checkins.close().await;
    state.store.pool.close().await;
    result
}

/// `update-server backup`: a consistent copy of the SQLite database, while servers run.
pub fn backup(data_dir: &Path, database: Option<String>, to: &Path) -> Result<()> {
    let b = crate::backup::sqlite_backup(&local_database_url(data_dir, database), to)?;
    println!(
        "backed up {} hosts and {} releases to {} ({} bytes); release bundles stay in {}",
        b.hosts,
        b.releases,
        b.path.display(),
        b.bytes,
        data_dir.join("blobs").display()
    );
    Ok(())
}

/// `update-server token create`: prints a new token.
pub async fn token_create(
    data_dir: &Path,
    database: Option<String>,
    role: Role,
    name: &str,
) -> Result<()> {
    let store = open_local(data_dir, database).await?;
    let token = crate::api::create_token(&store, role, name).await?;
    println!("{token}");
    Ok(())
}

/// The database of the server whose data dir is `data_dir` (or `database`).
async fn open_local(data_dir: &Path, database: Option<String>) -> Result<Store> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    Store::open(&local_database_url(data_dir, database)).await
}

/// The database URL `serve` would use with this data dir and `--database`.
fn local_database_url(data_dir: &Path, database: Option<String>) -> String {
    let mut cfg = ServerConfig::new(data_dir.to_path_buf());
    cfg.database_url = database;
    cfg.database_url()
}

fn format_time(unix: Option<i64>) -> String {
    unix.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".to_string())
}

/// `update-server token list`.
pub async fn token_list(data_dir: &Path, database: Option<String>, json: bool) -> Result<()> {
    let store = open_local(data_dir, database).await?;
    let tokens = store.tokens().await?;
    if json {
        print_json(&serde_json::to_value(&tokens)?);
        return Ok(());
    }
    let rows: Vec<Value> = tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t.id,
                "name": t.name,
                "role": t.role,
                "created": format_time(Some(t.created_at)),
                "revoked": format_time(t.revoked_at),
            })
        })
        .collect();
    print_table(&rows, &["id", "name", "role", "created", "revoked"]);
    Ok(())
}

/// `update-server token revoke ID`.
pub async fn token_revoke(data_dir: &Path, database: Option<String>, id: i64) -> Result<()> {
    let store = open_local(data_dir, database).await?;
    let now = chrono::Utc::now().timestamp();
    match store.revoke_token(id, now).await? {
        None => bail!(
            "token {id} does not exist in {} (see update-server token list)",
            data_dir.display()
        ),
        Some((t, false)) => println!("token {id} ({}) was already revoked", t.name),
        Some((t, true)) => println!("token {id} ({}, {}) revoked", t.name, t.role),
    }
    Ok(())
}

/// An admin API client.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str, token: &str) -> Result<Client> {
        if token.is_empty() {
            bail!("no token given (use --token or TWINROOT_TOKEN)");
        }
        Ok(Client {
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: crate::http_client_builder()
                .build()
                .context("cannot build HTTP client")?,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value> {
        Ok(self.exchange(req, what).await?.0)
    }

    /// Sends a request: the JSON answer and the response headers, or an error naming `what`
    /// and the server's message.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(Value, reqwest::header::HeaderMap)> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("{what}: cannot reach {}", self.base))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or(body);
            bail!("{what}: server answered {status}: {msg}");
        }
        Ok((value, headers))
    }

    pub async fn get(&self, path: &str, what: &str) -> Result<Value> {
        self.send(self.http.get(self.url(path)), what).await
    }

    /// A GET of a paged list: the page and, when it was full, where the next one starts.
    pub async fn get_page(&self, path: &str, what: &str) -> Result<(Value, Option<String>)> {
        let (v, headers) = self.exchange(self.http.get(self.url(path)), what).await?;
        let next = headers
            .get(crate::api::NEXT_AFTER)
            // Machine ids may be UTF-8 beyond ASCII, which `to_str` refuses.
            .and_then(|h| std::str::from_utf8(h.as_bytes()).ok())
            .map(str::to_string);
        Ok((v, next))
    }

    pub async fn post(&self, path: &str, body: &Value, what: &str) -> Result<Value> {
        self.send(self.http.post(self.url(path)).json(body), what)
            .await
    }

    pub async fn put(&self, path: &str, body: &Value, what: &str) -> Result<Value> {
        self.send(self.http.put(self.url(path)).json(body), what)
            .await
    }

    pub async fn upload(&self, file: &Path) -> Result<Value> {
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open bundle {}", file.display()))?;
        let len = f.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        self.send(
            self.http
                .post(self.url("/releases"))
                .header("content-type", "application/octet-stream")
                .header("content-length", len)
                .body(body),
            &format!("upload {}", file.display()),
        )
        .await
    }
}

/// An API path from its segments and query, each percent-encoded: names typed by an operator
/// (a group "rack 7/a", a machine id with `?`) reach the server as they were typed.
pub fn api_path(segments: &[&str], query: &[(&str, Option<&str>)]) -> String {
    let mut url = reqwest::Url::parse("http://api.invalid/").expect("static URL");
    url.path_segments_mut()
        .expect("http URLs have a path")
        .pop_if_empty()
        .extend(segments);
    let pairs: Vec<_> = query
        .iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(x)) => x.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".to_string(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn print_table(rows: &[Value], columns: &[&str]) {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| s(r, c)).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in cells {
        println!("{}", line(r));
    }
}

pub async fn release_upload(c: &Client, file: &Path) -> Result<()> {
    let v = c.upload(file).await?;
    println!(
        "release {} stored (sha256 {}, {} bytes)",
        s(&v, "version"),
        s(&v, "sha256"),
        s(&v, "size")
    );
    Ok(())
}

pub async fn release_list(c: &Client, json: bool) -> Result<()> {
    let v = c.get("/releases", "list releases").await?;
    if json {
        print_json(&v);
    } else {
        let rows = v.as_array().cloned().unwrap_or_default();
        print_table(&rows, &["version", "channels", "size", "sha256"]);
    }
    Ok(())
}

pub async fn channel_create(c: &Client, name: &str, after: &str) -> Result<()> {
    c.post(
        "/channels",
        &serde_json::json!({"name": name, "after": after}),
        &format!("create channel {name}"),
    )
    .await?;
    println!("channel {name} created after {after}");
    Ok(())
}

pub async fn channel_list(c: &Client, json: bool) -> Result<()> {
    let v = c.get("/channels", "list channels").await?;
    if json {
        print_json(&v);
    } else {
        let rows: Vec<Value> = v
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut ch| {
                ch["promoted"] = format_time(ch["promoted_at"].as_i64()).into();
                ch
            })
            .collect();
        print_table(&rows, &["name", "release_version", "promoted"]);
    }
    Ok(())
}

pub async fn release_promote(c: &Client, version: &str, channel: &str, force: bool) -> Result<()> {
    c.post(
        &api_path(&["releases", version, "promote"], &[]),
        &serde_json::json!({"channel": channel, "force": force}),
        &format!("promote {version} to {channel}"),
    )
    .await?;
    println!("release {version} now on {channel}");
    Ok(())
}

/// Command-line form of a policy; `--policy-json` replaces all of it.
#[derive(Debug, Default, Clone)]
pub struct PolicyFlags {
    pub policy_json: Option<String>,
    pub start_percent: Option<f64>,
    pub ramp_secs: Option<i64>,
    /// "SECS:PERCENT,SECS:PERCENT"
    pub steps: Option<String>,
    pub max_grants: Option<u64>,
    pub period_secs: Option<i64>,
    pub max_in_flight: Option<u64>,
    pub in_flight_timeout_secs: Option<i64>,
    /// "mon,tue@02:00+120@Europe/Berlin"
    pub windows: Vec<String>,
    pub halt_failure_percent: Option<f64>,
    pub halt_min_reports: Option<u64>,
    pub pin: Option<String>,
}

impl PolicyFlags {
    pub fn to_policy(&self) -> Result<RolloutPolicy> {
        if let Some(j) = &self.policy_json {
            return serde_json::from_str(j).context("--policy-json is not a valid policy");
        }
        let mut p = RolloutPolicy::default();
        if let Some(x) = self.start_percent {
            p.start_percent = x;
        }
        if let Some(d) = self.ramp_secs {
            p.ramp = Ramp::Linear { duration_secs: d };
        }
        if let Some(steps) = &self.steps {
            let steps = steps
                .split(',')
                .map(|st| {
                    let (a, b) = st
                        .split_once(':')
                        .with_context(|| format!("step {st:?} is not SECS:PERCENT"))?;
                    Ok(Step {
                        after_secs: a.trim().parse().with_context(|| format!("step {st:?}"))?,
                        percent: b.trim().parse().with_context(|| format!("step {st:?}"))?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            p.ramp = Ramp::Steps { steps };
        }
        if let Some(m) = self.max_grants {
            p.rate_limit = Some(RateLimit {
                max_grants: m,
                period_secs: self.period_secs.unwrap_or(3600),
            });
        }
        p.max_in_flight = self.max_in_flight;
        if let Some(t) = self.in_flight_timeout_secs {
            p.in_flight_timeout_secs = t;
        }
        for w in &self.windows {
            p.windows.push(parse_window(w)?);
        }
        if let Some(f) = self.halt_failure_percent {
            p.halt = Some(HaltRule {
                max_failure_percent: f,
                min_reports: self.halt_min_reports.unwrap_or(1),
            });
        }
        p.pin = self.pin.clone();
        p.validate()
            .map_err(|e| anyhow::anyhow!("invalid policy: {e}"))?;
        Ok(p)
    }
}

/// "DAYS@HH:MM+MINUTES@TZ", e.g. "mon,tue,wed@02:00+120@Europe/Berlin".
pub fn parse_window(s: &str) -> Result<MaintenanceWindow> {
    let parts: Vec<&str> = s.split('@').collect();
    let [days, time, tz] = parts[..] else {
        bail!("window {s:?} is not DAYS@HH:MM+MINUTES@TIMEZONE");
    };
    let (start, len) = time
        .split_once('+')
        .with_context(|| format!("window {s:?} lacks +MINUTES"))?;
    Ok(MaintenanceWindow {
        days: days.split(',').map(|d| d.trim().to_lowercase()).collect(),
        start: start.to_string(),
        length_minutes: len
            .parse()
            .with_context(|| format!("window {s:?}: minutes"))?,
        time_zone: tz.to_string(),
    })
}

pub async fn rollout_set(
    c: &Client,
    channel: &str,
    group: Option<&str>,
    flags: &PolicyFlags,
) -> Result<()> {
    let policy = flags.to_policy()?;
    let v = c
        .put(
            &api_path(&["rollouts", channel], &[]),
            &serde_json::json!({"group": group, "policy": policy}),
            &format!("set rollout {channel}"),
        )
        .await?;
    print_rollout(&v);
    Ok(())
}

pub async fn rollout_pause(
    c: &Client,
    channel: &str,
    group: Option<&str>,
    reason: Option<&str>,
    pause: bool,
) -> Result<()> {
    let what = if pause { "pause" } else { "resume" };
    let v = c
        .post(
            &api_path(&["rollouts", channel, what], &[]),
            &serde_json::json!({"group": group, "reason": reason}),
            &format!("{what} rollout {channel}"),
        )
        .await?;
    print_rollout(&v);
    Ok(())
}

pub async fn rollout_show(
    c: &Client,
    channel: &str,
    group: Option<&str>,
    json: bool,
) -> Result<()> {
    let v = c
        .get(
            &api_path(&["rollouts", channel], &[("group", group)]),
            &format!("show rollout {channel}"),
        )
        .await?;
    if json {
        print_json(&v);
    } else {
        print_rollout(&v);
    }
    Ok(())
}

fn print_rollout(v: &Value) {
    let group = s(v, "group");
    println!(
        "rollout {}{}: release {} at {:.1}%{}",
        s(v, "channel"),
        if group.is_empty() || group == "-" {
            String::new()
        } else {
            format!(" group {group}")
        },
        s(v, "release_version"),
        v.get("current_percent")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        if v.get("paused").and_then(Value::as_bool) == Some(true) {
            format!(", PAUSED ({})", s(v, "pause_reason"))
        } else {
            String::new()
        }
    );
    let Some(p) = v.get("policy") else { return };
    match serde_json::from_value::<crate::policy::RolloutPolicy>(p.clone()) {
        Ok(policy) => {
            for (label, text) in policy.describe() {
                println!("  {:<11} {text}", format!("{label}:"));
            }
        }
        // A server newer than this client: show what it sent.
        Err(_) => println!("  policy: {p}"),
    }
}

pub async fn instances(c: &Client, f: &InstanceFilter<'_>, json: bool) -> Result<()> {
    let limit = f.limit.to_string();
    let path = api_path(
        &["instances"],
        &[
            ("channel", f.channel),
            ("version", f.version),
            ("group", f.group),
            ("status", f.status),
            ("after", f.after),
            ("limit", Some(&limit)),
        ],
    );
    let (v, next) = c.get_page(&path, "list instances").await?;
    if json {
        print_json(&v);
    } else {
        let mut rows = v.as_array().cloned().unwrap_or_default();
        for r in &mut rows {
            let seen = r
                .get("last_seen")
                .and_then(Value::as_i64)
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string());
            r["last_seen"] = seen.map_or(Value::Null, Value::String);
        }
        print_table(
            &rows,
            &[
                "machine_id",
                "channel",
                "group",
                "version",
                "status",
                "target_version",
                "error_code",
                "last_seen",
            ],
        );
    }
    if let Some(next) = next {
        eprintln!("more hosts follow: run again with --after '{next}'");
    }
    Ok(())
}

pub async fn lift_quarantine(c: &Client, machine_id: &str, version: &str) -> Result<()> {
    let v = c
        .post(
            &api_path(&["instances", machine_id, "lift-quarantine"], &[]),
            &serde_json::json!({ "version": version }),
            &format!("lift quarantine of {version} for host {machine_id}"),
        )
        .await?;
    let until = v
        .get("expires_at")
        .and_then(Value::as_i64)
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default();
    println!(
        "quarantine of {version} lifted for host {machine_id}; the host is told until it reports {version} or until {until}"
    );
    Ok(())
}

pub async fn activity(c: &Client, limit: i64, json: bool) -> Result<()> {
    let v = c
        .get(
            &api_path(&["activity"], &[("limit", Some(&limit.to_string()))]),
            "list activity",
        )
        .await?;
    if json {
        print_json(&v);
    } else {
        for a in v.as_array().cloned().unwrap_or_default() {
            let at = a.get("at").and_then(Value::as_i64).unwrap_or(0);
            let when = chrono::DateTime::from_timestamp(at, 0)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            println!("{when}  {:<17} {}", s(&a, "kind"), s(&a, "message"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::api_path;

    #[test]
    fn api_paths_carry_names_as_typed() {
        assert_eq!(api_path(&["rollouts", "stable"], &[]), "/rollouts/stable");
        assert_eq!(
            api_path(&["rollouts", "stable"], &[("group", Some("rack 7/a&b"))]),
            "/rollouts/stable?group=rack+7%2Fa%26b"
        );
        assert_eq!(
            api_path(&["instances", "m/1?x", "lift-quarantine"], &[]),
            "/instances/m%2F1%3Fx/lift-quarantine"
        );
        assert_eq!(
            api_path(
                &["instances"],
                &[("channel", None), ("version", Some("2.0.0"))]
            ),
            "/instances?version=2.0.0"
        );
    }
}
