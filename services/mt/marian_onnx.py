"""Torch-free runner for the exported Bergamot students: raw onnxruntime sessions + numpy.

The folder is one written by `services.mt.build_models` (see its docstring for the
layout and `model.json`). The encoder returns each decoder layer's cross-attention keys
and values, so a step only runs the decoder's own projections; the output projection's
columns are inputs to the step, so with the lexical shortlist a step scores a few
hundred candidate words instead of the whole 32k vocabulary.

Every row of a batch is decoded as if it were alone: padding is masked in attention, a
row's shortlist is its own (the batch scores the union and masks per row), and rows that
finish are dropped from the next steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
import sentencepiece as spm

Precision = Literal["fp32", "int8"]


@dataclass(frozen=True)
class TranslationOut:
    text: str
    # Target SentencePiece ids, without the final EOS.
    token_ids: list[int]


@dataclass(frozen=True)
class _Shortlist:
    """CSR map source id -> allowed target ids, plus the always-allowed frequent words."""

    offsets: np.ndarray
    targets: np.ndarray
    first_num: int

    def allowed(self, source_ids: np.ndarray) -> np.ndarray:
        parts = [np.arange(self.first_num)]
        parts += [self.targets[self.offsets[i] : self.offsets[i + 1]] for i in source_ids]
        return np.unique(np.concatenate(parts).astype(np.int64))


@dataclass
class _Encoded:
    """Per-row encoder results; rows are dropped together as they finish."""

    keys: np.ndarray  # [layers, rows, heads, src_len, head_dim]
    values: np.ndarray
    mask: np.ndarray  # [rows, src_len]

    def take(self, rows: np.ndarray) -> _Encoded:
        return _Encoded(
            np.ascontiguousarray(self.keys[:, rows]),
            np.ascontiguousarray(self.values[:, rows]),
            np.ascontiguousarray(self.mask[rows]),
        )


class MarianOnnx:
    """A Marian student on onnxruntime. Call `load()` once, then `translate_batch()`.

    `translate_batch` keeps all its state in locals, so concurrent calls from several
    threads are safe (onnxruntime sessions allow concurrent `run`).
    """

    def __init__(
        self,
        folder: Path,
        precision: Precision = "int8",
        threads: int = 1,
        shortlist: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.precision = precision
        self.threads = threads
        self.use_shortlist = shortlist
        self.metadata: dict[str, Any] = {}
        self._encoder: ort.InferenceSession | None = None
        self._decoder: ort.InferenceSession | None = None
        self._tokenizer: spm.SentencePieceProcessor | None = None
        self._shortlist: _Shortlist | None = None
        # The output layer (tied embeddings), float32 or int8 as the decoder takes it.
        self._embeddings = np.empty((0, 0), np.float32)
        self._out_weight = np.empty((0, 0), np.float32)
        self._out_bias = np.empty(0, np.float32)

    @property
    def ready(self) -> bool:
        return self._decoder is not None

    def load(self) -> None:
        self.metadata = json.loads((self.folder / "model.json").read_text())
        if self.precision not in self.metadata["precisions"]:
            raise ValueError(f"{self.folder} has no {self.precision} build")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        base = self.folder / self.precision
        self._encoder = ort.InferenceSession(
            str(base / "encoder.onnx"), options, providers=providers
        )
        self._tokenizer = spm.SentencePieceProcessor(
            model_file=str(self.folder / self.metadata["vocab"])
        )
        dtype = np.dtype(self.metadata["decoder"]["out_weight_dtype"][self.precision])
        with np.load(self.folder / self.metadata["output_projection"]) as projection:
            weight = projection["weight"]
            if dtype == np.int8:
                weight = np.rint(weight / projection["int8_scale"])
            self._out_bias = np.array(projection["bias"], dtype=np.float32)
        # Two layouts of one table: whole rows gather fast for a shortlist, and the
        # full-vocabulary step wants [d, V] so no transpose of the table happens per step.
        self._embeddings = np.ascontiguousarray(weight, dtype=dtype)
        self._out_weight = np.ascontiguousarray(self._embeddings.T)
        # Marian never emits <unk> unless told to.
        self._out_bias[self.metadata["unk_id"]] = -np.inf
        if self.metadata.get("shortlist"):
            with np.load(self.folder / self.metadata["shortlist"]) as lex:
                self._shortlist = _Shortlist(
                    lex["offsets"].astype(np.int64), lex["targets"], int(lex["first_num"])
                )
        self._decoder = ort.InferenceSession(
            str(base / "decoder.onnx"), options, providers=providers
        )

    def translate_batch(
        self,
        texts: list[str],
        beam_size: int = 1,
        max_len: int | None = None,
        shortlist: bool | None = None,
    ) -> list[TranslationOut]:
        """Translate `texts`; `max_len` caps target tokens (default: 2.5 x source tokens).

        `shortlist` overrides the instance default for this call.
        """
        if self._decoder is None or self._tokenizer is None:
            raise RuntimeError("load() first")
        if not texts:
            return []
        eos = int(self.metadata["eos_id"])
        sources = [[*self._tokenizer.encode(text), eos] for text in texts]
        limits = np.array(
            [max_len or int(self.metadata["max_length_factor"] * len(s)) for s in sources]
        )
        encoded = self._encode(sources)
        vocab, allowed = self._vocabulary(
            sources, self.use_shortlist if shortlist is None else shortlist
        )
        if beam_size <= 1:
            outputs = self._greedy(encoded, vocab, allowed, limits)
        else:
            outputs = self._beam(encoded, vocab, allowed, limits, beam_size)
        return [TranslationOut(self._tokenizer.decode(ids), ids) for ids in outputs]

    def _encode(self, sources: list[list[int]]) -> _Encoded:
        assert self._encoder is not None
        length = max(len(s) for s in sources)
        ids = np.zeros((len(sources), length), np.int64)
        mask = np.zeros((len(sources), length), np.float32)
        for row, source in enumerate(sources):
            ids[row, : len(source)] = source
            mask[row, : len(source)] = 1.0
        _, keys, values = self._encoder.run(None, {"src_ids": ids, "src_mask": mask})
        return _Encoded(keys, values, mask)

    def _vocabulary(
        self, sources: list[list[int]], use_shortlist: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Columns to score for this batch and each row's allowed subset of them.

        Returns (None, None) for the full vocabulary. Otherwise the sorted union of the
        rows' shortlists and a [rows, K] additive mask (0 allowed, -inf not).
        """
        if not use_shortlist or self._shortlist is None:
            return None, None
        per_row = [self._shortlist.allowed(np.asarray(s)) for s in sources]
        vocab = np.unique(np.concatenate(per_row))
        allowed = np.full((len(sources), len(vocab)), -np.inf, np.float32)
        for row, ids in enumerate(per_row):
            allowed[row, np.searchsorted(vocab, ids)] = 0.0
        return vocab, allowed

    def _projection(self, vocab: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if vocab is None:
            return self._out_weight, self._out_bias
        return np.ascontiguousarray(self._embeddings[vocab].T), self._out_bias[vocab]

    def _step(
        self,
        prev: np.ndarray,
        step: int,
        state: np.ndarray,
        encoded: _Encoded,
        projection: tuple[np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._decoder is not None
        logits, new_state = self._decoder.run(
            None,
            {
                "prev_ids": prev,
                "step": np.array([step], np.int64),
                "state": state,
                "cross_keys": encoded.keys,
                "cross_values": encoded.values,
                "src_mask": encoded.mask,
                "out_weight": projection[0],
                "out_bias": projection[1],
            },
        )
        return logits, new_state

    def _initial_state(self, rows: int) -> np.ndarray:
        return np.zeros(
            (self.metadata["decoder_layers"], rows, self.metadata["d_model"]), np.float32
        )

    def _greedy(
        self,
        encoded: _Encoded,
        vocab: np.ndarray | None,
        allowed: np.ndarray | None,
        limits: np.ndarray,
    ) -> list[list[int]]:
        eos = int(self.metadata["eos_id"])
        projection = self._projection(vocab)
        outputs: list[list[int]] = [[] for _ in limits]
        alive = np.arange(len(limits))  # original row of each decoded row
        state = self._initial_state(len(alive))
        prev = np.full(len(alive), -1, np.int64)
        step = 0
        while len(alive):
            logits, state = self._step(prev, step, state, encoded, projection)
            if allowed is not None:
                logits += allowed[alive]
            best = logits.argmax(-1)
            tokens = best if vocab is None else vocab[best]
            step += 1
            keep = (tokens != eos) & (step < limits[alive])
            for row, token in zip(alive, tokens, strict=True):
                if token != eos:
                    outputs[row].append(int(token))
            if not keep.all():
                encoded = encoded.take(np.flatnonzero(keep))
                state = np.ascontiguousarray(state[:, keep])
                alive, tokens = alive[keep], tokens[keep]
            prev = tokens.astype(np.int64)
        return outputs

    def _beam(
        self,
        encoded: _Encoded,
        vocab: np.ndarray | None,
        allowed: np.ndarray | None,
        limits: np.ndarray,
        beam_size: int,
    ) -> list[list[int]]:
        """Marian-style beam search: a hypothesis that ends leaves the beam, which shrinks;
        a sentence is done when its beam is empty. Scores are summed log-probabilities;
        the best finished hypothesis wins after dividing by its length (EOS included)."""
        eos = int(self.metadata["eos_id"])
        projection = self._projection(vocab)
        sentences = len(limits)
        # Alive hypotheses, one row each: sentence, tokens so far, score.
        owners = np.arange(sentences)
        tokens: list[list[int]] = [[] for _ in range(sentences)]
        scores = np.zeros(sentences, np.float64)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(sentences)]
        state = self._initial_state(sentences)
        rows_encoded = encoded
        prev = np.full(sentences, -1, np.int64)
        step = 0
        while len(owners):
            logits, state = self._step(prev, step, state, rows_encoded, projection)
            if allowed is not None:
                logits += allowed[owners]
            log_probs = logits - _logsumexp(logits)
            step += 1
            candidates = scores[:, None] + log_probs  # [rows, K]
            next_rows: list[int] = []
            next_tokens: list[list[int]] = []
            next_scores: list[float] = []
            next_owners: list[int] = []
            for sentence in np.unique(owners):
                rows = np.flatnonzero(owners == sentence)
                flat = candidates[rows].ravel()
                width = min(beam_size - len(finished[sentence]), flat.size)
                best = np.argpartition(-flat, width - 1)[:width]
                for index in best[np.argsort(-flat[best], kind="stable")]:
                    local, column = divmod(int(index), candidates.shape[1])
                    row = rows[local]
                    token = int(column if vocab is None else vocab[column])
                    score = float(flat[index])
                    history = tokens[row]
                    if token == eos:
                        finished[sentence].append((score / (len(history) + 1), history))
                    elif step >= limits[sentence]:
                        ended = [*history, token]
                        finished[sentence].append((score / len(ended), ended))
                    else:
                        next_rows.append(row)
                        next_tokens.append([*history, token])
                        next_scores.append(score)
                        next_owners.append(sentence)
            if not next_rows:
                break
            chosen = np.array(next_rows)
            state = np.ascontiguousarray(state[:, chosen])
            rows_encoded = encoded.take(np.array(next_owners))
            prev = np.array([t[-1] for t in next_tokens], np.int64)
            owners, tokens, scores = np.array(next_owners), next_tokens, np.array(next_scores)
        return [max(done, key=lambda item: item[0])[1] if done else [] for done in finished]


def _logsumexp(logits: np.ndarray) -> np.ndarray:
    peak = logits.max(-1, keepdims=True)
    return peak + np.log(np.exp(logits - peak).sum(-1, keepdims=True))
