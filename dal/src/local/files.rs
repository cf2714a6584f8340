//! Files only their owner may read: passwords, keys, the clusters' state.

use std::path::Path;

use super::binaries::ServerUser;
use super::error::{Error, Result};

/// Writes `contents` to `path` with mode 0600, owned by `owner` (the server user, or the
/// invoking user with `ServerUser { switch_to: None }`).
pub(crate) fn write_private(path: &Path, contents: &[u8], owner: ServerUser) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(path))?;
    file.write_all(contents).map_err(Error::io(path))?;
    owner.own(path)
}
