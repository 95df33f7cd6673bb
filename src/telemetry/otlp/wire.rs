//! The OTLP protobuf wire format of finished spans, written straight from a
//! [`SpanRecord`] into a byte buffer: no intermediate message structs, no per-field
//! allocation. Field numbers are those of opentelemetry-proto's `trace.proto`,
//! `common.proto` and `resource.proto`; the output is byte for byte what prost
//! writes for the same message (checked in the tests against opentelemetry-proto's
//! own conversion of the SDK's span data).

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, KeyValue, Value};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sync::lock;

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

/// A scalar attribute value, borrowed: what spans record on the hot path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar<'a> {
    /// A string.
    Str(&'a str),
    /// An integer.
    I64(i64),
    /// A boolean.
    Bool(bool),
    /// A double.
    F64(f64),
}

impl<'a> Scalar<'a> {
    /// The scalar of a value, or `None` for arrays and kinds added to the API later.
    #[inline]
    fn of(v: &'a Value) -> Option<Scalar<'a>> {
        Some(match v {
            Value::String(s) => Scalar::Str(s.as_str()),
            Value::I64(i) => Scalar::I64(*i),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::F64(f) => Scalar::F64(*f),
            _ => return None,
        })
    }

    /// The length of its `AnyValue` message.
    #[inline]
    fn len(&self) -> usize {
        match self {
            Scalar::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Scalar::I64(i) => 1 + varint_len(*i as u64),
            Scalar::Bool(_) => 2,
            Scalar::F64(_) => 9,
        }
    }

    /// Writes the members of its `AnyValue` (a oneof: a present member is written
    /// even when it is zero or empty).
    #[inline(always)]
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Scalar::Str(s) => put_bytes(out, 1, s.as_bytes()),
            Scalar::Bool(b) => {
                out.push(key(2, VARINT));
                out.push(u8::from(*b));
            }
            Scalar::I64(i) => {
                out.push(key(3, VARINT));
                put_varint(out, *i as u64);
            }
            Scalar::F64(f) => {
                out.push(key(4, FIXED64));
                out.extend_from_slice(&f.to_le_bytes());
            }
        }
    }
}

/// The members of a non-scalar `AnyValue`.
fn put_any_members(out: &mut Vec<u8>, v: &Value) {
    if let Some(s) = Scalar::of(v) {
        return s.put(out);
    }
    match v {
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
    match Scalar::of(v) {
        Some(s) => put_scalar_kv(out, field, k, s),
        None => {
            let at = begin(out, field);
            put_str(out, 1, k);
            put_any(out, 2, v);
            end(out, at);
        }
    }
}

/// One `KeyValue` with a scalar value as field `field`.
#[inline]
fn put_scalar_kv(out: &mut Vec<u8>, field: u8, k: &str, v: Scalar<'_>) {
    // proto3 leaves an empty key out.
    let key_len = if k.is_empty() {
        0
    } else {
        1 + varint_len(k.len() as u64) + k.len()
    };
    put_scalar_entry(out, field, key_len, |out| put_str(out, 1, k), v);
}

/// A `KeyValue` with a scalar value as field `field`, its key field (`key_len` bytes)
/// written by `put_key`: every length is known up front, so it is written in one
/// pass into space reserved once.
#[inline(always)]
fn put_scalar_entry(
    out: &mut Vec<u8>,
    field: u8,
    key_len: usize,
    put_key: impl FnOnce(&mut Vec<u8>),
    v: Scalar<'_>,
) {
    let value_len = v.len();
    let kv_len = key_len + 1 + varint_len(value_len as u64) + value_len;
    out.reserve(1 + varint_len(kv_len as u64) + kv_len);
    out.push(key(field, LEN));
    put_varint(out, kv_len as u64);
    put_key(out);
    out.push(key(2, LEN));
    put_varint(out, value_len as u64);
    v.put(out);
}

/// An attribute key with its `KeyValue.key` field (tag, length, bytes) written at
/// compile time: recording an attribute then copies it whole.
#[derive(Clone, Copy)]
pub struct AttrKey {
    field: [u8; AttrKey::MAX + 2],
    len: u8,
}

impl AttrKey {
    /// The longest key: its length must fit in one byte of varint.
    const MAX: usize = 62;

    /// The key `k`; a key longer than 62 bytes or empty does not compile.
    pub const fn new(k: &str) -> AttrKey {
        let b = k.as_bytes();
        assert!(
            !b.is_empty() && b.len() <= AttrKey::MAX,
            "attribute keys are 1 to 62 bytes"
        );
        let mut field = [0u8; AttrKey::MAX + 2];
        field[0] = key(1, LEN);
        field[1] = b.len() as u8;
        let mut i = 0;
        while i < b.len() {
            field[2 + i] = b[i];
            i += 1;
        }
        AttrKey {
            field,
            len: b.len() as u8 + 2,
        }
    }

    #[inline]
    fn field(&self) -> &[u8] {
        &self.field[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for AttrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.field()[2..]))
    }
}

/// One `Span.attributes` entry with a scalar value and a key written ahead.
#[inline]
fn put_span_attr(out: &mut Vec<u8>, k: &AttrKey, v: Scalar<'_>) {
    let field = k.field();
    put_scalar_entry(
        out,
        SPAN_ATTRIBUTES,
        field.len(),
        |out| out.extend_from_slice(field),
        v,
    );
}

/// A span's attributes, kept in wire format (`Span.attributes` entries) as they are
/// set: recording one costs a copy of its key and value into one buffer, with no
/// `KeyValue` to build, no string to own and nothing to convert at export.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes(Vec<u8>);

/// The field of `Span.attributes`.
const SPAN_ATTRIBUTES: u8 = 9;

impl Attributes {
    /// Empty, with room for `bytes` of attributes.
    pub fn with_capacity(bytes: usize) -> Attributes {
        Attributes(Vec::with_capacity(bytes))
    }

    /// Adds a string attribute.
    #[inline]
    pub fn str(&mut self, key: &AttrKey, value: &str) {
        put_span_attr(&mut self.0, key, Scalar::Str(value));
    }

    /// Adds an integer attribute.
    #[inline]
    pub fn int(&mut self, key: &AttrKey, value: i64) {
        put_span_attr(&mut self.0, key, Scalar::I64(value));
    }

    /// Adds an attribute of any kind.
    pub fn push(&mut self, kv: &KeyValue) {
        put_kv(&mut self.0, SPAN_ATTRIBUTES, kv.key.as_str(), &kv.value);
    }

    /// Adds attributes recorded elsewhere (ones every span of a route shares).
    #[inline]
    pub fn extend(&mut self, other: &Attributes) {
        self.0.extend_from_slice(&other.0);
    }

    /// The attributes in wire format.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The attributes in the order they were set; values that are not scalars
    /// (arrays) are left out.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Scalar<'_>)> + '_ {
        let mut rest = self.0.as_slice();
        std::iter::from_fn(move || loop {
            let (field, entry, after) = read_len_field(rest)?;
            rest = after;
            if field != SPAN_ATTRIBUTES {
                continue;
            }
            if let Some(kv) = decode_scalar_kv(entry) {
                return Some(kv);
            }
        })
    }

    /// The value of the first attribute named `key`, if it is a scalar.
    pub fn get(&self, key: &str) -> Option<Scalar<'_>> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> FromIterator<&'a KeyValue> for Attributes {
    fn from_iter<I: IntoIterator<Item = &'a KeyValue>>(iter: I) -> Attributes {
        let mut a = Attributes::default();
        iter.into_iter().for_each(|kv| a.push(kv));
        a
    }
}

fn read_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, &b[i + 1..]));
        }
    }
    None
}

/// One length-delimited field with a one-byte key: its number, its bytes and what
/// follows it.
fn read_len_field(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&k, rest) = b.split_first()?;
    if k & 7 != LEN {
        return None;
    }
    let (len, rest) = read_varint(rest)?;
    let len = usize::try_from(len).ok().filter(|l| *l <= rest.len())?;
    Some((k >> 3, &rest[..len], &rest[len..]))
}

/// A `KeyValue` message with a scalar value, as [`put_scalar_kv`] writes it.
fn decode_scalar_kv(mut b: &[u8]) -> Option<(&str, Scalar<'_>)> {
    let mut key = "";
    let mut value = None;
    while !b.is_empty() {
        let (field, bytes, rest) = read_len_field(b)?;
        b = rest;
        match field {
            1 => key = std::str::from_utf8(bytes).ok()?,
            2 => value = decode_scalar(bytes),
            _ => {}
        }
    }
    Some((key, value?))
}

fn decode_scalar(b: &[u8]) -> Option<Scalar<'_>> {
    let (&k, rest) = b.split_first()?;
    Some(match k {
        k if k == key(1, LEN) => {
            let (_, s, _) = read_len_field(b)?;
            Scalar::Str(std::str::from_utf8(s).ok()?)
        }
        k if k == key(2, VARINT) => Scalar::Bool(read_varint(rest)?.0 != 0),
        k if k == key(3, VARINT) => Scalar::I64(read_varint(rest)?.0 as i64),
        k if k == key(4, FIXED64) => {
            Scalar::F64(f64::from_le_bytes(rest.get(..8)?.try_into().ok()?))
        }
        _ => return None,
    })
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
    let attrs = s.attributes.as_bytes();
    // Room for all but events, a long trace state or error description: no growing
    // field by field.
    out.reserve(128 + s.name.as_str().len() + attrs.len());
    let at = begin(out, 2);
    // Fields of fixed size are put together on the stack and copied as one block.
    let mut ids = [0u8; 38];
    ids[0] = key(1, LEN);
    ids[1] = 16;
    ids[2..18].copy_from_slice(&s.trace_id.to_bytes());
    ids[18] = key(2, LEN);
    ids[19] = 8;
    ids[20..28].copy_from_slice(&s.span_id.to_bytes());
    if s.trace_state == TraceState::NONE {
        // The parent comes right after the span id (proto field order).
        let with_parent = s.parent_span_id != SpanId::INVALID;
        if with_parent {
            ids[28] = key(4, LEN);
            ids[29] = 8;
            ids[30..38].copy_from_slice(&s.parent_span_id.to_bytes());
        }
        out.extend_from_slice(&ids[..if with_parent { 38 } else { 28 }]);
    } else {
        out.extend_from_slice(&ids[..28]);
        put_str(out, 3, &s.trace_state.header());
        if s.parent_span_id != SpanId::INVALID {
            put_bytes(out, 4, &s.parent_span_id.to_bytes());
        }
    }
    put_str(out, 5, s.name.as_str());
    put_uint(out, 6, kind_code(&s.span_kind));
    let (start, end_time) = (nanos(s.start_time), nanos(s.end_time));
    if start != 0 && end_time != 0 {
        let mut times = [0u8; 18];
        times[0] = key(7, FIXED64);
        times[1..9].copy_from_slice(&start.to_le_bytes());
        times[9] = key(8, FIXED64);
        times[10..18].copy_from_slice(&end_time.to_le_bytes());
        out.extend_from_slice(&times);
    } else {
        put_fixed64(out, 7, start);
        put_fixed64(out, 8, end_time);
    }
    out.extend_from_slice(attrs);
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

/// Bytes a transport may put in front of an export request (gRPC's message frame).
pub const FRAMING: usize = 5;

/// The room [`export_request`] needs in front of the spans: the envelope (three
/// one-byte keys, three lengths of at most 10 bytes, the resource and the scope)
/// and a transport's [`FRAMING`].
pub fn headroom(resource: &[u8], scope: &[u8]) -> usize {
    resource.len() + scope.len() + 3 + 3 * 10 + FRAMING
}

/// Buffers of sent messages, kept for the next ones. A batch buffer is large
/// (170 KiB for 512 typical spans): allocating and freeing one per export made glibc
/// consolidate its free lists in the middle of requests, which cost more than all of
/// a span's encoding (perf, h2c: +0.7 µs a request in malloc and free).
#[derive(Debug, Default)]
pub struct BufferPool {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers kept at most: the export queue's depth is about that.
    const KEEP: usize = 4;
    /// Buffers that grew beyond this (a burst of huge spans) are freed, not kept.
    const KEEP_CAPACITY: usize = 1 << 20;

    /// An empty buffer: a kept one, or a new one with room for `capacity` bytes.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        lock(&self.spare)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    /// Keeps `buf` for a later [`BufferPool::take`], unless enough are kept or it grew
    /// too large.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() > Self::KEEP_CAPACITY {
            return;
        }
        buf.clear();
        let mut spare = lock(&self.spare);
        if spare.len() < Self::KEEP {
            spare.push(buf);
        }
    }
}

/// A message's buffer while a transport sends it; back to its pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

/// An encoded export request in a buffer with free room in front of it, so that the
/// envelope and a transport's framing go in front of the batch without copying it.
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    start: usize,
    /// Where the buffer goes once sent.
    pool: Option<Arc<BufferPool>>,
}

impl Message {
    /// The message's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Puts `prefix` in front of the message: into the free room, or by copying the
    /// message when there is not enough of it.
    pub fn prepend(&mut self, prefix: &[u8]) {
        if let Some(at) = self.start.checked_sub(prefix.len()) {
            self.buf[at..self.start].copy_from_slice(prefix);
            self.start = at;
        } else {
            let mut buf = Vec::with_capacity(prefix.len() + self.buf.len() - self.start);
            buf.extend_from_slice(prefix);
            buf.extend_from_slice(self.as_slice());
            self.buf = buf;
            self.start = 0;
        }
    }

    /// The message as a request body (its buffer goes back to its pool when the body
    /// is dropped).
    pub fn into_bytes(self) -> bytes::Bytes {
        let bytes = match self.pool {
            Some(pool) => bytes::Bytes::from_owner(Pooled {
                buf: self.buf,
                pool,
            }),
            None => bytes::Bytes::from(self.buf),
        };
        bytes.slice(self.start..)
    }
}

/// An `ExportTraceServiceRequest`: one `ResourceSpans` (the resource's fields as
/// [`encode_resource`] wrote them) with one `ScopeSpans` (the scope as
/// [`encode_scope`] wrote it, and the spans [`put_span`] wrote into `buf` from
/// `spans_at` on). The envelope goes into the room in front of the spans (see
/// [`headroom`]). Once sent, `buf` goes back to `pool`, if given.
pub fn export_request(
    resource: &[u8],
    scope: &[u8],
    buf: Vec<u8>,
    spans_at: usize,
    pool: Option<Arc<BufferPool>>,
) -> Message {
    let scope_spans = scope.len() + buf.len().saturating_sub(spans_at);
    let rs_len = 1
        + varint_len(resource.len() as u64)
        + resource.len()
        + 1
        + varint_len(scope_spans as u64)
        + scope_spans;
    let mut head = Vec::with_capacity(headroom(resource, scope));
    head.push(key(1, LEN));
    put_varint(&mut head, rs_len as u64);
    put_bytes(&mut head, 1, resource);
    head.push(key(2, LEN));
    put_varint(&mut head, scope_spans as u64);
    head.extend_from_slice(scope);
    let mut m = Message {
        buf,
        start: spans_at,
        pool,
    };
    m.prepend(&head);
    m
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

    /// Attributes of every kind, as set on span `n`.
    fn attrs(n: u64) -> Vec<KeyValue> {
        vec![
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
        ]
    }

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
            attributes: attrs(n).iter().collect(),
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
    fn as_sdk(n: u64, s: &SpanRecord, scope: &InstrumentationScope) -> SpanData {
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
            attributes: attrs(n),
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
        // The envelope in the room left in front of the spans, as the batcher does it.
        let (resource, scope_bytes) =
            (encode_resource(&attrs), encode_scope("breakwater", "1.2.3"));
        let room = headroom(&resource, &scope_bytes);
        let mut buf = vec![0; room];
        buf.extend_from_slice(&spans);
        let message = export_request(&resource, &scope_bytes, buf, room, None);
        let ours = message.as_slice().to_vec();
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();

        let resource = Resource::builder_empty().with_attributes(attrs).build();
        let reference = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                (0..)
                    .zip(&records)
                    .map(|(n, r)| as_sdk(n, r, &scope))
                    .collect(),
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
        s.attributes = Attributes::default();
        s.attributes.str(&AttrKey::new("big"), &"x".repeat(70_000));
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
        // No room in front: the envelope is copied in front of the spans.
        let message = export_request(&[], &encode_scope("s", ""), spans, 0, None);
        let decoded = ExportTraceServiceRequest::decode(message.as_slice()).unwrap();
        let span = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.attributes[0].key, "big");
        assert_eq!(span.events[0].attributes[0].key, "a");
        assert_eq!(span.name, "GET route-1");
    }

    #[test]
    fn attributes_read_back_as_set() {
        let mut a = Attributes::default();
        a.str(&AttrKey::new("url.path"), "/x");
        a.int(&AttrKey::new("http.response.status_code"), 503);
        a.int(&AttrKey::new("neg"), -1);
        a.push(&KeyValue::new("flag", true));
        a.push(&KeyValue::new("ratio", 0.5));
        a.push(&KeyValue::new("ints", Value::Array(Array::I64(vec![1]))));
        a.push(&KeyValue::new("", "no key"));
        let read: Vec<_> = a.iter().collect();
        assert_eq!(
            read,
            [
                ("url.path", Scalar::Str("/x")),
                ("http.response.status_code", Scalar::I64(503)),
                ("neg", Scalar::I64(-1)),
                ("flag", Scalar::Bool(true)),
                ("ratio", Scalar::F64(0.5)),
                ("", Scalar::Str("no key")),
            ]
        );
        assert_eq!(a.get("neg"), Some(Scalar::I64(-1)));
        assert_eq!(a.get("ints"), None);
        // The typed writers write what the generic one does.
        let generic: Attributes = [
            KeyValue::new("url.path", "/x"),
            KeyValue::new("http.response.status_code", 503i64),
            KeyValue::new("neg", -1i64),
        ]
        .iter()
        .collect();
        assert!(a.as_bytes().starts_with(generic.as_bytes()));
    }

    #[test]
    fn sent_buffers_are_reused() {
        let pool = Arc::new(BufferPool::default());
        let mut buf = pool.take(4096);
        let ptr = buf.as_ptr();
        let room = headroom(&[], &[]);
        buf.resize(room, 0);
        buf.extend_from_slice(b"spans");
        let mut m = export_request(&[], &[], buf, room, Some(pool.clone()));
        m.prepend(&[0, 0, 0, 0, 7]);
        let body = m.into_bytes();
        assert!(body.ends_with(b"spans"));
        assert_eq!(&body[..5], &[0, 0, 0, 0, 7]);
        let part = body.slice(1..);
        drop(body);
        assert_eq!(
            lock(&pool.spare).len(),
            0,
            "in use while any part of the body is"
        );
        drop(part);
        let again = pool.take(16);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= 4096);
        // A buffer grown huge is let go.
        pool.give(Vec::with_capacity(BufferPool::KEEP_CAPACITY + 1));
        assert_eq!(lock(&pool.spare).len(), 0);
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
