//! URL previews (`GET /_matrix/client/v1/media/preview_url`): the page is fetched through a
//! [`WebFetcher`] under the preview address policy (every resolved address checked, redirects
//! followed here and checked, the body bounded, the whole preview bounded in time), its Open
//! Graph tags read with html5ever's tokenizer (with `<title>` and the meta description as
//! fallbacks), and its `og:image` fetched the same way and stored as local media, so clients
//! get an `mxc://` URI rather than a URL that would reveal them to the image's host.
//!
//! Previews are cached per URL in `media_previews` (one row: the fetch time and the answer)
//! for `cache_ttl`; expired rows are replaced on the next request and swept hourly.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use html5ever::tendril::StrTendril;
use html5ever::tokenizer::states::RawKind;
use html5ever::tokenizer::{
    BufferQueue, CharacterTokens, EndTag, StartTag, TagToken, Token, TokenSink, TokenSinkResult, Tokenizer,
    TokenizerOpts,
};
use lattice_federation::address_policy::AddressPolicy;
use lattice_federation::web_fetch::{self, parse_web_url};
use lattice_federation::{FederationError, TlsSettings, WebFetcher, WebLimits};
use lattice_storage::{KeyRange, Table, WriteBatch};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Media, UploadTarget, decode, encode};
use crate::ServiceError;

/// URL previews are on when this is set (`[media.url_preview]`).
#[derive(Clone, Debug)]
pub struct UrlPreviewConfig {
    /// The largest page or image read; past it the fetch stops (`502`).
    pub max_page_bytes: usize,
    /// The whole preview, redirects and the image included.
    pub timeout: Duration,
    /// How long a preview is served from the cache.
    pub cache_ttl_ms: u64,
    /// Which addresses pages may be fetched from.
    pub policy: Arc<AddressPolicy>,
}

/// The longest URL previewed (it is the cache key).
pub const MAX_URL_BYTES: usize = 4096;
/// At most this many `og:` properties are kept from a page.
const MAX_PROPERTIES: usize = 64;
/// Longer property values are cut (at a character boundary).
const MAX_VALUE_CHARS: usize = 2000;
/// How many redirects a page (or its image) may take.
const MAX_REDIRECTS: usize = 5;
const ACCEPT_PAGE: &str = "text/html,application/xhtml+xml;q=0.9,image/*;q=0.8,*/*;q=0.1";
const ACCEPT_IMAGE: &str = "image/*";

#[derive(Serialize, Deserialize)]
struct CachedPreview {
    fetched_ms: u64,
    preview: Map<String, Value>,
}

impl Media {
    pub fn url_previews_enabled(&self) -> bool {
        self.config.url_preview.is_some()
    }

    fn preview_config(&self) -> Result<&UrlPreviewConfig, ServiceError> {
        self.config
            .url_preview
            .as_ref()
            .ok_or_else(|| ServiceError::Forbidden("URL previews are disabled on this server".into()))
    }

    async fn preview_fetcher(&self, config: &UrlPreviewConfig) -> Result<&WebFetcher, ServiceError> {
        self.preview_fetcher
            .get_or_try_init(|| async {
                let limits = WebLimits {
                    connect_timeout: Duration::from_secs(5).min(config.timeout),
                    request_timeout: config.timeout,
                    max_redirects: MAX_REDIRECTS,
                    https_only: false,
                };
                let tls = TlsSettings { verify_peer_tls: true, trusted_ca_pem: None };
                WebFetcher::new(config.policy.clone(), limits, &tls).map_err(ServiceError::Federation)
            })
            .await
    }

    /// The preview of `url`: from the cache when fresh, else fetched (and cached).
    pub async fn preview_url(&self, url: &str) -> Result<Map<String, Value>, ServiceError> {
        let config = self.preview_config()?;
        if url.len() > MAX_URL_BYTES {
            return Err(ServiceError::InvalidParam(format!(
                "URLs longer than {MAX_URL_BYTES} bytes are not previewed"
            )));
        }
        let mut parsed = parse_web_url(url).map_err(|e| ServiceError::InvalidParam(e.to_string()))?;
        // The fragment never reaches the page's server: one preview for all of them.
        parsed.set_fragment(None);
        let key = parsed.as_str().as_bytes().to_vec();
        let now = self.clock.now_ms();
        if let Some((cached, _)) = self.get::<CachedPreview>(Table::MediaPreviews, &key).await?
            && now < cached.fetched_ms.saturating_add(config.cache_ttl_ms)
        {
            return Ok(cached.preview);
        }
        let fetcher = self.preview_fetcher(config).await?;
        let host = parsed.host_str().unwrap_or_default().to_owned();
        let preview = tokio::time::timeout(config.timeout, self.fetch_preview(fetcher, config, parsed.as_str()))
            .await
            .map_err(|_| ServiceError::Federation(FederationError::TimedOut(host)))??;
        let mut batch = WriteBatch::new();
        batch.put(Table::MediaPreviews, key, encode(&CachedPreview { fetched_ms: now, preview: preview.clone() }));
        self.kv.write(batch).await?;
        Ok(preview)
    }

    async fn fetch_preview(
        &self,
        fetcher: &WebFetcher,
        config: &UrlPreviewConfig,
        url: &str,
    ) -> Result<Map<String, Value>, ServiceError> {
        let found = fetcher.get(url, ACCEPT_PAGE).await?;
        let host = found.url.host_str().unwrap_or_default().to_owned();
        let content_type = mime_of(&found.response);
        let mut preview = Map::new();
        if content_type.starts_with("image/") {
            let bytes = web_fetch::read_body_limited(&host, found.response, config.max_page_bytes).await?;
            self.store_preview_image(bytes, &content_type, &mut preview).await?;
            return Ok(preview);
        }
        if content_type != "text/html" && content_type != "application/xhtml+xml" {
            // Nothing to read an Open Graph tag from: an empty preview, as the spec allows.
            return Ok(preview);
        }
        let bytes = web_fetch::read_body_limited(&host, found.response, config.max_page_bytes).await?;
        let html = String::from_utf8_lossy(&bytes).into_owned();
        let graph = tokio::task::spawn_blocking(move || open_graph(&html))
            .await
            .map_err(|e| ServiceError::Internal(format!("reading the page: {e}")))?;
        for (property, value) in graph {
            preview.insert(property, Value::String(value));
        }
        if let Some(Value::String(image)) = preview.remove("og:image") {
            match found.url.join(&image) {
                Ok(image_url) => self.attach_image(fetcher, config, image_url.as_str(), &mut preview).await,
                Err(error) => tracing::debug!(%image, %error, "og:image is not a URL"),
            }
        }
        Ok(preview)
    }

    /// Fetches a page's image into the media store; a failure leaves the preview without one.
    async fn attach_image(
        &self,
        fetcher: &WebFetcher,
        config: &UrlPreviewConfig,
        url: &str,
        preview: &mut Map<String, Value>,
    ) {
        let fetched = async {
            let found = fetcher.get(url, ACCEPT_IMAGE).await?;
            let content_type = mime_of(&found.response);
            if !content_type.starts_with("image/") {
                return Err(ServiceError::Remote(format!("og:image is {content_type}, not an image")));
            }
            let host = found.url.host_str().unwrap_or_default().to_owned();
            let bytes = web_fetch::read_body_limited(&host, found.response, config.max_page_bytes).await?;
            Ok((bytes, content_type))
        };
        let result = match fetched.await {
            Ok((bytes, content_type)) => self.store_preview_image(bytes, &content_type, preview).await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            tracing::info!(%url, %error, "URL preview without its image");
            for key in ["og:image:width", "og:image:height", "og:image:type", "og:image:secure_url"] {
                preview.remove(key);
            }
        }
    }

    /// Stores an image as local media (no uploader) and describes it in `preview`.
    async fn store_preview_image(
        &self,
        bytes: Vec<u8>,
        content_type: &str,
        preview: &mut Map<String, Value>,
    ) -> Result<(), ServiceError> {
        let dimensions = image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .ok()
            .and_then(|reader| reader.into_dimensions().ok());
        let size = bytes.len();
        let mut upload = self.begin_upload(None).await?;
        upload.write(&bytes).await?;
        let media_id =
            self.finish_upload(upload, None, Some(content_type.to_owned()), None, UploadTarget::PreviewImage).await?;
        preview.insert("og:image".into(), Value::String(format!("mxc://{}/{media_id}", self.server_name)));
        preview.insert("og:image:type".into(), Value::String(content_type.to_owned()));
        preview.insert("matrix:image:size".into(), Value::from(size));
        preview.remove("og:image:secure_url");
        match dimensions {
            Some((width, height)) => {
                preview.insert("og:image:width".into(), Value::from(width));
                preview.insert("og:image:height".into(), Value::from(height));
            }
            None => {
                preview.remove("og:image:width");
                preview.remove("og:image:height");
            }
        }
        Ok(())
    }

    /// Deletes the images previews stored before `before_ms` (with their thumbnails, and their
    /// bytes when nothing else names them); returns how many. Each image is deleted before its
    /// listing, so a crash between the two only repeats the deletion on the next sweep.
    pub async fn purge_preview_images(&self, before_ms: u64) -> Result<usize, ServiceError> {
        let range = KeyRange::between(&[], &before_ms.to_be_bytes());
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::MediaPreviewImages, &range).await?;
        let own = self.server_name.clone();
        for (key, _) in &rows {
            let media_id = std::str::from_utf8(&key[8.min(key.len())..]).unwrap_or_default();
            self.delete(&own, media_id).await?;
            let mut batch = WriteBatch::new();
            batch.delete(Table::MediaPreviewImages, key.clone());
            self.kv.write(batch).await?;
        }
        Ok(rows.len())
    }

    /// How long preview images are kept (also while previews are off: earlier ones still go).
    pub fn preview_image_retention_ms(&self) -> u64 {
        self.config.preview_image_retention_ms
    }

    /// Deletes cached previews fetched before `before_ms` (their images go by their own
    /// retention, [`Self::purge_preview_images`]); returns how many.
    pub async fn purge_previews(&self, before_ms: u64) -> Result<usize, ServiceError> {
        let rows = lattice_storage::scan_all(self.kv.as_ref(), Table::MediaPreviews, &KeyRange::all()).await?;
        let mut batch = WriteBatch::new();
        let mut purged = 0;
        for (key, raw) in rows {
            let cached: CachedPreview = decode(Table::MediaPreviews, &raw)?;
            if cached.fetched_ms < before_ms {
                batch.delete(Table::MediaPreviews, key);
                purged += 1;
            }
        }
        if purged > 0 {
            self.kv.write(batch).await?;
        }
        Ok(purged)
    }

    /// How long previews are cached; `None` when previews are off.
    pub fn preview_cache_ttl_ms(&self) -> Option<u64> {
        self.config.url_preview.as_ref().map(|config| config.cache_ttl_ms)
    }
}

/// The media type of an answer, lower-case, without parameters.
fn mime_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// What the tokenizer has seen so far.
#[derive(Default)]
struct GraphState {
    properties: BTreeMap<String, String>,
    title: Option<String>,
    in_title: bool,
    description: Option<String>,
    twitter: BTreeMap<String, String>,
}

#[derive(Default)]
struct GraphSink {
    state: RefCell<GraphState>,
}

impl GraphSink {
    fn meta(&self, tag: &html5ever::tokenizer::Tag) {
        let attr = |name: &str| tag.attrs.iter().find(|a| &*a.name.local == name).map(|a| a.value.to_string());
        let Some(content) = attr("content") else { return };
        let content = clean(&content);
        if content.is_empty() {
            return;
        }
        let mut state = self.state.borrow_mut();
        // Open Graph uses `property`; many pages write `name` instead.
        for key in [attr("property"), attr("name")].into_iter().flatten() {
            let key = key.trim().to_ascii_lowercase();
            if key.starts_with("og:") {
                if state.properties.len() < MAX_PROPERTIES && !state.properties.contains_key(&key) {
                    state.properties.insert(key, content.clone());
                }
            } else if key == "description" {
                state.description.get_or_insert_with(|| content.clone());
            } else if matches!(key.as_str(), "twitter:title" | "twitter:description" | "twitter:image") {
                state.twitter.entry(key).or_insert_with(|| content.clone());
            }
        }
    }
}

impl TokenSink for GraphSink {
    type Handle = ();

    fn process_token(&self, token: Token, _line_number: u64) -> TokenSinkResult<()> {
        match token {
            TagToken(tag) if tag.kind == StartTag => {
                // The tokenizer alone does not know which elements hold raw text; tell it, as
                // the tree builder would, so `<script>` bodies are not read as tags.
                match &*tag.name {
                    "meta" => self.meta(&tag),
                    "title" => {
                        self.state.borrow_mut().in_title = true;
                        return TokenSinkResult::RawData(RawKind::Rcdata);
                    }
                    "textarea" => return TokenSinkResult::RawData(RawKind::Rcdata),
                    "script" => return TokenSinkResult::RawData(RawKind::ScriptData),
                    "style" | "xmp" | "iframe" | "noembed" | "noframes" => {
                        return TokenSinkResult::RawData(RawKind::Rawtext);
                    }
                    "plaintext" => return TokenSinkResult::Plaintext,
                    _ => {}
                }
            }
            TagToken(tag) if tag.kind == EndTag && &*tag.name == "title" => {
                let mut state = self.state.borrow_mut();
                state.in_title = false;
                if state.title.is_none() {
                    state.title = Some(String::new());
                }
            }
            CharacterTokens(text) => {
                let mut state = self.state.borrow_mut();
                if state.in_title {
                    let title = state.title.get_or_insert_with(String::new);
                    if title.len() < MAX_VALUE_CHARS * 4 {
                        title.push_str(&text);
                    }
                }
            }
            _ => {}
        }
        TokenSinkResult::Continue
    }
}

/// Whitespace collapsed, cut to [`MAX_VALUE_CHARS`].
fn clean(text: &str) -> String {
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match collapsed.char_indices().nth(MAX_VALUE_CHARS) {
        Some((end, _)) => collapsed[..end].to_owned(),
        None => collapsed,
    }
}

/// The Open Graph properties of a page (`og:*` from `<meta property|name content>`, the first
/// of each), with `og:title` falling back to `twitter:title` then `<title>`, `og:description`
/// to the meta description then `twitter:description`, and `og:image` to `twitter:image`.
pub fn open_graph(html: &str) -> BTreeMap<String, String> {
    let tokenizer = Tokenizer::new(GraphSink::default(), TokenizerOpts::default());
    let input = BufferQueue::default();
    input.push_back(StrTendril::from_slice(html));
    let _ = tokenizer.feed(&input);
    tokenizer.end();
    let state = tokenizer.sink.state.into_inner();
    let mut properties = state.properties;
    let title = state.title.map(|t| clean(&t)).filter(|t| !t.is_empty());
    if !properties.contains_key("og:title")
        && let Some(title) = state.twitter.get("twitter:title").cloned().or(title)
    {
        properties.insert("og:title".into(), title);
    }
    if !properties.contains_key("og:description")
        && let Some(description) = state.description.or_else(|| state.twitter.get("twitter:description").cloned())
    {
        properties.insert("og:description".into(), description);
    }
    if !properties.contains_key("og:image")
        && let Some(image) = state.twitter.get("twitter:image").cloned()
    {
        properties.insert("og:image".into(), image);
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_tags_are_read_with_entities_decoded() {
        let html = r#"<!doctype html><html><head>
            <title>Fallback title</title>
            <meta property="og:title" content="Caf&eacute; &amp; Bar">
            <meta property="og:description" content="  A   place
                to eat  ">
            <meta property="og:image" content="/img/logo.png">
            <meta property="og:title" content="Second title is ignored">
            <meta name="og:site_name" content="Example">
            <meta property="og:empty" content="   ">
            </head><body><p>Hello</p></body></html>"#;
        let graph = open_graph(html);
        assert_eq!(graph["og:title"], "Café & Bar");
        assert_eq!(graph["og:description"], "A place to eat");
        assert_eq!(graph["og:image"], "/img/logo.png");
        assert_eq!(graph["og:site_name"], "Example");
        assert!(!graph.contains_key("og:empty"));
    }

    #[test]
    fn title_and_meta_description_are_the_fallbacks() {
        let html = "<html><head><title>\n  My &lt;Page&gt;  </title>\
                    <meta name=\"description\" content=\"What it is\"></head></html>";
        let graph = open_graph(html);
        assert_eq!(graph["og:title"], "My <Page>");
        assert_eq!(graph["og:description"], "What it is");
        assert!(!graph.contains_key("og:image"));
        let twitter = open_graph(
            "<meta name=\"twitter:title\" content=\"T\"><meta name=\"twitter:image\" content=\"https://x/i.png\">",
        );
        assert_eq!(twitter["og:title"], "T");
        assert_eq!(twitter["og:image"], "https://x/i.png");
    }

    #[test]
    fn script_and_style_bodies_are_not_read_as_tags() {
        let html = r#"<head><script>var s = '<meta property="og:title" content="from script">';</script>
            <style>/* <title>no</title> */</style>
            <title>Real</title></head>"#;
        let graph = open_graph(html);
        assert_eq!(graph["og:title"], "Real");
    }

    #[test]
    fn hostile_pages_are_bounded() {
        let mut html = String::new();
        for i in 0..500 {
            html.push_str(&format!("<meta property=\"og:p{i}\" content=\"{}\">", "x".repeat(5000)));
        }
        html.push_str("<title>");
        let graph = open_graph(&html);
        assert_eq!(graph.len(), MAX_PROPERTIES);
        assert!(graph.values().all(|v| v.chars().count() <= MAX_VALUE_CHARS));
        assert!(open_graph("").is_empty());
        assert!(open_graph("<<<>>><meta content>\0<title").is_empty());
    }
}
