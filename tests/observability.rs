//! The observability stack as users run it: every PromQL expression of the Grafana dashboard
//! answered by a real Prometheus scraping a loaded daemon, the Prometheus config checked by
//! promtool, and docker-compose.yml checked for what a user relies on (no Docker engine here).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, free_port, wait_for};
use serde_json::Value;
use trstream::Faults;
use trstream::metrics::{self as m, Stats};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml(path: &str) -> serde_norway::Value {
    let text = std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut v: serde_norway::Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
    v.apply_merge().unwrap_or_else(|e| panic!("{path}: merge keys: {e}"));
    v
}

/// A Prometheus server on loopback, killed when dropped.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` every second as job `trstream`, as the compose stack's does every 5 s.
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: trstream\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (.ci/run installs Debian's prometheus package)");
        Prometheus { child, addr, _dir: dir }
    }

    /// `GET path` with HTTP/1.0 (so the answer is never chunked): the body on 200.
    fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?;
        (status == "200").then(|| body.to_string())
    }

    /// The result vector of an instant query; `Err` with Prometheus's answer when it fails.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = self.get(&format!("/api/v1/query?query={}", percent_encode(expr))).ok_or("no 200 answer")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(body);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every panel of the dashboard, rows' nested panels included.
fn dashboard_panels() -> Vec<Value> {
    let text = std::fs::read_to_string(repo("grafana/dashboards/trstream.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.extend(p["panels"].as_array().into_iter().flatten().cloned());
        out.push(p.clone());
    }
    out
}

/// The dashboard's PromQL with Grafana's variables as the default view resolves them.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in dashboard_panels() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("every target has a PromQL expression");
            let resolved = expr.replace("$__rate_interval", "15s").replace("$instance", ".*");
            assert!(!resolved.contains('$'), "an unresolved Grafana variable in {expr:?}");
            out.push((p["title"].as_str().unwrap_or_default().to_string(), resolved));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_prometheus_scraping_a_loaded_daemon() {
    let mut h = Harness::new(4).await;
    let mut config = h.lake_config();
    config.kafka.lag_interval = Duration::from_millis(500);
    let pipeline = trstream::start(config.clone(), Arc::new(Faults::default())).await.unwrap();
    let addr = pipeline.http_addr.expect("the HTTP server listens");
    // One daemon per test process: the metrics recorder is global.
    assert_series_exist_at_zero_before_any_load(&common::http_get(addr, "/metrics"));
    let prometheus = Prometheus::start(addr);
    wait_for("Prometheus to be ready", Duration::from_secs(60), || prometheus.get("/-/ready").is_some()).await;

    // Load with invalid records (every DLQ reason), in rounds so rates are not all zero.
    let stats = pipeline.stats.clone();
    for round in 1..=4u64 {
        h.produce(5_000);
        wait_for("the round is written", Duration::from_secs(60), || {
            Stats::get(&stats.written) + Stats::get(&stats.invalid) >= round * 5_000
        })
        .await;
    }
    wait_for("merges and partitioning", Duration::from_secs(60), || {
        Stats::get(&stats.compactions) > 0 && h.partitioner_caught_up()
    })
    .await;
    wait_for("Prometheus holds 10 scrapes of the daemon", Duration::from_secs(60), || {
        prometheus.query("count_over_time(trstream_build_info[1m]) >= 10").is_ok_and(|r| !r.is_empty())
    })
    .await;
    wait_for("the consumer lag was reported", Duration::from_secs(30), || {
        prometheus.query(m::CONSUMER_LAG).is_ok_and(|r| r.len() == h.partitions as usize)
    })
    .await;

    let queries = dashboard_queries();
    assert!(queries.len() >= 40, "the dashboard's queries: {}", queries.len());
    let mut failures = Vec::new();
    for (panel, expr) in &queries {
        match prometheus.query(expr) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => failures.push(format!("{panel}: {expr}: no series")),
            Err(e) => failures.push(format!("{panel}: {expr}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries failed:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );

    // The replica variable lists this daemon.
    let instances = prometheus.get("/api/v1/label/instance/values?match[]=trstream_build_info").unwrap();
    assert!(instances.contains(&addr.to_string()), "{instances}");

    // The figures are the daemon's, not just present: the lag is 0 once all is committed, every
    // written and every dead-lettered record had its latency observed.
    let value = |r: &[Value]| r[0]["value"][1].as_str().unwrap().parse::<f64>().unwrap();
    wait_for("the lag drops to zero", Duration::from_secs(30), || {
        prometheus.query(&format!("sum({})", m::CONSUMER_LAG)).is_ok_and(|r| value(&r) == 0.0)
    })
    .await;
    let body = common::http_get(addr, "/metrics");
    let consumed = common::metric(addr, m::RECORDS_CONSUMED).unwrap();
    let series = |name: &str, from: &str| {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}_count{{from=\"{from}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} from {from} is exported"))
    };
    assert!(series(m::END_TO_END_LATENCY, "broker_time") >= consumed, "a broker latency per record consumed");
    assert!(series(m::END_TO_END_LATENCY, "event_time") >= Stats::get(&stats.written) as f64);
    assert_eq!(common::metric(addr, m::DLQ_RECORDS), Some(Stats::get(&stats.invalid) as f64));
    assert!(common::metric(addr, m::OFFSETS_COMMITTED).unwrap() >= consumed);
    assert_eq!(common::metric(addr, m::READY), Some(1.0));

    assert_names_follow_the_convention(&body);

    h.assert_exactly_once(common::GROUP, false);

    // With the store down nothing commits, so the lag grows; a consumer that stops owns nothing
    // and its lag reads 0 at once, not its last statistics.
    h.s3.set_down(true);
    h.produce(2_000);
    wait_for("a lag while nothing can commit", Duration::from_secs(30), || {
        common::metric(addr, m::CONSUMER_LAG).is_some_and(|lag| lag > 0.0)
    })
    .await;
    pipeline.shutdown().await;
    let after = m::install().render();
    let lags: Vec<&str> = after.lines().filter(|l| l.starts_with(m::CONSUMER_LAG)).collect();
    assert_eq!(lags.len(), h.partitions as usize, "{lags:?}");
    assert!(lags.iter().all(|l| l.ends_with(" 0")), "{lags:?}");
}

/// Every series the dashboard reads without a partition or trigger label exists from start-up.
fn assert_series_exist_at_zero_before_any_load(body: &str) {
    for name in [m::UPLOAD_ERRORS, m::UPLOAD_RETRIES, m::DLQ_RECORDS, m::DLQ_ERRORS, m::COMPACTIONS, m::READY] {
        assert!(body.lines().any(|l| l == format!("{name} 0")), "{name} is 0 at start-up");
    }
    assert!(body.contains(&format!("{}{{version=\"{}\"}} 1", m::BUILD_INFO, env!("CARGO_PKG_VERSION"))));
    for reason in trstream::record::RejectReason::ALL {
        assert!(body.contains(&format!("{}{{reason=\"{}\"}} 0", m::RECORDS_INVALID, reason.as_str())), "{reason:?}");
    }
    for actor in m::ACTOR_KINDS {
        assert!(body.contains(&format!("{}{{actor=\"{actor}\"}} 0", m::ACTOR_RESTARTS)), "{actor}");
    }
}

/// `trstream_<noun>_<unit>[_total]`: counters end in `_total`, histograms are in seconds or
/// bytes and have explicit buckets (without them the exporter would render a summary).
fn assert_names_follow_the_convention(body: &str) {
    let mut types = BTreeMap::new();
    for l in body.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = l.split_once(' ').unwrap();
        types.insert(name.to_string(), kind.to_string());
    }
    for (name, kind) in &types {
        assert!(name.starts_with("trstream_"), "{name}");
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name}"),
            "histogram" => assert!(name.ends_with("_seconds") || name.ends_with("_bytes"), "histogram {name}"),
            other => panic!("{name} is a {other}: histograms need explicit buckets"),
        }
    }
    for name in [m::FLUSH_DURATION, m::UPLOAD_DURATION, m::END_TO_END_LATENCY] {
        assert_eq!(types.get(name).map(String::as_str), Some("histogram"), "{name}");
    }
    for name in [m::CONSUMER_LAG, m::OFFSETS_COMMITTED, m::BUFFERED_RECORDS, m::LAKE_BYTES, m::RESIDENT_MEMORY] {
        assert!(types.contains_key(name), "{name} is exported");
    }
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo("prometheus/prometheus.yml"))
        .output()
        .expect("promtool runs (.ci/run installs Debian's prometheus package)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn grafana_provisioning_matches_the_dashboard() {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let uid = ds["datasources"][0]["uid"].as_str().expect("the data source has a fixed uid");
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
    let panels = dashboard_panels();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"].as_str(), Some(uid), "panel {}", p["title"]);
        assert!(!p["description"].as_str().unwrap_or_default().is_empty(), "panel {} says what it shows", p["title"]);
    }
    let rows: Vec<&str> = panels.iter().filter(|p| p["type"] == "row").filter_map(|p| p["title"].as_str()).collect();
    assert_eq!(rows, ["Throughput", "Lag and latency", "Data quality", "Lake", "Health"]);
    let queries = dashboard_queries();
    for q in ["0.5", "0.95", "0.99"] {
        assert!(
            queries
                .iter()
                .any(|(_, e)| e.contains(&format!("histogram_quantile({q}, ")) && e.contains(m::END_TO_END_LATENCY))
        );
    }

    // The provider's folder is where compose mounts grafana/dashboards.
    let provider = yaml("grafana/provisioning/dashboards/trstream.yml");
    let path = provider["providers"][0]["options"]["path"].as_str().unwrap();
    let compose = yaml("docker-compose.yml");
    let mounts: Vec<&str> =
        compose["services"]["grafana"]["volumes"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(mounts.contains(&format!("./grafana/dashboards:{path}:ro").as_str()), "{mounts:?}");
    assert!(mounts.iter().any(|m| m.starts_with("./grafana/provisioning:/etc/grafana/provisioning")), "{mounts:?}");
}

/// `${NAME:-default}` and `${NAME:?message}` resolved against `.env`.
fn resolve(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner.split_once(":?").map_or(inner, |x| x.0), None),
        };
        let v = env.get(name).cloned().or(default.map(str::to_string));
        out.push_str(&v.unwrap_or_else(|| panic!("{name} is neither in .env nor defaulted")));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn dot_env() -> BTreeMap<String, String> {
    std::fs::read_to_string(repo(".env"))
        .expect(".env exists")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!(".env line {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

#[test]
fn compose_file_has_what_users_rely_on() {
    let compose = yaml("docker-compose.yml");
    let env = dot_env();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for want in
        ["kafka", "kafka-init", "minio", "minio-init", "consumer", "producer", "prometheus", "grafana", "kafka-ui"]
    {
        assert!(names.contains(want), "service {want}");
    }
    let svc = |n: &str| &compose["services"][n];

    // Images are pinned; trstream's own is built from the Dockerfile.
    for &n in &names {
        let s = svc(n);
        if s.get("build").is_some() {
            continue;
        }
        let image = s["image"].as_str().unwrap_or_else(|| panic!("{n} has an image"));
        let tag = image.rsplit_once(':').map(|x| x.1).unwrap_or_default();
        assert!(!tag.is_empty() && tag != "latest" && !tag.contains('/'), "{n}: {image} is not pinned to a version");
    }

    // Whatever others wait for is healthy (a health check) or done (a one-shot job).
    for &n in &names {
        let Some(deps) = svc(n).get("depends_on") else { continue };
        let deps = deps.as_mapping().unwrap_or_else(|| panic!("{n}: depends_on with conditions"));
        for (dep, how) in deps {
            let dep = dep.as_str().unwrap();
            let target = svc(dep);
            match how["condition"].as_str() {
                Some("service_healthy") => {
                    let hc = target
                        .get("healthcheck")
                        .unwrap_or_else(|| panic!("{dep} has a health check ({n} waits on it)"));
                    assert!(hc.get("test").is_some() && hc.get("disable").is_none(), "{dep}'s health check");
                }
                Some("service_completed_successfully") => {
                    assert_eq!(target["restart"].as_str(), Some("no"), "{dep} is a one-shot job ({n} waits on it)");
                }
                other => panic!("{n} waits on {dep} with {other:?}: only healthy or completed is a real wait"),
            }
        }
    }
    for n in ["kafka", "minio", "prometheus", "consumer", "grafana"] {
        assert!(svc(n).get("healthcheck").is_some(), "{n} has a health check");
    }

    // Scalable services publish no fixed host port and have no fixed container name.
    for n in ["consumer", "producer"] {
        assert!(svc(n).get("ports").is_none() && svc(n).get("container_name").is_none(), "{n} scales");
    }
    let kafka_init = serde_norway::to_string(&svc("kafka-init")["command"]).unwrap();
    assert!(kafka_init.contains("transactions:6") && kafka_init.contains("transactions.dlq"), "{kafka_init}");

    // Credentials come from .env, never from the file itself.
    for &n in &names {
        let Some(vars) = svc(n).get("environment").and_then(|e| e.as_mapping()) else { continue };
        for (k, v) in vars {
            let (k, v) = (k.as_str().unwrap(), v.as_str().unwrap_or_default());
            if ["PASSWORD", "SECRET", "ACCESS_KEY", "ROOT_USER"].iter().any(|s| k.contains(s)) {
                assert!(v.starts_with("${") && v.ends_with('}'), "{n}: {k} comes from .env, not {v:?}");
                resolve(v, &env);
            }
        }
    }

    // Prometheus finds every consumer replica by DNS, on the port the daemon listens on.
    let listen = svc("consumer")["environment"]["TRSTREAM_HTTP_LISTEN"].as_str().unwrap();
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let prom = yaml("prometheus/prometheus.yml");
    let sd = &prom["scrape_configs"][0]["dns_sd_configs"][0];
    assert_eq!(sd["names"][0].as_str(), Some("consumer"));
    assert_eq!(sd["port"].as_u64(), Some(port));
    assert_eq!(
        prom["scrape_configs"][0]["job_name"].as_str(),
        Some("trstream"),
        "the dashboard's up{{job=\"trstream\"}}"
    );

    // The host ports the README documents are exactly those published.
    let mut published = BTreeSet::new();
    for &n in &names {
        for p in svc(n).get("ports").and_then(|p| p.as_sequence()).into_iter().flatten() {
            let p = resolve(p.as_str().expect("ports as \"host:container\""), &env);
            published.insert(p.split(':').next().unwrap().parse::<u16>().unwrap());
        }
    }
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = readme.split("\n## Production stack").nth(1).expect("README has a Production stack section");
    let section = section.split("\n## ").next().unwrap();
    let documented: BTreeSet<u16> = section
        .match_indices("localhost:")
        .filter_map(|(i, s)| {
            let digits: String = section[i + s.len()..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect();
    assert_eq!(documented, published, "ports in README's Production stack section vs docker-compose.yml");
}

#[test]
fn dockerfile_is_multi_stage_and_unprivileged() {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(froms.len() >= 2, "a build stage and a runtime stage: {froms:?}");
    let cargo = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let rust_version = cargo.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"');
    assert!(
        froms[0].contains(&format!("rust:{rust_version}")),
        "the build stage uses rust {rust_version}: {}",
        froms[0]
    );
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    assert!(last_stage.lines().any(|l| l.starts_with("USER ") && !l.contains("root")), "the runtime runs unprivileged");
    assert!(last_stage.contains("HEALTHCHECK") && last_stage.contains("EXPOSE 9464"));
    assert!(text.contains("--locked"), "the image builds from Cargo.lock");
}

#[test]
fn compose_chaos_script_parses_passes_shellcheck_and_names_real_services() {
    let script = repo("tests/chaos/compose-chaos.sh");
    let out = Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("shellcheck")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("shellcheck: {e} (.ci/run installs it from Debian)"));
    assert!(out.status.success(), "shellcheck:\n{}", String::from_utf8_lossy(&out.stdout));
    // The services it kills, stops and runs the audit in are the compose file's.
    let compose = yaml("docker-compose.yml");
    let text = std::fs::read_to_string(&script).unwrap();
    for service in ["consumer", "kafka", "minio", "producer"] {
        assert!(compose["services"].get(service).is_some(), "docker-compose.yml has no {service}");
        assert!(text.contains(service), "the script does not mention {service}");
    }
    assert!(text.contains("docker compose kill -s KILL"), "it kills with SIGKILL, as a crash would");
    assert!(text.contains("run --rm consumer audit"), "it ends with the audit");
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    assert!(readme.contains("tests/chaos/compose-chaos.sh"), "the README documents the script");
}
