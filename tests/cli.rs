//! The command line as a user meets it: bad configuration stops start-up with a non-zero exit
//! and a message naming the key, before anything is contacted.

use std::process::{Command, Output};

/// Runs trstream with S3 credentials in the environment (there are none built in) and `env`.
fn trstream(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trstream"));
    cmd.args(args);
    cmd.env("TRSTREAM_S3_ACCESS_KEY_ID", "key").env("TRSTREAM_S3_SECRET_ACCESS_KEY", "secret");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("TRSTREAM_LOG");
    cmd.output().expect("run trstream")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

/// Runs `trstream run` and asserts it fails naming `key`.
fn assert_refused(args: &[&str], env: &[(&str, &str)], key: &str) {
    let out = trstream(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(key), "{args:?}: error should name `{key}`, got: {stderr}");
}

#[test]
fn each_kind_of_bad_configuration_is_refused_by_name() {
    let unknown = config_file("[flush]\nmax_rowz = 10\n");
    assert_refused(&["run", "--config", unknown.path().to_str().unwrap()], &[], "max_rowz");

    let unknown_section = config_file("[kafak]\nbrokers = \"x:1\"\n");
    assert_refused(&["run", "--config", unknown_section.path().to_str().unwrap()], &[], "kafak");

    let wrong_type = config_file("[flush]\nmax_age = 10\n");
    assert_refused(&["run", "--config", wrong_type.path().to_str().unwrap()], &[], "flush.max_age");

    let inconsistent = config_file("[kafka]\nsession_timeout = \"10s\"\n[shutdown]\ndrain_timeout = \"30s\"\n");
    assert_refused(&["run", "--config", inconsistent.path().to_str().unwrap()], &[], "shutdown.drain_timeout");

    let not_toml = config_file("[flush\n");
    assert_refused(&["run", "--config", not_toml.path().to_str().unwrap()], &[], "TOML");

    assert_refused(&["run", "--config", "/nonexistent/trstream.toml"], &[], "/nonexistent/trstream.toml");
    assert_refused(&["run"], &[("TRSTREAM_FLUSH_MAX_ROWS", "many")], "flush.max_rows");
    assert_refused(&["run"], &[("TRSTREAM_FLUSH_MAX_ROWZ", "1")], "max_rowz");
    assert_refused(&["run", "--set", "flush.max_rows=0"], &[], "flush.max_rows");
    assert_refused(&["run", "--s3-endpoint", "minio:9000"], &[], "s3.endpoint");
    assert_refused(&["run"], &[("TRSTREAM_S3_ACCESS_KEY_ID", "")], "TRSTREAM_S3_ACCESS_KEY_ID");
    assert_refused(&["run"], &[("TRSTREAM_S3_SECRET_ACCESS_KEY", "")], "s3.secret_access_key");
    assert_refused(&["run", "--set", "kafka.lag_interval=10ms"], &[], "kafka.lag_interval");
    assert_refused(
        &["run", "--set", "memory.total_max_buffered_bytes=1000"],
        &[],
        "memory.partition_max_buffered_bytes",
    );
}

#[test]
fn print_config_shows_the_effective_values_without_the_secret() {
    let file = config_file("[flush]\nmax_rows = 1234\n");
    let out = trstream(
        &["run", "--config", file.path().to_str().unwrap(), "--brokers", "kafka:9092", "--print-config"],
        &[("TRSTREAM_S3_SECRET_ACCESS_KEY", "hunter2"), ("TRSTREAM_FLUSH_MAX_AGE", "3s")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max_rows = 1234"), "{text}");
    assert!(text.contains("max_age = \"3s\""), "{text}");
    assert!(text.contains("brokers = \"kafka:9092\""), "{text}");
    assert!(!text.contains("hunter2"), "the secret is redacted");
}

#[test]
fn healthcheck_fails_naming_the_url_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let out = trstream(&["healthcheck", "--url", &url, "--timeout", "1s"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&url), "{}", String::from_utf8_lossy(&out.stderr));
    let out = trstream(&["healthcheck", "--url", "https://x/healthz"], &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("http://"));
}

#[test]
fn produce_refuses_bad_forced_values_before_connecting() {
    for (flag, value) in
        [("--currency", "XXX"), ("--country", "ZZ"), ("--transaction-type", "GIFT"), ("--amount-min", "0.001")]
    {
        let out = trstream(&["produce", "--brokers", "127.0.0.1:1", "--count", "1", flag, value], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} should fail");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}
