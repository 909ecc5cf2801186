//! `image-tool keygen`, `image-tool keyring`, `image-tool rotate-keyring` and
//! `image-tool verify-rotation`.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use twinroot_format::keyring::{
    KeyId, Keyring, KeyringRotation, MAX_KEYRING_FILE, generate_signing_key, load_signing_key,
    load_verifying_key, private_key_pem, public_key_pem,
};

use crate::output::StagedOutput;

fn write_new(path: &Path, mode: u32, contents: &[u8]) -> Result<StagedOutput> {
    if path.symlink_metadata().is_ok() {
        bail!("{}: already exists, refusing to overwrite", path.display());
    }
    let out = StagedOutput::new(path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(out.path())
        .with_context(|| format!("{}: cannot create", out.path().display()))?;
    file.write_all(contents)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(out)
}

/// Generates a key pair: private key as PKCS#8 PEM (mode 0600), public key as SPKI PEM.
/// Refuses to overwrite either file. Returns the key id.
pub fn keygen(private: &Path, public: &Path) -> Result<KeyId> {
    if private == public {
        bail!(
            "--private and --public name the same file {}",
            private.display()
        );
    }
    let key = generate_signing_key()?;
    let verifying = key.verifying_key();
    let private_out = write_new(private, 0o600, private_key_pem(&key).as_bytes())?;
    let public_out = write_new(public, 0o644, public_key_pem(&verifying).as_bytes())?;
    private_out.commit_new()?;
    if let Err(e) = public_out.commit_new() {
        let _ = std::fs::remove_file(private);
        return Err(e);
    }
    Ok(KeyId::of(&verifying))
}

/// Options of `image-tool keyring`.
pub struct KeyringOptions {
    pub public: Vec<PathBuf>,
    pub threshold: u32,
    pub serial: u64,
    pub out: PathBuf,
}

/// Writes a keyring file from public key files.
pub fn make_keyring(opts: &KeyringOptions) -> Result<Keyring> {
    if opts.public.is_empty() {
        bail!("no --public key given: an empty keyring trusts nothing");
    }
    let keys = opts
        .public
        .iter()
        .map(|p| load_verifying_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let keyring = Keyring::new(opts.serial, opts.threshold, &keys)
        .with_context(|| format!("{}: cannot build keyring", opts.out.display()))?;
    let out = StagedOutput::new(&opts.out)?;
    std::fs::write(out.path(), keyring.to_bytes())
        .with_context(|| format!("{}: cannot write", opts.out.display()))?;
    out.commit()?;
    Ok(keyring)
}

/// Loads a keyring, naming the file in every error.
pub fn load_keyring(path: &Path) -> Result<Keyring> {
    Ok(Keyring::load(path)?)
}

/// Options of `image-tool rotate-keyring`.
pub struct RotateOptions {
    pub current: PathBuf,
    pub new: PathBuf,
    pub keys: Vec<PathBuf>,
    pub out: PathBuf,
}

/// Signs a new keyring with keys of the current one; refuses unless the result verifies against
/// the current keyring (threshold met, serial increases).
pub fn rotate_keyring(opts: &RotateOptions) -> Result<Keyring> {
    let current = load_keyring(&opts.current)?;
    let new = load_keyring(&opts.new)?;
    let keys = opts
        .keys
        .iter()
        .map(|p| load_signing_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let rotation = KeyringRotation::sign(&new, &keys);
    rotation.verify(&current).with_context(|| {
        format!(
            "{}: the rotation would not be accepted by {}",
            opts.out.display(),
            opts.current.display()
        )
    })?;
    let out = StagedOutput::new(&opts.out)?;
    std::fs::write(out.path(), rotation.to_bytes())
        .with_context(|| format!("{}: cannot write", opts.out.display()))?;
    out.commit()?;
    Ok(new)
}

/// Checks a rotation file against the current keyring; optionally writes the new keyring.
pub fn verify_rotation(current: &Path, rotation: &Path, out: Option<&Path>) -> Result<Keyring> {
    let current_ring = load_keyring(current)?;
    let mut bytes = Vec::new();
    std::fs::File::open(rotation)
        .and_then(|f| f.take(MAX_KEYRING_FILE + 1).read_to_end(&mut bytes))
        .with_context(|| format!("{}: cannot read", rotation.display()))?;
    let new = KeyringRotation::from_bytes(&bytes)
        .and_then(|r| r.verify(&current_ring))
        .with_context(|| format!("{}: rotation rejected", rotation.display()))?;
    if let Some(out) = out {
        let staged = StagedOutput::new(out)?;
        std::fs::write(staged.path(), new.to_bytes())
            .with_context(|| format!("{}: cannot write", out.display()))?;
        staged.commit()?;
    }
    Ok(new)
}
