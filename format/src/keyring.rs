//! Signing keys, key ids and the keyring: a host's trust policy for release bundles.
//!
//! Keys are ed25519. Private keys are stored as PKCS#8 PEM and public keys as SPKI PEM, the forms
//! `openssl pkey` reads. A key id is the hex of the first 8 bytes of SHA-256 over the 32 raw public
//! key bytes.
//!
//! A keyring is a JSON file naming public keys and a threshold `k`: a bundle is trusted when at
//! least `k` distinct keys of the keyring signed its manifest. A keyring may be replaced by a newer
//! one (higher serial) through a [`KeyringRotation`] signed by a threshold of the current keyring.
//! See docs/FORMAT.md.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, KeypairBytes,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The `kind` field of every keyring file; it keeps a keyring from ever parsing as something else.
pub const KEYRING_KIND: &str = "twinroot-keyring";
/// The `kind` field of a keyring rotation file.
pub const ROTATION_KIND: &str = "twinroot-keyring-rotation";
/// Most keys a keyring may list (and most signatures any signed object may carry).
pub const MAX_KEYS: usize = 32;
/// Largest keyring or rotation file accepted, in bytes.
pub const MAX_KEYRING_FILE: u64 = 64 * 1024;

/// Identifies a public key: the first 8 bytes of SHA-256 over its 32 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<KeyId, KeyError> {
        let bytes = hex::decode(s).map_err(|_| KeyError::BadKeyId(s.to_string()))?;
        let id: [u8; 8] = bytes
            .try_into()
            .map_err(|_| KeyError::BadKeyId(s.to_string()))?;
        Ok(KeyId(id))
    }
}

/// Errors about key files, keyrings and keyring rotations.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not an ed25519 private key in PKCS#8 PEM form ({detail})")]
    BadPrivateKey { path: PathBuf, detail: String },
    #[error("{path}: not an ed25519 public key in SPKI PEM form ({detail})")]
    BadPublicKey { path: PathBuf, detail: String },
    #[error("{path}: file is {size} bytes, more than the {max} bytes allowed")]
    FileTooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("could not get randomness from the operating system: {0}")]
    Random(String),
    #[error("bad key id {0:?}: expected 16 hex digits")]
    BadKeyId(String),
    #[error("keyring is not valid: {0}")]
    BadKeyring(String),
    #[error("empty keyring, it has no keys: nothing can be trusted (fails closed)")]
    EmptyKeyring,
    #[error("{path}: {error}")]
    InFile { path: PathBuf, error: Box<KeyError> },
    #[error(
        "keyring threshold {threshold} is impossible with {keys} key(s): need 1 <= threshold <= keys"
    )]
    BadThreshold { threshold: u32, keys: usize },
    #[error("keyring lists key id {listed} but its public key has id {actual}")]
    KeyIdMismatch { listed: String, actual: String },
    #[error("keyring lists key {0} twice")]
    DuplicateKey(String),
    #[error("rotation file is not valid: {0}")]
    BadRotation(String),
    #[error("rotation signature by key {0} does not verify")]
    BadSignature(KeyId),
    #[error("rotation carries two signatures by key {0}")]
    DuplicateSignature(KeyId),
    #[error(
        "rotation has {valid} valid signature(s) from keys of the current keyring, threshold is {threshold}{}",
        unknown_note(unknown)
    )]
    NotEnoughSignatures {
        valid: usize,
        threshold: u32,
        unknown: Vec<KeyId>,
    },
    #[error("rotation to keyring serial {new} does not increase the current serial {current}")]
    SerialNotIncreasing { current: u64, new: u64 },
}

/// Text appended to "not enough signatures" errors naming signatures by keys the keyring lacks.
pub(crate) fn unknown_note(unknown: &[KeyId]) -> String {
    if unknown.is_empty() {
        String::new()
    } else {
        let ids: Vec<String> = unknown.iter().map(|k| k.to_string()).collect();
        format!(" (signed by unknown key(s) {})", ids.join(", "))
    }
}

/// A fresh signing key from the operating system's random source.
pub fn generate_signing_key() -> Result<SigningKey, KeyError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// PKCS#8 v1 PEM text of a private key (what `openssl pkey -in FILE` reads; OpenSSL 3.0 does
/// not read the v2 form that also embeds the public key).
pub fn private_key_pem(key: &SigningKey) -> String {
    let bytes = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    bytes
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encoding an ed25519 key as PKCS#8 cannot fail")
        .to_string()
}

/// SPKI PEM text of a public key (what `openssl pkey -pubin -in FILE` reads).
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("encoding an ed25519 key as SPKI cannot fail")
}

fn read_small(path: &Path) -> Result<Vec<u8>, KeyError> {
    let io = |error| KeyError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > MAX_KEYRING_FILE {
        return Err(KeyError::FileTooLarge {
            path: path.to_path_buf(),
            size,
            max: MAX_KEYRING_FILE,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_KEYRING_FILE + 1),
        &mut bytes,
    )
    .map_err(io)?;
    Ok(bytes)
}

/// Reads a PKCS#8 PEM private key file.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let bytes = read_small(path)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        detail: "not UTF-8 text".into(),
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Reads an SPKI PEM public key file.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = read_small(path)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::BadPublicKey {
        path: path.to_path_buf(),
        detail: "not UTF-8 text".into(),
    })?;
    let key = VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::BadPublicKey {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if key.is_weak() {
        return Err(KeyError::BadPublicKey {
            path: path.to_path_buf(),
            detail: "weak (small-order) key".into(),
        });
    }
    Ok(key)
}

/// One signature, tagged with the id of the key that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedSignature {
    pub key_id: KeyId,
    pub signature: Signature,
}

impl TaggedSignature {
    pub fn sign(key: &SigningKey, message: &[u8]) -> TaggedSignature {
        TaggedSignature {
            key_id: KeyId::of(&key.verifying_key()),
            signature: key.sign(message),
        }
    }
}

/// Outcome of checking signatures against a keyring that met its threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trusted {
    /// Keys of the keyring whose signatures verified, sorted.
    pub signers: Vec<KeyId>,
    /// Signatures by keys this keyring does not know (ignored; they may be a rotated key).
    pub unknown: Vec<KeyId>,
}

/// Why a set of signatures did not satisfy a keyring; the bundle and rotation checks map it onto
/// their own error types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureFailure {
    Invalid(KeyId),
    Duplicate(KeyId),
    TooFew {
        valid: usize,
        threshold: u32,
        unknown: Vec<KeyId>,
    },
}

/// A validated keyring: at least one key, unique ids, 1 <= threshold <= number of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    serial: u64,
    threshold: u32,
    keys: Vec<(KeyId, VerifyingKey)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    kind: String,
    serial: u64,
    threshold: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    ed25519: String,
}

impl Keyring {
    /// Builds a keyring from public keys; rejects an empty list, duplicates and bad thresholds.
    pub fn new(serial: u64, threshold: u32, keys: &[VerifyingKey]) -> Result<Keyring, KeyError> {
        let keys: Vec<(KeyId, VerifyingKey)> = keys.iter().map(|k| (KeyId::of(k), *k)).collect();
        Keyring::validated(serial, threshold, keys)
    }

    fn validated(
        serial: u64,
        threshold: u32,
        mut keys: Vec<(KeyId, VerifyingKey)>,
    ) -> Result<Keyring, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::EmptyKeyring);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::BadKeyring(format!(
                "{} keys listed, at most {MAX_KEYS} allowed",
                keys.len()
            )));
        }
        keys.sort_by_key(|(id, _)| *id);
        for pair in keys.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(KeyError::DuplicateKey(pair[0].0.to_string()));
            }
        }
        if threshold == 0 || threshold as usize > keys.len() {
            return Err(KeyError::BadThreshold {
                threshold,
                keys: keys.len(),
            });
        }
        Ok(Keyring {
            serial,
            threshold,
            keys,
        })
    }

    /// Parses and validates keyring file bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Keyring, KeyError> {
        if bytes.len() as u64 > MAX_KEYRING_FILE {
            return Err(KeyError::BadKeyring(format!(
                "{} bytes, at most {MAX_KEYRING_FILE} allowed",
                bytes.len()
            )));
        }
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(KeyError::EmptyKeyring);
        }
        let file: KeyringFile =
            serde_json::from_slice(bytes).map_err(|e| KeyError::BadKeyring(e.to_string()))?;
        if file.kind != KEYRING_KIND {
            return Err(KeyError::BadKeyring(format!(
                "kind is {:?}, expected {KEYRING_KIND:?}",
                file.kind
            )));
        }
        let mut keys = Vec::with_capacity(file.keys.len().min(MAX_KEYS));
        for entry in &file.keys {
            let raw = BASE64
                .decode(&entry.ed25519)
                .map_err(|e| KeyError::BadKeyring(format!("key {}: {e}", entry.id)))?;
            let raw: [u8; 32] = raw.try_into().map_err(|_| {
                KeyError::BadKeyring(format!("key {}: not 32 bytes of ed25519 key", entry.id))
            })?;
            let key = VerifyingKey::from_bytes(&raw)
                .map_err(|e| KeyError::BadKeyring(format!("key {}: {e}", entry.id)))?;
            if key.is_weak() {
                return Err(KeyError::BadKeyring(format!(
                    "key {}: weak (small-order) key",
                    entry.id
                )));
            }
            let actual = KeyId::of(&key);
            if actual.to_string() != entry.id {
                return Err(KeyError::KeyIdMismatch {
                    listed: entry.id.clone(),
                    actual: actual.to_string(),
                });
            }
            keys.push((actual, key));
        }
        Keyring::validated(file.serial, file.threshold, keys)
    }

    /// Reads a keyring file. A missing, empty or invalid file is an error naming the path: with no
    /// keyring nothing can be verified, so callers fail closed.
    pub fn load(path: &Path) -> Result<Keyring, KeyError> {
        let bytes = read_small(path)?;
        Keyring::from_bytes(&bytes).map_err(|e| KeyError::InFile {
            path: path.to_path_buf(),
            error: Box::new(e),
        })
    }

    /// The canonical JSON form (keys sorted by id, trailing newline).
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = KeyringFile {
            kind: KEYRING_KIND.to_string(),
            serial: self.serial,
            threshold: self.threshold,
            keys: self
                .keys
                .iter()
                .map(|(id, key)| KeyEntry {
                    id: id.to_string(),
                    ed25519: BASE64.encode(key.as_bytes()),
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("keyring serializes");
        bytes.push(b'\n');
        bytes
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Ids of the keys, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    pub fn key(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys
            .binary_search_by_key(id, |(k, _)| *k)
            .ok()
            .map(|i| &self.keys[i].1)
    }

    /// Checks signatures over `message`. Every signature by a key of this keyring must verify
    /// (strict ed25519); no key may sign twice; signatures by unknown keys are ignored (they may
    /// come from a rotated keyring) but named in the error when the threshold is not met.
    pub fn check_signatures(
        &self,
        message: &[u8],
        signatures: &[TaggedSignature],
    ) -> Result<Trusted, SignatureFailure> {
        let mut seen = BTreeSet::new();
        let mut signers = Vec::new();
        let mut unknown = Vec::new();
        for sig in signatures {
            if !seen.insert(sig.key_id) {
                return Err(SignatureFailure::Duplicate(sig.key_id));
            }
            match self.key(&sig.key_id) {
                Some(key) => {
                    key.verify_strict(message, &sig.signature)
                        .map_err(|_| SignatureFailure::Invalid(sig.key_id))?;
                    signers.push(sig.key_id);
                }
                None => unknown.push(sig.key_id),
            }
        }
        if signers.len() < self.threshold as usize {
            return Err(SignatureFailure::TooFew {
                valid: signers.len(),
                threshold: self.threshold,
                unknown,
            });
        }
        signers.sort();
        Ok(Trusted { signers, unknown })
    }
}

/// A new keyring signed by keys of the keyring it replaces.
///
/// File form (JSON): `{"kind": "twinroot-keyring-rotation", "keyring": BASE64(new keyring file
/// bytes), "signatures": [{"key_id": HEX, "signature": BASE64}]}`. The signatures cover the exact
/// new keyring bytes.
#[derive(Clone, Debug)]
pub struct KeyringRotation {
    keyring_bytes: Vec<u8>,
    signatures: Vec<TaggedSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationFile {
    kind: String,
    keyring: String,
    signatures: Vec<SignatureEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureEntry {
    key_id: String,
    signature: String,
}

impl KeyringRotation {
    /// Signs `new` with `keys` (normally a threshold of the current keyring's keys).
    pub fn sign(new: &Keyring, keys: &[SigningKey]) -> KeyringRotation {
        let keyring_bytes = new.to_bytes();
        let signatures = keys
            .iter()
            .map(|k| TaggedSignature::sign(k, &keyring_bytes))
            .collect();
        KeyringRotation {
            keyring_bytes,
            signatures,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let file = RotationFile {
            kind: ROTATION_KIND.to_string(),
            keyring: BASE64.encode(&self.keyring_bytes),
            signatures: self
                .signatures
                .iter()
                .map(|s| SignatureEntry {
                    key_id: s.key_id.to_string(),
                    signature: BASE64.encode(s.signature.to_bytes()),
                })
                .collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file).expect("rotation serializes");
        bytes.push(b'\n');
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<KeyringRotation, KeyError> {
        if bytes.len() as u64 > MAX_KEYRING_FILE {
            return Err(KeyError::BadRotation(format!(
                "{} bytes, at most {MAX_KEYRING_FILE} allowed",
                bytes.len()
            )));
        }
        let file: RotationFile =
            serde_json::from_slice(bytes).map_err(|e| KeyError::BadRotation(e.to_string()))?;
        if file.kind != ROTATION_KIND {
            return Err(KeyError::BadRotation(format!(
                "kind is {:?}, expected {ROTATION_KIND:?}",
                file.kind
            )));
        }
        if file.signatures.len() > MAX_KEYS {
            return Err(KeyError::BadRotation(format!(
                "{} signatures, at most {MAX_KEYS} allowed",
                file.signatures.len()
            )));
        }
        let keyring_bytes = BASE64
            .decode(&file.keyring)
            .map_err(|e| KeyError::BadRotation(format!("keyring: {e}")))?;
        let mut signatures = Vec::with_capacity(file.signatures.len());
        for entry in &file.signatures {
            let key_id: KeyId = entry.key_id.parse()?;
            let raw = BASE64
                .decode(&entry.signature)
                .map_err(|e| KeyError::BadRotation(format!("signature by {key_id}: {e}")))?;
            let raw: [u8; 64] = raw.try_into().map_err(|_| {
                KeyError::BadRotation(format!("signature by {key_id}: not 64 bytes"))
            })?;
            signatures.push(TaggedSignature {
                key_id,
                signature: Signature::from_bytes(&raw),
            });
        }
        Ok(KeyringRotation {
            keyring_bytes,
            signatures,
        })
    }

    /// Accepts the rotation if a threshold of `current` signed it and the serial increases;
    /// returns the new keyring.
    pub fn verify(&self, current: &Keyring) -> Result<Keyring, KeyError> {
        current
            .check_signatures(&self.keyring_bytes, &self.signatures)
            .map_err(|f| match f {
                SignatureFailure::Invalid(id) => KeyError::BadSignature(id),
                SignatureFailure::Duplicate(id) => KeyError::DuplicateSignature(id),
                SignatureFailure::TooFew {
                    valid,
                    threshold,
                    unknown,
                } => KeyError::NotEnoughSignatures {
                    valid,
                    threshold,
                    unknown,
                },
            })?;
        let new = Keyring::from_bytes(&self.keyring_bytes)?;
        if new.serial <= current.serial {
            return Err(KeyError::SerialNotIncreasing {
                current: current.serial,
                new: new.serial,
            });
        }
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn key_id_is_first_eight_bytes_of_sha256() {
        let k = key(1).verifying_key();
        let digest = Sha256::digest(k.as_bytes());
        assert_eq!(KeyId::of(&k).to_string(), hex::encode(&digest[..8]));
        assert_eq!(
            KeyId::of(&k).to_string().parse::<KeyId>().unwrap(),
            KeyId::of(&k)
        );
    }

    #[test]
    fn pem_round_trip() {
        let k = key(7);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), private_key_pem(&k)).unwrap();
        std::fs::write(dir.path().join("k.pub"), public_key_pem(&k.verifying_key())).unwrap();
        assert_eq!(load_signing_key(&dir.path().join("k")).unwrap(), k);
        assert_eq!(
            load_verifying_key(&dir.path().join("k.pub")).unwrap(),
            k.verifying_key()
        );
        let err = load_verifying_key(&dir.path().join("k")).unwrap_err();
        assert!(
            err.to_string().contains("not an ed25519 public key"),
            "{err}"
        );
    }

    #[test]
    fn keyring_round_trip_and_validation() {
        let keys = [key(1).verifying_key(), key(2).verifying_key()];
        let ring = Keyring::new(3, 2, &keys).unwrap();
        let again = Keyring::from_bytes(&ring.to_bytes()).unwrap();
        assert_eq!(ring, again);
        assert_eq!(again.serial(), 3);
        assert_eq!(again.threshold(), 2);

        assert!(matches!(
            Keyring::new(1, 1, &[]),
            Err(KeyError::EmptyKeyring)
        ));
        assert!(matches!(
            Keyring::new(1, 3, &keys),
            Err(KeyError::BadThreshold { .. })
        ));
        assert!(matches!(
            Keyring::new(1, 0, &keys),
            Err(KeyError::BadThreshold { .. })
        ));
        assert!(matches!(
            Keyring::new(1, 1, &[keys[0], keys[0]]),
            Err(KeyError::DuplicateKey(_))
        ));
        assert!(matches!(
            Keyring::from_bytes(b"  \n"),
            Err(KeyError::EmptyKeyring)
        ));
        let text = String::from_utf8(ring.to_bytes()).unwrap();
        let wrong_id = text.replacen(&KeyId::of(&keys[0]).to_string(), "0000000000000000", 1);
        assert!(matches!(
            Keyring::from_bytes(wrong_id.as_bytes()),
            Err(KeyError::KeyIdMismatch { .. })
        ));
        let empty = r#"{"kind":"twinroot-keyring","serial":1,"threshold":1,"keys":[]}"#;
        assert!(matches!(
            Keyring::from_bytes(empty.as_bytes()),
            Err(KeyError::EmptyKeyring)
        ));
    }

    #[test]
    fn threshold_counts_distinct_valid_known_keys() {
        let ring = Keyring::new(1, 2, &[key(1).verifying_key(), key(2).verifying_key()]).unwrap();
        let msg = b"manifest";
        let s1 = TaggedSignature::sign(&key(1), msg);
        let s2 = TaggedSignature::sign(&key(2), msg);
        let s9 = TaggedSignature::sign(&key(9), msg);
        let ok = ring
            .check_signatures(msg, &[s1.clone(), s9.clone(), s2.clone()])
            .unwrap();
        assert_eq!(ok.signers.len(), 2);
        assert_eq!(ok.unknown, vec![s9.key_id]);
        assert_eq!(
            ring.check_signatures(msg, &[s1.clone(), s9.clone()]),
            Err(SignatureFailure::TooFew {
                valid: 1,
                threshold: 2,
                unknown: vec![s9.key_id]
            })
        );
        assert_eq!(
            ring.check_signatures(msg, &[s1.clone(), s1.clone()]),
            Err(SignatureFailure::Duplicate(s1.key_id))
        );
        let forged = TaggedSignature {
            key_id: s2.key_id,
            signature: s9.signature,
        };
        assert_eq!(
            ring.check_signatures(msg, &[s1, forged]),
            Err(SignatureFailure::Invalid(s2.key_id))
        );
    }

    #[test]
    fn rotation_needs_old_threshold_and_higher_serial() {
        let old = Keyring::new(1, 2, &[key(1).verifying_key(), key(2).verifying_key()]).unwrap();
        let new = Keyring::new(2, 1, &[key(3).verifying_key()]).unwrap();
        let rot = KeyringRotation::sign(&new, &[key(1), key(2)]);
        let parsed = KeyringRotation::from_bytes(&rot.to_bytes()).unwrap();
        assert_eq!(parsed.verify(&old).unwrap(), new);

        let weak = KeyringRotation::sign(&new, &[key(1), key(3)]);
        assert!(matches!(
            weak.verify(&old),
            Err(KeyError::NotEnoughSignatures { valid: 1, .. })
        ));
        let stale = Keyring::new(1, 1, &[key(3).verifying_key()]).unwrap();
        let rot = KeyringRotation::sign(&stale, &[key(1), key(2)]);
        assert!(matches!(
            rot.verify(&old),
            Err(KeyError::SerialNotIncreasing { .. })
        ));
    }
}
