"""Reward sources beyond the head: resolving specs, TRL's calling convention, the built-ins, the weighted
combination and the external reward model (a tiny random sequence classifier)."""

import math
import pickle

import numpy as np
import pytest
import torch

from hydra_rlhf.rewards import (ExternalRewardModel, RewardSources, call_reward_function, check_columns, describe,
                                resolve_reward_function, resolve_reward_functions, unique_names)

PROMPTS_TEXT = ["What is 5+7?", "What is 6+7?"]
PROMPTS_CHAT = [[{"role": "user", "content": p}] for p in PROMPTS_TEXT]
COMPLETIONS_TEXT = ["The answer is 12.", "I do not know."]
COMPLETIONS_CHAT = [[{"role": "assistant", "content": c}] for c in COMPLETIONS_TEXT]
IDS = [[1, 2, 3], [4, 5]]

USER_MODULE = """
def length_reward(completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def needs_answer(completions, answer, bonus=0.0):
    return [1.0 + bonus for _ in completions]

NOT_A_FUNCTION = 3
"""


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def fn_of(function, name=None):
    return describe(function, name or function.__name__)


# ------------------------------------------------------------------------------------------------ resolving


def test_each_spec_form_resolves(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    by_file = resolve_reward_function("my_rewards.py:length_reward")
    assert by_file.name == "length_reward" and by_file.takes_kwargs
    assert by_file.required == ("completions", "completion_ids")

    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = resolve_reward_function("my_rewards:needs_answer")
    assert by_module.parameters == ("completions", "answer", "bonus") and not by_module.takes_kwargs
    assert by_module.required == ("completions", "answer")

    builtin = resolve_reward_function("format", {"format_pattern": r"\d", "max_new_tokens": 8})
    assert builtin.name == "format" and builtin.function.__name__ == "format"
    assert call_reward_function(builtin, PROMPTS_TEXT, ["a 1", "none"], IDS, {}) == [1.0, 0.0]


def test_a_file_function_survives_pickling(tmp_path, monkeypatch):
    """The async generator process receives the sources pickled; a file's function is resolved again there."""
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    fn = unique_names([resolve_reward_function("my_rewards.py:length_reward")] * 2)[1]
    again = pickle.loads(pickle.dumps(fn))
    assert again.name == "length_reward_2"
    assert call_reward_function(again, PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {}) == [3.0, 2.0]
    overlong = pickle.loads(pickle.dumps(resolve_reward_function("overlong", {"max_new_tokens": 4,
                                                                              "overlong_buffer": 2})))
    assert call_reward_function(overlong, PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {}) == [-0.5, 0.0]


def test_unique_names_suffix_repeats():
    f = fn_of(lambda completions, **kw: [0.0] * len(completions), "f")
    g = fn_of(lambda completions, **kw: [1.0] * len(completions), "g")
    assert [x.name for x in unique_names([f, g, f, f])] == ["f", "g", "f_2", "f_3"]
    options = {"max_new_tokens": 8}
    assert [x.name for x in resolve_reward_functions(["format", "overlong", "format"], options)] == [
        "format", "overlong", "format_2"]


@pytest.mark.parametrize("spec, error_type, expected", [
    ("nonsense", ValueError, "reward_funcs 'nonsense': not a built-in (accuracy, format, overlong) and not of the "
                             "form"),
    ("missing_file.py:f", FileNotFoundError, "reward_funcs 'missing_file.py:f': file missing_file.py does not exist"),
    ("no_such_module_xyz:f", ValueError, "reward_funcs 'no_such_module_xyz:f': there is no module "
                                         "'no_such_module_xyz'"),
    ("my_rewards.py:absent", ValueError, "reward_funcs 'my_rewards.py:absent': my_rewards.py has no 'absent'"),
    ("my_rewards.py:NOT_A_FUNCTION", ValueError, "NOT_A_FUNCTION in my_rewards.py is a int, not a function"),
    ("broken.py:f", ValueError, "reward_funcs 'broken.py:f': importing broken.py failed: ModuleNotFoundError: "
                                "No module named 'numpyy_not_here'"),
    ("broken:f", ValueError, "reward_funcs 'broken:f': importing broken failed: ModuleNotFoundError: No module named "
                             "'numpyy_not_here'"),
])
def test_each_bad_spec_gives_one_line(spec, error_type, expected, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken.py").write_text("import numpyy_not_here\ndef f(completions, **kw): return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error_type) as error:
        resolve_reward_function(spec)
    assert expected in one_line(error)


def test_bad_builtin_options_are_refused_at_resolve_time():
    with pytest.raises(ValueError) as error:
        resolve_reward_function("overlong")
    assert "needs option max_new_tokens" in one_line(error)
    with pytest.raises(ValueError) as error:
        resolve_reward_function("overlong", {"max_new_tokens": 8, "overlong_buffer": 9})
    assert "overlong_buffer 9 must be an integer from 1 to max_new_tokens (8)" in one_line(error)
    with pytest.raises(ValueError) as error:
        resolve_reward_function("format", {"format_pattern": "(unclosed"})
    assert "is not a regular expression" in one_line(error)


# ------------------------------------------------------------------------------------------------ calling


@pytest.mark.parametrize("prompts, completions", [(PROMPTS_TEXT, COMPLETIONS_TEXT), (PROMPTS_CHAT, COMPLETIONS_CHAT)])
def test_inputs_reach_a_function_in_trl_shapes(prompts, completions):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, **kwargs)
        return [0.0] * len(prompts)

    columns = {"answer": ["12", "13"], "id": [0, 1], "prompt": ["left out", "as TRL does"]}
    call_reward_function(fn_of(spy), prompts, completions, IDS, columns)
    assert seen == {"prompts": prompts, "completions": completions, "completion_ids": IDS, "answer": ["12", "13"],
                    "id": [0, 1]}


def test_only_accepted_keywords_are_passed():
    def narrow(completion_ids):
        return [len(ids) for ids in completion_ids]

    columns = {"answer": ["1", "2"]}
    assert call_reward_function(fn_of(narrow), PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, columns) == [3.0, 2.0]


@pytest.mark.parametrize("result, expected", [
    ([1.0, 2.0, 3.0], "reward function 'f' returned 3 values for 2 completions"),
    ([1.0, "abc"], "reward function 'f' returned 'abc' (str) for row 1: return a number or None"),
    (1.0, "reward function 'f' returned a float: return a list with one number (or None) per completion"),
    (torch.zeros(2, 1), "reward function 'f' returned an array of shape (2, 1)"),
])
def test_a_bad_result_gives_one_line(result, expected):
    with pytest.raises(ValueError) as error:
        call_reward_function(fn_of(lambda **kw: result, "f"), PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {})
    assert one_line(error) == expected or one_line(error).startswith(expected)


def test_numbers_of_every_kind_and_none_pass_nan_and_inf_included():
    values = [True, np.float32(0.5), None, math.nan, -math.inf, 3, np.True_, np.int64(-2)]
    fn = fn_of(lambda completions, **kw: values, "f")
    out = call_reward_function(fn, ["p"] * 8, ["c"] * 8, [[1]] * 8, {})
    assert out[:3] == [1.0, 0.5, None] and math.isnan(out[3]) and out[4:] == [-math.inf, 3.0, 1.0, -2.0]
    arrays = [torch.tensor([1.0, 2.0]), np.array([1, 2])]
    for array in arrays:
        fn = fn_of(lambda **kw: array, "g")
        assert call_reward_function(fn, PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {}) == [1.0, 2.0]


def test_a_raising_function_is_named_and_its_error_chained():
    def f(completions, answer, **kwargs):
        return [{}["answer"] for _ in completions]

    with pytest.raises(ValueError) as error:
        call_reward_function(fn_of(f), PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {"answer": ["1", "2"]})
    assert one_line(error) == "reward function 'f' raised KeyError: 'answer'"
    assert isinstance(error.value.__cause__, KeyError)


def test_an_async_function_is_awaited():
    async def judged(completions, **kwargs):
        return [0.25 for _ in completions]

    assert call_reward_function(fn_of(judged), PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {}) == [0.25, 0.25]


def test_a_missing_column_is_one_line_before_training():
    def f(completions, answer, bonus=0.0, **kwargs):
        return [1.0] * len(completions)

    check_columns([fn_of(f)], ["prompt", "answer"])  # enough
    with pytest.raises(ValueError) as error:
        check_columns([fn_of(f)], ["prompt", "id"])
    assert one_line(error) == ("reward function 'f' takes column 'answer', which the prompts data lacks (its columns: "
                               "prompt, id); add the column or give the parameter a default")


# ------------------------------------------------------------------------------------------------ built-ins


def test_accuracy_through_math_verify():
    accuracy = resolve_reward_function("accuracy")
    completions = [[{"role": "assistant", "content": "The answer is 12."}]] * 3
    columns = {"answer": ["12", "13", "no number here"]}
    assert call_reward_function(accuracy, ["p"] * 3, completions, [[1]] * 3, columns) == [1.0, 0.0, None]
    assert call_reward_function(accuracy, ["p"], [r"so \boxed{\frac{1}{2}}"], [[1]], {"answer": ["0.5"]}) == [1.0]


def test_format_default_pattern_and_overlong_by_hand():
    fmt = resolve_reward_function("format")
    texts = ["So the answer is 42.", "Answer: -3.5", "answer 42", "I think it is 42"]
    assert call_reward_function(fmt, ["p"] * 4, texts, [[1]] * 4, {}) == [1.0, 1.0, 0.0, 0.0]
    # max 10, buffer 4: 0 up to 6 tokens, then (6 - n) / 4 down to -1 at 10, -1 beyond.
    overlong = resolve_reward_function("overlong", {"max_new_tokens": 10, "overlong_buffer": 4})
    ids = [[0] * n for n in (5, 6, 7, 8, 10, 12)]
    assert call_reward_function(overlong, ["p"] * 6, ["c"] * 6, ids, {}) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


# ------------------------------------------------------------------------------------------------ combining


def test_nansum_weighting_by_hand():
    a = fn_of(lambda **kw: [1.0, None], "a")
    b = fn_of(lambda **kw: [0.0, 2.0], "b")
    sources = RewardSources([a, b], weights=[1.0, 0.5])
    combined, per_source = sources.score(None, ["p", "q"], ["c", "d"], [[1], [2]], {})
    assert combined.tolist() == [1.0, 1.0]
    assert torch.isnan(per_source["a"][1]) and per_source["b"].tolist() == [0.0, 2.0]
    metrics = sources.metrics(per_source)
    assert metrics["reward/a/mean"] == 1.0 and metrics["reward/a/std"] == 0.0
    assert metrics["reward/b/mean"] == 1.0 and metrics["reward/b/std"] == pytest.approx(math.sqrt(2))
    assert metrics["reward/none_applied"] == 0.0


def test_head_combines_and_an_unscored_row_scores_zero_and_is_counted():
    gold = fn_of(lambda **kw: [1.0, None, None], "gold")
    sources = RewardSources([gold], weights=[2.0], head_weight=0.5)
    assert sources.needs_head and sources.names == ["head", "gold"]
    head = torch.tensor([2.0, 6.0, 4.0])
    combined, per_source = sources.score(head, ["p"] * 3, ["c"] * 3, [[1]] * 3, {})
    assert combined.tolist() == [3.0, 3.0, 2.0]  # where gold gave None, the head's share stands alone
    assert set(per_source) == {"head", "gold"}
    assert sources.metrics(per_source)["reward/none_applied"] == 0.0
    alone = RewardSources([gold], weights=[2.0])  # no head: a row no source applies to scores 0, counted
    combined, per_source = alone.score(None, ["p"] * 3, ["c"] * 3, [[1]] * 3, {})
    assert combined.tolist() == [2.0, 0.0, 0.0] and alone.metrics(per_source)["reward/none_applied"] == 2.0


def test_a_non_finite_value_is_not_a_none_it_reaches_the_guard():
    # None: the source does not apply. NaN or inf: something went wrong, and the trainer's non-finite guard must see
    # it (skip the update, count it) rather than a silently smaller reward.
    broken = fn_of(lambda **kw: [math.nan, 1.0, math.inf], "broken")
    combined, _ = RewardSources([broken], head_weight=1.0).score(torch.tensor([1.0, 1.0, 1.0]), ["p"] * 3,
                                                                  ["c"] * 3, [[1]] * 3, {})
    assert math.isnan(combined[0]) and combined[1] == 2.0 and math.isinf(combined[2])


def test_a_zero_weight_is_never_computed_and_the_head_never_read():
    def boom(**kwargs):
        raise AssertionError("a weight-0 function was called")

    sources = RewardSources([fn_of(boom), fn_of(lambda **kw: [1.0, 1.0], "one")], weights=[0.0, 1.0], head_weight=0.0)
    assert not sources.needs_head
    unusable_head = torch.full((7,), math.nan)  # wrong shape and NaN: reading it would fail or poison the sum
    combined, per_source = sources.score(unusable_head, ["p", "q"], ["c", "d"], [[1], [2]], {})
    assert combined.tolist() == [1.0, 1.0] and list(per_source) == ["one"]


def test_weights_are_validated():
    f = fn_of(lambda **kw: [1.0], "f")
    with pytest.raises(ValueError) as error:
        RewardSources([f], weights=[1.0, 2.0])
    assert "reward_weights has 2 values for 1 reward functions" in one_line(error)
    with pytest.raises(ValueError) as error:
        RewardSources([f], weights=[math.inf])
    assert "the weight of reward source 'f' is inf" in one_line(error)
    with pytest.raises(ValueError) as error:
        RewardSources([f, f])
    assert "share the name 'f'" in one_line(error)
    with pytest.raises(ValueError) as error:
        RewardSources([f], weights=[0.0])
    assert "every reward source has weight 0" in one_line(error)
    with pytest.raises(ValueError) as error:
        RewardSources([], head_weight=1.0).score(None, ["p"], ["c"], [[1]], {})
    assert "needs its scores, shape (1,)" in one_line(error)


# ------------------------------------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, tiny_model):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # hidden 64: bitsandbytes quantizes in blocks of 64
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("reward_model")
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_external_model_scores_the_same_in_any_batch_size(tiny_reward_model):
    prompts = PROMPTS_CHAT * 2
    completions = [[{"role": "assistant", "content": t}] for t in ["Twelve.", "The answer is 13, I am quite sure.",
                                                                     "12", "Let me think about it for a while."]]
    model = ExternalRewardModel(str(tiny_reward_model), "cpu", batch_size=1)
    one_by_one = model(prompts, completions)
    model.batch_size = 4
    together = model(prompts, completions)
    assert len(together) == 4 and all(isinstance(s, float) and math.isfinite(s) for s in together)
    assert together == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(s, 6) for s in together)) > 1  # it reads the text
    assert model.memory_bytes() == sum(p.numel() * 4 for p in model.model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.model.buffers())
    assert not any(p.requires_grad for p in model.model.parameters()) and not model.model.training


def test_external_model_texts(tiny_reward_model):
    model = ExternalRewardModel(str(tiny_reward_model), "cpu")
    chat = model.texts(PROMPTS_CHAT[:1], COMPLETIONS_CHAT[:1])[0]
    assert chat == model.tokenizer.apply_chat_template(PROMPTS_CHAT[0] + COMPLETIONS_CHAT[0], tokenize=False)
    assert model.texts(PROMPTS_TEXT[:1], COMPLETIONS_TEXT[:1]) == ["What is 5+7?The answer is 12."]
    model.tokenizer.chat_template = None
    assert model.texts(PROMPTS_CHAT[:1], COMPLETIONS_TEXT[:1]) == ["What is 5+7?\nThe answer is 12."]


def test_external_model_combines_with_functions(tiny_reward_model):
    model = ExternalRewardModel(str(tiny_reward_model), "cpu")
    sources = RewardSources([resolve_reward_function("format")], reward_model=model, reward_model_weight=2.0)
    combined, per_source = sources.score(None, PROMPTS_TEXT, COMPLETIONS_TEXT, IDS, {})
    expected = per_source["format"] + 2.0 * per_source["reward_model"]
    assert torch.allclose(combined, expected) and per_source["format"].tolist() == [1.0, 0.0]
    assert sources.reward_model is model and sources.names == ["format", "reward_model"]


def test_external_model_refuses_several_labels_and_missing_paths(tmp_path, tiny_model):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        ExternalRewardModel(str(tmp_path), "cpu")
    assert "has 2 labels (num_labels); a reward model gives one score" in one_line(error)
    with pytest.raises(FileNotFoundError) as error:
        ExternalRewardModel(str(tmp_path / "nothing" / "here"), "cpu")
    assert "no such directory" in one_line(error)


def test_a_trl_reward_function_works_unchanged():
    accuracy = resolve_reward_function("trl.rewards:accuracy_reward")
    completions = [[{"role": "assistant", "content": r"\boxed{12}"}]] * 2
    assert call_reward_function(accuracy, PROMPTS_CHAT, completions, IDS, {"solution": ["12", "13"]}) == [1.0, 0.0]


def test_external_model_loads_in_4bit(tiny_reward_model):
    full = ExternalRewardModel(str(tiny_reward_model), "cpu")
    small = ExternalRewardModel(str(tiny_reward_model), "cpu", quantization="4bit")
    scores = small(PROMPTS_TEXT, COMPLETIONS_TEXT)
    assert all(math.isfinite(s) for s in scores) and small.memory_bytes() < full.memory_bytes()
