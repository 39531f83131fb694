//! Who is asking: a socket peer's uid and gid (SO_PEERCRED) resolved to a user name and
//! the groups that user belongs to. The [`Caller`] value itself is in [`crate::domain`];
//! this module is the look-up in the system's user and group databases.

use crate::domain::Caller;

/// The login uid of process `pid` (`/proc/PID/loginuid`, set by pam_loginuid when a
/// person logs in and kept across `sudo` and `su`): the person behind a process that
/// runs as root. `None` when unset (a daemon, cron without PAM) or unreadable.
pub fn login_uid(pid: i32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/loginuid")).ok()?;
    text.trim().parse().ok().filter(|uid| *uid != u32::MAX)
}

impl Caller {
    /// Resolves a uid alone (a grant's requester, re-checked at reload or restart): the
    /// user database gives the primary group; a uid with no entry has no groups.
    pub fn resolve_uid(uid: u32) -> Caller {
        use nix::unistd::{Uid, User};
        match User::from_uid(Uid::from_raw(uid)).ok().flatten() {
            Some(user) => Caller::resolve(uid, user.gid.as_raw()),
            None => Caller {
                uid,
                name: uid.to_string(),
                groups: Vec::new(),
                signer: None,
            },
        }
    }

    /// The requester of `grant`, as reload and restart re-check it: a signed remote
    /// requester by the principals its key vouched for, a local one by uid; `cache`
    /// saves looking the same uid up again.
    pub fn requester_of(grant: &crate::grants::Grant, cache: &mut std::collections::HashMap<u32, Caller>) -> Caller {
        if grant.requester_uid == crate::domain::REMOTE_UID {
            return Caller::signed(crate::domain::SignedBy {
                principals: grant.principals.clone(),
                fingerprint: String::new(),
                peer: None,
                nonce: None,
                certificate: None,
                fleet: grant.fleet.clone(),
            });
        }
        cache
            .entry(grant.requester_uid)
            .or_insert_with(|| Caller::resolve_uid(grant.requester_uid))
            .clone()
    }

    /// Resolves `uid`/`gid` (from SO_PEERCRED) with the system's user and group databases.
    pub fn resolve(uid: u32, gid: u32) -> Caller {
        use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let name = user.as_ref().map_or_else(|| uid.to_string(), |u| u.name.clone());
        let mut gids = vec![Gid::from_raw(gid)];
        if let Some(user) = &user {
            if let Ok(cname) = std::ffi::CString::new(user.name.clone()) {
                if let Ok(list) = getgrouplist(&cname, Gid::from_raw(gid)) {
                    gids.extend(list);
                }
            }
        }
        gids.sort_by_key(|g| g.as_raw());
        gids.dedup();
        let groups = gids
            .into_iter()
            .filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name))
            .collect();
        Caller {
            uid,
            name,
            groups,
            signer: None,
        }
    }
}
