fn main() -> std::process::ExitCode {
    intake_key_admin::main()
}
