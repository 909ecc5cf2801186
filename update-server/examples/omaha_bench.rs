//! Benchmark helpers for bench/server.sh.
//!
//! `omaha_bench baseline ADDR`: a minimal axum server answering every POST /v1/update/ with one
//! fixed Omaha response (no parsing, no database): the ceiling the real server is compared to.
//! `omaha_bench bundle DIR VERSION`: writes DIR/release.keyring and DIR/VERSION.bundle, a small
//! signed release bundle.
//!
//! It uses the server binary's allocator (mimalloc), so both sides of the comparison allocate
//! the same way.

use std::io::Cursor;

use axum::Router;
use axum::routing::post;
use twinroot_format::bundle::{ReleaseInfo, write_bundle};
use twinroot_format::keyring::{Keyring, generate_signing_key};
use twinroot_format::omaha::{AppResponse, Response, UpdateCheckResponse, daystart_for};

/// The same allocator as the server binary, so the comparison measures the handlers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("baseline") => baseline(&args[2]).await,
        Some("bundle") => bundle(&args[2], &args[3]),
        _ => {
            eprintln!("usage: omaha_bench baseline ADDR | bundle DIR VERSION");
            std::process::exit(2);
        }
    }
}

async fn baseline(addr: &str) {
    let body = Response {
        protocol: "3.0".into(),
        server: Some("baseline".into()),
        daystart: Some(daystart_for(0)),
        apps: vec![AppResponse {
            update_check: Some(UpdateCheckResponse::NoUpdate),
            ping: true,
            ..AppResponse::ok(twinroot_format::omaha::FLATCAR_APP_ID)
        }],
    }
    .to_xml();
    let app = Router::new().route(
        "/v1/update/",
        post(move || {
            let body = body.clone();
            async move { ([("content-type", "text/xml; charset=utf-8")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    axum::serve(listener, app).await.unwrap();
}

fn bundle(dir: &str, version: &str) {
    let dir = std::path::Path::new(dir);
    let key = generate_signing_key().unwrap();
    let ring = Keyring::new(1, 1, &[key.verifying_key()]).unwrap();
    std::fs::write(dir.join("release.keyring"), ring.to_bytes()).unwrap();
    let image: Vec<u8> = (0..1_048_576u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let info = ReleaseInfo {
        os_version: semver::Version::parse(version).unwrap(),
        created_unix: 1_700_000_000,
        min_source_version: None,
        board: None,
    };
    let mut out = Vec::new();
    write_bundle(
        &image[..],
        &info,
        &[key],
        3,
        &mut Cursor::new(Vec::new()),
        &mut out,
    )
    .unwrap();
    std::fs::write(dir.join(format!("{version}.bundle")), out).unwrap();
}
