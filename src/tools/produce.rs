//! `trstream produce`: synthetic transactions, keyed by `user_id`, with forced values and ranges
//! and a ratio of invalid records that cycles through every DLQ reason class.
//!
//! The [`Generator`] is deterministic for a seed and tells, for every record, what the daemon
//! must do with it ([`Expect`]); the end-to-end tests and the benchmark use it to know the truth.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fake::Fake;
use fake::faker::address::en::CityName;
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, error::RDKafkaErrorCode};

use crate::record::{CHANNELS, DEFAULT_CURRENCIES, RejectReason, STATUSES, TRANSACTION_TYPES};

const MCCS: [&str; 10] = ["5411", "5812", "5999", "4111", "5541", "5311", "4814", "7011", "5912", "5732"];
const COUNTRIES: [&str; 12] = ["US", "GB", "FR", "DE", "ES", "IT", "NL", "JP", "CA", "AU", "BR", "IN"];

/// What the daemon must do with a generated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Land in the lake exactly once under this transaction id.
    Valid(String),
    /// Go to the DLQ with this reason.
    Invalid(RejectReason),
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub key: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

/// Shape of the generated data.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Distinct users (message keys).
    pub users: u32,
    /// Force `transaction_type`; random otherwise.
    pub transaction_type: Option<String>,
    /// Amount range in cents, inclusive.
    pub amount_min_cents: i64,
    pub amount_max_cents: i64,
    /// Force `currency`; random from `currencies` otherwise.
    pub currency: Option<String>,
    /// Force `country`; random otherwise.
    pub country: Option<String>,
    /// Fraction of records made invalid, 0.0..=1.0.
    pub invalid_ratio: f64,
    /// The size an `oversized` record is padded to, in bytes (the daemon's limit + 1).
    pub oversize_bytes: usize,
    pub currencies: Vec<String>,
    pub seed: u64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            users: 1000,
            transaction_type: None,
            amount_min_cents: 1,
            amount_max_cents: 500_000,
            currency: None,
            country: None,
            invalid_ratio: 0.0,
            oversize_bytes: 64 * 1024 + 1,
            currencies: DEFAULT_CURRENCIES.iter().map(|c| c.to_string()).collect(),
            seed: 42,
        }
    }
}

impl GenOptions {
    /// Checks the forced values against the rules the daemon applies, so a typo in a flag
    /// is reported instead of producing a stream of dead letters.
    pub fn validate(&self) -> Result<(), String> {
        if self.users == 0 {
            return Err("--users must be at least 1".into());
        }
        if let Some(t) = &self.transaction_type
            && !TRANSACTION_TYPES.contains(&t.as_str())
        {
            return Err(format!("--transaction-type {t:?} is not one of {}", TRANSACTION_TYPES.join(", ")));
        }
        if self.amount_min_cents < 1
            || self.amount_min_cents > self.amount_max_cents
            || self.amount_max_cents > crate::record::MAX_AMOUNT_CENTS
        {
            return Err(format!(
                "--amount-min/--amount-max must satisfy 0.01 <= min <= max <= 1000000000.00 (got {} and {})",
                crate::record::format_cents(self.amount_min_cents),
                crate::record::format_cents(self.amount_max_cents)
            ));
        }
        if let Some(c) = &self.currency
            && !self.currencies.contains(c)
        {
            return Err(format!("--currency {c:?} is not in the allow-list"));
        }
        if let Some(c) = &self.country
            && crate::record::COUNTRIES.binary_search(&c.as_str()).is_err()
        {
            return Err(format!("--country {c:?} is not an ISO 3166-1 alpha-2 code"));
        }
        if !(0.0..=1.0).contains(&self.invalid_ratio) {
            return Err(format!("--invalid-ratio {} is outside 0..=1", self.invalid_ratio));
        }
        Ok(())
    }
}

pub struct Generator {
    rng: StdRng,
    opts: GenOptions,
    next_invalid: usize,
    cities: Vec<String>,
}

impl Generator {
    pub fn new(opts: GenOptions) -> Generator {
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let cities = (0..64).map(|_| CityName().fake_with_rng::<String, _>(&mut rng)).collect();
        Generator { rng, opts, next_invalid: 0, cities }
    }

    fn uuid(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid().to_string()
    }

    /// One valid record as JSON, with `event_time` at `now`.
    fn valid_json(&mut self, id: &str, user: u32, now: chrono::DateTime<chrono::Utc>) -> String {
        let r = &mut self.rng;
        let ttype = match &self.opts.transaction_type {
            Some(t) => t.clone(),
            None => TRANSACTION_TYPES[r.random_range(0..TRANSACTION_TYPES.len())].to_string(),
        };
        let cents = r.random_range(self.opts.amount_min_cents..=self.opts.amount_max_cents);
        let currency = match &self.opts.currency {
            Some(c) => c.clone(),
            None => self.opts.currencies[r.random_range(0..self.opts.currencies.len())].clone(),
        };
        let country = match &self.opts.country {
            Some(c) => c.clone(),
            None => COUNTRIES[r.random_range(0..COUNTRIES.len())].to_string(),
        };
        let mut s = String::with_capacity(400);
        let _ = write!(
            s,
            r#"{{"transaction_id":"{id}","user_id":"user-{user:06}","account_id":"acct-{user:06}-{acct}","transaction_type":"{ttype}","amount":"{amount}","currency":"{currency}","#,
            acct = r.random_range(1..=3),
            amount = crate::record::format_cents(cents),
        );
        if r.random_bool(0.8) {
            let _ = write!(
                s,
                r#""merchant_id":"m-{:05}","merchant_category":"{}","#,
                r.random_range(0..20_000),
                MCCS[r.random_range(0..MCCS.len())]
            );
        }
        let city = &self.cities[r.random_range(0..self.cities.len())];
        let _ = write!(
            s,
            r#""country":"{country}","city":"{city}","channel":"{}","status":"{}","event_time":"{}"}}"#,
            CHANNELS[r.random_range(0..CHANNELS.len())],
            STATUSES[r.random_range(0..STATUSES.len())],
            (now - chrono::Duration::milliseconds(r.random_range(0..60_000)))
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
        s
    }

    /// The next record, `event_time` relative to `now`.
    pub fn next_at(&mut self, now: chrono::DateTime<chrono::Utc>) -> Generated {
        let user = self.rng.random_range(0..self.opts.users);
        let key = format!("user-{user:06}");
        let id = self.uuid();
        let json = self.valid_json(&id, user, now);
        if self.opts.invalid_ratio > 0.0 && self.rng.random_bool(self.opts.invalid_ratio) {
            let reason = RejectReason::ALL[self.next_invalid % RejectReason::ALL.len()];
            self.next_invalid += 1;
            let payload = self.corrupt(&json, reason, now);
            return Generated { key, payload, expect: Expect::Invalid(reason) };
        }
        Generated { key, payload: json.into_bytes(), expect: Expect::Valid(id) }
    }

    pub fn next_record(&mut self) -> Generated {
        self.next_at(chrono::Utc::now())
    }

    fn corrupt(&mut self, json: &str, reason: RejectReason, now: chrono::DateTime<chrono::Utc>) -> Vec<u8> {
        let set = |field: &str, value: &str| -> String {
            let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).expect("own JSON");
            v.insert(field.to_string(), serde_json::from_str(value).expect("literal"));
            serde_json::to_string(&v).expect("serializable")
        };
        let out = match reason {
            RejectReason::EmptyPayload => String::new(),
            RejectReason::Oversized => {
                let pad = "x".repeat(self.opts.oversize_bytes.saturating_sub(json.len()) + 16);
                set("padding", &format!("\"{pad}\""))
            }
            RejectReason::NotUtf8 => {
                let mut b = json.as_bytes().to_vec();
                b.insert(10, 0xff);
                return b;
            }
            RejectReason::MalformedJson => json[..json.len() / 2].to_string(),
            RejectReason::MissingField => {
                let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).expect("own JSON");
                v.remove("currency");
                serde_json::to_string(&v).expect("serializable")
            }
            RejectReason::InvalidType => set("amount", "true"),
            RejectReason::InvalidUuid => set("transaction_id", &format!("\"txn-{}\"", self.rng.random::<u32>())),
            RejectReason::InvalidLength => set("account_id", &format!("\"{}\"", "a".repeat(65))),
            RejectReason::InvalidAmount => set("amount", "\"-12.50\""),
            RejectReason::UnknownCurrency => set("currency", "\"XXX\""),
            RejectReason::InvalidCountry => set("country", "\"ZZ\""),
            RejectReason::InvalidEnum => set("channel", "\"CARRIER_PIGEON\""),
            RejectReason::InvalidMcc => set("merchant_category", "\"54a1\""),
            RejectReason::InvalidEventTime => set("event_time", "\"yesterday at noon\""),
            RejectReason::EventTimeOutOfRange => {
                let t = (now + chrono::Duration::days(2)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                set("event_time", &format!("\"{t}\""))
            }
        };
        out.into_bytes()
    }
}

/// Live counters of a producer run.
#[derive(Debug, Default)]
pub struct ProduceProgress {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub invalid: AtomicU64,
}

struct DeliveryCounter(Arc<ProduceProgress>);

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub brokers: String,
    pub topic: String,
    /// Stop after this many records (`None`: until `duration` or stopped).
    pub count: Option<u64>,
    /// Records per second (`None`: as fast as possible).
    pub rate: Option<u64>,
    pub duration: Option<Duration>,
    pub generator: GenOptions,
    /// Extra librdkafka producer properties.
    pub properties: Vec<(String, String)>,
    /// Print a progress line every second on stderr.
    pub progress: bool,
}

#[derive(Debug, Clone)]
pub struct ProduceSummary {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub invalid: u64,
    pub elapsed: Duration,
}

/// Produces until `count`, `duration` or `stop`; blocking (run it on its own thread).
pub fn produce(
    opts: &ProduceOptions,
    stop: &AtomicBool,
    progress: Arc<ProduceProgress>,
) -> Result<ProduceSummary, String> {
    opts.generator.validate()?;
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &opts.brokers)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.kbytes", "65536");
    for (k, v) in &opts.properties {
        cfg.set(k, v);
    }
    let producer: ThreadedProducer<DeliveryCounter> = cfg
        .create_with_context(DeliveryCounter(progress.clone()))
        .map_err(|e| format!("creating the producer for {}: {e}", opts.brokers))?;
    let mut generator = Generator::new(opts.generator.clone());
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut sent = 0u64;
    loop {
        if stop.load(Ordering::Relaxed)
            || opts.count.is_some_and(|c| sent >= c)
            || opts.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        if let Some(rate) = opts.rate {
            let allowed = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= allowed {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        let g = generator.next_record();
        if matches!(g.expect, Expect::Invalid(_)) {
            progress.invalid.fetch_add(1, Ordering::Relaxed);
        }
        send(&producer, &opts.topic, &g).map_err(|e| format!("producing to {}: {e}", opts.topic))?;
        sent += 1;
        progress.sent.fetch_add(1, Ordering::Relaxed);
        if opts.progress && last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            print_line(&progress, started.elapsed());
        }
    }
    producer.flush(Duration::from_secs(30)).map_err(|e| format!("flushing the producer: {e}"))?;
    let summary = ProduceSummary {
        sent,
        acked: progress.acked.load(Ordering::Relaxed),
        failed: progress.failed.load(Ordering::Relaxed),
        invalid: progress.invalid.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    };
    if opts.progress {
        print_line(&progress, started.elapsed());
        eprintln!();
    }
    Ok(summary)
}

/// Enqueues one generated record (keyed by user, no payload for an empty one), waiting while
/// the producer's queue is full. Delivery is reported to the producer's context.
pub fn send<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &ThreadedProducer<C>,
    topic: &str,
    g: &Generated,
) -> Result<(), rdkafka::error::KafkaError> {
    let mut rec: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(g.key.as_str());
    if !g.payload.is_empty() {
        rec = rec.payload(g.payload.as_slice());
    }
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((e, r)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn print_line(p: &ProduceProgress, elapsed: Duration) {
    let sent = p.sent.load(Ordering::Relaxed);
    let rate = sent as f64 / elapsed.as_secs_f64().max(1e-3);
    eprint!(
        "\rproduced {sent} ({rate:.0}/s), acked {}, failed {}, invalid {}   ",
        p.acked.load(Ordering::Relaxed),
        p.failed.load(Ordering::Relaxed),
        p.invalid.load(Ordering::Relaxed)
    );
}

/// A seed from the clock, for runs that need not be reproducible.
pub fn time_seed() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    now.as_nanos() as u64 ^ u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Validator;

    #[test]
    fn generated_records_validate_as_expected_for_every_class() {
        let mut g = Generator::new(GenOptions { invalid_ratio: 0.3, oversize_bytes: 2048, ..Default::default() });
        let d = Validator::default();
        let v = Validator::new(d.currencies().to_vec(), 2047, d.max_future_skew, d.max_event_age);
        let now = chrono::Utc::now();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            let r = g.next_at(now);
            let got =
                v.validate(if r.payload.is_empty() { None } else { Some(&r.payload) }, Some(now.timestamp_micros()));
            match (&r.expect, got) {
                (Expect::Valid(id), Ok(t)) => assert_eq!(&t.transaction_id, id),
                (Expect::Invalid(reason), Err(rej)) => {
                    assert_eq!(*reason, rej.reason, "{rej}");
                    seen.insert(*reason);
                }
                (e, g) => panic!("expected {e:?}, got {g:?}"),
            }
        }
        assert_eq!(seen.len(), RejectReason::ALL.len(), "every reason class is generated");
    }

    #[test]
    fn forced_values_and_ranges_hold() {
        let opts = GenOptions {
            transaction_type: Some("REFUND".into()),
            currency: Some("JPY".into()),
            country: Some("JP".into()),
            amount_min_cents: 500,
            amount_max_cents: 600,
            users: 3,
            ..Default::default()
        };
        opts.validate().unwrap();
        let mut g = Generator::new(opts);
        let v = Validator::default();
        let mut keys = std::collections::HashSet::new();
        for _ in 0..500 {
            let r = g.next_record();
            let t = v.validate(Some(&r.payload), Some(chrono::Utc::now().timestamp_micros())).unwrap();
            assert_eq!(t.transaction_type, "REFUND");
            assert_eq!(t.currency, "JPY");
            assert_eq!(t.country, "JP");
            assert!((500..=600).contains(&t.amount_cents));
            assert_eq!(r.key, t.user_id, "keyed by user_id");
            keys.insert(r.key);
        }
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn bad_forced_values_are_refused_by_name() {
        let bad = [
            GenOptions { transaction_type: Some("GIFT".into()), ..Default::default() },
            GenOptions { currency: Some("XXX".into()), ..Default::default() },
            GenOptions { country: Some("ZZ".into()), ..Default::default() },
            GenOptions { amount_min_cents: 0, ..Default::default() },
            GenOptions { invalid_ratio: 1.5, ..Default::default() },
        ];
        for (o, flag) in
            bad.iter().zip(["--transaction-type", "--currency", "--country", "--amount", "--invalid-ratio"])
        {
            assert!(o.validate().unwrap_err().contains(flag), "{flag}");
        }
    }
}
