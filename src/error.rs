//! The one shape of an error in tbot: every module's `thiserror` enum says what happened (its
//! `Display`, root cause first), what the operator can do next ([`Explain::hint`]), and whether a
//! retry may help ([`Explain::is_transient`]). Callers that show an error to a person use
//! [`Explain::explain`], so the hint is never forgotten on one path and printed on another.

use std::borrow::Cow;

pub trait Explain: std::error::Error {
    /// What to do next, as one clause ("fix the path, then start again").
    fn hint(&self) -> Cow<'_, str>;

    /// Whether the same call may succeed later without an edit (a store or issuer that does not
    /// answer); a terminal error waits for an edit.
    fn is_transient(&self) -> bool {
        false
    }

    /// `message; hint`, for logs, conditions and the command line.
    fn explain(&self) -> String {
        let hint = self.hint();
        if hint.is_empty() {
            self.to_string()
        } else {
            format!("{self}; {hint}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the store does not answer")]
    struct Down;

    impl Explain for Down {
        fn hint(&self) -> Cow<'_, str> {
            "it is retried with backoff".into()
        }
        fn is_transient(&self) -> bool {
            true
        }
    }

    #[test]
    fn an_explained_error_puts_the_cause_first_and_the_hint_after() {
        assert_eq!(Down.explain(), "the store does not answer; it is retried with backoff");
        assert!(Down.is_transient());
    }
}
