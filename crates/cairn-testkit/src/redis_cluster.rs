use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long the three masters have to answer PING, and then to agree on `cluster_state:ok`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Fresh port sets tried when a port picked was taken before its server bound it.
const ATTEMPTS: usize = 3;
/// Masters of the cluster: the fewest `redis-cli --cluster create` accepts.
const MASTERS: usize = 3;

/// A Redis Cluster of its own on loopback: three `redis-server --cluster-enabled yes` masters on
/// free ports, no replicas, no persistence, joined with `redis-cli --cluster create` and ready
/// (`cluster_state:ok` on every node) when [`RedisCluster::new`] returns. Dropping it kills the
/// processes and removes their directories. The binaries are `redis-server` and `redis-cli` on
/// `PATH` unless `CAIRN_TEST_REDIS_SERVER` / `CAIRN_TEST_REDIS_CLI` name others.
///
/// [`RedisCluster::with_tls`] makes one that speaks TLS only, on its client ports and its
/// cluster bus (`tls-cluster yes`), as managed Redis Clusters with in-transit encryption do.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    tls: Option<Tls>,
}

/// The server certificate, its key and the CA that signed it (PEM files).
#[derive(Debug, Clone)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

#[derive(Debug)]
struct Node {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: Option<Tls>,
}

impl RedisCluster {
    /// A running cluster of three masters covering all 16 384 slots.
    pub async fn new() -> Self {
        Self::start_with(None).await
    }

    /// A running cluster of three masters that accept only TLS, with the certificate of
    /// `certs` (for `127.0.0.1`); its nodes talk TLS to each other too. Clients trust
    /// [`TestCerts::ca_file`](crate::TestCerts::ca_file).
    pub async fn with_tls(certs: &crate::TestCerts) -> Self {
        let tls = Tls { cert: certs.cert_file(), key: certs.key_file(), ca: certs.ca_file() };
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> Self {
        let mut last_error = None;
        for _ in 0..ATTEMPTS {
            match Self::start(tls.clone()).await {
                Ok(cluster) => return cluster,
                Err(e) => last_error = Some(e),
            }
        }
        panic!("cannot start a redis cluster: {:#}", last_error.expect("at least one attempt"));
    }

    /// The seed URLs, comma-separated, as `CAIRN_REDIS_URL` takes them with
    /// `CAIRN_REDIS_CLUSTER=true`.
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    /// One URL per master: `redis://127.0.0.1:{port}`, or `rediss://` for a TLS cluster.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `CONFIG SET name value` on every master.
    pub async fn config_set(&self, name: &str, value: &str) {
        for node in &self.nodes {
            node.query("CONFIG", &["SET", name, value])
                .await
                .unwrap_or_else(|e| panic!("CONFIG SET {name} {value} on {}: {e:#}", node.url()));
        }
    }

    /// How many keys each master holds (`DBSIZE`), in the order of [`urls`](Self::urls).
    pub async fn key_counts(&self) -> Vec<u64> {
        let mut counts = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let size =
                node.query("DBSIZE", &[]).await.unwrap_or_else(|e| panic!("DBSIZE on {}: {e:#}", node.url()));
            counts.push(size.parse().unwrap_or_else(|e| panic!("DBSIZE answered {size:?}: {e}")));
        }
        counts
    }

    async fn start(tls: Option<Tls>) -> anyhow::Result<Self> {
        let mut cluster = RedisCluster { nodes: Vec::new(), tls: tls.clone() };
        for _ in 0..MASTERS {
            let dir = tempfile::Builder::new()
                .prefix("cairn-redis-cluster-")
                .tempdir()
                .context("cannot create a temporary directory for redis-server")?;
            let mut node = Node { port: crate::free_port(), dir, child: None, tls: tls.clone() };
            node.spawn()?;
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.wait_answering().await?;
        }
        cluster.create()?;
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    /// `redis-cli --cluster create` over the three masters, slots split evenly.
    fn create(&self) -> anyhow::Result<()> {
        let cli = crate::env_or("CAIRN_TEST_REDIS_CLI", "redis-cli");
        let addresses = self.nodes.iter().map(|node| format!("127.0.0.1:{}", node.port));
        let mut command = Command::new(&cli);
        if let Some(tls) = &self.tls {
            command.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        let output = command
            .args(["--cluster", "create"])
            .args(addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .with_context(|| {
                format!("cannot run {cli:?} (install redis-tools or set CAIRN_TEST_REDIS_CLI)")
            })?;
        if !output.status.success() {
            bail!(
                "`redis-cli --cluster create` failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Waits until every node reports `cluster_state:ok` and knows all the masters.
    async fn wait_ok(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for node in &self.nodes {
            loop {
                let info = node.query("CLUSTER", &["INFO"]).await.unwrap_or_default();
                let ok = info.lines().any(|line| line.trim() == "cluster_state:ok")
                    && info.lines().any(|line| line.trim() == format!("cluster_known_nodes:{MASTERS}"));
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("redis cluster node {} not ok within {START_TIMEOUT:?}: {info}", node.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Node {
    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let binary = crate::env_or("CAIRN_TEST_REDIS_SERVER", "redis-server");
        let dir = self.dir.path();
        let stderr = File::create(dir.join("stderr.log"))?;
        let mut command = Command::new(&binary);
        match &self.tls {
            None => command.arg("--port").arg(self.port.to_string()),
            Some(tls) => command
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.join("nodes.conf"))
            .args(["--cluster-node-timeout", "5000"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| {
                format!("cannot run {binary:?} (install redis-server or set CAIRN_TEST_REDIS_SERVER)")
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until this node's own process answers PING (not another one on a stolen port).
    async fn wait_answering(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server on port {} exited at start ({status}): {}", self.port, self.log_tail());
            }
            if let Ok(info) = self.query("INFO", &["server"]).await {
                let pid: Option<u32> = info
                    .lines()
                    .find_map(|line| line.strip_prefix("process_id:"))
                    .and_then(|pid| pid.trim().parse().ok());
                if pid == self.child.as_ref().map(Child::id) {
                    return Ok(());
                }
                bail!("port {} is served by another redis-server (pid {pid:?})", self.port);
            }
            if Instant::now() >= deadline {
                bail!("redis-server on port {} did not answer within {START_TIMEOUT:?}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One command on this node alone (no cluster redirection), its answer as text.
    async fn query(&self, command: &str, args: &[&str]) -> anyhow::Result<String> {
        let attempt = async {
            let client = match &self.tls {
                None => redis::Client::open(self.url())?,
                Some(tls) => {
                    install_crypto_provider();
                    let root_cert = Some(std::fs::read(&tls.ca)?);
                    let certs = redis::TlsCertificates { client_tls: None, root_cert };
                    redis::Client::build_with_tls(self.url(), certs)?
                }
            };
            let mut con = client.get_multiplexed_async_connection().await?;
            let text: String = redis::cmd(command).arg(args).query_async(&mut con).await?;
            anyhow::Ok(text)
        };
        tokio::time::timeout(Duration::from_secs(1), attempt).await.context("no answer within 1 s")?
    }

    fn log_tail(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let text = read("redis.log") + &read("stderr.log");
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

/// rustls with ring, as cairn-redis installs it, whichever other provider is linked. (Deprecated
/// only for lacking post-quantum key exchange.)
#[allow(deprecated)]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
