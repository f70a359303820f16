//! Prometheus metrics: the one place counters live. Rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Server metrics.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Heartbeats accepted.
    pub heartbeats: AtomicU64,
    /// Heartbeats that stored a new package list.
    pub inventory_writes: AtomicU64,
    /// Events stored (not counting duplicates).
    pub events: AtomicU64,
    /// Bundles accepted into a catalog.
    pub bundles_uploaded: AtomicU64,
    /// Bundle uploads refused (bad signature, malformed...).
    pub bundles_rejected: AtomicU64,
    /// Manifests signed.
    pub manifests_signed: AtomicU64,
}

impl Metrics {
    /// Records one finished request.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        {
            let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            *r.entry((method.to_string(), route.to_string(), status))
                .or_default() += 1;
        }
        let secs = elapsed.as_secs_f64();
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = l.entry(route.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// Prometheus text format; `online`/`total` are the agent gauges read at scrape time.
    pub fn render(&self, online: i64, total: i64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP stitch_http_requests_total HTTP requests by method, route and status."
        );
        let _ = writeln!(out, "# TYPE stitch_http_requests_total counter");
        for ((m, r, s), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "stitch_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP stitch_http_request_duration_seconds Request latency by route."
        );
        let _ = writeln!(out, "# TYPE stitch_http_request_duration_seconds histogram");
        for (r, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "stitch_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "stitch_http_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "stitch_http_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "stitch_http_request_duration_seconds_count{{route=\"{r}\"}} {}",
                h.count
            );
        }
        let counters = [
            (
                "stitch_heartbeats_total",
                "Heartbeats accepted.",
                &self.heartbeats,
            ),
            (
                "stitch_inventory_writes_total",
                "Heartbeats that stored a new package list.",
                &self.inventory_writes,
            ),
            (
                "stitch_events_total",
                "Agent events stored (duplicates excluded).",
                &self.events,
            ),
            (
                "stitch_bundles_uploaded_total",
                "Bundles accepted into a catalog.",
                &self.bundles_uploaded,
            ),
            (
                "stitch_bundles_rejected_total",
                "Bundle uploads refused.",
                &self.bundles_rejected,
            ),
            (
                "stitch_manifests_signed_total",
                "Manifests signed.",
                &self.manifests_signed,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", c.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP stitch_agents_online Agents seen within the online window."
        );
        let _ = writeln!(out, "# TYPE stitch_agents_online gauge");
        let _ = writeln!(out, "stitch_agents_online {online}");
        let _ = writeln!(
            out,
            "# HELP stitch_agents_enrolled Agents enrolled and not revoked."
        );
        let _ = writeln!(out, "# TYPE stitch_agents_enrolled gauge");
        let _ = writeln!(out, "stitch_agents_enrolled {total}");
        out
    }
}
