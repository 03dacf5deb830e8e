fn main() -> std::process::ExitCode {
    intake_server::main()
}
