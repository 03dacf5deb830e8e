// The loader allocates and frees many small values per record; glibc's malloc took over a
// third of its CPU time in a profile, mimalloc far less. (The server keeps the system
// allocator: with many worker threads mimalloc nearly tripled its resident memory.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Refused only if SQLite is already initialized, which nothing before this line does.
    intake_core::db::sqlite_connections_without_mutexes();
    keep_freed_memory_for_reuse();
    intake_loader::main()
}

/// mimalloc's option number for its purge delay (`mi_option_purge_delay` in mimalloc.h; the
/// Rust bindings leave it unnamed).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long memory a chunk freed stays mapped for the next chunk: a loader that is idle this
/// long gives it back to the system.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;
/// How much free memory glibc's malloc (libpq's results and buffers) keeps at the top of its
/// heaps instead of returning it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: std::ffi::c_int = 64 << 20;
/// Blocks below this size (libpq's buffers for a chunk's statements) come from the heap, not
/// from a mapping of their own that is unmapped when freed (glibc's limit on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: std::ffi::c_int = 32 << 20;

/// Each chunk frees the memory of the one before it: by default mimalloc returns it to the
/// system after a second and glibc (under libpq) as soon as its heap top holds 128 KiB, so the
/// next chunk faults fresh, zeroed pages in, and mimalloc asks for transparent huge pages, each
/// zeroed whole (2 MiB) when first touched. The kernel zeroing pages was 13–15% of the
/// loader's samples (`perf record`); with these settings the loader's CPU per record is about
/// 8% lower (docs/benchmarks.md). Settings given in the environment (`MIMALLOC_PURGE_DELAY`,
/// `MIMALLOC_ALLOW_THP`, `GLIBC_TUNABLES`) are left alone.
#[allow(unsafe_code)]
fn keep_freed_memory_for_reuse() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    if unset("MIMALLOC_PURGE_DELAY") {
        // SAFETY: sets one option value before any other thread exists (the binding notes
        // the setter is not thread safe); mimalloc reads it when it next schedules a purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    #[cfg(target_os = "linux")]
    if unset("MIMALLOC_ALLOW_THP") {
        // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of this process (what
        // mimalloc itself does for MIMALLOC_ALLOW_THP=0); a failure leaves huge pages on.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if unset("GLIBC_TUNABLES") {
        // SAFETY: mallopt only changes malloc's parameters; called before any other thread
        // exists. Its result (0 for a value it refuses) leaves the default, which still works.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}
