"""Distributed serving without processes (docs/several-machines.md): the split plan, the refusals before loading,
the fixed-size control messages and the `parallel` setting."""

from __future__ import annotations

import pytest

from macprovider.core import config as cfg
from macprovider.core.cluster import parallel
from macprovider.core.errors import ConfigError
from macprovider.engine import distributed as dist

LLAMA_30 = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
}


def test_split_layers_equal_budgets_give_mlx_lm_even_split():
    assert parallel.split_layers(30, [1, 1]) == [15, 15]
    assert parallel.split_layers(4, [1, 1, 1]) == [2, 1, 1]  # the low stages take the extra layers
    assert parallel.split_layers(3, [5, 5, 5]) == [1, 1, 1]


def test_split_layers_follow_memory_budgets_with_one_layer_minimum():
    assert parallel.split_layers(32, [48, 16]) == [24, 8]
    assert parallel.split_layers(10, [100, 1]) == [9, 1]  # a tiny budget still gets a layer
    counts = parallel.split_layers(31, [24.0, 16.0, 8.0])
    assert sum(counts) == 31 and counts[0] > counts[1] > counts[2] >= 1


@pytest.mark.parametrize("layers, budgets", [(2, [1, 1, 1]), (4, []), (4, [1, 0])])
def test_split_layers_refuses_impossible_plans(layers, budgets):
    with pytest.raises(ValueError):
        parallel.split_layers(layers, budgets)


def test_check_split_refuses_tensor_on_nine_heads_and_names_pipeline():
    # SmolLM2-135M: 9 attention heads — the split mlx_lm.server dies on at the first request.
    with pytest.raises(ConfigError, match=r"9 attention heads are not divisible by 2; --parallel pipeline fits"):
        parallel.check_split(LLAMA_30, 2, "tensor", "SmolLM2")
    parallel.check_split(LLAMA_30, 2, "pipeline")
    parallel.check_split(LLAMA_30, 3, "tensor")  # 9 heads, 3 KV heads, 1536 wide: all divisible by 3


def test_check_split_pipeline_needs_a_layer_per_rank():
    config = {
        **LLAMA_30,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
    }
    with pytest.raises(ConfigError, match=r"2 layers cannot give each of 4 ranks a layer; --parallel tensor fits"):
        parallel.check_split(config, 4, "pipeline")
    with pytest.raises(ConfigError, match="no parallel mode fits"):
        parallel.check_split({**config, "num_key_value_heads": 1}, 4, "pipeline")


def test_check_split_reads_nested_text_config():
    nested = {"model_type": "vlm", "text_config": {"num_hidden_layers": 1}}
    with pytest.raises(ConfigError, match="1 layers cannot give each of 2 ranks"):
        parallel.check_split(nested, 2, "pipeline")


def test_control_messages_are_fixed_size_and_carry_long_prompts():
    prompt = list(range(1000, 1000 + 700))  # longer than one message's payload
    ops = (
        dist.InsertOp(7, 33, dist.SamplerSpec(0.7, 0.9, 2**64 - 1, 40), prompt).encode()
        + dist.RemoveOp([3, 5]).encode()
    )
    messages = dist.encode_control(ops, dist.ACTION_STEP)
    assert len(messages) == -(-len(ops) // dist.PAYLOAD_INTS) >= 3
    assert all(len(m) == dist.CONTROL_INTS for m in messages)
    assert [m[1] for m in messages] == [dist.ACTION_MORE] * (len(messages) - 1) + [dist.ACTION_STEP]
    stream = [x for m in messages for x in m[dist.HEADER_INTS : dist.HEADER_INTS + m[0]]]
    insert, remove = dist.decode_ops(stream)
    assert (insert.uid, insert.max_tokens, insert.prompt) == (7, 33, prompt)
    assert insert.sampler.seed == 2**64 - 1 and insert.sampler.top_p == pytest.approx(0.9)
    assert insert.sampler.temperature == pytest.approx(0.7) and insert.sampler.top_k == 40
    assert remove.uids == [3, 5]
    assert all(-(2**31) <= x < 2**31 for m in messages for x in m)  # every value fits the int32 message


def test_an_idle_step_is_one_message():
    (message,) = dist.encode_control([], dist.ACTION_IDLE)
    assert message[:2] == [0, dist.ACTION_IDLE] and len(message) == dist.CONTROL_INTS


def test_decode_refuses_an_unknown_op():
    with pytest.raises(ValueError, match="unknown control op 9"):
        dist.decode_ops([9, 1, 2])


def test_parallel_setting_resolves_and_rejects_unknown_modes(isolated_env):
    env = {"HOME": str(isolated_env)}
    assert cfg.resolve({"parallel": "Pipeline"}, env, ram_gb=16).settings.parallel == "pipeline"
    assert cfg.resolve({}, {**env, "MACPROVIDER_PARALLEL": "tensor"}, ram_gb=16).settings.parallel == "tensor"
    assert cfg.resolve({}, env, ram_gb=16).settings.parallel is None
    with pytest.raises(ConfigError, match=r"invalid parallel 'data' \(from cli\): must be pipeline or tensor"):
        cfg.resolve({"parallel": "data"}, env, ram_gb=16)
