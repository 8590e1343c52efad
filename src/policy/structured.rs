//! A strict syntax check for `CDN-Cache-Control` (RFC 9213 §2.1): the field
//! is a Structured Field Dictionary (RFC 8941 §3.2), not a `Cache-Control`
//! list, so `max-age=10000, &&&&&` and `max-age="10000"` must not make a
//! response cacheable. This module only says whether a field is such a
//! dictionary whose delta-seconds directives are integers; the directives
//! themselves are then read by the `Cache-Control` parser.

/// Directives whose value RFC 9213 defines as an integer of seconds.
const DELTA_SECONDS: [&[u8]; 4] = [
    b"max-age",
    b"s-maxage",
    b"stale-while-revalidate",
    b"stale-if-error",
];

/// Whether the field of `lines` is a valid Structured Field Dictionary in
/// which every delta-seconds directive is a non-negative integer. Each
/// line's surrounding whitespace is not part of it (RFC 9110 §5.5); the
/// lines are joined by `, `. A line with nothing in it makes the field
/// invalid (joined, it would leave an empty member): doubt, not an empty
/// dictionary that would override `Cache-Control`.
pub(crate) fn is_cdn_cache_control<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let mut joined = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            return false;
        }
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(line);
    }
    is_dictionary(&joined)
}

fn is_dictionary(field: &[u8]) -> bool {
    let mut p = Parser { s: field, i: 0 };
    p.skip_sp();
    if p.done() {
        return true;
    }
    loop {
        let Some(key) = p.key() else { return false };
        if p.eat(b'=') {
            let integer = match p.peek() {
                Some(b'(') => {
                    if !p.inner_list() {
                        return false;
                    }
                    false
                }
                _ => match p.bare_item() {
                    Some(Item::Integer { negative }) => !negative,
                    Some(_) => false,
                    None => return false,
                },
            };
            if !p.parameters() {
                return false;
            }
            if DELTA_SECONDS.contains(&key) && !integer {
                return false;
            }
        } else {
            // A bare key is `true`: no seconds for a delta directive.
            if DELTA_SECONDS.contains(&key) || !p.parameters() {
                return false;
            }
        }
        p.skip_ows();
        if p.done() {
            return true;
        }
        if !p.eat(b',') {
            return false;
        }
        p.skip_ows();
        if p.done() {
            // A trailing comma.
            return false;
        }
    }
}

enum Item {
    Integer { negative: bool },
    Other,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn done(&self) -> bool {
        self.s[self.i..].iter().all(|&c| c == b' ')
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn skip_sp(&mut self) {
        while self.eat(b' ') {}
    }

    fn skip_ows(&mut self) {
        while self.eat(b' ') || self.eat(b'\t') {}
    }

    fn take_while(&mut self, ok: impl Fn(u8) -> bool) -> usize {
        let start = self.i;
        while self.peek().is_some_and(&ok) {
            self.i += 1;
        }
        self.i - start
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => self.i += 1,
            _ => return None,
        }
        self.take_while(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.' | b'*')
        });
        Some(&self.s[start..self.i])
    }

    /// `*( ";" *SP key [ "=" bare-item ] )`
    fn parameters(&mut self) -> bool {
        while self.eat(b';') {
            self.skip_sp();
            if self.key().is_none() {
                return false;
            }
            if self.eat(b'=') && self.bare_item().is_none() {
                return false;
            }
        }
        true
    }

    /// `"(" *SP [ sf-item *( 1*SP sf-item ) *SP ] ")" parameters`
    fn inner_list(&mut self) -> bool {
        if !self.eat(b'(') {
            return false;
        }
        loop {
            self.skip_sp();
            if self.eat(b')') {
                return self.parameters();
            }
            if self.bare_item().is_none() || !self.parameters() {
                return false;
            }
            match self.peek() {
                Some(b' ' | b')') => {}
                _ => return false,
            }
        }
    }

    fn bare_item(&mut self) -> Option<Item> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().then_some(Item::Other),
            b':' => self.binary().then_some(Item::Other),
            b'?' => {
                self.i += 1;
                (self.eat(b'0') || self.eat(b'1')).then_some(Item::Other)
            }
            c if c.is_ascii_alphabetic() || c == b'*' => {
                self.i += 1;
                self.take_while(|c| is_tchar(c) || c == b':' || c == b'/');
                Some(Item::Other)
            }
            _ => None,
        }
    }

    /// `sf-integer = ["-"] 1*15DIGIT`, `sf-decimal = ["-"] 1*12DIGIT "." 1*3DIGIT`
    fn number(&mut self) -> Option<Item> {
        let negative = self.eat(b'-');
        let whole = self.take_while(|c| c.is_ascii_digit());
        if whole == 0 {
            return None;
        }
        if self.eat(b'.') {
            let fraction = self.take_while(|c| c.is_ascii_digit());
            return (whole <= 12 && (1..=3).contains(&fraction)).then_some(Item::Other);
        }
        (whole <= 15).then_some(Item::Integer { negative })
    }

    /// `DQUOTE *( %x20-21 / %x23-5B / %x5D-7E / "\" ( DQUOTE / "\" ) ) DQUOTE`
    fn string(&mut self) -> bool {
        self.i += 1;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.i += 1;
                    return true;
                }
                Some(b'\\') => {
                    self.i += 1;
                    if !(self.eat(b'"') || self.eat(b'\\')) {
                        return false;
                    }
                }
                Some(0x20..=0x7e) => self.i += 1,
                _ => return false,
            }
        }
    }

    /// `":" *( ALPHA / DIGIT / "+" / "/" / "=" ) ":"`
    fn binary(&mut self) -> bool {
        self.i += 1;
        self.take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
        self.eat(b':')
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionaries_that_rfc_9213_examples_use_are_valid() {
        assert!(is_cdn_cache_control([
            "max-age=1".as_bytes(),
            b"  private\t"
        ]));
        assert!(!is_cdn_cache_control(["max-age=1".as_bytes(), b" "]));
        for good in [
            "max-age=60",
            "max-age=60, stale-while-revalidate=30",
            "no-store",
            "private, no-cache",
            "max-age=0",
            "s-maxage=10;x=1, foo=\"bar\", baz=(a b), q=?1, d=1.5, b=:aGk=:, t=tok/en",
        ] {
            assert!(is_cdn_cache_control([good.as_bytes()]), "{good:?}");
        }
    }

    #[test]
    fn what_is_not_a_dictionary_or_not_seconds_is_refused() {
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age=-5",
            "max-age=1.5",
            "max-age",
            "Max-Age=60",
            "max-age=60,",
            "max-age=60 no-store",
            "max-age=1234567890123456",
            "foo=\"unterminated",
            "foo=(a b",
            ",",
            "",
        ] {
            assert!(!is_cdn_cache_control([bad.as_bytes()]), "{bad:?}");
        }
    }
}
