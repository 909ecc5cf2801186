//! Scenario 5 (coordination): three hosts on v1, one reboot slot (reboot-coordinator on etcd,
//! `--default-slots 1`), v2 promoted to their channel. All three download v2 at once, but they
//! reboot one after the other: at no time do two hosts hold the slot (the coordinator's activity
//! log) or reboot together (each host's console window from the agent's `rebooting` line to the
//! v2 version line, timed from the test), and all three end Complete on v2 with the slot free.
//!
//! Needs the `update-agent`, `update-server` and `reboot-coordinator` binaries of the same
//! profile.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use twinroot_e2e::{BOOT_TIMEOUT, Coordinator, Lab, UpdateServer, agent_image, poll_until};
use twinroot_qemu::harness::{Host, SigningSetup, guest_url};
use twinroot_qemu::rootfs::AgentImageConfig;

const SELECTOR: &str = env!("CARGO_BIN_EXE_twinroot-e2e-boot");
const HOSTS: usize = 3;
/// The last host waits for the two others' whole reboot cycles before its turn.
const TURN_TIMEOUT: Duration = Duration::from_secs(480);

/// One host's reboot, as the test saw it on the console.
struct Window {
    name: String,
    /// The agent's `rebooting` line (it holds the slot by then).
    reboot: Instant,
    /// `twinroot: booted version 2.0.0 slot b`.
    up: Instant,
}

#[test]
fn three_hosts_one_slot_reboot_one_at_a_time_and_all_reach_v2() -> Result<()> {
    let lab = Lab::new(SELECTOR)?;
    let keys = SigningSetup::generate(lab.path())?;
    let server = UpdateServer::start(&lab, &keys.keyring)?;
    let coordinator = Coordinator::start(&lab, 1)?;
    let mut agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");
    agent.reboot_strategy = "coordinated".into();
    agent.fleetlock_url = Some(guest_url(coordinator.port, ""));
    let v1 = agent_image(&lab, &keys, &agent, "1.0.0", vec![])?;
    let v2 = agent_image(&lab, &keys, &agent, "2.0.0", vec![])?;
    server.publish(&keys, &v2, "2.0.0", "stable")?;

    let mut hosts = Vec::new();
    for i in 0..HOSTS {
        let name = format!("host{i}");
        let disk = lab.disk_on(&name, &v1)?;
        hosts.push((name.clone(), disk.clone(), lab.kit.host(&name, &disk)));
    }
    let started = Instant::now();
    let results: Vec<Result<(Window, Host)>> = std::thread::scope(|s| {
        let handles: Vec<_> = hosts
            .iter()
            .map(|(name, _, config)| {
                s.spawn(move || -> Result<(Window, Host)> {
                    let mut host = Host::start(config.clone())?;
                    host.wait_for("twinroot: booted version 1.0.0 slot a", BOOT_TIMEOUT)?;
                    host.wait_for("update staged version=2.0.0", BOOT_TIMEOUT)?;
                    host.wait_for("rebooting", TURN_TIMEOUT)?;
                    let reboot = Instant::now();
                    host.wait_for("twinroot: booted version 2.0.0 slot b", BOOT_TIMEOUT)?;
                    let up = Instant::now();
                    Ok((
                        Window {
                            name: name.clone(),
                            reboot,
                            up,
                        },
                        host,
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("host thread panicked"))
            .collect()
    });
    let mut windows = Vec::new();
    let mut running = Vec::new();
    for r in results {
        let (w, h) = r?;
        windows.push(w);
        running.push(h);
    }
    let all_v2 = started.elapsed();

    // Console: the reboot windows do not overlap.
    windows.sort_by_key(|w| w.reboot);
    for pair in windows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.up <= b.reboot,
            "{} rebooted {:.1} s after start while {} was still rebooting (up at {:.1} s)",
            b.name,
            (b.reboot - started).as_secs_f64(),
            a.name,
            (a.up - started).as_secs_f64()
        );
    }
    for w in &windows {
        eprintln!(
            "{}: reboot window {:.1} s - {:.1} s",
            w.name,
            (w.reboot - started).as_secs_f64(),
            (w.up - started).as_secs_f64()
        );
    }

    // Server: all three Complete on 2.0.0.
    poll_until(
        BOOT_TIMEOUT,
        "server never showed the three hosts Complete on 2.0.0",
        || {
            let list = server.instances()?;
            let done = list.as_array().is_some_and(|a| {
                a.len() == HOSTS
                    && a.iter().all(|i| {
                        i["version"] == "2.0.0"
                            && i["status"]
                                .as_str()
                                .is_some_and(|s| s.eq_ignore_ascii_case("complete"))
                    })
            });
            Ok(done.then_some(()))
        },
        || format!("{:?}", server.instances().ok()),
    )?;
    let complete = started.elapsed();

    // Coordinator: every host was granted the slot once and released it; never two holders.
    let status = poll_until(
        BOOT_TIMEOUT,
        "the reboot slot was not given back by all three hosts",
        || {
            let s = coordinator.status()?;
            let released = s.lines().filter(|l| l.contains(" released ")).count();
            Ok((released >= HOSTS).then_some(s))
        },
        || coordinator.status().unwrap_or_default(),
    )?;
    check_one_holder_at_a_time(&status)?;
    eprintln!(
        "three hosts, one slot: all on v2 after {:.1} s, all Complete after {:.1} s",
        all_v2.as_secs_f64(),
        complete.as_secs_f64()
    );
    for h in running {
        h.stop()?;
    }
    for (name, disk, _) in &hosts {
        let b = disk.slots()?[1].attrs;
        assert!(b.successful && b.is_bootable(), "{name} slot b: {b}");
    }
    Ok(())
}

/// Replays the activity log (`AT EVENT group=G id=ID ...` lines) in time order: a grant while
/// another id holds the slot is an error; each of the hosts must be granted and released.
fn check_one_holder_at_a_time(status: &str) -> Result<()> {
    let mut events: Vec<(u64, String, String)> = status
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let at = w.next()?.parse().ok()?;
            let event = w.next()?.to_string();
            let id = l
                .split_whitespace()
                .find_map(|x| x.strip_prefix("id="))?
                .to_string();
            Some((at, event, id))
        })
        .collect();
    events.sort_by_key(|e| e.0);
    let mut holder: Option<String> = None;
    let mut granted = std::collections::BTreeSet::new();
    let mut released = std::collections::BTreeSet::new();
    for (at, event, id) in &events {
        match event.as_str() {
            "granted" => {
                if let Some(h) = &holder
                    && h != id
                {
                    bail!("at {at} {id} was granted the slot while {h} held it:\n{status}");
                }
                holder = Some(id.clone());
                granted.insert(id.clone());
            }
            "released" => {
                if holder.as_ref() == Some(id) {
                    holder = None;
                }
                released.insert(id.clone());
            }
            "expired" if holder.as_ref() == Some(id) => holder = None,
            _ => {}
        }
    }
    if granted.len() != HOSTS || released.len() != HOSTS || holder.is_some() {
        bail!(
            "expected {HOSTS} hosts granted and released, got granted {granted:?}, released \
             {released:?}, holder {holder:?}:\n{status}"
        );
    }
    Ok(())
}
