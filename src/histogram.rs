//! Latency histograms of the evaluation tools (`bench`, its elastic scenario,
//! `fabric-bench`): HdrHistogram at 3 significant digits. Memory does not grow with the
//! samples, per-thread histograms merge exactly, and a quantile is the nearest-rank sample
//! within 0.1% (values below 2048 units are kept exactly).

use std::time::Duration;

/// Counts by value, in whatever unit the caller records (ns or µs).
pub type Histogram = hdrhistogram::Histogram<u64>;

/// Significant digits kept of every value.
const SIGFIG: u8 = 3;

/// An empty histogram that grows to hold any value recorded or merged into it.
pub fn new() -> Histogram {
    // `new` refuses only more than 5 significant digits.
    Histogram::new(SIGFIG).expect("3 significant digits are supported")
}

/// Records `value`, growing the histogram to hold it (`saturating_record` alone would not
/// grow it); a value beyond what any histogram holds is counted at the top.
pub fn record(h: &mut Histogram, value: u64) {
    if h.record(value).is_err() {
        h.saturating_record(value);
    }
}

/// Records a latency in nanoseconds.
pub fn record_ns(h: &mut Histogram, latency: Duration) {
    record(h, u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
}

/// Records a latency in microseconds.
pub fn record_us(h: &mut Histogram, latency: Duration) {
    record(h, u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
}

/// Adds `from`'s counts to `into`.
pub fn merge(into: &mut Histogram, from: &Histogram) {
    if into.add(from).is_err() {
        // Only a histogram that cannot grow refuses values: count them at its top instead.
        for v in from.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_the_nearest_rank_and_merging_is_exact() {
        let (mut a, mut b) = (new(), new());
        for v in 1..=50 {
            record(&mut a, v);
        }
        for v in 51..=100 {
            record(&mut b, v);
        }
        merge(&mut a, &b);
        assert_eq!(a.len(), 100);
        assert_eq!((a.min(), a.value_at_quantile(0.5), a.max()), (1, 50, 100));
        assert_eq!(a.value_at_quantile(0.99), 99);
        assert_eq!(a.value_at_quantile(0.999), 100);
        assert!((a.mean() - 50.5).abs() < 1e-9);
        // Past 2048 units a value keeps 3 significant digits.
        let mut big = new();
        record(&mut big, 123_456_789);
        let got = big.value_at_quantile(0.5);
        assert!(got.abs_diff(123_456_789) <= 123_456, "{got}");
        assert_eq!(new().value_at_quantile(0.99), 0);
        let mut units = new();
        record_ns(&mut units, Duration::from_nanos(1500));
        record_us(&mut units, Duration::from_nanos(2999));
        assert_eq!((units.min(), units.max()), (2, 1500));
    }

    #[test]
    fn a_histogram_that_cannot_grow_takes_larger_values_at_its_top() {
        let mut small = Histogram::new_with_bounds(1, 1000, SIGFIG).expect("bounds");
        let mut big = new();
        record(&mut big, 5);
        record(&mut big, 1_000_000);
        merge(&mut small, &big);
        assert_eq!(small.len(), 2);
        assert_eq!(small.min(), 5);
        assert!(
            small.max() >= 1000 && small.max() < 1_000_000,
            "{}",
            small.max()
        );
    }
}
