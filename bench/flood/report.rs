//! Histograms: how they travel between processes, the p50..max summary, and
//! the `.hgrm` percentile distribution text that HdrHistogram's
//! outputPercentileDistribution prints (so the online plotter can draw it).
//!
//! All histograms record nanoseconds; everything printed is microseconds.

use crate::proto::HistCounts;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::fmt::Write;

/// Significant digits of every histogram (as HdrHistogram's usual 3).
pub const SIGFIG: u8 = 3;

/// A latency histogram in nanoseconds, 1 ns .. 1 hour.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, SIGFIG).expect("valid histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record(ns.clamp(1, 3_600_000_000_000));
}

/// Raw bucket counts, for the pipe to the coordinator.
pub fn hist_counts(h: &Histogram<u64>) -> HistCounts {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds counts made by `hist_counts` into `into`.
pub fn merge_counts(into: &mut Histogram<u64>, counts: &HistCounts) {
    for &(value, count) in counts {
        if count > 0 {
            into.saturating_record_n(value.clamp(1, 3_600_000_000_000), count);
        }
    }
}

/// The merge of every histogram in `counts`.
pub fn merged<'a>(counts: impl IntoIterator<Item = &'a HistCounts>) -> Histogram<u64> {
    let mut h = new_hist();
    for c in counts {
        merge_counts(&mut h, c);
    }
    h
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

/// `{p50,p90,p99,p999,p9999,max}` in microseconds (0.1 µs resolution).
pub fn summary_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null, "p999": null, "p9999": null, "max": null, "count": 0});
    }
    json!({
        "p50": us(h.value_at_quantile(0.5)),
        "p90": us(h.value_at_quantile(0.9)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "p9999": us(h.value_at_quantile(0.9999)),
        "max": us(h.max()),
        "count": h.len(),
    })
}

/// Header line of the latency tables.
pub fn table_header() -> String {
    format!(
        "  {:<26} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "latency (us)", "count", "p50", "p90", "p99", "p99.9", "p99.99", "max"
    )
}

/// One row of the latency table.
pub fn table_row(label: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("  {:<26} {:>9} {:>10}\n", label, 0, "-");
    }
    let q = |x: f64| us(h.value_at_quantile(x));
    format!(
        "  {:<26} {:>9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}\n",
        label,
        h.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        q(0.9999),
        us(h.max())
    )
}

/// HdrHistogram's sub-bucket count for a number of significant digits
/// (2048 for 3), printed in the `.hgrm` footer.
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(sigfig));
    (largest as f64).log2().ceil().exp2() as u64
}

/// The percentile distribution exactly as HdrHistogram's
/// `outputPercentileDistribution(out, 5, scale)` prints it: values divided by
/// `scale` (1000.0 turns ns into µs), five ticks per half distance.
pub fn hgrm(h: &Histogram<u64>, scale: f64) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total: u64 = 0;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{:>12.3} {:>2.12} {:>10} {:>14.2}",
                    value,
                    q,
                    total,
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{:>12.3} {:>2.12} {:>10}", value, q, total);
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        mean, stdev
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        max,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_shape() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            record(&mut h, v * 1000);
        }
        let text = hgrm(&h, 1000.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        // First row: the smallest value at percentile 0.
        assert_eq!(
            lines[2],
            "       1.000 0.000000000000          1           1.00"
        );
        // Median row.
        assert!(
            lines.contains(&"     500.223 0.500000000000        500           2.00"),
            "{text}"
        );
        // Last data row has no 1/(1-p) column and reaches the total count.
        let last = lines[lines.len() - 4];
        assert!(last.ends_with("1.000000000000       1000"), "{last}");
        assert!(lines[lines.len() - 3].starts_with("#[Mean    =      500.5"));
        assert_eq!(
            lines[lines.len() - 2],
            "#[Max     =     1000.447, Total count    =         1000]"
        );
        assert!(lines[lines.len() - 1].ends_with("SubBuckets     =         2048]"));
        // Counts never decrease down the table.
        let counts: Vec<u64> = lines[2..lines.len() - 3]
            .iter()
            .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn empty_and_roundtrip() {
        let h = new_hist();
        let text = hgrm(&h, 1000.0);
        assert!(text.contains("Total count    =            0"));
        assert_eq!(summary_json(&h)["count"], 0);

        let mut a = new_hist();
        for v in [5_000u64, 7_000, 7_000, 1_000_000] {
            record(&mut a, v);
        }
        let b = merged([&hist_counts(&a)]);
        assert_eq!(b.len(), 4);
        assert_eq!(b.value_at_quantile(0.5), a.value_at_quantile(0.5));
        assert_eq!(b.max(), a.max());
        let s = summary_json(&b);
        assert_eq!(s["p50"], 7.0);
        assert_eq!(s["max"], 1000.4);
    }
}
