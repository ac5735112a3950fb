//! User-interactive authentication (spec: client-server API, "User-interactive authentication
//! API"): multi-request flows whose progress lives in a stored session.

use lattice_core::limits::UIA_SESSION_LIFETIME_MS;
use lattice_core::user_id::login_user_id;
use lattice_storage::records::UiaSessionRecord;
use lattice_storage::{Fetched, WriteBatch, keys};
use ruma::UserId;
use ruma::api::client::uiaa::{AuthData, UserIdentifier};
use serde_json::json;

use super::Accounts;
use crate::ServiceError;
use crate::secrets::random_alphanumeric;

pub const STAGE_PASSWORD: &str = "m.login.password";
pub const STAGE_DUMMY: &str = "m.login.dummy";
pub const STAGE_REGISTRATION_TOKEN: &str = "m.login.registration_token";

/// What the client must do next: the body of the spec's 401 response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UiaChallenge {
    pub flows: Vec<Vec<String>>,
    pub session: String,
    pub completed: Vec<String>,
    /// Why the last attempt failed, as `(errcode, message)`.
    pub error: Option<(&'static str, String)>,
}

impl UiaChallenge {
    pub fn to_json(&self) -> serde_json::Value {
        let flows: Vec<_> = self.flows.iter().map(|stages| json!({ "stages": stages })).collect();
        let mut body = json!({
            "flows": flows,
            "params": {},
            "session": self.session,
            "completed": self.completed,
        });
        if let Some((errcode, message)) = &self.error {
            body["errcode"] = json!(errcode);
            body["error"] = json!(message);
        }
        body
    }
}

/// Which endpoint a UIA session authorises; a session is never reusable for another.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Purpose {
    Register,
    DeleteDevices,
    ChangePassword,
    Deactivate,
    CrossSigning,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::DeleteDevices => "delete_devices",
            Purpose::ChangePassword => "change_password",
            Purpose::Deactivate => "deactivate",
            Purpose::CrossSigning => "cross_signing",
        }
    }
}

/// A finished UIA session.
pub(crate) struct Completed {
    pub registration_token: Option<String>,
}

struct Attempt<'a> {
    purpose: Purpose,
    user: Option<&'a UserId>,
    flows: &'a [&'a [&'a str]],
}

impl Accounts {
    /// Runs one round of UIA for `purpose`. Succeeds once one of `flows` is complete; until then
    /// answers [`ServiceError::AuthRequired`] with what is still missing.
    pub(crate) async fn user_interactive_auth(
        &self,
        purpose: Purpose,
        user: Option<&UserId>,
        flows: &[&[&str]],
        auth: Option<&AuthData>,
    ) -> Result<Completed, ServiceError> {
        let attempt = Attempt { purpose, user, flows };
        let Some(auth) = auth else {
            let (session_id, _) = self.start_uia_session(&attempt).await?;
            return Err(self.challenge(&attempt, session_id, Vec::new(), None));
        };
        let (session_id, mut session) = match auth.session() {
            Some(id) => match self.load_uia_session(&attempt, id).await? {
                Some(fetched) => (id.to_owned(), fetched.value),
                None => {
                    let (id, _) = self.start_uia_session(&attempt).await?;
                    let error = Some(("M_FORBIDDEN", "unknown or expired UIA session".to_owned()));
                    return Err(self.challenge(&attempt, id, Vec::new(), error));
                }
            },
            // Clients may finish a one-stage flow without first asking for a session.
            None => self.start_uia_session(&attempt).await?,
        };

        let Some(stage) = auth.auth_type().map(|t| t.as_str().to_owned()) else {
            // Only a session, no stage: the client asks where it stands.
            return Err(self.challenge(&attempt, session_id, session.completed_stages, None));
        };
        if !flows.iter().any(|flow| flow.contains(&stage.as_str())) {
            let error = Some(("M_UNRECOGNIZED", format!("stage {stage:?} is not offered here")));
            return Err(self.challenge(&attempt, session_id, session.completed_stages, error));
        }
        if let Err(message) = self.check_stage(&attempt, auth, &mut session).await? {
            return Err(self.challenge(&attempt, session_id, session.completed_stages, Some(("M_FORBIDDEN", message))));
        }
        if !session.completed_stages.contains(&stage) {
            session.completed_stages.push(stage);
        }

        let mut batch = WriteBatch::new();
        let done = flows.iter().any(|flow| flow.iter().all(|s| session.completed_stages.iter().any(|c| c == s)));
        if done {
            batch.delete(lattice_storage::Table::UiaSessions, keys::uia_session(&session_id));
            self.kv.write(batch).await?;
            return Ok(Completed { registration_token: session.registration_token });
        }
        lattice_storage::put(&mut batch, keys::uia_session(&session_id), &session);
        self.kv.write(batch).await?;
        Err(self.challenge(&attempt, session_id, session.completed_stages, None))
    }

    /// Checks one stage; `Ok(Err(message))` is a failed attempt the client may retry.
    async fn check_stage(
        &self,
        attempt: &Attempt<'_>,
        auth: &AuthData,
        session: &mut UiaSessionRecord,
    ) -> Result<Result<(), String>, ServiceError> {
        match auth {
            AuthData::Dummy(_) => Ok(Ok(())),
            AuthData::RegistrationToken(stage) => {
                if self.registration_token_usable(&stage.token).await? {
                    session.registration_token = Some(stage.token.clone());
                    Ok(Ok(()))
                } else {
                    Ok(Err("invalid or expired registration token".to_owned()))
                }
            }
            AuthData::Password(stage) => {
                let Some(user) = attempt.user else {
                    return Ok(Err("password authentication needs a logged-in user".to_owned()));
                };
                let UserIdentifier::Matrix(identifier) = &stage.identifier else {
                    return Ok(Err("only m.id.user identifiers are supported".to_owned()));
                };
                match login_user_id(&identifier.user, self.server_name()) {
                    Ok(claimed) if claimed == user => {}
                    _ => return Ok(Err("the identifier does not match the logged-in user".to_owned())),
                }
                if self.password_matches(user, &stage.password).await? {
                    Ok(Ok(()))
                } else {
                    Ok(Err("invalid password".to_owned()))
                }
            }
            _ => Ok(Err("unsupported authentication stage".to_owned())),
        }
    }

    async fn start_uia_session(&self, attempt: &Attempt<'_>) -> Result<(String, UiaSessionRecord), ServiceError> {
        let id = random_alphanumeric(24);
        let record = UiaSessionRecord {
            purpose: attempt.purpose.as_str().to_owned(),
            user_id: attempt.user.map(|u| u.to_string()),
            completed_stages: Vec::new(),
            registration_token: None,
            created_ms: self.now_ms(),
        };
        let mut batch = WriteBatch::new();
        lattice_storage::put(&mut batch, keys::uia_session(&id), &record);
        self.kv.write(batch).await?;
        Ok((id, record))
    }

    async fn load_uia_session(
        &self,
        attempt: &Attempt<'_>,
        id: &str,
    ) -> Result<Option<Fetched<UiaSessionRecord>>, ServiceError> {
        let Some(fetched) = lattice_storage::get::<UiaSessionRecord>(self.kv.as_ref(), &keys::uia_session(id)).await?
        else {
            return Ok(None);
        };
        let session = &fetched.value;
        let expired = self.now_ms().saturating_sub(session.created_ms) > UIA_SESSION_LIFETIME_MS;
        let same_purpose = session.purpose == attempt.purpose.as_str();
        let same_user = session.user_id.as_deref() == attempt.user.map(|u| u.as_str());
        Ok((!expired && same_purpose && same_user).then_some(fetched))
    }

    fn challenge(
        &self,
        attempt: &Attempt<'_>,
        session: String,
        completed: Vec<String>,
        error: Option<(&'static str, String)>,
    ) -> ServiceError {
        let flows = attempt.flows.iter().map(|f| f.iter().map(|s| (*s).to_owned()).collect()).collect();
        ServiceError::AuthRequired(Box::new(UiaChallenge { flows, session, completed, error }))
    }
}

impl Accounts {
    /// Deletes UIA sessions older than their lifetime; returns how many. Abandoned sessions
    /// would otherwise pile up, since any client can start one.
    pub async fn sweep_expired_uia_sessions(&self) -> Result<usize, ServiceError> {
        let rows = self
            .kv
            .scan(
                lattice_storage::Table::UiaSessions,
                &lattice_storage::KeyRange::all(),
                lattice_storage::Direction::Forward,
                lattice_storage::MAX_SCAN_ROWS,
            )
            .await?;
        let now = self.now_ms();
        let mut batch = WriteBatch::new();
        for (key, raw) in rows {
            let expired = serde_json::from_slice::<UiaSessionRecord>(&raw)
                .map(|s| now.saturating_sub(s.created_ms) > UIA_SESSION_LIFETIME_MS)
                .unwrap_or(true);
            if expired {
                batch.delete(lattice_storage::Table::UiaSessions, key);
            }
        }
        let swept = batch.ops.len();
        if swept > 0 {
            self.kv.write(batch).await?;
        }
        Ok(swept)
    }
}
