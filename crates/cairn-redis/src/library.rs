//! All of Cairn's Lua, as one Redis function library (Redis 7: `FUNCTION LOAD`, `FCALL`): the
//! progress tree (`progress/`), the request queue (`requests/`) and retention (`retention/`:
//! safe trimming, idle consumers, the purges, the trimmer's lease). There is no other loading
//! path: no `EVALSHA`, no Lua inline in Rust. Key names come from [`crate::keys`].
//!
//! Why not `EVALSHA`: a script runs its whole text on every call, so each call made every
//! shared helper anew, and a Lua closure costs a walk of the open upvalues per variable it
//! captures. For the progress store's shared code that was about 51 000 instructions a call
//! (callgrind, as `scripts/profile-progress-lua.sh` counts; measured when the code was still a
//! script), a quarter of a one-update call. A library's top level
//! runs once, when it is loaded; a call runs only its function.
//!
//! The library's name carries the SHA1 of its code, so replicas of different versions never
//! replace each other's functions. It is loaded on first use: a call that finds its function
//! missing (Redis restarted without persistence, or flushed its functions) loads the library and
//! calls again. Per-call state in the shared code is reset by `begin` / `begin_requests` at the
//! start of every function. The shared files are one chunk: a name declared at the top level of
//! one must not be declared again in another (it would hide the first from what follows).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{Cmd, FromRedisValue, RedisResult, ToRedisArgs};

/// The shared code, in this order: the library's top level, after the key layout
/// ([`crate::keys::lua_layout`]).
const INCLUDES: [(&str, &str); 4] = [
    ("progress/common.lua", include_str!("progress/common.lua")),
    ("progress/read.lua", include_str!("progress/read.lua")),
    ("requests/common.lua", include_str!("requests/common.lua")),
    ("retention/ids.lua", include_str!("retention/ids.lua")),
];

/// The library with every function below, loaded lazily.
pub(crate) static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let layout = crate::keys::lua_layout();
    let mut includes = vec![layout.as_str()];
    includes.extend(INCLUDES.map(|(_, text)| text));
    Library::new(
        &includes,
        &[
            ("progress_apply", "begin(ARGV[1], KEYS)", include_str!("progress/apply.lua"), NONE),
            ("progress_read", "begin(ARGV[1], KEYS)", include_str!("progress/read_main.lua"), NONE),
            ("progress_delete", "begin(ARGV[1], KEYS)", include_str!("progress/delete.lua"), NONE),
            ("progress_snapshot", "begin(ARGV[1], KEYS)", include_str!("progress/snapshot.lua"), NONE),
            ("progress_read_nodes", "begin(ARGV[1], KEYS)", include_str!("progress/read_nodes.lua"), NONE),
            ("progress_feed_since", "begin(ARGV[1], KEYS)", include_str!("progress/feed_since.lua"), NONE),
            ("requests_submit", "begin_requests(ARGV, KEYS)", include_str!("requests/submit.lua"), NONE),
            ("requests_start", "begin_requests(ARGV, KEYS)", include_str!("requests/start.lua"), NONE),
            (
                "requests_heartbeat",
                "begin_requests(ARGV, KEYS)",
                include_str!("requests/heartbeat.lua"),
                NONE,
            ),
            ("requests_commit", "begin_requests(ARGV, KEYS)", include_str!("requests/commit.lua"), NONE),
            ("requests_cancel", "begin_requests(ARGV, KEYS)", include_str!("requests/cancel.lua"), NONE),
            (
                "requests_retry_dead",
                "begin_requests(ARGV, KEYS)",
                include_str!("requests/retry_dead.lua"),
                NONE,
            ),
            ("retention_safe_trim", "", include_str!("retention/safe_trim.lua"), ALLOW_OOM),
            ("retention_idle_consumers", "", include_str!("retention/idle_consumers.lua"), ALLOW_OOM),
            ("retention_purge_requests", "", include_str!("retention/purge_requests.lua"), ALLOW_OOM),
            (
                "retention_purge_tree",
                "begin(ARGV[1], KEYS)",
                concat!(include_str!("retention/purge_tree.lua"), include_str!("progress/delete.lua")),
                ALLOW_OOM,
            ),
            ("retention_lease_acquire", "", include_str!("retention/lease_acquire.lua"), ALLOW_OOM),
            ("retention_lease_release", "", include_str!("retention/lease_release.lua"), ALLOW_OOM),
            ("blobs_append", "", include_str!("blobs/append.lua"), NONE),
            ("blobs_stage", "", include_str!("blobs/stage.lua"), NONE),
            ("blobs_commit", "", include_str!("blobs/commit.lua"), NONE),
            ("blobs_claim", "", include_str!("blobs/claim.lua"), NONE),
        ],
    )
});

/// A function's flags: none (Redis refuses the call while it is out of memory), or `allow-oom`
/// for retention, which frees memory and must run then (as the `EVAL` scripts it once was did).
const NONE: &[&str] = &[];
const ALLOW_OOM: &[&str] = &["allow-oom"];

/// Stands for the library's name in its functions' names until the name (a hash of the code
/// that holds them) is known.
const LIBRARY_NAME: &str = "__CAIRN_LIBRARY__";

pub(crate) struct Library {
    name: String,
    code: String,
}

impl Library {
    /// A library of the shared code `includes` (its top level, run once at load) and one
    /// function per entry `(name, setup, body, flags)`: `body` is a script's text, run as a
    /// function of `KEYS` and `ARGV` after `setup`.
    fn new(includes: &[&str], entries: &[(&str, &str, &str, &[&str])]) -> Library {
        // The shared code reads ARGV at its top level, as scripts do: at load there is none.
        let mut body = String::from("local ARGV = {}\n");
        for include in includes {
            body.push_str(include);
        }
        for (name, setup, text, flags) in entries {
            let function = format!("function(KEYS, ARGV)\n{setup}\n{text}\nend");
            body.push_str(&if flags.is_empty() {
                format!("redis.register_function('{LIBRARY_NAME}_{name}', {function})\n")
            } else {
                let flags: Vec<String> = flags.iter().map(|flag| format!("'{flag}'")).collect();
                format!(
                    "redis.register_function{{function_name = '{LIBRARY_NAME}_{name}', flags = {{ {} }}, callback = {function}}}\n",
                    flags.join(", ")
                )
            });
        }
        let name = format!("cairn_{}", &redis::Script::new(&body).get_hash()[..16]);
        let code = format!("#!lua name={name}\n{}", body.replace(LIBRARY_NAME, &name));
        Library { name, code }
    }

    /// The library's text, as `FUNCTION LOAD` takes it.
    pub(crate) fn code(&self) -> &str {
        &self.code
    }

    /// One of its functions, to call with [`Function::prepare_invoke`].
    pub(crate) fn function(&'static self, name: &str) -> Function {
        Function { name: format!("{}_{name}", self.name), library: self }
    }

    async fn load(&self, conn: &mut impl ConnectionLike) -> RedisResult<()> {
        redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(&self.code).query_async::<String>(conn).await?;
        Ok(())
    }
}

pub(crate) struct Function {
    name: String,
    library: &'static Library,
}

impl Function {
    /// An `FCALL` of this function with `keys` as its `KEYS`; add its `ARGV` with
    /// [`Invocation::arg`].
    pub(crate) fn prepare_invoke_with_keys(&self, keys: &[&str]) -> Invocation {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.name).arg(keys.len()).arg(keys);
        Invocation { cmd, library: self.library }
    }
}

pub(crate) struct Invocation {
    cmd: Cmd,
    library: &'static Library,
}

impl Invocation {
    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Calls the function, loading the library first if Redis does not have it.
    pub(crate) async fn invoke_async<T: FromRedisValue>(
        &self,
        conn: &mut impl ConnectionLike,
    ) -> RedisResult<T> {
        match self.cmd.query_async(conn).await {
            Err(error) if is_missing_function(&error) => {
                self.library.load(conn).await?;
                self.cmd.query_async(conn).await
            }
            result => result,
        }
    }
}

/// Whether FCALL failed because Redis does not have the function (restarted without
/// persistence, or its functions were flushed). Redis answers `ERR Function not found`: no
/// dedicated code (unlike `NOSCRIPT` for EVALSHA, which redis-rs exposes as a kind), so the text
/// is the only signal; this is the one place that reads it.
fn is_missing_function(error: &redis::RedisError) -> bool {
    error.detail().is_some_and(|detail| detail.contains("Function not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_names_itself_and_its_functions_by_its_code() {
        let code = LIBRARY.code();
        let name = code.lines().next().unwrap().strip_prefix("#!lua name=").unwrap();
        assert!(name.starts_with("cairn_") && name.len() == "cairn_".len() + 16, "{name}");
        let apply = LIBRARY.function("progress_apply");
        assert_eq!(apply.name, format!("{name}_progress_apply"));
        assert!(code.contains(&format!("redis.register_function('{}', function(KEYS, ARGV)", apply.name)));
        assert!(!code.contains(LIBRARY_NAME), "every placeholder is replaced");
        let trim = LIBRARY.function("retention_safe_trim");
        assert!(code.contains(&format!("function_name = '{}', flags = {{ 'allow-oom' }}", trim.name)));
    }

    /// The shared files are one chunk of Lua: a top-level name declared twice would hide the
    /// first from every function after it.
    #[test]
    fn the_shared_files_declare_each_top_level_name_once() {
        let mut seen = std::collections::HashMap::new();
        let layout = crate::keys::lua_layout();
        for (file, text) in std::iter::once(("keys.rs", layout.as_str())).chain(INCLUDES) {
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("local ") else { continue };
                let names = rest.strip_prefix("function ").unwrap_or(rest);
                let names = names.split(['=', '(']).next().unwrap_or_default();
                for name in names.split(',').map(str::trim).filter(|name| !name.is_empty()) {
                    if let Some(first) = seen.insert(name.to_owned(), file) {
                        panic!("{name} is declared at the top level of {first} and of {file}");
                    }
                }
            }
        }
        for name in ["begin", "begin_requests", "KEY_NODE", "id_succ"] {
            assert!(seen.contains_key(name), "{name} is not found: {seen:?}");
        }
    }
}
