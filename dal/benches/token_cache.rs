//! Reading a cached token: the hot path of every new connection.
//!
//! `cargo bench -p dal --bench token_cache` reports the time of one read by one thread, and
//! the mean time of one read while 16 threads read at once; the baseline measured in the same
//! run is cloning an `Arc` out of an uncontended `std::sync::Mutex`.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use dal::credentials::Token;
use dal::{CacheSettings, TokenCache, TokenStrategy};

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
    )
    .expect("cache");
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(cache.token())
        .expect("first token");
    cache
}

/// Mean time of one call of `read` while `threads` threads call it at once.
fn concurrent(threads: usize, iters: u64, read: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let total: Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        read();
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("reader")).sum()
    });
    total / threads as u32
}

fn bench(c: &mut Criterion) {
    let cache = warm_cache();
    let baseline = Mutex::new(Arc::new(Token::new("token", None)));

    let mut group = c.benchmark_group("read a cached token");
    group.bench_function("dal TokenCache::try_token", |b| {
        b.iter(|| std::hint::black_box(cache.try_token().expect("fresh")))
    });
    group.bench_function("baseline Mutex<Arc<Token>>", |b| {
        b.iter(|| std::hint::black_box(Arc::clone(&baseline.lock().expect("lock"))))
    });
    group.bench_function("dal TokenCache::try_token, 16 threads", |b| {
        b.iter_custom(|iters| {
            concurrent(16, iters, || {
                std::hint::black_box(cache.try_token().expect("fresh"));
            })
        })
    });
    group.bench_function("baseline Mutex<Arc<Token>>, 16 threads", |b| {
        b.iter_custom(|iters| {
            concurrent(16, iters, || {
                std::hint::black_box(Arc::clone(&baseline.lock().expect("lock")));
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
