//! What both ORMs share: [`TxMode`], [`Transactions`] and the decision to retry.

use crate::connector::Connector;
use crate::error::{Error, ErrorChain, Result};
use crate::retry::RetryPolicy;
use crate::target::Target;
use crate::telemetry;

/// Isolation level of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isolation {
    /// `READ COMMITTED`, PostgreSQL's default.
    ReadCommitted,
    /// `REPEATABLE READ`, Aurora DSQL's only level.
    RepeatableRead,
    /// `SERIALIZABLE`.
    Serializable,
}

impl Isolation {
    fn sql(self) -> &'static str {
        match self {
            Isolation::ReadCommitted => "READ COMMITTED",
            Isolation::RepeatableRead => "REPEATABLE READ",
            Isolation::Serializable => "SERIALIZABLE",
        }
    }
}

/// How a transaction runs: isolation level, read-only, deferrable. The same value serves
/// SeaORM and Diesel.
///
/// Only what differs from the session's defaults is sent. Defaults to the session's isolation
/// level, read-write, not deferrable.
///
/// ```
/// use dal::{Isolation, TxMode};
/// let report = TxMode::new().isolation(Isolation::Serializable).read_only(true).deferrable(true);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TxMode {
    /// The isolation level; `None` keeps the session's (`default_transaction_isolation`).
    pub isolation: Option<Isolation>,
    /// `READ ONLY` when set.
    pub read_only: bool,
    /// `DEFERRABLE` when set: a serializable read-only transaction waits for a snapshot in
    /// which it cannot fail with a serialization error.
    pub deferrable: bool,
}

impl TxMode {
    /// The session's defaults.
    pub const fn new() -> Self {
        Self {
            isolation: None,
            read_only: false,
            deferrable: false,
        }
    }

    /// Sets [`isolation`](Self::isolation).
    #[must_use]
    pub const fn isolation(mut self, level: Isolation) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Sets [`read_only`](Self::read_only).
    #[must_use]
    pub const fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets [`deferrable`](Self::deferrable).
    #[must_use]
    pub const fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = deferrable;
        self
    }

    /// The transaction characteristics, as `SET TRANSACTION` and `BEGIN` take them; `None`
    /// when everything is left at the session's default.
    pub(super) fn characteristics(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(level) = self.isolation {
            parts.push(format!("ISOLATION LEVEL {}", level.sql()));
        }
        if self.read_only {
            parts.push("READ ONLY".to_owned());
        }
        if self.deferrable {
            parts.push("DEFERRABLE".to_owned());
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

/// Runs transactions with a [`TxMode`] and a [`RetryPolicy`], for SeaORM and Diesel.
///
/// Get one with [`Connector::transactions`].
///
/// # The work must be idempotent
///
/// The work closure runs once per attempt, and every attempt but the last was rolled back.
/// Whatever it does outside the database (sending mail, charging a card, pushing to a
/// channel, incrementing a counter in memory) happens once per attempt: keep such effects
/// out of it, or make them idempotent. That is the caller's concern; this type cannot check.
///
/// # What is retried
///
/// - conflicts: SQLSTATE `40001` (serialization failures, Aurora DSQL's `OC000`/`OC001`) and
///   `40P01` (deadlocks), raised by any statement or by COMMIT, or by a statement whose error
///   the work left unread, which aborted the transaction (sqlx reads that error at COMMIT;
///   the Diesel pool follows the wire over TLS, [`Error::RolledBackAtCommit`], and without
///   TLS such a transaction fails with SQLSTATE `25P02` and is not retried);
/// - connection failures before the transaction's first statement (acquiring the
///   connection, `BEGIN`);
/// - a prepared statement gone stale after a schema change (SQLSTATE `0A000`, "cached plan
///   must not change result type"): the pools prepare it anew on the next attempt.
///
/// A login the server refused (SQLSTATE `28P01`/`28000`) is not retried here: every pool's
/// connect has already tried one fresh token (see [`Connector::connect`](crate::Connector::connect)).
///
/// A connection lost while COMMIT was in flight is never retried, since the transaction may
/// have committed: it ends with [`Error::AmbiguousCommit`]. A session the server ended while
/// the transaction sat idle in it (SQLSTATE `25P03`) committed nothing: that failure comes
/// back as it is (Diesel's, over TLS, as [`Error::IdleInTransactionTimeout`]), and so does
/// the lost connection of a Diesel COMMIT that never left (over TLS, where the pool sees
/// what was written). When the attempts run out, the last error comes back inside
/// [`Error::RetriesExhausted`] with the attempt count.
#[derive(Debug, Clone)]
pub struct Transactions {
    target: Target,
    policy: RetryPolicy,
    /// The connector, to replace a token the server refused at a SeaORM login, and to move
    /// the SeaORM pool to another endpoint when this one cannot be reached.
    #[cfg(feature = "seaorm")]
    connector: Option<Connector>,
}

/// Where an attempt failed, which decides whether it may run again.
pub(super) enum Failure {
    /// Before the first statement: acquiring the connection, BEGIN, SET TRANSACTION.
    Begin(Error),
    /// In the work.
    Work(Error),
    /// At COMMIT.
    Commit(Error),
    /// In work that is safe to run again whatever it did (see
    /// [`Transactions::idempotent`]).
    Repeatable(Error),
    /// In the work, in a way another attempt overcomes, as the session's wire tells whatever
    /// the language of the server's message: a conflict (SQLSTATE `40001`, `40P01`), or a
    /// prepared statement a schema change made stale (the pool replaces the connection).
    #[cfg(feature = "diesel")]
    Again(Error),
}

impl Failure {
    /// The error to return as it is, or `Ok` with the error to retry.
    fn classify(self) -> std::result::Result<Error, Error> {
        match self {
            Failure::Begin(e) if e.is_conflict() => Ok(e),
            Failure::Begin(e)
                if e.is_connection_failure() && !e.is_auth_failure() && e.is_retryable() =>
            {
                Ok(e)
            }
            Failure::Work(e) | Failure::Commit(e) if e.is_conflict() => Ok(e),
            // The pool makes the connection forget (or replaces) its stale statements.
            Failure::Work(e) if e.is_stale_statement() => Ok(e),
            #[cfg(feature = "diesel")]
            Failure::Again(e) => Ok(e),
            Failure::Commit(e) if e.is_connection_failure() => Err(Error::AmbiguousCommit {
                source: Box::new(e),
            }),
            Failure::Repeatable(e)
                if e.is_conflict()
                    || e.is_stale_statement()
                    || (e.is_connection_failure() && !e.is_auth_failure() && e.is_retryable()) =>
            {
                Ok(e)
            }
            Failure::Begin(e) | Failure::Work(e) | Failure::Commit(e) | Failure::Repeatable(e) => {
                Err(e)
            }
        }
    }
}

impl Transactions {
    /// Transactions against a `target`, retried by `policy`.
    pub fn new(target: Target, policy: RetryPolicy) -> Self {
        Self {
            target,
            policy,
            #[cfg(feature = "seaorm")]
            connector: None,
        }
    }

    /// The same, retried by `policy` instead.
    #[must_use]
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Decides after a failed attempt: sleeps and returns `Ok` to run again, or returns the
    /// error to give up with.
    pub(super) async fn after(
        &self,
        orm: &'static str,
        attempt: u32,
        started: std::time::Instant,
        failure: Failure,
    ) -> Result<()> {
        let retryable = match failure.classify() {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(orm, attempt, error = %ErrorChain(&e), "transaction failed");
                return Err(e);
            }
        };
        let Some(delay) = self.policy.next_delay(attempt, started.elapsed()) else {
            tracing::warn!(
                orm,
                attempts = attempt,
                sqlstate = retryable.sqlstate(),
                "transaction failed on its last attempt"
            );
            return Err(Error::RetriesExhausted {
                attempts: attempt,
                last: Box::new(retryable),
            });
        };
        tracing::info!(
            orm,
            attempt,
            sqlstate = retryable.sqlstate(),
            delay_ms = delay.as_millis() as u64,
            error = %ErrorChain(&retryable),
            "transaction conflict or connection failure; retrying"
        );
        metrics::counter!(telemetry::TX_RETRIES, "orm" => orm, "reason" => retryable.retry_reason())
            .increment(1);
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Runs `work` outside any transaction of dal's, and runs it again after a conflict or a
    /// connection failure, under the same [policy](RetryPolicy) as transactions: for a
    /// statement that is **safe to repeat whatever it did before it failed** (a read, an
    /// upsert, `UPDATE ... SET x = constant`; not `x = x + 1`). Aurora DSQL answers conflicts
    /// (`40001` with `OC000` or `OC001`) also outside explicit transactions, for example right
    /// after a migration changed a table (`OC001`).
    ///
    /// Also retried: a connection lost under the statement (whether it was applied is
    /// unknown, hence the rule above), a prepared statement gone stale after a schema change.
    /// Retries count in [`TX_RETRIES`](telemetry::TX_RETRIES) with `orm = "idempotent"` and
    /// their reason (`OC000`, `OC001`, the SQLSTATE, or `connection`).
    ///
    /// ```no_run
    /// # async fn demo(connector: &dal::Connector, db: &dal::SeaOrmPool) -> dal::Result<()> {
    /// use sea_orm::ConnectionTrait;
    /// connector
    ///     .transactions()
    ///     .idempotent(|| async {
    ///         db.execute_unprepared("UPDATE customers SET name = 'Ada' WHERE id = 1").await?;
    ///         Ok(())
    ///     })
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// The work's error when it is not retried, or [`Error::RetriesExhausted`] with the last
    /// one when the policy gives up.
    pub async fn idempotent<T, F, Fut>(&self, mut work: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (mut attempt, started) = (1, std::time::Instant::now());
        loop {
            match work().await {
                Ok(value) => return Ok(value),
                Err(e) => {
                    self.after("idempotent", attempt, started, Failure::Repeatable(e))
                        .await?;
                }
            }
            attempt += 1;
        }
    }

    /// After a SeaORM transaction could not begin for a connection failure (not a full pool
    /// nor a server's limit, whose endpoint answers): when the
    /// connector has [failover](crate::Config::failover) endpoints, opens one connection
    /// through it, which moves every pool (this SeaORM pool included) to the first endpoint
    /// where one opens. A `BEGIN` that failed on a connection the pool held (its server gone)
    /// tells the connector nothing: this moves at once, not at the pool's next connect.
    #[cfg(feature = "seaorm")]
    pub(super) async fn follow_failover(&self, failure: &Failure) {
        let (Failure::Begin(e), Some(connector)) = (failure, &self.connector) else {
            return;
        };
        if connector.has_failover() && e.is_unreachable() {
            // The connection itself is not needed; the move is.
            drop(connector.connect().await);
        }
    }

    pub(super) fn refuse_savepoint(&self) -> Result<()> {
        if self.target == Target::Dsql {
            return Err(Error::SavepointUnsupported);
        }
        Ok(())
    }
}

pub(super) fn committed(orm: &'static str) {
    tracing::debug!(orm, "transaction committed");
    metrics::counter!(telemetry::TX_COMMITS, "orm" => orm).increment(1);
}

pub(super) fn rolled_back(orm: &'static str) {
    tracing::debug!(orm, "transaction rolled back");
    metrics::counter!(telemetry::TX_ROLLBACKS, "orm" => orm).increment(1);
}

impl Connector {
    /// Transactions against this connector's target with the default [`RetryPolicy`].
    pub fn transactions(&self) -> Transactions {
        let transactions = Transactions::new(self.target(), RetryPolicy::default());
        #[cfg(feature = "seaorm")]
        let transactions = Transactions {
            connector: Some(self.clone()),
            ..transactions
        };
        transactions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn modes_send_only_what_differs_from_the_defaults() {
        assert_eq!(TxMode::new().characteristics(), None);
        assert_eq!(
            TxMode::new()
                .isolation(Isolation::Serializable)
                .read_only(true)
                .deferrable(true)
                .characteristics()
                .as_deref(),
            Some("ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE")
        );
        assert_eq!(
            TxMode::new().deferrable(true).characteristics().as_deref(),
            Some("DEFERRABLE")
        );
    }

    #[test]
    fn the_default_policy_is_a_budget_with_full_jitter() {
        let p = RetryPolicy::default();
        assert_eq!(p, RetryPolicy::builder().build().unwrap());
        assert_eq!(p.attempts(), u32::MAX);
        assert_eq!(p.max_elapsed(), Some(Duration::from_secs(20)));
        for attempt in 1..=12 {
            let d = p.delay(attempt);
            let base = Duration::from_millis(2 << (attempt - 1)).min(Duration::from_millis(500));
            assert!(d <= base * 2, "{attempt}: {d:?}");
        }
        // By default time alone bounds the retries.
        assert!(p.next_delay(1000, Duration::ZERO).is_some());
        assert_eq!(p.next_delay(1, Duration::from_secs(20)), None);
        // Given both, attempts or time, whichever runs out first.
        let both = RetryPolicy::builder().attempts(20).build().unwrap();
        assert!(both.next_delay(19, Duration::ZERO).is_some());
        assert_eq!(both.next_delay(20, Duration::ZERO), None);
        assert_eq!(both.next_delay(1, Duration::from_secs(20)), None);
        let untimed = RetryPolicy::builder()
            .attempts(20)
            .max_elapsed(None)
            .build()
            .unwrap();
        assert!(untimed.next_delay(1, Duration::from_secs(3600)).is_some());
    }

    #[test]
    fn without_jitter_delays_double_up_to_the_cap() {
        let p = RetryPolicy::builder()
            .delays(Duration::from_millis(10), Duration::from_millis(50))
            .jitter(0.0)
            .build()
            .unwrap();
        let delays: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 50, 50]);
        assert_eq!(p.delay(u32::MAX), Duration::from_millis(50));
    }

    /// Delays from user input may be as long as a `Duration` holds ("no cap"): a pause is
    /// then as long as can be counted, and never a panic.
    #[test]
    fn the_longest_delays_saturate() {
        let p = RetryPolicy::builder()
            .delays_secs(1.8e19, 1.8e19)
            .unwrap()
            .build()
            .unwrap();
        // With full jitter, half the pauses are longer than the longest delay.
        let pauses: Vec<Duration> = (1..100).map(|attempt| p.delay(attempt)).collect();
        assert!(pauses.contains(&Duration::MAX), "{pauses:?}");
        for attempt in 1..100 {
            p.next_delay(attempt, Duration::from_secs(1));
        }
        let untimed = RetryPolicy::builder()
            .delays(Duration::MAX, Duration::MAX)
            .attempts(3)
            .max_elapsed(None)
            .build()
            .unwrap();
        assert!(untimed.next_delay(1, Duration::MAX).is_some());
    }

    #[test]
    fn bad_policies_are_rejected_when_built() {
        let builds = [
            RetryPolicy::builder().attempts(0).build(),
            RetryPolicy::builder()
                .delays(Duration::from_millis(200), Duration::from_millis(100))
                .build(),
            RetryPolicy::builder().jitter(-0.1).build(),
            RetryPolicy::builder().jitter(1.5).build(),
        ];
        for built in builds {
            assert!(matches!(built, Err(Error::Config { .. })), "{built:?}");
        }
        let forever = RetryPolicy::builder()
            .max_elapsed(None)
            .build()
            .unwrap_err();
        assert!(
            matches!(forever, Error::Config { .. })
                && forever
                    .to_string()
                    .contains("retried forever: set attempts"),
            "{forever}"
        );
        for (min, max) in [(-0.001, 0.1), (0.001, -1.0), (f64::NAN, 0.1)] {
            let err = RetryPolicy::builder().delays_secs(min, max).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{err:?}");
        }
        assert!(
            RetryPolicy::builder()
                .delays_secs(0.001, 0.1)
                .unwrap()
                .build()
                .is_ok()
        );
    }

    #[cfg(feature = "diesel")]
    fn connection_lost() -> Error {
        Error::Diesel(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::UnableToSendCommand,
            Box::new("connection closed".to_owned()),
        ))
    }

    #[cfg(feature = "diesel")]
    fn serialization_failure() -> Error {
        Error::Diesel(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::SerializationFailure,
            Box::new("could not serialize access".to_owned()),
        ))
    }

    #[cfg(feature = "diesel")]
    #[test]
    fn failures_are_retried_only_where_it_is_safe() {
        assert!(Failure::Begin(connection_lost()).classify().is_ok());
        assert!(Failure::Begin(serialization_failure()).classify().is_ok());
        assert!(Failure::Work(serialization_failure()).classify().is_ok());
        assert!(Failure::Commit(serialization_failure()).classify().is_ok());
        // Once a statement ran, a lost connection is the caller's to judge.
        assert!(Failure::Work(connection_lost()).classify().is_err());
        let ambiguous = Failure::Commit(connection_lost()).classify().unwrap_err();
        assert!(
            matches!(ambiguous, Error::AmbiguousCommit { .. }),
            "{ambiguous:?}"
        );
        // The server ended the session (57P01: diesel-async gives its message, no SQLSTATE):
        // a BEGIN is run again, a COMMIT is ambiguous, as through SeaORM.
        let ended = || {
            Error::Diesel(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                Box::new("terminating connection due to administrator command".to_owned()),
            ))
        };
        assert!(Failure::Begin(ended()).classify().is_ok());
        let ambiguous = Failure::Commit(ended()).classify().unwrap_err();
        assert!(
            matches!(ambiguous, Error::AmbiguousCommit { .. }),
            "{ambiguous:?}"
        );
        // A message that quotes user data is not a conflict: DSQL's OC000 and OC001 come
        // with SQLSTATE 40001, which diesel-async keeps.
        let quoted = Error::Diesel(diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(r#"invalid input syntax for type uuid: "OC000""#.to_owned()),
        ));
        assert!(!quoted.is_conflict());
        assert!(Failure::Work(quoted).classify().is_err());
        let own = Failure::Work(Error::abort("insufficient funds"))
            .classify()
            .unwrap_err();
        assert!(matches!(own, Error::Aborted(_)), "{own:?}");
    }

    /// A pool timeout is retried, and retryable, as its cause is: one whose pool's logins
    /// were refused (a credential service's 401, a password the server refuses) waited out
    /// the acquire timeout once per attempt until the retry budget ran out, as if the pool
    /// had been busy.
    #[test]
    fn a_pool_timeout_is_retried_as_its_cause_is() {
        let timed_out = |cause: Option<Error>| Error::PoolTimeout {
            timeout: Duration::from_secs(1),
            opening: 0,
            last_failure: cause.map(std::sync::Arc::new),
        };
        let refused = || Error::Http {
            endpoint: "https://example.cloud.databricks.com/oidc/v1/token".to_owned(),
            status: 401,
            code: "invalid_client".to_owned(),
            message: "Client authentication failed".to_owned(),
            retry_after: None,
        };
        let unreachable = || Error::Unreachable {
            endpoint: "db.internal:5432".to_owned(),
            source: "connection refused".into(),
        };
        assert!(timed_out(None).is_retryable() && !timed_out(None).is_auth_failure());
        assert!(Failure::Begin(timed_out(None)).classify().is_ok());
        assert!(
            Failure::Begin(timed_out(Some(unreachable())))
                .classify()
                .is_ok()
        );
        let refused = timed_out(Some(refused()));
        assert!(
            refused.is_auth_failure() && !refused.is_retryable(),
            "{refused:?}"
        );
        assert!(Failure::Begin(refused).classify().is_err());
        // A certificate no trusted CA signed, a missing database: no retry mends them.
        let unknown_ca = Error::config(crate::Setting::SslRootCert, "signed by an unknown CA");
        let missing = Error::Http {
            endpoint: "https://example.cloud.databricks.com/api/2.0/database/credentials"
                .to_owned(),
            status: 404,
            code: "NOT_FOUND".to_owned(),
            message: "no such endpoint".to_owned(),
            retry_after: None,
        };
        for cause in [unknown_ca, missing] {
            let timed_out = timed_out(Some(cause));
            assert!(!timed_out.is_retryable(), "{timed_out:?}");
            assert!(Failure::Begin(timed_out).classify().is_err());
        }
        // Idle connections that failed their checks (a server gone silent): it may answer
        // again.
        let checked = timed_out(Some(Error::Pool("connection closed".to_owned())));
        assert!(checked.is_retryable(), "{checked:?}");
        assert!(Failure::Begin(checked).classify().is_ok());
    }

    /// SeaORM's checkouts fail as Diesel's do: a server that cannot be reached, or a login
    /// that timed out, is retried before the transaction began; a pool shut down fails at
    /// once rather than after the whole retry budget.
    #[cfg(feature = "seaorm")]
    #[test]
    fn seaorm_checkouts_that_failed_are_classified_as_diesels_are() {
        use crate::pool::seaorm::acquire_err;
        let connect = |source| Error::Connect {
            source: std::sync::Arc::new(source),
        };
        let refused = || {
            connect(Error::Unreachable {
                endpoint: "db.example.com:5432".to_owned(),
                source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            })
        };
        let timed_out = || {
            connect(Error::ConnectTimeout {
                endpoint: "db.example.com:5432".to_owned(),
                timeout: Duration::from_secs(10),
                last_answer: None,
            })
        };
        let begin = |e| Failure::Begin(Error::from(acquire_err(e)));
        let pool_timeout = || Error::PoolTimeout {
            timeout: Duration::from_secs(1),
            opening: 0,
            last_failure: None,
        };
        let pool_timeout_refused = || Error::PoolTimeout {
            timeout: Duration::from_secs(1),
            opening: 0,
            last_failure: Some(std::sync::Arc::new(refused())),
        };
        for failed in [
            &refused as &dyn Fn() -> Error,
            &timed_out,
            &pool_timeout,
            &pool_timeout_refused,
        ] {
            let shown = failed().to_string();
            let seaorm = Error::from(acquire_err(failed()));
            assert!(seaorm.is_connection_failure(), "{shown}");
            assert!(begin(failed()).classify().is_ok(), "{shown}");
        }
        let seaorm = Error::from(acquire_err(pool_timeout_refused()));
        assert!(
            matches!(
                &seaorm,
                Error::PoolTimeout {
                    last_failure: Some(_),
                    ..
                }
            ) && ErrorChain(&seaorm)
                .to_string()
                .contains("db.example.com:5432"),
            "a SeaORM checkout that timed out while connects failed lost the cause: {seaorm:?}"
        );
        assert!(
            acquire_err(refused())
                .to_string()
                .contains("db.example.com:5432"),
            "{}",
            acquire_err(refused())
        );
        let closed = Error::from(acquire_err(Error::PoolClosed));
        assert!(!closed.is_connection_failure() && !closed.is_retryable());
        assert!(begin(Error::PoolClosed).classify().is_err());
    }

    /// A SeaORM checkout that failed for the credential service's answer keeps its meaning,
    /// as Diesel's does: a refused client secret (HTTP 401) is an auth failure, not to be
    /// retried, and a 429 is retryable after its `Retry-After`. Both were flattened into
    /// text, neither refused nor retryable.
    #[cfg(feature = "seaorm")]
    #[test]
    fn seaorm_checkouts_keep_the_credential_services_answer() {
        use crate::pool::seaorm::acquire_err;
        let answered = |status, retry_after| Error::Connect {
            source: std::sync::Arc::new(Error::Http {
                endpoint: "https://example.cloud.databricks.com/oidc/v1/token".to_owned(),
                status,
                code: "code".to_owned(),
                message: "message".to_owned(),
                retry_after,
            }),
        };
        let refused = Error::from(acquire_err(answered(401, None)));
        assert!(refused.is_auth_failure(), "{refused:?}");
        assert!(!refused.is_retryable(), "{refused:?}");
        assert!(
            ErrorChain(&refused).to_string().contains("HTTP 401"),
            "{refused:?}"
        );
        let busy = Error::from(acquire_err(answered(429, Some(Duration::from_secs(30)))));
        assert!(busy.is_retryable(), "{busy:?}");
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(30)));
        // The same, made by hand rather than through `From`.
        let by_hand = Error::SeaOrm(acquire_err(answered(401, None)));
        assert!(by_hand.is_auth_failure(), "{by_hand:?}");
        assert!(!by_hand.is_retryable() && !by_hand.is_connection_failure());
        let by_hand = Error::SeaOrm(acquire_err(answered(429, Some(Duration::from_secs(30)))));
        assert_eq!(by_hand.retry_after(), Some(Duration::from_secs(30)));
        // A transaction that could not begin for it is not run again.
        let begin = Failure::Begin(Error::from(acquire_err(answered(401, None))));
        assert!(begin.classify().is_err());
    }

    #[cfg(feature = "diesel")]
    #[tokio::test(start_paused = true)]
    async fn exhausted_retries_report_the_attempts_and_the_last_error() {
        let three = RetryPolicy::builder().attempts(3).build().unwrap();
        let tx = Transactions::new(Target::Postgres, three);
        let started = std::time::Instant::now();
        for attempt in 1..3 {
            tx.after(
                "diesel",
                attempt,
                started,
                Failure::Work(serialization_failure()),
            )
            .await
            .expect("retried");
        }
        let err = tx
            .after("diesel", 3, started, Failure::Work(serialization_failure()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::RetriesExhausted { attempts: 3, .. }),
            "{err:?}"
        );
        assert_eq!(err.sqlstate(), Some("40001"));
        assert!(err.is_conflict());
    }

    #[tokio::test]
    async fn dsql_refuses_savepoints_before_sending_anything() {
        let tx = Transactions::new(Target::Dsql, RetryPolicy::default());
        assert!(matches!(
            tx.refuse_savepoint(),
            Err(Error::SavepointUnsupported)
        ));
        let tx = Transactions::new(Target::Lakebase, RetryPolicy::default());
        assert!(tx.refuse_savepoint().is_ok());
    }
}
