//! The SPIFFE ID rules (DESIGN §6): trust domain names and ID paths.

use std::fmt;

use serde::Serialize;

/// The longest SPIFFE ID, `spiffe://` included.
pub const MAX_ID_LEN: usize = 2048;

/// A trust domain name: lowercase letters, digits, `.`, `-` and `_`, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<TrustDomain, String> {
        if s.is_empty() {
            return Err("a trust domain must not be empty".into());
        }
        if s.len() > 255 {
            return Err(format!("a trust domain is at most 255 bytes; `{s}` has {}", s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            let why = if c.is_ascii_uppercase() {
                format!(
                    "`{s}` has the uppercase letter `{c}`; trust domains are lowercase: `{}`",
                    s.to_ascii_lowercase()
                )
            } else {
                format!("`{s}` contains `{c}`; a trust domain holds only a-z, 0-9, `.`, `-` and `_`")
            };
            return Err(why);
        }
        Ok(TrustDomain(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a SPIFFE ID path (`/svc/web`): it starts with `/`, has no empty, `.` or `..` segment, no
/// trailing `/`, and only `a-z A-Z 0-9 . - _` inside segments.
pub fn check_path(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("`{path}` must start with `/`"));
    };
    if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#')) {
        return Err(format!("`{path}` contains `{c}`; a SPIFFE ID has no query or fragment"));
    }
    for segment in rest.split('/') {
        match segment {
            "" => return Err(format!("`{path}` has an empty segment (`//` or a trailing `/`)")),
            "." | ".." => return Err(format!("`{path}` has a `{segment}` segment, which SPIFFE IDs forbid")),
            _ => {}
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(format!(
                "`{path}` contains `{c}`; path segments hold only letters, digits, `.`, `-` and `_`"
            ));
        }
    }
    Ok(())
}

/// Checks a whole SPIFFE ID for a trust domain and path, including the total length.
pub fn check_id(trust_domain: &TrustDomain, path: &str) -> Result<(), String> {
    check_path(path)?;
    let len = "spiffe://".len() + trust_domain.as_str().len() + path.len();
    if len > MAX_ID_LEN {
        return Err(format!("the SPIFFE ID would be {len} bytes; the limit is {MAX_ID_LEN}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains_follow_the_spiffe_character_rules() {
        assert!(TrustDomain::parse("example.teleport.sh").is_ok());
        assert!(TrustDomain::parse("my_td-1").is_ok());
        assert!(TrustDomain::parse("Example.com").unwrap_err().contains("lowercase"));
        assert!(TrustDomain::parse("a:443").is_err());
        assert!(TrustDomain::parse("").is_err());
    }

    #[test]
    fn paths_follow_the_spiffe_segment_rules() {
        assert!(check_path("/svc/web").is_ok());
        assert!(check_path("/a.b/c-d/e_F9").is_ok());
        for bad in [
            "svc", "/", "/a//b", "/a/", "/a/./b", "/a/../b", "/a?b", "/a#b", "/a b", "/ä",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn ids_longer_than_2048_bytes_are_refused() {
        let td = TrustDomain::parse("example.org").unwrap();
        let long = format!("/{}", "a".repeat(2048));
        assert!(check_id(&td, &long).unwrap_err().contains("2048"));
    }
}
