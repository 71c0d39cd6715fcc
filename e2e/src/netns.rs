//! Named network namespaces (`/var/run/netns/<name>`) with RAII cleanup, and ways to run code and commands inside
//! them without `ip netns exec` (which remounts /sys and hides bpffs pins and cgroups).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// Where iproute2 keeps named network namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace, created with `ip netns add` and deleted with `ip netns del` on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Whether drop deletes the namespace (false for [`NetNs::borrowed`] handles).
    owned: bool,
}

impl NetNs {
    /// Creates the namespace `name` with its loopback up. Fails if it already exists.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run_cmd(Command::new("ip").args(["netns", "add", name]))?;
        let ns = NetNs { name: name.to_string(), owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace `name` that is NOT deleted on drop (its owner deletes it).
    pub fn borrowed(name: &str) -> Self {
        NetNs { name: name.to_string(), owned: false }
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, e.g. `/var/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Opens the namespace file; the fd can be passed to `setns` or sent to ztunnel over ZDS.
    pub fn open(&self) -> io::Result<File> {
        File::open(self.path())
    }

    /// Runs `f` on a fresh OS thread that first enters this namespace with `setns`, and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace for life and can be used from any thread afterwards.
    /// A panic in `f` is propagated to the caller.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = self.open().unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into {name}: {}", io::Error::last_os_error());
                }
                drop(file);
                f()
            })
            .expect("spawn netns thread");
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Starts `binary` with `args` in this namespace, `RUST_LOG=log_level`, stdout and stderr appended to
    /// `log_file`: how the lab runs the product's daemons.
    pub fn spawn_logged(
        &self,
        binary: &std::path::Path,
        args: Vec<String>,
        log_level: &str,
        log_file: &std::path::Path,
    ) -> anyhow::Result<std::process::Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_file)
            .with_context(|| format!("open {}", log_file.display()))?;
        let log2 = log.try_clone()?;
        self.command(binary)
            .args(args)
            .env("RUST_LOG", log_level)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("start {} in {}", binary.display(), self.name))
    }

    /// A `Command` whose child enters this namespace (with `setns`) just before `exec`.
    ///
    /// Panics if the namespace file cannot be opened (the namespace is owned by `self`, so it exists).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let file = self.open().unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        let mut cmd = Command::new(program);
        // The closure owns `file`, so the fd stays open until the Command is dropped; it is CLOEXEC, so the
        // program itself does not inherit it.
        let hook = move || {
            // SAFETY: setns is async-signal-safe; the fd is valid for the life of the closure.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook only calls setns, which is async-signal-safe, and allocates nothing.
        unsafe { cmd.pre_exec(hook) };
        cmd
    }

    /// Runs `program args..` inside this namespace and returns its stdout; a failure carries the command line and
    /// stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        run_cmd(&mut cmd).with_context(|| format!("in netns {}", self.name))
    }

    /// Runs `ip -n <self> args..` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run_cmd(&mut cmd)
    }

    /// Writes a sysctl of this namespace, e.g. `set_sysctl("net/ipv4/ip_forward", "1")`.
    pub fn set_sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        // /proc/sys/net resolves against the namespace of the thread that opens the file.
        let path = format!("/proc/sys/{key}");
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("write {path}")))
            .with_context(|| format!("sysctl in netns {}", self.name))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("ip netns del {}: {}", self.name, String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// Runs a command to completion; returns stdout or an error naming the command line, exit status and stderr.
pub(crate) fn run_cmd(cmd: &mut Command) -> anyhow::Result<String> {
    let line = command_line(cmd);
    let out = cmd.output().with_context(|| format!("spawn `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command as a shell-like line, for error messages.
fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Names of all namespaces in `/var/run/netns` (what `ip netns list` shows).
pub fn list() -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => {
            for entry in dir {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(test: &str) -> String {
        format!("{test}-{}", std::process::id())
    }

    #[test]
    fn a_namespace_is_created_entered_and_deleted_on_drop() {
        if !crate::require_root("a_namespace_is_created_entered_and_deleted_on_drop") {
            return;
        }
        let name = unique("netns-unit-lifecycle");
        let ns = NetNs::create(&name).unwrap();
        assert!(list().unwrap().contains(&name));

        // A thread inside the namespace sees only its loopback.
        let links = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
        assert!(links.contains("lo:"));
        assert!(!links.contains("eth0:"), "entered the wrong namespace: {links}");

        // A command inside it, too.
        let out = ns.exec("ip", &["-o", "link"]).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");

        ns.set_sysctl("net/ipv4/ip_forward", "1").unwrap();
        let fwd = ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap());
        assert_eq!(fwd.trim(), "1");

        drop(ns);
        assert!(!list().unwrap().contains(&name));
    }

    #[test]
    fn a_failing_command_reports_its_line_and_stderr() {
        if !crate::require_root("a_failing_command_reports_its_line_and_stderr") {
            return;
        }
        let ns = NetNs::create(&unique("netns-unit-fail")).unwrap();
        let err = ns.exec("ip", &["link", "set", "nosuchdev", "up"]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("ip link set nosuchdev up"), "{msg}");
        assert!(msg.to_lowercase().contains("nosuchdev"), "{msg}");
    }
}
