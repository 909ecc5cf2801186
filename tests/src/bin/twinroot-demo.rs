//! `twinroot-demo`: the README's first command (`./scripts/demo` builds and execs it).
//!
//! Starts etcd, the reboot-coordinator and the update-server on free loopback ports with their
//! data in `./.demo/`, boots three QEMU hosts (TCG) on the channels alpha, beta and stable running
//! 1.0.0, then publishes 2.0.0 and promotes it alpha -> beta -> stable, each promotion waiting until
//! the previous channel's host is Complete on 2.0.0. The hosts reboot through the coordinator
//! (FleetLock, one reboot slot). Progress lines go to stdout; Ctrl-C (SIGINT) or SIGTERM stops
//! every VM and service. See docs/DEMO.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use twinroot_e2e::{Coordinator, UpdateServer, run_cli};
use twinroot_format::slot::SlotName;
use twinroot_qemu::harness::{
    BootKit, GOOD, Host, HostDisk, SigningSetup, guest_url, workspace_binary,
};
use twinroot_qemu::rootfs::{AgentImageConfig, AgentSpec, ExtraFile};

/// The channels, in promotion order; one host per channel, named after it.
const CHANNELS: [&str; 3] = ["alpha", "beta", "stable"];
const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";
/// Longest wait for one step (a boot, one channel's update) before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// Marks a work directory as the demo's, so a rerun may empty it.
const MARKER: &str = ".twinroot-demo";

const USAGE: &str = "usage: twinroot-demo [--exit-when-done] [--work-dir DIR]

Boots three QEMU hosts (alpha, beta, stable) on 1.0.0 next to a real etcd, reboot-coordinator
and update-server, then promotes 2.0.0 through the channels. Keeps running until Ctrl-C, unless
--exit-when-done (or DEMO_EXIT=1) is given: then it stops everything after stable is done.
Work directory (logs, disks, server data): ./.demo (DEMO_DIR), emptied at start.";

struct Options {
    exit_when_done: bool,
    work_dir: PathBuf,
}

fn parse_options() -> Result<Options> {
    let mut opts = Options {
        exit_when_done: std::env::var("DEMO_EXIT").is_ok_and(|v| v == "1"),
        work_dir: std::env::var_os("DEMO_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".demo")),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exit-when-done" => opts.exit_when_done = true,
            "--work-dir" => {
                opts.work_dir = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow!("--work-dir needs a directory"))?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(opts)
}

/// Returned when SIGINT/SIGTERM asked the demo to stop.
#[derive(Debug)]
struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Progress lines with the time since the demo started.
struct Progress {
    started: Instant,
}

impl Progress {
    fn say(&self, msg: impl fmt::Display) {
        let s = self.started.elapsed().as_secs();
        println!("[{:>2}:{:02}] {msg}", s / 60, s % 60);
    }
}

fn main() {
    let opts = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("twinroot-demo: {e:#}");
            std::process::exit(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("twinroot-demo: cannot handle signal {sig}: {e}");
            std::process::exit(1);
        }
    }
    let progress = Progress {
        started: Instant::now(),
    };
    let result = run(&opts, &stop, &progress);
    // Every VM and service was stopped when `run` returned (their handles were dropped).
    let interrupted = stop.load(Ordering::SeqCst);
    if interrupted {
        progress.say("stopped: VMs, update-server, reboot-coordinator and etcd are down");
    }
    match result {
        // Ctrl-C after the rollout finished is the normal end of the demo.
        Ok(()) => {}
        Err(_) if interrupted => std::process::exit(130),
        Err(e) => {
            eprintln!("twinroot-demo: {e:#}");
            eprintln!(
                "twinroot-demo: logs (consoles, services) are in {}",
                opts.work_dir.display()
            );
            std::process::exit(1);
        }
    }
}

/// Empties (or creates) the demo's work directory; refuses to empty a directory that is not
/// the demo's.
fn prepare_work_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        let ours = dir.join(MARKER).exists()
            || std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .next()
                .is_none();
        if !ours {
            bail!(
                "{} exists and is not a demo work directory (no {MARKER}); remove it or pass \
                 --work-dir",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "twinroot demo work directory\n")?;
    std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))
}

/// channel -> instance (one host per channel in the demo).
fn instances(server: &UpdateServer) -> Result<BTreeMap<String, Instance>> {
    let list: serde_json::Value = serde_json::from_str(&server.cli(&["instances"], &["--json"])?)
        .context("update-server instances --json: not JSON")?;
    let mut out = BTreeMap::new();
    for i in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let text = |k: &str| i[k].as_str().unwrap_or_default().to_string();
        out.insert(
            text("channel"),
            Instance {
                machine_id: text("machine_id"),
                version: text("version"),
                status: text("status"),
            },
        );
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
struct Instance {
    machine_id: String,
    version: String,
    status: String,
}

impl Instance {
    fn complete_on(&self, version: &str) -> bool {
        self.version == version && self.status.eq_ignore_ascii_case("complete")
    }
}

/// The recent-activity lines of `reboot-coordinator status`: (event, machine id).
fn activity(coordinator: &Coordinator) -> Result<Vec<(String, String, String)>> {
    let status = run_cli(
        "reboot-coordinator",
        &[
            "status",
            "--etcd",
            &coordinator.etcd_endpoint,
            "--activity",
            "100",
        ],
    )?;
    Ok(status
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let at = w.next()?.parse::<u64>().ok()?;
            let event = w.next()?.to_string();
            let id = l.split_whitespace().find_map(|x| x.strip_prefix("id="))?;
            Some((at.to_string(), event, id.to_string()))
        })
        .collect())
}

/// One demo host: a QEMU VM whose agent follows `channel`.
struct DemoHost {
    channel: &'static str,
    host: Host,
    _disk: HostDisk,
    /// How much of the console was already scanned for progress lines.
    seen: usize,
}

/// The boot hook that makes one image serve every channel: the host's channel comes from the
/// kernel command line (`twinroot.track=beta`) and becomes an agent drop-in in /run, which
/// overrides the image's configuration.
const TRACK_HOOK: &str = r#"t=
for w in $(cat /proc/cmdline); do
  case "$w" in twinroot.track=*) t="${w#twinroot.track=}" ;; esac
done
if [ -n "$t" ]; then
  mkdir -p /run/twinroot/agent.d
  printf '[server]\ntrack = "%s"\n' "$t" > /run/twinroot/agent.d/20-track.toml
  echo "twinroot: channel $t"
fi"#;

fn build_image(
    kit: &BootKit,
    keys: &SigningSetup,
    agent: &AgentImageConfig,
    version: &str,
) -> Result<PathBuf> {
    let mut spec = kit.rootfs(version);
    spec.include_kernel = false;
    spec.keyring = Some(std::fs::read(&keys.keyring)?);
    spec.agent = Some(AgentSpec {
        binary: workspace_binary("update-agent")?,
        args: vec!["daemon".into()],
        config: agent.to_toml(),
    });
    spec.files
        .push(ExtraFile::boot_hook("10-channel", TRACK_HOOK));
    kit.image(&format!("v{version}"), &spec)
}

/// What the demo watches while it waits: the hosts' consoles, the server's instances and the
/// coordinator's activity; each change is printed once.
struct Observer<'a> {
    progress: &'a Progress,
    stop: &'a AtomicBool,
    server: &'a UpdateServer,
    coordinator: &'a Coordinator,
    instances: BTreeMap<String, Instance>,
    activity_seen: HashSet<(String, String, String)>,
    last_activity_poll: Option<Instant>,
}

impl Observer<'_> {
    fn check_stop(&self) -> Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        Ok(())
    }

    fn poll(&mut self, hosts: &mut [DemoHost]) -> Result<()> {
        self.check_stop()?;
        for h in hosts.iter_mut() {
            let text = h.host.console_text();
            let fresh = &text[h.seen..];
            let complete = fresh.rfind('\n').map_or(0, |i| i + 1);
            for line in fresh[..complete].lines() {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("twinroot: booted version ") {
                    self.progress.say(format!("{:<6} booted {rest}", h.channel));
                } else if line.contains("twinroot-boot: no bootable slot")
                    || line.contains("Kernel panic")
                {
                    self.progress
                        .say(format!("{:<6} console: {line}", h.channel));
                }
            }
            h.seen += complete;
        }
        let now = instances(self.server)?;
        for (channel, inst) in &now {
            if self.instances.get(channel) != Some(inst) {
                self.progress.say(format!(
                    "{channel:<6} server: {} on {}",
                    inst.status,
                    if inst.version.is_empty() {
                        "?"
                    } else {
                        &inst.version
                    }
                ));
            }
        }
        self.instances = now;
        if self
            .last_activity_poll
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
        {
            self.last_activity_poll = Some(Instant::now());
            let names: HashMap<&str, &str> = self
                .instances
                .iter()
                .map(|(c, i)| (i.machine_id.as_str(), c.as_str()))
                .collect();
            for entry in activity(self.coordinator)? {
                if self.activity_seen.insert(entry.clone()) {
                    let who = names.get(entry.2.as_str()).copied().unwrap_or(&entry.2);
                    let what = match entry.1.as_str() {
                        "granted" => "took the reboot slot".to_string(),
                        "released" => "gave the reboot slot back".to_string(),
                        other => other.to_string(),
                    };
                    self.progress.say(format!("{who:<6} coordinator: {what}"));
                }
            }
        }
        Ok(())
    }

    /// Polls until `done` holds for the instances, or fails after `STEP_TIMEOUT`.
    fn wait(
        &mut self,
        hosts: &mut [DemoHost],
        what: &str,
        done: impl Fn(&BTreeMap<String, Instance>) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            self.poll(hosts)?;
            if done(&self.instances) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not done after {} s; instances: {:?}\nupdate-server log: {}",
                    STEP_TIMEOUT.as_secs(),
                    self.instances,
                    self.server.service.config.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn run(opts: &Options, stop: &AtomicBool, progress: &Progress) -> Result<()> {
    let check = || -> Result<()> {
        if stop.load(Ordering::SeqCst) {
            return Err(Interrupted.into());
        }
        Ok(())
    };
    let work = prepare_work_dir(&opts.work_dir)?;
    progress.say(format!("work directory {}", work.display()));

    progress.say("building the boot kit (kernel, initramfs with the boot selector)");
    let kit = BootKit::build(&work, &workspace_binary("twinroot-e2e-boot")?)?;
    check()?;
    let keys_dir = work.join("keys");
    std::fs::create_dir_all(&keys_dir)?;
    let keys = SigningSetup::generate(&keys_dir)?;
    check()?;

    progress.say("starting etcd and the reboot-coordinator (1 reboot slot)");
    let coordinator = Coordinator::start_in(&work, 1)?;
    check()?;
    progress.say("starting the update-server");
    let server = UpdateServer::start_in(&work, &keys.keyring)?;
    check()?;

    let mut agent = AgentImageConfig::new(&guest_url(server.port, "/v1/update/"), "stable");
    agent.reboot_strategy = "coordinated".into();
    agent.fleetlock_url = Some(guest_url(coordinator.port, ""));
    progress.say(format!(
        "building root images {OLD} and {NEW} (squashfs, signed bundles)"
    ));
    let old = build_image(&kit, &keys, &agent, OLD)?;
    check()?;
    let new = build_image(&kit, &keys, &agent, NEW)?;
    check()?;
    let old_bundle = work.join(format!("v{OLD}.bundle"));
    keys.bundle(&old, OLD, &old_bundle)?;
    let new_bundle = work.join(format!("v{NEW}.bundle"));
    keys.bundle(&new, NEW, &new_bundle)?;
    check()?;

    progress.say(format!("publishing {OLD} on alpha, beta and stable"));
    server.upload(&old_bundle)?;
    for channel in CHANNELS {
        server.promote_in_order(OLD, channel)?;
    }

    let update_server = workspace_binary("update-server")?;
    println!();
    println!(
        "  dashboard:  {}/dashboard/   (admin token: {})",
        server.base, server.token
    );
    println!(
        "  terminal:   {} watch CHANNEL --server {} --token {}",
        update_server.display(),
        server.base,
        server.token
    );
    println!("              (CHANNEL = alpha, beta or stable; q to quit)");
    println!(
        "  logs:       {} (HOST.log = console, update-server.log, reboot-coordinator.log)",
        work.display()
    );
    println!("  stop:       Ctrl-C stops the VMs, the update-server, the coordinator and etcd");
    println!();

    let mut hosts = Vec::new();
    for channel in CHANNELS {
        let disk = kit.disk(channel)?;
        disk.write_slot(SlotName::A, &old)?;
        disk.set_attrs(SlotName::A, GOOD)?;
        let mut config = kit.host(channel, &disk);
        config.append.push(format!("twinroot.track={channel}"));
        progress.say(format!("{channel:<6} starting QEMU (TCG) on {OLD}, slot a"));
        hosts.push(DemoHost {
            channel,
            host: Host::start(config)?,
            _disk: disk,
            seen: 0,
        });
    }

    let mut observer = Observer {
        progress,
        stop,
        server: &server,
        coordinator: &coordinator,
        instances: BTreeMap::new(),
        activity_seen: HashSet::new(),
        last_activity_poll: None,
    };
    observer.wait(&mut hosts, "hosts checking in on 1.0.0", |i| {
        CHANNELS
            .iter()
            .all(|c| i.get(*c).is_some_and(|i| i.version == OLD))
    })?;
    progress.say(format!(
        "all three hosts run {OLD} and check in with the server"
    ));

    progress.say(format!("uploading release {NEW}"));
    server.upload(&new_bundle)?;
    let mut took = Vec::new();
    for channel in CHANNELS {
        observer.check_stop()?;
        progress.say(format!("promoting {NEW} to {channel}"));
        let promoted = Instant::now();
        server.promote_in_order(NEW, channel)?;
        observer.wait(&mut hosts, &format!("{channel} updating to {NEW}"), |i| {
            i.get(channel).is_some_and(|i| i.complete_on(NEW))
        })?;
        let secs = promoted.elapsed().as_secs_f64();
        progress.say(format!(
            "{channel:<6} is Complete on {NEW} ({secs:.0} s after the promotion)"
        ));
        took.push((channel, secs));
    }

    // A fresh look at the coordinator's activity (it is otherwise read every 2 s).
    observer.last_activity_poll = None;
    observer.poll(&mut hosts)?;
    println!();
    progress.say(format!(
        "done: {NEW} went alpha -> beta -> stable, every reboot through the coordinator"
    ));
    for (channel, secs) in &took {
        println!("  {channel:<6} promotion to Complete: {secs:.0} s");
    }
    let count = |event: &str| {
        observer
            .activity_seen
            .iter()
            .filter(|e| e.1 == event)
            .count()
    };
    println!(
        "  coordinator: {} reboot slot grants, {} releases (1 slot: one reboot at a time)",
        count("granted"),
        count("released")
    );
    println!("  total: {:.0} s", progress.started.elapsed().as_secs_f64());
    if opts.exit_when_done {
        progress.say("stopping the VMs, the update-server, the coordinator and etcd");
        shutdown(hosts, server, coordinator);
        progress.say("stopped");
        return Ok(());
    }
    progress.say(format!(
        "still running; dashboard {}/dashboard/ (token {}); Ctrl-C to stop",
        server.base, server.token
    ));
    loop {
        match observer.poll(&mut hosts) {
            Ok(()) => {}
            Err(e) if e.is::<Interrupted>() => break,
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    progress.say("Ctrl-C: stopping the VMs, the update-server, the coordinator and etcd");
    shutdown(hosts, server, coordinator);
    Ok(())
}

/// Stops the VMs first, then the server, the coordinator and etcd.
fn shutdown(hosts: Vec<DemoHost>, server: UpdateServer, coordinator: Coordinator) {
    for h in hosts {
        let _ = h.host.stop();
    }
    let _ = server.service.stop();
    let _ = coordinator.service.stop();
    let _ = coordinator.etcd.stop();
}
