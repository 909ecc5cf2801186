//! The boot selector (`twinroot_qemu::boot`), built as part of the end-to-end test crate.

fn main() {
    twinroot_qemu::boot::main()
}
