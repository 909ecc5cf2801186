//! `image-tool bundle`, `image-tool verify` and `image-tool inspect`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use semver::Version;
use twinroot_format::bundle::{
    BundleHeader, ReleaseInfo, VerifiedHeader, read_header, read_header_unverified, write_bundle,
};
use twinroot_format::keyring::load_signing_key;
use twinroot_format::manifest::Manifest;

use crate::keys::load_keyring;
use crate::output::StagedOutput;

/// Options of `image-tool bundle`.
pub struct BundleOptions {
    pub image: PathBuf,
    pub version: Version,
    pub keys: Vec<PathBuf>,
    pub out: PathBuf,
    pub created_unix: u64,
    pub level: i32,
    pub board: Option<String>,
    pub min_source_version: Option<Version>,
}

/// Compresses and signs an image into a bundle.
pub fn bundle(opts: &BundleOptions) -> Result<Manifest> {
    if opts.keys.is_empty() {
        bail!("no --key given: a bundle needs at least one signature");
    }
    let keys = opts
        .keys
        .iter()
        .map(|p| load_signing_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let image = File::open(&opts.image)
        .with_context(|| format!("{}: cannot open image", opts.image.display()))?;
    let out = StagedOutput::new(&opts.out)?;
    let mut scratch = tempfile::tempfile_in(out.path().parent().expect("staged path has a parent"))
        .context("cannot create a scratch file for the compressed body")?;
    let mut writer = BufWriter::with_capacity(
        1 << 20,
        File::create(out.path())
            .with_context(|| format!("{}: cannot create", out.path().display()))?,
    );
    let release = ReleaseInfo {
        os_version: opts.version.clone(),
        created_unix: opts.created_unix,
        min_source_version: opts.min_source_version.clone(),
        board: opts.board.clone(),
    };
    let manifest = write_bundle(
        std::io::BufReader::with_capacity(1 << 20, image),
        &release,
        &keys,
        opts.level,
        &mut scratch,
        &mut writer,
    )
    .with_context(|| {
        format!(
            "{}: cannot write bundle of {}",
            opts.out.display(),
            opts.image.display()
        )
    })?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("{}: cannot write", opts.out.display()))?;
    out.commit()?;
    Ok(manifest)
}

/// Verifies the header against the keyring, then the whole body. Success means every byte of
/// the bundle checked out.
pub fn verify(keyring: &Path, bundle: &Path) -> Result<VerifiedHeader> {
    let keyring = load_keyring(keyring)?;
    let mut file =
        File::open(bundle).with_context(|| format!("{}: cannot open bundle", bundle.display()))?;
    let header = read_header(&mut file, &keyring)
        .with_context(|| format!("{}: header rejected", bundle.display()))?;
    header
        .verify_body(&mut file)
        .with_context(|| format!("{}: body rejected", bundle.display()))?;
    Ok(header)
}

/// Human summary of a verified bundle.
pub fn describe_verified(bundle: &Path, header: &VerifiedHeader) -> String {
    let signers: Vec<String> = header.signers().iter().map(|k| k.to_string()).collect();
    format!(
        "{}: OK, version {}, image {} bytes sha256 {}, signed by {}\n",
        bundle.display(),
        header.manifest().os_version,
        header.manifest().image.size,
        header.manifest().image.sha256,
        signers.join(", ")
    )
}

/// Reads the header without verifying anything (display only).
pub fn inspect(bundle: &Path) -> Result<(BundleHeader, u64)> {
    let mut file =
        File::open(bundle).with_context(|| format!("{}: cannot open bundle", bundle.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("{}: cannot stat", bundle.display()))?
        .len();
    let header = read_header_unverified(&mut file)
        .with_context(|| format!("{}: cannot read header", bundle.display()))?;
    Ok((header, size))
}

/// `inspect` output, human form.
pub fn describe_unverified(header: &BundleHeader, file_size: u64) -> String {
    let mut out = header.manifest.describe();
    out.push_str(&format!("header length:      {}\n", header.header_len()));
    out.push_str(&format!("file size:          {file_size}"));
    let expected = header.header_len() + header.manifest.body.size;
    if expected != file_size {
        out.push_str(&format!(" (manifest implies {expected}: file is damaged)"));
    }
    out.push('\n');
    for sig in &header.signatures {
        out.push_str(&format!("signature by key:   {}\n", sig.key_id));
    }
    out.push_str("(not verified: use `image-tool verify --keyring KEYRING BUNDLE`)\n");
    out
}

/// `inspect --json` output.
pub fn json_unverified(header: &BundleHeader, file_size: u64) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_slice(&header.manifest_bytes).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "manifest": manifest,
        "header_len": header.header_len(),
        "file_size": file_size,
        "signatures": header.signatures.iter().map(|s| s.key_id.to_string()).collect::<Vec<_>>(),
        "verified": false,
    })
}

/// Writes `text` to stdout, ignoring a closed pipe.
pub fn print(text: &str) {
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
