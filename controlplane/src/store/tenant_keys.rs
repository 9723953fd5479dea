//! Customer-managed keys: an enterprise tenant names its own AWS KMS key, and its provider
//! credentials are sealed from then on under data keys that key generates (see
//! [`crate::kms`]).

use rusqlite::params;

use super::routing::tenant_kms;
use super::{audit, now, Actor, Store, StoreError};
use crate::kms::KmsKey;
use aigw_seal::Kek;

impl Store {
    /// Names the tenant's own KMS key (enterprise tier only). The key is tried first — a
    /// data key generated with it — so a key KMS refuses is refused here with KMS's words.
    /// Credentials written from then on are sealed under it; those sealed before keep their
    /// key until they are written again.
    pub fn set_tenant_kms(
        &self,
        actor: &Actor,
        tenant: &str,
        key: &KmsKey,
    ) -> Result<KmsKey, StoreError> {
        key.check().map_err(StoreError::Invalid)?;
        let tier: String = self.read(|c| {
            super::tenant_exists(c, tenant)?;
            Ok(c.query_row(
                "SELECT tier FROM tenants WHERE id = ?1",
                params![tenant],
                |r| r.get(0),
            )?)
        })?;
        if tier != "enterprise" {
            return Err(StoreError::Invalid(format!(
                "key_id: customer-managed keys are for enterprise tenants (tenant {tenant} is {tier})"
            )));
        }
        self.kms.generate_data_key(key).map_err(StoreError::Kms)?;
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO tenant_kms (tenant_id, key_id, region, endpoint, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (tenant_id) DO UPDATE SET key_id = excluded.key_id, region = excluded.region,
                    endpoint = excluded.endpoint, updated_at = excluded.updated_at",
                params![tenant, key.key_id, key.region, key.endpoint, now()],
            )?;
            audit(
                tx,
                actor,
                "tenant.kms_key",
                tenant,
                serde_json::json!({"key_id": key.key_id, "region": key.region, "endpoint": key.endpoint}),
            )?;
            Ok(key.clone())
        })
    }

    /// The tenant's own KMS key, if it named one.
    pub fn tenant_kms(&self, tenant: &str) -> Result<Option<KmsKey>, StoreError> {
        self.read(|c| {
            super::tenant_exists(c, tenant)?;
            tenant_kms(c, tenant)
        })
    }

    /// A fresh data key from the tenant's own KMS key, and its wrapped copy to keep beside
    /// what it seals; `None` when the tenant has no key of its own.
    pub fn tenant_data_key(&self, tenant: &str) -> Result<Option<(Kek, Vec<u8>)>, StoreError> {
        let Some(key) = self.read(|c| tenant_kms(c, tenant))? else {
            return Ok(None);
        };
        let (plain, wrapped) = self.kms.generate_data_key(&key).map_err(StoreError::Kms)?;
        Ok(Some((Kek::from_bytes(plain), wrapped)))
    }

    /// A data key `tenant_data_key` gave, unwrapped by the tenant's own KMS key.
    pub fn tenant_unwrap(&self, tenant: &str, wrapped: &[u8]) -> Result<Kek, StoreError> {
        let key = self.read(|c| tenant_kms(c, tenant))?.ok_or_else(|| {
            StoreError::Kms(format!(
                "sealed under a KMS key tenant {tenant} no longer names"
            ))
        })?;
        Ok(Kek::from_bytes(
            self.kms.decrypt(&key, wrapped).map_err(StoreError::Kms)?,
        ))
    }

    /// Keeps the KMS-wrapped key of a body log segment sealed under a tenant's own key.
    pub fn body_segment_key_set(
        &self,
        seg: &crate::store::SegmentRow,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO body_log_segment_keys (tenant_id, day, segment_id, wrapped_key) VALUES (?1, ?2, ?3, ?4)",
                params![seg.tenant_id, seg.day, seg.segment_id, wrapped],
            )?;
            Ok(())
        })
    }

    /// The KMS-wrapped key of a body log segment, when its tenant's own key sealed it.
    pub fn body_segment_key(
        &self,
        seg: &crate::store::SegmentRow,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        use rusqlite::OptionalExtension;
        self.read(|c| {
            Ok(c.query_row(
                "SELECT wrapped_key FROM body_log_segment_keys WHERE tenant_id = ?1 AND day = ?2 AND segment_id = ?3",
                params![seg.tenant_id, seg.day, seg.segment_id],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    /// Every tenant that names its own KMS key, with the key.
    pub fn tenants_with_kms(&self) -> Result<Vec<(String, KmsKey)>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT tenant_id, key_id, region, endpoint FROM tenant_kms ORDER BY tenant_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    KmsKey {
                        key_id: r.get(1)?,
                        region: r.get(2)?,
                        endpoint: r.get(3)?,
                    },
                ))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Offers nodes again the tenant's upstreams whose credentials its own KMS key sealed
    /// (a changelog entry each, the records unchanged): what nodes hold of them then
    /// follows whether that key opens them now — left out when it does not, back when it
    /// does again. Returns how many.
    pub fn resend_kms_sealed(&self, tenant: &str) -> Result<usize, StoreError> {
        self.with_tx(|tx| {
            let ids: Vec<String> = {
                let mut st = tx.prepare(
                    "SELECT id, credential_sealed FROM upstreams WHERE tenant_id = ?1 ORDER BY id",
                )?;
                let rows = st.query_map(params![tenant], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
                })?;
                let mut ids = Vec::new();
                for row in rows {
                    let (id, sealed) = row?;
                    if sealed.as_deref().is_some_and(super::routing::is_kms_sealed) {
                        ids.push(id);
                    }
                }
                ids
            };
            for id in &ids {
                super::change(tx, "upstream", id, "upsert")?;
            }
            Ok(ids.len())
        })
    }

    /// Forgets the data keys unwrapped so far: the next use asks the tenants' KMS again.
    pub fn forget_unwrapped_keys(&self) {
        self.kms.forget();
    }
}
