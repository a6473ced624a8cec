//! Private keys at rest in a shared store: sealed with the replica's key encryption key (KEK),
//! AES-256-GCM, with the key's name in the store (`issuer/<td>/ca-1.key`) as associated data, so a
//! sealed value copied to another name does not open.
//!
//! A sealed value is `tbot-sealed-v1` (14 bytes), the KEK's ID (the first 8 bytes of SHA-256 over
//! `tbot kek id` and the key: it names the KEK without revealing it), a 12-byte random nonce, then
//! the ciphertext and its 16-byte tag.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"tbot-sealed-v1";
const ID_LEN: usize = 8;

/// A key encryption key, read from `key_encryption_key_file`.
pub struct Kek {
    key: LessSafeKey,
    id: [u8; ID_LEN],
    path: PathBuf,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({}, id {})", self.path.display(), crate::hex(&self.id))
    }
}

impl Kek {
    /// Reads the key file: exactly 32 bytes, readable by its owner only. The error says what is
    /// wrong and how to make a good one.
    pub fn load(path: &Path) -> Result<Kek, String> {
        let make = format!(
            "make one with `head -c 32 /dev/urandom > {0} && chmod 600 {0}`, and copy the same file to every replica",
            path.display()
        );
        let metadata = std::fs::metadata(path).map_err(|e| {
            format!(
                "cannot read the key encryption key file {}: {e}; {make}",
                path.display()
            )
        })?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "the key encryption key file {} is readable by other users (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the key encryption key file {}: {e}", path.display()))?;
        if bytes.len() != 32 {
            return Err(format!(
                "the key encryption key file {} holds {} bytes; it must hold exactly 32 random bytes \
                 (not hex, not base64, no newline): {make}",
                path.display(),
                bytes.len()
            ));
        }
        Ok(Kek::from_bytes(&bytes, path))
    }

    /// A KEK from its 32 bytes (`path` names it in messages).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Kek {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes make an AES-256 key"));
        let mut hasher = Sha256::new();
        hasher.update(b"tbot kek id");
        hasher.update(bytes);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&hasher.finalize()[..ID_LEN]);
        Kek {
            key,
            id,
            path: path.to_owned(),
        }
    }

    /// The KEK's ID (hex), for messages.
    pub fn id(&self) -> String {
        crate::hex(&self.id)
    }

    /// Seals `plaintext` to be stored under `name`.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).expect("the random generator works");
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .expect("AES-GCM seals any length we store");
        let mut out = Vec::with_capacity(MAGIC.len() + ID_LEN + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Opens a value sealed for `name`; the error says why it does not open.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let rest = sealed
            .strip_prefix(MAGIC)
            .ok_or("the value is not sealed (it was written without a key encryption key)")?;
        if rest.len() < ID_LEN + NONCE_LEN + 16 {
            return Err("the sealed value is truncated".into());
        }
        let (id, rest) = rest.split_at(ID_LEN);
        if id != self.id {
            return Err(format!(
                "it was sealed with the key encryption key of ID {}, and {} has ID {}",
                crate::hex(id),
                self.path.display(),
                self.id()
            ));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let mut body = body.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_owned())?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| "it does not authenticate: it was changed, or sealed for another name".to_owned())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_under_the_same_name() {
        let kek = Kek::from_bytes(&[7; 32], Path::new("/k"));
        let sealed = kek.seal("issuer/x/ca-1.key", b"secret key");
        assert!(!sealed.windows(10).any(|w| w == b"secret key"));
        assert_eq!(kek.open("issuer/x/ca-1.key", &sealed).unwrap(), b"secret key");
        let moved = kek.open("issuer/x/ca-2.key", &sealed).unwrap_err();
        assert!(moved.contains("sealed for another name"), "{moved}");
        let other = Kek::from_bytes(&[8; 32], Path::new("/other"));
        let wrong = other.open("issuer/x/ca-1.key", &sealed).unwrap_err();
        assert!(wrong.contains(&kek.id()) && wrong.contains("/other"), "{wrong}");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(kek.open("issuer/x/ca-1.key", &tampered).is_err());
        assert!(
            kek.open("issuer/x/ca-1.key", b"\x30\x81plain")
                .unwrap_err()
                .contains("not sealed")
        );
    }

    #[test]
    fn key_files_of_the_wrong_size_or_mode_are_refused_saying_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issuer.kek");
        std::fs::write(&path, [1u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = Kek::load(&path).unwrap_err();
        assert!(
            open.contains("readable by other users") && open.contains("chmod 600"),
            "{open}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Kek::load(&path).unwrap();
        std::fs::write(
            &path,
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        let hex = Kek::load(&path).unwrap_err();
        assert!(
            hex.contains("holds 65 bytes") && hex.contains("head -c 32 /dev/urandom"),
            "{hex}"
        );
        let missing = Kek::load(&dir.path().join("none")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
