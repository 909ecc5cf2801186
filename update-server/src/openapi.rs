//! The OpenAPI 3.1 description of the admin API, served at `/api/v1/openapi.json`.

use serde_json::{Value, json};

fn op(summary: &str, role: &str, extra: Value) -> Value {
    let mut v = json!({
        "summary": summary,
        "description": format!("Needs a bearer token with role {role}."),
        "security": [{"bearer": []}],
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {}}},
            "401": {"description": "missing or unknown token", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            "403": {"description": "viewer token on a write", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        }
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in e {
            o.insert(k.clone(), val.clone());
        }
    }
    v
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

fn query_param(name: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}})
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "twinroot update-server admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Releases, channels, promotion, rollout policies, instances and activity. Hosts use the Omaha endpoint POST /v1/update/ instead, which cannot change releases or policies."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Promote": {"type": "object", "properties": {"channel": {"type": "string"}, "force": {"type": "boolean", "default": false}}, "required": ["channel"], "additionalProperties": false},
                "CreateChannel": {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}, "after": {"type": "string"}}, "required": ["name", "after"], "additionalProperties": false},
                "LiftQuarantine": {"type": "object", "properties": {"version": {"type": "string"}}, "required": ["version"], "additionalProperties": false},
                "Pause": {"type": "object", "properties": {"group": {"type": "string"}, "reason": {"type": "string"}}, "additionalProperties": false},
                "SetRollout": {"type": "object", "properties": {"group": {"type": "string"}, "policy": {"$ref": "#/components/schemas/RolloutPolicy"}}, "required": ["policy"], "additionalProperties": false},
                "RolloutPolicy": {
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "start_percent": {"type": "number", "minimum": 0, "maximum": 100, "default": 100},
                        "ramp": {"oneOf": [
                            {"type": "object", "properties": {"kind": {"const": "none"}}},
                            {"type": "object", "properties": {"kind": {"const": "linear"}, "duration_secs": {"type": "integer"}}},
                            {"type": "object", "properties": {"kind": {"const": "steps"}, "steps": {"type": "array", "items": {"type": "object", "properties": {"after_secs": {"type": "integer"}, "percent": {"type": "number"}}}}}}
                        ]},
                        "rate_limit": {"type": ["object", "null"], "properties": {"max_grants": {"type": "integer"}, "period_secs": {"type": "integer"}}},
                        "max_in_flight": {"type": ["integer", "null"]},
                        "in_flight_timeout_secs": {"type": "integer", "default": 7200},
                        "windows": {"type": "array", "items": {"type": "object", "properties": {
                            "days": {"type": "array", "items": {"type": "string", "enum": ["mon","tue","wed","thu","fri","sat","sun"]}},
                            "start": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
                            "length_minutes": {"type": "integer"},
                            "time_zone": {"type": "string"}}}},
                        "halt": {"type": ["object", "null"], "properties": {"max_failure_percent": {"type": "number"}, "min_reports": {"type": "integer"}}},
                        "pin": {"type": ["string", "null"], "description": "serve this release instead of the channel's (may be a downgrade)"}
                    }
                }
            }
        },
        "paths": {
            "/api/v1/releases": {
                "get": op("List releases", "viewer or admin", json!({})),
                "post": op("Upload a signed release bundle (raw body); verified against the server keyring and stored under its SHA-256", "admin",
                    json!({"requestBody": {"required": true, "content": {"application/octet-stream": {}}}}))
            },
            "/api/v1/releases/{version}": {"get": op("One release", "viewer or admin", json!({"parameters": [path_param("version")]}))},
            "/api/v1/releases/{version}/promote": {"post": op("Promote a release to a channel (alpha, then beta, then stable; force skips)", "admin",
                json!({"parameters": [path_param("version")], "requestBody": json_body("Promote")}))},
            "/api/v1/channels": {
                "get": op("List channels in promotion order and their releases", "viewer or admin", json!({})),
                "post": op("Add a channel to the promotion order right after another (201; 422 bad name, 409 exists, 404 unknown after)", "admin", json!({"requestBody": json_body("CreateChannel")}))
            },
            "/api/v1/rollouts": {"get": op("List rollouts with their current percent", "viewer or admin", json!({"parameters": [query_param("channel")]}))},
            "/api/v1/rollouts/{channel}": {
                "get": op("Show a rollout", "viewer or admin", json!({"parameters": [path_param("channel"), query_param("group")]})),
                "put": op("Set the policy of a channel, or of a group override inside it", "admin", json!({"parameters": [path_param("channel")], "requestBody": json_body("SetRollout")}))
            },
            "/api/v1/rollouts/{channel}/pause": {"post": op("Pause a rollout", "admin", json!({"parameters": [path_param("channel")], "requestBody": json_body("Pause")}))},
            "/api/v1/rollouts/{channel}/resume": {"post": op("Resume a rollout (also after an automatic halt)", "admin", json!({"parameters": [path_param("channel")], "requestBody": json_body("Pause")}))},
            "/api/v1/instances": {"get": op("List hosts in machine id order, filtered by channel, version, group and status (idle, granted, downloading, downloaded, installed, complete, error, rolled_back, deferred; 422 otherwise). At most `limit` (1-100000, default 100000) from after the machine id `after`; a full page carries the header X-Next-After, the `after` of the next page", "viewer or admin", json!({"parameters": [query_param("channel"), query_param("version"), query_param("group"), query_param("status"), query_param("after"), {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100000}}]}))},
            "/api/v1/instances/{machine_id}/history": {"get": op("A host's status history", "viewer or admin", json!({"parameters": [path_param("machine_id")]}))},
            "/api/v1/instances/{machine_id}/lift-quarantine": {"post": op("Let a host install a release it failed again: clears the server's quarantine and sends twinroot_lift_quarantine to the host until it reports the version, fails it again, or 7 days pass; 404 for an unknown host", "admin",
                json!({"parameters": [path_param("machine_id")], "requestBody": json_body("LiftQuarantine")}))},
            "/api/v1/activity": {"get": op("Activity log, newest first", "viewer or admin", json!({"parameters": [query_param("limit")]}))},
            "/api/v1/timeline": {"get": op("Status history counted per time bucket", "viewer or admin", json!({"parameters": [query_param("since"), query_param("bucket_secs"), query_param("channel")]}))}
        }
    })
}
