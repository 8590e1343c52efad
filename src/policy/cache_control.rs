//! `Cache-Control` parsing (RFC 9111 §5.2).

use http::header::{GetAll, HeaderValue};

/// The largest delta-seconds value a cache must represent (RFC 9111 §1.2.2).
pub(crate) const MAX_DELTA_SECONDS: u64 = 2_147_483_648;

/// The directives tower-fence acts on, from every `Cache-Control` field line
/// of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    /// Request only: `max-stale` (`u64::MAX` when given without a value).
    pub(crate) max_stale: Option<u64>,
    /// Request only: `min-fresh`.
    pub(crate) min_fresh: Option<u64>,
    /// Request only: `only-if-cached`.
    pub(crate) only_if_cached: bool,
}

/// A `Cache-Control` (or `CDN-Cache-Control`) field that cannot be read: a
/// byte that is not visible ASCII, an unbalanced quote, a directive name that
/// is not a token, a value that is neither a token nor a quoted string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unparseable;

impl CacheControl {
    /// Parses every field line (RFC 9111 §5.2, the list syntax of RFC 9110
    /// §5.6.1): `#( token [ "=" ( token / quoted-string ) ] )`, empty list
    /// members and optional whitespace around them allowed. Unknown
    /// directives are ignored; a duration that is not a number counts as 0
    /// (stale), the conservative reading; numbers saturate at
    /// [`MAX_DELTA_SECONDS`].
    ///
    /// A field line that does not follow the syntax makes the whole field
    /// [`Unparseable`]: what it would have said (`private`, `no-store`) is
    /// unknown, so the caller must not read it as saying nothing.
    /// Obsolete text (bytes 0x80–0xFF, RFC 9110 §5.5) counts as unparseable
    /// too, even inside a quoted string.
    pub(crate) fn parse(values: GetAll<'_, HeaderValue>) -> Result<Self, Unparseable> {
        let mut cc = CacheControl::default();
        for value in values {
            let text = value.to_str().map_err(|_| Unparseable)?;
            for (name, arg) in directives(text)? {
                let arg = arg.as_deref();
                let seconds = || arg.map(delta_seconds).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    // `no-cache="field"` and `private="field"` name fields
                    // not to reuse; treating them as unqualified is the safe
                    // reading (RFC 9111 §5.2.2.4, §5.2.2.7).
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "max-age" => cc.max_age = Some(min_opt(cc.max_age, seconds())),
                    "s-maxage" => cc.s_maxage = Some(min_opt(cc.s_maxage, seconds())),
                    "stale-while-revalidate" => {
                        cc.stale_while_revalidate =
                            Some(min_opt(cc.stale_while_revalidate, seconds()));
                    }
                    "stale-if-error" => {
                        cc.stale_if_error = Some(min_opt(cc.stale_if_error, seconds()));
                    }
                    "max-stale" => {
                        let accepted = arg.map(delta_seconds).unwrap_or(u64::MAX);
                        cc.max_stale = Some(min_opt(cc.max_stale, accepted));
                    }
                    // The larger margin is the more demanding one.
                    "min-fresh" => cc.min_fresh = Some(cc.min_fresh.unwrap_or(0).max(seconds())),
                    "only-if-cached" => cc.only_if_cached = true,
                    _ => {}
                }
            }
        }
        Ok(cc)
    }
}

/// A directive given twice is read as its most conservative value: the
/// shorter lifetime, the shorter stale window, the longer `min-fresh`.
/// So the order of directives and of field lines never matters.
fn min_opt(current: Option<u64>, new: u64) -> u64 {
    current.map_or(new, |c| c.min(new))
}

/// The directives of one field line, names as given and arguments
/// unquoted; `Err` when the line does not follow the syntax.
fn directives(text: &str) -> Result<Vec<(&str, Option<String>)>, Unparseable> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        // OWS, then a directive or nothing (an empty list member).
        i = skip_ows(bytes, i);
        if i == bytes.len() {
            return Ok(out);
        }
        if bytes[i] != b',' {
            let start = i;
            i = skip_token(bytes, i);
            if i == start {
                return Err(Unparseable);
            }
            let name = &text[start..i];
            let mut arg = None;
            if bytes.get(i) == Some(&b'=') {
                i += 1;
                if bytes.get(i) == Some(&b'"') {
                    let (value, end) = quoted_string(bytes, i)?;
                    arg = Some(value);
                    i = end;
                } else {
                    let start = i;
                    i = skip_token(bytes, i);
                    if i == start {
                        return Err(Unparseable);
                    }
                    arg = Some(text[start..i].to_owned());
                }
            }
            out.push((name, arg));
            i = skip_ows(bytes, i);
            if i == bytes.len() {
                return Ok(out);
            }
        }
        // Only a comma may follow a directive.
        if bytes[i] != b',' {
            return Err(Unparseable);
        }
        i += 1;
    }
}

fn skip_ows(bytes: &[u8], mut i: usize) -> usize {
    while matches!(bytes.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

fn skip_token(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|&b| is_tchar(b)) {
        i += 1;
    }
    i
}

/// `tchar` (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The quoted string starting at `bytes[start]` (a `"`), unescaped, and the
/// index just past its closing quote (RFC 9110 §5.6.4).
fn quoted_string(bytes: &[u8], start: usize) -> Result<(String, usize), Unparseable> {
    let mut value = Vec::new();
    let mut i = start + 1;
    loop {
        match bytes.get(i) {
            None => return Err(Unparseable),
            Some(b'"') => break,
            Some(b'\\') => {
                match bytes.get(i + 1) {
                    Some(&b) if b == b'\t' || (b' '..=b'~').contains(&b) => value.push(b),
                    _ => return Err(Unparseable),
                }
                i += 2;
            }
            Some(&b) if b == b'\t' || (b' '..=b'~').contains(&b) => {
                value.push(b);
                i += 1;
            }
            Some(_) => return Err(Unparseable),
        }
    }
    // Only visible ASCII, space and tab were taken: valid UTF-8.
    let value = String::from_utf8(value).map_err(|_| Unparseable)?;
    Ok((value, i + 1))
}

/// Parses delta-seconds: digits only, saturating.
pub(crate) fn delta_seconds(text: &str) -> u64 {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    text.bytes()
        .try_fold(0u64, |acc, b| {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })
        .unwrap_or(MAX_DELTA_SECONDS)
        .min(MAX_DELTA_SECONDS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn try_parse(lines: &[&[u8]]) -> Result<CacheControl, Unparseable> {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("cache-control", HeaderValue::from_bytes(line).unwrap());
        }
        CacheControl::parse(headers.get_all("cache-control"))
    }

    fn parse(lines: &[&str]) -> CacheControl {
        let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        try_parse(&lines).unwrap()
    }

    #[test]
    fn directives_across_lines_and_case() {
        let cc = parse(&[
            "Public, MAX-AGE=60",
            "s-maxage=\"30\", stale-while-revalidate=5",
        ]);
        assert!(cc.public);
        assert_eq!(cc.max_age, Some(60));
        assert_eq!(cc.s_maxage, Some(30));
        assert_eq!(cc.stale_while_revalidate, Some(5));
    }

    #[test]
    fn quoted_commas_do_not_split() {
        let cc = parse(&["private=\"set-cookie, x-a\", max-age=10"]);
        assert!(cc.private);
        assert_eq!(cc.max_age, Some(10));
    }

    #[test]
    fn bogus_max_age_is_stale_and_huge_saturates() {
        assert_eq!(parse(&["max-age=abc"]).max_age, Some(0));
        assert_eq!(parse(&["max-age=-1"]).max_age, Some(0));
        assert_eq!(
            parse(&["max-age=99999999999999999999999"]).max_age,
            Some(MAX_DELTA_SECONDS)
        );
    }

    #[test]
    fn request_directives() {
        let cc = parse(&["max-stale, min-fresh=5, only-if-cached"]);
        assert_eq!(cc.max_stale, Some(u64::MAX));
        assert_eq!(cc.min_fresh, Some(5));
        assert!(cc.only_if_cached);
        assert_eq!(parse(&["max-stale=30"]).max_stale, Some(30));
    }

    #[test]
    fn duplicate_max_age_takes_the_smaller() {
        assert_eq!(parse(&["max-age=60, max-age=5"]).max_age, Some(5));
    }

    /// The stale windows and the request's staleness bounds given twice
    /// are read as their most conservative value too, whatever the order:
    /// `stale-while-revalidate=0, stale-while-revalidate=86400` used to
    /// grant a day of grace (the last one won).
    #[test]
    fn duplicate_stale_windows_and_bounds_take_the_conservative_value() {
        for lines in [
            &["stale-while-revalidate=0, stale-while-revalidate=86400"][..],
            &["stale-while-revalidate=86400", "stale-while-revalidate=0"],
        ] {
            assert_eq!(parse(lines).stale_while_revalidate, Some(0), "{lines:?}");
        }
        for lines in [
            "stale-if-error=5, stale-if-error=600",
            "stale-if-error=600, stale-if-error=5",
        ] {
            assert_eq!(parse(&[lines]).stale_if_error, Some(5), "{lines}");
        }
        for lines in ["max-stale, max-stale=5", "max-stale=5, max-stale"] {
            assert_eq!(parse(&[lines]).max_stale, Some(5), "{lines}");
        }
        for lines in ["min-fresh=5, min-fresh=60", "min-fresh=60, min-fresh=5"] {
            assert_eq!(parse(&[lines]).min_fresh, Some(60), "{lines}");
        }
        // A bogus duration is 0 (stale), and stays the conservative one.
        assert_eq!(
            parse(&["stale-while-revalidate=60, stale-while-revalidate=x"]).stale_while_revalidate,
            Some(0)
        );
    }

    #[test]
    fn a_byte_beyond_visible_ascii_makes_the_field_unparseable() {
        // `private, x="é"`: `é` is obs-text, and the field's `private` must
        // not be lost with it.
        assert_eq!(
            try_parse(&["private, x=\"é\"".as_bytes()]),
            Err(Unparseable)
        );
        assert_eq!(try_parse(&[b"max-age=60, \xff"]), Err(Unparseable));
        // One bad line spoils the whole field.
        assert_eq!(
            try_parse(&[b"max-age=60", "no-store, x=\"é\"".as_bytes()]),
            Err(Unparseable)
        );
    }

    #[test]
    fn unbalanced_quotes_are_unparseable() {
        for line in [
            "private=\"set-cookie, max-age=60",
            "max-age=60, x=\"",
            "x=\"a\\\"",
            "x=\"a\"b\"",
        ] {
            assert_eq!(try_parse(&[line.as_bytes()]), Err(Unparseable), "{line}");
        }
    }

    #[test]
    fn a_directive_name_that_is_not_a_token_is_unparseable() {
        for line in [
            "=60",
            "max age=60",
            "max-age=60; private",
            "(private)",
            "\"private\"",
            "max-age=60 private",
            "max-age = 60",
            "max-age=",
            "max-age==60",
            "no-cache=a b",
            "private=a\"b\"",
        ] {
            assert_eq!(try_parse(&[line.as_bytes()]), Err(Unparseable), "{line}");
        }
    }

    #[test]
    fn valid_list_syntax_is_accepted() {
        // Empty list members, optional whitespace (spaces and tabs).
        let cc = parse(&[",, public ,\tmax-age=60 ,", "", " "]);
        assert!(cc.public);
        assert_eq!(cc.max_age, Some(60));
        // Quoted strings hold commas, escaped quotes, spaces and `=`.
        let cc = parse(&["no-cache=\"set-cookie, x-a\", x=\"a \\\" = b\", s-maxage=5"]);
        assert!(cc.no_cache);
        assert_eq!(cc.s_maxage, Some(5));
        // Unknown extension directives, with or without arguments.
        let cc = parse(&["community=\"UCI\", x-ext, y=token.1, max-age=3"]);
        assert_eq!(cc.max_age, Some(3));
        assert_eq!(parse(&[""]), CacheControl::default());
    }

    #[test]
    fn quoted_arguments_are_unescaped() {
        assert_eq!(parse(&["max-age=\"6\\0\""]).max_age, Some(60));
    }

    // Property tests: what any field, well-formed or junk, may do. The
    // `cache_control` fuzz target (fuzz/) checks the same and more.

    use std::time::{Duration, SystemTime};

    use http::header::{HeaderName, CACHE_CONTROL};
    use http::{Method, StatusCode};
    use proptest::prelude::*;

    use crate::entry::Freshness;
    use crate::policy::{
        governing_cache_control, plan_request, storability, ClientCacheControl, Overrides,
        PolicyConfig, RequestFacts, RequestPlan, DEFAULT_CACHEABLE_STATUSES,
    };

    const KNOWN: [&str; 13] = [
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
    ];

    /// One directive: a known name (any case) or an extension, with no
    /// argument, a number, a token or a quoted string (escapes included).
    fn directive() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            3 => proptest::sample::select(&KNOWN[..]).prop_map(str::to_owned),
            1 => "[a-z][a-z0-9-]{0,8}",
        ];
        let arg = prop_oneof![
            Just(String::new()),
            "[0-9]{1,12}".prop_map(|n| format!("={n}")),
            "[!#$%&'*+.^_`|~0-9a-zA-Z-]{1,6}".prop_map(|t| format!("={t}")),
            r#"([ !#-\[\]-~]|\\[ -~]){0,8}"#.prop_map(|q| format!("=\"{q}\"")),
        ];
        (name, any::<bool>(), arg).prop_map(|(name, upper, arg)| {
            let name = if upper {
                name.to_ascii_uppercase()
            } else {
                name
            };
            format!("{name}{arg}")
        })
    }

    /// A field line: directives between separators (some valid, some
    /// not), or any bytes a header value may hold.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let separator = proptest::sample::select(&[", ", ",", " ,\t", ",,", ";", " ", ""][..]);
        prop_oneof![
            3 => proptest::collection::vec((directive(), separator), 0..4).prop_map(|ds| {
                let mut out = String::new();
                for (i, (d, sep)) in ds.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    out.push_str(d);
                }
                out.into_bytes()
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..24),
        ]
        .prop_filter("a header value", |b| HeaderValue::from_bytes(b).is_ok())
    }

    fn lines() -> impl Strategy<Value = Vec<Vec<u8>>> {
        proptest::collection::vec(line(), 0..4)
    }

    fn headers_with(name: &HeaderName, lines: &[Vec<u8>]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(name.clone(), HeaderValue::from_bytes(line).unwrap());
        }
        headers
    }

    fn parse_lines(lines: &[Vec<u8>]) -> Result<CacheControl, Unparseable> {
        CacheControl::parse(headers_with(&CACHE_CONTROL, lines).get_all(CACHE_CONTROL))
    }

    fn store(headers: &HeaderMap, facts: &RequestFacts) -> Result<Freshness, &'static str> {
        let config = PolicyConfig {
            default_ttl: Duration::from_secs(60),
            heuristic: None,
            grace: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(100),
            cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
            credential_headers: Vec::new(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        storability(
            &config,
            &Overrides::default(),
            StatusCode::OK,
            headers,
            facts,
            now,
        )
    }

    proptest! {
        /// Field lines are a list: their order, repeating them and joining
        /// them with `, ` change nothing.
        #[test]
        fn order_repetition_and_joining_change_nothing(lines in lines()) {
            let parsed = parse_lines(&lines);
            let reversed: Vec<_> = lines.iter().rev().cloned().collect();
            prop_assert_eq!(parse_lines(&reversed), parsed.clone());
            let twice: Vec<_> = lines.iter().chain(&lines).cloned().collect();
            prop_assert_eq!(parse_lines(&twice), parsed.clone());
            if parsed.is_ok() && !lines.is_empty() {
                prop_assert_eq!(parse_lines(&[lines.join(&b", "[..])]), parsed);
            }
        }

        /// What a field is read to say comes from it: every directive set
        /// is named in it, every duration within delta-seconds' range.
        #[test]
        fn what_a_field_says_comes_from_it(lines in lines()) {
            if let Ok(cc) = parse_lines(&lines) {
                let text = String::from_utf8(lines.concat()).unwrap().to_ascii_lowercase();
                for (set, name) in [
                    (cc.no_store, "no-store"),
                    (cc.no_cache, "no-cache"),
                    (cc.private, "private"),
                    (cc.public, "public"),
                    (cc.must_revalidate, "must-revalidate"),
                    (cc.proxy_revalidate, "proxy-revalidate"),
                    (cc.max_age.is_some(), "max-age"),
                    (cc.s_maxage.is_some(), "s-maxage"),
                    (cc.stale_while_revalidate.is_some(), "stale-while-revalidate"),
                    (cc.stale_if_error.is_some(), "stale-if-error"),
                    (cc.max_stale.is_some(), "max-stale"),
                    (cc.min_fresh.is_some(), "min-fresh"),
                    (cc.only_if_cached, "only-if-cached"),
                ] {
                    prop_assert!(!set || text.contains(name), "{} from {:?}", name, text);
                }
                for secs in [cc.max_age, cc.s_maxage, cc.stale_while_revalidate,
                             cc.stale_if_error, cc.min_fresh].into_iter().flatten() {
                    prop_assert!(secs <= MAX_DELTA_SECONDS);
                }
            }
        }

        /// A byte beyond visible ASCII anywhere spoils the field, whatever
        /// else it says.
        #[test]
        fn a_byte_beyond_visible_ascii_spoils_the_field(
            lines in lines(),
            at in any::<usize>(),
            byte in 0x80u8..,
        ) {
            let mut lines = lines;
            if lines.is_empty() {
                lines.push(Vec::new());
            }
            let i = at % lines.len();
            let j = at % (lines[i].len() + 1);
            lines[i].insert(j, byte);
            prop_assert_eq!(parse_lines(&lines), Err(Unparseable));
        }

        /// A line of directives the layer does not know changes nothing; a
        /// line that does not parse spoils the field.
        #[test]
        fn unknown_directives_change_nothing(lines in lines(), extra in line()) {
            let more: Vec<_> = lines.iter().chain([&extra]).cloned().collect();
            match parse_lines(std::slice::from_ref(&extra)) {
                Ok(cc) if cc == CacheControl::default() => {
                    prop_assert_eq!(parse_lines(&more), parse_lines(&lines));
                }
                Err(Unparseable) => prop_assert_eq!(parse_lines(&more), Err(Unparseable)),
                Ok(_) => {}
            }
        }

        /// Junk is never more cacheable than no field: a response whose
        /// `Cache-Control` or `CDN-Cache-Control` does not parse is not
        /// stored, a request whose `Cache-Control` does not parse is not
        /// looked up, and a field that says nothing the layer knows decides
        /// what no field decides. `CDN-Cache-Control` governs when present.
        #[test]
        fn junk_is_never_more_cacheable_than_no_field(
            general in lines(),
            targeted in proptest::option::of(proptest::collection::vec(line(), 1..3)),
            authorized in any::<bool>(),
            cookie in any::<bool>(),
        ) {
            let cdn = HeaderName::from_static("cdn-cache-control");
            let mut response = headers_with(&CACHE_CONTROL, &general);
            if let Some(lines) = &targeted {
                for line in lines {
                    response.append(cdn.clone(), HeaderValue::from_bytes(line).unwrap());
                }
            }
            let facts = RequestFacts { authorized, cookie, may_store: true, ..RequestFacts::default() };
            let stored = store(&response, &facts);
            let general_cc = parse_lines(&general);
            // `CDN-Cache-Control` must also be a Structured Field
            // Dictionary with integer seconds (RFC 9213 §2.1).
            let targeted_cc = targeted.as_ref().map(|l| {
                if crate::policy::structured::is_cdn_cache_control(l.iter().map(Vec::as_slice)) {
                    CacheControl::parse(headers_with(&cdn, l).get_all(&cdn))
                } else {
                    Err(Unparseable)
                }
            });
            let governing = governing_cache_control(&response);
            match (&general_cc, &targeted_cc) {
                (Err(_), _) | (_, Some(Err(_))) => {
                    prop_assert_eq!(stored, Err("cache-control"));
                    prop_assert_eq!(governing.clone(), Err(Unparseable));
                }
                (Ok(cc), None) => prop_assert_eq!(governing.clone(), Ok(cc.clone())),
                (Ok(_), Some(Ok(cc))) => prop_assert_eq!(governing.clone(), Ok(cc.clone())),
            }
            if governing == Ok(CacheControl::default()) {
                prop_assert_eq!(stored, store(&HeaderMap::new(), &facts));
            }
            if let (Ok(f), Ok(cc)) = (stored, &governing) {
                prop_assert!(!cc.no_store && !cc.private);
                prop_assert!(f.stale_until_ms >= f.fresh_until_ms);
                prop_assert!(f.error_until_ms >= f.fresh_until_ms);
                // Shared with credentials only when the field says so.
                prop_assert!(!authorized || cc.public || cc.s_maxage.is_some() || cc.must_revalidate);
                prop_assert!(!cookie || cc.public || cc.s_maxage.is_some());
            }

            let request = headers_with(&CACHE_CONTROL, &general);
            let config = PolicyConfig {
                default_ttl: Duration::from_secs(60),
                heuristic: None,
                grace: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                cacheable_statuses: DEFAULT_CACHEABLE_STATUSES.to_vec(),
                credential_headers: Vec::new(),
            };
            let plan = |headers: &HeaderMap| {
                plan_request(&Method::GET, headers, ClientCacheControl::Obey, &config)
            };
            match general_cc {
                Err(_) => prop_assert_eq!(plan(&request), RequestPlan::Bypass("cache-control")),
                Ok(cc) if cc == CacheControl::default() => {
                    prop_assert_eq!(plan(&request), plan(&HeaderMap::new()));
                }
                Ok(_) => {}
            }
        }
    }

    #[test]
    fn the_fuzzing_module_states_the_same_bound() {
        assert_eq!(crate::fuzzing::MAX_DELTA_SECONDS, MAX_DELTA_SECONDS);
    }
}
