//! `trstream run` as a process: SIGTERM drains, commits and exits 0 (I7).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Harness, free_port, spawn_daemon, stop_daemon, wait_for};

const GROUP: &str = "trstream-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    let mut h = Harness::new(2).await;
    // Nothing flushes on its own: only the SIGTERM drain can write and commit.
    let mut config = h.drain_only_config();
    let port = free_port();
    config.http.listen = format!("127.0.0.1:{port}");
    let child = spawn_daemon(&h, &config);
    h.produce(3_000);
    wait_for("the daemon consumed everything", Duration::from_secs(120), || {
        common::metric(([127, 0, 0, 1], port).into(), "trstream_records_consumed_total").unwrap_or(0.0) >= 3_000.0
    })
    .await;
    assert!(h.raw_files().is_empty(), "nothing flushed before SIGTERM");
    // What a container health check runs.
    for path in ["/healthz", "/readyz"] {
        let out = Command::new(env!("CARGO_BIN_EXE_trstream"))
            .args(["healthcheck", "--url", &format!("http://127.0.0.1:{port}{path}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
    }

    stop_daemon(child).await;
    h.assert_exactly_once(GROUP, true);
}
