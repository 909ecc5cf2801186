//! Network access over HTTP(S) (reqwest with rustls): bundle downloads with Range, the Omaha
//! exchange, and the FleetLock client. Each is a small trait so the simulator can replace it.
//!
//! The traits are synchronous: the agent core runs on blocking threads, and the real
//! implementations drive reqwest on the daemon's tokio runtime through a [`Handle`].

use std::io::{self, Read};
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, RANGE};
use tokio::runtime::Handle;
use twinroot_format::{fleetlock, omaha};

use crate::apply::BundleSource;
use crate::error::{AgentError, AgentResult, ErrorKind};

/// Sends one Omaha request and returns the parsed response.
pub trait OmahaTransport: Send {
    fn exchange(&mut self, request: &omaha::Request) -> AgentResult<omaha::Response>;
    /// Whether the server answers at all (any HTTP status), without an Omaha check-in that the
    /// server would count (a not yet confirmed boot must not look like a completed update).
    fn probe(&mut self) -> AgentResult<()>;
}

/// Takes and gives back the fleet-wide reboot slot (FleetLock).
pub trait RebootLock: Send {
    fn pre_reboot(&mut self) -> AgentResult<()>;
    fn steady_state(&mut self) -> AgentResult<()>;
}

/// Installs the ring crypto provider for rustls (once per process).
fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A shared HTTP client.
pub fn http_client(timeout: Duration) -> AgentResult<reqwest::Client> {
    install_crypto();
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .user_agent(concat!("twinroot-update-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            AgentError::new(
                ErrorKind::Internal,
                format!("cannot build HTTP client: {e}"),
            )
        })
}

fn net_err(url: &str, e: reqwest::Error) -> AgentError {
    let mut msg = format!("{url}: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    AgentError::new(ErrorKind::Network, msg)
}

fn status_err(url: &str, status: reqwest::StatusCode) -> AgentError {
    AgentError::new(
        ErrorKind::HttpStatus(status.as_u16()),
        format!("{url}: server answered HTTP {status}"),
    )
}

/// A bundle at an HTTP(S) URL.
pub struct HttpSource {
    pub client: reqwest::Client,
    pub rt: Handle,
    pub url: String,
}

impl BundleSource for HttpSource {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn open_at(&mut self, offset: u64) -> AgentResult<Box<dyn Read + Send>> {
        let mut req = self.client.get(&self.url);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
        }
        let resp = self
            .rt
            .block_on(async move { req.send().await })
            .map_err(|e| net_err(&self.url, e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Err(AgentError::new(
                ErrorKind::Malformed,
                format!(
                    "{}: bundle is truncated: the server has no byte {offset}",
                    self.url
                ),
            ));
        }
        if !status.is_success() {
            return Err(status_err(&self.url, status));
        }
        // A server that ignores Range answers 200 with the whole file: skip what we have.
        let skip = if offset > 0 && status != reqwest::StatusCode::PARTIAL_CONTENT {
            offset
        } else {
            0
        };
        let mut body = HttpBody {
            rt: self.rt.clone(),
            resp,
            chunk: bytes::Bytes::new(),
            pos: 0,
        };
        if skip > 0 {
            io::copy(&mut (&mut body).take(skip), &mut io::sink())
                .map_err(|e| AgentError::new(ErrorKind::Network, format!("{}: {e}", self.url)))?;
        }
        Ok(Box::new(body))
    }

    fn retryable(&self) -> bool {
        true
    }
}

/// `Read` over a streaming HTTP response body.
struct HttpBody {
    rt: Handle,
    resp: reqwest::Response,
    chunk: bytes::Bytes,
    pos: usize,
}

impl Read for HttpBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            let resp = &mut self.resp;
            match self.rt.block_on(async move { resp.chunk().await }) {
                Ok(Some(c)) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Omaha over HTTP POST.
pub struct HttpOmaha {
    pub client: reqwest::Client,
    pub rt: Handle,
    pub url: String,
}

impl OmahaTransport for HttpOmaha {
    fn exchange(&mut self, request: &omaha::Request) -> AgentResult<omaha::Response> {
        let body = request.to_xml();
        let url = self.url.clone();
        let client = self.client.clone();
        let (status, bytes) = self.rt.block_on(async move {
            let resp = client
                .post(&url)
                .header(CONTENT_TYPE, "text/xml")
                .body(body)
                .send()
                .await
                .map_err(|e| net_err(&url, e))?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| net_err(&url, e))?;
            Ok::<_, AgentError>((status, bytes))
        })?;
        if !status.is_success() {
            return Err(status_err(&self.url, status));
        }
        omaha::Response::parse(&bytes).map_err(|e| {
            AgentError::new(
                ErrorKind::Network,
                format!("{}: bad Omaha response: {e}", self.url),
            )
        })
    }

    fn probe(&mut self) -> AgentResult<()> {
        let url = self.url.clone();
        let client = self.client.clone();
        self.rt.block_on(async move {
            client
                .get(&url)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| net_err(&url, e))
        })
    }
}

/// FleetLock client (`POST /v1/pre-reboot`, `POST /v1/steady-state`).
pub struct FleetLockClient {
    pub client: reqwest::Client,
    pub rt: Handle,
    /// Base URL of the coordinator (without the `/v1/...` path).
    pub base_url: String,
    pub id: String,
    pub group: String,
}

impl FleetLockClient {
    fn call(&mut self, path: &str) -> AgentResult<()> {
        let url = format!("{}{path}", self.base_url.trim_end_matches('/'));
        let body = serde_json::to_vec(&fleetlock::Request::new(&self.id, &self.group))
            .expect("fleetlock request serializes");
        let client = self.client.clone();
        let u = url.clone();
        let (status, bytes) = self.rt.block_on(async move {
            let resp = client
                .post(&u)
                .header(fleetlock::PROTOCOL_HEADER, fleetlock::PROTOCOL_HEADER_VALUE)
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| net_err(&u, e))?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|e| net_err(&u, e))?;
            Ok::<_, AgentError>((status, bytes))
        })?;
        if status.is_success() {
            return Ok(());
        }
        let detail = match serde_json::from_slice::<fleetlock::ErrorBody>(&bytes) {
            Ok(b) => b.to_string(),
            Err(_) => String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        };
        Err(AgentError::new(
            ErrorKind::RebootLock,
            format!("{url}: HTTP {status}: {detail}"),
        ))
    }
}

impl RebootLock for FleetLockClient {
    fn pre_reboot(&mut self) -> AgentResult<()> {
        self.call(fleetlock::PRE_REBOOT_PATH)
    }

    fn steady_state(&mut self) -> AgentResult<()> {
        self.call(fleetlock::STEADY_STATE_PATH)
    }
}
