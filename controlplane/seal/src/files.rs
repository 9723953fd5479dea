//! Files that hold secrets (tokens, keys, sealed snapshots), as both planes write and read
//! them: written atomically with mode 0600 (a crash leaves the old file or the new one,
//! never an empty or torn one), read only when they are owned by this user, not readable by
//! anyone else, and not empty; and kept in directories of mode 0700.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a secret file was not read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path} is empty")]
    Empty { path: String },
    #[error("{path} is owned by uid {owner}, not by this user (uid {me})")]
    Owner { path: String, owner: u32, me: u32 },
    #[error("{path} can be read by others (mode {mode:o}); run: chmod 600 {path}")]
    Mode { path: String, mode: u32 },
}

/// The effective user id, from the owner of this process's `/proc` entry (no `unsafe`).
fn my_uid() -> io::Result<u32> {
    Ok(fs::metadata("/proc/self")?.uid())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Creates `dir` (and its missing parents) with mode 0700, or narrows an existing one
/// owned by this user to 0700. Returns whether an existing directory was narrowed.
pub fn private_dir(dir: &Path) -> io::Result<bool> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // The builder's mode is filtered by the umask: set it outright.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            Ok(false)
        }
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        ))),
        Ok(m) if m.uid() != my_uid()? => Err(io::Error::other(format!(
            "{} is owned by uid {}, not by this user",
            dir.display(),
            m.uid()
        ))),
        Ok(m) if m.mode() & 0o077 != 0 => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            Ok(true)
        }
        Ok(_) => Ok(false),
    }
}

/// Narrows an existing file owned by this user to mode 0600 (a database, say). Returns
/// whether it was narrowed.
pub fn private_file_mode(path: &Path) -> io::Result<bool> {
    let m = fs::metadata(path)?;
    if m.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        return Ok(true);
    }
    Ok(false)
}

/// A temporary path beside `path`, unique to this process and call.
fn temp_beside(path: &Path) -> io::Result<PathBuf> {
    let mut nonce = [0u8; 8];
    boring::rand::rand_bytes(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", path.display())))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{:016x}", u64::from_le_bytes(nonce)));
    Ok(path.with_file_name(tmp))
}

/// A file being written beside its final path, created exclusively with mode 0600; it
/// replaces the final path only when [`AtomicFile::commit`] has synced it, and is removed if
/// dropped before.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl AtomicFile {
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::create_with_mode(path, 0o600)
    }

    /// The same, with another mode (`0o644` for a certificate other users must read).
    pub fn create_with_mode(path: &Path, mode: u32) -> io::Result<Self> {
        let tmp = temp_beside(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        Ok(Self {
            file,
            tmp,
            path: path.to_path_buf(),
            committed: false,
        })
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the file, renames it over the final path and syncs the directory.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl AtomicFile {
    /// Renames the file over the final path without syncing it first: still whole or
    /// absent after the process dies, but not guaranteed to survive a power loss. For small
    /// bookkeeping written often.
    pub fn commit_unsynced(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `content` to `path` atomically, mode 0600.
pub fn write_private(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(content)?;
    f.commit()
}

/// Writes a file that is not secret (a certificate) atomically, mode 0644.
pub fn write_public(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create_with_mode(path, 0o644)?;
    f.file().write_all(content)?;
    f.commit()
}

/// Reads a secret file: it must be owned by this user, readable by no one else, and not
/// empty (surrounding whitespace ignored).
pub fn read_private(path: &Path) -> Result<String, SecretFileError> {
    let io_err = |source| SecretFileError::Io {
        path: shown(path),
        source,
    };
    let m = fs::metadata(path).map_err(io_err)?;
    let me = my_uid().map_err(io_err)?;
    if m.uid() != me {
        return Err(SecretFileError::Owner {
            path: shown(path),
            owner: m.uid(),
            me,
        });
    }
    if m.mode() & 0o077 != 0 {
        return Err(SecretFileError::Mode {
            path: shown(path),
            mode: m.mode() & 0o777,
        });
    }
    let text = fs::read_to_string(path).map_err(io_err)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretFileError::Empty { path: shown(path) });
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("aigw-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn secrets_are_written_whole_with_mode_600_in_a_700_directory() {
        let dir = temp("write").join("nested");
        assert!(!private_dir(&dir).expect("created"));
        assert_eq!(fs::metadata(&dir).expect("dir").mode() & 0o777, 0o700);
        let path = dir.join("token");
        write_private(&path, b"first-secret").expect("write");
        assert_eq!(fs::metadata(&path).expect("file").mode() & 0o777, 0o600);
        write_private(&path, b"second-secret").expect("replace");
        assert_eq!(read_private(&path).expect("read"), "second-secret");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        // An abandoned write leaves the old file.
        {
            let mut f = AtomicFile::create(&path).expect("create");
            f.file().write_all(b"torn").expect("write");
        }
        assert_eq!(read_private(&path).expect("read"), "second-secret");
        let _ = fs::remove_dir_all(dir.parent().expect("parent"));
    }

    #[test]
    fn empty_or_readable_secrets_are_refused_and_directories_narrowed() {
        let dir = temp("refuse");
        fs::create_dir_all(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert!(private_dir(&dir).expect("narrowed"));
        assert_eq!(fs::metadata(&dir).expect("dir").mode() & 0o777, 0o700);
        let empty = dir.join("empty");
        write_private(&empty, b"  \n").expect("write");
        assert!(matches!(
            read_private(&empty),
            Err(SecretFileError::Empty { .. })
        ));
        let open = dir.join("open");
        write_private(&open, b"secret").expect("write");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = read_private(&open).expect_err("readable by others");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(private_file_mode(&open).expect("narrowed"));
        assert_eq!(read_private(&open).expect("read"), "secret");
        let _ = fs::remove_dir_all(&dir);
    }
}
