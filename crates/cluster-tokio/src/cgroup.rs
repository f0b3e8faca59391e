//! What the cgroups say of this process. How many CPUs it may use, and why: the cgroup's CPU
//! quota (a container's CPU limit, v1 `cpu.cfs_quota_us` or v2 `cpu.max`, ancestors included),
//! the CPU affinity, or the host's CPUs: the default worker count, logged with its source, and
//! what [`Settings::workers_follow_cpu_limit`](crate::Settings::workers_follow_cpu_limit)
//! follows. And how many processes of its memory cgroup the OOM killer killed, which tells a
//! worker OOM-killed from one killed by someone.

use std::fmt;
use std::path::{Path, PathBuf};

/// A count of CPUs and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cpus {
    pub(crate) count: usize,
    pub(crate) source: Source,
}

/// Where a CPU count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// The cgroup's CPU quota, rounded down (at least 1), as Rust's `available_parallelism`
    /// rounds it.
    Quota,
    /// The CPUs this process may run on.
    Affinity,
    /// Every CPU the host has online.
    Host,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Quota => "the cgroup's CPU quota",
            Self::Affinity => "the CPU affinity",
            Self::Host => "the host's CPUs",
        })
    }
}

/// The CPUs this process may use now: the smallest of its cgroup quota, its affinity and the
/// host's CPUs. Reads a few small files; an unreadable or malformed one is left out.
pub(crate) fn available() -> Cpus {
    with_quota(quota().ok().flatten())
}

/// As [`available`], or why the quota cannot be read (for a caller that follows it).
pub(crate) fn try_available() -> Result<Cpus, String> {
    quota().map(with_quota)
}

fn with_quota(quota: Option<usize>) -> Cpus {
    let host = host_cpus().unwrap_or(1);
    let affinity = rustix::thread::sched_getaffinity(None)
        .ok()
        .map(|set| set.count() as usize)
        .filter(|&n| n > 0)
        .unwrap_or(host);
    match quota {
        Some(quota) if quota < affinity.min(host) => Cpus {
            count: quota,
            source: Source::Quota,
        },
        _ if affinity < host => Cpus {
            count: affinity,
            source: Source::Affinity,
        },
        _ => Cpus {
            count: host,
            source: Source::Host,
        },
    }
}

/// How many processes the kernel's OOM killer killed in this process's memory cgroup (v2
/// `memory.events`, v1 `memory.oom_control`: their `oom_kill` line); `None` if it cannot be
/// read (no memory controller, a kernel before 4.13).
pub(crate) fn oom_kills() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dir, v2) = cgroup_dirs(&cgroups, &mounts, "memory")
        .into_iter()
        .next()?;
    let file = if v2 {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    let text = std::fs::read_to_string(dir.join(file)).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
}

/// The host's online CPUs, from `/sys/devices/system/cpu/online` (`0-3,8-11`).
fn host_cpus() -> Option<usize> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut count = 0;
    for range in online.trim().split(',') {
        count += match range.split_once('-') {
            Some((first, last)) => last.parse::<usize>().ok()? - first.parse::<usize>().ok()? + 1,
            None => {
                range.parse::<usize>().ok()?;
                1
            }
        };
    }
    (count > 0).then_some(count)
}

/// The tightest CPU quota of this process's cgroup and its ancestors, in whole CPUs (at least
/// 1); `Ok(None)` when there is none. `Err` when a file that should hold one cannot be read or
/// parsed.
fn quota() -> Result<Option<usize>, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mut tightest: Option<f64> = None;
    for dir in cgroup_dirs(&cgroups, &mounts, "cpu") {
        let (directory, v2) = dir;
        if let Some(cpus) = read_quota(&directory, v2)? {
            tightest = Some(tightest.map_or(cpus, |t| t.min(cpus)));
        }
    }
    // As `available_parallelism`: whole CPUs, rounded down, at least one.
    Ok(tightest.map(|cpus| (cpus.floor() as usize).max(1)))
}

/// The directories of this process's cgroup for `controller`, then of every ancestor up to the
/// mount's root, each with whether it is cgroup v2.
fn cgroup_dirs(cgroups: &str, mounts: &str, controller: &str) -> Vec<(PathBuf, bool)> {
    let mut dirs = Vec::new();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == controller) {
            continue;
        }
        let Some((root, mount)) = mount_of(mounts, v2, controller) else {
            continue;
        };
        // Relative to the mount's root (a cgroup namespace shows `/` for the container).
        let relative = Path::new(path)
            .strip_prefix(&root)
            .or_else(|_| Path::new(path).strip_prefix("/"))
            .unwrap_or_else(|_| Path::new(""));
        let mut dir = mount.join(relative);
        loop {
            dirs.push((dir.clone(), v2));
            if dir == mount || !dir.pop() || !dir.starts_with(&mount) {
                break;
            }
        }
    }
    dirs
}

/// The root and mount point of the cgroup v2 hierarchy, or of the v1 one with `controller`,
/// from `/proc/self/mountinfo`.
fn mount_of(mounts: &str, v2: bool, controller: &str) -> Option<(PathBuf, PathBuf)> {
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut after = after.split_whitespace();
        let fstype = after.next()?;
        let options = after.nth(1)?;
        let wanted = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == controller)
        };
        if !wanted {
            return None;
        }
        let mut before = before.split_whitespace();
        let root = before.nth(3)?;
        let mount = before.next()?;
        Some((PathBuf::from(root), PathBuf::from(mount)))
    })
}

/// The quota of one cgroup directory in CPUs; `None` for no limit (or no such file: the
/// controller is not enabled there).
fn read_quota(dir: &Path, v2: bool) -> Result<Option<f64>, String> {
    let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", dir.join(name).display())),
    };
    let malformed = |name: &str, text: &str| {
        format!(
            "{}: cannot read a quota in {text:?}",
            dir.join(name).display()
        )
    };
    if v2 {
        let Some(text) = read("cpu.max")? else {
            return Ok(None);
        };
        let mut fields = text.split_whitespace();
        return match (fields.next(), fields.next().map(str::parse::<f64>)) {
            (Some("max"), _) => Ok(None),
            (Some(quota), Some(Ok(period))) if period > 0.0 => quota
                .parse::<f64>()
                .map(|quota| Some(quota / period))
                .map_err(|_| malformed("cpu.max", &text)),
            _ => Err(malformed("cpu.max", &text)),
        };
    }
    let (Some(quota), Some(period)) = (read("cpu.cfs_quota_us")?, read("cpu.cfs_period_us")?)
    else {
        return Ok(None);
    };
    let quota: i64 = quota
        .trim()
        .parse()
        .map_err(|_| malformed("cpu.cfs_quota_us", &quota))?;
    let period: f64 = period
        .trim()
        .parse()
        .map_err(|_| malformed("cpu.cfs_period_us", &period))?;
    if quota < 0 || period <= 0.0 {
        return Ok(None);
    }
    Ok(Some(quota as f64 / period))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS_V1: &str = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
                             35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n";
    const MOUNTS_V2: &str =
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn the_cgroup_and_its_ancestors_are_found_in_either_version() {
        let dirs = cgroup_dirs(
            "4:memory:/x\n1:cpu,cpuacct:/kubepods/pod1/c1\n",
            MOUNTS_V1,
            "cpu",
        );
        let dirs: Vec<_> = dirs
            .iter()
            .map(|(d, v2)| (d.to_str().unwrap(), *v2))
            .collect();
        assert_eq!(
            dirs,
            [
                ("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1", false),
                ("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1", false),
                ("/sys/fs/cgroup/cpu,cpuacct/kubepods", false),
                ("/sys/fs/cgroup/cpu,cpuacct", false),
            ]
        );
        let dirs = cgroup_dirs("0::/system.slice/app.service\n", MOUNTS_V2, "cpu");
        assert_eq!(dirs.len(), 3);
        assert_eq!(
            dirs[0].0,
            Path::new("/sys/fs/cgroup/system.slice/app.service")
        );
        // A cgroup namespace: the process sees itself at the root.
        assert_eq!(cgroup_dirs("0::/\n", MOUNTS_V2, "cpu").len(), 1);
        assert!(cgroup_dirs("garbage\n", MOUNTS_V2, "cpu").is_empty());
    }

    #[test]
    fn quotas_are_read_and_malformed_ones_refused() {
        let dir = std::env::temp_dir().join(format!("cluster-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(read_quota(&dir, true), Ok(Some(1.5)));
        std::fs::write(dir.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(read_quota(&dir, true), Ok(None));
        std::fs::write(dir.join("cpu.max"), "lots\n").unwrap();
        assert!(read_quota(&dir, true).is_err());
        std::fs::write(dir.join("cpu.cfs_quota_us"), "-1\n").unwrap();
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(read_quota(&dir, false), Ok(None));
        std::fs::write(dir.join("cpu.cfs_quota_us"), "200000\n").unwrap();
        assert_eq!(read_quota(&dir, false), Ok(Some(2.0)));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_quota(&dir, true), Ok(None), "no such file: no quota");
    }

    #[test]
    fn the_memory_cgroup_is_found_beside_the_cpu_one() {
        let dirs = cgroup_dirs("4:memory:/app\n1:cpu,cpuacct:/\n", MOUNTS_V1, "memory");
        assert_eq!(dirs[0], (PathBuf::from("/sys/fs/cgroup/memory/app"), false));
    }

    #[test]
    fn this_machine_has_at_least_one_cpu() {
        let cpus = available();
        assert!(cpus.count >= 1);
        assert!(cpus.count <= host_cpus().unwrap());
    }
}
