//! The body pipeline: the request body is parsed once, edited for the upstream it is about to
//! go to, and serialised once with a new Content-Length.
//!
//! Each edit is a function over the parsed body and the target; adding one (redaction,
//! injected fields, cost reservation) is adding a line to [`EDITS`]. When no edit changes
//! anything the original bytes go out untouched, shared rather than copied.

use std::borrow::Cow;

use bytes::Bytes;

use crate::body::JsonBody;
use crate::config::NonRetention;
use crate::routes::Target;

/// A body and extra header lines ready for one upstream.
#[derive(Debug)]
pub struct Outgoing {
    pub body: Bytes,
    /// Complete header lines (`name: value\r\n`) to add to the forwarded head.
    pub headers: Vec<u8>,
}

/// One edit: may change the body (`to_mut` copies the parsed members on the first change)
/// and add header lines for this target.
type Edit = fn(&mut Cow<'_, JsonBody<'_>>, &mut Vec<u8>, &Target);

/// Applied in order to every forwarded request.
const EDITS: &[Edit] = &[route_model, non_retention];

/// Runs the edits for `target`; the parsed body is copied only if one of them changes it.
pub fn prepare(parsed: &JsonBody<'_>, original: &Bytes, target: &Target) -> Outgoing {
    let mut body = Cow::Borrowed(parsed);
    let mut headers = Vec::new();
    for edit in EDITS {
        edit(&mut body, &mut headers, target);
    }
    let body = if body.is_edited() {
        let mut out = Vec::with_capacity(original.len() + 64);
        body.write(&mut out);
        Bytes::from(out)
    } else {
        original.clone()
    };
    Outgoing { body, headers }
}

/// A route may send another model name than the client's (a deployment name, a pinned
/// version).
fn route_model(body: &mut Cow<'_, JsonBody<'_>>, _: &mut Vec<u8>, target: &Target) {
    if let Some(m) = &target.model {
        body.to_mut()
            .set("model", &serde_json::Value::String(m.clone()));
    }
}

/// Tells the provider not to retain the request, in the way this upstream understands.
fn non_retention(body: &mut Cow<'_, JsonBody<'_>>, headers: &mut Vec<u8>, target: &Target) {
    match &target.upstream.non_retention {
        NonRetention::Header { name, value } => {
            headers.extend_from_slice(name.as_bytes());
            headers.extend_from_slice(b": ");
            headers.extend_from_slice(value.as_bytes());
            headers.extend_from_slice(b"\r\n");
        }
        NonRetention::BodyField { name, value } => body.to_mut().set_raw(name, value.as_str()),
        NonRetention::AccountAgreement {} | NonRetention::None {} => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::ProviderKind;
    use crate::routes::RouteTable;

    fn target(extra: &str, model: &str) -> Target {
        let c = Config::parse(
            &format!(
                "[[upstreams]]\nname = \"u\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1\"\n{extra}\n[[routes]]\nprefix = \"\"\ntargets = [{{ upstream = \"u\"{model} }}]\n"
            ),
            "t",
        )
        .expect("valid");
        let t = RouteTable::build(&c).expect("builds");
        let target = t.lookup("x", ProviderKind::Openai)[0].clone();
        target
    }

    #[test]
    fn untouched_bodies_are_shared_not_copied() {
        let original = Bytes::from_static(br#"{"model":"x","messages":[]}"#);
        let parsed = JsonBody::parse(&original).expect("valid");
        let out = prepare(&parsed, &original, &target("", ""));
        assert_eq!(out.body.as_ptr(), original.as_ptr());
        assert!(out.headers.is_empty());
    }

    #[test]
    fn model_rename_and_body_field_non_retention() {
        let original = Bytes::from_static(br#"{"model":"x","messages":[]}"#);
        let parsed = JsonBody::parse(&original).expect("valid");
        let t = target(
            "non_retention = { mode = \"body_field\", name = \"store\", value = false }",
            ", model = \"dep\"",
        );
        let out = prepare(&parsed, &original, &t);
        assert_eq!(
            &out.body[..],
            br#"{"model":"dep","messages":[],"store":false}"#
        );
    }

    #[test]
    fn header_non_retention() {
        let original = Bytes::from_static(br#"{"model":"x"}"#);
        let parsed = JsonBody::parse(&original).expect("valid");
        let t = target(
            "non_retention = { mode = \"header\", name = \"x-no-retain\", value = \"1\" }",
            "",
        );
        let out = prepare(&parsed, &original, &t);
        assert_eq!(out.headers, b"x-no-retain: 1\r\n");
        assert_eq!(out.body.as_ptr(), original.as_ptr());
    }
}
