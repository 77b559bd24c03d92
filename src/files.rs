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

use crate::taxonomy::{ErrorType, Failure};

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

    /// What is wrong with the root as a directory to read recordings from, if
    /// anything (`check`, and the relay's start): "does not exist", "is not a
    /// directory".
    pub fn problem(&self) -> Option<&'static str> {
        if self.root.is_dir() {
            None
        } else if self.root.exists() {
            Some("is not a directory")
        } else {
            Some("does not exist")
        }
    }

    /// Open `path` (relative to the root, or absolute inside it) for reading.
    pub fn open(&self, path: &str) -> Result<OpenedFile, Failure> {
        let (file, meta, relative) = self.open_entry(path)?;
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

    /// Whatever `path` names inside the root (a file, a directory, a FIFO), opened
    /// for reading, with its metadata and its path relative to the root.
    fn open_entry(
        &self,
        path: &str,
    ) -> Result<(cap_std::fs::File, cap_std::fs::Metadata, PathBuf), Failure> {
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
            .map_err(|e| open_error(path, e))?;
        let meta = file
            .metadata()
            .map_err(|e| Failure::file_unreadable(format!("{path}: cannot stat: {e}")))?;
        Ok((file, meta, relative))
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
        self.off_runtime(path, limit, "looking for", RecordingsRoot::exists)
            .await?
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

    /// Whether a regular file is there to send (the optional default meta file),
    /// looked up as `open` would: a link out of the root is refused whether or not
    /// its target exists, so that what lies outside the root cannot be told from the
    /// outcome. Nothing there, a directory or a FIFO: `false`.
    pub fn exists(&self, path: &str) -> Result<bool, Failure> {
        match self.open_entry(path) {
            Ok((_, meta, _)) => Ok(meta.is_file()),
            Err(f) if f.error_type == ErrorType::FileMissing => Ok(false),
            Err(f) => Err(f),
        }
    }

    /// The path relative to the root; `..`, and absolute paths elsewhere, are denied.
    fn relative(&self, path: &str) -> Result<PathBuf, Failure> {
        if path.contains('\0') {
            return Err(Failure::payload_invalid(
                "file path contains a NUL character",
            ));
        }
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
        if !rel.components().any(|c| matches!(c, Component::Normal(_))) {
            return Err(Failure::payload_invalid(format!(
                "{path:?} names the recordings root itself, not a file"
            )));
        }
        Ok(rel)
    }

    /// Where `relative` leads, relative to the root: a symlink that points out of
    /// the root is a denial, not a missing file. What does not exist (yet) is
    /// resolved as far as it does, and the rest joined as written, so that a file
    /// missing from a directory reached through an absolute link inside the root is
    /// missing there, not denied (cap-std refuses absolute links, whatever they point
    /// to). `None` when the root itself does not resolve (the open reports it).
    fn resolve_inside(&self, relative: &Path) -> Result<Option<PathBuf>, Failure> {
        let Ok(root) = self.root.canonicalize() else {
            return Ok(None);
        };
        let mut existing = relative;
        let mut missing = Vec::new();
        let target = loop {
            if let Ok(target) = self.root.join(existing).canonicalize() {
                break target;
            }
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name);
                    existing = parent;
                }
                _ => return Ok(None),
            }
        };
        let Ok(inside) = target.strip_prefix(&root) else {
            return Err(Failure::path_denied(format!(
                "{}: resolves outside the recordings root (symlink)",
                relative.display()
            )));
        };
        let mut resolved = inside.to_path_buf();
        resolved.extend(missing.iter().rev());
        Ok(Some(resolved))
    }
}

/// What a failed confined open means. cap-std reports a path that would leave the
/// root (through `..` in a symlink, or an absolute symlink) as "a path led outside
/// of the filesystem"; any other permission error is the file's own, inside the
/// root. A name longer than the filesystem takes can never be opened.
fn open_error(path: &str, e: io::Error) -> Failure {
    if e.to_string().contains("outside of the filesystem") {
        return Failure::path_denied(format!("{path}: leads outside the recordings root"));
    }
    match e.kind() {
        io::ErrorKind::NotFound => Failure::file_missing(format!("{path}: no such file")),
        _ if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
            Failure::payload_invalid(format!("file path too long for the filesystem: {e}"))
        }
        _ => Failure::file_unreadable(format!("{path}: {e}")),
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

    /// A permission error inside the root is the file's (`file_unreadable`, retried),
    /// also when the path names it through a symlink that stays inside: only a path
    /// that leads out is `path_denied`. (Tests run as root, whom mode 000 does not
    /// stop, so the error is handed to the classification directly.)
    #[test]
    fn a_permission_error_through_a_link_inside_is_unreadable() {
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(
            open_error("link.wav", denied).error_type,
            ErrorType::FileUnreadable
        );
        let (_tmp, root) = setup();
        std::os::unix::fs::symlink("call/mixed.wav", root.path().join("link.wav")).unwrap();
        assert_eq!(root.open("link.wav").unwrap().len, 8);
    }

    /// Paths that can never name a file dead-letter at once instead of being retried.
    #[test]
    fn paths_that_can_never_succeed_are_invalid() {
        let (_tmp, root) = setup();
        let long_name = "a".repeat(300);
        let deep = format!("{}x.wav", "a/".repeat(3000));
        let abs_root = root.path().to_str().unwrap().to_string();
        for path in [
            "call/mixed.wav\0",
            ".",
            "./",
            "./.",
            long_name.as_str(),
            deep.as_str(),
            abs_root.as_str(),
        ] {
            assert_eq!(
                kind(root.open(path)),
                ErrorType::PayloadInvalid,
                "{:?}",
                &path[..path.len().min(40)]
            );
        }
    }

    /// The default meta file's lookup: what is not there (or not a file) is skipped;
    /// a link out of the root is refused, whether its target exists or not.
    #[test]
    fn exists_is_confined_like_open() {
        let (tmp, root) = setup();
        std::fs::write(root.path().join("call/meta.json"), b"{}").unwrap();
        assert_eq!(root.exists("call/meta.json").ok(), Some(true));
        assert_eq!(root.exists("call/none.json").ok(), Some(false));
        assert_eq!(root.exists("call").ok(), Some(false));
        for (name, target) in [
            ("out.json", tmp.path().join("secret.txt")),
            ("gone.json", tmp.path().join("no-such-file")),
        ] {
            std::os::unix::fs::symlink(&target, root.path().join("call").join(name)).unwrap();
            let looked = root.exists(&format!("call/{name}"));
            assert_eq!(
                looked.err().map(|f| f.error_type),
                Some(ErrorType::PathDenied),
                "{name}"
            );
        }
    }

    /// A directory reached through an absolute link that stays inside the root:
    /// what is in it opens, and what is not is missing (and the optional meta file
    /// simply absent), not denied.
    #[test]
    fn a_missing_file_behind_an_absolute_link_inside_is_missing() {
        let (_tmp, root) = setup();
        std::fs::create_dir(root.path().join("s")).unwrap();
        std::os::unix::fs::symlink(root.path().join("call"), root.path().join("s/abs")).unwrap();
        std::os::unix::fs::symlink(root.path(), root.path().join("s/root")).unwrap();
        for dir in ["s/abs", "s/root/call"] {
            assert_eq!(root.open(&format!("{dir}/mixed.wav")).unwrap().len, 8);
            assert_eq!(
                kind(root.open(&format!("{dir}/none.wav"))),
                ErrorType::FileMissing
            );
            assert_eq!(
                kind(root.open(&format!("{dir}/nodir/none.wav"))),
                ErrorType::FileMissing
            );
            assert_eq!(root.exists(&format!("{dir}/meta.json")).ok(), Some(false));
        }
    }

    #[test]
    fn mime_by_extension() {
        assert_eq!(audio_mime("a.WAV"), "audio/wav");
        assert_eq!(audio_mime("a.bin"), "application/octet-stream");
    }
}
