#!/usr/bin/env python3
"""Decoder goldens from transformers' own `Phi3ForCausalLM` (spec §5), in a process of its own.

make_fixtures.py runs everything else on the stack pinned by the Phi-3-vision README
(transformers 4.40.2), which has no Phi-3 model. This script runs the decoder on the first
transformers release that has one: 4.41.2, pinned in xtask/python/requirements-phi3.txt and
installed with `--no-deps --target .pyref/transformers-phi3` (xtask/src/fixtures.rs). That
directory goes first on sys.path, so `transformers` here is 4.41.2 while torch, tokenizers,
safetensors and huggingface_hub are the main venv's (they satisfy 4.41.2's requirements).
Run it with `python -I` so that PYTHONPATH and the user site cannot change what is imported.

    phi3_reference.py --ckpt fixtures/tiny-phi3v --inputs IN.safetensors --out OUT.safetensors

IN: for each case, `<case>.inputs_embeds` f32 [1, seq, hidden]; the metadata entry "cases" is a
JSON list of {"name", "max_new_tokens"}.
OUT: for each case, `<case>.logits` f32 [vocab] (last prompt position, from the prefill),
`<case>.generated_ids` i64 [M], `<case>.generated_margins` f32 [M] (top-1 minus top-2 of the
logits that chose each token) and `<case>.rope_long_per_call` i64 [M] (1 where that forward call
used the long LongRoPE factors; prefill first). Metadata: transformers version and module path.

The model: `Phi3Config` from the checkpoint's config.json (the keys Phi3Config takes, rope_scaling
{"type": "su", ...} included), eager attention, float32, one CPU thread, and the checkpoint's
decoder tensors (model.* without model.vision_embed_tokens.*, and lm_head.*) upcast bf16 -> f32
and loaded strictly. Greedy decoding calls the model once per token with a DynamicCache and
explicit position_ids, never re-prefilling, so the factor set is chosen per forward call by
Phi3SuScaledRotaryEmbedding from max(position_ids) + 1 > original_max_position_embeddings.
"""

import argparse
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SITE = ROOT / ".pyref" / "transformers-phi3"
EXPECTED_VERSION = "4.41.2"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="tiny checkpoint directory")
    ap.add_argument("--inputs", type=Path, required=True, help="safetensors with <case>.inputs_embeds")
    ap.add_argument("--out", type=Path, required=True, help="safetensors to write")
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE, help="pip --target dir holding transformers")
    args = ap.parse_args()

    site = args.site.resolve()
    if not (site / "transformers").is_dir():
        sys.exit(f"phi3_reference: no transformers in {site} (run `cargo xtask fixtures` to install it)")
    sys.path.insert(0, str(site))

    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers.cache_utils import DynamicCache
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.phi3.configuration_phi3 import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3ForCausalLM, Phi3SuScaledRotaryEmbedding

    if transformers.__version__ != EXPECTED_VERSION or not Path(transformers.__file__).resolve().is_relative_to(site):
        sys.exit(f"phi3_reference: expected transformers {EXPECTED_VERSION} from {site}, "
                 f"got {transformers.__version__} from {transformers.__file__}")
    transformers.logging.set_verbosity_error()  # "not running the flash-attention implementation"
    torch.manual_seed(0)
    torch.set_num_threads(1)

    # Config: every config.json key that Phi3Config.__init__ names; the rest (vision settings,
    # auto_map, model_type phi3_v, _attn_implementation flash_attention_2, ...) is not the decoder's.
    raw = json.loads((args.ckpt / "config.json").read_text())
    params = set(inspect.signature(Phi3Config.__init__).parameters) - {"self", "kwargs"}
    kw = {k: v for k, v in raw.items() if k in params}
    assert kw["rope_scaling"]["type"] == "su", kw["rope_scaling"]
    config = Phi3Config(**kw, attn_implementation="eager")
    for k, v in kw.items():
        assert getattr(config, k) == v, k
    model = Phi3ForCausalLM(config).eval()
    assert config._attn_implementation == "eager"
    for layer in model.model.layers:
        assert type(layer.self_attn) is Phi3Attention, type(layer.self_attn)
        assert type(layer.self_attn.rotary_emb) is Phi3SuScaledRotaryEmbedding, type(layer.self_attn.rotary_emb)

    # Weights: exactly the checkpoint's decoder tensors, bf16 -> f32, strict.
    index = json.loads((args.ckpt / "model.safetensors.index.json").read_text())
    sd = {}
    for fname in sorted(set(index["weight_map"].values())):
        for k, t in load_file(str(args.ckpt / fname)).items():
            if k == "lm_head.weight" or (k.startswith("model.") and not k.startswith("model.vision_embed_tokens.")):
                assert t.dtype == torch.bfloat16, k
                sd[k] = t.float()
    model.load_state_dict(sd, strict=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # Which factor set each forward call used, read off the rotary modules themselves: forward()
    # leaves the inv_freq it used in `self.inv_freq`. Every layer must agree within a call.
    rope = model.model.layers[0].self_attn.rotary_emb
    shape = torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim
    inv = {
        True: 1.0 / (torch.tensor(config.rope_scaling["long_factor"], dtype=torch.float32) * rope.base**shape),
        False: 1.0 / (torch.tensor(config.rope_scaling["short_factor"], dtype=torch.float32) * rope.base**shape),
    }
    seen = []

    def hook(module, _inputs, _output):
        used = [flag for flag, f in inv.items() if torch.equal(module.inv_freq, f)]
        assert len(used) == 1, "inv_freq matches neither factor set"
        seen.append(used[0])

    for layer in model.model.layers:
        layer.self_attn.rotary_emb.register_forward_hook(hook)

    def call(**kw):
        seen.clear()
        out = model(**kw, use_cache=True, return_dict=True)
        assert len(seen) == config.num_hidden_layers and len(set(seen)) == 1, seen
        pos = kw["position_ids"]
        assert seen[0] == bool(int(pos.max()) + 1 > config.original_max_position_embeddings)
        return out.logits[0, -1].float(), seen[0]

    with safe_open(str(args.inputs), framework="pt") as f:
        cases = json.loads(f.metadata()["cases"])
    inputs = load_file(str(args.inputs))
    out = {}
    for case in cases:
        name, max_new = case["name"], case["max_new_tokens"]
        embeds = inputs[f"{name}.inputs_embeds"]
        assert embeds.dtype == torch.float32 and embeds.dim() == 3 and embeds.shape[0] == 1
        seq = embeds.shape[1]
        cache = DynamicCache()
        with torch.no_grad():
            cur, long = call(inputs_embeds=embeds, position_ids=torch.arange(seq)[None], past_key_values=cache)
            logits = cur.clone()
            ids, margins, longs = [], [], [long]
            for step in range(max_new):
                top = torch.topk(cur, 2)
                tok = int(torch.argmax(cur))
                assert tok == int(top.indices[0])
                ids.append(tok)
                margins.append(float(top.values[0] - top.values[1]))
                if step == max_new - 1:
                    break
                # The model's own embed_tokens embeds the generated token.
                cur, long = call(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[seq + step]]),
                                 past_key_values=cache)
                longs.append(long)
                assert cache.get_seq_length() == seq + step + 1
        out[f"{name}.logits"] = logits.contiguous()
        out[f"{name}.generated_ids"] = torch.tensor(ids, dtype=torch.long)
        out[f"{name}.generated_margins"] = torch.tensor(margins, dtype=torch.float32)
        out[f"{name}.rope_long_per_call"] = torch.tensor(longs, dtype=torch.long)
    save_file(out, str(args.out), metadata={
        "transformers_version": transformers.__version__,
        "module": str(Path(modeling_phi3.__file__).resolve().relative_to(site)),
    })


if __name__ == "__main__":
    main()
