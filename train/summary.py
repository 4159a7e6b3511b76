"""summary.json: how a run ended, its best epoch, the test score of its best weights, its speed."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from planktonio.files import write_atomic


def write_summary(out: Path, records: list[dict], stop_reason: str, *, best_epoch: int, test: dict | None,
                  precision: str, loader: str, world_size: int, device: torch.device, extra: dict | None = None) -> None:
    """Written by rank 0 when a run ends (finished, stopped early, or stopped by a non-finite value)."""
    best = next((r for r in records if r["epoch"] == best_epoch), None)
    mean = (lambda key: sum(r[key] for r in records) / len(records)) if records else (lambda key: None)
    summary = {
        "stop_reason": stop_reason,
        "epochs_run": len(records),
        "best_epoch": best_epoch,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_acc": best["val_acc"] if best else None,
        "best_val_top5": best["val_top5"] if best else None,
        "test_of_best": test,
        "train_seconds": sum(r["epoch_seconds"] for r in records),
        "mean_images_per_s": mean("images_per_s"),
        "mean_data_wait_fraction": mean("data_wait_fraction"),
        "precision": precision,
        "loader": loader,
        "world_size": world_size,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        **(extra or {}),
    }
    if device.type == "cuda":  # this process's own: a run's memory, not what earlier ones left
        free, total = torch.cuda.mem_get_info(device)
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20  # torch's allocator
        summary["device_memory_mb"] = (total - free) / 2**20  # the whole GPU: DALI's pools, the context
        summary["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
