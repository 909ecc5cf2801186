//! Helpers shared by the HTTP and process tests.
#![allow(dead_code)]

use reboot_coordinator::etcd_store::{EtcdConfig, EtcdStore};
use reboot_coordinator::metrics::Metrics;
use reboot_coordinator::semaphore::{Semaphore, SemaphoreConfig};
use reboot_coordinator::server::{Coordinator, ServerConfig};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use twinroot_format::fleetlock::{ErrorBody, Request};

/// An in-process coordinator on a free port.
pub struct TestServer {
    pub url: String,
    pub coordinator: Arc<Coordinator>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(endpoints: Vec<String>, lease_seconds: u64, config: ServerConfig) -> Self {
        let mut etcd = EtcdConfig::new(endpoints);
        etcd.timeout = Duration::from_secs(5);
        let store = EtcdStore::connect(etcd).await.unwrap();
        let coordinator = Arc::new(Coordinator {
            semaphore: Semaphore::new(
                store,
                SemaphoreConfig {
                    default_slots: 1,
                    lease_seconds,
                    max_attempts: 64,
                },
            ),
            config,
            metrics: Metrics::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cancel = CancellationToken::new();
        let task = {
            let c = coordinator.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                reboot_coordinator::server::run(listener, c, cancel)
                    .await
                    .unwrap()
            })
        };
        TestServer {
            url,
            coordinator,
            cancel,
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// A FleetLock answer: status and, for failures, the error body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub error: Option<ErrorBody>,
}

impl Answer {
    pub fn kind(&self) -> &str {
        self.error.as_ref().map(|e| e.kind.as_str()).unwrap_or("ok")
    }
}

/// Installs the process-wide rustls provider reqwest needs (ring, as the server uses).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn http() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POSTs a well-formed FleetLock request to `path`.
pub async fn fleetlock(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    id: &str,
    group: &str,
) -> Answer {
    let resp = client
        .post(format!("{base}{path}"))
        .header("fleet-lock-protocol", "true")
        .json(&Request::new(id, group))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {base}{path}: {e}"));
    answer(resp).await
}

pub async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let error = if status == 200 {
        None
    } else {
        Some(
            serde_json::from_slice::<ErrorBody>(&body).unwrap_or_else(|e| {
                panic!(
                    "status {status} body is not a FleetLock error ({e}): {}",
                    String::from_utf8_lossy(&body)
                )
            }),
        )
    };
    Answer { status, error }
}

/// A `reboot-coordinator serve` process; killed on drop.
pub struct CoordinatorProcess {
    pub url: String,
    child: Child,
}

impl CoordinatorProcess {
    pub fn spawn(endpoints: &[String], extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_reboot-coordinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--etcd"])
            .arg(endpoints.join(","))
            .args(["--etcd-timeout-ms", "5000"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn reboot-coordinator serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from serve: {line:?}"))
            .to_string();
        CoordinatorProcess { url, child }
    }
}

impl CoordinatorProcess {
    /// Sends SIGTERM and waits (deadline 20 s) for the process to exit; returns its success.
    pub fn terminate(&mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.success();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a non-serve subcommand of the binary; returns (success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reboot-coordinator"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run reboot-coordinator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Small deterministic jitter source (xorshift).
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn millis(&mut self, min: u64, max: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(min + self.0 % (max - min + 1))
    }
}
