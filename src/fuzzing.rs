//! Entry points for the fuzz targets in `fuzz/` and the property tests.
//!
//! **Not part of the API.** This module is hidden from the docs, follows no
//! semver promise and may change or go away in any release. It exposes thin
//! wrappers over crate-private functions (the entry codec, key derivation,
//! `Cache-Control` parsing and the storability decision) that take and
//! return plain data, so that a fuzzer in another crate can reach them
//! without the crate making them public. Each wrapper calls the function the
//! layer calls, with nothing added.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

use crate::entry::{self, DecodeError, Entry};
use crate::key::{self, KeyConfig};
use crate::policy::{self, ClientCacheControl, Overrides, PolicyConfig, RequestPlan};

/// The largest delta-seconds value `Cache-Control` parsing yields
/// (RFC 9111 §1.2.2); numbers beyond it saturate there.
pub const MAX_DELTA_SECONDS: u64 = 2_147_483_648;

/// Bits of an entry's flags, as [`EntryParts::flags`] holds them.
pub mod flags {
    /// Stored, but validated before each use (`no-cache`).
    pub const REVALIDATE: u8 = crate::entry::flags::REVALIDATE;
    /// Never served stale (`must-revalidate`, `proxy-revalidate`, `s-maxage`).
    pub const NO_STALE: u8 = crate::entry::flags::NO_STALE;
    /// May answer a request with `Authorization`.
    pub const AUTHORIZED_OK: u8 = crate::entry::flags::AUTHORIZED_OK;
    /// May answer a request with `Cookie` or a credential header.
    pub const COOKIE_OK: u8 = crate::entry::flags::COOKIE_OK;
}

/// Why a record did not decode (the codec's own error, as plain data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeFailure {
    /// Not a tower-fence record (no magic bytes).
    NotAnEntry,
    /// A newer codec version: a miss, left in place.
    UnknownVersion(u8),
    /// An older codec version: a miss, deleted.
    RetiredVersion(u8),
    /// Written for another key.
    WrongKey,
    /// Ends before a field it announces.
    Truncated,
    /// A status, header name or header value is not valid HTTP, or the
    /// times are out of order.
    Invalid,
    /// Bytes after the last field.
    TrailingBytes,
}

impl From<DecodeError> for DecodeFailure {
    fn from(error: DecodeError) -> Self {
        match error {
            DecodeError::NotAnEntry => DecodeFailure::NotAnEntry,
            DecodeError::UnknownVersion(v) => DecodeFailure::UnknownVersion(v),
            DecodeError::RetiredVersion(v) => DecodeFailure::RetiredVersion(v),
            DecodeError::WrongKey => DecodeFailure::WrongKey,
            DecodeError::Truncated => DecodeFailure::Truncated,
            DecodeError::Invalid => DecodeFailure::Invalid,
            DecodeError::TrailingBytes => DecodeFailure::TrailingBytes,
        }
    }
}

/// Header field lines as bytes: `(name, value)`, in order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The fields of a cached response, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryParts {
    /// Status code.
    pub status: u16,
    /// Header field lines.
    pub headers: Fields,
    /// Body.
    pub body: Vec<u8>,
    /// Trailer field lines, when the response had trailers.
    pub trailers: Option<Fields>,
    /// When the response was generated (ms since the epoch).
    pub stored_at_ms: u64,
    /// Fresh until (ms since the epoch).
    pub fresh_until_ms: u64,
    /// Servable stale while refreshed until (ms since the epoch).
    pub stale_until_ms: u64,
    /// Servable stale on an origin error until (ms since the epoch).
    pub error_until_ms: u64,
    /// How long the rebuild took (ms).
    pub rebuild_ms: u32,
    /// [`flags`] bits.
    pub flags: u8,
    /// The request header values the response varies on (`None`: absent).
    pub vary: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// What a store key holds, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordParts {
    /// A response.
    Entry(EntryParts),
    /// A vary stub: the names of the request headers the URL varies on.
    Vary(Vec<Vec<u8>>),
}

/// A decoded store record (entry or vary stub). Equality is the codec's:
/// header maps compare as maps (the order of lines with the same name
/// counts, the order of different names does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record(entry::Record);

impl Record {
    /// Decodes a record read from the store key `key`, as a lookup does.
    pub fn decode(bytes: &[u8], key: &str) -> Result<Record, DecodeFailure> {
        entry::Record::decode(&Bytes::copy_from_slice(bytes), key)
            .map(Record)
            .map_err(DecodeFailure::from)
    }

    /// Encodes the record to be stored under `key`, as a fill does.
    pub fn encode(&self, key: &str) -> Vec<u8> {
        match &self.0 {
            entry::Record::Entry(entry) => entry.encode(key).to_vec(),
            entry::Record::Vary(names) => entry::Record::encode_vary(names, key).to_vec(),
        }
    }

    /// A record from plain data; `None` when a status, header name or
    /// header value is not valid HTTP (the layer never holds such a
    /// response). The times are taken as given, in any order.
    pub fn from_parts(parts: &RecordParts) -> Option<Record> {
        match parts {
            RecordParts::Vary(names) => names
                .iter()
                .map(|n| HeaderName::from_bytes(n).ok())
                .collect::<Option<Vec<_>>>()
                .map(|names| Record(entry::Record::Vary(names))),
            RecordParts::Entry(p) => {
                let vary = p
                    .vary
                    .iter()
                    .map(|(name, value)| {
                        let name = HeaderName::from_bytes(name).ok()?;
                        let value = match value {
                            None => None,
                            Some(v) => Some(HeaderValue::from_bytes(v).ok()?),
                        };
                        Some((name, value))
                    })
                    .collect::<Option<Vec<_>>>()?;
                let trailers = match &p.trailers {
                    None => None,
                    Some(fields) => Some(Box::new(header_map(fields)?)),
                };
                Some(Record(entry::Record::Entry(Entry {
                    status: StatusCode::from_u16(p.status).ok()?,
                    headers: header_map(&p.headers)?,
                    body: Bytes::copy_from_slice(&p.body),
                    trailers,
                    stored_at_ms: p.stored_at_ms,
                    fresh_until_ms: p.fresh_until_ms,
                    stale_until_ms: p.stale_until_ms,
                    error_until_ms: p.error_until_ms,
                    rebuild_ms: p.rebuild_ms,
                    flags: p.flags,
                    vary,
                })))
            }
        }
    }

    /// The record as plain data (header lines in the map's order: grouped
    /// by name, names in the order they first appeared).
    pub fn parts(&self) -> RecordParts {
        match &self.0 {
            entry::Record::Vary(names) => {
                RecordParts::Vary(names.iter().map(|n| n.as_str().into()).collect())
            }
            entry::Record::Entry(e) => RecordParts::Entry(EntryParts {
                status: e.status.as_u16(),
                headers: fields(&e.headers),
                body: e.body.to_vec(),
                trailers: e.trailers.as_deref().map(fields),
                stored_at_ms: e.stored_at_ms,
                fresh_until_ms: e.fresh_until_ms,
                stale_until_ms: e.stale_until_ms,
                error_until_ms: e.error_until_ms,
                rebuild_ms: e.rebuild_ms,
                flags: e.flags,
                vary: e
                    .vary
                    .iter()
                    .map(|(n, v)| (n.as_str().into(), v.as_ref().map(|v| v.as_bytes().into())))
                    .collect(),
            }),
        }
    }
}

/// A header map from field lines; `None` when one is not valid HTTP or
/// there are more names than a map holds.
pub fn header_map(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in fields {
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        map.try_append(name, value).ok()?;
    }
    Some(map)
}

fn fields(map: &HeaderMap) -> Fields {
    map.iter()
        .map(|(n, v)| (n.as_str().into(), v.as_bytes().into()))
        .collect()
}

/// The store key of a request with this head under `namespace` and the key
/// headers `key_headers` (no route rules), as the layer derives it.
pub fn cache_key(
    namespace: &str,
    key_headers: &[HeaderName],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> String {
    let config = KeyConfig {
        namespace: namespace.to_owned(),
        headers: key_headers.to_vec(),
    };
    key::derive_from(&config, method, uri, headers)
        .as_str()
        .to_owned()
}

/// Whether the layer accepts `namespace` (no glob, brace, `#` or control
/// character).
pub fn valid_namespace(namespace: &str) -> bool {
    key::valid_namespace(namespace)
}

/// A path escaped the way keys hold it.
pub fn escape_path(path: &str) -> String {
    key::escape_path(path)
}

/// The longest escaped path a key keeps readable (in bytes); longer ones
/// are cut and marked with `~`.
pub const MAX_READABLE_PATH: usize = key::MAX_READABLE_PATH;

/// The `Cache-Control` directives the layer acts on, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the directives' names
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
}

impl From<policy::CacheControl> for CacheControl {
    fn from(cc: policy::CacheControl) -> Self {
        CacheControl {
            no_store: cc.no_store,
            no_cache: cc.no_cache,
            private: cc.private,
            public: cc.public,
            must_revalidate: cc.must_revalidate,
            proxy_revalidate: cc.proxy_revalidate,
            max_age: cc.max_age,
            s_maxage: cc.s_maxage,
            stale_while_revalidate: cc.stale_while_revalidate,
            stale_if_error: cc.stale_if_error,
            max_stale: cc.max_stale,
            min_fresh: cc.min_fresh,
            only_if_cached: cc.only_if_cached,
        }
    }
}

/// The field lines of `name` in `headers` parsed as `Cache-Control`;
/// `Err(())` when the field does not parse. A `CDN-Cache-Control` must also
/// be a Structured Field Dictionary with integer seconds (RFC 9213 §2.1).
#[allow(clippy::result_unit_err)]
pub fn parse_cache_control(headers: &HeaderMap, name: &HeaderName) -> Result<CacheControl, ()> {
    if name.as_str() == "cdn-cache-control" {
        let lines = headers.get_all(name);
        if !policy::structured::is_cdn_cache_control(lines.iter().map(HeaderValue::as_bytes)) {
            return Err(());
        }
    }
    policy::CacheControl::parse(headers.get_all(name))
        .map(CacheControl::from)
        .map_err(|_| ())
}

/// The `Cache-Control` that governs a shared cache for a response with
/// `headers` (`CDN-Cache-Control` when present); `Err(())` when either field
/// does not parse.
#[allow(clippy::result_unit_err)]
pub fn governing_cache_control(headers: &HeaderMap) -> Result<CacheControl, ()> {
    policy::governing_cache_control(headers)
        .map(CacheControl::from)
        .map_err(|_| ())
}

/// The layer settings [`storability`] decides with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySettings {
    /// Freshness of a response that states none (cacheable statuses only).
    pub default_ttl: Duration,
    /// Stale-while-revalidate window when the response states none.
    pub grace: Duration,
    /// Stale-if-error window when the response states none.
    pub stale_if_error: Duration,
}

impl Default for PolicySettings {
    /// The layer's defaults.
    fn default() -> Self {
        PolicySettings {
            default_ttl: crate::DEFAULT_TTL,
            grace: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }
}

/// When a stored response may be served, as plain data (ms since the
/// epoch) with its [`flags`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// When the response was generated.
    pub stored_at_ms: u64,
    /// Fresh until.
    pub fresh_until_ms: u64,
    /// Servable stale while refreshed until.
    pub stale_until_ms: u64,
    /// Servable stale on an origin error until.
    pub error_until_ms: u64,
    /// [`flags`] bits.
    pub flags: u8,
}

/// Whether a response to a `GET` may be stored (no route rule), and until
/// when it is fresh and servable stale; `Err` holds the `Cache-Status`
/// detail. `authorized` and `cookie` say whether the request carried
/// `Authorization` and `Cookie`.
pub fn storability(
    settings: &PolicySettings,
    status: StatusCode,
    headers: &HeaderMap,
    authorized: bool,
    cookie: bool,
    now: SystemTime,
) -> Result<Stored, &'static str> {
    let config = policy_config(settings);
    let facts = policy::RequestFacts {
        authorized,
        cookie,
        may_store: true,
        ..policy::RequestFacts::default()
    };
    policy::storability(&config, &Overrides::default(), status, headers, &facts, now).map(|f| {
        Stored {
            stored_at_ms: f.stored_at_ms,
            fresh_until_ms: f.fresh_until_ms,
            stale_until_ms: f.stale_until_ms,
            error_until_ms: f.error_until_ms,
            flags: f.flags,
        }
    })
}

/// What a request's own directives allow, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestAllows {
    /// Its response may be stored (no `no-store`).
    pub may_store: bool,
    /// A stored response must be validated first.
    pub no_cache: bool,
    /// `max-age`.
    pub max_age: Option<u64>,
    /// `max-stale`.
    pub max_stale: Option<u64>,
    /// `min-fresh`.
    pub min_fresh: Option<u64>,
    /// `only-if-cached`.
    pub only_if_cached: bool,
}

/// How the layer plans a request with `method` and `headers` (client
/// directives obeyed): `Ok` for a lookup, `Err` with the `Cache-Status`
/// detail for a bypass.
pub fn plan_request(method: &Method, headers: &HeaderMap) -> Result<RequestAllows, &'static str> {
    let config = policy_config(&PolicySettings::default());
    match policy::plan_request(method, headers, ClientCacheControl::Obey, &config) {
        RequestPlan::Bypass(detail) => Err(detail),
        RequestPlan::Lookup(facts) => Ok(RequestAllows {
            may_store: facts.may_store,
            no_cache: facts.no_cache,
            max_age: facts.max_age,
            max_stale: facts.max_stale,
            min_fresh: facts.min_fresh,
            only_if_cached: facts.only_if_cached,
        }),
    }
}

fn policy_config(settings: &PolicySettings) -> PolicyConfig {
    PolicyConfig {
        default_ttl: settings.default_ttl,
        heuristic: None,
        grace: settings.grace,
        stale_if_error: settings.stale_if_error,
        cacheable_statuses: policy::DEFAULT_CACHEABLE_STATUSES.to_vec(),
        credential_headers: Vec::new(),
    }
}
