//! The public room directory across servers: a client's `/publicRooms?server=other` asks that
//! server's `/_matrix/federation/v1/publicRooms`, and this server answers the same for others
//! from the local directory (the same listing, limits and tokens local clients get).

use http::Method;
use lattice_federation::client::Auth;
use ruma::ServerName;
use serde_json::{Value, json};

use super::Federation;
use super::join::{MAX_SMALL_RESPONSE_BYTES, encode, parse};
use crate::ServiceError;
use crate::rooms::{PublicRoomsPage, PublicRoomsQuery};

impl Federation {
    /// Another server's public rooms, for a local client. Without a filter it asks with `GET`
    /// (which every server has); with one, with `POST`. An answer without a `chunk` list is
    /// `502 M_UNKNOWN`; a server that cannot be reached fails as other federation requests do.
    pub async fn remote_public_rooms(
        &self,
        server: &ServerName,
        query: &PublicRoomsQuery,
    ) -> Result<PublicRoomsPage, ServiceError> {
        let client = self.remote()?.keys.client().clone();
        let filtered = query.generic_search_term.is_some() || query.room_types.is_some();
        let bytes = if filtered {
            let mut filter = json!({});
            if let Some(term) = &query.generic_search_term {
                filter["generic_search_term"] = json!(term);
            }
            if let Some(types) = &query.room_types {
                filter["room_types"] = json!(types);
            }
            let mut body = json!({ "filter": filter });
            if let Some(limit) = query.limit {
                body["limit"] = json!(limit);
            }
            if let Some(since) = &query.since {
                body["since"] = json!(since);
            }
            let path = "/_matrix/federation/v1/publicRooms";
            client.request(server, Method::POST, path, Some(&body), Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await
        } else {
            let mut path = "/_matrix/federation/v1/publicRooms".to_owned();
            let mut separator = '?';
            if let Some(limit) = query.limit {
                path.push_str(&format!("{separator}limit={limit}"));
                separator = '&';
            }
            if let Some(since) = &query.since {
                path.push_str(&format!("{separator}since={}", encode(since)));
            }
            client.request(server, Method::GET, &path, None, Auth::Signed, MAX_SMALL_RESPONSE_BYTES).await
        };
        page_from(server, parse::<Value>(&bytes?)?)
    }
}

/// A remote server's page, checked for shape: `chunk` must be a list of objects; the tokens
/// and estimate are kept only when they have the right types.
fn page_from(server: &ServerName, answer: Value) -> Result<PublicRoomsPage, ServiceError> {
    let Some(chunk) = answer["chunk"].as_array() else {
        return Err(ServiceError::Remote(format!("{server} answered a room list without a chunk")));
    };
    let chunk: Vec<Value> = chunk.iter().filter(|room| room["room_id"].is_string()).cloned().collect();
    let token = |field: &str| answer[field].as_str().map(str::to_owned);
    let estimate = answer["total_room_count_estimate"].as_u64().map_or(chunk.len(), |n| n as usize);
    Ok(PublicRoomsPage {
        next_batch: token("next_batch"),
        prev_batch: token("prev_batch"),
        total_room_count_estimate: estimate,
        chunk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_page_keeps_only_rooms_and_well_typed_fields() {
        let server: &ServerName = "remote.test".try_into().expect("server name");
        let answer = json!({
            "chunk": [{ "room_id": "!a:remote.test", "num_joined_members": 3 }, { "name": "no ID" }, 7],
            "next_batch": "n1", "prev_batch": 5, "total_room_count_estimate": "many",
        });
        let page = page_from(server, answer).expect("a page");
        assert_eq!(page.chunk.len(), 1);
        assert_eq!((page.next_batch.as_deref(), page.prev_batch), (Some("n1"), None));
        assert_eq!(page.total_room_count_estimate, 1);
        assert!(page_from(server, json!({ "rooms": [] })).is_err());
    }
}
