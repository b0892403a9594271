"""The training recipe shared by ``examples/build_default_model.py`` and ``examples/build_zoo.py``: AdamW with a
one-cycle learning rate and small seeded random shifts, on a fixed number of CPU threads with deterministic algorithms,
so two runs on the same machine and torch build give the same weights.

torch and onnxruntime are imported inside the functions; the scripts import this module before torch is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 4e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 2  # pixels, in the 32x32 image
THREADS = 1  # a fixed thread count keeps CPU reductions in the same order from run to run


def recipe(epochs: int = EPOCHS, threads: int = THREADS) -> dict[str, Any]:
    """The schedule as recorded in the scripts' JSON files."""
    return {"epochs": epochs, "batch_size": BATCH_SIZE, "optimizer": "AdamW", "lr": LEARNING_RATE,
            "weight_decay": WEIGHT_DECAY, "schedule": "OneCycleLR",
            "augmentation": f"random shift up to {MAX_SHIFT} px", "threads": threads}


def seed_everything(seed: int, threads: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def shift_batch(x: Any, generator: Any, max_shift: int, fill: float) -> Any:
    """Translate each image by up to ``max_shift`` pixels (background filled in), a cheap, seeded augmentation."""
    import torch
    from torch.nn import functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(net: Any, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, fill: float, log: bool = True) -> None:
    """Train ``net`` in place on CPU: AdamW, one-cycle learning rate, seeded shuffling and shifts."""
    import torch
    from torch.nn import functional as F

    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    steps_per_epoch = (len(inputs) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            images = shift_batch(inputs[batch], generator, MAX_SHIFT, fill)
            logits = net(images)
            loss = F.cross_entropy(logits, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
            correct += int((logits.argmax(1) == targets[batch]).sum())
        if log:
            print(f"  epoch {epoch + 1:2d}/{epochs}: loss {total_loss / len(inputs):.4f}, "
                  f"train accuracy {correct / len(inputs):.4f}", flush=True)
    net.eval()


def torch_logits(net: Any, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return torch.cat([net(torch.from_numpy(x[i:i + 200])) for i in range(0, len(x), 200)]).numpy()


def onnx_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def evaluate(net: Any, model_bytes: bytes, splits: dict[str, tuple[np.ndarray, np.ndarray]]
             ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Accuracy of the trained ``net`` (torch) and of its export ``model_bytes`` (ONNX Runtime): ``{"eval_torch",
    "eval_onnxruntime", "calib_onnxruntime"}``, with the torch and ORT eval logits."""
    (x_eval, y_eval), (x_calib, y_calib) = splits["eval"], splits["calib"]
    ref_logits = torch_logits(net, x_eval)
    ort_logits = onnx_logits(model_bytes, x_eval)
    accuracy = {
        "eval_torch": float(np.mean(ref_logits.argmax(1) == y_eval)),
        "eval_onnxruntime": float(np.mean(ort_logits.argmax(1) == y_eval)),
        "calib_onnxruntime": float(np.mean(onnx_logits(model_bytes, x_calib).argmax(1) == y_calib)),
    }
    return accuracy, ref_logits, ort_logits
