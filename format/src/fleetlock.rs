//! FleetLock wire types, shared by the reboot-coordinator (server) and the update-agent (client).
//!
//! The protocol (Zincati's client, airlock's server):
//! - `POST /v1/pre-reboot` takes a reboot slot, `POST /v1/steady-state` gives it back.
//! - The header `fleet-lock-protocol: true` is required on both.
//! - Body: `{"client_params":{"id":"NODE-ID","group":"default"}}`.
//! - `200` means success; any other status is a failure whose body is `{"kind":"...","value":"..."}`.
//! - Both calls are idempotent for the same id.
//!
//! The error kinds a twinroot coordinator sends are the fixed set in [`ErrorKind`]; a client must
//! still accept kinds it does not know (other servers send their own), which is why [`ErrorBody`]
//! keeps the kind as a string.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Name of the header every FleetLock request must carry.
pub const PROTOCOL_HEADER: &str = "fleet-lock-protocol";
/// The only accepted value of [`PROTOCOL_HEADER`].
pub const PROTOCOL_HEADER_VALUE: &str = "true";
/// Route that takes a reboot slot.
pub const PRE_REBOOT_PATH: &str = "/v1/pre-reboot";
/// Route that gives a reboot slot back.
pub const STEADY_STATE_PATH: &str = "/v1/steady-state";
/// Group used by Zincati when none is configured.
pub const DEFAULT_GROUP: &str = "default";
/// Longest accepted group name and node id, in bytes.
pub const MAX_NAME_LEN: usize = 253;

/// Body of both FleetLock requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client_params: ClientParams,
}

/// Who asks, and for which group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    /// Node id (Zincati sends an app-specific machine id).
    pub id: String,
    /// Reboot group, matching `^[a-zA-Z0-9.-]+$`.
    pub group: String,
}

impl Request {
    pub fn new(id: impl Into<String>, group: impl Into<String>) -> Self {
        Request {
            client_params: ClientParams {
                id: id.into(),
                group: group.into(),
            },
        }
    }

    /// Checks the group and the id; the error names the offending value.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        validate_group(&self.client_params.group)?;
        validate_id(&self.client_params.id)
    }
}

/// Body of every non-200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One of [`ErrorKind`]'s names when the server is twinroot's; any string from other servers.
    pub kind: String,
    /// Human-readable explanation.
    pub value: String,
}

impl ErrorBody {
    pub fn new(kind: ErrorKind, value: impl Into<String>) -> Self {
        ErrorBody {
            kind: kind.as_str().to_string(),
            value: value.into(),
        }
    }

    /// The kind, if it is one of twinroot's.
    pub fn known_kind(&self) -> Option<ErrorKind> {
        self.kind.parse().ok()
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.value)
    }
}

/// The fixed set of error kinds a twinroot coordinator answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The `fleet-lock-protocol: true` header is missing or has another value.
    MissingProtocolHeader,
    /// The body is not a valid FleetLock request (bad JSON, missing fields, wrong content).
    BadRequest,
    /// The group does not match `^[a-zA-Z0-9.-]+$` (or is too long).
    InvalidGroup,
    /// The node id is empty, too long, or holds characters outside `[a-zA-Z0-9._:-]`.
    InvalidId,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// All reboot slots of the group are taken; retry later.
    NoSlotAvailable,
    /// The group's reboot window is closed now; retry later.
    OutsideRebootWindow,
    /// etcd could not be reached (or answered too late); nothing was granted.
    EtcdUnavailable,
    /// etcd answered with an error, or held data the coordinator cannot read; nothing was granted.
    EtcdError,
    /// Any other server-side failure.
    Internal,
}

impl ErrorKind {
    /// Every kind, in documentation order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::MissingProtocolHeader,
        ErrorKind::BadRequest,
        ErrorKind::InvalidGroup,
        ErrorKind::InvalidId,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::NoSlotAvailable,
        ErrorKind::OutsideRebootWindow,
        ErrorKind::EtcdUnavailable,
        ErrorKind::EtcdError,
        ErrorKind::Internal,
    ];

    /// Wire name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MissingProtocolHeader => "missing_protocol_header",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::InvalidGroup => "invalid_group",
            ErrorKind::InvalidId => "invalid_id",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::NoSlotAvailable => "no_slot_available",
            ErrorKind::OutsideRebootWindow => "outside_reboot_window",
            ErrorKind::EtcdUnavailable => "etcd_unavailable",
            ErrorKind::EtcdError => "etcd_error",
            ErrorKind::Internal => "internal",
        }
    }

    /// HTTP status the coordinator sends with this kind.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::MissingProtocolHeader
            | ErrorKind::BadRequest
            | ErrorKind::InvalidGroup
            | ErrorKind::InvalidId => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::NoSlotAvailable | ErrorKind::OutsideRebootWindow => 409,
            ErrorKind::EtcdUnavailable => 503,
            ErrorKind::EtcdError | ErrorKind::Internal => 500,
        }
    }

    /// True when the same request may succeed later without any change on the client.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::NoSlotAvailable
                | ErrorKind::OutsideRebootWindow
                | ErrorKind::EtcdUnavailable
                | ErrorKind::EtcdError
                | ErrorKind::Internal
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind name that is not one of [`ErrorKind`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown FleetLock error kind {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for ErrorKind {
    type Err = UnknownKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

/// A group or node id that may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidParam {
    #[error("invalid group {0:?}: must match ^[a-zA-Z0-9.-]+$ and be at most 253 bytes")]
    Group(String),
    #[error("invalid node id {0:?}: must be 1 to 253 characters from [a-zA-Z0-9._:-]")]
    Id(String),
}

impl InvalidParam {
    pub fn kind(&self) -> ErrorKind {
        match self {
            InvalidParam::Group(_) => ErrorKind::InvalidGroup,
            InvalidParam::Id(_) => ErrorKind::InvalidId,
        }
    }
}

/// Group names match `^[a-zA-Z0-9.-]+$` (FleetLock), at most [`MAX_NAME_LEN`] bytes.
pub fn validate_group(group: &str) -> Result<(), InvalidParam> {
    let ok = !group.is_empty()
        && group.len() <= MAX_NAME_LEN
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidParam::Group(group.to_string()))
    }
}

/// Node ids are 1..=253 characters from `[a-zA-Z0-9._:-]` (covers machine ids, hostnames, UUIDs);
/// they end up in etcd key names, so `/` and whitespace are refused.
pub fn validate_id(id: &str) -> Result<(), InvalidParam> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NAME_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidParam::Id(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form() {
        let body = r#"{"client_params":{"id":"c0ffee","group":"default"}}"#;
        let req: Request = serde_json::from_str(body).unwrap();
        assert_eq!(req, Request::new("c0ffee", "default"));
        assert_eq!(serde_json::to_string(&req).unwrap(), body);
    }

    #[test]
    fn error_wire_form_and_kinds() {
        let e = ErrorBody::new(ErrorKind::NoSlotAvailable, "3 of 3 slots taken");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"no_slot_available","value":"3 of 3 slots taken"}"#
        );
        assert_eq!(e.known_kind(), Some(ErrorKind::NoSlotAvailable));
        let foreign: ErrorBody =
            serde_json::from_str(r#"{"kind":"failed_lock","value":"x"}"#).unwrap();
        assert_eq!(foreign.known_kind(), None);
        for k in ErrorKind::ALL {
            assert_eq!(k.as_str().parse::<ErrorKind>(), Ok(k));
            assert_ne!(k.http_status(), 200);
        }
    }

    #[test]
    fn group_and_id_rules() {
        let check_group = |g: &str, ok: bool| assert_eq!(validate_group(g).is_ok(), ok, "{g:?}");
        check_group("default", true);
        check_group("workers.eu-west-1", true);
        check_group("A9", true);
        check_group("", false);
        check_group("a_b", false);
        check_group("a/b", false);
        check_group("a b", false);
        check_group("é", false);
        check_group(&"a".repeat(254), false);
        let check_id = |i: &str, ok: bool| assert_eq!(validate_id(i).is_ok(), ok, "{i:?}");
        check_id("2b9c8a0e4f5d4c6b8f0a1b2c3d4e5f60", true);
        check_id("node-1.example.com", true);
        check_id("", false);
        check_id("a/b", false);
        check_id("a\nb", false);
        let err = Request::new("x", "bad group").validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidGroup);
        assert!(err.to_string().contains("bad group"));
    }
}
