//! The entry codec: `Record::decode(bytes, key)`, the first thing a lookup
//! does with what the store returned.
//!
//! Input: raw bytes under a key, or a record the layer could have written
//! (built from arbitrary parts) with arbitrary damage done to it. Checks:
//!
//! - decoding never panics;
//! - a record that decodes holds times in order (`stale_until` and
//!   `error_until` never before `fresh_until`), re-encodes to bytes that
//!   decode to the same record, and its plain parts rebuild it;
//! - re-encoding is canonical: encoding the decoded re-encoding gives the
//!   same bytes;
//! - a record that decodes under `key` is refused under any other key with
//!   `WrongKey`, and so is its re-encoding;
//! - an undamaged record decodes to itself when its times are in order, and
//!   to `Invalid` otherwise; every proper prefix of it is an error.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_fence::fuzzing::{DecodeFailure, EntryParts, Record, RecordParts};

#[derive(Arbitrary, Debug)]
enum Input {
    Raw {
        key: String,
        other: String,
        bytes: Vec<u8>,
    },
    Damaged {
        key: String,
        other: String,
        record: ArbRecord,
        edits: Vec<Edit>,
        cut: u16,
    },
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Set(u16, u8),
    Insert(u16, u8),
    Remove(u16),
    Truncate(u16),
}

#[derive(Arbitrary, Debug)]
enum ArbRecord {
    Entry(ArbEntry),
    Vary(Vec<Name>),
}

#[derive(Arbitrary, Debug)]
struct ArbEntry {
    status: u16,
    headers: Vec<(Name, Value)>,
    body: Vec<u8>,
    trailers: Option<Vec<(Name, Value)>>,
    stored_at_ms: u64,
    fresh_until_ms: u64,
    /// Usually after `fresh_until_ms`; sometimes raw (out of order).
    stale: Time,
    error: Time,
    rebuild_ms: u32,
    flags: u8,
    vary: Vec<(Name, Option<Value>)>,
}

#[derive(Arbitrary, Debug)]
enum Time {
    After(u32),
    Raw(u64),
}

impl Time {
    fn from(&self, fresh: u64) -> u64 {
        match *self {
            Time::After(ms) => fresh.saturating_add(u64::from(ms)),
            Time::Raw(ms) => ms,
        }
    }
}

/// A header name: a common one, or any bytes (most of which are not one).
#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Token(Vec<u8>),
    Raw(Vec<u8>),
}

const NAMES: &[&str] = &[
    "content-type",
    "etag",
    "cache-control",
    "x-multi",
    "accept-encoding",
    "grpc-status",
    "set-cookie",
    "vary",
];

impl Name {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Name::Known(i) => NAMES[usize::from(*i) % NAMES.len()].as_bytes().to_vec(),
            // Lower-case letters, digits and `-`: always a valid name when
            // not empty.
            Name::Token(raw) => raw
                .iter()
                .map(|b| b"abcdefghijklmnopqrstuvwxyz0123456789-"[usize::from(*b) % 37])
                .collect(),
            Name::Raw(raw) => raw.clone(),
        }
    }
}

/// A header value: any bytes, the ones a value cannot hold replaced.
#[derive(Arbitrary, Debug)]
struct Value(Vec<u8>);

impl Value {
    fn bytes(&self) -> Vec<u8> {
        self.0
            .iter()
            .map(|&b| {
                if b == b'\t' || (b >= 0x20 && b != 0x7f) {
                    b
                } else {
                    b'?'
                }
            })
            .collect()
    }
}

fn lines(pairs: &[(Name, Value)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs.iter().map(|(n, v)| (n.bytes(), v.bytes())).collect()
}

impl ArbRecord {
    fn parts(&self) -> RecordParts {
        match self {
            ArbRecord::Vary(names) => RecordParts::Vary(names.iter().map(Name::bytes).collect()),
            ArbRecord::Entry(e) => RecordParts::Entry(EntryParts {
                status: e.status,
                headers: lines(&e.headers),
                body: e.body.clone(),
                trailers: e.trailers.as_deref().map(lines),
                stored_at_ms: e.stored_at_ms,
                fresh_until_ms: e.fresh_until_ms,
                stale_until_ms: e.stale.from(e.fresh_until_ms),
                error_until_ms: e.error.from(e.fresh_until_ms),
                rebuild_ms: e.rebuild_ms,
                flags: e.flags,
                vary: e
                    .vary
                    .iter()
                    .map(|(n, v)| (n.bytes(), v.as_ref().map(Value::bytes)))
                    .collect(),
            }),
        }
    }
}

fn times_in_order(parts: &RecordParts) -> bool {
    match parts {
        RecordParts::Vary(_) => true,
        RecordParts::Entry(e) => {
            e.stale_until_ms >= e.fresh_until_ms && e.error_until_ms >= e.fresh_until_ms
        }
    }
}

/// What must hold of any bytes read under `key`.
fn check(bytes: &[u8], key: &str, other: &str) {
    let Ok(record) = Record::decode(bytes, key) else {
        return;
    };
    let parts = record.parts();
    assert!(
        times_in_order(&parts),
        "decoded times out of order: {parts:?}"
    );
    assert_eq!(Record::from_parts(&parts).as_ref(), Some(&record));

    let encoded = record.encode(key);
    let again = Record::decode(&encoded, key).expect("a re-encoded record decodes");
    assert_eq!(again, record);
    assert_eq!(again.encode(key), encoded, "re-encoding is not canonical");

    if other != key {
        assert_eq!(Record::decode(bytes, other), Err(DecodeFailure::WrongKey));
        assert_eq!(
            Record::decode(&encoded, other),
            Err(DecodeFailure::WrongKey)
        );
    }
    // Keys that differ by one byte at the end, or only in length.
    let longer = format!("{key}\0");
    assert_eq!(Record::decode(bytes, &longer), Err(DecodeFailure::WrongKey));
    if let Some((cut, _)) = key.char_indices().last() {
        assert_eq!(
            Record::decode(bytes, &key[..cut]),
            Err(DecodeFailure::WrongKey)
        );
    }
}

fuzz_target!(|input: Input| match input {
    Input::Raw { key, other, bytes } => check(&bytes, &key, &other),
    Input::Damaged {
        key,
        other,
        record,
        edits,
        cut,
    } => {
        let parts = record.parts();
        let Some(built) = Record::from_parts(&parts) else {
            return; // not valid HTTP: the layer never holds it
        };
        let mut bytes = built.encode(&key);
        match Record::decode(&bytes, &key) {
            Ok(decoded) => {
                assert!(times_in_order(&parts));
                assert_eq!(decoded, built);
            }
            Err(e) => {
                assert!(!times_in_order(&parts), "a valid record fails: {e:?}");
                assert_eq!(e, DecodeFailure::Invalid);
            }
        }
        let cut = usize::from(cut) % bytes.len();
        assert!(Record::decode(&bytes[..cut], &key).is_err(), "cut at {cut}");
        check(&bytes, &key, &other);

        for edit in edits {
            let len = bytes.len();
            let at = |i: u16| if len == 0 { 0 } else { usize::from(i) % len };
            match edit {
                Edit::Set(i, b) if len > 0 => bytes[at(i)] = b,
                Edit::Insert(i, b) => bytes.insert(at(i), b),
                Edit::Remove(i) if len > 0 => {
                    bytes.remove(at(i));
                }
                Edit::Truncate(i) => bytes.truncate(at(i)),
                _ => {}
            }
        }
        check(&bytes, &key, &other);
    }
});
