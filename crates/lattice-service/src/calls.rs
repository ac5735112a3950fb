//! Voice and video calls: TURN credentials for `GET /voip/turnServer` (spec v1.16, "Voice over
//! IP"). With a shared secret the credentials are the time-limited ones of the "TURN REST API"
//! that coturn's `use-auth-secret` checks: the username is `expiry:user_id` (expiry in Unix
//! seconds), the password `base64(HMAC-SHA1(secret, username))`, so the TURN server verifies
//! them with no call to Lattice and refuses them once expired. Static credentials are handed out
//! as configured.

use base64::Engine;
use hmac::{Hmac, Mac};
use ruma::UserId;

/// How a TURN server is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnConfig {
    /// `turn:` / `turns:` URIs handed to clients.
    pub uris: Vec<String>,
    pub credentials: TurnCredentials,
    /// Lifetime of shared-secret credentials, and the `ttl` clients are told.
    pub ttl_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnCredentials {
    /// coturn's `static-auth-secret`.
    SharedSecret(String),
    Static {
        username: String,
        password: String,
    },
}

/// What `GET /voip/turnServer` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnServer {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    pub ttl_secs: u64,
}

/// The TURN REST password of `username` under `secret`.
fn turn_rest_password(secret: &str, username: &str) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl TurnConfig {
    /// Credentials for `user_id` at `now_ms`.
    pub fn credentials_for(&self, user_id: &UserId, now_ms: u64) -> TurnServer {
        let (username, password) = match &self.credentials {
            TurnCredentials::SharedSecret(secret) => {
                let expiry = (now_ms / 1000).saturating_add(self.ttl_secs);
                let username = format!("{expiry}:{user_id}");
                let password = turn_rest_password(secret, &username);
                (username, password)
            }
            TurnCredentials::Static { username, password } => (username.clone(), password.clone()),
        };
        TurnServer { username, password, uris: self.uris.clone(), ttl_secs: self.ttl_secs }
    }
}

impl crate::Service {
    /// `GET /voip/turnServer`: `None` when no TURN server is configured.
    pub fn turn_server(&self, user_id: &UserId) -> Option<TurnServer> {
        let turn = self.config.turn.as_ref()?;
        Some(turn.credentials_for(user_id, self.clock.now_ms()))
    }
}

#[cfg(test)]
mod tests {
    use ruma::user_id;

    use super::*;

    fn shared(secret: &str) -> TurnConfig {
        TurnConfig {
            uris: vec!["turn:turn.hs.test:3478?transport=udp".into()],
            credentials: TurnCredentials::SharedSecret(secret.into()),
            ttl_secs: 86_400,
        }
    }

    #[test]
    fn shared_secret_credentials_are_coturns_turn_rest_ones() {
        // Expected password computed independently: Python's hmac over SHA-1, base64.
        let turn = shared("north-wind");
        let server = turn.credentials_for(user_id!("@alice:hs.test"), 1_700_000_000_000);
        assert_eq!(server.username, "1700086400:@alice:hs.test");
        assert_eq!(server.password, "E/YucjC7vHnktrfgJixqC7Z+CpI=");
        assert_eq!(server.ttl_secs, 86_400);
        assert_eq!(server.uris, ["turn:turn.hs.test:3478?transport=udp"]);
    }

    #[test]
    fn another_secret_or_user_gives_another_password() {
        let now = 1_700_000_000_000;
        let alice = shared("north-wind").credentials_for(user_id!("@alice:hs.test"), now);
        assert_ne!(alice.password, shared("south-wind").credentials_for(user_id!("@alice:hs.test"), now).password);
        assert_ne!(alice.password, shared("north-wind").credentials_for(user_id!("@bob:hs.test"), now).password);
    }

    #[test]
    fn static_credentials_are_handed_out_as_configured() {
        let turn = TurnConfig {
            uris: vec!["turns:turn.hs.test:443?transport=tcp".into()],
            credentials: TurnCredentials::Static { username: "calls".into(), password: "secret".into() },
            ttl_secs: 3_600,
        };
        let server = turn.credentials_for(user_id!("@alice:hs.test"), 0);
        assert_eq!((server.username.as_str(), server.password.as_str()), ("calls", "secret"));
    }
}
