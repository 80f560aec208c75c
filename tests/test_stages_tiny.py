"""The built-in tiny-llama, the download stage that provides it (or a hub/local model), atomic outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from hyperjob.config.load import load_resolved
from hyperjob.fsutil import atomic_dir
from hyperjob.paths import RunPaths, base_model_dir
from hyperjob.stages import download
from hyperjob.stages.common import COMPLETE_MARKER, read_token

FAKE_TOKEN = "hf_abcdefghijklmnopqrstuvwx"


def _digests(model_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model_dir.iterdir())
        if p.name != COMPLETE_MARKER
    }


# ---------------------------------------------------------------- tiny-llama


def test_download_stage_builds_tiny_llama_bit_identically(
    make_tiny_run_dir: Any, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_tiny_run_dir(with_model=False)
    assert download.main(["--run-dir", str(run_dir)]) == 0
    target = base_model_dir(load_resolved(RunPaths(run_dir).config))
    assert (target / COMPLETE_MARKER).is_file()
    assert _digests(target) == _digests(tiny_model_dir)  # same seed, separate build: same bytes
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp")]
    assert download.main(["--run-dir", str(run_dir)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_other_seed_changes_only_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    from hyperjob.stages.tiny import build_tiny_llama

    other = _digests(build_tiny_llama(tmp_path / "seed1", seed=1))
    base = _digests(tiny_model_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in base.items() if k != "model.safetensors"
    }


def test_tiny_llama_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (128, 512, False)
    assert cfg.vocab_size == len(tok) and 512 <= len(tok) <= 1024
    assert model.dtype == torch.float32
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}) == 4
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    ids = tok("The capital of France is Paris.", return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert tok.decode(ids["input_ids"][0], skip_special_tokens=True) == "The capital of France is Paris."
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )


def test_tiny_llama_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "\nBe brief.\nHi\n"


# ---------------------------------------------------------------- local and hub models


def test_local_model_is_checked_not_copied(
    tmp_path: Path, make_tiny_run_dir: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    run_dir = make_tiny_run_dir([f"model.id={local}"], with_model=False)
    assert download.main(["--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"hyperjob download: error: local model {local} is missing weights (*.safetensors), " + (
        "tokenizer (tokenizer.json or tokenizer.model)"
    )
    (local / "model.safetensors").write_bytes(b"")
    (local / "tokenizer.json").write_text("{}")
    assert download.main(["--run-dir", str(run_dir)]) == 0
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def _fake_snapshot(calls: list[dict[str, Any]]) -> Any:
    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        out = Path(kwargs["local_dir"])
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "model-00001-of-00001.safetensors"):
            (out / name).write_text("{}")
        (out / ".cache" / "huggingface").mkdir(parents=True)
        return str(out)

    return snapshot_download


def test_hub_download_reads_token_at_run_time_and_is_atomic(
    make_tiny_run_dir: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(calls))
    monkeypatch.setenv("MY_TOKEN", FAKE_TOKEN)
    run_dir = make_tiny_run_dir(
        ["model.id=acme/llama-7b", "model.revision=v1", "model.token_env=MY_TOKEN"], with_model=False
    )
    assert download.main(["--run-dir", str(run_dir)]) == 0
    (call,) = calls
    assert call["repo_id"] == "acme/llama-7b" and call["revision"] == "v1" and call["token"] == FAKE_TOKEN
    assert "*.safetensors" in call["allow_patterns"] and "*.bin" not in call["allow_patterns"]
    target = base_model_dir(load_resolved(RunPaths(run_dir).config))
    assert target.name == "acme--llama-7b@v1" and (target / COMPLETE_MARKER).is_file()
    assert not (target / ".cache").exists() and not Path(call["local_dir"]).exists()
    assert download.main(["--run-dir", str(run_dir)]) == 0 and len(calls) == 1  # complete: skipped
    out = capsys.readouterr()
    assert FAKE_TOKEN not in out.out + out.err and FAKE_TOKEN not in RunPaths(run_dir).config.read_text()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "not found or no access"),
        ("GatedRepoError", "gated repository"),
        ("ConnectionError", "network unreachable"),
    ],
)
def test_hub_errors_are_one_line_without_token(
    make_tiny_run_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: str,
    expected: str,
) -> None:
    import huggingface_hub

    exc_type = type(error, (Exception,), {})

    def failing(**kwargs: Any) -> str:
        Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
        raise exc_type(f"401 for url with header Authorization: Bearer {kwargs['token']}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run_dir = make_tiny_run_dir(["model.id=acme/private"], with_model=False)
    assert download.main(["--run-dir", str(run_dir)]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and FAKE_TOKEN not in out.err + out.out
    assert "model 'acme/private'" in out.err and expected in out.err
    assert not base_model_dir(load_resolved(RunPaths(run_dir).config)).exists()


def test_hub_dataset_is_fetched_into_cache(make_tiny_run_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    seen: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str, token: str | None) -> list[int]:
        seen.append((name, split))
        return [1, 2]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run_dir = make_tiny_run_dir(["dataset.path=null", "dataset.id=acme/dolly", "dataset.split=train[:10]"])
    assert download.main(["--run-dir", str(run_dir)]) == 0
    assert seen == [("acme/dolly", "train[:10]")]


def test_read_token_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hyperjob.config.models import ModelSection

    token_file = tmp_path / "token"
    token_file.write_text(f"  {FAKE_TOKEN}x\n")
    section = ModelSection(id="acme/m", token_env="SOME_TOKEN", token_file=token_file)
    monkeypatch.delenv("SOME_TOKEN", raising=False)
    assert read_token(section) == f"{FAKE_TOKEN}x"
    monkeypatch.setenv("SOME_TOKEN", FAKE_TOKEN)
    assert read_token(section) == FAKE_TOKEN
    assert read_token(ModelSection(id="acme/m", token_env=None)) is None


# ---------------------------------------------------------------- atomic_dir


def test_atomic_dir_replaces_or_leaves_old(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash")
    assert (target / "a").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
