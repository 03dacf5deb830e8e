fn main() -> std::process::ExitCode {
    intake_loader::main()
}
