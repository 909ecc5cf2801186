//! Agent configuration: TOML drop-in fragments merged into one validated [`Settings`].
//!
//! Fragments are `*.toml` files in the configuration roots (by default `/usr/lib/twinroot/agent.d`,
//! `/etc/twinroot/agent.d`, `/run/twinroot/agent.d`). A fragment in a later root masks the fragment
//! with the same file name in an earlier root; all surviving fragments are then applied in file
//! name order, each key overriding the same key of earlier fragments. Every fragment is checked on
//! its own (unknown keys, wrong types), and every semantic error names the file that set the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::Deserialize;
use twinroot_format::slot::SlotName;

/// The default configuration roots, earliest (lowest precedence) first.
pub const DEFAULT_ROOTS: [&str; 3] = [
    "/usr/lib/twinroot/agent.d",
    "/etc/twinroot/agent.d",
    "/run/twinroot/agent.d",
];

/// Omaha app id of the OS (the CoreOS one, so existing servers recognise us).
pub const DEFAULT_APP_ID: &str = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}";

/// A configuration error, naming the file and key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

/// Where configuration fragments are looked for.
#[derive(Debug, Clone)]
pub struct ConfigRoots {
    /// Directories, earliest (lowest precedence) first.
    pub dirs: Vec<PathBuf>,
    /// Extra files applied after all directories (the `--config` flag).
    pub extra_files: Vec<PathBuf>,
}

impl Default for ConfigRoots {
    fn default() -> Self {
        ConfigRoots {
            dirs: DEFAULT_ROOTS.iter().map(PathBuf::from).collect(),
            extra_files: Vec::new(),
        }
    }
}

impl ConfigRoots {
    /// Roots from `TWINROOT_AGENT_CONFIG_DIRS` (colon separated) when set, else the defaults.
    pub fn from_env() -> Self {
        match std::env::var_os("TWINROOT_AGENT_CONFIG_DIRS") {
            Some(v) => ConfigRoots {
                dirs: std::env::split_paths(&v).collect(),
                extra_files: Vec::new(),
            },
            None => ConfigRoots::default(),
        }
    }

    /// The fragments to apply, in order.
    pub fn fragments(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut by_name: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
        for dir in &self.dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Read {
                        file: dir.clone(),
                        source,
                    });
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Read {
                    file: dir.clone(),
                    source,
                })?;
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                    by_name.insert(entry.file_name(), path);
                }
            }
        }
        let mut files: Vec<PathBuf> = by_name.into_values().collect();
        files.extend(self.extra_files.iter().cloned());
        Ok(files)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw input: exactly what a fragment may contain. Every field optional, unknown keys rejected.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent: Option<RawAgent>,
    server: Option<RawServer>,
    checks: Option<RawChecks>,
    reboot: Option<RawReboot>,
    dbus: Option<RawDbus>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    disk: Option<String>,
    booted_slot: Option<String>,
    cmdline_path: Option<String>,
    state_dir: Option<String>,
    keyring: Option<String>,
    board: Option<String>,
    current_version: Option<String>,
    os_release: Option<String>,
    machine_id_path: Option<String>,
    allow_downgrade: Option<bool>,
    tries: Option<i64>,
    checkpoint_mib: Option<i64>,
    readback_from_medium: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    url: Option<String>,
    app_id: Option<String>,
    track: Option<String>,
    first_check_min_secs: Option<i64>,
    first_check_max_secs: Option<i64>,
    interval_secs: Option<i64>,
    jitter_secs: Option<i64>,
    max_backoff_secs: Option<i64>,
    download_retries: Option<i64>,
    timeout_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChecks {
    dir: Option<String>,
    timeout_secs: Option<i64>,
    server_reachable: Option<bool>,
    server_reachable_grace_secs: Option<i64>,
    system_not_degraded: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReboot {
    strategy: Option<String>,
    method: Option<String>,
    fleetlock_url: Option<String>,
    group: Option<String>,
    window: Option<Vec<RawWindow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Vec<String>,
    start: String,
    length_minutes: i64,
    time_zone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDbus {
    bus: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated settings.

/// How the agent knows which slot it booted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootedSlotSource {
    /// Read `twinroot.slot=` from the kernel command line at this path.
    Cmdline(PathBuf),
    Fixed(SlotName),
}

#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub disk: PathBuf,
    pub booted_slot: BootedSlotSource,
    pub state_dir: PathBuf,
    pub keyring: PathBuf,
    pub board: Option<String>,
    pub current_version: Option<semver::Version>,
    pub os_release: PathBuf,
    pub machine_id_path: PathBuf,
    pub allow_downgrade: bool,
    pub tries: u8,
    /// Image bytes between two persisted download checkpoints.
    pub checkpoint_bytes: u64,
    /// Read the written slot back from the device, not the page cache.
    pub readback_from_medium: bool,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Omaha endpoint (`.../v1/update/`); `None` means the agent never polls.
    pub url: Option<String>,
    pub app_id: String,
    pub track: String,
    pub first_check_min: Duration,
    pub first_check_max: Duration,
    pub interval: Duration,
    pub jitter: Duration,
    pub max_backoff: Duration,
    pub download_retries: u32,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CheckSettings {
    /// Holds `required.d/` and `wanted.d/`.
    pub dir: PathBuf,
    pub timeout: Duration,
    pub server_reachable: bool,
    /// How long an unreachable update server keeps a new boot pending before it counts as bad.
    pub server_reachable_grace: Duration,
    pub system_not_degraded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootStrategy {
    /// Reboot as soon as an update is staged (inside a window, if windows are configured).
    Immediate,
    /// Take a FleetLock slot before rebooting; release it once the new boot is healthy.
    Coordinated,
    /// Stage and wait for an operator.
    Off,
}

impl fmt::Display for RebootStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RebootStrategy::Immediate => "immediate",
            RebootStrategy::Coordinated => "coordinated",
            RebootStrategy::Off => "off",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMethod {
    /// logind over D-Bus when reachable, else sync + reboot(2).
    Auto,
    Logind,
    Syscall,
}

/// A recurring maintenance window: on `days`, from `start` for `length`, in `time_zone`.
#[derive(Debug, Clone)]
pub struct MaintenanceWindow {
    pub days: Vec<Weekday>,
    pub start: Time,
    pub length: Duration,
    pub time_zone: TimeZone,
}

#[derive(Debug, Clone)]
pub struct RebootSettings {
    pub strategy: RebootStrategy,
    pub method: RebootMethod,
    pub fleetlock_url: Option<String>,
    pub group: String,
    /// Empty: any time.
    pub windows: Vec<MaintenanceWindow>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    System,
    Session,
    /// A bus address (`unix:path=...`).
    Address(String),
    None,
}

impl std::str::FromStr for BusChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "system" => Ok(BusChoice::System),
            "session" => Ok(BusChoice::Session),
            "none" => Ok(BusChoice::None),
            addr if addr.contains(':') && addr.contains('=') => {
                Ok(BusChoice::Address(addr.to_string()))
            }
            other => Err(format!(
                "unknown bus {other:?} (expected system, session, none or a bus address)"
            )),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub agent: AgentSettings,
    pub server: ServerSettings,
    pub checks: CheckSettings,
    pub reboot: RebootSettings,
    pub bus: BusChoice,
}

/// Loads and validates the configuration from `roots`.
pub fn load(roots: &ConfigRoots) -> Result<Settings, ConfigError> {
    let files = roots.fragments()?;
    let mut fragments = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        fragments.push((file.display().to_string(), text));
    }
    let refs: Vec<(&str, &str)> = fragments
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    from_fragments(&refs)
}

/// Merges and validates fragments given as (name, TOML text), in order of application.
pub fn from_fragments(fragments: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let mut merged = toml::Table::new();
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    for (name, text) in fragments {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: PathBuf::from(name),
            message: e.to_string().trim_end().to_string(),
        })?;
        // Check the fragment on its own so unknown keys and wrong types name this file.
        RawConfig::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
            ConfigError::Parse {
                file: PathBuf::from(name),
                message: e.to_string().trim_end().to_string(),
            }
        })?;
        merge(&mut merged, table, "", name, &mut origins);
    }
    let raw =
        RawConfig::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Parse {
            file: PathBuf::from("(merged configuration)"),
            message: e.to_string(),
        })?;
    validate(raw, &Origins(origins))
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    file: &str,
    origins: &mut BTreeMap<String, String>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => {
                merge(existing, new, &path, file, origins);
            }
            (None, toml::Value::Table(new)) => {
                let mut fresh = toml::Table::new();
                merge(&mut fresh, new, &path, file, origins);
                into.insert(key, toml::Value::Table(fresh));
            }
            (_, value) => {
                origins.insert(path, file.to_string());
                into.insert(key, value);
            }
        }
    }
}

struct Origins(BTreeMap<String, String>);

impl Origins {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self
                .0
                .get(key)
                .cloned()
                .unwrap_or_else(|| "(built-in default)".to_string()),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn secs(&self, key: &str, v: Option<i64>, default: u64) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(Duration::from_secs(default)),
            Some(n) if n >= 0 => Ok(Duration::from_secs(n as u64)),
            Some(n) => Err(self.err(key, format!("must be zero or positive, got {n}"))),
        }
    }

    fn nonempty(&self, key: &str, v: Option<String>, default: &str) -> Result<String, ConfigError> {
        let v = v.unwrap_or_else(|| default.to_string());
        if v.trim().is_empty() {
            return Err(self.err(key, "must not be empty"));
        }
        Ok(v)
    }
}

fn validate(raw: RawConfig, o: &Origins) -> Result<Settings, ConfigError> {
    let a = raw.agent.unwrap_or_default();
    let booted_slot = match a.booted_slot.as_deref() {
        None | Some("auto") => BootedSlotSource::Cmdline(PathBuf::from(
            a.cmdline_path.as_deref().unwrap_or("/proc/cmdline"),
        )),
        Some(s) => BootedSlotSource::Fixed(s.parse().map_err(|_| {
            o.err(
                "agent.booted_slot",
                format!("unknown slot {s:?} (expected \"a\", \"b\" or \"auto\")"),
            )
        })?),
    };
    let tries = match a.tries {
        None => 1,
        Some(n @ 1..=15) => n as u8,
        Some(n) => return Err(o.err("agent.tries", format!("must be 1 to 15, got {n}"))),
    };
    let current_version = match a.current_version {
        None => None,
        Some(v) => Some(semver::Version::parse(&v).map_err(|e| {
            o.err(
                "agent.current_version",
                format!("{v:?} is not a semantic version: {e}"),
            )
        })?),
    };
    let agent = AgentSettings {
        disk: PathBuf::from(o.nonempty("agent.disk", a.disk, "/dev/vda")?),
        booted_slot,
        state_dir: PathBuf::from(o.nonempty(
            "agent.state_dir",
            a.state_dir,
            "/var/lib/twinroot-agent",
        )?),
        keyring: PathBuf::from(o.nonempty(
            "agent.keyring",
            a.keyring,
            "/usr/lib/twinroot/keyring.json",
        )?),
        board: a.board.filter(|b| !b.is_empty()),
        current_version,
        os_release: PathBuf::from(a.os_release.as_deref().unwrap_or("/etc/os-release")),
        machine_id_path: PathBuf::from(a.machine_id_path.as_deref().unwrap_or("/etc/machine-id")),
        allow_downgrade: a.allow_downgrade.unwrap_or(false),
        tries,
        readback_from_medium: a.readback_from_medium.unwrap_or(true),
        checkpoint_bytes: match a.checkpoint_mib {
            None => crate::apply::CHECKPOINT_EVERY,
            Some(n @ 1..=65536) => n as u64 * 1024 * 1024,
            Some(n) => {
                return Err(o.err(
                    "agent.checkpoint_mib",
                    format!("must be 1 to 65536, got {n}"),
                ));
            }
        },
    };

    let s = raw.server.unwrap_or_default();
    if let Some(url) = &s.url {
        check_http_url(o, "server.url", url)?;
    }
    let first_check_min = o.secs("server.first_check_min_secs", s.first_check_min_secs, 120)?;
    let first_check_max = o.secs("server.first_check_max_secs", s.first_check_max_secs, 720)?;
    if first_check_max < first_check_min {
        return Err(o.err(
            "server.first_check_max_secs",
            "must not be below server.first_check_min_secs",
        ));
    }
    let interval = o.secs("server.interval_secs", s.interval_secs, 2700)?;
    if interval.is_zero() {
        return Err(o.err("server.interval_secs", "must be at least 1"));
    }
    let max_backoff = o.secs("server.max_backoff_secs", s.max_backoff_secs, 4 * 3600)?;
    let download_retries = match s.download_retries {
        None => 8,
        Some(n @ 0..=1000) => n as u32,
        Some(n) => {
            return Err(o.err(
                "server.download_retries",
                format!("must be 0 to 1000, got {n}"),
            ));
        }
    };
    let server = ServerSettings {
        url: s.url,
        app_id: o.nonempty("server.app_id", s.app_id, DEFAULT_APP_ID)?,
        track: o.nonempty("server.track", s.track, "stable")?,
        first_check_min,
        first_check_max,
        interval,
        jitter: o.secs("server.jitter_secs", s.jitter_secs, 300)?,
        max_backoff,
        download_retries,
        timeout: o.secs("server.timeout_secs", s.timeout_secs, 60)?,
    };

    let c = raw.checks.unwrap_or_default();
    let checks = CheckSettings {
        dir: PathBuf::from(c.dir.as_deref().unwrap_or("/etc/twinroot/check")),
        timeout: o.secs("checks.timeout_secs", c.timeout_secs, 60)?,
        server_reachable: c.server_reachable.unwrap_or(true),
        server_reachable_grace: o.secs(
            "checks.server_reachable_grace_secs",
            c.server_reachable_grace_secs,
            300,
        )?,
        system_not_degraded: c.system_not_degraded.unwrap_or(true),
    };

    let r = raw.reboot.unwrap_or_default();
    let strategy = match r.strategy.as_deref().unwrap_or("immediate") {
        "immediate" => RebootStrategy::Immediate,
        "coordinated" => RebootStrategy::Coordinated,
        "off" => RebootStrategy::Off,
        other => {
            return Err(o.err(
                "reboot.strategy",
                format!("unknown strategy {other:?} (expected immediate, coordinated or off)"),
            ));
        }
    };
    let method = match r.method.as_deref().unwrap_or("auto") {
        "auto" => RebootMethod::Auto,
        "logind" => RebootMethod::Logind,
        "syscall" => RebootMethod::Syscall,
        other => {
            return Err(o.err(
                "reboot.method",
                format!("unknown method {other:?} (expected auto, logind or syscall)"),
            ));
        }
    };
    if let Some(url) = &r.fleetlock_url {
        check_http_url(o, "reboot.fleetlock_url", url)?;
    }
    if strategy == RebootStrategy::Coordinated && r.fleetlock_url.is_none() {
        return Err(o.err(
            "reboot.fleetlock_url",
            "required when reboot.strategy is \"coordinated\"",
        ));
    }
    let group = r
        .group
        .unwrap_or_else(|| twinroot_format::fleetlock::DEFAULT_GROUP.to_string());
    twinroot_format::fleetlock::validate_group(&group)
        .map_err(|e| o.err("reboot.group", e.to_string()))?;
    let mut windows = Vec::new();
    for (i, w) in r.window.unwrap_or_default().into_iter().enumerate() {
        windows.push(validate_window(o, i, w)?);
    }
    let reboot = RebootSettings {
        strategy,
        method,
        fleetlock_url: r.fleetlock_url,
        group,
        windows,
    };

    let bus = match raw.dbus.and_then(|d| d.bus).as_deref() {
        None | Some("system") => BusChoice::System,
        Some("session") => BusChoice::Session,
        Some("none") => BusChoice::None,
        Some(addr) if addr.contains(':') && addr.contains('=') => {
            BusChoice::Address(addr.to_string())
        }
        Some(other) => {
            return Err(o.err(
                "dbus.bus",
                format!("unknown bus {other:?} (expected system, session, none or a bus address)"),
            ));
        }
    };
    Ok(Settings {
        agent,
        server,
        checks,
        reboot,
        bus,
    })
}

fn check_http_url(o: &Origins, key: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(u) => Err(o.err(
            key,
            format!("{url:?}: scheme {:?} is not http or https", u.scheme()),
        )),
        Err(e) => Err(o.err(key, format!("{url:?} is not a URL: {e}"))),
    }
}

fn validate_window(o: &Origins, i: usize, w: RawWindow) -> Result<MaintenanceWindow, ConfigError> {
    let key = |k: &str| format!("reboot.window[{i}].{k}");
    let err = |k: &str, m: String| {
        let mut e = o.err("reboot.window", m);
        if let ConfigError::Invalid { key: kk, .. } = &mut e {
            *kk = key(k);
        }
        e
    };
    if w.days.is_empty() {
        return Err(err("days", "must name at least one day".into()));
    }
    let mut days = Vec::new();
    for d in &w.days {
        days.push(parse_weekday(d).ok_or_else(|| {
            err(
                "days",
                format!("unknown day {d:?} (expected Mon, Tue, Wed, Thu, Fri, Sat or Sun)"),
            )
        })?);
    }
    let start: Time = w.start.parse().map_err(|e| {
        err(
            "start",
            format!("{:?} is not a time like \"22:30\": {e}", w.start),
        )
    })?;
    if !(1..=7 * 24 * 60).contains(&w.length_minutes) {
        return Err(err(
            "length_minutes",
            format!("must be 1 to 10080, got {}", w.length_minutes),
        ));
    }
    let tz_name = w.time_zone.as_deref().unwrap_or("UTC");
    let time_zone = parse_time_zone(tz_name)
        .map_err(|e| err("time_zone", format!("unknown time zone {tz_name:?}: {e}")))?;
    Ok(MaintenanceWindow {
        days,
        start,
        length: Duration::from_secs(w.length_minutes as u64 * 60),
        time_zone,
    })
}

fn parse_weekday(s: &str) -> Option<Weekday> {
    Some(match s.to_ascii_lowercase().get(..3)? {
        "mon" => Weekday::Monday,
        "tue" => Weekday::Tuesday,
        "wed" => Weekday::Wednesday,
        "thu" => Weekday::Thursday,
        "fri" => Weekday::Friday,
        "sat" => Weekday::Saturday,
        "sun" => Weekday::Sunday,
        _ => return None,
    })
}

/// `UTC`, a fixed offset like `+02:00`, or an IANA name from the system database.
fn parse_time_zone(s: &str) -> Result<TimeZone, String> {
    if s.eq_ignore_ascii_case("utc") {
        return Ok(TimeZone::UTC);
    }
    if let Some(rest) = s.strip_prefix('+').or_else(|| s.strip_prefix('-')) {
        let neg = s.starts_with('-');
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        let h: i32 = h.parse().map_err(|_| "bad hour in offset".to_string())?;
        let m: i32 = m.parse().map_err(|_| "bad minute in offset".to_string())?;
        if h > 25 || m > 59 {
            return Err("offset out of range".into());
        }
        let secs = (h * 3600 + m * 60) * if neg { -1 } else { 1 };
        let off = jiff::tz::Offset::from_seconds(secs).map_err(|e| e.to_string())?;
        return Ok(TimeZone::fixed(off));
    }
    TimeZone::get(s).map_err(|e| e.to_string())
}

/// Reads `twinroot.slot=` from a kernel command line.
pub fn slot_from_cmdline(cmdline: &str) -> Option<SlotName> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("twinroot.slot="))
        .next_back()
        .and_then(|v| v.parse().ok())
}

/// Resolves the booted slot from the configured source.
pub fn booted_slot(source: &BootedSlotSource) -> anyhow::Result<SlotName> {
    match source {
        BootedSlotSource::Fixed(s) => Ok(*s),
        BootedSlotSource::Cmdline(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("{}: cannot read kernel command line: {e}", path.display())
            })?;
            slot_from_cmdline(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no twinroot.slot=a|b on the kernel command line; set agent.booted_slot or pass --booted-slot",
                    path.display()
                )
            })
        }
    }
}

/// Reads `VERSION_ID` (or `VERSION`) from an os-release file.
pub fn version_from_os_release(path: &Path) -> Option<semver::Version> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut found = None;
    for line in text.lines() {
        for key in ["VERSION_ID=", "VERSION="] {
            if let Some(v) = line.strip_prefix(key) {
                let v = v.trim().trim_matches('"');
                if let Ok(ver) = semver::Version::parse(v)
                    && (key == "VERSION_ID=" || found.is_none())
                {
                    found = Some(ver);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(fragments: &[(&str, &str)], expected: &[&str]) {
        let err = from_fragments(fragments).unwrap_err().to_string();
        for e in expected {
            assert!(err.contains(e), "error {err:?} should contain {e:?}");
        }
    }

    #[test]
    fn defaults_without_fragments() {
        let s = from_fragments(&[]).unwrap();
        assert_eq!(s.agent.disk, PathBuf::from("/dev/vda"));
        assert_eq!(
            s.agent.booted_slot,
            BootedSlotSource::Cmdline("/proc/cmdline".into())
        );
        assert_eq!(s.reboot.strategy, RebootStrategy::Immediate);
        assert_eq!(s.server.track, "stable");
        assert_eq!(s.agent.tries, 1);
        assert_eq!(s.bus, BusChoice::System);
    }

    #[test]
    fn later_fragments_override_earlier_keys_only() {
        let s = from_fragments(&[
            (
                "/usr/lib/twinroot/agent.d/00-base.toml",
                "[agent]\ndisk = \"/dev/sda\"\nboard = \"amd64-usr\"\n[server]\ntrack = \"beta\"\n",
            ),
            (
                "/etc/twinroot/agent.d/50-local.toml",
                "[agent]\ndisk = \"/dev/vdb\"\nbooted_slot = \"b\"\n",
            ),
        ])
        .unwrap();
        assert_eq!(s.agent.disk, PathBuf::from("/dev/vdb"));
        assert_eq!(s.agent.board.as_deref(), Some("amd64-usr"));
        assert_eq!(s.agent.booted_slot, BootedSlotSource::Fixed(SlotName::B));
        assert_eq!(s.server.track, "beta");
    }

    #[test]
    fn errors_name_file_and_key() {
        check_err(
            &[
                ("/etc/a.toml", "[reboot]\nstrategy = \"off\"\n"),
                ("/etc/b.toml", "[reboot]\nstrategy = \"sometimes\"\n"),
            ],
            &["/etc/b.toml", "reboot.strategy", "sometimes"],
        );
        check_err(
            &[("/etc/x.toml", "[agent]\ntries = 99\n")],
            &["/etc/x.toml", "agent.tries", "99"],
        );
        check_err(
            &[("/etc/u.toml", "[agent]\nbogus = 1\n")],
            &["/etc/u.toml", "bogus"],
        );
        check_err(
            &[("/etc/t.toml", "[agent]\ntries = \"one\"\n")],
            &["/etc/t.toml", "tries"],
        );
        check_err(&[("/etc/s.toml", "[agent\n")], &["/etc/s.toml"]);
        check_err(
            &[("/etc/c.toml", "[reboot]\nstrategy = \"coordinated\"\n")],
            &["reboot.fleetlock_url", "required"],
        );
        check_err(
            &[("/etc/v.toml", "[agent]\ncurrent_version = \"one\"\n")],
            &["/etc/v.toml", "agent.current_version"],
        );
        check_err(
            &[(
                "/etc/w.toml",
                "[[reboot.window]]\ndays = [\"Funday\"]\nstart = \"22:00\"\nlength_minutes = 60\n",
            )],
            &["/etc/w.toml", "reboot.window[0].days", "Funday"],
        );
        check_err(
            &[("/etc/g.toml", "[reboot]\ngroup = \"no spaces\"\n")],
            &["/etc/g.toml", "reboot.group"],
        );
        check_err(
            &[("/etc/h.toml", "[server]\nurl = \"ftp://x/\"\n")],
            &["/etc/h.toml", "server.url", "ftp"],
        );
    }

    #[test]
    fn windows_parse() {
        let s = from_fragments(&[(
            "/etc/w.toml",
            "[reboot]\nstrategy = \"off\"\n[[reboot.window]]\ndays = [\"Sat\", \"sun\"]\nstart = \"22:30\"\nlength_minutes = 90\ntime_zone = \"+02:00\"\n",
        )])
        .unwrap();
        let w = &s.reboot.windows[0];
        assert_eq!(w.days, vec![Weekday::Saturday, Weekday::Sunday]);
        assert_eq!(w.length, Duration::from_secs(5400));
        assert_eq!(w.start, jiff::civil::time(22, 30, 0, 0));
    }

    #[test]
    fn drop_in_masking_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(lib.join("10-x.toml"), "[agent]\nboard = \"lib\"\n").unwrap();
        std::fs::write(lib.join("20-y.toml"), "[server]\ntrack = \"alpha\"\n").unwrap();
        std::fs::write(etc.join("10-x.toml"), "[agent]\ndisk = \"/dev/etc\"\n").unwrap();
        let roots = ConfigRoots {
            dirs: vec![lib, etc, dir.path().join("missing")],
            extra_files: vec![],
        };
        let s = load(&roots).unwrap();
        // lib/10-x.toml is masked by etc/10-x.toml entirely.
        assert_eq!(s.agent.board, None);
        assert_eq!(s.agent.disk, PathBuf::from("/dev/etc"));
        assert_eq!(s.server.track, "alpha");
    }

    #[test]
    fn cmdline_slot() {
        assert_eq!(
            slot_from_cmdline("console=ttyS0 twinroot.slot=b quiet"),
            Some(SlotName::B)
        );
        assert_eq!(slot_from_cmdline("console=ttyS0"), None);
        assert_eq!(slot_from_cmdline("twinroot.slot=z"), None);
    }
}
