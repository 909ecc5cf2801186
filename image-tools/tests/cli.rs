//! Every test runs the real `image-tool` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use twinroot_format::bundle::{compress_body, encode_header_bytes};
use twinroot_format::keyring::load_signing_key;
use twinroot_format::manifest::{FORMAT_VERSION, Manifest};

fn image_tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_image-tool"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("image-tool runs")
}

fn ok(args: &[&str]) -> String {
    let out = image_tool(args);
    assert!(
        out.status.success(),
        "image-tool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr, which must mention every `needle`.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let out = image_tool(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "image-tool {args:?} succeeded");
    // 1: the command failed; 2: clap rejected the command line.
    assert!(matches!(out.status.code(), Some(1 | 2)), "{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr of {args:?} lacks {needle:?}: {stderr}"
        );
    }
    stderr
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// Splits a command line on whitespace; `@name` stands for the path of `name` in the fixture.
    fn argv(&self, spec: &str) -> Vec<String> {
        spec.split_whitespace()
            .map(|a| match a.strip_prefix('@') {
                Some(name) => self.p(name),
                None => a.to_string(),
            })
            .collect()
    }

    /// `ok` with an `argv` spec.
    fn ok(&self, spec: &str) -> String {
        ok(&self
            .argv(spec)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>())
    }

    /// `fails` with an `argv` spec.
    fn fails(&self, spec: &str, needles: &[&str]) -> String {
        fails(
            &self
                .argv(spec)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            needles,
        )
    }

    fn keygen(&self, name: &str) -> String {
        ok(&[
            "keygen",
            "--private",
            &self.p(name),
            "--public",
            &self.p(&format!("{name}.pub")),
        ])
        .trim()
        .to_string()
    }

    fn keyring(&self, out: &str, threshold: u32, keys: &[&str]) {
        let mut args = vec!["keyring".to_string()];
        for k in keys {
            args.push("--public".into());
            args.push(self.p(&format!("{k}.pub")));
        }
        args.extend([
            "--threshold".into(),
            threshold.to_string(),
            "--out".into(),
            self.p(out),
        ]);
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// A 600 KB image: partly compressible, partly noise.
    fn image(&self, name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..600_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.push(if i % 2 == 0 {
                x as u8
            } else {
                (i / 1000) as u8
            });
        }
        std::fs::write(self.path(name), &data).unwrap();
        data
    }

    fn bundle(&self, image: &str, out: &str, keys: &[&str]) {
        let mut args = vec![
            "bundle".to_string(),
            "--image".into(),
            self.p(image),
            "--version".into(),
            "1.2.3".into(),
            "--out".into(),
            self.p(out),
            "--created".into(),
            "1700000000".into(),
        ];
        for k in keys {
            args.push("--key".into());
            args.push(self.p(k));
        }
        ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// keys k1, k2, k3; keyring `ring` (1 of k1); image `img`; bundle `b` signed by k1.
    fn standard() -> Fixture {
        let f = Fixture::new();
        for k in ["k1", "k2", "k3"] {
            f.keygen(k);
        }
        f.keyring("ring", 1, &["k1"]);
        f.image("img");
        f.bundle("img", "b", &["k1"]);
        f
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    /// Copies bundle `b` to `name` with `edit` applied.
    fn altered(&self, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut bytes = self.read("b");
        edit(&mut bytes);
        self.write(name, &bytes);
        self.p(name)
    }

    fn verify_fails(&self, bundle: &str, needles: &[&str]) -> String {
        fails(&["verify", "--keyring", &self.p("ring"), bundle], needles)
    }

    /// Offsets of the manifest, the signature block and the body in bundle `b`.
    fn layout(&self) -> (usize, usize, usize) {
        let b = self.read("b");
        let m = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let s = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
        (24, 24 + m, 24 + m + s)
    }

    /// Leftover staging directories or files other than `expected`.
    fn assert_only(&self, expected: &[&str]) {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want);
    }
}

/// A bundle whose manifest is edited after compression, then validly signed by `key`.
fn forged_bundle(f: &Fixture, key: &str, out: &str, edit: impl FnOnce(&mut Manifest)) -> String {
    let image = f.read("img");
    let mut body = Vec::new();
    let (digest, info) = compress_body(&image[..], &mut body, 3).unwrap();
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        os_version: "1.2.3".parse().unwrap(),
        created_unix: 0,
        image: digest,
        body: info,
        min_source_version: None,
        board: None,
    };
    edit(&mut manifest);
    let key = load_signing_key(&f.path(key)).unwrap();
    let mut bytes = encode_header_bytes(&manifest.to_bytes(), &[key]).unwrap();
    bytes.extend_from_slice(&body);
    f.write(out, &bytes);
    f.p(out)
}

#[test]
fn keygen_writes_openssl_readable_keys_and_never_overwrites() {
    let f = Fixture::new();
    let id = f.keygen("k");
    assert_eq!(id.len(), 16, "{id}");
    let mode = std::fs::metadata(f.path("k")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let derived = Command::new("openssl")
        .args(["pkey", "-in", &f.p("k"), "-pubout"])
        .output()
        .unwrap();
    assert!(
        derived.status.success(),
        "{}",
        String::from_utf8_lossy(&derived.stderr)
    );
    assert_eq!(derived.stdout, f.read("k.pub"));

    let before = f.read("k");
    f.fails(
        "keygen --private @k --public @other.pub",
        &["already exists", "refusing to overwrite"],
    );
    f.fails(
        "keygen --private @new --public @k.pub",
        &["k.pub", "already exists"],
    );
    assert_eq!(f.read("k"), before);
    f.assert_only(&["k", "k.pub"]);
}

#[test]
fn build_is_reproducible_and_readable_by_squashfs_tools() {
    let f = Fixture::new();
    let root = f.path("root");
    std::fs::create_dir_all(root.join("etc/sub")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("etc/motd"), "hello\n").unwrap();
    std::fs::write(root.join("etc/sub/z"), vec![7u8; 300_000]).unwrap();
    std::fs::write(root.join("bin/tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../etc/motd", root.join("bin/motd")).unwrap();

    let build = |out: &str, version: &str| {
        ok(&[
            "build",
            "--rootfs",
            &f.p("root"),
            "--version",
            version,
            "--out",
            &f.p(out),
        ]);
        f.read(out)
    };
    let first = build("a.img", "1.0.0");
    // Touch the tree's timestamps: the image must not change.
    std::fs::write(root.join("etc/motd"), "hello\n").unwrap();
    let second = build("b.img", "1.0.0");
    assert_eq!(first, second, "two builds of the same tree differ");
    assert_eq!(&first[..4], b"hsqs");
    let other = build("c.img", "1.0.1");
    assert_ne!(first, other, "the version must be part of the image");

    let out = Command::new("unsquashfs")
        .args(["-no-xattrs", "-d", &f.p("x"), &f.p("a.img")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let x = f.path("x");
    assert_eq!(std::fs::read(x.join("etc/motd")).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::read(x.join("etc/sub/z")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(
        std::fs::read_link(x.join("bin/motd")).unwrap(),
        Path::new("../etc/motd")
    );
    let mode = std::fs::metadata(x.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755);
    assert_eq!(
        std::fs::read_to_string(x.join("usr/lib/twinroot-release")).unwrap(),
        "VERSION=1.0.0\n"
    );
    let stat = Command::new("unsquashfs")
        .args(["-s", &f.p("a.img")])
        .output()
        .unwrap();
    let stat = String::from_utf8_lossy(&stat.stdout);
    assert!(stat.contains("Compression zstd"), "{stat}");
}

#[test]
fn build_failure_leaves_no_output() {
    let f = Fixture::new();
    f.fails(
        "build --rootfs @missing --version 1.0.0 --out @o.img",
        &["missing", "cannot read root directory"],
    );
    f.assert_only(&[]);
}

#[test]
fn bundle_verify_inspect_round_trip() {
    let f = Fixture::standard();
    f.keyring("ring2", 2, &["k1", "k2", "k3"]);
    f.bundle("img", "b2", &["k1", "k2"]);
    let out = f.ok("verify --keyring @ring2 @b2");
    assert!(out.contains("OK, version 1.2.3"), "{out}");
    f.ok("verify --keyring @ring @b");

    // Same inputs, same bundle bytes.
    f.bundle("img", "b3", &["k1", "k2"]);
    assert_eq!(f.read("b2"), f.read("b3"));

    let human = f.ok("inspect @b2");
    assert!(human.contains("os version:         1.2.3"), "{human}");
    assert!(human.contains("not verified"), "{human}");
    let json: serde_json::Value = serde_json::from_str(&f.ok("inspect --json @b2")).unwrap();
    assert_eq!(json["manifest"]["os_version"], "1.2.3");
    assert_eq!(json["manifest"]["image"]["size"], 600_000);
    assert_eq!(json["manifest"]["body"]["compression"], "zstd");
    assert_eq!(json["manifest"]["created_unix"], 1_700_000_000);
    assert_eq!(json["signatures"].as_array().unwrap().len(), 2);
    assert_eq!(json["verified"], false);
    assert_eq!(json["file_size"], f.read("b2").len());
}

#[test]
fn flipped_magic_byte() {
    let f = Fixture::standard();
    let b = f.altered("bad", |b| b[0] ^= 0x01);
    f.verify_fails(&b, &["bad", "not a twinroot bundle"]);
}

#[test]
fn flipped_header_length_byte() {
    let f = Fixture::standard();
    let b = f.altered("bad", |b| b[13] ^= 0x01);
    f.verify_fails(&b, &["bad", "header rejected"]);
    let b = f.altered("bad2", |b| b[21] ^= 0x01);
    f.verify_fails(&b, &["bad2", "reserved field"]);
}

#[test]
fn flipped_manifest_byte() {
    let f = Fixture::standard();
    let (m, _, _) = f.layout();
    let b = f.altered("bad", |b| b[m + 20] ^= 0x01);
    f.verify_fails(
        &b,
        &[
            "bad",
            "does not verify",
            "manifest or signature was altered",
        ],
    );
}

#[test]
fn flipped_signature_byte() {
    let f = Fixture::standard();
    let (_, s, _) = f.layout();
    let b = f.altered("bad", |b| b[s + 8 + 30] ^= 0x01);
    f.verify_fails(&b, &["bad", "does not verify"]);
    // A flipped key id turns the signature into one by an unknown key.
    let b = f.altered("bad2", |b| b[s] ^= 0x01);
    f.verify_fails(&b, &["bad2", "0 valid signature(s)", "unknown key"]);
}

#[test]
fn flipped_body_byte() {
    let f = Fixture::standard();
    let (_, _, body) = f.layout();
    let len = f.read("b").len();
    for (name, pos) in [
        ("bad1", body),
        ("bad2", (body + len) / 2),
        ("bad3", len - 1),
    ] {
        let b = f.altered(name, |b| b[pos] ^= 0x10);
        f.verify_fails(&b, &[name, "body rejected", "body sha256 mismatch"]);
    }
}

#[test]
fn truncated_bundle() {
    let f = Fixture::standard();
    let (_, s, body) = f.layout();
    let b = f.altered("t1", |b| b.truncate(10));
    f.verify_fails(&b, &["truncated", "header prefix"]);
    let b = f.altered("t2", |b| b.truncate(s + 5));
    f.verify_fails(&b, &["truncated", "signature block"]);
    let b = f.altered("t3", |b| b.truncate(body + 1000));
    f.verify_fails(&b, &["body is truncated"]);
    let b = f.altered("t4", |b| b.truncate(b.len() - 1));
    f.verify_fails(&b, &["body is truncated"]);
    let b = f.altered("t5", |b| b.clear());
    f.verify_fails(&b, &["truncated"]);
}

#[test]
fn trailing_garbage() {
    let f = Fixture::standard();
    let b = f.altered("bad", |b| b.extend_from_slice(b"\0garbage"));
    f.verify_fails(&b, &["bad", "trailing data"]);
}

#[test]
fn wrong_key() {
    let f = Fixture::standard();
    f.keyring("ring_k2", 1, &["k2"]);
    f.fails(
        "verify --keyring @ring_k2 @b",
        &["0 valid signature(s)", "threshold is 1", "unknown key"],
    );
    // Bundling with a public key instead of a private one is refused, with no output.
    f.fails(
        "bundle --image @img --version 1.0.0 --key @k1.pub --out @nb",
        &["k1.pub", "private key"],
    );
    assert!(!f.path("nb").exists());
}

#[test]
fn too_few_signatures_for_threshold() {
    let f = Fixture::standard();
    f.keyring("ring2", 2, &["k1", "k2", "k3"]);
    f.fails(
        "verify --keyring @ring2 @b",
        &["1 valid signature(s)", "threshold is 2"],
    );
    f.bundle("img", "b13", &["k1", "k3"]);
    f.ok("verify --keyring @ring2 @b13");
}

#[test]
fn unknown_format_version() {
    let f = Fixture::standard();
    let b = f.altered("v2", |b| b[8] = 2);
    f.verify_fails(&b, &["format version 2 is not supported"]);
    let b = f.altered("v2", |b| b[8] = 2);
    fails(&["inspect", &b], &["format version 2 is not supported"]);
}

#[test]
fn manifest_sizes_that_lie() {
    let f = Fixture::standard();
    let b = forged_bundle(&f, "k1", "small_body", |m| m.body.size -= 10);
    f.verify_fails(&b, &["body rejected"]);
    let b = forged_bundle(&f, "k1", "big_body", |m| m.body.size += 10);
    f.verify_fails(&b, &["body is truncated"]);
    let b = forged_bundle(&f, "k1", "big_image", |m| m.image.size += 1);
    f.verify_fails(&b, &["image size mismatch"]);
    let b = forged_bundle(&f, "k1", "huge_image", |m| m.image.size = u64::MAX);
    f.verify_fails(&b, &["image size mismatch"]);
    let b = forged_bundle(&f, "k1", "digest", |m| m.image.sha256.0[3] ^= 1);
    f.verify_fails(&b, &["image sha256 mismatch"]);
    // A manifest length beyond the limit is refused before anything is allocated.
    let b = f.altered("len", |b| {
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    f.verify_fails(&b, &["manifest length 4294967295"]);
    let b = f.altered("siglen", |b| b[16..20].copy_from_slice(&7u32.to_le_bytes()));
    f.verify_fails(&b, &["signature block length 7"]);
}

#[test]
fn image_larger_than_declared() {
    let f = Fixture::standard();
    let b = forged_bundle(&f, "k1", "bad", |m| m.image.size -= 1);
    f.verify_fails(
        &b,
        &[
            "bad",
            "image is larger than the 599999 bytes the manifest states",
        ],
    );
}

#[test]
fn empty_or_missing_keyring() {
    let f = Fixture::standard();
    f.fails("verify --keyring @nope @b", &["nope", "No such file"]);
    f.write("empty", b"");
    f.fails("verify --keyring @empty @b", &["empty", "empty keyring"]);
    f.write(
        "nokeys",
        br#"{"kind":"twinroot-keyring","serial":1,"threshold":1,"keys":[]}"#,
    );
    f.fails(
        "verify --keyring @nokeys @b",
        &["nokeys", "empty keyring, it has no keys"],
    );
    f.fails(
        "keyring --public @k1.pub --threshold 2 --out @r2",
        &["threshold 2 is impossible with 1 key"],
    );
    assert!(!f.path("r2").exists());
}

#[test]
fn keyring_rotation() {
    let f = Fixture::standard();
    f.keyring("old", 2, &["k1", "k2"]);
    let new_args = [
        "keyring",
        "--public",
        &f.p("k3.pub"),
        "--threshold",
        "1",
        "--serial",
        "2",
        "--out",
        &f.p("new"),
    ];
    ok(&new_args);
    f.ok("rotate-keyring --current @old --new @new --key @k1 --key @k2 --out @rot");
    let out = f.ok("verify-rotation --keyring @old --out @accepted @rot");
    assert!(out.contains("serial 2 accepted"), "{out}");
    assert_eq!(f.read("accepted"), f.read("new"));
    // One signature is below the old threshold.
    f.fails(
        "rotate-keyring --current @old --new @new --key @k1 --out @rot1",
        &["1 valid signature(s)", "threshold is 2"],
    );
    assert!(!f.path("rot1").exists());
    // A rotation is not accepted twice (serial must increase).
    f.fails(
        "verify-rotation --keyring @accepted @rot",
        &["rotation rejected"],
    );
}

#[test]
fn disk_create_and_show() {
    let f = Fixture::standard();
    f.ok("disk create --out @disk --slot-size 4M --image @img");
    let out = Command::new("sgdisk")
        .args(["-v", &f.p("disk")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No problems found"),
        "{text}"
    );
    let fdisk = Command::new("fdisk")
        .args(["-l", &f.p("disk")])
        .output()
        .unwrap();
    let fdisk_err = String::from_utf8_lossy(&fdisk.stderr);
    let fdisk_out = String::from_utf8_lossy(&fdisk.stdout);
    assert!(
        fdisk.status.success() && fdisk_err.trim().is_empty(),
        "{fdisk_err}"
    );
    assert!(fdisk_out.contains("Disklabel type: gpt"), "{fdisk_out}");
    assert!(
        !fdisk_out.to_lowercase().contains("mismatch"),
        "{fdisk_out}"
    );
    let show = f.ok("disk show @disk");
    assert!(
        show.contains("slot a (USR-A, partition 3): priority=1 tries=0 successful=1"),
        "{show}"
    );
    assert!(
        show.contains("slot b (USR-B, partition 4): priority=0 tries=0 successful=0"),
        "{show}"
    );
    let json: serde_json::Value = serde_json::from_str(&f.ok("disk show --json @disk")).unwrap();
    let offset = json["slots"][0]["offset"].as_u64().unwrap() as usize;
    let disk = f.read("disk");
    let image = f.read("img");
    assert_eq!(&disk[offset..offset + image.len()], &image[..]);
    assert!(json["state"]["size"].as_u64().unwrap() > 0);
    let names = Command::new("sgdisk")
        .args(["-p", &f.p("disk")])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(
        names.contains("USR-A") && names.contains("USR-B") && names.contains("STATE"),
        "{names}"
    );

    // An image that does not fit: error, and no disk file appears.
    f.fails(
        "disk create --out @small --slot-size 64K --image @img",
        &["img", "larger than the slot size"],
    );
    f.fails("disk show @img", &["img"]);
    f.assert_only(&[
        "b", "disk", "img", "k1", "k1.pub", "k2", "k2.pub", "k3", "k3.pub", "ring",
    ]);
}

#[test]
fn failed_commands_leave_no_output() {
    let f = Fixture::standard();
    let standard = [
        "b", "img", "k1", "k1.pub", "k2", "k2.pub", "k3", "k3.pub", "ring",
    ];
    f.fails(
        "bundle --image @nope --version 1.0.0 --key @k1 --out @o",
        &["nope", "cannot open image"],
    );
    f.fails(
        "bundle --image @img --version 1.0.0 --key @k1 --key @k1 --out @o",
        &["given twice"],
    );
    f.fails(
        "keyring --public @k1 --threshold 1 --out @o",
        &["k1", "not an ed25519 public key"],
    );
    f.fails(
        "disk create --out @o --slot-size 4M --image @nope",
        &["nope"],
    );
    f.fails(
        "bundle --image @img --version x.y --key @k1 --out @o",
        &["x.y"],
    );
    f.assert_only(&standard);

    // A failed bundle over an existing file leaves the old file untouched.
    let before = f.read("b");
    f.fails(
        "bundle --image @img --version 1.0.0 --key @k1.pub --out @b",
        &["k1.pub"],
    );
    assert_eq!(f.read("b"), before);
    f.assert_only(&standard);
}
