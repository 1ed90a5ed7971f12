"""models/official.py: released memory directories built from the released key names and shapes, read by load_memory
and converted both ways by `python -m models.convert`, against a forward written here from the released definition."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, AutoTokenizer

import evaluate_joint
from models import MemoryConfig, build_memory, load_memory
from models.convert import main as convert
from models.joint import JointLM
from models.memory_directory import save_memory
from tests.conftest import tiny_model
from utils.cli import UsageError
from utils.io import ArtifactError, read_json
from utils.modeling import model_fingerprint, tokenizer_fingerprint

DEPTH = 3  # blocks of the released memories built here (the tiny bases have 2)

# ---------------------------------------------------------------------------------------------------
# The released definition, written from models/mlpGPT2.py, mlpLlama.py, mlpMistral.py of github.com/Binn0/MLPMemory


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def conv1d(x, state, name):  # transformers' Conv1D: weight [in, out]
    return x @ state[f"{name}.weight"] + state[f"{name}.bias"]


def linear(x, state, name):  # nn.Linear: weight [out, in]
    out = x @ state[f"{name}.weight"].T
    return out + state[f"{name}.bias"] if f"{name}.bias" in state else out


def layer_norm(x, state, name, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * state[f"{name}.weight"] + state[f"{name}.bias"]


def rms_norm(x, state, name, eps):
    return state[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def released_forward(config: dict, state: dict, x: torch.Tensor) -> torch.Tensor:
    """GPT2MLPModel / LlamaMLPModel / MistralMLPModel.forward(inputs_embeds=x)."""
    if config["model_type"] == "gpt2":
        eps = config["layer_norm_epsilon"]
        for i in range(config["n_layer"]):
            h = layer_norm(x.float(), state, f"h.{i}.ln_1", eps)
            x = x + conv1d(gelu_new(conv1d(h, state, f"h.{i}.mlp.c_fc")), state, f"h.{i}.mlp.c_proj")
        return layer_norm(x, state, "ln_f", eps) @ state["lm_head.weight"].T
    eps = config["rms_norm_eps"]
    for i in range(config["num_hidden_layers"]):
        n = rms_norm(x, state, f"layers.{i}.input_layernorm", eps)
        gate = linear(n, state, f"layers.{i}.mlp.gate_proj")
        x = x + linear(gate * torch.sigmoid(gate) * linear(n, state, f"layers.{i}.mlp.up_proj"), state,
                       f"layers.{i}.mlp.down_proj")
    return rms_norm(x, state, "norm", eps) @ state["lm_head.weight"].T


def released_state(model_type: str, d: int, vocab: int, depth: int, inner: int, bias: bool, seed: int = 0) -> dict:
    """Random tensors under the released names and shapes (norm weights and biases random too)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    state = {}
    for i in range(depth):
        if model_type == "gpt2":
            state |= {f"h.{i}.ln_1.weight": 1 + r(d), f"h.{i}.ln_1.bias": r(d),
                      f"h.{i}.mlp.c_fc.weight": r(d, 4 * d), f"h.{i}.mlp.c_fc.bias": r(4 * d),
                      f"h.{i}.mlp.c_proj.weight": r(4 * d, d), f"h.{i}.mlp.c_proj.bias": r(d)}
            continue
        state |= {f"layers.{i}.input_layernorm.weight": 1 + r(d), f"layers.{i}.mlp.gate_proj.weight": r(inner, d),
                  f"layers.{i}.mlp.up_proj.weight": r(inner, d), f"layers.{i}.mlp.down_proj.weight": r(d, inner)}
        if bias:
            state |= {f"layers.{i}.mlp.gate_proj.bias": r(inner), f"layers.{i}.mlp.up_proj.bias": r(inner),
                      f"layers.{i}.mlp.down_proj.bias": r(d)}
    final = {"ln_f.weight": 1 + r(d), "ln_f.bias": r(d)} if model_type == "gpt2" else {"norm.weight": 1 + r(d)}
    return state | final | {"lm_head.weight": r(vocab, d)}


def write_released(directory, base_config, state: dict, weights: str = "safetensors", prefixed: bool = False) -> dict:
    """A released memory directory: the base's config with only the depth changed, and the tensors as
    ``model.safetensors`` / ``pytorch_model.bin`` / two safetensors shards with an index; ``prefixed``: as
    accelerate's save_state of a whole MLPMemory (knn_generator. + base_lm. keys)."""
    directory.mkdir(parents=True)
    config = AutoConfig.for_model(**{**base_config.to_dict(), "n_layer" if base_config.model_type == "gpt2"
                                     else "num_hidden_layers": DEPTH})
    config.save_pretrained(directory)
    if prefixed:
        state = {**{f"knn_generator.{k}": v for k, v in state.items()}, "base_lm.lm_head.weight": torch.zeros(3, 2)}
    if weights == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif weights == "sharded":
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, keys in shards.items():
            save_file({k: state[k].contiguous() for k in keys}, directory / shard)
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(state, directory / "model.safetensors")
    return json.loads((directory / "config.json").read_text())


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_tokenizer_dir):
    """A saved tiny base model of each kind, with the tiny tokenizer beside it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    root = tmp_path_factory.mktemp("bases")
    kinds = {"gpt2": ("gpt2", {"n_inner": 40}),  # the released width is 4 * n_embd whatever n_inner says
             "llama": ("llama", {}), "llama_bias": ("llama", {"mlp_bias": True}), "mistral": ("mistral", {})}
    found = {}
    for kind, (model_type, overrides) in kinds.items():
        tiny_model(model_type, len(tokenizer), **overrides).save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        found[kind] = root / kind
    return found


def released_for(bases, kind: str, directory, weights="safetensors", prefixed=False, seed=0) -> tuple[dict, dict]:
    base_config = AutoConfig.from_pretrained(bases[kind])
    inner = getattr(base_config, "intermediate_size", None)
    state = released_state(base_config.model_type, base_config.hidden_size, base_config.vocab_size, DEPTH, inner,
                           bool(getattr(base_config, "mlp_bias", False)), seed)
    return write_released(directory, base_config, state, weights, prefixed), state


CASES = [("gpt2", "safetensors", False), ("gpt2", "bin", True), ("llama", "safetensors", False),
         ("llama_bias", "bin", False), ("llama_bias", "sharded", True), ("mistral", "safetensors", True)]


@pytest.mark.parametrize("kind, weights, prefixed", CASES)
def test_load_memory_reads_released_layouts(bases, tmp_path, caplog, kind, weights, prefixed):
    config, state = released_for(bases, kind, tmp_path / "released", weights, prefixed)
    with caplog.at_level(logging.INFO, logger="models.official"):
        memory = load_memory(tmp_path / "released")
    assert f"Recognised the released {config['model_type']} memory layout" in caplog.text
    d = memory.config.hidden_size
    assert memory.config.memory_style == config["model_type"] and memory.config.released_layout == config["model_type"]
    assert memory.config.num_layers == DEPTH
    assert memory.config.intermediate_size == (4 * d if kind == "gpt2" else config["intermediate_size"])
    assert memory.config.ffn_bias == (kind in ("gpt2", "llama_bias"))
    assert (memory.config.base_model, memory.config.base_model_fingerprint, memory.config.layer) == (None, None, None)
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        torch.testing.assert_close(memory(x), released_forward(config, state, x), rtol=1e-5, atol=1e-5)


def test_released_memory_runs_with_its_base_and_warns_it_cannot_be_verified(bases, tmp_path, caplog):
    released_for(bases, "gpt2", tmp_path / "released")
    base = AutoModelForCausalLM.from_pretrained(bases["gpt2"]).eval()
    with caplog.at_level(logging.WARNING):
        joint = JointLM(base, load_memory(tmp_path / "released"), lmbda=0.25)
    assert joint.base_check["matches"] is None and joint.base_check["recorded_fingerprint"] is None
    assert "released gpt2 memory read from the official layout" in caplog.text
    assert "does not record its layer: reading the last block" in caplog.text
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.allclose(joint.log_probs(ids).exp().sum(-1), torch.ones(1, 4))


@pytest.mark.parametrize("kind, weights, prefixed", [CASES[1], CASES[4]])
def test_convert_from_official_records_the_base(bases, tmp_path, kind, weights, prefixed):
    config, state = released_for(bases, kind, tmp_path / "released", weights, prefixed)
    out = tmp_path / "ours"
    assert convert(["--from", "official", "--input", str(tmp_path / "released"), "--output", str(out),
                    "--base_model", str(bases[kind])]) == 0
    meta = read_json(out / "meta.json")
    assert meta["kind"] == "mlp_memory" and meta["converted_from"]["layout"] == config["model_type"]
    assert {"config.json", "model.safetensors"} <= set(meta["checksums"])
    memory = load_memory(out)  # verifies the checksums
    base = AutoModelForCausalLM.from_pretrained(bases[kind])
    last = base.config.num_hidden_layers - 1
    assert memory.config.layer == meta["layer"] == last  # the released code reads the last block
    assert memory.config.base_model_fingerprint == model_fingerprint(base, last)
    assert memory.config.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(bases[kind]))
    assert memory.config.base_model["model_name_or_path"] == str(bases[kind])
    x = torch.randn(4, memory.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(memory(x), released_forward(config, state, x), rtol=1e-5, atol=1e-5)
        assert torch.equal(memory(x), load_memory(tmp_path / "released")(x))
    JointLM(base, memory, lmbda=0.25)  # its base checks pass


def test_layer_flag_and_output_rules(bases, tmp_path):
    released_for(bases, "llama", tmp_path / "released")
    args = ["--from", "official", "--input", str(tmp_path / "released"), "--base_model", str(bases["llama"])]
    out = tmp_path / "ours"
    convert([*args, "--output", str(out), "--layer", "0"])
    assert load_memory(out).config.layer == 0
    with pytest.raises(UsageError, match="--overwrite_output_dir"):
        convert([*args, "--output", str(out)])
    convert([*args, "--output", str(out), "--overwrite_output_dir"])
    assert load_memory(out).config.layer == 1 and not (tmp_path / "ours.partial").exists()
    with pytest.raises(UsageError, match="--layer 5 is out of range"):
        convert([*args, "--output", str(tmp_path / "other"), "--layer", "5"])
    assert not (tmp_path / "other").exists()
    with pytest.raises(UsageError, match="needs --base_model"):
        convert(["--from", "official", "--input", str(tmp_path / "released"), "--output", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="exactly one of --from official or --to official"):
        convert(["--input", str(tmp_path / "released"), "--output", str(tmp_path / "x")])
    with pytest.raises(UsageError, match="a gpt2 model .* released llama memory"):
        convert([*args[:4], "--base_model", str(bases["gpt2"]), "--output", str(tmp_path / "x")])


@pytest.mark.parametrize("kind, layer", [("gpt2", None), ("llama_bias", 0)])
def test_round_trip_ours_official_ours_is_bit_identical(bases, tmp_path, kind, layer):
    base = AutoModelForCausalLM.from_pretrained(bases[kind]).eval()
    last = base.config.num_hidden_layers - 1
    layer = last if layer is None else layer
    config = MemoryConfig.from_base(
        base.config, num_layers=2, layer=layer, base_model={"model_name_or_path": str(bases[kind])},
        tokenizer_fingerprint=tokenizer_fingerprint(AutoTokenizer.from_pretrained(bases[kind])),
        base_model_fingerprint=model_fingerprint(base, layer))
    torch.manual_seed(3)
    ours = build_memory(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    save_memory(tmp_path / "ours", ours, {}, {"base_model": config.base_model, "layer": layer})
    convert(["--to", "official", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "official")])

    released = json.loads((tmp_path / "official" / "config.json").read_text())
    expected = {**base.config.to_dict(), ("n_layer" if kind == "gpt2" else "num_hidden_layers"): 2}
    assert {k: released.get(k) for k in ("model_type", "architectures", "vocab_size", "n_layer", "num_hidden_layers",
                                         "intermediate_size", "mlp_bias")} == \
        {k: expected.get(k) for k in ("model_type", "architectures", "vocab_size", "n_layer", "num_hidden_layers",
                                      "intermediate_size", "mlp_bias")}
    state = load_file(tmp_path / "official" / "model.safetensors")
    d = config.hidden_size
    if kind == "gpt2":
        assert state["h.0.mlp.c_fc.weight"].shape == (d, 4 * d)  # Conv1D [in, out]
    else:
        assert "layers.1.mlp.down_proj.bias" in state
    layer_position = read_json(tmp_path / "official" / "mlp_memory_config.json")["layer_position"]
    assert layer_position == (-1 if layer == last else layer)
    x = torch.randn(3, d)
    with torch.no_grad():
        torch.testing.assert_close(released_forward(released, state, x), ours(x), rtol=1e-5, atol=1e-5)

    convert(["--from", "official", "--input", str(tmp_path / "official"), "--output", str(tmp_path / "back"),
             "--base_model", str(bases[kind])])
    back = load_memory(tmp_path / "back")
    assert type(back) is type(ours) and back.config.layer == layer
    assert back.config.base_model_fingerprint == config.base_model_fingerprint
    assert back.config.tokenizer_fingerprint == config.tokenizer_fingerprint
    assert ours.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))


def test_pickle_with_objects_is_refused_and_never_run(bases, tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return os.mkdir, (str(tmp_path / "executed"),)

    released_for(bases, "gpt2", tmp_path / "released", weights="bin")
    state = torch.load(tmp_path / "released" / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "extra": Payload()}, tmp_path / "released" / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="weights_only=True"):
        load_memory(tmp_path / "released")
    assert not (tmp_path / "executed").exists()


def test_unrecognised_directories_name_the_known_layouts(bases, tmp_path):
    with pytest.raises(UsageError, match="are not a released GPT2MLPModel memory .*h.{i}.ln_1.weight"):
        load_memory(bases["gpt2"])  # a base model, not a memory
    config, state = released_for(bases, "mistral", tmp_path / "biased")
    save_file({**state, "layers.0.mlp.up_proj.bias": torch.zeros(config["intermediate_size"])},
              tmp_path / "biased" / "model.safetensors")
    with pytest.raises(UsageError, match="unexpected layers.0.mlp.up_proj.bias"):
        load_memory(tmp_path / "biased")  # Mistral never has FFN biases
    (tmp_path / "bert").mkdir()
    CONFIG_MAPPING["bert"]().save_pretrained(tmp_path / "bert")
    with pytest.raises(UsageError, match="not an MLP memory; it reads .* released implementation's layouts: gpt2"):
        load_memory(tmp_path / "bert")
    with pytest.raises(UsageError, match="released implementation's layouts"):
        load_memory(tmp_path)  # no config.json


def test_evaluate_joint_takes_a_released_directory(bases, tmp_path, tiny_gpt2_dir, tiny_dataset):
    """--knn_generator_path accepts the released layout; its perplexity equals the converted memory's."""
    released_for({"gpt2": tiny_gpt2_dir}, "gpt2", tmp_path / "released")
    convert(["--from", "official", "--input", str(tmp_path / "released"), "--output", str(tmp_path / "ours"),
             "--base_model", str(tiny_gpt2_dir)])
    results = {}
    for name in ("released", "ours"):
        results[name] = evaluate_joint.main([
            "--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name", str(tiny_dataset), "--eval_subset", "test",
            "--max_eval_samples", "2", "--per_device_eval_batch_size", "2", "--lmbda", "0.25", "--report_to", "none",
            "--knn_generator_path", str(tmp_path / name), "--output_dir", str(tmp_path / f"eval_{name}")])
    joint = [key for key in results["ours"] if "perplexity" in key]
    assert joint and all(results["released"][key] == results["ours"][key] for key in joint)
    assert results["ours"]["base_check"]["matches"] is True and results["released"]["base_check"]["matches"] is None



def test_the_released_save_pretrained_layout_and_its_layer_position(bases, tmp_path):
    """MLPMemory.save_pretrained(DIR) writes DIR/knn_generator/ (a .bin) and DIR/mlp_memory_config.json."""
    config, state = released_for(bases, "mistral", tmp_path / "saved" / "knn_generator", weights="bin")
    (tmp_path / "saved" / "mlp_memory_config.json").write_text(json.dumps({"layer_position": 0, "is_train": False}))
    memory = load_memory(tmp_path / "saved")
    assert memory.config.layer == 0
    convert(["--from", "official", "--input", str(tmp_path / "saved"), "--output", str(tmp_path / "ours"),
             "--base_model", str(bases["mistral"])])
    assert load_memory(tmp_path / "ours").config.layer == 0
    x = torch.randn(2, memory.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(memory(x), released_forward(config, state, x), rtol=1e-5, atol=1e-5)


def test_inconsistent_shapes_and_a_mismatched_base_are_refused(bases, tmp_path):
    _, state = released_for(bases, "gpt2", tmp_path / "released")
    save_file({**state, "h.1.mlp.c_fc.weight": state["h.1.mlp.c_fc.weight"][:, :-1].contiguous()},
              tmp_path / "released" / "model.safetensors")
    with pytest.raises(ArtifactError, match="consistent shapes"):
        load_memory(tmp_path / "released")
    released_for(bases, "llama", tmp_path / "llama")
    convert(["--from", "official", "--input", str(tmp_path / "llama"), "--output", str(tmp_path / "ours"),
             "--base_model", str(bases["llama"])])
    with pytest.raises(UsageError, match="llama-style memory cannot be written as a released GPT2MLPModel"):
        convert(["--to", "official", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "official"),
                 "--base_model", str(bases["gpt2"])])
    with pytest.raises(UsageError, match="in the released layout already"):
        convert(["--to", "official", "--input", str(tmp_path / "llama"), "--output", str(tmp_path / "official")])
    assert not (tmp_path / "official").exists() and not (tmp_path / "official.partial").exists()
