//! The Diesel `table!` definitions and the SeaORM entities describe the columns that the
//! migrations really create: names, SQL types and nullability, read from `information_schema`.

use std::collections::BTreeMap;

use dal::diesel::{Column, Expression, Table};
use entity::schema::{customers, order_items, orders};
use sea_orm::{ColumnTrait, EntityTrait, IdenStatic, Iterable};

/// `column name -> (SQL type, nullable)`.
type Columns = BTreeMap<String, (String, bool)>;

async fn database_columns(client: &tokio_postgres::Client, table: &str) -> Columns {
    client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable = 'YES' \
             FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1",
            &[&table],
        )
        .await
        .expect("read information_schema")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// The SQL type PostgreSQL reports for a Diesel SQL type, and whether it is nullable.
fn diesel_sql_type<C: Expression>() -> (String, bool) {
    let name = std::any::type_name::<C::SqlType>();
    let (nullable, inner) = match name.split_once("Nullable<") {
        Some((_, rest)) => (true, rest.trim_end_matches('>')),
        None => (false, name),
    };
    let sql = match inner.rsplit("::").next().unwrap() {
        "Uuid" => "uuid",
        "Text" => "text",
        "Integer" => "integer",
        "BigInt" => "bigint",
        "Timestamptz" => "timestamp with time zone",
        other => panic!("add {other} to the parity test's type map"),
    };
    (sql.to_owned(), nullable)
}

/// Lists the columns of a Diesel table from its `all_columns` tuple.
trait DieselColumns {
    fn describe(out: &mut Columns);
}

macro_rules! impl_diesel_columns {
    ($($c:ident),+) => {
        impl<$($c: Column),+> DieselColumns for ($($c,)+) {
            fn describe(out: &mut Columns) {
                $(out.insert($c::NAME.to_owned(), diesel_sql_type::<$c>());)+
            }
        }
    };
}
impl_diesel_columns!(A, B, C, D);
impl_diesel_columns!(A, B, C, D, E);

fn diesel_columns<T: Table>() -> Columns
where
    T::AllColumns: DieselColumns,
{
    let mut out = Columns::new();
    T::AllColumns::describe(&mut out);
    out
}

fn seaorm_columns<E: EntityTrait>() -> Columns {
    E::Column::iter()
        .map(|c| {
            let def = c.def();
            let sql = match def.get_column_type() {
                sea_orm::ColumnType::Uuid => "uuid",
                sea_orm::ColumnType::Text | sea_orm::ColumnType::String(_) => "text",
                sea_orm::ColumnType::Integer => "integer",
                sea_orm::ColumnType::BigInteger => "bigint",
                sea_orm::ColumnType::TimestampWithTimeZone => "timestamp with time zone",
                other => panic!("add {other:?} to the parity test's type map"),
            };
            (c.as_str().to_owned(), (sql.to_owned(), def.is_null()))
        })
        .collect()
}

#[tokio::test]
async fn both_orms_match_the_migrated_columns() {
    let pg = tests::server().await;
    tests::migrated(&pg, "parity").await;
    let client = pg.admin("parity").await.expect("connect");

    let cases: [(&str, Columns, Columns); 3] = [
        (
            "customers",
            diesel_columns::<customers::table>(),
            seaorm_columns::<entity::customer::Entity>(),
        ),
        (
            "orders",
            diesel_columns::<orders::table>(),
            seaorm_columns::<entity::order::Entity>(),
        ),
        (
            "order_items",
            diesel_columns::<order_items::table>(),
            seaorm_columns::<entity::order_item::Entity>(),
        ),
    ];
    for (table, diesel, seaorm) in cases {
        let database = database_columns(&client, table).await;
        assert!(!database.is_empty(), "table {table} is missing");
        assert_eq!(
            diesel, database,
            "Diesel schema of {table} differs from the database"
        );
        assert_eq!(
            seaorm, database,
            "SeaORM entity of {table} differs from the database"
        );
    }
}
