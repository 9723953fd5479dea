//! Provider credentials sealed at rest: AES-256-GCM under the store's key-encryption key,
//! bound to the id of their upstream, so a sealed value copied onto another row does not
//! open.

use aigw_seal::Kek;
use rusqlite::{Connection, OptionalExtension};

use crate::kms::{Kms, KmsKey};
use crate::store::StoreError;

/// The sealing purpose of provider credentials.
const CREDENTIAL_PURPOSE: &str = "upstream-credential";

/// A credential sealed under a tenant's own KMS key starts with this, then the length of the
/// data key as KMS wrapped it (u32, big-endian), that wrapped key, and the sealed value.
const KMS_MAGIC: &[u8; 8] = b"AIGWKMS1";

/// Whether `sealed` was sealed under a tenant's KMS key.
pub(in crate::store) fn is_kms_sealed(sealed: &[u8]) -> bool {
    sealed.starts_with(KMS_MAGIC)
}

/// Seals a credential: under a data key of the tenant's own KMS key when it has one
/// (`cmk`), else under the store's key.
pub(super) fn seal_credential(
    kek: &Kek,
    cmk: Option<(&Kms, &KmsKey)>,
    id: &str,
    credential: &str,
) -> Result<Vec<u8>, StoreError> {
    let plain = format!("{id}\n{credential}");
    let Some((kms, key)) = cmk else {
        return aigw_seal::seal(kek, CREDENTIAL_PURPOSE, plain.as_bytes())
            .map_err(|e| StoreError::Seal(format!("sealing the credential of {id}: {e}")));
    };
    let (data_key, wrapped) = kms.generate_data_key(key).map_err(StoreError::Kms)?;
    let sealed = aigw_seal::seal(
        &Kek::from_bytes(data_key),
        CREDENTIAL_PURPOSE,
        plain.as_bytes(),
    )
    .map_err(|e| StoreError::Seal(format!("sealing the credential of {id}: {e}")))?;
    let mut out = Vec::with_capacity(12 + wrapped.len() + sealed.len());
    out.extend_from_slice(KMS_MAGIC);
    out.extend_from_slice(&(wrapped.len() as u32).to_be_bytes());
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a credential; one sealed under a tenant's KMS key needs that tenant's key (`cmk`)
/// to answer.
pub(super) fn open_credential(
    kek: &Kek,
    cmk: Option<(&Kms, &KmsKey)>,
    id: &str,
    sealed: &[u8],
) -> Result<String, StoreError> {
    let (key, sealed) = if is_kms_sealed(sealed) {
        let damaged = || StoreError::Seal(format!("the credential of {id} is damaged"));
        let rest = &sealed[KMS_MAGIC.len()..];
        let len = rest
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(damaged)? as usize;
        let wrapped = rest.get(4..4 + len).ok_or_else(damaged)?;
        let (kms, key) = cmk.ok_or_else(|| {
            StoreError::Kms(format!(
                "the credential of {id} is sealed under a KMS key its tenant no longer names"
            ))
        })?;
        let data_key = kms.decrypt(key, wrapped).map_err(StoreError::Kms)?;
        (Kek::from_bytes(data_key), &rest[4 + len..])
    } else {
        (kek.clone(), sealed)
    };
    let plain = aigw_seal::open(&key, CREDENTIAL_PURPOSE, sealed)
        .map_err(|e| StoreError::Seal(format!("the credential of {id}: {e}")))?;
    let plain = String::from_utf8(plain)
        .map_err(|_| StoreError::Seal(format!("the credential of {id} is damaged")))?;
    plain
        .strip_prefix(id)
        .and_then(|p| p.strip_prefix('\n'))
        .map(str::to_string)
        .ok_or_else(|| {
            StoreError::Seal(format!(
                "the credential of {id} was sealed for another upstream"
            ))
        })
}

/// Fails when `kek` does not open the credentials already stored.
/// (Credentials under tenants' own KMS keys are not the store's to check.)
pub(in crate::store) fn check_seal_key(c: &Connection, kek: &Kek) -> Result<(), StoreError> {
    let stored: Option<(String, Vec<u8>)> = c
        .query_row(
            "SELECT id, credential_sealed FROM upstreams WHERE credential_sealed IS NOT NULL
                AND substr(credential_sealed, 1, 8) != CAST('AIGWKMS1' AS BLOB) ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((id, sealed)) = stored {
        open_credential(kek, None, &id, &sealed).map_err(|e| {
            StoreError::Seal(format!(
                "the seal key does not open the stored credentials (a wrong seal key?): {e}"
            ))
        })?;
    }
    Ok(())
}
