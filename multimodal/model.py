"""The multimodal multi-label classifier: image encoder, caption encoder, CNN-RNN label decoder, and their fusion.

Small pieces first (`ImageEncoder`, `CaptionEncoder`, `LabelDecoder`), the whole model last (`MultimodalClassifier`).
Every branch is optional: a switched-off branch is ``None`` and owns no parameters, and the sizes of what follows
(fused head, decoder context) are read from the branches that exist.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils.rnn import PackedSequence, invert_permutation, pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig, fsync, published, save_json
from .text import UNK_ID
from .word_vectors import load_word_vectors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_VERSION = 1


@contextlib.contextmanager
def float32_lstm_on_cpu(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Around an LSTM: yields its input and state ``tensors``, cast to float32 with CPU autocast left when it is on
    (else as they are). Under CPU autocast (bf16) oneDNN refuses to build a bf16 LSTM on CPUs without native bf16
    ("could not create a primitive descriptor for the LSTM forward propagation primitive", on an AMD EPYC), and such
    CPUs gain nothing from bf16; the LSTM then runs in float32 on every CPU, so that results do not depend on which."""
    if tensors[0].device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield tuple(t.float() for t in tensors)
    else:
        yield tensors


class ModelFolderError(ValueError):
    """An exported model folder that cannot be loaded: the message names the file and what is wrong with it."""


class ImageEncoder(nn.Module):
    """A timm EfficientNet without classifier: image -> pooled features [B, num_features].

    Dropout on the pooled features (``drop_rate``) is timm's own, applied in training mode only.
    """

    def __init__(self, name: str, drop_rate: float = 0.0, pretrained: bool | str = False):
        super().__init__()
        self.name = name
        self.drop_rate = drop_rate
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, drop_rate=drop_rate)
        self.num_features: int = self.backbone.num_features
        self.pretrained_source = "none (random initialisation)"
        if pretrained:
            from .pretrained import load_pretrained_image_weights  # lazy: the hub/offline lookup is rarely needed
            self.pretrained_source = load_pretrained_image_weights(self.backbone, name, pretrained)

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's preprocessing description (mean/std/size/crop), for `timm.data.resolve_data_config`."""
        return self.backbone.pretrained_cfg

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(image)  # [B, 3, H, W] -> [B, F]

    def compile_forward(self, **kwargs: Any) -> None:
        """Compile the backbone's feature extractor in place (`torch.compile` with ``kwargs``; compiled at its first
        call, again for a new batch size or for evaluation). `forward` and `forward_with_map` both run through it;
        the weights and their names do not change, so checkpoints and exports are as without. The cached-map paths
        (`forward_stem`, `forward_tail`) are not compiled."""
        self.backbone.forward_features = torch.compile(self.backbone.forward_features, **kwargs)

    def forward_with_map(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features [B, F] and the last feature map they pool [B, F, h, w]."""
        feature_map = self.backbone.forward_features(image)
        return self.backbone.forward_head(feature_map), feature_map

    def _stages(self) -> nn.Sequential:
        if not hasattr(self.backbone, "blocks") or not hasattr(self.backbone, "conv_head"):
            raise TypeError(f"{self.name} is not a timm EfficientNet: no blocks/conv_head to split")
        return self.backbone.blocks

    def forward_stem(self, image: torch.Tensor, tail_stages: int) -> torch.Tensor:
        """The part before the last ``tail_stages`` stages: image [B, 3, H, W] -> feature map [B, C, h, w].

        ``forward_tail(forward_stem(x, k), k) == forward(x)`` for every ``k``: the split lets the frozen bottom of
        the network be computed once and cached while its top is fine-tuned.
        """
        stages = self._stages()
        x = self.backbone.bn1(self.backbone.conv_stem(image))
        return stages[: len(stages) - tail_stages](x)

    def forward_tail(self, feature_map: torch.Tensor, tail_stages: int, return_map: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The last ``tail_stages`` stages, the 1x1 head convolution and pooling: [B, C, h, w] -> [B, F] (and, with
        ``return_map``, the map before pooling [B, F, h', w'] too)."""
        stages = self._stages()
        x = stages[len(stages) - tail_stages:](feature_map)
        x = self.backbone.bn2(self.backbone.conv_head(x))
        pooled = self.backbone.forward_head(x)  # pooling + timm's dropout (no classifier: num_classes=0)
        return (pooled, x) if return_map else pooled

    def stem_modules(self, tail_stages: int) -> list[nn.Module]:
        """The modules `forward_stem` runs: everything below the last ``tail_stages`` stages."""
        stages = self._stages()
        return [self.backbone.conv_stem, self.backbone.bn1, *stages[: len(stages) - tail_stages]]

    def frozen_modules(self) -> list[nn.Module]:
        """The modules to keep in eval mode while the whole encoder is frozen: the backbone's parts (batch-norm
        statistics fixed), not the backbone itself, whose dropout on the pooled features (timm's ``drop_rate``, applied
        where the backbone is in training mode) then acts in training as it does on cached pooled features."""
        return list(self.backbone.children())

    def freeze_below_tail(self, tail_stages: int) -> list[nn.Module]:
        """Freeze everything below the last ``tail_stages`` stages; returns the frozen modules (keep them in eval)."""
        frozen = self.stem_modules(tail_stages)
        for module in frozen:
            module.requires_grad_(False)
        return frozen


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. A CPU tensor goes to a CUDA device through pinned memory, a copy the host does not
    wait for: a plain ``.to("cuda")`` of pageable memory first waits until the device has finished all work queued
    before it."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class CaptionEncoder(nn.Module):
    """Word embeddings + (bi)LSTM that never sees padding, pooled over the valid steps: ids -> [B, num_features].

    Padding never reaches a valid step (packed sequences on CUDA, each caption read within its own length elsewhere;
    see ``lstm_impl``), so a caption's embedding does not depend on the batch it is in. An empty caption (length 0)
    is run as a single pad token (length >= 1 is needed) and its pooled vector is then replaced by a learned "empty
    caption" embedding.

    Options: ``embed_dropout`` drops word-embedding units before the LSTM (training only); ``word_dropout`` replaces
    each word (not padding) by ``unk_id`` with that probability (training only), so that the embedding of the unknown
    word, which words unseen in training map to, is learned instead of left at its random start; ``word_skip``
    appends the max over the caption's word embeddings to the pooled LSTM states, a direct bag-of-words path next to
    the sequence model (``num_features`` grows by ``word_dim``); ``bigram_buckets > 0`` appends a fastText-style bag
    (Joulin et al. 2017): the mean of embeddings of the caption's words and of its word bigrams, the bigrams hashed
    into that many buckets (``num_features`` grows by ``word_dim``). A linear head on that mean is a linear model on
    term frequencies, like TF-IDF + logistic regression, the strong classical caption baseline.
    """

    BIGRAM_HASH = 1_000_003  # bigram (a, b) -> (a * BIGRAM_HASH + b) mod buckets

    def __init__(self, vocab_size: int, word_dim: int = 128, hidden: int = 256, num_layers: int = 1,
                 bidirectional: bool = True, pool: str = "max", pad_id: int = 0, dropout: float = 0.0,
                 embed_dropout: float = 0.0, word_skip: bool = False, bigram_buckets: int = 0,
                 word_dropout: float = 0.0, unk_id: int = 1):
        super().__init__()
        if pool not in ("max", "mean", "last"):
            raise ValueError(f"pool must be 'max', 'mean' or 'last', got {pool!r}")
        if bigram_buckets < 0:
            raise ValueError(f"bigram_buckets must be >= 0, got {bigram_buckets}")
        self.pool = pool
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.word_dropout = word_dropout
        self.word_skip = word_skip
        self.vocab_size = vocab_size
        self.bigram_buckets = bigram_buckets
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.embed_drop = nn.Dropout(embed_dropout)
        self.lstm = nn.LSTM(word_dim, hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0)
        self.num_directions = 2 if bidirectional else 1
        # The n-gram bag has its own table: words first (ids as the tokenizer gives them), then the bigram buckets.
        self.ngram_embedding = nn.Embedding(vocab_size + bigram_buckets, word_dim) if bigram_buckets else None
        self.num_features: int = hidden * self.num_directions + (word_dim if word_skip else 0) + (
            word_dim if bigram_buckets else 0)
        self.empty_embedding = nn.Parameter(torch.zeros(self.num_features))
        # How the LSTM meets padding: "packed" (nn.LSTM on a PackedSequence; cuDNN runs it natively), "padded"
        # (`_lstm_padded`: the same results, faster to train on a CPU) or "auto" (packed on CUDA, else padded).
        self.lstm_impl = "auto"

    def load_word_vectors(self, source: str | os.PathLike, tokenizer_vocab: dict[str, int]) -> int:
        """Initialises the word embeddings from pretrained vectors (a GloVe-format file, a folder, or a package name;
        see `word_vectors`); returns how many vocabulary words they had."""
        weights, hits = load_word_vectors(source, tokenizer_vocab, self.embedding.embedding_dim)
        if weights.shape[0] > self.embedding.num_embeddings:
            raise ValueError(f"the vocabulary has ids up to {weights.shape[0] - 1} but the caption encoder only "
                             f"{self.embedding.num_embeddings} embeddings")
        with torch.no_grad():
            self.embedding.weight[: weights.shape[0]] = weights.to(self.embedding.weight)
            self.embedding.weight[self.pad_id] = 0.0
        return hits

    def forward(self, caption_ids: torch.Tensor,
                caption_lengths: Optional[torch.Tensor | Sequence[int]] = None) -> torch.Tensor:
        """Args: ``caption_ids`` [B, L] padded with ``pad_id``; ``caption_lengths`` [B] (0 for an empty caption), a
        tensor or a list of ints. Best on the CPU whatever the device of the ids: packing needs them there, and
        fetching them from a GPU makes the host wait for the device. Lengths given on the CPU with ids on a GPU reach
        the GPU through pinned memory without a wait, and packing and unpacking keep their permutations on the GPU,
        so the forward pass never makes the host wait for the device."""
        if caption_lengths is None:
            caption_lengths = (caption_ids != self.pad_id).sum(1)
        elif not torch.is_tensor(caption_lengths):
            caption_lengths = torch.tensor(caption_lengths, dtype=torch.long)
        if self.training and self.word_dropout > 0:
            unknown = torch.rand(caption_ids.shape, device=caption_ids.device) < self.word_dropout
            caption_ids = caption_ids.masked_fill(unknown & (caption_ids != self.pad_id), self.unk_id)
        B, L = caption_ids.shape
        if L == 0:  # every caption empty and nothing padded: one pad step keeps packing valid
            caption_ids = caption_ids.new_full((B, 1), self.pad_id)
            L = 1
        try:
            x = self.embed_drop(self.embedding(caption_ids))  # [B, L, E]
        except IndexError as error:  # on the CPU (a GPU fails later, in a device-side assert); checking reads back
            raise ValueError(f"`caption_ids` holds token ids outside the caption encoder's vocabulary (0.."
                             f"{self.embedding.num_embeddings - 1}): encode captions with the model's own tokenizer "
                             "(`MultimodalClassifier.preprocess`)") from error
        raw = to_device_async(caption_lengths, x.device)  # [B] where the model runs
        empty = raw <= 0  # [B]
        lengths = raw.clamp(1, L)  # [B]
        valid = (torch.arange(L, device=x.device)[None, :] < lengths[:, None]).unsqueeze(-1)  # [B, L, 1]
        with float32_lstm_on_cpu(x) as (x_lstm,):
            if self._use_packed(x):
                out, h_last = self._lstm_packed(x_lstm, caption_lengths.clamp(1, L) if caption_lengths.device.type
                                                == "cpu" else lengths.cpu())  # lengths from a GPU: the one wait left
            else:
                out, h_last = self._lstm_padded(x_lstm, lengths)  # [B, L, dirs * H], [B, dirs * H]
        if self.pool == "last":
            pooled = h_last
        else:
            out_valid = valid[:, : out.shape[1]]  # [B, T, 1]
            if self.pool == "max":
                pooled = out.masked_fill(~out_valid, float("-inf")).amax(1)  # [B, D]
            else:
                pooled = (out * out_valid).sum(1) / lengths.to(out.dtype)[:, None]  # [B, D]
        if self.word_skip:
            words = x.masked_fill(~valid, float("-inf")).amax(1)  # [B, E]
            pooled = torch.cat([pooled, words.to(pooled.dtype)], dim=1)  # [B, dirs * H + E]
        if self.ngram_embedding is not None:
            pooled = torch.cat([pooled, self.ngram_bag(caption_ids, valid[..., 0]).to(pooled.dtype)], dim=1)
        return torch.where(empty[:, None], self.empty_embedding.to(pooled.dtype), pooled)

    def _lstm_packed(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.lstm`` on the packed batch: ``x`` [B, L, E], ``lengths`` [B] in 1..L on the CPU -> (outputs
        [B, T = max(lengths), dirs * H], zero at padded steps; each caption's final states [B, dirs * H]).

        What ``pack_padded_sequence(enforce_sorted=False)`` and ``pad_packed_sequence`` do, except that the sorting
        permutation is computed on the CPU and reaches ``x``'s device through pinned memory, and the outputs are put
        back in batch order there: those functions copy it to the device, and back, each time making the host wait
        until the device has finished all the work queued before."""
        B = x.shape[0]
        order = torch.sort(lengths, descending=True, stable=True).indices  # [B] on the CPU
        order_dev = to_device_async(order, x.device)
        restore = invert_permutation(order_dev)  # on the device too
        packed = pack_padded_sequence(x.index_select(0, order_dev), lengths[order], batch_first=True)
        out, (h_n, _) = self.lstm(PackedSequence(packed.data, packed.batch_sizes, order_dev, restore))
        # h_n [layers * dirs, B, H] (already in batch order) -> last layer, both directions: [B, dirs * H]
        h_last = h_n[-self.num_directions:].transpose(0, 1).reshape(B, -1)
        if self.pool == "last":
            return x.new_zeros(B, 0, h_last.shape[1]), h_last  # the outputs are not needed
        padded, _ = pad_packed_sequence(PackedSequence(out.data, out.batch_sizes), batch_first=True)  # sorted order
        return padded.index_select(0, restore), h_last

    def _use_packed(self, x: torch.Tensor) -> bool:
        if self.lstm_impl not in ("auto", "packed", "padded"):
            raise ValueError(f"lstm_impl must be 'auto', 'packed' or 'padded', got {self.lstm_impl!r}")
        return self.lstm_impl == "packed" or (self.lstm_impl == "auto" and x.is_cuda)

    def _lstm_padded(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self.lstm`` run on the padded batch, one layer and direction at a time, with the same weights and the
        same results at every valid step as on the packed batch: ``x`` [B, L, E], ``lengths`` [B] in 1..L ->
        (outputs [B, L, dirs * H], garbage at padded steps; each caption's final states [B, dirs * H]).

        The forward direction reads the padded batch as it is (a step's output depends only on the steps before it,
        so padding after a caption never reaches it); the reverse direction reads each caption reversed within its
        own length, so that it also starts on the caption's last word rather than on padding. This is what the
        packed batch computes, without packing: on a CPU, autograd through the packed LSTM slices and zero-fills the
        whole packed batch at every time step of the backward pass (the caption encoder's forward + backward is 1.8
        times faster this way on the COMP5329 captions: `benchmarks/SPEED.md`).
        """
        lstm = self.lstm
        B, L, _ = x.shape
        steps = torch.arange(L, device=x.device)[None, :]  # [1, L]
        # reversed within each length, padding left where it is; applying it twice restores the order
        order = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)  # [B, L]

        def reverse(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, order[..., None].expand_as(t))

        layer_input = x
        for layer in range(lstm.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                weights = [getattr(lstm, name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                inputs = reverse(layer_input) if direction else layer_input
                zeros = inputs.new_zeros(1, B, lstm.hidden_size)
                # what nn.LSTM.forward calls, for one layer and one direction
                out = torch.lstm(inputs, (zeros, zeros), weights, True, 1, 0.0, self.training, False, True)[0]
                outputs.append(reverse(out) if direction else out)  # [B, L, H]
            layer_input = torch.cat(outputs, dim=-1)  # [B, L, dirs * H]
            if layer < lstm.num_layers - 1:
                layer_input = F.dropout(layer_input, lstm.dropout, self.training)
        H = lstm.hidden_size
        last_step = layer_input[torch.arange(B, device=x.device), lengths - 1]  # [B, dirs * H]
        # forward direction: its state after the last word; reverse direction: after the first word (step 0)
        h_last = last_step if self.num_directions == 1 else torch.cat([last_step[:, :H], layer_input[:, 0, H:]], 1)
        return layer_input, h_last

    def ngram_bag(self, caption_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the words and hashed word bigrams: ids [B, L], valid [B, L] (bool) -> [B, E]."""
        ids = caption_ids.long()
        bigrams = (ids[:, :-1] * self.BIGRAM_HASH + ids[:, 1:]) % self.bigram_buckets + self.vocab_size  # [B, L-1]
        grams = torch.cat([ids, bigrams], dim=1)  # [B, 2L - 1]
        mask = torch.cat([valid, valid[:, 1:]], dim=1).unsqueeze(-1)  # a bigram is valid where its 2nd word is
        summed = (self.ngram_embedding(grams) * mask).sum(1)  # [B, E]
        return summed / mask.sum(1).clamp(min=1)


class LabelDecoder(nn.Module):
    """CNN-RNN label decoder (Wang et al., "CNN-RNN: A Unified Framework for Multi-label Image Classification",
    CVPR 2016): predicts the label set one label at a time, so each prediction is conditioned on the labels already
    emitted and label co-occurrence is learned explicitly.

    Formulation. Label tokens ``0..C-1`` are the classes, ``C`` is END (an output class) and ``C + 1`` is START (an
    input only). An LSTM reads the previously emitted labels' embeddings; its initial state comes from the context
    (the concatenated embeddings of the image/caption branches). At step ``t`` the LSTM output ``h_t`` and the
    context are projected into the label-embedding space, ``x_t = tanh(W_o h_t + W_ctx ctx)``, and scored against
    every label embedding and END by dot product (output embeddings tied to the input ones, as in the paper), giving
    logits ``[B, T, C + 1]``.

    The context is first mapped to ``hidden`` units by Linear -> LayerNorm -> GELU. The raw context is over a
    thousand features wide, with branch-dependent scales; fed straight into the tanh units, a few Adam steps
    saturate them and the decoder stalls (measured on a 4-sample batch it should memorise, 1296-wide context,
    Adam 2e-3, 60 steps: cross-entropy 0.4-0.8 with the raw context, below 0.02 with the normalised projection).

    Order. Training uses teacher forcing on the *ordered* label sequence: frequent-first (ties by class index), then
    END. This is the paper's choice; it makes the target deterministic, so plain cross-entropy applies and beam search
    over it is well defined. The alternative is order-free training (e.g. Vinyals et al. 2016, "Order Matters", or
    the minimal-loss / PLA ordering of Yazici et al. 2020), which picks the target order per sample from the model's
    own predictions; it removes the arbitrary frequency order but makes the loss and decoding harder to reason about.

    Inference is beam search (`decode`), with each label emitted at most once.
    """

    def __init__(self, num_labels: int, context_dim: int, embed_dim: int = 128, hidden: int = 256,
                 max_labels: int = 8, beam_width: int = 3, dropout: float = 0.0):
        super().__init__()
        self.num_labels = num_labels
        self.end_index = num_labels
        self.start_index = num_labels + 1
        self.max_labels = max_labels
        self.beam_width = beam_width
        self.hidden = hidden
        self.label_embedding = nn.Embedding(num_labels + 2, embed_dim)  # classes, END, START
        self.context_embed = nn.Sequential(nn.Linear(context_dim, hidden), nn.LayerNorm(hidden), nn.GELU())
        self.init_state = nn.Linear(hidden, 2 * hidden)
        self.lstm = nn.LSTM(embed_dim, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, embed_dim)  # W_o
        self.context_out = nn.Linear(hidden, embed_dim, bias=False)  # W_ctx
        self.output_bias = nn.Parameter(torch.zeros(num_labels + 1))
        nn.init.normal_(self.label_embedding.weight, std=embed_dim ** -0.5)

    def initial_state(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM state (h0, c0) from the embedded context ``ctx`` [B, H]."""
        h0, c0 = self.init_state(ctx).chunk(2, dim=-1)  # [B, 2H] -> 2 x [B, H]
        return torch.tanh(h0).unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()  # [1, B, H] each

    def scores(self, h: torch.Tensor, ctx_term: torch.Tensor) -> torch.Tensor:
        """Logits over the C labels + END from LSTM outputs ``h`` [..., H] and the projected context [..., E]."""
        x = torch.tanh(self.out_proj(self.drop(h)) + ctx_term)  # [..., E]
        return x @ self.label_embedding.weight[: self.num_labels + 1].t() + self.output_bias  # [..., C + 1]

    def forward(self, context: torch.Tensor, label_seq: torch.Tensor) -> torch.Tensor:
        """Teacher forcing.

        Args:
            context: [B, D] branch embeddings.
            label_seq: [B, T] class indices then END, padded with -100.

        Returns:
            Logits [B, T, C + 1]; position ``t`` predicts ``label_seq[:, t]``.
        """
        B = label_seq.shape[0]
        prev = label_seq[:, :-1].masked_fill(label_seq[:, :-1] < 0, self.end_index)  # ignored positions: any index
        start = label_seq.new_full((B, 1), self.start_index)
        inputs = self.label_embedding(torch.cat([start, prev], dim=1))  # [B, T, E]
        ctx = self.context_embed(context)  # [B, H]
        with float32_lstm_on_cpu(inputs, *self.initial_state(ctx)) as (inputs, h0, c0):
            out, _ = self.lstm(inputs, (h0, c0))  # [B, T, H]
        return self.scores(out, self.context_out(ctx).unsqueeze(1))  # [B, T, C + 1]

    @torch.no_grad()
    def decode(self, context: torch.Tensor, beam_width: Optional[int] = None, max_labels: Optional[int] = None,
               min_labels: int = 1) -> tuple[list[list[int]], torch.Tensor]:
        """Beam search over label sequences, vectorised over the batch (B * beam rows).

        Labels already emitted on a beam are masked (each label at most once) and the step distribution is the
        softmax over the remaining labels + END. A beam stops at END; after ``max_labels`` labels END is forced. END
        is not allowed before ``min_labels`` labels (every image in this data set has at least one label). Beams are
        ranked by summed log-probability, as in the paper (no length normalisation).

        Per-label scores: for each label, the highest probability it received at any step along the best beam
        (softmax over the labels not yet emitted + END). A label the beam emitted scores at least the probability
        it was emitted with; a label it did not emit still gets the probability mass the decoder gave it, so
        thresholds can be tuned on the scores and the ranking is usable for mAP.

        Returns:
            ``(label_sets, scores)``: per sample the emitted class indices in emission order, and scores [B, C].
        """
        K = beam_width or self.beam_width
        C, V = self.num_labels, self.num_labels + 1
        B = context.shape[0]
        steps = min(self.max_labels if max_labels is None else max_labels, C)
        min_labels = min(min_labels, steps)
        device = context.device
        rows = torch.arange(B, device=device)[:, None]  # [B, 1]

        ctx = self.context_embed(context).repeat_interleave(K, dim=0)  # [B, H] -> [B * K, H]
        ctx_term = self.context_out(ctx)  # [B * K, E]
        h, c = self.initial_state(ctx)  # [1, B * K, H] each
        tokens = torch.full((B * K,), self.start_index, dtype=torch.long, device=device)
        beam_logp = torch.full((B, K), float("-inf"), device=device)
        beam_logp[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
        emitted = torch.zeros(B, K, C, dtype=torch.bool, device=device)
        finished = torch.zeros(B, K, dtype=torch.bool, device=device)
        label_scores = torch.zeros(B, K, C, device=device)
        history = torch.zeros(B, K, 0, dtype=torch.long, device=device)
        only_end = torch.full((V,), float("-inf"), device=device)
        only_end[C] = 0.0

        for t in range(steps + 1):
            with float32_lstm_on_cpu(self.label_embedding(tokens).unsqueeze(1), h, c) as (step_input, h, c):
                out, (h, c) = self.lstm(step_input, (h, c))  # [B * K, 1, H]
            logits = self.scores(out[:, 0], ctx_term).float().view(B, K, V)  # [B * K, V] -> [B, K, V]
            mask = torch.cat([emitted, torch.zeros_like(emitted[..., :1])], dim=-1)  # [B, K, V]
            if t < min_labels:
                mask[..., C] = True
            if t == steps:
                mask[..., :C] = True
            logp = logits.masked_fill(mask, float("-inf")).log_softmax(-1)  # [B, K, V]
            step_scores = torch.maximum(label_scores, logp[..., :C].exp())  # [B, K, C]
            step_scores = torch.where(finished[..., None], label_scores, step_scores)
            logp = torch.where(finished[..., None], only_end, logp)  # a finished beam only "emits" END again

            top_logp, top = (beam_logp[..., None] + logp).view(B, K * V).topk(K, dim=1)  # [B, K]
            parent, token = top // V, top % V  # [B, K] each
            emitted = emitted[rows, parent] | F.one_hot(token, V)[..., :C].bool()
            finished = finished[rows, parent] | (token == C) | torch.isinf(top_logp)
            label_scores = step_scores[rows, parent]
            history = torch.cat([history[rows, parent], token[..., None]], dim=-1)  # [B, K, t + 1]
            beam_logp = top_logp
            flat_parent = (rows * K + parent).view(-1)  # [B * K]
            h, c = h[:, flat_parent], c[:, flat_parent]
            tokens = token.view(-1)
            if bool(finished.all()):
                break

        best = beam_logp.argmax(1)  # [B]
        best_history = history[torch.arange(B, device=device), best].tolist()  # [B, steps]
        label_sets = [[tok for tok in seq if tok < C] for seq in best_history]
        return label_sets, label_scores[torch.arange(B, device=device), best]


def residual_attention(feature_map: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class-specific attention pooling of a linear classifier's scores (CSRA, Zhu & Wu, ICCV 2021).

    Each class scores every position of the map with its own weight vector, ``s[c, k] = weight[c] . x_k``, and pools
    the scores with a softmax over positions, ``sum_k softmax_k(T * s[c, :]) * s[c, k]``: a soft maximum that finds a
    small object that the global average dilutes. Added to the average-pooled logits of the same classifier.

    Args:
        feature_map: [B, F, h, w].
        weight: [C, F], the classifier's weights for these features (no bias: the average-pooled logit has it).
        temperature: ``T``; large values approach max pooling.

    Returns:
        [B, C] attention logits (float32).
    """
    scores = torch.einsum("bfhw,cf->bchw", feature_map.float(), weight.float()).flatten(2)  # [B, C, h * w]
    return (torch.softmax(temperature * scores, dim=-1) * scores).sum(-1)


def _as_lists(images: Any, captions: Any) -> tuple[Any, Any]:
    """Inputs given as iterators (a generator) made lists, so that they can be counted and sliced into batches (a
    single string, path or image is left to `_count_inputs`, which says to put it in a list)."""
    from PIL import Image

    return tuple(v if v is None or hasattr(v, "__len__") or isinstance(v, (str, os.PathLike, Image.Image)) else list(v)
                 for v in (images, captions))


def _check_images(images: Sequence[Any]) -> None:
    """Each image is a file path, a non-empty PIL image or a uint8 array (H x W, H x W x 1, 3 or 4), or None: refused
    otherwise with its position (PIL or pathlib failed on them with messages that did not say which, or why)."""
    from PIL import Image

    for i, image in enumerate(images):
        if image is None or isinstance(image, (str, os.PathLike)):
            continue
        if isinstance(image, Image.Image):
            if 0 in image.size:
                raise ValueError(f"images[{i}] is an empty image ({image.size[0]} x {image.size[1]})")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in
                                                                       (1, 3, 4)) or 0 in image.shape[:2]:
                raise ValueError(f"images[{i}]: an array must be uint8, H x W x 3 (RGB), H x W x 4 (RGBA), H x W or "
                                 f"H x W x 1 (grey), not empty; got {image.dtype} of shape {image.shape}")
        else:
            hint = " (a preprocessed image tensor goes to predict_proba)" if torch.is_tensor(image) else ""
            raise TypeError(f"images[{i}] is a {type(image).__name__}: give a file path, a PIL image or a uint8 "
                            f"array{hint}")


def _count_inputs(images: Optional[Sequence[Any]], captions: Optional[Sequence[Any]]) -> int:
    """How many inputs `MultimodalClassifier.preprocess` is given: lists of images and/or captions of one length."""
    from PIL import Image

    for name, value in (("images", images), ("captions", captions)):
        if isinstance(value, (str, os.PathLike, Image.Image)):  # not a list of one: its characters or pixels
            raise TypeError(f"`{name}` takes one item per input, in a list: for a single one, [{name[:-1]}]")
    if isinstance(images, np.ndarray) and images.ndim != 4:  # one image's rows would each be taken for an image
        raise TypeError(f"`images` as one array must be N x H x W x C (got shape {images.shape}): for a single "
                        "image, [image]")
    if images is None and captions is None:
        raise ValueError("give images, captions or both")
    if images is not None and captions is not None and len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return len(images) if images is not None else len(captions)


class MultimodalClassifier(nn.Module):
    """Image branch + caption branch + fused head + CNN-RNN label decoder; see `ModelConfig` for the switches.

    Each branch gives an embedding (``forward_features``); the heads (``forward_head``) are linear classifiers on
    each embedding and on their concatenation (the fused head), and the label decoder reads the concatenation as its
    context. Dropout ``config.dropout`` is applied before every head; the image features also get timm's
    ``image_drop_rate`` dropout, inside the encoder or, for cached features, here.
    """

    def __init__(self, config: ModelConfig, pretrained: bool | str = False):
        super().__init__()
        self.config = config
        C = config.num_labels
        self.image_encoder: Optional[ImageEncoder] = None
        self.caption_encoder: Optional[CaptionEncoder] = None
        self.image_head: Optional[nn.Linear] = None
        self.caption_head: Optional[nn.Linear] = None
        self.label_decoder: Optional[LabelDecoder] = None
        if config.use_image:
            self.image_encoder = ImageEncoder(config.image_encoder, config.image_drop_rate, pretrained)
            self.image_head = nn.Linear(self.image_encoder.num_features, C)
        if config.use_caption:
            self.caption_encoder = CaptionEncoder(
                config.vocab_size, config.word_dim, config.caption_hidden, config.caption_layers,
                config.bidirectional, config.caption_pool, config.pad_id, config.dropout,
                config.caption_embed_dropout, config.caption_word_skip, config.caption_bigram_buckets,
                config.caption_word_dropout, UNK_ID)
            self.caption_head = nn.Linear(self.caption_encoder.num_features, C)
        self.num_features: int = sum(enc.num_features for enc in (self.image_encoder, self.caption_encoder)
                                     if enc is not None)
        self.head_drop = nn.Dropout(config.dropout)
        # Linear on the concatenated embeddings, or a one-hidden-layer MLP that can model cross-branch interactions.
        self.fused_head: nn.Module = nn.Linear(self.num_features, C) if not config.fusion_hidden else nn.Sequential(
            nn.Linear(self.num_features, config.fusion_hidden), nn.GELU(), nn.Dropout(config.dropout),
            nn.Linear(config.fusion_hidden, C))
        if config.use_decoder:
            self.label_decoder = LabelDecoder(C, self.num_features, config.label_embed_dim, config.decoder_hidden,
                                              config.max_labels, config.beam_width, config.dropout)
        # Training on cached feature maps (`features.cached_features(tail_stages=k)`): the number of trainable top
        # stages of the image encoder that a 4-D ``image_features`` input still has to pass through.
        self.tail_stages: int = 0
        # Set by `from_pretrained` (or by the caller) so that a loaded model carries what prediction needs.
        self.codec: Any = None
        self.tokenizer: Any = None
        self.thresholds: Optional[list[float]] = None

    @property
    def predicts_without_image(self) -> bool:
        """Whether an input without a usable image can still be predicted: from its caption, by the caption head.
        True for a model with both branches (one without an image branch needs no image at all)."""
        return self.image_encoder is not None and self.caption_encoder is not None

    def forward_features(self, image: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
                         caption_lengths: Optional[torch.Tensor | Sequence[int]] = None,
                         image_features: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Branch embeddings: ``{"image": [B, F_img], "caption": [B, F_cap]}`` for the branches that are on, plus
        ``"image_map"`` [B, F_img, h, w] (the map the image embedding pools) when ``config.image_attention > 0``.

        ``image_features`` replaces ``image``: pooled encoder output [B, F] (cached once with the encoder frozen), or
        the feature map [B, C, h, w] below the last ``self.tail_stages`` stages, which are then run here.
        Inputs of a switched-off branch are ignored.

        Raises:
            ValueError: an input that is not a tensor of the expected kind, or batch sizes that differ (shapes only:
                nothing is read back from the device).
        """
        self._check_inputs(image, caption_ids, caption_lengths, image_features)
        features = {}
        attention = self.config.image_attention > 0
        if self.image_encoder is not None:
            if image_features is not None and image_features.ndim == 4:  # cached map below a trainable tail
                features["image"], image_map = self.image_encoder.forward_tail(
                    image_features.float(), self.tail_stages, return_map=True)
                if attention:
                    features["image_map"] = image_map
            elif image_features is not None:
                if attention:
                    raise ValueError("image_attention needs the image's feature map: pass `image`, or cached maps "
                                     "below a trainable tail (tail_stages >= 1), not pooled features")
                features["image"] = F.dropout(image_features, self.config.image_drop_rate, self.training)
            elif image is not None and attention:
                features["image"], features["image_map"] = self.image_encoder.forward_with_map(image)
            elif image is not None:
                features["image"] = self.image_encoder(image)
            else:
                raise ValueError("the image branch is on: pass `image` or `image_features`")
        if self.caption_encoder is not None:
            if caption_ids is None:
                raise ValueError("the caption branch is on: pass `caption_ids` (and `caption_lengths`)")
            features["caption"] = self.caption_encoder(caption_ids, caption_lengths)
        return features

    encode = forward_features

    def _check_inputs(self, image: Any, caption_ids: Any, caption_lengths: Any, image_features: Any) -> None:
        def kind(x: Any) -> str:
            return f"{x.dtype} tensor of shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__

        sizes = {}
        if self.image_encoder is not None and image_features is None and image is not None:
            if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
                raise ValueError(f"`image` must be a float tensor [B, 3, H, W], got a {kind(image)} (`preprocess` "
                                 "makes one from PIL images or image files)")
            sizes["image"] = image.shape[0]
        if self.image_encoder is not None and image_features is not None:
            if not torch.is_tensor(image_features) or image_features.ndim not in (2, 4):
                raise ValueError(f"`image_features` must be a tensor [B, F] or [B, C, h, w], got a "
                                 f"{kind(image_features)}")
            sizes["image_features"] = image_features.shape[0]
        if self.caption_encoder is not None and caption_ids is not None:
            if not torch.is_tensor(caption_ids) or caption_ids.ndim != 2 or caption_ids.is_floating_point():
                raise ValueError(f"`caption_ids` must be an integer tensor [B, L] of token ids, got a "
                                 f"{kind(caption_ids)} (`preprocess` makes them from caption strings)")
            sizes["caption_ids"] = caption_ids.shape[0]
            if caption_lengths is not None:
                sizes["caption_lengths"] = len(caption_lengths)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the inputs' batch sizes differ: {sizes}")

    def forward_head(self, features: dict[str, torch.Tensor],
                     label_seq: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Logits of every head from the branch embeddings (see `forward`)."""
        outputs = {}
        image_map = features.get("image_map")
        lam, temperature = self.config.image_attention, self.config.image_attention_temperature
        if self.image_head is not None:
            outputs["image_logits"] = self.image_head(self.head_drop(features["image"]))
            if image_map is not None:
                outputs["image_logits"] = outputs["image_logits"] + lam * residual_attention(
                    image_map, self.image_head.weight, temperature)
        if self.caption_head is not None:
            outputs["caption_logits"] = self.caption_head(self.head_drop(features["caption"]))
        parts = [features[k] for k in ("image", "caption") if k in features]
        p = self.config.modality_dropout
        image_kept = None  # [B, 1]: 0 for the samples whose image is dropped
        if self.training and p > 0 and len(parts) == 2:
            # Per sample: the image embedding zeroed with probability p, else the caption's with probability p, never
            # both, before the fused head and the decoder (the branch heads keep theirs), so that the fused output
            # cannot lean on one modality alone.
            u = torch.rand(parts[0].shape[0], 1, device=parts[0].device)  # [B, 1]
            image_kept = (u >= p).to(parts[0].dtype)
            parts = [parts[0] * image_kept, parts[1] * ((u < p) | (u >= 2 * p)).to(parts[1].dtype)]
        context = torch.cat(parts, dim=1)  # [B, D]
        outputs["features"] = context
        outputs["fused_logits"] = self.fused_head(self.head_drop(context))
        if image_map is not None:  # the fused head's image part (the first F_img columns) attends over the map too
            image_weight = self.fused_head.weight[:, : features["image"].shape[1]]  # [C, F_img]
            attended = lam * residual_attention(image_map, image_weight, temperature)
            # a dropped image is dropped from this term too (it reached the fused output through it)
            outputs["fused_logits"] = outputs["fused_logits"] + (attended if image_kept is None
                                                                 else attended * image_kept)
        if self.label_decoder is not None and label_seq is not None:
            outputs["decoder_logits"] = self.label_decoder(context, label_seq)
        return outputs

    def forward(self, image: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
                caption_lengths: Optional[torch.Tensor | Sequence[int]] = None,
                label_seq: Optional[torch.Tensor] = None,
                image_features: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Returns:
            ``image_logits``/``caption_logits`` [B, C] for the branches that are on, ``fused_logits`` [B, C],
            ``features`` [B, D] (the concatenated branch embeddings, the decoder's context) and, when the decoder is
            on and ``label_seq`` [B, T] is given, ``decoder_logits`` [B, T, C + 1] (teacher forcing).
        """
        features = self.forward_features(image, caption_ids, caption_lengths, image_features)
        return self.forward_head(features, label_seq)

    def _context(self, outputs: Optional[dict[str, torch.Tensor]], **inputs: Any) -> torch.Tensor:
        if outputs is not None and "features" in outputs:
            return outputs["features"]
        features = self.forward_features(**inputs)
        return torch.cat([features[k] for k in ("image", "caption") if k in features], dim=1)  # [B, D]

    @torch.no_grad()
    def decode(self, image: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
               caption_lengths: Optional[torch.Tensor | Sequence[int]] = None,
               image_features: Optional[torch.Tensor] = None, beam_width: Optional[int] = None,
               outputs: Optional[dict[str, torch.Tensor]] = None) -> tuple[list[list[int]], torch.Tensor]:
        """Beam-search label sets and per-label scores [B, C] (see `LabelDecoder.decode`).

        ``outputs`` (a `forward` result for the same inputs) lets the encoders' work be reused.
        """
        if self.label_decoder is None:
            raise RuntimeError("this model has no label decoder (use_decoder=False)")
        context = self._context(outputs, image=image, caption_ids=caption_ids, caption_lengths=caption_lengths,
                                image_features=image_features)
        return self.label_decoder.decode(context, beam_width=beam_width)

    @torch.no_grad()
    def predict_proba(self, image: Optional[torch.Tensor] = None, caption_ids: Optional[torch.Tensor] = None,
                      caption_lengths: Optional[torch.Tensor | Sequence[int]] = None,
                      image_features: Optional[torch.Tensor] = None, beam_width: Optional[int] = None,
                      outputs: Optional[dict[str, torch.Tensor]] = None,
                      decoder_scores: Optional[torch.Tensor] = None,
                      image_ok: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final label probabilities [B, C] (float32) by ``config.combine``.

        ``outputs`` (a `forward` result) and ``decoder_scores`` (from `decode`) avoid recomputing what the caller
        already has.

        ``image_ok`` [B] (bool): False for an input that has no usable image (its rows of ``image`` are ignored, any
        values will do). Those inputs get the caption branch's own probabilities (its BCE head), as `predict.py
        --skip-bad-images` predicts an unreadable image. Ignored by a model without an image branch; a model with an
        image branch and no caption branch refuses it. Selected on the device: nothing is read back.
        """
        if image_ok is not None and self.image_encoder is not None:
            batch = next((len(x) for x in (image, image_features, caption_ids) if x is not None), None)
            if not torch.is_tensor(image_ok) or image_ok.dtype != torch.bool or image_ok.ndim != 1 or (
                    batch is not None and len(image_ok) != batch):
                raise ValueError(f"`image_ok` must be a bool tensor [B] (B = {batch}), one flag per input")
            if not self.predicts_without_image:
                raise ValueError("this model has no caption branch to predict inputs without an image from")
        else:
            image_ok = None
        if outputs is None:
            outputs = self(image, caption_ids, caption_lengths, image_features=image_features)
        cfg = self.config
        p_fused = torch.sigmoid(outputs["fused_logits"].float())
        if cfg.combine == "mean":
            heads = [torch.sigmoid(outputs[k].float()) for k in ("image_logits", "caption_logits", "fused_logits")
                     if k in outputs]
            probs = torch.stack(heads).mean(0)
        else:
            probs = p_fused
        use_decoder = self.label_decoder is not None and (
            cfg.combine == "fused_decoder" or (cfg.combine == "mean" and cfg.decoder_weight > 0))
        if use_decoder:
            if decoder_scores is None:
                decoder_scores = self.decode(beam_width=beam_width, outputs=outputs)[1]
            probs = (1.0 - cfg.decoder_weight) * probs + cfg.decoder_weight * decoder_scores.float()
        if image_ok is not None:
            caption_probs = torch.sigmoid(outputs["caption_logits"].float())
            probs = torch.where(image_ok.to(probs.device).unsqueeze(1), probs, caption_probs)
        return probs

    def preprocess(self, images: Optional[Sequence[Any]] = None,
                   captions: Optional[Sequence[Any]] = None) -> dict[str, torch.Tensor]:
        """The model's inputs (for `predict_proba`, on the CPU) from raw images and captions, preprocessed as
        `predict.py` does it: the evaluation transform of ``config`` (resolution, crop, normalisation; JPEG files
        decoded at reduced size where they are at least twice as large, as `predict.py` does) and the stored
        tokenizer, captions cut at ``config.max_caption_length``.

        Args:
            images: N PIL images (any mode: converted to RGB as image files are), uint8 arrays (H x W x 3 RGB, or
                H x W grey) or image file paths; needed when
                the model has an image branch. ``None`` for an input without an image: a model with both branches
                predicts it from its caption alone (``image_ok`` in the result marks it, for `predict_proba`).
            captions: N captions (``None`` or NaN: empty); without them a caption branch sees empty captions, as
                `predict.py` gives it when there is no CSV.
        """
        from PIL import Image

        from .images import build_transform, draft_size_for, load_image, to_rgb
        from .text import encode_captions

        images, captions = _as_lists(images, captions)
        count = _count_inputs(images, captions)
        if images is not None:
            _check_images(images)
        cfg = self.config
        inputs: dict[str, torch.Tensor] = {}
        if self.image_encoder is not None:
            if images is None:
                hint = (f"; to predict from the captions alone, pass None for each image: images=[None] * "
                        f"{count}" if self.predicts_without_image else "")
                raise ValueError(f"the model has an image branch: give images (PIL images or file paths){hint}")
            missing = self._missing_images(images)
            transform = build_transform(cfg.image_encoder, cfg.image_size, False, crop=cfg.image_crop)
            draft = draft_size_for(cfg.image_encoder, cfg.image_size, crop=cfg.image_crop)
            blank = torch.zeros(3, cfg.image_size, cfg.image_size)
            inputs["image"] = torch.stack([
                blank if image is None else
                transform(to_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image))
                          if isinstance(image, np.ndarray) else
                          to_rgb(image) if isinstance(image, Image.Image) else load_image(image, draft))
                for image in images]) if count else torch.empty(0, 3, cfg.image_size, cfg.image_size)
            if missing:
                inputs["image_ok"] = torch.tensor([image is not None for image in images])
        if self.caption_encoder is not None:
            if self.tokenizer is None:
                raise ValueError("the model has a caption branch but no tokenizer: load it with from_pretrained, or "
                                 "set model.tokenizer")
            inputs["caption_ids"], inputs["caption_lengths"] = encode_captions(
                self.tokenizer, [""] * count if captions is None else list(captions), cfg.max_caption_length)
        return inputs

    def _missing_images(self, images: Sequence[Any]) -> list[int]:
        """The positions of ``images`` given as ``None``; refused without a caption branch to predict them from."""
        missing = [i for i, image in enumerate(images) if image is None]
        if missing and self.image_encoder is not None and not self.predicts_without_image:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ValueError(f"images {missing[:10]}{more} are None, and this model has no caption branch to predict "
                             "them from")
        return missing

    def predict_probabilities(self, images: Optional[Sequence[Any]] = None, captions: Optional[Sequence[Any]] = None,
                              *, batch_size: int = 32) -> np.ndarray:
        """Final probabilities [N, C] (float32, columns in ``codec.label_ids`` order) for raw images and captions
        (see `preprocess`), in batches, in evaluation mode (the model's mode is restored after), on the model's
        device and in its floating-point type. The same probabilities `predict.py` writes."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        images, captions = _as_lists(images, captions)
        count = _count_inputs(images, captions)  # checked whole, before the batches
        if images is not None:
            _check_images(images)
            self._missing_images(images)
        weight = next(p for p in self.parameters() if p.is_floating_point())
        was_training = self.training
        self.eval()
        parts = []
        try:
            for start in range(0, max(count, 1), batch_size):
                end = min(count, start + batch_size)
                inputs = self.preprocess(None if images is None else images[start:end],
                                         None if captions is None else captions[start:end])
                inputs = {k: v.to(weight.device, dtype=weight.dtype if v.is_floating_point() else v.dtype)
                          for k, v in inputs.items()}
                with torch.inference_mode():
                    parts.append(self.predict_proba(**inputs).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(parts).numpy()

    def predict(self, images: Optional[Sequence[Any]] = None, captions: Optional[Sequence[Any]] = None, *,
                thresholds: Optional[float | Sequence[float]] = None, batch_size: int = 32) -> list[tuple[int, ...]]:
        """The label set of each image and caption: original label ids, as `predict.py` writes them.

        Labels whose probability (`predict_probabilities`) reaches ``thresholds`` (default: the ones the model
        stores, else 0.5); an input where none does gets its most probable label.

        Example::

            model = MultimodalClassifier.from_pretrained("runs/latest/model")
            model.predict(["photo.jpg"], ["A man riding a horse on a beach."])  # [(1, 19)]
        """
        if self.codec is None:
            raise ValueError("the model has no label codec (exported without one): use predict_probabilities")
        from .metrics import binarize, check_thresholds

        thresholds = self.thresholds if thresholds is None else check_thresholds(thresholds, self.config.num_labels)
        probs = self.predict_probabilities(images, captions, batch_size=batch_size)
        chosen = binarize(probs, 0.5 if thresholds is None else thresholds, at_least_one=True)
        return [tuple(self.codec.label_ids[i] for i in np.flatnonzero(row)) for row in chosen]

    def save_pretrained(self, directory: str | os.PathLike, codec: Any, tokenizer: Any = None,
                        thresholds: Any = None) -> Path:
        """Exports the model for prediction: ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

        Each file is written under a temporary name and renamed; ``config.json`` is written last, so a folder with a
        ``config.json`` is complete. No pickle: weights are safetensors, everything else JSON.

        Args:
            codec: the `LabelCodec` (anything with ``to_dict()``), or ``None``.
            tokenizer: the caption tokenizer (``tokenizers.Tokenizer``), or ``None`` (no caption branch).
            thresholds: decision thresholds, a scalar or [C].
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        C = self.config.num_labels
        if codec is not None and getattr(codec, "num_labels", C) != C:
            raise ValueError(f"the codec has {codec.num_labels} labels but the model {C}")
        if tokenizer is None and self.caption_encoder is not None:
            raise ValueError("the model has a caption branch: pass its tokenizer, without which the export cannot "
                             "be loaded")
        if thresholds is not None:
            from .metrics import check_thresholds
            values = check_thresholds(thresholds, C).reshape(-1)
            thresholds = [float(v) for v in (np.full(C, values[0]) if values.size == 1 else values)]

        # Over an earlier export: its config.json goes first, so that a kill part way leaves a folder that reads as
        # incomplete, never new weights beside the old config and thresholds.
        if (directory / CONFIG_NAME).exists():
            (directory / CONFIG_NAME).unlink()
            fsync(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with published(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})

        tokenizer_path = directory / TOKENIZER_NAME
        if tokenizer is not None:
            with published(tokenizer_path) as tmp:
                tokenizer.save(str(tmp))
        elif tokenizer_path.exists():  # a stale tokenizer from an earlier export would be paired with this model
            tokenizer_path.unlink()

        save_json({"model": self.config.to_dict(), "codec": None if codec is None else codec.to_dict(),
                   "thresholds": thresholds, "format_version": FORMAT_VERSION}, directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
                        ) -> "MultimodalClassifier":
        """Rebuilds a model saved by `save_pretrained` from the folder alone, in eval mode, with ``codec``,
        ``tokenizer`` and ``thresholds`` set."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        weights_path = directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"model folder {directory} does not exist")
        for path in (config_path, weights_path):
            if not path.is_file():
                hint = (f"; {directory / 'model'} is the model a training run exports"
                        if (directory / "model" / CONFIG_NAME).is_file() else "")
                raise FileNotFoundError(f"model folder {directory} has no {path.name} (expected {path}){hint}")
        try:
            data = json.loads(config_path.read_text())
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version {version!r}, this code reads {FORMAT_VERSION}")
            config = ModelConfig.from_dict(data["model"])
            codec = None
            if data.get("codec") is not None:
                from .labels import LabelCodec
                codec = LabelCodec.from_dict(data["codec"])
            thresholds = data.get("thresholds")
            if thresholds is not None and (not isinstance(thresholds, list) or len(thresholds) != config.num_labels
                                           or not all(isinstance(t, (int, float)) for t in thresholds)):
                raise ValueError(f"thresholds must be a list of {config.num_labels} numbers, one per class")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelFolderError(f"{config_path}: not a valid model config: {err}") from err

        model = cls(config, pretrained=False)
        try:
            state = load_file(str(weights_path), device="cpu")
        except Exception as err:  # safetensors' own error type: a truncated or foreign file
            raise ModelFolderError(f"{weights_path}: not a readable safetensors file: {err}") from err
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelFolderError(f"{weights_path} does not match the model in {config_path}: "
                                   f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                   f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ModelFolderError(f"{weights_path}: tensor {name!r} has shape {tuple(tensor.shape)} but the "
                                       f"model in {config_path} expects {tuple(expected[name].shape)}")
        model.load_state_dict(state)

        model.codec = codec
        tokenizer_path = directory / TOKENIZER_NAME
        if tokenizer_path.is_file():
            from tokenizers import Tokenizer
            try:
                model.tokenizer = Tokenizer.from_file(str(tokenizer_path))
            except Exception as err:  # the tokenizers library raises a bare Exception
                raise ModelFolderError(f"{tokenizer_path}: not a readable tokenizer: {err}") from err
        elif config.use_caption:
            raise ModelFolderError(f"model folder {directory} has no {TOKENIZER_NAME}, which its caption branch "
                                   f"needs (expected {tokenizer_path})")
        model.thresholds = thresholds
        return model.to(device).eval()
