//! The CAs in the store: `ca.json` (which CA is active, each one's dates and phase) beside each
//! CA's certificate and sealed key, loaded, created on first use, and written conditionally.

use std::sync::Arc;

use rcgen::KeyPair;
use time::OffsetDateTime;

use super::*;

impl Authority {
    /// Loads the trust domain's CAs from the store; `None` when there are none yet.
    pub async fn load(backing: &Backing, trust_domain: &TrustDomain) -> Result<Option<Authority>, IssuerError> {
        let dir = dir(trust_domain);
        let file_key = file_key(trust_domain);
        let Some((file, revision)) = backing.get_json::<CaFile>(&file_key).await? else {
            return Ok(None);
        };
        let mut loaded = Vec::new();
        for record in file.cas {
            let cert_name = format!("{dir}/ca-{}.der", record.id);
            let key_name = format!("{dir}/ca-{}.key", record.id);
            let missing = |name: &str| backing.corrupt(name, "it is missing");
            let cert_der = backing
                .kv
                .get(&cert_name)
                .await?
                .ok_or_else(|| missing(&cert_name))?
                .value;
            let stored_key = backing
                .kv
                .get(&key_name)
                .await?
                .ok_or_else(|| missing(&key_name))?
                .value;
            let key_der = backing.unseal(&key_name, stored_key)?;
            let key = KeyPair::try_from(key_der.as_slice()).map_err(|e| backing.corrupt(&key_name, e.to_string()))?;
            let algorithm = KeyAlgorithm::parse(&record.algorithm)
                .ok_or_else(|| backing.corrupt(&file_key, format!("unknown key algorithm `{}`", record.algorithm)))?;
            let public_key = key.public_key_raw().to_vec();
            // The certificate must be the key's: a CA certificate swapped in the store (whose key
            // someone else holds) must not enter the bundle.
            let certified = x509_parser::parse_x509_certificate(&cert_der)
                .map(|(_, cert)| cert.public_key().subject_public_key.data.to_vec())
                .map_err(|e| backing.corrupt(&cert_name, e.to_string()))?;
            if certified != public_key {
                return Err(backing.corrupt(
                    &cert_name,
                    format!("its public key is not the one of {key_name}: the CA certificate was replaced"),
                ));
            }
            let issuer = rcgen::Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
                .map_err(|e| backing.corrupt(&cert_name, e.to_string()))?;
            let ca = Ca {
                id: record.id,
                not_after: record.not_after,
                held: crate::issuer::keys::public::Key::of_certificate(&cert_der),
                cert_der,
                issuer,
                public_key,
                algorithm,
            };
            loaded.push((Arc::new(ca), record));
        }
        if !loaded.iter().any(|(ca, _)| ca.id == file.active) {
            return Err(backing.corrupt(&file_key, format!("the active CA {} is not listed", file.active)));
        }
        let (cas, records) = loaded.into_iter().unzip();
        Ok(Some(Authority {
            trust_domain: trust_domain.clone(),
            cas,
            records,
            active: file.active,
            revoked: file.revoked,
            revision,
            unsaved: false,
        }))
    }

    /// Loads the trust domain's CAs, creating the first one when there is none. Replicas racing
    /// here make one CA: the create is conditional on `ca.json` not existing, and the losers load
    /// the winner's.
    pub async fn load_or_create(
        backing: &Backing,
        trust_domain: &TrustDomain,
        settings: &CaSettings,
        now: OffsetDateTime,
    ) -> Result<Authority, IssuerError> {
        loop {
            if let Some(authority) = Authority::load(backing, trust_domain).await? {
                return Ok(authority);
            }
            let empty = Authority {
                trust_domain: trust_domain.clone(),
                cas: Vec::new(),
                records: Vec::new(),
                active: 0,
                revoked: Vec::new(),
                revision: 0,
                unsaved: false,
            };
            let (mut created, ops) = empty.with_new_ca(backing, settings, now, None)?;
            if created.save(backing, ops).await? {
                return Ok(created);
            }
        }
    }

    /// A copy with a new CA made with `settings`: prepared (activating at `activate_at`), or, for
    /// the first CA, active.
    pub(super) fn with_new_ca(
        &self,
        backing: &Backing,
        settings: &CaSettings,
        now: OffsetDateTime,
        activate_at: Option<i64>,
    ) -> Result<(Authority, Vec<Op>), IssuerError> {
        let id = self.cas.iter().map(|ca| ca.id).max().unwrap_or(0) + 1;
        let key = generate_key(settings.algorithm)?;
        let not_after = now + settings.validity;
        let mut params = ca_params(&self.trust_domain, id)?;
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = not_after;
        let cert = params.self_signed(&key).map_err(crypto)?;
        let dir = dir(&self.trust_domain);
        let key_name = format!("{dir}/ca-{id}.key");
        let ops = vec![
            Op::put(&key_name, backing.seal(&key_name, key.serialized_der())),
            Op::put(format!("{dir}/ca-{id}.der"), cert.der().to_vec()),
        ];
        let public_key = key.public_key_raw().to_vec();
        let mut next = self.clone();
        let first = next.records.is_empty();
        next.records.push(CaRecord {
            id,
            algorithm: settings.algorithm.as_str().to_owned(),
            not_after: unix(not_after),
            issued_until: unix(now),
            retire_after: None,
            validity: Some(settings.validity.as_secs()),
            activate_at: if first { None } else { activate_at },
            created: unix(now),
            tainted: None,
        });
        if first {
            next.active = id;
        }
        next.cas.push(Arc::new(Ca {
            id,
            not_after: unix(not_after),
            cert_der: cert.der().to_vec(),
            held: crate::issuer::keys::public::Key::of_certificate(cert.der()),
            issuer: rcgen::Issuer::new(params, key),
            public_key,
            algorithm: settings.algorithm,
        }));
        Ok((next, ops))
    }

    /// Writes `ca.json` (with `ops` in the same transaction) if nobody wrote it since this copy was
    /// read. Returns whether it was written; when not, load the newer one and decide again.
    pub async fn save(&mut self, backing: &Backing, ops: Vec<Op>) -> Result<bool, IssuerError> {
        let file = CaFile {
            active: self.active,
            cas: self.records.clone(),
            revoked: self.revoked.clone(),
        };
        let written = backing
            .put_json_if_unchanged(file_key(&self.trust_domain), &file, &mut self.revision, ops)
            .await?;
        if written {
            self.unsaved = false;
        }
        Ok(written)
    }
}
