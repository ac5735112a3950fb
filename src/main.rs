//! `lattice`: the Matrix homeserver binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lattice::admin::{self, PasswordSource};
use lattice::config::{self, Config};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "lattice", version, about = "Lattice, a Matrix homeserver")]
struct Cli {
    /// TOML configuration file; without one, the embedded defaults and LATTICE_* variables apply.
    #[arg(long, short, global = true, env = "LATTICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Show or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage accounts (with the server stopped).
    #[command(subcommand)]
    User(UserCommand),
    /// Manage registration tokens (with the server stopped).
    #[command(subcommand, name = "registration-token")]
    RegistrationToken(TokenCommand),
    /// Read what users reported (with the server stopped).
    #[command(subcommand)]
    Report(ReportCommand),
    /// The server's signing key (with the server stopped).
    #[command(subcommand)]
    Key(KeyCommand),
    /// TLS certificates for test networks.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Delete media and purge other servers' cached media (with the server stopped).
    #[command(subcommand)]
    Media(MediaCommand),
}

#[derive(Subcommand)]
enum MediaCommand {
    /// Delete one piece of media (this server's, or another's cached copy) and its thumbnails.
    Delete {
        /// `mxc://server/mediaId`
        uri: String,
    },
    /// Delete other servers' media cached more than DAYS days ago (it is fetched again when
    /// asked for).
    PurgeRemote {
        #[arg(long)]
        older_than: u64,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print the current key and the old ones other servers still see.
    Show,
    /// Make a new current key; the old one stays published in `old_verify_keys`, with the
    /// time it stopped being used, so events it signed stay verifiable.
    Rotate,
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write a self-signed certificate (cert.pem) and its key (key.pem) for HOST into DIR.
    SelfSigned {
        /// The server's host name or IP address (a port, if given, is ignored).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a fully commented configuration with every default.
    Example,
    /// Check a configuration file (and LATTICE_* variables) without starting.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account; prints a generated password unless --password-stdin is given.
    Create {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a new password and log out all the account's devices.
    ResetPassword {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it.
    Create {
        /// How many registrations it allows (default: unlimited).
        #[arg(long)]
        uses: Option<u32>,
        /// How long it stays valid, e.g. `7d`, `12h` (default: forever).
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List tokens with their use counts.
    List,
    /// Delete a token.
    Delete { token: String },
}

#[derive(Subcommand)]
enum ReportCommand {
    /// List reports of events, rooms and users, newest first, one per line.
    List {
        /// How many to show.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

fn password_source(stdin: bool) -> PasswordSource {
    if stdin { PasswordSource::Stdin } else { PasswordSource::Generate }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Config::load(path.map(PathBuf::as_path), std::env::vars())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(ConfigCommand::Example) => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = load(Some(&file))?;
            println!(
                "{} is valid (server_name {}, listening on {})",
                file.display(),
                config.server_name,
                config.listen.address
            );
            Ok(())
        }
        Command::Serve => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config.logging);
            let running = lattice::start(config).await?;
            if let Some(token) = &running.first_registration_token {
                println!("First start: registration token (shown only now): {token}");
                println!("Create more with `lattice registration-token create`.");
            }
            // The bound address, for `listen.address` with port 0 (tests, supervisors).
            println!("Serving the client API on http://{}", running.address);
            if let Some(address) = running.federation_address {
                println!("Serving federation on https://{address}");
            }
            running.run_until(lattice::shutdown_signal()).await
        }
        Command::User(command) => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config::LoggingConfig { level: "warn".into(), ..config.logging.clone() });
            match command {
                UserCommand::Create { name, admin, password_stdin } => {
                    admin::create_user(&config, &name, admin, password_source(password_stdin)).await
                }
                UserCommand::ResetPassword { name, password_stdin } => {
                    admin::reset_password(&config, &name, password_source(password_stdin)).await
                }
            }
        }
        Command::RegistrationToken(command) => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config::LoggingConfig { level: "warn".into(), ..config.logging.clone() });
            match command {
                TokenCommand::Create { uses, expires } => {
                    admin::create_registration_token(&config, uses, expires).await
                }
                TokenCommand::List => admin::list_registration_tokens(&config).await,
                TokenCommand::Delete { token } => admin::delete_registration_token(&config, &token).await,
            }
        }
        Command::Key(command) => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config::LoggingConfig { level: "warn".into(), ..config.logging.clone() });
            match command {
                KeyCommand::Show => admin::show_signing_keys(&config).await,
                KeyCommand::Rotate => admin::rotate_signing_key(&config).await,
            }
        }
        Command::Tls(TlsCommand::SelfSigned { name, out }) => {
            let (cert, key) = lattice::tls::write_self_signed(&name, &out)?;
            println!("certificate: {}", cert.display());
            println!("private key: {}", key.display());
            println!("Peers trust it with `federation.trusted_ca = \"{}\"`.", cert.display());
            Ok(())
        }
        Command::Media(command) => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config::LoggingConfig { level: "warn".into(), ..config.logging.clone() });
            match command {
                MediaCommand::Delete { uri } => admin::delete_media(&config, &uri).await,
                MediaCommand::PurgeRemote { older_than } => admin::purge_remote_media(&config, older_than).await,
            }
        }
        Command::Report(ReportCommand::List { limit }) => {
            let config = load(cli.config.as_ref())?;
            lattice::logging::init(&config::LoggingConfig { level: "warn".into(), ..config.logging.clone() });
            admin::list_reports(&config, limit).await
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
