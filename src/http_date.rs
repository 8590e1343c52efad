//! HTTP dates (`Date`, `Expires`, `Last-Modified`, `If-Modified-Since`) in
//! the three forms RFC 9110 §5.6.7 says a recipient must accept —
//! IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete RFC 850 form
//! (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37
//! 1994`) — read as leniently as the RFC allows: names in any case, a day
//! name that does not match the date (it is redundant), a one-digit day.
//! What is not a date is `None` (an invalid `Expires` then means stale).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time `text` names, or `None`.
pub(crate) fn parse(text: &str) -> Option<SystemTime> {
    if let Ok(time) = httpdate::parse_http_date(text) {
        return Some(time);
    }
    lenient(text.trim())
}

fn lenient(text: &str) -> Option<SystemTime> {
    let (day, month, year, time, zone) = match text.split_once(',') {
        // IMF-fixdate or RFC 850: the day name before the comma.
        Some((_, rest)) => {
            let mut words = rest.split_ascii_whitespace();
            let first = words.next()?;
            let (day, month, year) = if first.contains('-') {
                let mut parts = first.split('-');
                let date = (parts.next()?, parts.next()?, parts.next()?);
                if parts.next().is_some() {
                    return None;
                }
                date
            } else {
                (first, words.next()?, words.next()?)
            };
            let time = words.next()?;
            let zone = words.next()?;
            if words.next().is_some() {
                return None;
            }
            (day, month, year, time, Some(zone))
        }
        // asctime: day name, month, day, time, year.
        None => {
            let mut words = text.split_ascii_whitespace();
            let _day_name = words.next()?;
            let month = words.next()?;
            let day = words.next()?;
            let time = words.next()?;
            let year = words.next()?;
            if words.next().is_some() {
                return None;
            }
            (day, month, year, time, None)
        }
    };
    if zone.is_some_and(|zone| !zone.eq_ignore_ascii_case("GMT")) {
        return None;
    }
    let day: u32 = digits(day, 1, 2)?;
    let month = month_number(month)?;
    let year = match year.len() {
        4 => digits(year, 4, 4)?,
        2 => two_digit_year(digits(year, 2, 2)?),
        _ => return None,
    };
    let mut hms = time.split(':');
    let hour: u32 = digits(hms.next()?, 2, 2)?;
    let minute: u32 = digits(hms.next()?, 2, 2)?;
    let second: u32 = digits(hms.next()?, 2, 2)?;
    if hms.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if year < 1970 || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + u64::from(hour * 3600 + minute * 60 + second);
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A number of `min..=max` ASCII digits.
fn digits(text: &str, min: usize, max: usize) -> Option<u32> {
    let ok = (min..=max).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| text.parse().ok()).flatten()
}

fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let position = MONTHS.iter().position(|m| m.eq_ignore_ascii_case(name))?;
    u32::try_from(position + 1).ok()
}

/// RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is
/// the most recent past year with those digits.
fn two_digit_year(yy: u32) -> u32 {
    let now_year = 1970
        + u32::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() / 31_556_952),
        )
        .unwrap_or(0);
    let century = now_year - now_year % 100;
    let year = century + yy;
    if year > now_year + 50 {
        year - 100
    } else {
        year
    }
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to `year-month-day` (`year` ≥ 1970).
fn days_from_civil(year: u32, month: u32, day: u32) -> u64 {
    let mut days = 0u64;
    for y in 1970..year {
        days += if is_leap(y) { 366 } else { 365 };
    }
    for m in 1..month {
        days += u64::from(days_in_month(year, m));
    }
    days + u64::from(day - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUNDAY: u64 = 784_111_777; // 1994-11-06 08:49:37 UTC

    fn secs(text: &str) -> Option<u64> {
        parse(text).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs())
    }

    #[test]
    fn the_three_forms_and_their_lenient_spellings() {
        for text in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "sun, 06 nov 1994 08:49:37 gmt",
            "SUN, 06 NOV 1994 08:49:37 GMT",
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "monday, 06-nov-94 08:49:37 GMT",
            "mon nov 6 08:49:37 1994",
            "  Sun, 06 Nov 1994 08:49:37 GMT ",
        ] {
            assert_eq!(secs(text), Some(SUNDAY), "{text:?}");
        }
    }

    #[test]
    fn what_is_no_date_is_none() {
        for text in [
            "",
            "0",
            "-1",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1969 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT extra",
            "Sun, 006 Nov 1994 08:49:37 GMT",
            "tomorrow",
        ] {
            assert_eq!(secs(text), None, "{text:?}");
        }
    }

    #[test]
    fn leap_days_and_two_digit_years() {
        assert_eq!(secs("Thu, 29 Feb 2024 00:00:00 GMT"), Some(1_709_164_800));
        assert_eq!(secs("Sat, 29 Feb 2025 00:00:00 GMT"), None);
        // "94" is 1994 (2094 is more than 50 years ahead); "30" is 2030.
        assert_eq!(secs("x, 01-Jan-30 00:00:00 GMT"), Some(1_893_456_000));
    }
}
