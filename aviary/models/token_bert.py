"""BERT on vq-wav2vec tokens (vq-wav2vec paper, Sec. 3.3 and 5), as a model and an upstream.

Pretraining (``batch_kind="tokens"``): token ids from ``aviary tokenize`` -> token +
learned position embeddings -> LayerNorm -> dropout -> post-LN transformer
(:class:`~aviary.models.layers.TransformerStack`) -> masked-LM head (Linear -> GELU ->
LayerNorm -> output projection tied to the input embeddings, BERT;
:class:`~aviary.models.heads.MaskedLMHead`). Span masking, corruption and the loss are the
:class:`~aviary.objectives.mlm.MaskedLM` objective.

As an upstream the model is self-contained: it carries the vq-wav2vec tokenizer (config in
``config.tokenizer``, weights under ``upstream.tokenizer.*``) and the vocabulary (the
``upstream.code_table`` buffer, flat group code -> token id, ``<unk>`` for pairs never seen
in training), so ``extract(wavs)`` runs waveform -> codes -> ids -> BERT and returns the
embedding output and every layer at the tokenizer's 10 ms frame rate.

Special tokens (see :mod:`aviary.data.tokens`): ``<pad>`` 0, ``<unk>`` 1, ``<mask>`` 2; the
observed "i-j" pairs follow, most frequent first.

Sequences longer than ``max_positions`` (learned positions stop there) are cut into
consecutive windows of ``max_positions`` tokens at extraction; pretraining crops them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from aviary.config import Config, ConfigError, check, check_choice, check_range
from aviary.data.tokens import MASK_ID, NUM_SPECIAL, PAD_ID, UNK_ID, VOCAB_FILE, Vocabulary, read_meta
from aviary.lengths import padding_mask
from aviary.models.heads import MaskedLMHead
from aviary.models.layers import TransformerStack, init_bert_weights
from aviary.models.registry import Family, register_family, register_preset
from aviary.models.upstream import Upstream, upstream_state
from aviary.models.windows import from_windows, to_windows
from aviary.models.vqwav2vec import VqWav2VecConfig, VqWav2VecUpstream
from aviary.objectives.mlm import MaskedLM
from aviary.storage import CheckpointError, load_tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBertConfig(Config):
    """Token-BERT pretraining config.

    Attributes:
        family: always ``"token-bert"``.
        vocab_size: number of token ids including the specials; 0 until a token corpus sets
            it (:func:`configure_from_tokens`, done by ``aviary pretrain --data TOKENS_DIR``).
        hidden_size, num_layers, num_heads, ffn_size: transformer size (BERT base 768/12/12/3072).
        dropout, attn_dropout: 0.1 as BERT.
        max_positions: learned position embeddings (and the training crop length).
        mask_start_prob: p, the probability that a token starts a masked span (0.05, paper).
        mask_span_length: M, span length (10, paper: ~40 % of tokens masked).
        mask_replace_probs: (mask, random, keep) for masked tokens (0.8, 0.1, 0.1).
        position_bias: ``"none"`` (BERT, the paper) or ``"alibi"``: a fixed distance penalty
            ``-m_h |i - j|`` on every layer's attention scores
            (:func:`~aviary.models.layers.alibi_bias`), on top of the learned positions. Not
            in the paper; off in every preset: unlike the masked acoustic models, the paper's
            token-BERT leaves its plateau without it on a CPU (``configs/token-bert-cpu.yaml``:
            accuracy on ``<mask>`` inputs 2.6 % against a unigram baseline of 0.35 % after
            1,500 steps on the synthetic k-means tokens).
        alibi_first_slope: head 0's ALiBi slope (0: Press et al.'s ``2^(-8 / num_heads)``).
        tokenizer: the vq-wav2vec config that made the tokens (needed to extract from audio).
        tokens_dir: the token corpus; at pretraining its tokenizer weights and vocabulary are
            copied into the model (a loaded bundle does not need the directory any more).
    """

    family: str = "token-bert"
    vocab_size: int = 0
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    max_positions: int = 512
    mask_start_prob: float = 0.05
    mask_span_length: int = 10
    mask_replace_probs: tuple[float, float, float] = (0.8, 0.1, 0.1)
    position_bias: str = "none"
    alibi_first_slope: float = 0.0
    tokenizer: VqWav2VecConfig | None = None
    tokens_dir: str | None = None

    def validate(self) -> None:
        check(self.family == "token-bert", "family", self.family, "'token-bert'")
        check(self.vocab_size == 0 or self.vocab_size > NUM_SPECIAL, "vocab_size", self.vocab_size,
              f"0 (set from the token corpus) or > {NUM_SPECIAL} (the special tokens)")
        for key in ("hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions", "mask_span_length"):
            check_range(key, getattr(self, key), 1)
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
              f"a divisor of hidden_size={self.hidden_size}")
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("attn_dropout", self.attn_dropout, 0.0, 1.0, hi_open=True)
        check_choice("position_bias", self.position_bias, ("none", "alibi"))
        check_range("alibi_first_slope", self.alibi_first_slope, 0.0)
        check_range("mask_start_prob", self.mask_start_prob, 0.0, 1.0, lo_open=True)
        check(all(p >= 0 for p in self.mask_replace_probs) and abs(sum(self.mask_replace_probs) - 1) < 1e-6,
              "mask_replace_probs", self.mask_replace_probs, "three probabilities >= 0 summing to 1")


def configure_from_tokens(cfg: TokenBertConfig, tokens_dir: str | Path) -> TokenBertConfig:
    """``cfg`` with ``vocab_size``, ``tokenizer`` and ``tokens_dir`` taken from a token corpus."""
    meta = read_meta(tokens_dir)
    return cfg.replace(vocab_size=int(meta["vocab_size"]), tokenizer=meta["model"],
                       tokens_dir=str(Path(tokens_dir).resolve()))


class TokenBertUpstream(Upstream):
    """Token embeddings + transformer, with the vq-wav2vec tokenizer in front for audio input."""

    def __init__(self, cfg: TokenBertConfig):
        super().__init__()
        if cfg.vocab_size == 0:
            raise ConfigError("token-bert: vocab_size is 0; build the model from a token corpus "
                              "(aviary pretrain --data TOKENS_DIR, or configure_from_tokens)")
        self.config = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h, padding_idx=PAD_ID)
        self.embed_positions = nn.Embedding(cfg.max_positions, h)
        self.embed_norm = nn.LayerNorm(h, eps=1e-12)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = TransformerStack(cfg.num_layers, hidden_size=h, num_heads=cfg.num_heads,
                                        ffn_size=cfg.ffn_size, dropout=cfg.dropout,
                                        attn_dropout=cfg.attn_dropout, pre_ln=False,
                                        position_bias=cfg.position_bias,
                                        alibi_first_slope=cfg.alibi_first_slope)
        self.apply(init_bert_weights)
        with torch.no_grad():
            self.embed_tokens.weight[PAD_ID].zero_()
        self.tokenizer: VqWav2VecUpstream | None = None
        if cfg.tokenizer is not None:
            self.tokenizer = VqWav2VecUpstream(cfg.tokenizer).eval()
            self.tokenizer.requires_grad_(False)  # frozen: BERT learns on fixed tokens
            t = cfg.tokenizer
            self.register_buffer("code_table", torch.full((t.num_vars ** t.num_groups,), UNK_ID, dtype=torch.long))
        self.hidden_size = h
        self.num_hidden_states = cfg.num_layers + 1
        self.frame_shift = cfg.tokenizer.frame_shift if cfg.tokenizer is not None else 0.01
        self.sample_rate = cfg.tokenizer.sample_rate if cfg.tokenizer is not None else 16000

    def train(self, mode: bool = True) -> "TokenBertUpstream":
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # never Gumbel-sample or drop out while tokenising
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, H) embedding output (hidden state 0)."""
        t = tokens.shape[1]
        if t > self.config.max_positions:
            raise ValueError(f"sequence of {t} tokens exceeds max_positions={self.config.max_positions}")
        pos = torch.arange(t, device=tokens.device)
        x = self.embed_tokens(tokens) + self.embed_positions(pos)[None]
        return self.embed_dropout(self.embed_norm(x))

    def forward_tokens(self, tokens: torch.Tensor, lengths: torch.Tensor, max_layer: int | None = None,
                       need_weights: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Token ids -> (hidden states: L+1 tensors (B, T, H), attentions or None)."""
        pad = padding_mask(lengths.clamp(min=1), tokens.shape[1])  # (B, T) True = padding
        return self.encoder(self.embed(tokens), pad, need_weights=need_weights, max_layer=max_layer)

    @torch.no_grad()
    def tokens_from_audio(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms -> (token ids (B, T) padded with ``<pad>``, lengths (B,)), via the tokenizer."""
        if self.tokenizer is None:
            raise ValueError("this token-bert model has no tokenizer (config.tokenizer is None); "
                             "it can only read token ids (forward_tokens)")
        codes, lens = self.tokenizer.tokenize(wavs, wav_lengths)  # (B, T, G)
        v = self.tokenizer.config.num_vars
        flat = torch.zeros_like(codes[..., 0])
        for g in range(codes.shape[-1]):
            flat = flat * v + codes[..., g]
        ids = self.code_table[flat]
        ids = ids.masked_fill(padding_mask(lens, ids.shape[1]), PAD_ID)
        return ids, lens

    def extract(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        wavs, wav_lengths = self.as_batch(wavs, wav_lengths)
        ids, lens = self.tokens_from_audio(wavs, wav_lengths)
        b, t = ids.shape
        p = self.config.max_positions
        if t <= p:
            states, _ = self.forward_tokens(ids, lens, max_layer)
            return states, lens
        # Longer than the learned positions: consecutive windows of p tokens, run as one batch.
        windows, win_lens = to_windows(ids, lens, p, pad_value=PAD_ID)  # (b*n, p), (b*n,)
        states, _ = self.forward_tokens(windows, win_lens, max_layer)
        return [from_windows(s, b, t) for s in states], lens

    def extract_tokenizer_features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor | None = None,
                                   max_layer: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The vq-wav2vec hidden states (encoder, quantised, context layers) of the same audio."""
        if self.tokenizer is None:
            raise ValueError("this token-bert model has no tokenizer")
        return self.tokenizer.extract(wavs, wav_lengths, max_layer)


def load_tokenizer_from_corpus(upstream: TokenBertUpstream, tokens_dir: str | Path) -> None:
    """Copy the tokenizer weights and the vocabulary of a token corpus into ``upstream``."""
    tokens_dir = Path(tokens_dir)
    meta = read_meta(tokens_dir)
    vocab = Vocabulary.read(tokens_dir / VOCAB_FILE)
    cfg = upstream.config
    if len(vocab) != cfg.vocab_size:
        raise ConfigError(f"{tokens_dir / VOCAB_FILE}: {len(vocab)} ids, but config vocab_size={cfg.vocab_size}")
    if upstream.tokenizer is None:
        raise ConfigError(f"token-bert config has no tokenizer config, but tokens_dir={tokens_dir} is set")
    tk = upstream.tokenizer.config
    upstream.code_table.copy_(vocab.code_table(tk.num_groups, tk.num_vars))
    tensors, _ = load_tensors(meta["checkpoint"])
    missing, _ = upstream.tokenizer.load_state_dict(upstream_state(tensors), strict=False)
    if missing:
        raise CheckpointError(f"{meta['checkpoint']}: tokenizer weights missing for {missing[:5]}")
    log.info("token-bert: tokenizer from %s, %d tokens", meta["checkpoint"], len(vocab))


def build_pretrain_upstream(cfg: TokenBertConfig) -> TokenBertUpstream:
    """The upstream to pretrain: with the token corpus's tokenizer and vocabulary copied in."""
    upstream = TokenBertUpstream(cfg)
    if cfg.tokens_dir is not None:
        load_tokenizer_from_corpus(upstream, cfg.tokens_dir)
    return upstream


def build_objective(cfg: TokenBertConfig, upstream: TokenBertUpstream) -> MaskedLM:
    """Masked LM with BERT's head tied to the upstream's token embeddings."""
    head = MaskedLMHead(cfg.hidden_size, cfg.vocab_size)
    head.apply(init_bert_weights)
    # Ids are sorted by training count (aviary tokenize): NUM_SPECIAL is the most frequent.
    return MaskedLM(head, cfg.vocab_size, MASK_ID, NUM_SPECIAL, cfg.mask_start_prob, cfg.mask_span_length,
                    cfg.mask_replace_probs)


register_family(Family(name="token-bert", config_cls=TokenBertConfig, build_upstream=TokenBertUpstream,
                       build_objective=build_objective, batch_kind="tokens",
                       build_pretrain_upstream=build_pretrain_upstream))


@register_preset("token-bert-base", "BERT base on vq-wav2vec tokens: 768/12 layers/12 heads/3072")
def token_bert_base() -> TokenBertConfig:
    return TokenBertConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072)


@register_preset("token-bert-small", "small BERT on vq-wav2vec tokens: 512/12 layers/8 heads/2048")
def token_bert_small() -> TokenBertConfig:
    # The paper gives width, heads and FFN of its small model but not the depth; we keep
    # BERT base's 12 layers so that only the width differs from base.
    return TokenBertConfig(hidden_size=512, num_layers=12, num_heads=8, ffn_size=2048)


@register_preset("token-bert-cpu", "CPU-sized BERT on vq-wav2vec tokens: 128/3 layers/4 heads/512")
def token_bert_cpu() -> TokenBertConfig:
    return TokenBertConfig(hidden_size=128, num_layers=3, num_heads=4, ffn_size=512, max_positions=256)
