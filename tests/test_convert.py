"""Released-weight loading: HF MaskFormer directories and official detectron2 .pkl files give the same logits
as transformers' MaskFormerForInstanceSegmentation with the same weights; loading is strict; .pkl reading is
restricted to arrays and plain containers."""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from maskformer_cli.config import ModelConfig, Recipe, from_dict, to_dict
from maskformer_cli.errors import UserError
from maskformer_cli.models import build_model
from maskformer_cli.models.convert import load_checkpoint_weights
from maskformer_cli.models.convert_official import official_to_maskformer
from maskformer_cli.models.infer_config import infer_model_config
from maskformer_cli.models.pickle_safe import load_pickle_restricted
from maskformer_cli.models.strict_load import load_into

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    MaskFormerConfig,
    MaskFormerDetrConfig,
    MaskFormerForInstanceSegmentation,
    ResNetConfig,
)
from transformers.models.maskformer.configuration_maskformer_swin import MaskFormerSwinConfig  # noqa: E402

CLASSES = ["road", "sky", "tree", "car", "person", "wall", "grass"]
SIZES = [(64, 64), (64, 96)]


# ------------------------------------------------------------------------------------------ HF fixtures


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """All weights and statistics random and O(1)-scaled, so that every mapped tensor matters (HF's own
    init zeroes the Swin bias tables and shrinks BatchNorm weights to ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("num_batches_tracked", "relative_position_index", "empty_weight")):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif "relative_position_bias_table" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.ndim == 1 and name.endswith("weight"):  # a norm's scale
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)


def _hf_model(backbone: str) -> MaskFormerForInstanceSegmentation:
    if backbone == "resnet50":
        bb = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])  # ResNet-50 by default
    else:  # full-size Swin-T: our backbone registry holds the paper's variants only
        bb = MaskFormerSwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0)
    dec = MaskFormerDetrConfig(decoder_layers=3, num_queries=10, d_model=64, decoder_ffn_dim=128,
                               decoder_attention_heads=4, use_timm_backbone=False)
    cfg = MaskFormerConfig(backbone_config=bb, decoder_config=dec, fpn_feature_size=64, mask_feature_size=64,
                           num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                           label2id={c: i for i, c in enumerate(CLASSES)})
    model = MaskFormerForInstanceSegmentation(cfg).eval()
    _randomize(model, seed=1 if backbone == "resnet50" else 2)
    return model


@pytest.fixture(scope="module", params=["resnet50", "swin_tiny"])
def hf(request, tmp_path_factory):
    """(HF model, its save_pretrained dir with model.safetensors, a dir with pytorch_model.bin)."""
    model = _hf_model(request.param)
    st_dir = tmp_path_factory.mktemp(f"hf-{request.param}-st")
    model.save_pretrained(st_dir)
    assert (st_dir / "model.safetensors").is_file()
    bin_dir = tmp_path_factory.mktemp(f"hf-{request.param}-bin")
    shutil.copy(st_dir / "config.json", bin_dir / "config.json")
    # The in-memory names (q_proj/o_proj, mlp.fc1) differ from what save_pretrained writes (out_proj, fc1):
    # the .bin covers the other naming.
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    g = torch.Generator().manual_seed(5)
    refs = {}
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w, generator=g)
        refs[(h, w)] = (x, *_hf_outputs(model, x))
    return request.param, model, st_dir, bin_dir, refs


def _hf_outputs(model, x):
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        # Reference for the deep-supervision outputs, built from HF's own modules: the official decoder
        # normalises every layer's output with the shared final LayerNorm before the heads. (HF's own
        # auxiliary_logits differ: they skip that norm and include the all-zero decoder input.)
        hs = out.transformer_decoder_hidden_states[1:-1]
        norm = model.model.transformer_module.decoder.layernorm
        aux = [(model.class_predictor(norm(h)),
                torch.einsum("bqc,bchw->bqhw", model.mask_embedder(norm(h)), out.pixel_decoder_last_hidden_state))
               for h in hs]
    return out.class_queries_logits, out.masks_queries_logits, aux


def _ours_from(path):
    state, meta = load_checkpoint_weights(path)
    model = build_model(from_dict(ModelConfig, meta["model"]), meta["num_classes"])  # as weights.py does
    load_into(model, state)
    return model.eval(), meta


def _assert_same(ours, refs, sizes=SIZES, aux=True):
    """Our logits, masks (and deep-supervision outputs) equal the HF reference outputs `refs`."""
    for size in sizes:
        x, ref_logits, ref_masks, ref_aux = refs[size]
        with torch.no_grad():
            out = ours(x)
        torch.testing.assert_close(out.pred_logits, ref_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.pred_masks, ref_masks, atol=1e-4, rtol=1e-4)
        if aux:
            assert len(out.aux_outputs) == len(ref_aux) == 2
            for o, (rl, rm) in zip(out.aux_outputs, ref_aux, strict=True):
                torch.testing.assert_close(o.pred_logits, rl, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(o.pred_masks, rm, atol=1e-4, rtol=1e-4)


def test_hf_directory_safetensors_and_bin(hf):
    name, _, st_dir, bin_dir, refs = hf
    ours, meta = _ours_from(st_dir)
    assert meta["format"] == "hf"
    assert meta["classes"] == CLASSES and meta["num_classes"] == 7
    m = meta["model"]
    assert (m["backbone"], m["num_queries"], m["dec_layers"], m["hidden_dim"], m["nheads"]) == (name, 10, 3, 64, 4)
    assert (m["conv_dim"], m["mask_dim"], m["dim_feedforward"], m["pixel_decoder"]) == (64, 64, 128, "fpn")
    _assert_same(ours, refs)
    # pytorch_model.bin with the in-memory HF names converts to the very same tensors.
    state_st, _ = load_checkpoint_weights(st_dir)
    state_bin, meta_bin = load_checkpoint_weights(bin_dir)
    assert meta_bin == meta and state_bin.keys() == state_st.keys()
    assert all(torch.equal(state_bin[k], state_st[k]) for k in state_st)


def test_hf_config_must_agree_with_weights(hf, tmp_path):
    name, _, st_dir, _, _ = hf
    for key, value, message in [("num_queries", 12, "num_queries=12 but the weights have 10"),
                                ("activation_function", "gelu", "activation_function='gelu' is not supported")]:
        bad = tmp_path / f"{key}-{name}"
        bad.mkdir()
        (bad / "model.safetensors").symlink_to(st_dir / "model.safetensors")
        shutil.copy(st_dir / "config.json", bad / "config.json")
        cfg = json.loads((bad / "config.json").read_text())
        cfg["decoder_config"][key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError, match=re.escape(message)):
            load_checkpoint_weights(bad)


# ------------------------------------------------------------------------------- official .pkl fixtures


def _official_from_hf(sd: dict) -> dict:
    """HF MaskFormer names -> the official detectron2 names (new head layout), written from the official
    key listing, independently of convert.py. Adds the buffers real files carry."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)

    def put(k, v):
        out[k] = v.detach().numpy().copy()

    for k, v in sd.items():
        if k.endswith(("num_batches_tracked", "relative_position_index")) or k.startswith("criterion."):
            continue
        k2 = k.replace("model.pixel_level_module.encoder.", "backbone.")
        if k2.startswith("backbone.model.layernorm."):
            continue
        if m := re.fullmatch(r"backbone\.embedder\.embedder\.(convolution|normalization)\.(\w+)", k2):
            put("backbone.stem.conv1." + ("" if m[1] == "convolution" else "norm.") + m[2], v)
        elif m := re.fullmatch(r"backbone\.encoder\.stages\.(\d)\.layers\.(\d+)\.(shortcut|layer\.\d)\.(convolution|normalization)\.(\w+)", k2):
            conv = "shortcut" if m[3] == "shortcut" else "conv" + str(int(m[3][-1]) + 1)
            put(f"backbone.res{int(m[1]) + 2}.{m[2]}.{conv}." + ("" if m[4] == "convolution" else "norm.") + m[5], v)
        elif m := re.fullmatch(r"backbone\.model\.embeddings\.patch_embeddings\.projection\.(\w+)", k2):
            put(f"backbone.patch_embed.proj.{m[1]}", v)
        elif m := re.fullmatch(r"backbone\.model\.embeddings\.norm\.(\w+)", k2):
            put(f"backbone.patch_embed.norm.{m[1]}", v)
        elif m := re.fullmatch(r"backbone\.hidden_states_norms\.(\d)\.(\w+)", k2):
            put(f"backbone.norm{m[1]}.{m[2]}", v)
        elif m := re.fullmatch(r"backbone\.model\.encoder\.layers\.(\d)\.downsample\.(.+)", k2):
            put(f"backbone.layers.{m[1]}.downsample.{m[2]}", v)
        elif m := re.fullmatch(r"backbone\.model\.encoder\.layers\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)", k2):
            p = f"backbone.layers.{m[1]}.blocks.{m[2]}."
            sub, leaf = m[3], m[4]
            if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv[p + "attn.qkv." + leaf][sub.rsplit(".", 1)[1]] = v
            elif sub == "attention.self" and leaf == "relative_position_bias_table":
                put(p + "attn.relative_position_bias_table", v)
            else:
                names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                         "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
                put(p + names[sub] + "." + leaf, v)
        elif k2.startswith("model.pixel_level_module.decoder."):
            r = k2[len("model.pixel_level_module.decoder."):]
            pd = "sem_seg_head.pixel_decoder."
            r = r.replace("fpn.stem.0.", "layer_4.").replace("fpn.stem.1.", "layer_4.norm.")
            for t, i in ((0, 3), (1, 2), (2, 1)):
                r = r.replace(f"fpn.layers.{t}.proj.0.", f"adapter_{i}.").replace(f"fpn.layers.{t}.proj.1.", f"adapter_{i}.norm.")
                r = r.replace(f"fpn.layers.{t}.block.0.", f"layer_{i}.").replace(f"fpn.layers.{t}.block.1.", f"layer_{i}.norm.")
            put(pd + r.replace("mask_projection.", "mask_features."), v)
        elif m := re.fullmatch(r"model\.transformer_module\.decoder\.layers\.(\d+)\.(.+)\.(\w+)", k2):
            p = f"sem_seg_head.predictor.transformer.decoder.layers.{m[1]}."
            sub, leaf = m[2], m[3]
            if a := re.fullmatch(r"(self_attn|encoder_attn)\.([qkv])_proj", sub):
                qkv[p + ("self_attn" if a[1] == "self_attn" else "multihead_attn") + f".in_proj_{leaf}"][a[2]] = v
                continue
            sub = re.sub(r"^(self_attn|encoder_attn)\.(o_proj|out_proj)$",
                         lambda a: ("self_attn" if a[1] == "self_attn" else "multihead_attn") + ".out_proj", sub)
            names = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3",
                     "fc1": "linear1", "fc2": "linear2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
            put(p + names.get(sub, sub) + "." + leaf, v)
        elif k2.startswith("model.transformer_module.decoder.layernorm."):
            put("sem_seg_head.predictor.transformer.decoder.norm." + k2.rsplit(".", 1)[1], v)
        elif k2 == "model.transformer_module.queries_embedder.weight":
            put("sem_seg_head.predictor.query_embed.weight", v)
        elif k2.startswith("model.transformer_module.input_projection."):
            put("sem_seg_head.predictor.input_proj." + k2.rsplit(".", 1)[1], v)
        elif k2.startswith("class_predictor."):
            put("sem_seg_head.predictor.class_embed." + k2.rsplit(".", 1)[1], v)
        elif m := re.fullmatch(r"mask_embedder\.(\d)\.0\.(\w+)", k2):
            put(f"sem_seg_head.predictor.mask_embed.layers.{m[1]}.{m[2]}", v)
        else:
            raise AssertionError(f"test mapping misses {k}")
    for k, parts in qkv.items():
        order = ("query", "key", "value") if "query" in parts else ("q", "k", "v")
        out[k] = torch.cat([parts[p] for p in order]).detach().numpy().copy()
    # Buffers the released files carry: the loss's class weights and Swin's index tables.
    out["criterion.empty_weight"] = np.ones(len(CLASSES) + 1, dtype=np.float32)
    for k in [k for k in out if k.endswith("attn.relative_position_bias_table")]:
        out[k.replace("relative_position_bias_table", "relative_position_index")] = np.zeros((49, 49), np.int64)
    return out


def _write_pkl(path, model_dict, protocol=5):
    """(Protocol 2, as old files use, is exercised by the unpickler tests on small arrays: it is slow.)"""
    with open(path, "wb") as f:
        pickle.dump({"model": model_dict, "__author__": "test", "matching_heuristics": False}, f, protocol=protocol)
    return path


def test_official_pkl_both_head_layouts(hf, tmp_path):
    name, hf_model, _, _, refs = hf
    official = _official_from_hf(hf_model.state_dict())
    assert "sem_seg_head.pixel_decoder.layer_4.norm.weight" in official
    state, meta = load_checkpoint_weights(_write_pkl(tmp_path / "model_final.pkl", official))
    assert meta["format"] == "official" and meta["num_classes"] == 7
    assert meta["model"]["backbone"] == name and meta["model"]["num_queries"] == 10
    # The official models all use 8 heads (the inferred default); this HF model uses 4, which weights
    # cannot reveal.
    ours = build_model(ModelConfig(**{**meta["model"], "nheads": 4}), 7)
    load_into(ours, state)
    _assert_same(ours.eval(), refs, sizes=SIZES[1:])
    # Old layout: the pixel decoder's weights sat directly under sem_seg_head.
    old = {k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): v for k, v in official.items()}
    assert "sem_seg_head.layer_4.weight" in old and "sem_seg_head.adapter_1.norm.bias" in old
    state_old, meta_old = load_checkpoint_weights(_write_pkl(tmp_path / "old.pkl", old))
    assert meta_old["model"] == meta["model"] and state_old.keys() == state.keys()
    assert all(torch.equal(state_old[k], state[k]) for k in state)


def test_official_pkl_extra_or_missing_key_is_refused(tmp_path):
    cfg = ModelConfig(backbone="resnet50", conv_dim=32, mask_dim=32, hidden_dim=32, dim_feedforward=32,
                      dec_layers=1, num_queries=4)
    model = build_model(cfg, 7)
    official = _to_official(model.state_dict())

    def load(name, d):
        return load_checkpoint_weights(_write_pkl(tmp_path / name, d, protocol=5))[0]

    load_into(model, load("ok.pkl", official))
    extra = dict(official, **{"sem_seg_head.predictor.surprise.weight": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"1 unexpected key\(s\): sem_seg_head\.predictor\.surprise\.weight"):
        load_into(model, load("extra.pkl", extra))
    missing = {k: v for k, v in official.items() if k != "sem_seg_head.pixel_decoder.adapter_2.norm.weight"}
    with pytest.raises(UserError, match=r"1 missing key\(s\): pixel_decoder\.lateral_convs\.res3\.norm\.weight"):
        load_into(model, load("missing.pkl", missing))
    wrong = dict(official, **{"sem_seg_head.predictor.class_embed.bias": np.zeros(3, np.float32)})
    with pytest.raises(UserError, match=r"shape mismatch.*class_embed\.bias \(3,\) vs model \(8,\)"):
        load_into(model, load("wrong.pkl", wrong))


def test_load_into_lists_first_20_and_count():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(UserError) as e:
        load_into(model, {})
    msg = str(e.value)
    assert "30 missing key(s)" in msg and "0.weight" in msg and "and 10 more" in msg and "14.bias" not in msg


# ------------------------------------------------------------------------------- other official layouts


def _to_official(our_sd: dict) -> dict:
    """Our names -> official names, from the official listing (transformer-encoder pixel decoder of the
    "+6 Enc" COCO panoptic models, per-pixel baseline head)."""
    out = {}
    for k, v in our_sd.items():
        n = k
        n = re.sub(r"^pixel_decoder\.lateral_convs\.res(\d)\.", lambda m: f"sem_seg_head.pixel_decoder.adapter_{int(m[1]) - 1}.", n)
        n = re.sub(r"^pixel_decoder\.output_convs\.res(\d)\.", lambda m: f"sem_seg_head.pixel_decoder.layer_{int(m[1]) - 1}.", n)
        n = re.sub(r"^pixel_decoder\.(mask_features|input_proj)\.", r"sem_seg_head.pixel_decoder.\1.", n)
        if m := re.fullmatch(r"pixel_decoder\.encoder\.layers\.(\d+)\.(\w+)\.(.+)", n):
            sub = {"self_attn": "self_attn", "self_attn_norm": "norm1", "ffn_norm": "norm2"}.get(m[2], m[2])
            n = f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{m[1]}.{sub}.{m[3]}"
        if m := re.fullmatch(r"decoder\.layers\.(\d+)\.(\w+)\.(.+)", n):
            sub = {"cross_attn": "multihead_attn", "self_attn_norm": "norm1", "cross_attn_norm": "norm2",
                   "ffn_norm": "norm3"}.get(m[2], m[2])
            n = f"sem_seg_head.predictor.transformer.decoder.layers.{m[1]}.{sub}.{m[3]}"
        n = re.sub(r"^decoder\.norm\.", "sem_seg_head.predictor.transformer.decoder.norm.", n)
        n = re.sub(r"^query_pos\.", "sem_seg_head.predictor.query_embed.", n)
        n = re.sub(r"^(class_embed|mask_embed|input_proj)\.", r"sem_seg_head.predictor.\1.", n)
        n = re.sub(r"^classifier\.", "sem_seg_head.predictor.", n)
        out[n] = v.numpy().copy()
    return out


@pytest.mark.parametrize("arch", ["plus6enc", "per_pixel"])
def test_official_round_trip_other_heads(arch, tmp_path):
    if arch == "plus6enc":
        cfg = ModelConfig(backbone="resnet50", pixel_decoder="transformer_encoder_fpn", encoder_layers=2,
                          conv_dim=64, mask_dim=64, hidden_dim=64, dim_feedforward=96, dec_layers=2, num_queries=6)
    else:
        cfg = ModelConfig(backbone="resnet50", meta_architecture="per_pixel_baseline", conv_dim=64, mask_dim=32)
    src = build_model(cfg, 5).eval()
    _randomize(src, seed=4)
    official = _to_official(src.state_dict())
    if arch == "plus6enc":
        assert "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.norm2.weight" in official
    ours, meta = _ours_from(_write_pkl(tmp_path / "m.pkl", official))
    for key in ("backbone", "pixel_decoder", "meta_architecture", "conv_dim", "mask_dim"):
        assert meta["model"][key] == getattr(cfg, key), key
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = src(x), ours(x)
    if arch == "plus6enc":
        assert meta["model"]["encoder_layers"] == 2 and meta["model"]["dim_feedforward"] == 96
        assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_masks, b.pred_masks)
    else:
        assert torch.equal(a.sem_seg_logits, b.sem_seg_logits)


@pytest.mark.parametrize(
    "cfg",
    [dict(backbone="resnet101"), dict(backbone="resnet101c"), dict(backbone="swin_small"),
     dict(backbone="swin_base"), dict(backbone="swin_large", swin_window_size=7),
     dict(backbone="swin_tiny", enforce_input_project=True, pixel_decoder="transformer_encoder_fpn",
          encoder_layers=6, dec_layers=6, num_queries=100)],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_architecture_inferred_from_official_keys(cfg):
    with torch.device("meta"):  # shapes only
        model = build_model(ModelConfig(**cfg), 150)
    kwargs, k = infer_model_config(official_to_maskformer(_meta_official(model.state_dict())))
    assert k == 150
    for key, value in cfg.items():
        assert kwargs[key] == value, key


def _meta_official(sd):
    """Like _to_official, keeping meta tensors (no data)."""
    names = _to_official({k: torch.zeros(0) for k in sd})
    return dict(zip(names, sd.values(), strict=True))


# ------------------------------------------------------------------------------------------ our own .pt


def test_our_checkpoint_round_trip(tmp_path):
    cfg = ModelConfig(backbone="resnet50", hidden_dim=32, nheads=4, dim_feedforward=64, dec_layers=1,
                      num_queries=4, conv_dim=32, mask_dim=32)
    model = build_model(cfg, 3)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "recipe": to_dict(Recipe(model=cfg)), "classes": ["a", "b", "c"],
                "step": 7}, path)
    state, meta = load_checkpoint_weights(path)
    assert meta["format"] == "ours" and meta["classes"] == ["a", "b", "c"] and meta["step"] == 7
    assert ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}) == cfg
    assert state.keys() == model.state_dict().keys()


def test_unrecognised_files_are_user_errors(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="neither"):
        load_checkpoint_weights(tmp_path / "x.pt")
    _write_pkl(tmp_path / "R-50.pkl", {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
    with pytest.raises(UserError, match="backbone-only"):
        load_checkpoint_weights(tmp_path / "R-50.pkl")
    (tmp_path / "hfdir").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_checkpoint_weights(tmp_path / "hfdir")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint_weights(tmp_path / "nope.pkl")


# ---------------------------------------------------------------------------------- restricted unpickling


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "payload,global_name",
    [
        (lambda marker: _Evil(os.system, f"touch {marker}"), "system"),
        (lambda marker: _Evil(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
        (lambda marker: _Evil(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        (lambda marker: _Evil(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        (lambda marker: _Evil(__import__, "os"), "builtins.__import__"),
    ],
    ids=["os.system", "exec", "eval", "subprocess", "import"],
)
def test_restricted_unpickler_refuses_code(payload, global_name, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2, np.float32), "x": payload(marker)}}, f)
    with pytest.raises(UserError, match=re.escape(global_name)):
        load_pickle_restricted(path)
    with pytest.raises(UserError, match="refusing"):
        load_checkpoint_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_arrays_and_containers(protocol, tmp_path):
    obj = {"model": collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3),
                                            b=np.array([1, 2], dtype=np.int64), c=np.float32(1.5)),
           "__author__": "FAIR", "meta": [1, 2.0, (3, "x"), {4}, b"raw", True, None]}
    path = tmp_path / "ok.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    back = load_pickle_restricted(path)
    assert back["__author__"] == "FAIR" and back["meta"] == obj["meta"]
    for k, v in obj["model"].items():
        np.testing.assert_array_equal(back["model"][k], v)
        assert np.asarray(back["model"][k]).dtype == np.asarray(v).dtype



def test_weight_file_mistakes_are_explained(hf, tmp_path):
    """What users pass by mistake gets a message that says what to pass instead, never a torch traceback."""
    _, hf_model, st_dir, _, _ = hf
    # an interrupted download of model.safetensors
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(st_dir / "config.json", cut / "config.json")
    data = (st_dir / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="incomplete download"):
        load_checkpoint_weights(cut)
    with pytest.raises(UserError, match=re.escape(f"pass the Hugging Face directory {st_dir}")):
        load_checkpoint_weights(st_dir / "config.json")
    # a file that pickles code: torch's message would advise weights_only=False
    torch.save({"model": collections.OrderedDict(), "x": _Evil(print, "hi")}, tmp_path / "code.pt")
    with pytest.raises(UserError, match="weights_only=True, so that loading a file cannot run code"):
        load_checkpoint_weights(tmp_path / "code.pt")
    # a training run directory
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="run directory: pass one of its checkpoints"):
        load_checkpoint_weights(tmp_path / "run")
    # Mask2Former, as a HF directory and as detectron2 weights
    m2f = tmp_path / "m2f"
    m2f.mkdir()
    (m2f / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    with pytest.raises(UserError, match="Mask2Former weights"):
        load_checkpoint_weights(m2f)
    official = _official_from_hf(hf_model.state_dict())
    official["sem_seg_head.predictor.transformer_cross_attention_layers.0.norm.weight"] = np.ones(4, np.float32)
    with pytest.raises(UserError, match="Mask2Former weights"):
        load_checkpoint_weights(_write_pkl(tmp_path / "m2f.pkl", official))


def test_detectron2_weights_load_whatever_the_suffix(hf, tmp_path):
    """The format is read from the content: a detectron2 checkpoint saved as .pt loads like the .pth."""
    _, hf_model, _, _, _ = hf
    official = {k: torch.from_numpy(v) for k, v in _official_from_hf(hf_model.state_dict()).items()}
    torch.save({"model": official}, tmp_path / "model_final.pt")
    state, meta = load_checkpoint_weights(tmp_path / "model_final.pt")
    assert meta["format"] == "official" and meta["num_classes"] == 7
    from maskformer_cli.weights import load_for_inference

    loaded = load_for_inference(tmp_path / "model_final.pt", torch.device("cpu"))
    assert len(loaded.classes) == 7 and loaded.recipe.data.test_short_side is None
    with pytest.raises(UserError, match="predicts 7 classes but dataset 'ade20k' has 150"):
        load_for_inference(tmp_path / "model_final.pt", torch.device("cpu"), dataset="ade20k")
