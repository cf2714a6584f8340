//! Checking a connection out of a pool and giving it back: what a pool adds to every request.
//!
//! `cargo bench -p dal --bench checkout --features local` starts a PostgreSQL of its own and
//! prints, for dal's tokio-postgres and Diesel pools, the median and 99th percentile of the
//! time of one checkout and return (each sample is the mean of a batch of 64), one caller on
//! a single-threaded runtime, of a connection that came back moments ago (handed out without
//! a round trip); and the same for the baseline measured in the same run: a bb8 pool with
//! bb8's defaults and no check at checkout, over the same connections (dal's connector opens
//! them), so that it adds bb8's own bookkeeping alone. dal's pools add to it the order of
//! waiting callers, the renewal's accounts, the checkout metrics and the check of whether a
//! round trip is needed.

use std::future::Future;
use std::time::{Duration, Instant};

use dal::diesel_async::AsyncPgConnection;
use dal::local::LocalPostgres;
use dal::{Connector, Error};

const BATCH: u32 = 64;
const SAMPLES: usize = 5_000;

/// A bb8 manager that opens connections through `open` and never checks them.
struct Plain<F>(F);

impl<C, F, Fut> dal::bb8::ManageConnection for Plain<F>
where
    C: Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = dal::Result<C>> + Send,
{
    type Connection = C;
    type Error = Error;

    fn connect(&self) -> impl Future<Output = dal::Result<C>> + Send {
        (self.0)()
    }

    async fn is_valid(&self, _: &mut C) -> dal::Result<()> {
        Ok(())
    }

    fn has_broken(&self, _: &mut C) -> bool {
        false
    }
}

/// Per-checkout times (batch means) of `checkout`, sorted.
async fn samples<Fut: Future<Output = ()>>(checkout: impl Fn() -> Fut) -> Vec<Duration> {
    let mut all = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        for _ in 0..BATCH {
            checkout().await;
        }
        all.push(start.elapsed() / BATCH);
    }
    all.sort_unstable();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn print_row(name: &str, dal: &[Duration], plain: &[Duration]) {
    let ns = |x: Duration| x.as_nanos() as f64;
    let (d50, d99) = (percentile(dal, 0.5), percentile(dal, 0.99));
    let (p50, p99) = (percentile(plain, 0.5), percentile(plain, 0.99));
    println!(
        "{name:>15}  {:>8.0} {:>8.0}  {:>10.0} {:>10.0}  {:>6.2} {:>6.2}",
        ns(d50),
        ns(d99),
        ns(p50),
        ns(p99),
        ns(d50) / ns(p50).max(1.0),
        ns(d99) / ns(p99).max(1.0),
    );
}

type Outcome = Result<(), Box<dyn std::error::Error>>;

async fn run(connector: &Connector) -> Outcome {
    let dal_pg = connector.postgres_pool().await?;
    let dal_diesel = connector.diesel_pool().await?;
    let opens = connector.clone();
    let plain_pg = dal::bb8::Pool::builder()
        .test_on_check_out(false)
        .build(Plain(move || {
            let connector = opens.clone();
            async move {
                let (client, connection) = connector.connect().await?;
                tokio::spawn(connection);
                Ok(client)
            }
        }))
        .await?;
    let opens = connector.clone();
    let plain_diesel = dal::bb8::Pool::builder()
        .test_on_check_out(false)
        .build(Plain(move || {
            let connector = opens.clone();
            async move {
                let (client, connection) = connector.connect().await?;
                AsyncPgConnection::try_from_client_and_connection(client, connection)
                    .await
                    .map_err(|e| Error::Pool(e.to_string()))
            }
        }))
        .await?;
    // Each pool opens its connection before the samples start.
    drop(dal_pg.get().await?);
    drop(dal_diesel.get().await?);
    drop(plain_pg.get().await?);
    drop(plain_diesel.get().await?);

    println!("check a connection out and give it back (ns; ratio = dal / plain bb8)");
    println!(
        "{:>15}  {:>8} {:>8}  {:>10} {:>10}  {:>6} {:>6}",
        "pool", "dal p50", "dal p99", "plain p50", "plain p99", "p50 x", "p99 x"
    );
    let (mut d, mut p) = (Vec::new(), Vec::new());
    // Interleaved, so that both see the same machine.
    for _ in 0..3 {
        d.extend(samples(|| async { drop(dal_pg.get().await.expect("dal")) }).await);
        p.extend(samples(|| async { drop(plain_pg.get().await.expect("plain")) }).await);
    }
    d.sort_unstable();
    p.sort_unstable();
    print_row("tokio-postgres", &d, &p);
    let (mut d, mut p) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        d.extend(samples(|| async { drop(dal_diesel.get().await.expect("dal")) }).await);
        p.extend(samples(|| async { drop(plain_diesel.get().await.expect("plain")) }).await);
    }
    d.sort_unstable();
    p.sort_unstable();
    print_row("Diesel", &d, &p);
    Ok(())
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let outcome: Outcome = runtime.block_on(async {
        let pg = LocalPostgres::start().await?;
        let password = uuid::Uuid::new_v4().simple().to_string();
        pg.create_role("bench", &password, None).await?;
        pg.create_database("bench", Some("bench")).await?;
        let config = dal::Config::new(pg.host(), "bench")
            .port(pg.port())
            .database("bench")
            .ssl_mode(dal::SslMode::VerifyFull)
            .ssl_root_cert(pg.ca_cert_path())
            .password(&password);
        let connector = Connector::new(config).await?;
        let ran = run(&connector).await;
        connector.shutdown().await;
        ran
    });
    if let Err(e) = outcome {
        eprintln!("checkout bench: {e}");
        std::process::exit(1);
    }
}
