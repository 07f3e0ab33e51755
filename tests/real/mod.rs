//! The real-infrastructure harness of the chaos tests: Tansu (Kafka API, sqlite storage) and
//! Garage (S3, sqlite metadata), each its own process, and trstream daemons as OS processes.
//! Every one of them can be SIGKILLed and restarted with its data.
//!
//! The binaries come from `$TANSU_BIN` / `$GARAGE_BIN`, else `tansu` / `garage` on the PATH
//! (`.ci/run` installs both with `cargo install`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use trstream::config::Config;

use crate::common::free_port;

pub const TOPIC: &str = "transactions";
pub const DLQ: &str = "transactions.dlq";
pub const GROUP: &str = "trstream-chaos";
pub const BUCKETS: [&str; 2] = ["raw-data", "tb-transactions"];

fn binary(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a command to completion; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed? .ci/run installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` until it holds or `timeout` passes (then panics naming `what`).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn port_open(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// One long-running child process that can be SIGKILLed and started again the same way.
struct Process {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    envs: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name)))
            .unwrap();
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e} (is it installed? .ci/run installs it)", self.program));
        self.child = Some(child);
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails the test if the process died on its own.
    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Some(status) = c.try_wait().unwrap()
        {
            let log = std::fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default();
            let tail: String =
                log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("{} exited on its own ({status}); its log ends:\n{tail}", self.name);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tansu on loopback with its sqlite file in `dir`: a killed broker restarts with its data.
pub struct Tansu {
    process: Process,
    pub bootstrap: String,
    addr: SocketAddr,
}

impl Tansu {
    pub fn start(dir: &Path) -> Tansu {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let process = Process {
            name: "tansu",
            program: binary("TANSU_BIN", "tansu"),
            args: vec![
                "broker".into(),
                format!("--listener-url={url}"),
                format!("--advertised-listener-url={url}"),
                // Relative to the process's directory.
                "--storage-engine=sqlite://tansu.db".into(),
            ],
            dir: dir.to_path_buf(),
            envs: vec![("RUST_LOG".into(), std::env::var("CHAOS_TANSU_LOG").unwrap_or_else(|_| "warn".into()))],
            child: None,
            starts: 0,
        };
        let mut t = Tansu { process, bootstrap: format!("127.0.0.1:{port}"), addr: ([127, 0, 0, 1], port).into() };
        t.restart();
        t
    }

    /// Starts it again (after [`Tansu::kill`]) and waits until it answers metadata requests.
    pub fn restart(&mut self) {
        self.process.spawn();
        let addr = self.addr;
        wait_until("Tansu to listen", Duration::from_secs(30), || {
            self.process.assert_running();
            port_open(addr)
        });
        let probe: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        wait_until("Tansu to answer metadata", Duration::from_secs(30), || {
            probe.fetch_metadata(None, Duration::from_secs(2)).is_ok()
        });
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        run(Command::new(&self.process.program).args([
            "topic",
            "create",
            &format!("--broker=tcp://{}", self.bootstrap),
            &format!("--partitions={partitions}"),
            name,
        ]));
    }

    pub fn delete_topic(&self, name: &str) {
        run(Command::new(&self.process.program).args([
            "topic",
            "delete",
            &format!("--broker=tcp://{}", self.bootstrap),
            name,
        ]));
    }

    /// Whether the broker knows `topic`.
    pub fn has_topic(&self, topic: &str) -> bool {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(5)).expect("metadata");
        md.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    }

    /// Log end offsets of `topic`'s partitions `0..partitions`.
    pub fn end_offsets(&self, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create().unwrap();
        // Tansu can be slow to answer while its group coordinator rebalances: asked again.
        let deadline = Instant::now() + Duration::from_secs(60);
        (0..partitions)
            .map(|p| {
                loop {
                    match c.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                        Ok((_, high)) => break (p, high),
                        Err(e) if Instant::now() < deadline => {
                            eprintln!("watermarks of {topic}/{p}: {e}; asking again")
                        }
                        Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
                    }
                }
            })
            .collect()
    }

    /// Committed next-offsets of `group` on `topic` (-1: none).
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, i64> {
        let c: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).set("group.id", group).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(5)) else { return BTreeMap::new() };
        got.elements()
            .iter()
            .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { o } else { -1 }))
            .collect()
    }
}

/// Garage, one node, sqlite metadata in `dir`: a killed store restarts with its data.
pub struct Garage {
    process: Process,
    config: PathBuf,
    pub endpoint: String,
    s3: SocketAddr,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    pub fn start(dir: &Path) -> Garage {
        std::fs::create_dir_all(dir).unwrap();
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{dir}/meta\"\n\
                 data_dir = \"{dir}/data\"\n\
                 db_engine = \"sqlite\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\n\
                 api_bind_addr = \"127.0.0.1:{admin}\"\n",
                dir = dir.display(),
                secret = "5a".repeat(32),
            ),
        )
        .unwrap();
        let process = Process {
            name: "garage",
            program: binary("GARAGE_BIN", "garage"),
            args: vec!["-c".into(), config.display().to_string(), "server".into()],
            dir: dir.to_path_buf(),
            envs: vec![("RUST_LOG".into(), "garage=warn".into())],
            child: None,
            starts: 0,
        };
        let mut g = Garage {
            process,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            s3: ([127, 0, 0, 1], s3).into(),
            // Garage's own shapes: "GK" + 12 bytes, and 32 bytes, hex.
            key_id: format!("GK{}", "0123456789ab".repeat(2)),
            secret: "c0ffee".repeat(10) + "c0ff",
        };
        g.restart();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["key", "import", "--yes", "-n", "trstream", &g.key_id.clone(), &g.secret.clone()]);
        for b in BUCKETS {
            g.cli(&["bucket", "create", b]);
            g.cli(&["bucket", "allow", "--read", "--write", "--owner", b, "--key", "trstream"]);
        }
        let s3 = g.s3;
        wait_until("Garage's S3 API", Duration::from_secs(30), || port_open(s3));
        g
    }

    fn cli(&self, args: &[&str]) -> String {
        run(Command::new(&self.process.program).arg("-c").arg(&self.config).args(args))
    }

    /// Starts it again (after [`Garage::kill`]) and waits until its RPC answers.
    pub fn restart(&mut self) {
        self.process.spawn();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.process.assert_running();
            let ok = Command::new(&self.process.program)
                .arg("-c")
                .arg(&self.config)
                .arg("status")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok && port_open(self.s3) {
                break;
            }
            assert!(Instant::now() < deadline, "Garage did not come up within 30s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn configure(&self, s3: &mut trstream::config::S3Config) {
        s3.endpoint = self.endpoint.clone();
        s3.region = "garage".into();
        s3.access_key_id = self.key_id.clone();
        s3.secret_access_key = self.secret.clone();
        s3.force_path_style = true;
        s3.create_bucket = false;
    }
}

/// `trstream run` as its own OS process, with its config in a file and its log beside it.
pub struct Daemon {
    process: Process,
    pub http: SocketAddr,
}

impl Daemon {
    /// Starts `trstream run` with `config` (its `http.listen` replaced by a free port) as `name`.
    pub fn start(dir: &Path, name: &'static str, config: &Config) -> Daemon {
        Daemon::start_with(dir, name, config, None)
    }

    /// [`Daemon::start`], with `TRSTREAM_FAULTS=faults` (test-only fault injection) if given.
    pub fn start_with(dir: &Path, name: &'static str, config: &Config, faults: Option<&str>) -> Daemon {
        let mut config = config.clone();
        let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        config.http.listen = http.to_string();
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let mut process = Process {
            name,
            program: PathBuf::from(env!("CARGO_BIN_EXE_trstream")),
            args: vec!["run".into(), "--config".into(), file.display().to_string()],
            dir: dir.to_path_buf(),
            envs: vec![("TRSTREAM_LOG".into(), "info,librdkafka=warn,rdkafka=warn".into())],
            child: None,
            starts: 0,
        };
        if let Some(spec) = faults {
            process.envs.push((trstream::faults::ENV.into(), spec.into()));
        }
        process.spawn();
        let mut d = Daemon { process, http };
        wait_until("the daemon's /metrics", Duration::from_secs(30), || {
            d.process.assert_running();
            d.metric("trstream_build_info").is_some()
        });
        d
    }

    /// Sends SIGUSR1 (arms `arm=usr1` faults).
    pub fn signal_usr1(&self) {
        self.signal("USR1");
    }

    /// Sends `SIG<name>` (e.g. `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        if let Some(c) = &self.process.child {
            let _ = Command::new("kill").args([&format!("-{name}"), &c.id().to_string()]).status();
        }
    }

    /// Waits up to `timeout` for the process to end on its own; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.process.child.as_mut()
                && let Some(status) = c.try_wait().unwrap()
            {
                self.process.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL: no drain, no commit, no goodbye to the group.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, then waits for the exit; returns whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.process.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn assert_running(&mut self) {
        self.process.assert_running();
    }

    /// A metric summed over its labels, from `/metrics`; `None` while it does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        crate::common::metric(self.http, name)
    }
}

/// What `trstream audit --json --raw` found.
#[derive(Debug)]
pub struct Audit {
    pub clean: bool,
    pub records: u64,
    pub valid: u64,
    pub invalid: u64,
    pub in_dlq: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub raw_missing: u64,
    pub raw_duplicated: u64,
    pub altered: u64,
    pub misplaced: u64,
    pub dlq_duplicated: u64,
    pub dlq_unexpected: u64,
}

/// Runs `trstream audit --json --raw` as a user would, with `config`'s settings.
pub fn audit(dir: &Path, config: &Config) -> Audit {
    try_audit(dir, config).unwrap_or_else(|e| panic!("{e}"))
}

/// [`audit`], or why it gave no report (e.g. a file the compactor deleted while it read).
pub fn try_audit(dir: &Path, config: &Config) -> Result<Audit, String> {
    let file = dir.join("audit.toml");
    std::fs::write(&file, toml::to_string(config).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trstream"))
        .args(["audit", "--json", "--raw", "--timeout", "120s", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("audit JSON: {e}; stderr: {}", String::from_utf8_lossy(&out.stderr)))?;
    let t = &json["total"];
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    Ok(Audit {
        clean: json["clean"].as_bool().unwrap_or(false),
        records: n("records"),
        valid: n("valid"),
        invalid: n("invalid"),
        in_dlq: n("in_dlq"),
        missing: n("missing"),
        duplicated: n("duplicated"),
        unexpected: n("unexpected"),
        raw_missing: n("raw_missing"),
        raw_duplicated: n("raw_duplicated"),
        altered: n("altered"),
        misplaced: n("misplaced"),
        dlq_duplicated: n("dlq_duplicated"),
        dlq_unexpected: n("dlq_unexpected"),
    })
}
