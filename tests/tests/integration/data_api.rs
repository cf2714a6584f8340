//! The Lakebase Data API client against the local service's PostgREST-compatible subset over
//! the sample schema, with the connector's own token cache: reads, writes, PostgREST's
//! errors, and a refused token replaced without failing the request.

use std::time::Duration;

use dal::lakebase::DataApi;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn the_data_api_reads_and_writes_with_the_pools_tokens() {
    let pg = tests::server().await;
    let lb = tests::lakebase(&pg, "rest", Duration::from_secs(60)).await;
    let (connector, db) = tests::migrated_connector(lb.client_config(&pg, "rest").unwrap()).await;
    let api = DataApi::new(&lb.data_api_url("rest"), connector.cache().clone())
        .unwrap()
        .with_product("acme_orders/1.0")
        .unwrap();

    let rows = json!([
        { "id": uuid::Uuid::now_v7(), "email": "ada@example.com", "name": "Ada" },
        { "id": uuid::Uuid::now_v7(), "email": "bob@example.com", "name": "Bob" },
    ]);
    let stored = api.from("customers").insert(&rows).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert!(
        stored[0]["created_at"].is_string(),
        "defaults are filled: {stored:?}"
    );

    let found = api
        .from("customers")
        .select(&["email", "name"])
        .filter("email", "like", "*@example.com")
        .order("name", false)
        .limit(1)
        .get()
        .await
        .unwrap();
    assert_eq!(
        found,
        vec![json!({ "email": "bob@example.com", "name": "Bob" })]
    );

    let updated = api
        .from("customers")
        .eq("email", "ada@example.com")
        .update(&json!({ "name": "Ada L." }))
        .await
        .unwrap();
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0]["name"], "Ada L.");

    // PostgREST's errors, with the SQLSTATE as code.
    let code = |e: dal::Error| match e {
        dal::Error::Http { status, code, .. } => (status, code),
        other => panic!("not an HTTP error: {other:?}"),
    };
    let duplicate = api.from("customers").insert(&rows[0]).await.unwrap_err();
    assert_eq!(code(duplicate), (409, "23505".to_owned()));
    let missing = api.from("nothing_here").get().await.unwrap_err();
    assert_eq!(code(missing), (404, "42P01".to_owned()));
    // A name that a URL path resolves away (to the Data API's own URL or the one above it)
    // is refused before the token is sent anywhere.
    for name in ["", ".", ".."] {
        match api.from(name).get().await {
            Err(dal::Error::Config { setting, .. }) => {
                assert_eq!(setting, dal::Setting::DataApiUrl, "{name:?}")
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    let column = api
        .from("customers")
        .eq("nope", "1")
        .get()
        .await
        .unwrap_err();
    assert_eq!(code(column), (400, "42703".to_owned()));

    // A token the service refuses is replaced, and the request still succeeds.
    let fetches = lb.credential_requests();
    lb.revoke(connector.cache().current().unwrap().expose());
    let deleted = api
        .from("customers")
        .filter("email", "in", "(ada@example.com,bob@example.com)")
        .delete()
        .await
        .unwrap();
    assert_eq!(deleted.len(), 2);
    assert!(
        lb.credential_requests() > fetches,
        "a new credential was fetched"
    );
    assert!(api.from("customers").get().await.unwrap().is_empty());
    drop(db);
    connector.shutdown().await;
}
