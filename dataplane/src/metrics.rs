//! Prometheus metrics, in the text exposition format, on the node's admin listener.
//!
//! A worker counts into figures of its own (no lock, no atomic per request) and publishes
//! them about once a second into its slot ([`WorkerMetrics::publish_into`]); the admin
//! listener sums the slots when scraped. Figures lag by at most that second. Labels are
//! bounded: status class, endpoint, upstream name (its own name, without the tenant and
//! environment a pushed upstream's full name carries) — never a key, a tenant or a model.

use std::fmt::Write;
use std::sync::Arc;

use rustc_hash::FxHashMap;

/// Histogram bucket upper bounds, seconds.
pub const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Per bucket (not cumulative), the last one `+Inf`.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        let i = BUCKETS.partition_point(|b| *b < secs);
        self.counts[i] += 1;
        self.sum += secs;
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.sum += o.sum;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Requests by (status class `1`–`5`, endpoint, upstream name or empty).
type RequestKey = (u8, &'static str, Arc<str>);

/// What one worker counted.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    pub requests: FxHashMap<RequestKey, u64>,
    /// Requests whose upstream failed them (5xx, or no answer) by upstream.
    pub upstream_errors: FxHashMap<Arc<str>, u64>,
    /// Attempts beyond the first (failover, fresh retries of stale pooled connections).
    pub retries: u64,
    pub latency: Histogram,
    pub ttfb: Histogram,
    /// Tokens reported by providers, by kind.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
}

impl WorkerMetrics {
    pub fn merge(&mut self, o: &WorkerMetrics) {
        for (k, v) in &o.requests {
            *self.requests.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.upstream_errors {
            *self.upstream_errors.entry(Arc::clone(k)).or_default() += v;
        }
        self.retries += o.retries;
        self.latency.merge(&o.latency);
        self.ttfb.merge(&o.ttfb);
        self.input_tokens += o.input_tokens;
        self.output_tokens += o.output_tokens;
        self.cached_input_tokens += o.cached_input_tokens;
        self.cache_write_tokens += o.cache_write_tokens;
        self.reasoning_tokens += o.reasoning_tokens;
    }

    /// Adds these figures to the worker's published slot and starts again from zero.
    pub fn publish_into(&mut self, slot: &std::sync::Mutex<WorkerMetrics>) {
        if self.requests.is_empty() {
            return;
        }
        slot.lock().unwrap_or_else(|p| p.into_inner()).merge(self);
        *self = WorkerMetrics::default();
    }
}

/// Gauges the admin listener reads at scrape time.
#[derive(Debug, Default)]
pub struct Gauges {
    pub open_connections: u64,
    /// Client TLS handshakes that failed or timed out since start.
    pub tls_handshakes_failed: u64,
    pub workers: u64,
    pub workers_running: u64,
    pub uptime_seconds: f64,
    pub config_revision: Option<u64>,
    pub config_age_seconds: Option<f64>,
    pub control_plane_connected: Option<bool>,
    pub usage_unacknowledged_entries: Option<u64>,
    pub usage_dropped_entries: Option<u64>,
    /// Requests whose bodies the body log queue could not take, since start.
    pub body_log_dropped: Option<u64>,
    /// Body log bytes held for the control plane (queued or not yet acknowledged).
    pub body_log_queued_bytes: Option<u64>,
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition of everything the workers published, plus the gauges.
pub fn render(m: &WorkerMetrics, g: &Gauges) -> String {
    let mut out = String::with_capacity(4096);
    help(
        &mut out,
        "aigw_requests_total",
        "counter",
        "Requests answered, by status class, endpoint and upstream.",
    );
    let mut requests: Vec<_> = m.requests.iter().collect();
    requests.sort();
    for ((class, endpoint, upstream), n) in requests {
        let _ = writeln!(
            out,
            "aigw_requests_total{{code=\"{class}xx\",endpoint=\"{endpoint}\",upstream=\"{}\"}} {n}",
            label(upstream)
        );
    }
    help(
        &mut out,
        "aigw_upstream_errors_total",
        "counter",
        "Requests an upstream failed (a 5xx, or no answer), by upstream.",
    );
    let mut errors: Vec<_> = m.upstream_errors.iter().collect();
    errors.sort();
    for (upstream, n) in errors {
        let _ = writeln!(
            out,
            "aigw_upstream_errors_total{{upstream=\"{}\"}} {n}",
            label(upstream)
        );
    }
    help(&mut out, "aigw_upstream_retries_total", "counter", "Upstream attempts beyond a request's first (failover, retries of stale pooled connections).");
    let _ = writeln!(out, "aigw_upstream_retries_total {}", m.retries);
    help(
        &mut out,
        "aigw_request_duration_seconds",
        "histogram",
        "From a request's first byte to its response's last.",
    );
    m.latency.render(&mut out, "aigw_request_duration_seconds");
    help(
        &mut out,
        "aigw_time_to_first_byte_seconds",
        "histogram",
        "From a request's first byte to its upstream's response head.",
    );
    m.ttfb.render(&mut out, "aigw_time_to_first_byte_seconds");
    help(&mut out, "aigw_tokens_total", "counter", "Tokens providers reported, by kind (cached input and cache writes are part of input, reasoning part of output).");
    for (kind, n) in [
        ("input", m.input_tokens),
        ("output", m.output_tokens),
        ("cached_input", m.cached_input_tokens),
        ("cache_write", m.cache_write_tokens),
        ("reasoning", m.reasoning_tokens),
    ] {
        let _ = writeln!(out, "aigw_tokens_total{{kind=\"{kind}\"}} {n}");
    }
    help(
        &mut out,
        "aigw_open_connections",
        "gauge",
        "Client connections open.",
    );
    let _ = writeln!(out, "aigw_open_connections {}", g.open_connections);
    help(
        &mut out,
        "aigw_tls_handshakes_failed_total",
        "counter",
        "Client TLS handshakes that failed or timed out.",
    );
    let _ = writeln!(
        out,
        "aigw_tls_handshakes_failed_total {}",
        g.tls_handshakes_failed
    );
    help(
        &mut out,
        "aigw_workers",
        "gauge",
        "Workers, and those serving.",
    );
    let _ = writeln!(out, "aigw_workers {}", g.workers);
    let _ = writeln!(out, "aigw_workers_running {}", g.workers_running);
    help(
        &mut out,
        "aigw_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    let _ = writeln!(out, "aigw_uptime_seconds {:.3}", g.uptime_seconds);
    if let Some(r) = g.config_revision {
        help(
            &mut out,
            "aigw_config_revision",
            "gauge",
            "The configuration revision the node holds.",
        );
        let _ = writeln!(out, "aigw_config_revision {r}");
    }
    if let Some(a) = g.config_age_seconds {
        help(
            &mut out,
            "aigw_config_age_seconds",
            "gauge",
            "Seconds since the configuration was last known current.",
        );
        let _ = writeln!(out, "aigw_config_age_seconds {a:.3}");
    }
    if let Some(c) = g.control_plane_connected {
        help(
            &mut out,
            "aigw_control_plane_connected",
            "gauge",
            "1 while the link to the control plane is up.",
        );
        let _ = writeln!(out, "aigw_control_plane_connected {}", u8::from(c));
    }
    if let (Some(w), Some(d)) = (g.usage_unacknowledged_entries, g.usage_dropped_entries) {
        help(
            &mut out,
            "aigw_usage_unacknowledged_entries",
            "gauge",
            "Usage entries the control plane has not acknowledged yet.",
        );
        let _ = writeln!(out, "aigw_usage_unacknowledged_entries {w}");
        help(
            &mut out,
            "aigw_usage_dropped_entries_total",
            "counter",
            "Usage entries dropped for want of room while the control plane was unreachable.",
        );
        let _ = writeln!(out, "aigw_usage_dropped_entries_total {d}");
    }
    if let (Some(d), Some(q)) = (g.body_log_dropped, g.body_log_queued_bytes) {
        help(
            &mut out,
            "aigw_body_log_dropped_total",
            "counter",
            "Requests whose bodies were not logged because the body log queue was full.",
        );
        let _ = writeln!(out, "aigw_body_log_dropped_total {d}");
        help(
            &mut out,
            "aigw_body_log_queued_bytes",
            "gauge",
            "Body bytes held for the control plane's body log, queued or not yet acknowledged.",
        );
        let _ = writeln!(out, "aigw_body_log_queued_bytes {q}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_workers_add_up() {
        let mut a = WorkerMetrics::default();
        a.latency.observe(0.004);
        a.latency.observe(0.2);
        a.latency.observe(1000.0);
        *a.requests
            .entry((2, "chat_completions", "oa".into()))
            .or_default() += 3;
        let mut b = WorkerMetrics::default();
        *b.requests
            .entry((2, "chat_completions", "oa".into()))
            .or_default() += 2;
        b.input_tokens = 7;
        a.merge(&b);
        let text = render(&a, &Gauges::default());
        assert!(
            text.contains(
                "aigw_requests_total{code=\"2xx\",endpoint=\"chat_completions\",upstream=\"oa\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains("aigw_request_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("aigw_request_duration_seconds_bucket{le=\"0.25\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("aigw_request_duration_seconds_bucket{le=\"600\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("aigw_request_duration_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("aigw_tokens_total{kind=\"input\"} 7"),
            "{text}"
        );
        assert_eq!(label("a\"b\\"), "a\\\"b\\\\");
    }
}
