//! Which model directory to use when `--model` is not given: `PHI3V_MODEL`, else a
//! Phi-3-vision or Phi-3.5-vision snapshot in the local Hugging Face cache, else the tiny
//! random-weight model bundled with the repository.

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
    Bundled,
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

/// Resolves the model directory.
pub fn resolve(arg: Option<&Path>) -> (PathBuf, ModelSource) {
    if let Some(p) = arg {
        return (p.to_path_buf(), ModelSource::Argument);
    }
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
    fn explicit_argument_wins() {
        let (dir, src) = resolve(Some(Path::new("/some/model")));
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
