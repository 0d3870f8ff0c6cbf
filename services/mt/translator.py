"""The mt domain: the models of the registry, one dynamic batcher per model, the cache,
sentence splitting, protected spans and pivoting.

A call's texts are split into sentences; each sentence's protected spans become
placeholders; the distinct sentences of the call go, leg by leg along their route, first
to the cache and then to their model's batcher, where they share batches with every other
caller's sentences. Translations are put back together per text, in order.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar, cast

from prometheus_client import Counter

from services.common.batching import DynamicBatcher
from services.common.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from services.common.languages import normalize_language
from services.mt.cache import TranslationCache
from services.mt.marian_onnx import MarianOnnx
from services.mt.registry import Leg, ModelSpec, Registry, Route, model_specs
from services.mt.settings import MtSettings, Precision
from services.mt.text import (
    Protected,
    Sentence,
    Terms,
    detect_language,
    has_words,
    join_sentences,
    protect,
    split_sentences,
)

T = TypeVar("T")

MAX_TERMS = 256
MAX_TERM_CHARS = 200
# Violations listed per refusal; a 64-text batch of bad texts need not list all of them.
# C0 and C1 controls, except tab, line feed and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WARM_UP = "Good morning, how are you?"

sentences_total = Counter(
    "speechmesh_mt_sentences_total",
    "Sentences through a model leg, by where the translation came from (model or cache).",
    ["model", "origin"],
)
fallbacks_total = Counter(
    "speechmesh_mt_placeholder_fallbacks_total",
    "Sentences translated again around their protected spans after the model lost a placeholder.",
    ["route"],
)


class TranslationModel(Protocol):
    # Identifies the build, so a rebuilt model never reads its predecessor's cache entries.
    version: str

    def load(self) -> None: ...

    def translate(
        self, texts: list[str], beam_size: int, source: str, target: str
    ) -> list[str]: ...


class BergamotModel:
    """A Bergamot student through the torch-free ONNX runner."""

    def __init__(self, folder: Path, precision: Precision, threads: int) -> None:
        self.runner = MarianOnnx(folder, precision, threads)
        self.version = ""

    def load(self) -> None:
        self.runner.load()
        stamp = self.runner.folder / ".stamp"
        self.version = stamp.read_text()[:16] if stamp.is_file() else ""

    def translate(self, texts: list[str], beam_size: int, source: str, target: str) -> list[str]:
        return [out.text for out in self.runner.translate_batch(texts, beam_size)]


# What the batcher carries: (source, target, beam, sentence); the first three are the key.
_Item = tuple[str, str, int, str]


def _run_batch(model: TranslationModel, key: Hashable, items: Sequence[_Item]) -> list[str]:
    source, target, beam = cast(tuple[str, str, int], key)
    return model.translate([item[3] for item in items], beam, source, target)


def _batch_key(item: _Item) -> tuple[str, str, int]:
    return item[0], item[1], item[2]


@dataclass(frozen=True)
class TranslateJob:
    texts: Sequence[str]
    target_language: str
    # Empty: detect it per text.
    source_language: str = ""
    glossary: Sequence[tuple[str, str]] = ()
    do_not_translate: Sequence[str] = ()
    beam_size: int = 0


@dataclass(frozen=True)
class TextResult:
    text: str
    source_language: str
    # Empty when the text was already in the target language.
    models: tuple[str, ...]
    cached: bool


@dataclass(frozen=True)
class _Outcome:
    text: str
    # Whether every leg's translation came from the cache; None when no model was needed.
    cached: bool | None


@dataclass(frozen=True)
class _TextPlan:
    text: str
    source: str
    # None when the text is returned as it is (already in the target language).
    route: Route | None
    leading: str
    sentences: list[Sentence]
    protected: list[Protected]


class Translator:
    def __init__(self, settings: MtSettings, cache: TranslationCache | None) -> None:
        self.settings = settings
        self.cache = cache
        self.specs = model_specs(settings.bergamot_models, settings.hf_models)
        self.registry = Registry(self.specs, settings.pivot_language)
        self.models: dict[str, TranslationModel] = {}
        self._batchers: dict[str, DynamicBatcher[_Item, str]] = {}

    @property
    def ready(self) -> bool:
        return bool(self._batchers)

    def load(self) -> None:
        """Loads and warms up every model. Blocking: run it off the event loop."""
        for spec in self.specs:
            model = self._create(spec)
            model.load()
            for source, target in spec.pairs:
                for beam in (1, 2):
                    model.translate([_WARM_UP], beam, source, target)
            self.models[spec.name] = model

    def _create(self, spec: ModelSpec) -> TranslationModel:
        settings = self.settings
        if spec.family == "bergamot":
            return BergamotModel(spec.folder, settings.precision, settings.threads)
        # Imported only here: the Hugging Face path needs torch, the Bergamot path does not.
        from services.mt.hf_seq2seq import HfSeq2Seq

        return HfSeq2Seq(spec.folder, settings.hf_export_dir, settings.precision, settings.threads)

    def start(self) -> None:
        """Starts a batcher per loaded model; translations are served from then on."""
        settings = self.settings
        for name, model in self.models.items():
            batcher: DynamicBatcher[_Item, str] = DynamicBatcher(
                f"mt-{name}",
                partial(_run_batch, model),
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1000,
                max_queue=settings.max_queue,
                batch_key=_batch_key,
            )
            batcher.start()
            self._batchers[name] = batcher

    async def stop(self) -> None:
        batchers, self._batchers = self._batchers, {}
        for batcher in batchers.values():
            await batcher.stop()
        if self.cache is not None:
            await self.cache.flush()

    def routes(self) -> list[Route]:
        return self.registry.routes()

    async def translate(self, job: TranslateJob, timeout_s: float | None) -> list[TextResult]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        source, target, terms, beam = self._validate(job)
        if not self.ready:
            # The port opens before the models are loaded: a retry elsewhere or later helps.
            raise Unavailable("models are loading", reason="MODEL_NOT_READY", retry_after_s=5.0)
        plans = [self._plan(i, text, source, target, terms) for i, text in enumerate(job.texts)]
        sentence_count = sum(len(plan.sentences) for plan in plans)
        if sentence_count > self.settings.max_queue:
            # More than the queue can ever hold: waiting and retrying would not help.
            raise InvalidArgument.field(
                "texts",
                f"{sentence_count} sentences in all; at most {self.settings.max_queue} per call",
            )

        wanted: dict[Route, set[str]] = {}
        for plan in plans:
            if plan.route is not None:
                wanted.setdefault(plan.route, set()).update(p.masked for p in plan.protected)
        outcomes = await self._run_routes(wanted, beam, deadline)

        # A sentence whose placeholders did not survive is translated again in the pieces
        # between its spans, which keeps the spans whatever the model does.
        restored: dict[tuple[Route, Protected], str] = {}
        retry: dict[Route, set[str]] = {}
        for plan in plans:
            if plan.route is None:
                continue
            for protected in plan.protected:
                text = protected.restore(outcomes[plan.route, protected.masked].text)
                if text is None:
                    fallbacks_total.labels(f"{plan.source}-{target}").inc()
                    retry.setdefault(plan.route, set()).update(
                        piece.strip() for piece in protected.pieces if has_words(piece)
                    )
                else:
                    restored[plan.route, protected] = text
        if retry:
            outcomes.update(await self._run_routes(retry, beam, deadline))
        return [self._assemble(plan, outcomes, restored) for plan in plans]

    def _plan(
        self, index: int, text: str, source: str | None, target: str, terms: Terms
    ) -> _TextPlan:
        if source:
            language = source
        elif has_words(text):
            language = self._detect(index, text, target)
        else:  # nothing to detect, and nothing a model would change
            language = ""
        if language in ("", target):
            return _TextPlan(text, language, None, "", [], [])
        route = self._route(language, target)
        leading, sentences = split_sentences(text, self.settings.max_sentence_chars)
        protected = [protect(sentence.text, terms) for sentence in sentences]
        return _TextPlan(text, language, route, leading, sentences, protected)

    def _assemble(
        self,
        plan: _TextPlan,
        outcomes: dict[tuple[Route, str], _Outcome],
        restored: dict[tuple[Route, Protected], str],
    ) -> TextResult:
        route = plan.route
        if route is None:
            return TextResult(plan.text, plan.source, (), False)
        translated, used = [], []
        for protected in plan.protected:
            if (route, protected) in restored:
                translated.append(restored[route, protected])
                used.append(outcomes[route, protected.masked])
            else:
                pieces = [
                    outcomes[route, piece.strip()] if has_words(piece) else None
                    for piece in protected.pieces
                ]
                translated.append(protected.join([o.text if o else "" for o in pieces]))
                used += [o for o in pieces if o is not None]
        flags = [o.cached for o in used if o.cached is not None]
        return TextResult(
            join_sentences(plan.leading, plan.sentences, translated),
            plan.source,
            tuple(route.models),
            bool(flags) and all(flags),
        )

    async def _run_routes(
        self, wanted: dict[Route, set[str]], beam: int, deadline: float | None
    ) -> dict[tuple[Route, str], _Outcome]:
        results = await _gather_or_cancel(
            self._run_route(route, sorted(texts), beam, deadline) for route, texts in wanted.items()
        )
        return {key: outcome for result in results for key, outcome in result.items()}

    async def _run_route(
        self, route: Route, texts: list[str], beam: int, deadline: float | None
    ) -> dict[tuple[Route, str], _Outcome]:
        current = {text: text for text in texts}
        cached: dict[str, bool | None] = {text: None for text in texts}
        for leg in route.legs:
            done = await self._run_leg(
                leg, sorted({t for t in current.values() if has_words(t)}), beam, deadline
            )
            for text in texts:
                if current[text] in done:
                    current[text], hit = done[current[text]]
                    cached[text] = hit if cached[text] is None else cached[text] and hit
        return {(route, text): _Outcome(current[text], cached[text]) for text in texts}

    async def _run_leg(
        self, leg: Leg, texts: list[str], beam: int, deadline: float | None
    ) -> dict[str, tuple[str, bool]]:
        """Each text's translation by the leg's model, and whether it came from the cache."""
        model = self.models[leg.model]
        version = f"{self.settings.precision}:{model.version}"
        keys = [
            TranslationCache.key(leg.model, version, leg.source, leg.target, beam, text)
            for text in texts
        ]
        found = await self.cache.get_many(keys) if self.cache else [None] * len(texts)
        done = {
            text: (value, True)
            for text, value in zip(texts, found, strict=True)
            if value is not None
        }
        missing = [text for text in texts if text not in done]
        batcher = self._batchers[leg.model]
        translated = await _gather_or_cancel(
            batcher.submit((leg.source, leg.target, beam, text), _remaining(deadline))
            for text in missing
        )
        done.update((text, (out, False)) for text, out in zip(missing, translated, strict=True))
        if self.cache:
            by_text = dict(zip(texts, keys, strict=True))
            self.cache.put_many(
                [(by_text[text], out) for text, out in zip(missing, translated, strict=True)]
            )
        sentences_total.labels(leg.model, "cache").inc(len(texts) - len(missing))
        sentences_total.labels(leg.model, "model").inc(len(missing))
        return done

    def _detect(self, index: int, text: str, target: str) -> str:
        candidates = sorted(self.registry.source_languages | {target})
        language = detect_language(text, candidates)
        if language is None:
            raise InvalidArgument(
                f"could not tell the language of texts[{index}]; set source_language",
                [
                    FieldViolation(
                        "source_language",
                        f"required: texts[{index}] is not clearly one of {', '.join(candidates)}",
                    )
                ],
                reason="LANGUAGE_NOT_DETECTED",
            )
        return language

    def _route(self, source: str, target: str) -> Route:
        route = self.registry.route(source, target)
        if route is None:
            raise NotFound(
                f"no model translates {source} to {target}",
                reason="LANGUAGE_PAIR_NOT_SUPPORTED",
                metadata={"source_language": source, "target_language": target},
            )
        return route

    def _validate(self, job: TranslateJob) -> tuple[str | None, str, Terms, int]:
        settings = self.settings
        violations: list[FieldViolation] = []
        if not job.texts:
            violations.append(FieldViolation("texts", "at least one text is required"))
        elif len(job.texts) > settings.max_texts:
            violations.append(FieldViolation("texts", f"at most {settings.max_texts} texts"))
        else:
            for index, text in enumerate(job.texts):
                violations += _check_text(f"texts[{index}]", text, settings.max_text_chars)
        target = normalize_language(job.target_language) if job.target_language else None
        if not job.target_language:
            violations.append(FieldViolation("target_language", "required"))
        elif target is None:
            violations.append(FieldViolation("target_language", "not a language code"))
        source = normalize_language(job.source_language) if job.source_language else None
        if job.source_language and source is None:
            violations.append(FieldViolation("source_language", "not a language code"))
        if not 0 <= job.beam_size <= settings.max_beam_size:
            violations.append(
                FieldViolation("beam_size", f"must be between 0 and {settings.max_beam_size}")
            )
        if len(job.glossary) + len(job.do_not_translate) > MAX_TERMS:
            violations.append(
                FieldViolation("glossary", f"at most {MAX_TERMS} glossary and kept terms")
            )
        for index, (term, replacement) in enumerate(job.glossary):
            violations += _check_term(f"glossary[{index}].source", term, required=True)
            violations += _check_term(f"glossary[{index}].target", replacement, required=False)
        for index, term in enumerate(job.do_not_translate):
            violations += _check_term(f"do_not_translate[{index}]", term, required=True)
        if violations:
            raise InvalidArgument("invalid translate request", violations)
        assert target is not None
        terms = Terms(dict(job.glossary), list(job.do_not_translate))
        return source, target, terms, max(1, job.beam_size)


def _check_text(field: str, text: str, limit: int) -> list[FieldViolation]:
    if len(text) > limit:
        return [FieldViolation(field, f"at most {limit} characters")]
    if _CONTROL.search(text):
        return [FieldViolation(field, "must not contain control characters")]
    return []


def _check_term(field: str, term: str, required: bool) -> list[FieldViolation]:
    if required and not term.strip():
        return [FieldViolation(field, "required")]
    return _check_text(field, term, MAX_TERM_CHARS)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def _gather_or_cancel(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest: a refused sentence must not leave
    its siblings queued for a caller that has already been answered."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
