"""Whisper on raw onnxruntime sessions: features, language id and greedy decoding.

Runs the folders `services.asr.build_models` writes (`onnx-fp32/` or `onnx-int8/`) with
numpy, onnxruntime and tokenizers only — no torch, no transformers. Decoding follows
CTranslate2 (faster-whisper's engine) step for step: the same suppressed tokens, the same
timestamp rules, greedy choice, so on the fp32 graphs it yields the same tokens.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from tokenizers import Tokenizer

Task = Literal["transcribe", "translate"]

# Each timestamp token is 20 ms: two mel frames, as the encoder halves the frame rate.
TIME_PRECISION = 0.02
# CTranslate2 decodes at most half the decoder's 448 positions by default.
DEFAULT_MAX_NEW_TOKENS = 224
# Whisper's rule for skipping a window as silence: likely no speech and a weak transcript.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4
_MEL_FLOOR = 1e-10
# Written by the build beside graphs whose results depend on what else is in the batch.
QUANTIZATION_FILE = "quantization.json"
# The project's own export of the encoder that takes any number of frames (optimum's takes
# exactly 3000): short clips need not pay for a 30 s window.
ANY_LENGTH_ENCODER = "encoder_any_length_model.onnx"


@dataclass(frozen=True)
class Segment:
    """A stretch of text between two timestamp tokens; times in seconds."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcription:
    """One item's result.

    `tokens` are the generated ids without the prompt and the end token (timestamp tokens
    included when asked for). `avg_logprob` averages the chosen tokens' log probabilities,
    the end token included, after suppression. `no_speech_prob` is the probability of the
    no-speech token right after <|startoftranscript|>.
    """

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    language: str | None
    language_probability: float | None
    segments: list[Segment]


@dataclass(frozen=True)
class FrontEnd:
    """Whisper's audio front end, as preprocessor_config.json describes it."""

    sampling_rate: int
    n_fft: int
    hop_length: int
    n_samples: int
    mel_filters: np.ndarray  # [n_mels, 1 + n_fft // 2]


def mel_filter_bank(n_mels: int, n_fft: int, sampling_rate: int) -> np.ndarray:
    """Slaney-style mel filters, [n_mels, 1 + n_fft // 2] (what librosa and HF compute)."""

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        mel = 3.0 * hz / 200.0
        log_region = hz >= 1000.0
        return np.where(
            log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mel
        )

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        hz = 200.0 * mel / 3.0
        return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), hz)

    fft_freqs = np.linspace(0, sampling_rate // 2, 1 + n_fft // 2)
    mel_edges = np.linspace(
        hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sampling_rate / 2)), n_mels + 2
    )
    edges = mel_to_hz(mel_edges)
    widths = np.diff(edges)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    # Slaney normalisation: each triangle has unit area, so bands carry comparable energy.
    filters *= 2.0 / (edges[2 : n_mels + 2] - edges[:n_mels])
    return filters.T


def log_mel_spectrogram(
    audio: np.ndarray, front: FrontEnd, frames: int | None = None
) -> np.ndarray:
    """Whisper's input for one clip: [n_mels, n_samples // hop] float32, padded to 30 s.

    With `frames`, only the first that many: the same values, as long as the frames left
    out reach no audio (each frame's window starts half an FFT before it), since only
    padding then lies in them and it never sets the level every frame is scaled from."""
    clip = np.asarray(audio, np.float64)[: front.n_samples]
    if clip.ndim != 1:
        raise ValueError(f"expected mono samples, got shape {clip.shape}")
    samples = np.zeros(front.n_samples, np.float64)
    samples[: len(clip)] = clip
    half = front.n_fft // 2
    padded = np.pad(samples, half, mode="reflect")
    # Whisper drops the last frame so 30 s gives exactly 3000 frames.
    count = front.n_samples // front.hop_length
    if frames is not None:
        if frames * front.hop_length < len(clip) + front.n_fft // 2:
            raise ValueError(f"{frames} frames do not cover {len(clip)} samples")
        count = min(count, frames)
    windows = sliding_window_view(padded, front.n_fft)[:: front.hop_length][:count]
    window = np.hanning(front.n_fft + 1)[:-1]  # periodic Hann, as torch.stft and HF use
    power = np.abs(np.fft.rfft(windows * window, axis=-1)) ** 2
    mel = front.mel_filters @ power.T
    log_spec = np.log10(np.maximum(mel, _MEL_FLOOR))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


class WhisperOnnx:
    """A Whisper model exported by optimum: encoder, decoder and decoder-with-past graphs.

    Thread-safe once loaded: onnxruntime sessions may run concurrently and every call
    keeps its own state.
    """

    def __init__(self, folder: Path, *, threads: int = 1) -> None:
        self.folder = Path(folder)
        self.threads = threads
        self._runtime: _Runtime | None = None

    @property
    def ready(self) -> bool:
        return self._runtime is not None

    def load(self) -> None:
        """Read the json files and open the three sessions."""
        config = _read_json(self.folder / "config.json")
        generation = _read_json(self.folder / "generation_config.json")
        preprocessor = _read_json(self.folder / "preprocessor_config.json")
        quantization = self.folder / QUANTIZATION_FILE
        batch_independent = not quantization.is_file() or bool(
            _read_json(quantization).get("batch_independent", True)
        )
        tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        no_speech = tokenizer.token_to_id("<|nospeech|>") or tokenizer.token_to_id("<|nocaptions|>")
        if no_speech is None:
            raise ValueError(f"{self.folder}: tokenizer has no <|nospeech|> token")
        no_timestamps = int(generation["no_timestamps_token_id"])
        tokens = SpecialIds(
            eot=int(generation["eos_token_id"]),
            sot=int(generation["decoder_start_token_id"]),
            no_timestamps=no_timestamps,
            no_speech=int(no_speech),
            max_initial_timestamp=no_timestamps
            + 1
            + int(generation.get("max_initial_timestamp_index", 50)),
            languages={k[2:-2]: int(i) for k, i in generation.get("lang_to_id", {}).items()},
            tasks={k: int(i) for k, i in generation.get("task_to_id", {}).items()},
            suppress=np.array(generation.get("suppress_tokens", []), np.int64),
            suppress_begin=np.array(generation.get("begin_suppress_tokens", []), np.int64),
        )
        sampling_rate = int(preprocessor["sampling_rate"])
        n_fft = int(preprocessor["n_fft"])
        front = FrontEnd(
            sampling_rate=sampling_rate,
            n_fft=n_fft,
            hop_length=int(preprocessor["hop_length"]),
            n_samples=int(preprocessor["chunk_length"]) * sampling_rate,
            mel_filters=mel_filter_bank(int(preprocessor["feature_size"]), n_fft, sampling_rate),
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would spin for work and take the core that Python needs for
        # the decoding loop between runs (and other streams): measured 25-30% more audio per
        # second on 2 cores without spinning, single clips faster too.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                str(self.folder / name), options, providers=["CPUExecutionProvider"]
            )

        self._runtime = _Runtime(
            ids=tokens,
            tokenizer=tokenizer,
            front=front,
            multilingual=bool(generation.get("is_multilingual", False)),
            max_positions=int(config["max_target_positions"]),
            batch_independent=batch_independent,
            encoder=session("encoder_model.onnx"),
            decoder=session("decoder_model.onnx"),
            decoder_with_past=session("decoder_with_past_model.onnx"),
            encoder_any_length=(
                session(ANY_LENGTH_ENCODER)
                if (self.folder / ANY_LENGTH_ENCODER).is_file()
                else None
            ),
        )

    @property
    def multilingual(self) -> bool:
        return self._require().multilingual

    @property
    def languages(self) -> list[str]:
        """Language codes the model takes (empty for English-only models)."""
        return list(self._require().ids.languages)

    @property
    def sampling_rate(self) -> int:
        return self._require().front.sampling_rate

    def features(self, audios: Sequence[np.ndarray], frames: int | None = None) -> np.ndarray:
        """Log-mel features [batch, n_mels, 3000] of 16 kHz mono float clips (<= 30 s used),
        or their first `frames` (which must cover every clip)."""
        front = self._require().front
        return np.stack([log_mel_spectrogram(audio, front, frames) for audio in audios])

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Encoder states [batch, 1500, d_model]."""
        runtime = self._require()
        return runtime.run(runtime.encoder, {"input_features": features})["last_hidden_state"]

    def _encode_window(
        self, audios: Sequence[np.ndarray], margin_s: float | None
    ) -> tuple[np.ndarray, bool]:
        """Encoder states of the clips, and whether a short window was used: with a margin
        (and a model that has the any-length encoder), the window is the longest clip plus
        the margin instead of 30 s."""
        runtime = self._require()
        front = runtime.front
        if margin_s is not None and runtime.encoder_any_length is not None:
            longest = max(len(audio) for audio in audios) + margin_s * front.sampling_rate
            frames = 2 * math.ceil(longest / front.hop_length / 2)  # the second conv halves it
            if frames < front.n_samples // front.hop_length:
                short = self.features(audios, frames)
                encoded = runtime.run(runtime.encoder_any_length, {"input_features": short})
                return encoded["last_hidden_state"], True
        return self.encode(self.features(audios)), False

    def detect_language(self, encoder_out: np.ndarray) -> list[tuple[str, float]]:
        """Most likely language code and its probability, per item (multilingual only)."""
        runtime = self._require()
        if not runtime.multilingual:
            raise ValueError("detect_language needs a multilingual model")
        codes = list(runtime.ids.languages)
        lang_ids = np.array([runtime.ids.languages[c] for c in codes])
        start = np.full((len(encoder_out), 1), runtime.ids.sot, np.int64)
        logits = runtime.run(
            runtime.decoder, {"input_ids": start, "encoder_hidden_states": encoder_out}
        )["logits"]
        probs = _softmax(logits[:, 0, lang_ids].astype(np.float64))
        best = probs.argmax(axis=-1)
        return [(codes[b], float(p[b])) for b, p in zip(best, probs, strict=True)]

    def generate(
        self,
        audios: Sequence[np.ndarray],
        *,
        language: str | Sequence[str | None] | None = None,
        task: Task = "transcribe",
        timestamps: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        window_margin_s: float | None = None,
        abandoned: Callable[[int], bool] | None = None,
    ) -> list[Transcription]:
        """Greedy-decode each clip (up to 30 s is used). `language=None` detects it per item.

        Items do not influence each other: a batch gives each clip the tokens it gets
        alone. With `window_margin_s`, short clips are encoded in a window of their length
        plus the margin (far less work than 30 s); a result that looks degenerate there
        (Whisper's own fallback rules) is decoded again in the full window. Clip `i` leaves
        the batch at the next decoding step once `abandoned(i)` is true (its caller has
        gone), so its result is cut short and meaningless.
        """
        runtime = self._require()
        count = len(audios)
        if count == 0:
            return []
        if language is None or isinstance(language, str):
            languages: list[str | None] = [language] * count
        else:
            languages = list(language)
        if len(languages) != count:
            raise ValueError(f"{len(languages)} languages for {count} clips")
        encoder_out, short_window = self._encode_window(audios, window_margin_s)
        chosen = self._resolve_languages(languages, task, encoder_out)
        prompts = np.array([runtime.prompt(code, task, timestamps) for code, _ in chosen], np.int64)
        limit = min(max_new_tokens, runtime.max_positions - prompts.shape[1])
        tokens, logprobs, no_speech = runtime.decode(
            prompts, encoder_out, timestamps, limit, abandoned
        )
        window = runtime.front.n_samples
        results = []
        for i, audio in enumerate(audios):
            duration = min(len(audio), window) / runtime.front.sampling_rate
            segments = (
                runtime.segments(tokens[i], duration, keep_tail=True)[0] if timestamps else []
            )
            results.append(
                Transcription(
                    tokens=tokens[i],
                    text=runtime.text(tokens[i]),
                    avg_logprob=float(np.mean(logprobs[i])) if logprobs[i] else 0.0,
                    no_speech_prob=no_speech[i],
                    language=chosen[i][0],
                    language_probability=chosen[i][1],
                    segments=segments,
                )
            )
        redo = [
            i
            for i, result in enumerate(results)
            if short_window and looks_degenerate(result) and not (abandoned and abandoned(i))
        ]
        if redo:
            again = self.generate(
                [audios[i] for i in redo],
                language=[languages[i] for i in redo],
                task=task,
                timestamps=timestamps,
                max_new_tokens=max_new_tokens,
                abandoned=None if abandoned is None else lambda j: abandoned(redo[j]),
            )
            for i, result in zip(redo, again, strict=True):
                results[i] = result
        return results

    def transcribe_long(
        self,
        audio: np.ndarray,
        *,
        language: str | None = None,
        task: Task = "transcribe",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> Transcription:
        """Whisper's sequential decoding over 30 s windows, seeking by timestamp tokens.

        A window's unfinished last segment is decoded again at the start of the next
        window; windows judged silent (Whisper's no-speech rule) are skipped. The language
        is detected on the first window and kept. `tokens` joins the windows' tokens (their
        timestamps count from their own window); `avg_logprob` is the token-weighted mean
        of the windows' averages.
        """
        runtime = self._require()
        rate, window = runtime.front.sampling_rate, runtime.front.n_samples
        seek = 0
        segments: list[Segment] = []
        tokens: list[int] = []
        logprob_sum, logprob_count = 0.0, 0
        first: Transcription | None = None
        while seek < len(audio):
            chunk = audio[seek : seek + window]
            (result,) = self.generate(
                [chunk],
                language=language,
                task=task,
                timestamps=True,
                max_new_tokens=max_new_tokens,
            )
            if first is None:
                first = result
                language = result.language
            silent = (
                result.no_speech_prob > NO_SPEECH_THRESHOLD
                and result.avg_logprob < LOGPROB_THRESHOLD
            )
            if silent:
                seek += len(chunk)
                continue
            found, used, resume = runtime.segments(
                result.tokens, len(chunk) / rate, keep_tail=False
            )
            offset = seek / rate
            segments += [
                Segment(round(offset + s.start, 3), round(offset + s.end, 3), s.text) for s in found
            ]
            tokens += result.tokens[:used]
            logprob_sum += result.avg_logprob * (len(result.tokens) + 1)
            logprob_count += len(result.tokens) + 1
            advance = round(resume * rate) if resume is not None else len(chunk)
            # A window ending on a zero-length segment would otherwise never move on.
            seek += advance if advance > 0 else len(chunk)
        return Transcription(
            tokens=tokens,
            text=" ".join(s.text for s in segments if s.text),
            avg_logprob=logprob_sum / logprob_count if logprob_count else 0.0,
            no_speech_prob=first.no_speech_prob if first else 1.0,
            language=language,
            language_probability=first.language_probability if first else None,
            segments=segments,
        )

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of token ids; control and timestamp ids are left out."""
        return self._require().text(tokens)

    def prompt(self, language: str | None, task: Task, timestamps: bool) -> list[int]:
        """The ids decoding starts from (what CTranslate2's `generate` takes as a prompt)."""
        return self._require().prompt(language, task, timestamps)

    def _require(self) -> _Runtime:
        if self._runtime is None:
            raise RuntimeError(f"{self.folder}: call load() first")
        return self._runtime

    def _resolve_languages(
        self, languages: list[str | None], task: Task, encoder_out: np.ndarray
    ) -> list[tuple[str | None, float | None]]:
        runtime = self._require()
        if not runtime.multilingual:
            if task != "transcribe" or any(code not in (None, "en") for code in languages):
                raise ValueError("an English-only model transcribes English only")
            return [("en", None) for _ in languages]
        known = runtime.ids.languages
        unknown = sorted({c for c in languages if c is not None and c not in known})
        if unknown:
            raise ValueError(f"unknown language codes: {unknown}")
        chosen: list[tuple[str | None, float | None]] = [(c, None) for c in languages]
        undecided = [i for i, code in enumerate(languages) if code is None]
        if undecided:
            found = self.detect_language(encoder_out[undecided])
            for i, (code, probability) in zip(undecided, found, strict=True):
                chosen[i] = (code, probability)
        return chosen


@dataclass(frozen=True)
class SpecialIds:
    """Whisper's control token ids and generation settings, from generation_config.json."""

    eot: int
    sot: int
    no_timestamps: int
    no_speech: int
    max_initial_timestamp: int
    languages: dict[str, int]
    tasks: dict[str, int]
    suppress: np.ndarray
    suppress_begin: np.ndarray

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1


@dataclass(frozen=True)
class _Runtime:
    """What `load()` opened: the decoding logic works on this."""

    ids: SpecialIds
    tokenizer: Tokenizer
    front: FrontEnd
    multilingual: bool
    max_positions: int
    batch_independent: bool
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    decoder_with_past: ort.InferenceSession
    encoder_any_length: ort.InferenceSession | None  # absent from exports that are not ours

    def run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        """Run a graph on a batch; every input and output has the batch first.

        Graphs whose int8 activations are scaled over the whole tensor run one item at a
        time, so no clip can change another's result.
        """
        names = [o.name for o in session.get_outputs()]
        if self.batch_independent:
            return dict(zip(names, session.run(None, feed), strict=True))
        count = len(next(iter(feed.values())))
        parts = [
            session.run(None, {k: v[i : i + 1] for k, v in feed.items()}) for i in range(count)
        ]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}

    def text(self, tokens: Sequence[int]) -> str:
        text_tokens = [t for t in tokens if t < self.ids.eot]
        return str(self.tokenizer.decode(text_tokens, skip_special_tokens=True)).strip()

    def prompt(self, language: str | None, task: Task, timestamps: bool) -> list[int]:
        prompt = [self.ids.sot]
        if self.multilingual:
            prompt += [self.ids.languages[language or "en"], self.ids.tasks[task]]
        if not timestamps:
            prompt.append(self.ids.no_timestamps)
        return prompt

    def decode(
        self,
        prompts: np.ndarray,
        encoder_out: np.ndarray,
        timestamps: bool,
        limit: int,
        abandoned: Callable[[int], bool] | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[float]]:
        """Greedy decoding with the KV cache; finished and abandoned items leave the batch.

        Returns per item the tokens (without the end token), the log probability of each
        choice (the end token's included) and the no-speech probability.
        """
        count = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(count)]
        logprobs: list[list[float]] = [[] for _ in range(count)]
        out = self.run(self.decoder, {"input_ids": prompts, "encoder_hidden_states": encoder_out})
        no_speech = _softmax(out["logits"][:, 0].astype(np.float64))[:, self.ids.no_speech]
        logits = out["logits"][:, -1]
        cross = {_past(k): v for k, v in out.items() if ".encoder." in k}
        own = {_past(k): v for k, v in out.items() if ".decoder." in k}
        active = np.arange(count)
        for step in range(limit):
            chosen, chosen_logprobs = self.choose(
                logits, [tokens[i] for i in active], step, timestamps
            )
            still = []
            for row, item in enumerate(active):
                logprobs[item].append(float(chosen_logprobs[row]))
                if chosen[row] != self.ids.eot:
                    tokens[item].append(int(chosen[row]))
                    if not (abandoned and abandoned(int(item))):
                        still.append(row)
            if not still or step == limit - 1:
                break
            if len(still) < len(active):
                keep = np.array(still)
                active, chosen = active[keep], chosen[keep]
                cross = {k: v[keep] for k, v in cross.items()}
                own = {k: v[keep] for k, v in own.items()}
            feed = {"input_ids": chosen[:, None].astype(np.int64), **own, **cross}
            out = self.run(self.decoder_with_past, feed)
            logits = out["logits"][:, -1]
            own = {_past(k): v for k, v in out.items() if ".decoder." in k}
        return tokens, logprobs, [float(p) for p in no_speech]

    def choose(
        self, logits: np.ndarray, history: list[list[int]], step: int, timestamps: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Next token per row: suppression, timestamp rules, then the argmax."""
        scores = logits.astype(np.float32, copy=True)
        scores[:, self.ids.suppress] = -np.inf
        if step == 0:
            scores[:, self.ids.suppress_begin] = -np.inf
        if timestamps:
            for row, previous in enumerate(history):
                self.timestamp_rules(scores[row], previous)
        log_probs = _log_softmax(scores)
        chosen = scores.argmax(axis=-1)
        return chosen, log_probs[np.arange(len(chosen)), chosen]

    def timestamp_rules(self, scores: np.ndarray, previous: list[int]) -> None:
        """Whisper's timestamp rules (as CTranslate2 applies them) for one row, in place."""
        begin = self.ids.timestamp_begin
        scores[self.ids.no_timestamps] = -np.inf
        if not previous:
            scores[:begin] = -np.inf
            scores[self.ids.max_initial_timestamp + 1 :] = -np.inf
            return
        last = previous[-1]
        if last >= begin:
            # Timestamps come in pairs; a lone first timestamp counts as a pair's end.
            penultimate = previous[-2] if len(previous) > 1 else last
            if penultimate >= begin:
                scores[begin:] = -np.inf
                return
            # A segment's end: a timestamp no earlier than its start, or the end token.
            scores[: self.ids.eot] = -np.inf
            scores[begin:last] = -np.inf
        else:
            # Inside a segment time moves forward, so no segment has zero length.
            stamps = [t for t in previous if t >= begin]
            if stamps:
                scores[begin : stamps[-1] + 1] = -np.inf
        log_probs = _log_softmax(scores[None])[0]
        if _logsumexp(log_probs[begin:]) > log_probs[:begin].max():
            scores[:begin] = -np.inf

    def segments(
        self, tokens: list[int], duration: float, *, keep_tail: bool
    ) -> tuple[list[Segment], int, float | None]:
        """Split timestamped tokens into segments, as Whisper does.

        Returns the segments, how many tokens they used, and where (seconds into the
        window) decoding should resume, or None when the window was used up. With
        `keep_tail`, text after the last closed segment becomes a segment ending at
        `duration` instead of being left for the next window.
        """
        begin = self.ids.timestamp_begin

        def seconds(token: int) -> float:
            return round((token - begin) * TIME_PRECISION, 3)

        is_stamp = [t >= begin for t in tokens]
        pairs = [i for i in range(1, len(tokens)) if is_stamp[i - 1] and is_stamp[i]]
        single_ending = len(tokens) >= 2 and is_stamp[-2:] == [False, True]
        if not pairs:
            stamps = [t for t in tokens if t >= begin]
            start = seconds(stamps[0]) if stamps else 0.0
            end = seconds(stamps[-1]) if stamps and stamps[-1] != begin else duration
            return [Segment(start, end, self.text(tokens))], len(tokens), None
        cuts = [*pairs, len(tokens)] if single_ending else pairs
        segments, last = [], 0
        for cut in cuts:
            piece = tokens[last:cut]
            segments.append(Segment(seconds(piece[0]), seconds(piece[-1]), self.text(piece)))
            last = cut
        if single_ending:
            return segments, len(tokens), None
        resume = seconds(tokens[last - 1])
        tail = tokens[last:]
        if keep_tail and any(t < self.ids.eot for t in tail):
            segments.append(Segment(seconds(tail[0]), duration, self.text(tail)))
            return segments, len(tokens), None
        return segments, last, resume


def _past(output_name: str) -> str:
    """The with-past graph's input name for a cache output (`present.*` -> `past_key_values.*`)."""
    return output_name.replace("present", "past_key_values", 1)


def looks_degenerate(result: Transcription) -> bool:
    """Whisper's fallback rules: text that repeats itself (gzip compresses it more than
    2.4 times) or tokens the model was unsure of (mean log-probability below -1)."""
    data = result.text.encode()
    repeats = len(data) > 0 and len(data) / len(zlib.compress(data)) > COMPRESSION_RATIO_THRESHOLD
    return repeats or result.avg_logprob < LOGPROB_THRESHOLD


def _read_json(path: Path) -> dict[str, Any]:
    content = json.loads(path.read_text())
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return content


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def _logsumexp(x: np.ndarray) -> float:
    top = float(x.max())
    if top == -np.inf:
        return top
    return top + float(np.log(np.exp(x - top).sum()))
