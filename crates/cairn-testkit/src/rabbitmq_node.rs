use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a node has to open its TLS listener (Erlang boot, Mnesia, listeners).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a node has to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A RabbitMQ node of its own, apart from the shared one: for tests of what the shared node is
/// not set up for, such as TLS. The node listens only on a TLS port (`listeners.ssl.default`,
/// [`tls_url`](Self::tls_url)) with `certs`' server certificate, plus its Erlang distribution
/// port; its name, Mnesia, logs, config and Erlang cookie (`HOME`) live in a temporary directory,
/// and no plugin is enabled (so nothing else, such as the management port, is taken). Dropping
/// it stops the node (SIGTERM, SIGKILL after 30 s) and removes the directory.
///
/// The binary is `CAIRN_TEST_RABBITMQ_SERVER`, else the Debian package's own start script
/// (`/usr/lib/rabbitmq/bin/rabbitmq-server`, which runs as the calling user, unlike
/// `/usr/sbin/rabbitmq-server` that switches to the `rabbitmq` user), else `rabbitmq-server`.
#[derive(Debug)]
pub struct RabbitNode {
    tls_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RabbitNode {
    /// A running node with a TLS listener (user `guest`, password `guest`, vhost `/`).
    pub async fn with_tls(certs: &crate::TestCerts) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cairn-rabbitmq-")
            .tempdir()
            .expect("cannot create a temporary directory for rabbitmq-server");
        let mut node = Self { tls_port: crate::free_port(), dir, child: None };
        if let Err(e) = node.launch(certs).await {
            let log = node.log_tail();
            node.stop();
            panic!("cannot start a rabbitmq node: {e:#}\nlog:\n{log}");
        }
        node
    }

    /// `amqps://guest:guest@127.0.0.1:{port}/%2f`.
    pub fn tls_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.tls_port)
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    async fn launch(&mut self, certs: &crate::TestCerts) -> anyhow::Result<()> {
        let dir = self.dir.path().to_owned();
        let config = dir.join("rabbitmq.conf");
        std::fs::write(
            &config,
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {ca}\n\
                 ssl_options.certfile = {cert}\n\
                 ssl_options.keyfile = {key}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                port = self.tls_port,
                ca = certs.ca_file().display(),
                cert = certs.cert_file().display(),
                key = certs.key_file().display(),
            ),
        )?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let binary =
            std::env::var("CAIRN_TEST_RABBITMQ_SERVER").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
                let debian = "/usr/lib/rabbitmq/bin/rabbitmq-server";
                if Path::new(debian).exists() { debian.to_owned() } else { "rabbitmq-server".to_owned() }
            });
        let name = format!("cairn-{}@localhost", crate::short_id());
        let output = File::create(dir.join("output.log"))?;
        let child = Command::new(&binary)
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", crate::free_port().to_string())
            .env("RABBITMQ_DIST_PORT", crate::free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("HOME", &dir)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| {
                format!("cannot run {binary:?} (install rabbitmq-server or set CAIRN_TEST_RABBITMQ_SERVER)")
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()).transpose()? {
                bail!("rabbitmq node {name} exited at start ({status})");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.tls_port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("rabbitmq node {name} did not open port {} within {START_TIMEOUT:?}", self.tls_port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM (the node shuts down cleanly), then SIGKILL if it is still there after 30 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
    }
}
