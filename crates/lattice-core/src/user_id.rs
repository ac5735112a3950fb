//! Rules for the user IDs of new accounts.

use ruma::{OwnedUserId, ServerName, UserId};

use crate::limits::MAX_USER_ID_BYTES;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsernameError {
    #[error("username must not be empty")]
    Empty,
    #[error("username may only contain a-z, 0-9, '.', '_', '=', '-', '/' and '+'")]
    InvalidCharacters,
    #[error("user ID would be longer than {MAX_USER_ID_BYTES} bytes")]
    TooLong,
    #[error("user ID belongs to another server")]
    ForeignServer,
}

/// The user ID a registration for `username` creates on `server_name`.
///
/// Usernames are lower-cased first (people type `Alice` and mean `alice`); the result must match
/// the spec's grammar for new user IDs exactly, not the lenient historical one.
pub fn new_user_id(username: &str, server_name: &ServerName) -> Result<OwnedUserId, UsernameError> {
    let localpart = username.to_lowercase();
    if localpart.is_empty() {
        return Err(UsernameError::Empty);
    }
    if !localpart.bytes().all(is_localpart_byte) {
        return Err(UsernameError::InvalidCharacters);
    }
    let user_id = format!("@{localpart}:{server_name}");
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(UsernameError::TooLong);
    }
    UserId::parse(user_id).map_err(|_| UsernameError::InvalidCharacters)
}

/// Resolves what a user typed at login (`alice` or `@alice:server`) to a local user ID.
pub fn login_user_id(input: &str, server_name: &ServerName) -> Result<OwnedUserId, UsernameError> {
    let user_id = UserId::parse_with_server_name(input.to_lowercase(), server_name)
        .map_err(|_| UsernameError::InvalidCharacters)?;
    if user_id.server_name() != server_name {
        return Err(UsernameError::ForeignServer);
    }
    Ok(user_id)
}

fn is_localpart_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+')
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::OwnedServerName;

    fn server() -> OwnedServerName {
        "example.org".try_into().unwrap()
    }

    #[test]
    fn usernames_follow_the_new_user_id_grammar() {
        let cases: &[(&str, Result<&str, UsernameError>)] = &[
            ("alice", Ok("@alice:example.org")),
            ("Alice", Ok("@alice:example.org")),
            ("a.b_c=d-e/f+g", Ok("@a.b_c=d-e/f+g:example.org")),
            ("", Err(UsernameError::Empty)),
            ("al ice", Err(UsernameError::InvalidCharacters)),
            ("alice:evil", Err(UsernameError::InvalidCharacters)),
            ("@alice", Err(UsernameError::InvalidCharacters)),
            ("ali\0ce", Err(UsernameError::InvalidCharacters)),
            ("élise", Err(UsernameError::InvalidCharacters)),
        ];
        for (input, expected) in cases {
            let got = new_user_id(input, &server()).map(|id| id.to_string());
            assert_eq!(got, expected.clone().map(str::to_owned), "input {input:?}");
        }
    }

    #[test]
    fn user_ids_are_at_most_255_bytes() {
        let fits = "a".repeat(255 - "@:example.org".len());
        assert!(new_user_id(&fits, &server()).is_ok());
        assert_eq!(new_user_id(&format!("{fits}a"), &server()), Err(UsernameError::TooLong));
    }

    #[test]
    fn login_accepts_localparts_and_full_ids_of_this_server_only() {
        assert_eq!(login_user_id("Bob", &server()).unwrap().as_str(), "@bob:example.org");
        assert_eq!(login_user_id("@bob:example.org", &server()).unwrap().as_str(), "@bob:example.org");
        assert_eq!(login_user_id("@bob:other.org", &server()), Err(UsernameError::ForeignServer));
        // Login accepts historical localparts (they may exist), but never a second colon.
        assert!(login_user_id("bo:b", &server()).is_err());
    }
}
