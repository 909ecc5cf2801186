//! The initramfs `/init`: picks an A/B slot and switches root to it (see `twinroot_qemu::boot`).

fn main() {
    twinroot_qemu::boot::main()
}
