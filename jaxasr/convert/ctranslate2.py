"""Import CTranslate2 (faster-whisper) Whisper model directories as Hugging Face state dicts.

A CTranslate2 model directory holds ``model.bin``, ``config.json`` and ``vocabulary.json`` or
``vocabulary.txt``. ``model.bin`` is written by ``ModelSpec._serialize``
(``ctranslate2/specs/model_spec.py``) and read by ``Model::load`` (``src/models/model.cc``);
numbers are little-endian::

    uint32 binary_version                       1 to 6
    string spec_name, uint32 spec_revision      version >= 2
    uint32 num_variables, then per variable:
        string name, uint8 rank, uint32 shape[rank]
        uint8 type_id, uint32 num_bytes         version >= 4
        uint8 item_size, uint32 num_elements    version < 4
        data
    uint32 num_aliases, then per alias:         version >= 3
        string alias, string target

where a string is a uint16 length (counting a trailing NUL), its UTF-8 bytes and the NUL.
Quantized weights (int8/int16) come with a ``<name>_scale`` variable. Only numpy is used here:
the ``ctranslate2`` package is not needed at run time.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import re
import struct
from pathlib import Path

import numpy as np

__all__ = ["is_ctranslate2_dir", "load_ctranslate2_whisper", "read_ctranslate2_variables"]

_MAX_BINARY_VERSION = 6
# Revisions 1-3 of WhisperSpec share one weight layout (later ones changed config fields only).
_MAX_WHISPER_REVISION = 3
# DataType enum of include/ctranslate2/types.h, indexed by type id.
_TYPE_IDS = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
# Binary versions < 4 stored the item size instead of a type id.
_ITEM_SIZE_TYPES = {4: "float32", 2: "int16", 1: "int8"}
# How each type is read; numpy has no bfloat16, so its bits are read as uint16 and widened.
_STORAGE_DTYPES = {
    name: np.dtype(code)
    for name, code in zip(_TYPE_IDS, ("<f4", "i1", "<i2", "<i4", "<f2", "<u2"))
}

PathLike = str | os.PathLike


class _Reader:
    """Sequential reader over a memory-mapped file; arrays are views until converted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
        with open(path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0

    def _advance(self, n: int) -> int:
        start = self.pos
        if start + n > len(self.buf):
            raise ValueError(f"{self.path} is truncated: {n} bytes wanted at offset {start}")
        self.pos += n
        return start

    def ints(self, fmt: str) -> tuple[int, ...]:
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.buf, self._advance(struct.calcsize(fmt)))

    def int(self, fmt: str) -> int:
        return self.ints(fmt)[0]

    def string(self) -> str:
        n = self.int("H")
        start = self._advance(n)
        return self.buf[start : start + n - 1].decode("utf-8")  # drop the NUL

    def array(self, dtype: np.dtype, shape: tuple[int, ...], num_bytes: int) -> np.ndarray:
        start = self._advance(num_bytes)
        return np.frombuffer(self.buf, dtype, num_bytes // dtype.itemsize, start).reshape(shape)


def _read_model_bin(path: Path) -> tuple[str, int, dict[str, np.ndarray]]:
    """(spec name, spec revision, variables) of a model.bin; see the module docstring."""
    r = _Reader(path)
    version = r.int("I")
    if not 1 <= version <= _MAX_BINARY_VERSION:
        raise ValueError(
            f"{path}: unsupported CTranslate2 binary version {version} "
            f"(supported: 1 to {_MAX_BINARY_VERSION})"
        )
    spec, revision = (r.string(), r.int("I")) if version >= 2 else ("", 1)

    variables: dict[str, np.ndarray] = {}
    for _ in range(r.int("I")):
        name = r.string()
        shape = r.ints(f"{r.int('B')}I")
        if version >= 4:
            type_id = r.int("B")
            type_name = _TYPE_IDS[type_id] if type_id < len(_TYPE_IDS) else f"type id {type_id}"
            num_bytes = r.int("I")
        else:
            item_size = r.int("B")
            type_name = _ITEM_SIZE_TYPES.get(item_size, f"item size {item_size}")
            num_bytes = r.int("I") * item_size
        if type_name not in _STORAGE_DTYPES:
            raise ValueError(f"{path}: variable {name} has an unsupported data type ({type_name})")
        dtype = _STORAGE_DTYPES[type_name]
        if num_bytes != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(
                f"{path}: variable {name} has {num_bytes} bytes, not {type_name}{list(shape)}"
            )
        value = r.array(dtype, shape, num_bytes)
        if type_name == "bfloat16":
            value = (value.astype(np.uint32) << 16).view(np.float32)
        variables[name] = value

    aliases = [(r.string(), r.string()) for _ in range(r.int("I"))] if version >= 3 else []
    _dequantize(variables, path)
    for alias, target in aliases:
        if target not in variables:
            raise ValueError(f"{path}: alias {alias} points to missing variable {target}")
        variables[alias] = variables[target]
    return spec, revision, variables


def _dequantize(variables: dict[str, np.ndarray], path: Path) -> None:
    """Replace quantized weights and their ``_scale`` by float32 (CTranslate2 stores w * scale)."""
    for name in [n for n in variables if n + "_scale" in variables]:
        q, scale = variables[name], variables.pop(name + "_scale").astype(np.float32)
        if q.dtype not in (np.int8, np.int16):
            raise ValueError(f"{path}: cannot dequantize {name} of dtype {q.dtype}")
        # int8 scales are per output row (conv kernels included), int16 ones a single scalar.
        scale = scale.reshape(scale.shape + (1,) * (q.ndim - scale.ndim))
        variables[name] = q.astype(np.float32) / scale


def read_ctranslate2_variables(path: PathLike) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` (or of the model directory holding it).

    Aliases are resolved (an alias maps to the same array as its target), int8/int16 weights
    are dequantized to float32 and their ``_scale`` entries dropped, bfloat16 is widened to
    float32; everything else keeps its stored dtype (read-only views of the memory-mapped file).
    """
    path = Path(path)
    return _read_model_bin(path / "model.bin" if path.is_dir() else path)[2]


def is_ctranslate2_dir(path: PathLike) -> bool:
    """Whether ``path`` is a directory with a ``model.bin`` of a supported binary version."""
    model_bin = Path(path) / "model.bin"
    if not model_bin.is_file():
        return False
    with open(model_bin, "rb") as f:
        header = f.read(4)
    return len(header) == 4 and 1 <= struct.unpack("<I", header)[0] <= _MAX_BINARY_VERSION


def _read_vocabulary(model_dir: Path) -> list[str]:
    """Tokens by id, from the file CTranslate2 writes beside model.bin (JSON first, as it does)."""
    if (path := model_dir / "vocabulary.json").is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if (path := model_dir / "vocabulary.txt").is_file():
        return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    raise FileNotFoundError(f"{model_dir} has no vocabulary.json or vocabulary.txt")


def _num_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return 1 + max((int(m[1]) for n in variables if (m := pattern.match(n))), default=-1)


def load_ctranslate2_whisper(model_dir: PathLike) -> tuple[dict, dict[str, np.ndarray], dict]:
    """Read a CTranslate2 Whisper directory as ``(hf_config, state_dict, generation_config)``.

    ``state_dict`` uses ``WhisperForConditionalGeneration`` names with float32 arrays;
    ``WhisperConfig(**hf_config)`` and ``GenerationConfig(**generation_config)`` rebuild the
    rest. Sizes come from the weight shapes, head counts from ``num_heads`` in model.bin, token
    ids from the vocabulary file, and suppressed tokens and alignment heads from config.json.
    """
    model_dir = Path(model_dir)
    model_bin = model_dir / "model.bin"
    spec, revision, variables = _read_model_bin(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin} holds a {spec or 'unnamed'} model, not a WhisperSpec")
    if revision > _MAX_WHISPER_REVISION:
        raise ValueError(
            f"{model_bin}: unsupported WhisperSpec revision {revision} "
            f"(supported: up to {_MAX_WHISPER_REVISION})"
        )

    def pop(name: str) -> np.ndarray:
        if name not in variables:
            raise ValueError(f"{model_bin}: missing variable {name}")
        return variables.pop(name)

    def take(name: str) -> np.ndarray:
        value = pop(name)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{model_bin}: {name} is {value.dtype} with no quantization scale")
        return value.astype(np.float32)

    sd: dict[str, np.ndarray] = {}

    def params(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"] = take(f"{ct2}/weight")
        sd[f"{hf}.bias"] = take(f"{ct2}/bias")

    def layer_norm(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"] = take(f"{ct2}/gamma")
        sd[f"{hf}.bias"] = take(f"{ct2}/beta")

    def fused(hf: str, ct2: str, projs: tuple[str, ...]) -> None:
        """Split a projection CTranslate2 fused by stacking rows ([q; k; v]) back into HF's."""
        weights = np.split(take(f"{ct2}/weight"), len(projs))
        biases = np.split(take(f"{ct2}/bias"), len(projs))
        for proj, weight, bias in zip(projs, weights, biases):
            sd[f"{hf}.{proj}.weight"] = weight
            # HF's k_proj has no bias; the converter stores zeros there (a key bias would
            # cancel in the softmax anyway).
            if proj != "k_proj":
                sd[f"{hf}.{proj}.bias"] = bias

    def ffn(hf: str, ct2: str) -> None:
        params(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        params(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    encoder_layers = _num_layers(variables, "encoder")
    decoder_layers = _num_layers(variables, "decoder")
    encoder_heads = int(pop("encoder/num_heads"))
    decoder_heads = int(pop("decoder/num_heads"))

    params("model.encoder.conv1", "encoder/conv1")
    params("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    for i in range(encoder_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        params(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        ffn(hf, ct2)
    layer_norm("model.encoder.layer_norm", "encoder/layer_norm")

    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    for i in range(decoder_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
        params(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_0", ("q_proj",))
        fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
        params(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        ffn(hf, ct2)
    layer_norm("model.decoder.layer_norm", "decoder/layer_norm")
    sd["proj_out.weight"] = take("decoder/projection/weight")
    # The converter aliases the output projection to the embeddings when HF ties them.
    tied = np.array_equal(sd["proj_out.weight"], sd["model.decoder.embed_tokens.weight"])

    # What is left should be scalar flags (activation, pre_norm, ...), never weights.
    leftover = sorted(name for name, value in variables.items() if value.ndim)
    if leftover:
        raise ValueError(f"{model_bin}: variables with no Hugging Face counterpart: {leftover}")

    vocab = _read_vocabulary(model_dir)
    vocab_size, d_model = sd["model.decoder.embed_tokens.weight"].shape
    if len(vocab) != vocab_size:
        raise ValueError(f"{model_dir}: {len(vocab)} vocabulary tokens for {vocab_size} embeddings")
    ids = {token: i for i, token in enumerate(vocab)}

    def token_id(token: str) -> int:
        if token not in ids:
            raise ValueError(f"{model_dir}: the vocabulary has no {token}")
        return ids[token]

    eot, sot = token_id("<|endoftext|>"), token_id("<|startoftranscript|>")
    translate, transcribe = token_id("<|translate|>"), token_id("<|transcribe|>")
    ct2_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    suppress = ct2_config.get("suppress_ids")
    suppress_begin = ct2_config.get("suppress_ids_begin")
    max_target_positions = sd["model.decoder.embed_positions.weight"].shape[0]

    hf_config = {
        "vocab_size": vocab_size,
        "num_mel_bins": sd["model.encoder.conv1.weight"].shape[1],
        "d_model": d_model,
        "encoder_layers": encoder_layers,
        "encoder_attention_heads": encoder_heads,
        "encoder_ffn_dim": sd["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_layers": decoder_layers,
        "decoder_attention_heads": decoder_heads,
        "decoder_ffn_dim": sd["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": sd["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": max_target_positions,
        "tie_word_embeddings": tied,
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": suppress_begin,
    }

    alignment_heads = ct2_config.get("alignment_heads")
    if alignment_heads is None:
        # Models converted before CTranslate2 stored them: its converter's default, all heads
        # of the second half of the decoder.
        second_half = range(decoder_layers // 2, decoder_layers)
        alignment_heads = itertools.product(second_half, range(decoder_heads))
    # Not config.json's lang_ids: English-only conversions list them too.
    multilingual = vocab_size >= 51865
    generation_config = {
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": max_target_positions,
        "suppress_tokens": suppress,
        "begin_suppress_tokens": suppress_begin,
        "no_timestamps_token_id": token_id("<|notimestamps|>"),
        "prev_sot_token_id": token_id("<|startofprev|>"),
        "max_initial_timestamp_index": 50,  # openai's 1 s limit on the first timestamp
        "alignment_heads": [list(head) for head in alignment_heads],
        "is_multilingual": multilingual,
    }
    if multilingual:
        # Language tokens sit between <|startoftranscript|> and <|translate|>.
        generation_config["lang_to_id"] = {vocab[i]: i for i in range(sot + 1, translate)}
        generation_config["task_to_id"] = {"transcribe": transcribe, "translate": translate}
        # As in the hub's multilingual generation_config.json: detect the language, transcribe.
        generation_config["forced_decoder_ids"] = [[1, None], [2, transcribe]]
    return hf_config, sd, generation_config
