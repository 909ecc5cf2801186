//! Omaha conformance, releases and promotion, policy rules end to end, automatic halt, auth and
//! hostile input, against a real server with a real SQLite database.

mod common;

use base64::Engine as _;
use common::*;
use reqwest::Method;
use serde_json::json;
use sha2::{Digest, Sha256};
use twinroot_format::omaha::{self, AppRequest, Request, error_code, event_result, event_type};

#[tokio::test]
async fn update_engine_request_gets_noupdate_then_a_valid_offer() {
    let s = TestServer::start().await;
    // No release yet: noupdate, with daystart, ping and status ok as update_engine expects.
    let r = s.omaha(&ue_request("m1", "1.0.0", "stable", vec![])).await;
    assert_eq!(r.protocol, "3.0");
    assert!(r.daystart.is_some());
    assert_eq!(r.apps[0].status, "ok");
    assert!(r.apps[0].ping);
    assert!(is_noupdate(&r));

    s.release_on("2.0.0", "stable").await;
    let r = s.omaha(&ue_request("m1", "1.0.0", "stable", vec![])).await;
    let offer = granted(&r).expect("an offer");
    offer.check().expect("update_engine accepts the offer");
    assert_eq!(offer.version, "2.0.0");

    // The payload URL serves exactly the bytes the offer describes.
    let url = offer.payload_url().unwrap();
    let body = s
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let pkg = &offer.packages[0];
    assert_eq!(body.len() as u64, pkg.size);
    let sha256_b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
    assert_eq!(
        offer.postinstall().unwrap().sha256_base64.as_deref(),
        Some(sha256_b64.as_str())
    );
    let sha1_b64 =
        base64::engine::general_purpose::STANDARD.encode(<sha1::Sha1 as Digest>::digest(&body));
    assert_eq!(pkg.hash_sha1_base64.as_deref(), Some(sha1_b64.as_str()));

    // Resumable: a Range request continues where a download stopped; ETag revalidates.
    let resp = s
        .http
        .get(&url)
        .header("range", "bytes=100-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    let etag = resp.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(
        resp.headers()["content-range"].to_str().unwrap(),
        format!("bytes 100-{}/{}", body.len() - 1, body.len())
    );
    assert_eq!(&resp.bytes().await.unwrap()[..], &body[100..]);
    let resp = s
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 304);
    let resp = s
        .http
        .get(&url)
        .header("range", format!("bytes={}-", body.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 416);

    // The host downloads, installs, reboots, and reports like update_engine: an <event> beside
    // <updatecheck>, on the new version.
    for (t, res) in [
        (event_type::DOWNLOAD_STARTED, event_result::SUCCESS),
        (event_type::DOWNLOAD_FINISHED, event_result::SUCCESS),
        (event_type::UPDATE_COMPLETE, event_result::SUCCESS),
    ] {
        let r = s
            .omaha(&event_request(
                "m1",
                "1.0.0",
                "stable",
                vec![ev(t, res, None)],
            ))
            .await;
        assert_eq!(r.apps[0].events, 1);
    }
    let mut after = ev(
        event_type::UPDATE_COMPLETE,
        event_result::SUCCESS_REBOOT,
        None,
    );
    after.previous_version = Some("1.0.0".into());
    let r = s
        .omaha(&ue_request("m1", "2.0.0", "stable", vec![after]))
        .await;
    assert_eq!(r.apps[0].events, 1);
    assert!(is_noupdate(&r), "current host gets noupdate");
    let inst = s.get("/api/v1/instances").await;
    assert_eq!(inst[0]["status"], "complete");
    assert_eq!(inst[0]["version"], "2.0.0");
    assert_eq!(inst[0]["outcome"], "success");
    let hist = s.get("/api/v1/instances/m1/history").await;
    let statuses = strings_of(&hist, "status");
    assert_eq!(
        statuses,
        [
            "granted",
            "downloading",
            "downloaded",
            "installed",
            "complete"
        ]
    );
    let timeline = s.get("/api/v1/timeline?bucket_secs=3600").await;
    assert!(!timeline.as_array().unwrap().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn several_apps_unknown_apps_and_configurable_app_id() {
    let s = TestServer::start_with(|c| c.app_id = "{our-app}".into()).await;
    s.release_on("2.0.0", "stable").await;
    let mut req = ue_request("m1", "1.0.0", "stable", vec![]);
    req.apps[0].app_id = "{OUR-APP}".into();
    req.apps.push(AppRequest {
        app_id: omaha::FLATCAR_APP_ID.into(),
        machine_id: Some("m1".into()),
        version: Some("1.0.0".into()),
        update_check: Some(Default::default()),
        ..AppRequest::default()
    });
    let r = s.omaha(&req).await;
    assert_eq!(r.apps.len(), 2);
    assert!(granted(&r).is_some());
    assert_eq!(r.apps[1].status, "error-unknownApplication");
    // targetversionprefix keeps a host within a release line.
    let mut pinned = ue_request("m3", "1.0.0", "stable", vec![]);
    pinned.apps[0].app_id = "{our-app}".into();
    pinned.apps[0].update_check = Some(omaha::UpdateCheck {
        target_version_prefix: Some("1.".into()),
    });
    assert!(is_noupdate(&s.omaha(&pinned).await));
    pinned.apps[0].update_check = Some(omaha::UpdateCheck {
        target_version_prefix: Some("2.0".into()),
    });
    assert!(granted(&s.omaha(&pinned).await).is_some());
    // Raw update_engine bytes, with attributes we do not know.
    let raw = r#"<?xml version="1.0" encoding="UTF-8"?>
<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" installsource="ondemandupdate" ismachine="1">
    <os version="Chateau" platform="CoreOS" sp="1.0.0_x86_64"></os>
    <app appid="{our-app}" version="1.0.0" track="stable" bootid="{b}" oem="" oemversion="" alephversion="1.0.0" machineid="m2" machinealias="" lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false" futureattr="x">
        <ping active="1"></ping>
        <updatecheck></updatecheck>
        <futureelement/>
    </app>
</request>"#;
    let (status, body) = omaha_raw(&s.http, &s.url, raw.to_string()).await;
    assert_eq!(status, 200);
    let r = omaha::Response::parse(body.as_bytes()).unwrap();
    granted(&r).expect("offer").check().unwrap();
    s.stop().await;
}

#[tokio::test]
async fn promotion_order_force_and_signature_checks() {
    let s = TestServer::start().await;
    let bytes = bundle(&s.signer, "3.1.0");
    let (status, v) = s.upload(bytes.clone(), &s.admin).await;
    assert_eq!(status, 201, "{v}");
    let sha = v["sha256"].as_str().unwrap().to_string();
    assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
    // Same bytes again: idempotent.
    let (status, _) = s.upload(bytes.clone(), &s.admin).await;
    assert_eq!(status, 200);

    // Skipping alpha is refused without force.
    let (status, v) = s
        .api(
            Method::POST,
            "/api/v1/releases/3.1.0/promote",
            Some(&s.admin),
            Some(json!({"channel": "beta"})),
        )
        .await;
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("alpha"));
    for ch in ["alpha", "beta", "stable"] {
        s.post("/api/v1/releases/3.1.0/promote", json!({"channel": ch}))
            .await;
    }
    let channels = s.get("/api/v1/channels").await;
    assert!(
        channels
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["release_version"] == "3.1.0")
    );
    // Every channel serves the identical bytes.
    let mut shas = Vec::new();
    for ch in ["alpha", "beta", "stable"] {
        let r = s
            .omaha(&ue_request(&format!("h-{ch}"), "1.0.0", ch, vec![]))
            .await;
        shas.push(
            granted(&r).unwrap().packages[0]
                .hash_sha256_hex
                .clone()
                .unwrap(),
        );
    }
    assert!(shas.iter().all(|x| *x == sha));

    // Force skips the order.
    let (status, _) = s.upload(bundle(&s.signer, "3.2.0"), &s.admin).await;
    assert_eq!(status, 201);
    s.post(
        "/api/v1/releases/3.2.0/promote",
        json!({"channel": "stable", "force": true}),
    )
    .await;
    let releases = s.get("/api/v1/releases").await;
    let r32 = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "3.2.0")
        .unwrap();
    assert_eq!(r32["channels"], json!(["stable"]));

    // A bundle signed by a key outside the keyring is refused and nothing is stored.
    let other = signer(s.dir.path(), "intruder");
    let (status, v) = s.upload(bundle(&other, "6.6.6"), &s.admin).await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("bundle rejected"),
        "{v}"
    );
    // A truncated bundle is refused too.
    let (status, _) = s.upload(bytes[..bytes.len() - 10].to_vec(), &s.admin).await;
    assert_eq!(status, 422);
    let releases = s.get("/api/v1/releases").await;
    assert_eq!(releases.as_array().unwrap().len(), 2);
    let blobs = std::fs::read_dir(s.dir.path().join("data/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 2);
    let activity = s.get("/api/v1/activity").await;
    assert!(
        activity
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["message"].as_str().unwrap().contains("forced"))
    );
    s.stop().await;
}

/// Host `id` on stable, running 1.0.0, reports a failed install (event 3, result 0) with `code`.
async fn report_failure(s: &TestServer, id: &str, code: i64) {
    let failed = ev(event_type::UPDATE_COMPLETE, event_result::ERROR, Some(code));
    s.omaha(&event_request(id, "1.0.0", "stable", vec![failed]))
        .await;
}

/// A server with release 2.0.0 on stable under `policy`.
async fn serving_2_0_0(policy: serde_json::Value) -> TestServer {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "stable").await;
    set_policy(&s, "stable", None, policy).await;
    s
}

async fn set_policy(s: &TestServer, channel: &str, group: Option<&str>, policy: serde_json::Value) {
    s.put(
        &format!("/api/v1/rollouts/{channel}"),
        json!({"group": group, "policy": policy}),
    )
    .await;
}

#[tokio::test]
async fn policy_rules_hold_with_noupdate() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "stable").await;

    // 0%: everyone held, as noupdate (never an error status).
    set_policy(&s, "stable", None, json!({"start_percent": 0})).await;
    for i in 0..20 {
        assert!(is_noupdate(
            &s.omaha(&ue_request(&format!("z{i}"), "1.0.0", "stable", vec![]))
                .await
        ));
    }
    // A group override at 100% lets the canary group through while the channel holds.
    set_policy(&s, "stable", Some("canary"), json!({"start_percent": 100})).await;
    let mut req = ue_request("c1", "1.0.0", "stable", vec![]);
    req.apps[0].cohort_name = Some("canary".into());
    assert!(granted(&s.omaha(&req).await).is_some());
    let mut req = ue_request("c2", "1.0.0", "stable", vec![]);
    req.apps[0].group = Some("canary".into());
    assert!(granted(&s.omaha(&req).await).is_some());

    // 50%: the eligible set is stable between check-ins and roughly half.
    set_policy(&s, "stable", None, json!({"start_percent": 50})).await;
    let mut first = Vec::new();
    for i in 0..40 {
        first.push(
            granted(
                &s.omaha(&ue_request(&format!("p{i}"), "1.0.0", "stable", vec![]))
                    .await,
            )
            .is_some(),
        );
    }
    let n = first.iter().filter(|g| **g).count();
    assert!((8..=32).contains(&n), "{n} of 40 granted at 50%");
    for (i, was) in first.iter().enumerate() {
        let again = granted(
            &s.omaha(&ue_request(&format!("p{i}"), "1.0.0", "stable", vec![]))
                .await,
        )
        .is_some();
        assert_eq!(again, *was, "host p{i} changed cohort");
    }

    // Max in flight: 100%, at most 2 hosts granted and not finished.
    set_policy(&s, "beta", None, json!({"max_in_flight": 2})).await;
    s.post(
        "/api/v1/releases/2.0.0/promote",
        json!({"channel": "beta", "force": true}),
    )
    .await;
    let g: Vec<bool> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(
                granted(
                    &s.omaha(&ue_request(&format!("f{i}"), "1.0.0", "beta", vec![]))
                        .await,
                )
                .is_some(),
            );
        }
        v
    };
    assert_eq!(g, [true, true, false, false]);
    // f0 finishes; a slot frees up.
    s.omaha(&ue_request("f0", "2.0.0", "beta", vec![ev(3, 2, None)]))
        .await;
    assert!(granted(&s.omaha(&ue_request("f2", "1.0.0", "beta", vec![])).await).is_some());
    // A host with a grant in flight is answered again.
    assert!(granted(&s.omaha(&ue_request("f1", "1.0.0", "beta", vec![])).await).is_some());

    // Rate limit: 1 grant per hour on alpha.
    s.post(
        "/api/v1/releases/2.0.0/promote",
        json!({"channel": "alpha", "force": true}),
    )
    .await;
    set_policy(
        &s,
        "alpha",
        None,
        json!({"rate_limit": {"max_grants": 1, "period_secs": 3600}}),
    )
    .await;
    assert!(granted(&s.omaha(&ue_request("r0", "1.0.0", "alpha", vec![])).await).is_some());
    assert!(is_noupdate(
        &s.omaha(&ue_request("r1", "1.0.0", "alpha", vec![])).await
    ));

    // A window that is never now (a one-minute window on a day other than today) holds.
    let today = chrono::Utc::now().format("%a").to_string().to_lowercase();
    let other = if today == "mon" { "tue" } else { "mon" };
    set_policy(
        &s,
        "alpha",
        None,
        json!({"windows": [{"days": [other], "start": "00:00", "length_minutes": 1, "time_zone": "UTC"}]}),
    )
    .await;
    assert!(is_noupdate(
        &s.omaha(&ue_request("w0", "1.0.0", "alpha", vec![])).await
    ));

    // Pause and resume by hand.
    set_policy(&s, "alpha", None, json!({})).await;
    s.post(
        "/api/v1/rollouts/alpha/pause",
        json!({"reason": "looking into it"}),
    )
    .await;
    assert!(is_noupdate(
        &s.omaha(&ue_request("q0", "1.0.0", "alpha", vec![])).await
    ));
    let shown = s.get("/api/v1/rollouts/alpha").await;
    assert_eq!(shown["paused"], true);
    assert_eq!(shown["pause_reason"], "looking into it");
    s.post("/api/v1/rollouts/alpha/resume", json!({})).await;
    assert!(granted(&s.omaha(&ue_request("q0", "1.0.0", "alpha", vec![])).await).is_some());

    // Invalid policies are refused with the field named.
    let (status, v) = s
        .api(
            Method::PUT,
            "/api/v1/rollouts/alpha",
            Some(&s.admin),
            Some(json!({"policy": {"start_percent": 300}})),
        )
        .await;
    assert_eq!(status, 422);
    assert!(v["error"].as_str().unwrap().contains("start_percent"));
    s.stop().await;
}

#[tokio::test]
async fn pin_serves_an_older_release_as_downgrade() {
    let s = TestServer::start().await;
    s.release_on("1.0.0", "stable").await;
    s.release_on("2.0.0", "stable").await;
    // A host on 2.0.0 is current.
    assert!(is_noupdate(
        &s.omaha(&ue_request("d1", "2.0.0", "stable", vec![])).await
    ));
    set_policy(&s, "stable", None, json!({"pin": "1.0.0"})).await;
    let offer = granted(&s.omaha(&ue_request("d1", "2.0.0", "stable", vec![])).await).unwrap();
    assert_eq!(offer.version, "1.0.0");
    // Pinning to a release that does not exist is refused.
    let (status, _) = s
        .api(
            Method::PUT,
            "/api/v1/rollouts/stable",
            Some(&s.admin),
            Some(json!({"policy": {"pin": "9.9.9"}})),
        )
        .await;
    assert_eq!(status, 422);
    s.stop().await;
}

#[tokio::test]
async fn failures_halt_the_rollout_until_resumed() {
    let s = serving_2_0_0(json!({"halt": {"max_failure_percent": 40, "min_reports": 3}})).await;
    for i in 0..5 {
        assert!(
            granted(
                &s.omaha(&ue_request(&format!("h{i}"), "1.0.0", "stable", vec![]))
                    .await
            )
            .is_some()
        );
    }
    // One success, then an install error, then a rollback (errorcode 44, reported on the old version).
    s.omaha(&ue_request("h0", "2.0.0", "stable", vec![ev(3, 2, None)]))
        .await;
    report_failure(&s, "h1", 7).await;
    // 1 failure of 2 reports: below min_reports, still rolling.
    assert!(granted(&s.omaha(&ue_request("h5", "1.0.0", "stable", vec![])).await).is_some());
    s.omaha(&ue_request(
        "h2",
        "1.0.0",
        "stable",
        vec![ev(3, 0, Some(error_code::ROLLBACK))],
    ))
    .await;
    // 2 of 3 failed (66% > 40%): halted.
    let shown = s.get("/api/v1/rollouts/stable").await;
    assert_eq!(shown["paused"], true, "{shown}");
    assert_eq!(shown["auto_halted"], true);
    assert!(shown["pause_reason"].as_str().unwrap().contains("2 of 3"));
    assert!(is_noupdate(
        &s.omaha(&ue_request("h9", "1.0.0", "stable", vec![])).await
    ));
    let inst = s.get("/api/v1/instances").await;
    let h2 = inst
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["machine_id"] == "h2")
        .unwrap();
    assert_eq!(h2["status"], "rolled_back");
    assert_eq!(h2["error_code"], 44);
    // The failed hosts are not offered the release again.
    assert!(is_noupdate(
        &s.omaha(&ue_request("h1", "1.0.0", "stable", vec![])).await
    ));
    let activity = s.get("/api/v1/activity").await;
    assert!(activity[0]["kind"] == "rollout_halted", "{activity}");
    let metrics = s.metrics().await;
    assert!(metrics.contains("twinroot_rollout_paused{channel=\"stable\",group=\"\",automatic=\"true\",reason=\"automatic halt: 2 of 3"), "{metrics}");
    assert!(
        metrics.contains("twinroot_update_failures{channel=\"stable\",group=\"\",window=\"1h\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("twinroot_hosts{channel=\"stable\""));
    assert!(
        metrics.contains("twinroot_holds_total{reason=\"paused\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("twinroot_holds_total{reason=\"quarantined\"} 2"),
        "{metrics}"
    );
    // The operator resumes: rolling again, judged on outcomes from here on.
    s.post("/api/v1/rollouts/stable/resume", json!({})).await;
    assert!(granted(&s.omaha(&ue_request("h9", "1.0.0", "stable", vec![])).await).is_some());
    s.stop().await;
}

#[tokio::test]
async fn auth_refuses_and_changes_nothing() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "alpha").await;
    let before = (
        s.get("/api/v1/channels").await,
        s.get("/api/v1/rollouts").await,
    );
    let writes = [
        (
            Method::POST,
            "/api/v1/releases/2.0.0/promote",
            Some(json!({"channel": "beta"})),
        ),
        (
            Method::PUT,
            "/api/v1/rollouts/alpha",
            Some(json!({"policy": {"start_percent": 1}})),
        ),
        (
            Method::POST,
            "/api/v1/rollouts/alpha/pause",
            Some(json!({})),
        ),
    ];
    for (m, path, body) in &writes {
        let (st, _) = s.api(m.clone(), path, None, body.clone()).await;
        assert_eq!(st, 401, "{path} without token");
        let (st, _) = s
            .api(m.clone(), path, Some("trt_bogus"), body.clone())
            .await;
        assert_eq!(st, 401, "{path} with unknown token");
        let (st, v) = s.api(m.clone(), path, Some(&s.viewer), body.clone()).await;
        assert_eq!(st, 403, "{path} with viewer token: {v}");
    }
    let (st, _) = s.upload(bundle(&s.signer, "4.0.0"), &s.viewer).await;
    assert_eq!(st, 403);
    let (st, _) = s.api(Method::GET, "/api/v1/releases", None, None).await;
    assert_eq!(st, 401);
    // Viewers read.
    let (st, _) = s
        .api(Method::GET, "/api/v1/releases", Some(&s.viewer), None)
        .await;
    assert_eq!(st, 200);
    let after = (
        s.get("/api/v1/channels").await,
        s.get("/api/v1/rollouts").await,
    );
    assert_eq!(before, after);
    assert_eq!(s.get("/api/v1/releases").await.as_array().unwrap().len(), 1);
    // The OpenAPI document is public and lists the API.
    let (st, doc) = s.api(Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(st, 200);
    assert!(doc["paths"]["/api/v1/rollouts/{channel}"]["put"].is_object());
    // Tokens are stored hashed.
    let needle = s.admin.as_bytes();
    for f in ["server.db", "server.db-wal"] {
        let db = std::fs::read(s.dir.path().join("data").join(f)).unwrap_or_default();
        assert!(
            !db.windows(needle.len()).any(|w| w == needle),
            "{f} holds a token"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn hostile_input_is_refused_and_the_server_keeps_serving() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "stable").await;
    let post = |body: Vec<u8>| {
        let http = s.http.clone();
        let url = format!("{}/v1/update/", s.url);
        async move {
            http.post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><request protocol="3.0"><app appid="&lol2;"/></request>"#;
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"not xml at all".to_vec(), 400),
        (b"<request protocol=\"3.0\"><app appid=\"x\">".to_vec(), 400),
        (laughs.as_bytes().to_vec(), 400),
        (
            format!("<request>{}", "<a>".repeat(10_000)).into_bytes(),
            400,
        ),
        (vec![0xff; 1000], 400),
        (b"<request protocol=\"9.0\"/>".to_vec(), 400),
        (vec![b' '; 200_000], 413),
        (
            format!(
                "<request protocol=\"3.0\">{}</request>",
                "<app appid=\"a\"/>".repeat(1000)
            )
            .into_bytes(),
            400,
        ),
    ];
    for (body, want) in cases {
        let preview = String::from_utf8_lossy(&body[..body.len().min(40)]).to_string();
        assert_eq!(post(body).await, want, "{preview}");
    }
    // Hostile JSON on the admin API.
    let raw = |body: Vec<u8>| {
        let http = s.http.clone();
        let url = format!("{}/api/v1/rollouts/stable", s.url);
        let token = s.admin.clone();
        async move {
            http.put(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(raw(b"{".to_vec()).await, 400);
    // Too deeply nested for the JSON parser's recursion limit.
    let deep = raw(format!("{}1{}", "[".repeat(5000), "]".repeat(5000)).into_bytes()).await;
    assert!((400..500).contains(&deep), "{deep}");
    assert_eq!(
        raw(br#"{"policy": {"start_percent": "lots"}}"#.to_vec()).await,
        422
    );
    assert_eq!(raw(br#"{"policy": {}, "surprise": 1}"#.to_vec()).await, 422);
    let mut big = br#"{"policy": {}, "group": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend(br#""}"#);
    assert_eq!(raw(big).await, 413);
    // Garbage instead of a bundle.
    let (st, _) = s.upload(vec![7u8; 5000], &s.admin).await;
    assert_eq!(st, 422);
    // Still serving, state intact.
    let r = s.omaha(&ue_request("ok1", "1.0.0", "stable", vec![])).await;
    granted(&r).unwrap().check().unwrap();
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("twinroot_bad_requests_total 7"),
        "{metrics}"
    );
    let unknown_channel = s
        .omaha(&ue_request("ok2", "1.0.0", "nightly", vec![]))
        .await;
    assert!(is_noupdate(&unknown_channel));
    let no_machine = s
        .omaha(&Request {
            apps: vec![AppRequest {
                app_id: APP_ID.into(),
                update_check: Some(Default::default()),
                ..AppRequest::default()
            }],
            ..Request::default()
        })
        .await;
    assert!(is_noupdate(&no_machine));
    s.stop().await;
}

#[tokio::test]
async fn concurrent_check_ins_respect_limits_within_a_batch() {
    let s = serving_2_0_0(
        json!({"max_in_flight": 4, "halt": {"max_failure_percent": 50, "min_reports": 4}}),
    )
    .await;
    let ask = |ids: Vec<String>, events: Vec<twinroot_format::omaha::Event>| {
        let mut tasks = Vec::new();
        for id in ids {
            let http = s.http.clone();
            let url = s.url.clone();
            let events = events.clone();
            tasks.push(tokio::spawn(async move {
                let r = omaha_post(&http, &url, &ue_request(&id, "1.0.0", "stable", events)).await;
                granted(&r).map(|_| id)
            }));
        }
        async move {
            let mut got = Vec::new();
            for t in tasks {
                if let Some(id) = t.await.unwrap() {
                    got.push(id);
                }
            }
            got
        }
    };
    let first = ask((0..40).map(|i| format!("b{i}")).collect(), vec![]).await;
    assert_eq!(first.len(), 4, "{first:?}");
    // All four fail at once: the rollout halts, and nobody else gets the release.
    let again = ask(first.clone(), vec![ev(3, 0, Some(9))]).await;
    assert!(again.is_empty());
    let shown = s.get("/api/v1/rollouts/stable").await;
    assert_eq!(shown["auto_halted"], true, "{shown}");
    let halts = s.get("/api/v1/activity").await;
    let n = halts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "rollout_halted")
        .count();
    assert_eq!(n, 1, "exactly one halt entry");
    let later = ask((40..60).map(|i| format!("b{i}")).collect(), vec![]).await;
    assert!(later.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn time_scale_speeds_up_ramps_and_timestamps() {
    // One virtual hour per real second.
    let s = TestServer::start_with(|c| c.time_scale = 3600.0).await;
    s.release_on("2.0.0", "stable").await;
    set_policy(
        &s,
        "stable",
        None,
        json!({"start_percent": 0, "ramp": {"kind": "linear", "duration_secs": 3600}}),
    )
    .await;
    // A one-hour ramp reaches 100% after about one real second (at real time: an hour).
    wait_for(60, "the one-hour ramp to reach 100%", || async {
        let r = s.get("/api/v1/rollouts/stable").await;
        (r["current_percent"].as_f64() == Some(100.0)).then_some(())
    })
    .await;
    for i in 0..10 {
        let r = s
            .omaha(&ue_request(&format!("t{i}"), "1.0.0", "stable", vec![]))
            .await;
        assert!(granted(&r).is_some(), "host t{i} held at 100%");
    }
    // Timestamps follow the virtual clock: the host's last check-in and the activity entry of a
    // pause lie more than half an hour ahead of the wall clock.
    s.post("/api/v1/rollouts/stable/pause", json!({})).await;
    let real = chrono::Utc::now().timestamp();
    let act = s.get("/api/v1/activity?limit=1").await;
    assert_eq!(act[0]["kind"], "rollout_paused");
    assert!(act[0]["at"].as_i64().unwrap() > real + 1800, "{act}");
    let hosts = s.get("/api/v1/instances").await;
    assert!(hosts[0]["last_seen"].as_i64().unwrap() > real + 1800);
    assert!(s.state.now() > real + 1800);
    s.stop().await;
}

/// The quarantine lifts sent to host `id` (running `version`) in answer to an update check.
async fn lifts_for(s: &TestServer, id: &str, version: &str) -> Vec<String> {
    let r = s.omaha(&ue_request(id, version, "stable", vec![])).await;
    r.apps[0].lift_quarantine.clone()
}

#[tokio::test]
async fn quarantine_lift_reaches_only_its_host_until_it_reports_the_version() {
    // A nearly frozen clock (a millisecond per 17 real minutes): every failure, lift and grant
    // below happens in the same server millisecond, so the server must tell a failure after the
    // lift from the one it forgives by their order, not by their timestamps.
    let s = TestServer::start_with(|c| c.time_scale = 1e-6).await;
    s.release_on("2.0.0", "stable").await;
    for id in ["q1", "q2", "q3"] {
        assert!(granted(&s.omaha(&ue_request(id, "1.0.0", "stable", vec![])).await).is_some());
        // The install fails: the server quarantines the host for 2.0.0.
        report_failure(&s, id, 7).await;
        assert!(is_noupdate(
            &s.omaha(&ue_request(id, "1.0.0", "stable", vec![])).await
        ));
    }
    let path = "/api/v1/instances/q1/lift-quarantine";
    let activity_before = s.get("/api/v1/activity").await;

    // A viewer may not lift, and nothing changes.
    let (status, v) = s
        .api(
            Method::POST,
            path,
            Some(&s.viewer),
            Some(json!({"version": "2.0.0"})),
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(is_noupdate(
        &s.omaha(&ue_request("q1", "1.0.0", "stable", vec![])).await
    ));
    assert!(lifts_for(&s, "q1", "1.0.0").await.is_empty());
    assert_eq!(s.get("/api/v1/activity").await, activity_before);

    // Unknown host and bad version: clear errors.
    let (status, v) = s
        .api(
            Method::POST,
            "/api/v1/instances/nobody/lift-quarantine",
            Some(&s.admin),
            Some(json!({"version": "2.0.0"})),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("host nobody"), "{v}");
    let (status, v) = s
        .api(
            Method::POST,
            path,
            Some(&s.admin),
            Some(json!({"version": "two"})),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("\"two\""), "{v}");

    // The lift: recorded, the hold is gone, and only q1 is told (with noupdate while paused).
    s.post("/api/v1/rollouts/stable/pause", json!({})).await;
    let lift = s.post(path, json!({"version": "2.0.0"})).await;
    assert_eq!(lift["machine_id"], "q1");
    let act = s.get("/api/v1/activity?limit=1").await;
    assert_eq!(act[0]["kind"], "quarantine_lifted", "{act}");
    assert_eq!(act[0]["version"], "2.0.0");
    let (_, raw) = omaha_raw(
        &s.http,
        &s.url,
        ue_request("q1", "1.0.0", "stable", vec![]).to_xml(),
    )
    .await;
    assert!(
        raw.contains(r#"<updatecheck status="noupdate" twinroot_lift_quarantine="2.0.0">"#),
        "{raw}"
    );
    assert!(lifts_for(&s, "q2", "1.0.0").await.is_empty());
    s.post("/api/v1/rollouts/stable/resume", json!({})).await;
    let r = s.omaha(&ue_request("q1", "1.0.0", "stable", vec![])).await;
    assert!(granted(&r).is_some(), "lifted host not offered 2.0.0 again");
    assert_eq!(r.apps[0].lift_quarantine, ["2.0.0"]);
    assert!(is_noupdate(
        &s.omaha(&ue_request("q2", "1.0.0", "stable", vec![])).await
    ));
    // Once the host reports running 2.0.0, the lift is done.
    s.omaha(&ue_request("q1", "2.0.0", "stable", vec![ev(3, 2, None)]))
        .await;
    assert!(lifts_for(&s, "q1", "2.0.0").await.is_empty());

    // A host that fails the release again after its lift is quarantined again, and not told.
    s.post(
        "/api/v1/instances/q3/lift-quarantine",
        json!({"version": "2.0.0"}),
    )
    .await;
    assert!(granted(&s.omaha(&ue_request("q3", "1.0.0", "stable", vec![])).await).is_some());
    report_failure(&s, "q3", error_code::ROLLBACK).await;
    let r = s.omaha(&ue_request("q3", "1.0.0", "stable", vec![])).await;
    assert!(is_noupdate(&r));
    assert!(r.apps[0].lift_quarantine.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn quarantine_lift_expires_after_seven_days_of_server_time() {
    // One virtual day per real second: the lift is sent for about seven real seconds.
    let s = TestServer::start_with(|c| c.time_scale = 86_400.0).await;
    s.omaha(&ue_request("e1", "1.0.0", "stable", vec![])).await;
    s.post(
        "/api/v1/instances/e1/lift-quarantine",
        json!({"version": "2.0.0"}),
    )
    .await;
    assert_eq!(lifts_for(&s, "e1", "1.0.0").await, ["2.0.0"]);
    wait_for(120, "the lift to expire", || async {
        lifts_for(&s, "e1", "1.0.0").await.is_empty().then_some(())
    })
    .await;
    s.stop().await;
}

/// Status and error message of an admin call that must fail.
async fn refused(
    s: &TestServer,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> (u16, String) {
    let (status, v) = s.api(method, path, Some(&s.admin), Some(body)).await;
    assert!(status >= 400, "{path}: {status} {v}");
    (status, v["error"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn created_channels_join_the_promotion_order() {
    let s = TestServer::start().await;
    let created = s
        .post(
            "/api/v1/channels",
            json!({"name": "canary", "after": "alpha"}),
        )
        .await;
    assert_eq!(created["after"], "alpha");
    s.post(
        "/api/v1/channels",
        json!({"name": "lts-2026", "after": "stable"}),
    )
    .await;
    let names: Vec<String> = s
        .get("/api/v1/channels")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["alpha", "canary", "beta", "stable", "lts-2026"]);

    // Bad names, duplicates and unknown predecessors are refused with clear errors.
    for bad in ["", "Canary", "with space", "-x", &"x".repeat(65)] {
        let (status, e) = refused(
            &s,
            Method::POST,
            "/api/v1/channels",
            json!({"name": bad, "after": "alpha"}),
        )
        .await;
        assert_eq!(status, 422, "{bad}: {e}");
        assert!(
            e.contains("invalid") && e.contains(&format!("{bad:?}")),
            "{e}"
        );
    }
    let (status, e) = refused(
        &s,
        Method::POST,
        "/api/v1/channels",
        json!({"name": "beta", "after": "alpha"}),
    )
    .await;
    assert_eq!((status, e.as_str()), (409, "channel beta already exists"));
    let (status, e) = refused(
        &s,
        Method::POST,
        "/api/v1/channels",
        json!({"name": "edge", "after": "nightly"}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(e.contains("nightly"), "{e}");
    let (status, _) = s
        .api(
            Method::POST,
            "/api/v1/channels",
            Some(&s.viewer),
            Some(json!({"name": "edge", "after": "alpha"})),
        )
        .await;
    assert_eq!(status, 403);

    // The promotion order now runs through canary: beta needs canary first.
    let (status, _) = s.upload(bundle(&s.signer, "4.0.0"), &s.admin).await;
    assert_eq!(status, 201);
    s.post(
        "/api/v1/releases/4.0.0/promote",
        json!({"channel": "alpha"}),
    )
    .await;
    let (status, e) = refused(
        &s,
        Method::POST,
        "/api/v1/releases/4.0.0/promote",
        json!({"channel": "beta"}),
    )
    .await;
    assert_eq!(status, 409);
    assert!(e.contains("canary"), "{e}");
    for ch in ["canary", "beta", "stable", "lts-2026"] {
        s.post("/api/v1/releases/4.0.0/promote", json!({"channel": ch}))
            .await;
    }
    // Hosts on a new channel are served, under the channel's own (default) rollout.
    let r = s
        .omaha(&ue_request("lts-host", "1.0.0", "lts-2026", vec![]))
        .await;
    assert_eq!(granted(&r).unwrap().version, "4.0.0");
    assert_eq!(s.get("/api/v1/rollouts/canary").await["paused"], false);
    let act = s.get("/api/v1/activity").await;
    assert!(
        act.as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "channel_created" && a["channel"] == "canary"),
        "{act}"
    );
    s.stop().await;
}

#[tokio::test]
async fn hosts_below_the_minimum_source_version_are_held() {
    let s = TestServer::start().await;
    let (status, v) = s
        .upload(bundle_over(&s.signer, "3.0.0", Some("2.0.0")), &s.admin)
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["min_source_version"], "2.0.0");
    s.post(
        "/api/v1/releases/3.0.0/promote",
        json!({"channel": "stable", "force": true}),
    )
    .await;
    assert!(is_noupdate(
        &s.omaha(&ue_request("old", "1.9.0", "stable", vec![])).await
    ));
    let r = s
        .omaha(&ue_request("recent", "2.0.0", "stable", vec![]))
        .await;
    assert_eq!(granted(&r).unwrap().version, "3.0.0");
    let metrics = s.metrics().await;
    assert!(
        metrics.contains("twinroot_holds_total{reason=\"below_min_source_version\"} 1"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_sped_up_clock_resumes_where_the_database_ends() {
    clock_resumes_where_the_database_ends(None).await;
}

#[tokio::test]
async fn a_sped_up_clock_resumes_where_the_database_ends_on_postgres() {
    let pg = common::postgres::Postgres::start().await;
    clock_resumes_where_the_database_ends(Some(&pg.url)).await;
}

async fn clock_resumes_where_the_database_ends(database: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let config = |scale: f64| {
        let mut c = update_server::server::ServerConfig::new(dir.path().join("data"));
        c.time_scale = scale;
        c.database_url = database.map(str::to_string);
        c
    };
    let future = chrono::Utc::now().timestamp() + 30 * 86_400;
    {
        let state = update_server::server::open_state(config(3600.0))
            .await
            .unwrap();
        let mut tx = state.store.begin().await.unwrap();
        update_server::store::Store::activity_in(&mut tx, future, "test", None, None, None, "x")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        state.checkins.close().await;
    }
    let state = update_server::server::open_state(config(3600.0))
        .await
        .unwrap();
    assert!(state.now() > future, "{} <= {future}", state.now());
    state.checkins.close().await;
    // At real time the server keeps the wall clock.
    let state = update_server::server::open_state(config(1.0))
        .await
        .unwrap();
    assert!(state.now() < future);
    state.checkins.close().await;
}

/// `/healthz` says `ok` while check-ins are recorded, and 503 once the check-in writer has ended
/// (here: stopped under a running HTTP server), when every check-in is answered with an error.
#[tokio::test]
async fn health_check_fails_once_check_ins_cannot_be_recorded() {
    let s = TestServer::start().await;
    let health = || s.get_text("/healthz");
    assert_eq!(health().await, (200, "ok\n".to_string()));
    assert!(is_noupdate(
        &s.omaha(&ue_request("h1", "1.0.0", "stable", vec![])).await
    ));
    s.state.checkins.close().await;
    let (code, body) = health().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("check-in writer stopped"), "{body}");
    let (status, _) = omaha_raw(
        &s.http,
        &s.url,
        ue_request("h1", "1.0.0", "stable", vec![]).to_xml(),
    )
    .await;
    assert_eq!(status, 503);
    s.stop().await;
}

/// The status of host `id`, as the admin API shows it.
async fn host_status(s: &TestServer, id: &str) -> String {
    let hosts = s.get("/api/v1/instances").await;
    let h = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["machine_id"] == id);
    h.unwrap_or_else(|| panic!("{id} missing: {hosts}"))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// This process's `twinroot_checkins_from_memory_total`.
async fn from_memory(s: &TestServer) -> u64 {
    let m = s.metrics().await;
    m.lines()
        .find_map(|l| l.strip_prefix("twinroot_checkins_from_memory_total "))
        .unwrap_or_else(|| panic!("no from-memory counter in {m}"))
        .parse()
        .unwrap()
}

/// Held hosts that only check in are answered from the writer's last committed view, on the
/// HTTP threads, and every change reaches them: a new policy, a host's own failure, a pause, a
/// quarantine lift, a new version or channel. Grants always go through the writer.
#[tokio::test]
async fn held_hosts_are_answered_from_memory_and_see_every_change() {
    let s = serving_2_0_0(json!({"start_percent": 0})).await;
    let check = |id: &str, version: &str| ue_request(id, version, "stable", vec![]);
    // First check-ins: new hosts, recorded by the writer.
    for i in 0..5 {
        assert!(is_noupdate(
            &s.omaha(&check(&format!("m{i}"), "1.0.0")).await
        ));
    }
    assert_eq!(from_memory(&s).await, 0);
    // Again: held, nothing changed, answered from memory.
    for i in 0..5 {
        assert!(is_noupdate(
            &s.omaha(&check(&format!("m{i}"), "1.0.0")).await
        ));
    }
    assert_eq!(from_memory(&s).await, 5);

    // A new policy is seen at once: everyone is granted, by the writer, and a renewed grant
    // goes to the writer too (it reads the counts).
    set_policy(&s, "stable", None, json!({"start_percent": 100})).await;
    for _ in 0..2 {
        assert!(granted(&s.omaha(&check("m0", "1.0.0")).await).is_some());
    }
    assert_eq!(from_memory(&s).await, 5);

    // m0 fails the update (an event: through the writer); its next check-ins are held as
    // quarantined, from memory.
    report_failure(&s, "m0", 7).await;
    assert_eq!(from_memory(&s).await, 5);
    assert!(is_noupdate(&s.omaha(&check("m0", "1.0.0")).await));
    assert!(is_noupdate(&s.omaha(&check("m0", "1.0.0")).await));
    assert_eq!(from_memory(&s).await, 7);
    assert!(
        s.metrics()
            .await
            .contains("twinroot_holds_total{reason=\"quarantined\"} 2")
    );

    // A pause holds every host at its next check-in.
    s.post("/api/v1/rollouts/stable/pause", json!({})).await;
    for i in 1..5 {
        assert!(is_noupdate(
            &s.omaha(&check(&format!("m{i}"), "1.0.0")).await
        ));
    }
    s.post("/api/v1/rollouts/stable/resume", json!({})).await;
    assert!(granted(&s.omaha(&check("m1", "1.0.0")).await).is_some());

    // A quarantine lift reaches its host at its next check-in.
    s.post(
        "/api/v1/instances/m0/lift-quarantine",
        json!({"version": "2.0.0"}),
    )
    .await;
    let r = s.omaha(&check("m0", "1.0.0")).await;
    assert!(granted(&r).is_some());
    assert_eq!(r.apps[0].lift_quarantine, ["2.0.0"]);

    // A host reporting the version it was granted completes, through the writer; after that
    // it is up to date, from memory.
    let before = from_memory(&s).await;
    assert!(is_noupdate(&s.omaha(&check("m1", "2.0.0")).await));
    assert_eq!(host_status(&s, "m1").await, "complete");
    assert_eq!(from_memory(&s).await, before);
    assert!(is_noupdate(&s.omaha(&check("m1", "2.0.0")).await));
    assert_eq!(from_memory(&s).await, before + 1);

    // m4 reports running 2.0.0 in an event that leaves it installed, not complete: its next
    // plain check-in completes it, so the writer records it.
    assert!(granted(&s.omaha(&check("m4", "1.0.0")).await).is_some());
    let installed = ev(event_type::UPDATE_COMPLETE, event_result::SUCCESS, None);
    s.omaha(&event_request("m4", "2.0.0", "stable", vec![installed]))
        .await;
    assert!(is_noupdate(&s.omaha(&check("m4", "2.0.0")).await));
    assert_eq!(host_status(&s, "m4").await, "complete");
    assert_eq!(from_memory(&s).await, before + 1);

    // A host changing channel goes through the writer, which files it under the new one.
    let r = s.omaha(&ue_request("m2", "1.0.0", "beta", vec![])).await;
    assert!(is_noupdate(&r));
    assert_eq!(from_memory(&s).await, before + 1);
    let hosts = s.get("/api/v1/instances?channel=beta").await;
    assert_eq!(hosts.as_array().unwrap().len(), 1, "{hosts}");

    // Every check-in is counted, those answered from memory included (m3: 1 + 1 + 1).
    let m3 = wait_for(10, "m3's check-ins written", || async {
        let hosts = s.get("/api/v1/instances").await;
        let h = hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["machine_id"] == "m3")
            .cloned()
            .unwrap();
        (h["checkins"] == 3).then_some(h)
    })
    .await;
    assert_eq!(m3["checkins"], 3);
    s.stop().await;
}

/// `cached_hosts` bounds the host records kept for answering from memory (0: none); hosts
/// beyond it are answered by the writer, the same way.
#[tokio::test]
async fn cached_hosts_bound_what_is_answered_from_memory() {
    for (cap, expected) in [(0, 0), (2, 2)] {
        let s = TestServer::start_with(|c| c.cached_hosts = cap).await;
        s.release_on("2.0.0", "stable").await;
        set_policy(&s, "stable", None, json!({"start_percent": 0})).await;
        for _ in 0..2 {
            for id in ["a", "b", "c"] {
                assert!(is_noupdate(
                    &s.omaha(&ue_request(id, "1.0.0", "stable", vec![])).await
                ));
            }
        }
        assert_eq!(from_memory(&s).await, expected, "cached_hosts {cap}");
        s.stop().await;
    }
}

#[tokio::test]
async fn instances_filter_by_status_and_come_in_pages() {
    let s = TestServer::start().await;
    s.release_on("2.0.0", "stable").await;
    for i in 0..25 {
        let id = format!("h{i:02}");
        let r = s.omaha(&ue_request(&id, "1.0.0", "stable", vec![])).await;
        assert!(!is_noupdate(&r), "{id} is granted (100%, no limits)");
        if i % 5 == 0 {
            report_failure(&s, &id, 7).await;
        }
    }
    // A machine id with a control character is answered but not recorded.
    let r = s
        .omaha(&ue_request("bad\u{7}id", "1.0.0", "stable", vec![]))
        .await;
    assert!(is_noupdate(&r));

    let ids = |v: &serde_json::Value| strings_of(v, "machine_id");
    let failed = s.get("/api/v1/instances?status=error").await;
    assert_eq!(ids(&failed), ["h00", "h05", "h10", "h15", "h20"]);
    let granted = s
        .get("/api/v1/instances?status=granted&channel=stable")
        .await;
    assert_eq!(ids(&granted).len(), 20);
    let all = ids(&s.get("/api/v1/instances").await);
    assert_eq!(all.len(), 25, "{all:?}");

    // Pages of 10: the full ones name the next page's start; together they are the whole list.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = format!("{}/api/v1/instances?limit=10", s.url);
        if let Some(a) = &after {
            url += &format!("&after={a}");
        }
        let resp = s.http.get(url).bearer_auth(&s.viewer).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let next = resp
            .headers()
            .get("x-next-after")
            .map(|h| h.to_str().unwrap().to_string());
        let page: serde_json::Value = resp.json().await.unwrap();
        pages += 1;
        assert_eq!(next.is_some(), ids(&page).len() == 10, "page {pages}");
        paged.extend(ids(&page));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, all);

    for (query, says) in [
        ("limit=0", "limit must be between 1 and 100000, got 0"),
        ("limit=100001", "got 100001"),
        (
            "status=broken",
            "status \"broken\" is not a host status; use one of idle, granted",
        ),
    ] {
        let (status, v) = s
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/instances?{query}"),
                Some(&s.viewer),
                None,
            )
            .await;
        assert_eq!(status, 422, "{query}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{query}: {v}");
    }
    s.stop().await;
}

#[tokio::test]
async fn status_history_older_than_the_retention_is_pruned() {
    history_older_than_the_retention_is_pruned(None).await;
}

#[tokio::test]
async fn status_history_older_than_the_retention_is_pruned_on_postgres() {
    let pg = common::postgres::Postgres::start().await;
    history_older_than_the_retention_is_pruned(Some(pg.url.clone())).await;
}

async fn history_older_than_the_retention_is_pruned(database: Option<String>) {
    // One virtual day per real second; three days of history kept.
    let s = TestServer::start_with(|c| {
        c.time_scale = 86_400.0;
        c.history_days = 3;
        c.database_url = database;
    })
    .await;
    s.release_on("2.0.0", "stable").await;
    let history = |id: &'static str| {
        let s = &s;
        async move {
            s.get(&format!("/api/v1/instances/{id}/history"))
                .await
                .as_array()
                .unwrap()
                .len()
        }
    };
    report_failure(&s, "old", 7).await;
    assert!(history("old").await > 0);
    wait_for(60, "history older than 3 days to be pruned", || async {
        (history("old").await == 0).then_some(())
    })
    .await;
    // The host's record stays; history younger than the retention stays too.
    let failed = s.get("/api/v1/instances?status=error").await;
    assert_eq!(failed[0]["machine_id"], "old");
    report_failure(&s, "new", 7).await;
    assert!(history("new").await > 0);
    let (_, metrics) = s.get_text("/metrics").await;
    let pruned: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("twinroot_history_rows_pruned_total "))
        .expect("pruned counter")
        .parse()
        .unwrap();
    assert!(pruned > 0, "{metrics}");
    s.stop().await;
}
