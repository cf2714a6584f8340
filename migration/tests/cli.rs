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

fn migrate(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_migration"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run the migration binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// sea-orm-migration's `-u` and `-s` (and `DATABASE_SCHEMA`) are refused rather than ignored:
/// the command connects with dal's settings, so `-u <dev> fresh` with a production
/// `DATABASE_URL` in the environment would have dropped production.
#[test]
fn options_this_command_does_not_apply_are_refused() {
    let prod = ("DATABASE_URL", "postgres://app:pw@127.0.0.1:1/prod");
    for args in [
        &["-u", "postgres://app:pw@127.0.0.1:1/dev", "fresh"][..],
        &["--database-url=postgres://app:pw@127.0.0.1:1/dev", "fresh"],
        &["fresh", "-s", "other"],
    ] {
        let (code, _, stderr) = migrate(args, &[prod]);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: -"), "{args:?}: {stderr}");
        assert!(stderr.contains("is not applied"), "{args:?}: {stderr}");
    }
    let (code, _, stderr) = migrate(&["status"], &[prod, ("DATABASE_SCHEMA", "other")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("DAL_SEARCH_PATH"), "{stderr}");
}

/// Help needs no database: it is printed whatever the settings, and nothing starts.
#[test]
fn help_reads_no_configuration() {
    let (code, stdout, stderr) = migrate(&["--help"], &[("DATABASE_URL", "not a url")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("Usage: migration"), "{stdout}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// A command line clap refuses (a misspelt command) is refused before anything is read or
/// started: `upp` started the embedded database first, and only then printed the usage.
#[test]
fn a_misspelt_command_is_refused_before_any_database() {
    let (code, _, stderr) = migrate(&["upp"], &[("DATABASE_URL", "not a url")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("unrecognized subcommand 'upp'"), "{stderr}");
    assert!(!stderr.contains("DATABASE_URL"), "{stderr}");
}

/// Help shows no setting's value: sea-orm-migration's options read `DATABASE_URL`, and the
/// usage printed it, password and all (`[env: DATABASE_URL=postgres://u:pw@...]`).
#[test]
fn help_shows_no_password() {
    for args in [&["--help"][..], &["up", "--help"], &["help"]] {
        let (code, stdout, stderr) =
            migrate(args, &[("DATABASE_URL", "postgres://u:s3cret-pw@h/db")]);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert!(!stdout.contains("s3cret-pw"), "{args:?}: {stdout}");
        assert!(!stderr.contains("s3cret-pw"), "{args:?}: {stderr}");
    }
}

/// A `.env` that cannot be read stops the command, naming the file, the line's number and its
/// variable, and never the value, which may hold a password. Ignored, it left every setting after its bad line unset: the
/// command went on without them (no `sslmode`, another schema, or the embedded database).
#[test]
fn a_malformed_env_file_stops_the_command_without_showing_its_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "DATABASE_URL=postgres://app@127.0.0.1:1/app\nPGPASSWORD=s3cret pw\nDAL_SEARCH_PATH=app\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_migration"))
        .arg("status")
        .current_dir(dir.path())
        .output()
        .expect("run the migration binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: cannot read .env"), "{stderr}");
    assert!(stderr.contains("line 2 (PGPASSWORD)"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// An argument that is not UTF-8 is clap's to refuse, with its usage, not a panic.
#[test]
fn an_argument_that_is_not_utf8_is_refused_without_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    // Where nothing is kept, should a later version take the name.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_migration"))
        .current_dir(dir.path())
        .arg("generate")
        .arg(std::ffi::OsStr::from_bytes(b"\xff"))
        .output()
        .expect("run the migration binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
