"""`python -m dlext train`: train a dlext model on real data, optionally beside its native twin.

    python -m dlext train --model lenet5 --data digits --epochs 20 --compare-native

Prints per-epoch loss, accuracy and images/s (with a tqdm progress bar), saves a checkpoint (a
state_dict that the torch.nn model loads too) and a PNG of the curves in --out. With
--compare-native the same training runs again with torch.nn layers from the same seed (same
initial weights, same batches) and the two runs' curves and speed are reported side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader

from dlext import data as datasets

MODELS = ("lenet5", "resnet18", "resnet34", "resnet50")


@dataclass
class History:
    label: str
    train_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    test_acc: list = field(default_factory=list)
    images_per_s: list = field(default_factory=list)


def build_model(name: str, num_classes: int, native: bool) -> torch.nn.Module:
    import dlext.models as M
    if name == "lenet5":
        return M.lenet5(num_classes=num_classes, native=native)
    return getattr(M, name)(num_classes=num_classes, native=native)


def _loss_fn(native: bool):
    if native:
        return torch.nn.CrossEntropyLoss()
    import dlext.nn as DN
    return DN.CrossEntropyLoss()


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def evaluate(model, loader, device, amp) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), _autocast(device, amp):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    return correct / max(1, total)


def train_one(args, train_ds, test_ds, num_classes, native: bool, device) -> tuple[History, torch.nn.Module]:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes, native).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    loss_fn = _loss_fn(native)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=-(-len(train_ds) // args.batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=gen,
                              drop_last=False)
    test_loader = DataLoader(test_ds, batch_size=512)
    label = "native" if native else "dlext"
    hist = History(label)
    for epoch in range(1, args.epochs + 1):
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        busy = 0.0
        bar = tqdm(train_loader, desc=f"{label} epoch {epoch}/{args.epochs}", leave=False,
                   disable=args.quiet)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            with _autocast(device, args.amp):
                logits = step_model(x)
                loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            busy += time.perf_counter() - t0
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        hist.train_loss.append(loss_sum / seen)
        hist.train_acc.append(correct / seen)
        hist.test_acc.append(evaluate(model, test_loader, device, args.amp))
        hist.images_per_s.append(seen / busy)
        print(f"[{label}] epoch {epoch:3d}  loss {hist.train_loss[-1]:.4f}  "
              f"train acc {hist.train_acc[-1]:.4f}  test acc {hist.test_acc[-1]:.4f}  "
              f"{hist.images_per_s[-1]:8.0f} images/s", flush=True)
    return hist, model


def plot(histories: list[History], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for h in histories:
        epochs = range(1, len(h.train_loss) + 1)
        a.plot(epochs, h.train_loss, marker="o", label=h.label)
        b.plot(epochs, h.test_acc, marker="o", label=f"{h.label} test")
        b.plot(epochs, h.train_acc, linestyle="--", label=f"{h.label} train")
    a.set(xlabel="epoch", ylabel="training loss", title="loss")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    a.legend()
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(kind):
    """An argparse type: a positive, finite `kind` (int or float)."""
    def parse(text: str):
        value = kind(text)
        if not (value > 0 and value != float("inf")):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m dlext train", description=__doc__)
    p.add_argument("--model", default="lenet5", choices=MODELS)
    p.add_argument("--data", default="digits", choices=datasets.DATASETS)
    p.add_argument("--data-dir", default=None, help="folder with MNIST IDX or CIFAR-10 files")
    p.add_argument("--epochs", type=_positive(int), default=20)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="torch.autocast dtype (fp16 on CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="train in channels_last layout")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compare-native", action="store_true",
                   help="also train the torch.nn twin from the same seed and compare")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<data>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.data_dir is not None and args.data == "digits":
        raise SystemExit("--data-dir is for --data mnist or cifar10; digits are bundled")
    train_ds, test_ds = datasets.load(args.data, args.data_dir)
    num_classes = int(train_ds.tensors[1].max()) + 1
    if args.model.startswith("resnet") and train_ds.tensors[0].shape[1] == 1:
        train_ds.tensors = (train_ds.tensors[0].repeat(1, 3, 1, 1), train_ds.tensors[1])
        test_ds.tensors = (test_ds.tensors[0].repeat(1, 3, 1, 1), test_ds.tensors[1])
    out = args.out or os.path.join("runs", f"{args.model}-{args.data}")
    os.makedirs(out, exist_ok=True)
    print(f"training {args.model} on {args.data} ({len(train_ds)} train / {len(test_ds)} test "
          f"images, {num_classes} classes) on {device}, {args.epochs} epochs", flush=True)

    histories = []
    hist, model = train_one(args, train_ds, test_ds, num_classes, native=False, device=device)
    histories.append(hist)
    ckpt = os.path.join(out, "checkpoint.pt")
    torch.save(model.state_dict(), ckpt)
    if args.compare_native:
        native_hist, _ = train_one(args, train_ds, test_ds, num_classes, native=True, device=device)
        histories.append(native_hist)

    plot(histories, os.path.join(out, "curves.png"), f"{args.model} on {args.data} ({device.type})")
    report = {h.label: vars(h) for h in histories}
    # Steady-state speed: the first epoch pays for warm-up (and compilation).
    speed = {h.label: sum(h.images_per_s[1:] or h.images_per_s) / len(h.images_per_s[1:] or h.images_per_s)
             for h in histories}
    print(f"\ndlext: final test accuracy {hist.test_acc[-1]:.4f}, {speed['dlext']:.0f} images/s")
    if args.compare_native:
        print(f"native: final test accuracy {native_hist.test_acc[-1]:.4f}, "
              f"{speed['native']:.0f} images/s")
        print(f"speed ratio dlext / native: {speed['dlext'] / speed['native']:.2f}x")
        report["speed_ratio"] = speed["dlext"] / speed["native"]
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"checkpoint {ckpt} (loads into the torch.nn model too); curves {out}/curves.png")
    return 0
