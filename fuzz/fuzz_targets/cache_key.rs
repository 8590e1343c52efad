//! Key derivation from arbitrary request parts (the derivation the layer
//! calls, and the public `FenceLayer::cache_key` for the default namespace).
//!
//! Input: a namespace, a method, a URI and header lines as bytes (what
//! `http` refuses is skipped: such a request never reaches the layer), and
//! one change to make a second request. Checks:
//!
//! - derivation never panics and is deterministic; `FenceLayer::cache_key`
//!   gives the derived key (default namespace);
//! - the key reads `{namespace}{readable path}#{32 hex digits}`: one `{` and
//!   one `}` (the hash tag), no glob character (`* ? [ ] \`), `#`, space or
//!   control character in the readable path, which is the escaped path, or
//!   its first bytes (at most 512) marked `~` when it is longer;
//! - for a path starting with `/`: the key and its lease are selected by the
//!   path's prefix and exact invalidation patterns;
//! - two requests get the same key exactly when they agree on the method
//!   (`HEAD` counting as `GET`), the host (the URI's authority, else the
//!   first `Host` line's bytes, ASCII case ignored), the path, the query and
//!   the values of the key header: different hosts, paths or queries never
//!   share a key, and no other header changes it.

#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use tower_fence::fuzzing::{self, escape_path, MAX_READABLE_PATH};
use tower_fence::store::{lease_key, KeyPattern};
use tower_fence::FenceLayer;

/// The layer's key header, when the input turns it on.
const KEY_HEADER: &str = "x-k";

#[derive(Arbitrary, Debug)]
struct Input {
    namespace: Option<String>,
    key_header: bool,
    method: Vec<u8>,
    uri: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    change: Change,
}

/// How the second request differs from the first.
#[derive(Arbitrary, Debug)]
enum Change {
    Method(Vec<u8>),
    Uri(Vec<u8>),
    /// Replaces every `Host` line by this one.
    Host(Vec<u8>),
    /// Adds a line (a `Host`, a key header or any other).
    Add(Vec<u8>, Vec<u8>),
    /// Removes every line of the `i`th header's name.
    Remove(u8),
}

fn build(method: &Method, uri: &Uri, headers: &[(HeaderName, HeaderValue)]) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    for (name, value) in headers {
        request.headers_mut().append(name.clone(), value.clone());
    }
    request
}

fn header(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

/// What a key depends on, as the docs state it.
fn identity(
    request: &Request<()>,
    key_header: bool,
) -> (String, Vec<u8>, String, Option<String>, Vec<Vec<u8>>) {
    let method = if request.method() == Method::HEAD {
        "GET".to_owned()
    } else {
        request.method().as_str().to_owned()
    };
    let host = match request.uri().authority() {
        Some(a) => a.as_str().as_bytes().to_ascii_lowercase(),
        None => request
            .headers()
            .get(http::header::HOST)
            .map(|h| h.as_bytes().to_ascii_lowercase())
            .unwrap_or_default(),
    };
    let key_values = if key_header {
        request
            .headers()
            .get_all(KEY_HEADER)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    } else {
        Vec::new()
    };
    (
        method,
        host,
        request.uri().path().to_owned(),
        request.uri().query().map(str::to_owned),
        key_values,
    )
}

/// Layers with the default namespace, without and with the key header:
/// built once (a layer holds a store and caches).
fn layer(key_header: bool) -> &'static FenceLayer {
    static LAYERS: OnceLock<[FenceLayer; 2]> = OnceLock::new();
    let layers = LAYERS.get_or_init(|| {
        let plain = FenceLayer::builder().build().expect("default layer");
        let keyed = FenceLayer::builder()
            .key_header(KEY_HEADER)
            .build()
            .expect("layer with a key header");
        [plain, keyed]
    });
    &layers[usize::from(key_header)]
}

/// The key of `request`: through the public `FenceLayer::cache_key` for the
/// default namespace (checked against the derivation itself), else through
/// the derivation with the namespace a layer would accept.
fn key_of(request: &Request<()>, namespace: &str, key_header: bool) -> String {
    let headers: &[HeaderName] = if key_header {
        &[HeaderName::from_static(KEY_HEADER)]
    } else {
        &[]
    };
    let derived = fuzzing::cache_key(
        namespace,
        headers,
        request.method(),
        request.uri(),
        request.headers(),
    );
    if namespace == tower_fence::DEFAULT_NAMESPACE {
        assert_eq!(layer(key_header).cache_key(request), derived);
    }
    derived
}

fn check_shape(key: &str, namespace: &str, path: &str) {
    let rest = key
        .strip_prefix(namespace)
        .unwrap_or_else(|| panic!("{key:?} does not start with {namespace:?}"));
    let (readable, hash) = rest
        .split_once('#')
        .unwrap_or_else(|| panic!("no `#` in {key:?}"));
    assert_eq!(key.matches('{').count(), 1, "{key:?}");
    assert_eq!(key.matches('}').count(), 1, "{key:?}");
    let digits = hash
        .strip_prefix('{')
        .and_then(|h| h.strip_suffix('}'))
        .unwrap_or_else(|| panic!("hash part {hash:?}"));
    assert_eq!(digits.len(), 32, "{key:?}");
    assert!(digits
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    for ch in readable.chars() {
        assert!(
            !matches!(ch, '*' | '?' | '[' | ']' | '\\' | '{' | '}' | '#' | ' ')
                && !ch.is_ascii_control(),
            "{ch:?} unescaped in {key:?}"
        );
    }
    let escaped = escape_path(path);
    if escaped.len() <= MAX_READABLE_PATH {
        assert_eq!(readable, escaped);
    } else {
        let cut = readable
            .strip_suffix('~')
            .unwrap_or_else(|| panic!("long path not marked as cut: {key:?}"));
        assert!(cut.len() <= MAX_READABLE_PATH, "{key:?}");
        assert!(escaped.starts_with(cut), "{key:?}");
        // Cut at a character boundary, as late as it fits.
        let next = escaped[cut.len()..]
            .chars()
            .next()
            .expect("something was cut");
        let next_len = escape_path(&next.to_string()).len();
        assert!(
            cut.len() + next_len > MAX_READABLE_PATH,
            "{key:?} cut early"
        );
    }
    if path.starts_with('/') {
        let lease = lease_key(key);
        for pattern in [
            KeyPattern::prefix(namespace, path),
            KeyPattern::path(namespace, path),
        ] {
            assert!(pattern.matches(key), "{} misses {key:?}", pattern.glob());
            assert!(
                pattern.matches(&lease),
                "{} misses {lease:?}",
                pattern.glob()
            );
            assert!(pattern.leases().matches(&lease));
        }
    }
}

fuzz_target!(|input: Input| {
    let namespace = input
        .namespace
        .as_deref()
        .unwrap_or(tower_fence::DEFAULT_NAMESPACE);
    if !fuzzing::valid_namespace(namespace) {
        return; // the layer's builder refuses it
    }
    let (Ok(method), Ok(uri)) = (
        Method::from_bytes(&input.method),
        Uri::try_from(input.uri.as_slice()),
    ) else {
        return;
    };
    let headers: Vec<_> = input
        .headers
        .iter()
        .filter_map(|(n, v)| header(n, v))
        .collect();
    let first = build(&method, &uri, &headers);
    let key = key_of(&first, namespace, input.key_header);
    assert_eq!(
        key_of(&first, namespace, input.key_header),
        key,
        "not deterministic"
    );
    check_shape(&key, namespace, uri.path());

    let second = match &input.change {
        Change::Method(m) => {
            let Ok(m) = Method::from_bytes(m) else { return };
            build(&m, &uri, &headers)
        }
        Change::Uri(u) => {
            let Ok(u) = Uri::try_from(u.as_slice()) else {
                return;
            };
            build(&method, &u, &headers)
        }
        Change::Host(h) => {
            let Ok(h) = HeaderValue::from_bytes(h) else {
                return;
            };
            let mut lines: Vec<_> = headers
                .iter()
                .filter(|(n, _)| n != http::header::HOST)
                .cloned()
                .collect();
            lines.push((http::header::HOST, h));
            build(&method, &uri, &lines)
        }
        Change::Add(n, v) => {
            let Some(line) = header(n, v) else { return };
            let mut lines = headers.clone();
            lines.push(line);
            build(&method, &uri, &lines)
        }
        Change::Remove(i) => {
            let Some((name, _)) = headers.get(usize::from(*i) % headers.len().max(1)) else {
                return;
            };
            let lines: Vec<_> = headers.iter().filter(|(n, _)| n != name).cloned().collect();
            build(&method, &uri, &lines)
        }
    };
    let other = key_of(&second, namespace, input.key_header);
    check_shape(&other, namespace, second.uri().path());
    let same = identity(&first, input.key_header) == identity(&second, input.key_header);
    assert_eq!(
        key == other,
        same,
        "keys {key:?} and {other:?} of {first:?} and {second:?}"
    );
});
