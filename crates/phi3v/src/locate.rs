//! Which model directory to use. `--model` is a directory, or a Hugging Face repo id
//! (`microsoft/Phi-3-vision-128k-instruct`) looked up in the local hub cache and otherwise
//! downloaded into it with `hf-hub`. Without `--model`: `PHI3V_MODEL`, else a Phi-3-vision or
//! Phi-3.5-vision snapshot in the cache, else the tiny random-weight model bundled with the
//! repository.

use std::path::{Path, PathBuf};

/// Repositories looked up in the Hugging Face cache, in order.
pub const HF_REPOS: [&str; 2] = [
    "microsoft/Phi-3-vision-128k-instruct",
    "microsoft/Phi-3.5-vision-instruct",
];

/// Where a model came from, for the one-line notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Argument,
    Env,
    HfCache(String),
    /// Downloaded now into the hub cache.
    Downloaded(String),
    Bundled,
}

/// Files of a model directory besides the weights.
pub const MODEL_FILES: [&str; 4] = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// Whether `s` has the shape of a Hugging Face repo id (`owner/name`).
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// The bundled tiny checkpoint (random weights), in the source tree.
pub fn bundled_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-phi3v")
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// A complete snapshot of `repo` in the hub cache (the one `refs/main` names, else any).
pub fn hf_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let base = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = base.join("snapshots");
    let preferred = std::fs::read_to_string(base.join("refs/main"))
        .ok()
        .map(|r| snapshots.join(r.trim()));
    let mut candidates: Vec<PathBuf> = preferred.into_iter().collect();
    if let Ok(rd) = std::fs::read_dir(&snapshots) {
        let mut others: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        others.sort();
        candidates.extend(others);
    }
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
}

/// Resolves `--model` (a directory or a repo id) or the default.
pub fn resolve(arg: Option<&Path>) -> Result<(PathBuf, ModelSource), String> {
    let Some(p) = arg else {
        return Ok(resolve_default());
    };
    let text = p.to_string_lossy();
    if p.exists() || !is_repo_id(&text) {
        return Ok((p.to_path_buf(), ModelSource::Argument));
    }
    let repo = text.to_string();
    if let Some(dir) = hf_hub_cache().and_then(|c| hf_snapshot(&c, &repo)) {
        return Ok((dir, ModelSource::HfCache(repo)));
    }
    let dir = download(&repo)?;
    Ok((dir, ModelSource::Downloaded(repo)))
}

/// Fetches `repo`'s config, processor and tokenizer files and every weight shard its index
/// names into the hub cache, with progress bars (`HF_ENDPOINT` and `HF_HUB_OFFLINE` are
/// honoured as by the Python client). Returns the snapshot directory.
#[cfg(feature = "hub")]
pub fn download(repo: &str) -> Result<PathBuf, String> {
    let cache = hf_hub_cache().ok_or("no Hugging Face cache directory (set HF_HUB_CACHE)")?;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!(
            "{repo} is not in the Hugging Face cache at {} and downloading {what} failed: {e}",
            cache.display()
        )
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0") {
        return Err(format!(
            "{repo} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE forbids downloading it",
            cache.display()
        ));
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
        .with_progress(true);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().map_err(|e| fail("(client setup)", &e))?;
    let api = api.model(repo.to_string());
    let mut dir = None;
    for f in MODEL_FILES {
        let path = api.get(f).map_err(|e| fail(f, &e))?;
        dir = path.parent().map(Path::to_path_buf);
    }
    let dir = dir.expect("MODEL_FILES is not empty");
    let shards = match api.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| fail("the index", &e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| fail("the index", &e))?;
            let mut files: Vec<String> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            files
        }
        Err(_) => vec!["model.safetensors".to_string()],
    };
    for f in &shards {
        api.get(f).map_err(|e| fail(f, &e))?;
    }
    Ok(dir)
}

/// Without the `hub` feature, only the cache is searched.
#[cfg(not(feature = "hub"))]
pub fn download(repo: &str) -> Result<PathBuf, String> {
    Err(format!(
        "{repo} is not in the Hugging Face cache ({}) and this phi3v was built without the `hub` feature to download it",
        hf_hub_cache().map(|c| c.display().to_string()).unwrap_or_default()
    ))
}

fn resolve_default() -> (PathBuf, ModelSource) {
    if let Ok(p) = std::env::var("PHI3V_MODEL") {
        if !p.is_empty() {
            return (PathBuf::from(p), ModelSource::Env);
        }
    }
    if let Some(cache) = hf_hub_cache() {
        for repo in HF_REPOS {
            if let Some(dir) = hf_snapshot(&cache, repo) {
                return (dir, ModelSource::HfCache(repo.to_string()));
            }
        }
    }
    (bundled_model_dir(), ModelSource::Bundled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_snapshot_named_by_refs_main() {
        let cache = std::env::temp_dir().join(format!("phi3v-hfcache-{}", std::process::id()));
        let base = cache.join("models--microsoft--Phi-3-vision-128k-instruct");
        for snap in ["aaa", "bbb"] {
            std::fs::create_dir_all(base.join("snapshots").join(snap)).unwrap();
            std::fs::write(base.join("snapshots").join(snap).join("config.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), "bbb\n").unwrap();
        assert_eq!(
            hf_snapshot(&cache, HF_REPOS[0]),
            Some(base.join("snapshots/bbb"))
        );
        // Without refs/main, any complete snapshot; an incomplete one is skipped.
        std::fs::remove_file(base.join("refs/main")).unwrap();
        std::fs::remove_file(base.join("snapshots/aaa/config.json")).unwrap();
        assert_eq!(
            hf_snapshot(&cache, HF_REPOS[0]),
            Some(base.join("snapshots/bbb"))
        );
        assert_eq!(hf_snapshot(&cache, HF_REPOS[1]), None);
        let _ = std::fs::remove_dir_all(&cache);
    }

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(is_repo_id("microsoft/Phi-3-vision-128k-instruct"));
        assert!(is_repo_id("someone/model_v1.5"));
        for p in ["/abs/path", "rel", "a/b/c", "./x", "a/", "../m", "a b/c"] {
            assert!(!is_repo_id(p), "{p}");
        }
    }

    #[test]
    fn explicit_argument_wins() {
        let (dir, src) = resolve(Some(Path::new("/some/model"))).unwrap();
        assert_eq!(
            (dir, src),
            (PathBuf::from("/some/model"), ModelSource::Argument)
        );
    }

    #[test]
    fn bundled_model_is_in_the_tree() {
        assert!(bundled_model_dir().join("config.json").is_file());
    }
}
