//! Opening recording files strictly beneath `storage.recordings_root`.
//!
//! The open itself goes through `cap-std`, which resolves every path component
//! (symlinks included) inside the root directory and refuses anything that would
//! leave it; a canonicalizing pre-check only gives the refusal its error type.

use std::io;
use std::path::{Component, Path, PathBuf};

use std::time::Duration;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::taxonomy::Failure;

/// Largest meta file sent (it is read into memory; the audio is streamed).
pub const META_LIMIT: u64 = 1024 * 1024;

/// Longest an open may take (`open_within`): a recording on a network mount that
/// stopped answering fails as `file_unreadable` instead of holding a worker.
pub const OPEN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RecordingsRoot {
    root: PathBuf,
}

/// A file opened for one upload attempt.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: std::fs::File,
    pub len: u64,
    /// The base name, sent as the part's filename.
    pub name: String,
}

impl RecordingsRoot {
    pub fn new(root: impl Into<PathBuf>) -> RecordingsRoot {
        RecordingsRoot { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Open `path` (relative to the root, or absolute inside it) for reading.
    pub fn open(&self, path: &str) -> Result<OpenedFile, Failure> {
        let relative = self.relative(path)?;
        let dir = Dir::open_ambient_dir(&self.root, ambient_authority()).map_err(|e| {
            let msg = format!("recordings root {}: {e}", self.root.display());
            if e.kind() == io::ErrorKind::NotFound {
                Failure::file_missing(msg)
            } else {
                Failure::file_unreadable(msg)
            }
        })?;
        // Opened by the path it resolves to: cap-std refuses every absolute symlink,
        // also one that points inside the root, and the resolved path has none left.
        // cap-std still confines the open, should the tree change in between.
        let resolved = self.resolve_inside(&relative)?;
        // Non-blocking, so that opening a FIFO returns at once instead of waiting
        // for a writer that never comes (it is refused below). On a regular file the
        // flag changes nothing: reads from disk do not return EAGAIN.
        let file = dir
            .open_with(
                resolved.as_deref().unwrap_or(&relative),
                OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK),
            )
            .map_err(|e| self.open_error(path, &relative, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Failure::file_unreadable(format!("{path}: cannot stat: {e}")))?;
        if meta.is_dir() {
            return Err(Failure::file_unreadable(format!("{path}: is a directory")));
        }
        if !meta.is_file() {
            return Err(Failure::file_unreadable(format!(
                "{path}: not a regular file (a FIFO, socket or device)"
            )));
        }
        let name = relative
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        Ok(OpenedFile {
            file: file.into_std(),
            len: meta.len(),
            name,
        })
    }

    /// `open` on a blocking thread, given at most `limit`: an open can hang in the
    /// kernel (a network mount that stopped answering), which must not hold up the
    /// runtime's workers, nor the relay's shutdown.
    pub async fn open_within(&self, path: &str, limit: Duration) -> Result<OpenedFile, Failure> {
        self.off_runtime(path, limit, "opening", RecordingsRoot::open)
            .await?
    }

    /// `exists`, the same way.
    pub async fn exists_within(&self, path: &str, limit: Duration) -> Result<bool, Failure> {
        self.off_runtime(path, limit, "looking for", |root, path| root.exists(path))
            .await
    }

    async fn off_runtime<T: Send + 'static>(
        &self,
        path: &str,
        limit: Duration,
        doing: &str,
        work: fn(&RecordingsRoot, &str) -> T,
    ) -> Result<T, Failure> {
        let root = self.clone();
        let owned = path.to_string();
        let task = tokio::task::spawn_blocking(move || work(&root, &owned));
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(Failure::file_unreadable(format!(
                "{path}: {doing} it failed: {e}"
            ))),
            Err(_) => Err(Failure::file_unreadable(format!(
                "{path}: {doing} it took longer than {limit:?}"
            ))),
        }
    }

    /// Whether a file exists under the root (for the optional default meta file).
    pub fn exists(&self, path: &str) -> bool {
        self.relative(path)
            .map(|rel| self.root.join(rel).is_file())
            .unwrap_or(false)
    }

    /// The path relative to the root; `..`, and absolute paths elsewhere, are denied.
    fn relative(&self, path: &str) -> Result<PathBuf, Failure> {
        let p = Path::new(path);
        let rel = if p.is_absolute() {
            let canonical_root = self
                .root
                .canonicalize()
                .unwrap_or_else(|_| self.root.clone());
            match p
                .strip_prefix(&self.root)
                .or_else(|_| p.strip_prefix(&canonical_root))
            {
                Ok(rest) => rest.to_path_buf(),
                Err(_) => {
                    return Err(Failure::path_denied(format!(
                        "{path}: absolute path outside the recordings root"
                    )))
                }
            }
        } else {
            p.to_path_buf()
        };
        for component in rel.components() {
            match component {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => {
                    return Err(Failure::path_denied(format!(
                        "{path}: `..` is not allowed in file paths"
                    )))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(Failure::path_denied(format!("{path}: not a relative path")))
                }
            }
        }
        if rel.as_os_str().is_empty() {
            return Err(Failure::payload_invalid("empty file path"));
        }
        Ok(rel)
    }

    /// Where `relative` leads, relative to the root: a symlink that points out of
    /// the root is a denial, not a missing file. `None` when it does not resolve
    /// (missing: the open reports it).
    fn resolve_inside(&self, relative: &Path) -> Result<Option<PathBuf>, Failure> {
        let (Ok(root), Ok(target)) = (
            self.root.canonicalize(),
            self.root.join(relative).canonicalize(),
        ) else {
            return Ok(None);
        };
        if let Ok(inside) = target.strip_prefix(&root) {
            Ok(Some(inside.to_path_buf()))
        } else {
            Err(Failure::path_denied(format!(
                "{}: resolves outside the recordings root (symlink)",
                relative.display()
            )))
        }
    }

    fn open_error(&self, path: &str, relative: &Path, e: io::Error) -> Failure {
        match e.kind() {
            io::ErrorKind::NotFound => Failure::file_missing(format!("{path}: no such file")),
            io::ErrorKind::PermissionDenied
                if self
                    .root
                    .join(relative)
                    .symlink_metadata()
                    .is_ok_and(|m| m.is_symlink()) =>
            {
                Failure::path_denied(format!("{path}: symlink leads outside the recordings root"))
            }
            _ if e.to_string().contains("outside of the filesystem") => {
                Failure::path_denied(format!("{path}: leads outside the recordings root"))
            }
            _ => Failure::file_unreadable(format!("{path}: {e}")),
        }
    }
}

/// The MIME type of an audio file, by extension.
pub fn audio_mime(name: &str) -> &'static str {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "flac" => "audio/flac",
        "m4a" => "audio/mp4",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::taxonomy::ErrorType;

    fn setup() -> (tempfile::TempDir, RecordingsRoot) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("call")).unwrap();
        std::fs::write(root.join("call/mixed.wav"), b"RIFFdata").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"secret").unwrap();
        (tmp, RecordingsRoot::new(root))
    }

    fn kind(r: Result<OpenedFile, Failure>) -> ErrorType {
        r.err().map(|f| f.error_type).expect("expected a failure")
    }

    /// A FIFO is refused at once: opened for reading without `O_NONBLOCK`, it would
    /// wait for a writer forever (so the open runs on a thread the test can give up on).
    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let (_tmp, root) = setup();
        let fifo = root.path().join("call/pipe.wav");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(root.open("call/pipe.wav").map(|_| ()));
        });
        let opened = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the open of a FIFO returns");
        let failure = opened.expect_err("a FIFO is not a recording");
        assert_eq!(failure.error_type, ErrorType::FileUnreadable);
    }

    #[test]
    fn opens_relative_and_absolute_paths_inside() {
        let (_tmp, root) = setup();
        let f = root.open("call/mixed.wav").unwrap();
        assert_eq!((f.len, f.name.as_str()), (8, "mixed.wav"));
        let abs = root.path().join("call/mixed.wav");
        assert_eq!(root.open(abs.to_str().unwrap()).unwrap().len, 8);
    }

    #[test]
    fn denies_escapes() {
        let (tmp, root) = setup();
        assert_eq!(kind(root.open("../secret.txt")), ErrorType::PathDenied);
        assert_eq!(
            kind(root.open("call/../../secret.txt")),
            ErrorType::PathDenied
        );
        let outside = tmp.path().join("secret.txt");
        assert_eq!(
            kind(root.open(outside.to_str().unwrap())),
            ErrorType::PathDenied
        );
        std::os::unix::fs::symlink(&outside, root.path().join("call/link.wav")).unwrap();
        assert_eq!(kind(root.open("call/link.wav")), ErrorType::PathDenied);
        std::os::unix::fs::symlink("../../secret.txt", root.path().join("call/rel.wav")).unwrap();
        assert_eq!(kind(root.open("call/rel.wav")), ErrorType::PathDenied);
    }

    #[test]
    fn missing_and_unreadable() {
        let (_tmp, root) = setup();
        assert_eq!(kind(root.open("call/none.wav")), ErrorType::FileMissing);
        assert_eq!(kind(root.open("nodir/none.wav")), ErrorType::FileMissing);
        assert_eq!(kind(root.open("call")), ErrorType::FileUnreadable);
        let gone = RecordingsRoot::new("/nonexistent/serversync/root");
        assert_eq!(kind(gone.open("a.wav")), ErrorType::FileMissing);
    }

    #[test]
    fn mime_by_extension() {
        assert_eq!(audio_mime("a.WAV"), "audio/wav");
        assert_eq!(audio_mime("a.bin"), "application/octet-stream");
    }
}
