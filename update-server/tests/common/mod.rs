//! Shared test harness: real servers on free loopback ports, real SQLite/PostgreSQL, real bundles.
#![allow(dead_code)]

pub mod postgres;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use twinroot_format::bundle::{ReleaseInfo, write_bundle};
use twinroot_format::keyring::{Keyring, generate_signing_key};
use twinroot_format::omaha::{self, AppRequest, Event, Ping, Request, Response, UpdateCheck};
use update_server::server::{self, ServerConfig};
use update_server::store::Role;

pub const APP_ID: &str = omaha::FLATCAR_APP_ID;

/// A signing key with its keyring file.
pub struct Signer {
    pub key: ed25519_dalek::SigningKey,
    pub keyring_path: PathBuf,
}

pub fn signer(dir: &Path, name: &str) -> Signer {
    let key = generate_signing_key().unwrap();
    let ring = Keyring::new(1, 1, &[key.verifying_key()]).unwrap();
    let keyring_path = dir.join(format!("{name}.keyring"));
    std::fs::write(&keyring_path, ring.to_bytes()).unwrap();
    Signer { key, keyring_path }
}

/// A small signed bundle for `version`.
pub fn bundle(signer: &Signer, version: &str) -> Vec<u8> {
    bundle_over(signer, version, None)
}

/// A small signed bundle for `version` that installs only over `min_source` or newer.
pub fn bundle_over(signer: &Signer, version: &str, min_source: Option<&str>) -> Vec<u8> {
    let mut image = Vec::with_capacity(256 * 1024);
    let mut x: u32 = version
        .bytes()
        .fold(7, |a, b| a.wrapping_mul(31).wrapping_add(b.into()));
    for i in 0..256 * 1024 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image.push(if i % 3 == 0 { 0 } else { x as u8 });
    }
    let info = ReleaseInfo {
        os_version: semver::Version::parse(version).unwrap(),
        created_unix: 1_700_000_000,
        min_source_version: min_source.map(|v| semver::Version::parse(v).unwrap()),
        board: None,
    };
    let mut scratch = Cursor::new(Vec::new());
    let mut out = Vec::new();
    write_bundle(
        &image[..],
        &info,
        std::slice::from_ref(&signer.key),
        3,
        &mut scratch,
        &mut out,
    )
    .unwrap();
    out
}

/// A server running in this process.
pub struct TestServer {
    pub dir: TempDir,
    pub url: String,
    pub admin: String,
    pub viewer: String,
    pub signer: Signer,
    pub state: server::Shared,
    shutdown: CancellationToken,
    pub http: reqwest::Client,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer(dir.path(), "release");
        let mut cfg = ServerConfig::new(dir.path().join("data"));
        cfg.keyring = Some(signer.keyring_path.clone());
        tweak(&mut cfg);
        let state = server::open_state(cfg).await.unwrap();
        let admin = update_server::api::create_token(&state.store, Role::Admin, "test")
            .await
            .unwrap();
        let viewer = update_server::api::create_token(&state.store, Role::Viewer, "test")
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(server::run(listener, state.clone(), shutdown.clone()));
        TestServer {
            dir,
            url,
            admin,
            viewer,
            signer,
            state,
            shutdown,
            http: update_server::http_client(),
        }
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        api_call(&self.http, &self.url, method, path, token, body).await
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self
            .api(reqwest::Method::GET, path, Some(&self.admin), None)
            .await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, v) = self
            .api(reqwest::Method::POST, path, Some(&self.admin), Some(body))
            .await;
        assert!(status < 300, "POST {path}: {status} {v}");
        v
    }

    pub async fn put(&self, path: &str, body: Value) -> Value {
        let (status, v) = self
            .api(reqwest::Method::PUT, path, Some(&self.admin), Some(body))
            .await;
        assert!(status < 300, "PUT {path}: {status} {v}");
        v
    }

    pub async fn upload(&self, bytes: Vec<u8>, token: &str) -> (u16, Value) {
        upload(&self.http, &self.url, bytes, token).await
    }

    /// Uploads `version` and puts it on `channel` (forced).
    pub async fn release_on(&self, version: &str, channel: &str) {
        let (status, v) = self
            .upload(bundle(&self.signer, version), &self.admin)
            .await;
        assert!(
            status == 201 || status == 200,
            "upload {version}: {status} {v}"
        );
        self.post(
            &format!("/api/v1/releases/{version}/promote"),
            serde_json::json!({"channel": channel, "force": true}),
        )
        .await;
    }

    /// The `/metrics` text.
    /// `GET path` without a token: (status, body).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let resp = self.http.get(format!("{}{path}", self.url)).send();
        let resp = resp.await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        self.get_text("/metrics").await.1
    }

    pub async fn omaha(&self, req: &Request) -> Response {
        omaha_post(&self.http, &self.url, req).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
    }
}

pub async fn api_call(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub async fn upload(
    http: &reqwest::Client,
    base: &str,
    bytes: Vec<u8>,
    token: &str,
) -> (u16, Value) {
    let resp = http
        .post(format!("{base}/api/v1/releases"))
        .bearer_auth(token)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Posts an Omaha body as it is: (status, body).
pub async fn omaha_raw(http: &reqwest::Client, base: &str, xml: String) -> (u16, String) {
    let resp = http
        .post(format!("{base}/v1/update/"))
        .header("content-type", "text/xml")
        .body(xml)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

pub async fn omaha_post(http: &reqwest::Client, base: &str, req: &Request) -> Response {
    let (status, body) = omaha_raw(http, base, req.to_xml()).await;
    assert_eq!(status, 200, "{body}");
    Response::parse(body.as_bytes()).unwrap()
}

/// A request shaped like update_engine's: one app with ping and updatecheck, optional events.
pub fn ue_request(machine_id: &str, version: &str, track: &str, events: Vec<Event>) -> Request {
    Request {
        protocol: "3.0".into(),
        version: Some("update_engine-0.4.10".into()),
        updater_version: Some("update_engine-0.4.10".into()),
        install_source: Some("scheduler".into()),
        is_machine: Some(true),
        os: Some(omaha::Os {
            version: Some("Chateau".into()),
            platform: Some("CoreOS".into()),
            service_pack: Some(format!("{version}_x86_64")),
            arch: None,
        }),
        apps: vec![AppRequest {
            app_id: APP_ID.into(),
            version: Some(version.into()),
            track: Some(track.into()),
            machine_id: Some(machine_id.into()),
            boot_id: Some("{11111111-2222-3333-4444-555555555555}".into()),
            board: Some("amd64-usr".into()),
            oem: Some(String::new()),
            oem_version: Some(String::new()),
            aleph_version: Some("1.0.0".into()),
            lang: Some("en-US".into()),
            hardware_class: Some(String::new()),
            delta_okay: Some(false),
            ping: Some(Ping {
                active: Some(true),
                ..Ping::default()
            }),
            update_check: Some(UpdateCheck::default()),
            events,
            ..AppRequest::default()
        }],
    }
}

/// Only events, no update check (what update_engine sends while downloading).
pub fn event_request(machine_id: &str, version: &str, track: &str, events: Vec<Event>) -> Request {
    let mut r = ue_request(machine_id, version, track, events);
    r.apps[0].update_check = None;
    r.apps[0].ping = None;
    r
}

pub fn ev(event_type: u32, event_result: u32, error_code: Option<i64>) -> Event {
    Event {
        event_type,
        event_result,
        error_code,
        previous_version: None,
    }
}

pub fn granted(resp: &Response) -> Option<omaha::UpdateOffer> {
    match resp.apps[0].update_check.as_ref()? {
        omaha::UpdateCheckResponse::Ok(o) => Some(o.clone()),
        _ => None,
    }
}

pub fn is_noupdate(resp: &Response) -> bool {
    resp.apps[0].update_check == Some(omaha::UpdateCheckResponse::NoUpdate)
}

/// Polls `f` until it returns Some, or panics after `secs`.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The server binary as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
}

impl ServerProcess {
    pub fn spawn(data_dir: &Path, database: Option<&str>, keyring: Option<&Path>) -> ServerProcess {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-server"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(db) = database {
            cmd.arg("--database").arg(db);
        }
        if let Some(k) = keyring {
            cmd.arg("--keyring").arg(k);
        }
        ServerProcess {
            child: cmd.spawn().unwrap(),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn wait_ready(&mut self) {
        let http = update_server::http_client();
        let url = format!("{}/healthz", self.url);
        let child = &mut self.child;
        wait_for(60, "server to listen", || {
            let http = http.clone();
            let url = url.clone();
            let exited = child.try_wait().unwrap();
            async move {
                assert!(exited.is_none(), "server exited early: {exited:?}");
                http.get(&url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await;
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) {
        nix_kill_term(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_kill_term(pid: u32) {
    // The test harness may use system tools.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// `update-server token create` through the binary.
pub fn create_token(data_dir: &Path, database: Option<&str>, role: &str) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_update-server"));
    cmd.args(["token", "create", "--role", role, "--data-dir"])
        .arg(data_dir);
    if let Some(db) = database {
        cmd.arg("--database").arg(db);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "token create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The string `key` of every element of a JSON array (a list the admin API answered).
pub fn strings_of(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|e| {
            e[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in {e}"))
                .to_string()
        })
        .collect()
}

/// Asserts that `text` contains every one of `parts`, showing `text` when it does not.
pub fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
}
