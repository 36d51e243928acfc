use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::free_port;

/// How long a started server has to answer PING (AOF replay included).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports tried when the one picked was taken by someone else before Redis bound it.
const PORT_ATTEMPTS: usize = 3;

/// A `redis-server` process of its own, for tests that kill, restart or freeze Redis.
///
/// Listens on 127.0.0.1 on a free port with its data and log in a temporary directory; no RDB
/// snapshots. With [`RedisServer::with_aof`] every write is fsynced to the append-only file
/// (`appendfsync always`), so data written before [`stop`](Self::stop) (a SIGKILL) is back
/// after [`restart`](Self::restart). Dropping it kills the process and removes the directory.
/// [`RedisServer::builder`] adds a TLS port ([`tls_url`](Self::tls_url)) and an ACL file.
/// The binary is `redis-server` on `PATH` unless `CAIRN_TEST_REDIS_SERVER` names another.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    options: RedisServerBuilder,
    dir: tempfile::TempDir,
    child: Option<Child>,
    paused: bool,
}

/// A [`RedisServer`] with more than the defaults: AOF, a TLS port, an ACL file.
#[derive(Debug, Clone, Default)]
pub struct RedisServerBuilder {
    aof: bool,
    /// Certificate, key and CA files, and the TLS port once picked.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    tls_port: u16,
    /// The ACL file and the user (name, password) the harness itself connects as.
    acl: Option<(PathBuf, String, String)>,
}

impl RedisServerBuilder {
    /// The append-only file on, as [`RedisServer::with_aof`].
    pub fn aof(mut self) -> Self {
        self.aof = true;
        self
    }

    /// A TLS port besides the plain one, serving `certs`' server certificate (clients need no
    /// certificate of their own).
    pub fn tls(mut self, certs: &crate::TestCerts) -> Self {
        self.tls = Some((certs.cert_file(), certs.key_file(), certs.ca_file()));
        self
    }

    /// Users from the ACL file at `path` (`aclfile`). The harness checks readiness as `user`
    /// with `password`, which the file must allow `INFO`; [`RedisServer::url`] carries them too.
    pub fn acl_file(mut self, path: impl Into<PathBuf>, user: &str, password: &str) -> Self {
        self.acl = Some((path.into(), user.to_owned(), password.to_owned()));
        self
    }

    pub async fn start(self) -> RedisServer {
        RedisServer::start(self).await
    }
}

impl RedisServer {
    /// A running server without persistence.
    pub async fn new() -> Self {
        Self::start(RedisServerBuilder::default()).await
    }

    /// A running server with the append-only file on, so data survives [`stop`](Self::stop) and
    /// [`restart`](Self::restart).
    pub async fn with_aof() -> Self {
        Self::start(RedisServerBuilder::default().aof()).await
    }

    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    async fn start(options: RedisServerBuilder) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cairn-redis-")
            .tempdir()
            .expect("cannot create a temporary directory for redis-server");
        let mut server = Self { port: 0, options, dir, child: None, paused: false };
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            if server.options.tls.is_some() {
                server.options.tls_port = free_port();
            }
            match server.launch().await {
                Ok(()) => return server,
                Err(e) => last_error = Some(e),
            }
        }
        panic!("cannot start redis-server: {:#}", last_error.expect("at least one attempt"));
    }

    /// `redis://[user:password@]127.0.0.1:{port}`: the plain port, as the harness's own user
    /// when the server has an ACL file.
    pub fn url(&self) -> String {
        format!("redis://{}127.0.0.1:{}", self.userinfo(), self.port)
    }

    /// `rediss://127.0.0.1:{tls port}` (no user), for a server built with
    /// [`RedisServerBuilder::tls`].
    pub fn tls_url(&self) -> String {
        assert!(
            self.options.tls.is_some(),
            "this redis-server has no TLS port (RedisServer::builder().tls(..))"
        );
        format!("rediss://127.0.0.1:{}", self.options.tls_port)
    }

    fn userinfo(&self) -> String {
        match &self.options.acl {
            Some((_, user, password)) => format!("{user}:{password}@"),
            None => String::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (AOF files and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL (a crash, not a clean shutdown) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a SIGSTOPped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Starts the server again on the same port and directory (stopping it first if it still
    /// runs) and waits until it answers; with AOF the data comes back.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.launch().await {
            panic!("cannot restart redis-server on port {}: {e:#}", self.port);
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing is answered, like a
    /// stalled or partitioned server.
    pub fn pause(&mut self) {
        self.signal("STOP");
        self.paused = true;
    }

    /// Undoes [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("CONT");
        self.paused = false;
    }

    fn signal(&self, name: &str) {
        let child = self
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("redis-server on port {} is not running", self.port));
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill -{name}`: {e}"));
        assert!(status.success(), "`kill -{name} {}` failed: {status}", child.id());
    }

    /// Spawns the process on `self.port` and waits until it answers PING.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let binary = crate::env_or("CAIRN_TEST_REDIS_SERVER", "redis-server");
        let dir = self.dir.path();
        let log = dir.join("redis.log");
        let stderr = File::create(dir.join("stderr.log"))?;
        let mut command = Command::new(&binary);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .args(["--appendonly", if self.options.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some((cert, key, ca)) = &self.options.tls {
            command
                .arg("--tls-port")
                .arg(self.options.tls_port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]);
        }
        if let Some((acl, _, _)) = &self.options.acl {
            command.arg("--aclfile").arg(acl);
        }
        let child = command.spawn().with_context(|| {
            format!("cannot run {binary:?} (install redis-server or set CAIRN_TEST_REDIS_SERVER)")
        })?;
        self.child = Some(child);
        match self.wait_ready().await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.stop();
                Err(e.context(format!("log: {}", self.log_tail())))
            }
        }
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server on port {} exited at start ({status})", self.port);
            }
            let ours = self.child.as_ref().map(Child::id);
            if let Some(pid) = serving_pid(&self.url()).await {
                if Some(pid) == ours {
                    return Ok(());
                }
                bail!("port {} is served by another redis-server (pid {pid})", self.port);
            }
            if Instant::now() >= deadline {
                bail!("redis-server on port {} did not answer PING within {START_TIMEOUT:?}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_tail(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let text = read("redis.log") + &read("stderr.log");
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.paused
            && let Some(child) = &self.child
        {
            let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
        }
        self.stop();
    }
}

/// The pid of the Redis answering on `port`, once it serves commands (not while it replays the
/// AOF). Compared with our child's pid so a server another process started on a stolen port is
/// never mistaken for ours.
async fn serving_pid(url: &str) -> Option<u32> {
    let attempt = async {
        let client = redis::Client::open(url).ok()?;
        let mut con = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut con).await.ok()?;
        info.lines().find_map(|line| line.strip_prefix("process_id:")).and_then(|pid| pid.trim().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt).await.ok().flatten()
}
