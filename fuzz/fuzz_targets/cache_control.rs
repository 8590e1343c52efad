//! `Cache-Control` and `CDN-Cache-Control` parsing, and the storability
//! decision that reads them.
//!
//! Input: field lines as raw bytes or as directives (known names, any
//! arguments, any separators), an extension line, a `CDN-Cache-Control`
//! field, and the rest of a response (status, `Date`, `Expires`, `Age`,
//! `ETag`) and of its request (`Authorization`, `Cookie`), with layer
//! settings. Checks:
//!
//! - parsing never panics; a byte other than visible ASCII, space or tab
//!   makes the field unparseable; durations are at most 2^31 seconds;
//! - what a parsed field says comes from it: every directive read as set
//!   has its name in the field;
//! - the field lines' order, repeating them, joining them into one line
//!   with `, `, or adding a line of unknown directives changes nothing; an
//!   unparseable line spoils the whole field;
//! - a field that does not parse is never more cacheable than no field: a
//!   response with an unparseable `Cache-Control` or `CDN-Cache-Control` is
//!   not stored, a request with one bypasses the cache; a field that says
//!   nothing the layer knows decides exactly what no field decides;
//! - `CDN-Cache-Control`, when present, governs;
//! - a stored response satisfies what it was stored under: no `no-store`
//!   or `private`; times in order (as the codec requires); fresh on
//!   arrival unless kept to be validated; shared with `Authorization` or
//!   `Cookie` requests only when it said so; no stale window when it
//!   forbade serving stale; adding `private` or `no-store` to its governing
//!   field makes it unstorable.

#![no_main]

use std::time::{Duration, SystemTime};

use arbitrary::Arbitrary;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower_fence::fuzzing::{self, flags, CacheControl, PolicySettings, Stored, MAX_DELTA_SECONDS};

const NOW_SECS: u64 = 1_700_000_000;

#[derive(Arbitrary, Debug)]
struct Input {
    cache_control: Vec<Line>,
    cdn: Option<Vec<Line>>,
    extension: Line,
    status: u16,
    date: Option<When>,
    expires: Option<When>,
    age: Option<Vec<u8>>,
    etag: bool,
    authorized: bool,
    cookie: bool,
    default_ttl: u32,
    grace: u32,
    stale_if_error: u32,
}

#[derive(Arbitrary, Debug)]
enum Line {
    Raw(Vec<u8>),
    Directives(Vec<Directive>),
}

#[derive(Arbitrary, Debug)]
struct Directive {
    name: Name,
    upper: bool,
    arg: Option<Arg>,
    separator: u8,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Arg {
    Number(u64),
    Token(Vec<u8>),
    /// Escapes `"` and `\` when the flag is set.
    Quoted(Vec<u8>, bool),
}

/// A date relative to now, or any bytes.
#[derive(Arbitrary, Debug)]
enum When {
    Offset(i32),
    Raw(Vec<u8>),
}

const KNOWN: &[&str] = &[
    "no-store",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
    "max-stale",
    "min-fresh",
    "only-if-cached",
    "community",
    "x-ext",
];

const SEPARATORS: &[&str] = &[", ", ",", " , ", ",\t", ",,", " ,, ", ";", " ", ""];

impl Line {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Line::Raw(bytes) => bytes.clone(),
            Line::Directives(directives) => {
                let mut out = Vec::new();
                for (i, d) in directives.iter().enumerate() {
                    if i > 0 {
                        let sep = SEPARATORS[usize::from(d.separator) % SEPARATORS.len()];
                        out.extend_from_slice(sep.as_bytes());
                    }
                    let name = match &d.name {
                        Name::Known(k) => KNOWN[usize::from(*k) % KNOWN.len()].as_bytes().to_vec(),
                        Name::Raw(raw) => raw.clone(),
                    };
                    if d.upper {
                        out.extend(name.to_ascii_uppercase());
                    } else {
                        out.extend(name);
                    }
                    match &d.arg {
                        None => {}
                        Some(Arg::Number(n)) => out.extend(format!("={n}").into_bytes()),
                        Some(Arg::Token(t)) => {
                            out.push(b'=');
                            out.extend(t);
                        }
                        Some(Arg::Quoted(q, escape)) => {
                            out.extend(b"=\"");
                            for &b in q {
                                if *escape && (b == b'"' || b == b'\\') {
                                    out.push(b'\\');
                                }
                                out.push(b);
                            }
                            out.push(b'"');
                        }
                    }
                }
                out
            }
        }
    }
}

/// The lines `http` accepts as header values (others never reach the layer).
fn values(lines: &[Line]) -> Vec<HeaderValue> {
    lines
        .iter()
        .filter_map(|l| HeaderValue::from_bytes(&l.bytes()).ok())
        .collect()
}

fn with(base: &HeaderMap, name: &HeaderName, lines: &[HeaderValue]) -> HeaderMap {
    let mut map = base.clone();
    for line in lines {
        map.append(name.clone(), line.clone());
    }
    map
}

fn parse(name: &HeaderName, lines: &[HeaderValue]) -> Result<CacheControl, ()> {
    fuzzing::parse_cache_control(&with(&HeaderMap::new(), name, lines), name)
}

/// The parser's own properties, on the lines of one field.
fn check_parser(name: &HeaderName, lines: &[HeaderValue], extension: Option<&HeaderValue>) {
    let parsed = parse(name, lines);
    let beyond_ascii = lines
        .iter()
        .flat_map(|l| l.as_bytes())
        .any(|&b| b != b'\t' && !(b' '..=b'~').contains(&b));
    if beyond_ascii {
        assert_eq!(parsed, Err(()), "{lines:?}");
    }
    if let Ok(cc) = &parsed {
        check_sources(cc, lines);
        if !lines.is_empty() {
            let joined = lines
                .iter()
                .map(|l| l.as_bytes())
                .collect::<Vec<_>>()
                .join(&b", "[..]);
            let joined = HeaderValue::from_bytes(&joined).expect("joined lines are a value");
            assert_eq!(parse(name, &[joined]), parsed, "joining {lines:?}");
        }
    }
    let reversed: Vec<_> = lines.iter().rev().cloned().collect();
    assert_eq!(parse(name, &reversed), parsed, "reversing {lines:?}");
    let twice: Vec<_> = lines.iter().chain(lines).cloned().collect();
    assert_eq!(parse(name, &twice), parsed, "repeating {lines:?}");
    if let Some(extension) = extension {
        let more: Vec<_> = lines.iter().chain([extension]).cloned().collect();
        match parse(name, std::slice::from_ref(extension)) {
            Ok(cc) if cc == CacheControl::default() => {
                assert_eq!(parse(name, &more), parsed, "adding {extension:?}");
            }
            Err(()) => assert_eq!(parse(name, &more), Err(()), "adding {extension:?}"),
            Ok(_) => {}
        }
    }
}

/// Every directive read as set has its name in the field, and every
/// duration is within bounds.
fn check_sources(cc: &CacheControl, lines: &[HeaderValue]) {
    let text: String = lines
        .iter()
        .map(|l| {
            l.to_str()
                .expect("a parsed field is ASCII")
                .to_ascii_lowercase()
        })
        .collect::<Vec<_>>()
        .join(",");
    let said = |set: bool, name: &str| {
        assert!(!set || text.contains(name), "{name} read from {text:?}");
    };
    said(cc.no_store, "no-store");
    said(cc.no_cache, "no-cache");
    said(cc.private, "private");
    said(cc.public, "public");
    said(cc.must_revalidate, "must-revalidate");
    said(cc.proxy_revalidate, "proxy-revalidate");
    said(cc.max_age.is_some(), "max-age");
    said(cc.s_maxage.is_some(), "s-maxage");
    said(
        cc.stale_while_revalidate.is_some(),
        "stale-while-revalidate",
    );
    said(cc.stale_if_error.is_some(), "stale-if-error");
    said(cc.max_stale.is_some(), "max-stale");
    said(cc.min_fresh.is_some(), "min-fresh");
    said(cc.only_if_cached, "only-if-cached");
    for secs in [
        cc.max_age,
        cc.s_maxage,
        cc.stale_while_revalidate,
        cc.stale_if_error,
        cc.min_fresh,
    ]
    .into_iter()
    .flatten()
    {
        assert!(secs <= MAX_DELTA_SECONDS, "{secs} from {text:?}");
    }
    if let Some(secs) = cc.max_stale {
        assert!(secs <= MAX_DELTA_SECONDS || secs == u64::MAX);
    }
}

fn date(when: &When, now: SystemTime) -> Option<HeaderValue> {
    match when {
        When::Offset(secs) => {
            // Not before the epoch: `fmt_http_date` cannot write those.
            let delta = Duration::from_secs(u64::from(secs.unsigned_abs()));
            let at = if *secs >= 0 {
                now + delta
            } else {
                now.checked_sub(delta)
                    .filter(|at| *at >= SystemTime::UNIX_EPOCH)
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            };
            HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
        }
        When::Raw(bytes) => HeaderValue::from_bytes(bytes).ok(),
    }
}

fuzz_target!(|input: Input| {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW_SECS);
    let now_ms = NOW_SECS * 1000;
    let cdn_name = HeaderName::from_static("cdn-cache-control");
    let cc_lines = values(&input.cache_control);
    let cdn_lines = input.cdn.as_deref().map(values);
    let extension = HeaderValue::from_bytes(&input.extension.bytes()).ok();

    check_parser(&header::CACHE_CONTROL, &cc_lines, extension.as_ref());
    if let Some(cdn) = &cdn_lines {
        check_parser(&cdn_name, cdn, None);
    }

    // The response without and with the fields.
    let mut base = HeaderMap::new();
    if let Some(v) = input.date.as_ref().and_then(|w| date(w, now)) {
        base.insert(header::DATE, v);
    }
    if let Some(v) = input.expires.as_ref().and_then(|w| date(w, now)) {
        base.insert(header::EXPIRES, v);
    }
    if let Some(v) = input
        .age
        .as_ref()
        .and_then(|a| HeaderValue::from_bytes(a).ok())
    {
        base.insert(header::AGE, v);
    }
    if input.etag {
        base.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
    }
    let mut response = with(&base, &header::CACHE_CONTROL, &cc_lines);
    // A `CDN-Cache-Control` with no line that `http` accepts is absent.
    let cdn_lines = cdn_lines.filter(|l| !l.is_empty());
    if let Some(cdn) = &cdn_lines {
        response = with(&response, &cdn_name, cdn);
    }
    let Ok(status) = StatusCode::from_u16(input.status) else {
        return;
    };
    let settings = PolicySettings {
        default_ttl: Duration::from_secs(u64::from(input.default_ttl)),
        grace: Duration::from_secs(u64::from(input.grace)),
        stale_if_error: Duration::from_secs(u64::from(input.stale_if_error)),
    };
    let store = |headers: &HeaderMap| {
        fuzzing::storability(
            &settings,
            status,
            headers,
            input.authorized,
            input.cookie,
            now,
        )
    };
    let stored = store(&response);
    let without = store(&base);

    let general = parse(&header::CACHE_CONTROL, &cc_lines);
    let targeted = cdn_lines.as_ref().map(|l| parse(&cdn_name, l));
    let governing = fuzzing::governing_cache_control(&response);
    let status_refused = status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    match (&general, &targeted) {
        (Err(()), _) | (_, Some(Err(()))) => {
            assert_eq!(governing, Err(()));
            let expected = if status_refused {
                "status"
            } else {
                "cache-control"
            };
            assert_eq!(stored, Err(expected), "junk stored: {response:?}");
        }
        (Ok(cc), None) => assert_eq!(governing.as_ref(), Ok(cc)),
        (Ok(_), Some(Ok(cdn))) => assert_eq!(governing.as_ref(), Ok(cdn)),
    }
    if governing == Ok(CacheControl::default()) {
        assert_eq!(
            stored, without,
            "a field that says nothing decided: {response:?}"
        );
    }
    if let Ok(s) = stored {
        let g = governing.expect("stored under a field that parses");
        check_stored(&s, &g, &input, &base, now_ms, &settings);
        // Saying `private` or `no-store` as well makes it unstorable.
        let name = if cdn_lines.is_some() {
            &cdn_name
        } else {
            &header::CACHE_CONTROL
        };
        for (word, detail) in [("private", "private"), ("no-store", "no-store")] {
            let worse = with(&response, name, &[HeaderValue::from_static(word)]);
            assert_eq!(store(&worse), Err(detail), "{response:?} + {word}");
        }
    }

    // The request side: a request with the field.
    let request = with(&HeaderMap::new(), &header::CACHE_CONTROL, &cc_lines);
    let plan = fuzzing::plan_request(&Method::GET, &request);
    match &general {
        Err(()) => assert_eq!(plan, Err("cache-control")),
        Ok(cc) if *cc == CacheControl::default() => {
            assert_eq!(plan, fuzzing::plan_request(&Method::GET, &HeaderMap::new()));
        }
        Ok(cc) => {
            let allows = plan.expect("a GET with a parsed field is looked up");
            assert_eq!(allows.may_store, !cc.no_store);
            assert_eq!(allows.max_stale, cc.max_stale);
            assert_eq!(allows.only_if_cached, cc.only_if_cached);
        }
    }
});

fn check_stored(
    s: &Stored,
    g: &CacheControl,
    input: &Input,
    base: &HeaderMap,
    now_ms: u64,
    settings: &PolicySettings,
) {
    assert!(!g.no_store && !g.private, "stored despite {g:?}");
    assert!(s.stored_at_ms <= now_ms);
    assert!(s.fresh_until_ms >= s.stored_at_ms);
    assert!(s.stale_until_ms >= s.fresh_until_ms, "{s:?}");
    assert!(s.error_until_ms >= s.fresh_until_ms, "{s:?}");
    let has = |flag: u8| s.flags & flag != 0;
    assert!(
        s.fresh_until_ms > now_ms || (g.no_cache && base.contains_key(header::ETAG)),
        "stored stale: {s:?} {g:?}"
    );
    assert_eq!(has(flags::REVALIDATE), g.no_cache);
    if has(flags::AUTHORIZED_OK) {
        assert!(g.public || g.s_maxage.is_some() || g.must_revalidate);
    }
    if has(flags::COOKIE_OK) {
        assert!(g.public || g.s_maxage.is_some());
    }
    if input.authorized {
        assert!(
            has(flags::AUTHORIZED_OK),
            "shared with Authorization: {g:?}"
        );
    }
    if input.cookie {
        assert!(has(flags::COOKIE_OK), "shared with Cookie: {g:?}");
    }
    if has(flags::NO_STALE) || g.no_cache {
        assert_eq!(s.stale_until_ms, s.fresh_until_ms);
        assert_eq!(s.error_until_ms, s.fresh_until_ms);
    }
    if !base.contains_key(header::EXPIRES) {
        let longest = MAX_DELTA_SECONDS.max(settings.default_ttl.as_secs());
        assert!(s.fresh_until_ms - s.stored_at_ms <= longest * 1000, "{s:?}");
    }
}
