//! Atomic output files: everything is written into a private staging directory next to the
//! target and moved into place only when the command has succeeded, so a failed command never
//! leaves a file that looks valid.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A file being produced for `target`.
pub struct StagedOutput {
    staging: tempfile::TempDir,
    path: PathBuf,
    target: PathBuf,
}

impl StagedOutput {
    /// Prepares to write `target`. Fails early if its directory does not exist.
    pub fn new(target: &Path) -> Result<StagedOutput> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target
            .file_name()
            .with_context(|| format!("{}: not a file name", target.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(".image-tool-")
            .tempdir_in(&parent)
            .with_context(|| format!("{}: cannot create a staging directory", parent.display()))?;
        let path = staging.path().join(name);
        Ok(StagedOutput {
            staging,
            path,
            target: target.to_path_buf(),
        })
    }

    /// Where to write; the file does not exist yet.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Syncs the staged file and renames it over the target (replacing an existing file).
    pub fn commit(self) -> Result<()> {
        self.sync()?;
        std::fs::rename(&self.path, &self.target).with_context(|| {
            format!(
                "{}: cannot move the output into place",
                self.target.display()
            )
        })?;
        self.sync_parent();
        Ok(())
    }

    /// Like [`commit`](Self::commit) but fails if the target exists (hard link, never clobbers).
    pub fn commit_new(self) -> Result<()> {
        self.sync()?;
        if let Err(e) = std::fs::hard_link(&self.path, &self.target) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                bail!(
                    "{}: already exists, refusing to overwrite",
                    self.target.display()
                );
            }
            return Err(e).with_context(|| format!("{}: cannot create", self.target.display()));
        }
        self.sync_parent();
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync", self.path.display()))
    }

    fn sync_parent(&self) {
        if let Some(parent) = self.staging.path().parent()
            && let Ok(dir) = File::open(parent)
        {
            let _ = dir.sync_all();
        }
    }
}
