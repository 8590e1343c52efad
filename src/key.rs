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
//! Escaped paths longer than [`MAX_READABLE_PATH`] bytes are cut there (at a
//! character boundary) and marked with `~` (which paths never hold
//! unescaped). Patterns and index sets of such paths select the cut keys:
//! every path sharing the cut is selected with them (more than asked, never
//! less; see [`KeyPattern`]).

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

use crate::recent::{self, Recent, MAX_MATERIAL};

/// Keys per thread remembered by their material (see [`recent`]).
const RECENT_KEYS: usize = 256;

thread_local! {
    static KEYS: RefCell<Recent<Arc<str>>> = const { RefCell::new(Recent::new(RECENT_KEYS)) };
}

/// Longest escaped path kept readable in a key, in bytes.
pub(crate) const MAX_READABLE_PATH: usize = 512;

/// Marks a readable path that was cut at [`MAX_READABLE_PATH`].
const CUT_MARK: char = '~';

/// A request's identity in the store. Cheap to clone: a request's key is
/// held by its lookup, its flight and its fill.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    storage: Arc<str>,
}

impl CacheKey {
    /// The key as stored.
    pub(crate) fn as_str(&self) -> &str {
        &self.storage
    }

    /// The key, shared.
    pub(crate) fn shared(&self) -> Arc<str> {
        self.storage.clone()
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
    derive_with(config, method, uri, headers, &[])
}

/// [`derive_from`] with extra key material (a route rule's key parts).
pub(crate) fn derive_with(
    config: &KeyConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    extra: &[Vec<u8>],
) -> CacheKey {
    let method_class = method_class(method);
    // The request target's authority, else the first `Host` as sent: its
    // bytes, not its text, so a host beyond visible ASCII (which `http`
    // accepts) is told apart from another and from none.
    let authority: &[u8] = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(http::header::HOST).map(|h| h.as_bytes()))
        .unwrap_or(b"");
    let path = uri.path();
    let query = uri.query();

    let mut material = Material::new(KEY_DOMAIN);
    material.frame(method_class.as_bytes());
    material.frame_lowercase(authority);
    material.frame(path.as_bytes());
    match query {
        None => material.put(&[0]),
        Some(q) => {
            material.put(&[1]);
            material.frame(q.as_bytes());
        }
    }
    for name in &config.headers {
        material.frame(name.as_str().as_bytes());
        let values = headers.get_all(name);
        material.put_len(values.iter().count());
        for value in values {
            material.frame(value.as_bytes());
        }
    }
    material.put_len(extra.len());
    for part in extra {
        material.frame(part);
    }
    let storage = material.key(&config.namespace, |digest| {
        key_text(&config.namespace, path, &digest[..16])
    });
    CacheKey { storage }
}

/// Longest key built on the stack (one allocation, the key's own).
const STACK_KEY: usize = 256;

/// `{namespace}{readable path}#{{hex of hash}}`. A path that needs no
/// escape and fits [`STACK_KEY`] is written on the stack and copied once
/// into the shared key; any other through [`key_string`].
fn key_text(namespace: &str, path: &str, hash: &[u8]) -> Arc<str> {
    let len = namespace.len() + path.len() + 2 * hash.len() + 3;
    let plain = path.len() <= MAX_READABLE_PATH && !path.chars().any(needs_escape);
    if plain && len <= STACK_KEY {
        let mut buf = [0u8; STACK_KEY];
        let mut at = 0;
        for piece in [namespace.as_bytes(), path.as_bytes(), b"#{"] {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        for &byte in hash {
            buf[at] = HEX[usize::from(byte >> 4)];
            buf[at + 1] = HEX[usize::from(byte & 0x0f)];
            at += 2;
        }
        buf[at] = b'}';
        if let Ok(text) = std::str::from_utf8(&buf[..len]) {
            return Arc::from(text);
        }
    }
    key_string(namespace, path, hash).into()
}

/// [`key_text`] for any path: escaped, cut when long.
fn key_string(namespace: &str, path: &str, hash: &[u8]) -> String {
    let mut storage = String::with_capacity(namespace.len() + path.len() + 40);
    storage.push_str(namespace);
    push_readable_path(&mut storage, path);
    storage.push_str("#{");
    push_hex(&mut storage, hash);
    storage.push('}');
    storage
}

fn method_class(method: &Method) -> &str {
    if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    }
}

/// Domain of a key's hash; its version changes with the hashed framing.
const KEY_DOMAIN: &[u8] = b"tf key v2";

/// Domain of a variant's hash.
const VARIANT_DOMAIN: &[u8] = b"tf variant v3";

/// The bytes a key's hash is taken over, gathered in a buffer before they
/// reach SHA-256 (one `update` for the lot, not one per field).
///
/// Every field is framed by its length as a LEB128 varint: a prefix-free
/// framing, so distinct field lists never hash the same bytes, and one
/// byte per field under 128 bytes instead of eight. A typical request's
/// material (domain, method, host, path, query) then fits SHA-256's first
/// 55 bytes and costs one compression instead of two; and material that
/// fits the buffer is looked up in this thread's recent keys first, so a
/// hot URL costs no compression at all.
struct Material {
    hasher: Sha256,
    buf: [u8; MAX_MATERIAL],
    len: usize,
    /// Whether the buffer overflowed into `hasher` (the material is then
    /// too long to be remembered).
    spilled: bool,
}

impl Material {
    fn new(domain: &[u8]) -> Self {
        let mut material = Material {
            hasher: Sha256::new(),
            buf: [0; MAX_MATERIAL],
            len: 0,
            spilled: false,
        };
        material.frame(domain);
        material
    }

    fn put(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(room) => {
                room.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.spill(bytes),
        }
    }

    /// [`put`](Self::put) of bytes that do not fit what is left of the
    /// buffer: they go to the hasher a buffer at a time.
    fn spill(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.len == self.buf.len() {
                self.hasher.update(self.buf);
                self.len = 0;
                self.spilled = true;
            }
            let take = bytes.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + take].copy_from_slice(&bytes[..take]);
            self.len += take;
            bytes = &bytes[take..];
        }
    }

    fn put_len(&mut self, len: usize) {
        // One byte, the common case, written in place.
        if len < 0x80 && self.len < self.buf.len() {
            self.buf[self.len] = len as u8;
            self.len += 1;
            return;
        }
        let mut encoded = [0u8; 10];
        let mut n = 0;
        let mut rest = len as u64;
        loop {
            let low = (rest & 0x7f) as u8;
            rest >>= 7;
            if rest == 0 {
                encoded[n] = low;
                n += 1;
                break;
            }
            encoded[n] = low | 0x80;
            n += 1;
        }
        self.put(&encoded[..n]);
    }

    fn frame(&mut self, bytes: &[u8]) {
        self.put_len(bytes.len());
        self.put(bytes);
    }

    /// [`frame`](Self::frame) with ASCII letters folded to lower case.
    fn frame_lowercase(&mut self, bytes: &[u8]) {
        self.put_len(bytes.len());
        for chunk in bytes.chunks(64) {
            let mut lower = [0u8; 64];
            for (out, byte) in lower.iter_mut().zip(chunk) {
                *out = byte.to_ascii_lowercase();
            }
            self.put(&lower[..chunk.len()]);
        }
    }

    /// The key made by `make` from the material's digest, remembered per
    /// thread under `prefix` (see [`recent`]): `make` must be a
    /// function of `prefix` and the material alone.
    fn key(self, prefix: &str, make: impl FnOnce([u8; 32]) -> Arc<str>) -> Arc<str> {
        if self.spilled {
            return make(self.finish());
        }
        let Material {
            hasher, buf, len, ..
        } = self;
        recent::get_or_make(&KEYS, prefix, &buf[..len], || {
            make(digest(hasher, &buf[..len]))
        })
    }

    fn finish(self) -> [u8; 32] {
        digest(self.hasher, &self.buf[..self.len])
    }
}

/// The SHA-256 of what `hasher` took, then `rest`.
fn digest(mut hasher: Sha256, rest: &[u8]) -> [u8; 32] {
    hasher.update(rest);
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&hasher.finalize());
    digest
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

/// The readable part of the keys of `path`: the escaped path, or its cut
/// form marked with `~`.
fn readable_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(MAX_READABLE_PATH + 1));
    push_readable_path(&mut out, path);
    out
}

/// Whether a readable part was cut.
fn is_cut(readable: &str) -> bool {
    readable.ends_with(CUT_MARK)
}

/// Whether `ch` is special in a key or in a `SCAN MATCH` glob (and so
/// percent-encoded in a key's readable path).
fn needs_escape(ch: char) -> bool {
    matches!(
        ch,
        '*' | '?' | '[' | ']' | '\\' | '{' | '}' | '#' | '%' | CUT_MARK | ' '
    ) || ch.is_ascii_control()
}

/// Appends `ch` to `out`, percent-encoded when it is special in a key or in a
/// `SCAN MATCH` glob.
fn push_escaped(out: &mut String, ch: char) {
    if needs_escape(ch) {
        let _ = write!(out, "%{:02X}", ch as u32);
    } else {
        out.push(ch);
    }
}

/// The key of one variant of a URL whose responses vary on `names`: the
/// base key with a hash of the request's values of those headers (each
/// header's field lines joined by `, ` and normalised, see
/// [`vary`](crate::vary)), so requests the origin cannot tell apart share
/// one variant. It keeps the base key's readable path and hash tag.
pub(crate) fn variant(base: &CacheKey, names: &[HeaderName], headers: &HeaderMap) -> CacheKey {
    let mut material = Material::new(VARIANT_DOMAIN);
    for name in names {
        material.frame(name.as_str().as_bytes());
        match crate::vary::value(headers, name) {
            None => material.put(&[0]),
            Some(value) => {
                material.put(&[1]);
                material.frame(value.as_bytes());
            }
        }
    }
    let storage = material.key(&base.storage, |digest| {
        let mut storage = String::with_capacity(base.storage.len() + 18);
        storage.push_str(&base.storage);
        storage.push_str(".v");
        push_hex(&mut storage, &digest[..8]);
        storage.into()
    });
    CacheKey { storage }
}

/// Lower-case hex digits.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `bytes` in lower-case hex. A table, not `write!("{:02x}")`:
/// the formatting machinery was a tenth of a memory hit's instructions.
pub(crate) fn push_hex(storage: &mut String, bytes: &[u8]) {
    for &byte in bytes {
        storage.push(char::from(HEX[usize::from(byte >> 4)]));
        storage.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
}

/// Escapes a path the way keys store it (for building prefix patterns).
pub(crate) fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for ch in path.chars() {
        push_escaped(&mut out, ch);
    }
    out
}

/// A path as prefix invalidation reads it: without a trailing `/` (so
/// `/users/` and `/users` select the same entries), `/` for the root.
fn prefix_path(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/"
    } else {
        trimmed
    }
}

/// Whether `path` is the root as a prefix (`/`, or only slashes).
pub(crate) fn is_root(path: &str) -> bool {
    prefix_path(path) == "/"
}

/// Whether the keys of `path` are among those of the prefix `prefix`.
pub(crate) fn under_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix_path(prefix);
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The keys of every entry (and rebuild lease) at `path` or under it:
/// `/users/42` selects `/users/42`, `/users/42?x=1` and `/users/42/posts`,
/// never `/users/420`. A prefix longer than the cut selects every key cut
/// the same way; one exactly as long as the cut also selects the keys cut
/// right after it (its children's, and siblings' sharing the cut).
pub(crate) fn prefix_pattern(namespace: &str, path: &str) -> KeyPattern {
    let path = prefix_path(path);
    if path == "/" {
        return KeyPattern::new(format!("{namespace}/"), After::Anything);
    }
    let readable = readable_path(path);
    let after = if is_cut(&readable) {
        // The path itself and everything under it are cut alike.
        After::Hash
    } else {
        After::Subtree {
            cut_here: readable.len() == MAX_READABLE_PATH,
        }
    };
    KeyPattern::new(format!("{namespace}{readable}"), after)
}

/// The keys of exactly `path` (every query string and variant of it, and
/// their leases), nothing under it: `{ns}{escaped path}#*`. A path longer
/// than the cut selects every key cut the same way.
pub(crate) fn path_pattern(namespace: &str, path: &str) -> KeyPattern {
    KeyPattern::new(format!("{namespace}{}", readable_path(path)), After::Hash)
}

/// `key` and every key made from it: its variants (`{key}.v…`) and the
/// leases of all of them.
pub(crate) fn key_pattern(key: &str) -> KeyPattern {
    KeyPattern::new(key.to_owned(), After::Anything)
}

/// The index sets an entry at `path` joins (prefix strategy `Index`): its
/// own path's and every ancestor's whose escaped form is not cut, and, when
/// its key is cut, the set of its cut form (which every path sharing the
/// cut joins).
pub(crate) fn index_sets(namespace: &str, path: &str) -> Vec<String> {
    let mut sets = Vec::new();
    let own = readable_path(path);
    if is_cut(&own) {
        sets.push(format!("{namespace}idx:{own}"));
    }
    // `/` escapes to itself: the ancestors of the escaped path are the
    // escaped ancestors.
    let escaped = escape_path(prefix_path(path));
    let mut current = escaped.as_str();
    loop {
        if current.len() <= MAX_READABLE_PATH {
            sets.push(format!("{namespace}idx:{current}"));
        }
        if current == "/" {
            return sets;
        }
        current = match current.rfind('/') {
            Some(0) | None => "/",
            Some(i) => &current[..i],
        };
    }
}

/// The index set of a path prefix: it holds every entry and lease at the
/// prefix or under it.
pub(crate) fn index_set(namespace: &str, path: &str) -> String {
    format!("{namespace}idx:{}", readable_path(prefix_path(path)))
}

/// The index set that holds the entries and leases of exactly `path` (and
/// others, which [`path_pattern`] tells apart).
pub(crate) fn path_index_set(namespace: &str, path: &str) -> String {
    index_set_of_readable(namespace, &readable_path(path))
}

/// The index set that holds `key` and its variants, when `key` is one of
/// the layer's keys in `namespace`.
pub(crate) fn key_index_set(namespace: &str, key: &str) -> Option<String> {
    let (readable, _hash) = key.strip_prefix(namespace)?.split_once('#')?;
    readable
        .starts_with('/')
        .then(|| index_set_of_readable(namespace, readable))
}

fn index_set_of_readable(namespace: &str, readable: &str) -> String {
    if is_cut(readable) {
        format!("{namespace}idx:{readable}")
    } else {
        // Escaped or not, a trailing `/` is a `/`.
        format!("{namespace}idx:{}", prefix_path(readable))
    }
}

/// The set that holds the keys of the entries tagged `tag`.
/// The set every rebuild lease and permit of `namespace` joins while tags
/// are in use: a tag invalidation removes them all, so a rebuild that read
/// the origin before it cannot store its result after it (its tags are
/// only known from its response, too late to join the tag's set).
pub(crate) fn inflight_set(namespace: &str) -> String {
    format!("{namespace}inflight")
}

pub(crate) fn tag_set(namespace: &str, tag: &str) -> String {
    format!("{namespace}tag:{}", escape_path(tag))
}

/// Whether a namespace is safe to put in front of keys and patterns.
pub(crate) fn valid_namespace(namespace: &str) -> bool {
    namespace
        .chars()
        .all(|c| !matches!(c, '*' | '?' | '[' | ']' | '\\' | '{' | '}' | '#') && !c.is_control())
}

/// A selection of keys: the entries (and rebuild leases) of a path prefix,
/// of one path, or of one key and its variants. Usable as a Redis
/// `SCAN MATCH` glob ([`glob`](Self::glob)) and as a predicate
/// ([`matches`](Self::matches)); both select the same keys.
///
/// Keys read `{namespace}{escaped path}#{{hash}}` (see the crate docs), so:
///
/// - a path prefix selects `{ns}{path}[#/]*`: the path itself (`#`) and the
///   paths under it (`/`), never `/users/420` for `/users/42`;
/// - one path selects `{ns}{path}#*`: all its query strings and variants,
///   nothing under it;
/// - one key selects `{key}*`: the key, its variants (`{key}.v…`) and their
///   leases.
///
/// A key keeps at most 512 bytes of its escaped path readable and marks a
/// cut with `~`. A path (or prefix) longer than that selects
/// `{ns}{cut}~#*`: its own keys, those under it and those of every other
/// path that shares the cut (more than asked, never less). A prefix whose
/// escaped form is exactly 512 bytes also selects the keys `{ns}{path}~#…`,
/// where its children's keys are cut (and siblings' that share the cut).
///
/// [`leases`](Self::leases) narrows any of these to the keys ending in
/// `:lease` under the selected ones.
///
/// ```
/// use tower_fence::store::KeyPattern;
///
/// let users_42 = KeyPattern::prefix("tf:", "/users/42");
/// assert_eq!(users_42.glob(), "tf:/users/42[#/]*");
/// assert!(users_42.matches("tf:/users/42/posts#{0f3c}"));
/// assert!(!users_42.matches("tf:/users/420#{0f3c}"));
///
/// let exactly = KeyPattern::path("tf:", "/users/42");
/// assert_eq!(exactly.glob(), "tf:/users/42#*");
/// assert!(exactly.matches("tf:/users/42#{0f3c}.v9a1b"));
/// assert!(!exactly.matches("tf:/users/42/posts#{0f3c}"));
/// assert_eq!(exactly.leases().glob(), "tf:/users/42#*:lease");
///
/// // Glob characters in a path are escaped in keys: they select nothing more.
/// assert_eq!(KeyPattern::prefix("tf:", "/a*").glob(), "tf:/a%2A[#/]*");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    /// Matched literally: a namespace and escaped path, or a whole key.
    stem: String,
    /// What must follow the stem.
    after: After,
    /// Only keys ending so (`:lease`), when set.
    suffix: &'static str,
}

/// What a [`KeyPattern`] wants right after its stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// Anything.
    Anything,
    /// `#`: the stem is one path's readable part.
    Hash,
    /// `#` or `/`: a path and what is under it; `~` too when the keys of
    /// the paths under it are cut right after the stem.
    Subtree { cut_here: bool },
}

impl KeyPattern {
    /// The keys (in `namespace`) of `path` and of every path under it. A
    /// trailing `/` is ignored; `/` selects the whole namespace.
    pub fn prefix(namespace: &str, path: &str) -> Self {
        prefix_pattern(namespace, path)
    }

    /// The keys (in `namespace`) of exactly `path`: all its query strings
    /// and variants, nothing under it.
    pub fn path(namespace: &str, path: &str) -> Self {
        path_pattern(namespace, path)
    }

    /// `key` and the keys made from it: its variants and their leases.
    pub fn key(key: &str) -> Self {
        key_pattern(key)
    }

    pub(crate) fn new(stem: String, after: After) -> Self {
        KeyPattern {
            stem,
            after,
            suffix: "",
        }
    }

    /// The same selection, narrowed to the rebuild leases (every selected
    /// key that ends in `:lease`).
    pub fn leases(&self) -> KeyPattern {
        KeyPattern {
            suffix: LEASE_SUFFIX,
            ..self.clone()
        }
    }

    /// The pattern as a Redis `MATCH` glob, e.g. `tf:/users/42[#/]*`. Glob
    /// characters in the stem (there are none in the layer's own keys) are
    /// escaped with `\`: they never widen the selection.
    pub fn glob(&self) -> String {
        let mut glob = String::with_capacity(self.stem.len() + 16);
        for ch in self.stem.chars() {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                glob.push('\\');
            }
            glob.push(ch);
        }
        glob.push_str(match self.after {
            After::Anything => "",
            After::Hash => "#",
            After::Subtree { cut_here: false } => "[#/]",
            After::Subtree { cut_here: true } => "[#/~]",
        });
        glob.push('*');
        glob.push_str(self.suffix);
        glob
    }

    /// Whether `key` is selected.
    pub fn matches(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(self.stem.as_str()) else {
            return false;
        };
        let rest = match self.after {
            After::Anything => Some(rest),
            After::Hash => rest.strip_prefix('#'),
            After::Subtree { cut_here } => rest
                .strip_prefix(['#', '/'])
                .or_else(|| rest.strip_prefix('~').filter(|_| cut_here)),
        };
        rest.is_some_and(|rest| rest.ends_with(self.suffix))
    }
}

const LEASE_SUFFIX: &str = ":lease";

/// The key of the rebuild lease of the entry under `key`. It shares the
/// entry's readable path (so a path-prefix invalidation removes it too) and
/// its hash tag (so it lives in the entry's cluster slot).
pub fn lease_key(key: &str) -> String {
    format!("{key}{LEASE_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};
    use proptest::prelude::*;

    /// Redis's `MATCH` glob, for the subset the patterns use: `*`, `[..]`
    /// and literal characters (the stems hold no other glob character).
    fn glob_matches(glob: &str, text: &str) -> bool {
        fn go(g: &[char], t: &[char]) -> bool {
            match g.first() {
                None => t.is_empty(),
                Some('*') => (0..=t.len()).any(|i| go(&g[1..], &t[i..])),
                Some('[') => {
                    let close = g.iter().position(|&c| c == ']').unwrap();
                    !t.is_empty() && g[1..close].contains(&t[0]) && go(&g[close + 1..], &t[1..])
                }
                Some(&c) => t.first() == Some(&c) && go(&g[1..], &t[1..]),
            }
        }
        let g: Vec<char> = glob.chars().collect();
        let t: Vec<char> = text.chars().collect();
        go(&g, &t)
    }

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

    /// The key SHA-256 gives for a `GET` of `path` on `example.com` under
    /// `namespace`, computed without the memo: a remembered key must be
    /// this one, whatever thread asks.
    fn unremembered(path: &str, namespace: &str) -> String {
        let mut material = Material::new(KEY_DOMAIN);
        material.frame(b"GET");
        material.frame_lowercase(b"example.com");
        material.frame(path.as_bytes());
        material.put(&[0]);
        material.put_len(0);
        let digest = material.finish();
        key_text(namespace, path, &digest[..16]).to_string()
    }

    #[test]
    fn remembered_keys_are_the_derived_keys() {
        let c = config();
        let want = unremembered("/users/42", "tf:");
        for _ in 0..3 {
            assert_eq!(key_of(&c, get("http://example.com/users/42")), want);
        }
        let other =
            std::thread::spawn(move || key_of(&config(), get("http://example.com/users/42")));
        assert_eq!(other.join().unwrap(), want);
        // Same material, another namespace: another key.
        let ns = KeyConfig {
            namespace: "other:".into(),
            headers: vec![],
        };
        let theirs = key_of(&ns, get("http://example.com/users/42"));
        assert_eq!(theirs, unremembered("/users/42", "other:"));
        assert_eq!(key_of(&c, get("http://example.com/users/42")), want);
        // Longer material than the memo keeps: still the same key each time.
        let long = format!("/{}", "p".repeat(MAX_MATERIAL));
        let once = key_of(&c, get(&format!("http://example.com{long}")));
        assert_eq!(once, unremembered(&long, "tf:"));
        assert_eq!(key_of(&c, get(&format!("http://example.com{long}"))), once);
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

    /// A `Host` that is not visible ASCII (obs-text, which `http` and hyper
    /// accept) is still part of the key: two such hosts, or one and none,
    /// never share a key.
    #[test]
    fn hosts_beyond_visible_ascii_are_told_apart() {
        let c = config();
        let with_host = |host: &[u8]| {
            let req = Request::get("/p")
                .header("host", HeaderValue::from_bytes(host).unwrap())
                .body(())
                .unwrap();
            key_of(&c, req)
        };
        let none = key_of(&c, get("/p"));
        let a = with_host(b"caf\xc3\xa9.example");
        let b = with_host(b"caf\xc3\xa8.example");
        assert_ne!(a, b);
        assert_ne!(a, none);
        assert_ne!(with_host(b"\xff"), none);
        // Case folds for ASCII letters only, as before.
        assert_eq!(with_host(b"A.example"), with_host(b"a.example"));
        assert_eq!(
            with_host(b"a.example"),
            key_of(&c, get("http://a.example/p"))
        );
        assert_eq!(with_host(b"CAF\xc3\xa9.example"), a);
    }

    #[test]
    fn keys_built_on_the_stack_are_the_escaped_keys() {
        let hash = [0xab; 16];
        let long = "/x".repeat(300);
        for path in [
            "/",
            "/users/42",
            "/caf\u{e9}",
            "/a b",
            "/a%20b",
            "/{x}",
            &long,
        ] {
            for ns in ["tf:", ""] {
                let built = key_text(ns, path, &hash);
                assert_eq!(&*built, key_string(ns, path, &hash), "{ns}{path}");
            }
        }
    }

    #[test]
    fn lengths_are_leb128_and_long_hosts_fold_case() {
        let encoded = |len: usize| {
            let mut material = Material::new(b"");
            material.len = 0;
            material.put_len(len);
            material.buf[..material.len].to_vec()
        };
        assert_eq!(encoded(0), [0]);
        assert_eq!(encoded(127), [0x7f]);
        assert_eq!(encoded(128), [0x80, 0x01]);
        assert_eq!(encoded(300), [0xac, 0x02]);
        let c = config();
        let host = |h: &str| {
            let req = Request::get("/p").header("host", h).body(()).unwrap();
            key_of(&c, req)
        };
        let long = "Sub.".repeat(40) + "Example";
        assert_eq!(host(&long), host(&long.to_ascii_lowercase()));
        assert_ne!(host(&long), host(&(long.clone() + "x")));
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

    #[test]
    fn variants_keep_the_path_and_hash_tag_and_differ_by_value() {
        let c = config();
        let base = derive_from(&c, &Method::GET, &"/p".parse().unwrap(), &HeaderMap::new());
        let names = [HeaderName::from_static("accept-language")];
        let mut en = HeaderMap::new();
        en.insert("accept-language", "en".parse().unwrap());
        let mut de = HeaderMap::new();
        de.insert("accept-language", " de ".parse().unwrap());
        let v_en = variant(&base, &names, &en);
        let v_de = variant(&base, &names, &de);
        assert_ne!(v_en, v_de);
        assert!(v_en.as_str().starts_with(base.as_str()));
        assert!(prefix_pattern("tf:", "/p").matches(v_en.as_str()));
        assert_eq!(v_en.as_str().matches('{').count(), 1);
        let mut de_trimmed = HeaderMap::new();
        de_trimmed.insert("accept-language", "de".parse().unwrap());
        assert_eq!(variant(&base, &names, &de_trimmed), v_de);
        // Normalised: one variant for lists that differ in whitespace and
        // case only, another for another order.
        let al = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("accept-language", v.parse().unwrap());
            variant(&base, &names, &h)
        };
        assert_eq!(al("en, fr"), al("EN,fr"));
        assert_ne!(al("en, fr"), al("fr, en"));
        assert_ne!(al(""), variant(&base, &names, &HeaderMap::new()));
    }

    #[test]
    fn prefix_patterns_select_the_path_and_below_only() {
        let c = config();
        let key = |uri: &str| key_of(&c, get(uri));
        let p = prefix_pattern("tf:", "/users/42");
        assert_eq!(p.glob(), "tf:/users/42[#/]*");
        assert!(p.matches(&key("/users/42")));
        assert!(p.matches(&key("/users/42?x=1")));
        assert!(p.matches(&key("/users/42/posts")));
        assert!(p.matches(&format!("{}:lease", key("/users/42/posts"))));
        assert!(!p.matches(&key("/users/420")));
        assert!(!p.matches(&key("/users/4")));
        assert!(!p.matches("tf:idx:/users/42"));
        assert_eq!(
            prefix_pattern("tf:", "/users/42/").glob(),
            "tf:/users/42[#/]*"
        );
        let root = prefix_pattern("tf:", "/");
        assert_eq!(root.glob(), "tf:/*");
        assert!(root.matches(&key("/anything/at/all")));
        assert!(!root.matches("tf:tag:x"));
        assert_eq!(p.leases().glob(), "tf:/users/42[#/]*:lease");
        assert!(!p.leases().matches(&key("/users/42")));
    }

    #[test]
    fn adversarial_paths_cannot_widen_a_pattern() {
        let c = config();
        let p = prefix_pattern("tf:", "/a*");
        assert_eq!(p.glob(), "tf:/a%2A[#/]*");
        assert!(p.matches(&key_of(&c, get("/a*/x"))));
        assert!(!p.matches(&key_of(&c, get("/ab/x"))));
        let p = prefix_pattern("tf:", "/[a-z]");
        assert!(!p.matches(&key_of(&c, get("/b"))));
        assert_eq!(p.glob(), "tf:/%5Ba-z%5D[#/]*");
    }

    #[test]
    fn path_patterns_select_the_path_only() {
        let c = config();
        let key = |uri: &str| key_of(&c, get(uri));
        let p = path_pattern("tf:", "/users/42");
        assert_eq!(p.glob(), "tf:/users/42#*");
        assert_eq!(p.leases().glob(), "tf:/users/42#*:lease");
        let own = key("/users/42?x=1");
        assert!(p.matches(&key("/users/42")));
        assert!(p.matches(&own));
        assert!(p.matches(&format!("{own}:lease")));
        // Variants, their leases, and permit-like leases of any of them.
        assert!(p.matches(&format!("{own}.v0123456789abcdef")));
        assert!(p
            .leases()
            .matches(&format!("{own}.v0123456789abcdef:lease")));
        assert!(p.leases().matches(&format!("{own}.p42:lease")));
        assert!(!p.leases().matches(&own));
        for other in [
            "/users/42/posts",
            "/users/42/",
            "/users/420",
            "/users/4",
            "/users",
        ] {
            assert!(!p.matches(&key(other)), "{other}");
            assert!(
                !p.leases().matches(&format!("{}:lease", key(other))),
                "{other}"
            );
        }
        let root = path_pattern("tf:", "/");
        assert_eq!(root.glob(), "tf:/#*");
        assert!(root.matches(&key("/")));
        assert!(root.matches(&key("/?page=2")));
        assert!(!root.matches(&key("/about")));
        assert!(!root.matches("tf:idx:/"));
        // Glob characters stay literal.
        assert_eq!(path_pattern("tf:", "/a*").glob(), "tf:/a%2A#*");
        assert!(!path_pattern("tf:", "/a*").matches(&key("/ab")));
    }

    #[test]
    fn key_patterns_select_the_key_its_variants_and_their_leases() {
        let c = config();
        let base = derive_from(
            &c,
            &Method::GET,
            &"/p?q=1".parse().unwrap(),
            &HeaderMap::new(),
        );
        let names = [HeaderName::from_static("accept-language")];
        let mut de = HeaderMap::new();
        de.insert("accept-language", "de".parse().unwrap());
        let variant = variant(&base, &names, &de);
        let p = key_pattern(base.as_str());
        for selected in [
            base.as_str().to_owned(),
            variant.as_str().to_owned(),
            format!("{}:lease", base.as_str()),
            format!("{}:lease", variant.as_str()),
            format!("{}.p7:lease", variant.as_str()),
        ] {
            assert!(p.matches(&selected), "{selected}");
            assert!(glob_matches(&p.glob(), &selected), "{selected}");
        }
        for other in ["/p", "/p?q=2", "/p/x?q=1"] {
            assert!(!p.matches(&key_of(&c, get(other))), "{other}");
        }
        // A key that is not the layer's cannot widen its pattern.
        let odd = key_pattern("x*[a]?\\");
        assert_eq!(odd.glob(), "x\\*\\[a\\]\\?\\\\*");
        assert!(!odd.matches("xyz"));
        assert!(odd.matches("x*[a]?\\.v1"));
        assert_eq!(
            key_index_set("tf:", base.as_str()).as_deref(),
            Some("tf:idx:/p")
        );
        assert_eq!(key_index_set("tf:", "other"), None);
    }

    #[test]
    fn index_sets_cover_the_path_and_its_ancestors() {
        assert_eq!(
            index_sets("tf:", "/users/42/posts/"),
            [
                "tf:idx:/users/42/posts",
                "tf:idx:/users/42",
                "tf:idx:/users",
                "tf:idx:/"
            ]
        );
        assert_eq!(index_sets("tf:", "/"), ["tf:idx:/"]);
        assert_eq!(index_set("tf:", "/users/"), "tf:idx:/users");
        assert_eq!(tag_set("tf:", "user:{42}"), "tf:tag:user:%7B42%7D");
    }

    #[test]
    fn long_paths_select_their_cut_keys() {
        let c = config();
        let key = |uri: &str| key_of(&c, get(uri));
        let long = format!("/l/{}", "a".repeat(600));
        let cut = &key(&long)["tf:".len()..key(&long).find('#').unwrap()];
        assert_eq!(cut.len(), MAX_READABLE_PATH + 1);
        assert!(cut.ends_with('~'));
        for p in [prefix_pattern("tf:", &long), path_pattern("tf:", &long)] {
            assert_eq!(p.glob(), format!("tf:{cut}#*"));
            assert!(p.matches(&key(&long)));
            assert!(p.matches(&key(&format!("{long}?x=1"))));
            assert!(p.matches(&key(&format!("{long}/child"))));
            assert!(!p.matches(&key("/l/a")));
        }
        // A prefix of exactly the readable length: its children are cut
        // right after it.
        let edge = format!("/e/{}", "b".repeat(MAX_READABLE_PATH - 3));
        assert_eq!(escape_path(&edge).len(), MAX_READABLE_PATH);
        let child = key(&format!("{edge}/c"));
        assert!(child.contains("b~#{"), "{child}");
        let p = prefix_pattern("tf:", &edge);
        assert_eq!(p.glob(), format!("tf:{edge}[#/~]*"));
        assert!(p.matches(&child));
        assert!(p.matches(&key(&edge)));
        assert!(!path_pattern("tf:", &edge).matches(&child));
        // Index sets: the cut form's, and the uncut ancestors'.
        let sets = index_sets("tf:", &format!("{long}/child"));
        assert_eq!(
            sets,
            [
                format!("tf:idx:{cut}"),
                "tf:idx:/l".into(),
                "tf:idx:/".into()
            ]
        );
        assert_eq!(index_set("tf:", &long), format!("tf:idx:{cut}"));
        assert_eq!(path_index_set("tf:", &long), format!("tf:idx:{cut}"));
        let sets = index_sets("tf:", &format!("{edge}/c"));
        assert!(sets.contains(&format!("tf:idx:{edge}~")));
        assert!(sets.contains(&index_set("tf:", &edge)));
        assert!(sets.contains(&path_index_set("tf:", &format!("{edge}/c"))));
    }

    /// Path segments of characters a URI path may hold, some escaped in
    /// keys (`*`, `~`, `%`): 1 to 3 bytes each once escaped.
    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9*~%.-]{1,24}"
    }

    /// Paths from a few bytes to a few times the readable length, many of
    /// them close to it.
    fn long_path() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::collection::vec(segment(), 1..60).prop_map(|s| format!("/{}", s.join("/"))),
            (490usize..530, segment()).prop_map(|(n, tail)| {
                let mut path = format!("/{}", "x".repeat(n));
                path.truncate(n.saturating_sub(tail.len()).max(1));
                path.push_str(&tail);
                path
            }),
        ]
    }

    /// A request from small alphabets, so that two of them often agree on
    /// some parts and not others.
    #[derive(Debug, Clone)]
    struct RequestParts {
        method: &'static str,
        authority: Option<&'static str>,
        host: Option<&'static [u8]>,
        path: &'static str,
        query: Option<&'static str>,
        tenant: Vec<&'static str>,
        other: Option<&'static str>,
    }

    impl RequestParts {
        fn request(&self) -> Request<()> {
            let mut uri = String::new();
            if let Some(authority) = self.authority {
                uri.push_str("http://");
                uri.push_str(authority);
            }
            uri.push_str(self.path);
            if let Some(query) = self.query {
                uri.push('?');
                uri.push_str(query);
            }
            let mut request = Request::builder().method(self.method).uri(uri);
            if let Some(host) = self.host {
                request = request.header("host", HeaderValue::from_bytes(host).unwrap());
            }
            for tenant in &self.tenant {
                request = request.header("x-tenant", *tenant);
            }
            if let Some(other) = self.other {
                request = request.header("x-other", other);
            }
            request.body(()).unwrap()
        }
    }

    /// `Host` values, two of them beyond visible ASCII.
    static HOSTS: &[&[u8]] = &[
        b"a.example",
        b"A.EXAMPLE",
        b"b.example",
        b"\xff",
        b"caf\xc3\xa9",
    ];

    fn request_parts() -> impl Strategy<Value = RequestParts> {
        use proptest::sample::select;
        (
            select(&["GET", "HEAD", "POST"][..]),
            proptest::option::of(select(
                &["a.example", "A.example", "b.example", "a.example:80"][..],
            )),
            proptest::option::of(select(HOSTS)),
            select(&["/", "/a", "/a/", "/A", "/a*", "/a%2A", "/a/b"][..]),
            proptest::option::of(select(&["", "x=1", "x=2"][..])),
            proptest::collection::vec(select(&["1", "2", ""][..]), 0..3),
            proptest::option::of(select(&["x", "y"][..])),
        )
            .prop_map(|(method, authority, host, path, query, tenant, other)| {
                RequestParts {
                    method,
                    authority,
                    host,
                    path,
                    query,
                    tenant,
                    other,
                }
            })
    }

    /// What a key depends on, as the module docs state it.
    fn identity(request: &Request<()>) -> (String, Vec<u8>, String, Option<String>, Vec<Vec<u8>>) {
        let method = if request.method() == Method::HEAD {
            Method::GET
        } else {
            request.method().clone()
        };
        let host = match request.uri().authority() {
            Some(a) => a.as_str().as_bytes().to_ascii_lowercase(),
            None => request
                .headers()
                .get("host")
                .map(|h| h.as_bytes().to_ascii_lowercase())
                .unwrap_or_default(),
        };
        (
            method.to_string(),
            host,
            request.uri().path().to_owned(),
            request.uri().query().map(str::to_owned),
            request
                .headers()
                .get_all("x-tenant")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
        )
    }

    proptest! {
        // For any path, however long: its prefix pattern selects its own
        // keys (any query) and those of the paths under it; its exact
        // pattern its own keys; the index sets it names are among those the
        // entries join. Glob and predicate agree.
        #[test]
        fn patterns_of_long_paths_select_their_keys(
            path in long_path(),
            below in segment(),
            query in "[a-z0-9=&]{0,8}",
        ) {
            let c = config();
            prop_assume!(path.parse::<Uri>().is_ok());
            let own = key_of(&c, get(&format!("{path}?{query}")));
            let child_path = format!("{}/{below}", path.trim_end_matches('/'));
            let child = key_of(&c, get(&child_path));
            let prefix = prefix_pattern("tf:", &path);
            let exact = path_pattern("tf:", &path);
            for (pattern, key) in [(&prefix, &own), (&prefix, &child), (&exact, &own)] {
                prop_assert!(pattern.matches(key), "{} misses {}", pattern.glob(), key);
                prop_assert!(glob_matches(&pattern.glob(), key));
                let lease = format!("{key}:lease");
                prop_assert!(pattern.leases().matches(&lease));
                prop_assert!(glob_matches(&pattern.leases().glob(), &lease));
            }
            prop_assert_eq!(exact.matches(&child), glob_matches(&exact.glob(), &child));
            let own_sets = index_sets("tf:", &path);
            prop_assert!(own_sets.contains(&index_set("tf:", &path)));
            prop_assert!(own_sets.contains(&path_index_set("tf:", &path)));
            let key_set = key_index_set("tf:", &own);
            prop_assert!(key_set.is_some_and(|set| own_sets.contains(&set)));
            prop_assert!(index_sets("tf:", &child_path).contains(&index_set("tf:", &path)));
        }

        // An escaped path used as a pattern matches only itself and what is
        // under it, whatever characters it holds.
        #[test]
        fn a_pattern_matches_only_its_own_subtree(a in "/[ -~]{0,12}", b in "/[ -~]{0,12}") {
            let pattern = prefix_pattern("tf:", &a);
            let escaped_b = escape_path(prefix_path(&b));
            let stored = format!("tf:{escaped_b}#{{00}}");
            let expected = {
                let a = prefix_path(&a);
                let b = prefix_path(&b);
                a == "/" || b == a || b.starts_with(&format!("{a}/"))
            };
            prop_assert_eq!(pattern.matches(&stored), expected, "{} vs {}", a, b);
            prop_assert_eq!(glob_matches(&pattern.glob(), &stored), expected);
        }

        // Any request parts: the key reads `{ns}{readable}#{32 hex}` with
        // one `{` and one `}`, the readable part is the escaped path or its
        // cut, no glob character, `#`, space or control in it; the path's
        // prefix and exact patterns select the key and its lease.
        #[test]
        fn keys_of_any_request_have_the_documented_shape(
            method in "[A-Z]{1,7}",
            target in prop_oneof![
                "/[ -~]{0,80}",
                "(http://[a-z.]{1,8})?/[a-z%~*]{500,530}",
                any::<String>(),
            ],
            host in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
            namespace in "[a-z:/%~]{0,6}",
        ) {
            let Ok(uri) = target.parse::<Uri>() else { return Ok(()) };
            let mut headers = HeaderMap::new();
            if let Some(host) = host.and_then(|h| HeaderValue::from_bytes(&h).ok()) {
                headers.insert(http::header::HOST, host);
            }
            let c = KeyConfig { namespace: namespace.clone(), headers: vec![] };
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let key = derive_from(&c, &method, &uri, &headers);
            let key = key.as_str();
            let again = derive_from(&c, &method, &uri, &headers);
            prop_assert_eq!(again.as_str(), key);
            let (readable, hash) = key[namespace.len()..].split_once('#').unwrap();
            prop_assert_eq!(key.matches('{').count(), 1);
            prop_assert_eq!(key.matches('}').count(), 1);
            prop_assert!(
                hash.len() == 34 && hash.starts_with('{') && hash.ends_with('}'),
                "{}",
                key
            );
            prop_assert!(hash[1..33].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            prop_assert!(
                !readable.contains(['*', '?', '[', ']', '\\', '{', '}', '#', ' ']),
                "{}",
                key
            );
            prop_assert!(!readable.chars().any(|c| c.is_ascii_control()));
            let escaped = escape_path(uri.path());
            if escaped.len() <= MAX_READABLE_PATH {
                prop_assert_eq!(readable, escaped.as_str());
            } else {
                let cut = readable.strip_suffix(CUT_MARK).unwrap();
                prop_assert!(cut.len() <= MAX_READABLE_PATH && escaped.starts_with(cut));
            }
            if uri.path().starts_with('/') {
                for pattern in [prefix_pattern(&namespace, uri.path()), path_pattern(&namespace, uri.path())] {
                    prop_assert!(pattern.matches(key), "{} misses {}", pattern.glob(), key);
                    prop_assert!(pattern.leases().matches(&lease_key(key)));
                }
            }
        }

        // Two requests share a key exactly when they agree on the method
        // (HEAD as GET), the host (the URI's authority, else the first
        // `Host`'s bytes; ASCII case aside), the path, the query and the
        // key header's values: no other header changes a key.
        #[test]
        fn keys_are_equal_exactly_when_what_they_key_on_is(
            a in request_parts(),
            b in request_parts(),
        ) {
            let c = KeyConfig {
                namespace: "tf:".into(),
                headers: vec![HeaderName::from_static("x-tenant")],
            };
            let (ra, rb) = (a.request(), b.request());
            let (ka, kb) = (
                derive_from(&c, ra.method(), ra.uri(), ra.headers()),
                derive_from(&c, rb.method(), rb.uri(), rb.headers()),
            );
            prop_assert_eq!(ka == kb, identity(&ra) == identity(&rb), "{:?} / {:?}", a, b);
        }

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
