//! A cached response and its versioned binary codec.
//!
//! The layout is `MAGIC (2) | VERSION (1) | KEY | fixed fields | headers |
//! body | trailers | vary`, all integers big-endian, every variable part
//! length prefixed; `KEY` is the store key the record was written under, so
//! a record copied or renamed to another key is not served there (the key
//! itself rather than a digest of it: a comparison costs a hit nothing, a
//! hash of the key about a tenth of a memory hit). Decoding checks the key, every length and every header, so a record
//! that was truncated, written by another program or for another key decodes
//! to an error (the caller treats it as a miss and deletes it), never to a
//! panic and never to a wrong response. A record of a newer codec version is
//! an error the caller can tell apart ([`DecodeError::is_unknown_version`]):
//! during a rolling deploy it is a miss, but not deleted.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: [u8; 2] = *b"TF";
/// 2: the store key after the version.
const VERSION: u8 = 2;
/// The first bytes of every entry record of this codec version: what the
/// store's soft purge (`mark_stale.lua`) checks before it patches a record.
pub(crate) const ENTRY_HEAD: [u8; 3] = [MAGIC[0], MAGIC[1], VERSION];

/// Where an entry record's `fresh_until_ms` starts, for a record stored
/// under a key of `key_len` bytes: head (3), key length (4), key, status
/// (2), `stored_at_ms` (8). `mark_stale.lua` computes the same offset.
pub(crate) const fn fresh_until_offset(key_len: usize) -> usize {
    ENTRY_HEAD.len() + 4 + key_len + 2 + 8
}

/// Times from here on are left as they are by a soft purge: past what a
/// Lua number (a double) holds exactly, so `mark_stale.lua` could not move
/// them without rounding. They mean "for ever" (a window that saturated).
pub(crate) const UNSHIFTED_FROM_MS: u64 = 1 << 53;

/// A copy of the entry record `record` (stored under `key`) that is no
/// longer fresh from `at_ms` on: its `fresh_until_ms` lowered to `at_ms`
/// and its grace and stale-if-error ends moved as much earlier, so each
/// window now starts at `at_ms` (as after a natural expiry then; a time
/// of [`UNSHIFTED_FROM_MS`] or later stays). Everything else is as it was.
/// `None` when there is nothing to change: it is stale by then already, or
/// it is not an entry of this codec version written for `key` (a vary
/// stub, a record of another version, damaged bytes). `mark_stale.lua`
/// does the same in Redis.
pub(crate) fn mark_stale_record(record: &Bytes, key: &str, at_ms: u64) -> Option<Bytes> {
    let at = fresh_until_offset(key.len());
    let stored_key = record.get(ENTRY_HEAD.len() + 4..ENTRY_HEAD.len() + 4 + key.len())?;
    let key_len = record.get(ENTRY_HEAD.len()..ENTRY_HEAD.len() + 4)?;
    if record.get(..ENTRY_HEAD.len())? != ENTRY_HEAD
        || u32::from_be_bytes(key_len.try_into().ok()?) as usize != key.len()
        || stored_key != key.as_bytes()
    {
        return None;
    }
    let read = |offset: usize| -> Option<u64> {
        let field: [u8; 8] = record.get(offset..offset + 8)?.try_into().ok()?;
        Some(u64::from_be_bytes(field))
    };
    let (fresh, stale, error) = (read(at)?, read(at + 8)?, read(at + 16)?);
    if fresh <= at_ms {
        return None;
    }
    let shift = |until: u64| -> u64 {
        if fresh >= UNSHIFTED_FROM_MS || until >= UNSHIFTED_FROM_MS {
            until
        } else {
            until - (fresh - at_ms)
        }
    };
    let mut patched = BytesMut::from(&record[..]);
    patched[at..at + 8].copy_from_slice(&at_ms.to_be_bytes());
    patched[at + 8..at + 16].copy_from_slice(&shift(stale).to_be_bytes());
    patched[at + 16..at + 24].copy_from_slice(&shift(error).to_be_bytes());
    Some(patched.freeze())
}

/// Magic of a vary stub: the record under a URL whose responses vary.
const VARY_MAGIC: [u8; 2] = *b"TV";

/// What a key holds: an entry, or — for a URL whose responses vary on
/// request headers — a stub naming those headers, the variants living under
/// keys of their own (see `key::variant`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // decoded once per lookup, then moved
pub(crate) enum Record {
    Entry(Entry),
    Vary(Vec<HeaderName>),
}

impl Record {
    /// Decodes an entry or a vary stub read from the store key `key`.
    pub(crate) fn decode(record: &Bytes, key: &str) -> Result<Record, DecodeError> {
        if record.len() >= 2 && record[..2] == VARY_MAGIC {
            let mut buf = record.slice(2..);
            check_version(get_u8(&mut buf)?)?;
            check_key(&mut buf, key)?;
            let count = get_len(&mut buf)?;
            let mut names = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                names.push(
                    HeaderName::from_bytes(&get_bytes(&mut buf)?)
                        .map_err(|_| DecodeError::Invalid)?,
                );
            }
            if buf.has_remaining() {
                return Err(DecodeError::TrailingBytes);
            }
            return Ok(Record::Vary(names));
        }
        Entry::decode(record, key).map(Record::Entry)
    }

    /// A copy of a record decoded earlier, equal to what decoding it again
    /// gives (an entry's header map keeps the same room for the fields a
    /// response adds), made without parsing or checking it again.
    pub(crate) fn copy_to_serve(&self) -> Record {
        match self {
            Record::Entry(entry) => Record::Entry(Entry {
                status: entry.status,
                headers: copy_headers(&entry.headers, SERVED_HEADROOM),
                body: entry.body.clone(),
                trailers: entry.trailers.clone(),
                stored_at_ms: entry.stored_at_ms,
                fresh_until_ms: entry.fresh_until_ms,
                stale_until_ms: entry.stale_until_ms,
                error_until_ms: entry.error_until_ms,
                rebuild_ms: entry.rebuild_ms,
                flags: entry.flags,
                vary: entry.vary.clone(),
            }),
            Record::Vary(names) => Record::Vary(names.clone()),
        }
    }

    /// Encodes a vary stub naming `names`, to be stored under `key`.
    pub(crate) fn encode_vary(names: &[HeaderName], key: &str) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(&VARY_MAGIC);
        out.put_u8(VERSION);
        put_bytes(&mut out, key.as_bytes());
        put_len(&mut out, names.len());
        for name in names {
            put_bytes(&mut out, name.as_str().as_bytes());
        }
        out.freeze()
    }
}

/// Bits of [`Entry::flags`].
pub(crate) mod flags {
    /// `no-cache`: stored, but validated with the origin before each use
    /// (RFC 9111 §5.2.2.4).
    pub(crate) const REVALIDATE: u8 = 1;
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage`: never served
    /// stale, not even to a request with `max-stale` (RFC 9111 §5.2.2.2).
    pub(crate) const NO_STALE: u8 = 1 << 1;
    /// `public`, `s-maxage` or `must-revalidate`: may satisfy a request with
    /// `Authorization` (RFC 9111 §3.5).
    pub(crate) const AUTHORIZED_OK: u8 = 1 << 2;
    /// `public` or `s-maxage`, or stored on a route that keys by cookie or
    /// shares cookies: may satisfy a request with `Cookie` or a credential
    /// header.
    pub(crate) const COOKIE_OK: u8 = 1 << 3;
}

/// A stored response: what is replayed on a hit, and the times that decide
/// whether it may be.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// Boxed: rare (gRPC), and a box keeps every moved entry smaller.
    pub(crate) trailers: Option<Box<HeaderMap>>,
    /// When the response was generated, as far as this cache can tell
    /// (arrival time minus the `Age` it arrived with), in ms since the epoch.
    pub(crate) stored_at_ms: u64,
    /// Until when the entry is fresh (ms since the epoch).
    pub(crate) fresh_until_ms: u64,
    /// Until when the entry may be served stale while one request refreshes
    /// it (stale-while-revalidate, grace; ms since the epoch); never before
    /// `fresh_until_ms`.
    pub(crate) stale_until_ms: u64,
    /// Until when the entry may be served stale when the origin fails
    /// (stale-if-error; ms since the epoch); never before `fresh_until_ms`.
    pub(crate) error_until_ms: u64,
    /// How long the origin took to produce the response (XFetch's delta).
    pub(crate) rebuild_ms: u32,
    /// [`flags`] bits.
    pub(crate) flags: u8,
    /// The request header values the response varies on (`Vary`), as sent by
    /// the request that filled the entry: `None` when the header was absent.
    pub(crate) vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("status", &self.status)
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.len())
            .field("trailers", &self.trailers.as_ref().map(|t| t.len()))
            .field("stored_at_ms", &self.stored_at_ms)
            .field("fresh_until_ms", &self.fresh_until_ms)
            .field("stale_until_ms", &self.stale_until_ms)
            .field("error_until_ms", &self.error_until_ms)
            .field("rebuild_ms", &self.rebuild_ms)
            .finish()
    }
}

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The record does not start with the tower-fence magic bytes.
    NotAnEntry,
    /// Written by a newer codec version than this build knows (another
    /// instance, during a rolling deploy): a miss, but not to be deleted.
    UnknownVersion(u8),
    /// Written by an older codec version this build no longer reads.
    RetiredVersion(u8),
    /// Written for another key (copied or renamed there, or a collision):
    /// never served under this one.
    WrongKey,
    /// The record ends before a field it announces.
    Truncated,
    /// A status, header name or header value is not valid HTTP.
    Invalid,
    /// Bytes follow the last field.
    TrailingBytes,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::NotAnEntry => f.write_str("record is not a tower-fence entry"),
            DecodeError::UnknownVersion(v) => {
                write!(f, "entry codec version {v} is newer than this build knows")
            }
            DecodeError::RetiredVersion(v) => write!(f, "entry codec version {v} is retired"),
            DecodeError::WrongKey => f.write_str("entry record was written for another key"),
            DecodeError::Truncated => f.write_str("entry record is truncated"),
            DecodeError::Invalid => f.write_str("entry record holds invalid HTTP data"),
            DecodeError::TrailingBytes => f.write_str("entry record has trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// Whether the record was written by a newer codec version than this
    /// build knows: a miss, but one to leave in place (the newer instances
    /// still read it), unlike every other error.
    pub(crate) fn is_unknown_version(&self) -> bool {
        matches!(self, DecodeError::UnknownVersion(_))
    }
}

fn check_version(version: u8) -> Result<(), DecodeError> {
    match version.cmp(&VERSION) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(DecodeError::UnknownVersion(version)),
        std::cmp::Ordering::Less => Err(DecodeError::RetiredVersion(version)),
    }
}

/// Reads the key a record was written under and checks it is `key`.
fn check_key(buf: &mut Bytes, key: &str) -> Result<(), DecodeError> {
    if get_bytes(buf)? != key.as_bytes() {
        return Err(DecodeError::WrongKey);
    }
    Ok(())
}

/// The times that make a response an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// When the response was generated: now minus its `Age` (ms since epoch).
    pub(crate) stored_at_ms: u64,
    pub(crate) fresh_until_ms: u64,
    pub(crate) stale_until_ms: u64,
    pub(crate) error_until_ms: u64,
    /// Entry flags ([`flags`]).
    pub(crate) flags: u8,
}

impl Freshness {
    /// Stale from `now_ms` on, with no stale window: for responses given
    /// to the requests that waited for them but not stored.
    pub(crate) fn expired(now_ms: u64) -> Freshness {
        Freshness {
            stored_at_ms: now_ms,
            fresh_until_ms: now_ms,
            stale_until_ms: now_ms,
            error_until_ms: now_ms,
            flags: 0,
        }
    }
}

impl Entry {
    /// When the origin started to produce this entry (ms since the epoch):
    /// its generation time less its rebuild time. What the origin had
    /// before then may be in it; nothing later than then is sure to be.
    pub(crate) fn generated_ms(&self) -> u64 {
        self.stored_at_ms.saturating_sub(u64::from(self.rebuild_ms))
    }

    /// An entry of a response, with the times `freshness` gives and the
    /// rebuild time since `started`.
    pub(crate) fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<Box<HeaderMap>>,
        freshness: &Freshness,
        started: std::time::Instant,
        vary: Vec<(HeaderName, Option<HeaderValue>)>,
    ) -> Entry {
        Entry {
            status,
            headers,
            body,
            trailers,
            stored_at_ms: freshness.stored_at_ms,
            fresh_until_ms: freshness.fresh_until_ms,
            stale_until_ms: freshness.stale_until_ms,
            error_until_ms: freshness.error_until_ms,
            rebuild_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            flags: freshness.flags,
            vary,
        }
    }

    /// Encodes the entry into one contiguous value (one Redis `SET`), to be
    /// stored under `key`.
    pub(crate) fn encode(&self, key: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_hint() + key.len());
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        put_bytes(&mut out, key.as_bytes());
        out.put_u16(self.status.as_u16());
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.fresh_until_ms);
        out.put_u64(self.stale_until_ms);
        out.put_u64(self.error_until_ms);
        out.put_u32(self.rebuild_ms);
        out.put_u8(self.flags);
        put_headers(&mut out, &self.headers);
        put_len(&mut out, self.body.len());
        out.put_slice(&self.body);
        match &self.trailers {
            None => out.put_u8(0),
            Some(trailers) => {
                out.put_u8(1);
                put_headers(&mut out, trailers);
            }
        }
        put_len(&mut out, self.vary.len());
        for (name, value) in &self.vary {
            put_bytes(&mut out, name.as_str().as_bytes());
            match value {
                None => out.put_u8(0),
                Some(value) => {
                    out.put_u8(1);
                    put_bytes(&mut out, value.as_bytes());
                }
            }
        }
        out.freeze()
    }

    fn encoded_len_hint(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 8)
            .sum();
        64 + headers + self.body.len()
    }

    /// Decodes a record written by [`Entry::encode`], read from the store
    /// key `key`. The body is a zero-copy slice of `record`.
    pub(crate) fn decode(record: &Bytes, key: &str) -> Result<Entry, DecodeError> {
        let mut buf = record.clone();
        if buf.remaining() < MAGIC.len() || buf[..2] != MAGIC {
            return Err(DecodeError::NotAnEntry);
        }
        buf.advance(2);
        check_version(get_u8(&mut buf)?)?;
        check_key(&mut buf, key)?;
        let status = StatusCode::from_u16(get_u16(&mut buf)?).map_err(|_| DecodeError::Invalid)?;
        let stored_at_ms = get_u64(&mut buf)?;
        let fresh_until_ms = get_u64(&mut buf)?;
        let stale_until_ms = get_u64(&mut buf)?;
        let error_until_ms = get_u64(&mut buf)?;
        if stale_until_ms < fresh_until_ms || error_until_ms < fresh_until_ms {
            return Err(DecodeError::Invalid);
        }
        let rebuild_ms = get_u32(&mut buf)?;
        let flags = get_u8(&mut buf)?;
        let headers = get_headers(&mut buf, SERVED_HEADROOM)?;
        let body = get_bytes(&mut buf)?;
        let trailers = match get_u8(&mut buf)? {
            0 => None,
            1 => Some(Box::new(get_headers(&mut buf, 0)?)),
            _ => return Err(DecodeError::Invalid),
        };
        let vary_len = get_len(&mut buf)?;
        let mut vary = Vec::with_capacity(vary_len.min(64));
        for _ in 0..vary_len {
            let name =
                HeaderName::from_bytes(&get_bytes(&mut buf)?).map_err(|_| DecodeError::Invalid)?;
            let value = match get_u8(&mut buf)? {
                0 => None,
                1 => Some(
                    HeaderValue::from_maybe_shared(get_bytes(&mut buf)?)
                        .map_err(|_| DecodeError::Invalid)?,
                ),
                _ => return Err(DecodeError::Invalid),
            };
            vary.push((name, value));
        }
        if buf.has_remaining() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(Entry {
            status,
            headers,
            body,
            trailers,
            stored_at_ms,
            fresh_until_ms,
            stale_until_ms,
            error_until_ms,
            rebuild_ms,
            flags,
            vary,
        })
    }

    /// Milliseconds the entry stays fresh after `now_ms` (negative once stale).
    pub(crate) fn ttl_ms(&self, now_ms: u64) -> i64 {
        saturating_diff(self.fresh_until_ms, now_ms)
    }

    /// Whether a flag of [`flags`] is set.
    pub(crate) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether the entry is fresh at `now_ms`.
    pub(crate) fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms
    }

    /// Whole seconds since the response was generated (RFC 9111 §4.2.3).
    pub(crate) fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Whether the entry may be served stale while it is refreshed.
    pub(crate) fn in_grace(&self, now_ms: u64) -> bool {
        now_ms < self.stale_until_ms
    }

    /// Whether the entry may be served stale because the origin failed.
    pub(crate) fn usable_on_error(&self, now_ms: u64) -> bool {
        now_ms < self.error_until_ms
    }

    /// How long a store should keep the record: until the end of its last
    /// stale window, or -- when it has a validator (`ETag`, `Last-Modified`)
    /// to be revalidated with -- `keep_ms` past its freshness (Varnish's
    /// keep); at least one millisecond.
    pub(crate) fn store_ttl(&self, now_ms: u64, keep_ms: u64) -> Duration {
        let mut until = self.stale_until_ms.max(self.error_until_ms);
        if self.has_validator() {
            until = until.max(self.fresh_until_ms.saturating_add(keep_ms));
        }
        Duration::from_millis(until.saturating_sub(now_ms).max(1))
    }

    /// Whether the entry can be revalidated (has `ETag` or `Last-Modified`).
    pub(crate) fn has_validator(&self) -> bool {
        self.headers.contains_key(http::header::ETAG)
            || self.headers.contains_key(http::header::LAST_MODIFIED)
    }

    /// XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): whether a hit
    /// at `now_ms` should refresh the entry early. The chance grows as expiry
    /// nears, scaled by how long the rebuild took and by `beta`; `random` is
    /// uniform in (0, 1].
    pub(crate) fn xfetch_due(&self, now_ms: u64, beta: f64, random: f64) -> bool {
        if beta <= 0.0 || random.is_nan() || random <= 0.0 {
            return false;
        }
        let gap = -(f64::from(self.rebuild_ms)) * beta * random.ln();
        now_ms as f64 + gap >= self.fresh_until_ms as f64
    }
}

fn saturating_diff(a: u64, b: u64) -> i64 {
    let diff = i128::from(a) - i128::from(b);
    diff.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// The chunks of a body as one value (no copy for one chunk).
pub(crate) fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for chunk in &chunks {
                buf.extend_from_slice(chunk);
            }
            buf.freeze()
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn put_len(out: &mut BytesMut, len: usize) {
    // Bodies are capped far below 4 GiB by `max_body_size`; saturate anyway.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.put_slice(bytes);
}

fn put_headers(out: &mut BytesMut, headers: &HeaderMap) {
    put_len(out, headers.len());
    for (name, value) in headers {
        put_bytes(out, name.as_str().as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

fn get_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    buf.try_get_u8().map_err(|_| DecodeError::Truncated)
}

fn get_u16(buf: &mut Bytes) -> Result<u16, DecodeError> {
    buf.try_get_u16().map_err(|_| DecodeError::Truncated)
}

fn get_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    buf.try_get_u32().map_err(|_| DecodeError::Truncated)
}

fn get_u64(buf: &mut Bytes) -> Result<u64, DecodeError> {
    buf.try_get_u64().map_err(|_| DecodeError::Truncated)
}

fn get_len(buf: &mut Bytes) -> Result<usize, DecodeError> {
    let len = get_u32(buf)? as usize;
    // Every element takes at least one byte, so a length beyond what is left
    // is a lie: refuse it before allocating for it.
    if len > buf.remaining() {
        return Err(DecodeError::Truncated);
    }
    Ok(len)
}

fn get_bytes(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = get_len(buf)?;
    Ok(buf.split_to(len))
}

/// Room a decoded entry's header map keeps for the fields a response
/// served from it adds (`Accept-Ranges`, `Content-Length`, `Age`,
/// `Cache-Status`), so that serving it never grows the map.
const SERVED_HEADROOM: usize = 4;

/// A copy of `headers`, decoded earlier, with room for `headroom` more
/// fields: what [`get_headers`] would give again, without parsing or
/// checking a field again. (A `clone` would leave no room: the first field
/// a response adds would grow the map.)
fn copy_headers(headers: &HeaderMap, headroom: usize) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len().min(128) + headroom);
    for (name, value) in headers {
        if copy.try_append(name.clone(), value.clone()).is_err() {
            // Cannot happen (the fields fit in `headers`); a clone is
            // right too, only slower to serve.
            return headers.clone();
        }
    }
    copy
}

/// Reads a header block into a map with room for `headroom` more fields.
fn get_headers(buf: &mut Bytes, headroom: usize) -> Result<HeaderMap, DecodeError> {
    let count = get_len(buf)?;
    let mut headers = HeaderMap::with_capacity(count.min(128) + headroom);
    for _ in 0..count {
        let name = stored_name(&get_bytes(buf)?)?;
        let value =
            HeaderValue::from_maybe_shared(get_bytes(buf)?).map_err(|_| DecodeError::Invalid)?;
        // More distinct names than a map holds: `append` would panic.
        headers
            .try_append(name, value)
            .map_err(|_| DecodeError::Invalid)?;
    }
    Ok(headers)
}

/// A stored header name. Names are stored as `HeaderName::as_str` wrote
/// them (lowercase), so the fields most responses carry are matched as
/// they are, without `HeaderName::from_bytes` lowercasing a copy first.
fn stored_name(bytes: &[u8]) -> Result<HeaderName, DecodeError> {
    use http::header;
    let known = match bytes {
        b"content-type" => header::CONTENT_TYPE,
        b"content-length" => header::CONTENT_LENGTH,
        b"cache-control" => header::CACHE_CONTROL,
        b"content-encoding" => header::CONTENT_ENCODING,
        b"etag" => header::ETAG,
        b"last-modified" => header::LAST_MODIFIED,
        b"date" => header::DATE,
        b"expires" => header::EXPIRES,
        b"vary" => header::VARY,
        b"server" => header::SERVER,
        b"content-language" => header::CONTENT_LANGUAGE,
        b"content-security-policy" => header::CONTENT_SECURITY_POLICY,
        b"strict-transport-security" => header::STRICT_TRANSPORT_SECURITY,
        b"x-content-type-options" => header::X_CONTENT_TYPE_OPTIONS,
        b"access-control-allow-origin" => header::ACCESS_CONTROL_ALLOW_ORIGIN,
        b"accept-ranges" => header::ACCEPT_RANGES,
        _ => return HeaderName::from_bytes(bytes).map_err(|_| DecodeError::Invalid),
    };
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_header_names_are_the_parsed_ones() {
        let names = [
            "content-type",
            "content-length",
            "cache-control",
            "content-encoding",
            "etag",
            "last-modified",
            "date",
            "expires",
            "vary",
            "server",
            "content-language",
            "content-security-policy",
            "strict-transport-security",
            "x-content-type-options",
            "access-control-allow-origin",
            "accept-ranges",
            "x-custom",
        ];
        for name in names {
            let parsed = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(stored_name(name.as_bytes()), Ok(parsed.clone()), "{name}");
            assert_eq!(parsed.as_str(), name);
        }
        assert_eq!(
            stored_name(b"Content-Type"),
            Ok(http::header::CONTENT_TYPE),
            "another spelling still parses"
        );
        assert_eq!(stored_name(b"bad name"), Err(DecodeError::Invalid));
    }

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"hello"),
            trailers: Some(Box::new(trailers)),
            stored_at_ms: 1_000,
            fresh_until_ms: 61_000,
            stale_until_ms: 71_000,
            error_until_ms: 161_000,
            rebuild_ms: 42,
            flags: flags::REVALIDATE | flags::AUTHORIZED_OK,
            vary: vec![
                (
                    HeaderName::from_static("accept-encoding"),
                    Some(HeaderValue::from_static("gzip")),
                ),
                (HeaderName::from_static("accept-language"), None),
            ],
        }
    }

    const KEY: &str = "tf:/users/42#{3b0c}";

    #[test]
    fn round_trip_keeps_every_field_and_header_order() {
        let entry = sample();
        let decoded = Entry::decode(&entry.encode(KEY), KEY).unwrap();
        assert_eq!(decoded, entry);
        let multi: Vec<_> = decoded.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
    }

    #[test]
    fn a_copy_to_serve_is_what_decoding_again_gives() {
        let record = sample().encode(KEY);
        let decoded = Record::decode(&record, KEY).unwrap();
        let copy = decoded.copy_to_serve();
        assert_eq!(copy, Record::decode(&record, KEY).unwrap());
        let Record::Entry(copy) = copy else {
            panic!("an entry copies to an entry")
        };
        let order: Vec<_> = copy
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            order,
            [
                ("content-type", "text/plain"),
                ("x-multi", "a"),
                ("x-multi", "b")
            ],
            "every value, in order"
        );
        // Room for what a response adds, as a decoded map has.
        assert!(copy.headers.capacity() >= copy.headers.keys_len() + SERVED_HEADROOM);

        let names = vec![HeaderName::from_static("accept-language")];
        let stub = Record::decode(&Record::encode_vary(&names, KEY), KEY).unwrap();
        assert_eq!(stub.copy_to_serve(), Record::Vary(names));
    }

    #[test]
    fn marking_stale_starts_every_window_then() {
        let entry = sample();
        let record = entry.encode(KEY);
        let patched = mark_stale_record(&record, KEY, 5_000).unwrap();
        let decoded = Entry::decode(&patched, KEY).unwrap();
        // Fresh until then; grace (10 s) and stale-if-error (100 s) from
        // then on.
        assert_eq!(
            decoded,
            Entry {
                fresh_until_ms: 5_000,
                stale_until_ms: 15_000,
                error_until_ms: 105_000,
                ..entry.clone()
            }
        );
        // A window that saturated stays.
        let forever = Entry {
            error_until_ms: u64::MAX,
            ..entry.clone()
        };
        let patched_forever = mark_stale_record(&forever.encode(KEY), KEY, 5_000).unwrap();
        let decoded = Entry::decode(&patched_forever, KEY).unwrap();
        assert_eq!(
            (
                decoded.fresh_until_ms,
                decoded.stale_until_ms,
                decoded.error_until_ms
            ),
            (5_000, 15_000, u64::MAX)
        );
        // Stale already at that time, or exactly then: nothing to change.
        assert_eq!(mark_stale_record(&record, KEY, 61_000), None);
        assert_eq!(mark_stale_record(&patched, KEY, 9_000), None);
        // Not this key's entry, a vary stub, garbage, any cut: untouched.
        assert_eq!(mark_stale_record(&record, "tf:/other#{3b0c}", 5_000), None);
        let stub = Record::encode_vary(&[HeaderName::from_static("accept")], KEY);
        assert_eq!(mark_stale_record(&stub, KEY, 5_000), None);
        for cut in 0..fresh_until_offset(KEY.len()) + 8 {
            assert_eq!(mark_stale_record(&record.slice(..cut), KEY, 5_000), None);
        }
    }

    #[test]
    fn vary_stubs_round_trip_and_garbage_is_refused() {
        let names = vec![
            HeaderName::from_static("accept-language"),
            HeaderName::from_static("accept-encoding"),
        ];
        let stub = Record::encode_vary(&names, KEY);
        assert_eq!(Record::decode(&stub, KEY), Ok(Record::Vary(names)));
        for cut in 0..stub.len() {
            assert!(Record::decode(&stub.slice(..cut), KEY).is_err() || cut < 2);
        }
        let entry = sample();
        assert_eq!(
            Record::decode(&entry.encode(KEY), KEY),
            Ok(Record::Entry(entry))
        );
    }

    #[test]
    fn foreign_values_are_not_entries() {
        assert_eq!(
            Entry::decode(&Bytes::from_static(b"hello"), KEY),
            Err(DecodeError::NotAnEntry)
        );
        assert_eq!(
            Entry::decode(&Bytes::new(), KEY),
            Err(DecodeError::NotAnEntry)
        );
    }

    #[test]
    fn a_record_is_bound_to_its_key() {
        let other = "tf:/users/43#{77aa}";
        let entry = sample().encode(KEY);
        assert_eq!(Entry::decode(&entry, other), Err(DecodeError::WrongKey));
        assert_eq!(Record::decode(&entry, other), Err(DecodeError::WrongKey));
        let stub = Record::encode_vary(&[HeaderName::from_static("accept")], KEY);
        assert_eq!(Record::decode(&stub, other), Err(DecodeError::WrongKey));
        // Keys that differ in one byte, or only in length, differ.
        assert_eq!(
            Entry::decode(&entry, "tf:/users/42#{3b0d}"),
            Err(DecodeError::WrongKey)
        );
        assert_eq!(
            Entry::decode(&entry, "tf:/users/42#{3b0c}x"),
            Err(DecodeError::WrongKey)
        );
        assert!(!DecodeError::WrongKey.is_unknown_version());
    }

    #[test]
    fn newer_versions_are_unknown_and_older_ones_retired() {
        for record in [sample().encode(KEY), Record::encode_vary(&[], KEY)] {
            let with_version = |version: u8| {
                let mut record = BytesMut::from(&record[..]);
                record[2] = version;
                Record::decode(&record.freeze(), KEY)
            };
            let newer = with_version(VERSION + 1).unwrap_err();
            assert_eq!(newer, DecodeError::UnknownVersion(VERSION + 1));
            assert!(newer.is_unknown_version());
            assert_eq!(with_version(u8::MAX), Err(DecodeError::UnknownVersion(255)));
            let older = with_version(VERSION - 1).unwrap_err();
            assert_eq!(older, DecodeError::RetiredVersion(VERSION - 1));
            assert!(!older.is_unknown_version());
            assert_eq!(with_version(0), Err(DecodeError::RetiredVersion(0)));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let record = sample().encode(KEY);
        for cut in 0..record.len() {
            assert!(
                Entry::decode(&record.slice(..cut), KEY).is_err(),
                "cut at {cut}"
            );
        }
    }

    /// `sample()` without headers or trailers, encoded with the header
    /// block `count` lines long made by `line(i)`.
    fn with_header_block(count: u32, line: impl Fn(u32) -> (String, String)) -> Bytes {
        let record = Entry {
            headers: HeaderMap::new(),
            trailers: None,
            ..sample()
        }
        .encode(KEY);
        // Magic, version, the key, then the fixed fields; the empty header
        // block is its count alone.
        let block = 2 + 1 + 4 + KEY.len() + 2 + 8 * 4 + 4 + 1;
        assert_eq!(record[block..block + 4], [0, 0, 0, 0]);
        let mut out = BytesMut::from(&record[..block]);
        out.put_u32(count);
        for i in 0..count {
            let (name, value) = line(i);
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        out.put_slice(&record[block + 4..]);
        out.freeze()
    }

    /// A record with more distinct header names than an `http::HeaderMap`
    /// holds (24 576: it cannot grow past 2^15 slots) is an error, not the
    /// map's "size overflows MAX_SIZE" panic. The layer never writes one (a
    /// response's map cannot hold them); another program or a corrupted
    /// store can.
    #[test]
    fn more_header_names_than_a_map_holds_is_an_error() {
        let record = with_header_block(30_000, |i| (format!("x{i}"), String::new()));
        assert_eq!(Entry::decode(&record, KEY), Err(DecodeError::Invalid));
        assert_eq!(Record::decode(&record, KEY), Err(DecodeError::Invalid));
        // As many lines of one name are fine: a map holds them.
        let record = with_header_block(30_000, |_| ("x".into(), "1".into()));
        let decoded = Entry::decode(&record, KEY).unwrap();
        assert_eq!(decoded.headers.get_all("x").iter().count(), 30_000);
        // So are as many distinct names as a map holds.
        let record = with_header_block(24_576, |i| (format!("x{i}"), String::new()));
        assert_eq!(Entry::decode(&record, KEY).unwrap().headers.len(), 24_576);
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut record = BytesMut::from(&sample().encode(KEY)[..]);
        record.put_u8(0);
        assert_eq!(
            Entry::decode(&record.freeze(), KEY),
            Err(DecodeError::TrailingBytes)
        );
    }

    #[test]
    fn ttl_and_age_saturate() {
        let entry = sample();
        assert_eq!(entry.ttl_ms(0), 61_000);
        assert_eq!(entry.ttl_ms(u64::MAX), i64::MIN);
        assert_eq!(entry.age_secs(0), 0);
        assert_eq!(entry.age_secs(3_500), 2);
        assert_eq!(entry.store_ttl(u64::MAX, 0), Duration::from_millis(1));
        assert_eq!(entry.store_ttl(1_000, 0), Duration::from_millis(160_000));
        // Without a validator there is nothing to keep a stale entry for.
        assert_eq!(
            entry.store_ttl(1_000, 1_000_000),
            Duration::from_millis(160_000)
        );
        let mut validated = entry.clone();
        validated
            .headers
            .insert("etag", HeaderValue::from_static("\"v1\""));
        assert_eq!(
            validated.store_ttl(1_000, 1_000_000),
            Duration::from_millis(1_060_000)
        );
    }

    #[test]
    fn xfetch_refreshes_only_near_expiry() {
        let entry = sample(); // fresh until 61 s, rebuilt in 42 ms
                              // Far from expiry even an unlucky draw does not refresh.
        assert!(!entry.xfetch_due(1_000, 1.0, 1e-9));
        // At expiry every draw refreshes.
        assert!(entry.xfetch_due(61_000, 1.0, 0.5));
        // Just before expiry: a small draw does, a large one does not.
        assert!(entry.xfetch_due(60_990, 1.0, 0.01));
        assert!(!entry.xfetch_due(60_990, 1.0, 0.99));
        // beta 0 switches it off; a zero draw is refused.
        assert!(!entry.xfetch_due(61_000, 0.0, 0.5));
        assert!(!entry.xfetch_due(61_000, 1.0, 0.0));
    }

    fn header_name() -> impl Strategy<Value = HeaderName> {
        "[a-z][a-z0-9-]{0,20}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap())
    }

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        "[ -~]{0,40}".prop_map(|s| HeaderValue::from_str(&s).unwrap())
    }

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        proptest::collection::vec((header_name(), header_value()), 0..8).prop_map(|pairs| {
            let mut map = HeaderMap::new();
            for (n, v) in pairs {
                map.append(n, v);
            }
            map
        })
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            (100u16..1000).prop_map(|s| StatusCode::from_u16(s).unwrap()),
            header_map(),
            proptest::collection::vec(any::<u8>(), 0..2048),
            proptest::option::of(header_map()),
            any::<u64>(),
            any::<u64>(),
            (any::<u64>(), any::<u64>()),
            any::<u32>(),
            proptest::collection::vec((header_name(), proptest::option::of(header_value())), 0..4),
        )
            .prop_map(
                |(
                    status,
                    headers,
                    body,
                    trailers,
                    stored,
                    fresh,
                    (extra, error),
                    rebuild,
                    vary,
                )| Entry {
                    status,
                    headers,
                    body: Bytes::from(body),
                    trailers: trailers.map(Box::new),
                    stored_at_ms: stored,
                    fresh_until_ms: fresh,
                    stale_until_ms: fresh.saturating_add(extra % 1_000_000),
                    error_until_ms: fresh.saturating_add(error % 1_000_000),
                    rebuild_ms: rebuild,
                    flags: (rebuild % 16) as u8,
                    vary,
                },
            )
    }

    /// Store keys as the layer writes them, and anything else.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof!["tf:/[a-z/%]{0,30}#\\{[0-9a-f]{8}\\}", any::<String>()]
    }

    fn names() -> impl Strategy<Value = Vec<HeaderName>> {
        proptest::collection::vec(header_name(), 0..4)
    }

    fn encode_record(record: &Record, key: &str) -> Bytes {
        match record {
            Record::Entry(entry) => entry.encode(key),
            Record::Vary(names) => Record::encode_vary(names, key),
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(entry in entry(), key in key()) {
            prop_assert_eq!(Entry::decode(&entry.encode(&key), &key).unwrap(), entry.clone());
            prop_assert_eq!(
                Record::decode(&entry.encode(&key), &key).unwrap(),
                Record::Entry(entry)
            );
        }

        #[test]
        fn vary_stubs_round_trip(names in names(), key in key()) {
            prop_assert_eq!(
                Record::decode(&Record::encode_vary(&names, &key), &key).unwrap(),
                Record::Vary(names)
            );
        }

        #[test]
        fn decoding_under_another_key_fails(
            entry in entry(),
            names in names(),
            key in key(),
            other in key(),
        ) {
            prop_assume!(key != other);
            prop_assert_eq!(
                Entry::decode(&entry.encode(&key), &other),
                Err(DecodeError::WrongKey)
            );
            prop_assert_eq!(
                Record::decode(&entry.encode(&key), &other),
                Err(DecodeError::WrongKey)
            );
            prop_assert_eq!(
                Record::decode(&Record::encode_vary(&names, &key), &other),
                Err(DecodeError::WrongKey)
            );
        }

        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            key in key(),
        ) {
            let _ = Entry::decode(&Bytes::from(bytes.clone()), &key);
            let mut stub = b"TV".to_vec();
            stub.extend(bytes);
            let _ = Record::decode(&Bytes::from(stub), &key);
        }

        #[test]
        fn garbage_after_a_valid_header_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..512),
            key in key(),
        ) {
            // Magic, version and the right key: the rest is garbage.
            for magic in [MAGIC, VARY_MAGIC] {
                let mut record = BytesMut::from(&magic[..]);
                record.put_u8(VERSION);
                put_bytes(&mut record, key.as_bytes());
                record.put_slice(&tail);
                let record = record.freeze();
                let _ = Entry::decode(&record, &key);
                let _ = Record::decode(&record, &key);
            }
        }

        /// A valid record damaged anywhere (bytes set, inserted, removed)
        /// decodes to an error, or to a record whose times are in order,
        /// that re-encodes to bytes decoding to itself (canonically), and
        /// that another key refuses.
        #[test]
        fn damaged_records_decode_to_errors_or_consistent_records(
            entry in entry(),
            names in names(),
            stub in any::<bool>(),
            key in key(),
            other in key(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let mut bytes = if stub {
                Record::encode_vary(&names, &key).to_vec()
            } else {
                entry.encode(&key).to_vec()
            };
            for (at, byte, kind) in edits {
                let i = at % (bytes.len() + 1);
                match kind {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => {}
                }
            }
            let bytes = Bytes::from(bytes);
            if let Ok(record) = Record::decode(&bytes, &key) {
                if let Record::Entry(e) = &record {
                    prop_assert!(e.stale_until_ms >= e.fresh_until_ms);
                    prop_assert!(e.error_until_ms >= e.fresh_until_ms);
                }
                let again = encode_record(&record, &key);
                let decoded = Record::decode(&again, &key).unwrap();
                prop_assert_eq!(&decoded, &record);
                prop_assert_eq!(encode_record(&decoded, &key), again);
                if other != key {
                    prop_assert_eq!(Record::decode(&bytes, &other), Err(DecodeError::WrongKey));
                }
            }
        }

        /// Every proper prefix of a record is an error.
        #[test]
        fn every_prefix_of_any_record_is_an_error(
            entry in entry(),
            names in names(),
            key in key(),
            cut in any::<usize>(),
        ) {
            for record in [entry.encode(&key), Record::encode_vary(&names, &key)] {
                let cut = cut % record.len();
                prop_assert!(Record::decode(&record.slice(..cut), &key).is_err(), "cut at {}", cut);
            }
        }

        /// An entry whose stale or error window ends before its freshness
        /// is refused, never served with a negative window.
        #[test]
        fn out_of_order_times_are_refused(
            entry in entry(),
            key in key(),
            early in 1u64..1_000_000,
            which in any::<bool>(),
        ) {
            prop_assume!(entry.fresh_until_ms >= early);
            let mut entry = entry;
            if which {
                entry.stale_until_ms = entry.fresh_until_ms - early;
            } else {
                entry.error_until_ms = entry.fresh_until_ms - early;
            }
            prop_assert_eq!(Entry::decode(&entry.encode(&key), &key), Err(DecodeError::Invalid));
        }

        #[test]
        fn flipped_bytes_never_panic(
            entry in entry(),
            key in key(),
            index in any::<usize>(),
            byte in any::<u8>(),
        ) {
            let mut record = BytesMut::from(&entry.encode(&key)[..]);
            let i = index % record.len();
            record[i] = byte;
            let _ = Entry::decode(&record.freeze(), &key);
        }
    }
}
