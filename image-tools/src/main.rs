//! `image-tool`: command line over the image-tools library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use image_tools::{disk, keys, release, squashfs};
use semver::Version;

#[derive(Parser)]
#[command(
    name = "image-tool",
    version,
    about = "Build, sign, verify and inspect twinroot release bundles and disk images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key pair (private: PKCS#8 PEM, mode 0600; public: SPKI PEM).
    /// Refuses to overwrite either file. Prints the key id.
    Keygen {
        /// Where to write the private key (created with mode 0600).
        #[arg(long, value_name = "FILE")]
        private: PathBuf,
        /// Where to write the public key.
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
    },
    /// Write a keyring (trust policy): public keys and how many of them must sign a bundle.
    Keyring {
        /// Public key file (SPKI PEM); repeat for each key.
        #[arg(long = "public", value_name = "FILE", required = true)]
        public: Vec<PathBuf>,
        /// Number of distinct keys whose signatures a bundle needs (k of n).
        #[arg(long, value_name = "K")]
        threshold: u32,
        /// Keyring serial; a rotation must increase it.
        #[arg(long, default_value_t = 1)]
        serial: u64,
        /// Keyring file to write.
        #[arg(long, value_name = "KEYRING")]
        out: PathBuf,
    },
    /// Sign a new keyring with keys of the current one (a keyring rotation file).
    RotateKeyring {
        /// The keyring hosts trust now.
        #[arg(long, value_name = "KEYRING")]
        current: PathBuf,
        /// The keyring to move to (its serial must be higher).
        #[arg(long, value_name = "KEYRING")]
        new: PathBuf,
        /// Private key of the current keyring; repeat up to its threshold.
        #[arg(long = "key", value_name = "PRIVATE", required = true)]
        keys: Vec<PathBuf>,
        /// Rotation file to write.
        #[arg(long, value_name = "ROTATION")]
        out: PathBuf,
    },
    /// Check a keyring rotation file against the current keyring; exit 0 only if accepted.
    VerifyRotation {
        /// The keyring the host trusts now.
        #[arg(long, value_name = "KEYRING")]
        keyring: PathBuf,
        /// Write the accepted new keyring here.
        #[arg(long, value_name = "KEYRING")]
        out: Option<PathBuf>,
        /// Rotation file to check.
        rotation: PathBuf,
    },
    /// Build a reproducible read-only squashfs (zstd) image of a directory.
    Build {
        /// Directory tree to put in the image.
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        /// Release version (semver), written to /usr/lib/twinroot-release in the image.
        #[arg(long, value_name = "V")]
        version: Version,
        /// Image file to write.
        #[arg(long, value_name = "IMAGE")]
        out: PathBuf,
        /// Timestamp of every inode (seconds since the epoch); default $SOURCE_DATE_EPOCH or 0.
        #[arg(long, value_name = "SECONDS")]
        mtime: Option<u32>,
    },
    /// Compress and sign an image into a release bundle.
    Bundle {
        /// Root image to ship (for example from `image-tool build`).
        #[arg(long, value_name = "IMAGE")]
        image: PathBuf,
        /// Release version (semver) for the manifest.
        #[arg(long, value_name = "V")]
        version: Version,
        /// Private key (PKCS#8 PEM); repeat to add signatures.
        #[arg(long = "key", value_name = "PRIVATE", required = true)]
        keys: Vec<PathBuf>,
        /// Bundle file to write.
        #[arg(long, value_name = "BUNDLE")]
        out: PathBuf,
        /// Creation time in the manifest; default $SOURCE_DATE_EPOCH or now.
        #[arg(long, value_name = "SECONDS")]
        created: Option<u64>,
        /// zstd level (1-19).
        #[arg(long, default_value_t = twinroot_format::bundle::DEFAULT_ZSTD_LEVEL,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Hardware/board compatibility string (reserved).
        #[arg(long)]
        board: Option<String>,
        /// Oldest version this bundle applies to (reserved for deltas).
        #[arg(long, value_name = "V")]
        min_source_version: Option<Version>,
    },
    /// Verify a bundle's signatures and its whole body; exit 0 only if everything matches.
    Verify {
        /// Keyring (trust policy) to verify against.
        #[arg(long, value_name = "KEYRING")]
        keyring: PathBuf,
        /// Bundle file to verify.
        bundle: PathBuf,
    },
    /// Print a bundle's manifest and signatures (not verified).
    Inspect {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Bundle file to read.
        bundle: PathBuf,
    },
    /// GPT disk images with A/B slots.
    Disk {
        #[command(subcommand)]
        command: DiskCommand,
    },
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a disk image: USR-A (holding IMAGE, marked good), USR-B (empty), STATE.
    Create {
        /// Disk image file to write.
        #[arg(long, value_name = "DISK")]
        out: PathBuf,
        /// Size of each slot (bytes, or with K/M/G suffix; rounded up to MiB).
        #[arg(long, value_name = "SIZE", value_parser = disk::parse_size)]
        slot_size: u64,
        /// Size of the state partition (0 for none).
        #[arg(long, value_name = "SIZE", value_parser = disk::parse_size, default_value = "16M")]
        state_size: u64,
        /// Root image to copy into slot A.
        #[arg(long, value_name = "IMAGE")]
        image: PathBuf,
    },
    /// Print each slot's priority, tries and successful bit.
    Show {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Disk image file or block device.
        disk: PathBuf,
    },
}

fn source_date_epoch() -> Result<Option<u64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Ok(Some(v.parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")
        })?)),
        Err(_) => Ok(None),
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { private, public } => {
            let id = keys::keygen(&private, &public)?;
            release::print(&format!("{id}\n"));
        }
        Command::Keyring {
            public,
            threshold,
            serial,
            out,
        } => {
            let ring = keys::make_keyring(&keys::KeyringOptions {
                public,
                threshold,
                serial,
                out,
            })?;
            let ids: Vec<String> = ring.key_ids().map(|k| k.to_string()).collect();
            release::print(&format!(
                "keyring serial {}: {} of {} keys ({})\n",
                ring.serial(),
                ring.threshold(),
                ids.len(),
                ids.join(", ")
            ));
        }
        Command::RotateKeyring {
            current,
            new,
            keys: key_files,
            out,
        } => {
            let ring = keys::rotate_keyring(&keys::RotateOptions {
                current,
                new,
                keys: key_files,
                out,
            })?;
            release::print(&format!(
                "rotation to keyring serial {} signed\n",
                ring.serial()
            ));
        }
        Command::VerifyRotation {
            keyring,
            out,
            rotation,
        } => {
            let ring = keys::verify_rotation(&keyring, &rotation, out.as_deref())?;
            release::print(&format!(
                "{}: OK, rotation to keyring serial {} accepted\n",
                rotation.display(),
                ring.serial()
            ));
        }
        Command::Build {
            rootfs,
            version,
            out,
            mtime,
        } => {
            let mtime = match mtime {
                Some(m) => m,
                None => source_date_epoch()?
                    .map(|s| u32::try_from(s).context("SOURCE_DATE_EPOCH is past 2106"))
                    .transpose()?
                    .unwrap_or(0),
            };
            let size = squashfs::build(&squashfs::BuildOptions {
                rootfs,
                version,
                out: out.clone(),
                mtime,
            })?;
            release::print(&format!(
                "{}: squashfs image, {size} bytes\n",
                out.display()
            ));
        }
        Command::Bundle {
            image,
            version,
            keys: key_files,
            out,
            created,
            level,
            board,
            min_source_version,
        } => {
            let created_unix = match created {
                Some(c) => c,
                None => match source_date_epoch()? {
                    Some(s) => s,
                    None => std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .context("system clock is before 1970")?
                        .as_secs(),
                },
            };
            let manifest = release::bundle(&release::BundleOptions {
                image,
                version,
                keys: key_files,
                out: out.clone(),
                created_unix,
                level,
                board,
                min_source_version,
            })?;
            release::print(&format!(
                "{}: version {}, image {} bytes, body {} bytes\n",
                out.display(),
                manifest.os_version,
                manifest.image.size,
                manifest.body.size
            ));
        }
        Command::Verify { keyring, bundle } => {
            let header = release::verify(&keyring, &bundle)?;
            release::print(&release::describe_verified(&bundle, &header));
        }
        Command::Inspect { json, bundle } => {
            let (header, size) = release::inspect(&bundle)?;
            if json {
                let value = release::json_unverified(&header, size);
                release::print(&format!("{}\n", serde_json::to_string_pretty(&value)?));
            } else {
                release::print(&release::describe_unverified(&header, size));
            }
        }
        Command::Disk { command } => match command {
            DiskCommand::Create {
                out,
                slot_size,
                state_size,
                image,
            } => {
                disk::create(&disk::DiskCreateOptions {
                    out: out.clone(),
                    slot_size,
                    state_size,
                    image,
                })?;
                release::print(&format!(
                    "{}: disk created, slot A holds the image\n",
                    out.display()
                ));
            }
            DiskCommand::Show { json, disk: path } => {
                let (slots, state) = disk::show(&path)?;
                if json {
                    let value = disk::json(&slots, state);
                    release::print(&format!("{}\n", serde_json::to_string_pretty(&value)?));
                } else {
                    release::print(&disk::describe(&path, &slots, state));
                }
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-tool: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
