"""Convert a faster-whisper folder (CTranslate2) into a Hugging Face Whisper checkpoint.

The source folder holds `model.bin`, `config.json` (CTranslate2's generation settings),
`tokenizer.json` and `vocabulary.txt`. The target gets what
`WhisperForConditionalGeneration.from_pretrained` and optimum's exporter read:
`config.json`, `model.safetensors`, `generation_config.json`, `preprocessor_config.json`
and the tokenizer files. Sizes come from tensor shapes, token ids from the tokenizer; no
hub is consulted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizerFast,
)

from services.asr.ct2_reader import CT2Model, read_ct2

# Whisper's fixed audio front end: 30 s windows of 16 kHz audio.
SAMPLING_RATE = 16_000
CHUNK_SECONDS = 30
# CTranslate2's default for the first timestamp (index 50 = 1.0 s); HF reads it from here.
MAX_INITIAL_TIMESTAMP_INDEX = 50
_MULTILINGUAL_VOCAB_SIZE = 51865
_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's control tokens, read from the tokenizer by content."""

    eot: int
    sot: int
    translate: int
    transcribe: int
    start_of_prev: int
    no_timestamps: int
    languages: dict[str, int]


def special_tokens(tokenizer_json: dict[str, Any], lang_ids: list[int]) -> SpecialTokens:
    by_content = {t["content"]: int(t["id"]) for t in tokenizer_json["added_tokens"]}
    by_id = {token_id: content for content, token_id in by_content.items()}
    languages = {}
    for token_id in lang_ids:
        content = by_id.get(token_id, "")
        if not re.fullmatch(r"<\|[a-z]{2,3}\|>", content):
            raise ValueError(f"lang id {token_id} is {content!r}, not a language token")
        languages[content[2:-2]] = token_id
    return SpecialTokens(
        eot=by_content["<|endoftext|>"],
        sot=by_content["<|startoftranscript|>"],
        translate=by_content["<|translate|>"],
        transcribe=by_content["<|transcribe|>"],
        start_of_prev=by_content["<|startofprev|>"],
        no_timestamps=by_content["<|notimestamps|>"],
        languages=languages,
    )


def whisper_config(model: CT2Model, tokens: SpecialTokens) -> WhisperConfig:
    """Architecture from tensor shapes, token ids from the tokenizer."""
    variables = model.variables
    layers: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
    for name in variables:
        match = _LAYER.match(name)
        if match:
            layers[match[1]].add(int(match[2]))
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=len(layers["encoder"]),
        decoder_layers=len(layers["decoder"]),
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        # Hugging Face's Whisper checkpoints use <|endoftext|> as bos, eos and pad.
        bos_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        pad_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        # Generation settings live in generation_config.json only (transformers moves them
        # there anyway, with a warning).
        suppress_tokens=None,
        begin_suppress_tokens=None,
        scale_embedding=bool(model.scalar("decoder/scale_embeddings")),
        tie_word_embeddings=True,
    )


def is_multilingual(vocab_size: int) -> bool:
    """English-only vocabularies have 51864 tokens, multilingual ones 51865 or more."""
    return vocab_size >= _MULTILINGUAL_VOCAB_SIZE


def generation_config(
    config: WhisperConfig, ct2_config: dict[str, Any], tokens: SpecialTokens
) -> GenerationConfig:
    multilingual = is_multilingual(config.vocab_size)
    fields: dict[str, Any] = {
        "bos_token_id": tokens.eot,
        "eos_token_id": tokens.eot,
        "pad_token_id": tokens.eot,
        "decoder_start_token_id": tokens.sot,
        "max_length": config.max_target_positions,
        "suppress_tokens": list(ct2_config["suppress_ids"]),
        "begin_suppress_tokens": list(ct2_config["suppress_ids_begin"]),
        "no_timestamps_token_id": tokens.no_timestamps,
        "prev_sot_token_id": tokens.start_of_prev,
        "max_initial_timestamp_index": MAX_INITIAL_TIMESTAMP_INDEX,
        "return_timestamps": False,
        "is_multilingual": multilingual,
    }
    if multilingual:
        fields["lang_to_id"] = {f"<|{code}|>": i for code, i in tokens.languages.items()}
        fields["task_to_id"] = {"transcribe": tokens.transcribe, "translate": tokens.translate}
    if "alignment_heads" in ct2_config:
        fields["alignment_heads"] = [list(pair) for pair in ct2_config["alignment_heads"]]
    return GenerationConfig(**fields)


def state_dict(model: CT2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Map CTranslate2 variable names onto `WhisperForConditionalGeneration`'s, as float32."""
    variables = model.variables

    def tensor(name: str) -> torch.Tensor:
        value = variables[name]
        if value.dtype.kind != "f":
            raise ValueError(f"{name}: {value.dtype} weights (quantized models are not supported)")
        return torch.from_numpy(value.astype(np.float32))

    out: dict[str, torch.Tensor] = {}

    def copy(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"] = tensor(f"{ct2}/weight")
        out[f"{hf}.bias"] = tensor(f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"] = tensor(f"{ct2}/gamma")
        out[f"{hf}.bias"] = tensor(f"{ct2}/beta")

    def fused(hf_names: list[str], ct2: str, no_bias: str) -> None:
        weights = tensor(f"{ct2}/weight").chunk(len(hf_names))
        biases = tensor(f"{ct2}/bias").chunk(len(hf_names))
        for hf, weight, bias in zip(hf_names, weights, biases, strict=True):
            out[f"{hf}.weight"] = weight.clone()
            if hf.endswith(no_bias):
                # Whisper's key projections have no bias; CTranslate2 stores zeros there.
                if torch.count_nonzero(bias):
                    raise ValueError(f"{ct2}: non-zero bias in the slice for {hf}")
            else:
                out[f"{hf}.bias"] = bias.clone()

    for side in ("encoder", "decoder"):
        prefix = f"model.{side}"
        out[f"{prefix}.embed_positions.weight"] = tensor(f"{side}/position_encodings/encodings")
        norm(f"{prefix}.layer_norm", f"{side}/layer_norm")
        count = config.encoder_layers if side == "encoder" else config.decoder_layers
        for i in range(count):
            hf, ct2 = f"{prefix}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            fused(
                [f"{hf}.self_attn.{p}_proj" for p in "qkv"],
                f"{ct2}/self_attention/linear_0",
                no_bias="k_proj",
            )
            copy(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
                copy(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                fused(
                    [f"{hf}.encoder_attn.{p}_proj" for p in "kv"],
                    f"{ct2}/attention/linear_1",
                    no_bias="k_proj",
                )
                copy(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
            copy(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            copy(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
    copy("model.encoder.conv1", "encoder/conv1")
    copy("model.encoder.conv2", "encoder/conv2")
    embeddings = tensor("decoder/embeddings/weight")
    out["model.decoder.embed_tokens.weight"] = embeddings
    out["proj_out.weight"] = embeddings
    return out


def convert_faster_whisper(source: Path, target: Path) -> WhisperConfig:
    """Write a Hugging Face checkpoint for the faster-whisper folder `source` into `target`."""
    ct2_config = json.loads((source / "config.json").read_text())
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    model = read_ct2(source / "model.bin")
    if model.spec != "WhisperSpec":
        raise ValueError(f"{source}: spec {model.spec}, expected WhisperSpec")
    # An English-only model takes no language token (its config lists some anyway).
    vocab_size = model.variables["decoder/embeddings/weight"].shape[0]
    lang_ids = list(ct2_config["lang_ids"]) if is_multilingual(vocab_size) else []
    tokens = special_tokens(tokenizer_json, lang_ids)
    config = whisper_config(model, tokens)

    target.mkdir(parents=True, exist_ok=True)
    hf_model = WhisperForConditionalGeneration(config)
    hf_model.load_state_dict(state_dict(model, config), strict=True)
    hf_model.generation_config = generation_config(config, ct2_config, tokens)
    hf_model.save_pretrained(target, safe_serialization=True)
    del hf_model, model

    controls = [t["content"] for t in tokenizer_json["added_tokens"] if t["special"]]
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(source / "tokenizer.json"),
        pad_token="<|endoftext|>",
        # Listed so the slow tokenizer also drops them with skip_special_tokens.
        additional_special_tokens=[c for c in controls if c != "<|endoftext|>"],
        model_max_length=config.max_target_positions,
    )
    # With no vocab_file, only the fast files would be written; the slow tokenizer (and
    # tools that use it) also needs vocab.json + merges.txt, which the BPE model holds.
    tokenizer.backend_tokenizer.model.save(str(target))
    tokenizer.save_pretrained(target)
    WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        chunk_length=CHUNK_SECONDS,
    ).save_pretrained(target)
    return config
