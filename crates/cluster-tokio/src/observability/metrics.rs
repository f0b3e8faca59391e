//! A [`ClusterStatus`] in the Prometheus text format, with `prometheus-client` (the `metrics`
//! feature). The metrics are made afresh from each snapshot: a worker's series go with it.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::ClusterStatus;
use crate::primary::{HandoffLatency, WorkerState};

/// The `Content-Type` of the text [`encode`] writes.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = [(&'static str, String); 1];

fn label(name: &'static str, value: impl ToString) -> Labels {
    [(name, value.to_string())]
}

/// A [`HandoffLatency`] as a Prometheus histogram: its buckets are counted already.
#[derive(Debug)]
struct Latency(HandoffLatency);

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .buckets()
            .map(|(bound, count)| (bound.map_or(f64::INFINITY, |b| b.as_secs_f64()), count))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.0.sum().as_secs_f64(),
            self.0.count(),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// `status` as Prometheus text (names and meanings: the table in `docs/operations.md`).
pub(crate) fn encode(status: &ClusterStatus) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();

    let workers = Family::<Labels, Gauge>::default();
    for state in [
        WorkerState::None,
        WorkerState::Online,
        WorkerState::Listening,
        WorkerState::Disconnected,
    ] {
        let count = status
            .workers
            .iter()
            .filter(|w| w.counters.state == state)
            .count();
        workers
            .get_or_create(&label("state", state))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(
        "cluster_workers",
        "Workers not yet exited, by state",
        workers,
    );

    let restarts = Family::<Labels, Counter>::default();
    for slot in &status.slots {
        restarts
            .get_or_create(&label("slot", slot.slot.index()))
            .inc_by(slot.restarts);
    }
    registry.register(
        "cluster_worker_restarts",
        "Workers started again in a slot that had one before",
        restarts,
    );

    let handoffs = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let connections = Family::<Labels, Gauge>::default();
    let outstanding = Family::<Labels, Gauge>::default();
    let memory = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    for worker in &status.workers {
        let id = label("worker", worker.counters.id.get());
        handoffs.get_or_create(&id).inc_by(worker.counters.handoffs);
        refused.get_or_create(&id).inc_by(worker.counters.refused);
        outstanding
            .get_or_create(&id)
            .set(i64::try_from(worker.counters.outstanding).unwrap_or(i64::MAX));
        if let Some(count) = worker.connections {
            connections
                .get_or_create(&id)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        if let Some(usage) = worker.usage {
            memory
                .get_or_create(&id)
                .set(i64::try_from(usage.resident_bytes).unwrap_or(i64::MAX));
            cpu.get_or_create(&id).inc_by(usage.cpu_time.as_secs_f64());
        }
    }
    registry.register(
        "cluster_handoffs",
        "Connections handed to a worker, re-dispatches included",
        handoffs,
    );
    registry.register(
        "cluster_handoff_refused",
        "Handoffs a worker refused (its listener was full or closing)",
        refused,
    );
    registry.register(
        "cluster_worker_outstanding",
        "A worker's open connections as the scheduler counts them (least-outstanding and the per-worker cap go by it)",
        outstanding,
    );
    registry.register(
        "cluster_connections_active",
        "TCP connections a worker is serving on the cluster's listening ports",
        connections,
    );
    registry.register(
        "cluster_handoff_duration_seconds",
        "How long accepted connections waited in the primary before they were handed to a worker",
        Latency(status.handoff_latency.clone()),
    );
    registry.register(
        "cluster_worker_resident_memory_bytes",
        "A worker's resident memory",
        memory,
    );
    registry.register(
        "cluster_worker_cpu_seconds",
        "A worker's CPU time, user and system",
        cpu,
    );

    if let Some(value) = saturation(status) {
        let gauge = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        gauge.set(value);
        registry.register(
            "cluster_saturation",
            "TCP connections being served per serving worker",
            gauge,
        );
    }

    let reloads = Family::<Labels, Counter>::default();
    for (result, count) in [
        ("complete", status.reloads.complete),
        ("aborted", status.reloads.aborted),
        ("failed", status.reloads.failed),
    ] {
        reloads
            .get_or_create(&label("result", result))
            .inc_by(count);
    }
    registry.register(
        "cluster_reloads",
        "Rolling reloads, by how they ended",
        reloads,
    );

    let handed_back = Counter::<u64>::default();
    handed_back.inc_by(status.handed_back);
    registry.register(
        "cluster_connections_handed_back",
        "Idle keep-alive connections leaving workers handed back to be served on by others (reloads, scale-downs)",
        handed_back,
    );

    let recycles = Family::<Labels, Counter>::default();
    for (reason, count) in [
        ("requests", status.recycles.requests),
        ("memory", status.recycles.memory),
    ] {
        recycles
            .get_or_create(&label("reason", reason))
            .inc_by(count);
    }
    registry.register(
        "cluster_worker_recycles",
        "Workers recycled (replaced while serving), by why: handed their limit of connections, or over the memory limit",
        recycles,
    );

    let accept_errors = Counter::<u64>::default();
    accept_errors.inc_by(status.accept_errors);
    registry.register(
        "cluster_accept_errors",
        "Accepts of the primary that failed (a connection reset first, or out of fds)",
        accept_errors,
    );

    let oom_kills = Counter::<u64>::default();
    oom_kills.inc_by(status.oom_kills);
    registry.register(
        "cluster_worker_oom_kills",
        "Workers the kernel's OOM killer killed (their memory cgroup ran out of memory)",
        oom_kills,
    );

    let generation = Gauge::<i64>::default();
    generation.set(i64::try_from(status.generation).unwrap_or(i64::MAX));
    registry.register(
        "cluster_generation",
        "The generation new workers start in",
        generation,
    );

    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// `cluster_saturation`: the TCP connections every worker serves (draining workers' included:
/// they are load still on the pod) over the workers that serve; `None` while none serves (the
/// gauge is left out rather than made up). The same under both scheduling policies: the
/// connections are read from the kernel, not counted by the primary as it hands them out.
fn saturation(status: &ClusterStatus) -> Option<f64> {
    if status.serving == 0 {
        return None;
    }
    let connections: usize = status.workers.iter().filter_map(|w| w.connections).sum();
    // Both are far below 2^52: exact as f64.
    Some(connections as f64 / status.serving as f64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proto::WorkerId;

    use super::*;
    use crate::observability::WorkerStatus;
    use crate::primary::WorkerCounters;

    fn worker(id: u64, state: WorkerState, connections: Option<usize>) -> WorkerStatus {
        WorkerStatus {
            counters: WorkerCounters {
                id: WorkerId::new(id),
                pid: 1000 + u32::try_from(id).unwrap(),
                state,
                in_flight: 0,
                outstanding: 0,
                handoffs: 0,
                refused: 0,
                returned: 0,
                handed_back: 0,
            },
            slot: None,
            generation: 1,
            ready: false,
            uptime: Duration::from_secs(1),
            restarts: 0,
            previous: None,
            usage: None,
            connections,
        }
    }

    fn status(serving: usize, workers: Vec<WorkerStatus>) -> ClusterStatus {
        ClusterStatus {
            pid: 1,
            uptime: Duration::from_secs(1),
            phase: crate::supervisor::Phase::default(),
            generation: 1,
            wanted: workers.len(),
            serving,
            workers,
            slots: Vec::new(),
            restarts: 0,
            reloads: crate::supervisor::ReloadCounts::default(),
            recycles: crate::supervisor::RecycleCounts::default(),
            oom_kills: 0,
            connections_held: 0,
            listeners: 1,
            handoffs: 0,
            handed_back: 0,
            handoff_latency: HandoffLatency::default(),
            accept_errors: 0,
            binaries: Vec::new(),
        }
    }

    #[test]
    fn recycles_are_counted_by_reason() {
        let mut cluster = status(1, vec![worker(1, WorkerState::Listening, Some(0))]);
        cluster.recycles.requests = 3;
        cluster.recycles.memory = 1;
        let text = encode(&cluster).unwrap();
        assert!(
            text.contains("# TYPE cluster_worker_recycles_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("cluster_worker_recycles_total{reason=\"requests\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("cluster_worker_recycles_total{reason=\"memory\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn saturation_is_the_connections_served_per_serving_worker() {
        // Two serving workers with 3 and 5 connections, one draining with 4 (still load on the
        // pod), one whose connections could not be read.
        let cluster = status(
            2,
            vec![
                worker(1, WorkerState::Listening, Some(3)),
                worker(2, WorkerState::Listening, Some(5)),
                worker(3, WorkerState::Disconnected, Some(4)),
                worker(4, WorkerState::Online, None),
            ],
        );
        assert_eq!(saturation(&cluster), Some(6.0));
        let text = encode(&cluster).unwrap();
        assert!(
            text.contains("# TYPE cluster_saturation gauge\ncluster_saturation 6.0\n"),
            "{text}"
        );

        // No worker serves: left out, not a division by zero.
        let idle = status(0, vec![worker(1, WorkerState::Online, Some(0))]);
        assert_eq!(saturation(&idle), None);
        assert!(!encode(&idle).unwrap().contains("cluster_saturation"));
    }
}
