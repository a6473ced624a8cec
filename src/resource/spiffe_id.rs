//! The SPIFFE ID rules (the SPIFFE ID standard): trust domain names and ID paths.

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
        let allowed = |c: &char| matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_');
        if s.chars().any(|c| !allowed(&c)) {
            let mut bad: Vec<char> = s.chars().filter(|c| !allowed(c) && !c.is_ascii_uppercase()).collect();
            bad.dedup();
            let why = if bad.is_empty() {
                format!(
                    "the trust domain `{s}` has uppercase letters; trust domains are lowercase: `{}`",
                    s.to_ascii_lowercase()
                )
            } else {
                let listed: Vec<String> = bad.iter().map(|c| format!("{c:?}")).collect();
                format!(
                    "the trust domain `{s}` contains {}; a trust domain holds only lowercase a-z, 0-9, `.`, `-` and `_` (such as `{}`)",
                    listed.join(", "),
                    suggest(s)
                )
            };
            return Err(why);
        }
        if s == "." || s == ".." {
            // Allowed characters, but no domain; and the issuer keeps its state in a directory of
            // this name, which would be its parent's or its own.
            return Err(format!(
                "the trust domain `{s}` names no domain; use a name such as `example.org`"
            ));
        }
        Ok(TrustDomain(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A valid trust domain close to `s`: lowercase, each run of other characters one `-`.
fn suggest(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().map(|c| c.to_ascii_lowercase()) {
        if matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_owned();
    if out.is_empty() { "example.org".into() } else { out }
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

/// A SPIFFE ID, `spiffe://<trust domain><path>`, as the SPIFFE ID standard defines it: the scheme in
/// lowercase, a trust domain, no user info, port, query or fragment, a path that follows
/// [`check_path`] (or none), 2048 bytes at most.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, String> {
        if s.len() > MAX_ID_LEN {
            return Err(format!(
                "a SPIFFE ID is at most {MAX_ID_LEN} bytes; this one has {}",
                s.len()
            ));
        }
        let Some(rest) = s.strip_prefix("spiffe://") else {
            return Err(format!("`{s}` does not start with `spiffe://`"));
        };
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') {
            return Err(format!("`{s}` has user info; a SPIFFE ID has none"));
        }
        if authority.contains(':') {
            return Err(format!("`{s}` has a port; a SPIFFE ID has none"));
        }
        let trust_domain = TrustDomain::parse(authority)?;
        if !path.is_empty() {
            check_path(path)?;
        }
        Ok(SpiffeId {
            trust_domain,
            path: path.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, empty for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
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
        assert!(TrustDomain::parse("..").unwrap_err().contains("names no domain"));
        assert!(TrustDomain::parse(".").is_err());
        assert!(TrustDomain::parse("a..b").is_ok());
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
    fn spiffe_ids_parse_by_the_standard() {
        let id = SpiffeId::parse("spiffe://example.org/svc/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/svc/web");
        assert_eq!(id.to_string(), "spiffe://example.org/svc/web");
        assert_eq!(SpiffeId::parse("spiffe://example.org").unwrap().path(), "");
        for bad in [
            "",
            "spiffe://",
            "spiffe:///svc",
            "SPIFFE://example.org/a",
            "https://example.org/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://Example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a#b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/%41",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} passed");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2048));
        assert!(SpiffeId::parse(&long).unwrap_err().contains("2048"));
    }

    #[test]
    fn ids_longer_than_2048_bytes_are_refused() {
        let td = TrustDomain::parse("example.org").unwrap();
        let long = format!("/{}", "a".repeat(2048));
        assert!(check_id(&td, &long).unwrap_err().contains("2048"));
    }
}
