//! Running one hook: `hooks/<type>` gets the message JSON on stdin and a small, clean
//! environment; it is killed with its whole process group after the timeout.
//!
//! Loose hook files are refused before anything runs, as sshd and cron refuse them: not a
//! regular file, writable by group or others, or owned by someone other than root, the
//! agent's user or the user it runs as.
//!
//! An agent running as root never runs a hook as root by accident: it runs it as
//! `hook_user` when set, else as the hook file's owner, switching groups and user between
//! fork and exec. An agent that is not root runs hooks as itself.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::message::Message;
use crate::shortage::Resource;

/// Exit status meaning "try again later" (sysexits.h EX_TEMPFAIL).
pub const EX_TEMPFAIL: i32 = 75;
/// Time a hook gets between SIGTERM and SIGKILL when it overstays its timeout.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long a hook that exited has its input written and its output read, per stream.
const OUTPUT_WAIT: Duration = Duration::from_secs(1);
/// PATH for hooks when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// How a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// There is no hook for this type: nothing to do.
    NoHook,
    Ok,
    /// Exit 75: run it again later.
    TempFail,
    Failed(i32),
    Killed(i32),
    TimedOut,
    /// The hook file was not run; why.
    Refused(String),
    /// It could not be started.
    SpawnError(String),
    /// It could not be started for want of a resource (descriptors for its pipes): not an
    /// outcome of the hook, which is started again once the resource returns.
    Short(Resource),
}

impl Outcome {
    /// The outcome as recorded in the ledger and shown by `mesync list inbox`.
    pub fn describe(&self) -> String {
        match self {
            Outcome::NoHook => "none".into(),
            Outcome::Ok => "ok".into(),
            Outcome::TempFail => format!("tempfail (exit {EX_TEMPFAIL})"),
            Outcome::Failed(code) => format!("failed (exit {code})"),
            Outcome::Killed(signal) => format!("killed (signal {signal})"),
            Outcome::TimedOut => "timeout".into(),
            Outcome::Refused(why) => format!("refused: {why}"),
            Outcome::SpawnError(why) => format!("error: {why}"),
            Outcome::Short(resource) => format!("not started: {}", resource.describe()),
        }
    }
}

/// One hook run.
pub struct HookRun<'a> {
    pub hooks_dir: &'a Path,
    pub message: &'a Message,
    pub inbox_file: &'a Path,
    pub attempt: u32,
    pub timeout: Duration,
    /// `hook_user` from the configuration.
    pub hook_user: Option<&'a str>,
}

impl HookRun<'_> {
    /// The hook's path: the type was validated, so it cannot leave `hooks/`.
    pub fn path(&self) -> PathBuf {
        self.hooks_dir.join(&self.message.kind)
    }

    /// The longest [`HookRun::run`] takes: the timeout, then the grace before SIGKILL, or
    /// the waits for the input and the output of a hook that exited.
    pub fn bound(&self) -> Duration {
        self.timeout.saturating_add(KILL_GRACE.max(OUTPUT_WAIT * 3))
    }

    /// Runs the hook, if there is one, and reports how it ended.
    pub async fn run(&self) -> Outcome {
        let path = self.path();
        let identity = match check_hook_file(&path, self.hook_user) {
            Ok(identity) => identity,
            Err(outcome) => return outcome,
        };
        let id = self.message.id;
        let mut command = Command::new(&path);
        command
            .env_clear()
            .envs(identity.environment())
            .env("MESYNC_MESSAGE_ID", id.to_string())
            .env("MESYNC_MESSAGE_TYPE", &self.message.kind)
            .env("MESYNC_SOURCE", &self.message.source)
            .env("MESYNC_PRIORITY", self.message.priority.as_str())
            .env("MESYNC_INBOX_FILE", self.inbox_file)
            .env("MESYNC_ATTEMPT", self.attempt.to_string())
            .current_dir(self.hooks_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills everything it started.
            .process_group(0)
            .kill_on_drop(true);
        identity.apply(&mut command);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => match Resource::of(&e, self.hooks_dir) {
                Some(resource) => return Outcome::Short(resource),
                None => return Outcome::SpawnError(e.to_string()),
            },
        };
        let pid = child.id().map(|p| Pid::from_raw(p as i32));

        let stdin = child.stdin.take();
        let input = self.message.to_json();
        let mut feeder = tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                // A hook that does not read its input closes the pipe: not an error.
                let _ = stdin.write_all(&input).await;
            }
        });
        let mut loggers = Vec::new();
        if let Some(out) = child.stdout.take() {
            loggers.push(tokio::spawn(log_lines(out, id, "stdout")));
        }
        if let Some(err) = child.stderr.take() {
            loggers.push(tokio::spawn(log_lines(err, id, "stderr")));
        }

        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(%id, timeout = ?self.timeout, "hook timed out; killing its process group");
                if let Some(pid) = pid {
                    let _ = killpg(pid, Signal::SIGTERM);
                    if tokio::time::timeout(KILL_GRACE, child.wait())
                        .await
                        .is_err()
                    {
                        let _ = killpg(pid, Signal::SIGKILL);
                    }
                }
                let _ = child.wait().await;
                feeder.abort();
                for logger in loggers {
                    logger.abort();
                }
                return Outcome::TimedOut;
            }
        };
        // A background process the hook left behind may hold its stdin without reading it:
        // a message larger than the pipe's buffer would then never be written in full.
        if tokio::time::timeout(OUTPUT_WAIT, &mut feeder)
            .await
            .is_err()
        {
            feeder.abort();
        }
        for logger in loggers {
            // Output from a background process the hook left behind must not hold us up.
            let _ = tokio::time::timeout(OUTPUT_WAIT, logger).await;
        }
        match status {
            Ok(status) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(0), _) => Outcome::Ok,
                (Some(EX_TEMPFAIL), _) => Outcome::TempFail,
                (Some(code), _) => Outcome::Failed(code),
                (None, Some(signal)) => Outcome::Killed(signal),
                (None, None) => Outcome::Failed(-1),
            },
            Err(e) => Outcome::SpawnError(e.to_string()),
        }
    }
}

/// The user a hook runs as.
struct Identity {
    /// `None`: as the agent itself (the agent is not root).
    switch: Option<Switch>,
    home: Option<String>,
    name: Option<String>,
    /// The agent's own PATH when it runs hooks as itself; a standard one for another user.
    path: String,
}

/// What changes between fork and exec: supplementary groups, then the group, then the user.
struct Switch {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
}

impl Identity {
    /// PATH, HOME, USER and LOGNAME of the user the hook runs as, and nothing else.
    fn environment(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PATH", self.path.clone())];
        if let Some(home) = &self.home {
            env.push(("HOME", home.clone()));
        }
        if let Some(name) = &self.name {
            env.push(("USER", name.clone()));
            env.push(("LOGNAME", name.clone()));
        }
        env
    }

    fn apply(&self, command: &mut Command) {
        let Some(switch) = &self.switch else {
            return;
        };
        let (uid, gid, groups) = (switch.uid, switch.gid, switch.groups.clone());
        // SAFETY: the closure runs in the forked child before exec and only makes system
        // calls (setgroups, setgid, setuid): no allocation, no locks.
        unsafe {
            command.pre_exec(move || {
                set_groups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
    }

    /// Who the hook at `owner_uid` runs as, given `hook_user`.
    fn resolve(owner_uid: u32, hook_user: Option<&str>) -> Result<Identity, Outcome> {
        let me = Uid::effective();
        if !me.is_root() {
            let user = User::from_uid(me).ok().flatten();
            return Ok(Identity {
                switch: None,
                home: user
                    .as_ref()
                    .map(|u| u.dir.display().to_string())
                    .or_else(|| std::env::var("HOME").ok()),
                name: user.map(|u| u.name),
                path: std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string()),
            });
        }
        let user = match hook_user {
            Some(name) => User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| Outcome::Refused(format!("hook_user {name:?} does not exist")))?,
            None => User::from_uid(Uid::from_raw(owner_uid))
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Outcome::Refused(format!(
                        "its owner, uid {owner_uid}, is not a user of this system"
                    ))
                })?,
        };
        let groups = supplementary_groups(&user);
        Ok(Identity {
            switch: Some(Switch {
                uid: user.uid,
                gid: user.gid,
                groups,
            }),
            home: Some(user.dir.display().to_string()),
            name: Some(user.name),
            path: DEFAULT_PATH.to_string(),
        })
    }
}

/// The user's groups from the group database, read in the parent (reading it in the forked
/// child of a threaded process could deadlock).
#[cfg(target_os = "linux")]
fn supplementary_groups(user: &User) -> Vec<Gid> {
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else {
        return vec![user.gid];
    };
    nix::unistd::getgrouplist(&name, user.gid).unwrap_or_else(|_| vec![user.gid])
}

/// Apple systems: nix wraps neither getgrouplist nor setgroups there, so libc is called
/// directly. Without this a hook run as a user would keep root's groups (wheel, admin).
#[cfg(target_vendor = "apple")]
fn supplementary_groups(user: &User) -> Vec<Gid> {
    let Ok(name) = std::ffi::CString::new(user.name.clone()) else {
        return vec![user.gid];
    };
    let mut groups: Vec<libc::c_int> = vec![0; 256];
    let mut count = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `groups` has room for `count` entries; getgrouplist writes at most that many
    // and sets `count` to the number written (or needed, when it returns -1).
    let found = unsafe {
        libc::getgrouplist(
            name.as_ptr(),
            user.gid.as_raw() as libc::c_int,
            groups.as_mut_ptr(),
            &mut count,
        )
    };
    if found < 0 {
        // More than 256 groups: the ones that fit, rather than root's.
        count = libc::c_int::try_from(groups.len()).unwrap_or(0);
    }
    let count = usize::try_from(count).unwrap_or(0).min(groups.len());
    groups[..count]
        .iter()
        .map(|&g| Gid::from_raw(g as libc::gid_t))
        .collect()
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
fn supplementary_groups(user: &User) -> Vec<Gid> {
    vec![user.gid]
}

#[cfg(not(target_vendor = "apple"))]
fn set_groups(groups: &[Gid]) -> nix::Result<()> {
    nix::unistd::setgroups(groups)
}

/// Runs between fork and exec: no allocation. macOS takes at most NGROUPS_MAX (16) groups
/// here and refuses more, so the first 16 (the primary group first) are set.
#[cfg(target_vendor = "apple")]
fn set_groups(groups: &[Gid]) -> nix::Result<()> {
    const NGROUPS_MAX: usize = 16;
    let groups = &groups[..groups.len().min(NGROUPS_MAX)];
    // SAFETY: `Gid` is a transparent wrapper of `gid_t`, and the slice outlives the call.
    let set = unsafe {
        libc::setgroups(
            groups.len() as libc::c_int,
            groups.as_ptr().cast::<libc::gid_t>(),
        )
    };
    nix::errno::Errno::result(set).map(drop)
}

/// Checks that the hook exists and may be run, and decides who runs it. `Err(NoHook)` when
/// there is none.
fn check_hook_file(path: &Path, hook_user: Option<&str>) -> Result<Identity, Outcome> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Outcome::NoHook),
        Err(e) => return Err(Outcome::Refused(format!("cannot inspect it: {}", e.kind()))),
    };
    if !meta.is_file() {
        return Err(Outcome::Refused("not a regular file".into()));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(Outcome::Refused(format!(
            "writable by group or others (mode {:o}); chmod go-w it",
            mode & 0o7777
        )));
    }
    let identity = Identity::resolve(meta.uid(), hook_user)?;
    let me = Uid::effective().as_raw();
    let runs_as = identity.switch.as_ref().map_or(me, |s| s.uid.as_raw());
    if meta.uid() != 0 && meta.uid() != me && meta.uid() != runs_as {
        return Err(Outcome::Refused(format!(
            "owned by uid {}, neither root, the agent's user (uid {me}) nor the hook's (uid {runs_as})",
            meta.uid()
        )));
    }
    if mode & 0o111 == 0 {
        return Err(Outcome::Refused("not executable; chmod +x it".into()));
    }
    Ok(identity)
}

async fn log_lines(stream: impl tokio::io::AsyncRead + Unpin, id: uuid::Uuid, which: &'static str) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(%id, stream = which, "hook: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn loose_hook_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let hook = tmp.path().join("t");
        let check = |p: &Path| check_hook_file(p, None).map(|_| ());
        assert_eq!(check(&hook), Err(Outcome::NoHook));
        fs::write(&hook, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(check(&hook), Err(Outcome::Refused(_))));
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o757)).unwrap();
        assert!(matches!(check(&hook), Err(Outcome::Refused(_))));
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check(&hook), Ok(()));
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        assert!(matches!(check(&dir), Err(Outcome::Refused(_))));
    }
}
