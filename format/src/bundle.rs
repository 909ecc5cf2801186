//! The release bundle: one file holding a signed manifest and the zstd-compressed root image.
//!
//! Layout (docs/FORMAT.md has the full description):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TWINRBDL"
//! 8       4     format version, u32 little-endian (1)
//! 12      4     manifest length M, u32 LE, 1..=MAX_MANIFEST_LEN
//! 16      4     signature block length S, u32 LE, a multiple of 72, 72..=72*MAX_SIGNATURES
//! 20      4     reserved, must be 0
//! 24      M     manifest: exact JSON bytes (see manifest.rs)
//! 24+M    S     signatures: S/72 entries of key id (8 bytes) + ed25519 signature (64 bytes)
//! 24+M+S  ...   body: exactly manifest.body.size bytes of zstd; nothing may follow
//! ```
//!
//! Readers verify the header (signatures over the exact manifest bytes against a [`Keyring`])
//! before looking at the body, then verify the body while streaming it ([`ImageReader`]).

use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::sync::mpsc::{Receiver, SendError, Sender, SyncSender, channel, sync_channel};

use ed25519_dalek::{Signature, SigningKey};
use semver::Version;
use sha2::{Digest as _, Sha256};

use crate::keyring::{KeyId, Keyring, MAX_KEYS, SignatureFailure, TaggedSignature, unknown_note};
use crate::manifest::{
    BodyInfo, Compression, Digest, FORMAT_VERSION, Manifest, ManifestError, Sha256Digest,
};

/// First 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"TWINRBDL";
/// Size of the fixed prefix before the manifest.
pub const PREFIX_LEN: usize = 24;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: u32 = 64 * 1024;
/// Size of one signature entry: key id + ed25519 signature.
pub const SIGNATURE_ENTRY_LEN: usize = 8 + 64;
/// Most signatures a bundle may carry.
pub const MAX_SIGNATURES: usize = MAX_KEYS;
/// zstd window limit (2^23 = 8 MiB) for writers and readers; bounds decompression memory.
pub const MAX_WINDOW_LOG: u32 = 23;
/// zstd level `image-tool bundle` uses unless told otherwise.
pub const DEFAULT_ZSTD_LEVEL: i32 = 9;

/// Everything that can be wrong with a bundle. Each variant names the problem.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("i/o error: {0}")]
    Io(io::Error),
    #[error("not a twinroot bundle: bad magic {0:02x?} (expected \"TWINRBDL\")")]
    BadMagic([u8; 8]),
    #[error(
        "bundle format version {0} is not supported (this reader knows only version {FORMAT_VERSION})"
    )]
    UnsupportedFormatVersion(u32),
    #[error("bundle header is corrupt: reserved field is {0:#x}, must be 0")]
    ReservedNotZero(u32),
    #[error("bundle header is corrupt: manifest length {len} is outside 1..={MAX_MANIFEST_LEN}")]
    ManifestLength { len: u32 },
    #[error(
        "bundle header is corrupt: signature block length {len} is not a multiple of {SIGNATURE_ENTRY_LEN} between {SIGNATURE_ENTRY_LEN} and {}",
        SIGNATURE_ENTRY_LEN * MAX_SIGNATURES
    )]
    SignatureBlockLength { len: u32 },
    #[error("bundle is truncated: file ends inside the {0}")]
    Truncated(&'static str),
    #[error("bundle manifest is invalid: {0}")]
    Manifest(ManifestError),
    #[error("bundle header says format version {header}, its signed manifest says {manifest}")]
    FormatVersionMismatch { header: u32, manifest: u32 },
    #[error("signature by key {0} does not verify: manifest or signature was altered")]
    BadSignature(KeyId),
    #[error("bundle carries two signatures by key {0}")]
    DuplicateSignature(KeyId),
    #[error(
        "bundle has {valid} valid signature(s) by keys of the keyring, threshold is {threshold}{}",
        unknown_note(unknown)
    )]
    NotEnoughSignatures {
        valid: usize,
        threshold: u32,
        unknown: Vec<KeyId>,
    },
    #[error("bundle body is truncated: {actual} of the {expected} bytes the manifest states")]
    BodyTruncated { expected: u64, actual: u64 },
    #[error("bundle has trailing data after the {expected}-byte body the manifest states")]
    TrailingData { expected: u64 },
    #[error("bundle body sha256 mismatch: manifest says {expected}, body hashes to {actual}")]
    BodyDigest {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("bundle body holds data after the end of its zstd stream")]
    BodyAfterStream,
    #[error("bundle body does not decompress: {0}")]
    Decompress(String),
    #[error("image is larger than the {expected} bytes the manifest states")]
    ImageTooLarge { expected: u64 },
    #[error("image size mismatch: manifest says {expected} bytes, body decompresses to {actual}")]
    ImageSize { expected: u64, actual: u64 },
    #[error("image sha256 mismatch: manifest says {expected}, image hashes to {actual}")]
    ImageDigest {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("no signing key given: a bundle needs at least one signature")]
    NoSigningKey,
    #[error("at most {MAX_SIGNATURES} signing keys allowed, {0} given")]
    TooManySigningKeys(usize),
    #[error("signing key {0} given twice")]
    DuplicateSigningKey(KeyId),
    #[error("manifest is {0} bytes, larger than the {MAX_MANIFEST_LEN} allowed")]
    ManifestTooLarge(usize),
}

// Manual `From`s (not `#[from]`): the message already contains the cause, so it must not also
// be reported as the error's source (anyhow would print it twice).
impl From<io::Error> for BundleError {
    fn from(e: io::Error) -> BundleError {
        BundleError::Io(e)
    }
}

impl From<ManifestError> for BundleError {
    fn from(e: ManifestError) -> BundleError {
        BundleError::Manifest(e)
    }
}

impl BundleError {
    /// Recovers a `BundleError` carried inside an `io::Error` (as [`ImageReader`] returns them).
    pub fn from_io(err: io::Error) -> BundleError {
        if err.get_ref().is_some_and(|e| e.is::<BundleError>()) {
            match err.into_inner().map(|e| e.downcast::<BundleError>()) {
                Some(Ok(b)) => *b,
                _ => unreachable!("checked above"),
            }
        } else {
            BundleError::Io(err)
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            BundleError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The parsed fixed prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub format_version: u32,
    pub manifest_len: u32,
    pub signature_block_len: u32,
}

impl Prefix {
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.signature_block_len.to_le_bytes());
        out
    }

    /// Parses and bounds-checks the prefix; an unknown format version is rejected before any
    /// other field is interpreted.
    pub fn decode(bytes: &[u8; PREFIX_LEN]) -> Result<Prefix, BundleError> {
        let magic: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(BundleError::BadMagic(magic));
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let format_version = word(8);
        if format_version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedFormatVersion(format_version));
        }
        let manifest_len = word(12);
        if manifest_len == 0 || manifest_len > MAX_MANIFEST_LEN {
            return Err(BundleError::ManifestLength { len: manifest_len });
        }
        let signature_block_len = word(16);
        let n = signature_block_len as usize;
        if n == 0
            || !n.is_multiple_of(SIGNATURE_ENTRY_LEN)
            || n / SIGNATURE_ENTRY_LEN > MAX_SIGNATURES
        {
            return Err(BundleError::SignatureBlockLength {
                len: signature_block_len,
            });
        }
        let reserved = word(20);
        if reserved != 0 {
            return Err(BundleError::ReservedNotZero(reserved));
        }
        Ok(Prefix {
            format_version,
            manifest_len,
            signature_block_len,
        })
    }

    pub fn header_len(&self) -> u64 {
        PREFIX_LEN as u64 + self.manifest_len as u64 + self.signature_block_len as u64
    }
}

/// A parsed but not yet trusted header (for `inspect`).
#[derive(Clone, Debug)]
pub struct BundleHeader {
    pub prefix: Prefix,
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub signatures: Vec<TaggedSignature>,
}

impl BundleHeader {
    pub fn header_len(&self) -> u64 {
        self.prefix.header_len()
    }
}

/// A header whose manifest a threshold of the keyring signed. Only the manifest is trusted; the
/// body still has to pass through [`VerifiedHeader::image_reader`] or
/// [`VerifiedHeader::verify_body`].
#[derive(Clone, Debug)]
pub struct VerifiedHeader {
    header: BundleHeader,
    signers: Vec<KeyId>,
}

fn read_exactly<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), BundleError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BundleError::Truncated(what)
        } else {
            BundleError::Io(e)
        }
    })
}

/// Reads the raw header pieces; leaves `r` positioned at the first body byte.
fn read_raw<R: Read>(r: &mut R) -> Result<(Prefix, Vec<u8>, Vec<TaggedSignature>), BundleError> {
    let mut prefix = [0u8; PREFIX_LEN];
    read_exactly(r, &mut prefix, "header prefix")?;
    let prefix = Prefix::decode(&prefix)?;
    let mut manifest = vec![0u8; prefix.manifest_len as usize];
    read_exactly(r, &mut manifest, "manifest")?;
    let mut block = vec![0u8; prefix.signature_block_len as usize];
    read_exactly(r, &mut block, "signature block")?;
    let signatures = block
        .chunks_exact(SIGNATURE_ENTRY_LEN)
        .map(|entry| TaggedSignature {
            key_id: KeyId(entry[..8].try_into().expect("8 bytes")),
            signature: Signature::from_bytes(entry[8..].try_into().expect("64 bytes")),
        })
        .collect();
    Ok((prefix, manifest, signatures))
}

fn parse_manifest(prefix: &Prefix, bytes: &[u8]) -> Result<Manifest, BundleError> {
    let manifest = Manifest::from_bytes(bytes)?;
    if manifest.format_version != prefix.format_version {
        return Err(BundleError::FormatVersionMismatch {
            header: prefix.format_version,
            manifest: manifest.format_version,
        });
    }
    Ok(manifest)
}

/// Reads and parses the header without checking any signature. For display only: nothing it
/// returns may be trusted.
pub fn read_header_unverified<R: Read>(r: &mut R) -> Result<BundleHeader, BundleError> {
    let (prefix, manifest_bytes, signatures) = read_raw(r)?;
    let manifest = parse_manifest(&prefix, &manifest_bytes)?;
    Ok(BundleHeader {
        prefix,
        manifest_bytes,
        manifest,
        signatures,
    })
}

/// Reads the header and checks its signatures against `keyring` before parsing the manifest.
/// On success `r` is positioned at the first body byte.
pub fn read_header<R: Read>(r: &mut R, keyring: &Keyring) -> Result<VerifiedHeader, BundleError> {
    let (prefix, manifest_bytes, signatures) = read_raw(r)?;
    let trusted = keyring
        .check_signatures(&manifest_bytes, &signatures)
        .map_err(|f| match f {
            SignatureFailure::Invalid(id) => BundleError::BadSignature(id),
            SignatureFailure::Duplicate(id) => BundleError::DuplicateSignature(id),
            SignatureFailure::TooFew {
                valid,
                threshold,
                unknown,
            } => BundleError::NotEnoughSignatures {
                valid,
                threshold,
                unknown,
            },
        })?;
    let manifest = parse_manifest(&prefix, &manifest_bytes)?;
    Ok(VerifiedHeader {
        header: BundleHeader {
            prefix,
            manifest_bytes,
            manifest,
            signatures,
        },
        signers: trusted.signers,
    })
}

impl VerifiedHeader {
    pub fn manifest(&self) -> &Manifest {
        &self.header.manifest
    }

    /// Bytes before the body; the body starts at this offset.
    pub fn header_len(&self) -> u64 {
        self.header.header_len()
    }

    /// Keyring keys whose signatures verified.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }

    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    /// Streams the decompressed image out of `body` (positioned at the first body byte),
    /// verifying body and image size and digest on the way. Reading `Ok(0)` means everything
    /// verified; any mismatch is an `io::Error` wrapping a [`BundleError`].
    pub fn image_reader<R: Read>(&self, body: R) -> ImageReader<R> {
        ImageReader::new(self.manifest(), body)
    }

    /// Verifies the whole body without keeping the image, using three threads (body hash,
    /// decompression, image hash) so the wall time stays close to one SHA-256 pass.
    pub fn verify_body<R: Read + Send>(&self, body: R) -> Result<(), BundleError> {
        verify_body_parallel(self.manifest(), body)
    }
}

/// Counts and hashes body bytes against the manifest.
struct BodyCheck {
    expected: BodyInfo,
    seen: u64,
    hasher: Sha256,
}

impl BodyCheck {
    fn new(expected: BodyInfo) -> BodyCheck {
        BodyCheck {
            expected,
            seen: 0,
            hasher: Sha256::new(),
        }
    }

    fn remaining(&self) -> u64 {
        self.expected.size - self.seen
    }

    fn update(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        self.hasher.update(bytes);
    }

    fn finish(self) -> Result<(), BundleError> {
        let actual = Sha256Digest(self.hasher.finalize().into());
        if actual != self.expected.sha256 {
            return Err(BundleError::BodyDigest {
                expected: self.expected.sha256,
                actual,
            });
        }
        Ok(())
    }
}

/// Counts and hashes image bytes; fails as soon as the image exceeds its declared size.
struct ImageCheck {
    expected: Digest,
    seen: u64,
    hasher: Sha256,
}

impl ImageCheck {
    fn new(expected: Digest) -> ImageCheck {
        ImageCheck {
            expected,
            seen: 0,
            hasher: Sha256::new(),
        }
    }

    fn update(&mut self, bytes: &[u8]) -> Result<(), BundleError> {
        self.seen += bytes.len() as u64;
        if self.seen > self.expected.size {
            return Err(BundleError::ImageTooLarge {
                expected: self.expected.size,
            });
        }
        self.hasher.update(bytes);
        Ok(())
    }

    fn finish(self) -> Result<(), BundleError> {
        if self.seen != self.expected.size {
            return Err(BundleError::ImageSize {
                expected: self.expected.size,
                actual: self.seen,
            });
        }
        let actual = Sha256Digest(self.hasher.finalize().into());
        if actual != self.expected.sha256 {
            return Err(BundleError::ImageDigest {
                expected: self.expected.sha256,
                actual,
            });
        }
        Ok(())
    }
}

/// Fails unless `r` is at end of file.
fn expect_eof<R: Read>(r: &mut R, body_size: u64) -> Result<(), BundleError> {
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(BundleError::TrailingData {
                    expected: body_size,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BundleError::Io(e)),
        }
    }
}

/// The compressed body as a reader: yields exactly the declared number of bytes, hashing them;
/// at the end checks the digest and that nothing follows.
struct BodyReader<R> {
    inner: R,
    check: Option<BodyCheck>,
}

impl<R: Read> BodyReader<R> {
    fn new(inner: R, expected: BodyInfo) -> BodyReader<R> {
        BodyReader {
            inner,
            check: Some(BodyCheck::new(expected)),
        }
    }

    /// Consumes the rest of the body (which must be empty), the digest check and the EOF check.
    fn finish(&mut self) -> Result<(), BundleError> {
        let Some(check) = self.check.take() else {
            return Ok(());
        };
        if check.remaining() > 0 {
            return Err(BundleError::BodyAfterStream);
        }
        let size = check.expected.size;
        check.finish()?;
        expect_eof(&mut self.inner, size)
    }
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(check) = self.check.as_mut() else {
            return Ok(0);
        };
        let remaining = check.remaining();
        if remaining == 0 {
            self.finish().map_err(BundleError::into_io)?;
            return Ok(0);
        }
        let want = buf.len().min(remaining.min(usize::MAX as u64) as usize);
        let n = loop {
            match self.inner.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 && want > 0 {
            return Err(BundleError::BodyTruncated {
                expected: check.expected.size,
                actual: check.seen,
            }
            .into_io());
        }
        check.update(&buf[..n]);
        Ok(n)
    }
}

fn new_decoder<'a, R: io::BufRead>(
    input: R,
) -> Result<zstd::stream::read::Decoder<'a, R>, BundleError> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(input)?;
    decoder.window_log_max(MAX_WINDOW_LOG)?;
    Ok(decoder)
}

/// Maps an error out of the zstd decoder: our own errors from the body pass through, anything
/// else is a decompression failure.
fn decoder_error(err: io::Error) -> BundleError {
    match BundleError::from_io(err) {
        BundleError::Io(e) if e.kind() != io::ErrorKind::Interrupted => {
            BundleError::Decompress(e.to_string())
        }
        other => other,
    }
}

enum ReaderState {
    Streaming,
    Verified,
    Failed,
}

/// `Read` of the decompressed image that verifies everything while streaming. `Ok(0)` is
/// returned only after body size, body sha256, "nothing after the body", image size and image
/// sha256 all matched the signed manifest.
pub struct ImageReader<R: Read> {
    decoder: Option<zstd::stream::read::Decoder<'static, BufReader<BodyReader<R>>>>,
    pending: Option<BundleError>,
    image: Option<ImageCheck>,
    state: ReaderState,
}

impl<R: Read> ImageReader<R> {
    fn new(manifest: &Manifest, body: R) -> ImageReader<R> {
        let Compression::Zstd = manifest.body.compression;
        let body = BufReader::with_capacity(128 * 1024, BodyReader::new(body, manifest.body));
        let (decoder, pending) = match new_decoder(body) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        };
        ImageReader {
            decoder,
            pending,
            image: Some(ImageCheck::new(manifest.image)),
            state: ReaderState::Streaming,
        }
    }

    fn step(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        if let Some(err) = self.pending.take() {
            return Err(err);
        }
        let decoder = self
            .decoder
            .as_mut()
            .expect("decoder exists while streaming");
        let n = loop {
            match decoder.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(decoder_error)?,
            }
        };
        if n > 0 {
            self.image
                .as_mut()
                .expect("image check exists while streaming")
                .update(&buf[..n])?;
            return Ok(n);
        }
        // End of the zstd stream: the body must be used up exactly and everything must match.
        let input = decoder.get_mut();
        if !input.buffer().is_empty() {
            return Err(BundleError::BodyAfterStream);
        }
        input.get_mut().finish()?;
        self.image.take().expect("image check exists").finish()?;
        Ok(0)
    }
}

impl<R: Read> Read for ImageReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            ReaderState::Verified => return Ok(0),
            ReaderState::Failed => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bundle verification already failed",
                ));
            }
            ReaderState::Streaming => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match self.step(buf) {
            Ok(0) => {
                self.state = ReaderState::Verified;
                self.decoder = None;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) => {
                self.state = ReaderState::Failed;
                self.decoder = None;
                Err(e.into_io())
            }
        }
    }
}

const CHUNK: usize = 512 * 1024;
/// Image bytes per zstd frame in bodies written by [`compress_body`].
pub const FRAME_IMAGE_BYTES: u64 = 32 << 20;
const QUEUE: usize = 4;

/// A chunk in flight: a buffer and how many of its bytes are data.
type Chunk = (Vec<u8>, usize);

/// Buffers travel forward full and come back empty, so a verify allocates a fixed set of
/// buffers once instead of one (page-faulted, zeroed) buffer per chunk.
struct Pool {
    back: Receiver<Vec<u8>>,
    made: usize,
}

impl Pool {
    fn new(back: Receiver<Vec<u8>>) -> Pool {
        Pool { back, made: 0 }
    }

    fn take(&mut self) -> Vec<u8> {
        if let Ok(mut buf) = self.back.try_recv() {
            buf.resize(CHUNK, 0);
            return buf;
        }
        if self.made < QUEUE + 2 {
            self.made += 1;
            return vec![0u8; CHUNK];
        }
        // All buffers are in flight: wait for one; if the consumer is gone, any buffer will do
        // (the next send fails and ends the loop).
        let mut buf = self.back.recv().unwrap_or_default();
        buf.resize(CHUNK, 0);
        buf
    }
}

/// `BufRead` over chunks arriving on a channel (input of the decompression thread); consumed
/// buffers go back to the reading thread.
struct ChannelReader {
    rx: Receiver<Chunk>,
    back: Sender<Vec<u8>>,
    current: Vec<u8>,
    len: usize,
    pos: usize,
}

impl ChannelReader {
    fn next_chunk(&mut self) -> bool {
        match self.rx.recv() {
            Ok((buf, len)) => {
                let old = std::mem::replace(&mut self.current, buf);
                if !old.is_empty() {
                    let _ = self.back.send(old);
                }
                self.len = len;
                self.pos = 0;
                true
            }
            Err(_) => false,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = io::BufRead::fill_buf(self)?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl io::BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.len {
            if !self.next_chunk() {
                break;
            }
        }
        Ok(&self.current[self.pos..self.len])
    }

    fn consume(&mut self, amt: usize) {
        self.pos += amt;
    }
}

fn decompress_thread(
    input: ChannelReader,
    out: SyncSender<Chunk>,
    back: Receiver<Vec<u8>>,
) -> Result<(), BundleError> {
    let mut decoder = new_decoder(input)?;
    let mut pool = Pool::new(back);
    loop {
        let mut chunk = pool.take();
        let mut filled = 0;
        while filled < CHUNK {
            match decoder.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(decoder_error(e)),
            }
        }
        if filled == 0 {
            let rest = io::BufRead::fill_buf(decoder.get_mut())?;
            if !rest.is_empty() {
                return Err(BundleError::BodyAfterStream);
            }
            return Ok(());
        }
        if out.send((chunk, filled)).is_err() {
            // The image hasher stopped: it has an error to report.
            return Ok(());
        }
    }
}

fn verify_body_parallel<R: Read + Send>(
    manifest: &Manifest,
    mut body: R,
) -> Result<(), BundleError> {
    let (to_decoder, decoder_rx) = sync_channel::<Chunk>(QUEUE);
    let (body_back_tx, body_back_rx) = channel::<Vec<u8>>();
    let (to_hasher, hasher_rx) = sync_channel::<Chunk>(QUEUE);
    let (image_back_tx, image_back_rx) = channel::<Vec<u8>>();
    let image_expected = manifest.image;
    std::thread::scope(|scope| {
        let input = ChannelReader {
            rx: decoder_rx,
            back: body_back_tx,
            current: Vec::new(),
            len: 0,
            pos: 0,
        };
        let decoder = scope.spawn(move || decompress_thread(input, to_hasher, image_back_rx));
        let hasher = scope.spawn(move || -> Result<(), BundleError> {
            let mut check = ImageCheck::new(image_expected);
            for (buf, len) in hasher_rx {
                check.update(&buf[..len])?;
                let _ = image_back_tx.send(buf);
            }
            check.finish()
        });
        let mut body_check = BodyCheck::new(manifest.body);
        let mut pool = Pool::new(body_back_rx);
        let read_result = (|| -> Result<(), BundleError> {
            // When the decoder stops early (corrupt stream), the body is still read and hashed
            // to the end, so a body that was altered is reported as such.
            let mut decoder_alive = true;
            let mut spare: Option<Vec<u8>> = None;
            while body_check.remaining() > 0 {
                let want = (CHUNK as u64).min(body_check.remaining()) as usize;
                let mut chunk = spare.take().unwrap_or_else(|| pool.take());
                let mut filled = 0;
                while filled < want {
                    match body.read(&mut chunk[filled..want]) {
                        Ok(0) => {
                            return Err(BundleError::BodyTruncated {
                                expected: manifest.body.size,
                                actual: body_check.seen + filled as u64,
                            });
                        }
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(BundleError::Io(e)),
                    }
                }
                body_check.update(&chunk[..want]);
                if decoder_alive {
                    if let Err(SendError((returned, _))) = to_decoder.send((chunk, want)) {
                        decoder_alive = false;
                        spare = Some(returned);
                    }
                } else {
                    spare = Some(chunk);
                }
            }
            Ok(())
        })();
        drop(to_decoder);
        let decoded = decoder.join().expect("decompression thread panicked");
        let hashed = hasher.join().expect("image hash thread panicked");
        // Report the most fundamental failure first: the body as read, then its stream, then
        // the image.
        read_result?;
        body_check.finish()?;
        expect_eof(&mut body, manifest.body.size)?;
        decoded?;
        hashed
    })
}

/// What a release is, apart from its image: the fields the builder chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub os_version: Version,
    pub created_unix: u64,
    pub min_source_version: Option<Version>,
    pub board: Option<String>,
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses `image` into `out` with zstd (window at most 2^MAX_WINDOW_LOG); returns the image
/// and body digests.
pub fn compress_body<R: Read, W: Write>(
    mut image: R,
    out: W,
    level: i32,
) -> io::Result<(Digest, BodyInfo)> {
    let new_frame = |sink| -> io::Result<zstd::stream::write::Encoder<'static, HashingWriter<W>>> {
        let mut encoder = zstd::stream::write::Encoder::new(sink, level)?;
        if level > MAX_LEVEL_WITHIN_WINDOW {
            // zstd's own window for levels 20-22 is 2^25-2^27: cap it so readers stay within
            // MAX_WINDOW_LOG. Levels up to 19 use at most 2^23 on their own.
            encoder.window_log(MAX_WINDOW_LOG)?;
        }
        encoder.include_checksum(false)?;
        Ok(encoder)
    };
    let mut encoder = new_frame(HashingWriter {
        inner: out,
        hasher: Sha256::new(),
        count: 0,
    })?;
    let mut image_hasher = Sha256::new();
    let mut image_size = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match image.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        image_hasher.update(&buf[..n]);
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            // Independent frames of FRAME_IMAGE_BYTES each: a reader that was interrupted can
            // resume decompression at a frame boundary instead of from the start.
            let room = FRAME_IMAGE_BYTES - image_size % FRAME_IMAGE_BYTES;
            let take = chunk.len().min(room as usize);
            encoder.write_all(&chunk[..take])?;
            image_size += take as u64;
            chunk = &chunk[take..];
            if image_size.is_multiple_of(FRAME_IMAGE_BYTES) {
                encoder = new_frame(encoder.finish()?)?;
            }
        }
    }
    let mut sink = encoder.finish()?;
    sink.flush()?;
    Ok((
        Digest {
            size: image_size,
            sha256: Sha256Digest(image_hasher.finalize().into()),
        },
        BodyInfo {
            size: sink.count,
            sha256: Sha256Digest(sink.hasher.finalize().into()),
            compression: Compression::Zstd,
        },
    ))
}

/// Highest zstd level whose default window fits in 2^MAX_WINDOW_LOG.
const MAX_LEVEL_WITHIN_WINDOW: i32 = 19;

/// Encodes the header (prefix, manifest bytes, signatures by every key) of a bundle.
pub fn encode_header(manifest: &Manifest, keys: &[SigningKey]) -> Result<Vec<u8>, BundleError> {
    encode_header_bytes(&manifest.to_bytes(), keys)
}

/// Like [`encode_header`] over already serialized manifest bytes (used to build test bundles).
pub fn encode_header_bytes(
    manifest_bytes: &[u8],
    keys: &[SigningKey],
) -> Result<Vec<u8>, BundleError> {
    if keys.is_empty() {
        return Err(BundleError::NoSigningKey);
    }
    if keys.len() > MAX_SIGNATURES {
        return Err(BundleError::TooManySigningKeys(keys.len()));
    }
    if manifest_bytes.is_empty() || manifest_bytes.len() > MAX_MANIFEST_LEN as usize {
        return Err(BundleError::ManifestTooLarge(manifest_bytes.len()));
    }
    let mut signatures: Vec<TaggedSignature> = Vec::with_capacity(keys.len());
    for key in keys {
        let sig = TaggedSignature::sign(key, manifest_bytes);
        if signatures.iter().any(|s| s.key_id == sig.key_id) {
            return Err(BundleError::DuplicateSigningKey(sig.key_id));
        }
        signatures.push(sig);
    }
    let prefix = Prefix {
        format_version: FORMAT_VERSION,
        manifest_len: manifest_bytes.len() as u32,
        signature_block_len: (signatures.len() * SIGNATURE_ENTRY_LEN) as u32,
    };
    let mut out = Vec::with_capacity(prefix.header_len() as usize);
    out.extend_from_slice(&prefix.encode());
    out.extend_from_slice(manifest_bytes);
    for sig in &signatures {
        out.extend_from_slice(&sig.key_id.0);
        out.extend_from_slice(&sig.signature.to_bytes());
    }
    Ok(out)
}

/// Writes a complete bundle: compresses `image` into `scratch` (to learn the body's size and
/// digest), then writes header and body to `out`. Returns the manifest written.
pub fn write_bundle<R, S, W>(
    image: R,
    release: &ReleaseInfo,
    keys: &[SigningKey],
    level: i32,
    scratch: &mut S,
    out: &mut W,
) -> Result<Manifest, BundleError>
where
    R: Read,
    S: Read + Write + Seek,
    W: Write,
{
    if keys.is_empty() {
        return Err(BundleError::NoSigningKey);
    }
    scratch.seek(SeekFrom::Start(0))?;
    let (image_digest, body) = compress_body(image, &mut *scratch, level)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        os_version: release.os_version.clone(),
        created_unix: release.created_unix,
        image: image_digest,
        body,
        min_source_version: release.min_source_version.clone(),
        board: release.board.clone(),
    };
    let header = encode_header(&manifest, keys)?;
    out.write_all(&header)?;
    scratch.seek(SeekFrom::Start(0))?;
    let copied = io::copy(&mut (&mut *scratch).take(body.size), out)?;
    if copied != body.size {
        return Err(BundleError::BodyTruncated {
            expected: body.size,
            actual: copied,
        });
    }
    out.flush()?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn ring(threshold: u32, seeds: &[u8]) -> Keyring {
        let keys: Vec<_> = seeds.iter().map(|s| key(*s).verifying_key()).collect();
        Keyring::new(1, threshold, &keys).unwrap()
    }

    fn release() -> ReleaseInfo {
        ReleaseInfo {
            os_version: Version::parse("2.0.1").unwrap(),
            created_unix: 1_700_000_000,
            min_source_version: None,
            board: None,
        }
    }

    fn image() -> Vec<u8> {
        // Part compressible, part noise, several zstd blocks.
        let mut data = Vec::new();
        let mut x: u32 = 12345;
        for i in 0..700_000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.push(if i % 3 == 0 { (x >> 16) as u8 } else { b'a' });
        }
        data
    }

    fn bundle(keys: &[SigningKey]) -> (Vec<u8>, Manifest) {
        let mut out = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        let m = write_bundle(&image()[..], &release(), keys, 3, &mut scratch, &mut out).unwrap();
        (out, m)
    }

    /// Runs both verification paths; they must agree.
    fn verify(bytes: &[u8], keyring: &Keyring) -> Result<Vec<u8>, BundleError> {
        let mut cursor = Cursor::new(bytes);
        let header = read_header(&mut cursor, keyring)?;
        let mut image = Vec::new();
        let streamed = header
            .image_reader(&mut cursor)
            .read_to_end(&mut image)
            .map_err(BundleError::from_io);
        let mut cursor = Cursor::new(bytes);
        let header2 = read_header(&mut cursor, keyring)?;
        let parallel = header2.verify_body(&mut cursor);
        assert_eq!(
            streamed.is_ok(),
            parallel.is_ok(),
            "paths disagree: {streamed:?} vs {parallel:?}"
        );
        streamed?;
        Ok(image)
    }

    #[test]
    fn round_trip() {
        let (bytes, m) = bundle(&[key(1), key(2)]);
        assert_eq!(m.image.size, image().len() as u64);
        assert_eq!(verify(&bytes, &ring(2, &[1, 2, 3])).unwrap(), image());
        let header = read_header_unverified(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(header.manifest, m);
        assert_eq!(header.header_len() + m.body.size, bytes.len() as u64);
        // Deterministic: same input, same bytes.
        assert_eq!(bundle(&[key(1), key(2)]).0, bytes);
    }

    #[test]
    fn every_flipped_byte_class_fails() {
        let (bytes, m) = bundle(&[key(1)]);
        let keyring = ring(1, &[1]);
        let header_len = read_header_unverified(&mut Cursor::new(&bytes))
            .unwrap()
            .header_len() as usize;
        let manifest_end = PREFIX_LEN + m.to_bytes().len();
        let mut positions = vec![0, 9, 13, 17, 21, PREFIX_LEN + 5, manifest_end - 2];
        positions.extend([manifest_end + 3, manifest_end + 20, header_len - 1]);
        positions.extend([
            header_len,
            header_len + 100,
            bytes.len() / 2,
            bytes.len() - 1,
        ]);
        for pos in positions {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x40;
            assert!(verify(&bad, &keyring).is_err(), "flip at {pos} accepted");
        }
    }

    #[test]
    fn no_single_bit_flip_is_accepted() {
        let img: Vec<u8> = image()[..40_000].to_vec();
        let mut bytes = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        write_bundle(
            &img[..],
            &release(),
            &[key(1), key(2)],
            3,
            &mut scratch,
            &mut bytes,
        )
        .unwrap();
        let keyring = ring(2, &[1, 2]);
        assert!(verify(&bytes, &keyring).is_ok());
        let header_len = read_header_unverified(&mut Cursor::new(&bytes))
            .unwrap()
            .header_len() as usize;
        let positions = (0..header_len).chain((header_len..bytes.len()).step_by(97));
        for pos in positions {
            for bit in [0x01u8, 0x80] {
                let mut bad = bytes.clone();
                bad[pos] ^= bit;
                assert!(
                    verify(&bad, &keyring).is_err(),
                    "flip {bit:#x} at {pos} accepted"
                );
            }
        }
    }

    #[test]
    fn specific_errors() {
        let (bytes, _) = bundle(&[key(1)]);
        let keyring = ring(1, &[1]);
        let err = |b: &[u8], k: &Keyring| verify(b, k).unwrap_err();

        assert!(matches!(
            err(&bytes[..10], &keyring),
            BundleError::Truncated(_)
        ));
        assert!(matches!(
            err(&bytes[..bytes.len() - 1], &keyring),
            BundleError::BodyTruncated { .. }
        ));
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            err(&trailing, &keyring),
            BundleError::TrailingData { .. }
        ));
        assert!(matches!(
            err(&bytes, &ring(1, &[2])),
            BundleError::NotEnoughSignatures { valid: 0, .. }
        ));
        assert!(matches!(
            err(&bytes, &ring(2, &[1, 2])),
            BundleError::NotEnoughSignatures { valid: 1, .. }
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            err(&v2, &keyring),
            BundleError::UnsupportedFormatVersion(2)
        ));
        let mut huge = bytes.clone();
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            err(&huge, &keyring),
            BundleError::ManifestLength { .. }
        ));
    }

    fn forged(image: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
        let mut body = Vec::new();
        let (digest, info) = compress_body(image, &mut body, 3).unwrap();
        let mut m = Manifest {
            format_version: FORMAT_VERSION,
            os_version: Version::parse("1.0.0").unwrap(),
            created_unix: 0,
            image: digest,
            body: info,
            min_source_version: None,
            board: None,
        };
        edit(&mut m);
        let mut out = encode_header(&m, &[key(1)]).unwrap();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn signed_manifest_that_lies() {
        let keyring = ring(1, &[1]);
        let img = image();
        assert!(verify(&forged(&img, |_| {}), &keyring).is_ok());
        let e = verify(&forged(&img, |m| m.image.size -= 1), &keyring).unwrap_err();
        assert!(matches!(e, BundleError::ImageTooLarge { .. }), "{e}");
        let e = verify(&forged(&img, |m| m.image.size += 1), &keyring).unwrap_err();
        assert!(matches!(e, BundleError::ImageSize { .. }), "{e}");
        let e = verify(&forged(&img, |m| m.image.sha256.0[0] ^= 1), &keyring).unwrap_err();
        assert!(matches!(e, BundleError::ImageDigest { .. }), "{e}");
        let e = verify(&forged(&img, |m| m.body.sha256.0[0] ^= 1), &keyring).unwrap_err();
        assert!(matches!(e, BundleError::BodyDigest { .. }), "{e}");
        let e = verify(&forged(&img, |m| m.body.size += 1), &keyring).unwrap_err();
        assert!(matches!(e, BundleError::BodyTruncated { .. }), "{e}");
        let e = verify(&forged(&img, |m| m.body.size -= 1), &keyring).unwrap_err();
        assert!(
            matches!(
                e,
                BundleError::BodyDigest { .. }
                    | BundleError::TrailingData { .. }
                    | BundleError::Decompress(_)
            ),
            "{e}"
        );
    }

    #[test]
    fn body_is_split_into_independent_frames() {
        // Two full frames and a partial one; each frame decodes on its own.
        let size = 2 * FRAME_IMAGE_BYTES as usize + 4321;
        let img: Vec<u8> = image().iter().cycle().take(size).copied().collect();
        let mut body = Vec::new();
        let (digest, info) = compress_body(&img[..], &mut body, 1).unwrap();
        assert_eq!(digest.size, size as u64);
        assert_eq!(info.size, body.len() as u64);
        let mut rest = &body[..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            let mut one = Vec::new();
            zstd::stream::read::Decoder::new(&rest[..len])
                .unwrap()
                .single_frame()
                .read_to_end(&mut one)
                .unwrap();
            frames.push(one.len());
            rest = &rest[len..];
        }
        let full = FRAME_IMAGE_BYTES as usize;
        assert_eq!(frames, vec![full, full, 4321]);
        // And the whole bundle still verifies and round-trips.
        let mut out = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        write_bundle(&img[..], &release(), &[key(1)], 1, &mut scratch, &mut out).unwrap();
        assert_eq!(verify(&out, &ring(1, &[1])).unwrap(), img);
    }

    #[test]
    fn many_chunks_recycle_buffers() {
        // More chunks than the buffer pools hold, so buffers are reused many times.
        let big: Vec<u8> = image()
            .iter()
            .cycle()
            .take(9 * CHUNK + 123)
            .copied()
            .collect();
        let mut out = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        write_bundle(&big[..], &release(), &[key(1)], 1, &mut scratch, &mut out).unwrap();
        assert_eq!(verify(&out, &ring(1, &[1])).unwrap(), big);
        let last = out.len() - 7;
        out[last] ^= 1;
        assert!(verify(&out, &ring(1, &[1])).is_err());
    }

    #[test]
    fn window_larger_than_limit_is_refused() {
        // A body needing a 16 MiB zstd window (> 2^MAX_WINDOW_LOG) is refused, not decoded.
        let img: Vec<u8> = image().iter().cycle().take(20 << 20).copied().collect();
        let mut body = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut body, 1).unwrap();
        enc.window_log(MAX_WINDOW_LOG + 1).unwrap();
        enc.set_pledged_src_size(Some(img.len() as u64)).unwrap();
        enc.write_all(&img).unwrap();
        enc.finish().unwrap();
        let m = Manifest {
            format_version: FORMAT_VERSION,
            os_version: Version::parse("1.0.0").unwrap(),
            created_unix: 0,
            image: Digest {
                size: img.len() as u64,
                sha256: Sha256Digest(Sha256::digest(&img).into()),
            },
            body: BodyInfo {
                size: body.len() as u64,
                sha256: Sha256Digest(Sha256::digest(&body).into()),
                compression: Compression::Zstd,
            },
            min_source_version: None,
            board: None,
        };
        let mut bytes = encode_header(&m, &[key(1)]).unwrap();
        bytes.extend_from_slice(&body);
        let e = verify(&bytes, &ring(1, &[1])).unwrap_err();
        assert!(
            matches!(&e, BundleError::Decompress(m) if m.contains("memory")),
            "{e}"
        );
    }

    #[test]
    fn every_level_stays_within_the_window_limit() {
        let img: Vec<u8> = image().iter().cycle().take(10 << 20).copied().collect();
        for level in [1, 19, 22] {
            let mut body = Vec::new();
            compress_body(&img[..], &mut body, level).unwrap();
            let mut decoder = new_decoder(&body[..]).unwrap();
            let mut out = Vec::new();
            decoder.read_to_end(&mut out).unwrap();
            assert_eq!(out.len(), img.len(), "level {level}");
        }
    }

    #[test]
    fn empty_image_round_trips() {
        let mut out = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        write_bundle(&b""[..], &release(), &[key(1)], 3, &mut scratch, &mut out).unwrap();
        assert_eq!(verify(&out, &ring(1, &[1])).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn no_key_no_bundle() {
        let mut out = Vec::new();
        let mut scratch = Cursor::new(Vec::new());
        assert!(matches!(
            write_bundle(&b"x"[..], &release(), &[], 3, &mut scratch, &mut out),
            Err(BundleError::NoSigningKey)
        ));
        assert!(out.is_empty());
    }
}
