//! Reading a cached token: the hot path of every new connection.
//!
//! `cargo bench -p dal --bench token_cache` prints, for one reader and for 16 readers at once,
//! the median and 99th percentile of the time of one read (each sample is the mean of a batch
//! of 64 reads), for `TokenCache::try_token` and for the baseline measured in the same run:
//! cloning an `Arc` out of a `std::sync::Mutex`.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dal::credentials::Token;
use dal::{CacheSettings, TokenCache, TokenStrategy};

const BATCH: u32 = 64;
const SAMPLES: usize = 20_000;

fn warm_cache() -> TokenCache {
    let source = || async {
        Ok::<_, std::io::Error>(Token::new(
            "token",
            Some(SystemTime::now() + Duration::from_secs(3600)),
        ))
    };
    let cache = TokenCache::new(
        Arc::new(source),
        TokenStrategy::Lazy,
        CacheSettings::default(),
    );
    // A closure source's fetch is bounded by a timer (`CUSTOM_FETCH_TIMEOUT`).
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
        .block_on(cache.token())
        .expect("first token");
    cache
}

/// Per-read times (batch means) of `threads` threads calling `read` at once, sorted.
fn samples(threads: usize, read: impl Fn() + Sync) -> Vec<Duration> {
    let barrier = Barrier::new(threads);
    let mut all: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..SAMPLES)
                        .map(|_| {
                            let start = Instant::now();
                            for _ in 0..BATCH {
                                read();
                            }
                            start.elapsed() / BATCH
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("reader"))
            .collect()
    });
    all.sort_unstable();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let cache = warm_cache();
    let baseline = Mutex::new(Arc::new(Token::new("token", None)));
    let dal_read = || {
        std::hint::black_box(cache.try_token().expect("fresh"));
    };
    let mutex_read = || {
        std::hint::black_box(Arc::clone(&baseline.lock().expect("lock")));
    };
    println!("read a cached token (ns per read; ratio = dal / baseline)");
    println!(
        "{:>8}  {:>10} {:>10}  {:>10} {:>10}  {:>7} {:>7}",
        "readers", "dal p50", "dal p99", "mutex p50", "mutex p99", "p50 x", "p99 x"
    );
    for threads in [1, 16] {
        // Interleaved, so that both see the same machine.
        let (mut d, mut m) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            d.extend(samples(threads, dal_read));
            m.extend(samples(threads, mutex_read));
        }
        d.sort_unstable();
        m.sort_unstable();
        let ns = |x: Duration| x.as_nanos() as f64;
        let (d50, d99, m50, m99) = (
            percentile(&d, 0.5),
            percentile(&d, 0.99),
            percentile(&m, 0.5),
            percentile(&m, 0.99),
        );
        println!(
            "{threads:>8}  {:>10.1} {:>10.1}  {:>10.1} {:>10.1}  {:>7.2} {:>7.2}",
            ns(d50),
            ns(d99),
            ns(m50),
            ns(m99),
            ns(d50) / ns(m50).max(1.0),
            ns(d99) / ns(m99).max(1.0),
        );
    }
}
