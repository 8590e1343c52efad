//! Key derivation and the entry codec, through the crate's `fuzzing` entry
//! points (the functions the layer calls):
//!
//! ```sh
//! cargo bench --bench codec
//! ```
//!
//! - `key/{short,typical,long}`: the store key of a `GET` (SHA-256 over the
//!   request's identity, the readable escaped path), throughput in bytes of
//!   the URI. `fuzzing::cache_key` also copies the configuration (namespace,
//!   key headers) and returns the key as a `String`: a few allocations the
//!   layer does not make.
//! - `entry/encode` and `entry/decode` for a 1 KiB and a 64 KiB body with
//!   six header lines. `fuzzing::Record::decode` first copies the bytes
//!   into a `Bytes` (the store hands the layer one), and `encode` returns a
//!   `Vec`: one copy each that the layer does not make.
//!
//! Every case checks its value first (the key's shape, a round trip).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, Method, Uri};
use tower_fence::fuzzing::{cache_key, EntryParts, Record, RecordParts};

const KEY: &str = "tf:/items/42#{0123456789abcdef0123456789abcdef}";

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut headers = HeaderMap::new();
    headers.insert("host", "bench.example".parse().expect("host"));
    headers.insert("accept", "text/html".parse().expect("accept"));
    let long_path = format!(
        "/catalog/{}/items?{}",
        "segment/".repeat(24),
        "q=1&".repeat(30)
    );
    for (name, uri) in [
        ("short", "/users/42".to_owned()),
        ("typical", "/api/v1/items/42?page=2&sort=name".to_owned()),
        ("long", long_path),
    ] {
        let uri: Uri = uri.parse().expect("uri");
        let key = cache_key("tf:", &[], &Method::GET, &uri, &headers);
        assert!(key.starts_with("tf:/") && key.ends_with('}'), "{key}");
        group.throughput(Throughput::Bytes(uri.to_string().len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                black_box(cache_key(
                    "tf:",
                    &[],
                    &Method::GET,
                    black_box(&uri),
                    &headers,
                ))
            })
        });
    }
    group.finish();
}

fn record(body_len: usize) -> Record {
    let headers = [
        ("content-type", "application/json"),
        ("cache-control", "public, max-age=600"),
        ("etag", "\"5f3c-17a2\""),
        ("last-modified", "Sun, 29 Nov 2026 10:00:00 GMT"),
        ("vary", "accept-encoding"),
        ("x-request-id", "4b1f0c9e-2a8d-4e0f-9b57-0d2c1f7a6e31"),
    ];
    let parts = RecordParts::Entry(EntryParts {
        status: 200,
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
        body: vec![b'x'; body_len],
        trailers: None,
        stored_at_ms: 1_764_410_000_000,
        fresh_until_ms: 1_764_410_600_000,
        stale_until_ms: 1_764_410_660_000,
        error_until_ms: 1_764_410_660_000,
        rebuild_ms: 12,
        flags: 0,
        vary: vec![(b"accept-encoding".to_vec(), Some(b"gzip".to_vec()))],
    });
    Record::from_parts(&parts).expect("valid record")
}

fn entries(c: &mut Criterion) {
    let mut group = c.benchmark_group("entry");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, len) in [("1k", 1024), ("64k", 64 * 1024)] {
        let record = record(len);
        let bytes = record.encode(KEY);
        assert_eq!(
            Record::decode(&bytes, KEY).as_ref(),
            Ok(&record),
            "round trip"
        );
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| black_box(black_box(&record).encode(KEY)))
        });
        group.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| black_box(Record::decode(black_box(&bytes), KEY)))
        });
    }
    group.finish();
}

criterion_group!(benches, keys, entries);
criterion_main!(benches);
