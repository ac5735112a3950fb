//! Registration tokens (spec: `m.login.registration_token`), made by operators.

use lattice_core::limits::MAX_REGISTRATION_TOKEN_BYTES;
use lattice_storage::records::RegistrationTokenRecord;
use lattice_storage::{Direction, KeyRange, Table, WriteBatch, keys};

use super::Accounts;
use crate::ServiceError;
use crate::secrets::random_alphanumeric;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationTokenInfo {
    pub token: String,
    pub uses_allowed: Option<u32>,
    pub completed: u32,
    pub expiry_ms: Option<u64>,
}

/// The spec's grammar for registration tokens: 1–64 characters of `[A-Za-z0-9._~-]`.
pub fn valid_registration_token_format(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_REGISTRATION_TOKEN_BYTES
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

const GENERATED_TOKEN_LENGTH: usize = 20;
const MAX_LISTED_TOKENS: usize = 1_000;

impl Accounts {
    /// Creates a token that allows `uses_allowed` registrations (unlimited if `None`) until
    /// `expiry_ms` (forever if `None`).
    pub async fn create_registration_token(
        &self,
        uses_allowed: Option<u32>,
        expiry_ms: Option<u64>,
    ) -> Result<RegistrationTokenInfo, ServiceError> {
        let token = random_alphanumeric(GENERATED_TOKEN_LENGTH);
        let record = RegistrationTokenRecord {
            token: token.clone(),
            uses_allowed,
            completed: 0,
            expiry_ms,
            created_ms: self.now_ms(),
        };
        let mut batch = WriteBatch::new();
        batch.expect(Table::RegistrationTokens, keys::registration_token(&token), None);
        lattice_storage::put(&mut batch, keys::registration_token(&token), &record);
        self.kv.write(batch).await?;
        Ok(info(record))
    }

    pub async fn registration_tokens(&self) -> Result<Vec<RegistrationTokenInfo>, ServiceError> {
        let rows =
            self.kv.scan(Table::RegistrationTokens, &KeyRange::all(), Direction::Forward, MAX_LISTED_TOKENS).await?;
        rows.into_iter()
            .map(|(_, raw)| {
                serde_json::from_slice::<RegistrationTokenRecord>(&raw)
                    .map(info)
                    .map_err(|e| ServiceError::Internal(e.to_string()))
            })
            .collect()
    }

    /// Deletes a token; returns whether it existed.
    pub async fn delete_registration_token(&self, token: &str) -> Result<bool, ServiceError> {
        let key = keys::registration_token(token);
        let existed = self.kv.get(Table::RegistrationTokens, &key).await?.is_some();
        let mut batch = WriteBatch::new();
        batch.delete(Table::RegistrationTokens, key);
        self.kv.write(batch).await?;
        Ok(existed)
    }

    /// `GET /register/m.login.registration_token/validity`.
    pub async fn registration_token_usable(&self, token: &str) -> Result<bool, ServiceError> {
        if !valid_registration_token_format(token) {
            return Ok(false);
        }
        let record =
            lattice_storage::get::<RegistrationTokenRecord>(self.kv.as_ref(), &keys::registration_token(token)).await?;
        Ok(record.is_some_and(|f| self.token_is_usable(&f.value)))
    }

    pub(crate) fn token_is_usable(&self, record: &RegistrationTokenRecord) -> bool {
        let uses_left = record.uses_allowed.is_none_or(|allowed| record.completed < allowed);
        let unexpired = record.expiry_ms.is_none_or(|expiry| self.now_ms() < expiry);
        uses_left && unexpired
    }
}

fn info(record: RegistrationTokenRecord) -> RegistrationTokenInfo {
    RegistrationTokenInfo {
        token: record.token,
        uses_allowed: record.uses_allowed,
        completed: record.completed,
        expiry_ms: record.expiry_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::valid_registration_token_format;

    #[test]
    fn token_grammar() {
        assert!(valid_registration_token_format("abc.DEF_123~-"));
        assert!(!valid_registration_token_format(""));
        assert!(!valid_registration_token_format("has space"));
        assert!(!valid_registration_token_format(&"a".repeat(65)));
    }
}
