"""Every checkpoint layout loads to identical logits; every broken checkpoint fails with one clear line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import midfill
from midfill.errors import MidfillError
from midfill.model.checkpoint import save_model
from tests.helpers import tiny_model

IDS = torch.tensor([[3, 101, 202, 303, 404, 1, 55, 66, 2]])


@pytest.fixture(scope="module")
def reference():
    model = tiny_model(seed=11)
    with torch.no_grad():
        return model, model(IDS)


def write_config(model, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def early_2023_layout(model) -> dict[str, torch.Tensor]:
    hd, hidden = model.config.head_dim, model.config.mlp_hidden
    out = {}
    for name, t in state(model).items():
        if name.endswith("attn.kv.weight"):
            stem = name.removesuffix("kv.weight")
            out[stem + "k.weight"], out[stem + "v.weight"] = t[:hd].clone(), t[hd:].clone()
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            out[stem + "linear_1.weight"], out[stem + "linear_3.weight"] = t[:hidden].clone(), t[hidden:].clone()
        else:
            out[name] = t
    return out


def write_safetensors(model, folder):
    save_model(model, folder)


def write_sharded_safetensors(model, folder):
    write_config(model, folder)
    names = list(state(model))
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: state(model)[n] for n in shard_names}, str(folder / shard))
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_torch_bin(model, folder):
    write_config(model, folder)
    torch.save(state(model), folder / "pytorch_model.bin")


def write_early_2023(model, folder):
    write_config(model, folder)
    torch.save(early_2023_layout(model), folder / "pytorch_model.bin")


def write_early_2023_safetensors(model, folder):
    write_config(model, folder)
    save_file(early_2023_layout(model), str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    "writer", [write_safetensors, write_sharded_safetensors, write_torch_bin, write_early_2023, write_early_2023_safetensors]
)
def test_layout_loads_to_identical_logits(tmp_path, reference, writer):
    model, expected = reference
    writer(model, tmp_path)
    loaded = midfill.load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), expected)


def test_bfloat16_load_casts_weights(tmp_path, reference):
    model, _ = reference
    save_model(model, tmp_path)
    loaded = midfill.load_model(tmp_path, dtype="bfloat16")
    linear = [t for name, t in loaded.state_dict().items() if name.endswith(".weight") and "ln" not in name and "wte" not in name]
    assert linear and all(t.dtype == torch.bfloat16 for t in linear)  # packed bf16 on a CPU with the kernels, else torch's
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.fixture
def good_dir(tmp_path, reference) -> Path:
    folder = tmp_path / "model"
    save_model(reference[0], folder)
    return folder


def expect_error(folder, *fragments: str) -> str:
    with pytest.raises(MidfillError) as info:
        midfill.load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_folder(tmp_path):
    expect_error(tmp_path / "no" / "such" / "dir" / "x", "no such model folder")


def test_file_instead_of_folder(good_dir):
    expect_error(good_dir / "config.json", "is a file")


def test_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    expect_error(good_dir, "config.json", "missing")


def test_invalid_config_json(good_dir):
    (good_dir / "config.json").write_text("{not json")
    expect_error(good_dir, "config.json", "not valid JSON")


def test_unknown_model_type(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    (good_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    expect_error(good_dir, "config.json", "'llama'", "gpt_refact")


def test_no_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    expect_error(good_dir, "no weights found")


def test_truncated_safetensors(good_dir):
    path = good_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(good_dir, "model.safetensors", "truncated or corrupt")


def test_garbage_torch_bin(good_dir):
    (good_dir / "model.safetensors").unlink()
    (good_dir / "pytorch_model.bin").write_bytes(b"this is not a checkpoint")
    expect_error(good_dir, "pytorch_model.bin", "not a readable PyTorch checkpoint")


def test_wrong_shape(good_dir):
    config = json.loads((good_dir / "config.json").read_text())
    (good_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    expect_error(good_dir, "model.safetensors", "transformer.wte.weight", "(512, 64)", "(1024, 64)")


def test_missing_tensor(good_dir, reference):
    tensors = state(reference[0])
    del tensors["lm_head.weight"]
    save_file(tensors, str(good_dir / "model.safetensors"))
    expect_error(good_dir, "lm_head.weight missing")


def test_missing_shard(good_dir, reference):
    (good_dir / "model.safetensors").unlink()
    write_sharded_safetensors(reference[0], good_dir)
    (good_dir / "model-00002-of-00002.safetensors").unlink()
    expect_error(good_dir, "model-00002-of-00002.safetensors", "missing")


def test_unknown_dtype_and_device(good_dir):
    with pytest.raises(MidfillError, match="unknown dtype 'fp8'"):
        midfill.load_model(good_dir, dtype="fp8")
    with pytest.raises(MidfillError, match="unknown device"):
        midfill.load_model(good_dir, device="tpu0")


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a local folder
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = expect_error("smallcloudai/Refact-1_6B-fim", "smallcloudai/Refact-1_6B-fim", "--model /path/to/folder")
    assert "Hugging Face hub" in message


def test_save_model_writes_atomically_and_round_trips(tmp_path, reference):
    model, expected = reference
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.equal(midfill.load_model(tmp_path)(IDS), expected)


def test_loading_imports_no_compiler_stack(tmp_path, reference):
    """Building the network to load into runs no default init: on the meta device nn.Embedding's normal_
    goes through torch._refs, which imports torch._dynamo and sympy (~70 MB resident for a server's life)."""
    import subprocess
    import sys

    save_model(reference[0], tmp_path / "m")
    script = ("import sys, midfill; midfill.load_model(sys.argv[1]); "
              "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
