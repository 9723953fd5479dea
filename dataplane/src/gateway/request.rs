//! The request transform phase: the parsed body is edited for the upstream it is about to go
//! to, and serialised once with a new Content-Length; the upstream request head is built
//! around it.
//!
//! Each edit is a function over the parsed body and the target; adding one is adding a line
//! to [`EDITS`]. When no edit changes anything the original bytes go out untouched, shared
//! rather than copied; when one does, the body's large values (a long prompt) still go out
//! as slices of the original, between the re-serialised pieces.

use std::borrow::Cow;

use bytes::Bytes;

use crate::adapters::{self, Endpoint};
use crate::body::{JsonBody, Pieces};
use crate::config::routing::Target;
use crate::config::{NonRetention, ProviderKind};
use crate::errors::Family;
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Head;

/// A body and extra header lines ready for one upstream.
#[derive(Debug)]
pub struct Outgoing {
    pub body: Pieces,
    /// Complete header lines (`name: value\r\n`) to add to the forwarded head.
    pub headers: Vec<u8>,
    /// `stream_options.include_usage` was added for the gateway's own metering.
    pub stream_usage_added: bool,
}

/// What an edit works on.
struct Editing<'e, 'b> {
    body: Cow<'e, JsonBody<'b>>,
    out: Outgoing,
    target: &'e Target,
    ctx: &'e RequestCtx,
}

/// One edit: may change the body (`to_mut` copies the parsed members on the first change)
/// and add header lines for this target.
type Edit = fn(&mut Editing<'_, '_>);

/// Applied in order to every forwarded request.
const EDITS: &[Edit] = &[route_model, non_retention, stream_usage, output_limit];

/// Runs the edits for `target`; the parsed body is copied only if one of them changes it.
pub fn prepare(
    ctx: &RequestCtx,
    parsed: &JsonBody<'_>,
    original: &Bytes,
    target: &Target,
) -> Outgoing {
    let mut e = Editing {
        body: Cow::Borrowed(parsed),
        out: Outgoing {
            body: Pieces::default(),
            headers: Vec::new(),
            stream_usage_added: false,
        },
        target,
        ctx,
    };
    for edit in EDITS {
        edit(&mut e);
    }
    let mut out = e.out;
    out.body = if e.body.is_edited() {
        e.body.write_pieces(original, SHARE_FROM)
    } else {
        Pieces::whole(original.clone())
    };
    out
}

/// An edited body's values from this size on are sent as slices of the original.
const SHARE_FROM: usize = 4 * 1024;

/// A route may send another model name than the client's (a deployment name, a pinned
/// version).
fn route_model(e: &mut Editing<'_, '_>) {
    if let Some(m) = &e.target.model {
        e.body
            .to_mut()
            .set("model", &serde_json::Value::String(m.clone()));
    }
}

/// Tells the provider not to retain the request, in the way this upstream understands.
fn non_retention(e: &mut Editing<'_, '_>) {
    match &e.target.upstream.non_retention {
        NonRetention::Header { name, value } => {
            let h = &mut e.out.headers;
            h.extend_from_slice(name.as_bytes());
            h.extend_from_slice(b": ");
            h.extend_from_slice(value.as_bytes());
            h.extend_from_slice(b"\r\n");
        }
        NonRetention::BodyField { name, value } => {
            if takes_body_field(e.target.upstream.kind, e.ctx.endpoint, name) {
                e.body.to_mut().set_raw(name, value.as_str());
            }
        }
        NonRetention::AccountAgreement {} | NonRetention::None {} => {}
    }
}

/// Whether the endpoint takes the body field: OpenAI has `store` on chat completions and
/// responses only, and refuses an argument it does not know on its other endpoints
/// (embeddings and the older completions, which OpenAI does not store); any other field is
/// the operator's to know, and sent everywhere.
fn takes_body_field(kind: ProviderKind, endpoint: Option<Endpoint>, name: &str) -> bool {
    kind != ProviderKind::Openai
        || name != "store"
        || matches!(
            endpoint,
            Some(Endpoint::ChatCompletions | Endpoint::Responses)
        )
}

/// Asks an OpenAI-style upstream for a stream's usage (`stream_options.include_usage`) when
/// the client did not, so every stream's tokens are known; the response transforms take
/// what this adds out again before the client sees it.
fn stream_usage(e: &mut Editing<'_, '_>) {
    let streams_chat = matches!(
        e.ctx.endpoint,
        Some(Endpoint::ChatCompletions | Endpoint::Completions)
    );
    if !e.ctx.stream || !streams_chat || !e.target.upstream.stream_options {
        return;
    }
    if let Some(raw) = adapters::openai::stream_options_with_usage(e.body.get("stream_options")) {
        e.body.to_mut().set_raw("stream_options", &raw);
        e.out.stream_usage_added = true;
    }
}

/// A request covered by a spend cap that set no output limit gets one, so its cost has a
/// bound ([`crate::gateway::spend`]).
fn output_limit(e: &mut Editing<'_, '_>) {
    if let Some(limit) = e.ctx.inject_limit {
        e.body
            .to_mut()
            .set_raw(limit.field, itoa::Buffer::new().format(limit.tokens));
    }
}

/// The client's choice of provider organisation or project: dropped unless the upstream
/// passes it, since the gateway's credential decides the provider account.
fn is_organization_header(name: &[u8]) -> bool {
    (name.len() == 19 && crate::h1::name_eq(name, b"openai-organization"))
        || (name.len() == 14 && crate::h1::name_eq(name, b"openai-project"))
}

/// Writes the forwarded head into `out` (cleared first; a buffer lent by the worker,
/// [`crate::runtime::buffers`], so its capacity carries over between requests): the generated request line and Host,
/// then the client's kept header lines copied as runs of the original bytes, then the
/// gateway's own fields. `reserve` more bytes are reserved behind it for the body when the
/// request will be sent from one buffer.
///
/// Client headers the gateway never forwards ([`aigw_wire::rules::RESERVED_REQUEST_HEADERS`],
/// and those named in `Connection`, RFC 9110 §7.6.1) are left out, and so is a client
/// header of the same name as one the gateway sets (the non-retention header): the
/// gateway's value replaces it, it is not sent beside it.
pub fn build_head(
    head: &Head<'_>,
    target: &Target,
    outgoing: &Outgoing,
    family: Family,
    reserve: usize,
    mut out: Vec<u8>,
) -> Vec<u8> {
    let up = &target.upstream;
    let raw = head.raw();
    let index = head.index();
    out.clear();
    // The head only: `raw` runs on into the body.
    let head_len = index.head_len.min(raw.len());
    out.reserve(head_len + 256 + outgoing.headers.len() + reserve);
    out.extend_from_slice(head.method().as_bytes());
    out.push(b' ');
    out.extend_from_slice(up.url.path_prefix.as_bytes());
    out.extend_from_slice(head.path().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(up.host_header.as_bytes());
    out.extend_from_slice(b"\r\n");

    let connection = head.header("connection").unwrap_or_default();
    let set_by_gateway: &[u8] = match &up.non_retention {
        NonRetention::Header { name, .. } => name.as_bytes(),
        _ => b"",
    };
    let mut run: Option<(usize, usize)> = None;
    for f in &index.fields {
        let name = f.name.get(raw);
        let line_start = f.name.start as usize;
        let line_end = memchr::memchr(b'\n', &raw[f.value.end as usize..])
            .map_or(raw.len(), |i| f.value.end as usize + i + 1);
        let keep = !aigw_wire::rules::is_reserved_request_header(name)
            && !crate::h1::list_contains(connection, name)
            && !name.eq_ignore_ascii_case(set_by_gateway)
            && (up.pass_organization_headers || !is_organization_header(name));
        match (keep, run) {
            (true, Some((s, e))) if e == line_start => run = Some((s, line_end)),
            (true, Some((s, e))) => {
                out.extend_from_slice(&raw[s..e]);
                run = Some((line_start, line_end));
            }
            (true, None) => run = Some((line_start, line_end)),
            (false, Some((s, e))) => {
                out.extend_from_slice(&raw[s..e]);
                run = None;
            }
            (false, None) => {}
        }
    }
    if let Some((s, e)) = run {
        out.extend_from_slice(&raw[s..e]);
    }

    if let Some(cred) = &up.credential {
        adapters::write_credential(up.kind, cred.expose(), &mut out);
    }
    if family == Family::Anthropic && head.header("anthropic-version").is_none() {
        out.extend_from_slice(b"anthropic-version: ");
        out.extend_from_slice(adapters::anthropic::DEFAULT_VERSION.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&outgoing.headers);
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(outgoing.body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::routing::RouteTable;
    use crate::config::Config;
    use crate::config::ProviderKind;

    /// An OpenAI upstream with `extra` settings (an account agreement for non-retention
    /// unless `extra` says otherwise, so bodies stay as sent), routed with `model`.
    fn target(extra: &str, model: &str) -> Target {
        let extra = if extra.contains("non_retention") {
            extra.to_string()
        } else {
            format!("{extra}\nnon_retention = {{ mode = \"account_agreement\" }}")
        };
        let c = Config::parse(
            &format!(
                "[[upstreams]]\nname = \"u\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\n{extra}\n[[routes]]\nprefix = \"\"\ntargets = [{{ upstream = \"u\"{model} }}]\n"
            ),
            "t",
        )
        .expect("valid");
        let t = RouteTable::build(&c).expect("builds");
        let target = t.lookup("x", ProviderKind::Openai).expect("routes")[0].clone();
        target
    }

    fn ctx(endpoint: Endpoint, stream: bool) -> RequestCtx {
        let mut c = RequestCtx::new(
            crate::server::request_id::RequestIdGen::new().next_id(),
            endpoint.family(),
            std::time::Instant::now(),
        );
        c.endpoint = Some(endpoint);
        c.stream = stream;
        c
    }

    fn run(body: &'static [u8], t: &Target, ctx: &RequestCtx) -> (Bytes, Outgoing) {
        let original = Bytes::from_static(body);
        let parsed = JsonBody::parse(&original).expect("valid");
        let out = prepare(ctx, &parsed, &original, t);
        (original, out)
    }

    #[test]
    fn untouched_bodies_are_shared_not_copied() {
        let (original, out) = run(
            br#"{"model":"x","messages":[]}"#,
            &target("", ""),
            &ctx(Endpoint::ChatCompletions, false),
        );
        assert_eq!(out.body.parts()[0].as_ptr(), original.as_ptr());
        assert!(out.headers.is_empty());
        assert!(!out.stream_usage_added);
    }

    #[test]
    fn model_rename_and_body_field_non_retention() {
        let t = target(
            "non_retention = { mode = \"body_field\", name = \"store\", value = false }",
            ", model = \"dep\"",
        );
        let (_, out) = run(
            br#"{"model":"x","messages":[]}"#,
            &t,
            &ctx(Endpoint::ChatCompletions, false),
        );
        assert_eq!(
            &out.body.concat()[..],
            br#"{"model":"dep","messages":[],"store":false}"#
        );
    }

    #[test]
    fn openai_upstreams_send_store_false_by_default_where_the_endpoint_takes_it() {
        let c = Config::parse(
            "[[upstreams]]\nname = \"u\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\n[[routes]]\nprefix = \"\"\ntargets = [{ upstream = \"u\" }]\n",
            "t",
        )
        .expect("valid");
        let table = RouteTable::build(&c).expect("builds");
        let t = table.lookup("x", ProviderKind::Openai).expect("routes")[0].clone();
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses] {
            let (_, out) = run(br#"{"model":"x"}"#, &t, &ctx(endpoint, false));
            assert_eq!(
                &out.body.concat()[..],
                br#"{"model":"x","store":false}"#,
                "{endpoint:?}"
            );
        }
        for endpoint in [Endpoint::Embeddings, Endpoint::Completions] {
            let (original, out) = run(br#"{"model":"x"}"#, &t, &ctx(endpoint, false));
            assert_eq!(
                out.body.parts()[0].as_ptr(),
                original.as_ptr(),
                "{endpoint:?} has no `store`: OpenAI would refuse it"
            );
        }
    }

    #[test]
    fn header_non_retention() {
        let t = target(
            "non_retention = { mode = \"header\", name = \"x-no-retain\", value = \"1\" }",
            "",
        );
        let (original, out) = run(
            br#"{"model":"x"}"#,
            &t,
            &ctx(Endpoint::ChatCompletions, false),
        );
        assert_eq!(out.headers, b"x-no-retain: 1\r\n");
        assert_eq!(out.body.parts()[0].as_ptr(), original.as_ptr());
    }

    #[test]
    fn stream_usage_is_asked_for_only_where_it_applies() {
        let with = target("stream_options = true", "");
        let without = target("", "");
        let chat = ctx(Endpoint::ChatCompletions, true);
        let (_, out) = run(br#"{"model":"x","stream":true}"#, &with, &chat);
        assert!(out.stream_usage_added);
        assert_eq!(
            &out.body.concat()[..],
            br#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#
        );
        // Other stream options are kept.
        let (_, out) = run(
            br#"{"model":"x","stream":true,"stream_options":{"include_obfuscation":false}}"#,
            &with,
            &chat,
        );
        assert!(out.stream_usage_added);
        let v: serde_json::Value = serde_json::from_slice(&out.body.concat()).expect("json");
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_obfuscation": false, "include_usage": true})
        );
        // The client asked: nothing added, nothing to take out.
        let (original, out) = run(
            br#"{"model":"x","stream":true,"stream_options":{"include_usage":true}}"#,
            &with,
            &chat,
        );
        assert!(!out.stream_usage_added);
        assert_eq!(out.body.parts()[0].as_ptr(), original.as_ptr());
        // Not streamed, an upstream without stream_options, another endpoint: untouched.
        for (t, c) in [
            (&with, ctx(Endpoint::ChatCompletions, false)),
            (&without, ctx(Endpoint::ChatCompletions, true)),
            (&with, ctx(Endpoint::Responses, true)),
            (&with, ctx(Endpoint::Embeddings, true)),
        ] {
            let (_, out) = run(br#"{"model":"x","stream":true}"#, t, &c);
            assert!(!out.stream_usage_added, "{:?}", c.endpoint);
        }
    }
}
