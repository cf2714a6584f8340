//! Every program, given bad settings, exits with code 1 and one readable line naming the
//! cause: no panic, no backtrace. None of these cases needs a database.
//!
//! Being an integration test of this package also makes `cargo test --workspace` build the
//! programs, which the `tests` crate then runs against real servers.

use std::process::Command;

const PROGRAMS: [&str; 6] = [
    env!("CARGO_BIN_EXE_tour"),
    env!("CARGO_BIN_EXE_seaorm_tour"),
    env!("CARGO_BIN_EXE_diesel_tour"),
    env!("CARGO_BIN_EXE_web_app"),
    env!("CARGO_BIN_EXE_one_shot"),
    env!("CARGO_BIN_EXE_background_task"),
];

/// A loopback port nothing listens on, for as long as the socket returned is held: bound
/// and never listening, so connections to it are refused, and no other program takes it.
fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// Runs `program` with only `vars` set, away from any `.env`; returns its stderr.
fn fails(program: &str, vars: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(program)
        .env_clear()
        .envs(vars.iter().copied())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{program} {vars:?}: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{program} {vars:?}: one error line: {stderr}"
    );
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{program} {vars:?}: {stderr}");
    }
    errors[0].to_owned()
}

#[test]
fn malformed_variables_are_named() {
    for program in PROGRAMS {
        let line = fails(
            program,
            &[
                ("DATABASE_URL", "postgres://u:p@127.0.0.1/db"),
                ("PGPORT", "54x32"),
            ],
        );
        assert!(line.contains("invalid setting PGPORT"), "{line}");
        let line = fails(program, &[("DAL_LOCAL_TOKEN_TTL_SECS", "soon")]);
        assert!(
            line.contains("invalid setting DAL_LOCAL_TOKEN_TTL_SECS"),
            "{line}"
        );
        let line = fails(program, &[("DATABASE_URL", "mysql://u:p@127.0.0.1/db")]);
        assert!(line.contains("DATABASE_URL"), "{line}");
    }
    let line = fails(env!("CARGO_BIN_EXE_web_app"), &[("PORT", "http")]);
    assert!(line.contains("invalid setting PORT"), "{line}");
    let line = fails(
        env!("CARGO_BIN_EXE_background_task"),
        &[("BACKGROUND_IDLE_MS", "9..1")],
    );
    assert!(
        line.contains("invalid setting BACKGROUND_IDLE_MS"),
        "{line}"
    );
    // Past the pool's longest lifetime: named as the program's own variable, and before
    // any connection is tried (the port is closed).
    let (_closed, port) = closed_port();
    let url = format!("postgres://u:p@127.0.0.1:{port}/db");
    let line = fails(
        env!("CARGO_BIN_EXE_background_task"),
        &[
            ("DATABASE_URL", &url),
            ("BACKGROUND_CONNECTION_LIFETIME_SECS", "31536001"),
        ],
    );
    assert!(
        line.contains("invalid setting BACKGROUND_CONNECTION_LIFETIME_SECS"),
        "{line}"
    );
}

#[test]
fn an_unreachable_database_is_named() {
    let (_closed, port) = closed_port();
    let url = format!("postgres://u:secret-pw@127.0.0.1:{port}/db");
    for program in PROGRAMS {
        let line = fails(program, &[("DATABASE_URL", &url)]);
        assert!(
            line.contains("cannot open a connection to 127.0.0.1")
                && line.contains("PGHOST and PGPORT, DATABASE_URL"),
            "{line}"
        );
        assert!(!line.contains("secret-pw"), "{line}");
    }
}

#[test]
fn an_unreachable_credential_service_is_named() {
    let (_closed, port) = closed_port();
    let host = format!("http://127.0.0.1:{port}");
    for program in PROGRAMS {
        let line = fails(
            program,
            &[
                ("DATABRICKS_HOST", &host),
                ("DATABRICKS_CLIENT_ID", "id"),
                ("DATABRICKS_CLIENT_SECRET", "dose-secret"),
                ("LAKEBASE_ENDPOINT", "projects/p/branches/b/endpoints/e"),
                ("PGHOST", "localhost"),
            ],
        );
        assert!(
            line.contains("cannot reach the credential service"),
            "{line}"
        );
        assert!(!line.contains("dose-secret"), "{line}");
    }
}
