fn main() -> std::process::ExitCode {
    // Refused only if SQLite is already initialized, which nothing before this line does.
    intake_core::db::sqlite_connections_without_mutexes();
    intake_server::main()
}
