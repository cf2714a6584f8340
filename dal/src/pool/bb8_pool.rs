//! The bb8 pool of dal: opens connections through a closure (the connector's), hands each
//! failure of a background connect to one caller waiting at that moment through one
//! [`ErrorSink`](bb8::ErrorSink), and closes on shutdown.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::registry::{PoolHandle, Registry};
use super::reset::RECENTLY_USED;
use crate::config::PoolSettings;
use crate::error::{Error, ErrorChain, Result};
use crate::telemetry::{self, PoolHealth};

/// Opens one physical connection of type `C`.
pub(crate) type Open<C> = Arc<dyn Fn() -> BoxFuture<'static, Result<C>> + Send + Sync>;

/// What holds up the connections a pool is opening, if anything it knows of has failed
/// late enough to hold up a caller waiting since the instant given: a server's refusal for
/// a limit, the credential source's last failed answer (see [`Pool::held_up_by`]).
pub(crate) type HoldingUp = Box<dyn Fn(tokio::time::Instant) -> Option<Arc<Error>> + Send + Sync>;

/// What a bb8 pool needs to know of its connection type besides how to open one.
pub(crate) struct Kind<C> {
    /// `diesel` or `postgres`, for metrics and health.
    pub(crate) name: &'static str,
    /// Whether a connection may go out without a check: back moments ago with every request
    /// answered. Asked at every checkout, so it neither waits nor allocates.
    pub(crate) is_settled: fn(&mut C) -> bool,
    /// Checks a connection with a round trip.
    pub(crate) is_valid: IsValid<C>,
    /// Checks a connection without a round trip.
    pub(crate) has_broken: fn(&mut C) -> bool,
    /// Where a connection keeps its [`Lifespan`], for kinds that keep one: the pool then opens
    /// its replacement ahead (see [`Renewal`]). `None`: bb8's own lifetime applies.
    pub(crate) lifespan: Option<LifespanOf<C>>,
}

/// Checks a connection with a round trip.
pub(crate) type IsValid<C> = for<'c> fn(&'c mut C) -> BoxFuture<'c, Result<()>>;

/// Where a connection keeps its [`Lifespan`].
pub(crate) type LifespanOf<C> = for<'c> fn(&'c mut C) -> Option<&'c mut Lifespan>;

/// What the pool notes of one connection as it opens, comes back and goes out.
#[derive(Debug, Default)]
pub(crate) struct Lifespan {
    /// When the pool retires it.
    retire_at: Option<Instant>,
    /// When it last came back to the pool (or opened, for a kind that counts a fresh
    /// connection as one that just came back).
    pub(crate) returned: Option<Instant>,
    /// How long it last waited in the pool before it was checked out again.
    idle_gap: Option<Duration>,
    /// The number it asked for a replacement with, if it did: a connection takes the spare
    /// it owns (see [`Renewal::take_spare`]).
    replacement: Option<u64>,
    /// The turn its current user waited for (see [`Pool::get`]), given up as it comes back.
    turn: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Its checkout test failed, or has not passed yet (one cut off is closed as it comes
    /// back: its server may have gone silent): bb8 closes it as it comes back, whatever
    /// `has_broken` answers, so it leaves its replacement where it is (for one past its end
    /// to take).
    failed: bool,
    /// A replacement that took the place of a connection that came back moments ago, itself
    /// last checked longer ago than [`RECENTLY_USED`] (it waited for its connection to pass
    /// through the pool): it keeps that place's record of use, but nothing was seen of its
    /// own session since its check, so it goes out checked.
    unchecked: bool,
}

impl Lifespan {
    /// One whose connection came back just now.
    pub(crate) fn returned_now() -> Self {
        Self {
            returned: Some(Instant::now()),
            ..Self::default()
        }
    }

    /// Whether its connection came back, or was checked, within [`RECENTLY_USED`]: one of the
    /// conditions for going out without a check (see [`Kind::is_settled`]).
    pub(crate) fn recently_back(&self) -> bool {
        !self.unchecked && self.returned.is_some_and(|at| at.elapsed() < RECENTLY_USED)
    }
}

/// Connections replaced ahead of their lifetime, so that no request waits for a login: each
/// connection is given its own jittered lifetime as it opens; when it comes back within the
/// [lead](Renewal::lead) of it, having waited less than the lead in the pool before its last
/// checkout, a replacement opens for it in the background, and the next time it comes back or is
/// checked out after that replacement is ready, the replacement takes its place in the pool, and
/// the old connection closes on a task of its own. Replacements open side by side, one per
/// connection near its end: connections that open together also come to their ends together, and
/// short lifetimes on a busy machine need several logins at once. A replacement is checked as it
/// opens, as a connection coming back would be, so that it goes out without a round trip when it
/// takes its place soon after (one that waited longer for its connection is checked again).
/// One past its lifetime while its replacement is still logging in takes another's that is
/// ready, if any, and hands its own to that one's owner (see [`Renewal::take_spare`]); with
/// none ready, it stays in service for up to the [grace](Renewal::grace), so that a login slower
/// than the lead (or than the lifetime) still keeps off the request path. One that reaches its end
/// without having asked (left in the pool through its whole lead, say), having waited less than
/// the lead there before its last checkout, asks then and stays in service the same way. One past
/// the grace, or whose replacement could not be opened, or that waited longer than the lead (a
/// background job's connection, used now and then), is retired as bb8 would, and never handed
/// out. A replacement nothing took within the lead and the grace (its connection may be out on
/// a long request past its end) is closed: an idle pool keeps no extra connection for longer
/// (Lakebase can scale to zero).
struct Renewal<C> {
    /// The pool's kind, for its debug events.
    pool: &'static str,
    lifetime: Duration,
    jitter: f64,
    /// The slowest recent login, in microseconds, decaying by an eighth at each login.
    slow_login_us: AtomicU64,
    /// Replacements opened and not yet in the pool, in the order they were asked for.
    spares: Mutex<Vec<Spare<C>>>,
    openings: AtomicU64,
    /// From when `due` counts.
    epoch: Instant,
    /// The earliest an idle connection may be retired by a sweep (see [`Core::sweep`]), in
    /// nanoseconds from `epoch`; `u64::MAX` when none is known.
    due: AtomicU64,
    /// The pool's connections as the last sweep left them: any other number means some
    /// connection came or went since, and the next sweep looks at them all.
    swept: AtomicU32,
}

/// A replacement opened ahead for a connection near its end.
struct Spare<C> {
    /// The number of its opening.
    number: u64,
    /// The connection it is for: the number that one asked with (its [`Lifespan`]'s
    /// `replacement`). Another connection's, when one past its lifetime took that one's.
    owner: u64,
    /// The connection, once logged in and checked; `None` while it logs in.
    conn: Option<C>,
}

/// What a connection near its end finds of its replacement.
enum Replacement<C> {
    /// Ready: it takes the connection's place.
    Ready(C),
    /// Still logging in.
    Coming,
    /// None: its opening failed, nothing took it within the lead, or the pool closed.
    Gone,
}

impl<C> Renewal<C> {
    fn new(pool: &'static str, lifetime: Duration, jitter: f64) -> Self {
        Self {
            pool,
            lifetime,
            jitter,
            slow_login_us: AtomicU64::new(0),
            spares: Mutex::new(Vec::new()),
            openings: AtomicU64::new(0),
            epoch: Instant::now(),
            due: AtomicU64::new(u64::MAX),
            swept: AtomicU32::new(0),
        }
    }

    /// `at` in nanoseconds from `epoch`.
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Notes that some connection may be retired while idle from `at` on.
    fn due_by(&self, at: Instant) {
        self.due.fetch_min(self.nanos(at), Ordering::Relaxed);
    }

    /// From when a sweep retires a connection left idle with `span`, as a checkout would, or
    /// as its idle timeout does: at its end if it waited in the pool for the lead or longer
    /// before its last checkout (then it gets no replacement ahead), the lead after it came
    /// back if it was in frequent use until then, and in any case once past the grace or
    /// `idle_timeout` after it came back. `None`: never while idle.
    fn retired_idle_from(
        &self,
        span: &Lifespan,
        idle_timeout: Option<Duration>,
    ) -> Option<Instant> {
        let past_end = span.retire_at.map(|end| {
            let out_of_grace = end + self.grace();
            match (span.replacement, span.returned) {
                (None, Some(back)) => out_of_grace.min(end.max(back + self.lead())),
                (None, None) => end,
                (Some(_), _) => out_of_grace,
            }
        });
        let idle_out = idle_timeout
            .zip(span.returned)
            .map(|(idle, back)| back + idle);
        past_end.into_iter().chain(idle_out).min()
    }

    /// How long before a connection's end its replacement opens: a quarter of the lifetime,
    /// at most 30 s (a login takes milliseconds; a credential fetch can take longer, but the
    /// token cache fetches ahead of expiry), and at least three times the slowest recent
    /// login (a loaded server, or a Lakebase endpoint waking from zero), up to half the
    /// lifetime.
    fn lead(&self) -> Duration {
        let usual = (self.lifetime / 4).min(Duration::from_secs(30));
        let slow = Duration::from_micros(self.slow_login_us.load(Ordering::Relaxed));
        usual.max((slow * 3).min(self.lifetime / 2))
    }

    /// How long past its lifetime a connection whose replacement is still logging in stays
    /// in service: the lifetime again, at most 30 s. So a login slower than the whole lifetime
    /// (a loaded server, a Lakebase endpoint waking from zero) still keeps off the request
    /// path, no connection serves more than twice its lifetime, and a lifetime set 30 s below
    /// a limit the server enforces (Aurora DSQL's 60 minutes) still keeps every connection
    /// within it. A replacement is ready when its login and its check are done, and a new
    /// backend's first statement is its slowest: on a saturated server the check alone took
    /// as long as the login.
    fn grace(&self) -> Duration {
        self.lifetime.min(Duration::from_secs(30))
    }

    /// Notes how long a login took.
    fn logged_in(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .slow_login_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slow| {
                Some(took.max(slow - slow / 8))
            });
    }

    /// When a connection opened now is to be retired.
    fn retire_at(&self) -> Instant {
        Instant::now() + self.lifetime.mul_f64(1.0 - self.jitter * fastrand::f64())
    }
}

/// A bb8 pool that fails fast with the cause when connections cannot be opened, and that
/// [`Connector::shutdown`](crate::Connector::shutdown) closes. Cheap to clone.
pub struct Pool<C: Send + 'static> {
    core: Arc<Core<C>>,
}

struct Core<C: Send + 'static> {
    pool: bb8::Pool<Manager<C>>,
    failures: Arc<Failures>,
    acquire_timeout: Duration,
    kind: &'static str,
    max_size: u32,
    waiting: AtomicU64,
    closed: Arc<AtomicBool>,
    sweeping: Arc<SweepKey>,
    renewal: Option<Arc<Renewal<C>>>,
    /// Opens connections for [`fill`](Core::fill), and checks them as they open.
    open: Open<C>,
    is_valid: IsValid<C>,
    /// Idle connections [`fill`](Core::fill) keeps: `min_idle` for a renewing pool, whose
    /// sweeps would otherwise have bb8 open one at each of their checkouts; 0 for the others,
    /// whose `min_idle` bb8 keeps.
    min_idle: u32,
    /// Connections [`fill`](Core::fill) is opening.
    filling: AtomicU32,
    /// Bounds the check of a connection [`fill`](Core::fill) opens (see [`checked`]).
    connect_timeout: Duration,
    /// One permit per connection the pool may hand out, given in the order callers asked.
    turns: Arc<tokio::sync::Semaphore>,
    lifespan: Option<LifespanOf<C>>,
    metrics: PoolMetrics,
}

/// The handles of a pool's gauges and checkout histogram, taken from the recorder once, when
/// the pool is built: a checkout then records without a registry lookup (the `metrics`
/// crate's advice for handles on a hot path).
struct PoolMetrics {
    waiting: metrics::Gauge,
    connections: metrics::Gauge,
    idle: metrics::Gauge,
    acquire: metrics::Histogram,
}

impl PoolMetrics {
    fn new(pool: &'static str) -> Self {
        Self {
            waiting: metrics::gauge!(telemetry::POOL_WAITING, "pool" => pool),
            connections: metrics::gauge!(telemetry::POOL_CONNECTIONS, "pool" => pool),
            idle: metrics::gauge!(telemetry::POOL_IDLE, "pool" => pool),
            acquire: metrics::histogram!(telemetry::POOL_ACQUIRE_SECONDS, "pool" => pool),
        }
    }
}

/// The bb8 manager of dal's pools: opens connections through the connector, and drops every
/// connection that comes back after the pool was closed.
pub struct Manager<C> {
    open: Open<C>,
    kind: Kind<C>,
    closed: Arc<AtomicBool>,
    /// A sweep holds every idle connection (see [`Core::sweep`]): its checkouts are neither
    /// checked nor counted as uses, and what comes back is kept unless the sweep marked it.
    sweeping: Arc<SweepKey>,
    renewal: Option<Arc<Renewal<C>>>,
    /// Bounds the check of a replacement opened ahead (see [`checked`]).
    connect_timeout: Duration,
    /// Bounds the check of a connection at checkout (see [`check_timeout`]).
    check_timeout: Duration,
    /// Counts the connections it opens for callers (see [`Error::PoolTimeout`]).
    failures: Arc<Failures>,
}

impl<C> std::fmt::Debug for Manager<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("kind", &self.kind.name)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<C: Send + 'static> Manager<C> {
    /// Opens a connection and gives it its retirement instant.
    fn open(&self) -> BoxFuture<'static, Result<C>> {
        let (name, lifespan) = (self.kind.name, self.kind.lifespan);
        open_stamped(Arc::clone(&self.open), name, lifespan, self.renewal.clone())
    }

    /// Notes that `conn` is coming back (`returning`) or being checked out, and puts its
    /// replacement in its place once that is ready; when `conn`, coming back, is in frequent use
    /// and near its end and has not asked yet, opens one for it. Returns whether `conn` (still
    /// the old one) is past its lifetime.
    fn renew(&self, conn: &mut C, returning: bool) -> bool {
        let Some(lifespan) = self.kind.lifespan else {
            return false;
        };
        let now = Instant::now();
        let Some(span) = lifespan(conn) else {
            return false;
        };
        if returning {
            span.turn = None;
            span.returned = Some(now);
            span.unchecked = false;
        } else {
            span.idle_gap = span.returned.map(|at| now.duration_since(at));
        }
        if span.failed {
            return true;
        }
        let Some(renewal) = &self.renewal else {
            return false;
        };
        let lead = renewal.lead();
        let frequent = span.idle_gap.is_some_and(|gap| gap < lead);
        let Some(at) = span.retire_at else {
            return false;
        };
        if now + lead < at && span.replacement.is_none() {
            return false;
        }
        let expired = now >= at;
        let found = match span.replacement {
            Some(own) if !self.closed.load(Ordering::Relaxed) => {
                renewal.take_spare(lifespan, now, own, expired)
            }
            _ => Replacement::Gone,
        };
        if let Replacement::Ready(fresh) = found {
            renewal.swap_in(lifespan, conn, fresh);
            return false;
        }
        let in_grace = expired && now < at + renewal.grace();
        if in_grace && matches!(found, Replacement::Coming) {
            return false;
        }
        // One in frequent use that never asked (left in the pool through its whole lead, say)
        // asks now and serves on as one whose replacement is late.
        if in_grace && frequent && span.replacement.is_none() {
            span.replacement = self.open_spare(renewal);
            if span.replacement.is_some() {
                return false;
            }
        }
        if returning && frequent && !expired && span.replacement.is_none() {
            span.replacement = self.open_spare(renewal);
        }
        // Logged once, as it comes back: bb8 puts one that failed its checkout test back
        // through `has_broken` too.
        if expired && returning {
            let replacement = match (found, span.replacement) {
                (Replacement::Coming, _) => "still logging in past the grace",
                (_, Some(_)) => "failed to open, or was closed unclaimed",
                (_, None) => "none asked for: the connection had been idle",
            };
            tracing::debug!(
                pool = self.kind.name,
                replacement,
                "a connection past its lifetime is retired; the pool opens another if needed"
            );
        }
        expired
    }

    /// Opens a spare in the background; its number, if it could start.
    fn open_spare(&self, renewal: &Arc<Renewal<C>>) -> Option<u64> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let (open, renewal) = (self.open(), Arc::clone(renewal));
        let (is_valid, lifespan, name) = (self.kind.is_valid, self.kind.lifespan, self.kind.name);
        let within = self.connect_timeout;
        let number = renewal.openings.fetch_add(1, Ordering::Relaxed);
        renewal.spares().push(Spare {
            number,
            owner: number,
            conn: None,
        });
        // Made before the task, which a runtime shutting down drops unpolled.
        let login = SpareLogin {
            renewal: Arc::clone(&renewal),
            number,
            logged_in: false,
        };
        runtime.spawn(async move {
            // The whole guard moves into the task, not the one field it sets.
            let mut login = login;
            let conn = match checked(open, is_valid, lifespan, within).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!(error = %ErrorChain(&e), "a replacement connection could not be opened ahead");
                    return;
                }
            };
            login.logged_in = true;
            if !renewal.logged_in_spare(number, conn) {
                return;
            }
            // Not taken by then: the pool went idle, or the connection it was for ended.
            // Kept for the grace too, since the connection it is for may be out on a long
            // request past its end. Closed here, outside the lock that checkouts take.
            tokio::time::sleep(renewal.lead() + renewal.grace()).await;
            if let Some(unclaimed) = renewal.take_numbered(number) {
                drop(unclaimed);
                tracing::debug!(
                    pool = name,
                    "a replacement no connection took within the lead and the grace is closed"
                );
            }
        });
        Some(number)
    }
}

/// A replacement's place in [`Renewal::spares`] while it logs in: given up if its opening
/// ends without a connection (failed, panicked, or dropped with its runtime), so that it does
/// not stay "still logging in" for the connection it is for.
struct SpareLogin<C> {
    renewal: Arc<Renewal<C>>,
    number: u64,
    logged_in: bool,
}

impl<C> Drop for SpareLogin<C> {
    fn drop(&mut self) {
        if !self.logged_in {
            drop(self.renewal.take_numbered(self.number));
        }
    }
}

impl<C> Renewal<C> {
    fn spares(&self) -> std::sync::MutexGuard<'_, Vec<Spare<C>>> {
        self.spares.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replacement of the connection that asked with number `own`, taken if ready. One
    /// past its lifetime (`expired`) whose replacement is still logging in takes the ready one
    /// asked for longest ago instead, and its owner gets the one still logging in: so each
    /// connection takes the replacement it asked for in time, whichever passes through the
    /// pool first; one that ran out of time need not wait; and the one it took from, being
    /// further from its end, is owed a replacement all the same. Ready spares past their own
    /// lifetime at `now` are closed.
    fn take_spare(
        &self,
        lifespan: LifespanOf<C>,
        now: Instant,
        own: u64,
        expired: bool,
    ) -> Replacement<C>
    where
        C: Send + 'static,
    {
        let mut spares = self.spares();
        let mut index = 0;
        while index < spares.len() {
            let stale = spares[index]
                .conn
                .as_mut()
                .and_then(lifespan)
                .and_then(|span| span.retire_at)
                .is_some_and(|at| at <= now);
            if stale {
                close_in_background(spares.remove(index).conn);
                tracing::debug!(
                    pool = self.pool,
                    "a replacement reached its own lifetime before a connection took it; closed"
                );
            } else {
                index += 1;
            }
        }
        let Some(mine) = spares.iter().position(|s| s.owner == own) else {
            return Replacement::Gone;
        };
        let index = if spares[mine].conn.is_some() {
            mine
        } else {
            match spares.iter().position(|s| s.conn.is_some()) {
                Some(ready) if expired => {
                    spares[mine].owner = spares[ready].owner;
                    ready
                }
                _ => return Replacement::Coming,
            }
        };
        spares
            .remove(index)
            .conn
            .map_or(Replacement::Coming, Replacement::Ready)
    }

    /// Puts `fresh`, a ready replacement, in the place of `conn`, which closes on a task of its
    /// own. The replacement takes over the place's record of use: how long it waited before
    /// its last checkout, and when it last came back, or was checked, if that is later; one
    /// checked longer ago than [`RECENTLY_USED`] goes out checked all the same.
    fn swap_in(&self, lifespan: LifespanOf<C>, conn: &mut C, fresh: C)
    where
        C: Send + 'static,
    {
        let used = lifespan(conn).map(|span| (span.returned, span.idle_gap));
        close_in_background(std::mem::replace(conn, fresh));
        if let Some(span) = lifespan(conn) {
            span.unchecked = !span.recently_back();
            if let Some((returned, idle_gap)) = used {
                span.returned = span.returned.max(returned);
                span.idle_gap = idle_gap;
            }
            if let Some(end) = span.retire_at {
                self.due_by(end);
            }
        }
        metrics::counter!(telemetry::CONNECTIONS_RENEWED, "pool" => self.pool).increment(1);
        tracing::debug!(
            pool = self.pool,
            "a connection was replaced ahead of its lifetime"
        );
    }

    /// Puts `conn` in the place of spare `number`, still logging in; closes it if the pool
    /// closed (no such spare). Returns whether it was put there.
    fn logged_in_spare(&self, number: u64, conn: C) -> bool {
        let mut spares = self.spares();
        match spares.iter_mut().find(|s| s.number == number) {
            Some(spare) => {
                spare.conn = Some(conn);
                true
            }
            None => false,
        }
    }

    /// The spare numbered `number`, ready or not, if nothing took it.
    fn take_numbered(&self, number: u64) -> Option<C> {
        let mut spares = self.spares();
        let index = spares.iter().position(|s| s.number == number)?;
        spares.remove(index).conn
    }
}

/// Checks a connection as it opens, so that its first checkout need not wait for the round
/// trip of a kind that checks a fresh connection (SeaORM's); it then counts as one that just
/// came back. The check counts as part of the opening: one with no answer within `within`
/// (the connect timeout) fails, and the connection closes, so that a server that stopped
/// answering after the login holds neither a connection nor the pool's account of one
/// opening until TCP gives up.
async fn checked<C>(
    open: BoxFuture<'static, Result<C>>,
    is_valid: IsValid<C>,
    lifespan: Option<LifespanOf<C>>,
    within: Duration,
) -> Result<C> {
    let mut conn = open.await?;
    tokio::time::timeout(within, is_valid(&mut conn))
        .await
        .map_err(|_| {
            Error::Pool(format!(
                "a new connection did not answer its check within the connect timeout ({within:?})"
            ))
        })??;
    if let Some(span) = lifespan.and_then(|f| f(&mut conn)) {
        span.returned = Some(Instant::now());
    }
    Ok(conn)
}

/// Closes a connection its replacement took the place of in a task of its own: closing
/// its socket can take milliseconds, which the caller whose checkout or return made the
/// swap would otherwise wait for (HikariCP closes retired connections on an executor of
/// its own for the same reason). Outside a runtime, closes it here.
fn close_in_background<C: Send + 'static>(conn: C) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn(async move { drop(conn) })),
        Err(_) => drop(conn),
    }
}

/// Opens a connection of the pool kind `name` through `open`, records how long that took and
/// stamps its retirement instant.
fn open_stamped<C: Send + 'static>(
    open: Open<C>,
    name: &'static str,
    lifespan: Option<LifespanOf<C>>,
    renewal: Option<Arc<Renewal<C>>>,
) -> BoxFuture<'static, Result<C>> {
    Box::pin(async move {
        let started = Instant::now();
        let mut conn = open().await?;
        let took = started.elapsed();
        metrics::histogram!(telemetry::POOL_CONNECT_SECONDS, "pool" => name)
            .record(took.as_secs_f64());
        if let Some(renewal) = renewal {
            renewal.logged_in(took);
            if let Some(span) = lifespan.and_then(|f| f(&mut conn)) {
                let end = renewal.retire_at();
                span.retire_at = Some(end);
                renewal.due_by(end);
            }
        }
        Ok(conn)
    })
}

/// The pool holds each connection boxed: bb8 moves a connection several times per checkout
/// and return (into its idle queue, out of it, into the guard), and a pointer moves at the
/// cost of a register where Diesel's `AsyncPgConnection` (424 bytes) is copied.
impl<C: Send + 'static> bb8::ManageConnection for Manager<C> {
    type Connection = Box<C>;
    type Error = Error;

    /// Opens a connection; none once the pool is closed (bb8 replaces a connection it closed
    /// at any time, and a login at shutdown can wake a database scaled to zero). A panic
    /// while it opens fails the opening: raised in bb8's task, it would end the task before
    /// bb8 counts the opening as done, and bb8 would open that many fewer for good.
    fn connect(&self) -> impl std::future::Future<Output = Result<Box<C>>> + Send {
        let open = (!self.closed.load(Ordering::Relaxed)).then(|| self.open());
        let opening = Opening::start(&self.failures);
        async move {
            let _opening = opening;
            match open {
                Some(open) => match std::panic::AssertUnwindSafe(open).catch_unwind().await {
                    Ok(opened) => opened.map(Box::new),
                    Err(panic) => Err(Error::Pool(format!(
                        "opening a connection panicked: {}",
                        crate::error::panic_message(&*panic)
                    ))),
                },
                None => Err(Error::PoolClosed),
            }
        }
    }

    fn is_valid(&self, conn: &mut Box<C>) -> impl std::future::Future<Output = Result<()>> + Send {
        let sweeping = Sweeping::is_on(&self.sweeping);
        let expired = !sweeping && self.renew(conn, false);
        let test = !sweeping && !expired && !(self.kind.is_settled)(conn);
        let (is_valid, lifespan) = (self.kind.is_valid, self.kind.lifespan);
        let within = self.check_timeout;
        async move {
            let checked = if expired {
                Err(Error::Pool(PAST_ITS_LIFETIME.to_owned()))
            } else if test {
                // Counted as failed until its check passes: one whose check is cut off (its
                // caller gave up) may have gone silent, or have an answer still to come, and
                // is closed as it goes back instead of being checked again by the next caller.
                if let Some(span) = lifespan.and_then(|f| f(conn)) {
                    span.failed = true;
                }
                let _in_check = InCheck::start();
                match tokio::time::timeout(within, is_valid(conn)).await {
                    Ok(checked) => checked.map_err(|e| match e {
                        failed @ Error::Pool(_) => failed,
                        e => Error::Pool(ErrorChain(&e).to_string()),
                    }),
                    Err(_) => Err(Error::Pool(format!(
                        "no answer to its check within {within:?}"
                    ))),
                }
            } else {
                Ok(())
            };
            if let Some(span) = lifespan.and_then(|f| f(conn)) {
                match checked {
                    Err(_) => span.failed = true,
                    Ok(()) if test => span.failed = false,
                    Ok(()) => {}
                }
            }
            checked
        }
    }

    fn has_broken(&self, conn: &mut Box<C>) -> bool {
        if self.closed.load(Ordering::Relaxed) || (self.kind.has_broken)(conn) {
            return true;
        }
        if Sweeping::is_on(&self.sweeping) {
            let lifespan = self.kind.lifespan.and_then(|f| f(conn));
            return lifespan.is_some_and(|span| span.failed);
        }
        self.renew(conn, true)
    }
}

/// Why [`Manager::is_valid`] fails a connection that reached its end: no failure of the pool.
const PAST_ITS_LIFETIME: &str = "past its lifetime";

/// The failures of background connects, each for one caller: bb8 opens one connection per
/// caller it cannot serve, so one failed attempt fails one caller (the longest waiting for a
/// connection; one whose connection is in its check gives it back), not every caller waiting
/// at that moment.
struct Failures {
    queue: Mutex<VecDeque<(Instant, Arc<Error>)>>,
    arrived: Notify,
    /// The newest failure to open a connection (whoever took it) or of a pooled one's
    /// check, kept until a connection opens: what a caller that times out is told (see
    /// [`Error::PoolTimeout`]).
    last: Mutex<Option<Arc<Error>>>,
    /// Connections bb8 is opening for callers.
    opening: AtomicU32,
    /// What may hold up those openings, asked when a caller times out while they go on.
    holding_up: std::sync::OnceLock<HoldingUp>,
    /// Failures older than this have no caller left to fail (the acquire timeout).
    keep: Duration,
    /// At most as many are kept as callers can wait in bb8 at once (one per turn, the pool's
    /// size): each caller takes the first that came after it started waiting, so a newer
    /// failure serves any caller an older one would.
    most: usize,
}

impl std::fmt::Debug for Failures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failures")
            .field("queue", &self.queue)
            .field("last", &self.last)
            .field("opening", &self.opening)
            .finish_non_exhaustive()
    }
}

impl Failures {
    fn new(keep: Duration, most: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            last: Mutex::new(None),
            opening: AtomicU32::new(0),
            holding_up: std::sync::OnceLock::new(),
            keep,
            most,
        }
    }

    fn push(&self, error: Error) {
        let now = Instant::now();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while queue
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.keep)
        {
            queue.pop_front();
        }
        if queue.len() >= self.most {
            queue.pop_front();
        }
        let error = Arc::new(error);
        queue.push_back((now, Arc::clone(&error)));
        drop(queue);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        self.arrived.notify_one();
    }

    /// Notes a failure that fails no caller (a pooled connection's check), for one that
    /// times out.
    fn note(&self, error: Error) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(error));
    }

    /// A connection opened: the pool's failures no longer tell why a caller times out.
    fn opened(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What a caller that waited `timeout` in vain is told: the last failure, or else what
    /// holds up the connections still opening (a token the credential service has not
    /// given yet, whose own timeout comes only at the connect timeout).
    fn timed_out(&self, timeout: Duration) -> Error {
        let opening = self.opening.load(Ordering::Relaxed);
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let last_failure = last.or_else(|| {
            let since = tokio::time::Instant::now().checked_sub(timeout)?;
            let holding_up = self.holding_up.get().filter(|_| opening > 0)?;
            holding_up(since)
        });
        Error::PoolTimeout {
            timeout,
            opening,
            last_failure,
        }
    }

    /// The first failure that came after `since`, and when, taken so that no other caller
    /// gets it.
    fn take(&self, since: Instant) -> Option<(Instant, Arc<Error>)> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let index = queue.iter().position(|(at, _)| *at >= since)?;
        queue.remove(index)
    }

    /// Puts back a failure taken at `at` that its taker could not use, for another caller.
    fn give_back(&self, at: Instant, error: Arc<Error>) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let index = queue.partition_point(|(other, _)| *other <= at);
        queue.insert(index, (at, error));
        drop(queue);
        self.arrived.notify_one();
    }

    /// Waits for a failure meant for a caller that started waiting at `since`, and when it
    /// came.
    async fn next(&self, since: Instant) -> (Instant, Arc<Error>) {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(error) = self.take(since) {
                return error;
            }
            arrived.await;
        }
    }
}

tokio::task_local! {
    /// Whether the caller whose checkout runs has a connection in its check: set by
    /// [`Manager::is_valid`], which bb8 runs within the caller's checkout, and read by
    /// [`Pool::checkout`] (see [`InCheck`]).
    static CHECKING: Cell<bool>;
}

/// Marks the checkout that runs as one with a connection in its check, until dropped.
struct InCheck;

impl InCheck {
    fn start() -> Self {
        let _ = CHECKING.try_with(|checking| checking.set(true));
        Self
    }
}

impl Drop for InCheck {
    fn drop(&mut self) {
        let _ = CHECKING.try_with(|checking| checking.set(false));
    }
}

/// One connection bb8 is opening for callers, counted in [`Failures::opening`] until its
/// opening ends (or is dropped).
struct Opening(Arc<Failures>);

impl Opening {
    fn start(failures: &Arc<Failures>) -> Self {
        failures.opening.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(failures))
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.opening.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `open`, noting in `failures` each connection it opens (for bb8, for `min_idle` or as a
/// replacement alike).
fn noting_success<C: Send + 'static>(open: Open<C>, failures: &Arc<Failures>) -> Open<C> {
    let failures = Arc::clone(failures);
    Arc::new(move || {
        let (opening, failures) = (open(), Arc::clone(&failures));
        Box::pin(async move {
            let opened = opening.await;
            if opened.is_ok() {
                failures.opened();
            }
            opened
        })
    })
}

/// Hands each failure of a background connect to one waiting caller.
#[derive(Debug, Clone)]
struct FailureSink(Arc<Failures>);

impl bb8::ErrorSink<Error> for FailureSink {
    fn sink(&self, error: Error) {
        if let Error::Pool(why) = &error {
            // A dead connection bb8 dropped at checkout: it tries another, so no caller fails,
            // but one that times out is told why.
            tracing::debug!(error = %error, "a pooled connection was dropped at checkout");
            if why != PAST_ITS_LIFETIME {
                self.0.note(error);
            }
            return;
        }
        tracing::debug!(error = %ErrorChain(&error), "a pool could not open a connection");
        self.0.push(error);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}

/// Builds a bb8 pool of `kind` whose connections `open` opens, and registers it; a closed
/// registry (its connector shut down meanwhile) refuses it with [`Error::PoolClosed`]. The
/// connections it opens in the background, ahead of need, must answer their check within
/// `connect_timeout` too (the connector's, which bounds each login).
pub(crate) fn build<C: Send + 'static>(
    kind: Kind<C>,
    open: Open<C>,
    settings: &PoolSettings,
    registry: &Registry,
    connect_timeout: Duration,
) -> Result<Pool<C>> {
    let failures = Arc::new(Failures::new(
        settings.acquire_timeout,
        settings.max_size as usize,
    ));
    let open = noting_success(open, &failures);
    let closed = Arc::new(AtomicBool::new(false));
    let sweeping = Arc::new(SweepKey);
    let (name, lifespan, is_valid) = (kind.name, kind.lifespan, kind.is_valid);
    let renewal = match (kind.lifespan, settings.max_lifetime()) {
        (Some(_), Some(lifetime)) => Some(Arc::new(Renewal::new(
            name,
            lifetime,
            settings.lifetime_jitter(),
        ))),
        _ => None,
    };
    // bb8's lifetime counts from when bb8 took a connection in, which a replacement does not
    // reset: with renewal, each connection's own retirement instant applies instead.
    let lifetime = match renewal {
        Some(_) => None,
        None => settings.jittered_lifetime(),
    };
    let manager = Manager {
        open: Arc::clone(&open),
        kind,
        closed: Arc::clone(&closed),
        sweeping: Arc::clone(&sweeping),
        renewal: renewal.clone(),
        connect_timeout,
        check_timeout: check_timeout(settings.acquire_timeout),
        failures: Arc::clone(&failures),
    };
    let every = reaper_rate(settings.max_lifetime(), settings.idle_timeout);
    // bb8 opens a connection whenever its idle ones drop below its `min_idle`, a sweep's
    // checkouts too: a renewing pool keeps `min_idle` itself (see `Core::fill`).
    let (min_idle, bb8_min_idle) = match renewal {
        Some(_) => (settings.min_idle, 0),
        None => (0, settings.min_idle),
    };
    let pool = bb8::Pool::builder()
        .max_size(settings.max_size)
        .min_idle(Some(bb8_min_idle).filter(|n| *n > 0))
        .connection_timeout(settings.acquire_timeout)
        .idle_timeout(settings.idle_timeout)
        .max_lifetime(lifetime)
        .reaper_rate(every)
        // Failures are reported to the waiting callers instead of being retried until they
        // time out; has_broken still drops dead connections.
        .retry_connection(false)
        // Every reused connection is checked alive and outside any transaction (one round
        // trip, as bb8's default test does): see pool::reset.
        .test_on_check_out(true)
        .error_sink(Box::new(FailureSink(Arc::clone(&failures))))
        .build_unchecked(manager);
    let core = Arc::new(Core {
        pool,
        failures,
        acquire_timeout: settings.acquire_timeout,
        kind: name,
        max_size: settings.max_size,
        waiting: AtomicU64::new(0),
        closed,
        sweeping,
        renewal,
        open,
        is_valid,
        min_idle,
        filling: AtomicU32::new(0),
        connect_timeout,
        turns: Arc::new(tokio::sync::Semaphore::new(settings.max_size as usize)),
        lifespan,
        metrics: PoolMetrics::new(name),
    });
    if core.renewal.is_some() {
        tokio::spawn(sweep_every(
            Arc::downgrade(&core),
            every,
            settings.idle_timeout,
        ));
    }
    let handle: Arc<dyn PoolHandle> = core.clone();
    if !registry.add(Arc::downgrade(&handle)) {
        // The connector shut down meanwhile.
        drop(handle.close());
        return Err(Error::PoolClosed);
    }
    Ok(Pool { core })
}

/// One connection counted in its pool's [`Core::filling`] while it opens: until the pool has
/// it (a sweep in between would open another), or its opening ended otherwise (failed,
/// panicked, as a custom credential source may, or dropped with its runtime).
struct Filling<C: Send + 'static>(Arc<Core<C>>);

impl<C: Send + 'static> Filling<C> {
    fn start(core: &Arc<Core<C>>) -> Self {
        core.filling.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(core))
    }
}

impl<C: Send + 'static> Drop for Filling<C> {
    fn drop(&mut self) {
        self.0.filling.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool, to the sweeping mode of its manager (see [`Manager::sweeping`]).
#[derive(Debug)]
struct SweepKey;

thread_local! {
    /// The pool whose idle connections this thread is taking out (the address of its
    /// [`SweepKey`]), or 0.
    static SWEEPING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The sweeping mode of a pool's manager (see [`Manager::sweeping`]) on this thread, left as
/// the guard drops. A sweep takes its connections out, and gives them back, in one
/// synchronous pass on its own thread: a checkout on another thread meanwhile (a caller that
/// had its turn before the pool closed, say) is checked and renewed as always.
struct Sweeping<'a>(std::marker::PhantomData<&'a SweepKey>);

impl<'a> Sweeping<'a> {
    fn start(key: &'a Arc<SweepKey>) -> Self {
        SWEEPING.set(Arc::as_ptr(key) as usize);
        Self(std::marker::PhantomData)
    }

    /// Whether this thread is sweeping the pool of `key`.
    fn is_on(key: &Arc<SweepKey>) -> bool {
        SWEEPING.get() == Arc::as_ptr(key) as usize
    }
}

impl Drop for Sweeping<'_> {
    fn drop(&mut self) {
        SWEEPING.set(0);
    }
}

/// Sweeps a renewing pool's idle connections (see [`Core::sweep`]) and opens connections up
/// to its `min_idle` (see [`Core::fill`]) as it starts and then as often as bb8's reaper
/// passes, until the pool is closed or dropped.
async fn sweep_every<C: Send + 'static>(
    core: std::sync::Weak<Core<C>>,
    every: Duration,
    idle_timeout: Option<Duration>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match core.upgrade() {
            Some(core) if !core.closed.load(Ordering::Relaxed) => {
                let lasting = core.sweep(idle_timeout);
                core.fill(lasting);
            }
            _ => return,
        }
    }
}

/// How long a round trip the pool makes for itself (the check of a connection at checkout, the
/// `ROLLBACK` of a transaction dropped while open) may take before the connection counts as
/// dead: half the acquire timeout, so that a caller whose connection stopped answering (a
/// server that froze, a flow a NAT or firewall dropped without a word) still has the other
/// half for the login of another, as HikariCP's `validationTimeout` bounds its checks below
/// its `connectionTimeout`. TCP alone would wait minutes for such a connection.
fn check_timeout(acquire_timeout: Duration) -> Duration {
    acquire_timeout / 2
}

/// How often bb8 closes idle connections past their lifetime or idle timeout: it checks
/// neither at checkout, and by default only every 30 s. Every tenth of the shorter limit
/// (at most 30 s, at least 10 ms), so that no connection is handed out more than a tenth
/// past its lifetime: Aurora DSQL ends connections at 60 minutes, whatever they are doing.
fn reaper_rate(lifetime: Option<Duration>, idle: Option<Duration>) -> Duration {
    [lifetime, idle]
        .into_iter()
        .flatten()
        .min()
        .map_or(Duration::from_secs(30), |shortest| {
            (shortest / 10).clamp(Duration::from_millis(10), Duration::from_secs(30))
        })
}

impl<C: Send + 'static> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            core: Arc::clone(&self.core),
        }
    }
}

impl<C: Send + 'static> std::fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.core.pool.state();
        f.debug_struct("Pool")
            .field("kind", &self.core.kind)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl<C: Send + 'static> Pool<C> {
    /// A connection from the pool, opening one if needed. Callers that wait are served in
    /// the order they asked, once the pool's connections are open: one waiting for a
    /// connection the pool is still opening can be overtaken, for as long as that login
    /// takes, by callers served by the connections already open.
    ///
    /// Fails with [`Error::Connect`] carrying the cause as soon as a connection the pool
    /// tried to open for it fails (one failed attempt fails one caller), with
    /// [`Error::PoolTimeout`] after the acquire timeout, and with [`Error::PoolClosed`] after
    /// [`Connector::shutdown`](crate::Connector::shutdown).
    ///
    /// The guard dereferences to the pool's box of the connection (`Box<C>`), and through it
    /// to `C`: method calls and Diesel's `&mut conn` reach the connection either way.
    pub async fn get(&self) -> Result<bb8::PooledConnection<'_, Manager<C>>> {
        self.checkout(self.core.pool.get()).await
    }

    /// The pool, whose callers that time out while it opens connections are told what
    /// `holding_up` says holds those up (see [`Error::PoolTimeout`]).
    pub(crate) fn held_up_by(self, holding_up: HoldingUp) -> Self {
        // Set once, here, as the pool is built.
        let _ = self.core.failures.holding_up.set(holding_up);
        self
    }

    /// Like [`get`](Self::get), for a connection that does not borrow the pool; boxed, so that
    /// the futures of `async_trait` methods that await it are `Send` (the compiler cannot
    /// prove it through bb8's future for every lifetime).
    #[cfg(feature = "seaorm")]
    pub(crate) fn get_owned(
        &self,
    ) -> BoxFuture<'_, Result<bb8::PooledConnection<'static, Manager<C>>>> {
        Box::pin(self.checkout(self.core.pool.get_owned()))
    }

    /// Waits for a turn, then for `get` (bb8's checkout) or for a failure meant for this
    /// caller, and records the wait.
    ///
    /// Turns are given in the order callers asked, one per connection the pool may hand out,
    /// and held until the connection comes back. bb8 alone wakes a waiting caller when a
    /// connection comes back, but the caller that gave it back, asking again at once, takes
    /// it first: with more callers than connections, some waited seconds while others were
    /// served hundreds of times.
    ///
    /// Every checkout counts against tokio's cooperative budget, as a semaphore's `acquire`
    /// does, and so yields once the task has used its budget: a checkout that need not wait
    /// (an idle connection, a free turn, a socket whose reply is already there) never
    /// yields otherwise, and a caller looping over such checkouts kept the other tasks of
    /// its thread from running, and so from asking for a turn at all.
    async fn checkout<T: std::ops::DerefMut<Target = Box<C>>>(
        &self,
        get: impl std::future::Future<Output = std::result::Result<T, bb8::RunError<Error>>>,
    ) -> Result<T> {
        tokio::task::consume_budget().await;
        let core = &*self.core;
        if core.closed.load(Ordering::Relaxed) {
            return Err(Error::PoolClosed);
        }
        let started = Instant::now();
        let waiting = Waiting::enter(core);
        // One bound for the turn and bb8's wait together: each had its own, and a caller given
        // its turn late then waited in bb8 up to the acquire timeout again.
        let deadline = tokio::time::Instant::now() + core.acquire_timeout;
        let timed_out = || core.failures.timed_out(core.acquire_timeout);
        let got = async {
            let turns = Arc::clone(&core.turns);
            let turn = match turns.try_acquire_owned() {
                Ok(turn) => turn,
                Err(tokio::sync::TryAcquireError::Closed) => return Err(Error::PoolClosed),
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    let turns = Arc::clone(&core.turns).acquire_owned();
                    tokio::time::timeout_at(deadline, turns)
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(|_| Error::PoolClosed)?
                }
            };
            // Only callers with a turn wait in bb8, so a failed connect goes to one of them,
            // unless it has a connection in its check: then it gives the failure back for
            // another (cut off, the check would close a working connection, and fail this
            // caller with another's error).
            let mut since = Instant::now();
            tokio::pin!(get);
            let got = loop {
                tokio::select! {
                    biased;
                    got = &mut get => break got,
                    (at, cause) = core.failures.next(since) => {
                        if !CHECKING.with(Cell::get) {
                            return Err(Error::Connect { source: cause });
                        }
                        // Only failures after it from now on: that one is another's, and the
                        // next may be its own, once its check failed.
                        since = Instant::now().max(at + Duration::from_nanos(1));
                        core.failures.give_back(at, cause);
                    }
                    () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
                }
            };
            let mut conn = got.map_err(|e| match e {
                bb8::RunError::TimedOut => timed_out(),
                bb8::RunError::User(e) => e,
            })?;
            if let Some(span) = core.lifespan.and_then(|lifespan| lifespan(&mut **conn)) {
                span.turn = Some(turn);
            }
            Ok(conn)
        };
        let got = CHECKING.scope(Cell::new(false), got).await;
        drop(waiting);
        let waited = started.elapsed();
        let state = core.pool.state();
        core.metrics.connections.set(state.connections as f64);
        core.metrics.idle.set(state.idle_connections as f64);
        core.metrics.acquire.record(waited.as_secs_f64());
        tracing::trace!(
            pool = core.kind,
            wait_ms = waited.as_millis() as u64,
            ok = got.is_ok(),
            connections = state.connections,
            idle = state.idle_connections,
            "pool acquire"
        );
        got
    }

    /// The bb8 pool itself, for its full API: `dedicated_connection`, say, for a connection
    /// outside the pool. A connection checked out through it skips what [`get`](Self::get)
    /// adds (the order of waiting callers, and the renewal's and idle sweeps' accounts of
    /// connections in use), so check out with `get`.
    pub fn inner(&self) -> &bb8::Pool<Manager<C>> {
        &self.core.pool
    }

    /// How long a round trip the pool makes for itself may take (see [`check_timeout`]).
    #[cfg(feature = "seaorm")]
    pub(crate) fn check_timeout(&self) -> Duration {
        check_timeout(self.core.acquire_timeout)
    }

    /// Open and idle connections right now.
    pub fn state(&self) -> bb8::State {
        self.core.pool.state()
    }

    /// This pool's state, as [`Connector::health`](crate::Connector::health) reports it.
    pub fn health(&self) -> PoolHealth {
        self.core.health()
    }
}

impl<C: Send + 'static> Core<C> {
    /// Retires the idle connections that a checkout would retire, or that reached their idle
    /// timeout, and returns how many it kept that are not within the lead of their end (for
    /// [`fill`](Core::fill) to open others ahead, up to `min_idle`), if it looked. bb8's
    /// reaper retires idle connections by bb8's own lifetime, which renewal switches off (see
    /// [`build`]): without this, connections that reached their end while idle stayed in the
    /// pool, counted towards `min_idle`, and were retired only at the next checkouts, which
    /// then waited for logins.
    ///
    /// Runs only when some connection may be due, or some came or went since the last sweep,
    /// and only while no caller holds or waits for a connection: it takes every turn and
    /// every idle connection for a moment, with no round trip. A connection it keeps goes
    /// back with bb8's idle clock restarted, so it notes that connection's idle timeout by
    /// the pool's own clock (when it last came back from a caller) and retires it then.
    fn sweep(&self, idle_timeout: Option<Duration>) -> Option<u32> {
        let (renewal, lifespan) = self.renewal.as_ref().zip(self.lifespan)?;
        let now = Instant::now();
        let due = renewal.due.load(Ordering::Relaxed) <= renewal.nanos(now);
        let changed = self.pool.state().connections != renewal.swept.load(Ordering::Relaxed);
        if !(due || changed) {
            return None;
        }
        let _turns = self.turns.try_acquire_many(self.max_size).ok()?;
        renewal.due.store(u64::MAX, Ordering::Relaxed);
        // Declared before the connections, so that they go back (even in a panic) before
        // the pool leaves its sweeping mode.
        let sweeping = Sweeping::start(&self.sweeping);
        let mut held = self.take_idle(&sweeping);
        let (mut kept, mut lasting) = (0, 0);
        let lead = renewal.lead();
        for conn in &mut held {
            let conn: &mut C = conn;
            // One whose replacement is ready takes it, as at a checkout.
            let asked = lifespan(conn).and_then(|span| {
                let expired = span.retire_at.is_some_and(|end| end <= now);
                span.replacement.map(|own| (own, expired))
            });
            if let Some((own, expired)) = asked
                && let Replacement::Ready(fresh) = renewal.take_spare(lifespan, now, own, expired)
            {
                renewal.swap_in(lifespan, conn, fresh);
            }
            let Some(span) = lifespan(conn) else {
                (kept, lasting) = (kept + 1, lasting + 1);
                continue;
            };
            let retired_from = renewal.retired_idle_from(span, idle_timeout);
            if retired_from.is_some_and(|from| from <= now) {
                span.failed = true;
                continue;
            }
            kept += 1;
            // The next sweep that finds it near its end has another opened ahead.
            let near_end = span.retire_at.and_then(|end| end.checked_sub(lead));
            let near_end = near_end.filter(|at| *at > now && self.min_idle > 0);
            if near_end.is_some() || span.retire_at.is_none() {
                lasting += 1;
            }
            if let Some(at) = near_end.into_iter().chain(retired_from).min() {
                renewal.due_by(at);
            }
        }
        if kept < held.len() {
            tracing::debug!(
                pool = self.kind,
                retired = held.len() - kept,
                "idle connections past their lifetime or idle timeout are closed; the pool opens up to min_idle again"
            );
        }
        renewal
            .swept
            .store(u32::try_from(kept).unwrap_or(u32::MAX), Ordering::Relaxed);
        // Each one marked comes back broken, and bb8 closes it.
        drop(held);
        Some(u32::try_from(lasting).unwrap_or(u32::MAX))
    }

    /// Opens connections in the background until `min_idle` are open or opening, within
    /// `max_size`, and hands each to the pool as it is ready. Counts the pool's connections,
    /// or, after a sweep that looked at them all, the `lasting` ones it kept: so a pool left
    /// idle has its next `min_idle` connections logged in before the last ones end. One that
    /// cannot open is logged and tried again at the next sweep: a caller that needs a
    /// connection opens its own.
    fn fill(self: &Arc<Self>, lasting: Option<u32>) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let state = self.pool.state();
        let filling = self.filling.load(Ordering::Relaxed);
        let open = lasting.unwrap_or(state.connections);
        let wanted = self
            .min_idle
            .saturating_sub(open + filling)
            .min(self.max_size.saturating_sub(state.connections + filling));
        for _ in 0..wanted {
            let counted = Filling::start(self);
            let opening = open_stamped(
                Arc::clone(&self.open),
                self.kind,
                self.lifespan,
                self.renewal.clone(),
            );
            let opening = checked(opening, self.is_valid, self.lifespan, self.connect_timeout);
            tokio::spawn(async move {
                let core = Arc::clone(&counted.0);
                let added = opening
                    .await
                    .map(|conn| drop(core.pool.add(Box::new(conn))));
                drop(counted);
                match added {
                    // Refused, and closed, if the pool closed or filled up meanwhile.
                    Ok(()) => {}
                    Err(e) => tracing::debug!(
                        pool = core.kind,
                        error = %ErrorChain(&e),
                        "a connection kept for min_idle could not be opened; tried again at the next sweep"
                    ),
                }
            });
        }
    }
}

impl<C: Send + 'static> Drop for Core<C> {
    /// A pool nobody holds any more (dropped without a shutdown) closes the replacements it
    /// opened ahead, and opens none: they would otherwise wait for the lead and the grace
    /// for a connection that is gone (see [`Renewal`]).
    fn drop(&mut self) {
        self.open_no_more();
    }
}

impl<C: Send + 'static> Core<C> {
    /// Refuses new connections, and closes the replacements opened ahead.
    fn open_no_more(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(renewal) = &self.renewal {
            drop(std::mem::take(&mut *renewal.spares()));
        }
    }

    /// Every idle connection, taken out at once: the pool's sweeping mode (`_sweeping`) has
    /// bb8's checkouts neither check nor renew them, and none waits.
    fn take_idle(&self, _sweeping: &Sweeping<'_>) -> Vec<bb8::PooledConnection<'_, Manager<C>>> {
        let mut held = Vec::new();
        while held.len() < self.max_size as usize && self.pool.state().idle_connections > 0 {
            match self.pool.get().now_or_never() {
                Some(Ok(conn)) => held.push(conn),
                _ => break,
            }
        }
        held
    }
}

/// A caller counted among those waiting for a checkout until dropped: served, failed, or
/// its future dropped while it waited.
struct Waiting<'a, C: Send + 'static>(&'a Core<C>);

impl<'a, C: Send + 'static> Waiting<'a, C> {
    fn enter(core: &'a Core<C>) -> Self {
        let waiting = core.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        core.metrics.waiting.set(waiting as f64);
        Self(core)
    }
}

impl<C: Send + 'static> Drop for Waiting<'_, C> {
    fn drop(&mut self) {
        let waiting = self.0.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        self.0.metrics.waiting.set(waiting as f64);
    }
}

impl<C: Send + 'static> PoolHandle for Core<C> {
    fn health(&self) -> PoolHealth {
        let state = self.pool.state();
        PoolHealth {
            kind: self.kind,
            max_size: self.max_size,
            connections: state.connections,
            idle: state.idle_connections,
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Refuses new checkouts, closes the idle connections now and the others when they
    /// come back.
    fn close(&self) -> BoxFuture<'_, ()> {
        self.open_no_more();
        self.turns.close();
        // Taken out as a sweep takes them: at once, with no check and no renewal. Each
        // returns to the pool broken (closed), so the pool drops it.
        let sweeping = Sweeping::start(&self.sweeping);
        drop(self.take_idle(&sweeping));
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type ClosedOn = Arc<Mutex<Option<Option<tokio::task::Id>>>>;

    /// The connector's default.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A connection that notes the task it was closed on.
    struct Probe {
        name: u64,
        span: Lifespan,
        closed_on: ClosedOn,
        /// Checked with a round trip (see `probe_check`).
        checked: bool,
    }

    impl Probe {
        fn ending_in(name: u64, left: Duration, replacement: Option<u64>) -> (Self, ClosedOn) {
            let closed_on = ClosedOn::default();
            let span = Lifespan {
                retire_at: Some(Instant::now() + left),
                replacement,
                ..Lifespan::returned_now()
            };
            let probe = Self {
                name,
                span,
                closed_on: Arc::clone(&closed_on),
                checked: false,
            };
            (probe, closed_on)
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            *self.closed_on.lock().unwrap() = Some(tokio::task::try_id());
        }
    }

    fn probe_span(probe: &mut Probe) -> Option<&mut Lifespan> {
        Some(&mut probe.span)
    }

    fn probe_valid(_: &mut Probe) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }

    const PROBE: Kind<Probe> = Kind {
        name: "probe",
        is_settled: |_| true,
        is_valid: probe_valid,
        has_broken: |_| false,
        lifespan: Some(probe_span),
    };

    /// A pool of [`PROBE`] connections that `open` opens.
    fn probe_pool(open: Open<Probe>, settings: &PoolSettings) -> Pool<Probe> {
        build(PROBE, open, settings, &Registry::default(), CONNECT_TIMEOUT).unwrap()
    }

    fn probe_manager(renewal: &Arc<Renewal<Probe>>) -> Manager<Probe> {
        Manager {
            open: Arc::new(|| Box::pin(async { Err(Error::PoolClosed) })),
            kind: PROBE,
            closed: Arc::new(AtomicBool::new(false)),
            sweeping: Arc::new(SweepKey),
            renewal: Some(Arc::clone(renewal)),
            connect_timeout: CONNECT_TIMEOUT,
            check_timeout: CONNECT_TIMEOUT,
            failures: Arc::new(Failures::new(CONNECT_TIMEOUT, 1)),
        }
    }

    /// A caller whose checkouts never wait (an idle connection, checked without a round
    /// trip) still gives other tasks of its thread their turn to run, and so to ask: on a
    /// current-thread runtime, twelve callers of a pool of two were spawned and one of them
    /// was served 599 times of 600 before the others first ran, each served never.
    #[tokio::test]
    async fn a_caller_whose_checkouts_never_wait_lets_other_tasks_run() {
        let open: Open<Probe> = Arc::new(|| {
            Box::pin(async { Ok(Probe::ending_in(1, Duration::from_secs(600), None).0) })
        });
        let settings = PoolSettings::builder().max_size(1).build().unwrap();
        let pool = probe_pool(open, &settings);
        drop(pool.get().await.unwrap());
        let other_ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&other_ran);
        tokio::spawn(async move { flag.store(true, Ordering::Relaxed) });
        let mut checkouts = 0;
        while !other_ran.load(Ordering::Relaxed) {
            drop(pool.get().await.unwrap());
            checkouts += 1;
            assert!(
                checkouts < 10_000,
                "10,000 checkouts and the other task has not run"
            );
        }
    }

    /// A panic while a connection opens fails that opening, and the pool opens the next:
    /// raised in bb8's task, it ended the task before bb8 counted the opening as done, and
    /// a pool of one never opened a connection again (every checkout timed out).
    #[tokio::test(start_paused = true)]
    async fn a_panic_while_opening_fails_that_opening_alone() {
        let calls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        let open: Open<Probe> = Arc::new(move || {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            Box::pin(async move {
                assert!(!first, "a bug on the connect path");
                Ok(Probe::ending_in(1, Duration::from_secs(600), None).0)
            })
        });
        let settings = PoolSettings::builder()
            .max_size(1)
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let pool = probe_pool(open, &settings);
        let first = pool.get().await.map(drop).unwrap_err();
        assert!(
            ErrorChain(&first)
                .to_string()
                .contains("panicked: a bug on the connect path"),
            "{first:?}"
        );
        pool.get().await.expect("the next opening");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// The acquire timeout bounds a checkout's whole wait: a caller given its turn late
    /// (another caller's connect failed) waited in bb8 the whole timeout again.
    #[tokio::test(start_paused = true)]
    async fn a_checkout_waits_no_longer_than_the_acquire_timeout_in_all() {
        let open: Open<Probe> = Arc::new(|| Box::pin(std::future::pending()));
        let timeout = Duration::from_secs(1);
        let settings = PoolSettings::builder()
            .max_size(1)
            .acquire_timeout(timeout)
            .build()
            .unwrap();
        let pool = probe_pool(open, &settings);
        // Takes the only turn, then waits for a connection that never opens.
        let first = pool.get();
        let second = async {
            tokio::time::sleep(timeout / 2).await;
            let started = tokio::time::Instant::now();
            let got = pool.get().await.map(drop);
            (got, started.elapsed())
        };
        let (first, (second, waited)) = tokio::join!(first, second);
        assert!(
            matches!(first, Err(Error::PoolTimeout { .. })),
            "{:?}",
            first.err()
        );
        assert!(
            matches!(second, Err(Error::PoolTimeout { .. })),
            "{second:?}"
        );
        assert_eq!(waited, timeout);
    }

    /// A caller that times out while the pool's connects fail, each failure going to a caller
    /// ahead of it, learns why: it got only "the pool is exhausted or the database is slow",
    /// as if the pool's connections were all in use. One that times out with no connect
    /// failing meanwhile gets no cause.
    #[tokio::test(start_paused = true)]
    async fn a_checkout_that_times_out_while_connects_fail_carries_the_last_failure() {
        let open: Open<Probe> = Arc::new(|| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Err(Error::Unreachable {
                    endpoint: "db.internal:5432".into(),
                    source: "connection refused".into(),
                })
            })
        });
        let settings = PoolSettings::builder()
            .max_size(1)
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let pool = probe_pool(open, &settings);
        let get = || async { pool.get().await.map(drop) };
        let (first, second, third) = tokio::join!(get(), get(), get());
        for got in [&first, &second] {
            assert!(matches!(got, Err(Error::Connect { .. })), "{got:?}");
        }
        let third = third.unwrap_err();
        let chain = ErrorChain(&third).to_string();
        assert!(matches!(third, Error::PoolTimeout { .. }), "{chain}");
        assert!(
            chain.contains("db.internal:5432") && chain.contains("connection refused"),
            "a timeout while connects failed tells no cause: {chain}"
        );
        assert!(!chain.contains("exhausted"), "{chain}");

        let pending: Open<Probe> = Arc::new(|| Box::pin(std::future::pending()));
        let pool = probe_pool(pending, &settings);
        let timed_out = pool.get().await.map(drop).unwrap_err();
        let chain = ErrorChain(&timed_out).to_string();
        assert!(
            std::error::Error::source(&timed_out).is_none() && chain.contains("still opening 1"),
            "{chain}"
        );

        // A connection opened since the failure: the pool is exhausted, not failing.
        let attempts = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&attempts);
        let fails_once: Open<Probe> = Arc::new(move || {
            let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
            Box::pin(async move {
                match first {
                    true => Err(Error::PoolClosed),
                    false => Ok(Probe::ending_in(2, Duration::from_secs(600), None).0),
                }
            })
        });
        let pool = probe_pool(fails_once, &settings);
        assert!(matches!(pool.get().await, Err(Error::Connect { .. })));
        let _held = pool.get().await.unwrap();
        let timed_out = pool.get().await.map(drop).unwrap_err();
        assert!(
            std::error::Error::source(&timed_out).is_none(),
            "{}",
            ErrorChain(&timed_out)
        );
        assert!(timed_out.to_string().contains("exhausted"), "{timed_out}");
    }

    /// Failures no caller took are kept no more than callers can wait for them: with a long
    /// acquire timeout, an outage under checkouts that their callers gave up on (each
    /// connect failing for nobody) kept every failure until it aged out.
    #[test]
    fn failures_no_caller_took_are_kept_no_more_than_callers_can_wait() {
        let failures = Failures::new(Duration::from_secs(3600), 4);
        let since = Instant::now();
        for _ in 0..1000 {
            failures.push(Error::PoolClosed);
        }
        let kept = failures.queue.lock().unwrap().len();
        assert!(kept <= 4, "{kept} failures kept for a pool of 4");
        assert!(failures.take(since).is_some());
    }

    /// A caller whose checkout is dropped while it waits (a timeout, a `select!`, a client
    /// gone) no longer counts as waiting: the count and its gauge fell back only for callers
    /// that were served or failed, and grew with every dropped one.
    #[tokio::test]
    async fn a_checkout_dropped_while_it_waits_no_longer_counts_as_waiting() {
        let (open, _) = counted_probes();
        let settings = PoolSettings::builder().max_size(1).build().unwrap();
        let pool = probe_pool(open, &settings);
        let held = pool.get().await.unwrap();
        for _ in 0..3 {
            let mut waiting = Box::pin(pool.get());
            let polled = futures_util::FutureExt::now_or_never(&mut waiting);
            assert!(polled.is_none(), "the pool is full");
            assert_eq!(pool.health().waiting, 1);
            drop(waiting);
            assert_eq!(pool.health().waiting, 0, "a dropped checkout still counted");
        }
        drop(held);
        drop(pool.get().await.unwrap());
        assert_eq!(pool.health().waiting, 0);
    }

    /// Closing a pool closes its idle connections without a check and opens none: it took
    /// each idle one out through a checkout that checked it (a round trip each), and bb8
    /// replaced each that failed its check with a new connection (a login, at shutdown),
    /// up to one per idle connection.
    #[tokio::test]
    async fn closing_a_pool_checks_no_connection_and_opens_none() {
        /// Set once the pool is full: every check from then on fails.
        static DEAD: AtomicBool = AtomicBool::new(false);
        fn dead_once_full(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
            if DEAD.load(Ordering::Relaxed) {
                probe_dead(probe)
            } else {
                probe_valid(probe)
            }
        }
        let (open, closed) = counted_probes();
        let kind = Kind {
            is_settled: |_| false,
            is_valid: dead_once_full,
            ..PROBE
        };
        let settings = PoolSettings::builder().max_size(3).build().unwrap();
        let registry = Registry::default();
        let pool = build(kind, open, &settings, &registry, CONNECT_TIMEOUT).unwrap();
        let held = [pool.get(), pool.get(), pool.get()];
        let held = futures_util::future::join_all(held).await;
        assert!(held.iter().all(Result::is_ok));
        drop(held);
        assert_eq!(pool.state().idle_connections, 3);

        DEAD.store(true, Ordering::Relaxed);
        registry.close_all().await;
        assert_eq!(
            closed.lock().unwrap().len(),
            3,
            "a connection opened at shutdown"
        );
        assert_eq!(pool.state().connections, 0, "idle connections left open");
    }

    /// One in frequent use that reached its end without having asked for a replacement (left
    /// in the pool through its whole lead, say) asks now and serves on while the replacement
    /// logs in, as one whose replacement is late does; one that sat idle for longer than the
    /// lead (a background job's) is retired.
    #[tokio::test]
    async fn one_in_use_that_never_asked_asks_at_its_end_and_serves_on() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = probe_manager(&renewal);
        let (mut conn, _) = Probe::ending_in(1, Duration::ZERO, None);

        assert!(!manager.renew(&mut conn, false), "serves on");
        assert!(conn.span.replacement.is_some(), "asked at its end");
        assert_eq!(renewal.spares().len(), 1, "its replacement is logging in");

        // Idle for longer than the lead (15 s), if not the grace (30 s).
        let (mut idle, _) = Probe::ending_in(2, Duration::ZERO, None);
        idle.span.returned = Instant::now().checked_sub(Duration::from_secs(20));
        assert!(manager.renew(&mut idle, false), "retired");
        assert_eq!(idle.span.replacement, None);
    }

    /// A replacement that is ready while its connection is out on a long request (past the
    /// lead, if not the grace) waits for it: closed after the lead alone, the connection came
    /// back past its end to find none, was retired, and the pool logged in on the request path.
    #[tokio::test(start_paused = true)]
    async fn a_replacement_waits_for_its_connection_out_on_a_long_request() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = Manager {
            open: Arc::new(|| {
                Box::pin(async { Ok(Probe::ending_in(2, Duration::from_secs(60), None).0) })
            }),
            ..probe_manager(&renewal)
        };
        let (mut conn, _) = Probe::ending_in(1, Duration::ZERO, None);
        assert!(
            !manager.renew(&mut conn, false),
            "asks at its end and serves on"
        );
        while renewal.spares().iter().all(|spare| spare.conn.is_none()) {
            tokio::task::yield_now().await;
        }

        // Out for longer than the lead (15 s) on paused time; the clock of its lifetime, and
        // so of its grace (30 s), stands still.
        tokio::time::sleep(renewal.lead() + Duration::from_secs(1)).await;
        assert!(
            !manager.renew(&mut conn, true),
            "the replacement took its place"
        );
        assert_eq!(conn.name, 2);
    }

    #[tokio::test]
    async fn a_replaced_connection_is_closed_on_a_task_of_its_own() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = probe_manager(&renewal);
        let (fresh, _) = Probe::ending_in(2, Duration::from_secs(60), None);
        renewal.spares().push(spare(7, 7, Some(fresh)));
        let (mut conn, old_closed_on) = Probe::ending_in(1, Duration::from_secs(1), Some(7));

        // Checked out, and coming back: both may put the replacement in its place.
        assert!(!manager.renew(&mut conn, false), "not past its lifetime");
        assert_eq!(conn.name, 2, "the replacement took its place");
        assert_eq!(
            *old_closed_on.lock().unwrap(),
            None,
            "the caller did not wait for the old connection to close"
        );
        while old_closed_on.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
        assert!(
            old_closed_on.lock().unwrap().unwrap().is_some(),
            "closed on a task of its own"
        );
    }

    /// A replacement that takes its connection's place as that one comes back counts as come
    /// back then: it kept the instant it was checked as it opened, so that the pool took it
    /// for one not in frequent use, and an idle sweep closed it early for its idle timeout.
    #[tokio::test]
    async fn a_replacement_swapped_in_as_its_connection_comes_back_counts_as_come_back() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = probe_manager(&renewal);
        let (mut fresh, _) = Probe::ending_in(2, Duration::from_secs(60), None);
        fresh.span.returned = Instant::now().checked_sub(Duration::from_secs(10));
        renewal.spares().push(spare(7, 7, Some(fresh)));
        let (mut conn, _) = Probe::ending_in(1, Duration::from_secs(1), Some(7));

        let back = Instant::now();
        assert!(!manager.renew(&mut conn, true), "not past its lifetime");
        assert_eq!(conn.name, 2, "the replacement took its place");
        assert!(conn.span.returned.is_some_and(|at| at >= back));
        assert!(
            !conn.span.recently_back(),
            "checked 10 s ago, and not seen since: it goes out checked"
        );
        drop(conn);

        // One checked moments ago goes out without a check.
        let (fresh, _) = Probe::ending_in(4, Duration::from_secs(60), None);
        renewal.spares().push(spare(8, 8, Some(fresh)));
        let (mut conn, _) = Probe::ending_in(3, Duration::from_secs(1), Some(8));
        assert!(!manager.renew(&mut conn, true), "not past its lifetime");
        assert_eq!(conn.name, 4, "the replacement took its place");
        assert!(conn.span.recently_back());
    }

    fn probe_dead(_: &mut Probe) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Err(Error::Pool("the server closed the connection".to_owned())) })
    }

    /// bb8 asks `has_broken` of a connection that failed its checkout test as well, and drops
    /// whatever the connection then is: a replacement that became ready during the test and
    /// took the failed connection's place there was closed with it.
    #[tokio::test]
    async fn one_that_fails_its_check_leaves_its_replacement_in_place() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = Manager {
            kind: Kind {
                is_settled: |_| false,
                is_valid: probe_dead,
                ..PROBE
            },
            ..probe_manager(&renewal)
        };
        renewal.spares().push(spare(7, 7, None));
        let (conn, _) = Probe::ending_in(1, Duration::from_secs(1), Some(7));
        let mut conn = Box::new(conn);

        let checked = bb8::ManageConnection::is_valid(&manager, &mut conn).await;
        assert!(checked.is_err(), "the check fails");
        let (fresh, fresh_closed_on) = Probe::ending_in(2, Duration::from_secs(60), None);
        renewal.spares()[0].conn = Some(fresh);

        assert!(
            bb8::ManageConnection::has_broken(&manager, &mut conn),
            "the failed connection counts as broken"
        );
        assert_eq!(conn.name, 1, "the replacement did not take its place");
        drop(conn);
        assert_eq!(*fresh_closed_on.lock().unwrap(), None, "still open");
        assert!(
            renewal
                .spares()
                .iter()
                .any(|s| s.conn.as_ref().is_some_and(|c| c.name == 2)),
            "and ready for a connection past its end to take"
        );
    }

    /// Probes that open with names counting up from 1, and how each was closed.
    fn counted_probes() -> (Open<Probe>, Arc<Mutex<Vec<ClosedOn>>>) {
        let closed: Arc<Mutex<Vec<ClosedOn>>> = Arc::default();
        let log = Arc::clone(&closed);
        let open: Open<Probe> = Arc::new(move || {
            let mut log = log.lock().unwrap();
            let (probe, closed_on) =
                Probe::ending_in(log.len() as u64 + 1, Duration::from_secs(600), None);
            log.push(closed_on);
            Box::pin(async move { Ok(probe) })
        });
        (open, closed)
    }

    /// Waits for `done`, checking every 10 ms, for a minute at most.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("after a minute: not {what}"));
    }

    /// A pool that sits idle for longer than its connections' lifetime, within its idle
    /// timeout, closes them in the background and keeps `min_idle` fresh ones: bb8's reaper
    /// retires idle connections by bb8's own lifetime, which renewal switches off, so the
    /// idle ones stayed in the pool past their end (counted towards `min_idle`, and holding a
    /// server connection), and the first checkouts after the idle spell retired them and
    /// waited for logins.
    #[tokio::test]
    async fn an_idle_pool_closes_connections_past_their_end_and_keeps_min_idle_fresh() {
        let (open, closed) = counted_probes();
        let settings = PoolSettings::builder()
            .max_size(4)
            .min_idle(1)
            .max_lifetime(Some(Duration::from_millis(300)))
            .lifetime_jitter(0.0)
            .idle_timeout(None)
            .build()
            .unwrap();
        let pool = probe_pool(open, &settings);
        drop([pool.get().await.unwrap(), pool.get().await.unwrap()]);
        let before: Vec<ClosedOn> = closed.lock().unwrap().clone();

        eventually(
            "every connection opened before the idle spell closed",
            || before.iter().all(|c| c.lock().unwrap().is_some()),
        )
        .await;
        eventually("one idle connection, opened since", || {
            let state = pool.state();
            (state.connections, state.idle_connections) == (1, 1)
        })
        .await;
    }

    /// A pool of up to four `kind` connections living a minute, once it has opened the one
    /// `min_idle` asks for; and how each connection it opened was closed.
    async fn one_idle(kind: Kind<Probe>) -> (Pool<Probe>, Arc<Mutex<Vec<ClosedOn>>>) {
        let (open, closed) = counted_probes();
        let settings = PoolSettings::builder()
            .max_size(4)
            .min_idle(1)
            .max_lifetime(Some(Duration::from_secs(60)))
            .build()
            .unwrap();
        let pool = build(kind, open, &settings, &Registry::default(), CONNECT_TIMEOUT).unwrap();
        eventually("min_idle open", || pool.state().idle_connections == 1).await;
        (pool, closed)
    }

    /// An idle connection near its end has the one that will follow it opened ahead, so that
    /// the pool never lacks `min_idle` connections within their lifetime while it is idle.
    #[tokio::test]
    async fn an_idle_connection_near_its_end_has_its_successor_opened_ahead() {
        let (pool, closed) = one_idle(PROBE).await;
        let mut conn = pool.get().await.unwrap();
        let lead = pool.core.renewal.as_ref().unwrap().lead();
        conn.span.retire_at = Some(Instant::now() + lead / 2);
        drop(conn);

        assert_eq!(
            pool.core.sweep(None),
            Some(0),
            "its one connection is near its end"
        );
        pool.core.fill(Some(0));
        eventually("a second connection open", || pool.state().connections == 2).await;
        assert!(
            closed.lock().unwrap()[0].lock().unwrap().is_none(),
            "opened while the first is still open"
        );
    }

    /// A pool dropped without a shutdown closes the replacements it opened ahead at once: one
    /// logged in and waiting for its connection was kept for the lead and the grace (45 s
    /// with a 60 s lifetime), a server connection of a pool nobody held any more.
    #[tokio::test]
    async fn a_dropped_pool_closes_its_replacements_at_once() {
        let (pool, closed) = one_idle(PROBE).await;
        let renewal = Arc::clone(pool.core.renewal.as_ref().unwrap());
        let mut conn = pool.get().await.unwrap();
        conn.span.retire_at = Some(Instant::now() + renewal.lead() / 2);
        drop(conn);
        eventually("its replacement ready", || {
            renewal.spares().iter().any(|spare| spare.conn.is_some())
        })
        .await;

        drop(pool);
        let log = closed.lock().unwrap();
        assert_eq!(log.len(), 2, "the connection and its replacement");
        assert!(
            log.iter()
                .all(|closed_on| closed_on.lock().unwrap().is_some()),
            "a connection of the dropped pool left open"
        );
    }

    /// An idle connection whose replacement is ready takes it at a sweep, as at a checkout:
    /// the sweep left it in place, counted the connection as near its end, and had another
    /// opened besides.
    #[tokio::test]
    async fn an_idle_connection_takes_its_ready_replacement_at_a_sweep() {
        let (pool, closed) = one_idle(PROBE).await;
        let renewal = Arc::clone(pool.core.renewal.as_ref().unwrap());
        renewal.spares().push(spare(7, 7, None));
        let mut conn = pool.get().await.unwrap();
        conn.span.retire_at = Some(Instant::now() + renewal.lead() / 2);
        conn.span.replacement = Some(7);
        drop(conn);
        // Ready once its connection is back in the pool.
        let (fresh, _) = Probe::ending_in(99, Duration::from_secs(60), None);
        renewal.spares()[0].conn = Some(fresh);

        assert_eq!(pool.core.sweep(None), Some(1), "its replacement lasts");
        assert!(renewal.spares().is_empty(), "taken");
        eventually("the old one closed", || {
            closed.lock().unwrap()[0].lock().unwrap().is_some()
        })
        .await;
        assert_eq!(pool.get().await.unwrap().name, 99);
    }

    fn probe_check(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
        probe.checked = true;
        Box::pin(async { Ok(()) })
    }

    /// A sweep (or a pool closing) takes the idle connections out without their checks, in
    /// one synchronous pass on its own thread. A caller checking out on another thread at
    /// that moment (it had its turn before the pool closed) gets its connection checked all
    /// the same: one left inside a transaction by a cancelled `BEGIN` is rolled back before
    /// the caller's write, not after it was acknowledged.
    #[tokio::test]
    async fn a_checkout_on_another_thread_during_a_sweep_is_checked() {
        let kind = Kind {
            is_settled: |_| false,
            is_valid: probe_check,
            ..PROBE
        };
        let open: Open<Probe> = Arc::new(|| {
            Box::pin(async { Ok(Probe::ending_in(1, Duration::from_secs(600), None).0) })
        });
        let settings = PoolSettings::builder().max_size(1).build().unwrap();
        let pool = build(kind, open, &settings, &Registry::default(), CONNECT_TIMEOUT).unwrap();
        pool.get().await.unwrap().checked = false;
        let checked = {
            let _sweeping = Sweeping::start(&pool.core.sweeping);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async { pool.get().await.unwrap().checked })
                })
                .join()
                .unwrap()
            })
        };
        assert!(checked, "the checkout went out unchecked during the sweep");
    }

    /// A connection opened to keep `min_idle` is checked as it opens, as a replacement is:
    /// one that came back moments ago goes out without a check, and SeaORM's connections
    /// cannot tell without one that the server closed them before their first use.
    #[tokio::test]
    async fn connections_kept_for_min_idle_are_checked_as_they_open() {
        let kind = Kind {
            is_valid: probe_check,
            ..PROBE
        };
        let (pool, _) = one_idle(kind).await;
        assert!(pool.get().await.unwrap().checked);
    }

    /// Checks the first connection it is given without end, as a server that stopped
    /// answering between the login and the check would; passes the others.
    fn first_check_hangs(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
        if probe.name == 1 {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Ok(()) })
        }
    }

    /// A connection opened for `min_idle` whose check after login never ends gives up within
    /// the connect timeout, and the pool opens another: it stayed counted as opening, so no
    /// sweep ever opened one again, and it held its server connection until TCP gave up.
    #[tokio::test(start_paused = true)]
    async fn a_check_after_login_that_never_ends_gives_up_and_another_opens() {
        let (pool, closed) = one_idle(Kind {
            is_valid: first_check_hangs,
            ..PROBE
        })
        .await;
        assert_eq!(pool.get().await.unwrap().name, 2, "the second one opened");
        assert!(
            closed.lock().unwrap()[0].lock().unwrap().is_some(),
            "the one whose check never ended is closed"
        );
    }

    /// Never ends the check of a connection checked once before (at checkout, not after
    /// its login).
    fn second_check_hangs(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
        if std::mem::replace(&mut probe.checked, true) {
            Box::pin(std::future::pending())
        } else {
            Box::pin(async { Ok(()) })
        }
    }

    /// A connection whose checkout check was cut off (its caller gave up, or was dropped)
    /// is closed: it went back to the pool as idle, and the next caller spent the check
    /// timeout on it again (5 s by default), as each caller after would while its server
    /// stays silent.
    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_check_was_cut_off_is_closed() {
        let (pool, closed) = one_idle(Kind {
            is_settled: |_| false,
            is_valid: second_check_hangs,
            ..PROBE
        })
        .await;
        let cut = tokio::time::timeout(Duration::from_millis(100), pool.get()).await;
        assert!(cut.is_err(), "its check never ends");
        let started = tokio::time::Instant::now();
        let conn = pool.get().await.unwrap();
        assert_eq!(
            (conn.name, started.elapsed()),
            (2, Duration::ZERO),
            "the next checkout checked the same silent connection again"
        );
        assert!(closed.lock().unwrap()[0].lock().unwrap().is_some());
    }

    /// A caller that times out because the pool's connections failed their checks (a
    /// server that went silent) learns that: it was told the pool was exhausted, or still
    /// opening one, and nothing of the checks.
    #[tokio::test(start_paused = true)]
    async fn a_checkout_that_times_out_on_failed_checks_says_so() {
        let opened = Arc::new(AtomicBool::new(false));
        let open: Open<Probe> = Arc::new(move || match opened.swap(true, Ordering::Relaxed) {
            false => Box::pin(async { Ok(Probe::ending_in(1, Duration::from_secs(600), None).0) }),
            true => Box::pin(std::future::pending()),
        });
        let settings = PoolSettings::builder()
            .max_size(1)
            .acquire_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let kind = Kind {
            is_settled: |_| false,
            is_valid: second_check_hangs,
            ..PROBE
        };
        let pool = build(kind, open, &settings, &Registry::default(), CONNECT_TIMEOUT).unwrap();
        drop(pool.get().await.unwrap());
        let timed_out = pool.get().await.map(drop).unwrap_err();
        let chain = ErrorChain(&timed_out).to_string();
        assert!(chain.contains("no answer to its check"), "{chain}");
    }

    /// A pool of two whose one idle connection (named 1) `is_valid` checks at every checkout,
    /// and whose later connects are refused after 50 ms.
    async fn one_idle_then_refused(
        is_valid: IsValid<Probe>,
    ) -> (Pool<Probe>, Arc<Mutex<Vec<ClosedOn>>>) {
        let (open, closed) = counted_probes();
        let opened = Arc::new(AtomicBool::new(false));
        let open: Open<Probe> = Arc::new(move || match opened.swap(true, Ordering::Relaxed) {
            false => open(),
            true => Box::pin(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(Error::Unreachable {
                    endpoint: "db.internal:5432".into(),
                    source: "connection refused".into(),
                })
            }),
        });
        let settings = PoolSettings::builder().max_size(2).build().unwrap();
        let kind = Kind {
            is_settled: |_| false,
            is_valid,
            ..PROBE
        };
        let pool = build(kind, open, &settings, &Registry::default(), CONNECT_TIMEOUT).unwrap();
        drop(pool.get().await.unwrap());
        (pool, closed)
    }

    /// Passes the first check of a connection; fails the next after 100 ms, as a server gone
    /// silent would.
    fn second_check_fails_slowly(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
        let first = !std::mem::replace(&mut probe.checked, true);
        Box::pin(async move {
            if first {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(Error::Pool("no answer".to_owned()))
        })
    }

    /// A caller that gave back another's failure while its connection was in its check, and
    /// whose check then failed, takes the failure of the connect bb8 then runs for it: it no
    /// longer took any failure, and waited out the acquire timeout.
    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gave_a_failure_back_takes_its_own() {
        let (pool, _) = one_idle_then_refused(second_check_fails_slowly).await;
        let started = tokio::time::Instant::now();
        let timed = || async {
            let got = pool.get().await.map(|conn| conn.name);
            (got, started.elapsed())
        };
        let ((checking, waited), (waiting, _)) = tokio::join!(timed(), timed());
        assert!(matches!(waiting, Err(Error::Connect { .. })), "{waiting:?}");
        assert!(
            matches!(checking, Err(Error::Connect { .. })) && waited < Duration::from_secs(1),
            "{checking:?} after {waited:?}"
        );
    }

    /// A replacement whose opening panics (a custom credential source's panic, which the
    /// token cache passes on) leaves the pool's list of replacements: it stayed there as
    /// one still logging in, and the connection it was for served on past its end for the
    /// grace, then was retired with a login on the request path.
    #[tokio::test(start_paused = true)]
    async fn a_replacement_whose_opening_panics_leaves_the_list() {
        let renewal = Arc::new(Renewal::new("probe", Duration::from_secs(60), 0.0));
        let manager = Manager {
            open: Arc::new(|| Box::pin(async { panic!("a credential source that panics") })),
            ..probe_manager(&renewal)
        };
        assert!(manager.open_spare(&renewal).is_some());
        eventually("the replacement leaves the list", || {
            renewal.spares().is_empty()
        })
        .await;
    }

    /// Passes every check after 100 ms.
    fn slow_check(_: &mut Probe) -> BoxFuture<'_, Result<()>> {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        })
    }

    /// A failed connect goes to a caller waiting for a connection, not to one whose
    /// connection is being checked: that caller failed with another's connect error though it
    /// had a working connection in hand, the connection was closed (its check cut off), and
    /// the caller the connect was for waited out the acquire timeout.
    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_goes_to_a_waiting_caller_not_to_one_checking() {
        let (pool, closed) = one_idle_then_refused(slow_check).await;
        let (checking, waiting) = tokio::join!(pool.get(), pool.get());
        let checking = checking.map(|conn| conn.name);
        assert!(matches!(checking, Ok(1)), "{checking:?}");
        let waiting = waiting.map(|conn| conn.name);
        assert!(matches!(waiting, Err(Error::Connect { .. })), "{waiting:?}");
        assert!(closed.lock().unwrap()[0].lock().unwrap().is_none());
    }

    /// Panics checking the first connection it is given; passes the others.
    fn first_check_panics(probe: &mut Probe) -> BoxFuture<'_, Result<()>> {
        assert_ne!(probe.name, 1, "a check that panics");
        Box::pin(async { Ok(()) })
    }

    /// A connection opened for `min_idle` whose opening panics (a custom credential source's
    /// panic, which the token cache passes on) no longer counts as opening, and the next sweep
    /// opens another: it stayed counted, so the pool never kept `min_idle` again.
    #[tokio::test(start_paused = true)]
    async fn an_opening_that_panics_stops_counting_and_another_opens() {
        let (pool, _) = one_idle(Kind {
            is_valid: first_check_panics,
            ..PROBE
        })
        .await;
        assert_eq!(pool.get().await.unwrap().name, 2, "the second one opened");
    }

    /// A sweep takes every idle connection out for a moment: bb8 opens one whenever its idle
    /// ones fall below its `min_idle`, so each sweep opened connections until the pool was full.
    #[tokio::test(start_paused = true)]
    async fn sweeps_open_no_connection() {
        let (open, closed) = counted_probes();
        let settings = PoolSettings::builder()
            .max_size(8)
            .min_idle(1)
            .max_lifetime(Some(Duration::from_secs(1)))
            .build()
            .unwrap();
        let pool = probe_pool(open, &settings);
        drop([pool.get().await.unwrap(), pool.get().await.unwrap()]);
        // Paused: tokio's clock runs the sweeps; the connections' lifetimes stand still.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let opened = closed.lock().unwrap().len();
        assert!(
            opened <= 3,
            "two callers and min_idle 1 need 2 or 3 connections; {opened} opened"
        );
        assert_eq!(pool.state().connections as usize, opened, "none closed");
    }

    /// A spare numbered `number` asked for by `owner`, ready as `conn` or still logging in.
    fn spare(number: u64, owner: u64, conn: Option<Probe>) -> Spare<Probe> {
        Spare {
            number,
            owner,
            conn,
        }
    }

    /// The name of the connection `found`, if it is one.
    fn ready(found: Replacement<Probe>) -> Option<u64> {
        match found {
            Replacement::Ready(conn) => Some(conn.name),
            Replacement::Coming | Replacement::Gone => None,
        }
    }

    #[tokio::test]
    async fn each_connection_takes_the_replacement_opened_for_it_unless_out_of_time() {
        let renewal = Renewal::<Probe>::new("probe", Duration::from_secs(60), 0.0);
        for number in [1, 2] {
            let (conn, _) = Probe::ending_in(10 + number, Duration::from_secs(60), None);
            renewal.spares().push(spare(number, number, Some(conn)));
        }
        let (stale, stale_closed_on) = Probe::ending_in(13, Duration::ZERO, None);
        renewal.spares().push(spare(3, 3, Some(stale)));
        renewal.spares().push(spare(4, 4, None));
        let now = Instant::now();
        let take = |own, expired| renewal.take_spare(probe_span, now, own, expired);

        assert_eq!(ready(take(2, false)), Some(12), "its own");
        assert!(
            matches!(take(4, false), Replacement::Coming),
            "one whose replacement is not ready waits for it"
        );
        assert!(
            matches!(take(3, true), Replacement::Gone),
            "a spare past its own end is never handed out"
        );
        assert!(
            matches!(take(5, true), Replacement::Gone),
            "one whose replacement could not open has none coming"
        );
        while stale_closed_on.lock().unwrap().is_none() {
            tokio::task::yield_now().await;
        }
    }

    /// One past its lifetime whose replacement is still logging in takes one that is ready,
    /// and the connection that one was for gets its replacement in exchange: before, it was
    /// left with none until its own end, and the one still logging in was closed unclaimed.
    #[test]
    fn one_out_of_time_takes_a_ready_replacement_and_gives_its_own_in_exchange() {
        let renewal = Renewal::<Probe>::new("probe", Duration::from_secs(60), 0.0);
        let (conn, _) = Probe::ending_in(11, Duration::from_secs(60), None);
        renewal.spares().push(spare(1, 1, Some(conn)));
        renewal.spares().push(spare(2, 2, None));
        let now = Instant::now();
        let take = |own, expired| renewal.take_spare(probe_span, now, own, expired);

        assert_eq!(
            ready(take(2, true)),
            Some(11),
            "the one out of time need not wait"
        );
        assert!(
            matches!(take(1, false), Replacement::Coming),
            "the one it took from is owed the replacement still logging in"
        );
        let (conn, _) = Probe::ending_in(12, Duration::from_secs(60), None);
        renewal.spares()[0].conn = Some(conn);
        assert_eq!(
            ready(take(1, false)),
            Some(12),
            "and takes it once ready, before its own end"
        );
        assert!(
            matches!(take(2, true), Replacement::Gone),
            "the one out of time owns nothing more"
        );
    }

    #[test]
    fn replacements_open_ahead_by_more_than_recent_logins_take() {
        let short = Renewal::<()>::new("probe", Duration::from_secs(1), 0.1);
        assert_eq!(short.lead(), Duration::from_millis(250));
        assert_eq!(short.grace(), Duration::from_secs(1), "the lifetime again");
        short.logged_in(Duration::from_millis(100));
        assert_eq!(short.lead(), Duration::from_millis(300));
        short.logged_in(Duration::from_secs(2));
        assert_eq!(
            short.lead(),
            Duration::from_millis(500),
            "half the lifetime at most"
        );

        let long = Renewal::<()>::new("probe", Duration::from_secs(55 * 60), 0.1);
        assert_eq!(long.lead(), Duration::from_secs(30));
        // An endpoint waking from zero.
        long.logged_in(Duration::from_secs(20));
        assert_eq!(long.lead(), Duration::from_secs(60));
        assert_eq!(long.grace(), Duration::from_secs(30), "30 s at most");
        // The slowest login fades as faster ones follow.
        for _ in 0..64 {
            long.logged_in(Duration::from_millis(50));
        }
        assert_eq!(long.lead(), Duration::from_secs(30));
    }
}
