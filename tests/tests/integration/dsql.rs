//! Aurora DSQL IAM tokens: with a fixed clock and fixed keys the token is known in advance,
//! so the local server's role can be given it as its password; both ORMs then log in with it.

use std::sync::Arc;
use std::time::SystemTime;

use dal::credentials::{Clock, CredentialSource, Dsql};
use dal::diesel_async::RunQueryDsl;
use dal::{Config, Connector, Credentials, Target};
use migration::MigratorTrait;

const HOST: &str = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";

struct Fixed(SystemTime);

impl Clock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn source(user: &str, clock: &Arc<Fixed>) -> Dsql {
    Dsql::new(HOST, user, None)
        .unwrap()
        .with_clock(Arc::clone(clock) as Arc<dyn Clock>)
        .with_static_credentials(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
        )
}

#[derive(diesel::QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

#[tokio::test]
async fn admin_and_custom_roles_log_in_with_iam_tokens() {
    let pg = tests::server().await;
    let clock = Arc::new(Fixed(SystemTime::now()));

    // admin: DbConnectAdmin, schema public.
    let admin_token = source("admin", &clock).fetch().await.unwrap();
    assert!(
        admin_token
            .expose()
            .starts_with(&format!("{HOST}/?Action=DbConnectAdmin&")),
        "unexpected token shape"
    );
    pg.create_role("admin", admin_token.expose(), None)
        .await
        .unwrap();
    pg.create_database("dsql", Some("admin")).await.unwrap();
    let config = Config::new("localhost", "admin")
        .port(pg.port())
        .database("dsql")
        .ssl_root_cert(pg.ca_cert_path())
        .credentials(Credentials::source(source("admin", &clock)));
    let connector = Connector::new(config)
        .await
        .expect("admin logs in with its token");
    assert_eq!(connector.target(), Target::Dsql);
    let db = connector.seaorm().await.unwrap();
    migration::Migrator::up(&db, None).await.unwrap();
    let diesel = connector.diesel_pool().await.unwrap();
    tests::seaorm_round_trip(&db, "dsql-admin").await;
    tests::diesel_round_trip(&diesel, "dsql-admin").await;
    connector.shutdown().await;

    // A custom role: DbConnect, and its own schema on every pooled connection.
    let app_token = source("app", &clock).fetch().await.unwrap();
    assert!(
        app_token
            .expose()
            .starts_with(&format!("{HOST}/?Action=DbConnect&"))
    );
    pg.create_role("app", app_token.expose(), None)
        .await
        .unwrap();
    let admin = pg.admin("dsql").await.unwrap();
    admin
        .batch_execute("CREATE SCHEMA app AUTHORIZATION app; GRANT USAGE ON SCHEMA public TO app")
        .await
        .unwrap();
    let config = Config::new("localhost", "app")
        .port(pg.port())
        .database("dsql")
        .ssl_root_cert(pg.ca_cert_path())
        .credentials(Credentials::source(source("app", &clock)));
    let connector = Connector::new(config)
        .await
        .expect("app logs in with its token");
    let diesel = connector.diesel_pool().await.unwrap();
    let mut conn = diesel.get().await.unwrap();
    let sp: Setting = diesel::sql_query("SELECT current_setting('search_path') AS value")
        .get_result(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sp.value, "app");
    let db = connector.seaorm().await.unwrap();
    use sea_orm::{ConnectionTrait, Statement};
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_setting('search_path') AS sp",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get::<String>("", "sp").unwrap(), "app");
    connector.shutdown().await;
}
