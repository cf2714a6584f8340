//! Finding the PostgreSQL server binaries and the OS user to run them as.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::{Error, Result};

/// The directory holding `initdb` and `postgres`.
///
/// Searched in order: `PG_BINDIR`, `pg_config --bindir`, `/usr/lib/postgresql/<newest>/bin`,
/// then `PATH`.
pub(crate) fn find_bindir() -> Result<PathBuf> {
    find_bindir_in(
        std::env::var_os("PG_BINDIR"),
        "pg_config",
        Path::new("/usr/lib/postgresql"),
        std::env::var_os("PATH").unwrap_or_default(),
    )
}

fn find_bindir_in(
    pg_bindir: Option<OsString>,
    pg_config: &str,
    debian: &Path,
    path: OsString,
) -> Result<PathBuf> {
    if let Some(dir) = pg_bindir {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(Error::config(
                "PG_BINDIR",
                format!(
                    "{} holds no initdb and postgres; point it at the server's bin directory \
                     (such as /usr/lib/postgresql/15/bin) or unset it",
                    dir.display()
                ),
            ))
        };
    }
    if let Ok(out) = Command::new(pg_config).arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Some(dir) = newest_debian_bindir(debian) {
        return Ok(dir);
    }
    if let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d)) {
        return Ok(dir);
    }
    Err(Error::ServerBinariesNotFound {
        searched: "PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin and PATH".into(),
    })
}

fn has_server(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// Debian and Ubuntu install each major version under `/usr/lib/postgresql/<major>/bin`.
fn newest_debian_bindir(root: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The OS user the server runs as: the current one, or, for root, an unprivileged one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerUser {
    /// `Some((uid, gid))` when processes must drop root to run the server.
    pub(crate) switch_to: Option<(u32, u32)>,
}

impl ServerUser {
    pub(crate) fn detect() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(Self { switch_to: None });
        }
        for name in ["postgres", "nobody"] {
            if let Ok(Some(user)) = nix::unistd::User::from_name(name) {
                return Ok(Self {
                    switch_to: Some((user.uid.as_raw(), user.gid.as_raw())),
                });
            }
        }
        Err(Error::local(
            "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
             or `nobody` user to run it as; create one (`useradd --system postgres`) or run as \
             a normal user",
        ))
    }

    /// A command that runs as the server user, with only the environment PostgreSQL needs
    /// (the search path, the locale, the time zone, where temporary files and libraries go):
    /// the server user can read its processes' environment, and the program's holds its
    /// credentials (`AWS_SECRET_ACCESS_KEY`, `DATABRICKS_CLIENT_SECRET`, `PGPASSWORD`, ...).
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .envs(std::env::vars_os().filter(|(name, _)| {
                let name = name.to_string_lossy();
                ["PATH", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH"].contains(&name.as_ref())
                    || name.starts_with("LC_")
            }));
        if let Some((uid, gid)) = self.switch_to {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Hands `path` to the server user (a no-op when not running as root).
    pub(crate) fn own(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.switch_to {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(Error::io(path))?;
        }
        Ok(())
    }

    /// Whether the server user can reach `dir`: every ancestor must be searchable by it.
    pub(crate) fn can_reach(&self, dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some((uid, gid)) = self.switch_to else {
            return true;
        };
        dir.ancestors().skip(1).all(|d| match std::fs::metadata(d) {
            Ok(m) if m.uid() == uid => m.mode() & 0o100 != 0,
            Ok(m) if m.gid() == gid => m.mode() & 0o010 != 0,
            Ok(m) => m.mode() & 0o001 != 0,
            Err(_) => true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_major_version_wins() {
        let root = tempfile::tempdir().unwrap();
        for major in ["9", "13", "15", "not-a-version"] {
            let bin = root.path().join(major).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("initdb"), "").unwrap();
            std::fs::write(bin.join("postgres"), "").unwrap();
        }
        assert_eq!(
            newest_debian_bindir(root.path()),
            Some(root.path().join("15/bin"))
        );
    }

    #[test]
    fn missing_binaries_name_the_install_command() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_bindir_in(
            None,
            "/nonexistent/pg_config",
            empty.path(),
            empty.path().as_os_str().to_owned(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::ServerBinariesNotFound { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("PG_BINDIR"), "{msg}");
    }

    #[test]
    fn a_wrong_pg_bindir_is_named() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_bindir_in(
            Some(empty.path().as_os_str().to_owned()),
            "pg_config",
            empty.path(),
            OsString::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid setting PG_BINDIR"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_without_the_server_is_skipped() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("16/bin")).unwrap();
        assert_eq!(newest_debian_bindir(root.path()), None);
    }
}
