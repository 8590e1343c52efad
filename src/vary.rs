//! Normalising the request header values a stored response varies on, so
//! that requests the origin cannot tell apart share one variant (RFC 9111
//! §4.1 lets a cache normalise what the header's definition makes
//! equivalent).
//!
//! Only what cannot change the origin's choice is normalised:
//!
//! - **`Accept-Encoding`** is reduced to the one coding the request is to
//!   get, of those a cache commonly holds: `br`, else `gzip` (`x-gzip` is
//!   `gzip`, RFC 9110 §8.4.1.3), else `identity`, taking the highest
//!   `q` (ties go in that order), with `q=0` and `*` honoured
//!   (RFC 9110 §12.5.3). The request sent to the origin carries that value
//!   ([`normalise_request`]), so the stored response is one its variant's
//!   every request accepts. A request that accepts none of the three keeps
//!   its members (normalised as below); an absent header stays absent, an
//!   empty one means `identity`.
//! - **`Accept-Language`**, **`Accept-Charset`**: members compared
//!   case-insensitively (language tags and charsets are), whitespace around
//!   `,` `;` `=` dropped, empty members dropped, `q` values written in
//!   their shortest form (`q=0.50` is `q=0.5`, a final `q=1` is dropped),
//!   exact repeats of a member dropped. **Order is kept**: it is the
//!   client's preference among equal weights.
//! - **`Accept`**: the same, but only the media type, subtype and parameter
//!   names are lowercased (parameter values may be case-sensitive).
//!
//! Every other header is compared as sent: its field lines joined by `, `.
//! Normalising is idempotent: a normalised value normalises to itself.

use std::cell::RefCell;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::recent::{self, Recent};

/// Normalised values per thread, by header name and value (see [`recent`]).
const RECENT_VALUES: usize = 64;

thread_local! {
    static NORMALISED: RefCell<Recent<Option<HeaderValue>>> =
        const { RefCell::new(Recent::new(RECENT_VALUES)) };
}

/// The request's value of the header `name` as a variant is keyed and
/// compared on: its field lines joined by `, ` and normalised; `None` when
/// the header is absent.
pub(crate) fn value(request: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut lines = request.get_all(name).iter();
    let first = lines.next()?;
    if lines.next().is_none() {
        // One field line (the usual case): its trimmed bytes are the
        // joined value, normalised through the thread's memo.
        let trimmed = first.as_bytes().trim_ascii();
        return remembered(name, trimmed);
    }
    let joined = joined(request, name)?;
    Some(normalise(name, &joined))
}

/// Rewrites the request's `Accept-Encoding` to its normalised value, so the
/// origin chooses for the variant the request is keyed under.
pub(crate) fn normalise_request(headers: &mut HeaderMap) {
    if let Some(value) = value(headers, &header::ACCEPT_ENCODING) {
        headers.insert(header::ACCEPT_ENCODING, value);
    }
}

/// The field lines of `name`, each trimmed, joined by `, `.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().trim_ascii().to_vec();
    for value in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(value.as_bytes().trim_ascii());
    }
    HeaderValue::from_bytes(&out).ok()
}

/// `value` of the header `name`, normalised as the module says.
pub(crate) fn normalise(name: &HeaderName, value: &HeaderValue) -> HeaderValue {
    remembered(name, value.as_bytes()).unwrap_or_else(|| value.clone())
}

/// The bytes `value` of the header `name`, normalised: remembered by this
/// thread (browsers send the same few values on every request), or
/// computed. `None` only when `value` is no header value at all.
fn remembered(name: &HeaderName, value: &[u8]) -> Option<HeaderValue> {
    recent::get_or_make(&NORMALISED, name.as_str(), value, || {
        HeaderValue::from_bytes(value)
            .ok()
            .map(|value| normalise_now(name, &value))
    })
}

/// [`normalise`], computed.
fn normalise_now(name: &HeaderName, value: &HeaderValue) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let normalised = if name == header::ACCEPT_ENCODING {
        accept_encoding(text)
    } else if name == header::ACCEPT_LANGUAGE || name == header::ACCEPT_CHARSET {
        Some(render(&members(text, Case::Whole)))
    } else if name == header::ACCEPT {
        Some(render(&members(text, Case::Names)))
    } else {
        None
    };
    normalised
        .and_then(|text| HeaderValue::try_from(text).ok())
        .unwrap_or_else(|| value.clone())
}

/// What of a member is lowercased.
#[derive(Clone, Copy)]
enum Case {
    /// The whole member (tokens that are case-insensitive throughout).
    Whole,
    /// The value before the first `;` and the parameter names.
    Names,
}

/// One list member: its value and parameters, normalised.
#[derive(Debug, PartialEq, Eq)]
struct Member {
    value: String,
    params: Vec<(String, String)>,
}

impl Member {
    /// The weight, in thousandths: `Some(1000)` without `q`, `None` when
    /// `q` does not parse.
    fn q(&self) -> Option<u16> {
        match self.params.iter().rev().find(|(name, _)| name == "q") {
            None => Some(1000),
            Some((_, value)) => qvalue(value),
        }
    }
}

fn members(text: &str, case: Case) -> Vec<Member> {
    let mut out: Vec<Member> = Vec::new();
    for raw in split_outside_quotes(text, b',') {
        let mut pieces = split_outside_quotes(raw, b';').into_iter().map(str::trim);
        let Some(value) = pieces.next().filter(|v| !v.is_empty()) else {
            continue;
        };
        let params = pieces
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (name, value) = p.split_once('=').unwrap_or((p, ""));
                let name = name.trim().to_ascii_lowercase();
                let mut value = value.trim().to_owned();
                if matches!(case, Case::Whole) && !value.starts_with('"') {
                    value.make_ascii_lowercase();
                }
                if name == "q" {
                    if let Some(q) = qvalue(&value) {
                        value = render_q(q);
                    }
                }
                (name, value)
            })
            .collect::<Vec<_>>();
        let mut member = Member {
            value: value.to_ascii_lowercase(),
            params,
        };
        // A final `q=1` says what its absence says.
        if member
            .params
            .last()
            .is_some_and(|(n, v)| n == "q" && v == "1")
        {
            member.params.pop();
        }
        if !out.contains(&member) {
            out.push(member);
        }
    }
    out
}

fn render(members: &[Member]) -> String {
    let mut out = String::new();
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&member.value);
        for (name, value) in &member.params {
            out.push(';');
            out.push_str(name);
            if !value.is_empty() {
                out.push('=');
                out.push_str(value);
            }
        }
    }
    out
}

/// Splits at `sep` outside double-quoted strings.
fn split_outside_quotes(text: &str, sep: u8) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b if b == sep && !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// A `qvalue` (RFC 9110 §12.4.2) in thousandths.
fn qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = format!("{fraction:0<3}").parse::<u16>().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

fn render_q(q: u16) -> String {
    match q {
        1000 => "1".to_owned(),
        0 => "0".to_owned(),
        q => format!("0.{q:03}").trim_end_matches('0').to_owned(),
    }
}

/// The codings a cache commonly holds, in the order ties are broken.
const CODINGS: [&str; 2] = ["br", "gzip"];

/// The one coding of `br`, `gzip`, `identity` the request gets (see the
/// module); its members, normalised, when no coding of the three is
/// acceptable or a weight does not parse.
fn accept_encoding(text: &str) -> Option<String> {
    let mut members = members(text, Case::Whole);
    for member in &mut members {
        if member.value == "x-gzip" {
            member.value = "gzip".to_owned();
        }
    }
    let mut weights = Vec::with_capacity(members.len());
    for member in &members {
        let Some(q) = member.q() else {
            return Some(render(&members));
        };
        weights.push((member.value.as_str(), q));
    }
    // The first member naming a coding gives its weight.
    let named = |coding: &str| weights.iter().find(|(c, _)| *c == coding).map(|(_, q)| *q);
    let star = named("*");
    let best = CODINGS
        .iter()
        .map(|coding| (*coding, named(coding).or(star).unwrap_or(0)))
        .filter(|(_, q)| *q > 0)
        // `max_by_key` keeps the last of equals: walk the preference
        // order backwards.
        .rev()
        .max_by_key(|(_, q)| *q);
    if let Some((coding, _)) = best {
        return Some(coding.to_owned());
    }
    let identity = named("identity").or(star).unwrap_or(1000);
    if identity > 0 {
        return Some("identity".to_owned());
    }
    Some(render(&members))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(name: HeaderName, value: &str) -> String {
        let out = normalise(&name, &HeaderValue::from_str(value).unwrap());
        let again = normalise(&name, &out);
        assert_eq!(out, again, "normalising {value:?} is idempotent");
        out.to_str().unwrap().to_owned()
    }

    fn ae(value: &str) -> String {
        norm(header::ACCEPT_ENCODING, value)
    }

    #[test]
    fn remembered_values_are_the_computed_ones_for_their_own_header() {
        // Same bytes under different names normalise differently; asked
        // twice, the second answer comes from the memo.
        let names = [
            header::ACCEPT_ENCODING,
            header::ACCEPT_LANGUAGE,
            header::ACCEPT,
            HeaderName::from_static("x-other"),
        ];
        let values = ["gzip, BR;q=0.5", "text/HTML;Level=1, EN", " de ,de ", ""];
        for _ in 0..2 {
            for name in &names {
                for text in values {
                    let sent = HeaderValue::from_str(text).unwrap();
                    assert_eq!(normalise(name, &sent), normalise_now(name, &sent));
                    let mut request = HeaderMap::new();
                    request.insert(name.clone(), sent);
                    let trimmed = HeaderValue::from_str(text.trim()).unwrap();
                    assert_eq!(
                        value(&request, name),
                        Some(normalise_now(name, &trimmed)),
                        "{name}: {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn accept_encoding_reduces_to_the_preferred_coding() {
        assert_eq!(ae("gzip, deflate, br, zstd"), "br");
        assert_eq!(ae("gzip, deflate"), "gzip");
        assert_eq!(ae("GZIP"), "gzip");
        assert_eq!(ae("x-gzip"), "gzip");
        assert_eq!(ae("deflate, zstd"), "identity");
        assert_eq!(ae(""), "identity");
        assert_eq!(ae("*"), "br");
        assert_eq!(ae("br;q=0.5, gzip"), "gzip");
        assert_eq!(ae("br;q=0, *"), "gzip");
        assert_eq!(ae("gzip;q=0.8, br;q=0.8"), "br");
        assert_eq!(ae("br;q=0, gzip;q=0"), "identity");
        assert_eq!(ae("identity;q=0, br;q=0.1"), "br");
    }

    #[test]
    fn accept_encoding_that_refuses_all_three_keeps_its_members() {
        assert_eq!(ae("zstd, identity;q=0"), "zstd, identity;q=0");
        assert_eq!(ae("zstd,*;q=0"), "zstd, *;q=0");
        // A weight that does not parse: members only.
        assert_eq!(ae("gzip;q=2"), "gzip;q=2");
    }

    #[test]
    fn accept_language_keeps_order_and_weights() {
        let al = |v| norm(header::ACCEPT_LANGUAGE, v);
        assert_eq!(al("en, fr"), "en, fr");
        assert_eq!(al("en,fr"), "en, fr");
        assert_eq!(al(" EN-us ,  fr ; Q=0.50 "), "en-us, fr;q=0.5");
        assert_eq!(al("fr, en"), "fr, en");
        assert_ne!(al("en, fr"), al("fr, en"));
        assert_eq!(al("en;q=1, fr;q=0.800"), "en, fr;q=0.8");
        assert_eq!(al("en, , en"), "en");
        assert_eq!(al("en;q=0.5, en"), "en;q=0.5, en");
    }

    #[test]
    fn accept_keeps_parameter_values() {
        let a = |v| norm(header::ACCEPT, v);
        assert_eq!(
            a("Text/HTML ; Level=A, application/json;q=0.9"),
            "text/html;level=A, application/json;q=0.9"
        );
        assert_eq!(a("text/x;p=\"a, b\""), "text/x;p=\"a, b\"");
    }

    #[test]
    fn other_headers_are_kept_as_sent() {
        let ua = norm(header::USER_AGENT, "Foo/1 ,  Bar");
        assert_eq!(ua, "Foo/1 ,  Bar");
    }

    #[test]
    fn field_lines_are_joined_before_normalising() {
        let mut headers = HeaderMap::new();
        headers.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        headers.append(header::ACCEPT_LANGUAGE, HeaderValue::from_static("FR"));
        assert_eq!(value(&headers, &header::ACCEPT_LANGUAGE).unwrap(), "en, fr");
        assert_eq!(value(&headers, &header::ACCEPT), None);
        headers.append(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        headers.append(header::ACCEPT_ENCODING, HeaderValue::from_static("br"));
        normalise_request(&mut headers);
        let sent: Vec<_> = headers.get_all(header::ACCEPT_ENCODING).iter().collect();
        assert_eq!(sent, ["br"]);
    }
}
