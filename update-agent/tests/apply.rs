//! The apply path against a real HTTP server and disk image files.

mod common;

use std::time::Duration;

use common::*;
use twinroot_format::slot::{SlotAttrs, SlotName, choose_boot};
use update_agent::apply::{Install, InstallPolicy};
use update_agent::sim::MemorySource;
use update_agent::slots::{BootedSlot, MemorySlotTable, SlotTable};
use update_agent::state::{FileStateStore, MemoryStateStore, StateStore};

struct Setup {
    dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    keys: Keys,
    conf: std::path::PathBuf,
    /// SHA-256 of the whole slot A partition as set up.
    a_digest: [u8; 32],
}

fn setup(slot_size: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let a_content = image(3 * MIB as usize, 7);
    let disk = disk(dir.path(), slot_size, &a_content);
    let keys = keys(dir.path());
    let conf = dir.path().join("conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    Setup {
        a_digest: slot_digest(&disk, SlotName::A),
        dir,
        disk,
        keys,
        conf,
    }
}

impl Setup {
    fn install(&self, bundle: &str, extra: &[&str]) -> std::process::Output {
        self.install_command(bundle, extra).output().unwrap()
    }

    /// `update-agent install` of `bundle` on this disk, with slot A booted at 1.0.0.
    fn install_command(&self, bundle: &str, extra: &[&str]) -> std::process::Command {
        let state = self.dir.path().join("state");
        let mut args = vec![
            "install",
            "--disk",
            self.disk.to_str().unwrap(),
            "--booted-slot",
            "a",
            "--keyring",
            self.keys.keyring_path.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--current-version",
            "1.0.0",
        ];
        args.extend_from_slice(extra);
        args.push(bundle);
        agent_command(&self.conf, &args)
    }

    fn bundle(&self, version: &str, img: &[u8]) -> Vec<u8> {
        make_bundle(
            &BundleSpec {
                image: img,
                version,
                frame: 512 * 1024,
                board: None,
            },
            &self.keys.signing,
        )
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn state(&self) -> update_agent::state::PersistentState {
        FileStateStore::new(self.dir.path().join("state"))
            .load()
            .unwrap()
    }

    /// `install BUNDLE` fails with one of `expected` in its error, slot A keeps exactly what it
    /// held and B stays unbootable, nothing is staged.
    fn refuses(&self, case: &str, bundle: &str, extra: &[&str], expected: &[&str]) {
        let out = self.install(bundle, extra);
        assert!(!out.status.success(), "{case}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            expected.iter().any(|e| err.contains(e)),
            "{case}: expected one of {expected:?} in {err}"
        );
        self.assert_untouched_a_and_unbootable_b(case);
        assert!(self.state().staged.is_none(), "{case}");
    }

    /// Slot A still holds exactly what it held, and the host would still boot A.
    fn assert_untouched_a_and_unbootable_b(&self, case: &str) {
        assert_eq!(
            slot_digest(&self.disk, SlotName::A),
            self.a_digest,
            "{case}: slot A changed"
        );
        let s = slots(&self.disk);
        assert!(
            !s[1].attrs.is_bootable(),
            "{case}: slot B bootable: {}",
            s[1].attrs
        );
        assert_eq!(choose_boot(&s).unwrap().slot, SlotName::A, "{case}");
        assert_eq!(s[0].attrs.priority, 1, "{case}: slot A attributes changed");
    }
}

#[test]
fn happy_path_over_http() {
    let t = setup(16 * MIB);
    let img = image(6 * MIB as usize, 1);
    let server = TestServer::start();
    server.put("/b/1.1.0.tbdl", t.bundle("1.1.0", &img));
    let out = t.install(&server.url("/b/1.1.0.tbdl"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed 1.1.0 into slot b"),
        "{}",
        text(&out)
    );
    assert_eq!(slot_bytes(&t.disk, SlotName::B, img.len() as u64), img);
    assert_eq!(slot_digest(&t.disk, SlotName::A), t.a_digest);
    let s = slots(&t.disk);
    assert_eq!(
        s[1].attrs,
        SlotAttrs {
            priority: 2,
            tries: 1,
            successful: false
        }
    );
    let choice = choose_boot(&s).unwrap();
    assert_eq!((choice.slot, choice.consume_try), (SlotName::B, true));
    let st = t.state();
    let staged = st.staged.unwrap();
    assert_eq!(
        (staged.version.as_str(), staged.slot.as_str()),
        ("1.1.0", "b")
    );
    assert!(st.download.is_none());
    assert_eq!(st.slot_versions.get("b").map(String::as_str), Some("1.1.0"));
}

#[test]
fn resumes_after_a_cut_connection() {
    let t = setup(16 * MIB);
    let img = image(6 * MIB as usize, 2);
    let bundle = t.bundle("1.2.0", &img);
    let hl = header_len(&bundle);
    let server = TestServer::start();
    server.put("/x.tbdl", bundle.clone());
    // First response cut inside the body, the first resume cut again.
    server.cut_next(&[hl + 700_000, 500_000]);
    let out = t.install(&server.url("/x.tbdl"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(slot_bytes(&t.disk, SlotName::B, img.len() as u64), img);
    let ranges: Vec<u64> = server.seen().iter().filter_map(|s| s.range).collect();
    assert_eq!(ranges.len(), 2, "two resumed requests: {ranges:?}");
    assert_eq!(ranges[0], hl + 700_000);
    assert_eq!(ranges[1], hl + 700_000 + 500_000);
}

#[test]
fn resumes_after_an_agent_restart_from_the_saved_offset() {
    let t = setup(16 * MIB);
    std::fs::write(
        t.conf.join("10-test.toml"),
        "[agent]\ncheckpoint_mib = 1\n[server]\ndownload_retries = 0\n",
    )
    .unwrap();
    let img = image(8 * MIB as usize, 3);
    let bundle = t.bundle("1.3.0", &img);
    let hl = header_len(&bundle);
    let body_len = bundle.len() as u64 - hl;
    let server = TestServer::start();
    server.put("/r.tbdl", bundle.clone());
    server.cut_next(&[hl + body_len * 6 / 10]);
    let url = server.url("/r.tbdl");

    let first = t.install(&url, &[]);
    assert!(!first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("download failed"),
        "{}",
        text(&first)
    );
    let checkpoint = t.state().download.expect("checkpoint saved");
    assert!(checkpoint.body_offset > 0 && checkpoint.image_offset >= MIB);
    assert!(!slots(&t.disk)[1].attrs.is_bootable());

    // A new agent process picks up at the checkpoint.
    let second = t.install(&url, &[]);
    assert!(second.status.success(), "{}", text(&second));
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains(&format!(
            "resumed at image byte {}",
            checkpoint.image_offset
        )),
        "{}",
        text(&second)
    );
    let ranges: Vec<u64> = server.seen().iter().filter_map(|s| s.range).collect();
    assert_eq!(ranges, vec![hl + checkpoint.body_offset]);
    assert_eq!(slot_bytes(&t.disk, SlotName::B, img.len() as u64), img);
    assert!(t.state().download.is_none());
}

/// A bundle as `image-tool bundle` writes it, and the body offsets where its frames end.
fn real_bundle_and_frames(t: &Setup, version: &str, img: &[u8]) -> (Vec<u8>, Vec<u64>) {
    let out = real_bundle(version, img, &t.keys.signing);
    let mut body = &out[header_len(&out) as usize..];
    let mut ends = Vec::new();
    let mut at = 0u64;
    while !body.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(body).unwrap();
        at += n as u64;
        ends.push(at);
        body = &body[n..];
    }
    (out, ends)
}

/// SIGKILL of a real `update-agent install URL` in the middle of a throttled download of a
/// multi-frame bundle; the next run continues from the last frame boundary it recorded.
#[test]
fn resumes_a_multi_frame_download_after_sigkill() {
    use twinroot_format::bundle::FRAME_IMAGE_BYTES;
    let t = setup(112 * MIB);
    let img = image(104 * MIB as usize, 12);
    let (bundle, frame_ends) = real_bundle_and_frames(&t, "2.0.0", &img);
    assert_eq!(frame_ends.len(), 4, "frames of 32 MiB: {frame_ends:?}");
    let hl = header_len(&bundle);
    let body_len = bundle.len() as u64 - hl;
    let server = TestServer::start();
    server.put("/big.tbdl", bundle);
    server.throttle(32 * MIB);
    // A safety net: whatever the machine's speed, the first run cannot finish before the kill.
    server.hold_at(hl + frame_ends[2] + 1000);
    let url = server.url("/big.tbdl");

    let mut first = t.install_command(&url, &[]).spawn().unwrap();
    // Until the state file records a checkpoint past the first frame, slot B is never bootable.
    let mut checkpoint = None;
    wait_for(
        "a checkpoint past the first frame",
        Duration::from_secs(120),
        || {
            assert!(
                !slots(&t.disk)[1].attrs.is_bootable(),
                "slot B bootable during the download"
            );
            checkpoint = t.state().download.filter(|d| d.image_offset > 0);
            assert!(
                first.try_wait().unwrap().is_none(),
                "the first agent ended before it was killed"
            );
            checkpoint.is_some()
        },
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = first.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the first agent ended on its own: {status:?}"
    );
    server.release();
    let served_first = server.served_bytes();
    assert!(
        served_first < hl + body_len,
        "the whole bundle went out before the kill"
    );

    // The interruption: A untouched and booted, B unbootable, a checkpoint at a frame boundary.
    t.assert_untouched_a_and_unbootable_b("after SIGKILL");
    let c = t.state().download.expect("checkpoint survives SIGKILL");
    assert_eq!((c.version.as_str(), c.slot.as_str()), ("2.0.0", "b"));
    assert!(c.body_offset > 0, "{c:?}");
    let frame = frame_ends
        .iter()
        .position(|e| *e == c.body_offset)
        .unwrap_or_else(|| {
            panic!(
                "body offset {} is no frame end of {frame_ends:?}",
                c.body_offset
            )
        });
    assert_eq!(
        c.image_offset,
        (frame as u64 + 1) * FRAME_IMAGE_BYTES,
        "{c:?}"
    );
    assert_eq!(
        slot_bytes(&t.disk, SlotName::B, c.image_offset)[..],
        img[..c.image_offset as usize],
        "the checkpointed part of slot B"
    );

    // A new agent process picks up there.
    let gets_before = server.seen().len();
    let second = t
        .install_command(&url, &[])
        .env("UPDATE_AGENT_LOG", "info")
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", text(&second));
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains(&format!("resumed at image byte {}", c.image_offset)),
        "{}",
        text(&second)
    );
    let ranges: Vec<Option<u64>> = server.seen()[gets_before..]
        .iter()
        .map(|s| s.range)
        .collect();
    assert_eq!(
        ranges,
        vec![None, Some(hl + c.body_offset)],
        "header, then the body from the checkpoint"
    );
    let served = server.served_bytes();
    assert!(
        served < (hl + body_len) * 3 / 2,
        "served {served} bytes in all for a {body_len}-byte body"
    );
    assert!(
        served - served_first < body_len,
        "the second run fetched {} bytes: not a resume",
        served - served_first
    );

    // The slot is the image, marked only after its read-back.
    assert_eq!(
        slot_digest_len(&t.disk, SlotName::B, img.len() as u64),
        sha256(&img)
    );
    let log = String::from_utf8_lossy(&second.stderr);
    let read_back = log
        .find("slot read back")
        .unwrap_or_else(|| panic!("{log}"));
    let staged = log.find("update staged").unwrap_or_else(|| panic!("{log}"));
    assert!(read_back < staged, "{log}");
    let s = slots(&t.disk);
    assert_eq!(choose_boot(&s).unwrap().slot, SlotName::B);
    assert_eq!(slot_digest(&t.disk, SlotName::A), t.a_digest);
    assert!(t.state().download.is_none());
}

#[test]
fn bad_inputs_leave_the_active_slot_untouched_and_the_inactive_slot_unbootable() {
    let t = setup(8 * MIB);
    let img = image(5 * MIB as usize, 4);
    let good = t.bundle("1.5.0", &img);
    let hl = header_len(&good) as usize;
    let server = TestServer::start();

    let mut tampered_body = good.clone();
    let mid = hl + (good.len() - hl) / 2;
    tampered_body[mid] ^= 0x55;
    let mut tampered_manifest = good.clone();
    tampered_manifest[40] ^= 0x01;
    let truncated = good[..good.len() - 1000].to_vec();
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"extra");
    let other_keys = keys(&t.dir.path().join("other").tap_mkdir());
    let wrong_key = bundle_of("1.5.0", &img, &other_keys.signing);
    let older = t.bundle("0.9.0", &img);
    let same = t.bundle("1.0.0", &img);
    let too_big = t.bundle("1.6.0", &image(9 * MIB as usize, 5));
    let arm = make_bundle(
        &BundleSpec {
            image: &img,
            version: "1.7.0",
            frame: MIB as usize,
            board: Some("arm64-usr"),
        },
        &t.keys.signing,
    );
    server.put("/truncated", truncated.clone());
    server.put("/tampered", tampered_body.clone());

    let digest = &["[digest-mismatch]", "[malformed]"][..];
    let signature = &["[signature]"][..];
    let board = &["--board", "amd64-usr"][..];
    // (case, bundle file or URL, extra flags, what the error must name: one of)
    #[rustfmt::skip]
    let cases: [(&str, String, &[&str], &[&str]); 11] = [
        ("tampered body (file)", t.write("t.tbdl", &tampered_body), &[], digest),
        ("tampered body (http)", server.url("/tampered"), &[], digest),
        ("tampered manifest", t.write("m.tbdl", &tampered_manifest), &[], signature),
        ("truncated (file)", t.write("tr.tbdl", &truncated), &[], &["truncated"]),
        ("truncated (http)", server.url("/truncated"), &[], &["truncated"]),
        ("trailing data", t.write("x.tbdl", &trailing), &[], &["trailing data"]),
        ("wrong key", t.write("k.tbdl", &wrong_key), &[], signature),
        ("downgrade", t.write("o.tbdl", &older), &[], &["[downgrade]", "0.9.0"]),
        ("same version", t.write("s.tbdl", &same), &[], &["[downgrade]"]),
        ("too big", t.write("b.tbdl", &too_big), &[], &["[too-large]"]),
        ("other board", t.write("a.tbdl", &arm), board, &["[wrong-board]", "arm64-usr"]),
    ];
    for (case, bundle, extra, expected) in cases {
        t.refuses(case, &bundle, extra, expected);
    }

    // Quarantined: this host rolled back from 1.5.0 before.
    let mut store = FileStateStore::new(t.dir.path().join("state"));
    let mut st = store.load().unwrap();
    st.quarantine("1.5.0");
    store.save(&st).unwrap();
    t.refuses(
        "quarantined",
        &t.write("q.tbdl", &good),
        &[],
        &["[quarantined]"],
    );

    // The downgrade goes through when explicitly allowed.
    let out = t.install(&t.write("o2.tbdl", &older), &["--allow-downgrade"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(slot_digest(&t.disk, SlotName::A), t.a_digest);
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Signing keys and the keyring, for installs through the library API on in-memory slots (what
/// the fleet simulator does).
struct Library {
    _dir: tempfile::TempDir,
    keys: Keys,
    keyring: twinroot_format::keyring::Keyring,
}

impl Library {
    fn new() -> Library {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys(dir.path());
        let keyring = twinroot_format::keyring::Keyring::load(&keys.keyring_path).unwrap();
        Library {
            _dir: dir,
            keys,
            keyring,
        }
    }

    /// A bundle of `img` as `version`, held in memory.
    fn source(&self, name: String, version: &str, img: &[u8]) -> MemorySource {
        MemorySource {
            name,
            bytes: std::sync::Arc::new(bundle_of(version, img, &self.keys.signing)),
        }
    }

    /// `Install::run` on a host running `current` from `booted`.
    fn install(
        &self,
        slots: &mut dyn SlotTable,
        booted: SlotName,
        store: &mut dyn StateStore,
        source: &mut MemorySource,
        current: &str,
    ) -> update_agent::error::AgentResult<update_agent::apply::Installed> {
        let policy = InstallPolicy {
            current_version: current.parse().unwrap(),
            allow_downgrade: false,
            board: None,
            tries: 1,
            download_retries: 0,
            retry_base: Duration::from_millis(1),
            checkpoint_every: MIB,
            readback_from_medium: true,
        };
        Install {
            slots,
            booted: BootedSlot::new(booted),
            store,
            source,
            keyring: &self.keyring,
            policy: &policy,
            progress: None,
            on_accepted: None,
        }
        .run()
    }
}

/// The core through the library API on in-memory slots: the booted slot never gets a writer,
/// whatever the bundle.
#[test]
fn the_booted_slot_is_never_opened_for_writing() {
    let lib = Library::new();
    let img = image(2 * MIB as usize, 9);
    for booted in [SlotName::A, SlotName::B] {
        let mut slots = MemorySlotTable::new(4 * MIB);
        slots.attrs[booted.index()] = GOOD;
        let mut store = MemoryStateStore::default();
        for (i, version) in ["2.0.0", "1.0.0", "2.0.0"].iter().enumerate() {
            let mut source = lib.source(format!("memory:{booted}-{i}"), version, &img);
            let _ = lib.install(&mut slots, booted, &mut store, &mut source, "1.5.0");
        }
        assert_eq!(slots.writers_opened[booted.index()], 0);
        assert_eq!(slots.writers_opened[booted.other().index()], 2);
        let s = slots.slots().unwrap();
        assert_eq!(choose_boot(&s).unwrap().slot, booted.other());
        assert_eq!(
            slots.data[booted.other().index()].lock().unwrap()[..img.len()],
            img[..]
        );
    }
}

#[test]
fn configuration_errors_name_the_file_and_key_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[reboot]\nstrategy = \"sometimes\"\n",
            &["50-bad.toml", "reboot.strategy", "sometimes"][..],
        ),
        (
            "[agent]\ndisk_path = \"/dev/sda\"\n",
            &["50-bad.toml", "disk_path"][..],
        ),
        ("[agent]\ntries = 0\n", &["50-bad.toml", "agent.tries"][..]),
        (
            "[server]\nurl = \"not a url\"\n",
            &["50-bad.toml", "server.url"][..],
        ),
    ];
    for (toml, expected) in cases {
        let conf = dir.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("10-good.toml"),
            "[agent]\nboard = \"amd64-usr\"\n",
        )
        .unwrap();
        std::fs::write(conf.join("50-bad.toml"), toml).unwrap();
        for args in [&["install", "/nonexistent"][..], &["daemon"][..]] {
            let out = run_agent(&conf, args);
            assert_eq!(out.status.code(), Some(1), "{}", text(&out));
            let err = String::from_utf8_lossy(&out.stderr);
            for e in expected {
                assert!(err.contains(e), "{toml:?}: {e:?} missing from {err}");
            }
        }
    }
}

/// A disk whose medium returns one flipped byte: only the read-back can notice.
struct FlakyMedium(MemorySlotTable);

struct FlipByte<R> {
    inner: R,
    pos: u64,
    at: u64,
}

impl<R: std::io::Read> std::io::Read for FlipByte<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if (self.pos..self.pos + n as u64).contains(&self.at) {
            buf[(self.at - self.pos) as usize] ^= 0x01;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl SlotTable for FlakyMedium {
    fn describe(&self) -> String {
        "flaky medium".into()
    }
    fn slots(&mut self) -> update_agent::error::AgentResult<[twinroot_format::slot::SlotState; 2]> {
        self.0.slots()
    }
    fn capacity(&mut self, slot: SlotName) -> update_agent::error::AgentResult<u64> {
        self.0.capacity(slot)
    }
    fn set_attrs(
        &mut self,
        changes: &[(SlotName, SlotAttrs)],
    ) -> update_agent::error::AgentResult<()> {
        self.0.set_attrs(changes)
    }
    fn open_writer(
        &mut self,
        slot: update_agent::slots::InactiveSlot,
    ) -> update_agent::error::AgentResult<Box<dyn update_agent::slots::SlotSink>> {
        self.0.open_writer(slot)
    }
    fn open_reader(
        &mut self,
        slot: SlotName,
        len: u64,
    ) -> update_agent::error::AgentResult<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(FlipByte {
            inner: self.0.open_reader(slot, len)?,
            pos: 0,
            at: 1_234_567,
        }))
    }
}

#[test]
fn a_slot_that_reads_back_wrong_is_never_marked() {
    let lib = Library::new();
    let img = image(3 * MIB as usize, 11);
    let mut source = lib.source("memory:flaky".into(), "2.0.0", &img);
    let mut slots = FlakyMedium(MemorySlotTable::new(4 * MIB));
    slots.0.attrs[0] = GOOD;
    let mut store = MemoryStateStore::default();
    let err = lib
        .install(&mut slots, SlotName::A, &mut store, &mut source, "1.0.0")
        .unwrap_err();
    assert_eq!(
        err.kind,
        update_agent::error::ErrorKind::DigestMismatch,
        "{err}"
    );
    assert!(err.message.contains("read back as"), "{err}");
    // What was written is the image; the slot is still never booted.
    assert_eq!(slots.0.data[1].lock().unwrap()[..img.len()], img[..]);
    let s = slots.slots().unwrap();
    assert!(!s[1].attrs.is_bootable());
    assert_eq!(choose_boot(&s).unwrap().slot, SlotName::A);
}
