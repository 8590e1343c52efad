//! The `Cache-Status` response header (RFC 9211).

use std::cell::RefCell;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The name tower-fence gives itself in `Cache-Status`.
pub const CACHE_NAME: &str = "tower-fence";

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Why the request went forward to the inner service (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// Not consulted: configuration, method or a store failure.
    Bypass,
    /// No entry for the URI.
    UriMiss,
    /// An entry for the URI, but for other `Vary` header values.
    VaryMiss,
    /// An entry that matched, but was stale.
    Stale,
    /// The request's own directives (`no-cache`, `max-age`, credentials)
    /// ruled the stored response out.
    Request,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
            Fwd::Request => "request",
        }
    }
}

/// One cache's member of the `Cache-Status` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CacheStatus {
    pub(crate) hit: bool,
    pub(crate) fwd: Option<Fwd>,
    pub(crate) fwd_status: Option<u16>,
    /// Remaining freshness in seconds (negative when stale).
    pub(crate) ttl: Option<i64>,
    pub(crate) stored: bool,
    /// The request waited for another request's forward (RFC 9211 §2.6).
    pub(crate) collapsed: bool,
    pub(crate) detail: Option<&'static str>,
    /// A stale entry was served (not rendered: `ttl` and `detail` say it).
    pub(crate) served_stale: bool,
}

impl CacheStatus {
    pub(crate) fn hit(ttl_secs: i64) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(ttl_secs),
            ..CacheStatus::default()
        }
    }

    pub(crate) fn forward(fwd: Fwd) -> Self {
        CacheStatus {
            fwd: Some(fwd),
            ..CacheStatus::default()
        }
    }

    /// A request answered with a response another request fetched.
    pub(crate) fn collapsed(fwd: Fwd, fwd_status: u16) -> Self {
        CacheStatus {
            fwd: Some(fwd),
            fwd_status: Some(fwd_status),
            collapsed: true,
            ..CacheStatus::default()
        }
    }

    /// A stale entry served: `ttl` is negative.
    pub(crate) fn stale(ttl_secs: i64, detail: &'static str) -> Self {
        CacheStatus {
            hit: true,
            ttl: Some(ttl_secs),
            detail: Some(detail),
            served_stale: true,
            ..CacheStatus::default()
        }
    }

    pub(crate) fn bypass(detail: &'static str) -> Self {
        CacheStatus {
            fwd: Some(Fwd::Bypass),
            detail: Some(detail),
            ..CacheStatus::default()
        }
    }

    /// Renders the member, e.g. `tower-fence; fwd=uri-miss; fwd-status=200; stored`.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(64);
        self.write_to(&mut out);
        out
    }

    /// Writes the member to `out`, piece by piece.
    fn write_to(&self, out: &mut impl Out) {
        out.push(CACHE_NAME);
        if self.hit {
            out.push("; hit");
        }
        if let Some(fwd) = self.fwd {
            out.push("; fwd=");
            out.push(fwd.as_str());
        }
        if let Some(status) = self.fwd_status {
            out.push("; fwd-status=");
            out.push(Decimal::new(i64::from(status)).as_str());
        }
        if let Some(ttl) = self.ttl {
            out.push("; ttl=");
            out.push(Decimal::new(ttl).as_str());
        }
        if self.stored {
            out.push("; stored");
        }
        if self.collapsed {
            out.push("; collapsed");
        }
        if let Some(detail) = self.detail {
            out.push("; detail=");
            out.push(detail);
        }
    }

    /// The member as a header value: the one this thread made last when
    /// the member is the same (a hit's member changes once a second, with
    /// its `ttl`), else rendered on the stack and copied once into the
    /// value (one allocation, the value's own).
    fn header_value(&self) -> Option<HeaderValue> {
        let last = LAST_MEMBER
            .try_with(|last| {
                let last = last.try_borrow().ok()?;
                let (member, value) = last.as_ref()?;
                (member == self).then(|| value.clone())
            })
            .ok()
            .flatten();
        if last.is_some() {
            return last;
        }
        let value = self.rendered_value()?;
        let _ = LAST_MEMBER.try_with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                *last = Some((self.clone(), value.clone()));
            }
        });
        Some(value)
    }

    /// The member rendered into a new header value.
    fn rendered_value(&self) -> Option<HeaderValue> {
        let mut line = Line::default();
        self.write_to(&mut line);
        match line.overflowed {
            false => HeaderValue::from_bytes(line.as_bytes()).ok(),
            true => HeaderValue::from_str(&self.render()).ok(),
        }
    }

    /// Appends this member to the response's `Cache-Status` list: the cache
    /// closest to the user comes last (RFC 9211 §2).
    pub(crate) fn append_to(&self, headers: &mut HeaderMap) {
        if let Some(value) = self.header_value() {
            headers.append(CACHE_STATUS.clone(), value);
        }
    }

    /// Says what the cache did on `response`: its `Cache-Status` member,
    /// and the [`CacheOutcome`] in its extensions.
    pub(crate) fn stamp<B>(self, response: &mut http::Response<B>) {
        self.append_to(response.headers_mut());
        response
            .extensions_mut()
            .insert(CacheOutcome { status: self });
    }

    /// [`stamp`](Self::stamp) on a response's head.
    pub(crate) fn stamp_parts(self, parts: &mut http::response::Parts) {
        self.append_to(&mut parts.headers);
        parts.extensions.insert(CacheOutcome { status: self });
    }
}

/// Where a member is written.
trait Out {
    fn push(&mut self, text: &str);
}

impl Out for String {
    fn push(&mut self, text: &str) {
        self.push_str(text);
    }
}

/// A member rendered on the stack; `overflowed` when it did not fit (it
/// is then rendered again into a `String`).
struct Line {
    buf: [u8; 128],
    len: usize,
    overflowed: bool,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 128],
            len: 0,
            overflowed: false,
        }
    }
}

impl Line {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Out for Line {
    fn push(&mut self, text: &str) {
        let end = self.len + text.len();
        match self.buf.get_mut(self.len..end) {
            Some(room) => {
                room.copy_from_slice(text.as_bytes());
                self.len = end;
            }
            None => self.overflowed = true,
        }
    }
}

/// `00` to `99`: the values 0 to 99 as static slices.
const TWO_DIGITS: &str = "\
    00010203040506070809101112131415161718192021222324252627282930313233343536373839\
    40414243444546474849505152535455565758596061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

thread_local! {
    /// The last `Cache-Status` member this thread made a value of.
    static LAST_MEMBER: RefCell<Option<(CacheStatus, HeaderValue)>> = const { RefCell::new(None) };
    /// The last two numbers of 100 or more this thread made values of
    /// (a response's `Age` and `Content-Length`), and which goes next.
    static LAST_DECIMALS: RefCell<LastDecimals> = const { RefCell::new(([None, None], 0)) };
}

/// Two numbers and their header values, and the slot the next one takes.
type LastDecimals = ([Option<(u64, HeaderValue)>; 2], usize);

/// `value` as a header value (`Age`, `Content-Length`): below 100 a static
/// slice (no allocation); else one of the last two this thread made, when
/// it is the same number; else rendered on the stack and copied once.
pub(crate) fn decimal_value(value: u64) -> HeaderValue {
    if value < 100 {
        return new_decimal_value(value);
    }
    let last = LAST_DECIMALS
        .try_with(|last| {
            let last = last.try_borrow().ok()?;
            last.0
                .iter()
                .flatten()
                .find(|(n, _)| *n == value)
                .map(|(_, v)| v.clone())
        })
        .ok()
        .flatten();
    if let Some(made) = last {
        return made;
    }
    let made = new_decimal_value(value);
    let _ = LAST_DECIMALS.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            let (slots, next) = &mut *last;
            slots[*next % 2] = Some((value, made.clone()));
            *next = (*next + 1) % 2;
        }
    });
    made
}

/// [`decimal_value`] made anew: below 100 a static slice.
fn new_decimal_value(value: u64) -> HeaderValue {
    if value < 100 {
        let at = 2 * value as usize;
        let digits = match value {
            0..=9 => &TWO_DIGITS[at + 1..at + 2],
            _ => &TWO_DIGITS[at..at + 2],
        };
        return HeaderValue::from_static(digits);
    }
    i64::try_from(value)
        .ok()
        .and_then(|signed| HeaderValue::from_bytes(Decimal::new(signed).as_str().as_bytes()).ok())
        .unwrap_or_else(|| HeaderValue::from(value))
}

/// An integer in decimal, without the formatting machinery.
struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    fn new(value: i64) -> Self {
        let mut digits = [b'-'; 20];
        let mut start = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            // `digits` is pre-filled with `-`.
            start -= 1;
        }
        Decimal { digits, start }
    }

    fn as_str(&self) -> &str {
        // ASCII digits and `-` only.
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or("0")
    }
}

/// What the cache did for one response: in the response's extensions, so
/// that middleware (`TraceLayer`, metrics) and tests read it without
/// parsing `Cache-Status`, which says the same.
///
/// ```
/// use axum::{routing::get, Router};
/// use tower::ServiceExt;
/// use tower_fence::{CacheOutcome, FenceLayer, Served};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let app = Router::new()
///     .route("/", get(|| async { ([("cache-control", "max-age=60")], "hi") }))
///     .layer(FenceLayer::memory());
/// let get = || http::Request::get("/").body(axum::body::Body::empty()).unwrap();
/// let first = app.clone().oneshot(get()).await.unwrap();
/// let outcome = first.extensions().get::<CacheOutcome>().unwrap();
/// assert_eq!(outcome.served(), Served::Miss);
/// assert!(outcome.stored());
/// let second = app.oneshot(get()).await.unwrap();
/// assert_eq!(second.extensions().get::<CacheOutcome>().unwrap().served(), Served::Hit);
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOutcome {
    status: CacheStatus,
}

/// How a response was served; see [`CacheOutcome::served`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Served {
    /// From a fresh entry.
    Hit,
    /// From a stale entry: within grace while it refreshes, instead of an
    /// origin error or an unreachable origin, after a wait ran out, or to
    /// a request that accepted it (`max-stale`).
    Stale,
    /// With the response another request's rebuild fetched.
    Collapsed,
    /// By the inner service, for a cacheable request: no usable entry
    /// (missing, stale, another variant) or the request's own directives.
    Miss,
    /// By the inner service, without the cache: method, credentials, a
    /// route rule, a store failure and the like ([`CacheOutcome::detail`]).
    Bypass,
}

impl Served {
    /// `hit`, `stale`, `collapsed`, `miss` or `bypass`.
    pub fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Stale => "stale",
            Served::Collapsed => "collapsed",
            Served::Miss => "miss",
            Served::Bypass => "bypass",
        }
    }
}

impl CacheOutcome {
    /// How the response was served.
    pub fn served(&self) -> Served {
        let status = &self.status;
        if status.served_stale {
            Served::Stale
        } else if status.hit {
            Served::Hit
        } else if status.collapsed {
            Served::Collapsed
        } else if status.fwd == Some(Fwd::Bypass) {
            Served::Bypass
        } else {
            Served::Miss
        }
    }

    /// Why the request went forward (RFC 9211 `fwd`): `bypass`,
    /// `uri-miss`, `vary-miss`, `stale` or `request`; `None` for a hit.
    pub fn fwd(&self) -> Option<&'static str> {
        self.status.fwd.map(Fwd::as_str)
    }

    /// The status the inner service answered with, when it was asked.
    pub fn fwd_status(&self) -> Option<u16> {
        self.status.fwd_status
    }

    /// Remaining freshness of the entry served, in seconds (negative when
    /// stale).
    pub fn ttl(&self) -> Option<i64> {
        self.status.ttl
    }

    /// Whether the response was stored (or, for a body still streaming,
    /// is being recorded to be).
    pub fn stored(&self) -> bool {
        self.status.stored
    }

    /// Whether the request waited for another request's rebuild.
    pub fn collapsed(&self) -> bool {
        self.status.collapsed
    }

    /// The `detail` token: why the cache was bypassed, why stale was
    /// served, why a response was not stored.
    pub fn detail(&self) -> Option<&'static str> {
        self.status.detail
    }

    /// The `Cache-Status` member this outcome renders as.
    pub fn cache_status(&self) -> String {
        self.status.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211_members() {
        assert_eq!(CacheStatus::hit(42).render(), "tower-fence; hit; ttl=42");
        let miss = CacheStatus {
            fwd_status: Some(200),
            stored: true,
            ..CacheStatus::forward(Fwd::UriMiss)
        };
        assert_eq!(
            miss.render(),
            "tower-fence; fwd=uri-miss; fwd-status=200; stored"
        );
        assert_eq!(
            CacheStatus::collapsed(Fwd::UriMiss, 200).render(),
            "tower-fence; fwd=uri-miss; fwd-status=200; collapsed"
        );
        assert_eq!(
            CacheStatus::stale(-3, "stale-while-revalidate").render(),
            "tower-fence; hit; ttl=-3; detail=stale-while-revalidate"
        );
        assert_eq!(
            CacheStatus::bypass("store-timeout").render(),
            "tower-fence; fwd=bypass; detail=store-timeout"
        );
    }

    #[test]
    fn decimal_values_are_the_numbers() {
        for n in (0..=1000).chain([65_535, u64::from(u32::MAX), i64::MAX as u64, u64::MAX]) {
            assert_eq!(decimal_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn remembered_values_are_the_rendered_ones() {
        let members = [
            CacheStatus::hit(60),
            CacheStatus::hit(59),
            CacheStatus::stale(-3, "stale-while-revalidate"),
            CacheStatus::hit(60),
            CacheStatus::forward(Fwd::UriMiss),
            CacheStatus::forward(Fwd::UriMiss),
        ];
        for member in members.iter().chain(members.iter().rev()) {
            assert_eq!(member.header_value().unwrap(), member.render().as_str());
        }
        for n in [
            100,
            4096,
            100,
            100,
            4096,
            101,
            4096,
            100,
            u64::MAX,
            7,
            u64::MAX,
        ] {
            assert_eq!(decimal_value(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn numbers_render_exactly() {
        for n in [0, 7, -1, 42, -3600, 65535, i64::MAX, i64::MIN] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
            let status = CacheStatus::hit(n);
            assert_eq!(status.render(), format!("tower-fence; hit; ttl={n}"));
            assert_eq!(status.header_value().unwrap(), status.render().as_str());
        }
        let long = CacheStatus {
            fwd: Some(Fwd::VaryMiss),
            fwd_status: Some(65535),
            ttl: Some(i64::MIN),
            stored: true,
            collapsed: true,
            detail: Some("stale-while-revalidate"),
            ..CacheStatus::hit(0)
        };
        assert_eq!(long.header_value().unwrap(), long.render().as_str());
    }

    #[test]
    fn appends_after_upstream_members() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static("origin-cache; hit"),
        );
        CacheStatus::hit(1).append_to(&mut headers);
        let all: Vec<_> = headers.get_all(&CACHE_STATUS).iter().collect();
        assert_eq!(all, ["origin-cache; hit", "tower-fence; hit; ttl=1"]);
    }
}
