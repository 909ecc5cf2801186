//! Kernel module dependency resolution from `/lib/modules/KVER/modules.dep`.
//!
//! `modules.dep` lists, for each module file, the files of all the modules it needs
//! (`kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko ...`). We resolve the
//! modules asked for into a load order where every module comes after its dependencies.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The modules a twinroot guest needs under QEMU: virtio PCI, disk and network, squashfs for the
/// root slots, ext4 (and the crc32c its checksums need) for the state partition.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "squashfs",
    "crc32c_generic",
    "ext4",
    "virtio_net",
];

/// The parsed `modules.dep` of one kernel.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// Module name (file stem, `-` folded to `_`) -> (relative path, dependency paths).
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

/// The name the kernel uses for a module file (`kernel/fs/ext4/ext4.ko` -> `ext4`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Reads `DIR/modules.dep` (DIR is e.g. `/lib/modules/6.1.0-56-amd64`).
    pub fn load(dir: &Path) -> Result<Self> {
        let dep_file = dir.join("modules.dep");
        let text = std::fs::read_to_string(&dep_file)
            .with_context(|| format!("reading {}", dep_file.display()))?;
        Ok(Self::parse(dir, &text))
    }

    /// Parses the text of a `modules.dep` file.
    pub fn parse(dir: &Path, text: &str) -> Self {
        let mut by_name = BTreeMap::new();
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else {
                continue;
            };
            let module = module.trim().to_string();
            let deps = deps.split_whitespace().map(str::to_string).collect();
            by_name.insert(module_name(&module), (module, deps));
        }
        ModuleIndex {
            dir: dir.to_path_buf(),
            by_name,
        }
    }

    /// The directory this index was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Relative paths of `names` and all their dependencies, each after its dependencies.
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in names {
            self.visit(&name.replace('-', "_"), &mut seen, &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if depth > 64 {
            bail!(
                "module dependency loop through {name} in {}",
                self.dir.display()
            );
        }
        if seen.contains(name) {
            return Ok(());
        }
        let Some((path, deps)) = self.by_name.get(name) else {
            bail!(
                "kernel module {name} not found in {}/modules.dep (built in, or wrong kernel version?)",
                self.dir.display()
            );
        };
        for dep in deps {
            self.visit(&module_name(dep), seen, order, depth + 1)?;
        }
        seen.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/crc32c_generic.ko.xz:
";

    fn check(names: &[&str], expected: &[&str]) {
        let index = ModuleIndex::parse(Path::new("/m"), DEP);
        let order = index.load_order(names).unwrap();
        let order: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn dependencies_come_first_and_once() {
        check(&["ext4"], &["crc16", "mbcache", "jbd2", "ext4"]);
        check(
            &["virtio_pci", "virtio_blk"],
            &[
                "virtio_pci_legacy_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk",
            ],
        );
        check(&["crc32c-generic"], &["crc32c_generic"]);
    }

    #[test]
    fn unknown_module_is_named() {
        let index = ModuleIndex::parse(Path::new("/m"), DEP);
        let err = index.load_order(&["nosuch"]).unwrap_err().to_string();
        assert!(err.contains("nosuch"), "{err}");
    }
}
