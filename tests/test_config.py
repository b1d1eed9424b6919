"""The run's settings: one torch-free description, renamed keys handled, each compatibility rule written once."""

import dataclasses
import subprocess
import sys

import pytest

from hydra_rlhf.config import HydraModelConfig, ModelConfig, RLConfig, RunShape
from hydra_rlhf.sft import SFTConfig


def test_importing_the_config_loads_no_torch():
    code = "import sys, hydra_rlhf.config, hydra_rlhf.layout; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_num_iterations_is_refused_with_the_keys_that_replace_it():
    with pytest.raises(ValueError, match="for the run's length set max_iterations 5; passes over each batch "
                                         r"\(TRL's num_iterations\) are num_epochs"):
        RLConfig(num_iterations=5)


def test_ppo_epochs_still_reads_into_num_epochs_with_a_warning(caplog):
    config = RLConfig(ppo_epochs=3)
    assert config.num_epochs == 3 and config.ppo_epochs is None
    assert "ppo_epochs is deprecated" in caplog.text and "use num_epochs" in caplog.text
    with pytest.raises(ValueError, match="ppo_epochs is the old name of num_epochs: set only num_epochs"):
        RLConfig(ppo_epochs=3, num_epochs=4)


def test_the_sft_objective_key_is_sft_objective():
    assert SFTConfig(objective="reward").sft_objective == "reward"  # the old name, read for one release
    with pytest.raises(ValueError, match="Unknown sft_objective 'ppo'"):
        SFTConfig(sft_objective="ppo")


def test_renamed_keys_through_the_recipe_parser(tmp_path):
    from trl import TrlParser

    yaml = tmp_path / "old.yaml"
    yaml.write_text("ppo_epochs: 3\nmax_iterations: 7\n")
    model_config, config = TrlParser((HydraModelConfig, RLConfig)).parse_args_and_config(["--config", str(yaml)])
    assert (config.num_epochs, config.max_iterations) == (3, 7)
    with pytest.raises(ValueError, match="num_iterations is no longer a key"):
        TrlParser((HydraModelConfig, RLConfig)).parse_args_and_config(["--num_iterations", "2"])


def test_the_old_key_on_the_command_line_ends_in_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "recipes/ppo.py", "--num_iterations", "2", "--output_dir",
                             str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: num_iterations is no longer a key")


def test_a_run_shape_reads_the_configs_by_name():
    model_config = HydraModelConfig(mode="lora", quantization="4bit", lora_r=8, gradient_checkpointing=True,
                                    logprob_chunk_size=64)
    config = RLConfig(objective="grpo", batch_size=4, minibatch_size=8, gradient_accumulation_steps=2,
                      max_new_tokens=32, optim="adamw_bnb_8bit")
    shape = RunShape.of(model_config, config)
    assert (shape.mode, shape.quantization, shape.lora_r, shape.gradient_checkpointing) == ("lora", "4bit", 8, True)
    assert (shape.objective, shape.batch_size, shape.samples_per_prompt, shape.sequences) == ("grpo", 4, 4, 16)
    assert (shape.train_rows, shape.micro_batch, shape.max_new_tokens) == (16, 4, 32)
    assert (shape.logprob_chunk_size, shape.optim) == (64, "adamw_bnb_8bit")
    assert RunShape.of(model_config, config, batch_size=2).sequences == 8  # overrides win


@pytest.mark.parametrize("settings, message", [
    (dict(mode="full", quantization="4bit"), "mode 'full' trains every weight"),
    (dict(adapter_dtype="compute", dtype="float16"), "adapter_dtype compute with a float16 base"),
    (dict(generation_backend="vllm", fusion=True), "fusion and generation_backend vllm"),
    (dict(generation_backend="vllm", mode="full"), "mode full has none"),
    (dict(objective="grpo", num_samples_per_prompt=1), "num_samples_per_prompt must be at least 2"),
    (dict(batch_size=3, minibatch_size=2), "must be a multiple of minibatch_size"),
])
def test_each_rule_is_one_function_every_description_calls(settings, message):
    with pytest.raises(ValueError, match=message):
        RunShape(**settings)
    model_keys = {k: v for k, v in settings.items() if k in HydraModelConfig.__dataclass_fields__}
    run_keys = {k: v for k, v in settings.items() if k in RLConfig.__dataclass_fields__}
    with pytest.raises(ValueError, match=message):  # the same rule, from the recipes' configs
        RunShape.of(HydraModelConfig(**{k: v for k, v in model_keys.items() if k != "mode" or v != "full"}),
                    RLConfig(**{k: v for k, v in run_keys.items() if k not in ("fusion", "generation_backend")}),
                    **settings)


def test_a_model_config_alone_refuses_what_it_can_tell():
    with pytest.raises(ValueError, match="mode 'full' trains every weight"):
        HydraModelConfig(mode="full", quantization="8bit")
    with pytest.raises(ValueError, match="adapter_dtype compute with a float16 base"):
        ModelConfig(adapter_dtype="compute", dtype="fp16")


@pytest.mark.parametrize("settings, message", [
    (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights has 2 values for 1 reward_funcs"),
    (dict(reward_head_weight=0), "reward_head_weight is 0 and no other reward source is given"),
    (dict(reward_funcs=["accuracy"], reward_model_quantization="3bit"), "Unknown reward_model_quantization '3bit'"),
    (dict(reward_funcs=["accuracy"], overlong_buffer=0), "overlong_buffer must be at least 1"),
    (dict(reward_head_weight=-1), "reward_head_weight must be >= 0"),
])
def test_bad_reward_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**settings)
    assert RLConfig(reward_funcs=["accuracy"]).head_weight == 0 and RLConfig().head_weight == 1  # the defaults


@pytest.mark.parametrize("types", [(HydraModelConfig, RLConfig), (ModelConfig, SFTConfig)], ids=["ppo.py", "sft.py"])
def test_the_recipes_help_lists_every_key(types):
    """`recipes/ppo.py --help` and `recipes/sft.py --help`: argparse %-formats each key's help, so a lone % in one
    breaks the whole listing."""
    from trl import TrlParser

    text = TrlParser(types).format_help()
    keys = [field.name for config in types for field in dataclasses.fields(config) if field.init]
    assert [key for key in keys if f"--{key} " not in text and f"--{key}\n" not in text] == []
    assert ("10% kept free" in text) == (RLConfig in types)  # levers' help, with its % once
