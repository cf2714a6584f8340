//! A branch per test on the local service's model of Lakebase Autoscaling projects: created
//! from the default branch, migrated and queried through its own endpoint, deleted, and
//! nothing left behind.

use std::time::Duration;

use futures_util::FutureExt;

use dal::lakebase::{Management, TemporaryBranch};
use dal::local::{LocalLakebase, LocalLakebaseConfig};
use sea_orm::{ConnectionTrait, Statement};

#[tokio::test(flavor = "multi_thread")]
async fn a_test_gets_a_branch_of_its_own_and_leaves_nothing_behind() {
    let pg = tests::server().await;
    let (lb, api) = trunk(&pg).await;
    let project = "projects/local";
    let before = api.list_branches(project).await.unwrap();
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].default);

    let branch = TemporaryBranch::create(&api, project, None).await.unwrap();
    assert_eq!(
        api.get_branch(branch.branch())
            .await
            .unwrap()
            .state
            .as_deref(),
        Some("READY")
    );
    let host = branch.endpoint().host.clone().unwrap();
    assert_ne!(host, "localhost", "the branch has an endpoint of its own");

    // Migrations and a query on the branch, through its endpoint, with the same database name.
    let base = lb.client_config(&pg, "trunk").unwrap();
    let (connector, db) = tests::migrated_connector(branch.config(&base).unwrap()).await;
    let tables = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT current_database() AS db, count(*)::bigint AS n FROM pg_tables \
             WHERE schemaname = 'public'",
        ))
        .await
        .unwrap()
        .unwrap();
    let on_branch: i64 = tables.try_get("", "n").unwrap();
    assert!(on_branch > 1, "the migrations created tables on the branch");
    let copy: String = tables.try_get("", "db").unwrap();
    assert_ne!(copy, "trunk", "the session runs on the branch's copy");
    tests::seaorm_round_trip(&db, "branch").await;
    // The default branch did not change.
    let trunk = pg.admin("trunk").await.unwrap();
    let on_trunk: i64 = trunk
        .query_one(
            "SELECT count(*)::bigint FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_trunk, 0, "the branch's migrations stayed on the branch");
    drop(db);
    connector.shutdown().await;

    let name = branch.branch().to_owned();
    branch.delete().await.unwrap();
    let after = api.list_branches(project).await.unwrap();
    assert_eq!(after, before, "the branch is gone");
    assert!(api.get_branch(&name).await.is_err());
    assert_eq!(databases_left(&pg).await, 0, "no database is left behind");
    // The endpoint's listener ends with its task, which the deletion aborted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect((host.as_str(), pg.port()))
        .await
        .is_ok()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the endpoint still listens"
        );
        tokio::task::yield_now().await;
    }
}

/// The local service with a `trunk` default branch, and its management API.
async fn trunk(pg: &dal::local::LocalPostgres) -> (LocalLakebase, Management) {
    let lb = LocalLakebase::start(
        pg,
        LocalLakebaseConfig::new()
            .with_database("trunk")
            .with_token_ttl(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    pg.create_database("trunk", Some(&lb.config().role))
        .await
        .unwrap();
    let api = Management::new(lb.source().unwrap());
    (lb, api)
}

/// The databases beside the cluster's own and `trunk`: the branches' copies.
async fn databases_left(pg: &dal::local::LocalPostgres) -> i64 {
    let admin = pg.admin("postgres").await.unwrap();
    admin
        .query_one(
            "SELECT count(*)::bigint FROM pg_database WHERE datname <> ALL($1)",
            &[&vec!["postgres", "template0", "template1", "trunk"]],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until the project's branches are `want`, for at most a minute.
async fn wait_for_branches(api: &Management, want: &[dal::lakebase::Branch], why: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = api.list_branches("projects/local").await.unwrap();
        if now == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{why}: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A branch whose creation was carried out but answered with an error, as a gateway that gave
/// up waiting answers (HTTP 504): the branch may exist, so it is deleted. Before, the error
/// was taken for the service's word that nothing was created, and the branch was left.
#[tokio::test(flavor = "multi_thread")]
async fn a_branch_whose_creation_met_a_gateway_error_is_deleted() {
    let pg = tests::server().await;
    let (lb, api) = trunk(&pg).await;
    let before = api.list_branches("projects/local").await.unwrap();
    lb.fail_after_next(1, 504);
    let err = TemporaryBranch::create(&api, "projects/local", None)
        .await
        .map(drop)
        .unwrap_err();
    assert!(err.to_string().contains("504"), "{err}");
    wait_for_branches(
        &api,
        &before,
        "the branch of a creation answered 504 is left",
    )
    .await;
}

/// A branch whose creation, or deletion, was dropped half way (a timeout around it, a test
/// that failed) is deleted all the same: nothing is left behind to pay for.
#[tokio::test(flavor = "multi_thread")]
async fn a_branch_whose_creation_or_deletion_was_dropped_is_deleted() {
    let pg = tests::server().await;
    let (_lb, api) = trunk(&pg).await;
    let before = api.list_branches("projects/local").await.unwrap();

    // A session on the source holds the copy back (`CREATE DATABASE ... TEMPLATE` waits for
    // it), so the creation is dropped while it waits for the branch to get ready.
    let session = pg.admin("trunk").await.unwrap();
    let creating = tokio::spawn({
        let api = api.clone();
        async move { TemporaryBranch::create(&api, "projects/local", None).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while api.list_branches("projects/local").await.unwrap().len() == before.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no branch was asked for"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    creating.abort();
    assert!(creating.await.unwrap_err().is_cancelled());
    wait_for_branches(&api, &before, "the branch of a dropped creation is left").await;
    // Its copy of the database too, made after the deletion: once the session that makes
    // the copy (its last statement a `CREATE DATABASE`) is gone, no database is left.
    drop(session);
    let admin = pg.admin("postgres").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let copying: i64 = admin
            .query_one(
                "SELECT count(*)::bigint FROM pg_stat_activity \
                 WHERE query LIKE 'CREATE DATABASE%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if copying == 0 && databases_left(&pg).await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a database is left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A deletion dropped before its request went out.
    let branch = TemporaryBranch::create(&api, "projects/local", None)
        .await
        .unwrap();
    assert!(branch.delete().now_or_never().is_none());
    wait_for_branches(&api, &before, "the branch of a dropped deletion is left").await;
}
