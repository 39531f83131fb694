//! The knock worker's cell, entered before it reads a byte from the network: every file
//! descriptor but the two it was given closed, no user or group of jitd's when it
//! started as root (`nobody`), no capabilities (effective, permitted, inheritable,
//! ambient, and the bounding set where it may drop it), `no_new_privs`, not dumpable
//! (no other process of its uid may ptrace it), killed with its parent, and a seccomp
//! filter allowing only the system calls listed in [`ALLOWED`]: no `open`, `socket`,
//! `connect`, `bind`, `execve`, `ptrace`, `kill`, `prctl` or `fork` (threads only).

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// The uid and gid the worker takes when started as root, unless `nobody` is unknown.
const NOBODY: u32 = 65534;

/// The system calls the worker may make once the filter is in force: receive knocks,
/// talk over the channel, run its threads, allocate memory, read clocks and the
/// random source, exit. Anything else kills it.
pub const ALLOWED: &[(&str, libc::c_long)] = &[
    ("recvfrom", libc::SYS_recvfrom),
    ("recvmsg", libc::SYS_recvmsg),
    ("sendto", libc::SYS_sendto),
    ("sendmsg", libc::SYS_sendmsg),
    ("read", libc::SYS_read),
    ("write", libc::SYS_write),
    ("close", libc::SYS_close),
    ("futex", libc::SYS_futex),
    ("sched_yield", libc::SYS_sched_yield),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("nanosleep", libc::SYS_nanosleep),
    ("gettimeofday", libc::SYS_gettimeofday),
    ("getrandom", libc::SYS_getrandom),
    ("brk", libc::SYS_brk),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("rseq", libc::SYS_rseq),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    // a new thread looks up its stack-overflow handler (this process's own signals)
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("gettid", libc::SYS_gettid),
    // glibc counts the CPUs it may run on when it sizes its malloc arenas
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    // threads only (CLONE_THREAD, see `filters`); clone3 answers ENOSYS, so that glibc
    // falls back to clone, whose flags a filter can read
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
];

/// Why the worker could not enter its cell (it then exits before reading anything).
#[derive(Debug, thiserror::Error)]
#[error("knock worker sandbox: {step}: {source}")]
pub struct SandboxError {
    step: &'static str,
    source: std::io::Error,
}

fn check(step: &'static str, rc: libc::c_long) -> Result<(), SandboxError> {
    if rc < 0 {
        return Err(SandboxError {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Enters the cell, keeping file descriptors `0..=last_kept` (stdio, bound to
/// `/dev/null` by jitd, and the two jitd handed over).
pub fn enter(last_kept: u32) -> Result<(), SandboxError> {
    // SAFETY: plain system calls on this process with valid arguments.
    unsafe {
        check(
            "close_range",
            libc::syscall(libc::SYS_close_range, last_kept + 1, u32::MAX, 0),
        )?;
        check(
            "PR_SET_PDEATHSIG",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into(),
        )?;
        check("PR_SET_DUMPABLE", libc::prctl(libc::PR_SET_DUMPABLE, 0).into())?;
    }
    if nix::unistd::geteuid().is_root() {
        become_nobody()?;
    }
    // SAFETY: as above.
    unsafe {
        check(
            "PR_CAP_AMBIENT_CLEAR_ALL",
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0).into(),
        )?;
    }
    clear_capabilities()?;
    // SAFETY: as above.
    unsafe {
        check(
            "PR_SET_NO_NEW_PRIVS",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
        )?;
    }
    install_filters()
}

/// From root to `nobody`: no supplementary groups, and the bounding set emptied while
/// it still may be (a uid change from 0 clears the other sets).
fn become_nobody() -> Result<(), SandboxError> {
    let (uid, gid) = match nix::unistd::User::from_name("nobody") {
        Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
        _ => (NOBODY, NOBODY),
    };
    for cap in 0..64 {
        // SAFETY: a plain prctl; EINVAL past the last capability this kernel knows.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            break;
        }
    }
    // SAFETY: plain system calls with valid arguments.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()).into())?;
        check("setresgid", libc::setresgid(gid, gid, gid).into())?;
        check("setresuid", libc::setresuid(uid, uid, uid).into())?;
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the effective, permitted and inheritable sets (always allowed: they only
/// shrink).
fn clear_capabilities() -> Result<(), SandboxError> {
    const VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: header and two data structs as capset(2) takes for version 3.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check("capset", rc)
}

/// Two filters: one answering `clone3` with ENOSYS, then the allow-list; the kernel
/// takes the strictest answer of the two. Installed with prctl (which systemd's
/// `@system-service` allows), the allow-list last since it forbids prctl.
fn install_filters() -> Result<(), SandboxError> {
    for program in filters().map_err(|e| SandboxError {
        step: "building the seccomp filter",
        source: std::io::Error::other(e),
    })? {
        let prog = libc::sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `program`, alive for the call.
        let rc = unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _) };
        check("PR_SET_SECCOMP", rc.into())?;
    }
    Ok(())
}

fn filters() -> Result<[BpfProgram; 2], seccompiler::BackendError> {
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| seccompiler::BackendError::InvalidTargetArch(std::env::consts::ARCH.into()))?;
    let enosys = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let thread_only = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )?])?;
    let rules = ALLOWED
        .iter()
        .map(|(_, nr)| {
            let rules = if *nr == libc::SYS_clone {
                vec![thread_only.clone()]
            } else {
                vec![]
            };
            (*nr, rules)
        })
        .collect();
    let allow = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch)?;
    Ok([enosys.try_into()?, allow.try_into()?])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_filters_compile_for_this_machine() {
        let [enosys, allow] = super::filters().expect("filters build");
        assert!(!enosys.is_empty() && allow.len() > super::ALLOWED.len());
    }
}
