//! twinroot boot tooling for QEMU hosts: the initramfs and its boot selector, root image
//! contents, and the harness that builds disks and runs hosts (used by the end-to-end tests and
//! the demo). See docs/QEMU.md.

pub mod boot;
pub mod cpio;
pub mod harness;
pub mod initramfs;
pub mod libs;
pub mod modules;
pub mod rootfs;
