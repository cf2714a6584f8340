//! The token cache: one fetch at a time, refreshed ahead of expiry, the last good token kept
//! while it is still valid.
//!
//! Reading a cached token is one atomic load and a clock read (no lock); only a refresh takes
//! the single-flight lock, so a thousand connections opening at once cause one fetch.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use futures_util::FutureExt as _;
use tokio::task::JoinHandle;

use crate::config::{CacheSettings, TokenStrategy};
use crate::credentials::{Clock, CredentialSource, SystemClock, Token};
use crate::error::{Error, ErrorChain, Result};
use crate::retry::Backoff;
use crate::telemetry;

/// A called-back function that receives every new token before the refresh returns, and
/// answers whether it still listens; called with `None`, it only answers.
type Listener = Box<dyn Fn(Option<&Token>) -> bool + Send + Sync>;

/// Caches the tokens of one [`CredentialSource`]. Cheap to clone: clones share the cache.
///
/// The background refresher of the eager strategy stops when [`shutdown`](Self::shutdown) is
/// called or the last clone is dropped.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn CredentialSource>,
    strategy: TokenStrategy,
    settings: CacheSettings,
    clock: Arc<dyn Clock>,
    current: ArcSwapOption<Entry>,
    /// Milliseconds since the epoch before which a failed refresh is not tried again while
    /// the current token is still valid.
    retry_after_ms: AtomicU64,
    /// Held by the one fetch in flight (see [`TokenCache::refresh`]).
    flight: Arc<tokio::sync::Mutex<()>>,
    /// Wakes a fetch waiting out a failure's pause when the server refused the token.
    invalidated: tokio::sync::Notify,
    listeners: Mutex<Vec<Listener>>,
    /// A copy of the last fetch's error, if it was a refusal that left no valid token, for
    /// the callers that waited on it.
    failed: Mutex<Option<Error>>,
    /// A copy of the last failed attempt of a fetch, and when it failed, until a token is
    /// fetched: what a caller that ran out of time waiting for a token is told.
    last_failure: Mutex<Option<(tokio::time::Instant, Error)>>,
    refresher: Mutex<Option<JoinHandle<()>>>,
    /// [`TokenCache::keep_fresh`] was called: the refresher runs for good.
    kept_fresh: AtomicBool,
    /// Set by [`TokenCache::shutdown`], for good.
    shut_down: AtomicBool,
    /// Tokens the server refused since it last accepted one (see [`TokenCache::invalidate`]).
    refused_in_a_row: AtomicU32,
    fetches: AtomicU64,
    failures: AtomicU64,
}

struct Entry {
    token: Arc<Token>,
    /// When to fetch the next one; `None` for tokens that never expire.
    refresh_at: Option<SystemTime>,
    /// Kept after the server refused it (see [`TokenCache::invalidate`]): its pause is set.
    refused: bool,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("source", &self.inner.source.kind())
            .field("strategy", &self.inner.strategy)
            .field("expires_at", &self.expires_at().map(crate::error::utc))
            .field("fetches", &self.fetches())
            .finish()
    }
}

impl TokenCache {
    /// A cache in front of `source`. Nothing is fetched until [`start`](Self::start) or
    /// [`token`](Self::token).
    pub fn new(
        source: Arc<dyn CredentialSource>,
        strategy: TokenStrategy,
        settings: CacheSettings,
    ) -> Self {
        Self::with_clock(source, strategy, settings, Arc::new(SystemClock))
    }

    /// Like [`new`](Self::new), with the clock replaced (for tests).
    pub fn with_clock(
        source: Arc<dyn CredentialSource>,
        strategy: TokenStrategy,
        settings: CacheSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                strategy,
                settings,
                clock,
                current: ArcSwapOption::empty(),
                retry_after_ms: AtomicU64::new(0),
                flight: Arc::default(),
                invalidated: tokio::sync::Notify::new(),
                listeners: Mutex::new(Vec::new()),
                failed: Mutex::new(None),
                last_failure: Mutex::new(None),
                refresher: Mutex::new(None),
                kept_fresh: AtomicBool::new(false),
                shut_down: AtomicBool::new(false),
                refused_in_a_row: AtomicU32::new(0),
                fetches: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// Starts the cache: the eager strategy fetches its first token now and starts the
    /// background refresher; the others do nothing.
    pub async fn start(&self) -> Result<()> {
        if self.inner.strategy == TokenStrategy::Eager {
            self.token().await?;
            self.keep_fresh();
        }
        Ok(())
    }

    /// The strategy this cache follows.
    pub fn strategy(&self) -> TokenStrategy {
        self.inner.strategy
    }

    /// The kind of the credential source, such as `lakebase`.
    pub fn source_kind(&self) -> &'static str {
        self.inner.source.kind()
    }

    /// A token for a new connection: the cached one while it is fresh, else a new one.
    ///
    /// Concurrent callers share one fetch, and its refusal: a caller that waited on a fetch
    /// that failed for good (HTTP 403, say: not [retryable](Error::is_retryable)) and left no
    /// valid token gets a copy of its error, not a fetch of its own. When a refresh fails but
    /// the cached token is still valid, the cached token is returned (and the refresh tried
    /// again later).
    pub async fn token(&self) -> Result<Arc<Token>> {
        match self.try_token() {
            Some(token) => Ok(token),
            None => self.refresh(false).await,
        }
    }

    /// Whether the current token is one kept after a refusal, through the pause before the
    /// next fetch.
    fn refused_pausing(&self) -> bool {
        let now = millis(self.inner.clock.now());
        self.inner
            .current
            .load()
            .as_ref()
            .is_some_and(|e| e.refused)
            && now < self.retry_after()
    }

    /// The cached token if it needs no refresh now, without waiting: one atomic load and a
    /// clock read, no lock. `None` means [`token`](Self::token) would fetch. Uncached, a
    /// token is kept only through the pause after a refusal (see
    /// [`invalidate`](Self::invalidate)).
    pub fn try_token(&self) -> Option<Arc<Token>> {
        match self.inner.strategy {
            TokenStrategy::Uncached => self.cached_fresh().filter(|_| self.refused_pausing()),
            _ => self.cached_fresh(),
        }
    }

    /// The cached token if it needs no refresh now: one atomic load, no lock.
    fn cached_fresh(&self) -> Option<Arc<Token>> {
        let guard = self.inner.current.load();
        let entry = guard.as_ref()?;
        let now = self.inner.clock.now();
        match entry.refresh_at {
            None => Some(Arc::clone(&entry.token)),
            Some(at) if now < at => Some(Arc::clone(&entry.token)),
            // Due for refresh, but the last attempt failed recently: keep serving it.
            Some(_) if is_valid(&entry.token, now) && millis(now) < self.retry_after() => {
                Some(Arc::clone(&entry.token))
            }
            Some(_) => None,
        }
    }

    /// The last token fetched, fresh or not, without fetching.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner
            .current
            .load()
            .as_ref()
            .map(|e| Arc::clone(&e.token))
    }

    /// When the current token expires, if there is one and it expires.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.current()?.expires_at()
    }

    /// How many tokens the source has produced so far.
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// How many refreshes failed (after their retries).
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Forgets `token` (when the server refused it), so the next caller fetches a new one.
    /// Does nothing if a newer token has replaced it already.
    ///
    /// A token refused right after a refusal (no login [accepted](Self::accepted) between)
    /// is not the token's fault: the server's LDAP back end is down, say, or the role may no
    /// longer log in. That one is kept, and the next fetch waits a pause that doubles with
    /// each such refusal, from the cache's shortest backoff to its longest, so that the
    /// connects meanwhile get the server's refusal without a fetch each.
    pub fn invalidate(&self, token: &Arc<Token>) {
        let inner = &self.inner;
        let current = inner.current.load();
        // Decided by the swap: of several connects refused with one token at once, the
        // first to swap counts the refusal, and the others find the token gone.
        let refused = inner.refused_in_a_row.load(Ordering::Relaxed);
        // Gone, replaced, or kept after a refusal with its pause set, and no login accepted
        // since: a refusal of it then would only push the pause on.
        let Some(entry) = current
            .as_ref()
            .filter(|e| Arc::ptr_eq(&e.token, token) && !(e.refused && refused > 0))
        else {
            return;
        };
        let now = inner.clock.now();
        let kept = (refused > 0).then(|| {
            Arc::new(Entry {
                token: Arc::clone(&entry.token),
                refresh_at: Some(now),
                refused: true,
            })
        });
        let before = inner.current.compare_and_swap(&*current, kept);
        let swapped = match (&*before, &*current) {
            (Some(before), Some(current)) => Arc::ptr_eq(before, current),
            _ => false,
        };
        if !swapped {
            return;
        }
        inner.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
        if refused == 0 {
            inner.retry_after_ms.store(0, Ordering::Relaxed);
            inner.invalidated.notify_waiters();
            return;
        }
        let backoff = Backoff::new(inner.settings.min_backoff, inner.settings.max_backoff, 0.0);
        inner
            .retry_after_ms
            .store(millis(now + backoff.delay(refused)), Ordering::Relaxed);
    }

    /// Notes that the server accepted a login: the next refusal is met with a fetch at once
    /// (see [`invalidate`](Self::invalidate)). Cheap: one atomic load when nothing was refused.
    pub fn accepted(&self) {
        if self.inner.refused_in_a_row.load(Ordering::Relaxed) != 0 {
            self.inner.refused_in_a_row.store(0, Ordering::Relaxed);
        }
    }

    /// Calls `listener` with every new token, before the refresh that fetched it returns,
    /// until it answers `false` (its pool closed, say) or the cache [shuts down](Self::shutdown);
    /// not at all once it has. This is how pools that cannot ask for a password (sqlx) are
    /// kept up to date.
    pub fn on_refresh(&self, listener: impl Fn(&Token) -> bool + Send + Sync + 'static) {
        self.listen(move |token| token.is_none_or(&listener));
    }

    /// Like [`on_refresh`](Self::on_refresh), for a listener that can tell whether it still
    /// listens without a token (`None`): one that no longer does leaves at the next
    /// registration or count ([`listeners`](Self::listeners)), not only at the next token,
    /// which a static password never brings.
    #[cfg(feature = "seaorm")]
    pub(crate) fn on_refresh_while(
        &self,
        listener: impl Fn(Option<&Token>) -> bool + Send + Sync + 'static,
    ) {
        self.listen(listener);
    }

    fn listen(&self, listener: impl Fn(Option<&Token>) -> bool + Send + Sync + 'static) {
        let mut listeners = self.live_listeners();
        if !self.inner.shut_down.load(Ordering::SeqCst) {
            listeners.push(Box::new(listener));
        }
    }

    /// What the credential source last answered, if a fetch attempt failed since the last
    /// token and late enough to hold up a caller waiting since `since`: during its wait, or
    /// just before, the pause it asked for (at most the longest backoff) still running.
    pub(crate) fn failure_holding_up(&self, since: tokio::time::Instant) -> Option<Error> {
        let last = self
            .inner
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (at, failure) = last.as_ref()?;
        (*at + self.inner.settings.max_backoff >= since)
            .then(|| failure.duplicate(self.inner.source.kind()))
    }

    /// What holds up a connection that needs a token now, as
    /// [`failure_holding_up`](Self::failure_holding_up) tells, unless a valid token is
    /// cached: a connection then opens with it while the refresh fails.
    pub(crate) fn failure_holding_up_connects(&self, since: tokio::time::Instant) -> Option<Error> {
        let cached = self.inner.strategy != TokenStrategy::Uncached
            && self
                .current()
                .is_some_and(|token| is_valid(&token, self.inner.clock.now()));
        if cached {
            return None;
        }
        self.failure_holding_up(since)
    }

    /// How many listeners are registered.
    pub fn listeners(&self) -> usize {
        self.live_listeners().len()
    }

    /// The listeners, less those that no longer listen.
    fn live_listeners(&self) -> std::sync::MutexGuard<'_, Vec<Listener>> {
        let mut listeners = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        listeners.retain(|listener| listener(None));
        listeners
    }

    /// Keeps the token fresh in the background from now on, whatever the strategy: for pools
    /// that open connections with whatever token they were last given. Does nothing once the
    /// cache has [shut down](Self::shutdown).
    pub fn keep_fresh(&self) {
        self.inner.kept_fresh.store(true, Ordering::SeqCst);
        self.start_refresher();
    }

    /// Keeps the token fresh in the background while a listener
    /// ([`on_refresh`](Self::on_refresh)) is registered, for a pool that registered one: under
    /// the lazy and uncached strategies, the refresher stops at the first refresh that finds
    /// none left (their pools closed), unless [`keep_fresh`](Self::keep_fresh) was called.
    #[cfg(any(feature = "seaorm", test))]
    pub(crate) fn keep_fresh_while_listened(&self) {
        self.start_refresher();
    }

    fn start_refresher(&self) {
        let mut slot = self
            .inner
            .refresher
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.inner.shut_down.load(Ordering::SeqCst)
            || slot.as_ref().is_some_and(|task| !task.is_finished())
        {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        *slot = Some(tokio::spawn(refresh_loop(weak)));
    }

    /// Stops the background refresher and forgets the listeners, for good: a pool built as
    /// its connector shuts down must not start them again. Tokens can still be fetched on
    /// demand.
    pub fn shutdown(&self) {
        self.inner.shut_down.store(true, Ordering::SeqCst);
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        if let Some(task) = self
            .inner
            .refresher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }

    /// Fetches a new token unless another caller just did; `force` fetches one even when the
    /// current token needs no refresh yet, unless another fetch replaced it meanwhile.
    ///
    /// A caller waits for a fetch, its own or one in flight, only when it has no valid token
    /// to use meanwhile: a slow or failing service (retries, `Retry-After` pauses) never holds
    /// up connections while the current token still logs in. The caller that finds the token
    /// due starts the fetch and goes on with the token it has.
    ///
    /// The fetch runs on a task of its own, which holds the single-flight lock: a caller that
    /// stops waiting (its connect timed out, its future was dropped) leaves it to finish, so
    /// that its token, or its failure and the service's `Retry-After`, serves the callers
    /// after it, and a slow service is not asked again from the start by every new connect.
    async fn refresh(&self, force: bool) -> Result<Arc<Token>> {
        let inner = &self.inner;
        let seen = inner.current.load_full();
        let failures = inner.failures.load(Ordering::Relaxed);
        let flight = match Arc::clone(&inner.flight).try_lock_owned() {
            Ok(flight) => flight,
            Err(_) => {
                if !force
                    && inner.strategy != TokenStrategy::Uncached
                    && let Some(entry) = &seen
                    && is_valid(&entry.token, inner.clock.now())
                {
                    return Ok(Arc::clone(&entry.token));
                }
                Arc::clone(&inner.flight).lock_owned().await
            }
        };
        if inner.strategy != TokenStrategy::Uncached {
            let now_entry = inner.current.load_full();
            let replaced = match (&seen, &now_entry) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, Some(_)) => true,
                _ => false,
            };
            // Another fetch installed a token while this caller waited for it: a forced
            // refresh wanted no more than a new one.
            // Or installed one before this caller looked (`seen` is already the new one).
            match now_entry {
                Some(entry) if replaced && force => return Ok(Arc::clone(&entry.token)),
                _ if !force && let Some(token) = self.cached_fresh() => return Ok(token),
                _ => {}
            }
        }
        // A fetch was refused while this caller waited: its refusal, not another call to the
        // service (200 connects waiting on a refusal made 200 calls, one by one). A failure
        // that may pass (a timeout, HTTP 503) is tried again, one fetch at a time.
        if inner.failures.load(Ordering::Relaxed) != failures
            && let Some(failed) = &*inner.failed.lock().unwrap_or_else(|e| e.into_inner())
        {
            return Err(failed.duplicate(inner.source.kind()));
        }
        let cache = self.clone();
        let fetch = tokio::spawn(async move {
            let _flight = flight;
            cache.fetch_and_keep().await
        });
        if !force
            && inner.strategy != TokenStrategy::Uncached
            && let Some(entry) = inner.current.load_full()
            && is_valid(&entry.token, inner.clock.now())
        {
            return Ok(Arc::clone(&entry.token));
        }
        match fetch.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::Credential {
                source_kind: inner.source.kind(),
                source: Box::new(e),
            }),
        }
    }

    /// Fetches a token (with retries), once the pause the last failure asked for is over, and
    /// installs it; after a failure, notes when to try again and returns the current token
    /// while it is still valid.
    async fn fetch_and_keep(&self) -> Result<Arc<Token>> {
        let inner = &self.inner;
        // The pause the last failure asked for (the service's `Retry-After`, or the backoff),
        // whoever starts the next fetch: a caller with no token waits it out too. Unless the
        // server refuses the token meanwhile: a new one is wanted at once.
        let invalidated = inner.invalidated.notified();
        // At most the longest backoff, which is all a failure asks for: a wall clock stepped
        // back would otherwise lengthen it.
        let pause = self
            .retry_after()
            .saturating_sub(millis(inner.clock.now()))
            .min(u64::try_from(inner.settings.max_backoff.as_millis()).unwrap_or(u64::MAX));
        if pause > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(pause)) => {}
                () = invalidated => {}
            }
        }
        match self.fetch_with_retries().await {
            Ok((token, took)) => Ok(self.install(token, took)),
            Err(e) => {
                inner.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(telemetry::TOKEN_REFRESH_FAILURES, "source" => inner.source.kind())
                    .increment(1);
                let now = inner.clock.now();
                let backoff = inner.settings.max_backoff.min(Duration::from_secs(1)).max(
                    e.retry_after()
                        .unwrap_or_default()
                        .min(inner.settings.max_backoff),
                );
                inner
                    .retry_after_ms
                    .store(millis(now + backoff), Ordering::Relaxed);
                let kept = inner
                    .current
                    .load_full()
                    .filter(|entry| is_valid(&entry.token, now));
                // The callers that waited on this fetch share its failure only when it is a
                // refusal and leaves them no token: with one still valid, they get that (as
                // this caller does); after a failure that may pass, they ask again.
                *inner.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                    (kept.is_none() && !e.is_retryable()).then(|| e.duplicate(inner.source.kind()));
                match kept {
                    Some(entry) => {
                        tracing::warn!(
                            source = inner.source.kind(),
                            error = %ErrorChain(&e),
                            remaining_s = remaining(&entry.token, now).as_secs(),
                            "token refresh failed; the current token is still valid and stays in use"
                        );
                        Ok(Arc::clone(&entry.token))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// A new token, and how long the successful fetch took.
    async fn fetch_with_retries(&self) -> Result<(Token, Duration)> {
        let inner = &self.inner;
        let backoff = Backoff::new(inner.settings.min_backoff, inner.settings.max_backoff, 0.0);
        let mut attempt = 1;
        loop {
            let started = tokio::time::Instant::now();
            // A panic in the source fails this fetch, where the next is tried as after any
            // failure: raised again, it ended the task that fetched (the refresher, or the
            // pool's task opening a connection) for good.
            let fetched = std::panic::AssertUnwindSafe(async { inner.source.fetch().await })
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    let e = Error::source_panicked(inner.source.kind(), &*panic);
                    tracing::error!(error = %ErrorChain(&e), "token fetch failed");
                    Err(e)
                });
            let result = fetched.and_then(|token| {
                let now = inner.clock.now();
                match token.expires_at() {
                    Some(at) if at <= now => Err(Error::TokenExpired {
                        source_kind: inner.source.kind(),
                        expires_at: at,
                        now,
                    }),
                    _ => Ok(token),
                }
            });
            if let Err(e) = &result {
                *inner.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((
                    tokio::time::Instant::now(),
                    e.duplicate(inner.source.kind()),
                ));
            }
            match result {
                Ok(token) => {
                    inner.fetches.fetch_add(1, Ordering::Relaxed);
                    let source = inner.source.kind();
                    metrics::counter!(telemetry::TOKEN_REFRESHES, "source" => source).increment(1);
                    if token.expires_at().is_some() {
                        let left = remaining(&token, inner.clock.now());
                        metrics::gauge!(telemetry::TOKEN_REMAINING_SECONDS, "source" => source)
                            .set(left.as_secs_f64());
                    }
                    if token.expires_at().is_none() && source == "static" {
                        // A fixed password is read, not fetched: nothing to tell.
                        tracing::debug!("using the static password");
                    } else {
                        tracing::info!(
                            source,
                            duration_ms = started.elapsed().as_millis() as u64,
                            remaining_s =
                                token
                                    .expires_at()
                                    .map(|_| remaining(&token, inner.clock.now()).as_secs()),
                            "token fetched"
                        );
                    }
                    return Ok((token, started.elapsed()));
                }
                Err(e) if attempt < inner.settings.attempts && e.is_retryable() => {
                    tracing::debug!(
                        source = inner.source.kind(),
                        attempt,
                        error = %ErrorChain(&e),
                        "token fetch failed; retrying"
                    );
                    // The service's own Retry-After, when longer, within max_backoff.
                    let delay = backoff.delay(attempt).max(
                        e.retry_after()
                            .unwrap_or_default()
                            .min(inner.settings.max_backoff),
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores a new token and tells the listeners; returns it.
    ///
    /// The refresh starts ahead of expiry by the margin, and by at least twice what this fetch
    /// took (within half the token's life): a slow service still answers before the token
    /// runs out. With the jitter, it starts no earlier than a quarter into the token's life:
    /// a margin as long as the token's life would have it fetched again at once, without end.
    fn install(&self, token: Token, took: Duration) -> Arc<Token> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let refresh_at = token.expires_at().map(|expires| {
            let life = expires.duration_since(now).unwrap_or_default();
            let margin = inner
                .settings
                .refresh_margin
                .unwrap_or_else(|| (life / 5).min(Duration::from_secs(300)))
                .max((took * 2).min(life / 2));
            let jitter = life.mul_f64(inner.settings.jitter * fastrand::f64());
            let lead = (margin + jitter).min(life - life / 4);
            expires
                .checked_sub(lead)
                .filter(|at| *at > now)
                .unwrap_or(now)
        });
        let token = Arc::new(token);
        inner.current.store(Some(Arc::new(Entry {
            token: Arc::clone(&token),
            refresh_at,
            refused: false,
        })));
        inner.retry_after_ms.store(0, Ordering::Relaxed);
        *inner.failed.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *inner.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|listener| listener(Some(&token)));
        token
    }

    fn retry_after(&self) -> u64 {
        self.inner.retry_after_ms.load(Ordering::Relaxed)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .refresher
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// The background refresher: sleeps until the current token is due, refreshes it, and backs
/// off after failures. Holds only a weak reference, so it never keeps the cache alive.
async fn refresh_loop(weak: Weak<Inner>) {
    // Consecutive rounds that did not produce a fresh token.
    let mut failed_rounds = 0;
    loop {
        let wait = {
            let Some(inner) = weak.upgrade() else { return };
            let now = inner.clock.now();
            let backoff = match failed_rounds {
                0 => Duration::ZERO,
                // No sooner than the service's `Retry-After`, as noted by the failed round.
                n => Backoff::new(inner.settings.min_backoff, inner.settings.max_backoff, 0.0)
                    .delay(n)
                    .max(Duration::from_millis(
                        inner
                            .retry_after_ms
                            .load(Ordering::Relaxed)
                            .saturating_sub(millis(now)),
                    )),
            };
            match inner.current.load().as_ref().map(|e| e.refresh_at) {
                Some(None) => return, // never expires
                Some(Some(at)) => at.duration_since(now).unwrap_or_default().max(backoff),
                None => backoff,
            }
        };
        // The schedule is by the wall clock, the sleep by the monotonic one, which stops while
        // the machine is suspended: a long sleep is cut into pieces, each followed by a look
        // at the wall clock, so that a refresh due during a suspension happens on waking.
        tokio::time::sleep(wait.min(WALL_CLOCK_CHECK)).await;
        let Some(inner) = weak.upgrade() else { return };
        let cache = TokenCache { inner };
        // Another caller fetched meanwhile (the token was invalidated, say): nothing is due.
        if cache.cached_fresh_by_schedule() {
            failed_rounds = 0;
            continue;
        }
        match cache.refresh(true).await {
            Ok(_) if cache.cached_fresh_by_schedule() => failed_rounds = 0,
            // Either the refresh failed outright, or it kept serving the old token.
            _ => failed_rounds += 1,
        }
        // Asked for by pools only (`keep_fresh_while_listened`), and their listeners all let
        // go. Under the slot's lock, which starting a refresher takes too: a pool registering
        // meanwhile either is seen here or finds the slot empty and starts another.
        if cache.inner.strategy != TokenStrategy::Eager
            && !cache.inner.kept_fresh.load(Ordering::SeqCst)
        {
            let mut slot = cache
                .inner
                .refresher
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if cache.listeners() == 0 {
                slot.take();
                return;
            }
        }
    }
}

/// The longest the background refresher sleeps before it looks at the wall clock again.
const WALL_CLOCK_CHECK: Duration = Duration::from_secs(30);

impl TokenCache {
    /// Whether the current token is not yet due for refresh (ignores retry back-off).
    fn cached_fresh_by_schedule(&self) -> bool {
        let now = self.inner.clock.now();
        self.inner
            .current
            .load()
            .as_ref()
            .is_some_and(|e| e.refresh_at.is_none_or(|at| now < at))
    }

    /// Whether `token` has not expired, by this cache's clock.
    pub(crate) fn unexpired(&self, token: &Token) -> bool {
        is_valid(token, self.inner.clock.now())
    }
}

fn is_valid(token: &Token, now: SystemTime) -> bool {
    token.expires_at().is_none_or(|at| now < at)
}

fn remaining(token: &Token, now: SystemTime) -> Duration {
    token
        .expires_at()
        .and_then(|at| at.duration_since(now).ok())
        .unwrap_or_default()
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::BoxFuture;
    use crate::error::Setting;
    use std::sync::atomic::AtomicUsize;

    /// Wall-clock time that follows tokio's (paused) clock, plus the seconds it was set
    /// ahead by (a suspended machine's wall clock goes on, its monotonic clock does not).
    struct TokioClock {
        base: SystemTime,
        start: tokio::time::Instant,
        ahead_s: std::sync::atomic::AtomicU64,
    }

    impl TokioClock {
        /// A clock at a fixed date, from tokio's present instant on.
        fn starting_now() -> Arc<Self> {
            Arc::new(Self {
                base: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                start: tokio::time::Instant::now(),
                ahead_s: 0.into(),
            })
        }
    }

    impl Clock for TokioClock {
        fn now(&self) -> SystemTime {
            self.base
                + self.start.elapsed()
                + Duration::from_secs(self.ahead_s.load(Ordering::SeqCst))
        }
    }

    /// Issues numbered tokens living `ttl`, each after `took_ms` (10 ms unless changed);
    /// fails while `failing` is set.
    struct Counter {
        clock: Arc<TokioClock>,
        ttl: Duration,
        calls: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
        took_ms: std::sync::atomic::AtomicU64,
    }

    impl CredentialSource for Counter {
        fn fetch(&self) -> BoxFuture<'_, Result<Token>> {
            Box::pin(async move {
                let took = Duration::from_millis(self.took_ms.load(Ordering::SeqCst));
                tokio::time::sleep(took).await;
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if self.failing.load(Ordering::SeqCst) {
                    return Err(Error::HttpTransport {
                        endpoint: "/test".into(),
                        what: "down".into(),
                        source: None,
                    });
                }
                Ok(Token::new(
                    format!("t{n}"),
                    Some(self.clock.now() + self.ttl),
                ))
            })
        }
    }

    fn setup(strategy: TokenStrategy, ttl: Duration) -> (TokenCache, Arc<Counter>) {
        let clock = TokioClock::starting_now();
        let source = Arc::new(Counter {
            clock: Arc::clone(&clock),
            ttl,
            calls: AtomicUsize::new(0),
            failing: false.into(),
            took_ms: 10.into(),
        });
        let settings = CacheSettings::builder()
            .jitter(0.0)
            .retries(2, Duration::from_millis(100), Duration::from_secs(1))
            .build()
            .unwrap();
        let cache = TokenCache::with_clock(source.clone(), strategy, settings, clock);
        (cache, source)
    }

    fn calls(source: &Counter) -> usize {
        source.calls.load(Ordering::SeqCst)
    }

    /// The caller that finds the token due starts the fetch and goes on with the token it
    /// has, still valid: a credential service that takes 30 s to answer (three attempts
    /// of 10 s) held that caller's connect for all of it, past its connect timeout.
    #[tokio::test(start_paused = true)]
    async fn a_due_token_still_valid_serves_while_a_slow_fetch_runs() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        tokio::time::sleep(Duration::from_secs(81)).await;
        source.took_ms.store(30_000, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // One fetch for all: the callers meanwhile do not start their own.
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(cache.token().await.unwrap().expose(), "t1");
        assert_eq!(calls(&source), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_first_callers_share_one_fetch() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(60));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.token().await.unwrap().expose().to_owned() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), "t0");
        }
        assert_eq!(calls(&source), 1);
    }

    /// A cache of `strategy` in front of a source that answers its `n`th call (from 0) with
    /// `answer(n)`, 10 ms after it is asked; and the count of its calls.
    fn scripted(
        strategy: TokenStrategy,
        answer: impl Fn(usize) -> Result<Token> + Send + Sync + 'static,
    ) -> (TokenCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let answer = Arc::new(answer);
        let source = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let answer = Arc::clone(&answer);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer(n)
            }
        };
        let cache = TokenCache::new(Arc::new(source), strategy, CacheSettings::default());
        (cache, calls)
    }

    /// A credential source that panics (a bug in a custom source) fails that fetch with an
    /// error that says so, and the next fetch is tried as after any failure. Raised again in
    /// the caller, the panic ended the refresher that keeps tokens fresh (for good: nothing
    /// starts another), and the pool task that had asked for a connection, whose count of
    /// connections opening bb8 then never lowered.
    #[tokio::test(start_paused = true)]
    async fn a_credential_source_that_panics_fails_the_fetch_and_the_next_is_tried() {
        let (cache, calls) = scripted(TokenStrategy::Lazy, |n| match n {
            0 => panic!("a bug in the source"),
            _ => Ok(Token::new(format!("t{n}"), None)),
        });
        let err = cache.token().await.unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        assert_eq!(
            ErrorChain(&err).to_string(),
            "the custom credential source failed: the credential source panicked: a bug in the source"
        );
        assert_eq!(cache.token().await.unwrap().expose(), "t1");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// The credential API's refusal (HTTP 403), asking for `retry_after`.
    fn refusal(retry_after: Option<Duration>) -> Error {
        Error::Http {
            endpoint: "/api/2.0/postgres/credentials".into(),
            status: 403,
            code: "PERMISSION_DENIED".into(),
            message: "no access".into(),
            retry_after,
        }
    }

    /// A fetch that fails for a passing reason (a timeout, HTTP 503) is not shared: the next
    /// caller waiting tries again, and those after it get its token. Sharing it failed every
    /// request that needed a login through an outage, however long their connect timeout.
    #[tokio::test(start_paused = true)]
    async fn callers_waiting_on_a_fetch_that_failed_for_a_passing_reason_try_again() {
        let (cache, calls) = scripted(TokenStrategy::Lazy, |n| match n {
            0..3 => Err(Error::HttpTransport {
                endpoint: "/test".into(),
                what: "down".into(),
                source: None,
            }),
            _ => Ok(Token::new(format!("t{n}"), None)),
        });
        let outcomes = futures_util::future::join_all((0..200).map(|_| cache.token())).await;
        // The first fetch's three attempts failed, and its caller got the failure.
        assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 1);
        assert!(outcomes.iter().flatten().all(|t| t.expose() == "t3"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// A refusal that leaves a valid token is not shared: under the uncached strategy, the
    /// caller that waited gets that token, as the caller whose fetch was refused does.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_that_leaves_a_valid_token_is_not_shared() {
        let (cache, _) = scripted(TokenStrategy::Uncached, |n| match n {
            0 => Ok(Token::new(
                "t0",
                Some(SystemTime::now() + Duration::from_secs(3600)),
            )),
            _ => Err(refusal(None)),
        });
        cache.token().await.unwrap();
        let (a, b) = tokio::join!(cache.token(), cache.token());
        assert_eq!(a.unwrap().expose(), "t0");
        assert_eq!(b.unwrap().expose(), "t0");
    }

    /// A refused credential (HTTP 403 from a custom source) is shared as it is: callers that
    /// waited on it see the same refusal, not a retryable failure of their own.
    #[tokio::test(start_paused = true)]
    async fn a_shared_refusal_stays_a_refusal() {
        let (cache, calls) = scripted(TokenStrategy::Lazy, |_| {
            Err(refusal(Some(Duration::from_secs(7))))
        });
        let errors = futures_util::future::join_all((0..50).map(|_| cache.token())).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for err in errors.into_iter().map(Result::unwrap_err) {
            let Error::Credential { source, .. } = &err else {
                panic!("{err:?}")
            };
            let inner = source.downcast_ref::<Error>().expect("dal's error, kept");
            assert!(
                matches!(inner, Error::Http { status: 403, .. }),
                "{inner:?}"
            );
            assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
            assert_eq!(
                ErrorChain(&err).to_string(),
                "the custom credential source failed: /api/2.0/postgres/credentials answered \
                 HTTP 403: PERMISSION_DENIED: no access"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lazy_refreshes_on_use_ahead_of_expiry_and_not_while_idle() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        // Margin is a fifth of the life: the token is served for 80 s.
        tokio::time::sleep(Duration::from_secs(79)).await;
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Due: the fetch starts, and the caller logs in with the token still valid.
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cache.token().await.unwrap().expose(), "t1");
        // Idle for several lives: nothing fetched meanwhile.
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert_eq!(calls(&source), 2);
        assert_eq!(cache.token().await.unwrap().expose(), "t2");
    }

    #[tokio::test(start_paused = true)]
    async fn eager_refreshes_in_the_background_and_stops_on_shutdown() {
        let (cache, source) = setup(TokenStrategy::Eager, Duration::from_secs(100));
        cache.start().await.unwrap();
        assert_eq!(calls(&source), 1);
        tokio::time::sleep(Duration::from_secs(81)).await;
        assert_eq!(calls(&source), 2, "refreshed at 80 s without any caller");
        assert_eq!(cache.current().unwrap().expose(), "t1");
        cache.shutdown();
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert_eq!(calls(&source), 2);
    }

    /// A refresh that came due while the machine was suspended happens as it wakes: the
    /// refresher slept by the monotonic clock, which stops in a suspension, for the whole
    /// wait, and woke (here) 60 s after the token had expired.
    #[tokio::test(start_paused = true)]
    async fn a_refresh_due_during_a_suspension_happens_on_waking() {
        let (cache, source) = setup(TokenStrategy::Eager, Duration::from_secs(100));
        cache.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Suspended for 80 s: the wall clock is at 90 s, the refresh was due at 80 s.
        source.clock.ahead_s.store(80, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(calls(&source), 2, "refreshed on waking");
    }

    /// The refresher waits as long as the service's `Retry-After` says before its next round.
    #[tokio::test(start_paused = true)]
    async fn the_refresher_waits_as_long_as_retry_after_says() {
        let clock = TokioClock::starting_now();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (at, log) = (Arc::clone(&clock), Arc::clone(&asked));
        let source = move || {
            let mut log = log.lock().unwrap();
            log.push(tokio::time::Instant::now());
            let first = log.len() == 1;
            let expires = at.now() + Duration::from_secs(100);
            async move {
                if first {
                    return Ok(Token::new("t", Some(expires)));
                }
                Err(Error::Http {
                    endpoint: "/api/2.0/postgres/credentials".into(),
                    status: 429,
                    code: "RESOURCE_EXHAUSTED".into(),
                    message: "slow down".into(),
                    retry_after: Some(Duration::from_secs(5)),
                })
            }
        };
        let settings = CacheSettings::builder()
            .jitter(0.0)
            .retries(1, Duration::from_millis(100), Duration::from_secs(10))
            .build()
            .unwrap();
        let cache = TokenCache::with_clock(Arc::new(source), TokenStrategy::Eager, settings, clock);
        cache.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(95)).await;
        let asked = asked.lock().unwrap().clone();
        assert!(asked.len() >= 3, "{asked:?}");
        for pair in asked[1..].windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_secs(5), "{asked:?}");
        }
    }

    /// Debug shows a far expiry (a custom source's "never") instead of panicking in chrono.
    #[tokio::test]
    async fn debug_shows_an_expiry_past_what_chrono_holds() {
        let never = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 60);
        let source = move || async move { Ok::<_, Error>(Token::new("t", Some(never))) };
        let cache = TokenCache::new(
            Arc::new(source),
            TokenStrategy::Lazy,
            CacheSettings::default(),
        );
        cache.token().await.unwrap();
        assert!(
            format!("{cache:?}").contains("expires_at: Some(None)"),
            "{cache:?}"
        );
    }

    /// A margin as long as the token's life (a custom source's tokens shorter than the margin
    /// set for another's) would make each token due as it arrives, and the refresher fetch
    /// again at once, without end: each is used for a quarter of its life at least.
    #[tokio::test(start_paused = true)]
    async fn a_margin_as_long_as_the_token_life_does_not_fetch_without_end() {
        let (_, source) = setup(TokenStrategy::Eager, Duration::from_secs(100));
        let settings = CacheSettings::builder()
            .refresh_margin(Duration::from_secs(3600))
            .build()
            .unwrap();
        let clock = Arc::clone(&source.clock);
        let cache = TokenCache::with_clock(source.clone(), TokenStrategy::Eager, settings, clock);
        cache.start().await.unwrap();
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(
            (4..=5).contains(&calls(&source)),
            "{} fetches",
            calls(&source)
        );
        cache.shutdown();
    }

    /// The refresher that a pool's listener asked for under the lazy strategy (a SeaORM
    /// pool's) ends with the last listener: a cache whose pools all closed fetched a token
    /// in the background every 80 s of a 100 s life for as long as the program ran.
    #[tokio::test(start_paused = true)]
    async fn a_lazy_caches_refresher_ends_with_its_last_listener() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        let open = Arc::new(AtomicBool::new(true));
        let listening = Arc::clone(&open);
        cache.on_refresh(move |_| listening.load(Ordering::SeqCst));
        cache.token().await.unwrap();
        cache.keep_fresh_while_listened();
        tokio::time::sleep(Duration::from_secs(250)).await;
        let while_open = calls(&source);
        assert!(while_open >= 3, "{while_open} fetches with the pool open");
        open.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1000)).await;
        // The next refresh finds the listener gone, and is the last.
        let closed = calls(&source);
        assert!(
            closed <= while_open + 1,
            "{} fetches after the pool closed",
            closed - while_open
        );
        // A pool built afterwards has its token kept fresh again.
        cache.on_refresh(|_| true);
        cache.keep_fresh_while_listened();
        tokio::time::sleep(Duration::from_secs(250)).await;
        assert!(calls(&source) >= closed + 2, "{} fetches", calls(&source));
    }

    /// A refresher asked for with the public `keep_fresh` runs for good, listeners or not.
    #[tokio::test(start_paused = true)]
    async fn keep_fresh_keeps_a_lazy_caches_token_fresh_for_good() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        cache.on_refresh(|_| false);
        cache.token().await.unwrap();
        cache.keep_fresh();
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert!(calls(&source) >= 10, "{} fetches", calls(&source));
        cache.shutdown();
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_ends_when_the_cache_is_dropped() {
        let (cache, source) = setup(TokenStrategy::Eager, Duration::from_secs(100));
        cache.start().await.unwrap();
        drop(cache);
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert_eq!(calls(&source), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_valid_token_then_recovers() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        cache.token().await.unwrap();
        source.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(85)).await;
        // Due for refresh; the old token is still valid and served while the source fails
        // (three attempts, 0.33 s in all).
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(cache.failures(), 1);
        // Soon after, callers are not held up by another attempt.
        let before = calls(&source);
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        assert_eq!(calls(&source), before);
        // Past expiry with the source still down: a clear error.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let err = cache.token().await.unwrap_err();
        assert!(matches!(err, Error::HttpTransport { .. }), "{err:?}");
        // The source recovers: the next call fetches again.
        source.failing.store(false, Ordering::SeqCst);
        let before = calls(&source);
        assert_eq!(cache.token().await.unwrap().expose(), format!("t{before}"));
    }

    /// A failed refresh holds up no connect while the token it would replace is valid:
    /// connects open with that token, so a pool that timed out then blamed the credential
    /// service (and its `Retry-After`) for a slow login. Past expiry, it does.
    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_holds_up_connects_only_once_the_token_is_invalid() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        cache.token().await.unwrap();
        source.failing.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(85)).await;
        let since = tokio::time::Instant::now();
        assert_eq!(cache.token().await.unwrap().expose(), "t0");
        // The refresh fails in the background (three attempts, 0.33 s in all).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(cache.failures(), 1);
        assert!(cache.failure_holding_up(since).is_some());
        let held_up = cache.failure_holding_up_connects(since);
        assert!(held_up.is_none(), "{held_up:?}");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let since = tokio::time::Instant::now();
        cache.token().await.unwrap_err();
        assert!(cache.failure_holding_up_connects(since).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_forces_a_new_fetch_once() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        let t0 = cache.token().await.unwrap();
        cache.invalidate(&t0);
        let t1 = cache.token().await.unwrap();
        assert_eq!(t1.expose(), "t1");
        // Invalidating a token already replaced does nothing.
        cache.invalidate(&t0);
        assert_eq!(cache.token().await.unwrap().expose(), "t1");
        assert_eq!(calls(&source), 2);
    }

    /// A fresh token refused too is not the token's fault (the server's LDAP back end down,
    /// the role's login revoked): the cache keeps it, and asks the source again only after a
    /// pause that doubles up to the longest backoff, where each connect had made a fetch of
    /// its own. A login the server accepts ends the pauses.
    #[tokio::test(start_paused = true)]
    async fn a_token_refused_right_after_a_refusal_waits_before_the_next_fetch() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        let t0 = cache.token().await.unwrap();
        cache.invalidate(&t0);
        assert_eq!(
            cache.token().await.unwrap().expose(),
            "t1",
            "a first refusal: at once"
        );
        for _ in 0..20 {
            let refused = cache.token().await.unwrap();
            cache.invalidate(&refused);
        }
        assert_eq!(calls(&source), 2, "no fetch within the pause");
        // Refused on, once a second: a fetch per pause at most (100 ms, 200, 400, then 1 s).
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let refused = cache.token().await.unwrap();
            cache.invalidate(&refused);
        }
        let fetched = calls(&source);
        assert!((3..=12).contains(&fetched), "{fetched} fetches");
        // Accepted: the next refusal is met with a fetch at once.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let accepted = cache.token().await.unwrap();
        cache.accepted();
        let fetched = calls(&source);
        cache.invalidate(&accepted);
        assert_ne!(cache.token().await.unwrap().expose(), accepted.expose());
        assert_eq!(calls(&source), fetched + 1);
    }

    /// Refusals of the token kept through a pause (connects come more often than the pause
    /// is long) do not push the pause on: each refusal of it set the next fetch its pause
    /// again from then, and once the pause was longer than the time between connects, no
    /// token was fetched again for as long as the connects went on (a rotated password the
    /// source would have read by then was never fetched).
    #[tokio::test(start_paused = true)]
    async fn refusals_of_a_kept_token_do_not_push_its_pause_on() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        let t0 = cache.token().await.unwrap();
        cache.invalidate(&t0);
        // Refused every 300 ms for 6 s, with pauses that double up to 1 s: a fetch as each
        // pause is over (7 in all; 3 when the refusals pushed the pauses on).
        for _ in 0..20 {
            let refused = cache.token().await.unwrap();
            cache.invalidate(&refused);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let fetched = calls(&source);
        assert!(fetched >= 6, "{fetched} fetches");
    }

    /// Two connects refused with one token at the same moment are one refusal of it: the
    /// token is dropped and the next fetch goes at once. Before, the second could count as a
    /// refusal after a refusal, keep the token and pause the fetch the first one asked for.
    #[tokio::test]
    async fn two_refusals_of_one_token_at_once_count_once() {
        let (cache, source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        source.took_ms.store(0, Ordering::SeqCst);
        for round in 0..2000 {
            let token = cache.token().await.unwrap();
            let ready = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        ready.fetch_add(1, Ordering::SeqCst);
                        while ready.load(Ordering::SeqCst) < 2 {
                            std::hint::spin_loop();
                        }
                        cache.invalidate(&token);
                    });
                }
            });
            let inner = &cache.inner;
            assert_eq!(
                inner.refused_in_a_row.load(Ordering::SeqCst),
                1,
                "round {round}"
            );
            assert_eq!(
                inner.retry_after_ms.load(Ordering::SeqCst),
                0,
                "round {round}"
            );
            assert!(
                inner.current.load().is_none(),
                "round {round}: the token was kept"
            );
            cache.accepted();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn uncached_fetches_for_every_connection() {
        let (cache, source) = setup(TokenStrategy::Uncached, Duration::from_secs(100));
        for _ in 0..3 {
            cache.token().await.unwrap();
        }
        assert_eq!(calls(&source), 3);
    }

    /// Uncached too, a fresh token refused right after a refusal is kept through its pause,
    /// and the connects meanwhile get it, and the server's refusal, at once: each waited out
    /// the pause in its own fetch instead, longer in turn than its connect timeout, and
    /// failed as a timeout (an unreachable server, to retry or fail over from).
    #[tokio::test(start_paused = true)]
    async fn uncached_connects_get_the_refused_token_through_its_pause() {
        let (cache, source) = setup(TokenStrategy::Uncached, Duration::from_secs(100));
        let t0 = cache.token().await.unwrap();
        cache.invalidate(&t0);
        let t1 = cache.token().await.unwrap();
        cache.invalidate(&t1);
        let fetched = calls(&source);
        for _ in 0..5 {
            let started = tokio::time::Instant::now();
            let refused = cache.token().await.unwrap();
            assert!(
                started.elapsed() < Duration::from_millis(50),
                "waited the pause"
            );
            assert_eq!(refused.expose(), t1.expose());
            cache.invalidate(&refused);
        }
        assert_eq!(calls(&source), fetched);
        // The pause over, the next connect fetches.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_ne!(cache.token().await.unwrap().expose(), t1.expose());
    }

    #[tokio::test(start_paused = true)]
    async fn listeners_see_each_new_token_before_the_refresh_returns() {
        let (cache, _source) = setup(TokenStrategy::Lazy, Duration::from_secs(100));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        cache.on_refresh(move |t| {
            log.lock().unwrap().push(t.expose().to_owned());
            true
        });
        let t = cache.token().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![t.expose().to_owned()]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_already_expired_token_is_rejected() {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let source = || async {
            Ok::<_, std::io::Error>(Token::new(
                "old",
                Some(SystemTime::now() - Duration::from_secs(1)),
            ))
        };
        let cache = TokenCache::with_clock(
            Arc::new(source),
            TokenStrategy::Lazy,
            CacheSettings::builder()
                .retries(1, Duration::from_millis(1), Duration::from_millis(1))
                .build()
                .unwrap(),
            clock,
        );
        let err = cache.token().await.unwrap_err();
        assert!(matches!(err, Error::TokenExpired { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fetch_retried_after_429_waits_as_long_as_retry_after_says() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let source = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    return Err(Error::Http {
                        endpoint: "/api/2.0/postgres/credentials".into(),
                        status: 429,
                        code: "RESOURCE_EXHAUSTED".into(),
                        message: "slow down".into(),
                        retry_after: Some(Duration::from_secs(3)),
                    });
                }
                Ok(Token::new("t", None))
            }
        };
        let settings = CacheSettings::builder()
            .retries(3, Duration::from_millis(100), Duration::from_secs(10))
            .build()
            .unwrap();
        let cache = TokenCache::new(Arc::new(source), TokenStrategy::Lazy, settings);
        let started = tokio::time::Instant::now();
        cache.token().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    /// A service that answered 429 with `Retry-After` is not asked again before then by the
    /// next caller with no token either (capped at the longest backoff, as within a fetch):
    /// callers that came after the failed fetch waited for nothing and asked at once.
    #[tokio::test(start_paused = true)]
    async fn a_new_fetch_after_a_429_waits_as_long_as_retry_after_says() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = {
            let asked = Arc::clone(&asked);
            move || {
                let n = {
                    let mut asked = asked.lock().unwrap();
                    asked.push(tokio::time::Instant::now());
                    asked.len()
                };
                async move {
                    if n <= 2 {
                        return Err(Error::Http {
                            endpoint: "/api/2.0/postgres/credentials".into(),
                            status: 429,
                            code: "RESOURCE_EXHAUSTED".into(),
                            message: "slow down".into(),
                            retry_after: Some(Duration::from_secs(30)),
                        });
                    }
                    Ok(Token::new("t", None))
                }
            }
        };
        let settings = CacheSettings::builder()
            .retries(2, Duration::from_millis(100), Duration::from_secs(10))
            .build()
            .unwrap();
        let cache = TokenCache::with_clock(
            Arc::new(source),
            TokenStrategy::Lazy,
            settings,
            TokioClock::starting_now(),
        );
        let err = cache.token().await.unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
        cache.token().await.unwrap();
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 3);
        assert!(
            asked[2] - asked[1] >= Duration::from_secs(10),
            "asked again {:?} after the 429",
            asked[2] - asked[1]
        );
    }

    /// A token the server refused is replaced at once, even while a fetch waits out the
    /// pause a 429 asked for: the waiting fetch would otherwise hold every connect until then.
    #[tokio::test(start_paused = true)]
    async fn an_invalidated_token_cuts_short_the_pause_a_429_asked_for() {
        let clock = TokioClock::starting_now();
        let calls = Arc::new(AtomicUsize::new(0));
        let source = {
            let (clock, calls) = (Arc::clone(&clock), Arc::clone(&calls));
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let expires = clock.now() + Duration::from_secs(600);
                async move {
                    if n == 1 {
                        return Err(Error::Http {
                            endpoint: "/api/2.0/postgres/credentials".into(),
                            status: 429,
                            code: "RESOURCE_EXHAUSTED".into(),
                            message: "slow down".into(),
                            retry_after: Some(Duration::from_secs(60)),
                        });
                    }
                    Ok(Token::new(format!("t{n}"), Some(expires)))
                }
            }
        };
        let settings = CacheSettings::builder()
            .retries(1, Duration::from_millis(100), Duration::from_secs(120))
            .build()
            .unwrap();
        let cache = TokenCache::with_clock(Arc::new(source), TokenStrategy::Lazy, settings, clock);
        let first = cache.token().await.unwrap();
        // The 429: the token still valid is kept, the next fetch waits 60 s.
        assert_eq!(cache.refresh(true).await.unwrap().expose(), "t0");
        let waiting = tokio::spawn({
            let cache = cache.clone();
            async move { cache.refresh(true).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        cache.invalidate(&first);
        let started = tokio::time::Instant::now();
        let next = cache.token().await.unwrap();
        assert_eq!(next.expose(), "t2");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited {:?}",
            started.elapsed()
        );
        waiting.await.unwrap().unwrap();
    }

    /// A 3 s token from a service that takes 1 s to answer: the next fetch starts at least
    /// 2 s (twice the fetch) before expiry, not at the default fifth of the life (0.6 s).
    #[tokio::test(start_paused = true)]
    async fn the_refresh_lead_covers_how_long_a_fetch_takes() {
        let clock = TokioClock::starting_now();
        let fetched_at = Arc::new(Mutex::new(Vec::new()));
        let (log, source_clock) = (Arc::clone(&fetched_at), Arc::clone(&clock));
        let source = move || {
            let (log, clock) = (Arc::clone(&log), Arc::clone(&source_clock));
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = clock.now();
                log.lock().unwrap().push(now);
                Ok::<_, std::io::Error>(Token::new("t", Some(now + Duration::from_secs(3))))
            }
        };
        let settings = CacheSettings::builder().jitter(0.0).build().unwrap();
        let cache = TokenCache::with_clock(Arc::new(source), TokenStrategy::Eager, settings, clock);
        cache.start().await.unwrap();
        let first = cache.expires_at().unwrap();
        while fetched_at.lock().unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let second_answered = fetched_at.lock().unwrap()[1];
        // The second fetch (1 s long) started at least 1.5 s before the first token expired.
        let lead = first
            .duration_since(second_answered - Duration::from_secs(1))
            .unwrap();
        assert!(lead >= Duration::from_millis(1500), "{lead:?}");
        cache.shutdown();
    }

    #[test]
    fn bad_settings_are_rejected_by_the_builder() {
        let cases = [
            (CacheSettings::builder().jitter(0.9), Setting::CacheJitter),
            (
                CacheSettings::builder().jitter(f64::NAN),
                Setting::CacheJitter,
            ),
            (
                CacheSettings::builder().retries(0, Duration::ZERO, Duration::ZERO),
                Setting::CacheAttempts,
            ),
            (
                CacheSettings::builder().retries(3, Duration::from_secs(2), Duration::from_secs(1)),
                Setting::CacheBackoff,
            ),
            (
                CacheSettings::builder().retries(3, Duration::ZERO, Duration::ZERO),
                Setting::CacheBackoff,
            ),
            (
                CacheSettings::builder().retries(3, Duration::from_secs(1), Duration::MAX),
                Setting::CacheBackoff,
            ),
            (
                CacheSettings::builder().refresh_margin(Duration::MAX),
                Setting::CacheRefreshMargin,
            ),
        ];
        for (builder, expected) in cases {
            match builder.build().unwrap_err() {
                Error::Config { setting, .. } => assert_eq!(setting, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A closure that never answers fails its attempt after a bound, and the cache tries
    /// again: it held the cache's one fetch at a time, so once the token expired every new
    /// connection waited for it (failing after the connect timeout) until the process
    /// restarted, however soon the service behind the closure came back.
    #[tokio::test(start_paused = true)]
    async fn a_closure_that_never_answers_gives_up_and_is_tried_again() {
        use std::sync::atomic::Ordering;
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let source = move || {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    std::future::pending::<()>().await;
                }
                Ok::<_, std::io::Error>(Token::new("second", None))
            }
        };
        let cache = TokenCache::new(
            Arc::new(source),
            TokenStrategy::Lazy,
            CacheSettings::default(),
        );
        let token = tokio::time::timeout(Duration::from_secs(600), cache.token())
            .await
            .expect("a token within ten minutes")
            .unwrap();
        assert_eq!(token.expose(), "second");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
