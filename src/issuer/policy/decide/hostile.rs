//! Every `workload_identity` template in the project's examples (`manifests/`, the valid fixtures,
//! the YAML of the README and docs/), rendered with hostile attribute values: what a bot or a workload's owner
//! would send to make the SPIFFE ID of another identity. A value is either refused where the issuer
//! takes it (the catalogue's types), refused by the render (a `/`, or an ID that is not a SPIFFE
//! ID), or fills exactly one segment of its own identity's ID, which then equals no other
//! identity's ID unless the two templates already overlap with ordinary values.

use std::path::{Path, PathBuf};

use super::*;
use crate::manifest::load_bytes;
use crate::resource::Document;
use crate::resource::template::{AttrType, CATALOGUE, workload_value_problem};

/// What a hostile caller tries in one attribute.
fn hostile_values() -> Vec<String> {
    vec![
        "0/db".into(),
        "/".into(),
        "..".into(),
        ".".into(),
        "%2f".into(),
        "a%2Fdb".into(),
        "a\u{2215}db".into(),  // DIVISION SLASH
        "a\u{FF0F}db".into(),  // FULLWIDTH SOLIDUS
        "a\u{2044}db".into(),  // FRACTION SLASH
        "\u{0430}dmin".into(), // Cyrillic a
        "a\\db".into(),
        "*".into(),
        "admin.prod".into(),
        "a?db".into(),
        "a#db".into(),
        "a\ndb".into(),
        "-1".into(),
        "00".into(),
        "root".into(),
        String::new(),
        "x".repeat(4096),
    ]
}

/// An ordinary value of an attribute, for the attributes a case does not attack.
fn ordinary(name: &str) -> String {
    let kind = CATALOGUE
        .iter()
        .find(|(n, _)| name == *n || name.starts_with(&format!("{n}.")))
        .map(|(_, k)| *k);
    match kind {
        Some(AttrType::Int) => "1000".into(),
        Some(AttrType::Bool) => "true".into(),
        _ => "svc".into(),
    }
}

const HOLE: &str = "\u{1}";

/// The pieces between the holes of a template.
fn pieces(template: &Template) -> Vec<String> {
    let shape = template
        .render(|_| Some(HOLE.to_owned()))
        .expect("every attribute has a value");
    shape.split(HOLE).map(str::to_owned).collect()
}

/// The pieces between the holes of an identity's SPIFFE ID path.
fn skeleton(wi: &WorkloadIdentity) -> Vec<String> {
    pieces(&wi.spec.spiffe.id)
}

/// Whether `path` can be what `pieces` render to with each hole one non-empty segment (no `/`).
fn fits(pieces: &[String], path: &str) -> bool {
    fits_holes(pieces, path, &['/'])
}

/// Whether `text` can be what `pieces` render to with each hole non-empty and free of `forbidden`.
fn fits_holes(pieces: &[String], text: &str, forbidden: &[char]) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return text.is_empty();
    };
    let Some(after) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    if rest.is_empty() {
        return after.is_empty();
    }
    (1..=after.len())
        .filter(|&n| after.is_char_boundary(n) && !after[..n].contains(forbidden))
        .any(|n| fits_holes(rest, &after[n..], forbidden))
}

/// The `workload_identity` documents of one file (or README block), by a name saying where they came from.
fn identities_in(source: &str, text: &str) -> Vec<(String, WorkloadIdentity)> {
    let loaded = load_bytes(Path::new(source), text.as_bytes().to_vec());
    loaded
        .state
        .objects
        .values()
        .filter_map(|o| match &o.document {
            Document::WorkloadIdentity(wi) => Some((format!("{source}: {}", wi.metadata.name), wi.clone())),
            _ => None,
        })
        .collect()
}

fn example_identities() -> Vec<(String, WorkloadIdentity)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![
        root.join("manifests"),
        root.join("tests/fixtures/valid"),
        root.join("packaging/etc"),
    ];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("an examples directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("a readable example");
        out.extend(identities_in(&path.display().to_string(), &text));
    }
    let mut prose = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    prose.extend(docs);
    for path in prose {
        let text = std::fs::read_to_string(&path).expect("a readable document");
        for (i, block) in text.split("```yaml").skip(1).enumerate() {
            let block = block.split("```").next().unwrap_or_default();
            if block.contains("kind: workload_identity") {
                out.extend(identities_in(
                    &format!("{} yaml block {}", path.display(), i + 1),
                    block,
                ));
            }
        }
    }
    // The case the issue found: an allowed template that is a prefix of a denied identity's; and a
    // DNS SAN made of a value a workload's owner chooses.
    out.extend(identities_in(
        "issue 26",
        "kind: workload_identity\nversion: v1\nmetadata: {name: uid}\nspec: {spiffe: {id: '/uid/{{workload.unix.uid}}'}}\n---\n\
         kind: workload_identity\nversion: v1\nmetadata: {name: db-wi}\nspec: {spiffe: {id: '/uid/{{workload.unix.uid}}/db'}}\n---\n\
         kind: workload_identity\nversion: v1\nmetadata: {name: svc}\nspec: {spiffe: {id: '/svc/{{workload.systemd.service}}', \
         x509: {dns_sans: ['{{workload.systemd.service}}.internal']}}}\n",
    ));
    out
}

#[test]
fn no_hostile_value_renders_another_identitys_spiffe_id() {
    let td = TrustDomain::parse("example.org").expect("a trust domain");
    let identities = example_identities();
    assert!(identities.len() >= 6, "too few example identities: {identities:?}");
    let skeletons: Vec<Vec<String>> = identities.iter().map(|(_, wi)| skeleton(wi)).collect();
    let prefix = "spiffe://example.org";
    let (mut refused_at_the_boundary, mut refused_by_the_render, mut rendered) = (0, 0, 0);
    for (i, (name, wi)) in identities.iter().enumerate() {
        let sans: Vec<&Template> = wi
            .spec
            .spiffe
            .x509
            .as_ref()
            .map(|x| x.dns_sans.iter().collect())
            .unwrap_or_default();
        let read: Vec<String> = std::iter::once(&wi.spec.spiffe.id)
            .chain(sans.iter().copied())
            .flat_map(|t| t.attributes())
            .map(|a| a.to_string())
            .collect();
        for attacked in &read {
            for value in hostile_values() {
                // The issuer refuses a workload attribute of the wrong type before any decision.
                if attacked.starts_with("workload.")
                    && workload_value_problem(attacked, std::slice::from_ref(&value)).is_some()
                {
                    refused_at_the_boundary += 1;
                    continue;
                }
                let mut attributes = Attributes::new();
                for other in &read {
                    attributes.set(other.clone(), ordinary(other));
                }
                attributes.set(attacked.clone(), &value);
                let Ok(decision) = render(&td, wi, &wi.parse_claim_templates(), &attributes) else {
                    refused_by_the_render += 1;
                    continue;
                };
                rendered += 1;
                let path = decision
                    .spiffe_id
                    .strip_prefix(prefix)
                    .expect("an ID of the trust domain");
                assert!(
                    fits(&skeletons[i], path),
                    "{name}: `{attacked}` = {value:?} rendered {path}, which is not one segment per value"
                );
                // A value fills one DNS label: no dot, no wildcard.
                for (template, san) in sans.iter().zip(&decision.dns_sans) {
                    assert!(
                        fits_holes(&pieces(template), san, &['.', '*']),
                        "{name}: `{attacked}` = {value:?} rendered the DNS SAN {san}, which is not one label per value"
                    );
                }
                for (j, (other, _)) in identities.iter().enumerate() {
                    if i == j || !fits(&skeletons[j], path) {
                        continue;
                    }
                    // Allowed only when the two templates overlap with ordinary values already: a
                    // configuration choice, not something a value made.
                    let ordinary_id = skeletons[i].join("svc");
                    assert!(
                        fits(&skeletons[j], &ordinary_id) || fits(&skeletons[i], &skeletons[j].join("svc")),
                        "{name}: `{attacked}` = {value:?} rendered {path}, an ID of {other}"
                    );
                }
            }
        }
    }
    assert!(refused_at_the_boundary > 0 && refused_by_the_render > 0 && rendered > 0);
}

#[test]
fn the_shape_check_itself_tells_one_segment_from_two() {
    let pieces = vec!["/uid/".to_owned(), "/db".to_owned()];
    assert!(fits(&pieces, "/uid/0/db"));
    assert!(!fits(&pieces, "/uid/0/x/db"));
    assert!(!fits(&pieces, "/uid//db"));
    assert!(fits(&["/uid/".to_owned(), String::new()], "/uid/0"));
    assert!(!fits(&["/uid/".to_owned(), String::new()], "/uid/0/db"));
}
