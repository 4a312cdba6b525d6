use clap::Parser;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // The job's stage-1 helper must stay single-threaded (it unshares a user
    // namespace): dispatch it before any runtime or logging starts.
    if args.get(1).map(String::as_str) == Some(berth::sandbox::child::HIDDEN_SUBCOMMAND) {
        berth::sandbox::child::stage1_main(args.get(2).map(String::as_str).unwrap_or(""));
    }
    let cli = berth::cli::Cli::parse();
    berth::cli::enter_delegated_scope(&cli);
    // A pipeline's output is the user's: the embedded agent speaks up only
    // for warnings unless BERTH_LOG says otherwise.
    let default_log = match cli.command {
        berth::cli::Command::Run { .. } => "warn",
        _ => "info",
    };
    // One TLS provider for the whole process (server, and reqwest as client).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        berth::cli::LogFormat::Text => logs.init(),
        // Each line carries the fields of the spans it was logged in (the
        // connection's client, the job).
        berth::cli::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(berth::cli::run(cli)) {
        if !matches!(e, berth::cli::CliError::Exit(_)) {
            eprintln!("error: {e}");
        }
        std::process::exit(e.exit_code());
    }
}
