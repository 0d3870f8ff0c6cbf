"""Plain PyTorch reimplementation of a Bergamot "tiny" student (Marian transformer, SSRU decoder).

It serves two purposes: the source graph for the ONNX export, and the "plain PyTorch"
peer in benchmarks. The step interface is the one exported: the encoder returns the
cross-attention keys and values of every decoder layer, so a decoding step never
re-projects the source, and the output projection takes its weights as inputs so a
caller can pass only the shortlisted words' columns.

Marian conventions followed: post-norm residual blocks (`transformer-postprocess: dan`),
embeddings scaled by sqrt(d_model) plus sinusoidal positions (sin half then cos half,
timescale step log(10000) / (d/2 - 1)), queries scaled by 1/sqrt(d_head), one table tied
for source, target and output, EOS id 0, and a zero vector as the first decoder input.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from services.mt.marian_reader import MarianModel

EOS_ID = 0
UNK_ID = 1
LAYER_NORM_EPS = 1e-6
# Marian's default cap on output length, relative to the source length (EOS included).
MAX_LENGTH_FACTOR = 2.5
# Marian's additive mask value: large enough that exp() underflows to exactly zero.
_MASK_VALUE = -99999999.0

# The exported graphs' interface, also written into model.json for the runner.
OPSET = 17
ENCODER_INPUTS = ["src_ids", "src_mask"]
ENCODER_OUTPUTS = ["encoder_out", "cross_keys", "cross_values"]
DECODER_INPUTS = [
    "prev_ids",
    "step",
    "state",
    "cross_keys",
    "cross_values",
    "src_mask",
    "out_weight",
    "out_bias",
]
DECODER_OUTPUTS = ["logits", "new_state"]


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int
    d_model: int
    heads: int
    encoder_layers: int
    decoder_layers: int
    ffn_dim: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @classmethod
    def from_marian(cls, model: MarianModel) -> StudentConfig:
        config = model.config
        if config.get("transformer-decoder-autoreg") != "rnn" or config.get("dec-cell") != "ssru":
            raise ValueError("only transformer students with an SSRU decoder are supported")
        if config.get("transformer-postprocess") != "dan" or config.get("transformer-preprocess"):
            raise ValueError("only post-norm ('dan') transformer blocks are supported")
        if not config.get("tied-embeddings-all"):
            raise ValueError("only models with one embedding table for everything are supported")
        vocab_size, d_model = model.params["Wemb"].shape
        return cls(
            vocab_size=vocab_size,
            d_model=d_model,
            heads=int(config["transformer-heads"]),
            encoder_layers=int(config["enc-depth"]),
            decoder_layers=int(config["dec-depth"]),
            ffn_dim=int(config["transformer-dim-ffn"]),
        )


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Marian's position signal for float `positions` of any shape -> [..., dim]."""
    half = dim // 2
    increment = math.log(10000.0) / (half - 1)
    inverse = torch.exp(torch.arange(half, dtype=torch.float32) * -increment)
    angles = positions.to(torch.float32).unsqueeze(-1) * inverse
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _mask_bias(src_mask: Tensor) -> Tensor:
    """[B, S] of 1 (token) / 0 (padding) -> additive [B, 1, 1, S] for attention scores."""
    return ((1.0 - src_mask) * _MASK_VALUE)[:, None, None, :]


class _Affine(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_in, d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class _LayerNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.bias, LAYER_NORM_EPS)


class _FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = _Affine(d_model, ffn_dim)
        self.w2 = _Affine(ffn_dim, d_model)
        self.norm = _LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.w2(torch.relu(self.w1(x))))


class _Attention(nn.Module):
    """Multi-head attention whose keys/values may be projected once and reused."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.wq = _Affine(cfg.d_model, cfg.d_model)
        self.wk = _Affine(cfg.d_model, cfg.d_model)
        self.wv = _Affine(cfg.d_model, cfg.d_model)
        self.wo = _Affine(cfg.d_model, cfg.d_model)
        self.norm = _LayerNorm(cfg.d_model)

    def split(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, dh]."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.wk(memory)), self.split(self.wv(memory))

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        query = self.split(self.wq(x)) * (1.0 / math.sqrt(self.head_dim))
        weights = torch.softmax(query @ keys.transpose(-1, -2) + bias, dim=-1)
        context = (weights @ values).transpose(1, 2).reshape(batch, length, d_model)
        return self.norm(x + self.wo(context))


class _EncoderLayer(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.self_attention = _Attention(cfg)
        self.ffn = _FeedForward(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        keys, values = self.self_attention.keys_values(x)
        return self.ffn(self.self_attention(x, keys, values, bias))


class _Ssru(nn.Module):
    """Simple recurrent unit standing in for decoder self-attention: O(1) state per step."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.w = _Affine(d_model, d_model, bias=False)
        self.wf = _Affine(d_model, d_model)
        self.norm = _LayerNorm(d_model)

    def forward(self, x: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:
        forget = torch.sigmoid(self.wf(x))
        cell = forget * cell + (1.0 - forget) * self.w(x)
        return self.norm(x + torch.relu(cell)), cell


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.ssru = _Ssru(cfg.d_model)
        self.context = _Attention(cfg)
        self.ffn = _FeedForward(cfg.d_model, cfg.ffn_dim)

    def cross_keys_values(self, encoder_out: Tensor) -> tuple[Tensor, Tensor]:
        return self.context.keys_values(encoder_out)

    def forward(
        self, x: Tensor, cell: Tensor, keys: Tensor, values: Tensor, bias: Tensor
    ) -> tuple[Tensor, Tensor]:
        x, cell = self.ssru(x, cell)
        return self.ffn(self.context(x, keys, values, bias)), cell


class MarianStudent(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model), requires_grad=False)
        self.output_bias = nn.Parameter(torch.zeros(cfg.vocab_size), requires_grad=False)
        self.encoder = nn.ModuleList(_EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.decoder_layers))

    @classmethod
    def from_marian(cls, model: MarianModel) -> MarianStudent:
        student = cls(StudentConfig.from_marian(model))
        student.load_state_dict(_state_dict(model.params, student.cfg))
        return student.eval()

    def embed(self, ids: Tensor, positions: Tensor) -> Tensor:
        scaled = F.embedding(ids, self.embedding) * math.sqrt(self.cfg.d_model)
        return scaled + sinusoidal_positions(positions, self.cfg.d_model)

    def encode(self, src_ids: Tensor, src_mask: Tensor) -> Tensor:
        """[B, S] ids (each row ends with EOS, then padding) and 0/1 mask -> [B, S, d]."""
        positions = torch.arange(src_ids.shape[1]).unsqueeze(0)
        x = self.embed(src_ids, positions)
        bias = _mask_bias(src_mask)
        for layer in self.encoder:
            x = layer(x, bias)
        return x

    def cross_keys_values(self, encoder_out: Tensor) -> tuple[Tensor, Tensor]:
        """[B, S, d] -> keys and values, each [layers, B, H, S, dh]."""
        pairs = [
            cast(_DecoderLayer, layer).cross_keys_values(encoder_out) for layer in self.decoder
        ]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def initial_state(self, batch: int) -> Tensor:
        return torch.zeros(self.cfg.decoder_layers, batch, self.cfg.d_model)

    def decode_step(
        self,
        prev_ids: Tensor,
        step: Tensor,
        state: Tensor,
        cross_keys: Tensor,
        cross_values: Tensor,
        src_mask: Tensor,
        out_weight: Tensor,
        out_bias: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One target position for every row of the batch.

        prev_ids [B] (a negative id means "no previous token": the zero start vector),
        step [1] (the target position), state [layers, B, d], cross keys/values from
        `cross_keys_values`, out_weight [d, K] / out_bias [K]: the output layer's columns
        for the K words to score. Returns logits [B, K] and the new state.
        """
        started = (prev_ids >= 0).to(torch.float32).unsqueeze(-1)
        token = F.embedding(prev_ids.clamp(min=0), self.embedding) * started
        x = token * math.sqrt(self.cfg.d_model) + sinusoidal_positions(step, self.cfg.d_model)
        x = x.unsqueeze(1)
        bias = _mask_bias(src_mask)
        cells = []
        for index, layer in enumerate(self.decoder):
            x, cell = layer(
                x, state[index].unsqueeze(1), cross_keys[index], cross_values[index], bias
            )
            cells.append(cell.squeeze(1))
        return x.squeeze(1) @ out_weight + out_bias, torch.stack(cells)

    def output_projection(self) -> tuple[Tensor, Tensor]:
        """Full-vocabulary output weights [d, V] and bias [V], unknown token suppressed."""
        bias = self.output_bias.clone()
        bias[UNK_ID] = float("-inf")
        return self.embedding.T.contiguous(), bias

    @torch.inference_mode()
    def translate_ids(self, src_ids: Sequence[int], max_len: int | None = None) -> list[int]:
        """Greedy decode of one sentence: SentencePiece ids (no EOS) -> target ids (no EOS)."""
        source = torch.tensor([[*src_ids, EOS_ID]], dtype=torch.int64)
        mask = torch.ones(source.shape, dtype=torch.float32)
        limit = max_len or int(MAX_LENGTH_FACTOR * source.shape[1])
        keys, values = self.cross_keys_values(self.encode(source, mask))
        out_weight, out_bias = self.output_projection()
        state = self.initial_state(1)
        prev = torch.tensor([-1], dtype=torch.int64)
        output: list[int] = []
        for step in range(limit):
            logits, state = self.decode_step(
                prev, torch.tensor([step]), state, keys, values, mask, out_weight, out_bias
            )
            token = int(logits.argmax(-1))
            if token == EOS_ID:
                break
            output.append(token)
            prev = torch.tensor([token], dtype=torch.int64)
        return output


class _EncoderGraph(nn.Module):
    def __init__(self, student: MarianStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, src_ids: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        encoder_out = self.student.encode(src_ids, src_mask)
        keys, values = self.student.cross_keys_values(encoder_out)
        return encoder_out, keys, values


class _DecoderGraph(nn.Module):
    def __init__(self, student: MarianStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.student.decode_step(*inputs)


def export_onnx(student: MarianStudent, folder: Path) -> None:
    """Write `encoder.onnx` and `decoder.onnx` (one step) into `folder`, float32."""
    # The TorchScript exporter warns that it is deprecated; it is used on purpose because
    # the newer exporter needs onnxscript, which is not a dependency.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_graphs(student, folder)


def _export_graphs(student: MarianStudent, folder: Path) -> None:
    cfg = student.cfg
    batch, length, shortlist = 2, 5, 7
    src_ids = torch.randint(2, cfg.vocab_size, (batch, length))
    src_mask = torch.ones(batch, length)
    src_mask[1, 3:] = 0
    with torch.inference_mode():
        _, keys, values = _EncoderGraph(student)(src_ids, src_mask)
    kv_axes = {1: "batch", 3: "src_len"}
    torch.onnx.export(
        _EncoderGraph(student),
        (src_ids, src_mask),
        str(folder / "encoder.onnx"),
        input_names=ENCODER_INPUTS,
        output_names=ENCODER_OUTPUTS,
        dynamic_axes={
            "src_ids": {0: "batch", 1: "src_len"},
            "src_mask": {0: "batch", 1: "src_len"},
            "encoder_out": {0: "batch", 1: "src_len"},
            "cross_keys": kv_axes,
            "cross_values": kv_axes,
        },
        opset_version=OPSET,
        dynamo=False,
    )
    decoder_args = (
        torch.tensor([-1, 5]),
        torch.tensor([1]),
        student.initial_state(batch),
        keys,
        values,
        src_mask,
        torch.randn(cfg.d_model, shortlist),
        torch.randn(shortlist),
    )
    torch.onnx.export(
        _DecoderGraph(student),
        decoder_args,
        str(folder / "decoder.onnx"),
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_axes={
            "prev_ids": {0: "batch"},
            "state": {1: "batch"},
            "cross_keys": kv_axes,
            "cross_values": kv_axes,
            "src_mask": {0: "batch", 1: "src_len"},
            "out_weight": {1: "vocab"},
            "out_bias": {0: "vocab"},
            "logits": {0: "batch", 1: "vocab"},
            "new_state": {1: "batch"},
        },
        opset_version=OPSET,
        dynamo=False,
    )


def marian_names(cfg: StudentConfig) -> dict[str, str]:
    """This module's parameter names -> the Marian names they are loaded from."""
    names = {"embedding": "Wemb", "output_bias": "decoder_ff_logit_out_b"}

    def affine(ours: str, marian: str, weight: str, bias: str | None) -> None:
        names[f"{ours}.weight"] = f"{marian}_{weight}"
        if bias is not None:
            names[f"{ours}.bias"] = f"{marian}_{bias}"

    def norm(ours: str, marian: str) -> None:
        names[f"{ours}.scale"] = f"{marian}_ln_scale"
        names[f"{ours}.bias"] = f"{marian}_ln_bias"

    def attention(ours: str, marian: str) -> None:
        for part in "qkvo":
            affine(f"{ours}.w{part}", marian, f"W{part}", f"b{part}")
        norm(f"{ours}.norm", f"{marian}_Wo")

    def ffn(ours: str, marian: str) -> None:
        affine(f"{ours}.w1", marian, "W1", "b1")
        affine(f"{ours}.w2", marian, "W2", "b2")
        norm(f"{ours}.norm", f"{marian}_ffn")

    for i in range(cfg.encoder_layers):
        attention(f"encoder.{i}.self_attention", f"encoder_l{i + 1}_self")
        ffn(f"encoder.{i}.ffn", f"encoder_l{i + 1}_ffn")
    for i in range(cfg.decoder_layers):
        prefix = f"decoder_l{i + 1}"
        affine(f"decoder.{i}.ssru.w", f"{prefix}_rnn", "W", None)
        affine(f"decoder.{i}.ssru.wf", f"{prefix}_rnn", "Wf", "bf")
        norm(f"decoder.{i}.ssru.norm", f"{prefix}_rnn_ffn")
        attention(f"decoder.{i}.context", f"{prefix}_context")
        ffn(f"decoder.{i}.ffn", f"{prefix}_ffn")
    return names


def _state_dict(params: dict[str, np.ndarray], cfg: StudentConfig) -> dict[str, Tensor]:
    # Marian biases and norm parameters are [1, n] rows.
    state = {}
    for ours, marian in marian_names(cfg).items():
        value = torch.from_numpy(params[marian])
        state[ours] = value.reshape(-1) if value.shape[0] == 1 else value
    return state
