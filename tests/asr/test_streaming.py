"""The stream's config and its sentence-end rule, without a model."""

from __future__ import annotations

import pytest

from services.asr.streaming import ends_sentence, stream_config
from services.common.errors import InvalidArgument
from services.common.proto_time import duration
from speechmesh.asr.v1 import asr_pb2


@pytest.mark.parametrize(
    ("transcript", "ends"),
    [
        ("Could you please send me the report before noon?", True),
        ("Fail better.", True),
        ('He said "stop."  ', True),
        ("\u4f60\u597d\u3002", True),  # CJK full stop
        ("Fail better", False),
        ("The meeting has been moved to...", False),
        ("It was the best of times,", False),
        ("", False),
    ],
)
def test_ends_sentence(transcript: str, ends: bool) -> None:
    assert ends_sentence(transcript) is ends


def _config(**fields: object) -> asr_pb2.StreamingRecognitionConfig:
    return asr_pb2.StreamingRecognitionConfig(sample_rate_hertz=16_000, **fields)


def test_the_sentence_end_silence_defaults_to_at_most_the_streams_silence() -> None:
    assert stream_config(_config(), "en", "transcribe", 0.5, 0.3).sentence_end_silence_s == 0.3
    # A stream asking for a 0.2 s silence gets no longer sentence-end silence: none at all.
    shorter = stream_config(_config(silence_duration=duration(0.2)), "en", "transcribe", 0.5, 0.3)
    assert (shorter.silence_s, shorter.sentence_end_silence_s) == (0.2, None)
    # Equal to the silence turns it off; shorter is taken as asked.
    off = _config(sentence_end_silence_duration=duration(0.5))
    assert stream_config(off, "en", "transcribe", 0.5, 0.3).sentence_end_silence_s is None
    asked = _config(sentence_end_silence_duration=duration(0.25))
    assert stream_config(asked, "en", "transcribe", 0.5, 0.3).sentence_end_silence_s == 0.25


@pytest.mark.parametrize("seconds", [0.05, 6.0, -1.0])
def test_an_out_of_range_sentence_end_silence_names_its_field(seconds: float) -> None:
    config = _config(sentence_end_silence_duration=duration(seconds))
    with pytest.raises(InvalidArgument) as refused:
        stream_config(config, "en", "transcribe", 0.5, 0.3)
    assert [v.field for v in refused.value.violations] == ["config.sentence_end_silence_duration"]
