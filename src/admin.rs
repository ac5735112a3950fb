//! Operator commands that work on the data directory directly (the server must be stopped:
//! RocksDB allows one process at a time).

use std::io::BufRead;
use std::time::Duration;

use anyhow::{Context, bail};
use lattice_service::{Clock, NewAccount, SystemClock};

use crate::{Config, open};

/// Where a new password comes from.
pub enum PasswordSource {
    /// The first line of standard input.
    Stdin,
    /// A random one, printed for the operator.
    Generate,
}

fn read_password(source: &PasswordSource) -> anyhow::Result<(String, bool)> {
    match source {
        PasswordSource::Stdin => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
            let password = line.trim_end_matches(['\n', '\r']).to_owned();
            if password.is_empty() {
                bail!("the password read from standard input is empty");
            }
            Ok((password, false))
        }
        PasswordSource::Generate => {
            use rand::distr::{Alphanumeric, SampleString};
            Ok((Alphanumeric.sample_string(&mut rand::rng(), 24), true))
        }
    }
}

pub async fn create_user(config: &Config, name: &str, admin: bool, source: PasswordSource) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let (password, generated) = read_password(&source)?;
    let user_id = opened
        .service
        .accounts()
        .create_user(NewAccount { username: name.to_owned(), password: password.clone(), admin })
        .await?;
    opened.service.flush().await?;
    println!("created {user_id}{}", if admin { " (server admin)" } else { "" });
    if generated {
        println!("password: {password}");
    }
    Ok(())
}

pub async fn reset_password(config: &Config, name: &str, source: PasswordSource) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let (password, generated) = read_password(&source)?;
    let user_id = opened.service.reset_password(name, password.clone()).await?;
    opened.service.flush().await?;
    println!("new password set for {user_id}; all its devices were logged out");
    if generated {
        println!("password: {password}");
    }
    Ok(())
}

pub async fn create_registration_token(
    config: &Config,
    uses: Option<u32>,
    expires: Option<Duration>,
) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let expiry = expires.map(|d| SystemClock.now_ms().saturating_add(d.as_millis() as u64));
    let info = opened.service.accounts().create_registration_token(uses, expiry).await?;
    opened.service.flush().await?;
    println!("{}", info.token);
    Ok(())
}

pub async fn list_registration_tokens(config: &Config) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let now = SystemClock.now_ms();
    println!("{:<24} {:>9} {:>7}  expires", "token", "used", "allowed");
    for token in opened.service.accounts().registration_tokens().await? {
        let allowed = token.uses_allowed.map(|n| n.to_string()).unwrap_or_else(|| "∞".into());
        let expires = match token.expiry_ms {
            None => "never".to_owned(),
            Some(ms) if ms <= now => "expired".to_owned(),
            Some(ms) => format!("in {}", humantime::format_duration(Duration::from_secs((ms - now) / 1000))),
        };
        println!("{:<24} {:>9} {:>7}  {expires}", token.token, token.completed, allowed);
    }
    Ok(())
}

pub async fn delete_registration_token(config: &Config, token: &str) -> anyhow::Result<()> {
    let opened = open(config).await?;
    if !opened.service.accounts().delete_registration_token(token).await? {
        bail!("no registration token {token}");
    }
    opened.service.flush().await?;
    println!("deleted {token}");
    Ok(())
}

/// Rotates the signing key (the server must be stopped: opening the database makes sure).
pub async fn rotate_signing_key(config: &Config) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let (new_id, old_id) =
        crate::signing_key::rotate(&config.signing_key_path(), &config.old_signing_keys_path(), SystemClock.now_ms())?;
    drop(opened);
    println!("new signing key {new_id}; {old_id} is now listed in old_verify_keys");
    Ok(())
}

/// Prints the current signing key and the old ones.
pub async fn show_signing_keys(config: &Config) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let public =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD_NO_PAD, opened.signing_key.public_key());
    println!("current ed25519:{} {public}", opened.signing_key.version());
    for old in crate::signing_key::load_old_keys(&config.old_signing_keys_path())? {
        let expired = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(old.expired_ts));
        println!("old     {} {} expired {expired}", old.key_id, old.public_key);
    }
    Ok(())
}

/// `lattice media delete mxc://server/id`.
pub async fn delete_media(config: &Config, uri: &str) -> anyhow::Result<()> {
    let (server, media_id) = parse_mxc(uri)?;
    let opened = open(config).await?;
    let deleted = opened.service.media().delete(&server, &media_id).await?;
    opened.service.flush().await?;
    if !deleted {
        bail!("no media {uri} is stored here");
    }
    println!("deleted {uri}");
    Ok(())
}

/// `lattice media purge-remote --older-than DAYS`.
pub async fn purge_remote_media(config: &Config, older_than_days: u64) -> anyhow::Result<()> {
    let opened = open(config).await?;
    let now = SystemClock.now_ms();
    let before = now.saturating_sub(older_than_days.saturating_mul(24 * 3600 * 1000));
    let purged = opened.service.media().purge_remote(before).await?;
    opened.service.flush().await?;
    println!("purged {purged} cached remote media older than {older_than_days} days");
    Ok(())
}

fn parse_mxc(uri: &str) -> anyhow::Result<(ruma::OwnedServerName, String)> {
    let rest = uri.strip_prefix("mxc://").with_context(|| format!("{uri:?} is not an mxc:// URI"))?;
    let (server, media_id) = rest.split_once('/').with_context(|| format!("{uri:?} has no media ID"))?;
    let server =
        ruma::OwnedServerName::try_from(server).map_err(|_| anyhow::anyhow!("{server:?} is not a server name"))?;
    if !lattice_service::media::serving::valid_media_id(media_id) {
        bail!("{media_id:?} is not a media ID");
    }
    Ok((server, media_id.to_owned()))
}

/// Prints the newest `limit` reports, newest first, one line each.
pub async fn list_reports(config: &Config, limit: usize) -> anyhow::Result<()> {
    let opened = open(config).await?;
    for report in opened.service.reports().list(limit).await? {
        println!("{}", report_line(&report));
    }
    Ok(())
}

/// `#id time reporter target [score] reason`; the reason is quoted and escaped, so a reporter
/// cannot forge lines or terminal control sequences.
fn report_line(report: &lattice_service::Report) -> String {
    let time = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(report.received_ms));
    let target = match (&report.event_id, &report.room_id, &report.user_id) {
        (Some(event), Some(room), _) => format!("event {event} in {room}"),
        (_, Some(room), _) => format!("room {room}"),
        (_, _, Some(user)) => format!("user {user}"),
        _ => "nothing".to_owned(),
    };
    let score = report.score.map(|s| format!(" score {s}")).unwrap_or_default();
    let reason = report.reason.as_deref().unwrap_or("");
    format!("#{} {time} {} {target}{score} reason {reason:?}", report.id, report.reporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_one_line_with_its_reason_escaped() {
        let report = lattice_service::Report {
            id: 7,
            received_ms: 1_700_000_000_000,
            reporter: "@alice:hs".into(),
            room_id: Some("!r:hs".into()),
            event_id: Some("$e".into()),
            user_id: None,
            reason: Some("spam\n#8 forged".into()),
            score: Some(-100),
        };
        assert_eq!(
            report_line(&report),
            r#"#7 2023-11-14T22:13:20Z @alice:hs event $e in !r:hs score -100 reason "spam\n#8 forged""#
        );
    }
}
