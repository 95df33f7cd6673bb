//! The OTLP protobuf wire format of finished spans, written straight from a
//! [`SpanRecord`] into a byte buffer: no intermediate message structs, no per-field
//! allocation. Field numbers are those of opentelemetry-proto's `trace.proto`,
//! `common.proto` and `resource.proto`; the output is byte for byte what prost
//! writes for the same message (checked in the tests against opentelemetry-proto's
//! own conversion of the SDK's span data).

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, KeyValue, Value};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::telemetry::span::SpanRecord;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

/// The one-byte key of fields 1 to 15.
const fn key(field: u8, wire: u8) -> u8 {
    field << 3 | wire
}

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn varint_len(v: u64) -> usize {
    // 7 bits a byte, at least one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn put_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    out.push(key(field, LEN));
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A string field; proto3 leaves empty strings out.
#[inline]
fn put_str(out: &mut Vec<u8>, field: u8, s: &str) {
    if !s.is_empty() {
        put_bytes(out, field, s.as_bytes());
    }
}

/// An unsigned varint field; proto3 leaves zeros out.
#[inline]
fn put_uint(out: &mut Vec<u8>, field: u8, v: u64) {
    if v != 0 {
        out.push(key(field, VARINT));
        put_varint(out, v);
    }
}

#[inline]
fn put_fixed64(out: &mut Vec<u8>, field: u8, v: u64) {
    if v != 0 {
        out.push(key(field, FIXED64));
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Opens an embedded message: its key, then one byte kept for its length (most
/// messages inside a span are shorter than 128 bytes). Returns where the message
/// starts, for [`end`].
#[inline]
fn begin(out: &mut Vec<u8>, field: u8) -> usize {
    out.push(key(field, LEN));
    out.push(0);
    out.len()
}

/// Closes a message opened by [`begin`]: writes its length, moving the message up
/// when the length takes more than the one byte kept for it.
#[inline]
fn end(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
        return;
    }
    let extra = varint_len(len as u64) - 1;
    out.resize(out.len() + extra, 0);
    out.copy_within(start..start + len, start + extra);
    let mut at = start - 1;
    let mut v = len as u64;
    while v >= 0x80 {
        out[at] = (v as u8) | 0x80;
        v >>= 7;
        at += 1;
    }
    out[at] = v as u8;
}

/// An `AnyValue` member written directly (its size is known up front), or `None`
/// for arrays and kinds added to the API later.
#[inline]
fn scalar_len(v: &Value) -> Option<usize> {
    Some(match v {
        Value::String(s) => 1 + varint_len(s.as_str().len() as u64) + s.as_str().len(),
        Value::I64(i) => 1 + varint_len(*i as u64),
        Value::Bool(_) => 2,
        Value::F64(_) => 9,
        _ => return None,
    })
}

/// The members of an `AnyValue` (a oneof: a present member is written even when
/// it is zero or empty).
fn put_any_members(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => put_bytes(out, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            out.push(key(2, VARINT));
            out.push(u8::from(*b));
        }
        Value::I64(i) => {
            out.push(key(3, VARINT));
            put_varint(out, *i as u64);
        }
        Value::F64(f) => {
            out.push(key(4, FIXED64));
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Array(a) => {
            let arr = begin(out, 5);
            match a {
                Array::Bool(v) => v.iter().for_each(|b| put_any(out, 1, &Value::Bool(*b))),
                Array::I64(v) => v.iter().for_each(|i| put_any(out, 1, &Value::I64(*i))),
                Array::F64(v) => v.iter().for_each(|f| put_any(out, 1, &Value::F64(*f))),
                Array::String(v) => v.iter().for_each(|s| {
                    let at = begin(out, 1);
                    put_bytes(out, 1, s.as_str().as_bytes());
                    end(out, at);
                }),
                // A kind of array added to the API later: exported as its text.
                other => {
                    let at = begin(out, 1);
                    put_bytes(out, 1, other.to_string().as_bytes());
                    end(out, at);
                }
            }
            end(out, arr);
        }
        // A kind of value added to the API later: exported as its text.
        other => put_bytes(out, 1, other.to_string().as_bytes()),
    }
}

fn put_any(out: &mut Vec<u8>, field: u8, v: &Value) {
    let at = begin(out, field);
    put_any_members(out, v);
    end(out, at);
}

/// One `KeyValue` as field `field`.
fn put_kv(out: &mut Vec<u8>, field: u8, k: &str, v: &Value) {
    let Some(value_len) = scalar_len(v) else {
        let at = begin(out, field);
        put_str(out, 1, k);
        put_any(out, 2, v);
        end(out, at);
        return;
    };
    let key_len = if k.is_empty() {
        0
    } else {
        1 + varint_len(k.len() as u64) + k.len()
    };
    out.push(key(field, LEN));
    put_varint(
        out,
        (key_len + 1 + varint_len(value_len as u64) + value_len) as u64,
    );
    put_str(out, 1, k);
    out.push(key(2, LEN));
    put_varint(out, value_len as u64);
    put_any_members(out, v);
}

fn put_attributes<'a>(out: &mut Vec<u8>, field: u8, attrs: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in attrs {
        put_kv(out, field, kv.key.as_str(), &kv.value);
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP span flags of an exported span: sampled, and whether the parent is
/// remote.
fn span_flags(parent_is_remote: bool) -> u32 {
    const SAMPLED: u32 = 0x01;
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    if parent_is_remote {
        SAMPLED | HAS_IS_REMOTE | IS_REMOTE
    } else {
        SAMPLED | HAS_IS_REMOTE
    }
}

fn kind_code(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// Appends one span as an entry of `ScopeSpans.spans` (field 2).
pub fn put_span(out: &mut Vec<u8>, s: &SpanRecord) {
    let at = begin(out, 2);
    put_bytes(out, 1, &s.trace_id.to_bytes());
    put_bytes(out, 2, &s.span_id.to_bytes());
    if s.trace_state != TraceState::NONE {
        put_str(out, 3, &s.trace_state.header());
    }
    if s.parent_span_id != SpanId::INVALID {
        put_bytes(out, 4, &s.parent_span_id.to_bytes());
    }
    put_str(out, 5, s.name.as_str());
    put_uint(out, 6, kind_code(&s.span_kind));
    put_fixed64(out, 7, nanos(s.start_time));
    put_fixed64(out, 8, nanos(s.end_time));
    put_attributes(out, 9, &s.attributes);
    for e in &s.events {
        let ev = begin(out, 11);
        put_fixed64(out, 1, nanos(e.timestamp));
        put_str(out, 2, &e.name);
        put_attributes(out, 3, &e.attributes);
        put_uint(out, 4, u64::from(e.dropped_attributes_count));
        end(out, ev);
    }
    // The status is always present, as the reference exporter writes it.
    let st = begin(out, 15);
    match &s.status {
        Status::Unset => {}
        Status::Ok => put_uint(out, 3, 1),
        Status::Error { description } => {
            put_str(out, 2, description.as_ref());
            put_uint(out, 3, 2);
        }
    }
    end(out, st);
    // Field 16 takes a two-byte key.
    out.extend_from_slice(&[0x85, 0x01]);
    out.extend_from_slice(&span_flags(s.parent_span_is_remote).to_le_bytes());
    end(out, at);
}

/// The fields of a `Resource` message with these attributes.
pub fn encode_resource(attrs: &[KeyValue]) -> Vec<u8> {
    let mut out = Vec::new();
    put_attributes(&mut out, 1, attrs);
    out
}

/// The `scope` field of a `ScopeSpans` message: an instrumentation scope with a
/// name and version.
pub fn encode_scope(name: &str, version: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let at = begin(&mut out, 1);
    put_str(&mut out, 1, name);
    put_str(&mut out, 2, version);
    end(&mut out, at);
    out
}

/// An `ExportTraceServiceRequest`: one `ResourceSpans` (the resource's fields as
/// [`encode_resource`] wrote them) with one `ScopeSpans` (the scope as
/// [`encode_scope`] wrote it, and spans as [`put_span`] wrote them).
pub fn export_request(resource: &[u8], scope: &[u8], spans: &[u8]) -> Vec<u8> {
    let scope_spans = scope.len() + spans.len();
    let rs_len = 1
        + varint_len(resource.len() as u64)
        + resource.len()
        + 1
        + varint_len(scope_spans as u64)
        + scope_spans;
    let mut out = Vec::with_capacity(rs_len + 8);
    out.push(key(1, LEN));
    put_varint(&mut out, rs_len as u64);
    put_bytes(&mut out, 1, resource);
    out.push(key(2, LEN));
    put_varint(&mut out, scope_spans as u64);
    out.extend_from_slice(scope);
    out.extend_from_slice(spans);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Event, SpanContext, TraceFlags, TraceId};
    use opentelemetry::InstrumentationScope;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use opentelemetry_sdk::Resource;
    use prost::Message as _;
    use std::time::Duration;

    fn span(n: u64) -> SpanRecord {
        let t0 = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789 + n);
        SpanRecord {
            trace_id: TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736 + u128::from(n)),
            span_id: SpanId::from(0x00f067aa0ba902b7 + n),
            trace_state: if n % 2 == 0 {
                TraceState::from_key_value([("vendor", "opaque"), ("b", "2")]).unwrap()
            } else {
                TraceState::NONE
            },
            parent_span_id: if n % 3 == 0 {
                SpanId::INVALID
            } else {
                SpanId::from(7 + n)
            },
            parent_span_is_remote: n % 2 == 1,
            span_kind: [SpanKind::Server, SpanKind::Client, SpanKind::Internal][n as usize % 3]
                .clone(),
            name: format!("GET route-{n}").into(),
            start_time: t0,
            end_time: t0 + Duration::from_micros(250 + n),
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("url.path", "/a/".repeat(50 * n as usize)),
                KeyValue::new("http.response.status_code", 200 + n as i64),
                KeyValue::new("neg", -5i64),
                KeyValue::new("zero", 0i64),
                KeyValue::new("empty", ""),
                KeyValue::new("", "no key"),
                KeyValue::new("flag", n % 2 == 0),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("ints", Value::Array(Array::I64(vec![1, -2, 300]))),
                KeyValue::new(
                    "strs",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![1.5]))),
            ],
            events: vec![
                Event::new("retry", t0, vec![KeyValue::new("breakwater.attempt", 2)], 0),
                Event::new("fallback", t0, Vec::new(), 3),
            ],
            status: match n % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("upstream said 503"),
            },
        }
    }

    /// The same span as the SDK would hand to opentelemetry-otlp.
    fn as_sdk(s: &SpanRecord, scope: &InstrumentationScope) -> SpanData {
        let mut events = SpanEvents::default();
        events.events = s.events.clone();
        SpanData {
            span_context: SpanContext::new(
                s.trace_id,
                s.span_id,
                TraceFlags::SAMPLED,
                false,
                s.trace_state.clone(),
            ),
            parent_span_id: s.parent_span_id,
            parent_span_is_remote: s.parent_span_is_remote,
            span_kind: s.span_kind.clone(),
            name: s.name.as_str().to_string().into(),
            start_time: s.start_time,
            end_time: s.end_time,
            attributes: s.attributes.clone(),
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: s.status.clone(),
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn encoding_matches_the_reference_conversion() {
        let scope = InstrumentationScope::builder("breakwater")
            .with_version("1.2.3")
            .build();
        let attrs = [
            KeyValue::new("service.name", "bench"),
            KeyValue::new("service.version", "0.1.0"),
        ];
        let records: Vec<SpanRecord> = (0..21).map(span).collect();
        let mut spans = Vec::new();
        for r in &records {
            put_span(&mut spans, r);
        }
        let ours = export_request(
            &encode_resource(&attrs),
            &encode_scope("breakwater", "1.2.3"),
            &spans,
        );
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();

        let resource = Resource::builder_empty().with_attributes(attrs).build();
        let reference = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                records.iter().map(|r| as_sdk(r, &scope)).collect(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        // The SDK's resource keeps its attributes in a map: compare them as sets.
        let (mut a, mut b) = (decoded.clone(), reference.clone());
        for r in [&mut a, &mut b] {
            if let Some(res) = r.resource_spans[0].resource.as_mut() {
                res.attributes.sort_by(|x, y| x.key.cmp(&y.key));
            }
        }
        assert_eq!(a, b);
        // With the resource in the same order, the bytes are what prost writes.
        let mut same_order = reference;
        same_order.resource_spans[0].resource = decoded.resource_spans[0].resource.clone();
        assert_eq!(ours, same_order.encode_to_vec());
    }

    #[test]
    fn long_nested_messages_get_multibyte_lengths() {
        let mut s = span(1);
        s.attributes = vec![KeyValue::new("big", "x".repeat(70_000))];
        s.events = vec![Event::new(
            "e",
            UNIX_EPOCH,
            vec![KeyValue::new(
                "a",
                Value::Array(Array::String(vec!["y".repeat(300).into()])),
            )],
            0,
        )];
        let mut spans = Vec::new();
        put_span(&mut spans, &s);
        let bytes = export_request(&[], &encode_scope("s", ""), &spans);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let span = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.attributes[0].key, "big");
        assert_eq!(span.events[0].attributes[0].key, "a");
        assert_eq!(span.name, "GET route-1");
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
