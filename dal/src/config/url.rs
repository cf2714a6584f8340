//! `DATABASE_URL`: a libpq connection URI (`postgres://` or `postgresql://`), parsed by
//! tokio-postgres.
//!
//! tokio-postgres knows `sslmode` only up to `require` and has no `sslrootcert`; those two
//! are taken out of the query string first and read here, with libpq's full set of values.

use std::path::PathBuf;

use tokio_postgres::config::Host;

use super::settings::{Config, LONGEST_LIMIT};
use crate::error::{Error, ErrorChain, Result, Setting};

/// A static-password configuration from `url` over `defaults` (libpq's environment
/// variables): what the URL gives wins, and `password` (`PGPASSWORD`) and the defaults fill
/// what it leaves out, as in libpq. No error repeats the URL: it holds a password.
pub(super) fn from_url(url: &str, password: Option<String>, defaults: Config) -> Result<Config> {
    let bad = |reason: &str| {
        Error::config(
            Setting::DatabaseUrl,
            format!(
                "{reason}; expected postgres://user:password@host:port/database, with reserved \
                 characters (: / @ % # ? &) of the user and password percent-encoded"
            ),
        )
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(bad("must start with postgres:// or postgresql://"));
    }
    check_userinfo(url).map_err(|e| bad(&e))?;
    let (rest, ours) = split_params(url).map_err(|e| bad(&e))?;
    let port = match (check_port(url).map_err(|e| bad(&e))?, ours.port) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "gives the port twice, after the host and as port=: keep one",
            ));
        }
        (Some(port), None) => Some(port),
        // Not shown: after a password with a raw `&`, it may be the password's end.
        (None, Some(port)) => Some(
            parse_port(&port)
                .ok_or_else(|| bad("has a port= that is not a number from 1 to 65535"))?,
        ),
        (None, None) => None,
    };
    let parse = |url: &str| {
        url.parse::<tokio_postgres::Config>()
            .map_err(|e: tokio_postgres::Error| {
                // Its cause says which part, and names no value.
                let why = ErrorChain(&e);
                bad(&format!("is not a valid connection URL ({why})"))
            })
    };
    let parsed = parse(&rest)?;
    // tokio-postgres lets a parameter override the part before the query, as libpq does.
    if let Some((before, _)) = url.split_once('?')
        && !ours.given.is_empty()
    {
        let before = parse(before)?;
        for (key, part, place, given) in [
            (
                "user",
                "user name",
                "before",
                before.get_user().is_some_and(|u| !u.is_empty()),
            ),
            (
                "password",
                "password",
                "before",
                before.get_password().is_some(),
            ),
            (
                "dbname",
                "database name",
                "after",
                before.get_dbname().is_some_and(|d| !d.is_empty()),
            ),
        ] {
            if given && ours.given.contains(&key) {
                return Err(bad(&format!(
                    "gives the {part} twice, {place} the host and as {key}=: keep one"
                )));
            }
        }
    }
    let url_host = match parsed.get_hosts() {
        [] => None,
        [Host::Tcp(host)] => Some(host.as_str()).filter(|h| !h.is_empty()),
        [_] => return Err(bad("names a Unix socket; dal connects over TCP")),
        _ => return Err(bad("names several hosts; dal connects to one")),
    };
    let url_user = parsed.get_user().filter(|u| !u.is_empty());
    // Checked here as well as by the connector, so that the error names the URL, not the PG*
    // variable that would give the same value; what a PG* variable fills in is its own.
    for (part, value, space) in [
        ("host", url_host, false),
        ("user name", url_user, true),
        ("database name", parsed.get_dbname(), true),
        ("application_name", parsed.get_application_name(), true),
    ] {
        if let Some(c) = value.and_then(|v| super::unsendable(v, space)) {
            return Err(bad(&format!(
                "the {part} has the character {c:?}, which cannot be sent to the server"
            )));
        }
    }
    let host = match url_host {
        Some(host) => host.to_owned(),
        None if !defaults.host.is_empty() => defaults.host.clone(),
        None => return Err(bad("has no host, and PGHOST is not set")),
    };
    let user = match url_user {
        Some(user) => user.to_owned(),
        None if !defaults.user.is_empty() => defaults.user.clone(),
        None => return Err(bad("has no user name, and PGUSER is not set")),
    };
    let password = match (parsed.get_password(), password) {
        (Some(p), _) => String::from_utf8(p.to_vec())
            .map_err(|_| bad("has a password that is not valid UTF-8"))?,
        (None, Some(p)) => p,
        (None, None) => {
            return Err(bad(
                "has no password, and PGPASSWORD is not set (for token sources, use their own \
                 settings)",
            ));
        }
    };
    let mut config = Config {
        host,
        user,
        ..defaults
    }
    .password(password);
    // tokio-postgres reports its default port for a URL without one, which would hide
    // PGPORT.
    if let Some(port) = port {
        config.port = port;
    }
    match parsed.get_hostaddrs() {
        [] => {}
        [addr] => config.hostaddr = Some(*addr),
        _ => return Err(bad("names several hostaddrs; dal connects to one")),
    }
    if let Some(db) = parsed.get_dbname().filter(|d| !d.is_empty()) {
        config.database = db.to_owned();
    }
    if let Some(name) = parsed.get_application_name() {
        config.application_name = name.to_owned();
    }
    if let Some(timeout) = parsed.get_connect_timeout() {
        config.connect_timeout = *timeout;
    }
    if let Some(mode) = ours.ssl_mode {
        // A value that is no mode is not shown, as `port=`'s.
        config.ssl_mode = Some(mode.parse().map_err(|reason: String| match mode.as_str() {
            "allow" => bad(&format!("has sslmode={reason}")),
            _ => bad("sslmode= is not one of disable, prefer, require, verify-ca, verify-full"),
        })?);
    }
    if let Some(path) = ours.ssl_root_cert {
        config.ssl_root_cert = Some(PathBuf::from(path));
    }
    Ok(config)
}

/// The user name and password: a character the URL syntax reserves must be percent-encoded
/// there, and the usual mistake (a raw `#`, `/`, `?`, `@` or `%` in a password) otherwise
/// surfaces as a wrong host or port. Names the character, never the password.
fn check_userinfo(url: &str) -> std::result::Result<(), String> {
    let (Some(userinfo), _) = split_userinfo(url) else {
        return Ok(());
    };
    // A parameter before the `@`: it is the parameter's, or the password has a raw `?`.
    if userinfo
        .split_once('?')
        .is_some_and(|(_, parameter)| parameter.contains('='))
    {
        return Err(
            "has an '@' after a '?': percent-encode an '@' in a parameter as %40 \
                    (and a '?' in the password as %3F)"
                .to_owned(),
        );
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    for (part, text) in [("user name", user), ("password", password)] {
        let bytes = text.as_bytes();
        for (i, c) in text.char_indices() {
            let raw = match c {
                '@' | '/' | '#' | '?' => true,
                ':' => part == "user name",
                '%' => {
                    !(bytes.len() > i + 2
                        && bytes[i + 1].is_ascii_hexdigit()
                        && bytes[i + 2].is_ascii_hexdigit())
                }
                _ => false,
            };
            if raw {
                // An '@' after the host is the only other reading of a '/' before it.
                let or_database = match c {
                    '/' => {
                        "; or, if the '@' after it is the database name's, percent-encode \
                            that as %40"
                    }
                    _ => "",
                };
                return Err(format!(
                    "the {part} has a raw '{c}': percent-encode it as %{:02X}{or_database}",
                    c as u32
                ));
            }
        }
    }
    Ok(())
}

/// The URL after its scheme, split at the `@` that ends the user name and password, if it
/// has one: the last `@` before the path or the query, as libpq reads it (an `@` of the
/// database name or of a parameter, `application_name=team@example`, is theirs); with none
/// there, the last before the query (a raw `/` in the password), or the first one at all,
/// where tokio-postgres ends a user name (a raw `?` in the password, or an `@` in a
/// parameter with no user name before the host): [`check_userinfo`] names those.
fn split_userinfo(url: &str) -> (Option<&str>, &str) {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let before = |ends: &[char]| after_scheme.split(ends).next().unwrap_or_default();
    match before(&['/', '?'])
        .rfind('@')
        .or_else(|| before(&['?']).rfind('@'))
        .or_else(|| after_scheme.find('@'))
    {
        Some(at) => (Some(&after_scheme[..at]), &after_scheme[at + 1..]),
        None => (None, after_scheme),
    }
}

/// The port, if the URL has one: a number from 1 to 65535.
fn check_port(url: &str) -> std::result::Result<Option<u16>, String> {
    let (_, after_user) = split_userinfo(url);
    let hostport = after_user.split(['/', '?']).next().unwrap_or_default();
    // An IPv6 host is bracketed: its colons are not the port's.
    let port = match hostport.rsplit_once(']') {
        Some((_, rest)) => rest.strip_prefix(':'),
        None => hostport.rsplit_once(':').map(|(_, p)| p),
    };
    // One after the host that is not a port's few digits is not shown: in
    // `postgres://u:pa%40ss/db`, with no `@` before the host, it is the password's end.
    port.map(|port| match parse_port(port) {
        Some(n) => Ok(n),
        None if port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) => Err(format!(
            "has port {port:?}: a port is a number from 1 to 65535"
        )),
        None => Err("has a port that is not a number from 1 to 65535".to_owned()),
    })
    .transpose()
}

/// A port as the URL spells it: a number from 1 to 65535.
fn parse_port(port: &str) -> Option<u16> {
    port.parse::<u16>().ok().filter(|n| *n > 0)
}

/// The query parameters dal reads itself.
#[derive(Default)]
struct OwnParams {
    ssl_mode: Option<String>,
    ssl_root_cert: Option<String>,
    /// libpq's `port=`, for a URL with no port after its host (tokio-postgres would add it to
    /// the host's, default or not, as a second port).
    port: Option<String>,
    /// Which of `user`, `password` and `dbname` the query gives, each of which the part
    /// before it may give too.
    given: Vec<&'static str>,
}

/// Parameters left to tokio-postgres, which dal reads back from its parse: every other one
/// it would parse and dal would not apply, so they are refused.
const PARSED: [&str; 7] = [
    "host",
    "hostaddr",
    "user",
    "password",
    "dbname",
    "application_name",
    "connect_timeout",
];

/// Parameters dal reads itself.
const OWN: [&str; 3] = ["sslmode", "sslrootcert", "port"];

/// Splits `sslmode`, `sslrootcert` and `port` off the query string of `url`; refuses a parameter
/// dal does not apply (libpq's `options`, `channel_binding`, `keepalives`, ...), which would
/// otherwise be accepted and have no effect, and any parameter after `password=`.
fn split_params(url: &str) -> std::result::Result<(String, OwnParams), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), OwnParams::default()));
    };
    let mut ours = OwnParams::default();
    let mut rest = Vec::new();
    let mut seen = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("has a {key} that is not valid percent-encoded UTF-8"))
        };
        // What follows a password may be its own end, cut at a raw `&`: read as a
        // parameter, it would be shown in errors and logs, sent to the server
        // (`application_name`) or used (`sslrootcert`, `host`).
        if seen.contains(&"password") {
            return Err(
                "has a parameter after the password: percent-encode an '&' in the \
                        password as %26, or give password= last"
                    .to_owned(),
            );
        }
        // libpq keeps the last of a parameter given twice; an `&sslmode=disable` added to a
        // URL would then turn its verification off without a word.
        if seen.contains(&key) && (PARSED.contains(&key) || OWN.contains(&key)) {
            return Err(format!("gives {key} twice: keep one"));
        }
        seen.push(key);
        if let Some(part) = ["user", "password", "dbname"]
            .into_iter()
            .find(|p| *p == key)
        {
            ours.given.push(part);
        }
        match key {
            "sslmode" => ours.ssl_mode = Some(decoded()?),
            "sslrootcert" => ours.ssl_root_cert = Some(decoded()?),
            "port" => ours.port = Some(decoded()?),
            // tokio-postgres drops a timeout of 0 or below, leaving PGCONNECT_TIMEOUT's or
            // the default in force.
            "connect_timeout"
                if !decoded()?
                    .parse::<u64>()
                    .is_ok_and(|s| (1..=LONGEST_LIMIT.as_secs()).contains(&s)) =>
            {
                return Err(format!(
                    "has connect_timeout out of range: connect_timeout must be a whole number \
                     of seconds from 1 to {} (365 days), such as 10",
                    LONGEST_LIMIT.as_secs()
                ));
            }
            _ if PARSED.contains(&key) => rest.push(pair),
            "options" => {
                return Err(
                    "has the parameter options, which dal does not pass on: set \
                            DAL_SEARCH_PATH or DAL_STATEMENT_TIMEOUT_MS (Config::search_path, \
                            Config::statement_timeout) instead"
                        .to_owned(),
                );
            }
            _ => {
                let key: String = key.chars().take(40).collect();
                return Err(format!(
                    "has the parameter {key:?}, which dal does not apply: remove it"
                ));
            }
        }
    }
    let rest = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((rest, ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::SslMode;

    fn parse(url: &str, password: Option<String>) -> Result<Config> {
        from_url(url, password, Config::new(String::new(), String::new()))
    }

    fn reason(url: &str) -> String {
        match parse(url, None) {
            Err(Error::Config { setting, reason }) => {
                assert_eq!(setting, Setting::DatabaseUrl);
                reason
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn every_part_is_read() {
        let c = parse(
            "postgresql://app:p%40ss%3A%2F@db.example.com:6543/shop?sslmode=verify-ca\
             &sslrootcert=%2Fetc%2Fca.pem&application_name=svc&connect_timeout=3",
            None,
        )
        .unwrap();
        assert_eq!(c.address(), ("db.example.com", 6543, "app", "shop"));
        assert_eq!(c.ssl_mode, Some(SslMode::VerifyCa));
        assert_eq!(c.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.application_name, "svc");
        assert_eq!(c.connect_timeout, std::time::Duration::from_secs(3));
    }

    #[test]
    fn a_url_without_a_password_takes_pgpassword_as_libpq_does() {
        let c = parse("postgres://u@h/db", Some("from-env".into())).unwrap();
        assert!(matches!(
            c.credentials,
            Some(crate::config::Credentials::Password(ref p))
                if secrecy::ExposeSecret::expose_secret(p) == "from-env"
        ));
        // The URL's own password wins, and a raw ':' in a password is libpq's too.
        let c = parse("postgres://u:a:b@h/db", Some("from-env".into())).unwrap();
        assert!(matches!(
            c.credentials,
            Some(crate::config::Credentials::Password(ref p))
                if secrecy::ExposeSecret::expose_secret(p) == "a:b"
        ));
    }

    /// A user name, password or database name given before the host and again as a
    /// parameter is refused, as a port given twice is: the parameter won without a word, and
    /// `?user=admin` appended to a URL logged in as someone else.
    #[test]
    fn a_user_password_or_database_given_twice_is_refused() {
        for (url, expected) in [
            (
                "postgres://u:p@h/db?user=admin",
                "gives the user name twice, before the host and as user=: keep one",
            ),
            (
                "postgres://u:p@h/db?password=x",
                "gives the password twice, before the host and as password=: keep one",
            ),
            (
                "postgres://u:p@h/db?dbname=other",
                "gives the database name twice, after the host and as dbname=: keep one",
            ),
        ] {
            let reason = reason(url);
            assert!(reason.contains(expected), "{url}: {reason}");
            assert!(
                !reason.contains("admin") && !reason.contains("other"),
                "{reason}"
            );
        }
        // Given once, either way, they stand.
        let c = parse("postgres://h?user=u&dbname=db&password=p", None).unwrap();
        assert_eq!((c.user.as_str(), c.database.as_str()), ("u", "db"));
    }

    #[test]
    fn a_port_parameter_is_the_port_of_a_host_without_one() {
        let c = parse("postgres://u:p@h/db?port=6543", None).unwrap();
        assert_eq!(c.port, 6543);
        for (url, expected) in [
            ("postgres://u:p@h:5433/db?port=6543", "gives the port twice"),
            (
                "postgres://u:p@h/db?port=0",
                "has a port= that is not a number",
            ),
            (
                "postgres://u:p@h/db?port=5432,5433",
                "has a port= that is not a number",
            ),
        ] {
            let reason = reason(url);
            assert!(reason.contains(expected), "{url}: {reason}");
        }
    }

    #[test]
    fn an_at_sign_in_the_query_is_not_read_as_part_of_the_password() {
        let c = parse(
            "postgres://u:p@h:5433/db?application_name=team@example",
            None,
        )
        .unwrap();
        assert_eq!(c.address(), ("h", 5433, "u", "db"));
        assert_eq!(c.application_name, "team@example");
        // A raw '?' in the password is still named, with an '@' in the query or not.
        for url in [
            "postgres://u:p?w@h/db",
            "postgres://u:p?w@h/db?application_name=a@b",
        ] {
            assert!(reason(url).contains("the password has a raw '?'"), "{url}");
        }
    }

    /// The user name and password end at an `@` before the path, as in libpq and
    /// tokio-postgres: an `@` in the database name is the database's. One in the query with
    /// no user name in the URL would be read by tokio-postgres as the end of one, which the
    /// message says.
    #[test]
    fn an_at_sign_after_the_host_is_not_read_as_part_of_the_password() {
        let c = parse("postgres://u:p@h/team@db", None).unwrap();
        assert_eq!(c.address(), ("h", 5432, "u", "team@db"));
        // With no path, an `@` of a parameter is still the parameter's.
        for url in [
            "postgres://u:p@h?application_name=svc@team",
            "postgres://u:p@h:5432?application_name=svc@team",
        ] {
            let c = parse(url, None).unwrap();
            assert_eq!((c.user.as_str(), c.host.as_str()), ("u", "h"), "{url}");
            assert_eq!(c.application_name, "svc@team", "{url}");
        }
        for url in [
            "postgres://db.example.com/shop?application_name=ops@acme",
            "postgres://db.example.com?application_name=ops@acme",
        ] {
            let said = reason(url);
            assert!(
                said.contains("has an '@' after a '?': percent-encode an '@' in a parameter"),
                "{url}: {said}"
            );
        }
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        assert_eq!(
            parse("postgres://u:p@[::1]:5433/db", None).unwrap().host,
            "::1"
        );
    }

    #[test]
    fn mistakes_are_named_and_never_echo_the_password() {
        for (url, expected) in [
            ("mysql://u:secret@h/db", "must start with postgres://"),
            (
                "postgres://u@h/db",
                "has no password, and PGPASSWORD is not set",
            ),
            (
                "postgres://:secret@h/db",
                "has no user name, and PGUSER is not set",
            ),
            (
                "postgres://u:secret@h:99999/db",
                "has port \"99999\": a port is a number from 1 to 65535",
            ),
            (
                "postgres://u:secret@h:abc/db",
                "has a port that is not a number from 1 to 65535",
            ),
            (
                "postgres://u:sec#ret@h/db",
                "the password has a raw '#': percent-encode it as %23",
            ),
            (
                "postgres://u:sec/ret@h/db",
                "the password has a raw '/': percent-encode it as %2F",
            ),
            // No user at all: the '@' is the database name's, as likely as the user's '/'.
            (
                "postgres://db.example.com/team@db",
                "the user name has a raw '/': percent-encode it as %2F; or, if the '@' after \
                 it is the database name's, percent-encode that as %40",
            ),
            (
                "postgres://u:sec%ret@h/db",
                "the password has a raw '%': percent-encode it as %25",
            ),
            (
                "postgres://u:sec?ret@h/db",
                "the password has a raw '?': percent-encode it as %3F",
            ),
            (
                "postgres://u:sec@ret@h/db",
                "the password has a raw '@': percent-encode it as %40",
            ),
            (
                "postgres://u:secret@h/db?sslmode=sometimes",
                "sslmode= is not one of disable, prefer",
            ),
            (
                "postgres://u:secret@h/db?sslmode=allow",
                "has sslmode=\"allow\" (plain first, TLS only if the server insists) is not",
            ),
            (
                "postgres://u:secret@h/db?bogus=1",
                "has the parameter \"bogus\", which dal does not apply: remove it",
            ),
            (
                "postgres://u:secret@h/db?channel_binding=require",
                "has the parameter \"channel_binding\"",
            ),
            (
                "postgres://u:secret@h/db?options=-c%20search_path%3Dt1",
                "set DAL_SEARCH_PATH",
            ),
            (
                "postgres://u:secret@h/db?hostaddr=10.0.0.1,10.0.0.2",
                "several hostaddrs",
            ),
            ("postgres://u:secret@h1,h2/db", "several hosts"),
            // tokio-postgres's own refusal says which part, in its cause.
            (
                "postgres://u:secret@h/db?hostaddr=not-an-address",
                "invalid value for option `hostaddr`",
            ),
            // A parameter given twice is not settled by the last one: an `&sslmode=` added
            // to a URL would otherwise turn its verification off without a word.
            (
                "postgres://u:secret@h/db?sslmode=verify-full&sslmode=disable",
                "gives sslmode twice: keep one",
            ),
            (
                "postgres://u:secret@h/db?sslrootcert=a.pem&sslrootcert=b.pem",
                "gives sslrootcert twice",
            ),
            (
                "postgres://u:secret@h/db?application_name=a&application_name=b",
                "gives application_name twice",
            ),
            // tokio-postgres drops a timeout of 0 or below, which would leave another in force.
            (
                "postgres://u:secret@h/db?connect_timeout=0",
                "connect_timeout must be a whole number of seconds from 1",
            ),
            (
                "postgres://u:secret@h/db?connect_timeout=-5",
                "connect_timeout must be",
            ),
            (
                "postgres://u:secret@h/db?connect_timeout=ten",
                "connect_timeout must be",
            ),
            // Past dal's longest limit: named as the URL's, not as PGCONNECT_TIMEOUT's.
            (
                "postgres://u:secret@h/db?connect_timeout=31536001",
                "connect_timeout must be a whole number of seconds from 1 to 31536000",
            ),
            // Named as the URL's, not as the PG* variable's that would give the same value.
            (
                "postgres://u:secret@h/db?application_name=a%0Ab",
                "the application_name has the character '\\n'",
            ),
            (
                "postgres://u:secret@h/d%09b",
                "the database name has the character '\\t'",
            ),
            (
                "postgres://u%0A:secret@h/db",
                "the user name has the character '\\n'",
            ),
            (
                "postgres://u:secret@db%20x/db",
                "the host has the character ' '",
            ),
        ] {
            let reason = reason(url);
            assert!(reason.contains(expected), "{url}: {reason}");
            assert!(!reason.contains("secret"), "{url}: {reason}");
        }
        // A password cut short by a raw character lands where a parameter's name or the
        // port would be: neither is echoed.
        for (url, rest, expected) in [
            (
                "postgres://u@h/db?password=s3cr&et99",
                "et99",
                "after the password: percent-encode an '&' in the password as %26",
            ),
            // Or that of a parameter dal reads, which would be shown, sent or used where
            // the password's end would: every parameter after the password is refused.
            (
                "postgres://u@h/db?password=s3cr&port=et99",
                "et99",
                "has a parameter after the password",
            ),
            (
                "postgres://u@h/db?password=s3cr&sslmode=et99",
                "et99",
                "has a parameter after the password",
            ),
            (
                "postgres://u@h/db?sslmode=verify-full&password=s3cr&sslrootcert=et99",
                "et99",
                "has a parameter after the password",
            ),
            (
                "postgres://u@h/db?password=s3cr&application_name=et99",
                "et99",
                "has a parameter after the password",
            ),
            (
                "postgres://u@h/db?password=s3cr&host=et99",
                "et99",
                "has a parameter after the password",
            ),
            // Not shown either, before a password.
            (
                "postgres://u:s3cr@h/db?port=et99",
                "et99",
                "has a port= that is not a number from 1 to 65535",
            ),
            (
                "postgres://u:s3cr@h/db?sslmode=et99",
                "et99",
                "sslmode= is not one of disable, prefer, require, verify-ca, verify-full",
            ),
            (
                "postgres://u:s3cret%40h/db",
                "s3cret",
                "has a port that is not a number",
            ),
            (
                "postgres://admin:1234567/db",
                "1234567",
                "has a port that is not a number",
            ),
        ] {
            let reason = reason(url);
            assert!(reason.contains(expected), "{url}: {reason}");
            assert!(!reason.contains(rest), "{url}: {reason}");
        }
    }
}
