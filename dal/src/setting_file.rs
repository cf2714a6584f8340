//! Files that settings name (a CA certificate file, an OIDC ID token, the Databricks config
//! file, the browser login's token cache), read whole but never past a bound: a setting
//! pointed at the wrong file (a disk image, or `/dev/zero`, which never ends) fails with the
//! setting named instead of filling the memory.

use std::io::Read as _;
use std::path::Path;

/// The most bytes read of such a file: 16 MiB, far more than any of them holds (a bundle of
/// every public root CA is under 300 KiB, an ID token a few KiB).
pub(crate) const MAX_BYTES: u64 = 16 << 20;

/// The whole of the file at `path`; an error of kind `FileTooLarge` for one of more than
/// [`MAX_BYTES`], after reading no more than that.
pub(crate) fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "it holds more than {} MiB, which no such file does",
                MAX_BYTES >> 20
            ),
        ));
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text (an error of kind `InvalidData` otherwise).
#[cfg(feature = "lakebase")]
pub(crate) fn read_to_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A file of `len` zero bytes (sparse: it takes no disk), removed when dropped.
    pub(crate) struct SparseFile(pub(crate) PathBuf);

    impl SparseFile {
        pub(crate) fn new(len: u64) -> Self {
            let path = std::env::temp_dir().join(format!("dal-sized-{}", uuid::Uuid::new_v4()));
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            Self(path)
        }

        /// One byte over [`MAX_BYTES`].
        pub(crate) fn too_large() -> Self {
            Self::new(MAX_BYTES + 1)
        }
    }

    impl Drop for SparseFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_file_is_read_whole_up_to_the_bound_and_refused_past_it() {
        let largest = SparseFile::new(MAX_BYTES);
        assert_eq!(read(&largest.0).unwrap().len() as u64, MAX_BYTES);
        let err = read(&SparseFile::too_large().0).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
        assert_eq!(
            err.to_string(),
            "it holds more than 16 MiB, which no such file does"
        );
    }
}
