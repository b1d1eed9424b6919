"""Model sources: short names, local paths, hub ids offline, the conversion cache, tiny models, fallbacks."""

import json
import time
from pathlib import Path

import pytest
import torch

from hydra_rlhf.model import loading as models


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'smollm-9000'.*smollm2-135m"):
        models.resolve_model("smollm-9000")


def test_hub_id_without_network_names_the_bundled_alternative():
    with pytest.raises(RuntimeError, match=r"'nobody/no-such-model' is not a local directory.*bundled model 'smollm2-135m'"):
        models.load_tokenizer("nobody/no-such-model")
    with pytest.raises(RuntimeError, match="Without network access"):
        models.load_causal_lm("nobody/no-such-model")


def test_local_path_passes_through(tiny_model):
    assert models.resolve_model(tiny_model) == tiny_model


def test_tiny_model_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_RLHF_CACHE", str(tmp_path))
    first = models.tiny_model_dir(seed=3, hidden_size=32)
    weights = (first / "model.safetensors").read_bytes()
    (first / models.MANIFEST).unlink()  # force a rebuild
    assert (models.tiny_model_dir(seed=3, hidden_size=32) / "model.safetensors").read_bytes() == weights
    assert models.tiny_model_dir(seed=4, hidden_size=32) != first


def test_conversion_check_catches_partial_and_corrupt_copies(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    assert not models.conversion_is_valid(directory)  # empty
    (directory / "config.json").write_text("{}")
    (directory / models.WEIGHTS).write_bytes(b"x" * 1000)
    assert not models.conversion_is_valid(directory)  # no manifest: interrupted before the end
    manifest = {"weights_bytes": 1000, "sha256": models.file_sha256(directory / models.WEIGHTS)}
    (directory / models.MANIFEST).write_text(json.dumps(manifest))
    assert models.conversion_is_valid(directory)
    (directory / models.WEIGHTS).write_bytes(b"x" * 999 + b"y")  # same size, different bytes
    assert not models.conversion_is_valid(directory)
    (directory / models.WEIGHTS).write_bytes(b"x" * 10)  # truncated
    assert not models.conversion_is_valid(directory)


def test_tokenizer_fallbacks(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_model)
    raw.pad_token = None
    raw.chat_template = None
    raw.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = models.load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_bad_quantization_name():
    with pytest.raises(ValueError, match="'none', '8bit' or '4bit'"):
        models.quantization_config("2bit")


@pytest.mark.slow
def test_bundled_model_answers_a_factual_question():
    started = time.perf_counter()
    model = models.load_causal_lm("smollm2-135m")
    tokenizer = models.load_tokenizer("smollm2-135m")
    load_seconds = time.perf_counter() - started
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    print(f"bundled model load: {load_seconds:.1f} s")


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_RLHF_CACHE", str(tmp_path))
    started = time.perf_counter()
    directory = models.bundled_model_dir()
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert models.bundled_model_dir() == directory
    second = time.perf_counter() - started
    assert second < first / 3
    with open(directory / models.WEIGHTS, "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(10_000_000)
        f.write(b"\x00" * 64)
    assert not models.conversion_is_valid(directory)
    models.bundled_model_dir()
    assert models.conversion_is_valid(directory)
    print(f"conversion {first:.1f} s, cached load check {second:.1f} s")


# ------------------------------------------------------------------------------- random-initialised presets


def tiny_preset(tmp_path, **overrides):
    """A preset-like config.json of a tiny Llama (the bundled tokenizer's vocabulary, as a Llama 3 preset has
    more than it)."""
    config = json.loads((models.PRESET_DIR / "llama-3.2-1b.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=49160)
    config.update(overrides)
    path = tmp_path / "tiny-llama.json"
    path.write_text(json.dumps(config))
    return path


def test_random_preset_builds_its_shape_without_weights(tmp_path):
    from transformers import AutoConfig

    from hydra_rlhf.config import HydraModelConfig
    from hydra_rlhf.model.hydra import HydraModel

    name = f"random:{tiny_preset(tmp_path)}"
    directory = models.resolve_model(name)
    assert models.is_random_model(directory)
    assert not [p for p in Path(directory).iterdir() if p.suffix in (".safetensors", ".bin")]
    tokenizer = models.load_tokenizer(name)
    config = AutoConfig.from_pretrained(directory)
    assert (config.vocab_size, config.eos_token_id) == (49160, tokenizer.eos_token_id)

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first, second = models.load_causal_lm(name), models.load_causal_lm(name)
    assert torch.equal(torch.rand(3), before)  # the caller's random state is untouched
    assert first.get_input_embeddings().weight.shape == (49160, 64)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    model = HydraModel.from_config(HydraModelConfig(model_name_or_path=name, mode="hydra"))
    ids = torch.tensor([[tokenizer.bos_token_id or 1, 5, 6, 7]])
    with model.role("policy") as policy:
        logits = policy(input_ids=ids).logits
    assert logits.shape == (1, 4, 49160) and torch.isfinite(logits).all()


def test_random_preset_quantizes_through_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = models.load_causal_lm(f"random:{tiny_preset(tmp_path)}", quantization="4bit")
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and model.is_loaded_in_4bit
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_random_preset_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'llama-9'.*llama-3.2-1b"):
        models.resolve_model("random:llama-9")
    with pytest.raises(ValueError, match="vocab_size 1000 is smaller than the bundled tokenizer's"):
        models.resolve_model(f"random:{tiny_preset(tmp_path, vocab_size=1000)}")


def test_llama_3_2_1b_preset_has_the_real_shape(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.resolve_model("random:llama-3.2-1b"))
    with torch.device("meta"):  # the shape, without the weights
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B's published count
