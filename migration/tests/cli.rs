//! Bad input to the migration command line: one readable line, exit status 1, no panic.

use std::process::Command;

fn migrate_with_url(url: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_migration"))
        .arg("status")
        .env("DATABASE_URL", url)
        .output()
        .expect("run the migration binary");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn a_malformed_database_url_is_named() {
    let (code, stderr) = migrate_with_url("not a url");
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.starts_with("error: invalid setting DATABASE_URL: must start with postgres://"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unreachable_database_is_reported_without_the_password() {
    // Nothing listens on port 1 of the loopback interface.
    let (code, stderr) = migrate_with_url("postgres://app:s3cret-pw@127.0.0.1:1/app");
    assert_eq!(code, 1, "{stderr}");
    // The server it was for, then the cause.
    assert!(
        stderr.starts_with("error: cannot migrate 127.0.0.1:1 (database app, user app): "),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
