"""BERT on vq-wav2vec tokens: model, tied head, padding, presets."""
import pytest
import torch

from aviary.config import ConfigError
from aviary.models.registry import build_pretrain, count_parameters, get_family, get_preset, list_presets
from aviary.data.tokens import NUM_SPECIAL
from aviary.models.token_bert import TokenBertConfig, TokenBertUpstream

TB_PRESETS = [n for n in list_presets() if n.startswith("token-bert")]


def tiny(**kw):
    return TokenBertConfig(vocab_size=20, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                           max_positions=64, **kw)


def test_head_is_tied_to_embeddings():
    m = build_pretrain(tiny())
    names = [n for n, _ in m.named_parameters()]
    assert not any("decoder" in n for n in names)  # no separate output matrix
    batch = {"tokens": torch.randint(3, 20, (2, 30)), "lengths": torch.tensor([30, 30])}
    m(batch).loss.backward()
    assert m.upstream.embed_tokens.weight.grad is not None


def test_loss_only_on_masked_and_padding_ignored():
    torch.manual_seed(0)
    m = build_pretrain(tiny(dropout=0.0, attn_dropout=0.0)).eval()
    tokens = torch.randint(3, 20, (2, 12))
    lengths = torch.tensor([12, 7])
    tokens[1, 7:] = 0
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1] = True
    torch.manual_seed(1)
    a = m({"tokens": tokens, "lengths": lengths, "mask": mask})
    assert a.metrics["num_masked"].item() == 4
    t2 = tokens.clone()
    t2[1, 7:] = 5  # padding content does not matter
    torch.manual_seed(1)
    b = m({"tokens": t2, "lengths": lengths, "mask": mask})
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-6)


def test_padded_batch_equals_one_by_one():
    torch.manual_seed(0)
    up = TokenBertUpstream(tiny()).eval()
    tokens = torch.randint(3, 20, (2, 10))
    lengths = torch.tensor([10, 6])
    hs, _ = up.forward_tokens(tokens, lengths)
    one, _ = up.forward_tokens(tokens[1:, :6], torch.tensor([6]))
    assert len(hs) == 3
    assert torch.allclose(hs[-1][1, :6], one[-1][0], atol=1e-5)


def test_learns_a_deterministic_sequence():
    # A repeating pattern is predictable from context: masked accuracy must beat the unigram baseline.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, more only contend
    m = build_pretrain(tiny(dropout=0.0, attn_dropout=0.0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    pattern = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3, 3, 3, 3])
    tokens = pattern.repeat(8, 3)[:, :60]
    batch = {"tokens": tokens, "lengths": torch.full((8,), 60)}
    for _ in range(60):
        out = m(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert out.metrics["accuracy"].item() > out.metrics["unigram_accuracy"].item() + 0.2


def test_rejects_bad_ids_and_unset_vocab():
    m = build_pretrain(tiny())
    with pytest.raises(ValueError, match="token ids"):
        m({"tokens": torch.tensor([[3, 25]]), "lengths": torch.tensor([2])})
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenBertUpstream(TokenBertConfig())
    with pytest.raises(ConfigError, match="num_heads"):
        TokenBertConfig(hidden_size=30, num_heads=4)


def test_no_tokenizer_means_no_audio():
    up = TokenBertUpstream(tiny())
    with pytest.raises(ValueError, match="no tokenizer"):
        up.extract(torch.randn(1, 4000))


@pytest.mark.parametrize("name", TB_PRESETS)
def test_presets(name):
    cfg = get_preset(name)
    assert cfg.family == "token-bert" and get_family("token-bert").batch_kind == "tokens"
    # the paper's span masking, BERT's absolute positions only
    assert cfg.mask_start_prob == 0.05 and cfg.mask_span_length == 10 and cfg.position_bias == "none"
    if name == "token-bert-base":
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_size) == (768, 12, 12, 3072)
        # 12 BERT-base layers of 7.088M each (REFERENCE.md), plus embeddings
        up = TokenBertUpstream(cfg.replace(vocab_size=1000))
        layers = count_parameters(up.encoder)
        assert layers == 12 * 7_087_872
    if name == "token-bert-small":
        assert (cfg.hidden_size, cfg.num_heads, cfg.ffn_size) == (512, 8, 2048)
    if name == "token-bert-cpu":
        m = get_family("token-bert").build_pretrain(cfg.replace(vocab_size=50))
        out = m({"tokens": torch.randint(3, 50, (2, 40)), "lengths": torch.tensor([40, 30])})
        out.loss.backward()


def tiny_alibi(**kw):
    base = dict(vocab_size=NUM_SPECIAL + 8, hidden_size=16, num_layers=1, num_heads=2, ffn_size=32,
                max_positions=32, dropout=0.0, attn_dropout=0.0)
    return TokenBertConfig(**{**base, **kw})


def test_position_bias_config():
    with pytest.raises(ConfigError, match="position_bias"):
        tiny_alibi(position_bias="rope")
    with pytest.raises(ConfigError, match="alibi_first_slope"):
        tiny_alibi(position_bias="alibi", alibi_first_slope=-1.0)
    assert TokenBertConfig.from_dict(tiny_alibi(position_bias="alibi").to_dict()).position_bias == "alibi"


def test_alibi_reaches_the_attention():
    torch.manual_seed(0)
    plain = build_pretrain(tiny_alibi()).eval()
    biased = build_pretrain(tiny_alibi(position_bias="alibi", alibi_first_slope=1.0)).eval()
    # ALiBi adds no parameters: the same weights load into either model
    biased.load_state_dict(plain.state_dict())
    tokens = torch.randint(NUM_SPECIAL, NUM_SPECIAL + 8, (2, 12))
    lengths = torch.tensor([12, 9])
    with torch.no_grad():
        states_p, att_p = plain.upstream.forward_tokens(tokens, lengths, need_weights=True)
        states_b, att_b = biased.upstream.forward_tokens(tokens, lengths, need_weights=True)
    assert torch.equal(states_p[0], states_b[0])  # same embeddings
    assert not torch.allclose(states_p[-1], states_b[-1], atol=1e-4)
    # head 0 with slope 1: attention falls off with distance (e^-1 per token at init, where
    # the content scores are ~0), so the diagonal outweighs a key 5 tokens away
    a = att_b[0][0, 0]  # (T, T) of sequence 0, head 0
    assert (a.diagonal()[:6] > 5 * a.diagonal(offset=5)[:6]).all()
    assert (att_p[0][0, 0].diagonal()[:6] < 2 * att_p[0][0, 0].diagonal(offset=5)[:6]).all()



def test_unigram_baseline_is_the_most_frequent_training_token():
    # Token corpora number their pairs by training count, so the first regular id is the
    # corpus's most frequent token: the context-free guess the accuracy has to beat.
    m = build_pretrain(tiny()).eval()
    tokens = torch.tensor([[NUM_SPECIAL, 5, 5, 5, 6, NUM_SPECIAL + 1]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    out = m({"tokens": tokens, "lengths": torch.tensor([6]), "mask": mask})
    assert out.metrics["unigram_accuracy"].item() == pytest.approx(1 / 5)
    assert out.metrics["batch_mode_accuracy"].item() == pytest.approx(3 / 5)


def test_mask_accuracy_scores_only_targets_hidden_behind_mask():
    torch.manual_seed(0)
    tokens = torch.randint(NUM_SPECIAL, 20, (4, 30))
    batch = {"tokens": tokens, "lengths": torch.full((4,), 30), "mask": torch.rand(4, 30) < 0.5}
    # Every masked input is <mask>: both accuracies score the same targets.
    out = build_pretrain(tiny(mask_replace_probs=(1.0, 0.0, 0.0))).eval()(batch)
    assert out.metrics["mask_accuracy"].item() == pytest.approx(out.metrics["accuracy"].item())
    # Every masked input is kept: nothing was hidden, so nothing counts, whatever the guesses.
    m = build_pretrain(tiny(mask_replace_probs=(0.0, 0.0, 1.0))).eval()
    m.objective.head.bias.data[tokens[0, 0]] = 1e4  # guess one target everywhere: some hits in `accuracy`
    out = m(batch)
    assert out.metrics["accuracy"].item() > 0
    assert out.metrics["mask_accuracy"].item() == 0.0


def test_padding_the_scored_rows_changes_nothing():
    # The head scores the masked rows rounded up to a multiple (fixed shapes for oneDNN);
    # loss, metrics and gradients must equal scoring exactly the masked rows.
    m = build_pretrain(tiny(dropout=0.0, attn_dropout=0.0))
    tokens = torch.randint(NUM_SPECIAL, 20, (3, 40))
    batch = {"tokens": tokens, "lengths": torch.tensor([40, 33, 7]), "mask": torch.rand(3, 40) < 0.3}
    batch["mask"][1, 33:] = batch["mask"][2, 7:] = False
    outs, grads = [], []
    for multiple in (1, 128):
        m.objective.HEAD_ROWS_MULTIPLE = multiple
        m.zero_grad()
        torch.manual_seed(0)  # same <mask> / random / keep draws
        out = m(batch)
        out.loss.backward()
        outs.append(out)
        grads.append(m.upstream.embed_tokens.weight.grad.clone())
    assert int(batch["mask"].sum()) % 128 != 0
    torch.testing.assert_close(outs[0].loss, outs[1].loss)
    assert outs[0].metrics["accuracy"] == outs[1].metrics["accuracy"]
    torch.testing.assert_close(grads[0], grads[1])
