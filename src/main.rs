//! The `breakwater` command: parse the command line, load the config, set up logging,
//! serve until a signal, drain. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// A resilience proxy: timeouts, retries, circuit breaking, rate and concurrency limits per route.
#[derive(Debug, Parser)]
#[command(name = "breakwater", version, about, propagate_version = true)]
struct Cli {
    /// Config file [default: $BREAKWATER_CONFIG, else config/breakwater.yaml]
    #[arg(short = 'c', long = "config", global = true, env = "BREAKWATER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format [default: text on a terminal, json otherwise]
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Worker threads [default: one per CPU]
    #[arg(long, global = true)]
    workers: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default)
    Run,
    /// Parse and validate the config; print OK or every error
    Validate,
    /// Print each route with its effective layer stack and settings
    Routes,
    /// Start a flaky upstream on loopback and the proxy in front of it, for a first look
    Demo {
        /// Do not send the demo's own background traffic
        #[arg(long)]
        no_traffic: bool,
    },
}

fn init_logging(format: Option<LogFormat>, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = match format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    // One worker needs no work stealing: a current-thread runtime is cheaper per request.
    let mut b = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(n) = workers.filter(|n| *n > 1) {
        b.worker_threads(n);
    }
    b.enable_all().build()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("config/breakwater.yaml"));
    match cli.command.unwrap_or(Command::Run) {
        Command::Validate => match breakwater::config::load(&path) {
            Ok(l) => {
                println!(
                    "OK: {} is valid ({} listeners, {} routes, {} upstreams)",
                    path.display(),
                    l.config.listeners.len(),
                    l.routes.len(),
                    l.config.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Routes => match breakwater::config::load(&path) {
            Ok(l) => {
                print!("{}", breakwater::proxy::route::describe(&l));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Run => {
            let loaded = match breakwater::config::load(&path) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            };
            init_logging(cli.log_format, "info");
            let rt = match runtime(cli.workers) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let result = rt.block_on(async move {
                let server = breakwater::Server::bind(loaded).await?;
                let shared = server.shared();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    if let Ok(mut hup) = signal(SignalKind::hangup()) {
                        while hup.recv().await.is_some() {
                            tracing::info!("SIGHUP received: reloading the config");
                            let _ = breakwater::reload(&shared).await;
                        }
                    }
                });
                server.run(shutdown_signal()).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "breakwater failed");
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Demo { no_traffic } => {
            // The demo's own traffic would flood an info-level access log; warnings
            // (breaker transitions) still show.
            init_logging(cli.log_format.or(Some(LogFormat::Text)), "warn");
            let rt = match runtime(cli.workers) {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(breakwater::demo::run(shutdown_signal(), !no_traffic)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
