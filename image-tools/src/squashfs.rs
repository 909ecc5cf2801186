//! `image-tool build`: a reproducible, read-only squashfs image of a directory, written
//! in-process with the `backhand` crate.
//!
//! Reproducible means: entries are added in byte order of their names, every inode gets uid 0,
//! gid 0 and the same mtime, the superblock gets that mtime too, and the release version is
//! written to [`VERSION_FILE`]. Mode bits, symlink targets, device numbers and file contents are
//! taken from the tree; nothing else about it (owners, times, inode numbers, xattrs) is kept.

use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader};
use semver::Version;

use crate::output::StagedOutput;

/// Path inside the image that holds `VERSION=<version>`; a file of that name in the tree is
/// replaced.
pub const VERSION_FILE: &str = "usr/lib/twinroot-release";

/// Options of `image-tool build`.
pub struct BuildOptions {
    pub rootfs: PathBuf,
    pub version: Version,
    pub out: PathBuf,
    /// mtime of every inode and of the image (seconds since the epoch).
    pub mtime: u32,
}

fn header(meta: &std::fs::Metadata, mtime: u32) -> NodeHeader {
    NodeHeader::new((meta.mode() & 0o7777) as u16, 0, 0, mtime)
}

fn add_tree<'a>(
    fs: &mut FilesystemWriter<'a, 'a, 'a>,
    root: &Path,
    rel: &Path,
    mtime: u32,
) -> Result<()> {
    let dir = root.join(rel);
    let mut entries = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: cannot read directory", dir.display()))?;
    entries.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in entries {
        let rel_path = rel.join(&name);
        let full = root.join(&rel_path);
        if rel_path == Path::new(VERSION_FILE) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&full)
            .with_context(|| format!("{}: cannot stat", full.display()))?;
        let ft = meta.file_type();
        let hdr = header(&meta, mtime);
        let err = |e: backhand::BackhandError| {
            anyhow::anyhow!("{}: cannot add to the image: {e}", full.display())
        };
        if ft.is_dir() {
            fs.push_dir(&rel_path, hdr).map_err(err)?;
            add_tree(fs, root, &rel_path, mtime)?;
        } else if ft.is_file() {
            fs.push_file_from_path(full.clone(), &rel_path, hdr)
                .map_err(err)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full)
                .with_context(|| format!("{}: cannot read link", full.display()))?;
            fs.push_symlink(target, &rel_path, hdr).map_err(err)?;
        } else if ft.is_char_device() {
            fs.push_char_device(meta.rdev() as u32, &rel_path, hdr)
                .map_err(err)?;
        } else if ft.is_block_device() {
            fs.push_block_device(meta.rdev() as u32, &rel_path, hdr)
                .map_err(err)?;
        } else if ft.is_fifo() {
            fs.push_fifo(&rel_path, hdr).map_err(err)?;
        } else if ft.is_socket() {
            fs.push_socket(&rel_path, hdr).map_err(err)?;
        } else {
            bail!("{}: unsupported file type", full.display());
        }
    }
    Ok(())
}

/// Builds the image; returns its size in bytes.
pub fn build(opts: &BuildOptions) -> Result<u64> {
    let root_meta = std::fs::metadata(&opts.rootfs)
        .with_context(|| format!("{}: cannot read root directory", opts.rootfs.display()))?;
    if !root_meta.is_dir() {
        bail!("{}: not a directory", opts.rootfs.display());
    }
    let mut fs = FilesystemWriter::default();
    fs.set_time(opts.mtime);
    fs.set_root_mode((root_meta.mode() & 0o7777) as u16);
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    let compressor = FilesystemCompressor::new(Compressor::Zstd, None)
        .map_err(|e| anyhow::anyhow!("zstd compressor: {e}"))?;
    fs.set_compressor(compressor);
    fs.set_emit_compression_options(false);

    add_tree(&mut fs, &opts.rootfs, Path::new(""), opts.mtime)?;
    // Adds usr and usr/lib only where the tree lacks them.
    fs.push_dir_all("usr/lib", NodeHeader::new(0o755, 0, 0, opts.mtime))
        .map_err(|e| anyhow::anyhow!("{}: cannot add usr/lib: {e}", opts.rootfs.display()))?;
    let release = format!("VERSION={}\n", opts.version).into_bytes();
    fs.push_file(
        std::io::Cursor::new(release),
        VERSION_FILE,
        NodeHeader::new(0o644, 0, 0, opts.mtime),
    )
    .map_err(|e| anyhow::anyhow!("cannot add {VERSION_FILE}: {e}"))?;

    let out = StagedOutput::new(&opts.out)?;
    let file = File::create(out.path())
        .with_context(|| format!("{}: cannot create", out.path().display()))?;
    let (_, size) = fs
        .write(BufWriter::new(file))
        .map_err(|e| anyhow::anyhow!("{}: cannot write squashfs: {e}", opts.out.display()))?;
    out.commit()?;
    Ok(size)
}
