//! The agent's persistent state: what survives an agent restart and a reboot.
//!
//! Stored as JSON in `STATE_DIR/agent-state.json`, replaced atomically: the new content is written
//! to a temporary file in the same directory, fsync'd, renamed over the old file, and the directory
//! is fsync'd. A crash leaves either the old or the new file, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file name inside the state directory.
pub const STATE_FILE: &str = "agent-state.json";
/// Format version of the state file; bumped on incompatible changes.
pub const STATE_FORMAT: u32 = 1;

/// A download that can be resumed after an agent restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadCheckpoint {
    pub url: String,
    pub version: String,
    pub slot: String,
    /// Hex SHA-256 of the signed manifest bytes, to detect a different bundle under the same URL.
    pub manifest_sha256: String,
    /// Bundle body bytes consumed up to the end of a complete compressed frame.
    pub body_offset: u64,
    /// Image bytes written to the slot (and synced) for that frame boundary.
    pub image_offset: u64,
}

/// An update written to a slot and waiting for (or going through) its first boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedUpdate {
    pub version: String,
    pub slot: String,
    pub previous_version: String,
    /// The agent asked for the reboot into it (lock taken when coordinated).
    pub reboot_requested: bool,
}

/// An Omaha event still to be delivered to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEvent {
    pub event_type: u32,
    pub result: u32,
    pub error_code: Option<u32>,
    pub previous_version: Option<String>,
    /// Human-readable detail for the local log and D-Bus status.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentState {
    pub format: u32,
    pub download: Option<DownloadCheckpoint>,
    pub staged: Option<StagedUpdate>,
    /// Versions this host rolled back from: never installed again unless lifted.
    pub quarantined: Vec<String>,
    /// OS version known to be in each slot ("a"/"b"), recorded on install.
    pub slot_versions: BTreeMap<String, String>,
    /// Events to send with the next Omaha request.
    pub pending_events: Vec<PendingEvent>,
    /// A FleetLock slot is held by this host and must be released after a healthy boot.
    pub reboot_lock_held: bool,
    /// Unix seconds of the last successful update check.
    pub last_check_unix: Option<u64>,
    pub last_error: Option<String>,
}

impl Default for PersistentState {
    fn default() -> Self {
        PersistentState {
            format: STATE_FORMAT,
            download: None,
            staged: None,
            quarantined: Vec::new(),
            slot_versions: BTreeMap::new(),
            pending_events: Vec::new(),
            reboot_lock_held: false,
            last_check_unix: None,
            last_error: None,
        }
    }
}

impl PersistentState {
    pub fn is_quarantined(&self, version: &str) -> bool {
        self.quarantined.iter().any(|v| v == version)
    }

    pub fn quarantine(&mut self, version: &str) {
        if !self.is_quarantined(version) {
            self.quarantined.push(version.to_string());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt state file ({source}); move it away to start over")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: state format {found} is newer than this agent understands ({STATE_FORMAT})")]
    TooNew { path: PathBuf, found: u32 },
}

/// Where state is kept. The simulator keeps state in memory through the same trait.
pub trait StateStore: Send {
    fn load(&mut self) -> Result<PersistentState, StateError>;
    fn save(&mut self, state: &PersistentState) -> Result<(), StateError>;
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct FileStateStore {
    dir: PathBuf,
}

impl FileStateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileStateStore { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl StateStore for FileStateStore {
    fn load(&mut self) -> Result<PersistentState, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PersistentState::default());
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let state: PersistentState =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.format > STATE_FORMAT {
            return Err(StateError::TooNew {
                path,
                found: state.format,
            });
        }
        Ok(state)
    }

    fn save(&mut self, state: &PersistentState) -> Result<(), StateError> {
        write_atomic(
            &self.dir,
            STATE_FILE,
            &serde_json::to_vec_pretty(state).expect("state serializes"),
        )
    }
}

/// Replaces `dir/name` with `content`: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> Result<(), StateError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(content).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, &target).map_err(io(&target))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// State kept in memory (simulator, unit tests).
#[derive(Debug, Default, Clone)]
pub struct MemoryStateStore {
    pub state: Option<PersistentState>,
}

impl StateStore for MemoryStateStore {
    fn load(&mut self) -> Result<PersistentState, StateError> {
        Ok(self.state.clone().unwrap_or_default())
    }

    fn save(&mut self, state: &PersistentState) -> Result<(), StateError> {
        self.state = Some(state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStateStore::new(dir.path().join("state"));
        assert_eq!(store.load().unwrap(), PersistentState::default());
        let mut s = PersistentState::default();
        s.quarantine("1.2.0");
        s.download = Some(DownloadCheckpoint {
            url: "http://x/b".into(),
            version: "1.3.0".into(),
            slot: "b".into(),
            manifest_sha256: "00".into(),
            body_offset: 10,
            image_offset: 20,
        });
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        s.download = None;
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        // No temp file left behind.
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn corrupt_state_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let err = FileStateStore::new(dir.path())
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains(STATE_FILE) && err.contains("corrupt"), "{err}");
    }
}
