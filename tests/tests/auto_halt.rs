//! Scenario 6 (automatic halt): three hosts on the good v1 share the `stable` channel; the bad
//! v3 (a `required.d` hook that fails) is promoted with a rollout policy that grants one host at a
//! time (`--max-in-flight 1`) and halts at the first failure (`--halt-failure-percent 1
//! --halt-min-reports 1`). The one granted host installs v3, fails its check and reverts to v1;
//! its failure report pauses the rollout (`rollout show` says PAUSED with the reason, the
//! activity log has `rollout_halted`), and the two other hosts keep checking in but are never
//! granted v3: they stay on v1 and never write it.
//!
//! Needs the `update-agent` and `update-server` binaries of the same profile.

use std::time::Instant;

use anyhow::{Result, bail, ensure};
use twinroot_e2e::{BOOT_TIMEOUT, Lab, UpdateServer, agent_image, poll_until};
use twinroot_qemu::harness::{Host, SigningSetup, guest_url};
use twinroot_qemu::rootfs::{AgentImageConfig, ExtraFile};

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");
const HOSTS: usize = 3;

#[test]
fn bad_release_halts_the_rollout_after_one_failure_and_the_others_stay_on_v1() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");
    let v1 = agent_image(&lab, &keys, &agent, "1.0.0", vec![])?;
    let v3 = agent_image(
        &lab,
        &keys,
        &agent,
        "3.0.0",
        vec![ExtraFile::required_check(
            "50-app",
            "echo app of v3 does not start; exit 1",
        )],
    )?;
    server.publish(&keys, &v3, "3.0.0", "stable")?;
    server.cli(
        &["rollout", "set"],
        &[
            "stable",
            "--max-in-flight",
            "1",
            "--halt-failure-percent",
            "1",
            "--halt-min-reports",
            "1",
        ],
    )?;

    let started = Instant::now();
    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let name = format!("host{i}");
        let disk = lab.disk_on(&name, &v1)?;
        hosts.push((Host::start(lab.kit.host(&name, &disk))?, disk));
    }
    for (host, _) in &mut hosts {
        host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    }

    // The rollout pauses once the granted host has reported its failure.
    let rollout = poll_until(
        BOOT_TIMEOUT,
        "the rollout of 3.0.0 never paused",
        || {
            let v: serde_json::Value =
                serde_json::from_str(&server.cli(&["rollout", "show"], &["stable", "--json"])?)?;
            Ok((v["paused"] == true).then_some(v))
        },
        || {
            format!(
                "{:?}\nserver log:\n{}",
                server.cli(&["rollout", "show"], &["stable"]).ok(),
                server.service.log_text()
            )
        },
    )?;
    let paused = started.elapsed();
    let reason = rollout["pause_reason"].as_str().unwrap_or_default();
    ensure!(!reason.is_empty(), "paused without a reason: {rollout}");
    let shown = server.cli(&["rollout", "show"], &["stable"])?;
    ensure!(shown.contains("PAUSED"), "rollout show: {shown}");

    // Exactly one host was granted v3: it staged it, failed the check and is back on v1.
    let staged: Vec<usize> = (0..HOSTS)
        .filter(|&i| hosts[i].0.count("update staged version=3.0.0") > 0)
        .collect();
    let [failed] = staged[..] else {
        bail!("expected exactly one host to install v3 before the halt, got hosts {staged:?}");
    };
    {
        let host = &mut hosts[failed].0;
        host.wait_for("check failed check=50-app", BOOT_TIMEOUT)?;
        host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
    }

    // The others keep checking in after the halt and are never granted v3.
    for (i, (host, _)) in hosts.iter_mut().enumerate() {
        if i != failed {
            for _ in 0..3 {
                host.wait_for("update check outcome=", BOOT_TIMEOUT)?;
            }
        }
    }
    // The server sees all three on 1.0.0 (the failed host once it checked in again after its
    // revert), with one failure of 3.0.0.
    let list = poll_until(
        BOOT_TIMEOUT,
        "the server never showed the three hosts on 1.0.0 with one failure of 3.0.0",
        || {
            let list = server.instances()?;
            let a = list.as_array().cloned().unwrap_or_default();
            let done = a.len() == HOSTS
                && a.iter().all(|i| i["version"] == "1.0.0")
                && a.iter().filter(|i| i["failed_version"] == "3.0.0").count() == 1;
            Ok(done.then_some(a))
        },
        || format!("{:?}", server.instances().ok()),
    )?;
    for i in &list {
        if i["failed_version"] != "3.0.0" {
            ensure!(
                i["target_version"] != "3.0.0" && i["granted_at"].is_null(),
                "a host that did not fail was granted 3.0.0 after the halt: {i}"
            );
        }
    }
    let activity = server.cli(&["activity"], &[])?;
    ensure!(
        activity.contains("rollout_halted"),
        "no rollout_halted in the activity log:\n{activity}"
    );
    eprintln!(
        "rollout of 3.0.0 paused {:.1} s after start ({reason}); activity:\n{activity}",
        paused.as_secs_f64()
    );
    for (i, (host, disk)) in hosts.into_iter().enumerate() {
        if i != failed {
            ensure!(
                host.count("update staged version=3.0.0") == 0,
                "host{i} installed v3 after the halt"
            );
        }
        host.stop()?;
        let a = disk.slots()?[0].attrs;
        ensure!(a.successful && a.is_bootable(), "host{i} slot a: {a}");
    }
    Ok(())
}
