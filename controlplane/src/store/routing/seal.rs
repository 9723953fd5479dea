//! Provider credentials sealed at rest: AES-256-GCM under the store's key-encryption key,
//! bound to the id of their upstream, so a sealed value copied onto another row does not
//! open.

use aigw_seal::Kek;
use rusqlite::{Connection, OptionalExtension};

use crate::store::StoreError;

/// The sealing purpose of provider credentials.
const CREDENTIAL_PURPOSE: &str = "upstream-credential";

pub(super) fn seal_credential(
    kek: &Kek,
    id: &str,
    credential: &str,
) -> Result<Vec<u8>, StoreError> {
    aigw_seal::seal(
        kek,
        CREDENTIAL_PURPOSE,
        format!("{id}\n{credential}").as_bytes(),
    )
    .map_err(|e| StoreError::Seal(format!("sealing the credential of {id}: {e}")))
}

pub(super) fn open_credential(kek: &Kek, id: &str, sealed: &[u8]) -> Result<String, StoreError> {
    let plain = aigw_seal::open(kek, CREDENTIAL_PURPOSE, sealed)
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
pub(in crate::store) fn check_seal_key(c: &Connection, kek: &Kek) -> Result<(), StoreError> {
    let stored: Option<(String, Vec<u8>)> = c
        .query_row(
            "SELECT id, credential_sealed FROM upstreams WHERE credential_sealed IS NOT NULL ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((id, sealed)) = stored {
        open_credential(kek, &id, &sealed).map_err(|e| {
            StoreError::Seal(format!(
                "the seal key does not open the stored credentials (a wrong seal key?): {e}"
            ))
        })?;
    }
    Ok(())
}
