//! The shards' counters as `/stats` (JSON) and `/metrics` (Prometheus text
//! exposition format 0.0.4): every [`Counter`] by its [`Counter::name`].
//!
//! In `/metrics` each is named `corepush_<name>`, with `_total` after the
//! name of those that only go up (Prometheus counters), and has one series
//! per shard labelled `shard="N"`; the gauges are
//! connections, logged_in and local_uids.

use std::fmt::Write;

use crate::stats::{Counter, Snapshot};

/// Whether a counter goes up and down (a gauge) or only up.
pub fn is_gauge(counter: Counter) -> bool {
    matches!(
        counter,
        Counter::Connections | Counter::LoggedIn | Counter::LocalUids
    )
}

/// The metric name of a counter in `/metrics`.
pub fn metric_name(counter: Counter) -> String {
    if is_gauge(counter) {
        format!("corepush_{}", counter.name())
    } else {
        format!("corepush_{}_total", counter.name())
    }
}

/// `/stats`: `{"shards": S, "total": {name: n, ...}, "per_shard":
/// [{"shard": 0, name: n, ...}, ...]}`, counters in [`Counter::ALL`] order.
pub fn stats_json(shards: &[Snapshot]) -> String {
    let mut out = String::with_capacity(1024 * (shards.len() + 1));
    let total = Snapshot::sum(shards);
    let _ = write!(out, "{{\"shards\": {}, \"total\": ", shards.len());
    counters_object(&mut out, None, &total);
    out.push_str(", \"per_shard\": [");
    for (i, shard) in shards.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        counters_object(&mut out, Some(i), shard);
    }
    out.push_str("]}");
    out
}

fn counters_object(out: &mut String, shard: Option<usize>, snapshot: &Snapshot) {
    out.push('{');
    if let Some(shard) = shard {
        let _ = write!(out, "\"shard\": {shard}, ");
    }
    for (i, counter) in Counter::ALL.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        // Names are fixed lowercase ASCII: nothing to escape.
        let _ = write!(out, "\"{}\": {}", counter.name(), snapshot.get(*counter));
    }
    out.push('}');
}

/// `/metrics`: each counter with `# HELP` and `# TYPE`, one series per shard.
pub fn prometheus(shards: &[Snapshot]) -> String {
    let mut out = String::with_capacity(Counter::ALL.len() * (160 + 48 * shards.len()));
    for counter in Counter::ALL {
        let name = metric_name(counter);
        let kind = if is_gauge(counter) {
            "gauge"
        } else {
            "counter"
        };
        let _ = writeln!(out, "# HELP {name} {}", counter.help());
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (i, shard) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", shard.get(counter));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ShardStats;

    fn two_shards() -> Vec<Snapshot> {
        let a = ShardStats::default();
        a.add(Counter::Connections, 3);
        a.add(Counter::BytesOut, 1000);
        let b = ShardStats::default();
        b.add(Counter::Connections, 1);
        b.inc(Counter::NoRecipient);
        vec![a.snapshot(), b.snapshot()]
    }

    #[test]
    fn stats_is_json_with_every_counter() {
        let stats: serde_json::Value = serde_json::from_str(&stats_json(&two_shards())).unwrap();
        assert_eq!(stats["shards"], 2);
        assert_eq!(stats["total"]["connections"], 4);
        assert_eq!(stats["total"]["bytes_out"], 1000);
        assert_eq!(stats["per_shard"][1]["shard"], 1);
        assert_eq!(stats["per_shard"][1]["no_recipient"], 1);
        for counter in Counter::ALL {
            assert!(
                stats["total"][counter.name()].is_u64(),
                "{}",
                counter.name()
            );
            assert!(stats["per_shard"][0][counter.name()].is_u64());
        }
    }

    #[test]
    fn metrics_have_help_type_and_a_series_per_shard() {
        let text = prometheus(&two_shards());
        assert!(text.contains("# TYPE corepush_connections gauge\n"));
        assert!(text.contains("corepush_connections{shard=\"0\"} 3\n"));
        assert!(text.contains("# TYPE corepush_bytes_out_total counter\n"));
        assert!(text.contains("corepush_no_recipient_total{shard=\"1\"} 1\n"));
        let series = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(series, Counter::ALL.len() * 2);
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(helps, Counter::ALL.len());
    }
}
