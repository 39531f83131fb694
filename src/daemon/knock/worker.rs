//! jitd's handle on its knock worker ([`crate::knockd`]): starts `/proc/self/exe
//! --knock-worker` with the knock socket and one end of a `SOCK_SEQPACKET` pair, sends
//! it settings, reads its messages (bounded), and kills it. What the messages mean is
//! the knock door's business (`super`).

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

use crate::knockd::{ARGUMENT, CHANNEL_FD, UDP_FD};
use crate::remote::channel::{self, FromWorker, SignerLine, ToWorker, MAX_MESSAGE};
use crate::remote::settings::Remote;

/// The longest jitd waits for the worker to take its settings.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A running worker and jitd's end of its channel.
pub(super) struct Worker {
    child: Child,
    channel: UnixDatagram,
    buf: Vec<u8>,
}

/// What reading the worker gave.
pub(super) enum Heard {
    /// A well-formed message.
    Message(FromWorker),
    /// The channel closed: the worker is gone.
    Gone,
    /// Bytes that are not a message: the worker is broken or subverted.
    Garbage(String),
}

impl Worker {
    /// Starts a worker on `socket` (jitd keeps its own copy, so that a new worker can
    /// take over, and nobody else ever reads it).
    pub fn spawn(socket: &UdpSocket) -> io::Result<Worker> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        // above the numbers the worker gets them as, so that the moves cannot collide
        let udp = high_copy(socket)?;
        let theirs = high_copy(&theirs)?;
        let (udp_fd, channel_fd) = (udp.as_raw_fd(), theirs.as_raw_fd());
        let mut command = Command::new("/proc/self/exe");
        command
            .arg(ARGUMENT)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe calls (dup2, prctl) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                for (from, to) in [(udp_fd, UDP_FD), (channel_fd, CHANNEL_FD)] {
                    if nix::libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // no capability crosses the exec (jitd's own come in ambient under systemd)
                nix::libc::prctl(nix::libc::PR_CAP_AMBIENT, nix::libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
                nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn()?;
        drop((udp, theirs));
        let ours = std::os::unix::net::UnixDatagram::from(ours);
        ours.set_nonblocking(true)?;
        Ok(Worker {
            child,
            channel: UnixDatagram::from_std(ours)?,
            buf: vec![0; MAX_MESSAGE + 1],
        })
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends the settings of `remote` (`None`: knocks are off) with this host's names.
    pub async fn send_settings(&self, remote: Option<&Remote>, names: &[String]) -> io::Result<()> {
        let signers = remote.map_or(&[][..], |r| r.signers.as_slice());
        let mut messages = vec![ToWorker::Settings {
            enabled: remote.is_some(),
            names: names.to_vec(),
            window_secs: remote.map_or(30, |r| r.window.as_secs()),
            prefix6: remote.map_or(crate::remote::gate::DEFAULT_PREFIX6, |r| r.prefix6),
            signers: signers.len(),
        }];
        messages.extend(signers.iter().map(|s| ToWorker::Signer(SignerLine::of(s))));
        let sending = async {
            for m in &messages {
                self.channel.send(&channel::encode(m)).await?;
            }
            Ok(())
        };
        tokio::time::timeout(SEND_TIMEOUT, sending)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the worker takes no settings")))
    }

    /// The next message.
    pub async fn hear(&mut self) -> Heard {
        match self.channel.recv(&mut self.buf).await {
            Ok(0) | Err(_) => Heard::Gone,
            Ok(n) if n > MAX_MESSAGE => Heard::Garbage(format!("a message of more than {MAX_MESSAGE} bytes")),
            Ok(n) => match channel::decode(&self.buf[..n]) {
                Ok(m) => Heard::Message(m),
                Err(e) => Heard::Garbage(e),
            },
        }
    }

    /// Kills the worker (if still there) and says how it ended.
    pub async fn end(mut self) -> String {
        let _ = self.child.start_kill();
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// How the worker ended, once its channel closed (it is not killed first).
    pub async fn ended(mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => self.end().await,
        }
    }
}

/// A close-on-exec copy of `fd` numbered above the worker's own.
fn high_copy(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    let copy = fcntl(fd.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(CHANNEL_FD + 1))?;
    // SAFETY: a new descriptor fcntl just made, owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) })
}
