//! Test support: a real HTTP/1.1 server on a loopback port (files with Range, scripted connection
//! cuts, an Omaha endpoint), bundles and disk images built with twinroot-format.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use twinroot_format::bundle;
use twinroot_format::gpt::{self, DiskLayout, SlotDisk};
use twinroot_format::keyring::{self, Keyring};
use twinroot_format::manifest::{BodyInfo, Compression, Digest, Manifest, Sha256Digest};
use twinroot_format::slot::{SlotAttrs, SlotName, SlotState};

pub const MIB: u64 = 1 << 20;

/// A slot the host booted and confirmed.
pub const GOOD: SlotAttrs = SlotAttrs {
    priority: 1,
    tries: 0,
    successful: true,
};

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<u64>,
    pub body: Vec<u8>,
}

type PostHandler = Box<dyn Fn(&str, &[u8]) -> (u16, String) + Send + Sync>;

#[derive(Default)]
struct Shared {
    files: HashMap<String, Arc<Vec<u8>>>,
    /// For each coming GET: cut the connection after this many body bytes.
    cuts: VecDeque<u64>,
    post: Option<PostHandler>,
    seen: Vec<Seen>,
    /// GET bodies are sent at most this many bytes per second.
    rate: Option<u64>,
    /// The next GET that reaches this file offset stops there until [`TestServer::release`].
    hold_at: Option<u64>,
    held: bool,
    /// File bytes GET responses wrote into their sockets, over all requests.
    served: u64,
}

/// A real HTTP server on 127.0.0.1:0, one thread per connection, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let sh = sh.clone();
                        std::thread::spawn(move || {
                            let _ = serve(conn, sh);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Accept poll interval, not a wait for a test condition.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
        });
        TestServer {
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn put(&self, path: &str, data: Vec<u8>) {
        self.shared
            .lock()
            .unwrap()
            .files
            .insert(path.to_string(), Arc::new(data));
    }

    /// The next GET requests are cut after these many body bytes each.
    pub fn cut_next(&self, after: &[u64]) {
        self.shared
            .lock()
            .unwrap()
            .cuts
            .extend(after.iter().copied());
    }

    /// Answers every POST (Omaha, FleetLock) with `f(path, body) -> (status, body)`.
    pub fn on_post(&self, f: impl Fn(&str, &[u8]) -> (u16, String) + Send + Sync + 'static) {
        self.shared.lock().unwrap().post = Some(Box::new(f));
    }

    /// Omaha requests received so far, parsed.
    pub fn omaha_requests(&self) -> Vec<twinroot_format::omaha::Request> {
        self.seen()
            .iter()
            .filter(|s| s.method == "POST" && s.path == "/v1/update/")
            .map(|s| twinroot_format::omaha::Request::parse(&s.body).unwrap())
            .collect()
    }

    /// (type, result, errorcode) of every Omaha event received so far.
    pub fn omaha_events(&self) -> Vec<(u32, u32, Option<i64>)> {
        self.omaha_requests()
            .iter()
            .flat_map(|r| r.apps.iter())
            .flat_map(|a| a.events.iter())
            .map(|e| (e.event_type, e.event_result, e.error_code))
            .collect()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// Sends GET bodies at most `bytes_per_second`.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.shared.lock().unwrap().rate = Some(bytes_per_second);
    }

    /// The next GET response that gets to file offset `offset` stalls there until
    /// [`TestServer::release`].
    pub fn hold_at(&self, offset: u64) {
        let mut s = self.shared.lock().unwrap();
        s.hold_at = Some(offset);
        s.held = false;
    }

    /// Whether a response is stalled at the hold offset.
    pub fn holding(&self) -> bool {
        self.shared.lock().unwrap().held
    }

    /// Lets a stalled response go on.
    pub fn release(&self) {
        let mut s = self.shared.lock().unwrap();
        s.hold_at = None;
        s.held = false;
    }

    /// File bytes written into sockets by all GET responses so far.
    pub fn served_bytes(&self) -> u64 {
        self.shared.lock().unwrap().served
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, shared: Arc<Mutex<Shared>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut content_length = 0usize;
    let mut range = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => content_length = v.parse().unwrap_or(0),
            "range" => {
                range = v
                    .strip_prefix("bytes=")
                    .and_then(|r| r.strip_suffix('-'))
                    .and_then(|n| n.parse::<u64>().ok())
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let (file, cut, omaha) = {
        let mut s = shared.lock().unwrap();
        s.seen.push(Seen {
            method: method.clone(),
            path: path.clone(),
            range,
            body: body.clone(),
        });
        let file = s.files.get(&path).cloned();
        let cut = if method == "GET" && file.is_some() {
            s.cuts.pop_front()
        } else {
            None
        };
        let omaha = if method == "POST" {
            s.post.as_ref().map(|f| f(&path, &body))
        } else {
            None
        };
        (file, cut, omaha)
    };
    if let Some((status, text)) = omaha {
        write!(
            conn,
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )?;
        return Ok(());
    }
    let Some(file) = file else {
        write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    let len = file.len() as u64;
    let start = range.unwrap_or(0);
    if start >= len && len > 0 {
        write!(
            conn,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    if range.is_some() {
        write!(
            conn,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            len - 1,
            len - start
        )?;
    } else {
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )?;
    }
    let body = &file[start as usize..];
    let n = cut.map_or(body.len(), |c| (c as usize).min(body.len()));
    send_throttled(&mut conn, &body[..n], start, &shared)?;
    conn.flush()?;
    if cut.is_some() {
        conn.shutdown(std::net::Shutdown::Both)?;
    }
    Ok(())
}

/// Writes `data` (file bytes from offset `start`) in small pieces, keeping to the configured rate,
/// stalling at the hold offset, and counting what the socket took.
fn send_throttled(
    conn: &mut TcpStream,
    data: &[u8],
    start: u64,
    shared: &Mutex<Shared>,
) -> std::io::Result<()> {
    const PIECE: usize = 64 * 1024;
    let began = Instant::now();
    let mut sent = 0usize;
    while sent < data.len() {
        let (rate, hold) = {
            let s = shared.lock().unwrap();
            (s.rate, s.hold_at)
        };
        let pos = start + sent as u64;
        let mut end = (sent + PIECE).min(data.len());
        if let Some(h) = hold.filter(|h| *h >= pos && *h < start + data.len() as u64) {
            if h == pos {
                shared.lock().unwrap().held = true;
                // Stalled until the test releases the hold (polled; this is the server's pace,
                // not a test waiting for a condition).
                while shared.lock().unwrap().hold_at == Some(h) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            end = end.min((h - start) as usize);
        }
        conn.write_all(&data[sent..end])?;
        shared.lock().unwrap().served += (end - sent) as u64;
        sent = end;
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Deterministic image content: half pseudo-random, half runs of zeros.
pub fn image(size: usize, seed: u32) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    let mut v = vec![0u8; size];
    for block in v.chunks_mut(8192) {
        let random = block.len().min(4096);
        for word in block[..random].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
    v
}

pub struct Keys {
    pub signing: Vec<ed25519_dalek::SigningKey>,
    pub keyring_path: PathBuf,
}

pub fn keys(dir: &Path) -> Keys {
    let k = keyring::generate_signing_key().unwrap();
    let ring = Keyring::new(1, 1, &[k.verifying_key()]).unwrap();
    let keyring_path = dir.join("keyring.json");
    std::fs::write(&keyring_path, ring.to_bytes()).unwrap();
    Keys {
        signing: vec![k],
        keyring_path,
    }
}

pub struct BundleSpec<'a> {
    pub image: &'a [u8],
    pub version: &'a str,
    /// Image bytes per zstd frame (multi-frame bodies can be resumed across restarts).
    pub frame: usize,
    pub board: Option<&'a str>,
}

/// A bundle with a body of independent zstd frames.
pub fn make_bundle(spec: &BundleSpec, keys: &[ed25519_dalek::SigningKey]) -> Vec<u8> {
    let mut body = Vec::new();
    for chunk in spec.image.chunks(spec.frame.max(1)) {
        body.extend(zstd::bulk::compress(chunk, 3).unwrap());
    }
    let manifest = Manifest {
        format_version: twinroot_format::manifest::FORMAT_VERSION,
        os_version: spec.version.parse().unwrap(),
        created_unix: 1_700_000_000,
        image: Digest {
            size: spec.image.len() as u64,
            sha256: Sha256Digest(Sha256::digest(spec.image).into()),
        },
        body: BodyInfo {
            size: body.len() as u64,
            sha256: Sha256Digest(Sha256::digest(&body).into()),
            compression: Compression::Zstd,
        },
        min_source_version: None,
        board: spec.board.map(str::to_string),
    };
    let mut out = bundle::encode_header(&manifest, keys).unwrap();
    out.extend(body);
    out
}

/// A bundle of `image` as `version` in frames of 1 MiB of image, for any board.
pub fn bundle_of(version: &str, image: &[u8], keys: &[ed25519_dalek::SigningKey]) -> Vec<u8> {
    let spec = BundleSpec {
        image,
        version,
        frame: MIB as usize,
        board: None,
    };
    make_bundle(&spec, keys)
}

/// Header length of a bundle (where the body starts).
pub fn header_len(bundle_bytes: &[u8]) -> u64 {
    bundle::read_header_unverified(&mut &bundle_bytes[..])
        .unwrap()
        .header_len()
}

/// A disk image whose slot A is booted and good, filled with `a_content`; slot B unbootable.
pub fn disk(dir: &Path, slot_size: u64, a_content: &[u8]) -> PathBuf {
    let path = dir.join("disk.img");
    let mut d = gpt::create_disk(
        &path,
        &DiskLayout {
            slot_size,
            state_size: 0,
        },
    )
    .unwrap();
    d.set_attrs(SlotName::A, GOOD).unwrap();
    let mut w = d.slot_writer(SlotName::A, None).unwrap();
    w.write_all(a_content).unwrap();
    w.finish().unwrap();
    path
}

pub fn slots(disk: &Path) -> [SlotState; 2] {
    SlotDisk::open(disk).unwrap().slots()
}

/// SHA-256 of a whole slot partition.
pub fn slot_digest(disk: &Path, slot: SlotName) -> [u8; 32] {
    let len = SlotDisk::open(disk).unwrap().slot_extent(slot).len;
    slot_digest_len(disk, slot, len)
}

/// SHA-256 of the first `len` bytes of a slot.
pub fn slot_digest_len(disk: &Path, slot: SlotName, len: u64) -> [u8; 32] {
    let d = SlotDisk::open(disk).unwrap();
    let mut r = d.slot_reader(slot, len).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The first `len` bytes of a slot.
pub fn slot_bytes(disk: &Path, slot: SlotName, len: u64) -> Vec<u8> {
    let d = SlotDisk::open(disk).unwrap();
    let mut r = d.slot_reader(slot, len).unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_update-agent")
}

/// `update-agent` with the given args and no default configuration roots, logging warnings.
pub fn agent_command(config_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(agent_bin());
    c.arg("--config-dir")
        .arg(config_dir)
        .args(args)
        .env("UPDATE_AGENT_LOG", "warn");
    c
}

/// Runs `update-agent` with the given args and no default configuration roots.
pub fn run_agent(config_dir: &Path, args: &[&str]) -> Output {
    agent_command(config_dir, args).output().unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An Omaha response offering `version` at `base_url` + `name`, or no update.
pub fn omaha_response(app_id: &str, offer: Option<(&str, &str, &str, u64)>) -> String {
    use twinroot_format::omaha::*;
    let update_check = Some(match offer {
        None => UpdateCheckResponse::NoUpdate,
        Some((base_url, name, version, size)) => UpdateCheckResponse::Ok(UpdateOffer {
            urls: vec![base_url.to_string()],
            version: version.to_string(),
            packages: vec![Package {
                name: name.to_string(),
                size,
                hash_sha1_base64: None,
                hash_sha256_hex: None,
                required: true,
            }],
            actions: vec![Action {
                event: "postinstall".into(),
                sha256_base64: Some("AAAA".into()),
                disable_payload_backoff: Some(true),
            }],
        }),
    });
    Response {
        protocol: "3.0".into(),
        server: Some("test".into()),
        daystart: None,
        apps: vec![AppResponse {
            update_check,
            ping: true,
            ..AppResponse::ok(app_id)
        }],
    }
    .to_xml()
}

pub const APP_ID: &str = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}";

/// A bundle as `image-tool bundle` writes it (`bundle::write_bundle`: independent zstd frames of
/// `FRAME_IMAGE_BYTES` of image each, level 3).
pub fn real_bundle(version: &str, image: &[u8], keys: &[ed25519_dalek::SigningKey]) -> Vec<u8> {
    let mut scratch = std::io::Cursor::new(Vec::new());
    let mut out = Vec::new();
    bundle::write_bundle(
        image,
        &bundle::ReleaseInfo {
            os_version: version.parse().unwrap(),
            created_unix: 1_700_000_000,
            min_source_version: None,
            board: None,
        },
        keys,
        3,
        &mut scratch,
        &mut out,
    )
    .unwrap();
    out
}

/// A workspace binary (`update-server`): `TWINROOT_BIN_DIR`, else next to the test binary
/// (`cargo build -p update-server` puts it there).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    std::env::var_os("TWINROOT_BIN_DIR")
        .map(|d| PathBuf::from(d).join(name))
        .into_iter()
        .chain(exe.ancestors().skip(1).take(2).map(|d| d.join(name)))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "binary {name} not found next to {} (cargo build -p {name}, or set TWINROOT_BIN_DIR)",
                exe.display()
            )
        })
}

/// A real `update-server serve` process (SQLite under `dir/server`) on a free loopback port, with
/// an admin token; killed on drop.
pub struct UpdateServerProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    pub token: String,
    log: PathBuf,
}

impl UpdateServerProcess {
    pub fn start(dir: &Path, keyring: &Path) -> UpdateServerProcess {
        let program = workspace_binary("update-server");
        let data = dir.join("server");
        std::fs::create_dir_all(&data).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("update-server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&program)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data)
            .arg("--keyring")
            .arg(keyring)
            .env("RUST_LOG", "warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut server = UpdateServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            log,
        };
        wait_for(
            "the update server to listen",
            Duration::from_secs(60),
            || {
                if let Some(status) = server.child.try_wait().unwrap() {
                    panic!("update-server exited ({status}): {}", server.log_text());
                }
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            },
        );
        let out = Command::new(&program)
            .args(["token", "create", "--role", "admin", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success(), "token create: {}", text(&out));
        server.token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        server
    }

    /// `update-server SUBCOMMAND... --server URL --token T ARGS...`; panics naming its output if
    /// it fails.
    pub fn cli(&self, subcommand: &[&str], args: &[&str]) -> String {
        let out = Command::new(workspace_binary("update-server"))
            .args(subcommand)
            .args(["--server", &self.base, "--token", &self.token])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "update-server {subcommand:?} {args:?}: {}\nserver log:\n{}",
            text(&out),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UpdateServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
