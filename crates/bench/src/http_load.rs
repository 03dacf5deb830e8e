//! A closed-loop HTTP load generator: N threads, each with its own keep-alive connection,
//! sending requests back to back for a fixed time and timing each one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One request to send.
#[derive(Clone)]
pub enum Request {
    Get(String),
    Post { url: String, body: Arc<String> },
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct LoadResult {
    pub elapsed: Duration,
    /// Latencies of successful requests.
    pub ok_latencies: Vec<Duration>,
    pub failures: usize,
    pub statuses: Vec<(u16, usize)>,
}

impl LoadResult {
    pub fn ok(&self) -> usize {
        self.ok_latencies.len()
    }

    /// The q-quantile (0..=1) of successful latencies.
    pub fn quantile(&mut self, q: f64) -> Duration {
        quantile(&mut self.ok_latencies, q)
    }
}

/// The q-quantile (0..=1) of `latencies`, which it sorts; zero when there are none.
pub fn quantile(latencies: &mut [Duration], q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    latencies.sort_unstable();
    let i = ((latencies.len() - 1) as f64 * q).round() as usize;
    latencies[i]
}

/// Sends `requests` (cycled, each thread starting at its own offset) from `threads` threads
/// for `duration`; a request counts as successful when it gets `ok_status`.
///
/// With `rate` (requests per second over all threads) each thread sends on a fixed schedule
/// and a request's latency is counted from when it was due, not when it went out, so a slow
/// answer that delays the next send is not hidden (no coordinated omission). Without it,
/// each thread sends as fast as answers come back (the throughput ceiling).
pub fn run(
    threads: usize,
    duration: Duration,
    requests: &[Request],
    ok_status: u16,
    rate: Option<f64>,
) -> LoadResult {
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(requests.to_vec());
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let stop = stop.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .proxy(None)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                let mut ok = Vec::new();
                let mut statuses: Vec<(u16, usize)> = Vec::new();
                let mut failures = 0;
                let mut i = t * 7919;
                let interval = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
                let mut due = Instant::now()
                    + interval.map_or(Duration::ZERO, |iv| iv.mul_f64(t as f64 / threads as f64));
                while !stop.load(Ordering::Relaxed) {
                    let request = &requests[i % requests.len()];
                    i += 1;
                    let sent = match interval {
                        Some(interval) => {
                            let scheduled = due;
                            due += interval;
                            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            scheduled
                        }
                        None => Instant::now(),
                    };
                    let outcome = match request {
                        Request::Get(url) => agent.get(url).call(),
                        Request::Post { url, body } => agent
                            .post(url)
                            .header("Content-Type", "application/json")
                            .send(body.as_bytes()),
                    };
                    match outcome {
                        Ok(mut response) => {
                            let status = response.status().as_u16();
                            let _ = response.body_mut().read_to_string();
                            if status == ok_status {
                                ok.push(sent.elapsed());
                            } else {
                                failures += 1;
                                match statuses.iter_mut().find(|(s, _)| *s == status) {
                                    Some((_, n)) => *n += 1,
                                    None => statuses.push((status, 1)),
                                }
                            }
                        }
                        Err(_) => failures += 1,
                    }
                }
                (ok, failures, statuses)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut result = LoadResult::default();
    for handle in handles {
        if let Ok((ok, failures, statuses)) = handle.join() {
            result.ok_latencies.extend(ok);
            result.failures += failures;
            for (status, n) in statuses {
                match result.statuses.iter_mut().find(|(s, _)| *s == status) {
                    Some((_, m)) => *m += n,
                    None => result.statuses.push((status, n)),
                }
            }
        }
    }
    result.elapsed = started.elapsed();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_picks_the_nearest_rank_and_nothing_gives_zero() {
        assert_eq!(quantile(&mut [], 0.99), Duration::ZERO);
        let mut latencies = [3, 1, 2, 4, 5].map(Duration::from_millis);
        assert_eq!(quantile(&mut latencies, 0.5), Duration::from_millis(3));
        assert_eq!(quantile(&mut latencies, 1.0), Duration::from_millis(5));
        assert_eq!(quantile(&mut latencies, 0.0), Duration::from_millis(1));
    }
}
