"""A tiny Hugging Face Marian checkpoint for testing the optimum path: random weights and a
SentencePiece model trained here on a few sentences. It builds in well under a second and
translates nothing meaningfully; what it gives is a real `MarianMTModel` folder, laid out
like any opus-mt checkpoint, whose exact outputs a test can compare against PyTorch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

CORPUS = [
    "el gato duerme en el sofá toda la tarde",
    "la reunión fue cancelada por la lluvia",
    "necesito comprar pan leche y huevos",
    "el tren a lisboa sale mañana a las siete",
    "mi hermana trabaja en un hospital pequeño",
    "the cat sleeps on the sofa all afternoon",
    "the meeting was cancelled because of the rain",
    "i need to buy bread milk and eggs",
    "the train to lisbon leaves tomorrow at seven",
    "my sister works in a small hospital",
]
VOCAB_SIZE = 80
TARGETS = ("en", "fr")
# Random weights rarely choose EOS, so every output runs to this many tokens.
MAX_LENGTH = 12


def _train_sentencepiece() -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4),
        model_writer=model,
        vocab_size=VOCAB_SIZE,
        model_type="unigram",
        character_coverage=1.0,
        # Marian's ids come from vocab.json; SentencePiece only needs to segment.
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


def build_tiny_marian(folder: Path, seed: int = 0) -> Path:
    """Writes the checkpoint (model, tokenizer, generation config) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    spm_bytes = _train_sentencepiece()
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(spm_bytes)
    processor = spm.SentencePieceProcessor(model_proto=spm_bytes)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    # Target-language tokens make it a multi-target checkpoint, like opus-mt-en-ROMANCE.
    for language in TARGETS:
        vocab[f">>{language}<<"] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tokenizer = MarianTokenizer(
        source_spm=str(folder / "source.spm"),
        target_spm=str(folder / "target.spm"),
        vocab=str(folder / "vocab.json"),
        source_lang="es",
        target_lang="en",
    )
    tokenizer.save_pretrained(folder)
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        init_std=0.5,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["<pad>"],
        forced_eos_token_id=vocab["</s>"],
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    model.generation_config = GenerationConfig(
        max_length=MAX_LENGTH,
        num_beams=1,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        forced_eos_token_id=config.forced_eos_token_id,
        bad_words_ids=[[config.pad_token_id]],
    )
    model.save_pretrained(folder)
    return folder
