//! Cache key derivation.
//!
//! A stored key reads `{namespace}{escaped path}#{{hash}}`, for example
//! `tf:/users/42#{3b0c…}`:
//!
//! - the path stays readable so that a path prefix can later be selected with
//!   `SCAN MATCH tf:/users/42[#/]*`;
//! - the characters that are special in a `MATCH` glob (`* ? [ ] \`), the
//!   Redis Cluster hash-tag braces (`{ }`), the separator `#` and the escape
//!   character `%` itself are percent-encoded in the path, so a key holds no
//!   glob character and its first `{` opens the hash: an entry and anything
//!   keyed on the same hash (its rebuild lease) share one cluster slot;
//! - the hash is SHA-256 over the method class, authority, path, query and
//!   the user's key parts, each length-prefixed, truncated to 128 bits.
//!
//! Escaped paths longer than [`MAX_READABLE_PATH`] bytes are cut there and
//! marked with `~`: such entries are still found by their hash, but only a
//! prefix no longer than the cut selects them.

use std::fmt::Write as _;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

/// Longest escaped path kept readable in a key, in bytes.
pub(crate) const MAX_READABLE_PATH: usize = 512;

/// Marks a readable path that was cut at [`MAX_READABLE_PATH`].
const CUT_MARK: char = '~';

/// A request's identity in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    storage: String,
}

impl CacheKey {
    /// The key as stored.
    pub(crate) fn as_str(&self) -> &str {
        &self.storage
    }
}

/// What goes into a key besides the request itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyConfig {
    pub(crate) namespace: String,
    /// Request headers whose values become part of the key.
    pub(crate) headers: Vec<HeaderName>,
}

/// Derives the key of a request. `HEAD` shares `GET`'s key (RFC 9110 §9.3.2:
/// a HEAD may be answered from a stored GET response).
pub(crate) fn derive_from(
    config: &KeyConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> CacheKey {
    let method_class = method_class(method);
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let path = uri.path();
    let query = uri.query();

    let mut hasher = Sha256::new();
    frame(&mut hasher, b"tower-fence key v1");
    frame(&mut hasher, method_class.as_bytes());
    frame(&mut hasher, authority.to_ascii_lowercase().as_bytes());
    frame(&mut hasher, path.as_bytes());
    match query {
        None => hasher.update([0u8]),
        Some(q) => {
            hasher.update([1u8]);
            frame(&mut hasher, q.as_bytes());
        }
    }
    for name in &config.headers {
        frame(&mut hasher, name.as_str().as_bytes());
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        hasher.update((values.len() as u64).to_be_bytes());
        for value in values {
            frame(&mut hasher, value);
        }
    }
    let digest = hasher.finalize();

    let mut storage = String::with_capacity(config.namespace.len() + path.len() + 40);
    storage.push_str(&config.namespace);
    push_readable_path(&mut storage, path);
    storage.push_str("#{");
    for byte in &digest[..16] {
        let _ = write!(storage, "{byte:02x}");
    }
    storage.push('}');
    CacheKey { storage }
}

fn method_class(method: &Method) -> &str {
    if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    }
}

fn frame(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

fn push_readable_path(out: &mut String, path: &str) {
    let start = out.len();
    for ch in path.chars() {
        let before = out.len();
        push_escaped(out, ch);
        if out.len() - start > MAX_READABLE_PATH {
            out.truncate(before);
            out.push(CUT_MARK);
            return;
        }
    }
}

/// Appends `ch` to `out`, percent-encoded when it is special in a key or in a
/// `SCAN MATCH` glob.
fn push_escaped(out: &mut String, ch: char) {
    match ch {
        '*' | '?' | '[' | ']' | '\\' | '{' | '}' | '#' | '%' | CUT_MARK => {
            let _ = write!(out, "%{:02X}", ch as u32);
        }
        c if c.is_ascii_control() || c == ' ' => {
            let _ = write!(out, "%{:02X}", c as u32);
        }
        c => out.push(c),
    }
}

/// Escapes a path the way keys store it (for building prefix patterns).
#[allow(dead_code)] // used by prefix invalidation
pub(crate) fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for ch in path.chars() {
        push_escaped(&mut out, ch);
    }
    out
}

/// Whether a namespace is safe to put in front of keys and patterns.
pub(crate) fn valid_namespace(namespace: &str) -> bool {
    namespace
        .chars()
        .all(|c| !matches!(c, '*' | '?' | '[' | ']' | '\\' | '{' | '}' | '#') && !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use proptest::prelude::*;

    fn key_of(config: &KeyConfig, req: Request<()>) -> String {
        derive_from(config, req.method(), req.uri(), req.headers())
            .as_str()
            .to_owned()
    }

    fn config() -> KeyConfig {
        KeyConfig {
            namespace: "tf:".into(),
            headers: vec![],
        }
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn key_keeps_path_readable_with_hash_tag() {
        let key = key_of(&config(), get("http://example.com/users/42?x=1"));
        assert!(key.starts_with("tf:/users/42#{"), "{key}");
        assert!(key.ends_with('}'));
        assert_eq!(key.len(), "tf:/users/42#{}".len() + 32);
    }

    #[test]
    fn head_shares_get_key_and_other_methods_do_not() {
        let c = config();
        let get_key = key_of(&c, get("/a"));
        let head = key_of(&c, Request::head("/a").body(()).unwrap());
        let post = key_of(&c, Request::post("/a").body(()).unwrap());
        assert_eq!(get_key, head);
        assert_ne!(get_key, post);
    }

    #[test]
    fn query_host_and_key_headers_change_the_hash() {
        let c = config();
        assert_ne!(key_of(&c, get("/a?x=1")), key_of(&c, get("/a?x=2")));
        assert_ne!(key_of(&c, get("/a?")), key_of(&c, get("/a")));
        assert_ne!(
            key_of(&c, get("http://a.example/p")),
            key_of(&c, get("http://b.example/p"))
        );
        assert_eq!(
            key_of(&c, get("http://A.example/p")),
            key_of(
                &c,
                Request::get("/p")
                    .header("host", "a.example")
                    .body(())
                    .unwrap()
            )
        );
        let c = KeyConfig {
            headers: vec![HeaderName::from_static("x-tenant")],
            ..config()
        };
        let t1 = Request::get("/p").header("x-tenant", "1").body(()).unwrap();
        let t2 = Request::get("/p").header("x-tenant", "2").body(()).unwrap();
        assert_ne!(key_of(&c, t1), key_of(&c, t2));
    }

    #[test]
    fn glob_and_brace_characters_are_escaped() {
        let key = key_of(&config(), get("/a*b/%3F/[x]/{tag}/#"));
        let readable = key.split("#{").next().unwrap();
        assert_eq!(readable, "tf:/a%2Ab/%253F/%5Bx%5D/%7Btag%7D/");
        assert_eq!(key.matches('{').count(), 1);
    }

    #[test]
    fn long_paths_are_cut_and_marked() {
        let path = format!("/{}", "a".repeat(4000));
        let key = key_of(&config(), get(&path));
        assert!(key.len() < MAX_READABLE_PATH + 64);
        assert!(key.contains("~#{"));
        let other = key_of(&config(), get(&format!("{path}b")));
        assert_ne!(key, other, "the hash still tells long paths apart");
    }

    #[test]
    fn namespace_validation() {
        assert!(valid_namespace("tf:"));
        assert!(valid_namespace("app/v2:"));
        for bad in ["a*", "a?", "a[", "a]", "a\\", "{a}", "a#", "a\n"] {
            assert!(!valid_namespace(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn escaped_paths_hold_no_glob_or_brace(path in "/[ -~]{0,64}") {
            let escaped = escape_path(&path);
            let special = ['*', '?', '[', ']', '\\', '{', '}', '#'];
            prop_assert!(!escaped.contains(special), "{}", escaped);
        }

        #[test]
        fn escaping_is_injective(a in "/[ -~]{0,16}", b in "/[ -~]{0,16}") {
            prop_assume!(a != b);
            prop_assert_ne!(escape_path(&a), escape_path(&b));
        }
    }
}
