//! Frame codec: bytes in, typed message or a descriptive error out, never a panic.

use serde::{de::DeserializeOwned, Serialize};

/// Default cap on one control frame. Bodies travel in their own chunked frames, so
/// control messages stay small; a peer that sends more is broken or hostile.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Longest serde message we pass on, so a hostile peer cannot bloat our logs.
const MAX_REASON_LEN: usize = 200;

/// Why a frame did not decode into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is bigger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Size of the frame.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The frame is not a message of this protocol.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Decodes one frame. Errors never quote field values, which may be secrets.
pub fn decode<T: DeserializeOwned>(frame: &[u8], max_len: usize) -> Result<T, DecodeError> {
    fits(frame.len(), max_len)?;
    serde_json::from_slice(frame).map_err(|e| DecodeError::Invalid(describe(&e)))
}

/// [`decode`] for a frame that is text already (a WebSocket text frame, checked as
/// UTF-8 when it was read): its strings are not checked again.
pub fn decode_text<T: DeserializeOwned>(frame: &str, max_len: usize) -> Result<T, DecodeError> {
    fits(frame.len(), max_len)?;
    serde_json::from_str(frame).map_err(|e| DecodeError::Invalid(describe(&e)))
}

fn fits(len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    Ok(())
}

/// Encodes one message as the text of a frame.
pub fn encode<T: Serialize>(msg: &T) -> String {
    // Our message types contain only strings, numbers and maps with string keys, for
    // which serde_json cannot fail; an empty object keeps this total all the same.
    serde_json::to_string(msg).unwrap_or_else(|_| String::from("{}"))
}

fn describe(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // "invalid type: string \"<value>\"" would echo the value back; say where instead.
    if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        return format!(
            "a field has the wrong type or value at line {} column {}",
            e.line(),
            e.column()
        );
    }
    let mut out: String = msg.chars().take(MAX_REASON_LEN).collect();
    if out.len() < msg.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        CapabilityOffer, CapabilityQuery, DeviceId, DeviceSecret, DeviceToHub, ErrorCode,
        Heartbeat, HubToDevice, Register, Registered, ServiceInfo,
    };
    use proptest::prelude::*;

    fn service() -> impl Strategy<Value = ServiceInfo> {
        (
            "[a-z][a-z0-9-]{0,20}",
            any::<u16>(),
            proptest::option::of("/[a-z/]{0,20}"),
            proptest::collection::vec("[a-zA-Z0-9:._/-]{1,30}", 0..3),
            any::<bool>(),
        )
            .prop_map(|(name, port, health_path, models, tcp)| ServiceInfo {
                name,
                port,
                health_path,
                kind: match (models.is_empty(), tcp) {
                    (false, _) => crate::ServiceKind::OpenAi,
                    (true, true) => crate::ServiceKind::Tcp,
                    (true, false) => crate::ServiceKind::Http,
                },
                models,
            })
    }

    fn load() -> impl Strategy<Value = crate::LoadReport> {
        (
            1u32..512,
            0f32..100.0,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(("\\PC{1,20}", any::<u64>(), 0u32..101), 0..3),
        )
            .prop_map(|(cpus, cpu, total, used, gpus)| crate::LoadReport {
                cpu_count: cpus,
                cpu_percent: cpu,
                ram_total_bytes: total,
                ram_used_bytes: used,
                gpus: gpus
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, mem, util))| crate::GpuReport {
                        index: i as u32,
                        name,
                        uuid: format!("GPU-{i}"),
                        memory_total_bytes: mem,
                        memory_used_bytes: mem / 2,
                        utilization_percent: util,
                        temperature_c: Some(40),
                    })
                    .collect(),
            })
    }

    fn device_to_hub() -> impl Strategy<Value = DeviceToHub> {
        prop_oneof![
            (
                proptest::collection::vec(any::<u32>(), 0..4),
                "[A-Za-z0-9_-]{32,64}",
                proptest::option::of("\\PC{0,40}"),
                "\\PC{0,40}",
                proptest::collection::vec(service(), 0..4),
                proptest::collection::vec(offer(), 0..3),
                "\\PC{0,10}",
                proptest::option::of("\\PC{0,20}"),
                proptest::option::of(load()),
            )
                .prop_map(
                    |(
                        versions,
                        secret,
                        setup_token,
                        name,
                        services,
                        capabilities,
                        agent,
                        location,
                        load,
                    )| {
                        DeviceToHub::Register(Register {
                            versions,
                            secret: DeviceSecret::new(secret).expect("generated long enough"),
                            setup_token,
                            name,
                            services,
                            capabilities,
                            agent_version: agent,
                            location,
                            max_frame_bytes: Some(64 * 1024),
                            instance: Some("0123456789abcdef".into()),
                            load,
                        })
                    }
                ),
            (any::<u64>(), proptest::option::of(load())).prop_map(|(seq, load)| {
                DeviceToHub::Heartbeat(Heartbeat {
                    seq,
                    load,
                    services: vec![],
                })
            }),
            proptest::collection::vec(service(), 0..5)
                .prop_map(|services| DeviceToHub::ServiceRegister { services }),
            proptest::collection::vec(offer(), 0..5)
                .prop_map(|capabilities| DeviceToHub::CapabilitiesUpdate { capabilities }),
            (
                any::<u64>(),
                query(),
                payload(),
                proptest::option::of(device_id()),
                any::<u64>()
            )
                .prop_map(
                    |(request_id, capability, payload, prefer_device, deadline_ms)| {
                        DeviceToHub::CapabilityRequest {
                            request_id,
                            capability,
                            payload,
                            prefer_device,
                            deadline_ms,
                        }
                    }
                ),
            (any::<u64>(), payload()).prop_map(|(request_id, payload)| DeviceToHub::Response {
                request_id,
                outcome: crate::Outcome::Ok(crate::DeviceReply::Capability { payload }),
            }),
            Just(DeviceToHub::Draining),
        ]
    }

    fn offer() -> impl Strategy<Value = CapabilityOffer> {
        (
            "[a-z][a-z0-9._-]{0,15}",
            0u64..5,
            0u64..20,
            0u64..20,
            any::<bool>(),
            proptest::collection::vec("[a-zA-Z0-9:/._-]{1,12}", 0..3),
        )
            .prop_map(|(protocol, major, minor, patch, idempotent, models)| {
                CapabilityOffer {
                    protocol,
                    version: semver::Version::new(major, minor, patch),
                    idempotent,
                    models,
                }
            })
    }

    fn query() -> impl Strategy<Value = CapabilityQuery> {
        (
            "[a-z][a-z0-9._-]{0,15}",
            proptest::option::of((0u64..5, 0u64..20, 0u64..20)),
            proptest::option::of("[a-zA-Z0-9:/._-]{1,12}"),
        )
            .prop_map(|(protocol, v, model)| CapabilityQuery {
                protocol,
                version: v.map(|(a, b, c)| semver::Version::new(a, b, c)),
                model,
            })
    }

    fn device_id() -> impl Strategy<Value = DeviceId> {
        proptest::collection::vec(any::<u8>(), 16).prop_map(|mac| DeviceId::from_mac(&mac))
    }

    /// JSON payloads of the shapes plugins exchange: text, vectors, nested objects.
    fn payload() -> impl Strategy<Value = crate::Payload> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "\\PC{0,20}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
        .prop_map(crate::Payload::from)
    }

    fn hub_to_device() -> impl Strategy<Value = HubToDevice> {
        prop_oneof![
            (
                proptest::collection::vec(any::<u8>(), 16),
                any::<u32>(),
                any::<u64>(),
                any::<bool>(),
                proptest::option::of(any::<u64>()),
                proptest::collection::vec("\\PC{0,40}", 0..3)
            )
                .prop_map(|(mac, v, hb, enrolled, max, hubs)| HubToDevice::Registered(
                    Registered {
                        device_id: DeviceId::from_mac(&mac),
                        protocol_version: v,
                        heartbeat_interval_ms: hb,
                        enrolled,
                        max_frame_bytes: max,
                        hubs,
                    }
                )),
            (
                prop_oneof![
                    Just(ErrorCode::BadRequest),
                    Just(ErrorCode::TokenUsed),
                    Just(ErrorCode::NotEnrolled),
                    Just(ErrorCode::DeviceRemoved),
                    Just(ErrorCode::Internal),
                    Just(ErrorCode::Unavailable)
                ],
                "\\PC{0,60}"
            )
                .prop_map(|(code, message)| HubToDevice::Error { code, message }),
            (any::<u64>(), query(), payload(), any::<u64>()).prop_map(
                |(request_id, capability, payload, deadline_ms)| HubToDevice::Request {
                    request_id,
                    deadline_ms,
                    request: crate::DeviceRequest::Capability {
                        capability,
                        payload
                    },
                }
            ),
            (any::<u64>(), device_id(), payload()).prop_map(
                |(request_id, from_device, payload)| {
                    HubToDevice::CapabilityResponse {
                        request_id,
                        outcome: crate::CapabilityOutcome::Ok(crate::CapabilityAnswer {
                            from_device,
                            payload,
                        }),
                    }
                }
            ),
            (any::<u64>(), "\\PC{0,40}").prop_map(|(request_id, message)| {
                HubToDevice::CapabilityResponse {
                    request_id,
                    outcome: crate::CapabilityOutcome::Error(crate::RemoteError {
                        code: ErrorCode::NoCapableDevice,
                        message,
                    }),
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn device_to_hub_round_trips(msg in device_to_hub()) {
            let text = encode(&msg);
            let back: DeviceToHub = decode(text.as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn hub_to_device_round_trips(msg in hub_to_device()) {
            let text = encode(&msg);
            let back: HubToDevice = decode(text.as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn the_direct_path_decodes_what_the_general_one_does(a in device_to_hub(), b in hub_to_device()) {
            let (a, b) = (encode(&a), encode(&b));
            prop_assert_eq!(
                crate::decode_device_frame(&a, usize::MAX),
                decode::<DeviceToHub>(a.as_bytes(), usize::MAX)
            );
            prop_assert_eq!(
                crate::decode_hub_frame(&b, usize::MAX),
                decode::<HubToDevice>(b.as_bytes(), usize::MAX)
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<DeviceToHub>(&bytes, DEFAULT_MAX_FRAME_BYTES);
            let _ = decode::<HubToDevice>(&bytes, DEFAULT_MAX_FRAME_BYTES);
            let text = String::from_utf8_lossy(&bytes);
            let _ = crate::decode_device_frame(&text, DEFAULT_MAX_FRAME_BYTES);
            let _ = crate::decode_hub_frame(&text, DEFAULT_MAX_FRAME_BYTES);
        }

        #[test]
        fn json_shaped_garbage_never_panics(s in "\\{\"type\":\"(register|heartbeat|service_register|capabilities_update|capability_request|response|x)\"(,\"[a-z_]{1,10}\":(\\[|\\{|\"|[0-9]|null|true)){0,4}\\}?") {
            let _ = decode::<DeviceToHub>(s.as_bytes(), DEFAULT_MAX_FRAME_BYTES);
            prop_assert_eq!(
                crate::decode_device_frame(&s, DEFAULT_MAX_FRAME_BYTES),
                decode::<DeviceToHub>(s.as_bytes(), DEFAULT_MAX_FRAME_BYTES)
            );
        }
    }

    fn task_strategy() -> impl Strategy<Value = crate::tasks::Task> {
        use crate::tasks::{Task, TaskId, TaskStatus};
        (
            "\\PC{1,30}",
            "\\PC{0,30}",
            proptest::sample::select(TaskStatus::ALL.to_vec()),
            proptest::option::of(proptest::collection::vec("\\PC{0,10}", 1..4)),
            proptest::option::of(any::<i32>()),
            any::<i64>(),
            any::<u128>(),
        )
            .prop_map(
                |(title, description, status, command, exit_code, at, id)| Task {
                    id: TaskId(uuid::Uuid::from_u128(id)),
                    title,
                    description,
                    status,
                    command,
                    requirements: vec![],
                    input: Some(serde_json::json!({"n": 1})),
                    output: None,
                    exit_code,
                    error: None,
                    created_at: at,
                    updated_at: at,
                    device_id: Some(DeviceId::from_mac(&[7; 16])),
                },
            )
    }

    proptest! {
        #[test]
        fn requests_round_trip(id in any::<u64>(), deadline in any::<u64>(), limit in any::<u32>(), after in proptest::option::of((any::<i64>(), any::<u128>())), text in proptest::option::of("\\PC{0,20}")) {
            use crate::tasks::{Position, TaskFilter, TaskId};
            use crate::DeviceRequest;
            let request = DeviceRequest::ListTasks {
                filter: TaskFilter { text, ..Default::default() },
                after: after.map(|(c, i)| Position { created_at: c, id: TaskId(uuid::Uuid::from_u128(i)) }),
                limit,
            };
            let msg = HubToDevice::Request { request_id: id, deadline_ms: deadline, request };
            let back: HubToDevice = decode(encode(&msg).as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn responses_round_trip(id in any::<u64>(), tasks in proptest::collection::vec(task_strategy(), 0..4), fail in any::<bool>()) {
            use crate::tasks::TaskPage;
            use crate::{DeviceReply, Outcome, RemoteError};
            let outcome = if fail {
                Outcome::Error(RemoteError { code: ErrorCode::NotFound, message: "gone".into() })
            } else {
                Outcome::Ok(DeviceReply::Tasks { page: TaskPage { tasks, next: None } })
            };
            let msg = DeviceToHub::Response { request_id: id, outcome };
            let text = encode(&msg);
            let back: DeviceToHub = decode(text.as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(&back, &msg);
            prop_assert_eq!(
                crate::decode_device_frame(&text, usize::MAX).expect("decodes directly"),
                msg
            );
        }
    }

    fn log_line_strategy() -> impl Strategy<Value = crate::tasks::LogLine> {
        use crate::tasks::{LogLine, LogStream};
        (
            any::<u64>(),
            proptest::sample::select(vec![
                LogStream::Stdout,
                LogStream::Stderr,
                LogStream::System,
            ]),
            any::<i64>(),
            "\\PC{0,40}",
        )
            .prop_map(|(seq, stream, at, text)| LogLine {
                seq,
                stream,
                at,
                text,
            })
    }

    proptest! {
        #[test]
        fn log_and_can_run_requests_round_trip(
            id in any::<u64>(),
            task in any::<u128>(),
            after_seq in any::<u64>(),
            limit in any::<u32>(),
            command in proptest::option::of(proptest::collection::vec("\\PC{0,10}", 0..4)),
            requirements in proptest::collection::vec("[a-z]{1,8}", 0..3),
            logs in any::<bool>(),
        ) {
            use crate::tasks::{NewTask, TaskId};
            use crate::DeviceRequest;
            let request = if logs {
                DeviceRequest::ReadLogs { id: TaskId(uuid::Uuid::from_u128(task)), after_seq, limit }
            } else {
                DeviceRequest::CanRun {
                    task: NewTask { title: String::new(), command, requirements, ..NewTask::default() },
                }
            };
            let msg = HubToDevice::Request { request_id: id, deadline_ms: 1000, request };
            let back: HubToDevice = decode(encode(&msg).as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn log_and_can_run_replies_round_trip(
            id in any::<u64>(),
            lines in proptest::collection::vec(log_line_strategy(), 0..4),
            status in proptest::sample::select(crate::tasks::TaskStatus::ALL.to_vec()),
            flags in any::<(bool, bool, bool, bool)>(),
            reason in proptest::option::of("\\PC{0,40}"),
        ) {
            use crate::{DeviceReply, Outcome};
            let (logs, more, exec_allowed, has_gpu) = flags;
            let reply = if logs {
                DeviceReply::Logs { lines, status, more }
            } else {
                DeviceReply::CanRun { can_run: reason.is_none(), reason, exec_allowed, has_gpu }
            };
            let msg = DeviceToHub::Response { request_id: id, outcome: Outcome::Ok(reply) };
            let back: DeviceToHub = decode(encode(&msg).as_bytes(), usize::MAX).expect("decodes");
            prop_assert_eq!(back, msg);
        }
    }

    #[test]
    fn a_logs_reply_without_more_reads_as_complete_so_far() {
        // What a device of an earlier build sends: no `more` field.
        let frame = br#"{"type":"response","request_id":1,"ok":{"kind":"logs","lines":[],"status":"completed"}}"#;
        let msg: DeviceToHub = decode(frame, 1024).expect("decodes");
        let DeviceToHub::Response {
            outcome: crate::Outcome::Ok(crate::DeviceReply::Logs { more, .. }),
            ..
        } = msg
        else {
            panic!("not a logs reply: {msg:?}");
        };
        assert!(!more);
    }

    #[test]
    fn request_wire_shape_is_flat() {
        let msg = HubToDevice::Request {
            request_id: 7,
            deadline_ms: 100,
            request: crate::DeviceRequest::TaskStats,
        };
        assert_eq!(
            encode(&msg),
            r#"{"type":"request","request_id":7,"deadline_ms":100,"op":"task_stats"}"#
        );
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let frame = vec![b' '; 100];
        assert_eq!(
            decode::<DeviceToHub>(&frame, 10),
            Err(DecodeError::TooLarge { len: 100, max: 10 })
        );
    }

    #[test]
    fn unknown_type_is_an_error_and_unknown_fields_are_ignored() {
        let err = decode::<DeviceToHub>(br#"{"type":"teleport"}"#, 1024).expect_err("unknown");
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let hb: DeviceToHub = decode(
            br#"{"type":"heartbeat","seq":3,"future_field":[1,2]}"#,
            1024,
        )
        .expect("ok");
        assert_eq!(
            hb,
            DeviceToHub::Heartbeat(Heartbeat {
                seq: 3,
                ..Default::default()
            })
        );
    }

    #[test]
    fn errors_do_not_echo_secret_values() {
        let frame = br#"{"type":"register","versions":"SUPERSECRETVALUE-0123456789abcdefghijkl","secret":"x","name":"n"}"#;
        let err = decode::<DeviceToHub>(frame, 1024).expect_err("wrong type");
        assert!(!err.to_string().contains("SUPERSECRET"), "{err}");
    }

    #[test]
    fn short_secret_on_the_wire_is_caught_by_validate() {
        let frame = br#"{"type":"register","versions":[1],"secret":"short","name":"n"}"#;
        let DeviceToHub::Register(r) = decode::<DeviceToHub>(frame, 1024).expect("decodes") else {
            panic!("not a register");
        };
        assert!(r.secret.validate().is_err());
    }

    #[test]
    fn version_negotiation_picks_the_newest_common() {
        assert_eq!(crate::negotiate_version(&[1, 2, 99]), Some(1));
        assert_eq!(crate::negotiate_version(&[0, 99]), None);
        assert_eq!(crate::negotiate_version(&[]), None);
    }
}
