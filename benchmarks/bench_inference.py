"""Inference, ours vs transformers' MaskFormerForInstanceSegmentation on the same weights, same run.

A transformers model (random init, 150 classes: R50 or Swin-T configuration) is saved with
`save_pretrained` and loaded by us from that directory, as `--weights DIR` does. One image of --size,
batch 1; the two implementations run alternately, round by round; medians over --rounds.

Mode `image` (default) reports, for fp32 and bf16:
  forward            the network on a normalised image
  post-processing    outputs -> label map (ours: exact, full resolution; transformers: its
                     post_process_semantic_segmentation, which combines queries at 384x384 and resizes)
  image -> labels    both together, what a user waits for
and the ratio transformers / ours; for bf16 also the pixel agreement of our bf16 labels with our fp32
ones (on a random model, whose maps are near-constant, this says little: see the README for a trained one).

Mode `agreement --checkpoint CKPT`: pixel agreement of our bf16 labels with our fp32 labels on a trained
model over its validation split (--images of them), and the time of each.

Mode `backends`: image -> label map through the exported model (`maskformer export`: ONNX Runtime fp32,
OpenVINO fp32 and bf16 inference precision) against our torch path (fp32, bf16) and transformers fp32, all
alternated in one process; the backends' logits go through the same post-processor as `predict --backend`.
Ratios are transformers fp32 / each; pixel agreement is with our torch fp32 labels.

Mode `predict`: `maskformer predict` over a folder of --images JPEGs (512x683) against a plain transformers
loop doing the same work (read, infer, write the label PNG).

    python benchmarks/bench_inference.py [--backbone r50|swin_tiny] [--size 512] [--rounds 5]
                                         [--device cpu|cuda] [--mode image|backends|predict|agreement]
                                         [--images 16] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_common import alternate, sync

K = 150


def hf_model(backbone: str):
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig, SwinConfig

    if backbone == "r50":
        bb = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
    else:
        bb = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                        out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    cfg = MaskFormerConfig(backbone_config=bb, num_labels=K, id2label={i: str(i) for i in range(K)},
                           label2id={str(i): i for i in range(K)})
    return MaskFormerForInstanceSegmentation(cfg).eval()


def load_both(backbone: str, device: torch.device, tmp: str):
    from maskformer_cli.weights import load_for_inference

    hf = hf_model(backbone)
    hf.save_pretrained(tmp)
    ours = load_for_inference(Path(tmp), device).model.eval()
    return hf.to(device), ours


def image_mode(args, device: torch.device) -> None:
    import torch.nn.functional as F
    from transformers import MaskFormerImageProcessor

    from maskformer_cli.inference import semantic_inference
    from maskformer_cli.models import normalize
    from maskformer_cli.postprocess import PostProcessor, channels_last_default
    from maskformer_cli.precision import autocast

    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = load_both(args.backbone, device, tmp)
    processor = MaskFormerImageProcessor()
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, args.size, args.size), generator=g).float().to(device)
    size = (args.size, args.size)

    def pp(precision: str) -> PostProcessor:
        return PostProcessor(num_classes=K, ignore_label=255, thing_ids=(), mode="semantic",
                             object_mask_threshold=0.8, overlap_threshold=0.8, panoptic_postprocessing="maskformer",
                             detr_threshold=0.85, general_threshold=0.3, iterative_ratio=0.3, tta=False,
                             tta_scales=(1.0,), tta_flip=False, precision=precision,
                             channels_last=channels_last_default(device))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"backbone {args.backbone}, {args.size}x{args.size}, K={K}, Q=100; load: {os.getloadavg()[0]:.2f}")
    fp32_labels = None
    for precision in ("fp32", "bf16"):
        post = pp(precision)
        ours_net = ours
        x_hf = normalize(image)

        def hf_forward(precision=precision, x_hf=x_hf):
            with torch.no_grad(), autocast(device, "fp32" if precision == "fp32" else precision):
                return hf(pixel_values=x_hf)

        def hf_post(out):
            out.class_queries_logits = out.class_queries_logits.float()
            out.masks_queries_logits = out.masks_queries_logits.float()
            return processor.post_process_semantic_segmentation(out, target_sizes=[size])[0]

        def ours_forward(post=post, ours_net=ours_net):
            return post.forward(ours_net, image)

        def ours_post(out, post=post):
            return post.postprocess(out, [size], size, [size])[0]["sem_seg"]

        def written_out(out):  # the previous production path: [Q, H, W] masks, then one [K, Q] x [Q, HW] product
            masks = F.interpolate(out.pred_masks, size=size, mode="bilinear", align_corners=False)[0]
            return semantic_inference(out.pred_logits[0], masks).argmax(0)

        hf_out, ours_out = hf_forward(), ours_forward()
        ours_post(ours_out), hf_post(hf_out)  # warm-up
        fwd = alternate({"transformers": hf_forward, "ours": ours_forward}, args.rounds, device)
        post_t = _post_times(hf_forward, hf_post, ours_out, ours_post, args.rounds, device)
        e2e = alternate({"transformers": lambda: hf_post(hf_forward()), "ours": lambda: ours_post(ours_forward())},
                        args.rounds, device)
        before = alternate({"written out": lambda o=ours_out: written_out(o), "ours": lambda o=ours_out: ours_post(o)},
                           args.rounds, device)
        same = torch.equal(written_out(ours_out), ours_post(ours_out))
        print(f"\n[{precision}] median seconds (transformers / ours = ratio):")
        for name, t in (("forward", fwd), ("post-processing", post_t), ("image -> labels", e2e)):
            a, b = statistics.median(t["transformers"]), statistics.median(t["ours"])
            print(f"  {name:16s} {a:8.4f}  {b:8.4f}   x{a / b:.2f}")
        a, b = statistics.median(before["written out"]), statistics.median(before["ours"])
        print(f"  post-processing, written-out exact path (full [Q, H, W] masks) / ours: {a:.4f} / {b:.4f} = "
              f"x{a / b:.2f}; labels identical: {same}")
        labels = ours_post(ours_forward())
        if precision == "fp32":
            fp32_labels = labels
            hf_fp32_e2e = statistics.median(e2e["transformers"])
        else:
            agree = (labels == fp32_labels).float().mean().item()
            print(f"  ours bf16 vs transformers fp32, image -> labels: x{hf_fp32_e2e / statistics.median(e2e['ours']):.2f}"
                  f"; pixel agreement with our fp32: {100 * agree:.2f}% (random weights)")


def _post_times(hf_forward, hf_post, ours_out, ours_post, rounds: int, device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"transformers": [], "ours": []}
    for _ in range(rounds):
        out = hf_forward()
        sync(device)
        t = time.perf_counter()
        hf_post(out)
        sync(device)
        times["transformers"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ours_post(ours_out)
        sync(device)
        times["ours"].append(time.perf_counter() - t)
    return times


def backends_mode(args, device: torch.device) -> None:
    from transformers import MaskFormerImageProcessor

    from maskformer_cli.backends import OnnxRuntimeNet, OpenVinoNet
    from maskformer_cli.commands.export import run_export
    from maskformer_cli.postprocess import PostProcessor, channels_last_default

    if device.type != "cpu":
        raise SystemExit("--mode backends measures the CPU backends: use --device cpu")
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, args.size, args.size), generator=g).float()
    size = (args.size, args.size)
    processor = MaskFormerImageProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_model(args.backbone)
        hf.save_pretrained(Path(tmp) / "hf")
        from maskformer_cli.weights import load_for_inference

        ours = load_for_inference(Path(tmp) / "hf", device).model.eval()
        t = time.perf_counter()
        onnx_file = run_export(Path(tmp) / "hf", fmt="onnx", task="panoptic", out=Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - t
        outputs = ["class_logits", "mask_logits"]
        nets = {"onnxruntime fp32": OnnxRuntimeNet(onnx_file, outputs),
                "openvino fp32": OpenVinoNet(onnx_file, outputs, "fp32"),
                "openvino bf16": OpenVinoNet(onnx_file, outputs, "bf16")}

    def pp(precision: str, channels_last: bool) -> PostProcessor:
        return PostProcessor(num_classes=K, ignore_label=255, thing_ids=(), mode="semantic",
                             object_mask_threshold=0.8, overlap_threshold=0.8, panoptic_postprocessing="maskformer",
                             detr_threshold=0.85, general_threshold=0.3, iterative_ratio=0.3, tta=False,
                             tta_scales=(1.0,), tta_flip=False, precision=precision, channels_last=channels_last)

    def labels_of(net, post):
        return lambda: post(net, image, [size], [size])[0]["sem_seg"]

    x_hf = (image - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)) / torch.tensor(
        [58.395, 57.12, 57.375]).view(3, 1, 1)

    def hf_labels():
        with torch.no_grad():
            out = hf(pixel_values=x_hf)
        return processor.post_process_semantic_segmentation(out, target_sizes=[size])[0]

    fns = {"transformers fp32": hf_labels,
           "ours torch fp32": labels_of(ours, pp("fp32", channels_last_default(device))),
           "ours torch bf16": labels_of(ours, pp("bf16", channels_last_default(device)))}
    fns.update({name: labels_of(net, pp("fp32", False)) for name, net in nets.items()})
    results = {name: fn() for name, fn in fns.items()}  # warm-up, and the labels compared below
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backbone {args.backbone}, "
          f"{args.size}x{args.size}, K={K}, Q=100; export to ONNX {export_s:.0f} s; load: {os.getloadavg()[0]:.2f}")
    times = alternate(fns, args.rounds, device)
    base = statistics.median(times["transformers fp32"])
    ref = results["ours torch fp32"]
    print(f"image -> label map, median of {args.rounds} (ratio = transformers fp32 / this; agreement with ours "
          f"torch fp32):")
    for name, t in times.items():
        agree = 100 * (results[name] == ref).float().mean().item()
        print(f"  {name:18s} {statistics.median(t):7.3f} s   x{base / statistics.median(t):.2f}   {agree:6.2f}%")
    print(f"load after: {os.getloadavg()[0]:.2f}")


def predict_mode(args, device: torch.device) -> None:
    import numpy as np
    from PIL import Image
    from transformers import MaskFormerImageProcessor

    from maskformer_cli.commands.predict import collect_inputs, predict_files
    from maskformer_cli.data.catalog import get_dataset_info
    from maskformer_cli.weights import load_for_inference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = hf_model(args.backbone)
        hf.save_pretrained(tmp / "hf")
        hf = hf.to(device)
        folder = tmp / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):  # smooth random scenes, 512x683 (ADE20K-like aspect)
            small = rng.integers(0, 256, (16, 22, 3), dtype=np.uint8)
            Image.fromarray(small).resize((683, 512), Image.BICUBIC).save(folder / f"img{i:03d}.jpg", quality=90)
        processor = MaskFormerImageProcessor(do_resize=False, size_divisor=32)
        loaded = load_for_inference(tmp / "hf", device, dataset="ade20k")
        info = get_dataset_info("ade20k")
        files = collect_inputs([str(folder)])

        def run_hf(out_dir: Path):
            out_dir.mkdir(exist_ok=True)
            for f in sorted(folder.glob("*.jpg")):
                image = Image.open(f).convert("RGB")
                inputs = processor(images=image, return_tensors="pt").to(device)
                with torch.no_grad():
                    outputs = hf(**inputs)
                seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
                Image.fromarray(seg.cpu().numpy().astype(np.uint8)).save(out_dir / f"{f.stem}.png")

        def run_ours(out_dir: Path, overlays: bool):
            out_dir.mkdir(exist_ok=True)
            predict_files(loaded, info, files, task="semantic", out=out_dir, device=device, overlays=overlays)

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} JPEGs of 512x683, "
              f"backbone {args.backbone}; load: {os.getloadavg()[0]:.2f}")
        times = alternate({"transformers loop": lambda: run_hf(tmp / "hf_out"),
                           "maskformer predict --no-overlays": lambda: run_ours(tmp / "ours_plain", False),
                           "maskformer predict": lambda: run_ours(tmp / "ours", True)},
                          args.rounds, device)
        base = statistics.median(times["transformers loop"]) / args.images
        for name, t in times.items():
            per = statistics.median(t) / args.images
            print(f"  {name:34s} {per:7.4f} s/image   x{base / per:.2f}")


def agreement_mode(args, device: torch.device) -> None:
    """Pixel agreement of bf16 with fp32 labels of a trained checkpoint over its validation split."""
    from maskformer_cli.data.build import build_eval_loader, dataset_info
    from maskformer_cli.postprocess import build_postprocessor, channels_last_default
    from maskformer_cli.weights import load_for_inference

    loaded = load_for_inference(Path(args.checkpoint), device, dataset=args.dataset)
    info = dataset_info(loaded.recipe.data)
    loader = build_eval_loader(loaded.recipe.data, info, num_workers=0, limit=args.images)
    pps = {p: build_postprocessor(loaded.recipe.inference, info, precision=p,
                                  channels_last=channels_last_default(device)) for p in ("fp32", "bf16")}
    same = total = 0
    times: dict[str, list[float]] = {p: [] for p in pps}
    for batch in loader:
        sizes = [(m["height"], m["width"]) for m in batch.metas]
        labels = {}
        for p, pp in pps.items():
            sync(device)
            t = time.perf_counter()
            labels[p] = pp(loaded.model, batch.images.to(device), batch.image_sizes, sizes)
            sync(device)
            times[p].append(time.perf_counter() - t)
        for a, b in zip(labels["fp32"], labels["bf16"], strict=True):
            same += int((a["sem_seg"] == b["sem_seg"]).sum())
            total += a["sem_seg"].numel()
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{args.checkpoint}: {len(times['fp32'])} images of {info.name}; bf16 labels agree with fp32 on "
          f"{100 * same / max(total, 1):.3f}% of {total} pixels; median s/image fp32 {fp32:.3f}, bf16 {bf16:.3f} "
          f"(x{fp32 / bf16:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=["r50", "swin_tiny"], default="r50")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--mode", choices=["image", "backends", "predict", "agreement"], default="image")
    ap.add_argument("--checkpoint", help="agreement mode: a trained checkpoint (its recipe's validation split)")
    ap.add_argument("--dataset", help="agreement mode: the dataset, if the checkpoint does not record it")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    {"image": image_mode, "backends": backends_mode, "predict": predict_mode,
     "agreement": agreement_mode}[args.mode](args, device)


if __name__ == "__main__":
    main()
