//! Omaha v3 request and response documents, as the CoreOS/Flatcar update_engine speaks them.
//!
//! Both sides use these types: the update-server parses [`Request`] and writes [`Response`], the
//! update-agent writes [`Request`] and parses [`Response`]. Parsing is tolerant the way the protocol
//! wants it to be: unknown attributes and unknown elements are ignored, optional attributes may be
//! missing. It is strict where tolerance would be dangerous: document type declarations (entity
//! expansion) are refused, nesting depth and the number of apps/events/packages are bounded, and
//! numbers that do not parse are errors naming the element and attribute.
//!
//! Serialization writes every element as `<tag ...></tag>` like update_engine does, with attribute
//! values escaped.
//!
//! Grouping: a host names its channel in `track`. It may name a rollout group in the documented
//! twinroot attribute `group` on `<app>`; hosts that cannot send it (a stock update_engine) can use
//! `cohortname` instead. [`AppRequest::group_name`] applies that precedence.

use std::borrow::Cow;
use std::fmt::Write as _;

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event as XmlEvent};
use quick_xml::reader::Reader;

/// Omaha protocol version we speak.
pub const PROTOCOL_VERSION: &str = "3.0";
/// The app id Flatcar/CoreOS hosts send.
pub const FLATCAR_APP_ID: &str = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}";

/// Deepest element nesting accepted in a document.
pub const MAX_DEPTH: usize = 16;
/// Most `<app>` elements accepted in one document.
pub const MAX_APPS: usize = 32;
/// Most `<event>` elements accepted in one `<app>`.
pub const MAX_EVENTS_PER_APP: usize = 32;
/// Most urls, packages or actions accepted in one update check answer.
pub const MAX_LIST_ITEMS: usize = 32;
/// twinroot extension on the response's `<updatecheck>` (with `noupdate` and `ok` alike): the
/// space-separated versions an operator lifted from this host's quarantine. update_engine
/// ignores unknown attributes.
pub const LIFT_QUARANTINE_ATTR: &str = "twinroot_lift_quarantine";
/// Most versions accepted in [`LIFT_QUARANTINE_ATTR`].
pub const MAX_LIFTED_VERSIONS: usize = 32;

/// `eventtype` values.
pub mod event_type {
    /// The update is installed (result 1) or the host booted into it (result 2).
    pub const UPDATE_COMPLETE: u32 = 3;
    /// The payload download started.
    pub const DOWNLOAD_STARTED: u32 = 13;
    /// The payload download finished.
    pub const DOWNLOAD_FINISHED: u32 = 14;
}

/// `eventresult` values.
pub mod event_result {
    /// Failed; the `errorcode` attribute says why.
    pub const ERROR: u32 = 0;
    /// Succeeded.
    pub const SUCCESS: u32 = 1;
    /// Succeeded, and the host rebooted into the new version.
    pub const SUCCESS_REBOOT: u32 = 2;
    /// The host deferred the update.
    pub const DEFERRED: u32 = 9;
}

/// `errorcode` values with a meaning the server acts on.
pub mod error_code {
    /// The host booted the old version again after trying the new one.
    pub const ROLLBACK: i64 = 44;
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OmahaError {
    #[error("malformed Omaha XML at byte {position}: {message}")]
    Xml { position: u64, message: String },
    #[error("Omaha document is empty (expected a <{expected}> root element)")]
    Empty { expected: &'static str },
    #[error("Omaha root element is <{found}>, expected <{expected}>")]
    WrongRoot {
        found: String,
        expected: &'static str,
    },
    #[error("Omaha protocol version {0:?} is not supported (expected 3.x)")]
    UnsupportedProtocol(String),
    #[error("document type declarations are not accepted in Omaha documents")]
    DocType,
    #[error("Omaha element nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("more than {limit} <{element}> elements in an Omaha document")]
    TooMany { element: &'static str, limit: usize },
    #[error("<{element}> is missing its {attribute} attribute")]
    MissingAttribute {
        element: &'static str,
        attribute: &'static str,
    },
    #[error("<{element}> attribute {attribute}={value:?} is not a valid {expected}")]
    BadAttribute {
        element: &'static str,
        attribute: &'static str,
        value: String,
        expected: &'static str,
    },
}

// ---------------------------------------------------------------------------------------------
// Request

/// `<request>`: one check-in from a host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    /// `protocol`, "3.0".
    pub protocol: String,
    /// `version` of the client (e.g. "update_engine-0.4.10").
    pub version: Option<String>,
    pub updater_version: Option<String>,
    /// `installsource`: "scheduler" or "ondemandupdate".
    pub install_source: Option<String>,
    pub is_machine: Option<bool>,
    pub os: Option<Os>,
    pub apps: Vec<AppRequest>,
}

/// `<os>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Os {
    pub version: Option<String>,
    pub platform: Option<String>,
    pub service_pack: Option<String>,
    pub arch: Option<String>,
}

/// `<app>` inside a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppRequest {
    pub app_id: String,
    /// The version the host runs.
    pub version: Option<String>,
    /// The channel.
    pub track: Option<String>,
    pub machine_id: Option<String>,
    pub boot_id: Option<String>,
    pub board: Option<String>,
    pub oem: Option<String>,
    pub oem_version: Option<String>,
    pub aleph_version: Option<String>,
    pub lang: Option<String>,
    pub hardware_class: Option<String>,
    pub delta_okay: Option<bool>,
    pub cohort: Option<String>,
    pub cohort_hint: Option<String>,
    pub cohort_name: Option<String>,
    /// twinroot extension: the rollout group (attribute `group`).
    pub group: Option<String>,
    pub ping: Option<Ping>,
    pub update_check: Option<UpdateCheck>,
    pub events: Vec<Event>,
}

impl AppRequest {
    /// The rollout group the host asks for: `group`, else `cohortname`; empty values count as none.
    pub fn group_name(&self) -> Option<&str> {
        [self.group.as_deref(), self.cohort_name.as_deref()]
            .into_iter()
            .flatten()
            .find(|g| !g.is_empty())
    }
}

/// `<ping>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ping {
    pub active: Option<bool>,
    /// Days since the last active ping (`a`).
    pub days_active: Option<i64>,
    /// Days since the last roll call (`r`).
    pub days_rollcall: Option<i64>,
}

/// `<updatecheck>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateCheck {
    pub target_version_prefix: Option<String>,
}

/// `<event>`: something that happened on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// See [`event_type`].
    pub event_type: u32,
    /// See [`event_result`].
    pub event_result: u32,
    /// See [`error_code`]; present when `event_result` is [`event_result::ERROR`].
    pub error_code: Option<i64>,
    pub previous_version: Option<String>,
}

impl Event {
    /// A result-0 event, or an event with the rollback error code.
    pub fn is_failure(&self) -> bool {
        self.event_result == event_result::ERROR || self.error_code == Some(error_code::ROLLBACK)
    }
}

impl Request {
    /// Parses a request document.
    pub fn parse(xml: &[u8]) -> Result<Request, OmahaError> {
        let mut req = Request::default();
        walk(xml, "request", |path, name, el| {
            match (path, name) {
                ([], "request") => {
                    let a = attrs(el, "request")?;
                    req.protocol = a.protocol()?;
                    req.version = a.string("version");
                    req.updater_version = a.string("updaterversion");
                    req.install_source = a.string("installsource");
                    req.is_machine = a.bool("ismachine")?;
                }
                (["request"], "os") => {
                    let a = attrs(el, "os")?;
                    req.os = Some(Os {
                        version: a.string("version"),
                        platform: a.string("platform"),
                        service_pack: a.string("sp"),
                        arch: a.string("arch"),
                    });
                }
                (["request"], "app") => {
                    room_for_app(req.apps.len())?;
                    let a = attrs(el, "app")?;
                    req.apps.push(AppRequest {
                        app_id: a.required("appid")?,
                        version: a.string("version"),
                        track: a.string("track"),
                        machine_id: a.string("machineid"),
                        boot_id: a.string("bootid"),
                        board: a.string("board"),
                        oem: a.string("oem"),
                        oem_version: a.string("oemversion"),
                        aleph_version: a.string("alephversion"),
                        lang: a.string("lang"),
                        hardware_class: a.string("hardware_class"),
                        delta_okay: a.bool("delta_okay")?,
                        cohort: a.string("cohort"),
                        cohort_hint: a.string("cohorthint"),
                        cohort_name: a.string("cohortname"),
                        group: a.string("group"),
                        ..AppRequest::default()
                    });
                }
                (["request", "app"], child) => {
                    let app = req.apps.last_mut().expect("inside an <app>");
                    match child {
                        "ping" => {
                            let a = attrs(el, "ping")?;
                            app.ping = Some(Ping {
                                active: a.bool("active")?,
                                days_active: a.int("a")?,
                                days_rollcall: a.int("r")?,
                            });
                        }
                        "updatecheck" => {
                            let a = attrs(el, "updatecheck")?;
                            app.update_check = Some(UpdateCheck {
                                target_version_prefix: a.string("targetversionprefix"),
                            });
                        }
                        "event" => {
                            if app.events.len() == MAX_EVENTS_PER_APP {
                                return Err(OmahaError::TooMany {
                                    element: "event",
                                    limit: MAX_EVENTS_PER_APP,
                                });
                            }
                            let a = attrs(el, "event")?;
                            let event_type =
                                a.int("eventtype")?.ok_or(OmahaError::MissingAttribute {
                                    element: "event",
                                    attribute: "eventtype",
                                })?;
                            let event_result = a.int("eventresult")?.unwrap_or(1);
                            app.events.push(Event {
                                event_type: to_u32(event_type, "event", "eventtype")?,
                                event_result: to_u32(event_result, "event", "eventresult")?,
                                error_code: a.int("errorcode")?,
                                previous_version: a.string("previousversion"),
                            });
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(req)
    }

    /// Writes the request document.
    pub fn to_xml(&self) -> String {
        let mut s = open_document("request", &self.protocol);
        attr(&mut s, "version", self.version.as_deref());
        attr(&mut s, "updaterversion", self.updater_version.as_deref());
        attr(&mut s, "installsource", self.install_source.as_deref());
        attr(&mut s, "ismachine", self.is_machine.map(bool01));
        s.push_str(">\n");
        if let Some(os) = &self.os {
            s.push_str(" <os");
            attr(&mut s, "version", os.version.as_deref());
            attr(&mut s, "platform", os.platform.as_deref());
            attr(&mut s, "sp", os.service_pack.as_deref());
            attr(&mut s, "arch", os.arch.as_deref());
            s.push_str("></os>\n");
        }
        for app in &self.apps {
            s.push_str(" <app");
            attr(&mut s, "appid", Some(&app.app_id));
            attr(&mut s, "version", app.version.as_deref());
            attr(&mut s, "track", app.track.as_deref());
            attr(&mut s, "bootid", app.boot_id.as_deref());
            attr(&mut s, "oem", app.oem.as_deref());
            attr(&mut s, "oemversion", app.oem_version.as_deref());
            attr(&mut s, "alephversion", app.aleph_version.as_deref());
            attr(&mut s, "machineid", app.machine_id.as_deref());
            attr(&mut s, "lang", app.lang.as_deref());
            attr(&mut s, "board", app.board.as_deref());
            attr(&mut s, "hardware_class", app.hardware_class.as_deref());
            attr(&mut s, "delta_okay", app.delta_okay.map(bool_word));
            attr(&mut s, "cohort", app.cohort.as_deref());
            attr(&mut s, "cohorthint", app.cohort_hint.as_deref());
            attr(&mut s, "cohortname", app.cohort_name.as_deref());
            attr(&mut s, "group", app.group.as_deref());
            s.push_str(">\n");
            if let Some(p) = &app.ping {
                s.push_str("  <ping");
                attr(&mut s, "active", p.active.map(bool01));
                attr(&mut s, "a", p.days_active.map(|d| d.to_string()).as_deref());
                attr(
                    &mut s,
                    "r",
                    p.days_rollcall.map(|d| d.to_string()).as_deref(),
                );
                s.push_str("></ping>\n");
            }
            if let Some(u) = &app.update_check {
                s.push_str("  <updatecheck");
                attr(
                    &mut s,
                    "targetversionprefix",
                    u.target_version_prefix.as_deref(),
                );
                s.push_str("></updatecheck>\n");
            }
            for e in &app.events {
                s.push_str("  <event");
                attr(&mut s, "eventtype", Some(&e.event_type.to_string()));
                attr(&mut s, "eventresult", Some(&e.event_result.to_string()));
                attr(
                    &mut s,
                    "errorcode",
                    e.error_code.map(|c| c.to_string()).as_deref(),
                );
                attr(&mut s, "previousversion", e.previous_version.as_deref());
                s.push_str("></event>\n");
            }
            s.push_str(" </app>\n");
        }
        s.push_str("</request>\n");
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Response

/// `<response>`: the server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub protocol: String,
    pub server: Option<String>,
    pub daystart: Option<DayStart>,
    pub apps: Vec<AppResponse>,
}

/// `<daystart>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DayStart {
    /// Seconds since the server's midnight.
    pub elapsed_seconds: i64,
    /// Days since 2007-01-01 (optional in v3).
    pub elapsed_days: Option<i64>,
}

/// `<app>` inside a response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppResponse {
    pub app_id: String,
    /// "ok", or an error such as "error-unknownApplication".
    pub status: String,
    pub cohort: Option<String>,
    pub cohort_name: Option<String>,
    pub cohort_hint: Option<String>,
    pub update_check: Option<UpdateCheckResponse>,
    /// One `<event status="ok">` per event received.
    pub events: u32,
    /// `<ping status="ok">` present.
    pub ping: bool,
    /// Versions an operator lifted from this host's quarantine: the host may install them again.
    /// Carried as [`LIFT_QUARANTINE_ATTR`] on `<updatecheck>`, so only sent (and only parsed)
    /// when `update_check` is present.
    pub lift_quarantine: Vec<String>,
}

/// `<updatecheck>` inside a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateCheckResponse {
    /// `status="noupdate"`: nothing to do (also how the server says "held by policy").
    NoUpdate,
    /// `status="ok"`: an update is offered.
    Ok(UpdateOffer),
    /// Any other status (update_engine treats these as errors).
    Other(String),
}

/// The offer inside `<updatecheck status="ok">`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateOffer {
    /// `<url codebase>` values; payload URL = codebase + package name.
    pub urls: Vec<String>,
    /// `<manifest version>`.
    pub version: String,
    pub packages: Vec<Package>,
    pub actions: Vec<Action>,
}

/// `<package>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Package {
    pub name: String,
    pub size: u64,
    /// SHA-1 of the payload, base64 (`hash`, what update_engine reads).
    pub hash_sha1_base64: Option<String>,
    /// SHA-256 of the payload, hex (`hash_sha256`, Omaha v3).
    pub hash_sha256_hex: Option<String>,
    pub required: bool,
}

/// `<action>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Action {
    /// "postinstall", "install", "update".
    pub event: String,
    /// SHA-256 of the payload, base64 (update_engine requires it on the postinstall action).
    pub sha256_base64: Option<String>,
    pub disable_payload_backoff: Option<bool>,
}

/// Why an offer would be rejected by update_engine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OfferError {
    #[error("update offer has no <url codebase>")]
    NoUrl,
    #[error("update offer has no <package>")]
    NoPackage,
    #[error("update offer has no <manifest version>")]
    NoVersion,
    #[error("update offer's postinstall action is missing or has no sha256")]
    NoPostinstallSha256,
}

impl UpdateOffer {
    /// The postinstall action, if any.
    pub fn postinstall(&self) -> Option<&Action> {
        self.actions.iter().find(|a| a.event == "postinstall")
    }

    /// The first package's full URL (first codebase + package name).
    pub fn payload_url(&self) -> Option<String> {
        let base = self.urls.first()?;
        let pkg = self.packages.first()?;
        Some(format!("{base}{}", pkg.name))
    }

    /// Applies the checks update_engine applies to an offer before it downloads anything.
    pub fn check(&self) -> Result<(), OfferError> {
        if self.urls.iter().all(|u| u.is_empty()) {
            return Err(OfferError::NoUrl);
        }
        if self.version.is_empty() {
            return Err(OfferError::NoVersion);
        }
        if self.packages.iter().all(|p| p.name.is_empty()) {
            return Err(OfferError::NoPackage);
        }
        match self.postinstall().and_then(|a| a.sha256_base64.as_deref()) {
            Some(s) if !s.is_empty() => Ok(()),
            _ => Err(OfferError::NoPostinstallSha256),
        }
    }
}

impl AppResponse {
    /// An `ok` app answer with nothing inside.
    pub fn ok(app_id: &str) -> AppResponse {
        AppResponse {
            app_id: app_id.to_string(),
            status: "ok".to_string(),
            ..AppResponse::default()
        }
    }
}

impl Response {
    /// Parses a response document.
    pub fn parse(xml: &[u8]) -> Result<Response, OmahaError> {
        let mut resp = Response::default();
        let mut lists = 0usize;
        walk(xml, "response", |path, name, el| {
            match (path, name) {
                ([], "response") => {
                    let a = attrs(el, "response")?;
                    resp.protocol = a.protocol()?;
                    resp.server = a.string("server");
                }
                (["response"], "daystart") => {
                    let a = attrs(el, "daystart")?;
                    resp.daystart = Some(DayStart {
                        elapsed_seconds: a.int("elapsed_seconds")?.unwrap_or(0),
                        elapsed_days: a.int("elapsed_days")?,
                    });
                }
                (["response"], "app") => {
                    room_for_app(resp.apps.len())?;
                    let a = attrs(el, "app")?;
                    resp.apps.push(AppResponse {
                        app_id: a.required("appid")?,
                        status: a.string("status").unwrap_or_else(|| "ok".to_string()),
                        cohort: a.string("cohort"),
                        cohort_name: a.string("cohortname"),
                        cohort_hint: a.string("cohorthint"),
                        ..AppResponse::default()
                    });
                }
                (["response", "app"], child) => {
                    let app = resp.apps.last_mut().expect("inside an <app>");
                    match child {
                        "updatecheck" => {
                            let a = attrs(el, "updatecheck")?;
                            let status = a.required("status")?;
                            app.lift_quarantine = a
                                .get(LIFT_QUARANTINE_ATTR)
                                .unwrap_or("")
                                .split_whitespace()
                                .map(str::to_string)
                                .collect();
                            if app.lift_quarantine.len() > MAX_LIFTED_VERSIONS {
                                return Err(OmahaError::TooMany {
                                    element: "updatecheck twinroot_lift_quarantine version",
                                    limit: MAX_LIFTED_VERSIONS,
                                });
                            }
                            app.update_check = Some(match status.as_str() {
                                "noupdate" => UpdateCheckResponse::NoUpdate,
                                "ok" => UpdateCheckResponse::Ok(UpdateOffer::default()),
                                _ => UpdateCheckResponse::Other(status),
                            });
                        }
                        "event" => app.events = app.events.saturating_add(1),
                        "ping" => app.ping = true,
                        _ => {}
                    }
                }
                (["response", "app", "updatecheck", "urls"], "url") => {
                    let a = attrs(el, "url")?;
                    if let Some(offer) = current_offer(&mut resp.apps) {
                        bump(&mut lists)?;
                        offer.urls.push(a.required("codebase")?);
                    }
                }
                (["response", "app", "updatecheck"], "manifest") => {
                    let a = attrs(el, "manifest")?;
                    if let Some(offer) = current_offer(&mut resp.apps) {
                        offer.version = a.string("version").unwrap_or_default();
                    }
                }
                (["response", "app", "updatecheck", "manifest", "packages"], "package") => {
                    let a = attrs(el, "package")?;
                    let size = a.int("size")?.unwrap_or(0);
                    let size = u64::try_from(size).map_err(|_| OmahaError::BadAttribute {
                        element: "package",
                        attribute: "size",
                        value: size.to_string(),
                        expected: "size in bytes",
                    })?;
                    let package = Package {
                        name: a.required("name")?,
                        size,
                        hash_sha1_base64: a.string("hash"),
                        hash_sha256_hex: a.string("hash_sha256"),
                        required: a.bool("required")?.unwrap_or(false),
                    };
                    if let Some(offer) = current_offer(&mut resp.apps) {
                        bump(&mut lists)?;
                        offer.packages.push(package);
                    }
                }
                (["response", "app", "updatecheck", "manifest", "actions"], "action") => {
                    let a = attrs(el, "action")?;
                    let action = Action {
                        event: a.string("event").unwrap_or_default(),
                        sha256_base64: a.string("sha256"),
                        disable_payload_backoff: a.bool("DisablePayloadBackoff")?,
                    };
                    if let Some(offer) = current_offer(&mut resp.apps) {
                        bump(&mut lists)?;
                        offer.actions.push(action);
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(resp)
    }

    /// Writes the response document.
    pub fn to_xml(&self) -> String {
        let mut s = open_document("response", &self.protocol);
        attr(&mut s, "server", self.server.as_deref());
        s.push_str(">\n");
        if let Some(d) = &self.daystart {
            s.push_str(" <daystart");
            attr(
                &mut s,
                "elapsed_seconds",
                Some(&d.elapsed_seconds.to_string()),
            );
            attr(
                &mut s,
                "elapsed_days",
                d.elapsed_days.map(|x| x.to_string()).as_deref(),
            );
            s.push_str("></daystart>\n");
        }
        for app in &self.apps {
            s.push_str(" <app");
            attr(&mut s, "appid", Some(&app.app_id));
            attr(&mut s, "cohort", app.cohort.as_deref());
            attr(&mut s, "cohortname", app.cohort_name.as_deref());
            attr(&mut s, "cohorthint", app.cohort_hint.as_deref());
            attr(&mut s, "status", Some(&app.status));
            s.push_str(">\n");
            let lifted = (!app.lift_quarantine.is_empty()).then(|| app.lift_quarantine.join(" "));
            let status = match &app.update_check {
                None => None,
                Some(UpdateCheckResponse::NoUpdate) => Some("noupdate"),
                Some(UpdateCheckResponse::Ok(_)) => Some("ok"),
                Some(UpdateCheckResponse::Other(status)) => Some(status.as_str()),
            };
            if let Some(status) = status {
                s.push_str("  <updatecheck");
                attr(&mut s, "status", Some(status));
                attr(&mut s, LIFT_QUARANTINE_ATTR, lifted.as_deref());
                s.push('>');
                if let Some(UpdateCheckResponse::Ok(o)) = &app.update_check {
                    write_offer(&mut s, o);
                }
                s.push_str("</updatecheck>\n");
            }
            for _ in 0..app.events {
                s.push_str("  <event status=\"ok\"></event>\n");
            }
            if app.ping {
                s.push_str("  <ping status=\"ok\"></ping>\n");
            }
            s.push_str(" </app>\n");
        }
        s.push_str("</response>\n");
        s
    }
}

/// The contents of `<updatecheck status="ok">`.
fn write_offer(s: &mut String, o: &UpdateOffer) {
    s.push_str("\n   <urls>\n");
    for u in &o.urls {
        s.push_str("    <url");
        attr(s, "codebase", Some(u));
        s.push_str("></url>\n");
    }
    s.push_str("   </urls>\n   <manifest");
    attr(s, "version", Some(&o.version));
    s.push_str(">\n    <packages>\n");
    for p in &o.packages {
        s.push_str("     <package");
        attr(s, "name", Some(&p.name));
        attr(s, "size", Some(&p.size.to_string()));
        attr(s, "hash", p.hash_sha1_base64.as_deref());
        attr(s, "hash_sha256", p.hash_sha256_hex.as_deref());
        attr(s, "required", Some(bool_word(p.required)));
        s.push_str("></package>\n");
    }
    s.push_str("    </packages>\n    <actions>\n");
    for a in &o.actions {
        s.push_str("     <action");
        attr(s, "event", Some(&a.event));
        attr(s, "sha256", a.sha256_base64.as_deref());
        attr(
            s,
            "DisablePayloadBackoff",
            a.disable_payload_backoff.map(bool_word),
        );
        s.push_str("></action>\n");
    }
    s.push_str("    </actions>\n   </manifest>\n  ");
}

// ---------------------------------------------------------------------------------------------
// Shared parsing and writing machinery

fn current_offer(apps: &mut [AppResponse]) -> Option<&mut UpdateOffer> {
    match apps.last_mut()?.update_check.as_mut()? {
        UpdateCheckResponse::Ok(o) => Some(o),
        _ => None,
    }
}

fn bump(count: &mut usize) -> Result<(), OmahaError> {
    *count += 1;
    if *count > MAX_LIST_ITEMS * 3 {
        return Err(OmahaError::TooMany {
            element: "url/package/action",
            limit: MAX_LIST_ITEMS * 3,
        });
    }
    Ok(())
}

fn to_u32(v: i64, element: &'static str, attribute: &'static str) -> Result<u32, OmahaError> {
    u32::try_from(v).map_err(|_| OmahaError::BadAttribute {
        element,
        attribute,
        value: v.to_string(),
        expected: "non-negative number",
    })
}

/// Element names the parsers match on. A path holds these, and [`OTHER_ELEMENT`] for any other
/// name, so walking needs no allocation per element.
const KNOWN_ELEMENTS: &[&str] = &[
    "request",
    "response",
    "os",
    "app",
    "ping",
    "updatecheck",
    "event",
    "daystart",
    "urls",
    "url",
    "manifest",
    "packages",
    "package",
    "actions",
    "action",
];

/// Stands for an element name not in [`KNOWN_ELEMENTS`] in a path.
const OTHER_ELEMENT: &str = "*";

fn interned(name: &str) -> &'static str {
    KNOWN_ELEMENTS
        .iter()
        .find(|k| **k == name)
        .copied()
        .unwrap_or(OTHER_ELEMENT)
}

/// Walks the element tree, calling `visit(path of ancestors, element name, element)` for every
/// start or empty element. The root element must be `root`. Ancestors whose names the parsers
/// do not know appear as [`OTHER_ELEMENT`].
fn walk<F>(xml: &[u8], root: &'static str, mut visit: F) -> Result<(), OmahaError>
where
    F: FnMut(&[&'static str], &str, &BytesStart<'_>) -> Result<(), OmahaError>,
{
    let text = std::str::from_utf8(xml).map_err(|e| OmahaError::Xml {
        position: e.valid_up_to() as u64,
        message: "not UTF-8".to_string(),
    })?;
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<&'static str> = Vec::with_capacity(8);
    let mut seen_root = false;
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| OmahaError::Xml {
            position,
            message: e.to_string(),
        })?;
        match event {
            XmlEvent::Start(ref el) | XmlEvent::Empty(ref el) => {
                let is_empty = matches!(event, XmlEvent::Empty(_));
                let local = el.local_name();
                let name = local.into_inner();
                if stack.is_empty() {
                    if seen_root {
                        return Err(OmahaError::Xml {
                            position,
                            message: "more than one root element".to_string(),
                        });
                    }
                    if name != root {
                        return Err(OmahaError::WrongRoot {
                            found: name.to_string(),
                            expected: root,
                        });
                    }
                    seen_root = true;
                }
                visit(&stack, name, el)?;
                if !is_empty {
                    if stack.len() == MAX_DEPTH {
                        return Err(OmahaError::TooDeep);
                    }
                    stack.push(interned(name));
                }
            }
            XmlEvent::End(_) => {
                stack.pop();
            }
            XmlEvent::DocType(_) => return Err(OmahaError::DocType),
            XmlEvent::Eof => break,
            XmlEvent::Text(t) if stack.is_empty() && !t.trim().is_empty() => {
                return Err(OmahaError::Xml {
                    position,
                    message: "text outside the root element".to_string(),
                });
            }
            _ => {}
        }
    }
    if !seen_root {
        return Err(OmahaError::Empty { expected: root });
    }
    if let Some(open) = stack.last() {
        let what = if *open == OTHER_ELEMENT {
            "an element".to_string()
        } else {
            format!("<{open}>")
        };
        return Err(OmahaError::Xml {
            position: reader.buffer_position(),
            message: format!("{what} is not closed"),
        });
    }
    Ok(())
}

/// An element's attributes, borrowed from the document (a value is copied only when entities
/// or whitespace had to be normalized).
struct Attrs<'e> {
    element: &'static str,
    pairs: Vec<(&'e str, Cow<'e, str>)>,
}

fn attrs<'e>(el: &'e BytesStart<'_>, element: &'static str) -> Result<Attrs<'e>, OmahaError> {
    let mut pairs = Vec::with_capacity(24);
    for a in el.attributes() {
        let a = a.map_err(|e| OmahaError::Xml {
            position: 0,
            message: format!("<{element}>: {e}"),
        })?;
        let key = a.key.local_name().into_inner();
        let value = a
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| OmahaError::Xml {
                position: 0,
                message: format!("<{element} {key}>: {e}"),
            })?;
        pairs.push((key, value));
    }
    Ok(Attrs { element, pairs })
}

/// Starts a document: the XML declaration and `<ROOT protocol="..."` (3.0 when empty).
fn open_document(root: &str, protocol: &str) -> String {
    let mut s = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{root}");
    let protocol = if protocol.is_empty() {
        PROTOCOL_VERSION
    } else {
        protocol
    };
    attr(&mut s, "protocol", Some(protocol));
    s
}

/// Refuses one more `<app>` beyond [`MAX_APPS`].
fn room_for_app(apps: usize) -> Result<(), OmahaError> {
    if apps == MAX_APPS {
        return Err(OmahaError::TooMany {
            element: "app",
            limit: MAX_APPS,
        });
    }
    Ok(())
}

impl Attrs<'_> {
    /// The root element's `protocol` (3.0 when missing); other major versions are refused.
    fn protocol(&self) -> Result<String, OmahaError> {
        let protocol = self.get("protocol").unwrap_or(PROTOCOL_VERSION).to_string();
        if !protocol.starts_with("3.") {
            return Err(OmahaError::UnsupportedProtocol(protocol));
        }
        Ok(protocol)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_ref())
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key).map(str::to_string)
    }

    fn required(&self, key: &'static str) -> Result<String, OmahaError> {
        self.string(key).ok_or(OmahaError::MissingAttribute {
            element: self.element,
            attribute: key,
        })
    }

    fn int(&self, key: &'static str) -> Result<Option<i64>, OmahaError> {
        match self.get(key).map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| OmahaError::BadAttribute {
                element: self.element,
                attribute: key,
                value: v.to_string(),
                expected: "integer",
            }),
        }
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, OmahaError> {
        match self.get(key).map(str::trim) {
            None | Some("") => Ok(None),
            Some("1") | Some("true") | Some("True") => Ok(Some(true)),
            Some("0") | Some("false") | Some("False") => Ok(Some(false)),
            Some(v) => Err(OmahaError::BadAttribute {
                element: self.element,
                attribute: key,
                value: v.to_string(),
                expected: "boolean (0, 1, true, false)",
            }),
        }
    }
}

fn attr(s: &mut String, key: &str, value: Option<&str>) {
    if let Some(v) = value {
        let _ = write!(s, " {key}=\"{}\"", quick_xml::escape::escape(v));
    }
}

fn bool01(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

fn bool_word(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// Seconds since UTC midnight for a Unix time, for `<daystart elapsed_seconds>`.
pub fn daystart_for(unix_seconds: i64) -> DayStart {
    // 2007-01-01T00:00:00Z, the Omaha epoch for elapsed_days.
    const OMAHA_EPOCH: i64 = 1_167_609_600;
    DayStart {
        elapsed_seconds: unix_seconds.rem_euclid(86_400),
        elapsed_days: Some((unix_seconds - OMAHA_EPOCH).div_euclid(86_400)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request shaped exactly like update_engine's after a reboot into a new version.
    const UPDATE_ENGINE_REQUEST: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" installsource="scheduler" ismachine="1">
    <os version="Chateau" platform="CoreOS" sp="3815.2.0_x86_64"></os>
    <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" version="3815.2.0" track="stable" bootid="{4a1bf1b6-a4a0-4ab5-9c0e-2a0a5b2ff2d1}" oem="qemu" oemversion="0.1" alephversion="3510.2.0" machineid="8a9b1c2d3e4f5a6b7c8d9e0f1a2b3c4d" machinealias="" lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false" >
        <ping active="1"></ping>
        <updatecheck></updatecheck>
        <event eventtype="3" eventresult="2" previousversion="3760.2.0"></event>
    </app>
</request>
"#;

    #[test]
    fn parses_update_engine_request() {
        let req = Request::parse(UPDATE_ENGINE_REQUEST.as_bytes()).unwrap();
        assert_eq!(req.protocol, "3.0");
        assert_eq!(req.install_source.as_deref(), Some("scheduler"));
        assert_eq!(req.is_machine, Some(true));
        assert_eq!(req.os.as_ref().unwrap().platform.as_deref(), Some("CoreOS"));
        assert_eq!(req.apps.len(), 1);
        let app = &req.apps[0];
        assert_eq!(app.app_id, FLATCAR_APP_ID);
        assert_eq!(app.version.as_deref(), Some("3815.2.0"));
        assert_eq!(app.track.as_deref(), Some("stable"));
        assert_eq!(
            app.machine_id.as_deref(),
            Some("8a9b1c2d3e4f5a6b7c8d9e0f1a2b3c4d")
        );
        assert_eq!(
            app.boot_id.as_deref(),
            Some("{4a1bf1b6-a4a0-4ab5-9c0e-2a0a5b2ff2d1}")
        );
        assert_eq!(app.board.as_deref(), Some("amd64-usr"));
        assert_eq!(app.aleph_version.as_deref(), Some("3510.2.0"));
        assert_eq!(app.delta_okay, Some(false));
        assert_eq!(app.ping.as_ref().unwrap().active, Some(true));
        assert_eq!(app.update_check, Some(UpdateCheck::default()));
        assert_eq!(
            app.events,
            vec![Event {
                event_type: event_type::UPDATE_COMPLETE,
                event_result: event_result::SUCCESS_REBOOT,
                error_code: None,
                previous_version: Some("3760.2.0".into()),
            }]
        );
        assert_eq!(app.group_name(), None);
    }

    #[test]
    fn request_round_trips() {
        let req = Request::parse(UPDATE_ENGINE_REQUEST.as_bytes()).unwrap();
        let again = Request::parse(req.to_xml().as_bytes()).unwrap();
        assert_eq!(req, again);
    }

    #[test]
    fn group_precedence_and_cohorts() {
        let xml = r#"<request protocol="3.0"><app appid="x" cohort="c1" cohorthint="h" cohortname="canary" group="db &amp; cache"><updatecheck targetversionprefix="1.2."/></app><app appid="y" cohortname="canary" group=""/></request>"#;
        let req = Request::parse(xml.as_bytes()).unwrap();
        assert_eq!(req.apps[0].group_name(), Some("db & cache"));
        assert_eq!(req.apps[0].cohort.as_deref(), Some("c1"));
        assert_eq!(req.apps[0].cohort_hint.as_deref(), Some("h"));
        assert_eq!(
            req.apps[0]
                .update_check
                .as_ref()
                .unwrap()
                .target_version_prefix
                .as_deref(),
            Some("1.2.")
        );
        assert_eq!(req.apps[1].group_name(), Some("canary"));
        assert_eq!(req.apps[1].update_check, None);
        // Serialization escapes and round-trips.
        assert_eq!(Request::parse(req.to_xml().as_bytes()).unwrap(), req);
    }

    #[test]
    fn tolerates_unknown_attributes_and_elements() {
        let xml = r#"<?xml version="1.0"?><!-- hi --><request protocol="3.0" shiny="yes">
            <hw physmemory="4"/><app appid="a" version="1.0.0" brand="x"><data name="y">text</data>
            <ping active="1" a="3" r="-1" ad="4"/><event eventtype="3" eventresult="0" errorcode="44" extra="1"/>
            <event eventtype="14"/></app></request>"#;
        let req = Request::parse(xml.as_bytes()).unwrap();
        let app = &req.apps[0];
        let ping = app.ping.as_ref().unwrap();
        assert_eq!((ping.days_active, ping.days_rollcall), (Some(3), Some(-1)));
        assert_eq!(app.events.len(), 2);
        assert!(app.events[0].is_failure());
        assert_eq!(app.events[0].error_code, Some(error_code::ROLLBACK));
        assert_eq!(app.events[1].event_result, event_result::SUCCESS);
        assert!(!app.events[1].is_failure());
    }

    fn err(xml: &str) -> OmahaError {
        Request::parse(xml.as_bytes()).unwrap_err()
    }

    #[test]
    fn refuses_bad_documents_with_named_errors() {
        assert_eq!(
            err(""),
            OmahaError::Empty {
                expected: "request"
            }
        );
        assert_eq!(
            err("<response/>"),
            OmahaError::WrongRoot {
                found: "response".into(),
                expected: "request"
            }
        );
        assert_eq!(
            err(r#"<request protocol="2.0"/>"#),
            OmahaError::UnsupportedProtocol("2.0".into())
        );
        assert_eq!(
            err(r#"<!DOCTYPE r [<!ENTITY a "aaaa">]><request/>"#),
            OmahaError::DocType
        );
        assert_eq!(
            err(r#"<request><app/></request>"#),
            OmahaError::MissingAttribute {
                element: "app",
                attribute: "appid"
            }
        );
        assert_eq!(
            err(r#"<request><app appid="a"><event eventtype="x"/></app></request>"#),
            OmahaError::BadAttribute {
                element: "event",
                attribute: "eventtype",
                value: "x".into(),
                expected: "integer"
            }
        );
        assert!(matches!(
            err(r#"<request><app appid="a"></request>"#),
            OmahaError::Xml { .. }
        ));
        assert!(matches!(err("<request>"), OmahaError::Xml { .. }));
        assert!(matches!(err("<request/>junk"), OmahaError::Xml { .. }));
        assert!(matches!(
            err("\u{feff}<request/><request/>"),
            OmahaError::Xml { .. }
        ));
        assert!(matches!(
            Request::parse(&[0xff, 0xfe, b'<']).unwrap_err(),
            OmahaError::Xml { .. }
        ));
        let deep = format!("<request>{}", "<a>".repeat(100));
        assert_eq!(err(&deep), OmahaError::TooDeep);
        let many = format!("<request>{}</request>", "<app appid=\"a\"/>".repeat(100));
        assert_eq!(
            err(&many),
            OmahaError::TooMany {
                element: "app",
                limit: MAX_APPS
            }
        );
        let events = format!(
            "<request><app appid=\"a\">{}</app></request>",
            "<event eventtype=\"3\"/>".repeat(100)
        );
        assert_eq!(
            err(&events),
            OmahaError::TooMany {
                element: "event",
                limit: MAX_EVENTS_PER_APP
            }
        );
    }

    fn sample_offer() -> UpdateOffer {
        UpdateOffer {
            urls: vec!["https://updates.example/v1/payload/".into()],
            version: "2.0.0".into(),
            packages: vec![Package {
                name: "abc.bundle".into(),
                size: 1234,
                hash_sha1_base64: Some("2jmj7l5rSw0yVb/vlWAYkK/YBwk=".into()),
                hash_sha256_hex: Some("ab".repeat(32)),
                required: true,
            }],
            actions: vec![Action {
                event: "postinstall".into(),
                sha256_base64: Some("47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into()),
                disable_payload_backoff: Some(true),
            }],
        }
    }

    #[test]
    fn response_round_trips_and_passes_update_engine_checks() {
        let resp = Response {
            protocol: "3.0".into(),
            server: Some("twinroot".into()),
            daystart: Some(daystart_for(1_700_000_000)),
            apps: vec![
                AppResponse {
                    update_check: Some(UpdateCheckResponse::Ok(sample_offer())),
                    events: 1,
                    ping: true,
                    cohort_name: Some("canary".into()),
                    ..AppResponse::ok(FLATCAR_APP_ID)
                },
                AppResponse {
                    update_check: Some(UpdateCheckResponse::NoUpdate),
                    ..AppResponse::ok("other")
                },
            ],
        };
        let xml = resp.to_xml();
        assert!(xml.contains(r#"<updatecheck status="noupdate"></updatecheck>"#));
        assert!(xml.contains(r#"<event status="ok"></event>"#));
        assert!(xml.contains(r#"DisablePayloadBackoff="true""#));
        let back = Response::parse(xml.as_bytes()).unwrap();
        assert_eq!(back, resp);
        let Some(UpdateCheckResponse::Ok(offer)) = &back.apps[0].update_check else {
            panic!("expected an offer")
        };
        offer.check().unwrap();
        assert_eq!(
            offer.payload_url().as_deref(),
            Some("https://updates.example/v1/payload/abc.bundle")
        );
        assert_eq!(
            back.daystart.unwrap().elapsed_seconds,
            1_700_000_000 % 86_400
        );
    }

    #[test]
    fn parses_a_reference_shaped_response() {
        let xml = r#"<response protocol="3.0" server="nebraska">
  <daystart elapsed_seconds="49008"></daystart>
  <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" status="ok">
    <updatecheck status="ok">
      <urls><url codebase="https://host/path/"></url></urls>
      <manifest version="3815.2.1">
        <packages><package name="flatcar_production_update.gz" size="465881871" hash="r3nufcxgMTZaxYEqL+x2zIoeClk=" required="true"></package></packages>
        <actions><action event="postinstall" sha256="LIkAKVZY2EoFiwTWGwO1tnZ0bKXdFnRGBDSbBR7GFVk=" DisablePayloadBackoff="true" ChromeOSVersion="" needsadmin="false"></action></actions>
      </manifest>
    </updatecheck>
    <event status="ok"></event>
    <ping status="ok"></ping>
  </app>
</response>"#;
        let resp = Response::parse(xml.as_bytes()).unwrap();
        assert_eq!(resp.daystart.unwrap().elapsed_seconds, 49008);
        let app = &resp.apps[0];
        assert_eq!((app.events, app.ping), (1, true));
        let Some(UpdateCheckResponse::Ok(offer)) = &app.update_check else {
            panic!("expected an offer")
        };
        offer.check().unwrap();
        assert_eq!(offer.version, "3815.2.1");
        assert_eq!(offer.packages[0].size, 465_881_871);
        assert_eq!(
            offer.payload_url().as_deref(),
            Some("https://host/path/flatcar_production_update.gz")
        );
    }

    #[test]
    fn lifted_quarantine_rides_on_updatecheck_both_ways() {
        let resp = Response {
            protocol: "3.0".into(),
            apps: vec![
                AppResponse {
                    update_check: Some(UpdateCheckResponse::NoUpdate),
                    lift_quarantine: vec!["2.0.0".into(), "2.1.0".into()],
                    ..AppResponse::ok("a")
                },
                AppResponse {
                    update_check: Some(UpdateCheckResponse::Ok(sample_offer())),
                    lift_quarantine: vec!["2.0.0".into()],
                    ..AppResponse::ok("b")
                },
                AppResponse {
                    update_check: Some(UpdateCheckResponse::NoUpdate),
                    ..AppResponse::ok("c")
                },
            ],
            ..Response::default()
        };
        let xml = resp.to_xml();
        assert!(
            xml.contains(r#"<updatecheck status="noupdate" twinroot_lift_quarantine="2.0.0 2.1.0"></updatecheck>"#),
            "{xml}"
        );
        assert!(xml.contains(r#"<updatecheck status="ok" twinroot_lift_quarantine="2.0.0">"#));
        // Without lifts, the element is exactly what update_engine has always seen.
        assert!(xml.contains(r#"<updatecheck status="noupdate"></updatecheck>"#));
        assert_eq!(Response::parse(xml.as_bytes()).unwrap(), resp);
        // Extra whitespace is tolerated; too many versions are refused.
        let loose = r#"<response protocol="3.0"><app appid="a"><updatecheck status="noupdate" twinroot_lift_quarantine="  1.0.0   1.1.0 "/></app></response>"#;
        let parsed = Response::parse(loose.as_bytes()).unwrap();
        assert_eq!(parsed.apps[0].lift_quarantine, ["1.0.0", "1.1.0"]);
        let many = format!(
            r#"<response protocol="3.0"><app appid="a"><updatecheck status="noupdate" twinroot_lift_quarantine="{}"/></app></response>"#,
            "1.0.0 ".repeat(MAX_LIFTED_VERSIONS + 1)
        );
        assert!(matches!(
            Response::parse(many.as_bytes()).unwrap_err(),
            OmahaError::TooMany { .. }
        ));
    }

    #[test]
    fn offer_checks_mirror_update_engine() {
        let mut o = sample_offer();
        o.actions[0].sha256_base64 = None;
        assert_eq!(o.check(), Err(OfferError::NoPostinstallSha256));
        let mut o = sample_offer();
        o.urls.clear();
        assert_eq!(o.check(), Err(OfferError::NoUrl));
        let mut o = sample_offer();
        o.packages.clear();
        assert_eq!(o.check(), Err(OfferError::NoPackage));
        let other = Response::parse(
            br#"<response protocol="3.0"><app appid="a" status="ok"><updatecheck status="error-internal"/></app></response>"#,
        )
        .unwrap();
        assert_eq!(
            other.apps[0].update_check,
            Some(UpdateCheckResponse::Other("error-internal".into()))
        );
    }
}
