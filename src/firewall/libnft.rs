//! Applies batches in-process through libnftables (`libnftables.so.1`, loaded at run
//! time), the library behind `nft`: the same JSON batches, one transaction each, without
//! starting a process per change (about 4 ms of every request at 100 grants/s).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Arc, Mutex};

use nftables::schema::Nftables;

use super::kernel::KernelTable;
use super::{Firewall, FirewallError};

/// Where jitd looks for libnftables unless `JITD_LIBNFTABLES` names another file.
pub const DEFAULT_LIBRARY: &str = "libnftables.so.1";

type New = unsafe extern "C" fn(u32) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type Flag = unsafe extern "C" fn(*mut c_void) -> c_int;
type DryRun = unsafe extern "C" fn(*mut c_void, bool);
type Run = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type ErrorBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, u32);

const NFT_CTX_OUTPUT_JSON: u32 = 1 << 4;
const NFT_CTX_INPUT_JSON: u32 = 1 << 1;

struct Context {
    ctx: *mut c_void,
    free: Free,
    dry_run: DryRun,
    run: Run,
    error_buffer: ErrorBuffer,
    // Keeps the functions above valid; dropped last.
    _library: libloading::Library,
}

// SAFETY: the context is only ever used behind the Mutex below, one call at a time.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: ctx came from nft_ctx_new and is freed once.
        unsafe { (self.free)(self.ctx) }
    }
}

/// An in-process libnftables context.
#[derive(Clone)]
pub struct LibNft {
    context: Arc<Mutex<Context>>,
}

impl std::fmt::Debug for LibNft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LibNft")
    }
}

/// Why libnftables could not be used (jitd then runs the `nft` program instead).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The library could not be opened.
    #[error("cannot load {path}: {source}")]
    Open {
        /// The file asked for.
        path: String,
        /// What the loader said.
        source: libloading::Error,
    },
    /// The library has no such function.
    #[error("{path} lacks {symbol}: {source}")]
    MissingSymbol {
        /// The library.
        path: String,
        /// The function's name.
        symbol: &'static str,
        /// What the loader said.
        source: libloading::Error,
    },
    /// The library names the function, but its address is null.
    #[error("{path}: {symbol} is a null symbol")]
    NullSymbol {
        /// The library.
        path: String,
        /// The function's name.
        symbol: &'static str,
    },
    /// A libnftables call failed while the context was being set up.
    #[error("{path}: {call} failed")]
    Call {
        /// The library.
        path: String,
        /// The function that failed.
        call: &'static str,
    },
}

/// Looks up `name` (NUL-terminated) as a function of type `T`; a missing or null symbol
/// is an error naming it.
///
/// # Safety
/// `T` must be the function's true type (from libnftables.h), and the returned pointer
/// must not be called after `library` is dropped.
unsafe fn function<T: Copy>(library: &libloading::Library, path: &str, name: &'static str) -> Result<T, LoadError> {
    let symbol = name.trim_end_matches('\0');
    // Option<fn> has the size of a pointer, and a null address reads as None.
    // SAFETY: the caller promises `T` is the symbol's true type and outlives no library.
    let found = unsafe { library.get::<Option<T>>(name.as_bytes()) }.map_err(|source| LoadError::MissingSymbol {
        path: path.to_string(),
        symbol,
        source,
    })?;
    (*found).ok_or_else(|| LoadError::NullSymbol {
        path: path.to_string(),
        symbol,
    })
}

impl LibNft {
    /// Loads libnftables from `path` and creates a context that buffers its output.
    pub fn load(path: &str) -> Result<LibNft, LoadError> {
        // SAFETY: loading libnftables runs its (trivial) initialisers; every function is
        // looked up with its signature from libnftables.h, and the library is kept in the
        // context as long as the functions are.
        unsafe {
            let library = libloading::Library::new(path).map_err(|source| LoadError::Open {
                path: path.to_string(),
                source,
            })?;
            let new: New = function(&library, path, "nft_ctx_new\0")?;
            let free: Free = function(&library, path, "nft_ctx_free\0")?;
            let buffer_output: Flag = function(&library, path, "nft_ctx_buffer_output\0")?;
            let buffer_error: Flag = function(&library, path, "nft_ctx_buffer_error\0")?;
            let dry_run: DryRun = function(&library, path, "nft_ctx_set_dry_run\0")?;
            let run: Run = function(&library, path, "nft_run_cmd_from_buffer\0")?;
            let error_buffer: ErrorBuffer = function(&library, path, "nft_ctx_get_error_buffer\0")?;
            let output_flags: SetFlags = function(&library, path, "nft_ctx_output_set_flags\0")?;
            // Input is JSON: libnftables up to 1.0.6 takes that from the JSON output flag
            // (as `nft -j` sets it), later versions also from an input flag.
            let input_flags = function::<SetFlags>(&library, path, "nft_ctx_input_set_flags\0").ok();
            let ctx = new(0);
            let failed = |call| LoadError::Call {
                path: path.to_string(),
                call,
            };
            if ctx.is_null() {
                return Err(failed("nft_ctx_new"));
            }
            let context = Context {
                ctx,
                free,
                dry_run,
                run,
                error_buffer,
                _library: library,
            };
            // from here on, dropping `context` frees ctx
            if buffer_output(context.ctx) != 0 {
                return Err(failed("nft_ctx_buffer_output"));
            }
            if buffer_error(context.ctx) != 0 {
                return Err(failed("nft_ctx_buffer_error"));
            }
            output_flags(context.ctx, NFT_CTX_OUTPUT_JSON);
            if let Some(input_flags) = input_flags {
                input_flags(context.ctx, NFT_CTX_INPUT_JSON);
            }
            Ok(LibNft {
                context: Arc::new(Mutex::new(context)),
            })
        }
    }

    async fn run(&self, batch: &Nftables<'_>, check_only: bool) -> Result<(), FirewallError> {
        let payload = super::rules::to_json(batch).map_err(|e| FirewallError::Output(e.to_string()))?;
        let payload = CString::new(payload).map_err(|e| FirewallError::Output(e.to_string()))?;
        let context = self.context.clone();
        tokio::task::spawn_blocking(move || {
            let c = context.lock().expect("libnftables context lock");
            // SAFETY: a valid context, a NUL-terminated buffer; the error buffer is
            // copied out before the next call on this context.
            unsafe {
                (c.dry_run)(c.ctx, check_only);
                let rc = (c.run)(c.ctx, payload.as_ptr());
                (c.dry_run)(c.ctx, false);
                let errors = (c.error_buffer)(c.ctx);
                let message = if errors.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(errors).to_string_lossy().into_owned()
                };
                if rc == 0 {
                    Ok(())
                } else {
                    let message = message
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                        .join("; ");
                    Err(FirewallError::refused(if message.is_empty() {
                        format!("libnftables returned {rc}")
                    } else {
                        message
                    }))
                }
            }
        })
        .await
        .map_err(|e| FirewallError::Output(e.to_string()))?
    }
}

impl Firewall for LibNft {
    async fn apply(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(batch, false).await
    }

    async fn check(&self, batch: &Nftables<'_>) -> Result<(), FirewallError> {
        self.run(batch, true).await
    }

    async fn read_table(&self, with_grants: bool) -> Result<Option<KernelTable>, FirewallError> {
        super::nft::read_table(with_grants).await
    }

    async fn read_counts(
        &self,
        keys: Vec<crate::domain::GrantKey>,
    ) -> Result<std::collections::HashMap<crate::domain::GrantKey, u64>, FirewallError> {
        super::nft::read_counts(keys).await
    }

    fn made_by_us(&self, pid: u32) -> bool {
        // The kernel names the thread that committed: any thread of this process.
        pid == std::process::id() || std::path::Path::new(&format!("/proc/self/task/{pid}")).exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for libnftables with every function jitd uses; `-DNULL_NEW` or
    /// `-DBUFFER_FAILS` breaks one of them.
    const FAKE: &str = r#"
        static int ctx;
        #ifdef NULL_NEW
        __asm__(".globl nft_ctx_new\n.set nft_ctx_new, 0\n");
        #else
        void *nft_ctx_new(unsigned flags) { return &ctx; }
        #endif
        void nft_ctx_free(void *c) {}
        #ifdef BUFFER_FAILS
        int nft_ctx_buffer_output(void *c) { return -1; }
        #else
        int nft_ctx_buffer_output(void *c) { return 0; }
        #endif
        int nft_ctx_buffer_error(void *c) { return 0; }
        void nft_ctx_set_dry_run(void *c, _Bool d) {}
        int nft_run_cmd_from_buffer(void *c, const char *b) { return 0; }
        const char *nft_ctx_get_error_buffer(void *c) { return ""; }
        void nft_ctx_output_set_flags(void *c, unsigned f) {}
    "#;

    /// Builds the fake library with `cc` (the linker Rust uses here anyway).
    fn fake(dir: &tempfile::TempDir, variant: &str) -> String {
        let source = dir.path().join("fake.c");
        std::fs::write(&source, FAKE).unwrap();
        let library = dir.path().join(format!("libfake-{variant}.so"));
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", &format!("-D{variant}"), "-o"])
            .arg(&library)
            .arg(&source)
            .status()
            .expect("cc runs");
        assert!(status.success(), "cc failed");
        library.display().to_string()
    }

    #[test]
    fn a_library_without_libnftables_functions_is_refused_naming_the_first() {
        let err = LibNft::load("libc.so.6").unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::MissingSymbol {
                    symbol: "nft_ctx_new",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("libc.so.6 lacks nft_ctx_new: "), "{err}");
    }

    #[test]
    fn a_null_symbol_is_an_error_not_a_call() {
        let dir = tempfile::tempdir().unwrap();
        let err = LibNft::load(&fake(&dir, "NULL_NEW")).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::NullSymbol {
                    symbol: "nft_ctx_new",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().ends_with("nft_ctx_new is a null symbol"), "{err}");
    }

    #[test]
    fn a_failing_buffer_call_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = LibNft::load(&fake(&dir, "BUFFER_FAILS")).unwrap_err();
        assert!(
            matches!(
                &err,
                LoadError::Call {
                    call: "nft_ctx_buffer_output",
                    ..
                }
            ),
            "{err}"
        );
        assert!(LibNft::load(&fake(&dir, "NOTHING_BROKEN")).is_ok());
    }
}
