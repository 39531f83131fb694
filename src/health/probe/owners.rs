//! Who holds a listening socket: the processes with it among their open files (as
//! `ss -p` finds them: `/proc/PID/fd/N` links to `socket:[INODE]`), and, when those are
//! not visible (jitd as a system user with `ProtectProc=invisible` sees no other
//! user's process), the systemd unit the socket was created in, from the socket's
//! cgroup id (the inode of its directory in the cgroup2 tree). Both walks are bounded;
//! root's processes are walked first, so that no other user's open files (any user can
//! hold hundreds of thousands) use up the bound before them.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::health::listeners::{Listener, Process};

/// The most `/proc/PID/fd` entries read in one run.
const MAX_FDS: usize = 1_000_000;
/// The most cgroup directories visited in one run.
const MAX_CGROUPS: usize = 20_000;
/// The longest one walk may take.
const MAX_TIME: Duration = Duration::from_secs(2);
/// The most processes named per socket.
const MAX_PROCESSES: usize = 8;

/// Fills in the processes (and, failing those, the unit) of `listeners`.
pub fn identify(listeners: &mut [Listener]) {
    let wanted: HashSet<u32> = listeners.iter().map(|l| l.inode).filter(|i| *i != 0).collect();
    let holders = holders(Path::new("/proc"), &wanted);
    for l in listeners.iter_mut() {
        if let Some(found) = holders.get(&l.inode) {
            l.processes = found.clone();
        }
    }
    let unknown: HashSet<u64> = listeners
        .iter()
        .filter(|l| l.processes.is_empty())
        .filter_map(|l| l.cgroup)
        .collect();
    if unknown.is_empty() {
        return;
    }
    let Some(root) = cgroup2_root() else {
        return;
    };
    let units = cgroup_paths(&root, &unknown);
    for l in listeners.iter_mut().filter(|l| l.processes.is_empty()) {
        l.unit = l.cgroup.and_then(|id| units.get(&id).cloned());
    }
}

/// The processes holding each socket inode of `wanted`, from `/proc`.
pub fn holders(proc_root: &Path, wanted: &HashSet<u32>) -> HashMap<u32, Vec<Process>> {
    let mut found: HashMap<u32, Vec<Process>> = HashMap::new();
    let (started, mut fds) = (Instant::now(), 0usize);
    for (pid, dir) in processes(proc_root) {
        let Ok(fd_dir) = std::fs::read_dir(dir.join("fd")) else {
            continue; // gone, or not ours to see
        };
        let mut name = None;
        for fd in fd_dir.flatten() {
            fds += 1;
            if fds > MAX_FDS || started.elapsed() > MAX_TIME {
                return found;
            }
            let Some(inode) = socket_inode(&fd.path()).filter(|i| wanted.contains(i)) else {
                continue;
            };
            let name = name.get_or_insert_with(|| comm(&dir)).clone();
            let list = found.entry(inode).or_default();
            if list.len() < MAX_PROCESSES && !list.iter().any(|p| p.pid == pid) {
                list.push(Process { pid, name });
            }
        }
    }
    found
}

/// The processes under `proc_root`, root's first (by the owner of `/proc/PID`, the
/// process's effective uid), each group by pid.
fn processes(proc_root: &Path) -> Vec<(u32, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut all: Vec<(bool, u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let others = e.metadata().map_or(true, |m| m.uid() != 0);
            Some((others, pid, e.path()))
        })
        .collect();
    all.sort_unstable();
    all.into_iter().map(|(_, pid, path)| (pid, path)).collect()
}

fn socket_inode(fd: &Path) -> Option<u32> {
    let target = std::fs::read_link(fd).ok()?;
    let text = target.to_str()?;
    text.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// `/proc/PID/comm` (whatever the process chose to be called: shown escaped by
/// jitctl, like every text); `?` when unreadable.
fn comm(pid_dir: &Path) -> String {
    std::fs::read(pid_dir.join("comm")).map_or_else(
        |_| "?".to_string(),
        |bytes| String::from_utf8_lossy(&bytes).trim_end_matches('\n').to_string(),
    )
}

/// Where the cgroup2 hierarchy is mounted, from `/proc/self/mountinfo`.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (fields, fs) = line.split_once(" - ")?;
        if !fs.starts_with("cgroup2 ") {
            return None;
        }
        fields.split(' ').nth(4).map(PathBuf::from)
    })
}

/// The paths (below `root`) of the cgroup directories whose inode is in `ids`; the
/// root itself says nothing and is left out.
pub fn cgroup_paths(root: &Path, ids: &HashSet<u64>) -> HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = HashMap::new();
    let (started, mut visited) = (Instant::now(), 0usize);
    let mut queue = vec![root.to_path_buf()];
    while let Some(dir) = queue.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            visited += 1;
            if visited > MAX_CGROUPS || started.elapsed() > MAX_TIME || found.len() == ids.len() {
                return found;
            }
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            if ids.contains(&meta.ino()) {
                let relative = entry.path().strip_prefix(root).map(|p| format!("/{}", p.display()));
                found.insert(meta.ino(), relative.unwrap_or_default());
            }
            queue.push(entry.path());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_holder_of_a_socket_is_found_by_its_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap();
        let inode: u32 = link.to_str().unwrap()[8..].trim_end_matches(']').parse().unwrap();
        let found = holders(Path::new("/proc"), &HashSet::from([inode]));
        let me = std::process::id();
        assert!(found[&inode].iter().any(|p| p.pid == me), "{found:?}");
        assert!(holders(Path::new("/nonexistent"), &HashSet::from([inode])).is_empty());
    }

    #[test]
    fn cgroup_directories_are_found_by_inode() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/ssh.service");
        std::fs::create_dir_all(&unit).unwrap();
        let ino = std::fs::metadata(&unit).unwrap().ino();
        let found = cgroup_paths(root.path(), &HashSet::from([ino, 1]));
        assert_eq!(found.get(&ino).map(String::as_str), Some("/system.slice/ssh.service"));
    }
}
