"""Compatibility sweep: HuggingFace transformers' Flax models (and two equinox models) through
search space and surgery.

    python -m benchmarks.compat                    # every model, a markdown table
    python -m benchmarks.compat bert vit           # some of them
    python -m benchmarks.compat --list             # the model names
    python -m benchmarks.compat --json rows.json   # the rows (and every zero set) as JSON

Needs the ``compat`` extra (``pip install -e ".[compat]"``: transformers 4.57, the last
release with Flax models; it does not pull PyTorch). Every model is a small, randomly
initialised configuration (hidden size 16, two layers, no weight download; the sweep sets
``HF_HUB_OFFLINE=1``), called the way a user calls it: a plain function of the model's own
``params`` tree, ``lambda params, *inputs: model(*inputs, params=params, train=False)``; an
equinox model as ``eqx.partition``'s arrays, recombined and vmapped inside the function.

For each model the sweep generates the search space at batch ``--batch`` (default 2) and tries
these zero sets: every single group that is valid, a random valid set of about half the groups
and the maximal valid set found greedily (groups in index order). For each it constructs the
sub-network and compares ``sub.apply(sub.variables, inputs)`` with the zeroed full network at
batch ``--other-batch`` (default 3, a batch size the space was not traced at):
``relative_difference`` at most 1e-5 is exact. It also redraws each input the full network
reads and lists those the zeroed network no longer reads ("inputs kept": a valid removal keeps
every input-output dependence). A model whose search space is empty gets the
reason, read from the segment graph (weight sharing, every branch ending in a multiplication,
...). Every failure is caught per zero set and per model and reported as its exception class and
first line; the sweep never stops at one model.

Shims (where transformers 4.57.6 and jax 0.10.2 / flax 0.12.8 disagree) are listed in
``SHIMS`` and applied by :func:`apply_shims` before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import random
import sys
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import asgssd_jax as ag  # noqa: E402

EXACT = 1e-5  # relative_difference at most this is exact (float32)
SEQ = 8  # tokens per text example
IMAGE = 16  # image side for the patch-based vision transformers
TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


# --------------------------------------------------------------------------------------------
# Shims.

SHIMS: dict[str, str] = {
    "jnp.clip(a_min=, a_max=)": (
        "T5 and LongT5 bucket relative positions with jnp.clip(x, a_max=...); jax 0.10 "
        "removed the a_min/a_max keywords (now min/max). Their modules get a jax.numpy whose "
        "clip also takes the old names."),
}


class _NumpyWithOldClip(types.ModuleType):
    """``jax.numpy`` whose ``clip`` also accepts the ``a_min``/``a_max`` keywords."""

    def __init__(self) -> None:
        super().__init__("jax.numpy")

    def __getattr__(self, name: str) -> Any:
        return getattr(jnp, name)

    @staticmethod
    def clip(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002
        return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)


def apply_shims() -> None:
    """Makes transformers 4.57.6's Flax code run on jax 0.10 / flax 0.12 (see ``SHIMS``)."""
    import importlib

    for mod in ("transformers.models.t5.modeling_flax_t5",
                "transformers.models.longt5.modeling_flax_longt5"):
        importlib.import_module(mod).jnp = _NumpyWithOldClip()


# --------------------------------------------------------------------------------------------
# The models.


@dataclasses.dataclass
class Case:
    """One model as a user holds it: ``apply_fn(variables, *inputs(batch, seed))`` is its
    output; another ``seed`` draws other values for every input."""

    model_class: str
    apply_fn: Callable[..., Any]
    variables: Any
    inputs: Callable[[int, int], tuple[Any, ...]]


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _ids(batch: int, seed: int, seq: int = SEQ, vocab: int = 64) -> jax.Array:
    rng = np.random.default_rng([seed, batch, seq])
    return jnp.asarray(rng.integers(3, vocab, size=(batch, seq)), jnp.int32)


def _mask(batch: int, seed: int, seq: int = SEQ) -> jax.Array:
    """Ones with the last ``2 + seed`` tokens of the last example padded."""
    m = np.ones((batch, seq), np.int32)
    m[-1, seq - 2 - seed % (seq - 2):] = 0
    return jnp.asarray(m)


def _normal(seed: int, *shape: int) -> jax.Array:
    rng = np.random.default_rng([seed, *shape])
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _text_classifier(cls_name: str, config_name: str, **config) -> Case:
    T = _transformers()
    cfg = getattr(T, config_name)(**config, num_labels=3)
    model = getattr(T, cls_name)(cfg, input_shape=(1, SEQ), seed=0)

    def apply_fn(params, input_ids, attention_mask):
        return model(input_ids, attention_mask, params=params, train=False).logits

    return Case(cls_name, apply_fn, model.params, lambda b, s: (_ids(b, s), _mask(b, s)))


def _image_classifier(cls_name: str, config_name: str, side: int, **config) -> Case:
    T = _transformers()
    cfg = getattr(T, config_name)(**config, num_labels=3)
    model = getattr(T, cls_name)(cfg, input_shape=(1, side, side, 3), seed=0)

    def apply_fn(params, pixel_values):
        return model(pixel_values, params=params, train=False).logits

    return Case(cls_name, apply_fn, model.params, lambda b, s: (_normal(s, b, 3, side, side),))


def _vit_config(**extra) -> dict:
    return dict(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=16,
                num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **extra)


def resnet() -> Case:
    return _image_classifier("FlaxResNetForImageClassification", "ResNetConfig", 32,
                             embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")


def regnet() -> Case:
    return _image_classifier("FlaxRegNetForImageClassification", "RegNetConfig", 32,
                             embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             groups_width=8, layer_type="y")


def vit() -> Case:
    return _image_classifier("FlaxViTForImageClassification", "ViTConfig", IMAGE,
                             **_vit_config())


def beit() -> Case:
    return _image_classifier("FlaxBeitForImageClassification", "BeitConfig", IMAGE,
                             **_vit_config(use_relative_position_bias=True))


def dinov2() -> Case:
    return _image_classifier("FlaxDinov2ForImageClassification", "Dinov2Config", IMAGE,
                             **_vit_config())


def _clip_config():
    T = _transformers()
    text = dict(TEXT, max_position_embeddings=SEQ)
    return T.CLIPConfig(text_config=text, vision_config=_vit_config(), projection_dim=8)


def clip_vision() -> Case:
    T = _transformers()
    cfg = _clip_config().vision_config
    model = T.FlaxCLIPVisionModel(cfg, input_shape=(1, IMAGE, IMAGE, 3), seed=0)

    def apply_fn(params, pixel_values):
        return model(pixel_values, params=params, train=False).pooler_output

    return Case("FlaxCLIPVisionModel", apply_fn, model.params,
                lambda b, s: (_normal(s, b, 3, IMAGE, IMAGE),))


def clip() -> Case:
    T = _transformers()
    model = T.FlaxCLIPModel(_clip_config(), seed=0)

    def apply_fn(params, input_ids, pixel_values, attention_mask):
        return model(input_ids, pixel_values, attention_mask, params=params,
                     train=False).logits_per_image

    return Case("FlaxCLIPModel", apply_fn, model.params,
                lambda b, s: (_ids(b, s), _normal(s, b, 3, IMAGE, IMAGE), _mask(b, s)))


def bert() -> Case:
    return _text_classifier("FlaxBertForSequenceClassification", "BertConfig", **TEXT)


def albert() -> Case:
    return _text_classifier("FlaxAlbertForSequenceClassification", "AlbertConfig",
                            embedding_size=8, **TEXT)


def distilbert() -> Case:
    return _text_classifier("FlaxDistilBertForSequenceClassification", "DistilBertConfig",
                            vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                            max_position_embeddings=32)


def _causal_lm(cls_name: str, cfg, inference: dict | None = None) -> Case:
    """``inference``: the keyword that selects inference mode (most take ``train=False``)."""
    T = _transformers()
    model = getattr(T, cls_name)(cfg, input_shape=(1, SEQ), seed=0)
    mode = {"train": False} if inference is None else inference

    def apply_fn(params, input_ids, attention_mask):
        return model(input_ids, attention_mask, params=params, **mode).logits

    return Case(cls_name, apply_fn, model.params, lambda b, s: (_ids(b, s), _mask(b, s)))


def gpt2() -> Case:
    T = _transformers()
    return _causal_lm("FlaxGPT2LMHeadModel",
                      T.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2,
                                   n_head=2, n_inner=32))


def llama() -> Case:
    T = _transformers()
    return _causal_lm("FlaxLlamaForCausalLM",
                      T.LlamaConfig(**TEXT, num_key_value_heads=1))


def _seq2seq(cls_name: str, cfg) -> Case:
    T = _transformers()
    model = getattr(T, cls_name)(cfg, input_shape=(1, SEQ), seed=0)

    def apply_fn(params, input_ids, attention_mask, decoder_input_ids):
        return model(input_ids, attention_mask, decoder_input_ids, params=params,
                     train=False).logits

    return Case(cls_name, apply_fn, model.params,
                lambda b, s: (_ids(b, s), _mask(b, s), _ids(b, s, seq=SEQ - 2)))


def t5() -> Case:
    T = _transformers()
    return _seq2seq("FlaxT5ForConditionalGeneration",
                    T.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                               num_decoder_layers=2, num_heads=2,
                               relative_attention_num_buckets=8, decoder_start_token_id=0))


def bart() -> Case:
    T = _transformers()
    return _seq2seq("FlaxBartForConditionalGeneration",
                    T.BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
                                 encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 max_position_embeddings=32))


def whisper() -> Case:
    T = _transformers()
    mels, frames = 8, 16
    cfg = T.WhisperConfig(vocab_size=64, num_mel_bins=mels, d_model=16, encoder_layers=2,
                          decoder_layers=2, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                          max_source_positions=frames // 2, max_target_positions=SEQ,
                          decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None)
    model = T.FlaxWhisperForConditionalGeneration(cfg, input_shape=(1, mels, frames), seed=0)

    def inputs(b, s):
        return _normal(s, b, mels, frames), _ids(b, s, seq=SEQ - 2)

    def apply_fn(params, input_features, decoder_input_ids):
        return model(input_features, decoder_input_ids=decoder_input_ids, params=params,
                     train=False).logits

    return Case("FlaxWhisperForConditionalGeneration", apply_fn, model.params, inputs)


def wav2vec2() -> Case:
    T = _transformers()
    samples = 64
    cfg = T.Wav2Vec2Config(vocab_size=12, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                           conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4,
                           num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                           feat_extract_norm="layer")  # the only variant transformers' Flax has
    model = T.FlaxWav2Vec2ForCTC(cfg, input_shape=(1, samples), seed=0)

    def inputs(b, s):
        return (_normal(s, b, samples),)

    def apply_fn(params, input_values):
        return model(input_values, params=params, train=False).logits

    return Case("FlaxWav2Vec2ForCTC", apply_fn, model.params, inputs)


# Beyond the list above: more of transformers' Flax families.


def roberta() -> Case:
    return _text_classifier("FlaxRobertaForSequenceClassification", "RobertaConfig", **TEXT)


def electra() -> Case:
    return _text_classifier("FlaxElectraForSequenceClassification", "ElectraConfig",
                            embedding_size=8, **TEXT)


def opt() -> Case:
    T = _transformers()
    return _causal_lm("FlaxOPTForCausalLM",
                      T.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                  ffn_dim=32, num_attention_heads=2, max_position_embeddings=32,
                                  word_embed_proj_dim=16),
                      inference={"deterministic": True})


def gpt_neo() -> Case:
    T = _transformers()
    return _causal_lm("FlaxGPTNeoForCausalLM",
                      T.GPTNeoConfig(vocab_size=64, max_position_embeddings=32, hidden_size=16,
                                     num_layers=2, attention_types=[[["global", "local"], 1]],
                                     num_heads=2, intermediate_size=32, window_size=4))


def mistral() -> Case:
    T = _transformers()
    return _causal_lm("FlaxMistralForCausalLM", T.MistralConfig(**TEXT, num_key_value_heads=1))


def gemma() -> Case:
    T = _transformers()
    return _causal_lm("FlaxGemmaForCausalLM",
                      T.GemmaConfig(**TEXT, num_key_value_heads=1, head_dim=8))


def bloom() -> Case:
    T = _transformers()
    return _causal_lm("FlaxBloomForCausalLM",
                      T.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2))


def _bart_like(config_name: str):
    T = _transformers()
    return getattr(T, config_name)(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32)


def mbart() -> Case:
    return _seq2seq("FlaxMBartForConditionalGeneration", _bart_like("MBartConfig"))


def pegasus() -> Case:
    return _seq2seq("FlaxPegasusForConditionalGeneration", _bart_like("PegasusConfig"))


def longt5() -> Case:
    T = _transformers()
    return _seq2seq("FlaxLongT5ForConditionalGeneration",
                    T.LongT5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                   num_decoder_layers=2, num_heads=2, local_radius=2,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   encoder_attention_type="local"))


def _equinox(model, name: str, inputs: Callable[[int, int], tuple]) -> Case:
    """An equinox model as its users run it: arrays split off with ``eqx.partition`` (the
    variables: the model's own pytree, ``None`` where a field is not an array), recombined
    inside the function, vmapped over the batch."""
    import equinox as eqx

    params, static = eqx.partition(model, eqx.is_array)

    def apply_fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return Case(name, apply_fn, params, inputs)


def eqx_mlp() -> Case:
    import equinox as eqx

    class ResidualMLP(eqx.Module):
        embed: eqx.nn.Linear
        blocks: list
        head: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.embed = eqx.nn.Linear(12, 16, key=k[0])
            self.blocks = [(eqx.nn.LayerNorm(16),
                            eqx.nn.MLP(16, 16, 32, depth=1, activation=jax.nn.gelu, key=kk))
                           for kk in k[1:3]]
            self.head = eqx.nn.Linear(16, 3, key=k[3])

        def __call__(self, x):
            h = self.embed(x)
            for norm, mlp in self.blocks:
                h = h + mlp(norm(h))
            return self.head(h)

    return _equinox(ResidualMLP(jax.random.key(0)), "equinox: residual MLP (eqx.nn.MLP)",
                    lambda b, s: (_normal(s, b, 12),))


def eqx_cnn() -> Case:
    import equinox as eqx

    class ResidualCNN(eqx.Module):
        stem: eqx.nn.Conv2d
        blocks: tuple
        head: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 6)
            self.stem = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0])
            self.blocks = tuple((eqx.nn.Conv2d(8, 8, 3, padding=1, key=k[1 + 2 * i]),
                                 eqx.nn.Conv2d(8, 8, 3, padding=1, key=k[2 + 2 * i]))
                                for i in range(2))
            self.head = eqx.nn.Linear(8, 3, key=k[5])

        def __call__(self, x):  # one example, channels first (equinox's convention)
            h = jax.nn.relu(self.stem(x))
            for c1, c2 in self.blocks:
                h = jax.nn.relu(h + c2(jax.nn.relu(c1(h))))
            return self.head(jnp.mean(h, axis=(1, 2)))

    return _equinox(ResidualCNN(jax.random.key(0)), "equinox: residual CNN (eqx.nn.Conv2d)",
                    lambda b, s: (_normal(s, b, 3, 8, 8),))


MODELS: dict[str, Callable[[], Case]] = {
    f.__name__: f
    for f in (resnet, regnet, vit, beit, dinov2, clip_vision, clip, bert, albert, distilbert,
              gpt2, llama, t5, bart, whisper, wav2vec2, roberta, electra, opt, gpt_neo,
              mistral, gemma, bloom, mbart, pegasus, longt5, eqx_mlp, eqx_cnn)
}


# --------------------------------------------------------------------------------------------
# Zero sets, exactness, and why a space is empty.


def greedy_valid_set(space: ag.SearchSpace) -> tuple[int, ...]:
    """A maximal valid zero set: groups in index order, each added while the set stays valid."""
    chosen: list[int] = []
    for g in range(space.num_groups):
        if space.is_valid(chosen + [g]):
            chosen.append(g)
    return tuple(chosen)


def zero_sets(space: ag.SearchSpace, seed: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """Every valid single group, a random valid set of about half, the greedy maximal set."""
    n = space.num_groups
    sets: list[tuple[str, tuple[int, ...]]] = [
        (f"g{i}", (i,)) for i in range(n) if space.is_valid([i])]
    order = list(range(n))
    random.Random(seed).shuffle(order)
    half: list[int] = []
    for g in order:
        if len(half) < max(1, n // 2) and space.is_valid(half + [g]):
            half.append(g)
    seen = {s for _, s in sets}
    for label, chosen in (("half", tuple(sorted(half))), ("max", greedy_valid_set(space))):
        if len(chosen) > 1 and chosen not in seen:
            sets.append((label, chosen))
            seen.add(chosen)
    return sets


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    first = first if len(first) <= 100 else first[:97] + "..."
    return f"{type(e).__name__}: {first}".rstrip(": ")


def _finite(tree: Any) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x, np.float64))))
               for x in jax.tree_util.tree_leaves(tree)
               if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))


def _same(a: Any, b: Any) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


@dataclasses.dataclass
class Probe:
    """A model's inputs for the checks: at the traced batch, at another batch, and the other
    batch with one input drawn again (for each input the full network's output reads)."""

    traced: tuple
    other: tuple
    redrawn: dict[str, tuple]  # input name -> ``other`` with that input drawn again

    @classmethod
    def of(cls, case: Case, batch: int, other_batch: int) -> Probe:
        traced, other = case.inputs(batch, 0), case.inputs(other_batch, 0)
        fresh = case.inputs(other_batch, 1)
        names = list(inspect.signature(case.apply_fn).parameters)[1:]
        full = case.apply_fn(case.variables, *other)
        redrawn = {}
        for k, name in enumerate(names[: len(other)]):
            args = other[:k] + (fresh[k],) + other[k + 1:]
            if not _same(full, case.apply_fn(case.variables, *args)):
                redrawn[name] = args
        return cls(traced, other, redrawn)


def check_zero_set(space: ag.SearchSpace, case: Case, chosen: Sequence[int],
                   probe: Probe) -> dict:
    """Constructs the sub-network for the zero groups ``chosen`` and compares it with the
    zeroed full network at the traced and at another batch size; lists the inputs the zeroed
    network no longer reads (a removal that is_valid should have refused)."""
    result: dict[str, Any] = {"groups": list(chosen)}
    stage = "zero_groups"
    try:
        zeroed = space.zero_groups(case.variables, chosen)
        ref_other = case.apply_fn(zeroed, *probe.other)
        result["rel_zeroing"] = ag.relative_difference(
            case.apply_fn(case.variables, *probe.other), ref_other)
        result["inputs_dropped"] = [name for name, args in probe.redrawn.items()
                                    if _same(ref_other, case.apply_fn(zeroed, *args))]
        stage = "construct_subnetwork"
        sub = ag.construct_subnetwork(space, zeroed)
        for key, args in (("rel_traced", probe.traced), ("rel_other", probe.other)):
            stage = "zeroed full network"
            ref = case.apply_fn(zeroed, *args)
            if not _finite(ref):
                result["failure"] = "zeroed full network is not finite (NaN/Inf)"
                return result
            stage = f"sub.apply at {'the traced' if key == 'rel_traced' else 'another'} batch"
            got = sub.apply(sub.variables, *args)
            if not _finite(got):  # relative_difference alone would not see a NaN
                result["failure"] = f"{stage}: sub-network output is not finite (NaN/Inf)"
                return result
            result[key] = ag.relative_difference(ref, got)
        result["params_left"] = ag.count_params(sub.variables)
    except Exception as e:  # noqa: BLE001  (the sweep reports, never stops)
        result["failure"] = f"{stage}: {_first_line(e)}"
        result["traceback"] = traceback.format_exc(limit=-6)
    return result


def why_empty(space: ag.SearchSpace) -> str:
    """Why no segment qualifies as a removal structure, read from the segment graph."""
    try:
        sg, t = space.segment_graph, space.trace
        users = Counter(i for seg in sg.segments for i in seg.leaves)
        reasons: Counter[str] = Counter()
        for seg in sg.segments:
            trainable = [i for i in seg.leaves if t.trainable[i]]
            if seg.kind != "op" or not trainable:
                continue
            if any(users[i] > 1 for i in trainable):
                reasons["weight shared with another segment"] += 1
                continue
            succs = list(t.graph.successors(seg.vertices[-1]))
            bad = [w for w in succs if not t.is_tolerant_joint(w)]
            if not succs or not bad:
                reasons["other (concat channels not traceable, control flow, ...)"] += 1
                continue
            for w in bad:
                v = t.vertices[w]
                what = "the output" if v.kind == "output" else (
                    v.primitives[0] if v.primitives else v.label)
                reasons[f"ends in {what}"] += 1
        if not reasons:
            return "no segment owns trainable variables"
        listed = ", ".join(f"{k} x{n}" for k, n in reasons.most_common(4))
        return f"candidate segments: {listed}"
    except Exception as e:  # noqa: BLE001
        return f"(no diagnosis: {_first_line(e)})"


def _by_kind(sets: list[dict], kind: Callable[[dict], list[str]]) -> str:
    """'kind (sets g0, max)' for each kind of problem, the two most frequent first."""
    labels: dict[str, list[str]] = {}
    for r in sets:
        for k in kind(r):
            labels.setdefault(k, []).append(r["label"])
    return "; ".join(
        f"{k} ({'all sets' if len(ls) == len(sets) else 'sets ' + ', '.join(ls)})"
        for k, ls in sorted(labels.items(), key=lambda kv: -len(kv[1]))[:2])


def sweep_one(name: str, batch: int, other_batch: int, seed: int) -> dict:
    """One table row for the model ``name``; never raises."""
    row: dict[str, Any] = {"model": name, "class": "", "params": None, "groups": None,
                           "gen_s": None, "sets": [], "status": "", "note": ""}
    stage = "build"
    try:
        case = MODELS[name]()
        row["class"] = case.model_class
        row["params"] = ag.count_params(case.variables)
        stage = "full network"
        probe = Probe.of(case, batch, other_batch)
        row["inputs_read"] = list(probe.redrawn)
        stage = "generate_search_space"
        t0 = time.perf_counter()
        space = ag.generate_search_space(case.apply_fn, case.variables, *probe.traced)
        row["gen_s"] = time.perf_counter() - t0
        row["groups"] = space.num_groups
        row["group_params"] = sum(g.num_params for g in space.groups)
        excluded = getattr(space, "excluded", ())  # candidates failing zero-invariance
        row["excluded"] = [{"params": list(ex.param_paths), "reason": ex.reason}
                           for ex in excluded]
    except Exception as e:  # noqa: BLE001
        row["status"] = "error"
        row["note"] = f"{stage}: {_first_line(e)}"
        row["traceback"] = traceback.format_exc(limit=-6)
        return row
    if space.num_groups == 0:
        row["status"] = "no groups"
        row["note"] = "; ".join(x for x in (why_empty(space), _excluded_note(row)) if x)
        return row
    for label, chosen in zero_sets(space, seed):
        r = check_zero_set(space, case, chosen, probe)
        r["label"] = label
        row["sets"].append(r)
    sets = row["sets"]
    row["worst_rel"] = max((r["rel_other"] for r in sets if "rel_other" in r), default=None)
    failed = [r for r in sets if "failure" in r]
    inexact = [r for r in sets if "failure" not in r and not r["rel_other"] <= EXACT]
    dropped = _by_kind(sets, lambda r: [f"output stops reading {n}"
                                        for n in r.get("inputs_dropped", [])])
    row["valid"] = not dropped
    if not sets:
        row["status"] = "no valid set"
        row["note"] = "no single group can be removed with the network staying valid"
    elif failed:
        row["status"] = "error"
        row["note"] = _by_kind(failed, lambda r: [r["failure"]])
    elif inexact:
        row["status"] = "not exact"
        at_traced = max(r["rel_traced"] for r in inexact)
        row["note"] = (f"{len(inexact)}/{len(sets)} sets inexact at batch {other_batch}; "
                       f"at the traced batch {batch}: rel {at_traced:.1e}")
    else:
        row["status"] = "exact"
    row["note"] = "; ".join(x for x in (row["note"], dropped, _excluded_note(row)) if x)
    return row


def _excluded_note(row: dict) -> str:
    if not row.get("excluded"):
        return ""
    reasons = Counter(ex["reason"] for ex in row["excluded"])
    return "excluded: " + ", ".join(f"{n} x {k}" for k, n in reasons.most_common())


def markdown(rows: list[dict], batch: int, other_batch: int) -> str:
    head = ("| model | class | params | \\|G_s\\| | params in G_s | generation (s) | "
            f"zero sets | exact at batch {other_batch} | worst rel. | inputs kept | note |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        n_sets = len(r["sets"])
        ok = sum(1 for s in r["sets"] if s.get("rel_other", np.inf) <= EXACT)
        exact = {"exact": "yes", "not exact": "**no**", "error": "**error**",
                 "no groups": "n/a", "no valid set": "n/a"}[r["status"]]
        if n_sets:
            exact += f" ({ok}/{n_sets})"
        worst = r.get("worst_rel")
        cells = [r["model"], r["class"] or "-",
                 f"{r['params']:,}" if r["params"] is not None else "-",
                 "-" if r["groups"] is None else str(r["groups"]),
                 f"{r['group_params']:,}" if r.get("group_params") else "-",
                 "-" if r["gen_s"] is None else f"{r['gen_s']:.2f}",
                 str(n_sets), exact, "-" if worst is None else f"{worst:.1e}",
                 {True: "yes", False: "**no**", None: "-"}[r.get("valid")],
                 r["note"].replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("transformers", "equinox", "jax", "flax", "asgssd-jax"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help=f"model names (default all): {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=2, help="batch size the space is traced at")
    p.add_argument("--other-batch", type=int, default=3,
                   help="batch size the sub-network is checked at")
    p.add_argument("--seed", type=int, default=0, help="seed of the random half zero set")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--list", action="store_true", help="print the model names and exit")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(MODELS))
        return 0
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from: {', '.join(MODELS)}")
    if a.batch == a.other_batch:
        p.error("--other-batch must differ from --batch (exactness at another batch size)")
    apply_shims()
    rows = []
    for name in a.models or list(MODELS):
        row = sweep_one(name, a.batch, a.other_batch, a.seed)
        print(f"{name}: {row['status']} {row['note']}", file=sys.stderr, flush=True)
        rows.append(row)
    print(f"Traced at batch {a.batch}, checked at batch {a.other_batch}; {versions()}.\n")
    print(markdown(rows, a.batch, a.other_batch))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"batch": a.batch, "other_batch": a.other_batch, "rows": rows}, f,
                      indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
