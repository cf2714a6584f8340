//! Retrying: one [`Backoff`] (exponential, capped, with jitter) used by every retry loop of
//! the crate (token fetches, background refreshes, transactions), and the [`RetryPolicy`] of
//! transactions.

use std::time::Duration;

use crate::error::{Error, Result, Setting};

/// Pauses between attempts: `min` doubled per attempt, capped at `max`, then moved at random
/// by up to `jitter` (a fraction) either way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
    pub(crate) jitter: f64,
}

impl Backoff {
    pub(crate) const fn new(min: Duration, max: Duration, jitter: f64) -> Self {
        Self { min, max, jitter }
    }

    /// The pause after attempt `attempt` (counting from 1) failed.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let base = self.min.saturating_mul(1 << doublings).min(self.max);
        if self.jitter == 0.0 {
            return base;
        }
        let factor = 1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0);
        // A delay near `Duration::MAX` ("no cap") times more than 1 is as long as can be.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor.max(0.0)).unwrap_or(Duration::MAX)
    }
}

/// How often and how fast a transaction is run again after a conflict.
///
/// Defaults to a budget of time, not of attempts: new attempts start for up to 20 s after
/// the first, with exponential backoff from 2 ms to 500 ms and full jitter (each pause
/// anywhere between none and twice its base, so that contenders spread out). A count gives
/// up on the unlucky: a transaction that just committed starts its next at once, in the
/// gap its commit opened, so a first attempt wins far more often than a retry. With sixteen
/// tasks hammering three rows under `SERIALIZABLE`, about four in five transactions
/// committed at their first attempt while each retry of one that had lost three times won
/// only about one time in four; the unluckiest of 640 needed 13 to 17 attempts, and a bound
/// of 20 attempts gave up on one on a busy machine. Within 20 s such a transaction gets
/// about 45. The Aurora DSQL connectors' own defaults (3 attempts, 1 ms to 100 ms, 25 %
/// jitter) gave up on 294 of 640 such transfers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    attempts: u32,
    backoff: Backoff,
    max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: u32::MAX,
            backoff: Backoff::new(Duration::from_millis(2), Duration::from_millis(500), 1.0),
            max_elapsed: Some(Duration::from_secs(20)),
        }
    }
}

impl RetryPolicy {
    /// A policy to adjust; [`RetryPolicyBuilder::build`] checks it.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder(Self::default())
    }

    /// One attempt: a conflict is returned to the caller at once.
    pub fn no_retries() -> Self {
        Self {
            attempts: 1,
            ..Self::default()
        }
    }

    /// Attempts in all, the first included; `u32::MAX` (the default): no bound but
    /// [`max_elapsed`](Self::max_elapsed).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// No attempt starts later than this after the first; `None`: no bound.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The pause before attempt `attempt + 1`, or `None` when the policy gives up: all
    /// attempts made, or the next would start more than [`max_elapsed`](Self::max_elapsed)
    /// after the first (`elapsed` is the time since then).
    pub fn next_delay(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        if attempt >= self.attempts {
            return None;
        }
        let delay = self.delay(attempt);
        match self.max_elapsed {
            Some(budget) if elapsed.saturating_add(delay) > budget => None,
            _ => Some(delay),
        }
    }

    /// The pause before attempt `attempt + 1` (`attempt` counts from 1): `min_delay` doubled
    /// per attempt, capped at `max_delay`, then moved by up to `jitter` either way.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.backoff.delay(attempt)
    }
}

/// Builds a [`RetryPolicy`]; see there for the defaults.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicyBuilder(RetryPolicy);

impl RetryPolicyBuilder {
    /// Attempts in all, the first included; at least 1. Defaults to `u32::MAX`: as many as
    /// [`max_elapsed`](Self::max_elapsed) allows.
    #[must_use]
    pub fn attempts(mut self, attempts: u32) -> Self {
        self.0.attempts = attempts;
        self
    }

    /// The first pause and the longest one. Defaults to 2 ms and 500 ms.
    #[must_use]
    pub fn delays(mut self, min: Duration, max: Duration) -> Self {
        self.0.backoff.min = min;
        self.0.backoff.max = max;
        self
    }

    /// The delays from seconds, which may come from user input: a negative or non-finite
    /// value is rejected here, with [`Error::Config`] for [`Setting::RetryDelays`].
    pub fn delays_secs(self, min: f64, max: f64) -> Result<Self> {
        let parse = |v: f64, what: &str| {
            Duration::try_from_secs_f64(v).map_err(|_| {
                Error::config(
                    Setting::RetryDelays,
                    format!("{what} {v} is not a non-negative number of seconds"),
                )
            })
        };
        Ok(self.delays(parse(min, "min_delay")?, parse(max, "max_delay")?))
    }

    /// No attempt starts later than `budget` after the first; `None`: no bound, which needs
    /// a bound on [`attempts`](Self::attempts). Defaults to 20 s.
    #[must_use]
    pub fn max_elapsed(mut self, budget: Option<Duration>) -> Self {
        self.0.max_elapsed = budget;
        self
    }

    /// The fraction by which each pause moves at random, up or down; 0 to 1. Defaults to 1
    /// (full jitter).
    #[must_use]
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.0.backoff.jitter = fraction;
        self
    }

    /// The policy, or [`Error::Config`] for zero attempts, neither attempts nor time bounded
    /// (retrying forever), a minimum delay above the maximum, or a jitter outside 0..=1.
    pub fn build(self) -> Result<RetryPolicy> {
        let p = self.0;
        if p.attempts == 0 {
            return Err(Error::config(Setting::RetryAttempts, "must be at least 1"));
        }
        if p.attempts == u32::MAX && p.max_elapsed.is_none() {
            return Err(Error::config(
                Setting::RetryAttempts,
                "with no max_elapsed, a transaction would be retried forever: set attempts, such as 20, or keep a max_elapsed",
            ));
        }
        if p.backoff.min > p.backoff.max {
            return Err(Error::config(
                Setting::RetryDelays,
                "the minimum delay must not exceed the maximum",
            ));
        }
        if !(0.0..=1.0).contains(&p.backoff.jitter) {
            return Err(Error::config(
                Setting::RetryJitter,
                "must be a fraction between 0 and 1, such as 0.25",
            ));
        }
        Ok(p)
    }
}
