//! Records for what an environment routes: its upstreams (with their credentials), its
//! routes, and its policy. Every one belongs to one (tenant, environment); ids are unique
//! per kind across the control plane.

use crate::codec::{
    get_str, get_u64, put_field, put_str, put_u64, within_expansion, Codec, InvalidMessage, Reader,
};
use crate::rules::{JsonText, NonRetention};

/// One upstream of one environment. `Default` is an empty record: every optional field
/// absent, every setting the node's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamRecord {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    /// Unique within the environment; routes name it.
    pub name: String,
    /// `openai` or `anthropic`.
    pub provider: String,
    pub base_url: String,
    /// The provider credential; the link is TLS and nodes keep it sealed on disk.
    pub credential: Option<String>,
    pub non_retention: NonRetention,
    pub stream_options: bool,
    /// Where the provider processes data; empty when unknown.
    pub region: String,
    /// A business associate agreement covers it (PHI allowed).
    pub baa: bool,
    /// Forward the client's `OpenAI-Organization` and `OpenAI-Project` headers (dropped
    /// otherwise: the gateway's credential decides the provider account).
    pub pass_organization_headers: bool,
    /// Connections per worker; 0 = the node's default.
    pub max_connections: u64,
    /// Milliseconds; 0 = the node's default.
    pub connect_timeout_ms: u64,
    pub first_byte_timeout_ms: u64,
    pub read_idle_timeout_ms: u64,
}

/// Where one route sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTargetRecord {
    /// An upstream's name in the same environment.
    pub upstream: String,
    /// Model name to send instead of the client's.
    pub model: Option<String>,
}

/// One route of one environment: an exact model name or a prefix, to upstreams in
/// failover order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRecord {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    /// Exactly one of `model` and `prefix` is set.
    pub model: Option<String>,
    pub prefix: Option<String>,
    pub targets: Vec<RouteTargetRecord>,
}

/// What an environment's requests must never do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub id: String,
    pub tenant_id: String,
    pub environment: String,
    /// Never route to an upstream that cannot be told not to retain.
    pub zero_retention: bool,
    /// Only upstreams in this region; empty = any.
    pub region: String,
    /// Only upstreams under a BAA.
    pub hipaa: bool,
    /// PII and secret guardrails: per entity, what is done in requests and in responses
    /// (an entity not listed is allowed both ways).
    pub guardrails: Vec<GuardrailRecord>,
    /// When the guardrail scanner cannot run or fails, relay unscanned (and report it)
    /// instead of refusing.
    pub guardrails_fail_open: bool,
    /// The tenant's own patterns (Hyperscan syntax), found as the `custom` entity.
    pub patterns: Vec<String>,
}

/// What a guardrail does with an entity it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuardrailAction {
    #[default]
    Allow,
    /// Replaced by a typed placeholder (`[EMAIL_1]`).
    Redact,
    /// The request (or the rest of the response) is refused.
    Block,
}

impl GuardrailAction {
    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Redact => "redact",
            Self::Block => "block",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Self::Allow,
            "redact" => Self::Redact,
            "block" => Self::Block,
            _ => return None,
        })
    }

    fn code(self) -> u64 {
        match self {
            Self::Allow => 0,
            Self::Redact => 1,
            Self::Block => 2,
        }
    }

    fn from_code(tag: u64, v: u64) -> Result<Self, InvalidMessage> {
        Ok(match v {
            0 => Self::Allow,
            1 => Self::Redact,
            2 => Self::Block,
            _ => return Err(InvalidMessage::BadField { tag }),
        })
    }
}

/// One entity's guardrail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardrailRecord {
    /// `email`, `phone`, `card`, `ssn`, `iban`, `ip` or `secret`.
    pub entity: String,
    pub requests: GuardrailAction,
    pub responses: GuardrailAction,
}

/// The entities guardrails know (`custom`: what the tenant's own patterns find).
pub const GUARDRAIL_ENTITIES: [&str; 8] = [
    "email", "phone", "card", "ssn", "iban", "ip", "secret", "custom",
];

pub(crate) fn flag(tag: u64, body: &[u8]) -> Result<bool, InvalidMessage> {
    match get_u64(tag, body)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(InvalidMessage::BadField { tag }),
    }
}

pub(crate) fn put_nonzero(out: &mut Vec<u8>, tag: u64, v: u64) {
    if v != 0 {
        put_u64(out, tag, v);
    }
}

fn put_nonempty(out: &mut Vec<u8>, tag: u64, v: &str) {
    if !v.is_empty() {
        put_str(out, tag, v);
    }
}

pub(crate) fn required(v: Option<String>, tag: u64) -> Result<String, InvalidMessage> {
    v.ok_or(InvalidMessage::MissingField { tag })
}

impl Codec for UpstreamRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        put_str(out, 2, &self.tenant_id);
        put_str(out, 3, &self.environment);
        put_str(out, 4, &self.name);
        put_str(out, 5, &self.provider);
        put_str(out, 6, &self.base_url);
        if let Some(c) = &self.credential {
            put_str(out, 7, c);
        }
        match &self.non_retention {
            NonRetention::None {} => {}
            NonRetention::Header { name, value } => {
                put_str(out, 8, "header");
                put_str(out, 9, name);
                put_str(out, 10, value);
            }
            NonRetention::BodyField { name, value } => {
                put_str(out, 8, "body_field");
                put_str(out, 9, name);
                put_str(out, 10, value.as_str());
            }
            NonRetention::AccountAgreement {} => put_str(out, 8, "account_agreement"),
        }
        put_nonzero(out, 11, u64::from(self.stream_options));
        put_nonempty(out, 12, &self.region);
        put_nonzero(out, 13, u64::from(self.baa));
        put_nonzero(out, 14, self.max_connections);
        put_nonzero(out, 15, self.connect_timeout_ms);
        put_nonzero(out, 16, self.first_byte_timeout_ms);
        put_nonzero(out, 17, self.read_idle_timeout_ms);
        put_nonzero(out, 18, u64::from(self.pass_organization_headers));
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id, mut environment, mut name) = (None, None, None, None);
        let (mut provider, mut base_url, mut credential) = (None, None, None);
        let (mut nr_mode, mut nr_name, mut nr_value) =
            (String::new(), String::new(), String::new());
        let mut rec = UpstreamRecord::default();
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => environment = Some(get_str(body)?),
                4 => name = Some(get_str(body)?),
                5 => provider = Some(get_str(body)?),
                6 => base_url = Some(get_str(body)?),
                7 => credential = Some(get_str(body)?),
                8 => nr_mode = get_str(body)?,
                9 => nr_name = get_str(body)?,
                10 => nr_value = get_str(body)?,
                11 => rec.stream_options = flag(tag, body)?,
                12 => rec.region = get_str(body)?,
                13 => rec.baa = flag(tag, body)?,
                14 => rec.max_connections = get_u64(tag, body)?,
                15 => rec.connect_timeout_ms = get_u64(tag, body)?,
                16 => rec.first_byte_timeout_ms = get_u64(tag, body)?,
                17 => rec.read_idle_timeout_ms = get_u64(tag, body)?,
                18 => rec.pass_organization_headers = flag(tag, body)?,
                _ => {}
            }
        }
        rec.non_retention = match nr_mode.as_str() {
            "" => NonRetention::None {},
            "header" => NonRetention::Header {
                name: nr_name,
                value: nr_value,
            },
            "body_field" => NonRetention::BodyField {
                name: nr_name,
                value: JsonText(nr_value),
            },
            "account_agreement" => NonRetention::AccountAgreement {},
            _ => return Err(InvalidMessage::BadField { tag: 8 }),
        };
        rec.id = required(id, 1)?;
        rec.tenant_id = required(tenant_id, 2)?;
        rec.environment = required(environment, 3)?;
        rec.name = required(name, 4)?;
        rec.provider = required(provider, 5)?;
        rec.base_url = required(base_url, 6)?;
        rec.credential = credential;
        Ok(rec)
    }
}

impl Codec for RouteTargetRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.upstream);
        if let Some(m) = &self.model {
            put_str(out, 2, m);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut upstream, mut model) = (None, None);
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => upstream = Some(get_str(body)?),
                2 => model = Some(get_str(body)?),
                _ => {}
            }
        }
        Ok(Self {
            upstream: required(upstream, 1)?,
            model,
        })
    }
}

impl Codec for RouteRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        put_str(out, 2, &self.tenant_id);
        put_str(out, 3, &self.environment);
        if let Some(m) = &self.model {
            put_str(out, 4, m);
        }
        if let Some(p) = &self.prefix {
            put_str(out, 5, p);
        }
        for t in &self.targets {
            put_field(out, 6, |o| t.encode(o));
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id, mut environment) = (None, None, None);
        let (mut model, mut prefix, mut targets) = (None, None, Vec::new());
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => environment = Some(get_str(body)?),
                4 => model = Some(get_str(body)?),
                5 => prefix = Some(get_str(body)?),
                6 => {
                    within_expansion(
                        targets.len() + 1,
                        std::mem::size_of::<RouteTargetRecord>(),
                        r.total_len(),
                    )?;
                    targets.push(RouteTargetRecord::from_bytes(body)?)
                }
                _ => {}
            }
        }
        Ok(Self {
            id: required(id, 1)?,
            tenant_id: required(tenant_id, 2)?,
            environment: required(environment, 3)?,
            model,
            prefix,
            targets,
        })
    }
}

impl Codec for PolicyRecord {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.id);
        put_str(out, 2, &self.tenant_id);
        put_str(out, 3, &self.environment);
        put_nonzero(out, 4, u64::from(self.zero_retention));
        put_nonempty(out, 5, &self.region);
        put_nonzero(out, 6, u64::from(self.hipaa));
        for g in &self.guardrails {
            put_field(out, 7, |o| {
                put_str(o, 1, &g.entity);
                put_nonzero(o, 2, g.requests.code());
                put_nonzero(o, 3, g.responses.code());
            });
        }
        put_nonzero(out, 8, u64::from(self.guardrails_fail_open));
        for p in &self.patterns {
            put_str(out, 9, p);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage> {
        let (mut id, mut tenant_id, mut environment) = (None, None, None);
        let (mut zero_retention, mut region, mut hipaa) = (false, String::new(), false);
        let mut guardrails = Vec::new();
        let mut guardrails_fail_open = false;
        let mut patterns = Vec::new();
        while !r.is_empty() {
            let (tag, body) = r.field()?;
            match tag {
                1 => id = Some(get_str(body)?),
                2 => tenant_id = Some(get_str(body)?),
                3 => environment = Some(get_str(body)?),
                4 => zero_retention = flag(tag, body)?,
                5 => region = get_str(body)?,
                6 => hipaa = flag(tag, body)?,
                7 => {
                    let mut g = Reader::new(body);
                    let mut entity = None;
                    let (mut requests, mut responses) =
                        (GuardrailAction::Allow, GuardrailAction::Allow);
                    while !g.is_empty() {
                        let (t, b) = g.field()?;
                        match t {
                            1 => entity = Some(get_str(b)?),
                            2 => requests = GuardrailAction::from_code(t, get_u64(t, b)?)?,
                            3 => responses = GuardrailAction::from_code(t, get_u64(t, b)?)?,
                            _ => {}
                        }
                    }
                    guardrails.push(GuardrailRecord {
                        entity: required(entity, 1)?,
                        requests,
                        responses,
                    });
                }
                8 => guardrails_fail_open = flag(tag, body)?,
                9 => {
                    crate::codec::within_expansion(
                        patterns.len() + 1,
                        std::mem::size_of::<String>(),
                        r.total_len(),
                    )?;
                    patterns.push(get_str(body)?);
                }
                _ => {}
            }
        }
        Ok(Self {
            id: required(id, 1)?,
            tenant_id: required(tenant_id, 2)?,
            environment: required(environment, 3)?,
            zero_retention,
            region,
            hipaa,
            guardrails,
            guardrails_fail_open,
            patterns,
        })
    }
}
