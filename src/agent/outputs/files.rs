//! An output's files: each replaced atomically with `store::replace_file`, in the order key,
//! certificate, bundle, combined file, CRL; the directory created with the files' mode.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::agent::X509Material;
use crate::issuer::Bundles;
use crate::resource::agent::{Destination, FileMode};
use crate::store::{Owner, replace_file};

/// The x509 output's files, in the order they are replaced.
pub const X509_FILES: [&str; 4] = [
    "svid_key.pem",
    "svid.pem",
    "svid_bundle.pem",
    "credential-bundle.private-key.pem",
];

/// The x509 output's certificate revocation lists (PEM, one per CA of the trust domain), for
/// relying parties that read a CRL file (nginx `ssl_crl`); written when the issuer sent CRLs.
pub const CRL_FILE: &str = "svid_crl.pem";

/// The jwt output's files.
pub const JWT_FILES: [&str; 2] = ["jwt_svid", "jwt_bundle.json"];

/// Why an output's files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "cannot {action} {}: {source}; check the owner and permissions of its parent, or choose another `destination.path`",
        path.display()
    )]
    Directory {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot {action} {}: {source}; check that tbot may write there (owner, permissions, free space), \
         or choose another `destination.path`",
        path.display()
    )]
    Replace {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {source}")]
    IdFile { file: &'static str, source: std::io::Error },
    #[error("no {what} `{name}` in {file}; write its numeric id instead")]
    NoId {
        what: &'static str,
        name: String,
        file: &'static str,
    },
}

/// Writes the x509 files: the key first, then the certificate, the bundle, the combined file.
pub fn write_x509(
    destination: &Destination,
    material: &X509Material,
    bundles: &Bundles,
    federated: bool,
) -> Result<(), WriteError> {
    let dir = Directory::open(destination)?;
    let key = crate::pem::private_key(&material.key);
    let chain = crate::pem::certificates([&material.svid.certificate]);
    let foreign = bundles
        .federated
        .values()
        .filter(|_| federated)
        .flat_map(|b| b.x509_authorities.iter());
    let bundle = crate::pem::certificates(bundles.x509_authorities.iter().chain(foreign));
    let combined = format!("{key}{chain}");
    for (name, text) in X509_FILES.iter().zip([&key, &chain, &bundle, &combined]) {
        dir.replace(name, text.as_bytes())?;
    }
    if !bundles.crls.is_empty() {
        let crls: String = bundles
            .crls
            .iter()
            .map(|der| crate::pem::block("X509 CRL", der))
            .collect();
        dir.replace(CRL_FILE, crls.as_bytes())?;
    }
    Ok(())
}

/// Writes the JWT-SVID (no trailing newline) and the JWT bundle (a JWK Set).
pub fn write_jwt(destination: &Destination, token: &str, bundles: &Bundles) -> Result<(), WriteError> {
    let dir = Directory::open(destination)?;
    dir.replace(JWT_FILES[0], token.as_bytes())?;
    let jwks = serde_json::to_vec_pretty(&bundles.jwks()).expect("JSON");
    dir.replace(JWT_FILES[1], &jwks)
}

/// An output directory, ready for atomic replacements.
struct Directory {
    path: PathBuf,
    mode: FileMode,
    owner: Owner,
}

impl Directory {
    /// Creates the directory if missing (with the files' mode plus `x` where `r`), and resolves the
    /// owner and group.
    fn open(destination: &Destination) -> Result<Directory, WriteError> {
        let mode = destination.mode.unwrap_or(FileMode::DEFAULT);
        let owner = Owner {
            uid: destination
                .owner
                .as_deref()
                .map(|o| id_of(o, "/etc/passwd", "user"))
                .transpose()?,
            gid: destination
                .group
                .as_deref()
                .map(|g| id_of(g, "/etc/group", "group"))
                .transpose()?,
        };
        let path = destination.path.clone();
        // The directory and every missing parent, outermost first, each with the directory's mode
        // and owner: the owner must be able to reach its files (a parent made `root` `0700` would
        // lock it out). Parents that exist are left as they are.
        let missing: Vec<&Path> = path.ancestors().take_while(|p| !p.is_dir()).collect();
        for dir in missing.into_iter().rev() {
            let fail = |action: &'static str, source: std::io::Error| WriteError::Directory {
                action,
                path: dir.to_owned(),
                source,
            };
            match std::fs::DirBuilder::new().mode(mode.directory()).create(dir) {
                Ok(()) => {}
                // Made meanwhile by someone else (another output): theirs stays as it is.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => continue,
                Err(e) => return Err(fail("create the directory", e)),
            }
            // The umask may have taken bits away.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode.directory()))
                .map_err(|e| fail("set the mode of", e))?;
            if owner != Owner::default() {
                std::os::unix::fs::chown(dir, owner.uid, owner.gid).map_err(|e| fail("give its owner and group", e))?;
            }
        }
        Ok(Directory { path, mode, owner })
    }

    /// Replaces `name` atomically ([`crate::store::replace_file`]).
    fn replace(&self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let target = self.path.join(name);
        replace_file(&target, bytes, self.mode.0, self.owner).map_err(|(action, source)| WriteError::Replace {
            action,
            path: target.clone(),
            source,
        })
    }
}

/// A user or group by name (from `file`) or by number.
fn id_of(name: &str, file: &'static str, what: &'static str) -> Result<u32, WriteError> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let text = std::fs::read_to_string(file).map_err(|source| WriteError::IdFile { file, source })?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            Some((fields.next()?, fields.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, id)| id.parse().ok())
        .ok_or_else(|| WriteError::NoId {
            what,
            name: name.to_owned(),
            file,
        })
}

impl crate::error::Explain for WriteError {
    fn hint(&self) -> std::borrow::Cow<'_, str> {
        // Each message says what to check.
        "".into()
    }

    fn is_transient(&self) -> bool {
        matches!(self, WriteError::Replace { .. })
    }
}
