//! The transaction record of design §2: wire decoding and every validation rule.
//!
//! A Kafka payload either becomes a [`Transaction`] (borrowing from the payload, so the hot path
//! allocates nothing for clean input) or a [`Rejection`] carrying a [`RejectReason`] code and a
//! human-readable detail. Rejections are dead-lettered, never fatal: invalid input must not stop
//! the pipeline, and it must not be lost either (I1 covers DLQ'd offsets too).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;

/// Largest allowed amount, in cents: 1,000,000,000.00.
pub const MAX_AMOUNT_CENTS: i64 = 100_000_000_000;
/// Bounds on `user_id` / `account_id` length, in characters.
pub const ID_MIN_CHARS: usize = 1;
pub const ID_MAX_CHARS: usize = 64;

pub const TRANSACTION_TYPES: [&str; 6] = ["CREDIT", "DEBIT", "TRANSFER", "PAYMENT", "WITHDRAWAL", "REFUND"];
pub const CHANNELS: [&str; 5] = ["ONLINE", "POS", "ATM", "MOBILE", "BRANCH"];
pub const STATUSES: [&str; 3] = ["APPROVED", "DECLINED", "PENDING"];

/// The default ISO 4217 allow-list (`validation.currencies` replaces it).
pub const DEFAULT_CURRENCIES: [&str; 32] = [
    "AED", "AUD", "BGN", "BRL", "CAD", "CHF", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "IDR", "ILS", "INR",
    "JPY", "KRW", "MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "RON", "SAR", "SEK", "SGD", "THB", "TRY", "USD", "ZAR",
];

/// ISO 3166-1 alpha-2 officially assigned codes, sorted (binary-searched).
pub const COUNTRIES: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ", "BA", "BB", "BD",
    "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS", "BT", "BV", "BW", "BY", "BZ", "CA",
    "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE",
    "DJ", "DK", "DM", "DO", "DZ", "EC", "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA",
    "GB", "GD", "GE", "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK",
    "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM", "JO", "JP",
    "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC", "LI", "LK", "LR", "LS", "LT",
    "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS",
    "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ",
    "OM", "PA", "PE", "PF", "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS",
    "RU", "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS", "ST",
    "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO", "TR", "TT", "TV", "TW",
    "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI", "VN", "VU", "WF", "WS", "YE", "YT", "ZA",
    "ZM", "ZW",
];

/// Why a record was dead-lettered. The string form is the `reason` header and metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    EmptyPayload,
    Oversized,
    NotUtf8,
    MalformedJson,
    MissingField,
    InvalidType,
    InvalidUuid,
    InvalidLength,
    InvalidAmount,
    UnknownCurrency,
    InvalidCountry,
    InvalidEnum,
    InvalidMcc,
    InvalidEventTime,
    EventTimeOutOfRange,
}

impl RejectReason {
    pub const ALL: [RejectReason; 15] = [
        RejectReason::EmptyPayload,
        RejectReason::Oversized,
        RejectReason::NotUtf8,
        RejectReason::MalformedJson,
        RejectReason::MissingField,
        RejectReason::InvalidType,
        RejectReason::InvalidUuid,
        RejectReason::InvalidLength,
        RejectReason::InvalidAmount,
        RejectReason::UnknownCurrency,
        RejectReason::InvalidCountry,
        RejectReason::InvalidEnum,
        RejectReason::InvalidMcc,
        RejectReason::InvalidEventTime,
        RejectReason::EventTimeOutOfRange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::EmptyPayload => "empty_payload",
            RejectReason::Oversized => "oversized",
            RejectReason::NotUtf8 => "not_utf8",
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidType => "invalid_type",
            RejectReason::InvalidUuid => "invalid_uuid",
            RejectReason::InvalidLength => "invalid_length",
            RejectReason::InvalidAmount => "invalid_amount",
            RejectReason::UnknownCurrency => "unknown_currency",
            RejectReason::InvalidCountry => "invalid_country",
            RejectReason::InvalidEnum => "invalid_enum",
            RejectReason::InvalidMcc => "invalid_mcc",
            RejectReason::InvalidEventTime => "invalid_event_time",
            RejectReason::EventTimeOutOfRange => "event_time_out_of_range",
        }
    }

    pub fn parse(s: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that failed validation: the reason code and a detail for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

/// The longest `detail` kept, in bytes. A detail quotes the bad value, which can be as large as
/// the record: cut, it still fits a DLQ header and a raw file's footer (the record itself is the
/// DLQ record's payload).
pub const MAX_DETAIL_BYTES: usize = 1024;

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL_BYTES {
            let total = detail.len();
            let mut cut = MAX_DETAIL_BYTES - 64;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str(&format!("… (detail cut from {total} bytes)"));
        }
        Rejection { reason, detail }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A validated transaction, borrowing its strings from the Kafka payload where it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction<'a> {
    pub transaction_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    pub account_id: Cow<'a, str>,
    pub transaction_type: &'static str,
    /// Amount in cents: Decimal128(18, 2) unscaled.
    pub amount_cents: i64,
    pub currency: Cow<'a, str>,
    pub merchant_id: Option<Cow<'a, str>>,
    pub merchant_category: Option<Cow<'a, str>>,
    pub country: Cow<'a, str>,
    pub city: Option<Cow<'a, str>>,
    pub channel: &'static str,
    pub status: &'static str,
    /// Microseconds since the Unix epoch, UTC.
    pub event_time_us: i64,
}

/// The rules that depend on configuration.
#[derive(Debug, Clone)]
pub struct Validator {
    currencies: Vec<String>,
    pub max_record_bytes: usize,
    pub max_future_skew: Duration,
    pub max_event_age: Duration,
}

impl Default for Validator {
    fn default() -> Self {
        Validator::new(
            DEFAULT_CURRENCIES.iter().map(|c| c.to_string()).collect(),
            64 * 1024,
            Duration::from_secs(300),
            Duration::from_secs(30 * 24 * 3600),
        )
    }
}

/// A string that borrows from the input unless it contains escapes.
struct BorrowStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BorrowStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = BorrowStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BorrowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// The wire shape: every field optional so that a missing one is named by us, not by serde.
/// Unknown fields are ignored for forward compatibility.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    transaction_id: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    user_id: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    account_id: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    transaction_type: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    #[serde(borrow)]
    currency: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    merchant_id: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    merchant_category: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    country: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    city: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    channel: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    status: Option<BorrowStr<'a>>,
    #[serde(borrow)]
    event_time: Option<BorrowStr<'a>>,
}

fn required<'a>(field: &'static str, v: Option<BorrowStr<'a>>) -> Result<Cow<'a, str>, Rejection> {
    v.map(|s| s.0).ok_or_else(|| {
        Rejection::new(RejectReason::MissingField, format!("required field `{field}` is missing or null"))
    })
}

fn check_len(field: &'static str, s: &str) -> Result<(), Rejection> {
    let n = s.chars().count();
    if (ID_MIN_CHARS..=ID_MAX_CHARS).contains(&n) {
        Ok(())
    } else {
        Err(Rejection::new(
            RejectReason::InvalidLength,
            format!("`{field}` has {n} characters, expected {ID_MIN_CHARS}..={ID_MAX_CHARS}"),
        ))
    }
}

fn one_of(field: &'static str, s: &str, allowed: &[&'static str]) -> Result<&'static str, Rejection> {
    allowed.iter().copied().find(|a| *a == s).ok_or_else(|| {
        Rejection::new(RejectReason::InvalidEnum, format!("`{field}` is {s:?}, expected one of {}", allowed.join(", ")))
    })
}

/// Parses a decimal amount text exactly into cents: digits, optionally `.` and at most two
/// fraction digits; strictly positive and at most [`MAX_AMOUNT_CENTS`].
pub fn parse_amount_cents(text: &str) -> Result<i64, Rejection> {
    let bad = |why: &str| Rejection::new(RejectReason::InvalidAmount, format!("amount {text:?} {why}"));
    if text.starts_with('-') {
        return Err(bad("must be greater than 0"));
    }
    if text.contains(['e', 'E']) {
        return Err(bad("uses exponent notation; send a plain decimal"));
    }
    let (int_part, frac_part) = match text.split_once('.') {
        Some((i, f)) => (i, f),
        None => (text, ""),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("is not a decimal number"));
    }
    if !frac_part.bytes().all(|b| b.is_ascii_digit()) || (text.contains('.') && frac_part.is_empty()) {
        return Err(bad("is not a decimal number"));
    }
    if frac_part.len() > 2 {
        return Err(bad("has more than 2 decimal places"));
    }
    let mut cents: i64 = 0;
    for b in int_part.bytes() {
        cents = cents
            .checked_mul(10)
            .and_then(|c| c.checked_add(i64::from(b - b'0')))
            .filter(|c| *c <= MAX_AMOUNT_CENTS)
            .ok_or_else(|| bad("exceeds 1000000000.00"))?;
    }
    let mut frac = 0i64;
    for (i, b) in frac_part.bytes().enumerate() {
        frac += i64::from(b - b'0') * if i == 0 { 10 } else { 1 };
    }
    let cents = cents
        .checked_mul(100)
        .map(|c| c + frac)
        .filter(|c| *c <= MAX_AMOUNT_CENTS)
        .ok_or_else(|| bad("exceeds 1000000000.00"))?;
    if cents == 0 {
        return Err(bad("must be greater than 0"));
    }
    Ok(cents)
}

fn parse_amount(raw: &RawValue) -> Result<i64, Rejection> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: BorrowStr = serde_json::from_str(text)
                .map_err(|e| Rejection::new(RejectReason::InvalidType, format!("`amount`: {e}")))?;
            parse_amount_cents(&s.0)
        }
        Some(b'-' | b'0'..=b'9') => parse_amount_cents(text),
        _ => Err(Rejection::new(
            RejectReason::InvalidType,
            format!("`amount` is {text}, expected a decimal string or a number"),
        )),
    }
}

/// A Kafka record's broker timestamp in µs since the epoch, from its milliseconds as the client
/// reports them (`None` or a negative value: the record has none). The daemon and the audit both
/// read it through here, so they judge the same record by the same time.
pub fn broker_time_us(millis: Option<i64>) -> Option<i64> {
    millis.filter(|ms| *ms >= 0).map(|ms| ms.saturating_mul(1000))
}

/// Formats cents as a plain decimal string ("12.30").
pub fn format_cents(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

impl Validator {
    pub fn new(
        currencies: Vec<String>,
        max_record_bytes: usize,
        max_future_skew: Duration,
        max_event_age: Duration,
    ) -> Self {
        let mut currencies = currencies;
        currencies.sort();
        currencies.dedup();
        Validator { currencies, max_record_bytes, max_future_skew, max_event_age }
    }

    pub fn currencies(&self) -> &[String] {
        &self.currencies
    }

    /// Validates one Kafka payload. `broker_time_us` is the record's broker timestamp (µs since
    /// the epoch, UTC; [`broker_time_us`] reads it): the time checks judge `event_time` against
    /// it, never against the wall clock, so the answer is a pure function of the record and the
    /// configuration (I8): a record read again after a crash, or by the audit, is classified the
    /// same. A record without a timestamp (a pre-0.10 message format) skips the time checks.
    pub fn validate<'a>(
        &self,
        payload: Option<&'a [u8]>,
        broker_time_us: Option<i64>,
    ) -> Result<Transaction<'a>, Rejection> {
        let bytes = match payload {
            Some(b) if !b.is_empty() => b,
            _ => return Err(Rejection::new(RejectReason::EmptyPayload, "message has no payload")),
        };
        if bytes.len() > self.max_record_bytes {
            return Err(Rejection::new(
                RejectReason::Oversized,
                format!("payload is {} bytes, limit is {}", bytes.len(), self.max_record_bytes),
            ));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Rejection::new(RejectReason::NotUtf8, format!("payload is not UTF-8: {e}")))?;
        let wire: Wire = serde_json::from_str(text).map_err(|e| json_rejection(text, e))?;

        let transaction_id = required("transaction_id", wire.transaction_id)?;
        let Ok(uuid) = uuid::Uuid::try_parse(&transaction_id) else {
            return Err(Rejection::new(
                RejectReason::InvalidUuid,
                format!("`transaction_id` {transaction_id:?} is not a UUID"),
            ));
        };
        // Stored canonical (design §2): lower case, hyphenated, whatever spelling arrived. The
        // common spelling is kept as it is, without a copy.
        let canonical = transaction_id.len() == 36 && !transaction_id.bytes().any(|b| b.is_ascii_uppercase());
        let transaction_id =
            if canonical { transaction_id } else { std::borrow::Cow::Owned(uuid.hyphenated().to_string()) };
        let user_id = required("user_id", wire.user_id)?;
        check_len("user_id", &user_id)?;
        let account_id = required("account_id", wire.account_id)?;
        check_len("account_id", &account_id)?;
        let transaction_type =
            one_of("transaction_type", &required("transaction_type", wire.transaction_type)?, &TRANSACTION_TYPES)?;
        let amount = wire
            .amount
            .ok_or_else(|| Rejection::new(RejectReason::MissingField, "required field `amount` is missing or null"))?;
        let amount_cents = parse_amount(amount)?;
        let currency = required("currency", wire.currency)?;
        if self.currencies.binary_search_by(|c| c.as_str().cmp(&currency)).is_err() {
            return Err(Rejection::new(
                RejectReason::UnknownCurrency,
                format!("`currency` {currency:?} is not in the allow-list"),
            ));
        }
        let merchant_category = wire.merchant_category.map(|s| s.0);
        if let Some(mcc) = &merchant_category
            && (mcc.len() != 4 || !mcc.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(Rejection::new(
                RejectReason::InvalidMcc,
                format!("`merchant_category` {mcc:?} is not a 4-digit MCC"),
            ));
        }
        let country = required("country", wire.country)?;
        if COUNTRIES.binary_search(&country.as_ref()).is_err() {
            return Err(Rejection::new(
                RejectReason::InvalidCountry,
                format!("`country` {country:?} is not an ISO 3166-1 alpha-2 code"),
            ));
        }
        let channel = one_of("channel", &required("channel", wire.channel)?, &CHANNELS)?;
        let status = one_of("status", &required("status", wire.status)?, &STATUSES)?;
        let event_time = required("event_time", wire.event_time)?;
        let event_time_us = chrono::DateTime::parse_from_rfc3339(&event_time)
            .map_err(|e| {
                Rejection::new(
                    RejectReason::InvalidEventTime,
                    format!("`event_time` {event_time:?} is not RFC 3339 with an offset: {e}"),
                )
            })?
            .timestamp_micros();
        if let Some(broker_us) = broker_time_us {
            let skew = i64::try_from(self.max_future_skew.as_micros()).unwrap_or(i64::MAX);
            let age = i64::try_from(self.max_event_age.as_micros()).unwrap_or(i64::MAX);
            let at = || {
                chrono::DateTime::from_timestamp_micros(broker_us)
                    .map_or_else(|| broker_us.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            };
            if event_time_us > broker_us.saturating_add(skew) {
                return Err(Rejection::new(
                    RejectReason::EventTimeOutOfRange,
                    format!(
                        "`event_time` {event_time} is more than {} after the record's broker timestamp {} (validation.max_future_skew)",
                        humantime::format_duration(self.max_future_skew),
                        at()
                    ),
                ));
            }
            if event_time_us < broker_us.saturating_sub(age) {
                return Err(Rejection::new(
                    RejectReason::EventTimeOutOfRange,
                    format!(
                        "`event_time` {event_time} is more than {} before the record's broker timestamp {} (validation.max_event_age)",
                        humantime::format_duration(self.max_event_age),
                        at()
                    ),
                ));
            }
        }

        Ok(Transaction {
            transaction_id,
            user_id,
            account_id,
            transaction_type,
            amount_cents,
            currency,
            merchant_id: wire.merchant_id.map(|s| s.0),
            merchant_category,
            country,
            city: wire.city.map(|s| s.0),
            channel,
            status,
            event_time_us,
        })
    }
}

/// Maps a serde_json failure to a reason; on a type error, re-parses with path tracking so the
/// detail names the field (only on this cold path).
fn json_rejection(text: &str, e: serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            let mut de = serde_json::Deserializer::from_str(text);
            let detail = match serde_path_to_error::deserialize::<_, Wire>(&mut de) {
                Err(pe) => format!("`{}`: {}", pe.path(), pe.inner()),
                Ok(_) => e.to_string(),
            };
            Rejection::new(RejectReason::InvalidType, detail)
        }
        _ => Rejection::new(RejectReason::MalformedJson, format!("not a JSON object: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const NOW_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    fn good() -> Value {
        json!({
            "transaction_id": "6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
            "user_id": "user-000001",
            "account_id": "acct-000001-1",
            "transaction_type": "PAYMENT",
            "amount": "12.34",
            "currency": "EUR",
            "merchant_id": "m-77",
            "merchant_category": "5411",
            "country": "FR",
            "city": "Lyon",
            "channel": "POS",
            "status": "APPROVED",
            "event_time": "2025-12-31T23:00:00+01:00",
        })
    }

    fn check(v: &Value) -> Result<i64, Rejection> {
        let bytes = serde_json::to_vec(v).unwrap();
        Validator::default().validate(Some(&bytes), Some(NOW_US)).map(|t| t.amount_cents)
    }

    fn reason_of(v: &Value) -> RejectReason {
        check(v).expect_err("expected a rejection").reason
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = good();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = good();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    #[test]
    fn country_list_is_sorted_and_unique() {
        assert!(COUNTRIES.windows(2).all(|w| w[0] < w[1]));
        assert!(DEFAULT_CURRENCIES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_good_record_validates_with_all_fields() {
        let bytes = serde_json::to_vec(&good()).unwrap();
        let t = Validator::default().validate(Some(&bytes), Some(NOW_US)).unwrap();
        assert_eq!(t.amount_cents, 1234);
        assert_eq!(t.transaction_type, "PAYMENT");
        assert_eq!(t.city.as_deref(), Some("Lyon"));
        // 2025-12-31T22:00:00Z
        assert_eq!(t.event_time_us, NOW_US - 2 * 3600 * 1_000_000);
        assert!(matches!(t.user_id, Cow::Borrowed(_)), "clean strings are borrowed");
    }

    #[test]
    fn optional_fields_may_be_absent_or_null_and_unknown_fields_are_ignored() {
        let mut v = without("merchant_id");
        v["city"] = Value::Null;
        v.as_object_mut().unwrap().remove("merchant_category");
        v["some_future_field"] = json!({"nested": [1, 2]});
        assert_eq!(check(&v), Ok(1234));
    }

    #[test]
    fn empty_payload() {
        let v = Validator::default();
        assert_eq!(v.validate(None, Some(NOW_US)).unwrap_err().reason, RejectReason::EmptyPayload);
        assert_eq!(v.validate(Some(b""), Some(NOW_US)).unwrap_err().reason, RejectReason::EmptyPayload);
    }

    #[test]
    fn oversized_boundary() {
        let bytes = serde_json::to_vec(&good()).unwrap();
        let mut v = Validator { max_record_bytes: bytes.len(), ..Default::default() };
        assert!(v.validate(Some(&bytes), Some(NOW_US)).is_ok(), "exactly at the limit passes");
        v.max_record_bytes = bytes.len() - 1;
        assert_eq!(v.validate(Some(&bytes), Some(NOW_US)).unwrap_err().reason, RejectReason::Oversized);
    }

    #[test]
    fn not_utf8() {
        let r = Validator::default().validate(Some(&[b'{', 0xff, 0xfe, b'}']), Some(NOW_US)).unwrap_err();
        assert_eq!(r.reason, RejectReason::NotUtf8);
    }

    #[test]
    fn malformed_json() {
        for bad in ["{", "not json", "[1,2]", "{\"transaction_id\": }"] {
            let r = Validator::default().validate(Some(bad.as_bytes()), Some(NOW_US)).unwrap_err();
            assert!(matches!(r.reason, RejectReason::MalformedJson | RejectReason::InvalidType), "{bad}: {r}");
        }
        let r = Validator::default().validate(Some(b"{"), Some(NOW_US)).unwrap_err();
        assert_eq!(r.reason, RejectReason::MalformedJson);
    }

    #[test]
    fn missing_field_names_the_field() {
        for f in [
            "transaction_id",
            "user_id",
            "account_id",
            "transaction_type",
            "amount",
            "currency",
            "country",
            "channel",
            "status",
            "event_time",
        ] {
            let r = check(&without(f)).unwrap_err();
            assert_eq!(r.reason, RejectReason::MissingField, "{f}");
            assert!(r.detail.contains(f), "{f}: {}", r.detail);
            assert_eq!(reason_of(&with(f, Value::Null)), RejectReason::MissingField, "{f} null");
        }
    }

    #[test]
    fn invalid_type_names_the_field() {
        let r = check(&with("user_id", json!(42))).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidType);
        assert!(r.detail.contains("user_id"), "{}", r.detail);
        assert_eq!(reason_of(&with("amount", json!(true))), RejectReason::InvalidType);
        assert_eq!(reason_of(&with("amount", json!({"v": 1}))), RejectReason::InvalidType);
        assert_eq!(reason_of(&with("city", json!(["x"]))), RejectReason::InvalidType);
    }

    #[test]
    fn invalid_uuid() {
        assert_eq!(reason_of(&with("transaction_id", json!("not-a-uuid"))), RejectReason::InvalidUuid);
        assert_eq!(reason_of(&with("transaction_id", json!(""))), RejectReason::InvalidUuid);
    }

    #[test]
    fn id_length_boundaries() {
        for f in ["user_id", "account_id"] {
            assert_eq!(reason_of(&with(f, json!(""))), RejectReason::InvalidLength, "{f}");
            assert!(check(&with(f, json!("x"))).is_ok());
            assert!(check(&with(f, json!("é".repeat(64)))).is_ok(), "64 chars, 128 bytes");
            assert_eq!(reason_of(&with(f, json!("a".repeat(65)))), RejectReason::InvalidLength);
        }
    }

    #[test]
    fn amount_rules_and_boundaries() {
        assert_eq!(check(&with("amount", json!("0.01"))), Ok(1));
        assert_eq!(check(&with("amount", json!("1000000000.00"))), Ok(MAX_AMOUNT_CENTS));
        assert_eq!(check(&with("amount", json!("1000000000"))), Ok(MAX_AMOUNT_CENTS));
        assert_eq!(check(&with("amount", json!("7"))), Ok(700));
        assert_eq!(check(&with("amount", json!("7.5"))), Ok(750));
        assert_eq!(check(&with("amount", json!(19.99))), Ok(1999), "numbers are accepted exactly");
        assert_eq!(check(&with("amount", json!(250))), Ok(25000));
        assert_eq!(check(&with("amount", json!(1e3))), Ok(100_000), "1000.0 is exact");
        for bad in [
            json!("0"),
            json!("0.00"),
            json!("-1.00"),
            json!("1000000000.01"),
            json!("1.234"),
            json!("abc"),
            json!(""),
            json!("1."),
            json!(".5"),
            json!("1e3"),
            json!(1.234),
            json!(-5),
            json!("99999999999999999999999"),
        ] {
            assert_eq!(reason_of(&with("amount", bad.clone())), RejectReason::InvalidAmount, "{bad}");
        }
    }

    #[test]
    fn currency_allow_list() {
        assert_eq!(reason_of(&with("currency", json!("XXX"))), RejectReason::UnknownCurrency);
        assert_eq!(reason_of(&with("currency", json!("eur"))), RejectReason::UnknownCurrency);
        let v = Validator::new(vec!["XXX".into()], 1024, Duration::from_secs(1), Duration::MAX);
        let bytes = serde_json::to_vec(&with("currency", json!("XXX"))).unwrap();
        assert!(v.validate(Some(&bytes), Some(NOW_US)).is_ok(), "the allow-list is configurable");
    }

    #[test]
    fn country_codes() {
        assert_eq!(reason_of(&with("country", json!("ZZ"))), RejectReason::InvalidCountry);
        assert_eq!(reason_of(&with("country", json!("FRA"))), RejectReason::InvalidCountry);
        assert_eq!(reason_of(&with("country", json!("fr"))), RejectReason::InvalidCountry);
        assert!(check(&with("country", json!("ZW"))).is_ok());
    }

    #[test]
    fn enums() {
        for f in ["transaction_type", "channel", "status"] {
            let r = check(&with(f, json!("BOGUS"))).unwrap_err();
            assert_eq!(r.reason, RejectReason::InvalidEnum, "{f}");
            assert!(r.detail.contains(f));
        }
        for t in TRANSACTION_TYPES {
            assert!(check(&with("transaction_type", json!(t))).is_ok());
        }
    }

    #[test]
    fn mcc_is_four_digits_when_present() {
        assert_eq!(reason_of(&with("merchant_category", json!("541"))), RejectReason::InvalidMcc);
        assert_eq!(reason_of(&with("merchant_category", json!("54a1"))), RejectReason::InvalidMcc);
        assert_eq!(reason_of(&with("merchant_category", json!("54111"))), RejectReason::InvalidMcc);
        assert!(check(&with("merchant_category", json!("0000"))).is_ok());
    }

    #[test]
    fn event_time_format_and_range_boundaries() {
        assert_eq!(reason_of(&with("event_time", json!("2025-12-31 23:00:00"))), RejectReason::InvalidEventTime);
        assert_eq!(
            reason_of(&with("event_time", json!("2025-12-31T23:00:00"))),
            RejectReason::InvalidEventTime,
            "an offset is required"
        );
        // Default skew 5 min in the future, age 30 days.
        assert!(check(&with("event_time", json!("2026-01-01T00:05:00Z"))).is_ok());
        assert_eq!(
            reason_of(&with("event_time", json!("2026-01-01T00:05:00.000001Z"))),
            RejectReason::EventTimeOutOfRange
        );
        assert!(check(&with("event_time", json!("2025-12-02T00:00:00Z"))).is_ok());
        assert_eq!(reason_of(&with("event_time", json!("2025-12-01T23:59:59Z"))), RejectReason::EventTimeOutOfRange);
    }

    #[test]
    fn time_checks_judge_by_the_broker_timestamp_alone() {
        // I8: a record from 2020 whose event_time is 2020 is valid today, and one sent now whose
        // event_time lies a minute past the skew is invalid for ever, however late it is read.
        let bytes = serde_json::to_vec(&with("event_time", json!("2020-03-01T12:00:00Z"))).unwrap();
        let sent_2020 = chrono::DateTime::parse_from_rfc3339("2020-03-01T12:01:00Z").unwrap().timestamp_micros();
        assert!(Validator::default().validate(Some(&bytes), Some(sent_2020)).is_ok());
        let r = Validator::default().validate(Some(&bytes), Some(NOW_US)).unwrap_err();
        assert_eq!(r.reason, RejectReason::EventTimeOutOfRange);
        assert!(r.detail.contains("broker timestamp 2026-01-01T00:00:00.000Z"), "{}", r.detail);
        // No broker timestamp (a message format before 0.10): nothing to judge the time by.
        assert!(Validator::default().validate(Some(&bytes), None).is_ok());
        assert_eq!(broker_time_us(Some(1_500)), Some(1_500_000));
        assert_eq!(broker_time_us(Some(-1)), None);
        assert_eq!(broker_time_us(None), None);
    }

    #[test]
    fn a_detail_quoting_a_huge_value_is_cut_on_a_character_boundary() {
        let v = Validator { max_record_bytes: 1 << 20, ..Default::default() };
        let bytes = serde_json::to_vec(&with("transaction_type", json!("é".repeat(300_000)))).unwrap();
        let r = v.validate(Some(&bytes), Some(NOW_US)).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidEnum);
        assert!(r.detail.len() <= MAX_DETAIL_BYTES, "{} bytes", r.detail.len());
        assert!(r.detail.starts_with("`transaction_type` is \"éé"), "{}", &r.detail[..40]);
        let total: usize = r.detail.rsplit("cut from ").next().unwrap().trim_end_matches(" bytes)").parse().unwrap();
        assert!(total > 600_000, "names the length it was cut from: {total}");
        let short = check(&with("currency", json!("XXX"))).unwrap_err();
        assert!(!short.detail.contains("cut from"), "{}", short.detail);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let t = br#"{"transaction_id":"6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b","user_id":"u\u00e9","account_id":"a","transaction_type":"DEBIT","amount":"1.00","currency":"USD","country":"US","channel":"ATM","status":"PENDING","event_time":"2025-12-31T00:00:00Z"}"#;
        let v = Validator::default().validate(Some(t), Some(NOW_US)).unwrap();
        assert_eq!(v.user_id, "ué");
    }

    #[test]
    fn transaction_ids_are_stored_canonical_whatever_the_spelling() {
        // Found by the audit's own reading of the source record (issue 11, part 6): an upper-case
        // id went into the lake as it arrived.
        let canonical = "6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
        for spelling in [
            canonical,
            "6F1C9A2E-3B4D-4E5F-8A9B-0C1D2E3F4A5B",
            "6f1c9a2e3b4d4e5f8a9b0c1d2e3f4a5b",
            "{6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b}",
            "urn:uuid:6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b",
        ] {
            let t = format!(
                r#"{{"transaction_id":"{spelling}","user_id":"u","account_id":"a","transaction_type":"DEBIT","amount":"1.00","currency":"USD","country":"US","channel":"ATM","status":"PENDING","event_time":"2025-12-31T00:00:00Z"}}"#
            );
            let v = Validator::default().validate(Some(t.as_bytes()), Some(NOW_US)).unwrap();
            assert_eq!(v.transaction_id, canonical, "{spelling}");
        }
    }

    #[test]
    fn reason_codes_round_trip() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(format_cents(1234), "12.34");
        assert_eq!(format_cents(5), "0.05");
    }
}
