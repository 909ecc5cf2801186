//! Release bundles: verification against the server keyring and content-addressed storage.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use base64::Engine as _;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use twinroot_format::bundle;
use twinroot_format::keyring::Keyring;

/// What the server keeps from a verified bundle's manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRelease {
    pub version: String,
    pub created_unix: i64,
    pub board: Option<String>,
    pub min_source_version: Option<String>,
    pub signers: Vec<String>,
}

/// Verifies a complete bundle file: signatures against `keyring`, then the body and image digests
/// the manifest states. Nothing about the bundle is trusted unless this returns Ok.
pub fn verify_bundle(path: &Path, keyring: &Keyring) -> Result<VerifiedRelease, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open upload: {e}"))?;
    let header = bundle::read_header(&mut f, keyring).map_err(|e| e.to_string())?;
    let m = header.manifest().clone();
    f.seek(SeekFrom::Start(header.header_len()))
        .map_err(|e| format!("cannot read upload: {e}"))?;
    header
        .verify_body(BufReader::with_capacity(1 << 20, f))
        .map_err(|e| format!("release {}: {e}", m.os_version))?;
    Ok(VerifiedRelease {
        version: m.os_version.to_string(),
        created_unix: i64::try_from(m.created_unix).unwrap_or(i64::MAX),
        board: m.board.clone(),
        min_source_version: m.min_source_version.as_ref().map(ToString::to_string),
        signers: header.signers().iter().map(ToString::to_string).collect(),
    })
}

/// Running digests of an upload as it streams to disk.
pub struct UploadDigests {
    sha256: Sha256,
    sha1: Sha1,
    pub size: u64,
}

impl Default for UploadDigests {
    fn default() -> Self {
        UploadDigests {
            sha256: Sha256::new(),
            sha1: Sha1::new(),
            size: 0,
        }
    }
}

impl UploadDigests {
    pub fn update(&mut self, chunk: &[u8]) {
        self.sha256.update(chunk);
        self.sha1.update(chunk);
        self.size += chunk.len() as u64;
    }

    /// (SHA-256 hex, SHA-1 base64)
    pub fn finish(self) -> (String, String) {
        (
            hex::encode(self.sha256.finalize()),
            base64::engine::general_purpose::STANDARD.encode(self.sha1.finalize()),
        )
    }
}

/// Where blobs live in the data directory.
pub fn blob_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blobs")
}

pub fn blob_path(data_dir: &Path, sha256_hex: &str) -> PathBuf {
    blob_dir(data_dir).join(format!("{sha256_hex}.bundle"))
}

pub fn upload_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("uploads")
}

pub fn ensure_dirs(data_dir: &Path) -> Result<()> {
    for d in [blob_dir(data_dir), upload_dir(data_dir)] {
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    Ok(())
}
