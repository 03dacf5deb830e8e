// The loader allocates and frees many small values per record; glibc's malloc took over a
// third of its CPU time in a profile, mimalloc far less. (The server keeps the system
// allocator: with many worker threads mimalloc nearly tripled its resident memory.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    intake_loader::main()
}
