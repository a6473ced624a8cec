//! Durations written the way Go writes them (`1h`, `20m`, `90s`, `1h30m`, `1.5h`), always positive.

use std::fmt;

use super::string_form;

/// A positive duration in Go syntax: a sequence of decimal numbers, each with a unit
/// (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), such as `1h30m` or `1.5s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

string_form!(
    Duration,
    "tbot-duration",
    "A positive duration in Go syntax, such as `90s`, `20m`, `1h` or `1h30m`."
);

const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

impl Duration {
    pub const fn from_secs(secs: u64) -> Duration {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub fn as_std(self) -> std::time::Duration {
        self.0
    }

    /// Parses Go duration syntax; the result must be greater than zero.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let hint = "write a number and a unit, such as `90s`, `20m`, `1h` or `1h30m`";
        if text.starts_with('-') {
            return Err(format!("`{text}` is negative; a duration must be positive"));
        }
        let mut rest = text.strip_prefix('+').unwrap_or(text);
        if rest.is_empty() {
            return Err(format!("an empty string is not a duration; {hint}"));
        }
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let number = &rest[..number_len];
            rest = &rest[number_len..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
            if number.is_empty() || (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
                return Err(format!("`{text}` is not a duration; {hint}"));
            }
            let Some(&(_, scale)) = UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(if unit.is_empty() {
                    format!("`{text}` has a number without a unit; {hint}")
                } else {
                    format!("`{text}` has an unknown unit `{unit}`; units are ns, us, ms, s, m and h")
                });
            };
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| format!("`{text}` is too large"))?
            };
            let mut value = whole
                .checked_mul(scale)
                .ok_or_else(|| format!("`{text}` is too large"))?;
            let mut place = scale;
            for digit in frac.bytes() {
                place /= 10;
                value += u128::from(digit - b'0') * place;
            }
            total = total
                .checked_add(value)
                .ok_or_else(|| format!("`{text}` is too large"))?;
        }
        if total == 0 {
            return Err(format!("`{text}` is zero; a duration must be positive"));
        }
        let nanos = u64::try_from(total).map_err(|_| format!("`{text}` is too large"))?;
        Ok(Duration(std::time::Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        let nanos = self.0.subsec_nanos();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if nanos > 0 {
            let frac = format!("{nanos:09}");
            write!(f, "{s}.{}s", frac.trim_end_matches('0'))
        } else if s > 0 || (h == 0 && m == 0) {
            write!(f, "{s}s")
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Duration;

    #[test]
    fn go_durations_parse_to_the_right_length() {
        assert_eq!(Duration::parse("1h").unwrap().as_std().as_secs(), 3600);
        assert_eq!(Duration::parse("20m").unwrap().as_std().as_secs(), 1200);
        assert_eq!(Duration::parse("1h30m").unwrap().as_std().as_secs(), 5400);
        assert_eq!(Duration::parse("1.5h").unwrap().as_std().as_secs(), 5400);
        assert_eq!(Duration::parse("90s").unwrap().as_std().as_secs(), 90);
        assert_eq!(Duration::parse("250ms").unwrap().as_std().as_millis(), 250);
        assert_eq!(Duration::parse("1µs").unwrap().as_std().as_nanos(), 1000);
    }

    #[test]
    fn malformed_durations_are_refused_with_a_reason() {
        for bad in ["", "1", "h", "1d", "-1h", "0s", "1..5s", "1h 30m", "."] {
            assert!(Duration::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(Duration::parse("1d").unwrap_err().contains("unknown unit `d`"));
    }

    #[test]
    fn durations_print_in_their_shortest_go_form() {
        for (text, shown) in [
            ("90s", "1m30s"),
            ("1h30m", "1h30m"),
            ("60m", "1h"),
            ("1.5s", "1.5s"),
            ("3h0m5s", "3h5s"),
        ] {
            assert_eq!(Duration::parse(text).unwrap().to_string(), shown);
        }
    }
}
