//! Deterministic raw-file keys:
//! `<prefix>/partition=<p>/<topic>+<p>+<first:020>-<last:020>.parquet`.
//!
//! Zero padding makes lexical listing order equal offset order, which lets the recovery scan list
//! only the keys after the committed offset (`start_after`). Kafka topic names cannot contain `+`,
//! so the name parses back unambiguously.

use std::fmt;

/// The identity of one raw file: which partition and which offset range `[first, last]` it covers.
/// The range spans every offset the flush consumed, including dead-lettered ones.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawFileName {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
}

impl RawFileName {
    /// The object key under `prefix` (no leading or trailing slash).
    pub fn key(&self, prefix: &str) -> String {
        format!("{}{}", partition_prefix(prefix, self.partition), self.file_name())
    }

    pub fn file_name(&self) -> String {
        format!("{}+{}+{:020}-{:020}.parquet", self.topic, self.partition, self.first_offset, self.last_offset)
    }

    /// Parses a key (or bare file name) back; `None` for anything that is not a raw file.
    pub fn parse(key: &str) -> Option<RawFileName> {
        let name = key.rsplit('/').next()?;
        let stem = name.strip_suffix(".parquet")?;
        let mut parts = stem.rsplitn(3, '+');
        let range = parts.next()?;
        let partition: i32 = parts.next()?.parse().ok()?;
        let topic = parts.next()?;
        let (first, last) = range.split_once('-')?;
        if first.len() != 20 || last.len() != 20 || topic.is_empty() {
            return None;
        }
        let (first_offset, last_offset) = (first.parse().ok()?, last.parse().ok()?);
        if first_offset > last_offset || partition < 0 {
            return None;
        }
        Some(RawFileName { topic: topic.to_string(), partition, first_offset, last_offset })
    }
}

impl fmt::Display for RawFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// `<prefix>/partition=<p>/`
pub fn partition_prefix(prefix: &str, partition: i32) -> String {
    if prefix.is_empty() { format!("partition={partition}/") } else { format!("{prefix}/partition={partition}/") }
}

/// The `start_after` marker that lists exactly the files whose first offset is `>= offset`.
pub fn start_after_for(prefix: &str, topic: &str, partition: i32, offset: i64) -> String {
    // Every key with first_offset == offset is longer than this marker and shares it as a
    // prefix, so it sorts after; every key with a smaller first offset sorts before.
    format!("{}{topic}+{partition}+{offset:020}", partition_prefix(prefix, partition))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(first: i64, last: i64) -> RawFileName {
        RawFileName { topic: "transactions".into(), partition: 3, first_offset: first, last_offset: last }
    }

    #[test]
    fn key_layout() {
        assert_eq!(
            name(0, 41).key("transactions"),
            "transactions/partition=3/transactions+3+00000000000000000000-00000000000000000041.parquet"
        );
        assert_eq!(name(1, 2).key(""), "partition=3/transactions+3+00000000000000000001-00000000000000000002.parquet");
    }

    #[test]
    fn parse_round_trips() {
        for n in [name(0, 0), name(5, 9_999_999), name(i64::MAX - 1, i64::MAX)] {
            assert_eq!(RawFileName::parse(&n.key("a/b")), Some(n.clone()));
        }
        let dotted = RawFileName { topic: "tx.v2-eu".into(), ..name(1, 2) };
        assert_eq!(RawFileName::parse(&dotted.key("p")), Some(dotted));
    }

    #[test]
    fn parse_rejects_foreign_names() {
        for k in [
            "transactions/partition=3/notes.txt",
            "transactions/partition=3/t+3+1-2.parquet",
            "transactions/partition=3/t+x+00000000000000000001-00000000000000000002.parquet",
            "transactions/partition=3/t+3+00000000000000000009-00000000000000000002.parquet",
            "transactions/partition=3/+3+00000000000000000001-00000000000000000002.parquet",
        ] {
            assert_eq!(RawFileName::parse(k), None, "{k}");
        }
    }

    #[test]
    fn listing_order_is_offset_order_and_start_after_selects_from_offset() {
        let mut keys: Vec<String> =
            [name(100, 199), name(0, 99), name(1000, 1999), name(200, 999)].iter().map(|n| n.key("t")).collect();
        keys.sort();
        let firsts: Vec<i64> = keys.iter().map(|k| RawFileName::parse(k).unwrap().first_offset).collect();
        assert_eq!(firsts, vec![0, 100, 200, 1000]);
        let marker = start_after_for("t", "transactions", 3, 200);
        let after: Vec<i64> = keys
            .iter()
            .filter(|k| k.as_str() > marker.as_str())
            .map(|k| RawFileName::parse(k).unwrap().first_offset)
            .collect();
        assert_eq!(after, vec![200, 1000]);
    }
}
