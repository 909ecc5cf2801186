//! Wire and file formats shared by every twinroot component, so the two sides of each format
//! compile against the same types: A/B slot attributes and the GPT slot table, the release
//! manifest and bundle, the keyring, Omaha messages and FleetLock messages.

pub mod bundle;
pub mod coordinator_status;
pub mod fleetlock;
pub mod gpt;
pub mod keyring;
pub mod manifest;
pub mod omaha;
pub mod slot;
