//! The restart-safe journal of `cairn upload` in `DIR/LOGS/`: one small JSON record per file
//! (named by a hash of its relative path) holding the upload's URL, the bytes the server has
//! acknowledged and, once done, the request it was submitted as. Every write goes to a temporary
//! file that is then renamed over the record, so a crash leaves the old record or the new one,
//! never half of one.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The journal's directory below the watched one; never uploaded itself.
pub const LOGS_DIR: &str = "LOGS";
const RECORDS_DIR: &str = "uploads";

/// What the journal knows about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the watched directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Modification time (ns since the epoch) when the upload began; a file changed since
    /// starts over.
    pub modified_ns: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// The tus upload's URL.
    pub upload: Option<String>,
    /// Bytes the server has acknowledged.
    pub acked: u64,
    /// Chunks acknowledged (across restarts).
    pub chunks: u64,
    /// The request the file was submitted as; set once the submission was answered.
    pub request: Option<String>,
}

impl Entry {
    pub fn is_done(&self) -> bool {
        self.request.is_some()
    }

    /// Whether this record describes the file as it is now.
    pub fn matches(&self, size: u64, modified_ns: u64) -> bool {
        self.size == size && self.modified_ns == modified_ns
    }
}

pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal of the watched directory `root`, created if missing.
    pub fn open(root: &Path) -> std::io::Result<Journal> {
        let dir = root.join(LOGS_DIR).join(RECORDS_DIR);
        std::fs::create_dir_all(&dir)?;
        Ok(Journal { dir })
    }

    fn record(&self, path: &str) -> PathBuf {
        let hash = hex(&Sha256::digest(path.as_bytes()));
        self.dir.join(format!("{}.json", &hash[..32]))
    }

    /// Every record, by relative path; unreadable records are skipped (their file starts over).
    pub fn load(&self) -> std::io::Result<HashMap<String, Entry>> {
        let mut entries = HashMap::new();
        for item in std::fs::read_dir(&self.dir)? {
            let file = item?.path();
            if file.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(text) = std::fs::read(&file) else { continue };
            if let Ok(entry) = serde_json::from_slice::<Entry>(&text) {
                entries.insert(entry.path.clone(), entry);
            }
        }
        Ok(entries)
    }

    pub fn get(&self, path: &str) -> Option<Entry> {
        let text = std::fs::read(self.record(path)).ok()?;
        serde_json::from_slice::<Entry>(&text).ok().filter(|e| e.path == path)
    }

    /// Writes the record atomically (temporary file, flushed, then renamed over the old one).
    pub fn save(&self, entry: &Entry) -> std::io::Result<()> {
        let target = self.record(&entry.path);
        let temp = target.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&serde_json::to_vec(entry).map_err(std::io::Error::other)?)?;
        file.sync_data()?;
        drop(file);
        std::fs::rename(&temp, &target)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            size: 10,
            modified_ns: 7,
            sha256: "ab".into(),
            upload: Some("http://h/v1/uploads/x".into()),
            acked: 4,
            chunks: 1,
            request: None,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_replace_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let mut a = entry("sub/a.bin");
        journal.save(&a).unwrap();
        journal.save(&entry("b")).unwrap();
        a.acked = 10;
        a.request = Some("r1".into());
        journal.save(&a).unwrap();

        let journal = Journal::open(dir.path()).unwrap();
        let all = journal.load().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["sub/a.bin"], a);
        assert!(all["sub/a.bin"].is_done() && !all["b"].is_done());
        assert_eq!(journal.get("b"), Some(entry("b")));
        assert_eq!(journal.get("c"), None);
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(dir.path().join("LOGS/uploads")).unwrap().collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn a_torn_record_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.save(&entry("a")).unwrap();
        std::fs::write(journal.record("b"), b"{\"path\": \"b\", \"si").unwrap();
        assert_eq!(journal.load().unwrap().len(), 1);
        assert_eq!(journal.get("b"), None);
    }
}
