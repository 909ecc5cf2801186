//! update-server: the fleet's Omaha v3 server with channels, promotion, staged rollouts with
//! automatic halt, and an admin API.
//!
//! Codemap: [`policy`] (pure rollout decision), [`store`] (SQLite/PostgreSQL), [`checkin`]
//! (Omaha endpoint logic), [`clock`] (the server clock, optionally sped up), [`server`] (HTTP
//! wiring), [`api`] (admin REST), [`payload`] (Range/ETag downloads), [`release`] (bundle
//! verification and blob storage), [`metrics`], [`cli`] (the client subcommands), [`backup`]
//! (consistent SQLite copies while serving).

pub mod api;
pub mod backup;
pub mod checkin;
pub mod cli;
pub mod clock;
pub mod dashboard;
pub mod fast;
pub mod metrics;
pub mod openapi;
pub mod payload;
pub mod policy;
pub mod release;
pub mod seen;
pub mod series;
pub mod server;
mod sqlite_writer;
pub mod store;
pub mod watch;

/// An HTTP client builder for the CLI subcommands and tests, with TLS through rustls and the
/// `ring` provider. The whole workspace shares one reqwest build without a built-in provider, so
/// the provider must be installed before any client is built.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// [`http_client_builder`] with default settings.
pub fn http_client() -> reqwest::Client {
    http_client_builder()
        .build()
        .expect("an HTTP client with default settings always builds")
}
