//! `cairn upload DIR`: watches a directory, uploads each file once it has settled through tus
//! resumable uploads in chunks (each with its SHA-256 checksum), then submits one request per
//! file to a handler with the upload as the data stream `file`. A journal in `DIR/LOGS/` makes
//! it restart-safe: an unfinished file resumes from the server's offset, a finished one is not
//! sent again, and the submission's idempotency key (from the path and the file's SHA-256)
//! keeps a lost answer from submitting twice.

mod journal;
mod keys;
mod settle;
mod tus;

use std::collections::HashSet;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use notify::Watcher as _;
use regex::Regex;
use reqwest::{Method, Url};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::journal::{Entry, Journal, LOGS_DIR, hex};
use self::settle::{Settler, Stamp};
use self::tus::Appended;
use crate::cli::Upload;
use crate::client::Client;
use crate::commands::{parse_json, read_input};
use crate::error::{CliError, Exit};
use crate::output::Output;

/// Longest single tus call (a chunk of up to 64 MiB included).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// The data stream each request carries its file as.
pub const STREAM_NAME: &str = "file";
const MIN_CHUNK: u64 = 16 << 10;
const MAX_CHUNK: u64 = 64 << 20;
/// Attempts at a file while Cairn is unreachable or busy, with doubling pauses from 1 s; then
/// the command stops (exit 3) and a later run resumes from the journal.
const ATTEMPTS: u32 = 4;

/// `--chunk-size`: bytes (`65536`) or a number with `KiB`/`MiB` (`64KiB`, `4MiB`), a power of
/// two from 16 KiB to 64 MiB.
pub fn parse_chunk_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        _ => return Err(format!("{text:?}: unknown unit; write bytes (65536) or KiB/MiB (64KiB, 4MiB)")),
    };
    let value = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("{text:?} is not a size; write bytes (65536) or KiB/MiB (64KiB, 4MiB)"))?;
    if !value.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&value) {
        return Err(format!("{text:?} must be a power of two from 16KiB to 64MiB"));
    }
    Ok(value)
}

/// Which files are uploaded, by their path relative to the watched directory.
pub struct Filter {
    regex: Option<Regex>,
}

impl Filter {
    pub fn new(regex: Option<&str>) -> Result<Filter, CliError> {
        let regex = regex
            .map(|r| {
                Regex::new(r)
                    .map_err(|e| CliError::usage(format!("--upload-regex {r:?} is not a regex: {e}")))
            })
            .transpose()?;
        Ok(Filter { regex })
    }

    /// Whether `relative` (`/`-separated) is uploaded. The journal's own directory never is.
    pub fn accepts(&self, relative: &str) -> bool {
        if relative == LOGS_DIR || relative.starts_with(&format!("{LOGS_DIR}/")) {
            return false;
        }
        match &self.regex {
            Some(regex) => regex.is_match(relative),
            None => !relative.split('/').any(|part| part.starts_with('.')) && !relative.ends_with(".log"),
        }
    }
}

/// `path` relative to `root`, `/`-separated; `None` outside it or not UTF-8.
fn relative(root: &Path, path: &Path) -> Option<String> {
    let rest = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rest.components().map(|c| c.as_os_str().to_str()).collect();
    let parts = parts?;
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    (meta.len(), modified)
}

/// The submission's idempotency key: the same file (path and content) gives the same key, so
/// a submission repeated after a lost answer names the first request.
fn idempotency_key(path: &str, sha256: &str) -> String {
    let digest = Sha256::digest(format!("{path}\0{sha256}").as_bytes());
    format!("cairn-upload-{}", &hex(&digest)[..40])
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    uploaded: u64,
    skipped: u64,
    failed: u64,
    uploading: u64,
    bytes_sent: u64,
}

/// What each upload task shares.
struct Shared {
    client: Client,
    journal: Journal,
    handler: String,
    extra: Map<String, Value>,
    chunk: u64,
    out: Output,
    multi: MultiProgress,
    overall: ProgressBar,
    counts: Mutex<Counts>,
}

impl Shared {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn line(&self, text: &str) {
        if self.out.terminal {
            let _ = self.multi.println(text);
        } else {
            self.out.text(text);
        }
    }
}

/// How one file's task ended.
enum Done {
    Uploaded,
    /// Already uploaded and submitted (the journal says so).
    Skipped,
    /// Changed while it was being sent: it is watched again.
    Changed,
}

pub async fn run(client: &Client, out: Output, args: Upload) -> Result<Exit, CliError> {
    let root = std::fs::canonicalize(&args.dir)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| CliError::usage(format!("{} is not a directory", args.dir.display())))?;
    let filter = Filter::new(args.upload_regex.as_deref())?;
    let extra = match &args.payload {
        None => Map::new(),
        Some(arg) => match parse_json(&read_input(arg, "payload")?, "payload")? {
            Value::Object(map) => map,
            _ => return Err(CliError::usage("--payload must be a JSON object, e.g. '{\"project\": 7}'")),
        },
    };
    let journal = Journal::open(&root).map_err(|e| {
        CliError::usage(format!("cannot write the journal in {}: {e}", root.join(LOGS_DIR).display()))
    })?;
    let resume: Vec<Entry> = journal
        .load()
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read the journal: {e}")))?
        .into_values()
        .filter(|e| !e.is_done())
        .collect();

    let multi = MultiProgress::with_draw_target(if out.terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = multi.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    overall.set_prefix("all");
    let shared = Arc::new(Shared {
        client: client.clone(),
        journal,
        handler: args.handler.clone(),
        extra,
        chunk: args.chunk_size,
        out,
        multi,
        overall,
        counts: Mutex::new(Counts::default()),
    });

    // Events only name paths to look at; what to do is decided on `stat`.
    let (events_tx, mut events) = mpsc::unbounded_channel::<PathBuf>();
    let _watcher = if args.once {
        None
    } else {
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                for path in event.paths {
                    let _ = events_tx.send(path);
                }
            }
        })
        .and_then(|mut w| w.watch(&root, notify::RecursiveMode::Recursive).map(|()| w))
        .map_err(|e| CliError::Other(anyhow::anyhow!("cannot watch {}: {e}", root.display())))?;
        Some(watcher)
    };

    let mut settler = Settler::new(args.lag);
    for entry in &resume {
        observe(&root, &filter, &mut settler, &root.join(&entry.path));
    }
    if args.upload_existing || args.once {
        observe(&root, &filter, &mut settler, &root);
    }

    let mut keys = keys::Keys::start();
    let shutdown = cairn_runtime::shutdown_token();
    let threads = Arc::new(Semaphore::new(args.threads as usize));
    let mut tasks: JoinSet<(PathBuf, Result<Done, CliError>)> = JoinSet::new();
    let mut busy: HashSet<PathBuf> = HashSet::new();
    let mut tick =
        tokio::time::interval((args.lag / 4).clamp(Duration::from_millis(20), Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut finishing = false;
    let mut fatal: Option<CliError> = None;
    loop {
        if (args.once && settler.is_empty() && tasks.is_empty()) || (finishing && tasks.is_empty()) {
            break;
        }
        tokio::select! {
            Some(path) = events.recv(), if !finishing => observe(&root, &filter, &mut settler, &path),
            _ = tick.tick(), if !finishing => {
                let now = Instant::now();
                for path in settler.candidates() {
                    match std::fs::metadata(&path) {
                        Ok(meta) if meta.is_file() => settler.observe(path, stamp(&meta), now),
                        _ => settler.forget(&path),
                    }
                }
                for (path, stamp) in settler.take_settled(now) {
                    if busy.contains(&path) {
                        // Seen again while uploading: look once more when that ends.
                        continue;
                    }
                    let Some(rel) = relative(&root, &path) else { continue };
                    busy.insert(path.clone());
                    let shared = shared.clone();
                    let threads = threads.clone();
                    tasks.spawn(async move {
                        let _permit = threads.acquire_owned().await.expect("the semaphore is never closed");
                        let result = upload_with_retries(&shared, &path, &rel, stamp).await;
                        (path, result)
                    });
                }
            }
            Some(joined) = tasks.join_next() => {
                let (path, result) = match joined {
                    Ok(done) => done,
                    Err(error) => return Err(CliError::Other(anyhow::anyhow!("an upload task failed: {error}"))),
                };
                busy.remove(&path);
                match result {
                    Ok(Done::Uploaded) => shared.counts().uploaded += 1,
                    Ok(Done::Skipped) => shared.counts().skipped += 1,
                    Ok(Done::Changed) => observe(&root, &filter, &mut settler, &path),
                    Err(
                        error @ (CliError::Unauthorized { .. }
                        | CliError::Unreachable { .. }
                        | CliError::Unavailable { .. }),
                    ) => {
                        fatal = Some(error);
                        break;
                    }
                    Err(error) => {
                        shared.counts().failed += 1;
                        let rel = relative(&root, &path).unwrap_or_default();
                        if out.json {
                            out.json_line(&json!({"path": rel, "error": error.to_string()}));
                        } else {
                            shared.line(&format!("failed    {rel}: {error:#}"));
                        }
                    }
                }
            }
            Some(key) = async { match keys.as_mut() { Some(k) => k.rx.recv().await, None => std::future::pending().await } } => {
                match key {
                    keys::Key::Counts => shared.line(&counts_line(&shared.counts(), settler.candidates().len())),
                    keys::Key::Quit => {
                        shared.line("finishing the files being uploaded, then exiting");
                        finishing = true;
                    }
                }
            }
            () = shutdown.cancelled(), if !finishing => finishing = true,
        }
    }
    tasks.abort_all();
    drop(keys);
    shared.overall.finish_and_clear();
    if let Some(error) = fatal {
        return Err(error);
    }
    let counts = *shared.counts();
    if out.json {
        out.json_line(&json!({
            "uploaded": counts.uploaded, "skipped": counts.skipped, "failed": counts.failed,
            "bytes_sent": counts.bytes_sent,
        }));
    } else {
        out.text(&counts_line(&counts, 0));
    }
    Ok(if counts.failed > 0 { Exit::Failed } else { Exit::Success })
}

fn counts_line(counts: &Counts, waiting: usize) -> String {
    format!(
        "uploaded {}, already done {}, failed {}, uploading {}, settling {waiting} ({} sent)",
        counts.uploaded,
        counts.skipped,
        counts.failed,
        counts.uploading,
        indicatif::HumanBytes(counts.bytes_sent)
    )
}

/// Looks at `path`: a file that passes the filter becomes a candidate; a directory (new, or the
/// root at start) has each of its files looked at, since files made before its watch began
/// raise no event.
fn observe(root: &Path, filter: &Filter, settler: &mut Settler, path: &Path) {
    let Some(rel) = relative(root, path).or_else(|| (path == root).then(String::new)) else { return };
    if !rel.is_empty() && (rel == LOGS_DIR || rel.starts_with(&format!("{LOGS_DIR}/"))) {
        return;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        settler.forget(&path.to_path_buf());
        return;
    };
    if meta.is_dir() {
        let Ok(items) = std::fs::read_dir(path) else { return };
        for item in items.flatten() {
            observe(root, filter, settler, &item.path());
        }
    } else if meta.is_file() && filter.accepts(&rel) {
        settler.observe(path.to_path_buf(), stamp(&meta), Instant::now());
    }
}

/// Uploads one file, starting again (from the journal and the server's offset) while Cairn is
/// unreachable or busy.
async fn upload_with_retries(
    shared: &Shared,
    path: &Path,
    rel: &str,
    stamp: Stamp,
) -> Result<Done, CliError> {
    let mut pause = Duration::from_secs(1);
    let mut attempt = 1;
    loop {
        match upload_file(shared, path, rel, stamp).await {
            Err(error @ (CliError::Unreachable { .. } | CliError::Unavailable { .. }))
                if attempt < ATTEMPTS =>
            {
                shared.line(&format!("retrying  {rel} in {}s: {error}", pause.as_secs()));
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn upload_file(
    shared: &Shared,
    path: &Path,
    rel: &str,
    (size, modified): Stamp,
) -> Result<Done, CliError> {
    let client = &shared.client;
    let mut entry = match shared.journal.get(rel).filter(|e| e.matches(size, modified)) {
        Some(entry) if entry.is_done() => return Ok(Done::Skipped),
        Some(entry) => entry,
        None => {
            let file = path.to_path_buf();
            let sha256 = tokio::task::spawn_blocking(move || file_sha256(&file))
                .await
                .map_err(|e| CliError::Other(anyhow::anyhow!("hashing task: {e}")))?
                .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read {rel}: {e}")))?;
            Entry {
                path: rel.to_owned(),
                size,
                modified_ns: modified,
                sha256,
                upload: None,
                acked: 0,
                chunks: 0,
                request: None,
            }
        }
    };
    let save = |entry: &Entry| {
        shared
            .journal
            .save(entry)
            .map_err(|e| CliError::Other(anyhow::anyhow!("cannot write the journal: {e}")))
    };

    // Resume the journal's upload from the server's offset, or start a new one.
    let mut resumed_from = None;
    let mut target = None;
    if let Some(url) = entry.upload.as_deref().and_then(|u| Url::parse(u).ok())
        && let Some(offset) = client.tus_offset(&url).await?
    {
        resumed_from = Some(offset);
        target = Some((url, offset));
    }
    let (url, mut offset) = match target {
        Some(found) => found,
        None => {
            let name = rel.rsplit('/').next().unwrap_or(rel);
            let metadata = tus::metadata(&[
                ("filename", name),
                ("relative_path", rel),
                ("sha256", &entry.sha256),
                ("size", &size.to_string()),
            ]);
            let url = client.tus_create(size, &metadata).await?;
            entry.upload = Some(url.to_string());
            entry.acked = 0;
            save(&entry)?;
            (url, 0)
        }
    };

    let bar = shared.multi.insert_from_back(1, ProgressBar::new(size));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(short(rel, 12));
    bar.set_position(offset);
    shared.overall.inc_length(size);
    shared.overall.inc(offset);
    shared.counts().uploading += 1;
    let sent = send_chunks(shared, path, &url, &mut entry, &mut offset, &bar).await;
    shared.counts().uploading -= 1;
    bar.finish_and_clear();
    shared.multi.remove(&bar);
    let sent = sent?;

    // The bytes sent must be those of the file as it still is.
    let now = std::fs::metadata(path).map(|m| stamp(&m)).ok();
    if now != Some((size, modified)) {
        client.tus_terminate(&url).await?;
        entry.upload = None;
        entry.acked = 0;
        save(&entry)?;
        return Ok(Done::Changed);
    }

    let mut payload = shared.extra.clone();
    payload.insert("path".into(), json!(rel));
    payload.insert("size".into(), json!(size));
    payload.insert("sha256".into(), json!(entry.sha256));
    payload.insert("upload".into(), json!(tus::upload_id(&url)));
    let body = json!({
        "handler": shared.handler,
        "payload": payload,
        "streams": { STREAM_NAME: tus::upload_id(&url) },
        "idempotency_key": idempotency_key(rel, &entry.sha256),
    });
    let answer = client.call(client.request(Method::POST, &["v1", "requests"]).json(&body), None).await?;
    let request = answer.json["id"].as_str().unwrap_or_default().to_owned();
    entry.request = Some(request.clone());
    save(&entry)?;
    let report = json!({
        "path": rel, "size": size, "sha256": entry.sha256, "upload": tus::upload_id(&url),
        "request": request, "sent_bytes": sent, "resumed_from": resumed_from,
    });
    if shared.out.json {
        shared.out.json_line(&report);
    } else {
        let resumed =
            resumed_from.map(|o| format!(", resumed at {}", indicatif::HumanBytes(o))).unwrap_or_default();
        shared.line(&format!(
            "uploaded  {rel} ({}{resumed}) as request {request}",
            indicatif::HumanBytes(size)
        ));
    }
    Ok(Done::Uploaded)
}

/// Sends the file from `offset` chunk by chunk, journaling each acknowledged chunk; the bytes
/// sent.
async fn send_chunks(
    shared: &Shared,
    path: &Path,
    url: &Url,
    entry: &mut Entry,
    offset: &mut u64,
    bar: &ProgressBar,
) -> Result<u64, CliError> {
    let mut sent = 0;
    let mut damaged = 0;
    while *offset < entry.size {
        let length = shared.chunk.min(entry.size - *offset);
        let (file, at) = (path.to_path_buf(), *offset);
        let bytes = tokio::task::spawn_blocking(move || read_chunk(&file, at, length))
            .await
            .map_err(|e| CliError::Other(anyhow::anyhow!("reading task: {e}")))?
            .map_err(|e| CliError::Other(anyhow::anyhow!("cannot read {}: {e}", entry.path)))?;
        match shared.client.tus_append(url, *offset, bytes).await? {
            Appended::At(acked) => {
                sent += length;
                shared.counts().bytes_sent += length;
                shared.overall.inc(acked.saturating_sub(*offset));
                *offset = acked;
                entry.acked = acked;
                entry.chunks += 1;
                shared
                    .journal
                    .save(entry)
                    .map_err(|e| CliError::Other(anyhow::anyhow!("cannot write the journal: {e}")))?;
                bar.set_position(acked);
            }
            Appended::Conflict(server) => *offset = server,
            Appended::Damaged => {
                damaged += 1;
                if damaged > 3 {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "{}: the server kept finding the chunk at {offset} damaged (checksum mismatch)",
                        entry.path
                    )));
                }
            }
        }
    }
    Ok(sent)
}

fn read_chunk(path: &Path, offset: u64, length: u64) -> std::io::Result<bytes::Bytes> {
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buffer = vec![0; usize::try_from(length).map_err(std::io::Error::other)?];
    file.read_exact(&mut buffer)?;
    Ok(buffer.into())
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// The last `width` characters of `text`, for a bar's prefix.
fn short(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        return text.to_owned();
    }
    let tail: String = text.chars().skip(count - (width - 1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size("65536"), Ok(65536));
        assert_eq!(parse_chunk_size("64KiB"), Ok(65536));
        assert_eq!(parse_chunk_size("16KiB"), Ok(16384));
        assert_eq!(parse_chunk_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_chunk_size("64mib"), Ok(64 << 20));
        for bad in ["8KiB", "128MiB", "65535", "3MiB", "", "4GiB", "MiB", "-4MiB", "99999999999999999999"] {
            let error = parse_chunk_size(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{bad}: {error}");
        }
    }

    #[test]
    fn the_default_filter_skips_hidden_files_logs_and_the_journal() {
        let filter = Filter::new(None).unwrap();
        for yes in ["a.bin", "sub/b.txt", "sub/deeper/c", "catalog.logs", "x.log.gz"] {
            assert!(filter.accepts(yes), "{yes}");
        }
        for no in
            [".hidden", "sub/.x", ".git/config", "run.log", "a/b/run.log", "LOGS", "LOGS/uploads/x.json"]
        {
            assert!(!filter.accepts(no), "{no}");
        }
        let filter = Filter::new(Some(r"\.csv$")).unwrap();
        assert!(filter.accepts("a/b.csv") && filter.accepts(".hidden.csv"));
        assert!(!filter.accepts("a/b.txt") && !filter.accepts("LOGS/x.csv"));
        let error = Filter::new(Some("(")).err().unwrap();
        assert_eq!(error.exit(), Exit::Usage);
        assert!(error.to_string().contains("--upload-regex"), "{error}");
    }

    #[test]
    fn paths_are_relative_with_slashes() {
        let root = Path::new("/data/in");
        assert_eq!(relative(root, Path::new("/data/in/a/b.txt")).as_deref(), Some("a/b.txt"));
        assert_eq!(relative(root, Path::new("/data/in")), None);
        assert_eq!(relative(root, Path::new("/data/other/x")), None);
    }

    #[test]
    fn idempotency_keys_follow_path_and_content() {
        let a = idempotency_key("a/b", "00");
        assert_eq!(a, idempotency_key("a/b", "00"));
        assert_ne!(a, idempotency_key("a/b", "01"));
        assert_ne!(a, idempotency_key("a/c", "00"));
        assert!(a.len() <= 64);
    }

    #[test]
    fn files_hash_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            file_sha256(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(&read_chunk(&file, 1, 2).unwrap()[..], b"bc");
        assert_eq!(short("abcdef", 4), "…def");
    }
}
