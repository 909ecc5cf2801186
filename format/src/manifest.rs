//! The release manifest: what a bundle contains, signed as exact bytes.
//!
//! The manifest is JSON with a fixed field order (so the same release always serializes to the
//! same bytes). Readers keep and verify the exact bytes they received; they never re-serialize.
//! Unknown fields are rejected: any change to the schema bumps [`FORMAT_VERSION`].
//! The manifest names no channel, so one bundle is promoted alpha -> beta -> stable unchanged.

use std::fmt;

use semver::Version;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The bundle format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// A SHA-256 digest (hex in JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() != 64 || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(serde::de::Error::custom(
                "sha256 must be 64 lowercase hex digits",
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(&text, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Sha256Digest(out))
    }
}

/// Size and digest of the decompressed root image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub size: u64,
    pub sha256: Sha256Digest,
}

/// How the body is compressed. Only zstd exists in format version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::Zstd => f.write_str("zstd"),
        }
    }
}

/// Size and digest of the compressed body exactly as it follows the header in the bundle file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyInfo {
    pub size: u64,
    pub sha256: Sha256Digest,
    pub compression: Compression,
}

/// The signed description of one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub os_version: Version,
    /// Build time, seconds since the Unix epoch (taken from SOURCE_DATE_EPOCH for reproducible
    /// bundles).
    pub created_unix: u64,
    pub image: Digest,
    pub body: BodyInfo,
    /// Reserved for delta bundles: the oldest version this bundle may be applied on.
    pub min_source_version: Option<Version>,
    /// Reserved: hardware/board compatibility string.
    pub board: Option<String>,
}

/// Why manifest bytes are not an acceptable manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON of the expected shape: {0}")]
    Parse(String),
    #[error("manifest states format version {0}, this reader knows only {FORMAT_VERSION}")]
    UnsupportedFormatVersion(u32),
    #[error("manifest board string is {0} bytes, at most {MAX_BOARD_LEN} allowed")]
    BoardTooLong(usize),
}

/// Longest board string accepted.
pub const MAX_BOARD_LEN: usize = 256;

impl Manifest {
    /// Canonical bytes: compact JSON in declaration order, no trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serializes")
    }

    /// Parses exact manifest bytes and checks the format version and field limits.
    pub fn from_bytes(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedFormatVersion(
                manifest.format_version,
            ));
        }
        if let Some(board) = &manifest.board
            && board.len() > MAX_BOARD_LEN
        {
            return Err(ManifestError::BoardTooLong(board.len()));
        }
        Ok(manifest)
    }

    /// Multi-line human description (used by `image-tool inspect`).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("format version:     {}\n", self.format_version));
        out.push_str(&format!("os version:         {}\n", self.os_version));
        out.push_str(&format!("created (unix):     {}\n", self.created_unix));
        out.push_str(&format!("image size:         {}\n", self.image.size));
        out.push_str(&format!("image sha256:       {}\n", self.image.sha256));
        out.push_str(&format!("body compression:   {}\n", self.body.compression));
        out.push_str(&format!("body size:          {}\n", self.body.size));
        out.push_str(&format!("body sha256:        {}\n", self.body.sha256));
        out.push_str(&format!(
            "min source version: {}\n",
            self.min_source_version
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        ));
        out.push_str(&format!(
            "board:              {}\n",
            self.board.as_deref().unwrap_or("-")
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            os_version: Version::parse("1.2.3-rc.1").unwrap(),
            created_unix: 1_700_000_000,
            image: Digest {
                size: 4096,
                sha256: Sha256Digest([0xab; 32]),
            },
            body: BodyInfo {
                size: 100,
                sha256: Sha256Digest([0x01; 32]),
                compression: Compression::Zstd,
            },
            min_source_version: None,
            board: Some("amd64-usr".into()),
        }
    }

    #[test]
    fn round_trip_is_exact() {
        let m = sample();
        let bytes = m.to_bytes();
        let parsed = Manifest::from_bytes(&bytes).unwrap();
        assert_eq!(parsed, m);
        assert_eq!(parsed.to_bytes(), bytes);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with(r#"{"format_version":1,"os_version":"1.2.3-rc.1","#),
            "{text}"
        );
        assert!(!text.contains("channel"));
    }

    #[test]
    fn rejects_unknown_fields_versions_and_bad_digests() {
        let text = String::from_utf8(sample().to_bytes()).unwrap();
        let extra = text.replacen('{', r#"{"channel":"stable","#, 1);
        assert!(matches!(
            Manifest::from_bytes(extra.as_bytes()),
            Err(ManifestError::Parse(_))
        ));
        let v2 = text.replacen(r#""format_version":1"#, r#""format_version":2"#, 1);
        assert!(matches!(
            Manifest::from_bytes(v2.as_bytes()),
            Err(ManifestError::UnsupportedFormatVersion(2))
        ));
        let upper = text.replacen(&"ab".repeat(32), &"AB".repeat(32), 1);
        assert!(matches!(
            Manifest::from_bytes(upper.as_bytes()),
            Err(ManifestError::Parse(_))
        ));
        let lz4 = text.replacen("zstd", "lz4", 1);
        assert!(matches!(
            Manifest::from_bytes(lz4.as_bytes()),
            Err(ManifestError::Parse(_))
        ));
        let badver = text.replacen("1.2.3-rc.1", "1.2", 1);
        assert!(Manifest::from_bytes(badver.as_bytes()).is_err());
    }
}
