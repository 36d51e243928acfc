//! Where the time goes during a timed phase: CPU used by this process (client and in-process
//! services), by Redis (its own `INFO cpu`), by RabbitMQ (`beam.smp` found in `/proc`, when it
//! runs on this machine) and by everything else on the machine (`/proc/stat` minus those), and
//! the time Redis spent running scripts (`INFO commandstats`).
//!
//! Redis is shared with whatever else runs against it, so its figures are upper bounds for the
//! benchmark's own load; `other_cores` shows when something else (a build) competed for the CPU.

use std::time::Instant;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use crate::stats::round;

/// Clock ticks per second of `/proc/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const CLOCK_TICKS: f64 = 100.0;

/// Cores, and the Redis version when Redis answers.
pub(crate) async fn machine(redis_url: &str) -> Value {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let version = match Probe::new(redis_url).await {
        Ok(mut probe) => probe.info("server").await.ok().and_then(|info| field(&info, "redis_version")),
        Err(_) => None,
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()));
    json!({"cores": cores, "redis_version": version, "loadavg_1m_at_start": loadavg})
}

/// Samples CPU and script time; see [`Sample::since`].
pub(crate) struct Probe {
    redis: ConnectionManager,
    rabbitmq: Option<u32>,
}

/// Cumulative counters at one instant.
pub(crate) struct Sample {
    at: Instant,
    bench_s: Option<f64>,
    redis_s: Option<f64>,
    rabbitmq_s: Option<f64>,
    machine_s: Option<f64>,
    script_calls: u64,
    script_usec: u64,
}

impl Probe {
    pub(crate) async fn new(redis_url: &str) -> anyhow::Result<Probe> {
        let client =
            redis::Client::open(redis_url).with_context(|| format!("invalid Redis URL {redis_url:?}"))?;
        let redis = ConnectionManager::new(client)
            .await
            .with_context(|| format!("cannot connect to Redis at {redis_url} (CAIRN_TEST_REDIS_URL)"))?;
        Ok(Probe { redis, rabbitmq: find_process("beam.smp") })
    }

    async fn info(&mut self, sections: &str) -> anyhow::Result<String> {
        let mut cmd = redis::cmd("INFO");
        for section in sections.split_whitespace() {
            cmd.arg(section);
        }
        Ok(cmd.query_async(&mut self.redis).await?)
    }

    pub(crate) async fn sample(&mut self) -> anyhow::Result<Sample> {
        let info = self.info("cpu commandstats").await?;
        let cpu = |name| field(&info, name).and_then(|v| v.parse::<f64>().ok());
        let redis_s = cpu("used_cpu_user").zip(cpu("used_cpu_sys")).map(|(u, s)| u + s);
        let (mut script_calls, mut script_usec) = (0, 0);
        // All of Cairn's Lua runs as library functions (FCALL), the trimmer's too.
        for command in ["cmdstat_eval", "cmdstat_evalsha", "cmdstat_fcall"] {
            if let Some(stats) = field(&info, command) {
                script_calls += stat(&stats, "calls");
                script_usec += stat(&stats, "usec");
            }
        }
        Ok(Sample {
            at: Instant::now(),
            bench_s: cairn_testkit::cpu_seconds(std::process::id()),
            redis_s,
            rabbitmq_s: self.rabbitmq.and_then(cairn_testkit::cpu_seconds),
            machine_s: machine_cpu_s(),
            script_calls,
            script_usec,
        })
    }
}

impl Sample {
    /// From `earlier` to this sample: wall time, the average number of cores each process kept
    /// busy, and the number and total time of Redis script calls (how busy Redis's one thread
    /// was running Cairn's Lua).
    pub(crate) fn since(&self, earlier: &Sample) -> Value {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let cores =
            |now: Option<f64>, then: Option<f64>| now.zip(then).map(|(n, t)| round((n - t) / wall, 2));
        let delta = |now: Option<f64>, then: Option<f64>| now.zip(then).map(|(n, t)| n - t);
        let known = [
            delta(self.bench_s, earlier.bench_s),
            delta(self.redis_s, earlier.redis_s),
            delta(self.rabbitmq_s, earlier.rabbitmq_s),
        ];
        let others = delta(self.machine_s, earlier.machine_s).map(|machine| {
            let known: f64 = known.iter().flatten().sum();
            round((machine - known).max(0.0) / wall, 2)
        });
        let calls = self.script_calls.saturating_sub(earlier.script_calls);
        let usec = self.script_usec.saturating_sub(earlier.script_usec);
        json!({
            "wall_s": round(wall, 3),
            "bench_cores": cores(self.bench_s, earlier.bench_s),
            "redis_cores": cores(self.redis_s, earlier.redis_s),
            "rabbitmq_cores": cores(self.rabbitmq_s, earlier.rabbitmq_s),
            "other_cores": others,
            "redis_script_calls": calls,
            "redis_script_busy": round(usec as f64 / 1e6 / wall, 2),
            "redis_script_us_per_call": if calls > 0 { Some(round(usec as f64 / calls as f64, 1)) } else { None },
        })
    }

    /// Microseconds Redis spent in scripts since `earlier`.
    pub(crate) fn script_usec_since(&self, earlier: &Sample) -> u64 {
        self.script_usec.saturating_sub(earlier.script_usec)
    }
}

/// CPU microseconds each process spent per item (message, update or call) during a measurement,
/// from the figures [`Sample::since`] gives: what one item costs where, which says whether a
/// rate can fit on the machine's cores at all.
pub(crate) fn us_per_item(cpu: &Value, items: u64) -> Value {
    let per = |cores: &str| -> Option<f64> {
        let busy_s = cpu[cores].as_f64()? * cpu["wall_s"].as_f64()?;
        (items > 0).then(|| round(busy_s / items as f64 * 1e6, 1))
    };
    json!({"bench": per("bench_cores"), "redis": per("redis_cores"), "rabbitmq": per("rabbitmq_cores")})
}

/// `name:value` from an `INFO` answer.
fn field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().to_owned()))
}

/// `calls=…` from a `cmdstat_*` line (`calls=3,usec=20,usec_per_call=6.67,…`).
fn stat(stats: &str, name: &str) -> u64 {
    stats.split(',').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(0)
}

/// Busy CPU seconds of the whole machine, all cores (`/proc/stat`, everything but idle and
/// iowait).
fn machine_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_ticks(&stat).map(|ticks| ticks as f64 / CLOCK_TICKS)
}

fn parse_machine_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Some(busy)
}

/// The pid of the first process whose `comm` is `name`.
fn find_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_and_stat_lines() {
        let info = "# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.25\r\n# Commandstats\r\n\
                    cmdstat_evalsha:calls=10,usec=250,usec_per_call=25.00,rejected_calls=0\r\n";
        assert_eq!(field(info, "used_cpu_user").as_deref(), Some("2.25"));
        assert_eq!(field(info, "used_cpu"), None);
        let stats = field(info, "cmdstat_evalsha").unwrap();
        assert_eq!((stat(&stats, "calls"), stat(&stats, "usec")), (10, 250));
        assert_eq!(stat(&stats, "missing"), 0);
        let machine = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\n";
        assert_eq!(parse_machine_ticks(machine), Some(161));
    }

    #[test]
    fn cost_per_item_is_busy_time_over_items() {
        let cpu = json!({"wall_s": 2.0, "bench_cores": 0.25, "redis_cores": 0.5, "rabbitmq_cores": null});
        assert_eq!(us_per_item(&cpu, 10_000), json!({"bench": 50.0, "redis": 100.0, "rabbitmq": null}));
        assert_eq!(us_per_item(&cpu, 0), json!({"bench": null, "redis": null, "rabbitmq": null}));
    }
}
