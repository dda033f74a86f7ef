//! The text side of `Phi3VProcessor` (spec §3): chat template, chunked tokenisation with one
//! BOS per chunk, and the `<|image_k|>` → `-k` placeholder runs.
//!
//! The tokenizer is `tokenizer.json` through the `tokenizers` crate (what transformers'
//! `LlamaTokenizerFast` runs). The chat template is rendered by `minijinja` with the options
//! transformers 4.40 gives jinja2 (`ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)`, `keep_trailing_newline` left false, `raise_exception` as a global), and
//! the special-tokens map (`bos_token`, `eos_token`, ...) as variables.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// One chat turn: `role` is "system", "user" or "assistant".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// `re.split(r"<\|image_\d+\|>", text)` of `processing_phi3_v.py` (`\d` is Unicode-aware in
/// Python's `re` and in the `regex` crate alike).
const IMAGE_TAG_PATTERN: &str = r"<\|image_(\d+)\|>";

/// Tokenizer, chat template and special tokens of a model directory.
#[derive(Clone)]
pub struct PromptProcessor {
    tokenizer: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// `special_tokens_map` of transformers: bos_token, eos_token, unk_token, pad_token.
    special_tokens: BTreeMap<String, String>,
    additional_special_tokens: Vec<String>,
    tag_re: regex::Regex,
}

impl std::fmt::Debug for PromptProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptProcessor")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.chat_template)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

/// A token in `tokenizer_config.json` is a string or an AddedToken object with `content`.
fn token_string(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl PromptProcessor {
    /// Loads `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens) from
    /// `dir`. A missing `tokenizer_config.json` leaves no chat template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = dir.join("tokenizer_config.json");
        Self::from_files(
            &dir.join("tokenizer.json"),
            config.exists().then_some(config.as_path()),
        )
    }

    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.exists() {
            return Err(Error::Io {
                path: tokenizer_json.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "tokenizer.json not found",
                ),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let mut chat_template = None;
        let mut special_tokens = BTreeMap::new();
        let mut additional_special_tokens = Vec::new();
        if let Some(path) = tokenizer_config_json {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: path.to_path_buf(),
                    reason: format!("not valid JSON: {e}"),
                })?;
            match cfg.get("chat_template") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => chat_template = Some(s.clone()),
                Some(_) => {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        reason:
                            "chat_template must be a string (named templates are not supported)"
                                .into(),
                    })
                }
            }
            for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
                if let Some(tok) = cfg.get(key).and_then(token_string) {
                    special_tokens.insert(key.to_string(), tok);
                }
            }
            if let Some(list) = cfg
                .get("additional_special_tokens")
                .and_then(|v| v.as_array())
            {
                additional_special_tokens = list.iter().filter_map(token_string).collect();
            }
        }
        let tag_re = regex::Regex::new(IMAGE_TAG_PATTERN).expect("static regex");
        Ok(PromptProcessor {
            tokenizer,
            chat_template,
            special_tokens,
            additional_special_tokens,
            tag_re,
        })
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.get("bos_token").map(String::as_str)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_tokens.get("eos_token").map(String::as_str)
    }

    /// The id of a token of the vocabulary (or of an added token), e.g. `"<|end|>"` → 32007.
    /// Whether `text` holds any `<|image_k|>` tag.
    pub fn has_image_tags(&self, text: &str) -> bool {
        self.tag_re.is_match(text)
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.tokenizer.token_to_id(s)
    }

    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = self.chat_template.as_deref() else {
            return Err(Error::Template(
                "tokenizer_config.json has no chat_template".into(),
            ));
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let mut ctx: BTreeMap<String, minijinja::Value> = BTreeMap::new();
        ctx.insert(
            "messages".into(),
            minijinja::Value::from_serialize(messages),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            minijinja::Value::from(add_generation_prompt),
        );
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), minijinja::Value::from(v.as_str()));
        }
        ctx.insert(
            "additional_special_tokens".into(),
            minijinja::Value::from_serialize(&self.additional_special_tokens),
        );
        env.render_str(template, ctx)
            .map_err(|e| Error::Template(format!("{e:#}")))
    }

    /// `tokenizer(text, add_special_tokens=...).input_ids`.
    pub fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The `<|image_k|>` tags of `text`, in order: (tag text, k).
    fn image_tags<'t>(&self, text: &'t str) -> Result<Vec<(&'t str, usize)>> {
        self.tag_re
            .captures_iter(text)
            .map(|c| {
                let tag = c.get(0).expect("group 0").as_str();
                // Python's int() also reads non-ASCII digits; we refuse them rather than guess.
                let k = c[1].parse::<usize>().map_err(|_| {
                    Error::Prompt(format!(
                        "image tag {tag} does not carry a plain decimal image number"
                    ))
                })?;
                Ok((tag, k))
            })
            .collect()
    }

    /// `Phi3VProcessor._convert_images_texts_to_inputs` for one prompt (spec §3.2).
    ///
    /// Without images (and without tags) this is `tokenizer(text).input_ids`. With images the text
    /// is split on the `<|image_k|>` tags, each chunk is tokenised on its own with special tokens
    /// (so every chunk starts with BOS = 1, an empty chunk gives `[1]`), and tag k becomes
    /// `num_img_tokens[k-1]` copies of `-k`. Tags must be `<|image_1|>`..`<|image_n|>`, each
    /// once, in ascending order, with n the number of images (the reference only asserts that
    /// the set of tags is 1..n; repeats or reordering would silently mis-assign image features).
    pub fn encode(&self, text: &str, num_img_tokens: &[usize]) -> Result<Vec<i64>> {
        let tags = self.image_tags(text)?;
        let n = num_img_tokens.len();
        if n == 0 {
            if let Some((tag, _)) = tags.first() {
                return Err(Error::Prompt(format!(
                    "prompt references {tag} but no images were given"
                )));
            }
            return Ok(self
                .encode_text(text, true)?
                .into_iter()
                .map(i64::from)
                .collect());
        }
        if let Some((tag, _)) = tags.iter().find(|(_, k)| *k == 0) {
            return Err(Error::Prompt(format!(
                "prompt references {tag}, but image tags start at <|image_1|>"
            )));
        }
        if let Some((tag, _)) = tags.iter().find(|(_, k)| *k > n) {
            let noun = if n == 1 { "image was" } else { "images were" };
            return Err(Error::Prompt(format!(
                "prompt references {tag} but only {n} {noun} given"
            )));
        }
        let mut seen = vec![false; n + 1];
        for (tag, k) in &tags {
            if seen[*k] {
                return Err(Error::Prompt(format!(
                    "prompt references {tag} more than once; each image tag must appear once"
                )));
            }
            seen[*k] = true;
        }
        if let Some(k) = (1..=n).find(|&k| !seen[k]) {
            let noun = if n == 1 { "image was" } else { "images were" };
            return Err(Error::Prompt(format!(
                "prompt has no <|image_{k}|> tag, but {n} {noun} given"
            )));
        }
        for pair in tags.windows(2) {
            if pair[1].1 < pair[0].1 {
                return Err(Error::Prompt(format!(
                    "image tags must appear in ascending order, but {} comes before {}",
                    pair[0].0, pair[1].0
                )));
            }
        }

        let mut ids: Vec<i64> =
            Vec::with_capacity(text.len() / 2 + num_img_tokens.iter().sum::<usize>());
        for (i, chunk) in self.tag_re.split(text).enumerate() {
            ids.extend(self.encode_text(chunk, true)?.into_iter().map(i64::from));
            if let Some(&(_, k)) = tags.get(i) {
                ids.extend(std::iter::repeat_n(-(k as i64), num_img_tokens[k - 1]));
            }
        }
        Ok(ids)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)` (clean_up_tokenization_spaces is false
    /// for this tokenizer).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
