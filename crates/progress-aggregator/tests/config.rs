//! The binary refuses bad configuration with a message naming the variable, and its
//! `healthcheck` subcommand (used by container health checks) exists and reports failure.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_progress-aggregator");

#[test]
fn a_bad_environment_value_names_its_variable() {
    for (var, value) in
        [("CAIRN_PROGRESS_SHARDS", "0"), ("CAIRN_SHUTDOWN_GRACE", "soon"), ("CAIRN_KEY_PREFIX", "a b")]
    {
        let output = Command::new(BIN).env(var, value).output().expect("binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var) && stderr.contains(value), "{var}: {stderr}");
    }
}

#[test]
fn healthcheck_fails_when_nothing_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = Command::new(BIN)
        .arg("healthcheck")
        .env("CAIRN_AGGREGATOR_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .output()
        .expect("binary runs");
    assert!(!output.status.success(), "healthcheck against a closed port fails");
}
