//! The embedded defaults of design §6: librdkafka's mock cluster for Kafka and s3s-fs over a
//! local folder for S3, both in-process on real TCP listeners. The demo, the benchmark and the
//! tests all start them from here, so they exercise the same network paths as production.
//!
//! `EmbeddedS3::set_down(true)` makes every request answer 503 (an outage the SDK sees as
//! retryable) without losing the folder's contents.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

/// The embedded store's access key id; its secret is drawn at random for each store.
pub const ACCESS_KEY: &str = "trstream";

/// librdkafka's in-process mock cluster. Not `Send`: keep it on the thread that made it.
pub struct EmbeddedKafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
}

impl EmbeddedKafka {
    /// Starts `brokers` mock brokers and creates `topics` as `(name, partitions)`.
    pub fn start(brokers: i32, topics: &[(&str, i32)]) -> Result<EmbeddedKafka, rdkafka::error::KafkaError> {
        let cluster = MockCluster::new(brokers)?;
        for (name, partitions) in topics {
            cluster.create_topic(name, *partitions, 1)?;
        }
        let bootstrap = cluster.bootstrap_servers();
        Ok(EmbeddedKafka { cluster, bootstrap })
    }

    /// Points `kafka` at this cluster. The mock cluster takes transactional offset commits but
    /// keeps none of them, so `kafka.exactly_once` is off: offsets are committed by the consumer
    /// and the DLQ is at-least-once.
    pub fn configure(&self, kafka: &mut crate::config::KafkaConfig) {
        kafka.brokers = self.bootstrap.clone();
        kafka.exactly_once = false;
    }
}

/// s3s-fs serving `root` (one sub-folder per bucket) on a loopback port.
pub struct EmbeddedS3 {
    pub endpoint: String,
    /// The secret key of [`ACCESS_KEY`], random per store (no credential is built in).
    pub secret_key: String,
    pub addr: SocketAddr,
    pub root: PathBuf,
    down: Arc<AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl EmbeddedS3 {
    /// Serves `root` on `127.0.0.1:port` (0: any free port), creating `buckets` as folders.
    pub async fn start(root: &Path, port: u16, buckets: &[&str]) -> std::io::Result<EmbeddedS3> {
        for b in buckets {
            std::fs::create_dir_all(root.join(b))?;
        }
        let root = std::fs::canonicalize(root)?;
        let secret_key = uuid::Uuid::new_v4().simple().to_string();
        let fs = s3s_fs::FileSystem::new(&root)
            .map_err(|e| std::io::Error::other(format!("s3s-fs over {}: {e:?}", root.display())))?;
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, secret_key.as_str()));
            b.build()
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
        let down2 = down.clone();
        tokio::spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                    _ = stop_rx.changed() => break,
                };
                let service = service.clone();
                let down = down2.clone();
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let service = service.clone();
                    let down = down.clone();
                    async move {
                        if down.load(Ordering::Relaxed) {
                            let resp = hyper::Response::builder()
                                .status(503)
                                .body(s3s::Body::from("<Error><Code>ServiceUnavailable</Code></Error>".to_string()))
                                .expect("static response");
                            return Ok(resp);
                        }
                        service.call(req.map(s3s::Body::from)).await
                    }
                });
                let conn = http.serve_connection(TokioIo::new(socket), svc).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(EmbeddedS3 { secret_key, endpoint: format!("http://{addr}"), addr, root, down, stop })
    }

    /// Simulates an outage (every request answers 503) or ends it.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    /// Points an S3 config section at this server.
    pub fn configure(&self, s3: &mut crate::config::S3Config) {
        s3.endpoint = self.endpoint.clone();
        s3.access_key_id = ACCESS_KEY.into();
        s3.secret_access_key = self.secret_key.clone();
        s3.force_path_style = true;
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
