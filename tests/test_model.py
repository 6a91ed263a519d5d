"""Model tests on tiny CPU configs: every ablation, gradients, decoding, padding, save/load, autocast."""
from __future__ import annotations

import itertools
import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from multimodal.config import LossConfig, ModelConfig
from multimodal.engine import adamw, build_optimizer
from multimodal.losses import JointLoss
from multimodal.model import CaptionEncoder, ImageEncoder, LabelDecoder, MultimodalClassifier, residual_attention

C = 5
VOCAB = 30
IMAGE = "efficientnet_b0"
SMALL = dict(num_labels=C, image_size=32, word_dim=8, caption_hidden=8, label_embed_dim=8, decoder_hidden=16,
             max_labels=4, beam_width=3)


def make_config(image: bool = True, caption: bool = True, decoder: bool = True, **overrides) -> ModelConfig:
    return ModelConfig(**{**SMALL, "image_encoder": IMAGE if image else None, "vocab_size": VOCAB if caption else None,
                          "use_decoder": decoder, **overrides})


def make_batch(batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with unequal caption lengths, one of them empty, and matching targets / label sequences."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 0, 4, 1, 5][:batch_size])
    ids = torch.randint(2, VOCAB, (batch_size, 6), generator=g)
    ids[torch.arange(6)[None, :] >= lengths[:, None]] = 0
    targets = torch.zeros(batch_size, C)
    seqs = [[0, 2], [1], [4, 3, 1], [2], [0, 1, 2], [3]][:batch_size]
    label_seq = torch.full((batch_size, 4), -100)
    for i, seq in enumerate(seqs):
        targets[i, seq] = 1.0
        label_seq[i, : len(seq) + 1] = torch.tensor(seq + [C])
    return {"image": torch.randn(batch_size, 3, 32, 32, generator=g), "caption_ids": ids, "caption_lengths": lengths,
            "targets": targets, "label_seq": label_seq}


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("image", "caption_ids", "caption_lengths")}


ABLATIONS = [(i, c, d) for i, c, d in itertools.product((True, False), repeat=3) if i or c]



class ReadBacks(TorchDispatchMode):
    """Counts the operators that, on a GPU, make the host wait for the device: reading a value back (``.item()``,
    ``bool(tensor)``, ``if tensor:``) and those whose output size depends on the data (``nonzero``, boolean
    masks)."""

    WAITING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.WAITING and not self._reads_batch_sizes():
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _reads_batch_sizes() -> bool:
        """nn.LSTM reads a packed batch's ``batch_sizes``, which PyTorch keeps on the CPU whatever the device."""
        return any(Path(f.filename).parts[-3:] == ("nn", "modules", "rnn.py") for f in traceback.extract_stack())


@pytest.mark.parametrize("extra", [{}, {"caption_pool": "mean"}, {"caption_pool": "last", "caption_layers": 2}])
@pytest.mark.parametrize("lstm_impl", ["packed", "padded"])
def test_training_step_never_reads_a_value_back(extra: dict, lstm_impl: str) -> None:
    """The joint model's forward, loss and backward queue work without reading anything back (on a GPU each read
    makes the host wait until the device has finished everything queued, and the device then waits for the host)."""
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(caption_word_skip=True, **extra)).train()
    model.caption_encoder.lstm_impl = lstm_impl
    batch = make_batch(4)
    with ReadBacks() as reads:
        out = model(**inputs_of(batch), label_seq=batch["label_seq"])
        JointLoss(LossConfig())(out, batch["targets"], batch["label_seq"])["loss"].backward()
    assert reads.seen == []
    assert all(p.grad is not None for p in model.caption_encoder.lstm.parameters())
@pytest.mark.parametrize("image,caption,decoder", ABLATIONS)
def test_forward_every_ablation(image: bool, caption: bool, decoder: bool) -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(image, caption, decoder))
    batch = make_batch()
    out = model(**inputs_of(batch), label_seq=batch["label_seq"])

    expected = {"fused_logits", "features"} | ({"image_logits"} if image else set()) \
        | ({"caption_logits"} if caption else set()) | ({"decoder_logits"} if decoder else set())
    assert set(out) == expected
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    assert out["fused_logits"].shape == (3, C)
    if decoder:
        assert out["decoder_logits"].shape == (3, 4, C + 1)
    assert "decoder_logits" not in model(**inputs_of(batch))  # no label_seq: no teacher forcing

    names = {name for name, _ in model.named_parameters()}
    for branch, on in (("image_encoder", image), ("image_head", image), ("caption_encoder", caption),
                       ("caption_head", caption), ("label_decoder", decoder)):
        assert (getattr(model, branch) is not None) == on
        assert any(n.startswith(branch + ".") for n in names) == on, branch
    width = (1280 if image else 0) + (16 if caption else 0)  # b0 features; bidirectional 2 x 8
    assert model.num_features == width and model.fused_head.in_features == width

    terms = JointLoss(LossConfig())(out, batch["targets"], batch["label_seq"])
    assert torch.isfinite(terms["loss"])
    assert ("decoder_loss" in terms) == decoder

    model.eval()
    probs = model.predict_proba(**inputs_of(batch))
    assert probs.shape == (3, C) and probs.dtype == torch.float32
    assert ((probs >= 0) & (probs <= 1)).all()


@pytest.mark.parametrize("extra", [{}, {"caption_word_skip": True, "caption_bigram_buckets": 16,
                                          "image_attention": 0.5}])
def test_every_parameter_gets_a_gradient(extra: dict) -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(caption_layers=2, **extra))
    batch = make_batch(4)
    out = model(**inputs_of(batch), label_seq=batch["label_seq"])
    JointLoss(LossConfig())(out, batch["targets"], batch["label_seq"])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.caption_encoder.empty_embedding.grad.abs().sum() > 0  # the batch has an empty caption


def test_loss_falls_when_overfitting_one_batch() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(dropout=0.0, image_drop_rate=0.0))
    criterion = JointLoss(LossConfig())
    batch = make_batch(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(15):
        terms = criterion(model(**inputs_of(batch), label_seq=batch["label_seq"]), batch["targets"],
                          batch["label_seq"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in terms.items()})
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], history
    assert all(history[-1][k] < history[0][k] for k in history[0]), history


def test_decoder_learns_label_cooccurrence() -> None:
    """B is present exactly when A is, and the captions have a word for A but none for B: after training the
    decoder emits B whenever (and only when) it emits A, and reproduces every label set."""
    from multimodal.labels import LabelCodec

    torch.manual_seed(0)
    A, B, X, Y = 0, 1, 2, 3
    word = {A: 2, X: 3, Y: 4}  # token ids; 5 = a filler word carrying no information
    label_sets, captions = [], []
    for size in (1, 2, 3):
        for subset in itertools.combinations((A, X, Y), size):
            labels = set(subset) | ({B} if A in subset else set())
            tokens = [word[k] for k in subset] + [5]
            for shift in range(len(tokens)):  # a few word orders
                label_sets.append(sorted(labels))
                captions.append(tokens[shift:] + tokens[:shift])
    codec = LabelCodec.from_labels(label_sets)
    n, length = len(captions), max(map(len, captions))
    ids = torch.zeros(n, length, dtype=torch.long)
    for i, tokens in enumerate(captions):
        ids[i, : len(tokens)] = torch.tensor(tokens)
    lengths = torch.tensor([len(t) for t in captions])
    seqs = [codec.sequence(labels) + [codec.end_index] for labels in label_sets]
    label_seq = torch.full((n, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        label_seq[i, : len(seq)] = torch.tensor(seq)
    targets = torch.stack([torch.from_numpy(codec.encode(labels)) for labels in label_sets])

    config = ModelConfig(num_labels=4, image_encoder=None, vocab_size=6, word_dim=8, caption_hidden=16,
                         bidirectional=False, label_embed_dim=8, decoder_hidden=16, dropout=0.0, max_labels=4)
    model = MultimodalClassifier(config)
    criterion = JointLoss(LossConfig(image_weight=0, caption_weight=0, fused_weight=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(150):
        loss = criterion(model(caption_ids=ids, caption_lengths=lengths, label_seq=label_seq), targets,
                         label_seq)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    predicted, scores = model.decode(caption_ids=ids, caption_lengths=lengths)
    for labels, truth in zip(predicted, label_sets):
        assert (A in labels) == (B in labels)
        assert sorted(labels) == truth
    assert (scores[targets.bool()] > 0.5).all()


def _decoder_and_context(width: int = 6) -> tuple[LabelDecoder, torch.Tensor]:
    torch.manual_seed(0)
    decoder = LabelDecoder(num_labels=C, context_dim=width, embed_dim=8, hidden=16, max_labels=4).eval()
    return decoder, torch.randn(6, width) * 3


@pytest.mark.parametrize("beam_width", [1, 3, 10])
def test_decode_gives_valid_label_sets(beam_width: int) -> None:
    decoder, context = _decoder_and_context()
    label_sets, scores = decoder.decode(context, beam_width=beam_width)
    assert len(label_sets) == 6 and scores.shape == (6, C) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    for labels, row in zip(label_sets, scores):
        assert 1 <= len(labels) <= 4
        assert len(set(labels)) == len(labels)
        assert all(0 <= k < C for k in labels)
        assert (row[labels] > 0).all()
    capped, _ = decoder.decode(context, beam_width=beam_width, max_labels=2)
    assert all(1 <= len(labels) <= 2 for labels in capped)


def test_greedy_decode_agrees_with_teacher_forcing() -> None:
    """Beam width 1 is greedy: each emitted label is the arg-max of the teacher-forced logits over the labels not yet
    emitted (+ END), so `decode` and `forward` are the same network."""
    decoder, context = _decoder_and_context()
    label_sets, scores = decoder.decode(context, beam_width=1, max_labels=C)
    for i, labels in enumerate(label_sets):
        seq = torch.tensor([labels + [C]])
        logits = decoder(context[i : i + 1], seq)[0]  # [T, C + 1]
        for t, token in enumerate(seq[0].tolist()):
            masked = logits[t].clone()
            masked[labels[:t]] = float("-inf")
            if t == 0:
                masked[C] = float("-inf")  # at least one label
            assert masked.argmax().item() == token
            if token < C:
                assert scores[i, token] >= masked.softmax(-1)[token] - 1e-6


@pytest.mark.parametrize("pool,word_skip", [("max", False), ("mean", False), ("last", False), ("max", True)])
def test_caption_padding_does_not_change_the_result(pool: str, word_skip: bool) -> None:
    torch.manual_seed(0)
    encoder = CaptionEncoder(VOCAB, 8, 8, num_layers=2, bidirectional=True, pool=pool, word_skip=word_skip,
                             embed_dropout=0.5).eval()
    assert encoder.num_features == 16 + 8 * word_skip
    caption = torch.tensor([[5, 9, 7]])
    alone = encoder(caption, torch.tensor([3]))
    assert alone.shape == (1, encoder.num_features)
    if word_skip:  # the bag-of-words part is the max over the words' embeddings
        torch.testing.assert_close(alone[0, 16:], encoder.embedding.weight[[5, 9, 7]].amax(0))
    batch = torch.tensor([[5, 9, 7, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9], [2, 0, 0, 0, 0, 0, 0]])
    together = encoder(batch, torch.tensor([3, 7, 1]))
    torch.testing.assert_close(together[0:1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder(batch, [3, 7, 1]), together)  # lengths as a host-side list of ints
    encoder.train()  # embedding dropout acts in training only
    assert not torch.allclose(encoder(caption, torch.tensor([3])), alone)

    model = MultimodalClassifier(make_config(image=False, caption_pool=pool, caption_word_skip=word_skip)).eval()
    single = model(caption_ids=caption, caption_lengths=torch.tensor([3]))
    padded = model(caption_ids=batch, caption_lengths=torch.tensor([3, 7, 1]))
    torch.testing.assert_close(padded["fused_logits"][0:1], single["fused_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers,bidirectional,pool", [(1, True, "max"), (2, True, "last"), (2, False, "mean"),
                                                       (1, False, "last"), (2, True, "mean")])
def test_caption_lstm_on_padded_captions_matches_the_packed_lstm(layers: int, bidirectional: bool, pool: str) -> None:
    """``lstm_impl="padded"`` (the CPU default) reads each caption within its length, one layer and direction at a
    time: the same embeddings and gradients as nn.LSTM on the packed batch, with the same weights."""
    torch.manual_seed(0)
    encoder = CaptionEncoder(VOCAB, 8, 6, num_layers=layers, bidirectional=bidirectional, pool=pool, word_skip=True)
    lengths = torch.tensor([7, 3, 1, 0, 5])
    ids = torch.randint(1, VOCAB, (5, 7))
    ids[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    results = {}
    for impl in ("packed", "padded"):
        encoder.lstm_impl = impl
        encoder.zero_grad()
        out = encoder(ids, lengths)
        (out * torch.arange(out.shape[1])).sum().backward()  # a different weight per feature: every feature counts
        results[impl] = out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    (packed, packed_grads), (padded, padded_grads) = results["packed"], results["padded"]
    torch.testing.assert_close(padded, packed, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == packed_grads.keys() and any(n.startswith("lstm.") for n in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(grad, packed_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    x = torch.zeros(1)  # a CPU tensor: "auto" (the default) takes the padded path there
    assert not encoder._use_packed(x) and not CaptionEncoder(VOCAB, 8, 6)._use_packed(x)
    encoder.lstm_impl = "packed"
    assert encoder._use_packed(x)
    encoder.lstm_impl = "fast"
    with pytest.raises(ValueError, match="lstm_impl"):
        encoder(ids, lengths)


def test_word_dropout_trains_the_unknown_word_and_is_off_in_evaluation() -> None:
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    encoder = CaptionEncoder(12, word_dim=8, hidden=8, word_skip=True, word_dropout=0.5, unk_id=1)
    plain = CaptionEncoder(12, word_dim=8, hidden=8, word_skip=True)
    plain.load_state_dict(encoder.state_dict())
    encoder.eval(), plain.eval()
    torch.testing.assert_close(encoder(ids), plain(ids))  # evaluation: the words as they are
    encoder.word_dropout = 0.999999  # training, nearly every word: the caption of <unk>s of the same lengths
    encoder.train(), plain.train()
    torch.testing.assert_close(encoder(ids), plain(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])))
    encoder.word_dropout = 0.5
    encoder(ids.repeat(8, 1)).sum().backward()
    grad = encoder.embedding.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0  # <unk> learns; padding stays out
    with pytest.raises(ValueError, match="caption_word_dropout"):
        ModelConfig(num_labels=2, vocab_size=12, caption_word_dropout=1.0)


def test_bigram_bag_is_the_mean_of_word_and_bigram_embeddings_and_ignores_padding() -> None:
    torch.manual_seed(0)
    encoder = CaptionEncoder(VOCAB, 8, 8, bigram_buckets=16).eval()
    assert encoder.num_features == 16 + 8
    caption = torch.tensor([[5, 9, 7]])
    alone = encoder(caption, torch.tensor([3]))
    rows = [5, 9, 7] + [VOCAB + (a * CaptionEncoder.BIGRAM_HASH + b) % 16 for a, b in ((5, 9), (9, 7))]
    torch.testing.assert_close(alone[0, 16:], encoder.ngram_embedding.weight[rows].mean(0))
    padded = encoder(torch.tensor([[5, 9, 7, 0, 0], [1, 2, 3, 4, 5]]), torch.tensor([3, 5]))
    torch.testing.assert_close(padded[0:1], alone, rtol=1e-5, atol=1e-6)
    # Word order reaches the bag through the bigrams: the reversed caption has the same words, other bigrams.
    reversed_bag = encoder(torch.tensor([[7, 9, 5]]), torch.tensor([3]))[0, 16:]
    assert not torch.allclose(reversed_bag, alone[0, 16:])
    single_word = encoder(torch.tensor([[4]]), torch.tensor([1]))[0, 16:]  # no bigram at all
    torch.testing.assert_close(single_word, encoder.ngram_embedding.weight[4])
    with pytest.raises(ValueError, match="bigram_buckets"):
        CaptionEncoder(VOCAB, 8, 8, bigram_buckets=-1)


def test_residual_attention_lies_between_the_mean_and_the_max_score() -> None:
    torch.manual_seed(0)
    feature_map, weight = torch.randn(2, 6, 3, 4), torch.randn(5, 6)
    scores = torch.einsum("bfhw,cf->bchw", feature_map, weight).flatten(2)  # [B, C, h * w]
    pooled = residual_attention(feature_map, weight)
    assert pooled.shape == (2, 5)
    assert (pooled >= scores.mean(-1) - 1e-5).all() and (pooled <= scores.amax(-1) + 1e-5).all()
    torch.testing.assert_close(residual_attention(feature_map, weight, temperature=1e4), scores.amax(-1))
    flat = feature_map.mean((2, 3), keepdim=True).expand_as(feature_map)  # the same at every position: the mean
    torch.testing.assert_close(residual_attention(flat, weight), scores.mean(-1), rtol=1e-5, atol=1e-5)


def test_image_attention_adds_to_both_heads_and_agrees_on_images_and_cached_maps() -> None:
    torch.manual_seed(0)
    plain = MultimodalClassifier(make_config()).eval()
    model = MultimodalClassifier(make_config(image_attention=0.5)).eval()
    model.load_state_dict(plain.state_dict())  # attention adds no parameters
    batch = make_batch()
    base, out = plain(**inputs_of(batch)), model(**inputs_of(batch))
    _, feature_map = model.image_encoder.forward_with_map(batch["image"])
    w_img = model.fused_head.weight[:, : model.image_encoder.num_features]
    torch.testing.assert_close(out["fused_logits"], base["fused_logits"] + 0.5 * residual_attention(feature_map, w_img))
    torch.testing.assert_close(out["image_logits"],
                               base["image_logits"] + 0.5 * residual_attention(feature_map, model.image_head.weight))
    torch.testing.assert_close(out["caption_logits"], base["caption_logits"])
    model.tail_stages = 2  # the same model on cached maps below its last two stages
    stem = model.image_encoder.forward_stem(batch["image"], 2)
    cached = model(image_features=stem, caption_ids=batch["caption_ids"], caption_lengths=batch["caption_lengths"])
    torch.testing.assert_close(cached["fused_logits"], out["fused_logits"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="feature map"):
        model(image_features=plain.image_encoder(batch["image"]), caption_ids=batch["caption_ids"])
    with pytest.raises(ValueError, match="linear fused head"):
        make_config(image_attention=0.5, fusion_hidden=16)
    with pytest.raises(ValueError, match="image_attention"):
        make_config(image_attention=-1.0)


def test_empty_captions_are_finite() -> None:
    torch.manual_seed(0)
    encoder = CaptionEncoder(VOCAB, 8, 8, pool="max")
    ids = torch.tensor([[0, 0, 0], [4, 5, 0]])
    out = encoder(ids, torch.tensor([0, 2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], encoder.empty_embedding.detach())
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)

    model = MultimodalClassifier(make_config(image=False)).eval()
    all_empty = model(caption_ids=torch.zeros(2, 0, dtype=torch.long), caption_lengths=torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(all_empty["fused_logits"]).all()
    label_sets, scores = model.decode(caption_ids=torch.zeros(2, 4, dtype=torch.long),
                                      caption_lengths=torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(scores).all() and all(label_sets)


def test_modality_dropout_zeroes_one_branch_per_sample_in_training_only() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(modality_dropout=0.3, dropout=0.0))
    n_image = model.image_encoder.num_features
    n_caption = model.caption_encoder.num_features
    features = {"image": torch.rand(2000, n_image) + 1.0, "caption": torch.rand(2000, n_caption) + 1.0}
    context = model.train().forward_head(features)["features"]
    image_off = (context[:, :n_image] == 0).all(1)
    caption_off = (context[:, n_image:] == 0).all(1)
    assert not (image_off & caption_off).any()  # never both
    assert abs(image_off.float().mean() - 0.3) < 0.05 and abs(caption_off.float().mean() - 0.3) < 0.05
    kept = ~image_off & ~caption_off
    torch.testing.assert_close(context[kept], torch.cat([features["image"], features["caption"]], 1)[kept])
    outputs = model.eval().forward_head(features)
    torch.testing.assert_close(outputs["features"], torch.cat([features["image"], features["caption"]], 1))
    with pytest.raises(ValueError, match="modality_dropout"):
        make_config(modality_dropout=0.6)


def test_modality_dropout_drops_the_image_from_the_attention_term_too() -> None:
    """With image attention, the fused head also reads the image's feature map: a sample whose image is dropped got
    image-dependent fused logits through that term (another image, the same caption: logits up to 1.25 apart)."""
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(modality_dropout=0.5, image_attention=1.0, dropout=0.0)).train()
    n_image = model.image_encoder.num_features
    features = {"image": torch.rand(400, n_image) + 1.0, "caption": torch.rand(400, model.caption_encoder.num_features),
                "image_map": torch.randn(400, n_image, 2, 2)}
    out = model.forward_head(features)
    dropped = (out["features"][:, :n_image] == 0).all(1)
    assert 0.3 < dropped.float().mean() < 0.7
    plain = model.fused_head(out["features"])
    attended = plain + residual_attention(features["image_map"], model.fused_head.weight[:, :n_image],
                                          model.config.image_attention_temperature)
    torch.testing.assert_close(out["fused_logits"][dropped], plain[dropped])
    torch.testing.assert_close(out["fused_logits"][~dropped], attended[~dropped])


def test_a_frozen_encoder_keeps_its_batch_norm_statistics_and_its_pooled_dropout() -> None:
    """The whole encoder frozen and computed live: its parts stay in eval mode (batch-norm statistics fixed) while
    the dropout on its pooled features acts in training, as it does on cached pooled features (the encoder used to be
    put in eval mode whole, which switched that dropout off)."""
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(image_drop_rate=0.5)).train()
    encoder = model.image_encoder
    encoder.requires_grad_(False)
    for module in encoder.frozen_modules():
        module.eval()
    statistics = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    image = torch.rand(4, 3, 32, 32)
    first, second = encoder(image), encoder(image)
    assert not torch.equal(first, second)  # a new dropout mask each time
    assert 0.3 < (first == 0).float().mean() < 0.7
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in statistics.items())
    for module in encoder.frozen_modules():
        module.train()  # the parts in training mode would update their statistics: the check above can fail
    encoder(image)
    assert not all(torch.equal(v, encoder.state_dict()[k]) for k, v in statistics.items())


def test_image_features_replace_the_image() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config()).eval()
    batch = make_batch()
    features = model.image_encoder(batch["image"])
    assert features.shape == (3, model.image_encoder.num_features)
    direct = model(**inputs_of(batch))
    cached = model(image_features=features, caption_ids=batch["caption_ids"],
                   caption_lengths=batch["caption_lengths"])
    torch.testing.assert_close(cached["fused_logits"], direct["fused_logits"])
    with pytest.raises(ValueError, match="image"):
        model(caption_ids=batch["caption_ids"], caption_lengths=batch["caption_lengths"])


@pytest.mark.parametrize("combine,weight", [("fused", 0.5), ("fused_decoder", 0.3), ("mean", 0.5), ("mean", 0.0)])
def test_predict_proba_combine_rules(combine: str, weight: float) -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(combine=combine, decoder_weight=weight)).eval()
    inputs = inputs_of(make_batch())
    out = model(**inputs)
    heads = [torch.sigmoid(out[k]) for k in ("image_logits", "caption_logits", "fused_logits")]
    decoder_scores = model.decode(**inputs)[1]
    expected = {"fused": heads[2], "fused_decoder": 0.7 * heads[2] + 0.3 * decoder_scores,
                "mean": (0.5 * torch.stack(heads).mean(0) + 0.5 * decoder_scores if weight
                         else torch.stack(heads).mean(0))}
    torch.testing.assert_close(model.predict_proba(**inputs), expected[combine])
    torch.testing.assert_close(model.predict_proba(**inputs, outputs=out, decoder_scores=decoder_scores),
                               expected[combine])


def test_save_and_load_give_identical_outputs(tmp_path) -> None:
    from multimodal.labels import LabelCodec
    from multimodal.text import train_caption_tokenizer

    torch.manual_seed(0)
    tokenizer = train_caption_tokenizer(["a dog on a mat", "two cats", "a red bus"])
    codec = LabelCodec.from_labels([(1, 3), (2,), (5, 7, 1)])
    model = MultimodalClassifier(make_config(vocab_size=tokenizer.get_vocab_size())).eval()
    batch = make_batch()
    batch["caption_ids"] = batch["caption_ids"] % tokenizer.get_vocab_size()
    thresholds = [0.5, 0.4, 0.3, 0.6, 0.5]
    with pytest.raises(ValueError, match="pass its tokenizer"):  # an export that could not be loaded
        model.save_pretrained(tmp_path / "export", codec)
    model.save_pretrained(tmp_path / "export", codec, tokenizer, thresholds)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]
    data = json.loads((tmp_path / "export" / "config.json").read_text())
    assert data["format_version"] == 1 and data["model"] == model.config.to_dict()

    loaded = MultimodalClassifier.from_pretrained(tmp_path / "export")
    assert not loaded.training and loaded.config == model.config
    assert loaded.codec == codec and loaded.thresholds == thresholds
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    expected, got = model(**inputs_of(batch), label_seq=batch["label_seq"]), \
        loaded(**inputs_of(batch), label_seq=batch["label_seq"])
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    (sets, scores), (loaded_sets, loaded_scores) = model.decode(**inputs_of(batch)), loaded.decode(**inputs_of(batch))
    assert sets == loaded_sets and torch.equal(scores, loaded_scores)


def test_load_errors_name_the_file_and_tensor(tmp_path) -> None:
    from multimodal.labels import LabelCodec

    from multimodal.text import train_caption_tokenizer

    model = MultimodalClassifier(make_config(image=False))
    codec = LabelCodec.from_labels([(k,) for k in range(C)])
    folder = tmp_path / "export"
    model.save_pretrained(folder, codec, train_caption_tokenizer(["a dog on a mat"]), thresholds=0.5)
    assert json.loads((folder / "config.json").read_text())["thresholds"] == [0.5] * C

    data = json.loads((folder / "config.json").read_text())
    data["model"]["decoder_hidden"] = 32
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'label_decoder\.\S+' has shape"):
        MultimodalClassifier.from_pretrained(folder)

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"export has no model\.safetensors"):
        MultimodalClassifier.from_pretrained(folder)
    run = tmp_path / "run"  # a training run's folder, given instead of its exported model
    shutil.copytree(folder, run / "model")
    with pytest.raises(FileNotFoundError, match=r"run has no config\.json .*; .*run/model is the model a training run"):
        MultimodalClassifier.from_pretrained(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MultimodalClassifier.from_pretrained(tmp_path / "nowhere")


def test_a_broken_model_folder_is_refused_naming_the_file(tmp_path) -> None:
    """Every file of an export that cannot be read gives a `ModelFolderError` (which the scripts print as one line)
    naming it, before any prediction: nothing surfaces later from deep inside the model."""
    from multimodal.labels import LabelCodec
    from multimodal.model import ModelFolderError
    from multimodal.text import train_caption_tokenizer

    model = MultimodalClassifier(make_config(image=False))
    codec = LabelCodec.from_labels([(k,) for k in range(C)])
    tokenizer = train_caption_tokenizer(["a dog", "two cats"])
    good = model.save_pretrained(tmp_path / "good", codec, tokenizer)
    MultimodalClassifier.from_pretrained(good)

    def broken(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def edit_config(**fields):
        def change(folder: Path) -> None:
            data = json.loads((folder / "config.json").read_text())
            data.update(fields)
            (folder / "config.json").write_text(json.dumps(data))
        return change

    cases = {
        "truncated config": (lambda f: (f / "config.json").write_text('{"model": {'), r"config\.json: not a valid"),
        "thresholds": (edit_config(thresholds=[0.5, 0.5]), rf"config\.json: .*thresholds must be a list of {C}"),
        "format": (edit_config(format_version=99), r"config\.json: .*format_version 99"),
        "weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64),
                    r"model\.safetensors: not a readable safetensors file"),
        "tokenizer": (lambda f: (f / "tokenizer.json").write_text('{"version": '), r"tokenizer\.json: not a readable"),
        "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), r"has no tokenizer\.json, which its caption"),
    }
    for name, (change, message) in cases.items():
        folder = broken(name.replace(" ", "_"), change)
        with pytest.raises(ModelFolderError, match=message) as info:
            MultimodalClassifier.from_pretrained(folder)
        assert str(folder) in str(info.value), name


def test_channels_last_forward_and_export(tmp_path) -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(caption=False, decoder=False)).eval()
    image = torch.randn(2, 3, 32, 32)
    reference = model(image)["fused_logits"]
    model = model.to(memory_format=torch.channels_last)
    out = model(image.contiguous(memory_format=torch.channels_last))["fused_logits"]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path, codec=None)
    torch.testing.assert_close(MultimodalClassifier.from_pretrained(tmp_path)(image)["fused_logits"], reference,
                               rtol=1e-4, atol=1e-5)


def test_inputs_of_the_wrong_kind_are_refused_with_what_was_expected() -> None:
    from PIL import Image

    model = MultimodalClassifier(make_config()).eval()
    batch = make_batch()
    image, ids, lengths = batch["image"], batch["caption_ids"], batch["caption_lengths"]
    for bad, match in (
            (dict(image=Image.new("RGB", (32, 32))), r"`image` must be a float tensor \[B, 3, H, W\], got a Image"),
            (dict(image=(image * 255).to(torch.uint8)), r"got a torch.uint8 tensor of shape \(3, 3, 32, 32\)"),
            (dict(image=image[:, :1]), r"got a torch.float32 tensor of shape \(3, 1, 32, 32\)"),
            (dict(caption_ids="a dog on a mat"), r"`caption_ids` must be an integer tensor \[B, L\].*got a str"),
            (dict(caption_ids=ids[0]), r"got a torch.int64 tensor of shape \(6,\)"),
            (dict(image=image[:2]), r"batch sizes differ: \{'image': 2, 'caption_ids': 3, 'caption_lengths': 3\}"),
            (dict(caption_ids=ids + VOCAB), r"token ids outside the caption encoder's vocabulary \(0\.\.29\)"),
            (dict(caption_ids=ids - 100), r"outside the caption encoder's vocabulary.*model's own tokenizer")):
        inputs = {"image": image, "caption_ids": ids, "caption_lengths": lengths} | bad
        with pytest.raises(ValueError, match=match):
            model(**inputs)
    assert model(image, ids, lengths)["fused_logits"].shape == (3, C)
    for bad, match in ((torch.tensor([1, 0, 1]), "`image_ok` must be a bool tensor"),
                       (torch.tensor([True, False]), r"`image_ok` must be a bool tensor \[B\] \(B = 3\)")):
        with pytest.raises(ValueError, match=match):
            model.predict_proba(image, ids, lengths, image_ok=bad)


@pytest.mark.parametrize("combine", ["fused", "fused_decoder", "mean"])
def test_inputs_without_an_image_get_the_caption_heads_probabilities(combine: str) -> None:
    """``image_ok`` False: that row's probabilities are the caption head's, whatever its image tensor holds; the
    other rows are unchanged. A model without a caption branch refuses it; one without an image branch ignores it."""
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config(combine=combine)).eval()
    inputs = inputs_of(make_batch())
    full = model.predict_proba(**inputs)
    caption = torch.sigmoid(model(**inputs)["caption_logits"])
    ok = torch.tensor([True, False, True])
    garbage = inputs | {"image": inputs["image"].clone().index_fill_(0, torch.tensor([1]), float("nan"))}
    got = model.predict_proba(**garbage, image_ok=ok)
    torch.testing.assert_close(got[ok], full[ok])
    torch.testing.assert_close(got[1], caption[1])
    assert not torch.allclose(full[1], caption[1])  # the fallback changed something
    image_only = MultimodalClassifier(make_config(caption=False)).eval()
    with pytest.raises(ValueError, match="no caption branch to predict inputs without an image"):
        image_only.predict_proba(inputs["image"], image_ok=ok)
    captioner = MultimodalClassifier(make_config(image=False)).eval()
    torch.testing.assert_close(captioner.predict_proba(**inputs, image_ok=ok), captioner.predict_proba(**inputs))


def test_bf16_autocast_forward_loss_and_decode_are_finite() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config())
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs_of(batch), label_seq=batch["label_seq"])
        terms = JointLoss(LossConfig(focal_gamma=2.0))(out, batch["targets"], batch["label_seq"])
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        label_sets, scores = model.decode(**inputs_of(batch))
        probs = model.predict_proba(**inputs_of(batch))
    assert torch.isfinite(scores).all() and torch.isfinite(probs).all() and all(label_sets)


def test_lstms_run_in_float32_under_cpu_autocast() -> None:
    """oneDNN builds no bf16 LSTM on CPUs without native bf16 (it raises), so under CPU autocast both LSTMs leave it:
    the caption encoder, whose other operations autocast leaves alone, gives exactly its float32 output, and the label
    decoder's LSTM receives float32 inputs and states, in training and in beam search."""
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config())
    batch = make_batch()
    caption = model.caption_encoder.eval()
    for impl in ("padded", "packed"):
        caption.lstm_impl = impl
        plain = caption(batch["caption_ids"], batch["caption_lengths"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = caption(batch["caption_ids"], batch["caption_lengths"])
        assert torch.equal(mixed, plain), impl
    seen = []
    model.label_decoder.lstm.register_forward_pre_hook(
        lambda module, args: seen.append({args[0].dtype, *(t.dtype for t in args[1])}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs_of(batch), label_seq=batch["label_seq"])
        model.eval()
        model.decode(**inputs_of(batch))
    assert len(seen) > 1 and all(dtypes == {torch.float32} for dtypes in seen)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnetv2_rw_t"])
def test_image_encoder_reads_its_width_from_timm(name: str) -> None:
    encoder = ImageEncoder(name).eval()
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, encoder.num_features)


def test_pretrained_weights_from_a_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    source = ImageEncoder(IMAGE)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    torch.manual_seed(2)
    model = MultimodalClassifier(make_config(caption=False), pretrained=str(path))
    assert str(path) in model.image_encoder.pretrained_source
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.image_encoder.backbone.state_dict()[key], value), key


def test_adamw_is_fused_where_the_kernel_exists_and_makes_the_same_update() -> None:
    torch.manual_seed(0)
    model = MultimodalClassifier(make_config())
    models = {"loop": model, "fused": MultimodalClassifier(make_config())}
    models["fused"].load_state_dict(model.state_dict())
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = {"fused": build_optimizer(models["fused"], 1e-2, 1e-3, 0.1),
                  "loop": build_optimizer(model, 1e-2, 1e-3, 0.1)}
    assert all(group["fused"] for group in optimizers["fused"].param_groups)  # CPU parameters
    for group in optimizers["loop"].param_groups:
        group["fused"] = False
    batch = make_batch()
    for name, m in models.items():  # one step: later steps would amplify float rounding through Adam's 1 / sqrt(v)
        torch.manual_seed(0)  # the same dropout masks
        JointLoss(LossConfig())(m(**inputs_of(batch), label_seq=batch["label_seq"]), batch["targets"],
                                batch["label_seq"])["loss"].backward()
        optimizers[name].step()
    for (name, fused), loop in zip(models["fused"].named_parameters(), models["loop"].parameters()):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert sum(not torch.equal(p, initial[name]) for name, p in model.named_parameters()) > len(initial) // 2
    assert not adamw([torch.nn.Parameter(torch.zeros(2, device="meta"))]).param_groups[0]["fused"]
