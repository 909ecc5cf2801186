//! image-tools: builds reproducible root images, signs them into release bundles, verifies and
//! inspects bundles, manages keys and keyrings, and makes A/B GPT disk images. `main.rs` parses
//! the command line and calls one function per subcommand.

pub mod disk;
pub mod keys;
pub mod output;
pub mod release;
pub mod squashfs;
