//! Files only their owner may read: passwords, keys, the clusters' state.

use std::path::Path;

use super::binaries::ServerUser;
use super::error::{Error, Result};

/// Writes `contents` to `path` with mode 0600, owned by `owner` (the server user, or the
/// invoking user with `ServerUser { switch_to: None }`), whole or not at all: to a new file
/// beside it (created 0600), then renamed over it, so a crash leaves the old contents or the
/// new, and no file that existed keeps a wider mode.
pub(crate) fn write_private(path: &Path, contents: &[u8], owner: ServerUser) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(Error::io(dir))?;
    file.write_all(contents)
        .and_then(|()| file.as_file().sync_all())
        .map_err(Error::io(path))?;
    owner.own(file.path())?;
    file.persist(path).map_err(|e| Error::io(path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_file_that_others_could_read_is_rewritten_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"secret", ServerUser { switch_to: None }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
