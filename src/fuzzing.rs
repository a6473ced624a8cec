//! The bodies of the fuzz targets in `fuzz/` (`cargo +nightly fuzz run load|template|spiffe_id`).
//! Each takes arbitrary bytes and must not panic; where a parse succeeds it also checks what must
//! then hold. `tests/fuzz_regressions.rs` runs every input in `fuzz/regressions/` and the seed
//! corpus through them on stable, so a crash once found stays fixed.

use std::path::Path;

use crate::manifest;
use crate::resource::spiffe_id::{MAX_ID_LEN, SpiffeId, TrustDomain};
use crate::resource::template::Template;

/// The document loader: bytes in, diagnostics out (each rendered as `tbotctl validate` prints it),
/// never a panic; every diagnostic names the file and a line inside it.
pub fn load(data: &[u8]) {
    let path = Path::new("fuzz.yaml");
    let loaded = manifest::load_bytes(path, data.to_vec());
    // As YAML counts them (LF, CR LF, lone CR), plus one for a position just past the end.
    let text = String::from_utf8_lossy(data);
    let lines = manifest::yaml::source_lines(&text).count() + 1;
    for d in &loaded.diagnostics {
        assert_eq!(d.location.path, path, "{d:?}");
        if let Some(pos) = d.location.pos {
            assert!(pos.line as usize <= lines, "line {} of {lines}: {d:?}", pos.line);
        }
        std::hint::black_box(crate::cli::render::diagnostic(d));
    }
    if !loaded.has_errors() {
        for object in loaded.state.objects.values() {
            assert_eq!(object.hash, manifest::canonical_hash(&object.document));
        }
    }
}

/// The template parser: a template that parses prints back as written and renders with every
/// attribute set.
pub fn template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(template) = Template::parse(text) else { return };
    assert_eq!(template.to_string(), text);
    let rendered = template
        .render(|attribute| Some(format!("<{attribute}>")))
        .expect("every attribute is set");
    std::hint::black_box(rendered);
}

/// The SPIFFE ID parser: an ID that parses prints back as written, fits the length limit, and its
/// trust domain parses alone.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(id) = SpiffeId::parse(text) else { return };
    assert_eq!(id.to_string(), text);
    assert!(text.len() <= MAX_ID_LEN);
    assert!(TrustDomain::parse(id.trust_domain().as_str()).is_ok());
    assert!(id.path().is_empty() || id.path().starts_with('/'));
}
