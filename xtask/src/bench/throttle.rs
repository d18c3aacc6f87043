//! `--disk-mb-s`: the bench on a slow disk. The bench process, and so every daemon and baseline
//! it starts, joins a new cgroup that limits writes to the block device holding `--dir` to a
//! bandwidth: the small cloud volume (about 40 MB/s) row 4b's goal assumes, on a machine whose
//! own disk is ten times faster. Linux only, as root, with the cgroup v2 `io` controller or v1
//! `blkio`. The store's objects stay on tmpfs, which no block device limit touches.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The cgroup this process runs in while the limit holds; leaving it (on drop) moves the
/// process back and removes the group.
#[derive(Debug)]
pub struct Throttle {
    group: PathBuf,
    /// Where the process goes back to.
    parent: PathBuf,
    /// `major:minor` of the limited device, for the log.
    pub device: String,
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        let back = std::fs::write(self.parent.join("cgroup.procs"), &pid);
        // Children have exited by now; a group still holding a process stays (and says so).
        if back.is_ok()
            && let Err(e) = std::fs::remove_dir(&self.group)
        {
            eprintln!("note: could not remove {}: {e}", self.group.display());
        }
    }
}

/// `major:minor` of a device number (glibc's encoding, as `stat` returns it).
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// The whole disk under `dir` (a partition's parent), as `major:minor`: the limits apply to
/// disks.
fn disk_of(dir: &Path) -> anyhow::Result<String> {
    let dev = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .dev();
    let (major, minor) = major_minor(dev);
    let node = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !node.exists() {
        bail!(
            "{} is on device {major}:{minor}, which is no block device (tmpfs, overlay?): nothing to limit",
            dir.display()
        );
    }
    let disk = if node.join("partition").exists() {
        std::fs::read_to_string(node.join("../dev"))
            .with_context(|| format!("finding the disk of partition {major}:{minor}"))?
    } else {
        format!("{major}:{minor}")
    };
    Ok(disk.trim().to_owned())
}

/// Limits writes to the disk under `dir` to `mb_s` MB/s (10^6 bytes) for this process and
/// every process it starts from now on.
pub fn limit_writes(dir: &Path, mb_s: f64) -> anyhow::Result<Throttle> {
    if !(mb_s.is_finite() && mb_s >= 1.0) {
        bail!("--disk-mb-s must be at least 1, not {mb_s}");
    }
    let device = disk_of(dir)?;
    let bps = (mb_s * 1e6).round() as u64;
    let name = format!("spillway-bench-{}", std::process::id());
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let v1 = Path::new("/sys/fs/cgroup/blkio");
    let (parent, limit_file, limit) = if std::fs::read_to_string(v2)
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "io"))
    {
        let root = PathBuf::from("/sys/fs/cgroup");
        // The io controller must be enabled for the root's children (often already is).
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+io");
        (root, "io.max", format!("{device} wbps={bps}"))
    } else if v1.join("blkio.throttle.write_bps_device").exists() {
        (
            v1.to_owned(),
            "blkio.throttle.write_bps_device",
            format!("{device} {bps}"),
        )
    } else {
        bail!(
            "--disk-mb-s needs the cgroup v2 io controller or v1 blkio under /sys/fs/cgroup; neither is here"
        );
    };
    let group = parent.join(&name);
    std::fs::create_dir(&group).with_context(|| {
        format!(
            "creating the cgroup {} (--disk-mb-s needs root)",
            group.display()
        )
    })?;
    let throttle = Throttle {
        group: group.clone(),
        parent,
        device: device.clone(),
    };
    std::fs::write(group.join(limit_file), &limit)
        .with_context(|| format!("writing {limit:?} to {}", group.join(limit_file).display()))?;
    std::fs::write(group.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining {}", group.display()))?;
    Ok(throttle)
}

#[cfg(test)]
mod tests {
    use super::major_minor;

    #[test]
    fn device_numbers_split_as_glibc_encodes_them() {
        // vda: 254:0; a large minor spills into the high bits.
        assert_eq!(major_minor(254 << 8), (254, 0));
        assert_eq!(major_minor((8 << 8) | 17), (8, 17));
        let dev = ((0x1234u64 & !0xfff) << 32) | ((0x1234 & 0xfff) << 8) | 0x56;
        assert_eq!(major_minor(dev), (0x1234, 0x56));
        let minor = 0x12345u64;
        let dev = (7 << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(major_minor(dev), (7, minor));
    }
}
