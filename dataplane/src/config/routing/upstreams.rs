//! Upstreams built from configuration, whichever source it came from.

use std::sync::Arc;

use crate::config::UpstreamConfig;
use crate::upstream::{tls, BaseUrl, Secret, Upstream};

/// Builds from a validated file entry, its credential read from its variable or file.
pub(crate) fn from_file(c: &UpstreamConfig) -> Result<Arc<Upstream>, String> {
    let credential = match (&c.credential_env, &c.credential_file) {
        (Some(var), _) => {
            Some(Secret::new(std::env::var(var).map_err(|_| {
                format!("environment variable {var} is not set")
            })?))
        }
        (None, Some(f)) => Some(Secret::new(
            crate::seal::files::read_private(f)
                .map_err(|e| e.to_string())?
                .trim()
                .to_string(),
        )),
        (None, None) => None,
    };
    build(c, credential)
}

/// Builds from an entry with the credential given (pushed by the control plane).
pub(crate) fn build(
    c: &UpstreamConfig,
    credential: Option<Secret>,
) -> Result<Arc<Upstream>, String> {
    let url = BaseUrl::parse(&c.base_url).map_err(|e| e.to_string())?;
    let tls = if url.tls {
        Some(tls::TlsClient::new(
            &url.host,
            c.ca_file.as_deref(),
            c.danger_accept_invalid_certs,
        )?)
    } else {
        None
    };
    Ok(Arc::new(Upstream {
        uid: Upstream::next_uid(),
        name: c.name.clone(),
        kind: c.kind,
        host_header: url.host_header(),
        url,
        credential,
        tls,
        max_connections: c.max_connections,
        connect_timeout: c.connect_timeout,
        first_byte_timeout: c.first_byte_timeout,
        read_idle_timeout: c.read_idle_timeout,
        pool_idle_timeout: c.pool_idle_timeout,
        non_retention: c.non_retention(),
        stream_options: c.stream_options,
        pass_organization_headers: c.pass_organization_headers,
        region: c.region.clone(),
        baa: c.baa,
    }))
}
