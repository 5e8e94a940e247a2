//! Percentiles of a sample of durations.

use std::time::Duration;

/// Summary of a sample.
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Sorts `samples` and summarizes them; `None` when empty.
pub fn summarize(samples: &mut [Duration]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Some(Summary {
        n: samples.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: samples[samples.len() - 1],
    })
}

/// `1.23 ms` style.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={} p99={} max={}",
            self.n,
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}
