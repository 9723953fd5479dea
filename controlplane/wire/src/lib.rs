//! The control-plane ⇄ data-plane wire protocol: messages, records and their codec. No I/O
//! and no runtime, so both planes share it and every byte sequence can be tested and fuzzed
//! on its own. See PROTOCOL.md for the exchange.

#![forbid(unsafe_code)]

pub mod codec;
pub mod frame;
pub mod keys;
pub mod messages;
pub mod routing;
pub mod rules;
pub mod sketch;
pub mod spend;

pub use codec::{Codec, InvalidMessage, Reader};
pub use frame::{decode_frame, encode_frame, Frame, DEFAULT_MAX_FRAME};
pub use messages::{
    Change, KeyRecord, KeyStatus, Message, RateLimits, Record, RecordProblem, Tombstone,
    UsageEntry, PROTOCOL_VERSION,
};
pub use routing::{
    GuardrailAction, GuardrailRecord, PolicyRecord, RouteRecord, RouteTargetRecord, UpstreamRecord,
    GUARDRAIL_ENTITIES,
};
pub use rules::{NonRetention, ProviderKind};
pub use spend::{CapPeriod, CapRecord, CapScope, LimitRecord, PriceRecord};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{put_str, put_u64};
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = KeyRecord> {
        (
            "[a-zA-Z0-9]{1,16}",
            "[a-z0-9-]{1,20}",
            prop_oneof![Just("production"), Just("staging"), Just("development")],
            proptest::option::of("[a-z0-9]{1,12}"),
            any::<[u8; 32]>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec("[a-z0-9.-]{1,20}", 0..4),
        )
            .prop_map(
                |(key_id, tenant_id, env, sub, hash, active, exp, grace, models)| KeyRecord {
                    sub_account_parents: Vec::new(),
                    key_id,
                    tenant_id,
                    environment: env.to_string(),
                    sub_account_id: sub,
                    hash_version: 1,
                    hash,
                    status: if active {
                        KeyStatus::Active
                    } else {
                        KeyStatus::Revoked
                    },
                    expires_at: exp,
                    grace_ends_at: grace,
                    allowed_models: models,
                    rate_limits: crate::RateLimits {
                        requests_per_minute: exp % 7,
                        tokens_per_minute: grace % 100_003,
                    },
                },
            )
    }

    fn upstream() -> impl Strategy<Value = UpstreamRecord> {
        (
            ("[a-z0-9/-]{1,24}", "[a-z0-9-]{1,12}", "[a-z0-9-]{1,12}"),
            prop_oneof![Just("openai"), Just("anthropic")],
            "https?://[a-z0-9.]{1,20}(:[0-9]{1,5})?",
            proptest::option::of("[ -~]{1,40}"),
            prop_oneof![
                Just(NonRetention::None {}),
                Just(NonRetention::AccountAgreement {}),
                ("[a-z-]{1,12}", "[ -~]{0,12}")
                    .prop_map(|(name, value)| NonRetention::Header { name, value }),
                (
                    "[a-z_]{1,12}",
                    prop_oneof![Just("false"), Just("true"), Just("\"x\"")]
                )
                    .prop_map(|(name, v)| NonRetention::BodyField {
                        name,
                        value: rules::JsonText(v.to_string())
                    }),
            ],
            (any::<bool>(), "[a-z]{0,4}", any::<bool>(), any::<bool>()),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |(
                    (id, tenant_id, name),
                    provider,
                    base_url,
                    credential,
                    non_retention,
                    (stream_options, region, baa, pass_organization_headers),
                    (mc, ct, fb, ri),
                )| {
                    UpstreamRecord {
                        id,
                        tenant_id,
                        environment: "staging".into(),
                        name,
                        provider: provider.into(),
                        base_url,
                        credential,
                        non_retention,
                        stream_options,
                        region,
                        baa,
                        pass_organization_headers,
                        max_connections: mc,
                        connect_timeout_ms: ct,
                        first_byte_timeout_ms: fb,
                        read_idle_timeout_ms: ri,
                    }
                },
            )
    }

    fn route() -> impl Strategy<Value = RouteRecord> {
        (
            "[a-z0-9/-]{1,24}",
            prop_oneof![
                "[a-z0-9.-]{1,12}".prop_map(|m| (Some(m), None)),
                "[a-z0-9.-]{0,12}".prop_map(|p| (None, Some(p))),
            ],
            proptest::collection::vec(
                ("[a-z0-9-]{1,12}", proptest::option::of("[a-z0-9.-]{1,12}"))
                    .prop_map(|(upstream, model)| RouteTargetRecord { upstream, model }),
                0..4,
            ),
        )
            .prop_map(|(id, (model, prefix), targets)| RouteRecord {
                id,
                tenant_id: "t".into(),
                environment: "production".into(),
                model,
                prefix,
                targets,
            })
    }

    fn policy() -> impl Strategy<Value = PolicyRecord> {
        (
            "[a-z0-9/-]{1,24}",
            any::<bool>(),
            "[a-z]{0,4}",
            any::<bool>(),
            proptest::collection::vec(("[a-z]{1,8}", 0u8..3, 0u8..3), 0..4),
        )
            .prop_map(|(id, zero_retention, region, hipaa, guardrails)| {
                let action = |a: u8| match a {
                    0 => GuardrailAction::Allow,
                    1 => GuardrailAction::Redact,
                    _ => GuardrailAction::Block,
                };
                PolicyRecord {
                    id,
                    tenant_id: "t".into(),
                    environment: "development".into(),
                    zero_retention,
                    region,
                    hipaa,
                    guardrails: guardrails
                        .into_iter()
                        .map(|(entity, q, r)| GuardrailRecord {
                            entity,
                            requests: action(q),
                            responses: action(r),
                        })
                        .collect(),
                    guardrails_fail_open: hipaa && zero_retention,
                    patterns: if hipaa {
                        vec!["a[0-9]{2}".into()]
                    } else {
                        vec![]
                    },
                }
            })
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            key().prop_map(Record::Key),
            upstream().prop_map(Record::Upstream),
            route().prop_map(Record::Route),
            policy().prop_map(Record::Policy),
            (
                "[a-z0-9_]{1,12}",
                0u64..3,
                "[a-z0-9_]{1,12}",
                0u64..3,
                any::<u64>()
            )
                .prop_map(|(id, scope, scope_id, period, limit_micros)| {
                    Record::Cap(CapRecord {
                        id,
                        tenant_id: "t".into(),
                        scope: [CapScope::Tenant, CapScope::SubAccount, CapScope::Key]
                            [scope as usize],
                        scope_id,
                        period: [CapPeriod::Day, CapPeriod::Month, CapPeriod::Lifetime]
                            [period as usize],
                        limit_micros,
                    })
                }),
            ("[a-z]{0,4}", "[a-z0-9.-]{1,12}", any::<[u64; 4]>()).prop_map(
                |(tenant_id, model, r)| Record::Price(PriceRecord {
                    id: PriceRecord::id_of(&tenant_id, &model),
                    tenant_id,
                    model,
                    input: r[0],
                    output: r[1],
                    cached_input: r[2],
                    cache_write: r[3],
                })
            ),
            ("[a-z0-9_]{1,12}", any::<u64>(), any::<u64>()).prop_map(|(id, rpm, tpm)| {
                Record::Limit(LimitRecord {
                    id,
                    tenant_id: "t".into(),
                    requests_per_minute: rpm,
                    tokens_per_minute: tpm,
                })
            }),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                "[a-z0-9-]{0,20}",
                any::<u64>(),
                any::<u64>(),
                "[a-zA-Z0-9]{0,20}"
            )
                .prop_map(|(node_id, boot_epoch, revision_held, token)| {
                    Message::Hello {
                        protocol_version: PROTOCOL_VERSION,
                        node_id,
                        boot_epoch,
                        revision_id: revision_held.wrapping_mul(31),
                        revision_held,
                        token,
                    }
                }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(
                    prop_oneof![
                        record().prop_map(Change::Upsert),
                        (1u64..5, "[a-z0-9]{1,10}")
                            .prop_map(|(kind, id)| Change::Delete(Tombstone { kind, id })),
                    ],
                    0..8
                )
            )
                .prop_map(|(from_revision, to_revision, changes)| Message::Changes {
                    from_revision,
                    revision_id: to_revision.rotate_left(7),
                    to_revision,
                    changes,
                }),
            (
                any::<u64>(),
                any::<u64>(),
                1u64..10,
                proptest::collection::vec(record(), 0..8)
            )
                .prop_map(|(revision, part, parts, records)| Message::Snapshot {
                    revision,
                    part,
                    parts,
                    records,
                    revision_id: revision.rotate_left(3),
                }),
            (
                any::<u64>(),
                proptest::collection::vec(
                    (any::<u64>(), "[a-z/]{0,12}", "[ -~]{0,30}")
                        .prop_map(|(kind, id, error)| { RecordProblem { kind, id, error } }),
                    0..3
                )
            )
                .prop_map(|(revision, problems)| Message::Ack {
                    revision,
                    problems_total: problems.len() as u64,
                    problems
                }),
            (any::<u64>(), ".{0,40}")
                .prop_map(|(revision, error)| Message::Nack { revision, error }),
            any::<u64>().prop_map(|unix_ms| Message::Heartbeat { unix_ms }),
            "[ -~]{0,40}".prop_map(|reason| Message::Refused { reason }),
            (
                "[a-zA-Z0-9_]{0,40}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(token, public_key)| Message::Enroll { token, public_key }),
            (
                "[a-z0-9-]{0,20}",
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(node_id, cert_der)| Message::Enrolled { node_id, cert_der }),
            (
                "[a-z0-9-]{0,12}",
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(
                    (
                        (
                            "[a-z0-9]{1,10}",
                            "[a-z0-9-]{1,10}",
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>()
                        ),
                        (
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>(),
                            any::<u64>()
                        ),
                        proptest::collection::vec(0u64..100_000_000, 0..20),
                    )
                        .prop_map(
                            |(
                                (key_id, model, requests, input_tokens, output_tokens, day),
                                (
                                    errors,
                                    cached_input_tokens,
                                    cache_write_tokens,
                                    reasoning_tokens,
                                    estimated_requests,
                                    cost_micros,
                                ),
                                latencies,
                            )| {
                                let mut latency = crate::sketch::Sketch::default();
                                let mut ttfb = crate::sketch::Sketch::default();
                                for v in latencies {
                                    latency.record(v);
                                    ttfb.record(v / 3);
                                }
                                UsageEntry {
                                    key_id,
                                    model,
                                    requests,
                                    input_tokens,
                                    output_tokens,
                                    day,
                                    errors,
                                    cached_input_tokens,
                                    cache_write_tokens,
                                    reasoning_tokens,
                                    estimated_requests,
                                    cost_micros,
                                    latency,
                                    ttfb,
                                }
                            }
                        ),
                    0..5
                )
            )
                .prop_map(|(node_id, boot_epoch, seq, entries)| Message::UsageReport {
                    node_id,
                    boot_epoch,
                    seq,
                    entries
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(boot_epoch, seq)| Message::UsageAck { boot_epoch, seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(boot_epoch, seq)| Message::EventAck { boot_epoch, seq }),
            ("[a-z0-9_]{0,12}", any::<u64>(), any::<u64>()).prop_map(|(cap_id, period, m)| {
                Message::LeaseRequest {
                    cap_id,
                    period,
                    want_micros: m,
                }
            }),
            ("[a-z0-9_]{0,12}", any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(cap_id, period, granted_micros, exhausted)| {
                    Message::LeaseGrant {
                        cap_id,
                        period,
                        granted_micros,
                        exhausted,
                    }
                }
            ),
            ("[a-z0-9_]{0,12}", any::<u64>(), any::<u64>()).prop_map(|(cap_id, period, micros)| {
                Message::LeaseReturn {
                    cap_id,
                    period,
                    micros,
                }
            }),
            (
                "[a-z0-9-]{0,12}",
                any::<u64>(),
                any::<u64>(),
                "[a-z_]{1,20}",
                ".{0,40}"
            )
                .prop_map(|(node_id, boot_epoch, seq, kind, detail)| Message::Event {
                    node_id,
                    boot_epoch,
                    seq,
                    kind,
                    detail
                }),
            (
                (
                    "[a-z0-9-]{0,12}",
                    any::<u64>(),
                    any::<u64>(),
                    "[a-z0-9_]{0,12}"
                ),
                ("[a-z0-9-]{0,12}", ".{0,40}"),
                proptest::collection::vec(any::<u8>(), 0..64),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(
                    |(
                        (node_id, boot_epoch, seq, tenant_id),
                        (request_id, meta),
                        request,
                        response,
                    )| {
                        Message::BodyLog {
                            node_id,
                            boot_epoch,
                            seq,
                            tenant_id,
                            request_id,
                            meta,
                            request,
                            response,
                        }
                    }
                ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(boot_epoch, seq)| Message::BodyLogAck { boot_epoch, seq }),
            (
                proptest::collection::vec("[a-z0-9_]{1,12}", 0..4),
                proptest::collection::vec("[a-z0-9_]{1,12}", 0..4)
            )
                .prop_map(|(off, refuse)| Message::BodyLogTenants { off, refuse }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips_through_a_frame(msg in message()) {
            let mut out = Vec::new();
            encode_frame(&msg, &mut out);
            let (frame, used) = decode_frame(&out, DEFAULT_MAX_FRAME).expect("valid").expect("complete");
            prop_assert_eq!(used, out.len());
            prop_assert_eq!(frame, Frame::Message(msg));
        }

        #[test]
        fn any_prefix_is_incomplete_not_an_error(msg in message(), cut in 0usize..64) {
            let mut out = Vec::new();
            encode_frame(&msg, &mut out);
            let cut = cut.min(out.len() - 1);
            prop_assert_eq!(decode_frame(&out[..cut], DEFAULT_MAX_FRAME), Ok(None));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, DEFAULT_MAX_FRAME);
            let _ = Message::decode_body(2, &bytes);
            let _ = Message::decode_body(3, &bytes);
            let _ = KeyRecord::from_bytes(&bytes);
            let _ = UpstreamRecord::from_bytes(&bytes);
            let _ = RouteRecord::from_bytes(&bytes);
            let _ = PolicyRecord::from_bytes(&bytes);
        }
    }

    #[test]
    fn unknown_fields_and_records_from_a_newer_peer_are_skipped() {
        let k = KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: "k1".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            sub_account_id: None,
            hash_version: 1,
            hash: [7; 32],
            status: KeyStatus::Active,
            expires_at: 0,
            grace_ends_at: 0,
            allowed_models: vec![],
            rate_limits: Default::default(),
        };
        let mut body = k.to_bytes();
        put_str(&mut body, 99, "a field from the future");
        put_u64(&mut body, 100, 42);
        assert_eq!(KeyRecord::from_bytes(&body), Ok(k.clone()));

        // A snapshot carrying a record kind this version does not know.
        let mut snap = Vec::new();
        put_u64(&mut snap, 1, 5);
        put_u64(&mut snap, 3, 1);
        codec::put_field(&mut snap, 4, |o| {
            codec::put_field(o, 77, |o| o.extend_from_slice(b"opaque"))
        });
        codec::put_field(&mut snap, 4, |o| Record::Key(k.clone()).encode(o));
        let m = Message::decode_body(messages::types::SNAPSHOT, &snap)
            .expect("valid")
            .expect("known type");
        assert_eq!(
            m,
            Message::Snapshot {
                revision: 5,
                part: 0,
                parts: 1,
                records: vec![
                    Record::Unknown {
                        kind: 77,
                        body: b"opaque".to_vec()
                    },
                    Record::Key(k)
                ],
                revision_id: 0,
            }
        );
    }

    #[test]
    fn unknown_message_types_are_skipped_whole() {
        let mut out = Vec::new();
        out.extend_from_slice(&7u32.to_be_bytes());
        out.extend_from_slice(&999u16.to_be_bytes());
        out.extend_from_slice(b"hello");
        encode_frame(
            &Message::Ack {
                revision: 3,
                problems: vec![],
                problems_total: 0,
            },
            &mut out,
        );
        let (f, used) = decode_frame(&out, DEFAULT_MAX_FRAME)
            .expect("valid")
            .expect("complete");
        assert_eq!((f, used), (Frame::Unknown(999), 11));
        let (f, _) = decode_frame(&out[used..], DEFAULT_MAX_FRAME)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            f,
            Frame::Message(Message::Ack {
                revision: 3,
                problems: vec![],
                problems_total: 0,
            })
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        let mut out = Vec::new();
        out.extend_from_slice(&(64u32 << 20).to_be_bytes());
        assert_eq!(
            decode_frame(&out, DEFAULT_MAX_FRAME),
            Err(InvalidMessage::FrameTooLarge(64 << 20))
        );
    }

    #[test]
    fn bytes_per_key_record_in_a_snapshot() {
        // A typical key: 12-char public id, a tenant uuid, production, no sub-account,
        // SHA-256 hash, active, an expiry, no model restriction.
        let k = Record::Key(KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: "k7Hq2Lx9Pw3Z".into(),
            tenant_id: "5f0c3a1e-8b2d-4c6f-9a7e-1d2b3c4d5e6f".into(),
            environment: "production".into(),
            sub_account_id: None,
            hash_version: 1,
            hash: [0xab; 32],
            status: KeyStatus::Active,
            expires_at: 1_900_000_000,
            grace_ends_at: 0,
            allowed_models: vec![],
            rate_limits: Default::default(),
        });
        let mut per = Vec::new();
        codec::put_field(&mut per, 4, |o| k.encode(o));
        // Documented in PROTOCOL.md; a change here is a change to the figure there.
        assert_eq!(per.len(), 115);
    }
}
