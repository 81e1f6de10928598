use customer_mapping::{
    config::{Cli, Command},
    import,
    startup::{self, Application},
    telemetry,
};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A refused setting ends the process here (one line, status 2), before
    // anything binds or connects.
    let cli = Cli::load();
    // Only the server is traced: a migration or an import has no caller
    // whose trace it could join.
    let serving = matches!(cli.command, None | Some(Command::Serve));
    let otlp_endpoint = cli.settings.otlp_endpoint.as_ref().filter(|_| serving);
    let _flush_telemetry_on_exit = match telemetry::init(cli.settings.log_format, otlp_endpoint) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("cannot start the log writer or the trace exporter: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.settings).await,
        Command::Migrate(args) => startup::migrate(&cli.settings.database, &args).await,
        Command::Import(args) => {
            tracing::info!(
                database = %cli.settings.database.redacted_url(),
                "importing into this database"
            );
            // Its exit status says more than success or failure (see --help).
            return import::run(&cli.settings, &args).await;
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "exiting");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(settings: &customer_mapping::config::Settings) -> anyhow::Result<()> {
    // Listening before the server answers anything: see `shutdown_signal`.
    let shutdown = customer_mapping::shutdown::shutdown_signal();
    let app = Application::build(settings).await?;
    tracing::info!(
        addr = %app.local_addr(),
        transport = app.transport_security(),
        policy = if app.enforces_policy() { "enforced" } else { "off: every caller may call every RPC" },
        health = %app.health_addr().map_or_else(|| "main port only".to_owned(), |a| a.to_string()),
        reflection = settings.access.reflection,
        metrics = %app.metrics_addr().map_or_else(|| "off".to_owned(), |a| a.to_string()),
        traces = %settings.otlp_endpoint.as_ref().map_or_else(|| "off".to_owned(), |url| format!("OTLP/gRPC to {}", url.origin().ascii_serialization())),
        database = %settings.database.redacted_url(),
        "serving customermapping.v1.CustomerMapping"
    );
    app.run_until(shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}
