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


def _hub_error(status: int | None, headers: dict[str, str]) -> Exception:
    """The exception huggingface_hub itself raises for this answer of the hub: its own `hf_raise_for_status` on a
    real response, so the error mapping is tested against the library's classes, not a guess of their names.
    `status=None`: the hub could not be reached, which `snapshot_download` reports as LocalEntryNotFoundError."""
    import httpx2  # the HTTP client of the installed huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status

    if status is None:
        return LocalEntryNotFoundError(
            "An error happened while trying to locate the files on the Hub, and we cannot find the appropriate"
            " snapshot folder for the specified revision on the local disk."
        )
    url = "https://huggingface.co/api/models/acme/private/revision/main"  # what snapshot_download asks first
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", url))
    try:
        hf_raise_for_status(response)
    except Exception as exc:
        return exc
    raise AssertionError(f"huggingface_hub accepted HTTP {status} {headers}")


_NO_ACCESS = "not found or no access (HTTP {}): check the id and the token"


@pytest.mark.parametrize(
    ("status", "headers", "error", "expected"),
    [
        pytest.param(
            401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid username or password."},
            "RepositoryNotFoundError", _NO_ACCESS.format(401), id="no-token",
        ),
        pytest.param(
            401, {"X-Error-Message": "Invalid credentials in Authorization header"},
            "HfHubHTTPError", _NO_ACCESS.format(401), id="bad-token",
        ),
        pytest.param(
            404, {"X-Error-Code": "RepoNotFound"}, "RepositoryNotFoundError", _NO_ACCESS.format(404), id="no-repo",
        ),
        pytest.param(
            403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model acme/private is restricted."},
            "GatedRepoError", "gated repository: accept its licence", id="gated",
        ),
        pytest.param(
            404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: main"},
            "RevisionNotFoundError", "revision not found", id="no-revision",
        ),
        pytest.param(
            403, {"X-Error-Message": "Forbidden"}, "HfHubHTTPError", "forbidden (HTTP 403): the token lacks access",
            id="forbidden",
        ),
        pytest.param(None, {}, "LocalEntryNotFoundError", "network unreachable or hub offline", id="no-hub"),
    ],
)  # fmt: skip
def test_hub_errors_are_one_line_without_token(
    make_tiny_run_dir: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: int | None,
    headers: dict[str, str],
    error: str,
    expected: str,
) -> None:
    """Real huggingface_hub exceptions, whose text holds the token, become one line naming model, revision and
    cause; none of that text, and so not the token, reaches the user."""
    import huggingface_hub
    from huggingface_hub import errors

    exc = _hub_error(status, headers)
    assert type(exc) is getattr(errors, error)  # the library still answers this with that class

    def failing(**kwargs: Any) -> str:
        Path(kwargs["local_dir"]).mkdir(parents=True, exist_ok=True)
        exc.args = (f"{exc.args[0]}\nsent Authorization: Bearer {kwargs['token']}", *exc.args[1:])  # worst case
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run_dir = make_tiny_run_dir(["model.id=acme/private"], with_model=False)
    assert download.main(["--run-dir", str(run_dir)]) == 2
    out = capsys.readouterr()
    assert FAKE_TOKEN in str(exc)  # the message the product must not show holds the token
    line = f"hyperjob download: error: cannot download model 'acme/private' (revision 'main'): {expected}"
    assert out.err.startswith(line) and out.err.count("\n") == 1, out.err
    assert FAKE_TOKEN not in out.err + out.out
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
