//! Room tags (spec: "Room Tagging"): the per-room account data event `m.tag`
//! (`{"tags": {name: {order?}}}`), edited one tag at a time, so `/sync` delivers them like any
//! other room account data.

use lattice_core::limits::MAX_TAG_BYTES;
use lattice_storage::records::{AccountDataRecord, JsonObject};
use lattice_storage::{StorageError, keys};
use ruma::{RoomId, UserId};
use serde_json::{Map, Value};

use super::{AccountData, check_owner};
use crate::ServiceError;

const TAG_EVENT_TYPE: &str = "m.tag";
/// How often a tag edit is retried when another write to the user's tags of the room won.
const TAG_WRITE_RETRIES: usize = 16;

fn check_tag(tag: &str) -> Result<(), ServiceError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(ServiceError::InvalidParam(format!("tag names are 1 to {MAX_TAG_BYTES} bytes")));
    }
    Ok(())
}

/// A tag's `order`, when given, is a number from 0 to 1.
fn check_order(content: &JsonObject) -> Result<(), ServiceError> {
    match content.0.get("order") {
        None => Ok(()),
        Some(order) if order.as_f64().is_some_and(|o| (0.0..=1.0).contains(&o)) => Ok(()),
        Some(_) => Err(ServiceError::InvalidParam("order must be a number from 0 to 1".into())),
    }
}

/// The stored `m.tag` content and its raw bytes (the precondition of the next write).
struct StoredTags {
    content: Map<String, Value>,
    raw: Option<Vec<u8>>,
}

impl StoredTags {
    fn tags(&self) -> Map<String, Value> {
        self.content.get("tags").and_then(Value::as_object).cloned().unwrap_or_default()
    }
}

impl AccountData {
    /// `GET /user/{userId}/rooms/{roomId}/tags`.
    pub async fn room_tags(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: &RoomId,
    ) -> Result<Map<String, Value>, ServiceError> {
        check_owner(caller, target)?;
        Ok(self.stored_tags(target, room_id).await?.tags())
    }

    /// `PUT /user/{userId}/rooms/{roomId}/tags/{tag}`: adds or replaces one tag. Like other
    /// room account data it needs a membership in the room, which the composer checks first.
    pub(crate) async fn set_room_tag(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: &RoomId,
        tag: &str,
        content: JsonObject,
    ) -> Result<(), ServiceError> {
        check_owner(caller, target)?;
        check_tag(tag)?;
        check_order(&content)?;
        let value = serde_json::to_value(content).map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.edit_tags(target, room_id, |tags| tags.insert(tag.to_owned(), value.clone()).as_ref() != Some(&value))
            .await
    }

    /// `DELETE /user/{userId}/rooms/{roomId}/tags/{tag}`: removing a tag the room does not have
    /// succeeds and changes nothing.
    pub async fn delete_room_tag(
        &self,
        caller: &UserId,
        target: &UserId,
        room_id: &RoomId,
        tag: &str,
    ) -> Result<(), ServiceError> {
        check_owner(caller, target)?;
        check_tag(tag)?;
        self.edit_tags(target, room_id, |tags| tags.remove(tag).is_some()).await
    }

    async fn stored_tags(&self, user_id: &UserId, room_id: &RoomId) -> Result<StoredTags, ServiceError> {
        let key = keys::account_data(user_id.as_str(), Some(room_id.as_str()), TAG_EVENT_TYPE);
        Ok(match lattice_storage::get::<AccountDataRecord>(self.kv.as_ref(), &key).await? {
            Some(fetched) => StoredTags { content: fetched.value.0.0.into_iter().collect(), raw: Some(fetched.raw) },
            None => StoredTags { content: Map::new(), raw: None },
        })
    }

    /// Applies `edit` (which says whether it changed anything) to the stored tags and writes
    /// them back, only if nobody changed them in between; retried when somebody did.
    async fn edit_tags(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        edit: impl Fn(&mut Map<String, Value>) -> bool,
    ) -> Result<(), ServiceError> {
        for _ in 0..TAG_WRITE_RETRIES {
            let stored = self.stored_tags(user_id, room_id).await?;
            let mut tags = stored.tags();
            if !edit(&mut tags) {
                return Ok(());
            }
            let mut content = stored.content;
            content.insert("tags".into(), Value::Object(tags));
            let content = JsonObject(content.into_iter().collect());
            match self.write_account_data_if(user_id, Some(room_id), TAG_EVENT_TYPE, content, Some(stored.raw)).await {
                Err(ServiceError::Storage(StorageError::Conflict)) => continue,
                other => return other,
            }
        }
        Err(ServiceError::LimitExceeded("too many concurrent changes to these tags".into()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn orders_outside_zero_to_one_are_refused() {
        let content = |value: Value| serde_json::from_value::<JsonObject>(value).unwrap();
        assert!(check_order(&content(json!({}))).is_ok());
        assert!(check_order(&content(json!({ "order": 0 }))).is_ok());
        assert!(check_order(&content(json!({ "order": 0.25 }))).is_ok());
        assert!(check_order(&content(json!({ "order": 1.0 }))).is_ok());
        assert!(check_order(&content(json!({ "order": 1.5 }))).is_err());
        assert!(check_order(&content(json!({ "order": -0.1 }))).is_err());
        assert!(check_order(&content(json!({ "order": "0.5" }))).is_err());
        assert!(check_tag(&"t".repeat(MAX_TAG_BYTES)).is_ok());
        assert!(check_tag(&"t".repeat(MAX_TAG_BYTES + 1)).is_err());
    }
}
