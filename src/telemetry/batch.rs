//! The span batcher: each span is written in OTLP wire format the moment it ends
//! (while its data is still in cache) into the pending batch, under a short lock;
//! no channel send or task wake-up per span. A full batch goes to the export task through a bounded channel, and
//! the task also sends whatever is pending every `schedule_delay`. One export runs
//! at a time; while it runs, full batches wait in the channel, and when the channel
//! is full too the batch is dropped and counted. So a slow or dead collector costs
//! spans, never a request's time or unbounded memory: at most `max_queue` spans
//! are held.
//!
//! Envoy's OpenTelemetry tracer works the same way (a span becomes its protobuf when
//! it finishes). The SDK's batch processors instead hold every span's data until
//! export and send each span through a channel, which cost more per traced request
//! than everything else tracing does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::otlp::wire;
use super::otlp::Transport;
use super::span::SpanRecord;
use crate::sync::lock;

/// Sizes and timing of the batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Spans sent in one export.
    pub max_batch: usize,
    /// Spans held at most (pending and waiting for export); beyond, spans are dropped.
    pub max_queue: usize,
    /// How often what is pending is sent, full batch or not.
    pub schedule_delay: Duration,
}

impl Default for BatchConfig {
    /// The OpenTelemetry defaults: batches of 512, a queue of 2048, every 5 s.
    fn default() -> Self {
        BatchConfig {
            max_batch: 512,
            max_queue: 2048,
            schedule_delay: Duration::from_secs(5),
        }
    }
}

impl BatchConfig {
    /// The defaults, overridden by the standard `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
    /// `OTEL_BSP_MAX_QUEUE_SIZE` and `OTEL_BSP_SCHEDULE_DELAY` (milliseconds).
    pub fn from_env() -> BatchConfig {
        BatchConfig::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> BatchConfig {
        let var = |name: &str| {
            get(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|v| *v > 0)
        };
        let d = BatchConfig::default();
        let max_queue = var("OTEL_BSP_MAX_QUEUE_SIZE").map_or(d.max_queue, |v| v as usize);
        BatchConfig {
            // A batch never exceeds the queue, as the SDK specification asks.
            max_batch: var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
                .map_or(d.max_batch, |v| v as usize)
                .min(max_queue),
            max_queue,
            schedule_delay: var("OTEL_BSP_SCHEDULE_DELAY")
                .map_or(d.schedule_delay, Duration::from_millis),
        }
    }
}

/// The size at which a batch is sent even if it has fewer spans than `max_batch`.
const MAX_BATCH_BYTES: usize = 3 * 1024 * 1024;

thread_local! {
    /// Where a span is encoded before it is appended to the shared batch.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

/// Encoded spans waiting to be sent: `ScopeSpans.spans` entries, after room kept
/// free for the envelope ([`wire::headroom`]).
#[derive(Debug, Default)]
struct Batch {
    spans: Vec<u8>,
    count: usize,
}

/// The answer to a flush or shutdown: whether everything was sent.
type Reply = oneshot::Sender<Result<(), String>>;

enum Msg {
    Batch(Batch),
    Flush(Reply),
    Shutdown(Reply),
}

struct Shared {
    pending: Mutex<Batch>,
    max_batch: usize,
    dropped: AtomicU64,
    /// The resource's fields and the scope, in wire format.
    resource: Vec<u8>,
    scope: Vec<u8>,
    /// The room kept in front of a batch's spans for the envelope.
    headroom: usize,
    /// Buffers of sent batches, for the next ones.
    buffers: Arc<wire::BufferPool>,
}

impl Shared {
    fn take(&self) -> Batch {
        std::mem::take(&mut *lock(&self.pending))
    }
}

/// Encodes and batches spans for a [`Transport`], sent by a task on the tokio
/// runtime it was created on.
pub struct BatchProcessor {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    shut: AtomicBool,
}

impl std::fmt::Debug for BatchProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchProcessor")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl BatchProcessor {
    /// The processor, with its export task spawned on the current tokio runtime.
    ///
    /// Not a thread of its own: measured, that was slower. The spans are allocated
    /// by the request workers, and freeing them on another thread contends on the
    /// workers' allocator arenas.
    /// `resource` and `scope` are in wire format ([`wire::encode_resource`],
    /// [`wire::encode_scope`]).
    pub fn spawn<T: Transport>(
        transport: T,
        cfg: BatchConfig,
        resource: Vec<u8>,
        scope: Vec<u8>,
    ) -> BatchProcessor {
        let max_batch = cfg.max_batch.max(1);
        // The queue: the pending batch plus the full ones waiting in the channel.
        let waiting = (cfg.max_queue / max_batch).saturating_sub(1).max(1);
        let (tx, rx) = mpsc::channel(waiting);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Batch::default()),
            max_batch,
            dropped: AtomicU64::new(0),
            headroom: wire::headroom(&resource, &scope),
            buffers: Arc::default(),
            resource,
            scope,
        });
        let task = ExportTask {
            rx,
            shared: shared.clone(),
            reported: 0,
            delay: cfg.schedule_delay,
        };
        tokio::spawn(task.run(transport));
        BatchProcessor {
            shared,
            tx,
            shut: AtomicBool::new(false),
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Sends what is pending and waits (at most `timeout`) until it is sent.
    pub async fn flush(&self, timeout: Duration) -> Result<(), String> {
        self.ask(Msg::Flush, timeout).await
    }

    /// Sends what is pending, waits for it (at most `timeout`) and stops the export
    /// task; spans ending later are dropped.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), String> {
        if self.shut.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.ask(Msg::Shutdown, timeout).await
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Msg, timeout: Duration) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let asked = async {
            self.tx
                .send(make(reply))
                .await
                .map_err(|_| "the span export task has stopped".to_string())?;
            answer
                .await
                .map_err(|_| "the span export task has stopped".to_string())?
        };
        tokio::time::timeout(timeout, asked)
            .await
            .map_err(|_| format!("spans not sent within {timeout:?}"))?
    }

    /// Takes a finished span: encodes it, appends it to the pending batch, and hands
    /// the batch to the export task when it is full (dropping it if the queue is full).
    pub fn record(&self, span: &SpanRecord) {
        if self.shut.load(Ordering::Relaxed) {
            return;
        }
        // Encoded outside the lock, so workers of a multi-threaded runtime only
        // contend for the copy.
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            wire::put_span(scratch, span);
            self.append(scratch);
        });
    }

    fn append(&self, encoded: &[u8]) {
        let full = {
            let mut pending = lock(&self.shared.pending);
            if pending.spans.capacity() == 0 {
                let room = self.shared.headroom;
                pending.spans = self.shared.buffers.take(room + self.shared.max_batch * 320);
                pending.spans.resize(room, 0);
            }
            pending.spans.extend_from_slice(encoded);
            pending.count += 1;
            // Long URLs make big spans: a batch also ends at a size collectors take
            // (their gRPC default is 4 MiB), which bounds the queue's memory too.
            if pending.count < self.shared.max_batch && pending.spans.len() < MAX_BATCH_BYTES {
                return;
            }
            std::mem::take(&mut *pending)
        };
        if let Err(
            mpsc::error::TrySendError::Full(Msg::Batch(b))
            | mpsc::error::TrySendError::Closed(Msg::Batch(b)),
        ) = self.tx.try_send(Msg::Batch(full))
        {
            self.shared
                .dropped
                .fetch_add(b.count as u64, Ordering::Relaxed);
            // Kept for the next batch: a slow collector must not turn every dropped
            // batch into a large free and allocation.
            self.shared.buffers.give(b.spans);
        }
    }
}

impl Drop for BatchProcessor {
    fn drop(&mut self) {
        // Without waiting: the task sends what is pending and stops.
        if !self.shut.swap(true, Ordering::SeqCst) {
            let (reply, _) = oneshot::channel();
            let _ = self.tx.try_send(Msg::Shutdown(reply));
        }
    }
}

struct ExportTask {
    rx: mpsc::Receiver<Msg>,
    shared: Arc<Shared>,
    reported: u64,
    delay: Duration,
}

impl ExportTask {
    async fn run<T: Transport>(mut self, transport: T) {
        let mut tick = tokio::time::interval(self.delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let msg = tokio::select! {
                m = self.rx.recv() => m,
                _ = tick.tick() => {
                    let batch = self.shared.take();
                    let _ = self.export(&transport, batch).await;
                    continue;
                }
            };
            match msg {
                Some(Msg::Batch(b)) => {
                    let _ = self.export(&transport, b).await;
                }
                Some(Msg::Flush(reply)) => {
                    let r = self.drain(&transport).await;
                    let _ = reply.send(r);
                }
                Some(Msg::Shutdown(reply)) => {
                    let r = self.drain(&transport).await;
                    let _ = reply.send(r);
                    return;
                }
                None => return,
            }
        }
    }

    /// Exports what waits in the channel, then what is pending.
    async fn drain<T: Transport>(&mut self, transport: &T) -> Result<(), String> {
        let mut result = Ok(());
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Batch(b) => result = result.and(self.export(transport, b).await),
                // A second flush waiting behind this one: this drain covers it.
                Msg::Flush(reply) | Msg::Shutdown(reply) => {
                    let _ = reply.send(Ok(()));
                }
            }
        }
        let batch = self.shared.take();
        result.and(self.export(transport, batch).await)
    }

    async fn export<T: Transport>(&mut self, transport: &T, batch: Batch) -> Result<(), String> {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > self.reported {
            tracing::warn!(
                dropped = dropped - self.reported,
                "tracing: the span queue was full (collector slow or down); spans were dropped"
            );
            self.reported = dropped;
        }
        if batch.count == 0 {
            return Ok(());
        }
        let message = wire::export_request(
            &self.shared.resource,
            &self.shared.scope,
            batch.spans,
            self.shared.headroom,
            Some(self.shared.buffers.clone()),
        );
        transport.send(message).await.inspect_err(|e| {
            tracing::warn!(error = %e, "tracing: exporting spans failed; they are dropped");
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, SpanKind, TraceId};
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    use std::sync::atomic::AtomicUsize;

    /// Decodes what it is sent and counts the spans; `stall` makes every send hang.
    #[derive(Debug, Clone, Default)]
    struct Counting {
        spans: Arc<AtomicUsize>,
        batches: Arc<AtomicUsize>,
        service: Arc<Mutex<Option<String>>>,
        stall: bool,
    }

    impl Transport for Counting {
        async fn send(&self, message: wire::Message) -> Result<(), String> {
            let req = ExportTraceServiceRequest::decode(message.as_slice()).unwrap();
            let rs = &req.resource_spans[0];
            let n: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
            let service = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|kv| kv.key == "service.name")
                    .map(|kv| format!("{:?}", kv.value))
            });
            *self.service.lock().unwrap() = service;
            self.batches.fetch_add(1, Ordering::SeqCst);
            self.spans.fetch_add(n, Ordering::SeqCst);
            if self.stall {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }

    fn spawn(t: Counting, cfg: BatchConfig) -> BatchProcessor {
        BatchProcessor::spawn(
            t,
            cfg,
            wire::encode_resource(&[KeyValue::new("service.name", "svc")]),
            wire::encode_scope("breakwater", "0"),
        )
    }

    fn span() -> SpanRecord {
        SpanRecord::start(
            TraceId::from(1),
            SpanId::INVALID,
            false,
            SpanKind::Server,
            "s".into(),
            Default::default(),
        )
    }

    fn end_spans(p: &BatchProcessor, n: usize) {
        for _ in 0..n {
            p.record(&span());
        }
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    const SMALL: BatchConfig = BatchConfig {
        max_batch: 10,
        max_queue: 40,
        schedule_delay: Duration::from_secs(5),
    };

    #[tokio::test(start_paused = true)]
    async fn full_batches_go_at_once_the_rest_on_schedule() {
        let c = Counting::default();
        let p = spawn(c.clone(), SMALL);
        end_spans(&p, 25);
        settle().await;
        assert_eq!(
            c.spans.load(Ordering::SeqCst),
            20,
            "two full batches at once"
        );
        let service = c.service.lock().unwrap().clone().unwrap();
        assert!(service.contains("svc"), "{service}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        settle().await;
        assert_eq!(
            c.spans.load(Ordering::SeqCst),
            25,
            "the rest after the delay"
        );
        assert_eq!(c.batches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_collector_bounds_the_queue_and_counts_drops() {
        let c = Counting {
            stall: true,
            ..Counting::default()
        };
        let p = spawn(c.clone(), SMALL);
        end_spans(&p, 10);
        settle().await; // the first batch is now stuck in export
        end_spans(&p, 1000);
        settle().await;
        assert_eq!(c.spans.load(Ordering::SeqCst), 10);
        // Held at most: 3 full batches in the channel and the pending one.
        let dropped = p.dropped() as usize;
        assert!(1000 - dropped <= 40, "held {} spans", 1000 - dropped);
        assert!(dropped >= 960, "dropped {dropped}");
        // A flush cannot finish while the collector stalls: it gives up in time.
        let err = p.flush(Duration::from_secs(1)).await.unwrap_err();
        assert!(err.contains("not sent within"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn flush_and_shutdown_send_everything() {
        let c = Counting::default();
        let p = spawn(c.clone(), BatchConfig::default());
        end_spans(&p, 7);
        p.flush(Duration::from_secs(1)).await.unwrap();
        assert_eq!(c.spans.load(Ordering::SeqCst), 7);
        end_spans(&p, 3);
        p.shutdown(Duration::from_secs(1)).await.unwrap();
        assert_eq!(c.spans.load(Ordering::SeqCst), 10);
        // After shutdown, spans are dropped quietly.
        end_spans(&p, 3);
        settle().await;
        assert_eq!(c.spans.load(Ordering::SeqCst), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn big_spans_end_a_batch_early() {
        let c = Counting::default();
        let p = spawn(c.clone(), BatchConfig::default());
        let mut s = span();
        s.attributes
            .str(&wire::AttrKey::new("url.path"), &"/x".repeat(32 * 1024));
        s.attributes.str(&wire::AttrKey::new("k"), "v");
        for _ in 0..60 {
            p.record(&s);
        }
        settle().await;
        // 64 KiB spans: a batch is sent every 48 of them, far below 512.
        assert_eq!(c.batches.load(Ordering::SeqCst), 1);
        assert_eq!(c.spans.load(Ordering::SeqCst), 48);
    }

    #[test]
    fn config_from_the_environment() {
        assert_eq!(BatchConfig::from_vars(|_| None), BatchConfig::default());
        let vars = |n: &str| match n {
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("100".to_string()),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("500".to_string()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some(" 250 ".to_string()),
            _ => None,
        };
        let c = BatchConfig::from_vars(vars);
        // A batch never exceeds the queue.
        assert_eq!((c.max_batch, c.max_queue), (100, 100));
        assert_eq!(c.schedule_delay, Duration::from_millis(250));
        let junk = BatchConfig::from_vars(|_| Some("0x".to_string()));
        assert_eq!(junk, BatchConfig::default());
    }
}
