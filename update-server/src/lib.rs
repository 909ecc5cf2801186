//! update-server: the fleet's Omaha v3 server with channels, promotion, staged rollouts with
//! automatic halt, and an admin API.
//!
//! Codemap: [`policy`] (pure rollout decision), [`store`] (SQLite/PostgreSQL), [`checkin`]
//! (Omaha endpoint logic), [`server`] (HTTP wiring), [`api`] (admin REST), [`payload`] (Range/ETag
//! downloads), [`release`] (bundle verification and blob storage), [`metrics`], [`cli`] (the
//! client subcommands).

pub mod api;
pub mod checkin;
pub mod cli;
pub mod dashboard;
pub mod metrics;
pub mod openapi;
pub mod payload;
pub mod policy;
pub mod release;
pub mod series;
pub mod server;
pub mod store;
pub mod watch;
