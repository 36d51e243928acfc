//! A service as its own OS process, for tests that kill it: started from a binary with an
//! environment, its output in a log file the test names in its failures, killed with SIGKILL and
//! started again with the same environment, its resident memory read from `/proc`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One service process; killed (SIGKILL) when dropped.
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

    /// SIGKILL, then reaps the process; nothing happens when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The process's resident memory in KiB (`VmRSS`), or `None` when it is not running.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A loopback TCP port free right now, for a process that must listen on a known port (and
/// keep it across restarts). Another process may take it in between; tests accept that race.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
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
}
