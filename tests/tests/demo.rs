//! The README's first command runs this demo: it must complete on its own with every channel's
//! host on the new version and every reboot through the coordinator.

use std::process::Command;

#[test]
fn demo_promotes_through_every_channel_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let work = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_twinroot-demo"))
        .arg("--exit-when-done")
        .arg("--work-dir")
        .arg(&work)
        .output()
        .expect("twinroot-demo starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let all = format!("{stdout}\n{stderr}");
    for channel in ["alpha", "beta", "stable"] {
        assert!(
            all.lines()
                .any(|l| l.contains(channel) && l.contains("promotion to Complete")),
            "no completion line for {channel}:\n{all}"
        );
    }
    assert!(
        all.contains("went alpha -> beta -> stable"),
        "no final line:\n{all}"
    );
    assert!(
        all.contains("3 reboot slot grants, 3 releases"),
        "the coordinator did not see three grants and three releases:\n{all}"
    );
}
