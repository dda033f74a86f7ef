//! Incremental detokenisation for streaming output.
//!
//! Each push decodes the whole generated sequence (so the SentencePiece decoder's leading-space
//! strip and byte-fallback fusing act exactly as in the final `decode`) and returns what is new.
//! Text ending in U+FFFD is held back: with byte fallback, a multi-byte UTF-8 character spread
//! over several byte tokens decodes to replacement characters until its last byte arrives.
//! Decoding the whole sequence costs O(n) per token; generations are short enough for that.

use super::{PromptProcessor, Result};

pub struct TextStreamer<'a> {
    prompt: &'a PromptProcessor,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Text already returned; always a prefix of the decoded text so far.
    emitted: String,
}

impl<'a> TextStreamer<'a> {
    /// A streamer that skips special tokens, like the final `decode(ids, true)`.
    pub fn new(prompt: &'a PromptProcessor) -> Self {
        Self::with_skip_special_tokens(prompt, true)
    }

    pub fn with_skip_special_tokens(
        prompt: &'a PromptProcessor,
        skip_special_tokens: bool,
    ) -> Self {
        TextStreamer {
            prompt,
            skip_special_tokens,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one generated id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.prompt.decode(&self.ids, self.skip_special_tokens)?;
        let stable = text.trim_end_matches('\u{FFFD}');
        Ok(self.emit_up_to(stable))
    }

    /// Returns everything not yet returned, including held-back replacement characters.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.prompt.decode(&self.ids, self.skip_special_tokens)?;
        Ok(self.emit_up_to(&text))
    }

    fn emit_up_to(&mut self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.emitted.as_str()) {
            let out = rest.to_string();
            self.emitted.push_str(&out);
            return out;
        }
        // The decoded prefix changed (not expected with this tokenizer). Returned text cannot
        // be taken back: continue from the same byte length and resynchronise on `text`.
        let n = self.emitted.len();
        if text.len() > n && text.is_char_boundary(n) {
            let out = text[n..].to_string();
            self.emitted = text.to_string();
            return out;
        }
        String::new()
    }
}
