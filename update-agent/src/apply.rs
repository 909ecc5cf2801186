//! The apply path: verified, resumable, streaming install of a bundle into the inactive slot.
//!
//! Order of events (each step only after the previous one succeeded):
//! 1. the bundle header is read and its signatures checked against the keyring;
//! 2. the release is checked against policy (downgrade, board, quarantine, size);
//! 3. the inactive slot is made unbootable (priority 0) — before its first byte is written;
//! 4. the body is streamed through four stages on their own threads: fetch + body SHA-256
//!    (signed digest), zstd decompression, slot write (with early writeback every few MiB), and
//!    the read-back; memory stays bounded by the channel depths and the zstd window;
//! 5. the read-back stage syncs each written 32 MiB segment and reads it back while the stream
//!    goes on (O_DIRECT from the medium where the disk allows it, else after dropping the range
//!    from the page cache; from the page cache when `readback_from_medium` is off), reading and
//!    hashing on two threads; the SHA-256 of the slot as read back must be the signed image
//!    digest. That is the image digest check: the decompressed stream is not hashed a second
//!    time on its way to the disk;
//! 6. only then is the slot marked (priority above the other slot, `tries`, not successful).
//!
//! Resume: a cut connection is retried from the current body offset (Range) with the pipeline's
//! state kept in memory. Across an agent restart, the pipeline state cannot be saved, so the agent
//! checkpoints at zstd frame boundaries (body offset, image offset) after syncing the slot; on
//! restart it continues the download from the body offset with a fresh decoder and writes from
//! the image offset. The read-back still covers the whole slot from its first byte, so the
//! signed image digest covers every byte, old and new.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use twinroot_format::bundle::{self, BundleError, MAX_WINDOW_LOG, VerifiedHeader};
use twinroot_format::keyring::Keyring;
use twinroot_format::manifest::Manifest;
use twinroot_format::slot::{self, SlotAttrs, SlotName};

use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::slots::{AlignedBuf, BootedSlot, SlotSink, SlotTable};
use crate::state::{DownloadCheckpoint, PersistentState, StagedUpdate, StateStore};

/// Body bytes read per chunk.
const BODY_CHUNK: usize = 256 * 1024;
/// Image bytes per chunk handed to the writer.
const IMAGE_CHUNK: usize = 1024 * 1024;
/// Chunks in flight between two stages.
const QUEUE: usize = 4;
/// Image bytes handed to the read-back thread at a time.
const READBACK_SEGMENT: u64 = 32 * 1024 * 1024;
/// Image bytes written between two early-writeback requests.
const WRITEBACK_EVERY: u64 = 4 * 1024 * 1024;
/// Default image bytes between two persisted checkpoints.
pub const CHECKPOINT_EVERY: u64 = 32 * 1024 * 1024;

/// Where a bundle comes from: a file or an HTTP URL, opened at any byte offset.
pub trait BundleSource: Send {
    /// The URL or path (names the source in errors; identifies it in checkpoints).
    fn describe(&self) -> String;
    /// A reader of the bundle from `offset` to its end.
    fn open_at(&mut self, offset: u64) -> AgentResult<Box<dyn Read + Send>>;
    /// Whether a failed read is worth retrying (a network, not a local file).
    fn retryable(&self) -> bool;
}

/// A bundle in a local file.
pub struct FileSource {
    pub path: std::path::PathBuf,
}

impl BundleSource for FileSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn open_at(&mut self, offset: u64) -> AgentResult<Box<dyn Read + Send>> {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path).map_err(|e| {
            AgentError::new(
                ErrorKind::Internal,
                format!("{}: cannot open bundle: {e}", self.path.display()),
            )
        })?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| {
            AgentError::new(ErrorKind::Internal, format!("{}: {e}", self.path.display()))
        })?;
        Ok(Box::new(io::BufReader::with_capacity(BODY_CHUNK, f)))
    }

    fn retryable(&self) -> bool {
        false
    }
}

/// What the host allows. Plain data, filled from the settings or the command line.
#[derive(Debug, Clone)]
pub struct InstallPolicy {
    pub current_version: semver::Version,
    pub allow_downgrade: bool,
    pub board: Option<String>,
    pub tries: u8,
    /// Reopen attempts without progress before a download fails.
    pub download_retries: u32,
    /// First retry delay; doubles per attempt, capped at 30 s.
    pub retry_base: Duration,
    /// Image bytes between two persisted resume checkpoints (taken at zstd frame ends).
    pub checkpoint_every: u64,
    /// Read each written range back from the medium itself (O_DIRECT, or after dropping it
    /// from the page cache), not through the page cache; costs a full read of the image from
    /// the device.
    pub readback_from_medium: bool,
}

/// The result of a successful install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub version: semver::Version,
    pub slot: SlotName,
    pub attrs: SlotAttrs,
    /// Image bytes that were already in place from a previous, interrupted attempt.
    pub resumed_from: u64,
}

/// Maps a bundle verification failure to the agent's error kinds.
pub fn bundle_error(source: &str, e: BundleError) -> AgentError {
    let kind = match &e {
        BundleError::BadSignature(_)
        | BundleError::DuplicateSignature(_)
        | BundleError::NotEnoughSignatures { .. } => ErrorKind::Signature,
        BundleError::BodyDigest { .. }
        | BundleError::ImageDigest { .. }
        | BundleError::ImageSize { .. }
        | BundleError::ImageTooLarge { .. } => ErrorKind::DigestMismatch,
        BundleError::Io(_) => ErrorKind::Network,
        _ => ErrorKind::Malformed,
    };
    AgentError::new(kind, format!("{source}: {e}"))
}

/// Checks a verified manifest against the host's policy. Pure.
pub fn check_release(
    manifest: &Manifest,
    policy: &InstallPolicy,
    quarantined: &[String],
    slot_capacity: u64,
) -> AgentResult<()> {
    let v = &manifest.os_version;
    if let (Some(theirs), Some(ours)) = (&manifest.board, &policy.board)
        && theirs != ours
    {
        return Err(AgentError::new(
            ErrorKind::WrongBoard,
            format!("bundle {v} is for board {theirs:?}, this host is {ours:?}"),
        ));
    }
    if quarantined.iter().any(|q| q == &v.to_string()) {
        return Err(AgentError::new(
            ErrorKind::Quarantined,
            format!(
                "version {v} is quarantined: this host rolled back from it (lift with `update-agent unquarantine {v}`)"
            ),
        ));
    }
    if *v <= policy.current_version && !policy.allow_downgrade {
        return Err(AgentError::new(
            ErrorKind::Downgrade,
            format!(
                "bundle version {v} is not newer than the running {}; set agent.allow_downgrade = true to allow",
                policy.current_version
            ),
        ));
    }
    if let Some(min) = &manifest.min_source_version
        && policy.current_version < *min
    {
        return Err(AgentError::new(
            ErrorKind::SourceTooOld,
            format!(
                "bundle {v} needs at least version {min} installed, this host runs {}",
                policy.current_version
            ),
        ));
    }
    if manifest.image.size > slot_capacity {
        return Err(AgentError::new(
            ErrorKind::TooLarge,
            format!(
                "image of {v} is {} bytes, larger than the {slot_capacity}-byte slot",
                manifest.image.size
            ),
        ));
    }
    Ok(())
}

/// Everything an install needs, handed in.
pub struct Install<'a> {
    pub slots: &'a mut dyn SlotTable,
    pub booted: BootedSlot,
    pub store: &'a mut dyn StateStore,
    pub source: &'a mut dyn BundleSource,
    pub keyring: &'a Keyring,
    pub policy: &'a InstallPolicy,
    /// Image bytes written so far, for progress display.
    pub progress: Option<&'a AtomicU64>,
    /// Called once the header is verified and the release accepted, before any write.
    pub on_accepted: Option<&'a mut dyn FnMut(&Manifest)>,
}

/// SHA-256 over the streamed body and the read-back slot: ring's SHA-NI code, about 12% faster
/// than sha2's on this path, where hashing is most of the agent's CPU time.
struct StreamDigest(ring::digest::Context);

impl StreamDigest {
    fn new() -> Self {
        StreamDigest(ring::digest::Context::new(&ring::digest::SHA256))
    }

    fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(self) -> [u8; 32] {
        self.0
            .finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn state_err(e: crate::state::StateError) -> AgentError {
    AgentError::new(ErrorKind::Disk, e.to_string())
}

impl Install<'_> {
    /// Runs the install. On any error the inactive slot is left unbootable and the active slot
    /// untouched.
    pub fn run(mut self) -> AgentResult<Installed> {
        let desc = self.source.describe();
        let target = self.booted.inactive();
        let started = std::time::Instant::now();
        let mut state = self.store.load().map_err(state_err)?;

        let mut reader = self.source.open_at(0)?;
        let header =
            bundle::read_header(&mut reader, self.keyring).map_err(|e| bundle_error(&desc, e))?;
        let manifest = header.manifest().clone();
        let capacity = self.slots.capacity(target.name())?;
        check_release(&manifest, self.policy, &state.quarantined, capacity)?;
        if let Some(cb) = self.on_accepted.as_mut() {
            cb(&manifest);
        }
        let manifest_sha = sha256_hex(&header.header().manifest_bytes);
        let version = manifest.os_version.to_string();

        let resume = state.download.clone().filter(|c| {
            c.url == desc
                && c.manifest_sha256 == manifest_sha
                && c.slot == target.name().to_string()
                && c.image_offset <= manifest.image.size
                && c.body_offset <= manifest.body.size
        });
        if resume.is_some() {
            // Hang up on the full response at once: what it sends past the header is not needed,
            // and everything it pushes while the slot is re-hashed would be wasted download.
            reader = Box::new(io::empty());
        }

        // The slot about to be written can never be booted from here on.
        self.slots
            .set_attrs(&[(target.name(), SlotAttrs::UNBOOTABLE)])?;
        if state
            .staged
            .as_ref()
            .is_some_and(|s| s.slot == target.name().to_string())
        {
            state.staged = None;
        }
        state.slot_versions.remove(&target.name().to_string());

        let mut sink = self.slots.open_writer(target)?;
        let (start_body, start_image) = match &resume {
            Some(c) => {
                // The bytes before the checkpoint are not re-hashed here: the read-back hashes
                // the whole slot from its first byte anyway.
                sink.seek_to(c.image_offset)
                    .map_err(|e| AgentError::new(ErrorKind::Disk, e.to_string()))?;
                reader = self.source.open_at(header.header_len() + c.body_offset)?;
                tracing::info!(version = %version, body_offset = c.body_offset, image_offset = c.image_offset, "resuming download");
                (c.body_offset, c.image_offset)
            }
            None => (0, 0),
        };
        state.download = Some(DownloadCheckpoint {
            url: desc.clone(),
            version: version.clone(),
            slot: target.name().to_string(),
            manifest_sha256: manifest_sha.clone(),
            body_offset: start_body,
            image_offset: start_image,
        });
        self.store.save(&state).map_err(state_err)?;

        let store = &mut *self.store;
        let mut checkpoint = |body_offset: u64, image_offset: u64| -> AgentResult<()> {
            if let Some(d) = state.download.as_mut() {
                d.body_offset = body_offset;
                d.image_offset = image_offset;
            }
            store.save(&state).map_err(state_err)
        };
        let pipeline = Pipeline {
            header: &header,
            source_desc: &desc,
            retryable: self.source.retryable(),
            policy: self.policy,
            start_body,
            start_image,
            progress: self.progress,
        };
        // From the medium: O_DIRECT reads where the disk allows them, else evict each range
        // from the page cache before reading it.
        let medium = if self.policy.readback_from_medium {
            self.slots
                .open_medium_reader(target.name(), manifest.image.size)?
        } else {
            None
        };
        let evict = self.policy.readback_from_medium && medium.is_none();
        let readback = ReadBack {
            reader: match medium {
                Some(r) => r,
                None => self.slots.open_reader(target.name(), manifest.image.size)?,
            },
            flush: sink.flusher(evict).map_err(|e| {
                AgentError::new(ErrorKind::Disk, format!("{}: {e}", self.slots.describe()))
            })?,
            disk: self.slots.describe(),
        };
        let (n, got) = pipeline.run(
            reader,
            &mut *self.source,
            &mut *sink,
            &mut checkpoint,
            readback,
        )?;
        drop(sink);
        // What was read back from the slot after fsync (from the medium itself unless configured
        // otherwise) must be the signed image. This is the one image digest check: hashing the
        // decompressed stream as well would check the same bytes a second time, one copy earlier.
        if n != manifest.image.size || got != manifest.image.sha256.0 {
            return Err(AgentError::new(
                ErrorKind::DigestMismatch,
                format!(
                    "{}: slot {} read back as {} ({n} bytes), the signed manifest of {version} says {} ({} bytes): the bundle or the medium is bad",
                    self.slots.describe(),
                    target.name(),
                    hex::encode(got),
                    manifest.image.sha256,
                    manifest.image.size
                ),
            ));
        }
        tracing::info!(
            slot = %target.name(),
            bytes = n,
            from = if self.policy.readback_from_medium { "medium" } else { "page cache" },
            elapsed = ?started.elapsed(),
            "slot read back after fsync: matches the signed image digest"
        );
        // Only now: make it the next boot.
        let current = self.slots.slots()?;
        let (new, other) =
            slot::staged(current[self.booted.name().index()].attrs, self.policy.tries);
        self.slots
            .set_attrs(&[(target.name(), new), (self.booted.name(), other)])?;

        let mut state = self.store.load().map_err(state_err)?;
        state.download = None;
        state.staged = Some(StagedUpdate {
            version: version.clone(),
            slot: target.name().to_string(),
            previous_version: self.policy.current_version.to_string(),
            reboot_requested: false,
        });
        state
            .slot_versions
            .insert(target.name().to_string(), version.clone());
        state.slot_versions.insert(
            self.booted.name().to_string(),
            self.policy.current_version.to_string(),
        );
        self.store.save(&state).map_err(state_err)?;
        tracing::info!(version = %version, slot = %target.name(), attrs = %new, "update staged");
        Ok(Installed {
            version: manifest.os_version.clone(),
            slot: target.name(),
            attrs: new,
            resumed_from: start_image,
        })
    }
}

/// Fills `buf` as far as `r` allows; returns the bytes read (0 at end of input).
fn read_full(r: &mut (dyn Read + Send), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Clears a stale checkpoint (used when an install fails for a reason resuming cannot fix).
pub fn forget_download(state: &mut PersistentState) {
    state.download = None;
}

/// The read-back side of the slot: a reader from the slot's first byte and a flusher.
struct ReadBack {
    reader: Box<dyn Read + Send>,
    flush: crate::slots::Flusher,
    /// Names the disk in errors.
    disk: String,
}

/// From the write stage to the read-back stage.
enum Written {
    /// Slot bytes `[offset, offset + len)` are written: sync them and read them back.
    Range(u64, u64),
    /// A zstd frame ended at these body and image offsets; everything before is in earlier
    /// ranges. Persist it as the resume point.
    Checkpoint { body: u64, image: u64 },
}

enum ImageMsg {
    Data(Vec<u8>),
    /// A zstd frame ended after this many body bytes (counted from the start of the body).
    FrameEnd(u64),
}

struct Pipeline<'a> {
    header: &'a VerifiedHeader,
    source_desc: &'a str,
    retryable: bool,
    policy: &'a InstallPolicy,
    start_body: u64,
    start_image: u64,
    progress: Option<&'a AtomicU64>,
}

/// How a pipeline stage ended without an error of its own.
enum StageEnd {
    Done,
    /// A later stage hung up (it has the error to report).
    Stopped,
}

impl Pipeline<'_> {
    /// Runs the stages; returns the byte count and SHA-256 of the slot as read back.
    fn run(
        &self,
        reader: Box<dyn Read + Send>,
        source: &mut dyn BundleSource,
        sink: &mut dyn SlotSink,
        checkpoint: &mut (dyn FnMut(u64, u64) -> AgentResult<()> + Send),
        readback: ReadBack,
    ) -> AgentResult<(u64, [u8; 32])> {
        let (body_tx, body_rx) = sync_channel::<Vec<u8>>(QUEUE);
        // Decompressed body buffers go back to the fetcher.
        let (body_free_tx, body_free_rx) = sync_channel::<Vec<u8>>(QUEUE + 2);
        let (image_tx, image_rx) = sync_channel::<ImageMsg>(QUEUE);
        // Written image buffers go back to the decoder instead of being freed and reallocated.
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(QUEUE + 2);
        // Ranges of the slot written and ready to be read back, and checkpoints, in order.
        let (written_tx, written_rx) = sync_channel::<Written>(1024);
        let (r, d, w, v) = std::thread::scope(|s| {
            let fetch = s.spawn(move || self.fetch(reader, source, body_tx, body_free_rx));
            let decode = s.spawn(move || self.decode(body_rx, body_free_tx, image_tx, free_rx));
            let verify = s.spawn(move || self.read_back(readback, written_rx, checkpoint));
            let w = self.write(image_rx, sink, free_tx, written_tx);
            (
                fetch.join().expect("fetch thread"),
                decode.join().expect("decode thread"),
                w,
                verify.join().expect("read-back thread"),
            )
        });
        // The earliest stage's error is the cause; later stages only saw its consequences.
        r?;
        d?;
        w?;
        v
    }

    /// Stage 4: makes each written range durable and reads it back (from the medium unless
    /// configured otherwise) into a running SHA-256, overlapping with the stream. Reading and
    /// hashing run on two threads so the device and the CPU work at the same time. Checkpoints
    /// are persisted here, once the range before them is durable, off the write path.
    fn read_back(
        &self,
        rb: ReadBack,
        rx: Receiver<Written>,
        checkpoint: &mut (dyn FnMut(u64, u64) -> AgentResult<()> + Send),
    ) -> AgentResult<(u64, [u8; 32])> {
        let ReadBack {
            mut reader,
            mut flush,
            disk,
        } = rb;
        let (data_tx, data_rx) = sync_channel::<(AlignedBuf, usize)>(2);
        let (free_tx, free_rx) = sync_channel::<AlignedBuf>(4);
        // Checkpoints are saved on a thread of their own (the state file's fsyncs would hold up
        // the read-back); a newer one queued behind the one being saved replaces it.
        let (saved_tx, saved_rx) = sync_channel::<(u64, u64)>(64);
        let save = move || -> AgentResult<()> {
            while let Ok(mut latest) = saved_rx.recv() {
                while let Ok(newer) = saved_rx.try_recv() {
                    latest = newer;
                }
                checkpoint(latest.0, latest.1)?;
            }
            Ok(())
        };
        let disk_err = |e: io::Error| {
            AgentError::new(ErrorKind::Disk, format!("{disk}: read-back failed: {e}"))
        };
        let read = move || -> AgentResult<u64> {
            let mut done = 0u64;
            for msg in rx {
                let (offset, len) = match msg {
                    Written::Range(offset, len) => (offset, len),
                    Written::Checkpoint { body, image } => {
                        // The ranges before it are durable: they were flushed above.
                        debug_assert!(image <= done);
                        // A closed channel means saving failed; the saver reports why.
                        let _ = saved_tx.send((body, image));
                        continue;
                    }
                };
                debug_assert_eq!(offset, done);
                flush(offset, len).map_err(disk_err)?;
                let mut left = len;
                while left > 0 {
                    let mut buf = free_rx
                        .try_recv()
                        .unwrap_or_else(|_| AlignedBuf::new(IMAGE_CHUNK));
                    let want = left.min(IMAGE_CHUNK as u64) as usize;
                    let n = read_full(&mut *reader, &mut buf[..want]).map_err(disk_err)?;
                    if n == 0 {
                        return Err(disk_err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("slot ends after {done} bytes"),
                        )));
                    }
                    done += n as u64;
                    left -= n as u64;
                    if data_tx.send((buf, n)).is_err() {
                        return Ok(done);
                    }
                }
            }
            Ok(done)
        };
        let (hashed, digest, read, saved) = std::thread::scope(|s| {
            let saving = s.spawn(save);
            let reading = s.spawn(read);
            let mut hasher = StreamDigest::new();
            let mut hashed = 0u64;
            for (buf, n) in data_rx {
                hasher.update(&buf[..n]);
                hashed += n as u64;
                let _ = free_tx.try_send(buf);
            }
            let digest = hasher.finish();
            (
                hashed,
                digest,
                reading.join().expect("read-back reader thread"),
                saving.join().expect("checkpoint thread"),
            )
        });
        read?;
        saved?;
        Ok((hashed, digest))
    }

    /// Stage 1: reads the body (reopening at the current offset after a failure), hashes it when
    /// it started at 0, and checks nothing follows it.
    fn fetch(
        &self,
        mut reader: Box<dyn Read + Send>,
        source: &mut dyn BundleSource,
        tx: SyncSender<Vec<u8>>,
        free: Receiver<Vec<u8>>,
    ) -> AgentResult<StageEnd> {
        let body = self.header.manifest().body;
        let header_len = self.header.header_len();
        let mut hasher = (self.start_body == 0).then(StreamDigest::new);
        let mut pos = self.start_body;
        let mut failures = 0u32;
        let mut last_error = String::new();
        while pos < body.size {
            let want = (body.size - pos).min(BODY_CHUNK as u64) as usize;
            let mut buf = free.try_recv().unwrap_or_default();
            buf.resize(want, 0);
            let mut filled = 0;
            let mut failed = false;
            while filled < want {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => {
                        last_error = format!(
                            "connection ended after {} of {} body bytes",
                            pos + filled as u64,
                            body.size
                        );
                        failed = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        last_error = e.to_string();
                        failed = true;
                        break;
                    }
                }
            }
            if filled > 0 {
                buf.truncate(filled);
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf);
                }
                pos += filled as u64;
                failures = 0;
                if tx.send(buf).is_err() {
                    return Ok(StageEnd::Stopped);
                }
            }
            if failed {
                if !self.retryable {
                    return Err(AgentError::new(
                        ErrorKind::Malformed,
                        format!(
                            "{}: bundle body is truncated: {} of the {} bytes the manifest states",
                            self.source_desc, pos, body.size
                        ),
                    ));
                }
                reader = loop {
                    failures += 1;
                    if failures > self.policy.download_retries {
                        return Err(AgentError::new(
                            ErrorKind::Network,
                            format!(
                                "{}: download failed at body byte {pos} after {} retries: {last_error}",
                                self.source_desc, self.policy.download_retries
                            ),
                        ));
                    }
                    let delay = self
                        .policy
                        .retry_base
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(Duration::from_secs(30));
                    tracing::warn!(offset = pos, attempt = failures, error = %last_error, "download interrupted, resuming");
                    std::thread::sleep(delay);
                    match source.open_at(header_len + pos) {
                        Ok(r) => break r,
                        Err(e)
                            if matches!(e.kind, ErrorKind::Network)
                                || matches!(e.kind, ErrorKind::HttpStatus(s) if s >= 500) =>
                        {
                            last_error = e.message;
                        }
                        Err(e) => return Err(e),
                    }
                };
            }
        }
        // Nothing may follow the body.
        let mut probe = [0u8; 1];
        if let Ok(n) = reader.read(&mut probe)
            && n > 0
        {
            return Err(bundle_error(
                self.source_desc,
                BundleError::TrailingData {
                    expected: body.size,
                },
            ));
        }
        if let Some(h) = hasher {
            let actual = h.finish();
            if actual != body.sha256.0 {
                return Err(bundle_error(
                    self.source_desc,
                    BundleError::BodyDigest {
                        expected: body.sha256,
                        actual: twinroot_format::manifest::Sha256Digest(actual),
                    },
                ));
            }
        }
        Ok(StageEnd::Done)
    }

    /// Stage 2: zstd decompression with a bounded window; reports frame ends.
    fn decode(
        &self,
        rx: Receiver<Vec<u8>>,
        body_free: SyncSender<Vec<u8>>,
        tx: SyncSender<ImageMsg>,
        free: Receiver<Vec<u8>>,
    ) -> AgentResult<StageEnd> {
        use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
        let derr =
            |e: io::Error| bundle_error(self.source_desc, BundleError::Decompress(e.to_string()));
        let mut dec = Decoder::new().map_err(derr)?;
        dec.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(derr)?;
        let mut out = vec![0u8; IMAGE_CHUNK];
        let mut out_pos = 0usize;
        let mut base = self.start_body;
        let mut at_boundary = true;
        for chunk in rx {
            let mut input = InBuffer::around(&chunk);
            loop {
                let before = input.pos();
                let mut output = OutBuffer::around_pos(&mut out[..], out_pos);
                let hint = dec.run(&mut input, &mut output).map_err(derr)?;
                let produced = output.pos() - out_pos;
                out_pos = output.pos();
                if input.pos() > before || produced > 0 {
                    at_boundary = hint == 0;
                }
                let was_full = out_pos == out.len();
                if was_full || (hint == 0 && out_pos > 0) {
                    let mut next = free.try_recv().unwrap_or_default();
                    next.resize(IMAGE_CHUNK, 0);
                    let mut full = std::mem::replace(&mut out, next);
                    full.truncate(out_pos);
                    out_pos = 0;
                    if tx.send(ImageMsg::Data(full)).is_err() {
                        return Ok(StageEnd::Stopped);
                    }
                }
                if hint == 0
                    && (input.pos() > before || produced > 0)
                    && tx
                        .send(ImageMsg::FrameEnd(base + input.pos() as u64))
                        .is_err()
                {
                    return Ok(StageEnd::Stopped);
                }
                if input.pos() == chunk.len() && !was_full {
                    break;
                }
            }
            base += chunk.len() as u64;
            let _ = body_free.try_send(chunk);
        }
        if !at_boundary {
            return Err(bundle_error(
                self.source_desc,
                BundleError::Decompress("body ends inside a zstd frame".into()),
            ));
        }
        if out_pos > 0 {
            out.truncate(out_pos);
            if tx.send(ImageMsg::Data(out)).is_err() {
                return Ok(StageEnd::Stopped);
            }
        }
        Ok(StageEnd::Done)
    }

    /// Stage 3: writes the image; asks for checkpoints at frame ends. (Its digest is checked on
    /// what the read-back stage reads from the slot.)
    fn write(
        &self,
        rx: Receiver<ImageMsg>,
        sink: &mut dyn SlotSink,
        free: SyncSender<Vec<u8>>,
        written: SyncSender<Written>,
    ) -> AgentResult<()> {
        let image = self.header.manifest().image;
        let mut pos = self.start_image;
        let mut last_checkpoint = pos;
        let mut writeback_from = pos;
        // The read-back covers the whole slot image, including bytes of an earlier attempt.
        let mut readback_from = 0u64;
        let hand_over = |upto: u64, from: &mut u64| {
            if upto > *from {
                // A closed channel means the read-back thread failed; it reports why.
                let _ = written.send(Written::Range(*from, upto - *from));
                *from = upto;
            }
        };
        let disk_err =
            |e: io::Error| AgentError::new(ErrorKind::Disk, format!("writing slot: {e}"));
        for msg in rx {
            match msg {
                ImageMsg::Data(buf) => {
                    if pos + buf.len() as u64 > image.size {
                        return Err(bundle_error(
                            self.source_desc,
                            BundleError::ImageTooLarge {
                                expected: image.size,
                            },
                        ));
                    }
                    sink.write_all(&buf).map_err(disk_err)?;
                    pos += buf.len() as u64;
                    if pos - writeback_from >= WRITEBACK_EVERY {
                        // Only a hint to the kernel; a failure shows in the syncs that follow.
                        let _ = sink.start_writeback(writeback_from, pos - writeback_from);
                        writeback_from = pos;
                    }
                    if let Some(p) = self.progress {
                        p.store(pos, Ordering::Relaxed);
                    }
                    let _ = free.try_send(buf);
                    if pos - readback_from >= READBACK_SEGMENT {
                        hand_over(pos, &mut readback_from);
                    }
                }
                ImageMsg::FrameEnd(body_offset) => {
                    if pos - last_checkpoint >= self.policy.checkpoint_every {
                        // The read-back stage syncs the range up to here, then persists the
                        // checkpoint: the write path does not wait for the device.
                        hand_over(pos, &mut readback_from);
                        let _ = written.send(Written::Checkpoint {
                            body: body_offset,
                            image: pos,
                        });
                        last_checkpoint = pos;
                    }
                }
            }
        }
        if pos != image.size {
            return Err(bundle_error(
                self.source_desc,
                BundleError::ImageSize {
                    expected: image.size,
                    actual: pos,
                },
            ));
        }
        hand_over(pos, &mut readback_from);
        Ok(())
    }
}
