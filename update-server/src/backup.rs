//! `update-server backup`: a consistent copy of an SQLite database, taken while servers run.
//!
//! SQLite in WAL mode lets a reader see one committed snapshot while the check-in writer goes on,
//! so `VACUUM INTO` from a read-only connection writes exactly the state of one commit, compacted,
//! without stopping anybody. The copy is written under a temporary name next to the target,
//! checked (`PRAGMA quick_check`), synced and only then renamed: a backup file that exists is
//! whole. PostgreSQL has its own tools (`pg_dump`); this command refuses it and says so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags};

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub path: PathBuf,
    pub bytes: u64,
    pub hosts: u64,
    pub releases: u64,
}

/// Copies the SQLite database at `database_url` to `to`, which must not exist yet.
pub fn sqlite_backup(database_url: &str, to: &Path) -> Result<BackupSummary> {
    if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
        bail!(
            "backup copies SQLite databases; for PostgreSQL ({}) use pg_dump",
            crate::store::redact(database_url)
        );
    }
    let source = crate::store::sqlite_file(database_url)?;
    if !source.exists() {
        bail!("no database at {}: check --data-dir", source.display());
    }
    if to.exists() {
        bail!(
            "{} already exists: a backup never overwrites a file",
            to.display()
        );
    }
    let name = to
        .file_name()
        .with_context(|| format!("backup path {} names no file", to.display()))?;
    let dir = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let partial = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_file(&partial);
    let result = write_copy(&source, &partial).and_then(|summary| {
        std::fs::rename(&partial, to)
            .with_context(|| format!("cannot rename the backup to {}", to.display()))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync directory {}", dir.display()))?;
        Ok(BackupSummary {
            path: to.to_path_buf(),
            ..summary
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `VACUUM INTO` `partial`, then checks and syncs it.
fn write_copy(source: &Path, partial: &Path) -> Result<BackupSummary> {
    let conn = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", source.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let target = partial
        .to_str()
        .with_context(|| format!("backup path {} is not UTF-8", partial.display()))?;
    conn.execute("VACUUM INTO ?1", [target])
        .with_context(|| format!("cannot copy {} to {}", source.display(), target))?;
    drop(conn);

    let copy = Connection::open_with_flags(partial, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!("the copy in {target} failed SQLite's check: {check}");
    }
    let count = |table: &str| -> Result<u64> {
        let n: i64 = copy.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(n as u64)
    };
    let (hosts, releases) = (count("instances")?, count("releases")?);
    drop(copy);
    let file = std::fs::File::open(partial)?;
    file.sync_all()
        .with_context(|| format!("cannot sync {target}"))?;
    Ok(BackupSummary {
        path: partial.to_path_buf(),
        bytes: file.metadata()?.len(),
        hosts,
        releases,
    })
}
