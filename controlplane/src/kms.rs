//! Customer-managed keys: a tenant's data keys generated, wrapped and unwrapped by its own
//! key in its own AWS KMS (the AWS KMS JSON API: `GenerateDataKey`, `Decrypt`), signed with
//! Signature Version 4 using the control plane's AWS credentials (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), which the tenant's key policy grants.
//!
//! Unwrapped data keys are cached for [`CACHE_TTL`]: once the tenant disables its key, what
//! it sealed stops opening within that time, or sooner when the control plane's KMS watch
//! ([`Kms::check`]) hears of it first (crypto-shredding), and new writes for it stop at once
//! with the error KMS gave. A KMS that does not answer is not waited on again until the
//! watch hears from it. A key is used only while `DescribeKey` says it is
//! `Enabled` (the key policy must grant `kms:DescribeKey`, `kms:GenerateDataKey` and
//! `kms:Decrypt` to the control plane's principal).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long an unwrapped data key is kept in memory.
pub const CACHE_TTL: Duration = Duration::from_secs(60);

/// Where a tenant's key lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsKey {
    /// Key id, ARN or alias (`alias/...`).
    pub key_id: String,
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// The KMS endpoint; default `https://kms.<region>.amazonaws.com`.
    #[serde(default)]
    pub endpoint: Option<String>,
}

impl KmsKey {
    /// Refuses what cannot name a key, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.key_id.is_empty()
            || self.key_id.len() > 2048
            || !self.key_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err("key_id: a KMS key id, ARN or alias".into());
        }
        if self.region.is_empty()
            || self.region.len() > 32
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(format!("region: not an AWS region (got {:?})", self.region));
        }
        if let Some(e) = &self.endpoint {
            let u = url::Url::parse(e).map_err(|err| format!("endpoint: {err}"))?;
            if !matches!(u.scheme(), "https" | "http") || u.host_str().is_none() {
                return Err("endpoint: an http:// or https:// URL".into());
            }
            if u.scheme() == "http" && !u.host_str().is_some_and(crate::client::is_loopback_host) {
                return Err("endpoint: plain http only to a loopback address".into());
            }
        }
        Ok(())
    }

    fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", self.region))
    }

    /// The key and where it is asked, as one string.
    fn ident(&self) -> String {
        format!("{} {} {}", self.endpoint(), self.region, self.key_id)
    }
}

/// The control plane's AWS credentials.
#[derive(Clone)]
struct Credentials {
    access_key: String,
    secret_key: String,
    session_token: Option<String>,
}

impl Credentials {
    fn from_env() -> Result<Self, String> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Ok(Self {
            access_key: var("AWS_ACCESS_KEY_ID")
                .ok_or("AWS_ACCESS_KEY_ID is not set: the control plane has no AWS credentials for customer-managed keys")?,
            secret_key: var("AWS_SECRET_ACCESS_KEY").ok_or("AWS_SECRET_ACCESS_KEY is not set")?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A request to sign: its method, path, query, headers (lowercase names, sorted) and body.
struct Signable<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: &'a [(&'a str, String)],
    body: &'a [u8],
}

/// The `Authorization` header of Signature Version 4 for `req`, at `amz_date`
/// (`YYYYMMDDTHHMMSSZ`), in `region` for `service`.
fn authorization(
    creds: &Credentials,
    req: &Signable<'_>,
    amz_date: &str,
    region: &str,
    service: &str,
) -> String {
    let date = &amz_date[..8];
    let mut canonical = format!("{}\n{}\n{}\n", req.method, req.path, req.query);
    for (n, v) in req.headers {
        canonical.push_str(&format!("{n}:{}\n", v.trim()));
    }
    let signed: Vec<&str> = req.headers.iter().map(|(n, _)| *n).collect();
    let signed = signed.join(";");
    canonical.push_str(&format!(
        "\n{signed}\n{}",
        hex::encode(Sha256::digest(req.body))
    ));
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(
        format!("AWS4{}", creds.secret_key).as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex::encode(hmac(&k_signing, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key
    )
}

fn amz_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Unwrapped data keys by their wrapped form, with when they were unwrapped and by which
/// key ([`KmsKey::ident`]).
type Unwrapped = HashMap<Vec<u8>, ([u8; 32], Instant, String)>;

/// What a tenant's KMS said of its key when the control plane last asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    /// An answer, and not "enabled" (disabled, pending deletion, access denied): what is
    /// sealed under the key does not open until its owner changes that.
    Refused(String),
    /// No answer (timed out, unreachable): calls fail at once until [`Kms::check`] hears
    /// from it again.
    Unreachable(String),
}

/// Customer-managed keys: calls to tenants' KMS keys, and the data keys they unwrapped.
#[derive(Default)]
pub struct Kms {
    cache: Mutex<Unwrapped>,
    agent: std::sync::OnceLock<ureq::Agent>,
    /// Keys whose KMS did not answer, with why: nothing waits on them again until
    /// [`Self::check`] (the control plane's KMS watch) hears from them.
    unreachable: Mutex<HashMap<String, String>>,
}

/// Why a call failed: KMS answered no, or did not answer.
enum CallError {
    Refused(String),
    Unreachable(String),
}

impl From<CallError> for String {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Refused(m) | CallError::Unreachable(m) => m,
        }
    }
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kms")
    }
}

/// The system's trust roots, for KMS over https.
fn agent() -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let mut builder = ureq::AgentBuilder::new().timeout(Duration::from_secs(10));
    if let Ok(config) = config {
        builder = builder.tls_connector(Arc::new(crate::client::Tls(Arc::new(config))));
    }
    builder.build()
}

impl Kms {
    /// A call to the key's KMS; at once an error when that KMS is known not to answer.
    fn call(
        &self,
        key: &KmsKey,
        target: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let ident = key.ident();
        if let Some(why) = self.unreachable_lock().get(&ident) {
            return Err(format!(
                "{why} (not asked again until it answers the control plane's KMS watch)"
            ));
        }
        self.call_raw(key, target, body).map_err(|e| {
            if let CallError::Unreachable(why) = &e {
                tracing::warn!(key = %key.key_id, error = %why, "a tenant's KMS does not answer: what is sealed under its key is not opened until it does");
                self.unreachable_lock().insert(ident, why.clone());
            }
            e.into()
        })
    }

    fn unreachable_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.unreachable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the key's KMS for its state, whether or not it answered last time; marks it
    /// reachable or not accordingly.
    pub fn check(&self, key: &KmsKey) -> KeyState {
        let ident = key.ident();
        let state =
            match self.call_raw(key, "DescribeKey", serde_json::json!({"KeyId": key.key_id})) {
                Ok(v) => match Self::enabled(key, &v) {
                    Ok(()) => KeyState::Enabled,
                    Err(why) => KeyState::Refused(why),
                },
                Err(CallError::Refused(why)) => KeyState::Refused(why),
                Err(CallError::Unreachable(why)) => KeyState::Unreachable(why),
            };
        if let KeyState::Refused(_) = &state {
            // The owner's decision applies now, not when the unwrapped keys age out.
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, (.., by)| *by != ident);
        }
        let mut unreachable = self.unreachable_lock();
        match &state {
            KeyState::Unreachable(why) => {
                unreachable.insert(ident, why.clone());
            }
            _ => {
                unreachable.remove(&ident);
            }
        }
        state
    }

    fn call_raw(
        &self,
        key: &KmsKey,
        target: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, CallError> {
        // Without credentials the control plane cannot ask: that says nothing of the key.
        let creds = Credentials::from_env().map_err(CallError::Unreachable)?;
        let endpoint = key.endpoint();
        let url = url::Url::parse(&endpoint)
            .map_err(|e| CallError::Refused(format!("KMS endpoint {endpoint}: {e}")))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => {
                return Err(CallError::Refused(format!(
                    "KMS endpoint {endpoint}: no host"
                )))
            }
        };
        let body = body.to_string().into_bytes();
        let amz_date = amz_now();
        let mut headers = vec![
            ("content-type", "application/x-amz-json-1.1".to_string()),
            ("host", host),
            ("x-amz-date", amz_date.clone()),
        ];
        if let Some(t) = &creds.session_token {
            headers.push(("x-amz-security-token", t.clone()));
        }
        headers.push(("x-amz-target", format!("TrentService.{target}")));
        let auth = authorization(
            &creds,
            &Signable {
                method: "POST",
                path: "/",
                query: "",
                headers: &headers,
                body: &body,
            },
            &amz_date,
            &key.region,
            "kms",
        );
        let mut req = self
            .agent
            .get_or_init(agent)
            .post(&format!("{}/", endpoint.trim_end_matches('/')))
            .set("authorization", &auth);
        for (n, v) in &headers {
            if *n != "host" {
                req = req.set(n, v);
            }
        }
        match req.send_bytes(&body) {
            Ok(r) => r.into_json::<serde_json::Value>().map_err(|e| {
                // Cut off mid-answer (a timeout) is no answer.
                CallError::Unreachable(format!("KMS {target}: unreadable answer: {e}"))
            }),
            Err(ureq::Error::Status(code, r)) => {
                let v: serde_json::Value = r.into_json().unwrap_or_default();
                let kind = v["__type"].as_str().unwrap_or("error");
                let kind = kind.rsplit('#').next().unwrap_or(kind);
                let msg = v["message"]
                    .as_str()
                    .or(v["Message"].as_str())
                    .unwrap_or("");
                let why = format!("KMS {target} refused ({code} {kind}): {msg}");
                // Throttled, failing, or refusing the control plane's own credentials
                // (expired, unknown, badly signed), KMS said nothing about the key: as if
                // unanswered. A key policy that denies the control plane is the key
                // owner's decision, and counts as refused.
                let ours = matches!(
                    kind,
                    "UnrecognizedClientException"
                        | "ExpiredTokenException"
                        | "InvalidSignatureException"
                        | "IncompleteSignature"
                        | "MissingAuthenticationTokenException"
                        | "InvalidClientTokenId"
                );
                Err(if code == 429 || code >= 500 || ours {
                    CallError::Unreachable(why)
                } else {
                    CallError::Refused(why)
                })
            }
            Err(e) => Err(CallError::Unreachable(format!("KMS {target}: {e}"))),
        }
    }

    fn b64(v: &serde_json::Value, field: &str) -> Result<Vec<u8>, String> {
        v[field]
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| format!("KMS answer without a valid {field}"))
    }

    /// Refuses a key that is not enabled (disabled, pending deletion, pending import): the
    /// tenant's decision stands even where a KMS would still answer.
    fn require_enabled(&self, key: &KmsKey) -> Result<(), String> {
        let v = self.call(key, "DescribeKey", serde_json::json!({"KeyId": key.key_id}))?;
        Self::enabled(key, &v)
    }

    /// Whether a `DescribeKey` answer says the key is enabled.
    fn enabled(key: &KmsKey, v: &serde_json::Value) -> Result<(), String> {
        match v["KeyMetadata"]["KeyState"].as_str() {
            Some("Enabled") => Ok(()),
            Some(state) => Err(format!(
                "KMS key {} is {state}: what is sealed under it stays unreadable until its owner enables it",
                key.key_id
            )),
            None => Err("KMS DescribeKey: no KeyState in the answer".into()),
        }
    }

    /// A fresh 256-bit data key from the tenant's KMS key: (the key, the key wrapped by
    /// KMS, to be stored beside what it seals).
    pub fn generate_data_key(&self, key: &KmsKey) -> Result<([u8; 32], Vec<u8>), String> {
        self.require_enabled(key)?;
        let v = self.call(
            key,
            "GenerateDataKey",
            serde_json::json!({"KeyId": key.key_id, "KeySpec": "AES_256"}),
        )?;
        let plain: [u8; 32] = Self::b64(&v, "Plaintext")?
            .try_into()
            .map_err(|_| "KMS returned a data key that is not 256 bits".to_string())?;
        let wrapped = Self::b64(&v, "CiphertextBlob")?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(wrapped.clone(), (plain, Instant::now(), key.ident()));
        Ok((plain, wrapped))
    }

    /// The data key `wrapped` unwrapped by the tenant's KMS key (from the cache when it
    /// was unwrapped less than [`CACHE_TTL`] ago).
    pub fn decrypt(&self, key: &KmsKey, wrapped: &[u8]) -> Result<[u8; 32], String> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (_, at, _)| at.elapsed() < CACHE_TTL);
            if let Some((k, ..)) = cache.get(wrapped) {
                return Ok(*k);
            }
        }
        self.require_enabled(key)?;
        let v = self.call(
            key,
            "Decrypt",
            serde_json::json!({
                "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode(wrapped),
            }),
        )?;
        let plain: [u8; 32] = Self::b64(&v, "Plaintext")?
            .try_into()
            .map_err(|_| "KMS returned a data key that is not 256 bits".to_string())?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(wrapped.to_vec(), (plain, Instant::now(), key.ident()));
        Ok(plain)
    }

    /// Forgets every unwrapped key (tests of crypto-shredding; an operator's key change).
    pub fn forget(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's Signature Version 4 test suite, "get-vanilla".
    #[test]
    fn signatures_match_the_aws_test_suite() {
        let creds = Credentials {
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let headers = [
            ("host", "example.amazonaws.com".to_string()),
            ("x-amz-date", "20150830T123600Z".to_string()),
        ];
        let auth = authorization(
            &creds,
            &Signable {
                method: "GET",
                path: "/",
                query: "",
                headers: &headers,
                body: b"",
            },
            "20150830T123600Z",
            "us-east-1",
            "service",
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keys_are_checked_field_by_field() {
        let k = |id: &str, region: &str, endpoint: Option<&str>| KmsKey {
            key_id: id.into(),
            region: region.into(),
            endpoint: endpoint.map(Into::into),
        };
        assert!(k("alias/acme", "eu-west-1", None).check().is_ok());
        assert!(k("", "eu-west-1", None)
            .check()
            .unwrap_err()
            .starts_with("key_id"));
        assert!(k("x", "EU", None)
            .check()
            .unwrap_err()
            .starts_with("region"));
        assert!(k("x", "us-east-1", Some("http://kms.example"))
            .check()
            .unwrap_err()
            .starts_with("endpoint"));
        assert!(k("x", "us-east-1", Some("http://127.0.0.1:4566"))
            .check()
            .is_ok());
    }
}
