//! Files only their owner may read: passwords, keys, the clusters' state.

use std::path::Path;

use super::binaries::ServerUser;
use super::error::{Error, Result};

/// Writes `contents` to `path` with mode 0600, owned by `owner` (the server user, or the
/// invoking user with `ServerUser { switch_to: None }`). A file that existed keeps no wider
/// mode: the mode given at opening applies only to a file the opening creates, so it is set
/// again before anything is written.
pub(crate) fn write_private(path: &Path, contents: &[u8], owner: ServerUser) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(path))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(path))?;
    file.write_all(contents).map_err(Error::io(path))?;
    owner.own(path)
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
