//! `jitd`: the just-in-time access daemon. Locks the management ports with nftables and
//! opens them on request from `jitctl`; see `jitd --help`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use jitd::cli::jitd::{Args, LogFormat};
use jitd::config::Config;
use jitd::firewall::rules::{self, LockdownSpec};
use jitd::firewall::{Firewall, FirewallError, SystemFirewall};

/// The hidden argument of the knock worker (`jitd::daemon`'s knock door passes it).
const KNOCK_WORKER: &str = jitd::knockd::ARGUMENT;

fn main() -> ExitCode {
    // glibc gives every thread that allocates its own arena and keeps freed memory in
    // it; with tokio's worker and blocking threads that multiplies the resident size at
    // 100,000 grants. Two arenas keep it close to what is live.
    // SAFETY: called before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
    // jitd starts itself again in this mode to read knocks without its privileges
    // (src/knockd): before arguments, logging or threads, and with nothing else to do.
    if std::env::args_os().nth(1).is_some_and(|a| a == KNOCK_WORKER) && std::env::args_os().len() == 2 {
        return jitd::knockd::run();
    }
    let args = Args::parse();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jitd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(args))
}

async fn async_main(args: Args) -> ExitCode {
    if args.unlock {
        // The way out: it needs no policy, so a broken or missing one must not stop it.
        if let Err(e) = Config::load(&args.config) {
            eprintln!("{e}");
            eprintln!("jitd: the policy was not read (see above); --unlock does not need it");
        }
        return exit_code(unlock().await);
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("jitd: invalid policy, nothing was changed");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = jitd::daemon::check_interfaces(&config).await {
        eprintln!("{e:#}");
        eprintln!("jitd: invalid policy, nothing was changed");
        return ExitCode::from(2);
    }
    for warning in config.warnings() {
        // --check-config speaks to a person at a terminal; the daemon to its log.
        if args.check_config {
            eprintln!("jitd: WARNING: {}: {warning}", config.path.display());
        } else {
            tracing::warn!("{}: {warning}", config.path.display());
        }
    }
    let result = if args.check_config {
        check_config(&config).await
    } else {
        jitd::daemon::run(config, SystemFirewall::detect(), shutdown_signal())
            .await
            .context("jitd failed to start; the ports are as they were")
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `jitd --check-config | head -1`: the reader has what it wanted (as jitctl does).
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn check_config(config: &Config) -> anyhow::Result<()> {
    use std::io::Write;
    let batch = rules::replace_table(&LockdownSpec::from_config(config), &[]);
    let checked = SystemFirewall::detect().check(&batch).await;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# {}: valid. jitd would apply this nftables batch (nft -j -f -):",
        config.path.display()
    )?;
    writeln!(out, "{}", serde_json::to_string_pretty(&batch)?)?;
    match checked {
        Ok(()) => writeln!(out, "# the kernel accepts it (nft --check); nothing was changed")?,
        Err(e @ (FirewallError::Rejected(_) | FirewallError::Missing(_))) => {
            out.flush()?;
            return Err(anyhow::Error::new(e).context(
                "the kernel rejects this batch (nft --check): jitd could not lock the ports with this policy",
            ));
        }
        Err(e) => {
            out.flush()?;
            return Err(anyhow::Error::new(e).context("cannot check this batch against the kernel (nft --check)"));
        }
    }
    out.flush()?;
    Ok(())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn unlock() -> anyhow::Result<()> {
    SystemFirewall::detect()
        .apply(&rules::remove_table())
        .await
        .context("removing the lockdown")?;
    tracing::info!(
        "lockdown removed: table inet {} is gone, the protected ports are open",
        rules::TABLE
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("JITD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Under systemd the journal adds its own timestamps.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Human, true) => builder.without_time().with_ansi(false).init(),
        (LogFormat::Human, false) => builder.init(),
    }
}
