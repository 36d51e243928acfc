//! A service as its own OS process, for tests that kill it: started from a binary with an
//! environment, its output in a log file the test names in its failures, sent signals (killed,
//! paused, resumed, asked to stop) together with the programs it runs, waited for, started again
//! with the same environment, its memory read from `/proc`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process, kill_process_group, test_kill_process};

/// How often [`ServiceProcess::wait_exit`] looks whether the process has ended.
const EXIT_POLL: Duration = Duration::from_millis(20);
/// Clock ticks per second of `/proc/*/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// One service process; killed with what it runs ([`ServiceProcess::kill`]) when dropped.
pub struct ServiceProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ServiceProcess {
    /// A process named `name` (for logs and messages) that runs `program args` with `env` added
    /// to a cleared environment (only `PATH` is kept), writing its output to `log_dir/name.log`.
    /// Not started yet: see [`ServiceProcess::start`].
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: &[&str],
        env: BTreeMap<String, String>,
        log_dir: &Path,
    ) -> ServiceProcess {
        let name = name.into();
        let log = log_dir.join(format!("{name}.log"));
        ServiceProcess {
            name,
            program: program.into(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            env,
            log,
            child: None,
            starts: 0,
        }
    }

    /// Starts the process (again, after [`ServiceProcess::kill`]); output is appended to its log.
    /// Panics, naming the program, when it cannot be started.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program.display()));
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL to the process and to what it runs ([`ServiceProcess::signal_tree`]), as when its
    /// host goes away, then reaps it; nothing happens when it is not running.
    pub fn kill(&mut self) {
        self.signal_tree(Signal::KILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the process alone (SIGTERM to ask it to stop); nothing happens when it
    /// is not running.
    pub fn signal(&mut self, signal: Signal) {
        if let Some(pid) = self.live_pid() {
            let _ = kill_process(pid, signal);
        }
    }

    /// Sends `signal` to the process and to the process groups its children lead: a service that
    /// runs programs in process groups of their own (the processor's `command` handlers) is
    /// killed, paused (SIGSTOP) or resumed (SIGCONT) with them, as when its host goes away or
    /// freezes. Before a SIGKILL the process is stopped, so it cannot start another program
    /// between the listing of its children and the kill; on SIGCONT it resumes before them.
    pub fn signal_tree(&mut self, signal: Signal) {
        let Some(pid) = self.live_pid() else { return };
        if signal == Signal::KILL {
            let _ = kill_process(pid, Signal::STOP);
        }
        if signal == Signal::CONT {
            let _ = kill_process(pid, signal);
        }
        for child in children(pid.as_raw_pid().unsigned_abs()) {
            if let Some(group) = i32::try_from(child).ok().and_then(Pid::from_raw) {
                // A child that leads no group of its own answers ESRCH: nothing to do.
                let _ = kill_process_group(group, signal);
            }
        }
        if signal != Signal::CONT {
            let _ = kill_process(pid, signal);
        }
    }

    /// Waits up to `timeout` for the process to end (blocking the thread) and reaps it: its exit
    /// status, or `None` when it is still running then, or was not started.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.as_mut()?.try_wait().ok()?;
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(EXIT_POLL);
        }
    }

    /// The pid of the process while it is running. Only a child not yet reaped keeps its pid:
    /// a pid read any later may name another process.
    fn live_pid(&mut self) -> Option<Pid> {
        let child = self.child.as_mut()?;
        if !matches!(child.try_wait(), Ok(None)) {
            return None;
        }
        i32::try_from(child.id()).ok().and_then(Pid::from_raw)
    }

    /// Whether the process was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else { return false };
        if matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        // It exited by itself: reaped, so it can be started again.
        self.child = None;
        false
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The process's resident memory in KiB (`VmRSS`), or `None` when it is not running.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// The most resident memory the process has had, in KiB (`VmHWM`), or `None` when it is not
    /// running.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid()?, "VmHWM")
    }

    /// The CPU time the process has used ([`cpu_seconds`]), or `None` when it is not running.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid()?)
    }

    /// The running process's id (for samplers that outlive a borrow), `None` before a start.
    pub fn pid(&self) -> Option<u32> {
        Some(self.child.as_ref()?.id())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the process's output goes; failing tests print its tail.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `VmRSS` of process `pid` in KiB, from `/proc/{pid}/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// The `field` line (`VmRSS`, `VmHWM`, …) of `/proc/{pid}/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line =
        status.lines().find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a process `pid` exists (a zombie, not yet reaped, still does), for a test to see a
/// program its service ran go away.
pub fn process_exists(pid: u32) -> bool {
    i32::try_from(pid).ok().and_then(Pid::from_raw).is_some_and(|pid| test_kill_process(pid).is_ok())
}

/// Sends `signal` to process `pid`, for a test holding a process started otherwise (a command
/// whose output it reads). The caller must hold the process unreaped, so `pid` is still its.
pub fn signal_process(pid: u32, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or(std::io::ErrorKind::InvalidInput)?;
    Ok(kill_process(pid, signal)?)
}

/// User plus system CPU seconds process `pid` has used, from `/proc/{pid}/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_ticks(&stat).map(|ticks| ticks as f64 / CLOCK_TICKS)
}

/// utime plus stime (fields 14 and 15) of a `/proc/{pid}/stat` line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let fields = stat_fields(stat)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The fields of a `/proc/{pid}/stat` line from the third (the state) on: they follow the `)`
/// that ends the command name, which may hold spaces and parentheses itself.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace().collect())
}

/// The processes whose parent is `pid`, from `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| parent(*candidate) == Some(pid))
        .collect()
}

/// The parent of process `pid` (field 4 of its `stat`).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(1)?.parse().ok()
}

/// A loopback TCP port free right now, for a process that must listen on a known port (and
/// keep it across restarts). Another process may take it in between; tests accept that race.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

/// `127.0.0.1:{free_port()}`, for a process given an address rather than a port.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_killed_restarted_and_measured() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]);
        let mut process = ServiceProcess::new(
            "sleeper",
            "/bin/sh",
            &["-c", "echo $GREETING; exec sleep 30"],
            env,
            dir.path(),
        );
        assert!(!process.is_running());
        assert_eq!(process.rss_kib(), None);
        let greeted = |process: &ServiceProcess, times: usize| {
            (0..500).any(|_| {
                let done =
                    std::fs::read_to_string(process.log()).unwrap_or_default().matches("hello").count()
                        >= times;
                if !done {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                done
            })
        };
        process.start();
        assert!(process.is_running());
        assert!(process.rss_kib().is_some_and(|kib| kib > 0));
        assert!(greeted(&process, 1), "the environment reaches the process");
        process.kill();
        assert!(!process.is_running());
        process.start();
        assert_eq!(process.starts(), 2);
        assert!(greeted(&process, 2), "a restart appends to the same log");
        process.kill();
        let log = std::fs::read_to_string(process.log()).unwrap();
        assert_eq!(log.matches("hello").count(), 2, "{log}");
        assert_eq!(process.log_tail(1), "hello");
    }

    /// The state letter of `/proc/{pid}/stat` (`S` sleeping, `T` stopped, `Z` zombie), `None`
    /// once the process is gone.
    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat_fields(&stat)?.first()?.chars().next()
    }

    #[test]
    fn stat_lines_are_read_past_the_command_name() {
        let stat = "2960 (beam (x) smp) S 1 2960 2960 0 -1 4194560 100 0 0 0 700 55 0 0 20 0 30 0";
        assert_eq!(cpu_ticks(stat), Some(755));
        assert_eq!(stat_fields(stat).unwrap()[..2], ["S", "1"]);
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
        assert_eq!(parent(std::process::id()), Some(std::os::unix::process::parent_id()));
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn signals_reach_the_process_and_the_groups_its_children_lead() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        // `setsid` puts the child in a process group of its own, as the processor's commands are.
        let script = format!("setsid sleep 30 & echo $! > {}; exec sleep 30", pidfile.display());
        let mut process =
            ServiceProcess::new("parent", "/bin/sh", &["-c", &script], BTreeMap::new(), dir.path());
        process.start();
        wait_for("the child's pid", || std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n')));
        let child: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        let parent = process.pid().unwrap();
        wait_for("the child's own group", || children(parent) == [child] && state(child).is_some());

        process.signal_tree(Signal::STOP);
        wait_for("both stopped", || state(parent) == Some('T') && state(child) == Some('T'));
        process.signal_tree(Signal::CONT);
        wait_for("both running again", || state(parent) == Some('S') && state(child) == Some('S'));
        process.signal(Signal::STOP);
        wait_for("the parent alone stopped", || state(parent) == Some('T'));
        assert_eq!(state(child), Some('S'), "a plain signal goes to the process alone");
        process.signal(Signal::CONT);

        assert!(process_exists(child));
        process.kill();
        assert!(!process.is_running());
        wait_for("the child killed with its parent", || !matches!(state(child), Some('S' | 'T' | 'R')));
    }

    #[test]
    fn wait_exit_reports_the_status_and_allows_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let script = "trap 'exit 3' TERM; echo trapped; while :; do sleep 0.01; done";
        let mut process =
            ServiceProcess::new("stopper", "/bin/sh", &["-c", script], BTreeMap::new(), dir.path());
        process.start();
        assert_eq!(process.wait_exit(Duration::from_millis(50)), None, "still running");
        // A TERM before the trap is set would end the shell with 143.
        wait_for("the trap", || {
            std::fs::read_to_string(process.log()).unwrap_or_default().contains("trapped")
        });
        process.signal(Signal::TERM);
        let status = process.wait_exit(Duration::from_secs(10)).expect("exits on SIGTERM");
        assert_eq!(status.code(), Some(3));
        assert!(!process.is_running());
        assert_eq!(process.wait_exit(Duration::ZERO), None, "reaped once");
        process.start();
        process.signal_tree(Signal::KILL);
        let status = process.wait_exit(Duration::from_secs(10)).expect("killed");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    }

    #[test]
    fn a_process_that_exits_by_itself_can_be_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut process =
            ServiceProcess::new("short", "/bin/sh", &["-c", "echo ran"], BTreeMap::new(), dir.path());
        process.start();
        wait_for("it exits", || !process.is_running());
        process.start();
        wait_for("it exits again", || !process.is_running());
        assert_eq!(process.starts(), 2);
        let log = std::fs::read_to_string(process.log()).unwrap();
        assert_eq!(log.matches("ran").count(), 2, "{log}");
    }
}
