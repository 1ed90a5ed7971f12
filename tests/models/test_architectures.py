"""Every row of `utils.architectures.ARCHITECTURES`, end to end, on a tiny random model of its family.

The tests are parametrized over the table itself, so a row without a tiny configuration
(`tests.conftest.TINY_CONFIGS`) or without a reference written here (`FAMILIES`) fails. For each family,
on a 2-block model whose parameters are all perturbed (norms too) and whose first block's FFN is silenced
(all its parameters zero, so that block adds nothing after attention):

(a) the hidden state the memory reads (`utils.hidden_state.HiddenStateHook` at block 0, and by default at
    the last block) equals the FFN input recomputed here from the block's input and output
    (``output_hidden_states``, the final norm's input) and its own norms, as the family's block is written;
(b) `MemoryConfig.from_base` reads the sizes off the base (width, bias, norm epsilon, gated or not, as its
    modules have them), is sized like the base, and the built network has the counted parameters;
(c) `JointLM.log_probs` equals the interpolation written out in float64 from the family's own forward
    (its final soft-capping included) and the memory run on (a)'s reference;
(d) the memory survives save and load, and ``--init_lm_head`` copies the final norm so that a memory whose
    FFNs are silenced reproduces the base's logits from the final norm's input;
(e) greedy ``generate`` with the memory attached equals a step-by-step argmax of (c);
(f) ``python -m models.convert --to official`` writes the families the released code has and refuses the
    others in one line.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import CONFIG_MAPPING

from models import MEMORY_STYLES, MemoryConfig, build_memory, init_lm_head_from_base, load_memory, parameter_count
from models.configuration_mlp_memory import block_parameters
from models.convert import main as convert
from models.joint import JointLM
from models.memory_directory import save_memory
from models.training.modes import base_parameter_count
from tests.conftest import REPO, TINY_CONFIGS, tiny_model
from utils.architectures import ARCHITECTURES
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook
from utils.modeling import model_fingerprint

VOCAB = 64
LMBDA = 0.4
NEW = 4
ROWS = sorted(ARCHITECTURES)


def post_attention_norm(block, block_input, block_output):
    return block.post_attention_layernorm(block_output)


# How each family's block is written (transformers 5.24), for a block whose FFN adds nothing: its blocks, the
# FFN's input from the block's input and output, and the norm before the LM head.
FAMILIES = {
    "gpt2": (lambda m: m.transformer.h, lambda block, x, y: block.ln_2(y), lambda m: m.transformer.ln_f),
    "llama": (lambda m: m.model.layers, post_attention_norm, lambda m: m.model.norm),
    "mistral": (lambda m: m.model.layers, post_attention_norm, lambda m: m.model.norm),
    "qwen2": (lambda m: m.model.layers, post_attention_norm, lambda m: m.model.norm),
    "qwen3": (lambda m: m.model.layers, post_attention_norm, lambda m: m.model.norm),
    "phi3": (lambda m: m.model.layers, post_attention_norm, lambda m: m.model.norm),
    # post-norm: x + post_attention_layernorm(attn(x)) goes into the FFN as it is
    "olmo2": (lambda m: m.model.layers, lambda block, x, y: y, lambda m: m.model.norm),
    # a norm before and after each sub-layer: the FFN reads pre_feedforward_layernorm of the residual
    "gemma2": (lambda m: m.model.layers, lambda block, x, y: block.pre_feedforward_layernorm(y),
               lambda m: m.model.norm),
    "gemma3_text": (lambda m: m.model.layers, lambda block, x, y: block.pre_feedforward_layernorm(y),
                    lambda m: m.model.norm),
    # parallel residual (the default): attention and FFN both read the block's input
    "gpt_neox": (lambda m: m.gpt_neox.layers, lambda block, x, y: block.post_attention_layernorm(x),
                 lambda m: m.gpt_neox.final_layer_norm),
}


def family_model(model_type: str, silenced: int = 0, **overrides):
    """A tiny model of the family: every parameter perturbed, block ``silenced``'s FFN silenced, no end-of-text id."""
    model = tiny_model(model_type, VOCAB, **overrides)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
        for p in FAMILIES[model_type][0](model)[silenced].mlp.parameters():
            p.zero_()
    model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_memory(model, seed: int = 0):
    """A one-block memory reading block 0, random and far from the base so that the mixture matters."""
    config = MemoryConfig.from_base(model.config, num_layers=1, layer=0,
                                    base_model_fingerprint=model_fingerprint(model, 0))
    torch.manual_seed(seed)
    memory = build_memory(config).eval()
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.3)
    return memory


@pytest.fixture(scope="module", params=ROWS)
def family(request):
    model = family_model(request.param)
    return request.param, model, tiny_memory(model)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_key(model_type: str, model, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN input of block 0 recomputed from the block's input and output, and the model's logits."""
    blocks, ffn_input, _ = FAMILIES[model_type]
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    block_input, block_output = out.hidden_states[0], out.hidden_states[1]  # (B, T, d) each
    return ffn_input(blocks(model)[0], block_input, block_output), out.logits


@torch.no_grad()
def independent_joint(model_type: str, model, memory, input_ids) -> torch.Tensor:
    """log((1 - lmbda) p_lm + lmbda p_mem) in float64, from the family's forward and the memory on the reference."""
    key, logits = reference_key(model_type, model, input_ids)
    lm = torch.log_softmax(logits.double(), dim=-1)
    mem = torch.log_softmax(memory(key).double(), dim=-1)  # default temperature 1
    return torch.logaddexp(lm + math.log(1 - LMBDA), mem + math.log(LMBDA))


def test_every_row_has_a_tiny_config_a_reference_and_a_style():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES), "add a tiny config to tests/conftest.py::TINY_CONFIGS"
    assert set(FAMILIES) == set(ARCHITECTURES), "write the family's block in FAMILIES above"
    assert {spec.memory_style for spec in ARCHITECTURES.values()} <= set(MEMORY_STYLES)


def test_readme_lists_every_family_as_the_table_has_it():
    """README's "Supported model families": every row, with its memory style and whether it has a released form."""
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[1].strip("`") in ARCHITECTURES:
            rows[cells[1].strip("`")] = cells
    assert set(rows) == set(ARCHITECTURES), "README's table of families differs from utils/architectures.py"
    for model_type, (family, _, _, style, released) in rows.items():
        layout = MEMORY_STYLES[ARCHITECTURES[model_type].memory_style].released
        assert (family, style) == (ARCHITECTURES[model_type].family, ARCHITECTURES[model_type].memory_style)
        assert released == ("yes" if layout is not None and layout.model_type == model_type else "no"), model_type


def test_a_the_hooked_key_is_the_ffn_input(family):
    model_type, model, _ = family
    ids = prompt(7, 1)
    expected, _ = reference_key(model_type, model, ids)
    with torch.no_grad(), HiddenStateHook(model, layer=0) as hook:
        model(input_ids=ids, use_cache=False)
        key = hook.hidden.clone()
    assert key.shape == (1, 7, model.config.hidden_size)
    torch.testing.assert_close(key, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ROWS)
def test_a_the_last_block_is_read_by_default(model_type):
    """The last block's output is not among ``hidden_states`` (the last one is after the final norm): it is the
    final norm's input."""
    model = family_model(model_type, silenced=-1)
    blocks, ffn_input, final = FAMILIES[model_type]
    captured = {}
    handle = final(model).register_forward_pre_hook(lambda module, args: captured.update(output=args[0]))
    with torch.no_grad(), HiddenStateHook(model) as hook:
        out = model(input_ids=prompt(6, 6), output_hidden_states=True)
        key = hook.hidden.clone()
    handle.remove()
    expected = ffn_input(blocks(model)[-1], out.hidden_states[-2], captured["output"])
    torch.testing.assert_close(key, expected, rtol=1e-5, atol=1e-5)


def test_a_gpt_neox_without_parallel_residual_reads_the_residual_after_attention():
    model = family_model("gpt_neox", use_parallel_residual=False)
    ids = prompt(6, 2)
    with torch.no_grad(), HiddenStateHook(model, layer=0) as hook:
        out = model(input_ids=ids, output_hidden_states=True)
        key = hook.hidden.clone()
    torch.testing.assert_close(key, model.gpt_neox.layers[0].post_attention_layernorm(out.hidden_states[1]))


def test_b_from_base_reads_the_sizes_off_the_base(family):
    model_type, model, _ = family
    blocks, _, final = FAMILIES[model_type]
    ffn, norm, d = blocks(model)[1].mlp, final(model), model.config.hidden_size  # block 0's FFN is silenced
    base_parameters = base_parameter_count(model.config)
    config = MemoryConfig.from_base(model.config, base_parameters=base_parameters)
    assert (config.hidden_size, config.vocab_size, config.base_architecture) == (d, VOCAB, model_type)
    assert config.memory_style == ARCHITECTURES[model_type].memory_style
    assert config.norm_eps == getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    widths = {size for p in ffn.parameters() if p.dim() == 2 for size in p.shape if size != d}  # Phi-3: I and 2I
    assert config.intermediate_size == min(widths)
    assert config.ffn_bias == any(name.endswith("bias") for name, _ in ffn.named_parameters())
    memory = build_memory(config)
    assert hasattr(memory.blocks[0].ffn, "gate") == any("gate" in name for name, _ in ffn.named_parameters())
    assert memory.num_parameters() == parameter_count(config)
    assert abs(parameter_count(config) - base_parameters) <= block_parameters(config) // 2 + 1


def test_c_joint_log_probs_equal_the_interpolation_written_out(family):
    model_type, model, memory = family
    ids = prompt(9, 3)
    cap = getattr(model.config, "final_logit_softcapping", None)
    got = JointLM(model, memory, lmbda=LMBDA).log_probs(ids)
    assert getattr(model.config, "final_logit_softcapping", None) == cap  # given back after the mix took it
    torch.testing.assert_close(got.double(), independent_joint(model_type, model, memory, ids), rtol=1e-5, atol=1e-5)


def test_d_save_load_and_init_lm_head(family, tmp_path):
    model_type, model, memory = family
    save_memory(tmp_path / "memory", memory, {}, {"layer": 0})
    loaded = load_memory(tmp_path / "memory")
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        assert type(loaded) is type(memory) and torch.equal(loaded(x), memory(x))

    head_initialised = build_memory(MemoryConfig.from_base(model.config, num_layers=1)).eval()
    init_lm_head_from_base(head_initialised, model)
    with torch.no_grad():
        for p in head_initialised.blocks[0].ffn.parameters():
            p.zero_()  # the blocks add nothing: the memory is the base's final norm and head
    final = FAMILIES[model_type][2](model)
    captured = {}
    handle = final.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    ids = prompt(5, 4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        handle.remove()
        got = head_initialised(captured["h"])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        got = torch.tanh(got / cap) * cap
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)


def test_e_greedy_generation_is_the_argmax_of_the_joint_distribution(family):
    model_type, model, memory = family
    ids = prompt(5, 5)
    expected = ids
    for _ in range(NEW):
        next_id = independent_joint(model_type, model, memory, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], dim=-1)
    got = JointLM(model, memory, lmbda=LMBDA).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type", ROWS)
def test_f_to_official_writes_the_released_families_and_refuses_the_others(model_type, tmp_path, capfd):
    model = family_model(model_type)
    model.save_pretrained(tmp_path / "base")
    memory = tiny_memory(model)
    memory.config.base_model = {"model_name_or_path": str(tmp_path / "base")}
    save_memory(tmp_path / "memory", memory, {}, {"layer": 0})
    args = ["--to", "official", "--input", str(tmp_path / "memory"), "--output", str(tmp_path / "official")]
    released = MEMORY_STYLES[ARCHITECTURES[model_type].memory_style].released
    if released is None or released.model_type != model_type:
        with pytest.raises(UsageError, match=re.escape(f"({model_type}), for which the released implementation has "
                                                       "no memory")) as refused:
            convert(args)
        assert "\n" not in str(refused.value) and not (tmp_path / "official").exists()
        return
    capfd.readouterr()
    assert convert(args) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "WARNING" in line and "--to official" in line]
    assert len(warnings) == 1  # the memory reads block 0 of 2
    assert "run it at the last block, silently giving wrong results" in warnings[0]
    back = tmp_path / "back"
    convert(["--from", "official", "--input", str(tmp_path / "official"), "--output", str(back),
             "--base_model", str(tmp_path / "base")])
    x = torch.randn(2, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(load_memory(back)(x), memory(x))


def test_multimodal_gemma3_is_refused_with_the_reason():
    with pytest.raises(UsageError, match="multimodal Gemma 3.*gemma3_text"):
        MemoryConfig.from_base(CONFIG_MAPPING["gemma3"](), num_layers=1)
