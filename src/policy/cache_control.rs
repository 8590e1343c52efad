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

impl CacheControl {
    /// Parses every field line. Unknown directives are ignored; a duration
    /// that is not a number counts as 0 (stale), the conservative reading;
    /// numbers saturate at [`MAX_DELTA_SECONDS`].
    pub(crate) fn parse(values: GetAll<'_, HeaderValue>) -> Self {
        let mut cc = CacheControl::default();
        for value in values {
            let Ok(text) = value.to_str() else { continue };
            for directive in split_directives(text) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
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
                    "stale-while-revalidate" => cc.stale_while_revalidate = Some(seconds()),
                    "stale-if-error" => cc.stale_if_error = Some(seconds()),
                    "max-stale" => {
                        cc.max_stale = Some(arg.map(delta_seconds).unwrap_or(u64::MAX));
                    }
                    "min-fresh" => cc.min_fresh = Some(seconds()),
                    "only-if-cached" => cc.only_if_cached = true,
                    _ => {}
                }
            }
        }
        cc
    }
}

/// A directive given twice is read as its most conservative value.
fn min_opt(current: Option<u64>, new: u64) -> u64 {
    current.map_or(new, |c| c.min(new))
}

/// Splits on commas outside quoted strings.
fn split_directives(text: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut in_quotes = false;
    let mut start = 0;
    for (i, b) in text.bytes().enumerate() {
        match b {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
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

    fn parse(lines: &[&str]) -> CacheControl {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("cache-control", HeaderValue::from_str(line).unwrap());
        }
        CacheControl::parse(headers.get_all("cache-control"))
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
}
