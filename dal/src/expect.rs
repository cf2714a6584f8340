//! Result expectations, after pg-promise's query result masks: say how many rows a query
//! may return, and get a typed [`Error::RowCount`] saying how many came back otherwise.
//!
//! They take the future of any query that loads rows, so one set serves both ORMs:
//!
//! ```no_run
//! # #[cfg(all(feature = "seaorm", feature = "diesel"))]
//! # async fn demo(db: &dal::SeaOrmPool, conn: &mut dal::diesel_async::AsyncPgConnection) -> dal::Result<()> {
//! use dal::diesel::QueryDsl;
//! use dal::diesel_async::RunQueryDsl;
//! use sea_orm::EntityTrait;
//!
//! let customer = dal::expect::exactly_one(entity::customer::Entity::find().all(db)).await?;
//! let order: Option<entity::models::Order> =
//!     dal::expect::at_most_one(entity::schema::orders::table.limit(2).load(conn)).await?;
//! # let _ = (customer, order);
//! # Ok(()) }
//! ```
//!
//! The rows are loaded before they are counted: bound the query (`LIMIT 2`) where it could
//! return many.

use std::future::Future;

pub use crate::error::Rows;
use crate::error::{Error, Result};

/// Checks `rows` against `expected`.
fn check<T>(expected: Rows, rows: &[T]) -> Result<()> {
    let ok = match expected {
        Rows::ExactlyOne => rows.len() == 1,
        Rows::AtMostOne => rows.len() <= 1,
        Rows::AtLeastOne => !rows.is_empty(),
        Rows::None => rows.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::RowCount {
            expected,
            actual: rows.len(),
        })
    }
}

async fn load<T, E: Into<Error>>(
    query: impl Future<Output = std::result::Result<Vec<T>, E>>,
    expected: Rows,
) -> Result<Vec<T>> {
    let rows = query.await.map_err(Into::into)?;
    check(expected, &rows)?;
    Ok(rows)
}

/// The one row `query` returns; [`Error::RowCount`] when it returns none or several.
pub async fn exactly_one<T, E: Into<Error>>(
    query: impl Future<Output = std::result::Result<Vec<T>, E>>,
) -> Result<T> {
    let mut rows = load(query, Rows::ExactlyOne).await?;
    Ok(rows.remove(0))
}

/// The row `query` returns, if any; [`Error::RowCount`] when it returns several.
pub async fn at_most_one<T, E: Into<Error>>(
    query: impl Future<Output = std::result::Result<Vec<T>, E>>,
) -> Result<Option<T>> {
    Ok(load(query, Rows::AtMostOne).await?.pop())
}

/// The rows `query` returns; [`Error::RowCount`] when it returns none.
pub async fn at_least_one<T, E: Into<Error>>(
    query: impl Future<Output = std::result::Result<Vec<T>, E>>,
) -> Result<Vec<T>> {
    load(query, Rows::AtLeastOne).await
}

/// Nothing; [`Error::RowCount`] when `query` returns any row.
pub async fn none<T, E: Into<Error>>(
    query: impl Future<Output = std::result::Result<Vec<T>, E>>,
) -> Result<()> {
    load(query, Rows::None).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize) -> impl Future<Output = Result<Vec<usize>>> {
        std::future::ready(Ok((0..n).collect()))
    }

    fn count(e: Error) -> (Rows, usize) {
        match e {
            Error::RowCount { expected, actual } => (expected, actual),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn each_expectation_for_zero_one_and_two_rows() {
        use Rows::{AtLeastOne, AtMostOne, ExactlyOne};
        assert_eq!(
            count(exactly_one(rows(0)).await.unwrap_err()),
            (ExactlyOne, 0)
        );
        assert_eq!(exactly_one(rows(1)).await.unwrap(), 0);
        assert_eq!(
            count(exactly_one(rows(2)).await.unwrap_err()),
            (ExactlyOne, 2)
        );

        assert_eq!(at_most_one(rows(0)).await.unwrap(), None);
        assert_eq!(at_most_one(rows(1)).await.unwrap(), Some(0));
        assert_eq!(
            count(at_most_one(rows(2)).await.unwrap_err()),
            (AtMostOne, 2)
        );

        assert_eq!(
            count(at_least_one(rows(0)).await.unwrap_err()),
            (AtLeastOne, 0)
        );
        assert_eq!(at_least_one(rows(1)).await.unwrap(), vec![0]);
        assert_eq!(at_least_one(rows(2)).await.unwrap(), vec![0, 1]);

        none(rows(0)).await.unwrap();
        assert_eq!(count(none(rows(1)).await.unwrap_err()), (Rows::None, 1));
        assert_eq!(count(none(rows(2)).await.unwrap_err()), (Rows::None, 2));
    }

    #[tokio::test]
    async fn the_message_says_how_many_rows_came_back() {
        let e = exactly_one(rows(2)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected exactly one row, but 2 row(s) came back"
        );
        assert_eq!(e.row_count(), Some(2));
    }

    #[tokio::test]
    async fn query_errors_pass_through() {
        let failing = std::future::ready(Err::<Vec<u8>, _>(Error::abort("the query failed")));
        let e = exactly_one(failing).await.unwrap_err();
        assert!(matches!(e, Error::Aborted(_)), "{e:?}");
    }
}
