//! The body of a recording-file upload (SPEC §2.2). Its `multipart/form-data` framing
//! is written by hand around the audio file because the body's exact bytes must be
//! known before it is sent: its `Content-Length` and, when signing, the signature over
//! all of it. The file is streamed in by one blocking reader thread so memory stays
//! bounded whatever its size, and that reader keeps the first read error so a failed
//! upload is classified as the file's fault, not the sink's.

use hmac::Mac;
use uuid::Uuid;

use super::signing::{signature_headers, signer};
use super::FileJob;
use crate::files::audio_mime;

/// The slowest transfer an upload without `ingest.upload_timeout` is allowed, in
/// bytes per second (1 MiB/s: a 1 GiB recording gets 17 minutes plus `ingest.timeout`).
pub(super) const UPLOAD_FLOOR_RATE: u64 = 1024 * 1024;

/// Bytes read ahead of the socket per upload: `READ_AHEAD` chunks of `CHUNK`.
const CHUNK: usize = 512 * 1024;
const READ_AHEAD: usize = 4;

/// The `multipart/form-data` body of one upload (SPEC §2.2), written by hand around
/// the streamed audio file so its exact bytes are known before it is sent: its
/// length (`Content-Length`) and, when signing, the signature over all of it.
/// `head` is everything before the audio bytes, `tail` everything after them.
pub(super) struct UploadForm {
    boundary: String,
    pub(super) head: bytes::Bytes,
    pub(super) tail: bytes::Bytes,
}

impl UploadForm {
    pub(super) fn new(
        job: &FileJob,
        audio_name: &str,
        meta: Option<(String, Vec<u8>)>,
    ) -> UploadForm {
        let boundary = format!("serversync-{}", Uuid::new_v4().simple());
        let mut head = Vec::with_capacity(512);
        for (name, value) in [
            ("callLogId", job.call_log_id.as_str()),
            ("recordingId", job.recording_id.as_str()),
        ] {
            head.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        head.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"{}\"\r\n\
                 Content-Type: {}\r\n\r\n",
                quote_file_name(audio_name),
                audio_mime(audio_name)
            )
            .as_bytes(),
        );
        let mut tail = Vec::with_capacity(256);
        tail.extend_from_slice(b"\r\n");
        if let Some((name, bytes)) = meta {
            tail.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"meta\"; filename=\"{}\"\r\n\
                     Content-Type: application/json\r\n\r\n",
                    quote_file_name(&name)
                )
                .as_bytes(),
            );
            tail.extend_from_slice(&bytes);
            tail.extend_from_slice(b"\r\n");
        }
        tail.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        UploadForm {
            boundary,
            head: head.into(),
            tail: tail.into(),
        }
    }

    pub(super) fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The whole body's length around a file of `file_len` bytes.
    pub(super) fn len(&self, file_len: u64) -> u64 {
        self.head.len() as u64 + file_len + self.tail.len() as u64
    }
}

/// A file name inside a quoted `Content-Disposition` parameter, escaped as browsers
/// do (WHATWG): `"` → `%22`, CR → `%0D`, LF → `%0A`; and `\` → `%5C`, which browsers
/// leave, but which a parser of RFC quoted strings (Python's `email`) takes as an
/// escape, reading `a\"` as `a"` and running past the closing quote.
fn quote_file_name(name: &str) -> String {
    name.replace('\\', "%5C")
        .replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// [`sign`](super::sign) over a body of `head`, `len` bytes of `file` and `tail`, read in
/// `CHUNK`s; leaves the file where it was. Fails if the file is shorter than `len`.
pub(super) fn sign_file(
    key: &[u8],
    id: &str,
    timestamp: i64,
    head: &[u8],
    file: &mut std::fs::File,
    len: u64,
    tail: &[u8],
) -> std::io::Result<[(&'static str, String); 3]> {
    use std::io::Seek;
    let start = file.stream_position()?;
    let mut mac = signer(key, id, timestamp);
    mac.update(head);
    let mut left = len;
    while left > 0 {
        let chunk = next_chunk(file, left)?;
        mac.update(&chunk);
        left -= chunk.len() as u64;
    }
    mac.update(tail);
    file.seek(std::io::SeekFrom::Start(start))?;
    Ok(signature_headers(id, timestamp, mac))
}

/// The next at most `CHUNK` of the `left` bytes still expected from `file`. A file
/// that ends before them is an error: it is shorter than when it was opened, and
/// the declared length can no longer be met.
fn next_chunk(file: &mut std::fs::File, left: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let want = left.min(CHUNK as u64);
    // read_to_end fills spare capacity without zeroing it first
    let mut buf = Vec::with_capacity(want as usize);
    file.take(want).read_to_end(&mut buf)?;
    if buf.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file is {left} bytes shorter than when it was opened"),
        ));
    }
    Ok(buf)
}

/// Where the upload's reader thread leaves the first read error it met.
#[derive(Debug, Clone, Default)]
pub(super) struct ReadError(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl ReadError {
    fn set(&self, e: &std::io::Error) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    }

    pub(super) fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Stream a file as `CHUNK`-sized chunks read by one blocking thread, at most `READ_AHEAD`
/// chunks ahead of the socket: plain blocking reads straight into the buffers the
/// request sends (no per-64-KiB hop to the blocking pool, no second copy), and
/// memory bounded at a few MiB whatever the file's size. `len` bytes at most.
pub(super) fn file_chunks(
    mut file: std::fs::File,
    len: u64,
    read_error: ReadError,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            // a file that shrank fails the request rather than sending it truncated
            let buf = match next_chunk(&mut file, left) {
                Ok(buf) => buf,
                Err(e) => {
                    read_error.set(&e);
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            left -= buf.len() as u64;
            // the receiver is gone when the request ended early: stop reading
            if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_chunks_stream_the_file_and_report_a_file_that_shrank() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.wav");
        let bytes: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");

        let open = || std::fs::File::open(&path).expect("open");
        let whole = ReadError::default();
        let chunks: Vec<_> = file_chunks(open(), bytes.len() as u64, whole.clone())
            .collect()
            .await;
        let sent: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.expect("no read error").to_vec())
            .collect();
        assert!(
            sent == bytes,
            "{} bytes streamed of {}",
            sent.len(),
            bytes.len()
        );
        assert_eq!(whole.take(), None);

        // opened when it was 1,000 bytes longer: the stream ends in an error
        let shrank = ReadError::default();
        let items: Vec<_> = file_chunks(open(), bytes.len() as u64 + 1_000, shrank.clone())
            .collect()
            .await;
        assert!(items.last().is_some_and(|i| i.is_err()));
        let streamed: usize = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(|b| b.len())
            .sum();
        assert_eq!(streamed, bytes.len());
        let cause = shrank
            .take()
            .expect("the read error is kept for classification");
        assert!(cause.contains("1000 bytes shorter"), "{cause}");
    }

    #[test]
    fn an_upload_form_frames_the_file_and_counts_every_byte() {
        let job = FileJob {
            call_log_id: "c1".into(),
            recording_id: "r1".into(),
            file_path: "c1/a.wav".into(),
            meta_path: None,
        };
        let form = UploadForm::new(
            &job,
            "we\"ird\r\nna\\me.wav",
            Some(("meta.json".into(), b"{}".to_vec())),
        );
        let head = String::from_utf8(form.head.to_vec()).unwrap();
        let tail = String::from_utf8(form.tail.to_vec()).unwrap();
        let boundary = &form.boundary;
        assert!(head.starts_with(&format!("--{boundary}\r\n")));
        assert!(head.contains("name=\"callLogId\"\r\n\r\nc1\r\n"));
        assert!(head.contains("name=\"recordingId\"\r\n\r\nr1\r\n"));
        assert!(
            head.ends_with(
                "filename=\"we%22ird%0D%0Ana%5Cme.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
            ),
            "{head}"
        );
        assert!(tail.starts_with("\r\n--"));
        assert!(tail.contains(
            "name=\"meta\"; filename=\"meta.json\"\r\nContent-Type: application/json\r\n\r\n{}\r\n"
        ));
        assert!(tail.ends_with(&format!("--{boundary}--\r\n")));
        assert_eq!(form.len(10), (head.len() + 10 + tail.len()) as u64);
        assert_eq!(
            form.content_type(),
            format!("multipart/form-data; boundary={boundary}")
        );
    }
}
